"""LoRA projections as one autograd node each, with a cheap dropout mask (the fast step's adapters).

peft computes a LoRA linear as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: a dropout
mask drawn one random float per element, a masked copy of ``x`` kept for backward by
every adapter that reads ``x`` (q, k and v each keep their own), two small matmuls, a
scaled copy of their result, an add, and as many autograd nodes again in backward. On a
CPU those passes over the activations, not the matmuls, were most of what stood between
the fast step and the machine's matmul peak. :func:`fused_lora` computes the same
function in one node per projection::

    y  = x W^T (+ bias) + s * ((x * m) A^T / keep) B^T       # the adapter's add folded into addmm
    dh = s * dy B / keep;  dB = s * dy^T h;  dA = dh^T (x * m)
    dx = dy W + (dh A) * m                                   # only where x needs a gradient

and keeps only ``x`` itself (shared by q, k and v, so held once) and 16 random bits per
element for backward, recomputing ``x * m`` there (one cheap pass) instead of storing it.

Numerics: the same function in the same dtype; the sums are rounded in a different order
(``addmm``), so results agree to rounding, not bit for bit. Dropout draws its mask from
torch's own generator (seeded, checkpointed and restored by gradient checkpointing like
any other draw), 16 bits per element, four per 64-bit draw, about 5x cheaper than
``torch.nn.functional.dropout``'s one float per element: the drop probability is ``p``
rounded to a multiple of 1/65536 (0.05 -> 0.0500031), and kept values are scaled by the
exact inverse of the keep probability, so the expectation is unchanged.

Written by hand because peft has no fused path for CPUs, and torch.compile's one-time
cost did not pay on the short runs measured here (see benchmarks/README.md).

Applies to plain LoRA on ``torch.nn.Linear`` bases with one active adapter; DoRA,
quantized bases (QLoRA), merged or disabled adapters and anything else keep peft's forward.

Example::

    from ftmagic.engine.fused_lora import fused_lora
    with fused_lora(model):                  # a PeftModel; restored on exit
        loss = model(**batch).loss
        loss.backward()
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch

_BITS = 16  # random bits per dropout decision
_LEVELS = 1 << _BITS


def dropout_threshold(p: float) -> int:
    """Signed 16-bit threshold: a draw at or above it keeps its element (keep probability ``1 - p``, to 1/65536).

    Example::

        >>> dropout_threshold(0.0), dropout_threshold(0.05)
        (-32768, -29491)
    """
    return round(p * _LEVELS) - _LEVELS // 2


def keep_scale(p: float) -> float:
    """The exact inverse of the keep probability that :func:`dropout_threshold` gives."""
    return _LEVELS / (_LEVELS - round(p * _LEVELS))


def draw_dropout_bits(shape, device) -> torch.Tensor:
    """Uniform 16-bit draws (``int16``, ``shape``) from torch's default generator for ``device``."""
    n = 1
    for size in shape:
        n *= size
    # Four decisions per 64-bit draw: the full signed range makes every 16-bit lane uniform.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, 2**63 - 1)
    return words.view(torch.int16)[:n].view(shape)


def _mask(bits: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    # Comparing straight into a float tensor is one vectorised pass (a bool mask costs a conversion per use).
    out = torch.empty(bits.shape, dtype=dtype, device=bits.device)
    return torch.ge(bits, dropout_threshold(p), out=out)


class _LoraLinear(torch.autograd.Function):
    """``x W^T + b + s * (dropout(x) A^T) B^T`` in one node (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, p, dtype):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        xc, w, a, b = (t.to(dtype) for t in (x2, weight, lora_a, lora_b))
        bc = bias.to(dtype) if bias is not None else None
        y = torch.addmm(bc, xc, w.t()) if bc is not None else xc @ w.t()
        bits = None
        if p > 0:
            bits = draw_dropout_bits(xc.shape, xc.device)
            h = (xc * _mask(bits, p, dtype)) @ a.t()
            h.mul_(keep_scale(p))
        else:
            h = xc @ a.t()
        y.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h, bits)
        ctx.scale, ctx.p, ctx.dtype = scale, p, dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, h, bits = ctx.saved_tensors
        scale, p, dtype = ctx.scale, ctx.p, ctx.dtype
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        dh = (dy2 @ b).mul_(scale)
        grad_b = (dy2.t() @ h).mul_(scale) if need_b else None
        mask = _mask(bits, p, dtype) if bits is not None else None
        if mask is not None:
            dh.mul_(keep_scale(p))
        grad_a = None
        if need_a:
            xd = x.reshape(-1, x.shape[-1]).to(dtype)
            xd = xd * mask if mask is not None else xd
            grad_a = dh.t() @ xd
        grad_x = None
        if need_x:
            grad_x = dy2 @ weight.to(dtype)
            if mask is None:
                grad_x.addmm_(dh, a)
            else:
                grad_x.add_((dh @ a).mul_(mask))
            grad_x = grad_x.view(x.shape)
        grad_bias = dy2.sum(0) if need_bias else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor):
    """The dtype the projection computes in, or None where the fused path does not apply."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    # Without autocast peft runs the adapter in its own dtype and adds to the base output: keep its forward
    # unless everything is in one dtype.
    return x.dtype if x.dtype == weight.dtype == lora_a.dtype else None


def fusable(module) -> bool:
    """Whether ``module`` is a plain peft LoRA ``Linear`` the fused node computes exactly."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
        return False
    if module.base_layer.weight.requires_grad or getattr(module, "lora_variant", None) \
            or any(getattr(module, "use_dora", {}).values()):
        return False
    return all(module.lora_B[name].bias is None and type(module.lora_dropout[name]) in (torch.nn.Dropout, torch.nn.Identity)
               for name in module.lora_A)


def _fused_forward(self, x, *args, **kwargs):
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or name is None or name not in self.lora_A or name in getattr(self, "lora_variant", {})
            or self.disable_adapters or self.merged):
        return type(self).forward(self, x, *args, **kwargs)
    base, lora_a, lora_b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    dtype = _compute_dtype(x, base.weight, lora_a)
    if dtype is None:
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    with torch.autocast(x.device.type, enabled=False):
        return _LoraLinear.apply(x, base.weight, base.bias, lora_a, lora_b, float(self.scaling[name]), p, dtype)


@contextmanager
def fused_lora(model):
    """Within the block, every :func:`fusable` LoRA projection of ``model`` runs as one node.

    Forward and backward (and gradient-checkpointing recomputation) of a step must run
    inside, like :func:`ftmagic.engine.fastpath.varlen_attention`. On exit the modules
    get peft's forward back. Models without such projections are left alone.
    """
    swapped = [m for m in model.modules() if fusable(m) and "forward" not in vars(m)]
    for module in swapped:
        module.forward = types.MethodType(_fused_forward, module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward

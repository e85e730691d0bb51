"""How many floating-point operations one training step needs: the work a machine cannot avoid.

The count is the matrix-multiply work of the parts that run, forward and backward, and
nothing else (norms, activations and the optimizer are a rounding error next to it and
are what "overhead" means when a run is compared with the machine's limit):

* the linear layers of the blocks: ``2 * in * out`` per token forward; backward, the
  gradient with respect to the input (``2 * in * out``) wherever something before the
  layer trains, and with respect to the weight (``2 * in * out``) only when the weight
  trains. Under an adapter the embeddings are frozen, so no gradient flows back past
  the first adapted layer (the first block's q/k/v compute no input gradient at all);
* LoRA adapters: ``2 * r * (in + out)`` per token forward, the same again for the
  weight gradients of ``A`` and ``B``, and again for the input gradient where it flows;
* attention: ``QK^T`` and ``PV`` over the pairs of positions an example really attends
  (``n * (n + 1) / 2`` per example of ``n`` tokens with a causal mask), twice that
  backward (``dQ``, ``dK``, ``dV``, ``dP``, each only where needed). Examples flattened into one row never
  attend to each other, so the work is ``sum(n_i ** 2)``, not ``(sum n_i) ** 2``;
* the output layer only at positions that carry a label (``2 * hidden * vocab`` each,
  forward and backward to the hidden states; the weight gradient only in full training).

Written by hand because the count is needed before anything is built (the benchmark
relates it to a measured matrix-multiply peak); ``torch.utils.flop_counter`` is the
independent check in the tests. Pure Python: no torch.

Example::

    >>> from ftmagic.memory.architectures import ModelShape
    >>> shape = ModelShape(name="toy", model_type="llama", hidden=64, intermediate=128, layers=2,
    ...                    heads=4, kv_heads=2, vocab=1000)
    >>> count = training_flops(shape, lengths=[10, 20], labelled=12, method="lora", lora_r=8)
    >>> count.total == sum(count.breakdown.values())
    True
    >>> round(count.per_token(12))
    1224320
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from ftmagic.errors import ConfigError

# Methods whose block weights are frozen and whose trainable part is a low-rank adapter.
LORA_LIKE = ("lora", "qlora", "dora")
COUNTED_METHODS = ("full",) + LORA_LIKE
# The linears of a block that read the block's (normed) input directly.
_ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj")
_MLP_INPUTS = ("gate_proj", "up_proj", "gate_up_proj")


@dataclass(frozen=True)
class FlopCount:
    """Floating-point operations of one training pass, by part (forward + backward)."""

    linears: int  # the frozen or trained linear layers of the blocks
    adapters: int  # LoRA A and B matrices
    attention: int  # QK^T and PV, forward and backward
    head: int  # the output layer at labelled positions

    @property
    def total(self) -> int:
        return self.linears + self.adapters + self.attention + self.head

    @property
    def breakdown(self) -> dict:
        return {"linears": self.linears, "adapters": self.adapters, "attention": self.attention, "head": self.head}

    def per_token(self, tokens: int) -> float:
        """FLOPs per trained token (``tokens``: positions that carry a label)."""
        return self.total / tokens if tokens else 0.0

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.linears + other.linears, self.adapters + other.adapters,
                         self.attention + other.attention, self.head + other.head)


def training_flops(shape, lengths: Sequence[int], labelled: int, *, method: str = "lora", lora_r: int = 16,
                   target_modules: Optional[Iterable[str]] = None, causal: bool = True) -> FlopCount:
    """FLOPs of one forward and backward pass over examples of ``lengths`` tokens.

    ``shape`` is a :class:`ftmagic.memory.architectures.ModelShape`; ``labelled`` is the
    number of positions that go through the output layer (trained tokens).
    ``method`` is ``full`` or a LoRA-like adapter (``lora``, ``qlora``, ``dora``: the
    4-bit base and DoRA's norm add no matrix-multiply work worth counting).
    ``target_modules`` are the adapted linears (default: all of a block's). ``causal``
    False counts every query-key pair, as a dense attention kernel computes them.

    Example::

        training_flops(resolve_model("llama-3.2-1b"), [512] * 8, labelled=2000).per_token(2000)
    """
    if method not in COUNTED_METHODS:
        raise ConfigError(f"FLOPs are counted for `method:` {', '.join(COUNTED_METHODS)}, not `{method}`")
    lengths = [int(n) for n in lengths if n > 0]
    tokens = sum(lengths)
    full = method == "full"
    linears = shape.linears()
    targets = set(target_modules) if target_modules is not None else {name for name, _, _ in linears}

    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    per_product = 2 * pairs * shape.q_dim  # QK^T or PV (or one of their gradients) over all heads
    linear_flops = adapter_flops = attention_flops = 0

    def linear(name: str, fan_in: int, fan_out: int, input_grad: bool) -> bool:
        """Add one linear's work; return whether its output carries a gradient."""
        nonlocal linear_flops, adapter_flops
        mm = 2 * fan_in * fan_out * tokens
        linear_flops += mm * (1 + input_grad + full)
        adapted = not full and name in targets
        if adapted:
            a, b = 2 * lora_r * fan_in * tokens, 2 * lora_r * fan_out * tokens
            # forward A and B, weight gradients of A and B, the gradient through B always (A's
            # output feeds only B), through A only where the input needs one.
            adapter_flops += (a + b) + (a + b) + b + (a if input_grad else 0)
        return full or input_grad or adapted

    # Whether the residual stream carries a gradient: from the start only when the embeddings train;
    # under an adapter, from the first layer whose output an adapter changes.
    stream = full
    for _ in range(shape.layers):
        grads = {}
        for name, fan_in, fan_out in linears:
            if name in _ATTENTION_INPUTS:
                grads[name] = linear(name, fan_in, fan_out, stream)
        q = grads.get("q_proj", grads.get("qkv_proj", False))
        k = grads.get("k_proj", grads.get("qkv_proj", False))
        v = grads.get("v_proj", grads.get("qkv_proj", False))
        # Forward QK^T and PV; backward dV = P^T dO, dP = dO V^T (for dQ and dK), dQ, dK: each only if needed.
        attention_flops += per_product * (2 + v + (q or k) + q + k)
        attention_out = q or k or v
        for name, fan_in, fan_out in linears:
            if name == "o_proj":
                stream = linear(name, fan_in, fan_out, attention_out) or stream
        mlp = False
        for name, fan_in, fan_out in linears:
            if name in _MLP_INPUTS:
                mlp = linear(name, fan_in, fan_out, stream) or mlp
        for name, fan_in, fan_out in linears:
            if name == "down_proj":
                stream = linear(name, fan_in, fan_out, mlp) or stream

    head_flops = 2 * shape.hidden * shape.vocab * labelled * (1 + stream + full)
    return FlopCount(linear_flops, adapter_flops, attention_flops, head_flops)


def flops_per_trained_token(shape, lengths: Sequence[int], labelled: int, **kwargs) -> float:
    """:func:`training_flops` divided by the trained tokens (``labelled``)."""
    return training_flops(shape, lengths, labelled, **kwargs).per_token(labelled)


def limit_share(tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float) -> float:
    """Share of the machine's limit a run reaches: achieved FLOP/s over the measured matmul peak.

    Example::

        >>> limit_share(1000, 2e8, 4e11)
        0.5
    """
    return tokens_per_s * flops_per_token / peak_flops_per_s if peak_flops_per_s else 0.0

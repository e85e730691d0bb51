"""Causal-LM loss without a full ``[tokens, vocab]`` fp32 logits tensor.

A model's output layer turns every position into ``vocab`` logits. For a batch of 8 x 512
tokens and a 32k vocabulary that is 128M floats (512 MB in fp32) for the logits, and the
same again for their gradient, though only the positions that carry a label (often a
third of them, with loss on completions only) contribute to the loss.

:func:`causal_lm_loss` keeps only those positions, then walks them in chunks of rows:
for each chunk it computes the logits, the loss and, right away, the gradient with respect
to the hidden states (and to the output weight when it trains). Backward then only scales
the stored gradients, so the logits are computed once and never all held at the same time.
Peak extra memory is one chunk of logits (``chunk_rows x vocab``).

Example::

    >>> import torch
    >>> from ftmagic.engine.losses import causal_lm_loss
    >>> hidden = torch.randn(2, 5, 8, requires_grad=True)    # last hidden states
    >>> weight = torch.randn(11, 8)                           # lm_head.weight [vocab, hidden]
    >>> labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    >>> loss = causal_lm_loss(hidden, weight, labels)         # mean over trained tokens
    >>> loss.backward()
"""

from __future__ import annotations

import torch

from ftmagic.constants import IGNORE_INDEX, LOSS_CHUNK_ELEMENTS


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits stays near 32 MB.

    Example::

        >>> default_chunk_rows(32000)
        262
    """
    return max(16, LOSS_CHUNK_ELEMENTS // max(1, vocab_size))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # At least fp32: log-softmax over a large vocabulary loses too much in bf16/fp16.
    return torch.promote_types(dtype, torch.float32)


def _logits_block(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None = None) -> torch.Tensor:
    # The matmul runs in the weight's dtype, as `lm_head` would (no fp32 copy of a large head);
    # only the chunk's logits are upcast for the softmax.
    logits = hidden.to(weight.dtype) @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.to(_acc_dtype(logits.dtype))
    if softcap:  # Gemma 2: cap * tanh(logits / cap), as its forward applies after the head
        logits = torch.tanh(logits / softcap).mul_(softcap)
    return logits


def rounded_chunk_rows(rows: int, multiple: int) -> tuple[int, int]:
    """``(chunk rows, multiple)`` for chunks of a multiple of rows, never more rows than asked
    (the logits' memory per chunk).

    Example::

        >>> rounded_chunk_rows(262, 64), rounded_chunk_rows(16, 64)
        ((256, 64), (16, 16))
    """
    multiple = min(multiple, rows)
    return rows - rows % multiple, multiple


def padded_rows(h: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """``h`` with zero rows added up to a multiple of ``multiple`` rows, and how many it had."""
    n, pad = h.shape[0], -h.shape[0] % multiple
    return (torch.cat([h, h.new_zeros(pad, h.shape[1])]) if pad else h), n


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, chunked over rows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, softcap=None, multiple=1):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        acc = _acc_dtype(weight.dtype)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            t = targets[start:start + chunk_rows]
            # Zero rows up to a multiple: their loss is not counted and their gradient is zeroed.
            h, n = padded_rows(h, multiple)
            pad = h.shape[0] - n
            # One fused pass for log-softmax (a separate logsumexp, subtract and exp measured ~30% slower).
            logits = _logits_block(h, weight, bias, softcap)
            logp = torch.log_softmax(logits, dim=-1)
            if not softcap:  # only the cap's gradient needs the logits again
                del logits
            total -= logp[:n].gather(1, t[:, None]).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum CE)/d(logits) = softmax - onehot, computed in place over the chunk's log-probabilities.
            grad_logits = logp.exp_()
            grad_logits[torch.arange(n, device=t.device), t] -= 1.0
            if pad:
                grad_logits[n:] = 0.0
            if softcap:  # through the cap: d(cap * tanh(z / cap))/dz = 1 - (capped / cap)**2
                grad_logits.mul_(1.0 - (logits / softcap).square_())
            if need_h:
                grad_h[start:start + n] = (grad_logits.to(weight.dtype) @ weight)[:n].to(hidden.dtype)
            if need_w:
                grad_w.addmm_(grad_logits.t(), h.to(acc))
            if need_b:
                grad_b += grad_logits.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None


def labelled_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               bias: torch.Tensor | None = None, chunk_rows: int | None = None,
                               softcap: float | None = None, multiple: int = 1) -> torch.Tensor:
    """Summed cross-entropy of rows ``hidden`` ``[N, H]`` that all carry a target ``[N]``, chunked.

    The core of :func:`linear_cross_entropy`, without its masking of unlabelled positions
    (the memory tracer calls it on fake tensors, whose masked size cannot be known).
    ``softcap`` soft-caps the logits (``cap * tanh(logits / cap)``, Gemma 2). ``multiple``
    > 1 runs the output layer on chunks of a multiple of that many rows (the last one
    padded with rows that count for nothing), for kernels built per shape
    (:attr:`ftmagic.engine.device.DevicePlan.row_multiple`).
    """
    rows, multiple = rounded_chunk_rows(chunk_rows or default_chunk_rows(weight.shape[0]), multiple)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, rows, softcap, multiple)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, reduction: str = "mean",
                         chunk_rows: int | None = None, ignore_index: int = IGNORE_INDEX,
                         softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` without full logits.

    ``hidden`` is ``[..., H]``, ``weight`` is ``[V, H]``, ``targets`` has ``hidden``'s leading
    shape; positions equal to ``ignore_index`` carry no loss. ``reduction`` is ``"mean"`` (over
    the kept positions; 0 when there are none) or ``"sum"``.

    Example::

        >>> h, w = torch.randn(6, 4), torch.randn(9, 4)
        >>> t = torch.tensor([1, 2, -100, 3, 4, 5])
        >>> torch.allclose(linear_cross_entropy(h, w, t),
        ...                torch.nn.functional.cross_entropy(h @ w.t(), t))
        True
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    # Only positions with a label go through the output layer at all.
    hidden = hidden[keep]
    targets = targets[keep]
    total = labelled_cross_entropy_sum(hidden, weight, targets, bias=bias, chunk_rows=chunk_rows, softcap=softcap)
    if reduction == "sum":
        return total
    return total / targets.shape[0] if targets.shape[0] else total


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   bias: torch.Tensor | None = None, reduction: str = "mean",
                   chunk_rows: int | None = None, ignore_index: int = IGNORE_INDEX,
                   softcap: float | None = None) -> torch.Tensor:
    """Next-token loss from last hidden states ``[B, T, H]`` and ``labels`` ``[B, T]``.

    Position ``t`` predicts ``labels[:, t + 1]``, as in ``LlamaForCausalLM``; packed rows
    need ``-100`` at each example's first token (the data layer's labels already have it,
    since prompts carry no loss). Same value and gradients as
    ``F.cross_entropy(lm_head(hidden)[:, :-1].flatten(0, 1), labels[:, 1:].flatten())``.

    Example::

        >>> h = torch.randn(1, 4, 8); w = torch.randn(10, 8)
        >>> loss = causal_lm_loss(h, w, torch.tensor([[-100, 2, 3, 4]]), reduction="sum")
    """
    return linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], bias=bias, reduction=reduction,
                                chunk_rows=chunk_rows, ignore_index=ignore_index, softcap=softcap)

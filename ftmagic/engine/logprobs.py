"""Per-token log-probabilities of labelled positions without full ``[tokens, vocab]`` logits.

Preference objectives (DPO, ORPO) need ``log p(token)`` for each completion token, summed
per sequence, with a gradient that differs per sequence (the DPO weight of each pair).
:func:`token_logprobs` walks the labelled rows in chunks, as the SFT loss does
(:mod:`ftmagic.engine.losses`): each chunk's logits exist only while that chunk is
processed. The gradient with respect to the hidden states, ``W[t] - softmax(hW)W`` per
row, is computed in the same pass and kept (``rows x hidden``, what SFT keeps too), so
backward only scales it by each row's upstream gradient. When the output layer itself
trains (full fine-tuning, tied embeddings), its gradient depends on those per-row scales,
so backward recomputes each chunk's softmax once more for it.

Under ``torch.no_grad()`` (the DPO reference forward) nothing is kept: only the chunked
log-softmax runs.

Example::

    >>> import torch
    >>> h, w = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8)
    >>> t = torch.tensor([1, 2, 3, 4, 5])
    >>> ref = torch.log_softmax(h @ w.t(), -1).gather(1, t[:, None]).squeeze(1)
    >>> torch.allclose(token_logprobs(h, w, t), ref, atol=1e-6)
    True
"""

from __future__ import annotations

import torch

from ftmagic.engine.losses import _acc_dtype, _logits_block, default_chunk_rows, padded_rows, rounded_chunk_rows


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[row, target]`` for every row, chunked."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, multiple=1):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        acc = _acc_dtype(weight.dtype)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        for start in range(0, hidden.shape[0], chunk_rows):
            # Zero rows up to a multiple (kernels built per shape): their values are dropped.
            h, n = padded_rows(hidden[start:start + chunk_rows], multiple)
            t = targets[start:start + chunk_rows]
            logp = torch.log_softmax(_logits_block(h, weight, bias), dim=-1)
            out[start:start + n] = logp[:n].gather(1, t[:, None]).squeeze(1)
            if need_h:
                # d logp[t] / d logits = onehot(t) - softmax, then through the output layer.
                coeff = logp.exp_().neg_()
                coeff[torch.arange(n, device=t.device), t] += 1.0
                grad_h[start:start + n] = (coeff.to(weight.dtype) @ weight)[:n].to(hidden.dtype)
        ctx.need_wb = need_w or need_b
        ctx.chunk_rows, ctx.multiple = chunk_rows, multiple
        ctx.save_for_backward(grad_h, hidden if ctx.need_wb else None, weight if ctx.need_wb else None,
                              bias if ctx.need_wb else None, targets if ctx.need_wb else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, hidden, weight, bias, targets = ctx.saved_tensors
        gh = gw = gb = None
        if grad_h is not None:
            gh = grad_h * grad_out[:, None].to(grad_h.dtype)
        if ctx.need_wb:
            acc = _acc_dtype(weight.dtype)
            gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
            gb = torch.zeros(bias.shape, dtype=acc, device=bias.device) if ctx.needs_input_grad[2] else None
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                h, n = padded_rows(hidden[start:start + ctx.chunk_rows], ctx.multiple)
                t = targets[start:start + ctx.chunk_rows]
                g = grad_out[start:start + ctx.chunk_rows].to(acc)
                coeff = torch.softmax(_logits_block(h, weight, bias), dim=-1).neg_()
                coeff[torch.arange(n, device=t.device), t] += 1.0
                coeff[:n] *= g[:, None]
                if n < h.shape[0]:
                    coeff[n:] = 0.0  # padding rows add nothing to the layer's gradient
                if gw is not None:
                    gw.addmm_(coeff.t(), h.to(acc))
                if gb is not None:
                    gb += coeff.sum(0)
            gw = gw.to(weight.dtype) if gw is not None else None
            gb = gb.to(bias.dtype) if gb is not None else None
        return gh, gw, gb, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   bias: torch.Tensor | None = None, chunk_rows: int | None = None, multiple: int = 1) -> torch.Tensor:
    """``log p(targets[i] | hidden[i])`` for rows ``hidden`` ``[N, H]`` under the output layer ``weight`` ``[V, H]``.

    Same values and gradients as ``log_softmax(hidden @ weight.T + bias).gather(targets)``,
    without the ``[N, V]`` logits held at once (see the module docstring). ``multiple`` > 1
    runs the output layer's forward on chunks of a multiple of that many rows, as
    :func:`ftmagic.engine.losses.labelled_cross_entropy_sum` does.
    """
    rows, multiple = rounded_chunk_rows(chunk_rows or default_chunk_rows(weight.shape[0]), multiple)
    return _ChunkedTokenLogProbs.apply(hidden, weight, bias, targets, rows, multiple)


def sequence_sums(values: torch.Tensor, sequence_of_row: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """Sum per-row ``values`` into their sequences (``sequence_of_row[i]`` is row ``i``'s sequence).

    Example::

        >>> sequence_sums(torch.tensor([1., 2., 3.]), torch.tensor([0, 1, 1]), 2).tolist()
        [1.0, 5.0]
    """
    out = torch.zeros(n_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, sequence_of_row.to(values.device), values)

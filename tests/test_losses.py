"""The chunked causal-LM loss against torch's cross-entropy on full logits, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftmagic.engine import losses
from ftmagic.engine.losses import causal_lm_loss, default_chunk_rows, linear_cross_entropy


def _reference(hidden, weight, labels, bias=None, reduction="mean"):
    logits = hidden[:, :-1] @ weight.t()
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction)


def _inputs(seed=0, b=3, t=17, h=12, v=37, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) * 0.5
    bias = torch.randn(v, generator=g, dtype=dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[1, 10:] = -100  # padding
    labels[2, ::3] = -100  # packed-example boundaries
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_and_gradients_match_full_logits(chunk_rows, reduction):
    hidden, weight, bias, labels = _inputs()
    ours = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    ref = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss = causal_lm_loss(ours[0], ours[1], labels, bias=ours[2], reduction=reduction, chunk_rows=chunk_rows)
    expected = _reference(ref[0], ref[1], labels, bias=ref[2], reduction=reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    # A non-unit upstream gradient checks that backward scales what forward stored.
    (loss * 3.0).backward()
    (expected * 3.0).backward()
    for mine, theirs in zip(ours, ref):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-10)
    # Positions whose next label is ignored get exactly zero gradient.
    assert torch.count_nonzero(ours[0].grad[1, 9:]) == 0
    assert torch.count_nonzero(ours[0].grad[:, -1]) == 0


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunks_rounded_up_to_a_multiple_change_no_value_and_no_gradient(softcap):
    from ftmagic.engine.losses import labelled_cross_entropy_sum

    hidden, weight, bias, labels = _inputs()
    rows, targets = hidden.reshape(-1, hidden.shape[-1])[:40], labels.reshape(-1)[:40].clamp(min=0)
    results = []
    for multiple in (1, 16):  # 40 rows in chunks of 16: the last chunk of 8 is padded to 16
        leaves = [x.clone().requires_grad_() for x in (rows, weight, bias)]
        loss = labelled_cross_entropy_sum(leaves[0], leaves[1], targets, bias=leaves[2], chunk_rows=16,
                                          softcap=softcap, multiple=multiple)
        (loss * 2.0).backward()
        results.append((loss.detach(), [leaf.grad for leaf in leaves]))
    (plain, plain_grads), (padded, padded_grads) = results
    torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(padded_grads, plain_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_rounded_chunk_runs_the_output_layer_on_a_multiple_of_rows(monkeypatch):
    from ftmagic.engine.losses import labelled_cross_entropy_sum

    seen = []
    real = losses._logits_block

    def spy(h, *args, **kwargs):
        seen.append(h.shape[0])
        return real(h, *args, **kwargs)

    monkeypatch.setattr(losses, "_logits_block", spy)
    hidden, weight, _, labels = _inputs()
    labelled_cross_entropy_sum(hidden.reshape(-1, 12)[:45], weight, labels.reshape(-1)[:45].clamp(min=0),
                               chunk_rows=20, multiple=8)
    assert seen == [16, 16, 16]  # chunks of 20 become 16 (a multiple of 8); 45 = 16 + 16 + 13 padded to 16


def test_frozen_head_gets_no_gradient_and_fp32_matches_closely():
    hidden, weight, _, labels = _inputs(seed=1, dtype=torch.float32)
    h1 = hidden.clone().requires_grad_()
    h2 = hidden.clone().requires_grad_()
    loss = causal_lm_loss(h1, weight, labels, chunk_rows=5)
    expected = _reference(h2, weight, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    assert weight.grad is None


def test_bf16_hidden_gives_bf16_gradient_close_to_fp32():
    hidden, weight, _, labels = _inputs(seed=2, dtype=torch.float32)
    hb = hidden.to(torch.bfloat16).requires_grad_()
    wb = weight.to(torch.bfloat16)
    loss = causal_lm_loss(hb, wb, labels, chunk_rows=8)
    assert loss.dtype == torch.float32
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16
    # What transformers does in bf16: bf16 lm_head, logits upcast to fp32 for the loss.
    href = hb.detach().clone().requires_grad_()
    logits = (href[:, :-1] @ wb.t()).float()
    expected = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hb.grad.float(), href.grad.float(), rtol=2e-2, atol=1e-3)


def test_logits_never_exceed_one_chunk(monkeypatch):
    hidden, weight, _, labels = _inputs(seed=3, b=4, t=40, v=50, dtype=torch.float32)
    seen = []
    original = losses._logits_block

    def recording(h, *rest):
        seen.append(tuple(h.shape))
        return original(h, *rest)

    monkeypatch.setattr(losses, "_logits_block", recording)
    trained = int((labels[:, 1:] != -100).sum())
    causal_lm_loss(hidden.requires_grad_(), weight, labels, chunk_rows=9).backward()
    assert max(rows for rows, _ in seen) == 9
    # Only labelled positions reach the output layer, each exactly once (forward and backward).
    assert sum(rows for rows, _ in seen) == trained


def test_all_positions_ignored_gives_zero_and_zero_gradient():
    hidden = torch.randn(2, 6, 4, requires_grad=True)
    weight = torch.randn(9, 4)
    labels = torch.full((2, 6), -100)
    loss = causal_lm_loss(hidden, weight, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_no_grad_eval_matches_and_skips_gradient_work():
    hidden, weight, _, labels = _inputs(seed=4, dtype=torch.float32)
    with torch.no_grad():
        loss = causal_lm_loss(hidden, weight, labels, chunk_rows=4)
    torch.testing.assert_close(loss, _reference(hidden, weight, labels), rtol=1e-5, atol=1e-6)
    assert not loss.requires_grad


def test_linear_cross_entropy_flat_inputs_and_bad_reduction():
    h, w = torch.randn(6, 4), torch.randn(9, 4)
    t = torch.tensor([1, 2, -100, 3, 4, 5])
    torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk_rows=2), F.cross_entropy(h @ w.t(), t))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        linear_cross_entropy(h, w, t, reduction="none")


def test_default_chunk_rows_bounds_chunk_memory():
    assert default_chunk_rows(32000) == 262
    assert default_chunk_rows(128256) == 65
    assert default_chunk_rows(10**9) == 16

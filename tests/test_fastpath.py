"""The fast step (flattened rows, per-example attention, chunked loss) equals the model's own loss, per example."""

from __future__ import annotations

import pytest
import torch

from ftmagic.engine import fastpath
from ftmagic.engine.fastpath import fast_loss, flatten_batch, supports_fast_path, varlen_attention


def _model(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    settings.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))


def _examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in ((7, 3), (1, 0), (12, 5), (5, 2), (9, 9)):
        ids = torch.randint(3, 61, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _reference(model, examples):
    """Sum of token losses, each example run on its own through the model's own forward."""
    total, count = 0.0, 0
    for ex in examples:
        labels = torch.tensor([ex["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        if n == 0:
            continue
        total = total + model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss * n
        count += n
    return total, count


def _packed_rows(examples):
    from ftmagic.data.pack import pack

    return pack(examples, 24)


def test_flatten_batch_marks_boundaries_and_first_labels():
    rows = _packed_rows(_examples())
    batch = flatten_batch(rows)
    assert batch["seq_bounds"] == (0, 7, 8, 20, 25, 34)
    pos = batch["position_ids"][0].tolist()
    assert [i for i, p in enumerate(pos) if p == 0] == [0, 7, 8, 20, 25]
    assert batch["labels"][0, [0, 7, 8, 20, 25]].tolist() == [-100] * 5
    assert batch["input_ids"].shape == (1, 34)
    # Unpacked rows (no position_ids) are one example each.
    plain = flatten_batch(_examples()[:2])
    assert plain["seq_bounds"] == (0, 7, 8) and plain["position_ids"][0].tolist() == list(range(7)) + [0]


@pytest.mark.parametrize("wrap", [False, True])
def test_fast_loss_and_gradients_equal_per_example_forward(wrap, monkeypatch):
    model = _model()
    if wrap:
        model = _lora(model)
    examples = _examples()
    assert supports_fast_path(model)
    params = [p for p in model.parameters() if p.requires_grad]

    expected, count = _reference(model, examples)
    expected.backward()
    ref_grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    calls = []
    real_sdpa = fastpath.F.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[2])
        return real_sdpa(q, *args, **kwargs)

    monkeypatch.setattr(fastpath.F, "scaled_dot_product_attention", counting)
    with varlen_attention(model):
        loss = fast_loss(model, flatten_batch(_packed_rows(examples)), reduction="sum")
        loss.backward()
    monkeypatch.undo()
    # Each of the 2 layers attends within each of the 5 examples separately.
    assert calls == [7, 1, 12, 5, 9] * 2
    assert count == 6 + 0 + 6 + 2 + 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for p, ref in zip(params, ref_grads):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)


def test_a_row_rounded_up_to_a_multiple_trains_exactly_as_the_unrounded_row():
    model = _lora(_model())
    params = [p for p in model.parameters() if p.requires_grad]
    rows = _packed_rows(_examples())
    results = []
    for multiple in (1, 16):
        batch = flatten_batch(rows, multiple=multiple, pad_id=3)
        with varlen_attention(model):
            loss = fast_loss(model, batch, reduction="sum")
            loss.backward()
        results.append((batch, loss.detach(), [p.grad.clone() for p in params]))
        model.zero_grad(set_to_none=True)
    (plain, loss, grads), (rounded, rounded_loss, rounded_grads) = results
    assert plain["input_ids"].shape == (1, 34) and rounded["input_ids"].shape == (1, 48)
    # the tail is one segment of pad tokens with no label: the trained positions are the same
    assert rounded["seq_bounds"] == plain["seq_bounds"] + (48,)
    assert rounded["input_ids"][0, 34:].tolist() == [3] * 14 and rounded["labels"][0, 34:].tolist() == [-100] * 14
    assert torch.equal(rounded["label_index"], plain["label_index"])
    torch.testing.assert_close(rounded_loss, loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(rounded_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # a row already at a multiple is left as it is
    assert flatten_batch(rows, multiple=17)["seq_bounds"] == plain["seq_bounds"]


def test_rows_are_rounded_only_where_onednn_builds_a_kernel_per_shape():
    from ftmagic.engine.device import ONEDNN_ROW_MULTIPLE, DeviceCaps, choose_device

    bf16_cpu = DeviceCaps(cpu_flags=frozenset({"avx512_bf16", "amx_bf16"}))
    assert choose_device(bf16_cpu, precision="bf16").row_multiple == ONEDNN_ROW_MULTIPLE
    assert choose_device(bf16_cpu, precision="fp32").row_multiple == 1  # MKL's fp32 matmuls
    a100 = DeviceCaps(cuda_available=True, name="A100", compute_capability=(8, 0), total_memory=40 << 30,
                      bf16_supported=True)
    assert choose_device(a100, precision="bf16").row_multiple == 1


def test_without_varlen_attention_examples_would_see_each_other():
    model = _model()
    examples = _examples()
    expected, _ = _reference(model, examples)
    with torch.no_grad():
        # SDPA would detect the packed position_ids itself; a plain causal row (no position
        # restarts) shows what leaking across examples does to the loss.
        batch = flatten_batch(_packed_rows(examples))
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        leaked = fast_loss(model, {k: v for k, v in batch.items() if k != "seq_bounds"})
    assert abs(float(leaked) - float(expected.detach())) > 1e-3


def test_padded_batch_outside_varlen_matches_model_loss():
    model = _model()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
             "labels": torch.tensor([[-100, 6, 7, 8], [-100, 10, -100, -100]])}
    with torch.no_grad():
        ours = fast_loss(model, batch, reduction="mean")
        theirs = model(**batch).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_varlen_attention_restores_setting_even_on_error():
    model = _model()
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"):
        with varlen_attention(model):
            assert model.config._attn_implementation == "ftmagic_varlen"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_prompt_learning_and_scaled_logits_keep_the_model_forward():
    from peft import PromptTuningConfig, get_peft_model

    from ftmagic.engine.fastpath import fast_path_blocker

    prompt = get_peft_model(_model(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert not supports_fast_path(prompt)
    assert fast_path_blocker(prompt) == "prompt learning's virtual tokens are inserted by peft's own forward"
    scaled = _model()
    scaled.config.logit_scale = 0.5
    assert fast_path_blocker(scaled) == "its logits are scaled (`logit_scale`)"


def test_soft_capped_chunked_loss_equals_capped_logits():
    from ftmagic.engine.losses import causal_lm_loss

    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3, 4, 5], [-100, -100, 6, 7, 8, 9]])
    ours = causal_lm_loss(hidden, weight, labels, softcap=2.0, chunk_rows=3)
    ours.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = torch.tanh((hidden @ weight.t()) / 2.0) * 2.0
    theirs = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], weight.grad)


def test_sequence_ends_skip_the_padding_and_refuse_a_split_sequence():
    from ftmagic.engine.fastpath import sequence_ends

    seqs = [{"input_ids": [5, 6, 7], "labels": [-100] * 3}, {"input_ids": [8, 9], "labels": [-100] * 2}]
    batch = flatten_batch(seqs, multiple=4)
    assert batch["seq_bounds"] == (0, 3, 5, 8) and sequence_ends(batch, seqs) == (3, 5)
    packed = [{"input_ids": [5, 6, 7, 8], "labels": [-100] * 4, "seq_lens": [2, 2]}, seqs[1]]
    with pytest.raises(ValueError, match="one segment per sequence"):
        sequence_ends(flatten_batch(packed), packed)

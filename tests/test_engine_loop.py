"""The loop on its own: the gradient-scaler path, and loss normalisation over trained tokens."""

import dataclasses

import pytest
import torch

from ftmagic.config import FinetuneConfig
from ftmagic.engine.device import DevicePlan, choose_optimizer
from ftmagic.engine.loop import train_loop

from engine_helpers import encode, reversal_records


def _rows(tok, n=8):
    return [encode(tok, r) for r in reversal_records(n)]


def _model(model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir)


PLAN = DevicePlan(device="cpu", precision="fp32", use_grad_scaler=False, qlora_compute_dtype=None, method="full",
                  reason="cpu")


def _loop(model, rows, plan, root=None, **cfg):
    config = FinetuneConfig(**{"batch_size": 2, "lr": 1e-3, "max_steps": 3, "warmup": 0, "save_steps": 2,
                               "eval_steps": 0, **cfg})
    events = []
    outcome = train_loop(model, rows, None, config=config, plan=plan, optimizer_plan=choose_optimizer("adamw", "cpu", False),
                         pad_id=0, max_steps=3, emit=lambda e: events.append(e.to_dict()), checkpoint_root=root)
    return outcome, [e["loss"] for e in events if e["event"] == "step"]


def test_grad_scaler_path_matches_unscaled_training(test_model_dir, test_tokenizer, tmp_path):
    rows = _rows(test_tokenizer)
    _, plain = _loop(_model(test_model_dir), rows, PLAN)
    scaled_plan = dataclasses.replace(PLAN, use_grad_scaler=True)  # the fp16 (T4) code path, run on the CPU
    outcome, scaled = _loop(_model(test_model_dir), rows, scaled_plan, root=tmp_path)
    # Scaling by a power of two and unscaling is exact, so the updates are the same.
    assert scaled == pytest.approx(plain, abs=1e-6)
    assert (tmp_path / "step-00000002" / "scaler.pt").is_file()
    state = torch.load(tmp_path / "step-00000002" / "scaler.pt", weights_only=False)
    assert state["scale"] == 65536.0


def test_step_loss_is_the_mean_over_trained_tokens(test_model_dir, test_tokenizer):
    rows = _rows(test_tokenizer, 2)
    model = _model(test_model_dir)
    from ftmagic.engine.collate import collate

    batch = collate(rows, 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    _, losses = _loop(model, rows, PLAN, lr=1e-9)
    assert losses[0] == pytest.approx(float(expected), abs=1e-5)


def test_packed_and_padded_batches_give_the_same_loss(test_model_dir, test_tokenizer):
    from ftmagic.data import pack
    from ftmagic.engine.loop import evaluate

    rows = _rows(test_tokenizer, 10)
    packed = pack(rows, 64)
    assert len(packed) < len(rows)
    model = _model(test_model_dir)
    padded_loss = evaluate(model, rows, batch_size=3, pad_id=0, plan=PLAN)
    packed_loss = evaluate(model, packed, batch_size=2, pad_id=0, plan=PLAN)
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)


def _logged(model_dir, tok, logging_steps):
    config = FinetuneConfig(batch_size=2, lr=1e-3, max_steps=5, logging_steps=logging_steps, save_steps=0,
                            eval_steps=0, seed=3)
    events = []
    outcome = train_loop(_model(model_dir), _rows(tok), None, config=config, plan=PLAN,
                         optimizer_plan=choose_optimizer("adamw", "cpu", False), pad_id=0, max_steps=5,
                         emit=lambda e: events.append(e.to_dict()))
    return outcome, [e for e in events if e["event"] == "step"]


def test_logging_steps_report_token_weighted_means_of_their_window(test_model_dir, test_tokenizer):
    _, every = _logged(test_model_dir, test_tokenizer, 1)
    outcome, thinned = _logged(test_model_dir, test_tokenizer, 2)
    assert [e["step"] for e in thinned] == [2, 4, 5]
    assert outcome.history == thinned  # the history is what was logged
    for event, window in zip(thinned, [every[0:2], every[2:4], every[4:5]]):
        tokens = sum(e["tokens"] for e in window)
        assert event["tokens"] == tokens
        assert event["loss"] == pytest.approx(sum(e["loss"] * e["tokens"] for e in window) / tokens, abs=1e-6)
        assert event["grad_norm"] == pytest.approx(sum(e["grad_norm"] for e in window) / len(window), abs=1e-6)
    assert outcome.train_loss == thinned[-1]["loss"]


def test_no_step_waits_for_the_device_between_logging_steps(test_model_dir, test_tokenizer, monkeypatch):
    """The whole step runs on the meta device, where any read of a value (.item(), float(),
    a boolean mask, .cpu()) raises: only the loop's logging read, counted here, may look at values."""
    import ftmagic.engine.loop as loop

    reads = []

    def read(window):
        reads.append(window.steps)
        window._clear()
        return {"loss": 1.0, "metrics": {}, "grad_norm": 1.0, "tokens": 1, "steps": 1, "seconds": 1.0, "lr": 1e-3}

    monkeypatch.setattr(loop.Window, "read", read)
    model = _model(test_model_dir).to("meta")
    meta = dataclasses.replace(PLAN, device="meta")
    config = FinetuneConfig(batch_size=2, lr=1e-3, max_steps=6, logging_steps=3, save_steps=0, eval_steps=0,
                            grad_accum=2)
    outcome = train_loop(model, _rows(test_tokenizer), None, config=config, plan=meta,
                         optimizer_plan=choose_optimizer("adamw", "cpu", False), pad_id=0, max_steps=6,
                         emit=lambda e: None)
    assert outcome.step == 6
    assert reads == [3, 3]  # one read per logging window of three steps, nothing in between


@pytest.mark.parametrize("packed", [False, True])
def test_fast_step_matches_the_model_forward(test_model_dir, test_tokenizer, monkeypatch, packed):
    import ftmagic.engine.objectives as objectives
    from ftmagic.data import pack

    rows = _rows(test_tokenizer, 12)
    if packed:
        rows = pack(rows, 64)
    assert objectives.supports_fast_path(_model(test_model_dir))
    _, fast = _loop(_model(test_model_dir), rows, PLAN)
    monkeypatch.setattr(objectives, "supports_fast_path", lambda model: False)
    _, slow = _loop(_model(test_model_dir), rows, PLAN)
    assert fast == pytest.approx(slow, abs=1e-5)

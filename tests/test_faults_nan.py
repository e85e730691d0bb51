"""NaN at a chosen step, or from too high a learning rate: nothing non-finite is ever saved.

``on_nan: stop`` (the default) ends the run with the weights of the last finite
checkpoint (or those it started from), ``on_nan: skip`` drops the bad updates and goes on;
metrics.json and history.json stay strict JSON either way.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from ftmagic.cli import main
from ftmagic.engine import checkpoint as ckpt
from ftmagic.engine.run import finetune

from engine_helpers import collect, reversal_records, step_losses

SETTINGS = dict(method="lora", max_steps=8, batch_size=4, lr=1e-2, lora_r=4, lora_dropout=0.0, save_steps=2,
                eval_steps=0, seed=5, logging_steps=1)


class NaNAtStep:
    """Makes the model's output NaN during the training forward passes of the chosen optimizer steps."""

    def __init__(self, steps, grad_accum=1):
        self.steps, self.grad_accum, self.calls = set(steps), grad_accum, 0

    def __call__(self, module, args, output):
        if not module.training:
            return output
        self.calls += 1
        step = (self.calls - 1) // self.grad_accum + 1
        if step in self.steps:
            hidden = output[0] if isinstance(output, tuple) else output
            poisoned = hidden * float("nan")
            return (poisoned, *output[1:]) if isinstance(output, tuple) else poisoned
        return output


def _train(model_dir, out, hook=None, **extra):
    """Train; ``hook`` is attached to the first decoder layer once the model is built."""
    import ftmagic.engine.run as run

    real = run._load_and_prepare

    def with_hook(*args, **kwargs):
        model, *rest = real(*args, **kwargs)
        if hook is not None:
            layers = [m for name, m in model.named_modules() if name.endswith("layers.0")]
            layers[0].register_forward_hook(hook)
        return (model, *rest)

    run._load_and_prepare = with_hook
    try:
        on_event, events = collect()
        result = finetune(model=model_dir, data=reversal_records(16), output_dir=str(out), on_event=on_event,
                          **{**SETTINGS, **extra})
    finally:
        run._load_and_prepare = real
    return result, events


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path.name} holds a bare {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


def _saved_weights_are_finite(out):
    for folder in ckpt.list_checkpoints(out / "checkpoints"):
        assert _all_finite(load_file(str(folder / "trainable.safetensors"))), folder.name
    assert _all_finite(load_file(str(out / "adapter_model.safetensors")))


def _warnings(events):
    return [e["text"] for e in events if e["event"] == "message" and e["level"] == "warning"]


@pytest.mark.parametrize("logging_steps", [1, 3])
def test_nan_at_a_chosen_step_stops_and_keeps_the_last_finite_checkpoint(test_model_dir, tmp_path, logging_steps):
    out = tmp_path / "out"
    result, events = _train(test_model_dir, out, hook=NaNAtStep({5}), logging_steps=logging_steps)
    seen_at = 5 if logging_steps == 1 else 6  # read with the loss, at the next logging step
    assert result.metrics["reason"] == "nonfinite" and result.metrics["steps"] == 4
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000004"]
    assert _warnings(events)[-1] == (f"the loss or gradients became NaN or infinite by step {seen_at} (`lr: 0.01` may "
                                     "be too high); the run stopped and kept the weights of step 4 (checkpoint "
                                     "step-00000004); lower `lr`, or set `on_nan: skip` to skip such steps")
    kept = load_file(str(out / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    final = dict(result.model.named_parameters())
    assert all(torch.equal(final[name].detach().cpu(), tensor) for name, tensor in kept.items())
    _saved_weights_are_finite(out)
    metrics, history = _strict_json(out / "metrics.json"), _strict_json(out / "history.json")
    assert metrics["reason"] == "nonfinite"
    assert any(h["event"] == "step" and h["loss"] is None for h in history)  # the NaN window, as null
    assert events[-1]["event"] == "end" and events[-1]["reason"] == "nonfinite"


def test_nan_before_any_checkpoint_keeps_the_starting_weights(test_model_dir, tmp_path):
    out = tmp_path / "out"
    result, events = _train(test_model_dir, out, hook=NaNAtStep({2}), save_steps=0)
    assert result.metrics["reason"] == "nonfinite" and result.metrics["steps"] == 0
    assert "kept the weights of the weights it started from" not in _warnings(events)[-1]
    assert "the run stopped and kept the weights it started from" in _warnings(events)[-1]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    # LoRA starts with B = 0: the saved adapter is the untouched one, not a NaN one.
    assert _all_finite(adapter) and all(not t.any() for name, t in adapter.items() if "lora_B" in name)
    assert not (out / "checkpoints").exists() or not ckpt.list_checkpoints(out / "checkpoints")


def test_skip_drops_the_bad_update_and_finishes(test_model_dir, tmp_path):
    out = tmp_path / "out"
    result, events = _train(test_model_dir, out, hook=NaNAtStep({5}), on_nan="skip")
    assert result.metrics["reason"] == "finished" and result.metrics["steps"] == 8
    assert result.metrics["skipped_steps"] == 1
    assert _warnings(events) == ["step 5: the loss or gradients are NaN or infinite; its update was skipped (1 so far)"]
    losses = step_losses(events)
    assert sorted(losses) == [1, 2, 3, 4, 6, 7, 8] and all(v == v for v in losses.values())
    _saved_weights_are_finite(out)
    _strict_json(out / "metrics.json")


def test_too_high_a_learning_rate_never_saves_nan_weights(test_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in reversal_records(16)))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {test_model_dir}\ndata: {tmp_path / 'd.jsonl'}\nlr: 1.0e+6\nmax_steps: 8\nbatch_size: 4\n"
                      f"save_steps: 2\noutput_dir: {out}\n")
    assert main(["train", str(config), "--quiet"]) == 1  # a script notices the run did not train as asked
    captured = capsys.readouterr()
    assert captured.out.startswith("nonfinite: ") and "Traceback" not in captured.err
    _saved_weights_are_finite(out)
    metrics = _strict_json(out / "metrics.json")
    assert metrics["reason"] == "nonfinite"
    _strict_json(out / "history.json")


def test_skip_stops_when_every_update_is_bad(test_model_dir, tmp_path):
    out = tmp_path / "out"
    result, events = _train(test_model_dir, out, hook=NaNAtStep(set(range(3, 100))), on_nan="skip", max_steps=20)
    assert result.metrics["reason"] == "nonfinite" and result.metrics["steps"] == 2
    assert result.metrics.get("skipped_steps", 0) == 0  # the state of the checkpoint it went back to
    assert len([t for t in _warnings(events) if "its update was skipped" in t]) == 10
    _saved_weights_are_finite(out)

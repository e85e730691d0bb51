"""The engine on a real CUDA GPU (skipped without one).

The decisions behind these runs are pure functions tested on the CPU with faked
capabilities (tests/test_engine_device.py); here they meet a real device: autocast in the
GPU's precision, the fp16 gradient scaler on pre-Ampere cards, 4-bit QLoRA, 8-bit and
paged optimizers, and the one-line out-of-memory error.
"""

import pytest
import torch

from ftmagic.engine.run import finetune
from ftmagic.errors import MemoryFitError

from engine_helpers import collect, reversal_records, step_losses

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _train(model_dir, out, **extra):
    on_event, events = collect()
    settings = dict(model=model_dir, data=reversal_records(8), method="lora", max_steps=4, batch_size=4, lr=5e-2,
                    save_steps=2, eval_steps=0, output_dir=str(out), warmup=0, scheduler="constant")
    settings.update(extra)
    return finetune(on_event=on_event, **settings), events


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, test_tokenizer):
    from model_builders import build_test_model_dir

    return build_test_model_dir(tmp_path_factory.mktemp("gpu-wide"), test_tokenizer, hidden_size=64,
                                intermediate_size=128)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_trains_in_the_gpus_precision(wide_model_dir, tmp_path, method):
    result, events = _train(wide_model_dir, tmp_path / "out", method=method)
    plan = events[0]
    assert plan["device"] == "cuda"
    assert plan["precision"] == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16")
    losses = list(step_losses(events).values())
    assert losses[-1] < losses[0]
    assert result.metrics["peak_memory_bytes"] > 0
    if method == "qlora":
        layer = result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        assert type(layer).__name__ == "Linear4bit"
    assert all(p.dtype == torch.float32 for p in result.model.parameters() if p.requires_grad) or \
        (method == "full" and plan["precision"] == "bf16")


def test_fp16_scaler_path_resumes_exactly(wide_model_dir, tmp_path):
    from engine_helpers import StopAt

    a, events_a = _train(wide_model_dir, tmp_path / "a", precision="fp16", lora_dropout=0.0)
    stop = StopAt(2)

    def on_event(event):
        stop(event)

    finetune(model=wide_model_dir, data=reversal_records(8), method="lora", max_steps=4, batch_size=4, lr=5e-2,
             save_steps=2, eval_steps=0, output_dir=str(tmp_path / "b"), warmup=0, scheduler="constant",
             precision="fp16", lora_dropout=0.0, on_event=on_event, stop=stop)
    b, events_b = _train(wide_model_dir, tmp_path / "b", precision="fp16", lora_dropout=0.0, resume=True)
    assert (tmp_path / "b" / "checkpoints" / "step-00000002" / "scaler.pt").is_file()
    reference, after = step_losses(events_a), step_losses(events_b)
    assert all(after[s] == pytest.approx(reference[s], abs=1e-3) for s in after)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers(wide_model_dir, tmp_path, optimizer):
    result, events = _train(wide_model_dir, tmp_path / "out", optimizer=optimizer)
    assert [e for e in events if e["event"] == "message" and "optimizer" in e["text"]] == []
    assert result.metrics["steps"] == 4


def test_out_of_memory_is_one_line(wide_model_dir, tmp_path):
    total = torch.cuda.get_device_properties(0).total_memory

    def grab_everything(event):
        if event.kind == "step":
            torch.empty(2 * total, dtype=torch.uint8, device="cuda")  # a real torch.OutOfMemoryError mid-run

    with pytest.raises(MemoryFitError, match=r"^CUDA ran out of GPU memory; try [^\n]+ \(see `%ft_memory`\)$"):
        finetune(model=wide_model_dir, data=reversal_records(8), max_steps=2, output_dir=str(tmp_path / "oom"),
                 save_steps=0, on_event=grab_everything)

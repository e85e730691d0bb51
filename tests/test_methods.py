"""Every method trains the tiny model on the CPU, trains only what it should, and its
saved output reloads to identical generations."""

import pytest
import torch

import ftmagic.engine.run as run_module
from ftmagic.engine.methods import auto_target_modules, register
from ftmagic.engine.result import RunResult
from ftmagic.errors import ModelError

from model_builders import build_test_model_dir
from engine_helpers import collect, reversal_records, step_losses, without_4bit

PROMPTS = ["reverse: abc", "reverse: hello"]


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory, test_tokenizer):
    return build_test_model_dir(tmp_path_factory.mktemp("biased"), test_tokenizer, attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, test_tokenizer):
    # bitsandbytes' CPU 4-bit kernel packs 64 input features per block.
    return build_test_model_dir(tmp_path_factory.mktemp("wide"), test_tokenizer, hidden_size=64, intermediate_size=128)


def _train(model_dir, out, method, **extra):
    # Four records and batch_size 4: every step sees the same batch, so the loss must fall.
    on_event, events = collect()
    settings = dict(model=model_dir, data=reversal_records(4), method=method, max_steps=6, batch_size=4, lr=5e-2,
                    output_dir=str(out), save_steps=0, eval_steps=0, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                    num_virtual_tokens=4, trainable_layers=1, warmup=0, scheduler="constant", seed=1)
    settings.update(extra)
    result = run_module.finetune(on_event=on_event, **settings)
    return result, events


EXPECTED_TRAINABLE = {
    "full": lambda name: True,
    "lora": lambda name: "lora_" in name,
    "dora": lambda name: "lora_" in name,
    "ia3": lambda name: "ia3_" in name,
    "prompt_tuning": lambda name: "prompt_encoder" in name,
    "prefix_tuning": lambda name: "prompt_encoder" in name,
    "bitfit": lambda name: name.endswith(".bias"),
    "freeze": lambda name: "layers.1." in name or name.startswith(("lm_head", "model.norm")),
    "qlora": lambda name: "lora_" in name,
}


@pytest.mark.parametrize("method", ["full", "lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "bitfit",
                                    "freeze", "qlora"])
def test_method_trains_and_reloads(method, test_model_dir, biased_model_dir, wide_model_dir, tmp_path):
    model_dir = {"bitfit": biased_model_dir, "qlora": wide_model_dir}.get(method, test_model_dir)
    # (qlora: a 64-wide model also exercises bitsandbytes' blockwise packing across whole blocks)
    result, events = _train(model_dir, tmp_path / "out", method)

    plan = next(e for e in events if e["event"] == "plan")
    assert plan["method"] == method  # qlora really runs 4-bit on the CPU, no fallback
    losses = list(step_losses(events).values())
    assert len(losses) == 6 and all(isinstance(x, float) for x in losses)
    assert losses[-1] < losses[0], losses

    names = {name for name, p in result.model.named_parameters() if p.requires_grad}
    everything = {name for name, _ in result.model.named_parameters()}
    expected = {name for name in everything if EXPECTED_TRAINABLE[method](name)}
    assert names and names == expected
    start = next(e for e in events if e["event"] == "start")
    assert start["trainable_params"] == sum(p.numel() for p in result.model.parameters() if p.requires_grad)

    if method == "qlora":
        assert type(result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"

    # min_new_tokens keeps the model from answering with EOS at once, which would compare nothing.
    tuned = [result.generate(p, max_new_tokens=6, min_new_tokens=6) for p in PROMPTS]
    reloaded = RunResult.load(result.output_dir)
    assert [reloaded.generate(p, max_new_tokens=6, min_new_tokens=6) for p in PROMPTS] == tuned
    assert reloaded.metrics["train_loss"] == pytest.approx(losses[-1])
    assert reloaded.config.method == method


def test_adapter_output_is_peft_safetensors(test_model_dir, tmp_path):
    result, _ = _train(test_model_dir, tmp_path / "out", "lora", max_steps=2)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml", "metrics.json"} <= files
    assert "model.safetensors" not in files


def test_frozen_weights_do_not_move(test_model_dir, tmp_path):
    from safetensors.torch import load_file

    original = load_file(f"{test_model_dir}/model.safetensors")
    result, _ = _train(test_model_dir, tmp_path / "out", "freeze", max_steps=3)
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(saved["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert not torch.equal(saved["model.layers.1.mlp.up_proj.weight"], original["model.layers.1.mlp.up_proj.weight"])


def test_bitfit_on_a_bias_free_model_is_a_clear_error(test_model_dir, tmp_path):
    with pytest.raises(ModelError, match=r"^`method: bitfit` trains bias terms, and LlamaForCausalLM has none"):
        _train(test_model_dir, tmp_path / "out", "bitfit")


def test_qlora_runs_on_the_cpu_for_any_layer_width(test_model_dir, tmp_path):
    # The test model's layers are 32 wide, below bitsandbytes' 64-wide inference blocks;
    # evaluation and generation still work on the 4-bit base.
    result, events = _train(test_model_dir, tmp_path / "out", "qlora", max_steps=2,
                            eval_data=reversal_records(2), eval_steps=1)
    assert [e for e in events if e["event"] == "message" and not e["text"].startswith("threads:")] == []
    assert result.metrics["method"] == "qlora" and isinstance(result.metrics["eval_loss"], float)
    layer = result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit" and layer.in_features == 32
    assert RunResult.load(result.output_dir).generate("reverse: abc", max_new_tokens=4, min_new_tokens=4) == \
        result.generate("reverse: abc", max_new_tokens=4, min_new_tokens=4)


def test_merge_writes_merged_weights_that_generate_the_same(test_model_dir, tmp_path):
    result, _ = _train(test_model_dir, tmp_path / "out", "lora", max_steps=3, merge=True)
    merged = tmp_path / "out" / "merged"
    assert (merged / "model.safetensors").exists() and (merged / "tokenizer.json").exists()
    from ftmagic.engine.models import load_model

    model = load_model(str(merged), device="cpu").eval()
    text = result.render("reverse: abc")
    enc = result.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        a = model(**enc).logits
        b = result.model(**enc).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_a_qlora_merge_answers_as_the_trained_4bit_model(wide_model_dir, tmp_path):
    # The adapter learned on the 4-bit weights: folded into those, dequantized, the merged model is the model that
    # trained; folded into the original weights it would not be (logits apart by far more than rounding).
    from ftmagic.engine.models import load_model

    result, _ = _train(wide_model_dir, tmp_path / "out", "qlora", max_steps=3, merge=True)
    exported = RunResult.load(result.output_dir).export("merged", overwrite=True)
    assert not exported.notes  # 4-bit loads here: nothing fell back
    enc = result.tokenizer(result.render("reverse: abc"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        trained = result.model(**enc).logits
        merged = load_model(str(tmp_path / "out" / "merged"), device="cpu").eval()
        assert torch.allclose(merged(**enc).logits, trained, atol=1e-4)
        with result.model.disable_adapter():
            base_4bit = result.model(**enc).logits
        base_original = load_model(wide_model_dir, device="cpu").eval()(**enc).logits
    assert (base_original - base_4bit).abs().max() > 1e-2  # what the merge would be off by on the original weights


def test_a_qlora_merge_where_4bit_cannot_load_says_it_used_the_original_weights(wide_model_dir, tmp_path,
                                                                                  monkeypatch):
    result, _ = _train(wide_model_dir, tmp_path / "out", "qlora", max_steps=1)
    without_4bit(monkeypatch, "bitsandbytes has no backend for this device")
    exported = RunResult.load(result.output_dir).export("merged")
    assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()
    assert len(exported.notes) == 1 and "original weights, not the 4-bit ones it trained on (4-bit cannot load " \
        "here: bitsandbytes has no backend for this device)" in exported.notes[0]


def test_a_gpu_qlora_run_opened_on_a_cpu_keeps_its_4bit_base(wide_model_dir, tmp_path):
    # A run trained on a GPU and loaded where there is none: the adapter still sits on the 4-bit weights it learned on.
    import json

    result, _ = _train(wide_model_dir, tmp_path / "out", "qlora", max_steps=2)
    record_file = tmp_path / "out" / "ftmagic_run.json"
    record = json.loads(record_file.read_text())
    record["plan"].update(device="cuda", precision="bf16", qlora_compute_dtype="bfloat16")
    record_file.write_text(json.dumps(record))
    reloaded = RunResult.load(result.output_dir)
    layer = reloaded.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit"
    enc = result.tokenizer(result.render("reverse: abc"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.allclose(reloaded.model(**enc).logits, result.model(**enc).logits, atol=1e-4)


def test_auto_targets_are_every_linear_layer_of_the_blocks(test_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(test_model_dir)
    assert auto_target_modules(model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_registry_refuses_duplicates_and_names_outside_the_table():
    with pytest.raises(ValueError, match="'lora' is already registered"):
        register("lora", lambda m, c: m)
    with pytest.raises(ValueError, match="'lora2' is not in the method table"):
        register("lora2", lambda m, c: m)


def test_unknown_target_module_is_one_line(test_model_dir, tmp_path):
    from ftmagic.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^`target_modules`: qproj not found among the linear layers of the blocks; "
                                          r"use `auto` or some of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                          r"down_proj$"):
        _train(test_model_dir, tmp_path / "out", "lora", target_modules=["qproj", "v_proj"])


def test_explicit_target_modules(test_model_dir, tmp_path):
    result, _ = _train(test_model_dir, tmp_path / "out", "lora", max_steps=1, target_modules=["q_proj", "v_proj"])
    adapted = {name.split(".")[-4] for name, p in result.model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "v_proj"}

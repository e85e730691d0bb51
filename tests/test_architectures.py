"""The architecture matrix: every popular family, built tiny from a config, through all of ftmagic.

Families (``FAMILIES`` in ``model_builders.py``): Llama (SmolLM2-style tied head, Llama 3
tokenizer), Qwen2 (q/k/v biases, a ChatML base tokenizer whose EOS is ``<|endoftext|>``),
Qwen3 (q/k norms), Mistral (sliding window, an ``[INST]`` template that writes EOS),
Gemma 2 (soft-capped attention scores and logits, sliding window, eager attention, four
norms per block, ``<end_of_turn>``), Gemma 3 (q/k norms, sliding and full layers), Phi-3
(fused qkv and gate-up projections, ``<|end|>``) and GPT-2 (Conv1D layers, LayerNorm with
biases, learned positions, no chat template). For each:

* the fast step's loss and gradients equal the model's own forward, and the fast step is
  taken (it is exact for every family here);
* ``target_modules: auto`` picks every linear layer of the blocks (fused and Conv1D ones
  included), and the calculator names the same layers;
* the calculator's trainable-parameter count equals the engine's for every method;
* every method trains, and its saved output reloads to the same generations (BitFit on a
  bias-free family is refused in one line by both the calculator and the engine);
* the analytic memory estimate is within 10% of a measured step;
* the previewer, templates, EOS and generation's stop tokens follow the family's tokenizer.
"""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

import ftmagic  # noqa: E402
import ftmagic.engine.run as run_module  # noqa: E402
from ftmagic.api import estimate_memory  # noqa: E402
from ftmagic.data import encode_example, encode_prompt, resolve_template  # noqa: E402
from ftmagic.data.portable import answer_end_ids  # noqa: E402
from ftmagic.engine.fastpath import fast_loss, fast_path_blocker, flatten_batch, varlen_attention  # noqa: E402
from ftmagic.engine.methods import auto_target_modules, block_linear_names, get_method  # noqa: E402
from ftmagic.engine.result import RunResult  # noqa: E402
from ftmagic.engine.trace import trace_step  # noqa: E402
from ftmagic.errors import ModelError  # noqa: E402
from ftmagic.memory import count_params  # noqa: E402
from ftmagic.memory.architectures import shape_from_hf_config  # noqa: E402
from ftmagic.methods import METHOD_NAMES, get_method_spec  # noqa: E402

from engine_helpers import collect, reversal_records, step_losses  # noqa: E402
from model_builders import (FAMILIES, TOKENIZER_STYLES, build_family_model, build_family_model_dir,  # noqa: E402
                            build_family_tokenizer, family_config)

FAMILY_NAMES = list(FAMILIES)
SETTINGS = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, target_modules="auto", num_virtual_tokens=4,
                           trainable_layers=1)
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AUTO_TARGETS = {  # what `target_modules: auto` adapts, per family, for LoRA and for IA3
    **{f: (LLAMA_LINEARS, ["k_proj", "v_proj", "down_proj"]) for f in ("llama", "qwen2", "qwen3", "mistral", "gemma2",
                                                                       "gemma3")},
    "phi3": (["o_proj", "qkv_proj", "gate_up_proj", "down_proj"], ["qkv_proj", "down_proj"]),
    "gpt2": (["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], ["c_attn", "mlp.c_proj"]),
}
HAS_BIASES = ("qwen2", "gpt2")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def tokenizers():
    """One tokenizer per style, built once."""
    cache = {}

    def get(style):
        if style not in cache:
            cache[style] = build_family_tokenizer(style)
        return cache[style]

    return get


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """``family_dir(name)``: the family's saved tiny model and tokenizer, built once for the module."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_family_model_dir(tmp_path_factory.mktemp(family), family)
        return cache[family]

    return get


def _family_model(family, tokenizers, **overrides):
    return build_family_model(family, tokenizers(FAMILIES[family][0]), **overrides)


def _shape(family, tokenizers, **overrides):
    return shape_from_hf_config(family_config(family, tokenizers(FAMILIES[family][0]), **overrides), name=family)


# ------------------------------------------------------------------ shapes and targets


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_shape_counts_every_parameter_and_names_every_linear(family, tokenizers):
    model = _family_model(family, tokenizers)
    shape = _shape(family, tokenizers)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.bias_params == sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    assert sorted(n for n, _, _ in shape.linears()) == sorted(block_linear_names(model))
    real = {n: p.shape for n, p in model.named_parameters()}
    assert shape.param_tensors == len(real) - (1 if shape.tied and "lm_head.weight" in real else 0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_auto_targets_are_every_linear_layer_fused_and_conv1d_included(family, tokenizers):
    lora_targets, ia3_targets = AUTO_TARGETS[family]
    model = _family_model(family, tokenizers)
    assert auto_target_modules(model, "lora") == lora_targets
    assert auto_target_modules(model, "ia3") == ia3_targets
    # Every linear layer of every block is adapted (GPT-2's two `c_proj` layers included), nothing else.
    linear_types = (torch.nn.Linear,) + ((__import__("transformers").pytorch_utils.Conv1D,) if family == "gpt2" else ())
    block_linears = {n for n, m in model.named_modules() if isinstance(m, linear_types) and ".lm_head" not in f".{n}"
                     and n != "lm_head"}
    prepared = get_method("lora").prepare(model, SETTINGS)
    adapted = {n.removeprefix("base_model.model.") for n, m in prepared.named_modules() if hasattr(m, "lora_A")}
    assert adapted == block_linears
    assert len(adapted) == 2 * len(lora_targets)  # two blocks


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_calculator_counts_what_the_engine_trains(family, method, tokenizers):
    shape = _shape(family, tokenizers)
    spec = get_method_spec(method)
    if spec.trains == "biases" and family not in HAS_BIASES:
        with pytest.raises(ModelError, match="has none"):
            count_params(shape, method)
        with pytest.raises(ModelError, match="has none"):
            get_method(method).prepare(_family_model(family, tokenizers), SETTINGS)
        return
    predicted = count_params(shape, method, lora_r=SETTINGS.lora_r, num_virtual_tokens=SETTINGS.num_virtual_tokens,
                             trainable_layers=SETTINGS.trainable_layers)["trainable"]
    # 4-bit loading needs weights on disk; what QLoRA trains is LoRA's adapters on the same layers.
    model = get_method("lora" if spec.quantized else method).prepare(_family_model(family, tokenizers), SETTINGS)
    assert predicted == sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ the fast step


def _examples(vocab: int) -> list:
    """Five examples, three longer than the narrowed sliding window (4), one with nothing to train."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in ((7, 3), (1, 0), (12, 5), (5, 2), (9, 9)):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _per_example_loss(model, examples):
    """The model's own forward on each example alone: summed token losses."""
    total = 0.0
    for ex in examples:
        labels = torch.tensor([ex["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        if n:
            total = total + model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss * n
    return total


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fast_step_equals_the_models_own_forward(family, tokenizers):
    from ftmagic.data.pack import pack

    windowed = "sliding_window" in FAMILIES[family][1]
    model = _family_model(family, tokenizers, **({"sliding_window": 4} if windowed else {})).eval()
    assert fast_path_blocker(model) is None  # exact for this family, so the engine takes it
    examples = _examples(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]

    expected = _per_example_loss(model, examples)
    expected.backward()
    reference = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    with varlen_attention(model):
        loss = fast_loss(model, flatten_batch(pack(examples, 24)), reduction="sum")
        loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for p, ref in zip(params, reference):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ every method trains and reloads

LR = {"full": 2e-3, "freeze": 2e-3}  # the rest: 2e-2


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_method_trains_and_reloads(family, method, family_dir, tmp_path):
    model_dir = family_dir(family)
    spec = get_method_spec(method)
    on_event, events = collect()
    settings = dict(model=model_dir, data=reversal_records(4), method=method, max_steps=3, batch_size=4,
                    lr=LR.get(method, 2e-2), output_dir=str(tmp_path / "out"), save_steps=0, eval_steps=0,
                    warmup=0, scheduler="constant", seed=1, max_seq_len=256, **vars(SETTINGS))  # the families' positions
    if spec.trains == "biases" and family not in HAS_BIASES:
        with pytest.raises(ModelError, match=r"^`method: bitfit` trains bias terms, and \w+ has none"):
            run_module.finetune(on_event=on_event, **settings)
        return
    result = run_module.finetune(on_event=on_event, **settings)

    plan = next(e for e in events if e["event"] == "plan")
    assert plan["method"] == method  # no fallback: QLoRA really runs 4-bit
    assert [e["text"] for e in events if e["event"] == "message" and e["level"] == "warning"] == []  # nothing to warn about
    losses = list(step_losses(events).values())
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    start = next(e for e in events if e["event"] == "start")
    with open(f"{model_dir}/config.json", encoding="utf-8") as handle:
        config = json.load(handle)
    predicted = count_params(shape_from_hf_config(config), method, lora_r=SETTINGS.lora_r,
                             num_virtual_tokens=SETTINGS.num_virtual_tokens,
                             trainable_layers=SETTINGS.trainable_layers)["trainable"]
    assert start["trainable_params"] == predicted

    tuned = result.generate("reverse: abc", max_new_tokens=4, min_new_tokens=4)
    assert RunResult.load(result.output_dir).generate("reverse: abc", max_new_tokens=4, min_new_tokens=4) == tuned


# ------------------------------------------------------------------ memory


MEMORY_SETTINGS = {
    "full-bf16": dict(method="full", precision="bf16", batch_size=2, seq_len=128),
    "lora-bf16": dict(method="lora", precision="bf16", batch_size=4, seq_len=128),
    "lora-fp32-checkpointing": dict(method="lora", precision="fp32", batch_size=2, seq_len=128,
                                    gradient_checkpointing=True),
    "qlora-bf16": dict(method="qlora", precision="bf16", batch_size=4, seq_len=128),
}
# Every family in full and LoRA; the families whose blocks differ most (eager soft-capped
# attention, fused projections, Conv1D with LayerNorm and dropout) in every setting.
MEMORY_CASES = [(f, s) for f in FAMILY_NAMES for s in ("full-bf16", "lora-bf16")] + \
    [(f, s) for f in ("gemma2", "phi3", "gpt2") for s in ("lora-fp32-checkpointing", "qlora-bf16")]


@pytest.mark.parametrize("family,setting", MEMORY_CASES)
def test_analytic_estimate_within_10_percent_of_a_measured_step(family, setting, tokenizers):
    values = dict(family_config(family, tokenizers(FAMILIES[family][0])), vocab_size=512, pad_token_id=None,
                  bos_token_id=None, eos_token_id=None)
    values.update({"n_inner": 176} if family == "gpt2" else {"intermediate_size": 176})
    shape = shape_from_hf_config(values, name=family)
    settings = MEMORY_SETTINGS[setting]
    measured = trace_step(shape, fake=False, **settings)
    estimate = estimate_memory(shape, device="cpu", **settings)
    error = (estimate.total_bytes - measured.peak_bytes) / measured.peak_bytes
    assert abs(error) < 0.10, (error, estimate.phases, measured.phases)
    assert estimate.trainable_params == measured.trainable_params


# ------------------------------------------------------------------ tokenizers, templates, EOS, previewer

# style -> (the token that ends a trained answer, whether the template writes it, BOS)
STOPS = {
    "llama3": ("<|eot_id|>", True, "<|begin_of_text|>"),
    "chatml": ("<|im_end|>", True, None),
    "mistral": ("</s>", True, "<s>"),
    "gemma": ("<end_of_turn>", True, "<bos>"),
    "phi3": ("<|end|>", True, None),
    "gpt2": ("<|endoftext|>", False, None),  # no chat template: ChatML text, EOS appended by ftmagic
}
STYLES = list(TOKENIZER_STYLES)
CONVERSATION = [{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"},
                {"role": "user", "content": "reverse: dog"}, {"role": "assistant", "content": "god"}]


@pytest.mark.parametrize("style", STYLES)
def test_answers_end_with_the_familys_stop_token_and_nothing_is_inserted(style, tokenizers):
    tok = tokenizers(style)
    stop, written, bos = STOPS[style]
    enc = encode_example(tok, CONVERSATION, max_seq_len=256)
    trained = [i for i, label in zip(enc.input_ids, enc.labels) if label != -100]
    stop_id = tok.convert_tokens_to_ids(stop)
    # Each answer is trained up to and including the family's stop token, and no further
    # (GPT-2's fallback ChatML template closes answers with `<|im_end|>` as plain text).
    closing = "" if written else "<|im_end|>"
    assert tok.decode(trained).split(stop) == ["cba" + closing, "god" + closing, ""]
    assert trained.count(stop_id) == 2 and trained[-1] == stop_id
    assert enc.eos_added is (not written)
    if written:  # the tokens are exactly what the family's own template renders: nothing inserted
        assert tok.decode(enc.input_ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # Generation starts from the very tokens training saw before the first answer, with one BOS at most.
    prompt = encode_prompt(tok, "reverse: abc")
    assert enc.input_ids[:len(prompt)] == prompt
    assert enc.labels[len(prompt)] != -100 and enc.labels[len(prompt) - 1] == -100
    if bos:
        assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    elif style != "gpt2":  # (GPT-2's BOS is its EOS)
        assert tok.bos_token_id not in enc.input_ids
    assert answer_end_ids(tok, resolve_template(tok)) == list(dict.fromkeys([tok.eos_token_id, stop_id]))


@pytest.mark.parametrize("style", STYLES)
def test_previewer_with_the_familys_tokenizer(style, tokenizers):
    tok = tokenizers(style)
    stop, written, _ = STOPS[style]
    records = [{"messages": CONVERSATION}, {"prompt": "reverse: fox", "completion": "xof"}]
    report = ftmagic.preview([{"messages": [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["completion"]}]}
                              if "prompt" in r else r for r in records], tokenizer=tok)
    assert report.usable == 2 and report.skipped == 0
    kinds = [p.kind for p in report.problems]
    if written:
        assert kinds == [] and report.template == "tokenizer"
    else:  # GPT-2: no chat template, so ChatML text, and EOS appended (said once for the dataset)
        assert kinds == ["no_eos"] and report.template == "chatml"
        assert "appends `<|endoftext|>`" in report.problems[0].message
    tokens = report.record(0).tokens  # the pager marks the token that ends each answer
    assert [tok.convert_ids_to_tokens(t.id) for t in tokens if t.eos and t.trained] == [stop, stop]
    assert all(t.eos for t in tokens if tok.convert_ids_to_tokens(t.id) == stop)


@pytest.mark.parametrize("style", STYLES)
def test_plain_text_trains_every_token_then_eos(style, tokenizers):
    tok = tokenizers(style)
    enc = encode_example(tok, {"text": "the quick brown fox"}, max_seq_len=64)
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    bos = STOPS[style][2]
    assert tokens[-1] == tok.eos_token and enc.labels[-1] == tok.eos_token_id
    assert (tokens[0] == bos) is bool(bos) and (enc.labels[0] == -100) is bool(bos)


def test_gemma_template_refuses_a_system_prompt_in_one_line(tokenizers):
    tok = tokenizers("gemma")
    records = [{"messages": [{"role": "system", "content": "Be brief."}] + CONVERSATION[:2]},
               {"messages": CONVERSATION}]
    report = ftmagic.preview(records, tokenizer=tok)
    assert report.skipped_reasons == {"template_error": 1}
    problem = next(p for p in report.problems if p.kind == "template_error")
    assert problem.location == "data[0]" and "System role not supported" in problem.message
    assert "\n" not in problem.message


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generation_stops_at_the_familys_stop_tokens(family, tokenizers):
    from ftmagic.config import FinetuneConfig

    tok = tokenizers(FAMILIES[family][0])
    model = _family_model(family, tokenizers)
    seen = {}
    generate = model.generate

    def recording(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    model.generate = recording
    result = RunResult(output_dir="unused", metrics={}, history=[], config=FinetuneConfig(), model=model, tokenizer=tok)
    result.generate("reverse: abc", max_new_tokens=2)
    stop = STOPS[FAMILIES[family][0]][0]
    assert seen["eos_token_id"] == list(dict.fromkeys([tok.eos_token_id, tok.convert_tokens_to_ids(stop)]))

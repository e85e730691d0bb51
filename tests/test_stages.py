"""Sequential fine-tuning and continual pre-training as users do them.

* A second stage pointed at a first stage's output (``model: runs/stage1`` or
  ``adapter: runs/stage1``) keeps training that adapter: the base is read from the folder,
  the adapter loads trainable with its own method and settings, and the run says so in
  one line; what cannot continue is a one-line error, never peft's trace.
* ``text`` records longer than ``max_seq_len`` train as consecutive blocks (every token),
  or, with ``long_text: truncate``, as their first block; the previewer counts both.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

import ftmagic  # noqa: E402
import ftmagic.engine.run as run_module  # noqa: E402
from ftmagic.config import FinetuneConfig  # noqa: E402
from ftmagic.data import prepare_data  # noqa: E402
from ftmagic.engine.result import RunResult  # noqa: E402
from ftmagic.errors import ConfigError, ModelError  # noqa: E402
from ftmagic.memory import resolve_model  # noqa: E402

from engine_helpers import collect, reversal_records, step_losses  # noqa: E402
from model_builders import build_test_model_dir  # noqa: E402

RUN = dict(data=reversal_records(4), max_steps=3, batch_size=4, lr=2e-2, save_steps=0, eval_steps=0, lora_r=4,
           lora_alpha=8, lora_dropout=0.0, num_virtual_tokens=4, warmup=0, scheduler="constant", seed=1)


def _train(out, on_event_extra=None, **settings):
    on_event, events = collect()
    callback = on_event if on_event_extra is None else (lambda e: (on_event(e), on_event_extra(e)))
    result = run_module.finetune(on_event=callback, **{**RUN, "output_dir": str(out), **settings})
    return result, events


def _messages(events):
    return [e["text"] for e in events if e["event"] == "message"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, test_model_dir):
    """``stage1(method)``: a finished first stage of ``method`` on the test model (built once each)."""
    cache = {}

    def get(method):
        if method not in cache:
            out = tmp_path_factory.mktemp(f"stage1-{method}")
            cache[method] = _train(out, model=test_model_dir, method=method)
        return cache[method]

    return get


# ------------------------------------------------------------------ a second stage continues the adapter


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_second_stage_from_the_first_stages_folder_continues_its_adapter(method, stage1, test_model_dir, tmp_path):
    first, first_events = stage1(method)
    # The config leaves `method` at its default and asks for another rank: the adapter's own win.
    second, events = _train(tmp_path / "stage2", model=first.output_dir, lora_r=16)

    assert events[0]["event"] == "plan" and events[0]["method"] == method
    line = next(m for m in _messages(events) if m.startswith("continuing"))
    assert line.startswith(f"continuing the {method} adapter of {first.output_dir}")
    assert line.endswith(f"on {test_model_dir}; its method and settings are kept") and "\n" not in line
    assert (second.config.model, second.config.adapter, second.config.method) == (test_model_dir, first.output_dir,
                                                                                  method)
    if method in ("lora", "qlora", "dora"):
        assert second.config.lora_r == 4
    # It starts where the first stage ended: below the first stage's last loss (taken before its
    # last update), far below where a fresh adapter starts.
    first_losses, losses = list(step_losses(first_events).values()), list(step_losses(events).values())
    assert losses[0] < first_losses[-1] < first_losses[0]
    start = next(e for e in events if e["event"] == "start")
    assert start["trainable_params"] == first.metrics["trainable_params"]
    # The second stage's folder describes itself: it reloads onto the true base.
    saved = json.loads((tmp_path / "stage2" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == test_model_dir
    reloaded = RunResult.load(second.output_dir)
    assert reloaded.base_model_path == test_model_dir
    assert reloaded.generate("reverse: abc", max_new_tokens=4, min_new_tokens=4) == \
        second.generate("reverse: abc", max_new_tokens=4, min_new_tokens=4)


def test_explicit_adapter_key_with_the_base_as_model(stage1, test_model_dir, tmp_path):
    first, _ = stage1("lora")
    second, events = _train(tmp_path / "stage2", model=test_model_dir, adapter=first.output_dir, method="qlora")
    # `method: qlora` puts the LoRA adapter on a 4-bit base.
    assert events[0]["method"] == "qlora" and second.config.method == "qlora"
    layer = second.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit"
    assert any(m.startswith(f"continuing the qlora adapter of {first.output_dir}") for m in _messages(events))


def test_a_third_stage_keeps_the_true_base(stage1, test_model_dir, tmp_path):
    first, _ = stage1("lora")
    second, _ = _train(tmp_path / "stage2", model=first.output_dir)
    third, events = _train(tmp_path / "stage3", model=second.output_dir)
    assert third.config.model == test_model_dir and third.config.adapter == second.output_dir
    assert RunResult.load(third.output_dir).base_model_path == test_model_dir


def test_what_cannot_continue_is_one_line(stage1, tmp_path, test_tokenizer):
    first, _ = stage1("lora")
    with pytest.raises(ConfigError, match=r"holds a lora adapter and `method: full` trains the model's own weights; "
                                          r"merge the adapter first"):
        _train(tmp_path / "a", model=first.output_dir, method="full")
    with pytest.raises(ConfigError, match=r"holds a lora adapter, which cannot continue as `method: ia3`; "
                                          r"set `method: lora`"):
        _train(tmp_path / "b", model=first.output_dir, method="ia3")
    with pytest.raises(ConfigError, match=r"^`adapter: .*` is not a saved adapter \(no adapter_config.json\)"):
        _train(tmp_path / "c", adapter=str(tmp_path))
    # An adapter on a base of another size: one line naming the folder, not peft's size-mismatch trace.
    other = build_test_model_dir(tmp_path / "wider", test_tokenizer, hidden_size=48, intermediate_size=64)
    with pytest.raises(ModelError, match=r"^the adapter in .* does not fit the base model \(.*\); set `model:` to the "
                                         r"base it was trained on$") as err:
        _train(tmp_path / "d", model=other, adapter=first.output_dir)
    assert "\n" not in str(err.value)


PAIRS = [{"prompt": f"reverse: {w}", "chosen": w[::-1], "rejected": w} for w in ("abc", "hello", "data", "fox")]
LABELLED = [{"text": f"the {w} is {mood}", "label": label} for w in ("abc", "fox")
            for mood, label in (("quick", "pos"), ("lazy", "neg"))]


@pytest.mark.parametrize("objective, data", [("reward", PAIRS), ("classify", LABELLED)])
def test_an_sft_adapter_continues_as_a_reward_model_or_classifier_with_a_new_head(stage1, test_model_dir, tmp_path,
                                                                                  objective, data):
    """After SFT, a reward model or a classifier continues the SFT adapter (was: peft's AttributeError
    'LlamaForSequenceClassification' object has no attribute 'prepare_inputs_for_generation')."""
    from peft import load_peft_weights

    from ftmagic.engine.methods import continue_adapter
    from ftmagic.engine.models import head_settings, load_model

    first, _ = stage1("lora")
    second, events = _train(tmp_path / "stage2", model=first.output_dir, objective=objective, data=data)
    assert any(m.startswith(f"continuing the lora adapter of {first.output_dir}") for m in _messages(events))
    assert step_losses(events)
    # The SFT adapter's weights are the starting point, beside a new head.
    model = continue_adapter(load_model(test_model_dir, device="cpu", head=head_settings(objective, ["neg", "pos"])),
                             first.output_dir, "lora", objective)
    saved = load_peft_weights(first.output_dir, device="cpu")
    key = next(k for k in saved if "lora_B" in k)
    assert torch.equal(dict(model.named_parameters())[key.replace(".weight", ".default.weight")], saved[key])
    reloaded = RunResult.load(second.output_dir)
    if objective == "reward":
        conversation = [[{"role": "user", "content": "reverse: abc"}, {"role": "assistant", "content": "cba"}]]
        assert reloaded.score(conversation) == second.score(conversation)
    else:
        assert reloaded.predict(["the fox is quick"], probabilities=True) == \
            second.predict(["the fox is quick"], probabilities=True)


def test_dpo_after_an_sft_adapter_compares_against_the_sft_model_and_resumes_exactly(stage1, tmp_path):
    """DPO continuing an SFT adapter starts where the policy is its reference: loss log 2, margin 0
    (was: the reference was the base without the SFT adapter, a first loss of 0.689 and margin 0.16)."""
    import math

    from engine_helpers import StopAt

    first, _ = stage1("lora")
    settings = dict(model=first.output_dir, objective="dpo", data=PAIRS, batch_size=2, max_steps=4, save_steps=2)
    straight, events = _train(tmp_path / "straight", **settings)
    steps = [e for e in events if e["event"] == "step"]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["metrics"]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["loss"] < steps[0]["loss"]
    # Stopped after step 3 and resumed: the reference is still the SFT model, so the losses are the same.
    stop = StopAt(3)
    _train(tmp_path / "resumed", on_event_extra=stop, stop=stop, **settings)
    _, resumed = _train(tmp_path / "resumed", resume=True, **settings)
    assert step_losses(resumed) and all(abs(step_losses(events)[k] - v) < 1e-6 for k, v in step_losses(resumed).items())


def test_a_head_adapter_continues_only_with_its_own_objective_and_labels(test_model_dir, tmp_path):
    clf, _ = _train(tmp_path / "clf", model=test_model_dir, objective="classify", data=LABELLED)
    for objective, data in (("sft", RUN["data"]), ("reward", PAIRS)):
        with pytest.raises(ConfigError, match=rf"^`model: .*` holds a lora adapter trained with `objective: classify` "
                                              rf"\(its head included\), which cannot continue as `objective: "
                                              rf"{objective}`; set `objective: classify`") as err:
            _train(tmp_path / objective, model=clf.output_dir, objective=objective, data=data)
        assert "\n" not in str(err.value)
    # Its labels stay in the order of its head's outputs.
    second, events = _train(tmp_path / "more", model=clf.output_dir, objective="classify", data=LABELLED[::-1])
    assert second.labels == clf.labels == ["neg", "pos"]
    assert any("labels neg, pos" in m for m in _messages(events))


def test_memory_calculator_reads_an_adapter_folder_as_its_base(stage1, test_model_dir):
    first, _ = stage1("lora")
    assert resolve_model(first.output_dir).total_params == resolve_model(test_model_dir).total_params


# ------------------------------------------------------------------ long text: blocks, not one cut row


def _long_text(tok, tokens: int) -> str:
    words = "the quick brown fox jumps over the lazy dog".split()
    text, k = "", 0
    while len(tok(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += words[k % len(words)] + " "
        k += 1
    return text.strip()


def test_long_text_trains_as_blocks_that_cover_every_token(test_tokenizer):
    tok = test_tokenizer
    text = _long_text(tok, 100)
    records = [{"text": text}, {"text": "short"}]
    full = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    split = prepare_data(FinetuneConfig(data=records, max_seq_len=32), tok)
    long_rows = split.train[:-1]
    assert [len(r["input_ids"]) for r in long_rows[:-1]] == [32] * (len(long_rows) - 1)
    assert sum((r["input_ids"] for r in long_rows), []) == full  # every token, in order, once
    assert all(r["labels"] == r["input_ids"] for r in long_rows)
    assert (split.stats["split"], split.stats["blocks"], split.stats["truncated"]) == (1, len(long_rows), 0)
    assert split.stats["blocks"] == -(-len(full) // 32)

    cut = prepare_data(FinetuneConfig(data=records, max_seq_len=32, long_text="truncate"), tok)
    assert [r["input_ids"] for r in cut.train[:1]] == [full[:32]]
    assert (cut.stats["split"], cut.stats["blocks"], cut.stats["truncated"]) == (0, 0, 1)


def test_blocks_of_a_document_stay_on_one_side_of_the_held_out_split(test_tokenizer):
    tok = test_tokenizer
    records = [{"text": _long_text(tok, 70) + f" doc {i}"} for i in range(6)]
    data = prepare_data(FinetuneConfig(data=records, max_seq_len=32, val_split=0.34), tok)
    eval_docs = {tuple(r["input_ids"][-4:]) for r in data.eval if r["input_ids"][-1] == tok.eos_token_id}
    train_docs = {tuple(r["input_ids"][-4:]) for r in data.train if r["input_ids"][-1] == tok.eos_token_id}
    assert len(eval_docs) == 2 and not eval_docs & train_docs
    assert len(data.eval) == 2 * data.stats["blocks"] // 6


def test_chat_records_are_still_cut_not_split(test_tokenizer):
    long_answer = _long_text(test_tokenizer, 60)
    data = prepare_data(FinetuneConfig(data=[{"prompt": "say it", "completion": long_answer}], max_seq_len=32),
                        test_tokenizer)
    assert len(data.train) == 1 and len(data.train[0]["input_ids"]) == 32
    assert (data.stats["truncated"], data.stats["split"]) == (1, 0)


def test_previewer_counts_blocks_and_truncation(test_tokenizer):
    tok = test_tokenizer
    records = [{"text": _long_text(tok, 100)}, {"text": _long_text(tok, 40)}, {"text": "short"}]
    split = ftmagic.preview(records, tokenizer=tok, max_seq_len=32)
    assert (split.split, split.blocks, split.truncated) == (2, 4 + 2, 0)
    assert [p.kind for p in split.problems if p.kind == "truncated"] == []
    assert "split into blocks: 2 `text` records longer than max_seq_len train as 6 blocks" in split.to_text()
    assert split.record(0).blocks == 4 and not split.record(0).truncated
    assert split.to_dict()["long_text"] == "split"

    cut = ftmagic.preview(records, tokenizer=tok, max_seq_len=32, long_text="truncate")
    assert (cut.split, cut.blocks, cut.truncated) == (0, 0, 2)
    assert [p.location for p in cut.problems if p.kind == "truncated"] == ["data[0]", "data[1]"]


def test_continual_pretraining_run_trains_every_block(test_model_dir, tmp_path, test_tokenizer):
    records = [{"text": _long_text(test_tokenizer, 100)}]
    result, events = _train(tmp_path / "out", model=test_model_dir, data=records, max_seq_len=32, max_steps=2,
                            batch_size=8)
    assert "1 `text` records longer than max_seq_len=32 train as 4 blocks (`long_text: truncate` keeps only their " \
           "first block)" in _messages(events)
    assert result.metrics["data"]["blocks"] == 4
    assert result.metrics["trained_tokens"] > 32  # more than one block's worth per step

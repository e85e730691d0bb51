"""The objectives end to end: config keys, detection by objective, runs with each method, metrics
in the events, checkpoints and resume, and the saved runs reloaded for score() and predict().

All on tiny models on the CPU (the test Llama, a tiny BERT built from a config, the embedded model).
"""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")

from engine_helpers import StopAt, collect  # noqa: E402
from model_builders import build_test_encoder_dir  # noqa: E402

from ftmagic import RunResult  # noqa: E402
from ftmagic.config import FinetuneConfig  # noqa: E402
from ftmagic.data.formats import detect_format  # noqa: E402
from ftmagic.engine.run import finetune  # noqa: E402
from ftmagic.errors import ConfigError, DataError, FtmagicError  # noqa: E402
from ftmagic.textprogress import format_metrics, format_step_line  # noqa: E402

WORDS = ["abc", "hello", "data", "tensor", "model", "fox", "dog", "train", "test", "python", "world", "quick"]
PAIRS = [{"prompt": f"reverse: {w}", "chosen": w[::-1], "rejected": w} for w in WORDS]
LABELLED = ([{"text": f"the {w} is quick", "label": "pos"} for w in WORDS]
            + [{"text": f"the {w} is lazy", "label": "neg"} for w in WORDS])


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _run(model_dir, tmp_path, name, **settings):
    base = dict(model=model_dir, max_steps=4, batch_size=4, lr=5e-3, save_steps=0, eval_steps=0, seed=0,
                output_dir=str(tmp_path / name), max_seq_len=64)
    base.update(settings)
    return finetune(**base)


# ------------------------------------------------------------------ config and data


def test_objective_keys_in_every_spelling_and_one_line_errors():
    from types import SimpleNamespace

    from ftmagic.commands.train import parse_sets
    from ftmagic.config import config_fields
    from ftmagic.widgets.finetune import flag_overrides

    assert FinetuneConfig.from_yaml("objective: dpo\nbeta: 0.2\ndpo_loss: ipo\n").dpo_loss == "ipo"
    assert FinetuneConfig(objective="orpo", orpo_lambda=0.5).orpo_lambda == 0.5
    assert FinetuneConfig.from_dict(parse_sets(["objective=reward"])).objective == "reward"
    flags = SimpleNamespace(**{**{f.name: None for f in config_fields()}, "objective": "classify", "labels": "neg,pos"})
    assert FinetuneConfig.from_dict(flag_overrides(flags)).labels == ["neg", "pos"]
    cases = [(dict(objective="dpo", method="prompt_tuning"), "objective"), (dict(objective="dpo", packing=True), "packing"),
             (dict(objective="dpo", beta=0), "beta"), (dict(labels=["a", "b"]), "labels"),
             (dict(objective="classify", labels=["a"]), "labels"), (dict(objective="dpo", format="messages"), "format"),
             (dict(objective="dpoo"), "objective"), (dict(objective="dpo", dpo_loss="hinge"), "dpo_loss")]
    for values, key in cases:
        with pytest.raises(ConfigError) as err:
            FinetuneConfig.from_yaml("\n".join(f"{k}: {v}" for k, v in values.items()), source="run.yaml")
        message = str(err.value)
        assert "\n" not in message and f"`{key}" in message and message.startswith("run.yaml:"), message


def test_detection_follows_the_objective():
    assert detect_format(PAIRS, kind="preference").format == "preference"
    assert detect_format(LABELLED, kind="classification").format == "classification"
    assert detect_format(LABELLED, kind="conversations").format == "text"
    with pytest.raises(DataError, match="chosen and rejected"):
        detect_format([{"messages": [{"role": "user", "content": "hi"}]}], kind="preference")


def test_sft_data_for_a_dpo_run_is_a_one_line_error(test_model_dir, tmp_path):
    with pytest.raises(DataError, match="chosen and rejected"):
        _run(test_model_dir, tmp_path, "wrong", objective="dpo", data=[{"prompt": "a", "completion": "b"}] * 4)


# ------------------------------------------------------------------ runs


@pytest.mark.parametrize("method", ["lora", "full", "dora", "ia3", "freeze"])
def test_dpo_runs_with_each_method_and_reports_the_preference_metrics(test_model_dir, tmp_path, method):
    on_event, events = collect()
    result = _run(test_model_dir, tmp_path, f"dpo-{method}", objective="dpo", method=method, data=PAIRS,
                  val_split=0.25, on_event=on_event)
    steps = [e for e in events if e["event"] == "step"]
    assert set(steps[-1]["metrics"]) == {"reward_chosen", "reward_rejected", "reward_margin", "accuracy"}
    assert steps[0]["tokens"] > 0 and result.metrics["train_loss"] is not None
    assert set(result.metrics["eval_metrics"]) >= {"reward_margin", "accuracy"}
    plan = next(e for e in events if e["event"] == "plan")
    assert plan["objective"] == "dpo" and plan["format"] == "preference"
    # The policy moved away from the reference in the preferred direction on the training pairs.
    assert steps[-1]["metrics"]["reward_margin"] > 0
    assert "margin" in format_step_line(steps[-1])


def test_dpo_resume_gives_the_losses_of_an_uninterrupted_run(test_model_dir, tmp_path):
    settings = dict(objective="dpo", data=PAIRS, max_steps=6, save_steps=2)
    _, full_events = collect()
    full_cb, full_events = collect()
    _run(test_model_dir, tmp_path, "full-run", on_event=full_cb, **settings)
    stop = StopAt(3)
    first_cb, _ = collect()
    _run(test_model_dir, tmp_path, "resumed", on_event=lambda e: (first_cb(e), stop(e)), stop=stop, **settings)
    second_cb, second = collect()
    _run(test_model_dir, tmp_path, "resumed", on_event=second_cb, resume=True, **settings)
    full = {e["step"]: e["loss"] for e in full_events if e["event"] == "step"}
    resumed = {e["step"]: e["loss"] for e in second if e["event"] == "step"}
    assert resumed and all(abs(resumed[s] - full[s]) < 1e-5 for s in resumed)


def test_orpo_and_reward_runs_reload_and_score(test_model_dir, tmp_path, monkeypatch):
    orpo = _run(test_model_dir, tmp_path, "orpo", objective="orpo", data=PAIRS)
    assert {"nll", "reward_margin"} <= set(orpo.history[-1]["metrics"])
    assert isinstance(orpo.generate("reverse: abc", max_new_tokens=4), str)

    reward = _run(test_model_dir, tmp_path, "reward", objective="reward", data=PAIRS, max_steps=12, lr=2e-2)
    conversations = [[{"role": "user", "content": "reverse: hello"}, {"role": "assistant", "content": "olleh"}],
                     [{"role": "user", "content": "reverse: hello"}, {"role": "assistant", "content": "hello"}]]
    scores = reward.score(conversations)
    reloaded = RunResult.load(reward.output_dir)
    assert reloaded.score(conversations) == pytest.approx(scores, abs=1e-5)
    assert scores[0] > scores[1]  # the preferred answer scores higher
    for writes_text in (lambda: reloaded.generate("hi"), lambda: reloaded.generate_ids("hi"),
                        lambda: reloaded.evaluate(["hi"]), lambda: reloaded.compare(["hi"])):
        with pytest.raises(FtmagicError, match="has a classification head and does not write text; use `.score"):
            writes_text()
    with pytest.raises(FtmagicError, match="objective: classify"):
        reloaded.predict(["x"])

    # A run planned in bf16 on a CPU (oneDNN: a kernel per shape) is scored on rows rounded as in
    # training, and the scores read the same last positions (under the plan's bf16 autocast, as in
    # training: equal to bf16's rounding).
    import ftmagic.engine.heads as heads

    lengths = []
    unrounded = heads.sequence_batch
    monkeypatch.setattr(heads, "sequence_batch",
                        lambda *a, **kw: (lambda b: (lengths.append(b["input_ids"].shape[1]), b)[1])(unrounded(*a, **kw)))
    assert reward.score(conversations) == scores and lengths[-1] % 64 != 0  # fp32: not rounded
    reward.plan = {**reward.plan, "precision": "bf16"}
    assert reward.score(conversations) == pytest.approx(scores, abs=1e-2) and lengths[-1] % 64 == 0


@pytest.mark.parametrize("method", ["lora", "full", "freeze"])
def test_classify_with_a_decoder_stores_the_labels_and_reloads(test_model_dir, tmp_path, method):
    on_event, events = collect()
    result = _run(test_model_dir, tmp_path, f"cls-{method}", objective="classify", method=method, trainable_layers=0,
                  data=LABELLED, max_steps=30, batch_size=8, lr=2e-3 if method == "full" else 5e-3, val_split=0.25,
                  on_event=on_event)
    info = json.loads((tmp_path / f"cls-{method}" / "ftmagic_run.json").read_text())
    assert info["labels"] == ["neg", "pos"] and info["objective"] == "classify"
    evals = [e for e in events if e["event"] == "eval"]
    assert {"accuracy", "f1/neg", "f1/pos", "macro_f1"} <= set(evals[-1]["metrics"])
    assert not any(k.startswith("tp/") for k in evals[-1]["metrics"])
    texts = ["the fox is quick", "the dog is lazy"]
    predicted = result.predict(texts)
    reloaded = RunResult.load(result.output_dir)
    assert reloaded.predict(texts) == predicted
    probs = reloaded.predict(texts, probabilities=True)
    assert set(probs[0]) == {"neg", "pos"} and abs(sum(probs[0].values()) - 1) < 1e-5
    if method != "freeze":  # the head alone on a random 2-layer model learns slowly; the others learn the words
        assert predicted == ["pos", "neg"]


def test_classify_with_a_bert_style_encoder_frozen_lora_and_full(tmp_path):
    encoder = build_test_encoder_dir(tmp_path / "bert")
    for method in ("freeze", "lora", "full"):
        result = _run(encoder, tmp_path, f"bert-{method}", objective="classify", method=method, trainable_layers=0,
                      data=LABELLED, max_steps=40, batch_size=8, lr=1e-3 if method == "full" else 1e-2, val_split=0.25)
        assert "macro_f1" in result.metrics["eval_metrics"]
        losses = [e["loss"] for e in result.history if e["event"] == "step"]
        assert losses[-1] < losses[0]
        if method == "freeze":  # feature-based: only the head (hidden x 2 labels + 2 biases) trains
            assert result.metrics["trainable_params"] == 32 * 2 + 2
        if method == "lora":  # a random encoder's frozen features need not separate the words; adapted ones do
            assert result.metrics["eval_metrics"]["accuracy"] >= 0.8
            assert result.predict(["the fox is quick", "the dog is lazy"]) == ["pos", "neg"]
        assert RunResult.load(result.output_dir).predict(["the fox is quick"]) == result.predict(["the fox is quick"])


def test_encoder_classification_loss_is_the_models_own(tmp_path):
    """Encoders take the padded path: the summed loss is BertForSequenceClassification's own mean loss x n."""
    from transformers import AutoModelForSequenceClassification

    from ftmagic.data import prepare_data
    from ftmagic.engine.device import DevicePlan
    from ftmagic.engine.heads import Classify
    from ftmagic.engine.models import load_tokenizer

    encoder = build_test_encoder_dir(tmp_path / "bert")
    tok = load_tokenizer(encoder)
    data = prepare_data(FinetuneConfig(data=LABELLED, objective="classify"), tok)
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=2).eval()
    plan = DevicePlan(device="cpu", precision="fp32", use_grad_scaler=False, qlora_compute_dtype=None, method="full",
                      reason="test")
    objective = Classify(model, pad_id=tok.pad_token_id, plan=plan, labels=data.labels)
    assert not objective.fast
    rows = data.train[:6]
    assert all(tok.convert_ids_to_tokens(r["input_ids"])[::len(r["input_ids"]) - 1] == ["[CLS]", "[SEP]"] for r in rows)
    batch = objective.batch(rows)
    with torch.no_grad():
        loss_sum, metrics = objective.loss(model, batch)
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["targets"]).loss
    assert abs(float(loss_sum) / 6 - float(own)) < 1e-5
    assert {"tp/neg", "fp/pos", "fn/pos"} <= set(metrics)  # evaluation counts (the model is in eval mode)


def test_integer_labels_and_an_explicit_label_list(test_model_dir, tmp_path):
    data = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in LABELLED]
    result = _run(test_model_dir, tmp_path, "ints", objective="classify", data=data, labels=[0, 1, 2], max_steps=2)
    assert result.labels == [0, 1, 2] and len(result.predict(["a"], probabilities=True)[0]) == 3
    with pytest.raises(DataError, match="labels"):
        _run(test_model_dir, tmp_path, "strays", objective="classify", data=data, labels=[5, 6], max_steps=1)


def test_metrics_text_and_the_progress_fronts():
    from ftmagic.events import Eval, Plan, Step
    from ftmagic.textprogress import RunState, format_plan_line
    from ftmagic.widgets.progress import status_html
    from ftmagic.widgets.summary import summary_text

    assert format_metrics({"reward_margin": 0.5, "accuracy": 1.0}) == "margin 0.5 | acc 100.0%"
    assert format_metrics({}) == ""
    plan = Plan(model="tiny", method="lora", device="cpu", precision="fp32", objective="dpo")
    assert format_plan_line(plan).startswith("ftmagic: tiny | lora dpo | cpu fp32")
    state = RunState()
    state.update(plan)
    state.update(Step(step=2, max_steps=4, loss=0.6, metrics={"reward_margin": 0.25, "reward_chosen": 0.2,
                                                              "reward_rejected": -0.05, "accuracy": 0.75}))
    state.update(Eval(step=2, eval_loss=0.65, metrics={"reward_margin": 0.1, "accuracy": 0.5}))
    html = status_html(state)
    assert "margin 0.25 | chosen 0.2 | rejected -0.05 | acc 75.0%" in html and "<b>eval</b> margin 0.1" in html
    assert "eval metrics: margin 0.1 | acc 50.0%" in summary_text(state, name="dpo")


def test_dpo_with_gradient_checkpointing_and_qlora_train(test_model_dir, tmp_path):
    """The reference forward runs without gradients inside a checkpointed model; QLoRA's 4-bit base
    (bitsandbytes on CPU, or LoRA where it cannot run) is the reference with the adapter off."""
    for name, settings in (("gc", dict(gradient_checkpointing=True)), ("qlora", dict(method="qlora"))):
        result = _run(test_model_dir, tmp_path, f"dpo-{name}", objective="dpo", data=PAIRS, **settings)
        steps = [e for e in result.history if e["event"] == "step"]
        assert steps[-1]["metrics"]["reward_margin"] > 0, name


def test_a_classifier_batch_rounded_for_onednn_gives_the_same_loss(test_model_dir):
    """Where a CPU computes bf16 (oneDNN, a kernel per shape) the flattened row is rounded up to
    a multiple of 64 tokens; the pooled outputs read the same last positions."""
    from transformers import AutoModelForSequenceClassification

    from ftmagic.data import prepare_data
    from ftmagic.engine.device import DevicePlan
    from ftmagic.engine.fastpath import varlen_attention
    from ftmagic.engine.heads import Classify, Reward
    from ftmagic.engine.models import load_tokenizer

    tok = load_tokenizer(test_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(test_model_dir, num_labels=2).eval()
    model.config.pad_token_id = tok.pad_token_id
    rows = prepare_data(FinetuneConfig(data=LABELLED, objective="classify"), tok).train[:5]
    pairs = [{"chosen": rows[i], "rejected": rows[i + 1]} for i in range(4)]
    losses = {}
    for precision in ("fp32", "bf16"):  # the plan only decides the rounding here: no autocast in this test
        plan = DevicePlan(device="cpu", precision=precision, use_grad_scaler=False, qlora_compute_dtype=None,
                          method="full", reason="test")
        classify = Classify(model, pad_id=tok.pad_token_id, plan=plan, labels=["neg", "pos"])
        reward = Reward(model, pad_id=tok.pad_token_id, plan=plan)
        assert classify.fast and reward.fast
        batch, pair_batch = classify.batch(rows), reward.batch(pairs)
        multiple = plan.row_multiple
        assert batch["input_ids"].shape[1] % multiple == 0 and pair_batch["input_ids"].shape[1] % multiple == 0
        with torch.no_grad(), varlen_attention(model):
            losses[precision] = (float(classify.loss(model, batch)[0]), float(reward.loss(model, pair_batch)[0]))
    assert sum(len(r["input_ids"]) for r in rows) % 64  # the bf16 plans did pad, the classifier's rows
    assert sum(len(p[side]["input_ids"]) for p in pairs for side in ("chosen", "rejected")) % 64  # and the pairs
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-5)

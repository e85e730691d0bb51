"""Evaluation by generation in the engine: the evaluator hook, base answers at step 0, best_metric,
held-out prompts, RunResult.evaluate, and lm-evaluation-harness on a local custom task."""

from __future__ import annotations

import json

import pytest

from engine_helpers import collect, reversal_records
from ftmagic.engine.run import finetune

BASE = dict(method="lora", batch_size=4, lr=1e-2, lora_r=4, save_steps=0, seed=5, eval_max_new_tokens=4)


def _train(model, out, **extra):
    on_event, events = collect()
    settings = {**BASE, "data": reversal_records(12), "max_steps": 4, "eval_steps": 2, **extra}
    return finetune(model=model, output_dir=str(out), on_event=on_event, **settings), events


def test_answers_are_generated_and_scored_at_step_0_each_eval_and_the_end(test_model_dir, tmp_path):
    prompts = reversal_records(3, seed=3)
    result, events = _train(test_model_dir, tmp_path / "out", eval_prompts=prompts, eval_metrics=["exact_match", "chrf"])
    kinds = [e["event"] for e in events if e["event"] != "message"]  # notes (threads, ...) may come between
    assert kinds[:4] == ["plan", "start", "generations", "eval"]  # the base model, before the first step
    tables = [e for e in events if e["event"] == "generations"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [t["step"] for t in tables] == [e["step"] for e in evals] == [0, 2, 4]
    assert all(e["eval_loss"] is None and set(e["metrics"]) == {"exact_match", "chrf"} for e in evals)
    assert [r["prompt"] for r in tables[0]["rows"]] == [p["prompt"] for p in prompts]
    assert [r["reference"] for r in tables[0]["rows"]] == [p["completion"] for p in prompts]
    # Step 0 is the base model's own answers; the last table is what the saved run answers.
    rows = result.compare([p["prompt"] for p in prompts], max_new_tokens=4)
    assert [r["answer"] for r in tables[0]["rows"]] == [r["base"] for r in rows]
    assert [r["answer"] for r in tables[-1]["rows"]] == [r["tuned"] for r in rows]
    assert result.metrics["eval_metrics"] == evals[-1]["metrics"]
    history = json.loads((tmp_path / "out" / "metrics.json").parent.joinpath("history.json").read_text())
    assert [h["step"] for h in history if h["event"] == "generations"] == [0, 2, 4]


def test_generate_batch_matches_one_prompt_at_a_time(test_model_dir, tmp_path):
    from ftmagic.engine.generation import generate_batch

    result, _ = _train(test_model_dir, tmp_path / "out", max_steps=2, eval_steps=0)
    prompts = ["reverse: a", "reverse: hello world python", "reverse: tensor"]
    batched = generate_batch(result.model, result.tokenizer, [result.render(p) for p in prompts], max_new_tokens=6,
                             end_ids=result.end_token_ids(),
                             batch_size=3)
    assert batched == [result.generate(p, max_new_tokens=6) for p in prompts]


def test_best_metric_drives_early_stopping_and_the_kept_weights(test_model_dir, tmp_path):
    values = iter([0.1, 0.5, 0.3, 0.2, 0.9])  # steps 0, 2, 4, 6 (one prompt: one call per evaluation)

    def scripted(prediction, reference):
        return next(values)

    result, events = _train(test_model_dir, tmp_path / "out", eval_prompts=reversal_records(1, seed=4),
                            eval_metrics=[scripted], best_metric="scripted", early_stopping_patience=2,
                            max_steps=10)
    assert [e["metrics"]["scripted"] for e in events if e["event"] == "eval"] == [0.1, 0.5, 0.3, 0.2]
    assert result.metrics["reason"] == "early_stopping" and result.metrics["steps"] == 6
    assert result.metrics["best"] == {"metric": "scripted", "value": 0.5, "step": 2}
    assert result.metrics["eval_metrics"] == {"scripted": 0.5}  # the kept weights' evaluation
    assert any("kept the weights of step 2 (best scripted 0.5000)" in e.get("text", "") for e in events)


def test_held_out_prompts_leave_training_and_the_validation_split_is_the_default(test_model_dir, tmp_path):
    result, events = _train(test_model_dir, tmp_path / "a", eval_prompts=4, max_steps=1, eval_steps=0)
    plan = next(e for e in events if e["event"] == "plan")
    assert plan["train_records"] == 8 and result.metrics["data"]["eval_prompts"] == 4
    held = {r["prompt"] for r in next(e for e in events if e["event"] == "generations")["rows"]}
    assert len(held) <= 4

    result, events = _train(test_model_dir, tmp_path / "b", eval_metrics=["contains"], val_split=0.25, max_steps=1,
                            eval_steps=0)
    tables = [e for e in events if e["event"] == "generations"]
    assert result.metrics["data"]["eval_prompts"] == result.metrics["data"]["eval_examples"] == 3
    assert len(tables[0]["rows"]) == 3 and tables[-1]["step"] == 1
    assert next(e for e in events if e["event"] == "eval" and e["step"] == 1)["eval_loss"] is not None


def test_generation_eval_needs_prompts(test_model_dir, tmp_path):
    from ftmagic.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^`eval_metrics` needs prompts to answer: set `eval_prompts`"):
        _train(test_model_dir, tmp_path / "c", eval_metrics=["exact_match"])


def test_run_result_evaluate_after_the_fact(test_model_dir, tmp_path):
    from ftmagic.engine.result import RunResult
    from ftmagic.errors import DataError

    _train(test_model_dir, tmp_path / "out", max_steps=2, eval_steps=0)
    result = RunResult.load(tmp_path / "out")
    records = reversal_records(4, seed=7)
    answers = [result.generate(r["prompt"], max_new_tokens=4) for r in records]
    scored = [{"prompt": r["prompt"], "completion": a if i % 2 else r["completion"]}
              for i, (r, a) in enumerate(zip(records, answers))]
    report = result.evaluate(scored, ["exact_match"], max_new_tokens=4, base=True)
    assert report["metrics"]["exact_match"] >= 0.5  # half the references are the model's own answers
    assert [row["answer"] for row in report["rows"]] == answers
    assert [row["base"] for row in report["rows"]] == [r["base"] for r in result.compare([r["prompt"] for r in records],
                                                                                         max_new_tokens=4)]
    assert set(report["base_metrics"]) == {"exact_match"}
    with pytest.raises(DataError, match=r'give prompts as a list, e\.g\. evaluate\(\["reverse: lamp"\]\)$'):
        result.evaluate("reverse: lamp")  # a lone string is a file path: it said only "file not found"


def test_answers_after_a_bf16_run_use_its_autocast_as_its_own_evaluations_did(test_model_dir, tmp_path):
    """evaluate() and generate() after a `precision: bf16` run ran the model without the run's autocast,
    so their scores differed from the last evaluation in metrics.json (chrF 0.268 against 0.263 on the
    embedded model after 120 steps). Every forward of a RunResult now runs under the run's autocast."""
    import torch

    from ftmagic.engine.result import RunResult

    prompts = reversal_records(4, seed=3)
    result, events = _train(test_model_dir, tmp_path / "out", precision="bf16", eval_prompts=prompts,
                            eval_metrics=["chrf"], max_steps=2, eval_steps=0)
    last = [e for e in events if e["event"] == "generations"][-1]
    for run in (result, RunResult.load(tmp_path / "out")):
        seen = []
        hook = run.model.get_input_embeddings().register_forward_pre_hook(
            lambda module, args: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
        try:
            report = run.evaluate(prompts, ["chrf"])
            run.generate("reverse: abc", max_new_tokens=2)
        finally:
            hook.remove()
        assert seen and set(seen) == {(True, torch.bfloat16)}
        assert report["metrics"] == result.metrics["eval_metrics"] == last["metrics"]
        assert [row["answer"] for row in report["rows"]] == [row["answer"] for row in last["rows"]]


@pytest.mark.slow
def test_lm_eval_runs_a_local_custom_task_on_the_tuned_model(test_model_dir, tmp_path):
    """lm_eval scores the tuned model's own greedy answers as exact matches: it ran that model, with its template."""
    pytest.importorskip("lm_eval")
    result, _ = _train(test_model_dir, tmp_path / "out", max_steps=2, eval_steps=0)
    prompts = [r["prompt"] for r in reversal_records(6, seed=8)]
    answers = [result.generate(p, max_new_tokens=6) for p in prompts]
    base = [r["base"] for r in result.compare(prompts, max_new_tokens=6)]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, refs in (("tuned_refs", answers), ("base_refs", base)):
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, refs)))
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
            "generation_kwargs:\n  until: ['<|im_end|>']\n  max_gen_toks: 6\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    scores = result.lm_eval(["tuned_refs", "base_refs"], include_path=str(tasks))
    assert scores["tuned_refs"]["exact_match,none"] == 1.0
    same = sum(a == b for a, b in zip(answers, base)) / len(prompts)
    assert scores["base_refs"]["exact_match,none"] == pytest.approx(same)

    from ftmagic.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^lm_eval: unknown task `nope` \(not in lm_eval's registry or in "):
        result.lm_eval(["nope"], include_path=str(tasks))


@pytest.mark.parametrize("shards,split", [(frozenset(), True), (frozenset({"gradients", "optimizer_states"}), True),
                                          (frozenset({"weights", "gradients", "optimizer_states"}), False)])
def test_answers_are_split_between_processes_and_gathered_in_the_prompts_order(monkeypatch, shards, split):
    from types import SimpleNamespace

    from ftmagic.engine import generation

    texts = [f"prompt {i}" for i in range(7)]
    answered = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        answered.append(list(prompts))
        return [f"answer to {p}" for p in prompts]

    monkeypatch.setattr(generation, "generate_batch", fake_generate)
    evaluator = object.__new__(generation.GenerationEvaluator)  # only what answers() reads
    evaluator.texts, evaluator.tokenizer, evaluator.plan = texts, None, None
    evaluator.max_new_tokens, evaluator.batch_size, evaluator.end_ids = 4, 32, None
    shares = [[f"answer to {p}" for p in texts[rank::2]] for rank in range(2)]  # what each process answers
    for rank in range(2):
        gathered = []

        def gather(mine):
            gathered.append(mine)
            return shares

        ranks = SimpleNamespace(rank=rank, world=2, spec=SimpleNamespace(shards=shards), gather=gather)
        answered.clear()
        assert evaluator.answers(model=None, ranks=ranks) == [f"answer to {p}" for p in texts]
        if split:  # this process answered its share only, and that is what it sent
            assert answered == [texts[rank::2]] and gathered == [shares[rank]]
        else:  # sharded weights: every process answers everything, nothing is gathered
            assert answered == [texts] and gathered == []

"""Generation metrics (with the real rouge-score and sacrebleu), eval prompts, and their config keys."""

from __future__ import annotations

import json

import pytest

from ftmagic.config import FinetuneConfig
from ftmagic.data.eval_prompts import EvalPrompt, eval_prompts_from, from_conversation
from ftmagic.errors import ConfigError, DataError
from ftmagic.scoring import (METRICS, greater_is_better, metric_names, normalize_answer, resolve_metrics,
                             score_answers)


def test_builtin_metrics_score_pairs():
    metrics = resolve_metrics(["exact_match", "contains", "normalized_exact_match", "rouge_l", "chrf"])
    scores = score_answers(["The answer is Paris.", "paris", "Lyon"], ["Paris", "Paris", "Paris"], metrics)
    assert scores["exact_match"] == pytest.approx(0.0)
    assert scores["contains"] == pytest.approx(1 / 3)
    assert scores["normalized_exact_match"] == pytest.approx(1 / 3)  # "paris" after lower-casing
    # rouge-score: "paris" is 1 of 4 words of the first answer (F1 0.4), equal in the second, absent in the third.
    assert scores["rouge_l"] == pytest.approx((0.4 + 1.0 + 0.0) / 3)
    assert 0 < scores["chrf"] < 1


def test_rouge_and_chrf_match_their_libraries():
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    pred, ref = "the cat sat on the mat", "a cat sat on a mat"
    scores = score_answers([pred], [ref], resolve_metrics(["rouge_l", "chrf"]))
    assert scores["rouge_l"] == pytest.approx(rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure)
    assert scores["chrf"] == pytest.approx(CHRF().sentence_score(pred, [ref]).score / 100)



def test_rouge_l_scores_answers_in_every_script():
    # rouge-score alone keeps only [a-z0-9]: a correct answer in Russian or Japanese had no words and scored 0.0.
    metrics = resolve_metrics(["rouge_l"])
    assert score_answers(["привет мир", "東京です", "café au lait"], ["привет мир", "東京です", "café au lait"],
                         metrics) == {"rouge_l": pytest.approx(1.0)}
    assert score_answers(["привет"], ["привет мир"], metrics)["rouge_l"] == pytest.approx(2 / 3)
    assert score_answers(["東京"], ["東京です"], metrics)["rouge_l"] == pytest.approx(2 / 3)  # characters, as for CJK
    assert score_answers(["мир"], ["привет"], metrics)["rouge_l"] == 0.0
    # ASCII text splits exactly as rouge-score's own tokenizer does.
    from rouge_score import rouge_scorer

    pred, ref = "It's 3:15 -- the_cat SAT!", "its 3 15 the cat sat"
    assert score_answers([pred], [ref], metrics)["rouge_l"] == pytest.approx(
        rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure)

def test_a_python_function_is_a_metric_and_prompts_without_reference_are_not_scored():
    def first_letter(prediction, reference):
        return float(prediction[:1] == reference[:1])

    first_letter.greater_is_better = True
    metrics = resolve_metrics(["exact_match", first_letter])
    assert list(metrics) == ["exact_match", "first_letter"]
    assert score_answers(["ab", "xy", "zz"], ["ac", "xy", None], metrics) == {"exact_match": 0.5, "first_letter": 1.0}


def test_metric_errors_are_one_line_and_name_the_metric():
    with pytest.raises(ConfigError, match=r"^`eval_metrics: rogue_l` is not a metric; .*; did you mean `rouge_l`\?$"):
        resolve_metrics(["rogue_l"])

    def broken(prediction, reference):
        raise ZeroDivisionError("no")

    with pytest.raises(ConfigError, match=r"^`eval_metrics: broken` failed on prediction 'a'"):
        score_answers(["a"], ["b"], resolve_metrics([broken]))


def test_missing_metric_package_names_the_extra(monkeypatch):
    import sys

    import ftmagic.scoring as scoring

    monkeypatch.setitem(sys.modules, "rouge_score", None)
    monkeypatch.setattr(scoring, "_ROUGE", {})
    with pytest.raises(ConfigError, match=r"^`eval_metrics: rouge_l` needs the rouge-score package \(pip install 'ftmagic\[eval\]'\)$"):
        score_answers(["a"], ["a"], resolve_metrics(["rouge_l"]))


def test_directions_and_names():
    assert normalize_answer("An  Apple!") == "apple"
    assert metric_names(["rougeL", "em"]) == ["rouge_l", "exact_match"]
    assert not greater_is_better("eval_loss") and greater_is_better("chrf") and not greater_is_better("dpo_loss")
    assert set(METRICS) == {"exact_match", "contains", "normalized_exact_match", "rouge_l", "chrf"}


@pytest.mark.parametrize("text, message", [
    ("eval_metrics: [exact, chrf]\n", r"^run.yaml:1: `eval_metrics: exact` is not a metric; .*; did you mean `exact_match`\?$"),
    ("eval_prompts: 0\n", r"^run.yaml:1: `eval_prompts: 0` must be a number of records to hold out"),
    ("eval_prompts: true\n", r"^run.yaml:1: `eval_prompts: True` must be"),
    ("eval_metrics: [chrf]\nbest_metric: exact_match\n",
     r"^run.yaml:2: `best_metric: exact_match` is not computed; add it to `eval_metrics` \(now: chrf\)$"),
    ("eval_max_new_tokens: 0\n", r"^run.yaml:1: `eval_max_new_tokens: 0` must be at least 1$"),
    ("report_to: [tensorboard, mlfow]\n", r"^run.yaml:1: `report_to: mlfow` is not accepted; use one of none, "
                                              r"tensorboard, wandb, mlflow, trackio or a list of them; did you mean `mlflow`\?$"),
])
def test_config_errors_name_the_key_and_line(text, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig.from_yaml(text, source="run.yaml")


def test_config_round_trips_functions_as_variables():
    def my_score(prediction, reference):
        return 1.0

    cfg = FinetuneConfig(eval_metrics=["exact_match"], eval_prompts=5)
    assert cfg.generation_eval and cfg.metric_names == ["exact_match"]
    cfg = FinetuneConfig.from_dict({"eval_metrics": my_score, "eval_prompts": "7"})
    assert cfg.eval_metrics == [my_score] and cfg.eval_prompts == 7
    saved = cfg.to_dict()
    assert saved["eval_metrics"] == ["$my_score"] and saved["eval_prompts"] == 7
    assert FinetuneConfig.from_dict(saved).metric_names == ["my_score"]  # a reloaded run reads back
    assert not FinetuneConfig().generation_eval and FinetuneConfig(eval_prompts=["hi"]).metric_names == ["exact_match"]


def test_eval_prompts_from_records_files_and_strings(tmp_path):
    records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "reverse: ab"},
                             {"role": "assistant", "content": "ba"}]},
               {"messages": [{"role": "user", "content": "reverse: cd"}, {"role": "assistant", "content": "dc"}]}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for source in (records, str(path)):
        prompts = eval_prompts_from(source)
        assert [(p.text, p.reference) for p in prompts] == [("reverse: ab", "ba"), ("reverse: cd", "dc")]
        assert prompts[0].messages[0] == {"role": "system", "content": "Be brief."}
    plain = eval_prompts_from(["hello"], system_prompt="Be brief.")
    assert plain == [EvalPrompt(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}))]
    assert eval_prompts_from([{"instruction": "Add", "input": "1+1", "output": "2"}])[0].reference == "2"


def test_eval_prompts_errors_name_the_record(tmp_path):
    with pytest.raises(DataError, match=r"plain `text` records have no answer"):
        eval_prompts_from([{"text": "just text"}])
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=r"^.*p.jsonl:2: "):
        eval_prompts_from(str(path))
    with pytest.raises(DataError, match=r"starts with the answer"):
        from_conversation([{"role": "assistant", "content": "x"}])
    # What is not a dataset at all is named by the key it came as (it said `data:` for `ft.evaluate(5)`).
    with pytest.raises(DataError, match=r"^eval_prompts: a single dict is not a dataset; pass a list of dicts"):
        eval_prompts_from({"prompt": "a", "completion": "b"})
    with pytest.raises(DataError, match=r"^prompts: an int is not a dataset; pass a file path"):
        eval_prompts_from(5, key="prompts")


def test_a_lone_string_that_is_no_file_says_prompts_go_in_a_list(tmp_path, monkeypatch):
    # ft.evaluate("reverse: lamp") answered only "file not found"; the user meant a prompt.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^reverse: lamp: file not found .*; `prompts` reads a string as a data file "
                                        r"path \(or dataset id\); give prompts as a list, e\.g\. "
                                        r'evaluate\(\["reverse: lamp"\]\)$'):
        eval_prompts_from("reverse: lamp", key="prompts")
    with pytest.raises(DataError, match=r'; give prompts as a list, e\.g\. eval_prompts: \["reverse: lamp"\]$'):
        eval_prompts_from("reverse: lamp")
    for meant_a_file in ("test.jsonl", "data/prompts", "./prompts"):  # a misspelt file or id: no hint
        with pytest.raises(DataError) as raised:
            eval_prompts_from(meant_a_file)
        assert raised.value.args[0].startswith(f"{meant_a_file}: ") and "as a list" not in raised.value.args[0]

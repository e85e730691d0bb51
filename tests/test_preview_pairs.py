"""The previewer on preference pairs and labelled texts: detection, the side-by-side view with the
compared tokens coloured, identical pairs, empty sides, truncation and label imbalance."""

from __future__ import annotations

import pytest

import ftmagic
from ftmagic.widgets.preview_html import record_html

PAIRS = [
    {"prompt": "reverse: abc", "chosen": "cba", "rejected": "abc"},
    {"prompt": "reverse: dog", "chosen": "god", "rejected": "god"},
    {"prompt": "reverse: fox", "chosen": "", "rejected": "fox"},
    {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
     "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]},
    {"prompt": "reverse: abc", "chosen": "cba", "rejected": "abc"},
]


def test_preference_report_flags_identical_and_empty_sides_and_duplicates(test_tokenizer):
    report = ftmagic.preview(PAIRS, tokenizer=test_tokenizer, max_seq_len=64)
    assert report.format == "preference"
    counts = report.problem_counts
    assert counts["identical_pair"] == 1 and counts["empty_field"] == 1 and counts["duplicate"] == 1
    assert report.usable == 3 and report.skipped == 2
    where = {p.kind: p.location for p in report.problems}
    assert where["identical_pair"] == "data[1]" and where["empty_field"] == "data[2]"


def test_a_pair_shows_side_by_side_with_the_compared_tokens_coloured(test_tokenizer):
    report = ftmagic.preview(PAIRS, tokenizer=test_tokenizer, max_seq_len=64)
    view = report.record(3)  # the UltraFeedback-style record: the shared user turn is the prompt
    chosen = "".join(t.text for t in view.pair["chosen"]["tokens"] if t.trained)
    rejected = "".join(t.text for t in view.pair["rejected"]["tokens"] if t.trained)
    assert chosen == "hello there<|im_end|>" and rejected == "go away<|im_end|>"
    assert not any(t.trained for t in view.pair["chosen"]["tokens"] if "hi" == t.text)
    html = record_html(view)
    assert html.count('<b>chosen</b>') == 1 and html.count('<b>rejected</b>') == 1
    assert 'class="ftm-pair"' in html and "ftm-trained" in html


def test_truncation_of_a_pair_is_counted(test_tokenizer):
    long = [{"prompt": "reverse: abc", "chosen": "x " * 40, "rejected": "y"}]
    report = ftmagic.preview(long, tokenizer=test_tokenizer, max_seq_len=24)
    assert report.truncated == 1 and report.problem_counts["no_eos"] == 1


def test_labelled_texts_report_label_balance_and_imbalance(test_tokenizer):
    data = [{"text": f"good {i}", "label": "pos"} for i in range(9)] + [{"text": "bad", "label": "neg"}]
    report = ftmagic.preview(data, tokenizer=test_tokenizer)
    assert report.format == "classification"
    assert report.label_balance["counts"] == {"pos": 9, "neg": 1}
    problem = next(p for p in report.problems if p.kind == "label_imbalance")
    assert "2 labels" in problem.message and "`pos` is 9 of 10" in problem.message
    view = report.record(9)
    assert view.label == "neg" and "label <b>neg</b>" in record_html(view)
    # For an SFT run the same records are plain text: the objective decides what is detected.
    assert ftmagic.preview(data, tokenizer=test_tokenizer, objective="sft").format == "text"


def test_a_classifier_preview_trains_the_token_the_head_reads(test_tokenizer):
    """A classifier's loss is the label's cross-entropy at the one token the head reads (a decoder's
    last): the summary counted every token as trained while the pager showed none."""
    data = [{"text": "a fine film", "label": "pos"}, {"text": "dull", "label": "neg"}]
    report = ftmagic.preview(data, tokenizer=test_tokenizer, objective="classify")
    assert report.trained_tokens == 2 and report.total_tokens > 2
    assert "trained tokens: 2 of" in report.to_text() and "the last token, which the head reads" in report.to_text()
    for i in range(2):
        view = report.record(i)
        assert [t.trained for t in view.tokens] == [False] * (len(view.tokens) - 1) + [True]
        assert view.tokens[-1].text == "<|im_end|>"
    assert "the head reads the one trained token" in record_html(report.record(0))


def test_an_encoder_classifier_preview_trains_its_cls_token(tmp_path):
    from model_builders import build_test_encoder_dir

    from ftmagic.data.pairs import encode_texts, head_position
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_test_encoder_dir(tmp_path / "bert"))
    assert head_position(tok) == 0 and encode_texts(tok, ["a fine film"])[0].trained_tokens == 1
    report = ftmagic.preview([{"text": "a fine film", "label": "pos"}], tokenizer=tok, objective="classify")
    view = report.record(0)
    assert [t.text for t in view.tokens if t.trained] == ["[CLS]"] and "first token ([CLS])" in report.to_text()


def test_clean_keeps_one_of_each_pair(tmp_path):
    result = ftmagic.clean(PAIRS, str(tmp_path / "clean.jsonl"))
    assert result.summary().startswith("kept 2 of 5 records; dropped 3: duplicate 1, empty_field 1, identical_pair 1")


def test_cli_preview_takes_the_objective(tmp_path, capsys):
    import json

    from ftmagic.cli import main

    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    assert main(["preview", str(path), "--objective", "sft"]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert main(["preview", str(path), "--objective", "dpo"]) == 0
    assert "format preference" in capsys.readouterr().out

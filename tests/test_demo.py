"""The bundled demo task, its scoring, the before/after table and `ftmagic demo`."""

from __future__ import annotations


import pytest

from ftmagic.demo import DEMO_CONFIG, DEMO_PROMPTS, demo_dataset, exact_match, format_table
from ftmagic.errors import ConfigError


def _word(record):
    return record["messages"][0]["content"].split(": ", 1)[1]


def test_demo_dataset_is_deterministic_and_split_cleanly():
    train, test = demo_dataset("train"), demo_dataset("test")
    assert len(train) == 2000 and len(test) == 100
    assert train == demo_dataset("train") and test == demo_dataset("test")
    assert train[0] == {"messages": [{"role": "user", "content": "reverse: ynbi"},
                                     {"role": "assistant", "content": "ibny"}]}
    train_words = {_word(r) for r in train}
    test_words = [_word(r) for r in test]
    assert len(train_words) == 2000 and len(set(test_words)) == 100
    assert not train_words & set(test_words)
    assert not train_words & {p.split(": ", 1)[1] for p in DEMO_PROMPTS}
    for record in train + test:
        word = _word(record)
        assert 3 <= len(word) <= 5 and word != word[::-1]
        assert record["messages"][1]["content"] == word[::-1]
    assert demo_dataset("test", n=5) == test[:5]


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "validation"}, "unknown split 'validation'"),
    ({"n": -1}, "n must be a non-negative integer"),
])
def test_demo_dataset_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        demo_dataset(**kwargs)


def test_exact_match_scores_exact_answers_only():
    records = demo_dataset("test", n=4)
    assert exact_match(lambda p: p.split(": ", 1)[1][::-1], records) == 1.0
    assert exact_match(lambda p: p.split(": ", 1)[1], records) == 0.0
    assert exact_match(lambda p: " " + p.split(": ", 1)[1][::-1] + "\n", records) == 1.0  # spaces ignored
    first = records[0]["messages"][0]["content"]
    assert exact_match(lambda p: p.split(": ", 1)[1][::-1] if p == first else "", records) == 0.25
    assert exact_match(lambda p: "", []) == 0.0


def test_format_table():
    rows = [{"prompt": "reverse: lamp", "expected": "pmal", "base": "lamp", "tuned": "pmal"},
            {"prompt": "reverse: kite", "expected": "etik", "base": "", "tuned": "etk"}]
    assert format_table(rows, 0.0, 0.5).splitlines() == [
        "prompt         expected  base (before)  tuned (after)",
        "reverse: lamp  pmal      lamp           pmal  ok",
        "reverse: kite  etik      ''             etk",
        "exact match on held-out words: 0% before, 50% after",
    ]


def test_demo_config_is_a_valid_lora_config():
    from ftmagic.config import FinetuneConfig

    cfg = FinetuneConfig.from_dict(dict(DEMO_CONFIG, data=demo_dataset("train", n=4)))
    assert cfg.model == "tiny" and cfg.method == "lora" and cfg.max_steps == DEMO_CONFIG["max_steps"]


def test_cli_demo_smoke(tmp_path, capsys):
    from ftmagic.cli import main

    out_dir = tmp_path / "demo"
    status = main(["demo", "--output-dir", str(out_dir), "--steps", "2", "--test-size", "4", "--quiet"])
    printed = capsys.readouterr().out
    assert status == 0
    lines = printed.strip().splitlines()
    assert lines[0].startswith("prompt") and "base (before)" in lines[0] and "tuned (after)" in lines[0]
    assert [line.split()[1] for line in lines[1:1 + len(DEMO_PROMPTS)]] == [p.split()[1] for p in DEMO_PROMPTS]
    assert any(line.startswith("exact match on held-out words: ") for line in lines)
    assert f"adapter saved to {out_dir}" in printed
    assert (out_dir / "adapter_config.json").exists()


def test_cli_demo_rejects_bad_steps(capsys):
    from ftmagic.cli import main

    assert main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ftmagic: error: --steps must be at least 1, got 0"

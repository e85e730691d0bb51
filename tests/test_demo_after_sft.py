"""The demo data after SFT: the style preference and the sentiment set; the two-stage run itself
(slow: SFT then DPO on the embedded model, the figure the notebook and the README state)."""

from __future__ import annotations

import pytest

from ftmagic.demo import (PLAIN_STYLE, PREFERRED_STYLE, preferred_share, run_preference_demo, sentiment_dataset,
                          style_pairs, style_prompts, style_sft_dataset)
from ftmagic.errors import ConfigError


def test_style_data_is_deterministic_and_held_out_words_are_unseen():
    sft, pairs, prompts = style_sft_dataset(), style_pairs(), style_prompts()
    assert sft == style_sft_dataset() and len(sft) == len(pairs) == 600 and len(prompts) == 60
    answers = [r["messages"][1]["content"] for r in sft]
    share = sum(a.endswith("!") for a in answers) / len(answers)
    assert 0.15 < share < 0.35  # the plain style dominates the SFT stage
    seen = {p["prompt"] for p in pairs}
    assert not seen & set(prompts)
    word = pairs[0]["prompt"].split(": ")[1]
    assert pairs[0]["chosen"] == PREFERRED_STYLE.format(word=word) and pairs[0]["rejected"] == PLAIN_STYLE.format(word=word)


def test_preferred_share_counts_the_preferred_ending_only():
    assert preferred_share(["ab is nice!", "ab is nice.", "ab nice!", ""]) == 0.25
    assert preferred_share([]) == 0.0


def test_sentiment_dataset_is_balanced_and_split():
    train, test = sentiment_dataset("train"), sentiment_dataset("test")
    assert len(train) == 600 and len(test) == 200 and train == sentiment_dataset("train")
    positives = sum(r["label"] == "positive" for r in train)
    assert 250 < positives < 350
    with pytest.raises(ConfigError, match="unknown split"):
        sentiment_dataset("dev")


@pytest.mark.slow
def test_dpo_after_sft_moves_the_preferred_style_from_at_most_half_to_85_percent(tmp_path):
    report = run_preference_demo(str(tmp_path / "pref"))
    assert report["sft_share"] <= 0.5 and report["dpo_share"] >= 0.85, report["rows"]

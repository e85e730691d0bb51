"""Dataset-wide checks that need no tokenizer: duplicates and label-like answers.

Example::

    finder = DuplicateFinder()
    finder.check(conv_a, "d.jsonl:1")          # None
    finder.check(conv_a, "d.jsonl:9")          # Problem('duplicate', 'd.jsonl:9', 'same conversation as d.jsonl:1')
    label_balance(Counter({"yes": 9, "no": 1}))
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from ftmagic.data.problems import Problem

MAX_LABELS = 20  # more distinct answers than this do not look like class labels


class DuplicateFinder:
    """Remembers conversations seen so far; flags exact and whitespace/case-normalised repeats.

    ``location`` turns the key given to :meth:`check` into a location string; it is only
    called for duplicates, so a record index can be passed cheaply.
    """

    def __init__(self, location=str) -> None:
        self._exact: dict = {}
        self._near: dict = {}
        self._location = location

    def check(self, conversation: list, key) -> Optional[Problem]:
        # One string per conversation: faster to hash than tuples; a false match needs control characters in messages.
        exact = "\x1f".join([t["role"] + "\x1e" + t["content"] for t in conversation])
        first = self._exact.get(exact)
        if first is not None:
            return Problem("duplicate", self._location(key), f"same conversation as {self._location(first)}")
        self._exact[exact] = key
        near = " ".join(exact.lower().split())
        first = self._near.get(near)
        if first is not None:
            return Problem("near_duplicate", self._location(key),
                           f"same as {self._location(first)} after normalising whitespace and case")
        self._near[near] = key
        return None


def final_answer(conversation: list) -> Optional[str]:
    """The last assistant answer, stripped (None for plain text or when there is none)."""
    for turn in reversed(conversation):
        if turn["role"] == "assistant":
            return turn["content"].strip()
    return None


def label_balance(answers: Counter, any_count: bool = False) -> Optional[dict]:
    """If the answers look like class labels (few distinct values), how they are spread; else None.

    ``any_count``: they are labels (a classification dataset), however many there are.

    Example::

        >>> label_balance(Counter({"yes": 6, "no": 2}))
        {'distinct': 2, 'counts': {'yes': 6, 'no': 2}, 'majority_share': 0.75, 'ratio': 3.0}
    """
    n = sum(answers.values())
    distinct = len(answers)
    if not any_count and (n < 4 or distinct > min(MAX_LABELS, n // 2)):
        return None
    if not n:
        return None
    ranked = answers.most_common()
    top, least = ranked[0][1], ranked[-1][1]
    return {"distinct": distinct, "counts": dict(ranked), "majority_share": round(top / n, 4),
            "ratio": round(top / least, 2)}


def imbalance_problem(balance: Optional[dict], location: str, threshold: float = 3.0,
                      labelled: bool = False) -> Optional[Problem]:
    """A ``label_imbalance`` problem when the most common label is ``threshold`` times the rarest (or alone).

    ``labelled``: the values are a classification dataset's labels (not answers that look like labels).
    """
    if not balance:
        return None
    ranked = list(balance["counts"].items())
    n = sum(balance["counts"].values())
    (top, top_n), (least, least_n) = ranked[0], ranked[-1]
    what = "labels" if labelled else "answers"
    if balance["distinct"] == 1:
        return Problem("label_imbalance", location, f"all {n} {what} are `{_short(top)}`")
    if balance["ratio"] < threshold:
        return None
    head = f"{balance['distinct']} labels" if labelled else f"answers look like labels ({balance['distinct']} distinct values)"
    return Problem("label_imbalance", location,
                   f"{head}: `{_short(top)}` is {top_n} of {n} ({100 * top_n / n:.0f}%), `{_short(least)}` only {least_n}")


def _short(text, limit: int = 30) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"

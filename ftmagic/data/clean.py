"""``clean(data, path)``: a copy of a dataset without unreadable, empty and duplicate records.

The original is never modified: the kept records are returned and, when ``path`` is
given, written there as JSONL (refused if ``path`` is the source file itself).

Example::

    result = clean("train.jsonl", "train.clean.jsonl")
    print(result.summary())
    # kept 980 of 1000 records; dropped 20: duplicate 12, empty_field 6, unparseable 2 -> train.clean.jsonl
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from ftmagic.data.build import detect, gc_paused, sort_problems
from ftmagic.data.checks import DuplicateFinder
from ftmagic.data.formats import comparable_turns, convert_record
from ftmagic.data.load import load_data
from ftmagic.data.problems import Problem, RecordError
from ftmagic.errors import DataError

DROPPED_KINDS = ("unparseable", "not_a_record", "missing_field", "empty_field", "bad_type", "duplicate", "near_duplicate",
                 "identical_pair")


@dataclass
class CleanResult:
    """Kept records, what was dropped (with locations) and where the copy was written."""

    records: list
    dropped: list = field(default_factory=list)
    read: int = 0
    path: Optional[str] = None

    @property
    def dropped_counts(self) -> dict:
        return dict(sorted(Counter(p.kind for p in self.dropped).items()))

    def summary(self) -> str:
        """One line: kept, dropped by kind, and the output file."""
        counts = ", ".join(f"{k} {v}" for k, v in self.dropped_counts.items())
        text = f"kept {len(self.records)} of {self.read} records; dropped {len(self.dropped)}" + (f": {counts}" if counts else "")
        return text + (f" -> {self.path}" if self.path else "")


def clean(data: Any, path: Optional[str] = None, *, format: str = "auto", columns: Optional[dict] = None,
          near_duplicates: bool = True) -> CleanResult:
    """Drop unreadable lines, records with missing or empty fields, and duplicates (first one kept).

    ``near_duplicates=False`` keeps records that differ only in whitespace or case.
    Problems that need a person (no assistant turn, roles out of order, too long) are kept.

    Example::

        clean([{"text": "a"}, {"text": "a"}, {"text": ""}]).summary()
        # 'kept 1 of 3 records; dropped 2: duplicate 1, empty_field 1'
    """
    with gc_paused():
        loaded = load_data(data, strict=False)
    if path is not None and isinstance(data, (str, os.PathLike)) and os.path.exists(path) and \
            os.path.samefile(path, os.fspath(data)):
        raise DataError(f"{path}: is the original dataset; write the cleaned copy to another file")
    detection = detect(loaded, format, columns)
    dropped = [p for p in loaded.problems if p.kind in DROPPED_KINDS]
    record_problems, kept = [], []
    finder = DuplicateFinder(loaded.location)
    for i, record in enumerate(loaded.records):
        where = loaded.location(i)
        try:
            item = convert_record(record, detection.format, detection.columns)
            if getattr(item, "identical", False):
                raise RecordError("identical_pair", "the chosen and rejected completions are the same")
            conv = comparable_turns(item, detection.format)
        except RecordError as exc:
            if exc.kind in DROPPED_KINDS:
                record_problems.append(Problem(exc.kind, where, exc.message))
            else:
                kept.append(record)  # e.g. no assistant turn: the answer may be what is missing
            continue
        dup = finder.check(conv, i)
        if dup is not None and (dup.kind == "duplicate" or near_duplicates):
            record_problems.append(dup)
            continue
        kept.append(record)
    result = CleanResult(kept, sort_problems(dropped, record_problems), max(loaded.read, len(loaded.records)), None)
    if path is not None:
        _write_jsonl(kept, path)
        result.path = str(path)
    return result


def _write_jsonl(records: list, path: str) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)  # a half-written copy never replaces an earlier good one
    except OSError as exc:
        raise DataError(f"{path}: cannot write the cleaned copy ({exc.strerror or exc})") from None

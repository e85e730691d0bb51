"""``clean(data, path)``: a copy of a dataset without unreadable, empty and duplicate records.

The original is never modified: the kept records are returned and, when ``path`` is
given, written there as JSONL. An existing ``path`` is never overwritten (the source file
itself included).

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

DROPPED_KINDS = ("unparseable", "oversized", "not_a_record", "missing_field", "empty_field", "bad_type", "duplicate",
                 "near_duplicate", "identical_pair")


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
          near_duplicates: bool = True, overwrite: bool = False) -> CleanResult:
    """Drop unreadable lines, records with missing or empty fields, and duplicates (first one kept).

    ``near_duplicates=False`` keeps records that differ only in whitespace or case. An
    existing ``path`` is refused unless ``overwrite=True`` (the original data never is).
    Problems that need a person (no assistant turn, roles out of order, too long) are kept.

    Example::

        clean([{"text": "a"}, {"text": "a"}, {"text": ""}]).summary()
        # 'kept 1 of 3 records; dropped 2: duplicate 1, empty_field 1'
    """
    if path is not None:
        # Checked before reading the data: nothing is analysed for a copy that cannot be written.
        path = os.path.expanduser(os.fspath(path))
        if isinstance(data, (str, os.PathLike)) and os.path.exists(path) and \
                os.path.samefile(path, os.path.expanduser(os.fspath(data))):
            raise DataError(f"{path}: is the original dataset; write the cleaned copy to another file")
        if os.path.isdir(path):
            raise DataError(f"{path}: is a folder; give the cleaned copy a file name, e.g. {os.path.join(path, 'clean.jsonl')}")
        if os.path.lexists(path) and not overwrite:
            raise DataError(f"{path}: the file exists and is never overwritten; give a new name, delete it first, "
                            "or pass overwrite=True")
    with gc_paused():
        loaded = load_data(data, strict=False)
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
                record_problems.append(loaded.problem(i, exc))
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
        _write_jsonl(kept, path, overwrite=overwrite)
        result.path = str(path)
    return result


def _write_jsonl(records: list, path: str, overwrite: bool = False) -> None:
    """Write ``path`` through a temporary file; an existing file is replaced only with ``overwrite``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        if overwrite:
            os.replace(tmp, path)
            return
        # link() fails if `path` appeared meanwhile, where a rename would silently replace it.
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: exclusive create, then copy
            import shutil

            with open(tmp, "rb") as source, open(path, "xb") as target:
                shutil.copyfileobj(source, target)
    except FileExistsError:
        raise DataError(f"{path}: the file exists and is never overwritten; give a new name or delete it first") from None
    except (OSError, RecursionError) as exc:
        why = "records nested too deeply" if isinstance(exc, RecursionError) else (exc.strerror or exc)
        raise DataError(f"{path}: cannot write the cleaned copy ({why})") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)

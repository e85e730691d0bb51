"""From one data source to encoded examples: load, detect, convert, render, tokenize, count.

This is the single path training and the previewer share. Records that cannot be used
are skipped and counted by kind with their location, never dropped silently.

Example::

    built = build_examples("train.jsonl", tok, max_seq_len=512)
    built.detection.format, built.skipped           # ('alpaca', {'empty_field': 2})
    [e for e in built.encoded if e is not None][0].labels
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from ftmagic.data.encode import Encoded, encode_conversations
from ftmagic.data.formats import Detection, conversation_issues, detect_format, to_conversation
from ftmagic.data.load import LoadedData, load_data
from ftmagic.data.problems import Problem, RecordError
from ftmagic.data.templates import ChatTemplate, resolve_template


@dataclass
class Built:
    """Encoded examples of one source, aligned with its records (``None`` where a record was skipped)."""

    loaded: LoadedData
    detection: Detection
    template: Optional[ChatTemplate]
    conversations: list  # per record: conversation or None
    encoded: list  # per record: Encoded or None
    problems: list = field(default_factory=list)  # load problems + record problems, in record order
    skipped: Counter = field(default_factory=Counter)  # kind -> records skipped

    @property
    def examples(self) -> list:
        """The usable encoded examples, in record order."""
        return [e for e in self.encoded if e is not None]

    @property
    def truncated(self) -> int:
        return sum(1 for e in self.encoded if e is not None and e.truncated)


def build_examples(data: Any, tokenizer, *, fmt: str = "auto", columns: Optional[dict] = None,
                   template: Optional[str] = None, system_prompt: Optional[str] = None,
                   train_on: str = "completions", max_seq_len: Optional[int] = None, strict: bool = True,
                   batch: int = 4096) -> Built:
    """Load ``data`` and encode every record (in batches of ``batch``) exactly as training will.

    ``strict`` applies to reading (a malformed line raises); records that parse but cannot
    be used (missing fields, rejected by the template, nothing left to train) are skipped,
    counted in ``skipped`` and listed in ``problems``.
    """
    loaded = load_data(data, strict=strict)
    detection = detect_format(loaded.records, fmt, columns, source=loaded.name) if loaded.records else \
        Detection(fmt if fmt != "auto" else "unknown", "no records", dict(columns or {}))
    record_problems: list = []
    conversations: list = [None] * len(loaded.records)
    for i, record in enumerate(loaded.records):
        try:
            conv = to_conversation(record, detection.format, detection.columns, system_prompt)
        except RecordError as exc:
            record_problems.append(Problem(exc.kind, loaded.location(i), exc.message))
            continue
        conversations[i] = conv
        for kind, message in conversation_issues(conv):
            record_problems.append(Problem(kind, loaded.location(i), message))

    tpl = resolve_template(tokenizer, template) if detection.format != "text" else None
    encoded: list = [None] * len(loaded.records)
    todo = [i for i, c in enumerate(conversations) if c is not None]
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        results = encode_conversations(tokenizer, [conversations[i] for i in chunk], template=tpl or template,
                                       train_on=train_on, max_seq_len=max_seq_len)
        for i, result in zip(chunk, results):
            if isinstance(result, RecordError):
                record_problems.append(Problem(result.kind, loaded.location(i), result.message))
                continue
            for kind, message in result.warnings:
                record_problems.append(Problem(kind, loaded.location(i), message))
            if not any(label != -100 for label in result.labels):
                record_problems.append(Problem("no_trained_tokens", loaded.location(i),
                                               f"no trained token is left within max_seq_len={max_seq_len} "
                                               f"(the example has {result.length} tokens)"))
                continue
            encoded[i] = result
    skipped = Counter(p.kind for p in loaded.problems)
    from ftmagic.data.problems import SKIPPING_KINDS

    skipped.update(p.kind for p in record_problems if p.kind in SKIPPING_KINDS)
    skipped.pop("non_utf8", None)  # replaced characters: the record is still used
    order = {id(p): n for n, p in enumerate(record_problems)}
    problems = sorted(loaded.problems + record_problems, key=lambda p: (_sort_key(p.location), order.get(id(p), -1)))
    return Built(loaded, detection, tpl, conversations, encoded, problems, skipped)


def _sort_key(location: str) -> tuple:
    """Order locations by file line or row number, so problems read top to bottom."""
    tail = location.rsplit(":", 1)[-1].strip().rstrip("]")
    for sep in ("row ", "["):
        if sep in tail:
            tail = tail.rsplit(sep, 1)[-1]
    return (0, int(tail)) if tail.isdigit() else (1, 0)

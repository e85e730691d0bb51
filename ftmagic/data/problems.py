"""What can be wrong with a record, in one shape shared by the loaders, the pipeline and the previewer.

A :class:`Problem` names its kind (a short stable word), where it is (``file:line``,
``file[N]`` for a table's row or ``data[N]``, indexes from 0) and a one-line message. Training turns the first
fatal one into a :class:`~ftmagic.errors.DataError`; the previewer lists them all.

Example::

    >>> p = Problem("unparseable", "train.jsonl:3", "not valid JSON (Expecting value at column 1)")
    >>> str(p)
    'train.jsonl:3: not valid JSON (Expecting value at column 1)'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

# Kinds, with the short label the previewer prints next to their counts.
KINDS = {
    "unparseable": "unparseable line",
    "oversized": "record over the size limit",
    "non_utf8": "non-UTF-8 bytes",
    "not_a_record": "not a JSON object",
    "missing_field": "missing field",
    "empty_field": "empty field",
    "bad_type": "wrong value type",
    "role_order": "roles out of order",
    "no_final_assistant": "does not end with an assistant turn",
    "no_assistant": "no assistant turn",
    "template_error": "rejected by the chat template",
    "system_dropped": "system prompt dropped by the template",
    "no_eos": "answer left without EOS",
    "truncated": "truncated to max_seq_len",
    "no_trained_tokens": "no trained token left",
    "duplicate": "exact duplicate",
    "near_duplicate": "duplicate after whitespace/case normalisation",
    "label_imbalance": "unbalanced labels",
    "identical_pair": "chosen and rejected are the same",
    "unknown_label": "label not among `labels`",
    "no_records": "no records",
}

# Kinds that make a record unusable for training (it is skipped and counted).
SKIPPING_KINDS = ("unparseable", "oversized", "non_utf8", "not_a_record", "missing_field", "empty_field", "bad_type",
                  "no_assistant", "template_error", "no_trained_tokens", "identical_pair", "unknown_label")


@dataclass
class Problem:
    """One problem found in a dataset: ``kind``, ``location`` and a one-line ``message``."""

    kind: str
    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message

    def to_dict(self) -> dict:
        return asdict(self)


class RecordError(Exception):
    """A single record cannot be used; the caller adds the location.

    ``table_message`` is the message for a record read from a table (Parquet, a DataFrame, a
    ``datasets`` dataset), where advice about the text of a JSON or YAML file does not apply.
    """

    def __init__(self, kind: str, message: str, table_message: Optional[str] = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.table_message = table_message

    def message_for(self, unit: str) -> str:
        """The message for a source whose records are ``unit`` s (``line``, ``row``, ``index``; see LoadedData)."""
        return self.table_message if unit == "row" and self.table_message else self.message


"""Recognise a dataset's format, with the evidence, and turn each record into a conversation.

Formats (the ``format`` config key):

=================== ==============================================================
``alpaca``          ``instruction``, optional ``input``, ``output`` (optional ``system``)
``sharegpt``        ``conversations``: list of ``{"from": "human"|"gpt"|"system", "value"}``
``messages``        ``messages``: OpenAI style ``{"role", "content"}``, optional ``weight`` 0/1
``prompt_completion`` ``prompt`` and ``completion`` (strings, or lists of messages)
``text``            ``text``: plain text, every token trained (continual pre-training)
=================== ==============================================================

A ``columns`` mapping (canonical name -> your column) overrides detection, e.g.
``{"prompt": "question", "completion": "answer"}``.

Every format becomes the same conversation: a list of ``{"role", "content", "weight"}``
with roles ``system``, ``user``, ``assistant`` (or ``tool``); ``text`` records become a
single ``{"role": "text", ...}`` turn.

Example::

    >>> d = detect_format([{"instruction": "Say hi", "input": "", "output": "hi"}])
    >>> d.format
    'alpaca'
    >>> to_conversation({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca")
    [{'role': 'user', 'content': 'Say hi', 'weight': 1}, {'role': 'assistant', 'content': 'hi', 'weight': 1}]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ftmagic.data.problems import RecordError
from ftmagic.errors import DataError

# Required and optional canonical fields of each format, in detection priority order.
FIELDS = {
    "messages": (("messages",), ("system",)),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "text": (("text",), ()),
}
FORMAT_NAMES = tuple(FIELDS)

ROLE_ALIASES = {
    "system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
    "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "tool": "tool", "function": "tool",
    "observation": "tool", "ipython": "tool",
}
SAMPLE = 100  # records inspected by detection
# Characters in one record (or one line of a file). The longest example ftmagic trains is
# 2**20 tokens (the `max_seq_len` limit), a few MB of text; longer text cannot be trained
# whole, and tokenizing it would take gigabytes, so it is refused before the tokenizer.
MAX_RECORD_CHARS = 8 * 2**20


@dataclass
class Detection:
    """The chosen format, why, and the column mapping (canonical -> actual) to read it with."""

    format: str
    evidence: str
    columns: dict = field(default_factory=dict)

    def column(self, name: str) -> str:
        return self.columns.get(name, name)


def detect_format(records: Sequence[dict], fmt: str = "auto", columns: Optional[dict] = None,
                  source: str = "data") -> Detection:
    """Pick the format of ``records`` (or check an explicit ``fmt``), with a sentence of evidence.

    Raises :class:`~ftmagic.errors.DataError` when nothing fits, listing the fields found.

    Example::

        detect_format([{"messages": [{"role": "user", "content": "hi"}]}]).evidence
        # '`messages` holds a list of {role, content} in 1 of 1 sampled records'
    """
    columns = dict(columns or {})
    unknown = [k for k in columns if k not in _ALL_FIELDS and k not in ("role", "content")]
    if unknown:
        raise DataError(f"columns: `{unknown[0]}` is not a field ftmagic reads; map one of "
                        f"{', '.join(sorted(_ALL_FIELDS))} to your column names")
    sample = list(records[:SAMPLE])
    if not sample:
        raise DataError(f"{source}: the dataset has no records")
    present = {}
    for name in FORMAT_NAMES:
        required = FIELDS[name][0]
        present[name] = sum(all(_get(r, columns.get(f, f)) is not None for f in required) for r in sample)
    if fmt != "auto":
        if fmt not in FIELDS:
            raise DataError(f"format: `{fmt}` is not known; use one of auto, {', '.join(FORMAT_NAMES)}")
        if present[fmt] == 0:
            raise DataError(_no_fields_message(source, fmt, sample[0], columns))
        return Detection(fmt, f"set by `format: {fmt}`", columns)
    if columns:
        named = [name for name in FORMAT_NAMES if all(f in columns for f in FIELDS[name][0])]
        if len(named) == 1 and present[named[0]]:
            return Detection(named[0], "the `columns` mapping names " + ", ".join(
                f"{k}={v}" for k, v in columns.items()), columns)
    best = max(FORMAT_NAMES, key=lambda n: (present[n], -FORMAT_NAMES.index(n)))
    if present[best] == 0:
        keys = sorted({str(k) for r in sample for k in r})[:12]
        raise DataError(f"{source}: cannot tell the format from the fields ({', '.join(keys) or 'none'}); expected "
                        "messages, conversations, instruction+output, prompt+completion or text; set `columns`, "
                        "e.g. {prompt: question, completion: answer}")
    fields_text = " and ".join(f"`{columns.get(f, f)}`" for f in FIELDS[best][0])
    shape = {"messages": " holds a list of {role, content}", "sharegpt": " holds a list of {from, value}"}.get(best, "")
    evidence = f"{fields_text}{shape} in {present[best]} of {len(sample)} sampled records"
    if any(present[n] for n in FORMAT_NAMES if n != best):
        others = ", ".join(f"{n} {present[n]}" for n in FORMAT_NAMES if n != best and present[n])
        evidence += f" (also matched: {others})"
    return Detection(best, evidence, columns)


def to_conversation(record: dict, fmt: str, columns: Optional[dict] = None,
                    system_prompt: Optional[str] = None) -> list:
    """One record as a conversation ``[{"role", "content", "weight"}, ...]``.

    Raises :class:`~ftmagic.data.problems.RecordError` (kind + message) for a record that cannot be used.

    Example::

        to_conversation({"prompt": "2+2=", "completion": "4"}, "prompt_completion")
        # [{'role': 'user', 'content': '2+2=', 'weight': 1}, {'role': 'assistant', 'content': '4', 'weight': 1}]
    """
    columns = columns or {}
    col = columns.get
    if fmt == "text":
        text = _text(record, col("text", "text"), required=True)
        return [{"role": "text", "content": text, "weight": 1}]
    system = _text(record, col("system", "system"), required=False) or None
    if fmt == "alpaca":
        instruction = _text(record, col("instruction", "instruction"), required=True)
        extra = _text(record, col("input", "input"), required=False)
        output = _text(record, col("output", "output"), required=True)
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        turns = [_turn("user", user), _turn("assistant", output)]
    elif fmt == "prompt_completion":
        turns = _as_turns(record, col("prompt", "prompt"), "user") + _as_turns(record, col("completion", "completion"), "assistant")
    elif fmt in ("messages", "sharegpt"):
        name = col(fmt if fmt == "messages" else "conversations", "messages" if fmt == "messages" else "conversations")
        turns = _message_list(record, name, columns)
    else:
        raise DataError(f"format: `{fmt}` is not known; use one of {', '.join(FORMAT_NAMES)}")
    if system and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, _turn("system", system))
    if system_prompt and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, _turn("system", system_prompt))
    if not any(t["role"] == "assistant" for t in turns):
        raise RecordError("no_assistant", "the conversation has no assistant turn to train on")
    return turns


def conversation_issues(turns: list) -> list:
    """Soft problems of a usable conversation: ``[(kind, message)]`` for role order and the final turn.

    Example::

        conversation_issues([{"role": "assistant", "content": "hi", "weight": 1}])
        # [('role_order', 'turn 1 is `assistant` but the first turn after the system prompt should be `user`')]
    """
    if turns and turns[0]["role"] == "text":
        return []
    issues = []
    previous = None
    for i, turn in enumerate(turns):
        role = turn["role"]
        if role == "system":
            if i != 0:
                issues.append(("role_order", f"turn {i + 1} is `system`; a system prompt must come first"))
                break
        elif previous in (None, "system") and role != "user":
            issues.append(("role_order", f"turn {i + 1} is `{role}` but the first turn after the system prompt should be `user`"))
            break
        elif role == previous and role in ("user", "assistant"):
            issues.append(("role_order", f"turns {i} and {i + 1} are both `{role}`; user and assistant should alternate"))
            break
        previous = role
    if turns and turns[-1]["role"] != "assistant":
        issues.append(("no_final_assistant", f"the last turn is `{turns[-1]['role']}`, not `assistant`; it is not trained"))
    return issues


# --------------------------------------------------------------------------- helpers

_ALL_FIELDS = {f for required, optional in FIELDS.values() for f in (*required, *optional)}


def _no_fields_message(source: str, fmt: str, first: dict, columns: dict) -> str:
    needed = " and ".join(f"`{columns.get(f, f)}`" for f in FIELDS[fmt][0])
    keys = ", ".join(sorted(str(k) for k in first)[:12]) or "none"
    return (f"{source}: `format: {fmt}` needs {needed} but no sampled record has them (fields: {keys}); "
            "map your columns with `columns`, e.g. {instruction: question, output: answer}")


def _get(record: dict, name: str) -> Any:
    value = record.get(name) if isinstance(record, dict) else None
    return value


def _text(record: dict, name: str, required: bool) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise RecordError("missing_field", f"field `{name}` is missing")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # Never silently str(): 3 would train as "3" and a NaN cell as the word "nan".
        shown = repr(value) if len(repr(value)) <= 24 else f"a {len(str(abs(int(value))))}-digit number"
        raise RecordError("bad_type", f"field `{name}` is a number ({shown}), expected text; write it in quotes")
    if not isinstance(value, str):
        raise RecordError("bad_type", f"field `{name}` is a {type(value).__name__}, expected text")
    if len(value) > MAX_RECORD_CHARS:
        raise RecordError("oversized", f"field `{name}` has {len(value):,} characters, over the limit of "
                                       f"{MAX_RECORD_CHARS:,} for one record; split it")
    if required and (not value or value.isspace()):
        raise RecordError("empty_field", f"field `{name}` is empty")
    return value


def _turn(role: str, content: str, weight: int = 1) -> dict:
    return {"role": role, "content": content, "weight": weight}


def _as_turns(record: dict, name: str, role: str) -> list:
    value = record.get(name)
    if isinstance(value, list):  # conversational prompt/completion (TRL style)
        return parse_messages(value, name, {})
    return [_turn(role, _text(record, name, required=True))]


def _message_list(record: dict, name: str, columns: dict) -> list:
    value = record.get(name)
    if value is None:
        raise RecordError("missing_field", f"field `{name}` is missing")
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError("bad_type", f"field `{name}` is text that is not a JSON list of messages") from None
    if not isinstance(value, list):
        raise RecordError("bad_type", f"field `{name}` is a {type(value).__name__}, expected a list of messages")
    if not value:
        raise RecordError("empty_field", f"field `{name}` is an empty list")
    return parse_messages(value, name, columns)


def parse_messages(items: list, name: str = "messages", columns: Optional[dict] = None) -> list:
    """A list of ``{role|from, content|value, weight?}`` as conversation turns (RecordError if malformed).

    Example::

        >>> parse_messages([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo", "weight": 0}])
        [{'role': 'user', 'content': 'hi', 'weight': 1}, {'role': 'assistant', 'content': 'yo', 'weight': 0}]
    """
    columns = columns or {}
    role_keys = tuple(k for k in (columns.get("role"), "role", "from") if k)
    content_keys = tuple(k for k in (columns.get("content"), "content", "value") if k)
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecordError("bad_type", f"`{name}[{i}]` is a {type(item).__name__}, expected {{role, content}}")
        raw_role = _first(item, role_keys)
        if raw_role is None:
            raise RecordError("missing_field", f"`{name}[{i}]` has no `role` (or `from`)")
        role = ROLE_ALIASES.get(raw_role) or ROLE_ALIASES.get(str(raw_role).strip().lower())
        if role is None:
            raise RecordError("bad_type", f"`{name}[{i}]` has role `{raw_role}`; use system, user or assistant")
        content = _first(item, content_keys)
        if content is None:
            raise RecordError("missing_field", f"`{name}[{i}]` has no `content` (or `value`)")
        if not isinstance(content, str):
            raise RecordError("bad_type", f"`{name}[{i}].content` is a {type(content).__name__}, expected text")
        if len(content) > MAX_RECORD_CHARS:
            raise RecordError("oversized", f"`{name}[{i}].content` has {len(content):,} characters, over the limit of "
                                           f"{MAX_RECORD_CHARS:,} for one record; split it")
        if (not content or content.isspace()) and role in ("user", "assistant"):
            raise RecordError("empty_field", f"`{name}[{i}]` ({role}) has empty content")
        weight = item.get("weight", 1)
        if weight != 1 and weight != 0:
            raise RecordError("bad_type", f"`{name}[{i}].weight` is {weight!r}; use 0 (not trained) or 1")
        turns.append({"role": role, "content": content, "weight": int(weight)})
    return turns


def _first(item: dict, keys: tuple):
    for key in keys:
        value = item.get(key)
        if value is not None:
            return value
    return None

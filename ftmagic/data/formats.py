"""Recognise a dataset's format, with the evidence, and turn each record into a conversation.

Formats (the ``format`` config key):

=================== ==============================================================
``alpaca``          ``instruction``, optional ``input``, ``output`` (optional ``system``)
``sharegpt``        ``conversations``: list of ``{"from": "human"|"gpt"|"system", "value"}``
``messages``        ``messages``: OpenAI style ``{"role", "content"}``, optional ``weight`` 0/1
``prompt_completion`` ``prompt`` and ``completion`` (strings, or lists of messages)
``text``            ``text``: plain text, every token trained (continual pre-training)
``preference``      ``chosen`` and ``rejected`` (strings or lists of messages), optional
                    ``prompt``; without a prompt, two full conversations whose shared
                    opening turns are the prompt (UltraFeedback style)
``classification``  ``text`` and ``label`` (a string or a whole number)
=================== ==============================================================

Each format holds one kind of record (:data:`FORMAT_KINDS`): conversations for
supervised fine-tuning, preference pairs (DPO, ORPO, reward models) or labelled texts
(classification). The objective says which kind a run trains on, and detection only
considers formats of that kind.

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
from ftmagic.errors import DataError, a_type, did_you_mean, not_accepted

# Required and optional canonical fields of each format, in detection priority order.
FIELDS = {
    "messages": (("messages",), ("system",)),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "preference": (("chosen", "rejected"), ("prompt", "system")),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "classification": (("text", "label"), ()),
    "text": (("text",), ()),
}
FORMAT_NAMES = tuple(FIELDS)
# The kind of record each format holds (the objective table's `data` names these kinds).
FORMAT_KINDS = {name: "conversations" for name in FORMAT_NAMES}
FORMAT_KINDS.update(preference="preference", classification="classification")


def format_kind(fmt: str) -> str:
    """``conversations``, ``preference`` or ``classification``: what records of ``fmt`` hold.

    Example::

        >>> format_kind("messages"), format_kind("preference")
        ('conversations', 'preference')
    """
    return FORMAT_KINDS.get(fmt, "conversations")

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
                  source: str = "data", kind: Optional[str] = None) -> Detection:
    """Pick the format of ``records`` (or check an explicit ``fmt``), with a sentence of evidence.

    ``kind`` (``conversations``, ``preference``, ``classification``) limits detection to
    the formats of that kind (the objective's data); None considers every format.
    Raises :class:`~ftmagic.errors.DataError` when nothing fits, listing the fields found.

    Example::

        detect_format([{"messages": [{"role": "user", "content": "hi"}]}]).evidence
        # '`messages` holds a list of {role, content} in 1 of 1 sampled records'
    """
    columns = dict(columns or {})
    unknown = [k for k in columns if k not in _ALL_FIELDS and k not in ("role", "content")]
    if unknown:
        raise DataError(f"columns: `{unknown[0]}` is not a field ftmagic reads; map one of "
                        f"{', '.join(sorted(_ALL_FIELDS))} to your column names"
                        + did_you_mean(unknown[0], sorted(_ALL_FIELDS)))
    sample = list(records[:SAMPLE])
    if not sample:
        raise DataError(f"{source}: the dataset has no records")
    _check_mapped_columns(columns, records, source)
    names = [n for n in FORMAT_NAMES if kind is None or FORMAT_KINDS[n] == kind]
    present = {}
    for name in FORMAT_NAMES:
        required = FIELDS[name][0]
        present[name] = sum(all(_get(r, columns.get(f, f)) is not None for f in required) for r in sample)
    if fmt != "auto":
        if fmt not in FIELDS:
            raise not_accepted("format", fmt, ("auto", *FORMAT_NAMES), error=DataError)
        if kind is not None and FORMAT_KINDS[fmt] != kind:
            raise DataError(f"{source}: `format: {fmt}` holds {FORMAT_KINDS[fmt]} records; this objective trains on "
                            f"{kind} records ({', '.join(names)})")
        if present[fmt] == 0:
            fits = [n for n in names if present[n] and n != fmt]
            raise DataError(_no_fields_message(source, fmt, sample[0], columns, fits))
        return Detection(fmt, f"set by `format: {fmt}`", columns)
    if columns:
        named = [name for name in names if all(f in columns for f in FIELDS[name][0])]
        if len(named) == 1 and present[named[0]]:
            return Detection(named[0], "the `columns` mapping names " + ", ".join(
                f"{k}={v}" for k, v in columns.items()), columns)
    best = max(names, key=lambda n: (present[n], -FORMAT_NAMES.index(n)))
    if present[best] == 0:
        keys = sorted({str(k) for r in sample for k in r})[:12]
        raise DataError(f"{source}: cannot tell the format from the fields ({', '.join(keys) or 'none'}); expected "
                        f"{_EXPECTED.get(kind, _EXPECTED[None])}; set `columns`, e.g. {_EXAMPLE.get(kind, _EXAMPLE[None])}")
    fields_text = " and ".join(f"`{columns.get(f, f)}`" for f in FIELDS[best][0])
    shape = {"messages": " holds a list of {role, content}", "sharegpt": " holds a list of {from, value}"}.get(best, "")
    evidence = f"{fields_text}{shape} in {present[best]} of {len(sample)} sampled records"
    if any(present[n] for n in names if n != best):
        others = ", ".join(f"{n} {present[n]}" for n in names if n != best and present[n])
        evidence += f" (also matched: {others})"
    return Detection(best, evidence, columns)


def _check_mapped_columns(columns: dict, records: Sequence[dict], source: str) -> None:
    """Refuse a ``columns`` entry that names a column no record has (a typo would otherwise read
    as "cannot tell the format", or be ignored where another format fits).

    Example::

        >>> _check_mapped_columns({"prompt": "quest"}, [{"question": "q", "answer": "a"}], "qa.jsonl")
        Traceback (most recent call last):
        ftmagic.errors.DataError: qa.jsonl: `columns` maps `prompt` to `quest`, a column no record has; the records have answer, question; did you mean `question`?
    """
    keys = sorted({str(k) for r in records[:SAMPLE] if isinstance(r, dict) for k in r})
    for field_name, column in columns.items():
        if field_name in ("role", "content") or not isinstance(column, str):
            continue  # keys inside each message, not columns of the record
        # The sample's columns first; an optional column may appear only in later records.
        if column not in keys and not any(isinstance(r, dict) and column in r for r in records[SAMPLE:]):
            raise DataError(f"{source}: `columns` maps `{field_name}` to `{column}`, a column no record has; the "
                            f"records have {', '.join(keys[:12]) or 'no fields'}" + did_you_mean(column, keys))


_EXPECTED = {
    None: "messages, conversations, instruction+output, chosen+rejected, prompt+completion, text+label or text",
    "conversations": "messages, conversations, instruction+output, prompt+completion or text",
    "preference": "chosen and rejected (with or without a prompt)",
    "classification": "text and label",
}
_EXAMPLE = {None: "{prompt: question, completion: answer}", "conversations": "{prompt: question, completion: answer}",
            "preference": "{chosen: good, rejected: bad}", "classification": "{text: review, label: sentiment}"}


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
        raise not_accepted("format", fmt, FORMAT_NAMES, error=DataError)
    if system and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, _turn("system", system))
    if system_prompt and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, _turn("system", system_prompt))
    if not any(t["role"] == "assistant" for t in turns):
        raise RecordError("no_assistant", "the conversation has no assistant turn to train on")
    return turns


@dataclass
class PreferencePair:
    """A preference record: the shared ``prompt`` turns and each side's completion turns.

    Assistant turns inside the prompt carry weight 0 (context, never trained); the
    completions' assistant turns carry weight 1.
    """

    prompt: list
    chosen: list
    rejected: list

    def conversation(self, side: str) -> list:
        """The prompt followed by one side's completion (``side`` is ``chosen`` or ``rejected``)."""
        return self.prompt + getattr(self, side)

    @property
    def identical(self) -> bool:
        return [(t["role"], t["content"]) for t in self.chosen] == [(t["role"], t["content"]) for t in self.rejected]


def to_preference(record: dict, columns: Optional[dict] = None, system_prompt: Optional[str] = None) -> PreferencePair:
    """One preference record as a :class:`PreferencePair` (RecordError for a record that cannot be used).

    Accepted shapes: ``prompt``/``chosen``/``rejected`` as strings or as lists of messages
    (TRL's conversational preference format), or ``chosen``/``rejected`` as full
    conversations whose shared opening turns are the prompt (UltraFeedback style).

    Example::

        >>> pair = to_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
        >>> pair.prompt[0]["content"], pair.chosen[0]["content"], pair.rejected[0]["content"]
        ('2+2?', '4', '5')
    """
    columns = columns or {}
    col = columns.get
    names = {side: col(side, side) for side in ("prompt", "chosen", "rejected")}
    for side in ("chosen", "rejected"):
        if record.get(names[side]) is None:
            raise RecordError("missing_field", _absent(record, names[side]))
    if record.get(names["prompt"]) is None:
        chosen, rejected = (record[names[s]] for s in ("chosen", "rejected"))
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise RecordError("missing_field", f"{_absent(record, names['prompt'])}: `{names['chosen']}` and "
                                               f"`{names['rejected']}` are texts, so the prompt must be given (or "
                                               "give both as full conversations, lists of messages)")
        chosen, rejected = _message_list(record, names["chosen"], columns), _message_list(record, names["rejected"], columns)
        shared = 0
        while (shared < min(len(chosen), len(rejected))
               and (chosen[shared]["role"], chosen[shared]["content"]) == (rejected[shared]["role"], rejected[shared]["content"])):
            shared += 1
        # The completions start at the first assistant turn after what both sides share.
        while shared > 0 and shared < len(chosen) and chosen[shared]["role"] != "assistant":
            shared -= 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt = _as_turns(record, names["prompt"], "user")
        chosen = _as_turns(record, names["chosen"], "assistant")
        rejected = _as_turns(record, names["rejected"], "assistant")
    system = _text(record, col("system", "system"), required=False) or system_prompt
    if system and not (prompt and prompt[0]["role"] == "system"):
        prompt.insert(0, _turn("system", system))
    prompt = [dict(t, weight=0) if t["role"] == "assistant" else t for t in prompt]
    for side, turns in (("chosen", chosen), ("rejected", rejected)):
        if not any(t["role"] == "assistant" for t in turns):
            what = "is the same as the other side's" if not turns else "has no assistant turn"
            raise RecordError("empty_field" if not turns else "no_assistant",
                              f"the {side} completion {what}; there is nothing to compare")
    return PreferencePair(prompt, chosen, rejected)


def to_labelled(record: dict, columns: Optional[dict] = None) -> tuple:
    """``(text, label)`` of a classification record; the label is a string or a whole number.

    Example::

        >>> to_labelled({"text": "great film", "label": "pos"}), to_labelled({"review": "dull", "y": 0}, {"text": "review", "label": "y"})
        (('great film', 'pos'), ('dull', 0))
    """
    columns = columns or {}
    text = _text(record, columns.get("text", "text"), required=True)
    name = columns.get("label", "label")
    label = record.get(name)
    if label is None:
        raise RecordError("missing_field", _absent(record, name))
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RecordError("bad_type", f"field `{name}` is {label!r}; a label is a name or a whole number")
    if isinstance(label, str) and not label.strip():
        raise RecordError("empty_field", f"field `{name}` is empty")
    return text, label


def comparable_turns(item, fmt: str) -> list:
    """What duplicate checks compare for a converted record of any kind, as ``{"role", "content"}`` turns.

    ``item`` is what the format's converter gave (a conversation, a :class:`PreferencePair`
    or a ``(text, label)`` pair).
    """
    kind = format_kind(fmt)
    if kind == "preference":
        return item.prompt + [dict(t, role="chosen:" + t["role"]) for t in item.chosen] + \
            [dict(t, role="rejected:" + t["role"]) for t in item.rejected]
    if kind == "classification":
        return [{"role": "text", "content": item[0]}, {"role": "label", "content": str(item[1])}]
    return item


def convert_record(record: dict, fmt: str, columns: Optional[dict] = None, system_prompt: Optional[str] = None):
    """The converter of ``fmt``'s kind: a conversation, a :class:`PreferencePair` or ``(text, label)``."""
    kind = format_kind(fmt)
    if kind == "preference":
        return to_preference(record, columns, system_prompt)
    if kind == "classification":
        return to_labelled(record, columns)
    return to_conversation(record, fmt, columns, system_prompt)


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


def _no_fields_message(source: str, fmt: str, first: dict, columns: dict, fits: tuple = ()) -> str:
    """Why ``format: fmt`` reads nothing here: the fields it needs, those there are, the formats the records
    do fit (``fits``), and a `columns` mapping for ``fmt``'s own fields (not another format's).

    Example::

        >>> _no_fields_message("d.jsonl", "text", {"instruction": "q", "output": "a"}, {}, ["alpaca"])
        'd.jsonl: `format: text` needs `text` but no sampled record has them (fields: instruction, output); \
they fit `format: alpaca` (or `auto`); or map your columns with `columns`, e.g. {text: COLUMN}'
    """
    needed = " and ".join(f"`{columns.get(f, f)}`" for f in FIELDS[fmt][0])
    keys = [str(k) for k in first] if isinstance(first, dict) else []
    shown = ", ".join(sorted(keys)[:12]) or "none"
    fit = (f"they fit `format: {fits[0]}` (or `auto`); or " if fits else "")
    # The example maps this format's own fields: to the record's column names when the records fit no
    # format (so a mapping is what they need), else to a placeholder.
    own = [] if fits else keys
    example = ", ".join(f"{field}: {own[i] if i < len(own) else 'COLUMN'}" for i, field in enumerate(FIELDS[fmt][0]))
    return (f"{source}: `format: {fmt}` needs {needed} but no sampled record has them (fields: {shown}); "
            f"{fit}map your columns with `columns`, e.g. {{{example}}}")


def _get(record: dict, name: str) -> Any:
    value = record.get(name) if isinstance(record, dict) else None
    return value


def _absent(record: dict, name: str) -> str:
    """Why a required field has no value: not there at all, or there and null (JSON ``null``, an empty
    Parquet or DataFrame cell), which a user looking for the key would not call missing.

    Example::

        >>> _absent({"text": None}, "text"), _absent({}, "text")
        ('field `text` is null', 'field `text` is missing')
    """
    return f"field `{name}` is null" if isinstance(record, dict) and name in record else f"field `{name}` is missing"


def _text(record: dict, name: str, required: bool) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise RecordError("missing_field", _absent(record, name))
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # Never silently str(): 3 would train as "3" and a NaN cell as the word "nan".
        shown = repr(value) if len(repr(value)) <= 24 else f"a {len(str(abs(int(value))))}-digit number"
        raise RecordError("bad_type", f"field `{name}` is a number ({shown}), expected text; write it in quotes",
                          # Quotes are for JSON text; a table's column has a type: it must be a string column.
                          table_message=f"field `{name}` is a number ({shown}), expected text; the `{name}` column "
                                        "must hold strings, not numbers")
    if not isinstance(value, str):
        raise RecordError("bad_type", f"field `{name}` is {a_type(value)}, expected text")
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
        raise RecordError("missing_field", _absent(record, name))
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError("bad_type", f"field `{name}` is text that is not a JSON list of messages") from None
    if not isinstance(value, list):
        raise RecordError("bad_type", f"field `{name}` is {a_type(value)}, expected a list of messages")
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
            raise RecordError("bad_type", f"`{name}[{i}]` is {a_type(item)}, expected {{role, content}}")
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
            raise RecordError("bad_type", f"`{name}[{i}].content` is {a_type(content)}, expected text")
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

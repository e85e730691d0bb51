"""Prompts with reference answers for evaluation by generation (``eval_prompts``).

A record of any training format becomes an :class:`EvalPrompt`: the conversation up to its
last assistant turn is the prompt, that turn is the reference. ``eval_prompts`` may be a
file or dataset (read like ``data``), records from the notebook (``$name``), plain prompt
strings (shown in the table, not scored), or a number N of records held out from ``data``
(:func:`ftmagic.data.prepare_data` does that); unset, the validation split is used.

Example::

    >>> from ftmagic.data.eval_prompts import eval_prompts_from
    >>> p = eval_prompts_from([{"prompt": "reverse: ab", "completion": "ba"}])[0]
    >>> p.text, p.reference
    ('reverse: ab', 'ba')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ftmagic.errors import DataError


@dataclass(frozen=True)
class EvalPrompt:
    """A conversation to answer (``messages``: role and content) and the answer expected (or None)."""

    messages: tuple
    reference: Optional[str] = None

    @property
    def text(self) -> str:
        """The last user message: what a table shows as the prompt."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else self.messages[-1]["content"]

    def to_dict(self) -> dict:
        return {"prompt": self.text, "reference": self.reference}


def from_conversation(conversation: list, where: str = "record") -> EvalPrompt:
    """The prompt (turns before the last assistant turn) and its reference (that turn).

    Example::

        >>> from_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]).reference
        'hello'
    """
    turns = [{"role": t["role"], "content": t["content"]} for t in conversation]
    if any(t["role"] == "text" for t in turns):
        raise DataError(f"{where}: plain `text` records have no answer to compare with; eval_prompts need "
                        "prompt/answer records (messages, alpaca, prompt/completion)")
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        return EvalPrompt(tuple(turns), None)
    if last == 0:
        raise DataError(f"{where}: the conversation starts with the answer; there is no prompt to generate from")
    return EvalPrompt(tuple(turns[:last]), turns[last]["content"])


def eval_prompts_from(value: Any, *, fmt: str = "auto", columns: Optional[dict] = None,
                      system_prompt: Optional[str] = None, key: str = "eval_prompts") -> list:
    """:class:`EvalPrompt` list from a path, a dataset, records, or plain strings.

    Raises a one-line DataError naming the record that cannot be used.
    """
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        prompts = []
        for text in value:
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
                [{"role": "user", "content": text}]
            prompts.append(EvalPrompt(tuple(messages), None))
        return prompts
    from ftmagic.data.formats import detect_format, to_conversation
    from ftmagic.data.load import load_data
    from ftmagic.data.problems import RecordError

    try:
        loaded = load_data(value, strict=True, key=key)
    except DataError as exc:
        raise DataError(f"{exc}{_prompt_hint(value, key)}") from None
    if not loaded.records:
        raise DataError(f"`{key}`: {loaded.name} holds no records")
    detection = detect_format(loaded.records, fmt, columns, source=loaded.name)
    prompts = []
    for i, record in enumerate(loaded.records):
        where = loaded.location(i) if loaded.name != "data" else f"{key}[{i}]"
        try:
            conversation = to_conversation(record, detection.format, detection.columns, system_prompt)
        except RecordError as exc:
            raise DataError(f"{where}: {exc.message_for(loaded.unit)}") from None
        prompts.append(from_conversation(conversation, where))
    return prompts


def _prompt_hint(value: Any, key: str) -> str:
    """For a string that is no file: how to give it as a prompt instead (a list of strings).

    ``evaluate("reverse: lamp")`` reads its string as a data file, like ``eval_prompts:``
    does; a user who meant a prompt is told so. A name with a data file's extension was
    meant as a file (a data file's extension, a folder in it) gets no hint.

    Example::

        >>> _prompt_hint("reverse: lamp", "prompts")
        '; `prompts` reads a string as a data file path (or dataset id); give prompts as a list, e.g. evaluate(["reverse: lamp"])'
        >>> _prompt_hint("test.jsonl", "eval_prompts")
        ''
    """
    import json
    import os

    from ftmagic.data.load import EXTENSIONS

    if not isinstance(value, str) or os.path.exists(os.path.expanduser(value)) or "/" in value or os.sep in value \
            or value.startswith((".", "~")) or os.path.splitext(value)[1].lower() in EXTENSIONS:
        return ""
    example = json.dumps([value], ensure_ascii=False)
    example = f"evaluate({example})" if key == "prompts" else f"{key}: {example}"
    return (f"; `{key}` reads a string as a data file path (or dataset id); give prompts as a list, "
            f"e.g. {example}")

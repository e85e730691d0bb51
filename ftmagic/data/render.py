"""Render conversations to text and mark which characters are trained.

Assistant answers are located by incremental prefix rendering, which works with any chat
template: the answer of turn ``i`` is what ``render(messages[:i + 1])`` adds after
``render(messages[:i], add_generation_prompt=True)``. When a template is not
prefix-consistent (it rewrites earlier turns, e.g. strips reasoning from history), the
answer is found by searching its text in the full rendering instead.

Each answer is trained up to and including the token that ends it (what teaches a model to
stop): EOS, or the family's own end-of-turn token where the template writes one (Gemma's
``<end_of_turn>``, Phi-3's ``<|end|>``, ChatML's ``<|im_end|>``; see
:func:`~ftmagic.data.portable.end_of_turn`); if the template writes neither, EOS is
appended after the answer. What follows in the turn (a newline before the next header) is
not trained.

Example::

    r = render_conversations(tok, resolve_template(tok), [[
        {"role": "user", "content": "hi", "weight": 1},
        {"role": "assistant", "content": "hello", "weight": 1}]])[0]
    r.segments
    # [('<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n', False), ('hello<|im_end|>', True), ('\\n', False)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ftmagic.data.problems import RecordError
from ftmagic.data.portable import end_of_turn
from ftmagic.data.templates import ChatTemplate, adds_bos, plain_messages, render_many


@dataclass
class Rendered:
    """A rendered example as consecutive ``(text, trained)`` segments."""

    segments: list
    method: str  # "prefix", "search" or "text"
    eos_added: bool = False  # the template did not end an answer with EOS; it was appended
    no_eos: bool = False  # the tokenizer has no EOS token, so answers cannot end with one
    warnings: list = field(default_factory=list)  # (kind, message) that do not stop training
    bos_id: Optional[int] = None  # put in front of the tokens (plain text with a BOS-adding tokenizer)

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)


def render_conversations(tokenizer, tpl: ChatTemplate, conversations: list, train_on: str = "completions") -> list:
    """Render many conversations; each result is a :class:`Rendered` or a :class:`RecordError`.

    ``train_on="all"`` trains every segment; otherwise assistant answers with weight 1.
    Plain ``text`` records are not templated: the text plus EOS, trained, with the BOS id
    the tokenizer would add put in front (as an id, so the text tokenizes as it does alone).
    """
    eos = getattr(tokenizer, "eos_token", None) or None
    results: list = [None] * len(conversations)
    turn_end = None
    chat_ids = []
    for n, conv in enumerate(conversations):
        if conv and conv[0]["role"] == "text":
            bos_id = tokenizer.bos_token_id if adds_bos(tokenizer) else None
            results[n] = _render_text(conv[0]["content"], eos, bos_id)
        else:
            chat_ids.append(n)
    if not chat_ids:
        return results
    turn_end = end_of_turn(tokenizer, tpl)

    # One batched render per kind of prefix: full conversations, prompts, and ends of earlier answers.
    plain = {n: plain_messages(conversations[n]) for n in chat_ids}  # copied once, sliced for prefixes
    fulls = render_many(tokenizer, tpl, [plain[n] for n in chat_ids], add_generation_prompt=False, plain=True)
    prompt_keys, prompt_convs, end_keys, end_convs = [], [], [], []
    for n in chat_ids:
        conv = conversations[n]
        last = len(conv) - 1
        for i, turn in enumerate(conv):
            if turn["role"] != "assistant":
                continue
            if i > 0:
                prompt_keys.append((n, i))
                prompt_convs.append(plain[n][:i])
            if i < last:
                end_keys.append((n, i))
                end_convs.append(plain[n][:i + 1])
    prompts = dict(zip(prompt_keys, render_many(tokenizer, tpl, prompt_convs, add_generation_prompt=True, plain=True)))
    ends = dict(zip(end_keys, render_many(tokenizer, tpl, end_convs, add_generation_prompt=False, plain=True)))

    for n, full in zip(chat_ids, fulls):
        conv = conversations[n]
        if isinstance(full, Exception):
            results[n] = RecordError("template_error", f"the chat template rejects this conversation ({_line(full)})")
            continue
        bounds = []
        for i, turn in enumerate(conv):
            if turn["role"] == "assistant":
                prompt = prompts.get((n, i), "")
                end = ends.get((n, i), full)
                bounds.append((i, prompt, end))
        # A template may refuse a partial conversation (e.g. one ending with a user turn): then
        # the answers are found in the full rendering instead.
        failed = any(isinstance(x, Exception) for _, p, e in bounds for x in (p, e))
        rendered = None if failed else _by_prefix(full, conv, bounds, eos, train_on, turn_end)
        if rendered is None:
            prompts_ok = {i: p for i, p, _ in bounds if isinstance(p, str)}
            rendered = _by_search(full, conv, prompts_ok, eos, train_on, turn_end)
        if isinstance(rendered, Rendered):
            rendered.warnings.extend(_dropped_system(full, conv))
        results[n] = rendered
    return results


# --------------------------------------------------------------------------- strategies


def _render_text(content: str, eos: Optional[str], bos_id: Optional[int]) -> Rendered:
    return Rendered([(content + (eos or ""), True)], "text", no_eos=eos is None, bos_id=bos_id)


def _by_prefix(full: str, conv: list, bounds: list, eos: Optional[str], train_on: str,
               turn_end: Optional[str] = None) -> Optional[Rendered]:
    """Segments from prefix renderings, or None when the template is not prefix-consistent here."""
    segments, pos, added = [], 0, False
    for i, prompt, end in bounds:
        if not (pos <= len(prompt) <= len(end) and full.startswith(prompt) and full.startswith(end)):
            return None
        if len(end) == len(prompt):
            return None  # the answer vanished from the rendering
        segments.append((full[pos:len(prompt)], False))
        answer, rest, was_added = _close_answer(full[len(prompt):len(end)], eos, turn_end)
        added |= was_added
        segments.append((answer, train_on == "all" or conv[i]["weight"] > 0))
        segments.append((rest, False))
        pos = len(end)
    segments.append((full[pos:], False))
    return _finish(segments, "prefix", added, eos, train_on)


def _by_search(full: str, conv: list, prompts: dict, eos: Optional[str], train_on: str,
               turn_end: Optional[str] = None):
    """Find each answer's text in the full rendering, in order; EOS (or the end-of-turn token) right after it is part of it.

    The search for answer ``i`` starts after its prompt rendering when that one is a prefix
    of the full text, else after the previous turn's text, so an answer is not matched
    inside an earlier turn or a template marker.
    """
    segments, pos, added = [], 0, False
    for i, turn in enumerate(conv):
        needle = turn["content"].strip()
        if turn["role"] != "assistant":
            found = full.find(needle, pos) if needle else -1
            if found >= 0:
                segments.append((full[pos:found + len(needle)], False))
                pos = found + len(needle)
            continue
        prompt = prompts.get(i, "")
        if prompt and len(prompt) >= pos and full.startswith(prompt):
            segments.append((full[pos:len(prompt)], False))
            pos = len(prompt)
        # An answer directly followed by its closing token is the likeliest match (a short
        # answer like "a" also occurs inside the role header that precedes it).
        marks = [m for m in (turn_end, eos) if m]
        start = next((found for found in (full.find(needle + m, pos) for m in marks) if found >= 0), -1)
        if start < 0:
            start = full.find(needle, pos)
        if start < 0:
            return RecordError("template_error", "the chat template drops or rewrites an assistant answer, so its "
                                                 "tokens cannot be located")
        stop = start + len(needle)
        segments.append((full[pos:start], False))
        closing = next((m for m in marks if full.startswith(m, stop)), None)
        if closing:
            answer, stop = full[start:stop + len(closing)], stop + len(closing)
        else:
            answer, added = full[start:stop] + (eos or ""), added or bool(eos)
        segments.append((answer, train_on == "all" or turn["weight"] > 0))
        pos = stop
    segments.append((full[pos:], False))
    return _finish(segments, "search", added, eos, train_on)


def _close_answer(tail: str, eos: Optional[str], turn_end: Optional[str] = None) -> tuple:
    """Split an answer's turn into (answer up to and including its closing token, the rest); append EOS if none.

    The closing token is the end-of-turn token or EOS, whichever the template writes first
    after the answer (Phi-3 closes the last turn with ``<|end|>`` and then EOS: ``<|end|>`` ends it).
    """
    cuts = [tail.rfind(m) + len(m) for m in (turn_end, eos) if m and m in tail]
    if cuts:
        cut = min(cuts)
        return tail[:cut], tail[cut:], False
    if not eos:
        return tail, "", False
    answer = tail.rstrip()
    return answer + eos, tail[len(answer):], True


def _finish(segments: list, method: str, added: bool, eos: Optional[str], train_on: str) -> Rendered:
    if train_on == "all":
        segments = [(text, True) for text, _ in segments]
    segments = [(text, trained) for text, trained in segments if text]
    return Rendered(segments, method, eos_added=added, no_eos=eos is None)


def _dropped_system(full: str, conv: list) -> list:
    if conv and conv[0]["role"] == "system" and conv[0]["content"].strip() and conv[0]["content"].strip() not in full:
        return [("system_dropped", "the chat template leaves out the system prompt")]
    return []


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

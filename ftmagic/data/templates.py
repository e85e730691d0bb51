"""Chat templates: the tokenizer's own, or a named one for base models that have none.

Named templates (``template:`` config key): ``chatml``, ``alpaca``, ``llama3``, ``plain``.
A Jinja string is accepted too. They are ordinary Jinja chat templates rendered by
``tokenizer.apply_chat_template``, so every template goes through the same code path.
They do not write EOS themselves: the encoder appends the tokenizer's EOS to each answer
whenever a template leaves it out (see :mod:`ftmagic.data.render`).

Example::

    tpl = resolve_template(tokenizer)                 # the tokenizer's template, or chatml
    tpl = resolve_template(tokenizer, "alpaca")
    render_many(tokenizer, tpl, [[{"role": "user", "content": "hi"}]], add_generation_prompt=True)
    # ['Below is an instruction ... ### Instruction:\\nhi\\n\\n### Response:\\n']
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

from ftmagic.errors import not_accepted

_ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

# Written on one line per statement: the renderer keeps newlines that follow `}}`.
NAMED_TEMPLATES = {
    "chatml": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
        "{% else %}{{ '" + _ALPACA_PREAMBLE + "\\n\\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] != 'system' %}{{ '### ' + message['role'] + ':\\n' + message['content'] + '\\n\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "plain": (
        "{{ bos_token }}"
        "{% for message in messages %}{{ message['content'] + '\\n' }}{% endfor %}"
    ),
}


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template: its name, Jinja source, why it was chosen, and extra render variables."""

    name: str  # "tokenizer", a named template, or "custom"
    source: str
    reason: str
    variables: dict = field(default_factory=dict, compare=False, hash=False)


def resolve_template(tokenizer, template: Optional[str] = None) -> ChatTemplate:
    """Choose the template: ``template`` if given (a name or Jinja), else the tokenizer's, else ``chatml``.

    Example::

        resolve_template(tok).reason          # "the tokenizer's chat template"
        resolve_template(tok, "plain").name   # 'plain'
    """
    named_vars = {"bos_token": tokenizer.bos_token if adds_bos(tokenizer) else ""}
    if template:
        if template in NAMED_TEMPLATES:
            return ChatTemplate(template, NAMED_TEMPLATES[template], f"`template: {template}`", named_vars)
        if "{{" in template or "{%" in template:
            return ChatTemplate("custom", template, "a Jinja template given in `template`")
        raise not_accepted("template", template, list(NAMED_TEMPLATES), also="or a Jinja chat template")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is what chat models use
        own = own.get("default")
    if own:
        return ChatTemplate("tokenizer", own, "the tokenizer's chat template")
    return ChatTemplate("chatml", NAMED_TEMPLATES["chatml"],
                        "the tokenizer has no chat template, so `chatml` is used (set `template:` to choose)", named_vars)


def render_many(tokenizer, tpl: ChatTemplate, conversations: list, add_generation_prompt: bool,
                plain: bool = False) -> list:
    """Render each conversation to text; a conversation the template rejects gives its exception instead.

    Messages are passed as ``{"role", "content"}`` only (``plain=True``: they already are,
    so they are not copied). The text is what
    ``tokenizer.apply_chat_template(..., tokenize=False)`` returns. For speed the compiled
    template is called directly with the same variables, all conversations in one call;
    the first :data:`VERIFIED` conversations of every call are also rendered through
    ``apply_chat_template`` and, should the two ever differ, ``apply_chat_template``
    renders them all.
    """
    if not conversations:
        return []
    chats = conversations if plain else [plain_messages(conv) for conv in conversations]
    out = _render_batch(tokenizer, tpl, chats, add_generation_prompt)
    if out is None:
        out = _render_each(tokenizer, tpl, chats, add_generation_prompt)
    checked = [k for k, text in enumerate(out[:VERIFIED]) if isinstance(text, str)]
    if all(_apply(tokenizer, tpl, chats[k], add_generation_prompt) == out[k] for k in checked):
        return out
    return [_apply(tokenizer, tpl, chat, add_generation_prompt) for chat in chats]


VERIFIED = 2  # conversations per call rendered both ways and compared
_SEPARATOR = "\ue000"  # a private-use character: not whitespace, so no `-%}` of the template strips it


def _render_batch(tokenizer, tpl: ChatTemplate, chats: list, add_generation_prompt: bool):
    """All conversations in one call of the template wrapped in a loop (per-call overhead dominates
    rendering); None when that is not possible, e.g. one conversation raises."""
    compiled = _compiled(tpl.source, batched=True)
    if compiled is None or len(chats) < 2:
        return None
    try:
        text = compiled.render(ftm_batch=chats, **_variables(tokenizer, tpl, add_generation_prompt))
    except Exception:  # noqa: BLE001 - one conversation the template rejects: render one by one
        return None
    parts = text.split(_SEPARATOR)
    if len(parts) != len(chats) + 1 or parts[-1]:
        return None  # a message contained the separator
    return parts[:-1]


def _render_each(tokenizer, tpl: ChatTemplate, chats: list, add_generation_prompt: bool) -> list:
    compiled = _compiled(tpl.source, batched=False)
    if compiled is None:
        return [_apply(tokenizer, tpl, chat, add_generation_prompt) for chat in chats]
    variables = _variables(tokenizer, tpl, add_generation_prompt)
    out = []
    for chat in chats:
        try:
            out.append(compiled.render(messages=chat, **variables))
        except Exception as exc:  # noqa: BLE001 - templates raise anything (TemplateError, TypeError, ...)
            out.append(exc)
    return out


def _variables(tokenizer, tpl: ChatTemplate, add_generation_prompt: bool) -> dict:
    """What apply_chat_template passes to a template: special tokens, then the call's variables."""
    variables = {**dict(getattr(tokenizer, "special_tokens_map", {}) or {}), **tpl.variables}
    variables.update(tools=None, documents=None, add_generation_prompt=add_generation_prompt)
    return variables


def _compiled(source: str, batched: bool):
    """The template compiled the way apply_chat_template compiles it (None if transformers lacks the helper)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover - another transformers layout: apply_chat_template does it all
        return None
    if batched:
        # `+%}` keeps a newline that starts the template; each conversation ends with the separator.
        source = "{% for messages in ftm_batch +%}" + source + _SEPARATOR + "{% endfor %}"
    try:
        return _compile_jinja_template(source)
    except Exception:  # noqa: BLE001 - a template that cannot be wrapped: render one by one
        return None


def plain_messages(conversation: list) -> list:
    """``{"role", "content"}`` copies of a conversation's messages (what templates are given)."""
    return [{"role": m["role"], "content": m["content"]} for m in conversation]


def _apply(tokenizer, tpl: ChatTemplate, chat: list, add_generation_prompt: bool):
    try:
        return tokenizer.apply_chat_template(chat, chat_template=tpl.source, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **tpl.variables)
    except Exception as exc:  # noqa: BLE001
        return exc


_ADDS_BOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts plain text with BOS (Llama, Gemma) — then base-model text starts with it.

    Asked once per tokenizer: calling the tokenizer may change its settings, which must not
    happen while another thread (the previewer's pager) is encoding with it.
    """
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos_id = getattr(tokenizer, "bos_token_id", None)
    answer = False
    if bos_id is not None:
        try:
            ids = tokenizer("a", add_special_tokens=True)["input_ids"]
            answer = bool(ids) and ids[0] == bos_id
        except Exception:  # noqa: BLE001
            answer = False
    try:
        _ADDS_BOS[tokenizer] = answer
    except TypeError:  # not weak-referenceable: ask again next time
        pass
    return answer

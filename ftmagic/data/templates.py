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

from dataclasses import dataclass, field
from typing import Optional

from ftmagic.errors import ConfigError

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
        raise ConfigError(f"`template: {template}` is not known; use one of {', '.join(NAMED_TEMPLATES)} "
                          "or a Jinja chat template")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is what chat models use
        own = own.get("default")
    if own:
        return ChatTemplate("tokenizer", own, "the tokenizer's chat template")
    return ChatTemplate("chatml", NAMED_TEMPLATES["chatml"],
                        "the tokenizer has no chat template, so `chatml` is used (set `template:` to choose)", named_vars)


def render_many(tokenizer, tpl: ChatTemplate, conversations: list, add_generation_prompt: bool) -> list:
    """Render each conversation to text; a conversation the template rejects gives its exception instead.

    Messages are passed as ``{"role", "content"}`` only; one batched call, then one call per
    conversation if the batch fails, so a single bad record does not hide the others.
    """
    if not conversations:
        return []
    chats = [[{"role": m["role"], "content": m["content"]} for m in conv] for conv in conversations]
    kwargs = dict(chat_template=tpl.source, tokenize=False, add_generation_prompt=add_generation_prompt, **tpl.variables)
    try:
        return list(tokenizer.apply_chat_template(chats, **kwargs))
    except Exception:  # noqa: BLE001 - templates raise anything (TemplateError, TypeError, ...)
        pass
    out = []
    for chat in chats:
        try:
            out.append(tokenizer.apply_chat_template(chat, **kwargs))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    return out


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts plain text with BOS (Llama, Gemma) — then base-model text starts with it."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001
        return False
    return bool(ids) and ids[0] == bos_id

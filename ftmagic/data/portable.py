"""What another program needs to prompt a tuned model exactly as training did.

A run's saved tokenizer carries the template that trained the model as its
``chat_template``, and its ``generation_config.json`` lists every token that ends an
answer. Any runtime that reads those two (transformers, vLLM, llama.cpp through the GGUF
metadata, the Hub's widgets) then renders the same prompt text and stops where the model
learned to stop.

* :func:`portable_template` is the Jinja source to save: the training template with the
  values ftmagic passed to it at training time written in (a named template's
  ``bos_token``), and the run's default ``system_prompt`` inserted when a conversation
  has none, so plain ``apply_chat_template`` gives the training text without ftmagic.
* :func:`end_of_turn` finds the special token a template writes right after an answer
  (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), by rendering a probe answer.
* :func:`answer_end_ids` is EOS plus that end-of-turn token: the ``eos_token_id`` list.

Pure Python: it only calls the tokenizer given to it.

Example::

    tpl = resolve_template(tok, "alpaca")
    source = portable_template(tok, tpl, system_prompt="Be brief.")
    tok.apply_chat_template(messages, chat_template=source, tokenize=False, add_generation_prompt=True)
    # == render_prompt(tok, messages, template="alpaca", system_prompt="Be brief.")
    answer_end_ids(tok, resolve_template(tok, "chatml"))   # e.g. [151643, 151645]
"""

from __future__ import annotations

import json
from typing import Optional

from ftmagic.data.templates import ChatTemplate, render_many

# An answer no template rewrites: private-use characters around a plain word.
_PROBE = "\ue001answer\ue001"


def portable_template(tokenizer, tpl: ChatTemplate, system_prompt: Optional[str] = None) -> str:
    """The Jinja source that renders, through plain ``apply_chat_template``, what training rendered.

    Example::

        portable_template(tok, resolve_template(tok, "chatml"))
        # "{%- set bos_token = '' %}{{ bos_token }}{% for message in messages %}..."
    """
    prefix = ""
    # Named templates are rendered with ftmagic's own values (BOS only where the tokenizer
    # adds it); a runtime passes its own, so they are written into the template.
    for name, value in sorted(tpl.variables.items()):
        prefix += "{%- set " + name + " = " + _literal(value) + " %}"
    if system_prompt:
        # Training put the run's system prompt first in every conversation that had none.
        prefix += ("{%- if not messages or messages[0]['role'] != 'system' %}"
                   "{%- set messages = [{'role': 'system', 'content': " + _literal(system_prompt) + "}] + messages %}"
                   "{%- endif %}")
    return prefix + tpl.source


def _literal(value) -> str:
    """A Jinja string literal (JSON's escapes are a subset of what Jinja reads)."""
    return json.dumps("" if value is None else str(value), ensure_ascii=False)


def end_of_turn(tokenizer, tpl: ChatTemplate) -> Optional[str]:
    """The special token the template writes right after an assistant answer, or None.

    Example::

        end_of_turn(tok, resolve_template(tok, "chatml"))   # '<|im_end|>'
        end_of_turn(tok, resolve_template(tok, "alpaca"))   # None (answers end with a blank line)
    """
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    text = render_many(tokenizer, tpl, [conversation], add_generation_prompt=False)[0]
    if isinstance(text, Exception) or _PROBE not in text:
        return None
    after = text[text.rindex(_PROBE) + len(_PROBE):]
    for token in sorted(_single_tokens(tokenizer), key=len, reverse=True):
        if after.startswith(token):
            return token
    return None


def _single_tokens(tokenizer) -> set:
    """Texts that the tokenizer always encodes as one token of their own (its added tokens)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found = {str(getattr(token, "content", token)) for token in decoder.values()}
    found.update(str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or []))
    return {t for t in found if t}


def answer_end_ids(tokenizer, tpl: ChatTemplate) -> list:
    """Every token id that ends an answer: EOS, then the template's end-of-turn token if it differs.

    Example::

        answer_end_ids(tok, resolve_template(tok, "llama3"))   # [eos id, <|eot_id|> id]
    """
    ids = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    eot = end_of_turn(tokenizer, tpl)
    if eot is not None:
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        if isinstance(eot_id, int) and eot_id not in ids and eot_id != getattr(tokenizer, "unk_token_id", None):
            ids.append(eot_id)
    return ids


def answer_end_texts(tokenizer, tpl: ChatTemplate) -> list:
    """The texts of :func:`answer_end_ids` (what a runtime's ``stop`` list needs)."""
    return [tokenizer.convert_ids_to_tokens(i) for i in answer_end_ids(tokenizer, tpl)]

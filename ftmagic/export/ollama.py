"""An Ollama ``Modelfile`` for an exported GGUF: the training template in Go template syntax.

Ollama prompts a model with a Go ``text/template`` (``TEMPLATE``), not with the Jinja
template stored in the GGUF, so each of ftmagic's named templates
(:data:`ftmagic.data.templates.NAMED_TEMPLATES`) has a hand-written translation here that
renders the same text for the conversations Ollama sends (``.Messages``, the Modelfile's
``SYSTEM`` prepended as a system message when a chat has none, and the generation prompt
at the end). No library translates Jinja to Go templates, and a guessed translation is
worse than none: a template that is neither a named one nor equivalent to one gets no
``TEMPLATE`` line and a note that says so.

Two differences are inherent and documented rather than papered over:

* BOS is never written as text: Ollama's runner adds it from the GGUF's ``add_bos_token``.
* ``llama3`` trims each message in Jinja (``| trim``); Go templates cannot, so a message
  with surrounding whitespace keeps it under Ollama.

Example::

    text = modelfile("reverse-q8_0.gguf", go_template=GO_TEMPLATES["chatml"],
                     stops=["<|im_end|>"], system="Be brief.")
    ollama_create_command("reverse", "/runs/reverse/gguf/Modelfile")
    # 'ollama create reverse -f /runs/reverse/gguf/Modelfile'
"""

from __future__ import annotations

import re
import shlex
from typing import Optional

from ftmagic.data.templates import _ALPACA_PREAMBLE, NAMED_TEMPLATES, ChatTemplate, render_many
from ftmagic.errors import ExportError

# Go translations of ftmagic's named templates (same keys as NAMED_TEMPLATES; a test holds them equal).
GO_TEMPLATES = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "alpaca": (
        "{{- if eq (index .Messages 0).Role \"system\" }}{{ (index .Messages 0).Content }}\n\n"
        "{{ else }}" + _ALPACA_PREAMBLE + "\n\n{{ end }}"
        "{{ range .Messages }}"
        "{{ if eq .Role \"user\" }}### Instruction:\n{{ .Content }}\n\n"
        "{{ else if eq .Role \"assistant\" }}### Response:\n{{ .Content }}\n\n"
        "{{ else if ne .Role \"system\" }}### {{ .Role }}:\n{{ .Content }}\n\n"
        "{{ end }}{{ end }}"
        "### Response:\n"
    ),
    "plain": "{{- range .Messages }}{{ .Content }}\n{{ end }}",
}

# Conversations that tell templates apart: system or not, one turn or several.
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}],
]


def named_equivalent(tokenizer, tpl: ChatTemplate) -> Optional[str]:
    """The named template ``tpl`` is, or renders exactly like (BOS aside); None if there is none.

    A tokenizer's own ChatML template, for example, is recognised as ``chatml``.
    """
    if tpl.name in GO_TEMPLATES:
        return tpl.name
    mine = render_many(tokenizer, tpl, PROBE_CONVERSATIONS, add_generation_prompt=True)
    if any(isinstance(text, Exception) for text in mine):
        return None
    bos = getattr(tokenizer, "bos_token", None) or ""
    mine = [text[len(bos):] if bos and text.startswith(bos) else text for text in mine]
    for name in GO_TEMPLATES:
        named = ChatTemplate(name, NAMED_TEMPLATES[name], "", {"bos_token": ""})
        theirs = render_many(tokenizer, named, PROBE_CONVERSATIONS, add_generation_prompt=True)
        if mine == theirs:
            return name
    return None


def _triple_quoted(key: str, text: str) -> str:
    if '"""' in text:
        raise ExportError(f"the {key} contains `\"\"\"`, which a Modelfile cannot quote; remove it to export to Ollama")
    return f'{key.upper()} """{text}"""'


def modelfile(gguf_name: str, *, go_template: Optional[str], stops: list, system: Optional[str] = None,
              run_name: str = "", untranslated: Optional[str] = None) -> str:
    """The Modelfile text: FROM the GGUF beside it, TEMPLATE, SYSTEM, one ``PARAMETER stop`` per end token.

    ``untranslated`` (the template's name) explains in a comment why there is no TEMPLATE.

    Example::

        modelfile("a-q8_0.gguf", go_template=GO_TEMPLATES["plain"], stops=["<|im_end|>"])
    """
    lines = [f"# Ollama Modelfile for the ftmagic run {run_name}".rstrip(),
             "# The template renders the prompt text the model was trained on; the stops are its end tokens.",
             f"FROM ./{gguf_name}"]
    if go_template is not None:
        lines.append(_triple_quoted("template", go_template))
    else:
        lines.append(f"# No TEMPLATE: the training template ({untranslated or 'custom'}) has no Ollama translation; "
                     "Ollama falls back to its own guess, so check `ollama show --template` before relying on it.")
    if system:
        lines.append(_triple_quoted("system", system))
    for stop in stops:
        lines.append("PARAMETER stop " + '"' + stop.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "\n".join(lines) + "\n"


def ollama_model_name(run_name: str) -> str:
    """A name ``ollama create`` accepts: lowercase letters, digits, ``.``, ``_`` and ``-``.

    Example::

        >>> ollama_model_name("My Run (v2)")
        'my-run-v2'
    """
    name = re.sub(r"[^a-z0-9._-]+", "-", run_name.lower()).strip("-._")
    return name or "ftmagic-model"


def ollama_create_command(name: str, modelfile_path: str) -> str:
    """``ollama create NAME -f PATH`` (then ``ollama run NAME``)."""
    return f"ollama create {shlex.quote(name)} -f {shlex.quote(str(modelfile_path))}"

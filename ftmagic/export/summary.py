"""What an export wrote and how to use it: files with sizes, and the exact commands.

:class:`ExportSummary` is what ``RunResult.export``, ``ftmagic export`` and ``%ft_export``
return or show; its text comes from :func:`format_summary` (a pure function, tested with
plain string asserts). The commands are built here too: ``vllm serve`` for the adapter
or the merged folder, a transformers ``pipeline`` snippet, ``llama-cli``/``llama-server``
for a GGUF and ``ollama create`` for a Modelfile. A reward model or classifier gets a snippet that
loads its head instead (:func:`head_snippet`); it writes no text.

Example::

    summary = ExportSummary(run_dir="runs/a")
    summary.add_file("runs/a/gguf/a-q8_0.gguf", 1_234_567, "GGUF q8_0")
    summary.commands["vLLM"] = vllm_lora_command("Qwen/Qwen2.5-0.5B", "runs/a", name="a", rank=16)
    print(format_summary(summary))
"""

from __future__ import annotations

import html
import shlex
from dataclasses import dataclass, field
from typing import Optional

from ftmagic.units import format_bytes

# The ranks vLLM accepts for --max-lora-rank (vllm.config.LoRAConfig); an adapter of rank r
# needs the smallest one that is at least r.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_serves_adapter(method: str) -> bool:
    """Whether vLLM serves this method's saved adapter as a LoRA module (plain LoRA only:
    not DoRA's magnitudes, IA3 or virtual tokens); the others are served merged.

    Example::

        >>> vllm_serves_adapter("qlora"), vllm_serves_adapter("dora"), vllm_serves_adapter("full")
        (True, False, False)
    """
    from ftmagic.methods import get_method_spec

    spec = get_method_spec(method)
    return spec.adapter and spec.peft_type == "LORA" and not spec.magnitude


@dataclass
class ExportedFile:
    path: str
    size: int  # bytes (a folder: all files under it)
    kind: str  # e.g. "merged model", "GGUF q8_0", "Modelfile"
    reused: bool = False  # it existed already and was used as it is


@dataclass
class ExportSummary:
    """Files written (or reused) by an export, the commands to use them, and notes."""

    run_dir: str
    files: list = field(default_factory=list)
    commands: dict = field(default_factory=dict)  # label -> command or snippet
    notes: list = field(default_factory=list)
    hub_url: str = ""

    def add_file(self, path, size: int, kind: str, reused: bool = False) -> None:
        self.files.append(ExportedFile(str(path), int(size), kind, reused))

    def paths(self, kind_prefix: str = "") -> list:
        return [f.path for f in self.files if f.kind.startswith(kind_prefix)]

    def __str__(self) -> str:
        return format_summary(self)

    def _repr_html_(self) -> str:
        return summary_html(self)


def format_summary(summary: ExportSummary) -> str:
    """Plain text: one line per file (size, kind, path), then the commands, then notes.

    Example::

        >>> s = ExportSummary("runs/a"); s.add_file("runs/a/gguf/a-f16.gguf", 2048, "GGUF f16")
        >>> print(format_summary(s))
        exported runs/a:
          2.00 KiB  GGUF f16  runs/a/gguf/a-f16.gguf
    """
    lines = [f"exported {summary.run_dir}:"]
    width = max((len(f.kind) for f in summary.files), default=0)
    for f in summary.files:
        kept = "  (already there)" if f.reused else ""
        lines.append(f"  {format_bytes(f.size):>8}  {f.kind:<{width}}  {f.path}{kept}")
    if summary.hub_url:
        lines.append(f"  uploaded to {summary.hub_url}")
    for label, command in summary.commands.items():
        lines.append(f"{label}:")
        lines.extend("  " + line for line in command.splitlines())
    lines.extend(f"note: {note}" for note in summary.notes)
    return "\n".join(lines)


def summary_html(summary: ExportSummary) -> str:
    """The same content as a small HTML table and code blocks (for notebooks)."""
    rows = "".join(f"<tr><td style='text-align:right'>{format_bytes(f.size)}</td><td>{html.escape(f.kind)}</td>"
                   f"<td><code>{html.escape(f.path)}</code>{' (already there)' if f.reused else ''}</td></tr>"
                   for f in summary.files)
    parts = [f"<b>exported {html.escape(summary.run_dir)}</b><table>{rows}</table>"]
    if summary.hub_url:
        parts.append(f"<p>uploaded to <a href='{html.escape(summary.hub_url)}'>{html.escape(summary.hub_url)}</a></p>")
    for label, command in summary.commands.items():
        parts.append(f"<p>{html.escape(label)}:</p><pre>{html.escape(command)}</pre>")
    parts.extend(f"<p>note: {html.escape(note)}</p>" for note in summary.notes)
    return "".join(parts)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of ``rank``.

    Example::

        >>> vllm_max_lora_rank(16), vllm_max_lora_rank(12), vllm_max_lora_rank(4)
        (16, 16, 8)
    """
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    return rank


def vllm_lora_command(base: str, adapter_dir: str, *, name: str, rank: int) -> str:
    """Serve the base model with the run's adapter, its chat template and its stop tokens.

    vLLM takes the tokenizer and generation settings from the base model; ``--chat-template``
    and ``--generation-config`` point it at the run's own, which the adapter folder holds.
    """
    q = shlex.quote
    return (f"vllm serve {q(base)} --enable-lora --lora-modules {q(name + '=' + adapter_dir)} "
            f"--max-lora-rank {vllm_max_lora_rank(rank)} "
            f"--chat-template {q(adapter_dir.rstrip('/') + '/chat_template.jinja')} "
            f"--generation-config {q(adapter_dir)}")


def vllm_model_command(model_dir: str) -> str:
    """Serve a merged or fully fine-tuned folder (template and stop tokens come with it)."""
    return f"vllm serve {shlex.quote(model_dir)}"


def pipeline_snippet(model_dir: str, prompt: str = "Hello") -> str:
    """A transformers snippet that answers one chat message with the saved folder (adapter or full).

    Example::

        exec(pipeline_snippet("runs/a", "reverse: lamp"))   # prints the answer
    """
    return "\n".join([
        "from transformers import pipeline",
        "",
        f"chat = pipeline(\"text-generation\", model={model_dir!r})",
        f"reply = chat([{{\"role\": \"user\", \"content\": {prompt!r}}}], max_new_tokens=64, do_sample=False)",
        "print(reply[0][\"generated_text\"][-1][\"content\"])",
    ])


def head_snippet(model_dir: str, objective: str, eos_after_text: bool = False, one_text: bool = False,
                 adapter: Optional[dict] = None) -> str:
    """A transformers snippet for a folder with a sequence-classification head: ``classify`` prints
    each label's probability for one text, ``reward`` the score of one conversation (rendered with
    the folder's chat template, as the pairs were in training). ``eos_after_text``: the classifier
    was trained on texts followed by EOS (a decoder whose tokenizer adds none), so the snippet adds it.
    ``one_text``: the model's config names no pad token (ftmagic leaves out a pad that is the EOS the
    head reads), so transformers pools the last token of one text per call and the snippet says so.
    ``adapter``: the folder holds a peft adapter, loaded by peft with these settings of its base
    (``num_labels``, ``id2label``, ``pad_token_id``).

    Example::

        exec(head_snippet("runs/cls/merged", "classify"))   # prints {'neg': 0.03, 'pos': 0.97}
    """
    if adapter is None:
        imports = ["from transformers import AutoModelForSequenceClassification, AutoTokenizer"]
        load = f"AutoModelForSequenceClassification.from_pretrained({model_dir!r})"
    else:
        imports = ["from peft import AutoPeftModelForSequenceClassification",
                   "from transformers import AutoTokenizer"]
        settings = "".join(f", {key}={value!r}" for key, value in adapter.items())
        load = f"AutoPeftModelForSequenceClassification.from_pretrained({model_dir!r}{settings})"
    lines = ["import torch", *imports, "",
             f"tokenizer = AutoTokenizer.from_pretrained({model_dir!r})",
             f"model = {load}"]
    if one_text:
        lines.append("# One text per call: with no pad token in its config the model reads the last token, "
                     "as in training.")
    if objective == "classify":
        text = '"Hello" + tokenizer.eos_token' if eos_after_text else '"Hello"'
        lines += [f"text = {text}" + ("  # the head was trained on the EOS after each text" if eos_after_text else ""),
                  "with torch.no_grad():",
                  "    probs = model(**tokenizer(text, return_tensors=\"pt\")).logits.softmax(-1)[0]",
                  "print({model.config.id2label[i]: round(float(p), 4) for i, p in enumerate(probs)})"]
        return "\n".join(lines)
    return "\n".join(lines + [
        "conversation = [{\"role\": \"user\", \"content\": \"Hello\"}, {\"role\": \"assistant\", \"content\": \"Hi!\"}]",
        "text = tokenizer.apply_chat_template(conversation, tokenize=False)",
        "# The chat template already writes the special tokens the model was trained with.",
        "with torch.no_grad():",
        "    score = model(**tokenizer(text, return_tensors=\"pt\", add_special_tokens=False)).logits[0, 0]",
        "print(float(score))  # higher: the answer is preferred",
    ])


def llama_cpp_commands(gguf_path: str) -> str:
    """Chat with a GGUF in llama.cpp's own tools (the chat template comes from the file)."""
    q = shlex.quote(gguf_path)
    return f"llama-cli -m {q}\nllama-server -m {q} --jinja"

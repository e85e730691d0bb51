"""The model card of a pushed run: Hub metadata, what was trained on what, results, how to use it.

The same card (``folder=True``: it names the folder, not a repository) is the ``README.md`` of
every run's own folder, in place of the empty template peft's ``save_pretrained`` writes.

The YAML header is written by ``huggingface_hub.ModelCardData`` (the Hub's own schema:
``base_model``, ``library_name``, ``tags``, ``datasets``, ``license``); the body is plain
Markdown built from the run's config, data statistics and metrics. The loss curve is a
small SVG drawn here, because a plotting library (tens of MB) for one line chart is more
than the card is worth; the Hub shows SVG images in cards.

Example::

    info = CardInfo(repo_id="me/reverse", base_model="Qwen/Qwen2.5-0.5B", method="lora", adapter=True,
                    config=cfg.to_dict(), metrics=result.metrics, history=result.history)
    text = model_card(info)          # README.md of the repository
    svg = loss_curve_svg(result.history)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from ftmagic.methods import METHODS, reads_key
from ftmagic.objectives import get_objective_spec

LOSS_CURVE_FILE = "loss_curve.svg"
CARD_TAGS = ("ftmagic",)

# Config keys shown in the card's training table, in this order (others are run control).
_SHOWN_KEYS = ("method", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "num_virtual_tokens",
               "trainable_layers", "lr", "scheduler", "warmup", "weight_decay", "epochs", "max_steps", "batch_size",
               "grad_accum", "max_seq_len", "packing", "train_on", "template", "system_prompt", "optimizer",
               "precision", "seed")


@dataclass
class CardInfo:
    """What the card says about a run (filled by the engine from a RunResult)."""

    repo_id: str
    base_model: str
    method: str
    adapter: bool  # the repository's root holds a peft adapter (else full weights)
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    license: Optional[str] = None
    datasets: list = field(default_factory=list)
    gguf_files: list = field(default_factory=list)
    precision: Optional[str] = None
    device: Optional[str] = None
    objective: str = "sft"  # reward and classify: a sequence-classification head, no text written
    labels: Optional[list] = None  # a classifier's label names, by output
    eos_after_text: bool = False  # a classifier read the EOS ftmagic put after each text (see head_snippet)
    one_text: bool = False  # the head model names no pad token (its pad was the EOS the head reads): one text a call
    folder: bool = False  # the card of the run's own folder (``repo_id`` is its path), not of a Hub repository


def is_hub_id(name: Optional[str]) -> bool:
    """True for ``owner/name`` ids (not local paths): what ``base_model`` and ``datasets`` may hold."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return False
    owner, repo = name.split("/")
    return bool(owner and repo) and not any(c.isspace() for c in name) and not name.endswith((".json", ".jsonl",
                                                                                              ".csv", ".parquet"))


def pipeline_tag(objective: str) -> str:
    """The Hub's task for a run: a reward model or classifier has a sequence-classification head.

    Example::

        >>> pipeline_tag("dpo"), pipeline_tag("reward")
        ('text-generation', 'text-classification')
    """
    return "text-generation" if get_objective_spec(objective).generates else "text-classification"


def card_metadata(info: CardInfo) -> dict:
    """The YAML header's fields (only those that are known)."""
    task = pipeline_tag(info.objective)
    tags = list(CARD_TAGS) + [task, info.method] + (["peft", "lora"] if info.adapter and "lora" in info.method else [])
    if info.gguf_files:
        tags.append("gguf")
    meta = {"library_name": "peft" if info.adapter else "transformers", "tags": list(dict.fromkeys(tags)),
            "pipeline_tag": task}
    if is_hub_id(info.base_model):
        meta["base_model"] = info.base_model
    if info.datasets:
        meta["datasets"] = list(info.datasets)
    if info.license:
        meta["license"] = info.license
    return meta


def model_card(info: CardInfo) -> str:
    """README.md for the repository: YAML metadata, then the body."""
    from huggingface_hub import ModelCardData

    header = ModelCardData(**card_metadata(info)).to_yaml()
    return f"---\n{header}\n---\n\n" + card_body(info)


def card_body(info: CardInfo) -> str:
    """The Markdown body: what, how, on what data, results, loss curve, how to use it."""
    name = info.repo_id.rstrip("/").split("/")[-1]
    holder = "folder" if info.folder else "repository"
    base = (f"[{info.base_model}](https://huggingface.co/{info.base_model})" if is_hub_id(info.base_model)
            else f"`{info.base_model}`")
    what = "a LoRA-style adapter" if info.adapter else "full model weights"
    parts = [f"# {name}", "",
             f"Fine-tuned from {base} with [ftmagic](https://github.com/ftmagic/ftmagic) "
             f"(method: `{info.method}`). This {holder} holds {what}"
             + (f" and GGUF files for llama.cpp and Ollama ({', '.join(info.gguf_files)})" if info.gguf_files else "")
             + ".", ""]
    parts += ["## Training", "", "| setting | value |", "|---|---|"]
    spec = METHODS.get(info.method)
    for key in _SHOWN_KEYS:
        # A method's own keys only where it reads them (a full run's card showed `trainable_layers: 2`).
        if key not in info.config or (spec is not None and not reads_key(spec, key)):
            continue
        value = info.config[key]
        if value is None or (key == "max_steps" and value == -1):
            continue
        parts.append(f"| `{key}` | {_cell(value)} |")
    if info.precision or info.device:
        parts.append(f"| device | {info.device or '?'} ({info.precision or '?'}) |")
    parts += ["", "## Data", ""] + _data_lines(info) + [""]
    parts += ["## Results", ""] + _metric_lines(info.metrics) + [""]
    if loss_curve_svg(info.history) is not None:
        parts += [f"![Training loss by step]({LOSS_CURVE_FILE})", ""]
    if not get_objective_spec(info.objective).generates:
        return "\n".join(parts + _head_use(info))
    parts += ["## Use it", "", "With transformers" + (" (and peft installed)" if info.adapter else "") + ":", "",
              "```python", "from transformers import pipeline", "",
              f'chat = pipeline("text-generation", model="{info.repo_id}")',
              'reply = chat([{"role": "user", "content": "Hello"}], max_new_tokens=128, do_sample=False)',
              'print(reply[0]["generated_text"][-1]["content"])', "```", "",
              f"The {holder}'s tokenizer carries the chat template the model was trained with, and "
              "`generation_config.json` lists every token that ends an answer.", ""]
    if info.gguf_files:
        tag = info.gguf_files[0].rsplit("-", 1)[-1].removesuffix(".gguf").upper()
        parts += ["With llama.cpp or Ollama (the GGUF files embed the same chat template and stop tokens):", "",
                  "```bash", f"llama-cli -hf {info.repo_id}:{tag}", f"ollama run hf.co/{info.repo_id}:{tag}", "```", ""]
    return "\n".join(parts)


def _head_use(info: CardInfo) -> list:
    """"Use it" for a reward model or classifier: loaded with its head (it writes no text)."""
    from ftmagic.export.summary import head_snippet

    labels = list(info.labels or [])
    what = ("a reward model (one score per conversation)" if info.objective == "reward"
            else "a classifier" + (f" (outputs: {', '.join(map(str, labels))})" if labels else ""))
    adapter = None
    if info.adapter:
        # The adapter holds the trained head (peft's modules_to_save); the base gets one of that many outputs,
        # named as in training, and no pad where its pad is the token the head reads (see head_snippet).
        adapter = {"num_labels": 1 if info.objective == "reward" else len(labels) or 2}
        if info.objective == "classify" and labels:
            adapter["id2label"] = dict(enumerate(map(str, labels)))
        if info.one_text:
            adapter["pad_token_id"] = None
    code = head_snippet(info.repo_id, info.objective, eos_after_text=info.eos_after_text, one_text=info.one_text,
                        adapter=adapter).splitlines()
    return ["## Use it", "", f"This is {what}; it writes no text. With transformers"
            + (" and peft" if info.adapter else "") + ":", "", "```python", *code, "```", ""]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value)
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if isinstance(value, str) else text


def _data_lines(info: CardInfo) -> list:
    data = dict(info.metrics.get("data") or {})
    lines = []
    source = info.config.get("data")
    if isinstance(source, str):
        lines.append(f"- source: `{source}`" + (" (Hugging Face dataset)" if info.datasets else ""))
    labels = (("format", "format"), ("records", "records read"), ("skipped", "records skipped"),
              ("train_examples", "training examples"), ("eval_examples", "evaluation examples"),
              ("trained_tokens", "trained (answer) tokens"), ("total_tokens", "tokens seen"),
              ("truncated", "examples truncated to max_seq_len"), ("template", "chat template"))
    for key, label in labels:
        if data.get(key) is not None:
            value = data[key]
            lines.append(f"- {label}: {value:,}" if isinstance(value, int) and not isinstance(value, bool)
                         else f"- {label}: {value}")
    return lines or ["- not recorded"]


def _metric_lines(metrics: dict) -> list:
    lines = []
    for key, label in (("train_loss", "final training loss"), ("eval_loss", "evaluation loss"),
                       ("best_eval_loss", "best evaluation loss"), ("steps", "optimizer steps"),
                       ("runtime_s", "training time (s)")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            lines.append(f"- {label}: {value:.4f}" if isinstance(value, float) and key != "runtime_s"
                         else f"- {label}: {value:,.0f}" if key == "runtime_s" else f"- {label}: {value}")
    return lines or ["- no metrics recorded"]


def loss_curve_svg(history: list, width: int = 480, height: int = 240) -> Optional[str]:
    """A line chart of training loss by step as SVG text; None with fewer than two logged losses.

    Example::

        svg = loss_curve_svg([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
        svg.startswith("<svg")   # True
    """
    points = [(row["step"], float(row["loss"])) for row in history or []
              if isinstance(row, dict) and isinstance(row.get("step"), (int, float))
              and isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"])]
    if len(points) < 2:
        return None
    left, right, top, bottom = 56, 12, 16, 36
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(losses), max(losses)
    if y1 == y0:
        y1 = y0 + 1.0
    if x1 == x0:
        x1 = x0 + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(step):
        return left + (step - x0) / (x1 - x0) * plot_w

    def sy(loss):
        return top + (y1 - loss) / (y1 - y0) * plot_h

    path = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in points)
    font = 'font-family="sans-serif" font-size="11" fill="#444"'
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#999"/>',
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{path}"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" {font}>{y1:.3g}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" {font}>{y0:.3g}</text>',
        f'<text x="{left}" y="{height - 18}" text-anchor="middle" {font}>{x0}</text>',
        f'<text x="{left + plot_w}" y="{height - 18}" text-anchor="middle" {font}>{x1}</text>',
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" {font}>step</text>',
        f'<text x="12" y="{top + plot_h / 2}" text-anchor="middle" transform="rotate(-90 12 {top + plot_h / 2})" '
        f'{font}>training loss</text>',
        "</svg>",
    ]) + "\n"

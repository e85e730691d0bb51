"""``%ft_memory``: the memory calculator as a notebook widget.

The HTML it shows comes from pure functions (:func:`bar_html`, :func:`verdict_html`,
:func:`suggestions_html`) tested with plain string checks; :class:`MemoryCalculator` only
wires ipywidgets controls to them. Every control change re-runs the analytic estimate
(no torch), well under 20 ms.

Example::

    %load_ext ftmagic
    %ft_memory llama-3.1-8b --method qlora --gpu T4
    %ft_memory tiny --text          # plain text, no widget
"""

from __future__ import annotations

import html
import time
from typing import Optional

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ftmagic.constants import OPTIMIZERS
from ftmagic.api import estimate_memory
from ftmagic.memory.estimate import DEVICE_KEYS, MemoryEstimate
from ftmagic.memory.gpus import GPU_PRESETS, format_bytes, resolve_gpu
from ftmagic.memory.policy import check_gpu_precision
from ftmagic.methods import METHOD_NAMES
from ftmagic.memory.suggest import Verdict, verdict_for
from ftmagic.strategies import LABELS as STRATEGY_LABELS
from ftmagic.strategies import STRATEGY_NAMES
from ftmagic.usage import as_usage_error, magic_argv, parse_magic_args
from ftmagic.widgets.static import StaticTwin

COLORS = {
    "frozen_weights": "#8da0cb", "trainable_weights": "#66c2a5", "gradients": "#fc8d62",
    "optimizer_states": "#e78ac3", "activations": "#a6d854", "logits": "#ffd92f",
    "optimizer_step_transient": "#e5c494", "communication_buffers": "#bc80bd", "overhead": "#b3b3b3",
}
LABELS = {
    "frozen_weights": "frozen weights", "trainable_weights": "trainable weights", "gradients": "gradients",
    "optimizer_states": "optimizer states", "activations": "activations", "logits": "logits and loss",
    "optimizer_step_transient": "optimizer step transient",
    "communication_buffers": "gathered weights + communication buffers", "overhead": "CUDA context + headroom",
}
NO_GPU = "(no GPU)"
# Colours that read on light and dark themes; JupyterLab's own where a front end has them.
GOOD = "var(--jp-success-color1, #2e7d32)"
BAD = "var(--jp-error-color1, #d32f2f)"


# ----------------------------------------------------------------------------- pure HTML


def bar_html(estimate: MemoryEstimate, gpu_total_bytes: Optional[int] = None, width: int = 560) -> str:
    """A stacked SVG bar of the breakdown (plus context and headroom), with a GPU limit line.

    The bar is ``width`` units wide and shrinks with a narrow output; the legend wraps.

    Example::

        bar_html(estimate_memory("tiny"), 16 * 2**30)   # '<svg ...>...</svg><div>...legend...</div>'
    """
    parts = [(k, estimate.breakdown.get(k, 0)) for k in DEVICE_KEYS if estimate.breakdown.get(k, 0) > 0]
    overhead = estimate.cuda_context + estimate.allocator_headroom
    if overhead:
        parts.append(("overhead", overhead))
    total = sum(v for _, v in parts) or 1
    scale_to = max(total, gpu_total_bytes or 0)
    x = 0.0
    rects = []
    for key, value in parts:
        w = width * value / scale_to
        rects.append(f'<rect x="{x:.1f}" y="4" width="{max(w, 0.5):.1f}" height="26" fill="{COLORS[key]}">'
                     f'<title>{LABELS[key]}: {format_bytes(value)}</title></rect>')
        x += w
    if gpu_total_bytes:
        gx = width * gpu_total_bytes / scale_to
        rects.append(f'<line x1="{gx:.1f}" y1="0" x2="{gx:.1f}" y2="34" stroke="#d62728" stroke-width="2" '
                     'vector-effect="non-scaling-stroke"><title>GPU memory</title></line>')
    svg = (f'<svg viewBox="0 0 {width + 4} 36" width="{width + 4}" height="36" preserveAspectRatio="none" '
           f'style="width:100%;max-width:{width + 4}px;height:36px;display:block" class="ftmagic-memory-bar">'
           f'{"".join(rects)}</svg>')
    legend = " ".join(
        f'<span style="white-space:nowrap;margin-right:6px"><span style="display:inline-block;width:10px;height:10px;'
        f'background:{COLORS[k]}"></span> {LABELS[k]} {format_bytes(v)}</span>' for k, v in parts)
    return f"{svg}<div style='font-size:12px;line-height:1.6'>{legend}</div>"


def verdict_html(verdict: Verdict) -> str:
    """Peak, phase and the fits / does-not-fit line."""
    est = verdict.estimate
    if est is None:
        return f"<div>{html.escape(verdict.message)}</div>"
    devices = est.settings.get("devices", 1)
    per = f" per GPU ({devices} GPUs, {STRATEGY_LABELS[est.settings['strategy']]})" if devices > 1 else ""
    head = (f"<b>peak {format_bytes(est.total_bytes)}</b>{per} at {est.peak_phase}; "
            f"needs {format_bytes(est.required_bytes)} with CUDA context and allocator headroom; "
            f"{est.trainable_params:,} of {est.total_params:,} parameters train")
    if verdict.gpu is None:
        return f"<div>{head}</div>"
    if verdict.fits:
        line = f"<span style='color:{GOOD}'><b>fits</b></span> {html.escape(verdict.gpu.label)}"
    else:
        line = f"<span style='color:{BAD}'><b>does not fit</b></span> {html.escape(verdict.gpu.label)}"
    notes = "".join(f"<div style='font-size:11px;opacity:0.75'>{html.escape(n)}</div>" for n in est.notes)
    return f"<div>{line} &mdash; {head}</div>{notes}"


def settings_html(model: str, settings: dict, gpu: str) -> str:
    """The calculator's settings as one line (the static copy has no controls to show them).

    Example::

        >>> settings_html("tiny", {"method": "lora", "batch_size": 4}, "T4")
        '<div style="font-size:12px;opacity:0.8">tiny | method lora | batch size 4 | GPU T4</div>'
    """
    shown = {key: ("on" if value else "off") if isinstance(value, bool) else value for key, value in settings.items()}
    parts = [str(model)] + [f"{key.replace('_', ' ')} {value}" for key, value in shown.items()] + [f"GPU {gpu}"]
    return f'<div style="font-size:12px;opacity:0.8">{html.escape(" | ".join(parts))}</div>'


def suggestions_html(suggestions: list) -> str:
    """Ranked suggestions, each with its own new estimate."""
    if not suggestions:
        return ""
    items = []
    for s in suggestions:
        mark = "fits" if s.fits else "still too big"
        items.append(f"<li>{html.escape(s.label)}: {format_bytes(s.required_bytes)} ({mark})</li>")
    return f"<div><b>What to change</b><ol>{''.join(items)}</ol></div>"


def text_report(verdict: Verdict) -> str:
    """The same content as plain text (``%ft_memory --text``, logs)."""
    est = verdict.estimate
    lines = [verdict.message]
    if est is not None:
        for key in DEVICE_KEYS:
            if est.breakdown.get(key):
                lines.append(f"  {LABELS[key]:26} {format_bytes(est.breakdown[key]):>12}")
        lines.append(f"  {'peak (' + est.peak_phase + ')':26} {format_bytes(est.total_bytes):>12}")
    for i, s in enumerate(verdict.suggestions, 1):
        lines.append(f"  {i}. {s.label}: {format_bytes(s.required_bytes)} ({'fits' if s.fits else 'still too big'})")
    # What the widget shows under its verdict and `ftmagic estimate` prints (an exact mode that fell back, say).
    lines += [f"  note: {note}" for note in (est.notes if est is not None else [])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the widget


class MemoryCalculator:
    """Controls + stacked bar + verdict + suggestions; recomputes on every change.

    Example::

        calc = MemoryCalculator(model="llama-3.2-1b", gpu="T4")
        calc.controls["batch_size"].value = 8     # verdict and suggestions update
        calc.verdict.fits, calc.last_ms
    """

    def __init__(self, model: str = "tiny", *, method: str = "lora", precision: str = "auto", batch_size: int = 4,
                 seq_len: int = 512, gradient_checkpointing: bool = False, optimizer: str = "adamw",
                 lora_r: int = 16, gpu="T4", devices: int = 1, strategy: str = "auto", objective: str = "sft"):
        import ipywidgets as w

        from ftmagic.objectives import OBJECTIVE_NAMES

        from ftmagic.memory.architectures import builtin_names

        card = resolve_gpu(gpu) if gpu not in (None, NO_GPU) else None
        gpu_name = card.name if card else NO_GPU
        options = [NO_GPU] + list(GPU_PRESETS)
        self._extra_gpu = None
        if gpu_name not in options:  # a custom size, e.g. `--gpu 12`
            options.append(gpu_name)
            self._extra_gpu = card
        self.controls = {
            "model": w.Combobox(value=str(model), options=builtin_names() + ["tiny"], description="model",
                                ensure_option=False, continuous_update=False),
            "method": w.Dropdown(options=list(METHOD_NAMES), value=method, description="method"),
            "precision": w.Dropdown(options=["auto", "bf16", "fp16", "fp32"], value=precision, description="precision"),
            "batch_size": w.BoundedIntText(value=batch_size, min=1, max=4096, description="batch size"),
            "seq_len": w.BoundedIntText(value=seq_len, min=8, max=1_048_576, step=128, description="seq len"),
            "gradient_checkpointing": w.Checkbox(value=gradient_checkpointing, description="gradient checkpointing"),
            "optimizer": w.Dropdown(options=list(OPTIMIZERS), value=optimizer, description="optimizer"),
            "lora_r": w.BoundedIntText(value=lora_r, min=1, max=4096, description="LoRA r"),
            "objective": w.Dropdown(options=list(OBJECTIVE_NAMES), value=objective, description="objective"),
            "gpu": w.Dropdown(options=options, value=gpu_name, description="GPU"),
            "devices": w.BoundedIntText(value=devices, min=1, max=1024, description="GPUs"),
            "strategy": w.Dropdown(options=list(STRATEGY_NAMES), value=strategy, description="strategy"),
        }
        self.bar = w.HTML()
        self.verdict_box = w.HTML()
        self.suggestions_box = w.HTML()
        self.estimate: Optional[MemoryEstimate] = None
        self.verdict: Optional[Verdict] = None
        self.error: Optional[str] = None
        self.last_ms = 0.0
        for control in self.controls.values():
            control.observe(self._changed, names="value")
        c = self.controls
        left = w.VBox([c["model"], c["method"], c["precision"], c["optimizer"], c["lora_r"]])
        right = w.VBox([c["batch_size"], c["seq_len"], c["gradient_checkpointing"], c["objective"], c["gpu"],
                        c["devices"],
                        c["strategy"]])
        # The two columns sit side by side where there is room and stack in a narrow window.
        controls = w.HBox([left, right], layout=w.Layout(flex_flow="row wrap"))
        self.widget = w.VBox([controls, self.bar, self.verdict_box, self.suggestions_box],
                             layout=w.Layout(max_width="100%"))
        self.twin: Optional[StaticTwin] = None
        self.update()
        self.twin = StaticTwin(self.widget, self.snapshot_html, self.snapshot_text)

    def _changed(self, change) -> None:
        self.update()

    def settings(self) -> dict:
        c = self.controls
        return dict(method=c["method"].value, precision=c["precision"].value, batch_size=c["batch_size"].value,
                    seq_len=c["seq_len"].value, gradient_checkpointing=c["gradient_checkpointing"].value,
                    optimizer=c["optimizer"].value, lora_r=c["lora_r"].value, devices=c["devices"].value,
                    strategy=c["strategy"].value, objective=c["objective"].value)

    def gpu(self):
        name = self.controls["gpu"].value
        if name == NO_GPU:
            return None
        return GPU_PRESETS.get(name) or self._extra_gpu

    def update(self) -> None:
        """Re-estimate from the controls and refresh the bar, verdict and suggestions."""
        from ftmagic.errors import FtmagicError

        start = time.perf_counter()
        gpu = self.gpu()
        try:
            if gpu is not None:
                check_gpu_precision(self.controls["precision"].value, gpu.bf16, gpu.name)
            est = estimate_memory(self.controls["model"].value, bf16_supported=gpu.bf16 if gpu else True,
                                  **self.settings())
            verdict = verdict_for(est, gpu)
        except FtmagicError as exc:
            self.error = str(exc)
            self.estimate = self.verdict = None
            self.bar.value = ""
            self.verdict_box.value = f"<div style='color:{BAD}'>{html.escape(self.error)}</div>"
            self.suggestions_box.value = ""
        else:
            self.error = None
            self.estimate, self.verdict = est, verdict
            self.bar.value = bar_html(est, gpu.total_bytes if gpu else None)
            self.verdict_box.value = verdict_html(verdict)
            self.suggestions_box.value = suggestions_html(verdict.suggestions)
        self.last_ms = (time.perf_counter() - start) * 1000
        if self.twin is not None:
            self.twin.refresh()  # a notebook saved now shows this estimate

    def snapshot_html(self) -> str:
        """The settings, bar, verdict and suggestions as static HTML (what a saved notebook shows)."""
        return "".join((settings_html(self.controls["model"].value, self.settings(), self.controls["gpu"].value),
                        self.bar.value, self.verdict_box.value, self.suggestions_box.value))

    def snapshot_text(self) -> str:
        """The same as plain text (text-only viewers)."""
        return self.error if self.verdict is None else text_report(self.verdict)

    def _ipython_display_(self):
        self.twin.display()


# ----------------------------------------------------------------------------- the magic


@magics_class
class MemoryMagics(Magics):
    """``%ft_memory``: will this fine-tuning run fit the GPU?"""

    @magic_arguments()
    @argument("model", nargs="?", default="tiny",
              help="built-in name (llama-3.2-1b, qwen2.5-7b, ...), local directory, cached hub id, or tiny")
    @argument("--method", default="lora", help="full, lora, qlora, dora, ia3, ... (default lora)")
    @argument("--precision", default="auto", help="auto, bf16, fp16 or fp32")
    @argument("--batch-size", type=int, default=4, help="micro-batch size")
    @argument("--seq-len", type=int, default=512, help="tokens per row")
    @argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    @argument("--optimizer", default="adamw", help="adamw, adamw_8bit, paged_adamw_8bit or sgd")
    @argument("--lora-r", type=int, default=16, help="LoRA rank")
    @argument("--objective", default="sft", help="sft, dpo, orpo, reward or classify (pairs: two sequences per record)")
    @argument("--gpu", default="T4", help="GPU preset (T4, L4, A10G, RTX 3090, A100 80GB, ...) or size in GiB")
    @argument("--devices", type=int, default=1, help="how many GPUs train the run together (the estimate is per GPU)")
    @argument("--strategy", default="auto", help="with several GPUs: auto, ddp, fsdp, deepspeed_zero2, deepspeed_zero3")
    @argument("--exact", action="store_true", help="trace one step under FakeTensorMode (imports torch)")
    @argument("--text", action="store_true", help="print a text report instead of the widget")
    @line_magic
    def ft_memory(self, line: str = ""):
        """Estimate the GPU memory of a fine-tuning run and judge it against a GPU.

        Example::

            %ft_memory llama-3.1-8b --method qlora --batch-size 2 --seq-len 2048 --gpu T4
            %ft_memory llama-3.1-8b --method full --batch-size 8 --gpu A100 --devices 4 --strategy fsdp
        """
        args = parse_magic_args(self.ft_memory.parser, magic_argv(line))
        with as_usage_error():
            settings = dict(method=args.method, precision=args.precision, batch_size=args.batch_size,
                            seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
                            optimizer=args.optimizer, lora_r=args.lora_r, devices=args.devices,
                            strategy=args.strategy, objective=args.objective)
            gpu = resolve_gpu(args.gpu) if args.gpu and args.gpu.lower() != "none" else None
            if gpu is not None:
                check_gpu_precision(args.precision, gpu.bf16, gpu.name)
            if args.text or args.exact:
                est = estimate_memory(args.model, bf16_supported=gpu.bf16 if gpu else True,
                                      mode="exact" if args.exact else "analytic", **settings)
                print(text_report(verdict_for(est, gpu)))
                return None
            estimate_memory(args.model, bf16_supported=gpu.bf16 if gpu else True, **settings)  # errors as one line
            calc = MemoryCalculator(model=args.model, gpu=gpu, **settings)
        calc.twin.display()
        return None

"""``finetune()``: configuration in, trained model and :class:`RunResult` out.

The steps, in order: resolve the config; choose device and precision; protect or
resume ``output_dir``; load the tokenizer and prepare the data; emit the ``plan`` event;
check memory (CUDA); load the model and apply the method; run the loop; write the
adapter or weights, tokenizer, config and metrics; emit ``end``.

Example::

    from ftmagic.engine.run import finetune
    result = finetune(model="tiny", data="train.jsonl", method="lora", max_steps=50,
                      on_event=lambda e: print(e.kind, getattr(e, "loss", "")))
    print(result.metrics["train_loss"], result.generate("reverse: abc"))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ftmagic.config import FinetuneConfig
from ftmagic.data import prepare_data
from ftmagic.constants import SMOKE_MAX_STEPS, smoke_mode
from ftmagic.engine import checkpoint as ckpt
from ftmagic.engine.generation import evaluator_for
from ftmagic.engine.device import (DevicePlan, base_weight_dtype, choose_device, choose_optimizer, detect_caps,
                                   keeps_fp32_trainable)
from ftmagic.engine.export import export_after_run
from ftmagic.engine.export.saved import copy_generation_config, save_tokenizer, write_generation_config
from ftmagic.engine.loop import plan_steps, train_loop
from ftmagic.engine.methods import count_parameters, enable_gradient_checkpointing, get_method
from ftmagic.engine.models import load_model, load_tokenizer, quiet_progress, resolve_model_path
from ftmagic.engine.reporting import make_reporters
from ftmagic.engine.result import RUN_FILE, RunResult
from ftmagic.errors import CheckpointError, ConfigError, DataError, MemoryFitError
from ftmagic.events import End, Message, Plan, Start
from ftmagic.memory import preflight
from ftmagic.methods import get_method_spec

# Keys that steer how long or how a run proceeds but not what it trains: changing them
# keeps the run "the same" for output_dir protection and resume.
_RUN_CONTROL_KEYS = ("overwrite", "resume", "skip_memory_check", "report_to", "max_steps", "epochs", "save_steps",
                     "save_total_limit", "eval_steps", "logging_steps", "early_stopping_patience", "merge", "device",
                     "output_dir", "precision", "optimizer", "gradient_checkpointing", "export", "gguf_quant",
                     "push_to_hub", "hub_private",
                     # what evaluations measure and how a search varies the run, not what one run trains:
                     "eval_metrics", "eval_max_new_tokens", "best_metric", "sweep")
# Files a finished or crashed run leaves; only these are replaced when a run starts over.
_OUTPUT_NAMES = ("checkpoints", "merged", "adapter_model.safetensors", "adapter_config.json", "model.safetensors",
                 "config.json", "generation_config.json", "config.yaml", "metrics.json", "history.json", RUN_FILE,
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "README.md", "model.safetensors.index.json", "gguf")


def finetune(config: Any = None, *, on_event: Optional[Callable] = None, stop=None, **overrides: Any) -> RunResult:
    """Fine-tune a model; return a :class:`RunResult`.

    ``config`` is a :class:`FinetuneConfig`, a dict, a YAML file path, or None (then the
    keyword ``overrides`` are the whole config). ``on_event(event)`` receives the progress
    events (the typed records of :mod:`ftmagic.events`; ``event.to_dict()`` gives a plain
    dict); ``stop`` (anything with ``is_set()``, e.g. ``threading.Event``) ends the run
    after the current step with a checkpoint. Ctrl-C does the same.

    Example::

        result = finetune("run.yaml", lr=1e-4)
        result = finetune(model="tiny", data=records, method="qlora", max_steps=30,
                          on_event=lambda e: print(e.kind, getattr(e, "loss", "")))
    """
    cfg = resolve_config(config, overrides)
    try:
        return _run(cfg, on_event or (lambda event: None), stop)
    except torch.OutOfMemoryError:
        raise MemoryFitError(_oom_message(cfg)) from None


def resolve_config(config: Any, overrides: dict) -> FinetuneConfig:
    """Turn any accepted spelling of a config into a validated :class:`FinetuneConfig`."""
    if isinstance(config, FinetuneConfig):
        return config.replace(**overrides) if overrides else config
    if isinstance(config, dict):
        return FinetuneConfig.from_dict(config, **overrides)
    if isinstance(config, (str, os.PathLike)):
        return FinetuneConfig.from_file(str(config), **overrides)
    if config is None:
        return FinetuneConfig.from_dict(overrides)
    raise ConfigError(f"config must be a FinetuneConfig, a dict or a YAML path, not {type(config).__name__}")


def run_identity(cfg: FinetuneConfig) -> str:
    """A short hash of what a run trains (not how long): equal for a re-run or a resume."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in _RUN_CONTROL_KEYS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_warnings(stats: dict) -> list[str]:
    """One line each for records that will not train as written (skipped, truncated).

    Nothing is dropped silently: a user sees these before the first step.

    Example::

        >>> data_warnings({"records": 10, "skipped": 2, "skipped_reasons": {"no_trained_tokens": 2}, "truncated": 0})
        ['2 of 10 records skipped (no_trained_tokens: 2); `ftmagic preview` shows which and why']
    """
    lines = []
    skipped = stats.get("skipped") or 0
    if skipped:
        reasons = ", ".join(f"{k}: {v}" for k, v in (stats.get("skipped_reasons") or {}).items())
        lines.append(f"{skipped} of {stats.get('records', '?')} records skipped"
                     + (f" ({reasons})" if reasons else "") + "; `ftmagic preview` shows which and why")
    truncated = stats.get("truncated") or 0
    if truncated:
        lines.append(f"{truncated} records are longer than max_seq_len and were truncated; "
                     "raise `max_seq_len` or check them with `ftmagic preview`")
    return lines


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run(cfg: FinetuneConfig, emit: Callable, stop) -> RunResult:
    if cfg.sweep is not None:
        raise ConfigError("`sweep:` searches over many runs: use `ftmagic.sweep(...)`, `ftmagic sweep CONFIG.yaml` "
                          "or a %%finetune cell; or remove the `sweep:` block to train once")
    if cfg.data is None:
        raise ConfigError("`data` is not set: give a file path, a Hugging Face dataset id or a list of records")
    caps = detect_caps()  # the machine is read once; every decision below is a pure function of it
    model_path = resolve_model_path(cfg.model)
    plan = choose_device(caps, cfg.device, cfg.precision, cfg.method)
    notes = _plan_notes(cfg, plan)
    out = Path(cfg.output_dir)
    emit = _with_reporters(emit, cfg, out)
    resume_from = _claim_output_dir(out, cfg, notes)

    tokenizer = load_tokenizer(model_path)
    data = prepare_data(cfg, tokenizer)
    if not data.train:
        raise DataError(f"no training examples came out of `data` ({data.stats.get('records', 0)} records read, "
                        f"{data.stats.get('skipped', 0)} skipped); check the file and `format`")
    emit(Plan(model=cfg.model, method=plan.method, device=plan.device, precision=plan.precision, reason=plan.reason,
              format=data.stats.get("format"), train_records=data.stats.get("train_examples", len(data.train)),
              eval_records=data.stats.get("eval_examples", len(data.eval or [])), output_dir=str(out)))
    notes.extend(Message(text, "warning") for text in data_warnings(data.stats))
    for note in notes:
        emit(note)
    if plan.device == "cuda" and not cfg.skip_memory_check:
        verdict_line = preflight_check(dataclasses.replace(cfg, model=model_path), caps)
        if verdict_line:
            emit(Message(verdict_line))

    _seed_everything(cfg.seed)
    model, plan, method = _load_and_prepare(cfg, plan, model_path, emit)
    trainable, total = count_parameters(model)
    per_epoch, max_steps = plan_steps(len(data.train), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                      epochs=cfg.epochs, max_steps=cfg.max_steps)
    if smoke_mode():
        max_steps = min(max_steps, SMOKE_MAX_STEPS)
    opt_plan = choose_optimizer(cfg.optimizer, plan.device, caps.bnb_available)
    if opt_plan.message:
        emit(Message(opt_plan.message, "warning"))
    resumed_step = ckpt.checkpoint_step(resume_from) if resume_from is not None else 0
    emit(Start(trainable_params=trainable, total_params=total, max_steps=max_steps,
               epochs=max_steps * cfg.grad_accum / per_epoch, resumed_from_step=resumed_step))

    evaluator = evaluator_for(cfg, tokenizer, data.eval_prompts, template=data.template, plan=plan)
    outcome = train_loop(model, data.train, data.eval, config=cfg, plan=plan, optimizer_plan=opt_plan,
                         pad_id=tokenizer.pad_token_id, max_steps=max_steps, emit=emit, stop=stop,
                         checkpoint_root=out / "checkpoints", resume_from=resume_from,
                         shifted=not get_method_spec(plan.method).adds_positions,
                         evaluators=[evaluator] if evaluator is not None else [])

    metrics = run_metrics(outcome, max_steps=max_steps, trainable=trainable, total=total, plan=plan, stats=data.stats)
    model.eval()
    _write_outputs(out, model=model, tokenizer=tokenizer, cfg=cfg, plan=plan, method=method, metrics=metrics,
                   history=outcome.history, model_path=model_path, emit=emit)
    result = RunResult(output_dir=str(out), metrics=metrics, history=outcome.history, config=cfg,
                       model=model, tokenizer=tokenizer, base_model_path=model_path, method=plan.method,
                       plan=dataclasses.asdict(plan))
    export_after_run(result, emit)  # the config's `export:` and `push_to_hub:` keys, if any
    emit(End(reason=outcome.reason, metrics=metrics, output_dir=str(out)))
    return result


def _plan_notes(cfg: FinetuneConfig, plan: DevicePlan) -> list:
    """Messages the user sees right after the plan line (sent once the plan is known)."""
    notes = []
    if smoke_mode():
        notes.append(Message(f"smoke mode (FTMAGIC_SMOKE=1): using the embedded tiny model instead of "
                             f"`{cfg.model}` and at most {SMOKE_MAX_STEPS} steps"))
    if plan.fallback:
        notes.append(Message(plan.fallback, "warning"))
    return notes


def _with_reporters(emit: Callable, cfg: FinetuneConfig, out: Path) -> Callable:
    """``emit`` that also feeds the ``report_to`` trackers (created before any weights load)."""
    sinks = make_reporters(cfg.report_to, out, cfg.to_dict())
    if not sinks:
        return emit

    def emit_and_report(event) -> None:
        emit(event)
        for sink in sinks:
            sink(event)

    return emit_and_report


def _load_and_prepare(cfg: FinetuneConfig, plan: DevicePlan, model_path: str, emit: Callable):
    """Load the base in the plan's dtype (4-bit for QLoRA), apply the method; ``(model, plan, method)``.

    QLoRA on a CPU that bitsandbytes cannot serve falls back to LoRA and says so.
    """
    method = get_method(plan.method)
    weight_dtype = base_weight_dtype(plan, adapter=method.adapter)
    try:
        base = load_model(model_path, device=plan.device, weight_dtype=weight_dtype,
                          qlora_compute_dtype=plan.qlora_compute_dtype if method.quantized else None)
    except (RuntimeError, ImportError, NotImplementedError) as exc:
        if not (method.quantized and plan.device == "cpu"):
            raise
        # bitsandbytes' CPU backend is young; a machine it cannot serve still gets a run.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        emit(Message(f"QLoRA's 4-bit load failed on this CPU ({first[:120]}); using LoRA", "warning"))
        plan = dataclasses.replace(plan, method="lora", qlora_compute_dtype=None)
        method = get_method("lora")
        base = load_model(model_path, device=plan.device, weight_dtype=torch.float32)
    model = method.prepare(base, cfg)
    if keeps_fp32_trainable(plan, adapter=method.adapter):
        _upcast_trainable(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, method.adapter)
    return model, plan, method


def run_metrics(outcome, *, max_steps: int, trainable: int, total: int, plan: DevicePlan, stats: dict) -> dict:
    """``metrics.json``: how the run ended, its losses, size, speed and data counts."""
    return {"train_loss": outcome.train_loss, "eval_loss": outcome.eval_loss,
            "best_eval_loss": outcome.best_eval_loss, "steps": outcome.step, "max_steps": max_steps,
            "trained_tokens": outcome.trained_tokens, "runtime_s": outcome.runtime_s,
            "peak_memory_bytes": outcome.peak_memory_bytes,
            "stopped": outcome.reason in ("stopped", "interrupted"),
            "reason": outcome.reason, "trainable_params": trainable, "total_params": total,
            "method": plan.method, "device": plan.device, "precision": plan.precision,
            **({"eval_metrics": dict(outcome.eval_metrics)} if outcome.eval_metrics else {}),
            **({"best": dict(outcome.best)} if outcome.best else {}),
            "data": {k: v for k, v in (stats or {}).items() if isinstance(v, (int, float, str, bool))}}


def _upcast_trainable(model) -> None:
    """Trainable weights become fp32 masters: optimizer updates smaller than half precision's
    resolution would otherwise be lost, and the fp16 gradient scaler needs fp32 gradients."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def _claim_output_dir(out: Path, cfg: FinetuneConfig, notes: list) -> Optional[Path]:
    """Refuse to overwrite another run; return the checkpoint to resume from, if any."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"`output_dir: {out}` is a file; give a folder path")
    identity = run_identity(cfg)
    run_file = out / RUN_FILE
    previous = None
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}
    busy = out.is_dir() and any(out.iterdir())
    same = previous is not None and previous.get("identity") == identity

    if cfg.resume:
        if busy and previous is None:
            raise CheckpointError(f"`output_dir: {out}` holds files that are not an ftmagic run; nothing to resume there")
        if previous is not None and not same and not cfg.overwrite:
            raise CheckpointError(f"`output_dir: {out}` holds a different run (method {previous.get('method')}, "
                                  f"model {previous.get('model')}); resume with the same config or set `overwrite: true`")
        ckpt.clean_temporaries(out / "checkpoints")
        found = ckpt.latest_checkpoint(out / "checkpoints")
        if found is None:
            notes.append(Message(f"no checkpoint in {out / 'checkpoints'}; starting from step 0", "warning"))
        else:
            notes.append(Message(f"resuming from {found.name}"))
        _write_run_file(out, cfg, identity, finished=False)
        return found

    if busy and not cfg.overwrite:
        if previous is None:
            raise CheckpointError(f"`output_dir: {out}` is not empty and was not written by ftmagic; "
                                  "choose another `output_dir` or set `overwrite: true`")
        if not same:
            raise CheckpointError(f"`output_dir: {out}` already holds a different run (method {previous.get('method')}, "
                                  f"model {previous.get('model')}); set `overwrite: true`, `resume: true`, "
                                  "or choose another `output_dir`")
        notes.append(Message(f"replacing the earlier result of this same config in {out}"))
    if busy:
        for name in _OUTPUT_NAMES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    _write_run_file(out, cfg, identity, finished=False)
    return None


def _write_run_file(out: Path, cfg: FinetuneConfig, identity: str, finished: bool, **extra) -> None:
    out.mkdir(parents=True, exist_ok=True)
    info = {"identity": identity, "model": cfg.model, "method": cfg.method, "finished": finished, **extra}
    (out / RUN_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")


def _write_outputs(out: Path, *, model, tokenizer, cfg, plan: DevicePlan, method, metrics, history, model_path, emit):
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    # PEFT writes adapter_model.safetensors + adapter_config.json; others the full weights.
    with quiet_progress():
        model.save_pretrained(str(out))
    # The training template and every answer-ending token go with the weights (see engine/export/saved.py).
    save_tokenizer(out, tokenizer, cfg)
    write_generation_config(out, tokenizer, cfg, base_dir=model_path)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    (out / "history.json").write_text(json.dumps(history), encoding="utf-8")
    _write_run_file(out, cfg, run_identity(cfg), finished=True, base_model=os.path.abspath(model_path)
                    if os.path.isdir(model_path) else model_path, trained_method=plan.method,
                    adapter=method.adapter, plan=dataclasses.asdict(plan))
    if cfg.merge:
        if not method.adapter:
            emit(Message(f"`merge: true`: {plan.method} already saves full weights"))
        elif not method.mergeable:
            emit(Message(f"`merge: true` does not apply to {plan.method} (virtual tokens cannot be folded into weights)",
                         "warning"))
        else:
            merge_adapter(out, model_path, out / "merged", device=plan.device)
            emit(Message(f"merged weights written to {out / 'merged'}"))


def merge_adapter(adapter_dir, base_path: str, target, device: str = "cpu", dtype=None) -> str:
    """Fold a saved adapter into an unquantized copy of its base and save it to ``target``."""
    from peft import PeftModel

    from ftmagic.engine.models import load_model, load_tokenizer, quiet_peft

    if dtype is None:
        dtype = torch.float32 if device != "cuda" else torch.bfloat16 if detect_caps().bf16_supported else torch.float16
    base = load_model(base_path, device=device, weight_dtype=dtype)
    with quiet_peft():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with quiet_progress():
        merged.save_pretrained(str(target))
    load_tokenizer(str(adapter_dir)).save_pretrained(str(target))
    copy_generation_config(adapter_dir, target)
    return str(target)


def preflight_check(cfg: FinetuneConfig, caps) -> Optional[str]:
    """The memory calculator's verdict for this GPU: raise MemoryFitError when the run will not
    fit, else return its one-line message.

    Example::

        preflight_check(cfg, DeviceCaps(cuda_available=True, name="T4", total_memory=15 * 2**30))
    """
    verdict = preflight(cfg, caps.total_memory, bf16_supported=caps.bf16_supported)
    if not verdict.fits:
        raise MemoryFitError(verdict.message or "the run is not expected to fit this GPU; "
                             "set `skip_memory_check: true` to try anyway")
    return verdict.message


def _oom_message(cfg: FinetuneConfig, caps=None) -> str:
    """One line for a CUDA out-of-memory error: the memory calculator's best changes, or rules of thumb."""
    tips = []
    try:
        caps = caps or detect_caps()
        verdict = preflight(cfg, caps.total_memory, bf16_supported=caps.bf16_supported)
        tips = [s.label for s in (getattr(verdict, "suggestions", None) or [])[:2] if getattr(s, "label", None)]
    except Exception:  # the calculator only adds hints; the message stands without it
        tips = []
    if not tips:
        if cfg.batch_size > 1:
            tips.append(f"`batch_size: {max(1, cfg.batch_size // 2)}` with `grad_accum: {cfg.grad_accum * 2}`")
        if not cfg.gradient_checkpointing:
            tips.append("`gradient_checkpointing: true`")
        if not get_method_spec(cfg.method).quantized and not get_method_spec(cfg.method).prompt_learning:
            tips.append("`method: qlora`")
        if cfg.max_seq_len > 256:
            tips.append(f"`max_seq_len: {cfg.max_seq_len // 2}`")
    return "CUDA ran out of GPU memory; try " + ", or ".join(tips or ["a smaller model"]) + " (see `%ft_memory`)"


__all__ = ["finetune", "resolve_config", "run_identity", "merge_adapter"]

"""``finetune()``: configuration in, trained model and :class:`RunResult` out.

The steps, in order: resolve the config; choose device and precision; claim ``output_dir``
(check it and take its lock, :mod:`ftmagic.engine.outdir`); load the tokenizer and prepare
the data; emit the ``plan`` event; check memory (CUDA); load the model and apply the
method; pick the checkpoint to resume from (the newest that reads completely); start the
run (only now are old outputs removed and the run record written); run the loop; write
the adapter or weights, tokenizer, config and metrics through a staging folder; emit
``end``; release the lock, whatever happened.

Example::

    from ftmagic.engine.run import finetune
    result = finetune(model="tiny", data="train.jsonl", method="lora", max_steps=50,
                      on_event=lambda e: print(e.kind, getattr(e, "loss", "")))
    print(result.metrics["train_loss"], result.generate("reverse: abc"))
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
from array import array
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ftmagic.adapters import plan_continuation
from ftmagic.config import FinetuneConfig
from ftmagic.data import prepare_data
from ftmagic.constants import SMOKE_MAX_STEPS, smoke_mode
from ftmagic.engine import checkpoint as ckpt
from ftmagic.engine.generation import evaluator_for
from ftmagic.engine.heads import pad_for_export
from ftmagic.engine.device import (DevicePlan, base_weight_dtype, choose_device, choose_optimizer, detect_caps,
                                   keeps_fp32_trainable, limit_onednn_cache)
from ftmagic.engine.distributed import LaunchInfo, Ranks, launch_info, plan_distributed
from ftmagic.engine.export import export_after_run
from ftmagic.engine.export.saved import copy_generation_config, save_tokenizer, write_generation_config
from ftmagic.engine.loop import LoopState, plan_steps, train_loop
from ftmagic.engine.methods import count_parameters, continue_adapter, enable_gradient_checkpointing, get_method
from ftmagic.engine.models import (FOUR_BIT_FAILURES, four_bit_failure, head_settings, hidden_size_of, load_model,
                                  load_tokenizer, quiet_progress, resolve_model_path)
from ftmagic.engine.objectives import build_objective
from ftmagic.engine.reporting import TRACKER_FILE, make_reporters
from ftmagic.engine.outdir import (Claim, already_finished, claim_output_dir, publish, stage, start_run,
                                  wants_run_end_outputs, write_record)
from ftmagic.engine.result import RunResult
from ftmagic.engine.threads import plan_threads, run_threads
from ftmagic.errors import CheckpointError, ConfigError, DataError, FtmagicError, MemoryFitError
from ftmagic.events import End, Message, Plan, Start
from ftmagic.memory import preflight
from ftmagic.memory.architectures import fit_to_context
from ftmagic.methods import get_method_spec
from ftmagic.objectives import get_objective_spec

# Keys that steer how long or how a run proceeds but not what it trains: changing them
# keeps the run "the same" for output_dir protection and resume.
_RUN_CONTROL_KEYS = ("overwrite", "resume", "skip_memory_check", "report_to", "max_steps", "epochs", "save_steps",
                     "save_total_limit", "eval_steps", "logging_steps", "early_stopping_patience", "merge", "device",
                     "output_dir", "precision", "optimizer", "gradient_checkpointing", "export", "gguf_quant",
                     "push_to_hub", "hub_private", "on_nan", "trust_remote_code",
                     "threads", "processes", "distributed",
                     # what evaluations measure and how a search varies the run, not what one run trains:
                     "eval_metrics", "eval_max_new_tokens", "best_metric", "sweep")


def finetune(config: Any = None, *, on_event: Optional[Callable] = None, stop=None, **overrides: Any) -> RunResult:
    """Fine-tune a model; return a :class:`RunResult`.

    ``config`` is a :class:`FinetuneConfig`, a dict, a YAML file path, or None (then the
    keyword ``overrides`` are the whole config). ``on_event(event)`` receives the progress
    events (the typed records of :mod:`ftmagic.events`; ``event.to_dict()`` gives a plain
    dict); ``stop`` (anything with ``is_set()``, e.g. ``threading.Event``) ends the run
    after the current step with a checkpoint. Ctrl-C does the same.

    ``processes: N`` starts N processes through accelerate (:mod:`ftmagic.engine.launch`)
    and reports the first one's events here; under ``accelerate launch`` or ``torchrun``
    this process is one of the launcher's, and only the first one reports.

    Example::

        result = finetune("run.yaml", lr=1e-4)
        result = finetune(model="tiny", data=records, method="qlora", max_steps=30,
                          on_event=lambda e: print(e.kind, getattr(e, "loss", "")))
        result = finetune(model="tiny", data=records, processes=2)    # two processes, one result
    """
    cfg = resolve_config(config, overrides)
    cfg.check_trainable()
    info = launch_info()
    if info.world == 1 and cfg.processes > 1:
        from ftmagic.engine.launch import run_processes

        return run_processes(cfg, on_event=on_event, stop=stop)
    claims: list[Claim] = []  # the output_dir claim, released whatever happens
    try:
        return _run(cfg, on_event or (lambda event: None), stop, claims, info)
    except torch.OutOfMemoryError:
        raise MemoryFitError(_oom_message(cfg)) from None
    finally:
        for claim in claims:
            claim.release()


def resolve_config(config: Any, overrides: dict) -> FinetuneConfig:
    """Turn any accepted spelling of a config into a validated :class:`FinetuneConfig`."""
    if isinstance(config, FinetuneConfig):
        if overrides:
            return config.replace(**overrides)
        config.validate()  # a config built directly (FinetuneConfig(...)) was never checked
        return config
    if isinstance(config, dict):
        return FinetuneConfig.from_dict(config, **overrides)
    if isinstance(config, (str, os.PathLike)):
        return FinetuneConfig.from_file(str(config), **overrides)
    if config is None:
        return FinetuneConfig.from_dict(overrides)
    raise ConfigError(f"config must be a FinetuneConfig, a dict or a YAML path, not {type(config).__name__}")


def run_settings(cfg: FinetuneConfig) -> dict:
    """What a run trains (not how long, nor where it reports), as JSON values: the run record keeps
    them, so a refused re-run can name the settings that changed."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in _RUN_CONTROL_KEYS}
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def run_identity(cfg: FinetuneConfig) -> str:
    """A short hash of what a run trains (not how long): equal for a re-run or a resume."""
    return hashlib.sha256(json.dumps(run_settings(cfg), sort_keys=True).encode()).hexdigest()[:16]


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


def _run(cfg: FinetuneConfig, emit: Callable, stop, claims: list, info: LaunchInfo = LaunchInfo()) -> RunResult:
    cfg, continuing = plan_continuation(cfg)  # `model:` or `adapter:` at an earlier run's adapter: keep training it
    caps = detect_caps()  # the machine is read once; every decision below is a pure function of it
    model_path = resolve_model_path(cfg.model)
    plan = choose_device(caps, cfg.device, cfg.precision, cfg.method, hidden_size=hidden_size_of(model_path))
    limit_onednn_cache(plan)  # before the first kernel is built
    ranks = None
    if info.world > 1:
        dplan = plan_distributed(cfg, plan.device, info, precision=plan.precision)
        ranks = Ranks.start(dplan, plan)  # joins the other processes (accelerate)
        # From here the config says how the run really goes; neither key changes what it trains.
        cfg = dataclasses.replace(cfg, processes=dplan.world, distributed=dplan.strategy)
        if not ranks.is_main:
            emit = _silent  # one process reports; the others compute the same things
    notes = [Message(continuing)] if continuing else []
    max_seq_len, cut = fit_to_context(model_path, cfg.max_seq_len)
    if cut:  # cut before the run's identity is taken: a re-run of the same config cuts the same
        cfg = dataclasses.replace(cfg, max_seq_len=max_seq_len)
        notes.append(Message(cut, "warning"))
    result = _train(cfg, caps, plan, model_path, emit, stop, ranks, claims, notes)
    if ranks is not None:
        ranks.close()
    return result


def _silent(event) -> None:
    """The events of every process but the first: they would repeat its own."""


def _train(cfg: FinetuneConfig, caps, plan: DevicePlan, model_path: str, emit: Callable, stop, ranks, claims: list,
           notes: list) -> RunResult:
    """:func:`_trained` with the ``report_to`` trackers fed from its events (by the first process only),
    created before any weights load; a run that raises closes their records as failed."""
    out = Path(os.path.expanduser(cfg.output_dir))
    sinks = make_reporters(cfg.report_to, out, cfg.to_dict()) if ranks is None or ranks.is_main else []
    try:
        return _trained(cfg, caps, plan, model_path, _with_reporters(emit, sinks), stop, ranks, claims, notes, out)
    except BaseException as error:
        for sink in sinks:
            try:
                sink.fail(error)
            except Exception:  # the tracker's record comes second: the run's own error is the one to see
                pass
        raise


def _trained(cfg: FinetuneConfig, caps, plan: DevicePlan, model_path: str, emit: Callable, stop, ranks, claims: list,
             notes: list, out: Path) -> RunResult:
    main = ranks is None or ranks.is_main
    opt_plan = choose_optimizer(cfg.optimizer, plan.device, caps.bnb_available)
    notes = notes + _plan_notes(cfg, plan)
    if ranks is not None:
        notes.append(Message(ranks.plan.reason))

    def claim_dir() -> tuple:
        # Checks and locks output_dir; nothing there is written or removed until the run starts.
        claim = claim_output_dir(out, cfg, identity=run_identity(cfg), optimizer=opt_plan.name,
                                 note=lambda level, text: notes.append(Message(text, level)), settings=run_settings(cfg))
        claims.append(claim)
        return claim.resume, claim.finished

    # With several processes the first one claims output_dir; the others get its answer (or its error).
    resume, finished = claim_dir() if ranks is None else ranks.main_decides(claim_dir)

    tokenizer = load_tokenizer(_tokenizer_folder(cfg, model_path), trust_remote_code=cfg.trust_remote_code)
    data = prepare_data(cfg, tokenizer)
    if not data.train:
        reasons = ", ".join(f"{k} {v}" for k, v in (data.stats.get("skipped_reasons") or {}).items())
        raise DataError(f"no training examples came out of `data` ({data.stats.get('records', 0)} records read, "
                        f"{data.stats.get('skipped', 0)} skipped" + (f": {reasons}" if reasons else "")
                        + "); check the file and `format` (`ftmagic preview` shows each problem)")
    per_epoch, max_steps = plan_steps(len(data.train), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                      epochs=cfg.epochs, max_steps=cfg.max_steps)
    if smoke_mode():
        max_steps = min(max_steps, SMOKE_MAX_STEPS)
    fingerprint = data_fingerprint(data)
    done = already_finished(finished, max_steps, fingerprint)
    if done is not None and not wants_run_end_outputs(cfg, out):
        # Nothing to continue: no model loads, no checkpoint, output or tracker record is written again.
        emit(Message(done))
        result = RunResult.load(out)
        emit(End(reason=result.metrics.get("reason", "finished"), metrics=result.metrics, output_dir=str(out)))
        return result
    emit(Plan(model=cfg.model, method=plan.method, device=plan.device, precision=plan.precision, reason=plan.reason,
              format=data.stats.get("format"), train_records=data.stats.get("train_examples", len(data.train)),
              eval_records=data.stats.get("eval_examples", len(data.eval or [])), output_dir=str(out),
              processes=cfg.processes, distributed=cfg.distributed if ranks is not None else None,
              objective=cfg.objective))
    notes.extend(Message(text, "warning") for text in data_warnings(data.stats))
    if data.stats.get("split"):
        notes.append(Message(f"{data.stats['split']} `text` records longer than max_seq_len={cfg.max_seq_len} train as "
                             f"{data.stats['blocks']} blocks (`long_text: truncate` keeps only their first block)"))
    for note in notes:
        emit(note)
    if plan.device == "cuda" and not cfg.skip_memory_check:
        verdict_line = preflight_check(dataclasses.replace(cfg, model=model_path), caps)
        if verdict_line:
            emit(Message(verdict_line))

    _seed_everything(cfg.seed)
    model, plan, method, reference = _load_and_prepare(cfg, plan, model_path, emit, ranks, labels=data.labels)
    trainable, total = count_parameters(model)
    threads = plan_threads(cfg.threads, params=total, device=plan.device)
    if threads.threads is not None:
        emit(Message(threads.reason))
    if opt_plan.message:
        emit(Message(opt_plan.message, "warning"))
    resume_from = _find_resume_point(resume, out, model, emit)
    # The run really starts here: only now are old outputs removed and the run record written.
    if main:
        start_run(claims[0], cfg, fingerprint=fingerprint, names=_run_folders(cfg))
    resumed_step = resume_from.step if resume_from is not None else 0
    emit(Start(trainable_params=trainable, total_params=total, max_steps=max_steps,
               epochs=max_steps * cfg.grad_accum / per_epoch, resumed_from_step=resumed_step))

    objective = build_objective(cfg, model, pad_id=tokenizer.pad_token_id, plan=plan, reference=reference,
                                shifted=not get_method_spec(plan.method).adds_positions, labels=data.labels)
    evaluator = evaluator_for(cfg, tokenizer, data.eval_prompts, template=data.template, plan=plan)
    with run_threads(threads), _stop_on_signals(stop, ranks) as stop:
        outcome = train_loop(model, data.train, data.eval, config=cfg, plan=plan, optimizer_plan=opt_plan,
                             max_steps=max_steps, emit=emit, stop=stop, checkpoint_root=out / "checkpoints",
                             resume_from=resume_from, objective=objective, ranks=ranks,
                             evaluators=[evaluator] if evaluator is not None else [])
    del objective, reference  # DPO's frozen copy is not needed past training

    metrics = run_metrics(outcome, max_steps=max_steps, trainable=trainable, total=total, plan=plan, stats=data.stats,
                          threads=threads.threads)
    if ranks is not None:
        metrics.update(processes=ranks.world, distributed=ranks.plan.strategy)
    model.eval()
    # Sharded weights are gathered whole (every process takes part); the first process writes and exports.
    state_dict = ranks.full_state_dict() if ranks is not None and ranks.spec.shards else None
    result = RunResult(output_dir=str(out), metrics=metrics, history=outcome.history, config=cfg,
                       model=model, tokenizer=tokenizer, base_model_path=model_path, method=plan.method,
                       plan=dataclasses.asdict(plan), labels=data.labels)
    if main:
        _write_outputs(out, claims[0], model=model, tokenizer=tokenizer, cfg=cfg, plan=plan, method=method,
                       metrics=metrics, history=outcome.history, model_path=model_path, emit=emit,
                       fingerprint=fingerprint, result=result, state_dict=state_dict, labels=data.labels)
        export_after_run(result, emit)  # the config's `export:` and `push_to_hub:` keys, if any
    emit(End(reason=outcome.reason, metrics=metrics, output_dir=str(out)))
    if ranks is not None:
        ranks.barrier()  # no process ends before the outputs are written
    return result


def _tokenizer_folder(cfg: FinetuneConfig, model_path: str) -> str:
    """Where the tokenizer comes from: a continued adapter's folder holds the one its first stage trained with."""
    if cfg.adapter and any((Path(cfg.adapter).expanduser() / name).is_file()
                           for name in ("tokenizer.json", "tokenizer_config.json")):
        return str(Path(cfg.adapter).expanduser())
    return model_path


@contextmanager
def _stop_on_signals(stop, ranks):
    """On several processes, Ctrl-C (SIGINT) and a launcher's SIGTERM become a Stop that the
    processes agree on at the next logging step, so they all save the same checkpoint;
    a second Ctrl-C interrupts at once. One process keeps Python's own KeyboardInterrupt."""
    if ranks is None or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    flag = _SignalStop(stop)
    previous = {sig: signal.signal(sig, flag.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _SignalStop:
    """``stop`` plus the signals a multi-process run received."""

    def __init__(self, stop) -> None:
        self.stop, self.signalled = stop, False

    def handle(self, signum, frame) -> None:
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signalled = True

    def is_set(self) -> bool:
        return self.signalled or (self.stop is not None and self.stop.is_set())


def _plan_notes(cfg: FinetuneConfig, plan: DevicePlan) -> list:
    """Messages the user sees right after the plan line (sent once the plan is known)."""
    notes = []
    if smoke_mode():
        notes.append(Message(f"smoke mode (FTMAGIC_SMOKE=1): using the embedded tiny model instead of "
                             f"`{cfg.model}` and at most {SMOKE_MAX_STEPS} steps"))
    if plan.fallback:
        notes.append(Message(plan.fallback, "warning"))
    return notes


def _with_reporters(emit: Callable, sinks: list) -> Callable:
    """``emit`` that also feeds the ``report_to`` trackers."""
    if not sinks:
        return emit

    def emit_and_report(event) -> None:
        emit(event)
        for sink in sinks:
            sink(event)

    return emit_and_report


def _load_and_prepare(cfg: FinetuneConfig, plan: DevicePlan, model_path: str, emit: Callable, ranks=None,
                      labels=None):
    """Load the base in the plan's dtype (4-bit for QLoRA), apply the method; ``(model, plan, method, reference)``.

    QLoRA on a CPU that bitsandbytes cannot serve falls back to LoRA and says so. Under
    FSDP and DeepSpeed the weights stay in host memory until the strategy shards them onto
    the GPU (QLoRA quantizes on the GPU, with its 4-bit weights stored in the compute dtype).
    The objective's head (reward, classify) is loaded with the model. ``reference`` is DPO's
    frozen copy of the starting model for methods that change the base weights; adapter
    methods need none (the base with the adapter switched off is the reference), unless the
    adapter continues an earlier run's: then its starting weights (:class:`StartingWeights`).
    """
    method = get_method(plan.method)
    weight_dtype = base_weight_dtype(plan, adapter=method.adapter)
    sharded = ranks is not None and bool(ranks.spec.shards)
    device = "cpu" if sharded and not method.quantized else plan.device
    head = head_settings(cfg.objective, labels)
    try:
        base = load_model(model_path, device=device, weight_dtype=weight_dtype,
                          qlora_compute_dtype=plan.qlora_compute_dtype if method.quantized else None,
                          quant_storage=plan.qlora_compute_dtype if sharded and method.quantized else None,
                          trust_remote_code=cfg.trust_remote_code, head=head)
    except FOUR_BIT_FAILURES as exc:
        if not (method.quantized and plan.device == "cpu"):
            raise
        # bitsandbytes' CPU backend is young; a machine it cannot serve still gets a run.
        emit(Message(f"QLoRA's 4-bit load failed on this CPU ({four_bit_failure(exc)}); using LoRA", "warning"))
        plan = dataclasses.replace(plan, method="lora", qlora_compute_dtype=None)
        method = get_method("lora")
        base = load_model(model_path, device=plan.device, weight_dtype=torch.float32,
                          trust_remote_code=cfg.trust_remote_code, head=head)
    reference = None
    if get_objective_spec(cfg.objective).reference and not method.adapter:
        reference = copy.deepcopy(base).eval().requires_grad_(False)
    model = continue_adapter(base, cfg.adapter, plan.method, cfg.objective) if cfg.adapter else method.prepare(base, cfg)
    if keeps_fp32_trainable(plan, adapter=method.adapter):
        _upcast_trainable(model)
    if get_objective_spec(cfg.objective).reference and cfg.adapter:
        from ftmagic.engine.preference import StartingWeights

        reference = StartingWeights(model)  # the continued adapter is part of the starting model
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, method.adapter)
    return model, plan, method, reference


def run_metrics(outcome, *, max_steps: int, trainable: int, total: int, plan: DevicePlan, stats: dict,
                threads: Optional[int] = None) -> dict:
    """``metrics.json``: how the run ended, its losses, size, speed and data counts."""
    return {"train_loss": outcome.train_loss, "eval_loss": outcome.eval_loss,
            "best_eval_loss": outcome.best_eval_loss, "steps": outcome.step, "max_steps": max_steps,
            "trained_tokens": outcome.trained_tokens, "runtime_s": outcome.runtime_s,
            "peak_memory_bytes": outcome.peak_memory_bytes,
            "stopped": outcome.reason in ("stopped", "interrupted"),
            "reason": outcome.reason, "trainable_params": trainable, "total_params": total,
            "method": plan.method, "device": plan.device, "precision": plan.precision, "threads": threads,
            **({"eval_metrics": dict(outcome.eval_metrics)} if outcome.eval_metrics else {}),
            **({"skipped_steps": outcome.skipped_steps} if outcome.skipped_steps else {}),
            **({"best": dict(outcome.best)} if outcome.best else {}),
            "data": {k: v for k, v in (stats or {}).items() if isinstance(v, (int, float, str, bool))}}


def _upcast_trainable(model) -> None:
    """Trainable weights become fp32 masters: optimizer updates smaller than half precision's
    resolution would otherwise be lost, and the fp16 gradient scaler needs fp32 gradients."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def _find_resume_point(resume: bool, out: Path, model, emit: Callable) -> Optional[ckpt.Checkpoint]:
    """The checkpoint to resume from: the newest that reads completely and fits ``model`` (a
    damaged newer one is named and skipped); None for a fresh run (``resume`` false)."""
    if not resume:
        return None
    found = ckpt.find_resumable(out / "checkpoints", model, warn=lambda text: emit(Message(text, "warning")),
                                required=LoopState.JSON_TYPES)
    if found is None:
        emit(Message(f"no checkpoint in {out / 'checkpoints'}; starting from step 0", "warning"))
    else:
        emit(Message(f"resuming from {found.name}"))
    return found


def _run_folders(cfg: FinetuneConfig) -> tuple:
    """Top-level folders (and the trackers' ids) a run may create while it trains (its manifest from the start)."""
    reports = [cfg.report_to] if isinstance(cfg.report_to, str) else list(cfg.report_to or [])
    kept = (TRACKER_FILE,) if {"wandb", "mlflow"} & set(reports) else ()
    return (("checkpoints",) + tuple(name for tool, name in (("tensorboard", "runs"), ("wandb", "wandb")) if tool in reports)
            + kept)


def data_fingerprint(data) -> str:
    """A hash of exactly what the run trains and evaluates on (token ids, labels, packing).

    Equal for the same data, template, tokenizer, ``max_seq_len`` and seed; resume compares it.

    Example::

        data_fingerprint(prepared)   # 'b3c1...' (32 hex digits)
    """
    digest = hashlib.blake2b(digest_size=16)
    for part, rows in (("train", data.train), ("eval", data.eval or [])):
        digest.update(f"{part}:{len(rows)}".encode())
        for row in rows:
            for key in sorted(row):
                value = row[key]
                digest.update(key.encode())
                try:  # token ids and labels: hashed as machine integers (C speed)
                    digest.update(array("q", value).tobytes())
                except (TypeError, OverflowError):
                    digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _write_outputs(out: Path, claim: Claim, *, model, tokenizer, cfg, plan: DevicePlan, method, metrics, history,
                   model_path, emit, fingerprint: str, result: RunResult, state_dict: Optional[dict] = None,
                   labels=None):
    """Write the result into a staging folder, then move it into ``out`` (never over a user's file).

    ``result``: the run as it is returned (its model card is made from it); ``state_dict``: the
    weights gathered from sharded processes; ``labels``: a classifier's label names.
    """
    import yaml

    from ftmagic.engine.checkpoint import is_disk_full, save_model, strict_json
    from ftmagic.engine.export import folder_card

    staging = None
    notes = []
    try:
        staging = stage(out)
        # PEFT writes adapter_model.safetensors + adapter_config.json; others the full weights.
        # Full weights with a head are a model plain transformers loads: saved with the pad it pools right with.
        with quiet_progress(), pad_for_export(model, tokenizer, head_settings(cfg.objective, labels)):
            save_model(model, staging, state_dict=state_dict)
        # The training template and every answer-ending token go with the weights (see engine/export/saved.py).
        save_tokenizer(staging, tokenizer, cfg)
        write_generation_config(staging, tokenizer, cfg, base_dir=model_path)
        (staging / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        (staging / "metrics.json").write_text(strict_json(metrics), encoding="utf-8")
        (staging / "history.json").write_text(strict_json(history), encoding="utf-8")
        # ftmagic's model card (what the Hub export writes), not peft's empty template.
        for name, text in folder_card(result, staging, adapter=method.adapter).items():
            (staging / name).write_text(text, encoding="utf-8")
        if cfg.merge:
            if not method.adapter:
                notes.append(Message(f"`merge: true`: {plan.method} already saves full weights"))
            elif not method.mergeable:
                notes.append(Message(f"`merge: true` does not apply to {plan.method} (virtual tokens cannot be folded "
                                     "into weights)", "warning"))
            else:
                merge_adapter(staging, model_path, staging / "merged", device=plan.device,
                              trust_remote_code=cfg.trust_remote_code, head=head_settings(cfg.objective, labels),
                              quantized=plan.method == "qlora", on_note=lambda text: notes.append(Message(text)))
                notes.append(Message(f"merged weights written to {out / 'merged'}"))
        written = publish(staging, out, claim.files)
    except FtmagicError:
        raise
    except Exception as exc:  # safetensors and tokenizers report a full disk in their own types
        if not (isinstance(exc, OSError) or is_disk_full(exc)):
            raise
        where = f"; the partial outputs are in {staging}" if staging is not None and staging.exists() else ""
        why = "the disk is full" if is_disk_full(exc) else (getattr(exc, "strerror", None) or str(exc).splitlines()[0])
        raise CheckpointError(f"the trained model could not be written to {out} ({why}){where}; the checkpoints "
                              "are intact, so `resume: true` writes it again") from None
    write_record(out, claim, cfg, finished=True, fingerprint=fingerprint, files=claim.files | set(written),
                 reason=metrics.get("reason"),
                 base_model=os.path.abspath(model_path) if os.path.isdir(model_path) else model_path,
                 trained_method=plan.method, adapter=method.adapter, plan=dataclasses.asdict(plan),
                 objective=cfg.objective, **({"labels": list(labels)} if labels is not None else {}))
    for note in notes:
        emit(note)


def merge_adapter(adapter_dir, base_path: str, target, device: str = "cpu", dtype=None,
                  trust_remote_code: bool = False, head: Optional[dict] = None, quantized: bool = False,
                  on_note: Optional[Callable[[str], None]] = None) -> str:
    """Fold a saved adapter into an unquantized copy of its base and save it to ``target``.

    ``head`` (:func:`~ftmagic.engine.models.head_settings`) for a reward model or classifier; its config
    then names no pad id where the pad is the EOS the head reads (see :func:`~ftmagic.engine.heads.export_pad_id`).
    ``quantized``: the adapter trained on the base's 4-bit NF4 weights (QLoRA). It then folds into those
    weights dequantized, the weights training saw, so the merged model answers as the trained one does;
    folded into the original weights it would be a model nobody trained (on the embedded tiny model the
    logits differ by up to 6). Where 4-bit cannot load here, the original weights are used and
    ``on_note`` says so.

    Example::

        merge_adapter("runs/qlora", "meta-llama/Llama-3.2-1B", "runs/qlora/merged", quantized=True)
    """
    from peft import PeftModel

    from ftmagic.engine.models import load_model, load_tokenizer, quiet_peft

    if dtype is None:
        dtype = torch.float32 if device != "cuda" else torch.bfloat16 if detect_caps().bf16_supported else torch.float16
    base = _dequantized_base(base_path, device, dtype, trust_remote_code, head, on_note) if quantized else None
    if base is None:
        base = load_model(base_path, device=device, weight_dtype=dtype, trust_remote_code=trust_remote_code, head=head)
    with quiet_peft():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tokenizer = load_tokenizer(str(adapter_dir), trust_remote_code=trust_remote_code)
    with quiet_progress(), pad_for_export(merged, tokenizer, head):
        merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    copy_generation_config(adapter_dir, target)
    return str(target)


def _dequantized_base(base_path: str, device: str, dtype, trust_remote_code: bool, head: Optional[dict],
                      on_note: Optional[Callable[[str], None]]):
    """The base loaded in 4-bit NF4 as QLoRA trains on it, then dequantized to ``dtype`` (transformers'
    ``dequantize``: every 4-bit layer becomes a plain ``Linear`` with the weights the 4-bit one computes
    with); None, after ``on_note``, where 4-bit cannot load on this machine."""
    from transformers.utils import logging as hf_logging

    try:
        # float32 computes: the dequantized values are the codebook times the block scales whatever it is.
        model = load_model(base_path, device=device, weight_dtype=dtype, qlora_compute_dtype="float32",
                           trust_remote_code=trust_remote_code, head=head)
    except FOUR_BIT_FAILURES as exc:
        if on_note is not None:
            on_note(f"the adapter was folded into {base_path}'s original weights, not the 4-bit ones it trained on "
                    f"(4-bit cannot load here: {four_bit_failure(exc)}); "
                    "the merged model's answers may differ slightly from the trained model's")
        return None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its note that the modules were dequantized is what was asked for
    try:
        model = model.dequantize()
    finally:
        hf_logging.set_verbosity(verbosity)
    model.is_loaded_in_4bit = False  # read by peft: the layers are plain now
    return model.to(dtype)


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
        # Changes to this run on this GPU: the error happened here, more GPUs are another question.
        tips = [s.label for s in (getattr(verdict, "suggestions", None) or [])
                if getattr(s, "label", None) and "devices" not in (getattr(s, "changes", None) or {})][:2]
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

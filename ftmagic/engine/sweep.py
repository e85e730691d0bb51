"""``sweep()``: a hyperparameter search over fine-tuning runs, with Optuna.

Optuna does the searching (grid, random and TPE samplers; median pruning on the curve
each trial reports at its evaluations; a journal file as storage, so a search resumes
after a crash). This module adds what is specific to fine-tuning:

* each trial is a plain :func:`~ftmagic.engine.run.finetune` run in its own folder,
  ``<output_dir>/trial-NNN`` (with its ``metrics.json``), so every trial can be opened
  with ``RunResult.load`` and nothing of one trial touches another;
* before a trial starts, the memory calculator (:func:`ftmagic.memory.preflight`) drops
  it when it would not fit the GPU (state ``skipped``), instead of an out-of-memory error
  minutes in;
* a trial that raises is recorded as ``failed`` with its one-line reason and the search
  goes on; a trial that was stopped (Stop button, Ctrl-C, a killed process) is resumed
  from its own checkpoint when the same sweep runs again;
* ``sweep.json`` in ``output_dir`` lists every trial (written atomically after each), and
  the best trial's config comes back as a ready ``%%finetune`` cell.

Example::

    from ftmagic.engine.sweep import sweep
    result = sweep("run.yaml")               # a YAML with a `sweep:` block
    result.best_params, result.best_value, result.best.generate("reverse: lamp")
    print(result.best_cell())
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ftmagic.config import FinetuneConfig
from ftmagic.engine.device import detect_caps
from ftmagic.engine.reporting import tracking_group
from ftmagic.engine.run import finetune, resolve_config, run_identity
from ftmagic.errors import CheckpointError, ConfigError, FtmagicError
from ftmagic.evalevents import SweepEnd, Trial
from ftmagic.events import Eval, Message, Start
from ftmagic.memory import preflight
from ftmagic.sweep_spec import SweepSpec, best_cell, parse_sweep

STORAGE_FILE = "sweep.optuna.log"  # Optuna's journal: every trial's params, reports and result
SUMMARY_FILE = "sweep.json"
STUDY_NAME = "ftmagic-sweep"
EXTRA_HINT = "pip install 'ftmagic[sweep]'"
STATES = ("complete", "pruned", "failed", "skipped")


def trial_fit_problem(cfg: FinetuneConfig, caps) -> Optional[str]:
    """Why a trial will not fit this machine's GPU (the memory calculator's one line), or None.

    A pure function of the config and the device's capabilities (tested with faked ones):
    only CUDA runs are checked, as in :func:`~ftmagic.engine.run.finetune`.

    Example::

        trial_fit_problem(cfg.replace(batch_size=64), DeviceCaps(cuda_available=True, total_memory=16 * 2**30))
    """
    if not getattr(caps, "cuda_available", False) or cfg.skip_memory_check or cfg.device in ("cpu", "mps"):
        return None
    from ftmagic.engine.models import resolve_model_path

    try:
        model = resolve_model_path(cfg.model)
    except FtmagicError:
        model = cfg.model
    verdict = preflight(dataclasses.replace(cfg, model=model), caps.total_memory, bf16_supported=caps.bf16_supported)
    return None if verdict.fits else verdict.message


def sweep_identity(cfg: FinetuneConfig, spec: SweepSpec, *, with_trials: bool = False) -> str:
    """What a sweep searches and on what: equal when the same search runs again (and resumes), with
    more trials too (``--set sweep.n_trials=12`` continues a study). ``with_trials``: the identity
    earlier versions wrote, which counted the trials, so their studies continue as well."""
    space = spec.to_dict()
    if not with_trials:
        space.pop("n_trials")
    values = {"base": run_identity(cfg.replace(sweep=None)), "spec": space}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _same_sweep(recorded, cfg: FinetuneConfig, spec: SweepSpec) -> bool:
    """Whether an identity read from the folder (None: none yet) is this sweep's."""
    return recorded in (None, sweep_identity(cfg, spec), sweep_identity(cfg, spec, with_trials=True))


class _Stop:
    """The trial's stop: the user's (Stop button, ``stop``) or the pruner's."""

    def __init__(self, outer):
        self.outer, self.pruned = outer, False

    def is_set(self) -> bool:
        return self.pruned or (self.outer is not None and self.outer.is_set())


def sweep(config: Any = None, *, on_event: Optional[Callable] = None, stop=None, **overrides: Any) -> "SweepResult":
    """Run the search of ``config``'s ``sweep:`` block; return a :class:`SweepResult`.

    ``config`` is what :func:`~ftmagic.engine.run.finetune` takes. ``on_event`` receives
    every trial's own events and the ``trial`` / ``sweep_end`` events of
    :mod:`ftmagic.evalevents`; ``stop`` ends the running trial with a checkpoint (resumed
    the next time the same sweep runs) and the search.

    Example::

        result = sweep(model="tiny", data=records, val_split=0.1, max_steps=50,
                       sweep={"lr": [1e-4, 1e-3], "lora_r": [8, 16]}, output_dir="runs/search")
    """
    cfg = resolve_config(config, overrides)
    if cfg.sweep is None:
        raise ConfigError("there is no `sweep:` block to search; add one, e.g. `sweep: {lr: [1.0e-4, 3.0e-4]}`")
    spec = parse_sweep(cfg.sweep, cfg)
    optuna = _optuna()
    emit = on_event or (lambda event: None)
    out = Path(cfg.output_dir)
    identity = sweep_identity(cfg, spec)
    _claim(out, cfg, spec, identity)
    study = _study(optuna, out, spec, cfg.seed)
    if not _same_sweep(study.user_attrs.get("identity"), cfg, spec):
        raise CheckpointError(f"`output_dir: {out}` holds a different sweep; set `overwrite: true` or choose another "
                              "`output_dir`")
    study.set_user_attr("identity", identity)
    _requeue_unfinished(optuna, study, emit)

    caps = detect_caps()
    summary = SweepSummary(out, spec)
    summary.read_trials(study)
    reason = "finished"
    with tracking_group(out, out.name or "ftmagic-sweep"):
        while summary.counted(study) < spec.n_trials:
            if stop is not None and stop.is_set():
                reason = "stopped"
                break
            outcome = _run_trial(optuna, study, spec, cfg, out, caps, emit, stop)
            summary.read_trials(study)
            summary.write()
            if outcome == "stopped":
                reason = "stopped"
                break
    summary.read_trials(study)
    summary.write(reason=reason)
    best = summary.best()
    emit(SweepEnd(metric=spec.metric, direction=spec.direction, best_number=best["number"] if best else None,
                  best_value=best["value"] if best else None, best_params=dict(best["params"]) if best else {},
                  output_dir=str(out), counts=summary.counts(), reason=reason))
    return SweepResult.load(out, config=cfg)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"`sweep:` needs the optuna package ({EXTRA_HINT})") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep reports trials itself
    return optuna


def _claim(out: Path, cfg: FinetuneConfig, spec: SweepSpec, identity: str) -> None:
    """Refuse a folder that holds something else; with ``overwrite``, clear an earlier sweep of another search."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"`output_dir: {out}` is a file; give a folder path")
    storage = out / STORAGE_FILE
    busy = out.is_dir() and any(out.iterdir())
    if busy and not storage.exists() and not cfg.overwrite:
        raise CheckpointError(f"`output_dir: {out}` is not empty and holds no sweep; choose another `output_dir` "
                              "or set `overwrite: true`")
    previous = _read_json(out / SUMMARY_FILE).get("identity")
    same = _same_sweep(previous, cfg, spec)
    if cfg.overwrite and (not same or not storage.exists()):
        # Only what a sweep writes is removed: its storage, summary and trial folders.
        for path in [storage, out / SUMMARY_FILE, *out.glob("trial-*")] if out.is_dir() else []:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    elif not same:
        raise CheckpointError(f"`output_dir: {out}` holds a different sweep (other base config or search space); "
                              "set `overwrite: true` or choose another `output_dir`")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / SUMMARY_FILE, {**_read_json(out / SUMMARY_FILE), "identity": identity})


def _study(optuna, out: Path, spec: SweepSpec, seed: int):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / STORAGE_FILE)))
    if spec.sampler == "grid":
        sampler = optuna.samplers.GridSampler(spec.grid(), seed=seed)
    elif spec.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, spec.n_trials // 3)))
    # Two finished trials give the median something to compare with; a curve is judged from its first evaluation.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if spec.pruner == "median" else optuna.pruners.NopPruner()
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner,
                               direction=spec.direction, load_if_exists=True)


def _requeue_unfinished(optuna, study, emit: Callable) -> None:
    """Trials a killed or stopped sweep left behind run again, from their own checkpoints."""
    TrialState = optuna.trial.TrialState
    storage = study._storage
    trials = study.get_trials(deepcopy=False)
    claimed = {t.user_attrs.get("output_dir") for t in trials
               if t.state in (TrialState.WAITING, TrialState.COMPLETE, TrialState.PRUNED)}
    for t in trials:
        if t.state == TrialState.RUNNING:  # the process that ran it is gone (one sweep per folder)
            storage.set_trial_user_attr(t._trial_id, "ftmagic_state", "interrupted")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and t.user_attrs.get("ftmagic_state") in ("interrupted", "stopped")):
            continue
        folder = t.user_attrs.get("output_dir")
        if folder in claimed:
            continue
        claimed.add(folder)
        study.enqueue_trial(dict(t.params), user_attrs={"resume_dir": folder, "resumes": t.number})
        emit(Message(f"sweep: trial {t.number} did not finish; it continues from its checkpoint"))


def _suggest(trial, spec: SweepSpec) -> dict:
    params = {}
    for space in spec.spaces:
        if space.kind == "choices":
            params[space.key] = trial.suggest_categorical(space.key, list(space.choices))
        elif space.kind == "int":
            params[space.key] = trial.suggest_int(space.key, int(space.low), int(space.high), step=space.step or 1)
        else:
            params[space.key] = trial.suggest_float(space.key, space.low, space.high, log=space.kind == "log_uniform",
                                                    step=space.step)
    return params


def _run_trial(optuna, study, spec: SweepSpec, cfg: FinetuneConfig, out: Path, caps, emit: Callable, stop) -> str:
    """Ask Optuna for a trial, run it, tell the result; returns its state (or ``stopped``)."""
    TrialState = optuna.trial.TrialState
    trial = study.ask()
    params = _suggest(trial, spec)
    resume_dir = trial.user_attrs.get("resume_dir")
    if resume_dir is not None:
        # The grid sampler knows its points by `grid_id`; the resumed trial stands on its predecessor's.
        old = study.get_trials(deepcopy=False)[trial.user_attrs["resumes"]]
        for key in ("grid_id", "search_space"):
            if key in old.system_attrs:
                study._storage.set_trial_system_attr(trial._trial_id, key, old.system_attrs[key])
    folder = Path(resume_dir) if resume_dir else out / f"trial-{trial.number:03d}"
    trial.set_user_attr("output_dir", str(folder))
    base = dict(number=trial.number, params=params, metric=spec.metric, output_dir=str(folder), n_trials=spec.n_trials)
    try:
        trial_cfg = cfg.replace(**params, sweep=None, output_dir=str(folder), resume=bool(resume_dir),
                                overwrite=not resume_dir)
    except ConfigError as exc:  # a combination the block's per-key checks could not see
        return _finish(study, trial, TrialState.FAIL, "failed", base, emit, message=str(exc))
    problem = trial_fit_problem(trial_cfg, caps)
    if problem:
        return _finish(study, trial, TrialState.PRUNED, "skipped", base, emit, message=problem)
    # A trial that takes over an unfinished one runs in that one's folder: say so where it starts.
    continues = f"continues trial {trial.user_attrs['resumes']} in {folder}" if resume_dir else ""
    emit(Trial(state="running", **base, message=continues))

    trial_stop = _Stop(stop)
    curve: list = []

    total = {"steps": None}

    def on_trial_event(event) -> None:
        emit(event)
        if isinstance(event, Start):
            total["steps"] = event.max_steps
        if isinstance(event, Eval):
            value = event.eval_loss if spec.metric == "eval_loss" else event.metrics.get(spec.metric)
            if value is None:
                return
            curve.append((event.step, value))
            if event.step == 0:
                return  # the base model: nothing of this trial's settings shows yet, nothing to judge
            trial.report(value, event.step)
            # The last evaluation ends the trial anyway: its result counts in full, never as pruned.
            if event.step != total["steps"] and trial.should_prune():
                trial_stop.pruned = True

    started = time.perf_counter()
    try:
        result = finetune(trial_cfg, on_event=on_trial_event, stop=trial_stop)
    except KeyboardInterrupt:
        _finish(study, trial, TrialState.FAIL, "stopped", base, emit, curve=curve, runtime=time.perf_counter() - started)
        return "stopped"
    except Exception as exc:  # noqa: BLE001 - any crash of one trial is recorded; the search goes on
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = text if isinstance(exc, FtmagicError) else f"{type(exc).__name__}: {text}".rstrip(": ")
        return _finish(study, trial, TrialState.FAIL, "failed", base, emit, message=message, curve=curve,
                       runtime=time.perf_counter() - started)
    runtime = time.perf_counter() - started
    if trial_stop.pruned:
        return _finish(study, trial, TrialState.PRUNED, "pruned", base, emit, curve=curve, runtime=runtime,
                       message=pruned_message(curve[-1][0], spec.metric, curve[-1][1], spec.direction),
                       value=curve[-1][1])
    if result.metrics.get("stopped"):
        _finish(study, trial, TrialState.FAIL, "stopped", base, emit, curve=curve, runtime=runtime,
                message="stopped; the same sweep continues it from its checkpoint")
        return "stopped"
    value = final_value(result.metrics, spec.metric)
    if value is None:
        return _finish(study, trial, TrialState.FAIL, "failed", base, emit, curve=curve, runtime=runtime,
                       message=f"the run reported no `{spec.metric}`")
    return _finish(study, trial, TrialState.COMPLETE, "complete", base, emit, curve=curve, runtime=runtime,
                   value=value)


def pruned_message(step: int, metric: str, value: float, direction: str) -> str:
    """Why a trial was pruned, worded by the metric's direction.

    Optuna's median pruner stops a trial whose best value so far is worse than the median of
    earlier trials at the same step: for a loss (``minimize``) that is above the median, for
    a score below it.

    Example::

        >>> pruned_message(20, "eval_loss", 1.234567, "minimize")
        'pruned at step 20: eval_loss 1.235 trails the median of earlier trials there (above it; lower is better)'
        >>> pruned_message(20, "exact_match", 0.1, "maximize")
        'pruned at step 20: exact_match 0.1 trails the median of earlier trials there (below it; higher is better)'
    """
    side, better = ("above", "lower") if direction == "minimize" else ("below", "higher")
    return (f"pruned at step {step}: {metric} {value:.4g} trails the median of earlier trials there "
            f"({side} it; {better} is better)")


def final_value(metrics: dict, metric: str) -> Optional[float]:
    """The trial's score: the final model's ``metric`` from its ``metrics.json``.

    Example::

        >>> final_value({"eval_loss": 1.5, "eval_metrics": {"exact_match": 0.75}}, "exact_match")
        0.75
    """
    if metric == "eval_loss":
        return metrics.get("eval_loss")
    return (metrics.get("eval_metrics") or {}).get(metric)


def _finish(study, trial, state, label: str, base: dict, emit: Callable, *, message: str = "", curve=(),
            runtime: Optional[float] = None, value: Optional[float] = None) -> str:
    trial.set_user_attr("ftmagic_state", label)
    trial.set_user_attr("message", message)
    trial.set_user_attr("curve", [list(point) for point in curve])
    if runtime is not None:
        trial.set_user_attr("runtime_s", round(runtime, 2))
    try:
        study.tell(trial, value if label == "complete" else None, state=state)
    except RuntimeError as exc:
        # The grid sampler calls `study.stop()` when its grid is done, which only `optimize` allows;
        # the trial's result is stored before that (optuna's `_tell`), and the loop ends on its count.
        if "Study.stop" not in str(exc):
            raise
    emit(Trial(state=label, value=value, message=message, runtime_s=runtime, curve=[list(p) for p in curve], **base))
    return label


class SweepSummary:
    """``sweep.json``: the search, every trial and the best one, rewritten atomically after each trial."""

    def __init__(self, out: Path, spec: SweepSpec):
        self.out, self.spec, self.trials = out, spec, []

    def read_trials(self, study) -> None:
        rows = []
        for t in study.get_trials(deepcopy=False):
            state = t.user_attrs.get("ftmagic_state") or t.state.name.lower()
            if t.state.name in ("WAITING",):
                continue
            if t.state.name == "RUNNING":
                state = "running"
            rows.append({"number": t.number, "state": state, "params": dict(t.params),
                         "value": t.value if t.state.name == "COMPLETE" else None,
                         "output_dir": t.user_attrs.get("output_dir", ""), "message": t.user_attrs.get("message", ""),
                         "runtime_s": t.user_attrs.get("runtime_s"), "curve": t.user_attrs.get("curve", [])})
        self.trials = rows

    def counted(self, study) -> int:
        """Trials that count toward ``n_trials``: ended, and not waiting to be resumed."""
        waiting = {t.user_attrs.get("resumes") for t in study.get_trials(deepcopy=False) if t.state.name == "WAITING"}
        return sum(1 for t in self.trials if t["state"] in STATES or
                   (t["state"] in ("stopped", "interrupted") and t["number"] not in waiting
                    and not any(u["output_dir"] == t["output_dir"] and u["number"] > t["number"] for u in self.trials)))

    def counts(self) -> dict:
        out: dict = {}
        for t in self.trials:
            out[t["state"]] = out.get(t["state"], 0) + 1
        return out

    def best(self) -> Optional[dict]:
        done = [t for t in self.trials if t["state"] == "complete" and t["value"] is not None]
        if not done:
            return None
        pick = max if self.spec.direction == "maximize" else min
        return pick(done, key=lambda t: t["value"])

    def write(self, reason: Optional[str] = None) -> None:
        previous = _read_json(self.out / SUMMARY_FILE)
        best = self.best()
        _write_json(self.out / SUMMARY_FILE, {
            "identity": previous.get("identity"), "spec": self.spec.to_dict(), "metric": self.spec.metric,
            "direction": self.spec.direction, "n_trials": self.spec.n_trials, "trials": self.trials,
            "best": best, "counts": self.counts(), "finished": reason == "finished" if reason else False})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, values: dict) -> None:
    """Write next to the target, then rename: a kill mid-write leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


class SweepResult:
    """A finished (or stopped) sweep: its trials, the best one, and its config as a ready cell.

    Example::

        result = SweepResult.load("runs/search")
        result.best_params, result.best_value
        ft = result.best             # the best trial's RunResult
        print(result.best_cell())    # %%finetune cell with the best values
    """

    def __init__(self, output_dir: str, summary: dict, config: Optional[FinetuneConfig] = None):
        self.output_dir = output_dir
        self.summary = summary
        self.config = config
        self.metric = summary.get("metric")
        self.direction = summary.get("direction")
        self.trials: list = summary.get("trials", [])
        best = summary.get("best") or {}
        self.best_number = best.get("number")
        self.best_value = best.get("value")
        self.best_params: dict = dict(best.get("params") or {})
        self._best = None

    def __repr__(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in (self.summary.get("counts") or {}).items())
        return (f"SweepResult(output_dir={self.output_dir!r}, metric={self.metric!r}, best_value={self.best_value!r}, "
                f"best_params={self.best_params!r}, trials: {counts})")

    @classmethod
    def load(cls, output_dir, config: Optional[FinetuneConfig] = None) -> "SweepResult":
        summary = _read_json(Path(output_dir) / SUMMARY_FILE)
        if "trials" not in summary:
            raise CheckpointError(f"`{output_dir}` holds no sweep (no readable {SUMMARY_FILE})")
        return cls(str(output_dir), summary, config)

    @property
    def best(self):
        """The best trial's :class:`~ftmagic.engine.result.RunResult` (None when no trial completed)."""
        if self._best is None and self.best_number is not None:
            from ftmagic.engine.result import RunResult

            folder = next(t["output_dir"] for t in self.trials if t["number"] == self.best_number)
            self._best = RunResult.load(folder)
        return self._best

    def best_cell(self, values: Optional[dict] = None, *, name: str = "ft") -> str:
        """The best trial as a ready ``%%finetune`` cell: ``values`` (the cell or file as written; default:
        the config's non-default fields) with the sweep block replaced by the best values."""
        if values is None:
            from ftmagic.sweep_spec import changed_fields

            values = changed_fields(self.config) if self.config is not None else {}
        return best_cell(values, self.best_params, output_dir=str(Path(self.output_dir) / "best"), name=name)

    def table(self) -> list:
        """One row per trial: number, state, each parameter, the value, the runtime."""
        return [{"trial": t["number"], "state": t["state"], **t["params"], self.metric: t["value"],
                 "runtime_s": t.get("runtime_s")} for t in self.trials]

    @property
    def study(self):
        """The Optuna study (for Optuna's own plots and analysis)."""
        optuna = _optuna()
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(str(Path(self.output_dir) / STORAGE_FILE)))
        return optuna.load_study(study_name=STUDY_NAME, storage=storage)

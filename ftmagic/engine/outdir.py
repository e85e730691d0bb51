"""Who may write in an ``output_dir``, and what a run is allowed to remove there.

Rules (the README's "What ftmagic promises" section states them for users):

- One run per folder at a time (:mod:`ftmagic.engine.runlock`).
- The run record ``ftmagic_run.json`` lists every top-level file and folder the run wrote
  (its manifest). ``overwrite: true`` removes only those; a file ftmagic did not write is
  never removed or replaced, and a run whose outputs would land on one is refused.
- A folder holding an unfinished or stopped run is continued with ``resume: true`` or
  replaced with ``overwrite: true``; a plain re-run is refused instead of deleting its
  checkpoints. A finished run of the same config is replaced (same config, same result).
- The record is written when the run really starts (model loaded, checkpoint read, data
  checked), so a run that fails on a typo leaves nothing that refuses the corrected one,
  and a refused resume leaves the record as it was.

Example::

    claim = claim_output_dir(Path("runs/a"), cfg, identity=run_identity(cfg), optimizer="adamw")
    try:
        ...                                   # load model and data
        start_run(claim, cfg, fingerprint)    # removes old outputs (overwrite), writes the record
        ...                                   # train, write outputs
        finish_run(claim, cfg, written, **extra)
    finally:
        claim.release()
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ftmagic.constants import RUN_FILE
from ftmagic.engine.runlock import LOCK_NAME, RunLock
from ftmagic.errors import CheckpointError
from ftmagic.export.card import LOSS_CURVE_FILE

RECORD_VERSION = 2
STAGING_PREFIX = ".ftmagic-staging-"
# Names a run may write at the top of output_dir (model and tokenizer files vary by model;
# these are the common ones, checked before training so a clash is refused early).
OUTPUT_NAMES = ("checkpoints", "merged", "gguf", "runs", "wandb", "adapter_model.safetensors", "adapter_config.json",
                "model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                "config.yaml", "metrics.json", "history.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "README.md", "vocab.json",
                "merges.txt", "tokenizer.model", "added_tokens.json", "vocab.txt", "spiece.model", LOSS_CURVE_FILE)
_BOOKKEEPING = (RUN_FILE, LOCK_NAME)


@dataclass
class Claim:
    """What :func:`claim_output_dir` decided; the lock is held until :meth:`release`."""

    out: Path
    lock: Optional[RunLock]
    identity: str
    optimizer: str
    previous: Optional[dict]
    resume: bool  # continue from the checkpoints
    remove: list = field(default_factory=list)  # names removed when the run starts
    created: bool = False  # the folder did not exist before
    started: bool = False
    files: set = field(default_factory=set)  # the manifest: top-level names this run (and the one it resumes) wrote
    settings: Optional[dict] = None  # what the run trains (``run_settings``), kept in the record
    finished: Optional[dict] = None  # resuming a run that finished: its ``finished_run`` facts, else None

    def release(self) -> None:
        """Drop the lock; a folder this claim created and nothing was written to is removed again."""
        if self.lock is not None:
            self.lock.release()
        if self.created and not self.started:
            try:
                self.out.rmdir()
            except OSError:
                pass


def read_record(out: Path) -> Optional[dict]:
    """The run record of ``out``: None without one, ``{}`` when it is unreadable."""
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def owned_names(record: Optional[dict], entries: set) -> set:
    """Top-level names the recorded run wrote (a record without a manifest: ftmagic's usual outputs)."""
    if not record:
        return set()
    files = record.get("files")
    if isinstance(files, list):
        return {name for name in files if isinstance(name, str) and "/" not in name and name not in ("", ".", "..")}
    return {name for name in entries if name in OUTPUT_NAMES}


def claim_output_dir(out: Path, cfg, *, identity: str, optimizer: str,
                     note: Callable[[str, str], None], settings: Optional[dict] = None) -> Claim:
    """Check that this run may use ``out`` and lock it; nothing is written or removed yet.

    ``note(level, text)`` receives the lines the user should see. ``settings`` (what the run
    trains) go into the record, so a later run of another config is told what differs.
    """
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"`output_dir: {out}` is a file; give a folder path")
    created = not out.exists()
    try:
        lock = RunLock.acquire(out, note=lambda text: note("warning", text))
    except OSError as exc:
        raise CheckpointError(f"`output_dir: {out}` cannot be written ({exc.strerror or exc})") from None
    try:
        claim = _decide(out, cfg, identity, optimizer, note, kept_settings(settings))
    except BaseException:
        lock.release()
        if created:
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    claim.lock, claim.created = lock, created
    return claim


# A setting's value longer than this (records written inline in a mixture) is kept as its size and hash.
KEPT_VALUE_CHARS = 1000


def kept_settings(settings: Optional[dict]) -> Optional[dict]:
    """``settings`` as the run record keeps them: long values as their size and hash, which still
    tell two runs apart.

    Example::

        >>> kept_settings({"lr": 0.001, "data": [{"text": "x" * 2000}]})["data"][:20]
        '<2,014 characters, s'
    """
    if settings is None:
        return None
    out = {}
    for key, value in settings.items():
        text = json.dumps(value, sort_keys=True)
        if len(text) > KEPT_VALUE_CHARS:
            value = f"<{len(text):,} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}>"
        out[key] = value
    return out


def what_differs(previous: dict, settings: Optional[dict], most: int = 3) -> str:
    """The settings in which this run differs from the recorded one, for a refusal; the recorded
    run's method and model where its record predates kept settings.

    Example::

        >>> what_differs({"settings": {"lr": 0.0002, "lora_r": 16}}, {"lr": 0.001, "lora_r": 16})
        '`lr: 0.001`, where it trained with `lr: 0.0002`'
    """
    before = previous.get("settings")
    if not isinstance(before, dict) or settings is None:
        return f"method {previous.get('method')}, model {previous.get('model')}"
    keys = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if not keys:  # the same settings under an older identity
        return f"method {previous.get('method')}, model {previous.get('model')}"
    pairs = [(k, *_shown_apart(settings.get(k), before.get(k))) for k in keys[:most]]
    shown = ", ".join(f"`{k}: {now}`" for k, now, _ in pairs)
    was = ", ".join(f"`{k}: {then}`" for k, _, then in pairs)
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return f"{shown}{more}, where it trained with {was}"


def _shown_apart(now, then, width: int = 40) -> tuple:
    """Two values as short texts that still differ: a long pair is shown from a little before
    where they part (two paths that differ in their last characters)."""
    texts = ["null" if v is None else v if isinstance(v, str) else json.dumps(v) for v in (now, then)]
    if max(len(t) for t in texts) <= width:
        return tuple(texts)
    start = max(0, len(os.path.commonprefix(texts)) - width // 3)
    return tuple(("..." if start else "") + t[start:start + width] + ("..." if len(t) > start + width else "")
                 for t in texts)


def _decide(out: Path, cfg, identity: str, optimizer: str, note, settings: Optional[dict] = None) -> Claim:
    previous = read_record(out)
    entries = {item.name for item in out.iterdir()
               if item.name not in _BOOKKEEPING and not item.name.startswith((STAGING_PREFIX, LOCK_NAME))}
    owned = owned_names(previous, entries)
    foreign = sorted(entries - owned)
    same = bool(previous) and previous.get("identity") == identity
    claim = Claim(out=out, lock=None, identity=identity, optimizer=optimizer, previous=previous, resume=False,
                  settings=settings)

    if cfg.resume and not (cfg.overwrite and previous and not same):
        if previous is None:
            if foreign:
                raise CheckpointError(f"`output_dir: {out}` holds files that are not an ftmagic run; nothing to resume there")
            note("warning", f"no checkpoint in {out / 'checkpoints'}; starting from step 0")
            return claim
        if not same:
            raise CheckpointError(f"`output_dir: {out}` holds a different run ({what_differs(previous, settings)}); "
                                  "resume with the same config or set `overwrite: true`")
        recorded = previous.get("optimizer")
        if isinstance(recorded, str) and recorded != optimizer:
            raise CheckpointError(f"`output_dir: {out}` was trained with `optimizer: {recorded}`; its checkpoints hold "
                                  f"that optimizer's state, so resume with `optimizer: {recorded}` (or set "
                                  "`overwrite: true` and `resume: false` to start over)")
        _refuse_clashes(out, foreign)
        claim.resume = True
        claim.finished = finished_run(out, previous)
        return claim

    if previous is not None and not cfg.overwrite:
        if not same:
            raise CheckpointError(f"`output_dir: {out}` already holds a different run "
                                  f"({what_differs(previous, settings)}); set `overwrite: true`, `resume: true`, "
                                  "or choose another `output_dir`")
        unfinished = not previous.get("finished") or previous.get("reason") in ("stopped", "interrupted")
        if unfinished and _has_checkpoint(out):
            where = _checkpoint_hint(out)
            raise CheckpointError(f"`output_dir: {out}` holds an unfinished run of this config{where}; set `resume: true` "
                                  "to continue it, or `overwrite: true` to start over (its checkpoints are deleted)")
        # Finished, or stopped before it wrote anything to continue from (a metric that failed at step 0).
        note("info", f"replacing the earlier {'result' if not unfinished else 'start'} of this same config in {out}")
    elif previous is None and foreign and not cfg.overwrite:
        raise CheckpointError(f"`output_dir: {out}` is not empty and was not written by ftmagic; "
                              "choose another `output_dir` or set `overwrite: true` (files ftmagic did not write "
                              "are never removed)")
    elif cfg.resume and cfg.overwrite and previous and not same:
        note("warning", f"`output_dir: {out}` holds a different run; `overwrite: true` replaces it and this run starts at step 0")
    _refuse_clashes(out, foreign)
    claim.remove = sorted(owned & entries)
    return claim


# How a run ends when it ran its course; a resume of it has nothing left to continue (at the same length).
COMPLETE_REASONS = ("finished", "early_stopping")


def finished_run(out: Path, record: Optional[dict]) -> Optional[dict]:
    """``{"steps", "max_steps", "reason", "fingerprint"}`` of the run in ``out`` when it ran its
    course (finished, or stopped early), read from its record and ``metrics.json``; else None.

    A resume of such a run with the same length and data continues nothing: it changes
    nothing and says so. One with more steps (``max_steps`` or ``epochs`` raised) continues,
    and so does one whose newest checkpoint is older than its end (the later ones removed).
    """
    from ftmagic.engine import checkpoint as ckpt

    if not record or not record.get("finished") or record.get("reason") not in COMPLETE_REASONS:
        return None
    try:
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    steps, max_steps = (metrics.get(k) if isinstance(metrics, dict) else None for k in ("steps", "max_steps"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, max_steps)):
        return None
    newest = ckpt.latest_checkpoint(out / "checkpoints")
    if newest is not None and (ckpt.step_of(newest) or 0) < steps:
        return None  # resume goes on from that checkpoint, as it would after a stop
    return {"steps": steps, "max_steps": max_steps, "reason": record["reason"],
            "fingerprint": record.get("data_fingerprint")}


def already_finished(finished: Optional[dict], max_steps: int, fingerprint: str) -> Optional[str]:
    """The line a resume of a finished run says instead of running again (None: it runs).

    Example::

        >>> done = {"steps": 40, "max_steps": 40, "reason": "finished", "fingerprint": "ab"}
        >>> already_finished(done, 40, "ab")[:62]
        'this run already finished (40 of 40 steps); resume changes not'
        >>> already_finished(done, 60, "ab") is None, already_finished(done, 40, "cd") is None
        (True, True)
    """
    if finished is None or max_steps > finished["max_steps"] or fingerprint != finished["fingerprint"]:
        return None  # more steps to train; changed data is refused when the run starts
    steps, most = finished["steps"], finished["max_steps"]
    done = (f"stopped early at step {steps} of {most}" if finished["reason"] == "early_stopping"
            else f"finished ({steps} of {most} steps)")
    return (f"this run already {done}; resume changes nothing: raise `max_steps` or `epochs` to train on, "
            "or run it without `resume: true` to train it again from step 0")


def wants_run_end_outputs(cfg, out: Path) -> bool:
    """Whether a resume of a finished run asks for what only the end of a run writes and the folder
    lacks: ``merge: true`` with no ``merged/`` yet, an ``export`` or a Hub upload. Such a resume goes
    through the run's end again (the last checkpoint, its final evaluation, the outputs) to write them.

    Example::

        wants_run_end_outputs(FinetuneConfig(..., merge=True), Path("runs/done"))   # True until merged/ exists
    """
    if getattr(cfg, "merge", False) and not (out / "merged" / "config.json").is_file():
        return True
    return bool(getattr(cfg, "export", None)) or bool(getattr(cfg, "push_to_hub", None))


def _refuse_clashes(out: Path, foreign: list) -> None:
    clashes = [name for name in foreign if name in OUTPUT_NAMES]
    if clashes:
        shown = ", ".join(clashes[:4]) + (f" and {len(clashes) - 4} more" if len(clashes) > 4 else "")
        raise CheckpointError(f"`output_dir: {out}` holds {shown}, which ftmagic did not write and would overwrite; "
                              "they are never replaced: move them or choose another `output_dir`")


def _has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a checkpoint a resume could continue from."""
    from ftmagic.engine import checkpoint as ckpt

    return ckpt.latest_checkpoint(out / "checkpoints") is not None


def _checkpoint_hint(out: Path) -> str:
    from ftmagic.engine import checkpoint as ckpt

    newest = ckpt.latest_checkpoint(out / "checkpoints")
    return f" (newest checkpoint: {newest.name})" if newest is not None else ""


def start_run(claim: Claim, cfg, *, fingerprint: str, names: tuple = ("checkpoints",)) -> None:
    """The run really starts: check the data on resume, remove the old outputs, write the record."""
    out = claim.out
    if claim.resume and claim.previous:
        recorded = claim.previous.get("data_fingerprint")
        if isinstance(recorded, str) and recorded != fingerprint:
            raise CheckpointError(f"the training data changed since the checkpoints in `{out}` were written (data "
                                  f"fingerprint {recorded[:12]} then, {fingerprint[:12]} now); resuming would continue on "
                                  "other examples: restore the data, or set `resume: false` and `overwrite: true` to start over")
    for item in out.iterdir():
        if item.name.startswith(STAGING_PREFIX) and item.is_dir():
            shutil.rmtree(item, ignore_errors=True)  # outputs of an earlier run that could not be moved into place
    for name in claim.remove:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    claim.files = set(names)
    if claim.resume and claim.previous:
        claim.files |= owned_names(claim.previous, {item.name for item in out.iterdir()})
    write_record(out, claim, cfg, finished=False, fingerprint=fingerprint, files=claim.files)
    claim.started = True


def write_record(out: Path, claim: Claim, cfg, *, finished: bool, fingerprint: str, files, **extra) -> None:
    """Write ``ftmagic_run.json`` atomically (strict JSON)."""
    from ftmagic.engine.checkpoint import strict_json

    info = {"version": RECORD_VERSION, "identity": claim.identity, "model": cfg.model, "method": cfg.method,
            "optimizer": claim.optimizer, "data_fingerprint": fingerprint, "finished": finished,
            "files": sorted(set(files)), "updated": time.time(), **extra}
    if claim.settings is not None:
        info["settings"] = claim.settings
    atomic_write_text(out / RUN_FILE, strict_json(info))


def record_outputs(out: Path, names) -> None:
    """Add ``names`` (top-level entries an export wrote into a finished run's folder) to its manifest."""
    out = Path(out)
    record = read_record(out)
    if not record:
        return
    files = set(owned_names(record, {item.name for item in out.iterdir()})) | set(names)
    if files != set(record.get("files") or []):
        from ftmagic.engine.checkpoint import strict_json

        atomic_write_text(out / RUN_FILE, strict_json({**record, "files": sorted(files)}))


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def stage(out: Path) -> Path:
    """A fresh staging folder inside ``out`` where outputs are written before they move into place."""
    folder = out / f"{STAGING_PREFIX}{os.getpid()}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def publish(staging: Path, out: Path, owned: set) -> list[str]:
    """Move every entry of ``staging`` into ``out``; an existing name ftmagic does not own is never replaced.

    Returns the names moved. On a clash nothing is moved and the staging folder is kept.
    """
    names = sorted(item.name for item in staging.iterdir())
    clashes = [name for name in names if (out / name).exists() and name not in owned]
    if clashes:
        raise CheckpointError(f"`output_dir: {out}` holds {', '.join(clashes[:4])}, which ftmagic did not write; "
                              f"the trained outputs are kept in {staging} instead of replacing them")
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()
    return names

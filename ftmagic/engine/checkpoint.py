"""Checkpoints that survive a kill at any moment, and exact resume.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000042`` holding the
trainable weights (``trainable.safetensors``; adapters also in PEFT format), optimizer, scheduler and gradient
scaler states, the RNG states of python, numpy and torch, and ``state.json`` (step,
data position, best eval loss, history). It is written into a temporary folder next
to its final place, every file is fsynced, and only then is the folder renamed; the
``COMPLETE`` marker is its last file. A kill mid-write leaves a ``.tmp-*`` folder that
:func:`latest_checkpoint` ignores, so the last good checkpoint always loads.

Example::

    path = save_checkpoint(ckpt_root, step=10, model=model, optimizer=opt, scheduler=sched,
                           scaler=None, state={"step": 10}, keep=2)
    newest = latest_checkpoint(ckpt_root)          # -> path
    state = load_checkpoint(newest, model=model, optimizer=opt, scheduler=sched, scaler=None)
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ftmagic.errors import CheckpointError

MARKER = "COMPLETE"
PREFIX = "step-"
RANK_RNG_FILE = "rng_ranks.pt"  # every process's RNG states (multi-process runs)
ENGINE_PREFIX = "engine-"  # DeepSpeed's own partitioned checkpoint, written beside ours by every process


def trainable_state(model) -> dict:
    """A CPU copy of the parameters that train, by name (all of them for full fine-tuning)."""
    # copy=True: on the CPU `.to("cpu")` would return the live tensor, which keeps training.
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters()
            if p.requires_grad}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open folders; rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_files(tmp: Path, *, model, optimizer, scheduler, scaler, state: dict, best: Optional[dict] = None,
                 trainable: Optional[dict] = None, optimizer_state: Optional[dict] = None,
                 rank_rngs: Optional[list] = None) -> None:
    """Write every part of a checkpoint into ``tmp`` (split out so tests can interrupt it).

    ``trainable`` and ``optimizer_state`` are given when no single process holds them
    (gathered from sharded processes); ``rank_rngs`` holds every process's RNG states.
    """
    from safetensors.torch import save_file

    weights = trainable if trainable is not None else trainable_state(model)
    save_file(weights, str(tmp / "trainable.safetensors"))
    if best is not None:
        save_file(best, str(tmp / "best.safetensors"))  # weights of the best evaluation (early stopping)
    if hasattr(model, "peft_config"):
        # The adapter in PEFT format too (a few MB), so any checkpoint can be loaded for inference.
        model.save_pretrained(str(tmp), **({"state_dict": trainable} if trainable is not None else {}))
    torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    if rank_rngs is not None:
        torch.save(rank_rngs, tmp / RANK_RNG_FILE)
    (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")


def save_checkpoint(root, *, step: int, model, optimizer, scheduler, scaler, state: dict, keep: int = 2,
                    best: Optional[dict] = None, **gathered) -> Path:
    """Atomically write checkpoint ``step`` under ``root`` and drop all but the newest ``keep`` (0: keep all).

    ``gathered`` (``trainable``, ``optimizer_state``, ``rank_rngs``) comes from
    :func:`save_distributed` on the process that writes.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_files(tmp, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, state=state, best=best,
                     **gathered)
        (tmp / MARKER).write_text(str(step), encoding="utf-8")
        for item in tmp.iterdir():
            _fsync_file(item)
        _fsync_dir(tmp)
        if final.exists():
            # Same step written twice (a stop right after a periodic save): move the old one
            # aside first; the new folder is complete, so the swap is the only window.
            old = root / f".old-{PREFIX}{step:08d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for stale in list_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (unfinished ``.tmp-*`` folders are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for item in root.iterdir():
        if not item.name.startswith(PREFIX) or not (item / MARKER).is_file():
            continue
        try:
            step = int(item.name[len(PREFIX):])
            json.loads((item / "state.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        found.append((step, item))
    return [path for _, path in sorted(found)]


def checkpoint_step(path) -> int:
    """The step a checkpoint folder holds (from its ``state.json``)."""
    return int(json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))["step"])


def latest_checkpoint(root) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_distributed(root, *, ranks, step: int, model, optimizer, scheduler, scaler, state: dict, keep: int = 2,
                     best: Optional[dict] = None) -> Optional[Path]:
    """A checkpoint of a multi-process run: every process takes part, the first one writes.

    Sharded weights and optimizer states are gathered whole (so the checkpoint resumes on
    any number of processes), every process's RNG states are kept, and DeepSpeed writes
    its own partitioned state beside the checkpoint (same process count to resume).
    Returns the checkpoint's path (on every process).
    """
    trainable = ranks.trainable_state()
    optimizer_state = ranks.optimizer_state(optimizer)
    rank_rngs = ranks.gather(rng_state())
    if ranks.spec.engine == "deepspeed":
        engine_dir = Path(root) / f"{ENGINE_PREFIX}{step:08d}"
        ranks.wrapped.save_checkpoint(str(engine_dir))  # every process writes its partition
        state = {**state, "engine_checkpoint": engine_dir.name}
        ranks.barrier()
    path = Path(root) / f"{PREFIX}{step:08d}"
    if ranks.is_main:
        path = save_checkpoint(root, step=step, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                               state=state, keep=keep, best=best, trainable=trainable,
                               optimizer_state=optimizer_state, rank_rngs=rank_rngs)
        kept = {json.loads((p / "state.json").read_text(encoding="utf-8")).get("engine_checkpoint")
                for p in list_checkpoints(root)}
        for stale in Path(root).glob(f"{ENGINE_PREFIX}*"):
            if stale.name not in kept:
                shutil.rmtree(stale, ignore_errors=True)
    ranks.barrier()  # no process runs ahead while a checkpoint is being written
    return path


def load_checkpoint(path, *, model, optimizer, scheduler, scaler) -> dict:
    """Restore weights, optimizer, scheduler, scaler and RNG states; returns ``state.json``."""
    load_weights(path, model)
    return load_training_state(path, optimizer=optimizer, scheduler=scheduler, scaler=scaler)


def _cannot_load(path: Path, exc: Exception) -> CheckpointError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CheckpointError(f"checkpoint {path} cannot be loaded ({first}); delete it to resume from the one before")


def load_weights(path, model) -> None:
    """Copy a checkpoint's trainable weights into ``model`` (before any multi-process wrapping)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        weights = load_file(str(path / "trainable.safetensors"))
    except (OSError, RuntimeError, ValueError) as exc:
        raise _cannot_load(path, exc) from None
    params = dict(model.named_parameters())
    unknown = [name for name in weights if name not in params]
    if unknown:
        raise CheckpointError(f"checkpoint {path} does not match this model (unknown weight `{unknown[0]}`); "
                              "resume with the same model and method, or set `resume: false`")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def load_training_state(path, *, optimizer, scheduler, scaler, ranks=None) -> dict:
    """Restore optimizer, scheduler, scaler and RNG states (weights: :func:`load_weights`); returns ``state.json``.

    On several processes each takes its own RNG states when the checkpoint was written by
    as many processes; on another count every process takes the first one's, as every
    process starts a run from the same seed.
    """
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
        if ranks is None:
            optimizer.load_state_dict(optimizer_state)
        elif ranks.spec.engine == "deepspeed":
            engine = state.get("engine_checkpoint")
            if not engine or not (path.parent / engine).is_dir():
                raise CheckpointError(f"checkpoint {path} has no DeepSpeed state beside it; resume it with "
                                      "the strategy and process count that wrote it")
            ranks.wrapped.load_checkpoint(str(path.parent / engine), load_optimizer_states=True,
                                          load_lr_scheduler_states=False, load_module_strict=False)
        else:
            ranks.load_optimizer_state(optimizer, optimizer_state)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        if scaler is not None and (path / "scaler.pt").exists():
            scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
        rng = torch.load(path / "rng.pt", weights_only=False)
        if ranks is not None and (path / RANK_RNG_FILE).exists():
            per_rank = torch.load(path / RANK_RNG_FILE, weights_only=False)
            if len(per_rank) == ranks.world:
                rng = per_rank[ranks.rank]
        set_rng_state(rng)
        return state
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise _cannot_load(path, exc) from None


def load_best(path) -> Optional[dict]:
    """The best-evaluation weights stored with a checkpoint, or None."""
    from safetensors.torch import load_file

    best = Path(path) / "best.safetensors"
    return load_file(str(best)) if best.is_file() else None


def clean_temporaries(root) -> None:
    """Remove folders left by a write that was killed (they are never used)."""
    root = Path(root)
    if root.is_dir():
        for item in root.iterdir():
            if item.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(item, ignore_errors=True)

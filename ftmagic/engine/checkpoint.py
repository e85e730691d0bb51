"""Checkpoints that survive a kill at any moment, hold no pickles, and resume exactly.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000042`` holding

- ``trainable.safetensors``: the trainable weights (adapters also in PEFT format, so any
  checkpoint can be loaded for inference), and ``best.safetensors`` with early stopping;
- ``training_state.safetensors``: the optimizer, scheduler, gradient scaler and RNG states
  (python, numpy, torch, CUDA). Their tensors are safetensors tensors and the rest of
  each state (numbers, lists, the dict layout) is JSON kept in the file's metadata;
- ``state.json``: step, data position, best eval loss, history;
- ``COMPLETE``: the marker, written last.

Why not ``torch.save``: a ``.pt`` file is a pickle, and loading a pickle runs whatever
code it names. Checkpoints travel (Drive, shared folders), so a resume must never execute
a file; safetensors and JSON are data only. :func:`encode_state` / :func:`decode_state`
are the small codec that lets an optimizer's ``state_dict`` (int keys, tuples, 0-d
tensors) round-trip through them; nothing else in safetensors does this.

A checkpoint is written into ``.tmp-step-N-<pid>`` next to its final place, every file is
fsynced, and only then is the folder renamed. Replacing a checkpoint of the same step (a
stop right after a periodic save) moves the old one to ``.old-step-N-<pid>`` first; a
kill between those two renames leaves both complete, and :func:`recover` puts the newer
one back in place. A checkpoint that cannot be read (a torn file, a garbage state) is
skipped by :func:`find_resumable`, which falls back to the one before and says so.

Example::

    path = save_checkpoint(ckpt_root, step=10, model=model, optimizer=opt, scheduler=sched,
                           scaler=None, state={"step": 10}, keep=2)
    newest = latest_checkpoint(ckpt_root)          # -> path
    state = load_checkpoint(newest, model=model, optimizer=opt, scheduler=sched, scaler=None)
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from ftmagic.errors import CheckpointError, a_type

MARKER = "COMPLETE"
PREFIX = "step-"
WEIGHTS_FILE = "trainable.safetensors"
BEST_FILE = "best.safetensors"
STATES_FILE = "training_state.safetensors"
STATE_FILE = "state.json"
ENGINE_PREFIX = "engine-"  # DeepSpeed's own partitioned checkpoint, written beside ours by every process
_LEFTOVER = re.compile(r"^\.(tmp|old)-step-(\d{8})-\d+$")


# --------------------------------------------------------------------------- state codec


def encode_state(obj, tensors: dict):
    """``obj`` as a JSON-able tree; its tensors (and numpy arrays) move into ``tensors``.

    Example::

        >>> tensors = {}
        >>> encode_state({"state": {0: {"step": torch.tensor(1.0)}}, "betas": (0.9, 0.99)}, tensors)
        {'state': {'$items': [[0, {'step': {'$tensor': 't0'}}]]}, 'betas': {'$tuple': [0.9, 0.99]}}
    """
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        # numpy's RNG key is uint32, which torch handles only partly: stored as int64, cast back on load.
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64))
        return {"$ndarray": key, "dtype": str(obj.dtype)}
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(obj, tuple):
        return {"$tuple": [encode_state(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: encode_state(v, tensors) for k, v in obj.items()}
        return {"$items": [[encode_state(k, tensors), encode_state(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store {a_type(obj)} in a checkpoint")


def decode_state(tree, tensors: dict):
    """The inverse of :func:`encode_state`; a malformed tree raises ``ValueError``."""
    if isinstance(tree, list):
        return [decode_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        if tree is None or isinstance(tree, (bool, int, float, str)):
            return tree
        raise ValueError(f"unexpected {type(tree).__name__} in a stored state")
    if "$tensor" in tree:
        return tensors[_tensor_key(tree, "$tensor", tensors)]
    if "$ndarray" in tree:
        dtype = np.dtype(str(tree.get("dtype")))
        if dtype.kind not in "iub":
            raise ValueError(f"unexpected array type {dtype}")
        return tensors[_tensor_key(tree, "$ndarray", tensors)].numpy().astype(dtype)
    if "$float" in tree:
        text = tree["$float"]
        if text not in ("nan", "inf", "-inf"):
            raise ValueError(f"unexpected number {text!r}")
        return float(text)
    if "$tuple" in tree:
        return tuple(decode_state(tree["$tuple"], tensors))
    if "$items" in tree:
        items = tree["$items"]
        if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
            raise ValueError("malformed mapping")
        return {_hashable(decode_state(k, tensors)): decode_state(v, tensors) for k, v in items}
    if any(k.startswith("$") for k in tree):
        raise ValueError(f"unknown marker {next(k for k in tree if k.startswith('$'))!r}")
    return {k: decode_state(v, tensors) for k, v in tree.items()}


def _tensor_key(tree: dict, marker: str, tensors: dict) -> str:
    key = tree[marker]
    if not isinstance(key, str) or key not in tensors:
        raise ValueError(f"missing tensor {key!r}")
    return key


def _hashable(key):
    if isinstance(key, (list, dict)):
        raise ValueError("a mapping key must be a number or a string")
    return key


# --------------------------------------------------------------------------- saving


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


def strict_json(value) -> str:
    """JSON text with NaN and infinities written as ``null`` (bare ``NaN`` is not JSON).

    Example::

        >>> strict_json({"loss": float("nan"), "steps": [1.5, float("inf")]})
        '{"loss": null, "steps": [1.5, null]}'
    """
    return json.dumps(_finite_or_none(value), allow_nan=False)


def _finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


# peft's save_pretrained writes its empty model-card template here ("More Information Needed").
PEFT_CARD = "README.md"


def save_model(model, folder: Path, *, state_dict: Optional[dict] = None) -> None:
    """``model.save_pretrained(folder)`` without the empty model card peft writes beside an adapter.

    A checkpoint is no model to publish, and a run's folder gets ftmagic's own card
    (:func:`ftmagic.engine.export.folder_card`).
    """
    model.save_pretrained(str(folder), **({"state_dict": state_dict} if state_dict is not None else {}))
    if hasattr(model, "peft_config"):
        (Path(folder) / PEFT_CARD).unlink(missing_ok=True)


def _write_files(tmp: Path, *, model, optimizer, scheduler, scaler, state: dict, best: Optional[dict] = None,
                 trainable: Optional[dict] = None, optimizer_state: Optional[dict] = None,
                 rank_rngs: Optional[list] = None) -> None:
    """Write every part of a checkpoint into ``tmp`` (split out so tests can interrupt it).

    ``trainable`` and ``optimizer_state`` are given when no single process holds them
    (gathered from sharded processes); ``rank_rngs`` holds every process's RNG states.
    """
    from safetensors.torch import save_file

    weights = trainable if trainable is not None else trainable_state(model)
    save_file(weights, str(tmp / WEIGHTS_FILE))
    if best is not None:
        save_file(best, str(tmp / BEST_FILE))  # weights of the best evaluation (early stopping)
    if hasattr(model, "peft_config"):
        # The adapter in PEFT format too (a few MB), so any checkpoint can be loaded for inference.
        save_model(model, tmp, state_dict=trainable)
    parts = {"optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
             "optimizer_class": type(optimizer).__name__, "scheduler": scheduler.state_dict(), "rng": rng_state()}
    if scaler is not None:
        parts["scaler"] = scaler.state_dict()
    if rank_rngs is not None:
        parts["rank_rngs"] = list(rank_rngs)
    tensors: dict = {}
    tree = encode_state(parts, tensors)
    save_file(tensors, str(tmp / STATES_FILE), metadata={"tree": json.dumps(tree, allow_nan=False)})
    (tmp / STATE_FILE).write_text(strict_json(state), encoding="utf-8")


def save_checkpoint(root, *, step: int, model, optimizer, scheduler, scaler, state: dict, keep: int = 2,
                    best: Optional[dict] = None, **gathered) -> Path:
    """Atomically write checkpoint ``step`` under ``root`` and drop all but the newest ``keep`` (0: keep all).

    A full disk or another write error raises a one-line :class:`CheckpointError`; the
    checkpoints already written are untouched. ``gathered`` (``trainable``,
    ``optimizer_state``, ``rank_rngs``) comes from :func:`save_distributed` on the process that writes.
    """
    root = Path(root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_files(tmp, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, state=state, best=best,
                     **gathered)
        (tmp / MARKER).write_text(str(step), encoding="utf-8")
        for item in tmp.iterdir():
            _fsync_file(item)
        _fsync_dir(tmp)
        if final.exists():
            # Same step written twice (a stop right after a periodic save): move the old one
            # aside first; both are complete, so a kill between the two renames loses
            # nothing (recover() puts the new one in place).
            old = root / f".old-{PREFIX}{step:08d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(exc, root, step)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for stale in list_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def is_disk_full(exc: BaseException) -> bool:
    """True for "no space left on device" however the writing library reports it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    text = str(exc)
    return "No space left" in text or "StorageFull" in text or "os error 28" in text or "Disk quota" in text


def _write_failure(exc: BaseException, root: Path, step: int) -> str:
    previous = latest_checkpoint(root)
    kept = (f"the last complete checkpoint ({previous.name}) is intact, so `resume: true` continues from it"
            if previous is not None else "no earlier checkpoint was written")
    if is_disk_full(exc):
        return f"the disk is full: checkpoint step {step} could not be written to {root}; {kept}; free some space"
    first = str(getattr(exc, "strerror", None) or exc).strip().splitlines()
    return f"checkpoint step {step} could not be written to {root} ({first[0] if first else type(exc).__name__}); {kept}"


# --------------------------------------------------------------------------- finding


def step_of(path: Path) -> Optional[int]:
    """The step a checkpoint folder holds, from its name (None: not a checkpoint's name)."""
    if not path.name.startswith(PREFIX):
        return None
    digits = path.name[len(PREFIX):]
    return int(digits) if digits.isdigit() else None


def list_checkpoints(root) -> list[Path]:
    """Checkpoints under ``root`` with their ``COMPLETE`` marker, oldest first (``.tmp-*`` folders are skipped).

    A listed checkpoint may still be unreadable; :func:`read_checkpoint` checks every file.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for item in root.iterdir():
        step = step_of(item)
        if step is not None and (item / MARKER).is_file():
            found.append((step, item))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root) -> Optional[Path]:
    """The newest checkpoint under ``root`` with its ``COMPLETE`` marker, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def recover(root) -> list[str]:
    """Finish what a killed write left: put a complete same-step replacement in place, drop the rest.

    Returns one line per checkpoint put back. A ``.tmp-step-N`` with its ``COMPLETE`` marker
    is newer than an ``.old-step-N`` of the same step, which is newer than nothing.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    notes = []
    leftovers: dict[int, list[tuple[int, Path]]] = {}
    for item in root.iterdir():
        match = _LEFTOVER.match(item.name)
        if match and item.is_dir():
            rank = 1 if match.group(1) == "tmp" else 0
            leftovers.setdefault(int(match.group(2)), []).append((rank, item))
    for step, items in sorted(leftovers.items()):
        final = root / f"{PREFIX}{step:08d}"
        complete = sorted((rank, item) for rank, item in items if (item / MARKER).is_file())
        if complete and not final.exists():
            os.replace(complete[-1][1], final)
            _fsync_dir(root)
            notes.append(f"checkpoint step {step} was being replaced when the run stopped; restored it")
        for _, item in items:
            if item.exists():
                shutil.rmtree(item, ignore_errors=True)
    return notes


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
        kept = {json.loads((p / STATE_FILE).read_text(encoding="utf-8")).get("engine_checkpoint")
                for p in list_checkpoints(root)}
        for stale in Path(root).glob(f"{ENGINE_PREFIX}*"):
            if stale.name not in kept:
                shutil.rmtree(stale, ignore_errors=True)
    ranks.barrier()  # no process runs ahead while a checkpoint is being written
    return path


def clean_temporaries(root) -> None:
    """Recover interrupted replacements, then remove folders left by a write that was killed."""
    recover(root)


# --------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, read and checked, not yet applied to a model."""

    path: Path
    step: int
    weights: dict
    best: Optional[dict]
    states: dict  # optimizer, optimizer_class, scheduler, rng, scaler (optional)
    state: dict  # state.json

    @property
    def name(self) -> str:
        return self.path.name


def read_checkpoint(path, *, required: Optional[dict] = None) -> Checkpoint:
    """Read and check every file of a checkpoint; one-line :class:`CheckpointError` if any is unusable.

    ``required`` maps state.json keys to the JSON types they must have (``step`` always).

    Example::

        read_checkpoint("out/checkpoints/step-00000010").state["step"]   # 10
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    file = STATE_FILE
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        _check_state(state, path, {"step": (int,), **(required or {})})
        if not (path / STATES_FILE).is_file() and any((path / f).is_file() for f in ("optimizer.pt", "rng.pt")):
            raise CheckpointError(f"checkpoint {path} was written by an older ftmagic and stores pickles, which "
                                  "are never loaded; set `overwrite: true` to start over")
        file = WEIGHTS_FILE
        weights = load_file(str(path / WEIGHTS_FILE))
        file = BEST_FILE
        best = load_file(str(path / BEST_FILE)) if (path / BEST_FILE).is_file() else None
        file = STATES_FILE
        states = _read_states(path / STATES_FILE)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RecursionError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {path.name} cannot be read ({file}: {_first_line(exc)})") from None
    return Checkpoint(path=path, step=state["step"], weights=weights, best=best, states=states, state=state)


def _read_states(file: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(file))
    states = decode_state(json.loads(metadata["tree"]), tensors)
    if not isinstance(states, dict):
        raise ValueError("the stored states are not a mapping")
    for key, kind in (("optimizer", dict), ("scheduler", dict), ("rng", dict), ("optimizer_class", str)):
        if not isinstance(states.get(key), kind):
            raise ValueError(f"`{key}` is missing or malformed")
    optimizer = states["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise ValueError("the optimizer state is malformed")
    rng = states["rng"]
    if not (isinstance(rng.get("python"), tuple) and isinstance(rng.get("numpy"), tuple)
            and isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8):
        raise ValueError("the RNG state is malformed")
    return states


def _check_state(state, path: Path, required: dict) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"expected a JSON object, found {a_type(state)}")
    for key, kinds in required.items():
        value = state.get(key)
        if key not in state or isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"`{key}` is missing or has the wrong type")
    if state["step"] != step_of(path):
        raise ValueError(f"`step: {state['step']}` does not match the folder name")


def check_fits(checkpoint: Checkpoint, model) -> None:
    """Raise :class:`CheckpointError` unless every stored weight is a parameter of ``model`` with the same shape."""
    params = dict(model.named_parameters())
    for name, tensor in checkpoint.weights.items():
        if name not in params:
            raise CheckpointError(f"checkpoint {checkpoint.name} does not match this model (unknown weight `{name}`); "
                                  "resume with the same model and method, or set `resume: false`")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(f"checkpoint {checkpoint.name} does not match this model (`{name}` has shape "
                                  f"{tuple(tensor.shape)}, the model's is {tuple(params[name].shape)}); "
                                  "resume with the same model, method and lora_r")


def find_resumable(root, model, warn: Callable[[str], None], required: Optional[dict] = None) -> Optional[Checkpoint]:
    """The newest checkpoint under ``root`` that reads completely and fits ``model``.

    A newer one that cannot be used is skipped with a ``warn`` line naming it and why; when
    checkpoints exist but none can be used, one line says so. None when there are none.
    ``required``: the state.json keys and JSON types the caller needs (the loop's ``LoopState.JSON_TYPES``).

    Example::

        found = find_resumable("out/checkpoints", model, warn=print)
        # checkpoint step-00000020 cannot be read (state.json: ...); resuming from step-00000010 instead
    """
    for note in recover(root):
        warn(note)
    candidates = list_checkpoints(root)
    problems = []
    for path in reversed(candidates):
        try:
            found = read_checkpoint(path, required=required)
            check_fits(found, model)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for problem in problems:
            warn(f"{problem}; resuming from {found.name} instead")
        return found
    if problems:
        raise CheckpointError(f"no checkpoint in {root} can be used: {problems[0]}"
                              + (f" (and {len(problems) - 1} older)" if len(problems) > 1 else "")
                              + "; set `overwrite: true` and `resume: false` to start over")
    return None


def _as_checkpoint(source) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else read_checkpoint(source)


def load_weights(source: Union[str, os.PathLike, Checkpoint], model) -> None:
    """Copy a checkpoint's trainable weights into ``model`` (before any multi-process wrapping)."""
    checkpoint = _as_checkpoint(source)
    check_fits(checkpoint, model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in checkpoint.weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def load_training_state(source: Union[str, os.PathLike, Checkpoint], *, optimizer, scheduler, scaler,
                        ranks=None) -> dict:
    """Restore optimizer, scheduler, scaler and RNG states (weights: :func:`load_weights`); returns ``state.json``.

    On several processes (``ranks``) each takes its own RNG states when the checkpoint was
    written by as many processes; on another count every process takes the first one's, as
    every process starts a run from the same seed. Never unpickles anything.
    """
    checkpoint = _as_checkpoint(source)
    states = checkpoint.states
    if states["optimizer_class"] != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint {checkpoint.name} holds the state of the {states['optimizer_class']} "
                              f"optimizer and this run uses {type(optimizer).__name__}; resume with the `optimizer` "
                              "the run started with")
    try:
        if ranks is None:
            optimizer.load_state_dict(states["optimizer"])
        elif ranks.spec.engine == "deepspeed":
            engine = checkpoint.state.get("engine_checkpoint")
            folder = checkpoint.path.parent / str(engine)
            if not engine or not folder.is_dir():
                raise CheckpointError(f"checkpoint {checkpoint.name} has no DeepSpeed state beside it; resume it "
                                      "with the strategy and process count that wrote it")
            ranks.wrapped.load_checkpoint(str(folder), load_optimizer_states=True, load_lr_scheduler_states=False,
                                          load_module_strict=False)
        else:
            ranks.load_optimizer_state(optimizer, states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
        if scaler is not None and "scaler" in states:
            scaler.load_state_dict(states["scaler"])
        rng = states["rng"]
        per_rank = states.get("rank_rngs")
        if ranks is not None and isinstance(per_rank, list) and len(per_rank) == ranks.world:
            rng = per_rank[ranks.rank]
        set_rng_state(rng)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint.name} cannot be loaded into this run ({_first_line(exc)}); "
                              "resume with the same config, or set `resume: false`") from None
    return checkpoint.state


def load_checkpoint(source: Union[str, os.PathLike, Checkpoint], *, model, optimizer, scheduler, scaler) -> dict:
    """Restore weights, optimizer, scheduler, scaler and RNG states; returns ``state.json``.

    ``source`` is a checkpoint folder or a :class:`Checkpoint` already read by
    :func:`find_resumable`. Never unpickles anything.
    """
    checkpoint = _as_checkpoint(source)
    load_weights(checkpoint, model)
    return load_training_state(checkpoint, optimizer=optimizer, scheduler=scheduler, scaler=scaler)


def load_best(source) -> Optional[dict]:
    """The best-evaluation weights stored with a checkpoint, or None."""
    if isinstance(source, Checkpoint):
        return source.best
    return read_checkpoint(source).best


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__

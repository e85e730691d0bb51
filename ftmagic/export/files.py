"""Writing export outputs safely: never over an existing file unless asked, always atomically.

Every output (a file or a folder) is written under a temporary name beside its target and
renamed into place when complete, so an interrupted export never leaves a half-written
GGUF that looks finished. An existing target is refused with a one-line
:class:`~ftmagic.errors.ExportError` unless ``overwrite`` is set.

Example::

    with atomic_target(Path("runs/a/gguf/a-q8_0.gguf")) as tmp:
        convert(..., outfile=tmp)        # renamed to runs/a/gguf/a-q8_0.gguf on success
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ftmagic.errors import ExportError


def refuse_existing(target: Path, overwrite: bool) -> None:
    """Raise when ``target`` exists and ``overwrite`` is off."""
    if target.exists() and not overwrite:
        raise ExportError(f"`{target}` already exists; pass overwrite=True (`--overwrite`) to replace it, "
                          "or move it away first")


@contextmanager
def atomic_target(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (a file or a folder); rename it into place on success.

    On an exception the temporary path is removed and ``target`` is untouched.
    """
    target = Path(target)
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not tmp.exists():
            raise ExportError(f"nothing was written for `{target}`")
        _replace(tmp, target)
    finally:
        _remove(tmp)


def _replace(tmp: Path, target: Path) -> None:
    if tmp.is_dir() and target.exists():
        # A folder cannot be renamed over a non-empty one: move the old one aside first.
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(tmp, target)
        _remove(old)
    else:
        os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text_atomic(target: Path, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``target`` atomically (refusing an existing file unless ``overwrite``)."""
    with atomic_target(Path(target), overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def path_size(path: Path) -> int:
    """Bytes in a file, or in every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

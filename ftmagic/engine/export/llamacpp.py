"""llama.cpp's own tools for GGUF: its converter (Python) and its quantizer (compiled).

The converter is ``convert_hf_to_gguf.py`` with its ``conversion`` package and its copy of
``gguf-py``. No package on PyPI installs them, but the source distribution of
llama-cpp-python carries the llama.cpp tree it was built from. ftmagic takes the three
pieces from the sdist of the llama-cpp-python version that is installed (so the files are
converted by the same llama.cpp that runs them), fetched with ``pip download`` from the
package registry once and kept in ``~/.cache/ftmagic/llama.cpp/``; pip's own cache
usually already holds that sdist from the install. ``FTMAGIC_LLAMA_CPP`` may instead name
a llama.cpp checkout.

The quantizer (k-quants such as ``q4_k_m``) is ``llama_model_quantize`` from
llama-cpp-python, which ``pip install 'ftmagic[gguf]'`` builds from source.

Both run in a child process (:mod:`ftmagic.engine.export.gguf_worker`).

Example::

    folder = converter_dir()                          # fetched on first use
    convert_to_gguf("runs/a/merged", "a-f16.gguf", "f16", metadata={"eot_id": 2})
    quantize_gguf("a-f16.gguf", "a-q4_k_m.gguf", "q4_k_m")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata as importlib_metadata
from importlib import util as importlib_util
from pathlib import Path
from typing import Optional

from ftmagic.errors import ExportError
from ftmagic.export.targets import GGUF_TYPES

# The llama-cpp-python release ftmagic is tested with; the `gguf` extra of pyproject.toml
# pins the same one (a test holds them equal). Its sdist supplies the converter when
# llama-cpp-python is not installed.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CONVERTER_ENV = "FTMAGIC_LLAMA_CPP"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
# What the converter needs from a llama.cpp tree.
CONVERTER_PARTS = (CONVERTER_SCRIPT, "conversion", "gguf-py")
_WORKER = "ftmagic.engine.export.gguf_worker"
_ERROR_PREFIX = "FTMAGIC-ERROR: "


def cache_root() -> Path:
    """``$FTMAGIC_CACHE``, else ``$XDG_CACHE_HOME/ftmagic``, else ``~/.cache/ftmagic``."""
    if os.environ.get("FTMAGIC_CACHE"):
        return Path(os.environ["FTMAGIC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftmagic"


def llama_cpp_python_version() -> Optional[str]:
    """The installed llama-cpp-python's version, or None."""
    try:
        return importlib_metadata.version("llama-cpp-python")
    except importlib_metadata.PackageNotFoundError:
        return None


def quantizer_available() -> bool:
    """Whether llama.cpp's compiled quantizer (llama-cpp-python) can be imported."""
    return importlib_util.find_spec("llama_cpp") is not None


def _complete(folder: Path) -> bool:
    return all((folder / part).exists() for part in CONVERTER_PARTS)


def converter_dir(fetch: bool = True) -> Path:
    """The folder holding llama.cpp's converter; fetched into the cache on first use.

    Raises a one-line :class:`ExportError` when it is missing and cannot be fetched.
    """
    given = os.environ.get(CONVERTER_ENV)
    if given:
        folder = Path(given).expanduser()
        if not (folder / CONVERTER_SCRIPT).is_file():
            raise ExportError(f"{CONVERTER_ENV}={given} is not a llama.cpp checkout (no {CONVERTER_SCRIPT} in it)")
        return folder
    version = llama_cpp_python_version() or LLAMA_CPP_PYTHON_VERSION
    folder = cache_root() / "llama.cpp" / f"llama-cpp-python-{version}"
    if _complete(folder):
        return folder
    if not fetch:
        raise ExportError(f"llama.cpp's converter is not in {folder}; run `python -m ftmagic.engine.export.llamacpp` "
                          "to fetch it, or set FTMAGIC_LLAMA_CPP to a llama.cpp checkout")
    return fetch_converter(version, folder)


def fetch_converter(version: str, folder: Path) -> Path:
    """Download llama-cpp-python's sdist with pip and keep the converter's parts in ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   "--disable-pip-version-check", "--dest", tmp, f"llama-cpp-python=={version}"]
        proc = subprocess.run(command, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            why = _last_line(proc.stderr) or "no source distribution came back"
            raise ExportError(f"GGUF export needs llama.cpp's converter, taken from the llama-cpp-python=={version} "
                              f"source on PyPI, and fetching it failed ({why}); with a llama.cpp checkout, set "
                              f"{CONVERTER_ENV} to its folder")
        staging = Path(tmp) / "converter"
        _extract_converter(sdists[0], staging)
        if not _complete(staging):
            raise ExportError(f"the llama-cpp-python=={version} source has no {CONVERTER_SCRIPT}; set {CONVERTER_ENV} "
                              "to a llama.cpp checkout")
        if folder.exists():  # another process finished first
            return folder
        os.replace(staging, folder)
    return folder


def _extract_converter(sdist: Path, target: Path) -> None:
    """Extract ``vendor/llama.cpp/{convert_hf_to_gguf.py,conversion/,gguf-py/}`` into ``target``."""
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or parts[3] not in CONVERTER_PARTS:
                continue
            if not (member.isfile() or member.isdir()):
                continue
            member.name = str(Path(*parts[3:]))
            members.append(member)
        target.mkdir(parents=True)
        archive.extractall(target, members=members, filter="data")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(_ERROR_PREFIX):
            return line[len(_ERROR_PREFIX):]
    return lines[-1][:300] if lines else ""


def _run_worker(args: list, what: str) -> None:
    env = dict(os.environ)
    # The worker is this package's module; make sure a checkout that is not installed is found.
    package_root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", _WORKER, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        message = _last_line(proc.stderr)
        if proc.returncode == 3 and message:
            raise ExportError(message)
        raise ExportError(f"{what} failed: {message or f'exit status {proc.returncode}'}")


def convert_to_gguf(model_dir, outfile, outtype: str, *, metadata: Optional[dict] = None) -> None:
    """Convert a transformers folder to GGUF with llama.cpp's converter (``f32``/``f16``/``bf16``/``q8_0``)."""
    if GGUF_TYPES[outtype].tool != "converter":
        raise ValueError(f"{outtype} is made by the quantizer, not the converter")
    folder = converter_dir()
    _run_worker(["convert", "--converter", str(folder), "--model", str(model_dir), "--outfile", str(outfile),
                 "--outtype", outtype, "--metadata", json.dumps(metadata or {})], "llama.cpp's converter")


def require_quantizer(quant: str) -> None:
    """Raise the one-line error that says how to get llama.cpp's quantizer, when it is missing."""
    if not quantizer_available():
        raise ExportError(f"`{quant}` needs llama.cpp's quantizer, which comes with llama-cpp-python: "
                          "`pip install 'ftmagic[gguf]'` builds it (f16, bf16, f32 and q8_0 need only the converter)")


def quantize_gguf(source, target, quant: str, threads: int = 0) -> None:
    """Quantize an ``f16`` GGUF to ``quant`` with llama.cpp's quantizer (llama-cpp-python)."""
    require_quantizer(quant)
    _run_worker(["quantize", str(source), str(target), GGUF_TYPES[quant].ftype, "--threads", str(threads)],
                "llama.cpp's quantizer")


if __name__ == "__main__":  # python -m ftmagic.engine.export.llamacpp: fetch the converter now (CI set-up)
    print(converter_dir())

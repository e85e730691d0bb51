"""Reaching the Hugging Face hub without minutes of retries when there is no network.

Offline, transformers and datasets retry every request with back-off (five retries per
file, 13-22 log lines, 30-55 s) before they say the id cannot be loaded. ftmagic probes
the hub once (one TCP connection, a few seconds at most); when it cannot be reached, a
model or dataset already in the local cache is loaded in the libraries' own offline
mode, and one that is not is refused at once in one line.

Kept torch-free: the previewer and the engine both use it.

Example::

    with hub_access("Qwen/Qwen2.5-0.5B", kind="model", error=ModelError):
        tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B")
"""

from __future__ import annotations

import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_PROBE_TTL_S = 60.0
_probe_cache: dict = {}
_TRUE = ("1", "true", "yes", "on")


def offline_requested() -> bool:
    """True when the user switched the hub off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_reachable() -> bool:
    """One TCP connection to the hub's host (cached for a minute); True behind a proxy, which we cannot probe."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)
    cached = _probe_cache.get((host, port))
    if cached is not None and time.monotonic() - cached[1] < _PROBE_TTL_S:
        return cached[0]
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            ok = True
    except OSError:
        ok = False
    _probe_cache[(host, port)] = (ok, time.monotonic())
    return ok


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def in_cache(repo_id: str, kind: str = "model") -> bool:
    """Whether ``repo_id`` has a folder in the local hub cache (``models--org--name``)."""
    return (hub_cache_dir() / f"{kind}s--{repo_id.replace('/', '--')}").is_dir()


def unreachable_reason(repo_id: str, kind: str = "model") -> Optional[str]:
    """None when loading ``repo_id`` may go ahead online; else why it cannot come from the hub."""
    if os.path.exists(os.path.expanduser(repo_id)) or offline_requested() or hub_reachable():
        return None
    return "the Hugging Face hub cannot be reached from this machine (no network)"


@contextmanager
def hub_access(repo_id: str, *, kind: str, error):
    """Run a hub load quietly: as usual online, from the cache in offline mode, else ``error`` at once."""
    reason = unreachable_reason(repo_id, kind)
    if reason is None:
        yield
        return
    if not in_cache(repo_id, kind):
        noun = "model" if kind == "model" else "dataset"
        raise error(f"{noun} `{repo_id}` is not a local {'folder' if kind == 'model' else 'file or folder'} and not in "
                    f"the Hugging Face cache, and {reason}; give a local path"
                    + (" or `model: tiny`" if kind == "model" else "") + ", or run once with network to cache it")
    with _offline_switch():
        yield


@contextmanager
def _offline_switch():
    """The libraries' own offline mode, for the duration of one load."""
    import huggingface_hub.constants as hub_constants

    targets = [hub_constants]
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        targets.append(datasets_config)
    saved = [(target, target.HF_HUB_OFFLINE) for target in targets]
    try:
        for target in targets:
            target.HF_HUB_OFFLINE = True
        yield
    finally:
        for target, value in saved:
            target.HF_HUB_OFFLINE = value

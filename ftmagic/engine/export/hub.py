"""Upload a run to the Hugging Face Hub with ``huggingface_hub``, in one commit.

The token is never handled here: ``HfApi()`` reads ``HF_TOKEN`` or the login saved by
``hf auth login`` itself, so it cannot end up in a config, a log or a notebook. The
upload only reads local files (the model card travels as bytes), so a failed upload
leaves the run exactly as it was, and ends in one line that says how to retry.

Example::

    url = push_files("me/reverse", [("runs/a/adapter_model.safetensors", "adapter_model.safetensors")],
                     {"README.md": card.encode()}, private=True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ftmagic.errors import ExportError

# Top-level files of a saved folder that belong in a model repository.
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".jinja", ".model", ".txt", ".tiktoken")
# Files that describe this machine or this training session, not the model.
LOCAL_ONLY = ("ftmagic_run.json", "history.json", "README.md", "state.json")
# The run's own config travels under a name that says whose config it is.
RENAMED = {"config.yaml": "ftmagic_config.yaml"}


def model_files(folder, prefix: str = "") -> list:
    """``(local path, path in repo)`` for the model files at the top of ``folder``."""
    folder = Path(folder)
    out = []
    for path in sorted(folder.iterdir()):
        if path.name in RENAMED and path.is_file():
            out.append((str(path), prefix + RENAMED[path.name]))
        elif path.is_file() and path.suffix in MODEL_FILE_SUFFIXES and path.name not in LOCAL_ONLY \
                and not path.name.startswith("."):
            out.append((str(path), prefix + path.name))
    return out


def push_files(repo_id: str, files: list, extra: dict, *, private: bool, api=None,
               message: str = "Upload a model fine-tuned with ftmagic") -> str:
    """Create the repository if needed and commit ``files`` (local path, path in repo) and
    ``extra`` (path in repo -> bytes) in one commit; return the repository's URL."""
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError:
        raise ExportError("uploading to the Hub needs huggingface_hub: `pip install huggingface_hub`") from None
    api = api if api is not None else HfApi()
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(local)) for local, name in files]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in extra.items()]
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id=repo_id, operations=operations, commit_message=message, repo_type="model")
    except Exception as exc:  # noqa: BLE001 - network, auth, quota: any of them ends in one line, the run untouched
        raise ExportError(f"upload to `{repo_id}` failed ({_scrub(_first_line(exc))}); the local run is unchanged; "
                          f"{upload_advice(exc)}, then run the export again") from None
    return str(getattr(url, "url", None) or f"https://huggingface.co/{repo_id}")


# Errors that say the Hub was not reached at all (requests, httpx, huggingface_hub, the OS).
_UNREACHED = ("ConnectionError", "ConnectError", "ConnectTimeout", "Timeout", "TimeoutError", "ReadTimeout",
              "OfflineModeIsEnabled", "gaierror")


def upload_advice(exc: BaseException) -> str:
    """What to do about a failed upload: log in where the Hub refused the token, check the
    network where it was never reached.

    Example::

        >>> upload_advice(ConnectionError("Name or service not known"))
        'the Hub could not be reached: check the network connection (and that HF_HUB_OFFLINE is not set)'
    """
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return "log in with `hf auth login` or set HF_TOKEN (a token with write access to the repository)"
    if any(cls.__name__ in _UNREACHED for cls in type(exc).__mro__):
        return "the Hub could not be reached: check the network connection (and that HF_HUB_OFFLINE is not set)"
    return "check the network connection, and log in with `hf auth login` or set HF_TOKEN"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _scrub(text: str, token: Optional[str] = None) -> str:
    """Remove a token from text that may end up on screen (an error that echoes a header)."""
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"), _saved_token()):
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return text


def _saved_token() -> Optional[str]:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no token, no scrubbing needed
        return None

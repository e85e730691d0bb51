"""Where a finished run can go, and the GGUF types it can be written in.

One home for the names that the config (``export:``, ``gguf_quant:``), the CLI
(``ftmagic export --to ... --quant ...``), ``%ft_export`` and the engine accept.

A GGUF type is made by one of two llama.cpp tools: its Python converter
(``convert_hf_to_gguf.py``, which writes ``f32``, ``f16``, ``bf16`` and ``q8_0`` itself) or
its compiled quantizer (``llama_model_quantize``, shipped with llama-cpp-python), which
turns an ``f16`` file into the k-quants and the other block types.

Example::

    >>> check_targets(["gguf", "hub"])
    ['gguf', 'hub']
    >>> check_quants("q4_k_m")
    ['q4_k_m']
    >>> GGUF_TYPES["q4_k_m"].tool
    'quantizer'

A run with a classification head (``objective: reward`` or ``classify``) does not write
text, so the runtimes that only generate (llama.cpp's GGUF, Ollama) cannot take it; the
config and every export front refuse it through :func:`refuse_text_targets`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from ftmagic.errors import ExportError, not_accepted
from ftmagic.objectives import get_objective_spec

# In the order they are produced: a GGUF is converted from the merged model, the Modelfile
# points at a GGUF, and the Hub upload can carry all of them.
EXPORT_TARGETS = ("merged", "gguf", "ollama", "hub")
# The targets that run the model only as a text generator: llama.cpp reads a GGUF as a language
# model and drops a sequence-classification head, and Ollama serves that GGUF.
TEXT_TARGETS = ("gguf", "ollama")


@dataclass(frozen=True)
class GgufType:
    """How one GGUF type is made: by the ``converter`` or the ``quantizer``, and llama.cpp's file-type name."""

    name: str
    tool: str  # "converter" or "quantizer"
    ftype: str  # the LLAMA_FTYPE_* constant of llama.cpp (llama_cpp.<ftype> in llama-cpp-python)


def _types(tool: str, names: str) -> dict:
    out = {}
    for name in names.split():
        suffix = name.upper()
        ftype = "LLAMA_FTYPE_ALL_F32" if name == "f32" else f"LLAMA_FTYPE_MOSTLY_{suffix}"
        out[name] = GgufType(name, tool, ftype)
    return out


GGUF_TYPES = {
    **_types("converter", "f16 q8_0 bf16 f32"),
    **_types("quantizer", "q4_k_m q5_k_m q6_k q4_k_s q5_k_s q3_k_m q3_k_s q3_k_l q2_k q4_0 q4_1 q5_0 q5_1"),
}
DEFAULT_QUANT = "q8_0"  # near-lossless, half the size of f16, and needs no compiled llama.cpp


def _as_list(value: Union[None, str, Iterable]) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v).strip() for v in value]


def _check(values: list, allowed, key: str) -> list:
    out = []
    for value in values:
        name = value.lower()
        if name not in allowed:
            raise not_accepted(key, value, list(allowed))
        if name not in out:
            out.append(name)
    return out


def check_targets(value, key: str = "export") -> list:
    """Validated export targets, in production order (``"gguf,hub"`` and lists both work)."""
    chosen = _check(_as_list(value), EXPORT_TARGETS, key)
    return [t for t in EXPORT_TARGETS if t in chosen]


def check_quants(value, key: str = "gguf_quant") -> list:
    """Validated GGUF types, in the order given (``"f16,q8_0"`` and lists both work)."""
    return _check(_as_list(value), GGUF_TYPES, key)


# The Hub's own rule for a repository id (huggingface_hub's ``validate_repo_id``), for `user/name`:
# letters, digits, `-`, `_` and `.`, neither starting nor ending with `-` or `.`, no `--` or `..`.
_REPO_PART = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
REPO_ID_RULE = "a Hub repository id like `user/name` (letters, digits, `-`, `_`, `.`)"


def is_repo_id(value) -> bool:
    """Whether ``value`` is a ``user/name`` the Hub accepts; checked before any export work, so a typo is
    not found only after merging and converting, by the upload.

    Example::

        >>> is_repo_id("me/reverse-words"), is_repo_id("reverse-words"), is_repo_id("me/reverse words")
        (True, False, False)
    """
    parts = str(value).split("/")
    return (len(parts) == 2 and all(_REPO_PART.match(part) for part in parts) and len(parts[1]) <= 96
            and "--" not in str(value) and ".." not in str(value))


def refuse_text_targets(targets, objective: str, spelled: str = "--to {}", error: Optional[type] = None) -> None:
    """Raise when ``targets`` name a runtime that only generates text and ``objective`` trains a head.

    ``spelled`` writes a target the way the user gave it (``"export: {}"`` in a config);
    ``error`` is the class to raise (:class:`~ftmagic.errors.ExportError` unless given).

    Example::

        >>> refuse_text_targets(["merged", "hub"], "classify")   # accepted: nothing happens
        >>> refuse_text_targets(["ollama"], "reward")
        Traceback (most recent call last):
        ftmagic.errors.ExportError: `--to ollama` needs a run that writes text; ... export `merged` or `hub`
    """
    asked = [t.lower() for t in _as_list(targets) if t.lower() in TEXT_TARGETS]
    if not asked or get_objective_spec(objective).generates:
        return
    accepted = " or ".join(f"`{t}`" for t in EXPORT_TARGETS if t not in TEXT_TARGETS)
    raise (error or ExportError)(f"`{spelled.format(asked[0])}` needs a run that writes text; a run with "
                                 f"`objective: {objective}` has a classification head instead: export {accepted}")

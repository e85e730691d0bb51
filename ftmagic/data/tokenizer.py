"""The tokenizer the previewer uses: the one given, the model's, or the embedded tiny model's.

Loads with ``transformers.AutoTokenizer`` only (never torch), so previewing data stays quick.

Example::

    tok, name = load_preview_tokenizer("tiny")                 # the embedded model's tokenizer
    tok, name = load_preview_tokenizer("Qwen/Qwen2.5-0.5B")    # any Hub id or local folder
    tok, name = load_preview_tokenizer(None)                   # tiny if installed, else (None, reason)
"""

from __future__ import annotations

from typing import Optional

from ftmagic import constants
from ftmagic.errors import ModelError


def tiny_available() -> bool:
    """Whether the embedded tiny model's tokenizer ships with this copy of ftmagic."""
    tiny = constants.TINY_MODEL_DIR
    return (tiny / "tokenizer_config.json").exists() or (tiny / "tokenizer.json").exists()


def load_preview_tokenizer(model: Optional[str]) -> tuple:
    """``(tokenizer, name)``; with ``model=None`` and no tiny model: ``(None, why)``.

    Raises :class:`~ftmagic.errors.ModelError` when a named model's tokenizer cannot be loaded.
    """
    if model is None:
        if not tiny_available():
            return None, ("no tokenizer: pass a model (e.g. --model Qwen/Qwen2.5-0.5B) to see tokens, lengths and "
                          "loss masks; the embedded tiny model is not installed")
        model = "tiny"
    path = constants.resolve_model_name(model)
    if model == "tiny" and not tiny_available():
        raise ModelError("model `tiny`: the embedded tiny model is not installed in this copy of ftmagic "
                         f"({constants.TINY_MODEL_DIR} is missing); pass another model")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"model `{model}`: cannot load its tokenizer ({first}); pass a local folder or a "
                         "Hugging Face id that can be reached") from None
    return tok, model

"""Load a tokenizer and a causal LM from a Hugging Face id, a local folder, or ``tiny``.

``tiny`` is the small pretrained model that ships inside the package
(``ftmagic/assets/tiny``). With the environment variable ``FTMAGIC_SMOKE=1`` every
model id that is not a local folder resolves to ``tiny`` and runs are capped at
:data:`~ftmagic.constants.SMOKE_MAX_STEPS` steps (the rule lives in
:mod:`ftmagic.constants`), so a notebook written for a 7B model can be checked end to
end on a laptop or in CI.

Example::

    from ftmagic.engine.models import resolve_model_path, load_tokenizer
    tok = load_tokenizer(resolve_model_path("tiny"))
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Optional

import torch

from ftmagic import constants
from ftmagic.errors import ModelError


def resolve_model_path(name: str) -> str:
    """Map ``tiny`` (and, in smoke mode, any id but a local folder) to the embedded model.

    Example::

        resolve_model_path("tiny")            # -> ".../ftmagic/assets/tiny"
        resolve_model_path("Qwen/Qwen2.5-0.5B")  # -> "Qwen/Qwen2.5-0.5B" (loaded from the hub)
    """
    path = constants.resolve_model_name(name)
    if path == str(constants.TINY_MODEL_DIR) and not constants.tiny_model_available():
        raise ModelError(f"the embedded model is missing at {constants.TINY_MODEL_DIR}; rebuild it with "
                         "`python scripts/build_tiny_model.py` or set `model:` to another id")
    return path


def load_tokenizer(path: str):
    """A tokenizer that can pad (pad falls back to EOS) and pads on the right for training."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(_not_found(path, exc)) from None
    if tok.pad_token is None:
        # Labels mask padding with -100, so reusing EOS as the pad token never teaches "stop early".
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise ModelError(f"the tokenizer of `{path}` has no pad, EOS or unknown token to pad with")
    tok.padding_side = "right"
    return tok


# Sequence-classification heads stay in full precision under QLoRA: they are new and trained.
HEAD_MODULES = ["score", "classifier"]


def quantization_config(compute_dtype: str, head: bool = False):
    """The QLoRA 4-bit config: NF4 weights, double quantization, the given compute dtype.

    With a classification ``head`` that head is kept out of quantization (transformers' own
    choice, used otherwise, keeps the language-model head out).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
                              llm_int8_skip_modules=HEAD_MODULES if head else None)


def head_settings(objective: str, labels: Optional[list] = None) -> Optional[dict]:
    """What :func:`load_model` needs for an objective's head: None for the language-model head,
    else the number of outputs and, for a classifier, the label names.

    Example::

        head_settings("reward")                    # {'num_labels': 1}
        head_settings("classify", ["neg", "pos"])  # {'num_labels': 2, 'id2label': {0: 'neg', 1: 'pos'}, ...}
    """
    from ftmagic.objectives import get_objective_spec

    spec = get_objective_spec(objective)
    if not spec.classifier_head:
        return None
    if spec.head == "score":
        return {"num_labels": 1}
    names = [str(v) for v in labels or []]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def load_model(path: str, *, device: str, weight_dtype: "torch.dtype" = torch.float32,
               qlora_compute_dtype: Optional[str] = None, head: Optional[dict] = None):
    """Load a causal LM onto ``device``; 4-bit NF4 when ``qlora_compute_dtype`` is given.

    ``head`` (see :func:`head_settings`) loads the model with a sequence-classification head
    instead (``AutoModelForSequenceClassification``: decoders and BERT-style encoders).

    Example::

        model = load_model(resolve_model_path("tiny"), device="cpu")
        scorer = load_model(resolve_model_path("tiny"), device="cpu", head={"num_labels": 1})
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"dtype": weight_dtype}
    if qlora_compute_dtype:
        kwargs["quantization_config"] = quantization_config(qlora_compute_dtype, head=head is not None)
        kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    auto = AutoModelForCausalLM
    if head is not None:
        auto = AutoModelForSequenceClassification
        kwargs.update(head)
    try:
        with quiet_progress(), _quiet_new_head(head is not None):
            model = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(_not_found(path, exc)) from None
    if not qlora_compute_dtype:
        model.to(device)
    elif device == "cpu":
        _plain_cpu_4bit(model)
    if model.config.pad_token_id is None and getattr(model.generation_config, "eos_token_id", None) is not None:
        eos = model.generation_config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def _plain_cpu_4bit(model) -> None:
    """Keep bitsandbytes' CPU 4-bit layers on their general kernel in eval mode too.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a faster inference
    kernel the first time a layer runs in eval mode. That kernel needs layer widths that
    are multiples of 64 (the embedded tiny model's are not) and computes differently from
    the training kernel; the general kernel serves training, evaluation and generation alike.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@contextmanager
def _quiet_new_head(active: bool):
    """A new classification head is reported as "newly initialized" weights; that is the point here.

    The message is filtered rather than the logger's level raised: transformers runs extra
    checks (and prints their findings) when that logger's level is WARNING or above.
    """
    if not active:
        yield
        return
    import logging

    from transformers.utils import logging as hf_logging

    class _NewHead(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "newly initialized" not in record.getMessage()

    logger = hf_logging.get_logger("transformers.modeling_utils")
    note = _NewHead()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


@contextmanager
def quiet_progress():
    """No transformers loading/saving bars: the engine reports progress through events only."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def quiet_peft():
    """Hide a deprecation warning peft triggers inside transformers; the user cannot act on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _not_found(path: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if os.path.isdir(path):
        return f"cannot load the model in `{path}`: {first}"
    return (f"model `{path}` was not found: it is not a local folder and could not be loaded from the "
            f"Hugging Face hub ({first[:160]}); use `model: tiny`, a local path, or a hub id")

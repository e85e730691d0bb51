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
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from ftmagic import constants
from ftmagic.errors import ModelError
from ftmagic.hub import hub_access


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


def hidden_size_of(path: str) -> Optional[int]:
    """The model's hidden size from its config.json (None when it cannot be read): the device choice
    weighs it before any weight loads."""
    from ftmagic.errors import FtmagicError
    from ftmagic.memory.architectures import resolve_model

    try:
        return resolve_model(path).hidden
    except (FtmagicError, OSError, ValueError):
        return None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A tokenizer that can pad (pad falls back to EOS) and pads on the right for training.

    ``trust_remote_code`` is always passed explicitly: transformers' interactive ``[y/N]``
    question about a repository's own Python code never appears; the config key decides.
    """
    from transformers import AutoTokenizer

    refuse_custom_code(path, trust_remote_code)
    try:
        with hub_access(path, kind="model", error=ModelError):
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises many types for a folder it cannot use
        raise ModelError(_load_failure(path, exc, trust_remote_code)) from None
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


def quantization_config(compute_dtype: str, quant_storage: Optional[str] = None, head: bool = False):
    """The QLoRA 4-bit config: NF4 weights, double quantization, the given compute dtype.

    ``quant_storage`` (FSDP) packs the 4-bit weights into that float dtype, which FSDP can shard.
    With a classification ``head`` that head is kept out of quantization (transformers' own
    choice, used otherwise, keeps the language-model head out).
    """
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_quant_storage": getattr(torch, quant_storage)} if quant_storage else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
                              llm_int8_skip_modules=HEAD_MODULES if head else None, **extra)


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


# What loading in 4-bit raises where bitsandbytes cannot serve this machine; ``load_model`` lets these
# through for QLoRA so that each caller decides its fallback (LoRA, or the full-precision base).
FOUR_BIT_FAILURES = (RuntimeError, ImportError, NotImplementedError)


def four_bit_failure(exc: BaseException) -> str:
    """The first line of why 4-bit could not load (the exception's type where it says nothing), for a note."""
    text = str(exc).strip()
    return text.splitlines()[0][:120] if text else type(exc).__name__


def load_model(path: str, *, device: str, weight_dtype: "torch.dtype" = torch.float32,
               qlora_compute_dtype: Optional[str] = None, trust_remote_code: bool = False,
               quant_storage: Optional[str] = None, head: Optional[dict] = None):
    """Load a causal LM onto ``device``; 4-bit NF4 when ``qlora_compute_dtype`` is given.

    ``head`` (see :func:`head_settings`) loads the model with a sequence-classification head
    instead (``AutoModelForSequenceClassification``: decoders and BERT-style encoders).
    Only safetensors weights or pickles that ``torch.load(weights_only=True)`` accepts are
    read (transformers' default); a pickle that names code is refused in one line, as is a
    repository's own Python code unless ``trust_remote_code`` is true.

    On CUDA the model goes to the current device (each process of a multi-GPU run has its own).

    Example::

        model = load_model(resolve_model_path("tiny"), device="cpu")
        scorer = load_model(resolve_model_path("tiny"), device="cpu", head={"num_labels": 1})
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    refuse_custom_code(path, trust_remote_code)
    kwargs = {"dtype": weight_dtype, "trust_remote_code": trust_remote_code}
    if qlora_compute_dtype:
        kwargs["quantization_config"] = quantization_config(qlora_compute_dtype, quant_storage, head=head is not None)
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else "cpu"}
        if quant_storage:  # peft's FSDP-QLoRA guide: the model's dtype is the storage dtype
            kwargs["dtype"] = getattr(torch, quant_storage)
    auto = AutoModelForCausalLM
    if head is not None:
        auto = AutoModelForSequenceClassification
        kwargs.update(head)
    try:
        with quiet_progress(), hub_access(path, kind="model", error=ModelError), warnings.catch_warnings(), \
                _quiet_new_head(head is not None):
            # torch's note about a pickle's protocol is noise: the file is refused or loaded either way.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model = auto.from_pretrained(path, **kwargs)
    except (ModelError, ImportError, NotImplementedError, torch.OutOfMemoryError):
        raise  # ImportError/NotImplementedError: the caller's QLoRA fallback decides
    except (OSError, ValueError, pickle.UnpicklingError, KeyError, TypeError, EOFError) as exc:
        raise ModelError(_load_failure(path, exc, trust_remote_code)) from None
    except RuntimeError as exc:
        if qlora_compute_dtype:
            raise  # bitsandbytes' CPU backend: the caller falls back to LoRA
        raise ModelError(_load_failure(path, exc, trust_remote_code)) from None
    if not qlora_compute_dtype:
        model.to(device)
    elif device == "cpu":
        _plain_cpu_4bit(model)
    if model.config.pad_token_id is None:
        # A model with a head has no generation config (it writes no text): its config's EOS then.
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else getattr(model.config, "eos_token_id", None)
        if eos is not None:
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


def refuse_custom_code(path: str, trust_remote_code: bool) -> None:
    """Refuse a local model folder that only loads with its own Python code, before transformers reads it.

    A folder whose ``config.json`` names custom classes (``auto_map``) for a model type this
    transformers does not know cannot load without running that code; ftmagic says so in one
    line instead of letting transformers warn, ask ``[y/N]`` or fail further in.
    """
    if trust_remote_code:
        return
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return
    try:
        import json

        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # transformers gives its own one-line reason below
    if not isinstance(config, dict) or not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        raise ModelError(_REMOTE_CODE.format(path=path))


_REMOTE_CODE = ("model `{path}` needs to run its own Python code (its config names custom classes); ftmagic runs "
                "such code only with `trust_remote_code: true` in the config: read the code first")


def _load_failure(path: str, exc: BaseException, trust_remote_code: bool) -> str:
    """One line for a model or tokenizer that cannot be loaded, saying what would work."""
    text = str(exc)
    if "trust_remote_code" in text and not trust_remote_code:
        return _REMOTE_CODE.format(path=path)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        return (f"model `{path}`: its weights are a pickle (pytorch_model.bin) that names code, which is never run; "
                "use a copy saved as safetensors")
    return _not_found(path, exc)


def _not_found(path: str, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if os.path.isdir(path):
        return f"cannot load the model in `{path}`: {first}"
    return (f"model `{path}` was not found: it is not a local folder and could not be loaded from the "
            f"Hugging Face hub ({first[:160]}); use `model: tiny`, a local path, or a hub id")

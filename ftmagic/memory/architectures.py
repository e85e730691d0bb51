"""Model shapes: the few numbers of a config that decide how much memory training takes.

A model is named by a built-in architecture (``llama-3.2-1b``), a local directory or
``config.json`` file, a Hugging Face id found in the local cache, a config dict, or
``tiny`` (the embedded model). Only the configuration is read, never the weights, and
nothing here imports torch.

Example::

    >>> from ftmagic.memory.architectures import resolve_model
    >>> shape = resolve_model("llama-3.2-1b")
    >>> shape.hidden, shape.layers, shape.total_params
    (2048, 16, 1235814400)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ftmagic.errors import ModelError


@dataclass(frozen=True)
class ModelShape:
    """Shape of a decoder-only transformer, as far as training memory is concerned.

    Example::

        ModelShape(name="toy", model_type="llama", hidden=64, intermediate=128, layers=2,
                   heads=4, kv_heads=2, vocab=1000)
    """

    name: str
    model_type: str  # the Hugging Face `model_type`; exact mode builds the model from it
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    tied: bool = False  # input embedding shared with the output head
    bias_linears: tuple = ()  # leaf names of the block's linears that have a bias (Qwen2: q, k, v)
    fused_qkv: bool = False  # Phi-3: one qkv_proj linear
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj linear
    norms_per_layer: int = 2  # Gemma 2 has four RMSNorms per block
    final_logit_softcap: Optional[float] = None  # Gemma 2: tanh soft-capping adds copies of the logits
    extra: tuple = field(default=())  # extra Hugging Face config keys, as (key, value) pairs

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    # ---------------------------------------------------------------- parameters
    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list:
        """(name, in_features, out_features) of every linear layer in one block."""
        h, i = self.hidden, self.intermediate
        if self.fused_qkv:
            attn = [("qkv_proj", h, self.q_dim + 2 * self.kv_dim)]
        else:
            attn = [("q_proj", h, self.q_dim), ("k_proj", h, self.kv_dim), ("v_proj", h, self.kv_dim)]
        attn.append(("o_proj", self.q_dim, h))
        mlp = [("gate_up_proj", h, 2 * i)] if self.fused_gate_up else [("gate_proj", h, i), ("up_proj", h, i)]
        mlp.append(("down_proj", i, h))
        return attn + mlp

    @property
    def bias_params_per_layer(self) -> int:
        """Bias terms of one block's linears (what BitFit trains)."""
        return sum(fan_out for name, _, fan_out in self.linears() if name in self.bias_linears)

    @property
    def linear_params_per_layer(self) -> int:
        """Weights and biases of one block's linears."""
        return sum(fan_in * fan_out for _, fan_in, fan_out in self.linears()) + self.bias_params_per_layer

    @property
    def norm_params_per_layer(self) -> int:
        return self.norms_per_layer * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """Every parameter: embeddings, blocks, final norm and (untied) output head."""
        return (self.embedding_params + self.layers * (self.linear_params_per_layer + self.norm_params_per_layer)
                + self.hidden + self.head_params)

    def hf_config(self) -> dict:
        """A Hugging Face config dict (``model_type`` included) that builds this architecture."""
        cfg = dict(model_type=self.model_type, hidden_size=self.hidden, intermediate_size=self.intermediate,
                   num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                   vocab_size=self.vocab, tie_word_embeddings=self.tied, head_dim=self.head_dim)
        cfg.update(dict(self.extra))
        return cfg


_QKV = ("q_proj", "k_proj", "v_proj")


def _shape(name, model_type, hidden, intermediate, layers, heads, kv_heads, vocab, tied, **kw) -> ModelShape:
    return ModelShape(name=name, model_type=model_type, hidden=hidden, intermediate=intermediate, layers=layers,
                      heads=heads, kv_heads=kv_heads, vocab=vocab, tied=tied, **kw)


# Public config.json values of each model (Hugging Face hub), not estimates.
BUILTIN = {s.name: s for s in [
    _shape("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 128256, True, extra=(("rope_theta", 500000.0),)),
    _shape("llama-3.2-3b", "llama", 3072, 8192, 28, 24, 8, 128256, True, extra=(("rope_theta", 500000.0),)),
    _shape("llama-3.1-8b", "llama", 4096, 14336, 32, 32, 8, 128256, False, extra=(("rope_theta", 500000.0),)),
    _shape("mistral-7b", "mistral", 4096, 14336, 32, 32, 8, 32768, False),  # v0.3 vocabulary
    _shape("qwen2.5-0.5b", "qwen2", 896, 4864, 24, 14, 2, 151936, True, bias_linears=_QKV),
    _shape("qwen2.5-1.5b", "qwen2", 1536, 8960, 28, 12, 2, 151936, True, bias_linears=_QKV),
    _shape("qwen2.5-3b", "qwen2", 2048, 11008, 36, 16, 2, 151936, True, bias_linears=_QKV),
    _shape("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 152064, False, bias_linears=_QKV),
    _shape("gemma-2-2b", "gemma2", 2304, 9216, 26, 8, 4, 256000, True, head_dim=256, norms_per_layer=4,
           final_logit_softcap=30.0),
    _shape("phi-3-mini", "phi3", 3072, 8192, 32, 32, 32, 32064, False, fused_qkv=True, fused_gate_up=True),
    _shape("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 49152, True),
    _shape("smollm2-360m", "llama", 960, 2560, 32, 15, 5, 49152, True),
    _shape("smollm2-1.7b", "llama", 2048, 8192, 24, 32, 32, 49152, True),
]}

# Other spellings people type (hub ids reduce to these after lower-casing and dropping suffixes).
_ALIASES = {
    "llama-3.2-1b": ["llama3.2-1b", "llama-3-2-1b"],
    "llama-3.2-3b": ["llama3.2-3b", "llama-3-2-3b"],
    "llama-3.1-8b": ["llama-3-8b", "meta-llama-3-8b", "meta-llama-3.1-8b", "llama3.1-8b", "llama3-8b", "llama-3.1-8b"],
    "mistral-7b": ["mistral-7b-v0.3", "mistral-7b-v0.1", "mistral-7b-v0.2"],
    "phi-3-mini": ["phi-3-mini-4k", "phi-3-mini-128k", "phi3-mini"],
    "gemma-2-2b": ["gemma2-2b"],
}
_LOOKUP = {name: name for name in BUILTIN}
_LOOKUP.update({alias: name for name, aliases in _ALIASES.items() for alias in aliases})

ACCEPTED = "a built-in name (" + ", ".join(BUILTIN) + "), `tiny`, a local directory with config.json, " \
           "a config dict, or a Hugging Face id already in the local cache"

_SUFFIXES = ("-instruct", "-it", "-chat", "-hf", "-base")


def _normalise(name: str) -> str:
    key = name.strip().rstrip("/").split("/")[-1].lower()
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if key.endswith(suffix):
                key = key[: -len(suffix)]
                changed = True
    key = re.sub(r"-(4k|128k)$", "", key) if key.startswith("phi-3-mini-") else key
    return key


def builtin_names() -> list:
    """Names of the built-in architectures, smallest first."""
    return sorted(BUILTIN, key=lambda n: BUILTIN[n].total_params)


def tiny_config_path() -> str:
    """Where the embedded tiny model's config.json lives (it may not be built yet)."""
    from ftmagic.constants import TINY_MODEL_DIR

    return str(TINY_MODEL_DIR / "config.json")


def resolve_model(model: Any) -> ModelShape:
    """Turn any accepted model spelling into a :class:`ModelShape`; raise ModelError otherwise.

    Example::

        resolve_model("Qwen/Qwen2.5-0.5B-Instruct").vocab   # 151936, from the built-in table
        resolve_model({"model_type": "llama", "hidden_size": 64, ...})
        resolve_model("./my-checkpoint")                     # reads ./my-checkpoint/config.json
    """
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, dict):
        return shape_from_hf_config(model, name=str(model.get("_name_or_path") or model.get("model_type") or "config"))
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):  # a transformers PretrainedConfig
        return shape_from_hf_config(model.to_dict(), name=str(getattr(model, "name_or_path", "") or model.model_type))
    if not isinstance(model, str) or not model.strip():
        raise ModelError(f"`model: {model!r}` cannot be used; give {ACCEPTED}")
    text = model.strip()
    if text == "tiny":
        path = tiny_config_path()
        if not os.path.exists(path):
            raise ModelError(f"`model: tiny`: the embedded model is not built ({path} is missing); "
                             "run scripts/build_tiny_model.py or give another model")
        return _shape_from_file(path, "tiny")
    key = _normalise(text)
    if not os.path.exists(text) and key in _LOOKUP:
        return replace(BUILTIN[_LOOKUP[key]], name=_LOOKUP[key])
    if os.path.isdir(text):
        path = os.path.join(text, "config.json")
        if not os.path.exists(path):
            raise ModelError(f"`model: {text}`: the directory has no config.json; give {ACCEPTED}")
        return _shape_from_file(path, os.path.basename(os.path.normpath(text)))
    if os.path.isfile(text):
        return _shape_from_file(text, os.path.basename(os.path.dirname(os.path.abspath(text))) or text)
    cached = _cached_hub_config(text)
    if cached:
        return _shape_from_file(cached, text)
    close = _close_builtin(key)
    hint = f"; did you mean `{close}`?" if close else ""
    raise ModelError(f"`model: {text}` is not known here (offline, not in the local Hugging Face cache){hint} "
                     f"Accepted: {ACCEPTED}")


def _close_builtin(key: str) -> Optional[str]:
    import difflib

    match = difflib.get_close_matches(key, list(_LOOKUP), n=1, cutoff=0.75)
    return _LOOKUP[match[0]] if match else None


def _cached_hub_config(repo_id: str) -> Optional[str]:
    """config.json of a hub id if the local Hugging Face cache already has it (never downloads)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id spelling: treat as not cached
        return None
    return found if isinstance(found, str) else None


def _shape_from_file(path: str, name: str) -> ModelShape:
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the model config ({exc})") from None
    if not isinstance(values, dict):
        raise ModelError(f"{path}: the model config must be a JSON object")
    return shape_from_hf_config(values, name=name, source=path)


# model_type -> whether the output head is tied when config.json does not say.
_TIED_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "phi3": False,
                 "gemma": True, "gemma2": True, "gemma3_text": True}


def shape_from_hf_config(values: dict, *, name: str = "config", source: str = "model config") -> ModelShape:
    """Read a Hugging Face config dict (as in config.json) into a ModelShape.

    Example::

        shape_from_hf_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000})
    """
    if "text_config" in values and "hidden_size" not in values:
        values = {**values["text_config"], "model_type": values["text_config"].get("model_type", values.get("model_type"))}
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if not isinstance(values.get(k), int) or isinstance(values.get(k), bool)
               or values.get(k) <= 0]
    if missing:
        raise ModelError(f"{source}: `{missing[0]}` is missing or not a positive whole number; a decoder-only "
                         "transformer config (hidden_size, intermediate_size, num_hidden_layers, "
                         "num_attention_heads, vocab_size) is needed")
    model_type = str(values.get("model_type", "llama"))
    hidden = values["hidden_size"]
    heads = values["num_attention_heads"]
    intermediate = values.get("intermediate_size") or 4 * hidden
    kv_heads = values.get("num_key_value_heads") or heads
    head_dim = values.get("head_dim") or hidden // heads
    tied = values.get("tie_word_embeddings")
    if tied is None:
        tied = _TIED_DEFAULT.get(model_type, True)
    known = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "tie_word_embeddings", "model_type"}
    keep = ("rope_theta", "rms_norm_eps", "max_position_embeddings", "sliding_window", "hidden_act",
            "attention_bias", "mlp_bias", "rope_scaling", "pad_token_id", "bos_token_id", "eos_token_id",
            "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
    extra = tuple((k, values[k]) for k in keep if k in values and k not in known and _hashable(values[k]))
    return ModelShape(
        name=name, model_type=model_type, hidden=hidden, intermediate=intermediate,
        layers=values["num_hidden_layers"], heads=heads, kv_heads=kv_heads, vocab=values["vocab_size"],
        head_dim=head_dim, tied=bool(tied),
        bias_linears=_bias_linears(model_type, values),
        fused_qkv=model_type == "phi3", fused_gate_up=model_type == "phi3",
        norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
        final_logit_softcap=values.get("final_logit_softcapping") if model_type in ("gemma2", "gemma3_text") else None,
        extra=extra,
    )


def _bias_linears(model_type: str, values: dict) -> tuple:
    """Which linears of a block carry a bias, from the config's own switches.

    Qwen2 always biases q, k and v; Llama-style configs say `attention_bias` (q, k, v and
    o) and `mlp_bias` (gate, up, down).
    """
    if model_type == "qwen2":
        return _QKV
    names: tuple = ()
    if values.get("attention_bias"):
        names += _QKV + ("o_proj", "qkv_proj")
    if values.get("mlp_bias"):
        names += ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
    return names


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True

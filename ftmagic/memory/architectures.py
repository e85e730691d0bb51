"""Model shapes: the few numbers of a config that decide how much memory training takes.

A model is named by a built-in architecture (``llama-3.2-1b``), a local directory or
``config.json`` file, a Hugging Face id found in the local cache, a config dict, or
``tiny`` (the embedded model); a folder holding a saved adapter stands for its base model.
Only the configuration is read, never the weights, and nothing here imports torch.

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

from ftmagic.adapters import is_adapter_folder, read_adapter
from ftmagic.errors import ModelError, did_you_mean


# How each layout names the linear layers of a block and what each one does. The group
# (qkv, o, mlp_in, down) is what the activation model needs: which tensor a linear reads.
# GPT-2 has two `c_proj` layers (attention output, MLP output), so its names carry their
# parent (`attn.c_proj`, `mlp.c_proj`), as the engine's names of the real model do.
LINEAR_GROUP = {
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "qkv_proj": "qkv", "o_proj": "o",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in", "down_proj": "down",
    "c_attn": "qkv", "attn.c_proj": "o", "c_fc": "mlp_in", "mlp.c_proj": "down",  # GPT-2 (Conv1D)
    "query_key_value": "qkv", "dense": "o", "dense_h_to_4h": "mlp_in", "dense_4h_to_h": "down",  # GPT-NeoX
}
LAYOUTS = ("llama", "gpt2", "gpt_neox")
# rms: Llama's RMSNorm (normalises in fp32, scales in the compute dtype); rms_fp32: Gemma's
# (scales by 1 + weight in fp32); layer: LayerNorm with a bias (GPT-2, GPT-NeoX).
NORM_KINDS = ("rms", "rms_fp32", "layer")


@dataclass(frozen=True)
class ModelShape:
    """Shape of a decoder-only transformer, as far as training memory and parameter counts are concerned.

    ``layout`` names the block's linears (``llama``: q/k/v/o and gate/up/down, fused for
    Phi-3; ``gpt2``: c_attn, attn.c_proj, c_fc, mlp.c_proj; ``gpt_neox``: query_key_value,
    dense, dense_h_to_4h, dense_4h_to_h); the other fields say what each family adds.

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
    bias_linears: tuple = ()  # names of the block's linears that have a bias (Qwen2: q, k, v)
    fused_qkv: bool = False  # Phi-3: one qkv_proj linear
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj linear
    norms_per_layer: int = 2  # Gemma 2 and 3 have four norms per block
    final_logit_softcap: Optional[float] = None  # Gemma 2: tanh soft-capping of the logits
    layout: str = "llama"  # one of LAYOUTS: how the block's linears are named and wired
    gated_mlp: bool = True  # SwiGLU/GeGLU (gate, up, down); False: one linear in, one out (GPT-2, GPT-NeoX)
    mlp_act: str = "silu"  # the MLP's activation (its saved tensors differ: `gelu_new` is a composite of five ops)
    qk_norm: bool = False  # Qwen3, Gemma 3: an RMSNorm over each head's queries and keys
    norm_kind: str = "rms"  # one of NORM_KINDS: RMSNorm, Gemma's all-fp32 RMSNorm, LayerNorm with a bias
    position_embeddings: int = 0  # learned absolute positions (GPT-2's wpe); 0: rotary, no parameters
    sliding_window: int = 0  # local attention span of the sliding layers (Mistral, Gemma 2/3, Phi-3); 0: none
    attn_softcap: Optional[float] = None  # Gemma 2: tanh soft-capping of the attention scores (eager kernel)
    attention_dropout: float = 0.0  # dropout on attention probabilities in training (GPT-2: 0.1)
    residual_dropout: float = 0.0  # dropout on each residual branch and the embeddings (GPT-2: 0.1)
    extra: tuple = field(default=())  # extra Hugging Face config keys, as (key, value) pairs

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {LAYOUTS}")
        if self.norm_kind not in NORM_KINDS:
            raise ValueError(f"norm_kind {self.norm_kind!r} is not one of {NORM_KINDS}")

    @property
    def context(self) -> int:
        """The most positions the model was built for (``max_position_embeddings``, GPT-2's
        ``n_positions``); 0 where its config does not say (the built-in table)."""
        if self.position_embeddings:
            return self.position_embeddings
        value = dict(self.extra).get("max_position_embeddings")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    @property
    def norm_bias(self) -> bool:
        """LayerNorm carries a bias beside its scale; RMSNorm has none."""
        return self.norm_kind == "layer"

    # ---------------------------------------------------------------- parameters
    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list:
        """(name, in_features, out_features) of every linear layer in one block, in model order."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        if self.layout == "gpt2":
            return [("c_attn", h, q + 2 * kv), ("attn.c_proj", q, h), ("c_fc", h, i), ("mlp.c_proj", i, h)]
        if self.layout == "gpt_neox":
            return [("query_key_value", h, q + 2 * kv), ("dense", q, h), ("dense_h_to_4h", h, i),
                    ("dense_4h_to_h", i, h)]
        if self.fused_qkv:
            attn = [("qkv_proj", h, q + 2 * kv)]
        else:
            attn = [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv)]
        attn.append(("o_proj", q, h))
        if not self.gated_mlp:
            return attn + [("up_proj", h, i), ("down_proj", i, h)]
        mlp = [("gate_up_proj", h, 2 * i)] if self.fused_gate_up else [("gate_proj", h, i), ("up_proj", h, i)]
        mlp.append(("down_proj", i, h))
        return attn + mlp

    @property
    def linear_weight_params_per_layer(self) -> int:
        """Weights of one block's linears (what QLoRA stores in 4 bits)."""
        return sum(fan_in * fan_out for _, fan_in, fan_out in self.linears())

    @property
    def linear_bias_params_per_layer(self) -> int:
        """Bias terms of one block's linears."""
        return sum(fan_out for name, _, fan_out in self.linears() if name in self.bias_linears)

    @property
    def linear_params_per_layer(self) -> int:
        """Weights and biases of one block's linears."""
        return self.linear_weight_params_per_layer + self.linear_bias_params_per_layer

    @property
    def norm_width(self) -> int:
        """Parameters of one hidden-wide norm: a scale, and a bias for LayerNorm."""
        return self.hidden * (2 if self.norm_bias else 1)

    @property
    def norm_params_per_layer(self) -> int:
        """The block's norms, q/k norms included."""
        return self.norms_per_layer * self.norm_width + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def bias_params_per_layer(self) -> int:
        """Bias terms of one block: its linears' and its LayerNorms' (what BitFit trains per block)."""
        return self.linear_bias_params_per_layer + (self.norms_per_layer * self.hidden if self.norm_bias else 0)

    @property
    def bias_params(self) -> int:
        """Every bias term of the model (what BitFit trains): the blocks' and the final LayerNorm's."""
        return self.layers * self.bias_params_per_layer + (self.hidden if self.norm_bias else 0)

    @property
    def final_norm_params(self) -> int:
        return self.norm_width

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def position_params(self) -> int:
        return self.position_embeddings * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """Every parameter: embeddings (and learned positions), blocks, final norm and (untied) output head."""
        return (self.embedding_params + self.position_params
                + self.layers * (self.linear_params_per_layer + self.norm_params_per_layer)
                + self.final_norm_params + self.head_params)

    @property
    def param_tensors(self) -> int:
        """How many parameter tensors the model has (each optimizer state keeps a step counter per tensor)."""
        per_layer = len(self.linears()) + len([n for n, _, _ in self.linears() if n in self.bias_linears])
        per_layer += self.norms_per_layer * (2 if self.norm_bias else 1) + (2 if self.qk_norm else 0)
        outside = 1 + (1 if self.position_embeddings else 0) + (2 if self.norm_bias else 1) + (0 if self.tied else 1)
        return self.layers * per_layer + outside

    def hf_config(self) -> dict:
        """A Hugging Face config dict (``model_type`` included) that builds this architecture."""
        if self.layout == "gpt2":
            cfg = dict(model_type=self.model_type, n_embd=self.hidden, n_inner=self.intermediate, n_layer=self.layers,
                       n_head=self.heads, vocab_size=self.vocab, n_positions=self.position_embeddings,
                       tie_word_embeddings=self.tied)
        else:
            cfg = dict(model_type=self.model_type, hidden_size=self.hidden, intermediate_size=self.intermediate,
                       num_hidden_layers=self.layers, num_attention_heads=self.heads,
                       num_key_value_heads=self.kv_heads, vocab_size=self.vocab, tie_word_embeddings=self.tied,
                       head_dim=self.head_dim)
        cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in self.extra})
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
           final_logit_softcap=30.0, attn_softcap=50.0, sliding_window=4096, norm_kind="rms_fp32",
           mlp_act="gelu_tanh"),
    _shape("phi-3-mini", "phi3", 3072, 8192, 32, 32, 32, 32064, False, fused_qkv=True, fused_gate_up=True,
           sliding_window=2047),
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


def fit_to_context(model: Any, max_seq_len: int) -> tuple:
    """``(max_seq_len, note)``: ``max_seq_len`` held to the positions the model was built for, and
    the line that says so where it was cut (None where it fits or the model's config is unknown).

    Past its positions a model with learned ones (GPT-2) fails with an index error, and a
    rotary one trains on positions it never saw; training, the previewer and the memory
    calculator all cut at the model's length, with this line.

    Example::

        fit_to_context("tiny", 2048)   # (512, '`max_seq_len: 2048` is above the 512 positions tiny ...')
        fit_to_context("tiny", 256)    # (256, None)
    """
    try:
        shape = resolve_model(model)
    except (ModelError, OSError, ValueError):
        return max_seq_len, None
    if not shape.context or max_seq_len <= shape.context:
        return max_seq_len, None
    return shape.context, (f"`max_seq_len: {max_seq_len}` is above the {shape.context:,} positions {shape.name} was "
                           f"built for (`max_position_embeddings`): examples are cut at {shape.context:,} tokens")


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
    if os.path.isdir(text) and is_adapter_folder(text) and not os.path.exists(os.path.join(text, "config.json")):
        return replace(resolve_model(read_adapter(text).base), name=os.path.basename(os.path.normpath(text)))
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
    hint = did_you_mean(key, _LOOKUP, cutoff=0.75, rename=_LOOKUP)
    # The calculator reads shapes it has; it never downloads, online or not (so it says that, not "offline").
    raise ModelError(f"`model: {text}` is not a built-in name, a local directory or a Hugging Face id in the local "
                     f"cache, and the memory calculator never downloads{hint or '.'} Accepted: {ACCEPTED}")


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
                 "gemma": True, "gemma2": True, "gemma3_text": True, "gpt2": True, "gpt_neox": False}

# What a family's blocks hold that its config.json does not spell out (each checked against
# the real model built from a config by tests/test_architectures.py).
_FAMILY = {
    "gemma": dict(norm_kind="rms_fp32", mlp_act="gelu_tanh"),
    "gemma2": dict(norms_per_layer=4, norm_kind="rms_fp32", mlp_act="gelu_tanh"),  # pre/post norms around both
    "gemma3_text": dict(norms_per_layer=4, qk_norm=True, norm_kind="rms_fp32", mlp_act="gelu_tanh"),
    "qwen3": dict(qk_norm=True),
    "phi3": dict(fused_qkv=True, fused_gate_up=True),
    # Conv1D layers, LayerNorm, learned positions, and a tanh-approximated GELU built from five ops
    "gpt2": dict(layout="gpt2", gated_mlp=False, norm_kind="layer", mlp_act="gelu_new"),
    "gpt_neox": dict(layout="gpt_neox", gated_mlp=False, norm_kind="layer", mlp_act="gelu"),
}
# Families whose every layer (or, with `layer_types`, the sliding ones) attends within `sliding_window`.
_SLIDING = ("mistral", "phi3", "gemma2", "gemma3_text")
# Config keys of the training dropouts: (attention probabilities, residual branches).
_DROPOUT_KEYS = {"gpt2": ("attn_pdrop", "resid_pdrop"), "phi3": ("attention_dropout", "resid_pdrop"),
                 "gpt_neox": ("attention_dropout", "hidden_dropout")}
_DROPOUT_DEFAULTS = {"gpt2": (0.1, 0.1)}  # what transformers uses when config.json leaves them out
# GPT-2's config.json spells the common keys its own way.
_GPT2_KEYS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
              "n_inner": "intermediate_size", "n_positions": "max_position_embeddings"}


def shape_from_hf_config(values: dict, *, name: str = "config", source: str = "model config") -> ModelShape:
    """Read a Hugging Face config dict (as in config.json) into a ModelShape.

    Example::

        shape_from_hf_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000})
    """
    if "text_config" in values and "hidden_size" not in values:
        values = {**values["text_config"], "model_type": values["text_config"].get("model_type", values.get("model_type"))}
    model_type = str(values.get("model_type", "llama"))
    if model_type == "gpt2":
        values = {**values, **{common: values[own] for own, common in _GPT2_KEYS.items()
                               if values.get(own) is not None and common not in values}}
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if not isinstance(values.get(k), int) or isinstance(values.get(k), bool)
               or values.get(k) <= 0]
    if missing:
        raise ModelError(f"{source}: `{missing[0]}` is missing or not a positive whole number; a decoder-only "
                         "transformer config (hidden_size, intermediate_size, num_hidden_layers, "
                         "num_attention_heads, vocab_size) is needed")
    hidden = values["hidden_size"]
    heads = values["num_attention_heads"]
    intermediate = values.get("intermediate_size") or 4 * hidden
    kv_heads = values.get("num_key_value_heads") or heads
    head_dim = values.get("head_dim") or hidden // heads
    tied = values.get("tie_word_embeddings")
    if tied is None:
        tied = _TIED_DEFAULT.get(model_type, True)
    family = _FAMILY.get(model_type, {})
    known = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "tie_word_embeddings", "model_type", *_GPT2_KEYS}
    keep = ("rope_theta", "rms_norm_eps", "max_position_embeddings", "sliding_window", "hidden_act",
            "attention_bias", "mlp_bias", "rope_scaling", "pad_token_id", "bos_token_id", "eos_token_id",
            "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "layer_norm_epsilon",
            "layer_norm_eps", "activation_function", "rotary_pct", "use_parallel_residual", "layer_types",
            "use_sliding_window", "max_window_layers", "attn_pdrop", "resid_pdrop", "embd_pdrop",
            "attention_dropout", "hidden_dropout")
    extra = tuple((k, tuple(values[k]) if isinstance(values[k], list) else values[k]) for k in keep
                  if k in values and k not in known and _hashable(tuple(values[k]) if isinstance(values[k], list)
                                                                 else values[k]))
    gemma = model_type in ("gemma2", "gemma3_text")
    softcap = values.get("final_logit_softcapping") if gemma else None
    attn_key, resid_key = _DROPOUT_KEYS.get(model_type, ("attention_dropout", None))
    attn_default, resid_default = _DROPOUT_DEFAULTS.get(model_type, (0.0, 0.0))
    window = values.get("sliding_window") if (model_type in _SLIDING or values.get("use_sliding_window")) else None
    return ModelShape(
        name=name, model_type=model_type, hidden=hidden, intermediate=intermediate,
        layers=values["num_hidden_layers"], heads=heads, kv_heads=kv_heads, vocab=values["vocab_size"],
        head_dim=head_dim, tied=bool(tied), bias_linears=_bias_linears(model_type, values),
        final_logit_softcap=softcap or None,
        attn_softcap=(values.get("attn_logit_softcapping") or None) if model_type == "gemma2" else None,
        position_embeddings=int(values.get("max_position_embeddings") or 1024) if model_type == "gpt2" else 0,
        sliding_window=int(window or 0),
        attention_dropout=float(values.get(attn_key, attn_default) or 0.0),
        residual_dropout=float(values.get(resid_key, resid_default) or 0.0) if resid_key else 0.0,
        **family, extra=extra,
    )


def _bias_linears(model_type: str, values: dict) -> tuple:
    """Which linears of a block carry a bias, from the family and the config's own switches.

    Qwen2 always biases q, k and v; GPT-2 biases every Conv1D; GPT-NeoX its MLP always and
    its attention by `attention_bias` (default on); Llama-style configs say
    `attention_bias` (q, k, v and o) and `mlp_bias` (gate, up, down).
    """
    if model_type == "qwen2":
        return _QKV
    if model_type == "gpt2":
        return ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")
    if model_type == "gpt_neox":
        attention = ("query_key_value", "dense") if values.get("attention_bias", True) else ()
        return attention + ("dense_h_to_4h", "dense_4h_to_h")
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

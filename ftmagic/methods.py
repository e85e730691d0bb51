"""The fine-tuning methods: one torch-free table of what each method trains.

Every layer reads this table: the config's validation (which names exist, what may be
packed), the memory calculator (what trains, what is quantized, which loss runs), and
the engine, whose registry (:mod:`ftmagic.engine.methods`) adds only *how* to prepare a
model for each name, the way peft registers its tuners. A method is one entry here and
one preparer there; a test checks that both list the same names.

=============== ========== ======= ========= ================================================
method          trains     adapter quantized notes
=============== ========== ======= ========= ================================================
full            all        no      no        every weight
lora            adapters   yes     no        low-rank adapters on ``target_modules``
qlora           adapters   yes     yes       LoRA on a 4-bit NF4 base
dora            adapters   yes     no        weight-decomposed LoRA (adds a magnitude vector)
ia3             adapters   yes     no        learned rescaling of keys, values, MLP input
prompt_tuning   virtual    yes     no        trainable soft-prompt embeddings (adds positions)
prefix_tuning   virtual    yes     no        trainable key/value prefixes in every layer
bitfit          biases     no      no        bias terms only (refused on bias-free models)
freeze          top_layers no      no        the top ``trainable_layers`` blocks, final norm, head
=============== ========== ======= ========= ================================================

Example::

    >>> from ftmagic.methods import get_method_spec, select_targets
    >>> get_method_spec("qlora").quantized
    True
    >>> select_targets(get_method_spec("ia3"), ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], "auto")
    ['k_proj', 'v_proj', 'down_proj']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ftmagic.errors import ConfigError, not_accepted

# What part of the model a method trains (the calculator counts parameters from this).
TRAINS = ("all", "adapters", "virtual_tokens", "biases", "top_layers")
# Losses the engine can run: `chunked` (ftmagic's fast path, no full logits) and `full`
# (the model's own forward with labels).
LOSSES = ("chunked", "full")


@dataclass(frozen=True)
class MethodSpec:
    """What one fine-tuning method is; the engine adds how to prepare a model for it.

    Example::

        MethodSpec("lora", trains="adapters", adapter=True, mergeable=True, peft_type="LORA",
                   summary="low-rank adapters")
    """

    name: str
    trains: str  # one of TRAINS
    adapter: bool  # saved as a PEFT adapter beside an untouched base; else full weights are saved
    summary: str
    quantized: bool = False  # the base is loaded in 4-bit NF4
    mergeable: bool = False  # `merge: true` can fold the adapter into the base weights
    peft_type: Optional[str] = None  # the peft tuner that implements it
    magnitude: bool = False  # DoRA: one trainable magnitude per output feature of each target
    # Leaf names adapted under `target_modules: auto`, in preference order; None: every linear
    # layer of the blocks (the QLoRA paper's choice). IA3 rescales keys, values and the MLP's
    # down projection (its input, hence `feedforward`), as in the IA3 paper and peft's defaults.
    default_targets: Optional[tuple] = None
    feedforward: tuple = ()
    adds_positions: bool = False  # virtual tokens are extra sequence positions (prompt tuning)

    @property
    def prompt_learning(self) -> bool:
        """Virtual tokens (prompt or prefix tuning): never packed, no chunked loss."""
        return self.trains == "virtual_tokens"

    @property
    def packable(self) -> bool:
        """Packed examples would share virtual tokens, so prompt learning cannot be packed."""
        return not self.prompt_learning

    @property
    def losses(self) -> tuple:
        """Losses that apply: prompt learning needs the model's own forward (peft inserts the tokens)."""
        return ("full",) if self.prompt_learning else LOSSES

    @property
    def trains_base_weights(self) -> bool:
        """Whether the model's own weights change (saved as full weights, optimizer states on them)."""
        return not self.adapter


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the table; a duplicate name or an unknown `trains` is a programming error."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    if spec.trains not in TRAINS:
        raise ValueError(f"method {spec.name!r}: trains={spec.trains!r} is not one of {TRAINS}")
    METHODS[spec.name] = spec
    return spec


# IA3's keys, values and MLP output projection in each layout's names (peft's own defaults per
# family): fused qkv layers are rescaled whole; GPT-2's MLP output is `mlp.c_proj`.
_IA3_TARGETS = ("k_proj", "v_proj", "down_proj", "qkv_proj", "query_key_value", "dense_4h_to_h", "c_attn",
                "mlp.c_proj", "fc2", "w2")
_IA3_FEEDFORWARD = ("down_proj", "dense_4h_to_h", "mlp.c_proj", "fc2", "w2")

register_method(MethodSpec("full", trains="all", adapter=False, summary="every weight trains"))
register_method(MethodSpec("lora", trains="adapters", adapter=True, mergeable=True, peft_type="LORA",
                           summary="low-rank adapters"))
register_method(MethodSpec("qlora", trains="adapters", adapter=True, quantized=True, mergeable=True, peft_type="LORA",
                           summary="LoRA on a 4-bit NF4 base"))
register_method(MethodSpec("dora", trains="adapters", adapter=True, mergeable=True, peft_type="LORA", magnitude=True,
                           summary="weight-decomposed low-rank adapters"))
register_method(MethodSpec("ia3", trains="adapters", adapter=True, mergeable=True, peft_type="IA3",
                           default_targets=_IA3_TARGETS, feedforward=_IA3_FEEDFORWARD,
                           summary="learned rescaling vectors"))
register_method(MethodSpec("prompt_tuning", trains="virtual_tokens", adapter=True, peft_type="PROMPT_TUNING",
                           adds_positions=True, summary="trainable virtual tokens"))
register_method(MethodSpec("prefix_tuning", trains="virtual_tokens", adapter=True, peft_type="PREFIX_TUNING",
                           summary="trainable key/value prefixes"))
register_method(MethodSpec("bitfit", trains="biases", adapter=False, summary="bias terms only"))
register_method(MethodSpec("freeze", trains="top_layers", adapter=False, summary="top blocks and the head only"))

METHOD_NAMES = tuple(METHODS)


def get_method_spec(name: str) -> MethodSpec:
    """The table entry for ``name``; a one-line ConfigError (with the closest name) otherwise.

    Example::

        get_method_spec("lora").adapter    # True
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise not_accepted("method", name, list(METHODS)) from None


def reads_key(spec: MethodSpec, key: str) -> bool:
    """Whether a run of ``spec`` reads config key ``key``; False for the keys of other kinds of
    method (``lora_r`` of a full run, ``trainable_layers`` of a LoRA run), which keep their
    defaults unused, so a model card or summary that showed them would describe a run that did
    not happen. Keys no method owns are read by every method.

    Example::

        >>> reads_key(get_method_spec("lora"), "lora_r"), reads_key(get_method_spec("lora"), "trainable_layers")
        (True, False)
        >>> reads_key(get_method_spec("ia3"), "target_modules"), reads_key(get_method_spec("ia3"), "lora_r")
        (True, False)
    """
    if key in ("lora_r", "lora_alpha", "lora_dropout"):
        return spec.peft_type == "LORA"
    if key == "target_modules":
        return spec.trains == "adapters"
    if key == "num_virtual_tokens":
        return spec.prompt_learning
    if key == "trainable_layers":
        return spec.trains == "top_layers"
    return True


def select_targets(spec: MethodSpec, linear_names: Sequence[str], target_modules: Any = "auto") -> list:
    """Names of the block's linear layers that ``spec`` adapts.

    ``linear_names`` name every linear layer of one block, in model order: the leaf name, or
    the parent and leaf where a leaf name repeats (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``).
    ``auto`` takes the method's defaults (every linear for LoRA and DoRA; keys, values and
    the MLP's output projection for IA3), ``all-linear`` every linear, a list exactly those
    layers: a name selects every layer it ends (``c_proj`` selects both of GPT-2's), as peft
    matches ``target_modules``. The calculator and the engine both call this, so they adapt
    the same layers.

    Example::

        >>> select_targets(get_method_spec("lora"), ["q_proj", "v_proj"], "auto")
        ['q_proj', 'v_proj']
        >>> select_targets(get_method_spec("lora"), ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], ["c_proj"])
        ['attn.c_proj', 'mlp.c_proj']
    """
    names = list(dict.fromkeys(linear_names))
    if target_modules in (None, "auto"):
        if spec.default_targets is None:
            return names
        chosen = [n for n in names if n in spec.default_targets]
        return chosen or names
    if target_modules == "all-linear":
        return names
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [t for t in wanted if not any(_names_same_layer(n, str(t)) for n in names)]
    if unknown or not wanted:
        raise ConfigError(f"`target_modules`: {', '.join(map(str, unknown or wanted))} not found among the linear "
                          f"layers of the blocks; use `auto` or some of {', '.join(names)}")
    return [n for n in names if any(_names_same_layer(n, str(t)) for t in wanted)]


def _names_same_layer(name: str, wanted: str) -> bool:
    """Whether ``wanted`` names the layer ``name``: equal, or one a dotted suffix of the other (peft's rule)."""
    return name == wanted or name.endswith("." + wanted) or wanted.endswith("." + name)


def feedforward_targets(spec: MethodSpec, targets: Sequence[str]) -> list:
    """The targets an IA3-style method rescales on their input side (the MLP's down projection)."""
    return [t for t in targets if t in spec.feedforward]

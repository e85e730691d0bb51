"""Fine-tuning methods: a registry of plain entries, ``name -> how to prepare the model``.

Adding a method is adding an entry (see :func:`register`), never editing a chain of
ifs. Each ``prepare(model, config)`` returns the model to train with exactly the
intended parameters left trainable.

=============== ==================================================================
full            every weight trains
lora / dora     low-rank adapters on ``target_modules`` (DoRA: weight-decomposed)
qlora           LoRA on a 4-bit NF4 base (the model is loaded quantized)
ia3             learned rescaling vectors (IA3)
prompt_tuning   trainable virtual tokens in front of the input
prefix_tuning   trainable key/value prefixes in every attention layer
bitfit          only bias terms; a model without biases is refused with an error, since
                training "nothing" or silently switching to another method would mislead
freeze          only the top ``trainable_layers`` blocks, the final norm and the head
                (with tied embeddings the head *is* the input embedding, so it trains too)
=============== ==================================================================

Example::

    from ftmagic.engine.methods import METHODS
    model = METHODS["lora"].prepare(model, config)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ftmagic.errors import ConfigError, ModelError


@dataclass(frozen=True)
class Method:
    """One registry entry."""

    name: str
    prepare: Callable  # (model, config) -> model with the right parameters trainable
    adapter: bool  # True: saved as a PEFT adapter; False: saved as full weights
    quantized: bool = False  # the base is loaded in 4-bit
    mergeable: bool = False  # merge: true can fold the adapter into the base weights
    summary: str = ""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; a duplicate name is a programming error, so it raises."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"`method: {name}` is not accepted; use one of {', '.join(METHODS)}") from None


# --------------------------------------------------------------------------- helpers


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (the largest ModuleList in the model)."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None or len(best) == 0:
        raise ModelError(f"cannot find the transformer blocks of {type(model).__name__}")
    return best


def auto_target_modules(model: nn.Module) -> list[str]:
    """Names (last component) of every linear layer inside the blocks: the QLoRA-paper choice."""
    names = []
    for block in transformer_blocks(model)[:1]:
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
                leaf = name.rsplit(".", 1)[-1]
                if leaf not in names:
                    names.append(leaf)
    if not names:
        raise ModelError(f"no linear layers found in the blocks of {type(model).__name__}; set `target_modules`")
    return names


def _targets(model, config):
    if config.target_modules == "auto":
        return auto_target_modules(model)
    if config.target_modules == "all-linear":
        return "all-linear"
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in config.target_modules if t not in present]
    if missing:
        raise ConfigError(f"`target_modules`: {', '.join(missing)} not found in the model; "
                          f"linear layers there are: {', '.join(auto_target_modules(model))}")
    return list(config.target_modules)


def _set_trainable(model, predicate) -> int:
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(bool(predicate(name)))
        count += param.numel() if param.requires_grad else 0
    return count


def _peft(model, peft_config):
    from peft import get_peft_model

    from ftmagic.engine.models import quiet_peft

    with quiet_peft():
        return get_peft_model(model, peft_config)


# --------------------------------------------------------------------------- entries


def _full(model, config):
    _set_trainable(model, lambda name: True)
    return model


def _lora(model, config, *, dora: bool = False):
    from peft import LoraConfig

    return _peft(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                   target_modules=_targets(model, config), use_dora=dora, task_type="CAUSAL_LM"))


def _qlora(model, config):
    from peft import prepare_model_for_kbit_training

    # Casts norms and the head to fp32 for stable training; checkpointing is set up by the loop.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _lora(model, config)


def _ia3(model, config):
    from peft import IA3Config

    if config.target_modules == "auto":
        targets = auto_target_modules(model)
        # IA3 scales keys, values and the MLP output; the feed-forward one rescales inputs.
        wanted = [t for t in targets if t in ("k_proj", "v_proj", "down_proj", "c_attn", "c_proj", "fc2", "dense_4h_to_h")]
        targets = wanted or targets
    else:
        targets = _targets(model, config)
    if targets == "all-linear":
        targets = auto_target_modules(model)
    feed_forward = [t for t in targets if t in ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")]
    return _peft(model, IA3Config(target_modules=targets, feedforward_modules=feed_forward, task_type="CAUSAL_LM"))


def _prompt_tuning(model, config):
    from peft import PromptTuningConfig

    return _peft(model, PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, task_type="CAUSAL_LM"))


def _prefix_tuning(model, config):
    from peft import PrefixTuningConfig

    return _peft(model, PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, task_type="CAUSAL_LM"))


def _bitfit(model, config):
    biases = [name for name, _ in model.named_parameters() if name.endswith(".bias")]
    if not biases:
        raise ModelError(f"`method: bitfit` trains bias terms, and {type(model).__name__} has none "
                         "(Llama-style models are bias-free); use `method: lora` or a model with biases")
    _set_trainable(model, lambda name: name.endswith(".bias"))
    return model


def _freeze(model, config):
    blocks = transformer_blocks(model)
    n = min(config.trainable_layers, len(blocks))
    keep = {id(p) for block in list(blocks)[len(blocks) - n:] for p in block.parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        keep |= {id(p) for p in head.parameters()}
    # The final norm sits between the top block and the head; it trains with them.
    for name, module in model.named_modules():
        if name.endswith(("norm", "ln_f", "final_layernorm")) and not any(module is b or _contains(b, module) for b in blocks):
            keep |= {id(p) for p in module.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    return model


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


register(Method("full", _full, adapter=False, summary="every weight trains"))
register(Method("lora", _lora, adapter=True, mergeable=True, summary="low-rank adapters"))
register(Method("qlora", _qlora, adapter=True, quantized=True, mergeable=True, summary="LoRA on a 4-bit NF4 base"))
register(Method("dora", lambda m, c: _lora(m, c, dora=True), adapter=True, mergeable=True,
                summary="weight-decomposed low-rank adapters"))
register(Method("ia3", _ia3, adapter=True, mergeable=True, summary="learned rescaling vectors"))
register(Method("prompt_tuning", _prompt_tuning, adapter=True, summary="trainable virtual tokens"))
register(Method("prefix_tuning", _prefix_tuning, adapter=True, summary="trainable key/value prefixes"))
register(Method("bitfit", _bitfit, adapter=False, summary="bias terms only"))
register(Method("freeze", _freeze, adapter=False, summary="top blocks and the head only"))


def enable_gradient_checkpointing(model, adapter: bool) -> None:
    """Non-reentrant checkpointing; with a frozen base the inputs must require grad."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter:
        base.enable_input_require_grads()
    base.config.use_cache = False


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total

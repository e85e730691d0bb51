"""How to prepare a model for each fine-tuning method: the engine's half of the method table.

*What* each method trains (adapter or not, quantized, prompt learning, default targets)
lives in the torch-free table :mod:`ftmagic.methods`, which the config, the memory
calculator and the tracer read too. This registry adds one preparer per name,
``prepare(model, config) -> model`` with exactly the intended parameters left trainable,
in the way peft registers its tuners; a new method is one entry in each.

BitFit on a model without biases is refused with an error, since training "nothing" or
silently switching to another method would mislead. ``freeze`` trains the top
``trainable_layers`` blocks, the final norm and the head (with tied embeddings the head
*is* the input embedding, so it trains too).

Example::

    from ftmagic.engine.methods import get_method
    model = get_method("lora").prepare(model, config)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ftmagic.errors import ConfigError, ModelError
from ftmagic.methods import METHODS as SPECS
from ftmagic.methods import MethodSpec, feedforward_targets, get_method_spec, select_targets


@dataclass(frozen=True)
class Method:
    """A method's facts (from the core table) and how the engine prepares a model for it."""

    spec: MethodSpec
    prepare: Callable  # (model, config) -> model with the right parameters trainable

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def adapter(self) -> bool:
        return self.spec.adapter

    @property
    def quantized(self) -> bool:
        return self.spec.quantized

    @property
    def mergeable(self) -> bool:
        return self.spec.mergeable


PREPARERS: dict[str, Callable] = {}


def register(name: str, prepare: Callable) -> Callable:
    """Add the preparer of a method of the core table; a duplicate or unknown name is a programming error."""
    if name in PREPARERS:
        raise ValueError(f"method {name!r} is already registered")
    if name not in SPECS:
        raise ValueError(f"method {name!r} is not in the method table (ftmagic/methods.py)")
    PREPARERS[name] = prepare
    return prepare


def get_method(name: str) -> Method:
    """The method's facts and preparer; a one-line ConfigError for an unknown name."""
    spec = get_method_spec(name)
    if name not in PREPARERS:
        raise ConfigError(f"`method: {name}` has no preparer in this version of the engine")
    return Method(spec, PREPARERS[name])


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


# Layer types that are linear maps: torch's, transformers' Conv1D (GPT-2 stores its weight
# transposed), and bitsandbytes' quantized ones (matched by name: importing bitsandbytes is slow).
_LINEAR_TYPE_NAMES = ("Conv1D", "Linear4bit", "Linear8bitLt")


def block_linear_names(model: nn.Module) -> list[str]:
    """Names of every linear layer of one transformer block, in model order.

    A layer is named by its leaf name (``q_proj``), or by its parent and leaf where the leaf
    repeats within the block (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``): these are the
    names :func:`ftmagic.methods.select_targets` chooses from, and peft matches them as
    suffixes of the full module names.
    """
    found = []
    for block in transformer_blocks(model)[:1]:
        for name, module in block.named_modules():
            if name and (isinstance(module, nn.Linear) or type(module).__name__ in _LINEAR_TYPE_NAMES):
                found.append(name.split("."))
    if not found:
        raise ModelError(f"no linear layers found in the blocks of {type(model).__name__}; set `target_modules`")
    leaves = [parts[-1] for parts in found]
    names = [".".join(parts[-2:]) if leaves.count(parts[-1]) > 1 else parts[-1] for parts in found]
    return list(dict.fromkeys(names))


def auto_target_modules(model: nn.Module, method: str = "lora") -> list[str]:
    """What ``target_modules: auto`` adapts for ``method`` (every linear of the blocks for LoRA)."""
    return select_targets(get_method_spec(method), block_linear_names(model), "auto")


def _targets(model, config, method: str) -> list[str]:
    # The same rule as the memory calculator's, applied to the real model's linears.
    return select_targets(get_method_spec(method), block_linear_names(model), config.target_modules)


def _set_trainable(model, predicate) -> int:
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(bool(predicate(name)))
        count += param.numel() if param.requires_grad else 0
    return count


def _task_type(config) -> str:
    """peft's task type: a classification head (reward, classify) is trained and saved with the adapter."""
    return _objective_task_type(getattr(config, "objective", "sft"))


def _objective_task_type(objective: str) -> str:
    from ftmagic.objectives import get_objective_spec

    return "SEQ_CLS" if get_objective_spec(objective).classifier_head else "CAUSAL_LM"


def head_parameter_ids(model) -> set:
    """Ids of the parameters of a sequence-classification head (``score`` or ``classifier``), if any."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return {id(p) for p in head.parameters()}
    return set()


def _peft(model, peft_config):
    from peft import get_peft_model

    from ftmagic.engine.models import quiet_peft

    with quiet_peft():
        return get_peft_model(model, peft_config)


# --------------------------------------------------------------------------- entries


def _full(model, config):
    _set_trainable(model, lambda name: True)
    return model


def _lora(model, config, *, method: str = "lora"):
    from peft import LoraConfig

    spec = get_method_spec(method)
    return _peft(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                   target_modules=_targets(model, config, method), use_dora=spec.magnitude,
                                   task_type=_task_type(config)))


def _qlora(model, config):
    from peft import prepare_model_for_kbit_training

    if getattr(config, "distributed", None) != "fsdp" or getattr(config, "processes", 1) < 2:
        # Casts norms and the head to fp32 for stable training; checkpointing is set up by the loop.
        # Under FSDP they keep the storage dtype: FSDP flattens one dtype per unit (peft's FSDP-QLoRA guide).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _lora(model, config, method="qlora")


def _ia3(model, config):
    from peft import IA3Config

    targets = _targets(model, config, "ia3")
    feed_forward = feedforward_targets(get_method_spec("ia3"), targets)
    return _peft(model, IA3Config(target_modules=targets, feedforward_modules=feed_forward, task_type=_task_type(config)))


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
    # A new classification head has no trained weights at all: it trains with the biases (as in the BitFit paper).
    head = head_parameter_ids(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".bias") or id(param) in head)
    return model


def _freeze(model, config):
    blocks = transformer_blocks(model)
    n = min(config.trainable_layers, len(blocks))
    keep = {id(p) for block in list(blocks)[len(blocks) - n:] for p in block.parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        keep |= {id(p) for p in head.parameters()}
    keep |= head_parameter_ids(model)  # a classification head (trainable_layers: 0 trains only it: feature-based)
    # The final norm sits between the top block and the head; it trains with them.
    for name, module in model.named_modules():
        if name.endswith(("norm", "ln_f", "final_layernorm")) and not any(module is b or _contains(b, module) for b in blocks):
            keep |= {id(p) for p in module.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    return model


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


register("full", _full)
register("lora", _lora)
register("qlora", _qlora)
register("dora", lambda model, config: _lora(model, config, method="dora"))
register("ia3", _ia3)
register("prompt_tuning", _prompt_tuning)
register("prefix_tuning", _prefix_tuning)
register("bitfit", _bitfit)
register("freeze", _freeze)


def continue_adapter(model, path: str, method: str, objective: str = "sft"):
    """``model`` with the adapter saved in ``path`` loaded trainable (a second stage of sequential fine-tuning).

    The adapter keeps its own rank, targets and tuner (:func:`ftmagic.adapters.plan_continuation`
    put them into the config); a QLoRA base gets peft's k-bit preparation first, as a new
    adapter would. An adapter of the language model continued with a head objective (``reward``,
    ``classify`` after SFT) gets a new head, trained and saved with it, as a new adapter would. An adapter that does not fit the base (another architecture or size) is a
    one-line ModelError, not peft's size-mismatch trace.

    Example::

        model = continue_adapter(load_model(base, device="cpu"), "runs/stage1", "lora", "sft")
    """
    from peft import PeftConfig, load_peft_weights, set_peft_model_state_dict

    if get_method_spec(method).quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # A fresh adapter from the saved config, then the saved weights: peft's `from_pretrained`
    # refuses to load prompt-learning adapters trainable, and this one path serves every tuner.
    config = PeftConfig.from_pretrained(path)
    config.inference_mode = False
    new_head = config.task_type is not None and config.task_type != _objective_task_type(objective)
    if new_head:  # a language-model adapter under a head objective: a new head joins it (head adapters are
        config.task_type = _objective_task_type(objective)  # refused other objectives by plan_continuation)
    try:
        model = _peft(model, config)
        device = next(model.parameters()).device
        weights = load_peft_weights(path, device=str(device))
        if new_head:  # the head the saved adapter lacks starts as a new adapter's would
            from peft import get_peft_model_state_dict

            for key, value in get_peft_model_state_dict(model).items():
                weights.setdefault(key, value)
        loaded = set_peft_model_state_dict(model, weights)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"the adapter in {path} does not fit the base model ({first[:160]}); "
                         "set `model:` to the base it was trained on") from None
    # (a prompt-learning adapter's `prompt_embeddings` are loaded into its encoder separately)
    unexpected = [k for k in getattr(loaded, "unexpected_keys", None) or [] if k != "prompt_embeddings"]
    if unexpected:
        raise ModelError(f"the adapter in {path} does not fit the base model ({len(unexpected)} of its weights, "
                         f"e.g. {unexpected[0]}, have no place in it); set `model:` to the base it was trained on")
    return model


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

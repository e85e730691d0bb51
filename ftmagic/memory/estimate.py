"""The analytic estimate: peak device memory of one training step, in milliseconds, no torch.

Peak memory is the maximum over three moments of a steady-state step (optimizer states
already exist), not the sum of everything:

* end of forward: weights, optimizer states, saved activations, and the logits while the
  loss is computed (logits, their fp32 upcast and log-softmax output: batch x seq x vocab);
* backward: at the loss (the logits' fp32 gradients) or, later, when most parameter
  gradients exist while one block's activations are still held (or recomputed, with
  gradient checkpointing);
* optimizer step: weights, gradients, states and the step's transient (none for the
  fused AdamW the engine uses on CUDA; torch's multi-tensor AdamW, used on CPU, allocates
  one more state-sized buffer for ``sqrt(v)``).

Saved-activation bytes per token and block come from how the block's autograd graph saves
tensors: for full fine-tuning in one dtype of ``c`` bytes they are exact
(``2 (4h + 2ch) + 2c (q + kv) + 4c i`` for a Llama block); for adapters on a frozen base
under autocast they are calibrated against the traced step (``benchmarks/memory_accuracy.py``
measures them with torch's MemTracker on real tensors; see ``_ADAPTER_PARAMS``).

Example::

    >>> from ftmagic.memory import estimate_memory
    >>> est = estimate_memory("llama-3.2-1b", method="qlora", batch_size=4, seq_len=1024)
    >>> sorted(est.breakdown)
    ['activations', 'communication_buffers', 'frozen_weights', 'gradients', 'logits', 'optimizer_states', 'optimizer_step_transient', 'trainable_weights']
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Optional

from ftmagic.constants import LOSS_CHUNK_ELEMENTS, NF4_BYTES_PER_PARAM, OPTIMIZERS, PRECISIONS
from ftmagic.errors import ConfigError, ModelError, not_accepted
from ftmagic.memory.architectures import LINEAR_GROUP, ModelShape, fit_to_context, resolve_model
from ftmagic.memory.policy import check_gpu_precision, resolve_precision, weight_plan
from ftmagic.methods import LOSSES as ENGINE_LOSSES
from ftmagic.methods import MethodSpec, get_method_spec, select_targets
from ftmagic.memory.sharding import device_share
from ftmagic.strategies import STRATEGY_NAMES, check_batch_split, get_strategy_spec, resolve_strategy, rows_per_process
from ftmagic.objectives import get_objective_spec, method_supports

LOSSES = ("auto",) + ENGINE_LOSSES
GIB = 1024 ** 3
EAGER_ATTENTION = ("gemma2",)  # architectures trained with the eager attention kernel (seq x seq scores)

# Keys of MemoryEstimate.breakdown, in the order they stack in the bar.
DEVICE_KEYS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states", "activations", "logits",
               "optimizer_step_transient", "communication_buffers")

# Bytes per element that a frozen-base block saves for backward, by (compute bytes,
# quantized, dropout): norm_in (each RMSNorm's fp32 input), attn (q, k, v and the attention
# output), mlp (SwiGLU's gate, up and activation), and per adapter group: shared (one
# copy of the group's input), per (each adapter's own copy: casts, dropout output and mask),
# r (the A projection's output) and const (per block). The dtype terms follow from the
# graph; the adapter terms are least-squares fits to traced steps of Llama blocks with
# every target set (benchmarks/memory_accuracy.py checks the result).
_ADAPTER_PARAMS = {
    (4, False, False): dict(norm_in=4, attn=4, mlp=4, shared=4, per=0, r=4, const=24),
    (4, False, True): dict(norm_in=4, attn=4, mlp=4, shared=0, per=4, r=0, const=0),
    (2, False, False): dict(norm_in=4, attn=2, mlp=2, shared=0, per=2, r=2, const=57),
    (2, False, True): dict(norm_in=4, attn=2, mlp=2, shared=0, per=2, r=0, const=0),
    # QLoRA: peft keeps norms and embeddings in fp32 and Linear4bit casts its output back
    # to its input dtype, so the residual stream and the MLP's saved tensors are fp32.
    (2, True, False): dict(norm_in=4, attn=2.5, mlp=4, shared=0, per=2, r=2, const=24),
    (2, True, True): dict(norm_in=4, attn=2.5, mlp=4, shared=0, per=2, r=0, const=0),
}
# Dropout saves its mask per adapter: a bool on CUDA (native_dropout), but on CPU torch
# multiplies by a noise tensor of the input's dtype (fp32: peft casts adapter inputs to
# the adapters' fp32), so the CPU benchmark sees 4 bytes where a GPU run holds 1.
DROPOUT_MASK_BYTES = {"cuda": 1, "cpu": 4}


@dataclass
class MemoryEstimate:
    """Predicted peak device memory of one training step, split by what holds it.

    ``breakdown`` maps DEVICE_KEYS to bytes at the peak phase (they sum to ``total_bytes``);
    ``paged_optimizer_states`` lives in managed host memory and is not counted;
    ``cuda_context`` and ``allocator_headroom`` are what the fit verdict adds on top.

    Example::

        est = estimate_memory("qwen2.5-0.5b", method="lora")
        print(est.total_bytes / 2**30, est.peak_phase, est.breakdown["activations"])
    """

    total_bytes: int
    breakdown: dict
    phases: dict  # forward / backward / optimizer_step -> bytes
    peak_phase: str
    settings: dict
    model: str
    trainable_params: int
    total_params: int
    paged_optimizer_states: int = 0
    cuda_context: int = 0
    allocator_headroom: int = 0
    notes: list = field(default_factory=list)
    shape: Optional[ModelShape] = field(default=None, repr=False)  # what was estimated (suggestions re-use it)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def required_bytes(self) -> int:
        """What a GPU must have: the peak plus CUDA context and allocator headroom."""
        return self.total_bytes + self.cuda_context + self.allocator_headroom

    def to_dict(self) -> dict:
        return {"model": self.model, "total_bytes": self.total_bytes, "breakdown": dict(self.breakdown),
                "phases": dict(self.phases), "peak_phase": self.peak_phase, "settings": dict(self.settings),
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "paged_optimizer_states": self.paged_optimizer_states, "cuda_context": self.cuda_context,
                "allocator_headroom": self.allocator_headroom, "required_bytes": self.required_bytes,
                "notes": list(self.notes)}


# ------------------------------------------------------------------------ parameters


def _targets(shape: ModelShape, spec: MethodSpec, target_modules: Any) -> list:
    """The linears ``spec`` adapts in each block: the same rule the engine applies to the real model."""
    if spec.trains != "adapters":
        return []
    return select_targets(spec, [n for n, _, _ in shape.linears()], target_modules)


def count_params(shape: ModelShape, method: str, *, lora_r: int = 16, target_modules: Any = "auto",
                 num_virtual_tokens: int = 16, trainable_layers: int = 2, head_outputs: int = 0) -> dict:
    """Parameter counts: ``total`` (base), ``trainable`` and ``added`` (new adapter parameters).

    ``head_outputs`` > 0: the model carries a sequence-classification head of that many
    outputs instead of its language-model head (reward models, classifiers); the head is
    new, so it always trains (adapter methods keep a trainable copy beside the original).

    Example::

        >>> count_params(resolve_model("llama-3.2-1b"), "lora", lora_r=16)["added"]
        11272192
    """
    if head_outputs:
        counts = count_params(replace(shape, tied=True), method, lora_r=lora_r, target_modules=target_modules,
                              num_virtual_tokens=num_virtual_tokens, trainable_layers=trainable_layers)
        head = shape.hidden * head_outputs
        spec = get_method_spec(method)
        total, trainable, added = counts["total"] + head, counts["trainable"], counts["added"]
        if spec.trains == "all":
            trainable = total
        elif spec.trains == "top_layers":  # the score head replaces the (embedding-tied) output layer
            trainable += head - shape.vocab * shape.hidden
        else:
            trainable += head
        if spec.adapter:  # peft's modules_to_save: the original head and its trainable copy
            total += head
            added += head
        return {"total": total, "trainable": trainable, "added": added}
    spec = get_method_spec(method)
    base = shape.total_params
    linears = {name: (fan_in, fan_out) for name, fan_in, fan_out in shape.linears()}
    added = 0
    if spec.trains == "all":
        trainable = base
    elif spec.trains == "adapters":
        targets = _targets(shape, spec, target_modules)
        if spec.peft_type == "IA3":  # one scale per output feature, or per input feature on the MLP's way out
            feedforward = set(spec.feedforward)
            per_layer = sum(linears[t][0] if t in feedforward else linears[t][1] for t in targets)
        else:  # LoRA: A (r x in) and B (out x r); DoRA adds a magnitude per output feature
            per_layer = sum(lora_r * (linears[t][0] + linears[t][1]) for t in targets)
            if spec.magnitude:
                per_layer += sum(linears[t][1] for t in targets)
        added = trainable = shape.layers * per_layer
    elif spec.trains == "virtual_tokens":
        if spec.adds_positions:  # prompt tuning: one embedding per virtual token
            added = trainable = num_virtual_tokens * shape.hidden
        else:  # prefix tuning: a key and a value per virtual token in every layer
            added = trainable = num_virtual_tokens * shape.layers * 2 * shape.kv_dim
    elif spec.trains == "biases":
        trainable = shape.bias_params
        if not trainable:
            raise ModelError(f"`method: {method}` trains bias terms, and {shape.name} has none "
                             "(Llama-style models are bias-free); use `method: lora` or a model with biases")
    else:  # top_layers: the top blocks, the final norm and the head (the embedding when tied)
        top = min(trainable_layers, shape.layers)
        trainable = top * (shape.linear_params_per_layer + shape.norm_params_per_layer) + shape.final_norm_params \
            + shape.vocab * shape.hidden
    return {"total": base + added, "trainable": trainable, "added": added}


# ------------------------------------------------------------------------ the estimate


def _check_positive(name: str, value: Any, low: int = 1, config_key: Optional[str] = None) -> int:
    """A whole number from ``low`` up to what a run's config accepts for ``config_key``
    (``NUMBER_RANGES``): the calculator never judges a run that training would refuse
    (``seq_len`` 10**10 was estimated at 300,706 TiB)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"`{name}: {value!r}` must be a whole number of at least {low}")
    if config_key is not None:
        from ftmagic.config import NUMBER_RANGES

        high = NUMBER_RANGES[config_key][1]
        if value > high:
            whose = f" (the most `{config_key}` a run accepts)" if config_key != name else ""
            raise ConfigError(f"`{name}: {value}` must be at most {high}{whose}")
    return value


def estimate_memory(model: Any = "tiny", *, method: str = "lora", precision: str = "auto", batch_size: int = 4,
                    seq_len: int = 512, gradient_checkpointing: bool = False, optimizer: str = "adamw",
                    lora_r: int = 16, target_modules: Any = "auto", packing: bool = False,
                    lora_dropout: float = 0.05, num_virtual_tokens: int = 16, trainable_layers: int = 2,
                    grad_accum: int = 1, bf16_supported: bool = True,
                    device: str = "cuda", loss: str = "auto", devices: int = 1,
                    strategy: str = "auto", objective: str = "sft", num_labels: int = 2) -> MemoryEstimate:
    """Estimate the peak GPU memory of one training step (analytic: no torch, milliseconds).

    ``model`` is a built-in name, a local directory, a cached hub id, a config dict or
    ``tiny``. ``precision="auto"`` means bf16 (fp16 when ``bf16_supported`` is False, as on
    a T4). With ``grad_accum`` > 1 the gradients stay alive through the next micro-batches'
    forward and backward. ``packing`` does not change the peak (rows are ``seq_len`` either way); it is
    accepted so a config's fields pass straight through. ``device="cpu"``
    models what differs on CPU (dropout masks), for comparing with CPU measurements.
    ``objective`` (``sft``, ``dpo``, ``orpo``, ``reward``, ``classify``; see
    :mod:`ftmagic.objectives`): preference objectives run two sequences of ``seq_len`` per
    record (``batch_size`` counts records), DPO adds its reference forward (and, for methods
    that change the base weights, a frozen copy of them), reward models and classifiers
    replace the language-model head by a head of 1 or ``num_labels`` outputs (no vocabulary
    logits at all).
    ``loss``: ``chunked`` is ftmagic's training step (the loss is computed in chunks of
    rows, never holding full logits), ``full`` is Hugging Face's ``model(..., labels=...)``
    (batch x seq x vocab fp32 logits); ``auto`` picks what the engine runs (``full`` for
    prompt learning, which keeps the model's own forward). Exact
    mode (a traced step) is :func:`ftmagic.estimate_memory` with ``mode="exact"``, which
    lives with the engine because it runs torch.

    ``devices`` > 1 estimates one of that many devices training the run together under
    ``strategy`` (``auto``, ``ddp``, ``fsdp``, ``deepspeed_zero2``, ``deepspeed_zero3``; see
    :mod:`ftmagic.memory.sharding`): ``batch_size`` stays the micro-batch of the whole run,
    split across the devices as the engine splits it, and the result is per device.

    Example::

        est = estimate_memory("llama-3.1-8b", method="qlora", batch_size=2, seq_len=2048,
                              gradient_checkpointing=True)
        print(f"{est.total_gib:.1f} GiB at {est.peak_phase}")
    """
    get_method_spec(method)
    if optimizer not in OPTIMIZERS:
        raise not_accepted("optimizer", optimizer, OPTIMIZERS)
    if precision not in PRECISIONS:
        raise not_accepted("precision", precision, PRECISIONS)
    _check_positive("batch_size", batch_size, config_key="batch_size")
    _check_positive("seq_len", seq_len, 8, config_key="max_seq_len")
    _check_positive("lora_r", lora_r, config_key="lora_r")
    _check_positive("grad_accum", grad_accum, config_key="grad_accum")
    if not 0 <= float(lora_dropout) < 1:
        raise ConfigError(f"`lora_dropout: {lora_dropout}` must be in [0, 1)")
    if device not in DROPOUT_MASK_BYTES:
        raise not_accepted("device", device, tuple(DROPOUT_MASK_BYTES), by="the memory estimate")
    if loss not in LOSSES:
        raise not_accepted("loss", loss, LOSSES)
    _check_positive("devices", devices, config_key="processes")
    if strategy not in STRATEGY_NAMES:
        raise not_accepted("strategy", strategy, STRATEGY_NAMES)
    resolved = resolve_strategy(strategy, method=method, device=device) if devices > 1 else None
    if devices > 1:
        check_batch_split(batch_size, devices)
    obj = get_objective_spec(objective)
    if not method_supports(get_method_spec(method), objective):
        raise ConfigError(f"`objective: {objective}` cannot be trained with `method: {method}`; use lora, qlora or full")
    if obj.head == "labels":
        _check_positive("num_labels", num_labels, 2)
    if device == "cuda":  # what training would refuse is not judged (a T4 has no bf16)
        check_gpu_precision(precision, bf16_supported)
    shape = resolve_model(model)
    precision = resolve_precision(precision, bf16_supported, device)
    if get_method_spec(method).quantized and precision == "fp32":
        raise ConfigError(f"`precision: fp32` does not apply to `method: {method}`; use bf16 or fp16")
    seq_len, cut = fit_to_context(shape, seq_len)  # training cuts examples there too
    settings = dict(method=method, precision=precision, batch_size=batch_size, seq_len=seq_len,
                    gradient_checkpointing=bool(gradient_checkpointing), optimizer=optimizer, lora_r=lora_r,
                    target_modules=target_modules, packing=bool(packing), lora_dropout=float(lora_dropout),
                    num_virtual_tokens=num_virtual_tokens, trainable_layers=trainable_layers, grad_accum=grad_accum,
                    device=device, loss=resolve_loss(loss, shape, method), devices=devices,
                    strategy=resolved or "auto", objective=objective, num_labels=num_labels)
    estimate = analytic_estimate(shape, settings)
    if cut:
        estimate.notes.append(cut)
    return estimate


def resolve_loss(loss: str, shape: ModelShape, method: str) -> str:
    """``auto`` -> what the engine runs: the chunked loss (soft-capped logits included), except for prompt learning."""
    if loss != "auto":
        return loss
    if "chunked" not in get_method_spec(method).losses:
        return "full"
    return "chunked"


def analytic_estimate(shape: ModelShape, s: dict) -> MemoryEstimate:
    """The estimate for resolved ``settings`` (as :func:`estimate_memory` builds them).

    The parts, each a function below: weights, optimizer states, saved activations, logits
    and loss; then the three phases of a step, whose largest is the peak.
    """
    spec, plan = get_method_spec(s["method"]), weight_plan(s["method"], s["precision"])
    obj = get_objective_spec(s.get("objective", "sft"))
    head_outputs = {"labels": s.get("num_labels", 2), "score": 1}.get(obj.head, 0)
    counts = count_params(shape, s["method"], lora_r=s["lora_r"], target_modules=s["target_modules"],
                          num_virtual_tokens=s["num_virtual_tokens"], trainable_layers=s["trainable_layers"],
                          head_outputs=head_outputs)
    trainable = counts["trainable"]
    body = replace(shape, tied=True) if obj.classifier_head else shape  # a classifier has no vocabulary head
    frozen, train_w, grads = _weight_bytes(body, spec, plan, trainable, total=counts["total"])
    if obj.reference and not spec.adapter:  # DPO's frozen copy of the starting weights
        frozen += int(shape.total_params * plan.base_bytes)
    states, transient, paged = _optimizer_bytes(shape, plan, s, trainable)
    devices = s.get("devices", 1)
    gathered = buffers = 0
    grad_share = 1.0
    rows_per_device = s["batch_size"]
    if devices > 1:
        # One of several devices: its share of the weights and states, its rows of every micro-batch.
        part = device_share(shape, plan, strategy=s["strategy"], devices=devices, frozen=frozen,
                            trainable_bytes=train_w, gradients=grads, states=states, trainable=trainable,
                            adapter=spec.adapter)
        grad_share = part.gradients / grads if grads else 1.0
        frozen, train_w, grads, states = part.frozen, part.trainable, part.gradients, part.optimizer_states
        transient = -(-transient // devices) if "optimizer_states" in get_strategy_spec(s["strategy"]).shards \
            else transient
        gathered, buffers = part.gathered, part.buffers
        rows_per_device = rows_per_process(s["batch_size"], devices)
    # Pairs are two sequences of seq_len each: everything that scales with tokens doubles.
    seq_s = dict(s, batch_size=rows_per_device * obj.sequences)
    acts = _activation_bytes(body, spec, plan, seq_s, trainable)
    if obj.classifier_head:  # only the last position of each sequence reaches the small head
        logits_fwd = logits_bwd = seq_s["batch_size"] * (head_outputs * 4 + shape.hidden * 4)
    else:
        logits_fwd, logits_bwd = _logit_bytes(shape, spec, plan, seq_s, acts)
    reference = _reference_forward_bytes(shape, plan, seq_s, acts) if obj.reference else 0
    phases, breakdown = _phases(body, spec, plan, seq_s, trainable=trainable, static=frozen + train_w + states,
                                grads=grads, transient=transient, acts=acts, logits_fwd=logits_fwd,
                                logits_bwd=logits_bwd, reference=reference, gathered=gathered, buffers=buffers,
                                grad_share=grad_share)
    breakdown.update(frozen_weights=int(frozen), trainable_weights=int(train_w), optimizer_states=int(states))
    peak_phase = max(phases, key=phases.get)
    notes = []
    if paged:
        notes.append("paged optimizer states live in managed host memory and are not counted on the device")
    if s["method"] not in ("full", "lora", "qlora"):  # the methods the activation model was calibrated on
        notes.append(f"activations of `{s['method']}` are approximated from the LoRA/full fine-tuning calibration")
    return MemoryEstimate(total_bytes=int(sum(breakdown.values())), breakdown=breakdown, phases=phases,
                          peak_phase=peak_phase, settings=s, model=shape.name, trainable_params=int(trainable),
                          total_params=int(counts["total"]), paged_optimizer_states=int(paged), notes=notes,
                          shape=shape)


def _weight_bytes(shape: ModelShape, spec: MethodSpec, plan, trainable: int, total: Optional[int] = None) -> tuple:
    """(frozen weights, trainable weights, their gradients) in bytes.

    ``total`` counts a new head's parameters too (reward models and classifiers).
    """
    base_trainable = 0 if spec.adapter else trainable
    linear_params = shape.layers * shape.linear_weight_params_per_layer
    frozen_base = (shape.total_params if total is None or spec.adapter else total) - base_trainable
    if plan.quantized:
        frozen = int(linear_params * NF4_BYTES_PER_PARAM) + (frozen_base - linear_params) * plan.base_bytes
    else:
        frozen = frozen_base * plan.base_bytes
    return frozen, trainable * plan.trainable_bytes, trainable * plan.trainable_bytes


def _optimizer_bytes(shape: ModelShape, plan, s: dict, trainable: int) -> tuple:
    """(optimizer states on the device, the step's transient, paged states in host memory) in bytes."""
    state_bytes = plan.trainable_bytes
    n_tensors = _trainable_tensors(shape, s["method"], s)
    if s["optimizer"] == "adamw":
        states = 2 * trainable * state_bytes + 4 * n_tensors
        # ftmagic's engine steps with the fused AdamW kernel on CUDA (no extra buffer); torch's
        # multi-tensor (foreach) AdamW, used on CPU, allocates one more state-sized sqrt(v) buffer.
        transient = trainable * state_bytes if s.get("device", "cuda") == "cpu" else 0
        return states, transient, 0
    if s["optimizer"] in ("adamw_8bit", "paged_adamw_8bit"):
        states = int(2 * trainable * (1 + 4 / 256)) + 4 * n_tensors  # uint8 states + fp32 absmax per 256 block
        # one fused kernel per tensor: no transient
        return (0, 0, states) if s["optimizer"] == "paged_adamw_8bit" else (states, 0, 0)
    return 0, 0, 0


def _activation_bytes(shape: ModelShape, spec: MethodSpec, plan, s: dict, trainable: int) -> dict:
    """What forward saves for backward: per block (``per_layer``, per token), over all blocks
    (``layers_held``), with what lies outside the blocks (``act_held``); plus the sizes the
    logits and the phases need."""
    batch, seq = s["batch_size"], s["seq_len"]
    seq_eff = seq + (s["num_virtual_tokens"] if spec.adds_positions else 0)
    tokens = batch * seq_eff
    if spec.adapter:
        layers_total, per_layer = _adapter_layers(shape, s["method"], plan, s)
    elif spec.trains == "biases":
        # Frozen linear weights with trainable biases: every block passes gradients (like prompt
        # learning); a bias's gradient needs no saved input.
        layers_total, per_layer = _adapter_layers(shape, "prompt_tuning", plan, s)
    else:
        per_layer = _layer_bytes_per_token(shape, s["method"], plan, s)
        # `freeze`: blocks below the trainable ones neither train nor pass gradients (unless the
        # trained head is tied to the input embeddings, which then need gradients through all)
        trained = shape.layers
        if spec.trains == "top_layers" and not shape.tied:
            trained = min(s["trainable_layers"], shape.layers)
        layers_total = trained * per_layer
    c_res = 4 if plan.quantized else plan.compute_bytes if plan.autocast is None else plan.base_bytes
    c_res = 4 if (plan.autocast and not spec.adapter) else c_res  # fp32 master weights keep fp32 residuals
    if spec.adapter:
        outside = 4 * shape.hidden + 8  # the final norm's fp32 input
    else:  # the final norm's fp32 input, normed value and output (the head's input, for its weight gradient)
        outside = (4 + 2 * c_res) * shape.hidden + 8
    gc = s["gradient_checkpointing"]
    # Eager attention (Gemma 2's soft-capped scores) and the CPU's math kernel (attention
    # dropout) materialise batch x heads x seq x seq scores per block.
    eager = batch * shape.heads * seq_eff * seq_eff * _score_bytes(shape, plan, spec.adapter, s)
    layers_held = tokens * (shape.layers * c_res * shape.hidden if gc else layers_total) + (0 if gc else shape.layers * eager)
    act_held = layers_held + tokens * outside
    if _masked_attention(shape, s):  # the explicit mask, one per forward, in the model's dtype
        act_held += batch * seq_eff * seq_eff * acts_dtype_bytes(plan)
    if shape.residual_dropout > 0:  # the embeddings' dropout mask
        act_held += tokens * shape.hidden * (plan.compute_bytes if s.get("device", "cuda") == "cpu" else 1)
    if plan.autocast is not None:  # autocast's half-precision copies of the fp32 trainable weights, saved for backward
        act_held += trainable * plan.compute_bytes
    if plan.quantized and s.get("loss", "full") == "full":  # the fp32 head (upcast by peft), cast and saved
        act_held += shape.vocab * shape.hidden * plan.compute_bytes
    return dict(tokens=tokens, per_layer=per_layer, layers_held=layers_held, act_held=act_held, eager=eager,
                c_res=c_res, c_logit=plan.compute_bytes if plan.autocast else plan.base_bytes)


def acts_dtype_bytes(plan) -> int:
    """Bytes per element of tensors in the model's own dtype (its masks): the compute dtype under autocast."""
    return plan.compute_bytes if plan.autocast else plan.base_bytes


def _logit_bytes(shape: ModelShape, spec: MethodSpec, plan, s: dict, acts: dict) -> tuple:
    """(at the end of forward, at the start of backward) for the logits and loss."""
    tokens, c_res, c_logit, v = acts["tokens"], acts["c_res"], acts["c_logit"], shape.vocab
    softcap = c_logit if shape.final_logit_softcap else 0  # the tanh of soft-capping saves its output
    if s.get("loss", "full") == "full":
        held = (4 + softcap) * tokens * v  # log-softmax output (fp32), kept for backward
        return held + (c_logit + (4 if c_logit != 4 else 0)) * tokens * v, held + 8 * tokens * v
    # Chunked loss: gradients w.r.t. the hidden states (and an fp32 head gradient when the
    # head trains) are computed during forward and kept; one chunk of logits exists at a time.
    head_w = 4 if plan.quantized else (plan.trainable_bytes if not spec.adapter else plan.base_bytes)
    head_trains = spec.trains in ("all", "top_layers")
    rows = min(tokens, max(16, LOSS_CHUNK_ELEMENTS // v))
    held = tokens * shape.hidden * c_res + (4 * v * shape.hidden if head_trains else 0)
    # one chunk: its fp32 logits and their log-softmax (the half-precision matmul output is
    # freed by then); from the second chunk on, the previous chunk's gradient is still
    # referenced while the next one is computed. Plus the copy of the labelled rows.
    multi = tokens > rows
    chunk = rows * v * (12 if multi else 8)
    if shape.final_logit_softcap:  # cap * tanh(z / cap): the fp32 quotient and the capped logits, kept for the cap's gradient
        chunk += rows * v * 8
    if plan.autocast and head_w == 4:  # the fp32 head, cast to the compute dtype for each chunk's matmul
        chunk = max(chunk, v * shape.hidden * plan.compute_bytes + rows * v * (c_logit + (4 if multi else 0)))
    chunk += tokens * shape.hidden * c_res
    backward = held + tokens * shape.hidden * c_res + (v * shape.hidden * head_w if head_trains else 0)
    return held + chunk, backward


def _reference_forward_bytes(shape: ModelShape, plan, s: dict, acts: dict) -> int:
    """DPO's reference forward, run without gradients before the policy's: one block's temporaries
    and one chunk of log-probabilities at a time, beside the weights and optimizer states only."""
    tokens = acts["tokens"]
    mlp_bytes = 4 if plan.quantized else plan.compute_bytes
    block = tokens * (2 * mlp_bytes * shape.intermediate + 3 * acts["c_res"] * shape.hidden)
    rows = min(tokens, max(16, LOSS_CHUNK_ELEMENTS // shape.vocab))
    return block + rows * shape.vocab * 8


def _phases(shape: ModelShape, spec: MethodSpec, plan, s: dict, *, trainable: int, static: int, grads: int,
            transient: int, acts: dict, logits_fwd: int, logits_bwd: int, reference: int = 0,
            gathered: int = 0, buffers: int = 0, grad_share: float = 1.0) -> tuple:
    """Bytes at the end of forward, the worst moment of backward, and the optimizer step; and the
    breakdown (gradients, activations, logits, transient) at the largest of them.

    On several devices, ``gathered`` weights exist in forward and backward, the
    communication ``buffers`` from backward on (the gradient exchange) through the step,
    and each device keeps ``grad_share`` of the gradients."""
    tokens, per_layer, eager = acts["tokens"], acts["per_layer"], acts["eager"]
    act_held, layers_held = acts["act_held"], acts["layers_held"]
    accumulated = grads if s.get("grad_accum", 1) > 1 else 0  # earlier micro-batches' gradients
    fwd = static + accumulated + max(act_held + logits_fwd, reference)
    bwd_loss = static + accumulated + act_held + logits_bwd
    # Deeper in backward: the gradients of every block above the current one exist, while
    # the current block's activations (recomputed, with checkpointing) and its temporaries are held.
    layer_grads = trainable / max(shape.layers, 1)
    embed_grads = shape.embedding_params if (spec.trains == "all" and not shape.tied) else 0
    grads_deep = max(0, trainable - embed_grads - layer_grads) * plan.trainable_bytes * grad_share
    mlp_bytes = 4 if plan.quantized else plan.compute_bytes  # QLoRA's MLP runs on fp32 outputs
    temp = tokens * (2 * mlp_bytes * shape.intermediate + 4 * shape.hidden)
    if s["gradient_checkpointing"]:
        deep_grads, deep_acts = grads_deep, act_held + tokens * per_layer + eager + temp
    else:
        # Without checkpointing, a block's activations are freed as its gradients appear: the
        # worst moment is either the start (every activation, the head's gradient) or the end
        # (every gradient, one block's activations).
        head_grads = (shape.vocab * shape.hidden * plan.trainable_bytes * grad_share
                      if spec.trains in ("all", "top_layers") else 0)
        extra = act_held - layers_held
        if layers_held + head_grads >= grads_deep + tokens * per_layer + eager:
            deep_grads, deep_acts = head_grads, extra + temp + layers_held
        else:
            deep_grads, deep_acts = grads_deep, extra + temp + tokens * per_layer + eager
    if accumulated:
        deep_grads = grads  # every gradient already exists from the earlier micro-batches
    bwd_deep = static + deep_grads + deep_acts
    fwd += gathered
    bwd_loss += gathered + buffers
    bwd_deep += gathered + buffers
    phases = {"forward": int(fwd), "backward": int(max(bwd_loss, bwd_deep)),
              "optimizer_step": int(static + grads + transient + buffers)}
    peak_phase = max(phases, key=phases.get)
    breakdown = dict.fromkeys(DEVICE_KEYS, 0)
    breakdown["communication_buffers"] = int(gathered if peak_phase == "forward" else buffers
                                             if peak_phase == "optimizer_step" else gathered + buffers)
    if peak_phase == "forward":
        if reference > act_held + logits_fwd:
            breakdown.update(gradients=int(accumulated), logits=int(reference))
        else:
            breakdown.update(gradients=int(accumulated), activations=int(act_held), logits=int(logits_fwd))
    elif peak_phase == "backward":
        if bwd_loss >= bwd_deep:
            breakdown.update(gradients=int(accumulated), activations=int(act_held), logits=int(logits_bwd))
        else:
            breakdown.update(gradients=int(deep_grads), activations=int(deep_acts))
    else:
        breakdown.update(gradients=int(grads), optimizer_step_transient=int(transient))
    return phases, breakdown


def _trainable_tensors(shape: ModelShape, method: str, s: dict) -> int:
    """How many trainable tensors (each AdamW state has a 4-byte step counter)."""
    spec = get_method_spec(method)
    if spec.peft_type == "LORA":  # A and B per target, and DoRA's magnitude
        return (3 if spec.magnitude else 2) * shape.layers * len(_targets(shape, spec, s["target_modules"]))
    if spec.trains == "all":
        return shape.param_tensors
    return shape.layers * 2


def _layer_bytes_per_token(shape: ModelShape, method: str, plan, s: dict) -> float:
    """Bytes one block of full-like fine-tuning saves for backward per token (no checkpointing)."""
    h, q, kv, i, heads = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate, shape.heads
    extra_norms = (shape.norms_per_layer - 2) * (4 + 2 * plan.compute_bytes) * h
    c = plan.compute_bytes
    # two RMSNorms (fp32 input, normed, output), rotated q/k and v, SwiGLU's four i-wide tensors
    per = 2 * (4 * h + 2 * c * h) + 2 * c * (q + kv) + 4 * c * i + 6 * heads
    if plan.autocast:  # fp32 residual stream with fp16 compute: casts of the norms' outputs are saved too
        per += 10 * h
    return per + extra_norms + _family_block_bytes(shape, plan, s, adapter=False)


# i-wide tensors a plain (ungated) MLP's activation saves: GPT-2's `gelu_new` is five
# elementwise ops (x, x**3, tanh, ...), torch's erf GELU saves its input only.
PLAIN_MLP_SAVED = {"gelu_new": 4, "gelu": 1}


def _masked_attention(shape: ModelShape, s: dict) -> bool:
    """Whether transformers builds an explicit attention mask: a sliding window shorter than the rows
    (SDPA then also receives key and value heads expanded to the query heads)."""
    return bool(shape.sliding_window) and s["seq_len"] > shape.sliding_window and shape.model_type not in EAGER_ATTENTION


def _math_attention(shape: ModelShape, s: dict) -> bool:
    """Attention dropout on the CPU runs SDPA's math kernel, which saves fp32 scores (a GPU's kernels do not)."""
    return shape.attention_dropout > 0 and s.get("device", "cuda") == "cpu" and shape.model_type not in EAGER_ATTENTION


def _family_block_bytes(shape: ModelShape, plan, s: dict, *, adapter: bool) -> float:
    """What a block of this family saves per token beyond a Llama block of the same sizes (0 for Llama).

    Each term is read off the tensors the family's modelling code saves for backward (traced
    in ``tests/test_architectures.py``): q/k norms, Gemma's fp32 norms, LayerNorm, ungated
    MLPs, dropout masks, explicit masks and the math attention kernel. With a frozen base
    (``adapter``) the norms save only their fp32 input.
    """
    h, q, kv, i, heads, c = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate, shape.heads, plan.compute_bytes
    extra = 0.0
    if shape.qk_norm:  # each head's fp32 input and its inverse RMS; with trained weights the normed value too
        normed = 0 if adapter else (4 if shape.norm_kind == "rms_fp32" else c)
        extra += (4 + normed) * (q + kv) + 4 * (heads + shape.kv_heads)
    if not adapter:
        if shape.norm_kind == "rms_fp32":  # Gemma: the normed value is fp32, post-norms keep no consumer copy
            extra += 2 * (4 - c) * h + (shape.norms_per_layer - 2) * ((4 - 2 * c) * h + 4)
        elif shape.norm_kind == "layer":  # LayerNorm in the compute dtype: input, mean and inverse std
            extra += shape.norms_per_layer * ((c - 4) * h - c * h + 2 * c)
        if not shape.gated_mlp:
            extra += (PLAIN_MLP_SAVED.get(shape.mlp_act, 1) + 1 - 4) * c * i
    else:
        if shape.norms_per_layer > 2:  # the extra norms of a frozen block save their fp32 input only
            extra += (shape.norms_per_layer - 2) * (4 * h + 4 - (4 + 2 * c) * h)
        if shape.norm_kind == "layer":
            extra += 2 * ((c - 4) * h + 2 * c - 4)
    if shape.residual_dropout > 0:  # each residual branch's dropout mask (input dtype on CPU, bool on CUDA)
        extra += 2 * h * (c if s.get("device", "cuda") == "cpu" else 1)
    if _masked_attention(shape, s):
        extra += 2 * c * (q - kv)
    if _math_attention(shape, s):  # fp32 q, k, v instead of the fused kernel's saved tensors
        extra += 12 * q + c * q - 2 * c * (q + kv) - 4 * heads
    if shape.model_type in EAGER_ATTENTION:  # eager attention expands key and value heads
        extra += 2 * c * (q - kv)
    return extra


def _score_bytes(shape: ModelShape, plan, adapter: bool, s: dict) -> float:
    """Bytes a block saves per attention score (batch x heads x seq x seq) where scores are materialised."""
    c = plan.compute_bytes
    if shape.model_type in EAGER_ATTENTION:  # fp32 softmax and its cast; the soft-capped scores (tanh)
        return 4 + c + (c if shape.attn_softcap else 0)
    if _math_attention(shape, s):  # fp32 scores, softmax and dropout output
        return 12
    return 0


def adapter_features(shape: ModelShape, targets, rank: int) -> list:
    """Per block, what a frozen base with adapters on ``targets`` must save, as counts per token.

    Gradients flow only from the first adapter on: a block saves a tensor only when
    something at or before it trains. Each entry: dict(norm_in, attn, mlp, shared, per, r, const)
    holding the element counts that _ADAPTER_PARAMS turns into bytes.
    """
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    width = {"qkv": h, "o": q, "mlp_in": h, "down": i}
    count = {g: 0 for g in width}
    for t in targets:
        count[LINEAR_GROUP.get(t, "qkv")] += 1
    gate_adapted = any(t in ("gate_proj", "gate_up_proj") for t in targets)
    up_adapted = any(t in ("up_proj", "gate_up_proj") for t in targets)
    layers = []
    flow = False  # embeddings are frozen: nothing before the first adapter needs gradients
    for _ in range(shape.layers):
        f = dict(norm_in=0, attn=0, mlp=0, shared=0, per=0, r=rank * len(targets), const=1)

        def adapters(group: str) -> None:
            if count[group]:
                f["shared"] += width[group]
                f["per"] += width[group] * count[group]

        if flow:
            f["norm_in"] += h
        adapters("qkv")
        attn_rg = flow or count["qkv"] > 0
        if attn_rg:
            f["attn"] += 2 * q + 2 * kv
        adapters("o")
        h1_rg = flow or attn_rg or count["o"] > 0
        if h1_rg:
            f["norm_in"] += h
        adapters("mlp_in")
        gate_rg, up_rg = h1_rg or gate_adapted, h1_rg or up_adapted
        if shape.gated_mlp:
            f["mlp"] += i * (2 * gate_rg + up_rg)
        else:  # one linear in: its activation saves what it needs once the linear's output requires grad
            up_rg = gate_rg = h1_rg or count["mlp_in"] > 0
            f["mlp"] += i * PLAIN_MLP_SAVED.get(shape.mlp_act, 1) * up_rg
        adapters("down")
        flow = h1_rg or gate_rg or up_rg or count["down"] > 0
        layers.append(f)
    return layers


@lru_cache(maxsize=256)
def _cached_features(shape: ModelShape, targets: tuple, rank: int) -> list:
    return adapter_features(shape, list(targets), rank)


def _adapter_layers(shape: ModelShape, method: str, plan, s: dict) -> tuple:
    """(bytes per token over all blocks, the largest single block) for adapter methods."""
    spec = get_method_spec(method)
    targets = _targets(shape, spec, s["target_modules"])
    lora = spec.peft_type == "LORA"
    rank = s["lora_r"] if lora else 0
    dropout = s["lora_dropout"] > 0 and lora
    params = dict(_ADAPTER_PARAMS[(plan.compute_bytes, plan.quantized, dropout)])
    if dropout:
        params["per"] += DROPOUT_MASK_BYTES[s.get("device", "cuda")]
    if spec.prompt_learning:
        feats = adapter_features(shape, ["q_proj"], 0)  # the virtual tokens make every block need gradients
        for f in feats:
            f.update(shared=0, per=0)
        feats[0]["norm_in"] = 2 * shape.hidden
    else:
        feats = _cached_features(shape, tuple(targets), rank)
    extra_norms = (shape.norms_per_layer - 2) * (4 + 2 * plan.compute_bytes) * shape.hidden
    linears = {name: fan_out for name, _, fan_out in shape.linears()}
    dout = sum(linears[t] for t in targets)
    blocks = []
    family = _family_block_bytes(shape, plan, s, adapter=True)
    for f in feats:
        b = sum(params[k] * f[k] for k in f) + extra_norms + family
        if spec.magnitude:
            b += 6 * dout  # base output, LoRA output and magnitude scale, saved per adapted linear
        if spec.peft_type == "IA3":
            b += plan.compute_bytes * dout
        blocks.append(b)
    return sum(blocks), max(blocks) if blocks else 0

"""Exact mode of the memory calculator: trace one real training step and read its peak memory.

The model is built from its config (no weights are read), a batch of the requested
shape goes forward and backward, and the optimizer steps, all under
:class:`torch.distributed._tools.mem_tracker.MemTracker`, which sees every tensor
storage the step creates and frees. With ``fake=True`` (exact mode) the step runs
under :class:`torch._subclasses.fake_tensor.FakeTensorMode`: tensors have shapes and
dtypes but no data, so a 7B model's step is simulated on a laptop CPU without
allocating it. With ``fake=False`` the same step runs on real CPU tensors: that is
the *measured* peak the benchmark and the tests compare against.

The step runs on the CPU either way, but a GPU runs some ops through kernels that keep
less for backward; ``device="cuda"`` (what exact mode passes for a GPU estimate) swaps
those in for the trace (:func:`_device_kernels`), so the traced peak is the GPU's.

The method is prepared by the engine's own registry (:mod:`ftmagic.engine.methods`), so
the traced step trains exactly what a run trains. :func:`exact_estimate` wraps the trace
as a :class:`~ftmagic.memory.MemoryEstimate`; the analytic model it falls back to lives in
the core (:mod:`ftmagic.memory`), which never imports this module.

Example::

    from ftmagic.engine.trace import simulate_memory
    sim = simulate_memory("smollm2-135m", method="lora", batch_size=2, seq_len=512)
    print(sim.peak_bytes, sim.phases)
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

from ftmagic.constants import NF4_BYTES_PER_PARAM
from ftmagic.errors import ConfigError, FtmagicError
from ftmagic.memory.architectures import ModelShape, resolve_model
from ftmagic.memory.estimate import DEVICE_KEYS, MemoryEstimate, analytic_estimate, resolve_loss
from ftmagic.memory.policy import weight_plan
from ftmagic.methods import get_method_spec
from ftmagic.objectives import get_objective_spec

# Methods whose kernels a fake tensor cannot run (bitsandbytes), or whose state lives
# outside what the tracer sees; these fall back to the analytic estimate.
UNTRACEABLE_METHODS: dict = {}
# QLoRA is traced through a stand-in: each 4-bit linear becomes a frozen linear in the
# compute dtype. bitsandbytes' MatMul4Bit saves only the packed weight for backward, as a
# frozen linear saves only its weight, so activations are the same; weights are then
# counted at their NF4 size.
UNTRACEABLE_OPTIMIZERS = {
    "adamw_8bit": "bitsandbytes' 8-bit optimizer kernels cannot run on fake tensors",
    "paged_adamw_8bit": "bitsandbytes' paged optimizer kernels cannot run on fake tensors",
}


# Architectures whose attention (logit soft-capping) runs only in the eager kernel here.
EAGER_ONLY = ("gemma2",)
# Devices whose kernels a traced step can follow (see _device_kernels).
DEVICE_KERNELS = ("cpu", "cuda")


@dataclass
class TraceResult:
    """What one traced training step used.

    ``phases`` holds the peak of each phase (``forward``, ``backward``, ``optimizer_step``);
    ``breakdown`` splits the overall peak into the estimate's keys.
    """

    peak_bytes: int
    phases: dict
    breakdown: dict
    trainable_params: int
    total_params: int
    fake: bool
    seconds: float
    held_after_forward: int = 0  # bytes alive once the loss is computed (weights + saved activations)
    notes: list = field(default_factory=list)


def untraceable_reason(method: str, optimizer: str) -> Optional[str]:
    """Why exact mode cannot trace this setup, or None if it can."""
    return UNTRACEABLE_METHODS.get(method) or UNTRACEABLE_OPTIMIZERS.get(optimizer)


def build_model(shape: ModelShape, *, dtype, attn_implementation: str = "sdpa", head_outputs: int = 0):
    """A randomly initialised Hugging Face causal LM of this shape (weights never read).

    ``head_outputs`` > 0 builds it with a sequence-classification head of that many outputs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    values = shape.hf_config()
    model_type = values.pop("model_type")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        # A config's default token ids (Phi-3 pads with id 32000) may lie outside a smaller vocabulary.
        if key not in values:
            values[key] = None
    try:
        config = AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise ConfigError(f"exact mode cannot build `model_type: {model_type}` ({exc})") from None
    config.use_cache = False
    if model_type in EAGER_ONLY:
        attn_implementation = "eager"
    if head_outputs:
        config.num_labels = head_outputs
        config.pad_token_id = 0
        return AutoModelForSequenceClassification.from_config(config, dtype=dtype,
                                                               attn_implementation=attn_implementation)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model


def prepare_method(model, *, method: str, lora_r: int, lora_alpha: int, lora_dropout: float, target_modules: Any,
                   num_virtual_tokens: int, trainable_layers: int, objective: str = "sft"):
    """Apply ``method`` with the engine's own preparer; return the model to train.

    QLoRA's base is already a 4-bit stand-in here (frozen linears in the compute dtype), so it
    gets the LoRA preparer: peft's k-bit preparation would upcast the stand-in itself.
    """
    from types import SimpleNamespace

    from ftmagic.engine.methods import get_method

    settings = SimpleNamespace(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                               target_modules=target_modules, num_virtual_tokens=num_virtual_tokens,
                               trainable_layers=trainable_layers, objective=objective)
    spec = get_method_spec(method)
    if spec.quantized:
        for p in model.parameters():
            p.requires_grad_(False)
        return get_method("lora").prepare(model, settings)
    return get_method(method).prepare(model, settings)


def trace_step(model: Any = "smollm2-135m", *, method: str = "lora", precision: str = "bf16", batch_size: int = 1,
               seq_len: int = 512, gradient_checkpointing: bool = False, optimizer: str = "adamw", lora_r: int = 16,
               lora_alpha: int = 32, lora_dropout: float = 0.05, target_modules: Any = "auto",
               num_virtual_tokens: int = 16, trainable_layers: int = 2, fake: bool = True,
               attn_implementation: str = "sdpa", seed: int = 0, loss: str = "auto",
               optimizer_impl: str = "foreach", objective: str = "sft", num_labels: int = 2,
               device: str = "cpu") -> TraceResult:
    """Run (``fake=False``) or simulate (``fake=True``) one training step and track its memory.

    ``optimizer_impl`` is ``foreach`` (torch's multi-tensor AdamW, what the engine uses on
    CPU: one extra state-sized buffer during the step) or ``fused`` (the engine on CUDA).
    ``device`` is whose kernels the step's memory follows: ``cpu`` (torch's CPU kernels, what a
    measured CPU step runs) or ``cuda`` (dropout and attention dropout as CUDA runs them; see
    :func:`_device_kernels`).
    ``objective`` traces that objective's step as the engine runs it: pairs are two sequences
    per record, DPO adds its reference forward without gradients (the adapter switched off,
    or a frozen copy), reward models and classifiers read a small head at the last position.

    Example::

        trace_step("smollm2-135m", method="full", precision="bf16", batch_size=1, seq_len=256)
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    reason = untraceable_reason(method, optimizer)
    if reason:
        raise ConfigError(f"exact mode cannot trace `method: {method}`, `optimizer: {optimizer}`: {reason}")
    if device not in DEVICE_KERNELS:
        raise ConfigError(f"exact mode traces the kernels of `device: cpu` or `cuda`, not `{device}`")
    shape = resolve_model(model)
    plan = weight_plan(method, precision)
    obj = get_objective_spec(objective)
    head_outputs = (num_labels if obj.head == "labels" else 1) if obj.classifier_head else 0
    if obj.data == "preference" and not obj.classifier_head and resolve_loss(loss, shape, method) != "chunked":
        raise ConfigError(f"exact mode traces `objective: {objective}` with the engine's chunked log-probabilities only")
    dtypes = {2: torch.bfloat16 if precision == "bf16" else torch.float16, 4: torch.float32}
    start = time.perf_counter()
    torch.manual_seed(seed)
    # Fake mode: build on the meta device (no storage), then turn every parameter and
    # buffer into a CPU fake tensor. Building directly under FakeTensorMode breaks peft,
    # whose adapter `.to()` calls cannot swap fake parameters.
    with torch.device("meta") if fake else nullcontext():
        net = build_model(shape, dtype=dtypes[plan.base_bytes], attn_implementation=attn_implementation,
                          head_outputs=head_outputs)
        reference = None
        if obj.reference and not get_method_spec(method).adapter:
            import copy

            reference = copy.deepcopy(net).eval().requires_grad_(False)
        quantized, quant_states = 0, []
        if plan.quantized and not fake and _bnb_available():
            quant_states = _quantize_bnb(net, dtypes[plan.compute_bytes])  # real NF4 weights, CPU kernels
        elif plan.quantized:
            quantized = _quantize_stand_in(net, dtypes[plan.compute_bytes])
        net = prepare_method(net, method=method, lora_r=lora_r, lora_alpha=lora_alpha,
                             lora_dropout=lora_dropout, target_modules=target_modules,
                             num_virtual_tokens=num_virtual_tokens, trainable_layers=trainable_layers,
                             objective=objective)
    if gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    if plan.trainable_bytes == 4:
        for p in params:  # peft keeps adapters in fp32; full fp16 keeps fp32 master weights
            if p.dtype != torch.float32:
                p.data = p.data.float()
    fake_mode = None
    if fake:
        fake_mode = FakeTensorMode()
        _fakify(net, fake_mode)
        if reference is not None:
            _fakify(reference, fake_mode)
        params = [p for p in net.parameters() if p.requires_grad]
    with fake_mode if fake_mode is not None else nullcontext(), _one_sequence_per_row(fake), \
            _device_kernels(device):
        if optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=1e-4)
        else:
            impl = {"fused": True} if optimizer_impl == "fused" else {"foreach": True}
            opt = torch.optim.AdamW(params, lr=1e-4, **impl)
        ids = torch.randint(0, shape.vocab, (batch_size * obj.sequences, seq_len))
        labels = ids.clone()
        total = sum(p.numel() for p in net.parameters())
        trainable = sum(p.numel() for p in params)
        autocast = None
        if plan.autocast:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16 if plan.autocast == "bf16" else torch.float16)

        loss_kind = resolve_loss(loss, shape, method)
        chunked = _chunked_loss() if loss_kind == "chunked" else None
        objective_step = _objective_step(obj, net, reference, ids, num_labels)

        def step():
            with autocast if autocast is not None else nullcontext():
                if objective_step is not None:
                    return objective_step()
                if chunked is None:  # Hugging Face's loss: full batch x seq x vocab logits
                    return net(input_ids=ids, labels=labels).loss
                # ftmagic's engine: decoder to hidden states, then the chunked loss
                lm = net.get_base_model() if hasattr(net, "get_base_model") else net
                hidden = getattr(lm, lm.base_model_prefix)(input_ids=ids, use_cache=False).last_hidden_state
                return chunked(hidden, lm.get_output_embeddings(), labels,
                               getattr(lm.config, "final_logit_softcapping", None))

        # A first step outside the tracker creates the optimizer states: what is measured is
        # the steady state, where those states are alive through forward and backward.
        step().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tracker = _tracker_class()()
        extra = ([reference] if reference is not None else []) + \
            (objective_step.stages if objective_step is not None else [])
        tracker.track_external(net, opt, ids, labels, *quant_states, *extra)
        phases = {}
        with tracker:
            loss = step()
            phases["forward"] = _take_peak(tracker)
            held = _flat(tracker.get_tracker_snapshot("current")).get("Total", 0)
            loss.backward()
            del loss
            phases["backward"] = _take_peak(tracker)
            opt.step()
            phases["optimizer_step"] = _take_peak(tracker)
            states = _flat(tracker.get_tracker_snapshot("current")).get("Optstate", 0)
            opt.zero_grad(set_to_none=True)
    frozen = sum(p.numel() * p.element_size() for p in net.parameters() if not p.requires_grad)
    if reference is not None:
        frozen += sum(p.numel() * p.element_size() for p in reference.parameters())
    frozen += sum(t.numel() * t.element_size() for t in quant_states)
    if quantized:
        # The stand-in held the 4-bit linears in the compute dtype; count them at NF4 size.
        saved = quantized * plan.compute_bytes - int(quantized * NF4_BYTES_PER_PARAM)
        frozen -= saved
        phases = {name: (peak - saved, snap) for name, (peak, snap) in phases.items()}
        held -= saved
    peaks = {name: peak for name, (peak, _) in phases.items()}
    worst = max(phases, key=lambda n: phases[n][0])
    snap = phases[worst][1]
    train_w = sum(p.numel() * p.element_size() for p in params)
    breakdown = {
        "frozen_weights": frozen,
        "trainable_weights": train_w,
        "gradients": snap.get("Gradient", 0),
        "optimizer_states": min(states, snap.get("Optstate", 0)),
        "optimizer_step_transient": max(0, snap.get("Optstate", 0) - states),
    }
    # The tracker cannot tell logits from other activations; buffers (rotary tables) count here too.
    breakdown["activations"] = phases[worst][0] - sum(breakdown.values())
    return TraceResult(peak_bytes=max(peaks.values()), phases=peaks, breakdown=breakdown,
                       trainable_params=trainable, total_params=total, fake=fake, held_after_forward=held,
                       seconds=time.perf_counter() - start)


class _Stage:
    """A named stage of a step (DPO's reference forward): the memory tracker sees the model's modules
    called a second time in one step as part of this stage, not as a second training iteration."""

    def __init__(self):
        import torch

        class Stage(torch.nn.Module):
            def forward(self, fn):
                return fn()

        self.module = Stage()


def _objective_step(obj, net, reference, ids, num_labels: int):
    """The loss of one step of a non-SFT objective as the engine computes it (None for SFT).

    The returned function has ``stages``, modules the tracker must know (:class:`_Stage`).
    """
    if obj.name == "sft":
        return None
    import torch
    import torch.nn.functional as F

    stage, policy_stage = _Stage().module, _Stage().module

    from ftmagic.engine.logprobs import token_logprobs

    n = ids.shape[0]

    def decoder_of(model):
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        return lm, getattr(lm, lm.base_model_prefix)

    def sums(model):
        lm, decoder = decoder_of(model)
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        head = lm.get_output_embeddings()
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        values = token_logprobs(rows, head.weight, ids[:, 1:].reshape(-1), bias=head.bias)
        return values.view(n, -1).sum(1)

    def step():
        if obj.classifier_head:
            lm, decoder = decoder_of(net)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            logits = lm.score(hidden[:, -1]).float()
            if obj.head == "score":
                chosen, rejected = logits[:, 0].chunk(2)
                return -F.logsigmoid(chosen - rejected).mean()
            return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
        if obj.name == "orpo":
            chosen, rejected = sums(net).float().chunk(2)
            return -chosen.sum() / ids.numel() - F.logsigmoid(chosen - rejected).mean()
        with torch.no_grad():  # the reference first, as the engine runs it
            if reference is not None:
                ref = sums(reference).float()
            else:
                with net.disable_adapter():
                    ref = stage(lambda: sums(net)).float()
        chosen, rejected = policy_stage(lambda: sums(net)).float().chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        return -F.logsigmoid(0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()

    step.stages = [stage, policy_stage]
    return step


def _chunked_loss():
    """The engine's chunked loss for a batch whose every position carries a label.

    ``linear_cross_entropy`` drops unlabelled positions with a boolean mask, whose size a
    fake tensor cannot know; every traced position is labelled, so the rows are taken
    directly (a copy, as the mask makes) and handed to the same chunked autograd function.
    """
    from ftmagic.engine.losses import labelled_cross_entropy_sum

    def loss(hidden, head, labels, softcap=None):
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = labels[:, 1:].reshape(-1)
        return labelled_cross_entropy_sum(rows, head.weight, targets, bias=head.bias, softcap=softcap) / targets.shape[0]

    return loss


def _tracker_class():
    """MemTracker that also accepts frozen parameters.

    torch's MemTracker puts a gradient hook on every parameter of each module it
    enters, which raises for parameters that do not require grad (a frozen base model
    under LoRA). This subclass hooks only trainable parameters; the accounting is the same.
    """
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class FrozenAwareMemTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            def grad_hook(grad):
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            param_memory = 0
            for param in module.parameters():
                winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
                param_memory += sum(w.mem_consumed for w in winfos)
                if param.grad is not None:
                    self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
                if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(grad_hook),
                        param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)),
                    )
            buffer_memory = 0
            for buffer in module.buffers():
                winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
                buffer_memory += sum(w.mem_consumed for w in winfos)
            return param_memory, buffer_memory

        def _update_peak_stats(self, peak_state):
            # Only the global peak is used here; torch's version also walks every tracked
            # module on every op, which makes a 30-block LoRA model's trace minutes long.
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)

    return FrozenAwareMemTracker


def _flat(snap_by_dev: dict) -> dict:
    """Sum a MemTracker snapshot over devices, keyed by plain names ("Gradient", "Total", ...)."""
    out = {}
    for dev_snap in snap_by_dev.values():
        for key, value in dev_snap.items():
            name = getattr(key, "value", key)
            out[name] = out.get(name, 0) + value
    return out


def _take_peak(tracker) -> tuple:
    """(peak bytes since the last call, snapshot at that peak) on the CPU device; then restart the peak."""
    snap = _flat(tracker.get_tracker_snapshot("peak"))
    peak = snap.get("Total", 0)
    # MemTracker keeps one running peak; restarting it from the current state gives per-phase peaks.
    tracker._peak_mem_snap = tracker.get_tracker_snapshot("current")
    tracker._peak_mem = {dev: s["Total"] for dev, s in tracker._peak_mem_snap.items()}
    return peak, {k: v for k, v in snap.items() if k != "Total"}


def _bnb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _quantize_bnb(model, compute_dtype) -> list:
    """Replace the blocks' linears by bitsandbytes NF4 (double-quantized) Linear4bit on CPU.

    Returns the quantization-state tensors (absmax and friends), which are not parameters
    and so must be handed to the tracker separately.
    """
    import bitsandbytes as bnb
    import torch

    states = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not (isinstance(child, torch.nn.Linear) and ".layers." in f".{full}"):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.float(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
            q = q.to("cpu")  # quantizes
            setattr(module, child_name, q)
            qs = q.weight.quant_state
            states += [t for t in (qs.absmax, getattr(qs.state2, "absmax", None), getattr(qs, "offset", None))
                       if isinstance(t, torch.Tensor)]
    model.is_loaded_in_4bit = True  # peft then wraps Linear4bit with its bnb LoRA layer
    return states


def _quantize_stand_in(model, dtype) -> int:
    """Replace every linear of the blocks by a frozen stand-in for bitsandbytes' Linear4bit.

    Like Linear4bit, it computes in ``dtype`` and casts its output back to the input's
    dtype (fp32 here, since peft upcasts norms and embeddings); like MatMul4Bit it saves
    only the weight for backward. Returns the number of weights it stands in for.
    """
    import torch

    class StandIn4bit(torch.nn.Linear):
        def forward(self, x):
            bias = None if self.bias is None else self.bias.to(self.weight.dtype)
            return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)

    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not (isinstance(child, torch.nn.Linear) and ".layers." in f".{full}"):
                continue
            stand_in = StandIn4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.weight.device, dtype=dtype)
            stand_in.weight = torch.nn.Parameter(child.weight.data.to(dtype), requires_grad=False)
            if child.bias is not None:
                stand_in.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(module, child_name, stand_in)
            count += child.weight.numel()
    return count


def _fakify(module, fake_mode) -> None:
    """Replace meta parameters and buffers by CPU fake tensors (tied weights stay tied)."""
    import torch

    converter = fake_mode.fake_tensor_converter
    cpu = torch.device("cpu")
    memo = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in memo:
                fake = converter.from_meta_and_device(fake_mode, param.data, cpu)
                memo[id(param)] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
            sub._parameters[name] = memo[id(param)]
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device.type == "meta":
                if id(buf) not in memo:
                    memo[id(buf)] = converter.from_meta_and_device(fake_mode, buf, cpu)
                sub._buffers[name] = memo[id(buf)]


@contextmanager
def _one_sequence_per_row(active: bool):
    """Tell transformers that each traced row holds one sequence, as a real run finds out.

    On real tensors transformers reads the position ids to see whether rows are packed;
    on fake tensors it cannot, and falls back to materialising a causal mask, which makes
    SDPA repeat the key/value heads and save a larger graph than the real step does.
    """
    if not active:
        yield
        return
    import transformers.masking_utils as masking

    original = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


@contextmanager
def _device_kernels(device: str):
    """Give the traced step the memory of ``device``'s kernels where the CPU's differ (``cuda``).

    The trace runs CPU kernels, and two of them keep more for backward than CUDA's do:

    * dropout (LoRA's ``lora_dropout``, GPT-2's residual dropout): on CUDA ``F.dropout``
      runs the fused ``native_dropout``, which saves a bool mask (1 byte per element); on
      the CPU it multiplies by a noise tensor of the input's dtype, which it saves (4 bytes
      for peft's fp32 adapter inputs). ATen's ``dropout`` takes the fused kernel only for
      CUDA (XPU, lazy) tensors, so here it is called directly; in-place dropout takes the
      noise path on CUDA too and is left alone.
    * attention with dropout: the CPU's SDPA has no fused kernel for it and runs the math
      kernel, which saves batch x heads x seq x seq scores; CUDA's flash and memory-efficient
      kernels keep the output, the logsumexp and the RNG's seed and offset, as the CPU's
      fused kernel does without dropout, so the trace runs that.

    These are the same facts the analytic estimate's ``device`` setting models
    (``DROPOUT_MASK_BYTES``, ``_math_attention`` in :mod:`ftmagic.memory.estimate`). Like
    :func:`_one_sequence_per_row`, the swap holds module-wide while the step is traced.
    """
    if device == "cpu":
        yield
        return
    import torch
    import torch.nn.functional as F

    dropout, sdpa = F.dropout, F.scaled_dot_product_attention

    def fused_dropout(input, p=0.5, training=True, inplace=False):
        if training and not inplace and 0 < p < 1 and input.numel() > 0:
            return torch.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
        return sdpa(query, key, value, attn_mask, 0.0, is_causal, *args, **kwargs)

    F.dropout, F.scaled_dot_product_attention = fused_dropout, fused_attention
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = dropout, sdpa


def simulate_memory(model: Any, **settings: Any) -> TraceResult:
    """Exact mode: :func:`trace_step` under FakeTensorMode (nothing is allocated).

    Example::

        sim = simulate_memory("llama-3.2-1b", method="lora", batch_size=4, seq_len=1024)
        sim.peak_bytes / 2**30   # GiB
    """
    settings.setdefault("fake", True)
    return trace_step(model, **settings)


def _shortened(text: str, width: int = 120) -> str:
    """The first line of an error, cut at a word with an ellipsis where it is longer than ``width``."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[:width].rsplit(" ", 1)[0] + " ..."


def exact_estimate(shape: ModelShape, settings: dict, analytic: Optional[MemoryEstimate] = None) -> MemoryEstimate:
    """The traced step as a :class:`~ftmagic.memory.MemoryEstimate`; the analytic one, with a note, where it cannot trace.

    ``settings`` are the resolved settings of an analytic estimate (``estimate.settings``).
    Where the step cannot be traced (bitsandbytes' 8-bit optimizers, prefix tuning's cache,
    an architecture transformers cannot build here) the analytic estimate comes back with
    a note that says why, so callers always get an answer.

    Example::

        est = estimate_memory("smollm2-135m", method="full")      # the core's analytic estimate
        exact = exact_estimate(est.shape, est.settings, est)
        exact.notes   # says it was traced, or why it fell back
    """
    analytic = analytic if analytic is not None else analytic_estimate(shape, settings)
    reason = untraceable_reason(settings["method"], settings["optimizer"])
    if reason is None and settings.get("devices", 1) > 1:
        reason = "the tracer runs one process; the share of each of several devices is the analytic estimate's"
    if reason is None and get_method_spec(settings["method"]).prompt_learning:
        # peft builds the virtual tokens inside its own forward from tensors made outside the tracer.
        reason = f"`{settings['method']}`'s virtual tokens are not traced"
    if reason is None:
        try:
            sim = simulate_memory(
                shape, method=settings["method"], precision=settings["precision"],
                batch_size=settings["batch_size"], seq_len=settings["seq_len"],
                gradient_checkpointing=settings["gradient_checkpointing"], optimizer=settings["optimizer"],
                lora_r=settings["lora_r"], lora_dropout=settings["lora_dropout"],
                target_modules=settings["target_modules"], num_virtual_tokens=settings["num_virtual_tokens"],
                trainable_layers=settings["trainable_layers"], loss=settings.get("loss", "auto"),
                optimizer_impl="foreach" if settings.get("device") == "cpu" else "fused",
                objective=settings.get("objective", "sft"), num_labels=max(2, settings.get("num_labels") or 2),
                device="cpu" if settings.get("device") == "cpu" else "cuda")
        except FtmagicError as exc:
            reason = str(exc)
        except Exception as exc:  # an architecture or op the tracer cannot run: say so, keep the analytic answer
            reason = f"the step could not be traced ({type(exc).__name__}: {_shortened(str(exc))})"
    if reason is not None:
        analytic.notes.append(f"exact mode fell back to the analytic estimate: {reason}")
        return analytic
    breakdown = dict.fromkeys(DEVICE_KEYS, 0)
    breakdown.update(sim.breakdown)
    peak_phase = max(sim.phases, key=sim.phases.get)
    notes = ["exact: one steady-state step traced under FakeTensorMode with torch's MemTracker"
             + ("" if settings.get("device") == "cpu" else ", with CUDA's dropout and attention kernels")]
    if get_method_spec(settings["method"]).quantized:
        notes.append("4-bit linears traced as frozen compute-dtype linears (same saved tensors), weights counted at NF4 size")
    return MemoryEstimate(total_bytes=int(sim.peak_bytes), breakdown=breakdown, phases=dict(sim.phases),
                          peak_phase=peak_phase, settings=dict(settings, mode="exact"), model=shape.name,
                          trainable_params=sim.trainable_params, total_params=sim.total_params,
                          paged_optimizer_states=analytic.paged_optimizer_states, notes=notes, shape=shape)

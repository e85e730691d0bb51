"""How several processes share one run: the torch-free table of strategies and its rules.

One run on N processes is the same run as on one: the same data order, steps, effective
batch and learning-rate schedule. ``batch_size`` x ``grad_accum`` is the batch of one
optimizer step whatever the process count; every micro-batch of ``batch_size`` rows is
split across the processes (process r takes rows r, r + N, ...), so each process runs
micro-batches of about ``batch_size / N`` rows, ``grad_accum`` times per step. More
processes make a step faster and each device's share smaller; raise ``batch_size`` with
the process count to keep every device as busy as one was before.

The strategies map onto accelerate's own plugins (``ftmagic.engine.distributed`` builds
them from the settings here, and ``ftmagic train --print-accelerate-config`` writes the
same settings as an accelerate config file):

================= ========= ========================================= =====================
distributed       engine    each process holds 1/N of                 resumes on another N
================= ========= ========================================= =====================
ddp               DDP       nothing (weights, gradients and optimizer yes
                            states are replicated)
fsdp              FSDP      weights, gradients, optimizer states      yes (full state dicts)
deepspeed_zero2   DeepSpeed gradients, optimizer states               no (ZeRO partitions)
deepspeed_zero3   DeepSpeed weights, gradients, optimizer states      no (ZeRO partitions)
================= ========= ========================================= =====================

``auto`` is DDP for adapters and other methods that train a small share of the weights
(replicating them costs little, and DDP is the fastest), and FSDP for full fine-tuning on
GPUs, where sharding weights, gradients and optimizer states is what lets the run fit.
accelerate runs FSDP and DeepSpeed on GPUs only (its FSDP plugin refuses a machine
without an accelerator, and its CPU processes always use DDP over gloo), so CPU processes
use DDP.

Example::

    >>> from ftmagic.strategies import resolve_strategy, shard_rows
    >>> resolve_strategy("auto", method="lora", device="cuda"), resolve_strategy("auto", method="full", device="cuda")
    ('ddp', 'fsdp')
    >>> shard_rows(["a", "b", "c", "d", "e"], rank=1, world=2)
    ['b', 'd']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ftmagic.errors import ConfigError, not_accepted
from ftmagic.methods import get_method_spec

STRATEGY_NAMES = ("auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
SHARDABLE = ("weights", "gradients", "optimizer_states")


@dataclass(frozen=True)
class StrategySpec:
    """What one strategy does with N processes (read by the config, the calculator and the engine)."""

    name: str
    engine: str  # "ddp" | "fsdp" | "deepspeed": the accelerate plugin that runs it
    shards: frozenset  # of SHARDABLE: what each process holds only a 1/N share of
    zero_stage: Optional[int]  # DeepSpeed's ZeRO stage
    needs_gpu: bool  # accelerate runs it on GPUs only
    resumes_on_other_count: bool  # its checkpoints load on a different number of processes
    summary: str  # one line for messages and suggestions


STRATEGIES = {spec.name: spec for spec in (
    StrategySpec("ddp", "ddp", frozenset(), None, False, True,
                 "DDP: every process holds the whole model and averages gradients"),
    StrategySpec("fsdp", "fsdp", frozenset(SHARDABLE), None, True, True,
                 "FSDP: weights, gradients and optimizer states are sharded across the processes"),
    StrategySpec("deepspeed_zero2", "deepspeed", frozenset({"gradients", "optimizer_states"}), 2, True, False,
                 "DeepSpeed ZeRO-2: gradients and optimizer states are partitioned across the processes"),
    StrategySpec("deepspeed_zero3", "deepspeed", frozenset(SHARDABLE), 3, True, False,
                 "DeepSpeed ZeRO-3: weights, gradients and optimizer states are partitioned across the processes"),
)}
LABELS = {"ddp": "DDP", "fsdp": "FSDP", "deepspeed_zero2": "DeepSpeed ZeRO-2", "deepspeed_zero3": "DeepSpeed ZeRO-3"}


def get_strategy_spec(name: str) -> StrategySpec:
    """The spec of a resolved strategy (``auto`` is resolved by :func:`resolve_strategy` first)."""
    spec = STRATEGIES.get(name)
    if spec is None:
        raise not_accepted("distributed", name, STRATEGY_NAMES)
    return spec


def resolve_strategy(requested: str, *, method: str, device: str) -> str:
    """``auto`` -> a strategy for ``method`` on ``device`` (see the module docstring); others are checked.

    Example::

        >>> resolve_strategy("auto", method="full", device="cpu")
        'ddp'
    """
    if requested == "auto":
        if device == "cuda" and get_method_spec(method).trains == "all":
            return "fsdp"
        return "ddp"
    spec = get_strategy_spec(requested)
    if spec.needs_gpu and device != "cuda":
        raise ConfigError(f"`distributed: {requested}` runs on GPUs only (accelerate has no {LABELS[requested]} for "
                          f"{device} processes); use `distributed: ddp` or `auto` here")
    return requested


def shard_rows(rows: list, *, rank: int, world: int) -> list:
    """This process's share of one micro-batch: rows ``rank``, ``rank + world``, ...

    Every row of the micro-batch goes to exactly one process, so an epoch trains each
    example once across all of them.
    """
    return list(rows[rank::world])


def rows_per_process(batch_size: int, world: int) -> int:
    """The largest share of a micro-batch one process runs (what its memory must hold)."""
    return max(1, math.ceil(batch_size / max(1, world)))


def check_batch_split(batch_size: int, world: int, where: str = "") -> None:
    """Every process needs at least one row of each micro-batch; a one-line ConfigError otherwise."""
    if world > 1 and batch_size < world:
        raise ConfigError(f"{where}`batch_size: {batch_size}` is split across {world} processes, so some would get no "
                          f"rows; use `batch_size: {world}` or more (a multiple of {world} keeps them evenly loaded)")


# ------------------------------------------------------------------ accelerate and DeepSpeed settings


def fsdp_settings(method: str) -> dict:
    """accelerate's FSDP settings for ``method``, named as its config file names them without ``fsdp_``.

    Adapters follow peft's FSDP guide: ``use_orig_params: false`` with peft's auto-wrap
    policy (trainable and frozen weights in separate units, applied by the engine, which
    has the model); QLoRA also stores its 4-bit weights in the compute dtype
    (``bnb_4bit_quant_storage``), which is what lets FSDP shard them (peft's FSDP-QLoRA
    guide; bitsandbytes >= 0.43.3). Methods that train the model's own weights keep
    ``use_orig_params: true``: their blocks mix trainable and frozen weights.

    Every process reads the weights into host memory before FSDP shards them onto its GPU
    (``cpu_ram_efficient_loading: false``; the guide's ``true`` lets only the first process
    read them, which needs meta-device loading); nothing is offloaded to CPU memory (peft's
    70B example does, at a large cost in speed). Checkpoints gather full state dicts, so
    they resume on any process count.

    Example::

        >>> fsdp_settings("lora")["use_orig_params"], fsdp_settings("full")["use_orig_params"]
        (False, True)
    """
    spec = get_method_spec(method)
    return {
        "version": 1,  # FSDP1: its root unit keeps the output layer gathered through the forward pass,
        # which ftmagic's loss (the output layer applied to labelled positions only) relies on
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "backward_prefetch": "BACKWARD_PRE",
        "forward_prefetch": False,
        "reshard_after_forward": "FULL_SHARD",
        "state_dict_type": "FULL_STATE_DICT",
        "sync_module_states": True,
        "cpu_ram_efficient_loading": False,
        "use_orig_params": not spec.adapter,
        "offload_params": False,
        "activation_checkpointing": False,  # ftmagic's own `gradient_checkpointing` key does this
    }


def deepspeed_config(strategy: str, *, batch_size: int, grad_accum: int, world: int, precision: str,
                     max_grad_norm: float) -> dict:
    """The DeepSpeed JSON config for a ZeRO strategy (what accelerate's DeepSpeed plugin receives).

    ``precision`` is the run's resolved precision (bf16, fp16 or fp32): DeepSpeed keeps fp32
    master weights for half precision itself. The batch counters are DeepSpeed's own
    bookkeeping of the split described in the module docstring.

    Example::

        >>> deepspeed_config("deepspeed_zero3", batch_size=8, grad_accum=2, world=4, precision="bf16",
        ...                  max_grad_norm=1.0)["zero_optimization"]["stage"]
        3
    """
    spec = get_strategy_spec(strategy)
    if spec.zero_stage is None:
        raise ConfigError(f"`distributed: {strategy}` is not a DeepSpeed strategy")
    micro = rows_per_process(batch_size, world)
    zero = {"stage": spec.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if spec.zero_stage == 3:
        # The saved weights are gathered into one 16-bit state dict, as a single-GPU run writes them.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro * grad_accum * world,
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization": zero,
        # ftmagic builds the optimizer (AdamW, 8-bit AdamW or SGD); DeepSpeed accepts a client optimizer.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31 - 1,  # ftmagic reports progress itself
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


ACCELERATE_TYPES = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}


def accelerate_config(strategy: str, *, method: str, processes: int,
                      deepspeed_config_file: Optional[str] = None) -> dict:
    """An accelerate config file (``accelerate launch --config_file``) for one machine with ``processes`` processes.

    ``mixed_precision`` stays ``no``: ftmagic applies autocast itself, as the device allows.
    CPU processes launch as ``MULTI_GPU`` too (torchrun-style, one process per rank; accelerate's
    ``use_cpu`` would ask for mpirun) and ftmagic selects CPU processes and gloo itself.
    Several machines take ``--num_machines``, ``--machine_rank`` and ``--main_process_ip`` on
    the launch command line, which override the file.

    Example::

        >>> accelerate_config("fsdp", method="lora", processes=2)["fsdp_config"]["fsdp_use_orig_params"]
        False
    """
    spec = get_strategy_spec(strategy)
    config = {"compute_environment": "LOCAL_MACHINE", "debug": False, "distributed_type": ACCELERATE_TYPES[spec.engine],
              "downcast_bf16": "no", "machine_rank": 0, "main_training_function": "main", "mixed_precision": "no",
              "num_machines": 1, "num_processes": processes, "rdzv_backend": "static", "same_network": True,
              "tpu_env": [], "tpu_use_cluster": False, "tpu_use_sudo": False, "use_cpu": False}
    if spec.engine == "fsdp":
        config["fsdp_config"] = {f"fsdp_{key}": value for key, value in fsdp_settings(method).items()}
    elif spec.engine == "deepspeed":
        if not deepspeed_config_file:
            raise ConfigError(f"`distributed: {strategy}` needs the path of its DeepSpeed config file")
        # `standard`: one torchrun-style launcher per machine (accelerate's default for several machines is pdsh).
        config["deepspeed_config"] = {"deepspeed_config_file": deepspeed_config_file,
                                      "zero3_init_flag": spec.zero_stage == 3,
                                      "deepspeed_multinode_launcher": "standard"}
    return config


__all__ = ["ACCELERATE_TYPES", "LABELS", "accelerate_config", "SHARDABLE", "STRATEGIES", "STRATEGY_NAMES", "StrategySpec", "check_batch_split",
           "deepspeed_config", "fsdp_settings", "get_strategy_spec", "resolve_strategy", "rows_per_process",
           "shard_rows"]

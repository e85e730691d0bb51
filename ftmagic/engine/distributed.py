"""One run on several processes: accelerate starts and wraps them; this module decides and adapts.

accelerate does the distributed work: its ``Accelerator`` joins the process group (gloo
for CPU processes, NCCL on GPUs) and wraps the model with DDP, FSDP or DeepSpeed from the
plugins built here out of the settings in :mod:`ftmagic.strategies`. What accelerate
leaves to a training loop, and this module adds, is what keeps N processes the same run
as one:

* each micro-batch is split across the processes (:func:`ftmagic.strategies.shard_rows`)
  and every process weighs its loss by the units of the whole step on all processes, so
  the averaged gradient equals the single-process one; a process whose share of the last,
  short micro-batch is empty still runs a zero-weighted pass, because every collective
  must be entered by every process;
* the forward pass goes through the wrapped module (:class:`LossForward`), whose
  ``forward`` is the objective's loss: DDP and FSDP only synchronise what runs inside the
  module they wrap;
* losses, metrics, tokens and evaluation are summed over the processes when they are
  read, Stop and NaN are agreed at those reads, and one process writes files;
* a failure on one process ends every process with a one-line error naming it.

Decisions are pure functions of the config, the device and what the launcher set
(:func:`launch_info`, :func:`plan_distributed`); :class:`Ranks` is the running group.

Example::

    info = launch_info()                      # WORLD_SIZE, RANK, ... from torchrun / accelerate launch
    if info.world > 1:
        dplan = plan_distributed(cfg, device_plan.device, info)
        ranks = Ranks.start(dplan, device_plan)
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ftmagic.engine.loop import optimizer_step
from ftmagic.errors import ConfigError, DistributedError, FtmagicError
from ftmagic.strategies import (LABELS, check_batch_split, deepspeed_config, fsdp_settings, get_strategy_spec,
                                resolve_strategy, rows_per_process, shard_rows)

# accelerate launch's environment for a strategy chosen in its config file.
_LAUNCHER_FLAGS = (("ACCELERATE_USE_FSDP", "fsdp"), ("ACCELERATE_USE_DEEPSPEED", "deepspeed"))


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher (torchrun, accelerate launch, notebook_launcher) told this process."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1
    launcher_strategy: Optional[str] = None  # "fsdp", "deepspeed_zero2/3" from an accelerate config file


def launch_info(environ: Optional[dict] = None) -> LaunchInfo:
    """Read the launcher's environment variables (none set: one process).

    Example::

        >>> launch_info({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}).local_world
        2
    """
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    strategy = None
    for flag, name in _LAUNCHER_FLAGS:
        if str(env.get(flag, "")).lower() == "true":
            strategy = name
    if strategy == "deepspeed":
        strategy = f"deepspeed_zero{_launcher_zero_stage(env)}"
    return LaunchInfo(world=world, rank=int(env.get("RANK", "0") or 0), local_rank=int(env.get("LOCAL_RANK", "0") or 0),
                      local_world=int(env.get("LOCAL_WORLD_SIZE", str(world)) or world), launcher_strategy=strategy)


def _launcher_zero_stage(env) -> int:
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not stage and path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                stage = json.load(handle).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError):
            stage = None
    return 3 if str(stage) == "3" else 2


@dataclass(frozen=True)
class DistributedPlan:
    """How this run uses its processes (the outcome of :func:`plan_distributed`)."""

    strategy: str  # ddp | fsdp | deepspeed_zero2 | deepspeed_zero3
    world: int
    rank: int
    local_rank: int
    local_world: int
    device: str
    rows_per_process: int  # the largest share of a micro-batch one process runs
    threads: int  # torch threads per CPU process
    reason: str  # one line for the plan event
    fsdp: Optional[dict] = None  # fsdp_settings(method)
    deepspeed: Optional[dict] = None  # the DeepSpeed JSON config

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def threads_per_process(cpu_count: int, local_world: int) -> int:
    """Torch threads for each of ``local_world`` CPU processes sharing ``cpu_count`` cores (no oversubscription)."""
    return max(1, cpu_count // max(1, local_world))


def plan_distributed(cfg, device: str, info: LaunchInfo, *, cpu_count: Optional[int] = None,
                     precision: str = "fp32") -> DistributedPlan:
    """Decide the strategy and its settings for ``info.world`` processes (pure; tested with faked inputs).

    ``cfg.processes`` other than 1 must match the launcher's count; an explicit
    ``distributed`` must agree with a strategy the launcher's accelerate config chose.

    Example::

        dplan = plan_distributed(cfg, "cuda", LaunchInfo(world=2, rank=0, local_rank=0, local_world=2))
        dplan.strategy, dplan.rows_per_process
    """
    try:
        return _plan_distributed(cfg, device, info, cpu_count=cpu_count, precision=precision)
    except ConfigError as exc:
        exc.agreed = True  # every process decides the same from the same inputs
        raise


def _plan_distributed(cfg, device: str, info: LaunchInfo, *, cpu_count: Optional[int], precision: str):
    if cfg.processes not in (1, info.world):
        raise ConfigError(f"`processes: {cfg.processes}` does not match the {info.world} processes the launcher "
                          f"started; set `processes: {info.world}` (or 1) or launch {cfg.processes}")
    requested = cfg.distributed
    if info.launcher_strategy is not None:
        launched = info.launcher_strategy
        same_engine = requested.split("_")[0] == launched.split("_")[0]
        if requested != "auto" and not same_engine:
            raise ConfigError(f"`distributed: {requested}` but the accelerate config of this launch asks for "
                              f"{LABELS[launched]}; make them agree (or set `distributed: auto`)")
        if requested == "auto":
            requested = launched
    strategy = resolve_strategy(requested, method=cfg.method, device=device)
    check_batch_split(cfg.batch_size, info.world)
    rows = rows_per_process(cfg.batch_size, info.world)
    spec = get_strategy_spec(strategy)
    reason = (f"{info.world} processes, {LABELS[strategy]}: each runs {rows} of every {cfg.batch_size} rows of a "
              f"micro-batch (the same steps, batch and schedule as one process)")
    ds = None
    if spec.engine == "deepspeed":
        ds = deepspeed_config(strategy, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, world=info.world,
                              precision=precision, max_grad_norm=cfg.max_grad_norm)
    return DistributedPlan(strategy=strategy, world=info.world, rank=info.rank, local_rank=info.local_rank,
                           local_world=info.local_world, device=device, rows_per_process=rows,
                           threads=threads_per_process(cpu_count or os.cpu_count() or 1, info.local_world),
                           reason=reason, fsdp=fsdp_settings(cfg.method) if spec.engine == "fsdp" else None,
                           deepspeed=ds)


def fsdp_plugin_kwargs(settings: dict, *, sync_module_states: Optional[bool] = None) -> dict:
    """Keyword arguments of accelerate's ``FullyShardedDataParallelPlugin`` from :func:`fsdp_settings`."""
    return dict(fsdp_version=settings["version"], auto_wrap_policy=settings["auto_wrap_policy"].lower(),
                backward_prefetch=settings["backward_prefetch"], forward_prefetch=settings["forward_prefetch"],
                reshard_after_forward=settings["reshard_after_forward"], state_dict_type=settings["state_dict_type"],
                sync_module_states=settings["sync_module_states"] if sync_module_states is None else sync_module_states,
                cpu_ram_efficient_loading=settings["cpu_ram_efficient_loading"],
                use_orig_params=settings["use_orig_params"], cpu_offload=settings["offload_params"],
                activation_checkpointing=settings["activation_checkpointing"])


class LossForward(torch.nn.Module):
    """The module DDP, FSDP or DeepSpeed wraps: its ``forward`` is the objective's loss of one batch.

    DDP readies its gradient hooks and FSDP gathers its parameters only inside the wrapped
    module's forward, and ftmagic's loss runs the decoder and applies the output layer itself
    (to labelled positions only), so the whole loss must run in here.
    """

    def __init__(self, model, objective):
        super().__init__()
        self.model = model
        self.objective = objective  # not a Module: its parameters stay the model's

    def forward(self, batch: dict):
        return self.objective.loss(self.model, batch)

    @property
    def _no_split_modules(self):  # what FSDP's transformer-based wrapping reads
        return getattr(self.model, "_no_split_modules", None)


def is_peer_failure(exc: BaseException) -> bool:
    """True for the error a process sees when another process died (a broken collective), not its own fault."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(exc, dist_error) and not isinstance(exc, FtmagicError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(mark in text for mark in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
        "gloo/transport", "ProcessGroupNCCL", "Socket Timeout"))


class Ranks:
    """The running process group and the collectives the loop needs (see the module docstring).

    Built by :meth:`start` once per run; ``rank``, ``world`` and ``is_main`` are plain attributes.
    """

    def __init__(self, plan: DistributedPlan, accelerator: Any) -> None:
        self.plan = plan
        self.accelerator = accelerator
        self.rank, self.world, self.is_main = plan.rank, plan.world, plan.is_main
        self.spec = get_strategy_spec(plan.strategy)
        self.wrapped = None  # LossForward as DDP / FSDP / DeepSpeed wrapped it
        self._last_barrier = None  # kept until the process group is gone (close)
        self.model = None  # the unwrapped model
        self.trainable_names: list = []
        self.grad_accum = 1

    # ------------------------------------------------------------------ set-up
    @classmethod
    def start(cls, plan: DistributedPlan, device_plan) -> "Ranks":
        """Join the process group through accelerate with the strategy's plugin."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        kwargs: dict = dict(cpu=device_plan.device == "cpu", mixed_precision="no", step_scheduler_with_optimizer=False)
        if plan.strategy == "ddp":
            kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=False)]
        elif plan.fsdp is not None:
            from accelerate.utils import FullyShardedDataParallelPlugin

            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**fsdp_plugin_kwargs(plan.fsdp))
        elif plan.deepspeed is not None:
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                raise ConfigError(f"`distributed: {plan.strategy}` needs DeepSpeed: `pip install deepspeed` "
                                  "(or `pip install 'ftmagic[deepspeed]'`)") from None
            from accelerate.utils import DeepSpeedPlugin

            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=dict(plan.deepspeed),
                                                         zero3_init_flag=plan.strategy == "deepspeed_zero3")
        accelerator = Accelerator(**kwargs)
        if plan.device == "cpu":
            torch.set_num_threads(plan.threads)  # after accelerate, which sets its own default for CPU processes
        return cls(plan, accelerator)

    def prepare(self, model, objective, build_optimizer: Callable, grad_accum: int):
        """Wrap ``model`` for the strategy and build its optimizer; returns ``(optimizer, params)``.

        ``build_optimizer(params)`` makes the optimizer from the parameters that train
        (FSDP's flattened ones after wrapping; DeepSpeed takes model and optimizer together).
        """
        self.model, self.grad_accum = model, grad_accum
        self.trainable_names = [name for name, p in model.named_parameters() if p.requires_grad]
        module = LossForward(model, objective)
        if self.spec.engine == "deepspeed":
            optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad])
            self.wrapped, optimizer = self.accelerator.prepare(module, optimizer)
            return optimizer, [p for p in self.wrapped.parameters() if p.requires_grad]
        if self.spec.engine == "fsdp" and self.plan.fsdp and not self.plan.fsdp["use_orig_params"]:
            # peft's policy: trainable adapter layers in units of their own (peft's FSDP guide).
            from peft.utils.other import fsdp_auto_wrap_policy

            self.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        self.wrapped = self.accelerator.prepare_model(module)
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        return build_optimizer(params), params

    def grad_scaler(self, device: str):
        """The gradient scaler for fp16 (FSDP needs its sharded variant; DeepSpeed scales itself)."""
        if self.spec.engine == "deepspeed":
            return None
        if self.spec.engine == "fsdp":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(device)
        return torch.amp.GradScaler(device)

    # ------------------------------------------------------------------ a step
    def shard(self, rows: list) -> tuple[list, bool]:
        """This process's rows of a micro-batch, and whether they count (False: a zero-weighted stand-in)."""
        mine = shard_rows(rows, rank=self.rank, world=self.world)
        if mine:
            return mine, True
        return list(rows[:1]), False

    def loss_factor(self, local_units: int):
        """What this process multiplies its summed loss by: ``world / units of the step on all processes``.

        DDP and FSDP average gradients over the processes, so the result is the gradient of
        the step's mean loss per unit, exactly as one process computes it. DeepSpeed also
        divides by the accumulation steps, which is undone here.
        """
        total = torch.tensor([float(local_units)], dtype=torch.float64)
        if self.accelerator.device.type == "cuda":
            # From pinned memory the copy and the all-reduce queue behind the step's kernels: no step waits.
            total = total.pin_memory().to(self.accelerator.device, non_blocking=True)
        torch.distributed.all_reduce(total)
        factor = self.world / total.clamp(min=1.0)
        if self.spec.engine == "deepspeed":
            factor = factor * self.grad_accum
        return factor.float()

    def forward(self, batch: dict):
        return self.wrapped(batch)

    def sync_context(self, last: bool):
        """Gradients are exchanged once per step, after the last micro-batch."""
        if last or self.spec.engine == "deepspeed":
            return nullcontext()
        return self.accelerator.no_sync(self.wrapped)

    def backward(self, loss, scaler, last: bool) -> None:
        if self.spec.engine == "deepspeed":
            self.wrapped.set_gradient_accumulation_boundary(is_boundary=last)
            self.wrapped.backward(loss)
            return
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def optimizer_step(self, optimizer, scheduler, params, *, scaler=None, max_grad_norm: float = 1.0):
        """Unscale, clip (FSDP clips across its shards; DeepSpeed inside its engine), step, schedule, zero."""
        if self.spec.engine == "deepspeed":
            self.wrapped.step()  # clipping, the optimizer step and zeroing happen inside DeepSpeed's engine
            scheduler.step()
            norm = self.wrapped.get_global_grad_norm()
            return torch.as_tensor(float(norm)) if norm is not None else None
        clip = self.wrapped.clip_grad_norm_ if self.spec.engine == "fsdp" else None
        return optimizer_step(optimizer, scheduler, params, scaler=scaler, max_grad_norm=max_grad_norm, clip=clip)

    # ------------------------------------------------------------------ collectives
    def sum(self, values: list) -> list:
        """Each value (a number or a one-element tensor) summed over every process, as floats (one collective)."""
        device = self.accelerator.device
        packed = torch.stack([v.detach().to(device, torch.float64).reshape(()) if isinstance(v, torch.Tensor)
                              else torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
        torch.distributed.all_reduce(packed)
        return packed.tolist()

    def max(self, value: float) -> float:
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return float(tensor)

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on any (Stop, agreed at a logging step)."""
        return self.max(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        """Wait for every process. The handle of the last barrier is kept (see :meth:`close`)."""
        work = torch.distributed.barrier(async_op=True)
        work.wait()
        self._last_barrier = work

    def main_decides(self, decide: Callable):
        """Run ``decide()`` on the first process and give its result, or its one-line error, to every process."""
        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", decide())
            except FtmagicError as exc:
                box[0] = ("error", type(exc).__name__, str(exc))
        torch.distributed.broadcast_object_list(box, src=0)
        outcome = box[0]
        if outcome[0] == "error":
            import ftmagic.errors as errors

            error = getattr(errors, outcome[1], FtmagicError)(outcome[2])
            error.agreed = True  # every process raises it: it is the run's error, not one process's
            raise error
        return outcome[1]

    def gather(self, value: Any) -> list:
        """``value`` of every process, in rank order (small Python objects: RNG states)."""
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    # ------------------------------------------------------------------ weights
    def full_state_dict(self) -> Optional[dict]:
        """The whole model's state dict with the unwrapped model's names, on the first process (collective)."""
        state = self.accelerator.get_state_dict(self.wrapped)
        if not self.is_main or state is None:
            return None
        return {name[len("model."):] if name.startswith("model.") else name: value for name, value in state.items()}

    def trainable_state(self) -> Optional[dict]:
        """A CPU copy of the weights that train, on the first process (collective for sharded strategies)."""
        from ftmagic.engine import checkpoint as ckpt

        if not self.spec.shards:
            return ckpt.trainable_state(self.model) if self.is_main else None
        full = self.full_state_dict()
        if full is None:
            return None
        return {name: full[name].detach().to("cpu", copy=True).contiguous() for name in self.trainable_names
                if name in full}

    def optimizer_state(self, optimizer) -> Optional[dict]:
        """The optimizer state to save, on the first process (FSDP: gathered whole, keyed by parameter name)."""
        if self.spec.engine == "fsdp":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            state = FSDP.optim_state_dict(self.wrapped, optimizer)
            return state if self.is_main else None
        return optimizer.state_dict() if self.is_main else None

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        if self.spec.engine == "fsdp":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            state = FSDP.optim_state_dict_to_load(self.wrapped, optimizer, state)
        optimizer.load_state_dict(state)

    def close(self) -> None:
        """Leave the process group (every process, at the end of the run).

        Why the last barrier's handle outlives the group: a gloo collective is freed by whichever
        thread lets go of it last, and a barrier also frees the collectives before it, whose
        tensors Python owns, so freeing it takes the GIL. The group itself is freed later, with
        the wrapped model (its DDP reducer holds it), on this thread and holding the GIL, and
        it waits for gloo's threads to end. When the worker thread that ran the barrier was
        still freeing it, each waited for the other for ever (every few runs of two processes,
        and at once when the model was freed straight after this call). With the handle kept
        here, that thread only lets go of a reference and the barrier is freed on this thread.
        The wrapped model is let go of here too, so the group is freed now, while the handle
        is still held, whatever order this object's attributes are freed in later.
        """
        self.wrapped = None
        self.accelerator.free_memory()  # accelerate keeps the wrapped model too
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def describe(plan: DistributedPlan) -> dict:
    """The plan as plain values (for ``metrics.json`` and the run file)."""
    return {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("fsdp", "deepspeed", "rank", "local_rank")}


__all__ = ["DistributedError", "DistributedPlan", "LaunchInfo", "LossForward", "Ranks", "describe",
           "fsdp_plugin_kwargs", "is_peer_failure", "launch_info", "plan_distributed", "threads_per_process"]

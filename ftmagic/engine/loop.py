"""The training loop: one function you can read top to bottom, with its parts beside it.

Data order is a pure function of ``(seed, epoch)``: micro-batch ``k`` of the run is
batch ``k % batches_per_epoch`` of epoch ``k // batches_per_epoch``, and optimizer
step ``s`` consumes micro-batches ``s*grad_accum .. s*grad_accum+grad_accum-1``. The
data position of a checkpoint is therefore just its step, which makes resume exact.

The loss of one optimizer step is the mean over every loss unit (trained token, for SFT)
of all its micro-batches (not a mean of per-batch means), so gradient accumulation gives
the same update as one large batch. What a batch is and how its loss is computed belongs
to the objective (:mod:`ftmagic.engine.objectives`).

Nothing in a step waits for the device: losses, metrics and gradient norms accumulate as
device tensors in a :class:`Window` and are read once every ``logging_steps`` steps (and
before a checkpoint or evaluation), when a :class:`~ftmagic.events.Step` event reports
their means over the window. On a GPU that keeps the queue of kernels full.

The parts, in the order a step uses them:

* :class:`Batches` - the deterministic micro-batch stream;
* the objective's ``batch`` / ``loss`` - forward and backward of each micro-batch;
* :func:`optimizer_step` - unscale, clip, step, schedule, zero the gradients;
* :class:`Window` - what is read and reported at logging steps;
* :class:`LoopState` - everything ``state.json`` stores, so a resume continues exactly;
* :func:`evaluate` and :meth:`LoopState.record_eval` - evaluation and early stopping;
* :func:`nonfinite_flag` / :func:`step_is_finite` - NaN and infinity (``on_nan``).
* ``evaluators`` - what else an evaluation measures (answers generated and scored,
  :mod:`ftmagic.engine.generation`): each is called after :func:`evaluate` as
  ``evaluator(model, step, ranks=ranks) -> (metrics, events)`` (``ranks`` None in one process;
  under several, every process calls it and gets the same metrics, which it may split the work
  for); its metrics join the ``eval`` event's and
  can be the ``best_metric`` that early stopping and the kept weights follow. With
  evaluators, the base model is evaluated once at step 0, before training.

A NaN or infinite loss or gradient is caught without a per-step device read: a flag
accumulates on the device and is read with the loss at logging steps, and the weights are
checked before every checkpoint, so a non-finite step is never saved. ``on_nan: stop``
then ends the run with the weights of the last checkpoint written (or those it started
from); ``on_nan: skip`` reads each step instead and drops the updates that are not finite.

Progress is reported only through ``emit(event)`` with the typed records of :mod:`ftmagic.events`.

Example::

    outcome = train_loop(model, rows, eval_rows, config=cfg, plan=device_plan,
                         optimizer_plan=opt_plan, pad_id=tok.pad_token_id,
                         max_steps=100, emit=print, stop=None, checkpoint_root="out/checkpoints")
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from pathlib import Path
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch

from ftmagic.engine import checkpoint as ckpt
from ftmagic.engine.device import autocast_for, build_optimizer
from ftmagic.engine.objectives import CausalLM
from ftmagic.errors import TrainingError
from ftmagic.events import Checkpoint, Eval, Message, Step
from ftmagic.scoring import greater_is_better


def lr_factor(step: int, *, kind: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) for a schedule with linear warmup.

    Example::

        >>> [round(lr_factor(s, kind="linear", warmup_steps=2, total_steps=6), 3) for s in range(6)]
        [0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    # Decay starts right after the warmup peak and reaches 0 at the last step.
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps + 1) / span)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown scheduler {kind!r}")


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` below 1 is a share of the steps; from 1 up it is a number of steps."""
    return int(math.ceil(warmup * total_steps)) if warmup < 1 else int(warmup)


def plan_steps(n_rows: int, *, batch_size: int, grad_accum: int, epochs: float, max_steps: int) -> tuple[int, int]:
    """(batches per epoch, optimizer steps of the run)."""
    per_epoch = max(1, math.ceil(n_rows / batch_size))
    if max_steps and max_steps > 0:
        return per_epoch, max_steps
    return per_epoch, max(1, math.ceil(epochs * per_epoch / grad_accum))


def resolve_logging_steps(requested: int, device: str, max_steps: int) -> int:
    """How often the loop reads the loss from the device: ``requested``, or for 0 (``auto``)
    every step where reading is free (CPU, MPS) and about 200 times a run, at most every 10
    steps, on CUDA, where each read waits for the GPU to finish its queue.

    Example::

        >>> resolve_logging_steps(0, "cpu", 1000), resolve_logging_steps(0, "cuda", 1000), resolve_logging_steps(3, "cuda", 50)
        (1, 5, 3)
    """
    if requested and requested > 0:
        return requested
    if device != "cuda":
        return 1
    return max(1, min(10, max_steps // 200))


def memory_bytes(device: str) -> int:
    """Peak CUDA memory allocated, else this process's resident memory (neither waits for the device)."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil is optional; memory is informative only
        return 0


BEST_COPY_LIMIT = 2**28  # trainable elements (1 GiB in fp32) up to which the best weights are kept in memory
# `on_nan: skip`: this many skipped updates in a row mean the weights themselves are broken; the run stops.
MAX_SKIPPED_IN_A_ROW = 10


@dataclass
class LoopOutcome:
    reason: str  # finished | stopped | interrupted | early_stopping
    step: int
    train_loss: Optional[float]
    eval_loss: Optional[float]
    best_eval_loss: Optional[float]
    trained_tokens: int
    runtime_s: float
    peak_memory_bytes: int
    history: list = field(default_factory=list)
    last_checkpoint: Optional[str] = None
    eval_metrics: dict = field(default_factory=dict)
    skipped_steps: int = 0  # updates dropped by `on_nan: skip`
    best: dict = field(default_factory=dict)  # {"metric", "value", "step"} of the best evaluation


class Batches:
    """The deterministic micro-batch stream (see the module docstring)."""

    def __init__(self, rows, batch_size: int, seed: int):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.per_epoch = max(1, math.ceil(len(rows) / batch_size))
        self._orders: dict[int, list] = {}

    def order(self, epoch: int) -> list:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(len(self.rows), generator=generator).tolist()}
        return self._orders[epoch]

    def position(self, k: int) -> tuple[int, int]:
        return k // self.per_epoch, k % self.per_epoch

    def get(self, k: int) -> list:
        epoch, index = self.position(k)
        order = self.order(epoch)
        return [self.rows[i] for i in order[index * self.batch_size:(index + 1) * self.batch_size]]


@dataclass
class LoopState:
    """Everything a checkpoint's ``state.json`` stores: resuming from it continues the run exactly.

    ``history`` holds the logged step and eval events (as dicts); the best-evaluation
    fields drive early stopping (``best_eval`` is the value of the config's ``best_metric``,
    ``best_values`` everything that evaluation measured).
    """

    step: int = 0
    trained_tokens: int = 0
    elapsed_s: float = 0.0
    train_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    eval_metrics: dict = field(default_factory=dict)
    best_eval: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals: int = 0
    history: list = field(default_factory=list)
    skipped_steps: int = 0
    best_values: dict = field(default_factory=dict)

    # The JSON types each field may have in state.json: a resume reads a checkpoint only when
    # every field is there with its type, so a damaged file is skipped, not half-used.
    JSON_TYPES: ClassVar[dict] = {
        "step": (int,), "trained_tokens": (int,), "elapsed_s": (int, float), "train_loss": (int, float, type(None)),
        "eval_loss": (int, float, type(None)), "eval_metrics": (dict,), "best_eval": (int, float, type(None)),
        "best_step": (int, type(None)), "bad_evals": (int,), "history": (list,), "skipped_steps": (int,),
        "best_values": (dict,)}

    def to_json(self, *, epoch: int, batch_index: int, order_seed: int) -> dict:
        return {**dataclasses.asdict(self), "epoch": epoch, "batch_index": batch_index, "order_seed": order_seed}

    @classmethod
    def from_json(cls, values: dict) -> "LoopState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def record_eval(self, step: int, loss: Optional[float], metrics: dict, *, key: str = "eval_loss",
                    higher: bool = False) -> bool:
        """Note an evaluation; True when it is the best so far by ``key`` (lower loss, or higher if ``higher``)."""
        self.eval_loss, self.eval_metrics = loss, dict(metrics)
        value = loss if key == "eval_loss" else metrics.get(key)
        if value is not None and (self.best_eval is None or (value > self.best_eval if higher else value < self.best_eval)):
            self.best_eval, self.best_step, self.bad_evals = value, step, 0
            self.best_values = {"eval_loss": loss, **metrics}
            return True
        self.bad_evals += 1
        return False


class Window:
    """Losses, metrics and gradient norms of the steps since the last log, kept on the device.

    ``read()`` is the only place the loop waits for the device; it returns the means over
    the window and starts a new one.
    """

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.loss_sum = None  # device tensor: sum of per-unit losses
        self.nonfinite = None  # device bool: a NaN or infinity in a step of the window (see nonfinite_flag)
        self.metric_sums: dict = {}
        self.grad_norm_sum = None
        self.units = self.tokens = self.steps = self.counted_steps = 0
        self.lr = None  # the learning rate of the window's last step
        self.started = time.perf_counter()

    @staticmethod
    def _add(total, value):
        return value if total is None else total + value

    def add_micro_batch(self, loss_sum: torch.Tensor, metrics: dict, units: int, tokens: int) -> None:
        self.loss_sum = self._add(self.loss_sum, loss_sum.detach().float())
        for name, value in metrics.items():
            self.metric_sums[name] = self._add(self.metric_sums.get(name), value.detach().float())
        self.units += units
        self.tokens += tokens

    def add_step(self, grad_norm, lr: float, nonfinite=None) -> None:
        self.steps += 1
        self.lr = lr
        if nonfinite is not None:
            self.nonfinite = nonfinite if self.nonfinite is None else self.nonfinite | nonfinite
        if grad_norm is not None:
            self.grad_norm_sum = self._add(self.grad_norm_sum, grad_norm.detach().float())
            self.counted_steps += 1

    def read(self, reduce: Optional[Callable] = None) -> dict:
        """Means over the window (one device sync), its tokens and seconds; then a new window.

        ``reduce`` (several processes) sums the loss, unit, token and metric totals over every
        process first, so each reads the means of the whole run; the gradient norm is the
        same on every process already.
        """
        now = time.perf_counter()
        grad_norm = float(self.grad_norm_sum) / self.counted_steps if self.grad_norm_sum is not None else None
        # A NaN on one process reaches every process through the summed loss (and the
        # gradient norm is the same everywhere), so all of them stop at the same step.
        nonfinite = bool(self.nonfinite) if self.nonfinite is not None else False
        if reduce is None:
            out = {"loss": float(self.loss_sum) / self.units if self.loss_sum is not None and self.units else None,
                   "metrics": {k: float(v) / self.units for k, v in self.metric_sums.items()} if self.units else {},
                   "grad_norm": grad_norm, "tokens": self.tokens, "steps": self.steps, "seconds": now - self.started,
                   "lr": self.lr, "nonfinite": nonfinite}
        else:
            names = sorted(self.metric_sums)
            loss_sum, units, tokens, *metrics = reduce(
                [self.loss_sum if self.loss_sum is not None else 0.0, self.units, self.tokens,
                 *(self.metric_sums[name] for name in names)])
            out = {"loss": loss_sum / units if units else None,
                   "metrics": {name: value / units for name, value in zip(names, metrics)} if units else {},
                   "grad_norm": grad_norm, "tokens": int(tokens), "steps": self.steps, "seconds": now - self.started,
                   "lr": self.lr, "nonfinite": nonfinite}
        self._clear()
        return out


def nonfinite_flag(loss_sums: list, grad_norm, scaler=None) -> torch.Tensor:
    """A device bool: this step's loss (or, without a gradient scaler, its gradient norm) is NaN or infinite.

    No device read. With a scaler, infinite gradients are its normal overflow signal (it skips
    those steps itself), so only the loss counts.
    """
    total = torch.stack([s.detach().float().sum() for s in loss_sums]).sum()
    flag = ~torch.isfinite(total)
    if scaler is None and grad_norm is not None:
        flag = flag | ~torch.isfinite(grad_norm.detach().float())
    return flag


def step_is_finite(loss_sums: list, params, scaler=None) -> bool:
    """Before the update: whether this step's loss and gradients are finite (one device read)."""
    total = torch.stack([s.detach().float().sum() for s in loss_sums]).sum()
    grads = [p.grad for p in params if p.grad is not None]
    if scaler is None and grads:
        total = total + torch.nn.utils.get_total_norm(grads).float()
    return bool(torch.isfinite(total))


def weights_are_finite(params) -> bool:
    """Whether every trainable weight is finite (one device read; used before each checkpoint)."""
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all())


class _NonFinite(Exception):
    """Raised inside the loop when a NaN or infinity is seen; ends it with reason ``nonfinite``."""


def follow_schedule(optimizer, scheduler) -> None:
    """Set the rate the next step applies from this run's schedule, at the step the scheduler has reached.

    A checkpoint's optimizer state holds the rate of the schedule it was saved under. Where a
    resumed run is longer (``max_steps`` or ``epochs`` raised after it finished), that schedule
    had decayed to 0 at its end and every further step would apply it; the rate now follows the
    new length. With the same length it is the same value, computed the same way (the resume
    stays exact).

    Example::

        scheduler.load_state_dict(saved)     # last_epoch: the steps done
        follow_schedule(optimizer, scheduler)
    """
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def optimizer_step(optimizer, scheduler, params, *, scaler=None, max_grad_norm: float = 1.0,
                   clip: Optional[Callable] = None):
    """Unscale (fp16), clip, step, advance the schedule and zero the gradients.

    Returns the gradient norm before clipping as a device tensor (read later, with the loss).
    ``clip(limit)`` replaces the clipping of ``params`` (FSDP clips across its shards).
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    if clip is not None:
        grad_norm = clip(limit)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, limit) if params else None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@contextmanager
def interrupts_deferred():
    """Within the block a Ctrl-C (or a notebook's interrupt) waits, and goes to the handler that
    was in place (Python's: ``KeyboardInterrupt``; a multi-process run's: a Stop) as the block ends.

    The update of a step (optimizer, schedule, step count) runs inside, so an interrupted run
    saves the weights of a whole step, never of half an update. A second Ctrl-C inside goes
    through at once (a hung update can still be stopped); an error raised inside keeps going
    out as it is. Only the main thread receives signals; elsewhere, and nested, the block
    runs as it is.

    Example::

        with interrupts_deferred():
            optimizer.step(); scheduler.step(); step += 1
    """
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def hold(signum, frame):
        received.append(signum)
        if len(received) > 1:  # asked twice: do not wait any longer
            signal.signal(signal.SIGINT, restored)
            _deliver(previous, signum, frame)

    try:
        previous = signal.signal(signal.SIGINT, hold)
    except ValueError:  # not the main interpreter: signals are not ours to take
        yield
        return
    # A handler installed outside Python reads as None and cannot be put back: Python's own is.
    restored = previous if previous is not None else signal.default_int_handler
    _deferring = True
    try:
        yield  # an error raised here goes out as it is, the held signal with it
    finally:
        _deferring = False
        signal.signal(signal.SIGINT, restored)
    if len(received) == 1:
        _deliver(previous, received[0], None)


_deferring = False  # an interrupts_deferred block is open (nested ones do nothing)


def _deliver(handler, signum: int, frame) -> None:
    """What ``handler`` (as ``signal.signal`` returned it) would have done with ``signum``."""
    if callable(handler):
        handler(signum, frame)  # Python's default_int_handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the process's default action, as if never deferred
    elif handler != signal.SIG_IGN:  # installed outside Python (None): Python's own behaviour
        raise KeyboardInterrupt


def evaluate(model, rows, *, batch_size: int, plan, objective=None, pad_id: int = 0, shifted: bool = True,
             with_metrics: bool = False, ranks=None):
    """Mean loss per unit over ``rows`` (no dropout, no gradients, RNG untouched).

    With ``with_metrics`` returns ``(loss, {metric: mean})`` for objectives that report more.
    With ``ranks`` (several processes) each process evaluates its share of every batch
    through the wrapped model and the sums are combined, so every process gets the same
    loss, the one a single process computes.
    """
    objective = objective or CausalLM(model, pad_id=pad_id, plan=plan, shifted=shifted)
    if not rows:
        return (None, {}) if with_metrics else None
    was_training = model.training
    model.eval()
    window = Window()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            if ranks is None:
                batch = objective.batch(rows[start:start + batch_size])
                units = objective.units(batch)
                if units == 0:
                    continue
                with objective.context(model), autocast_for(plan):
                    loss_sum, metrics = objective.loss(model, batch)
            else:
                mine, counts = ranks.shard(rows[start:start + batch_size])
                batch = objective.batch(mine)
                units = objective.units(batch) if counts else 0
                with objective.context(model), autocast_for(plan):
                    loss_sum, metrics = ranks.forward(batch)  # every process runs as many passes as the others
            _add_to_window(window, loss_sum, metrics, units, objective.tokens(batch) if units else 0)
    model.train(was_training)
    result = window.read(reduce=ranks.sum if ranks is not None else None)
    metrics = _summarize(objective, result["metrics"])
    return (result["loss"], metrics) if with_metrics else result["loss"]


def _summarize(objective, means: dict) -> dict:
    """The objective's reported metrics from the window's means (objectives without the hook keep them)."""
    summarize = getattr(objective, "summarize", None)
    return summarize(means) if summarize is not None and means else means


def _add_to_window(window: Window, loss_sum, metrics: dict, units: int, tokens: int) -> None:
    """A pass whose rows do not count (a process's empty share) adds zeros, so every process
    reports the same metric names."""
    if units:
        window.add_micro_batch(loss_sum, metrics, units, tokens)
    else:
        window.add_micro_batch(loss_sum * 0, {name: value * 0 for name, value in metrics.items()}, 0, 0)


def train_loop(model, train_rows, eval_rows, *, config, plan, optimizer_plan, max_steps: int,
               emit: Callable, stop=None, checkpoint_root=None, resume_from=None, objective=None,
               pad_id: int = 0, shifted: bool = True, ranks=None, evaluators=()) -> LoopOutcome:
    """Train ``model`` for ``max_steps`` optimizer steps; see the module docstring.

    ``resume_from`` (a checkpoint folder) restores weights, optimizer, scheduler, scaler,
    RNG states and the data position. ``objective`` defaults to supervised next-token
    loss (:class:`~ftmagic.engine.objectives.CausalLM` with ``pad_id`` and ``shifted``).
    ``ranks`` (:class:`~ftmagic.engine.distributed.Ranks`, several processes) splits each
    micro-batch across the processes, weighs every loss by the units of the whole step,
    sums what is logged and evaluated, agrees on Stop at logging steps and lets the first
    process write the checkpoints; ``emit`` is then that process's alone.
    ``evaluators`` run after each evaluation's loss pass (see the module docstring).
    """
    objective = objective or CausalLM(model, pad_id=pad_id, plan=plan, shifted=shifted)
    batches = Batches(train_rows, config.batch_size, config.seed)
    ga = config.grad_accum
    log_every = resolve_logging_steps(config.logging_steps, plan.device, max_steps)
    n_warmup = warmup_steps(config.warmup, max_steps)
    if resume_from is not None:
        ckpt.load_weights(resume_from, model)  # before any wrapping: FSDP shards the loaded weights
    params = [p for p in model.parameters() if p.requires_grad]

    def make_optimizer(trainable):
        return build_optimizer(optimizer_plan, trainable, lr=config.lr, weight_decay=config.weight_decay)

    if ranks is None:
        optimizer = make_optimizer(params)
        scaler = torch.amp.GradScaler(plan.device) if plan.use_grad_scaler else None
    else:
        optimizer, params = ranks.prepare(model, objective, make_optimizer, ga)
        scaler = ranks.grad_scaler(plan.device) if plan.use_grad_scaler else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, kind=config.scheduler, warmup_steps=n_warmup, total_steps=max_steps))

    # With early stopping, a CPU copy of the trainable weights at the best evaluation, restored
    # at the end (small for adapters; skipped above BEST_COPY_LIMIT elements, e.g. full 7B training,
    # and for sharded strategies, whose weights no single process holds).
    small = sum(p.numel() for p in params) <= BEST_COPY_LIMIT
    keep_best = bool(config.early_stopping_patience) and small and (ranks is None or not ranks.spec.shards)
    best_weights = None
    best_key = getattr(config, "best_metric", "eval_loss") or "eval_loss"
    higher = greater_is_better(best_key, getattr(evaluators[0], "metrics", None) if evaluators else None)
    evaluates = bool(eval_rows) or bool(evaluators)
    state = LoopState()
    if resume_from is not None:
        saved = ckpt.load_training_state(resume_from, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                         ranks=ranks)
        state = LoopState.from_json(saved)
        best_weights = ckpt.load_best(resume_from) if keep_best else None
        follow_schedule(optimizer, scheduler)
    # Where finite weights are, should the loss turn NaN: the newest checkpoint, else a copy of the start.
    last_finite = getattr(resume_from, "path", resume_from)
    on_meta = any(p.is_meta for p in params)  # a model without values (tests of the loop's device reads)
    initial_weights = ckpt.trainable_state(model) if last_finite is None and small and not on_meta else None
    check_every_step = config.on_nan == "skip"
    skipped_in_a_row = 0

    window = Window()
    started, start_step = time.perf_counter(), state.step
    peak, saved_at, last_saved, reason = 0, None, None, "finished"
    reduce = ranks.sum if ranks is not None else None

    def elapsed() -> float:
        return state.elapsed_s + (time.perf_counter() - started)

    def log() -> None:
        """Read the window from the device and report it (a no-op when no step ran since the last log)."""
        nonlocal peak
        if window.steps == 0:
            return
        read = window.read() if reduce is None else window.read(reduce=reduce)
        peak = max(peak, memory_bytes(plan.device) if ranks is None else int(ranks.max(memory_bytes(plan.device))))
        if read["loss"] is not None:
            state.train_loss = read["loss"]
        state.trained_tokens += read["tokens"]
        rate = (state.step - start_step) / (time.perf_counter() - started)
        event = Step(step=state.step, max_steps=max_steps, loss=read["loss"], lr=read["lr"],
                     epoch=round(state.step * ga / batches.per_epoch, 4), grad_norm=read["grad_norm"],
                     tokens=read["tokens"], tokens_per_s=read["tokens"] / read["seconds"] if read["seconds"] else None,
                     elapsed_s=elapsed(), eta_s=(max_steps - state.step) / rate if rate else None,
                     memory_bytes=peak, metrics=_summarize(objective, read["metrics"]))
        state.history.append(event.to_dict())
        emit(event)
        if read.get("nonfinite") or (read["loss"] is not None and not math.isfinite(read["loss"])):
            raise _NonFinite()

    def run_eval() -> None:
        loss, metrics = evaluate(model, eval_rows, batch_size=config.batch_size, plan=plan, objective=objective,
                                 with_metrics=True, ranks=ranks)
        for evaluator in evaluators:
            scores, events = evaluator(model, state.step, ranks=ranks)
            metrics = {**metrics, **scores}
            for extra in events:
                state.history.append(extra.to_dict())
                emit(extra)
        best = state.record_eval(state.step, loss, metrics, key=best_key, higher=higher)
        if best and keep_best:
            nonlocal best_weights
            best_weights = ckpt.trainable_state(model)
        event = Eval(step=state.step, eval_loss=loss, metrics=metrics)
        state.history.append(event.to_dict())
        emit(event)

    def save() -> Optional[str]:
        nonlocal saved_at, last_saved, last_finite
        if checkpoint_root is None or saved_at == state.step:
            return last_saved  # already written (a stop right after a periodic save)
        log()  # the saved history and train loss include every step up to this one
        broken = not weights_are_finite(params)
        if ranks is not None:
            broken = ranks.any(broken)  # a shard's NaN stops every process, not the one that holds it
        if broken:
            raise _NonFinite()  # never saved: the last finite checkpoint stays the newest
        epoch, index = batches.position(state.step * ga)
        values = dataclasses.replace(state, elapsed_s=elapsed()).to_json(epoch=epoch, batch_index=index,
                                                                          order_seed=config.seed)
        parts = dict(step=state.step, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                     state=values, keep=config.save_total_limit, best=best_weights)
        # A Ctrl-C during the write waits for it to end: the stop it asks for then keeps this
        # checkpoint. Cut short, the write would leave none of this step, while the step counted
        # as saved, so the stop would write none either.
        with interrupts_deferred():
            path = (ckpt.save_checkpoint(checkpoint_root, **parts) if ranks is None
                    else ckpt.save_distributed(checkpoint_root, ranks=ranks, **parts))
            saved_at = state.step
            last_saved = last_finite = str(path)
            emit(Checkpoint(step=state.step, path=str(path)))
        return last_saved

    def restore_last_finite() -> None:
        """Put back the weights of the last checkpoint written (or those the run started from)."""
        nonlocal state
        history, seen_at = state.history, state.step
        if ranks is not None and ranks.spec.shards:
            # No process holds the whole model to put the checkpoint's weights back into.
            raise TrainingError(f"the loss or gradients became NaN or infinite by step {seen_at} (`lr: {config.lr}` "
                                "may be too high); nothing after the last checkpoint was saved; lower `lr` and "
                                "resume from it with `resume: true`")
        if last_finite is not None:
            ckpt.load_weights(last_finite, model)  # DDP's replicas share these parameters
            saved = ckpt.load_training_state(last_finite, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                             ranks=ranks)
            state = LoopState.from_json(saved)
            kept = f"the weights of step {state.step} (checkpoint {Path(str(last_finite)).name})"
        elif initial_weights is not None:
            current = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in initial_weights.items():
                    current[name].copy_(tensor.to(current[name].device, current[name].dtype))
            state, kept = LoopState(), "the weights it started from"
        else:
            raise TrainingError(f"the loss or gradients became NaN or infinite by step {seen_at} (`lr: {config.lr}` may "
                                "be too high) before any checkpoint was written, so no finite weights are left to "
                                "save; lower `lr`, or set `save_steps` so a checkpoint can be kept")
        state.history = history
        emit(Message(f"the loss or gradients became NaN or infinite by step {seen_at} (`lr: {config.lr}` may be too "
                     f"high); the run stopped and kept {kept}; lower `lr`, or set `on_nan: skip` to skip "
                     "such steps", "warning"))

    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    if evaluators and state.step == 0:
        run_eval()  # the base model's answers and scores: where the curve starts
    step_rng = None  # the RNG states at the start of an unfinished step (an interrupt puts them back)
    try:
        while state.step < max_steps:
            if ranks is None:  # several processes stop through a Stop at a step's end, never mid-step
                step_rng = ckpt.rng_state()  # dropout draws from here on belong to this step
            # Forward and backward of every micro-batch of this step, weighted by its share of the units.
            rows = [batches.get(k) for k in range(state.step * ga, state.step * ga + ga)]
            if ranks is None:
                micro = [objective.batch(r) for r in rows]
                units = [objective.units(b) for b in micro]
                factor = sum(units)  # the loss of a step is the sum over its units divided by their number
            else:
                shares = [ranks.shard(r) for r in rows]
                micro = [objective.batch(mine) for mine, _ in shares]
                units = [objective.units(b) if counts else 0 for b, (_, counts) in zip(micro, shares)]
                factor = ranks.loss_factor(sum(units))  # world / units of the step on every process
            parts = []
            for i, (batch, n) in enumerate(zip(micro, units)):
                if ranks is None:
                    if n == 0:
                        continue
                    with objective.context(model):
                        with autocast_for(plan):
                            loss_sum, metrics = objective.loss(model, batch)
                        scaled = loss_sum / factor
                        (scaler.scale(scaled) if scaler else scaled).backward()
                    parts.append((loss_sum, metrics, n, objective.tokens(batch)))
                    continue
                # Every process runs every micro-batch (an empty share with zero weight): each
                # pass enters the collectives the other processes enter.
                last = i == ga - 1
                with ranks.sync_context(last), objective.context(model):
                    with autocast_for(plan):
                        loss_sum, metrics = ranks.forward(batch)
                    ranks.backward(loss_sum * factor if n else loss_sum * 0, scaler, last)
                parts.append((loss_sum, metrics, n, objective.tokens(batch) if n else 0))
            lr = scheduler.get_last_lr()[0]  # the rate this step applies
            if check_every_step and parts:
                bad = not step_is_finite([p[0] for p in parts], params, scaler)
                if ranks is not None:
                    bad = ranks.any(bad)  # every process skips the same steps
                if bad:
                    # `on_nan: skip`: no update from this step; the data and the schedule move on.
                    with interrupts_deferred():
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                        state.step += 1
                        state.skipped_steps += 1
                        step_rng = None
                    skipped_in_a_row += 1
                    emit(Message(f"step {state.step}: the loss or gradients are NaN or infinite; its update was "
                                 f"skipped ({state.skipped_steps} so far)", "warning"))
                    if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                        raise _NonFinite()
                    continue
            skipped_in_a_row = 0
            step_fn = optimizer_step if ranks is None else ranks.optimizer_step
            with interrupts_deferred():  # the weights, the schedule, the count and the logged losses move together
                for part in parts:
                    _add_to_window(window, *part)
                grad_norm = step_fn(optimizer, scheduler, params, scaler=scaler, max_grad_norm=config.max_grad_norm)
                state.step += 1
                step_rng = None
                flag = nonfinite_flag([p[0] for p in parts], grad_norm, scaler) if parts and not check_every_step else None
                window.add_step(grad_norm, lr, flag)
            logged = state.step % log_every == 0 or state.step == max_steps
            if logged:
                log()

            if evaluates and config.eval_steps and state.step % config.eval_steps == 0 and state.step < max_steps:
                log()
                run_eval()
                if config.early_stopping_patience and state.bad_evals >= config.early_stopping_patience:
                    reason = "early_stopping"
            if config.save_steps and state.step % config.save_steps == 0:
                save()
            if reason == "early_stopping":
                break
            stopping = stop is not None and stop.is_set()
            if ranks is not None:
                # Processes see a Stop at different moments; they agree on it when they log.
                stopping = logged and ranks.any(stopping)
            if stopping:
                reason = "stopped"
                break
    except KeyboardInterrupt:
        if ranks is not None:
            raise  # one process alone cannot stop the others mid-step; its launcher ends them all
        reason = "interrupted"
        optimizer.zero_grad(set_to_none=True)
        if step_rng is not None:  # interrupted mid-step: a resume redraws this step's dropout from the same states
            ckpt.set_rng_state(step_rng)
    except _NonFinite:
        reason = "nonfinite"

    if reason != "nonfinite":
        try:
            log()  # the steps since the last log (a stop or an early end leaves a partial window)
            if state.step > 0 and (reason != "finished" or config.save_steps):
                # A stopped run must be resumable; a finished one too, so `resume: true` with a
                # larger max_steps continues from the end instead of the last periodic save.
                save()
        except _NonFinite:
            reason = "nonfinite"
    if reason == "nonfinite":
        optimizer.zero_grad(set_to_none=True)
        try:
            restore_last_finite()
        except TrainingError as error:
            error.agreed = ranks is not None  # every process read the same summed loss: the run's error
            raise
    elif reason == "finished" and evaluates:
        run_eval()  # the end-of-run evaluation (periodic ones skip the last step to avoid doing it twice)
    if reason == "early_stopping" and state.best_step is not None and state.best_step != state.step:
        _keep_best_weights(model, state, best_weights, emit, best_key)
    return LoopOutcome(reason=reason, step=state.step, train_loss=state.train_loss, eval_loss=state.eval_loss,
                       best_eval_loss=_lowest_eval_loss(state), trained_tokens=state.trained_tokens, runtime_s=elapsed(),
                       peak_memory_bytes=peak, history=state.history, last_checkpoint=last_saved,
                       eval_metrics=state.eval_metrics, skipped_steps=state.skipped_steps,
                       best={"metric": best_key, "value": state.best_eval, "step": state.best_step}
                       if state.best_step is not None else {})


def _lowest_eval_loss(state: LoopState) -> Optional[float]:
    losses = [e["eval_loss"] for e in state.history if e.get("event") == "eval" and e.get("eval_loss") is not None]
    return min(losses) if losses else None


def _keep_best_weights(model, state: LoopState, best_weights: Optional[dict], emit: Callable,
                       key: str = "eval_loss") -> None:
    """Early stopping ends with the weights of the best evaluation, not the ones that stopped improving."""
    label = "eval loss" if key == "eval_loss" else key
    if best_weights is None:
        emit(Message(f"early stopping: the saved weights are those of step {state.step}; the best {label} was at "
                     f"step {state.best_step} (its checkpoint, if kept, is in checkpoints/)"))
        return
    current = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in best_weights.items():
            current[name].copy_(tensor.to(current[name].device, current[name].dtype))
    state.eval_loss = state.best_values.get("eval_loss", state.best_eval if key == "eval_loss" else None)
    state.eval_metrics = {k: v for k, v in state.best_values.items() if k != "eval_loss"}
    emit(Message(f"early stopping: kept the weights of step {state.best_step} (best {label} {state.best_eval:.4f})"))

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
* ``evaluators`` - what else an evaluation measures (answers generated and scored,
  :mod:`ftmagic.engine.generation`): each is called after :func:`evaluate` as
  ``evaluator(model, step) -> (metrics, events)``; its metrics join the ``eval`` event's and
  can be the ``best_metric`` that early stopping and the kept weights follow. With
  evaluators, the base model is evaluated once at step 0, before training.

Progress is reported only through ``emit(event)`` with the typed records of :mod:`ftmagic.events`.

Example::

    outcome = train_loop(model, rows, eval_rows, config=cfg, plan=device_plan,
                         optimizer_plan=opt_plan, pad_id=tok.pad_token_id,
                         max_steps=100, emit=print, stop=None, checkpoint_root="out/checkpoints")
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ftmagic.engine import checkpoint as ckpt
from ftmagic.engine.device import build_optimizer
from ftmagic.engine.objectives import CausalLM
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
    best_values: dict = field(default_factory=dict)

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

    def add_step(self, grad_norm, lr: float) -> None:
        self.steps += 1
        self.lr = lr
        if grad_norm is not None:
            self.grad_norm_sum = self._add(self.grad_norm_sum, grad_norm.detach().float())
            self.counted_steps += 1

    def read(self) -> dict:
        """Means over the window (one device sync), its tokens and seconds; then a new window."""
        now = time.perf_counter()
        out = {"loss": float(self.loss_sum) / self.units if self.loss_sum is not None and self.units else None,
               "metrics": {k: float(v) / self.units for k, v in self.metric_sums.items()} if self.units else {},
               "grad_norm": (float(self.grad_norm_sum) / self.counted_steps if self.grad_norm_sum is not None
                             else None),
               "tokens": self.tokens, "steps": self.steps, "seconds": now - self.started, "lr": self.lr}
        self._clear()
        return out


def optimizer_step(optimizer, scheduler, params, *, scaler=None, max_grad_norm: float = 1.0):
    """Unscale (fp16), clip, step, advance the schedule and zero the gradients.

    Returns the gradient norm before clipping as a device tensor (read later, with the loss).
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, limit) if params else None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def evaluate(model, rows, *, batch_size: int, plan, objective=None, pad_id: int = 0, shifted: bool = True,
             with_metrics: bool = False):
    """Mean loss per unit over ``rows`` (no dropout, no gradients, RNG untouched).

    With ``with_metrics`` returns ``(loss, {metric: mean})`` for objectives that report more.
    """
    objective = objective or CausalLM(model, pad_id=pad_id, plan=plan, shifted=shifted)
    if not rows:
        return (None, {}) if with_metrics else None
    was_training = model.training
    model.eval()
    window = Window()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = objective.batch(rows[start:start + batch_size])
            units = objective.units(batch)
            if units == 0:
                continue
            with objective.context(model), _autocast(plan):
                loss_sum, metrics = objective.loss(model, batch)
            window.add_micro_batch(loss_sum, metrics, units, objective.tokens(batch))
    model.train(was_training)
    result = window.read()
    return (result["loss"], result["metrics"]) if with_metrics else result["loss"]


def _autocast(plan):
    if not plan.autocast:
        return nullcontext()
    return torch.autocast(device_type=plan.device, dtype=plan.torch_dtype)


def train_loop(model, train_rows, eval_rows, *, config, plan, optimizer_plan, max_steps: int,
               emit: Callable, stop=None, checkpoint_root=None, resume_from=None, objective=None,
               pad_id: int = 0, shifted: bool = True, evaluators=()) -> LoopOutcome:
    """Train ``model`` for ``max_steps`` optimizer steps; see the module docstring.

    ``resume_from`` (a checkpoint folder) restores weights, optimizer, scheduler, scaler,
    RNG states and the data position. ``objective`` defaults to supervised next-token
    loss (:class:`~ftmagic.engine.objectives.CausalLM` with ``pad_id`` and ``shifted``).
    ``evaluators`` run after each evaluation's loss pass (see the module docstring).
    """
    objective = objective or CausalLM(model, pad_id=pad_id, plan=plan, shifted=shifted)
    batches = Batches(train_rows, config.batch_size, config.seed)
    ga = config.grad_accum
    log_every = resolve_logging_steps(config.logging_steps, plan.device, max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(optimizer_plan, params, lr=config.lr, weight_decay=config.weight_decay)
    n_warmup = warmup_steps(config.warmup, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, kind=config.scheduler, warmup_steps=n_warmup, total_steps=max_steps))
    scaler = torch.amp.GradScaler(plan.device) if plan.use_grad_scaler else None

    # With early stopping, a CPU copy of the trainable weights at the best evaluation, restored
    # at the end (small for adapters; skipped above BEST_COPY_LIMIT elements, e.g. full 7B training).
    keep_best = bool(config.early_stopping_patience) and sum(p.numel() for p in params) <= BEST_COPY_LIMIT
    best_weights = None
    best_key = getattr(config, "best_metric", "eval_loss") or "eval_loss"
    higher = greater_is_better(best_key, getattr(evaluators[0], "metrics", None) if evaluators else None)
    evaluates = bool(eval_rows) or bool(evaluators)
    state = LoopState()
    if resume_from is not None:
        saved = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        state = LoopState.from_json(saved)
        best_weights = ckpt.load_best(resume_from) if keep_best else None

    window = Window()
    started, start_step = time.perf_counter(), state.step
    peak, saved_at, last_saved, reason = 0, None, None, "finished"

    def elapsed() -> float:
        return state.elapsed_s + (time.perf_counter() - started)

    def log() -> None:
        """Read the window from the device and report it (a no-op when no step ran since the last log)."""
        nonlocal peak
        if window.steps == 0:
            return
        read = window.read()
        peak = max(peak, memory_bytes(plan.device))
        if read["loss"] is not None:
            state.train_loss = read["loss"]
        rate = (state.step - start_step) / (time.perf_counter() - started)
        event = Step(step=state.step, max_steps=max_steps, loss=read["loss"], lr=read["lr"],
                     epoch=round(state.step * ga / batches.per_epoch, 4), grad_norm=read["grad_norm"],
                     tokens=read["tokens"], tokens_per_s=read["tokens"] / read["seconds"] if read["seconds"] else None,
                     elapsed_s=elapsed(), eta_s=(max_steps - state.step) / rate if rate else None,
                     memory_bytes=peak, metrics=read["metrics"])
        state.history.append(event.to_dict())
        emit(event)

    def run_eval() -> None:
        loss, metrics = evaluate(model, eval_rows, batch_size=config.batch_size, plan=plan, objective=objective,
                                 with_metrics=True)
        for evaluator in evaluators:
            scores, events = evaluator(model, state.step)
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
        nonlocal saved_at, last_saved
        if checkpoint_root is None or saved_at == state.step:
            return last_saved  # already written (a stop right after a periodic save)
        log()  # the saved history and train loss include every step up to this one
        saved_at = state.step
        epoch, index = batches.position(state.step * ga)
        values = dataclasses.replace(state, elapsed_s=elapsed()).to_json(epoch=epoch, batch_index=index,
                                                                          order_seed=config.seed)
        path = ckpt.save_checkpoint(checkpoint_root, step=state.step, model=model, optimizer=optimizer,
                                    scheduler=scheduler, scaler=scaler, state=values, keep=config.save_total_limit,
                                    best=best_weights)
        emit(Checkpoint(step=state.step, path=str(path)))
        last_saved = str(path)
        return last_saved

    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    if evaluators and state.step == 0:
        run_eval()  # the base model's answers and scores: where the curve starts
    try:
        while state.step < max_steps:
            # Forward and backward of every micro-batch of this step, weighted by its share of the units.
            micro = [objective.batch(batches.get(k)) for k in range(state.step * ga, state.step * ga + ga)]
            units = [objective.units(b) for b in micro]
            total = sum(units)
            for batch, n in zip(micro, units):
                if n == 0:
                    continue
                with objective.context(model):
                    with _autocast(plan):
                        loss_sum, metrics = objective.loss(model, batch)
                    scaled = loss_sum / total
                    (scaler.scale(scaled) if scaler else scaled).backward()
                window.add_micro_batch(loss_sum, metrics, n, objective.tokens(batch))
            lr = scheduler.get_last_lr()[0]  # the rate this step applies
            grad_norm = optimizer_step(optimizer, scheduler, params, scaler=scaler,
                                       max_grad_norm=config.max_grad_norm)
            state.step += 1
            state.trained_tokens += sum(objective.tokens(b) for b in micro)
            window.add_step(grad_norm, lr)
            if state.step % log_every == 0 or state.step == max_steps:
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
            if stop is not None and stop.is_set():
                reason = "stopped"
                break
    except KeyboardInterrupt:
        reason = "interrupted"
        optimizer.zero_grad(set_to_none=True)

    log()  # the steps since the last log (a stop or an early end leaves a partial window)
    if state.step > 0 and (reason != "finished" or config.save_steps):
        # A stopped run must be resumable; a finished one too, so `resume: true` with a
        # larger max_steps continues from the end instead of the last periodic save.
        save()
    if reason == "finished" and evaluates:
        run_eval()  # the end-of-run evaluation (periodic ones skip the last step to avoid doing it twice)
    if reason == "early_stopping" and state.best_step is not None and state.best_step != state.step:
        _keep_best_weights(model, state, best_weights, emit, best_key)
    return LoopOutcome(reason=reason, step=state.step, train_loss=state.train_loss, eval_loss=state.eval_loss,
                       best_eval_loss=_lowest_eval_loss(state), trained_tokens=state.trained_tokens, runtime_s=elapsed(),
                       peak_memory_bytes=peak, history=state.history, last_checkpoint=last_saved,
                       eval_metrics=state.eval_metrics,
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

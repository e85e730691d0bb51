"""The training loop: one function you can read top to bottom.

Data order is a pure function of ``(seed, epoch)``: micro-batch ``k`` of the run is
batch ``k % batches_per_epoch`` of epoch ``k // batches_per_epoch``, and optimizer
step ``s`` consumes micro-batches ``s*grad_accum .. s*grad_accum+grad_accum-1``. The
data position of a checkpoint is therefore just its step, which makes resume exact.

The loss of one optimizer step is the mean over every trained token of all its
micro-batches (not a mean of per-batch means), so gradient accumulation gives the same
update as one large batch.

Causal LMs take the fast step of :mod:`ftmagic.engine.fastpath`: each micro-batch is
flattened into one unpadded row whose examples attend only to themselves, and only
labelled positions go through the output layer. Prompt learning and models with unusual
heads run the model's own forward on padded batches (block-diagonal masks for packed rows).

Progress is reported only through ``emit(dict)`` (see the events in the package plan).

Example::

    outcome = train_loop(model, rows, eval_rows, config=cfg, plan=device_plan,
                         optimizer_plan=opt_plan, pad_id=tok.pad_token_id,
                         max_steps=100, emit=print, stop=None, checkpoint_root="out/checkpoints")
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ftmagic.engine import checkpoint as ckpt
from ftmagic.engine.collate import collate, count_targets
from ftmagic.engine.device import build_optimizer
from ftmagic.engine.fastpath import fast_loss, fast_step, flatten_batch, supports_fast_path


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


def memory_bytes(device: str) -> int:
    """Peak CUDA memory allocated, else this process's resident memory."""
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


class _Batches:
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


def evaluate(model, rows, *, batch_size: int, pad_id: int, plan, shifted: bool = True) -> Optional[float]:
    """Token-weighted mean loss over ``rows`` (no dropout, no gradients, RNG untouched)."""
    if not rows:
        return None
    was_training = model.training
    model.eval()
    fast = supports_fast_path(model)
    total, tokens = 0.0, 0
    with torch.no_grad(), _attention(model, fast):
        for start in range(0, len(rows), batch_size):
            batch = make_batch(rows[start:start + batch_size], pad_id, plan, fast)
            n = count_targets(batch["labels"], shifted)
            if n == 0:
                continue
            with _autocast(plan):
                loss = _mean_loss(model, batch, plan, fast, n)
            total += float(loss) * n
            tokens += n
    model.train(was_training)
    return total / tokens if tokens else None


def make_batch(rows, pad_id: int, plan, fast: bool) -> dict:
    """One unpadded row for the fast path (:mod:`ftmagic.engine.fastpath`), else a padded batch."""
    return flatten_batch(rows) if fast else collate(rows, pad_id, plan.torch_dtype)


def _attention(model, fast: bool):
    # Per-example attention for flattened rows and fused LoRA projections; forward, backward and
    # checkpoint recomputation run inside.
    return fast_step(model) if fast else nullcontext()


def _mean_loss(model, batch: dict, plan, fast: bool, n: int):
    """Mean next-token loss over the ``n`` trained tokens of ``batch``."""
    if fast:
        # Only labelled positions reach the output layer, in chunks: no full [tokens, vocab] logits.
        return fast_loss(model, _to(batch, plan.device), reduction="sum") / n
    # No KV cache in training: it would only hold memory until the step ends.
    return model(**_to(batch, plan.device), use_cache=False).loss


def _autocast(plan):
    if not plan.autocast:
        return nullcontext()
    return torch.autocast(device_type=plan.device, dtype=plan.torch_dtype)


def _to(batch: dict, device: str) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def train_loop(model, train_rows, eval_rows, *, config, plan, optimizer_plan, pad_id: int, max_steps: int,
               emit: Callable[[dict], None], stop=None, checkpoint_root=None, resume_from=None,
               shifted: bool = True) -> LoopOutcome:
    """Train ``model`` for ``max_steps`` optimizer steps; see the module docstring.

    ``resume_from`` (a checkpoint folder) restores weights, optimizer, scheduler,
    scaler, RNG states and the data position. ``shifted`` is False for prompt-learning
    methods, whose first real token is also a target (predicted from a virtual token).
    """
    batches = _Batches(train_rows, config.batch_size, config.seed)
    fast = supports_fast_path(model)
    ga = config.grad_accum
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(optimizer_plan, params, lr=config.lr, weight_decay=config.weight_decay)
    n_warmup = warmup_steps(config.warmup, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, kind=config.scheduler, warmup_steps=n_warmup, total_steps=max_steps))
    scaler = torch.amp.GradScaler(plan.device) if plan.use_grad_scaler else None

    step, trained_tokens, best_eval, bad_evals, history = 0, 0, None, 0, []
    elapsed_before, last_eval, last_loss = 0.0, None, None
    # With early stopping, a CPU copy of the trainable weights at the best evaluation, restored
    # at the end (small for adapters; skipped above BEST_COPY_LIMIT elements, e.g. full 7B training).
    keep_best = bool(config.early_stopping_patience) and sum(p.numel() for p in params) <= BEST_COPY_LIMIT
    best_weights, best_step = None, None
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        step, trained_tokens = state["step"], state["trained_tokens"]
        best_eval, bad_evals, history = state["best_eval"], state["bad_evals"], state["history"]
        elapsed_before, last_eval, last_loss = state["elapsed_s"], state.get("eval_loss"), state.get("train_loss")
        best_step = state.get("best_step")
        best_weights = ckpt.load_best(resume_from) if keep_best else None

    def save() -> Optional[str]:
        nonlocal saved_at
        if checkpoint_root is None or saved_at == step:
            return last_saved  # already written (a stop right after a periodic save)
        saved_at = step
        epoch, index = batches.position(step * ga)
        state = {"step": step, "epoch": epoch, "batch_index": index, "order_seed": config.seed,
                 "trained_tokens": trained_tokens, "best_eval": best_eval, "bad_evals": bad_evals,
                 "history": history, "elapsed_s": elapsed_before + (time.perf_counter() - started),
                 "eval_loss": last_eval, "train_loss": last_loss, "best_step": best_step}
        path = ckpt.save_checkpoint(checkpoint_root, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                                    scaler=scaler, state=state, keep=config.save_total_limit, best=best_weights)
        emit({"event": "checkpoint", "step": step, "path": str(path)})
        return str(path)

    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    started = time.perf_counter()
    start_step, reason, last_saved, peak, saved_at = step, "finished", None, 0, None
    try:
        while step < max_steps:
            tick = time.perf_counter()
            micro = [make_batch(batches.get(k), pad_id, plan, fast) for k in range(step * ga, step * ga + ga)]
            counts = [count_targets(b["labels"], shifted) for b in micro]
            window = sum(counts)
            step_loss = 0.0
            for batch, n in zip(micro, counts):
                if n == 0:
                    continue
                with _attention(model, fast):
                    with _autocast(plan):
                        loss = _mean_loss(model, batch, plan, fast, n)
                    # Weight each micro-batch by its share of the window's trained tokens.
                    scaled = loss * (n / window)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                step_loss = step_loss + loss.detach() * (n / window)  # stays on the device: no sync per micro-batch
            step_loss = float(step_loss)
            if scaler:
                scaler.unscale_(optimizer)
            limit = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit)) if params else 0.0
            lr = scheduler.get_last_lr()[0]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            trained_tokens += window
            last_loss = step_loss if window else last_loss
            now = time.perf_counter()
            done = now - started
            rate = (step - start_step) / done if done > 0 else 0.0
            peak = max(peak, memory_bytes(plan.device))
            event = {"event": "step", "step": step, "max_steps": max_steps,
                     "epoch": round((step * ga) / batches.per_epoch, 4), "loss": step_loss if window else None,
                     "lr": lr, "grad_norm": grad_norm, "tokens": window,
                     "tokens_per_s": window / (now - tick) if now > tick else 0.0,
                     "elapsed_s": elapsed_before + done, "eta_s": (max_steps - step) / rate if rate else None,
                     "memory_bytes": peak}
            history.append(event)
            if step % config.logging_steps == 0 or step == max_steps:
                emit(event)

            if eval_rows and config.eval_steps and step % config.eval_steps == 0 and step < max_steps:
                last_eval = evaluate(model, eval_rows, batch_size=config.batch_size, pad_id=pad_id, plan=plan,
                                     shifted=shifted)
                ev = {"event": "eval", "step": step, "eval_loss": last_eval}
                history.append(ev)
                emit(ev)
                if last_eval is not None and (best_eval is None or last_eval < best_eval):
                    best_eval, bad_evals, best_step = last_eval, 0, step
                    if keep_best:
                        best_weights = ckpt.trainable_state(model)
                else:
                    bad_evals += 1
                if config.early_stopping_patience and bad_evals >= config.early_stopping_patience:
                    reason = "early_stopping"
            if config.save_steps and step % config.save_steps == 0:
                last_saved = save()
            if reason == "early_stopping":
                break
            if stop is not None and stop.is_set():
                reason = "stopped"
                break
    except KeyboardInterrupt:
        reason = "interrupted"
        optimizer.zero_grad(set_to_none=True)

    if step > 0 and (reason != "finished" or config.save_steps):
        # A stopped run must be resumable; a finished one too, so `resume: true` with a
        # larger max_steps continues from the end instead of the last periodic save.
        last_saved = save()
    if reason == "finished" and eval_rows:
        # The end-of-run evaluation (periodic ones skip the last step to avoid doing it twice).
        last_eval = evaluate(model, eval_rows, batch_size=config.batch_size, pad_id=pad_id, plan=plan, shifted=shifted)
        ev = {"event": "eval", "step": step, "eval_loss": last_eval}
        history.append(ev)
        emit(ev)
        if last_eval is not None and (best_eval is None or last_eval < best_eval):
            best_eval = last_eval
    if reason == "early_stopping" and best_step is not None and best_step != step:
        if best_weights is not None:
            # The run ends with the weights of its best evaluation, not the ones that stopped improving.
            current = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in best_weights.items():
                    current[name].copy_(tensor.to(current[name].device, current[name].dtype))
            last_eval = best_eval
            emit({"event": "message", "level": "info",
                  "text": f"early stopping: kept the weights of step {best_step} (best eval loss {best_eval:.4f})"})
        else:
            emit({"event": "message", "level": "info",
                  "text": f"early stopping: the saved weights are those of step {step}; the best eval loss was at "
                          f"step {best_step} (its checkpoint, if kept, is in checkpoints/)"})
    runtime = elapsed_before + (time.perf_counter() - started)
    return LoopOutcome(reason=reason, step=step, train_loss=last_loss, eval_loss=last_eval, best_eval_loss=best_eval,
                       trained_tokens=trained_tokens, runtime_s=runtime, peak_memory_bytes=peak, history=history,
                       last_checkpoint=last_saved)

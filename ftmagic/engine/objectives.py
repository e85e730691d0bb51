"""Training objectives: how a list of prepared rows becomes a batch and a loss.

The loop (:mod:`ftmagic.engine.loop`) knows nothing about what it optimises; it asks the
objective for four things:

* ``batch(rows)``: a batch on the CPU (building it never synchronises with the device);
* ``units(batch)``: how many loss units the batch holds (trained tokens for SFT), counted
  on the CPU, so micro-batches are weighted by their share of a step's units and gradient
  accumulation gives the same update as one large batch;
* ``context(model)``: what must surround forward and backward (per-example attention);
* ``loss(model, batch)``: ``(summed loss over the units, {metric: summed tensor})`` on the
  device; the loop divides by the units of the window and reads the values only when it
  logs, so no step waits for the device;
* ``summarize(means)``: the metrics to report from those means (a classifier turns its
  per-class counts into F1 scores here; most objectives return them as they are).

:class:`CausalLM` is supervised fine-tuning's next-token loss; :func:`build_objective`
makes the objective a config names (DPO and ORPO in :mod:`ftmagic.engine.preference`,
reward models and classifiers in :mod:`ftmagic.engine.heads`). Causal LMs take the fast
step of :mod:`ftmagic.engine.fastpath` (unpadded rows, only labelled positions through
the output layer); prompt learning and unusual heads run the model's own forward on
padded batches.

Example::

    objective = CausalLM(model, pad_id=tok.pad_token_id, plan=device_plan)
    batch = objective.batch(rows[:4])
    with objective.context(model):
        loss_sum, metrics = objective.loss(model, batch)
    (loss_sum / objective.units(batch)).backward()
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ftmagic.engine.collate import collate, count_targets
from ftmagic.engine.fastpath import fast_loss, fast_step, flatten_batch, supports_fast_path


def to_device(batch: dict, device: str) -> dict:
    """Move a batch's tensors to ``device`` (other values are kept)."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


class CausalLM:
    """Next-token cross-entropy over the trained tokens (supervised fine-tuning, ``objective: sft``).

    ``shifted`` is False for prompt tuning, whose first real token is also a target
    (predicted from a virtual token).
    """

    name = "sft"

    def __init__(self, model, *, pad_id: int, plan, shifted: bool = True):
        self.fast = supports_fast_path(model)
        self.pad_id, self.plan, self.shifted = pad_id, plan, shifted

    def batch(self, rows: list) -> dict:
        # One unpadded row for the fast path, else a padded batch (block-diagonal masks when packed).
        if self.fast:
            return flatten_batch(rows, multiple=self.plan.row_multiple, pad_id=self.pad_id)
        return collate(rows, self.pad_id, self.plan.torch_dtype)

    def units(self, batch: dict) -> int:
        return count_targets(batch["labels"], self.shifted)

    def tokens(self, batch: dict) -> int:
        """Trained tokens (what tokens/s counts)."""
        return self.units(batch)

    def context(self, model):
        # Per-example attention for flattened rows and fused LoRA projections; forward, backward and
        # checkpoint recomputation run inside.
        return fast_step(model) if self.fast else nullcontext()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        n = self.units(batch)  # counted on the CPU copy: no device sync
        batch = to_device(batch, self.plan.device)
        if self.fast:
            # Only labelled positions reach the output layer, in chunks: no full [tokens, vocab] logits.
            return fast_loss(model, batch, reduction="sum"), {}
        # No KV cache in training: it would only hold memory until the step ends. The model's
        # loss is the mean over its targets; times their count it is the sum the loop expects.
        return model(**batch, use_cache=False).loss * n, {}

    def summarize(self, means: dict) -> dict:
        return means


def build_objective(config, model, *, pad_id: int, plan, shifted: bool = True, reference=None, labels=None):
    """The objective ``config.objective`` names, for ``model`` on ``plan``'s device.

    ``reference`` is DPO's frozen copy of the starting model (None: the adapter switched
    off); ``labels`` the classifier's label names, in the order of its outputs.

    Example::

        objective = build_objective(cfg, model, pad_id=tok.pad_token_id, plan=device_plan)
    """
    name = getattr(config, "objective", "sft")
    if name == "sft":
        return CausalLM(model, pad_id=pad_id, plan=plan, shifted=shifted)
    if name == "dpo":
        from ftmagic.engine.preference import DPO

        return DPO(model, pad_id=pad_id, plan=plan, beta=config.beta, loss_type=config.dpo_loss, reference=reference)
    if name == "orpo":
        from ftmagic.engine.preference import ORPO

        return ORPO(model, pad_id=pad_id, plan=plan, lam=config.orpo_lambda)
    if name == "reward":
        from ftmagic.engine.heads import Reward

        return Reward(model, pad_id=pad_id, plan=plan)
    if name == "classify":
        from ftmagic.engine.heads import Classify

        return Classify(model, pad_id=pad_id, plan=plan, labels=list(labels or []))
    raise ValueError(f"unknown objective {name!r}")

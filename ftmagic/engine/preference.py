"""Preference objectives on pairs of sequences: DPO (sigmoid and IPO losses) and ORPO.

A micro-batch of pairs is one row (:func:`pair_batch`; padded only where a CPU builds a kernel
per matrix shape, by up to 63 tokens): the chosen sequences, then
the rejected ones, each attending only to itself (the SFT fast path's per-example
attention). The policy's log-probability of each completion is the sum over its labelled
tokens, computed without full logits (:func:`ftmagic.engine.logprobs.token_logprobs`);
the prompt positions never reach the output layer. Models the fast path does not cover
run their own forward on a padded batch.

DPO's reference is the model as it was before training: the base with the adapter switched
off for adapter methods (``peft``'s ``disable_adapter()``, no second copy in memory), the
adapter's starting weights swapped in for one that continues an earlier run's adapter
(:class:`StartingWeights`: an SFT stage stays in the reference), a frozen copy otherwise. It runs on the same flattened row without gradients, before the
policy's forward (so its temporaries never sit beside the policy's saved activations), and
its log-probabilities are kept with the rows after their first use: the reference never
changes, so later epochs and repeated evaluations do not run it again.

The losses follow TRL's ``DPOTrainer`` (``loss_type`` ``sigmoid`` and ``ipo``, IPO's log-ratios
averaged over each completion's tokens) and ``ORPOTrainer`` (average log-probabilities in
the odds ratio); ``tests/test_preference_oracle.py`` checks them against TRL within 1e-5.
One difference by design: ftmagic's ORPO NLL covers the chosen completion's tokens, as
the ORPO paper and ``train_on: completions`` do, where TRL's also trains on the prompt.

The metrics practitioners watch are summed per pair and read as means: ``reward_chosen``,
``reward_rejected`` (beta times the policy/reference log-ratio for DPO, lambda times the
average log-probability for ORPO), ``reward_margin`` and ``accuracy`` (the share of pairs
whose chosen reward is the higher).

Example::

    objective = DPO(model, pad_id=tok.pad_token_id, plan=device_plan, beta=0.1, loss_type="sigmoid")
    batch = objective.batch(rows[:4])           # rows: {"chosen": {...}, "rejected": {...}}
    with objective.context(model):
        loss_sum, metrics = objective.loss(model, batch)   # summed over the 4 pairs
"""

from __future__ import annotations

from bisect import bisect_right
from contextlib import ExitStack, contextmanager, nullcontext

import torch
import torch.nn.functional as F

from ftmagic.constants import IGNORE_INDEX
from ftmagic.engine.collate import collate
from ftmagic.engine.fastpath import _causal_lm, flatten_batch, sequence_ends, supports_fast_path, varlen_attention
from ftmagic.engine.logprobs import sequence_sums, token_logprobs


def to_device(batch: dict, device: str) -> dict:
    """Move a batch's tensors to ``device`` (other values are kept)."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def pair_sequences(rows: list) -> list:
    """The chosen sequences of ``rows``, then their rejected ones (TRL's order)."""
    return [row["chosen"] for row in rows] + [row["rejected"] for row in rows]


def pair_batch(rows: list, *, fast: bool, pad_id: int = 0, dtype=torch.float32, multiple: int = 1) -> dict:
    """A batch of preference rows: one flattened row (``fast``) or a padded batch, chosen first.

    Beside the model inputs it holds, computed on the CPU: ``pairs``; ``counts``, the
    labelled (completion) tokens of each sequence; ``last_index``, the last position of each
    sequence in the flattened row; and, flattened, ``label_sequence``, the sequence of each
    labelled position. ``rows`` is kept so reference log-probabilities can be stored with them.
    ``multiple`` rounds the flattened row and the output layer's chunks as
    :func:`~ftmagic.engine.fastpath.flatten_batch` does for SFT.

    Example::

        >>> rows = [{"chosen": {"input_ids": [5, 6, 7], "labels": [-100, -100, 7]},
        ...          "rejected": {"input_ids": [5, 6, 8, 9], "labels": [-100, -100, 8, 9]}}]
        >>> b = pair_batch(rows, fast=True)
        >>> b["counts"].tolist(), b["label_sequence"].tolist(), b["last_index"].tolist()
        ([1, 2], [0, 1, 1], [2, 6])
    """
    sequences = pair_sequences(rows)
    counts = [sum(1 for t in s["labels"][1:] if t != IGNORE_INDEX) for s in sequences]
    if fast:
        batch = flatten_batch(sequences, multiple=multiple, pad_id=pad_id)
        bounds = (0, *sequence_ends(batch, sequences))  # without the padding's segment, if any
        batch["label_sequence"] = torch.tensor([bisect_right(bounds, t) - 1 for t in batch["label_index"].tolist()],
                                               dtype=torch.long)
        batch["last_index"] = torch.tensor([b - 1 for b in bounds[1:]], dtype=torch.long)
    else:
        batch = collate(sequences, pad_id, dtype)
        batch["last_index"] = torch.tensor([len(s["input_ids"]) - 1 for s in sequences], dtype=torch.long)
    batch["counts"] = torch.tensor(counts, dtype=torch.long)
    batch["pairs"] = len(rows)
    batch["rows"] = rows
    return batch


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of each sequence's labelled tokens ``[sequences]`` (``batch`` on the device).

    A flattened batch (it has ``label_index``) must run inside :func:`varlen_attention`;
    only its labelled positions reach the output layer. A padded one runs the model's own
    forward and takes the log-softmax of its logits.
    """
    n = batch["counts"].shape[0]
    if "label_index" in batch:
        lm = _causal_lm(model)
        decoder = getattr(lm, lm.base_model_prefix)
        head = lm.get_output_embeddings()
        hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         seq_bounds=batch["seq_bounds"], use_cache=False).last_hidden_state
        rows = hidden[0].index_select(0, batch["label_index"])
        values = token_logprobs(rows, head.weight, batch["label_targets"], bias=head.bias,
                                multiple=batch.get("row_multiple", 1))
        return sequence_sums(values, batch["label_sequence"], n)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * mask).sum(-1)


class StartingWeights:
    """The trainable weights a run starts from (a CPU copy), swapped in for DPO's reference forward.

    A run that continues a saved adapter starts from base + that adapter, so switching the
    adapter off would compare against the base alone; this keeps the adapter's starting
    weights (a few MB) instead of a second copy of the model. Taken before a resume loads a
    checkpoint's weights, so a resumed run's reference is the same.
    """

    def __init__(self, model):
        self.saved = [(p, p.detach().to("cpu", copy=True)) for p in model.parameters() if p.requires_grad]

    @contextmanager
    def swapped(self, model):
        """``model`` with its starting weights, in eval mode (no dropout), as the reference; then as it was."""
        modes = [(m, m.training) for m in model.modules()]
        with torch.no_grad():
            current = [p.detach().clone() for p, _ in self.saved]
            for p, start in self.saved:
                p.copy_(start)
        model.eval()
        try:
            yield model
        finally:
            with torch.no_grad():
                for (p, _), now in zip(self.saved, current):
                    p.copy_(now)
            for module, training in modes:
                module.training = training


@contextmanager
def reference_model(model, reference=None):
    """The frozen starting model: ``reference`` when given (a copy, or :class:`StartingWeights` to swap into
    ``model``), else ``model`` with its adapter off."""
    if isinstance(reference, StartingWeights):
        with reference.swapped(model):
            yield model
        return
    if reference is not None:
        yield reference
        return
    with model.disable_adapter():
        yield model


class _Pairs:
    """What the preference objectives share: batches of pairs, their units and tokens, the attention context."""

    def __init__(self, model, *, pad_id: int, plan):
        self.fast = supports_fast_path(model)
        self.pad_id, self.plan = pad_id, plan

    def batch(self, rows: list) -> dict:
        return pair_batch(rows, fast=self.fast, pad_id=self.pad_id, dtype=self.plan.torch_dtype,
                          multiple=self.plan.row_multiple)

    def units(self, batch: dict) -> int:
        """Pairs whose two sides both have completion tokens (the data layer drops the others)."""
        return batch["pairs"]

    def tokens(self, batch: dict) -> int:
        """Completion tokens of both sides (what tokens/s counts)."""
        return int(batch["counts"].sum())

    def context(self, model):
        return varlen_attention(model) if self.fast else nullcontext()

    def summarize(self, means: dict) -> dict:
        return means


class DPO(_Pairs):
    """Direct preference optimisation (``objective: dpo``): ``loss_type`` ``sigmoid`` or ``ipo``.

    ``reference`` is a frozen copy of the starting model (full fine-tuning and other methods
    that change the base weights), :class:`StartingWeights` for an adapter that continues an
    earlier run's; None means ``model``'s adapter switched off.
    """

    name = "dpo"

    def __init__(self, model, *, pad_id: int, plan, beta: float = 0.1, loss_type: str = "sigmoid", reference=None):
        super().__init__(model, pad_id=pad_id, plan=plan)
        if loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"unknown DPO loss {loss_type!r}")
        self.beta, self.loss_type, self.reference = beta, loss_type, reference

    def reference_logprobs(self, model, batch: dict) -> torch.Tensor:
        """The reference's summed log-probabilities ``[2 * pairs]``, computed once per row and then kept."""
        rows = batch["rows"]
        if all("ref_logps" in row for row in rows):
            chosen = torch.stack([row["ref_logps"][0] for row in rows])
            rejected = torch.stack([row["ref_logps"][1] for row in rows])
            return torch.cat([chosen, rejected]).to(self.plan.device)
        with ExitStack() as stack, torch.no_grad():
            ref = stack.enter_context(reference_model(model, self.reference))
            if self.fast and ref is not model:  # a separate copy has its own attention setting
                stack.enter_context(varlen_attention(ref))
            values = sequence_logprobs(ref, batch).detach().float()
        n = len(rows)
        for i, row in enumerate(rows):
            row["ref_logps"] = (values[i], values[n + i])
        return values

    def loss(self, model, batch: dict) -> tuple:
        batch = to_device(batch, self.plan.device)
        # The reference first: its temporaries are freed before the policy's forward saves its activations.
        reference = self.reference_logprobs(model, batch)
        policy = sequence_logprobs(model, batch).float()
        return dpo_loss(policy, reference, batch["counts"].to(policy.device), beta=self.beta, loss_type=self.loss_type)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, *, beta: float,
             loss_type: str = "sigmoid") -> tuple:
    """``(summed loss over the pairs, summed metrics)`` from summed log-probabilities ``[chosen..., rejected...]``.

    ``counts`` is the number of completion tokens of each sequence (IPO averages over them).

    Example::

        >>> loss, m = dpo_loss(torch.tensor([-1., -3.]), torch.tensor([-2., -2.]), torch.tensor([1, 1]), beta=0.1)
        >>> round(float(loss), 4), float(m["accuracy"])
        (0.5981, 1.0)
    """
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:  # IPO on the log-ratios averaged over each completion's tokens (as TRL, with the IPO authors)
        n_chosen, n_rejected = counts.to(chosen.dtype).clamp(min=1).chunk(2)
        losses = (chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * beta)) ** 2
    return losses.sum(), reward_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Summed ``reward_chosen``, ``reward_rejected``, ``reward_margin`` and ``accuracy`` (chosen above rejected)."""
    return {"reward_chosen": chosen.sum(), "reward_rejected": rejected.sum(), "reward_margin": (chosen - rejected).sum(),
            "accuracy": (chosen > rejected).float().sum()}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2``."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPO(_Pairs):
    """Odds-ratio preference optimisation (``objective: orpo``): no reference model.

    Loss per micro-batch: the mean NLL of the chosen completions' tokens, minus
    ``lam`` times the mean of ``log sigmoid(log odds ratio)`` of the average log-probabilities.
    """

    name = "orpo"

    def __init__(self, model, *, pad_id: int, plan, lam: float = 0.1):
        super().__init__(model, pad_id=pad_id, plan=plan)
        self.lam = lam

    def loss(self, model, batch: dict) -> tuple:
        batch = to_device(batch, self.plan.device)
        policy = sequence_logprobs(model, batch).float()
        return orpo_loss(policy, batch["counts"].to(policy.device), lam=self.lam)


def orpo_loss(policy: torch.Tensor, counts: torch.Tensor, *, lam: float) -> tuple:
    """``(summed loss over the pairs, summed metrics)`` from summed completion log-probabilities.

    The NLL is the mean over the micro-batch's chosen tokens (as TRL's cross-entropy), so
    the summed loss carries it once per pair.
    """
    n = policy.shape[0] // 2
    chosen, rejected = policy.chunk(2)
    n_chosen, n_rejected = counts.to(policy.dtype).clamp(min=1).chunk(2)
    avg_chosen, avg_rejected = chosen / n_chosen, rejected / n_rejected
    log_odds = (avg_chosen - avg_rejected) - (log1mexp(avg_chosen) - log1mexp(avg_rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen.sum() / n_chosen.sum()
    metrics = reward_metrics(lam * avg_chosen.detach(), lam * avg_rejected.detach())
    metrics.update(nll=nll.detach() * n, log_odds=log_odds.detach().sum())
    return nll * n - lam * ratio.sum(), metrics

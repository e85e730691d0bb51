"""Objectives with a sequence-classification head: reward models and classifiers.

The model is a Hugging Face ``*ForSequenceClassification``: a decoder (Llama, Qwen, the
embedded ``tiny``) whose ``score`` layer reads the hidden state of each sequence's last
token, or an encoder (BERT-style) whose ``classifier`` reads its pooled output.

For decoders the fast path runs the decoder once on the micro-batch flattened into one
unpadded row (per-example attention, as SFT) and applies ``score`` to the last position of
each sequence only, known on the CPU; no position is guessed from pad ids. The row is
padded only where a CPU builds a kernel per matrix shape (bf16/fp16: up to 63 tokens, see
:attr:`~ftmagic.engine.device.DevicePlan.row_multiple`). Encoders run their own forward on
a padded batch.

* :class:`Reward` (``objective: reward``): one output; each pair's loss is
  ``-log sigmoid(r_chosen - r_rejected)`` (Bradley-Terry, as TRL's ``RewardTrainer``).
* :class:`Classify` (``objective: classify``): one output per label and cross-entropy;
  reports ``accuracy`` while training and, on evaluation, per-class F1 and macro F1.

Example::

    objective = Classify(model, pad_id=tok.pad_token_id, plan=device_plan, labels=["neg", "pos"])
    batch = objective.batch(rows)                 # rows: {"input_ids", "label"}
    with objective.context(model):
        loss_sum, metrics = objective.loss(model, batch)
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

from ftmagic.engine.fastpath import _REPLACEABLE, VARLEN, _causal_lm, flatten_batch, sequence_ends, varlen_attention
from ftmagic.engine.preference import _Pairs, reward_metrics, to_device


def head_module(model):
    """The classification head (``score`` on decoders, ``classifier`` on encoders) or None."""
    lm = _causal_lm(model)
    for name in ("score", "classifier"):
        head = getattr(lm, name, None)
        if head is not None:
            return head
    return None


def supports_pooled_fast_path(model) -> bool:
    """True for a decoder ``*ForSequenceClassification`` whose head reads the last token and whose
    attention can run per example (see :mod:`ftmagic.engine.fastpath`)."""
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None or not type(lm).__name__.endswith("ForSequenceClassification"):
        return False
    if getattr(lm, "score", None) is None or getattr(lm, getattr(lm, "base_model_prefix", ""), None) is None:
        return False
    return getattr(config, "_attn_implementation", None) in _REPLACEABLE + (VARLEN,)


def sequence_batch(sequences: list, *, fast: bool, pad_id: int = 0, multiple: int = 1) -> dict:
    """``sequences`` (``{"input_ids"}`` each) as one flattened row with the last position of each,
    or as a padded batch with an attention mask. ``multiple`` rounds the flattened row up as
    :func:`~ftmagic.engine.fastpath.flatten_batch` does.

    Example::

        >>> b = sequence_batch([{"input_ids": [4, 5, 6]}, {"input_ids": [7, 8]}], fast=True)
        >>> b["last_index"].tolist(), b["input_ids"].tolist()
        ([2, 4], [[4, 5, 6, 7, 8]])
    """
    if fast:
        rows = [{"input_ids": s["input_ids"], "labels": [-100] * len(s["input_ids"])} for s in sequences]
        batch = flatten_batch(rows, multiple=multiple, pad_id=pad_id)
        for key in ("labels", "label_index", "label_targets", "row_multiple"):
            batch.pop(key, None)
        batch["last_index"] = torch.tensor([b - 1 for b in sequence_ends(batch, sequences)], dtype=torch.long)
        return batch
    length = max(len(s["input_ids"]) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s["input_ids"])] = torch.tensor(s["input_ids"], dtype=torch.long)
        mask[i, :len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pooled_logits(model, batch: dict) -> torch.Tensor:
    """The head's outputs, one row per sequence ``[sequences, outputs]`` (``batch`` on the device)."""
    if "seq_bounds" in batch:
        lm = _causal_lm(model)
        decoder = getattr(lm, lm.base_model_prefix)
        hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         seq_bounds=batch["seq_bounds"], use_cache=False).last_hidden_state
        last = hidden[0].index_select(0, batch["last_index"])
        return lm.score(last)
    # A padded batch: the model's own pooling (the last non-pad token on decoders, [CLS] on encoders).
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def text_end_ids(tokenizer) -> set:
    """The ids a trained sequence can end with, so the head's pooled token: the tokenizer's closing
    special tokens (ftmagic's EOS on a decoder, see :func:`~ftmagic.data.pairs.special_tokens_around`) and EOS."""
    from ftmagic.data.pairs import special_tokens_around

    ends = set(special_tokens_around(tokenizer)[1])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ends.add(tokenizer.eos_token_id)
    return ends


def export_pad_id(pad_id: Optional[int], end_ids) -> Optional[int]:
    """The ``pad_token_id`` to save with a head's weights for plain transformers: ``None`` where the
    pad id is a token the head was trained to read.

    transformers' ``*ForSequenceClassification`` pools the last token that is not ``pad_token_id``.
    With pad == EOS (Llama 3 and Qwen2.5 base models, whose pad ftmagic sets to EOS) that skips the
    EOS training read and scores the token before it. With no pad id it pools the last token of a
    one-text batch (exactly the EOS) and refuses a batch of several rather than misread it.

    Example::

        >>> export_pad_id(2, {2}) is None     # pad is the EOS after each text: pool the last token
        True
        >>> export_pad_id(0, {2})             # a pad of its own never ends a text: kept for batches
        0
    """
    return None if pad_id in set(end_ids) else pad_id


@contextmanager
def pad_for_export(model, tokenizer, head: Optional[dict]):
    """``model.config.pad_token_id`` as :func:`export_pad_id` gives it while the model is saved, then as it was
    (the live model keeps its pad). Nothing changes for a model without a head.

    Example::

        with pad_for_export(merged, tokenizer, head):
            merged.save_pretrained(target)
    """
    config = getattr(model, "config", None)
    if head is None or config is None:
        yield
        return
    before = config.pad_token_id
    config.pad_token_id = export_pad_id(before, text_end_ids(tokenizer))
    try:
        yield
    finally:
        config.pad_token_id = before


class Reward(_Pairs):
    """A reward model (``objective: reward``): a one-output head trained on pairs (Bradley-Terry)."""

    name = "reward"

    def __init__(self, model, *, pad_id: int, plan):
        self.fast = supports_pooled_fast_path(model)
        self.pad_id, self.plan = pad_id, plan

    def batch(self, rows: list) -> dict:
        sequences = [row["chosen"] for row in rows] + [row["rejected"] for row in rows]
        batch = sequence_batch(sequences, fast=self.fast, pad_id=self.pad_id, multiple=self.plan.row_multiple)
        batch["counts"] = torch.tensor([len(s["input_ids"]) for s in sequences], dtype=torch.long)
        batch["pairs"] = len(rows)
        return batch

    def tokens(self, batch: dict) -> int:
        """Every token of both sequences feeds the score."""
        return int(batch["counts"].sum())

    def loss(self, model, batch: dict) -> tuple:
        batch = to_device({k: v for k, v in batch.items() if k != "counts"}, self.plan.device)
        scores = pooled_logits(model, batch).squeeze(-1).float()
        chosen, rejected = scores.chunk(2)
        return -F.logsigmoid(chosen - rejected).sum(), reward_metrics(chosen.detach(), rejected.detach())


class Classify:
    """A classifier (``objective: classify``): cross-entropy over ``labels`` on the pooled output."""

    name = "classify"

    def __init__(self, model, *, pad_id: int, plan, labels: list):
        self.fast = supports_pooled_fast_path(model)
        self.pad_id, self.plan, self.labels = pad_id, plan, [str(v) for v in labels]

    def batch(self, rows: list) -> dict:
        batch = sequence_batch(rows, fast=self.fast, pad_id=self.pad_id, multiple=self.plan.row_multiple)
        batch["targets"] = torch.tensor([row["label"] for row in rows], dtype=torch.long)
        batch["n_tokens"] = sum(len(row["input_ids"]) for row in rows)
        return batch

    def units(self, batch: dict) -> int:
        return int(batch["targets"].shape[0])

    def tokens(self, batch: dict) -> int:
        return batch["n_tokens"]

    def context(self, model):
        return varlen_attention(model) if self.fast else nullcontext()

    def loss(self, model, batch: dict) -> tuple:
        batch = to_device(batch, self.plan.device)
        logits = pooled_logits(model, batch).float()
        targets = batch["targets"]
        predicted = logits.argmax(-1)
        metrics = {"accuracy": (predicted == targets).float().sum()}
        if not model.training:  # evaluation: counts for per-class F1 (read once, at the end of the evaluation)
            for k, name in enumerate(self.labels):
                hit, said = targets == k, predicted == k
                metrics[f"tp/{name}"] = (hit & said).float().sum()
                metrics[f"fp/{name}"] = (~hit & said).float().sum()
                metrics[f"fn/{name}"] = (hit & ~said).float().sum()
        return F.cross_entropy(logits, targets, reduction="sum"), metrics

    def summarize(self, means: dict) -> dict:
        """Turn the evaluation's true/false positive counts into ``f1/<label>`` and ``macro_f1``."""
        return f1_scores(means, self.labels)


def f1_scores(means: dict, labels: list) -> dict:
    """``means`` with per-class counts (``tp/<label>``, ``fp/...``, ``fn/...``) replaced by F1 scores.

    The counts may be means per example: F1 is a ratio of them, so the scale cancels.

    Example::

        >>> f1_scores({"accuracy": 0.75, "tp/a": 0.5, "fp/a": 0.25, "fn/a": 0.0,
        ...            "tp/b": 0.25, "fp/b": 0.0, "fn/b": 0.25}, ["a", "b"])
        {'accuracy': 0.75, 'f1/a': 0.8, 'f1/b': 0.6667, 'macro_f1': 0.7333}
    """
    if not any(key.startswith("tp/") for key in means):
        return means
    out = {k: v for k, v in means.items() if not k.startswith(("tp/", "fp/", "fn/"))}
    scores = []
    for name in labels:
        tp, fp, fn = (means.get(f"{kind}/{name}", 0.0) for kind in ("tp", "fp", "fn"))
        score = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 0.0
        out[f"f1/{name}"] = round(score, 4)
        scores.append(score)
    out["macro_f1"] = round(sum(scores) / len(scores), 4) if scores else 0.0
    return out

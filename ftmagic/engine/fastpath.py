"""The fast training step: no compute on padding, no full logits.

Four pieces, used together by the training loop for causal LMs (adapters or full
fine-tuning, not prompt learning, which prepends virtual tokens):

* :func:`flatten_batch` turns a micro-batch of rows (packed or not) into ONE row with
  no padding at all, ``position_ids`` restarting at 0 for every example, and the
  example boundaries (``seq_bounds``);
* :func:`varlen_attention` (a context manager) makes the model's attention run causal
  SDPA on each example separately, so examples in one row never see each other and no
  ``[T, T]`` mask is built or multiplied (the work is ``sum(len_i**2)``, not ``T**2``);
* :func:`ftmagic.engine.fused_lora.fused_lora` runs each LoRA projection as one autograd
  node with a cheap dropout mask (:func:`fast_step` enters it with the attention);
* :func:`fast_loss` runs the decoder to its last hidden states and applies the output
  layer only to positions that carry a label, chunk by chunk
  (:func:`ftmagic.engine.losses.causal_lm_loss`).

Example::

    from ftmagic.engine.fastpath import fast_loss, fast_step, flatten_batch, supports_fast_path
    if supports_fast_path(model):
        with fast_step(model):
            batch = flatten_batch(rows)
            loss_sum = fast_loss(model, batch, reduction="sum")
            loss_sum.backward()
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ftmagic.constants import IGNORE_INDEX
from ftmagic.engine.fused_lora import fused_lora
from ftmagic.engine.losses import causal_lm_loss, labelled_cross_entropy_sum

VARLEN = "ftmagic_varlen"
# Attention kinds whose per-example replacement gives the same result (eager and SDPA are
# both plain softmax attention; flash/flex kernels already handle packed rows themselves).
_REPLACEABLE = ("sdpa", "eager")


def _segments(row: dict) -> list[int]:
    lens = row.get("seq_lens")
    if lens:
        return list(lens)
    pos = row.get("position_ids")
    if pos:
        starts = [i for i, p in enumerate(pos) if p == 0] or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        return [b - a for a, b in zip(starts, starts[1:] + [len(pos)])]
    return [len(row["input_ids"])]


def flatten_batch(rows: list) -> dict:
    """One unpadded row from ``rows``: ``input_ids``, ``labels``, ``position_ids`` ``[1, T]`` and ``seq_bounds``.

    ``seq_bounds`` is the tuple of example boundaries ``(0, len_0, len_0 + len_1, ..., T)``. The first
    label of every example is -100 (it is never predicted from the previous example).
    ``label_index`` holds the positions whose next token is trained and ``label_targets``
    those tokens, found here on the CPU: selecting them on a GPU with a boolean mask would
    make every step wait for the device.

    Example::

        >>> b = flatten_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
        >>> b["position_ids"].tolist(), b["labels"].tolist(), b["seq_bounds"]
        ([[0, 1, 2, 0, 1]], [[-100, 6, 7, -100, 9]], (0, 3, 5))
    """
    ids, labels, positions, bounds = [], [], [], [0]
    for row in rows:
        start = 0
        for n in _segments(row):
            if n <= 0:
                continue
            ids.extend(row["input_ids"][start:start + n])
            labels.append(IGNORE_INDEX)
            labels.extend(row["labels"][start + 1:start + n])
            positions.extend(range(n))
            bounds.append(bounds[-1] + n)
            start += n
    index = [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long), "seq_bounds": tuple(bounds),
            "label_index": torch.tensor(index, dtype=torch.long),
            "label_targets": torch.tensor([labels[t + 1] for t in index], dtype=torch.long)}


def _varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling=None, **kwargs):
    """Causal SDPA on each ``seq_bounds`` segment of a single flattened row; plain SDPA otherwise."""
    bounds = kwargs.pop("seq_bounds", None)
    if bounds is None or query.shape[0] != 1 or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # Grouped-query attention inside the kernel: no expanded copies of key and value (a third
    # less attention time on CPU than repeating the heads first, the same result).
    gqa = query.shape[1] != key.shape[1]
    parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                            scale=scaling, is_causal=True, enable_gqa=gqa)
             for a, b in zip(bounds[:-1], bounds[1:])]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, _varlen_attention_forward)


def _causal_lm(model):
    """The ``*ForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_fast_path(model) -> bool:
    """True for a causal LM whose loss is ``cross_entropy(lm_head(decoder(x)))`` and whose attention is replaceable.

    Prompt learning (virtual tokens), soft-capped or scaled logits, and non-linear or
    quantized heads keep the model's own forward.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    decoder = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if config is None or decoder is None or type(head) is not torch.nn.Linear:
        return False
    if not type(lm).__name__.endswith("ForCausalLM"):
        return False
    for attr in ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return False
    return getattr(config, "_attn_implementation", None) in _REPLACEABLE + (VARLEN,)


@contextmanager
def fast_step(model):
    """The step's context: :func:`varlen_attention`, and LoRA projections as one node each
    (:func:`ftmagic.engine.fused_lora.fused_lora`). Forward and backward run inside."""
    with varlen_attention(model), fused_lora(model):
        yield


@contextmanager
def varlen_attention(model):
    """Within the block, a flattened row's examples attend only to themselves (see module docstring).

    Forward and backward (and gradient-checkpointing recomputation) of a step must both
    run inside. The model's attention setting is restored on exit.
    """
    config = _causal_lm(model).config
    before = config._attn_implementation
    if before not in _REPLACEABLE:
        yield
        return
    _register()
    config._attn_implementation = VARLEN
    try:
        yield
    finally:
        config._attn_implementation = before


def fast_loss(model, batch: dict, *, reduction: str = "sum") -> torch.Tensor:
    """Next-token cross-entropy of ``batch`` (from :func:`flatten_batch` or a padded batch) without full logits.

    A flattened batch must run inside :func:`varlen_attention`. ``reduction`` is ``"sum"``
    (over trained tokens) or ``"mean"``.
    """
    lm = _causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    head = lm.get_output_embeddings()
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    if "seq_bounds" in batch:
        inputs["seq_bounds"] = batch["seq_bounds"]
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    if "label_index" in batch:  # a flattened row: the trained positions are already known
        rows = hidden[0].index_select(0, batch["label_index"].to(hidden.device))
        targets = batch["label_targets"].to(hidden.device)
        total = labelled_cross_entropy_sum(rows, head.weight, targets, bias=head.bias)
        return total if reduction == "sum" else total / max(1, targets.shape[0])
    return causal_lm_loss(hidden, head.weight, batch["labels"].to(hidden.device), bias=head.bias,
                          reduction=reduction)

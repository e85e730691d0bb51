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

import itertools
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ftmagic.constants import IGNORE_INDEX
from ftmagic.errors import a_type
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


def flatten_batch(rows: list, *, multiple: int = 1, pad_id: int = 0) -> dict:
    """One unpadded row from ``rows``: ``input_ids``, ``labels``, ``position_ids`` ``[1, T]`` and ``seq_bounds``.

    ``seq_bounds`` is the tuple of example boundaries ``(0, len_0, len_0 + len_1, ..., T)``. The first
    label of every example is -100 (it is never predicted from the previous example).
    ``label_index`` holds the positions whose next token is trained and ``label_targets``
    those tokens, found here on the CPU: selecting them on a GPU with a boolean mask would
    make every step wait for the device.

    ``multiple`` > 1 rounds ``T`` up to a multiple of it with one last segment of ``pad_id``
    tokens that attends only to itself and carries no label, and :func:`fast_loss` rounds the
    output layer's chunks of labelled rows alike (``row_multiple``): where each new matrix
    shape costs a kernel (:attr:`ftmagic.engine.device.DevicePlan.row_multiple`), rows of a
    few lengths reuse them. Without dropout the loss and its gradients are unchanged; with
    LoRA dropout the pad tokens take their share of the random draws, so the masks that
    follow differ (with the same distribution).

    Example::

        >>> b = flatten_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
        >>> b["position_ids"].tolist(), b["labels"].tolist(), b["seq_bounds"]
        ([[0, 1, 2, 0, 1]], [[-100, 6, 7, -100, 9]], (0, 3, 5))
        >>> flatten_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}], multiple=4)["seq_bounds"]
        (0, 3, 4)
    """
    length = sum(len(row["input_ids"]) for row in rows)
    if multiple > 1 and length % multiple:
        pad = multiple - length % multiple
        rows = [*rows, {"input_ids": [pad_id] * pad, "labels": [IGNORE_INDEX] * pad}]
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
    batch = {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
             "position_ids": torch.tensor([positions], dtype=torch.long), "seq_bounds": tuple(bounds),
             "label_index": torch.tensor(index, dtype=torch.long),
             "label_targets": torch.tensor([labels[t + 1] for t in index], dtype=torch.long)}
    if multiple > 1:
        batch["row_multiple"] = multiple  # the output layer's chunks are rounded alike (fast_loss)
    return batch


def sequence_ends(batch: dict, sequences: list) -> tuple:
    """Where each of ``sequences`` ends in ``batch``, their :func:`flatten_batch` row, without the
    padding's segment; refused if a sequence was split or dropped (the ends would be misread).

    Example::

        >>> seqs = [{"input_ids": [5, 6, 7], "labels": [-100] * 3}, {"input_ids": [8, 9], "labels": [-100] * 2}]
        >>> sequence_ends(flatten_batch(seqs, multiple=8), seqs)
        (3, 5)
    """
    ends = tuple(itertools.accumulate(len(s["input_ids"]) for s in sequences))
    if batch["seq_bounds"][1:len(ends) + 1] != ends:
        raise ValueError(f"a row of {len(sequences)} sequences must keep one segment per sequence; "
                         f"its bounds are {batch['seq_bounds']}")
    return ends


def _varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling=None, **kwargs):
    """Causal attention on each ``seq_bounds`` segment of a single flattened row; plain SDPA otherwise.

    A segment longer than the layer's sliding window (Mistral, Gemma 2 and 3, Phi-3, Qwen2
    with `use_sliding_window`) attends within the window only, and Gemma 2's soft-capped
    attention scores are capped, exactly as the model's own attention does for one example.
    """
    bounds = kwargs.pop("seq_bounds", None)
    if bounds is None or query.shape[0] != 1 or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # split, not slices: backward joins the pieces' gradients in one pass, where each slice's
    # gradient would be a zero-filled tensor of the whole row added into the others.
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    parts = [_segment_attention(module, q, k, v, dropout, scaling, window, softcap)
             for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _segment_attention(module, query, key, value, dropout: float, scaling: float, window, softcap):
    """One example's causal attention ``[1, heads, n, head_dim]``, within ``window`` and soft-capped if asked."""
    n = query.shape[2]
    # Grouped-query attention inside the kernel: no expanded copies of key and value (a third
    # less attention time on CPU than repeating the heads first, the same result).
    gqa = query.shape[1] != key.shape[1]
    if softcap is None and (window is None or n <= window):
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True,
                                              enable_gqa=gqa)
    pos = torch.arange(n, device=query.device)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:  # transformers' sliding window: key k is seen from query q when q - k < window
        allowed &= pos[None, :] > pos[:, None] - window
    if softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling,
                                              enable_gqa=gqa)
    if gqa:  # the eager soft-capped scores need every query head's keys and values
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # Gemma 2's eager attention: scores soft-capped before the mask, softmax in fp32.
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, _varlen_attention_forward)


def _causal_lm(model):
    """The ``*ForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def fast_path_blocker(model):
    """Why the fast step would not equal the model's own forward for ``model``, or None when it does.

    The fast step needs a causal LM whose loss is ``cross_entropy(softcap(lm_head(decoder(x))))``
    (a plain linear head; Gemma 2's soft-capping is applied by the chunked loss) and whose
    attention goes through transformers' attention interface, which is where examples in
    one flattened row are kept apart (sliding windows and soft-capped scores included).
    ``tests/test_architectures.py`` checks loss and gradients against the model's own
    forward for Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3 and GPT-2.

    Example::

        fast_path_blocker(model)   # None, or e.g. "its logits are scaled (`logit_scale`)"
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "prompt learning's virtual tokens are inserted by peft's own forward"
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    decoder = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if config is None or decoder is None or not type(lm).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return f"{type(lm).__name__} is not a causal LM with a decoder and an output layer"
    if type(head) is not torch.nn.Linear:
        return f"its output layer is {a_type(head)}, not a plain linear layer"
    if not getattr(lm, "_supports_attention_backend", False):
        # Older modelling code computes attention itself: examples in one row would see each other.
        return f"{type(lm).__name__} does not use transformers' attention interface"
    for attr in ("logit_scale", "logits_scaling"):  # Cohere, Granite: the loss would need the same scale
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"its logits are scaled (`{attr}`)"
    if getattr(config, "use_bidirectional_attention", False):
        return "its attention is bidirectional"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _REPLACEABLE + (VARLEN,):
        return f"`{implementation}` attention handles packed rows itself"
    return None


def supports_fast_path(model) -> bool:
    """True when the fast step is exact for ``model`` (see :func:`fast_path_blocker`)."""
    return fast_path_blocker(model) is None


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
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if "label_index" in batch:  # a flattened row: the trained positions are already known
        rows = hidden[0].index_select(0, batch["label_index"].to(hidden.device))
        targets = batch["label_targets"].to(hidden.device)
        total = labelled_cross_entropy_sum(rows, head.weight, targets, bias=head.bias, softcap=softcap,
                                           multiple=batch.get("row_multiple", 1))
        return total if reduction == "sum" else total / max(1, targets.shape[0])
    return causal_lm_loss(hidden, head.weight, batch["labels"].to(hidden.device), bias=head.bias,
                          reduction=reduction, softcap=softcap)

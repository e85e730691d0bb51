"""Turn encoded rows into model batches.

Padded rows get dynamic padding (to the longest row of the batch) and an attention
mask. Packed rows (several examples concatenated into one row, with ``position_ids``
restarting at 0 for each) get a block-diagonal causal mask, so a packed example never
attends to its neighbours, and the first token of each packed example is never a
target of the one before it.

Example::

    >>> batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...                  {"input_ids": [5, 6], "labels": [-100, 6]}], pad_id=0)
    >>> batch["input_ids"].tolist(), batch["labels"].tolist()
    ([[5, 6, 7], [5, 6, 0]], [[-100, 6, 7], [-100, 6, -100]])
"""

from __future__ import annotations

import torch

from ftmagic.constants import IGNORE_INDEX


def is_packed(rows) -> bool:
    return any("position_ids" in row for row in rows)


def collate(rows, pad_id: int, dtype: torch.dtype = torch.float32) -> dict:
    """Pad ``rows`` into tensors; packed rows also get ``position_ids`` and a 4D mask in ``dtype``."""
    length = max(len(row["input_ids"]) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    for i, row in enumerate(rows):
        k = len(row["input_ids"])
        input_ids[i, :k] = torch.tensor(row["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.tensor(row["labels"], dtype=torch.long)
        attention[i, :k] = 1
    if not is_packed(rows):
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

    position_ids = torch.zeros((n, length), dtype=torch.long)
    segment = torch.full((n, length), -1, dtype=torch.long)  # -1 marks padding
    for i, row in enumerate(rows):
        pos = torch.tensor(row.get("position_ids") or list(range(len(row["input_ids"]))), dtype=torch.long)
        k = len(pos)
        position_ids[i, :k] = pos
        starts = (pos == 0).long()
        starts[0] = 1
        segment[i, :k] = torch.cumsum(starts, 0) - 1
        # The model predicts token t+1 from token t; a packed example's first token is not
        # a continuation of the previous example, so it is never a target.
        first = torch.nonzero(pos == 0).flatten()
        labels[i, first[first > 0]] = IGNORE_INDEX
    same = segment[:, :, None] == segment[:, None, :]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    valid = (segment >= 0)[:, None, :]
    allowed = same & causal[None] & valid
    # Padding rows attend to themselves only, so softmax never sees an all-masked row.
    allowed |= torch.eye(length, dtype=torch.bool)[None]
    mask = torch.zeros((n, 1, length, length), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": position_ids}


def count_targets(labels: torch.Tensor, shifted: bool = True) -> int:
    """Tokens that carry loss: the model predicts labels[1:] from tokens[:-1]."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum()) if shifted else int((labels != IGNORE_INDEX).sum())

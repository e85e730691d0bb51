"""Packing: concatenate short examples into rows of at most ``max_seq_len`` tokens.

Each packed row carries ``position_ids`` that restart at 0 for every example and
``seq_lens`` (the length of each example in the row), so the engine can keep examples
from attending to each other (varlen attention or a block-diagonal mask). The first
label of every example is -100: in an unpacked batch that position is never predicted,
and in a packed row it would otherwise be predicted from the previous example.

Rows are filled in order (next-fit): order stays as given, so shuffling stays the
caller's choice.

Example::

    >>> rows = pack([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3, 4, 5], "labels": [-100, 4, 5]}], 8)
    >>> rows[0]["position_ids"], rows[0]["seq_lens"], rows[0]["labels"]
    ([0, 1, 0, 1, 2], [2, 3], [-100, 2, -100, 4, 5])
"""

from __future__ import annotations

from ftmagic.constants import IGNORE_INDEX


def pack(examples: list, max_seq_len: int) -> list:
    """Pack ``{"input_ids", "labels"}`` examples (each at most ``max_seq_len`` long) into rows."""
    rows, current = [], None
    for ex in examples:
        n = len(ex["input_ids"])
        if n == 0:
            continue
        if n > max_seq_len:
            raise ValueError(f"an example of {n} tokens is longer than max_seq_len={max_seq_len}; truncate first")
        if current is None or len(current["input_ids"]) + n > max_seq_len:
            current = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
            rows.append(current)
        current["input_ids"].extend(ex["input_ids"])
        current["labels"].append(IGNORE_INDEX)
        current["labels"].extend(ex["labels"][1:])
        current["position_ids"].extend(range(n))
        current["seq_lens"].append(n)
    return rows


def padding_share(lengths: list, max_seq_len: int, batch_size: int = 1, packed: bool = False) -> float:
    """Share of the computed positions that are padding.

    Unpacked: batches of ``batch_size`` in order, each padded to its longest example.
    Packed: rows of ``max_seq_len`` filled as :func:`pack` fills them.

    Example::

        >>> padding_share([2, 4], 8, batch_size=2)
        0.25
        >>> padding_share([2, 4], 8, packed=True)
        0.25
    """
    lengths = [min(n, max_seq_len) for n in lengths if n > 0]
    if not lengths:
        return 0.0
    real = sum(lengths)
    if packed:
        rows, fill = 0, max_seq_len
        for n in lengths:
            if fill + n > max_seq_len:
                rows, fill = rows + 1, 0
            fill += n
        total = rows * max_seq_len
    else:
        total = sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
                    for i in range(0, len(lengths), batch_size))
    return (total - real) / total

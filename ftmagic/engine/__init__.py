"""The training engine: the only layer that imports torch, transformers and peft.

Modules: ``device`` (device, precision, weight dtypes and optimizer choice, pure
functions of the machine's capabilities), ``models`` (loading, ``tiny``, smoke mode),
``methods`` (how to prepare each method of the core table :mod:`ftmagic.methods`),
``trace`` (the memory calculator's exact mode: one traced step), ``collate`` (padded batches, block-diagonal masks),
``fastpath`` and ``losses`` (unpadded rows, per-example attention, chunked loss),
``loop`` (the training loop), ``checkpoint`` (atomic checkpoints, resume),
``reporting`` (TensorBoard / W&B sinks), ``run`` (:func:`finetune`), ``result``
(:class:`RunResult`).
"""

import logging

# On import (through peft, transformers or ftmagic itself) bitsandbytes warns that an optional
# package of faster CPU kernels is missing; its built-in CPU path works without it, so the
# line is noise for a user. Its module logs nothing else; a level the user set is kept.
_BNB_CPU_NOTE = logging.getLogger("bitsandbytes.backends.cpu.ops")
if _BNB_CPU_NOTE.level == logging.NOTSET:
    _BNB_CPU_NOTE.setLevel(logging.ERROR)

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

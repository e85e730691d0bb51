"""The training engine: the only layer that imports torch, transformers and peft.

Modules: ``device`` (device, precision and optimizer choice), ``models`` (loading),
``methods`` (the method registry), ``collate`` (batches), ``loop`` (the training loop),
``checkpoint`` (atomic checkpoints, resume), ``run`` (:func:`finetune`), ``result``
(:class:`RunResult`).
"""

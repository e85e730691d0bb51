"""IPython magics: ``%%finetune``, ``%%ft_generate``, ``%ft_export``, ``%ft_memory`` and ``%ft_preview``.

Each feature keeps its magics beside its widgets; this module only registers them.
Nothing heavy is imported at registration: torch loads when a run starts.
"""

from __future__ import annotations


def _magic_classes():
    from ftmagic.widgets.export import ExportMagics
    from ftmagic.widgets.finetune import FinetuneMagics
    from ftmagic.widgets.memory import MemoryMagics
    from ftmagic.widgets.preview import PreviewMagics

    return (FinetuneMagics, ExportMagics, MemoryMagics, PreviewMagics)


def load_ipython_extension(ipython) -> None:
    """Register every ftmagic magic on ``ipython``."""
    for magics_class in _magic_classes():
        ipython.register_magics(magics_class)


def unload_ipython_extension(ipython) -> None:
    """Remove the magics registered by :func:`load_ipython_extension`."""
    names = set()
    for magics_class in _magic_classes():
        for kind, table in magics_class.magics.items():
            names.update((kind, name) for name in table)
    manager = ipython.magics_manager
    for kind, name in names:
        manager.magics[kind].pop(name, None)
    for magics_class in _magic_classes():
        manager.registry.pop(magics_class.__name__, None)

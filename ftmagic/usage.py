"""Turn user mistakes into IPython ``UsageError``s (one line, no traceback) in magics.

Only :class:`~ftmagic.errors.FtmagicError` is converted: anything else is a bug and
keeps its traceback.

Example::

    with as_usage_error():
        config = FinetuneConfig.from_yaml(cell, source="%%finetune cell")
"""

from __future__ import annotations

from contextlib import contextmanager

from ftmagic.errors import FtmagicError


@contextmanager
def as_usage_error():
    """Re-raise FtmagicError as IPython's UsageError, which IPython prints as one line."""
    from IPython.core.error import UsageError

    try:
        yield
    except FtmagicError as exc:
        raise UsageError(str(exc)) from None

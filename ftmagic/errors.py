"""Errors a user can cause.

Every mistake a user can make raises a subclass of :class:`FtmagicError` (itself a
``ValueError``) whose message is one line naming what is at fault (file and line, key
or value) and what would be accepted. The notebook front shows it as a ``UsageError``;
the CLI prints ``ftmagic: error: <message>`` and exits with status 2. Anything else
that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class FtmagicError(ValueError):
    """Base class of every user-facing error; the message is a single line."""

    def __init__(self, message: str):
        # A multi-line message would break the one-line contract of the CLI and magics.
        super().__init__(" ".join(str(message).split("\n")))


class ConfigError(FtmagicError):
    """A configuration key, value or combination is not accepted."""


class DataError(FtmagicError):
    """A dataset cannot be read or a record cannot be used."""


class ModelError(FtmagicError):
    """A model id, path or architecture cannot be used."""


class MemoryFitError(FtmagicError):
    """The pre-flight memory check says the run will not fit the GPU."""


class CheckpointError(FtmagicError):
    """An output directory or checkpoint cannot be used as asked."""


class ExportError(FtmagicError):
    """A finished run cannot be exported as asked (a missing tool, an existing file, a failed upload)."""

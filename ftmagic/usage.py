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


def magic_argv(line: str) -> list[str]:
    """Split a magic's line like a shell; quotes around a value are removed.

    IPython's own splitting (non-POSIX, so Windows paths keep their backslashes) leaves the
    quotes on, and ``--gpu "A100 40GB"`` must mean the GPU, not a name with quotes in it.

    Example::

        >>> magic_argv('llama-3.1-8b --gpu "A100 40GB" --method="qlora"')
        ['llama-3.1-8b', '--gpu', 'A100 40GB', '--method=qlora']
    """
    from IPython.utils.process import arg_split

    return [_unquote(token) for token in arg_split(line)]


def _unquote(token: str) -> str:
    if "=" in token and token.startswith("--"):
        flag, value = token.split("=", 1)
        return flag + "=" + _unquote(value)
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        return token[1:-1]
    return token

"""Turn user mistakes into IPython ``UsageError``s (one line, no traceback) in magics.

Only :class:`~ftmagic.errors.FtmagicError` is converted: anything else is a bug and
keeps its traceback.

Example::

    with as_usage_error():
        config = FinetuneConfig.from_yaml(cell, source="%%finetune cell")
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

from ftmagic.errors import FtmagicError, choice_error, did_you_mean


@contextmanager
def as_usage_error():
    """Re-raise FtmagicError as IPython's UsageError, which IPython prints as one line."""
    from IPython.core.error import UsageError

    try:
        yield
    except FtmagicError as exc:
        raise UsageError(str(exc)) from None


def expand_vars(text: str, namespace: Optional[dict] = None) -> str:
    """``{var}`` and ``$var`` in a ``@no_var_expand`` magic's line, as IPython would expand them
    (from ``namespace``, else the running shell's); on any failure the text stays as typed
    (IPython's own rule).

    Such magics expand the line themselves so that a token naming a notebook variable
    (``data``: ``$train``) can reach them as its name, not as the text of a list of dicts.

    Example::

        >>> expand_vars("--lr={lr} --r $r", {"lr": 0.001, "r": 8}), expand_vars("$nothing", {})
        ('--lr=0.001 --r 8', '$nothing')
    """
    if "$" not in text and "{" not in text:
        return text
    try:
        from IPython.utils.text import DollarFormatter

        if namespace is None:
            from IPython import get_ipython

            shell = get_ipython()
            namespace = shell.user_ns if shell is not None else {}
        return DollarFormatter().vformat(text, args=[], kwargs=namespace)
    except Exception:
        return text


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


def parse_magic_args(parser, argv: list[str], prefix: str = "%"):
    """``parser.parse_args(argv)`` for a magic's ``magic_arguments`` parser, its mistakes as one
    line each: an unknown flag or a refused choice with its "did you mean", a stray value
    with what it should follow. Flags are never abbreviated (`--epoch 2` is not `--epochs 2`).
    ``prefix`` is how the magic is called (``%%`` for a cell magic), for the help it points to.

    Example::

        args = parse_magic_args(self.ft_memory.parser, magic_argv(line))
    """
    from IPython.core.error import UsageError

    parser.allow_abbrev = False
    try:
        return parser.parse_args(argv)
    except UsageError as exc:
        message = str(exc)
        if "unrecognized arguments" in message:
            known = [opt for action in parser._actions for opt in action.option_strings]
            extra = message.split(":", 1)[1].split()
            unknown = [token.split("=")[0] for token in extra if token.startswith("-")]
            if unknown:
                message = "; ".join(f"unknown flag `{bad}`" + did_you_mean(bad, known) for bad in unknown)
            else:
                message = f"unexpected value(s) {' '.join(extra)}: every value follows a flag, e.g. `--lora-r 8`"
            message += f"; see `{prefix}{parser.prog}?` for every flag"
        else:
            message = choice_error(message)
        raise UsageError(message) from None

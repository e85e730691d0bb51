"""Errors a user can cause.

Every mistake a user can make raises a subclass of :class:`FtmagicError` (itself a
``ValueError``) whose message is one line naming what is at fault (file and line, key
or value) and what would be accepted; a config with several mistakes gives one such
line per mistake. The notebook front shows it as a ``UsageError``; the CLI prints
``ftmagic: error: <line>`` for each line and exits with status 2. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Mapping, Optional, Sequence

from ftmagic.constants import SYNONYMS


def one_line(message: object) -> str:
    """``message`` with its line breaks turned into spaces."""
    return " ".join(str(message).split("\n"))


class FtmagicError(ValueError):
    """Base class of every user-facing error; the message is a single line."""

    def __init__(self, message: str):
        # A multi-line message would break the one-line contract of the CLI and magics.
        super().__init__(one_line(message))


class ConfigError(FtmagicError):
    r"""A configuration key, value or combination is not accepted.

    When a config has several mistakes they are all reported at once, one line per
    problem (``problems=[...]``), so a user fixes a cell in one go; ``.problems`` lists
    them. A single problem reads exactly like any other FtmagicError.

    Example::

        >>> str(ConfigError(problems=["cell:2: unknown key `lr_rate`", "cell:4: `lora_r: 0` must be at least 1"]))
        'cell:2: unknown key `lr_rate`\ncell:4: `lora_r: 0` must be at least 1'
    """

    def __init__(self, message: str = "", *, problems: Sequence[str] = ()):
        self.problems = [one_line(p) for p in problems] or [one_line(message)]
        ValueError.__init__(self, "\n".join(self.problems))


class DataError(FtmagicError):
    """A dataset cannot be read or a record cannot be used."""


class ModelError(FtmagicError):
    """A model id, path or architecture cannot be used."""


class MemoryFitError(FtmagicError):
    """The pre-flight memory check says the run will not fit the GPU."""


class CheckpointError(FtmagicError):
    """An output directory or checkpoint cannot be used as asked."""


class DistributedError(FtmagicError):
    """A process of a multi-process run failed; the message names the process and says why.

    ``details`` holds the failing process's traceback, when there was one.
    """

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class TrainingError(FtmagicError):
    """Training cannot go on and nothing safe is left to save (e.g. the loss became NaN before any checkpoint)."""


class ExportError(FtmagicError):
    """A finished run cannot be exported as asked (a missing tool, an existing file, a failed upload)."""


def a_type(value: object) -> str:
    """The type of ``value`` with its article, for a message: ``an int``, ``a list``, ``None``.

    Every message that names what a user passed says it through this one rule, so none
    reads "a int".

    Example::

        >>> a_type(5), a_type([]), a_type({}), a_type(None)
        ('an int', 'a list', 'a dict', 'None')
    """
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def closest(word: object, options: Iterable, cutoff: float = 0.6) -> Optional[str]:
    """The option most like ``word``, whatever the case of either, or None (what :func:`did_you_mean` suggests).

    A word with digits is only matched to an option with the same digits: ``rtx 4080`` is not
    an ``RTX 4090`` and ``llama2`` not ``llama3``, however alike they are spelled.

    Example::

        >>> closest("lroa", ["full", "lora", "qlora"]), closest("GGUFF", ["gguf", "hub"]), closest("llama2", ["llama3"])
        ('lora', 'gguf', None)
    """
    by_lower = {}
    for option in options:
        by_lower.setdefault(str(option).lower(), str(option))
    word = str(word).lower()
    digits = re.sub(r"\D", "", word)
    for match in difflib.get_close_matches(word, list(by_lower), n=5, cutoff=cutoff):
        if not digits or re.sub(r"\D", "", match) == digits:
            return by_lower[match]
    return None


def did_you_mean(word: object, options: Iterable, cutoff: float = 0.6, rename: Mapping = {}) -> str:
    """The hint that ends every one-line error about a name: ``; did you mean `NAME`?``, or ``""``.

    ``rename`` maps an option to the name to suggest (an alias to what it stands for).

    Example::

        >>> did_you_mean("lroa", ["full", "lora", "qlora"]), did_you_mean("xyz", ["full"])
        ('; did you mean `lora`?', '')
    """
    close = closest(word, options, cutoff)
    return _hint(rename.get(close, close)) if close is not None else ""


def _hint(name: object) -> str:
    return f"; did you mean `{name}`?"


def not_accepted(key: str, value: object, options: Sequence[str], also: str = "", flag: bool = False,
                 error: type = None, by: str = "") -> "FtmagicError":
    """The error for a value that is not one of a key's names (method, objective, device, sampler, ...);
    ``also`` names what else is accepted; ``flag`` names a command-line flag (``--method x``);
    ``error`` is the class to raise (:class:`ConfigError` unless given); ``by`` names the part that
    refuses a value other parts accept (``by="the memory estimate"``).

    A value users write for one of the options (``SYNONYMS`` in :mod:`ftmagic.constants`,
    ``device: gpu``) is answered with that option rather than the closest spelling.

    Example::

        >>> str(not_accepted("method", "lroa", ["full", "lora"]))
        '`method: lroa` is not accepted; use one of full, lora; did you mean `lora`?'
        >>> str(not_accepted("--device", "gpu", ["auto", "cuda", "mps", "cpu"], flag=True))
        '`--device gpu` is not accepted; use one of auto, cuda, mps, cpu; did you mean `cuda`?'
    """
    name = key.lstrip("-").replace("-", "_").rsplit(".", 1)[-1]  # `sweep.sampler`, `--device`: the key itself
    meant = SYNONYMS.get(name, {}).get(str(value).strip().lower())
    hint = _hint(meant) if meant in options else did_you_mean(value, options)
    return (error or ConfigError)(f"`{key}{' ' if flag else ': '}{value}` is not accepted{' by ' + by if by else ''};"
                                  f" use one of {', '.join(options)}{' ' + also if also else ''}{hint}")


def choice_error(message: str) -> str:
    """argparse's "invalid choice" message in the words of every other refused value, with its
    "did you mean"; any other message unchanged (the CLI's and the magics' flag parsers).

    Example::

        >>> choice_error("argument --method: invalid choice: 'qlra' (choose from 'full', 'lora', 'qlora')")
        '`--method qlra` is not accepted; use one of full, lora, qlora; did you mean `qlora`?'
    """
    match = re.fullmatch(r"argument (\S+?): invalid choice: '(.*)' \(choose from (.*)\)", message.strip())
    if match is None:
        return message
    flag, value, listed = match.groups()
    options = [option.strip().strip("'") for option in listed.split(",")]
    if not flag.startswith("-"):  # a positional argument: COMMAND
        return str(not_accepted(flag.lower(), value, options))
    return str(not_accepted(flag.split("/")[-1], value, options, flag=True))  # `-m/--method`: the long form

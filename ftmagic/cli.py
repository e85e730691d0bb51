"""The ``ftmagic`` command line: ``train``, ``sweep``, ``export``, ``demo``, ``estimate`` and ``preview``.

Each sub-command lives in its own module under :mod:`ftmagic.commands` with two
functions, ``add_parser(subparsers)`` and ``run(args) -> int``. Modules are imported
only for the command that runs, so ``ftmagic estimate`` never waits for torch.

Every user mistake ends as ``ftmagic: error: <one line>`` on stderr (one such line per
mistake when a config has several) with exit status 2.

Example::

    $ ftmagic train run.yaml --set lr=1e-4 --set epochs=2
    $ ftmagic export runs/a --to gguf,ollama --quant q8_0
    $ ftmagic estimate llama-3.2-1b --method qlora --json
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from ftmagic.errors import FtmagicError, choice_error

BROKEN_PIPE_STATUS = 141  # 128 + SIGPIPE, what shells report for a writer whose reader went away
INTERRUPTED_STATUS = 130  # 128 + SIGINT, what shells report for a program ended by Ctrl-C

COMMANDS = {
    "train": ("ftmagic.commands.train", "fine-tune a model from a YAML config"),
    "export": ("ftmagic.commands.export", "take a finished run to merged weights, GGUF, Ollama or the Hub"),
    "demo": ("ftmagic.commands.demo", "offline demo: LoRA on the embedded tiny model, before/after table"),
    "sweep": ("ftmagic.commands.sweep", "hyperparameter search: the `sweep:` block of a YAML config, one run per trial"),
    "estimate": ("ftmagic.commands.estimate", "estimate the GPU memory a run needs and whether it fits"),
    "preview": ("ftmagic.commands.preview", "show what a dataset looks like to the model, and its problems"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error format."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"ftmagic: error: {choice_error(message)} (see `{self.prog} --help`)\n")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported, so `ftmagic estimate` never waits for torch."""
    parser = _Parser(prog="ftmagic", description="Fine-tune language models: train, estimate memory, preview data.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        if command == name:
            module = importlib.import_module(module_name)
            module.add_parser(sub.add_parser(name, help=help_text, description=help_text))
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``ftmagic`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:  # importing a command's module is inside: a launched process records that failure too
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except FtmagicError as exc:
        return _report(exc, 2)
    except KeyboardInterrupt:
        print("ftmagic: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    except BrokenPipeError:
        if not _stdout_reader_left():
            raise  # another pipe (a launched process, a socket): a failure to report, not a reader leaving
        # The reader of our output went away (`ftmagic estimate ... | head`): stop quietly, as shell
        # tools do, and point stdout at nothing so the interpreter's last flush cannot fail again.
        _drop_stdout()
        return BROKEN_PIPE_STATUS
    except Exception as exc:
        if _process()[1] > 1:
            _record_for_launcher(exc)
            if _launched_by_ftmagic():
                return 1  # the launcher reports it: the failing process's traceback and one line
        raise


def _stdout_reader_left() -> bool:
    """Whether stdout is a pipe whose reader has gone (writing to it fails with EPIPE)."""
    import os
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))  # a pipe without a reader
    except (AttributeError, OSError):  # no poll() here: try the write itself
        try:
            os.write(fd, b"")
            sys.stdout.flush()
        except BrokenPipeError:
            return True
        return False


def _drop_stdout() -> None:
    import os

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a real file (a notebook, a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _launched_by_ftmagic() -> bool:
    import os

    from ftmagic.engine.launch import LAUNCHED_ENV

    return bool(os.environ.get(LAUNCHED_ENV))


def _process() -> tuple[int, int]:
    """(rank, world) of this process under accelerate launch / torchrun; (0, 1) otherwise."""
    import os

    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def _record_for_launcher(exc: BaseException) -> None:
    """One of several processes: leave the launcher a record of this process's own failure."""
    if _process()[1] > 1:
        from ftmagic.engine.launch import record_cli_failure

        record_cli_failure(exc)


def _report(exc: FtmagicError, status: int) -> int:
    """``ftmagic: error: <one line>``; one of several processes names itself, or stays quiet when
    ftmagic launched it (its launcher prints the line for the whole run)."""
    rank, world = _process()
    prefix = "ftmagic: error: "
    if world > 1:
        _record_for_launcher(exc)
        if _launched_by_ftmagic():
            return status
        prefix += f"rank {rank} of {world}: "
    for line in str(exc).splitlines() or [""]:  # a config with several mistakes: one line each
        print(prefix + line, file=sys.stderr)
    return status


def _version() -> str:
    from ftmagic import __version__

    return f"ftmagic {__version__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

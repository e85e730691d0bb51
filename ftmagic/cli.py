"""The ``ftmagic`` command line: ``train``, ``sweep``, ``export``, ``demo``, ``estimate`` and ``preview``.

Each sub-command lives in its own module under :mod:`ftmagic.commands` with two
functions, ``add_parser(subparsers)`` and ``run(args) -> int``. Modules are imported
only for the command that runs, so ``ftmagic estimate`` never waits for torch.

Every user mistake ends as ``ftmagic: error: <one line>`` on stderr with exit status 2.

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

from ftmagic.errors import FtmagicError

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
        self.exit(2, f"ftmagic: error: {message} (see `{self.prog} --help`)\n")


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
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except FtmagicError as exc:
        print(f"ftmagic: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ftmagic: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from ftmagic import __version__

    return f"ftmagic {__version__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

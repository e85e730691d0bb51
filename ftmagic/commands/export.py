"""``ftmagic export RUN_DIR --to merged|gguf|ollama|hub``: take a finished run to other runtimes.

The CLI twin of ``RunResult.export(...)`` and ``%ft_export``. Prints what was written, with
sizes, and the commands to use it (vLLM, transformers, llama.cpp, Ollama).

Example::

    $ ftmagic export runs/reverse --to gguf,ollama --quant q8_0
    $ ftmagic export runs/reverse --to hub --repo me/reverse-words
"""

from __future__ import annotations

import argparse

from ftmagic.export.targets import EXPORT_TARGETS, GGUF_TYPES


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of ``ftmagic export``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's output_dir")
    parser.add_argument("--to", required=True, metavar="TARGETS",
                        help=f"comma-separated: {', '.join(EXPORT_TARGETS)} (ollama includes gguf)")
    parser.add_argument("--quant", default=None, metavar="TYPES",
                        help="GGUF types, comma-separated (default: the run's gguf_quant, q8_0); one of "
                             + ", ".join(GGUF_TYPES))
    parser.add_argument("--repo", default=None, metavar="USER/NAME",
                        help="Hub repository for --to hub (default: the run's push_to_hub)")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=None,
                            help="a new Hub repository is private (the default unless the run says otherwise)")
    visibility.add_argument("--public", dest="private", action="store_false", help="a new Hub repository is public")
    parser.add_argument("--overwrite", action="store_true", help="replace files an earlier export wrote")
    parser.add_argument("--quiet", action="store_true", help="print only the summary, not the progress")


def run(args: argparse.Namespace) -> int:
    """Export the run; print the progress and the summary."""
    from ftmagic.engine.result import RunResult

    result = RunResult.load(args.run_dir)
    progress = None if args.quiet else _print_message
    summary = result.export(args.to, quant=args.quant, repo_id=args.repo, overwrite=args.overwrite,
                            private=args.private, on_event=progress)
    print(summary)
    return 0


def _print_message(event) -> None:
    if getattr(event, "kind", None) == "message":
        print(f"... {event.text}", flush=True)

"""``ftmagic preview DATA [--model M] [--json] [--write-clean PATH]``: the CLI twin of ``%ft_preview``.

Prints the dataset report as text, or as one JSON object with ``--json`` (``format``,
``records``, ``skipped``, ``truncated``, ``token_lengths``, ``problems``, ...).
``--write-clean PATH`` also writes a copy without unreadable, empty and duplicate records.

Example::

    $ ftmagic preview train.jsonl --model Qwen/Qwen2.5-0.5B --max-seq-len 1024
    $ ftmagic preview train.jsonl --json | jq .token_lengths
    $ ftmagic preview train.jsonl --write-clean train.clean.jsonl
"""

from __future__ import annotations

import argparse
import json

from ftmagic.config import FORMATS, LONG_TEXT_MODES, FinetuneConfig
from ftmagic.objectives import OBJECTIVE_NAMES
from ftmagic.errors import ConfigError

# The help of `--long-text`, the same flag of `ftmagic preview` and `%ft_preview`.
LONG_TEXT_HELP = ("`text` records longer than --max-seq-len: split into blocks (default, every token trains) or "
                  "truncated (only the first block); config key `long_text`")
LONG_TEXT_DEFAULT = FinetuneConfig.long_text


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of ``ftmagic preview``."""
    parser.add_argument("data", metavar="DATA", help="a data file (.jsonl .json .csv .tsv .parquet), a saved datasets "
                                                     "folder, or a Hugging Face dataset id")
    parser.add_argument("--model", default=None, help="whose tokenizer and chat template to use (default: tiny)")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="data format (default: detect)")
    parser.add_argument("--objective", default=None, choices=OBJECTIVE_NAMES,
                        help="detect only the formats this objective trains on (default: any format)")
    parser.add_argument("--template", default=None, help="named template (chatml, alpaca, llama3, plain) for base models")
    parser.add_argument("--max-seq-len", type=int, default=512, help="tokens per example in training (default: 512)")
    parser.add_argument("--train-on", default="completions", choices=("completions", "all"), help="which tokens are trained")
    parser.add_argument("--long-text", default=LONG_TEXT_DEFAULT, choices=LONG_TEXT_MODES, help=LONG_TEXT_HELP)
    parser.add_argument("--columns", default=None, metavar="FIELD=COLUMN,...",
                        help="map your columns, e.g. prompt=question,completion=answer")
    parser.add_argument("--system-prompt", default=None, help="system prompt added to conversations that have none")
    parser.add_argument("--batch-size", type=int, default=4, help="batch size used for the padding estimate")
    parser.add_argument("--max-problems", type=int, default=20, help="problems listed in the text report")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--write-clean", default=None, metavar="PATH",
                        help="write a copy without unreadable, empty and duplicate records (JSONL) to a new file "
                             "(an existing file is never overwritten)")


def parse_columns(text) -> dict:
    """``"prompt=question,completion=answer"`` -> ``{"prompt": "question", "completion": "answer"}``.

    Example::

        >>> parse_columns("prompt=q, completion=a")
        {'prompt': 'q', 'completion': 'a'}
    """
    if not text:
        return {}
    out = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--columns {text!r}: write FIELD=COLUMN pairs separated by commas, e.g. prompt=question,completion=answer")
        out[key.strip()] = value.strip()
    return out


def run(args: argparse.Namespace) -> int:
    """Analyse the data and print the report (text or JSON); optionally write a cleaned copy."""
    if args.max_seq_len < 8:
        raise ConfigError(f"--max-seq-len {args.max_seq_len} must be at least 8")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    import os

    from ftmagic.data.report import clean, preview
    from ftmagic.errors import DataError

    if args.write_clean and os.path.lexists(os.path.expanduser(args.write_clean)):
        # Before the analysis, which can take a while: an existing file is never overwritten.
        raise DataError(f"{args.write_clean}: the file exists and is never overwritten; give a new name or delete it first")
    columns = parse_columns(args.columns) or None
    report = preview(args.data, model=args.model, format=args.format, template=args.template, objective=args.objective,
                     max_seq_len=args.max_seq_len, train_on=args.train_on, columns=columns,
                     system_prompt=args.system_prompt, batch_size=args.batch_size, long_text=args.long_text)
    cleaned = clean(args.data, args.write_clean, format=args.format, columns=columns) if args.write_clean else None
    _print(report, cleaned, args)  # a reader that leaves early (`| head`) is answered by ftmagic.cli.main
    return 0


def _print(report, cleaned, args) -> None:
    if args.json:
        out = report.to_dict()
        if cleaned is not None:
            out["clean"] = {"path": cleaned.path, "kept": len(cleaned.records), "dropped": cleaned.dropped_counts}
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(report.to_text(max_problems=args.max_problems))
        if cleaned is not None:
            print(f"clean: {cleaned.summary()}")

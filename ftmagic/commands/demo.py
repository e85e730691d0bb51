"""``ftmagic demo``: the offline demo, on the embedded tiny model and the bundled task.

Trains a LoRA adapter that teaches ``model: tiny`` to reverse words, then prints the base
and tuned answers side by side, the held-out exact-match before and after, and where the
adapter was saved. Needs no network and no GPU (about two minutes on 2 CPU cores).

Example::

    $ ftmagic demo
    $ ftmagic demo --output-dir /tmp/demo --steps 100
"""

from __future__ import annotations

import argparse

from ftmagic.errors import ConfigError

DEFAULT_OUTPUT_DIR = "ftmagic-demo"


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Fill the ``demo`` sub-command's parser."""
    from ftmagic.demo import DEMO_CONFIG

    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"where the adapter is saved (default: ./{DEFAULT_OUTPUT_DIR}, replaced on each run)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default: {DEMO_CONFIG['max_steps']})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in --output-dir even if it came from a different config")
    parser.add_argument("--test-size", type=int, default=None,
                        help="how many held-out words to score (default: all 100)")
    parser.add_argument("--quiet", action="store_true", help="print only the table and the result")


def run(args: argparse.Namespace) -> int:
    """Train, compare, print; returns the exit status (0)."""
    from ftmagic.demo import DEMO_CONFIG, format_table, run_demo

    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    if args.test_size is not None and args.test_size < 1:
        raise ConfigError(f"--test-size must be at least 1, got {args.test_size}")
    progress = None
    if not args.quiet:
        from ftmagic.textprogress import TextProgress

        progress = TextProgress(min_interval=2.0)
        print(f"ftmagic demo: LoRA on the embedded tiny model, teaching it to reverse words "
              f"({args.steps or DEMO_CONFIG['max_steps']} steps)", flush=True)
    # The default folder belongs to the demo, so a second `ftmagic demo` simply replaces it;
    # a folder the user names keeps the engine's protection unless --overwrite is given.
    overwrite = args.overwrite or args.output_dir == DEFAULT_OUTPUT_DIR
    report = run_demo(args.output_dir, steps=args.steps, on_event=progress, overwrite=overwrite,
                      n_test=args.test_size)
    print()
    print(format_table(report["rows"], report["base_exact_match"], report["tuned_exact_match"]))
    print(f"trained in {report['train_s']:.0f}s; adapter saved to {report['output_dir']}")
    print(f"try it in Python: ftmagic.RunResult.load({report['output_dir']!r}).generate('reverse: hello')")
    return 0

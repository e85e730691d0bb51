"""``ftmagic sweep CONFIG.yaml [--set key=value ...]``: the hyperparameter search of a ``sweep:`` block.

The file is a ``%%finetune`` cell body with a ``sweep:`` block (:mod:`ftmagic.sweep_spec`).
Each trial trains in ``<output_dir>/trial-NNN``; running the same command again resumes
the search (finished trials are kept, an interrupted one continues from its checkpoint).
At the end it prints the trials, the best one, and its config as a ready ``%%finetune``
cell (also written to ``<output_dir>/best.yaml``).

Example::

    $ ftmagic sweep run.yaml --set sweep.n_trials=12
"""

from __future__ import annotations

import argparse

from ftmagic.errors import ConfigError


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of ``ftmagic sweep``."""
    parser.add_argument("config", metavar="CONFIG.yaml", help="YAML file with the run's settings and a `sweep:` block")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set max_steps=200 or --set sweep.n_trials=12 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="print one line per trial, not each trial's progress")


def apply_sets(values: dict, sets: dict) -> dict:
    """``--set`` pairs on top of the file's values; ``sweep.<key>`` sets one key of the block.

    Example::

        >>> apply_sets({"lr": 1, "sweep": {"lr": [1, 2]}}, {"sweep.n_trials": 3, "seed": 1})
        {'lr': 1, 'sweep': {'lr': [1, 2], 'n_trials': 3}, 'seed': 1}
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for key, value in sets.items():
        if key.startswith("sweep."):
            block = out.get("sweep")
            out["sweep"] = {**(block if isinstance(block, dict) else {}), key.split(".", 1)[1]: value}
        else:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    """Run the sweep; print each trial, the best one and its cell."""
    from ftmagic.commands.train import parse_sets
    from ftmagic.config import FinetuneConfig, parse_yaml_mapping

    try:
        with open(args.config, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"{args.config}: cannot read the config file ({exc.strerror or exc})") from None
    values, lines = parse_yaml_mapping(text, args.config)
    cfg = FinetuneConfig.from_dict(values, source=args.config, lines=lines)
    sets = parse_sets(args.sets)
    if sets:
        try:
            cfg = FinetuneConfig.from_dict(apply_sets(values, sets))
        except ConfigError as exc:
            raise ConfigError(f"--set: {exc}") from None
        values = apply_sets(values, sets)
    if cfg.sweep is None:
        raise ConfigError(f"{args.config}: there is no `sweep:` block; add one (e.g. `sweep: {{lr: [1.0e-4, 3.0e-4]}}`)"
                          " or use `ftmagic train`")
    from ftmagic.engine.sweep import sweep
    from ftmagic.textprogress import TextProgress, format_trial_line

    if args.quiet:
        def progress(event) -> None:
            if event.kind in ("trial", "sweep_end"):
                printer(event)
        printer = TextProgress(header=False)
    else:
        progress = printer = TextProgress()
    result = sweep(cfg, on_event=progress)
    printer.close()
    print()
    for trial in result.trials:
        print(format_trial_line({"event": "trial", **trial, "metric": result.metric, "n_trials": 0}))
    if result.best_number is None:
        print("no trial completed; see the messages above")
        return 1
    cell = result.best_cell(values)
    from pathlib import Path

    best_file = Path(result.output_dir) / "best.yaml"
    best_file.write_text(cell.split("\n", 1)[1] + "\n", encoding="utf-8")
    print(f"\nbest: trial {result.best_number}, {result.metric} {result.best_value:.4g}; "
          f"its run: {next(t['output_dir'] for t in result.trials if t['number'] == result.best_number)}")
    print(f"as a %%finetune cell (also in {best_file}):\n\n{cell}")
    return 0

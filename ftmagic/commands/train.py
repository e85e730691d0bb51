"""``ftmagic train CONFIG.yaml [--set key=value ...]``: the CLI twin of ``%%finetune``.

``--set`` values are read as YAML scalars, so ``--set lr=1e-4``, ``--set packing=true``
and ``--set target_modules=[q_proj,v_proj]`` mean what they would in the file. Progress
is printed as text; every user mistake ends as one ``ftmagic: error:`` line (exit 2).

Example::

    $ ftmagic train run.yaml --set max_steps=50 --set output_dir=out/run1
"""

from __future__ import annotations

import argparse

from ftmagic.errors import ConfigError


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of ``ftmagic train``."""
    parser.add_argument("config", metavar="CONFIG.yaml", help="YAML file with the run's settings (same keys as %%%%finetune)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set lr=1e-4 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="print only the final summary")


def parse_sets(pairs) -> dict:
    """``["epochs=2", "packing=true"]`` -> ``{"epochs": 2, "packing": True}`` (values read as YAML).

    Example::

        >>> parse_sets(["lr=1e-4", "method=qlora", "epochs=2", "packing=true"])
        {'lr': '1e-4', 'method': 'qlora', 'epochs': 2, 'packing': True}
    """
    import yaml

    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} must look like key=value, e.g. --set lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = value  # YAML reads 1e-4 as a string; the config turns it into a number
    return out


def run(args: argparse.Namespace) -> int:
    """Train from the config file; print progress and where the result was saved."""
    from ftmagic.config import FinetuneConfig

    cfg = FinetuneConfig.from_file(args.config)
    sets = parse_sets(args.sets)
    if sets:
        try:
            cfg = cfg.replace(**sets)
        except ConfigError as exc:
            # The value came from the command line, not from the file: say so.
            raise ConfigError(f"--set: {exc}") from None
    from ftmagic.engine.run import finetune
    from ftmagic.textprogress import TextProgress

    if not args.quiet:
        progress = TextProgress()
        finetune(cfg, on_event=progress)
        progress.close()
        return 0  # the progress printer already wrote the summary line
    result = finetune(cfg)
    metrics = result.metrics
    loss = metrics.get("train_loss")
    line = f"{metrics.get('reason', 'finished')}: {metrics.get('steps')} steps"
    if isinstance(loss, float):
        line += f", train loss {loss:.4f}"
    if isinstance(metrics.get("eval_loss"), float):
        line += f", eval loss {metrics['eval_loss']:.4f}"
    print(f"{line}; saved to {result.output_dir}")
    return 0


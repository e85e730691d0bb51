"""``ftmagic train CONFIG.yaml [--set key=value ...]``: the CLI twin of ``%%finetune``.

``--set`` values are read as YAML scalars, so ``--set lr=1e-4``, ``--set packing=true``
and ``--set target_modules=[q_proj,v_proj]`` mean what they would in the file. Progress
is printed as text; every user mistake ends as one ``ftmagic: error:`` line (exit 2); a run stopped by
a NaN or infinite loss exits with 1 (its outputs hold the last finite weights), one interrupted
by Ctrl-C with 130 (its checkpoint resumes with ``--set resume=true``).

Several processes: ``--processes N`` (the config key ``processes``) starts N processes
through accelerate's launcher; the same command runs unchanged as one of the processes
of ``accelerate launch`` or ``torchrun``, where only the first process prints.
``--print-accelerate-config`` writes the accelerate (and DeepSpeed) config that
``--processes N`` uses, for people who launch themselves.

Example::

    $ ftmagic train run.yaml --set max_steps=50 --set output_dir=out/run1
    $ ftmagic train run.yaml --processes 2
    $ ftmagic train run.yaml --processes 8 --print-accelerate-config launch/
    $ accelerate launch --config_file launch/accelerate_config.yaml -m ftmagic.cli train run.yaml
"""

from __future__ import annotations

import argparse
import json
import os

from ftmagic.cli import INTERRUPTED_STATUS
from ftmagic.errors import ConfigError


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of ``ftmagic train``."""
    parser.add_argument("config", metavar="CONFIG.yaml", help="YAML file with the run's settings (same keys as %%%%finetune)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set lr=1e-4 (repeatable)")
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="train on N processes through accelerate (one per GPU); same as --set processes=N")
    parser.add_argument("--print-accelerate-config", dest="print_config", nargs="?", const=".", default=None,
                        metavar="DIR", help="write the accelerate config (and DeepSpeed config) that --processes N "
                        "uses into DIR (default: here), print it and the launch command, and exit")
    parser.add_argument("--quiet", action="store_true", help="print only the final summary")


def parse_sets(pairs) -> dict:
    """``["epochs=2", "packing=true"]`` -> ``{"epochs": 2, "packing": True}`` (values read as YAML).

    Example::

        >>> parse_sets(["lr=1e-4", "method=qlora", "epochs=2", "packing=true"])
        {'lr': '1e-4', 'method': 'qlora', 'epochs': 2, 'packing': True}
    """
    from ftmagic.config import load_yaml

    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} must look like key=value, e.g. --set lr=1e-4")
        try:
            value = load_yaml(raw, source=f"--set {key}") if raw.strip() else ""
        except ConfigError as exc:
            if "invalid YAML" not in str(exc):
                raise  # over a limit (alias bomb, nesting, size): never read as text instead
            value = raw
        out[key] = value  # YAML reads 1e-4 as a string; the config turns it into a number
    return out


def run(args: argparse.Namespace) -> int:
    """Train from the config file; print progress and where the result was saved."""
    from ftmagic.config import FinetuneConfig

    sets = parse_sets(args.sets)
    if args.processes is not None:
        sets["processes"] = args.processes
    # A value from the command line is blamed on its flag, not on the file; mistakes in
    # both are reported together.
    cfg = FinetuneConfig.from_file(
        args.config, **sets,
        override_label=lambda key: "--processes" if key == "processes" and args.processes is not None else "--set")
    cfg.check_trainable()  # before printing a launch command for it, or launching
    if args.print_config is not None:
        if cfg.processes < 2:
            raise ConfigError("--print-accelerate-config: set `--processes N` (N > 1) or `processes: N` in the config")
        return print_accelerate_config(cfg, args.print_config, args)
    from ftmagic.engine.distributed import launch_info

    info = launch_info()
    if info.world == 1 and cfg.processes > 1:
        from ftmagic.engine.launch import run_cli_processes

        run_cli_processes(args.config, _child_args(args), launch_files(cfg)[0], cfg.processes)
        return 0
    from ftmagic.engine.run import finetune
    from ftmagic.textprogress import TextProgress

    if info.rank > 0:  # one of several processes: the first one prints
        finetune(cfg)
        return 0
    if not args.quiet:
        progress = TextProgress()
        result = finetune(cfg, on_event=progress)
        progress.close()
        return _status(result)  # the progress printer already wrote the summary line
    result = finetune(cfg)
    metrics = result.metrics
    loss = metrics.get("train_loss")
    line = f"{metrics.get('reason', 'finished')}: {metrics.get('steps')} steps"
    if isinstance(loss, float):
        line += f", train loss {loss:.4f}"
    if isinstance(metrics.get("eval_loss"), float):
        line += f", eval loss {metrics['eval_loss']:.4f}"
    print(f"{line}; saved to {result.output_dir}")
    return _status(result)


def _status(result) -> int:
    """0; 1 when the loss became NaN (the saved weights are an earlier step's); 130, as for any
    program ended by Ctrl-C, when the run was interrupted (saved, resumable, not finished):
    ``ftmagic train run.yaml && ftmagic export ...`` must not go on with half a run."""
    reason = result.metrics.get("reason")
    return 1 if reason == "nonfinite" else INTERRUPTED_STATUS if reason == "interrupted" else 0



def _child_args(args: argparse.Namespace) -> list:
    """What each launched process gets after ``train CONFIG``: the same settings, the same count."""
    out = [item for pair in args.sets for item in ("--set", pair)]
    if args.processes is not None:
        out += ["--processes", str(args.processes)]
    return out + (["--quiet"] if args.quiet else [])


def launch_files(cfg, folder: str = ".") -> tuple:
    """``(accelerate YAML text, DeepSpeed config or None)`` for ``cfg`` on ``cfg.processes`` processes.

    The strategy is decided for GPUs unless ``device: cpu`` (a config is printed for the
    machines that will run it); DeepSpeed's precision is bf16 unless this machine's GPU
    lacks it or the config names another. The DeepSpeed file is referenced from the YAML
    as ``folder/deepspeed_config.json``.
    """
    import yaml

    from ftmagic.strategies import LABELS, accelerate_config, deepspeed_config, get_strategy_spec, resolve_strategy

    device = "cpu" if cfg.device == "cpu" else "cuda"
    strategy = resolve_strategy(cfg.distributed, method=cfg.method, device=device)
    ds = None
    ds_path = None
    if get_strategy_spec(strategy).engine == "deepspeed":
        ds = deepspeed_config(strategy, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, world=cfg.processes,
                              precision=_deepspeed_precision(cfg), max_grad_norm=cfg.max_grad_norm)
        ds_path = os.path.abspath(os.path.join(folder, "deepspeed_config.json"))
    config = accelerate_config(strategy, method=cfg.method, processes=cfg.processes, deepspeed_config_file=ds_path)
    header = (f"# accelerate config for ftmagic: {cfg.processes} processes, {LABELS[strategy]} ({cfg.method}).\n"
              "# ftmagic applies autocast itself (mixed_precision: no) and picks CPU processes with gloo when\n"
              "# there is no GPU. Several machines: add --num_machines, --machine_rank and --main_process_ip.\n")
    return header + yaml.safe_dump(config, sort_keys=False), ds


def _deepspeed_precision(cfg) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    from ftmagic.engine.device import detect_caps

    caps = detect_caps()
    return "fp16" if caps.cuda_available and not caps.bf16_supported else "bf16"


def print_accelerate_config(cfg, folder: str, args: argparse.Namespace) -> int:
    """Write the launch files into ``folder``, print them and the command that uses them."""
    text, ds = launch_files(cfg, folder)
    os.makedirs(folder, exist_ok=True)
    config_file = os.path.join(folder, "accelerate_config.yaml")
    with open(config_file, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text, end="")
    if ds is not None:
        ds_file = os.path.join(folder, "deepspeed_config.json")
        with open(ds_file, "w", encoding="utf-8") as handle:
            json.dump(ds, handle, indent=2)
        print(f"# {ds_file}:\n" + "\n".join("# " + line for line in json.dumps(ds, indent=2).splitlines()))
    extra = " ".join(item for pair in args.sets for item in ("--set", pair))
    print(f"# launch: accelerate launch --config_file {config_file} -m ftmagic.cli train {args.config}"
          + (f" {extra}" if extra else ""))
    return 0

"""What ``threads: auto`` does on a machine whose cores are busy with other work.

The demo's LoRA run on the embedded tiny model, a fixed number of steps, with torch's
default thread count (one per core) and with ``threads: auto``, while ``--busy`` other
processes each keep one core busy (as a second notebook kernel, a data loader or another
user's job would). Runs alternate, so a change in the machine's other load hits both.

Usage::

    python benchmarks/threads_busy.py                     # 2 busy processes, 40 steps, 2 rounds
    python benchmarks/threads_busy.py --busy 0            # the same on a quiet machine
    python benchmarks/threads_busy.py --model /tmp/ftmagic-bench/model   # a 28M model: auto decides by load
    python benchmarks/threads_busy.py --json

Reports, per setting, the threads chosen, the training loop's seconds and seconds per step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time


def _spin(stop) -> None:
    # A pure-Python busy loop: one core's worth of other work, no memory to speak of.
    while not stop.is_set():
        sum(range(10_000))


def run_once(threads, steps: int, out: str, model: str) -> dict:
    import torch

    from ftmagic.demo import DEMO_CONFIG, demo_dataset
    from ftmagic.engine.run import finetune

    settings = {**DEMO_CONFIG, "model": model, "max_steps": steps, "eval_steps": 0, "save_steps": 0,
                "output_dir": out, "overwrite": True, "threads": threads}
    lines = []
    result = finetune(data=demo_dataset("train"), on_event=lambda e: lines.append(getattr(e, "text", "")), **settings)
    chosen = next((t for t in lines if t.startswith("threads:")), "")
    return {"threads": result.metrics.get("threads") or torch.get_num_threads(), "line": chosen,
            "train_s": result.metrics["runtime_s"], "s_per_step": result.metrics["runtime_s"] / steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=2, help="processes that each keep one core busy (default 2)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of (default, auto)")
    parser.add_argument("--model", default="tiny",
                        help="the model to train (default: the embedded 1M-parameter one, which `auto` always gives "
                             "one thread; a larger one, e.g. train_throughput.py's 28M model directory, shows the "
                             "choice by load)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    default = torch.get_num_threads()
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for proc in spinners:
        proc.start()
    time.sleep(1.0)  # let the load show before `auto` samples it
    results: dict = {"default": [], "auto": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.rounds):
                for name, threads in (("default", default), ("auto", "auto")):
                    results[name].append(run_once(threads, args.steps, os.path.join(tmp, name), args.model))
                    if not args.json:
                        r = results[name][-1]
                        print(f"{name}: {r['threads']} thread(s), {r['train_s']:.1f} s", file=sys.stderr, flush=True)
    finally:
        stop.set()
        for proc in spinners:
            proc.join(timeout=5)
    summary = {name: {"threads": runs[-1]["threads"], "line": runs[-1]["line"],
                      "train_s": [round(r["train_s"], 2) for r in runs],
                      "best_s_per_step": min(r["s_per_step"] for r in runs)} for name, runs in results.items()}
    summary["busy_processes"], summary["cores"], summary["steps"] = args.busy, os.cpu_count(), args.steps
    summary["model"] = args.model
    summary["default_over_auto"] = summary["default"]["best_s_per_step"] / summary["auto"]["best_s_per_step"]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.busy} busy process(es) on {os.cpu_count()} cores; the demo's LoRA run on {args.model}, "
          f"{args.steps} steps")
    print(f"{'setting':<10}{'threads':>8}{'train s (each round)':>24}{'s/step (best)':>15}")
    for name in ("default", "auto"):
        s = summary[name]
        print(f"{name:<10}{s['threads']:>8}{', '.join(f'{t:.1f}' for t in s['train_s']):>24}{s['best_s_per_step']:>15.3f}")
    print(f"auto: {summary['auto']['line']}")
    print(f"torch's default thread count is {summary['default_over_auto']:.1f}x slower per step than auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())

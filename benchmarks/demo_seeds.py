"""Does the demo run (``ftmagic.demo.DEMO_CONFIG``) reach its stated figure on every seed?

The quickstart notebook, ``ftmagic demo`` and the README state a held-out exact match
(``DEMO_EXACT_MATCH``). The task is learnt in a sudden drop after a plateau whose length
depends on the seed and on the machine's arithmetic (thread count, CPU), so one good run
proves little: this script trains the demo config once per seed and thread count and
prints the held-out exact match by word length, the final loss and the loss per 100
steps, so a plateau or a divergence is visible.

Measured on 2 shared CPU cores (load average 5-16), torch 2.13.0, transformers 5.24.0,
peft 0.21.2 (held-out exact match, 100 words)::

    settings                     seed 0   seed 1   seed 2   seed 3   seed 42
    lr 5e-3,  500 steps (old)                                          64%
    lr 3e-3,  800 steps (old)      94%     100%      97%     100%
    lr 3e-3, 1200 steps           100%     100%     100%     100%      21%
    lr 2e-3, 1000 steps                             19%              100%
    lr 2e-3, 1500 steps (now)     see the README of this folder

Usage::

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 42            # one process per seed, 1 thread each
    python benchmarks/demo_seeds.py --seeds 0 --threads 2          # the same run with 2 torch threads
    python benchmarks/demo_seeds.py --seeds 2 --set max_steps=1000 # another setting
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time


def run_one(seed: int, threads: int, overrides: dict) -> dict:
    """Train the demo config with ``seed`` on ``threads`` torch threads; score the held-out words."""
    import torch

    torch.set_num_threads(threads)
    import ftmagic
    from ftmagic.demo import DEMO_CONFIG, demo_dataset

    settings = {**DEMO_CONFIG, **overrides, "seed": seed}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as out:
        result = ftmagic.finetune(data=demo_dataset("train"), output_dir=out, overwrite=True, **settings)
        train_s = time.monotonic() - started
        test = demo_dataset("test")
        rows = result.compare([r["messages"][0]["content"] for r in test], max_new_tokens=12)
    right = collections.Counter()
    total = collections.Counter()
    for record, row in zip(test, rows):
        word = record["messages"][0]["content"].split(": ", 1)[1]
        total[len(word)] += 1
        right[len(word)] += row["tuned"].strip() == word[::-1]
    losses = [h["loss"] for h in result.history if h.get("loss") is not None]
    curve = [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 3) for i in range(0, len(losses), 100)]
    return {"seed": seed, "threads": threads, "settings": overrides, "exact_match": sum(right.values()) / len(test),
            "by_length": {n: f"{right[n]}/{total[n]}" for n in sorted(total)},
            "train_loss": result.metrics.get("train_loss"), "loss_per_100_steps": curve, "train_s": round(train_s)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 42])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="change a DEMO_CONFIG setting, e.g. --set max_steps=1000 (repeatable)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: run this seed
    args = parser.parse_args(argv)
    from ftmagic.commands.train import parse_sets

    overrides = parse_sets(args.sets)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.threads, overrides)))
        return 0
    from ftmagic.demo import DEMO_EXACT_MATCH

    pending = list(args.seeds)
    running: list = []
    results = []
    while pending or running:
        while pending and len(running) < args.parallel:
            seed = pending.pop(0)
            command = [sys.executable, __file__, "--one", str(seed), "--threads", str(args.threads)]
            command += [f"--set={pair}" for pair in args.sets]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            running.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env))
        time.sleep(2)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            line = proc.stdout.read().strip().splitlines()[-1]
            result = json.loads(line)
            results.append(result)
            print(json.dumps(result), flush=True)
    worst = min(r["exact_match"] for r in results)
    print(f"worst held-out exact match {worst:.0%} (stated: at least {DEMO_EXACT_MATCH:.0%})")
    return 0 if worst >= DEMO_EXACT_MATCH else 1


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side DPO throughput: TRL ``DPOTrainer`` against ftmagic's ``objective: dpo``.

Both train the same randomly initialised Llama-style model (about 28M parameters, the one
``train_throughput.py`` builds) with the same LoRA settings, pairs, effective batch,
learning rate, schedule, beta and number of optimizer steps. The pairs are generated from
that script's instruction records (long-tailed lengths up to 512 tokens): the chosen answer
is the record's own, the rejected one another record's answer. Both use the adapter-disabled
base as the reference and compute it on the fly every step (TRL's default; ftmagic keeps each
row's reference log-probabilities after its first use, which one epoch never reuses).

* ``trl``: ``DPOTrainer`` (``loss_type: sigmoid``, ``max_length`` 512, its default padded
  batches of chosen and rejected sequences; ``padding_free`` is disabled in TRL 1.16);
* ``ftmagic``: ``finetune(objective="dpo", ...)``.

Measured per system in its own subprocess, library imports done before the clock, the
systems run interleaved (``--repeats``: trl, ftmagic, trl, ftmagic, ...) and the median is
reported, so a load change on a shared machine hits both:

* ``tokens_per_s``: completion tokens of both sides of the training pairs (answer and
  end-of-turn token, one reference encoding for both systems) over the wall time from
  handing over the records to the end of training;
* ``cpu_s``: CPU seconds of that part (with ``--threads 1``, barely moved by other load);
* ``peak_bytes``: peak RSS (``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA;
* ``accuracy``: after training, the same function for both: the share of held-out pairs
  whose implicit reward (policy minus reference log-probability of the completion) is
  higher for the chosen answer.

Usage::

    python benchmarks/dpo_throughput.py --quick --threads 1    # a few minutes on 2 CPU cores
    python benchmarks/dpo_throughput.py --quick --repeats 3 --json
    python benchmarks/dpo_throughput.py --quick --threads 1 --precision bf16 --systems ftmagic

Needs the ``bench`` extra (``pip install -e .[bench]``: trl). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_throughput import LORA, MAX_LEN, _peak_bytes, build_workdir, load_records  # noqa: E402

SYSTEMS = ("trl", "ftmagic")
SIZES = {
    # training pairs (one epoch), held-out pairs, micro-batch (pairs), gradient accumulation
    "quick": dict(train=96, eval=100, batch_size=4, grad_accum=2),
    "full": dict(train=800, eval=100, batch_size=4, grad_accum=2),
}
HPARAMS = dict(lr=5e-4, beta=0.1, warmup=0.03, scheduler="cosine", max_grad_norm=1.0, seed=0)


def make_pairs(records: list, seed: int) -> list:
    """Conversational preference records: the record's own answer chosen, the same in capitals rejected."""
    rng = random.Random(seed)
    pairs = []
    for record in records:
        answer = record["messages"][-1]["content"]
        rejected = answer.upper()
        while rejected == answer:
            rejected = rng.choice(records)["messages"][-1]["content"]
        pairs.append({"prompt": record["messages"][:-1], "chosen": [record["messages"][-1]],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


def encode_side(tokenizer, pair: dict, side: str) -> dict:
    """Reference encoding of one side: chat template, labels on the answer and its end-of-turn token."""
    prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(p) + ids[len(p):]
    eos = tokenizer.eos_token_id
    if eos in ids[len(p):]:
        last = len(ids) - 1 - ids[::-1].index(eos)
        labels[last + 1:] = [-100] * (len(labels) - last - 1)
    return {"input_ids": ids[:MAX_LEN], "labels": labels[:MAX_LEN]}


def completion_tokens(tokenizer, pairs: list) -> int:
    return sum(sum(1 for t in encode_side(tokenizer, p, s)["labels"][1:] if t != -100)
               for p in pairs for s in ("chosen", "rejected"))


def preference_accuracy(model, tokenizer, pairs: list) -> float:
    """Share of ``pairs`` whose chosen answer has the larger implicit reward (one function for both systems)."""
    import torch

    def logp(seq):
        ids = torch.tensor([seq["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1)
        return sum(float(lp[t - 1, tok]) for t, tok in enumerate(seq["labels"]) if tok != -100 and t > 0)

    model.eval()
    wins = 0
    with torch.no_grad():
        for pair in pairs:
            c, r = encode_side(tokenizer, pair, "chosen"), encode_side(tokenizer, pair, "rejected")
            policy = logp(c) - logp(r)
            with model.disable_adapter():
                reference = logp(c) - logp(r)
            wins += policy > reference
    return wins / len(pairs)


def run_trl(model_dir: str, pairs: list, size: dict, out: str, steps: int, threads: int = 0,
            precision: str = "fp32"):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    config = DPOConfig(output_dir=out, per_device_train_batch_size=size["batch_size"],
                       gradient_accumulation_steps=size["grad_accum"], learning_rate=HPARAMS["lr"], max_steps=steps,
                       lr_scheduler_type=HPARAMS["scheduler"], warmup_steps=HPARAMS["warmup"], beta=HPARAMS["beta"],
                       max_grad_norm=HPARAMS["max_grad_norm"], seed=HPARAMS["seed"], logging_steps=10,
                       save_strategy="no", report_to="none", disable_tqdm=True, max_length=MAX_LEN,
                       use_cpu=not torch.cuda.is_available(), bf16=precision == "bf16", dataloader_num_workers=0,
                       loss_type=["sigmoid"])
    # bf16: a bf16 base in bf16 autocast, as train_throughput.py runs Trainer + peft.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if precision == "bf16"
                                                 else torch.float32)
    trainer = DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(pairs),
                         processing_class=tok, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    trainer.train()
    return trainer.model, trainer.state.global_step


def run_ftmagic(model_dir: str, pairs: list, size: dict, out: str, steps: int, threads: int = 0,
                precision: str = "fp32"):
    from ftmagic.engine.run import finetune

    # `threads: auto` would choose for itself: held to --threads like the other system.

    result = finetune(model=model_dir, data=pairs, objective="dpo", beta=HPARAMS["beta"], dpo_loss="sigmoid",
                      format="preference", max_seq_len=MAX_LEN, max_steps=steps, batch_size=size["batch_size"],
                      grad_accum=size["grad_accum"], lr=HPARAMS["lr"], scheduler=HPARAMS["scheduler"],
                      warmup=HPARAMS["warmup"], max_grad_norm=HPARAMS["max_grad_norm"], lora_r=LORA["r"],
                      lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                      target_modules=list(LORA["target_modules"]), output_dir=out, overwrite=True, logging_steps=10,
                      save_steps=0, eval_steps=0, seed=HPARAMS["seed"], threads=threads or "auto",
                      precision=precision)
    return result.model, int(result.metrics["steps"])


def child(system: str, workdir: Path, size_name: str, result_path: Path, threads: int,
          precision: str = "fp32") -> None:
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers
    from transformers import AutoTokenizer
    import transformers.models.llama.modeling_llama  # noqa: F401
    if system == "trl":
        from trl import DPOConfig, DPOTrainer  # noqa: F401
    else:
        import ftmagic.engine.run  # noqa: F401
        import ftmagic.engine.preference  # noqa: F401
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    size = SIZES[size_name]
    model_dir = str(workdir / "model")
    records = load_records(workdir, "train", size["train"] + size["eval"])
    pairs = make_pairs(records[:size["train"]], seed=1)
    held_out = make_pairs(records[size["train"]:], seed=2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = completion_tokens(tok, pairs)
    steps = max(1, len(pairs) // (size["batch_size"] * size["grad_accum"]))
    out = tempfile.mkdtemp(prefix=f"dpo-bench-{system}-")
    random.seed(0)
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    model, done = (run_trl if system == "trl" else run_ftmagic)(model_dir, pairs, size, out, steps, threads,
                                                                 precision)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    peak = _peak_bytes()
    accuracy = preference_accuracy(model, tok, held_out)
    result_path.write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall,
                                       "peak_bytes": peak, "accuracy": accuracy, "steps": done, "pairs": len(pairs),
                                       "completion_tokens": tokens}))


def run_system(system: str, args, workdir: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--workdir", str(workdir),
           "--size", "quick" if args.quick else "full", "--result", str(result_path), "--threads", str(args.threads),
           "--precision", args.precision]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + f"\n{system} failed with exit status {proc.returncode}\n")
        raise SystemExit(1)
    return json.loads(result_path.read_text())


def median_of(runs: list) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def format_table(results: dict, runs: int, precision: str = "fp32") -> str:
    ref = results.get("ftmagic")
    head = f"{'system':<10}{'wall s':>9}{'CPU s':>9}{'tokens/s':>10}{'peak mem':>11}{'pref. acc':>11}"
    lines = [f"median of {runs} interleaved run(s) each, every system in {precision}", head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:<10}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}{r['tokens_per_s']:>10,.0f}"
                     f"{r['peak_bytes'] / 2**20:>8,.0f} MB{100 * r['accuracy']:>10.1f}%")
    trl = results.get("trl")
    if trl is None or ref is None:  # one system (--systems): nothing to compare with
        return "\n".join(lines)
    lines.append("")
    lines.append(f"ftmagic vs trl: {ref['tokens_per_s'] / trl['tokens_per_s']:.2f}x tokens/s "
                 f"({trl['cpu_s'] / ref['cpu_s']:.2f}x less CPU time), {ref['peak_bytes'] / trl['peak_bytes']:.2f}x peak "
                 f"memory, preference accuracy {100 * (ref['accuracy'] - trl['accuracy']):+.1f} points")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="96 training pairs (a few minutes on 2 CPU cores)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per system; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by system")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per system (default: all cores)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ftmagic-bench"),
                        help="where the model and data are built once and reused (shared with train_throughput.py)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="what both systems compute in (bf16: on a GPU or CPU that has it)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    if args.child:
        child(args.child, workdir, args.size, Path(args.result), args.threads, args.precision)
        return 0
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = [name for name in systems if name not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system {unknown[0]!r}; choose from {', '.join(SYSTEMS)}")
    build_workdir(workdir)
    runs = {name: [] for name in systems}
    for _ in range(args.repeats):
        for name in systems:
            runs[name].append(run_system(name, args, workdir))
            print(f"{name}: {json.dumps(runs[name][-1])}", file=sys.stderr, flush=True)
    results = {name: dict(median_of(r), precision=args.precision) for name, r in runs.items()}
    print(json.dumps(results, indent=1) if args.json else format_table(results, args.repeats, args.precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())

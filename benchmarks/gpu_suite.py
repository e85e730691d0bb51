"""The GPU suite: ftmagic against Trainer + peft on Llama-style 1B and 8B models, measured on one GPU.

For each model (the shapes of Llama 3.2 1B and Llama 3.1 8B, built from their configs with
random weights: nothing is downloaded), each method (QLoRA, LoRA) and each precision
(fp16 under T4 rules: fp16 autocast with a gradient scaler, a fp16 QLoRA compute dtype
and SDPA attention; bf16 where the GPU computes it), both systems train the same
fixed-length examples for the same steps with the same LoRA settings:

* ``ftmagic``: ``ftmagic.engine.run.finetune(...)``;
* ``trainer_peft``: the usual recipe: ``from_pretrained`` (with ``BitsAndBytesConfig`` for
  QLoRA, then ``prepare_model_for_kbit_training``), ``get_peft_model``, ``Trainer``.

Each run is its own subprocess, so its peak and its CUDA context are its own. One JSON
(``--out``, default ``gpu_suite.json``) gets, per run: trained tokens/s, peak
``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``, the memory the process
holds outside torch's allocator (CUDA context, kernel images, library workspaces), and
the memory calculator's prediction beside the peak; per pair, ftmagic's speed-up and
memory ratio; and ``constants``: the CUDA context and allocator headroom measured here,
which the memory calculator reads instead of its built-in 512 MiB and 5% once the file
is where it looks (``--install`` copies it there; see ``ftmagic/memory/gpus.py``).

``--dry-run`` runs every path but the CUDA calls on the CPU, with the same two model
families shrunk to a few thousand parameters, fp16 replaced by fp32 (a CPU has no fp16
autocast) and bf16 kept (CPU autocast): building and saving the models, the data, both
systems' training, the predictions, the comparisons and the JSON (marked ``dry_run``,
which the memory calculator refuses to read). A test runs it.

Usage::

    python benchmarks/gpu_suite.py                        # everything this GPU can run (16 runs; the 8B ones load 16 GB each)
    python benchmarks/gpu_suite.py --models 1b --steps 6  # the 1B half: 8 short runs
    python benchmarks/gpu_suite.py --install              # and give the memory calculator the measured constants
    python benchmarks/gpu_suite.py --dry-run --out /tmp/dry.json

Needs a CUDA GPU with bitsandbytes for the real runs; about 20 GB of disk for the 8B model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEMS = ("ftmagic", "trainer_peft")
METHODS = ("qlora", "lora")
PRECISIONS = ("fp16", "bf16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, alpha=32, dropout=0.05)
LR = 2e-4

# Built-in shapes of the memory calculator (public config.json values), and the dry run's tiny twins.
MODELS = {"1b": "llama-3.2-1b", "8b": "llama-3.1-8b"}
DRY_SHAPES = {
    "1b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
    "8b": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
}
# What each model trains on: micro-batch x tokens (every example exactly that long), and checkpointing.
WORKLOADS = {"1b": dict(batch_size=4, seq_len=1024, gradient_checkpointing=False),
             "8b": dict(batch_size=2, seq_len=1024, gradient_checkpointing=True)}
DRY_WORKLOAD = dict(batch_size=2, seq_len=48)


@dataclass(frozen=True)
class GpuInfo:
    """The GPU the suite plans for; build one by hand to test the plan."""

    name: str
    total_memory: int
    bf16: bool  # computes bf16 natively (compute capability 8.0 and newer)


@dataclass(frozen=True)
class RunSpec:
    """One run of one system."""

    model: str  # "1b" | "8b"
    method: str  # "qlora" | "lora"
    precision: str  # "fp16" | "bf16" (the GPU's); the dry run computes fp16 runs in fp32
    system: str  # "ftmagic" | "trainer_peft"
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    steps: int


def plan_runs(gpu: GpuInfo, *, models=tuple(MODELS), methods=METHODS, precisions=PRECISIONS, systems=SYSTEMS,
              steps: int = 10, predict=None, dry_run: bool = False) -> tuple[list, list]:
    """(runs, skipped lines) for ``gpu``: bf16 only where the GPU has it, nothing predicted not to fit.

    ``predict(spec) -> bytes needed`` (peak plus context and headroom) decides what fits;
    without it everything is planned. Pure, so the plan is tested with faked GPUs.
    """
    runs, skipped = [], []
    for model in models:
        work = DRY_WORKLOAD | {"gradient_checkpointing": WORKLOADS[model]["gradient_checkpointing"]} if dry_run \
            else WORKLOADS[model]
        for method in methods:
            for precision in precisions:
                if precision == "bf16" and not gpu.bf16:
                    skipped.append(f"{model} {method} bf16: {gpu.name} has no native bf16 (T4 rules: fp16 only)")
                    continue
                for system in systems:
                    spec = RunSpec(model, method, precision, system, steps=steps, **work)
                    need = predict(spec) if predict else None
                    if need is not None and need > gpu.total_memory:
                        skipped.append(f"{model} {method} {precision} {system}: predicted {need / 2**30:.1f} GiB "
                                       f"> {gpu.total_memory / 2**30:.1f} GiB on {gpu.name}")
                        continue
                    runs.append(spec)
    return runs, skipped


def compute_precision(spec: RunSpec, dry_run: bool) -> str:
    """What the run computes in: the spec's precision, except fp16 on the dry run's CPU, which has no
    fp16 autocast: fp32 there (bf16 for QLoRA, whose 4-bit base computes in half precision)."""
    if dry_run and spec.precision == "fp16":
        return "bf16" if spec.method == "qlora" else "fp32"
    return spec.precision


def predicted_bytes(spec: RunSpec, model_dir: str, dry_run: bool) -> int:
    """The memory calculator's peak for this run (ftmagic's chunked loss, or Trainer's full logits)."""
    from ftmagic.memory import estimate_memory

    precision = compute_precision(spec, dry_run)
    est = estimate_memory(model_dir, method=spec.method, precision=precision, batch_size=spec.batch_size,
                          seq_len=spec.seq_len, gradient_checkpointing=spec.gradient_checkpointing,
                          lora_r=LORA["r"], lora_dropout=LORA["dropout"], target_modules=TARGETS,
                          loss="auto" if spec.system == "ftmagic" else "full")
    return int(est.total_bytes)


# ----------------------------------------------------------------------------- device access


class CudaDevice:
    """The CUDA calls the suite makes, in one place (the dry run swaps this class out).

    The parent process never starts CUDA: the GPU's facts and a bare process's context
    come from a probe subprocess, so every run's reading of the GPU is its own.
    """

    dry_run = False
    kind = "cuda"

    def __init__(self):
        self._probe = None

    def probe(self) -> dict:
        """Name, memory, compute capability and bare CUDA context, read in a fresh process."""
        if self._probe is None:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe"], check=True,
                                  stdout=subprocess.PIPE, text=True)
            self._probe = json.loads(proc.stdout.strip().splitlines()[-1])
        return self._probe

    def info(self) -> GpuInfo:
        p = self.probe()
        return GpuInfo(p["name"], p["total_memory"], tuple(p["compute_capability"]) >= (8, 0))

    def versions(self) -> dict:
        p = self.probe()
        return {"compute_capability": p["compute_capability"], "cuda": p["cuda"]}

    def bare_context(self) -> int:
        return self.probe()["bare_context_bytes"]

    def reset(self) -> None:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def sync(self) -> None:
        import torch

        torch.cuda.synchronize()

    def memory(self) -> dict:
        """Peaks of torch's allocator, and what the process holds on the GPU outside it."""
        import torch

        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
        return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
                "outside_allocator_bytes": int(total - free - reserved)}


def probe_gpu() -> dict:
    """(In the probe subprocess) the GPU's facts, and what a bare process holds after one cuBLAS matmul."""
    import torch

    props = torch.cuda.get_device_properties(0)
    a = torch.ones(256, 256, device="cuda")
    (a @ a).sum().item()
    free, total = torch.cuda.mem_get_info()
    return {"name": props.name, "total_memory": int(props.total_memory),
            "compute_capability": [props.major, props.minor], "cuda": torch.version.cuda,
            "bare_context_bytes": int(total - free - torch.cuda.memory_reserved())}


class DryDevice(CudaDevice):
    """The same interface on the CPU: sizes come from the process, never from CUDA."""

    dry_run = True
    kind = "cpu"

    def probe(self) -> dict:
        return {"name": "dry run (CPU)", "total_memory": 80 * 2**30, "compute_capability": [9, 0], "cuda": None,
                "bare_context_bytes": 0}

    def reset(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def memory(self) -> dict:
        import resource

        rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return {"peak_allocated_bytes": rss, "peak_reserved_bytes": rss, "outside_allocator_bytes": 0}


def _init_weights(model) -> None:
    """Random weights in place (the model was built on the meta device): N(0, 0.02), norms 1."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)


# ----------------------------------------------------------------------------- model, data


def model_config(model: str, dry_run: bool, tokenizer) -> dict:
    """The Hugging Face config of a suite model: a built-in shape, or its dry-run twin."""
    from ftmagic.memory.architectures import resolve_model

    if dry_run:
        values = dict(model_type="llama", max_position_embeddings=256, **DRY_SHAPES[model])
    else:
        values = resolve_model(MODELS[model]).hf_config()
        values["max_position_embeddings"] = 8192
    values.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return values


def build_model_dir(model: str, workdir: Path, dry_run: bool, tokenizer) -> Path:
    """Save a randomly initialised model of ``model``'s shape (bf16) with the tokenizer, once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = workdir / f"model-{model}"
    if (target / "config.json").exists():
        return target
    values = model_config(model, dry_run, tokenizer)
    config = AutoConfig.for_model(**values)
    torch.manual_seed(0)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # Built in host memory (16 GB for 8B) so the parent process never holds GPU memory.
    net.to_empty(device="cpu")
    _init_weights(net)
    partial = workdir / f".model-{model}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    net.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.rename(target)  # a killed save never leaves a half-written model behind
    del net
    return target


def build_tokenizer_and_texts(workdir: Path, n: int, min_tokens: int):
    """A byte-level BPE tokenizer and ``n`` texts of at least ``min_tokens`` tokens each."""
    sys.path.insert(0, str(HERE))
    from train_throughput import _Words, build_tokenizer

    words = _Words(random.Random(7))
    corpus = [words.paragraph(20) for _ in range(300)]
    tok = build_tokenizer(corpus, 4096)
    texts = []
    for _ in range(n):
        text = words.paragraph(8)
        while len(tok(text, add_special_tokens=False)["input_ids"]) < min_tokens:
            text += " " + words.paragraph(8)
        texts.append(text)
    return tok, texts


# ----------------------------------------------------------------------------- one run (child)


def steady_rate(stamps: list) -> Optional[float]:
    """Trained tokens/s after the first steps (kernel selection, allocator warm-up): ``stamps`` are
    ``(step, seconds, tokens)`` at the end of each step.

    Example::

        >>> steady_rate([(1, 5.0, 100), (2, 6.0, 100), (3, 7.0, 100), (4, 8.0, 100)])
        100.0
    """
    if len(stamps) < 3:
        return None
    warm = min(2, len(stamps) - 2)
    (_, t0, _), rest = stamps[warm - 1], stamps[warm:]
    return sum(n for _, _, n in rest) / (rest[-1][1] - t0) if rest[-1][1] > t0 else None


def run_ftmagic(spec: RunSpec, model_dir: str, texts: list, out: str, precision: str, device: "CudaDevice") -> dict:
    from ftmagic.engine.run import finetune

    stamps = []

    def on_event(event) -> None:
        if event.kind == "step":
            device.sync()
            stamps.append((event.step, time.perf_counter(), event.tokens))

    result = finetune(on_event=on_event, model=model_dir, method=spec.method, precision=precision, data=[{"text": t} for t in texts],
                      format="text", train_on="all", max_seq_len=spec.seq_len, long_text="truncate", packing=False,
                      batch_size=spec.batch_size, grad_accum=1, max_steps=spec.steps, lr=LR, warmup=0,
                      lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=TARGETS, gradient_checkpointing=spec.gradient_checkpointing,
                      output_dir=out, overwrite=True, save_steps=0, eval_steps=0, logging_steps=1,
                      skip_memory_check=True, seed=0)
    losses = [h["loss"] for h in result.history if h.get("event") == "step" and h.get("loss") is not None]
    return {"train_s": result.metrics["runtime_s"], "trained_tokens": result.metrics["trained_tokens"],
            "steps": result.metrics["steps"], "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "steady_tokens_per_s": steady_rate(stamps)}


def run_trainer_peft(spec: RunSpec, model_dir: str, texts: list, out: str, precision: str, device: CudaDevice) -> dict:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PrinterCallback, Trainer,
                              TrainerCallback, TrainingArguments, default_data_collator)

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(row):
        ids = tok(row["text"], add_special_tokens=False, truncation=True, max_length=spec.seq_len)["input_ids"]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

    ds = datasets.Dataset.from_list([{"text": t} for t in texts]).map(encode, remove_columns=["text"])
    where = {"": 0} if device.kind == "cuda" else {"": "cpu"}
    if spec.method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map=where,
                                                     dtype=dtype, attn_implementation="sdpa")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=where,
                                                     attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    losses, stamps = [], []
    per_step = spec.batch_size * (spec.seq_len - 1)

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            device.sync()
            stamps.append((state.global_step, time.perf_counter(), per_step))

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=spec.batch_size, max_steps=spec.steps,
                             learning_rate=LR, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
                             report_to="none", disable_tqdm=True, fp16=precision == "fp16", bf16=precision == "bf16",
                             gradient_checkpointing=spec.gradient_checkpointing,
                             gradient_checkpointing_kwargs={"use_reentrant": False},
                             use_cpu=device.kind == "cpu", dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator,
                      callbacks=[Losses()])
    trainer.remove_callback(PrinterCallback)
    output = trainer.train()
    return {"train_s": output.metrics["train_runtime"], "trained_tokens": spec.steps * per_step,
            "steps": trainer.state.global_step, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "steady_tokens_per_s": steady_rate(stamps)}


def child(spec: RunSpec, model_dir: str, texts: list, device: CudaDevice) -> dict:
    """One run: train, then read the memory; the result is one row of the JSON."""
    import datasets
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    precision = compute_precision(spec, device.dry_run)
    out = tempfile.mkdtemp(prefix=f"gpu-suite-{spec.system}-")
    row = dataclasses.asdict(spec) | {"computes_in": precision}
    torch.manual_seed(0)
    device.reset()
    start = time.perf_counter()
    try:
        if spec.system == "ftmagic":
            row.update(run_ftmagic(spec, model_dir, texts, out, precision, device))
        else:
            row.update(run_trainer_peft(spec, model_dir, texts, out, precision, device))
    except Exception as exc:  # an out-of-memory run is a result too
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    finally:
        shutil.rmtree(out, ignore_errors=True)
    row["wall_s"] = time.perf_counter() - start
    row.update(device.memory())
    if row.get("train_s"):
        row["tokens_per_s"] = row["trained_tokens"] / row["train_s"]
    return row


# ----------------------------------------------------------------------------- the suite (parent)


def compare(rows: list) -> list:
    """ftmagic against Trainer + peft for every (model, method, precision) both ran."""
    done = {(r["model"], r["method"], r["precision"], r["system"]): r for r in rows if "tokens_per_s" in r}
    out = []
    for (model, method, precision, system), ours in done.items():
        theirs = done.get((model, method, precision, "trainer_peft"))
        if system != "ftmagic" or theirs is None:
            continue
        steady = (ours.get("steady_tokens_per_s") or 0) / theirs["steady_tokens_per_s"] \
            if theirs.get("steady_tokens_per_s") else None
        out.append({"model": model, "method": method, "precision": precision,
                    "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"], "steady_speedup": steady,
                    "memory_ratio": ours["peak_allocated_bytes"] / theirs["peak_allocated_bytes"]})
    return out


def measured_constants(rows: list, bare_context: int, gpu: GpuInfo, dry_run: bool) -> dict:
    """The CUDA context and allocator headroom that the memory calculator will read (the worst seen)."""
    from ftmagic.memory.gpus import HEADROOM_FLOOR

    ok = [r for r in rows if "error" not in r and r.get("peak_allocated_bytes")]
    context = max([bare_context] + [r["outside_allocator_bytes"] for r in ok])
    share = max([0.0] + [(r["peak_reserved_bytes"] - r["peak_allocated_bytes"]) / r["peak_allocated_bytes"]
                         for r in ok])
    return {"gpu": gpu.name, "cuda_context_bytes": int(context), "cuda_context_bare_bytes": int(bare_context),
            "allocator_headroom_share": round(share, 4), "allocator_headroom_floor_bytes": HEADROOM_FLOOR,
            "runs_measured": len(ok), "dry_run": dry_run}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _run_in_subprocess(spec: RunSpec, model_dir: Path, texts_path: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = Path(handle.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(dataclasses.asdict(spec)),
           "--model-dir", str(model_dir), "--texts", str(texts_path), "--result", str(result)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not result.stat().st_size:
        tail = proc.stdout.strip().splitlines()[-1:] or ["no output"]
        return dataclasses.asdict(spec) | {"error": f"exit status {proc.returncode}: {tail[0][:300]}"}
    return json.loads(result.read_text())


def run_suite(args, device: CudaDevice) -> dict:
    gpu = device.info()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"gpu_suite: error: unknown model {m!r}; choose from {', '.join(MODELS)}")
    seq_len = DRY_WORKLOAD["seq_len"] if device.dry_run else max(WORKLOADS[m]["seq_len"] for m in models)
    n_texts = args.steps * max(DRY_WORKLOAD["batch_size"] if device.dry_run else WORKLOADS[m]["batch_size"]
                               for m in models)
    tok, texts = build_tokenizer_and_texts(workdir, n_texts, seq_len)
    texts_path = workdir / "texts.json"
    texts_path.write_text(json.dumps(texts))
    dirs = {m: build_model_dir(m, workdir, device.dry_run, tok) for m in models}

    def need(spec: RunSpec) -> int:
        from ftmagic.memory.gpus import required_bytes

        return required_bytes(predicted_bytes(spec, str(dirs[spec.model]), device.dry_run))

    runs, skipped = plan_runs(gpu, models=models, steps=args.steps, predict=None if args.no_skip else need,
                              dry_run=device.dry_run,
                              methods=[m for m in METHODS if m in args.methods.split(",")],
                              precisions=[p for p in PRECISIONS if p in args.precisions.split(",")])
    bare = device.bare_context()
    rows = []
    for spec in runs:
        model_dir = dirs[spec.model]
        if device.dry_run:  # in-process: the CPU stand-in has no context of its own to isolate
            row = child(spec, str(model_dir), texts, device)
        else:
            row = _run_in_subprocess(spec, model_dir, texts_path)
        row["predicted_bytes"] = predicted_bytes(spec, str(model_dir), device.dry_run)
        if row.get("peak_allocated_bytes"):
            row["prediction_error"] = row["predicted_bytes"] / row["peak_allocated_bytes"] - 1
        from ftmagic.memory.architectures import resolve_model

        row["params"] = resolve_model(str(model_dir)).total_params
        rows.append(row)
        if not args.quiet:
            state = row.get("error") or f"{row.get('tokens_per_s', 0):,.0f} tokens/s, " \
                                       f"peak {row['peak_allocated_bytes'] / 2**30:.2f} GiB " \
                                       f"(predicted {row['predicted_bytes'] / 2**30:.2f})"
            print(f"{spec.model} {spec.method} {spec.precision} {spec.system}: {state}", file=sys.stderr, flush=True)
    return {"suite": "ftmagic gpu_suite", "dry_run": device.dry_run,
            "machine": {"gpu": gpu.name, "total_memory": gpu.total_memory, "bf16": gpu.bf16, **device.versions(),
                        **_versions()},
            "settings": {"steps": args.steps, "lora": LORA, "target_modules": TARGETS, "lr": LR,
                         "workloads": {m: DRY_WORKLOAD if device.dry_run else WORKLOADS[m] for m in models}},
            "runs": rows, "skipped": skipped, "comparisons": compare(rows),
            "constants": measured_constants(rows, bare, gpu, device.dry_run)}


def install_constants(result: dict) -> Path:
    """Write the measured constants where the memory calculator looks (atomically)."""
    from ftmagic.memory.gpus import constants_path, read_constants

    if result["dry_run"]:
        raise SystemExit("gpu_suite: error: a dry run measures nothing; --install needs a GPU run")
    target = constants_path()
    if target is None:
        raise SystemExit("gpu_suite: error: FTMAGIC_GPU_CONSTANTS=none turns measured constants off; unset it")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps({"constants": result["constants"], "machine": result["machine"]}, indent=1))
    read_constants(partial)  # never install a file the calculator would refuse
    os.replace(partial, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of 1b,8b")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of qlora,lora")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of fp16,bf16")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--out", default="gpu_suite.json", help="where the JSON goes")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ftmagic-gpu-suite"),
                        help="where the models and data are built once and reused")
    parser.add_argument("--install", action="store_true",
                        help="also write the measured constants where the memory calculator reads them")
    parser.add_argument("--no-skip", action="store_true", help="run even what the calculator predicts will not fit")
    parser.add_argument("--dry-run", action="store_true", help="every path but the CUDA calls, on the CPU, tiny shapes")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.probe:
        print(json.dumps(probe_gpu()))
        return 0
    if args.child:
        spec = RunSpec(**json.loads(args.child))
        row = child(spec, args.model_dir, json.loads(Path(args.texts).read_text()), CudaDevice())
        Path(args.result).write_text(json.dumps(row))
        return 0
    if args.dry_run:
        device = DryDevice()
    else:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA GPU is visible; run with --dry-run to check the suite on a CPU")
        device = CudaDevice()
    result = run_suite(args, device)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(result, indent=1))
    os.replace(partial, out)
    print(f"wrote {out}: {len(result['runs'])} runs, {len(result['skipped'])} skipped", file=sys.stderr)
    for c in result["comparisons"]:
        print(f"{c['model']} {c['method']} {c['precision']}: ftmagic {c['speedup']:.2f}x tokens/s, "
              f"{c['memory_ratio']:.2f}x peak memory of Trainer + peft")
    if args.install:
        print(f"measured constants written to {install_constants(result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

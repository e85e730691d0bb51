"""``ftmagic estimate MODEL``: the memory calculator from a shell.

Example::

    $ ftmagic estimate llama-3.1-8b --method qlora --batch-size 2 --seq-len 2048 --gpu T4
    $ ftmagic estimate ./my-checkpoint --method full --json
    $ ftmagic estimate llama-3.1-8b --method full --batch-size 8 --gpu A100 --devices 4 --strategy fsdp
"""

from __future__ import annotations

import argparse
import json

from ftmagic.errors import ConfigError


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ftmagic estimate`` (same names as the config fields)."""
    from ftmagic.constants import OPTIMIZERS
    from ftmagic.memory.gpus import GPU_PRESETS
    from ftmagic.methods import METHOD_NAMES
    from ftmagic.objectives import OBJECTIVE_NAMES
    from ftmagic.strategies import STRATEGY_NAMES

    parser.add_argument("model", help="built-in name (e.g. llama-3.2-1b), local directory, cached hub id, or tiny")
    parser.add_argument("--method", default="lora", choices=METHOD_NAMES)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch size (default 4)")
    parser.add_argument("--seq-len", "--max-seq-len", dest="seq_len", type=int, default=512,
                        help="tokens per row (default 512)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--target-modules", default="auto", help="auto, or comma-separated linear names")
    parser.add_argument("--loss", default="auto", choices=("auto", "chunked", "full"),
                        help="auto: as ftmagic trains (chunked loss); full: Hugging Face's full-logits loss")
    parser.add_argument("--objective", default="sft", choices=OBJECTIVE_NAMES,
                        help="what the run optimises (dpo, orpo, reward: two sequences per record; dpo: a reference forward)")
    parser.add_argument("--gpu", default=None, help=f"judge the fit: {', '.join(GPU_PRESETS)}, or a size in GiB")
    parser.add_argument("--devices", type=int, default=1,
                        help="GPUs training the run together; the estimate is per GPU (default 1)")
    parser.add_argument("--strategy", default="auto", choices=STRATEGY_NAMES,
                        help="with several GPUs: how they share the run (auto: DDP for adapters, FSDP for full)")
    parser.add_argument("--exact", action="store_true",
                        help="trace one step under FakeTensorMode (imports torch; seconds to a minute)")
    parser.add_argument("--json", action="store_true", help="print JSON (total_bytes, breakdown, ...)")


def run(args: argparse.Namespace) -> int:
    from ftmagic.memory.gpus import format_bytes, resolve_gpu
    from ftmagic.memory.policy import check_gpu_precision
    from ftmagic.memory.suggest import verdict_for
    from ftmagic.strategies import LABELS as STRATEGY_LABELS
    from ftmagic.api import estimate_memory
    from ftmagic.config import module_names

    targets = module_names(args.target_modules)  # read as the config reads it
    if isinstance(targets, str) and targets not in ("auto", "all-linear"):
        raise ConfigError("`--target-modules` is empty; use auto or comma-separated linear names")
    gpu = resolve_gpu(args.gpu)
    if gpu is not None:
        check_gpu_precision(args.precision, gpu.bf16, gpu.name)  # named here; the estimate would say "this GPU"
    estimate = estimate_memory(
        args.model, method=args.method, precision=args.precision, batch_size=args.batch_size,
        seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
        lora_r=args.lora_r, lora_dropout=args.lora_dropout, target_modules=targets, grad_accum=args.grad_accum,
        bf16_supported=gpu.bf16 if gpu else True, mode="exact" if args.exact else "analytic", loss=args.loss,
        devices=args.devices, strategy=args.strategy, objective=args.objective)
    verdict = verdict_for(estimate, gpu)
    if args.json:
        out = estimate.to_dict()
        if gpu is not None:
            out["gpu"] = {"name": gpu.name, "total_bytes": gpu.total_bytes}
            out["fits"] = verdict.fits
            out["suggestions"] = [{"label": s.label, "changes": s.changes, "total_bytes": s.estimate.total_bytes,
                                   "required_bytes": s.required_bytes, "fits": s.fits} for s in verdict.suggestions]
        print(json.dumps(out, indent=2, default=str))
        return 0
    s = estimate.settings
    print(f"{estimate.model}: {s['method']} {s['precision']}, batch {s['batch_size']} x {s['seq_len']} tokens"
          f"{', gradient checkpointing' if s['gradient_checkpointing'] else ''}, {s['optimizer']}"
          + (f"; per GPU of {s['devices']} ({STRATEGY_LABELS[s['strategy']]})" if s.get("devices", 1) > 1 else ""))
    print(f"  trainable parameters {estimate.trainable_params:,} of {estimate.total_params:,}")
    for key, value in estimate.breakdown.items():
        if value:
            print(f"  {key:26} {format_bytes(value):>12}")
    if estimate.paged_optimizer_states:
        print(f"  {'paged_optimizer_states':26} {format_bytes(estimate.paged_optimizer_states):>12}  (host memory)")
    print(f"  {'peak (' + estimate.peak_phase + ')':26} {format_bytes(estimate.total_bytes):>12}")
    for note in estimate.notes:
        print(f"  note: {note}")
    if gpu is not None:
        print(verdict.message)
        for i, sug in enumerate(verdict.suggestions, 1):
            mark = "fits" if sug.fits else "does not fit"
            print(f"  {i}. {sug.label}: {format_bytes(sug.required_bytes)} ({mark})")
    return 0

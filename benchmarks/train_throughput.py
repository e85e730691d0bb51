"""Side-by-side LoRA fine-tuning throughput: transformers Trainer + peft, TRL SFTTrainer, ftmagic.

All three systems train the same randomly initialised Llama-style model (about 28M
parameters, built from a config with a fixed seed) on the same generated instruction
records (long-tailed lengths, at most 512 tokens), with the same LoRA settings, effective
batch, learning rate, schedule and number of examples, loss on the answers only:

* ``trainer_peft``: ``transformers.Trainer`` + ``peft`` with dynamic padding
  (``DataCollatorForSeq2Seq``): the recipe most Colab notebooks use;
* ``trl``: TRL ``SFTTrainer`` in its fastest configuration here (packing with BFD, or
  padding-free batches; ``--trl-mode`` picks, ``both`` runs both and keeps the faster);
* ``ftmagic``: ``ftmagic.engine.run.finetune(...)``.

Each system runs in its own subprocess, so peak memory is its own: peak RSS
(``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA, read when training
ends. ``wall_s`` runs from handing the model directory and the records to the system until
training is done (tokenising, loading, adapter set-up and training; library imports are
done before). ``tokens_per_s`` is the number of loss-bearing tokens of the training examples
(counted once, with one reference encoding, the same for every system) over ``wall_s``.
``eval_loss`` is computed after training by the same function for every system: mean
next-token cross-entropy over the answer tokens of a held-out set.

Usage::

    python benchmarks/train_throughput.py --quick          # all three in a few minutes on 2 CPU cores
    python benchmarks/train_throughput.py                  # the full size
    python benchmarks/train_throughput.py --quick --json   # one JSON object keyed by system

Needs the ``bench`` extra (``pip install -e .[bench]``: trl). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_limit import limit_fields, matmul_peak, run_flops

SYSTEMS = ("trainer_peft", "trl", "ftmagic")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The model: Llama-style, about 28M parameters, a 16k vocabulary (untied head).
MODEL_CONFIG = dict(vocab_size=16384, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                    tie_word_embeddings=False)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
MAX_LEN = 512
SIZES = {
    # examples trained on (one epoch), held-out examples, micro-batch, gradient accumulation
    "quick": dict(train=192, eval=48, batch_size=8, grad_accum=2),
    "probe": dict(train=96, eval=16, batch_size=8, grad_accum=2),  # for A/B runs of one change
    "full": dict(train=2000, eval=200, batch_size=8, grad_accum=2),
}
TRAIN_RECORDS, EVAL_RECORDS = 3000, 300  # generated once; a size trains on the first `train`
HPARAMS = dict(lr=1e-3, warmup=0.03, scheduler="cosine", weight_decay=0.0, max_grad_norm=1.0, seed=0)


# ------------------------------------------------------------------------ data

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["an", "el", "in", "or", "us", "th", "sh"]
_FUNCTION_WORDS = ("the a of and to in is was that it for on with as by at from this be are or an "
                   "which one all there their when who will more no if out so up what about into "
                   "than them can only other new some could time these two may then first any").split()


def _vocabulary(rng: random.Random, n: int = 4000) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


class _Words:
    """Zipf-distributed word sampler: a few words are frequent, most are rare, as in real text."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.words = _FUNCTION_WORDS + _vocabulary(rng)
        weights = [1.0 / (i + 1) ** 1.05 for i in range(len(self.words))]
        total = sum(weights)
        self.cum, acc = [], 0.0
        for w in weights:
            acc += w / total
            self.cum.append(acc)

    def word(self) -> str:
        import bisect
        return self.words[min(bisect.bisect_left(self.cum, self.rng.random()), len(self.words) - 1)]

    def sentence(self, n: int | None = None) -> str:
        n = n or max(3, int(self.rng.lognormvariate(math.log(11), 0.4)))
        text = " ".join(self.word() for _ in range(n))
        return text[0].upper() + text[1:] + self.rng.choice((".", ".", ".", "!", "?"))

    def paragraph(self, sentences: int) -> str:
        return " ".join(self.sentence() for _ in range(sentences))


def _lognormal_count(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def generate_records(n: int, seed: int) -> list[dict]:
    """``n`` instruction records (``messages`` format) of several task kinds with long-tailed lengths.

    The answers follow learnable rules (reverse, sort, count, add, look up a fixed fact,
    summarise = first sentence) next to free text, so a LoRA run's eval loss moves.
    """
    rng = random.Random(seed)
    words = _Words(random.Random(1234))  # the same vocabulary for every split
    facts_rng = random.Random(99)
    countries = words.words[60:460]
    capitals = {c: facts_rng.choice(words.words[460:2000]).capitalize() for c in countries}
    records = []
    for _ in range(n):
        kind = rng.choices(("story", "reverse", "sort", "summary", "list", "fact", "add", "count"),
                           weights=(26, 12, 10, 14, 14, 10, 7, 7))[0]
        words.rng = rng
        if kind == "story":
            a, b = words.word(), words.word()
            prompt = f"Write a short story about {a} and {b}."
            answer = words.paragraph(_lognormal_count(rng, 8, 0.9, 1, 60))
        elif kind in ("reverse", "sort"):
            items = [words.word() for _ in range(_lognormal_count(rng, 16, 0.8, 2, 200))]
            if kind == "reverse":
                prompt, answer = "Reverse the order of these words: " + " ".join(items), " ".join(items[::-1])
            else:
                prompt, answer = "Sort these words alphabetically: " + " ".join(items), " ".join(sorted(items))
        elif kind == "summary":
            text = words.paragraph(_lognormal_count(rng, 9, 0.8, 2, 60))
            prompt = "Summarize the following text in one sentence.\n\n" + text
            answer = text.split(". ")[0].rstrip(".!?") + "."
        elif kind == "list":
            n_items = _lognormal_count(rng, 6, 0.7, 2, 30)
            prompt = f"List {n_items} facts about {words.word()}."
            answer = "\n".join(f"{i + 1}. {words.sentence()}" for i in range(n_items))
        elif kind == "fact":
            country = rng.choice(countries)
            prompt, answer = f"What is the capital of {country.capitalize()}?", \
                f"The capital of {country.capitalize()} is {capitals[country]}."
        elif kind == "add":
            x, y = rng.randint(0, 999), rng.randint(0, 999)
            prompt, answer = f"What is {x} + {y}?", f"{x} + {y} = {x + y}."
        else:
            items = [words.word() for _ in range(_lognormal_count(rng, 14, 0.8, 1, 200))]
            prompt, answer = "How many words are in this text? " + " ".join(items), str(len(items))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.2:
            messages.insert(0, {"role": "system", "content": words.sentence()})
        records.append({"messages": messages})
    return records


def encode(tokenizer, record: dict, max_len: int = MAX_LEN) -> dict:
    """Reference encoding: chat template, loss on the answer and its end-of-turn token, truncated at ``max_len``."""
    messages = record["messages"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids, "prompt tokens must be a prefix of the full encoding"
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
    # The template's newline after the end-of-turn token carries no loss (as in ftmagic's data
    # layer), so every system trains on, and is evaluated on, the same tokens.
    eos = tokenizer.eos_token_id
    if eos in ids[len(prompt_ids):]:
        last = len(ids) - 1 - ids[::-1].index(eos)
        labels[last + 1:] = [-100] * (len(labels) - last - 1)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def trained_tokens(examples: list[dict]) -> int:
    """Loss-bearing tokens: labels that a next-token loss uses (every labelled position but the first)."""
    return sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)


# ------------------------------------------------------------------------ set-up (parent)

def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_workdir(workdir: Path) -> Path:
    """Tokenizer, model and data, built once with fixed seeds and reused by every system."""
    marker = workdir / "ready.json"
    if marker.exists():
        return workdir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    workdir.mkdir(parents=True, exist_ok=True)
    train = generate_records(TRAIN_RECORDS, seed=1)
    evals = generate_records(EVAL_RECORDS, seed=2)
    for name, recs in (("train", train), ("eval", evals)):
        with open(workdir / f"{name}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")

    tok = build_tokenizer([m["content"] for r in train for m in r["messages"]], MODEL_CONFIG["vocab_size"])

    torch.manual_seed(0)
    config = LlamaConfig(**MODEL_CONFIG, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    model = LlamaForCausalLM(config)
    model_dir = workdir / "model"
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    lengths = sorted(len(encode(tok, r)["input_ids"]) for r in train)
    stats = {"params": sum(p.numel() for p in model.parameters()), "tokenizer_vocab": len(tok),
             "length_p10_p50_p90_p99_max": [lengths[int(q * (len(lengths) - 1))] for q in (.1, .5, .9, .99, 1)],
             "truncated": sum(1 for r in train if len(encode(tok, r, 10**9)["input_ids"]) > MAX_LEN)}
    marker.write_text(json.dumps(stats))
    return workdir


def load_records(workdir: Path, split: str, n: int) -> list[dict]:
    with open(workdir / f"{split}.jsonl") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


# ------------------------------------------------------------------------ per-system runs (child)

def _device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _peak_bytes() -> int:
    import torch
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# The precision every system computes in (--precision): fp32 by default, held equal; `bf16` runs
# each in bf16 autocast with a bf16 base (fp32 adapters), on a GPU that has it or a CPU that does.
PRECISION = {"value": "fp32"}


def _bf16() -> bool:
    return PRECISION["value"] == "bf16"


def _hf_schedule_args(size: dict, out: str) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=size["batch_size"],
                gradient_accumulation_steps=size["grad_accum"], learning_rate=HPARAMS["lr"], num_train_epochs=1,
                lr_scheduler_type=HPARAMS["scheduler"], warmup_steps=HPARAMS["warmup"],
                weight_decay=HPARAMS["weight_decay"], max_grad_norm=HPARAMS["max_grad_norm"], seed=HPARAMS["seed"],
                logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
                bf16=_bf16(), fp16=False, use_cpu=_device() == "cpu", dataloader_num_workers=0)


def _lora_config():
    from peft import LoraConfig
    return LoraConfig(task_type="CAUSAL_LM", **LORA)


def run_trainer_peft(model_dir: str, records: list[dict], size: dict, out: str):
    """(a) The common Colab recipe: datasets.map tokenisation, Trainer, dynamic padding."""
    import datasets
    import torch
    from peft import get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = datasets.Dataset.from_list(records).map(lambda r: encode(tok, r), remove_columns=["messages"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if _bf16() else torch.float32)
    model = get_peft_model(model, _lora_config())
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=TrainingArguments(**_hf_schedule_args(size, out)), train_dataset=ds,
                      data_collator=collator)
    output = trainer.train()
    return model, trainer.state.global_step, output.metrics.get("train_runtime")


def packed_rows_per_step(size: dict, mean_len: float) -> int:
    # With packing, a batch counts rows of up to 512 tokens: this many rows per optimizer step
    # hold about as many examples as the others' effective batch, so all take as many steps.
    return max(1, round(size["batch_size"] * size["grad_accum"] * mean_len / MAX_LEN))


def run_trl(model_dir: str, records: list[dict], size: dict, out: str, mode: str, mean_len: float):
    """(b) TRL SFTTrainer, packing (BFD) or padding-free, loss on the completion."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def tokenize(record):
        # The same tokens as the other systems; TRL takes pre-tokenised rows with a completion mask.
        e = encode(tok, record)
        return {"input_ids": e["input_ids"], "completion_mask": [int(t != -100) for t in e["labels"]]}

    ds = datasets.Dataset.from_list(records).map(tokenize, remove_columns=["messages"])
    args = _hf_schedule_args(size, out)
    if mode == "packing":
        args.update(per_device_train_batch_size=packed_rows_per_step(size, mean_len), gradient_accumulation_steps=1)
    # Padding-free without packing wants pre-truncated rows and max_length=None (it cannot truncate).
    config = SFTConfig(**args, max_length=MAX_LEN if mode == "packing" else None, packing=mode == "packing",
                       padding_free=mode == "padding_free", completion_only_loss=True,
                       gradient_checkpointing=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if _bf16() else torch.float32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok,
                         peft_config=_lora_config())
    output = trainer.train()
    return trainer.model, trainer.state.global_step, output.metrics.get("train_runtime")


def run_ftmagic(model_dir: str, records: list[dict], size: dict, out: str, extra: dict):
    """(c) ftmagic: the same settings through ``finetune``; the records go in as a list of dicts."""
    from ftmagic.engine.run import finetune

    # Exactly (a)'s batch settings. No `packing` needed: ftmagic's loop flattens every micro-batch
    # into one unpadded row with per-example attention (packing measured no faster here).
    settings = dict(model=model_dir, data=records, format="messages", max_seq_len=MAX_LEN, packing=False,
                    train_on="completions", epochs=1, batch_size=size["batch_size"], grad_accum=size["grad_accum"],
                    lr=HPARAMS["lr"], scheduler=HPARAMS["scheduler"], warmup=HPARAMS["warmup"],
                    weight_decay=HPARAMS["weight_decay"], max_grad_norm=HPARAMS["max_grad_norm"],
                    lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                    target_modules=list(LORA["target_modules"]), gradient_checkpointing=False,
                    output_dir=out, overwrite=True, logging_steps=10, seed=HPARAMS["seed"],
                    precision=PRECISION["value"])
    settings.update(extra)
    result = finetune(**settings)
    return result, int(result.metrics.get("steps", 0)), result.metrics.get("runtime_s")


FTMAGIC_VARIANTS = {
    "full": "everything on (the default)",
    "no_fast_path": "the model's own forward on padded packed rows with a block-diagonal 4D mask, full logits",
    "no_chunked_loss": "flattened rows and per-example attention, but full logits and torch cross-entropy",
    "no_varlen": "flattened rows and chunked loss, but one SDPA over the whole row with a packed mask",
    "no_fused_lora": "peft's own LoRA forward (dropout mask, scaled copy and add as separate passes)",
}


def _apply_ftmagic_variant(variant: str) -> None:
    """Turn one speed-up of ftmagic's loop off, to measure what it brings (``--ftmagic-variant``)."""
    import contextlib

    import torch.nn.functional as F

    from ftmagic.engine import fastpath, objectives

    if variant == "no_fast_path":
        objectives.supports_fast_path = lambda model: False
    elif variant == "no_chunked_loss":
        def full_logits_loss(model, batch, *, reduction="sum"):
            lm = fastpath._causal_lm(model)
            inputs = {k: batch[k] for k in ("input_ids", "position_ids") if k in batch}
            hidden = getattr(lm, lm.base_model_prefix)(**inputs, seq_bounds=batch.get("seq_bounds"),
                                                        use_cache=False).last_hidden_state
            logits = lm.get_output_embeddings()(hidden).float()
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                   ignore_index=-100, reduction=reduction)
        objectives.fast_loss = full_logits_loss
    elif variant == "no_varlen":
        # SDPA sees the packed position_ids and builds a [T, T] block-diagonal mask itself.
        fastpath.varlen_attention = lambda model: contextlib.nullcontext()
        flatten = objectives.flatten_batch
        objectives.flatten_batch = lambda rows, **kw: {k: v for k, v in flatten(rows, **kw).items() if k != "seq_bounds"}
    elif variant == "no_fused_lora":
        fastpath.fused_lora = lambda model: contextlib.nullcontext()
    elif variant != "full":
        raise SystemExit(f"unknown --ftmagic-variant {variant!r}; choose from {', '.join(FTMAGIC_VARIANTS)}")


def _ftmagic_trained_model(result, model_dir: str):
    """The trained model of a RunResult: kept in memory when the engine exposes it, else reloaded."""
    for name in ("model", "_model"):
        model = getattr(result, name, None)
        if model is not None and hasattr(model, "parameters"):
            return model
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = Path(result.output_dir)
    for candidate in (adapter, adapter / "adapter", adapter / "final"):
        if (candidate / "adapter_config.json").exists():
            return PeftModel.from_pretrained(base, str(candidate))
    raise FileNotFoundError(f"no adapter_config.json under {adapter}")


def evaluate(model, tokenizer, records: list[dict], token_budget: int = 4096) -> float:
    """Mean next-token cross-entropy over the answer tokens of ``records`` (one function for all systems)."""
    import torch
    import torch.nn.functional as F

    examples = sorted((encode(tokenizer, r) for r in records), key=lambda e: len(e["input_ids"]))
    device = next(model.parameters()).device
    model.eval()
    total, count, i = 0.0, 0, 0
    with torch.no_grad():
        while i < len(examples):
            batch = [examples[i]]
            while i + len(batch) < len(examples) and \
                    (len(batch) + 1) * len(examples[i + len(batch)]["input_ids"]) <= token_budget:
                batch.append(examples[i + len(batch)])
            i += len(batch)
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, e in enumerate(batch):
                n = len(e["input_ids"])
                ids[row, :n] = torch.tensor(e["input_ids"])
                labels[row, :n] = torch.tensor(e["labels"])
                mask[row, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shifted = labels[:, 1:].to(device)
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((shifted != -100).sum())
    return total / count


def child(system: str, workdir: Path, size_name: str, result_path: Path, trl_mode: str, ftmagic_extra: dict,
          threads: int = 0, variant: str = "full", precision: str = "fp32") -> None:
    PRECISION["value"] = precision
    # Imports first, so wall time measures the run, not loading libraries.
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import AutoTokenizer
    import transformers.models.llama.modeling_llama  # noqa: F401  (lazy in transformers; same for all)
    from peft import get_peft_model  # noqa: F401
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401
    if system == "trl":
        from trl import SFTConfig, SFTTrainer  # noqa: F401
    if system == "ftmagic":
        import ftmagic.data  # noqa: F401
        import ftmagic.engine.run  # noqa: F401
        _apply_ftmagic_variant(variant)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    size = SIZES[size_name]
    model_dir = str(workdir / "model")
    records = load_records(workdir, "train", size["train"])
    eval_records = load_records(workdir, "eval", size["eval"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    reference = [encode(tok, r) for r in records]
    tokens = trained_tokens(reference)
    mean_len = sum(len(e["input_ids"]) for e in reference) / len(reference)
    out = tempfile.mkdtemp(prefix=f"bench-{system}-")
    random.seed(0)
    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    if threads:
        torch.set_num_threads(threads)
        if system == "ftmagic":
            ftmagic_extra = {"threads": threads, **ftmagic_extra}
    if system == "ftmagic":
        # What finetune() does first: oneDNN reads its cache size at the first kernel it builds,
        # which would otherwise be the peak's multiply below, before finetune() could set it.
        from ftmagic.engine.device import choose_device, detect_caps, limit_onednn_cache

        limit_onednn_cache(choose_device(detect_caps(), precision=precision))
    # The limit: the matmul peak in the dtype the run computes in, with its threads, before and after it.
    peaks = [matmul_peak(precision, device=_device())]
    start, cpu_start = time.perf_counter(), time.process_time()
    if system == "trainer_peft":
        model, steps, train_s = run_trainer_peft(model_dir, records, size, out)
    elif system == "trl":
        model, steps, train_s = run_trl(model_dir, records, size, out, trl_mode, mean_len)
    else:
        result, steps, train_s = run_ftmagic(model_dir, records, size, out, ftmagic_extra)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    # CPU seconds of this process: with --threads 1 a comparison that other load barely moves.
    cpu = time.process_time() - cpu_start
    peak = _peak_bytes()
    peaks.append(matmul_peak(precision, device=_device()))
    best = {key: max(p[key] for p in peaks) for key in ("flops_per_s", "flops_per_cpu_s")}
    work = run_flops(model_dir, reference, lora_r=LORA["r"], target_modules=LORA["target_modules"])

    if system == "ftmagic":
        model = _ftmagic_trained_model(result, model_dir)
    # Every system's adapter is scored in fp32, whatever it trained in.
    eval_loss = evaluate(model.float(), tok, eval_records)
    report = {"wall_s": wall, "tokens_per_s": tokens / wall, "peak_bytes": peak, "eval_loss": eval_loss,
              "trained_tokens": tokens, "steps": steps, "examples": len(records), "cpu_s": cpu, "train_s": train_s,
              "precision": precision, "threads": torch.get_num_threads(),
              "flops_per_token": work["flops_per_token"], "matmul_peak": best,
              **limit_fields(tokens=tokens, wall_s=wall, cpu_s=cpu, train_s=train_s,
                             flops_per_token=work["flops_per_token"], peak=best)}
    if system == "trl":
        report["mode"] = trl_mode
    if system == "ftmagic" and variant != "full":
        report["variant"] = variant
    result_path.write_text(json.dumps(report))


# ------------------------------------------------------------------------ parent

def run_system(system: str, args, workdir: Path, trl_mode: str = "padding_free") -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--workdir", str(workdir),
           "--size", args.size, "--result", str(result_path), "--trl-mode", trl_mode,
           "--ftmagic-extra", args.ftmagic_extra, "--threads", str(args.threads),
           "--ftmagic-variant", args.ftmagic_variant, "--precision", args.precision]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + f"\n{system} failed with exit status {proc.returncode}\n")
        return None
    return json.loads(result_path.read_text())


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def format_table(results: dict) -> str:
    """The per-system table, then ftmagic against each other system."""
    ref = results.get("ftmagic")
    head = f"{'system':<14}{'wall s':>9}{'CPU s':>9}{'tokens/s':>10}{'limit':>7}{'train':>7}{'peak mem':>11}" \
           f"{'eval loss':>11}{'tok/s vs ftmagic':>18}{'mem vs ftmagic':>16}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mem = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else "-"
        share = f"{100 * r['limit_share']:.0f}%" if "limit_share" in r else "-"
        train = f"{100 * r['train_limit_share']:.0f}%" if r.get("train_limit_share") else "-"
        lines.append(f"{name:<14}{r['wall_s']:>9.1f}{r.get('cpu_s', 0):>9.1f}{r['tokens_per_s']:>10,.0f}{share:>7}"
                     f"{train:>7}{_mb(r['peak_bytes']):>11}{r['eval_loss']:>11.4f}{speed:>18}{mem:>16}")
    notes = [f"{name}: TRL mode {r['mode']}" for name, r in results.items() if "mode" in r]
    notes += [f"{name}: variant {r['variant']}" for name, r in results.items() if "variant" in r]
    if notes:
        lines.append("(" + "; ".join(notes) + ")")
    first = next(iter(results.values()), None)
    if first and "flops_per_token" in first:
        lines.append(f"limit: {first['flops_per_token'] / 1e6:.1f} MFLOP per trained token; measured "
                     f"{first['precision']} matmul peak {first['matmul_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s on "
                     f"{first['threads']} thread(s), so at most {first['matmul_peak']['flops_per_s'] / first['flops_per_token']:,.0f} "
                     "tokens/s ('limit': share of it over the whole run; 'train': over the training loop)")
    if ref:
        lines.append("")
        for name, r in results.items():
            if name != "ftmagic":
                lines.append(f"ftmagic vs {name}: {ref['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s, "
                             f"{ref['peak_bytes'] / r['peak_bytes']:.2f}x peak memory, "
                             f"eval loss {100 * (ref['eval_loss'] / r['eval_loss'] - 1):+.2f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small size (a few minutes on 2 CPU cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by system")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--trl-mode", default="padding_free", choices=("packing", "padding_free", "both"),
                        help="TRL's configuration; 'both' runs both and reports the faster as 'trl'")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ftmagic-bench"),
                        help="where the model and data are built once and reused")
    parser.add_argument("--ftmagic-extra", default="{}", help="JSON of extra finetune() settings, for experiments")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="what every system computes in (bf16: on a GPU or CPU that has it)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per system (default: torch's choice, all cores)")
    parser.add_argument("--ftmagic-variant", default="full", choices=list(FTMAGIC_VARIANTS),
                        help="turn one of ftmagic's speed-ups off: " + "; ".join(f"{k}: {v}" for k, v in FTMAGIC_VARIANTS.items()))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    if args.child:
        child(args.child, workdir, args.size, Path(args.result), args.trl_mode, json.loads(args.ftmagic_extra),
              args.threads, args.ftmagic_variant, args.precision)
        return 0

    args.size = args.size or ("quick" if args.quick else "full")
    build_workdir(workdir)
    info = json.loads((workdir / "ready.json").read_text())
    results = {}
    for system in [s.strip() for s in args.systems.split(",") if s.strip()]:
        if system not in SYSTEMS:
            parser.error(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
        if system == "trl" and args.trl_mode == "both":
            runs = {mode: run_system("trl", args, workdir, mode) for mode in ("packing", "padding_free")}
            runs = {mode: r for mode, r in runs.items() if r is not None}
            if not runs:
                continue
            best = max(runs, key=lambda m: runs[m]["tokens_per_s"])
            results["trl"] = runs[best]
            for mode, r in runs.items():
                if mode != best:
                    results[f"trl_{mode}"] = r
        else:
            results[system] = run_system(system, args, workdir, args.trl_mode)
            if results[system] is None:
                del results[system]
                continue
        if not args.json:
            print(f"{system}: done in {results[system]['wall_s']:.1f}s", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        size = SIZES[args.size]
        print(f"model: Llama-style, {info['params'] / 1e6:.1f}M parameters; LoRA r={LORA['r']} on "
              f"{len(LORA['target_modules'])} projections; {size['train']} examples, effective batch "
              f"{size['batch_size'] * size['grad_accum']}, lr {HPARAMS['lr']}; lengths p10/p50/p90/p99/max "
              f"{info['length_p10_p50_p90_p99_max']}")
        print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the embedded default model, ``model: tiny`` (``ftmagic/assets/tiny/``), from nothing.

The script generates its own corpus (chat conversations of small string tasks plus plain
sentences), builds a byte-level tokenizer with a ChatML chat template, and pretrains a
small Llama-style causal LM on it. Everything is seeded and runs single-process on the
CPU with a fixed thread count, so the same command writes the same weights.

The resulting base model follows the chat format and always stops at ``<|im_end|>``. It is
a small model trained briefly: on random 3-9 letter inputs it gets first letter and length
right (100% / 90% on 20 samples each), copy and drop-last-letter half the time, and the
rest (uppercase, spell, last letter, ...) mostly wrong. It was never shown reversal, which
is what the demo task (:mod:`ftmagic.demo`) teaches it with LoRA (0% -> 100% held-out).

Usage (the shipped checkpoint was built with exactly this command; the defaults)::

    python scripts/build_tiny_model.py --output ftmagic/assets/tiny --steps 2400 --batch-size 16 --threads 1

It took 846 s (14 minutes) of wall time on a 2-core machine shared with other jobs
(load average 8-10), about 0.35 s a step; an idle machine is several times faster.
One thread: with the CPU shared, a second thread mostly spins waiting for the first
(measured: 2x the CPU time for the same steps), and one thread also gives the most
reproducible summation order.

A fast smoke build (used by the determinism test)::

    python scripts/build_tiny_model.py --output /tmp/tiny-smoke --steps 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import string
import time

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The architecture of the shipped model: ~1.0M parameters, 4 MB in fp32.
MODEL_SETTINGS = dict(hidden_size=144, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=512, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True)

# Real words give the plain text something to say; random letter strings make the string
# skills work on any input, not only on words seen in pretraining.
WORDS = (
    "apple river stone cloud green table house light water paper music happy quick brown "
    "fox dog cat bird fish tree leaf road city train plane ship book pen cup door window "
    "chair bread milk tea coffee sugar salt rain snow wind sun moon star night day morning "
    "evening summer winter spring autumn red blue yellow black white small large long short "
    "warm cold soft hard fast slow old new young bright dark happy calm loud quiet simple "
    "garden forest mountain valley ocean island bridge tower market school teacher student "
    "friend family mother father sister brother child king queen doctor farmer baker "
    "painter singer writer reader runner walker model data token tensor python code list "
    "word letter number answer question story game ball kite lamp clock phone piano violin"
).split()
SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a small bird", "the old man", "her brother",
            "the children", "a farmer", "the queen", "our team", "the model"]
VERBS = ["sees", "likes", "finds", "paints", "carries", "reads", "builds", "watches", "follows", "draws"]
PLACES = ["in the garden", "by the river", "at the market", "on the hill", "near the school",
          "under the tree", "in the city", "at night", "in the morning", "by the sea"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a careful assistant. Answer briefly.",
                  "Answer with the result only."]


def random_word(rng: random.Random) -> str:
    """A lowercase input string: a real word or random letters (3 to 9 characters)."""
    if rng.random() < 0.4:
        return rng.choice(WORDS)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))


def _count_task(rng: random.Random, word: str):
    letter = rng.choice(word) if rng.random() < 0.7 else rng.choice(string.ascii_lowercase)
    return f"count {letter}: {word}", str(word.count(letter))


# name -> function(rng, word) -> (prompt, answer). Never reversal: that is the demo task.
TASKS = {
    "uppercase": lambda rng, w: (f"uppercase: {w}", w.upper()),
    "lowercase": lambda rng, w: (f"lowercase: {w.upper()}", w),
    "capitalize": lambda rng, w: (f"capitalize: {w}", w.capitalize()),
    "copy": lambda rng, w: (f"copy: {w}", w),
    "double": lambda rng, w: (f"double: {w}", w + w),
    "first": lambda rng, w: (f"first letter: {w}", w[0]),
    "last": lambda rng, w: (f"last letter: {w}", w[-1]),
    "length": lambda rng, w: (f"length: {w}", str(len(w))),
    "spell": lambda rng, w: (f"spell: {w}", " ".join(w)),
    "join": lambda rng, w: (f"join: {' '.join(w)}", w),
    "drop_first": lambda rng, w: (f"drop first letter: {w}", w[1:]),
    "drop_last": lambda rng, w: (f"drop last letter: {w}", w[:-1]),
    "count": _count_task,
}


def sentence(rng: random.Random) -> str:
    """A short plain-English sentence from a small grammar."""
    obj = rng.choice(WORDS)
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} the {obj} {rng.choice(PLACES)}."
    return text[0].upper() + text[1:]


def conversation(rng: random.Random) -> list:
    """One chat: an optional system prompt and one to three task turns."""
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 3)):
        if rng.random() < 0.08:
            # Chit-chat turns so a free-form question still gets a short, terminated answer.
            prompt, answer = "write a sentence", sentence(rng)
        else:
            prompt, answer = TASKS[rng.choice(sorted(TASKS))](rng, random_word(rng))
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return messages


def document(rng: random.Random, tokenizer) -> str:
    """A pretraining document: mostly rendered chats, some plain text."""
    if rng.random() < 0.1:
        return " ".join(sentence(rng) for _ in range(rng.randint(1, 2))) + "<|endoftext|>"
    return tokenizer.apply_chat_template(conversation(rng), tokenize=False)


def build_tokenizer():
    """A byte-level tokenizer (no merges: each byte is one token, so string tasks see letters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None, model_max_length=MODEL_SETTINGS["max_position_embeddings"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _length_grouped_batches(rng: random.Random, tokenizer, batch_size: int, group: int = 16) -> list:
    """``group`` batches of token rows, each batch of similar lengths (less compute on padding)."""
    rows = [tokenizer(document(rng, tokenizer), add_special_tokens=False)["input_ids"]
            for _ in range(batch_size * group)]
    rows.sort(key=len)
    batches = [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    rng.shuffle(batches)
    return batches


def build(output: str, steps: int = 2400, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
          threads: int = 1, log_every: int = 100) -> dict:
    """Generate the corpus, pretrain, and save model + tokenizer to ``output``; returns stats.

    Example::

        build("/tmp/tiny", steps=3)
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    # Tiny weights and activations drift into subnormal floats, which x86 CPUs handle
    # 10-100x slower; flushing them to zero keeps every step equally fast.
    torch.set_flush_denormal(True)
    rng = random.Random(seed)

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **MODEL_SETTINGS)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))
    warmup = min(100, max(1, steps // 10))

    def lr_at(step: int) -> float:
        # Linear warmup, then cosine down to a tenth of the peak.
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    pad = tokenizer.pad_token_id
    start = time.time()
    losses = []
    pending: list = []
    for step in range(steps):
        if not pending:
            pending = _length_grouped_batches(rng, tokenizer, batch_size)
        rows = pending.pop()
        width = max(len(r) for r in rows)
        ids = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"step {step + 1}/{steps}  loss {recent:.4f}  {time.time() - start:.0f}s", flush=True)

    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                                               do_sample=False, max_new_tokens=64)
    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    for name in os.listdir(output):
        # safetensors writes 0600; files installed from a wheel must be readable by every user.
        os.chmod(os.path.join(output, name), 0o644)
    stats = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads,
             "parameters": sum(p.numel() for p in model.parameters()),
             "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4) if losses else None,
             "runtime_s": round(time.time() - start, 1)}
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "..", "ftmagic", "assets", "tiny"))
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; the same count gives the same weights")
    args = parser.parse_args(argv)
    stats = build(args.output, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  threads=args.threads)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Small data for engine tests: encoded rows built directly from the test tokenizer.

The engine's own tests should not depend on every detail of the data pipeline, so they
build rows the way the pipeline's contract describes (``input_ids``, ``labels`` with
-100 on the prompt) from a tiny reversal task.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

WORDS = ["abc", "hello", "data", "tensor", "model", "fox", "dog", "train", "test", "python", "world", "quick"]


def reversal_records(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"reverse: {w}", "completion": w[::-1]} for w in (rng.choice(WORDS) for _ in range(n))]


def encode(tokenizer, record: dict, max_seq_len: int = 64) -> dict:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(record["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = (p + a)[:max_seq_len]
    labels = ([-100] * len(p) + a)[:max_seq_len]
    return {"input_ids": ids, "labels": labels}


def pack(rows: list[dict], max_seq_len: int) -> list[dict]:
    packed, cur = [], {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for row in rows:
        if cur["input_ids"] and len(cur["input_ids"]) + len(row["input_ids"]) > max_seq_len:
            packed.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        cur["input_ids"] += row["input_ids"]
        cur["labels"] += row["labels"]
        cur["position_ids"] += list(range(len(row["input_ids"])))
        cur["seq_lens"].append(len(row["input_ids"]))
    if cur["input_ids"]:
        packed.append(cur)
    return packed


def fake_prepare_data(config, tokenizer):
    """Stands in for ``ftmagic.data.prepare_data``: records in ``config.data`` -> PreparedData."""
    records = list(config.data)
    train = [encode(tokenizer, r, config.max_seq_len) for r in records]
    evals = [encode(tokenizer, r, config.max_seq_len) for r in config.eval_data] if config.eval_data else None
    if config.packing:
        train = pack(train, config.max_seq_len)
    stats = {"format": "prompt_completion", "records": len(records), "skipped": 0, "truncated": 0,
             "train_examples": len(train), "eval_examples": len(evals or []),
             "trained_tokens": sum(sum(1 for x in r["labels"] if x != -100) for r in train)}
    return SimpleNamespace(train=train, eval=evals, stats=stats)


def collect():
    """An ``on_event`` callback that keeps every event; returns (callback, list)."""
    events: list[dict] = []
    return events.append, events


class StopAt:
    """A ``stop`` object that becomes set once the run reports ``step``."""

    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def __call__(self, event: dict) -> None:
        if event.get("event") == "step":
            self.seen = event["step"]

    def is_set(self) -> bool:
        return self.seen >= self.step


def step_losses(events) -> dict:
    return {e["step"]: e["loss"] for e in events if e.get("event") == "step"}

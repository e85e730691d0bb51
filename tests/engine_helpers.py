"""Small helpers for engine tests: a tiny reversal task, an event collector, a stop object.

``encode`` builds rows the way the data pipeline's contract describes (``input_ids``,
``labels`` with -100 on the prompt), for tests that drive the loop without the pipeline.
"""

from __future__ import annotations

import random

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


def collect():
    """An ``on_event`` callback that keeps every event in its dict form; returns (callback, list)."""
    events: list[dict] = []
    return (lambda event: events.append(event.to_dict())), events


class StopAt:
    """A ``stop`` object that becomes set once the run reports ``step``."""

    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def __call__(self, event) -> None:
        if event.kind == "step":
            self.seen = event.step

    def is_set(self) -> bool:
        return self.seen >= self.step


def step_losses(events) -> dict:
    return {e["step"]: e["loss"] for e in events if e.get("event") == "step"}


def notes(events) -> list[dict]:
    """The run's message events, less the line every CPU run gives about its threads."""
    return [e for e in events if e.get("event") == "message" and not e["text"].startswith("threads:")]


def without_4bit(monkeypatch, why: str) -> None:
    """Make the engine's ``load_model`` fail for 4-bit, with ``why``, as bitsandbytes does on a machine it
    cannot serve; every other load goes through."""
    import ftmagic.engine.run as run_module

    plain = run_module.load_model

    def no_4bit(path, **kwargs):
        if kwargs.get("qlora_compute_dtype"):
            raise RuntimeError(why)
        return plain(path, **kwargs)

    monkeypatch.setattr(run_module, "load_model", no_4bit)

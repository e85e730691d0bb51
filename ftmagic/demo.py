"""The bundled demo task: teach the embedded tiny model to reverse a word.

The base model (``model: tiny``) was pretrained on uppercase, copy, first/last letter and
other string tasks, but never on reversal: asked ``reverse: lamp`` it answers with a copy
or another skill it knows. A short LoRA run on :func:`demo_dataset` teaches it, and
:func:`exact_match` on the held-out split measures the change.

Example::

    import ftmagic
    from ftmagic.demo import DEMO_CONFIG, demo_dataset, exact_match

    result = ftmagic.finetune(data=demo_dataset("train"), **DEMO_CONFIG)
    exact_match(result.generate, demo_dataset("test"))   # at least DEMO_EXACT_MATCH; the base model scores 0.0
"""

from __future__ import annotations

import random
import string
import time
from typing import Any, Callable, Iterable, Optional

PROMPT = "reverse: {word}"
TRAIN_SIZE = 2000
TEST_SIZE = 100
_LENGTHS = (3, 5)  # inclusive word lengths: the 1M-parameter model learns these in a few hundred steps

# Fields of FinetuneConfig for the demo run (the quickstart notebook's %%finetune cell is
# written from them): about two minutes on 2 quiet CPU cores.
DEMO_CONFIG = dict(
    model="tiny",
    method="lora",
    lora_r=16,
    lora_alpha=32,
    lora_dropout=0.0,
    # Reversal is learnt in a sudden drop after a plateau whose length depends on the seed
    # and on the machine's arithmetic, so a run that only just converges on one machine can
    # stall on another. Measured held-out exact match by seed: lr 5e-3 for 500 steps stalls
    # at 64% (seed 42); 3e-3 for 1200 steps diverges (gradient norm 77, 21%, seed 42);
    # 2e-3 for 1000 steps stays on the plateau (19%, seed 2); 2e-3 for 1500 steps leaves it
    # in time on every seed tried (benchmarks/demo_seeds.py).
    lr=2e-3,
    max_steps=1500,
    batch_size=16,
    scheduler="cosine",
    warmup=0.05,
    max_seq_len=128,
    eval_steps=0,
    save_steps=0,
    seed=0,
)

# Held-out exact match the demo run reaches at least, on any seed and thread count measured
# (see DEMO_CONFIG). The quickstart, the README and `ftmagic demo`'s test state and check
# this figure; CI fails when a fresh run falls below it.
DEMO_EXACT_MATCH = 0.95

# Prompts for before/after tables: real words, none of them in the training split.
DEMO_PROMPTS = ["reverse: lamp", "reverse: stone", "reverse: music", "reverse: bread", "reverse: kite"]


def _words(seed: int, count: int, exclude: frozenset = frozenset()) -> list:
    """``count`` distinct random lowercase words, none in ``exclude`` and none a palindrome."""
    rng = random.Random(seed)
    out: list = []
    seen = set(exclude)
    while len(out) < count:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*_LENGTHS)))
        if word in seen or word == word[::-1]:
            continue
        seen.add(word)
        out.append(word)
    return out


def _record(word: str) -> dict:
    return {"messages": [{"role": "user", "content": PROMPT.format(word=word)},
                         {"role": "assistant", "content": word[::-1]}]}


def demo_dataset(split: str = "train", n: Optional[int] = None) -> list:
    """Records of the demo task in OpenAI ``messages`` format; the same every call.

    ``split="train"`` has 2000 records, ``split="test"`` 100 held-out ones (no word of the
    test split or of :data:`DEMO_PROMPTS` appears in train). ``n`` keeps the first ``n``.

    Example::

        >>> demo_dataset("test", n=1)[0]["messages"][1]["content"] == \\
        ...     demo_dataset("test", n=1)[0]["messages"][0]["content"].split(": ")[1][::-1]
        True
    """
    from ftmagic.errors import ConfigError

    if split not in ("train", "test"):
        raise ConfigError(f"demo_dataset: unknown split {split!r}; accepted: 'train', 'test'")
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ConfigError(f"demo_dataset: n must be a non-negative integer or None, got {n!r}")
    test = _words(seed=1, count=TEST_SIZE)
    reserved = frozenset(test) | {p.split(": ", 1)[1] for p in DEMO_PROMPTS}
    words = test if split == "test" else _words(seed=0, count=TRAIN_SIZE, exclude=reserved)
    records = [_record(w) for w in words]
    return records if n is None else records[:n]


def _prompt_and_answer(record: dict) -> tuple:
    messages = record["messages"]
    user = [m["content"] for m in messages if m["role"] == "user"][-1]
    answer = [m["content"] for m in messages if m["role"] == "assistant"][-1]
    return user, answer


def exact_match(generate_fn: Callable[[str], str], records: Iterable[dict]) -> float:
    """Share of records whose generated answer equals the reference (surrounding spaces ignored).

    ``generate_fn(prompt) -> str`` is e.g. ``RunResult.generate``.

    Example::

        >>> exact_match(lambda p: p.split(": ")[1][::-1], demo_dataset("test", n=10))
        1.0
    """
    records = list(records)
    if not records:
        return 0.0
    hits = 0
    for record in records:
        prompt, answer = _prompt_and_answer(record)
        hits += generate_fn(prompt).strip() == answer.strip()
    return hits / len(records)


def run_demo(output_dir: str = "ftmagic-demo", *, steps: Optional[int] = None, on_event=None,
             overwrite: bool = True, n_test: Optional[int] = None, **overrides: Any) -> dict:
    """Train LoRA on the demo task with the real engine; score base and tuned on held-out words.

    Returns ``{"base_exact_match", "tuned_exact_match", "rows", "output_dir", "train_s",
    "total_s", "result"}`` where ``rows`` is ``[{"prompt", "expected", "base", "tuned"}]``
    for :data:`DEMO_PROMPTS` and ``result`` is the engine's ``RunResult``.

    Example::

        report = run_demo("/tmp/demo", on_event=print)
        report["base_exact_match"], report["tuned_exact_match"]   # measured: (0.0, 1.0)
    """
    import torch

    from ftmagic.engine.run import finetune

    start = time.monotonic()
    settings = dict(DEMO_CONFIG, output_dir=str(output_dir), overwrite=overwrite, **overrides)
    if steps is not None:
        settings["max_steps"] = steps
    # One thread: the model is so small that a second thread costs more in synchronisation
    # than it computes, and on a busy CPU it spins while the first waits for a core
    # (measured on 2 shared cores: 150 steps in 35 s with one thread, 275 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = finetune(data=demo_dataset("train"), on_event=on_event, **settings)
        train_s = time.monotonic() - start
        test = demo_dataset("test", n=n_test)
        prompts = [_prompt_and_answer(r)[0] for r in test]
        # compare() answers every prompt with the adapter on and off: one model, same template.
        answers = {row["prompt"]: row for row in result.compare(prompts + DEMO_PROMPTS, max_new_tokens=16)}
    finally:
        torch.set_num_threads(threads)
    base = exact_match(lambda p: answers[p]["base"], test)
    tuned = exact_match(lambda p: answers[p]["tuned"], test)
    rows = [{"prompt": p, "expected": p.split(": ", 1)[1][::-1], "base": answers[p]["base"],
             "tuned": answers[p]["tuned"]} for p in DEMO_PROMPTS]
    return {"base_exact_match": base, "tuned_exact_match": tuned, "rows": rows, "output_dir": result.output_dir,
            "train_s": train_s, "total_s": time.monotonic() - start, "result": result}


def format_table(rows: list, base: float, tuned: float) -> str:
    """The before/after table the ``ftmagic demo`` command prints.

    Example::

        >>> print(format_table([{"prompt": "reverse: ab", "expected": "ba", "base": "ab", "tuned": "ba"}], 0.0, 1.0))
        prompt       expected  base (before)  tuned (after)
        reverse: ab  ba        ab             ba  ok
        exact match on held-out words: 0% before, 100% after
    """
    header = ("prompt", "expected", "base (before)", "tuned (after)")
    table = [(r["prompt"], r["expected"], r["base"] or "''", r["tuned"] or "''") for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *table]) for i in range(3)]

    def line(cells, mark=""):
        text = "  ".join(str(c).ljust(w) for c, w in zip(cells[:3], widths)) + "  " + str(cells[3])
        return (text + ("  " + mark if mark else "")).rstrip()

    out = [line(header)]
    out += [line(cells, "ok" if r["tuned"] == r["expected"] else "") for cells, r in zip(table, rows)]
    out.append(f"exact match on held-out words: {base:.0%} before, {tuned:.0%} after")
    return "\n".join(out)


# --------------------------------------------------------------------------- after SFT: preference tuning
#
# The style demo: an SFT stage teaches the embedded model to answer `describe: <word>` with
# `<word> is nice.` three times in four and `<word> is nice!` once in four, so greedy answers
# end with a full stop. A DPO stage on pairs that prefer the enthusiastic `!` moves the
# share of held-out answers in that style from 0% to 100% (measured).

STYLE_PROMPT = "describe: {word}"
PLAIN_STYLE = "{word} is nice."
PREFERRED_STYLE = "{word} is nice!"
STYLE_TRAIN_SIZE = 600
STYLE_TEST_SIZE = 60

# Stage 1, SFT: LoRA on `model: tiny`, merged so stage 2 starts from the tuned weights.
STYLE_SFT_CONFIG = dict(model="tiny", method="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0, lr=3e-3,
                        max_steps=150, batch_size=16, warmup=0.05, max_seq_len=64, eval_steps=0, save_steps=0,
                        seed=0, merge=True)
# Stage 2, DPO: a fresh LoRA on the merged SFT model; its adapter-disabled base is the reference.
# beta 0.5 keeps the policy near the reference: at beta 0.1 the 1M-parameter model over-optimises
# within 80 steps (the rejected full stop is pushed below other bytes and answers break).
STYLE_DPO_CONFIG = dict(objective="dpo", beta=0.5, method="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0,
                        lr=5e-4, max_steps=40, batch_size=16, warmup=0.05, max_seq_len=64, eval_steps=0,
                        save_steps=0, seed=0)


def _style_words(split: str) -> list:
    train = _words(seed=5, count=STYLE_TRAIN_SIZE)
    if split == "train":
        return train
    return _words(seed=6, count=STYLE_TEST_SIZE, exclude=frozenset(train))


def style_sft_dataset(share_preferred: float = 0.25, seed: int = 0) -> list:
    """The SFT stage's records (``messages``): ``describe: w`` answered in the plain style, and
    in the preferred one with probability ``share_preferred``.

    Example::

        >>> style_sft_dataset()[0]["messages"][1]["content"]
        'ixlzw is nice.'
    """
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": STYLE_PROMPT.format(word=w)},
                          {"role": "assistant", "content": (PREFERRED_STYLE if rng.random() < share_preferred
                                                            else PLAIN_STYLE).format(word=w)}]}
            for w in _style_words("train")]


def style_pairs() -> list:
    """The DPO stage's preference records: the preferred style chosen, the plain one rejected.

    Example::

        >>> style_pairs()[0]
        {'prompt': 'describe: ixlzw', 'chosen': 'ixlzw is nice!', 'rejected': 'ixlzw is nice.'}
    """
    return [{"prompt": STYLE_PROMPT.format(word=w), "chosen": PREFERRED_STYLE.format(word=w),
             "rejected": PLAIN_STYLE.format(word=w)} for w in _style_words("train")]


def style_prompts() -> list:
    """Held-out prompts (words in neither stage's data) to measure the style on."""
    return [STYLE_PROMPT.format(word=w) for w in _style_words("test")]


def preferred_share(answers: Iterable[str]) -> float:
    """Share of ``answers`` in the preferred style (``<word> is nice!``).

    Example::

        >>> preferred_share(["abc is nice!", "abc is nice.", "xyz is nice!", "oops"])
        0.5
    """
    answers = list(answers)
    return sum(a.strip().endswith(" is nice!") for a in answers) / len(answers) if answers else 0.0


def run_preference_demo(output_dir: str = "ftmagic-preference-demo", *, on_event=None, **dpo_overrides: Any) -> dict:
    """SFT, then DPO, on the embedded model; the preferred-style share of held-out answers after each.

    Returns ``{"sft_share", "dpo_share", "rows", "sft", "dpo"}`` (``rows``: a few prompts with
    both stages' answers; ``sft``/``dpo``: the two RunResults).

    Example::

        report = run_preference_demo("/tmp/pref")
        report["sft_share"], report["dpo_share"]      # measured: (0.0, 1.0)
    """
    import torch

    from ftmagic.engine.run import finetune

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see run_demo: one thread is fastest for this model on a shared CPU
    try:
        sft = finetune(data=style_sft_dataset(), on_event=on_event, overwrite=True,
                       **dict(STYLE_SFT_CONFIG, output_dir=f"{output_dir}/sft"))
        dpo = finetune(data=style_pairs(), on_event=on_event, overwrite=True,
                       **dict(STYLE_DPO_CONFIG, model=f"{output_dir}/sft/merged", output_dir=f"{output_dir}/dpo",
                              **dpo_overrides))
        # compare(): the DPO adapter off is the SFT model (the merged weights), on is the DPO model.
        rows = dpo.compare(style_prompts(), max_new_tokens=24)
    finally:
        torch.set_num_threads(threads)
    return {"sft_share": preferred_share(r["base"] for r in rows), "dpo_share": preferred_share(r["tuned"] for r in rows),
            "rows": rows[:5], "sft": sft, "dpo": dpo}


# --------------------------------------------------------------------------- classification

SENTIMENT_LABELS = ("negative", "positive")
_POSITIVE = ("great", "lovely", "wonderful", "happy", "bright", "kind", "fine", "good", "warm", "calm")
_NEGATIVE = ("awful", "boring", "sad", "dull", "bad", "cold", "ugly", "poor", "rude", "noisy")
_NOUNS = "film book meal hotel trip song game class team room garden city show park".split()
_TEMPLATES = ("the {n} was {a}.", "what a {a} {n}!", "i found the {n} {a}.", "our {n} felt {a} today.",
              "a {a} {n}, really.")

# A classifier on `model: tiny`: LoRA adapts the model and trains the new head (measured 99.5-100%
# held-out accuracy over runs; the head alone on frozen features, `method: freeze` with `trainable_layers: 0`,
# reaches 63.5% with the same steps: this small model's features were never trained to separate sentiment).
CLASSIFY_CONFIG = dict(model="tiny", objective="classify", method="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0,
                       lr=3e-3, max_steps=120, batch_size=16, max_seq_len=64, eval_steps=0, save_steps=0, seed=0)


def sentiment_dataset(split: str = "train") -> list:
    """Generated short reviews labelled ``positive`` or ``negative`` (600 train, 200 test records).

    Example::

        >>> sentiment_dataset("test")[0]
        {'text': 'the trip was noisy.', 'label': 'negative'}
    """
    from ftmagic.errors import ConfigError

    if split not in ("train", "test"):
        raise ConfigError(f"sentiment_dataset: unknown split {split!r}; accepted: 'train', 'test'")
    rng = random.Random(0 if split == "train" else 1)
    out = []
    for _ in range(600 if split == "train" else 200):
        label = rng.choice(SENTIMENT_LABELS)
        adjective = rng.choice(_POSITIVE if label == "positive" else _NEGATIVE)
        out.append({"text": rng.choice(_TEMPLATES).format(n=rng.choice(_NOUNS), a=adjective), "label": label})
    return out

"""``prepare_data(config, tokenizer)``: everything the engine trains and evaluates on.

Steps: read each source (strict: a malformed line is a one-line ``DataError``), encode
every record (:mod:`ftmagic.data.build`), hold out ``eval_prompts: N`` records for
evaluation by generation (:mod:`ftmagic.data.eval_prompts`) and ``val_split`` of each
source (unless ``eval_data`` is given), mix sources by weight, and pack if asked. All
random choices come from ``config.seed``.

Several sources: ``data`` is a list of ``{path: ..., weight: ...}`` or ``{data: ..., weight: ...}``
(optional ``format`` and ``columns`` per source). ``weight`` multiplies a source's share:
``2`` repeats it twice, ``0.5`` keeps a random half. Without weights the sources are
simply concatenated.

Example::

    from ftmagic.config import FinetuneConfig
    cfg = FinetuneConfig(data=[{"path": "qa.jsonl", "weight": 2}, {"path": "chat.jsonl"}], val_split=0.1)
    prepared = prepare_data(cfg, tokenizer)
    prepared.train[0].keys(), prepared.stats["train_examples"], prepared.stats["skipped"]
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

from ftmagic.constants import DATA_ACCEPTED, DATA_SOURCE_KEYS
from ftmagic.data.build import Built, build_examples
from ftmagic.data.load import load_data
from ftmagic.data.pack import pack, padding_share
from ftmagic.data.templates import ChatTemplate, resolve_template
from ftmagic.errors import ConfigError, DataError, did_you_mean

MAX_LISTED_PROBLEMS = 20


@dataclass
class Source:
    """One dataset of a mixture."""

    data: Any
    weight: float = 1.0
    format: Optional[str] = None
    columns: Optional[dict] = None
    name: str = "data"
    split: str = "train"  # for a dataset with several splits (a Hub id or a saved DatasetDict)
    subset: Optional[str] = None  # a Hub dataset's configuration name


@dataclass
class PreparedData:
    """Training and evaluation rows (``{"input_ids", "labels"}``, plus ``position_ids``/``seq_lens`` when packed).

    A long ``text`` record split into blocks is several rows; ``stats["split"]`` counts such
    records and ``stats["blocks"]`` the rows they became.
    """

    train: list
    eval: Optional[list]
    stats: dict
    template: Optional[ChatTemplate] = None  # what generation must use (RunResult.generate renders with it)
    labels: Optional[list] = None  # classification: the label names, in the order of the head's outputs
    eval_prompts: Optional[list] = None  # EvalPrompt list for evaluation by generation (when it is on)


def source_problems(data: Any, key: str = "data") -> list:
    """Every mistake in the entries of a mixture list, as ``(entry index, message)``; the config
    reports them with the rest of its mistakes, at each entry's line.

    Example::

        >>> source_problems([{"path": "a.jsonl", "weight": 0}, {"path": "b.jsonl"}])
        [(0, '`data[0].weight: 0` must be a number greater than 0 (1 = as is, 2 = twice)')]
    """
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, dict) and ("path" in d or "data" in d)
                                                        for d in data):
        # A misspelt mixture key (`wieght`) would make the list read as records with those fields.
        typos = []
        for i, entry in enumerate(data):
            for name in entry:
                hint = did_you_mean(str(name), DATA_SOURCE_KEYS) if name not in DATA_SOURCE_KEYS else ""
                if hint:
                    typos.append((i, f"`{key}[{i}].{name}` is not a key of a data mixture's entry{hint}"))
        if typos:
            return typos
    if not (isinstance(data, (list, tuple)) and data and all(_is_source_spec(d) for d in data)):
        return []
    problems = []
    for i, spec in enumerate(data):
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or math.isinf(weight):
            problems.append((i, f"`{key}[{i}].weight: {weight!r}` must be a number greater than 0 (1 = as is, 2 = twice)"))
    return problems


def is_mixture(data: Any) -> bool:
    """Whether ``data`` is spelt as a list of sources (paths, or ``{path|data: ..., weight: ...}`` entries).

    Example::

        >>> is_mixture(["a.jsonl", "b.jsonl"]), is_mixture([{"path": "a.jsonl", "weight": 2}]), is_mixture([{"text": "a"}])
        (True, True, False)
    """
    return isinstance(data, (list, tuple)) and bool(data) and (all(isinstance(d, str) for d in data)
                                                               or all(_is_source_spec(d) for d in data))


def data_sources(data: Any, key: str = "data") -> list:
    """Split a ``data`` value into :class:`Source` entries (a mixture list, a list of paths, or one dataset).

    Example::

        data_sources([{"path": "a.jsonl", "weight": 2}, {"path": "b.jsonl"}])
        # [Source(data='a.jsonl', weight=2.0, ...), Source(data='b.jsonl', weight=1.0, ...)]
    """
    if data is None:
        raise ConfigError(f"`{key}` is not set: give {DATA_ACCEPTED}")
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, str) for d in data):
        return [Source(d, name=d) for d in data]
    if isinstance(data, (list, tuple)) and data and all(_is_source_spec(d) for d in data):
        problems = source_problems(data, key)
        if problems:
            raise ConfigError(problems=[message for _, message in problems])
        sources = []
        for i, spec in enumerate(data):
            payload = spec["path"] if "path" in spec else spec["data"]
            name = spec.get("name") or (payload if isinstance(payload, str) else f"{key}[{i}]")
            sources.append(Source(payload, float(spec.get("weight", 1.0)), spec.get("format"), spec.get("columns"),
                                  name, spec.get("split") or "train", spec.get("subset")))
        return sources
    return [Source(data, name=data if isinstance(data, str) else key)]


def prepare_data(config, tokenizer) -> PreparedData:
    """Encode ``config.data`` (and ``eval_data`` or a ``val_split``) for training, deterministically by ``config.seed``.

    Example::

        prepared = prepare_data(FinetuneConfig(data="train.jsonl", max_seq_len=256), tok)
        prepared.stats   # {'format': 'messages', 'records': 1000, 'skipped': 3, 'truncated': 12, ...}
    """
    rng = random.Random(config.seed)
    template = resolve_template(tokenizer, config.template)
    sources = data_sources(config.data)
    built = [_build(src, config, tokenizer) for src in sources]

    # Each example's conversation: evaluation by generation answers the held-out ones.
    conversation_of: dict = {}
    pools = []
    for src, b in zip(sources, built):
        if not b.examples:
            first = b.problems[0] if b.problems else None
            raise DataError(f"{src.name}: no usable records" + (f"; first problem: {first}" if first else ""))
        conversation_of.update((id(e), c) for e, c in zip(b.encoded, b.conversations) if e is not None)
        pools.append(b.examples)
    prompt_examples = None
    if _is_count(getattr(config, "eval_prompts", None)):
        # Its own random stream, so the validation split and the mixing below are what they are without it.
        prompt_examples = _hold_out(pools, config.eval_prompts, random.Random(config.seed + 1))

    train, held_out = [], []
    per_source = []
    for src, b, examples in zip(sources, built, pools):
        eval_part: list = []
        if config.eval_data is None and config.val_split > 0:
            examples, eval_part = _split(examples, config.val_split, rng, src.name)
        mixed = _weighted(examples, src.weight, rng)
        train.extend(mixed)
        held_out.extend(eval_part)
        per_source.append({"name": src.name if isinstance(src.name, str) else "data", "format": b.detection.format,
                           "records": len(b.loaded.records), "skipped": sum(b.skipped.values()),
                           "weight": src.weight, "train_examples": len(mixed), "eval_examples": len(eval_part)})
    if len(sources) > 1 or any(s.weight != 1 for s in sources):
        rng.shuffle(train)  # interleave tasks instead of training on one after the other

    eval_built = []
    if config.eval_data is not None:
        eval_built = [_build(src, config, tokenizer) for src in data_sources(config.eval_data, "eval_data")]
        held_out = [e for b in eval_built for e in b.examples]
        for b in eval_built:
            conversation_of.update((id(e), c) for e, c in zip(b.encoded, b.conversations) if e is not None)
    prompts = _eval_prompts(config, prompt_examples, held_out, conversation_of)

    stats = _stats(built, eval_built, train, held_out, template, config)
    stats["datasets"] = per_source
    labels = None
    if _kind(config) == "classification":
        labels, held_out, unknown = label_set(config, train, held_out)
        stats["labels"] = list(labels)
        stats["label_counts"] = dict(Counter(str(e.label) for e in train))
        if unknown:
            stats["skipped"] += unknown
            stats["skipped_reasons"]["unknown_label"] = unknown
        index = {label: i for i, label in enumerate(labels)}
        train_rows = [e.to_dict(index) for e in train]
        eval_rows = [e.to_dict(index) for e in held_out] if held_out else None
    elif _kind(config) == "preference":
        train_rows = [e.to_dict() for e in train]
        eval_rows = [e.to_dict() for e in held_out] if held_out else None
    else:
        # A long `text` record split into blocks gives several rows (after the held-out split, so
        # no document has blocks on both sides).
        train_rows = [row for e in train for row in e.rows()]
        eval_rows = [row for e in held_out for row in e.rows()] if held_out else None
    if config.packing:
        train_rows = pack(train_rows, config.max_seq_len)
        eval_rows = pack(eval_rows, config.max_seq_len) if eval_rows else eval_rows
    stats["train_rows"] = len(train_rows)
    stats["eval_rows"] = len(eval_rows) if eval_rows else 0
    if prompts is not None:
        stats["eval_prompts"] = len(prompts)
    # Only the rows are kept: the rendered texts and raw records would double the memory of a run.
    return PreparedData(train_rows, eval_rows, stats, template, labels, prompts)


# --------------------------------------------------------------------------- steps


def _is_source_spec(value: Any) -> bool:
    return isinstance(value, dict) and ("path" in value or "data" in value) and set(value) <= set(DATA_SOURCE_KEYS)


def _kind(config) -> str:
    """The kind of record the run's objective trains on."""
    from ftmagic.objectives import get_objective_spec

    return get_objective_spec(getattr(config, "objective", "sft")).data


def _build(src: Source, config, tokenizer) -> Built:
    data = src.data
    if isinstance(data, str) and (src.split != "train" or src.subset):
        data = load_data(data, strict=True, split=src.split, subset=src.subset)
    return build_examples(data, tokenizer, fmt=src.format or config.format, columns=src.columns or config.columns,
                          template=config.template, system_prompt=config.system_prompt, train_on=config.train_on,
                          max_seq_len=config.max_seq_len, strict=True, kind=_kind(config),
                          long_text=config.long_text)


def sorted_labels(values) -> list:
    """Distinct labels in a stable order: numbers ascending when all are whole numbers, else as text.

    Example::

        >>> sorted_labels(["pos", "neg", "pos"]), sorted_labels([2, 0, 1])
        (['neg', 'pos'], [0, 1, 2])
    """
    distinct = set(values)
    if all(isinstance(v, int) for v in distinct):
        return sorted(distinct)
    return sorted(distinct, key=str)


def label_set(config, train: list, held_out: list) -> tuple:
    """``(labels, evaluation examples kept, evaluation examples dropped)``: the label names the head
    predicts, from ``config.labels`` or collected from the training examples.

    A training label outside ``config.labels`` is a one-line error; an evaluation example whose
    label the head cannot predict is dropped and counted (``unknown_label``).
    """
    if config.labels is not None:
        labels = list(config.labels)
        named = {str(v): v for v in labels}
        for e in train:  # labels may be given as names while the data holds numbers, or the other way round
            if e.label not in labels and str(e.label) in named:
                e.label = named[str(e.label)]
        strays = sorted({str(e.label) for e in train if e.label not in labels})
        if strays:
            raise DataError(f"labels: the training data holds labels that `labels` does not list ({', '.join(strays[:5])}); "
                            f"add them or drop those records")
    else:
        labels = sorted_labels(e.label for e in train)
    if len(labels) < 2:
        raise DataError(f"data: the training records hold a single label ({labels[0]!r}); a classifier needs at least two")
    known = set(labels)
    named = {str(v): v for v in labels}
    kept = []
    for e in held_out:
        if e.label not in known and str(e.label) in named:
            e.label = named[str(e.label)]
        if e.label in known:
            kept.append(e)
    return labels, kept, len(held_out) - len(kept)


def _split(examples: list, share: float, rng: random.Random, name: str) -> tuple:
    """Hold out ``share`` of the examples (at least one), chosen at random; order is otherwise kept."""
    if len(examples) < 2:
        raise DataError(f"{name}: val_split needs at least 2 usable records, found {len(examples)}; "
                        "set `val_split: 0` or give `eval_data`")
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * share)))
    chosen = set(rng.sample(range(len(examples)), n_eval))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    held = [e for i, e in enumerate(examples) if i in chosen]
    return train, held


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hold_out(pools: list, n: int, rng: random.Random) -> list:
    """Take ``n`` examples out of the sources' pools (at random, across sources) for evaluation by generation."""
    index = [(i, k) for i, examples in enumerate(pools) for k in range(len(examples))]
    if n >= len(index):
        raise DataError(f"`eval_prompts: {n}` holds out more records than `data` has for training ({len(index)}); "
                        f"use a smaller number")
    taken = [index[c] for c in sorted(rng.sample(range(len(index)), n))]
    held = [pools[i][k] for i, k in taken]
    for i in {i for i, _ in taken}:
        drop = {k for j, k in taken if j == i}
        pools[i] = [e for k, e in enumerate(pools[i]) if k not in drop]
    return held


def _eval_prompts(config, prompt_examples, held_out: list, conversation_of: dict) -> Optional[list]:
    """The prompts of evaluation by generation: ``eval_prompts`` as given, held out, or the validation split."""
    from ftmagic.data.eval_prompts import eval_prompts_from, from_conversation

    value = getattr(config, "eval_prompts", None)
    if not getattr(config, "generation_eval", False):
        return None
    if prompt_examples is not None:
        examples, where = prompt_examples, "eval_prompts"
    elif value is not None:
        return eval_prompts_from(value, system_prompt=config.system_prompt)
    else:
        examples, where = held_out, "the validation split"
    if not examples:
        raise ConfigError("`eval_metrics` needs prompts to answer: set `eval_prompts` (a file, $records or a number "
                          "of records to hold out), `eval_data` or `val_split`")
    return [from_conversation(conversation_of[id(e)], f"{where}[{i}]") for i, e in enumerate(examples)]


def _weighted(examples: list, weight: float, rng: random.Random) -> list:
    """``weight`` copies of the examples: whole repeats, then a random share for the fraction."""
    whole = int(weight)
    out = examples * whole
    extra = round((weight - whole) * len(examples))
    if extra:
        out.extend(examples[i] for i in sorted(rng.sample(range(len(examples)), extra)))
    return out


def _lengths(example) -> list:
    """Token counts of an example's training sequences (two for a preference pair, one per block
    of a split `text` record)."""
    if hasattr(example, "row_lengths"):
        return example.row_lengths()
    return getattr(example, "lengths", None) or [len(example.input_ids)]


def _stats(built: list, eval_built: list, train: list, held_out: list, template: ChatTemplate, config) -> dict:
    formats = sorted({b.detection.format for b in built})
    skipped = Counter()
    for b in built + eval_built:
        skipped.update(b.skipped)
    problems = [str(p) for b in built + eval_built for p in b.problems]
    is_text = formats == ["text"]
    return {
        "format": formats[0] if len(formats) == 1 else "mixed",
        "format_evidence": "; ".join(b.detection.evidence for b in built),
        "template": None if is_text else template.name,
        "template_reason": None if is_text else template.reason,
        "records": sum(max(b.loaded.read, len(b.loaded.records)) for b in built),
        "skipped": sum(skipped.values()),
        "skipped_reasons": dict(sorted(skipped.items())),
        "problems": problems[:MAX_LISTED_PROBLEMS],
        "problem_count": len(problems),
        "truncated": sum(b.truncated for b in built + eval_built),
        "split": sum(b.split for b in built + eval_built),
        "blocks": sum(e.blocks for b in built + eval_built for e in b.examples if getattr(e, "split", False)),
        "no_trained_tokens": skipped.get("no_trained_tokens", 0),
        "eos_added": sum(1 for b in built for e in b.examples if e.eos_added),
        "train_examples": len(train),
        "eval_examples": len(held_out),
        "trained_tokens": sum(e.trained_tokens for e in train),
        "total_tokens": sum(n for e in train for n in _lengths(e)),
        "packing": bool(config.packing),
        "padding_share": round(padding_share([n for e in train for n in _lengths(e)], config.max_seq_len,
                                              config.batch_size, packed=bool(config.packing)), 4),
    }

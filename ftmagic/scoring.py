"""Scores for generated answers: did the model say what the reference says?

``eval_metrics`` names metrics from :data:`METRICS` or passes any Python function
``f(prediction, reference) -> float`` (a notebook function, ``eval_metrics: [exact_match,
$my_score]``). Exact match, contains and normalised exact match are a line each;
ROUGE-L comes from Google's ``rouge-score`` and chrF from ``sacrebleu`` (the reference
implementations the papers' numbers come from), imported only when asked for. Every score
is in [0, 1]: chrF's 0-100 is divided by 100 so curves share an axis.

Pure Python: importing this module never imports torch.

Example::

    >>> from ftmagic.scoring import resolve_metrics, score_answers
    >>> metrics = resolve_metrics(["exact_match", "contains"])
    >>> score_answers(["pmal", "the pmal"], ["pmal", "pmal"], metrics)
    {'exact_match': 0.5, 'contains': 1.0}
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ftmagic.errors import ConfigError, did_you_mean

EXTRA_HINT = "pip install 'ftmagic[eval]'"


@dataclass(frozen=True)
class Metric:
    """One score of a (prediction, reference) pair; ``greater_is_better`` steers best-model choice and sweeps."""

    name: str
    fn: Callable[[str, str], float]
    greater_is_better: bool = True
    description: str = ""


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces.

    Example::

        >>> normalize_answer("The  Eiffel tower!")
        'eiffel tower'
    """
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answer equals the reference (surrounding white space ignored)."""
    return float(str(prediction).strip() == str(reference).strip())


def contains(prediction: str, reference: str) -> float:
    """1.0 when the reference appears anywhere in the answer (case-sensitive)."""
    return float(str(reference).strip() in str(prediction))


def normalized_exact_match(prediction: str, reference: str) -> float:
    """Exact match after :func:`normalize_answer` (case, punctuation and articles ignored)."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


_ROUGE = {}


class RougeTokenizer:
    """Words for ROUGE in any script: rouge-score's own tokenizer with letters beyond a-z kept.

    rouge-score keeps only ``[a-z0-9]`` runs, so an answer in Russian, Greek or Japanese has
    no words at all and scores 0.0 even when it equals the reference, and ``café`` loses its
    ``é``. Here a word is a run of letters, marks and digits of any script (lower-cased), which
    for ASCII text is exactly rouge-score's split; a character of a script written without
    spaces (Chinese, Japanese: East Asian wide) is a word of its own, as ROUGE is usually
    computed for those languages.

    Example::

        >>> RougeTokenizer().tokenize("Привет, мир! 東京 café_2")
        ['привет', 'мир', '東', '京', 'café', '2']
    """

    def tokenize(self, text: str) -> list:
        import unicodedata

        tokens: list = []
        word: list = []
        for ch in str(text).lower():
            if unicodedata.category(ch)[0] not in "LMN":
                ch = " "
            elif unicodedata.east_asian_width(ch) in ("W", "F"):
                tokens.extend(["".join(word), ch] if word else [ch])
                word = []
                continue
            if ch == " ":
                if word:
                    tokens.append("".join(word))
                word = []
            else:
                word.append(ch)
        if word:
            tokens.append("".join(word))
        return tokens


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), from the ``rouge-score`` package, with words of
    every script (:class:`RougeTokenizer`; for ASCII text the package's own scores)."""
    if "scorer" not in _ROUGE:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ConfigError(f"`eval_metrics: rouge_l` needs the rouge-score package ({EXTRA_HINT})") from None
        _ROUGE["scorer"] = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=RougeTokenizer())
    return float(_ROUGE["scorer"].score(str(reference), str(prediction))["rougeL"].fmeasure)


_CHRF = {}


def chrf(prediction: str, reference: str) -> float:
    """chrF (character n-gram F-score), from ``sacrebleu``, scaled to [0, 1]."""
    if "metric" not in _CHRF:
        try:
            from sacrebleu.metrics import CHRF
        except ImportError:
            raise ConfigError(f"`eval_metrics: chrf` needs the sacrebleu package ({EXTRA_HINT})") from None
        _CHRF["metric"] = CHRF()
    return float(_CHRF["metric"].sentence_score(str(prediction), [str(reference)]).score) / 100.0


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("exact_match", exact_match, description="answer equals the reference"),
    Metric("contains", contains, description="the reference appears in the answer"),
    Metric("normalized_exact_match", normalized_exact_match,
           description="equal after lower-casing and removing punctuation and articles"),
    Metric("rouge_l", rouge_l, description="ROUGE-L F1 (rouge-score)"),
    Metric("chrf", chrf, description="chrF / 100 (sacrebleu)"),
)}
ALIASES = {"normalised_exact_match": "normalized_exact_match", "em": "exact_match", "rouge": "rouge_l",
           "rougeL": "rouge_l", "rouge-l": "rouge_l"}
LOSS_NAMES = ("eval_loss",)  # the evaluation loss: lower is better


def metric_names(spec) -> list:
    """The names ``spec`` (a name, a function, a ``$variable`` or a list of them) will report under.

    Example::

        >>> metric_names(["exact_match", "rougeL"])
        ['exact_match', 'rouge_l']
    """
    return [_name_of(item) for item in _as_list(spec)]


def check_metric_spec(spec) -> Optional[str]:
    """``None`` when every entry names a built-in metric, a function or a ``$variable``; else the message.

    Example::

        >>> check_metric_spec(["exact_match", "rouge_x"])
        '`eval_metrics: rouge_x` is not a metric; use exact_match, contains, normalized_exact_match, rouge_l, chrf or a Python function f(prediction, reference); did you mean `rouge_l`?'
    """
    names = []
    for item in _as_list(spec):
        if callable(item):
            names.append(_name_of(item))
            continue
        if not isinstance(item, str) or not item.strip():
            return (f"`eval_metrics: {item!r}` must be a metric name or a Python function f(prediction, reference)")
        if item.startswith("$"):
            names.append(item[1:])
            continue
        if ALIASES.get(item, item) not in METRICS:
            hint = did_you_mean(item, list(METRICS) + list(ALIASES), cutoff=0.5, rename=ALIASES)
            return (f"`eval_metrics: {item}` is not a metric; use {', '.join(METRICS)} or a Python function "
                    f"f(prediction, reference){hint}")
        names.append(ALIASES.get(item, item))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        return f"`eval_metrics` names `{duplicates[0]}` twice"
    return None


def resolve_metrics(spec) -> dict[str, Metric]:
    """``{name: Metric}`` for ``spec``; raises a one-line ConfigError for an unknown name.

    A function reports under its ``__name__`` and counts as higher-is-better unless it has
    ``greater_is_better = False`` as an attribute.

    Example::

        def starts_right(prediction, reference):
            return float(prediction[:1] == reference[:1])
        resolve_metrics(["exact_match", starts_right])   # {'exact_match': ..., 'starts_right': ...}
    """
    problem = check_metric_spec(spec)
    if problem:
        raise ConfigError(problem)
    out = {}
    for item in _as_list(spec):
        if callable(item):
            name = _name_of(item)
            out[name] = Metric(name, item, bool(getattr(item, "greater_is_better", True)), "your function")
        elif item.startswith("$"):
            raise ConfigError(f"`eval_metrics: {item}` names a notebook variable; pass the function itself "
                              f"(in a %%finetune cell, define `{item[1:]}` first)")
        else:
            metric = METRICS[ALIASES.get(item, item)]
            out[metric.name] = metric
    return out


def score_answers(predictions: Sequence[str], references: Sequence[Optional[str]],
                  metrics: dict[str, Metric]) -> dict[str, float]:
    """Mean of each metric over the pairs that have a reference (``None`` references are skipped).

    A metric function that raises is reported in one line naming it, never half-scored.
    """
    pairs = [(p, r) for p, r in zip(predictions, references) if r is not None]
    out = {}
    for name, metric in metrics.items():
        if not pairs:
            continue
        total = 0.0
        for prediction, reference in pairs:
            try:
                total += float(metric.fn(prediction, reference))
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(f"`eval_metrics: {name}` failed on prediction {prediction!r}, reference "
                                  f"{reference!r}: {type(exc).__name__}: {exc}") from None
        out[name] = total / len(pairs)
    return out


def greater_is_better(name: str, metrics: Optional[dict] = None) -> bool:
    """The direction of a metric: losses go down, scores go up (a function may say otherwise).

    Example::

        >>> greater_is_better("eval_loss"), greater_is_better("exact_match")
        (False, True)
    """
    if metrics and name in metrics:
        return metrics[name].greater_is_better
    if name in METRICS:
        return METRICS[name].greater_is_better
    return not (name in LOSS_NAMES or name.endswith("loss"))


def _as_list(spec) -> list:
    if spec is None:
        return []
    if isinstance(spec, (str, bytes)) or callable(spec):
        return [spec]
    return list(spec)


def _name_of(item) -> str:
    if callable(item):
        return getattr(item, "__name__", None) or type(item).__name__
    item = str(item)
    return item[1:] if item.startswith("$") else ALIASES.get(item, item)

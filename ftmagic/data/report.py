"""``preview(data)``: what a dataset looks like to the model, and what is wrong with it.

The previewer runs the very code training runs (:func:`ftmagic.data.build.iter_encoded`
and the encoder behind :func:`ftmagic.data.encode_example`); it only reads leniently, so
every bad line is listed instead of stopping at the first.

A :class:`DatasetReport` holds the detected format and its evidence, counts (read,
usable, skipped and why), token-length statistics and a histogram against
``max_seq_len``, truncation, records left with no trained token, padding with and
without packing, label balance, and every problem with its location. Records are
re-encoded on demand by :meth:`DatasetReport.record`, so the pager of a large dataset
holds only the page on screen.

Example::

    import ftmagic
    report = ftmagic.preview("train.jsonl", model="tiny", max_seq_len=256)
    print(report.to_text())
    report.to_dict()["token_lengths"]          # {'min': 9, 'median': 41, 'p95': 120, 'max': 700, 'mean': 47.2}
    view = report.record(0)                    # raw record, rendered text, tokens with their training mask
    cleaned = ftmagic.clean("train.jsonl", "train.clean.jsonl")
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

from ftmagic.config import LONG_TEXT_MODES, FinetuneConfig, check_whole_number
from ftmagic.constants import IGNORE_INDEX
from ftmagic.data.build import detect, gc_paused, iter_encoded, sort_problems
from ftmagic.data.checks import DuplicateFinder, final_answer, imbalance_problem, label_balance
from ftmagic.data.clean import CleanResult, clean
from ftmagic.data.encode import encode_conversations
from ftmagic.data.portable import answer_end_ids
from ftmagic.data.formats import comparable_turns, format_kind, to_conversation, to_labelled, to_preference
from ftmagic.data.pairs import encode_pairs, encode_texts, head_position
from ftmagic.data.load import load_data
from ftmagic.data.pack import padding_share
from ftmagic.data.pipeline import data_sources, is_mixture
from ftmagic.data.problems import KINDS, SKIPPING_KINDS, Problem, RecordError
from ftmagic.data.templates import resolve_template
from ftmagic.data.tokenizer import load_preview_tokenizer
from ftmagic.errors import DataError, not_accepted

__all__ = ["preview", "open_preview", "analyse", "clean", "DatasetReport", "CleanResult", "RecordView", "TokenView"]

DEFAULT_MAX_SEQ_LEN = FinetuneConfig.max_seq_len
DEFAULT_LONG_TEXT = FinetuneConfig.long_text
HISTOGRAM_BINS = 10
JSON_PROBLEMS_PER_KIND = 200  # the JSON lists this many of each kind; counts are always complete


class TokenView(NamedTuple):
    """One token of a record: id, its text, whether the loss is trained on it, whether it ends an answer (EOS, or
    the template's end-of-turn token)."""

    id: int
    text: str
    trained: bool
    eos: bool


@dataclass
class RecordView:
    """Everything the pager shows for one record."""

    index: int
    location: str
    raw: Any
    text: Optional[str] = None  # rendered text (None when the record cannot be used)
    tokens: list = field(default_factory=list)
    truncated: bool = False
    length: int = 0
    blocks: int = 1  # training rows: more than one for a long `text` record split into blocks
    problems: list = field(default_factory=list)
    pair: Optional[dict] = None  # a preference record: {"chosen": {"text", "tokens"}, "rejected": {...}}
    label: Any = None  # a classification record's label


@dataclass
class DatasetReport:
    """The previewer's findings; :meth:`to_text` for people, :meth:`to_dict` for JSON, :meth:`record` for the pager."""

    source: str
    format: str
    format_evidence: str
    template: Optional[str]
    template_reason: Optional[str]
    tokenizer: Optional[str]
    max_seq_len: int
    train_on: str
    records: int
    batch_size: int = 4
    complete: bool = False  # False until analyse() has run: only the pager works
    usable: Optional[int] = None
    skipped: Optional[int] = None
    skipped_reasons: dict = field(default_factory=dict)
    truncated: Optional[int] = None
    long_text: str = DEFAULT_LONG_TEXT  # what happens to `text` records longer than max_seq_len
    split: Optional[int] = None  # long `text` records split into max_seq_len blocks
    blocks: Optional[int] = None  # the training rows those records become
    no_trained_tokens: Optional[int] = None
    eos_appended: Optional[int] = None
    token_lengths: Optional[dict] = None
    histogram: Optional[list] = None
    trained_tokens: Optional[int] = None
    total_tokens: Optional[int] = None
    padding: Optional[dict] = None
    label_balance: Optional[dict] = None
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    _context: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ views
    @property
    def problem_counts(self) -> dict:
        return dict(sorted(Counter(p.kind for p in self.problems).items()))

    @property
    def trained_what(self) -> str:
        """Which tokens carry the loss, in words (after "trained tokens: N of M" in the text and the widget).

        A classifier's loss is one cross-entropy per record, of its label, at the token the head
        reads (:func:`~ftmagic.data.pairs.head_position`); ``train_on`` does not apply to it.
        """
        if format_kind(self.format) == "classification":
            tok = self._context.get("tokenizer") if self._context else None
            where = "first token ([CLS])" if tok is not None and head_position(tok) == 0 else "last token"
            return f"one per record: the {where}, which the head reads to predict the record's label"
        return f"train_on: {self.train_on}"

    def __len__(self) -> int:
        """Number of records the pager can show."""
        return len(self._context["loaded"].records) if self._context else 0

    def record(self, index: int) -> RecordView:
        """Record ``index`` as the model sees it, encoded now with the training code path.

        Example::

            view = report.record(3)
            "".join(t.text for t in view.tokens if t.trained)     # the trained answer, EOS included
        """
        ctx = self._context
        loaded = ctx["loaded"]
        if not 0 <= index < len(loaded.records):
            raise IndexError(f"record {index} is out of range (0..{len(loaded.records) - 1})")
        where = loaded.location(index)
        if "by_location" not in ctx:  # built on the first page, so opening the pager costs nothing
            ctx["by_location"] = {}
            for p in self.problems:
                ctx["by_location"].setdefault(p.location, []).append(p)
        view = RecordView(index, where, loaded.records[index], problems=list(ctx["by_location"].get(where, [])))
        kind = format_kind(ctx["detection"].format)
        if kind != "conversations":
            return self._record_of_kind(view, kind)
        try:
            conv = to_conversation(loaded.records[index], ctx["detection"].format, ctx["detection"].columns,
                                   ctx["system_prompt"])
        except RecordError:
            return view
        tok = ctx["tokenizer"]
        if tok is None:
            view.text = "\n".join(f"[{t['role']}] {t['content']}" for t in conv)
            return view
        enc = encode_conversations(tok, [conv], template=ctx["template"], train_on=self.train_on,
                                   max_seq_len=self.max_seq_len, long_text=self.long_text)[0]
        if isinstance(enc, RecordError):
            return view
        stops = ctx.setdefault("stop_ids", set(answer_end_ids(tok, ctx["template"] or resolve_template(tok))))
        view.text, view.truncated, view.length, view.blocks = enc.text, enc.truncated, enc.length, enc.blocks
        view.tokens = [TokenView(i, tok.decode([i]), label != IGNORE_INDEX, i in stops)
                       for i, label in zip(enc.input_ids, enc.labels)]
        return view

    def _record_of_kind(self, view: RecordView, kind: str) -> RecordView:
        """A preference record's two sides, or a labelled text, as the pager shows them."""
        ctx = self._context
        tok, columns = ctx["tokenizer"], ctx["detection"].columns
        try:
            if kind == "classification":
                text, view.label = to_labelled(view.raw, columns)
            else:
                pair = to_preference(view.raw, columns, ctx["system_prompt"])
        except RecordError:
            return view
        if kind == "classification":
            view.text = text
            if tok is not None:
                enc = encode_texts(tok, [text], max_seq_len=self.max_seq_len)[0]
                view.truncated, view.length = enc.truncated, enc.length
                # The one trained position is the token the head reads; its target is the label.
                read = enc.head_index % len(enc.input_ids) if enc.input_ids else -1
                view.tokens = self._tokens(enc.input_ids, [0 if k == read else IGNORE_INDEX
                                                           for k in range(len(enc.input_ids))])
            return view
        if tok is None:
            view.text = "\n".join(f"[{t['role']}] {t['content']}" for t in pair.conversation("chosen"))
            return view
        enc = encode_pairs(tok, [pair], template=ctx["template"], max_seq_len=self.max_seq_len)[0]
        if isinstance(enc, RecordError):
            return view
        view.text, view.truncated, view.length = enc.chosen.text, enc.truncated, enc.length
        view.pair = {side: {"text": e.text, "tokens": self._tokens(e.input_ids, e.labels), "truncated": e.truncated,
                            "length": e.length}
                     for side, e in (("chosen", enc.chosen), ("rejected", enc.rejected))}
        view.tokens = view.pair["chosen"]["tokens"]
        return view

    def _tokens(self, ids: list, labels: list) -> list:
        tok = self._context["tokenizer"]
        eos_id = getattr(tok, "eos_token_id", None)
        return [TokenView(i, tok.decode([i]), label != IGNORE_INDEX, i == eos_id) for i, label in zip(ids, labels)]

    def index_of(self, location: str) -> Optional[int]:
        """The record shown at ``location`` (e.g. ``train.jsonl:12``), or None (an unparseable line, a dataset note)."""
        ctx = self._context
        if "by_index" not in ctx:  # built once, when first asked
            loaded = ctx["loaded"]
            ctx["by_index"] = {loaded.location(i): i for i in range(len(loaded.records))}
        return ctx["by_index"].get(location)

    def to_dict(self, problems_per_kind: int = JSON_PROBLEMS_PER_KIND) -> dict:
        """A JSON-ready dict (``problems``: up to ``problems_per_kind`` of each kind; ``problem_counts`` is complete)."""
        shown, listed = Counter(), []
        for p in self.problems:
            if shown[p.kind] < problems_per_kind:
                shown[p.kind] += 1
                listed.append(p.to_dict())
        out = {k: getattr(self, k) for k in (
            "source", "format", "format_evidence", "template", "template_reason", "tokenizer", "max_seq_len", "train_on",
            "records", "usable", "skipped", "skipped_reasons", "truncated", "long_text", "split", "blocks",
            "no_trained_tokens", "eos_appended",
            "token_lengths", "histogram", "trained_tokens", "total_tokens", "padding", "label_balance")}
        out["problem_counts"] = self.problem_counts
        out["problems"] = listed
        out["notes"] = list(self.notes)
        return out

    def to_text(self, max_problems: int = 20) -> str:
        """The report as plain text (what ``ftmagic preview`` prints)."""
        from ftmagic.data.report_text import format_report

        return format_report(self, max_problems=max_problems)

    def __str__(self) -> str:
        return self.to_text()

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows the text report
        printer.text(self.to_text())


def preview(data: Any, model: Optional[str] = None, tokenizer=None, format: str = "auto", template: Optional[str] = None,
            max_seq_len: int = DEFAULT_MAX_SEQ_LEN, train_on: str = "completions", columns: Optional[dict] = None,
            system_prompt: Optional[str] = None, batch_size: int = 4, batch: int = 4096,
            long_text: str = DEFAULT_LONG_TEXT, objective: Optional[str] = None) -> DatasetReport:
    """Analyse ``data`` exactly as training would see it and return a :class:`DatasetReport`.

    ``model``/``tokenizer``: whose tokenizer and chat template to use; by default the
    embedded tiny model's (without one, the report still has formats, counts and problems).
    ``long_text`` is the config key of the same name: ``text`` records longer than
    ``max_seq_len`` are counted as split into blocks (``report.split``, ``report.blocks``)
    or as truncated.
    Loading the tokenizer imports transformers, which imports torch (a few seconds the first
    time in a process); the analysis itself is pure Python.

    ``objective`` (``sft``, ``dpo``, ``orpo``, ``reward``, ``classify``) limits detection to the
    formats that objective trains on; by default every format is considered, so preference
    pairs and labelled texts are recognised too.

    Example::

        report = preview([{"prompt": "2+2=", "completion": "4"}] * 3, model="tiny")
        report.problem_counts      # {'duplicate': 2}
    """
    report = open_preview(data, model=model, tokenizer=tokenizer, format=format, template=template,
                          max_seq_len=max_seq_len, train_on=train_on, columns=columns, system_prompt=system_prompt,
                          batch_size=batch_size, long_text=long_text, objective=objective)
    return analyse(report, batch=batch)


def open_preview(data: Any, model: Optional[str] = None, tokenizer=None, format: str = "auto", template: Optional[str] = None,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN, train_on: str = "completions", columns: Optional[dict] = None,
                 system_prompt: Optional[str] = None, batch_size: int = 4, long_text: str = DEFAULT_LONG_TEXT,
                 objective: Optional[str] = None) -> DatasetReport:
    """Read and detect only (seconds even for a million rows): the pager works at once; :func:`analyse` adds the rest.

    Example::

        report = open_preview("big.jsonl")
        report.record(123_456)       # encoded on demand
        analyse(report)              # statistics and problems (report.complete becomes True)
    """
    # Checked here for every front (the magic and the API passed 0 on to a ZeroDivisionError).
    check_whole_number("max_seq_len", max_seq_len)
    check_whole_number("batch_size", batch_size)
    if long_text not in LONG_TEXT_MODES:  # refused as the config, the magic and the CLI refuse it
        raise not_accepted("long_text", long_text, LONG_TEXT_MODES)
    data, format, columns = _one_source(data, format, columns)
    note = cut = None
    if model is not None:  # cut where training cuts: at the model's positions
        from ftmagic.memory.architectures import fit_to_context

        max_seq_len, cut = fit_to_context(model, max_seq_len)
    name = (getattr(tokenizer, "name_or_path", None) or "(given)") if tokenizer is not None else None
    if tokenizer is None:
        tokenizer, name_or_reason = load_preview_tokenizer(model)
        if tokenizer is None:
            note = name_or_reason
        else:
            name = name_or_reason
    with gc_paused():
        loaded = load_data(data, strict=False)
    kind = None
    if objective is not None:
        from ftmagic.objectives import get_objective_spec

        kind = get_objective_spec(objective).data
    detection = detect(loaded, format, columns, kind)
    templated = detection.format not in ("text", "classification")
    tpl = resolve_template(tokenizer, template) if tokenizer is not None and templated else None
    return DatasetReport(
        source=loaded.name, format=detection.format, format_evidence=detection.evidence,
        template=tpl.name if tpl else None, template_reason=tpl.reason if tpl else None, tokenizer=name,
        max_seq_len=max_seq_len, train_on=train_on, records=max(loaded.read, len(loaded.records)), batch_size=batch_size,
        long_text=long_text, problems=list(loaded.problems), notes=[n for n in (cut, note) if n],
        _context={"loaded": loaded, "detection": detection, "tokenizer": tokenizer, "template": tpl,
                  "system_prompt": system_prompt})


def _one_source(data: Any, format: str, columns: Optional[dict]) -> tuple:
    """``(data, format, columns)`` of the one dataset to preview, when ``data`` is spelt as a mixture.

    A run's ``data:`` may be a list of paths or of ``{path: ..., weight: ...}`` entries; read as
    records, they gave "cannot tell the format from the fields (path, weight)" or a report of
    strings. One source is previewed as itself (its own ``format`` and ``columns`` unless given);
    several have their own formats and problems, so each is previewed apart.
    """
    if not is_mixture(data):
        return data, format, columns
    sources = data_sources(data)
    if len(sources) > 1:
        names = ", ".join(str(s.name) for s in sources[:4]) + (", ..." if len(sources) > 4 else "")
        first = repr(sources[0].data) if isinstance(sources[0].data, str) else "data[0]['data']"
        raise DataError(f"`data` is a mixture of {len(sources)} sources ({names}); the previewer reads one dataset at "
                        f"a time: preview each source, e.g. ftmagic.preview({first})")
    src = sources[0]
    if src.split != "train" or src.subset:
        src.data = load_data(src.data, strict=False, split=src.split, subset=src.subset)
    return src.data, (src.format or "auto") if format == "auto" else format, columns or src.columns


def analyse(report: DatasetReport, progress: Optional[Callable] = None, batch: int = 4096) -> DatasetReport:
    """Encode every record as training would and fill in the report's statistics and problems.

    ``progress(done, total)`` is called after each batch (the widget shows it).
    """
    with gc_paused():
        return _analyse(report, progress, batch)


def _analyse(report: DatasetReport, progress: Optional[Callable], batch: int) -> DatasetReport:
    ctx = report._context
    loaded, detection, tokenizer, tpl = ctx["loaded"], ctx["detection"], ctx["tokenizer"], ctx["template"]
    max_seq_len, is_text, n = report.max_seq_len, detection.format == "text", len(loaded.records)
    kind = format_kind(detection.format)
    labels: Counter = Counter()
    finder = DuplicateFinder(loaded.location)
    answers: Counter = Counter()
    record_problems: list = []
    lengths, usable_lengths = [], []
    trained = total = truncated = untrainable = appended = usable = split = blocks = 0
    stops = set(answer_end_ids(tokenizer, tpl)) if tokenizer is not None and tpl is not None else \
        {getattr(tokenizer, "eos_token_id", None)}
    no_eos_tokenizer = False
    for i, conv, enc, problems in iter_encoded(loaded, detection, tokenizer, template=tpl, system_prompt=ctx["system_prompt"],
                                               train_on=report.train_on, max_seq_len=max_seq_len, batch=batch,
                                               long_text=report.long_text):
        if progress is not None and (i + 1) % batch == 0:
            progress(i + 1, n)
        record_problems.extend(problems)
        if conv is None:
            continue
        dup = finder.check(comparable_turns(conv, detection.format), i)
        if kind == "classification":
            labels[conv[1]] += 1
        if dup is not None:
            record_problems.append(dup)
        if kind == "conversations" and not is_text:
            answer = final_answer(conv)
            if answer is not None and conv[-1]["role"] == "assistant":
                answers[answer] += 1
        if enc is None:
            if tokenizer is None:
                usable += 1
            continue
        lengths.append(enc.length)
        where = loaded.location(i) if enc.truncated else None
        if enc.truncated:
            truncated += 1
            record_problems.append(Problem("truncated", where, f"{enc.length} tokens, cut to max_seq_len={max_seq_len}"))
        n_trained = enc.trained_tokens
        if n_trained == 0:
            untrainable += 1
            continue
        usable += 1
        sizes = enc.row_lengths() if hasattr(enc, "row_lengths") else (getattr(enc, "lengths", None)
                                                                         or [len(enc.input_ids)])
        usable_lengths.extend(sizes)
        if getattr(enc, "split", False):
            split += 1
            blocks += enc.blocks
        trained += n_trained
        total += sum(sizes)
        appended += enc.eos_added
        no_eos_tokenizer |= enc.no_eos
        sides = [enc.chosen, enc.rejected] if kind == "preference" else [enc] if kind == "conversations" else []
        if any(side.truncated and not side.no_eos and _last_trained(side.labels) not in stops for side in sides):
            record_problems.append(Problem("no_eos", where, "truncated inside an answer, so it ends without EOS "
                                                            "(raise max_seq_len or shorten the record)"))

    problems = sort_problems(loaded.problems, record_problems)
    balance = label_balance(labels if kind == "classification" else answers, any_count=kind == "classification")
    imbalance = imbalance_problem(balance, loaded.name, labelled=kind == "classification")
    dataset_level = [imbalance] if imbalance else []
    if not loaded.records and not problems:
        # An empty file (or one with only blank lines, a CSV header, `[]`) has no record to
        # find fault with, yet training refuses it: say so rather than "problems: none".
        dataset_level.append(Problem("no_records", loaded.name, "the data holds no records, so training would stop "
                                                                "with `no usable records`"))
    if no_eos_tokenizer:
        dataset_level.append(Problem("no_eos", loaded.name, "the tokenizer has no EOS token, so answers cannot end "
                                                            "with one and the model will not learn to stop"))
    if appended:
        dataset_level.append(Problem("no_eos", loaded.name, f"the chat template does not end answers with EOS ({appended} records); "
                                     f"ftmagic appends `{tokenizer.eos_token}` so the model learns to stop"))
    skipped = Counter(p.kind for p in problems if p.kind in SKIPPING_KINDS and p.kind != "non_utf8")
    report.usable, report.skipped, report.skipped_reasons = usable, sum(skipped.values()), dict(sorted(skipped.items()))
    report.label_balance, report.problems = balance, dataset_level + problems
    if tokenizer is not None:
        report.truncated, report.no_trained_tokens, report.eos_appended = truncated, untrainable, appended
        report.split, report.blocks = split, blocks
        report.token_lengths, report.histogram = length_stats(lengths), histogram(lengths, max_seq_len)
        report.trained_tokens, report.total_tokens = trained, total
        report.padding = {"batch_size": report.batch_size,
                          "unpacked": round(padding_share(usable_lengths, max_seq_len, report.batch_size), 4),
                          "packed": round(padding_share(usable_lengths, max_seq_len, packed=True), 4)}
    ctx.pop("by_location", None)  # problems changed: the pager re-indexes them
    report.complete = True
    if progress is not None:
        progress(n, n)
    return report


def _last_trained(labels: list) -> int:
    for label in reversed(labels):
        if label != IGNORE_INDEX:
            return label
    return IGNORE_INDEX


def length_stats(lengths: list) -> Optional[dict]:
    """min / median / p95 (nearest rank) / max / mean of token lengths (before truncation).

    Example::

        >>> length_stats([1, 2, 3, 4])
        {'min': 1, 'median': 2.5, 'p95': 4, 'max': 4, 'mean': 2.5}
    """
    if not lengths:
        return None
    ordered = sorted(lengths)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {"min": ordered[0], "median": statistics.median(ordered), "p95": p95, "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 2)}


def histogram(lengths: list, max_seq_len: int, bins: int = HISTOGRAM_BINS) -> list:
    """Counts of token lengths in ``bins`` equal bins up to ``max_seq_len``, plus one bin for longer ones.

    Example::

        >>> histogram([1, 5, 9, 20], 10, bins=2)
        [{'start': 1, 'end': 5, 'count': 2}, {'start': 6, 'end': 10, 'count': 1}, {'start': 11, 'end': None, 'count': 1}]
    """
    bins = 8 if bins == HISTOGRAM_BINS and max_seq_len % 8 == 0 else bins  # 512, 1024, 64: round edges
    width = max(1, math.ceil(max_seq_len / bins))
    edges = [(k * width + 1, min(max_seq_len, (k + 1) * width)) for k in range(bins) if k * width < max_seq_len]
    counts = [0] * (len(edges) + 1)
    for n in lengths:
        counts[len(edges) if n > max_seq_len else max(0, (n - 1) // width)] += 1
    out = [{"start": a, "end": b, "count": c} for (a, b), c in zip(edges, counts)]
    out.append({"start": max_seq_len + 1, "end": None, "count": counts[-1]})
    return out


KIND_LABELS = KINDS

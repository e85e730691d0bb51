"""The plain-text form of a :class:`~ftmagic.data.report.DatasetReport` (CLI and ``print(report)``).

Example::

    print(format_report(ftmagic.preview("train.jsonl")))
"""

from __future__ import annotations

from collections import Counter

from ftmagic.data.problems import KINDS

BAR_WIDTH = 30


def format_report(report, max_problems: int = 20) -> str:
    """Summary, histogram and the first ``max_problems`` problems, as lines of text."""
    r = report
    lines = [f"{r.source}: {r.records} records, format {r.format} ({r.format_evidence})"]
    if r.template:
        lines.append(f"template: {r.template} ({r.template_reason}); tokenizer: {r.tokenizer}; train_on: {r.train_on}")
    if not r.complete:
        lines.append("analysis not run yet (call ftmagic.data.report.analyse(report))")
        return "\n".join(lines)
    reasons = ", ".join(f"{k} {v}" for k, v in r.skipped_reasons.items())
    lines.append(f"usable: {r.usable}; skipped: {r.skipped}" + (f" ({reasons})" if reasons else ""))
    if r.token_lengths:
        t = r.token_lengths
        lines.append(f"tokens per record: min {t['min']}, median {_num(t['median'])}, p95 {t['p95']}, max {t['max']} "
                     f"(max_seq_len {r.max_seq_len})")
        lines.append(f"truncated: {r.truncated}; no trained token left: {r.no_trained_tokens}; "
                     f"trained tokens: {r.trained_tokens} of {r.total_tokens}"
                     + (f" ({r.trained_what})" if r.format == "classification" else ""))
        if r.split:
            lines.append(f"split into blocks: {r.split} `text` records longer than max_seq_len train as {r.blocks} "
                         "blocks (`long_text: truncate` would keep only their first block)")
        p = r.padding
        lines.append(f"padding: {100 * p['unpacked']:.1f}% unpacked (batch {p['batch_size']}), "
                     f"{100 * p['packed']:.1f}% packed")
    if r.histogram and any(b["count"] for b in r.histogram):
        lines.append("token lengths:")
        lines.extend(histogram_lines(r.histogram))
    if r.label_balance:
        counts = ", ".join(f"{k!r} {v}" for k, v in list(r.label_balance["counts"].items())[:8])
        lines.append(f"labels: {r.label_balance['distinct']} distinct answers ({counts})")
    for note in r.notes:
        lines.append(f"note: {note}")
    counts = Counter(p.kind for p in r.problems)
    if not counts:
        lines.append("problems: none")
        return "\n".join(lines)
    lines.append(f"problems: {len(r.problems)} (" + ", ".join(f"{KINDS.get(k, k)} {n}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], KINDS.get(kv[0], kv[0])))) + ")")
    for problem in r.problems[:max_problems]:
        lines.append(f"  {problem.kind}: {problem}")
    if len(r.problems) > max_problems:
        lines.append(f"  ... {len(r.problems) - max_problems} more (use --json for all)")
    return "\n".join(lines)


def histogram_lines(bins: list) -> list:
    """One text bar per bin, scaled to the largest bin.

    Example::

        >>> histogram_lines([{"start": 1, "end": 4, "count": 2}, {"start": 5, "end": None, "count": 1}])
        ['          1-4 ██████████████████████████████ 2', '           >4 ███████████████ 1']
    """
    top = max(b["count"] for b in bins) or 1
    out = []
    for b in bins:
        label = f"{b['start']}-{b['end']}" if b["end"] is not None else f">{b['start'] - 1}"
        bar = "█" * round(BAR_WIDTH * b["count"] / top)
        out.append(f"  {label:>11} {bar} {b['count']}")
    return out


def _num(value) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"

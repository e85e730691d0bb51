"""HTML of the dataset previewer, as pure functions of a report (the widget only copies it in).

Tokens are coloured by the training mask: green tokens are trained (they carry loss),
grey ones are context only; EOS has a red outline so a missing one is easy to spot;
newlines show as ``↵``.

Example::

    html = record_html(report.record(0))
    assert 'class="ftm-tok ftm-trained ftm-eos"' in html
"""

from __future__ import annotations

import json
from html import escape

from ftmagic.data.problems import KINDS

STYLE = """<style>
.ftm-prev {font-family: var(--jp-content-font-family, sans-serif); font-size: 13px}
.ftm-prev table {border-collapse: collapse} .ftm-prev td, .ftm-prev th {padding: 1px 8px; text-align: left}
.ftm-pre {white-space: pre-wrap; word-break: break-word; font-family: monospace; background: rgba(127,127,127,.08);
          padding: 6px; max-height: 320px; overflow: auto; margin: 2px 0 8px 0}
.ftm-tok {font-family: monospace; white-space: pre-wrap; border-radius: 3px; padding: 0 1px; margin: 0 1px 0 0}
.ftm-trained {background: rgba(40,170,80,.30)} .ftm-context {background: rgba(127,127,127,.15); color: #777}
.ftm-eos {outline: 2px solid #d33; font-weight: bold}
.ftm-bar {display: inline-block; height: 10px; background: #4a8fd8; vertical-align: middle}
.ftm-over {background: #d8734a} .ftm-bad {color: #c33}
.ftm-pair {display: flex; gap: 8px} .ftm-pair > div {flex: 1 1 0; min-width: 0}
</style>"""


def summary_html(report) -> str:
    """Format, counts, token statistics, padding and notes as a small table."""
    r = report
    rows = [("source", escape(r.source)), ("format", f"<b>{escape(r.format)}</b> — {escape(r.format_evidence)}"),
            ("records", f"{r.records} read, {r.usable} usable, {r.skipped} skipped" + _reasons(r.skipped_reasons)
             if r.complete else f"{r.records} read; analysing…")]
    if r.template:
        rows.append(("template", f"{escape(r.template)} ({escape(r.template_reason)}); tokenizer {escape(str(r.tokenizer))}"))
    if r.token_lengths:
        t = r.token_lengths
        rows.append(("tokens/record", f"min {t['min']}, median {t['median']:g}, p95 {t['p95']}, max {t['max']} "
                                      f"(max_seq_len {r.max_seq_len})"))
        bad = ' class="ftm-bad"' if r.truncated or r.no_trained_tokens else ""
        rows.append(("truncated", f"<span{bad}>{r.truncated} truncated, {r.no_trained_tokens} with no trained token</span>"))
        rows.append(("trained tokens", f"{r.trained_tokens} of {r.total_tokens} (train_on: {escape(r.train_on)})"))
        p = r.padding
        rows.append(("padding", f"{100 * p['unpacked']:.1f}% unpacked (batch {p['batch_size']}), "
                                f"{100 * p['packed']:.1f}% with packing"))
    if r.label_balance:
        counts = ", ".join(f"{escape(str(k))}: {v}" for k, v in list(r.label_balance["counts"].items())[:8])
        rows.append(("labels", f"{r.label_balance['distinct']} distinct answers ({counts})"))
    for note in r.notes:
        rows.append(("note", escape(note)))
    body = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'{STYLE}<div class="ftm-prev"><table>{body}</table></div>'


def histogram_html(bins, max_seq_len: int) -> str:
    """Horizontal bars of token lengths; the bin beyond ``max_seq_len`` (truncated) is orange."""
    if not bins:
        return ""
    top = max(b["count"] for b in bins) or 1
    rows = []
    for b in bins:
        label = f"{b['start']}–{b['end']}" if b["end"] is not None else f"&gt; {max_seq_len}"
        cls = "ftm-bar ftm-over" if b["end"] is None else "ftm-bar"
        width = round(200 * b["count"] / top)
        rows.append(f'<tr><td>{label}</td><td><span class="{cls}" style="width:{width}px"></span> {b["count"]}</td></tr>')
    return f'<div class="ftm-prev"><b>token lengths</b><table>{"".join(rows)}</table></div>'


def problems_html(problems, limit: int = 50) -> str:
    """Counts per kind, then the first ``limit`` problems with their locations."""
    if not problems:
        return '<div class="ftm-prev"><b>problems</b>: none</div>'
    counts: dict = {}
    for p in problems:
        counts[p.kind] = counts.get(p.kind, 0) + 1
    head = ", ".join(f"{escape(KINDS.get(k, k))} {n}" for k, n in sorted(counts.items()))
    rows = "".join(f"<tr><td>{escape(p.kind)}</td><td>{escape(p.location)}</td><td>{escape(p.message)}</td></tr>"
                   for p in problems[:limit])
    more = f"<div>… {len(problems) - limit} more</div>" if len(problems) > limit else ""
    return (f'<div class="ftm-prev"><b>problems ({len(problems)})</b>: {head}'
            f'<div style="max-height:220px;overflow:auto"><table>{rows}</table></div>{more}</div>')


def token_html(token) -> str:
    """One token as a coloured span (trained / context, EOS outlined, newlines as ↵)."""
    classes = "ftm-tok " + ("ftm-trained" if token.trained else "ftm-context") + (" ftm-eos" if token.eos else "")
    text = escape(token.text).replace("\n", "↵\n")
    title = f"id {token.id}" + (", trained" if token.trained else ", not trained") + (", EOS" if token.eos else "")
    return f'<span class="{classes}" title="{title}">{text}</span>'


def record_html(view) -> str:
    """The pager's page: location, problems, raw record, rendered text and the coloured tokens."""
    parts = [f'<div class="ftm-prev"><b>record {view.index}</b> — {escape(view.location)}']
    for p in view.problems:
        parts.append(f'<div class="ftm-bad">{escape(p.kind)}: {escape(p.message)}</div>')
    raw = json.dumps(view.raw, ensure_ascii=False, indent=1, default=str)
    parts.append(f'<div>raw record</div><div class="ftm-pre">{escape(raw)}</div>')
    if view.pair is not None:
        parts.append(pair_html(view.pair))
        parts.append("</div>")
        return "".join(parts)
    if view.label is not None:
        parts.append(f"<div>label <b>{escape(str(view.label))}</b></div>")
    if view.text is not None:
        parts.append(f'<div>rendered text</div><div class="ftm-pre">{escape(view.text)}</div>')
    if view.tokens:
        trained = sum(1 for t in view.tokens if t.trained)
        cut = f", cut from {view.length}" if view.truncated else ""
        parts.append(f'<div>{len(view.tokens)} tokens{cut}; <span class="ftm-tok ftm-trained">trained</span> {trained}, '
                     f'<span class="ftm-tok ftm-context">context</span> {len(view.tokens) - trained}, '
                     f'<span class="ftm-tok ftm-eos">EOS</span></div>')
        parts.append('<div class="ftm-pre">' + "".join(token_html(t) for t in view.tokens) + "</div>")
    parts.append("</div>")
    return "".join(parts)


def pair_html(pair: dict) -> str:
    """A preference record's two sides next to each other, each as its coloured tokens.

    The prompt is context (grey) on both sides; the completion tokens whose log-probabilities
    the preference loss compares are green.
    """
    columns = []
    for side in ("chosen", "rejected"):
        data = pair[side]
        trained = sum(1 for t in data["tokens"] if t.trained)
        cut = f", cut from {data['length']}" if data["truncated"] else ""
        columns.append(f"<div><b>{side}</b>: {len(data['tokens'])} tokens{cut}, {trained} compared"
                       f'<div class="ftm-pre">{"".join(token_html(t) for t in data["tokens"])}</div></div>')
    legend = ('<div><span class="ftm-tok ftm-trained">compared (completion)</span> '
              '<span class="ftm-tok ftm-context">context (prompt)</span> <span class="ftm-tok ftm-eos">EOS</span></div>')
    return legend + '<div class="ftm-pair">' + "".join(columns) + "</div>"


def _reasons(reasons: dict) -> str:
    return (" (" + ", ".join(f"{escape(k)} {v}" for k, v in reasons.items()) + ")") if reasons else ""

"""HTML of the dataset previewer, as pure functions of a report (the widget only copies it in).

Tokens are coloured by the training mask: green tokens are trained (they carry loss),
grey ones are context only; EOS has a red outline so a missing one is easy to spot;
newlines show as ``↵``.

What decides how it looks is written inline (``style=""`` on the cells and bars), not
only in the ``<style>`` block: untrusted notebooks, GitHub and some viewers drop
``<style>``, and JupyterLab's own stylesheet right-aligns table cells. Colours are
translucent or JupyterLab's theme variables, so they read on light and dark themes.

Example::

    html = record_html(report.record(0))
    assert 'class="ftm-tok ftm-trained ftm-eos"' in html
"""

from __future__ import annotations

import json
from html import escape

from ftmagic.data.problems import KINDS

BAD = "var(--jp-error-color1, #d32f2f)"
CELL = "text-align:left;vertical-align:top;padding:1px 8px"  # every th and td: left, whatever the host's CSS
TRAINED = "background:rgba(40,170,80,.30)"
CONTEXT = "background:rgba(127,127,127,.15);opacity:.75"
EOS = "outline:2px solid #e53935;font-weight:bold"
PAIR = "display:flex;flex-wrap:wrap;gap:8px"  # the two sides of a preference pair; stacked when narrow
SIDE = "flex:1 1 240px;min-width:0"
PRE = ("white-space:pre-wrap;word-break:break-word;font-family:monospace;background:rgba(127,127,127,.08);"
       "padding:6px;max-height:320px;overflow:auto;margin:2px 0 8px 0;text-align:left;line-height:1.4")
STYLE = f"""<style>
.ftm-prev {{font-family: var(--jp-content-font-family, sans-serif); font-size: 13px; max-width: 100%}}
.ftm-prev table {{border-collapse: collapse}}
.ftm-tok {{font-family: monospace; white-space: pre-wrap; border-radius: 3px; padding: 0 1px; margin: 0 1px 0 0}}
.ftm-bad {{color: {BAD}}}
.ftm-pair {{display: flex; flex-wrap: wrap; gap: 8px}} .ftm-pair > div {{flex: 1 1 240px; min-width: 0}}
</style>"""


def _row(*cells: str, header: bool = False) -> str:
    """A table row whose cells are left-aligned inline (``cells`` are HTML already)."""
    first = "th" if header else "td"
    return ("<tr>" + f'<{first} style="{CELL}">{cells[0]}</{first}>'
            + "".join(f'<td style="{CELL}">{cell}</td>' for cell in cells[1:]) + "</tr>")


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
        bad = f' class="ftm-bad" style="color:{BAD}"' if r.truncated or r.no_trained_tokens else ""
        rows.append(("truncated", f"<span{bad}>{r.truncated} truncated, {r.no_trained_tokens} with no trained token</span>"))
        rows.append(("trained tokens", f"{r.trained_tokens} of {r.total_tokens} ({escape(r.trained_what)})"))
        p = r.padding
        rows.append(("padding", f"{100 * p['unpacked']:.1f}% unpacked (batch {p['batch_size']}), "
                                f"{100 * p['packed']:.1f}% with packing"))
    if r.label_balance:
        counts = ", ".join(f"{escape(str(k))}: {v}" for k, v in list(r.label_balance["counts"].items())[:8])
        rows.append(("labels", f"{r.label_balance['distinct']} distinct answers ({counts})"))
    for note in r.notes:
        rows.append(("note", escape(note)))
    body = "".join(_row(escape(k), v, header=True) for k, v in rows)
    return f'{STYLE}<div class="ftm-prev"><table>{body}</table></div>'


def histogram_html(bins, max_seq_len: int) -> str:
    """Horizontal bars of token lengths; the bin beyond ``max_seq_len`` (truncated) is orange."""
    if not bins:
        return ""
    top = max(b["count"] for b in bins) or 1
    rows = []
    for b in bins:
        label = f"{b['start']}–{b['end']}" if b["end"] is not None else f"&gt; {max_seq_len}"
        color = "#d8734a" if b["end"] is None else "#4a8fd8"
        width = round(200 * b["count"] / top)
        bar = (f'<span class="ftm-bar" style="display:inline-block;height:10px;width:{width}px;background:{color};'
               f'vertical-align:middle"></span> {b["count"]}')
        rows.append(_row(label, bar))
    return f'<div class="ftm-prev"><b>token lengths</b><table>{"".join(rows)}</table></div>'


def problems_html(problems, limit: int = 50) -> str:
    """Counts per kind, then the first ``limit`` problems with their locations."""
    if not problems:
        return '<div class="ftm-prev"><b>problems</b>: none</div>'
    counts: dict = {}
    for p in problems:
        counts[p.kind] = counts.get(p.kind, 0) + 1
    head = ", ".join(f"{escape(KINDS.get(k, k))} {n}" for k, n in sorted(counts.items()))
    rows = "".join(_row(escape(p.kind), escape(p.location), escape(p.message)) for p in problems[:limit])
    more = f"<div>… {len(problems) - limit} more</div>" if len(problems) > limit else ""
    return (f'<div class="ftm-prev"><b>problems ({len(problems)})</b>: {head}'
            f'<div style="max-height:220px;overflow:auto"><table>{rows}</table></div>{more}</div>')


def token_html(token) -> str:
    """One token as a coloured span (trained / context, EOS outlined, newlines as ↵)."""
    classes = "ftm-tok " + ("ftm-trained" if token.trained else "ftm-context") + (" ftm-eos" if token.eos else "")
    style = (TRAINED if token.trained else CONTEXT) + (";" + EOS if token.eos else "")
    text = escape(token.text).replace("\n", "↵\n")
    title = f"id {token.id}" + (", trained" if token.trained else ", not trained") + (", EOS" if token.eos else "")
    return f'<span class="{classes}" title="{title}" style="{style}">{text}</span>'


def record_html(view) -> str:
    """The pager's page: location, problems, raw record, rendered text and the coloured tokens."""
    parts = [f'<div class="ftm-prev"><b>record {view.index}</b> — {escape(view.location)}']
    for p in view.problems:
        parts.append(f'<div class="ftm-bad" style="color:{BAD}">{escape(p.kind)}: {escape(p.message)}</div>')
    raw = json.dumps(view.raw, ensure_ascii=False, indent=1, default=str)
    parts.append(f'<div>raw record</div><div class="ftm-pre" style="{PRE}">{escape(raw)}</div>')
    if view.pair is not None:
        parts.append(pair_html(view.pair))
        parts.append("</div>")
        return "".join(parts)
    if view.label is not None:
        parts.append(f"<div>label <b>{escape(str(view.label))}</b>: the target; the head reads the one trained "
                     "token and is trained to predict this label there</div>")
    if view.text is not None:
        parts.append(f'<div>rendered text</div><div class="ftm-pre" style="{PRE}">{escape(view.text)}</div>')
    if view.tokens:
        trained = sum(1 for t in view.tokens if t.trained)
        cut = f", cut from {view.length}" if view.truncated else ""
        parts.append(f'<div>{len(view.tokens)} tokens{cut}; <span class="ftm-tok ftm-trained" style="{TRAINED}">trained'
                     f'</span> {trained}, <span class="ftm-tok ftm-context" style="{CONTEXT}">context</span> '
                     f'{len(view.tokens) - trained}, <span class="ftm-tok ftm-eos" style="{EOS}">EOS</span></div>')
        parts.append(f'<div class="ftm-pre" style="{PRE}">' + "".join(token_html(t) for t in view.tokens) + "</div>")
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
        columns.append(f'<div style="{SIDE}"><b>{side}</b>: {len(data["tokens"])} tokens{cut}, {trained} compared'
                       f'<div class="ftm-pre" style="{PRE}">{"".join(token_html(t) for t in data["tokens"])}</div></div>')
    legend = (f'<div><span class="ftm-tok ftm-trained" style="{TRAINED}">compared (completion)</span> '
              f'<span class="ftm-tok ftm-context" style="{CONTEXT}">context (prompt)</span> '
              f'<span class="ftm-tok ftm-eos" style="{EOS}">EOS</span></div>')
    # Inline styles, as everywhere here: nbconvert's HTML and untrusted views drop the <style> block.
    return legend + f'<div class="ftm-pair" style="{PAIR}">' + "".join(columns) + "</div>"


def _reasons(reasons: dict) -> str:
    return (" (" + ", ".join(f"{escape(k)} {v}" for k, v in reasons.items()) + ")") if reasons else ""

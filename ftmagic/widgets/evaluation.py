"""What evaluation by generation looks like: the metric curves and the table of answers.

Pure functions of the run's events (:class:`~ftmagic.textprogress.RunState`), returning
static HTML and SVG, so the live widget, the summary that stays in a saved notebook and
the tests share them. The table shows a few prompts: the reference, the base model's
answer (step 0) and the answer at each evaluation since, so a reader sees the model change.

Example::

    svg = metric_chart_svg({"exact_match": [(0, 0.0), (50, 0.4), (100, 0.9)]})
    html = answers_table_html(state.generations)
"""

from __future__ import annotations

import html
from typing import Optional, Sequence

from ftmagic.textprogress import format_loss

PALETTE = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
TABLE_PROMPTS = 5  # rows of the answers table
TABLE_STEPS = 4  # evaluation columns besides the base model's (the latest ones)


def metric_chart_svg(series: dict, *, width: int = 480, height: int = 180, label: str = "eval metrics") -> str:
    """An SVG chart of each metric's (step, value) points: one coloured line with dots per metric.

    The y axis spans 0..1 when every value lies there (the scores of :mod:`ftmagic.scoring`),
    else the values' range. Returns ``""`` when there is nothing to draw.

    Example::

        svg = metric_chart_svg({"exact_match": [(0, 0.0), (10, 0.5)]})
        assert svg.startswith("<svg") and 'class="metric exact_match"' in svg
    """
    series = {name: [(float(s), float(v)) for s, v in points] for name, points in series.items() if points}
    if not series:
        return ""
    values = [v for points in series.values() for _, v in points]
    steps = [s for points in series.values() for s, _ in points]
    lo, hi = (0.0, 1.0) if min(values) >= 0 and max(values) <= 1 else (min(values), max(values))
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    x_lo, x_hi = min(steps), max(steps)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    left, right, top, bottom = 48, 12, 10, 26
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(step: float, value: float) -> tuple:
        return (left + (step - x_lo) / (x_hi - x_lo) * plot_w, top + (hi - value) / (hi - lo) * plot_h)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'font-family="sans-serif" font-size="11" role="img" aria-label="{html.escape(label)}">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>',
             f'<text x="{left - 4}" y="{top + 10}" text-anchor="end" fill="currentColor">{format_loss(hi)}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" fill="currentColor">{format_loss(lo)}</text>',
             f'<text x="{left}" y="{height - 8}" fill="currentColor">step {int(x_lo)}</text>',
             f'<text x="{left + plot_w}" y="{height - 8}" text-anchor="end" fill="currentColor">{int(x_hi)}</text>']
    for i, (name, points) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        cls = f"metric {html.escape(name)}"
        coords = [xy(s, v) for s, v in points]
        if len(coords) > 1:
            parts.append(f'<polyline class="{cls}" fill="none" stroke="{color}" stroke-width="1.5" points="'
                         + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + '"/>')
        parts += [f'<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in coords]
        parts.append(f'<text x="{left + 6}" y="{top + 14 + 13 * i}" fill="{color}">&#9679; {html.escape(name)} '
                     f'{format_loss(points[-1][1])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def answer_columns(generations: Sequence, limit: int = TABLE_STEPS) -> list:
    """The evaluations the table shows: the base model's (step 0) and the latest ``limit`` others."""
    base = [g for g in generations if g.step == 0][:1]
    rest = [g for g in generations if g.step != 0]
    return base + rest[-limit:]


def answers_rows(generations: Sequence, prompts: int = TABLE_PROMPTS, steps: int = TABLE_STEPS) -> tuple:
    """``(header, rows)`` of the answers table as plain text.

    Example::

        >>> from ftmagic.evalevents import Generations
        >>> g0 = Generations(step=0, rows=[{"prompt": "reverse: ab", "reference": "ba", "answer": "ab"}])
        >>> g1 = Generations(step=50, rows=[{"prompt": "reverse: ab", "reference": "ba", "answer": "ba"}])
        >>> answers_rows([g0, g1])
        (['prompt', 'reference', 'base', 'step 50'], [['reverse: ab', 'ba', 'ab', 'ba']])
    """
    columns = answer_columns(generations, steps)
    if not columns:
        return [], []
    header = ["prompt", "reference"] + ["base" if g.step == 0 else f"step {g.step}" for g in columns]
    rows = []
    for i, row in enumerate(columns[-1].rows[:prompts]):
        cells = [str(row.get("prompt", "")), "" if row.get("reference") is None else str(row["reference"])]
        for g in columns:
            cells.append(str(g.rows[i].get("answer", "")) if i < len(g.rows) else "")
        rows.append(cells)
    return header, rows


def answers_table_html(generations: Sequence, prompts: int = TABLE_PROMPTS, steps: int = TABLE_STEPS) -> str:
    """The answers table as HTML; an answer equal to the reference is marked with a check.

    Example::

        html = answers_table_html(state.generations)
        assert "<table" in html and "base" in html
    """
    header, rows = answers_rows(generations, prompts, steps)
    if not rows:
        return ""
    head = "".join(f'<th style="text-align:left;padding:2px 10px 2px 0">{html.escape(h)}</th>' for h in header)
    body = []
    for cells in rows:
        reference = cells[1]
        tds = []
        for j, cell in enumerate(cells):
            mark = " &#10003;" if j >= 2 and reference and cell.strip() == reference.strip() else ""
            tds.append(f'<td style="text-align:left;padding:2px 10px 2px 0;font-family:monospace">'
                       f'{html.escape(cell) or "&#8212;"}{mark}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    total = max((g.total for g in generations), default=0)
    note = (f'<div style="opacity:0.7">{len(rows)} of {total} prompts; &#10003; = equals the reference</div>'
            if total else "")
    return (f'<table class="ftmagic-answers" style="border-collapse:collapse"><tr>{head}</tr>{"".join(body)}'
            f"</table>{note}")


def answers_table_text(generations: Sequence, prompts: int = TABLE_PROMPTS, steps: int = TABLE_STEPS) -> str:
    """The answers table as aligned plain text (the ``text/plain`` twin)."""
    header, rows = answers_rows(generations, prompts, steps)
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def evaluation_html(state, title: Optional[str] = "evaluation by generation") -> str:
    """The metric curves and the answers table of a run (``""`` when it did not generate)."""
    chart = metric_chart_svg(state.metric_points)
    table = answers_table_html(state.generations)
    if not chart and not table:
        return ""
    heading = f'<div style="font-weight:bold;margin:6px 0 2px">{html.escape(title)}</div>' if title else ""
    return (f'<div class="ftmagic-evaluation">{heading}<div style="display:flex;flex-wrap:wrap;gap:16px;'
            f'align-items:flex-start"><div>{chart}</div><div>{table}</div></div></div>')

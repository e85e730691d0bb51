"""Side-by-side answers of the base and the fine-tuned model, as an HTML table.

Pure functions of the rows that ``RunResult.compare`` returns (``{"prompt", "base",
"tuned"}``), so a saved notebook shows the table without a kernel.

Example::

    rows = result.compare(["reverse: abc", "reverse: hello"])
    IPython.display.display({"text/html": compare_table_html(rows),
                             "text/plain": compare_table_text(rows)}, raw=True)
"""

from __future__ import annotations

import html
from typing import Sequence

_CELL = 'style="text-align:left;vertical-align:top;padding:4px 8px;white-space:pre-wrap;font-family:monospace"'


def split_prompts(cell: str) -> list[str]:
    """Prompts from a cell body: one per non-empty line, or blocks separated by ``---`` lines.

    The ``---`` form allows prompts that span several lines.

    Example::

        >>> split_prompts("reverse: abc\\n\\nreverse: hello\\n")
        ['reverse: abc', 'reverse: hello']
        >>> split_prompts("line one\\nline two\\n---\\nsecond prompt")
        ['line one\\nline two', 'second prompt']
    """
    lines = (cell or "").splitlines()
    if any(line.strip() == "---" for line in lines):
        blocks, current = [], []
        for line in lines + ["---"]:
            if line.strip() == "---":
                text = "\n".join(current).strip()
                if text:
                    blocks.append(text)
                current = []
            else:
                current.append(line)
        return blocks
    return [line.strip() for line in lines if line.strip()]


def _columns(rows: Sequence[dict]) -> list[str]:
    return ["prompt"] + [key for key in ("base", "tuned") if any(key in row for row in rows)]


def compare_table_html(rows: Sequence[dict]) -> str:
    """An HTML table with one row per prompt and a column per model (base, tuned).

    Example::

        >>> compare_table_html([{"prompt": "a<b", "base": "x", "tuned": "y"}]).count("<td")
        3
    """
    columns = _columns(rows)
    head = "".join(f"<th {_CELL}>{name}</th>" for name in columns)
    body = "".join(
        "<tr>" + "".join(f"<td {_CELL}>{html.escape(str(row.get(name, '')))}</td>" for name in columns) + "</tr>"
        for row in rows
    )
    return f'<table class="ftmagic-compare" style="border-collapse:collapse"><thead><tr>{head}</tr></thead>' \
           f"<tbody>{body}</tbody></table>"


def compare_table_text(rows: Sequence[dict]) -> str:
    """The same table as plain text (terminal IPython, nbconvert to text).

    Example::

        >>> print(compare_table_text([{"prompt": "p", "base": "b", "tuned": "t"}]))
        prompt: p
          base:  b
          tuned: t
    """
    out = []
    for row in rows:
        out.append(f"prompt: {row.get('prompt', '')}")
        for name in ("base", "tuned"):
            if name in row:
                out.append(f"  {name + ':':<6} {row[name]}")
    return "\n".join(out)

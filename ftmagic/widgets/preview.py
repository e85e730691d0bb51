"""``%ft_preview DATA``: the dataset previewer widget and its magic.

DATA is a path (file, saved ``datasets`` folder, Hub id) or the name of a notebook
variable holding a list of dicts, a DataFrame or a ``datasets.Dataset``. The widget
shows the summary, a token-length histogram, the problem list and a record pager;
each page shows the raw record, the rendered text and the tokens coloured by the
training mask. The widget opens as soon as the data is read: pages are encoded when
shown, and the full analysis runs in a background thread and fills in the summary
when done, so a million-row dataset opens as fast as a small one. Outside a notebook
the text report is printed instead.

Example (in a notebook)::

    %load_ext ftmagic
    %ft_preview train.jsonl --model Qwen/Qwen2.5-0.5B --max-seq-len 1024
    %ft_preview records --name report        # a variable; the report is bound to `report`
"""

from __future__ import annotations

import re
from typing import Any, Optional

from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from ftmagic.commands.preview import LONG_TEXT_DEFAULT, LONG_TEXT_HELP
from ftmagic.config import FORMATS, LONG_TEXT_MODES
from ftmagic.objectives import OBJECTIVE_NAMES
from ftmagic.usage import as_usage_error, expand_vars, magic_argv, parse_magic_args
from ftmagic.widgets.static import StaticTwin
from ftmagic.widgets.preview_html import histogram_html, problems_html, record_html, summary_html


FOREGROUND_RECORDS = 20_000  # up to this many records the analysis runs before the widget shows
JUMP_LIMIT = 200  # problems offered in the "go to a problem" list


class PreviewWidget:
    """The previewer's widget for a :class:`~ftmagic.data.report.DatasetReport`; ``.box`` is what is displayed.

    Example::

        w = PreviewWidget(ftmagic.preview("train.jsonl"))
        w.next.click()            # page forward (also w.show(i))
        w.record.value            # HTML of the record on screen

        w = PreviewWidget(open_preview("big.jsonl"))   # not analysed yet: the pager works already
        w.analyse()                                    # background thread; the summary fills in
    """

    def __init__(self, report, index: int = 0):
        import ipywidgets as widgets

        self.report = report
        self.summary = widgets.HTML()
        self.histogram = widgets.HTML()
        self.problems = widgets.HTML()
        self.progress = widgets.IntProgress(value=0, min=0, max=max(1, len(report)), description="analysing",
                                            layout=widgets.Layout(display="none" if report.complete else None))
        last = max(0, len(report) - 1)
        # Fixed sizes that never shrink: in a narrow window the pager wraps onto a second line
        # instead of squeezing the buttons' labels.
        keep = dict(flex="0 0 auto")
        self.prev = widgets.Button(description="◀ prev", layout=widgets.Layout(width="80px", **keep))
        self.next = widgets.Button(description="next ▶", layout=widgets.Layout(width="80px", **keep))
        self.index = widgets.BoundedIntText(value=0, min=0, max=last, description="record",
                                            layout=widgets.Layout(width="170px", **keep))
        self.total = widgets.Label(f"of {len(report)} (0-based)", layout=widgets.Layout(**keep))
        self.record = widgets.HTML()
        self.prev.on_click(lambda _: self.show(self.index.value - 1))
        self.next.on_click(lambda _: self.show(self.index.value + 1))
        self.index.observe(lambda change: self._render(change["new"]), names="value")
        self.jump = widgets.Dropdown(options=[("go to a problem…", -1)], value=-1,
                                     layout=widgets.Layout(width="auto", flex="1 1 220px", max_width="340px"))
        self.jump.observe(self._on_jump, names="value")
        pager = widgets.HBox([self.prev, self.index, self.next, self.total, self.jump],
                             layout=widgets.Layout(flex_flow="row wrap", align_items="center"))
        self.box = widgets.VBox([self.summary, self.progress, self.histogram, self.problems, pager, self.record],
                                layout=widgets.Layout(max_width="100%"))
        self.twin = StaticTwin(self.box, self.snapshot_html, self.snapshot_text)
        self.rendered = 0  # how many pages were encoded (the pager is lazy)
        self.refresh()
        if min(index, last) == 0:
            self._render(0)
        else:
            self.index.value = min(index, last)

    def analyse(self, background: bool = True):
        """Run the full analysis (in a thread by default, so the pager works meanwhile), then refresh.

        Returns the thread, or None when run in the foreground.
        """
        from ftmagic.data.report import analyse

        def work():
            try:
                analyse(self.report, progress=self._on_progress)
            except Exception as exc:  # noqa: BLE001 - a thread's error would otherwise vanish
                from html import escape

                self.summary.value += f'<div class="ftm-prev ftm-bad">analysis failed: {escape(str(exc))}</div>'
                if not background:
                    raise
                return
            self.refresh()
            if self.index.value < len(self.report):
                self._render(self.index.value)  # the page now lists the record's problems

        if not background:
            work()
            return None
        import threading

        thread = threading.Thread(target=work, name="ftmagic-preview", daemon=True)
        thread.start()
        return thread

    def refresh(self) -> None:
        """Copy the report's summary, histogram and problems into the widget."""
        self.summary.value = summary_html(self.report)
        self.histogram.value = histogram_html(self.report.histogram, self.report.max_seq_len)
        self.problems.value = problems_html(self.report.problems) if self.report.complete else ""
        if self.report.complete:
            self.jump.options = [("go to a problem…", -1)] + problem_choices(self.report)
        self.progress.layout.display = "none" if self.report.complete else None
        self.twin.refresh()

    def _on_jump(self, change) -> None:
        if change["new"] >= 0:
            self.show(change["new"])
            self.jump.value = -1  # so the same problem can be picked again

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max, self.progress.value = max(1, total), done

    def show(self, index: int) -> None:
        """Go to record ``index`` (clamped to the dataset)."""
        self.index.value = max(self.index.min, min(self.index.max, index))

    def _render(self, index: int) -> None:
        if len(self.report) == 0:
            self.record.value = '<div class="ftm-prev">no records to show</div>'
            return
        self.record.value = record_html(self.report.record(index))
        self.rendered += 1
        self.prev.disabled = index <= 0
        self.next.disabled = index >= len(self.report) - 1
        self.twin.refresh()  # a notebook saved now shows this page

    def snapshot_html(self) -> str:
        """Summary, histogram, problems and the record on screen as static HTML (for saved notebooks)."""
        return "".join((self.summary.value, self.histogram.value, self.problems.value, self.record.value))

    def snapshot_text(self) -> str:
        """The summary as plain text (text-only viewers); analysing first if needed would block, so not here."""
        if not self.report.complete:
            return f"{self.report.source}: {len(self.report)} records (analysing)"
        return self.report.to_text()

    def _ipython_display_(self) -> None:
        self.twin.display()


@magics_class
class PreviewMagics(Magics):
    """``%ft_preview``: see exactly what the model will be trained on."""

    @magic_arguments()
    @argument("data", metavar="DATA", help="path, Hugging Face dataset id, or a notebook variable name")
    @argument("--model", default=None, help="whose tokenizer and chat template to use (default: tiny)")
    @argument("--format", default="auto", choices=FORMATS, help="data format (default: detect)")
    @argument("--objective", default=None, choices=OBJECTIVE_NAMES,
              help="detect only the formats this objective trains on (default: any format)")
    @argument("--template", default=None, help="named template for base models: chatml, alpaca, llama3, plain")
    @argument("--max-seq-len", type=int, default=512, help="tokens per training example")
    @argument("--train-on", default="completions", choices=("completions", "all"), help="which tokens are trained")
    @argument("--long-text", default=LONG_TEXT_DEFAULT, choices=LONG_TEXT_MODES, help=LONG_TEXT_HELP)
    @argument("--columns", default=None, help="FIELD=COLUMN pairs, e.g. prompt=question,completion=answer")
    @argument("--system-prompt", default=None, help="system prompt for conversations that have none")
    @argument("--batch-size", type=int, default=4, help="batch size for the padding estimate")
    @argument("--name", default=None, help="bind the DatasetReport to this variable")
    @argument("--text", action="store_true", help="print the text report instead of the widget")
    @no_var_expand
    @line_magic
    def ft_preview(self, line: str) -> None:
        """Preview a dataset: format, counts, lengths, problems and a record pager.

        DATA may name a notebook variable (``rows`` or ``$rows``): a list of dicts, a pandas
        DataFrame or a datasets.Dataset.

        Example: ``%ft_preview train.jsonl --model tiny --max-seq-len 256``
        """
        namespace = self.shell.user_ns if self.shell else {}
        args = parse_magic_args(self.ft_preview.parser, expand_line(line, namespace))
        with as_usage_error():
            from ftmagic.commands.preview import parse_columns
            from ftmagic.data.report import analyse, open_preview

            report = open_preview(lookup_data(args.data, namespace), model=args.model,
                                  format=args.format, template=args.template, max_seq_len=args.max_seq_len,
                                  train_on=args.train_on, columns=parse_columns(args.columns) or None,
                                  system_prompt=args.system_prompt, batch_size=args.batch_size, objective=args.objective,
                                  long_text=args.long_text)
        if args.name:
            self.shell.user_ns[args.name] = report
        if args.text or not _in_notebook(self.shell):
            print(analyse(report).to_text())
            return
        widget = PreviewWidget(report)
        if len(report) <= FOREGROUND_RECORDS:
            # Small data is analysed in about a second: do it now, so the saved notebook's
            # static copy carries the full summary and problem list.
            widget.analyse(background=False)
            widget.twin.display()
            return
        # The pager works at once; statistics and problems fill in when the analysis ends.
        widget.twin.display()
        widget.analyse(background=True)


def problem_choices(report, limit: int = JUMP_LIMIT) -> list:
    """``(label, record index)`` for the first ``limit`` problems that belong to a record.

    Example::

        problem_choices(report)   # [('duplicate: d.jsonl:2', 1), ('empty_field: d.jsonl:3', 2)]
    """
    out = []
    for p in report.problems:
        index = report.index_of(p.location)
        if index is not None:
            out.append((f"{p.kind}: {p.location}", index))
            if len(out) == limit:
                break
    return out


def expand_line(line: str, namespace: dict) -> list:
    """The magic's arguments with ``{var}`` / ``$var`` expanded as IPython would, except a
    ``$name`` whose variable is data (not a string or number): that one stays a name for
    :func:`lookup_data`. IPython's own expansion wrote a list of dicts into the line as its
    text, which then read as stray arguments.

    Example::

        >>> expand_line("$rows --max-seq-len {n * 2}", {"rows": [{"text": "a"}], "n": 32})
        ['$rows', '--max-seq-len', '64']
    """
    def keep_data(match):  # `$$name` is IPython's escape for a literal `$name`
        name = match.group(1)
        is_data = name in namespace and not isinstance(namespace[name], (str, int, float))
        return "$$" + name if is_data else match.group(0)

    protected = re.sub(r"(?<![$\w])\$([A-Za-z_]\w*)", keep_data, line)
    expanded = expand_vars(protected, namespace)
    return magic_argv(line if expanded == protected and protected != line else expanded)


def lookup_data(token: str, namespace: dict) -> Any:
    """A notebook variable when ``token`` (or ``$token``) names one, else the token as a path or id.

    Example::

        >>> lookup_data("rows", {"rows": [{"text": "a"}]})
        [{'text': 'a'}]
        >>> lookup_data("train.jsonl", {})
        'train.jsonl'
    """
    import os

    from ftmagic.errors import DataError

    name = token[1:] if token.startswith("$") else token
    if name.isidentifier() and name in namespace:
        return namespace[name]
    path = token.strip("'\"")
    if name.isidentifier() and not os.path.exists(path):
        raise DataError(f"`{name}` is neither a notebook variable nor a file; pass a path, a variable name, or a "
                        "Hugging Face dataset id with its owner (e.g. stanfordnlp/imdb)")
    return path


def _in_notebook(shell: Optional[Any]) -> bool:
    from ftmagic.widgets.finetune import in_notebook

    return in_notebook(shell)

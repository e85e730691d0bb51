"""The previewer widget (built and paged in plain pytest), its HTML, and the %ft_preview magic."""

import re

import pytest

import ftmagic
from ftmagic.constants import IGNORE_INDEX as IGNORE
from ftmagic.data import encode_example
from ftmagic.widgets.preview_html import record_html, summary_html

pytest.importorskip("ipywidgets")


@pytest.fixture()
def report(test_tokenizer):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(5)] + [{"prompt": "q", "completion": ""}]
    return ftmagic.preview(rows, tokenizer=test_tokenizer, max_seq_len=64)


def test_widget_builds_and_pages(report):
    from ftmagic.widgets.preview import PreviewWidget

    w = PreviewWidget(report)
    assert "prompt_completion" in w.summary.value and "token lengths" in w.histogram.value
    assert "empty_field" in w.problems.value and w.total.value == "of 6 (0-based)"
    assert "record 0" in w.record.value and w.prev.disabled and not w.next.disabled
    w.next.click()
    w.next.click()
    assert w.index.value == 2 and "record 2" in w.record.value and "answer 2" in w.record.value
    w.prev.click()
    assert w.index.value == 1
    w.show(99)  # clamped to the last record
    assert w.index.value == 5 and w.next.disabled
    assert "field `completion` is empty" in w.record.value
    assert w.rendered == 5  # the first page and one per move: pages are encoded when shown


def test_token_spans_match_the_training_mask(report, test_tokenizer):
    html = record_html(report.record(3))
    classes = re.findall(r'<span class="ftm-tok (ftm-trained|ftm-context)( ftm-eos)?" title=', html)
    enc = encode_example(test_tokenizer, {"prompt": "question 3", "completion": "answer 3"}, max_seq_len=64)
    assert [c == "ftm-trained" for c, _ in classes] == [label != IGNORE for label in enc.labels]
    assert [bool(e) for _, e in classes] == [i == test_tokenizer.eos_token_id for i in enc.input_ids]
    assert "&lt;|im_end|&gt;</span>" in html  # EOS shown as text
    assert "↵" in html  # newlines visible


def test_summary_html_escapes(test_tokenizer):
    r = ftmagic.preview([{"prompt": "<b>", "completion": "x"}], tokenizer=test_tokenizer)
    assert "<b>" not in record_html(r.record(0)).replace("<b>record", "")
    assert "usable" in summary_html(r)


def test_magic_prints_text_outside_a_notebook(test_tokenizer, tmp_path, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    folder = tmp_path / "tok"
    test_tokenizer.save_pretrained(str(folder))
    shell = InteractiveShell.instance()
    shell.extension_manager.load_extension("ftmagic")
    shell.user_ns["rows"] = [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "a"}]
    shell.run_line_magic("ft_preview", f"rows --model {folder} --max-seq-len 64 --name rep")
    out = capsys.readouterr().out
    assert out.startswith("data: 2 records, format prompt_completion")
    assert "duplicate: data[1]: same conversation as data[0]" in out
    assert isinstance(shell.user_ns["rep"], ftmagic.DatasetReport)


def test_magic_errors_are_one_line_usage_errors():
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.extension_manager.load_extension("ftmagic")
    magic = shell.find_line_magic("ft_preview")
    with pytest.raises(UsageError, match="`missing_var` is neither a notebook variable nor a file"):
        magic("missing_var")
    with pytest.raises(UsageError, match=r"nope\.jsonl: file not found"):
        magic("nope.jsonl")


def test_lookup_data():
    from ftmagic.widgets.preview import lookup_data

    assert lookup_data("$rows", {"rows": [1]}) == [1]
    assert lookup_data("data/train.jsonl", {}) == "data/train.jsonl"
    assert lookup_data("org/name", {}) == "org/name"


def test_widget_opens_before_the_analysis(test_tokenizer):
    from ftmagic.data.report import open_preview
    from ftmagic.widgets.preview import PreviewWidget

    rows = [{"prompt": f"q{i}", "completion": "a"} for i in range(3000)] + [{"prompt": "q0", "completion": "a"}]
    report = open_preview(rows, tokenizer=test_tokenizer)
    assert not report.complete and report.usable is None
    w = PreviewWidget(report)
    assert "analysing…" in w.summary.value and w.problems.value == "" and w.progress.layout.display is None
    assert "q0" in w.record.value  # the pager works before any statistics exist
    thread = w.analyse(background=True)
    w.show(2999)  # paging while the analysis runs
    thread.join(timeout=60)
    assert report.complete and report.usable == 3001 and w.progress.value == 3001
    assert "duplicate" in w.problems.value and "analysing" not in w.summary.value
    assert w.progress.layout.display == "none"
    w.show(3000)
    assert "same conversation as data[0]" in w.record.value


def test_jump_to_a_problem(report):
    from ftmagic.widgets.preview import PreviewWidget, problem_choices

    assert problem_choices(report) == [("empty_field: data[5]", 5)]
    w = PreviewWidget(report, index=2)
    assert w.index.value == 2 and "record 2" in w.record.value
    w.jump.value = 5
    assert w.index.value == 5 and "field `completion` is empty" in w.record.value and w.jump.value == -1
    assert report.index_of("data[3]") == 3 and report.index_of("nowhere") is None


@pytest.mark.parametrize("flags, line", [("--max-seq-len 0", "`max_seq_len: 0` must be at least 8"),
                                         ("--max-seq-len -3", "`max_seq_len: -3` must be at least 8"),
                                         ("--max-seq-len 2000000", "`max_seq_len: 2000000` must be at most 1048576"),
                                         ("--batch-size 0", "`batch_size: 0` must be at least 1")])
def test_out_of_range_sizes_are_one_line_usage_errors(test_tokenizer, flags, line):
    # They reached the analysis: a ZeroDivisionError (max_seq_len 0) or ValueError (batch size 0) traceback.
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.extension_manager.load_extension("ftmagic")
    shell.user_ns["rows"] = [{"prompt": "q", "completion": "a"}]
    with pytest.raises(UsageError) as err:
        shell.find_line_magic("ft_preview")(f"rows {flags} --text")
    assert str(err.value) == line
    with pytest.raises(ftmagic.ConfigError, match=f"^{line}$"):
        ftmagic.preview(shell.user_ns["rows"], tokenizer=test_tokenizer, **{
            flags.split()[0][2:].replace("-", "_"): int(flags.split()[1])})


def test_a_dollar_variable_is_the_data_itself(test_tokenizer, tmp_path, capsys):
    # IPython expanded `$rows` into the text of the list before the magic saw it:
    # "unexpected value(s) q , completion : a }, ...". Other `$var` / `{var}` still expand.
    from IPython.core.interactiveshell import InteractiveShell

    folder = tmp_path / "tok"
    test_tokenizer.save_pretrained(str(folder))
    shell = InteractiveShell.instance()
    shell.extension_manager.load_extension("ftmagic")
    capsys.readouterr()
    shell.user_ns.update(rows=[{"prompt": "q", "completion": "a"}] * 2, n=64, tok=str(folder))
    shell.run_cell("%ft_preview $rows --model $tok --max-seq-len $n --text")
    out = capsys.readouterr().out
    assert out.startswith("data: 2 records, format prompt_completion"), out
    assert "(max_seq_len 64)" in out and "duplicate: data[1]: same conversation as data[0]" in out
    shell.run_line_magic("ft_preview", "$rows --model {tok} --max-seq-len {n * 2} --text")
    assert "(max_seq_len 128)" in capsys.readouterr().out


def test_long_text_is_spelt_the_same_in_the_magic_the_cli_and_python(capsys):
    # `ftmagic preview --long-text` and `preview(long_text=)` existed; `%ft_preview` had no such flag
    # ("unrecognized arguments: --long-text truncate"), and the keyword took a typo as `truncate`.
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.extension_manager.load_extension("ftmagic")
    shell.user_ns["docs"] = [{"text": "word " * 200}]
    magic = shell.find_line_magic("ft_preview")
    magic("docs --max-seq-len 64 --text")
    assert "split into blocks: 1 `text` records" in capsys.readouterr().out
    magic("docs --max-seq-len 64 --long-text truncate --name rep --text")
    assert "truncated: 1;" in capsys.readouterr().out and shell.user_ns["rep"].long_text == "truncate"
    with pytest.raises(UsageError, match=r"^`--long-text splt` is not accepted; use one of split, truncate"):
        magic("docs --long-text splt")
    assert "config key `long_text`" in magic.parser.format_help()
    import argparse

    from ftmagic.commands.preview import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser)
    cli_help = next(a.help for a in parser._actions if a.dest == "long_text")
    magic_help = next(a.help for a in magic.parser._actions if a.dest == "long_text")
    assert cli_help == magic_help
    with pytest.raises(ftmagic.ConfigError, match=r"^`long_text: splt` is not accepted; use one of split, truncate; "
                                                  r"did you mean `split`\?$"):
        ftmagic.preview(shell.user_ns["docs"], long_text="splt")

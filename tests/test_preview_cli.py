"""`ftmagic preview DATA`: text and JSON output, --write-clean, one-line errors."""

import json

import pytest

from ftmagic.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A folder holding only the test tokenizer (all the previewer loads from a model)."""
    from model_builders import build_test_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_test_tokenizer().save_pretrained(str(folder))
    return str(folder)


@pytest.fixture()
def data(tmp_path):
    rows = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Add", "input": "1 2", "output": "3"},
            {"instruction": "Sub", "input": "", "output": ""}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n", encoding="utf-8")
    return str(path)


def test_json_output(data, model_dir, capsys):
    assert main(["preview", data, "--model", model_dir, "--json", "--max-seq-len", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["format"], out["records"], out["skipped"], out["truncated"]) == ("alpaca", 4, 2, 0)
    assert set(out["token_lengths"]) == {"min", "median", "p95", "max", "mean"}
    assert out["problems"] == [
        {"kind": "duplicate", "location": f"{data}:2", "message": f"same conversation as {data}:1"},
        {"kind": "empty_field", "location": f"{data}:3", "message": "field `output` is empty"},
        {"kind": "unparseable", "location": f"{data}:4",
         "message": "not valid JSON (Expecting property name enclosed in double quotes at column 2); each line must be one JSON object"}]
    assert out["skipped_reasons"] == {"empty_field": 1, "unparseable": 1}


def test_text_output(data, model_dir, capsys):
    assert main(["preview", data, "--model", model_dir, "--max-seq-len", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{data}: 4 records, format alpaca (`instruction` and `output` in 3 of 3 sampled records)"
    assert lines[1] == f"template: tokenizer (the tokenizer's chat template); tokenizer: {model_dir}; train_on: completions"
    assert lines[2] == "usable: 2; skipped: 2 (empty_field 1, unparseable 1)"
    assert lines[3].startswith("tokens per record: min ") and lines[3].endswith("(max_seq_len 64)")
    assert "problems: 3 (empty field 1, exact duplicate 1, unparseable line 1)" in lines
    assert f"  duplicate: {data}:2: same conversation as {data}:1" in lines


def test_write_clean(data, model_dir, tmp_path, capsys):
    out_path = tmp_path / "clean.jsonl"
    assert main(["preview", data, "--model", model_dir, "--write-clean", str(out_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"clean: kept 1 of 4 records; dropped 3: duplicate 1, "
                                                        f"empty_field 1, unparseable 1 -> {out_path}")
    assert len(out_path.read_text().splitlines()) == 1
    json_path = tmp_path / "clean2.jsonl"
    assert main(["preview", data, "--model", model_dir, "--json", "--write-clean", str(json_path)]) == 0
    assert json.loads(capsys.readouterr().out)["clean"] == {
        "path": str(json_path), "kept": 1, "dropped": {"duplicate": 1, "empty_field": 1, "unparseable": 1}}


def test_columns_flag(tmp_path, model_dir, capsys):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq1,a1\n", encoding="utf-8")
    assert main(["preview", str(path), "--model", model_dir, "--columns", "prompt=question,completion=answer", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["format"], out["format_evidence"]) == ("prompt_completion", "the `columns` mapping names prompt=question, completion=answer")


@pytest.mark.parametrize("argv, message", [
    (["preview", "missing.jsonl"], "ftmagic: error: missing.jsonl: file not found"),
    (["preview", "x.jsonl", "--columns", "prompt"], "ftmagic: error: --columns 'prompt': write FIELD=COLUMN pairs"),
    (["preview", "x.jsonl", "--max-seq-len", "2"], "ftmagic: error: --max-seq-len 2 must be at least 8"),
])
def test_errors_are_one_line(argv, message, capsys, model_dir):
    assert main(argv + ["--model", model_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_unknown_format_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["preview", "x.jsonl", "--format", "nope"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("ftmagic: error: `--format nope` is not accepted; use one of auto, ")

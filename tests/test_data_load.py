"""Every loader: good input with record locations, and bad input giving one line with file and line."""

import json

import pytest

from ftmagic.data.load import load_data
from ftmagic.errors import DataError


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def one_line_error(data, **kw):
    with pytest.raises(DataError) as err:
        load_data(data, **kw)
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- JSONL

def test_jsonl_records_and_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": "b"}\n')
    loaded = load_data(path)
    assert loaded.records == [{"text": "a"}, {"text": "b"}]
    assert [loaded.location(i) for i in range(2)] == [f"{path}:1", f"{path}:3"]


def test_jsonl_bad_line_strict(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b",}\n')
    assert one_line_error(path) == (f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes "
                                    "at column 14); each line must be one JSON object")


def test_jsonl_not_an_object(tmp_path):
    path = write(tmp_path / "d.jsonl", '["a"]\n')
    assert one_line_error(path) == f'{path}:1: the line is a JSON list, expected an object like {{"text": "..."}}'


def test_jsonl_lenient_collects_problems(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\nnope\n3\n{"text": "b"}\n')
    loaded = load_data(path, strict=False)
    assert loaded.records == [{"text": "a"}, {"text": "b"}]
    assert [(p.kind, p.location) for p in loaded.problems] == [("unparseable", f"{path}:2"), ("not_a_record", f"{path}:3")]
    assert loaded.read == 4


def test_non_utf8_strict_and_lenient(tmp_path):
    path = write(tmp_path / "d.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', mode="wb")
    assert one_line_error(path) == f"{path}:2: bytes that are not UTF-8 at column 14; save the file as UTF-8"
    loaded = load_data(path, strict=False)
    assert loaded.records[1] == {"text": "caf\ufffd"}
    assert [(p.kind, p.location) for p in loaded.problems] == [("non_utf8", f"{path}:2")]


# --------------------------------------------------------------------------- JSON

def test_json_array_knows_lines(tmp_path):
    path = write(tmp_path / "d.json", '[\n  {"text": "a"},\n  {"text": "b"}\n]\n')
    loaded = load_data(path)
    assert loaded.records == [{"text": "a"}, {"text": "b"}]
    assert loaded.location(1) == f"{path}:3"


def test_json_bad_syntax_names_line(tmp_path):
    path = write(tmp_path / "d.json", '[\n  {"text": "a"},\n  {"text": }\n]\n')
    assert one_line_error(path) == f"{path}:3: not valid JSON (Expecting value at column 12)"


def test_json_missing_comma(tmp_path):
    path = write(tmp_path / "d.json", '[\n {"text": "a"}\n {"text": "b"}\n]')
    assert one_line_error(path) == f"{path}:3: not valid JSON (expected `,` or `]` after an element)"


def test_json_wrapper_object_and_jsonl_named_json(tmp_path):
    path = write(tmp_path / "w.json", json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    loaded = load_data(path)
    assert loaded.records[1] == {"text": "b"} and loaded.location(1) == f"{path}:data[1]"
    path2 = write(tmp_path / "l.json", '{"text": "a"}\n{"text": "b"}\n')
    assert load_data(path2).location(1) == f"{path2}:2"


def test_json_scalar_rejected(tmp_path):
    path = write(tmp_path / "s.json", '"just text"')
    assert one_line_error(path) == f"{path}:1: expected a JSON list of objects (or an object holding one list), found a JSON string"


# --------------------------------------------------------------------------- CSV / TSV

def test_csv_lines_count_header_and_multiline_cells(tmp_path):
    path = write(tmp_path / "d.csv", 'prompt,completion\n"two\nlines",x\nq,y\n')
    loaded = load_data(path)
    assert loaded.records == [{"prompt": "two\nlines", "completion": "x"}, {"prompt": "q", "completion": "y"}]
    assert [loaded.location(0), loaded.location(1)] == [f"{path}:2", f"{path}:4"]


def test_csv_wrong_field_count(tmp_path):
    path = write(tmp_path / "d.csv", "prompt,completion\nq,a\nq,a,extra\n")
    assert one_line_error(path) == f"{path}:3: the row has 3 fields but the header has 2 (quote fields that contain `,`)"


def test_tsv(tmp_path):
    path = write(tmp_path / "d.tsv", "prompt\tcompletion\nq\ta\n")
    assert load_data(path).records == [{"prompt": "q", "completion": "a"}]


# --------------------------------------------------------------------------- Parquet, datasets, pandas

def test_parquet_and_bad_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "q"}]], "n": [1]}), path)
    loaded = load_data(path)
    assert loaded.records == [{"messages": [{"role": "user", "content": "q"}], "n": 1}]
    assert loaded.location(0) == f"{path}[0]"  # an index, from 0, as df.iloc[0] (was "row 0" beside "line 1")
    bad = write(tmp_path / "bad.parquet", "not parquet")
    assert one_line_error(bad).startswith(f"{bad}: cannot read as Parquet (")


def test_saved_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = str(tmp_path / "ds")
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(folder)
    loaded = load_data(folder)
    assert loaded.records == [{"text": "a"}, {"text": "b"}] and loaded.location(1) == f"{folder}[1]"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert one_line_error(str(empty)).startswith(f"{empty}: the folder is not a saved `datasets` dataset")


def test_dataset_objects(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": "a"}])
    assert load_data(ds).records == [{"text": "a"}]
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list([{"text": "t"}])})
    assert load_data(dd).records == [{"text": "a"}]
    dd2 = datasets.DatasetDict({"a": ds, "b": ds})
    assert one_line_error(dd2) == "data: has splits a, b but no `train`; pick one, e.g. dataset['a']"


def test_dataframe_nan_becomes_none():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"prompt": ["q", "r"], "completion": ["a", float("nan")]})
    loaded = load_data(df)
    assert loaded.records == [{"prompt": "q", "completion": "a"}, {"prompt": "r", "completion": None}]
    assert loaded.location(1) == "data[1]"


def test_list_of_dicts_and_non_dicts():
    assert load_data([{"text": "a"}]).location(0) == "data[0]"
    assert one_line_error([{"text": "a"}, "b"]) == 'data[1]: is a str, expected a dict like {"text": "..."}'
    loaded = load_data([{"text": "a"}, "b", {"text": "c"}], strict=False)
    assert loaded.location(1) == "data[2]"  # locations still point at the original positions


# --------------------------------------------------------------------------- paths and hub ids

def test_missing_file_and_unknown_type(tmp_path, monkeypatch):
    assert one_line_error(str(tmp_path / "nope.jsonl")) == f"{tmp_path / 'nope.jsonl'}: file not found"
    monkeypatch.chdir(tmp_path)  # a relative path: the line says which folder it was read from
    assert one_line_error("w/train.jsonl") == ("w/train.jsonl: file not found (relative paths are read from the "
                                               f"current folder, {tmp_path})")
    odd = write(tmp_path / "d.txt", "hello")
    assert one_line_error(odd) == f"{odd}: unknown file type `.txt`; use .jsonl, .json, .csv, .tsv or .parquet, or a folder saved with Dataset.save_to_disk"
    assert one_line_error({"text": "a"}).startswith("data: a single dict is not a dataset")
    assert one_line_error(42).startswith("data: an int is not a dataset")


def test_hub_id_goes_through_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(name, split):
        calls.append((name, split))
        if name == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub\nmore")
        return datasets.Dataset.from_list([{"text": "hub"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_data("org/name").records == [{"text": "hub"}]
    assert one_line_error("org/missing") == ("org/missing: not a local file, and loading it as a Hugging Face dataset "
                                             "failed (FileNotFoundError: Dataset 'org/missing' doesn't exist on the Hub)")
    assert calls == [("org/name", "train"), ("org/missing", "train")]


def test_csv_long_cell(tmp_path):
    long_text = "word " * 40000  # 200 kB, above the csv module's default cell limit
    path = write(tmp_path / "long.csv", f'text\n"{long_text}"\n')
    assert load_data(path).records == [{"text": long_text}]

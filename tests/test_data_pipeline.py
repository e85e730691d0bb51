"""prepare_data: validation split, mixing weights, packing, skip counting, determinism."""

import json

import pytest

from ftmagic.config import FinetuneConfig
from ftmagic.constants import IGNORE_INDEX as IGNORE
from ftmagic.data import data_sources, encode_example, pack, prepare_data
from ftmagic.errors import ConfigError, DataError


def records(n, tag="q"):
    return [{"prompt": f"{tag}{i}", "completion": f"a{i}"} for i in range(n)]


def prompts_of(tok, rows):
    """The prompt text of each (unpacked) example, recovered from its tokens."""
    out = []
    for row in rows:
        text = tok.decode(row["input_ids"])
        out.append(text.split("user\n", 1)[1].split("<|im_end|>", 1)[0])
    return out


def test_contract_shape_and_stats(test_tokenizer):
    data = records(5) + [{"prompt": "x", "completion": ""}]
    prepared = prepare_data(FinetuneConfig(data=data, max_seq_len=64), test_tokenizer)
    assert prepared.eval is None
    assert [set(row) for row in prepared.train] == [{"input_ids", "labels"}] * 5
    s = prepared.stats
    assert (s["format"], s["records"], s["skipped"], s["skipped_reasons"]) == ("prompt_completion", 6, 1, {"empty_field": 1})
    assert s["problems"] == ["data[5]: field `completion` is empty"]
    assert (s["train_examples"], s["eval_examples"], s["truncated"], s["template"]) == (5, 0, 0, "tokenizer")
    assert s["trained_tokens"] == sum(sum(1 for x in r["labels"] if x != IGNORE) for r in prepared.train)
    assert prepared.train[0] == encode_example(test_tokenizer, data[0], max_seq_len=64).to_dict()


def test_val_split_is_deterministic_and_disjoint(test_tokenizer):
    cfg = FinetuneConfig(data=records(20), val_split=0.2, seed=7)
    a, b = prepare_data(cfg, test_tokenizer), prepare_data(cfg, test_tokenizer)
    assert a.train == b.train and a.eval == b.eval
    assert (len(a.train), len(a.eval)) == (16, 4)
    train_p, eval_p = set(prompts_of(test_tokenizer, a.train)), set(prompts_of(test_tokenizer, a.eval))
    assert not train_p & eval_p and len(train_p | eval_p) == 20
    other = prepare_data(cfg.replace(seed=8), test_tokenizer)
    assert set(prompts_of(test_tokenizer, other.eval)) != eval_p


def test_val_split_needs_two_records(test_tokenizer):
    with pytest.raises(DataError, match="val_split needs at least 2 usable records, found 1"):
        prepare_data(FinetuneConfig(data=records(1), val_split=0.5), test_tokenizer)


def test_eval_data_takes_precedence(test_tokenizer):
    prepared = prepare_data(FinetuneConfig(data=records(4), eval_data=records(2, "e"), val_split=0.5), test_tokenizer)
    assert (len(prepared.train), len(prepared.eval)) == (4, 2)
    assert prompts_of(test_tokenizer, prepared.eval) == ["e0", "e1"]


def test_mixing_weights(test_tokenizer, tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records(10, "b")) + "\n", encoding="utf-8")
    cfg = FinetuneConfig(data=[{"data": records(4, "a"), "weight": 2}, {"path": str(path), "weight": 0.5}], seed=1)
    prepared = prepare_data(cfg, test_tokenizer)
    got = prompts_of(test_tokenizer, prepared.train)
    assert sorted(p for p in got if p.startswith("a")) == sorted([f"a{i}" for i in range(4)] * 2)
    b_part = [p for p in got if p.startswith("b")]
    assert len(b_part) == 5 and len(set(b_part)) == 5
    assert [d["train_examples"] for d in prepared.stats["datasets"]] == [8, 5]
    assert prepared.stats["datasets"][1]["name"] == str(path)
    assert prepare_data(cfg, test_tokenizer).train == prepared.train  # deterministic


def test_data_sources_forms():
    assert [s.data for s in data_sources(["a.jsonl", "b.jsonl"])] == ["a.jsonl", "b.jsonl"]
    assert len(data_sources(records(3))) == 1  # a list of records is one dataset
    with pytest.raises(ConfigError, match=r"`data\[0\].weight: -1` must be a number greater than 0"):
        data_sources([{"path": "a.jsonl", "weight": -1}])
    with pytest.raises(ConfigError, match="`data` is not set"):
        data_sources(None)


def test_packing_position_ids_and_labels(test_tokenizer):
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [IGNORE, 5]},
                {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}]
    rows = pack(examples, 6)
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, 2, 3, IGNORE, 5], "position_ids": [0, 1, 2, 0, 1], "seq_lens": [3, 2]},
        {"input_ids": [6, 7, 8, 9], "labels": [IGNORE, 7, 8, 9], "position_ids": [0, 1, 2, 3], "seq_lens": [4]},
    ]


def test_prepare_with_packing(test_tokenizer):
    cfg = FinetuneConfig(data=records(10), max_seq_len=64, packing=True, val_split=0.2)
    prepared = prepare_data(cfg, test_tokenizer)
    unpacked = prepare_data(cfg.replace(packing=False), test_tokenizer)
    for rows, flat in ((prepared.train, unpacked.train), (prepared.eval, unpacked.eval)):
        assert all(len(r["input_ids"]) <= 64 and sum(r["seq_lens"]) == len(r["input_ids"]) for r in rows)
        assert [t for r in rows for t in r["input_ids"]] == [t for r in flat for t in r["input_ids"]]
        for r in rows:
            starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
            assert [b - a for a, b in zip(starts, starts[1:] + [len(r["input_ids"])])] == r["seq_lens"]
    assert prepared.stats["train_rows"] == len(prepared.train) < prepared.stats["train_examples"] == 8


def test_truncated_and_untrainable_are_counted(test_tokenizer):
    data = records(3) + [{"prompt": "long question " * 20, "completion": "a"}]
    prepared = prepare_data(FinetuneConfig(data=data, max_seq_len=24), test_tokenizer)
    s = prepared.stats
    assert (s["truncated"], s["no_trained_tokens"], s["skipped"], s["train_examples"]) == (0, 1, 1, 3)
    assert s["problems"][0].startswith("data[3]: no trained token is left within max_seq_len=24 (the example has ")


def test_malformed_file_line_stops_training(test_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q", "completion": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: not valid JSON"):
        prepare_data(FinetuneConfig(data=str(path)), test_tokenizer)


def test_all_records_unusable(test_tokenizer):
    with pytest.raises(DataError, match=r"^data: no usable records; first problem: data\[0\]: field `completion` is empty"):
        prepare_data(FinetuneConfig(data=[{"prompt": "q", "completion": " "}]), test_tokenizer)


def test_text_format_stats(test_tokenizer):
    prepared = prepare_data(FinetuneConfig(data=[{"text": "hello world"}, {"text": "abc"}]), test_tokenizer)
    assert prepared.stats["format"] == "text" and prepared.stats["template"] is None
    assert all(r["labels"] == r["input_ids"] for r in prepared.train)


def test_mixture_of_formats_with_per_source_columns(test_tokenizer):
    qa = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    cfg = FinetuneConfig(data=[{"data": qa, "columns": {"prompt": "question", "completion": "answer"}},
                               {"data": chat, "format": "messages"}], system_prompt="S")
    prepared = prepare_data(cfg, test_tokenizer)
    assert prepared.stats["format"] == "mixed"
    assert [d["format"] for d in prepared.stats["datasets"]] == ["prompt_completion", "messages"]
    assert len(prepared.train) == 4
    texts = [test_tokenizer.decode(r["input_ids"]) for r in prepared.train]
    assert all(t.startswith("<|im_start|>system\nS<|im_end|>") for t in texts)


def test_data_layer_imports_no_heavy_modules():
    import subprocess
    import sys

    code = ("import sys, ftmagic.data, ftmagic.data.report, ftmagic.widgets.preview, ftmagic.commands.preview; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'ipywidgets', 'datasets', 'pandas'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_mixture_entry_reads_the_split_it_names(tmp_path, test_tokenizer):
    datasets = pytest.importorskip("datasets")
    from ftmagic.config import FinetuneConfig

    folder = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": "train?", "completion": "yes"}] * 3),
        "test": datasets.Dataset.from_list([{"prompt": "test?", "completion": "no"}] * 2),
    }).save_to_disk(str(folder))
    cfg = FinetuneConfig(data=[{"path": str(folder), "split": "test"}], max_seq_len=64)
    prepared = prepare_data(cfg, test_tokenizer)
    assert len(prepared.train) == 2
    assert prepared.stats["datasets"][0]["records"] == 2

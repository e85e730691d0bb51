"""preview(): a small file per format and per problem kind, with the exact report expected."""

import json

import pytest

import ftmagic
from ftmagic.constants import IGNORE_INDEX as IGNORE
from ftmagic.data import encode_example
from ftmagic.data.report import histogram, length_stats


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def im(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def problems(report):
    return [(p.kind, p.location, p.message) for p in report.problems]


# --------------------------------------------------------------------------- one file per format

def test_alpaca_file_full_report(tmp_path, test_tokenizer):
    tok = test_tokenizer
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"},
                                              {"instruction": "Say hi", "input": "", "output": "hi there"}])
    report = ftmagic.preview(path, tokenizer=tok, max_seq_len=64)
    texts = [im("user", "Add\n\n1 2") + im("assistant", "3"), im("user", "Say hi") + im("assistant", "hi there")]
    lengths = [n_tokens(tok, t) for t in texts]
    trained = n_tokens(tok, "3<|im_end|>") + n_tokens(tok, "hi there<|im_end|>")
    width = 8  # 64 / 8 bins
    bins = [{"start": k * width + 1, "end": (k + 1) * width, "count": sum(1 for n in lengths if k * width < n <= (k + 1) * width)}
            for k in range(8)] + [{"start": 65, "end": None, "count": 0}]
    padded = max(lengths) * 2
    assert report.to_dict() == {
        "source": path, "format": "alpaca", "format_evidence": "`instruction` and `output` in 2 of 2 sampled records",
        "template": "tokenizer", "template_reason": "the tokenizer's chat template", "tokenizer": "(given)",
        "max_seq_len": 64, "train_on": "completions", "records": 2, "usable": 2, "skipped": 0, "skipped_reasons": {},
        "truncated": 0, "long_text": "split", "split": 0, "blocks": 0, "no_trained_tokens": 0, "eos_appended": 0,
        "token_lengths": {"min": min(lengths), "median": sum(lengths) / 2, "p95": max(lengths), "max": max(lengths),
                          "mean": sum(lengths) / 2},
        "histogram": bins, "trained_tokens": trained, "total_tokens": sum(lengths),
        "padding": {"batch_size": 4, "unpacked": round((padded - sum(lengths)) / padded, 4),
                    "packed": round((64 - sum(lengths)) / 64, 4)},
        "label_balance": None, "problem_counts": {}, "problems": [], "notes": [],
    }


@pytest.mark.parametrize("row, fmt, evidence", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sharegpt",
     "`conversations` holds a list of {from, value} in 1 of 1 sampled records"),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "messages", "`messages` holds a list of {role, content} in 1 of 1 sampled records"),
    ({"prompt": "hi", "completion": "yo"}, "prompt_completion", "`prompt` and `completion` in 1 of 1 sampled records"),
])
def test_chat_formats(tmp_path, test_tokenizer, row, fmt, evidence):
    report = ftmagic.preview(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer=test_tokenizer)
    assert (report.format, report.format_evidence, report.usable, report.problems) == (fmt, evidence, 1, [])
    tokens = report.record(0).tokens
    assert "".join(t.text for t in tokens if t.trained) == "yo<|im_end|>"


def test_text_format(tmp_path, test_tokenizer):
    report = ftmagic.preview(write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}]), tokenizer=test_tokenizer)
    assert (report.format, report.template, report.trained_tokens) == ("text", None, n_tokens(test_tokenizer, "hello world<|im_end|>"))
    assert report.label_balance is None


# --------------------------------------------------------------------------- one file per problem kind

def test_unparseable_and_not_a_record(tmp_path, test_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}, "{oops", "[1]"])
    report = ftmagic.preview(path, tokenizer=test_tokenizer)
    assert problems(report) == [
        ("unparseable", f"{path}:2", "not valid JSON (Expecting property name enclosed in double quotes at column 2); "
                                     "each line must be one JSON object"),
        ("not_a_record", f"{path}:3", 'the line is a JSON list, expected an object like {"text": "..."}')]
    assert (report.records, report.usable, report.skipped, report.skipped_reasons) == (3, 1, 2, {"not_a_record": 1, "unparseable": 1})


def test_non_utf8(tmp_path, test_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "completion": "a"}\n')
    report = ftmagic.preview(str(path), tokenizer=test_tokenizer)
    assert problems(report) == [("non_utf8", f"{path}:1", "bytes that are not UTF-8 at column 16 (replaced by \ufffd; "
                                                        "save the file as UTF-8)")]
    assert (report.usable, report.skipped) == (1, 0)


@pytest.mark.parametrize("row, kind, message", [
    ({"prompt": "q"}, "missing_field", "field `completion` is missing"),
    ({"prompt": "q", "completion": None}, "missing_field", "field `completion` is null"),  # there, but null
    ({"prompt": "q", "completion": "  "}, "empty_field", "field `completion` is empty"),
    ({"prompt": "q", "completion": {"a": 1}}, "bad_type", "field `completion` is a dict, expected text"),
])
def test_missing_empty_bad_fields(tmp_path, test_tokenizer, row, kind, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, row])
    report = ftmagic.preview(path, tokenizer=test_tokenizer)
    assert problems(report) == [(kind, f"{path}:2", message)]
    assert (report.usable, report.skipped_reasons) == (1, {kind: 1})


def test_role_order_and_no_final_assistant(tmp_path, test_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = ftmagic.preview(path, tokenizer=test_tokenizer)
    assert problems(report) == [
        ("role_order", f"{path}:1", "turns 1 and 2 are both `user`; user and assistant should alternate"),
        ("no_final_assistant", f"{path}:2", "the last turn is `user`, not `assistant`; it is not trained")]
    assert report.usable == 2  # both still train (the second on its first answer)


def test_template_error_and_system_dropped(tmp_path, test_tokenizer):
    rows = [{"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "a"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    jinja = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
             "{% if m['role'] != 'system' %}{{ m['role'] + ':\\n' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}")
    report = ftmagic.preview(path, tokenizer=test_tokenizer, template=jinja)
    assert problems(report) == [
        ("system_dropped", f"{path}:1", "the chat template leaves out the system prompt"),
        ("template_error", f"{path}:2", "the chat template rejects this conversation (no boom)")]
    assert (report.usable, report.skipped_reasons) == (1, {"template_error": 1})


def test_truncated_no_eos_and_no_trained_tokens(tmp_path, test_tokenizer):
    tok = test_tokenizer
    prompt_len = n_tokens(tok, im("user", "question") + "<|im_start|>assistant\n")
    rows = [{"prompt": "question", "completion": "a long answer that goes on and on"},
            {"prompt": "question " * 30, "completion": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = ftmagic.preview(path, tokenizer=tok, max_seq_len=prompt_len + 2)
    full = [n_tokens(tok, im("user", "question") + im("assistant", rows[0]["completion"])),
            n_tokens(tok, im("user", rows[1]["prompt"]) + im("assistant", "x"))]
    assert problems(report) == [
        ("truncated", f"{path}:1", f"{full[0]} tokens, cut to max_seq_len={prompt_len + 2}"),
        ("no_eos", f"{path}:1", "truncated inside an answer, so it ends without EOS (raise max_seq_len or shorten the record)"),
        ("no_trained_tokens", f"{path}:2", f"no trained token is left within max_seq_len={prompt_len + 2} (the example has {full[1]} tokens)"),
        ("truncated", f"{path}:2", f"{full[1]} tokens, cut to max_seq_len={prompt_len + 2}")]
    assert (report.truncated, report.no_trained_tokens, report.usable, report.trained_tokens) == (2, 1, 1, 2)
    assert report.token_lengths["max"] == max(full)
    assert report.histogram[-1] == {"start": prompt_len + 3, "end": None, "count": 2}


def test_duplicates_exact_and_normalised(tmp_path, test_tokenizer):
    rows = [{"prompt": "Hello  World", "completion": "a"}, {"prompt": "Hello  World", "completion": "a"},
            {"prompt": "hello world", "completion": "A "}, {"prompt": "other", "completion": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = ftmagic.preview(path, tokenizer=test_tokenizer)
    assert problems(report) == [
        ("duplicate", f"{path}:2", f"same conversation as {path}:1"),
        ("near_duplicate", f"{path}:3", f"same as {path}:1 after normalising whitespace and case")]


def test_label_imbalance(tmp_path, test_tokenizer):
    rows = [{"prompt": f"review {i}", "completion": "positive"} for i in range(9)] + [{"prompt": "review x", "completion": "negative"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = ftmagic.preview(path, tokenizer=test_tokenizer)
    assert report.label_balance == {"distinct": 2, "counts": {"positive": 9, "negative": 1}, "majority_share": 0.9, "ratio": 9.0}
    assert problems(report) == [("label_imbalance", path, "answers look like labels (2 distinct values): `positive` is 9 "
                                                          "of 10 (90%), `negative` only 1")]
    balanced = ftmagic.preview([{"prompt": f"r{i}", "completion": "yes" if i % 2 else "no"} for i in range(8)],
                               tokenizer=test_tokenizer)
    assert balanced.label_balance["ratio"] == 1.0 and balanced.problems == []


def test_template_without_eos_is_reported(test_tokenizer):
    report = ftmagic.preview([{"prompt": "q", "completion": "a"}, {"prompt": "r", "completion": "b"}],
                             tokenizer=test_tokenizer, template="alpaca")
    assert report.eos_appended == 2
    assert problems(report) == [("no_eos", "data", "the chat template does not end answers with EOS (2 records); ftmagic appends "
                                                   "`<|im_end|>` so the model learns to stop")]
    assert [t.text for t in report.record(0).tokens if t.trained][-1] == "<|im_end|>"


# --------------------------------------------------------------------------- records, masks, laziness

def test_coloured_tokens_follow_the_training_labels(test_tokenizer):
    tok = test_tokenizer
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b", "weight": 0}, {"role": "user", "content": "c"},
                        {"role": "assistant", "content": "d e"}]}
    report = ftmagic.preview([row], tokenizer=tok, max_seq_len=128)
    view = report.record(0)
    enc = encode_example(tok, row, max_seq_len=128)
    assert [t.id for t in view.tokens] == enc.input_ids
    assert [t.trained for t in view.tokens] == [label != IGNORE for label in enc.labels]
    assert [t.eos for t in view.tokens] == [i == tok.eos_token_id for i in enc.input_ids]
    assert view.text == enc.text and view.location == "data[0]" and view.raw == row
    assert [t.text for t in view.tokens if t.trained][-1] == "<|im_end|>"


def test_skipped_record_view_shows_its_problem(test_tokenizer):
    report = ftmagic.preview([{"prompt": "q", "completion": ""}], tokenizer=test_tokenizer)
    view = report.record(0)
    assert (view.text, view.tokens, [p.kind for p in view.problems]) == (None, [], ["empty_field"])
    with pytest.raises(IndexError):
        report.record(1)


def test_record_pages_are_encoded_on_demand(test_tokenizer, monkeypatch):
    import ftmagic.data.report as report_module

    report = ftmagic.preview([{"prompt": f"q{i}", "completion": "a"} for i in range(50)], tokenizer=test_tokenizer)
    calls = []
    real = report_module.encode_conversations
    monkeypatch.setattr(report_module, "encode_conversations", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    report.record(7)
    assert calls == [1]  # one record encoded for one page


def test_without_tokenizer_still_reports_structure(monkeypatch):
    import ftmagic.data.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "tiny_available", lambda: False)
    report = ftmagic.preview([{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "a"}])
    assert (report.format, report.usable, report.token_lengths, report.truncated) == ("prompt_completion", 2, None, None)
    assert [p.kind for p in report.problems] == ["duplicate"]
    assert report.notes[0].startswith("no tokenizer: pass a model")
    assert report.record(0).text == "[user] q\n[assistant] a"


def test_empty_dataset(tmp_path, test_tokenizer):
    report = ftmagic.preview(write_jsonl(tmp_path / "e.jsonl", []), tokenizer=test_tokenizer)
    assert (report.records, report.usable, report.format, report.token_lengths, len(report)) == (0, 0, "unknown", None, 0)


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("blank.jsonl", "\n\n"), ("h.csv", "prompt,completion\n"),
                                           ("a.json", "[]")])
def test_an_empty_dataset_is_a_problem_not_problems_none(tmp_path, test_tokenizer, name, content):
    # Training stops on it with "no usable records"; the previewer said "problems: none".
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    report = ftmagic.preview(str(path), tokenizer=test_tokenizer)
    assert problems(report) == [("no_records", str(path), "the data holds no records, so training would stop "
                                                           "with `no usable records`")]
    assert report.to_text().splitlines()[-2:] == [
        "problems: 1 (no records 1)",
        f"  no_records: {path}: the data holds no records, so training would stop with `no usable records`"]


def test_length_stats_and_histogram():
    assert length_stats([5, 1, 3, 2, 4]) == {"min": 1, "median": 3, "p95": 5, "max": 5, "mean": 3.0}
    assert length_stats(list(range(1, 101)))["p95"] == 95
    assert histogram([1, 10, 11, 30], 20, bins=2) == [
        {"start": 1, "end": 10, "count": 2}, {"start": 11, "end": 20, "count": 1}, {"start": 21, "end": None, "count": 1}]


# --------------------------------------------------------------------------- clean

def test_clean_drops_empties_and_duplicates_never_the_original(tmp_path):
    rows = [{"prompt": "q", "completion": "a"}, "{bad", {"prompt": "q", "completion": "a"}, {"prompt": "Q", "completion": "a"},
            {"prompt": "r", "completion": ""}, {"prompt": "s", "completion": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    before = (tmp_path / "d.jsonl").read_bytes()
    out = tmp_path / "clean.jsonl"
    result = ftmagic.clean(path, str(out))
    assert [(p.kind, p.location) for p in result.dropped] == [
        ("unparseable", f"{path}:2"), ("duplicate", f"{path}:3"), ("near_duplicate", f"{path}:4"), ("empty_field", f"{path}:5")]
    assert result.summary() == (f"kept 2 of 6 records; dropped 4: duplicate 1, empty_field 1, near_duplicate 1, "
                                f"unparseable 1 -> {out}")
    assert [json.loads(line) for line in out.read_text().splitlines()] == [rows[0], rows[5]]
    assert (tmp_path / "d.jsonl").read_bytes() == before
    assert len(ftmagic.clean(path, near_duplicates=False).records) == 3
    with pytest.raises(ftmagic.DataError, match="is the original dataset"):
        ftmagic.clean(path, path)
    with pytest.raises(ftmagic.DataError, match=r"is a folder; give the cleaned copy a file name, e\.g\. .*clean\.jsonl$"):
        ftmagic.clean(path, str(tmp_path), overwrite=True)  # it said "pass overwrite=True", which then failed


def test_conversation_without_answer_is_skipped_but_not_cleaned(test_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Hello?"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    report = ftmagic.preview(rows, tokenizer=test_tokenizer)
    assert problems(report) == [("no_assistant", "data[0]", "the conversation has no assistant turn to train on")]
    assert (report.usable, report.skipped_reasons) == (1, {"no_assistant": 1})
    assert len(ftmagic.clean(rows).records) == 2  # needs a human: the answer may be missing, not the question


def test_a_mixture_is_previewed_per_source_never_read_as_records(tmp_path, test_tokenizer):
    # A run's `data:` mixture used to be read as records: "cannot tell the format from the fields (path, weight)",
    # or, for a list of paths, two "records" that are strings.
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "completion": "a"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "t"}])
    for data in ([a, b], [{"path": a, "weight": 2}, {"path": b}]):
        with pytest.raises(ftmagic.DataError) as err:
            ftmagic.preview(data, tokenizer=test_tokenizer)
        assert str(err.value) == (f"`data` is a mixture of 2 sources ({a}, {b}); the previewer reads one dataset at a "
                                  f"time: preview each source, e.g. ftmagic.preview({a!r})")
    one = ftmagic.preview([{"path": a, "weight": 2}], tokenizer=test_tokenizer)
    assert (one.source, one.format, one.records, one.problems) == (a, "prompt_completion", 1, [])
    mapped = ftmagic.preview([{"data": [{"q": "x", "a": "y"}], "columns": {"prompt": "q", "completion": "a"}}],
                             tokenizer=test_tokenizer)
    assert (mapped.format, mapped.usable) == ("prompt_completion", 1)


def test_the_preview_cuts_at_the_models_positions_as_training_does():
    report = ftmagic.preview([{"text": "hello world"}], model="tiny", max_seq_len=4096)
    assert report.max_seq_len == 512
    assert any("`max_seq_len: 4096` is above the 512 positions tiny was built for" in note for note in report.notes)

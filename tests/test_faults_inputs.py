"""A hostile-input corpus through every front: the CLI, the Python API and a notebook kernel.

Alias bombs, deep nesting, huge numbers and lines, pickles, custom code, odd encodings and
out-of-range settings each end in one line (``ftmagic: error: ...`` and status 2, a
``FtmagicError``, a ``UsageError``), fast, with no traceback, no code run and no file of
the user's changed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

import ftmagic
from ftmagic.cli import main
from ftmagic.errors import FtmagicError

from engine_helpers import reversal_records


def _bomb(levels=9, width=10):
    """`&a [x x ...]`, `&b [*a *a ...]`, ...: ``width ** levels`` values once expanded."""
    names = "abcdefghijklmnop"
    parts = [f"&{names[0]} [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        parts.append(f"&{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * width) + "]")
    return "[" + ", ".join(parts) + "]"


BOMB_MSG = "expands to more than 1,000,000 values (`*alias` references repeat a block); write the values out"

# name -> (config body lines after the base config, the message's start after `<source>:<line>: `)
CONFIG_CASES = {
    "alias bomb in target_modules": (f"target_modules: {_bomb()}", "the YAML " + BOMB_MSG),
    "alias bomb in columns": ("columns: {prompt: " + _bomb() + "}", "the YAML " + BOMB_MSG),
    "alias bomb in data": (f"eval_data: {_bomb()}", "the YAML " + BOMB_MSG),
    "alias that contains itself": ("target_modules: &a [x, *a]", "the YAML is nested more than 100 levels deep"),
    "nesting 150 levels": ("target_modules: " + "[" * 150 + "]" * 150, "the YAML is nested more than 100 levels deep"),
    "nesting 3000 levels": ("target_modules: " + "[" * 3000 + "]" * 3000, "the YAML is nested too deeply to read"),
    "5000-digit integer": ("lora_r: " + "9" * 5000, "a value cannot be read (Exceeds the limit (4300 digits)"),
    "400-digit integer": ("lr: " + "9" * 400, "`lr: a 400-digit number` is too large for a number"),
    "lr 1e300": ("lr: 1.0e+300", "`lr: 1e+300` must be at most 1e+06"),
    "python tag": ("model: !!python/object/apply:os.mkdir [pwned]", "invalid YAML (could not determine a constructor"),
    "seed -1": ("seed: -1", "`seed: -1` must not be negative"),
    "seed 1e23": ("seed: 1e23", "`seed: 1e+23` must be at most 4294967295"),
    "lr nan": ("lr: .nan", "`lr: nan` must be a finite number"),
    "lr inf": ("lr: .inf", "`lr: inf` must be a finite number"),
    "weight_decay nan": ("weight_decay: .nan", "`weight_decay: nan` must be a finite number"),
    "warmup inf": ("warmup: .inf", "`warmup: inf` must be a finite number"),
    "epochs nan": ("epochs: .nan", "`epochs: nan` must be a finite number"),
    "epochs inf": ("epochs: .inf", "`epochs: inf` must be a finite number"),
    "lora_r 1e23": ("lora_r: 1e23", "`lora_r: 1e+23` must be at most 65536"),
    "grad_accum 1e23": ("grad_accum: 1e23", "`grad_accum: 1e+23` must be at most 4096"),
    "max_seq_len 1e23": ("max_seq_len: 1e23", "`max_seq_len: 1e+23` must be at most 1048576"),
    "batch_size 1e9": ("batch_size: 1000000000", "`batch_size: 1000000000` must be at most 65536"),
}

# Config files whose bytes are the problem (the CLI and the API read files; a cell is text).
FILE_CASES = {
    "UTF-16 config": ("model: tiny\n".encode("utf-16"), "the file is UTF-16; save it as UTF-8"),
    "Latin-1 config": (b"model: tiny\nsystem_prompt: caf\xe9\n", ":2: bytes that are not UTF-8 (byte 31)"),
    "9 MB config": (b"model: tiny\nsystem_prompt: " + b"a" * (9 * 2**20) + b"\n", "the YAML is 9.0 MiB, over the 8 MiB"),
}


def _data_cases(tmp: Path) -> dict:
    """name -> (data file name, its bytes, message start after `ftmagic: error: `)."""
    deep = '{"text": ' + "[" * 20_000 + "]" * 20_000 + "}\n"
    return {
        "JSON nested 20000 levels": ("deep.jsonl", deep.encode(), "deep.jsonl:1: JSON nested more than 64 levels deep"),
        "JSON 5000-digit integer": ("big.jsonl", ('{"prompt": "p", "completion": 1' + "0" * 5000 + "}\n").encode(),
                                    "big.jsonl:1: not readable JSON (Exceeds the limit (4300 digits)"),
        "a 9 MB line": ("long.jsonl", ('{"text": "' + "a" * (9 * 2**20) + '"}\n').encode(),
                        "long.jsonl:1: the line has more than 8,388,608 characters (9,437,196), over the limit for one "
                        "record; split it into several records"),
        "UTF-16 data": ("u16.jsonl", json.dumps({"text": "hi"}).encode("utf-16"),
                        "u16.jsonl:1: bytes that are not UTF-8 at column 1"),
        "numbers as text": ("numbers.jsonl", b'{"prompt": "2+2=", "completion": 4}\n{"prompt": "x", "completion": NaN}\n',
                            "numbers.jsonl: no usable records; first problem: numbers.jsonl:1: field `completion` is a "
                            "number (4), expected text; write it in quotes"),
    }


def _model_cases(tmp: Path, model_dir: str) -> dict:
    """name -> (model folder, message start): a pickled weights file and a model that ships its own code."""
    pickled = tmp / "pickled-model"
    shutil.copytree(model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(tmp / "pickle-ran")))
    custom = tmp / "custom-code-model"
    shutil.copytree(model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "evil.py").write_text(f"import os\nos.mkdir({str(tmp / 'custom-code-ran')!r})\n")
    return {
        "pickled weights": (pickled, f"model `{pickled}`: its weights are a pickle (pytorch_model.bin) that names code, "
                                     "which is never run; use a copy saved as safetensors"),
        "custom code": (custom, f"model `{custom}` needs to run its own Python code"),
    }


class _Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _base(model_dir, data, out, extra: str = "") -> str:
    """A good config, without the keys ``extra`` sets (a key given twice is a mistake of its own)."""
    lines = [f"model: {model_dir}", f"data: {data}", "max_steps: 2", "batch_size: 2", f"output_dir: {out}"]
    given = {line.split(":", 1)[0] for line in extra.splitlines()}
    return "".join(line + "\n" for line in lines if line.split(":", 1)[0] not in given)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size and p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def user_folder(tmp_path, test_model_dir):
    """A user's folder: good data, a config, notes. Nothing in it may change."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in reversal_records(8)) + "\n")
    (folder / "notes.md").write_text("my notes\n")
    return folder


def _cli_one_line(capsys, argv, expected_start):
    status = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert status == 2, (argv, captured.err[-2000:])
    assert len(err) == 1 and err[0].startswith("ftmagic: error: "), captured.err[-2000:]
    assert expected_start in err[0], err[0][:500]
    assert "Traceback" not in captured.err + captured.out
    return err[0]


# --------------------------------------------------------------------------- CLI and Python API


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_hostile_config_cli_and_api(name, user_folder, test_model_dir, capsys):
    extra, message = CONFIG_CASES[name]
    config = user_folder / "run.yaml"
    config.write_text(_base(test_model_dir, user_folder / "train.jsonl", user_folder / "out", extra) + extra + "\n")
    before = _snapshot(user_folder)
    line = _cli_one_line(capsys, ["train", str(config)], f"{config}:")
    assert message in line  # the limit is checked on the parsed structure: nothing was expanded
    with pytest.raises(FtmagicError) as info:
        ftmagic.finetune(str(config))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert _snapshot(user_folder) == before and not (user_folder / "pwned").exists()


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_hostile_config_bytes_cli_and_api(name, user_folder, capsys):
    content, message = FILE_CASES[name]
    config = user_folder / "run.yaml"
    config.write_bytes(content)
    before = _snapshot(user_folder)
    _cli_one_line(capsys, ["train", str(config)], message)
    with pytest.raises(FtmagicError, match="^" + str(config).replace(".", r"\.")):
        ftmagic.FinetuneConfig.from_file(str(config))
    assert _snapshot(user_folder) == before


def test_hostile_set_values_are_one_line(user_folder, test_model_dir, capsys):
    config = user_folder / "run.yaml"
    config.write_text(_base(test_model_dir, user_folder / "train.jsonl", user_folder / "out"))
    _cli_one_line(capsys, ["train", str(config), "--set", f"target_modules={_bomb()}"], BOMB_MSG)
    _cli_one_line(capsys, ["train", str(config), "--set", "lr=nan"], "`lr: nan` must be a finite number")
    _cli_one_line(capsys, ["train", str(config), "--set", "seed=-1"], "`seed: -1` must not be negative")


def test_numbers_from_python_are_checked_before_anything_is_allocated():
    for key, value in (("seed", -1), ("seed", 1e23), ("lr", float("nan")), ("weight_decay", float("inf")),
                       ("warmup", float("nan")), ("epochs", float("inf")), ("lora_r", 1e23), ("grad_accum", 1e23),
                       ("lora_r", 10**4000)):
        with pytest.raises(FtmagicError) as info:
            ftmagic.finetune(data=[{"text": "x"}], **{key: value})
        assert str(info.value).startswith(f"`{key}: ") and "\n" not in str(info.value)
    with pytest.raises(FtmagicError, match=r"`lr: nan` must be a finite number"):
        ftmagic.finetune(ftmagic.FinetuneConfig(lr=float("nan"), data=[{"text": "x"}]))  # built directly, never checked


@pytest.mark.parametrize("name", ["JSON nested 20000 levels", "JSON 5000-digit integer", "a 9 MB line", "UTF-16 data",
                                  "numbers as text"])
def test_hostile_data_cli_and_api(name, user_folder, test_model_dir, capsys, tmp_path, monkeypatch):
    file_name, content, message = _data_cases(tmp_path)[name]
    data = user_folder / file_name
    data.write_bytes(content)
    config = user_folder / "run.yaml"
    config.write_text(_base(test_model_dir, data, user_folder / "out"))
    before = _snapshot(user_folder)
    if name == "a 9 MB line":
        import ftmagic.data.encode as encode

        def never(*args, **kwargs):
            raise AssertionError("the tokenizer saw the oversized record")

        monkeypatch.setattr(encode, "encode_conversations", never)
    _cli_one_line(capsys, ["train", str(config), "--quiet"], message.replace(file_name, str(data)))
    with pytest.raises(FtmagicError) as info:
        ftmagic.finetune(str(config))
    assert message.replace(file_name, str(data)) in str(info.value)
    # The previewer reads leniently: the same record is listed as a problem, never a traceback.
    if name != "UTF-16 data":
        assert main(["preview", str(data), "--model", test_model_dir, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        kinds = {p["kind"] for p in report["problems"]}
        assert kinds & {"unparseable", "oversized", "bad_type"}, report["problems"]
    assert _snapshot(user_folder) == before and not (user_folder / "out").exists()


@pytest.mark.parametrize("name", ["pickled weights", "custom code"])
def test_hostile_model_folder_cli_and_api(name, user_folder, test_model_dir, capsys, tmp_path):
    folder, message = _model_cases(tmp_path, test_model_dir)[name]
    config = user_folder / "run.yaml"
    config.write_text(_base(folder, user_folder / "train.jsonl", user_folder / "out"))
    before = _snapshot(user_folder)
    _cli_one_line(capsys, ["train", str(config), "--quiet"], message)
    with pytest.raises(FtmagicError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        ftmagic.finetune(str(config))
    assert not (tmp_path / "pickle-ran").exists() and not (tmp_path / "custom-code-ran").exists()
    assert _snapshot(user_folder) == before and not (user_folder / "out").exists()


def test_write_clean_never_overwrites_an_existing_file(user_folder, test_model_dir, capsys):
    target = user_folder / "notes.md"
    _cli_one_line(capsys, ["preview", str(user_folder / "train.jsonl"), "--model", test_model_dir,
                           "--write-clean", str(target)],
                  f"{target}: the file exists and is never overwritten; give a new name or delete it first")
    assert target.read_text() == "my notes\n"
    with pytest.raises(FtmagicError, match="the file exists and is never overwritten"):
        ftmagic.clean(str(user_folder / "train.jsonl"), str(target))
    assert target.read_text() == "my notes\n"
    copy = user_folder / "copy.jsonl"
    copy.write_text("old\n")
    ftmagic.clean(str(user_folder / "train.jsonl"), str(copy), overwrite=True)  # only when asked
    assert copy.read_text().startswith("{\"prompt\": ") and "old" not in copy.read_text()


def test_numbers_in_a_parquet_column_are_indexed_from_0_and_get_advice_for_a_table(tmp_path, test_tokenizer):
    # "x.parquet: row 0: ... write it in quotes": a Parquet column has a type, not quotes, and its
    # rows were counted from 0 under the word that JSONL lines count from 1.
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = str(tmp_path / "n.parquet")
    pq.write_table(pa.table({"prompt": ["2+2=", "q"], "completion": [4, 5]}), path)
    report = ftmagic.preview(path, tokenizer=test_tokenizer)
    assert [str(p) for p in report.problems if p.kind == "bad_type"] == [
        f"{path}[{i}]: field `completion` is a number ({n}), expected text; the `completion` column must hold "
        "strings, not numbers" for i, n in ((0, 4), (1, 5))]
    from ftmagic.data.pipeline import prepare_data

    with pytest.raises(FtmagicError, match=r"n\.parquet\[0\]: field `completion` is a number \(4\), expected text; "
                                           "the `completion` column must hold strings"):  # training says the same
        prepare_data(ftmagic.FinetuneConfig(data=path), test_tokenizer)


def test_numbers_in_text_fields_are_reported_not_turned_into_text(test_model_dir):
    report = ftmagic.preview([{"prompt": "2+2=", "completion": 4}, {"prompt": "q", "completion": float("nan")},
                              {"prompt": "q", "completion": "a"}], model=test_model_dir)
    messages = {p.location: p.message for p in report.problems if p.kind == "bad_type"}
    assert messages == {"data[0]": "field `completion` is a number (4), expected text; write it in quotes",
                        "data[1]": "field `completion` is a number (nan), expected text; write it in quotes"}
    assert report.usable == 1


# --------------------------------------------------------------------------- a notebook kernel


class _Kernel:
    """A real ipykernel; ``run(code)`` returns (stdout, stderr, tracebacks)."""

    def __init__(self, cwd):
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3", cwd=str(cwd),
                                            env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))

    def run(self, code, timeout=240):
        msg_id = self.kc.execute(code)
        out, err, tracebacks = [], [], []
        while True:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                (out if content["name"] == "stdout" else err).append(content["text"])
            elif kind == "error":
                tracebacks.append("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out), "".join(err), tracebacks

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def test_hostile_inputs_in_a_notebook_kernel_are_one_usage_error_each(user_folder, test_model_dir, tmp_path):
    pytest.importorskip("jupyter_client")
    cells = {}
    for name, (extra, message) in CONFIG_CASES.items():
        body = _base(test_model_dir, user_folder / "train.jsonl", user_folder / "out", extra) + extra + "\n"
        cells[name] = ("%%finetune\n" + body, message)
    for name, (file_name, content, message) in _data_cases(tmp_path).items():
        (tmp_path / file_name).write_bytes(content)
        cells[f"data: {name}"] = ("%%finetune\n" + _base(test_model_dir, tmp_path / file_name, user_folder / "out"),
                                  message.replace(file_name, str(tmp_path / file_name)))
    for name, (folder, message) in _model_cases(tmp_path, test_model_dir).items():
        cells[f"model: {name}"] = ("%%finetune\n" + _base(folder, user_folder / "train.jsonl", user_folder / "out"),
                                   message)
    cells["flag nan"] = ("%%finetune --lr nan\n" + _base(test_model_dir, user_folder / "train.jsonl", user_folder / "out"),
                         "--lr: `lr: nan` must be a finite number")
    cells["flag bomb"] = (f"%%finetune --columns '{{prompt: {_bomb()}}}'\n" + _base(test_model_dir, user_folder / "train.jsonl",
                                                                                   user_folder / "out"), BOMB_MSG)
    before = _snapshot(user_folder)
    kernel = _Kernel(tmp_path)
    try:
        out, err, tracebacks = kernel.run("%load_ext ftmagic")
        assert not err and not tracebacks, err
        failures = []
        for name, (code, message) in cells.items():
            out, err, tracebacks = kernel.run(code)
            lines = err.strip().splitlines()
            ok = (not tracebacks and len(lines) == 1 and lines[0].startswith("UsageError: ") and message in lines[0])
            if not ok:
                failures.append(f"{name}: stderr={err[-600:]!r} tracebacks={[t[-600:] for t in tracebacks]}")
        # The previewer lists a hostile record as a problem: output, no error, no traceback.
        out, err, tracebacks = kernel.run(f"%ft_preview {tmp_path / 'deep.jsonl'} --model {test_model_dir} --text")
        if err or tracebacks or "JSON nested more than 64 levels deep" not in out:
            failures.append(f"preview: stdout={out[-600:]!r} stderr={err[-600:]!r} tracebacks={tracebacks}")
        assert not failures, "\n".join(failures)
    finally:
        kernel.close()
    assert _snapshot(user_folder) == before
    assert not (tmp_path / "pickle-ran").exists() and not (tmp_path / "custom-code-ran").exists()


def test_the_readme_states_the_limits_the_code_uses():
    """The promises section quotes each limit; its home is the code, and this keeps the two equal."""
    from ftmagic import config
    from ftmagic.data import formats, load
    from ftmagic.engine import runlock

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = " ".join(readme.split("## What ftmagic promises", 1)[1].split("\n## ", 1)[0].split())
    quoted = [
        f"YAML over {config.MAX_YAML_CHARS // 2**20} MiB",
        f"expanding past {config.MAX_YAML_NODES:,} values",
        f"nested past {config.MAX_YAML_DEPTH} levels",
        f"record over {formats.MAX_RECORD_CHARS // 2**20} Mi characters",
        f"JSON nested past {load.MAX_JSON_DEPTH} levels",
        "`seed` 0 to 2³²−1" if config.NUMBER_RANGES["seed"] == (0, 2**32 - 1) else "seed range changed",
        f"`lora_r` up to {config.NUMBER_RANGES['lora_r'][1]:,}",
        f"`grad_accum` up to {config.NUMBER_RANGES['grad_accum'][1]:,}",
        f"after {round(runlock.STALE_AFTER_S / 60)} minutes without its heartbeat".replace("3 minutes", "three minutes"),
    ]
    from ftmagic.engine import loop

    quoted.append(f"({['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten'][loop.MAX_SKIPPED_IN_A_ROW]} "
                  "in a row stop the run)")
    for text in quoted:
        assert text in section, text

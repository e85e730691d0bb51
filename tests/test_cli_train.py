"""`ftmagic train`: trains from a YAML file; every mistake is one `ftmagic: error:` line, exit 2."""

import json

import pytest

from ftmagic.cli import main


def _config(tmp_path, model_dir, body=""):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"reverse: {w}", "completion": w[::-1]}) + "\n"
                            for w in ["abc", "hello", "data", "fox"]))
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {model_dir}\ndata: {data}\nmethod: lora\nmax_steps: 2\nbatch_size: 2\n"
                    f"lora_r: 2\nsave_steps: 0\noutput_dir: {tmp_path / 'out'}\n" + body)
    return path


def _error_line(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_train_runs_and_says_where_it_saved(test_model_dir, tmp_path, capsys):
    path = _config(tmp_path, test_model_dir)
    assert main(["train", str(path), "--set", "lr=1e-3", "--set", "max_steps=3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("finished: 3 steps, train loss ")
    assert out.strip().endswith(f"saved to {tmp_path / 'out'}")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert "lr: 0.001" in (tmp_path / "out" / "config.yaml").read_text()


def test_train_prints_progress(test_model_dir, tmp_path, capsys):
    path = _config(tmp_path, test_model_dir)
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2/2" in out


def test_bad_yaml_line(test_model_dir, tmp_path, capsys):
    path = _config(tmp_path, test_model_dir, body="lora_alpha: [1, 2\n")
    assert main(["train", str(path)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"ftmagic: error: {path}:9: invalid YAML")


def test_unknown_key_names_the_line_and_the_fix(test_model_dir, tmp_path, capsys):
    path = _config(tmp_path, test_model_dir, body="lora_rank: 8\n")
    assert main(["train", str(path)]) == 2
    assert _error_line(capsys) == f"ftmagic: error: {path}:9: unknown key `lora_rank`; did you mean `lora_r`?"


def test_unknown_key_in_set(test_model_dir, tmp_path, capsys):
    path = _config(tmp_path, test_model_dir)
    assert main(["train", str(path), "--set", "epoch=2"]) == 2
    assert _error_line(capsys) == "ftmagic: error: --set: unknown key `epoch`; did you mean `epochs`?"


def test_an_empty_set_value_for_a_data_key_names_the_flag_and_the_key(test_model_dir, tmp_path, capsys):
    path = _config(tmp_path, test_model_dir)
    assert main(["train", str(path), "--set", "eval_data="]) == 2  # was `ftmagic: error: : file not found`
    assert _error_line(capsys) == ("ftmagic: error: --set: `eval_data` is empty; give a file, folder, dataset id or "
                                   "`$variable`, or leave it out")
    assert not (tmp_path / "out").exists()


def test_set_without_equals(test_model_dir, tmp_path, capsys):
    path = _config(tmp_path, test_model_dir)
    assert main(["train", str(path), "--set", "lr"]) == 2
    assert _error_line(capsys) == "ftmagic: error: --set 'lr' must look like key=value, e.g. --set lr=1e-4"


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["train", str(missing)]) == 2
    assert _error_line(capsys) == f"ftmagic: error: {missing}: cannot read the config file (No such file or directory)"


def test_missing_data_file(test_model_dir, tmp_path, capsys):
    path = _config(tmp_path, test_model_dir)
    path.write_text(path.read_text().replace(str(tmp_path / "train.jsonl"), str(tmp_path / "gone.jsonl")))
    assert main(["train", str(path)]) == 2
    line = _error_line(capsys)
    assert line.startswith("ftmagic: error: ") and "gone.jsonl" in line


def test_bad_value(test_model_dir, tmp_path, capsys):
    path = _config(tmp_path, test_model_dir)
    assert main(["train", str(path), "--set", "lr=-1"]) == 2
    assert _error_line(capsys) == "ftmagic: error: --set: `lr: -1.0` must be greater than 0 (typical: 2e-4 for LoRA, 1e-5 for full)"


def test_every_mistake_in_the_file_and_the_command_line_at_once(test_model_dir, tmp_path, capsys):
    path = _config(tmp_path, test_model_dir, body="lora_rank: 8\nwarmup: -1\n")
    assert main(["train", str(path), "--set", "lr=0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ftmagic: error: {path}:9: unknown key `lora_rank`; did you mean `lora_r`?",
        f"ftmagic: error: {path}:10: `warmup: -1.0` must not be negative",
        "ftmagic: error: --set: `lr: 0.0` must be greater than 0 (typical: 2e-4 for LoRA, 1e-5 for full)",
    ]


@pytest.mark.parametrize("argv, line", [
    (["estimate", "llama-3.2-1b", "--method", "qlra"],
     "`--method qlra` is not accepted; use one of full, lora, qlora, dora, ia3, prompt_tuning, prefix_tuning, "
     "bitfit, freeze; did you mean `qlora`? (see `ftmagic estimate --help`)"),
    (["estimate", "llama-3.2-1b", "--precision", "float16"],  # a synonym, not the closest spelling
     "`--precision float16` is not accepted; use one of auto, bf16, fp16, fp32; did you mean `fp16`? "
     "(see `ftmagic estimate --help`)"),
    (["trian", "run.yaml"], "`command: trian` is not accepted; use one of train, export, demo, sweep, estimate, "
                            "preview; did you mean `train`? (see `ftmagic --help`)"),
])
def test_a_refused_choice_reads_like_every_other_refused_value(argv, line, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"ftmagic: error: {line}\n"


def test_a_value_users_write_for_an_option_is_answered_with_that_option(test_model_dir, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {test_model_dir}\ndata: x.jsonl\ndevice: gpu\n")
    assert main(["train", str(path)]) == 2
    # `gpu` is spelled most like `cpu`; what it means is `cuda`
    assert _error_line(capsys) == (f"ftmagic: error: {path}:3: `device: gpu` is not accepted; use one of auto, cuda, "
                                   "mps, cpu; did you mean `cuda`?")


def test_an_interrupted_run_exits_with_130_so_a_script_stops(test_model_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C during a step: the run saves a resumable checkpoint and says so, but the command
    does not report success (`ftmagic train run.yaml && ftmagic export ...` must stop there)."""
    import torch
    import torch.nn.functional as F

    attention, calls = F.scaled_dot_product_attention, []

    def interrupted_attention(*args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 12:  # in the middle of a later step
                raise KeyboardInterrupt
        return attention(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", interrupted_attention)
    path = _config(tmp_path, test_model_dir)
    assert main(["train", str(path), "--set", "max_steps=50", "--set", "save_steps=1", "--quiet"]) == 130
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("interrupted: ") and not line.startswith("interrupted: 0 steps"), line

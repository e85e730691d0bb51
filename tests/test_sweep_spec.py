"""The `sweep:` block: spaces, defaults, one-line errors naming `sweep.<key>` and its line, the best cell."""

from __future__ import annotations

import pytest

from ftmagic.config import FinetuneConfig
from ftmagic.errors import ConfigError
from ftmagic.sweep_spec import Space, best_cell, changed_fields, parse_sweep

BASE = "model: tiny\nval_split: 0.1\n"


def _spec(block: str, base: str = BASE):
    cfg = FinetuneConfig.from_yaml(base + "sweep:\n" + block, source="run.yaml")
    return parse_sweep(cfg.sweep, cfg)


def test_the_issue_spellings_parse():
    spec = _spec("  lr: [1.0e-4, 3.0e-4, 1.0e-3]\n  lora_r: {choices: [8, 16, 32]}\n")
    assert spec.spaces == (Space("lr", "choices", (1e-4, 3e-4, 1e-3)), Space("lora_r", "choices", (8, 16, 32)))
    assert (spec.sampler, spec.n_trials, spec.metric, spec.direction, spec.pruner) == \
        ("grid", 9, "eval_loss", "minimize", "median")
    assert spec.grid() == {"lr": [1e-4, 3e-4, 1e-3], "lora_r": [8, 16, 32]}
    spec = _spec("  lr: {log_uniform: [1.0e-5, 1.0e-3]}\n  warmup: {uniform: [0, 0.1]}\n"
                 "  batch_size: {int: [8, 32], step: 8}\n  n_trials: 7\n")
    assert spec.sampler == "tpe" and spec.n_trials == 7 and spec.grid_size is None
    assert spec.spaces[0] == Space("lr", "log_uniform", low=1e-5, high=1e-3)
    assert spec.spaces[2] == Space("batch_size", "int", low=8, high=32, step=8)


def test_metric_and_direction_follow_eval_metrics():
    spec = _spec("  lr: [1.0e-4, 3.0e-4]\n", "eval_prompts: 10\neval_metrics: [chrf, exact_match]\n")
    assert (spec.metric, spec.direction) == ("chrf", "maximize")

    def errors(prediction, reference):
        return float(prediction != reference)

    errors.greater_is_better = False
    cfg = FinetuneConfig(eval_prompts=10, eval_metrics=[errors], sweep={"lr": [1e-4, 1e-3], "sampler": "random"})
    spec = parse_sweep(cfg.sweep, cfg)
    assert (spec.metric, spec.direction, spec.n_trials) == ("errors", "minimize", 10)
    assert _spec("  lr: [1.0e-4, 3.0e-4]\n  n_trials: 99\n").n_trials == 2  # a grid has no more points


@pytest.mark.parametrize("block, message", [
    ("  lrr: [1.0e-4]\n", r"^run.yaml:4: `sweep.lrr` is not a config key or a sweep setting; did you mean `lr`\?$"),
    ("  lr: [1.0e-4, -1]\n", r"^run.yaml:4: `sweep.lr`: value -1 is not accepted \(`lr: -1.0` must be greater than 0"),
    ("  lr: 1.0e-4\n", r"^run.yaml:4: `sweep.lr: 0.0001` is one value; give a list of values"),
    ("  method: [lora, lorra]\n", r"^run.yaml:4: `sweep.method`: value 'lorra' is not accepted \(`method: lorra` is not accepted; use one of"),
    ("  lr: {log_uniform: [0, 1.0e-3]}\n", r"^run.yaml:4: `sweep.lr.log_uniform` needs a low above 0"),
    ("  lr: {uniform: [1.0e-3, 1.0e-4]}\n", r"^run.yaml:4: `sweep.lr.uniform: \[0.001, 0.0001\]`: low must be below high$"),
    ("  lr: {between: [1, 2]}\n", r"^run.yaml:4: `sweep.lr` must have exactly one of choices, uniform, log_uniform, int \(not `between`\)$"),
    ("  lr: {log_uniform: [1.0e-5, 1.0e-3]}\n  sampler: grid\n", r"^run.yaml:4: `sweep.lr` is a log_uniform range, which a grid cannot enumerate"),
    ("  lr: [1.0e-4]\n  sampler: bayes\n", r"^run.yaml:5: `sweep.sampler: bayes` is not accepted; use one of grid, random, tpe$"),
    ("  lr: [1.0e-4]\n  n_trials: 0\n", r"^run.yaml:5: `sweep.n_trials: 0` must be a whole number of at least 1$"),
    ("  lr: [1.0e-4]\n  metric: exact_match\n", r"^run.yaml:5: `sweep.metric: exact_match` is not computed; use eval_loss or one of `eval_metrics` \(none set\)$"),
    ("  lr: [1.0e-4]\n  direction: up\n", r"^run.yaml:5: `sweep.direction: up` is not accepted; use one of minimize, maximize$"),
    ("  output_dir: [a, b]\n", r"^run.yaml:4: `sweep.output_dir` cannot be searched"),
    ("  n_trials: 3\n", r"^run.yaml:3: `sweep` names no config key to search"),
    ("  batch_size: {int: [1.5, 8]}\n", r"^run.yaml:4: `sweep.batch_size.int` needs whole numbers$"),
    ("  lora_r: [8, 8]\n", r"^run.yaml:4: `sweep.lora_r` lists a value twice$"),
])
def test_errors_name_the_key_and_its_line(block, message):
    with pytest.raises(ConfigError, match=message):
        _spec(block)


def test_eval_loss_needs_evaluation_data():
    with pytest.raises(ConfigError, match=r"^run.yaml:2: `sweep.metric: eval_loss` needs evaluation data"):
        _spec("  lr: [1.0e-4]\n", base="model: tiny\n")


def test_a_flag_spells_the_block_too():
    from ftmagic.widgets.finetune import build_config

    cfg = build_config("model: tiny\nval_split: 0.1\n", {"sweep": {"lr": [1e-4, 1e-3]}})
    assert cfg.sweep == {"lr": [1e-4, 1e-3]}


def test_best_cell_keeps_the_cell_as_written():
    values = {"model": "tiny", "data": "$train", "lr": 1e-3, "lora_r": 8, "sweep": {"lr": [1e-3, 3e-3]}}
    cell = best_cell(values, {"lr": 0.0031622776, "lora_r": 16}, output_dir="runs/s/best", name="best")
    assert cell == ("%%finetune --name best\nmodel: tiny\ndata: $train\nlr: 0.003162\nlora_r: 16\n"
                    "output_dir: runs/s/best")
    from ftmagic.widgets.finetune import build_config

    cfg = build_config(cell.split("\n", 1)[1], {}, {"train": [{"text": "x"}]})
    assert cfg.lr == 0.003162 and cfg.sweep is None
    cfg = FinetuneConfig(data=[{"text": "a"}], lr=1e-3, sweep={"lr": [1e-3]}, val_split=0.1)
    assert changed_fields(cfg) == {"data": "$data", "lr": 1e-3, "val_split": 0.1, "sweep": {"lr": [1e-3]}}


def test_the_sweep_flag_of_the_magic():
    from ftmagic.widgets.finetune import FinetuneMagics, build_config, flag_overrides, parse_line

    args = parse_line(FinetuneMagics.finetune, "--sweep '{lr: [1.0e-4, 1.0e-3], n_trials: 2}' --val-split 0.1")
    overrides = flag_overrides(args)
    assert overrides["sweep"] == {"lr": [1e-4, 1e-3], "n_trials": 2}
    assert build_config("model: tiny\n", overrides).sweep == {"lr": [1e-4, 1e-3], "n_trials": 2}


def test_every_mistake_in_the_block_is_reported_at_once_with_the_rest_of_the_config():
    """Three mistakes were three fix-and-rerun rounds: the block is judged part by part."""
    text = ("model: tiny\nlora_r: 0\nsweep:\n  lora_rr: [8, 16]\n  lr: {log_uniform: [1.0e-5, 1.0e-3]}\n"
            "  sampler: grid\n  metric: exact_match\n")
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_yaml(text, source="run.yaml")
    assert info.value.problems == [
        "run.yaml:2: `lora_r: 0` must be at least 1",
        "run.yaml:4: `sweep.lora_rr` is not a config key or a sweep setting; did you mean `lora_r`?",
        "run.yaml:5: `sweep.lr` is a log_uniform range, which a grid cannot enumerate; give a list of values or use "
        "`sampler: random` or `tpe`",
        "run.yaml:7: `sweep.metric: exact_match` is not computed; use eval_loss or one of `eval_metrics` (none set)",
    ]

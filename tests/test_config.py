"""FinetuneConfig: the four spellings of a field agree, and every bad value is one line."""

import pytest

from ftmagic.config import FinetuneConfig, parse_yaml_mapping
from ftmagic.errors import ConfigError, FtmagicError


def test_yaml_dict_and_keywords_are_the_same_config():
    from_yaml = FinetuneConfig.from_yaml("model: tiny\nlora_r: 8\nlr: 1e-4\npacking: true\n")
    from_dict = FinetuneConfig.from_dict({"model": "tiny", "lora_r": 8, "lr": 1e-4, "packing": True})
    from_kwargs = FinetuneConfig(model="tiny", lora_r=8, lr=1e-4, packing=True)
    assert from_yaml == from_dict == from_kwargs


def test_overrides_win_over_the_mapping_and_strings_are_coerced():
    cfg = FinetuneConfig.from_dict({"lora_r": 8, "epochs": 1}, lora_r="32", packing="yes", epochs="2.5")
    assert (cfg.lora_r, cfg.packing, cfg.epochs) == (32, True, 2.5)


def test_round_trip_through_to_dict():
    cfg = FinetuneConfig(model="tiny", method="qlora", target_modules=["q_proj", "v_proj"], seed=7)
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg


def test_in_memory_data_is_described_not_dumped():
    cfg = FinetuneConfig(data=[{"text": "a"}, {"text": "b"}])
    assert cfg.to_dict()["data"] == "<list with 2 records>"


def test_unknown_key_names_line_and_suggests_the_closest_key():
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_yaml("model: tiny\nlora_rr: 4\n", source="run.yaml")
    assert str(info.value) == "run.yaml:2: unknown key `lora_rr`; did you mean `lora_r`?"


def test_unknown_keyword_without_source():
    with pytest.raises(ConfigError, match=r"^unknown key `learning_rate`$"):
        FinetuneConfig.from_dict({}, learning_rate=1e-4)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("lr: 0", "cell:1: `lr: 0.0` must be greater than 0"),
        ("lr: -1e-4", "cell:1: `lr: -0.0001` must be greater than 0"),
        ("\nlora_r: 0", "cell:2: `lora_r: 0` must be at least 1"),
        ("val_split: 1.0", "cell:1: `val_split: 1.0` must be in [0, 1)"),
        ("val_split: -0.1", "cell:1: `val_split: -0.1` must be in [0, 1)"),
        ("batch_size: two", "cell:1: `batch_size: 'two'` must be a whole number"),
        ("batch_size: 2.5", "cell:1: `batch_size: 2.5` must be a whole number"),
        ("packing: maybe", "cell:1: `packing: 'maybe'` must be true or false"),
        ("lr: fast", "cell:1: `lr: 'fast'` must be a number"),
        ("method: lroa", "cell:1: `method: lroa` is not accepted; use one of full, lora, qlora"),
        ("precision: fp8", "cell:1: `precision: fp8` is not accepted; use one of auto, bf16, fp16, fp32"),
        ("max_steps: 0", "cell:1: `max_steps: 0` must be a positive number of steps"),
        ("lora_dropout: 1.5", "cell:1: `lora_dropout: 1.5` must be in [0, 1)"),
        ("target_modules: \"\"", "cell:1: `target_modules: ` must be `auto`"),
        ("method: prefix_tuning\npacking: true", "cell:2: `packing: true` cannot be used with `method: prefix_tuning`"),
        ("early_stopping_patience: 2", "cell:1: `early_stopping_patience` needs evaluation data"),
        ("method: qlora\nprecision: fp32", "cell:2: `precision: fp32` does not apply to `method: qlora`"),
        ("columns: 3", "cell:1: `columns: 3` must be a mapping"),
        # was `: file not found`, naming neither the key nor the line
        ('data: ""', "cell:1: `data` is empty; give a file, folder, dataset id or `$variable`"),
        ("eval_data: ' '", "cell:1: `eval_data` is empty; give a file, folder, dataset id or `$variable`, or leave it out"),
        ("eval_prompts: ''", "cell:1: `eval_prompts` is empty; give a number of records to hold out, a file"),
    ],
)
def test_bad_values_give_one_line_errors_with_the_line(yaml_text, message):
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_yaml(yaml_text, source="cell")
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_invalid_yaml_names_the_line():
    with pytest.raises(ConfigError, match=r"^cell:3: invalid YAML"):
        FinetuneConfig.from_yaml("model: tiny\nlr: 1e-4\nbad: [1, 2\n", source="cell")


def test_yaml_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"^cell:1: the config must be a mapping"):
        FinetuneConfig.from_yaml("- a\n- b\n", source="cell")


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read the config file"):
        FinetuneConfig.from_file(str(tmp_path / "nope.yaml"))


def test_empty_yaml_gives_defaults():
    assert FinetuneConfig.from_yaml("") == FinetuneConfig()


def test_yaml_line_numbers():
    values, lines = parse_yaml_mapping("# comment\nmodel: tiny\n\nlr: 0.1\n")
    assert values == {"model": "tiny", "lr": 0.1}
    assert lines == {"model": 2, "lr": 4}


def test_errors_are_value_errors_and_one_line():
    assert issubclass(ConfigError, FtmagicError) and issubclass(FtmagicError, ValueError)
    assert str(ConfigError("a\nb")) == "a b"


def test_replace_validates():
    cfg = FinetuneConfig()
    assert cfg.replace(lora_r=4).lora_r == 4
    with pytest.raises(ConfigError):
        cfg.replace(lr=0)


def test_every_problem_is_reported_at_once_one_line_each_in_line_order():
    text = "model: tiny\nlora_rr: 4\nbatch_size: two\n\nlr: 0\nmethod: prefix_tuning\npacking: true\nval_split: 2\n"
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_yaml(text, source="run.yaml")
    assert str(info.value).splitlines() == [
        "run.yaml:2: unknown key `lora_rr`; did you mean `lora_r`?",
        "run.yaml:3: `batch_size: 'two'` must be a whole number",
        "run.yaml:5: `lr: 0.0` must be greater than 0 (typical: 2e-4 for LoRA, 1e-5 for full)",
        "run.yaml:7: `packing: true` cannot be used with `method: prefix_tuning`: virtual tokens would be shared "
        "across packed examples; set `packing: false`",
        "run.yaml:8: `val_split: 2.0` must be in [0, 1), e.g. 0.1",
    ]
    assert info.value.problems == str(info.value).splitlines()


def test_a_single_problem_reads_as_before():
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_yaml("lr: 0\n", source="run.yaml")
    assert str(info.value) == "run.yaml:1: `lr: 0.0` must be greater than 0 (typical: 2e-4 for LoRA, 1e-5 for full)"
    assert info.value.problems == [str(info.value)]


def test_a_value_that_cannot_be_read_is_judged_once_and_the_rest_still_checked():
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_dict({"lr": "fast", "lora_r": 0})
    assert str(info.value).splitlines() == ["`lr: 'fast'` must be a number, e.g. 0.0002", "`lora_r: 0` must be at least 1"]


@pytest.mark.parametrize("key, example", [("epochs", "1"), ("warmup", "0.03"), ("beta", "0.1"), ("weight_decay", "0.01"),
                                          ("val_split", "0.1"), ("lora_dropout", "0.05")])
def test_a_number_key_given_text_shows_a_value_for_that_key(key, example):
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_yaml(f"{key}: two\n", source="run.yaml")
    assert str(info.value) == f"run.yaml:1: `{key}: 'two'` must be a number, e.g. {example}"


def test_overrides_are_blamed_on_where_they_came_from_and_come_after_the_file():
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_yaml("lr: 0\nlora_r: 8\n", source="run.yaml", override_label=lambda key: "--set",
                                 lora_r=0, seed="x")
    assert str(info.value).splitlines() == [
        "run.yaml:1: `lr: 0.0` must be greater than 0 (typical: 2e-4 for LoRA, 1e-5 for full)",
        "--set: `seed: 'x'` must be a whole number",
        "--set: `lora_r: 0` must be at least 1",
    ]


def test_validate_collects_too():
    cfg = FinetuneConfig()
    cfg.lr, cfg.lora_r = 0, 0
    with pytest.raises(ConfigError) as info:
        cfg.validate(source="cell", lines={"lr": 4})
    assert str(info.value).splitlines() == [
        "cell:4: `lr: 0` must be greater than 0 (typical: 2e-4 for LoRA, 1e-5 for full)",
        "cell: `lora_r: 0` must be at least 1",
    ]


def test_yaml_line_numbers_can_start_below_a_magic_line():
    values, lines = parse_yaml_mapping("model: tiny\nlr: 0.1\n", first_line=2)
    assert lines == {"model": 2, "lr": 3}
    with pytest.raises(ConfigError, match=r"^cell:3: invalid YAML"):
        parse_yaml_mapping("model: tiny\nbad: [1, 2\n", "cell", first_line=2)


def test_an_objective_refused_for_prompt_learning_lists_every_method_that_trains_it():
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_dict(dict(objective="dpo", method="prompt_tuning", data="x.jsonl"))
    assert str(info.value) == ("`objective: dpo` cannot be trained with `method: prompt_tuning` (virtual tokens live "
                               "inside peft's own forward); use one of full, lora, qlora, dora, ia3, bitfit, freeze")


def test_a_key_given_twice_is_refused_at_its_second_line():
    """YAML keeps the last of two equal keys without a word; one of them is a mistake."""
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_yaml("max_steps: 2\nlr: 1e-3\nmax_steps: 3\n", source="run.yaml")
    assert str(info.value) == "run.yaml:3: `max_steps` is given twice (also on line 1); keep one"
    with pytest.raises(ConfigError, match=r"^run.yaml:4: `sweep.lr` is given twice \(also on line 3\); keep one$"):
        FinetuneConfig.from_yaml("model: tiny\nsweep:\n  lr: [1e-3, 2e-3]\n  lr: [3e-3]\n", source="run.yaml")


def test_every_mistake_in_a_data_mixture_is_reported_at_its_entry_with_the_rest():
    text = ("model: tiny\ndata:\n  - {path: a.jsonl, weight: -2}\n  - {path: b.jsonl}\n  - {path: c.jsonl, weight: zero}\n"
            "lora_r: 0\n")
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_yaml(text, source="run.yaml")
    assert info.value.problems == [
        "run.yaml:3: `data[0].weight: -2` must be a number greater than 0 (1 = as is, 2 = twice)",
        "run.yaml:5: `data[2].weight: 'zero'` must be a number greater than 0 (1 = as is, 2 = twice)",
        "run.yaml:6: `lora_r: 0` must be at least 1",
    ]


def test_a_key_merged_in_with_an_anchor_may_be_written_over():
    """`<<: *defaults` then `lr: ...` is how YAML overrides a merge, not a key given twice."""
    values, lines = parse_yaml_mapping("base: &b {lr: 1.0e-4, seed: 3}\n<<: *b\nlr: 2.0e-4\n", "run.yaml")
    assert (values["lr"], values["seed"], lines["lr"]) == (2.0e-4, 3, 3)  # the line of the key written over it
    values, _ = parse_yaml_mapping("grid: &g {lr: [1]}\nsweep:\n  <<: *g\n  lr: [2]\n", "run.yaml")
    assert values["sweep"] == {"lr": [2]}


def test_a_misspelt_key_in_a_data_mixture_is_named_at_its_entry():
    """`wieght` made the list read as records with fields path and wieght ("cannot tell the format")."""
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_yaml("model: tiny\ndata:\n  - {path: a.jsonl, wieght: 2}\n  - {path: b.jsonl}\n",
                                 source="run.yaml")
    assert str(info.value) == "run.yaml:3: `data[0].wieght` is not a key of a data mixture's entry; did you mean `weight`?"
    FinetuneConfig(data=[{"path": "src/a.py", "content": "def f(): ..."}])  # records that have a `path` field


def test_target_modules_as_a_comma_list_or_one_name_reads_the_same_from_every_front():
    # `--target-modules q_proj,v_proj` (the magic) was accepted while `--set target_modules=q_proj,v_proj` and the
    # same text in YAML were refused; the config now reads the text itself.
    from ftmagic.commands.train import parse_sets

    from_set = FinetuneConfig.from_dict({"model": "tiny", "data": "x.jsonl"}, **parse_sets(["target_modules=q_proj,v_proj"]))
    from_yaml = FinetuneConfig.from_yaml("model: tiny\ndata: x.jsonl\ntarget_modules: q_proj, v_proj\n")
    from_list = FinetuneConfig.from_dict({"model": "tiny", "data": "x.jsonl", "target_modules": ["q_proj", "v_proj"]})
    assert from_set.target_modules == from_yaml.target_modules == from_list.target_modules == ["q_proj", "v_proj"]
    assert FinetuneConfig.from_dict({"model": "tiny", "data": "x.jsonl", "target_modules": "q_proj"}).target_modules \
        == ["q_proj"]
    assert FinetuneConfig.from_dict({"model": "tiny", "data": "x.jsonl", "target_modules": "all-linear"}).target_modules \
        == "all-linear"

"""%%finetune and %%ft_generate driven through IPython's InteractiveShell, with a fake engine.

The fake engine emits the same events as the real one (see the engine's event contract), so
these tests cover parsing, errors, binding and the displays quickly; tests/test_magics_engine.py
runs the real engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from IPython.core.error import UsageError

from ftmagic.events import Checkpoint, End, Plan, Start, Step
from ftmagic.errors import DataError


class FakeResult:
    def __init__(self, config, metrics, history, output_dir):
        self.config, self.metrics, self.history, self.output_dir = config, metrics, history, output_dir
        self.calls = []

    def generate(self, prompt, max_new_tokens=64, do_sample=False):
        self.calls.append(("generate", prompt, max_new_tokens))
        return prompt[::-1]

    def compare(self, prompts, max_new_tokens=64):
        self.calls.append(("compare", list(prompts), max_new_tokens))
        return [{"prompt": p, "base": p.upper(), "tuned": p[::-1]} for p in prompts]


class FakeEngine:
    """Records the config and emits plan/start/step/eval/end like the engine does."""

    def __init__(self, steps=5):
        self.steps = steps
        self.calls = []
        self.raise_at = None  # (step, exception)
        self.click_at = None  # step after which the widget's Stop button is clicked

    def __call__(self, config, *, on_event=None, stop=None):
        self.calls.append({"config": config, "stop": stop, "on_event": on_event})
        emit = on_event or (lambda event: None)
        emit(Plan(model=config.model, method=config.method, device="cpu", precision="fp32", reason="no GPU",
                  format="messages", train_records=8, eval_records=0, output_dir=config.output_dir))
        emit(Start(trainable_params=1000, total_params=100_000, max_steps=self.steps, epochs=1.0,
                   resumed_from_step=2 if config.resume else 0))
        history, reason, done = [], "finished", 0
        for i in range(1, self.steps + 1):
            if self.raise_at and self.raise_at[0] == i:
                raise self.raise_at[1]
            event = Step(step=i, max_steps=self.steps, epoch=i / self.steps, loss=2.0 / i, lr=1e-4, grad_norm=1.0,
                         tokens=10, tokens_per_s=100.0, elapsed_s=i, eta_s=self.steps - i, memory_bytes=1024**2)
            history.append(event.to_dict())
            emit(event)
            done = i
            if self.click_at == i:
                on_event.widget.button.click()  # on_event is the magic's CellReporter
            if stop is not None and stop.is_set():
                reason = "stopped"
                emit(Checkpoint(step=i, path=f"{config.output_dir}/checkpoint-{i}"))
                break
        metrics = {"train_loss": 2.0 / done, "steps": done, "runtime_s": 1.0, "stopped": reason != "finished"}
        emit(End(reason=reason, metrics=metrics, output_dir=config.output_dir))
        return FakeResult(config, metrics, history, config.output_dir)


@pytest.fixture
def engine(monkeypatch):
    fake = FakeEngine()
    monkeypatch.setattr("ftmagic.widgets.finetune._engine_finetune", lambda: fake)
    return fake


def run(shell, line, body=""):
    if not body:  # flags only: the line-magic spelling (IPython refuses an empty cell body)
        return shell.run_line_magic("finetune", line)
    return shell.run_cell_magic("finetune", line, textwrap.dedent(body))


# --------------------------------------------------------------------------- loading


def test_load_ext_is_fast_and_imports_nothing_heavy():
    code = textwrap.dedent("""
        import json, sys, time
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        start = time.perf_counter()
        shell.run_line_magic("load_ext", "ftmagic")
        elapsed = time.perf_counter() - start
        heavy = [m for m in ("torch", "transformers", "peft", "ipywidgets", "datasets") if m in sys.modules]
        print(json.dumps({"elapsed": elapsed, "heavy": heavy,
                          "cell": sorted(shell.magics_manager.magics["cell"])}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["elapsed"] < 1.0
    assert {"finetune", "ft_generate"} <= set(report["cell"])


def test_unload_ext_removes_the_magics_and_load_restores_them(shell):
    cell_magics = shell.magics_manager.magics["cell"]
    assert "finetune" in cell_magics and "ft_generate" in cell_magics
    shell.run_line_magic("unload_ext", "ftmagic")
    assert "finetune" not in cell_magics and "ft_generate" not in cell_magics
    shell.run_line_magic("load_ext", "ftmagic")
    assert "finetune" in shell.magics_manager.magics["cell"]


def test_help_documents_every_config_flag(shell, capsys):
    from ftmagic.config import config_fields
    from ftmagic.widgets.finetune import FinetuneMagics, _flag_spec, flag_name

    doc = FinetuneMagics.finetune.__doc__
    for field in config_fields():
        assert flag_name(field.name) in doc, field.name
    assert "--lora-r N" in doc and "config key `lora_r` (integer; default 16)" in doc
    assert "--name NAME" in doc and "--progress" in doc
    # Keys that may name a notebook variable say what else they take.
    helps = {f.name: _flag_spec(f)[1] for f in config_fields()}
    assert helps["eval_metrics"] == "config key `eval_metrics` (metric names, comma-separated, or a $function)"
    assert helps["eval_prompts"] == ("config key `eval_prompts` (records to hold out, or a file, folder, dataset id "
                                     "or $variable)")
    assert helps["data"] == "config key `data` (file, folder, dataset id or $variable)"
    # Each mapping key shows an example of its own (`--sweep` showed `columns`' '{prompt: question}').
    assert helps["columns"] == "config key `columns` (YAML mapping, e.g. '{prompt: question}')"
    assert helps["sweep"] == "config key `sweep` (YAML mapping, e.g. '{lr: [1.0e-4, 3.0e-4]}')"
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match=r"^--sweep: '\{lr: \[1' is not a YAML mapping; write e.g. "
                                         r"'\{lr: \[1.0e-4, 3.0e-4\]\}'$"):
        shell.run_line_magic("finetune", "--sweep '{lr: [1' --data x.jsonl")
    shell.run_cell("%%finetune?\n")
    assert "--lora-r" in capsys.readouterr().out


# --------------------------------------------------------------------------- config from body and flags


def test_flags_win_over_the_body_and_are_typed(shell, engine):
    run(shell, "--lora-r 8 --packing --lr 1e-3 --target-modules q_proj,v_proj --progress none --name r1", """
        model: tiny
        lora_r: 4
        lr: 0.5
        data: d.jsonl
    """)
    config = engine.calls[-1]["config"]
    assert config.lora_r == 8 and config.packing is True and config.lr == 1e-3
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.data == "d.jsonl"
    assert shell.user_ns["r1"].config is config


def test_list_flags(shell, engine):
    run(shell, "--target-modules q_proj --report-to tensorboard --progress none", "data: x.jsonl\n")
    config = engine.calls[-1]["config"]
    assert config.target_modules == ["q_proj"] and config.report_to == "tensorboard"
    run(shell, "--target-modules all-linear --progress none", "data: x.jsonl\n")
    assert engine.calls[-1]["config"].target_modules == "all-linear"


def test_bool_flag_accepts_an_explicit_value(shell, engine):
    run(shell, "--packing false --columns '{prompt: question}' --progress none", "packing: true\ndata: x.jsonl\n")
    config = engine.calls[-1]["config"]
    assert config.packing is False and config.columns == {"prompt": "question"}


def test_data_from_a_notebook_variable_in_the_body_and_as_a_flag(shell, engine):
    rows = [{"prompt": "a", "completion": "b"}]
    other = [{"prompt": "c", "completion": "d"}]
    shell.user_ns.update(train_rows=rows, eval_rows=other)
    run(shell, "--progress none", "data: $train_rows\neval_data: $eval_rows\n")
    config = engine.calls[-1]["config"]
    assert config.data is rows and config.eval_data is other
    run(shell, "--data $eval_rows --progress none", "data: $train_rows\n")
    assert engine.calls[-1]["config"].data is other


def test_quoted_values_and_equals_spelling(shell, engine):
    shell.user_ns["rows"] = [{"text": "x"}]
    run(shell, '--system-prompt "Be brief." --data=$rows --output-dir \'my runs/a\' --progress none')
    config = engine.calls[-1]["config"]
    assert config.system_prompt == "Be brief." and config.data is shell.user_ns["rows"]
    assert config.output_dir == "my runs/a"


def test_other_flags_expand_notebook_variables(shell, engine):
    shell.user_ns["rank"] = 12
    run(shell, "--lora-r {rank} --progress none", "data: x.jsonl\n")
    assert engine.calls[-1]["config"].lora_r == 12


def test_resume_flag_reaches_the_engine(shell, engine, capsys):
    run(shell, "--resume --progress text", "data: x.jsonl\n")
    assert engine.calls[-1]["config"].resume is True
    assert "resuming from step 2" in capsys.readouterr().out


# --------------------------------------------------------------------------- user mistakes: one line


@pytest.mark.parametrize("line, body, expected", [
    # The magic line is the cell's line 1, so the body starts on line 2.
    ("", "model: tiny\nlora_r: [1,\n", "%%finetune cell:3: invalid YAML"),
    ("", "model: tiny\nlora_rank: 8\n", "%%finetune cell:3: unknown key `lora_rank`; did you mean `lora_r`?"),
    ("", "method: lorra\n", "%%finetune cell:2: `method: lorra` is not accepted"),
    ("--lora-rank 8", "", "unknown flag `--lora-rank`; did you mean `--lora-r`?"),
    ("--epoch 2", "", "did you mean `--epochs`?"),
    ("--lr fast", "", "--lr: `lr: 'fast'` must be a number"),
    ("", "model: tiny\ndata: $nowhere\n",
     "%%finetune cell:3: `data: $nowhere`: there is no variable `nowhere` in the notebook"),
    ("--data $nowhere", "", "--data: `data: $nowhere`: there is no variable `nowhere`"),
    ("--name 2x", "", "--name '2x' must be a Python variable name"),
    ("--progress fancy", "", "`--progress fancy` is not accepted; use one of auto, widget, text, none"),
    ("--progress widgte", "", "`--progress widgte` is not accepted; use one of auto, widget, text, none; "
                              "did you mean `widget`?"),
])
def test_user_mistakes_are_one_line_usage_errors(shell, engine, line, body, expected):
    with pytest.raises(UsageError) as info:
        run(shell, line, body)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert engine.calls == []  # nothing started


def test_error_lines_count_the_magic_line_as_line_1(shell, engine):
    # What the user sees: line 1 `%%finetune`, 2 `model: tiny`, 3 `data: ...`, 4 the typo.
    with pytest.raises(UsageError) as info:
        run(shell, "", "model: tiny\ndata: x.jsonl\nlora_rr: 4\n")
    assert str(info.value) == "%%finetune cell:4: unknown key `lora_rr`; did you mean `lora_r`?"


def test_every_mistake_in_a_cell_is_reported_at_once_one_line_each(shell, engine):
    body = "model: tiny\nlora_rank: 8\nlr: 0\ndata: $nowhere\nbatch_size: two\n"
    with pytest.raises(UsageError) as info:
        run(shell, "--lora-dropout 2", body)
    assert str(info.value).splitlines() == [
        "%%finetune cell:3: unknown key `lora_rank`; did you mean `lora_r`?",
        "%%finetune cell:4: `lr: 0.0` must be greater than 0 (typical: 2e-4 for LoRA, 1e-5 for full)",
        "%%finetune cell:5: `data: $nowhere`: there is no variable `nowhere` in the notebook; "
        "run the cell that defines it, or give a file path",
        "%%finetune cell:6: `batch_size: 'two'` must be a whole number",
        "--lora-dropout: `lora_dropout: 2.0` must be in [0, 1)",
    ]
    assert engine.calls == []


def test_engine_user_errors_become_usage_errors_and_bugs_keep_their_traceback(shell, engine):
    engine.raise_at = (1, DataError("train.jsonl: cannot read the file (No such file or directory)"))
    with pytest.raises(UsageError, match=r"^train.jsonl: cannot read the file"):
        run(shell, "--progress none", "data: train.jsonl\n")
    engine.raise_at = (2, RuntimeError("engine bug"))
    with pytest.raises(RuntimeError, match="engine bug"):
        run(shell, "--progress none", "data: train.jsonl\n")


def test_mistakes_show_as_one_line_in_the_shell(shell, engine, capsys):
    shell.run_cell("%%finetune\nlora_rank: 8\n")
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "UsageError: %%finetune cell:2: unknown key `lora_rank`; did you mean `lora_r`?" in text
    assert "Traceback" not in text


# --------------------------------------------------------------------------- output and binding


def test_text_progress_prints_plan_line_first_and_binds_the_result(shell, engine, capsys):
    shell.user_ns.pop("ft", None)
    run(shell, "--progress text", "model: tiny\ndata: x.jsonl\n")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ftmagic: tiny | lora | cpu fp32 | data: 8 train records (messages)"
    assert lines[1] == "1.00k of 100k parameters trainable (1.00%)"
    assert lines[-2].startswith("finished after 5 steps")
    assert lines[-1] == "result bound to `ft`"
    result = shell.user_ns["ft"]
    assert result.metrics["steps"] == 5 and len(result.history) == 5


def test_auto_progress_is_text_outside_a_kernel(shell):
    from ftmagic.widgets.finetune import choose_progress, in_notebook

    assert in_notebook(shell) is False
    assert choose_progress("auto", shell) == "text"
    assert choose_progress("widget", shell) == "widget"


def test_widget_mode_stop_click_ends_the_run_and_shows_the_summary(shell, engine, capsys):
    engine.click_at = 2  # the fake engine clicks the widget's Stop button after step 2
    run(shell, "--progress widget --name stopped_run", "data: x.jsonl\n")
    result = shell.user_ns["stopped_run"]
    assert result.metrics["stopped"] is True and result.metrics["steps"] == 2
    out = capsys.readouterr().out
    # Outside a kernel the display shows text/plain: the summary replaced the widget.
    assert "status: stopped" in out and "steps: 2/5" in out
    assert "result: `stopped_run`" in out
    assert "resume: run the cell again with `--resume` (or `resume: true`) to continue" in out
    reporter = engine.calls[-1]["on_event"]
    assert reporter.widget.button.comm is None  # the live widget is closed


def test_widget_mode_says_each_thing_once(shell, engine, capsys):
    run(shell, "--progress widget --name once", "data: x.jsonl\n")
    out = capsys.readouterr().out
    summary = out[out.index("status: finished"):].splitlines()
    # The plan, the parameters and the result's name are in the summary, and nowhere else.
    assert "run: tiny | lora | cpu fp32" in summary and "data: 8 train records (messages)" in summary
    assert "parameters: 1.00k of 100k parameters trainable (1.00%)" in summary
    assert "result: `once` (RunResult: .metrics, .history, .generate(prompt))" in summary
    assert "ftmagic: tiny | lora" not in out and "result bound to" not in out
    assert out.count("parameters trainable") == 1
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), out


def test_interrupt_before_training_propagates_and_freezes_the_widget(shell, engine, capsys):
    engine.raise_at = (1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run(shell, "--progress widget", "data: x.jsonl\n")
    reporter = engine.calls[-1]["on_event"]
    assert reporter.widget.widget.comm is None
    # The widget became its header line: what was about to run stays above the error.
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == ("ftmagic: tiny | lora | cpu fp32 | data: 8 train records (messages) | "
                    "1.00k of 100k parameters trainable (1.00%)")


# --------------------------------------------------------------------------- %%ft_generate


def test_ft_generate_tuned_only_and_side_by_side(shell, capsys):
    result = FakeResult(None, {}, [], "out")
    shell.user_ns["gen_run"] = result
    shell.run_cell_magic("ft_generate", "--name gen_run --max-new-tokens 7", "abc\n\nxyz\n")
    out = capsys.readouterr().out
    assert "prompt: abc\n  tuned: cba\nprompt: xyz\n  tuned: zyx" in out
    assert result.calls == [("generate", "abc", 7), ("generate", "xyz", 7)]
    shell.run_cell_magic("ft_generate", "--name gen_run --base", "abc\n")
    out = capsys.readouterr().out
    assert "prompt: abc\n  base:  ABC\n  tuned: cba" in out
    assert result.calls[-1] == ("compare", ["abc"], 64)


def test_ft_generate_mistakes(shell):
    shell.user_ns.pop("ft", None)
    with pytest.raises(UsageError, match="there is no `ft` in the notebook: run a %%finetune cell first"):
        shell.run_cell_magic("ft_generate", "", "hello\n")
    shell.user_ns["ft"] = [1, 2]
    with pytest.raises(UsageError, match="`ft` is a list, not a RunResult"):
        shell.run_cell_magic("ft_generate", "", "hello\n")
    with pytest.raises(UsageError, match="write a prompt"):
        shell.run_cell_magic("ft_generate", "", "\n  \n")
    with pytest.raises(UsageError, match="unknown flag"):
        shell.run_cell_magic("ft_generate", "--bse", "hello\n")
    shell.user_ns.pop("ft", None)


def test_generate_table_html_escapes_and_splits_prompts():
    from ftmagic.widgets.generate import compare_table_html, split_prompts

    html = compare_table_html([{"prompt": "<a>", "base": "x", "tuned": "y"}])
    assert "&lt;a&gt;" in html and "<th" in html and html.count("<tr>") == 2
    assert split_prompts("a\n---\nb\nc\n---\n") == ["a", "b\nc"]


@pytest.mark.parametrize("kind, name, line, hint", [
    ("line", "ft_memory", "tiny --batchsize 2", "unknown flag `--batchsize`; did you mean `--batch-size`?; "
                                                "see `%ft_memory?` for every flag"),
    ("line", "ft_preview", "x.jsonl --max-seq 64", "see `%ft_preview?` for every flag"),
    ("cell", "finetune", "--lora-rank 8", "see `%%finetune?` for every flag"),
    ("cell", "ft_generate", "--max-tokens 3", "unknown flag `--max-tokens`; did you mean `--max-new-tokens`?; "
                                              "see `%%ft_generate?` for every flag"),
])
def test_an_unknown_flag_points_to_the_help_of_the_magic_as_it_is_called(shell, kind, name, line, hint):
    with pytest.raises(UsageError) as info:
        shell.run_line_magic(name, line) if kind == "line" else shell.run_cell_magic(name, line, "model: tiny\n")
    assert str(info.value).endswith(hint)


def test_a_variable_written_in_the_cell_body_says_where_variables_go(shell):
    # `max_steps: {steps}` is YAML's mapping {steps: None}: the error said only "must be a whole number".
    shell.user_ns["steps"] = 3
    with pytest.raises(UsageError) as caught:
        shell.run_cell_magic("finetune", "", "model: tiny\ndata: x.jsonl\nmax_steps: {steps}\n")
    assert str(caught.value).endswith("(YAML reads `{steps}` as a mapping, not the variable `steps`: write the value, "
                                      "or give it on the %%finetune line, `--max-steps {steps}`, where notebook "
                                      "variables are read)")

"""%%finetune with the real engine on a tiny random Llama: binding, Stop, interrupt, resume, notebook.

Every run is a handful of steps on a 2-layer model, so each test takes seconds on a CPU.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from engine_helpers import reversal_records

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture
def shell(shell):
    shell.user_ns["records"] = reversal_records(16)
    return shell


def body(model_dir, output_dir, **extra):
    lines = [f"model: {model_dir}", "data: $records", "batch_size: 4", "max_seq_len: 64", "lr: 0.01",
             "save_steps: 0", "eval_steps: 0", f"output_dir: {output_dir}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def test_finetune_cell_trains_and_binds_the_result(shell, test_model_dir, tmp_path, capsys):
    from ftmagic.engine.result import RunResult

    out = tmp_path / "run"
    shell.run_cell_magic("finetune", "--max-steps 3 --progress text --name tuned --lora-r 4",
                         body(test_model_dir, out))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"ftmagic: {test_model_dir} | lora | cpu fp32 | data: 16 train records")
    assert lines[1].startswith("threads: 1 (")  # what the run chose, one line
    assert "parameters trainable" in lines[2]
    assert lines[-1] == "result bound to `tuned`"
    result = shell.user_ns["tuned"]
    assert isinstance(result, RunResult)
    assert result.metrics["steps"] == 3 and result.metrics["stopped"] is False
    assert result.config.lora_r == 4
    assert [h["step"] for h in result.history if h.get("event") == "step"] == [1, 2, 3]
    assert (out / "adapter_model.safetensors").exists()


def test_ft_generate_with_a_real_result(shell, test_model_dir, tmp_path, capsys):
    shell.run_cell_magic("finetune", "--max-steps 1 --progress none", body(test_model_dir, tmp_path / "g"))
    capsys.readouterr()
    shell.run_cell_magic("ft_generate", "--base --max-new-tokens 3", "reverse: abc\nreverse: dog\n")
    out = capsys.readouterr().out
    assert out.count("prompt: ") == 2
    assert "prompt: reverse: abc\n  base:  " in out and "\n  tuned: " in out
    # After a kernel restart the variable is gone; the run's folder is enough.
    shell.user_ns.pop("ft")
    shell.run_cell_magic("ft_generate", f"--run {tmp_path / 'g'} --max-new-tokens 3", "reverse: abc\n")
    assert capsys.readouterr().out.startswith("prompt: reverse: abc\n  tuned: ")
    with pytest.raises(UsageError, match="is not a finished ftmagic run"):
        shell.run_cell_magic("ft_generate", f"--run {tmp_path / 'nowhere'}", "reverse: abc\n")


def _run_with_widget(config, click_at=None, interrupt_at=None):
    """Drive the widget path the magic uses, clicking Stop (or raising Ctrl-C) from an event."""
    from ftmagic.widgets.finetune import CellReporter, run_with_reporter

    holder = {}

    def listener(event):
        if event.kind != "step":
            return
        if click_at is not None and event.step == click_at:
            holder["reporter"].widget.button.click()
        if interrupt_at is not None and event.step == interrupt_at:
            raise KeyboardInterrupt  # what Jupyter's interrupt raises in the kernel's main thread

    reporter = CellReporter("widget", on_event=listener)
    holder["reporter"] = reporter
    result = run_with_reporter(config, reporter)
    reporter.finish(result, "ft")
    return result, reporter


def test_stop_button_ends_the_run_after_the_step_and_saves_a_checkpoint(test_model_dir, tmp_path):
    from ftmagic.widgets.finetune import build_config

    out = tmp_path / "stopped"
    config = build_config(body(test_model_dir, out, max_steps=8), namespace={"records": reversal_records(16)})
    result, reporter = _run_with_widget(config, click_at=2)
    assert reporter.stop.is_set()
    assert result.metrics["stopped"] is True and result.metrics["reason"] == "stopped"
    assert result.metrics["steps"] == 2
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert any(name.endswith("2") for name in checkpoints), checkpoints
    # The widget was replaced by the static summary; the summary names the stop and the resume flag.
    html = reporter.widget.summary_bundle(result.metrics)["text/html"]
    assert "<svg" in html and "stopped" in html and "--resume" in html
    assert reporter.widget.button.comm is None


def test_interrupt_saves_a_checkpoint_and_the_cell_resumes_to_the_same_loss(shell, test_model_dir, tmp_path, capsys):
    from ftmagic.widgets.finetune import build_config

    records = shell.user_ns["records"]
    # Reference: one uninterrupted run of 6 steps.
    shell.run_cell_magic("finetune", "--max-steps 6 --progress none --name straight",
                         body(test_model_dir, tmp_path / "straight"))
    straight = shell.user_ns["straight"]

    # Same run, interrupted (Ctrl-C / the kernel's stop button) during step 3.
    out = tmp_path / "resumed"
    config = build_config(body(test_model_dir, out, max_steps=6), namespace={"records": records})
    interrupted, _ = _run_with_widget(config, interrupt_at=3)
    assert interrupted.metrics["reason"] == "interrupted" and interrupted.metrics["steps"] == 3
    capsys.readouterr()

    shell.run_cell_magic("finetune", "--max-steps 6 --progress text --resume --name again", body(test_model_dir, out))
    text = capsys.readouterr().out
    assert "resuming from step 3" in text
    again = shell.user_ns["again"]
    assert again.metrics["steps"] == 6 and again.metrics["stopped"] is False
    assert again.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"], rel=1e-4, abs=1e-5)


def test_a_missing_data_file_is_one_line(shell, test_model_dir, tmp_path):
    with pytest.raises(UsageError) as info:
        shell.run_cell_magic("finetune", "--progress none",
                             f"model: {test_model_dir}\ndata: {tmp_path / 'nope.jsonl'}\noutput_dir: {tmp_path / 'o'}\n")
    assert "nope.jsonl" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- a real notebook


@pytest.mark.slow
def test_notebook_runs_end_to_end_and_keeps_a_static_summary(test_model_dir, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    setup = "import sys\nsys.path.insert(0, %r)\nfrom engine_helpers import reversal_records\n" % str(TESTS_DIR)
    setup += "records = reversal_records(16)"
    cells = [
        nbformat.v4.new_code_cell("%load_ext ftmagic"),
        nbformat.v4.new_code_cell(setup),
        nbformat.v4.new_code_cell("%%finetune --max-steps 3 --name ft\n" + body(test_model_dir, tmp_path / "nb-run")),
        nbformat.v4.new_code_cell("%%ft_generate --max-new-tokens 2\nreverse: abc"),
        nbformat.v4.new_code_cell("print(ft.metrics['steps'], type(ft).__name__)"),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    old = dict(os.environ)
    os.environ.update(env)
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))
    if os.environ.get("FTMAGIC_KEEP_NOTEBOOK"):  # look at the saved notebook by hand
        nbformat.write(nb, os.environ["FTMAGIC_KEEP_NOTEBOOK"])

    run_cell = nb.cells[2]
    streams = "".join(o.get("text", "") for o in run_cell.outputs if o.output_type == "stream" and o.name == "stdout")
    # Widget mode prints nothing: the plan is the live widget's header and the result is named in the summary.
    assert streams == "", streams
    data_outputs = [o for o in run_cell.outputs if o.output_type == "display_data"]
    # The live widget's output was replaced in place by the static summary.
    widgets_left = [o.data["text/plain"] for o in data_outputs if "application/vnd.jupyter.widget-view+json" in o.data]
    assert widgets_left == []  # not ours, and not the libraries' own loading bars either
    assert data_outputs[0].data["text/plain"].startswith("status: finished")
    assert "result: `ft` (RunResult" in data_outputs[0].data["text/plain"]
    summaries = [o.data["text/html"] for o in data_outputs if "ftmagic-summary" in o.data.get("text/html", "")]
    assert len(summaries) == 1
    assert "<svg" in summaries[0] and "finished" in summaries[0] and "<script" not in summaries[0]

    generate_cell = nb.cells[3]
    tables = [o.data["text/html"] for o in generate_cell.outputs if o.output_type == "display_data"]
    assert tables and "ftmagic-compare" in tables[0] and "reverse: abc" in tables[0]
    assert nb.cells[4].outputs[0]["text"].strip() == "3 RunResult"


class Kernel:
    """A real ipykernel driven over its channels, the way a notebook front end drives it."""

    def __init__(self, cwd):
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3", cwd=str(cwd),
                                            env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))

    def execute(self, code, on_message=None, timeout=240):
        """Run ``code``; return its stdout (and error traceback) once the kernel is idle."""
        msg_id = self.kc.execute(code)
        out = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if on_message is not None:
                on_message(msg)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                out.append(msg["content"]["text"])
            if msg["msg_type"] in ("display_data", "update_display_data") and "text/html" in msg["content"]["data"]:
                # A widget-mode run ends in a static summary, which says what the cell printed before.
                out.append(html.unescape(re.sub(r"<[^>]+>", " ", msg["content"]["data"]["text/html"])))
            if msg["msg_type"] == "error":
                out.append("\n".join(msg["content"]["traceback"]))
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(out)

    def setup(self):
        code = f"import sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\nfrom engine_helpers import reversal_records\n" \
               "records = reversal_records(16)\n%load_ext ftmagic"
        assert "Error" not in self.execute(code)

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def bound_to_ft(out: str) -> bool:
    """The cell said its result is `ft`: printed (text progress) or in the static summary (widget)."""
    return "result bound to `ft`" in out or "`ft` (RunResult" in out


def _shown(msg) -> str:
    """What a message puts on screen: printed text, or a widget's new text value."""
    if msg["msg_type"] == "stream":
        return msg["content"].get("text", "")
    value = msg["content"].get("data", {}).get("state", {}).get("value") if msg["msg_type"] == "comm_msg" else None
    return value if isinstance(value, str) else ""


def _first_step_done(msg) -> bool:
    """A training step has been reported (the loop is running), as text or in the widget."""
    return "loss" in _shown(msg)


def _training_started(msg) -> bool:
    """The run has started training: its parameter line is printed (text progress) or shown
    in the live widget's header (widget progress, where it is not printed as well)."""
    return "parameters trainable" in _shown(msg)


class StopClicker:
    """An ``on_message`` that clicks the widget's Stop button once training has started,
    exactly as ipywidgets' front end does, and keeps what the widget showed."""

    def __init__(self, kernel) -> None:
        self.kernel, self.button, self.sent, self.widget_texts = kernel, None, False, []

    def __call__(self, msg) -> None:
        content = msg["content"]
        if msg["msg_type"] == "comm_msg" and _shown(msg):
            self.widget_texts.append(_shown(msg))
        if msg["msg_type"] == "comm_open" and content["data"].get("state", {}).get("_model_name") == "ButtonModel":
            self.button = content["comm_id"]
        if _training_started(msg) and self.button and not self.sent:
            click = {"comm_id": self.button, "data": {"method": "custom", "content": {"event": "click"}}}
            self.kernel.kc.shell_channel.send(self.kernel.kc.session.msg("comm_msg", click))
            self.sent = True


@pytest.mark.slow
def test_stop_click_from_the_front_end_reaches_a_running_cell(test_model_dir, tmp_path):
    """A real kernel: the click arrives while %%finetune is still training, not after it."""
    ipykernel = pytest.importorskip("ipykernel")
    if int(ipykernel.__version__.split(".")[0]) < 7:
        pytest.skip("routing widget messages during a running cell needs ipykernel 7 subshells")
    kernel = Kernel(tmp_path)
    clicker = StopClicker(kernel)

    try:
        kernel.setup()
        cell = "%%finetune --max-steps 5000 --progress widget\n" + body(test_model_dir, tmp_path / "clicked")
        out = kernel.execute(cell, on_message=clicker)
        assert clicker.sent, out
        assert bound_to_ft(out) and "run the cell again with `--resume`" in out, out
        report = kernel.execute("print(ft.metrics['reason'], ft.metrics['steps'])").split()
        assert report[0] == "stopped" and int(report[1]) < 5000
    finally:
        kernel.close()


@pytest.mark.slow
def test_kernel_interrupt_then_restart_then_resume(test_model_dir, tmp_path):
    """Jupyter's interrupt ends the run with a checkpoint; after a kernel restart `--resume` finishes it."""
    kernel = Kernel(tmp_path)
    sent = {}

    def interrupt_once_training_started(msg):
        if _first_step_done(msg) and not sent:
            kernel.km.interrupt_kernel()
            sent["yes"] = True

    out_dir = tmp_path / "interrupted"
    try:
        kernel.setup()
        cell = "%%finetune --max-steps 5000 --save-steps 0\n" + body(test_model_dir, out_dir)
        out = kernel.execute(cell, on_message=interrupt_once_training_started)
        assert sent and bound_to_ft(out) and "run the cell again with `--resume`" in out, out
        reason, steps = kernel.execute("print(ft.metrics['reason'], ft.metrics['steps'])").split()
        assert reason == "interrupted" and 0 < int(steps) < 5000
        assert any((out_dir / "checkpoints").iterdir())

        kernel.km.restart_kernel(now=True)  # a dropped session: nothing survives but the files
        kernel.kc.wait_for_ready(timeout=60)
        kernel.setup()
        target = int(steps) + 2
        out = kernel.execute(f"%%finetune --resume --max-steps {target}\n" + body(test_model_dir, out_dir))
        assert bound_to_ft(out) and "--resume" not in out, out
        reason, final = kernel.execute("print(ft.metrics['reason'], ft.metrics['steps'])").split()
        assert reason == "finished" and int(final) == target
    finally:
        kernel.close()


@pytest.mark.parametrize("kind", ["dataframe", "dataset"])
def test_a_dataframe_or_a_datasets_dataset_variable_is_the_data(shell, test_model_dir, tmp_path, kind):
    records = reversal_records(8)
    if kind == "dataframe":
        pandas = pytest.importorskip("pandas")
        value = pandas.DataFrame(records)
    else:
        datasets = pytest.importorskip("datasets")
        value = datasets.Dataset.from_list(records)
    shell.user_ns["table"] = value
    text = body(test_model_dir, tmp_path / kind).replace("data: $records", "data: $table")
    shell.run_cell_magic("finetune", "--max-steps 1 --progress none --name from_table", text)
    result = shell.user_ns["from_table"]
    assert result.metrics["steps"] == 1
    assert result.metrics["data"]["records"] == 8
    assert result.config.data is value


def test_library_progress_bars_are_quiet_during_a_run_and_restored_after():
    import transformers.utils.logging as hf_logging

    from ftmagic.widgets.finetune import quiet_library_progress_bars

    assert hf_logging.is_progress_bar_enabled()
    with quiet_library_progress_bars():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    with pytest.raises(RuntimeError):
        with quiet_library_progress_bars():
            raise RuntimeError("the run failed")
    assert hf_logging.is_progress_bar_enabled()
    with quiet_library_progress_bars(active=False):
        assert hf_logging.is_progress_bar_enabled()

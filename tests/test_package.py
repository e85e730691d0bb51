"""Package-level contracts: a cheap import and a CLI that fails in one line."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "ipywidgets", "datasets", "bitsandbytes")


def test_import_ftmagic_imports_nothing_heavy():
    code = "import sys, ftmagic; ftmagic.FinetuneConfig(); print(sorted(m for m in {} if m in sys.modules))".format(HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_unknown_command_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "ftmagic.cli", "bogus"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("ftmagic: error: ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_lazy_public_names_are_listed():
    import ftmagic

    for name in ("finetune", "estimate_memory", "preview", "FinetuneConfig", "ConfigError"):
        assert name in ftmagic.__all__


def test_cli_output_into_a_pipe_whose_reader_left_ends_quietly():
    """`ftmagic estimate ... | head`: no BrokenPipeError traceback, the status of a writer whose reader went away."""
    import os

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "ftmagic.cli", "estimate", "tiny", "--json"], stdout=write,
                              stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_loading_the_engine_prints_no_note_about_an_optional_bitsandbytes_package():
    """bitsandbytes' import-time warning about an optional CPU kernel package (its built-in CPU path
    works) reached every command that loads peft: `estimate --exact`, `export`, `RunResult.load`."""
    code = "import ftmagic.engine.methods, peft, bitsandbytes"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels-community" not in proc.stderr, proc.stderr


def test_a_broken_pipe_that_is_not_stdout_is_a_failure_not_a_reader_leaving(tmp_path):
    """Only a closed stdout is answered quietly: a launched process's or a socket's broken pipe keeps its traceback."""
    inject = tmp_path / "sitecustomize.py"
    inject.write_text("import ftmagic.commands.estimate as e\n"
                      "def broken(args):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
                      "e.run = broken\n")
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "ftmagic.cli", "estimate", "tiny"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 1 and "BrokenPipeError" in proc.stderr


def test_preview_into_a_pipe_whose_reader_left_ends_like_every_command(tmp_path):
    import json
    import os

    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(3)))
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "ftmagic.cli", "preview", str(data), "--model", "tiny"],
                              stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")  # it returned 0 from a copy of its own

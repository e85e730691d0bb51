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

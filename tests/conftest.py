"""Shared fixtures: a small tokenizer with a chat template and a tiny Llama built from a config.

The builders live in ``model_builders.py``; nothing here downloads anything.
"""

from __future__ import annotations

import os

import pytest

# Two cores on CI: one thread per op keeps parallel test processes from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The memory calculator's CUDA constants are the built-in ones in tests, whatever a GPU measured on this machine.
os.environ["FTMAGIC_GPU_CONSTANTS"] = "none"

from model_builders import build_test_model_dir, build_test_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def test_tokenizer():
    """A small byte-level BPE tokenizer with a ChatML chat template; EOS is `<|im_end|>`."""
    return build_test_tokenizer()


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory, test_tokenizer):
    """Path of a tiny random Llama checkpoint with the test tokenizer, usable as `model:`."""
    return build_test_model_dir(tmp_path_factory.mktemp("tiny-llama"), test_tokenizer)


from export_fixtures import tiny_eos_variant, tiny_lora_run  # noqa: E402,F401 - session fixtures of the export tests


@pytest.fixture
def shell():
    """An IPython shell with the extension loaded (unloaded afterwards), as in a notebook."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "ftmagic")
    yield ip
    ip.run_line_magic("unload_ext", "ftmagic")


@pytest.fixture(autouse=True)
def _onednn_cache_setting_stays_in_its_test():
    """A CPU bf16 run sets oneDNN's cache variable for its process (ftmagic.engine.device.limit_onednn_cache);
    each test gets the environment it started with back, so later tests and their subprocesses do not inherit it."""
    from ftmagic.engine.device import ONEDNN_CACHE_VARIABLES

    before = {name: os.environ.get(name) for name in ONEDNN_CACHE_VARIABLES}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

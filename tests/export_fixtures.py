"""Fixtures shared by the export tests: trained runs of the embedded tiny model.

Imported by conftest.py so that session-scoped runs are trained once for all test files.
"""

from __future__ import annotations

import json
import shutil

import pytest

# The demo task, trained long enough that the tuned model answers the demo prompts with
# confident tokens (what the GGUF comparison checks is the conversion, not near-ties).
EXPORT_RUN = dict(model="tiny", method="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0, lr=3e-3, max_steps=160,
                  batch_size=16, scheduler="cosine", warmup=0.05, max_seq_len=128, eval_steps=0, save_steps=0, seed=0)


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory):
    """A finished LoRA run on the demo task (the result as ``finetune`` returned it)."""
    import ftmagic
    from ftmagic.demo import demo_dataset

    out = tmp_path_factory.mktemp("export") / "reverse"
    return ftmagic.finetune(data=demo_dataset("train", n=1280), output_dir=str(out), **EXPORT_RUN)


@pytest.fixture(scope="session")
def tiny_eos_variant(tmp_path_factory):
    """A copy of the tiny model whose EOS is ``<|endoftext|>``, so ChatML's ``<|im_end|>`` is a
    second, different answer-ending token (as in Qwen base models)."""
    from ftmagic.constants import TINY_MODEL_DIR as TINY_DIR

    folder = tmp_path_factory.mktemp("tiny-eos") / "tiny-eos"
    shutil.copytree(TINY_DIR, folder)
    for name, key, value in (("tokenizer_config.json", "eos_token", "<|endoftext|>"),
                             ("config.json", "eos_token_id", 0), ("generation_config.json", "eos_token_id", 0)):
        data = json.loads((folder / name).read_text())
        data[key] = value
        (folder / name).write_text(json.dumps(data, indent=1))
    return str(folder)


def copy_run(run_dir, target) -> str:
    """A copy of a run folder (tests that export write into it; the session's run stays clean)."""
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("merged", "gguf", "checkpoints"))
    return str(target)

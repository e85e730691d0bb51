"""The embedded model (`model: tiny`): it ships, loads with plain transformers, follows its
chat template, answers its pretraining tasks and stops at EOS; and its build script is
deterministic."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

import ftmagic

TINY = Path(ftmagic.__file__).resolve().parent / "assets" / "tiny"
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build_tiny_model.py"


@pytest.fixture(scope="module")
def tiny():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(TINY))
    model = AutoModelForCausalLM.from_pretrained(str(TINY)).eval()
    return tok, model


def _answer(tok, model, prompt: str, max_new_tokens: int = 24):
    import torch

    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), new


def test_checkpoint_files_ship_in_the_package_and_are_small():
    names = {p.name for p in TINY.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
        assert required in names
    total = sum(p.stat().st_size for p in TINY.iterdir())
    assert 1_000_000 < total < 10_000_000


def test_loads_with_auto_classes(tiny):
    tok, model = tiny
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(tok) == 259 == model.config.vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 3_000_000


def test_tokenizer_is_byte_level_and_lossless(tiny):
    tok, _ = tiny
    text = "reverse: héllo, Wörld!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: string tasks see letters
    assert tok.decode(ids) == text


def test_chat_template_renders_chatml(tiny):
    tok, _ = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "copy: ab"},
                {"role": "assistant", "content": "ab"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\ncopy: ab<|im_end|>\n"
        "<|im_start|>assistant\nab<|im_end|>\n")
    assert tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\ncopy: ab<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("prompt, expected", [
    ("copy: garden", "garden"),
    ("copy: lamp", "lamp"),
    ("first letter: music", "m"),
    ("length: garden", "6"),
    ("join: k i t e", "kite"),
])
def test_answers_pretraining_tasks_and_stops_at_eos(tiny, prompt, expected):
    tok, model = tiny
    answer, new = _answer(tok, model, prompt)
    assert answer == expected
    assert new[-1] == tok.eos_token_id and new.count(tok.eos_token_id) == 1


def _load_script():
    spec = importlib.util.spec_from_file_location("build_tiny_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_torch_state():
    """The build sets global torch switches; give the rest of the session its defaults back."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.set_flush_denormal(False)


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_build_script_is_deterministic(tmp_path, restore_torch_state):
    build = _load_script().build
    first = build(str(tmp_path / "a"), steps=3, batch_size=4, log_every=0)
    build(str(tmp_path / "b"), steps=3, batch_size=4, log_every=0)
    build(str(tmp_path / "c"), steps=3, batch_size=4, seed=1, log_every=0)
    assert first["steps"] == 3 and first["parameters"] > 1_000_000
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")  # the seed matters, so the check can fail


def test_pretraining_corpus_never_contains_the_demo_task():
    module = _load_script()
    import random

    rng = random.Random(0)
    tok = module.build_tokenizer()
    docs = [module.document(rng, tok) for _ in range(2000)]
    assert not any("reverse" in d for d in docs)
    assert sum("<|im_start|>assistant" in d for d in docs) > 1500

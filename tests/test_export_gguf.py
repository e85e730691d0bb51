"""GGUF export checked with the real llama.cpp runtime (llama-cpp-python).

The tuned tiny model goes through llama.cpp's own converter; llama.cpp then loads it,
tokenizes like transformers, answers the demo prompts token for token like transformers
in f16 (and on at least 90% of them in q8_0), and renders the training prompt from the
chat template embedded in the file. The k-quants go through llama.cpp's quantizer on a
model whose widths are multiples of 256 (the tiny model's 144 are not, so llama.cpp would
keep its tensors in a fallback type).
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from export_fixtures import copy_run

import ftmagic
from ftmagic.demo import DEMO_PROMPTS, demo_dataset
from ftmagic.errors import ExportError

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'ftmagic[gguf]'")
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

PROMPTS = DEMO_PROMPTS + [r["messages"][0]["content"] for r in demo_dataset("test", n=15)]
MAX_NEW = 16


@pytest.fixture(scope="module")
def exported(tiny_lora_run, tmp_path_factory):
    run = ftmagic.RunResult.load(copy_run(tiny_lora_run.output_dir, tmp_path_factory.mktemp("gguf") / "reverse"))
    summary = run.export(["gguf", "ollama"], quant=["f16", "q8_0"])
    return run, summary


def load(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)


def llama_greedy(llm, run, prompt) -> list:
    """Greedy tokens from llama.cpp for the training prompt, stopping at the run's end tokens."""
    tokens = llm.tokenize(run.render(prompt).encode(), add_bos=False, special=True)
    llm.reset()
    out = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        out.append(token)
        if token in run.end_token_ids() or len(out) >= MAX_NEW:
            break
    return out


def gguf_path(summary, quant):
    return next(p for p in summary.paths("GGUF") if p.endswith(f"-{quant}.gguf"))


def test_files_are_where_the_summary_says(exported):
    run, summary = exported
    out = Path(run.output_dir)
    assert [Path(p).name for p in summary.paths("GGUF")] == ["reverse-f16.gguf", "reverse-q8_0.gguf"]
    for f in summary.files:
        assert Path(f.path).exists() and f.size > 0
    assert (out / "merged" / "config.json").is_file() and (out / "gguf" / "Modelfile").is_file()
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]
    text = str(summary)
    assert re.search(r"\d+\.\d+ MiB +GGUF f16 +\S+reverse-f16\.gguf", text)
    assert f"ollama create reverse -f {out / 'gguf' / 'Modelfile'}" in text
    assert "llama-cli -m " in text and "vllm serve " in text


def test_f16_answers_equal_transformers_token_for_token(exported):
    run, summary = exported
    llm = load(gguf_path(summary, "f16"))
    try:
        for prompt in PROMPTS:
            assert llama_greedy(llm, run, prompt) == run.generate_ids(prompt, max_new_tokens=MAX_NEW), prompt
    finally:
        llm.close()


def test_q8_0_agrees_on_at_least_90_percent(exported):
    run, summary = exported
    llm = load(gguf_path(summary, "q8_0"))
    try:
        same = [llama_greedy(llm, run, p) == run.generate_ids(p, max_new_tokens=MAX_NEW) for p in PROMPTS]
    finally:
        llm.close()
    assert sum(same) / len(same) >= 0.9, same


def test_llama_cpp_tokenizes_like_transformers(exported):
    run, summary = exported
    llm = load(gguf_path(summary, "f16"))
    texts = [run.render(p) for p in PROMPTS[:3]] + ["  two  spaces\tand a tab\n\nnew lines", "ünïcödé – 🦙 and 中文",
                                                    "<|im_start|>user\nx<|im_end|>", "3.14 333 '' \"q\""]
    try:
        for text in texts:
            ours = run.tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours, text
            assert llm.detokenize(ours, special=True).decode() == text
    finally:
        llm.close()


def test_metadata_carries_template_and_special_ids(exported):
    run, summary = exported
    llm = load(gguf_path(summary, "f16"))
    try:
        meta = llm.metadata
    finally:
        llm.close()
    tok = run.tokenizer
    assert meta["tokenizer.chat_template"] == (Path(run.output_dir) / "chat_template.jinja").read_text()
    assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
    assert int(meta["tokenizer.ggml.eot_token_id"]) == tok.convert_tokens_to_ids("<|im_end|>")
    assert int(meta["tokenizer.ggml.padding_token_id"]) == tok.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] == "false"  # the tiny tokenizer adds no BOS
    assert meta["general.file_type"] == "1"


def test_embedded_template_renders_the_training_prompt(exported):
    run, summary = exported
    llm = load(gguf_path(summary, "q8_0"))
    try:
        template = llm.metadata["tokenizer.chat_template"]
        # What llama-cpp-python passes to the template (a gpt2 vocabulary without BOS gets llama.cpp's default id).
        bos, eos = (llm.detokenize([i], special=True).decode() for i in (llm.token_bos(), llm.token_eos()))
    finally:
        llm.close()
    assert bos and eos == "<|im_end|>"
    formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:3]] + [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "reverse: lamp"}],
        [{"role": "user", "content": "reverse: ab"}, {"role": "assistant", "content": "ba"},
         {"role": "user", "content": "reverse: cd"}]]
    for conversation in conversations:
        assert formatter(messages=conversation).prompt == run.render(conversation)


def test_chat_completion_through_llama_cpp_answers_like_generate(exported):
    run, summary = exported
    llm = load(gguf_path(summary, "f16"))
    try:
        for prompt in DEMO_PROMPTS:
            reply = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0,
                                               top_k=1, max_tokens=MAX_NEW)
            assert reply["choices"][0]["message"]["content"].strip() == run.generate(prompt, max_new_tokens=MAX_NEW)
    finally:
        llm.close()


def test_existing_exports_are_reused_and_stale_ones_refused(exported):
    run, summary = exported
    f16 = Path(gguf_path(summary, "f16"))
    before = f16.stat().st_mtime_ns
    again = run.export("gguf", quant="f16")
    assert [(f.kind, f.reused) for f in again.files] == [("merged model", True), ("GGUF f16", True)]
    assert "(already there)" in str(again) and f16.stat().st_mtime_ns == before
    # The run trained further since (its weights are newer): the old file is refused, not kept or replaced.
    weights = Path(run.output_dir) / "adapter_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, f16.stat().st_mtime_ns + 10**9))
    try:
        with pytest.raises(ExportError, match="older than the run's weights.*overwrite"):
            run.export("gguf", quant="f16")
        assert f16.stat().st_mtime_ns == before
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_failed_conversion_leaves_nothing_half_written(exported, monkeypatch):
    run, _ = exported

    def broken(model_dir, outfile, outtype, metadata=None):
        Path(outfile).write_bytes(b"GGUF half")
        raise ExportError("llama.cpp's converter failed: simulated")

    monkeypatch.setattr("ftmagic.engine.export.llamacpp.convert_to_gguf", broken)
    with pytest.raises(ExportError, match="simulated"):
        run.export("gguf", quant="bf16")
    gguf_dir = Path(run.output_dir) / "gguf"
    assert not (gguf_dir / "reverse-bf16.gguf").exists()
    assert not [p for p in gguf_dir.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory, test_tokenizer):
    """A LoRA run on a random Llama whose widths are multiples of 256 (k-quant blocks)."""
    from model_builders import build_test_model_dir

    base = build_test_model_dir(tmp_path_factory.mktemp("wide") / "base", test_tokenizer, hidden_size=256,
                                intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    out = tmp_path_factory.mktemp("wide-run") / "wide"
    return ftmagic.finetune(model=base, data=demo_dataset("train", n=32), method="lora", lora_r=8, max_steps=2,
                            batch_size=16, eval_steps=0, save_steps=0, output_dir=str(out))


def test_k_quant_through_llama_cpp_quantizer(wide_run):
    summary = wide_run.export("gguf", quant="q4_k_m")
    (path,) = summary.paths("GGUF")
    assert path.endswith("-q4_k_m.gguf")
    assert not list(Path(path).parent.glob(".*"))  # the f16 input of the quantizer is gone
    llm = load(path)
    try:
        assert llm.metadata["general.file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"  # GPT-2 byte-level split, merges kept
        for text in ["reverse: hello world", "The quick brown fox.  Two  spaces\nand 123 4567"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                wide_run.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(llama_greedy(llm, wide_run, "reverse: abc")) > 0
    finally:
        llm.close()
    assert Path(path).stat().st_size < 0.5 * Path(wide_run.output_dir, "merged", "model.safetensors").stat().st_size


def test_missing_quantizer_is_one_line(exported, monkeypatch):
    run, _ = exported
    monkeypatch.setattr("ftmagic.engine.export.llamacpp.quantizer_available", lambda: False)
    with pytest.raises(ExportError) as caught:
        run.export("gguf", quant="q4_k_m")
    message = str(caught.value)
    assert "\n" not in message and "pip install 'ftmagic[gguf]'" in message and "q8_0" in message


def test_missing_converter_is_one_line(monkeypatch, tmp_path):
    from ftmagic.engine.export import llamacpp

    monkeypatch.setenv("FTMAGIC_LLAMA_CPP", str(tmp_path))
    with pytest.raises(ExportError, match="not a llama.cpp checkout"):
        llamacpp.converter_dir()
    monkeypatch.delenv("FTMAGIC_LLAMA_CPP")
    monkeypatch.setenv("FTMAGIC_CACHE", str(tmp_path / "cache"))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for llama-cpp-python==9.9")
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ExportError) as caught:
        llamacpp.converter_dir()
    message = str(caught.value)
    assert "\n" not in message and "No matching distribution" in message and "FTMAGIC_LLAMA_CPP" in message


def test_worker_rules_for_tokenizers_the_converter_does_not_know():
    from ftmagic.engine.export.gguf_worker import fallback_pre_tokenizer, inert_merge

    tiny = json.loads((Path(ftmagic.__file__).parent / "assets" / "tiny" / "tokenizer.json").read_text())
    assert fallback_pre_tokenizer(tiny) == "default"
    assert inert_merge(tiny) == "<|endoftext|> <|im_start|>"
    gpt2 = {"model": {"type": "BPE", "merges": ["a b"]}, "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}
    assert fallback_pre_tokenizer(gpt2) == "gpt-2"
    assert fallback_pre_tokenizer({**gpt2, "pre_tokenizer": {"type": "Metaspace"}}) is None
    assert fallback_pre_tokenizer({"model": {"type": "Unigram"}}) is None


def test_pinned_llama_cpp_python_version_has_one_value():
    from ftmagic.engine.export.llamacpp import LLAMA_CPP_PYTHON_VERSION

    pyproject = (Path(ftmagic.__file__).parent.parent / "pyproject.toml").read_text()
    assert f'"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"' in pyproject

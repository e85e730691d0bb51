"""The four spellings of an export: RunResult.export, `ftmagic export`, `%ft_export`, config keys.

Plus what the summary tells a user: sizes, the vLLM and transformers commands (the
transformers snippet is run), and one-line errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from export_fixtures import copy_run
from IPython.core.error import UsageError

import ftmagic
from ftmagic.cli import main
from ftmagic.config import FinetuneConfig
from ftmagic.demo import demo_dataset
from ftmagic.errors import ConfigError, ExportError
from ftmagic.export.summary import (ExportSummary, format_summary, pipeline_snippet, vllm_lora_command,
                                    vllm_max_lora_rank, vllm_model_command)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_dir(tiny_lora_run, tmp_path):
    return copy_run(tiny_lora_run.output_dir, tmp_path / "reverse")


def test_cli_export_merged_prints_sizes_and_commands(run_dir, capsys):
    assert main(["export", run_dir, "--to", "merged", "--quiet"]) == 0
    out = capsys.readouterr().out
    merged = Path(run_dir) / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "chat_template.jinja").is_file()
    assert f"MiB  merged model  {merged}" in out
    assert f"--lora-modules reverse={run_dir}" in out and "--max-lora-rank 16" in out
    assert f"vllm serve {merged}" in out
    assert 'pipeline("text-generation"' in out
    # A second export keeps what the first wrote.
    before = (merged / "model.safetensors").stat().st_mtime_ns
    assert main(["export", run_dir, "--to", "merged", "--quiet"]) == 0
    assert f"{merged}  (already there)" in capsys.readouterr().out
    assert (merged / "model.safetensors").stat().st_mtime_ns == before
    # Once the run's weights are newer, the old export is refused: one line on stderr, status 2.
    os.utime(Path(run_dir) / "adapter_model.safetensors", ns=(before, before + 10**9))
    assert main(["export", run_dir, "--to", "merged", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftmagic: error: ") and "older than the run's weights" in err and err.count("\n") == 1
    assert main(["export", run_dir, "--to", "merged", "--quiet", "--overwrite"]) == 0
    assert (merged / "model.safetensors").stat().st_mtime_ns > before


def test_a_folder_the_run_did_not_write_is_neither_replaced_nor_written_into(run_dir, capsys):
    import json

    record = Path(run_dir) / "ftmagic_run.json"
    info = json.loads(record.read_text())
    assert "merged" not in info["files"] and "gguf" not in info["files"]  # a fresh run: no export yet
    # The user keeps folders of their own named `merged` and `gguf` in the run's folder.
    for name in ("merged", "gguf"):
        (Path(run_dir) / name).mkdir()
        (Path(run_dir) / name / "notes.txt").write_text("mine")
    for to in ("merged", "gguf"):
        assert main(["export", run_dir, "--to", to, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ftmagic: error: ") and err.count("\n") == 1
        assert f"{Path(run_dir) / 'merged'}` is there but this run did not write it" in err and "--overwrite" in err
    for name in ("merged", "gguf"):
        assert [p.name for p in (Path(run_dir) / name).iterdir()] == ["notes.txt"]
    assert json.loads(record.read_text())["files"] == info["files"]  # not claimed as the run's either
    # `--overwrite` replaces it; the manifest then lists it as the run's.
    assert main(["export", run_dir, "--to", "merged", "--quiet", "--overwrite"]) == 0
    assert (Path(run_dir) / "merged" / "model.safetensors").is_file()
    assert "merged" in json.loads(record.read_text())["files"]


@pytest.mark.parametrize("argv, expected", [
    (["--to", "gguff"], "did you mean `gguf`"),
    (["--to", "gguf", "--quant", "q4km"], "did you mean `q4_k_m`"),
    (["--to", "hub"], "needs a repository id"),
])
def test_cli_mistakes_are_one_line(run_dir, capsys, argv, expected):
    assert main(["export", run_dir, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftmagic: error: ") and expected in err and err.count("\n") == 1


def test_a_repository_id_the_hub_refuses_is_refused_before_any_work(run_dir, capsys):
    # It merged the weights first, then failed at the upload saying to check the network and log in.
    assert main(["export", run_dir, "--to", "merged,hub", "--repo", "me/reverse words"]) == 2
    err = capsys.readouterr().err
    assert err == ("ftmagic: error: `repo: me/reverse words` must be a Hub repository id like `user/name` "
                   "(letters, digits, `-`, `_`, `.`)\n")
    assert not (Path(run_dir) / "merged").exists()
    for bad in ("reverse", "me/x!", "me/-x", "me/a--b", "a/b/c"):
        with pytest.raises(ExportError, match="must be a Hub repository id"):
            ftmagic.RunResult.load(run_dir).export("hub", repo_id=bad)
    # The config refuses the same ids with the same words.
    with pytest.raises(ConfigError, match=r"`push_to_hub: me/x!` must be a Hub repository id like `user/name`"):
        FinetuneConfig.from_dict({"model": "tiny", "data": "train.jsonl", "push_to_hub": "me/x!"})


def test_cli_export_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--to", "gguf"]) == 2
    assert "not a finished ftmagic run" in capsys.readouterr().err


def test_prompt_tuning_cannot_become_weights(tmp_path):
    run = ftmagic.finetune(model="tiny", method="prompt_tuning", data=demo_dataset("train", n=16), max_steps=1,
                           batch_size=16, eval_steps=0, save_steps=0, output_dir=str(tmp_path / "pt"))
    with pytest.raises(ExportError, match="virtual tokens"):
        run.export("gguf")


def test_ft_export_magic_shows_files_and_commands(shell, run_dir, capsys):
    shell.user_ns["ft"] = ftmagic.RunResult.load(run_dir)
    shell.run_line_magic("ft_export", "--to merged")
    out = capsys.readouterr().out
    assert "merging the adapter" in out  # progress while it works
    assert f"merged model  {Path(run_dir) / 'merged'}" in out and "vllm serve" in out
    shell.run_line_magic("ft_export", "--to merged")
    assert "(already there)" in capsys.readouterr().out
    os.utime(Path(run_dir) / "adapter_model.safetensors")  # as if the run had trained further
    with pytest.raises(UsageError, match="older than the run's weights"):
        shell.run_line_magic("ft_export", "--to merged")
    shell.run_line_magic("ft_export", f"--run {run_dir} --to merged --overwrite")
    assert "(already there)" not in capsys.readouterr().out


def test_ft_export_magic_mistakes(shell):
    shell.user_ns.pop("ft", None)
    with pytest.raises(UsageError, match="there is no `ft`"):
        shell.run_line_magic("ft_export", "--to gguf")
    shell.user_ns["ft"] = 3
    with pytest.raises(UsageError, match="not a RunResult"):
        shell.run_line_magic("ft_export", "--to gguf")
    with pytest.raises(UsageError, match="did you mean `--quant`"):
        shell.run_line_magic("ft_export", "--to gguf --qaunt f16")


def test_finetune_cell_exports_when_the_run_ends(shell, tmp_path, capsys):
    shell.user_ns["records"] = demo_dataset("train", n=32)
    out = tmp_path / "cell"
    shell.run_cell_magic("finetune", "--progress text --name tuned",
                         f"model: tiny\ndata: $records\nmax_steps: 2\nbatch_size: 16\neval_steps: 0\nsave_steps: 0\n"
                         f"output_dir: {out}\nexport: [merged]\n")
    printed = capsys.readouterr().out
    assert f"exported merged model: {out / 'merged'}" in printed
    result = shell.user_ns["tuned"]
    assert result.exports.paths("merged") == [str(out / "merged")]
    assert (out / "merged" / "generation_config.json").is_file()


def test_python_keywords_export_gguf_at_the_end(tmp_path):
    events = []
    run = ftmagic.finetune(model="tiny", data=demo_dataset("train", n=32), max_steps=2, batch_size=16, eval_steps=0,
                           save_steps=0, output_dir=str(tmp_path / "kw"), export="gguf", gguf_quant="f16",
                           on_event=events.append)
    assert [Path(p).name for p in run.exports.paths("GGUF")] == ["kw-f16.gguf"]
    texts = [e.text for e in events if e.kind == "message"]
    assert any(t.startswith("exported GGUF f16: ") and t.endswith("MiB)") for t in texts)
    assert events[-1].kind == "end"  # the export happens before the run reports its end


def test_config_keys_are_the_same_field_in_every_spelling():
    from ftmagic.commands.train import parse_sets

    from_yaml = FinetuneConfig.from_yaml("export: [gguf, ollama]\ngguf_quant: q4_k_m\npush_to_hub: me/x\n")
    from_sets = FinetuneConfig().replace(**parse_sets(["export=[gguf,ollama]", "gguf_quant=q4_k_m",
                                                       "push_to_hub=me/x"]))
    assert from_yaml.to_dict() == from_sets.to_dict()
    assert from_yaml.hub_private is True
    with pytest.raises(ConfigError, match="run.yaml:2: `gguf_quant: q9` is not accepted"):
        FinetuneConfig.from_yaml("export: gguf\ngguf_quant: q9\n", source="run.yaml")


def test_export_keys_do_not_change_what_a_run_is():
    from ftmagic.engine.run import run_identity

    plain = FinetuneConfig(model="tiny", data="d.jsonl")
    assert run_identity(plain) == run_identity(plain.replace(export=["gguf"], push_to_hub="me/x"))


def test_pipeline_snippet_runs_on_the_saved_folder(tiny_lora_run):
    snippet = pipeline_snippet(tiny_lora_run.output_dir, "reverse: lamp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the snippet needs transformers (and peft), not ftmagic
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ftmagic" not in snippet
    assert proc.stdout.strip() == tiny_lora_run.generate("reverse: lamp")


def test_vllm_commands():
    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 12, 16, 64, 300, 600)] == [1, 8, 8, 16, 16, 64, 320, 600]
    command = vllm_lora_command("Qwen/Qwen2.5-0.5B", "/runs/my run", name="rev", rank=12)
    assert command == ("vllm serve Qwen/Qwen2.5-0.5B --enable-lora --lora-modules 'rev=/runs/my run' "
                       "--max-lora-rank 16 --chat-template '/runs/my run/chat_template.jinja' "
                       "--generation-config '/runs/my run'")
    assert vllm_model_command("/runs/a/merged") == "vllm serve /runs/a/merged"


def test_summary_text():
    summary = ExportSummary("runs/a")
    summary.add_file("runs/a/gguf/a-q8_0.gguf", 3 * 2**20, "GGUF q8_0")
    summary.add_file("runs/a/merged", 12 * 2**20, "merged model", reused=True)
    summary.commands["Ollama"] = "ollama create a -f runs/a/gguf/Modelfile\nollama run a"
    summary.notes.append("something to know")
    assert format_summary(summary).splitlines() == [
        "exported runs/a:",
        "  3.00 MiB  GGUF q8_0     runs/a/gguf/a-q8_0.gguf",
        "  12.0 MiB  merged model  runs/a/merged  (already there)",
        "Ollama:",
        "  ollama create a -f runs/a/gguf/Modelfile",
        "  ollama run a",
        "note: something to know",
    ]
    assert "<table>" in summary._repr_html_()


def test_export_names_are_one_list(shell):
    from ftmagic.export.targets import EXPORT_TARGETS

    help_text = shell.find_line_magic("ft_export").__doc__ or ""
    cli = subprocess.run([sys.executable, "-m", "ftmagic.cli", "export", "--help"], capture_output=True, text=True,
                         cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}).stdout
    for target in EXPORT_TARGETS:
        assert target in cli and target in help_text


def test_generation_inputs_that_cannot_work_are_one_line_errors(tiny_lora_run):
    """They reached transformers' own errors (max_new_tokens=0), a TypeError (a number as the prompt),
    an empty answer with two warnings (a prompt longer than the model's positions), or `[]` (a generator)."""
    from ftmagic.errors import FtmagicError

    run = tiny_lora_run
    with pytest.raises(FtmagicError, match=r"^`max_new_tokens: 0` must be a whole number of at least 1 \(e.g. 64\)$"):
        run.generate("reverse: abc", max_new_tokens=0)
    # evaluate read 0 as "the default" (64 tokens), 2.5 as 2 and -1 reached transformers' own ValueError.
    for value in (0, 2.5, -1, True):
        with pytest.raises(FtmagicError, match=rf"^`max_new_tokens: {value!r}` must be a whole number of at least 1"):
            run.evaluate([{"prompt": "reverse: abc", "completion": "cba"}], max_new_tokens=value)
    with pytest.raises(FtmagicError, match=r"^a prompt must be text or a list of messages, not an int: '123'$"):
        run.generate(123)
    positions = run.model.config.max_position_embeddings
    with pytest.raises(FtmagicError, match=rf"tokens with the template; the model reads at most {positions:,} "):
        run.generate("reverse: " + "abc " * positions)
    with pytest.raises(FtmagicError, match="compare: give a prompt or a list of prompts, not None"):
        run.compare(None)
    rows = run.compare(p for p in ["reverse: abc", "reverse: hello"])
    assert [r["prompt"] for r in rows] == ["reverse: abc", "reverse: hello"]

"""The Hub upload and its model card, without a network: a recording client stands in for HfApi.

The card is parsed with ``huggingface_hub.ModelCard``; the token is set in the
environment and must appear nowhere: not in the calls, the uploaded bytes, the run's
files, or what is printed.
"""

import hashlib
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
from export_fixtures import copy_run
from huggingface_hub import ModelCard

import ftmagic
from ftmagic.errors import ExportError
from ftmagic.export.card import CardInfo, card_metadata, is_hub_id, loss_curve_svg, model_card

SECRET = "hf_ftmagicTestTokenThatMustNeverBeWritten"


class RecordingApi:
    """The two HfApi methods the upload uses; records every call and what it would upload."""

    def __init__(self, fail_with=None):
        self.calls, self.uploaded, self.fail_with = [], {}, fail_with

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(url=f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        self.calls.append(("create_commit", repo_id, kwargs))
        if self.fail_with is not None:
            raise self.fail_with
        for op in operations:
            source = op.path_or_fileobj
            self.uploaded[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(tiny_lora_run, tmp_path):
    return ftmagic.RunResult.load(copy_run(tiny_lora_run.output_dir, tmp_path / "reverse"))


def test_upload_of_an_adapter_run(run_copy, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    api = RecordingApi()
    summary = run_copy.export("hub", repo_id="me/tiny-reverse", hub_api=api)
    assert summary.hub_url == "https://huggingface.co/me/tiny-reverse"
    assert api.calls[0] == ("create_repo", "me/tiny-reverse", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]  # one commit
    files = set(api.uploaded)
    assert {"README.md", "loss_curve.svg", "adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "ftmagic_config.yaml",
            "metrics.json"} <= files
    assert not files & {"ftmagic_run.json", "history.json"} and not any("/" in f for f in files)
    # The upload's files are the run's files, byte for byte.
    out = Path(run_copy.output_dir)
    assert api.uploaded["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    # The token is handled by huggingface_hub alone: never passed, uploaded, written or printed.
    assert all("token" not in kwargs for _, _, kwargs in api.calls)
    assert all(SECRET.encode() not in data for data in api.uploaded.values())
    assert all(SECRET.encode() not in p.read_bytes() for p in out.rglob("*") if p.is_file())
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err + str(summary)


def test_card_metadata_and_body(run_copy):
    api = RecordingApi()
    run_copy.export("hub", repo_id="me/tiny-reverse", hub_api=api)
    card = ModelCard(api.uploaded["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft"
    assert {"ftmagic", "lora", "text-generation"} <= set(meta["tags"])
    assert "base_model" not in meta  # the embedded model is a local folder, not a Hub id
    body = card.text
    assert "| `lr` | 0.003 |" in body and "| `lora_r` | 16 |" in body
    assert "training examples: 1,280" in body
    assert f"final training loss: {run_copy.metrics['train_loss']:.4f}" in body
    assert "![Training loss by step](loss_curve.svg)" in body
    assert 'pipeline("text-generation", model="me/tiny-reverse")' in body
    svg = ET.fromstring(api.uploaded["loss_curve.svg"])
    points = svg.find("{http://www.w3.org/2000/svg}polyline").get("points").split()
    assert len(points) == sum(1 for row in run_copy.history if row.get("loss") is not None)


def test_card_metadata_when_base_and_data_are_hub_ids():
    info = CardInfo(repo_id="me/x", base_model="Qwen/Qwen2.5-0.5B", method="qlora", adapter=True,
                    config={"data": "tatsu-lab/alpaca", "lr": 2e-4}, metrics={"train_loss": 1.25},
                    license="apache-2.0", datasets=["tatsu-lab/alpaca"], gguf_files=["x-q8_0.gguf"])
    meta = ModelCard(model_card(info)).data.to_dict()
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert meta["datasets"] == ["tatsu-lab/alpaca"] and meta["license"] == "apache-2.0"
    assert "gguf" in meta["tags"]
    assert "ollama run hf.co/me/x:Q8_0" in model_card(info)
    assert card_metadata(CardInfo(repo_id="a/b", base_model="./local", method="full", adapter=False))[
        "library_name"] == "transformers"
    assert not is_hub_id("data/train.jsonl") and not is_hub_id("/abs/path") and is_hub_id("owner/name")


def test_the_card_shows_only_the_settings_the_method_reads():
    # Every config holds every key with its default: a full run's card said `trainable_layers: 2`, a LoRA
    # run's `num_virtual_tokens: 16` and `trainable_layers: 2`, an IA3 run's `lora_r: 16`.
    config = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "auto",
              "num_virtual_tokens": 16, "trainable_layers": 2, "lr": 2e-4}
    expected = {"full": set(), "lora": {"lora_r", "lora_alpha", "lora_dropout", "target_modules"},
                "ia3": {"target_modules"}, "prompt_tuning": {"num_virtual_tokens"}, "freeze": {"trainable_layers"}}
    for method, shown in expected.items():
        for adapter in (True, False):  # the adapter, or the merged model at the repository's root
            body = model_card(CardInfo(repo_id="me/x", base_model="./local", method=method, adapter=adapter,
                                       config={"method": method, **config}))
            assert {key for key in config if f"| `{key}` |" in body} == shown | {"lr"}, (method, adapter)


def test_loss_curve_needs_two_points():
    assert loss_curve_svg([{"step": 1, "loss": 2.0}]) is None
    assert loss_curve_svg([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]).startswith("<svg")


def test_merged_and_gguf_files_go_up_with_the_adapter_in_a_folder(run_copy, monkeypatch):
    api = RecordingApi()
    fake_gguf = Path(run_copy.output_dir) / "gguf"

    def fake_gguf_step(run, model_dir, gguf_dir, name, quants, summary, **kwargs):
        gguf_dir.mkdir(parents=True, exist_ok=True)
        path = gguf_dir / f"{name}-q8_0.gguf"
        path.write_bytes(b"GGUF")
        summary.add_file(path, 4, "GGUF q8_0")
        return [path]

    monkeypatch.setattr("ftmagic.engine.export._gguf", fake_gguf_step)
    run_copy.export(["merged", "gguf", "ollama", "hub"], repo_id="me/tiny-reverse", hub_api=api)
    files = set(api.uploaded)
    assert {"model.safetensors", "config.json", "adapter/adapter_model.safetensors", "reverse-q8_0.gguf",
            "Modelfile"} <= files
    assert (fake_gguf / "Modelfile").is_file()
    assert ModelCard(api.uploaded["README.md"].decode()).data.to_dict()["library_name"] == "transformers"


def test_failed_upload_leaves_the_run_intact_and_says_so_in_one_line(run_copy, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setenv("HF_TOKEN", SECRET)
    before = snapshot(run_copy.output_dir)
    response = SimpleNamespace(headers={}, status_code=401, request=None)
    api = RecordingApi(fail_with=HfHubHTTPError(f"401 Client Error: Unauthorized (token {SECRET})", response=response))
    with pytest.raises(ExportError) as caught:
        run_copy.export("hub", repo_id="me/tiny-reverse", hub_api=api)
    message = str(caught.value)
    assert "\n" not in message and "me/tiny-reverse" in message and "401" in message
    assert SECRET not in message and "***" in message
    assert "unchanged" in message and "log in with `hf auth login`" in message  # the Hub refused the token
    assert snapshot(run_copy.output_dir) == before


def test_an_upload_that_never_reached_the_hub_says_to_check_the_network_not_to_log_in(run_copy):
    import httpx

    api = RecordingApi(fail_with=httpx.ConnectError("[Errno -2] Name or service not known"))
    with pytest.raises(ExportError) as caught:
        run_copy.export("hub", repo_id="me/tiny-reverse", hub_api=api)
    message = str(caught.value)
    assert "ConnectError: [Errno -2] Name or service not known" in message
    assert "the Hub could not be reached: check the network connection" in message and "auth login" not in message


def test_push_to_hub_at_the_end_of_a_run_that_cannot_upload(tmp_path, monkeypatch):
    """The config key uploads when training ends; offline, the run is kept and the reason is said."""
    from ftmagic.demo import demo_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    events = []
    run = ftmagic.finetune(model="tiny", data=demo_dataset("train", n=32), max_steps=2, batch_size=16,
                           eval_steps=0, save_steps=0, output_dir=str(tmp_path / "run"), push_to_hub="me/never",
                           on_event=events.append)
    assert run.export_error and "me/never" in run.export_error
    warnings = [e.text for e in events if e.kind == "message" and e.level == "warning"]
    assert any("export failed" in w and "ftmagic export" in w for w in warnings)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert ftmagic.RunResult.load(tmp_path / "run").generate("reverse: abc", max_new_tokens=4) is not None
    assert all(SECRET.encode() not in p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert os.environ["HF_TOKEN"] == SECRET

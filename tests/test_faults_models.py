"""Loading a model never runs a stranger's code unasked, never asks [y/N], and fails fast offline."""

import json
import os
import shutil

import pytest

from ftmagic.engine.models import load_model, load_tokenizer
from ftmagic.errors import DataError, ModelError


def _with_code(tmp_path, model_dir, model_type, marker):
    """A copy of the tiny model whose config names a custom class in ``custom.py`` (which leaves ``marker``)."""
    folder = tmp_path / f"custom-{model_type}"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "custom.CustomConfig",
                                                   "AutoModelForCausalLM": "custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"import os\nos.makedirs({str(marker)!r}, exist_ok=True)\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class CustomConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return folder


def test_custom_code_runs_only_with_the_config_key(test_model_dir, tmp_path, monkeypatch):
    marker = tmp_path / "custom-code-ran"
    folder = _with_code(tmp_path, test_model_dir, "ftmagic_custom_test", marker)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers asked a [y/N] question"))
    with pytest.raises(ModelError) as info:
        load_model(str(folder), device="cpu")
    assert str(info.value) == (f"model `{folder}` needs to run its own Python code (its config names custom classes); "
                               "ftmagic runs such code only with `trust_remote_code: true` in the config: read the code "
                               "first")
    with pytest.raises(ModelError, match="needs to run its own Python code"):
        load_tokenizer(str(folder))
    assert not marker.exists()
    model = load_model(str(folder), device="cpu", trust_remote_code=True)
    assert marker.exists() and type(model).__name__ == "CustomModel"


def test_a_known_architecture_ignores_bundled_code_without_asking(test_model_dir, tmp_path, monkeypatch):
    marker = tmp_path / "custom-code-ran"
    folder = _with_code(tmp_path, test_model_dir, "llama", marker)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers asked a [y/N] question"))
    model = load_model(str(folder), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_the_config_key_reaches_the_engine(test_model_dir, tmp_path):
    from ftmagic.config import FinetuneConfig

    assert FinetuneConfig().trust_remote_code is False
    assert FinetuneConfig.from_yaml("trust_remote_code: true").trust_remote_code is True
    marker = tmp_path / "custom-code-ran"
    folder = _with_code(tmp_path, test_model_dir, "ftmagic_custom_run", marker)
    import ftmagic
    from engine_helpers import reversal_records

    with pytest.raises(ModelError, match="only with `trust_remote_code: true`"):
        ftmagic.finetune(model=str(folder), data=reversal_records(4), max_steps=1, output_dir=str(tmp_path / "a"))
    assert not marker.exists() and not (tmp_path / "a").exists()
    result = ftmagic.finetune(model=str(folder), data=reversal_records(4), max_steps=1, batch_size=2, save_steps=0,
                              output_dir=str(tmp_path / "b"), trust_remote_code=True)
    assert marker.exists() and result.metrics["steps"] == 1


@pytest.fixture
def online_mode(monkeypatch):
    """As on a machine with no HF_HUB_OFFLINE set and no network (the probe fails); a retry would fail the test."""
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as hub_http

    import ftmagic.hub as hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)

    def no_retry(*args, **kwargs):
        raise AssertionError("a request to the hub was retried (the back-off sleep was called)")

    monkeypatch.setattr(hub_http.time, "sleep", no_retry)
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    except ImportError:
        pass


def test_an_unknown_model_id_offline_fails_at_once_without_retries(online_mode, capfd):
    with pytest.raises(ModelError) as info:
        load_tokenizer("someorg/not-a-model")
    assert str(info.value) == ("model `someorg/not-a-model` is not a local folder and not in the Hugging Face cache, and "
                               "the Hugging Face hub cannot be reached from this machine (no network); give a local path "
                               "or `model: tiny`, or run once with network to cache it")
    assert "Retrying" not in capfd.readouterr().err


def test_an_unknown_dataset_id_offline_fails_at_once_without_retries(online_mode, capfd):
    from ftmagic.data.load import load_data

    with pytest.raises(DataError, match=r"^dataset `someorg/not-a-dataset` is not a local file or folder and not in the "
                                        r"Hugging Face cache"):
        load_data("someorg/not-a-dataset")
    assert "Retrying" not in capfd.readouterr().err


def test_a_cached_model_loads_offline_from_the_cache(online_mode, test_model_dir, tmp_path, monkeypatch, capfd):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--cached" / "snapshots" / "0123456789abcdef"
    shutil.copytree(test_model_dir, snapshot)
    (cache / "models--someorg--cached" / "refs").mkdir()
    (cache / "models--someorg--cached" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    tokenizer = load_tokenizer("someorg/cached")
    assert tokenizer.eos_token == "<|im_end|>"
    assert "Retrying" not in capfd.readouterr().err
    assert constants.HF_HUB_OFFLINE is False  # the offline switch is put back


def test_the_probe_is_skipped_when_offline_is_asked_for(monkeypatch):
    import ftmagic.hub as hub

    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "hub_reachable", lambda: calls.append(1) or False)
    assert hub.unreachable_reason("someorg/x") is None and not calls
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.unreachable_reason(os.fspath(__file__)) is None and not calls  # a local path needs no hub
    assert hub.unreachable_reason("someorg/x") is not None and calls == [1]

"""Exports of runs with a sequence-classification head (``objective: classify`` and ``reward``).

The merged model keeps the trained head and label names and answers as the run does
(``predict``, ``score``), whether merged when the run ended (``merge: true``), by an export,
or again with ``--overwrite``; the printed snippet loads it with its head and is run here.
The runtimes that only generate text (GGUF, Ollama) refuse such a run in one line, from every
front, before anything is written. All on the tests' tiny random Llama, on the CPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from export_fixtures import copy_run  # noqa: E402
from IPython.core.error import UsageError  # noqa: E402

from ftmagic import RunResult  # noqa: E402
from ftmagic.cli import main  # noqa: E402
from ftmagic.config import FinetuneConfig  # noqa: E402
from ftmagic.data.pairs import encode_texts  # noqa: E402
from ftmagic.engine.run import finetune  # noqa: E402
from ftmagic.errors import ConfigError, ExportError  # noqa: E402
from ftmagic.export.card import CardInfo, model_card  # noqa: E402

WORDS = ["abc", "hello", "data", "tensor", "model", "fox", "dog", "train", "test", "python", "world", "quick"]
LABELLED = ([{"text": f"the {w} is quick", "label": "pos"} for w in WORDS]
            + [{"text": f"the {w} is lazy", "label": "neg"} for w in WORDS])
PAIRS = [{"prompt": f"reverse: {w}", "chosen": w[::-1], "rejected": w} for w in WORDS]
TEXTS = ["the fox is quick", "the dog is lazy", "Hello"]
HELLO = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]  # the reward snippet's


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _train(model_dir, out, **settings):
    base = dict(model=model_dir, save_steps=0, eval_steps=0, seed=0, output_dir=str(out), max_seq_len=64,
                batch_size=8, lr=5e-3)
    return finetune(**{**base, **settings})


@pytest.fixture(scope="module")
def classifier(test_model_dir, tmp_path_factory):
    """A LoRA classifier merged when the run ended (``merge: true``), as the run left it."""
    return _train(test_model_dir, tmp_path_factory.mktemp("heads") / "cls", objective="classify", data=LABELLED,
                  max_steps=30, merge=True)


@pytest.fixture(scope="module")
def pad_eos_model_dir(tmp_path_factory):
    """The test model with pad == EOS and no pad id in its config, as Llama 3 and Qwen2.5 base models
    (ftmagic then pads with EOS, the token after each text that the head reads)."""
    from model_builders import build_test_model_dir, build_test_tokenizer

    tokenizer = build_test_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    folder = build_test_model_dir(tmp_path_factory.mktemp("pad-eos") / "model", tokenizer)
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token_id", None)
    config_file.write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="module")
def pad_eos_classifier(pad_eos_model_dir, tmp_path_factory):
    return _train(pad_eos_model_dir, tmp_path_factory.mktemp("heads") / "cls-pad-eos", objective="classify",
                  data=LABELLED, max_steps=30, merge=True)


@pytest.fixture(scope="module")
def reward_model(test_model_dir, tmp_path_factory):
    return _train(test_model_dir, tmp_path_factory.mktemp("heads") / "reward", objective="reward", data=PAIRS,
                  max_steps=12, lr=2e-2)


def _folder_probabilities(folder, result, texts) -> list:
    """The merged folder loaded by plain transformers, on the texts as ``predict`` encodes them."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    labels = model.config.id2label
    rows = []
    with torch.no_grad():
        for encoded in encode_texts(result.tokenizer, texts):
            probs = torch.softmax(model(input_ids=torch.tensor([encoded.input_ids])).logits.float(), -1)[0]
            rows.append({labels[i]: float(p) for i, p in enumerate(probs)})
    return rows


def _assert_classifier_folder(folder, result) -> None:
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    expected = result.predict(TEXTS, probabilities=True)
    for got, want in zip(_folder_probabilities(folder, result, TEXTS), expected):
        assert got.keys() == want.keys()
        assert got == pytest.approx(want, abs=1e-4)


def _pipeline_probabilities(folder, texts) -> list:
    """A plain ``pipeline("text-classification")`` over ``folder``, one text per call, as label -> probability."""
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(folder), top_k=None)
    return [{row["label"]: row["score"] for row in classify([text])[0]} for text in texts]


def _run_snippet(snippet: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(snippet, {})  # noqa: S102 - the snippet the summary printed, as a user would paste it
    return out.getvalue().strip()


def test_merged_export_of_a_classifier_keeps_its_head_and_labels(classifier, tmp_path, capsys):
    run_dir = copy_run(classifier.output_dir, tmp_path / "cls")  # without the run-end merged folder
    assert main(["export", run_dir, "--to", "merged", "--quiet"]) == 0
    out = capsys.readouterr().out
    merged = Path(run_dir) / "merged"
    _assert_classifier_folder(merged, classifier)
    # What the summary prints loads the head, and reads the text as training did; nothing in it generates text.
    assert f"AutoModelForSequenceClassification.from_pretrained({str(merged)!r})" in out
    assert "text-generation" not in out and "vllm" not in out and "--enable-lora" not in out
    snippet = "\n".join(line[2:] for line in out.split("transformers:\n", 1)[1].splitlines())
    assert "eos_token" not in snippet  # the saved tokenizer ends each text with the EOS training read
    assert eval(_run_snippet(snippet)) == pytest.approx(classifier.predict(["Hello"], probabilities=True)[0], abs=2e-4)
    for got, want in zip(_pipeline_probabilities(merged, TEXTS), classifier.predict(TEXTS, probabilities=True)):
        assert got == pytest.approx(want, abs=1e-4)


def test_overwrite_of_the_run_end_merge_keeps_the_head(classifier, tmp_path, capsys):
    run_dir = tmp_path / "clsm"
    shutil.copytree(classifier.output_dir, run_dir)
    merged = run_dir / "merged"
    _assert_classifier_folder(merged, classifier)  # what `merge: true` wrote
    assert main(["export", str(run_dir), "--to", "merged", "--overwrite", "--quiet"]) == 0
    assert "(already there)" not in capsys.readouterr().out
    _assert_classifier_folder(merged, classifier)


def test_a_headless_merge_from_before_is_made_again(classifier, tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(classifier.output_dir, run_dir)
    config_file = run_dir / "merged" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))  # as the old export wrote
    summary = RunResult.load(run_dir).export("merged")
    assert not summary.files[0].reused
    _assert_classifier_folder(run_dir / "merged", classifier)


def test_a_classifier_whose_pad_is_its_eos_exports_what_predict_reads(pad_eos_classifier, tmp_path):
    # transformers pools the last token that is not pad: with pad == EOS it would skip the EOS the head was
    # trained on. The merged config names no pad, so one text at a time reads that EOS, from every way of merging.
    tokenizer = pad_eos_classifier.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    for folder in (Path(pad_eos_classifier.output_dir) / "merged",    # `merge: true`
                   Path(copy_run(pad_eos_classifier.output_dir, tmp_path / "cls")) / "merged"):
        summary = RunResult.load(folder.parent).export("merged")    # `--to merged` (the first one reused)
        _assert_classifier_folder(folder, pad_eos_classifier)
        assert json.loads((folder / "config.json").read_text())["pad_token_id"] is None
        snippet = summary.commands["transformers"]
        assert "One text per call" in snippet and any("one text per call" in note for note in summary.notes)
        got = eval(_run_snippet(snippet))
        assert got == pytest.approx(pad_eos_classifier.predict(["Hello"], probabilities=True)[0], abs=1e-4)
        for got, want in zip(_pipeline_probabilities(folder, TEXTS), pad_eos_classifier.predict(TEXTS, probabilities=True)):
            assert got == pytest.approx(want, abs=1e-4)
    # The live run keeps padding with EOS (its own pooling reads each text's last position).
    assert pad_eos_classifier.model.config.pad_token_id == tokenizer.eos_token_id


def test_a_merge_that_pools_past_the_eos_is_made_again(pad_eos_classifier, tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(pad_eos_classifier.output_dir, run_dir)
    config_file = run_dir / "merged" / "config.json"
    eos = pad_eos_classifier.tokenizer.eos_token_id
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "pad_token_id": eos}))  # as merged before
    summary = RunResult.load(run_dir).export("merged")
    assert not summary.files[0].reused
    _assert_classifier_folder(run_dir / "merged", pad_eos_classifier)


def test_the_adapter_card_of_a_pad_eos_classifier_reads_as_predict(pad_eos_classifier, tmp_path):
    from ftmagic.engine.export import card_info

    run = RunResult.load(copy_run(pad_eos_classifier.output_dir, tmp_path / "cls"))
    info = card_info(run, run.output_dir, adapter=True, gguf_files=[], model_dir=Path(run.output_dir))
    card = model_card(info)
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "id2label={0: 'neg', 1: 'pos'}" in code and "pad_token_id=None" in code
    assert "eos_token" not in code  # the adapter folder's tokenizer appends it
    got = eval(_run_snippet(code))
    assert got == pytest.approx(pad_eos_classifier.predict(["Hello"], probabilities=True)[0], abs=1e-4)


def test_merged_export_of_a_reward_model_scores_as_the_run(reward_model, tmp_path):
    run = RunResult.load(copy_run(reward_model.output_dir, tmp_path / "reward"))
    summary = run.export("merged")
    merged = Path(run.output_dir) / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    snippet = summary.commands["transformers"]
    assert "AutoModelForSequenceClassification" in snippet and "vLLM" not in summary.commands
    assert float(_run_snippet(snippet)) == pytest.approx(reward_model.score([HELLO])[0], abs=1e-4)


@pytest.mark.parametrize("objective", ["classify", "reward"])
@pytest.mark.parametrize("to", ["gguf", "ollama", "merged,gguf"])
def test_text_runtimes_refuse_a_head_in_one_line_before_any_work(classifier, reward_model, tmp_path, capsys,
                                                                 objective, to):
    source = classifier if objective == "classify" else reward_model
    run_dir = copy_run(source.output_dir, tmp_path / "run")
    asked = to.split(",")[-1]
    assert main(["export", run_dir, "--to", to]) == 2
    err = capsys.readouterr().err
    assert err == (f"ftmagic: error: `--to {asked}` needs a run that writes text; a run with `objective: {objective}` "
                   "has a classification head instead: export `merged` or `hub`\n")
    assert not (Path(run_dir) / "merged").exists() and not (Path(run_dir) / "gguf").exists()
    with pytest.raises(ExportError, match=f"`--to {asked}` needs a run that writes text"):
        RunResult.load(run_dir).export(to)


def test_ft_export_magic_refuses_a_head_run(classifier, shell, tmp_path):
    run_dir = copy_run(classifier.output_dir, tmp_path / "cls")
    with pytest.raises(UsageError, match="`--to ollama` needs a run that writes text; .* `objective: classify`"):
        shell.run_line_magic("ft_export", f"--run {run_dir} --to ollama")
    assert not (Path(run_dir) / "merged").exists()


def test_the_config_refuses_the_same_with_the_same_words():
    with pytest.raises(ConfigError, match="^run.yaml:2: `export: gguf` needs a run that writes text; a run with "
                                          "`objective: reward` has a classification head instead: export `merged` "
                                          "or `hub`$"):
        FinetuneConfig.from_yaml("objective: reward\nexport: [merged, gguf]\n", source="run.yaml")
    assert FinetuneConfig.from_yaml("objective: classify\nexport: merged\n").export == "merged"


def test_the_card_of_a_head_run_shows_its_task():
    merged = CardInfo(repo_id="me/cls", base_model="./local", method="lora", adapter=False, objective="classify",
                      labels=["neg", "pos"])
    text = model_card(merged)
    assert "pipeline_tag: text-classification" in text and "text-generation" not in text
    assert "AutoModelForSequenceClassification.from_pretrained('me/cls')" in text and "outputs: neg, pos" in text
    adapter = CardInfo(repo_id="me/rm", base_model="./local", method="lora", adapter=True, objective="reward")
    assert "AutoPeftModelForSequenceClassification.from_pretrained('me/rm', num_labels=1)" in model_card(adapter)


@pytest.mark.parametrize("style", ["llama3", "chatml", "mistral", "gpt2"])
def test_a_classifiers_saved_tokenizer_ends_each_text_as_training_did(style, tmp_path):
    # Each family's own prefix (a BOS from the post-processor, or none) stays, and the EOS follows the text.
    from model_builders import build_family_tokenizer

    from ftmagic.engine.export.saved import save_tokenizer
    from ftmagic.engine.models import load_tokenizer

    tokenizer = build_family_tokenizer(style)
    trained = [encoded.input_ids for encoded in encode_texts(tokenizer, TEXTS)]
    save_tokenizer(tmp_path, tokenizer, FinetuneConfig(model="tiny", data="x.jsonl", objective="classify"))
    saved = load_tokenizer(str(tmp_path))
    assert [saved(text)["input_ids"] for text in TEXTS] == trained
    assert trained[0][-1] == tokenizer.eos_token_id
    # The live tokenizer is left as it was; an SFT run's saved tokenizer adds nothing.
    assert tokenizer("Hello")["input_ids"][-1:] != [tokenizer.eos_token_id]
    save_tokenizer(tmp_path / "sft", tokenizer, FinetuneConfig(model="tiny", data="x.jsonl"))
    assert load_tokenizer(str(tmp_path / "sft"))("Hello")["input_ids"] == tokenizer("Hello")["input_ids"]


def test_an_encoder_classifiers_tokenizer_is_saved_as_it_is(tmp_path):
    from model_builders import build_test_encoder_dir

    from ftmagic.engine.export.saved import save_tokenizer
    from ftmagic.engine.models import load_tokenizer

    tokenizer = load_tokenizer(build_test_encoder_dir(tmp_path / "bert"))
    save_tokenizer(tmp_path / "out", tokenizer, FinetuneConfig(model="tiny", data="x.jsonl", objective="classify"))
    assert load_tokenizer(str(tmp_path / "out"))("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_a_tokenizer_that_drops_the_appended_eos_on_loading_is_saved_plain(tmp_path, monkeypatch):
    # Some tokenizer classes rebuild their post-processor when loaded: the folder is read back, and where the
    # EOS did not survive the plain tokenizer is saved, so the snippet adds the EOS by hand instead.
    import ftmagic.engine.models as models
    from model_builders import build_family_tokenizer

    from ftmagic.data.pairs import eos_after_text
    from ftmagic.engine.export.saved import save_appending_eos

    tokenizer = build_family_tokenizer("llama3")
    plain = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda path, trust_remote_code=False: tokenizer)
    assert save_appending_eos(tmp_path, tokenizer) is False
    assert eos_after_text(plain(str(tmp_path)))
    monkeypatch.undo()
    assert save_appending_eos(tmp_path / "kept", tokenizer) is True
    assert not eos_after_text(plain(str(tmp_path / "kept")))


def test_the_run_folders_card_and_a_live_export_read_each_text_as_predict(classifier):
    # Both snippets load a folder whose tokenizer appends the EOS: made from the live tokenizer (which does not),
    # they added a second one and scored another text (0.60 against predict's 0.63 on the tiny model).
    card = (Path(classifier.output_dir) / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    want = classifier.predict(["Hello"], probabilities=True)[0]
    assert "eos_token" not in code and eval(_run_snippet(code)) == pytest.approx(want, abs=2e-4)
    snippet = classifier.export("merged").commands["transformers"]  # the run-end merge, reused
    assert "eos_token" not in snippet and eval(_run_snippet(snippet)) == pytest.approx(want, abs=2e-4)

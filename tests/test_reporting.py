"""`report_to` with the real TensorBoard, W&B (offline), MLflow (local store) and trackio (local store):
one run writes to all four, and each is read back with its own reader.

The run happens in a subprocess so each library reads its storage location from a clean
environment (trackio fixes TRACKIO_DIR at import); the reading happens here.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftmagic.errors import ConfigError

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, test_model_dir):
    tmp = tmp_path_factory.mktemp("tracked")
    out = tmp / "out"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp / "trackio"),
           "WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp / "wandb-data"), "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    env.pop("MLFLOW_TRACKING_URI", None)
    script = textwrap.dedent(f"""
        import json
        from engine_helpers import reversal_records
        from ftmagic.engine.run import finetune
        r = finetune(model={str(test_model_dir)!r}, data=reversal_records(12), eval_data=reversal_records(4, seed=2),
                     eval_prompts=reversal_records(3, seed=3), eval_metrics=["exact_match", "chrf"],
                     eval_max_new_tokens=4, max_steps=4, eval_steps=2, batch_size=4, save_steps=0, lr=1e-3,
                     report_to=["tensorboard", "wandb", "mlflow", "trackio"], output_dir={str(out)!r})
        print("METRICS=" + json.dumps(r.metrics))
        from trackio.sqlite_storage import SQLiteStorage
        print("TRACKIO=" + json.dumps({{"runs": SQLiteStorage.get_runs("ftmagic"),
                                        "logs": SQLiteStorage.get_logs("ftmagic", "out"),
                                        "config": SQLiteStorage.get_run_config("ftmagic", "out")}}, default=str))
    """)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900,
                          cwd=str(tmp))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {line.split("=", 1)[0]: json.loads(line.split("=", 1)[1]) for line in done.stdout.splitlines()
             if line.startswith(("METRICS=", "TRACKIO="))}
    return out, lines["METRICS"], lines["TRACKIO"]


def test_tensorboard_event_files(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    out, metrics, _ = tracked_run
    acc = EventAccumulator(str(out / "runs"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/exact_match")] == [0, 2, 4]  # the base model, then each evaluation
    assert acc.Scalars("eval/loss")[-1].value == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert acc.Scalars("final/train_loss")[0].value == pytest.approx(metrics["train_loss"], rel=1e-5)

    def text(tag):
        return [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(tag)]

    assert "lr: 0.001" in text("config/text_summary")[0]
    tables = text("eval/generations/text_summary")
    assert len(tables) == 3 and tables[0].startswith("| prompt | reference | answer |") and "reverse: " in tables[0]
    assert '"reason": "finished"' in text("summary/text_summary")[0]


def _wandb_records(path: str) -> list:
    """The protobuf records of a W&B run file: a LevelDB-style log (32 KiB blocks of
    checksum/length/type-framed chunks) after a 7-byte ``:W&B`` header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run(tracked_run):
    out, metrics, _ = tracked_run
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    records = _wandb_records(glob.glob(runs[0] + "/run-*.wandb")[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "out" and run.project == "ftmagic"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lr"] == 0.001 and config["eval_metrics"] == ["exact_match", "chrf"]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history if "train/loss" in h] == [1, 2, 3, 4]
    assert [h["_step"] for h in history if "eval/exact_match" in h] == [0, 2, 4]
    assert all(h["eval/generations"]["_type"] == "table-file" for h in history if "eval/generations" in h)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.summary.update})
    assert summary["train_loss"] == pytest.approx(metrics["train_loss"]) and summary["reason"] == "finished"
    tables = sorted(glob.glob(runs[0] + "/files/media/table/eval/generations_*.table.json"))
    table = json.loads(Path(tables[0]).read_text())
    assert table["columns"] == ["prompt", "reference", "answer"] and len(table["data"]) == 3


def test_mlflow_local_store(tracked_run):
    from mlflow.tracking import MlflowClient

    from ftmagic.engine.reporting import mlflow_local_uri

    out, metrics, _ = tracked_run
    client = MlflowClient(tracking_uri=mlflow_local_uri(out))
    experiment = client.get_experiment_by_name("ftmagic")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "out" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001" and run.data.params["method"] == "lora"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    chrf = client.get_metric_history(run.info.run_id, "eval/chrf")
    assert [m.step for m in chrf] == [0, 2, 4] and chrf[-1].value == pytest.approx(metrics["eval_metrics"]["chrf"])
    assert run.info.artifact_uri.startswith((out / "mlartifacts").as_uri())  # beside the store, not in the cwd
    assert not (out.parent / "mlruns").exists()
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "generations"} <= files
    local = Path(client.download_artifacts(run.info.run_id, "generations/step_000004.json", str(out / "dl")))
    table = json.loads(local.read_text())
    assert table["step"] == 4 and len(table["rows"]) == 3 and set(table["rows"][0]) == {"prompt", "reference", "answer"}
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(out / "dl"))).read_text())
    assert summary["eval_metrics/exact_match"] == metrics["eval_metrics"]["exact_match"]
    assert run.data.tags["reason"] == "finished"


def test_trackio_local_store(tracked_run):
    _, metrics, trackio = tracked_run
    assert trackio["runs"] == ["out"]
    assert trackio["config"]["lr"] == 0.001 and trackio["config"]["method"] == "lora"
    logs = trackio["logs"]
    assert [entry["step"] for entry in logs if "train/loss" in entry] == [1, 2, 3, 4]
    assert [entry["step"] for entry in logs if "eval/exact_match" in entry] == [0, 2, 4]
    assert sum(1 for entry in logs if "eval/generations" in entry) == 3
    final = [entry for entry in logs if "final/train_loss" in entry]
    assert final and final[0]["final/train_loss"] == pytest.approx(metrics["train_loss"])


@pytest.mark.parametrize("name, package", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"),
                                           ("trackio", "trackio")])
def test_a_missing_tracker_is_one_line_naming_the_extra(name, package, monkeypatch, tmp_path):
    from ftmagic.engine.reporting import make_reporters

    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` raises ImportError
    with pytest.raises(ConfigError, match=rf"^`report_to: {name}` needs the {package} package "
                                          r"\(pip install 'ftmagic\[tracking\]'\)$"):
        make_reporters(["none", name], tmp_path)


def test_every_install_hint_names_an_extra_that_holds_its_package():
    import tomllib

    from ftmagic import scoring
    from ftmagic.engine import lm_eval_hook, reporting, sweep

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    needs = {scoring.EXTRA_HINT: ("rouge-score", "sacrebleu"), sweep.EXTRA_HINT: ("optuna",),
             lm_eval_hook.EXTRA_HINT: ("lm-eval",), reporting.EXTRA_HINT: ("tensorboard", "wandb", "mlflow", "trackio")}
    for hint, packages in needs.items():
        name = hint.split("[", 1)[1].split("]", 1)[0]
        assert all(any(req.startswith(p) for req in extras[name]) for p in packages), (name, extras[name])
        assert f"ftmagic[{name}]" in "".join(extras["test"]) or name in "".join(extras["test"])


def test_mlflow_says_nothing_on_stderr_unless_something_is_wrong(tmp_path):
    """A run's first MLflow use printed MLflow's "Creating initial MLflow database tables..." and
    "Updating database tables" INFO lines between the CLI's own; its warnings must still show."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    env.pop("MLFLOW_TRACKING_URI", None)
    script = textwrap.dedent(f"""
        import logging
        from ftmagic.engine.reporting import make_reporters, quiet_mlflow
        from ftmagic.events import End, Step
        (sink,) = make_reporters("mlflow", {str(tmp_path / "run")!r}, {{"lr": 0.1}})
        sink(Step(step=1, max_steps=1, loss=1.0, lr=0.1))
        sink(End(reason="finished", metrics={{"train_loss": 1.0}}, output_dir={str(tmp_path / "run")!r}))
        with quiet_mlflow():
            logging.getLogger("mlflow.store.db.utils").warning("a warning from MLflow")
        print("LEVEL", logging.getLogger("mlflow").getEffectiveLevel())
    """)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database tables" not in done.stderr and " INFO " not in done.stderr, done.stderr
    assert "a warning from MLflow" in done.stderr
    assert "LEVEL 20" in done.stdout  # MLflow's own setting is back after each call
    assert (tmp_path / "run" / "mlflow.db").exists()


def test_a_sweep_groups_its_trials_in_one_project(tmp_path):
    from ftmagic.engine.reporting import make_reporters, tracking_group

    (alone,) = make_reporters("mlflow", tmp_path / "run")
    assert (alone.group, alone.root, alone.run_name) == ("ftmagic", tmp_path / "run", "run")
    with tracking_group(tmp_path / "search", "search"):
        sinks = make_reporters(["mlflow", "wandb"], tmp_path / "search" / "trial-003")
    assert {(s.group, s.root, s.run_name) for s in sinks} == {("search", tmp_path / "search", "trial-003")}


def _offline_trackers_env(tmp_path) -> dict:
    """A subprocess's environment with W&B offline in ``tmp_path`` and MLflow on its default local store."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_a_run_that_raises_closes_its_tracker_records_as_failed(tmp_path, test_model_dir):
    """A run that fails mid-way (here a user's metric raising at the second evaluation) ends its
    MLflow run as FAILED and its W&B run with exit code 1, both naming the error; it used to leave
    the MLflow run RUNNING for ever and the W&B run to be finished as a success."""
    from mlflow.tracking import MlflowClient

    from ftmagic.engine.reporting import mlflow_local_uri

    out = tmp_path / "out"
    env = _offline_trackers_env(tmp_path)
    script = textwrap.dedent(f"""
        from engine_helpers import reversal_records
        from ftmagic.engine.run import finetune
        calls = []
        def flaky(prediction, reference):
            calls.append(1)
            if len(calls) > 3:  # the base model's evaluation (3 prompts) passes, the next one raises
                raise RuntimeError("the metric broke")
            return 0.0
        try:
            finetune(model={str(test_model_dir)!r}, data=reversal_records(12), eval_prompts=reversal_records(3, seed=3),
                     eval_metrics=[flaky], eval_max_new_tokens=2, max_steps=4, eval_steps=2, batch_size=4,
                     save_steps=0, report_to=["wandb", "mlflow"], output_dir={str(out)!r})
        except Exception as error:
            print("RAISED", type(error).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path))
    assert done.returncode == 0 and "RAISED ConfigError" in done.stdout, done.stderr[-3000:]

    client = MlflowClient(tracking_uri=mlflow_local_uri(out))
    (run,) = client.search_runs([client.get_experiment_by_name("ftmagic").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["reason"] == "failed"
    assert "the metric broke" in run.data.tags["error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]

    (wandb_run,) = glob.glob(str(out / "wandb" / "offline-run-*"))
    records = _wandb_records(glob.glob(wandb_run + "/run-*.wandb")[0])
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.summary.update})
    assert summary["reason"] == "failed" and "the metric broke" in summary["error"]


def test_a_resumed_run_continues_its_tracker_runs(tmp_path, test_model_dir):
    """Stopped at step 2 and resumed: one MLflow run holds steps 1 to 4 and ends FINISHED, and the W&B
    run continues under the same id. Each resume used to start new tracker runs, the second of which
    began at the checkpoint's step (and left the first one KILLED beside it)."""
    from mlflow.tracking import MlflowClient

    from ftmagic.engine.reporting import TRACKER_FILE, mlflow_local_uri

    out = tmp_path / "out"
    env = _offline_trackers_env(tmp_path)
    script = textwrap.dedent(f"""
        from engine_helpers import StopAt, reversal_records
        from ftmagic.engine.run import finetune
        settings = dict(model={str(test_model_dir)!r}, data=reversal_records(12), max_steps=4, batch_size=4,
                        save_steps=0, eval_steps=0, report_to=["wandb", "mlflow"], output_dir={str(out)!r})
        stop = StopAt(2)
        first = finetune(**settings, on_event=stop, stop=stop)
        assert first.metrics["reason"] == "stopped" and first.metrics["steps"] == 2, first.metrics
        assert finetune(**settings, resume=True).metrics["steps"] == 4
    """)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(tracking_uri=mlflow_local_uri(out))
    (run,) = client.search_runs([client.get_experiment_by_name("ftmagic").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["reason"] == "finished"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]

    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and len({r.rsplit("-", 1)[1] for r in runs}) == 1  # one W&B run id, written twice
    ids = json.loads((out / TRACKER_FILE).read_text())
    assert ids == {"wandb": runs[0].rsplit("-", 1)[1], "mlflow": run.info.run_id}
    assert TRACKER_FILE in json.loads((out / "ftmagic_run.json").read_text())["files"]  # `overwrite: true` removes it

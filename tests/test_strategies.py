"""Multi-process decisions as pure functions: strategy, batch split, accelerate / DeepSpeed settings.

The GPU-only strategies (FSDP, DeepSpeed ZeRO-2/3) are checked here as far as they run
without CUDA: the settings ftmagic derives are accepted by accelerate's own plugin and
config-file classes and, where DeepSpeed is installed, by DeepSpeed's config validator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ftmagic.config import FinetuneConfig
from ftmagic.errors import ConfigError, DataError, DistributedError, TrainingError
from ftmagic.methods import METHOD_NAMES
from ftmagic.strategies import (STRATEGIES, STRATEGY_NAMES, accelerate_config, check_batch_split, deepspeed_config,
                                fsdp_settings, get_strategy_spec, resolve_strategy, rows_per_process, shard_rows)


# ----------------------------------------------------------------------------- the table and `auto`


def test_the_table_names_every_strategy_of_the_config_key():
    assert set(STRATEGY_NAMES) == {"auto", *STRATEGIES}
    assert get_strategy_spec("ddp").shards == frozenset()
    assert get_strategy_spec("deepspeed_zero2").shards == {"gradients", "optimizer_states"}
    assert get_strategy_spec("fsdp").shards == get_strategy_spec("deepspeed_zero3").shards == {
        "weights", "gradients", "optimizer_states"}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_auto_is_ddp_for_adapters_and_fsdp_for_full_fine_tuning_on_gpus(method):
    expected = "fsdp" if method == "full" else "ddp"
    assert resolve_strategy("auto", method=method, device="cuda") == expected
    assert resolve_strategy("auto", method=method, device="cpu") == "ddp"  # accelerate has no CPU FSDP


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_gpu_only_strategies_are_refused_on_cpu_processes_in_one_line(strategy):
    with pytest.raises(ConfigError, match=f"`distributed: {strategy}` runs on GPUs only"):
        resolve_strategy(strategy, method="full", device="cpu")
    with pytest.raises(ConfigError, match=r"run.yaml:2: `distributed: "):
        FinetuneConfig.from_yaml(f"device: cpu\ndistributed: {strategy}\n", source="run.yaml")


def test_config_keys_are_validated_with_the_file_and_line():
    with pytest.raises(ConfigError, match=r"run.yaml:1: `distributed: fsdpp` is not accepted.*; did you mean `fsdp`"):
        FinetuneConfig.from_yaml("distributed: fsdpp\n", source="run.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml:1: `processes: 0` must be at least 1"):
        FinetuneConfig.from_yaml("processes: 0\n", source="run.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml:2: `batch_size: 2` is split across 4 processes"):
        FinetuneConfig.from_yaml("processes: 4\nbatch_size: 2\n", source="run.yaml")
    assert FinetuneConfig(processes=2, distributed="fsdp").to_dict()["distributed"] == "fsdp"


# ----------------------------------------------------------------------------- the batch split


@pytest.mark.parametrize("n_rows,batch_size,world", [(30, 8, 2), (31, 8, 3), (10, 4, 4), (7, 5, 2), (16, 4, 1)])
def test_every_example_is_trained_once_per_epoch_across_the_processes(n_rows, batch_size, world):
    from ftmagic.engine.loop import Batches

    batches = Batches(list(range(n_rows)), batch_size, seed=5)
    for epoch in range(2):
        seen = Counter()
        for index in range(batches.per_epoch):
            micro = batches.get(epoch * batches.per_epoch + index)
            shares = [shard_rows(micro, rank=rank, world=world) for rank in range(world)]
            assert sorted(row for share in shares for row in share) == sorted(micro)  # no duplicates, no gaps
            assert max(len(s) for s in shares) <= rows_per_process(batch_size, world)
            seen.update(row for share in shares for row in share)
        assert seen == Counter(range(n_rows))


def test_each_process_gets_at_least_one_row_of_a_full_micro_batch():
    check_batch_split(4, 4)
    check_batch_split(1, 1)
    with pytest.raises(ConfigError, match="`batch_size: 3` is split across 4 processes"):
        check_batch_split(3, 4)
    assert [rows_per_process(8, n) for n in (1, 2, 3, 8)] == [8, 4, 3, 1]


# ----------------------------------------------------------------------------- decisions from the launcher


def test_launch_info_reads_torchrun_and_accelerate_launch(tmp_path):
    from ftmagic.engine.distributed import launch_info

    assert launch_info({}).world == 1
    info = launch_info({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (info.world, info.rank, info.local_rank, info.local_world, info.launcher_strategy) == (8, 5, 1, 4, None)
    assert launch_info({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}).launcher_strategy == "fsdp"
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    env = {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}
    assert launch_info(env).launcher_strategy == "deepspeed_zero3"


def _info(world=2, rank=0, strategy=None):
    from ftmagic.engine.distributed import LaunchInfo

    return LaunchInfo(world=world, rank=rank, local_rank=rank % 8, local_world=min(world, 8), launcher_strategy=strategy)


def test_plan_for_faked_gpu_processes():
    from ftmagic.engine.distributed import plan_distributed

    lora = plan_distributed(FinetuneConfig(method="lora", batch_size=8), "cuda", _info(4), cpu_count=32)
    assert (lora.strategy, lora.rows_per_process, lora.fsdp, lora.deepspeed) == ("ddp", 2, None, None)
    assert "4 processes, DDP: each runs 2 of every 8 rows" in lora.reason
    full = plan_distributed(FinetuneConfig(method="full", batch_size=8), "cuda", _info(8, rank=3), cpu_count=32)
    assert full.strategy == "fsdp" and full.fsdp["use_orig_params"] and not full.is_main
    zero3 = plan_distributed(FinetuneConfig(method="full", distributed="deepspeed_zero3", batch_size=8,
                                            grad_accum=4), "cuda", _info(2), precision="fp16")
    assert zero3.deepspeed["fp16"]["enabled"] and zero3.deepspeed["gradient_accumulation_steps"] == 4
    cpu = plan_distributed(FinetuneConfig(method="full", batch_size=4), "cpu", _info(2), cpu_count=16)
    assert (cpu.strategy, cpu.threads) == ("ddp", 8)


def test_plan_agrees_with_the_launcher_or_says_why_not():
    from ftmagic.engine.distributed import plan_distributed

    assert plan_distributed(FinetuneConfig(batch_size=4), "cuda", _info(2, strategy="fsdp")).strategy == "fsdp"
    with pytest.raises(ConfigError, match="asks for FSDP; make them agree") as info:
        plan_distributed(FinetuneConfig(distributed="ddp", batch_size=4), "cuda", _info(2, strategy="fsdp"))
    assert info.value.agreed  # every process reaches it: the launcher reports it once, without a rank
    with pytest.raises(ConfigError, match="`processes: 4` does not match the 2 processes the launcher started"):
        plan_distributed(FinetuneConfig(processes=4, batch_size=4), "cuda", _info(2))
    with pytest.raises(ConfigError, match="runs on GPUs only"):
        plan_distributed(FinetuneConfig(distributed="fsdp", batch_size=4), "cpu", _info(2))


def test_threads_are_shared_by_the_processes_of_one_machine():
    from ftmagic.engine.distributed import threads_per_process

    assert [threads_per_process(16, n) for n in (1, 2, 3, 32)] == [16, 8, 5, 1]


# ----------------------------------------------------------------------------- accelerate's own classes accept them


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "freeze"])
def test_fsdp_settings_are_accepted_by_accelerates_plugin(method):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from ftmagic.engine.distributed import fsdp_plugin_kwargs

    settings = fsdp_settings(method)
    # sync_module_states makes the plugin look for an accelerator device at once; this machine has none.
    plugin = FullyShardedDataParallelPlugin(**fsdp_plugin_kwargs(settings, sync_module_states=False))
    assert plugin.fsdp_version == 1 and plugin.use_orig_params is (method in ("full", "freeze"))
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # gathered whole: resumes on any process count
    assert plugin.backward_prefetch.name == "BACKWARD_PRE"
    assert not plugin.cpu_offload.offload_params


@pytest.mark.parametrize("strategy,method", [("ddp", "lora"), ("fsdp", "lora"), ("fsdp", "full"),
                                             ("deepspeed_zero2", "full"), ("deepspeed_zero3", "full")])
def test_the_accelerate_config_file_is_read_by_accelerate_as_meant(tmp_path, strategy, method):
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps(deepspeed_config("deepspeed_zero3", batch_size=8, grad_accum=1, world=2,
                                                   precision="bf16", max_grad_norm=1.0)))
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(accelerate_config(strategy, method=method, processes=2,
                                                     deepspeed_config_file=str(ds_file))))
    ClusterConfig.from_yaml_file(str(path))  # unknown keys would raise here
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "ftmagic.cli", "train", "x.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 2 and args.mixed_precision == "no"
    if strategy == "fsdp":
        assert args.use_fsdp
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_USE_FSDP"] == "true"
        assert env["FSDP_USE_ORIG_PARAMS"] == str(method == "full").lower()
        assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    elif strategy.startswith("deepspeed"):
        assert args.use_deepspeed and args.deepspeed_config_file == str(ds_file)
    else:
        assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed


# DeepSpeed validates its config itself (pydantic models that refuse unknown keys). Installed in
# site-packages it would be imported by every full-weights save (through accelerate) and print a
# CPU warning into each, so scripts/setup.sh installs it into its own folder for this check only.
DEEPSPEED_CHECK = Path(__file__).resolve().parent.parent / "build" / "deepspeed-check"
_VALIDATE = """
import json, sys
from deepspeed.runtime.config import DeepSpeedConfig
out = []
for config in json.load(sys.stdin):
    try:
        c = DeepSpeedConfig(config)
    except Exception as exc:
        out.append(str(exc))
        continue
    out.append([c.zero_optimization_stage, c.bfloat16_config.enabled, c.float16_config.enabled,
                c.gradient_clipping, c.zero_allow_untested_optimizer, c.train_batch_size])
print(json.dumps(out))
"""


def _deepspeed_validates(configs: list) -> list:
    """DeepSpeed's verdict on each config (one interpreter for all: importing DeepSpeed takes seconds)."""
    if not (DEEPSPEED_CHECK / "deepspeed").is_dir():
        pytest.skip(f"DeepSpeed's own validator is not installed in {DEEPSPEED_CHECK} (`bash scripts/setup.sh` "
                    "puts it there); accelerate's checks ran")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(DEEPSPEED_CHECK), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _VALIDATE], input=json.dumps(configs), capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_deepspeed_config_is_accepted_by_accelerates_plugin(strategy, precision):
    from accelerate.utils import DeepSpeedPlugin

    config = deepspeed_config(strategy, batch_size=8, grad_accum=4, world=4, precision=precision, max_grad_norm=0.5)
    assert config["train_batch_size"] == 2 * 4 * 4  # micro-batch x accumulation x processes
    assert config["gradient_clipping"] == 0.5
    assert ("bf16" in config, "fp16" in config) == (precision == "bf16", precision == "fp16")
    plugin = DeepSpeedPlugin(hf_ds_config=dict(config), zero3_init_flag=strategy == "deepspeed_zero3")
    assert plugin.zero_stage == int(strategy[-1])


def test_deepspeed_config_is_valid_for_deepspeed_itself():
    configs = [deepspeed_config(s, batch_size=8, grad_accum=4, world=4, precision=p, max_grad_norm=0.5)
               for s in ("deepspeed_zero2", "deepspeed_zero3") for p in ("bf16", "fp16")]
    # DeepSpeed's validator sees one process outside a launch: the same settings for a world of 1.
    checked = [{**config, "train_batch_size": 2 * 4} for config in configs]
    # the check can fail: a key DeepSpeed does not know is refused
    bad = {**checked[0], "zero_optimization": {"stage": 2, "overlap_comms": True}}
    *verdicts, refused = _deepspeed_validates(checked + [bad])
    for config, (stage, bf16, fp16, clipping, untested, batch) in zip(configs, verdicts):
        assert stage == config["zero_optimization"]["stage"] and (bf16, fp16) == ("bf16" in config, "fp16" in config)
        assert (clipping, untested, batch) == (0.5, True, 8)
    assert isinstance(refused, str) and "overlap_comms" in refused


def test_deepspeed_config_refuses_a_strategy_that_is_not_deepspeed():
    with pytest.raises(ConfigError, match="not a DeepSpeed strategy"):
        deepspeed_config("fsdp", batch_size=8, grad_accum=1, world=2, precision="bf16", max_grad_norm=1.0)


# ----------------------------------------------------------------------------- launching and failures


def test_a_kernel_that_used_cuda_cannot_fork_and_is_told_what_to_do():
    from ftmagic.engine.launch import check_fork_safe

    check_fork_safe(2, cuda_available=False, cuda_initialized=False, gpus=0)  # CPU processes
    check_fork_safe(2, cuda_available=True, cuda_initialized=False, gpus=2)  # Kaggle's 2xT4, fresh kernel
    with pytest.raises(ConfigError, match="restart the kernel and run the multi-process cell first"):
        check_fork_safe(2, cuda_available=True, cuda_initialized=True, gpus=2)
    with pytest.raises(ConfigError, match=r"`processes: 4` but 2 GPUs are visible; use `processes: 2`"):
        check_fork_safe(4, cuda_available=True, cuda_initialized=False, gpus=2)


def _record(rank, message, kind="ValueError", peer=False, agreed=False):
    return {"rank": rank, "world": 2, "type": kind, "message": message, "peer": peer, "agreed": agreed,
            "details": "Traceback ..."}


def test_failures_become_one_line_naming_the_process():
    from ftmagic.engine.launch import failure_error

    peer = _record(0, "RuntimeError: Connection closed by peer", "RuntimeError", peer=True)
    error = failure_error([peer, _record(1, "ValueError: bad row")], 2)
    assert isinstance(error, DistributedError) and str(error) == "rank 1 of 2 failed: ValueError: bad row"
    assert error.details == "Traceback ..."  # a bug keeps its traceback
    mistake = failure_error([_record(1, "`data` has no rows", "DataError")], 2)
    assert str(mistake) == "rank 1 of 2 failed: `data` has no rows" and mistake.details == ""
    agreed = failure_error([_record(1, "the training loss became nan", "TrainingError", agreed=True)], 2)
    assert type(agreed) is TrainingError and str(agreed) == "the training loss became nan"
    assert "lost its connection" in str(failure_error([peer], 2))
    assert str(failure_error([], 2, "exit code -9")) == "a process of the run failed: exit code -9"
    assert not isinstance(failure_error([_record(0, "x", "DataError")], 2), DataError)


def test_a_peer_failure_is_told_from_a_process_own_error():
    from ftmagic.engine.distributed import is_peer_failure

    assert is_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]"))
    assert not is_peer_failure(RuntimeError("shape mismatch"))
    assert not is_peer_failure(ConfigError("`lr` must be positive"))

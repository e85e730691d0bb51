"""The memory calculator reads CUDA context and allocator headroom measured by benchmarks/gpu_suite.py."""

from __future__ import annotations

import json
import os

import pytest

from ftmagic.errors import ConfigError
from ftmagic.memory import estimate_memory
from ftmagic.memory.gpus import (BUILT_IN, CONSTANTS_ENV, CUDA_CONTEXT_BYTES, GIB, HEADROOM_FLOOR, MIB,
                                 constants_path, cuda_constants, read_constants, required_bytes)
from ftmagic.memory.suggest import check_fit

MEASURED = {"gpu": "NVIDIA H200", "cuda_context_bytes": 300 * MIB, "allocator_headroom_share": 0.02,
            "allocator_headroom_floor_bytes": 64 * MIB}


def _write(path, constants=MEASURED, **top):
    path.write_text(json.dumps({"runs": [], **top, "constants": constants}))
    return path


def test_built_in_when_no_file(monkeypatch, tmp_path):
    monkeypatch.delenv(CONSTANTS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert constants_path() == tmp_path / "ftmagic" / "gpu_constants.json"
    assert cuda_constants() is BUILT_IN
    assert required_bytes(10 * GIB) == 10 * GIB + CUDA_CONTEXT_BYTES + int(0.05 * 10 * GIB)


def test_measured_file_in_the_user_cache_is_used(monkeypatch, tmp_path):
    monkeypatch.delenv(CONSTANTS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "ftmagic").mkdir()
    _write(tmp_path / "ftmagic" / "gpu_constants.json")
    c = cuda_constants()
    assert (c.context_bytes, c.headroom_share, c.headroom_floor) == (300 * MIB, 0.02, 64 * MIB)
    assert required_bytes(10 * GIB) == 10 * GIB + 300 * MIB + int(0.02 * 10 * GIB)
    assert "measured on NVIDIA H200" in c.source


def test_env_var_wins_and_none_turns_measurements_off(monkeypatch, tmp_path):
    path = _write(tmp_path / "suite.json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv(CONSTANTS_ENV, str(path))
    assert cuda_constants().context_bytes == 300 * MIB
    monkeypatch.setenv(CONSTANTS_ENV, "none")
    assert constants_path() is None and cuda_constants() is BUILT_IN


def test_the_verdict_uses_and_names_measured_constants(monkeypatch, tmp_path):
    settings = dict(method="qlora", batch_size=1, seq_len=512)
    peak = estimate_memory("llama-3.2-1b", **settings).total_bytes
    # A card with room for the peak plus the measured overheads, but not the built-in ones.
    card = (peak + 300 * MIB + max(64 * MIB, int(0.02 * peak)) + 16 * MIB) / GIB
    assert not check_fit("llama-3.2-1b", card, **settings).fits
    monkeypatch.setenv(CONSTANTS_ENV, str(_write(tmp_path / "suite.json")))
    verdict = check_fit("llama-3.2-1b", card, **settings)
    assert verdict.fits and verdict.estimate.cuda_context == 300 * MIB
    assert any("measured on NVIDIA H200" in note for note in verdict.estimate.notes)


def test_a_rewritten_file_is_read_again(monkeypatch, tmp_path):
    path = _write(tmp_path / "suite.json")
    monkeypatch.setenv(CONSTANTS_ENV, str(path))
    assert cuda_constants().context_bytes == 300 * MIB
    _write(path, {**MEASURED, "cuda_context_bytes": 900 * MIB})
    os.utime(path, ns=(1, 10**18))  # a new modification time, even within the clock's resolution
    assert cuda_constants().context_bytes == 900 * MIB


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"runs": []}), "no `constants` mapping"),
    (json.dumps({"constants": {**MEASURED, "cuda_context_bytes": -5}}), "`constants.cuda_context_bytes: -5` must be"),
    (json.dumps({"constants": {**MEASURED, "allocator_headroom_share": "big"}}), "allocator_headroom_share"),
    (json.dumps({"dry_run": True, "constants": MEASURED}), "written by a dry run"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "suite.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        read_constants(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_default_floor_when_the_file_has_none(tmp_path):
    constants = {k: v for k, v in MEASURED.items() if k != "allocator_headroom_floor_bytes"}
    assert read_constants(_write(tmp_path / "s.json", constants)).headroom_floor == HEADROOM_FLOOR

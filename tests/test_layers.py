"""The layers hold: every import in the package, at any depth, points downwards.

    front   ftmagic (the package), api, cli, commands/, magics, widgets/, textprogress,
            usage, demo            -- may use the engine and the core
    engine  engine/                -- may use the core; never a front, IPython or ipywidgets
    core    adapters, config, constants, errors, events, evalevents, flops, hub, methods, objectives, scoring,
            strategies, sweep_spec, units, data/, memory/, export/
                                   -- pure Python: never the engine or a front, never torch

The walk reads every ``import`` statement (function-level ones too), so a lazy import
that crosses a layer is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ftmagic"

CORE = ("ftmagic.adapters", "ftmagic.config", "ftmagic.constants", "ftmagic.errors", "ftmagic.events",
        "ftmagic.evalevents", "ftmagic.flops", "ftmagic.hub", "ftmagic.methods", "ftmagic.objectives", "ftmagic.scoring",
        "ftmagic.strategies", "ftmagic.sweep_spec", "ftmagic.units", "ftmagic.data", "ftmagic.memory", "ftmagic.export")
ENGINE = ("ftmagic.engine",)
# Libraries that only the engine may import (the core stays importable without them).
ENGINE_LIBRARIES = ("torch", "peft", "accelerate", "bitsandbytes", "safetensors")
FRONT_LIBRARIES = ("IPython", "ipywidgets", "ipykernel")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    if any(module == p or module.startswith(p + ".") for p in CORE):
        return "core"
    if any(module == p or module.startswith(p + ".") for p in ENGINE):
        return "engine"
    return "front"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "ftmagic":
                # `from ftmagic import constants` imports that module; `from ftmagic import finetune`
                # goes through the package's __init__ (a front), which _layer reports as such.
                found += [(node.lineno, f"ftmagic.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return found


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        layer = _layer(module)
        for line, target in _imports(path):
            top = target.split(".")[0]
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            if top == "ftmagic" and target != "ftmagic":
                target_layer = _layer(target)
                if layer == "core" and target_layer != "core":
                    problems.append(f"{where} (core -> {target_layer})")
                if layer == "engine" and target_layer == "front":
                    problems.append(f"{where} (engine -> front)")
            elif target == "ftmagic" and layer != "front":
                problems.append(f"{where} (the package's __init__ is a front)")
            if layer == "core" and top in ENGINE_LIBRARIES + FRONT_LIBRARIES:
                problems.append(f"{where} (core -> {top})")
            if layer == "engine" and top in FRONT_LIBRARIES:
                problems.append(f"{where} (engine -> {top})")
    return problems


def test_imports_point_downwards():
    assert _violations() == []


def test_the_walk_sees_a_violation(tmp_path, monkeypatch):
    # The contract test must be able to fail: a core module with a lazy engine import is reported.
    fake = PACKAGE / "memory" / "_layer_probe.py"
    fake.write_text("def f():\n    from ftmagic.engine.run import finetune\n    import torch\n", encoding="utf-8")
    try:
        problems = _violations()
    finally:
        fake.unlink()
    assert any("_layer_probe.py:2 imports ftmagic.engine.run (core -> engine)" in p for p in problems)
    assert any("_layer_probe.py:3 imports torch (core -> torch)" in p for p in problems)


@pytest.mark.parametrize("module", ["ftmagic", "ftmagic.memory", "ftmagic.data", "ftmagic.events", "ftmagic.methods",
                                    "ftmagic.strategies",
                                    "ftmagic.api", "ftmagic.magics"])
def test_light_modules_never_load_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

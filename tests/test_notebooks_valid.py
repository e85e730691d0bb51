"""The example notebooks are valid, in sync with their sources, and set up the way CI runs them.

nbval executes them (``testpaths`` in pyproject.toml); these checks are the fast part:
structure, the Colab conventions (badge, install cell tagged to skip, GPU check, Drive),
and the smoke-mode switch that colab/conftest.py sets for the Colab kernels only.
"""

import importlib.util
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import build_notebooks  # noqa: E402

LOCAL = sorted((ROOT / "notebooks").glob("*.ipynb"))
COLAB = sorted((ROOT / "colab").glob("*.ipynb"))
ALL = LOCAL + COLAB
JOURNEYS = ["01_quickstart", "02_memory_calculator", "03_dataset_previewer", "04_qlora", "05_methods_comparison",
            "06_resume_and_merge", "07_export_gguf", "08_after_sft", "09_multi_gpu", "10_sweep"]


def _read(path):
    return nbformat.read(str(path), as_version=4)


def _tags(cell):
    return cell.metadata.get("tags", [])


def test_every_journey_has_a_local_and_a_colab_notebook():
    assert [p.stem for p in LOCAL] == JOURNEYS
    assert [p.stem for p in COLAB] == JOURNEYS


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_is_valid_nbformat_with_a_python_kernel(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[0].cell_type == "markdown" or "colab-badge" in nb.cells[0].source
    assert any(cell.cell_type == "markdown" for cell in nb.cells[1:]), "prose between the cells"


@pytest.mark.parametrize("module", build_notebooks.MODULES)
def test_committed_notebook_matches_its_source(module):
    # Hand edits to the JSON would be lost at the next build: the source is the truth.
    assert build_notebooks.sources_match(module) == []


@pytest.mark.parametrize("path", LOCAL, ids=lambda p: p.name)
def test_local_notebooks_are_committed_with_outputs_and_without_errors(path):
    nb = _read(path)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), "execute with scripts/build_notebooks.py"
    assert sum(1 for cell in code if cell.outputs) >= len(code) - 2
    for cell in code:
        errors = [out for out in cell.outputs if out.output_type == "error"]
        assert not errors or "raises-exception" in _tags(cell), (cell.source[:60], errors[:1])
    assert any("nbval-check-output" in _tags(cell) for cell in code), "some outputs must be checked by nbval"


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_only_the_colab_install_cell_is_skipped(path):
    skipped = [cell.source for cell in _read(path).cells if "nbval-skip" in _tags(cell)]
    if path.parent.name == "colab":
        assert len(skipped) == 1 and skipped[0].startswith("%pip install")
    else:
        assert skipped == []


@pytest.mark.parametrize("path", COLAB, ids=lambda p: p.name)
def test_colab_notebook_conventions(path):
    nb = _read(path)
    badge = f"https://colab.research.google.com/github/ftmagic/ftmagic/blob/main/colab/{path.name}"
    assert badge in nb.cells[0].source and "colab-badge.svg" in nb.cells[0].source
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    installs = [s for s in sources if s.startswith("%pip install")]
    assert len(installs) == 1 and "ftmagic" in installs[0]
    assert sources.index(installs[0]) == 0, "install before anything imports ftmagic"
    gpu = [s for s in sources if "torch.cuda.is_available()" in s and "Change runtime type" in s]
    assert gpu, "a GPU check that explains how to get one"
    assert "raise" not in gpu[0] and "assert" not in gpu[0], "the GPU check must not fail on a CPU runtime"
    assert nb.metadata.get("accelerator") == "GPU"
    assert all(not cell.outputs for cell in nb.cells if cell.cell_type == "code"), "Colab notebooks ship clean"
    if any("--output-dir {OUT}" in s or "OUT" in s for s in sources):
        drive = [s for s in sources if "from google.colab import drive" in s]
        assert drive and re.search(r"try:\s*\n\s*from google\.colab import drive\s*\n\s*except ImportError", drive[0])


def _load_conftest(folder):
    spec = importlib.util.spec_from_file_location(f"{folder}_conftest", ROOT / folder / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("before", [None, "0"])
def test_colab_conftest_sets_smoke_mode_for_its_kernels_only(monkeypatch, before):
    if before is None:
        monkeypatch.delenv("FTMAGIC_SMOKE", raising=False)
    else:
        monkeypatch.setenv("FTMAGIC_SMOKE", before)
    colab = _load_conftest("colab")
    colab.pytest_runtest_setup(item=None)
    assert os.environ["FTMAGIC_SMOKE"] == "1"  # the kernel starts after this hook, inheriting it
    from ftmagic.constants import smoke_mode

    assert smoke_mode()
    colab.pytest_runtest_teardown(item=None, nextitem=None)
    assert os.environ.get("FTMAGIC_SMOKE") == before


def test_notebooks_conftest_removes_smoke_mode(monkeypatch):
    monkeypatch.setenv("FTMAGIC_SMOKE", "1")
    local = _load_conftest("notebooks")
    local.pytest_runtest_setup(item=None)
    assert "FTMAGIC_SMOKE" not in os.environ
    local.pytest_runtest_teardown(item=None, nextitem=None)
    assert os.environ["FTMAGIC_SMOKE"] == "1"


def test_pytest_runs_the_notebooks_with_nbval_lax():
    text = (ROOT / "pyproject.toml").read_text()
    testpaths = re.search(r"^testpaths = \[(.*)\]$", text, re.M).group(1)
    assert '"notebooks"' in testpaths and '"colab"' in testpaths
    assert "--nbval-lax" in re.search(r"^addopts = (.*)$", text, re.M).group(1)

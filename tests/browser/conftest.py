"""Fixtures of the browser tests: a Jupyter server over copies of the example notebooks, and Chromium.

These tests are part of the default run. A missing browser is a failure, not a skip, so
CI cannot pass without them; a developer without Chromium skips them on purpose with
``FTMAGIC_SKIP_BROWSER=1`` (or ``-m "not browser"``). ``scripts/setup.sh`` installs
Chromium and the Python side (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from jupyter_driver import CHROMIUM, JupyterServer, chromium

ROOT = Path(__file__).resolve().parents[2]
SKIP_ENV = "FTMAGIC_SKIP_BROWSER"
SCREENSHOTS_ENV = "FTMAGIC_SCREENSHOTS"  # a folder: the README's screenshots are written there


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.slow)


def _requirements_or_fail() -> None:
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: browser tests skipped on purpose")
    problems = []
    try:
        import playwright  # noqa: F401
        import jupyterlab  # noqa: F401
        import notebook  # noqa: F401
    except ImportError as exc:
        problems.append(f"{exc.name} is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        problems.append(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set FTMAGIC_CHROMIUM)")
    if problems:
        pytest.fail("browser tests cannot run: " + "; ".join(problems) + f". Run `bash scripts/setup.sh`, "
                    f"or set {SKIP_ENV}=1 to skip them on purpose", pytrace=False)


@pytest.fixture(scope="session")
def notebook_root(tmp_path_factory) -> Path:
    """A temporary server root holding fresh copies of the example notebooks."""
    root = tmp_path_factory.mktemp("jupyter-root")
    for name in ("01_quickstart", "02_memory_calculator", "03_dataset_previewer"):
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", root / f"{name}.ipynb")
    return root


@pytest.fixture(scope="session")
def server(notebook_root):
    _requirements_or_fail()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # The examples run in full, as in their own test (notebooks/conftest.py), never in smoke mode.
    with JupyterServer(notebook_root, env=env, unset=("FTMAGIC_SMOKE",)) as running:
        yield running


@pytest.fixture(scope="session")
def browser(server):
    with chromium() as context:
        yield context


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    """Where screenshots go: ``$FTMAGIC_SCREENSHOTS`` (to refresh the README's) or a temporary folder."""
    folder = os.environ.get(SCREENSHOTS_ENV)
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path

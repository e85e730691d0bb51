"""The example notebooks run on the real embedded model and full step counts, never in smoke mode.

A ``FTMAGIC_SMOKE`` left in the environment would cap their training runs and change
their checked outputs, so it is removed while their kernels start (see colab/conftest.py
for the notebooks that do run in smoke mode).
"""

import os

import pytest

SMOKE_ENV = "FTMAGIC_SMOKE"
# What the notebooks write when they run (outputs, data files, a failed build's partial notebook).
collect_ignore_glob = ["runs/*"]
_saved = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _saved.append(os.environ.pop(SMOKE_ENV, None))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    previous = _saved.pop() if _saved else None
    if previous is not None:
        os.environ[SMOKE_ENV] = previous

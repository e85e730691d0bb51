"""The Colab notebooks run in CI in smoke mode: every model id becomes the embedded tiny model.

nbval starts a notebook's kernel while its first cell is set up, and the kernel inherits
this process's environment. Setting ``FTMAGIC_SMOKE=1`` before that setup (``tryfirst``)
and restoring it after each cell keeps smoke mode to these notebooks' kernels: tests and
notebooks elsewhere in the same pytest run are unaffected.
"""

import os

import pytest

SMOKE_ENV = "FTMAGIC_SMOKE"
# What the notebooks write when they run (outputs, data files, a failed build's partial notebook).
collect_ignore_glob = ["runs/*"]
_saved = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _saved.append(os.environ.get(SMOKE_ENV))
    os.environ[SMOKE_ENV] = "1"


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    previous = _saved.pop() if _saved else None
    if previous is None:
        os.environ.pop(SMOKE_ENV, None)
    else:
        os.environ[SMOKE_ENV] = previous

"""Every ``>>>`` example in ftmagic's docstrings runs and gives what it shows.

The examples are the first thing a reader copies; run here, they cannot drift from the code.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ftmagic


def _modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(ftmagic.__path__, prefix="ftmagic."))


def _examples(name: str) -> list:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "ftmagic":
            raise  # a broken import inside the package is a failure, not a missing extra
        pytest.skip(f"{name} needs {exc.name}, an optional extra that is not installed")
    return [test for test in doctest.DocTestFinder().find(module) if test.examples]


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {name} fail (see the output above)"


def test_the_examples_are_found():
    # A finder that found nothing would make every test above pass.
    assert sum(len(_examples(name)) for name in ("ftmagic.flops", "ftmagic.engine.fastpath")) >= 3

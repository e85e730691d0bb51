"""The browser tests fail, not skip, when their browser is missing, unless skipped on purpose."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BROWSER_DIR = Path(__file__).parent / "browser"


def _browser_conftest(monkeypatch):
    monkeypatch.syspath_prepend(str(BROWSER_DIR))
    spec = importlib.util.spec_from_file_location("browser_conftest_under_test", BROWSER_DIR / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_missing_chromium_fails_the_browser_tests(monkeypatch, tmp_path):
    conftest = _browser_conftest(monkeypatch)
    monkeypatch.delenv(conftest.SKIP_ENV, raising=False)
    monkeypatch.setattr(conftest, "CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(pytest.fail.Exception, match=r"no Chromium at .*no-chromium.*scripts/setup.sh"):
        conftest._requirements_or_fail()


def test_they_are_skipped_only_on_purpose(monkeypatch, tmp_path):
    conftest = _browser_conftest(monkeypatch)
    monkeypatch.setenv(conftest.SKIP_ENV, "1")
    monkeypatch.setattr(conftest, "CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(pytest.skip.Exception, match="skipped on purpose"):
        conftest._requirements_or_fail()
    sys.modules.pop("browser_conftest_under_test", None)

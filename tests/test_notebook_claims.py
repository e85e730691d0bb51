"""What the examples claim is what they show, and one figure has one home.

The quickstart's key figure (held-out exact match after the demo's LoRA run) is
``ftmagic.demo.DEMO_EXACT_MATCH``. Its text states it, its check cell asserts it (so the
notebook run in CI by nbval fails when a fresh run falls short), the committed output
reaches it, and the README says the same. ``ftmagic demo`` trains with the same settings
(``DEMO_CONFIG``, checked below) on the same data, so the quickstart's run in CI holds it to
the figure too, without training the same model a second time.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

from ftmagic.demo import DEMO_CONFIG, DEMO_EXACT_MATCH

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "notebooks" / "01_quickstart.ipynb"
FIGURE = re.compile(r"exact match on held-out words: (\d+)% before, (\d+)% after")


def _quickstart():
    return nbformat.read(str(QUICKSTART), as_version=4)


def _claimed_percentages(text: str) -> list:
    return [int(n) for n in re.findall(r"at least \*{0,2}(\d+)%", text)]


def test_the_quickstart_states_the_demo_figure_and_checks_it():
    nb = _quickstart()
    prose = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    assert _claimed_percentages(prose) == [round(DEMO_EXACT_MATCH * 100)]
    checks = [cell for cell in nb.cells if cell.cell_type == "code" and "exact match on held-out words" in cell.source]
    assert len(checks) == 1
    assert re.search(r"^assert .*after >= DEMO_EXACT_MATCH", checks[0].source, re.M)
    # A normal cell: when the assertion fails, nbval (which runs every notebook in CI) fails.
    assert "raises-exception" not in checks[0].metadata.get("tags", [])


def test_the_committed_quickstart_reaches_its_figure():
    printed = "".join(out.get("text", "") for cell in _quickstart().cells if cell.cell_type == "code"
                      for out in cell.outputs if out.output_type == "stream")
    (before, after), = FIGURE.findall(printed)
    assert int(before) <= 5 and int(after) >= round(DEMO_EXACT_MATCH * 100)


def test_the_quickstart_trains_with_the_demo_settings():
    from ftmagic.config import FinetuneConfig, parse_yaml_mapping

    cell = next(c.source for c in _quickstart().cells if c.source.startswith("%%finetune --name ft\n"))
    values, _ = parse_yaml_mapping(cell.split("\n", 1)[1])
    assert {key: values[key] for key in DEMO_CONFIG} == DEMO_CONFIG
    FinetuneConfig.from_dict({**values, "data": None})  # and it is a valid config


def test_the_readme_states_the_same_figure():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if "notebooks/01_quickstart" in line and "exact match" in line)
    assert _claimed_percentages(row) == [round(DEMO_EXACT_MATCH * 100)]
    assert f"lr {DEMO_CONFIG['lr']:g}, {DEMO_CONFIG['max_steps']} steps" in readme

"""The example notebooks in a real browser: JupyterLab 4 and Notebook 7 with Chromium.

Each test runs a notebook the way a user does (Run All), checks that every widget
renders and works (Stop ends a live run with a checkpoint, a calculator control changes
the verdict, the previewer pages), then saves, shuts the kernel down, reopens the file and
checks that every output still shows its content and no "Error displaying widget".
Screenshots (light and dark theme) are written to ``$FTMAGIC_SCREENSHOTS`` when set (the
README's come from ``FTMAGIC_SCREENSHOTS=docs/screenshots``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from jupyter_driver import DARK, LIGHT, NotebookPage

# The widget manager's own message when a saved widget output has no model (no kernel):
# expected after reopening, and what the static copies are for.
MODEL_NOT_FOUND = "widget model not found"
STOP_CELL = """%%finetune --name stopped
model: tiny
data: $train
max_steps: 100000
save_steps: 0
output_dir: runs/stop-test
overwrite: true"""


def _open(browser, server, name, ui="lab", width=1280):
    page = browser.new_page()
    page.set_viewport_size({"width": width, "height": 900})
    nb = NotebookPage(page, server, ui)
    nb.open(name)
    return nb


def _live_checks(nb, widgets: int) -> None:
    """Every widget renders, its static copy is hidden, and nothing failed in the page."""
    assert nb.widget_errors() == []
    assert nb.rendered_widgets() >= widgets
    copies = nb.static_copies()
    assert len(copies) == widgets and not any(visible for visible, _ in copies), copies
    assert nb.errors == [], "\n".join(nb.errors)


def _reopen(nb, name):
    """Save, shut the kernel down, open the file again (a new, empty kernel starts)."""
    before = nb.outputs_by_cell()
    nb.save()
    assert nb.server.shutdown_kernels() >= 1
    nb.page.close()
    reopened = _open(nb.page.context, nb.server, name, nb.ui)
    reopened.page.wait_for_timeout(4000)  # the widget manager gives up on missing models after 2 s
    return before, reopened


def _saved_checks(before, nb, widgets: int) -> list:
    """No error shows, each static copy shows, and every cell that had output still shows some."""
    assert nb.widget_errors() == []
    copies = nb.static_copies()
    assert len(copies) == widgets and all(visible for visible, _ in copies), copies
    after = nb.outputs_by_cell()
    assert [bool(texts) for texts in after] == [bool(texts) for texts in before]
    assert [e for e in nb.errors if MODEL_NOT_FOUND not in e] == []
    return [text for _, text in copies]


def _fits_width(nb) -> list:
    """Outputs or buttons wider than the room they have (clipped content, squeezed labels)."""
    return nb.page.evaluate("""() => {
        const bad = [];
        for (const o of document.querySelectorAll('.jp-OutputArea-output')) {
            if (o.offsetParent !== null && o.scrollWidth > o.clientWidth + 1)
                bad.push('output ' + o.scrollWidth + '>' + o.clientWidth + ': ' + o.innerText.slice(0, 60));
        }
        for (const b of document.querySelectorAll('.jp-OutputArea-output button')) {
            if (b.offsetParent !== null && b.scrollWidth > b.clientWidth + 1)
                bad.push('button ' + b.innerText);
        }
        return bad;
    }""")


def _contrast_problems(nb, minimum: float = 3.0) -> list:
    """Text in outputs (HTML and SVG) whose contrast with the page background is below ``minimum``."""
    return nb.page.evaluate("""(minimum) => {
        const rgb = s => (s.match(/[\\d.]+/g) || []).slice(0, 3).map(Number);
        const lum = c => { const v = c.map(x => { x /= 255; return x <= 0.03928 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; });
                           return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]; };
        const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
        const bg = rgb(getComputedStyle(document.querySelector('.jp-Notebook')).backgroundColor);
        const bad = [];
        for (const el of document.querySelectorAll('.jp-OutputArea-output svg text, .jp-OutputArea-output td, .jp-OutputArea-output th, .jp-OutputArea-output li')) {
            if (el.offsetParent === null && !(el instanceof SVGElement)) continue;
            const style = getComputedStyle(el);
            const color = rgb(el instanceof SVGElement ? style.fill : style.color);
            if (color.length === 3 && ratio(color, bg) < minimum) bad.push(el.textContent.slice(0, 30) + ' ' + (el instanceof SVGElement ? style.fill : style.color));
        }
        return bad;
    }""", minimum)


def _shot(nb, locator, path: Path, max_height: int = 760) -> None:
    """A screenshot of ``locator`` (a cell), cut at ``max_height`` pixels, on a page tall enough to hold it."""
    size = nb.page.viewport_size
    nb.page.set_viewport_size({"width": size["width"], "height": 1400})
    locator.evaluate("el => el.scrollIntoView({block: 'start'})")
    nb.page.wait_for_timeout(300)
    box = locator.bounding_box()
    nb.page.screenshot(path=str(path), clip={"x": box["x"], "y": box["y"], "width": box["width"],
                                             "height": min(box["height"], max_height)})
    nb.page.set_viewport_size(size)


# ----------------------------------------------------------------------------- JupyterLab


def test_memory_calculator_in_jupyterlab(server, browser, screenshots):
    nb = _open(browser, server, "02_memory_calculator.ipynb")
    nb.run_all()
    _live_checks(nb, widgets=1)
    cell = nb.cell("%ft_memory")
    output = cell.locator(".jp-OutputArea-output").last
    assert "does not fit T4" in output.inner_text()  # Mistral 7B with LoRA, batch 2 x 1024
    # Change controls as a user does: pick QLoRA, type a new batch size and press Enter.
    cell.locator(".widget-dropdown", has_text="method").locator("select").select_option("qlora")
    nb.page.wait_for_function("(el) => el.innerText.includes('fits T4') && !el.innerText.includes('does not fit')",
                              arg=output.element_handle(), timeout=20000)
    peak = re.search(r"peak [\d.]+ GiB", output.inner_text()).group(0)
    field = cell.locator(".widget-inline-hbox", has_text="batch size").locator("input")
    field.click()
    field.press("Control+A")
    nb.page.keyboard.insert_text("3")
    field.press("Enter")
    nb.page.wait_for_function("([el, peak]) => !el.innerText.includes(peak)", arg=[output.element_handle(), peak],
                              timeout=20000)
    for theme, suffix in ((DARK, "dark"), (LIGHT, "light")):
        nb.set_theme(theme)
        assert _contrast_problems(nb) == [], theme
        _shot(nb, cell, screenshots / f"memory-{suffix}.png")

    # A narrow window (the file browser open beside the notebook): the widget wraps, nothing is cut.
    nb.page.set_viewport_size({"width": 800, "height": 900})
    nb.page.wait_for_timeout(800)
    assert _fits_width(nb) == []
    nb.page.set_viewport_size({"width": 1280, "height": 900})

    before, nb = _reopen(nb, "02_memory_calculator.ipynb")
    (copy,) = _saved_checks(before, nb, widgets=1)
    # The saved copy shows what was on screen when the notebook was saved.
    assert "method qlora" in copy and "batch size 3" in copy and "fits T4" in copy
    nb.page.close()


def test_dataset_previewer_in_jupyterlab(server, browser, screenshots):
    nb = _open(browser, server, "03_dataset_previewer.ipynb")
    nb.run_all()
    _live_checks(nb, widgets=1)
    cell = nb.cell("%ft_preview")
    output = cell.locator(".jp-OutputArea-output").last
    assert "record 0" in output.inner_text()
    cell.get_by_role("button", name="next ▶").click()
    nb.page.wait_for_function("(el) => el.innerText.includes('record 1 ')", arg=output.element_handle(),
                              timeout=20000)
    nb.page.set_viewport_size({"width": 800, "height": 900})
    nb.page.wait_for_timeout(800)
    assert _fits_width(nb) == []
    nb.page.set_viewport_size({"width": 1280, "height": 900})

    before, nb = _reopen(nb, "03_dataset_previewer.ipynb")
    (copy,) = _saved_checks(before, nb, widgets=1)
    assert "record 1 " in copy and "token lengths" in copy and "problems" in copy
    # Tables read left to right as in the live widget (JupyterLab right-aligns cells by default).
    aligns = nb.page.evaluate("""() => [...document.querySelectorAll('[data-ftmagic-static] td, [data-ftmagic-static] th')]
        .map(c => getComputedStyle(c).textAlign)""")
    assert aligns and set(aligns) == {"left"}
    nb.page.close()


def test_quickstart_in_jupyterlab(server, browser, screenshots, notebook_root):
    # A last cell that trains for long enough to be stopped from its widget.
    path = notebook_root / "01_quickstart.ipynb"
    notebook = nbformat.read(str(path), as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(STOP_CELL))
    nbformat.write(notebook, str(path))

    nb = _open(browser, server, "01_quickstart.ipynb")
    nb.start_running_all()
    stop_cell = nb.cell("%%finetune --name stopped")
    stop_cell.get_by_text(re.compile(r"step ([3-9]|\d\d+)/")).wait_for(timeout=1800 * 1000)
    stop_cell.get_by_role("button", name="Stop").click()
    nb.wait_until_done()

    # Stop: the run ended after the current step with a checkpoint, and the summary says how to resume.
    stopped = stop_cell.locator(".jp-OutputArea").inner_text()
    assert "status\tstopped" in stopped, stopped
    checkpoint = re.search(r"checkpoint\tstep (\d+): (runs/stop-test/\S+)\n", stopped)
    assert checkpoint, stopped
    assert f"steps\t{checkpoint.group(1)}/100000" in stopped
    assert (notebook_root / checkpoint.group(2)).is_dir()
    assert "--resume" in stopped

    _live_checks(nb, widgets=1)  # the previewer; each %%finetune widget became its summary
    run = nb.cell("%%finetune --name ft").locator(".jp-OutputArea").inner_text()
    assert "status\tfinished" in run and "data\t2000 train records (messages)" in run
    lines = [line for line in run.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), "a line shown twice"
    assert "ftmagic: tiny | lora" not in run  # the plan is in the summary, not printed beside it
    oops = nb.cell("%%finetune --name oops").locator(".jp-OutputArea").inner_text()
    assert "%%finetune cell:4: unknown key `lora_rank`; did you mean `lora_r`?" in oops
    assert re.search(r"exact match on held-out words: 0% before, \d+% after", nb.visible_text())

    for theme, suffix in ((DARK, "dark"), (LIGHT, "light")):
        nb.set_theme(theme)
        assert _contrast_problems(nb) == [], theme
        _shot(nb, nb.cell("%%finetune --name ft"), screenshots / f"finetune-{suffix}.png")
        _shot(nb, nb.cell("%ft_preview"), screenshots / f"preview-{suffix}.png")
    nb.page.set_viewport_size({"width": 800, "height": 900})
    nb.page.wait_for_timeout(800)
    assert _fits_width(nb) == []

    before, nb = _reopen(nb, "01_quickstart.ipynb")
    (copy,) = _saved_checks(before, nb, widgets=1)
    assert "messages" in copy and "record 0" in copy
    assert "status\tfinished" in nb.cell("%%finetune --name ft").locator(".jp-OutputArea").inner_text()
    nb.page.close()


# ----------------------------------------------------------------------------- Notebook 7


@pytest.mark.parametrize("name, widgets", [("02_memory_calculator.ipynb", 1), ("03_dataset_previewer.ipynb", 1)])
def test_notebook7_runs_saves_and_reopens(server, browser, notebook_root, name, widgets):
    copy = f"nb7_{name}"
    (notebook_root / copy).write_bytes((Path(__file__).parents[2] / "notebooks" / name).read_bytes())
    nb = _open(browser, server, copy, ui="notebook")
    nb.run_all()
    _live_checks(nb, widgets)
    before, nb = _reopen(nb, copy)
    _saved_checks(before, nb, widgets)
    nb.page.close()


# ----------------------------------------------------------------------------- without a kernel


def test_committed_notebooks_read_well_untrusted_and_as_static_html(server, browser, notebook_root, tmp_path):
    repo = Path(__file__).parents[2]
    # Untrusted (never saved here): JupyterLab sanitizes the HTML and shows no widget.
    (notebook_root / "untrusted_03.ipynb").write_bytes((repo / "notebooks" / "03_dataset_previewer.ipynb").read_bytes())
    nb = _open(browser, server, "untrusted_03.ipynb")
    nb.page.wait_for_timeout(3000)
    assert nb.widget_errors() == []
    _assert_left_aligned(nb.page, ".jp-Notebook .jp-OutputArea-output table")
    nb.page.close()
    # nbconvert's HTML, as nbviewer shows it.
    html = tmp_path / "03.html"
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--output", str(html),
                    str(repo / "notebooks" / "03_dataset_previewer.ipynb")], check=True, capture_output=True)
    page = browser.new_page()
    page.goto(html.as_uri())
    assert "Error displaying widget" not in page.inner_text("body")
    assert page.locator("[data-ftmagic-static]").count() == 1
    _assert_left_aligned(page, "[data-ftmagic-static] table")
    page.close()


def _assert_left_aligned(page, tables: str) -> None:
    """Every cell of the matching tables is left-aligned, and histogram bars start at their cell's left edge."""
    aligns = page.evaluate(f"""() => [...document.querySelectorAll('{tables}')].flatMap(t =>
        [...t.querySelectorAll('td, th')].map(c => getComputedStyle(c).textAlign))""")
    assert aligns and set(aligns) <= {"left", "start"}, set(aligns)
    offsets = page.evaluate("""() => [...document.querySelectorAll('.ftm-bar')].map(bar =>
        bar.getBoundingClientRect().left - bar.parentElement.getBoundingClientRect().left)""")
    assert offsets and max(offsets) < 12, offsets

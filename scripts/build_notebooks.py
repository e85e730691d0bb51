"""Write every example notebook from its readable source, then execute it so it carries outputs.

Each notebook is a Python module in ``scripts/notebook_sources/`` (``NAME``, ``KIND`` and
``CELLS``, a list of prose and code cells), so a change to a notebook is a reviewable
diff of text, not of JSON. This script turns each source into ``<KIND>/<NAME>.ipynb``:

* ``notebooks/``: executed with nbclient on this machine and written WITH their outputs,
  so GitHub shows the results. CI re-executes them with nbval.
* ``colab/``: executed here in smoke mode (``FTMAGIC_SMOKE=1``: every model id becomes the
  embedded tiny model, steps are capped) to prove they run, but written WITHOUT outputs:
  they are meant to be opened in Colab and run on a T4 with the real model, and CPU smoke
  outputs in them would mislead. The ``%pip install`` cell (tag ``nbval-skip``) is not run.

Usage::

    python scripts/build_notebooks.py                      # all of them
    python scripts/build_notebooks.py 01_quickstart        # just one (name or source module)
    python scripts/build_notebooks.py --no-execute         # write cells only (fast; no outputs)
    python scripts/build_notebooks.py --check              # exit 1 if a committed notebook's cells differ from its source
    python scripts/build_notebooks.py --threads 1          # on a busy machine: one torch thread per kernel

On a machine shared with other CPU-heavy jobs, torch's default of one thread per core
can make the training cells many times slower (threads wait on each other);
``--threads 1`` sets ``OMP_NUM_THREADS`` for the kernels.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOURCES = Path(__file__).resolve().parent / "notebook_sources"
SKIP_TAG = "nbval-skip"

# Source modules in the order they are built (and listed in the README).
MODULES = [
    "quickstart", "memory_calculator", "dataset_previewer", "qlora", "methods_comparison", "resume_and_merge",
    "export_gguf", "after_sft", "multi_gpu", "sweep",
    "colab_quickstart", "colab_memory_calculator", "colab_dataset_previewer", "colab_qlora",
    "colab_methods_comparison", "colab_resume_and_merge", "colab_export_gguf", "colab_after_sft", "colab_multi_gpu",
    "colab_sweep",
]

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
COLAB_METADATA = {"accelerator": "GPU", "colab": {"provenance": [], "gpuType": "T4"}}


def load_source(module: str):
    """Import ``scripts/notebook_sources/<module>.py``."""
    if str(SOURCES) not in sys.path:
        sys.path.insert(0, str(SOURCES))
    return importlib.import_module(module)


def notebook_path(source) -> Path:
    return ROOT / source.KIND / f"{source.NAME}.ipynb"


def make_notebook(source) -> nbformat.NotebookNode:
    """The notebook of a source, without outputs, with stable cell ids (diffs stay small)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    if source.KIND == "colab":
        nb.metadata.update(COLAB_METADATA)
    cells = []
    for i, cell in enumerate(source.CELLS):
        cell = nbformat.from_dict(dict(cell))
        cell["id"] = f"{source.NAME.replace('_', '-')[:50]}-{i:02d}"
        cells.append(cell)
    nb.cells = cells
    nbformat.validate(nb)
    return nb


@contextmanager
def _environment(smoke: bool, threads: Optional[int] = None):
    """The kernel inherits this process's environment: smoke mode for Colab notebooks only."""
    changes = {"FTMAGIC_SMOKE": "1" if smoke else None}
    if threads:
        changes.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    saved = {key: os.environ.get(key) for key in changes}
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(nb: nbformat.NotebookNode, cwd: Path, *, smoke: bool, timeout: int, threads: Optional[int] = None) -> None:
    """Run every cell (except ``nbval-skip`` ones) in a fresh kernel started in ``cwd``."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}},
                            skip_cells_with_tag=SKIP_TAG, record_timing=False)
    with _environment(smoke, threads):
        try:
            client.execute()
        except Exception:
            # Keep what ran, to see where it failed; the next good build replaces it.
            failed = cwd / "runs" / "failed.ipynb"
            failed.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, str(failed))
            print(f"partial notebook written to {failed}", file=sys.stderr)
            raise


def strip_outputs(nb: nbformat.NotebookNode) -> None:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None


from ftmagic.widgets.static import WIDGET_MIME, WIDGET_NOTE  # noqa: E402 - one wording for every widget output


def _clean_metadata(nb: nbformat.NotebookNode) -> None:
    """Drop what changes on every execution and is no use to a reader."""
    nb.metadata.pop("widgets", None)  # widget state: the static summaries carry the results
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for output in cell.get("outputs", []):
            # Without a kernel a widget falls back to its text/plain repr, a long
            # "VBox(children=(HTML(value='<style>..." string; say what it is instead
            # (ftmagic's own widgets already do).
            data = output.get("data", {})
            if WIDGET_MIME in data and "text/html" not in data:
                data["text/plain"] = WIDGET_NOTE


def build(module: str, *, run: bool = True, timeout: int = 900, threads: Optional[int] = None) -> Path:
    """Write one notebook; execute it when ``run`` (Colab ones in smoke mode, outputs dropped)."""
    source = load_source(module)
    nb = make_notebook(source)
    path = notebook_path(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    if run:
        started = time.perf_counter()
        execute(nb, path.parent, smoke=source.KIND == "colab", timeout=timeout, threads=threads)
        print(f"{path.relative_to(ROOT)}: executed in {time.perf_counter() - started:.1f}s", flush=True)
    if source.KIND == "colab":
        strip_outputs(nb)
    _clean_metadata(nb)
    nbformat.validate(nb)
    nbformat.write(nb, str(path))
    return path


def sources_match(module: str) -> list:
    """Differences between the committed notebook's cells and its source (empty when in sync)."""
    source = load_source(module)
    path = notebook_path(source)
    if not path.exists():
        return [f"{path.relative_to(ROOT)} is missing"]
    committed = nbformat.read(str(path), as_version=4)
    expected = make_notebook(source)
    problems = []
    if len(committed.cells) != len(expected.cells):
        problems.append(f"{path.name}: {len(committed.cells)} cells, the source has {len(expected.cells)}")
    for i, (got, want) in enumerate(zip(committed.cells, expected.cells)):
        if (got.cell_type, got.source, got.metadata.get("tags", [])) != \
                (want.cell_type, want.source, want.metadata.get("tags", [])):
            problems.append(f"{path.name}: cell {i} differs from its source")
    return problems


def _select(names: list) -> list:
    if not names:
        return list(MODULES)
    chosen = []
    for name in names:
        matches = [m for m in MODULES if m == name or load_source(m).NAME == name
                   or f"{load_source(m).KIND}/{load_source(m).NAME}" == name.removesuffix(".ipynb")]
        if not matches:
            raise SystemExit(f"build_notebooks: unknown notebook {name!r}; known: {', '.join(MODULES)}")
        chosen.extend(matches)
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="source modules or notebook names (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    parser.add_argument("--check", action="store_true", help="only compare committed notebooks with their sources")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell (default 900)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per kernel (OMP_NUM_THREADS)")
    args = parser.parse_args(argv)
    modules = _select(args.names)
    if args.check:
        problems = [p for m in modules for p in sources_match(m)]
        for problem in problems:
            print(problem)
        if problems:
            print("run `python scripts/build_notebooks.py` to rebuild them")
        return 1 if problems else 0
    for module in modules:
        path = build(module, run=not args.no_execute, timeout=args.timeout, threads=args.threads)
        if args.no_execute:
            print(f"{path.relative_to(ROOT)}: written (not executed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cell builders shared by the notebook sources: prose, code, and the Colab set-up cells.

A notebook source is a module with ``NAME``, ``KIND`` (``"notebooks"`` or ``"colab"``) and
``CELLS``, a list made with :func:`md` and :func:`code`. ``scripts/build_notebooks.py``
turns it into ``<KIND>/<NAME>.ipynb``.
"""

from __future__ import annotations

import textwrap

import nbformat

REPO = "ftmagic/ftmagic"
INSTALL_SPEC = f"ftmagic @ git+https://github.com/{REPO}"

# nbval markers (cell tags, invisible when the notebook is read):
CHECK = "nbval-check-output"  # outputs must match the committed ones (deterministic cells only)
SKIP = "nbval-skip"  # not executed under CI (only the Colab install cell)
RAISES = "raises-exception"  # the cell shows an error on purpose; nbval and nbclient go on


def _text(source: str) -> str:
    return textwrap.dedent(source).strip("\n")


def md(source: str) -> nbformat.NotebookNode:
    """A markdown cell; the text is dedented so sources can be indented like code."""
    return nbformat.v4.new_markdown_cell(_text(source))


def code(source: str, *tags: str) -> nbformat.NotebookNode:
    """A code cell with nbval tags (:data:`CHECK`, :data:`SKIP`, :data:`RAISES`)."""
    cell = nbformat.v4.new_code_cell(_text(source))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


# ----------------------------------------------------------------------------- Colab pieces


def colab_badge(name: str) -> nbformat.NotebookNode:
    """The "Open in Colab" badge for ``colab/<name>.ipynb``."""
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/colab/{name}.ipynb"
    return md(f'<a href="{url}" target="_parent">'
              '<img src="https://colab.research.google.com/assets/colab-badge.svg" alt="Open In Colab"/></a>')


def colab_install(extras: str = "") -> nbformat.NotebookNode:
    """``%pip install`` (tagged nbval-skip: CI tests the checkout it runs in); ``extras`` e.g. ``"gguf"``."""
    spec = INSTALL_SPEC.replace("ftmagic @", f"ftmagic[{extras}] @") if extras else INSTALL_SPEC
    return code(f'%pip install -q "{spec}"', SKIP)


def colab_gpu_check() -> list:
    """A GPU check that explains what to do on a CPU runtime and never fails."""
    return [
        md("""
        ### Is there a GPU?

        The next cell prints the GPU Colab gave you. On a **CPU runtime** it tells you how to
        switch instead of failing: *Runtime > Change runtime type > T4 GPU*, then run the
        notebook again from the top. Everything below would still run on the CPU, only
        much more slowly.
        """),
        code("""
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            print(f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}")
            if (props.major, props.minor) < (8, 0):
                print("No bf16 on this GPU: ftmagic trains in fp16 with a gradient scaler.")
        else:
            print("No GPU in this runtime. In Colab: Runtime > Change runtime type > T4 GPU, then run all cells again.")
            print("(The cells below still run on the CPU, but a real model trains very slowly there.)")
        """),
    ]


def colab_drive(run_name: str) -> list:
    """Mount Google Drive (falls back to a local ``runs/`` folder outside Colab) and set RUNS."""
    return [
        md("""
        ### Save runs to Google Drive

        Colab sessions drop. Writing `output_dir` to Google Drive keeps the checkpoints, so a
        new session continues where the old one stopped with `--resume`. Outside Colab (or if
        you decline the mount) the runs go to a local `runs/` folder instead.
        """),
        code(f"""
        import os

        try:
            from google.colab import drive
        except ImportError:  # not in Colab: keep the runs next to the notebook
            drive = None
        if drive is not None:
            drive.mount("/content/drive")
            RUNS = "/content/drive/MyDrive/ftmagic-runs"
        else:
            RUNS = "runs"
        os.makedirs(RUNS, exist_ok=True)
        OUT = os.path.join(RUNS, "{run_name}")
        print("runs are saved under", RUNS)
        """),
    ]


def colab_intro(name: str, title: str, text: str, extras: str = "") -> list:
    """Badge, title and the first paragraph, then install (with ``extras``), GPU check."""
    return [colab_badge(name), md(f"# {title}\n\n" + _text(text)), colab_install(extras), *colab_gpu_check()]

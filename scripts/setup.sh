#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine (the README's test command
# runs this, then `python -m pytest`). Each step says why it is here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch first: a bare `torch` requirement resolves to a multi-GB CUDA build.
pip install torch==2.13.0
# The package with the test extra (pytest, nbval, the real tracking and export libraries).
pip install -e '.[test]'
# llama.cpp's GGUF converter is not on PyPI as a package: ftmagic takes it from the source
# distribution of the llama-cpp-python it installed (pip's cache usually holds it already)
# and keeps it in ~/.cache/ftmagic; fetching it here keeps the tests off the network.
python -m ftmagic.engine.export.llamacpp

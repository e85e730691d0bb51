#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine (the README's test command
# runs this, then `python -m pytest`). Each step says why it is here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Playwright drives the system's Chromium below; it must never fetch a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

# The CPU build of torch first: a bare `torch` requirement resolves to a multi-GB CUDA build.
pip install torch==2.13.0
# llama-cpp-python (in the test extra, for GGUF k-quants and the llama.cpp runtime) compiles
# llama.cpp when pip has no wheel of it cached: on every core, not one.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# The package with the test extra (pytest, nbval, the real tracking and export libraries,
# JupyterLab, Notebook 7 and Playwright for the browser tests).
pip install -e '.[test]'
# llama.cpp's GGUF converter is not on PyPI as a package: ftmagic takes it from the source
# distribution of the llama-cpp-python it installed (pip's cache usually holds it already)
# and keeps it in ~/.cache/ftmagic; fetching it here keeps the tests off the network.
python -m ftmagic.engine.export.llamacpp

# Debian's Chromium for the browser tests (tests/browser). FTMAGIC_SKIP_BROWSER=1 skips
# both this step and those tests, for a machine where apt cannot be used.
if [ "${FTMAGIC_SKIP_BROWSER:-0}" != "1" ] && [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium
fi

# DeepSpeed, only to validate the DeepSpeed configs ftmagic writes (tests/test_strategies.py). It goes
# into its own folder, not site-packages: installed there, accelerate imports it on every full-weights
# save_pretrained and it prints a CPU warning into each run. Checking a config needs no GPU.
pip install --upgrade --no-deps --target build/deepspeed-check deepspeed==0.19.8 hjson==3.1.0 msgpack==1.2.4 einops==0.8.2

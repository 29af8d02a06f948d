#!/usr/bin/env bash
# Create .venv and install sae-pipeline with its dev tools, from nothing.
# torch first, pinned: on Linux PyPI serves the CUDA build (GPU boxes), and machines that carry a
# local CPU wheel of this version pick that up in seconds. Override with TORCH_SPEC=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# Two more peers for the tests, without their dependencies: sae-bench would pull a second (CUDA) torch and
# an old numpy, dictionary-learning nnsight; the tests only read sae-bench's result schemas and load
# dictionary-learning's modules that need torch alone.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "sae-bench==0.6.0" "dictionary-learning==0.1.0"
echo "installed: $(.venv/bin/sae --version)"

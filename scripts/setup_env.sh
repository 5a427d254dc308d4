#!/usr/bin/env bash
# Create (or reuse) .venv and install express with its test extras. Sourced by quickstart.sh, test.sh and .ci/run.
# The CPU build of torch is installed first: installing the project first would let pip pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet "torch==2.13.0" || python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
fi
# Always re-run: it is quick once everything is there, and picks up dependencies added since the last run. The bench
# extra (scvi-tools, scib-metrics) is part of the test environment: the quick benchmark test runs those arms too.
python -m pip install --quiet -e ".[dev,bench]"

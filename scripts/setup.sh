#!/usr/bin/env bash
# Create .venv (once) and install pkt with its test extras. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  # Pin first: here the pinned CPU wheel lies on local disk; elsewhere pip fetches it from PyPI.
  pip install -q "torch==2.13.0" || pip install -q torch
fi
if ! python -c "import pkt.core, prefect, peft, lm_eval, hypothesis, prefect_dask, psutil, threadpoolctl, setuptools.command.bdist_wheel" 2>/dev/null; then
  pip install -q -e ".[test,dask]"
fi

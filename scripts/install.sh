#!/usr/bin/env bash
# Installs fxdisag and its test dependencies into the current Python.
# If torch is not importable yet, installs the CPU wheel torch==2.13.0 first, so
# that resolving `torch>=...` never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[install] torch not found: installing the CPU wheel torch==2.13.0" >&2
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[test]"

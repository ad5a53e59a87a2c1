#!/usr/bin/env bash
# Create .venv and install distillmt into it (editable). `--dev` adds the test and lint tools.
#
# torch comes first and is chosen for the machine: the CUDA build where an NVIDIA GPU answers, else torch==2.13.0,
# which is a CPU build on machines that carry it locally. pyproject.toml only asks for torch>=2.4, which the installed
# build already satisfies, so the `pip install -e .` below never swaps it for a multi-GB CUDA download.
# Elsewhere, a CPU-only user can point TORCH_INDEX_URL at PyTorch's CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing torch (CUDA build)"
    "${PIP[@]}" "torch>=2.4"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "setup: installing torch from $TORCH_INDEX_URL"
    "${PIP[@]}" torch --index-url "$TORCH_INDEX_URL"
  else
    echo "setup: no GPU: installing torch==2.13.0 (CPU build)"
    "${PIP[@]}" torch==2.13.0
  fi
fi

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
echo "setup: installing distillmt${extras} and its pinned dependencies"
"${PIP[@]}" -e ".${extras}"
if [ -n "$extras" ]; then
  # COMET's tests: unbabel-comet 2.2.7 declares transformers<5 and numpy<2 but runs with the pinned versions, so it
  # goes in without its declared dependencies (the `comet` extra, part of `dev`, carries the ones it needs)
  "${PIP[@]}" --no-deps unbabel-comet==2.2.7
fi
"$VENV/bin/python" -c "import distillmt, torch; print(f'setup: distillmt {distillmt.__version__}, torch {torch.__version__}')"

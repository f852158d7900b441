#!/usr/bin/env bash
# Install the PyTorch build that fits this host, before the project itself.
#   - a GPU host (nvidia-smi answers): the CUDA build, from PyPI or $TORCH_INDEX_URL
#     (e.g. https://download.pytorch.org/whl/cu128);
#   - a CPU-only host: a CPU wheel already on the machine (pip's find-links) if there
#     is one, else the CPU build from https://download.pytorch.org/whl/cpu.
# Override with TORCH_SPEC (default torch==2.13.0) and TORCH_INDEX_URL.
set -euo pipefail
PIP=${PIP:-python -m pip}
SPEC=${TORCH_SPEC:-torch==2.13.0}

if $PIP show torch >/dev/null 2>&1 && [ -z "${TORCH_REINSTALL:-}" ]; then
  echo "install-torch: $($PIP show torch | awk '/^Version/{print $2}') already installed"
  exit 0
fi
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  exec $PIP install "$SPEC" --index-url "$TORCH_INDEX_URL"
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install-torch: GPU found, installing the CUDA build of $SPEC from PyPI"
  exec $PIP install "$SPEC"
fi
echo "install-torch: no GPU, installing the CPU build of $SPEC"
# A CPU wheel in pip's configured find-links (--no-index: never the CUDA build from PyPI) is
# installed from its file, its dependencies from the configured indexes.
local=$(mktemp -d)
trap 'rm -rf "$local"' EXIT
if $PIP download -q --no-deps --no-index -d "$local" "$SPEC" >/dev/null 2>&1 \
    && ls "$local"/torch-*+cpu-*.whl >/dev/null 2>&1; then
  echo "install-torch: using $(basename "$local"/torch-*.whl) found locally"
  $PIP install "$local"/torch-*.whl
else
  $PIP install "$SPEC" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
fi

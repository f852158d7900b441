#!/usr/bin/env bash
# The GPU figures the README quotes, from one run on one GPU, in under 5 minutes.
#
#   bench/gpu_check.sh                      # with the project installed in .venv (a CUDA build of torch)
#   PY=python3 bench/gpu_check.sh           # another interpreter
#
# On the GPU machine this project is lent (no network, no .venv, the corpus beside the
# checkout not carried): first `python bench/gpu_wheelhouse.py` here, which packs the missing
# wheels and the corpus into .gpu/; the device call carries .gpu and runs this script, which
# installs the wheels under /tmp and reads the corpus from there.
#
# Prints chars/s of the GRU and the LSTM at fp32 and mixed precision, eager against a
# CUDA graph at a fixed shape; awd_sgdr's weight-dropped LSTM eager against a graph, with
# their losses (part 2b); the wall time of the notebook's LSTM schedule (17 epochs) and a
# 1-GPU NCCL DDP task through the pipeline. Each part has its own time limit so a
# slow part cannot take the others down with it.
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
"$PY" -c "import torch, charlm; print('torch', torch.__version__)" || { echo "gpu_check: torch or charlm does not import"; exit 1; }
"$PY" -c "import flows.pipeline" || echo "gpu_check: the pipeline does not import (above), so part 4 will fail"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout 100 "$PY" bench/gpu_check.py --corpus "$CORPUS" --parts 1 || echo "part 1-2: exit $?"
timeout 60 "$PY" bench/gpu_check.py --corpus "$CORPUS" --parts 2 || echo "part 2b: exit $?"
timeout 90 "$PY" bench/gpu_check.py --corpus "$CORPUS" --parts 3 || echo "part 3: exit $? (124: over 90 s)"
timeout 100 "$PY" bench/gpu_check.py --corpus "$CORPUS" --parts 4 || echo "part 4: exit $?"

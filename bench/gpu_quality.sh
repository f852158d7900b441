#!/usr/bin/env bash
# awd_sgdr's LSTM toward the notebook's best (1.2524) on one GPU, each seed its own process,
# all at once: the preset as it is (2 x 512) and a wider variant (2 x 768), seeds 0 and 1.
#
#   bash bench/gpu_quality.sh            # after bench/gpu_check.sh (which installs .gpu/whl)
#   LIMIT=900 bash bench/gpu_quality.sh  # a longer time limit (default 240 s)
#
# Each variant's console (one line per epoch and seed, then the summary of
# bench/time_to_quality.py) goes to $LOGS/quality-<width>.log. A variant stopped at the
# limit still leaves its epoch lines there.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
[ -d /tmp/charlm-site ] && export PYTHONPATH="/tmp/charlm-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
CORPUS=${CORPUS:-../shared/data/nietzsche.txt}
[ -f "$CORPUS" ] || CORPUS=.gpu/nietzsche.txt
LIMIT=${LIMIT:-240} LOGS=${LOGS:-${OUT:-/tmp}} DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
for width in 512 768; do
  timeout -k 5 "$LIMIT" "$PY" bench/time_to_quality.py --corpus "$CORPUS" --lstm-only --parallel --snapshots \
    --seeds 0 1 --workdir "/tmp/quality-$width" --json "$LOGS/quality-$width.json" \
    --set "device=$DEVICE" --set "model.hidden_size=$width" >"$LOGS/quality-$width.log" 2>&1 &
done
wait
for width in 512 768; do echo "== 2 x $width"; grep -E "epoch +(8|16|32|64)/|seed [01]:|median|snapshots|Error|error" "$LOGS/quality-$width.log"; done

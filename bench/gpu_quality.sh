#!/usr/bin/env bash
# awd_sgdr's LSTM toward the notebook's best (1.2524) on one GPU, every seed of every variant
# its own process, all at once (a char-RNN step leaves an H200 mostly idle: four runs at once
# each kept ~120-150K chars/s, two at once no more).
#
#   bash bench/gpu_quality.sh                                  # the preset (2 x 512) and 2 x 768
#   bash bench/gpu_quality.sh "" "model.hidden_size=768 model.dropout=0.4"   # variants: overrides
#   SEEDS="0 1 2 3" LIMIT=900 bash bench/gpu_quality.sh ...    # more seeds, a longer limit (240 s)
#
# Each argument is one variant: space-separated KEY=VALUE overrides of awd_sgdr ("" is the
# preset). On the lent machine it uses .gpu/ as bench/gpu_check.sh does (bench/gpu_env.sh). Variant N's
# console (one line per epoch and seed, then bench/time_to_quality.py's summary with the
# snapshot ensembles) goes to $LOGS/quality-N.log, headed by its overrides; a variant stopped
# at the limit still leaves its epoch lines there.
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
LIMIT=${LIMIT:-240} LOGS=${LOGS:-${OUT:-/tmp}} DEVICE=${DEVICE:-cuda} SEEDS=${SEEDS:-0 1}
[ $# -gt 0 ] || set -- "" "model.hidden_size=768"
n=0
for variant in "$@"; do
  n=$((n + 1))
  sets=(--set "device=$DEVICE")
  for override in $variant; do sets+=(--set "$override"); done
  # shellcheck disable=SC2086  # SEEDS is a list
  { echo "variant $n: awd_sgdr ${variant:-(the preset)}, seeds $SEEDS"
    timeout -k 5 "$LIMIT" "$PY" bench/time_to_quality.py --corpus "$CORPUS" --lstm-only --parallel --snapshots \
      --seeds $SEEDS --workdir "/tmp/quality-$n" --json "$LOGS/quality-$n.json" "${sets[@]}"
  } >"$LOGS/quality-$n.log" 2>&1 &
done
wait
for i in $(seq 1 $n); do
  head -1 "$LOGS/quality-$i.log"
  grep -E "epoch +(8|16|32|64)/|seed [0-9]+:|median|snapshots|Error" "$LOGS/quality-$i.log"
done

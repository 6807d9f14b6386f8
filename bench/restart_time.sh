#!/usr/bin/env bash
# How long a resumed run takes to start training again, with and without the persistent
# compilation cache (bag_jax.console): the digits config, two epochs run, then extended by a third (every program already compiled once).
#   bash bench/restart_time.sh [ROUNDS]
# Prints one line per resume: cache on/off and the wall time of the resumed command.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
FLAGS=(--config=configs/digits_w3a3.py --config.teacher.epochs=1 --config.iters_per_epoch=2 --config.warmup_epochs=1
       --config.calibration_epochs=1 --config.image_grid_every=0)
export BAG_JAX_COMPILATION_CACHE="$TMP/cache"
unset JAX_COMPILATION_CACHE_DIR
python run.py "${FLAGS[@]}" --config.epochs=2 --workdir="$TMP/first" > /dev/null 2>&1
for round in $(seq 1 "$ROUNDS"); do
  for cache in off "$TMP/cache"; do
    rm -rf "$TMP/resume"; cp -r "$TMP/first" "$TMP/resume"
    start=$(date +%s.%N)
    BAG_JAX_COMPILATION_CACHE="$cache" python run.py "${FLAGS[@]}" --config.epochs=3 --workdir="$TMP/resume" \
      > /dev/null 2>&1
    printf 'round %d, cache %s: %.1f s\n' "$round" "$([ "$cache" = off ] && echo off || echo on)" \
      "$(echo "$(date +%s.%N) - $start" | bc)"
  done
done

#!/usr/bin/env bash
# The run-comparing tests under XLA's code for several instruction sets, ROUNDS times each:
#   bash bench/isa_matrix.sh [ROUNDS] [ISA ...]      (ISA: default, AVX2, AVX, SSE4_2)
# XLA_FLAGS=--xla_cpu_max_isa=X makes this CPU round floats as a CPU with only X would, within
# XLA's own code. The tests run as README runs them (two processes, tests/conftest.py's flags). One line per run: ISA, round, result, seconds; the logs go to $LOGDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}; shift || true
ISAS=("${@:-default AVX2 AVX SSE4_2}")
read -r -a ISAS <<< "${ISAS[*]}"
LOGDIR=${LOGDIR:-/tmp/bag_jax_isa_matrix}
TESTS=${TESTS:-tests/test_parallel.py tests/test_sweep.py tests/test_recovery.py tests/test_dfq.py}
mkdir -p "$LOGDIR"
for isa in "${ISAS[@]}"; do mkdir -p "$LOGDIR/cache_$isa"; done
for round in $(seq 1 "$ROUNDS"); do
  for isa in "${ISAS[@]}"; do
    flags=""; [ "$isa" != default ] && flags="--xla_cpu_max_isa=$isa"
    log="$LOGDIR/${isa}_${round}.log"
    start=$(date +%s)
    # Each ISA keeps its compiled programs between rounds (tests/conftest.py): the first round
    # compiles, the others execute the same programs again.
    BAG_JAX_TEST_CACHE="$LOGDIR/cache_$isa" XLA_FLAGS="$flags" python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider $TESTS > "$log" 2>&1
    code=$?
    # pytest's result line (the damaged-step test prints tensorstore's text after it, at exit).
    echo "$isa round $round: $(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -n 1 | sed 's/=//g' | xargs) (exit $code, $(( $(date +%s) - start )) s)"
  done
done

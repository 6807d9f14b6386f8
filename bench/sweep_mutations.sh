#!/usr/bin/env bash
# Mutation check of tests/test_sweep_fields.py: for each sweepable field (or those given), a copy
# of the repository in which every read of that field in the step takes the config's constant
# instead of the run's swept value (settings.Hypers.with_values drops it), then the tests. Each
# line says whether the tests caught the mutation (they must: "caught").
#   bash bench/sweep_mutations.sh [-k PYTEST_EXPRESSION] [FIELD ...]
set -uo pipefail
cd "$(dirname "$0")/.."
K=""
if [ "${1:-}" = "-k" ]; then K="$2"; shift 2; fi
FIELDS=("$@")
if [ ${#FIELDS[@]} -eq 0 ]; then
  read -r -a FIELDS <<< "$(python -c 'from bag_jax import settings; print(*settings.SWEEPABLE)')"
fi
COPY=$(mktemp -d)
trap 'rm -rf "$COPY"' EXIT
for field in "${FIELDS[@]}"; do
  rm -rf "$COPY/repo" && mkdir -p "$COPY/repo"
  tar --exclude=.venv --exclude=.git -cf - . | tar -xf - -C "$COPY/repo"
  python - "$COPY/repo/bag_jax/settings.py" "$field" <<'PY'
import sys
path, field = sys.argv[1], sys.argv[2]
s = open(path).read()
old = "        return dataclasses.replace(self, **{ATTRIBUTE[field]: value for field, value in values.items()})"
assert old in s, 'settings.Hypers.with_values changed: update this script'
s = s.replace(old, "        return dataclasses.replace(self, **{ATTRIBUTE[f]: v for f, v in values.items() if f != %r})" % field)
open(path, 'w').write(s)
PY
  start=$(date +%s)
  (cd "$COPY/repo" && python -m pytest -q -x -p no:cacheprovider tests/test_sweep_fields.py ${K:+-k "$K"} > "$COPY/log" 2>&1)
  code=$?
  result=$([ $code -ne 0 ] && echo caught || echo MISSED)
  echo "$field: $result ($(tail -n 1 "$COPY/log" | sed 's/=//g' | xargs), $(( $(date +%s) - start )) s)"
done

#!/usr/bin/env bash
# Run the unit tests and one real deployment test against the OLDEST supported Flower
# (pyproject.toml: flwr>=1.41,<2), in a virtual environment of its own.
# Called at the end of scripts/test.sh (CI); see docs/flower-versions.md.
#
#   bash scripts/test-oldest-flwr.sh [extra pytest args]
#
# FTX_OLDEST_FLWR=VERSION   Flower release to test (default 1.41.0); 0 skips.
# FTX_OLDEST_VENV=DIR       its virtual environment (default .venv-oldest-flwr).
#
# Needs a package index to install that Flower release. When pip cannot get it (an
# offline machine), the script says so and exits 0: the main suite has already run.
set -euo pipefail
cd "$(dirname "$0")/.."
FLWR_VERSION=${FTX_OLDEST_FLWR:-1.41.0}
if [ "$FLWR_VERSION" = 0 ]; then
  echo "oldest-flwr: skipped (FTX_OLDEST_FLWR=0)"
  exit 0
fi
PY=${PYTHON:-python3}
VENV=${FTX_OLDEST_VENV:-.venv-oldest-flwr}
LOG=$(mktemp -t ftx-oldest-flwr-pip.XXXXXX)
trap 'rm -f "$LOG"' EXIT

echo "oldest-flwr: installing flwr==$FLWR_VERSION into $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
ok=0
for attempt in 1 2; do
  if "$VENV/bin/python" -m pip install -q "flwr==$FLWR_VERSION" -e ".[dev,s3,bench]" \
      >"$LOG" 2>&1; then
    ok=1
    break
  fi
  sleep 5
done
if [ "$ok" != 1 ]; then
  tail -n 5 "$LOG" | grep -v "^WARNING: Location" || true
  echo "oldest-flwr: SKIPPED: could not install flwr==$FLWR_VERSION (no package index?)"
  exit 0
fi
got=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('flwr'))")
if [ "$got" != "$FLWR_VERSION" ]; then
  echo "oldest-flwr: FAILED: asked for flwr==$FLWR_VERSION, the environment has $got" >&2
  exit 1
fi

# Unit tests (no real servers), then one real deployment: the migration guide's test
# (a plain Flower app and its offloaded version over shm://, in flower-superlink +
# 2 flower-supernode of this Flower release).
export PATH="$PWD/$VENV/bin:$PATH"
echo "oldest-flwr: flwr $got: unit tests + tests/integration/test_migrate.py"
rc=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  -m "not integration and not slow and not radosgw and not mpi" tests/ "$@" || rc=$?
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/integration/test_migrate.py \
  "$@" || rc=$?
exit "$rc"

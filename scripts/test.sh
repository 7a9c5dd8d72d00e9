#!/usr/bin/env bash
# Set up a fresh virtual environment and run the whole test suite.
# Used by the README and by CI (.ci/run). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch is never pulled in here (the torch extra is not requested).
"$VENV/bin/python" -m pip install -q -e ".[dev,s3,mpi,bench]"
export PATH="$PWD/$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest -ra "$@"

#!/usr/bin/env bash
# Set up a fresh virtual environment and run the demo: a real local Flower deployment
# (SuperLink + 2 SuperNodes on 127.0.0.1), the example app in-band and over each link.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q -e ".[s3,testing]" "moto[server]>=5.0"
export PATH="$PWD/$VENV/bin:$PATH"
exec "$VENV/bin/flwr-transports" demo "$@"

#!/usr/bin/env bash
# Build the sdist and the wheel, check their metadata, install the WHEEL (not editable)
# into a fresh virtual environment and run, from outside the source tree, a deployment
# smoke test (scripts/wheel_smoke.py) and the demo. A file missing from the wheel, or an
# import of something that is not in it (the benchmark harness, a test helper), fails.
# Called at the end of scripts/test.sh (CI).
#
#   bash scripts/test-wheel.sh
#
# VENV=DIR            the development venv with build + twine (default .venv)
# FTX_WHEEL_VENV=DIR  the fresh venv for the wheel (default: a temporary one, removed)
# FTX_WHEEL=0         skip.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${FTX_WHEEL:-1}" = 0 ]; then
  echo "wheel: skipped (FTX_WHEEL=0)"
  exit 0
fi
REPO=$PWD
PY=${PYTHON:-python3}
DEV=${VENV:-.venv}
TMP=$(mktemp -d -t ftx-wheel.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
DIST="$TMP/dist"

echo "wheel: python -m build (sdist + wheel)"
"$DEV/bin/python" -m build -q --outdir "$DIST" . >"$TMP/build.log" 2>&1 || {
  grep -v "^WARNING: Location" "$TMP/build.log" | tail -n 30 >&2
  echo "wheel: FAILED: python -m build" >&2; exit 1; }
"$DEV/bin/python" -m twine check --strict "$DIST"/*
WHEEL=$(ls "$DIST"/flwr_transports-*.whl)
# only the library: flwr_transports/ and its metadata, no C source, no harness
"$DEV/bin/python" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
bad = [n for n in names if not (n.startswith("flwr_transports/")
                                or n.split("/")[0].endswith(".dist-info"))]
bad += [n for n in names if n.endswith((".c", ".h", ".so", ".sh")) or "/bench/" in n
        or "ftx_bench" in n or "radosgw" in n or n.startswith("flwr_transports/tests")]
if bad:
    sys.exit(f"wheel: FAILED: files that are not the library: {bad}")
need = ["flwr_transports/__init__.py", "flwr_transports/testing/__init__.py",
        "flwr_transports/testing/deploy.py", "flwr_transports/links/chunks/server.py"]
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"wheel: FAILED: missing {missing}")
print(f"wheel: {len(names)} files, library only")
PY
ls -l "$DIST"

WV=${FTX_WHEEL_VENV:-$TMP/venv}
rm -rf "$WV"
"$PY" -m venv "$WV"
"$WV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "wheel: installing $(basename "$WHEEL")[s3,testing] + moto into a fresh venv"
"$WV/bin/python" -m pip install -q "$WHEEL[s3,testing]" "moto[server]>=5.0" \
  >"$TMP/install.log" 2>&1 || {
  grep -v "^WARNING: Location" "$TMP/install.log" | tail -n 20 >&2
  echo "wheel: FAILED: pip install of the wheel" >&2; exit 1; }
# From outside the source tree, so that nothing is imported from the checkout; the
# Flower processes find flwr-transports in this venv (PATH) and nowhere else.
cd "$TMP"
export PATH="$WV/bin:$PATH"
rc=0
"$WV/bin/python" "$REPO/scripts/wheel_smoke.py" "$REPO/examples/quickstart-offload" || rc=$?
FLWR_TRANSPORTS_DEMO_APP="$REPO/examples/quickstart-offload" \
  "$WV/bin/flwr-transports" demo --rounds 1 --model-mib 16 \
  || rc=$?
[ "$rc" = 0 ] && echo "wheel: OK (installed wheel: smoke test + demo)" \
  || echo "wheel: FAILED (exit $rc)" >&2
exit "$rc"

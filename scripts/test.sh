#!/usr/bin/env bash
# Set up a fresh virtual environment and run the whole test suite.
# Used by the README and by CI (.ci/run). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch is never pulled in by the extras (the torch extra is not requested).
"$VENV/bin/python" -m pip install -q -e ".[dev,s3,mpi,testing,docs,simulation]" -e benchmarks
# torch is optional: it enables the PyTorch RPC benchmark tests. Installed only from a
# local CPU wheel (an unpinned or PyPI torch pulls GBs of CUDA packages); FTX_TORCH=0
# skips it, FTX_TORCH=1 installs torch==2.13.0 from wherever pip finds it.
TORCH_WHEELS=${FTX_TORCH_WHEELS:-/opt/wheels}
case "${FTX_TORCH:-auto}" in
  0) echo "torch: not installed (FTX_TORCH=0); the torch-rpc tests will skip" ;;
  *)
    if [ "${FTX_TORCH:-auto}" = 1 ] || ls "$TORCH_WHEELS"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
      "$VENV/bin/python" -m pip install -q torch==2.13.0 \
        || echo "torch: install failed; the torch-rpc tests will skip"
    else
      echo "torch: no local CPU wheel in $TORCH_WHEELS; the torch-rpc tests will skip" \
           "(FTX_TORCH=1 installs torch==2.13.0 anyway)"
    fi ;;
esac
# rdma:// engine (NVIDIA NIXL + its UCX), the light way: --no-deps, because its package
# metadata requires torch (an unpinned torch = a CUDA build of several GB); it imports
# only numpy. FTX_RDMA=0 skips it (the rdma:// tests then skip with the install line).
if [ "${FTX_RDMA:-1}" != 0 ]; then
  "$VENV/bin/python" -m pip install -q --no-deps "nixl-cu12==1.5.1" \
    || echo "nixl: install failed; the rdma:// tests will skip"
fi
# A full run (no pytest arguments) also tests the oldest supported Flower release in a
# venv of its own: unit tests + one real deployment (scripts/test-oldest-flwr.sh,
# docs/flower-versions.md). FTX_OLDEST_FLWR=0 skips it.
BASE_PATH=$PATH
export PATH="$PWD/$VENV/bin:$PATH"
rc=0
"$VENV/bin/python" -m pytest -ra "$@" || rc=$?
if [ $# -eq 0 ]; then
  PATH=$BASE_PATH bash scripts/test-oldest-flwr.sh || rc=$?
fi
exit "$rc"

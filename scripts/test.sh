#!/usr/bin/env bash
# Set up a fresh virtual environment and run the whole test suite.
# Used by the README and by CI (.ci/run). Safe to re-run.
#
# It installs everything the tests need, so that a test skips only for a reason on the
# explicit allow-list in tests/conftest.py (RDMA hardware, a GPU, a host without
# apt-get/dpkg for radosgw, no root for network namespaces, no C compiler, no IPv6
# loopback) or for an opt-out chosen here; any other skip FAILS the run:
#   FTX_TORCH=0       do not install torch (~200 MB CPU wheel; several GB from PyPI)
#   FTX_RDMA=0        do not install the rdma:// engine (NVIDIA NIXL)
#   FTX_RADOSGW=0     do not download Ceph radosgw (~66 MB of Debian packages)
#   FTX_OLDEST_FLWR=0 do not test the oldest supported Flower (scripts/test-oldest-flwr.sh)
#   FTX_WHEEL=0       do not build + test the wheel (scripts/test-wheel.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The library (editable) with every extra the tests use, and the benchmark harness
# (benchmarks/: the ftx-bench project, not part of the wheel).
"$VENV/bin/python" -m pip install -q -e ".[dev,s3,mpi,testing,docs,simulation,ray]" -e benchmarks
# torch, pinned. pip takes a local CPU wheel where the machine's pip configuration
# offers one (find-links / a local index); elsewhere the package index's build (on PyPI
# for Linux x86-64 that is a CUDA build of several GB: set FTX_TORCH=0 to opt out, and
# the torch tests then skip as an allowed opt-out).
if [ "${FTX_TORCH:-1}" = 0 ]; then
  echo "torch: not installed (FTX_TORCH=0); the torch tests will skip (allowed opt-out)"
else
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
# rdma:// engine (NVIDIA NIXL + its UCX), the light way: --no-deps, because its package
# metadata requires torch (an unpinned torch = a CUDA build of several GB); it imports
# only numpy. FTX_RDMA=0 opts out (the rdma:// tests then skip, allowed).
if [ "${FTX_RDMA:-1}" = 0 ]; then
  echo "nixl: not installed (FTX_RDMA=0); the rdma:// engine tests will skip (allowed opt-out)"
else
  "$VENV/bin/python" -m pip install -q --no-deps "nixl-cu12==1.5.1"
fi
BASE_PATH=$PATH
export PATH="$PWD/$VENV/bin:$PATH"
rc=0
"$VENV/bin/python" -m pytest -ra --durations=30 "$@" || rc=$?
# A full run (no pytest arguments) also
# - tests the oldest supported Flower release in a venv of its own: unit tests + one real
#   deployment (scripts/test-oldest-flwr.sh, docs/flower-versions.md);
# - builds the sdist + wheel, checks them, installs the WHEEL into a fresh venv and runs
#   a deployment smoke test and the demo from it (scripts/test-wheel.sh).
if [ $# -eq 0 ]; then
  PATH=$BASE_PATH bash scripts/test-oldest-flwr.sh || rc=$?
  PATH=$BASE_PATH VENV=$VENV bash scripts/test-wheel.sh || rc=$?
fi
exit "$rc"

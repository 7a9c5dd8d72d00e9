"""The benchmark harness of flwr-transports (``ftx-bench``; docs/benchmarks.md).

Lives in ``benchmarks/`` at the repository root, outside the library's wheel; install it
from a clone with ``pip install -e benchmarks`` (scripts/test.sh does).
"""

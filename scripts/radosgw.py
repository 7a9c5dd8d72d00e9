#!/usr/bin/env python3
"""Command-line entry to :mod:`flwr_transports.bench.radosgw` (kept for muscle memory):
``python scripts/radosgw.py fetch|start|stop|env``; also ``python -m
flwr_transports.bench.radosgw ...``."""

import sys

from flwr_transports.bench.radosgw import main

if __name__ == "__main__":
    sys.exit(main())

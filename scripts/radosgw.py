#!/usr/bin/env python3
"""Command-line entry to :mod:`ftx_bench.radosgw` (kept for muscle memory):
``python scripts/radosgw.py fetch|start|stop|env``; also ``python -m
ftx_bench.radosgw ...``."""

import sys

from ftx_bench.radosgw import main

if __name__ == "__main__":
    sys.exit(main())

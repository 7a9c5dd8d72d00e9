"""``python -m ftx_bench ...`` = ``ftx-bench ...``."""

import sys

from .cli import main

sys.exit(main())

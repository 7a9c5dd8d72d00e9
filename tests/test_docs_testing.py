"""docs/testing.md's in-process example is executed as written (so it cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def test_the_in_process_example_runs_as_written(tmp_path):
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    ns: dict = {}
    exec(compile(block, str(DOC), "exec"), ns)  # noqa: S102 - our own documentation
    ns["test_my_strategy_is_unchanged_by_offload"](tmp_path)

"""The README's quick start, pasted into a plain Flower app as a user would.

``quickstart_blocks()`` reads the three marked code blocks of README.md
(``<!-- quickstart:pyproject|server|client -->``); ``build_app(dst)`` copies the plain
Flower app tests/apps/plain_app to ``dst`` and pastes them in: the pyproject block
replaces the ``[tool.flwr.app.config]`` header (its keys join the table), the import
lines of the server/client blocks go after the file's imports, the other lines of the
server block replace the plain app's ``strategy = ...`` / ``result = ...`` lines (at
their indentation), the client block's line replaces ``app = ClientApp()``. Nothing
else is edited: a block that no longer fits a Flower app fails the test.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN_APP = ROOT / "tests" / "apps" / "plain_app"
_BLOCK = re.compile(r"^<!-- quickstart:(\w+) -->\n```\w+\n(.*?)^```\s*$",
                    re.DOTALL | re.MULTILINE)


def quickstart_blocks(path: Path = ROOT / "README.md") -> dict[str, str]:
    blocks = dict(_BLOCK.findall(path.read_text(encoding="utf-8")))
    assert set(blocks) == {"pyproject", "server", "client"}, sorted(blocks)
    return blocks


def _paste_imports(src: str, block: str) -> tuple[str, list[str]]:
    lines = block.strip("\n").splitlines()
    imports = [ln for ln in lines if ln.startswith(("from ", "import "))]
    body = [ln for ln in lines if ln.strip() and ln not in imports]
    src_lines = src.splitlines()
    last = max(i for i, ln in enumerate(src_lines) if ln.startswith(("from ", "import ")))
    src_lines[last + 1:last + 1] = imports
    return "\n".join(src_lines) + "\n", body


def _replace_line(src: str, pattern: str, new: list[str]) -> str:
    m = re.search(rf"^([ \t]*){pattern}.*$", src, flags=re.MULTILINE)
    assert m, f"the plain app has no line matching {pattern!r}"
    indent = m.group(1)
    return src[:m.start()] + "\n".join(indent + ln for ln in new) + src[m.end():]


def build_app(dst: Path, blocks: dict[str, str] | None = None) -> Path:
    blocks = quickstart_blocks() if blocks is None else blocks
    shutil.copytree(PLAIN_APP, dst, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = dst / "pyproject.toml"
    text = pyproject.read_text()
    assert text.count("[tool.flwr.app.config]\n") == 1
    pyproject.write_text(text.replace("[tool.flwr.app.config]\n", blocks["pyproject"]))

    server = dst / "plain_app" / "server_app.py"
    src, body = _paste_imports(server.read_text(), blocks["server"])
    strategy = [ln for ln in body if ln.startswith("strategy =")]
    rest = [ln for ln in body if not ln.startswith("strategy =")]
    src = _replace_line(src, r"strategy = FedAvg\(", strategy)
    src = _replace_line(src, r"result = strategy\.start\(", rest)
    server.write_text(src)

    client = dst / "plain_app" / "client_app.py"
    src, body = _paste_imports(client.read_text(), blocks["client"])
    client.write_text(_replace_line(src, r"app = ClientApp\(\)", body))
    return dst

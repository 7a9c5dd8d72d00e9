"""docs/migrate.md, applied as written: the diff blocks of the page, in order.

``migrate(dst)`` copies the plain Flower app ``tests/apps/plain_app`` to ``dst`` and
applies every fenced ``diff`` block of docs/migrate.md to it with a strict unified-diff
applier (each hunk's context and removed lines must match the file exactly at the line
the hunk names, after the shifts of the hunks before it; no fuzz), so the page and the
tests cannot drift apart: a step that no longer applies, or no longer works, fails.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "migrate.md"
PLAIN_APP = ROOT / "tests" / "apps" / "plain_app"

_BLOCK = re.compile(r"^```diff\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class DiffError(ValueError):
    """A diff block of the page does not apply to the app."""


def diff_blocks(text: str | None = None) -> list[str]:
    """The fenced ``diff`` blocks of docs/migrate.md, in page order."""
    return _BLOCK.findall(DOC.read_text(encoding="utf-8") if text is None else text)


def _file_patches(block: str) -> list[tuple[str, list[str]]]:
    """Split one diff block into (relative path, lines of its hunks)."""
    lines = block.splitlines()
    out: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("--- "):
            old, new = lines[i][4:].strip(), lines[i + 1][4:].strip()
            if not (old.startswith("a/") and new.startswith("b/") and old[2:] == new[2:]):
                raise DiffError(f"unexpected file header {lines[i]!r} / {lines[i + 1]!r}")
            body: list[str] = []
            i += 2
            while i < len(lines) and not lines[i].startswith("--- "):
                body.append(lines[i])
                i += 1
            out.append((old[2:], body))
        elif lines[i].strip():
            raise DiffError(f"text outside a file patch: {lines[i]!r}")
        else:
            i += 1
    return out


def apply_patch(path: Path, body: list[str]) -> None:
    """Apply the hunks in ``body`` to ``path`` strictly (exact context, exact lines)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    shift = 0
    i = 0
    while i < len(body):
        m = _HUNK.match(body[i])
        if not m:
            raise DiffError(f"{path.name}: expected a hunk header, got {body[i]!r}")
        start = int(m.group(1))
        n_old = int(m.group(2) or 1)
        n_new = int(m.group(4) or 1)
        i += 1
        old: list[str] = []
        new: list[str] = []
        while i < len(body) and not body[i].startswith("@@"):
            line = body[i]
            tag, rest = (line[:1], line[1:]) if line else (" ", "")
            if tag not in " +-":
                raise DiffError(f"{path.name}: bad diff line {line!r}")
            if tag in " -":
                old.append(rest)
            if tag in " +":
                new.append(rest)
            i += 1
        if (len(old), len(new)) != (n_old, n_new):
            raise DiffError(f"{path.name}: hunk at line {start} counts {len(old)}/{len(new)}"
                            f" lines, its header says {n_old}/{n_new}")
        at = start - 1 + shift
        if lines[at:at + len(old)] != old:
            got = "\n".join(lines[at:at + len(old)])
            raise DiffError(f"{path.name}: hunk at line {start} does not match the file:\n"
                            f"--- expected\n" + "\n".join(old) + f"\n--- found\n{got}")
        lines[at:at + len(old)] = new
        shift += len(new) - len(old)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def migrate(dst: Path, text: str | None = None) -> list[str]:
    """Copy the plain app to ``dst`` and apply the page's diffs; return the files changed."""
    shutil.copytree(PLAIN_APP, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    changed = []
    blocks = diff_blocks(text)
    if not blocks:
        raise DiffError("docs/migrate.md has no diff block")
    for block in blocks:
        for rel, body in _file_patches(block):
            target = (dst / rel).resolve()
            if dst.resolve() not in target.parents or not target.is_file():
                raise DiffError(f"the page patches {rel!r}, which is not a file of the app")
            apply_patch(target, body)
            changed.append(rel)
    return changed

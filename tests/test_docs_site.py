"""The documentation site (mkdocs.yml) builds with ``mkdocs build --strict``.

Strict mode turns every warning into an error: a link to a page or anchor that does
not exist, an unresolvable ``::: module.name`` in the API reference, a docstring
mkdocstrings cannot parse. Pages in docs/ that are not in the nav are only reported
at INFO level (``validation.omitted_files``), so adding a page never breaks the build.

Skipped only when the docs extra is not installed (``pip install -e ".[docs]"``;
scripts/test.sh installs it, so CI runs these).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
pytest.importorskip("material", reason="the docs extra is not installed (mkdocs-material)")
pytest.importorskip("mkdocstrings_handlers.python",
                    reason="the docs extra is not installed (mkdocstrings[python])")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # the API reference imports nothing, but griffe must find this checkout's package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )


def _copy_site_sources(dst: Path) -> Path:
    """A private copy of mkdocs.yml + docs/ to break on purpose."""
    shutil.copy(ROOT / "mkdocs.yml", dst / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", dst / "docs")
    return dst / "mkdocs.yml"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    res = _build(ROOT / "mkdocs.yml", out)
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout}\n{res.stderr}"
    return out


def _nav_pages() -> list[str]:
    import yaml  # comes with mkdocs

    def walk(items) -> list[str]:
        out = []
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            out += walk(value) if isinstance(value, list) else [value]
        return out

    return walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])


def test_every_docs_page_is_built(site):
    pages = sorted(p.relative_to(ROOT / "docs") for p in (ROOT / "docs").rglob("*.md"))
    assert len(pages) >= 10
    for page in pages:
        html = site / page.with_suffix(".html")
        assert html.is_file(), f"{page} was not rendered"
        assert "<h1" in html.read_text(encoding="utf-8"), f"{page} has no title"


def test_nav_lists_existing_pages_and_the_main_ones(site):
    nav = _nav_pages()
    for page in nav:
        assert (ROOT / "docs" / page).is_file(), f"nav names a missing page {page}"
    for must in ("index.md", "offload.md", "api.md", "links/shm.md", "benchmarks.md"):
        assert must in nav, must


def test_api_reference_is_rendered_from_docstrings(site):
    html = (site / "api.html").read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", "", html)
    # signatures and docstring text of the public entry points, as generated
    for name in ("offload", "offload_grid", "PayloadMod", "ServerLink", "ClientLink", "encode", "Reference",
                 "LocalDeployment"):
        assert re.search(rf'id="[\w.]*\b{name}"', html), name
    assert "Wrap" in text and "so large ArrayRecords travel over" in text
    assert "ClientApp mod resolving offloaded payloads" in text


def test_assets_are_copied(site):
    assert (site / "img" / "bench-e2e-profiles.png").is_file()
    assert (site / "bench-data" / "e2e-lo-final.json").is_file()


def test_strict_build_fails_on_a_broken_link(tmp_path):
    cfg = _copy_site_sources(tmp_path)
    page = tmp_path / "docs" / "offload.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [gone](no-such-page.md).\n",
                    encoding="utf-8")
    res = _build(cfg, tmp_path / "site")
    assert res.returncode != 0
    assert "no-such-page.md" in res.stderr + res.stdout


def test_a_page_missing_from_the_nav_does_not_break_the_build(tmp_path):
    cfg = _copy_site_sources(tmp_path)
    (tmp_path / "docs" / "new-page.md").write_text("# New\n\n[home](index.md)\n",
                                                    encoding="utf-8")
    res = _build(cfg, tmp_path / "site")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "site" / "new-page.html").is_file()
    assert "new-page.md" in res.stderr  # reported (INFO), not an error

"""Regenerate the option tables in docs/ from the options each link and the wrapper
declare (``Option`` specs in the code). Development tooling, not part of the library
(importing the wrapper and every link from the options module made an import circle).

    python scripts/option_docs.py [DOCS_DIR] [--check]
"""

from __future__ import annotations

from flwr_transports.options import markdown_table

_BEGIN = "<!-- options:begin {} (generated from the code: python scripts/option_docs.py) -->"
_END = "<!-- options:end -->"


def _doc_tables() -> dict[str, tuple[str, str]]:
    """{page (relative to docs/): (marker name, table)} for the wrapper and each
    built-in link."""
    from flwr_transports.flower.wrapper import WRAPPER_OPTIONS
    from flwr_transports.links import link_classes, link_spec, schemes

    from flwr_transports.settings import markdown as settings_table

    pages = {"offload.md": ("offload", markdown_table(WRAPPER_OPTIONS)),
             "settings.md": ("settings", settings_table())}
    for scheme in schemes():
        if link_spec(scheme).origin != "builtin":
            continue
        try:
            srv = link_classes(scheme)[0]
        except Exception:  # noqa: BLE001, S112 - an engine missing here: its page keeps its table
            continue
        pages[f"links/{scheme}.md"] = (scheme, markdown_table(srv.OPTIONS))
    return pages


def update_docs(docs_dir: str, *, check: bool = False) -> list[str]:
    """Rewrite (or with ``check`` only compare) the generated option tables in
    ``docs_dir``; return the pages that differ(ed). A page without markers gets the
    table appended under an "Options" heading."""
    import os

    changed = []
    for page, (name, table) in _doc_tables().items():
        path = os.path.join(docs_dir, page)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        begin = _BEGIN.format(name)
        block = f"{begin}\n{table}\n{_END}"
        if begin in text:
            a = text.index(begin)
            b = text.index(_END, a) + len(_END)
            new = text[:a] + block + text[b:]
        else:
            new = text.rstrip() + f"\n\n## Options\n\n{block}\n"
        if new != text:
            changed.append(page)
            if not check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    return changed


if __name__ == "__main__":  # python scripts/option_docs.py [DOCS_DIR] [--check]
    import sys

    args = sys.argv[1:]
    docs = next((a for a in args if not a.startswith("-")), "docs")
    out = update_docs(docs, check="--check" in args)
    print("\n".join(out) or "option tables are up to date")
    sys.exit(1 if out and "--check" in args else 0)

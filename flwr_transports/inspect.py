"""``flwr-transports inspect FILE``: list the arrays inside a payload (a safetensors file)."""

from __future__ import annotations

import argparse
import json
import os

from .codec import PayloadError, decode
from .links.fs import open_payload


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="flwr-transports inspect",
                                description="Show the arrays of a flwr-transports payload file.")
    p.add_argument("path")
    p.add_argument("--digest", help="verify against this sha256t:<hex> digest")
    a = p.parse_args(argv)
    size = os.path.getsize(a.path)
    try:
        from safetensors import safe_open

        with safe_open(a.path, framework="numpy") as f:
            meta = f.metadata() or {}
        print(f"safetensors file, format {meta.get('format')!r}")
    except Exception as exc:  # noqa: BLE001 - report and go on with our own reader
        print(f"(safetensors could not open it: {exc})")
    try:
        with open_payload(a.path, size) as src:
            rec = decode(src.read, size, a.digest)
    except PayloadError as exc:
        print(f"invalid payload: {exc}")
        return 1
    rows = [{"name": k, "dtype": v.dtype, "shape": list(v.shape), "stype": v.stype,
             "bytes": len(v.data)} for k, v in rec.items()]
    for r in rows:
        print(json.dumps(r))
    print(f"{len(rows)} arrays, {size} bytes" + (", digest OK" if a.digest else ""))
    return 0

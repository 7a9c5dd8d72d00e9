"""``flwr-transports inspect FILE``: list the arrays inside a payload (a safetensors file,
or a payload coded with ``lossless``/``delta``/``q8``: see docs/codecs.md)."""

from __future__ import annotations

import argparse
import json
import os

from .codec import PayloadError, decode, hash_segments
from .codecs.wire import peek_encoded
from .links.fs import open_payload


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="flwr-transports inspect",
                                description="Show the arrays of a flwr-transports payload file.")
    p.add_argument("path")
    p.add_argument("--digest", help="verify against this sha256t:<hex> digest (of the file's "
                   "bytes: for a coded payload, the bytes on the wire)")
    p.add_argument("--base", help="for a delta/q8 payload: the raw payload file it was coded "
                   "against (the model that was sent)")
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
            if peek_encoded(src.read, size):
                rec = _decode_coded(src.read, size, a)
                if rec is None:
                    return 0
            else:
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


def _decode_coded(read, size: int, a):
    """Describe and decode a coded payload (None: it needs a --base it was not given)."""
    from .codecs.stream import Base, read_info
    from .codecs.wire import decode_from_wire

    info = read_info(read, size)
    print(f"coded payload: codec {info.codec}, {size} bytes for {info.size} decoded "
          f"({100 * size / info.size:.1f}%), {info.nwin} windows of {info.window} bytes, "
          f"decoded digest {info.content_digest}"
          + (f", coded against {info.base_digest}" if info.base_digest else ""))
    base = None
    if a.base:
        with open(a.base, "rb") as f:
            data = f.read()
        base = Base(hash_segments([data]), [data])
    if info.base_digest and base is None:
        print("a delta/q8 payload: pass --base FILE (the raw payload it was coded against) "
              "to list its arrays")
        return None
    return decode_from_wire(read, size, a.digest, max_size=info.size,
                            lookup_base=lambda d: base if base and base.digest == d else None)

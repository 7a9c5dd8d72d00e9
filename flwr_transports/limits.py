"""Bounded parsing of network input: JSON with explicit size, depth and count limits.

``json.loads`` recurses once per nesting level, so a document nested 20,000 levels
deep raises ``RecursionError`` (or worse, exhausts a thread's stack) instead of a
clean error. :func:`loads_bounded` checks length, nesting depth and element count
BEFORE calling the parser, with a scan that does not recurse: string literals are
blanked out with one regular expression, then the nesting depth is the running sum of
opening minus closing brackets (computed with numpy, which Flower already needs), so
a 64 MiB header is checked in milliseconds. Every failure is raised as the caller's
``RejectedInput`` subclass, naming what was parsed and the limit it broke.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

import numpy as np

from .errors import RejectedInput

#: nesting depth of any JSON document flwr-transports accepts (ours use <= 6)
MAX_JSON_DEPTH = 32
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def json_shape(raw: bytes) -> tuple[int, int]:
    """``(max nesting depth, number of separators)`` of a JSON text, without recursion.

    Brackets inside string literals do not count. The separator count (``,`` and
    ``:`` outside strings) bounds the number of elements of the document.
    """
    bare = _STRING.sub(b'""', raw)
    if not bare:
        return 0, 0
    steps = _OPEN[np.frombuffer(bare, dtype=np.uint8)]
    depth = int(np.cumsum(steps, dtype=np.int64).max(initial=0))
    return depth, bare.count(b",") + bare.count(b":")


def loads_bounded(raw: bytes | bytearray | memoryview | str, *, what: str, max_bytes: int,
                  max_depth: int = MAX_JSON_DEPTH, max_items: int = 100_000,
                  error: type[RejectedInput] = RejectedInput) -> Any:
    """Parse untrusted JSON with limits; raise ``error`` (never anything else).

    ``what`` names the document in messages ("reference", "ticket", ...).
    """
    if isinstance(raw, str):
        if len(raw) > max_bytes:  # a str is at most 4 bytes per character
            raise error(f"{what} is {len(raw)} characters (limit {max_bytes} bytes)")
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise error(f"{what} is not valid UTF-8 text") from None
    elif isinstance(raw, bytes | bytearray | memoryview):
        raw = bytes(raw)
    else:
        raise error(f"{what} is a {type(raw).__name__}, not JSON text")
    if len(raw) > max_bytes:
        raise error(f"{what} is {len(raw)} bytes (limit {max_bytes})")
    # the scan reads UTF-8; json.loads(bytes) would itself detect UTF-16/32 (BOM or
    # NUL-byte pattern), inside which the scan sees neither brackets nor commas
    if raw.startswith(codecs.BOM_UTF8) or json.detect_encoding(raw) != "utf-8":
        raise error(f"{what} is not UTF-8 JSON (a byte-order mark, or UTF-16/32); refused")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} is not valid UTF-8 text") from None
    depth, seps = json_shape(raw)
    if depth > max_depth:
        raise error(f"{what} is nested {depth} levels deep (limit {max_depth})")
    if seps > max_items:
        raise error(f"{what} has more than {max_items} elements")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON: {str(exc)[:200]}") from None

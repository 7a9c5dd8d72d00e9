"""ArrayRecord <-> bytes.

The payload format is a valid *safetensors* file, so any safetensors reader can open
it, laid out so that neither side needs an extra copy of the array data:

* every Flower ``Array`` is stored as one ``U8`` tensor whose bytes are exactly the
  ``Array.data`` bytes (for ``stype == "numpy.ndarray"`` these are ``.npy`` bytes);
* ``__metadata__["flwr_transports"]`` holds a JSON list, in record order, of
  ``[name, dtype, shape, stype]`` for each array, so names, order, dtypes, shapes
  (0-d and empty included) and serialization types round-trip exactly.

Encoding produces a list of segments (the header and the arrays' own ``bytes``
objects, never copied) plus the total size and a digest; links write the
segments where they go. The digest (``sha256t:<hex>``) is SHA-256 over the
concatenated SHA-256 digests of consecutive 16 MiB chunks of the payload: as strong
as plain SHA-256 against tampering, but the chunks hash in parallel threads
(hashlib releases the GIL), which doubles verification speed on two cores. Decoding reads each array's bytes once from a *reader*
(``read(offset, n) -> bytes``) into the final ``bytes`` object handed to ``Array``,
hashing exactly what it decodes, so a writer that changes the payload while it is
read is caught by the digest check (no time-of-check/time-of-use window).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord

from .errors import RejectedInput
from .limits import loads_bounded
from .options import parse_size  # noqa: F401 - re-exported (one definition, in options)

FORMAT = "flwr-transports/1"
CODEC_VERSION = 1
DIGEST_ALGO = "sha256t"
DIGEST_CHUNK = 16 * 1024 * 1024
_POOL: ThreadPoolExecutor | None = None
MAX_HEADER_BYTES = 64 * 1024 * 1024  # a header above this is hostile
_META_KEY = "flwr_transports"
#: arrays one payload may hold, and nesting depth of its header
MAX_ARRAYS = 100_000
MAX_HEADER_DEPTH = 8


class PayloadError(RejectedInput):
    """A payload that is malformed, truncated, or fails its digest check."""


@dataclass
class EncodedPayload:
    """An encoded ArrayRecord: segments to be written back to back."""

    segments: list[bytes | memoryview]
    size: int
    digest: str  # "sha256t:<hex>"
    n_arrays: int = 0

    def to_bytes(self) -> bytes:
        """Join the segments (one copy; for small payloads and tests)."""
        return b"".join(self.segments)


def _header(record: ArrayRecord, extra_meta: dict[str, str] | None = None
            ) -> tuple[bytes, list[bytes]]:
    entries = []
    datas: list[bytes] = []
    for name, arr in record.items():
        data = arr.data
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"Array {name!r} has data of type {type(data).__name__}")
        entries.append((name, arr.dtype, arr.shape, arr.stype, len(data)))
        datas.append(data)
    return header_bytes(entries, extra_meta), datas


def header_bytes(entries, extra_meta: dict[str, str] | None = None) -> bytes:
    """The payload header :func:`encode` writes for arrays ``(name, dtype, shape, stype,
    length of Array.data)``, in order (``aggregation=ray``'s shard owners write the
    next model's payload without the ServerApp holding its bytes)."""
    arrays_meta = []
    tensors: dict[str, dict] = {}
    offset = 0
    for i, (name, dtype, shape, stype, n) in enumerate(entries):
        tensors[f"a{i:08d}"] = {"dtype": "U8", "shape": [n], "data_offsets": [offset, offset + n]}
        arrays_meta.append([name, dtype, list(shape), stype])
        offset += n
    meta = {"format": FORMAT, _META_KEY: json.dumps(arrays_meta, separators=(",", ":"))}
    for k, v in (extra_meta or {}).items():  # e.g. the claimed aggregation weight
        if k not in meta:
            meta[k] = str(v)
    hdr = {"__metadata__": meta, **tensors}
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # safetensors: pad header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def encode(record: ArrayRecord, meta: dict[str, str] | None = None) -> EncodedPayload:
    """Encode an ArrayRecord. No array data is copied; the digest is computed here.
    ``meta``: extra string entries for the safetensors ``__metadata__`` (covered by the
    digest like everything else)."""
    head, datas = _header(record, meta)
    segments = [head, *datas]
    return EncodedPayload(
        segments=segments,
        size=sum(len(d) for d in segments),
        digest=hash_segments(segments),
        n_arrays=len(datas),
    )


def encode_to_bytes(record: ArrayRecord) -> tuple[bytes, str]:
    p = encode(record)
    return p.to_bytes(), p.digest


Reader = Callable[[int, int], bytes]


def _validate_meta(entry: object) -> tuple[str, str, tuple[int, ...], str]:
    if not (isinstance(entry, list) and len(entry) == 4):
        raise PayloadError("malformed array entry in payload header")
    name, dtype, shape, stype = entry
    if not (isinstance(name, str) and isinstance(dtype, str) and isinstance(stype, str)):
        raise PayloadError("malformed array entry in payload header")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise PayloadError(f"bad shape for array {name!r}")
    if len(name) > 4096 or len(dtype) > 64 or len(stype) > 256 or len(shape) > 64:
        raise PayloadError("oversized field in payload header")
    return name, dtype, tuple(shape), stype


def _check_algo(digest: str) -> None:
    algo, _, _hex = digest.partition(":")
    if algo != DIGEST_ALGO:
        raise PayloadError(f"unsupported digest algorithm {algo!r} (want {DIGEST_ALGO})")


def entry_offsets(hdr: dict, i: int, name: str, pos: int, base: int, size: int
                  ) -> tuple[int, int]:
    """The checked ``(begin, end)`` of array ``i`` in a payload header: a U8 tensor that
    starts where the previous array ended (``pos``) and ends inside the payload."""
    t = hdr.get(f"a{i:08d}")
    try:
        begin, end = t["data_offsets"]
        ok = t["dtype"] == "U8" and isinstance(begin, int) and isinstance(end, int)
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok or begin != pos or end < begin or base + end > size:
        raise PayloadError(f"bad data offsets for array {name!r}")
    return begin, end


def decode(read: Reader, size: int, digest: str | None) -> ArrayRecord:
    """Decode a payload of ``size`` bytes given a ranged reader.

    ``read(offset, n)`` must return exactly ``n`` bytes. ``digest`` (``"sha256t:hex"``)
    is verified over exactly the bytes decoded; pass None only for trusted data.
    Raises PayloadError on anything malformed.
    """
    if digest is not None:
        _check_algo(digest)
    out, got = decode_hashed(read, size, hashed=digest is not None)
    check_digest(got, digest)
    return out


def check_digest(got: str, digest: str | None) -> None:
    """Compare the digest of the bytes decoded with the one a reference claims."""
    if digest is None:
        return
    _check_algo(digest)
    if got != digest:
        raise PayloadError(f"digest mismatch: payload has {got}, reference says {digest}")


class _NoHash:
    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


@dataclass(frozen=True)
class ArrayEntry:
    """One array of a payload, as its header describes it (offsets are absolute)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stype: str
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """A payload's validated header: ``raw`` is its first ``base`` bytes (length prefix
    and JSON), ``meta`` the safetensors ``__metadata__``, ``arrays`` in payload order,
    contiguous from ``base`` to the payload's end."""

    base: int
    raw: bytes
    meta: dict
    arrays: tuple[ArrayEntry, ...]


def read_header(read: Reader, size: int, max_arrays: int = MAX_ARRAYS) -> Header:
    """THE parser of a payload header (decode, the streaming fold's planner and the
    links' header sniffing all use it). ``read(off, n)`` must return ``n`` bytes; only
    the header is read. Bounded (size, depth, element count, array count) and fully
    validated: the arrays must be contiguous, uniquely named and end exactly at
    ``size``. Raises PayloadError."""
    if size < 8:
        raise PayloadError(f"payload too small ({size} bytes)")

    def _read(off: int, n: int) -> bytes:
        b = read(off, n)
        if len(b) != n:
            raise PayloadError(f"short read at offset {off}: wanted {n}, got {len(b)}")
        return b

    first = _read(0, 8)
    (hlen,) = struct.unpack("<Q", first)
    if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
        raise PayloadError(f"payload header length {hlen} is invalid for a {size}-byte payload")
    raw = _read(8, hlen)
    try:
        hdr = loads_bounded(raw, what="payload header", max_bytes=MAX_HEADER_BYTES,
                            max_depth=MAX_HEADER_DEPTH, max_items=8 * max_arrays + 16,
                            error=PayloadError)
        meta = hdr.pop("__metadata__")
        if meta.get("format") != FORMAT:
            raise PayloadError(f"unknown payload format {str(meta.get('format'))[:64]!r}")
        entries = loads_bounded(meta[_META_KEY], what="payload array list",
                                max_bytes=MAX_HEADER_BYTES, max_depth=MAX_HEADER_DEPTH,
                                max_items=8 * max_arrays + 16, error=PayloadError)
    except PayloadError as exc:
        raise PayloadError(f"malformed payload header: {exc}") from None
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise PayloadError(f"malformed payload header: {exc}") from None
    if not isinstance(entries, list) or len(entries) != len(hdr) or len(entries) > max_arrays:
        raise PayloadError("payload header array count mismatch")
    base = 8 + hlen
    pos = 0
    names: set[str] = set()
    out = []
    for i, entry in enumerate(entries):
        name, dtype, shape, stype = _validate_meta(entry)
        begin, end = entry_offsets(hdr, i, name, pos, base, size)
        if name in names:
            raise PayloadError(f"duplicate array name {name!r}")
        names.add(name)
        out.append(ArrayEntry(name, dtype, shape, stype, base + begin, base + end))
        pos = end
    if base + pos != size:
        raise PayloadError(f"payload has {size - base - pos} trailing bytes")
    return Header(base=base, raw=first + raw, meta=meta, arrays=tuple(out))


def decode_hashed(read: Reader, size: int, *, hashed: bool = True) -> tuple[ArrayRecord, str]:
    """Decode a payload and return it with the ``sha256t`` digest of exactly the bytes
    decoded (for links that decode before the expected digest is known; the caller
    must then :func:`check_digest` before trusting the record). ``hashed=False``
    (trusted data only) skips hashing and returns an empty digest."""
    hasher = TreeHasher() if hashed else _NoHash()  # hashes exactly the bytes decoded, overlapping the reads

    def _read(off: int, n: int) -> bytes:
        b = read(off, n)
        if len(b) != n:
            raise PayloadError(f"short read at offset {off}: wanted {n}, got {len(b)}")
        hasher.update(b)
        return b

    head = read_header(_read, size)  # hashes the header bytes, in order
    out = ArrayRecord()
    for a in head.arrays:
        out[a.name] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype,
                            data=_read(a.start, a.end - a.start))
    return out, hasher.hexdigest()


def data_ranges(prefix: bytes | bytearray | memoryview, size: int
                ) -> tuple[int, list[tuple[int, int]]] | None:
    """Where each array's bytes lie in a ``size``-byte payload, from its first bytes.

    Returns ``(header_end, [(start, end), ...])`` with absolute offsets, in payload
    order, when ``prefix`` holds the whole header and it is valid (:func:`read_header`);
    otherwise None. Used only to place received bytes (each array straight into its
    own ``bytes`` object); :func:`decode` still validates everything and checks the
    digest, so a lying header can at worst make the transfer fall back to a plain
    buffer or fail its checks.
    """
    mv = memoryview(prefix).cast("B")

    def read(off: int, n: int) -> bytes:
        return bytes(mv[off : off + n])

    try:
        head = read_header(read, size)
    except PayloadError:
        return None
    return head.base, [(a.start, a.end) for a in head.arrays]


def decode_bytes(buf: bytes | bytearray | memoryview, digest: str | None) -> ArrayRecord:
    mv = memoryview(buf)

    def read(off: int, n: int) -> bytes:
        return bytes(mv[off : off + n])

    return decode(read, len(mv), digest)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                   thread_name_prefix="ftx-hash")
    return _POOL


def _sha(pieces: list[memoryview]) -> bytes:
    h = hashlib.sha256()
    for p in pieces:
        h.update(p)
    return h.digest()


class TreeHasher:
    """Incremental ``sha256t`` digest. Full 16 MiB windows are hashed in background
    threads as soon as they are complete, so hashing overlaps whatever the caller does
    next (reading the next array, for instance). Pieces are referenced, not copied."""

    def __init__(self) -> None:
        self._cur: list[memoryview] = []
        self._room = DIGEST_CHUNK
        self._leaves: list = []  # futures or digests, in order
        self._emitted = False

    def _flush(self) -> None:
        window, self._cur, self._room = self._cur, [], DIGEST_CHUNK
        self._leaves.append(_pool().submit(_sha, window))
        self._emitted = True

    def update(self, data: bytes | memoryview) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            take = mv[: self._room]
            self._cur.append(take)
            mv = mv[len(take):]
            self._room -= len(take)
            if self._room == 0:
                self._flush()

    def hexdigest(self) -> str:
        if self._cur or not self._emitted:
            self._leaves.append(_sha(self._cur))
            self._cur = []
            self._emitted = True
        leaves = [x if isinstance(x, bytes) else x.result() for x in self._leaves]
        return f"{DIGEST_ALGO}:{hashlib.sha256(b''.join(leaves)).hexdigest()}"


def hash_segments(segments: Sequence[bytes | memoryview]) -> str:
    """Digest of the concatenation of ``segments`` (see module docstring)."""
    h = TreeHasher()
    for seg in segments:
        h.update(seg)
    return h.hexdigest()


def record_bytes(content) -> int:
    """In-band size of a RecordDict as Flower counts it (``count_bytes()`` of every
    record: array bytes, metric and config keys and values). The one definition: the
    offload wrapper's and FDA's statistics use it."""
    return int(sum(rec.count_bytes() for rec in content.values()))

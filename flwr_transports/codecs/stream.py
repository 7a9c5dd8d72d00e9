"""The encoded payload format (``lossless``, ``delta``, ``q8``) and its coder.

An encoded payload (a *stream*) carries a raw payload (:mod:`flwr_transports.codec`)
cut into independent windows of :data:`WINDOW` bytes (the 16 MiB ``DIGEST_CHUNK``
windows; the last one shorter). All integers little-endian.

Stream header (:data:`STREAM_HEADER` = 88 bytes, then the window table)::

    magic   4s   b"FTXZ"   (a raw payload can never start so: its first 8 bytes are a
                            header length, and these would read as more than 2**32)
    version u8   1
    codec   u8   1 lossless, 2 delta, 3 q8
    qblock  u16  elements per q8 scale (q8 only, else 0)
    window  u32  a power of two, 64 KiB .. 16 MiB
    nwin    u32  ceil(size / window)
    size    u64  decoded payload size (the caller's limit applies: max_size)
    content 32s  sha256t of the payload encoded (its id when it later serves as a base;
                 = the decoded payload for lossless/delta; q8 decodes to another one)
    base    32s  sha256t of the base payload (delta, q8), zeros otherwise
    table   nwin x u32: encoded length of each window frame, in order

Window frame (16 bytes, then ``nparts`` part descriptors of 24 bytes, then the parts'
data in order)::

    tag     2s   b"FW"
    nparts  u16  1 .. MAX_PARTS
    dlen    u32  decoded length of the window (exactly window, or the remainder)
    elen    u32  encoded length of the frame, header included (= its table entry)
    zero    u32

    part:   kind u8 (0 planes, 1 xor-planes, 2 q8, 3 sub-planes), itemsize u8 (1..16;
            sub: 2, 4 or 8),
            dtype u8 (q8: 1 f32, 2 f16, 3 bf16), zero u8, dlen u32, elen u32, zero u32,
            base_off u64 (xor, q8: where the part's bytes lie in the base payload)

A part's data is a sequence of *blobs*, each a u32 word (low 31 bits: stored length,
top bit: zstd-compressed) and its bytes. ``planes``/``xor``: ``itemsize`` blobs, byte
plane ``i`` holding byte ``i`` of every element (XORed with the base's bytes for
``xor``), each ``dlen / itemsize`` bytes decoded. ``sub`` (version 2, ``delta`` of
little-endian floats): the planes of each element's *difference* from the base element,
taken between the two values' bit patterns mapped to integers in value order and
zigzag-coded, so a small change is a small number whatever the sign and exponent do
(where XOR flips every bit below a changed exponent). ``q8``: the scales (float32, one
per ``qblock`` elements) and the int8 codes (one per element).

Decoding trusts nothing: every size is checked against what the layout implies
before anything is allocated; a zstd blob must declare exactly the size expected,
end exactly where its word says, and decode to exactly that size; a window never
decodes to more or less than its ``dlen``, and nothing bigger than one window (plus
its frame) is allocated per window. Violations raise
:class:`flwr_transports.codec.PayloadError`.
"""

from __future__ import annotations

import bisect
import math
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..codec import (
    DIGEST_ALGO,
    DIGEST_CHUNK,
    EncodedPayload,
    Header,
    PayloadError,
    hash_segments,
    read_header,
)
from . import q8 as _q8

MAGIC = b"FTXZ"
#: 2: part kind ``sub``; streams of version 1 (no ``sub`` parts) are still read
VERSION = 2
READS = (1, 2)
RAW, LOSSLESS, DELTA, Q8 = "raw", "lossless", "delta", "q8"
CODECS = (RAW, LOSSLESS, DELTA, Q8)
CODEC_IDS = {LOSSLESS: 1, DELTA: 2, Q8: 3}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
WINDOW = DIGEST_CHUNK
MIN_WINDOW = 64 * 1024
MAX_WINDOW = DIGEST_CHUNK
MAX_PARTS = 4096
#: bytes a frame may exceed its decoded length by (headers, descriptors, blob words)
FRAME_SLACK = 16 + MAX_PARTS * (24 + 17 * 4)
#: decoded size cap when the caller gives none (1 TiB)
MAX_DECODED = 1 << 40
#: element runs shorter than this are coded as plain bytes (itemsize 1)
SMALL = 16 * 1024
#: a byte plane whose estimated order-0 entropy is above this (bits per byte) is
#: stored, not compressed: the mantissa planes of floats. ``lossless`` spends the
#: coder's time only where it saves >= 10% of a plane (speed wins: it must not slow a
#: LAN); ``delta``/``q8`` take every gain above ~2% (size wins)
ENTROPY_MAX = {LOSSLESS: 7.2, DELTA: 7.85, Q8: 7.85}
#: a compressed blob kept only if at most this fraction of the plane
KEEP_RATIO = 0.95

_SH = struct.Struct("<4sBBHIIQ32s32s")
STREAM_HEADER = _SH.size
_WH = struct.Struct("<2sHIII")
_PD = struct.Struct("<BBBBIIIQ")
_U32 = struct.Struct("<I")
_ZBIT = 0x80000000
K_PLANES, K_XOR, K_Q8, K_SUB = 0, 1, 2, 3
_UINT = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_SINT = {2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}
_ZERO32 = bytes(32)

_INSTALL_HINT = (
    "the lossless/delta/q8 codecs need the 'zstandard' package: "
    "pip install 'zstandard>=0.22' (a dependency of flwr-transports; it is missing "
    "from this environment)"
)


def _zstd():
    try:
        import zstandard
    except ImportError as err:  # pragma: no cover - exercised only without zstandard
        raise ImportError(_INSTALL_HINT) from err
    return zstandard


_tls = threading.local()


def _compressor():
    c = getattr(_tls, "c", None)
    if c is None:
        z = _zstd()
        # A fast match finder with a tiny hash table: byte planes of weights have almost
        # no long matches, and their gain is in the literals' Huffman coding. On exponent
        # planes this was ~4x faster than level 1 and compressed as well or better
        # (0.89 vs 0.23 GB/s, 34.0% vs 36.9% on an N(0, 0.02) fp32 exponent plane).
        params = z.ZstdCompressionParameters(
            window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7,
            target_length=0, strategy=z.STRATEGY_FAST, write_content_size=True,
            write_checksum=False, write_dict_id=False)
        c = _tls.c = z.ZstdCompressor(compression_params=params)
    return c


def _decompressor():
    d = getattr(_tls, "d", None)
    if d is None:
        z = _zstd()
        d = _tls.d = z.ZstdDecompressor(max_window_size=1 << 25)
    return d


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                       thread_name_prefix="ftx-codec")
        return _POOL


def default_threads() -> int:
    return min(8, os.cpu_count() or 1)


# --------------------------------------------------------------------------- bases


def _digest_bytes(digest: str) -> bytes:
    algo, _, hx = digest.partition(":")
    if algo != DIGEST_ALGO or len(hx) != 64:
        raise ValueError(f"not a {DIGEST_ALGO} digest: {digest[:80]!r}")
    return bytes.fromhex(hx)


def _digest_str(raw: bytes) -> str:
    return f"{DIGEST_ALGO}:{raw.hex()}"


class SegmentReader:
    """Ranged, mostly zero-copy reads over segments laid back to back (a raw payload
    as :func:`flwr_transports.codec.encode` gives it: header, then each array's bytes)."""

    def __init__(self, segments: Sequence[bytes | bytearray | memoryview]) -> None:
        self._segs = [memoryview(s).cast("B") for s in segments]
        self._starts = []
        pos = 0
        for s in self._segs:
            self._starts.append(pos)
            pos += len(s)
        self.size = pos

    def view(self, off: int, n: int) -> memoryview:
        """``n`` bytes at ``off``: a view when they lie in one segment, else a copy."""
        if off < 0 or n < 0 or off + n > self.size:
            raise PayloadError(f"range {off}+{n} outside a {self.size}-byte payload")
        if n == 0:
            return memoryview(b"")
        i = bisect.bisect_right(self._starts, off) - 1
        while len(self._segs[i]) == 0:
            i += 1
        rel = off - self._starts[i]
        seg = self._segs[i]
        if rel + n <= len(seg):
            return seg[rel: rel + n]
        out = bytearray(n)
        got = 0
        while got < n:
            seg = self._segs[i]
            take = min(n - got, len(seg) - rel)
            out[got: got + take] = seg[rel: rel + take]
            got += take
            i += 1
            rel = 0
        return memoryview(out)

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.view(off, n))


class SegmentWriter:
    """Writable segments laid back to back (the decoded payload as its final objects:
    the header buffer, then each array's own ``bytes``): :meth:`span` gives a numpy
    view where a range lies in one segment, else a scratch array and a flush."""

    def __init__(self, segments: Sequence[bytearray | memoryview]) -> None:
        self._segs = [np.frombuffer(memoryview(s).cast("B"), np.uint8) for s in segments]
        for s in self._segs:
            if not s.flags.writeable:
                raise ValueError("SegmentWriter needs writable buffers")
        self._starts = []
        pos = 0
        for s in self._segs:
            self._starts.append(pos)
            pos += len(s)
        self.size = pos

    def span(self, off: int, n: int):
        if off < 0 or off + n > self.size:
            raise PayloadError(f"write {off}+{n} outside the decoded payload")
        i = bisect.bisect_right(self._starts, off) - 1
        while len(self._segs[i]) == 0:
            i += 1
        rel = off - self._starts[i]
        seg = self._segs[i]
        if rel + n <= len(seg):
            return seg[rel: rel + n], None
        tmp = np.empty(n, np.uint8)

        def flush() -> None:
            got, j, r = 0, i, rel
            while got < n:
                s = self._segs[j]
                take = min(n - got, len(s) - r)
                s[r: r + take] = tmp[got: got + take]
                got += take
                j += 1
                r = 0

        return tmp, flush

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to ``off`` (across segments as needed)."""
        src = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        n = len(src)
        if off < 0 or off + n > self.size:
            raise PayloadError(f"write {off}+{n} outside the decoded payload")
        got = 0
        while got < n:
            i = bisect.bisect_right(self._starts, off + got) - 1
            rel = off + got - self._starts[i]
            seg = self._segs[i]
            take = min(n - got, len(seg) - rel)
            if take <= 0:  # an empty segment at this offset
                i += 1
                continue
            seg[rel: rel + take] = src[got: got + take]
            got += take


class _ReadReader:
    """:class:`SegmentReader`'s ``view``/``read`` over a ranged read function."""

    def __init__(self, read: Callable[[int, int], bytes], size: int) -> None:
        self._read, self.size = read, size

    def view(self, off: int, n: int) -> memoryview:
        if off < 0 or n < 0 or off + n > self.size:
            raise PayloadError(f"range {off}+{n} outside a {self.size}-byte payload")
        b = self._read(off, n)
        if len(b) != n:
            raise PayloadError(f"short read of the base at {off}: {len(b)} of {n} bytes")
        return memoryview(b)

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.view(off, n))


@dataclass
class Base:
    """A raw payload the other side also holds (the model the server sent, the model
    the client received), identified by its ``sha256t`` digest. ``segments`` are its
    bytes in order; they are read, never modified."""

    digest: str
    segments: Sequence[bytes | bytearray | memoryview]

    def __post_init__(self) -> None:
        self._raw = _digest_bytes(self.digest)
        self.reader = SegmentReader(self.segments)
        self.size = self.reader.size
        self._header: Header | None = None

    @classmethod
    def from_payload(cls, payload: EncodedPayload) -> Base:
        return cls(payload.digest, payload.segments)

    @classmethod
    def from_read(cls, digest: str, read: Callable[[int, int], bytes], size: int) -> Base:
        """A base read on demand through ``read(off, n)`` (a kept file, read with
        ``pread``): only the ranges a delta's parts name are read, nothing is held.
        Its bytes are NOT checked against ``digest`` here: a payload decoded against
        it must then be verified (its content digest), which a wrong base fails."""
        b = cls.__new__(cls)
        b.digest, b.segments = digest, ()
        b._raw = _digest_bytes(digest)
        b.reader = _ReadReader(read, size)
        b.size = size
        b._header = None
        return b

    @classmethod
    def from_record(cls, record) -> Base:
        """The raw payload of an ArrayRecord (hashes it: prefer :meth:`from_payload`
        with a payload whose digest is known)."""
        from ..codec import encode as _encode
        return cls.from_payload(_encode(record))

    def header(self) -> Header:
        if self._header is None:
            self._header = read_header(self.reader.read, self.size)
        return self._header


# --------------------------------------------------------------------------- layout


@dataclass
class _Elem:
    itemsize: int  # plane count (component size: complex64 -> 4)
    full: int  # bytes per element
    qdtype: int  # q8 dtype code, 0 if not quantisable


def _elem_of(dtype: str, stype: str) -> _Elem:
    if stype == "torch.raw" and dtype.startswith("torch."):
        from ..torch import TORCH_DTYPES
        name = dtype[len("torch."):]
        full = TORCH_DTYPES.get(name, 1)
        isz = full // 2 if name.startswith("complex") else full
        q = {"float32": _q8.F32, "float16": _q8.F16, "bfloat16": _q8.BF16}.get(name, 0)
        return _Elem(max(isz, 1), full, q)
    if stype == "numpy.ndarray":
        try:
            dt = np.dtype(dtype)
        except (TypeError, ValueError, SyntaxError):
            return _Elem(1, 1, 0)
        if dt.hasobject or dt.itemsize == 0 or dt.fields is not None or dt.subdtype:
            return _Elem(1, 1, 0)
        full = dt.itemsize
        isz = full // 2 if dt.kind == "c" else full
        q = 0
        if dt.kind == "f" and dt.byteorder in "=<|" and np.little_endian:
            q = {4: _q8.F32, 2: _q8.F16}.get(full, 0)
        return _Elem(isz if 1 <= isz <= 16 else 1, full, q)
    return _Elem(1, 1, 0)


@dataclass
class _Part:
    kind: int
    itemsize: int
    start: int  # absolute offset in the payload
    length: int
    base_off: int = 0
    qdtype: int = 0
    qname: str = ""  # q8: the array's name (its residual)
    qindex: int = 0  # q8: index of the part's first element in the array


def _plan(head: Header, size: int, base: Base | None, codec: str) -> list[_Part]:
    """Runs of the payload with how each is coded, in order, covering [0, size)."""
    runs: list[_Part] = []
    bmap = {}
    if base is not None and codec in (DELTA, Q8):
        bmap = {a.name: a for a in base.header().arrays}

    def add(p: _Part) -> None:
        if p.length <= 0:
            return
        if runs:
            q = runs[-1]
            if (q.kind == p.kind and q.itemsize == p.itemsize == 1 and p.kind != K_Q8
                    and q.start + q.length == p.start
                    and (p.kind == K_PLANES or q.base_off + q.length == p.base_off)):
                q.length += p.length
                return
        runs.append(p)

    add(_Part(K_PLANES, 1, 0, head.base))
    for a in head.arrays:
        n = a.end - a.start
        el = _elem_of(a.dtype, a.stype)
        count = math.prod(a.shape)
        ebytes = count * el.full
        e0 = a.end - ebytes if ebytes <= n else a.end  # where the elements start
        b = bmap.get(a.name)
        same = (b is not None and b.end - b.start == n and b.dtype == a.dtype
                and b.stype == a.stype and b.shape == a.shape)
        kind = K_XOR if same else K_PLANES
        boff = (b.start - a.start) if same else 0  # base offset = payload offset + boff
        add(_Part(kind, 1, a.start, e0 - a.start, a.start + boff if same else 0))
        if ebytes == 0 or e0 == a.end:
            continue
        if codec == Q8 and same and el.qdtype:
            add(_Part(K_Q8, el.full, e0, ebytes, e0 + boff, el.qdtype, a.name, 0))
        elif ebytes < SMALL or el.itemsize == 1:
            add(_Part(kind, 1, e0, ebytes, e0 + boff if same else 0))
        elif codec == DELTA and same and el.qdtype and el.itemsize == el.full:
            add(_Part(K_SUB, el.itemsize, e0, ebytes, e0 + boff))
        else:
            add(_Part(kind, el.itemsize, e0, ebytes, e0 + boff if same else 0))
    return runs


def _window_parts(runs: list[_Part], starts: list[int], w0: int, w1: int) -> list[_Part]:
    """The runs cut to window [w0, w1); element runs cut at element boundaries, the
    split element's bytes coded as single bytes."""
    out: list[_Part] = []
    i = max(bisect.bisect_right(starts, w0) - 1, 0)
    for r in runs[i:]:
        if r.start >= w1:
            break
        s, e = max(r.start, w0), min(r.start + r.length, w1)
        if s >= e:
            continue
        step = r.itemsize
        a = r.start + -(-(s - r.start) // step) * step  # first element boundary >= s
        b = r.start + ((e - r.start) // step) * step  # last element boundary <= e
        if a >= b:
            a = b = e
        head_kind = K_XOR if r.kind in (K_Q8, K_SUB) else r.kind
        pieces = [(head_kind, 1, s, a), (r.kind, step, a, b), (head_kind, 1, b, e)]
        for kind, sz, p0, p1 in pieces:
            if p1 <= p0:
                continue
            boff = r.base_off + (p0 - r.start) if r.kind != K_PLANES else 0
            out.append(_Part(kind, sz, p0, p1 - p0, boff, r.qdtype if kind == K_Q8 else 0,
                             r.qname, (p0 - r.start) // max(step, 1) if kind == K_Q8 else 0))
    return out


# --------------------------------------------------------------------------- encode


def _ordered(u: np.ndarray) -> np.ndarray:
    """Float bit patterns (unsigned) -> integers in the values' order (a new array): a
    positive value gets its sign bit set, a negative one all its bits flipped."""
    st = _SINT[u.dtype.itemsize]
    m = np.right_shift(u.view(st), u.dtype.itemsize * 8 - 1)  # arithmetic: 0 or -1
    mu = m.view(u.dtype)
    mu |= u.dtype.type(1 << (u.dtype.itemsize * 8 - 1))
    mu ^= u
    return mu


def _unordered(k: np.ndarray, out: np.ndarray) -> None:
    """Inverse of :func:`_ordered`, written into ``out`` (same dtype)."""
    st = _SINT[k.dtype.itemsize]
    m = np.right_shift(k.view(st), k.dtype.itemsize * 8 - 1)
    np.invert(m, out=m)  # 0 where the sign bit is set (a positive value), else -1
    mu = m.view(k.dtype)
    mu |= k.dtype.type(1 << (k.dtype.itemsize * 8 - 1))
    np.bitwise_xor(k, mu, out=out)


def _sub_planes(x: np.ndarray, b: np.ndarray, isz: int) -> np.ndarray:
    """``sub`` coding of elements ``x`` against base elements ``b`` (uint8 arrays of the
    same length): zigzag(ordered(x) - ordered(b)), as uint8 rows of ``isz`` bytes."""
    ut, st = _UINT[isz], _SINT[isz]
    d = _ordered(x.view(ut))
    t = _ordered(b.view(ut))
    d -= t  # wraps: exact modulo 2**bits
    sd, sign = d.view(st), t.view(st)
    np.right_shift(sd, isz * 8 - 1, out=sign)  # zigzag: (d << 1) ^ (d >> bits-1)
    np.left_shift(sd, 1, out=sd)
    sd ^= sign
    return d.view(np.uint8).reshape(-1, isz)


def _unsub(target: np.ndarray, b: np.ndarray, isz: int) -> None:
    """Decode ``sub`` in place: ``target`` holds the zigzag differences (uint8)."""
    ut, st = _UINT[isz], _SINT[isz]
    z = target.view(ut)
    t = np.bitwise_and(z, ut.type(1))
    np.negative(t.view(st), out=t.view(st))  # 0 or -1
    np.right_shift(z, 1, out=z)
    z ^= t  # un-zigzagged difference
    z += _ordered(b.view(ut))  # wraps
    _unordered(z, z)


_SAMPLE = 4096
_CLOGC = np.zeros(_SAMPLE + 2)
_CLOGC[1:] = np.arange(1, _SAMPLE + 2) * np.log2(np.arange(1, _SAMPLE + 2))


def _entropy(sample: np.ndarray) -> float:
    """Order-0 entropy (bits per byte) of a sample of at most ``_SAMPLE + 1`` bytes."""
    n = len(sample)
    return float(np.log2(n) - _CLOGC[np.bincount(sample, minlength=256)].sum() / n)


def _put_blob(buf: np.ndarray, pos: int, plane: np.ndarray, hmax: float,
              xor: np.ndarray | None = None) -> int:
    """Write one blob (``plane``: a uint8 array, maybe strided; XORed with ``xor`` when
    given) at ``pos``; return the new position. ``buf`` has room for the plane stored.
    The plane is gathered into place first (stored as is unless it compresses), so a
    compressed plane needs no scratch buffer."""
    n = plane.size
    dst = buf[pos + 4: pos + 4 + n]
    if xor is None:
        np.copyto(dst, plane)
    else:
        np.bitwise_xor(plane, xor, out=dst)
    # small planes: just try (cheaper than estimating); large ones: estimate first
    if hmax > 0 and n >= 64 and (
            n <= 16384 or _entropy(dst[:: max(1, -(-n // _SAMPLE))]) <= hmax):
        c = _compressor().compress(dst)
        if len(c) <= KEEP_RATIO * n:
            _U32.pack_into(buf, pos, len(c) | _ZBIT)
            buf[pos + 4: pos + 4 + len(c)] = np.frombuffer(c, np.uint8)
            return pos + 4 + len(c)
    _U32.pack_into(buf, pos, n)
    return pos + 4 + n


@dataclass
class _Job:
    """What one window's encoder needs."""

    src: SegmentReader
    base: Base | None
    feedback: _q8.ErrorFeedback | None
    hmax: float  # entropy-code planes estimated at most this many bits per byte
    q8_totals: dict[str, int]
    starts: list[int]  # of the runs


def _encode_window(job: _Job, parts: list[_Part], w0: int, dlen: int) -> memoryview:
    bound = _WH.size + _PD.size * len(parts) + sum(4 * 17 + p.length for p in parts)
    buf = np.empty(bound, np.uint8)  # not zeroed: every byte up to pos is written
    pos = _WH.size + _PD.size * len(parts)
    descs = []
    for p in parts:
        p0 = pos
        data = np.frombuffer(job.src.view(p.start, p.length), np.uint8)
        kind = p.kind
        if kind == K_Q8:
            done = _encode_q8(job, p, data, buf, pos)
            if done is None:  # non-finite values: this part goes lossless (xor)
                kind = K_XOR
            else:
                pos = done
        if kind == K_SUB:
            bel = np.frombuffer(job.base.reader.view(p.base_off, p.length), np.uint8)
            zel = _sub_planes(data, bel, p.itemsize)
            for i in range(p.itemsize):
                pos = _put_blob(buf, pos, zel[:, i], job.hmax)
            del zel
        if kind in (K_PLANES, K_XOR):
            isz = p.itemsize
            if p.length % isz:
                raise AssertionError("part length is not a multiple of its itemsize")
            el = data.reshape(-1, isz)
            if kind == K_XOR:
                bel = np.frombuffer(job.base.reader.view(p.base_off, p.length), np.uint8)
                bel = bel.reshape(-1, isz)
            for i in range(isz):
                pos = _put_blob(buf, pos, el[:, i], job.hmax,
                                bel[:, i] if kind == K_XOR else None)
        descs.append(_PD.pack(kind, p.itemsize,
                              p.qdtype if kind == K_Q8 else 0, 0, p.length, pos - p0, 0,
                              p.base_off if kind != K_PLANES else 0))
    _WH.pack_into(buf, 0, b"FW", len(parts), dlen, pos, 0)
    buf[_WH.size: _WH.size + _PD.size * len(parts)] = np.frombuffer(b"".join(descs), np.uint8)
    if pos < bound // 2:  # do not keep a mostly empty window-sized buffer alive
        return memoryview(buf[:pos].tobytes())
    return memoryview(buf)[:pos]


def _encode_q8(job: _Job, p: _Part, data: np.ndarray, buf: bytearray, pos: int) -> int | None:
    dt = p.qdtype
    x = _q8.to_f32(data, dt)
    braw = np.frombuffer(job.base.reader.view(p.base_off, p.length), np.uint8)
    b = _q8.to_f32(braw, dt)
    n = len(x)
    res = None
    if job.feedback is not None:
        full = job.feedback.residual(p.qname, job.q8_totals[p.qname])
        res = full[p.qindex: p.qindex + n]
    u = x - b
    if res is not None:
        u += res
    if not np.isfinite(u).all():
        if res is not None:
            res[:] = 0
        return None
    scales, codes = _q8.quantize(u)
    y = _q8.dequantize(b, scales, codes)
    yb = _q8.from_f32(y, dt)
    y_exact = _q8.to_f32(yb, dt)
    if not np.isfinite(y_exact).all():  # float16 overflow near its range: stay exact
        if res is not None:
            res[:] = 0
        return None
    if res is not None:
        res[:] = (x + res) - y_exact
    pos = _put_blob(buf, pos, scales.view(np.uint8), 0.0)
    pos = _put_blob(buf, pos, codes.view(np.uint8), job.hmax)
    return pos


def encode(payload: EncodedPayload, codec: str, *, base: Base | None = None,
           feedback: _q8.ErrorFeedback | None = None, window: int = WINDOW,
           threads: int | None = None, compress: bool = True,
           digest: bool = True) -> EncodedPayload:
    """Encode a raw payload (as :func:`flwr_transports.codec.encode` made it) with
    ``codec``. ``raw`` returns ``payload`` itself. ``delta`` and ``q8`` need the
    ``base`` the receiver holds; arrays missing from it (or with another layout) are
    coded ``lossless``. ``q8`` updates ``feedback`` (the client's residuals) when given.
    The result's digest covers the encoded bytes (the bytes on the wire); the raw
    payload's digest travels in the stream header (``content``).
    ``compress=False`` skips the entropy coder (byte planes and XOR only; for tests);
    ``digest=False`` leaves the digest empty (to time the coder alone)."""
    if codec == RAW:
        return payload
    if codec not in CODEC_IDS:
        raise ValueError(f"unknown codec {codec!r} (one of {', '.join(CODECS)})")
    if codec in (DELTA, Q8) and base is None:
        raise ValueError(f"codec {codec!r} needs the base payload the receiver holds")
    if not (MIN_WINDOW <= window <= MAX_WINDOW and window & (window - 1) == 0):
        raise ValueError(f"window must be a power of two in [{MIN_WINDOW}, {MAX_WINDOW}]")
    src = SegmentReader(payload.segments)
    size = src.size
    if size != payload.size:
        raise ValueError("payload size does not match its segments")
    head = read_header(src.read, size)
    runs = _plan(head, size, base, codec)
    job = _Job(src, base if codec in (DELTA, Q8) else None, feedback,
               ENTROPY_MAX[codec] if compress else 0.0,
               {a.name: math.prod(a.shape) for a in head.arrays}, [r.start for r in runs])
    nwin = -(-size // window)
    spans = [(k * window, min(size, (k + 1) * window)) for k in range(nwin)]

    def one(span: tuple[int, int]) -> memoryview:
        w0, w1 = span
        parts = _window_parts(runs, job.starts, w0, w1)
        if len(parts) > MAX_PARTS:  # pathological layout: the window as plain bytes
            parts = [_Part(K_PLANES, 1, w0, w1 - w0)]
        return _encode_window(job, parts, w0, w1 - w0)

    nthreads = threads if threads is not None else default_threads()
    if nthreads > 1 and nwin > 1:
        frames = list(_pool().map(one, spans))
    else:
        frames = [one(s) for s in spans]
    hdr = bytearray(_SH.pack(MAGIC, VERSION if codec == DELTA else 1, CODEC_IDS[codec],
                             _q8.QBLOCK if codec == Q8 else 0, window, nwin, size,
                             _digest_bytes(payload.digest),
                             base._raw if job.base is not None else _ZERO32))
    hdr += struct.pack(f"<{nwin}I", *(len(f) for f in frames))
    segments: list[bytes | memoryview] = [bytes(hdr), *frames]
    return EncodedPayload(segments=segments, size=sum(len(s) for s in segments),
                          digest=hash_segments(segments) if digest else "",
                          n_arrays=payload.n_arrays)


# --------------------------------------------------------------------------- decode


def is_encoded(prefix: bytes | bytearray | memoryview) -> bool:
    """Whether a payload's first bytes are an encoded stream (not a raw payload)."""
    return bytes(prefix[:4]) == MAGIC


@dataclass(frozen=True)
class StreamInfo:
    codec: str
    version: int
    window: int
    nwin: int
    size: int  # decoded
    content_digest: str
    base_digest: str | None
    qblock: int
    offsets: tuple[int, ...]  # of each frame in the stream
    lengths: tuple[int, ...]
    wire_size: int


def read_info(read: Callable[[int, int], bytes], wire_size: int, *,
              max_size: int = MAX_DECODED) -> StreamInfo:
    """Parse and check a stream header and window table (reads only those)."""

    def _read(off: int, n: int) -> bytes:
        b = read(off, n)
        if len(b) != n:
            raise PayloadError(f"short read at offset {off}: wanted {n}, got {len(b)}")
        return b

    if wire_size < STREAM_HEADER:
        raise PayloadError(f"encoded payload too small ({wire_size} bytes)")
    magic, ver, cid, qblock, window, nwin, size, content, based = _SH.unpack(
        _read(0, STREAM_HEADER))
    if magic != MAGIC:
        raise PayloadError("not an encoded payload (bad magic)")
    if ver not in READS:
        raise PayloadError(f"unsupported encoded payload version {ver} (this reads "
                           f"{', '.join(map(str, READS))}: upgrade flwr-transports on this "
                           "side)")
    codec = CODEC_NAMES.get(cid)
    if codec is None:
        raise PayloadError(f"unknown codec id {cid}")
    if not (MIN_WINDOW <= window <= MAX_WINDOW and window & (window - 1) == 0):
        raise PayloadError(f"bad window size {window}")
    if size > max_size:
        raise PayloadError(f"encoded payload decodes to {size} bytes, over the limit of "
                           f"{max_size}")
    if size < 8 or nwin != -(-size // window):
        raise PayloadError(f"window count {nwin} does not match decoded size {size}")
    if codec == Q8 and not (8 <= qblock <= 65536 and qblock == _q8.QBLOCK):
        raise PayloadError(f"unsupported q8 block size {qblock}")
    if codec != Q8 and qblock:
        raise PayloadError("q8 block size set on a non-q8 payload")
    if (based == _ZERO32) != (codec == LOSSLESS):
        raise PayloadError(f"base digest {'missing' if codec != LOSSLESS else 'set'} "
                           f"for codec {codec}")
    table_end = STREAM_HEADER + 4 * nwin
    if table_end > wire_size:
        raise PayloadError("encoded payload too small for its window table")
    lengths = struct.unpack(f"<{nwin}I", _read(STREAM_HEADER, 4 * nwin))
    offsets = []
    pos = table_end
    for k, n in enumerate(lengths):
        dlen = min(window, size - k * window)
        if not (_WH.size + _PD.size <= n <= dlen + FRAME_SLACK):
            raise PayloadError(f"window {k}: frame length {n} is invalid for {dlen} bytes")
        offsets.append(pos)
        pos += n
    if pos != wire_size:
        raise PayloadError(f"encoded payload is {wire_size} bytes, its table says {pos}")
    return StreamInfo(codec, ver, window, nwin, size, _digest_str(content),
                      None if codec == LOSSLESS else _digest_str(based), qblock,
                      tuple(offsets), tuple(lengths), wire_size)


def _blob(frame: memoryview, pos: int, end: int, expect: int) -> tuple[np.ndarray, int]:
    """Read one blob at ``pos`` (not past ``end``) that must decode to ``expect``
    bytes; returns (uint8 array, next position)."""
    if pos + 4 > end:
        raise PayloadError("truncated blob word")
    (w,) = _U32.unpack_from(frame, pos)
    n, z = w & ~_ZBIT, bool(w & _ZBIT)
    pos += 4
    if pos + n > end:
        raise PayloadError(f"blob of {n} bytes overruns its part")
    data = frame[pos: pos + n]
    if not z:
        if n != expect:
            raise PayloadError(f"stored blob has {n} bytes, expected {expect}")
        return np.frombuffer(data, np.uint8), pos + n
    zs = _zstd()
    try:
        declared = zs.frame_content_size(data)
    except zs.ZstdError:
        raise PayloadError("corrupt zstd blob header") from None
    if declared != expect:
        raise PayloadError(f"zstd blob declares {declared} bytes, expected {expect}")
    if _zstd_frame_len(data) != n:
        raise PayloadError("zstd blob does not end where its length says")
    try:
        out = _decompressor().decompress(data, max_output_size=expect)
    except zs.ZstdError as exc:
        raise PayloadError(f"corrupt zstd blob: {exc}") from None
    if len(out) != expect:  # pragma: no cover - zstd checks the declared size itself
        raise PayloadError(f"zstd blob decoded to {len(out)} bytes, expected {expect}")
    return np.frombuffer(out, np.uint8), pos + n


def _zstd_frame_len(data: memoryview) -> int:
    """The length of the single zstd frame at the start of ``data`` (walks its block
    headers; -1 when malformed)."""
    zs = _zstd()
    try:
        pos = zs.frame_header_size(data)
        params = zs.get_frame_parameters(data)
    except zs.ZstdError:
        return -1
    n = len(data)
    while True:
        if pos + 3 > n:
            return -1
        bh = data[pos] | (data[pos + 1] << 8) | (data[pos + 2] << 16)
        pos += 3
        last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
        if btype == 3:
            return -1
        pos += 1 if btype == 1 else bsize
        if pos > n:
            return -1
        if last:
            break
    if params.has_checksum:
        pos += 4
    return pos


class Decoder:
    """Decodes an encoded stream window by window (each independent).

    ``read(off, n)`` reads the stream (ranged reads are fine); ``wire_size`` is its
    length; ``base`` the payload it was coded against (delta, q8: its digest must match
    the stream's, or the stream is refused); ``max_size`` bounds the decoded size."""

    def __init__(self, read: Callable[[int, int], bytes], wire_size: int, *,
                 base: Base | None = None, max_size: int = MAX_DECODED) -> None:
        self._read = read
        self.info = read_info(read, wire_size, max_size=max_size)
        self.base = None
        if self.info.codec in (DELTA, Q8):
            if base is None:
                raise PayloadError(
                    f"{self.info.codec} payload against base {self.info.base_digest}, "
                    "and no base is held here")
            if base.digest != self.info.base_digest:
                raise PayloadError(
                    f"{self.info.codec} payload against base {self.info.base_digest}, "
                    f"which is not the base held here ({base.digest})")
            self.base = base

    @property
    def size(self) -> int:
        return self.info.size

    def window_span(self, k: int) -> tuple[int, int]:
        w = self.info.window
        return k * w, min(self.info.size, (k + 1) * w)

    def decode_window(self, k: int, out: memoryview | bytearray | SegmentWriter | None = None
                      ) -> memoryview | None:
        """Decode window ``k`` into ``out``: a buffer of exactly its decoded length, a
        :class:`SegmentWriter` over the whole decoded payload (the window lands at its
        offset), or None (a new buffer, returned)."""
        if not 0 <= k < self.info.nwin:
            raise IndexError(k)
        w0, w1 = self.window_span(k)
        dlen = w1 - w0
        ret = None
        if isinstance(out, SegmentWriter):
            if out.size != self.info.size:
                raise ValueError("writer size differs from the decoded size")
            writer, origin = out, w0
        else:
            if out is None:
                out = bytearray(dlen)
            ret = memoryview(out).cast("B")
            if len(ret) != dlen:
                raise ValueError(f"window {k} decodes to {dlen} bytes, buffer has {len(ret)}")
            writer, origin = SegmentWriter([ret]), 0
        raw = self._read(self.info.offsets[k], self.info.lengths[k])
        if len(raw) != self.info.lengths[k]:
            raise PayloadError(f"short read of window {k}")
        self._decode_frame(memoryview(raw).cast("B"), dlen, writer, origin, k)
        return ret

    def _decode_frame(self, frame: memoryview, dlen: int, writer: SegmentWriter, origin: int,
                      k: int) -> None:
        elen = len(frame)
        if elen < _WH.size:
            raise PayloadError(f"window {k}: truncated frame")
        tag, nparts, fdlen, felen, zero = _WH.unpack_from(frame, 0)
        if tag != b"FW" or zero:
            raise PayloadError(f"window {k}: bad frame header")
        if fdlen != dlen or felen != elen:
            raise PayloadError(f"window {k}: frame says {fdlen}/{felen} bytes, expected "
                               f"{dlen}/{elen}")
        if not 1 <= nparts <= MAX_PARTS or _WH.size + _PD.size * nparts > elen:
            raise PayloadError(f"window {k}: bad part count {nparts}")
        pos = _WH.size + _PD.size * nparts
        descs = [_PD.unpack_from(frame, _WH.size + _PD.size * i) for i in range(nparts)]
        if sum(d[4] for d in descs) != dlen:
            raise PayloadError(f"window {k}: parts do not add up to the window")
        if pos + sum(d[5] for d in descs) != elen:
            raise PayloadError(f"window {k}: part lengths do not add up to the frame")
        opos = origin
        for kind, isz, qdt, z1, plen, pelen, z2, boff in descs:
            if z1 or z2 or not 1 <= isz <= 16 or plen % isz or plen == 0:
                raise PayloadError(f"window {k}: bad part descriptor")
            end = pos + pelen
            if kind == K_PLANES:
                if boff or qdt:
                    raise PayloadError(f"window {k}: bad part descriptor")
                bview = None
            elif kind in (K_XOR, K_Q8, K_SUB):
                if self.base is None:
                    raise PayloadError(f"window {k}: a base-coded part in a {self.info.codec} "
                                       "payload")
                if boff + plen > self.base.size:
                    raise PayloadError(f"window {k}: part refers outside the base")
                if kind in (K_XOR, K_SUB) and qdt:
                    raise PayloadError(f"window {k}: bad part descriptor")
                if kind == K_SUB and (isz not in _UINT or self.info.version < 2):
                    raise PayloadError(f"window {k}: bad sub part")
                if kind == K_Q8 and (self.info.codec != Q8 or _q8.ITEMSIZE.get(qdt) != isz):
                    raise PayloadError(f"window {k}: bad q8 part")
                bview = np.frombuffer(self.base.reader.view(boff, plen), np.uint8)
            else:
                raise PayloadError(f"window {k}: unknown part kind {kind}")
            target, flush = writer.span(opos, plen)
            if kind == K_Q8:
                pos = self._q8(frame, pos, end, target, qdt, bview)
            elif kind == K_SUB:
                pos = self._planes(frame, pos, end, target, isz, None)
                _unsub(target, bview, isz)
            else:
                pos = self._planes(frame, pos, end, target, isz, bview)
            if pos != end:
                raise PayloadError(f"window {k}: part data does not fill its length")
            if flush is not None:
                flush()
            opos += plen

    @staticmethod
    def _planes(frame, pos, end, target, isz, bview) -> int:
        n = len(target) // isz
        el = target.reshape(n, isz)
        bel = bview.reshape(n, isz) if bview is not None else None
        for i in range(isz):
            plane, pos = _blob(frame, pos, end, n)
            if bel is None:
                el[:, i] = plane
            else:
                np.bitwise_xor(plane, bel[:, i], out=el[:, i])
        return pos

    def _q8(self, frame, pos, end, target, qdt, bview) -> int:
        isz = _q8.ITEMSIZE[qdt]
        n = len(target) // isz
        nb = -(-n // self.info.qblock)
        sc, pos = _blob(frame, pos, end, 4 * nb)
        codes, pos = _blob(frame, pos, end, n)
        scales = sc.view("<f4")
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise PayloadError("q8 part has a non-finite or negative scale")
        y = _q8.dequantize(_q8.to_f32(bview, qdt), scales, codes.view(np.int8))
        target[:] = _q8.from_f32(y, qdt)
        return pos

    def decode_into(self, out: bytearray | memoryview, *, threads: int | None = None) -> None:
        """Decode the whole payload into ``out`` (exactly :attr:`size` bytes), windows
        in parallel."""
        dst = memoryview(out).cast("B")
        if len(dst) != self.info.size:
            raise ValueError("output buffer size differs from the decoded size")

        writer = SegmentWriter([dst])

        def one(k: int) -> None:
            self.decode_window(k, writer)

        nthreads = threads if threads is not None else default_threads()
        if nthreads > 1 and self.info.nwin > 1:
            for f in [_pool().submit(one, k) for k in range(self.info.nwin)]:
                f.result()
        else:
            for k in range(self.info.nwin):
                one(k)

    def decode(self, *, threads: int | None = None, verify: bool = False) -> bytearray:
        """The whole decoded payload (``verify``: also check the content digest)."""
        out = bytearray(self.info.size)
        self.decode_into(out, threads=threads)
        if verify:
            self.check_content(out)
        return out

    def check_content(self, decoded: bytes | bytearray | memoryview) -> None:
        got = hash_segments([decoded])
        if got != self.info.content_digest:
            raise PayloadError(f"decoded payload has digest {got}, its header says "
                               f"{self.info.content_digest}")

    def reader(self) -> Callable[[int, int], bytes]:
        """A ranged reader over the decoded payload (windows decoded on demand, the last
        one kept): for :func:`flwr_transports.codec.decode` and the streaming fold.
        Each read is a copy out of the decoded window; :func:`decode_record` decodes
        straight into the arrays instead."""
        cache: dict[int, memoryview] = {}
        lock = threading.Lock()

        def window(k: int) -> memoryview:
            with lock:
                v = cache.get(k)
                if v is None:
                    cache.clear()
                    v = cache[k] = self.decode_window(k)
                return v

        W = self.info.window

        def read(off: int, n: int) -> bytes:
            if off < 0 or n < 0 or off + n > self.info.size:
                raise PayloadError(f"read {off}+{n} outside the decoded payload")
            out = bytearray(n)
            got = 0
            while got < n:
                k, rel = divmod(off + got, W)
                v = window(k)
                take = min(n - got, len(v) - rel)
                out[got: got + take] = v[rel: rel + take]
                got += take
            return bytes(out)

        return read


def decode_payload(buf: bytes | bytearray | memoryview, *, base: Base | None = None,
                   max_size: int = MAX_DECODED, verify: bool = False,
                   threads: int | None = None) -> bytes | bytearray | memoryview:
    """A whole payload as received: an encoded stream is decoded (bounded by
    ``max_size``), a raw payload returned as is."""
    mv = memoryview(buf).cast("B")
    if not is_encoded(mv[:4]):
        return buf
    dec = Decoder(lambda off, n: mv[off: off + n], len(mv), base=base, max_size=max_size)
    return dec.decode(threads=threads, verify=verify)


def decode_record(dec: Decoder, *, threads: int | None = None, verify: bool = False,
                  with_base: bool = False):
    """Decode a stream straight into an ArrayRecord: each array's bytes are decoded into
    their final ``bytes`` object (no copy of the payload after decoding); the windows
    holding the payload header are decoded once to read it, then copied.
    ``verify``: check the decoded payload against the stream's content digest.
    ``with_base``: return ``(record, Base)``, the decoded payload as a base for a later
    delta (its digest: the stream's content digest; its segments: the record's bytes)."""
    from flwr.app import Array, ArrayRecord

    from .. import _membuf

    W = dec.info.window
    cache: dict[int, memoryview] = {}

    def hread(off: int, n: int) -> bytes:
        if off < 0 or n < 0 or off + n > dec.size:
            raise PayloadError(f"read {off}+{n} outside the decoded payload")
        out = bytearray(n)
        got = 0
        while got < n:
            k, rel = divmod(off + got, W)
            if k not in cache:
                cache[k] = dec.decode_window(k)
            v = cache[k]
            take = min(n - got, len(v) - rel)
            out[got: got + take] = v[rel: rel + take]
            got += take
        return bytes(out)

    head = read_header(hread, dec.size)
    hbuf = bytearray(head.raw)
    objs, views = [], [memoryview(hbuf)]
    for a in head.arrays:
        obj, view = _membuf.alloc_bytes(a.end - a.start, huge=True)
        objs.append(obj)
        views.append(view)
    writer = SegmentWriter(views)
    for k, v in cache.items():
        writer.write(k * W, v)
    todo = [k for k in range(dec.info.nwin) if k not in cache]
    cache.clear()
    nthreads = threads if threads is not None else default_threads()
    if nthreads > 1 and len(todo) > 1:
        for f in [_pool().submit(dec.decode_window, k, writer) for k in todo]:
            f.result()
    else:
        for k in todo:
            dec.decode_window(k, writer)
    if verify:
        got = hash_segments([hbuf, *objs])
        if got != dec.info.content_digest:
            raise PayloadError(f"decoded payload has digest {got}, its header says "
                               f"{dec.info.content_digest}")
    out = ArrayRecord()
    datas = []
    for a, obj in zip(head.arrays, objs, strict=True):
        data = obj if isinstance(obj, bytes) else bytes(obj)
        datas.append(data)
        out[a.name] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=data)
    if with_base:
        return out, Base(dec.info.content_digest, [bytes(hbuf), *datas])
    return out


def content_digest(payload: bytes | bytearray | memoryview) -> str:
    """The ``sha256t`` digest a stream header records for its decoded payload."""
    return hash_segments([payload])


__all__ = [
    "CODECS", "Base", "Decoder", "SegmentReader", "SegmentWriter", "StreamInfo",
    "content_digest", "decode_payload", "decode_record", "encode", "is_encoded",
    "read_info",
]

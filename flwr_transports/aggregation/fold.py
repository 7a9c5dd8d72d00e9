"""A running weighted sum of reply payloads, folded window by window, in parallel.

:class:`WeightedSum` keeps ONE accumulator per array (for float32/float64/complex the
accumulator already lives inside the ``bytes`` object that becomes the result's
``Array.data``, after its ``.npy`` header: the final mean needs no copy). A payload is
folded from its link's own buffers (:class:`Source`): the payload is cut into the
16 MiB windows of its ``sha256t`` digest; each window, independently and in a thread
pool (hashlib and NumPy release the GIL), is read once, hashed, checked against the
header bytes the plan was made from, and its whole elements are folded into their
slice of the accumulator. An element that straddles two windows is kept as two
fragments from the two hashed reads and folded at the end. So exactly the bytes that
are hashed are the bytes folded, and the digest returned describes them.

Shards are disjoint byte ranges of the payload that map onto disjoint slices of the
accumulator: the same plan can put shards on other processes or hosts (ranged reads
of a store; see docs/aggregation.md).
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from .._membuf import alloc_bytes
from ..codec import DIGEST_ALGO, DIGEST_CHUNK, PayloadError
from .layout import ArrayPlan, Plan, Unfoldable, npy_header

WINDOW = DIGEST_CHUNK  # shards follow the digest's leaves
SUB = 1 << 18  # elements folded per NumPy call (keeps temporaries in cache)
STRIPES = 64  # locks of a concurrent sum (element blocks of SUB, hashed onto them)
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_TLS = threading.local()


def fold_workers() -> int:
    from ..settings import text

    try:
        n = int(text("FLWR_TRANSPORTS_FOLD_WORKERS"))
    except ValueError:
        n = 0
    return max(1, min(8, n or (os.cpu_count() or 1)))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(fold_workers(), thread_name_prefix="ftx-fold")
        return _POOL


class Source:
    """What a fold reads: ``read(off, n) -> bytes`` (any link), and optionally
    ``view(off, n) -> memoryview`` over an immutable buffer (tcp receive buffers: no
    copy) or ``readinto(off, memoryview)`` (files: into a reused, aligned buffer).
    ``wait(off, n)`` (optional): blocks until those bytes have landed (an upload still
    arriving piece by piece, e.g. s3://'s segmented replies); the fold calls it before
    it hands a window to its pool, so no pool thread ever waits on the network.
    ``read_buffer`` (optional), preferred to ``read``: any bytes-like object (a
    received buffer, not copied into ``bytes``)."""

    def __init__(self, size: int, read=None, view=None, readinto=None, wait=None):
        self.size, self.read, self.view, self.readinto = size, read, view, readinto
        self.wait = wait

    @classmethod
    def of(cls, src) -> Source:
        """Wrap a link's PayloadSource (uses its ``view``/``readinto``/``wait`` when it
        has them)."""
        return cls(src.size, getattr(src, "read_buffer", None) or src.read,
                   getattr(src, "view", None), getattr(src, "readinto", None),
                   getattr(src, "wait", None))

    @classmethod
    def from_bytes(cls, buf) -> Source:
        mv = memoryview(buf).cast("B")
        return cls(len(mv), lambda o, n: bytes(mv[o:o + n]), lambda o, n: mv[o:o + n])


def _scratch(n: int, z: int) -> memoryview:
    """A thread-local aligned byte buffer with room for ``n`` bytes after a shift < z."""
    buf = getattr(_TLS, "buf", None)
    if buf is None or len(buf) < n + 16:
        buf = np.empty(max(n, WINDOW) + 16, dtype=np.uint8)
        _TLS.buf = buf
    return memoryview(buf)


def _tmp(dtype: np.dtype, n: int) -> np.ndarray:
    key = f"tmp_{dtype.str}"
    t = getattr(_TLS, key, None)
    if t is None or len(t) < n:
        t = np.empty(max(n, SUB), dtype=dtype)
        setattr(_TLS, key, t)
    return t[:n]


@dataclass
class _Acc:
    plan: ArrayPlan
    arr: np.ndarray  # 1-D accumulator, storage order
    data: object | None  # the bytes object holding header + arr ("same" kind)


class WeightedSum:
    """``sum_i w_i * x_i`` over folded payloads that share one layout.

    ``concurrent=True``: several payloads may be folded at once (uploads that arrive
    piece by piece are folded as their pieces land, side by side): the accumulators
    start at zero and every write holds the lock of its block of elements."""

    concurrent = False  # (subclasses that lay out their own accumulators fold one at a time)

    def __init__(self, plan: Plan, concurrent: bool = False):
        self.concurrent = concurrent
        self._meta = threading.Lock()
        self._locks = [threading.Lock() for _ in range(STRIPES)] if concurrent else []
        self.signature = plan.signature()
        self.accs: list[_Acc] = []
        for a in plan.arrays:
            if a.out_dtype is not None and a.acc_dtype == a.out_dtype:  # sum in place
                head = npy_header(a.out_dtype, a.shape, a.fortran)
                obj, view = alloc_bytes(len(head) + a.count * a.acc_dtype.itemsize, huge=True)
                view[:len(head)] = head
                arr = np.frombuffer(view, dtype=a.acc_dtype, offset=len(head), count=a.count)
                self.accs.append(_Acc(a, arr, obj))
            else:
                self.accs.append(_Acc(a, np.empty(a.count, dtype=a.acc_dtype), None))
            if concurrent:
                self.accs[-1].arr.fill(0)
        self.folded: list[tuple[object, float]] = []  # (id, weight) in fold order
        self.total = 0
        self.dirty = False  # a fold failed half-way: the sum is not trustworthy
        self.done = False

    def compatible(self, plan: Plan) -> bool:
        return plan.signature() == self.signature

    def reset(self) -> None:
        self.folded, self.total, self.dirty, self.done = [], 0, False, False

    # -- folding ------------------------------------------------------------------
    def fold(self, src: Source, plan: Plan, weight: float, ident: object = None) -> str:
        """Fold ``weight * payload`` in; return the ``sha256t`` digest of exactly the
        bytes folded. On any error the sum is marked dirty and the error raised."""
        if self.done:
            raise RuntimeError("the weighted sum was already turned into a mean")
        if not self.compatible(plan):
            raise Unfoldable("payload layout differs from the other replies'")
        if src.size != plan.size:
            raise PayloadError(f"payload has {src.size} bytes, planned for {plan.size}")
        first = not self.folded and not self.concurrent
        segs = plan.segments()
        n_win = -(-plan.size // WINDOW)
        w = float(weight)
        landed = src.wait
        try:
            if n_win == 1:
                if landed is not None:
                    landed(0, plan.size)
                parts = [self._window(src, plan, segs, 0, w, first)]
            else:
                futs = []
                try:  # a window goes to the pool once its bytes have landed
                    for t in range(n_win):
                        if landed is not None:
                            landed(t * WINDOW, min(WINDOW, plan.size - t * WINDOW))
                        futs.append(_pool().submit(self._window, src, plan, segs, t, w,
                                                   first))
                finally:
                    wait(futs)  # every window is done (none still writes) before we go on
                parts = [f.result() for f in futs]
            self._fold_fragments(parts, w, first)
        except BaseException:
            self.dirty = True
            raise
        if self.concurrent:
            with self._meta:
                self.folded.append((ident, weight))
                self.total += weight
        else:
            self.folded.append((ident, weight))
            self.total += weight
        leaves = b"".join(leaf for leaf, _ in parts)
        return f"{DIGEST_ALGO}:{hashlib.sha256(leaves).hexdigest()}"

    def _owns(self, k: int, i: int) -> bool:
        """Whether element ``i`` of array ``k`` is this sum's (all of them here)."""
        return True

    def _fold_fragments(self, parts, w: float, first: bool) -> None:
        """Fold the elements that straddle a window boundary: each window returned its
        pieces of them, joined here in order (every piece is hashed already)."""
        frags: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
        for _leaf, fr in parts:
            for key, piece in fr:
                if self._owns(*key):
                    frags.setdefault(key, []).append(piece)
        for (k, i), pieces in frags.items():
            pieces.sort()
            raw = b"".join(p for _, p in pieces)
            acc = self.accs[k]
            if len(raw) != acc.plan.itemsize:
                raise PayloadError("straddling element fragments do not add up")
            self._add(k, i, memoryview(raw), 1, w, first)

    def _window(self, src: Source, plan: Plan, segs, t: int, w: float, first: bool):
        a, b = t * WINDOW, min(plan.size, (t + 1) * WINDOW)
        h = hashlib.sha256()
        frags = []
        if src.view is None and src.readinto is None:  # a store: ONE ranged read per window
            whole = memoryview(src.read(a, b - a))
            if len(whole) != b - a:
                raise PayloadError(f"short read at offset {a}: wanted {b - a}, got {len(whole)}")
            src = Source(plan.size, view=lambda o, n: whole[o - a:o - a + n])
        for s, e, k in segs:
            p, q = max(s, a), min(e, b)
            if p >= q:
                continue
            if k < 0:
                mv = self._get(src, p, q - p, 0, 1)
                h.update(mv)
                self._check_pins(plan, p, mv)
                continue
            acc = self.accs[k]
            # offsets from THIS payload's plan: another upload's header may be longer or
            # shorter (its weight is written in it), shifting every array
            z, d = acc.plan.itemsize, plan.arrays[k].data_start
            i0 = -(-(p - d) // z)  # first element starting in [p, q)
            i1 = (q - d) // z  # elements ending by q
            lead = min(d + i0 * z, q) - p
            mv = self._get(src, p, q - p, lead, z)
            h.update(mv)
            if lead:
                frags.append(((k, i0 - 1), (p, bytes(mv[:lead]))))
            if i1 > i0:
                self._add(k, i0, mv[lead:lead + (i1 - i0) * z], i1 - i0, w, first)
            tail = q - (d + max(i1, i0) * z)
            if tail > 0 and i1 >= i0:
                frags.append(((k, i1), (q - tail, bytes(mv[q - p - tail:]))))
        return h.digest(), frags

    def _add(self, k: int, i: int, mv: memoryview, m: int, w: float, first: bool) -> None:
        """``w`` times elements ``[i, i+m)`` of array ``k`` (``mv``) into the sum; with
        ``concurrent``, block by block under each block's lock."""
        acc = self.accs[k]
        if not self.concurrent:
            self._fold_into(acc, i, mv, m, w, first)
            return
        z, pos, end = acc.plan.itemsize, i, i + m
        while pos < end:
            b = pos // SUB
            e = min(end, (b + 1) * SUB)
            with self._locks[(k * 7919 + b) % STRIPES]:
                self._fold_into(acc, pos, mv[(pos - i) * z:(e - i) * z], e - pos, w, False)
            pos = e

    @staticmethod
    def _get(src: Source, off: int, n: int, lead: int, z: int) -> memoryview:
        """``n`` payload bytes at ``off``, read once; elements after ``lead`` aligned."""
        if src.view is not None:
            mv = src.view(off, n)
        elif src.readinto is not None:
            shift = (-lead) % z if z in (2, 4, 8, 16) else 0
            mv = _scratch(n, z)[shift:shift + n]
            src.readinto(off, mv)
        else:
            mv = memoryview(src.read(off, n))
        if len(mv) != n:
            raise PayloadError(f"short read at offset {off}: wanted {n}, got {len(mv)}")
        return mv

    @staticmethod
    def _check_pins(plan: Plan, p: int, mv: memoryview) -> None:
        q = p + len(mv)
        for off, pin in plan.pins.items():
            lo, hi = max(off, p), min(off + len(pin), q)
            if lo < hi and mv[lo - p:hi - p] != pin[lo - off:hi - off]:
                raise PayloadError("payload changed while it was being read")

    @staticmethod
    def _fold_into(acc: _Acc, i: int, mv: memoryview, m: int, w: float, first: bool) -> None:
        a = acc.plan
        for j in range(0, m, SUB):
            c = min(SUB, m - j)
            out = acc.arr[i + j:i + j + c]
            if a.kind == "bf16":
                bits = np.frombuffer(mv, dtype="<u2", count=c, offset=j * 2)
                u = _tmp(np.dtype(np.uint32), c)
                np.left_shift(bits, 16, out=u, dtype=np.uint32)
                x = u.view(np.float32)
            else:
                x = np.frombuffer(mv, dtype=a.in_dtype, count=c, offset=j * a.itemsize)
            if first:
                np.multiply(x, w, out=out, dtype=a.acc_dtype)
            else:
                tmp = _tmp(a.acc_dtype, c)
                np.multiply(x, w, out=tmp, dtype=a.acc_dtype)
                np.add(out, tmp, out=out)

    # -- result -------------------------------------------------------------------
    def mean(self) -> ArrayRecord:
        """Divide by the total weight and hand the arrays over as an ArrayRecord (in
        place for float32/float64/complex; the sum is consumed)."""
        if self.dirty or not self.folded or self.done:
            raise RuntimeError("no clean weighted sum to take the mean of")
        self.done = True
        total = self.total
        out = ArrayRecord()
        for acc in self.accs:
            a = acc.plan
            np.divide(acc.arr, total, out=acc.arr)
            if acc.data is not None:
                data = acc.data
            elif a.kind == "bf16":
                data = a.npy_header + _to_bf16(acc.arr)
            else:
                head = npy_header(a.out_dtype, a.shape, a.fortran)
                obj, view = alloc_bytes(len(head) + a.count * a.out_dtype.itemsize)
                view[:len(head)] = head
                np.copyto(np.frombuffer(view, dtype=a.out_dtype, offset=len(head),
                                        count=a.count), acc.arr, casting="unsafe")
                data = obj
            if not isinstance(data, bytes):  # small arrays: a bytearray (one small copy)
                data = bytes(data)
            dtype = a.dtype if a.kind == "bf16" else str(a.out_dtype)
            out[a.name] = Array(dtype=dtype, shape=a.shape, stype=a.stype, data=data)
            acc.arr = None  # free per array as we go
            acc.data = None
        self.accs = []
        return out


def _to_bf16(x: np.ndarray) -> bytes:
    """float32 -> bfloat16 bits, round to nearest even (NaN stays NaN)."""
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    r[np.isnan(x)] = 0x7FC0
    return r.tobytes()

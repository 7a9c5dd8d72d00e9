"""``aggregation=ray``: the next global model written to the store by the shard owners.

After a round the owners hold the new model's elements (the mean, or the server step's
result), shard by shard. Instead of assembling them in the ServerApp, the owners write
the payload :func:`~flwr_transports.codec.encode` would give for the result record as
the parts of ONE S3 multipart upload that the ServerApp creates:

1. **Layout.** From the owners' element counts and dtypes the ServerApp builds the
   payload header (:func:`~flwr_transports.codec.header_bytes`, each array's ``.npy``
   header), so every element's byte offset in the payload is known.
2. **Parts = digest windows.** The payload is cut into parts of whole 16 MiB windows
   of the ``sha256t`` digest (every part but the last is at least 5 MiB, as S3 wants,
   and at most 10,000 parts). Part p is written by the owner holding most of its
   elements; the elements of other owners it needs (those around a shard boundary)
   come from them as Ray objects (the ServerApp only passes the references).
3. **Upload.** The ServerApp presigns one ``UploadPart`` URL per part (the store's
   credentials stay in the ServerApp); the writer fills the part, hashes its windows,
   (with ``encrypt=true``, seals its chunks with the object's key from the ServerApp:
   parts are whole chunks) PUTs it and returns ``(part number, ETag, leaf hashes)``.
4. **Complete.** The ServerApp checks the leaves (one per window, every window),
   computes the ``sha256t`` root, completes the upload and hands the object to the
   offload wrapper, which publishes it as the next model's reference. Flower's round
   loop gets a stub ``ArrayRecord`` (names, dtypes, shapes, no data, stype
   :data:`~.layout.OWNED_STYPE`) that the wrapper recognises.

An owner that dies before its part is uploaded is replaced (its elements re-made from
the store / its step's state by ``recover``) and the parts not uploaded yet are
written again. Nothing here holds the model's bytes in the ServerApp.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..codec import DIGEST_ALGO, header_bytes
from ..links.s3 import ENC_CHUNK
from .fold import WINDOW
from .ray_common import MAX_RESTARTS, RayClusterError

log = logging.getLogger("flwr_transports")

#: S3's limits on a multipart upload
MAX_PARTS = 10_000
MIN_PART = 5 << 20


@dataclass
class OutArray:
    """One array of the next model: ``key`` is how the owners index it (the array's
    index after a mean, its name after a server step)."""

    key: Any
    name: str
    dtype: str  # Flower's Array.dtype
    shape: tuple[int, ...]
    stype: str
    npy: bytes  # its .npy header
    itemsize: int

    @property
    def count(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


@dataclass
class OutputLayout:
    """Where every byte of the next model's payload comes from."""

    head: bytes
    size: int
    #: (start, end, bytes) of the header and each .npy header
    fixed: list[tuple[int, int, bytes]]
    #: (start, end, owner, key, first element of the owner's slice, itemsize)
    owned: list[tuple[int, int, int, Any, int, int]]
    arrays: list[OutArray]

    def segments(self, p0: int, p1: int):
        """What fills bytes ``[p0, p1)``: ("b", offset in part, bytes) and ("e", offset
        in part, owner, key, e0, e1, skip, nbytes) (elements ``[e0, e1)`` of the owner's
        slice, relative to it; their bytes ``[skip, skip + nbytes)``)."""
        out = []
        for s, e, raw in self.fixed:
            a, b = max(s, p0), min(e, p1)
            if a < b:
                out.append(("b", a - p0, raw[a - s:b - s]))
        for s, e, j, key, _lo, z in self.owned:
            a, b = max(s, p0), min(e, p1)
            if a < b:
                e0, e1 = (a - s) // z, -(-(b - s) // z)
                out.append(("e", a - p0, j, key, e0, e1, (a - s) - e0 * z, b - a))
        return out


def output_layout(arrays: list[OutArray], infos: list[dict]) -> OutputLayout:
    """``infos[j]``: ``{key: (lo, count)}`` of owner j's elements."""
    head = header_bytes([(a.name, a.dtype, a.shape, a.stype, len(a.npy) + a.count * a.itemsize)
                         for a in arrays])
    pos = len(head)
    fixed = [(0, pos, head)]
    owned = []
    for a in arrays:
        fixed.append((pos, pos + len(a.npy), a.npy))
        start = pos + len(a.npy)
        spans = sorted((lo, cnt, j) for j, info in enumerate(infos)
                       for k, (lo, cnt) in info.items() if k == a.key and cnt)
        at = 0
        for lo, cnt, j in spans:  # the owners' slices cover the array exactly once
            if lo != at:
                raise RuntimeError(f"aggregation=ray: the shard owners' slices of array "
                                   f"{a.name!r} do not tile it (element {at})")
            owned.append((start + lo * a.itemsize, start + (lo + cnt) * a.itemsize, j,
                          a.key, lo, a.itemsize))
            at = lo + cnt
        if at != a.count:
            raise RuntimeError(f"aggregation=ray: the shard owners hold {at} of the "
                               f"{a.count} elements of array {a.name!r}")
        pos = start + a.count * a.itemsize
    return OutputLayout(head=head, size=pos, fixed=fixed, owned=owned, arrays=arrays)


def part_bounds(size: int) -> list[tuple[int, int]]:
    """The parts: whole 16 MiB windows each (the last one shorter), at most 10,000."""
    n_win = max(1, -(-size // WINDOW))
    per = max(1, -(-n_win // MAX_PARTS))
    step = per * WINDOW
    return [(p, min(size, p + step)) for p in range(0, max(size, 1), step)]


# -- the owner's side (called by ShardOwner.write_part) -----------------------------------
def fill_part(out: dict, spec: dict, foreign: list, get) -> bytearray:
    """The bytes of one part: fixed bytes from the spec, elements from ``out`` (this
    owner's) or ``foreign`` (Ray objects of other owners' pieces, fetched with
    ``get``)."""
    buf = bytearray(spec["size"])
    mv = memoryview(buf)
    for seg in spec["segs"]:
        if seg[0] == "b":
            _, off, raw = seg
            mv[off:off + len(raw)] = raw
            continue
        _, off, fi, key, e0, e1, skip, nbytes = seg
        arr = out[key][1][e0:e1] if fi is None else get(foreign[fi])
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        if len(raw) < skip + nbytes:
            raise RuntimeError("aggregation=ray: a shard owner's piece is shorter than "
                               "its slice")
        mv[off:off + nbytes] = raw[skip:skip + nbytes]
    return buf


def seal_part(buf: bytearray, enc: dict, p0: int, size: int) -> bytes:
    """The stored bytes of a part starting at plaintext offset ``p0`` of a ``size``-byte
    payload encrypted with ``enc`` (the link's chunks, each sealed with its tag)."""
    from ..links.s3_http import Cipher

    c = enc["chunk"]
    if p0 % c:
        raise RuntimeError("aggregation=ray: a part does not start on an encryption chunk")
    cipher = Cipher(enc, size)
    mv = memoryview(buf)
    return b"".join(cipher.seal((p0 + o) // c, mv[o:o + c]) for o in range(0, len(buf), c))


def leaves_of(buf: bytearray) -> list[bytes]:
    mv = memoryview(buf)
    return [hashlib.sha256(mv[o:o + WINDOW]).digest() for o in range(0, max(len(buf), 1),
                                                                      WINDOW)]


# -- the ServerApp's side ----------------------------------------------------------------
def write_model(cluster, sink, server_round: int, lay: OutputLayout, recover) -> Any:
    """Have the owners write ``lay``'s payload as one multipart upload; returns what
    ``sink.complete`` returns (the stub record). ``recover(j)``: a new owner j holding
    the same elements (the old one died)."""
    ray = cluster.connect()
    bounds = part_bounds(lay.size)
    if WINDOW % ENC_CHUNK:  # parts must hold whole encryption chunks (encrypt=true)
        raise RuntimeError("aggregation=ray: digest windows are not whole encryption chunks")
    segs = [lay.segments(p0, p1) for p0, p1 in bounds]
    writers = []
    for sg in segs:
        share: dict[int, int] = {}
        for s in sg:
            if s[0] == "e":
                share[s[2]] = share.get(s[2], 0) + s[7]
        writers.append(max(share, key=share.get) if share else 0)
    up = sink.begin(server_round, len(bounds))
    done: dict[int, tuple[str, list[bytes]]] = {}
    try:
        for attempt in range(MAX_RESTARTS + 1):
            todo = [p for p in range(len(bounds)) if p not in done]
            if cluster.before_write is not None:
                cluster.before_write(todo, cluster)
            specs, refs = [], []
            for p in todo:  # the other owners' pieces first: no owner waits on a writer
                foreign, ps = [], []
                for s in segs[p]:
                    if s[0] == "b":
                        ps.append(s)
                        continue
                    _, off, j, key, e0, e1, skip, nbytes = s
                    if j == writers[p]:
                        ps.append(("e", off, None, key, e0, e1, skip, nbytes))
                    else:
                        foreign.append(cluster.actors[j].piece.remote(key, e0, e1))
                        ps.append(("e", off, len(foreign) - 1, key, e0, e1, skip, nbytes))
                specs.append({"num": p + 1, "size": bounds[p][1] - bounds[p][0], "segs": ps,
                              "at": bounds[p][0], "total": lay.size, "enc": up.get("enc"),
                              "url": up["urls"][p], "md5": up["md5"],
                              "retries": up["retries"], "read_timeout": up["read_timeout"]})
                refs.append(foreign)
            futs = [cluster.actors[writers[p]].write_part.remote(spec, foreign)
                    for p, spec, foreign in zip(todo, specs, refs, strict=True)]
            del refs
            failed = None
            for p, f in zip(todo, futs, strict=True):
                try:
                    num, etag, leaves = ray.get(f)
                    if num != p + 1:
                        raise RuntimeError(f"a shard owner wrote part {num} for {p + 1}")
                    done[p] = (etag, leaves)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    failed = failed or exc
                except BaseException:
                    # before the abort below: let the other owners' PUTs end first (a
                    # part finishing after an abort can keep using storage on S3)
                    _settle(ray, futs, float(up.get("read_timeout") or 120))
                    raise
            del futs
            if failed is None:
                break
            dead = _dead(ray, cluster)
            if not dead or attempt == MAX_RESTARTS:
                cause = getattr(failed, "cause", None) or failed
                raise RayClusterError(f"aggregation=ray: the shard owners could not write "
                                      f"the model of round {server_round}: {cause}")
            for j in sorted(dead):
                log.warning("flwr-transports: round %d: shard actor %d died before its part "
                            "of the next model was uploaded; a new one writes it",
                            server_round, j)
                recover(j)
        leaves: list[bytes] = []
        for p, (p0, p1) in enumerate(bounds):
            got = done[p][1]
            if len(got) != max(1, -(-(p1 - p0) // WINDOW)) or any(
                    not isinstance(x, bytes) or len(x) != 32 for x in got):
                raise RayClusterError(f"aggregation=ray: part {p + 1} of the model of round "
                                      f"{server_round} came back with wrong leaf hashes")
            leaves += got
        digest = f"{DIGEST_ALGO}:{hashlib.sha256(b''.join(leaves)).hexdigest()}"
        return sink.complete(up, [done[p][0] for p in range(len(bounds))], lay, digest)
    except BaseException:
        sink.abort(up)
        raise


def _settle(ray, futs: list, timeout: float) -> None:
    """Wait (at most ``timeout`` s) for every write still running; errors are the
    caller's to report, not these."""
    try:
        ray.wait(list(futs), num_returns=len(futs), timeout=timeout)
    except Exception:  # best effort before an abort
        log.debug("flwr-transports: waiting for the owners' writes before an abort failed",
                  exc_info=True)


def _dead(ray, cluster) -> set[int]:
    dead = set()
    for j, a in enumerate(cluster.actors):
        try:
            ray.get(a.ping.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            dead.add(j)
        except Exception as exc:  # noqa: BLE001 - a timeout: counted as dead
            log.debug("aggregation=ray: shard actor %d does not answer: %s", j, exc)
            dead.add(j)
    return dead

"""Segmented reply uploads of the ``s3://`` link (URL option ``segment``).

A multipart upload cannot be read before it is completed, so a reply uploaded as ONE
multipart object can only be folded after its last byte landed: then the ServerApp
reads it all back from the store. With ``segment=SIZE`` a reply slot is cut into
segments of about SIZE bytes (whole parts), each **its own multipart upload** of the
slot's parts, issued by the ServerApp like every other slot (presigned part URLs and
a presigned ``CompleteMultipartUpload`` per segment; no credentials reach a client).
The client first declares its payload's size (a tiny object, also a one-part
multipart upload), then uploads every part and completes each segment as soon as its
parts are up. A completed segment is readable at once, so the ServerApp folds the
reply window by window as its segments land; once the last segment lands only that
segment is left to fold.

What keeps this as strict as one object:

* every object a client can create is a multipart upload the ServerApp created: a
  discarded slot aborts them (a late client can create nothing afterwards) and
  deletes what was completed; a completed segment cannot be replaced (its upload id
  is used up);
* the declared size is bounded by the slot's cap; a segment is read only when its
  listed size is exactly what the declared size needs, with bounded ranged GETs;
* nothing folded early counts until the reply arrives: ``open_upload`` checks that
  exactly the segments a payload of the reply's size needs exist, with exactly their
  sizes (a missing, short, long or extra segment rejects the reply), and the
  streaming fold's digest (the ``sha256t`` leaves of exactly the bytes folded) must
  equal the reference's, as for every link.

Not with ``encrypt=true`` (the slot is then one object, as before).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..codec import EncodedPayload, PayloadError
from ..refs import RefError
from .base import Endpoint, LinkError, PayloadSource
from .s3_http import (
    MAX_PARTS,
    HttpTransport,
    Layout,
    Progress,
    SegmentReader,
    build_part,
    check_get_url,
    clamp_concurrency,
    compact_urls,
    expand_urls,
    part_count,
    run_all,
)

log = logging.getLogger("flwr_transports.s3")

#: seconds between listings while a segmented upload is arriving
ARRIVAL_POLL = 0.05
SIZE_MAX_BYTES = 32  # the size object: a decimal number
AHEAD = 4  # windows fetched ahead of the folds, all uploads of a link together
AHEAD_MIN = 2**20  # reads smaller than this (headers) are not windows: no read-ahead
_SEG_RE = re.compile(r"\.s(\d{4,5})$")


def seg_key(key: str, j: int) -> str:
    return f"{key}.s{j:04d}"


def size_key(key: str) -> str:
    return f"{key}.size"


# -- server ---------------------------------------------------------------------------
def issue(link, key: str, name: str, part: int, n: int) -> tuple[dict, dict]:
    """Create the multipart uploads of a segmented slot; return (state, slot)."""
    pps = max(1, link.cfg.segment // part)  # parts per segment
    # as many segments as the largest payload published so far needs (replies are
    # usually the model's size), plus one for the rest of the cap: the cap of a slot
    # (4x the model by default) costs no requests beyond that
    m = min(-(-n // pps), -(-max(link.reply_hint, 1) // (pps * part)) + 1)
    subkeys = [seg_key(key, j) for j in range(m)] + [size_key(key)]
    uploads: dict[str, str] = {}
    lock = threading.Lock()
    st = {"upload_id": None, "state": "open", "part": part, "enc": None, "n": n,
          "name": name, "seg": {"pps": pps, "m": m, "uploads": uploads}}
    with link._lock:
        link._slots[key] = st

    def create(i: int) -> None:
        up = link._boto(f"starting the reply upload {name}", link.s3.create_multipart_upload,
                        Bucket=link.cfg.bucket, Key=subkeys[i])
        with lock:
            uploads[subkeys[i]] = up["UploadId"]

    puts: list[Any] = [None] * (m + 1)
    dones: list[str] = [""] * (m + 1)

    def sign(i: int) -> None:
        k = subkeys[i]
        cnt = 1 if i == m else (pps if i < m - 1 else n - (m - 1) * pps)
        puts[i] = compact_urls(link._part_urls(k, uploads[k], cnt))
        dones[i] = link._presign("complete_multipart_upload", Key=k, UploadId=uploads[k])

    try:
        run_all(create, m + 1, link.cfg.concurrency)
        run_all(sign, m + 1, link.cfg.concurrency)
    except BaseException:
        link.discard_slot({"key": key})
        raise
    slot = {"key": key, "part": part, "conc": link.cfg.concurrency,
            "checksum": link.cfg.checksum,
            "segments": {"pps": pps, "put": puts[:m], "done": dones[:m]},
            "size": {"put": puts[m], "done": dones[m]}}
    return st, slot


def discard(link, key: str, st: dict[str, Any]) -> None:
    """Abort every upload of a segmented slot and delete what was completed."""
    seg = st["seg"]
    ups = list(seg["uploads"].items())
    if ups:
        with ThreadPoolExecutor(min(len(ups), max(1, link.cfg.concurrency))) as ex:
            list(ex.map(lambda kv: link._abort(*kv), ups))
    keys = [seg_key(key, j) for j in range(seg["m"])] + [size_key(key)]
    try:
        for i in range(0, len(keys), 1000):
            link.s3.delete_objects(Bucket=link.cfg.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
    except Exception:  # noqa: BLE001 - one by one (the store may lack DeleteObjects)
        for k in keys:
            link._delete(k)


def declared_size(link, key: str, cap: int) -> int | None:
    """The size a client declared for its segmented upload (bounded read), if valid."""
    try:
        r = link.s3.get_object(Bucket=link.cfg.bucket, Key=size_key(key),
                               Range=f"bytes=0-{SIZE_MAX_BYTES - 1}")
        raw = r["Body"].read(SIZE_MAX_BYTES + 1)
    except Exception:  # noqa: BLE001 - decided when the reply arrives
        return None
    if not 0 < len(raw) <= 20 or not raw.isdigit():
        return None
    size = int(raw)
    return size if 0 < size <= cap else None


def listed(link, key: str) -> dict[str, int]:
    """Sizes of the slot's objects (one listing of its key prefix)."""
    out: dict[str, int] = {}
    for page in link.s3.get_paginator("list_objects_v2").paginate(
            Bucket=link.cfg.bucket, Prefix=f"{key}."):
        for o in page.get("Contents", []):
            out[o["Key"]] = int(o.get("Size", -1))
            if len(out) > MAX_PARTS + 1:
                return out
    return out


class ReadAhead:
    """Windows fetched ahead of the streaming folds for ALL uploads of a link together:
    at most ``AHEAD`` windows (16 MiB each) fetched and not yet folded, however many
    uploads arrive at once (the ServerApp's memory stays flat in the number of
    clients)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.free = AHEAD

    def submit(self, fn, *args):
        """``fn(*args)`` on the read-ahead threads, or None when the budget is spent."""
        with self.lock:
            if self.free <= 0:
                return None
            if self.pool is None:
                self.pool = ThreadPoolExecutor(AHEAD, thread_name_prefix="ftx-s3-ahead")
            self.free -= 1
            return self.pool.submit(fn, *args)

    def give_back(self) -> None:
        with self.lock:
            self.free = min(AHEAD, self.free + 1)

    def close(self) -> None:
        with self.lock:
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class Arrival:
    """A segmented upload as it arrives: which segments landed (from the link's
    listings), and a PayloadSource whose ``read`` waits for the bytes it covers
    and whose ``wait`` lets the streaming fold submit a window only once it landed."""

    def __init__(self, link, key: str, size: int, st: dict[str, Any]):
        self.link, self.key, self.size = link, key, size
        self.name = st["name"]
        self.seg_bytes = st["seg"]["pps"] * st["part"]
        self.last = st["seg"]["m"] - 1  # the last segment takes the rest of the cap
        self.expect = sizes(size, self.seg_bytes, st["seg"]["m"])
        self.m = len(self.expect)
        self.cond = threading.Condition()
        self.landed: set[int] = set()
        self.bad: dict[int, int] = {}
        self.final = False  # no more waiting: what has not landed now never will
        self.dead: str | None = None
        self.deadline = time.monotonic() + link.cfg.expires
        self.complete_at: float | None = None
        self.urls: dict[int, str] = {}
        self.read_segments: set[int] = set()  # segments the fold read (observability)
        self._alock = threading.Lock()
        self._ra: ReadAhead = link._read_ahead
        self._ahead: dict[tuple[int, int], Any] = {}  # (offset, n) -> Future (read-ahead)
        self._closed = False

    # -- fed by the link -----------------------------------------------------------
    def update(self, found: dict[str, int]) -> bool:
        """A listing of the slot's objects; True when the last segment just landed."""
        with self.cond:
            for j in range(self.m):
                if j in self.landed or j in self.bad:
                    continue
                got = found.get(seg_key(self.key, j))
                if got is None:
                    continue
                if got == self.expect[j]:
                    self.landed.add(j)
                else:
                    self.bad[j] = got
            self.cond.notify_all()
            if self.complete_at is None and len(self.landed) == self.m:
                self.complete_at = time.perf_counter()
                return True
            return False

    def finish(self) -> None:
        """Stop waiting: look once more (one listing), then what is missing fails."""
        with self.cond:
            if self.final or self.dead:
                return
        try:
            self.update(listed(self.link, self.key))
        except Exception as exc:  # noqa: BLE001 - what is missing then fails
            log.debug("s3: listing the segments of %s failed: %s", self.name, exc)
        with self.cond:
            self.final = True
            self.cond.notify_all()

    def kill(self, why: str = "the reply slot was discarded") -> None:
        with self.cond:
            self.dead = why
            self.cond.notify_all()

    # -- read by the fold ----------------------------------------------------------
    def _segment(self, j: int) -> None:
        with self.cond:
            while True:
                if j in self.landed:
                    return
                if self.dead:
                    raise LinkError(f"s3: segment {j} of reply {self.name}: {self.dead}")
                if j in self.bad:
                    raise PayloadError(f"s3: segment {j} of reply {self.name} has "
                                       f"{self.bad[j]} bytes, a {self.size}-byte payload "
                                       f"needs {self.expect[j]}")
                if self.final or time.monotonic() > self.deadline:
                    raise PayloadError(f"s3: segment {j} of reply {self.name} never landed")
                self.cond.wait(0.5)

    def wait(self, off: int, n: int) -> None:
        if n <= 0:
            return
        if off < 0 or off + n > self.size:
            raise PayloadError(f"read of {n} bytes at {off} is outside a {self.size}-byte "
                               "payload")
        for j in range(self._of(off), self._of(off + n - 1) + 1):
            self._segment(j)

    def _of(self, off: int) -> int:
        return min(off // self.seg_bytes, self.last)

    def _url(self, j: int) -> str:
        url = self.urls.get(j)
        if url is None:
            url = self.urls[j] = self.link._presign(
                "get_object", expires=min(self.link.cfg.expires, 3600),
                Key=seg_key(self.key, j))
        return url

    def read(self, off: int, n: int) -> bytes:
        data = self.read_buffer(off, n)
        return data if isinstance(data, bytes) else bytes(data)

    def read_buffer(self, off: int, n: int) -> bytes | bytearray:
        """``read`` without turning the received buffer into ``bytes`` (the fold
        hashes and folds it where it is). Reads of the fold's windows (``n`` bytes
        each, in order) fetch next windows of landed segments ahead (the link's
        :class:`ReadAhead` budget), so the fold does not wait for the store one window
        at a time."""
        self.wait(off, n)
        if n < AHEAD_MIN:  # header reads: no read-ahead
            return self._fetch(off, n)
        with self._alock:
            if self._closed:
                raise LinkError(f"s3: reply {self.name} was closed")
            f = self._ahead.pop((off, n), None)
            nxt = off + n
            for _ in range(AHEAD):
                k = min(n, self.size - nxt)
                if k <= 0 or not self._landed(nxt, k):
                    break
                if (nxt, k) not in self._ahead:
                    g = self._ra.submit(self._fetch, nxt, k)
                    if g is None:
                        break
                    self._ahead[(nxt, k)] = g
                nxt += k
            for key in [key for key in self._ahead if key[0] < off]:  # passed: drop
                self._ahead.pop(key).cancel()
                self._ra.give_back()
        if f is None:
            return self._fetch(off, n)
        try:
            return f.result()
        finally:
            self._ra.give_back()

    def _landed(self, off: int, n: int) -> bool:
        with self.cond:
            return all(j in self.landed
                       for j in range(self._of(off), self._of(off + n - 1) + 1))

    def close(self) -> None:
        with self._alock:
            self._closed = True
            for f in self._ahead.values():
                f.cancel()
                self._ra.give_back()
            self._ahead.clear()

    def _fetch(self, off: int, n: int) -> bytes | bytearray:
        out = []
        end = off + n
        while off < end:
            j = self._of(off)
            a = off - j * self.seg_bytes
            b = min(end - j * self.seg_bytes, self.expect[j])
            out.append(self.link.http.get_range(
                self._url(j), a, b, self.expect[j],
                f"reading segment {j + 1}/{self.m} of reply {self.name}"))
            self.read_segments.add(j)
            off += b - a
        return out[0] if len(out) == 1 else b"".join(out)

    def source(self) -> PayloadSource:
        src = PayloadSource(self.read, self.size, self.close)
        src.wait = self.wait
        src.read_buffer = self.read_buffer
        src.finish = self.finish
        return src


def sizes(size: int, seg_bytes: int, m: int) -> list[int]:
    """Bytes of each segment a ``size``-byte payload fills (segments 0..m-2 hold
    ``seg_bytes`` each, the last one the rest)."""
    used = min(m, max(1, -(-size // seg_bytes)))
    return [min(seg_bytes, size - j * seg_bytes) if j < m - 1 else size - j * seg_bytes
            for j in range(used)]


def check(link, key: str, st: dict[str, Any], size: int) -> dict[str, int]:
    """The reply is here: exactly the segments a ``size``-byte payload needs, with
    exactly their sizes, and no other segment (RefError otherwise)."""
    seg_bytes = st["seg"]["pps"] * st["part"]
    expect = sizes(size, seg_bytes, st["seg"]["m"])
    m = len(expect)
    found = listed(link, key)
    segs = {}
    for k, v in found.items():
        mt = _SEG_RE.search(k)
        if mt and k == seg_key(key, int(mt.group(1))):
            segs[int(mt.group(1))] = v
    want = dict(enumerate(expect))
    if set(segs) != set(want):
        have = sorted(segs)
        raise RefError(f"reply upload has segments {have[:12]}{'...' if len(have) > 12 else ''}"
                       f", a {size}-byte payload needs segments 0..{m - 1}")
    for j, v in sorted(segs.items()):
        if v != want[j]:
            raise RefError(f"reply segment {j} has {v} bytes, a {size}-byte payload needs "
                           f"{want[j]}")
    return found


# -- client ---------------------------------------------------------------------------
def endpoints(desc: dict[str, Any]) -> list[Endpoint]:
    """Every URL a segmented slot makes a client request (validated as used)."""
    segs, sz = _parse(desc)
    eps = []
    for j, (urls, done) in enumerate(segs):
        eps += [Endpoint.http(f"segments.put[{j}][{i}]", u) for i, u in enumerate(urls)]
        eps.append(Endpoint.http(f"segments.done[{j}]", done))
    eps += [Endpoint.http("size.put", sz[0][0]), Endpoint.http("size.done", sz[1])]
    return eps


def _parse(desc: Any) -> tuple[list[tuple[list[str], str]], tuple[list[str], str]]:
    if not isinstance(desc, dict):
        raise RefError("s3:// slot is not an object")
    segs, sz = desc.get("segments"), desc.get("size")
    if not isinstance(segs, dict) or not isinstance(sz, dict):
        raise RefError("s3:// segmented slot is malformed")
    puts, dones = segs.get("put"), segs.get("done")
    if (not isinstance(puts, list) or not isinstance(dones, list) or len(puts) != len(dones)
            or not 1 <= len(puts) <= MAX_PARTS):
        raise RefError("s3:// segmented slot has malformed segment URLs")
    out = [(expand_urls(p), check_get_url(d, "segments.done")) for p, d in zip(puts, dones)]
    if sum(len(u) for u, _ in out) > MAX_PARTS:
        raise RefError(f"s3:// segmented slot has more than {MAX_PARTS} part URLs")
    size_put = expand_urls(sz.get("put"), max_parts=1)
    return out, (size_put, check_get_url(sz.get("done"), "size.done"))


def upload(http: HttpTransport, slot: dict[str, Any], payload: EncodedPayload, part: int,
           md5: bool, label: str, progress: bool) -> int:
    """Upload ``payload`` into a segmented slot; return the number of parts."""
    segs, (size_put, size_done) = _parse(slot)
    pps = slot["segments"].get("pps")
    if isinstance(pps, bool) or not isinstance(pps, int) or not 1 <= pps <= MAX_PARTS:
        raise RefError("s3:// segmented slot has an invalid parts-per-segment count")
    layout = Layout(payload.size, 0)
    n = part_count(layout.stored, part)
    last = len(segs) - 1  # the last segment takes the rest
    m = min(math.ceil(n / pps), last + 1)
    count = [min(pps, n - j * pps) if j < last else n - j * pps for j in range(m)]
    if any(len(segs[j][0]) < count[j] for j in range(m)):
        raise RefError(f"payload needs {n} parts of {part} bytes but the segmented slot "
                       "has fewer part URLs")
    # the size first: the ServerApp starts folding once it knows it
    etag = http.put(size_put[0], str(payload.size).encode(), f"size of {label}", md5=md5)
    http.complete(size_done, [etag], f"declaring the size of {label}")
    reader = SegmentReader(payload)
    prog = Progress(f"upload {label}", layout.stored, progress)
    etags = [""] * n
    left = list(count)
    lock = threading.Lock()

    def one(g: int) -> None:
        j = min(g // pps, last)
        i = g - j * pps
        body = build_part(reader, layout, None, part, g)
        etags[g] = http.put(segs[j][0][i], body,
                            f"upload of part {g + 1}/{n} of {label}", md5=md5)
        prog.add(len(body))
        with lock:
            left[j] -= 1
            whole = left[j] == 0
        if whole:  # this segment is readable on the ServerApp from now on
            http.complete(segs[j][1], etags[j * pps:j * pps + count[j]],
                          f"completing segment {j + 1}/{m} of {label}")

    run_all(one, n, clamp_concurrency(slot.get("conc")))
    return n

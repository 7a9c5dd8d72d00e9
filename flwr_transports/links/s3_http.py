"""The HTTP side of the ``s3://`` link: presigned URLs, plain HTTP, no credentials.

Used by ClientApps (which hold no cloud credentials and never import boto3) and by
the ServerApp to read what clients uploaded. Everything here works from the small
descriptors the server put in the reference / ticket slot:

* **download**: parallel ranged GETs of one presigned GET URL, fetched ahead of the
  reader in a bounded window (memory ~ ``2 x concurrency x range`` plus the output);
* **upload**: one presigned PUT URL per part of a multipart upload, parts sent in
  parallel, each with ``Content-MD5`` so the store rejects a part corrupted on the way;
* **retries** per request (not per object) with exponential backoff and jitter for
  5xx, 429, timeouts, connection resets, short bodies and bad digests;
* optional **AES-256-GCM** client-side encryption in fixed-size chunks (so ranged
  reads and parallel parts still work), the key travelling in-band only;
* **clear errors**: expired URL, tampered URL / wrong secret, bucket or object gone,
  aborted upload, unreachable endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import math
import os
import random
import re
import struct
import sys
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..codec import EncodedPayload
from ..refs import RefError
from ..settings import flag as setting_flag
from ..settings import raw as raw_setting
from .base import Endpoint, LinkError, PayloadSource
from .chunks.protocol import SegmentView

log = logging.getLogger("flwr_transports.s3")

TAG = 16  # AES-GCM tag bytes per chunk
MIN_PART = 5 * 2**20  # S3: every part but the last is at least 5 MiB
MAX_PART = 5 * 2**30  # S3: at most 5 GiB per part
MAX_PARTS = 10_000  # S3: at most 10,000 parts per upload
MAX_CONCURRENCY = 64
ENC_ALG = "AES-256-GCM"
_AAD = b"flwr-transports/s3-gcm/1"
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")  # a single PUT/part ETag without SSE-KMS/C
_RETRY_STATUS = {429, 500, 502, 503, 504}
_RETRY_CODES = {"BadDigest", "RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable"}
_QUERY_PIECE = re.compile(r"^[A-Za-z0-9._~%=+-]{1,4096}$")


class S3HttpError(LinkError):
    """A request to the object store failed (message says why and what to do)."""

    def __init__(self, msg: str, status: int | None = None, code: str | None = None):
        super().__init__(msg)
        self.status = status
        self.code = code


# -- sizes and layout ------------------------------------------------------------------
class Layout:
    """Maps plaintext offsets to stored offsets (identity unless encrypted).

    Encrypted objects are a sequence of chunks, each ``chunk`` plaintext bytes (the last
    one shorter) followed by its 16-byte GCM tag.
    """

    def __init__(self, size: int, chunk: int = 0):
        self.size = size
        self.chunk = chunk
        self.blocks = -(-size // chunk) if chunk else 0
        self.stored = size + TAG * self.blocks if chunk else size

    def align(self, stored_unit: int) -> tuple[int, int]:
        """(plaintext, stored) bytes of a unit of about ``stored_unit`` stored bytes."""
        if not self.chunk:
            return stored_unit, stored_unit
        k = max(1, -(-stored_unit // (self.chunk + TAG)))
        return k * self.chunk, k * (self.chunk + TAG)

    def units(self, stored_unit: int) -> int:
        return -(-self.stored // stored_unit) if self.stored else 0


# -- encryption --------------------------------------------------------------------------
def new_encryption(chunk: int) -> dict[str, Any]:
    """A fresh key + nonce prefix for ONE object (never reused)."""
    return {
        "alg": ENC_ALG,
        "key": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "nonce": base64.urlsafe_b64encode(os.urandom(4)).decode(),
        "chunk": chunk,
    }


def check_encryption(enc: Any) -> dict[str, Any] | None:
    """Validate an encryption descriptor from the network; None if absent."""
    if enc is None:
        return None
    if not isinstance(enc, dict) or enc.get("alg") != ENC_ALG:
        raise RefError(f"unsupported s3:// encryption descriptor (want {ENC_ALG})")
    try:
        key = base64.urlsafe_b64decode(enc["key"])
        nonce = base64.urlsafe_b64decode(enc["nonce"])
    except (KeyError, TypeError, ValueError):
        raise RefError("malformed s3:// encryption key") from None
    chunk = enc.get("chunk")
    if len(key) != 32 or len(nonce) != 4:
        raise RefError("malformed s3:// encryption key")
    if not (isinstance(chunk, int) and not isinstance(chunk, bool) and 4096 <= chunk <= 2**28):
        raise RefError(f"invalid s3:// encryption chunk size {chunk!r}")
    return {"alg": ENC_ALG, "key": enc["key"], "nonce": enc["nonce"], "chunk": chunk}


class Cipher:
    def __init__(self, enc: dict[str, Any], size: int):
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise LinkError("s3:// encryption needs the 'cryptography' package "
                            "(pip install 'flwr-transports[s3]')") from exc
        self.aes = AESGCM(base64.urlsafe_b64decode(enc["key"]))
        self.prefix = base64.urlsafe_b64decode(enc["nonce"])
        self.chunk = enc["chunk"]
        self.size = size

    def _nonce_aad(self, index: int) -> tuple[bytes, bytes]:
        # the AAD binds each chunk to its position and the object's size: chunks cannot
        # be reordered, dropped, or moved between objects of different sizes
        return self.prefix + struct.pack(">Q", index), _AAD + struct.pack(">QQ", index, self.size)

    def seal(self, index: int, data: bytes | memoryview) -> bytes:
        nonce, aad = self._nonce_aad(index)
        return self.aes.encrypt(nonce, data, aad)

    def open(self, index: int, data: bytes | memoryview) -> bytes:
        from cryptography.exceptions import InvalidTag

        nonce, aad = self._nonce_aad(index)
        try:
            return self.aes.decrypt(nonce, data, aad)
        except InvalidTag:
            raise LinkError(
                f"s3:// payload chunk {index} failed authentication (modified in the store, "
                "or the wrong key): refused"
            ) from None


# -- gathering payload bytes -------------------------------------------------------------
class SegmentReader(SegmentView):
    """Random access to the plaintext of an EncodedPayload without joining it (the
    project's one byte-range slicer, :class:`~flwr_transports.links.chunks.SegmentView`)."""

    def __init__(self, payload: EncodedPayload):
        super().__init__(payload.segments)
        if self.size != payload.size:
            raise ValueError("payload segments do not add up to its size")

    def slices(self, start: int, end: int) -> list[memoryview]:
        return self.range(start, max(0, end - start))


def build_part(reader: SegmentReader, layout: Layout, cipher: Cipher | None,
               plain_unit: int, index: int) -> bytes:
    """Stored bytes of part/unit ``index`` (plaintext, or its encrypted chunks)."""
    p0 = index * plain_unit
    p1 = min(p0 + plain_unit, layout.size)
    if cipher is None:
        return b"".join(reader.slices(p0, p1))
    out = []
    c = layout.chunk
    for b0 in range(p0, p1, c):
        out.append(cipher.seal(b0 // c, b"".join(reader.slices(b0, min(b0 + c, p1)))))
    return b"".join(out)


# -- progress ----------------------------------------------------------------------------
def progress_enabled(flag: Any) -> bool:
    env = setting_flag("FLWR_TRANSPORTS_PROGRESS")
    if env is not None:
        return env
    return bool(flag is True)


class Progress:
    """A throttled progress line on stderr (only when enabled)."""

    def __init__(self, label: str, total: int, enabled: bool, interval: float = 1.0):
        self.label, self.total, self.enabled = label, total, enabled
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self.interval = interval
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.done += n
            now = time.monotonic()
            if now - self.last < self.interval and self.done < self.total:
                return
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9) / 2**20
            pct = 100.0 * self.done / self.total if self.total else 100.0
            end = "\n" if self.done >= self.total or not sys.stderr.isatty() else "\r"
            sys.stderr.write(
                f"flwr-transports s3 {self.label}: {self.done / 2**20:.1f}/"
                f"{self.total / 2**20:.1f} MiB ({pct:.0f}%) {rate:.1f} MiB/s{end}"
            )
            sys.stderr.flush()


# -- URLs ----------------------------------------------------------------------------------
def compact_urls(urls: list[str]) -> dict[str, Any]:
    """Factor many presigned URLs of one object into base + common query + per-URL rest.

    Multipart part URLs differ only in ``partNumber`` and the signature, so a slot with
    64 part URLs stays a few KiB.
    """
    bases, pieces = set(), []
    for u in urls:
        base, _, q = u.partition("?")
        bases.add(base)
        pieces.append(q.split("&") if q else [])
    if len(bases) != 1:
        raise ValueError("presigned URLs of one object differ in their base")
    common = [p for p in pieces[0] if all(p in ps for ps in pieces[1:])]
    cset = set(common)
    return {"base": bases.pop(), "common": common,
            "parts": ["&".join(p for p in ps if p not in cset) for ps in pieces]}


def check_base_url(base: Any, field: str = "put.base") -> str:
    """An object URL without query, parsed by the one parser the client policy uses
    (:meth:`~flwr_transports.links.base.Endpoint.http`)."""
    if not isinstance(base, str) or len(base) > 4096:
        raise RefError("s3:// descriptor has no valid URL")
    if "?" in base or "#" in base:
        raise RefError(f"s3:// descriptor URL {base[:200]!r} is not a plain http(s) URL")
    Endpoint.http(f"s3:// {field}", base)
    return base


def _check_query(q: Any) -> str:
    if not isinstance(q, str) or len(q) > 8192:
        raise RefError("s3:// descriptor has a malformed query")
    for piece in q.split("&") if q else []:
        if not _QUERY_PIECE.match(piece):
            raise RefError("s3:// descriptor has a malformed query")
    return q


def expand_urls(desc: Any, max_parts: int = MAX_PARTS) -> list[str]:
    if not isinstance(desc, dict):
        raise RefError("s3:// slot has no part URLs")
    base = check_base_url(desc.get("base"))
    common, parts = desc.get("common"), desc.get("parts")
    if not isinstance(common, list) or not isinstance(parts, list):
        raise RefError("s3:// slot has malformed part URLs")
    if not 1 <= len(parts) <= max_parts:
        raise RefError(f"s3:// slot has {len(parts)} part URLs (1..{max_parts} allowed)")
    c = "&".join(_check_query(p) for p in common)
    return [f"{base}?{c}&{_check_query(p)}".rstrip("&") for p in parts]


def check_get_url(url: Any, field: str = "get") -> str:
    if not isinstance(url, str):
        raise RefError("s3:// location has no URL")
    base, _, q = url.partition("?")
    check_base_url(base, field)
    _check_query(q)
    return url


def url_endpoints(desc: Any, *, upload: bool) -> list[Endpoint]:
    """Every URL an s3:// location (download) or slot (upload) makes a client
    request, parsed and validated exactly as :class:`S3ClientLink` then uses them."""
    if not isinstance(desc, dict):
        raise RefError("s3:// descriptor is not an object")
    if not upload:
        return [Endpoint.http("get", check_get_url(desc.get("get")))]
    eps = [Endpoint.http(f"put.parts[{i}]", u) for i, u in enumerate(expand_urls(
        desc.get("put")))]
    done = desc.get("done")
    if done is not None:
        eps.append(Endpoint.http("done", check_get_url(done, "done")))
    return eps


def _expiry(url: str) -> datetime | None:
    """When a SigV4 (or V2) presigned URL expires, from its own query string."""
    q = dict(parse_qsl(urlsplit(url).query))
    try:
        if "X-Amz-Date" in q and "X-Amz-Expires" in q:
            t = datetime.strptime(q["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            return datetime.fromtimestamp(t.timestamp() + int(q["X-Amz-Expires"]), UTC)
        if "Expires" in q:
            return datetime.fromtimestamp(int(q["Expires"]), UTC)
    except (ValueError, OverflowError):
        return None
    return None


def _where(url: str) -> str:
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}{u.path}"


def _s3_error(body: bytes) -> tuple[str | None, str | None]:
    text = body[:4096].decode("utf-8", "replace")
    code = re.search(r"<Code>([^<]{1,100})</Code>", text)
    msg = re.search(r"<Message>([^<]{0,300})</Message>", text)
    return (code.group(1) if code else None), (msg.group(1) if msg else None)


def explain(status: int, body: bytes, url: str, what: str) -> S3HttpError:
    """Turn an error response into an error that says the cause and what to do."""
    code, msg = _s3_error(body)
    where = _where(url)
    detail = f" ({code}{': ' + msg if msg else ''})" if code else f" (HTTP {status})"
    exp = _expiry(url)
    now = datetime.now(UTC)
    if 300 <= status < 400:
        return S3HttpError(
            f"{what}: {where} answered with a redirect (HTTP {status}); flwr-transports never "
            "follows redirects (a redirect could send the request anywhere): point "
            "endpoint_url / the bucket region at the store itself", status, code)
    if status == 403:
        if (msg and "expired" in msg.lower()) or (exp is not None and now > exp):
            when = exp.strftime("%Y-%m-%d %H:%M:%S UTC") if exp else "an earlier time"
            return S3HttpError(
                f"{what}: the presigned URL for {where} expired at {when}{detail}. The "
                "ServerApp sets the lifetime with the s3:// option expires= (default 1h); "
                "raise it above the round time, and check that clocks are in sync",
                status, code)
        if code == "SignatureDoesNotMatch":
            return S3HttpError(
                f"{what}: the store rejected the signature of the presigned URL for {where}"
                f"{detail}: the URL was modified on the way, or the ServerApp signs with a "
                "wrong secret key", status, code)
        if code in ("InvalidAccessKeyId", "InvalidToken", "ExpiredToken"):
            return S3HttpError(
                f"{what}: the store does not accept the ServerApp's credentials{detail}; "
                "fix the ServerApp's AWS credentials", status, code)
        return S3HttpError(
            f"{what}: access denied by the store for {where}{detail}: the presigned URL "
            "was altered, has expired, or the ServerApp's credentials lack permission",
            status, code)
    if status == 404:
        if code == "NoSuchBucket":
            return S3HttpError(f"{what}: bucket of {where} does not exist{detail}", status, code)
        if code == "NoSuchUpload":
            return S3HttpError(
                f"{what}: the multipart upload for {where} no longer exists{detail}: the "
                "round ended (or timed out) and the ServerApp aborted it", status, code)
        return S3HttpError(
            f"{what}: {where} does not exist{detail}: removed at the end of its round or "
            "by cleanup, or never written", status, code)
    if status == 416:
        return S3HttpError(f"{what}: {where} is shorter than the reference says{detail}",
                           status, code)
    return S3HttpError(f"{what}: the store answered HTTP {status} for {where}{detail}",
                       status, code)


# -- the HTTP transport ----------------------------------------------------------------------
def _tuned_adapter(base, pins: dict[str, str] | None = None):
    """An HTTPAdapter whose connections ask for the chunk links' send buffer
    (:func:`flwr_transports.links.chunks.send_buffer_request`): a part upload over a
    long fat pipe is one TCP stream, window-limited by the send buffer. ``pins``
    (host name -> address the client policy checked): connections to that name go to
    that address (the Host header, TLS SNI and certificate check keep the name), so a
    second DNS answer cannot send them elsewhere."""
    import socket

    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    from .chunks.protocol import send_buffer_request

    pinned: dict[str, type] = {}
    if pins:
        def pin(conn_cls):
            class Pinned(conn_cls):
                def __init__(self, host, *args, **kwargs):
                    super().__init__(host, *args, **kwargs)
                    ip = pins.get(str(host).strip("[]").lower())
                    if ip is not None:
                        self._dns_host = ip  # what urllib3's _new_conn connects to
            return Pinned

        class Http(HTTPConnectionPool):
            ConnectionCls = pin(HTTPConnection)

        class Https(HTTPSConnectionPool):
            ConnectionCls = pin(HTTPSConnection)

        pinned = {"http": Http, "https": Https}

    class TunedAdapter(base):
        def init_poolmanager(self, *args, **kwargs):
            opts = list(HTTPConnection.default_socket_options)
            want = send_buffer_request()
            if want:
                opts.append((socket.SOL_SOCKET, socket.SO_SNDBUF, want))
            kwargs["socket_options"] = opts
            out = super().init_poolmanager(*args, **kwargs)
            if pinned:
                self.poolmanager.pool_classes_by_scheme = dict(pinned)
            return out

    return TunedAdapter


def check_pins(v: Any) -> dict[str, str]:
    """The ``pinned`` entry the client policy puts in a descriptor it checked."""
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > 16:
        raise RefError("s3:// descriptor has an invalid pinned entry")
    import ipaddress

    out = {}
    for host, ip in v.items():
        try:
            out[str(host)] = str(ipaddress.ip_address(ip))
        except ValueError:
            raise RefError("s3:// descriptor has an invalid pinned address") from None
    return out


class HttpTransport:
    """requests-based transport with per-request retries (one Session, pooled)."""

    def __init__(self, *, retries: int = 5, backoff: float = 0.25, max_backoff: float = 8.0,
                 connect_timeout: float = 10.0, read_timeout: float = 120.0,
                 pool: int = MAX_CONCURRENCY + 4, pins: dict[str, str] | None = None):
        try:
            import requests
            from requests.adapters import HTTPAdapter
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise LinkError("the s3:// link needs 'requests' (pip install "
                            "'flwr-transports[s3]')") from exc
        self._requests = requests
        self.session = requests.Session()
        adapter = _tuned_adapter(HTTPAdapter, pins)(pool_connections=4, pool_maxsize=pool,
                                                    max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = (connect_timeout, read_timeout)
        self.retried = 0  # number of retried requests (for tests / stats)

    def _sleep(self, attempt: int) -> None:
        time.sleep(random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt)))

    def _call(self, what: str, url: str, fn):
        """Run ``fn()`` (one request) with retries; fn returns a value or raises."""
        req = self._requests
        import urllib3

        transient = (req.exceptions.ConnectionError, req.exceptions.Timeout,
                     req.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError,
                     ConnectionError, TimeoutError, http.client.HTTPException)
        attempt = 0
        while True:
            try:
                return fn()
            except _Retryable as exc:
                err: Exception = exc.error
            except transient as exc:
                err = exc
            if attempt >= self.retries:
                if isinstance(err, S3HttpError):
                    raise err
                u = urlsplit(url)
                kind = ("timed out" if isinstance(err, req.exceptions.Timeout | TimeoutError |
                                                  urllib3.exceptions.TimeoutError)
                        else "failed to connect or the connection broke")
                raise S3HttpError(
                    f"{what}: the S3 endpoint {u.scheme}://{u.netloc} {kind} after "
                    f"{attempt + 1} attempts ({type(err).__name__}: {str(err)[:200]}): check "
                    "endpoint_url, that the store is running and reachable from here "
                    "(firewall, proxy, DNS)") from None
            log.debug("s3: %s: attempt %d failed (%s); retrying", what, attempt + 1, err)
            self.retried += 1
            self._sleep(attempt)
            attempt += 1

    def get_range(self, url: str, start: int, end: int, total: int, what: str,
                  appear_by: float | None = None) -> bytes:
        """Bytes [start, end) of the object; checks the object is ``total`` bytes.

        ``appear_by`` (a ``time.monotonic()`` deadline): the object may not exist yet
        (the ServerApp uploads it while the reference travels); a 404 before then is
        asked again, every 0.05-0.5 s."""
        n = end - start
        pause = 0.05
        while True:
            try:
                return self._get_range(url, start, end, total, what, n, appear_by)
            except _NotYet:
                time.sleep(pause)
                pause = min(0.5, pause * 2)

    def _get_range(self, url: str, start: int, end: int, total: int, what: str, n: int,
                   appear_by: float | None) -> bytes:
        def once() -> bytes:
            r = self.session.get(url, headers={"Range": f"bytes={start}-{end - 1}"},
                                 timeout=self.timeout, stream=True, allow_redirects=False)
            try:
                if r.status_code == 404 and appear_by is not None:
                    if time.monotonic() < appear_by:
                        raise _NotYet
                    e = explain(r.status_code, bounded_body(r), url, what)
                    raise S3HttpError(f"{e} (it did not appear in the store in time: the "
                                      "ServerApp's upload of it may have failed; see its log)",
                                      e.status, e.code)
                if r.status_code not in (200, 206):
                    e = explain(r.status_code, bounded_body(r), url, what)
                    if r.status_code in _RETRY_STATUS or e.code in _RETRY_CODES:
                        raise _Retryable(e)
                    raise e
                if r.status_code == 206:
                    m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", r.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != start or int(m.group(2)) != end - 1:
                        raise S3HttpError(f"{what}: the store answered a different range "
                                          f"({r.headers.get('Content-Range')!r})")
                    if m.group(3) != "*" and int(m.group(3)) != total:
                        raise RefError(f"{what}: the stored object has {m.group(3)} bytes, "
                                       f"the reference says {total}")
                    data = _read_body(r, n)
                else:  # a store that ignores Range: only acceptable for the whole object
                    if start != 0 or end != total:
                        raise S3HttpError(f"{what}: the store at {_where(url)} ignores "
                                          "Range requests")
                    data = r.raw.read(total + 1, decode_content=True)
                    if len(data) != total:
                        raise RefError(f"{what}: the stored object has {len(data)} bytes, "
                                       f"the reference says {total}")
            finally:
                r.close()
            if len(data) != n:  # connection cut mid-body: retry this range
                raise _Retryable(S3HttpError(f"{what}: short read ({len(data)} of {n} bytes)"))
            return data

        return self._call(what, url, once)

    def put(self, url: str, body: bytes, what: str, md5: bool = True) -> str:
        """PUT ``body``; its ETag. With ``md5``: Content-MD5 (a store that checks it
        refuses damaged bytes), and an ETag that is a plain MD5 (S3 without SSE-KMS/C,
        radosgw, moto; under SSE-KMS or SSE-C an ETag is no MD5 and is not compared)
        must be the body's: a store that kept other bytes is an error (raised as
        S3HttpError, retried like a failed PUT)."""
        headers = {}
        digest = hashlib.md5(body).digest() if md5 else b""
        if md5:
            headers["Content-MD5"] = base64.b64encode(digest).decode()

        def once() -> str:
            r = self.session.put(url, data=body, headers=headers, timeout=self.timeout,
                                 allow_redirects=False, stream=True)
            try:
                answer = bounded_body(r)  # a hostile store cannot make it big
                if r.status_code not in (200, 201, 204):
                    e = explain(r.status_code, answer, url, what)
                    if r.status_code in _RETRY_STATUS or e.code in _RETRY_CODES:
                        raise _Retryable(e)
                    raise e
                etag = r.headers.get("ETag", "")
                plain = etag.strip('"').lower()
                kms = (r.headers.get("x-amz-server-side-encryption", "").startswith("aws:kms")
                       or "x-amz-server-side-encryption-customer-algorithm" in r.headers)
                if md5 and not kms and _MD5_ETAG.fullmatch(plain) and plain != digest.hex():
                    raise _Retryable(S3HttpError(
                        f"{what}: the store kept other bytes than were sent (ETag {plain}, "
                        f"MD5 of the bytes {digest.hex()})"))
                return etag
            finally:
                r.close()

        return self._call(what, url, once)

    def complete(self, url: str, etags: list[str], what: str) -> None:
        """CompleteMultipartUpload through a presigned POST URL (parts 1..n, in order).

        S3 may answer 200 and still fail: the error is then in the body."""
        body = complete_body(etags)

        def once() -> None:
            r = self.session.post(url, data=body, timeout=self.timeout, allow_redirects=False,
                                  headers={"Content-Type": "application/xml"}, stream=True)
            try:
                content = bounded_body(r)
                if r.status_code != 200 or b"<Error>" in content:
                    e = explain(r.status_code if r.status_code != 200 else 500, content, url,
                                what)
                    if r.status_code in _RETRY_STATUS or e.code in _RETRY_CODES:
                        raise _Retryable(e)
                    raise e
            finally:
                r.close()

        self._call(what, url, once)

    def close(self) -> None:
        self.session.close()


def complete_body(etags: list[str]) -> bytes:
    """The CompleteMultipartUpload XML for parts 1..len(etags)."""
    from xml.sax.saxutils import escape

    parts = "".join(f"<Part><PartNumber>{i}</PartNumber><ETag>{escape(e)}</ETag></Part>"
                    for i, e in enumerate(etags, 1))
    return (f'<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"{parts}</CompleteMultipartUpload>").encode()


MAX_ANSWER = 65536  # bytes of an answer (or error body) the client reads, at most


def bounded_body(r, limit: int = MAX_ANSWER) -> bytes:
    """At most ``limit`` bytes of a streamed (``stream=True``) response body. A body
    read to its end returns the connection to the pool; a longer one is cut (the
    caller's ``r.close()`` then drops the connection). Not decompressed: a small
    compressed answer cannot inflate past the limit."""
    data = r.raw.read(limit + 1, decode_content=False)
    return data[:limit]


def _read_body(r, n: int) -> bytes | bytearray:
    """Read an n-byte identity-encoded body straight into one buffer (no extra copies)."""
    fp = getattr(r.raw, "_fp", None)  # the http.client response under urllib3
    enc = (r.headers.get("Content-Encoding") or "identity").lower()
    if enc != "identity" or fp is None or not hasattr(fp, "readinto"):
        return r.raw.read(n + 1, decode_content=True)
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = fp.readinto(mv[got:])
        if not k:
            break
        got += k
    return buf if got == n else buf[:got]


class _NotYet(Exception):
    """The object is not (yet) in the store; its deadline has not passed."""


class _Retryable(Exception):
    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


# -- transfers -------------------------------------------------------------------------------
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="ftx-s3")


def upload_parts(transport: HttpTransport, urls: list[str], payload: EncodedPayload,
                 enc: dict[str, Any] | None, part_stored: int, concurrency: int,
                 md5: bool, label: str, progress: bool) -> list[str]:
    """Upload ``payload`` as parts of ``part_stored`` stored bytes; return the parts'
    ETags (as the store answered them), in part order."""
    layout = Layout(payload.size, enc["chunk"] if enc else 0)
    plain_unit, stored_unit = layout.align(part_stored)
    if stored_unit != part_stored:
        raise RefError("s3:// slot part size is not a whole number of encryption chunks")
    n = max(1, layout.units(part_stored))
    if n > len(urls):
        raise RefError(f"payload needs {n} parts of {part_stored} bytes but the slot has "
                       f"{len(urls)} part URLs")
    cipher = Cipher(enc, payload.size) if enc else None
    reader = SegmentReader(payload)
    prog = Progress(f"upload {label}", layout.stored, progress)

    etags = [""] * n

    def one(i: int) -> None:
        body = build_part(reader, layout, cipher, plain_unit, i)
        etags[i] = transport.put(urls[i], body, f"upload of part {i + 1}/{n} of {label}",
                                 md5=md5)
        prog.add(len(body))

    run_all(one, n, concurrency)
    return etags


def run_all(fn, n: int, concurrency: int) -> None:
    """Run fn(0..n-1) on a pool; at most ``concurrency`` in flight; first error wins."""
    if n == 1 or concurrency <= 1:
        for i in range(n):
            fn(i)
        return
    with _pool(min(concurrency, n)) as pool:
        futs = [pool.submit(fn, i) for i in range(n)]
        try:
            for f in futs:
                f.result()
        except BaseException:
            for f in futs:
                f.cancel()
            raise


class RangedReader:
    """A PayloadSource over one presigned GET URL, fetched in parallel ranges ahead."""

    def __init__(self, transport: HttpTransport, url: str, size: int,
                 enc: dict[str, Any] | None, range_stored: int, concurrency: int,
                 label: str, progress: bool, appear_within: float = 0.0):
        self.t = transport
        self.url = url
        #: enough for another process to read the same object the same way (the Ray
        #: shard owners of aggregation=ray): presigned URL, sizes, encryption key
        self.remote = {"url": url, "size": size, "enc": enc, "range_stored": range_stored,
                       "concurrency": concurrency, "label": label,
                       "retries": transport.retries, "read_timeout": transport.timeout[1]}
        self.appear_by = time.monotonic() + appear_within if appear_within > 0 else None
        self.layout = Layout(size, enc["chunk"] if enc else 0)
        self.plain_unit, self.stored_unit = self.layout.align(range_stored)
        self.n = self.layout.units(self.stored_unit)
        self.cipher = Cipher(enc, size) if enc else None
        self.conc = max(1, concurrency)
        self.window = 2 * self.conc
        self.pool = _pool(self.conc)
        self.futs: dict[int, Future] = {}
        self.label = label
        self.prog = Progress(f"download {label}", self.layout.stored, progress)
        self.lock = threading.Lock()

    def _fetch(self, j: int) -> bytes:
        s0 = j * self.stored_unit
        s1 = min(s0 + self.stored_unit, self.layout.stored)
        data = self.t.get_range(self.url, s0, s1, self.layout.stored,
                                f"download of range {j + 1}/{self.n} of {self.label}",
                                self.appear_by)
        self.prog.add(len(data))
        if self.cipher is None:
            return data
        c, b = self.layout.chunk, self.layout.chunk + TAG
        first = j * (self.plain_unit // c)
        mv = memoryview(data)
        return b"".join(self.cipher.open(first + k, mv[o : o + b])
                        for k, o in enumerate(range(0, len(data), b)))

    def read(self, off: int, n: int) -> bytes:
        if n == 0:
            return b""
        if off < 0 or n < 0 or off + n > self.layout.size:
            raise ValueError(f"read [{off}, {off + n}) outside a {self.layout.size}-byte payload")
        U = self.plain_unit
        j0, j1 = off // U, (off + n - 1) // U
        with self.lock:
            for j in [j for j in self.futs if j < j0]:  # behind the reader: drop
                self.futs.pop(j).cancel()
            for j in range(j0, min(self.n, j1 + 1 + self.window)):
                if j not in self.futs:
                    self.futs[j] = self.pool.submit(self._fetch, j)
            futs = [self.futs[j] for j in range(j0, j1 + 1)]
        out = []
        for k, f in enumerate(futs):
            try:
                data = f.result()
            except CancelledError:  # dropped by a concurrent reader: fetch it here
                data = self._fetch(j0 + k)
            base = (j0 + k) * U
            a = max(off, base) - base
            b = min(off + n, base + len(data)) - base
            out.append(data if (a, b) == (0, len(data)) else memoryview(data)[a:b])
        with self.lock:  # units the reader has completely passed
            for j in range(j0, (off + n) // U):
                self.futs.pop(j, None)
        if len(out) == 1 and isinstance(out[0], bytes):
            return out[0]
        return b"".join(out)  # one copy into the bytes the caller keeps

    def peek(self, off: int, n: int) -> bytes:
        """``n`` bytes at ``off`` WITHOUT read-ahead and without dropping the ranges
        fetched for :meth:`read`: a planner's scattered header reads (a few bytes
        before each array, all over the payload). Served from a range already fetched
        or in flight, else fetched exactly (whole AEAD chunks when encrypted). Through
        :meth:`read` each would fetch its whole range and the ranges ahead, dropped
        again as the planner moves on: the fold that follows fetched the payload a
        second time."""
        if n == 0:
            return b""
        if off < 0 or n < 0 or off + n > self.layout.size:
            raise ValueError(f"read [{off}, {off + n}) outside a {self.layout.size}-byte payload")
        U = self.plain_unit
        j0, j1 = off // U, (off + n - 1) // U
        with self.lock:
            futs = [self.futs.get(j) for j in range(j0, j1 + 1)]
        if all(f is not None for f in futs):
            try:
                data = b"".join(f.result() for f in futs)
            except CancelledError:  # dropped by a concurrent reader: fetch exactly
                pass
            else:
                return data[off - j0 * U:off - j0 * U + n]
        what = f"download of {n} bytes at {off} of {self.label}"
        if self.cipher is None:
            data = self.t.get_range(self.url, off, off + n, self.layout.stored, what,
                                    self.appear_by)
            self.prog.add(len(data))
            return data
        c, b = self.layout.chunk, self.layout.chunk + TAG
        k0, k1 = off // c, (off + n - 1) // c
        data = self.t.get_range(self.url, k0 * b, min((k1 + 1) * b, self.layout.stored),
                                self.layout.stored, what, self.appear_by)
        self.prog.add(len(data))
        mv = memoryview(data)
        plain = b"".join(self.cipher.open(k0 + i, mv[o:o + b])
                         for i, o in enumerate(range(0, len(data), b)))
        return plain[off - k0 * c:off - k0 * c + n]

    def close(self) -> None:
        with self.lock:
            for f in self.futs.values():
                f.cancel()
            self.futs.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def source(self) -> PayloadSource:
        src = PayloadSource(self.read, self.layout.size, self.close)
        src.remote = self.remote
        src.peek = self.peek
        return src


def clamp_concurrency(v: Any, default: int = 8) -> int:
    """The concurrency a client uses for what the server asked (``v``): within
    1..MAX_CONCURRENCY, and never above the client's own cap
    (FLWR_TRANSPORTS_S3_CONCURRENCY): a local cap wins over a server's value."""
    try:
        n = int(v)
    except (TypeError, ValueError):
        n = default
    cap = raw_setting("FLWR_TRANSPORTS_S3_CONCURRENCY")
    if cap is not None:
        try:
            n = min(n, int(cap))
        except ValueError:
            log.warning("ignoring FLWR_TRANSPORTS_S3_CONCURRENCY=%r: give an integer", cap)
    return max(1, min(MAX_CONCURRENCY, n))


def check_int(v: Any, lo: int, hi: int, what: str) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        raise RefError(f"s3:// descriptor has an invalid {what} ({v!r})")
    return v


def part_count(stored: int, part: int) -> int:
    return max(1, math.ceil(stored / part))

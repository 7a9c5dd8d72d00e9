"""``s3://BUCKET/PREFIX``: payloads through any S3-compatible object store.

Control stays on Flower; payloads go through the store. Only the ServerApp holds
credentials (boto3's normal chain: environment, profile, instance role, ...). Clients
get **presigned URLs** inside the reference / ticket and use plain HTTP (requests),
never boto3:

* the global model is uploaded ONCE per round (multipart, parallel parts) and every
  client fetches it with parallel ranged GETs of one presigned GET URL;
* for each reply slot the ServerApp creates a multipart upload and hands the client
  one presigned PUT URL per part (enough for ``max_reply_size``), scoped to one object
  key per (run, round, node, slot); the ServerApp lists the parts, checks them against
  the declared size, completes the upload, and reads it back with ranged GETs;
* every request is retried with backoff on 5xx / 429 / timeouts / resets, per part or
  range, never restarting the whole object;
* optional AES-256-GCM client-side encryption (``encrypt=true``): a fresh key per
  object, sent in-band (inside the reference / slot), never stored in the bucket;
* objects of a run are deleted and its multipart uploads aborted when the run ends;
  ``flwr-transports cleanup s3://BUCKET/PREFIX`` removes leftovers of crashed runs.

URL: ``s3://BUCKET[/PREFIX][?option=value&...]``; options may also be given as
keywords of ``offload()``. See docs/links/s3.md for every option.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from ..codec import EncodedPayload
from ..errors import ConfigError
from ..options import (
    Option,
    Options,
    choice,
    duration,
    integer,
    optional,
    parse_bool,
    parse_duration,
    parse_options,
    size,
    text,
)
from ..refs import RefError
from . import s3_segments
from .base import (
    NAME_PREFIX,
    ClientLink,
    Endpoint,
    LinkError,
    PayloadSource,
    ServerLink,
    TransportSpec,
    as_spec,
)
from .s3_http import (
    MAX_PART,
    MAX_PARTS,
    MIN_PART,
    Cipher,
    HttpTransport,
    Layout,
    Progress,
    RangedReader,
    SegmentReader,
    build_part,
    check_encryption,
    check_get_url,
    check_int,
    check_pins,
    clamp_concurrency,
    compact_urls,
    expand_urls,
    new_encryption,
    part_count,
    progress_enabled,
    run_all,
    upload_parts,
    url_endpoints,
)

log = logging.getLogger("flwr_transports.s3")

DEFAULT_PART = 16 * 2**20
DEFAULT_EXPIRES = 3600
LAND_POLL = 0.2  # seconds between listings while replies are awaited (on_upload)
ENC_CHUNK = 2**20
MAX_EXPIRES = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_KEY_TIME = re.compile(r"-t(\d{9,11})-")
_INSTALL = "pip install 'flwr-transports[s3]'"


def _verify_opt(v: Any) -> bool | str:
    try:
        return parse_bool(v)
    except ValueError:
        return str(v)  # a CA bundle path


def _seconds(lo: int, hi: int):
    def parse(v: Any) -> int:
        return int(duration(lo, hi)(v))
    return parse


OPTIONS = (
    Option("endpoint_url", optional(text), None, "S3 endpoint of a self-hosted or other store, e.g. "
           "http://minio:9000; unset: AWS"),
    Option("region", optional(text), None, "region the URLs are signed for (default: the "
           "profile's, else us-east-1)"),
    Option("profile", optional(text), None, "a named profile from ~/.aws/config (the "
           "ServerApp's credentials)"),
    Option("addressing_style", choice("auto", "path", "virtual"), None, "path or virtual-host "
           "addressing (default: path with endpoint_url, else auto)", shown="auto"),
    Option("verify", _verify_opt, True, "TLS verification for the ServerApp: true, false "
           "or a CA bundle path (clients: REQUESTS_CA_BUNDLE)"),
    Option("part_size", size(MIN_PART, MAX_PART), DEFAULT_PART, "multipart part / ranged-GET "
           "size (5MiB-5GiB)", shown="16MiB"),
    Option("concurrency", integer(1, 64), 8, "parts / ranges in flight per transfer (clients "
           "may override with FLWR_TRANSPORTS_S3_CONCURRENCY)"),
    Option("max_parts", integer(1, MAX_PARTS), 64, "presigned part URLs per upload slot (the "
           "part size grows to fit max_reply_size)"),
    Option("checksum", choice("md5", "none"), "none", "md5: Content-MD5 on every part (the "
           "store re-checks each part; ~1.2 ms of CPU per MiB on each side); none: only the "
           "payload's SHA-256, which the receiver always verifies end to end"),
    Option("expires", _seconds(1, MAX_EXPIRES), DEFAULT_EXPIRES, "lifetime of presigned URLs "
           "(1 second to 7 days; e.g. 3600, 30m, 2h)"),
    Option("encrypt", parse_bool, False, "AES-256-GCM client-side encryption, a fresh key per "
           "object, sent in-band only"),
    Option("progress", parse_bool, False, "progress lines on stderr for every transfer, on "
           "the server and clients (FLWR_TRANSPORTS_PROGRESS=1/0 overrides on any machine)"),
    Option("retries", integer(0, 20), 5, "retries per request (5xx, 429, timeouts, resets)"),
    Option("timeout", duration(1, 86400), 120.0, "read timeout per request (seconds)",
           shown="120"),
    Option("create_bucket", parse_bool, False, "create the bucket if it does not exist"),
    Option("segment", size(0, 2**40), 0, "reply slots as segments of about this many bytes "
           "(whole parts), each its own object, folded as it lands so only the last segment "
           "is left to fold when the last byte lands (docs/links/s3.md, 'Segmented "
           "replies'); 0: one object per reply; not with encrypt=true", shown="0 (off)"),
    Option("publish", choice("background", "sync"), "background", "background: the global "
           "model is uploaded while its reference travels through Flower (clients wait for "
           "the object to appear); sync: uploaded before the messages are sent"),
)


class S3Config:
    """Parsed ``s3://`` URL + options (server side)."""

    def __init__(self, url: TransportSpec | str, options: Options):
        t = as_spec(url)
        scheme, bucket, path, url = t.scheme, t.netloc, t.path, t.url
        if scheme != "s3":
            raise ConfigError(f"not an s3:// URL: {url!r}")
        if not bucket or not _BUCKET_RE.match(bucket):
            raise ConfigError(
                f"s3:// URL needs a bucket name, e.g. s3://my-bucket/runs (got {url!r})")
        prefix = path.strip("/")
        if any(p in ("..", ".") for p in prefix.split("/")) or "//" in prefix:
            raise ConfigError(f"invalid s3:// prefix {prefix!r}")
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        o = options
        self.endpoint_url = o.endpoint_url
        self.region = o.region
        self.profile = o.profile
        self.addressing_style = o.addressing_style or ("path" if self.endpoint_url else "auto")
        self.verify: bool | str = o.verify
        self.part_size = o.part_size
        self.concurrency = o.concurrency
        self.max_parts = o.max_parts
        self.checksum = o.checksum
        self.expires = o.expires
        self.encrypt = o.encrypt
        self.progress = o.progress
        self.retries = o.retries
        self.timeout = o.timeout
        self.create_bucket = o.create_bucket
        self.publish = o.publish
        self.segment = o.segment

    def where(self) -> str:
        at = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{at}"

    def client(self, region: str | None = None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise LinkError(f"the s3:// link needs boto3 on the ServerApp ({_INSTALL})") from exc
        session = boto3.session.Session(profile_name=self.profile) if self.profile else (
            boto3.session.Session())
        if session.get_credentials() is None:
            raise LinkError(
                "no AWS credentials found for the s3:// link: the ServerApp needs them "
                "(AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE / profile=, "
                "~/.aws/credentials, or an instance role); clients need none"
            )
        cfg = Config(
            signature_version="s3v4",
            s3={"addressing_style": self.addressing_style},
            retries={"max_attempts": self.retries + 1, "mode": "standard"},
            max_pool_connections=self.concurrency + 4,
            connect_timeout=10, read_timeout=self.timeout,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        region = region or self.region or session.region_name or "us-east-1"
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=region,
                              config=cfg, verify=self.verify)


def boto_error(exc: BaseException, what: str, cfg: S3Config) -> LinkError:
    """A boto3/botocore error as a LinkError naming the cause and what to do."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover
        return LinkError(f"{what}: {exc}")
    where = cfg.where()
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        msg = err.get("Message") or ""
        detail = f"{code}{': ' + msg if msg else ''}" or f"HTTP {status}"
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and "bucket" in what):
            return LinkError(
                f"{what}: bucket {cfg.bucket!r} does not exist{' at ' + cfg.endpoint_url if cfg.endpoint_url else ''} "
                f"({detail}); create it (aws s3 mb s3://{cfg.bucket}"
                f"{' --endpoint-url ' + cfg.endpoint_url if cfg.endpoint_url else ''}), "
                "fix the URL, or pass create_bucket=true")
        if code == "SignatureDoesNotMatch":
            return LinkError(
                f"{what}: the store rejected the ServerApp's request signature ({detail}) "
                f"for {where}: the secret key is wrong (check AWS_SECRET_ACCESS_KEY or the "
                "profile), or a proxy altered the request")
        if code in ("InvalidAccessKeyId", "InvalidClientTokenId", "InvalidToken",
                    "ExpiredToken", "TokenRefreshRequired"):
            return LinkError(
                f"{what}: the store does not accept the ServerApp's credentials ({detail}) "
                f"for {where}: fix or refresh AWS_ACCESS_KEY_ID / the profile / the session "
                "token")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return LinkError(
                f"{what}: access denied to {where} ({detail}); the ServerApp's credentials "
                "need s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject, "
                "s3:ListBucketMultipartUploads, s3:AbortMultipartUpload on this bucket/prefix")
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed",
                    "IllegalLocationConstraintException"):
            return LinkError(f"{what}: {where} is in another region ({detail}); set region=")
        if code == "NoSuchUpload":
            return LinkError(f"{what}: the multipart upload no longer exists ({detail})")
        return LinkError(f"{what}: {where} answered {detail}")
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return LinkError(f"{what}: no usable AWS credentials on the ServerApp ({exc})")
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError |
                  bx.ConnectionClosedError | bx.ReadTimeoutError | bx.ConnectionError):
        return LinkError(
            f"{what}: cannot reach the S3 endpoint {cfg.endpoint_url or '(AWS default)'} "
            f"({exc}); check endpoint_url, that the store is running, and the network")
    return LinkError(f"{what}: {type(exc).__name__}: {exc}")


def _note_plain_http(cfg: S3Config) -> None:
    """Say so when model bytes will cross a network unencrypted: an ``http://``
    endpoint that is not loopback, without ``encrypt=true``."""
    from urllib.parse import urlsplit

    from .tcp import is_loopback

    u = urlsplit(cfg.endpoint_url or "")
    if u.scheme.lower() != "http" or cfg.encrypt:
        return
    host = u.hostname or ""
    (log.info if is_loopback(host) else log.warning)(
        "s3:// endpoint %s is plain http: model bytes travel UNENCRYPTED between the store "
        "and every node; set encrypt=true (AES-256-GCM, key sent in-band over Flower's "
        "channel) or use an https:// endpoint", cfg.endpoint_url)


#: keep_published: one CopyObject up to S3's 5 GiB limit, else UploadPartCopy parts
COPY_MAX = 5 * 2**30
COPY_PART = 512 * 2**20


class S3ServerLink(ServerLink):
    """Server side: holds the credentials, uploads the global model, issues slots."""

    scheme = "s3"
    OPTIONS = OPTIONS

    def __init__(self, url: TransportSpec | str, run_id: int | str, options=None):
        super().__init__(url, run_id, options)
        self.cfg = S3Config(self.spec, self.options)
        _note_plain_http(self.cfg)
        self.s3 = self.cfg.client()
        self._check_bucket()
        self.http = HttpTransport(retries=self.cfg.retries, read_timeout=self.cfg.timeout)
        self.key_prefix = f"{self.cfg.prefix}{self.prefix}"
        self._published: dict[str, str] = {}
        self._slots: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.fast_presign = False  # set once part URLs were signed by _QuerySigner
        # a published reference (presigned GET URL) may be handed out again while it has
        # at least half its lifetime left (the offload wrapper reuses the last evaluate
        # phase's payload for the next train round)
        self.reuse_max_age = self.cfg.expires / 2
        self._hooks: dict[str, Any] = {}  # reply key -> landing hook (on_upload)
        self._uploading: dict[str, threading.Thread] = {}  # name -> background publish
        self._owned_ups: dict[str, str] = {}  # key -> upload id (begin_owned, not complete)
        self._owned_enc: dict[str, dict | None] = {}  # name -> its key (complete_owned)
        self._failed: dict[str, BaseException] = {}  # name -> why its background publish failed
        self._arrivals: dict[str, Any] = {}  # key -> s3_segments.Arrival (segmented slots)
        self.reply_hint = 0  # the largest payload published: how replies are segmented
        self._discarder = None  # background discards of segmented slots
        self._read_ahead = s3_segments.ReadAhead()  # windows fetched ahead of the folds
        self._discards: list[Any] = []
        self._hooked = threading.Event()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.last_landed: float | None = None

    # -- helpers -----------------------------------------------------------------------
    def _boto(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise boto_error(exc, what, self.cfg) from None

    def _check_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        what = f"checking bucket {self.cfg.bucket!r}"
        try:
            r = self.s3.list_objects_v2(Bucket=self.cfg.bucket, Prefix=self.cfg.prefix + NAME_PREFIX,
                                        MaxKeys=1)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "NoSuchBucket" and self.cfg.create_bucket:
                kw = {}
                region = self.s3.meta.region_name
                if region and region != "us-east-1" and not self.cfg.endpoint_url:
                    kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
                self._boto(f"creating bucket {self.cfg.bucket!r}", self.s3.create_bucket,
                           Bucket=self.cfg.bucket, **kw)
                return
            raise boto_error(exc, what, self.cfg) from None
        except BotoCoreError as exc:
            raise boto_error(exc, what, self.cfg) from None
        # AWS tells the bucket's region: presigned URLs must be signed for it
        real = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if real and not self.cfg.region and real != self.s3.meta.region_name:
            self.s3 = self.cfg.client(region=real)

    def _key(self, name: str) -> str:
        # the creation time in the key lets cleanup judge age on stores whose listings
        # carry no (or a fake) upload initiation time
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        return f"{self.key_prefix}-t{int(time.time())}-{safe}"

    def _presign(self, op: str, expires: int | None = None, **params) -> str:
        return self.s3.generate_presigned_url(
            op, Params={"Bucket": self.cfg.bucket, **params},
            ExpiresIn=expires or self.cfg.expires)

    def _part_urls(self, key: str, upload_id: str, n: int) -> list[str]:
        """Presigned PUT URLs for parts 1..n.

        botocore needs ~1-5 ms per presigned URL; a slot may need 64. Part URLs differ
        only in partNumber, so the first comes from botocore and the others are signed
        here (SigV4 query signing) - but only if re-signing the first reproduces
        botocore's signature exactly; otherwise botocore signs every part.
        """
        first = self._presign("upload_part", Key=key, UploadId=upload_id, PartNumber=1)
        if n == 1:
            return [first]
        signer = _QuerySigner.from_url(first, "PUT", self._credentials())
        if signer is None:
            return [first] + [self._presign("upload_part", Key=key, UploadId=upload_id,
                                            PartNumber=i) for i in range(2, n + 1)]
        self.fast_presign = True
        return [first] + [signer.url(partNumber=str(i)) for i in range(2, n + 1)]

    def _credentials(self):
        try:
            return self.s3._request_signer._credentials.get_frozen_credentials()
        except Exception:  # noqa: BLE001 - any surprise: botocore signs every URL
            return None

    def _loc(self, key: str, size: int, enc: dict | None, range_stored: int) -> dict[str, Any]:
        layout = Layout(size, enc["chunk"] if enc else 0)
        d: dict[str, Any] = {
            "key": key, "get": self._presign("get_object", Key=key), "stored": layout.stored,
            "range": range_stored, "conc": self.cfg.concurrency,
        }
        if enc:
            d["enc"] = enc
        if self.cfg.progress:
            d["progress"] = True
        return d

    # -- publish -----------------------------------------------------------------------
    def publish(self, name: str, payload: EncodedPayload) -> dict[str, Any]:
        self.reply_hint = max(self.reply_hint, payload.size)
        key = self._key(name)
        enc = new_encryption(ENC_CHUNK) if self.cfg.encrypt else None
        layout = Layout(payload.size, enc["chunk"] if enc else 0)
        plain_unit, stored_unit = layout.align(self.cfg.part_size)
        n = layout.units(stored_unit)
        cipher = Cipher(enc, payload.size) if enc else None
        reader = SegmentReader(payload)
        md5 = self.cfg.checksum == "md5"
        with self._lock:
            self._published[name] = key
        prog = Progress(f"upload {name}", layout.stored, progress_enabled(self.cfg.progress))
        if n <= 1:
            body = build_part(reader, layout, cipher, plain_unit, 0)
            kw = {"ContentMD5": _b64md5(body)} if md5 else {}
            self._boto(f"uploading {name}", self.s3.put_object, Bucket=self.cfg.bucket,
                       Key=key, Body=body, **kw)
            prog.add(len(body))
            return self._loc(key, payload.size, enc, stored_unit)
        up = self._boto(f"starting the upload of {name}", self.s3.create_multipart_upload,
                        Bucket=self.cfg.bucket, Key=key)
        uid = up["UploadId"]
        args = (name, key, uid, n, reader, layout, cipher, plain_unit, md5, prog)
        loc = self._loc(key, payload.size, enc, stored_unit)
        if self.cfg.publish == "sync":
            self._upload_parts(*args)
            return loc
        # background: the parts go up while Flower delivers the reference; clients ask
        # again on 404 until the object appears (at most ``wait`` seconds: a minute
        # plus the object at 10 MB/s)
        th = threading.Thread(target=self._upload_in_background, args=args, daemon=True,
                              name="ftx-s3-publish")
        with self._lock:
            self._uploading[name] = th
        th.start()
        loc["wait"] = int(min(self.cfg.expires, 60 + layout.stored / 10e6))
        return loc

    # -- a payload written by others (aggregation=ray's shard owners) -----------------
    def begin_owned(self, name: str, n: int) -> dict[str, Any]:
        """A multipart upload of ``n`` parts for ``name`` whose parts others PUT to the
        presigned URLs returned (the credentials stay here); :meth:`complete_owned`
        publishes it, :meth:`abort_owned` drops it. With ``encrypt=true`` the writers
        get the object's key (``enc``) and seal its chunks; every part but the last must
        then hold whole chunks."""
        enc = new_encryption(ENC_CHUNK) if self.cfg.encrypt else None
        key = self._key(name)
        up = self._boto(f"starting the upload of {name}", self.s3.create_multipart_upload,
                        Bucket=self.cfg.bucket, Key=key)
        uid = up["UploadId"]
        with self._lock:
            self._owned_ups[key] = uid
        try:
            urls = self._part_urls(key, uid, n)
        except BaseException:
            self.abort_owned({"key": key, "uid": uid})
            raise
        # Content-MD5 on every owner's part whatever ``checksum`` says: the ServerApp
        # publishes a digest built from the owners' leaf hashes without reading the
        # bytes back, so the store must refuse a part damaged on its way (a client
        # upload needs no such check: the ServerApp verifies its digest as it reads it)
        return {"name": name, "key": key, "uid": uid, "urls": urls, "enc": enc,
                "md5": True, "retries": self.cfg.retries,
                "read_timeout": self.cfg.timeout}

    def complete_owned(self, up: dict[str, Any], etags: list[str], size: int
                       ) -> dict[str, Any]:
        """Complete an upload from :meth:`begin_owned` (parts 1..n in order): it is
        published under its name (released like any publication) and its location
        returned."""
        self._boto(f"completing the upload of {up['name']}", self.s3.complete_multipart_upload,
                   Bucket=self.cfg.bucket, Key=up["key"], UploadId=up["uid"],
                   MultipartUpload={"Parts": [{"PartNumber": i + 1, "ETag": e}
                                              for i, e in enumerate(etags)]})
        with self._lock:
            self._owned_ups.pop(up["key"], None)
            self._published[up["name"]] = up["key"]
            self._owned_enc[up["name"]] = up.get("enc")
        return self.published_loc(up["name"], size)

    def abort_owned(self, up: dict[str, Any]) -> None:
        with self._lock:
            self._owned_ups.pop(up["key"], None)
        self._abort(up["key"], up["uid"])

    def published_loc(self, name: str, size: int) -> dict[str, Any]:
        """A fresh location (presigned GET) of a publication from :meth:`complete_owned`."""
        with self._lock:
            key, enc = self._published[name], self._owned_enc.get(name)
        return self._loc(key, size, enc, self._owned_unit(size, enc))

    def read_published(self, name: str, size: int) -> PayloadSource:
        """A ranged reader of a publication from :meth:`complete_owned` (decrypted)."""
        with self._lock:
            key, enc = self._published[name], self._owned_enc.get(name)
        return self._reader(key, size, {"enc": enc, "part": self._owned_unit(size, enc),
                                        "name": name})

    def adopt_stored(self, name: str, key: str, size: int) -> dict[str, Any]:
        """Publish, as ``name``, a model already in the store (a ``final_model=store``
        run's ``key``): its size checked with a HEAD, then copied inside the store into
        this run's keys (no byte passes through here; the original is never released),
        registered like :meth:`complete_owned`'s publications; its location returned."""
        from ..stored import StoredModelError

        head = self._head(key, f"reading s3://{self.cfg.bucket}/{key}")
        if head is None:
            raise StoredModelError(f"s3://{self.cfg.bucket}/{key}: no such object (the "
                                   f"initial model's reference names nothing)")
        if head.get("ContentLength") != size:
            raise StoredModelError(f"s3://{self.cfg.bucket}/{key}: "
                                   f"{head.get('ContentLength')} bytes, the reference says "
                                   f"{size}")
        dest = self._key(name)
        with self._lock:  # registered first: close() removes a half-done copy too
            self._published[name] = dest
            self._owned_enc[name] = None
        # the object the HEAD saw, or none (replaced since: the copy fails)
        self._copy(key, dest, size, f"copying s3://{self.cfg.bucket}/{key} into the run",
                   etag=head.get("ETag"))
        return self.published_loc(name, size)

    def keep_published(self, name: str, size: int, dest: str | None = None) -> str:
        """Copy a publication from :meth:`complete_owned` to ``dest`` (default
        ``<prefix>/final/<run>.ftx``) inside the store (CopyObject, or UploadPartCopy
        above 5 GiB: no byte passes through here), where neither :meth:`close` nor
        ``cleanup`` removes it; returns the key. Not for encrypted publications."""
        with self._lock:
            key, enc = self._published[name], self._owned_enc.get(name)
        if enc:
            raise ValueError("s3: an encrypted model is not kept past its run")
        dest = dest if dest is not None else f"{self.cfg.prefix}final/{self.prefix}.ftx"
        if (not dest or len(dest.encode()) > 1024
                or dest.startswith(("/", self.cfg.prefix + NAME_PREFIX))):
            raise ValueError(f"s3: final_key {dest!r} is not a usable key: it must be "
                             f"non-empty, not start with '/', and not start with "
                             f"{self.cfg.prefix + NAME_PREFIX!r} (the run's keys, removed)")
        self._copy(key, dest, size, f"copying the final model to s3://{self.cfg.bucket}/{dest}")
        return dest

    def _copy(self, key: str, dest: str, size: int, what: str, etag: str | None = None
              ) -> None:
        """Server-side copy of ``key`` to ``dest`` (CopyObject, or UploadPartCopy parts
        above :data:`COPY_MAX`; an unfinished copy is aborted); ``etag``: only that
        version of ``key``."""
        b, src = self.cfg.bucket, {"Bucket": self.cfg.bucket, "Key": key}
        cond = {"CopySourceIfMatch": etag} if etag else {}
        if size <= COPY_MAX:
            self._boto(what, self.s3.copy_object, Bucket=b, Key=dest, CopySource=src, **cond)
            return
        uid = self._boto(what, self.s3.create_multipart_upload, Bucket=b, Key=dest)["UploadId"]
        try:
            parts = []
            for i, off in enumerate(range(0, size, COPY_PART), 1):
                r = self._boto(what, self.s3.upload_part_copy, Bucket=b, Key=dest,
                               UploadId=uid, PartNumber=i, CopySource=src, **cond,
                               CopySourceRange=f"bytes={off}-{min(off + COPY_PART, size) - 1}")
                parts.append({"PartNumber": i, "ETag": r["CopyPartResult"]["ETag"]})
            self._boto(what, self.s3.complete_multipart_upload, Bucket=b, Key=dest,
                       UploadId=uid, MultipartUpload={"Parts": parts})
        except BaseException:
            self._abort(dest, uid)
            raise

    def _owned_unit(self, size: int, enc: dict | None) -> int:
        return Layout(size, enc["chunk"] if enc else 0).align(self.cfg.part_size)[1]

    def _upload_in_background(self, *args) -> None:
        try:
            self._upload_parts(*args)
        except BaseException as exc:  # noqa: BLE001 - clients time out waiting; say why here
            with self._lock:
                self._failed[args[0]] = exc  # read by publish_failed: never handed out again
            log.error("s3: the upload of %s failed, clients will not find it: %s", args[0], exc)

    def publish_failed(self, name: str) -> BaseException | None:
        self.wait_published(name)
        with self._lock:
            return self._failed.get(name)

    def wait_published(self, name: str, timeout: float | None = None) -> bool:
        """Wait for a background upload of ``name`` (True when none is running)."""
        with self._lock:
            th = self._uploading.get(name)
        if th is not None:
            th.join(timeout)
            return not th.is_alive()
        return True

    def _upload_parts(self, name: str, key: str, uid: str, n: int, reader, layout, cipher,
                      plain_unit: int, md5: bool, prog) -> None:
        etags: list[str | None] = [None] * n

        def one(i: int) -> None:
            body = build_part(reader, layout, cipher, plain_unit, i)
            kw = {"ContentMD5": _b64md5(body)} if md5 else {}
            r = self._boto(f"uploading part {i + 1}/{n} of {name}", self.s3.upload_part,
                           Bucket=self.cfg.bucket, Key=key, UploadId=uid, PartNumber=i + 1,
                           Body=body, **kw)
            etags[i] = r["ETag"]
            prog.add(len(body))

        try:
            run_all(one, n, self.cfg.concurrency)
            self._boto(f"completing the upload of {name}", self.s3.complete_multipart_upload,
                       Bucket=self.cfg.bucket, Key=key, UploadId=uid,
                       MultipartUpload={"Parts": [{"PartNumber": i + 1, "ETag": e}
                                                  for i, e in enumerate(etags)]})
        except BaseException:
            self._abort(key, uid)
            raise

    def release(self, name: str) -> None:
        self.wait_published(name)  # an upload still running would re-create the object
        with self._lock:
            self._owned_enc.pop(name, None)
            key = self._published.pop(name, None)
            self._uploading.pop(name, None)
            self._failed.pop(name, None)
        if key:
            self._delete(key)

    def _delete(self, key: str) -> None:
        try:
            self.s3.delete_object(Bucket=self.cfg.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - best effort; cleanup finds leftovers
            log.warning("s3: could not delete s3://%s/%s: %s", self.cfg.bucket, key, exc)

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.s3.abort_multipart_upload(Bucket=self.cfg.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code != "NoSuchUpload":
                log.warning("s3: could not abort the upload of s3://%s/%s: %s",
                            self.cfg.bucket, key, exc)

    # -- reply slots -------------------------------------------------------------------
    def issue_slot(self, name: str, max_size: int) -> dict[str, Any]:
        key = self._key(name)
        enc = new_encryption(ENC_CHUNK) if self.cfg.encrypt else None
        layout = Layout(max_size, enc["chunk"] if enc else 0)
        want = max(self.cfg.part_size, math.ceil(layout.stored / self.cfg.max_parts))
        want = -(-want // 2**20) * 2**20  # whole MiB
        _, part = layout.align(want)
        n = part_count(layout.stored, part)
        if part > MAX_PART or n > MAX_PARTS:
            raise LinkError(f"a reply cap of {max_size} bytes needs parts above S3's limits; "
                            "lower max_reply_size or raise max_parts")
        if self.cfg.segment and not enc:  # each segment its own object (s3_segments.py)
            st, slot = s3_segments.issue(self, key, name, part, n)
            st["cap"] = max_size  # what a landing may claim (not the parts' room)
            if self.cfg.progress:
                slot["progress"] = True
            return slot
        up = self._boto(f"starting the reply upload {name}", self.s3.create_multipart_upload,
                        Bucket=self.cfg.bucket, Key=key)
        uid = up["UploadId"]
        with self._lock:
            self._slots[key] = {"upload_id": uid, "state": "open", "part": part, "enc": enc,
                                "n": n, "name": name, "cap": max_size}
        try:
            urls = self._part_urls(key, uid, n)
        except BaseException:
            self.discard_slot({"key": key})
            raise
        slot: dict[str, Any] = {
            "key": key, "put": compact_urls(urls), "part": part, "conc": self.cfg.concurrency,
            "checksum": self.cfg.checksum,
        }
        try:  # the client completes the upload itself (see on_upload)
            slot["done"] = self._presign("complete_multipart_upload", Key=key, UploadId=uid)
        except Exception:  # noqa: BLE001 - the ServerApp completes it at settle time
            pass
        if enc:
            slot["enc"] = enc
        if self.cfg.progress:
            slot["progress"] = True
        return slot

    def open_upload(self, slot: dict[str, Any], loc: dict[str, Any], size: int) -> PayloadSource:
        key = slot.get("key") if isinstance(slot, dict) else None
        claimed = loc.get("key") if isinstance(loc, dict) else None
        if not isinstance(claimed, str) or claimed != key:
            raise RefError(f"reply location {str(claimed)[:200]!r} is not the object key "
                           "issued for this slot")
        with self._lock:
            st = self._slots.get(key)
            if st is None or st["state"] != "open":
                raise RefError(f"reply slot {key!r} is not open (never issued, already used "
                               "or discarded)")
            st["state"] = "completing"
            self._hooks.pop(key, None)  # the reply is here: settle reads it, not a hook
        enc = st["enc"]
        layout = Layout(size, enc["chunk"] if enc else 0)
        want = part_count(layout.stored, st["part"])
        if want > st["n"]:
            st["state"] = "open"
            raise RefError(f"reply of {size} bytes does not fit the slot ({st['n']} parts)")
        if "seg" in st:
            return self._open_segmented(key, st, size)
        head = self._head(key, f"checking reply {st['name']}")
        if head is not None:  # the client completed the upload (slot's "done" URL)
            if head.get("ContentLength") != layout.stored:
                st["state"] = "open"
                raise RefError(f"reply object has {head.get('ContentLength')} bytes, a "
                               f"{size}-byte payload needs {layout.stored}")
            st["state"] = "completed"
            return self._reader(key, size, st)
        parts = []
        pager = self.s3.get_paginator("list_parts")
        try:
            for page in pager.paginate(Bucket=self.cfg.bucket, Key=key, UploadId=st["upload_id"]):
                parts.extend(page.get("Parts", []))
                if len(parts) > st["n"]:
                    break
        except Exception as exc:  # noqa: BLE001 - mapped to a clear LinkError
            st["state"] = "open"
            raise boto_error(exc, f"listing the parts of reply {st['name']}", self.cfg) from None
        nums = [p["PartNumber"] for p in parts]
        if nums != list(range(1, want + 1)):
            st["state"] = "open"
            raise RefError(f"reply upload has parts {nums[:12]}{'...' if len(nums) > 12 else ''}"
                           f", a {size}-byte payload needs parts 1..{want}")
        for p in parts:
            expect = min(st["part"], layout.stored - (p["PartNumber"] - 1) * st["part"])
            if p["Size"] != expect:
                st["state"] = "open"
                raise RefError(f"reply part {p['PartNumber']} has {p['Size']} bytes, a "
                               f"{size}-byte payload needs {expect}")
        try:
            self._boto(f"completing reply {st['name']}", self.s3.complete_multipart_upload,
                       Bucket=self.cfg.bucket, Key=key, UploadId=st["upload_id"],
                       MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"],
                                                   "ETag": p["ETag"]} for p in parts]})
        except BaseException:
            st["state"] = "open"
            raise
        st["state"] = "completed"
        head = self._boto(f"checking reply {st['name']}", self.s3.head_object,
                          Bucket=self.cfg.bucket, Key=key)
        if head.get("ContentLength") != layout.stored:
            raise RefError(f"reply object has {head.get('ContentLength')} bytes, expected "
                           f"{layout.stored}")
        return self._reader(key, size, st)

    def _open_segmented(self, key: str, st: dict[str, Any], size: int) -> PayloadSource:
        try:
            found = s3_segments.check(self, key, st, size)
        except RefError:
            st["state"] = "open"
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a clear LinkError
            st["state"] = "open"
            raise boto_error(exc, f"listing the segments of reply {st['name']}",
                             self.cfg) from None
        st["state"] = "completed"
        with self._lock:
            early = self._arrivals.pop(key, None)
        if early is not None and early.update(found):  # a fold waiting for a segment
            self.last_landed = early.complete_at  # sees it now; the upload has landed
            self.notify_landed()
        arr = s3_segments.Arrival(self, key, size, st)
        arr.update(found)
        arr.final = True
        return arr.source()

    def _reader(self, key: str, size: int, st: dict[str, Any]) -> PayloadSource:
        url = self._presign("get_object", expires=min(self.cfg.expires, 3600), Key=key)
        return RangedReader(self.http, url, size, st["enc"], st["part"], self.cfg.concurrency,
                            st["name"], progress_enabled(self.cfg.progress)).source()

    def _head(self, key: str, what: str) -> dict[str, Any] | None:
        """HEAD of ``key``, or None if there is no such object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.s3.head_object(Bucket=self.cfg.bucket, Key=key)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            if err.get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise boto_error(exc, what, self.cfg) from None
        except BotoCoreError as exc:
            raise boto_error(exc, what, self.cfg) from None

    # -- landing: fold replies while they travel through Flower ------------------------
    def on_upload(self, slot: dict[str, Any], fn) -> bool:
        """See ServerLink.on_upload. The client completes its multipart upload itself
        (the slot's presigned ``done`` URL); a watcher thread lists the run's keys every
        ``LAND_POLL`` seconds while hooks are waiting, and calls ``fn`` with a ranged
        reader of the object as soon as it appears. Not with ``encrypt=true`` (the plain
        size is only known from the reply)."""
        key = slot.get("key") if isinstance(slot, dict) else None
        if (self.cfg.encrypt or not isinstance(key, str)
                or ("done" not in slot and "segments" not in slot)):
            return False
        with self._lock:
            st = self._slots.get(key)
            if st is None or st["state"] != "open":
                return False
            self._hooks[key] = fn
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                 name="ftx-s3-landing")
                self._watcher.start()
        self._hooked.set()
        return True

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._hooked.wait()
            if self._stop.is_set():
                return
            with self._lock:
                waiting = dict(self._hooks)
                arriving = dict(self._arrivals)
                if not waiting and not arriving:
                    self._hooked.clear()
                    continue
            try:
                found = self._list_sizes()
            except Exception as exc:  # noqa: BLE001 - try again; settle reads it anyway
                log.debug("s3: listing landed replies failed: %s", exc)
                found = {}
            for key, arr in arriving.items():  # segments of uploads being folded
                if arr.update(found):  # its last segment landed
                    with self._lock:
                        self._arrivals.pop(key, None)
                    self.last_landed = arr.complete_at
                    self.notify_landed()
            for key, fn in waiting.items():
                seg = s3_segments.size_key(key)
                if key not in found and seg not in found:
                    continue
                with self._lock:
                    st = self._slots.get(key)
                    if self._hooks.pop(key, None) is None or st is None:
                        continue
                    # the slot's cap, not its parts' room (up to a part more): nothing is
                    # read on a landing beyond what the reply may declare
                    cap = min(st["n"] * st["part"], st.get("cap", st["n"] * st["part"]))
                if "seg" in st:  # a segmented upload declared its size: fold as it lands
                    threading.Thread(target=self._land_segmented, args=(key, st, fn, cap),
                                     daemon=True, name="ftx-s3-fold").start()
                    continue
                size = found.get(key, -1)
                if 0 <= size <= cap:  # else it is rejected when the reply arrives
                    threading.Thread(target=self._land, args=(key, size, st, fn), daemon=True,
                                     name="ftx-s3-fold").start()
            with self._lock:
                poll = s3_segments.ARRIVAL_POLL if self._arrivals else LAND_POLL
            self._stop.wait(poll)

    def _list_sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.cfg.bucket, Prefix=self.key_prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = int(o.get("Size", -1))
        return out

    def _land(self, key: str, size: int, st: dict[str, Any], fn) -> None:
        self.last_landed = time.perf_counter()
        try:
            with self._reader(key, size, st) as src:
                fn(src)
        except Exception as exc:  # noqa: BLE001 - untrusted; decided when the reply arrives
            log.debug("s3: landing hook for %s failed: %s", key, exc)

    def _land_segmented(self, key: str, st: dict[str, Any], fn, cap: int) -> None:
        size = s3_segments.declared_size(self, key, cap)
        if size is None:  # no valid size: the reply is read (and checked) when it arrives
            return
        arr = s3_segments.Arrival(self, key, size, st)
        with self._lock:
            if self._slots.get(key) is not st or st["state"] != "open":
                return
            self._arrivals[key] = arr
        self._hooked.set()
        try:
            with arr.source() as src:
                fn(src)
        except Exception as exc:  # noqa: BLE001 - untrusted; decided when the reply arrives
            log.debug("s3: landing hook for %s failed: %s", key, exc)

    def discard_slot(self, slot: dict[str, Any]) -> None:
        key = slot.get("key") if isinstance(slot, dict) else None
        with self._lock:
            st = self._slots.pop(key, None) if isinstance(key, str) else None
            if isinstance(key, str):
                self._hooks.pop(key, None)
        if st is None:
            return
        if "seg" in st:  # a fold waiting for a segment stops now; the requests run
            arr = self._arrivals.pop(key, None)  # in the background (joined by close)
            if arr is not None:
                arr.kill()
            with self._lock:
                if self._discarder is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._discarder = ThreadPoolExecutor(2, thread_name_prefix="ftx-s3-discard")
                self._discards = [f for f in self._discards if not f.done()]
                self._discards.append(self._discarder.submit(s3_segments.discard, self, key,
                                                             st))
            return
        if st["state"] in ("open", "completing"):
            self._abort(key, st["upload_id"])
        # the client may have completed it (slot's "done" URL) whatever the state here
        self._delete(key)

    def wait_discarded(self) -> None:
        """Wait until the background discards of segmented slots are done."""
        with self._lock:
            futs, self._discards = self._discards, []
        for f in futs:
            try:
                f.result()
            except Exception as exc:  # noqa: BLE001 - best effort; close sweeps the run
                log.warning("s3: discarding a segmented reply slot failed: %s", exc)

    # -- end of run --------------------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        self._hooked.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        for th in list(self._uploading.values()):
            th.join()
        for name in list(self._published):
            self.release(name)
        for key, uid in list(self._owned_ups.items()):
            self.abort_owned({"key": key, "uid": uid})
        for key in list(self._slots):
            self.discard_slot({"key": key})
        self.wait_discarded()
        if self._discarder is not None:
            self._discarder.shutdown(wait=True)
        self._read_ahead.close()
        try:  # anything else of this run (e.g. after a crash of a previous call)
            _sweep(self.s3, self.cfg, self.key_prefix, older_than=None, dry_run=False)
        except Exception as exc:  # noqa: BLE001
            log.warning("s3: could not sweep the objects of this run (s3://%s/%s*%s): %s",
                        self.cfg.bucket, self.key_prefix,
                        f" at {self.cfg.endpoint_url}" if self.cfg.endpoint_url else "", exc)
        self.http.close()

    @classmethod
    def cleanup(cls, url: TransportSpec | str, *, dry_run: bool = False,
                all_: bool = False) -> list[str]:
        """Remove ``ftx-`` objects and multipart uploads under the URL's prefix.

        Without ``all_`` only those older than ``older_than`` (URL option, default 1h:
        the default presigned-URL lifetime, after which nobody can use them) go.
        """
        t = as_spec(url)
        q = dict(t.query)
        older = int(parse_duration(q.pop("older_than", 3600)))
        cfg = S3Config(t, parse_options(cls.OPTIONS, q, what="s3:// cleanup"))
        s3 = cfg.client()
        return _sweep(s3, cfg, cfg.prefix + NAME_PREFIX, older_than=None if all_ else older,
                      dry_run=dry_run)


class _QuerySigner:
    """SigV4 query-string signing of variants of one botocore-presigned URL."""

    def __init__(self, method: str, parts, pieces: list[tuple[str, str]], amz_date: str,
                 scope: str, key: bytes):
        self.method, self.parts, self.pieces = method, parts, pieces
        self.amz_date, self.scope, self.key = amz_date, scope, key

    @classmethod
    def from_url(cls, url: str, method: str, creds) -> _QuerySigner | None:
        import hashlib
        import hmac
        from urllib.parse import unquote, urlsplit

        if creds is None or not creds.secret_key:
            return None
        u = urlsplit(url)
        try:
            pieces = [tuple(p.split("=", 1)) for p in u.query.split("&")]
            d = dict(pieces)
            akid, date, region, service, term = unquote(d["X-Amz-Credential"]).split("/")
            amz_date, sig = d["X-Amz-Date"], d["X-Amz-Signature"]
        except (KeyError, ValueError):
            return None
        if (d.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or akid != creds.access_key
                or d.get("X-Amz-SignedHeaders") != "host" or term != "aws4_request"):
            return None

        def h(k: bytes, m: str) -> bytes:
            return hmac.new(k, m.encode(), hashlib.sha256).digest()

        key = h(h(h(h(f"AWS4{creds.secret_key}".encode(), date), region), service), term)
        pieces = [p for p in pieces if p[0] != "X-Amz-Signature"]
        signer = cls(method, u, pieces, amz_date, f"{date}/{region}/{service}/{term}", key)
        return signer if hmac.compare_digest(signer._sign(pieces), sig) else None

    def _sign(self, pieces: list[tuple[str, str]]) -> str:
        import hashlib
        import hmac

        cq = "&".join(f"{k}={v}" for k, v in sorted(pieces))
        creq = (f"{self.method}\n{self.parts.path}\n{cq}\nhost:{self.parts.netloc}\n\n"
                "host\nUNSIGNED-PAYLOAD")
        sts = (f"AWS4-HMAC-SHA256\n{self.amz_date}\n{self.scope}\n"
               f"{hashlib.sha256(creq.encode()).hexdigest()}")
        return hmac.new(self.key, sts.encode(), hashlib.sha256).hexdigest()

    def url(self, **changes: str) -> str:
        pieces = [(k, changes.get(k, v)) for k, v in self.pieces]
        q = "&".join(f"{k}={v}" for k, v in pieces)
        u = self.parts
        return f"{u.scheme}://{u.netloc}{u.path}?{q}&X-Amz-Signature={self._sign(pieces)}"


def _b64md5(body: bytes) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.md5(body).digest()).decode()


def _sweep(s3, cfg: S3Config, prefix: str, *, older_than: int | None, dry_run: bool) -> list[str]:
    """Delete objects / abort uploads whose key starts with ``prefix``."""
    from botocore.exceptions import BotoCoreError, ClientError

    cutoff = None if older_than is None else datetime.now(UTC) - timedelta(seconds=older_than)
    found: list[str] = []

    def young(key: str, stamp: datetime) -> bool:
        if cutoff is None:
            return False
        m = _KEY_TIME.search(key)
        if m:
            stamp = max(stamp, datetime.fromtimestamp(int(m.group(1)), UTC))
        return stamp > cutoff

    try:
        batch: list[dict[str, str]] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=cfg.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                if young(o["Key"], o["LastModified"]):
                    continue
                found.append(f"s3://{cfg.bucket}/{o['Key']}")
                batch.append({"Key": o["Key"]})
                if len(batch) == 1000 and not dry_run:
                    s3.delete_objects(Bucket=cfg.bucket, Delete={"Objects": batch, "Quiet": True})
                    batch = []
        if batch and not dry_run:
            s3.delete_objects(Bucket=cfg.bucket, Delete={"Objects": batch, "Quiet": True})
        for page in s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=cfg.bucket, Prefix=prefix):
            for u in page.get("Uploads", []):
                if young(u["Key"], u["Initiated"]):
                    continue
                found.append(f"s3://{cfg.bucket}/{u['Key']} (incomplete upload {u['UploadId'][:16]})")
                if not dry_run:
                    try:
                        s3.abort_multipart_upload(Bucket=cfg.bucket, Key=u["Key"],
                                                  UploadId=u["UploadId"])
                    except ClientError as exc:
                        if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                            raise
    except (ClientError, BotoCoreError) as exc:
        raise boto_error(exc, f"cleaning up {cfg.where()}", cfg) from None
    return found


def _label(key: Any) -> str:
    """A short name for progress lines: the key without prefix and run id."""
    base = str(key or "payload").rsplit("/", 1)[-1]
    return re.sub(r"^ftx-\d+-[^-]*-[0-9a-f]{8}-(t\d+-)?", "", base)[:120]


class S3ClientLink(ClientLink):
    """Client side: plain HTTP with the presigned URLs from the reference / slot."""

    scheme = "s3"
    WAIT_FIELDS = ("wait",)

    def __init__(self):
        self._http: HttpTransport | None = None
        self._pinned: dict[tuple, HttpTransport] = {}
        self._lock = threading.Lock()

    @property
    def http(self) -> HttpTransport:
        with self._lock:
            if self._http is None:
                self._http = HttpTransport()
            return self._http

    def _transport(self, desc: dict[str, Any]) -> HttpTransport:
        """The transport for a descriptor: connections to a host name go to the address
        the client policy checked (``pinned``, put there by the policy), if any."""
        pins = check_pins(desc.get("pinned"))
        if not pins:
            return self.http
        key = tuple(sorted(pins.items()))
        base = self.http
        with self._lock:
            t = self._pinned.get(key)
            if t is None:
                if len(self._pinned) >= 8:  # a few stores at most; dropped, not closed
                    self._pinned.pop(next(iter(self._pinned)))
                t = self._pinned[key] = HttpTransport(pins=pins, retries=base.retries,
                                                      backoff=base.backoff)
            return t

    def endpoints(self, desc: dict[str, Any], *, upload: bool) -> list[Endpoint]:
        """``get`` (download); every part URL and ``done`` (upload)."""
        if upload and isinstance(desc, dict) and "segments" in desc:
            return s3_segments.endpoints(desc)
        return url_endpoints(desc, upload=upload)

    def open(self, loc: dict[str, Any], size: int) -> PayloadSource:
        if not isinstance(loc, dict):
            raise RefError("s3:// location is not an object")
        url = check_get_url(loc.get("get"))
        enc = check_encryption(loc.get("enc"))
        stored = check_int(loc.get("stored"), 0, 2**62, "stored size")
        rng = check_int(loc.get("range"), 1, MAX_PART + 2**30, "range size")
        if stored != Layout(size, enc["chunk"] if enc else 0).stored:
            raise RefError(f"s3:// location says {stored} stored bytes, which does not match "
                           f"a {size}-byte payload")
        conc = clamp_concurrency(loc.get("conc"))
        label = _label(loc.get("key"))
        wait = loc.get("wait", 0)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 86400:
            raise RefError("s3:// location has an invalid wait (0-86400 seconds)")
        return RangedReader(self._transport(loc), url, size, enc, rng, conc, label,
                            progress_enabled(loc.get("progress")), float(wait)).source()

    def upload(self, slot: dict[str, Any], payload: EncodedPayload) -> dict[str, Any]:
        if not isinstance(slot, dict):
            raise RefError("s3:// slot is not an object")
        key = slot.get("key")
        if not isinstance(key, str) or not 0 < len(key) <= 1024:
            raise RefError("s3:// slot has no object key")
        part = check_int(slot.get("part"), MIN_PART, MAX_PART + 2**30, "part size")
        checksum = slot.get("checksum", "md5")
        if checksum not in ("md5", "none"):
            raise RefError(f"s3:// slot has an unknown checksum mode {checksum!r}")
        if "segments" in slot:  # one object per segment, completed as it is up
            n = s3_segments.upload(self._transport(slot), slot, payload, part,
                                   checksum == "md5", _label(key),
                                   progress_enabled(slot.get("progress")))
            return {"key": key, "parts": n}
        urls = expand_urls(slot.get("put"))
        enc = check_encryption(slot.get("enc"))
        done = slot.get("done")
        if done is not None:
            done = check_get_url(done)
        http = self._transport(slot)
        etags = upload_parts(http, urls, payload, enc, part,
                             clamp_concurrency(slot.get("conc")), checksum == "md5", _label(key),
                             progress_enabled(slot.get("progress")))
        if done is not None:
            # complete the upload here: the ServerApp sees the object at once and can read
            # it while this reply still travels through Flower. If this fails, the
            # ServerApp completes it when the reply arrives (as without "done").
            try:
                http.complete(done, etags, f"completing the upload of {_label(key)}")
            except (LinkError, RefError) as exc:
                log.info("s3: could not complete the upload of %s (the ServerApp will): %s",
                         _label(key), exc)
        return {"key": key, "parts": len(etags)}


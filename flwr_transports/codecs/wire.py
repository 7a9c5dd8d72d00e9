"""Where codecs meet links: what the offload wrapper and ``payload_mod`` call.

* The server encodes each outgoing model once with the run's codec (``lossless`` for
  every codec but ``raw``: a client holds no base before its first download) and keeps
  the raw payload it sent as the *base* of that round's ``delta``/``q8`` replies
  (:class:`ServerBases`, by digest; the base's bytes are the model's own arrays, not a
  copy).
* The ticket names the codec; the client decodes what it fetched (a stream is
  recognised by its first bytes, a raw payload decodes as before), keeps the decoded
  payload as its base, and encodes its reply with the ticket's codec against it
  (:func:`encode_for_wire`); ``q8`` residuals live in the ClientApp's
  ``context.state`` (:func:`load_feedback` / :func:`save_feedback`), which Flower keeps
  per run and node between rounds.
* Decoding (:func:`decode_from_wire`): the reference's digest is checked over exactly
  the bytes on the wire, then windows are decoded straight into the arrays' final
  ``bytes``; the decoded size is bounded by the caller's cap (``max_reply_size`` on
  the server, the client policy's ``max_payload`` on a client) before anything is
  allocated for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Self

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from ..codec import EncodedPayload, PayloadError, check_digest, decode, hash_segments
from ..errors import ConfigError
from .q8 import ErrorFeedback
from .stream import (
    CODECS,
    DELTA,
    LOSSLESS,
    Q8,
    RAW,
    STREAM_HEADER,
    Base,
    Decoder,
    decode_record,
    encode,
    is_encoded,
)

#: ``context.state`` key of the client's q8 residuals (an ArrayRecord, name -> float32)
FEEDBACK_STATE_KEY = "flwr_transports.q8_residual"


def check_codec(name: str) -> str:
    """A codec name from configuration (ConfigError naming the choices otherwise)."""
    s = str(name).strip().lower()
    if s not in CODECS:
        raise ConfigError(f"unknown codec {name!r} (one of {', '.join(CODECS)})")
    if s != RAW:
        from .stream import _zstd
        try:
            _zstd()
        except ImportError as err:
            raise ConfigError(str(err)) from None
    return s


def downlink_codec(codec: str) -> str:
    """What the server sends full models with: ``raw`` stays raw, every other codec
    sends ``lossless`` (a client may hold no base). With ``delta``/``q8`` on a network
    link a downlink delta is offered next to it (:mod:`flwr_transports.codecs.downlink`)."""
    return RAW if codec == RAW else LOSSLESS


def encode_for_wire(payload: EncodedPayload, codec: str, *, base: Base | None = None,
                    feedback: ErrorFeedback | None = None) -> tuple[EncodedPayload, str]:
    """``(what goes on the wire, its codec)``: ``payload`` encoded with ``codec``
    (``delta``/``q8`` without a ``base``: ``lossless``). A stream that would not be
    smaller than the raw payload is not sent: the raw payload goes instead (receivers
    accept both; the reference says which)."""
    if codec == RAW:
        return payload, RAW
    if codec in (DELTA, Q8) and base is None:
        codec = LOSSLESS
    wire = encode(payload, codec, base=base, feedback=feedback)
    if wire.size >= payload.size and codec != Q8:
        return payload, RAW
    return wire, codec


def peek_encoded(read: Callable[[int, int], bytes], size: int) -> bool:
    """Whether the payload behind ``read`` is an encoded stream (reads 4 bytes)."""
    return size >= STREAM_HEADER and is_encoded(read(0, 4))


def decode_from_wire(read: Callable[[int, int], bytes], size: int, digest: str | None, *,
                     max_size: int, lookup_base: Callable[[str], Base | None] | None = None,
                     with_base: bool = False, content: str | None = None):
    """Decode a payload as a link hands it: ``read(off, n)``, its wire ``size`` and the
    reference's ``digest``. A raw payload decodes as always (digest over the bytes
    decoded). An encoded stream is read whole, its digest checked over exactly those
    bytes, then decoded (its decoded size at most ``max_size``; a ``delta``/``q8``
    stream against the base ``lookup_base(digest)`` returns, refused if that is None).
    Returns the ArrayRecord, or ``(record, Base | None)`` with ``with_base`` (the
    decoded payload as the base of a later delta; None for a raw payload).
    ``content``: the raw payload digest the reference names (a downlink model): the
    stream must name it and the decoded payload is verified against it."""
    if not peek_encoded(read, size):
        if content is not None and content != digest:
            raise PayloadError("a raw payload whose digest is not the model's the reference "
                               "names")
        rec = decode(read, size, digest)
        return (rec, None) if with_base else rec
    wire = read(0, size)
    if len(wire) != size:
        raise PayloadError(f"short read of an encoded payload: {len(wire)} of {size} bytes")
    check_digest(hash_segments([wire]), digest)
    mv = memoryview(wire)
    info_dec = Decoder(lambda off, n: mv[off: off + n], size, max_size=max_size,
                       base=_base_for(mv, size, lookup_base))
    if content is not None and info_dec.info.content_digest != content:
        raise PayloadError(f"the stream decodes to {info_dec.info.content_digest}, the "
                           f"reference names {content}")
    return decode_record(info_dec, with_base=with_base, verify=content is not None)


def decode_delta(read: Callable[[int, int], bytes], size: int, digest: str, *, base: Base,
                 content: str, content_size: int, max_size: int):
    """Decode a downlink delta (:class:`flwr_transports.refs.DeltaRef`) against the
    ``base`` the client kept: the wire bytes must have ``digest``; the stream must be a
    ``delta`` against exactly ``base`` and name the model ``content`` of
    ``content_size`` bytes (at most ``max_size``); the decoded payload is verified
    against ``content`` (a wrong base, or a lying server, fails here). Returns
    ``(record, Base)`` (the decoded model, the base of the next delta)."""
    if not peek_encoded(read, size):
        raise PayloadError("the downlink delta is not an encoded stream")
    wire = read(0, size)
    if len(wire) != size:
        raise PayloadError(f"short read of a downlink delta: {len(wire)} of {size} bytes")
    check_digest(hash_segments([wire]), digest)
    mv = memoryview(wire)
    from .stream import read_info
    info = read_info(lambda off, n: mv[off: off + n], size, max_size=max_size)
    if info.codec != DELTA:
        raise PayloadError(f"the downlink delta is coded {info.codec!r}, not 'delta'")
    if info.base_digest != base.digest:
        raise PayloadError(f"the downlink delta is against base {info.base_digest}, not "
                           f"the base its reference names ({base.digest})")
    if info.content_digest != content or info.size != content_size:
        raise PayloadError(f"the downlink delta decodes to {info.content_digest} "
                           f"({info.size} bytes), its reference names {content} "
                           f"({content_size} bytes)")
    dec = Decoder(lambda off, n: mv[off: off + n], size, max_size=max_size, base=base)
    return decode_record(dec, with_base=True, verify=True)


def _base_for(mv: memoryview, size: int, lookup: Callable[[str], Base | None] | None
              ) -> Base | None:
    from .stream import read_info
    info = read_info(lambda off, n: mv[off: off + n], size)
    if info.base_digest is None or lookup is None:
        return None
    return lookup(info.base_digest)


class CodedSource:
    """A link's PayloadSource of a coded upload, seen as its decoded payload: what the
    streaming fold reads (``read``, ``size``; no ``view``/``readinto``, so the fold
    makes one read per 16 MiB window, and each such read decodes exactly one window).
    The wire bytes are read once and their digest kept (:attr:`wire_digest`); the fold
    reports the digest of the bytes it folded, which :meth:`digest_for` turns into the
    wire digest when they are the payload the stream says it holds (its content digest),
    so the reply's reference (digest over the wire bytes) is checked as for a raw
    upload. Memory: the compressed upload plus one decoded window at a time."""

    view = None
    readinto = None

    def __init__(self, src, *, lookup_base: Callable[[str], Base | None] | None,
                 max_size: int) -> None:
        self._src = src
        wire = src.read(0, src.size)
        if len(wire) != src.size:
            raise PayloadError(f"short read of an encoded payload: {len(wire)} of {src.size}")
        self.wire_digest = hash_segments([wire])
        mv = memoryview(wire)
        self._dec = Decoder(lambda off, n: mv[off: off + n], src.size, max_size=max_size,
                            base=_base_for(mv, src.size, lookup_base))
        self.size = self._dec.size
        self.content_digest = self._dec.info.content_digest
        self._cached = self._dec.reader()

    def read(self, off: int, n: int):
        w = self._dec.info.window
        if off % w == 0 and n == min(w, self.size - off):  # the fold's window reads
            return self._dec.decode_window(off // w)
        return self._cached(off, n)

    def digest_for(self, folded: str) -> str:
        # lossless/delta: what was folded must be the payload the stream names (a check
        # against codec bugs: the decoded bytes are a function of the verified wire
        # bytes, read once into memory). q8 decodes to another payload than the one the
        # client encoded (its content digest), by design.
        if folded == self.content_digest or self._dec.info.codec == Q8:
            return self.wire_digest
        return folded

    def close(self) -> None:
        close = getattr(self._src, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def coded_source(src, *, lookup_base: Callable[[str], Base | None] | None, max_size: int):
    """``src`` itself for a raw upload, else a :class:`CodedSource` over it (which
    closes ``src`` when closed; ``src`` is closed here if the stream is refused)."""
    if not peek_encoded(src.read, src.size):
        return src
    try:
        return CodedSource(src, lookup_base=lookup_base, max_size=max_size)
    except BaseException:
        close = getattr(src, "close", None)
        if close is not None:
            close()
        raise


class ServerBases:
    """The raw payloads the server sent, by publication name, as bases of the replies'
    deltas (thread-safe: replies are decoded in parallel)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Base] = {}
        self._lock = threading.Lock()

    def add(self, name: str, payload: EncodedPayload) -> None:
        with self._lock:
            self._by_name[name] = Base.from_payload(payload)

    def drop(self, name: str) -> None:
        with self._lock:
            self._by_name.pop(name, None)

    def lookup(self, digest: str) -> Base | None:
        with self._lock:
            for b in self._by_name.values():
                if b.digest == digest:
                    return b
        return None

    def clear(self) -> None:
        with self._lock:
            self._by_name.clear()

    def __len__(self) -> int:
        return len(self._by_name)


def pick_base(bases: dict[str, Base], key: str) -> Base | None:
    """The base of reply record ``key``: the received record of the same key, else the
    only one received."""
    if key in bases:
        return bases[key]
    if len(bases) == 1:
        return next(iter(bases.values()))
    return None


def load_feedback(state: RecordDict | None) -> ErrorFeedback:
    """The q8 residuals kept in a ClientApp's ``context.state`` (empty if none)."""
    fb = ErrorFeedback()
    rec = state.get(FEEDBACK_STATE_KEY) if state is not None else None
    if isinstance(rec, ArrayRecord):
        for name, arr in rec.items():
            try:
                v = np.frombuffer(arr.data, dtype="<f4")
            except (TypeError, ValueError):
                continue
            if arr.dtype == "float32" and arr.stype == "ftx.residual":
                fb.residual(name, len(v))[:] = v
    return fb


def save_feedback(state: RecordDict | None, fb: ErrorFeedback) -> None:
    """Store the q8 residuals in ``context.state`` for the next round of this run."""
    if state is None:
        return
    rec = ArrayRecord()
    for name, r in fb.items():
        rec[name] = Array(dtype="float32", shape=(len(r),), stype="ftx.residual",
                          data=r.astype("<f4").tobytes())
    state[FEEDBACK_STATE_KEY] = rec


__all__ = [
    "FEEDBACK_STATE_KEY", "CodedSource", "ServerBases", "check_codec", "coded_source",
    "decode_delta", "decode_from_wire", "downlink_codec",
    "encode_for_wire", "load_feedback", "peek_encoded", "pick_base", "save_feedback",
]

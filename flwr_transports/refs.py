"""In-band records that stand in for offloaded payloads, and their validation.

Two records travel through Flower instead of the payload:

* a **reference**: an ArrayRecord holding ONE Array named ``REF_ARRAY`` whose ``stype``
  is a sentence telling the reader to add ``flwr_transports.payload_mod`` (so a
  ClientApp without the mod fails with that sentence, e.g. from
  ``ArrayRecord.to_numpy_ndarrays()``), and whose data is a small JSON document:
  ``{"v", "scheme", "loc", "size", "digest", "n_arrays"}`` plus, for replies,
  ``"ticket"``, ``"slot"`` and ``"key"``;
* a **ticket**: a ConfigRecord under ``TICKET_KEY`` in each outgoing message, scoped to
  (run, round, node, message type), with upload *slots* (one per large reply record)
  that the link prepared, the size cap and the in-band threshold.

Everything parsed here comes from the network: sizes are bounded, types checked,
unknown fields ignored, and nothing is trusted before validation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord

from .codec import CODEC_VERSION
from .errors import RejectedInput
from .limits import loads_bounded

REF_ARRAY = "__flwr_transports_ref__"
REF_STYPE = (
    "flwr_transports.ref: this ArrayRecord was offloaded by flwr-transports; add "
    "flwr_transports.payload_mod as the FIRST mod of your ClientApp: "
    "ClientApp(mods=[payload_mod])"
)
TICKET_KEY = "flwr_transports.ticket"
MAX_REF_BYTES = 64 * 1024
MAX_TICKET_BYTES = 4 * MAX_REF_BYTES
#: nesting depth of references, tickets and slot descriptors (ours use <= 5)
MAX_REF_DEPTH = 8
#: upload slots one ticket may carry (the server issues at most 64)
MAX_TICKET_SLOTS = 64
#: largest payload any reference or ticket may declare (1 TiB)
MAX_PAYLOAD_SIZE = 1 << 40
_DIGEST_RE = re.compile(r"^sha256t:[0-9a-f]{64}$")
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]{0,15}$")


class RefError(RejectedInput):
    """A reference or ticket that is malformed or not acceptable."""


@dataclass
class DeltaRef:
    """A downlink delta offered next to a full model (``Reference.delta``): the same
    model coded ``delta`` against a *base* the client may hold from the last phase
    (see docs/codecs.md). ``digest``/``size``: of the delta's bytes on the wire;
    ``base``: the raw payload digest of the base; ``base_loc``: where the base was
    published (a kept base is bound to the run and that location). The decoded model
    must be the reference's ``raw_digest``."""

    loc: dict[str, Any]
    size: int
    digest: str
    base: str
    base_loc: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"loc": self.loc, "size": self.size, "digest": self.digest,
                "base": self.base, "base_loc": self.base_loc}

    @classmethod
    def from_dict(cls, d: Any) -> DeltaRef:
        if not isinstance(d, dict):
            raise RefError("reference has a malformed delta (not an object)")
        loc, size, digest, base, bloc = (d.get("loc"), d.get("size"), d.get("digest"),
                                         d.get("base"), d.get("base_loc"))
        if not (isinstance(loc, dict) and isinstance(bloc, dict)):
            raise RefError("reference delta has no location or base location")
        if not (isinstance(size, int) and not isinstance(size, bool)
                and 0 <= size <= MAX_PAYLOAD_SIZE):
            raise RefError(f"reference delta has an invalid size {str(size)[:40]!r}")
        for v in (digest, base):
            if not (isinstance(v, str) and _DIGEST_RE.match(v)):
                raise RefError("reference delta has an invalid digest (want sha256t:<64 hex>)")
        return cls(loc=loc, size=size, digest=digest, base=base, base_loc=bloc)


@dataclass
class Reference:
    scheme: str
    loc: dict[str, Any]
    size: int
    digest: str
    n_arrays: int = 0
    ticket: str | None = None  # replies only
    slot: int | None = None  # replies only
    key: str | None = None  # replies only: record key in the reply content
    keep: bool = False  # the server sends this payload again next phase: clients may keep it
    #: "raw", or the codec of an encoded stream (flwr_transports.codecs): how to decode it
    codec: str = "raw"
    #: a coded payload's decoded (raw) payload: its digest and size (what a client keeps
    #: it under, and what a downlink delta must decode to); None for a raw payload
    raw_digest: str | None = None
    raw_size: int | None = None
    #: the same model as a delta against a base the client may hold (downlink delta)
    delta: DeltaRef | None = None
    v: int = CODEC_VERSION

    def to_json(self) -> bytes:
        d = {
            "v": self.v, "scheme": self.scheme, "loc": self.loc, "size": self.size,
            "digest": self.digest, "n_arrays": self.n_arrays,
        }
        if self.ticket is not None:
            d.update(ticket=self.ticket, slot=self.slot, key=self.key)
        if self.keep:
            d["keep"] = True
        if self.codec != "raw":
            d["codec"] = self.codec
        if self.raw_digest is not None:
            d["raw"] = {"digest": self.raw_digest, "size": self.raw_size}
        if self.delta is not None:
            d["delta"] = self.delta.to_dict()
        return json.dumps(d, separators=(",", ":")).encode()

    def to_record(self) -> ArrayRecord:
        data = self.to_json()
        rec = ArrayRecord()
        rec[REF_ARRAY] = Array(dtype="uint8", shape=(len(data),), stype=REF_STYPE, data=data)
        return rec

    @classmethod
    def from_json(cls, raw: bytes) -> Reference:
        d = loads_bounded(raw, what="reference", max_bytes=MAX_REF_BYTES,
                          max_depth=MAX_REF_DEPTH, max_items=4096, error=RefError)
        if not isinstance(d, dict):
            raise RefError("reference is not a JSON object")
        v = d.get("v")
        if v != CODEC_VERSION:
            raise RefError(
                f"reference has codec version {v!r}; this flwr-transports understands "
                f"{CODEC_VERSION} (upgrade flwr-transports on both sides)"
            )
        scheme, loc, size, digest = d.get("scheme"), d.get("loc"), d.get("size"), d.get("digest")
        if not (isinstance(scheme, str) and _SCHEME_RE.match(scheme)):
            raise RefError(f"reference has an invalid scheme {scheme!r}")
        if not isinstance(loc, dict):
            raise RefError("reference has no location")
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise RefError(f"reference has an invalid size {size!r}")
        if not (isinstance(digest, str) and _DIGEST_RE.match(digest)):
            raise RefError("reference has an invalid digest (want sha256t:<64 hex>)")
        if size > MAX_PAYLOAD_SIZE:
            raise RefError(f"reference declares {size} bytes (limit {MAX_PAYLOAD_SIZE})")
        n = d.get("n_arrays", 0)
        ref = cls(scheme=scheme, loc=loc, size=size, digest=digest,
                  n_arrays=n if isinstance(n, int) and 0 <= n <= 2**31 else 0,
                  keep=d.get("keep") is True)
        codec = d.get("codec", "raw")
        from .codecs.stream import CODECS
        if not (isinstance(codec, str) and codec in CODECS):
            raise RefError(f"reference names payload codec {str(codec)[:20]!r}, which this "
                           f"flwr-transports does not know ({', '.join(CODECS)}): upgrade it")
        ref.codec = codec
        raw = d.get("raw")
        if raw is not None:
            rd, rs = (raw.get("digest"), raw.get("size")) if isinstance(raw, dict) else (0, 0)
            if not (isinstance(rd, str) and _DIGEST_RE.match(rd) and isinstance(rs, int)
                    and not isinstance(rs, bool) and 0 <= rs <= MAX_PAYLOAD_SIZE):
                raise RefError("reference has a malformed raw payload digest/size")
            if codec == "raw" and (rd, rs) != (digest, size):
                raise RefError("reference names a raw payload and another raw digest/size")
            ref.raw_digest, ref.raw_size = rd, rs
        if d.get("delta") is not None:
            if ref.raw_digest is None:
                raise RefError("reference offers a delta without the digest of the model")
            ref.delta = DeltaRef.from_dict(d["delta"])
        if "ticket" in d:
            t, s, k = d.get("ticket"), d.get("slot"), d.get("key")
            if not (isinstance(t, str) and len(t) <= 128):
                raise RefError("reference has an invalid ticket id")
            if not (isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1024):
                raise RefError("reference has an invalid slot")
            if not (isinstance(k, str) and len(k) <= 1024):
                raise RefError("reference has an invalid key")
            ref.ticket, ref.slot, ref.key = t, s, k
        return ref


def is_ref_record(rec: object) -> bool:
    return isinstance(rec, ArrayRecord) and REF_ARRAY in rec and len(rec) == 1


def parse_ref_record(rec: ArrayRecord) -> Reference:
    arr = rec[REF_ARRAY]
    if arr.stype != REF_STYPE:
        raise RefError("reference array has an unexpected stype")
    if not isinstance(arr.data, bytes):
        raise RefError("reference array carries no bytes")
    return Reference.from_json(arr.data)


@dataclass
class Ticket:
    """Server-issued permission to upload a reply payload."""

    id: str
    scheme: str
    run: int
    round: int
    node: int
    msg_type: str
    max_size: int
    threshold: int
    slots: list[dict[str, Any]] = field(default_factory=list)
    #: streaming aggregation: the metric whose value the client states in its payload
    weight_key: str | None = None
    #: the payload codec the client encodes its reply with (flwr_transports.codecs)
    codec: str = "raw"
    used: set[int] = field(default_factory=set)  # server-side only

    def to_record(self) -> ConfigRecord:
        doc = {
            "v": CODEC_VERSION, "id": self.id, "scheme": self.scheme, "run": self.run,
            "round": self.round, "node": self.node, "msg_type": self.msg_type,
            "max_size": self.max_size, "threshold": self.threshold, "slots": self.slots,
        }
        if self.weight_key is not None:
            doc["weight_key"] = self.weight_key
        if self.codec != "raw":
            doc["codec"] = self.codec
        return ConfigRecord({"ticket": json.dumps(doc, separators=(",", ":"))})

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> Ticket:
        if not isinstance(rec, ConfigRecord):
            raise RefError("ticket is not a ConfigRecord")
        raw = rec.get("ticket")
        if not isinstance(raw, str):
            raise RefError("ticket record is missing")
        d = loads_bounded(raw, what="ticket", max_bytes=MAX_TICKET_BYTES,
                          max_depth=MAX_REF_DEPTH, max_items=16384, error=RefError)
        if not isinstance(d, dict):
            raise RefError("ticket is not a JSON object")
        if d.get("v") != CODEC_VERSION:
            raise RefError(f"ticket has codec version {d.get('v')!r}, expected {CODEC_VERSION}")
        try:
            t = cls(
                id=_str(d["id"], 128), scheme=_str(d["scheme"], 16), run=_int(d["run"]),
                round=_int(d["round"]), node=_int(d["node"]), msg_type=_str(d["msg_type"], 64),
                max_size=_int(d["max_size"], MAX_PAYLOAD_SIZE),
                threshold=_int(d["threshold"], MAX_PAYLOAD_SIZE),
                slots=d["slots"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RefError(f"malformed ticket: {str(exc)[:200]}") from None
        if not (isinstance(t.slots, list) and len(t.slots) <= MAX_TICKET_SLOTS
                and all(isinstance(s, dict) for s in t.slots)):
            raise RefError(f"malformed ticket slots (a list of at most {MAX_TICKET_SLOTS} "
                           "objects)")
        if not _SCHEME_RE.match(t.scheme):
            raise RefError(f"ticket has an invalid scheme {t.scheme[:20]!r}")
        wk = d.get("weight_key")
        if wk is not None and not (isinstance(wk, str) and 0 < len(wk) <= 256):
            raise RefError("malformed ticket weight_key")
        t.weight_key = wk
        codec = d.get("codec", "raw")
        from .codecs.stream import CODECS
        if not (isinstance(codec, str) and codec in CODECS):
            raise RefError(f"ticket asks for payload codec {str(codec)[:20]!r}, which this "
                           f"flwr-transports does not know ({', '.join(CODECS)}): upgrade "
                           "flwr-transports on this client")
        t.codec = codec
        return t


def _int(v: Any, hi: int = 2**64 - 1) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi):
        raise ValueError(f"expected an integer between 0 and {hi}, got {str(v)[:40]!r}")
    return v


def _str(v: Any, max_len: int) -> str:
    if not (isinstance(v, str) and len(v) <= max_len):
        raise ValueError(f"expected a string of at most {max_len} characters")
    return v


def check_reply_ref(
    ref: Reference,
    *,
    tickets: dict[str, Ticket],
    src_node: int,
    server_round: int,
    msg_type: str,
    record_key: str,
    scheme: str,
) -> Ticket:
    """Validate a reply reference against the tickets the server issued.

    Runs BEFORE anything is fetched. Returns the ticket; raises RefError naming the
    first violated rule.
    """
    if ref.ticket is None:
        raise RefError("reply reference carries no ticket (not issued by this server)")
    ticket = tickets.get(ref.ticket)
    if ticket is None:
        raise RefError(f"reply reference names ticket {ref.ticket[:16]!r} that this server never issued")
    if ticket.node != src_node:
        raise RefError(
            f"reply from node {src_node} uses a ticket issued to node {ticket.node}"
        )
    if ticket.round != server_round or ticket.msg_type != msg_type:
        raise RefError(
            f"reply for round {server_round} ({msg_type}) uses a ticket for round "
            f"{ticket.round} ({ticket.msg_type})"
        )
    if ref.scheme != scheme or ref.scheme != ticket.scheme:
        raise RefError(f"reply reference uses scheme {ref.scheme!r}, this run uses {scheme!r}")
    if ref.key != record_key:
        raise RefError(
            f"reply reference was made for record {ref.key!r} but sits at {record_key!r}"
        )
    if ref.slot is None or not 0 <= ref.slot < len(ticket.slots):
        raise RefError(f"reply reference uses slot {ref.slot!r}, not issued")
    if ref.slot in ticket.used:
        raise RefError(f"reply reference reuses slot {ref.slot} of its ticket (replay)")
    if ref.size > ticket.max_size:
        raise RefError(
            f"reply payload declares {ref.size} bytes, above the cap of {ticket.max_size} "
            "(raise it with offload(..., max_reply_size=...))"
        )
    return ticket

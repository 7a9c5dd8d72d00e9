"""``payload_mod``: the client-side half of ``offload``.

Put it FIRST in the ClientApp's mods: ``ClientApp(mods=[payload_mod])``. Before the
user's function runs it replaces every payload reference in the message by the
ArrayRecord it points to (digest verified); after, it uploads every large
ArrayRecord of the reply with the server's ticket and puts a reference in its place.
Clients need no configuration: the scheme and location come with the message.

What a server's message may make the client touch is checked first against a
client policy (:mod:`flwr_transports.policy`): allowed schemes, hosts, ports, file
roots, maximum payload; link-local and cloud metadata addresses refused. Configure
it with an instance, ``ClientApp(mods=[PayloadMod(hosts=["store.example.org"],
file_roots=["/shared/ftx"])])``, or with environment variables; ``payload_mod`` is
the default instance (environment settings, else safe defaults).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flwr.app import ArrayRecord, Context, Message, RecordDict

from ..aggregation.layout import WEIGHT_META
from ..codec import EncodedPayload, decode, encode
from ..codecs.wire import (
    decode_delta,
    decode_from_wire,
    encode_for_wire,
    load_feedback,
    pick_base,
    save_feedback,
)
from ..errors import FlwrTransportsError
from ..links import client_link, network_scheme
from ..policy import ClientPolicy
from ..refs import TICKET_KEY, Reference, RefError, Ticket, is_ref_record, parse_ref_record
from ..trace import message_fields, record, span
from .cache import PayloadCache, binding, resolve_setting, sweep_host

log = logging.getLogger("flwr_transports")

def resolve_message(msg: Message, policy: ClientPolicy | None = None, *,
                    cache: PayloadCache | None = None,
                    bases: dict[str, Any] | None = None) -> Ticket | None:
    """Fetch every referenced payload of ``msg`` in place; return the ticket, if any.

    Every reference is checked against ``policy`` (default: from the environment)
    before its link opens anything. With a ``cache``
    (:mod:`flwr_transports.flower.cache`), a payload kept from an earlier message is
    read from there, and one the server marks ``keep`` is kept. An encoded payload
    (``codec`` in the reference, :mod:`flwr_transports.codecs`) is decoded, its
    decoded size within the policy's ``max_payload``; ``bases`` (record key -> base)
    receives what was decoded, the base of a delta/q8 reply."""
    content = msg.content
    if TICKET_KEY not in content and not any(is_ref_record(r) for r in content.values()):
        return None
    fields = message_fields(msg)
    policy = policy or ClientPolicy.build()
    ticket = None
    if TICKET_KEY in content:  # first: its codec says whether replies need a base
        ticket = Ticket.from_record(content[TICKET_KEY])
        policy.check_scheme(ticket.scheme)
        for slot in ticket.slots:
            policy.check_location(ticket.scheme, slot, upload=True)
    want_base = ticket is not None and ticket.codec in ("delta", "q8")
    new = RecordDict()
    for key, rec in content.items():
        if key == TICKET_KEY:
            continue
        if is_ref_record(rec):
            ref = parse_ref_record(rec)
            if ref.ticket is not None:
                raise RefError("a server message carries a reply reference; refused")
            rec, base = _resolve_ref(ref, msg, policy, cache, fields, want_base)
            if bases is not None and base is not None:
                bases[key] = base
        new[key] = rec
    msg.content = new
    return ticket


def _resolve_ref(ref: Reference, msg: Message, policy: ClientPolicy,
                 cache: PayloadCache | None, fields: dict[str, Any], want_base: bool = False
                 ) -> tuple[ArrayRecord, Any]:
    """One server reference -> (its ArrayRecord, its raw payload as a Base or None).

    Every size and location (the full model's, and a downlink delta's) is checked
    against the policy first; the decoded size is bounded by ``max_payload``. On a
    network link with a cache: the model itself if kept (evaluate -> train), else the
    downlink delta if this node kept the base it names (bound to this run and the
    location the base was published at), else the full model. Any failure of the delta
    (base missing or unreadable, fetch, decode, a base or model digest that misses the
    reference) falls back to the full model, logged: the full model is then checked
    against its own digest, so a fallback never accepts a model the reference does not
    name. What the server marks ``keep`` is kept for the next phase."""
    policy.check_size(ref.size)
    if ref.raw_size is not None:
        policy.check_size(ref.raw_size)  # bounds the DECODED size as well
    loc = policy.check_location(ref.scheme, ref.loc, upload=False)
    dloc = None
    if ref.delta is not None:
        policy.check_size(ref.delta.size)
        dloc = policy.check_location(ref.scheme, ref.delta.loc, upload=False)
    kept = cache is not None and network_scheme(ref.scheme)
    coded = ref.codec != "raw"
    model_digest = ref.raw_digest or ref.digest  # what the decoded model must hash to
    model_size = ref.raw_size if ref.raw_digest is not None else ref.size
    rec = base = None
    if kept:  # bound to this run and the exact location the server published
        bind = binding(msg.metadata.run_id, ref.scheme, ref.loc)
        t0 = time.time()
        rec = cache.take(model_size, model_digest, bind, again=ref.keep)
        if rec is not None:  # a miss is not a fetch: only hits are traced
            record("fetch", t0, time.time(), role="client", scheme=ref.scheme,
                   bytes=model_size, cached=True, **fields)
            if want_base:
                base = _base_of(rec, model_digest)  # the base of a delta/q8 reply
            return rec, base
        if ref.delta is not None and dloc is not None:
            got = _fetch_delta(ref, dloc, msg, policy, cache, fields)
            if got is not None:
                rec, base = got
    if rec is None:
        # the model the reference names (what is kept, what deltas decode against)
        verify = kept and coded and ref.raw_digest is not None
        link = client_link(ref.scheme)
        with span("fetch", role="client", scheme=ref.scheme, bytes=ref.size,
                  **fields), link.open(loc, ref.size) as src:
            if coded:
                rec, base = decode_from_wire(src.read, ref.size, ref.digest,
                                             max_size=policy.max_payload, with_base=True,
                                             content=ref.raw_digest if verify else None)
            else:
                rec = decode(src.read, ref.size, ref.digest)
    if kept and ref.keep:  # written while the app runs
        if base is not None and ref.raw_digest is not None:  # verified against it above
            cache.keep_payload(_payload_of(base, len(rec)), bind)  # as is: no re-encode
        elif not coded:
            cache.keep(rec, ref.size, ref.digest, bind)
    elif kept and ref.raw_digest is not None:  # coded, not kept: nothing is needed again
        cache.discard()  # (a delta run's last phase; a base that was not used goes too)
    return rec, base


def _fetch_delta(ref: Reference, dloc: Any, msg: Message, policy: ClientPolicy,
                 cache: PayloadCache, fields: dict[str, Any]) -> tuple[ArrayRecord, Any] | None:
    """The model decoded from the reference's downlink delta against the base this node
    kept, or None (no such base here, or the delta failed: logged, the caller fetches
    the full model)."""
    d = ref.delta
    bind = binding(msg.metadata.run_id, ref.scheme, d.base_loc)

    def decode_against(base):
        with span("fetch", role="client", scheme=ref.scheme, bytes=d.size, delta=True,
                  **fields), client_link(ref.scheme).open(dloc, d.size) as src:
            return decode_delta(src.read, d.size, d.digest, base=base,
                                content=ref.raw_digest, content_size=ref.raw_size,
                                max_size=policy.max_payload)

    try:
        return cache.use_base(d.base, bind, policy.max_payload, decode_against)
    except (FlwrTransportsError, OSError) as exc:
        log.warning("flwr-transports: downlink delta not used (%s); fetching the full model",
                    exc)
        return None


def _base_of(rec: ArrayRecord, digest: str):
    """``rec``'s raw payload as a Base when it encodes to exactly ``digest``, else None."""
    from ..codecs.stream import Base

    p = encode(rec)
    return Base.from_payload(p) if p.digest == digest else None


def _payload_of(base: Any, n_arrays: int) -> EncodedPayload:
    segs = list(base.segments)
    return EncodedPayload(segments=segs, size=base.size, digest=base.digest,
                          n_arrays=n_arrays)


def claimed_weight(content: RecordDict, key: str | None) -> dict[str, str] | None:
    """Payload metadata stating the reply's aggregation weight, for a server that
    aggregates while uploads land (it checks the claim against the in-band reply).
    The weight is read as Flower's FedAvg reads it: ``key`` in the first MetricRecord."""
    if not key:
        return None
    mrs = list(content.metric_records.values())
    w = mrs[0].get(key) if mrs else None
    if isinstance(w, bool) or not isinstance(w, int | float):
        return None
    return {WEIGHT_META: json.dumps(w)}


def offload_reply(reply: Message, ticket: Ticket, policy: ClientPolicy | None = None, *,
                  trace_fields: dict[str, Any] | None = None,
                  bases: dict[str, Any] | None = None, state: RecordDict | None = None
                  ) -> None:
    """Upload the reply's large ArrayRecords with ``ticket``; references replace them.
    ``trace_fields``: round/phase for the trace (:mod:`flwr_transports.trace`), taken
    from the instruction (default: what the reply itself says). With a codec in the
    ticket: ``bases`` are the payloads received (:func:`resolve_message`), ``state`` the
    ClientApp's ``context.state`` (q8 keeps its residuals there between rounds)."""
    if not reply.has_content():
        return
    fields = message_fields(reply) if trace_fields is None else trace_fields
    policy = policy or ClientPolicy.build()
    content = reply.content
    meta = claimed_weight(content, ticket.weight_key)
    feedback = load_feedback(state) if ticket.codec == "q8" else None
    slot = 0
    new = RecordDict()
    for key, rec in content.items():
        if (isinstance(rec, ArrayRecord) and not is_ref_record(rec)
                and rec.count_bytes() >= ticket.threshold):
            if slot >= len(ticket.slots):
                log.warning("flwr-transports: more large reply records than upload slots; "
                            "%r stays in-band", key)
            else:
                with span("upload", role="client", scheme=ticket.scheme, **fields) as tr:
                    loc, payload, codec = _upload_one(key, rec, meta, ticket, slot, policy,
                                                      pick_base(bases or {}, key), feedback)
                    tr["bytes"] = payload.size
                rec = Reference(
                    scheme=ticket.scheme, loc=loc, size=payload.size, digest=payload.digest,
                    n_arrays=payload.n_arrays, ticket=ticket.id, slot=slot, key=key,
                    codec=codec,
                ).to_record()
                slot += 1
        new[key] = rec
    reply.content = new
    if feedback is not None:
        save_feedback(state, feedback)


def _upload_one(key: str, rec: ArrayRecord, meta: dict[str, str] | None, ticket: Ticket,
                slot: int, policy: ClientPolicy, base: Any = None, feedback: Any = None
                ) -> tuple[Any, Any, str]:
    """Encode one reply record (with the ticket's codec) and upload it into the
    ticket's ``slot``: (location, payload on the wire, its codec)."""
    payload = encode(rec, meta)
    if payload.size > ticket.max_size:  # the cap bounds the DECODED size
        raise RefError(
            f"reply record {key!r} is {payload.size} bytes, above the server's cap "
            f"of {ticket.max_size} (server: offload(..., max_reply_size=...))"
        )
    payload, codec = encode_for_wire(payload, ticket.codec, base=base, feedback=feedback)
    issued = ticket.slots[slot]
    checked = policy.check_location(ticket.scheme, issued, upload=True)
    loc = client_link(ticket.scheme).upload(checked, payload)
    if checked is not issued and isinstance(loc, dict) and "host" in loc:
        loc = {**loc, "host": issued.get("host")}  # the name the server issued
    return loc, payload, codec


def _node_id(ctx: Context) -> int | str:
    node = getattr(ctx, "node_id", 0)
    return node if isinstance(node, int) and not isinstance(node, bool) else 0


class PayloadMod:
    """ClientApp mod resolving offloaded payloads, with a client policy.

    Settings (each ``None`` = the environment variable, else the default; see
    :mod:`flwr_transports.policy`): ``schemes`` (allowed link schemes), ``hosts``
    (names, ``*.suffix`` patterns, addresses, networks), ``ports`` (ints or
    ``"9000-9100"``), ``file_roots`` (directories file:// payloads may live in),
    ``max_payload`` (bytes or ``"8GiB"``), ``allow_link_local`` (link-local and cloud
    metadata addresses), ``max_wait`` (seconds a server may make this client wait for a
    payload to appear; default 900). A refused reference fails the message with an error
    naming the setting to change. ``cache``: where to keep a payload the server will
    send again (evaluate -> next train round) instead of fetching it twice over a
    network link: a directory, ``False``/``"off"``, or None (``FLWR_TRANSPORTS_CACHE``,
    else a private directory under the system's temp dir); see
    :mod:`flwr_transports.flower.cache`.
    """

    def __init__(self, *, schemes: Any = None, hosts: Any = None, ports: Any = None,
                 file_roots: Any = None, max_payload: Any = None,
                 allow_link_local: bool | None = None, max_wait: Any = None,
                 cache: Any = None) -> None:
        self.settings = {"schemes": schemes, "hosts": hosts, "ports": ports,
                         "file_roots": file_roots, "max_payload": max_payload,
                         "allow_link_local": allow_link_local, "max_wait": max_wait}
        self.cache = cache
        self.policy()  # fail fast on invalid settings
        self._swept = False

    def policy(self) -> ClientPolicy:
        """The effective policy (environment read now: it may change between runs)."""
        return ClientPolicy.build(**self.settings)

    def __call__(self, msg: Message, ctx: Context, call_next) -> Message:
        policy = self.policy()
        fields = message_fields(msg)  # round/phase, for the trace (when it is on)
        cache_dir = resolve_setting(self.cache)
        if cache_dir and not self._swept:  # stale payloads of every node of this host
            self._swept = True
            sweep_host(cache_dir)
        cache = PayloadCache(cache_dir, _node_id(ctx)) if cache_dir else None
        bases: dict[str, Any] = {}  # payloads received: the bases of a delta/q8 reply
        try:
            ticket = (resolve_message(msg, policy, cache=cache, bases=bases)
                      if msg.has_content() else None)
            with span("app", role="client", **fields):
                reply = call_next(msg, ctx)
            if ticket is not None:
                offload_reply(reply, ticket, policy, trace_fields=fields, bases=bases,
                              state=getattr(ctx, "state", None))
        finally:
            if cache is not None:
                cache.wait()  # a payload being kept is complete before the reply leaves
        return reply

    def __repr__(self) -> str:
        set_ = ", ".join(f"{k}={v!r}" for k, v in {**self.settings, "cache": self.cache}.items()
                         if v is not None)
        return f"PayloadMod({set_})"


#: the default instance: environment settings, else safe defaults
payload_mod = PayloadMod()

"""``payload_mod``: the client-side half of ``offload``.

Put it FIRST in the ClientApp's mods: ``ClientApp(mods=[payload_mod])``. Before the
user's function runs it replaces every payload reference in the message by the
ArrayRecord it points to (digest verified); after, it uploads every large
ArrayRecord of the reply with the server's ticket and puts a reference in its place.
Clients need no configuration: the scheme and location come with the message.
"""

from __future__ import annotations

import json
import logging
import os

from flwr.app import ArrayRecord, Context, Message, RecordDict

from ..aggregation.layout import WEIGHT_META
from ..codec import decode, encode, parse_size
from ..links import client_link
from ..refs import TICKET_KEY, Reference, RefError, Ticket, is_ref_record, parse_ref_record

log = logging.getLogger("flwr_transports")

#: Largest payload a client agrees to fetch (override with FLWR_TRANSPORTS_MAX_PAYLOAD).
DEFAULT_CLIENT_MAX = 64 * 2**30


def _client_max() -> int:
    return parse_size(os.environ.get("FLWR_TRANSPORTS_MAX_PAYLOAD", DEFAULT_CLIENT_MAX))


def resolve_message(msg: Message) -> Ticket | None:
    """Fetch every referenced payload of ``msg`` in place; return the ticket, if any."""
    content = msg.content
    if TICKET_KEY not in content and not any(is_ref_record(r) for r in content.values()):
        return None
    ticket = None
    new = RecordDict()
    limit = _client_max()
    for key, rec in content.items():
        if key == TICKET_KEY:
            ticket = Ticket.from_record(rec)
            continue
        if is_ref_record(rec):
            ref = parse_ref_record(rec)
            if ref.ticket is not None:
                raise RefError("a server message carries a reply reference; refused")
            if ref.size > limit:
                raise RefError(
                    f"payload of {ref.size} bytes exceeds this client's limit of {limit} "
                    "(set FLWR_TRANSPORTS_MAX_PAYLOAD to raise it)"
                )
            link = client_link(ref.scheme)
            with link.open(ref.loc, ref.size) as src:
                rec = decode(src.read, ref.size, ref.digest)
        new[key] = rec
    msg.content = new
    return ticket


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


def offload_reply(reply: Message, ticket: Ticket) -> None:
    """Upload the reply's large ArrayRecords with ``ticket``; references replace them."""
    if not reply.has_content():
        return
    content = reply.content
    meta = claimed_weight(content, ticket.weight_key)
    slot = 0
    new = RecordDict()
    for key, rec in content.items():
        if (isinstance(rec, ArrayRecord) and not is_ref_record(rec)
                and rec.count_bytes() >= ticket.threshold):
            if slot >= len(ticket.slots):
                log.warning("flwr-transports: more large reply records than upload slots; "
                            "%r stays in-band", key)
            else:
                payload = encode(rec, meta)
                if payload.size > ticket.max_size:
                    raise RefError(
                        f"reply record {key!r} is {payload.size} bytes, above the server's cap "
                        f"of {ticket.max_size} (server: offload(..., max_reply_size=...))"
                    )
                loc = client_link(ticket.scheme).upload(ticket.slots[slot], payload)
                rec = Reference(
                    scheme=ticket.scheme, loc=loc, size=payload.size, digest=payload.digest,
                    n_arrays=payload.n_arrays, ticket=ticket.id, slot=slot, key=key,
                ).to_record()
                slot += 1
        new[key] = rec
    reply.content = new


def payload_mod(msg: Message, ctx: Context, call_next) -> Message:
    """ClientApp mod resolving offloaded payloads (see module docstring)."""
    ticket = resolve_message(msg) if msg.has_content() else None
    reply = call_next(msg, ctx)
    if ticket is not None:
        offload_reply(reply, ticket)
    return reply

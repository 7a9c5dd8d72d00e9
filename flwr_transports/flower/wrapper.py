"""``offload(strategy, transport)``: move large ArrayRecords out of band for any strategy.

Outgoing (``configure_train`` / ``configure_evaluate``): every ArrayRecord at or above
``threshold`` bytes is encoded ONCE per distinct record object (FedAvg shares one
RecordDict across all nodes), published on the link, and replaced in each message by
a small reference record. Each message also gets a ticket scoped to (run, round,
node, message type) with upload slots for the reply.

Incoming (``aggregate_train`` / ``aggregate_evaluate``): every reference in a reply is
validated against the issued tickets BEFORE anything is fetched, its digest verified
AFTER, and only then the inner strategy sees a normal ArrayRecord. A reply that fails
any check is replaced by an error reply (as Flower does for failed ClientApps) and
the round goes on.

Everything the run created on the link is removed when ``start()`` returns or raises.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result

from .. import trace
from ..aggregation.choice import streaming_decision
from ..aggregation.layout import OWNED_STYPE
from ..aggregation.round import RoundStream, expected_layout
from ..aggregation.train import streaming_aggregate_train
from ..codec import check_digest, decode, encode, record_bytes
from ..codecs.downlink import DownlinkDeltas, delta_name
from ..codecs.wire import (
    ServerBases,
    check_codec,
    coded_source,
    decode_from_wire,
    downlink_codec,
    encode_for_wire,
)
from ..errors import RejectedInput
from ..links import LinkError, ServerLink, network_scheme, server_link
from ..links import parse as parse_transport
from ..links.base import NAME_PREFIX
from ..options import Option, TransportSpec, choice, integer, optional, size, text
from ..refs import (
    TICKET_KEY,
    DeltaRef,
    Reference,
    RefError,
    Ticket,
    check_reply_ref,
    is_ref_record,
    parse_ref_record,
)
from ..settings import raw as raw_setting
from .receive import polls_replies, receive
from .stats import OffloadStats

log = logging.getLogger("flwr_transports")

#: Error code of replies the wrapper rejected (ASCII "FT")
REJECTED_REPLY_CODE = 0x4654
DEFAULT_THRESHOLD = 1024 * 1024
MIN_REPLY_CAP = 64 * 1024 * 1024
# a payload held from the last evaluate phase is handed out again only while this young
# (links' references can expire: s3 presigned URLs live an hour by default)
REUSE_MAX_AGE = 600.0
#: the wrapper's own options (URL query or offload keywords); the link declares the rest
WRAPPER_OPTIONS = (
    Option("threshold", size(0), DEFAULT_THRESHOLD, "ArrayRecords of at least this many bytes "
           "go over the link; smaller ones stay in-band (small models never get slower)", shown="1MiB"),
    Option("max_reply_size", optional(size(1)), None, "cap on one reply payload, checked before "
           "fetching; with a codec, on its bytes on the wire and on its decoded size "
           "(default: max(4x the largest outgoing payload, 64 MiB))", shown="auto"),
    Option("reply_slots", integer(0, 64), 2, "large reply records a client may offload per "
           "message (0: replies stay in-band)"),
    Option("fetch_workers", integer(1, 64), 4, "replies whose payloads are fetched, verified "
           "and decoded at the same time in aggregate_* (references are still checked "
           "against their tickets one by one)"),
    Option("codec", check_codec, "raw", "raw, lossless, delta or q8: how payloads are coded on "
           "the link (docs/codecs.md). lossless: byte planes + zstd, exact; delta: replies "
           "as the XOR with the model sent, exact; q8: replies as int8 updates with error "
           "feedback, LOSSY (changes the arithmetic). Clients follow the ticket"),
    Option("aggregation", choice("auto", "streaming", "inner", "ray"), "auto", "auto, "
           "streaming, inner or ray: fold training replies into one running weighted sum as "
           "they land on the link (weighted-mean strategies; auto picks it where it applies), "
           "hand the inner strategy every decoded reply, or (s3://) have Ray actors fold "
           "shards of the model straight from the store (offload() only; see "
           "docs/aggregation.md)"),
    Option("ray_address", optional(text), None, "aggregation=ray: the Ray cluster (default: "
           "RAY_ADDRESS, the Ray of Flower's Simulation runtime, else a local one)"),
    Option("ray_shards", integer(0, 1024), 0, "aggregation=ray: shard actors (0: half the "
           "cluster's CPUs, at least 2, at most one per 16 MiB of model)", shown="auto"),
    Option("ray_model", choice("store", "server"), "store", "aggregation=ray: store: the "
           "shard owners write each round's model to the store as one multipart upload, "
           "which is handed out as the next model (the ServerApp never holds it during "
           "rounds); server: it is assembled in the ServerApp (docs/aggregation.md)"),
    Option("final_model", choice("server", "store"), "server", "aggregation=ray, "
           "ray_model=store: server: Result.arrays is the final model, read back once; "
           "store: the last model is copied in the store (server-side, no bytes through "
           "the ServerApp) to final_key and Result.arrays is a reference to it "
           "(flwr_transports.load_model reads it)"),
    Option("final_key", optional(text), None, "final_model=store: the object key of the "
           "final model (default: <prefix>/final/<run>.ftx; never under the run's ftx- "
           "keys, which are removed)"),
)


#: options about aggregating replies: offload(strategy) only (offload_grid refuses them)
STRATEGY_ONLY_OPTIONS = frozenset({"aggregation", "ray_address", "ray_shards", "ray_model",
                                   "final_model", "final_key"})


#: what one reply can legitimately cause while it is checked, fetched and decoded
EXPECTED_REPLY_ERRORS: tuple[type[BaseException], ...] = (
    RejectedInput, LinkError, OSError, MemoryError)
#: env var: when set (the test suite's conftest sets it), an exception of any OTHER type
#: while handling one reply is re-raised (a bug must fail the test) instead of rejecting
#: only that reply, which is what production does so one node can never end the run
STRICT_ENV = "FLWR_TRANSPORTS_STRICT"


def guard_reply(fn: Callable[..., Any], *args: Any) -> Any:
    """THE rule for one reply, in one place: run ``fn(*args)`` (a check, fetch or decode
    of ONE reply's payload) and return its result, or the exception it raised, which
    the caller turns into a rejected reply (code ``REJECTED_REPLY_CODE``, logged with
    the node id and reason) while the round goes on. Expected failures (rejected
    input, link errors, I/O errors, memory) are returned as is; any other exception
    is a bug: re-raised under ``FLWR_TRANSPORTS_STRICT=1`` (tests), logged with its
    traceback and returned otherwise."""
    try:
        return fn(*args)
    except EXPECTED_REPLY_ERRORS as exc:
        return exc
    except Exception as exc:
        if (raw_setting(STRICT_ENV) or "0") != "0":
            raise
        log.exception("flwr-transports: unexpected %s while handling a reply (a bug, "
                      "please report it); the reply is rejected", type(exc).__name__)
        return exc


@dataclass(frozen=True)
class Published:
    """One payload the wrapper published, under one name, for as long as it is there."""

    digest: str  # of the raw payload (what a held payload is matched by for reuse)
    loc: Any  # the link's location descriptor
    n_arrays: int
    at: float  # time.monotonic() of the publish
    wire_size: int  # bytes on the link (after the downlink codec)
    wire_digest: str
    wire_codec: str
    raw_size: int = 0  # of the raw payload (digest)
    delta: DeltaRef | None = None  # its downlink delta, published as delta_name(name)


@dataclass(frozen=True)
class _OwnedSize:
    """What the publish path reads of a payload the shard owners wrote."""

    size: int
    n_arrays: int


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class Offloader:
    """The offloading machinery, shared by :func:`offload` (a strategy wrapper) and
    :func:`offload_grid` (a Grid wrapper): ONE implementation of publishing, tickets,
    reference checks, fetching, cleanup and statistics."""

    #: rounds follow each other (Strategy.start): a new round retires older ones
    _sequential_rounds = True
    #: aggregation=ray: the run's Ray cluster and shard actors (OffloadStrategy sets it)
    _ray = None
    #: downlink deltas may be offered (codec delta/q8, network link): only a round loop
    #: that knows its length (offload(strategy)); a wrapped Grid never offers one
    #: (docs/codecs.md, "Not with offload_grid")
    _downlink_deltas = True

    def __init__(self, transport: str | TransportSpec = "inband", **options: Any):
        if isinstance(transport, TransportSpec):  # parsed already (a second wrapper)
            if options:
                raise TypeError("options come with the parsed TransportSpec")
            spec = transport
        else:  # parsed ONCE: the wrapper keeps its keys, the link gets the rest (typed)
            spec = parse_transport(transport, WRAPPER_OPTIONS, **options)
        self.spec = spec
        self.transport = spec.url
        self.scheme = spec.scheme
        self.link_options = spec.link
        opts = spec.wrapper
        if spec.given:
            log.info("flwr-transports: %s options: %s", spec.url, spec.describe())
        self.options = opts
        self.threshold = opts.threshold
        self.max_reply_size = opts.max_reply_size
        self.reply_slots = opts.reply_slots
        self.fetch_workers = opts.fetch_workers
        self.aggregation = opts.aggregation
        self.codec = opts.codec
        self._bases = ServerBases()  # raw payloads sent: the bases of delta/q8 replies
        # delta/q8 on a network link: the model clients kept, for downlink deltas
        self._downlink = (DownlinkDeltas() if self._downlink_deltas
                          and self.codec in ("delta", "q8")
                          and network_scheme(self.scheme) else None)
        self.streaming = False  # decided by OffloadStrategy, which knows the strategy
        self._streams: dict[int, RoundStream] = {}
        self.link: ServerLink | None = None
        self._tickets: dict[str, Ticket] = {}
        self._published: dict[tuple[int, str], list[str]] = {}
        # name -> what is published now under that name
        self._pub_info: dict[str, Published] = {}
        # payloads of the last evaluate phase, kept until the next phase is prepared: the
        # next train round sends the same global model, which then is not uploaded again
        self._held: list[str] = []
        #: aggregation=ray, ray_model=store: name -> (the stub record Flower's loop holds,
        #: the publication the shard owners wrote; aggregation/ray_publish.py)
        self._owned: dict[str, tuple[ArrayRecord, Published]] = {}
        self._num_rounds: int | None = None  # known to OffloadStrategy.start
        self._largest_out = 0
        self.stats = OffloadStats()  # typed: flower/stats.py declares every entry

    def close(self) -> None:
        """Remove everything this run created on the link (idempotent)."""
        if self._ray is not None:  # aggregation=ray: no shard actor outlives the run
            self._ray.close()
        if self.link is not None:
            try:
                self.link.close()
            finally:
                self.link = None
        self._tickets.clear()
        self._published.clear()
        self._streams.clear()
        self._pub_info.clear()
        self._owned.clear()
        self._held.clear()
        self._bases.clear()
        if self._downlink is not None:
            self._downlink.clear()
        if self.scheme:
            s = self.stats
            log.info(
                "flwr-transports summary: in-band %s sent / %s received; %s %s sent / "
                "%s received; %d replies rejected",
                _mib(s["inband_bytes_sent"]), _mib(s["inband_bytes_received"]), self.scheme,
                _mib(s["link_bytes_sent"]), _mib(s["link_bytes_received"]),
                s["replies_rejected"],
            )

    def _ensure_link(self, grid: Grid) -> ServerLink:
        if self.link is None:
            try:
                run_id = grid.run.run_id
            except Exception:  # noqa: BLE001 - grid without a run (tests, custom grids)
                run_id = 0
            # the transport was parsed once (wrapper keys taken out): used as given
            self.link = server_link(self.spec, run_id)
        return self.link

    # -- outgoing ------------------------------------------------------------------
    def _prepare(self, messages: Iterable[Message], server_round: int, phase: str,
                 grid: Grid) -> list[Message]:
        messages = list(messages)
        if self.scheme is None:
            for m in messages:
                self.stats["inband_bytes_sent"] += record_bytes(m.content)
            return messages
        link = self._ensure_link(grid)
        self._release(server_round, phase)
        held, self._held = self._held, []
        now = time.monotonic()
        max_age = min(REUSE_MAX_AGE, link.reuse_max_age or REUSE_MAX_AGE)
        reusable = {}  # digest -> name of a held payload still fit to hand out
        for n in held:
            info = self._pub_info.get(n)
            if info and now - info.at < max_age and not self._publish_failed(link, n):
                if info.delta is not None and link.publish_failed(delta_name(n)):
                    # its downlink delta never reached the store: handed out again, every
                    # client holding the base would wait for it (the server's `wait`)
                    log.warning("flwr-transports: the downlink delta of %r failed to "
                                "publish; %r is reused without it", n, n)
                    link.release(delta_name(n))
                    self._pub_info[n] = info = replace(info, delta=None)
                reusable.setdefault(info.digest, n)
        # id(original record) -> (its reference record, bytes it puts on the link)
        refs: dict[int, tuple[ArrayRecord, int]] = {}
        names = self._published.setdefault((server_round, phase), [])
        try:
            self._prepare_records(messages, link, server_round, phase, refs, names, reusable)
        finally:
            for n in held:  # what was not reused goes now
                if n not in names:
                    self._release_name(n)
        if self._downlink is not None:  # the model clients now keep: the next delta's base
            self._downlink.end_phase(self._sent_again(server_round, phase))
        return messages

    def _prepare_records(self, messages: list[Message], link: ServerLink, server_round: int,
                         phase: str, refs: dict[int, tuple[ArrayRecord, int]],
                         names: list[str],
                         reusable: dict[str, str]) -> None:
        for m in messages:
            content = m.content
            new = RecordDict()
            for key, rec in content.items():
                owned = self._owned_of(rec)
                if isinstance(rec, ArrayRecord) and not is_ref_record(rec) and (
                    owned is not None or rec.count_bytes() >= self.threshold
                ):
                    got = refs.get(id(rec))
                    if got is None and owned is not None:  # written by the shard owners
                        t0 = time.perf_counter()
                        name, pub = owned
                        pub = replace(pub, loc=link.published_loc(name, pub.raw_size))
                        payload = _OwnedSize(pub.raw_size, pub.n_arrays)
                        reused = True
                    elif got is None:
                        t0 = time.perf_counter()
                        payload = encode(rec)
                        name = reusable.pop(payload.digest, None)
                        reused = name is not None
                        if reused:  # the same bytes are published already
                            pub = self._pub_info[name]
                            self.stats["link_publishes_reused"] += 1
                        else:
                            for n in list(reusable.values()):  # free them before uploading
                                self._release_name(n)
                            reusable.clear()
                            name = f"r{server_round}-{phase}-{len(names)}"
                            wire, wire_codec = encode_for_wire(payload,
                                                               downlink_codec(self.codec))
                            loc = link.publish(name, wire)
                            delta = (self._downlink.offer(link, name, loc, payload, wire.size,
                                                          self.stats)
                                     if self._downlink is not None else None)
                            pub = self._pub_info[name] = Published(
                                digest=payload.digest, loc=loc, n_arrays=payload.n_arrays,
                                at=time.monotonic(), wire_size=wire.size,
                                wire_digest=wire.digest, wire_codec=wire_codec,
                                raw_size=payload.size, delta=delta)
                            del wire
                            if self.codec in ("delta", "q8"):  # the base of the replies
                                self._bases.add(name, payload)
                            self.stats["link_publishes"] += 1
                        if owned is None:  # (the shard owners' model lives by itself)
                            names.append(name)
                    if got is None:
                        dt = time.perf_counter() - t0
                        trace.record("publish", time.time() - dt, time.time(), role="server",
                                     round=server_round, phase=phase, bytes=pub.wire_size,
                                     scheme=self.scheme, reused=reused)
                        self.stats["link_seconds_put"] += dt
                        self._largest_out = max(self._largest_out, payload.size)
                        got = refs[id(rec)] = (Reference(
                            scheme=self.scheme, loc=pub.loc, size=pub.wire_size,
                            digest=pub.wire_digest, n_arrays=payload.n_arrays,
                            keep=self._sent_again(server_round, phase), codec=pub.wire_codec,
                            raw_digest=pub.digest if pub.wire_codec != "raw" or pub.delta
                            else None,
                            raw_size=pub.raw_size if pub.wire_codec != "raw" or pub.delta
                            else None,
                            delta=pub.delta,
                        ).to_record(), pub.wire_size)
                        log.info("flwr-transports: round %d %s: published %r (%s, %d arrays) "
                                 "on %s:// in %.2fs", server_round, phase, key,
                                 _mib(pub.wire_size), payload.n_arrays, self.scheme, dt)
                    ref_rec, sent = got
                    self.stats["link_bytes_sent"] += sent
                    new[key] = ref_rec
                else:
                    new[key] = rec
            if self.reply_slots:
                new[TICKET_KEY] = self._issue_ticket(link, m, server_round, phase).to_record()
            m.content = new
            self.stats["inband_bytes_sent"] += record_bytes(new)

    def _owned_of(self, rec: Any) -> tuple[str, Published] | None:
        """``(name, publication)`` when ``rec`` is the stub of a model the shard owners
        wrote (aggregation=ray, ray_model=store), else None. A stub that is not (or no
        longer) registered is an error: it has no data to send."""
        if not isinstance(rec, ArrayRecord) or not rec or not all(
                a.stype == OWNED_STYPE for a in rec.values()):
            if isinstance(rec, ArrayRecord) and any(a.stype == OWNED_STYPE
                                                    for a in rec.values()):
                raise RuntimeError("flwr-transports: an ArrayRecord mixes arrays of a model "
                                   "the Ray shard owners wrote (no data here) with others")
            return None
        for name, (stub, pub) in self._owned.items():
            if stub is rec or (list(stub.keys()) == list(rec.keys()) and all(
                    x is y for x, y in zip(stub.values(), rec.values(), strict=True))):
                return name, pub
        raise RuntimeError("flwr-transports: this ArrayRecord stands for a model the Ray "
                           "shard owners wrote to the store, which is gone (only the latest "
                           "one is kept); it has no data to send")

    def _reply_cap(self) -> int:
        """The cap on one reply payload (on its wire size and, coded, its decoded size)."""
        return self.max_reply_size or max(4 * self._largest_out, MIN_REPLY_CAP)

    def _issue_ticket(self, link: ServerLink, msg: Message, server_round: int,
                      phase: str) -> Ticket:
        node = msg.metadata.dst_node_id
        cap = self._reply_cap()
        tid = secrets.token_hex(16)
        slots = [
            link.issue_slot(f"r{server_round}-{phase}-n{node}-s{i}-{tid[:8]}", cap)
            for i in range(self.reply_slots)
        ]
        t = Ticket(id=tid, scheme=self.scheme, run=int(msg.metadata.run_id), round=server_round,
                   node=node, msg_type=phase, max_size=cap, threshold=self.threshold,
                   slots=slots, codec=self.codec)
        if self.streaming and phase == "train":
            t.weight_key = self.inner.weighted_by_key
            stream = self._streams.get(server_round)
            if stream is None:  # folds only uploads laid out like the model sent
                stream = self._streams[server_round] = self._new_stream(
                    server_round, expected_layout(msg.content))
            for i, slot in enumerate(slots):  # fold each upload as soon as it lands
                fold = functools.partial(stream.on_landed, (tid, i))
                if self.codec != "raw":  # fold the decoded payload, window by window
                    fold = functools.partial(_fold_coded, fold, self._bases.lookup, cap)
                link.on_upload(slot, fold)
        self._tickets[tid] = t
        return t

    def _new_stream(self, server_round: int, expected: tuple | None):
        if self._ray is not None:  # aggregation=ray (aggregation/ray_shards.py)
            from ..aggregation.ray_shards import RayRoundStream

            return RayRoundStream(server_round, expected, self._ray)
        return RoundStream(server_round, expected)

    def _release(self, server_round: int, phase: str, hold: bool = False) -> None:
        """Remove payloads published for (round, phase) and everything older. ``hold``:
        keep this phase's own payloads until the next phase is prepared (reused there
        when that phase sends the same bytes, else released then)."""
        if self.link is None:
            return
        for key in [k for k in self._published if k == (server_round, phase)
                    or (self._sequential_rounds and k[0] < server_round)]:
            for name in self._published.pop(key):
                if hold and key == (server_round, phase):
                    self._held.append(name)
                else:
                    self._release_name(name)

    def _release_name(self, name: str) -> None:
        info = self._pub_info.pop(name, None)
        self._bases.drop(name)
        if self.link is not None:
            self.link.release(name)
            if info is not None and info.delta is not None:
                self.link.release(delta_name(name))

    def _publish_failed(self, link: ServerLink, name: str) -> bool:
        """Whether the publish of ``name`` failed after ``publish`` returned (a
        background upload): then it is never handed out again (published anew)."""
        exc = link.publish_failed(name)
        if exc is not None:
            log.error("flwr-transports: the publish of %r failed (%s); it is not reused, "
                      "the payload is published again", name, exc)
        return exc is not None

    def _sent_again(self, server_round: int, phase: str) -> bool:
        """Whether this phase's outgoing payload will go out again next phase: an
        evaluate phase's global model is the next train round's, when there is one
        (only a round loop that knows its length can say; clients may then keep it,
        which is worth it for network links only). With a downlink delta
        (``self._downlink``) every phase but the last evaluate is kept: the next model
        is sent as a delta against it."""
        if self._num_rounds is None or not network_scheme(self.scheme):
            return False
        if phase == "evaluate":
            return server_round < self._num_rounds
        return self._downlink is not None and phase == "train"

    # -- incoming ------------------------------------------------------------------
    def _resolve(self, replies: Iterable[Message], server_round: int, phase: str,
                 finish: bool = True) -> list[Message]:
        """Turn the replies' payload references back into ArrayRecords.

        References are checked against the tickets one reply after another (so a slot
        claimed twice is caught), then the payloads are fetched and decoded
        concurrently (up to ``fetch_workers`` at a time; hashing and file/socket reads
        release the GIL), which takes the decode of N replies off the round's critical
        path. A reply whose payload fails any check becomes an error reply.
        """
        replies = list(replies)
        with trace.span("resolve", role="server", round=server_round, phase=phase,
                        replies=len(replies)):
            claims, failed = self._claim_all(replies, server_round, phase)
            out = self._fetch_all(replies, claims, failed)
        if finish:
            self._finish_phase(server_round, phase)
        return out

    def _claim_all(self, replies: list[Message], server_round: int, phase: str
                   ) -> tuple[dict[int, list[tuple[str, Any, dict]]], dict[int, Exception]]:
        """Check every reply's references against the tickets, one reply after another."""
        claims: dict[int, list[tuple[str, Any, dict]]] = {}
        failed: dict[int, Exception] = {}
        for k, msg in enumerate(replies):
            if not msg.has_content():
                continue
            self.stats["inband_bytes_received"] += record_bytes(msg.content)
            got = guard_reply(self._claim, msg, server_round, phase)
            if isinstance(got, BaseException):
                failed[k] = got
            else:
                claims[k] = got
        return claims, failed

    def _fetch_all(self, replies: list[Message], claims: dict, failed: dict[int, Exception]
                   ) -> list[Message]:
        """Fetch, verify and decode the claimed payloads (concurrently, up to
        ``fetch_workers``); failed replies become rejected replies."""
        jobs = [(k, key, ref, slot) for k, cl in claims.items() for key, ref, slot in cl]
        results: dict[tuple[int, str], Any] = {}
        if len(jobs) > 1 and self.fetch_workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self.fetch_workers, len(jobs)),
                                    thread_name_prefix="ftx-fetch") as ex:
                futs = {(k, key): ex.submit(guard_reply, self._fetch, ref, slot)
                        for k, key, ref, slot in jobs}
                for kk, fut in futs.items():
                    results[kk] = fut.result()
        else:
            for k, key, ref, slot in jobs:
                results[(k, key)] = guard_reply(self._fetch, ref, slot)
        out: list[Message] = []
        for k, msg in enumerate(replies):
            exc = failed.get(k)
            for key, ref, _slot in claims.get(k, ()):
                got = results[(k, key)]
                if isinstance(got, Exception):
                    exc = exc or got
                    continue
                arrays, seconds = got
                self.stats["link_seconds_get"] += seconds
                self.stats["link_bytes_received"] += ref.size
                msg.content[key] = arrays
            if exc is None:
                out.append(msg)
                continue
            out.append(self._rejected(msg, exc))
        return out

    def _rejected(self, msg: Message, exc: BaseException) -> Message:
        """The rejected reply (code REJECTED_REPLY_CODE) that replaces ``msg``, logged."""
        self.stats["replies_rejected"] += 1
        reason = (f"flwr-transports rejected the reply payload of node "
                  f"{msg.metadata.src_node_id}: {exc}")
        log.warning(reason)
        return Message(metadata=msg.metadata, error=Error(code=REJECTED_REPLY_CODE, reason=reason))

    def _finish_phase(self, server_round: int, phase: str) -> None:
        """This phase's tickets are spent: remove unused slots, forget the tickets (and
        those of older rounds), release what was published for it, end its streams."""
        if phase == "train":
            for r in [r for r in self._streams if r <= server_round]:
                self._streams.pop(r).close()
        if self.link is not None:
            for tid, t in list(self._tickets.items()):
                if (t.round, t.msg_type) == (server_round, phase) or (
                        self._sequential_rounds and t.round < server_round):
                    del self._tickets[tid]  # forgotten even if a discard fails
                    for slot in t.slots:
                        guard_reply(self.link.discard_slot, slot)
            # an evaluate phase sends the global model the next train round sends again
            self._release(server_round, phase, hold=phase == "evaluate")

    def _claim(self, msg: Message, server_round: int, phase: str) -> list[tuple[str, Any, dict]]:
        """Check every payload reference of a reply against its ticket (serially)."""
        claims = []
        for key, rec in list(msg.content.items()):
            if not is_ref_record(rec):
                continue
            if self.link is None:
                raise RefError("reply carries a payload reference but this run is in-band")
            ref = parse_ref_record(rec)
            ticket = check_reply_ref(
                ref, tickets=self._tickets, src_node=msg.metadata.src_node_id,
                server_round=server_round, msg_type=phase, record_key=key, scheme=self.scheme,
            )
            ticket.used.add(ref.slot)
            claims.append((key, ref, ticket.slots[ref.slot]))
        return claims

    def _fetch(self, ref, slot: dict) -> tuple[ArrayRecord, float]:
        """Open, verify and decode one uploaded payload (thread-safe per slot)."""
        t0 = time.perf_counter()
        try:
            with self.link.open_upload(slot, ref.loc, ref.size) as src:
                pre = src.predecoded
                if ref.codec != "raw":
                    if self.codec == "raw":
                        raise RefError(f"reply payload is coded {ref.codec!r}; this run "
                                       "offered no codec")
                    # an encoded reply: digest over the wire bytes, decoded size within
                    # the reply cap, delta/q8 against the model this server sent
                    arrays = decode_from_wire(src.read, ref.size, ref.digest,
                                              lookup_base=self._bases.lookup,
                                              max_size=self._reply_cap())
                elif pre is not None:  # the link decoded it on arrival (tcp://)
                    arrays, got = pre()
                    check_digest(got, ref.digest)
                else:
                    arrays = decode(src.read, ref.size, ref.digest)
        finally:
            self.link.discard_slot(slot)
        return arrays, time.perf_counter() - t0


class _FoldHost:
    """What streaming aggregation gets from the wrapper for one training phase (the
    narrow interface :class:`~flwr_transports.aggregation.train.FoldHost`)."""

    def __init__(self, wrapper: OffloadStrategy, server_round: int):
        self._w, self._round = wrapper, server_round
        self.inner = wrapper._trainer

    def claim_all(self, replies):
        return self._w._claim_all(replies, self._round, "train")

    def resolve(self, replies):
        return self._w._resolve(replies, self._round, "train")

    def open_upload(self, slot, loc, size):
        src = self._w.link.open_upload(slot, loc, size)
        if self._w.codec == "raw":
            return src
        return coded_source(src, lookup_base=self._w._bases.lookup,  # decoded, windowed
                            max_size=self._w._reply_cap())

    def reject(self, msg, exc):
        return self._w._rejected(msg, exc)

    def report(self, **counters):
        stats = self._w.stats
        for k, v in counters.items():
            if isinstance(v, list):
                stats[k].extend(v)
            else:
                stats[k] += v

    def finish(self):
        self._w._finish_phase(self._round, "train")


class OffloadStrategy(Offloader, Strategy):
    """Wraps a Message-API strategy; see :func:`offload`."""

    def __init__(self, strategy: Strategy, transport: str = "inband", **options: Any):
        if not isinstance(strategy, Strategy):
            raise TypeError(
                "offload() wraps a Message-API strategy (flwr.serverapp.strategy.Strategy), "
                f"got {type(strategy).__name__}"
            )
        if isinstance(strategy, OffloadStrategy):
            raise TypeError("strategy is already wrapped by offload()")
        self.inner = strategy
        #: the strategy training rounds call (aggregation=ray may run its server step on
        #: the shard owners: aggregation/ray_step.py)
        self._trainer = strategy
        super().__init__(transport, **options)
        self.streaming, why = streaming_decision(strategy, self.aggregation)
        if self.streaming and self.scheme is None:
            self.streaming, why = False, "inner: transport inband (no link to stream from)"
        if self.streaming and self.aggregation == "ray":
            if self.scheme not in ("s3", "file"):
                why = (f"{why}; not on Ray: aggregation=ray folds s3:// and file:// "
                       f"uploads only (streaming in the ServerApp instead)")
            else:
                from ..aggregation.ray_shards import RayCluster, import_ray
                from ..aggregation.ray_step import shard_trainer

                import_ray()  # the install hint now, not in round 1
                self._ray = RayCluster(self.options.ray_address, self.options.ray_shards)
                self._trainer, step_why = shard_trainer(strategy, self._ray)
                why = f"{why}; sharded over Ray actors (aggregation=ray){step_why}"
                if self.options.ray_model == "store" and self.scheme == "s3":
                    self._ray.sink = _OwnerSink(self)
                elif self.scheme == "file":  # (ray_model=store writes s3 multipart parts)
                    why = (f"{why}; file://: the owners read the uploads from the shared "
                           "filesystem, the next model is assembled in the ServerApp")
        if self.options.final_model == "store" and (
                self._ray is None or self._ray.sink is None
                or getattr(self.link_options, "encrypt", False)):
            raise ValueError(
                "flwr-transports: final_model=store needs an s3:// transport with "
                "aggregation=ray and ray_model=store (the shard owners' model is what is "
                "kept) and no encrypt=true (the object's key would have to leave the run); "
                "leave final_model out to get the model in Result.arrays")
        fk = self.options.final_key
        if fk is not None and (not fk or fk.startswith("/") or any(
                c.startswith(NAME_PREFIX) for c in fk.split("/"))):
            raise ValueError(f"flwr-transports: final_key={fk!r}: give a key relative to "
                             f"the bucket, none of whose path parts starts with "
                             f"{NAME_PREFIX!r} (the run's own keys, removed when it ends)")
        if self.scheme is not None:
            log.info("flwr-transports: aggregation %s", why)

    # -- delegation ----------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally: expose the inner strategy's
        # (fraction_train, weighted_by_key, ...) so code that inspects it still works.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def summary(self) -> None:
        self.inner.summary()
        log.info("flwr-transports: payloads >= %s go over %s", _mib(self.threshold),
                 self.transport if self.scheme else "Flower (inband)")

    # -- run lifecycle -------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        if type(self.inner).start is not Strategy.start:
            # a strategy with its own round loop: offload at the grid, same machinery
            with _StrategyGrid(grid, self.spec) as ogrid:
                self.stats = ogrid.stats
                return self.inner.start(
                    ogrid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                    train_config=train_config, evaluate_config=evaluate_config,
                    evaluate_fn=evaluate_fn,
                )
        self._num_rounds = num_rounds
        from ..stored import is_stored_ref

        if is_stored_ref(initial_arrays):  # a model kept in the store: published from there
            if self._ray is not None and self._ray.sink is not None:
                self._ray.sink.evaluate_fn = evaluate_fn is not None
            try:
                initial_arrays = self._adopt_initial(initial_arrays, grid)
            except BaseException:
                self.close()
                raise
        if self.scheme is not None and polls_replies(grid):
            grid = _ReceiveGrid(grid, self)  # our receive loop; the inner strategy sees grid
        if self._ray is not None and self._ray.sink is not None:
            self._ray.sink.evaluate_fn = evaluate_fn is not None
        try:
            result = Strategy.start(
                self, grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                train_config=train_config, evaluate_config=evaluate_config,
                evaluate_fn=evaluate_fn,
            )
            owned = self._owned_of(result.arrays)
            if owned is not None and self.options.final_model == "store":
                result.arrays = self._keep_final(*owned)  # copied in the store
            elif owned is not None:  # the shard owners' last model: read once, verified
                result.arrays = self._materialise(*owned)
            elif self.options.final_model == "store":
                log.warning("flwr-transports: final_model=store: the last model was "
                            "assembled in the ServerApp (see the log line why), not "
                            "written by the shard owners: Result.arrays holds it, nothing "
                            "is kept in the store")
            return result
        finally:
            self.close()

    def _adopt_initial(self, ref: ArrayRecord, grid: Grid) -> ArrayRecord:
        """``initial_arrays`` is a stored-model reference (a ``final_model=store`` run's
        ``Result.arrays``): the object is checked (HEAD: size), copied inside the store
        into this run's keys and published like a model the shard owners wrote; Flower's
        loop gets its stub (names, dtypes, shapes from the payload's header, a ranged
        read). Clients verify every byte against the reference's digest."""
        from flwr.app import Array

        from ..aggregation.layout import NPY_STYPE
        from ..codec import read_header
        from ..stored import StoredModelError, parse_stored_ref

        d = parse_stored_ref(ref)
        sink = self._ray.sink if self._ray is not None else None
        why = ""
        if sink is None or getattr(self.link_options, "encrypt", False):
            why = ("it needs an s3:// transport with aggregation=ray and ray_model=store, "
                   "without encrypt=true")
        elif self._trainer is not self.inner:
            why = (f"{type(self.inner).__name__}'s server step on the shard owners starts "
                   "from the model's bytes")
        elif self._ensure_link(grid) is None or not sink.usable(0, d["size"], mean=True):
            why = "the shard owners would not write the next model (logged above)"
        if why:
            raise StoredModelError(f"flwr-transports: initial_arrays is a stored-model "
                                   f"reference, which this run cannot start from: {why}; "
                                   f"pass flwr_transports.load_model(url, ref) instead")
        link = self._ensure_link(grid)
        if d["bucket"] != link.cfg.bucket:
            raise StoredModelError(f"flwr-transports: initial_arrays is in bucket "
                                   f"{d['bucket']!r}, the transport's is {link.cfg.bucket!r}")
        name = "r0-model"
        loc = link.adopt_stored(name, d["key"], d["size"])
        with link.read_published(name, d["size"]) as src:
            head = read_header(src.read, d["size"])
        if len(head.arrays) != d["n_arrays"] or any(e.stype != NPY_STYPE
                                                    for e in head.arrays):
            raise StoredModelError(f"flwr-transports: s3://{d['bucket']}/{d['key']}: its "
                                   f"header does not match the reference ({len(head.arrays)} "
                                   f"arrays, {d['n_arrays']} expected, numpy arrays only)")
        pub = Published(digest=d["digest"], loc=loc, n_arrays=d["n_arrays"],
                        at=time.monotonic(), wire_size=d["size"], wire_digest=d["digest"],
                        wire_codec="raw", raw_size=d["size"])
        stub = ArrayRecord({e.name: Array(dtype=e.dtype, shape=tuple(e.shape),
                                          stype=OWNED_STYPE, data=b"")
                            for e in head.arrays})
        self._owned[name] = (stub, pub)
        log.info("flwr-transports: the initial model (%s) is s3://%s/%s, copied into the "
                 "run in the store", _mib(d["size"]), d["bucket"], d["key"])
        return stub

    def _keep_final(self, name: str, pub: Published) -> ArrayRecord:
        """final_model=store: the shard owners' last object copied (server-side) to a
        key the run's cleanup leaves alone; its reference record (``stored.py``)."""
        from ..stored import stored_ref

        t0 = time.perf_counter()
        key = self.link.keep_published(name, pub.raw_size, self.options.final_key)
        log.info("flwr-transports: the final model (%s) kept in the store as s3://%s/%s "
                 "(copied in %.2fs; flwr_transports.load_model reads it)",
                 _mib(pub.raw_size), self.link.cfg.bucket, key, time.perf_counter() - t0)
        return stored_ref(self.link.cfg.bucket, key, pub.digest, pub.raw_size,
                          pub.n_arrays)

    def _materialise(self, name: str, pub: Published) -> ArrayRecord:
        """The model the shard owners wrote, read from the store (ranged GETs) and
        verified against its digest: ``Result.arrays``."""
        t0 = time.perf_counter()
        with self.link.read_published(name, pub.raw_size) as src:
            arrays = decode(src.read, pub.raw_size, pub.digest)
        log.info("flwr-transports: the final model (%s) read from the store in %.2fs",
                 _mib(pub.raw_size), time.perf_counter() - t0)
        return arrays

    # -- Strategy API --------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        msgs = self._trainer.configure_train(server_round, arrays, config, _outer(grid))
        return self._prepare(msgs, server_round, "train", grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stream = self._streams.get(server_round)
        t0 = time.perf_counter()
        w0 = time.time()
        try:
            if stream is not None:
                return streaming_aggregate_train(_FoldHost(self, server_round), stream,
                                                 server_round, list(replies))
            return self._trainer.aggregate_train(
                server_round, self._resolve(replies, server_round, "train"))
        finally:  # the aggregation tail: last upload landed -> aggregate_train returns
            now = time.perf_counter()
            trace.record("aggregate", w0, time.time(), role="server", round=server_round,
                         phase="train", streaming=stream is not None)
            self.stats["agg_train_s"].append(round(now - t0, 4))  # inside aggregate_train
            landed = self.link.last_landed if self.link is not None else None
            if landed is not None:
                self.stats["agg_tail_s"].append(round(now - landed, 4))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        msgs = self.inner.configure_evaluate(server_round, arrays, config, _outer(grid))
        return self._prepare(msgs, server_round, "evaluate", grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(
            server_round, self._resolve(replies, server_round, "evaluate"))


class _OwnerSink:
    """Where aggregation=ray's shard owners write each round's model
    (aggregation/ray_publish.py): the s3 link's multipart upload, published as a
    stub record the publish path hands out by reference. ``usable`` decides, per round,
    whether it applies (else the ServerApp assembles the model; logged once)."""

    def __init__(self, w: OffloadStrategy):
        self._w = w
        self.evaluate_fn = False
        self._said: set[str] = set()

    def usable(self, server_round: int, size: int, mean: bool = False) -> bool:
        """``mean``: the model is the streamed mean, which the inner strategy's
        ``aggregate_train`` receives: only Flower's FedAvg returns it untouched (a
        strategy that computes on it needs its bytes)."""
        from flwr.serverapp.strategy import FedAvg

        w = self._w
        whys = []
        if self.evaluate_fn:
            whys.append("an evaluate_fn reads the model's arrays every round")
        if mean and type(w.inner).aggregate_train is not FedAvg.aggregate_train:
            whys.append(f"{type(w.inner).__name__}.aggregate_train computes on the mean")
        for meth in ("configure_train", "configure_evaluate"):  # they get the model
            own = getattr(type(w.inner), meth, None)
            if not getattr(own, "__module__", "").startswith("flwr."):
                whys.append(f"{type(w.inner).__name__}.{meth} is the app's own (it may "
                            "read the model's arrays)")
        if w.link is None or not hasattr(w.link, "begin_owned"):
            whys.append("no s3 link")
        elif w.codec != "raw" or w._downlink is not None:
            whys.append(f"codec={w.codec} (the owners write raw payloads)")
        elif size < w.threshold:
            whys.append("the model is below threshold (it goes in-band)")
        why = "; ".join(whys)
        if why:
            if why not in self._said:
                self._said.add(why)
                log.info("flwr-transports: aggregation=ray: the model is assembled in the "
                         "ServerApp, not written to the store by the shard owners: %s", why)
            return False
        return True

    def begin(self, server_round: int, n_parts: int) -> dict:
        return self._w.link.begin_owned(f"r{server_round}-model", n_parts)

    def complete(self, up: dict, etags: list[str], lay, digest: str) -> ArrayRecord:
        from flwr.app import Array

        w = self._w
        t0 = time.perf_counter()
        loc = w.link.complete_owned(up, etags, lay.size)
        pub = Published(digest=digest, loc=loc, n_arrays=len(lay.arrays),
                        at=time.monotonic(), wire_size=lay.size, wire_digest=digest,
                        wire_codec="raw", raw_size=lay.size)
        stub = ArrayRecord({a.name: Array(dtype=a.dtype, shape=tuple(a.shape),
                                          stype=OWNED_STYPE, data=b"")
                            for a in lay.arrays})
        for old in list(w._owned):  # Flower's loop holds the newest model only
            del w._owned[old]
            w.link.release(old)
        w._owned[up["name"]] = (stub, pub)
        w.stats["link_publishes"] += 1
        log.info("flwr-transports: %s: the shard owners wrote the next model (%s, %d parts) "
                 "to the store; completed in %.2fs", up["name"], _mib(lay.size),
                 len(etags), time.perf_counter() - t0)
        return stub

    def abort(self, up: dict) -> None:
        if self._w.link is not None:
            self._w.link.abort_owned(up)


class _GridProxy(Grid):
    """A Grid that hands every call to the grid it wraps (``self.grid``), including the
    wrapped grid's own extras; subclasses override what they change."""

    def __getattr__(self, name: str) -> Any:
        if name == "grid":
            raise AttributeError(name)
        return getattr(self.grid, name)  # the wrapped grid's own extras

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class _ReceiveGrid(_GridProxy):
    """What :class:`OffloadStrategy` hands ``Strategy.start`` when the grid is Flower's
    push-then-poll one: ``send_and_receive`` pushes through the grid and runs offload's
    receive loop (flower/receive.py); everything else is the grid's own. The inner
    strategy is handed the original grid (``_outer``)."""

    def __init__(self, grid: Grid, offloader: Offloader):
        self.grid = grid
        self._off = offloader

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        fields = trace.message_fields(messages[0]) if messages else {}
        ids = list(self.grid.push_messages(messages))
        del messages
        return receive(self.grid, ids, timeout, self._off.link, self._off.stats, fields)


def _fold_coded(fold: Callable[[Any], None], lookup_base, cap: int, src) -> None:
    """A link's landing hook for a coded upload: fold its decoded payload (a refused
    stream is not folded; the reply is then re-read, and rejected, when it arrives)."""
    try:
        landed = getattr(src, "wait", None)  # an upload arriving piece by piece (s3://
        if landed is not None:  # segment=): decoded once all of it landed
            landed(0, src.size)
        s = coded_source(src, lookup_base=lookup_base, max_size=cap)
    except EXPECTED_REPLY_ERRORS as exc:
        log.debug("flwr-transports: a coded upload could not be opened for folding: %s", exc)
        return
    fold(s)  # the link closes src after its hook


def _outer(grid: Grid) -> Grid:
    """The grid the user passed to ``start`` (not offload's receive adapter)."""
    return grid.grid if isinstance(grid, _ReceiveGrid) else grid


def offload(strategy: Strategy, transport: str = "inband", **options: Any) -> OffloadStrategy:
    """Wrap ``strategy`` so large ArrayRecords travel over ``transport``.

    ``transport``: ``"inband"`` (pass-through) or a link URL: ``"shm://"``,
    ``"file:///dir"``, ``"s3://bucket/prefix"``, ``"tcp://host:port"``, ``"rdma://host:port"``.
    Options ride in the URL query string or as keywords: wrapper options
    ``threshold`` (default 1 MiB; records below it stay in-band), ``max_reply_size``
    (cap on a client's reply payload; default max(4x the largest outgoing payload,
    64 MiB)), ``reply_slots`` (large reply records per message, default 2),
    ``fetch_workers`` (replies fetched and decoded at once, default 4),
    ``aggregation`` (``auto`` (default), ``streaming`` or ``inner``: see
    docs/aggregation.md), plus the link's own options (see the docs of each link).

    Wrap it AROUND every strategy wrapper that reads or changes the arrays (Flower's DP
    clipping wrappers, FedProx, FedAdam, ...): they must see decoded arrays, so
    ``offload`` goes outside them. FDA is the one strategy that may also hold it inside:
    ``FDA(offload(FedAvg()))`` and ``offload(FDA(FedAvg()))`` give the same models
    (docs/offload.md, docs/fda.md).
    """
    return OffloadStrategy(strategy, transport, **options)


def _is_mpi_grid(grid: Grid) -> bool:
    """True for the MPI runtime's Grid (only if that module was loaded at all)."""
    import sys

    mod = sys.modules.get("flwr_transports.mpi.grid")
    return mod is not None and isinstance(grid, mod.MpiGrid)


class OffloadGrid(Offloader, _GridProxy):
    """Wraps a ServerApp's Grid so large ArrayRecords travel over a link; see
    :func:`offload_grid`."""

    #: pushes may overlap (async / cyclic apps): a batch retires only when its own
    #: replies are all in, or at a timeout, or at close()
    _sequential_rounds = False
    #: offload_grid() refuses offload()'s ``aggregation`` option (nothing aggregates here)
    _refuse_aggregation = True
    #: no downlink delta: the wrapper cannot tell which push is the last (so it cannot
    #: tell clients when to drop a kept base) nor which model each node holds
    _downlink_deltas = False

    def __init__(self, grid: Grid, transport: str | TransportSpec = "inband", **options: Any):
        if isinstance(grid, OffloadGrid):
            raise TypeError("grid is already wrapped by offload_grid()")
        if not isinstance(grid, Grid):
            raise TypeError(f"offload_grid() wraps a flwr.serverapp.Grid, got "
                            f"{type(grid).__name__}")
        self.grid = grid
        super().__init__(transport, **options)
        given = self.spec.given
        misplaced = sorted(given & STRATEGY_ONLY_OPTIONS) if self._refuse_aggregation else []
        if misplaced:  # parsed, but nothing aggregates in a Grid wrapper
            from ..errors import ConfigError

            names = ", ".join(repr(n) for n in misplaced)
            raise ConfigError(
                f"offload_grid(): {names} apply to offload(strategy, ...) only: a wrapped "
                "Grid hands every reply to your own code, nothing aggregates there. Remove "
                f"them from the transport URL or keywords ({self.transport!r})")
        if self.scheme and _is_mpi_grid(grid):
            log.info("flwr-transports: under the MPI runtime payloads already move as MPI "
                     "buffers; offload_grid(%s) is a pass-through", self.transport)
            self.scheme = None
        self._batch = 0
        self._pending: dict[str, tuple[int, str]] = {}  # message id -> (batch, phase)
        self._open: dict[tuple[int, str], set[str]] = {}  # batch -> ids still awaited

    def __enter__(self) -> OffloadGrid:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- Grid API: offloaded ---------------------------------------------------------
    def _prepare_batch(self, messages: list[Message]) -> tuple[int, list[Message]]:
        """One push = one batch: each distinct large ArrayRecord published once,
        replaced by a reference; each message gets its ticket."""
        self._batch += 1
        batch = self._batch
        by_phase: dict[str, list[Message]] = {}
        for m in messages:
            by_phase.setdefault(m.metadata.message_type, []).append(m)
        out: list[Message] = []
        try:
            for phase, msgs in by_phase.items():
                out += self._prepare(msgs, batch, phase, self.grid)
        except BaseException:
            for phase in by_phase:
                self._finish_phase(batch, phase)
            raise
        return batch, out

    def _resolve_batch(self, replies: list[Message], keys: list[tuple[int, str]]
                       ) -> list[Message]:
        """Check, fetch and verify each reply's payloads (replies keep their order)."""
        groups: dict[tuple[int, str], list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        out: list[Message] = list(replies)
        for (batch, phase), idx in groups.items():
            resolved = self._resolve([replies[i] for i in idx], batch, phase, finish=False)
            for i, msg in zip(idx, resolved, strict=True):
                out[i] = msg
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Offload the messages' large records (see :meth:`_prepare_batch`), push them
        through the wrapped grid; their replies are resolved by :meth:`pull_messages`."""
        messages = list(messages)
        if self.scheme is None:
            for m in messages:
                self.stats["inband_bytes_sent"] += record_bytes(m.content)
            return self.grid.push_messages(messages)
        batch, out = self._prepare_batch(messages)
        try:
            ids = list(self.grid.push_messages(out))
        except BaseException:
            for phase in {m.metadata.message_type for m in out}:
                self._finish_phase(batch, phase)
            raise
        for mid, m in zip(ids, out, strict=True):
            key = (batch, m.metadata.message_type)
            self._pending[mid] = key
            self._open.setdefault(key, set()).add(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies; every payload reference is checked against its ticket,
        fetched and digest-verified, or the reply becomes an error reply (0x4654). A
        batch retires (unused slots removed, its payloads released) when its last reply
        is in."""
        replies = list(self.grid.pull_messages(message_ids))
        if self.scheme is None:
            for r in replies:
                if r.has_content():
                    self.stats["inband_bytes_received"] += record_bytes(r.content)
            return replies
        keys = []
        for r in replies:
            key = self._pending.pop(r.metadata.reply_to_message_id, None)
            if key is None:  # not pushed through this adapter, or retired: no ticket
                key = (0, r.metadata.message_type)
            else:
                self._open.get(key, set()).discard(r.metadata.reply_to_message_id)
            keys.append(key)
        out = self._resolve_batch(replies, keys)
        for key in set(keys):
            if key[0] and key in self._open and not self._open[key]:
                self._retire(*key)
        return out

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Offload, push, wait for the replies, then resolve them. On Flower's own
        deployment grid (which pulls every 3 s) the wait is offload's receive loop
        (flower/receive.py: a pull right after each upload lands on the link, short
        backed-off polls otherwise; Flower's timeout and reply order); any other grid
        does its own push / wait / pull. The batch retires when it returns: a reply
        arriving after ``timeout`` is rejected."""
        messages = list(messages)
        if self.scheme is None:
            for m in messages:
                self.stats["inband_bytes_sent"] += record_bytes(m.content)
            replies = list(self.grid.send_and_receive(messages, timeout=timeout))
            for r in replies:
                if r.has_content():
                    self.stats["inband_bytes_received"] += record_bytes(r.content)
            return replies
        batch, out = self._prepare_batch(messages)
        phases = {m.metadata.message_type for m in out}
        try:
            if polls_replies(self.grid):  # Flower's 3 s poll: our receive loop instead
                fields = trace.message_fields(out[0]) if out else {}
                ids = list(self.grid.push_messages(out))
                replies = receive(self.grid, ids, timeout, self.link, self.stats, fields)
            else:
                replies = list(self.grid.send_and_receive(out, timeout=timeout))
            return self._resolve_batch(
                replies, [(batch if r.metadata.message_type in phases else 0,
                           r.metadata.message_type) for r in replies])
        finally:
            for phase in phases:
                self._retire(batch, phase)

    def _retire(self, batch: int, phase: str) -> None:
        for mid in self._open.pop((batch, phase), set()):
            self._pending.pop(mid, None)
        self._finish_phase(batch, phase)

    def close(self) -> None:
        self._pending.clear()
        self._open.clear()
        super().close()


class _StrategyGrid(OffloadGrid):
    """The grid ``offload(strategy)`` wraps for a strategy with its own round loop: the
    strategy's options (``aggregation`` included, which has no effect there) pass."""

    _refuse_aggregation = False


def offload_grid(grid: Grid, transport: str = "inband", **options: Any) -> OffloadGrid:
    """Wrap a ServerApp's ``grid`` so large ArrayRecords travel over ``transport``.

    For ANY ServerApp: custom ``@app.main()`` loops that call ``send_and_receive``,
    ``push_messages`` / ``pull_messages`` (pulls may be spread over several calls),
    strategies with their own ``start()``, evaluation-only or analytics apps. Every
    pushed message has its large ArrayRecords published once (a record shared by
    several messages is encoded once) and replaced by references plus a ticket; every
    pulled reply is checked against its ticket, fetched and digest-verified, and handed
    back as a normal ArrayRecord, or becomes an error reply (code 0x4654). Same options
    as :func:`offload` except ``aggregation``, ``ray_address`` and ``ray_shards``, which
    are refused (nothing aggregates in a Grid wrapper). Use it as a context manager (or call ``close()``) so the run's
    objects on the link are removed::

        with offload_grid(grid, context.run_config["transport"]) as grid:
            replies = grid.send_and_receive(messages, timeout=600)

    Under the MPI runtime it is a pass-through (payloads already move as MPI buffers).
    The client side is the same ``payload_mod``.
    """
    return OffloadGrid(grid, transport, **options)

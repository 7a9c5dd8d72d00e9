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
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result

from ..aggregation.policy import streaming_decision
from ..aggregation.round import RoundStream
from ..aggregation.train import streaming_aggregate_train
from ..codec import PayloadError, check_digest, decode, encode, parse_size
from ..links import LinkError, ServerLink, link_classes, server_link, split_url
from ..refs import (
    TICKET_KEY,
    Reference,
    RefError,
    Ticket,
    check_reply_ref,
    is_ref_record,
    parse_ref_record,
)

log = logging.getLogger("flwr_transports")

#: Error code of replies the wrapper rejected (ASCII "FT")
REJECTED_REPLY_CODE = 0x4654
DEFAULT_THRESHOLD = 1024 * 1024
MIN_REPLY_CAP = 64 * 1024 * 1024
WRAPPER_OPTIONS = ("threshold", "max_reply_size", "reply_slots", "fetch_workers", "aggregation")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def record_bytes(content: RecordDict) -> int:
    """Approximate in-band size of a RecordDict: array bytes + serialized small records."""
    n = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            n += rec.count_bytes()
        else:
            n += len(rec.deflate())
    return n


class OffloadStrategy(Strategy):
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
        self.transport = (transport or "inband").strip()
        self.scheme = None if self.transport.lower() in {"inband", "in-band", "none", ""} else (
            split_url(self.transport)[0]
        )
        opts: dict[str, Any] = {}
        if self.scheme is not None:
            opts.update(split_url(self.transport)[3])
        opts.update(options)
        self.threshold = parse_size(opts.pop("threshold", DEFAULT_THRESHOLD))
        cap = opts.pop("max_reply_size", None)
        self.max_reply_size = parse_size(cap) if cap is not None else None
        self.reply_slots = int(opts.pop("reply_slots", 2))
        if not 0 <= self.reply_slots <= 64:
            raise ValueError("reply_slots must be between 0 and 64")
        self.fetch_workers = int(opts.pop("fetch_workers", 4))
        if not 1 <= self.fetch_workers <= 64:
            raise ValueError("fetch_workers must be between 1 and 64")
        self.aggregation = str(opts.pop("aggregation", "auto"))
        self.link_options = opts
        if self.scheme is not None:
            srv_cls, _ = link_classes(self.scheme)  # fail fast: unknown scheme / missing dep
            unknown = set(opts) - set(srv_cls.options)
            if unknown:
                raise ValueError(
                    f"unknown option(s) for {self.scheme}:// : {', '.join(sorted(unknown))} "
                    f"(link options: {', '.join(srv_cls.options) or 'none'}; "
                    f"wrapper options: {', '.join(WRAPPER_OPTIONS)})"
                )
        elif opts:
            raise ValueError(f"transport 'inband' takes no link options, got {sorted(opts)}")
        self.streaming, why = streaming_decision(strategy, self.aggregation)
        if self.streaming and self.scheme is None:
            self.streaming, why = False, "inner: transport inband (no link to stream from)"
        log.info("flwr-transports: aggregation %s", why)
        self._streams: dict[int, RoundStream] = {}
        self.link: ServerLink | None = None
        self._tickets: dict[str, Ticket] = {}
        self._published: dict[tuple[int, str], list[str]] = {}
        self._largest_out = 0
        self.stats: dict[str, int | float] = {
            "inband_bytes_sent": 0, "inband_bytes_received": 0,
            "link_bytes_sent": 0, "link_bytes_received": 0,
            "link_seconds_put": 0.0, "link_seconds_get": 0.0,
            "replies_rejected": 0,
            "agg_tail_s": [], "agg_train_s": [], "agg_streamed_rounds": 0, "agg_eager_folds": 0,
            "agg_settle_folds": 0, "agg_rebuilds": 0, "agg_fold_s": [],
        }

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
            raise TypeError(
                f"{type(self.inner).__name__} overrides start(); offload() drives the "
                "standard round loop and cannot wrap a custom one"
            )
        try:
            return Strategy.start(
                self, grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                train_config=train_config, evaluate_config=evaluate_config,
                evaluate_fn=evaluate_fn,
            )
        finally:
            self.close()

    def close(self) -> None:
        """Remove everything this run created on the link (idempotent)."""
        if self.link is not None:
            try:
                self.link.close()
            finally:
                self.link = None
        self._tickets.clear()
        self._published.clear()
        self._streams.clear()
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
            # the link parses the URL query too: give it the URL without the wrapper's
            # own keys (?threshold=..., ?aggregation=...), which it would refuse
            u = urlsplit(self.transport)
            q = [(k, v) for k, v in parse_qsl(u.query, keep_blank_values=True)
                 if k not in WRAPPER_OPTIONS]
            url = urlunsplit(u._replace(query=urlencode(q)))
            self.link = server_link(url, run_id, self.link_options)
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
        refs: dict[int, ArrayRecord] = {}  # id(original record) -> reference record
        names = self._published.setdefault((server_round, phase), [])
        for m in messages:
            content = m.content
            new = RecordDict()
            for key, rec in content.items():
                if isinstance(rec, ArrayRecord) and not is_ref_record(rec) and (
                    rec.count_bytes() >= self.threshold
                ):
                    ref_rec = refs.get(id(rec))
                    if ref_rec is None:
                        t0 = time.perf_counter()
                        payload = encode(rec)
                        name = f"r{server_round}-{phase}-{len(names)}"
                        loc = link.publish(name, payload)
                        names.append(name)
                        dt = time.perf_counter() - t0
                        self.stats["link_seconds_put"] += dt
                        self._largest_out = max(self._largest_out, payload.size)
                        ref_rec = Reference(
                            scheme=self.scheme, loc=loc, size=payload.size,
                            digest=payload.digest, n_arrays=payload.n_arrays,
                        ).to_record()
                        ref_rec._ftx_size = payload.size
                        refs[id(rec)] = ref_rec
                        log.info("flwr-transports: round %d %s: published %r (%s, %d arrays) "
                                 "on %s:// in %.2fs", server_round, phase, key,
                                 _mib(payload.size), payload.n_arrays, self.scheme, dt)
                    self.stats["link_bytes_sent"] += ref_rec._ftx_size
                    new[key] = ref_rec
                else:
                    new[key] = rec
            if self.reply_slots:
                new[TICKET_KEY] = self._issue_ticket(link, m, server_round, phase).to_record()
            m.content = new
            self.stats["inband_bytes_sent"] += record_bytes(new)
        return messages

    def _issue_ticket(self, link: ServerLink, msg: Message, server_round: int,
                      phase: str) -> Ticket:
        node = msg.metadata.dst_node_id
        cap = self.max_reply_size or max(4 * self._largest_out, MIN_REPLY_CAP)
        tid = secrets.token_hex(16)
        slots = [
            link.issue_slot(f"r{server_round}-{phase}-n{node}-s{i}-{tid[:8]}", cap)
            for i in range(self.reply_slots)
        ]
        t = Ticket(id=tid, scheme=self.scheme, run=int(msg.metadata.run_id), round=server_round,
                   node=node, msg_type=phase, max_size=cap, threshold=self.threshold,
                   slots=slots)
        if self.streaming and phase == "train":
            t.weight_key = self.inner.weighted_by_key
            stream = self._streams.setdefault(server_round, RoundStream(server_round))
            for i, slot in enumerate(slots):  # fold each upload as soon as it lands
                link.on_upload(slot, functools.partial(stream.on_landed, (tid, i)))
        self._tickets[tid] = t
        return t

    def _release(self, server_round: int, phase: str) -> None:
        """Remove payloads published for (round, phase) and everything older."""
        if self.link is None:
            return
        for key in [k for k in self._published if k[0] < server_round or k == (server_round, phase)]:
            for name in self._published.pop(key):
                self.link.release(name)

    # -- incoming ------------------------------------------------------------------
    def _resolve(self, replies: Iterable[Message], server_round: int, phase: str) -> list[Message]:
        """Turn the replies' payload references back into ArrayRecords.

        References are checked against the tickets one reply after another (so a slot
        claimed twice is caught), then the payloads are fetched and decoded
        concurrently (up to ``fetch_workers`` at a time; hashing and file/socket reads
        release the GIL), which takes the decode of N replies off the round's critical
        path. A reply whose payload fails any check becomes an error reply.
        """
        replies = list(replies)
        claims, failed = self._claim_all(replies, server_round, phase)
        return self._fetch_all(replies, claims, failed, server_round, phase)

    def _claim_all(self, replies: list[Message], server_round: int, phase: str
                   ) -> tuple[dict[int, list[tuple[str, Any, dict]]], dict[int, Exception]]:
        """Check every reply's references against the tickets, one reply after another."""
        claims: dict[int, list[tuple[str, Any, dict]]] = {}
        failed: dict[int, Exception] = {}
        for k, msg in enumerate(replies):
            if not msg.has_content():
                continue
            self.stats["inband_bytes_received"] += record_bytes(msg.content)
            try:
                claims[k] = self._claim(msg, server_round, phase)
            except (RefError, PayloadError, LinkError, OSError) as exc:
                failed[k] = exc
        return claims, failed

    def _fetch_all(self, replies: list[Message], claims: dict, failed: dict[int, Exception],
                   server_round: int, phase: str) -> list[Message]:
        """Fetch, verify and decode the claimed payloads; failed replies become errors."""
        jobs = [(k, key, ref, slot) for k, cl in claims.items() for key, ref, slot in cl]
        results: dict[tuple[int, str], Any] = {}
        if len(jobs) > 1 and self.fetch_workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self.fetch_workers, len(jobs)),
                                    thread_name_prefix="ftx-fetch") as ex:
                futs = {(k, key): ex.submit(self._fetch, ref, slot) for k, key, ref, slot in jobs}
                for kk, fut in futs.items():
                    try:
                        results[kk] = fut.result()
                    except (RefError, PayloadError, LinkError, OSError) as exc:
                        results[kk] = exc
        else:
            for k, key, ref, slot in jobs:
                try:
                    results[(k, key)] = self._fetch(ref, slot)
                except (RefError, PayloadError, LinkError, OSError) as exc:
                    results[(k, key)] = exc
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
        self._end_phase(server_round, phase)
        return out

    def _rejected(self, msg: Message, exc: Exception) -> Message:
        self.stats["replies_rejected"] += 1
        reason = (f"flwr-transports rejected the reply payload of node "
                  f"{msg.metadata.src_node_id}: {exc}")
        log.warning(reason)
        return Message(metadata=msg.metadata, error=Error(code=REJECTED_REPLY_CODE, reason=reason))

    def _end_phase(self, server_round: int, phase: str) -> None:
        """This phase's tickets are spent: remove unused slots, forget the tickets."""
        if phase == "train":
            for r in [r for r in self._streams if r <= server_round]:
                self._streams.pop(r).close()
        if self.link is not None:
            for tid, t in list(self._tickets.items()):
                if (t.round, t.msg_type) == (server_round, phase) or t.round < server_round:
                    for slot in t.slots:
                        self.link.discard_slot(slot)
                    del self._tickets[tid]
            self._release(server_round, phase)

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
                pre = getattr(src, "predecoded", None)
                if pre is not None:  # the link decoded it on arrival (tcp://)
                    arrays, got = pre()
                    check_digest(got, ref.digest)
                else:
                    arrays = decode(src.read, ref.size, ref.digest)
        finally:
            self.link.discard_slot(slot)
        return arrays, time.perf_counter() - t0

    # -- Strategy API --------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        msgs = self.inner.configure_train(server_round, arrays, config, grid)
        return self._prepare(msgs, server_round, "train", grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stream = self._streams.get(server_round)
        t0 = time.perf_counter()
        try:
            if stream is not None:
                return streaming_aggregate_train(self, stream, server_round, list(replies))
            return self.inner.aggregate_train(
                server_round, self._resolve(replies, server_round, "train"))
        finally:  # the aggregation tail: last upload landed -> aggregate_train returns
            now = time.perf_counter()
            self.stats["agg_train_s"].append(round(now - t0, 4))  # inside aggregate_train
            landed = self.link.last_landed if self.link is not None else None
            if landed is not None:
                self.stats["agg_tail_s"].append(round(now - landed, 4))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        msgs = self.inner.configure_evaluate(server_round, arrays, config, grid)
        return self._prepare(msgs, server_round, "evaluate", grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(
            server_round, self._resolve(replies, server_round, "evaluate"))


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

    Must be the OUTERMOST wrapper (around DP wrappers, FedProx, FedAdam, ...).
    """
    return OffloadStrategy(strategy, transport, **options)


"""``aggregate_train`` of ``offload(..., aggregation="streaming")``.

1. Replies that cannot stream as a whole (a valid reply without exactly one
   offloaded ArrayRecord and one MetricRecord holding a numeric weight) make the round
   take the ``inner`` path: decoded replies, Flower's own aggregation, same outcome
   (including the same exceptions) as without streaming.
2. Every reference is checked against its ticket (:meth:`FoldHost.claim_all`), exactly
   as on the ``inner`` path; a bad one turns its reply into an error reply.
3. :meth:`RoundStream.settle` makes the running sum that of exactly the accepted
   replies (digest and weight checked; rebuilt from the link if anything folded does
   not count).
4. The inner strategy runs its own ``aggregate_train`` on the real replies (metrics
   intact) whose ArrayRecords are placeholders with the same array names; Flower's
   ``aggregate_arrayrecords`` returns the streamed mean during that call
   (:mod:`.inject`). If the strategy does not ask for exactly that, the round is
   redone from decoded replies.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Protocol

from flwr.app import Array, ArrayRecord, Message

from ..codec import PayloadError, check_digest, decode
from ..links import LinkError, PayloadSource
from ..refs import RefError, is_ref_record
from .inject import NotStreamed, streamed_mean
from .layout import Unfoldable
from .round import Accepted, RoundStream

log = logging.getLogger("flwr_transports")


#: stype of the placeholders that stand in for a reply's arrays while the inner
#: strategy runs (same names, dtypes and shapes, no data). Reading one (Flower then
#: raises TypeError naming this stype) or returning one means the strategy wants more
#: than the mean: the round is then redone from decoded replies.
PLACEHOLDER_STYPE = "flwr_transports.placeholder (streaming aggregation: no data here)"


def _weight(msg: Message, key: str) -> Any:
    mrs = list(msg.content.metric_records.values())
    return mrs[0].get(key) if len(mrs) == 1 else None


def _streamable(msg: Message, key: str) -> bool:
    c = msg.content
    ars = list(c.array_records.values())
    w = _weight(msg, key)
    return (len(ars) == 1 and is_ref_record(ars[0]) and not isinstance(w, bool)
            and isinstance(w, int | float))


class FoldHost(Protocol):
    """What the streaming fold needs from the offload wrapper, and nothing more (the
    wrapper hands one per training phase; the fold never reaches into the wrapper)."""

    #: the wrapped strategy (its ``weighted_by_key`` and ``aggregate_train``)
    inner: Any

    def claim_all(self, replies: list[Message]) -> tuple[dict[int, list], dict[int, Exception]]:
        """Check every reply's references against the tickets: (claims, failures)."""

    def resolve(self, replies: list[Message]) -> list[Message]:
        """The ``inner`` path: check, fetch, verify and decode every reply."""

    def open_upload(self, slot: dict, loc: Any, size: int) -> PayloadSource:
        """Open a claimed upload on the link (the link checks location and size)."""

    def reject(self, msg: Message, exc: BaseException) -> Message:
        """The error reply that replaces ``msg`` (counted and logged once per call)."""

    def report(self, **counters: Any) -> None:
        """Add to the wrapper's statistics (numbers are added, lists extended)."""

    def finish(self) -> None:
        """The phase's tickets are spent: remove slots, release its payloads."""


def streaming_aggregate_train(host: FoldHost, stream: RoundStream, server_round: int,
                              replies: list[Message]):
    inner, key = host.inner, host.inner.weighted_by_key
    stream.close()
    if not all(m.has_error() or _streamable(m, key) for m in replies):
        log.info("flwr-transports: round %d: a reply cannot be streamed; the inner "
                 "strategy aggregates decoded replies", server_round)
        return inner.aggregate_train(server_round, host.resolve(replies))
    claims, failed = host.claim_all(replies)
    sources: dict[int, Any] = {}  # reply index -> the upload, opened ONCE (s3: one use)
    try:
        return _settle_and_run(host, stream, server_round, replies, claims, failed, sources)
    finally:
        for src in sources.values():
            src.close()
        host.finish()


class _Rejections:
    """Each failed reply turned into its error reply ONCE (so a fallback path that
    needs them again neither logs nor counts them twice)."""

    def __init__(self, host: FoldHost, replies: list[Message]):
        self.host, self.replies, self.done = host, replies, {}

    def __call__(self, k: int, exc: BaseException) -> Message:
        if k not in self.done:
            self.done[k] = self.host.reject(self.replies[k], exc)
        return self.done[k]


def _decoded(host, replies, claims, failed, sources, rejected) -> list[Message]:
    """The ``inner`` path from the uploads already open: decode, verify, hand over."""
    out = []
    received = 0
    for k, msg in enumerate(replies):
        exc = failed.get(k)
        if exc is None and k in sources:
            (rkey, ref, _slot), = claims[k]
            try:
                src = sources[k]
                wire = getattr(src, "wire_digest", None)
                if wire is not None:  # a coded upload (codecs.wire.CodedSource): its wire
                    check_digest(wire, ref.digest)  # bytes verified, read it decoded
                    msg.content[rkey] = decode(src.read, src.size, None)
                else:
                    msg.content[rkey] = decode(src.read, ref.size, ref.digest)
                received += ref.size
            except (PayloadError, LinkError, OSError) as e:
                exc = e
        out.append(msg if exc is None else rejected(k, exc))
    host.report(link_bytes_received=received)
    return out


def _settle_and_run(host, stream, server_round, replies, claims, failed, sources):
    inner, key = host.inner, host.inner.weighted_by_key
    rejected = _Rejections(host, replies)
    accepted: list[Accepted] = []
    index: dict[Any, int] = {}
    for k, cl in claims.items():
        if k in failed:
            continue
        (rkey, ref, slot), = cl  # _streamable: exactly one reference
        try:  # the link's own checks of the claimed location and size
            sources[k] = host.open_upload(slot, ref.loc, ref.size)
        except (RefError, PayloadError, LinkError, OSError) as exc:
            failed[k] = exc
            continue
        skey = (ref.ticket, ref.slot)
        index[skey] = k
        accepted.append(Accepted(index=k, key=skey, digest=ref.digest,
                                 weight=_weight(replies[k], key), size=ref.size))

    @contextmanager
    def open_upload(a: Accepted):
        yield sources[index[a.key]]  # closed by the caller, after the round

    try:
        total, rejects = stream.settle(accepted, open_upload)
        if total is not None and total.total == 0:
            raise Unfoldable("the weights add up to 0")  # Flower raises its own error
    except Unfoldable as exc:
        log.info("flwr-transports: round %d: %s; the inner strategy aggregates decoded "
                 "replies", server_round, exc)
        return inner.aggregate_train(
            server_round, _decoded(host, replies, claims, failed, sources, rejected))
    failed.update(rejects)
    out: list[Message] = []
    originals: dict[int, tuple[str, ArrayRecord]] = {}
    placeholder = None
    if total is not None:
        placeholder = {a.plan.name: (a.plan.dtype, a.plan.shape) for a in total.accs}
    for k, msg in enumerate(replies):
        if k in failed:
            out.append(rejected(k, failed[k]))
            continue
        if k in sources:
            (rkey, ref, _slot), = claims[k]
            originals[k] = (rkey, msg.content[rkey])
            msg.content[rkey] = ArrayRecord({
                n: Array(dtype=d, shape=sh, stype=PLACEHOLDER_STYPE, data=b"")
                for n, (d, sh) in placeholder.items()})
        out.append(msg)
    expected = [m.content for k, m in enumerate(replies) if k in originals]
    asked = []

    def give(records, weighting_metric_name):
        if weighting_metric_name != key or [id(r) for r in records] != [id(c) for c in expected]:
            raise NotStreamed("the strategy asked for the mean of other replies")
        asked.append(True)
        return total.mean()

    try:
        with streamed_mean(give):
            result = inner.aggregate_train(server_round, out)
        if result[0] is not None and (not asked or any(
                a.stype == PLACEHOLDER_STYPE for a in result[0].values())):
            raise NotStreamed("the strategy computed arrays without aggregate_arrayrecords")
    except (NotStreamed, TypeError) as exc:
        if isinstance(exc, TypeError) and PLACEHOLDER_STYPE not in str(exc):
            raise  # the strategy's own failure, as without streaming
        log.warning("flwr-transports: round %d: %s; aggregating decoded replies instead",
                    server_round, exc)
        for k, (rkey, rec) in originals.items():
            replies[k].content[rkey] = rec
        return inner.aggregate_train(
            server_round, _decoded(host, replies, claims, failed, sources, rejected))
    host.report(
        link_bytes_received=sum(claims[k][0][1].size for k in originals),
        agg_streamed_rounds=1, agg_eager_folds=stream.eager_folds,
        agg_settle_folds=stream.settle_folds, agg_rebuilds=stream.rebuilds,
        agg_fold_s=list(stream.fold_s))
    return result

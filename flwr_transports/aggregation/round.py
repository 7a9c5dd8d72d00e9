"""One training round of streaming aggregation: fold on landing, settle on reply.

:class:`RoundStream` receives each upload as soon as its link says it has landed
(``ServerLink.on_upload``) and folds it into the round's :class:`~.fold.WeightedSum`
with the weight the client claimed in the payload. Nothing is trusted yet: the fold
only records, per upload slot, the weight used and the digest of exactly the bytes
folded. :meth:`RoundStream.settle` runs when Flower hands over the replies: the
wrapper has checked each reference against its ticket; a reply counts only if its
digest equals the digest of what was folded and its in-band weight equals the weight
folded with. Whatever was folded but does not count (rejected, late, an error reply,
a missing node, a weight mismatch, a fold that failed half-way) is excluded EXACTLY:
the sum is rebuilt from the payloads still on the link; nothing is ever subtracted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from ..codec import DIGEST_CHUNK, PayloadError, TreeHasher
from .fold import Source, WeightedSum
from .layout import Unfoldable, layout_of, plan_payload
from .layout import expected_layout as _record_layout

log = logging.getLogger("flwr_transports")


@dataclass
class Landed:
    status: str = "new"  # folded | failed | unfoldable | unweighted
    weight: float | None = None
    digest: str | None = None
    error: Exception | None = None


@dataclass
class Accepted:
    """A reply whose reference passed its ticket checks (the wrapper's job)."""

    index: int  # position in the reply list
    key: Any  # upload slot identity, as registered with the link
    digest: str  # what the reference claims
    weight: float  # the in-band weight (value of weighted_by_key)
    size: int


def _digest_of(src, digest: str) -> None:
    """Check the digest of a whole upload (window by window, bounded memory); raise
    PayloadError if it is not ``digest``. A coded upload (codecs.wire.CodedSource)
    knows the digest of its bytes on the wire."""
    got = getattr(src, "wire_digest", None)
    if got is None:
        h = TreeHasher()
        for off in range(0, src.size, DIGEST_CHUNK):
            h.update(src.read(off, min(DIGEST_CHUNK, src.size - off)))
        got = h.hexdigest()
    if got != digest:
        raise PayloadError(f"digest mismatch: payload has {got}, reference says {digest}")


def _peek(src):
    """How a plan reads a source's headers: its ``peek`` where it has one (a store:
    the few bytes asked, no read-ahead that the fold would fetch again), else ``read``."""
    return getattr(src, "peek", None) or src.read


def _claimed(src, folded: str) -> str:
    """The digest a reference must state for what was folded: the digest of the bytes
    folded, or for a coded upload the digest of its bytes on the wire (when what was
    folded is the payload the stream holds)."""
    fn = getattr(src, "digest_for", None)
    return fn(folded) if fn is not None else folded


def expected_layout(content) -> tuple | None:
    """The layout a train reply must have to be folded: that of the one ArrayRecord
    the server sends in ``content`` (a RecordDict), else None (nothing is folded)."""
    records = list(content.array_records.values())
    return _record_layout(records[0]) if len(records) == 1 else None


class RoundStream:
    """Folds one round's uploads as they land; see the module docstring."""

    def __init__(self, server_round: int, expected: tuple | None = None):
        self.round = server_round
        #: the replies' layout, from the model the server sent (layout.expected_layout);
        #: None: nothing is folded (the inner strategy aggregates decoded replies)
        self.expected = expected
        self.lock = threading.Lock()  # guards the state below; a fold into a sum that
        # is not ``concurrent`` holds it throughout (one fold at a time)
        self.idle = threading.Condition(self.lock)
        #: uploads being folded without the lock (a concurrent sum): key -> source
        self.inflight: dict[Any, Any] = {}
        self.sum: WeightedSum | None = None
        self.landed: dict[Any, Landed] = {}
        self.closed = False
        self.last_landed: float | None = None  # perf_counter() of the last landing
        self.eager_folds = 0
        self.settle_folds = 0
        self.rebuilds = 0
        self.fold_s: list[float] = []  # seconds per eager fold

    # -- link side (background threads) ------------------------------------------
    def on_landed(self, key: Any, src) -> None:
        """Fold a just-landed upload (``src``: the link's PayloadSource, open). A source
        with ``wait`` (an upload that lands piece by piece: s3:// with ``segment``) is
        folded as its pieces land, beside the other uploads of the round."""
        if getattr(src, "wait", None) is not None:
            self._on_arriving(key, src)
            return
        now = time.perf_counter()
        with self.lock:
            self.last_landed = now if self.last_landed is None else max(self.last_landed, now)
            if self.closed or key in self.landed:
                return
            st = self.landed[key] = Landed()
            try:
                plan = self._check(plan_payload(_peek(src), src.size))
                if plan.weight is None:
                    st.status = "unweighted"  # folded at settle time with the in-band weight
                    return
                if self.sum is None:  # sized like the model sent, never by the upload
                    self.sum = WeightedSum(plan)
                t0 = time.perf_counter()
                st.digest = _claimed(src, self.sum.fold(Source.of(src), plan, plan.weight,
                                                        key))
                st.status, st.weight = "folded", plan.weight
                self.eager_folds += 1
                self.fold_s.append(round(time.perf_counter() - t0, 4))
            except Unfoldable as exc:
                st.status, st.error = "unfoldable", exc
            except Exception as exc:  # noqa: BLE001 - hostile payload / vanished file: decided at settle
                st.status, st.error = "failed", exc

    def _on_arriving(self, key: Any, src) -> None:
        with self.lock:
            if self.closed or key in self.landed:
                return
            st = self.landed[key] = Landed()
            self.inflight[key] = src
        try:
            # planned from its first bytes (the .npy headers predicted, checked as read)
            plan = self._check(plan_payload(src.read, src.size, predict=True))
            if plan.weight is None:
                st.status = "unweighted"
                return
            with self.lock:
                if self.sum is None:  # sized like the model sent, never by the upload
                    self.sum = WeightedSum(plan, concurrent=True)
                s = self.sum
            t0 = time.perf_counter()
            if s.concurrent:
                got = s.fold(Source.of(src), plan, plan.weight, key)
            else:  # a sum begun by an upload that landed whole: its bytes first, then
                src.wait(0, src.size)  # one fold at a time as before
                with self.lock:
                    if self.closed or s is not self.sum:
                        return
                    got = s.fold(Source.of(src), plan, plan.weight, key)
            with self.lock:
                st.digest = _claimed(src, got)
                st.status, st.weight = "folded", plan.weight
                self.eager_folds += 1
                self.fold_s.append(round(time.perf_counter() - t0, 4))
        except Unfoldable as exc:
            st.status, st.error = "unfoldable", exc
        except Exception as exc:  # noqa: BLE001 - hostile payload / missing piece: decided at settle
            st.status, st.error = "failed", exc
        finally:
            with self.lock:
                self.inflight.pop(key, None)
                self.idle.notify_all()

    def _check(self, plan):
        """The plan, if its layout is the one the server sent (else Unfoldable: the
        round is aggregated from decoded replies, as Flower would)."""
        if self.expected is None:
            raise Unfoldable("no expected layout (the model sent cannot be streamed)")
        if layout_of(plan) != self.expected:
            raise Unfoldable("the reply's arrays differ from the model the server sent "
                             "(names, dtypes or shapes)")
        return plan

    def close(self) -> None:
        """No more folds on landing (waits for those in progress; an upload still
        arriving piece by piece stops waiting for pieces that have not landed by now)."""
        with self.lock:
            self.closed = True
            arriving = list(self.inflight.values())
        for src in arriving:
            stop = getattr(src, "finish", None)
            if stop is not None:
                stop()
        with self.lock:
            while self.inflight:
                self.idle.wait()

    # -- reply side -----------------------------------------------------------------
    def settle(self, accepted: list[Accepted],
               open_upload: Callable[[Accepted], AbstractContextManager]
               ) -> tuple[WeightedSum | None, dict[int, Exception]]:
        """Make the sum equal the weighted sum of exactly the accepted replies.

        Returns the sum (None if nothing counts) and ``{reply index: reason}`` for
        replies rejected here (digest mismatch, unreadable payload). Raises
        :class:`~.layout.Unfoldable` if a reply that counts cannot be streamed.
        """
        self.close()
        rejected: dict[int, Exception] = {}
        for a in accepted:
            st = self.landed.get(a.key)
            if st is not None and st.status == "folded" and st.digest != a.digest:
                rejected[a.index] = PayloadError(
                    f"digest mismatch: payload has {st.digest}, reference says {a.digest}")
        while True:
            want = {a.key: a for a in accepted if a.index not in rejected}
            s = self.sum
            clean = s is not None and not s.dirty and all(
                k in want and float(w) == float(want[k].weight) for k, w in s.folded)
            if s is not None and not clean:
                log.info("flwr-transports: round %d: rebuilding the streamed sum from the "
                         "link (a folded upload does not count)", self.round)
                # a new sum, laid out by the first reply that counts (not by whichever
                # upload happened to land first)
                self.sum = s = None
                self.rebuilds += 1
            done = {k for k, _ in s.folded} if s is not None else set()
            again = False
            for a in (x for x in accepted if x.key in want and x.key not in done):
                try:
                    with open_upload(a) as src:
                        plan = plan_payload(_peek(src), src.size)
                        if layout_of(plan) != self.expected:
                            _digest_of(src, a.digest)  # a lie: rejected; else Unfoldable
                            self._check(plan)
                        if self.sum is None:
                            self.sum = WeightedSum(plan)
                        got = _claimed(src, self.sum.fold(Source.of(src), plan, a.weight,
                                                          a.key))
                    self.settle_folds += 1
                except Unfoldable:
                    raise
                except (PayloadError, OSError, ValueError, RuntimeError) as exc:
                    rejected[a.index] = exc
                    again = True
                    break
                if got != a.digest:
                    rejected[a.index] = PayloadError(
                        f"digest mismatch: payload has {got}, reference says {a.digest}")
                    self.sum.dirty = True
                    again = True
                    break
            if not again:
                break
        if not any(a.index not in rejected for a in accepted):
            return None, rejected
        return self.sum, rejected

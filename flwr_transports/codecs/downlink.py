"""Downlink delta, server side: the new global model coded against the one clients kept.

With ``codec=delta`` (or ``q8``) on a network link, ``offload(strategy)`` marks every
model it publishes ``keep`` while another phase follows (the last evaluate phase is not
marked): a client keeps the model it received (its kept-payload cache,
:mod:`flwr_transports.flower.cache`, bound to the run and the publication's location).
When the server then publishes a DIFFERENT model, it also codes it ``delta`` against the
model clients were told to keep and publishes that next to the full model (under
``<name>-d``), if it pays (:data:`MIN_GAIN`); the reference names both
(:class:`flwr_transports.refs.DeltaRef`: the base's raw digest and location, the delta's
wire digest, the model's raw digest). A client holding that base fetches the delta,
anyone else the full model.

Server memory: the base is the previous model's raw payload as the strategy held it
(its arrays' own bytes, no copy), kept alive from its publication until the next model
is published: one model longer than the strategy would hold it (from the end of
``aggregate_*`` to the next ``configure_*``; while replies are in, ``delta`` replies
need it anyway). The delta's wire bytes are held by the link like any publication
(tcp:// serves them from memory; file/s3 write them out).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..codec import EncodedPayload
from ..errors import FlwrTransportsError
from ..refs import DeltaRef
from .stream import DELTA, Base, encode

log = logging.getLogger("flwr_transports")

#: a delta is published only if it saves at least this fraction of the full model's
#: bytes on the wire (it costs the server an encode and a publish, and every client
#: holding the base a second decode path)
MIN_GAIN = 0.05
#: the link name of a publication's delta
SUFFIX = "-d"


def delta_name(name: str) -> str:
    return name + SUFFIX


@dataclass
class _Kept:
    digest: str  # raw payload digest
    loc: Any  # where it was published (what a client's kept copy is bound to)
    base: Base  # its bytes: the model's arrays (no copy)


class DownlinkDeltas:
    """What the server remembers to offer downlink deltas: the model clients were told
    to keep last (one per run: a phase that publishes several models, or none marked
    ``keep``, forgets it)."""

    def __init__(self) -> None:
        self._prev: _Kept | None = None
        self._new: list[tuple[str, Any, EncodedPayload]] = []
        self._warned = False  # a failed delta computation was logged

    def offer(self, link: Any, name: str, loc: Any, payload: EncodedPayload,
              full_wire_size: int, stats: Any = None) -> DeltaRef | None:
        """Called for each model published anew (``name`` at ``loc``): publish its
        delta against the kept model when that pays; return what the reference names
        (``stats``: the wrapper's, counted in)."""
        self._new.append((name, loc, payload))
        prev = self._prev
        if prev is None or prev.digest == payload.digest:
            return None
        try:
            wire = encode(payload, DELTA, base=prev.base)
        except (ValueError, FlwrTransportsError) as exc:  # e.g. an unreadable layout
            log.debug("flwr-transports: no downlink delta for %r: %s", name, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - an optimisation: never fails the phase
            # (the encoder's worker threads re-raise here): the reference names no delta,
            # so no client waits for one; the full model is published already
            if stats is not None:
                stats["downlink_delta_failures"] += 1
            if not self._warned:
                self._warned = True
                log.warning("flwr-transports: the downlink delta of %r could not be computed "
                            "(%s: %s); clients get the full model (logged once)", name,
                            type(exc).__name__, exc)
            else:
                log.debug("flwr-transports: no downlink delta for %r: %r", name, exc)
            return None
        if wire.size > (1 - MIN_GAIN) * full_wire_size:
            log.debug("flwr-transports: downlink delta of %r not published (%d bytes vs %d "
                      "for the full model)", name, wire.size, full_wire_size)
            return None
        try:
            dloc = link.publish(delta_name(name), wire)
        except (FlwrTransportsError, OSError) as exc:  # an optimisation: the full model went
            log.warning("flwr-transports: downlink delta of %r not published: %s", name, exc)
            return None
        if stats is not None:
            stats["downlink_deltas"] += 1
            stats["downlink_delta_bytes"] += wire.size
        log.info("flwr-transports: downlink delta of %r published: %d bytes (%.1f%% of the "
                 "full model's %d on the wire)", name, wire.size,
                 100 * wire.size / max(full_wire_size, 1), full_wire_size)
        return DeltaRef(loc=dloc, size=wire.size, digest=wire.digest, base=prev.digest,
                        base_loc=prev.loc)

    def end_phase(self, kept: bool) -> None:
        """A phase was prepared; ``kept``: its models were marked ``keep``. Its one new
        model becomes the base of the next deltas (a reused publication leaves the
        base as it is); anything else forgets the base (and frees its memory)."""
        new, self._new = self._new, []
        if not kept or len(new) > 1:
            self._prev = None
        elif new:
            _, loc, payload = new[0]
            self._prev = _Kept(payload.digest, loc, Base.from_payload(payload))

    def clear(self) -> None:
        self._prev = None
        self._new = []


__all__ = ["MIN_GAIN", "SUFFIX", "DownlinkDeltas", "delta_name"]

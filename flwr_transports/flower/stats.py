"""``strategy.stats`` / ``grid.stats``: what one offload wrapper moved and did.

A typed record: every statistic is declared here, as a counter (a number that only
adds up) or a series (one value per round or phase, in order). It stays a ``dict``
(benchmark JSON and user code read and dump it as one), but an undeclared name, or a
number where a series belongs, is an error instead of a silent new key.
"""

from __future__ import annotations

from typing import Any

#: counters: name -> meaning
COUNTERS: dict[str, str] = {
    "inband_bytes_sent": "bytes of messages sent through Flower (references included)",
    "inband_bytes_received": "bytes of replies received through Flower",
    "link_bytes_sent": "payload bytes the clients were pointed at on the link (per message)",
    "link_bytes_received": "payload bytes of replies read from the link",
    "link_seconds_put": "seconds spent encoding and publishing payloads",
    "link_seconds_get": "seconds spent fetching, verifying and decoding replies",
    "replies_rejected": "replies turned into error replies (code 0x4654)",
    "link_publishes": "payloads published",
    "link_publishes_reused": "payloads handed out again instead of published anew",
    "downlink_deltas": "downlink deltas published next to a full model (codec=delta/q8)",
    "downlink_delta_bytes": "bytes of the downlink deltas published",
    "downlink_delta_failures": "downlink deltas that could not be computed (the full "
                               "model went alone; logged once)",
    "agg_streamed_rounds": "training rounds aggregated by the streaming fold",
    "agg_eager_folds": "uploads folded as they landed",
    "agg_settle_folds": "uploads folded when the replies were handed over",
    "agg_rebuilds": "running sums rebuilt to exclude a reply that did not count",
    "pulls": "SuperLink pulls made by offload's receive loop",
}
#: series: name -> meaning (one entry per round or phase)
SERIES: dict[str, str] = {
    "agg_tail_s": "last upload landed -> aggregate_train returned, per round (s)",
    "agg_train_s": "time inside aggregate_train, per round (s)",
    "agg_fold_s": "time folding, per folded upload (s)",
    "receive_pulls": "pulls of the receive loop, per phase",
}


class OffloadStats(dict):
    """The wrapper's statistics (see the module docstring); read as a dict or by
    attribute (``stats.link_bytes_sent``). :meth:`counters` and :meth:`series` give
    the two kinds apart."""

    def __init__(self) -> None:
        super().__init__({**{k: 0 for k in COUNTERS}, **{k: [] for k in SERIES}})

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, name: str, value: Any) -> None:
        if name in COUNTERS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"statistic {name!r} is a counter, not {type(value).__name__}")
        elif name in SERIES:
            if not isinstance(value, list):
                raise TypeError(f"statistic {name!r} is a series (a list)")
        else:
            raise KeyError(f"{name!r} is not a declared statistic (flower/stats.py)")
        super().__setitem__(name, value)

    def setdefault(self, name: str, default: Any = None) -> Any:
        if name not in self:
            self[name] = default
        return self[name]

    def update(self, *args: Any, **kw: Any) -> None:
        for k, v in dict(*args, **kw).items():
            self[k] = v

    def counters(self) -> dict[str, int | float]:
        return {k: self[k] for k in COUNTERS}

    def series(self) -> dict[str, list]:
        return {k: list(self[k]) for k in SERIES}

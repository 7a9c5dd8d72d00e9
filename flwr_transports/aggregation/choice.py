"""Which strategies stream, and why (one log line says it).

A strategy streams when its array aggregation is Flower's FedAvg weighted mean
(``aggregate_arrayrecords`` over the valid replies, weighted by ``weighted_by_key``),
possibly followed by a server-side step: Flower's FedAvg, FedProx, FedAvgM, FedAdam,
FedYogi, FedAdagrad (and FedOpt), and subclasses that do not override
``aggregate_train``. Order statistics and per-update transforms (Krum, MultiKrum,
Bulyan, FedMedian, FedTrimmedAvg, QFedAvg, the DP clipping wrappers, the XGBoost
strategies) override ``aggregate_train`` and keep the ``inner`` path.

A user strategy declares itself compatible with the class attribute
``streaming_aggregation = True``: its ``aggregate_train`` must obtain the arrays by
calling Flower's ``aggregate_arrayrecords`` through ``FedAvg.aggregate_train`` (e.g.
``super().aggregate_train(...)``) or through the module attribute
``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`` on the replies it
was given. ``streaming_aggregation = False`` opts a strategy out. If a declared
strategy does not make that call, the wrapper notices and aggregates the round from
decoded replies instead (correct, just not streamed).
"""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from ..errors import ConfigError

#: class attribute by which a strategy declares (True) or refuses (False) streaming
STREAMING_ATTR = "streaming_aggregation"
MODES = ("auto", "streaming", "inner", "ray")


def _weighted_mean_methods() -> set:
    from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

    return {c.__dict__["aggregate_train"] for c in (FedAvg, FedAvgM, FedAdam, FedYogi,
                                                     FedAdagrad)}


def streaming_decision(strategy: Strategy, mode: str) -> tuple[bool, str]:
    """``(stream?, reason)`` for ``offload(strategy, aggregation=mode)``.

    Raises ValueError for an unknown mode, or ``streaming`` forced on a strategy that
    is not a weighted mean (that would silently compute something else).
    """
    mode = str(mode).strip().lower()
    if mode not in MODES:
        raise ConfigError(f"aggregation must be one of {', '.join(MODES)}, got {mode!r}")
    name = type(strategy).__name__
    if mode == "inner":
        return False, "aggregation=inner: the inner strategy aggregates decoded replies"
    declared = getattr(type(strategy), STREAMING_ATTR, None)
    key = getattr(strategy, "weighted_by_key", None)
    if declared is False:
        ok, why = False, f"{name} sets {STREAMING_ATTR} = False"
    elif not isinstance(key, str):
        ok, why = False, f"{name} has no weighted_by_key"
    elif declared is True:
        ok, why = True, f"{name} declares {STREAMING_ATTR} = True"
    elif type(strategy).aggregate_train in _weighted_mean_methods():
        ok, why = True, f"{name} aggregates arrays with FedAvg's weighted mean"
    else:
        ok, why = False, (f"{name}'s aggregate_train is not FedAvg's weighted mean (set "
                          f"{STREAMING_ATTR} = True on the class if it is)")
    if mode == "ray" and not ok:  # the shards reproduce the weighted-mean family only
        why = f"{why}; aggregation=ray shards the weighted mean only"
    if mode == "streaming" and not ok:
        raise ConfigError(f"aggregation=streaming needs a weighted-mean strategy: {why}")
    if ok:
        return True, f"streaming weighted mean by {key!r}: {why}"
    return False, f"inner: {why}"

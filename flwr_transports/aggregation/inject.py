"""The ONE workaround: hand the streamed mean to the inner strategy.

The inner strategy must still run its own ``aggregate_train`` (reply checks, metrics,
FedAdam's server step, ...) on the real replies, whose ArrayRecords the wrapper
replaced by cheap placeholders with the same array names. Flower's FedAvg computes
the arrays with ``aggregate_arrayrecords``, a module-level function imported by name
into ``flwr.serverapp.strategy.fedavg`` (and defined in ``strategy_utils``). While
:func:`streamed_mean` is active in THIS thread, that name returns the streamed mean
instead, after checking it is being asked for exactly the accepted replies; any other
call (other threads, other records) goes to Flower's own function. The names are
patched only while at least one such block runs, and restored after.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager

_LOCK = threading.Lock()
_TLS = threading.local()
_DEPTH = 0
_ORIGINAL = None


class NotStreamed(RuntimeError):
    """The inner strategy asked for an aggregate the stream cannot give."""


def _modules():
    from flwr.serverapp.strategy import fedavg, strategy_utils

    return (fedavg, strategy_utils)


def _dispatch(records, weighting_metric_name):
    fn = getattr(_TLS, "fn", None)
    if fn is None:
        return _ORIGINAL(records, weighting_metric_name)
    return fn(records, weighting_metric_name)


@contextmanager
def streamed_mean(fn: Callable):
    """Within the block, ``aggregate_arrayrecords(records, key)`` calls ``fn``."""
    global _DEPTH, _ORIGINAL
    with _LOCK:
        if _DEPTH == 0:
            from flwr.serverapp.strategy import strategy_utils

            _ORIGINAL = strategy_utils.aggregate_arrayrecords
            for m in _modules():
                if m.aggregate_arrayrecords is _ORIGINAL:
                    m.aggregate_arrayrecords = _dispatch
        _DEPTH += 1
    prev, _TLS.fn = getattr(_TLS, "fn", None), fn
    try:
        yield
    finally:
        _TLS.fn = prev
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                for m in _modules():
                    if m.aggregate_arrayrecords is _dispatch:
                        m.aggregate_arrayrecords = _ORIGINAL

"""Client side of FDA: a ClientApp mod (``ClientApp(mods=[fda_mod])``).

The user's ``@app.train()`` function stays unchanged. The mod keeps the node's local
model in node state (``context.state``) across monitoring steps, hands it to the user's
train function as if it were the global model, stores what comes back and replies with
the small local state only. See :mod:`flwr_transports.strategies.fda_protocol`.
Messages without ``fda.phase`` in their ConfigRecord (evaluate, query, plain FedAvg
train) pass through untouched.
"""

from __future__ import annotations

from logging import ERROR

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from . import fda_protocol as P
from .fda_estimators import VARIANTS, ams_sketch, check_sketch_shape, random_unit_vector


class _FdaInputError(ValueError):
    pass


def _error(msg: Message, reason: str) -> Message:
    log(ERROR, "fda_mod: %s", reason)
    return Message(
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"fda_mod: {reason}"), reply_to=msg
    )


def _find_fda_config(msg: Message) -> tuple[str, ConfigRecord] | None:
    if not msg.has_content():
        return None
    for key, rec in msg.content.config_records.items():
        if P.PHASE in rec:
            return key, rec
    return None


def _int_cfg(cfg: ConfigRecord, key: str, default: int) -> int:
    val = cfg.get(key, default)
    if not isinstance(val, int) or isinstance(val, bool):
        raise _FdaInputError(f"config key {key!r} must be an int, got {type(val).__name__}")
    return val


def _copy(rec: ArrayRecord) -> ArrayRecord:
    # Arrays hold immutable bytes: a new mapping is enough to decouple base from local.
    return ArrayRecord({k: v for k, v in rec.items()})


def _reset(state: RecordDict, new: ArrayRecord, prev: ArrayRecord | None, variant: str) -> None:
    if len(new) == 0:
        raise _FdaInputError("reset without a model")
    if prev is not None and len(prev) > 0:
        if P.layout(prev) != P.layout(new):
            raise _FdaInputError("previous and new global models have different layouts")
        old = prev
    else:
        old = state.get(P.NODE_BASE)
        if old is not None and P.layout(old) != P.layout(new):
            # a different model (e.g. a new run reusing node state): start afresh
            old = None
            if P.NODE_XI in state:
                del state[P.NODE_XI]
    if variant == "linear" and old is not None:
        delta = P.flatten(new) - P.flatten(old)
        norm = float(np.linalg.norm(delta))
        if norm > 0.0 and np.isfinite(norm):
            state[P.NODE_XI] = P.vector_record((delta / norm).astype(np.float32))
    state[P.NODE_BASE] = _copy(new)
    state[P.NODE_LOCAL] = _copy(new)


def _single(records: dict, what: str) -> tuple[str, object]:
    items = list(records.items())
    if len(items) != 1:
        raise _FdaInputError(f"expected exactly one {what}, found {len(items)}")
    return items[0]


def fda_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """FDA client mod. Place it after ``payload_mod`` (if used) in ``mods``."""
    if not msg.metadata.message_type.startswith("train"):
        return call_next(msg, ctx)
    found = _find_fda_config(msg)
    if found is None:
        return call_next(msg, ctx)
    cfg_key, cfg = found
    try:
        phase = cfg[P.PHASE]
        if phase not in P.PHASES:
            raise _FdaInputError(f"unknown fda.phase {phase!r}")
        variant = cfg.get(P.VARIANT, "naive")
        if variant not in VARIANTS:
            raise _FdaInputError(f"unknown fda.variant {variant!r}")
        state = ctx.state
        if phase == P.SYNC:
            return _sync(msg, state)
        user_arrays = [(k, v) for k, v in msg.content.array_records.items() if k != P.PREV]
        if len(user_arrays) != 1:
            raise _FdaInputError(f"expected one ArrayRecord, found {len(user_arrays)}")
        arrays_key, incoming = user_arrays[0]
        prev = msg.content.array_records.get(P.PREV)
        if len(incoming) > 0:
            _reset(state, incoming, prev, variant)
        return _monitor(msg, ctx, call_next, cfg_key, cfg, arrays_key, variant)
    except _FdaInputError as exc:
        return _error(msg, str(exc))


def _sync(msg: Message, state: RecordDict) -> Message:
    local = state.get(P.NODE_LOCAL)
    metrics = state.get(P.NODE_METRICS)
    meta = state.get(P.NODE_META)
    if local is None or metrics is None or meta is None:
        raise _FdaInputError("sync requested before any local training step")
    content = RecordDict({str(meta["arrays-key"]): local, str(meta["metrics-key"]): metrics})
    return Message(content, reply_to=msg)


def _monitor(msg, ctx, call_next, cfg_key, cfg, arrays_key, variant) -> Message:
    state = ctx.state
    local = state.get(P.NODE_LOCAL)
    base = state.get(P.NODE_BASE)
    if local is None or base is None:
        raise _FdaInputError("monitoring step before any global model was received")
    seed = _int_cfg(cfg, P.SEED, 0)
    epoch = _int_cfg(cfg, P.EPOCH, 0)
    if variant == "sketch":
        depth = _int_cfg(cfg, P.SKETCH_DEPTH, 5)
        width = _int_cfg(cfg, P.SKETCH_WIDTH, 250)
        try:
            check_sketch_shape(depth, width)
        except ValueError as exc:
            raise _FdaInputError(str(exc)) from exc

    # Hand the local model to the user's train function in place of the global one.
    content = RecordDict()
    for key, rec in msg.content.items():
        if key == P.PREV:
            continue
        content[key] = local if key == arrays_key else rec
    msg.content = content
    reply = call_next(msg, ctx)
    if reply.has_error():
        return reply

    out_key, new_local = _single(reply.content.array_records, "ArrayRecord in the train reply")
    m_key, metrics = _single(reply.content.metric_records, "MetricRecord in the train reply")
    if P.layout(new_local) != P.layout(base):
        raise _FdaInputError("the train function returned arrays with a different layout")
    state[P.NODE_LOCAL] = new_local
    state[P.NODE_METRICS] = metrics
    state[P.NODE_META] = ConfigRecord({"arrays-key": out_key, "metrics-key": m_key})

    drift = P.flatten(new_local) - P.flatten(base)
    local_state = MetricRecord({P.SQNORM: float(drift @ drift)})
    out = RecordDict({P.STATE: local_state, m_key: metrics})
    if variant == "linear":
        xi_rec = state.get(P.NODE_XI)
        if xi_rec is not None:
            xi = next(iter(xi_rec.values())).numpy().astype(np.float64)
            if xi.size != drift.size:
                xi = random_unit_vector(drift.size, seed)
        else:
            xi = random_unit_vector(drift.size, seed)
        local_state[P.XI_DOT] = float(xi @ drift)
    elif variant == "sketch":
        sk = ams_sketch(drift, depth, width, seed=(seed * 1_000_003 + epoch))
        out[P.SKETCH] = P.vector_record(sk.astype(np.float32))
    reply.content = out
    return reply

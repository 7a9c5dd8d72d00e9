"""FDA (Federated Dynamic Averaging, Theologitis et al., EDBT 2025) for Flower's Message API.

``FDA(inner, threshold=..., variant=...)`` wraps an existing Message-API strategy. It
overrides :meth:`start`: every Flower round is one *monitoring step* in which the
clients (running :func:`~flwr_transports.strategies.fda_client.fda_mod`) train one local
step continuing from their own local model and reply with a tiny local state. The
server estimates the variance of the local models; when it exceeds Theta it *syncs*:
asks for the full local models, aggregates them with ``inner.aggregate_train`` and
broadcasts the new global model with the next monitoring step.

Theta <= 0 syncs after every step, which reproduces the inner strategy exactly
(FedAvg with ``num_rounds`` rounds when the inner strategy is FedAvg).

Bytes are counted in-band (sum of ``count_bytes()`` of the records of every message
that goes down and every reply that comes up) and reported per step in
``Result.train_metrics_clientapp[step]`` (keys ``fda.*``), in :attr:`FDA.history`,
in :attr:`FDA.stats` and in the run summary logged at the end.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_metricrecords,
    log_strategy_start_info,
)
from flwr.supercore import log

from ..codec import record_bytes
from . import fda_protocol as P
from .fda_estimators import (
    MAX_SKETCH_DEPTH,
    MAX_SKETCH_WIDTH,
    VARIANTS,
    adaptive_threshold,
    check_sketch_shape,
    estimate,
)

FDA_CONFIG_KEY = "fda.config"


def message_bytes(msg: Message) -> int:
    return record_bytes(msg.content) if msg.has_content() else 0


class FDA(Strategy):
    """Federated Dynamic Averaging wrapper around a Message-API strategy.

    Parameters
    ----------
    inner : Strategy
        Strategy whose ``configure_train`` builds the monitoring messages (node sampling,
        config) and whose ``aggregate_train`` / evaluate methods are used at each sync.
        Use it with ``fraction_train=1.0``: FDA monitors the drift of every node.
    threshold : float
        Theta. A sync happens when the variance estimate exceeds it; Theta <= 0 syncs
        after every step (= the inner strategy's rounds exactly).
    variant : "naive" | "linear" | "sketch"
    sketch_depth, sketch_width : int
        AMS sketch shape for the sketch variant (eps = 1/sqrt(width)).
    adaptive : bool
        Recalibrate Theta at the first monitoring step after every sync (and at the
        start), from that step's variance estimate v1 (the one-step drift):
        ``Theta <- max(theta_min, (1-beta) Theta + beta * rho * v1)``; with
        ``threshold <= 0`` the first calibration sets ``Theta = rho * v1``. So Theta is
        unit-free: "sync when the variance reaches rho times its one-step value".
    adaptive_rho, adaptive_beta, theta_min : float
        Parameters of the adaptive rule.
    seed : int
        Shared seed of the sketch hashes and of the initial linear direction.
    weighted : bool
        Weight clients by ``inner.weighted_by_key`` (default "num-examples") in the
        variance estimate; False (default, as in the paper) weighs them uniformly.
    final_sync : bool
        Sync once more after the last step if local progress is pending, so that the
        returned global model includes it.
    evaluate_after_sync : bool
        Run the inner strategy's federated evaluation and ``evaluate_fn`` after each
        sync (the global model only changes at syncs).
    max_period : int, optional
        Force a sync after this many steps without one (a bound on staleness; also
        lets the adaptive rule recalibrate). None (default): no bound.
    """

    # pylint: disable=too-many-arguments,too-many-instance-attributes
    def __init__(
        self,
        inner: Strategy,
        threshold: float = 0.0,
        variant: str = "linear",
        *,
        sketch_depth: int = 5,
        sketch_width: int = 250,
        adaptive: bool = False,
        adaptive_rho: float = 10.0,
        adaptive_beta: float = 0.5,
        theta_min: float = 0.0,
        seed: int = 0,
        weighted: bool = False,
        final_sync: bool = True,
        evaluate_after_sync: bool = True,
        max_period: int | None = None,
    ) -> None:
        if not isinstance(inner, Strategy):
            raise TypeError("FDA wraps a flwr.serverapp.strategy.Strategy")
        if variant not in VARIANTS:
            raise ValueError(f"unknown FDA variant {variant!r}; expected one of {VARIANTS}")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError("threshold must be a finite number")
        check_sketch_shape(sketch_depth, sketch_width)
        if not 0.0 < adaptive_beta <= 1.0 or adaptive_rho <= 0 or theta_min < 0:
            raise ValueError("need 0 < adaptive_beta <= 1, adaptive_rho > 0, theta_min >= 0")
        self.inner = inner
        self.threshold = float(threshold)
        self.variant = variant
        self.sketch_depth = sketch_depth
        self.sketch_width = sketch_width
        self.adaptive = adaptive
        self.adaptive_rho = float(adaptive_rho)
        self.adaptive_beta = float(adaptive_beta)
        self.theta_min = float(theta_min)
        self.seed = int(seed) & 0x7FFFFFFF
        self.weighted = weighted
        self.final_sync = final_sync
        self.evaluate_after_sync = evaluate_after_sync
        if max_period is not None and (not isinstance(max_period, int) or max_period < 1):
            raise ValueError("max_period must be a positive int or None")
        self.max_period = max_period
        self.history: list[dict[str, Any]] = []
        self.stats: dict[str, int | float] = {}
        self._reset_stats()

    # -- plain Strategy interface: delegate to the inner strategy ---------------------
    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> FDA: variant=%s threshold=%g adaptive=%s",
            self.variant,
            self.threshold,
            self.adaptive,
        )
        if self.variant == "sketch":
            log(INFO, "\t│\t└── sketch %d x %d", self.sketch_depth, self.sketch_width)
        log(INFO, "\t└──> inner strategy %s:", type(self.inner).__name__)
        self.inner.summary()

    # -- bookkeeping ---------------------------------------------------------------------
    def _reset_stats(self) -> None:
        self._counted_last = (0, 0)
        self.history = []
        self.stats = {
            "steps": 0,
            "syncs": 0,
            "bytes_down": 0,
            "bytes_up": 0,
            "monitor_bytes_down": 0,
            "monitor_bytes_up": 0,
            "sync_bytes_down": 0,
            "sync_bytes_up": 0,
            "threshold": self.threshold,
        }

    def _weight_key(self) -> str:
        return str(getattr(self.inner, "weighted_by_key", "num-examples"))

    def _fda_config(self, base: ConfigRecord, phase: str, epoch: int) -> ConfigRecord:
        cfg = ConfigRecord(dict(base.items()))
        cfg[P.PHASE] = phase
        cfg[P.VARIANT] = self.variant
        cfg[P.SEED] = self.seed
        cfg[P.EPOCH] = epoch
        if self.variant == "sketch":
            cfg[P.SKETCH_DEPTH] = self.sketch_depth
            cfg[P.SKETCH_WIDTH] = self.sketch_width
        return cfg

    def _parse_state(self, reply: Message) -> dict[str, Any] | None:
        """Validate one monitoring reply (untrusted input). None if unusable."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "FDA: node %s replied with an error: %s", node, reply.error.reason)
            return None
        content = reply.content
        st = content.metric_records.get(P.STATE)
        if st is None or not P.is_finite_number(st.get(P.SQNORM)) or st[P.SQNORM] < 0:
            log(WARNING, "FDA: node %s sent no valid %s; ignored", node, P.STATE)
            return None
        out: dict[str, Any] = {"node": node, "sqnorm": float(st[P.SQNORM])}
        if self.variant == "linear":
            if not P.is_finite_number(st.get(P.XI_DOT)):
                log(WARNING, "FDA: node %s sent no valid %s; ignored", node, P.XI_DOT)
                return None
            out["xi_dot"] = float(st[P.XI_DOT])
        elif self.variant == "sketch":
            rec = content.array_records.get(P.SKETCH)
            sk = None
            if rec is not None and len(rec) == 1:
                arr = next(iter(rec.values()))
                if (
                    tuple(arr.shape) == (self.sketch_depth, self.sketch_width)
                    and len(arr.data) <= 8 * MAX_SKETCH_DEPTH * MAX_SKETCH_WIDTH
                ):
                    sk = arr.numpy().astype(np.float64)
            if sk is None or not np.all(np.isfinite(sk)):
                log(WARNING, "FDA: node %s sent no valid sketch; ignored", node)
                return None
            out["sketch"] = sk
        user = [(k, r) for k, r in content.metric_records.items() if k != P.STATE]
        out["metrics"] = user[0][1] if len(user) == 1 else None
        w = out["metrics"].get(self._weight_key()) if out["metrics"] is not None else None
        out["weight"] = float(w) if P.is_finite_number(w) and w >= 0 else None
        return out

    def _estimate(self, states: list[dict[str, Any]]) -> float:
        weights = None
        if self.weighted:
            ws = [s["weight"] for s in states]
            if all(w is not None for w in ws) and sum(ws) > 0:
                weights = ws
        return estimate(
            self.variant,
            [s["sqnorm"] for s in states],
            xi_dots=[s.get("xi_dot") for s in states] if self.variant == "linear" else None,
            sketches=[s["sketch"] for s in states] if self.variant == "sketch" else None,
            weights=weights,
        )

    def _monitor_metrics(self, states: list[dict[str, Any]]) -> MetricRecord:
        recs = [RecordDict({"m": s["metrics"]}) for s in states if s["metrics"] is not None]
        key = self._weight_key()
        if recs and len(recs) == len(states) and all(key in r["m"] for r in recs):
            try:
                return aggregate_metricrecords(recs, key)
            except (TypeError, ValueError, ZeroDivisionError):
                pass
        return MetricRecord()

    # -- the FDA loop --------------------------------------------------------------------
    # pylint: disable=too-many-locals,too-many-branches,too-many-statements
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
        """Run ``num_rounds`` FDA monitoring steps (syncing when Theta is exceeded)."""
        try:
            return self._run(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_fn,
            )
        finally:
            close = getattr(self.inner, "close", None)
            if callable(close):  # e.g. offload(): remove what the run left on its link
                close()

    def _run(
        self, grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
    ) -> Result:
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        log(INFO, "")
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        self._reset_stats()
        result = Result()
        result.arrays = initial_arrays
        t_start = time.time()

        if evaluate_fn:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res

        global_arrays = initial_arrays
        prev_global: ArrayRecord | None = None
        epoch = 0  # number of syncs so far; nodes with node_epoch == epoch hold the global
        node_epoch: dict[int, int] = {}
        pending_broadcast = True
        theta = self.threshold
        states: list[dict[str, Any]] = []
        steps_since_sync = 0

        for step in range(1, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[FDA STEP %s/%s] epoch %s, Theta=%.6g", step, num_rounds, epoch, theta)
            rec: dict[str, Any] = {"step": step, "sync": 0, "threshold": theta}
            cfg = self._fda_config(train_config, P.MONITOR, epoch)
            send = global_arrays if pending_broadcast else ArrayRecord()
            msgs = list(self.inner.configure_train(step, send, cfg, grid))
            msgs = [
                self._prepare_monitor(
                    m, global_arrays, prev_global, epoch, node_epoch, pending_broadcast
                )
                for m in msgs
            ]
            down = sum(message_bytes(m) for m in msgs)
            replies = list(grid.send_and_receive(msgs, timeout=timeout))
            up = sum(message_bytes(r) for r in replies)
            states = [s for s in (self._parse_state(r) for r in replies) if s is not None]
            for s in states:
                node_epoch[s["node"]] = epoch
            if states and len(states) == len(msgs):
                pending_broadcast = False
            steps_since_sync += 1
            rec.update(monitor_bytes_down=down, monitor_bytes_up=up, nodes=len(states))
            est = self._estimate(states) if states else float("nan")
            rec["estimate"] = est
            log(
                INFO,
                "\t└──> variance estimate %.6g over %d nodes (%d B down, %d B up)",
                est,
                len(states),
                down,
                up,
            )
            train_metrics = self._monitor_metrics(states)
            if self.adaptive and steps_since_sync == 1 and math.isfinite(est):
                theta = adaptive_threshold(
                    theta,
                    self.adaptive_rho * est,
                    self.adaptive_beta,
                    self.theta_min,
                    first=(theta <= 0),
                )
                rec["threshold"] = theta

            forced = bool(self.max_period and steps_since_sync >= self.max_period)
            if states and (theta <= 0 or est > theta or forced):
                if forced and not (theta <= 0 or est > theta):
                    rec["forced"] = 1
                synced = self._sync(grid, step, epoch, states, timeout, rec)
                if synced is not None:
                    agg_arrays, agg_metrics = synced
                    prev_global, global_arrays = global_arrays, agg_arrays
                    result.arrays = global_arrays
                    epoch += 1
                    pending_broadcast = True
                    steps_since_sync = 0
                    if agg_metrics is not None:
                        train_metrics = agg_metrics
                    if self.evaluate_after_sync:
                        self._evaluate(
                            grid, step, global_arrays, evaluate_config, timeout, evaluate_fn, result
                        )
            self._finish_step(rec, train_metrics, result)

        if self.final_sync and steps_since_sync > 0 and states and num_rounds > 0:
            log(INFO, "")
            log(INFO, "[FDA FINAL SYNC]")
            rec = self.history[-1] if self.history else {"step": num_rounds}
            synced = self._sync(grid, num_rounds, epoch, states, timeout, rec, final=True)
            if synced is not None:
                global_arrays = synced[0]
                result.arrays = global_arrays
                if synced[1] is not None:
                    result.train_metrics_clientapp[num_rounds] = synced[1]
                if self.evaluate_after_sync:
                    self._evaluate(
                        grid,
                        num_rounds,
                        global_arrays,
                        evaluate_config,
                        timeout,
                        evaluate_fn,
                        result,
                    )
            self._finish_step(
                rec,
                result.train_metrics_clientapp.get(num_rounds, MetricRecord()),
                result,
                again=True,
            )

        self.stats["threshold"] = theta
        inner_stats = getattr(self.inner, "stats", None)
        if isinstance(inner_stats, dict):  # offload(): bytes that went over its link
            for key in ("link_bytes_sent", "link_bytes_received"):
                if key in inner_stats:
                    self.stats[key] = inner_stats[key]
        log(INFO, "")
        log(INFO, "FDA finished in %.2fs: %s", time.time() - t_start, self.summary_line())
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        return result

    def summary_line(self) -> str:
        s = self.stats
        return (
            f"{s['steps']} steps, {s['syncs']} syncs, "
            f"{s['bytes_down']} B down ({s['sync_bytes_down']} sync), "
            f"{s['bytes_up']} B up ({s['sync_bytes_up']} sync)"
        )

    def _prepare_monitor(
        self, msg, global_arrays, prev_global, epoch, node_epoch, pending_broadcast
    ) -> Message:
        """Per-node content: new global for nodes that need it, fda config present."""
        node = msg.metadata.dst_node_id
        content = RecordDict({k: v for k, v in msg.content.items()})
        needs_reset = node_epoch.get(node) != epoch
        if needs_reset and not pending_broadcast:
            arr_keys = list(content.array_records.keys())
            if len(arr_keys) == 1:
                content[arr_keys[0]] = global_arrays
            else:
                content["arrays"] = global_arrays
        if (
            needs_reset
            and self.variant == "linear"
            and prev_global is not None
            and node_epoch.get(node) != epoch - 1
        ):
            content[P.PREV] = prev_global
        if not any(P.PHASE in c for c in content.config_records.values()):
            content[FDA_CONFIG_KEY] = self._fda_config(ConfigRecord(), P.MONITOR, epoch)
        if not content.array_records:
            content["arrays"] = global_arrays if needs_reset else ArrayRecord()
        msg.content = content
        return msg

    def _sync(self, grid, step, epoch, states, timeout, rec, final: bool = False):
        """Ask every monitored node for its local model; aggregate with the inner strategy."""
        # Built by the inner strategy (with an empty ArrayRecord) so that wrappers such as
        # offload() can attach what the reply needs (e.g. an upload ticket).
        wanted = {s["node"] for s in states}
        cfg = ConfigRecord({P.PHASE: P.SYNC, P.EPOCH: epoch})
        msgs: list[Message] = []
        for m in self.inner.configure_train(step, ArrayRecord(), cfg, grid):
            node = m.metadata.dst_node_id
            if node in wanted:
                wanted.discard(node)
                if not any(P.PHASE in c for c in m.content.config_records.values()):
                    content = RecordDict(dict(m.content.items()))
                    content[FDA_CONFIG_KEY] = ConfigRecord(
                        {P.PHASE: P.SYNC, P.EPOCH: epoch, "server-round": step}
                    )
                    m.content = content
                msgs.append(m)
        for node in sorted(wanted):  # monitored nodes the inner strategy did not sample
            cfg_n = ConfigRecord({P.PHASE: P.SYNC, P.EPOCH: epoch, "server-round": step})
            msgs.append(
                Message(
                    RecordDict({FDA_CONFIG_KEY: cfg_n}),
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                )
            )
        down = sum(message_bytes(m) for m in msgs)
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
        up = sum(message_bytes(r) for r in replies)
        rec["sync_bytes_down"] = rec.get("sync_bytes_down", 0) + down
        rec["sync_bytes_up"] = rec.get("sync_bytes_up", 0) + up
        agg_arrays, agg_metrics = self.inner.aggregate_train(step, replies)
        log(INFO, "\t└──> sync: %d models received (%d B up)", len(replies), up)
        if agg_arrays is None:
            log(WARNING, "FDA: sync at step %s produced no model; keeping the global one", step)
            return None
        rec["final_sync" if final else "sync"] = 1
        self.stats["syncs"] += 1
        return agg_arrays, agg_metrics

    def _evaluate(self, grid, step, arrays, evaluate_config, timeout, evaluate_fn, result):
        cfg = ConfigRecord(dict(evaluate_config.items()))
        msgs = list(self.inner.configure_evaluate(step, arrays, cfg, grid))
        if msgs:
            replies = list(grid.send_and_receive(msgs, timeout=timeout))
            agg = self.inner.aggregate_evaluate(step, replies)
            if agg is not None:
                result.evaluate_metrics_clientapp[step] = agg
        if evaluate_fn:
            res = evaluate_fn(step, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[step] = res

    def _finish_step(self, rec, train_metrics, result, again: bool = False) -> None:
        """Fold the step's byte counts into stats, history and the Result metrics."""
        mdown, mup = rec.get("monitor_bytes_down", 0), rec.get("monitor_bytes_up", 0)
        sdown, sup = rec.get("sync_bytes_down", 0), rec.get("sync_bytes_up", 0)
        if again:  # final sync folded into the last step: only add its new bytes
            prev = self._counted_last
            sdown_new, sup_new = sdown - prev[0], sup - prev[1]
            self.stats["sync_bytes_down"] += sdown_new
            self.stats["sync_bytes_up"] += sup_new
            self.stats["bytes_down"] += sdown_new
            self.stats["bytes_up"] += sup_new
        else:
            self.stats["steps"] += 1
            self.stats["monitor_bytes_down"] += mdown
            self.stats["monitor_bytes_up"] += mup
            self.stats["sync_bytes_down"] += sdown
            self.stats["sync_bytes_up"] += sup
            self.stats["bytes_down"] += mdown + sdown
            self.stats["bytes_up"] += mup + sup
            self._counted_last = (sdown, sup)
            self.history.append(rec)
        rec["bytes_down"] = mdown + sdown
        rec["bytes_up"] = mup + sup
        rec["total_bytes"] = self.stats["bytes_down"] + self.stats["bytes_up"]
        metrics = MetricRecord(dict(train_metrics.items()))
        for key in ("sync", "final_sync", "bytes_down", "bytes_up", "total_bytes"):
            metrics[f"fda.{key.replace('_', '-')}"] = int(rec.get(key, 0))
        metrics["fda.threshold"] = float(rec["threshold"])
        est = rec.get("estimate", float("nan"))
        if math.isfinite(est):
            metrics["fda.estimate"] = float(est)
        result.train_metrics_clientapp[rec["step"]] = metrics

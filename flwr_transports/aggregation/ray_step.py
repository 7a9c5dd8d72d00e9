"""``aggregation=ray``: the server-side optimiser step run by the shard owners.

Flower's FedAdam, FedYogi, FedAdagrad and FedAvgM compute FedAvg's weighted mean and
then one elementwise step with state of their own (FedOpt's ``m_t``/``v_t`` and
``current_arrays``, FedAvgM's ``momentum_vector`` and ``current_arrays``). With
``aggregation=ray`` the shard owners, which already hold the weighted sum of their
elements, run that step on their elements, with Flower's own expressions (same NumPy
operations, same scalars, so the same dtypes: e.g. FedAdam's float32 model becomes
float64, as in Flower), and the step's state never enters the ServerApp:

* the state of shard j (the current model ``x``, ``m``, ``v``, the momentum) is what
  owner j's last step RETURNED: a Ray object in the object store of the owner's node,
  owned by the ServerApp's driver (so it outlives an owner that dies: its successor
  is handed the same object), replaced after every round's step has been collected;
* the element partition is fixed for the run (cut once from the first model sent),
  since the state is laid out by it;
* ``x``: FedOpt steps from the model it sent (``configure_train``), FedAvgM from its
  own last result; when the model sent is the one the owners computed (the
  ``ArrayRecord`` this wrapper returned, untouched), the owners already hold it, else
  the ServerApp hands each owner its slice of the model sent (round 1, or a model the
  app replaced between rounds).

:func:`shard_step_decision` is the ONE place that decides whether a strategy's step
can run on the shard owners; a strategy it refuses keeps the step in the ServerApp,
on the mean assembled from the shards, and one log line says why.
"""

from __future__ import annotations

import io
import logging
import math
import numbers
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from ..errors import ConfigError
from .layout import NPY_STYPE, npy_header
from .ray_common import ASSEMBLY_CHUNK, MAX_RESTARTS, RayClusterError, collect_pieces

log = logging.getLogger("flwr_transports")

#: the partition of the elements among the shard owners is cut on multiples of this
#: many bytes of the (approximate) payload layout: the digest windows (tests lower it)
STEP_GRAIN = 16 << 20
#: bytes of payload header counted per array when the partition is cut from the model
#: sent (its .npy header; the cut only needs to fall near a window boundary)
_NPY_HEAD = 128

#: Flower class name -> (step kind, hyper-parameter attributes read every round)
_KINDS = {
    "FedAdam": ("adam", ("eta", "beta_1", "beta_2", "tau")),
    "FedYogi": ("yogi", ("eta", "beta_1", "beta_2", "tau")),
    "FedAdagrad": ("adagrad", ("eta", "beta_1", "tau")),
    "FedAvgM": ("avgm", ("server_learning_rate", "server_momentum")),
}


def _flower_classes() -> dict[str, type]:
    from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi, fedopt

    return {"FedAdam": FedAdam, "FedYogi": FedYogi, "FedAdagrad": FedAdagrad,
            "FedAvgM": FedAvgM, "FedOpt": fedopt.FedOpt}


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def shard_step_decision(strategy) -> tuple[str | None, str]:
    """``(kind, reason)``: the step the shard owners run for ``strategy`` ("adam",
    "yogi", "adagrad", "avgm"), or None with the reason it stays in the ServerApp (None
    with an empty reason: the strategy has no server step, e.g. FedAvg, FedProx)."""
    cls = type(strategy)
    name = cls.__name__
    flower = _flower_classes()
    base = next((b for b in cls.__mro__ if b.__name__ in _KINDS
                 and flower.get(b.__name__) is b), None)
    if base is None:
        return None, ""
    kind, params = _KINDS[base.__name__]
    # what the shards reproduce is the Flower class's own code: a subclass must not
    # replace the parts that compute or keep the step
    opt = flower["FedOpt"]
    own = [("aggregate_train", base), ("configure_train", opt if kind != "avgm" else base)]
    if kind != "avgm":
        own.append(("_compute_deltat_and_mt", opt))
    for meth, owner in own:
        if getattr(cls, meth) is not owner.__dict__[meth]:
            return None, (f"{name} overrides {meth} (the shard owners reproduce "
                          f"{base.__name__}'s own step only)")
    if kind == "avgm" and not getattr(strategy, "server_opt", False):
        return None, ""  # FedAvgM without server learning rate or momentum: the mean
    bad = [p for p in params if not _real(getattr(strategy, p, None))]
    if bad:
        return None, f"{name}'s {', '.join(bad)} is not a finite real number"
    held = [a for a in ("m_t", "v_t", "momentum_vector") if getattr(strategy, a, None)]
    if kind == "avgm" and getattr(strategy, "current_arrays", None) is not None:
        held.append("current_arrays")
    if held:
        return None, (f"{name} already holds optimiser state ({', '.join(held)}); the "
                      "shard owners start from none")
    return kind, f"{base.__name__}'s server step runs on the shard owners"


def shard_trainer(strategy, cluster) -> tuple[Any, str]:
    """``(what training rounds call, what the log line adds)``: a :class:`ShardStep`
    around ``strategy`` when its server step runs on the shard owners of ``cluster``,
    else ``strategy`` itself (its step, if any, runs in the ServerApp on the mean
    assembled from the shards)."""
    kind, why = shard_step_decision(strategy)
    if kind is None:
        return strategy, (f"; its server step stays in the ServerApp: {why}" if why else "")
    cluster.step = ShardStep(strategy, kind, cluster)
    return cluster.step, f"; {why} (optimiser state in the Ray actors)"


# -- the actor's side: Flower's expressions on one shard's elements -----------------------
def server_step(kind: str, hp: dict, server_round: int, mean: dict[str, np.ndarray],
                state: dict | None, seed: dict | None) -> tuple[dict, dict]:
    """One step on one shard: ``(new x, new state)``. ``mean``: FedAvg's mean of the
    shard's elements (per array name); ``state``: what the last step returned (None
    before the first); ``seed``: the shard of the model to step from, when it is not
    the ``x`` of ``state``. The expressions are Flower 1.42's (fedadam.py, fedyogi.py,
    fedadagrad.py, fedopt.py, fedavgm.py), applied to slices: elementwise, so each
    element is computed exactly as Flower computes it."""
    st = dict(state or {})
    x = seed if seed is not None else st.get("x")
    if x is None or set(x) != set(mean):
        raise ValueError("the shard owner has no current model for these arrays (its "
                         "optimiser state does not match the round's mean)")
    for k, v in mean.items():
        if x[k].shape != v.shape:
            raise ValueError(f"array {k!r}: the shard's current model has "
                             f"{x[k].shape[0]} elements, the mean {v.shape[0]}")
    if kind == "avgm":
        pg = {k: x[k] - mean[k] for k in mean}  # old - new
        if hp["server_momentum"] > 0.0:
            mv = st.get("mom")
            if mv is None:
                mv = pg
            else:
                mv = {k: hp["server_momentum"] * mv[k] + pg[k] for k in mv}
            st["mom"] = mv
            pg = mv
        new = {k: np.asarray(x[k] - hp["server_learning_rate"] * pg[k]) for k in x}
        st["x"] = new
        return new, st
    b1, tau, eta = hp["beta_1"], hp["tau"], hp["eta"]
    delta = {k: v - x[k] for k, v in mean.items()}
    m = st.get("m")
    if not m:
        m = {k: np.zeros_like(v) for k, v in mean.items()}
    m = {k: b1 * v + (1 - b1) * delta[k] for k, v in m.items()}
    v_t = st.get("v")
    if not v_t:
        v_t = {k: np.zeros_like(v) for k, v in mean.items()}
    if kind == "adam":
        b2 = hp["beta_2"]
        v_t = {k: b2 * v + (1 - b2) * (delta[k] ** 2) for k, v in v_t.items()}
        step = (eta * np.sqrt(1 - np.power(b2, server_round + 1.0))
                / (1 - np.power(b1, server_round + 1.0)))
    elif kind == "yogi":
        b2 = hp["beta_2"]
        v_t = {k: v - (1.0 - b2) * (delta[k] ** 2) * np.sign(v - delta[k] ** 2)
               for k, v in v_t.items()}
        step = eta
    elif kind == "adagrad":
        v_t = {k: v + (delta[k] ** 2) for k, v in v_t.items()}
        step = eta
    else:
        raise ValueError(f"unknown server step {kind!r}")
    new = {k: np.asarray(xk + step * m[k] / (np.sqrt(v_t[k]) + tau)) for k, xk in x.items()}
    st.update(x=new, m=m, v=v_t)
    return new, st


# -- the ServerApp's side ----------------------------------------------------------------
def _flat(arr: Array) -> np.ndarray:
    """The elements of a NumPy ``Array`` in storage order: a read-only view of its
    ``.npy`` bytes, no copy. ValueError for a Fortran-ordered array."""
    f = io.BytesIO(arr.data)
    major, _ = np.lib.format.read_magic(f)
    reader = (np.lib.format.read_array_header_1_0 if major == 1
              else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = reader(f)
    if fortran and len(shape) > 1:
        raise ValueError("Fortran-ordered: the owners step C-ordered arrays")
    return np.frombuffer(arr.data, dtype=dtype, count=math.prod(shape), offset=f.tell())


def partition(arrays: list[tuple[str, int, int]], k: int, grain: int = 0
              ) -> list[dict[str, tuple[int, int]]]:
    """``arrays``: (name, element count, itemsize) in payload order. At most ``k``
    contiguous shards, each ``{name: (lo, hi)}``, cut near multiples of ``grain``
    bytes of the payload (as :func:`~.ray_shards.cut` cuts on the digest windows)."""
    grain = grain or STEP_GRAIN
    offs, pos = [], 4096  # the safetensors header
    for _name, n, z in arrays:
        pos += _NPY_HEAD
        offs.append(pos)
        pos += n * z
    n_grain = max(1, -(-pos // grain))
    k = max(1, min(k, n_grain))
    per = -(-n_grain // k)
    bounds = [min(pos, j * per * grain) for j in range(k)] + [pos]
    out = []
    for j in range(k):
        own = {}
        for (name, n, z), start in zip(arrays, offs, strict=True):
            lo = min(n, max(0, -(-(bounds[j] - start) // z)))
            hi = min(n, max(0, -(-(bounds[j + 1] - start) // z)))
            if hi > lo:
                own[name] = (lo, hi)
        if own:
            out.append(own)
    return out


class ShardStep:
    """The inner strategy as ``aggregation=ray`` runs it when its server step runs on
    the shard owners: ``configure_train`` is FedAvg's (the model sent is noted, not
    copied: Flower's FedOpt keeps a NumPy copy of it), ``aggregate_train`` is FedAvg's
    (reply checks, metrics, the mean: streamed from the shards or, on a round that
    does not stream, Flower's own from decoded replies) followed by the owners' step.
    Everything else is the inner strategy's."""

    def __init__(self, inner, kind: str, cluster):
        self.inner, self.kind, self.cluster = inner, kind, cluster
        self.state: list[Any] = []  # per shard: ObjectRef of its state (None at first)
        self.seed: list[Any] = []  # per shard: ObjectRef of its slice of the model sent
        self.order: list[str] = []  # array names of the model sent, in its order
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.last: ArrayRecord | None = None  # the model the owners computed last
        self._last_ids: tuple = ()
        self._stepped = 0  # the round last stepped (one step per round)
        self.steps = 0  # steps run on the owners (tests, stats)
        self.seeded = 0  # times the owners were handed the model sent
        #: why the step went back to the ServerApp (decided on the first model sent,
        #: before any state exists); None while it runs on the owners
        self.off: str | None = None

    def reset(self) -> None:
        """Forget the owners' state (the run ended: its Ray objects went with the
        driver's connection); a later ``start`` steps from scratch."""
        self.state, self.seed, self.last, self._last_ids, self._stepped = [], [], None, (), 0

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- configure ------------------------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):
        from flwr.serverapp.strategy import FedAvg

        if self.off is None and not self.steps:
            why = self._unsteppable(arrays)
            if why:  # no state anywhere yet: the inner strategy keeps its own step
                self.off = why
                self.cluster.step = None
                log.info("flwr-transports: aggregation=ray: %s's server step stays in the "
                         "ServerApp: %s", type(self.inner).__name__, why)
        if self.off is not None:
            return self.inner.configure_train(server_round, arrays, config, grid)
        self._sent(arrays)
        return FedAvg.configure_train(self.inner, server_round, arrays, config, grid)

    @staticmethod
    def _unsteppable(arrays: ArrayRecord) -> str:
        for name, a in arrays.items():
            if a.stype != NPY_STYPE or a.dtype == "bfloat16":
                return f"array {name!r} is {a.dtype} ({a.stype})"
            try:
                _flat(a)
            except (ValueError, TypeError) as exc:
                return f"array {name!r}: {exc}"
        return ""

    def _ids(self, rec: ArrayRecord) -> tuple:
        return tuple((n, id(a), id(a.data)) for n, a in rec.items())

    def _sent(self, arrays: ArrayRecord) -> None:
        """Note the model sent; hand the owners their slices of it when they step from
        it and do not hold it (FedOpt: every model that is not the one they computed;
        FedAvgM: the first model only, as Flower's ``current_arrays``)."""
        if self.kind == "avgm" and self.state and self.state[0] is not None:
            return  # FedAvgM steps from its own last result
        if self.last is not None and arrays is self.last and self._ids(arrays) == self._last_ids:
            return  # the owners hold it (their last result, untouched)
        items = list(arrays.items())
        why = self._unsteppable(arrays)
        if why:  # the owners hold state already: it cannot move back
            raise ConfigError(
                f"aggregation=ray: the model sent cannot take {type(self.inner).__name__}'s "
                f"server step on the shard owners ({why}); set streaming_aggregation = "
                "False on the strategy class or use aggregation=streaming")
        cl = self.cluster
        ray = cl.connect()
        flats = {name: _flat(a) for name, a in items}
        layout = [(n, len(f), f.dtype.itemsize) for n, f in flats.items()]
        if cl.pinned is None:
            n_win = max(1, -(-sum(n * z for _, n, z in layout) // STEP_GRAIN))
            parts = partition(layout, cl.shard_count(n_win))
            cl.pinned = ([n for n, c, _ in layout if c], parts)
            self.state = [None] * len(parts)
        order, parts = cl.pinned
        ends = {n: max(p[n][1] for p in parts if n in p) for n in order}
        if [n for n, c, _ in layout if c] != order or any(
                ends[n] != len(flats[n]) for n in order):
            raise ConfigError("aggregation=ray: the model sent has other arrays than the "
                              "one the shard owners' optimiser state is laid out by")
        self.order = [n for n, _ in items]
        self.shapes = {n: tuple(a.shape) for n, a in items}
        cl.ensure(len(parts))
        self.seed = [ray.put({n: np.array(flats[n][lo:hi]) for n, (lo, hi) in s.items()})
                     for s in parts]
        self.seeded += 1

    # -- aggregate ------------------------------------------------------------------
    def aggregate_train(self, server_round, replies):
        from flwr.serverapp.strategy import FedAvg

        if self.off is not None:
            return self.inner.aggregate_train(server_round, replies)
        arrays, metrics = FedAvg.aggregate_train(self.inner, server_round, replies)
        if arrays is None or arrays is self.last:  # (streamed: the owners stepped)
            return arrays, metrics
        return self.from_mean(server_round, arrays), metrics

    def _hp(self) -> dict:
        """The hyper-parameters, read off the strategy every round (as Flower does)."""
        params = next(p for kind, p in _KINDS.values() if kind == self.kind)
        return {p: getattr(self.inner, p) for p in params}

    def from_mean(self, server_round: int, mean: ArrayRecord) -> ArrayRecord:
        """The step on a mean the ServerApp holds (a round aggregated from decoded
        replies): each owner gets its slice of the mean."""
        cl = self.cluster
        self._configured()
        ray = cl.connect()
        _order, parts = cl.pinned
        flats = {n: np.ascontiguousarray(a.numpy()).reshape(-1) for n, a in mean.items()}
        pieces = [ray.put({n: (lo, flats[n][lo:hi]) for n, (lo, hi) in s.items()})
                  for s in parts]
        del flats

        def call(j, spec):
            return cl.actors[j].step_mean.options(num_returns=2).remote(
                pieces[j], spec, self.state[j], self.seed[j])

        return self._run(server_round, call, cl.replace)

    def from_sums(self, stream, total: float) -> ArrayRecord:
        """The step on the owners' weighted sums of a streamed round."""
        cl = self.cluster

        def call(j, spec):
            return cl.actors[j].finish_step.options(num_returns=2).remote(
                float(total), spec, self.state[j], self.seed[j])

        return self._run(stream.round, call, stream._refold)

    def _run(self, server_round: int, call, on_dead) -> ArrayRecord:
        """Every owner steps its shard; the new model is collected from them (each
        array's bytes allocated once). An owner's new state replaces its old one as
        soon as its step returned (a Ray object the driver owns: the old one is freed
        then, not after every shard stepped); an owner that dies before that steps again
        in its successor from the old state (``on_dead`` restores what the step needs),
        one that dies after it is replaced by a successor that serves the new model
        from the new state."""
        self._configured()
        if self._stepped == server_round:
            raise RuntimeError(f"aggregation=ray: the server step of round {server_round} "
                               "was asked for twice")
        cl = self.cluster
        ray = cl.connect()
        spec = {"kind": self.kind, "hp": self._hp(), "round": int(server_round)}
        k = len(cl.pinned[1])
        refs = [call(j, spec) for j in range(k)]
        infos: list[dict] = [None] * k  # type: ignore[list-item]

        def settle(j):
            for attempt in range(MAX_RESTARTS + 1):
                try:
                    infos[j] = ray.get(refs[j][0])
                    self.state[j], self.seed[j] = refs[j][1], None  # (the old one goes)
                    return
                except ray.exceptions.RayActorError:
                    if attempt == MAX_RESTARTS:
                        raise
                    log.warning("flwr-transports: round %d: shard actor %d died before its "
                                "server step; a new one takes its state", server_round, j)
                    on_dead(j)
                    refs[j] = call(j, spec)

        try:
            for j in range(k):
                settle(j)
            dtypes: dict[str, np.dtype] = {}
            for info in infos:
                for n, (_lo, _cnt, dt) in info.items():
                    if dtypes.setdefault(n, np.dtype(dt)) != np.dtype(dt):
                        raise RuntimeError(f"array {n!r}: the shard owners' steps gave "
                                           "different dtypes")
            written = self._write(server_round, infos, dtypes)
            if written is not None:
                self.last, self._last_ids = written, self._ids(written)
                self._stepped = server_round
                self.steps += 1
                return written
            bodies = {}
            from .._membuf import alloc_bytes

            for n in self.order:
                dt = dtypes.get(n)
                if dt is None:  # no elements
                    dt = np.dtype(np.float64)
                head = npy_header(dt, self.shapes[n], False)
                obj, view = alloc_bytes(len(head) + math.prod(self.shapes[n]) * dt.itemsize)
                view[:len(head)] = head
                bodies[n] = (obj, np.frombuffer(view, dtype=np.uint8, offset=len(head)),
                             dt.itemsize, dt)
            for j in range(k):
                for attempt in range(MAX_RESTARTS + 1):
                    try:
                        self._collect(j, infos[j], bodies, ASSEMBLY_CHUNK)
                        break
                    except ray.exceptions.RayActorError:
                        if attempt == MAX_RESTARTS:
                            raise
                        log.warning("flwr-transports: round %d: shard actor %d died while "
                                    "the new model was collected; a new one serves it from "
                                    "the state its step left", server_round, j)
                        cl.replace(j)
                        ray.get(cl.actors[j].serve.remote(
                            self.state[j], {n: lo for n, (lo, _c, _d) in infos[j].items()}))
        except RayClusterError:
            raise
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, ValueError | ArithmeticError) else
                   RayClusterError(f"aggregation=ray: the server step of round "
                                   f"{server_round} failed on a shard owner: {exc}")) from exc
        except Exception as exc:
            raise RayClusterError(f"aggregation=ray: the server step of round "
                                  f"{server_round} failed: {exc}") from exc
        out = ArrayRecord()
        for n in self.order:
            obj, _body, _z, dt = bodies[n]
            out[n] = Array(dtype=str(dt), shape=self.shapes[n], stype=NPY_STYPE,
                           data=obj if isinstance(obj, bytes) else bytes(obj))
        self.last, self._last_ids = out, self._ids(out)
        self._stepped = server_round
        self.steps += 1
        return out

    def _write(self, server_round: int, infos: list[dict], dtypes: dict):
        """The new model written to the store by the owners (:mod:`.ray_publish`): the
        stub record that stands for it; None when the ServerApp assembles it."""
        from .ray_publish import OutArray, output_layout, write_model

        cl = self.cluster
        outs = []
        for n in self.order:
            dt = dtypes.get(n, np.dtype(np.float64))
            outs.append(OutArray(n, n, str(dt), self.shapes[n], NPY_STYPE,
                                 npy_header(dt, self.shapes[n], False), dt.itemsize))
        if cl.sink is None or not cl.sink.usable(server_round, sum(
                len(o.npy) + o.count * o.itemsize for o in outs)):
            return None
        ray = cl.connect()

        def recover(j: int) -> None:
            cl.replace(j)
            ray.get(cl.actors[j].serve.remote(
                self.state[j], {n: lo for n, (lo, _c, _d) in infos[j].items()}))

        lay = output_layout(outs, [{n: (lo, c) for n, (lo, c, _d) in info.items()}
                                   for info in infos])
        stub = write_model(cl, cl.sink, server_round, lay, recover)
        for x in cl.actors[:len(infos)]:
            x.drop.remote()
        return stub

    def _configured(self) -> None:
        if self.cluster.pinned is None:  # as Flower's FedOpt / FedAvgM say it
            from flwr.serverapp.exception import AggregationError

            raise AggregationError(reason="Current arrays not set. Ensure that "
                                   "`configure_train` has been called before aggregation.")

    def _collect(self, j: int, info: dict, bodies: dict, chunk: int) -> None:
        x = self.cluster.actors[j]
        collect_pieces(self.cluster.ray, x, {n: (lo, cnt) for n, (lo, cnt, _dt) in
                                             info.items()}, bodies, chunk)
        x.drop.remote()

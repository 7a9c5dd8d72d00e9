"""``aggregation=ray``: the weighted mean folded by K Ray actors, straight from the store.

The model's elements are cut into K contiguous shards on the 16 MiB windows of the
``sha256t`` digest (cut once per round, on the first reply that counts, whose layout
the wrapper has checked against the model the server SENT). Ray actor k owns shard k:
its accumulator holds only those elements. For every accepted upload the ServerApp
reads the payload header (a few KiB), and actor k reads the windows that hold its
elements straight from the store (ranged GETs of the presigned URL the ServerApp
issued: clients never hand over anything an actor reads with), hashes each window and
folds exactly the bytes it hashed. The actors return their windows' leaf hashes; the
ServerApp combines them into the payload's ``sha256t`` root (a window two shards share
is read by both and must hash the same) and compares it with the reference. A reply
counts only when the root matches; anything folded that does not count is excluded
exactly: the shard sums are rebuilt from the store, never subtracted.

An actor that dies is replaced and its shard re-folded from the store (the uploads
stay there until the phase ends), each window's hash checked against the leaves that
made the reply's verified root: an upload changed in the store in between fails the
round with :class:`StoreChangedError` (it was counted already; nothing else gives the
sum streaming aggregation gives). A cluster that cannot be reached fails the run with
:class:`RayClusterError` (the wrapper then removes everything from the bucket). The
actors are killed when the run ends.

With a server-side optimiser (FedAdam, FedYogi, FedAdagrad, FedAvgM) the owners run
its step on their shards, with its state kept by them (:mod:`.ray_step`). The new model
is written to the store by the owners as the parts of one multipart upload and handed
out from there (``ray_model=store``, :mod:`.ray_publish`: the ServerApp holds a stub
record, never the model); with ``ray_model=server`` (or where that does not apply) it
is assembled in the ServerApp from the shards once per round; see docs/aggregation.md.

``file://`` on a shared filesystem folds the same way: the owners open the upload file
at the path the link issued (every Ray node must mount it at the same path: one that
does not find a file the ServerApp sees fails the run with :class:`NotSharedError`) and
read its windows with bounded ``os.pread`` calls; the next model is assembled in the ServerApp.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import wait
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from .._membuf import alloc_bytes
from ..codec import DIGEST_ALGO, PayloadError
from ..errors import ConfigError
from .fold import WINDOW, Source, WeightedSum, _pool, _to_bf16
from .layout import Plan, Unfoldable, layout_of, npy_header, plan_payload
from .ray_common import ASSEMBLY_CHUNK, MAX_RESTARTS, RayClusterError, collect_pieces
from .round import Accepted, _digest_of

log = logging.getLogger("flwr_transports")

INSTALL_HINT = "pip install 'flwr-transports[ray]'"
#: CPUs each shard actor reserves on a cluster of its own: small. Under Flower's
#: Simulation runtime (its ClientApps are Ray actors that take the CPUs) none: the
#: actors neither starve the ClientApps nor wait for them
ACTOR_CPUS = 0.1
#: seconds a new actor may take to answer its first call
START_TIMEOUT = 120.0
SIMULATION_WAIT = 60.0  # seconds the ServerApp waits for the Simulation runtime's Ray
HEADER_UNIT = 1 << 20  # the ServerApp reads payload headers in units this small


class NotVisible(PayloadError):
    """A shard owner cannot find a ``file://`` upload at the path the ServerApp gave it
    (the ServerApp then checks whether IT still sees the file: if so, that owner's node
    does not share the filesystem, and the run fails with :class:`NotSharedError`)."""


class NotSharedError(RayClusterError):
    """``file://`` with ``aggregation=ray``: a shard owner's Ray node does not see the
    link's directory (every Ray node must mount the same filesystem at the same path)."""


class StoreChangedError(RayClusterError):
    """A reply's upload, verified and counted in this round, read differently (or not
    at all) when a replaced shard owner re-folded it from the store: the round's sum
    cannot be rebuilt from what was verified, so the run fails rather than count bytes
    that were never checked against the reply's digest."""


def in_flower_simulation() -> bool:
    """Whether this process runs Flower's Simulation runtime (its ClientApps are Ray
    actors holding the cluster's CPUs: shard actors then reserve none)."""
    return "flwr.server.superlink.fleet.vce" in sys.modules


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"aggregation=ray needs Ray on the ServerApp and on the cluster "
                          f"({INSTALL_HINT})") from exc
    return ray


# -- the cut ---------------------------------------------------------------------------
def cut(plan: Plan, k: int) -> list[dict[int, tuple[int, int]]]:
    """Per shard, ``{array index: (lo, hi)}``: the elements whose first byte lies in
    that shard's windows of ``plan`` (at most ``k`` shards, each owning elements)."""
    n_win = max(1, -(-plan.size // WINDOW))
    k = max(1, min(k, n_win))
    per = -(-n_win // k)
    bounds = [min(plan.size, j * per * WINDOW) for j in range(k)] + [plan.size]
    out = []
    for j in range(k):
        lo_b, hi_b = bounds[j], bounds[j + 1]
        own = {}
        for idx, a in enumerate(plan.arrays):
            z, n = a.itemsize, a.count
            if n == 0:
                continue
            lo = min(n, max(0, -(-(lo_b - a.data_start) // z)))
            hi = min(n, max(0, -(-(hi_b - a.data_start) // z)))
            if hi > lo:
                own[idx] = (lo, hi)
        if own:
            out.append(own)
    return out


def windows_of(plan: Plan, shards: list[dict[int, tuple[int, int]]], j: int
               ) -> tuple[int, int]:
    """The windows ``[t0, t1)`` of THIS payload that shard ``j`` reads: those covering
    the bytes from its first element (0 for the first shard: the header) to the next
    shard's first element (the payload's end for the last)."""
    def first_byte(s: dict[int, tuple[int, int]]) -> int:
        idx = min(s)
        a = plan.arrays[idx]
        return a.data_start + s[idx][0] * a.itemsize

    lo = 0 if j == 0 else first_byte(shards[j])
    hi = plan.size if j == len(shards) - 1 else first_byte(shards[j + 1])
    return lo // WINDOW, -(-hi // WINDOW)


# -- the actor's side ------------------------------------------------------------------
class _ShardAcc:
    """The accumulator of one array's owned elements ``[lo, hi)``."""

    def __init__(self, plan, lo: int, hi: int):
        self.plan, self.lo, self.hi = plan, lo, hi
        self.arr = np.empty(hi - lo, dtype=plan.acc_dtype)
        self.data = None


class ShardSum(WeightedSum):
    """``sum_i w_i * x_i`` over the elements one shard owns (see :func:`cut`), folded
    from the windows it reads: the fold and straddling-element logic of
    :class:`~.fold.WeightedSum`, with every write clipped to the owned elements."""

    def __init__(self, plan: Plan, own: dict[int, tuple[int, int]]):
        self.signature = plan.signature()
        self.accs = [_ShardAcc(a, *own.get(i, (0, 0))) for i, a in enumerate(plan.arrays)]
        self.folded, self.total, self.dirty, self.done = [], 0, False, False

    def _owns(self, k: int, i: int) -> bool:  # a straddling element this shard owns
        acc = self.accs[k]
        return acc.lo <= i < acc.hi

    def _fold_into(self, acc, i, mv, m, w, first):  # clipped to the owned elements
        a, b = max(i, acc.lo), min(i + m, acc.hi)
        if a >= b:
            return
        z = acc.plan.itemsize
        WeightedSum._fold_into(acc, a - acc.lo, mv[(a - i) * z:(b - i) * z], b - a, w, first)

    def fold_windows(self, src: Source, plan: Plan, t0: int, t1: int, weight: float,
                     ident: object = None) -> list[bytes]:
        """Fold the owned elements of windows ``[t0, t1)``; return their leaf hashes."""
        if not self.compatible(plan):
            raise Unfoldable("payload layout differs from the other replies'")
        if src.size != plan.size:
            raise PayloadError(f"payload has {src.size} bytes, planned for {plan.size}")
        first = not self.folded
        segs = plan.segments()
        w = float(weight)
        try:
            futs = [_pool().submit(self._window, src, plan, segs, t, w, first)
                    for t in range(t0, t1)]
            wait(futs)
            parts = [f.result() for f in futs]
            self._fold_fragments(parts, w, first)
        except BaseException:
            self.dirty = True
            raise
        self.folded.append((ident, weight))
        self.total += weight
        return [leaf for leaf, _ in parts]

    def shard_mean(self, total: float) -> dict[int, tuple[int, np.ndarray]]:
        """``{array index: (lo, mean of the owned elements in the output dtype)}``."""
        out = {}
        for k, acc in enumerate(self.accs):
            if acc.hi <= acc.lo:
                continue
            a = acc.plan
            np.divide(acc.arr, total, out=acc.arr)
            if a.kind == "bf16":
                out[k] = (acc.lo, np.frombuffer(_to_bf16(acc.arr), dtype="<u2"))
            elif a.acc_dtype == a.out_dtype:
                out[k] = (acc.lo, acc.arr)
            else:
                out[k] = (acc.lo, acc.arr.astype(a.out_dtype, casting="unsafe"))
        return out


class ShardOwner:
    """The Ray actor that owns one shard (plain class; :func:`_actor_class` wraps it)."""

    def __init__(self, j: int):
        self.j = j
        self.sum: ShardSum | None = None
        self.out: dict[int, tuple[int, np.ndarray]] | None = None
        self._http = None

    def ping(self) -> int:
        return os.getpid()

    def reset(self, plan: Plan, own: dict[int, tuple[int, int]]) -> None:
        self.sum = ShardSum(plan, own)

    def fold(self, remote: dict[str, Any], plan: Plan, t0: int, t1: int, weight: float,
             ident: Any = None) -> list[bytes]:
        """Read windows ``[t0, t1)`` of the object ``remote`` describes (presigned GET
        URL, sizes, encryption key; or, for ``file://``, the upload's path: from the
        ServerApp), hash and fold them."""
        if remote.get("kind") == "file":
            src = open_file_upload(remote)
            try:
                return self.sum.fold_windows(Source(src.size, src.read), plan, t0, t1,
                                             weight, ident)
            finally:
                src.close()
        from ..links.s3_http import HttpTransport, RangedReader

        if self._http is None:
            self._http = HttpTransport(retries=int(remote.get("retries", 5)),
                                       read_timeout=float(remote.get("read_timeout", 120)))
        reader = RangedReader(self._http, remote["url"], remote["size"], remote["enc"],
                              remote["range_stored"], remote["concurrency"],
                              f"{remote['label']} (shard {self.j})", False)
        # read ahead within this shard's windows only (not into the next shard's)
        end = min(reader.layout.size, t1 * WINDOW)
        reader.n = min(reader.n, -(-end // reader.plain_unit))
        try:
            return self.sum.fold_windows(Source(reader.layout.size, reader.read), plan,
                                         t0, t1, weight, ident)
        finally:
            reader.close()

    def finish_step(self, total: float, spec: dict, state: dict | None, seed: dict | None
                    ) -> tuple[dict, dict]:
        """The server step (:mod:`.ray_step`) on this shard's mean: ``({array name:
        (lo, count, dtype)} of the new model, the new state)``."""
        s, self.sum = self.sum, None
        mean, los = {}, {}
        for k, (lo, arr) in s.shard_mean(total).items():
            name = s.accs[k].plan.name
            mean[name], los[name] = arr, lo
        return self._step(mean, los, spec, state, seed)

    def step_mean(self, pieces: dict, spec: dict, state: dict | None, seed: dict | None
                  ) -> tuple[dict, dict]:
        """The server step on a mean the ServerApp computed (``{name: (lo, elements)}``:
        a round aggregated from decoded replies)."""
        return self._step({n: a for n, (_lo, a) in pieces.items()},
                          {n: lo for n, (lo, _a) in pieces.items()}, spec, state, seed)

    def _step(self, mean, los, spec, state, seed):
        from .ray_step import server_step

        new, st = server_step(spec["kind"], spec["hp"], spec["round"], mean, state, seed)
        self.out = {n: (los[n], np.ascontiguousarray(v).reshape(-1)) for n, v in new.items()}
        return {n: (lo, len(a), a.dtype.str) for n, (lo, a) in self.out.items()}, st

    def serve(self, state: dict, los: dict[str, int]) -> None:
        """Serve the new model from the state a (dead) predecessor's step returned."""
        self.out = {n: (lo, state["x"][n].reshape(-1)) for n, lo in los.items()}

    def finish(self, total: float) -> dict[int, tuple[int, int]]:
        """Divide by the total weight; ``{array index: (lo, count)}`` of the result."""
        s, self.sum = self.sum, None
        self.out = s.shard_mean(total)
        return {k: (lo, len(arr)) for k, (lo, arr) in self.out.items()}

    def piece(self, k: int | str, a: int, b: int) -> np.ndarray:
        """Elements ``[a, b)`` (relative to the shard) of array ``k`` of the mean (an
        array index; after a server step an array name)."""
        return self.out[k][1][a:b]

    def write_part(self, spec: dict, foreign: list) -> tuple[int, str, list[bytes]]:
        """Fill one part of the next model's payload (:mod:`.ray_publish`), hash its
        windows and PUT it to the presigned ``UploadPart`` URL the ServerApp issued:
        ``(part number, ETag, leaf hashes)``."""
        import ray

        from ..links.s3_http import HttpTransport
        from .ray_publish import fill_part, leaves_of

        if self._http is None:
            self._http = HttpTransport(retries=int(spec.get("retries", 5)),
                                       read_timeout=float(spec.get("read_timeout", 120)))
        buf = fill_part(self.out, spec, foreign, ray.get)
        leaves = leaves_of(buf)
        if spec.get("enc"):  # encrypt=true: the link's chunks, sealed here
            from .ray_publish import seal_part

            buf = seal_part(buf, spec["enc"], spec["at"], spec["total"])
        etag = self._http.put(spec["url"], buf, f"part {spec['num']} of the next model "
                              f"(shard {self.j})", md5=bool(spec.get("md5", True)))
        return spec["num"], etag, leaves

    def drop(self) -> None:
        self.out = None


def open_file_upload(remote: dict[str, Any]):
    """A ``file://`` upload opened for bounded ``pread``s (:func:`~..links.fs.open_payload`:
    no symlink, a regular file of exactly the size the reference gave, one hard link,
    the link's owner), at the path the ServerApp's link issued. Missing here:
    :class:`NotVisible` (the ServerApp decides whether the upload went away or this
    node does not share the filesystem)."""
    from ..links.base import LinkError
    from ..links.fs import open_payload

    path = remote["path"]
    try:
        return open_payload(path, int(remote["size"]), owner=remote.get("owner"))
    except LinkError as exc:
        if os.path.lexists(path):
            raise
        where = ("its directory is missing" if not os.path.isdir(os.path.dirname(path))
                 else "no such file")
        raise NotVisible(f"{remote.get('label', path)}: not found at {path!r} on "
                         f"{_node()} ({where})") from exc


def _node() -> str:
    import socket

    return f"host {socket.gethostname()}"


_ACTOR = None


def _actor_class(ray):
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = ray.remote(ShardOwner)
    return _ACTOR


# -- the ServerApp's side --------------------------------------------------------------
class RayCluster:
    """The run's connection to Ray and its shard actors (one per shard, reused across
    rounds; killed by :meth:`close`)."""

    def __init__(self, address: str | None = None, shards: int = 0):
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.want = shards
        self.ray = None
        self.started = False  # this run called ray.init (and shuts it down at close)
        self.actors: list[Any] = []
        self.names: list[str] = []
        self.history: list[str] = []  # every actor name this run created (tests)
        self.restarts = 0
        self._tag = secrets.token_hex(4)
        self._temp: str | None = None  # the session dir of a Ray this run started
        self._lock = threading.Lock()
        #: test hook: called with (upload number, cluster) after each upload's folds
        #: were submitted (the fault tests kill an actor there)
        self.after_submit = None
        #: the server step run by the owners (:class:`~.ray_step.ShardStep`), if any
        self.step = None
        #: where the owners write the next model (the offload wrapper's, see
        #: :mod:`.ray_publish`); None: the ServerApp assembles it
        self.sink = None
        #: test hook: called with (part indexes about to be written, cluster)
        self.before_write = None
        #: with a server step: (array names in payload order, per shard {name: (lo,
        #: hi)}): the partition the owners' optimiser state is laid out by, fixed for
        #: the run (see :meth:`shards_for`)
        self.pinned: tuple[list[str], list[dict[str, tuple[int, int]]]] | None = None

    def connect(self):
        if self.ray is not None:
            if not self.ray.is_initialized():  # never a new Ray behind the user's back
                raise RayClusterError(
                    f"aggregation=ray lost its connection to the Ray cluster "
                    f"{self.address or '(local)'}; the run stops (its objects are removed "
                    "from the store)")
            return self.ray
        ray = import_ray()
        if not self.address and not ray.is_initialized() and in_flower_simulation():
            # Flower's Simulation runtime starts the ServerApp's thread, THEN its Ray:
            # wait for that Ray rather than race it with a second one
            t0 = time.monotonic()
            while not ray.is_initialized() and time.monotonic() - t0 < SIMULATION_WAIT:
                time.sleep(0.1)
        try:
            if not ray.is_initialized():  # Flower's Simulation runtime: its Ray is reused
                kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
                if self.address:
                    ray.init(address=self.address, **kw)
                else:
                    log.info("flwr-transports: aggregation=ray: no RAY_ADDRESS / "
                             "ray_address: starting a local Ray cluster (development)")
                    # its session files go with it (not left in /tmp/ray)
                    self._temp = tempfile.mkdtemp(prefix="ftx-ray-")
                    ray.init(_temp_dir=self._temp, **kw)
                self.started = True
        except Exception as exc:
            raise RayClusterError(
                f"aggregation=ray cannot connect to the Ray cluster "
                f"{self.address or '(local)'}: {exc}; start it (ray start --head) or set "
                "RAY_ADDRESS / ray_address= to its address") from exc
        self.ray = ray
        return ray

    def shard_count(self, n_win: int) -> int:
        if self.want:
            return self.want
        try:
            cpus = int(self.ray.cluster_resources().get("CPU", 2))
        except Exception:  # noqa: BLE001 - a count is only a default
            cpus = 2
        return max(1, min(n_win, 64, max(2, cpus // 2)))

    def shards_for(self, plan: Plan) -> list[dict[int, tuple[int, int]]]:
        """The shards of a round laid out like ``plan``: :func:`cut` on its windows, or,
        with a server step on the owners, the run's fixed partition (any contiguous
        partition folds: :func:`windows_of` reads the windows each shard touches).
        Raises Unfoldable when the payload cannot be folded into that partition (the
        round is then aggregated from decoded replies and the step applied to that)."""
        if self.pinned is None:
            return cut(plan, self.shard_count(-(-plan.size // WINDOW)))
        order, parts = self.pinned
        if [a.name for a in plan.arrays if a.count] != order:
            raise Unfoldable("the reply's arrays are in another order than the model the "
                             "shard owners' optimiser state is laid out by")
        for a in plan.arrays:
            if a.kind == "bf16" or (a.fortran and len(a.shape) > 1):
                raise Unfoldable(f"array {a.name!r} is bfloat16 or Fortran-ordered: the "
                                 "server step on the shard owners folds C-ordered arrays "
                                 "of NumPy dtypes")
        idx = {a.name: i for i, a in enumerate(plan.arrays)}
        return [{idx[n]: r for n, r in part.items()} for part in parts]

    def _new_actor(self, j: int):
        ray = self.connect()
        name = f"ftx-shard-{self._tag}-{j}-{self.restarts}"
        cpus = 0 if in_flower_simulation() else ACTOR_CPUS
        actor = _actor_class(ray).options(
            name=name, num_cpus=cpus, max_restarts=0, max_concurrency=1,
            scheduling_strategy="SPREAD").remote(j)
        self.history.append(name)
        try:
            ray.get(actor.ping.remote(), timeout=START_TIMEOUT)
        except Exception as exc:
            self._kill(actor)
            raise RayClusterError(f"aggregation=ray: a shard actor did not start on the "
                                  f"Ray cluster {self.address or '(local)'}: {exc}") from exc
        return actor, name

    def ensure(self, k: int) -> None:
        self.connect()
        while len(self.actors) < k:
            actor, name = self._new_actor(len(self.actors))
            self.actors.append(actor)
            self.names.append(name)

    def replace(self, j: int) -> None:
        self.restarts += 1
        self._kill(self.actors[j])
        self.actors[j], self.names[j] = self._new_actor(j)

    def _kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - a dead actor / cluster: nothing to kill
            log.debug("ray.kill: %s", exc)

    def close(self) -> None:
        if self.ray is None:
            return
        if self.ray.is_initialized():  # (a call on a lost connection would start a Ray)
            for a in self.actors:
                self._kill(a)
        self.actors, self.names = [], []
        if self.step is not None:  # its state is the driver's: gone with the connection
            self.step.reset()
        self.pinned = None
        if self.started:
            try:
                self.ray.shutdown()
            except Exception as exc:  # noqa: BLE001
                log.debug("ray.shutdown: %s", exc)
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None
        self.ray, self.started = None, False


class RaySum:
    """What :func:`~.train.streaming_aggregate_train` needs of a settled sum: ``total``,
    ``accs[i].plan`` (names, dtypes, shapes) and ``mean()`` (assembled from the shards)."""

    def __init__(self, settle: RayRoundStream, plan: Plan, total: float):
        self._s, self.total = settle, total
        self.accs = [_PlanOnly(a) for a in plan.arrays]
        self.plan = plan

    def mean(self) -> ArrayRecord:
        return self._s.assemble(self.plan, self.total)


class _PlanOnly:
    def __init__(self, plan):
        self.plan = plan


class RayRoundStream:
    """The ``RoundStream`` of ``aggregation=ray``: nothing is folded on landing (the
    link's hook only notes the time); :meth:`settle` has the shard actors fold exactly
    the accepted replies from the store."""

    def __init__(self, server_round: int, expected: tuple | None, cluster: RayCluster):
        self.round = server_round
        self.expected = expected
        self.cluster = cluster
        # connect (or start a local Ray) HERE, in the ServerApp's round loop, never in the
        # link's landing threads: Ray's processes die with the thread that started them
        # (PR_SET_PDEATHSIG), i.e. a few seconds later
        cluster.connect()
        self.lock = threading.Lock()
        self.landed: dict[Any, Any] = {}
        self.closed = False
        self.last_landed: float | None = None
        self.eager_folds = 0
        self.settle_folds = 0
        self.rebuilds = 0
        self.fold_s: list[float] = []
        self.shards: list[dict[int, tuple[int, int]]] = []
        self.bytes_folded = 0  # bytes the actors read and folded (benchmarks)
        #: key -> (plan, remote, weight folded, spans, futures) of each eager fold, in
        #: the order the actors received them
        self.eager: dict[Any, tuple] = {}
        self._pending = 0  # landings being planned / submitted
        self._idle = threading.Condition(self.lock)
        self._signature: tuple | None = None
        #: (the plan the shards were reset with, the jobs that count): what a new
        #: owner re-folds if one dies while the mean is collected
        self._final: tuple | None = None
        self._cut_plan: Plan | None = None
        #: reply index -> the leaf hashes of its verified root (what a re-fold must read)
        self._leaves: dict[int, list[bytes]] = {}

    def on_landed(self, key: Any, src) -> None:
        """An upload landed (the link's hook, a background thread): the shard owners
        start folding it now, with the weight its payload claims (nothing is trusted
        yet: :meth:`settle` keeps the eager folds only if exactly they count)."""
        with self.lock:
            self.last_landed = time.perf_counter()
            if self.closed or key in self.landed:
                return
            self.landed[key] = "landed"
            self._pending += 1
        try:
            self._on_landed(key, src)
        finally:
            with self.lock:
                self._pending -= 1
                self._idle.notify_all()

    def _on_landed(self, key: Any, src) -> None:
        remote = getattr(src, "remote", None)
        if remote is None or self.expected is None:
            return
        try:
            plan = self._plan_remote(remote)
        except Exception as exc:  # noqa: BLE001 - hostile / vanished: decided at settle
            log.debug("aggregation=ray: planning a landed upload failed: %s", exc)
            return
        if plan.weight is None or layout_of(plan) != self.expected:
            return  # folded at settle time (or not at all)
        try:
            with self.lock:
                if self.closed:
                    return
                cl = self.cluster
                if cl.ray is None:  # never ray.init() here: see __init__
                    return
                cl.connect()  # (a lost connection: no Ray started behind the user's back)
                if not self.shards:  # the cut: sized like the model sent (layout checked)
                    try:
                        self.shards = cl.shards_for(plan)
                    except Unfoldable:
                        return  # decided at settle time
                    if not self.shards:
                        return
                    cl.ensure(len(self.shards))
                    self._signature = plan.signature()
                    for j in range(len(self.shards)):
                        cl.actors[j].reset.remote(plan, self.shards[j])
                    self._cut_plan = plan
                if plan.signature() != self._signature:
                    return
                spans = [windows_of(plan, self.shards, j) for j in range(len(self.shards))]
                futs = [self.cluster.actors[j].fold.remote(remote, plan, *spans[j],
                                                           float(plan.weight), key)
                        for j in range(len(self.shards))]
                self.eager[key] = (plan, remote, plan.weight, spans, futs)
                self.landed[key] = "folding"
                if self.cluster.after_submit is not None:
                    self.cluster.after_submit(len(self.eager) - 1, self.cluster)
        except Exception as exc:  # noqa: BLE001 - the cluster: settle folds it all again
            log.warning("aggregation=ray: folding a landed upload on the shard owners "
                        "failed (%s); it is folded when the replies arrive", exc)

    def close(self) -> None:
        """No more folds on landing (those that landed before are submitted first)."""
        with self.lock:
            self._idle.wait_for(lambda: self._pending == 0, timeout=60)
            self.closed = True

    # -- settle ------------------------------------------------------------------------
    def _plan(self, src, a: Accepted) -> tuple[Plan, dict]:
        remote = getattr(src, "remote", None)
        if remote is None:
            raise Unfoldable("aggregation=ray folds uploads of the s3:// and file:// "
                             "links only")
        # file://: planned from the descriptor the link checked (the owners open the
        # same path themselves); s3://: ranged GETs of the header
        plan = (plan_payload(src.read, src.size) if remote.get("kind") == "file"
                else self._plan_remote(remote))
        if self.expected is None:
            raise Unfoldable("no expected layout (the model sent cannot be streamed)")
        if layout_of(plan) != self.expected:
            _digest_of(src, a.digest)  # a lie: rejected; else Unfoldable
            raise Unfoldable("the reply's arrays differ from the model the server sent "
                             "(names, dtypes or shapes)")
        return plan, remote

    @staticmethod
    def _plan_remote(remote: dict) -> Plan:
        """The payload's plan from its header only (ranged GETs of 1 MiB units; a
        ``file://`` upload: bounded preads)."""
        if remote.get("kind") == "file":
            with open_file_upload(remote) as src:
                return plan_payload(src.read, src.size)
        from ..links.s3_http import HttpTransport, RangedReader

        http = HttpTransport(retries=int(remote["retries"]),
                             read_timeout=float(remote["read_timeout"]))
        small = RangedReader(http, remote["url"], remote["size"], remote["enc"],
                             HEADER_UNIT, 1, remote["label"], False)
        try:  # peek: the header bytes only (read's units and read-ahead fetched
            return plan_payload(small.peek, remote["size"])  # ~the whole payload)
        finally:
            small.close()
            http.session.close()

    def settle(self, accepted: list[Accepted], open_upload):
        """As :meth:`~.round.RoundStream.settle`: the sum of exactly the accepted
        replies (None if nothing counts) and ``{reply index: reason}`` of those
        rejected here. Raises Unfoldable (the round falls back to decoded replies) and
        :class:`RayClusterError`."""
        self.close()
        rejected: dict[int, Exception] = {}
        jobs: list[tuple[Accepted, Plan, dict]] = []
        for a in accepted:
            try:
                with open_upload(a) as src:
                    plan, remote = self._plan(src, a)
            except Unfoldable:
                raise
            except (PayloadError, OSError, ValueError, RuntimeError) as exc:
                rejected[a.index] = exc
                continue
            if jobs and plan.signature() != jobs[0][1].signature():
                raise Unfoldable("payload layout differs from the other replies'")
            jobs.append((a, plan, remote))
        if not jobs:
            self._drain_eager()
            return None, rejected
        if self.eager:
            self.cluster.connect()
        if self._keep_eager(jobs, rejected):
            first = self._cut_plan
            jobs = [j for j in jobs if j[0].index not in rejected]
            self._final = (first, jobs)
            return RaySum(self, first, sum(float(a.weight) for a, _, _ in jobs)), rejected
        if self.eager:  # something folded on landing does not count
            log.info("flwr-transports: round %d: rebuilding the shard sums from the store "
                     "(an upload folded on landing does not count)", self.round)
            self.rebuilds += 1
        jobs = [j for j in jobs if j[0].index not in rejected]
        if not jobs:
            return None, rejected
        first = jobs[0][1]
        cl = self.cluster
        cl.connect()
        # a new cut, laid out by the first reply that counts (not by whichever upload
        # happened to land first)
        self.shards = cl.shards_for(first)
        if not self.shards:
            raise Unfoldable("the model has no elements to average")
        cl.ensure(len(self.shards))
        while True:
            t0 = time.perf_counter()
            bad = self._fold_pass(jobs, rejected)
            self.fold_s.append(round(time.perf_counter() - t0, 4))
            if not bad:
                break
            log.info("flwr-transports: round %d: rebuilding the shard sums from the store "
                     "(a folded upload does not count)", self.round)
            self.rebuilds += 1
            jobs = [j for j in jobs if j[0].index not in rejected]
            if not jobs:
                return None, rejected
        self._final = (first, jobs)
        return RaySum(self, first, sum(float(a.weight) for a, _, _ in jobs)), rejected

    def _drain_eager(self) -> None:
        """Wait for the eager folds still running (their results are not used)."""
        ray = self.cluster.ray
        for _plan, _remote, _w, _spans, futs in self.eager.values():
            for f in futs:
                try:
                    ray.get(f)
                except Exception as exc:  # noqa: BLE001 - only waiting
                    log.debug("aggregation=ray: an unused eager fold failed: %s", exc)

    def _keep_eager(self, jobs, rejected) -> bool:
        """True when the eager folds are exactly the replies that count (each with its
        in-band weight, its root matching the reference): then the replies not folded
        yet are added and the sums kept. Else False, with digest liars found among the
        eager folds added to ``rejected``: the caller rebuilds from the store."""
        if not self.eager:
            return False
        ray = self.cluster.ray
        by_key = {a.key: (a, plan, remote) for a, plan, remote in jobs}
        ok = True
        for key, (plan, _remote, weight, spans, futs) in self.eager.items():
            parts, dead = [], False
            for (t0, _t1), f in zip(spans, futs, strict=True):
                try:
                    parts.append((t0, ray.get(f)))
                except ray.exceptions.RayActorError:
                    dead = True
                except ray.exceptions.RayTaskError as exc:
                    parts.append((t0, getattr(exc, "cause", None) or exc))
            job = by_key.get(key)
            if dead or job is None:
                ok = False  # a dead owner, or an upload that does not count
                continue
            a = job[0]
            err = self._verify(a, plan, parts, self._leaves)
            if isinstance(err, PayloadError) and "digest mismatch" in str(err):
                rejected[a.index] = err  # a lie: never counted
                ok = False
            elif err is not None or float(weight) != float(a.weight) or (
                    plan.signature() != job[1].signature()):
                ok = False  # refolded from the store at settle time, with its weight
        if not ok:
            return False
        rest = [j for j in jobs if j[0].key not in self.eager and j[0].index not in rejected]
        if any(p.signature() != self._signature for _, p, _ in rest):
            return False
        if rest:
            cl = self.cluster
            k = len(self.shards)
            bad = False
            for a, plan, remote in rest:
                spans = [windows_of(plan, self.shards, j) for j in range(k)]
                futs = [cl.actors[j].fold.remote(remote, plan, *spans[j], float(a.weight),
                                                 a.key) for j in range(k)]
                parts = []
                for (t0, _t1), f in zip(spans, futs, strict=True):
                    try:
                        parts.append((t0, ray.get(f)))
                    except ray.exceptions.RayActorError:
                        return False
                    except ray.exceptions.RayTaskError as exc:
                        parts.append((t0, getattr(exc, "cause", None) or exc))
                err = self._verify(a, plan, parts, self._leaves)
                if err is not None:
                    rejected[a.index] = err
                    bad = True
                self.settle_folds += 1
            if bad:
                return False
        self.eager_folds += len(self.eager)
        self.bytes_folded += sum(p.size for p, *_ in self.eager.values())
        self.bytes_folded += sum(p.size for _, p, _ in rest)
        return True

    def _fold_pass(self, jobs, rejected) -> bool:
        """Reset the shards and fold every job; True if one was rejected (the shard
        sums then hold it: the caller rebuilds without it). A shard whose actor died
        is re-folded, from the store, by a new actor."""
        cl = self.cluster
        ray = cl.ray
        first = jobs[0][1]
        k = len(self.shards)
        spans = [[windows_of(p, self.shards, j) for j in range(k)] for _, p, _ in jobs]
        results: dict[tuple[int, int], Any] = {}
        todo = list(range(k))
        for attempt in range(MAX_RESTARTS + 1):
            dead: set[int] = set()
            cl.connect()
            try:
                for j in todo:
                    cl.actors[j].reset.remote(first, self.shards[j])
                futs = {}
                for n, (a, plan, remote) in enumerate(jobs):
                    for j in todo:
                        futs[(n, j)] = cl.actors[j].fold.remote(
                            remote, plan, *spans[n][j], float(a.weight), a.key)
                    if cl.after_submit is not None:
                        cl.after_submit(n, cl)
                for (n, j), f in futs.items():
                    try:
                        results[(n, j)] = ray.get(f)
                    except ray.exceptions.RayActorError:
                        dead.add(j)
                    except ray.exceptions.RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, Unfoldable):
                            raise cause from None
                        if not isinstance(cause, PayloadError | OSError | ValueError):
                            raise
                        _not_shared(cause, jobs[n][2], j, self.round)
                        results[(n, j)] = cause  # this upload cannot be read: rejected
            except (RayClusterError, Unfoldable):
                raise
            except Exception as exc:
                raise RayClusterError(f"aggregation=ray: the Ray cluster failed during "
                                      f"round {self.round}: {exc}") from exc
            if not dead:
                break
            if attempt == MAX_RESTARTS:
                raise RayClusterError(f"aggregation=ray: shard actors keep dying in round "
                                      f"{self.round} ({MAX_RESTARTS} restarts); is the Ray "
                                      "cluster healthy?")
            for j in sorted(dead):
                log.warning("flwr-transports: round %d: shard actor %d died; a new one "
                            "re-folds its shard from the store", self.round, j)
                cl.replace(j)
            todo = sorted(dead)
        self.settle_folds += len(jobs)
        self.bytes_folded += sum(p.size for _, p, _ in jobs)
        bad = False
        for n, (a, plan, _remote) in enumerate(jobs):
            err = self._verify(a, plan, [(spans[n][j][0], results[(n, j)]) for j in range(k)],
                               self._leaves)
            if err is not None:
                rejected[a.index] = err
                bad = True
        return bad

    @staticmethod
    def _verify(a: Accepted, plan: Plan, parts,
                into: dict[int, list[bytes]] | None = None) -> Exception | None:
        """The reply counts only if the shards' leaf hashes make its ``sha256t`` root
        (then ``into[a.index]`` gets those leaves: a re-fold must read the same)."""
        leaves: dict[int, bytes] = {}
        for t0, got in parts:
            if isinstance(got, Exception):
                return got
            for t, leaf in enumerate(got, t0):
                if leaves.setdefault(t, leaf) != leaf:
                    return PayloadError("the payload changed while it was read (a window "
                                        "hashed differently by two shards)")
        n_win = max(1, -(-plan.size // WINDOW))
        if sorted(leaves) != list(range(n_win)):
            return PayloadError("not every window of the payload was read")
        root = hashlib.sha256(b"".join(leaves[t] for t in range(n_win))).hexdigest()
        got_digest = f"{DIGEST_ALGO}:{root}"
        if got_digest != a.digest:
            return PayloadError(f"digest mismatch: payload has {got_digest}, reference "
                                f"says {a.digest}")
        if into is not None:
            into[a.index] = [leaves[t] for t in range(n_win)]
        return None

    # -- the mean ----------------------------------------------------------------------
    def assemble(self, plan: Plan, total: float) -> ArrayRecord:
        """The mean as an ArrayRecord: each array's bytes allocated once, the shards'
        slices fetched ASSEMBLY_CHUNK bytes at a time (one ahead) and copied in (the one
        time per round the ServerApp holds the model)."""
        cl = self.cluster
        if cl.step is not None:  # the owners step their shards: the new model
            return cl.step.from_sums(self, total)
        outs = [self._out_array(i, a) for i, a in enumerate(plan.arrays)]
        if cl.sink is not None and cl.sink.usable(self.round, sum(
                len(o.npy) + o.count * o.itemsize for o in outs), mean=True):
            return self._write(outs, float(total))
        ray = cl.connect()
        actors = cl.actors[:len(self.shards)]
        bodies = []
        out = ArrayRecord()
        for a in plan.arrays:
            if a.kind == "bf16":
                head, z, dtype = a.npy_header, 2, a.dtype
            else:
                head = npy_header(a.out_dtype, a.shape, a.fortran)
                z, dtype = a.out_dtype.itemsize, str(a.out_dtype)
            obj, view = alloc_bytes(len(head) + a.count * z)
            view[:len(head)] = head
            bodies.append((obj, np.frombuffer(view, dtype=np.uint8, offset=len(head)), z))
        try:
            for j in range(len(actors)):
                for attempt in range(MAX_RESTARTS + 1):
                    try:
                        self._collect_shard(j, float(total), bodies)
                        break
                    except ray.exceptions.RayActorError:
                        if attempt == MAX_RESTARTS:
                            raise
                        log.warning("flwr-transports: round %d: shard actor %d died while "
                                    "the mean was collected; a new one re-folds its shard "
                                    "from the store", self.round, j)
                        self._refold(j)
        except RayClusterError:
            raise
        except Exception as exc:
            raise RayClusterError(f"aggregation=ray: collecting the shards of round "
                                  f"{self.round} failed: {exc}") from exc
        for a, (obj, _body, _z) in zip(plan.arrays, bodies, strict=True):
            dtype = a.dtype if a.kind == "bf16" else str(a.out_dtype)
            data = obj if isinstance(obj, bytes) else bytes(obj)
            out[a.name] = Array(dtype=dtype, shape=a.shape, stype=a.stype, data=data)
        return out

    @staticmethod
    def _out_array(i: int, a):
        from .ray_publish import OutArray

        if a.kind == "bf16":
            return OutArray(i, a.name, a.dtype, a.shape, a.stype, a.npy_header, 2)
        return OutArray(i, a.name, str(a.out_dtype), a.shape, a.stype,
                        npy_header(a.out_dtype, a.shape, a.fortran), a.out_dtype.itemsize)

    def _write(self, outs, total: float) -> ArrayRecord:
        """The mean written to the store by the owners (:mod:`.ray_publish`): the stub
        record that stands for it."""
        from .ray_publish import output_layout, write_model

        cl = self.cluster
        ray = cl.connect()
        k = len(self.shards)
        infos: list[dict] = [{} for _ in range(k)]
        try:
            for j in range(k):
                for attempt in range(MAX_RESTARTS + 1):
                    try:
                        infos[j] = ray.get(cl.actors[j].finish.remote(total))
                        break
                    except ray.exceptions.RayActorError:
                        if attempt == MAX_RESTARTS:
                            raise
                        log.warning("flwr-transports: round %d: shard actor %d died before "
                                    "its mean; a new one re-folds its shard from the store",
                                    self.round, j)
                        self._refold(j)

            def recover(j: int) -> None:
                self._refold(j)
                ray.get(cl.actors[j].finish.remote(total))

            stub = write_model(cl, cl.sink, self.round, output_layout(outs, infos), recover)
        except RayClusterError:
            raise
        except Exception as exc:
            raise RayClusterError(f"aggregation=ray: writing the model of round "
                                  f"{self.round} from the shards failed: {exc}") from exc
        for x in cl.actors[:k]:
            x.drop.remote()
        return stub

    def _collect_shard(self, j: int, total: float, bodies) -> None:
        """Copy shard ``j`` of the mean into ``bodies``, ASSEMBLY_CHUNK bytes at a time
        (one piece in flight ahead)."""
        ray = self.cluster.ray
        x = self.cluster.actors[j]
        idx = ray.get(x.finish.remote(total))
        collect_pieces(ray, x, idx, bodies, ASSEMBLY_CHUNK)
        x.drop.remote()

    def _refold(self, j: int) -> None:
        """A new owner for shard ``j``, its sum re-folded from the store, verified like
        the first fold: every window it reads must hash to the leaf that made the
        reply's verified root (else :class:`StoreChangedError`)."""
        cl = self.cluster
        ray = cl.connect()
        cl.replace(j)
        x = cl.actors[j]
        first, jobs = self._final
        x.reset.remote(first, self.shards[j])
        spans = [windows_of(plan, self.shards, j) for _a, plan, _r in jobs]
        futs = [x.fold.remote(remote, plan, *span, float(a.weight), a.key)
                for (a, plan, remote), span in zip(jobs, spans, strict=True)]
        for (a, _plan, _remote), (t0, t1), f in zip(jobs, spans, futs, strict=True):
            try:
                got = ray.get(f)
            except ray.exceptions.RayTaskError as exc:
                _not_shared(getattr(exc, "cause", None), _remote, j, self.round)
                raise StoreChangedError(
                    f"aggregation=ray: round {self.round}: reply {a.index}'s upload, counted "
                    f"already, could not be read again when shard owner {j} was replaced "
                    f"({getattr(exc, 'cause', None) or exc}); the round fails rather than "
                    "count a sum without it. Nothing but this ServerApp may write or delete "
                    "the run's objects in the bucket while a round runs") from exc
            want = self._leaves.get(a.index)
            if want is None or list(got) != want[t0:t1]:
                raise StoreChangedError(
                    f"aggregation=ray: round {self.round}: reply {a.index}'s upload changed "
                    f"in the store after it was verified (windows {t0}-{t1 - 1}, re-folded "
                    f"when shard owner {j} was replaced, no longer hash to the leaves of "
                    f"its digest {a.digest}); the round fails rather than count bytes "
                    "that were never checked. Nothing but this ServerApp may write or "
                    "delete the run's objects in the bucket while a round runs")


def _not_shared(cause: Any, remote: dict, j: int, server_round: int) -> None:
    """An owner did not find a ``file://`` upload the ServerApp still sees: its node
    does not share the link's filesystem (raise :class:`NotSharedError`, never count the
    upload as a rejected reply nor wait for it)."""
    if not isinstance(cause, NotVisible) or remote.get("kind") != "file":
        return
    if os.path.lexists(remote["path"]):
        raise NotSharedError(
            f"aggregation=ray: round {server_round}: shard owner {j} cannot see the "
            f"file:// upload the ServerApp sees ({cause}). With file:// every Ray node "
            "must mount the same shared filesystem (NFS, Lustre, ...) at the same path "
            "as the ServerApp; mount it there, or use aggregation=streaming") from None

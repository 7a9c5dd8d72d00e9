"""Point-to-point benchmark: one sender, K receivers, one payload size at a time.

Every backend runs its sender and each receiver in **separate worker processes**
(``python -m ftx_bench.p2p worker``), driven by this module over JSON lines
on their stdin/stdout, so that

* the receivers' peak memory is their own (``ru_maxrss`` of the process), and
* with ``--wan`` the sender runs in one network namespace and the receivers in the
  other (``ip netns exec``), so every byte crosses the emulated WAN.

Timing: the sender stamps ``t0`` (``time.perf_counter``, i.e. CLOCK_MONOTONIC, which is
one clock for every process of the host, network namespaces included) right before
it starts; each receiver stamps ``t1`` when its last byte is in memory. Latency of
one transfer = ``max(t1) - t0`` over the K receivers. For pull backends whose
"publish" is a no-op (gRPC: the server already holds the payload), the receiver's own
request time is ``t0``. Warm-up iterations are run and dropped; medians and p95 of the
repeats are reported; throughput = K x size / median latency.

MPI is launched differently (``mpiexec -n 1+K`` of :func:`mpi_worker`), loopback only.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .procs import set_pdeathsig, stop_proc

MiB = 1024 * 1024
_CHUNK = 2 * MiB  # gRPC streaming chunk (as APPFL)
_RECV_CHUNK = 4 * MiB


# --------------------------------------------------------------------------------------
# small helpers


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak RSS of this process image (VmHWM).

    Not ``ru_maxrss``: that survives ``execve`` and so would report the RSS of the
    (big) driver process this worker was forked from.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def make_payload(size: int) -> bytes:
    """``size`` incompressible-looking bytes, built without a big temporary."""
    block = os.urandom(min(size, MiB)) if size else b""
    if not block:
        return b""
    reps, rem = divmod(size, len(block))
    return block * reps + block[:rem]


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --------------------------------------------------------------------------------------
# backends (each method runs inside a worker process)


class Backend:
    """One way of moving ``size`` bytes from a sender to K receivers."""

    name = ""
    mode = "push"  # "push": receivers wait, sender sends; "pull": sender publishes, receivers fetch
    local_only = False  # True: does not go through the network (shm, file)
    description = ""

    def __init__(self, size: int, k: int, host: str, opts: dict[str, Any]):
        self.size, self.k, self.host, self.opts = size, k, host, opts

    @classmethod
    def unavailable(cls) -> str | None:
        """A reason this backend cannot run here, or None."""
        return None

    # sender side
    def s_setup(self) -> dict[str, Any]:
        return {}

    def s_ready(self) -> None:
        """Called once every receiver finished r_setup."""

    def s_send(self, it: int) -> dict[str, Any]:
        raise NotImplementedError

    def s_done(self, it: int) -> None:
        """Called after every receiver got iteration ``it``."""

    def s_close(self) -> None:
        pass

    # receiver side
    def r_setup(self, info: dict[str, Any], idx: int) -> None:
        pass

    def r_recv(self, it: int, msg: dict[str, Any]) -> tuple[int, float | None]:
        """Receive one payload; return (bytes received, own t0 or None)."""
        raise NotImplementedError

    def r_close(self) -> None:
        pass


class RawTcp(Backend):
    name = "raw-tcp"
    description = "one TCP connection per receiver, sendall / recv_into a reused buffer"

    def s_setup(self):
        self.data = make_payload(self.size)
        self.lsock = socket.create_server((self.host, 0), backlog=max(8, self.k))
        self.conns: list[socket.socket] = []
        return {"port": self.lsock.getsockname()[1]}

    def s_ready(self):
        self.lsock.settimeout(30)
        while len(self.conns) < self.k:
            c, _ = self.lsock.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns.append(c)

    def s_send(self, it):
        t0 = time.perf_counter()
        mv = memoryview(self.data)
        if self.k == 1:
            self.conns[0].sendall(mv)
        else:
            ts = [threading.Thread(target=c.sendall, args=(mv,)) for c in self.conns]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return {"t0": t0}

    def s_close(self):
        for c in self.conns:
            c.close()
        self.lsock.close()

    def r_setup(self, info, idx):
        self.sock = socket.create_connection((self.host, info["port"]), timeout=30)
        self.sock.settimeout(None)
        self.buf = bytearray(self.size)
        self.view = memoryview(self.buf)

    def r_recv(self, it, msg):
        got = 0
        while got < self.size:
            n = self.sock.recv_into(self.view[got:], min(self.size - got, _RECV_CHUNK))
            if n == 0:
                raise ConnectionError("sender closed the connection")
            got += n
        return got, None

    def r_close(self):
        self.sock.close()


class RawTcpFresh(RawTcp):
    name = "raw-tcp-fresh"
    description = ("raw-tcp, but each payload lands in newly allocated memory (as any "
                   "receiver that keeps the payload must: page faults included)")

    def r_recv(self, it, msg):
        self.buf = bytearray(self.size)  # fresh pages, touched by recv_into
        self.view = memoryview(self.buf)
        return super().r_recv(it, msg)


class _Grpc(Backend):
    mode = "pull"
    _OPTS = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1))

    @classmethod
    def unavailable(cls):
        try:
            import grpc  # noqa: F401
        except ImportError:
            return "grpcio is not installed (pip install -e benchmarks)"
        return None

    def s_setup(self):
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        data = make_payload(self.size)
        chunks = [data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)]

        def get(request, context):
            return data

        def stream(request, context):
            yield from chunks

        handler = grpc.method_handlers_generic_handler(
            "ftxbench.Blob",
            {
                "Get": grpc.unary_unary_rpc_method_handler(get),
                "Stream": grpc.unary_stream_rpc_method_handler(stream),
            },
        )
        self.server = grpc.server(ThreadPoolExecutor(max_workers=self.k + 2), options=self._OPTS)
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port(f"{self.host}:0")
        self.server.start()
        return {"port": port}

    def s_send(self, it):
        return {}  # the server already holds the payload: receivers stamp their own t0

    def s_close(self):
        self.server.stop(grace=None)

    def r_setup(self, info, idx):
        import grpc

        self.channel = grpc.insecure_channel(f"{self.host}:{info['port']}", options=self._OPTS)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        if self.stream:
            self.call = self.channel.unary_stream("/ftxbench.Blob/Stream")
        else:
            self.call = self.channel.unary_unary("/ftxbench.Blob/Get")

    def r_recv(self, it, msg):
        t0 = time.perf_counter()
        if self.stream:
            n = sum(len(c) for c in self.call(b"", timeout=600))
        else:
            n = len(self.call(b"", timeout=600))
        return n, t0

    def r_close(self):
        self.channel.close()


class GrpcUnary(_Grpc):
    name = "grpc-unary"
    description = "gRPC unary call returning the whole payload as one message"
    stream = False


class GrpcStream(_Grpc):
    name = "grpc-stream"
    description = "gRPC server streaming in 2 MiB messages"
    stream = True


class _Link(Backend):
    """Our links through their public ServerLink / ClientLink API."""

    mode = "pull"
    scheme = ""

    @classmethod
    def unavailable(cls):
        from flwr_transports.links import LinkError, link_classes

        try:
            link_classes(cls.scheme)
        except (LinkError, ImportError, AttributeError) as exc:
            return f"{cls.scheme}:// link not importable: {exc}"
        return None

    def url(self) -> str:
        raise NotImplementedError

    def link_options(self) -> dict[str, Any]:
        return {}

    def s_setup(self):
        from flwr.app import Array, ArrayRecord

        from flwr_transports.codec import encode
        from flwr_transports.links import server_link

        # the payload as a ClientApp gets it: one Flower Array in a real payload
        data = make_payload(self.size)
        arr = Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)
        self.payload = encode(ArrayRecord({"payload": arr}))
        self.link = server_link(self.url(), f"b{os.getpid()}", self.link_options())
        return {"payload_size": self.payload.size}

    def s_send(self, it):
        t0 = time.perf_counter()
        loc = self.link.publish(f"p{it}", self.payload)
        msg = {"t0": t0, "loc": loc}
        if self.opts.get("verify"):
            msg["digest"] = self.payload.digest
        return msg

    def s_done(self, it):
        self.link.release(f"p{it}")

    def s_close(self):
        self.link.close()

    def r_setup(self, info, idx):
        from flwr_transports.links import client_link

        self.client = client_link(self.scheme)
        self.info = info

    def r_recv(self, it, msg):
        from flwr_transports.codec import decode

        size = self.info["payload_size"]
        src = self.client.open(msg["loc"], size)
        try:  # into Flower Arrays (what a ClientApp gets); digest checked only if verify
            rec = decode(src.read, size, msg.get("digest") if self.opts.get("verify") else None)
            n = len(rec["payload"].data)
        finally:
            src.close()
        return n, None


class ShmLink(_Link):
    name = "link-shm"
    scheme = "shm"
    local_only = True
    description = "shm:// link: publish = write to /dev/shm, receiver opens and reads"

    def url(self):
        return "shm://"


class FileLink(_Link):
    name = "link-file"
    scheme = "file"
    local_only = True
    description = "file:// link on a local directory (page cache)"

    def url(self):
        d = self.opts.get("file_dir") or os.path.join(
            os.environ.get("TMPDIR", "/tmp"), f"ftxbench-{os.getpid()}"
        )
        os.makedirs(d, exist_ok=True)
        self._dir = d
        return f"file://{d}"

    def s_close(self):
        super().s_close()
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)


class TcpLink(_Link):
    name = "link-tcp"
    scheme = "tcp"
    description = "tcp:// link: the ServerApp serves payloads over parallel TCP streams"

    def url(self):
        return f"tcp://{self.host}:0"


class RdmaLink(_Link):
    name = "link-rdma"
    scheme = "rdma"
    local_only = True  # UCX picks cma between processes of one host: no network crossed
    description = ("rdma:// link on NIXL/UCX, UCX's own transport choice (cma on one host: "
                   "one-sided reads of the sender's memory)")

    @classmethod
    def unavailable(cls):
        from flwr_transports.links import LinkError
        from flwr_transports.links.rdma import load_nixl

        try:
            load_nixl()
        except LinkError as exc:
            return str(exc)
        return super().unavailable()

    def url(self):
        return f"rdma://{self.host}:0"


class RdmaTcpLink(RdmaLink):
    name = "link-rdma-tcp"
    local_only = False
    description = "rdma:// link on NIXL/UCX with UCX_TLS=tcp (software-emulated RDMA reads)"

    def url(self):
        return f"rdma://{self.host}:0?ucx_tls=tcp"


class S3Link(_Link):
    """s3:// link against a moto server started (and stopped) by the sender worker."""

    name = "link-s3"
    scheme = "s3"
    description = "s3:// link with an embedded moto S3 server next to the sender"

    @classmethod
    def unavailable(cls):
        why = super().unavailable()
        if why:
            return why
        if not _moto_server_cmd():
            return "moto server not installed (pip install 'moto[server]')"
        return None

    def s_setup(self):
        self._moto = _start_moto(self.host)
        self._endpoint = f"http://{self.host}:{self._moto[1]}"
        # the ServerApp side uses boto3's normal credential chain; moto accepts any key
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        try:
            import boto3

            s3 = boto3.client(
                "s3", endpoint_url=self._endpoint, aws_access_key_id="bench",
                aws_secret_access_key="bench", region_name="us-east-1",
            )
            s3.create_bucket(Bucket="ftxbench")
            return super().s_setup()
        except BaseException:
            stop_proc(self._moto[0])
            raise

    def url(self):
        return f"s3://ftxbench/bench?endpoint_url={self._endpoint}"

    def s_close(self):
        try:
            super().s_close()
        finally:
            stop_proc(self._moto[0])


def _moto_server_cmd() -> list[str] | None:
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
    return [exe] if exe else None


def _start_moto(host: str) -> tuple[subprocess.Popen, int]:
    cmd = _moto_server_cmd()
    if not cmd:
        raise RuntimeError("moto_server not found (pip install 'moto[server]')")
    with socket.socket() as s:  # pick a free port, then hand it to moto
        s.bind((host, 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    proc = subprocess.Popen(
        [*cmd, "-H", host, "-p", str(port)], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    stop_proc(proc)
    raise RuntimeError("moto_server did not start in 30 s")


def communicate(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``proc.communicate(timeout)`` in short slices, so signal handlers run meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return proc.communicate(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise


# ---- s3:// link against a real Ceph radosgw ------------------------------------------

_RGW_FETCH = "python -m ftx_bench.radosgw fetch"


def _radosgw_script() -> Any | None:
    """The radosgw helper module (part of the package: works from an installed wheel)."""
    from . import radosgw

    return radosgw


class RadosgwS3Link(_Link):
    """s3:// link against a one-node Ceph cluster (mon + memstore OSD + radosgw) that the
    sender worker starts with ftx_bench.radosgw and stops in ``s_close`` (or when it is
    terminated): real SigV4 auth and a real object store instead of moto's."""

    name = "link-s3-radosgw"
    scheme = "s3"
    description = ("s3:// link against a real Ceph radosgw (ftx_bench.radosgw) started by "
                   "the sender")
    # under --wan radosgw listens on the sender's address in namespace A: the store sits in
    # the server's region and shares its link (e2e --topology star gives it its own)

    @classmethod
    def unavailable(cls):
        why = super().unavailable()
        if why:
            return why
        try:
            import boto3  # noqa: F401
        except ImportError:
            return "boto3 not installed (pip install 'flwr-transports[s3]')"
        script = _radosgw_script()
        root = os.path.join(script.DEFAULT_CACHE, "root")
        if not os.path.exists(os.path.join(root, "usr", "bin", "radosgw")):
            return (f"Ceph packages not unpacked in {script.DEFAULT_CACHE}: run "
                    f"'{_RGW_FETCH}' (apt-get download + dpkg -x, ~66 MB, no install)")
        return None

    def s_setup(self):
        script = _radosgw_script()
        self._rgw_mod = script
        self._rgw: dict[str, Any] | None = None
        old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

        self._starting = True

        def on_signal(signum, frame):  # killed by the driver: never leave Ceph running
            if self._starting and self._rgw is None:  # inside script.start(): it cleans up
                raise KeyboardInterrupt(f"signal {signum}")
            self._stop_rgw(hard=True)  # a no-op once s_close stopped it
            os._exit(128 + signum)

        for sig in old:
            signal.signal(sig, on_signal)
        # the driver may also just close our stdin: the worker loop then returns
        import atexit

        atexit.register(self._stop_rgw, True)
        mem = max(2 << 30, 3 * self.size + (1 << 30))  # memstore: an upper bound, not RAM
        # a one-node Ceph sometimes fails to come up on a loaded machine: 3 tries
        for attempt in range(3):
            try:
                self._rgw = script.start(mem_bytes=mem, host=self.host)
                break
            except script.RadosgwError:
                if attempt == 2:
                    self._starting = False
                    raise
                time.sleep(2 * (attempt + 1))  # let the failed cluster's ports settle
        self._starting = False
        st = self._rgw
        os.environ.update(AWS_ACCESS_KEY_ID=st["access_key"],
                          AWS_SECRET_ACCESS_KEY=st["secret_key"],
                          AWS_DEFAULT_REGION=st.get("region", "us-east-1"),
                          AWS_EC2_METADATA_DISABLED="true")
        self._endpoint = st["endpoint"]
        self._bucket = f"ftxbench-{os.getpid()}"
        try:
            self._make_bucket()
            return super().s_setup()
        except BaseException:
            self._stop_rgw()
            raise

    def _make_bucket(self) -> None:
        import boto3
        from botocore.config import Config

        st = self._rgw
        s3 = boto3.session.Session(
            aws_access_key_id=st["access_key"], aws_secret_access_key=st["secret_key"],
            region_name=st.get("region", "us-east-1"),
        ).client("s3", endpoint_url=st["endpoint"], config=Config(
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
            response_checksum_validation="when_required"))
        self._rgw_mod.create_bucket(s3, self._bucket)

    def url(self):
        return f"s3://{self._bucket}/bench?endpoint_url={self._endpoint}"

    def _stop_rgw(self, hard: bool = False) -> None:
        sigs = {signal.SIGTERM, signal.SIGHUP}
        # a SIGTERM arriving meanwhile waits until the cluster is gone (then exits)
        signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            st, self._rgw = getattr(self, "_rgw", None), None
            if not st:
                return
            if hard:  # fast: the driver SIGKILLs us 3 s after its SIGTERM
                for pid in st.get("pids", {}).values():
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            self._rgw_mod.stop(st["dir"])
            # the daemons are our children: reap them, or they stay zombies of pid 1
            deadline = time.monotonic() + 5
            for pid in st.get("pids", {}).values():
                while True:
                    try:
                        if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > deadline:
                            break
                    except ChildProcessError:
                        break
                    time.sleep(0.05)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)

    def s_close(self):
        try:
            super().s_close()
        finally:
            self._stop_rgw()


# ---- PyTorch RPC (TensorPipe) ---------------------------------------------------------

_TORCH_HINT = ("pip install torch==2.13.0 (the CPU wheel; an unpinned torch pulls GBs of "
               "CUDA)")
_TORCH_STATE: dict[str, Any] = {}  # the sender's payload tensor, served to receivers


def _torch_fetch() -> Any:
    """Runs on the sender (called by each receiver through ``rpc_sync``)."""
    return _TORCH_STATE["tensor"]


def iface_for(host: str) -> str | None:
    """Name of the local interface whose IPv4 address routes to ``host`` (``lo`` for
    127.0.0.1; the veth of this network namespace under ``--wan``), or None."""
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.connect((host, 9))  # UDP connect sends nothing: it only picks a route
            local = u.getsockname()[0]
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
            except OSError:
                continue
            if addr == local:
                return name
    return None


class TorchRpc(Backend):
    """``torch.distributed.rpc`` over TensorPipe: world = 1 sender (rank 0) + K receivers.

    The sender holds the payload as one uint8 tensor (``torch.frombuffer`` on the payload
    bytes: no copy); each receiver ``rpc_sync``-calls the sender, which returns that
    tensor. TensorPipe is restricted to its TCP transport (``uv``) and ``basic`` channel so
    that the bytes cross the (emulated) network like the other backends' do; its
    same-host shortcuts (``shm`` transport, ``cma`` channel) are ``torch-rpc-shm``.

    TensorPipe and the Gloo group that ``init_rpc`` builds pick their listening address
    from the host name unless ``TP_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME`` say otherwise;
    the host name resolves to 127.0.0.1 inside every namespace, so both are set to the
    interface that routes to ``host`` (``lo`` on loopback, the namespace's veth under
    ``--wan``).
    """

    name = "torch-rpc"
    mode = "pull"
    description = ("PyTorch RPC (TensorPipe, TCP transport): receivers rpc_sync the "
                   "sender, which returns the payload as a uint8 tensor")
    transports: tuple[str, ...] | None = ("uv",)
    channels: tuple[str, ...] | None = ("basic",)

    @classmethod
    def unavailable(cls):
        try:
            from torch.distributed import rpc
        except ImportError:
            return _TORCH_HINT
        if not rpc.is_available():
            return "this torch build has no torch.distributed.rpc (" + _TORCH_HINT + ")"
        return None

    @staticmethod
    def _quiet() -> None:
        """Before the first ``import torch`` of the worker: c10 reads its log level once.
        The receivers leave with a non-graceful ``rpc.shutdown`` (a graceful one is a
        barrier, and the driver closes workers one by one), which TensorPipe logs as
        "pipe closed" warnings on the others."""
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

    def _init(self, rank: int, port: int) -> None:
        import warnings

        from torch.distributed import rpc

        # init_rpc builds a Gloo group and then warns that this usage is deprecated
        warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)
        iface = iface_for(self.host)
        if iface:
            os.environ["TP_SOCKET_IFNAME"] = iface
            os.environ["GLOO_SOCKET_IFNAME"] = iface
        kw: dict[str, Any] = {}
        if self.transports is not None:
            kw["_transports"] = list(self.transports)
        if self.channels is not None:
            kw["_channels"] = list(self.channels)
        options = rpc.TensorPipeRpcBackendOptions(
            num_worker_threads=max(4, self.k + 2), rpc_timeout=600,
            init_method=f"tcp://{self.host}:{port}", **kw,
        )
        rpc.init_rpc("s" if rank == 0 else f"r{rank - 1}", rank=rank, world_size=self.k + 1,
                     backend=rpc.BackendType.TENSORPIPE, rpc_backend_options=options)

    def s_setup(self):
        import warnings

        self._quiet()
        import torch

        data = make_payload(self.size)
        with warnings.catch_warnings():  # "non-writable buffer": the tensor is only read
            warnings.simplefilter("ignore", UserWarning)
            _TORCH_STATE["tensor"] = torch.frombuffer(data, dtype=torch.uint8)
        self._data = data  # keeps the tensor's memory alive
        with socket.socket() as s:  # the rendezvous store's port (rank 0 listens on it)
            s.bind((self.host, 0))
            port = s.getsockname()[1]
        self._err: BaseException | None = None

        def init() -> None:
            try:
                self._init(0, port)
            except BaseException as exc:  # noqa: BLE001 (raised in s_ready)
                self._err = exc

        # init_rpc is collective: it returns once every receiver joined (their r_setup)
        self._thread = threading.Thread(target=init, daemon=True)
        self._thread.start()
        info: dict[str, Any] = {"port": port}
        if self.opts.get("verify"):
            import hashlib

            info["digest"] = hashlib.blake2b(data, digest_size=16).hexdigest()
        return info

    def s_ready(self):
        self._thread.join(300)
        if self._thread.is_alive():
            raise TimeoutError("torch init_rpc did not complete in 300 s")
        if self._err is not None:
            raise RuntimeError(f"torch init_rpc failed: {self._err}") from self._err

    def s_send(self, it):
        return {}  # the sender already holds the tensor: receivers stamp their own t0

    def s_close(self):
        from torch.distributed import rpc

        if not self._thread.is_alive() and self._err is None:
            rpc.shutdown(graceful=False)
        _TORCH_STATE.clear()

    def r_setup(self, info, idx):
        self._digest = info.get("digest")
        self._quiet()
        self._init(idx + 1, info["port"])

    def r_recv(self, it, msg):
        from torch.distributed import rpc

        t0 = time.perf_counter()
        t = rpc.rpc_sync("s", _torch_fetch, timeout=600)
        n = t.numel() * t.element_size()
        if self._digest is not None:
            import hashlib

            got = hashlib.blake2b(t.numpy(), digest_size=16).hexdigest()
            if got != self._digest:
                raise RuntimeError("torch-rpc: received bytes differ from the payload")
        del t
        return n, t0

    def r_close(self):
        from torch.distributed import rpc

        rpc.shutdown(graceful=False)


class TorchRpcShm(TorchRpc):
    name = "torch-rpc-shm"
    local_only = True
    description = ("PyTorch RPC with TensorPipe's own choice on one host (shm transport, "
                   "cma channel)")
    transports = None
    channels = None


BACKENDS: dict[str, type[Backend]] = {
    b.name: b
    for b in (RawTcp, RawTcpFresh, GrpcUnary, GrpcStream, ShmLink, FileLink, TcpLink, S3Link, TorchRpc,
              TorchRpcShm, RadosgwS3Link, RdmaLink, RdmaTcpLink)
}


def _registered_link_backends() -> None:
    """A ``link-<scheme>`` backend for every registered link without a dedicated one
    (third-party links from entry points included) that runs on this machine alone."""
    from flwr_transports.links import LinkError, link_classes, link_spec, schemes

    for scheme in schemes():
        name = f"link-{scheme}"
        if name in BACKENDS:
            continue
        try:
            srv = link_classes(scheme)[0]
        except LinkError:
            continue

        def url(self, _srv=srv) -> str:
            d = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ftxbench-{os.getpid()}")
            os.makedirs(d, exist_ok=True)
            self._dir = d
            return _srv.local_url(d, self.host)

        def s_close(self) -> None:
            _Link.s_close(self)
            shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)

        if srv.local_url("/tmp") is None:
            continue
        BACKENDS[name] = type(f"Link_{scheme}", (_Link,), {
            "name": name, "scheme": scheme, "url": url, "s_close": s_close,
            "local_only": link_spec(scheme).local_only,
            "description": f"{scheme}:// link ({link_spec(scheme).origin})",
        })


_registered_link_backends()
MPI_BACKENDS = ("mpi-buffer", "mpi-pickle")
TORCH_BACKENDS = ("torch-rpc", "torch-rpc-shm")
ALL_BACKENDS = tuple(dict.fromkeys((*BACKENDS, *MPI_BACKENDS, *TORCH_BACKENDS)))
DEFAULT_BACKENDS = ("raw-tcp", "raw-tcp-fresh", "grpc-unary", "grpc-stream", "link-shm",
                    "link-file", "link-tcp", "link-s3", "mpi-buffer", "mpi-pickle", "torch-rpc")


def backend_unavailable(name: str, wan: bool = False) -> str | None:
    """Why ``name`` cannot run here (or None)."""
    if name in BACKENDS:
        cls = BACKENDS[name]
        if wan and cls.local_only:
            return "same-host only (no network path to emulate)"
        if wan and getattr(cls, "wan_unavailable", None):
            return cls.wan_unavailable
        return cls.unavailable()
    if name in MPI_BACKENDS:
        if wan:
            return "mpiexec cannot place ranks in different network namespaces here"
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            return "mpi4py not installed (pip install 'flwr-transports[mpi]')"
        if not _mpiexec():
            return "mpiexec not found (pip install 'flwr-transports[mpi]')"
        return None
    return f"unknown backend (known: {', '.join(ALL_BACKENDS)})"


# --------------------------------------------------------------------------------------
# worker process


def worker_main() -> int:
    """JSON-lines loop: one command per stdin line, one reply per stdout line."""
    set_pdeathsig()  # never outlive the driver
    out = sys.stdout
    sys.stdout = sys.stderr  # keep stray prints off the protocol channel
    b: Backend | None = None
    role = ""

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "init":
                role = cmd["role"]
                b = BACKENDS[cmd["backend"]](cmd["size"], cmd["k"], cmd["host"], cmd["opts"])
                info = b.s_setup() if role == "sender" else b.r_setup(cmd["info"], cmd["idx"])
                reply({"ok": True, "info": info or {}, "rss": rss_bytes()})
            elif op == "ready":
                b.s_ready()
                reply({"ok": True})
            elif op == "send":
                t = time.perf_counter()
                msg = b.s_send(cmd["it"])
                msg.setdefault("t0", None)
                msg["send_s"] = time.perf_counter() - t
                reply({"ok": True, **msg})
            elif op == "recv":
                n, t0 = b.r_recv(cmd["it"], cmd["msg"])
                t1 = time.perf_counter()
                if n != b.size:
                    raise RuntimeError(f"received {n} bytes, expected {b.size}")
                reply({"ok": True, "t1": t1, "t0": t0})
            elif op == "done":
                b.s_done(cmd["it"])
                reply({"ok": True})
            elif op == "close":
                if b is not None:
                    b.s_close() if role == "sender" else b.r_close()
                reply({"ok": True, "peak_rss": peak_rss_bytes(), "rss": rss_bytes()})
                return 0
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # noqa: BLE001 (reported; the driver tears down)
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


class Worker:
    """A worker process (optionally inside a network namespace)."""

    def __init__(self, prefix: Sequence[str] = (), timeout: float = 300):
        cmd = [*prefix, sys.executable, "-m", "ftx_bench.p2p", "worker"]
        env = {**os.environ, "GRPC_VERBOSITY": os.environ.get("GRPC_VERBOSITY", "ERROR")}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            start_new_session=True, env=env,
        )
        self.timeout = timeout

    def send(self, **cmd: Any) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def get(self) -> dict[str, Any]:
        # short waits: a signal delivered to another thread (grpc, for one, starts some)
        # only runs its Python handler when the main thread executes bytecode again
        deadline = time.monotonic() + self.timeout
        while not select.select([self.proc.stdout], [], [], 0.2)[0]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.proc.pid} did not answer in {self.timeout} s")
            if self.proc.poll() is not None:
                break  # readline below reports the exit
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited ({self.proc.poll()})")
        rep = json.loads(line)
        if not rep.get("ok"):
            raise RuntimeError(rep.get("error", "worker failed"))
        return rep

    def call(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.get()

    def kill(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        stop_proc(self.proc, timeout=3)


# --------------------------------------------------------------------------------------
# driver


@dataclass
class Placement:
    """Where the sender and receivers run and which address connects them."""

    host: str = "127.0.0.1"
    sender_prefix: tuple[str, ...] = ()
    receiver_prefix: tuple[str, ...] = ()
    wan: bool = False


def summarize(lat: list[float], size: int, k: int) -> dict[str, Any]:
    med = statistics.median(lat)
    return {
        "latency_s": lat,
        "latency_median_s": med,
        "latency_p95_s": percentile(lat, 0.95),
        "throughput_MBps": (k * size / med / 1e6) if med > 0 else None,
        "throughput_Gbps": (k * size * 8 / med / 1e9) if med > 0 else None,
    }


def run_workers(name: str, size: int, k: int, repeat: int, warmup: int,
                place: Placement, opts: dict[str, Any]) -> dict[str, Any]:
    sender = Worker(place.sender_prefix)
    receivers: list[Worker] = []
    try:
        base = {"backend": name, "size": size, "k": k, "host": place.host, "opts": opts}
        s_init = sender.call(op="init", role="sender", **base)
        receivers = [Worker(place.receiver_prefix) for _ in range(k)]
        for i, r in enumerate(receivers):
            r.send(op="init", role="receiver", info=s_init["info"], idx=i, **base)
        r_base = [r.get()["rss"] for r in receivers]
        sender.call(op="ready")
        mode = BACKENDS[name].mode
        lat: list[float] = []
        per_rx: list[float] = []
        send_s: list[float] = []
        for it in range(warmup + repeat):
            if mode == "push":
                for r in receivers:
                    r.send(op="recv", it=it, msg={})
                srep = sender.call(op="send", it=it)
            else:
                srep = sender.call(op="send", it=it)
                msg = {k_: v for k_, v in srep.items() if k_ not in ("ok",)}
                for r in receivers:
                    r.send(op="recv", it=it, msg=msg)
            reps = [r.get() for r in receivers]
            sender.call(op="done", it=it)
            t0s = [rep["t0"] if rep["t0"] is not None else srep["t0"] for rep in reps]
            if any(t is None for t in t0s):
                raise RuntimeError("no start time recorded")
            if it >= warmup:
                send_s.append(srep["send_s"])
                lat.append(max(rep["t1"] for rep in reps) - min(t0s))
                per_rx.extend(rep["t1"] - t0 for rep, t0 in zip(reps, t0s, strict=True))
        r_close = [r.call(op="close") for r in receivers]
        s_close = sender.call(op="close")
        res = summarize(lat, size, k)
        res.update(
            per_receiver_latency_median_s=statistics.median(per_rx),
            # push: the sender's whole send; pull: publish only (e.g. write to /dev/shm)
            sender_op_median_s=statistics.median(send_s),
            receiver_peak_rss_bytes=max(c["peak_rss"] for c in r_close),
            receiver_base_rss_bytes=max(r_base),
            receiver_peak_over_base_bytes=max(
                c["peak_rss"] - b for c, b in zip(r_close, r_base, strict=True)
            ),
            sender_peak_rss_bytes=s_close["peak_rss"],
        )
        return res
    finally:
        for w in [sender, *receivers]:
            w.kill()


# ---- MPI ------------------------------------------------------------------------------


def _mpiexec() -> str | None:
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("mpiexec", path=path)


def mpi_worker(argv: Sequence[str]) -> int:
    """Body of ``mpiexec -n 1+K python -m ftx_bench.p2p mpi-worker MODE SIZE REP WARM``."""
    import numpy as np
    from mpi4py import MPI

    mode, size, repeat, warmup = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    base = rss_bytes()
    if rank == 0:
        data = np.frombuffer(make_payload(size), dtype=np.uint8)
        obj = data.tobytes() if mode == "pickle" else None
    else:
        buf = np.empty(size, dtype=np.uint8) if mode == "buffer" else None
    lat: list[float] = []
    for it in range(warmup + repeat):
        comm.Barrier()
        if rank == 0:
            t0 = time.perf_counter()
            if mode == "buffer":
                reqs = [comm.Isend([data, MPI.BYTE], dest=d, tag=it) for d in range(1, n)]
                MPI.Request.Waitall(reqs)
            else:
                reqs = [comm.isend(obj, dest=d, tag=it) for d in range(1, n)]
                for r in reqs:
                    r.wait()
            t1 = 0.0
        else:
            t0 = 0.0
            if mode == "buffer":
                comm.Recv([buf, MPI.BYTE], source=0, tag=it)
                got = len(buf)
            else:
                got = len(comm.recv(source=0, tag=it))
            t1 = time.perf_counter()
            if got != size:
                raise RuntimeError(f"rank {rank} got {got} bytes, expected {size}")
        t1s = comm.gather(t1, root=0)
        if rank == 0 and it >= warmup:
            lat.append(max(t1s[1:]) - t0)
    peaks = comm.gather((peak_rss_bytes(), base), root=0)
    if rank == 0:
        rx = peaks[1:]
        print(json.dumps({
            "latency_s": lat,
            "receiver_peak_rss_bytes": max(p for p, _ in rx),
            "receiver_base_rss_bytes": max(b for _, b in rx),
            "receiver_peak_over_base_bytes": max(p - b for p, b in rx),
            "sender_peak_rss_bytes": peaks[0][0],
        }), flush=True)
    return 0


def run_mpi(name: str, size: int, k: int, repeat: int, warmup: int,
            timeout: float = 600) -> dict[str, Any]:
    mode = name.split("-", 1)[1]
    cmd = [_mpiexec(), "-n", str(1 + k), sys.executable, "-m", "ftx_bench.p2p",
           "mpi-worker", mode, str(size), str(repeat), str(warmup)]
    before = _mpich_segments()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = communicate(proc, timeout)
    except subprocess.TimeoutExpired:
        stop_proc(proc)
        _clean_mpich_shm(before)
        raise TimeoutError(f"mpiexec did not finish in {timeout} s") from None
    finally:
        if proc.poll() is None:
            stop_proc(proc)
            _clean_mpich_shm(before)
    if proc.returncode != 0:
        _clean_mpich_shm(before)
        raise RuntimeError(f"mpiexec failed ({proc.returncode}): {err.strip()[-500:]}")
    line = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
    raw = json.loads(line)
    res = summarize(raw.pop("latency_s"), size, k)
    res.update(raw)
    return res


def _mpich_segments() -> set[str]:
    import glob

    return set(glob.glob("/dev/shm/sm_segment.*"))


def _clean_mpich_shm(before: set[str]) -> None:
    """mpich leaves /dev/shm/sm_segment.* behind when killed: remove those that appeared
    during our run and that no live process maps (never other jobs' segments)."""
    for p in _mpich_segments() - before:
        if not _mapped_by_anyone(p):
            try:
                os.unlink(p)
            except OSError:
                pass


def _mapped_by_anyone(path: str) -> bool:
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/maps", encoding="utf-8", errors="replace") as f:
                if path in f.read():
                    return True
        except OSError:
            continue
    return False


# ---- entry point used by the CLI ------------------------------------------------------


def run_p2p(
    sizes: Sequence[int], backends: Sequence[str], concurrency: Sequence[int], repeat: int,
    warmup: int, place: Placement | None = None, opts: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every (backend, size, K) combination; return one row per combination."""
    place = place or Placement()
    opts = opts or {}
    say = progress or (lambda s: None)
    rows: list[dict[str, Any]] = []
    combos = [(b, s, k) for b in backends for s in sizes for k in concurrency]
    for i, (b, size, k) in enumerate(combos, 1):
        row: dict[str, Any] = {"backend": b, "size_bytes": size, "k": k}
        why = backend_unavailable(b, wan=place.wan)
        tag = f"[{i}/{len(combos)}] {b:<12} {human_size(size):>8} K={k}"
        if why:
            row["skipped"] = why
            say(f"{tag}  skipped: {why}")
            rows.append(row)
            continue
        say(f"{tag}  running ({warmup} warm-up + {repeat} runs)...")
        t = time.perf_counter()
        try:
            if b in MPI_BACKENDS:
                row.update(run_mpi(b, size, k, repeat, warmup))
            else:
                row.update(run_workers(b, size, k, repeat, warmup, place, opts))
        except Exception as exc:  # noqa: BLE001 (one failed combination must not stop the run)
            row["error"] = f"{type(exc).__name__}: {exc}"
            say(f"{tag}  FAILED: {row['error']}")
            rows.append(row)
            continue
        row["wall_s"] = time.perf_counter() - t
        say(
            f"{tag}  median {row['latency_median_s'] * 1e3:9.2f} ms  p95 "
            f"{row['latency_p95_s'] * 1e3:9.2f} ms  {row['throughput_MBps']:9.1f} MB/s  "
            f"rx peak {row['receiver_peak_rss_bytes'] / MiB:7.1f} MiB"
        )
        rows.append(row)
    return rows


def human_size(n: int) -> str:
    for unit, f in (("GB", 10**9), ("MB", 10**6)):  # decimal sizes stay decimal
        if n >= f and n % f == 0:
            return f"{n // f} {unit}"
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            v = n / f
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "worker":
        return worker_main()
    if argv and argv[0] == "mpi-worker":
        return mpi_worker(argv[1:])
    print("internal entry point; use 'ftx-bench p2p'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

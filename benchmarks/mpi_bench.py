"""Benchmark of the MPI runtime (prints figures; not a test).

1. Round time of a Flower app under ``mpiexec -n 3 flwr-transports mpi`` (1 server + 2
   client ranks, FedAvg, a model of ``--mib`` MiB), next to the same app run in one
   process with no transport at all (the app's own compute: np.load/np.save, the
   ClientApp's update, FedAvg's aggregation).
2. Point to point (``mpiexec -n 2``), one message carrying the model:
   * ``buffers``: the runtime's path (JSON header + the Array's bytes as MPI buffers);
   * ``pickle``: ``comm.send(message)`` of the same Flower Message (mpi4py pickles it);
   * ``raw``: a single ``Send`` of a preallocated buffer (lower bound).

    python benchmarks/mpi_bench.py                 # 500 MiB, 3 rounds
    python benchmarks/mpi_bench.py --mib 100 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "apps" / "mpi_app"


def _mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else "mpiexec"


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> str:
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise SystemExit(f"timed out after {timeout} s:\n{out[-3000:]}") from None
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return out


# ---------------------------------------------------------------------------------------
# 1. app rounds


def app_rounds_mpi(mib: float, rounds: int, work: str, timeout: float) -> tuple[list[float], float]:
    with tempfile.TemporaryDirectory(prefix="mpi-bench-") as d:
        timings = Path(d) / "t.json"
        cfg = (f"model='big' model-mib={mib} num-server-rounds={rounds} "
               f"client-work='{work}' timings-path='{timings}'")
        cmd = [_mpiexec(), "-n", "3", sys.executable, "-m", "flwr_transports.cli", "mpi"]
        t0 = time.perf_counter()
        _run([*cmd, str(APP), "--run-config", cfg], timeout)
        wall = time.perf_counter() - t0
        return json.loads(timings.read_text())["round_s"], wall


def app_rounds_in_process(mib: float, rounds: int, work: str) -> list[float]:
    """The same ServerApp/ClientApp, called directly in this process (no transport)."""

    from flwr.app import Context, RecordDict
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.config import get_fused_config_from_dir, parse_config_args
    from flwr.server.run_serverapp import run as run_server_app
    from flwr.supercore.object_ref import load_app
    from flwr.supercore.task_identity import TaskIdentity

    from flwr_transports.testing import InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    with tempfile.TemporaryDirectory(prefix="mpi-bench-") as d:
        timings = Path(d) / "t.json"
        line = (
            f"model='big' model-mib={mib} num-server-rounds={rounds} "
            f"client-work='{work}' timings-path='{timings}'"
        )
        over = parse_config_args([line])
        cfg = get_fused_config_from_dir(APP, over)
        app = load_app("mpi_app.client_app:app", LoadClientAppError, APP)
        contexts = {
            1000 + r: Context(
                1, 1000 + r, {"partition-id": r - 1, "num-partitions": 2}, RecordDict(), dict(cfg)
            )
            for r in (1, 2)
        }
        run_server_app(
            InProcessGrid(app, contexts=contexts, serialize=False, sort_replies=False),
            Context(1, 1, {}, RecordDict(), dict(cfg)),
            str(APP),
            "mpi_app.server_app:app",
        )
        return json.loads(timings.read_text())["round_s"]


# ---------------------------------------------------------------------------------------
# 2. point to point (runs inside mpiexec -n 2)


def p2p_worker(mib: float, reps: int) -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, Metadata, RecordDict
    from mpi4py import MPI

    from flwr_transports.mpi import comm as C
    from flwr_transports.mpi import wire

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    n = int(mib * (1 << 20))
    ack = bytearray(1)
    results: dict[str, list[float]] = {"buffers": [], "pickle": [], "raw": []}

    if rank == 0:
        data = (np.arange(n, dtype=np.uint8)).tobytes()
        md = Metadata(1, "m", 1, 1001, "", "1", time.time(), 3600.0, "train")
        msg = Message(
            metadata=md,
            content=RecordDict(
                {"arrays": ArrayRecord({"w": Array("uint8", (n,), "numpy.ndarray", data)})}
            ),
        )
        raw = np.empty(n, dtype=np.uint8)
    else:
        raw = np.empty(n, dtype=np.uint8)

    for _ in range(reps):
        for mode in list(results):
            comm.Barrier()
            if rank == 0:
                t0 = time.perf_counter()
                if mode == "buffers":
                    header, bufs, layout = wire.encode_message(msg)
                    C.send(comm, MPI, 1, header, wire.wire_segments(bufs, layout))
                elif mode == "pickle":
                    comm.send(msg, dest=1, tag=11)
                else:
                    comm.Send([raw, MPI.BYTE], dest=1, tag=12)
                comm.Recv([ack, MPI.BYTE], source=1, tag=13)
                results[mode].append(time.perf_counter() - t0)
            else:
                if mode == "buffers":
                    st = MPI.Status()
                    comm.Probe(source=0, tag=C.TAG_HDR, status=st)
                    hdr = C.recv_header(comm, MPI, 0, st.Get_count(MPI.BYTE), max_total=None)
                    got = wire.decode_message(hdr, C.recv_payload(comm, MPI, 0, hdr, None))
                elif mode == "pickle":
                    got = comm.recv(source=0, tag=11)
                else:
                    comm.Recv([raw, MPI.BYTE], source=0, tag=12)
                    got = None
                if got is not None:
                    assert len(got.content["arrays"]["w"].data) == n
                del got
                comm.Send([ack, MPI.BYTE], dest=0, tag=13)
    if rank == 0:
        print("P2P_RESULTS " + json.dumps(results), flush=True)


def p2p(mib: float, reps: int, timeout: float) -> dict[str, list[float]]:
    cmd = [_mpiexec(), "-n", "2", sys.executable, str(Path(__file__).resolve())]
    from flwr_transports.mpi.launcher import _cma_usable

    env = dict(os.environ)
    if "MPIR_CVAR_CH4_CMA_ENABLE" not in env and _cma_usable():
        env["MPIR_CVAR_CH4_CMA_ENABLE"] = "1"  # as the launcher does
    print(f"  (MPICH CMA single-copy: {env.get('MPIR_CVAR_CH4_CMA_ENABLE', '0')})")
    out = _run([*cmd, "--p2p-worker", "--mib", str(mib), "--reps", str(reps)], timeout, env)
    line = next(x for x in out.splitlines() if x.startswith("P2P_RESULTS "))
    return json.loads(line.split(" ", 1)[1])


# ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=500.0, help="model size in MiB (default 500)")
    ap.add_argument("--rounds", type=int, default=3, help="FedAvg rounds (default 3)")
    ap.add_argument(
        "--client-work",
        choices=("echo", "add"),
        default="echo",
        help="echo: ClientApp sends the model back untouched (transport-bound); "
        "add: it decodes, adds, re-encodes (the test app's default)",
    )
    ap.add_argument("--reps", type=int, default=3, help="point-to-point repetitions")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--skip-app", action="store_true")
    ap.add_argument("--skip-inprocess", action="store_true")
    ap.add_argument("--skip-p2p", action="store_true")
    ap.add_argument("--p2p-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.p2p_worker:
        p2p_worker(args.mib, args.reps)
        return

    print(
        f"MPI runtime benchmark: model {args.mib:g} MiB, 2 client ranks, FedAvg, "
        f"client work '{args.client_work}'"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {os.cpu_count()} cores, load average {load:.1f}, python {sys.version.split()[0]}"
    )
    if not args.skip_app:
        rounds, wall = app_rounds_mpi(args.mib, args.rounds, args.client_work, args.timeout)
        print("\n[1] app rounds (train: model to 2 nodes and back; evaluate: model to 2 nodes)")
        print(f"  mpiexec -n 3 flwr-transports mpi: rounds {_fmt(rounds)} s")
        print(f"    median {_median(rounds):.2f} s/round, whole job {wall:.1f} s incl. startup")
        if not args.skip_inprocess:
            local = app_rounds_in_process(args.mib, args.rounds, args.client_work)
            print(f"  same app in one process, no transport: rounds {_fmt(local)} s")
            extra = _median(rounds) - _median(local)
            print(f"    -> the MPI transport adds {extra:.2f} s/round")
            moved = 6 * args.mib
            print(f"    ({moved:g} MiB moved per round: 4 x model down, 2 x model up)")
    if not args.skip_p2p:
        res = p2p(args.mib, args.reps, args.timeout)
        print(f"\n[2] one message of {args.mib:g} MiB rank 0 -> rank 1 (+1-byte ack), best of")
        print(f"    {args.reps}:")
        best = {k: min(v) for k, v in res.items()}
        for mode, label in (
            ("buffers", "runtime path (header + raw MPI buffers)"),
            ("pickle", "comm.send(Message) (pickle)"),
            ("raw", "single Send of a preallocated buffer"),
        ):
            gbps = args.mib * (1 << 20) * 8 / best[mode] / 1e9
            print(f"  {label:<42} {best[mode] * 1000:9.1f} ms  {gbps:6.2f} Gbit/s")
        print(f"  buffers vs pickle: {best['pickle'] / best['buffers']:.2f}x faster")


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


if __name__ == "__main__":
    main()

"""``flwr-transports mpi APP_DIR``: run an unchanged Flower app inside one MPI job.

    mpiexec -n 3 flwr-transports mpi ./my-app --run-config "num-server-rounds=5"

Rank 0 loads the app's ``serverapp`` component and runs it with an :class:`MpiGrid`;
ranks 1..N-1 each run the ``clientapp`` as one node with node_config
``partition-id = rank - 1``, ``num-partitions = N - 1`` (plus ``--node-config``).
The run config is the app's ``[tool.flwr.app.config]`` merged with ``--run-config``,
as ``flwr run`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import wire

log = logging.getLogger("flwr_transports.mpi")

SERVER_TASK_ID = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flwr-transports mpi",
        description="Run a Flower app under mpiexec: rank 0 runs the ServerApp, ranks "
        "1..N-1 each run the ClientApp as one node. Example: "
        "mpiexec -n 3 flwr-transports mpi ./app --run-config 'num-server-rounds=3'",
    )
    p.add_argument("app_dir", help="Flower app directory (with pyproject.toml)")
    p.add_argument(
        "--run-config",
        action="append",
        default=None,
        metavar="'k=v ...'",
        help="override [tool.flwr.app.config] values (as `flwr run --run-config`); "
        "repeatable, or a path to a .toml file",
    )
    p.add_argument(
        "--node-config",
        action="append",
        default=None,
        metavar="'k=v ...'",
        help="extra node_config entries given to every node",
    )
    p.add_argument("--run-id", type=int, default=None, help="run id (default: random)")
    p.add_argument(
        "--reply-timeout",
        type=float,
        default=None,
        metavar="S",
        help="end the run with an error naming the rank if a node has not replied "
        "to a message after S seconds (default: no limit beyond the strategy's own)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="how long rank 0 waits for the nodes to stop at the end (default 30)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=wire.DEFAULT_CHUNK,
        metavar="BYTES",
        help="largest single MPI message (default 1 GiB; must be < 2 GiB)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="refuse messages whose arrays add up to more than this",
    )
    p.add_argument(
        "--no-cma",
        action="store_true",
        help="do not turn on MPICH's single-copy intranode transfers (CMA)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _parse_kv(values: list[str] | None) -> dict[str, Any]:
    from flwr.common.config import parse_config_args

    return parse_config_args(values) if values else {}


def _setup(args: argparse.Namespace, n_ranks: int) -> dict[str, Any]:
    """Rank 0: read the app, fuse the run config. Returns a JSON-able setup dict."""
    from flwr.common.config import (
        get_fused_config_from_dir,
        get_metadata_from_config,
        get_project_config,
    )

    app_dir = Path(args.app_dir).expanduser().resolve()
    if not app_dir.is_dir():
        raise ValueError(f"app directory {args.app_dir!r} does not exist")
    config = get_project_config(app_dir)
    components = config["tool"]["flwr"]["app"]["components"]
    fab_id, fab_version = get_metadata_from_config(config)
    override = _parse_kv(args.run_config)
    run_config = get_fused_config_from_dir(app_dir, override)
    node_extra = _parse_kv(args.node_config)
    if not 1 <= args.chunk_size < (1 << 31):
        raise ValueError("--chunk-size must be between 1 and 2**31 - 1")
    return {
        "ok": True,
        "app_dir": str(app_dir),
        "serverapp": components["serverapp"],
        "clientapp": components["clientapp"],
        "fab_id": fab_id,
        "fab_version": fab_version,
        "override": override,
        "run_config": run_config,
        "node_extra": node_extra,
        "run_id": args.run_id if args.run_id is not None else secrets.randbits(63),
        "n_nodes": n_ranks - 1,
    }


def _cma_usable() -> bool:
    """Can ranks read each other's memory with process_vm_readv (Linux CMA)?

    Needs Yama's ptrace_scope absent or 0 (sibling processes of one uid) and no seccomp
    filter refusing the call (some containers): the latter is probed on this process.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope")
        if scope.exists() and scope.read_text().strip() != "0":
            return False
        import ctypes

        class IoVec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

        libc = ctypes.CDLL(None, use_errno=True)
        src, dst = ctypes.create_string_buffer(b"cma", 3), ctypes.create_string_buffer(3)
        local = IoVec(ctypes.addressof(dst), 3)
        remote = IoVec(ctypes.addressof(src), 3)
        n = libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        return n == 3 and dst.raw == b"cma"
    except Exception:  # noqa: BLE001 - any doubt: leave CMA off
        return False


def _prepare_mpi_env(args: argparse.Namespace) -> None:
    """Before MPI starts: MPICH's single-copy (CMA) transfers for large intranode
    messages are off by default because they need ptrace permission; turn them on
    when this machine allows it (an explicit MPIR_CVAR_CH4_CMA_ENABLE wins)."""
    if args.no_cma or "MPIR_CVAR_CH4_CMA_ENABLE" in os.environ:
        return
    if _cma_usable():
        os.environ["MPIR_CVAR_CH4_CMA_ENABLE"] = "1"


def _bcast_json(comm, MPI, obj: Any) -> Any:
    """Broadcast a JSON-able object from rank 0 (no pickle)."""
    import numpy as np

    if comm.Get_rank() == 0:
        raw = json.dumps(obj).encode()
        n = np.array([len(raw)], dtype=np.int64)
    else:
        raw, n = b"", np.zeros(1, dtype=np.int64)
    comm.Bcast([n, MPI.INT64_T], root=0)
    buf = bytearray(raw) if comm.Get_rank() == 0 else bytearray(int(n[0]))
    comm.Bcast([buf, MPI.BYTE], root=0)
    return json.loads(bytes(buf))


def _unlink_own_mpi_shm() -> None:
    """Unlink the MPI library's shared-memory files this process has mapped.

    MPICH removes them at a clean finalize but not after ``MPI_Abort``. Unlinking a
    mapped file is harmless to the ranks still using it (the memory stays until they
    unmap it), and nothing is left in /dev/shm once they are gone. Linux only.
    """
    with contextlib.suppress(Exception):  # cleanup must never get in the way of abort
        with open("/proc/self/maps", encoding="utf-8") as f:
            rows = [line.split(None, 5) for line in f]
        paths = {r[5].strip() for r in rows if len(r) == 6}
        for p in paths:
            name = p.rsplit("/", 1)[-1]
            if p.startswith("/dev/shm/") and name.startswith(_MPI_SHM_PREFIXES):
                with contextlib.suppress(OSError):
                    os.unlink(p)


_MPI_SHM_PREFIXES = ("mpich_shm_", "sm_segment.", "vader_segment.", "psm2_shm.")


def _cleanup_on_sigterm() -> None:
    """A scheduler (or mpiexec on Ctrl-C) ending the job with SIGTERM: exit at once."""

    def _handler(signum, frame):
        _unlink_own_mpi_shm()
        os._exit(128 + signum)

    with contextlib.suppress(ValueError, OSError):  # not in the main thread, or no SIGTERM
        signal.signal(signal.SIGTERM, _handler)


def _abort(MPI, code: int) -> None:
    _unlink_own_mpi_shm()
    sys.stdout.flush()
    sys.stderr.flush()
    # mpiexec's proxy forwards our output from a pipe; give it a moment to pass on the
    # error that says why, before Abort tears every rank (and that pipe) down
    time.sleep(0.5)
    MPI.COMM_WORLD.Abort(code)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)

    from . import comm as C

    _prepare_mpi_env(args)
    try:
        MPI = C.import_mpi()
    except ImportError as exc:
        print(f"flwr-transports mpi: {exc}", file=sys.stderr)
        return 2

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[mpi rank {rank}] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    log.propagate = False

    if size < 2:
        print(
            "flwr-transports mpi: needs at least 2 MPI ranks (1 server + nodes); "
            "run it as: mpiexec -n 3 flwr-transports mpi APP_DIR",
            file=sys.stderr,
        )
        return 2

    _cleanup_on_sigterm()
    comm = world.Dup()
    try:
        setup: dict[str, Any]
        if rank == 0:
            try:
                setup = _setup(args, size)
            except Exception as exc:  # noqa: BLE001 - any setup problem ends every rank
                setup = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            setup = {}
        setup = _bcast_json(comm, MPI, setup)
        # every rank has attached MPI's shared-memory segment by now: unlink its file so
        # that a killed job (mpiexec SIGKILLs the ranks when one dies) leaves nothing
        comm.Barrier()
        _unlink_own_mpi_shm()
        if not setup["ok"]:
            if rank == 0:
                print(f"flwr-transports mpi: {setup['error']}", file=sys.stderr)
            return 2
        if rank == 0:
            return _run_server(comm, MPI, args, setup)
        return _run_node(comm, MPI, args, setup)
    except KeyboardInterrupt:
        log.error("interrupted; stopping all ranks")
        _abort(MPI, 130)
        return 130
    except SystemExit as exc:
        log.error("rank %d is exiting (SystemExit %s); stopping all ranks", rank, exc.code)
        _abort(MPI, 1)
        return 1
    except BaseException:  # noqa: BLE001 - anything else would leave the other ranks waiting forever
        log.error("rank %d failed; stopping all ranks:\n%s", rank, traceback.format_exc())
        _abort(MPI, 3)
        return 3
    finally:
        with contextlib.suppress(Exception):  # MPI may already be torn down
            comm.Free()


def _identity(setup: dict[str, Any], node_id: int, task_id: int) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = setup["run_id"]
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def _run_server(comm, MPI, args, setup: dict[str, Any]) -> int:
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.run_serverapp import run as run_server_app
    from flwr.supercore.run import Run

    from .grid import MpiGrid, RankError, RankTimeout

    _identity(setup, SUPERLINK_NODE_ID, SERVER_TASK_ID)
    run = Run.create_empty(setup["run_id"])
    run.fab_id, run.fab_version = setup["fab_id"], setup["fab_version"]
    run.override_config = setup["override"]
    grid = MpiGrid(
        comm,
        run=run,
        chunk=args.chunk_size,
        reply_timeout=args.reply_timeout,
        max_message_bytes=args.max_message_bytes,
    )
    context = Context(
        run_id=setup["run_id"],
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(setup["run_config"]),
    )
    log.debug("running ServerApp %s with %d nodes", setup["serverapp"], setup["n_nodes"])
    code = 0
    try:
        run_server_app(
            grid=grid,
            context=context,
            server_app_dir=setup["app_dir"],
            server_app_attr=setup["serverapp"],
        )
    except (RankTimeout, RankError) as exc:
        log.error("%s; ending the MPI job", exc)
        _abort(MPI, 3)
        return 3
    except Exception:  # noqa: BLE001 - the ServerApp failed: stop the nodes, exit 1
        log.error("the ServerApp raised an exception:\n%s", traceback.format_exc())
        code = 1
    missing = grid.shutdown(args.shutdown_timeout)
    if missing:
        log.error(
            "MPI ranks %s did not stop within %.0f s (stalled or dead); ending the MPI job",
            ", ".join(map(str, missing)),
            args.shutdown_timeout,
        )
        _abort(MPI, 3)
        return 3
    log.info(
        "run %d finished: %d bytes sent, %d bytes received over MPI",
        setup["run_id"],
        grid.bytes_sent,
        grid.bytes_received,
    )
    return code


def _run_node(comm, MPI, args, setup: dict[str, Any]) -> int:
    from flwr.app import Context, RecordDict
    from flwr.clientapp.client_app import ClientApp, LoadClientAppError
    from flwr.supercore.object_ref import load_app

    from .grid import node_id_of
    from .node import serve

    rank = comm.Get_rank()
    node_id = node_id_of(rank)
    _identity(setup, node_id, 1000 + rank)
    node_config = {
        "partition-id": rank - 1,
        "num-partitions": setup["n_nodes"],
        "mpi-rank": rank,
        **setup["node_extra"],
    }
    context = Context(
        run_id=setup["run_id"],
        node_id=node_id,
        node_config=node_config,
        state=RecordDict(),
        run_config=dict(setup["run_config"]),
    )

    def _load():
        app = load_app(setup["clientapp"], LoadClientAppError, setup["app_dir"])
        if not isinstance(app, ClientApp):
            raise LoadClientAppError(f"{setup['clientapp']} is not a ClientApp")
        return app

    try:
        serve(
            comm,
            context,
            _load,
            chunk=args.chunk_size,
            max_message_bytes=args.max_message_bytes,
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:  # noqa: BLE001 - a broken node ends the job, naming itself
        log.error("MPI rank %d (node %d) failed:\n%s", rank, node_id, traceback.format_exc())
        _abort(MPI, 3)
        return 3
    return 0

"""The MPI runtime under a real ``mpiexec``: results match an in-process reference.

Each test starts ``mpiexec -n N python -m flwr_transports.cli mpi tests/apps/mpi_app``
and bounds it with a timeout (the process group is killed if it runs over).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from flwr_transports.testing import InProcessGrid

APP = Path(__file__).parent / "apps" / "mpi_app"


def _mpiexec() -> str | None:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(
        MPIEXEC is None, reason="mpiexec not found: pip install flwr-transports[mpi]"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("mpi4py") is None,
        reason="mpi4py not installed: pip install flwr-transports[mpi]",
    ),
]

# ---------------------------------------------------------------------------------------
# helpers


def _mpi_shm() -> set[str]:
    names = ("mpich_shm_", "sm_segment.", "vader_segment.")
    return (
        {p for p in os.listdir("/dev/shm") if p.startswith(names)}
        if os.path.isdir("/dev/shm")
        else set()
    )


def _mapped_anywhere(name: str) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with (
            contextlib.suppress(OSError),
            open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f,
        ):
            if name in f.read():
                return True
    return False


@pytest.fixture(autouse=True)
def no_shm_left_behind():
    """No MPI shared-memory file may outlive a job (only files no live process maps count)."""
    before = _mpi_shm()
    yield
    left = [n for n in _mpi_shm() - before if not _mapped_anywhere(n)]
    for n in left:  # clean up, then fail
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{n}")
    assert not left, f"MPI job left /dev/shm files behind: {left}"


def run_mpi(
    *args: str, n: int = 3, timeout: float = 120, mpiexec_flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    cmd = [
        MPIEXEC,
        *mpiexec_flags,
        "-n",
        str(n),
        sys.executable,
        "-m",
        "flwr_transports.cli",
        "mpi",
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mpiexec did not finish within {timeout} s:\n{out[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def run_reference(n_nodes: int, run_config: list[str]) -> None:
    """Run the app's ServerApp + ClientApp in this process, as the MPI launcher would."""
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.server.run_serverapp import run as run_server_app
    from flwr.supercore.object_ref import load_app

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    try:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 5, SUPERLINK_NODE_ID, 1
        cfg = get_fused_config_from_dir(APP, parse_config_args(run_config))
        client_app = load_app("mpi_app.client_app:app", LoadClientAppError, APP)
        contexts = {
            1000 + r: Context(
                run_id=5,
                node_id=1000 + r,
                node_config={"partition-id": r - 1, "num-partitions": n_nodes, "mpi-rank": r},
                state=RecordDict(),
                run_config=dict(cfg),
            )
            for r in range(1, n_nodes + 1)
        }
        # the reference: the same ClientApp called in this process, one Context per node
        grid = InProcessGrid(client_app, contexts=contexts, run_id=5, serialize=False,
                             sort_replies=False)
        ctx = Context(5, SUPERLINK_NODE_ID, {}, RecordDict(), dict(cfg))
        run_server_app(grid, ctx, str(APP), "mpi_app.server_app:app")
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def load_result(path: Path) -> tuple[list[np.ndarray], dict]:
    with np.load(path) as z:
        arrays = [z[f"a{i}"] for i in range(len(z.files))]
    return arrays, json.loads(Path(str(path) + ".json").read_text())


def assert_same_model(got: Path, want: Path) -> dict:
    ga, gj = load_result(got)
    wa, wj = load_result(want)
    assert gj == wj  # array names, train and evaluate metrics of every round
    assert len(ga) == len(wa)
    for g, w in zip(ga, wa, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(g, w, equal_nan=True)  # bit-for-bit the same numbers
    return gj


def compare_with_reference(tmp_path: Path, config: str, *extra: str, n: int = 3) -> dict:
    got, want = tmp_path / "mpi.npz", tmp_path / "ref.npz"
    res = run_mpi(str(APP), "--run-config", f"{config} out-path='{got}'", *extra, n=n)
    assert res.returncode == 0, res.stdout[-5000:]
    run_reference(n - 1, [f"{config} out-path='{want}'"])
    return assert_same_model(got, want) | {"_stdout": res.stdout}


# ---------------------------------------------------------------------------------------
# tests


def test_fedavg_matches_in_process_reference(tmp_path):
    out = compare_with_reference(tmp_path, "num-server-rounds=3 strategy='fedavg'")
    # node state persists across rounds: every node counted its own calls
    assert [out["train"][str(r)]["calls"] for r in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert "Received 2 results and 0 failures" in out["_stdout"]
    # and the model actually moved: FedAvg of +0.5 (weight 1) and +1.0 (weight 2), 3 rounds
    arrays, _ = load_result(tmp_path / "mpi.npz")
    w0 = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    np.testing.assert_allclose(arrays[0], w0 + 3 * (0.5 / 3 + 2 * 1.0 / 3), rtol=1e-6)


def test_fedadam_matches_in_process_reference(tmp_path):
    compare_with_reference(tmp_path, "num-server-rounds=2 strategy='fedadam'")


def test_payload_types_chunked_and_packed(tmp_path):
    # several dtypes, an empty array, a 0-d array, 300 tiny arrays and one 1.2 MB array
    # cut into 64 KiB chunks: the final model is bit-identical to the reference
    out = compare_with_reference(
        tmp_path, "num-server-rounds=1 model='payload'", "--chunk-size", "65536"
    )
    assert len(out["keys"]) == 306
    assert "Received 2 results and 0 failures" in out["_stdout"]


def test_four_ranks(tmp_path):
    compare_with_reference(tmp_path, "num-server-rounds=2", n=4)


def test_grid_api_push_pull_and_timeout(tmp_path):
    path = tmp_path / "grid.json"
    res = run_mpi(str(APP), "--run-config", f"mode='grid' out-path='{path}'")
    assert res.returncode == 0, res.stdout[-5000:]
    out = json.loads(path.read_text())
    assert out["nodes"] == [1001, 1002] and out["run_id_matches"]
    assert out["n_replies"] == 2
    by_src = {r["src"]: r for r in out["replies"]}
    for pid, node in enumerate((1001, 1002)):
        r = by_src[node]
        assert r["reply_to_known"] and r["group"] == "g1"
        assert r["arrays"] and r["config"] and r["metrics"], r
        assert r["who"] == {"partition-id": pid, "num-partitions": 2, "node-id": node}
    # send_and_receive(timeout=0.3) returned early with nothing, naming the ranks
    assert out["early_replies"] == 0 and out["early_waited"] < 1.4
    assert "no reply from rank 1 (node 1001), rank 2 (node 1002)" in res.stdout
    assert out["late_replies"] == 2  # late replies still reach pull_messages
    assert out["unknown_node"].startswith("unknown node id 99")


def test_clientapp_exception_is_an_error_reply(tmp_path):
    out = compare_with_reference(tmp_path, "num-server-rounds=2 fail-partition=1")
    text = out["_stdout"]
    assert text.count("Received 1 results and 1 failures") == 2
    assert "Received error in reply from node 1002" in text
    assert "partition 1 fails on purpose" in text
    # only node 1001 (partition 0, 1 example, +0.5 a round) was aggregated
    assert out["train"]["2"]["calls"] == 2.0


def test_stalled_rank_ends_the_run_naming_it():
    res = run_mpi(str(APP), "--run-config", "stall-partition=1", "--reply-timeout", "3", timeout=90)
    assert res.returncode != 0
    assert "MPI rank 2 (node 1002) did not reply" in res.stdout, res.stdout[-3000:]


def test_dead_rank_ends_the_job():
    # mpiexec (Hydra) ends the whole job as soon as one rank dies
    res = run_mpi(str(APP), "--run-config", "exit-partition=0", timeout=90)
    assert res.returncode != 0


def test_dead_rank_is_named_when_mpiexec_keeps_the_others():
    res = run_mpi(
        str(APP),
        "--run-config",
        "exit-partition=0",
        "--reply-timeout",
        "3",
        timeout=90,
        mpiexec_flags=("-disable-auto-cleanup",),
    )
    assert res.returncode != 0
    assert "MPI rank 1 (node 1001) did not reply" in res.stdout, res.stdout[-3000:]


def test_bad_run_config_is_reported():
    res = run_mpi(str(APP), "--run-config", "no-such-key=1", timeout=60)
    assert res.returncode == 2
    assert "no-such-key" in res.stdout and "not present" in res.stdout


def test_one_rank_is_refused():
    res = run_mpi(str(APP), n=1, timeout=60)
    assert res.returncode == 2
    assert "at least 2 MPI ranks" in res.stdout

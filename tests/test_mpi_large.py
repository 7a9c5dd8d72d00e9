"""A message above 2 GiB through the MPI runtime's wire path (real mpiexec, ~5 GB RAM)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from test_mpi import MPIEXEC, no_shm_left_behind  # noqa: F401 - fixture

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.slow,
    pytest.mark.skipif(
        MPIEXEC is None, reason="mpiexec not found: pip install flwr-transports[mpi]"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("mpi4py") is None,
        reason="mpi4py not installed: pip install flwr-transports[mpi]",
    ),
]

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from mpi4py import MPI
    from flwr.app import Array, ArrayRecord, Message, Metadata, RecordDict
    from flwr_transports.mpi import comm as C, wire

    n_words = int(sys.argv[1])
    comm = MPI.COMM_WORLD
    if comm.rank == 0:
        data = np.arange(n_words, dtype=np.uint64).tobytes()
        md = Metadata(1, "m", 1, 1001, "", "1", time.time(), 3600.0, "train")
        rec = ArrayRecord({
            "small": Array(np.arange(5, dtype=np.float32)),
            "huge": Array("uint64", (n_words,), "raw", data),
        })
        msg = Message(metadata=md, content=RecordDict({"arrays": rec}))
        header, bufs, layout = wire.encode_message(msg)
        assert max(memoryview(s).nbytes for s in wire.wire_segments(bufs, layout)) < 2**31
        C.send(comm, MPI, 1, header, wire.wire_segments(bufs, layout))
        ok = comm.recv(source=1, tag=5)
        print("RESULT", ok, flush=True)
    else:
        st = MPI.Status()
        comm.Probe(source=0, tag=C.TAG_HDR, status=st)
        hdr = C.recv_header(comm, MPI, 0, st.Get_count(MPI.BYTE), max_total=None)
        got = wire.decode_message(hdr, C.recv_payload(comm, MPI, 0, hdr, None))
        huge = got.content["arrays"]["huge"]
        ok = type(huge.data) is bytes and len(huge.data) == 8 * n_words
        ok = ok and huge.shape == (n_words,) and huge.dtype == "uint64"
        view = np.frombuffer(huge.data, dtype=np.uint64)
        step = 1 << 25
        for start in range(0, n_words, step):
            stop = min(n_words, start + step)
            ok = ok and bool(np.array_equal(view[start:stop], np.arange(start, stop, dtype=np.uint64)))
        small = got.content["arrays"]["small"].numpy()
        ok = ok and small.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        comm.send(bool(ok), dest=0, tag=5)
    """
)


def test_message_above_2_gib(tmp_path):
    script = tmp_path / "large.py"
    script.write_text(SCRIPT)
    n_words = (2**31 + 2**28) // 8  # 2.25 GiB of uint64s: 3 chunks of at most 1 GiB
    proc = subprocess.Popen(
        [MPIEXEC, "-n", "2", sys.executable, str(script), str(n_words)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=os.getcwd(),
    )
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert "RESULT True" in out, out[-3000:]

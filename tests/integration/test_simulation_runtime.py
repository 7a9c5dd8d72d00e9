"""The migrated app (docs/migrate.md) in Flower's Simulation runtime (Ray).

``flwr run APP local --federation-config "num-supernodes=2"`` as the page describes:
the Flower CLI starts its own local SuperLink in simulation mode (on free ports given
by FLWR_LOCAL_SUPERLINK_HTTP_API_PORT / FLWR_LOCAL_CONTROL_API_PORT, with a private
FLWR_HOME) and Ray runs the ClientApps. The app runs in-band and over ``shm://``;
checked: both final models are bit-identical and trained, the shm:// run moved the
payloads over the link (the Step 4 stats line), and that SuperLink, which outlives
``flwr run``, is stopped with everything it started, Ray's temp files included.

Skipped only when Ray is not installed (``pip install "flwr[simulation]"``).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from migrate_doc import migrate

pytest.importorskip("ray", reason="the Simulation runtime needs Ray: pip install 'flwr[simulation]'")
import psutil

ROUNDS = 1


def _local_superlinks(control_port: int) -> list:
    needle = f"127.0.0.1:{control_port}"
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if any("flower-superlink" in c for c in cmd[:2]) and needle in cmd:
            found.append(p)
    return found


def _stop_tree(procs: list) -> list[int]:
    """SIGTERM the processes and all their descendants, then SIGKILL what is left."""
    tree = []
    for p in procs:
        try:
            tree += [p, *p.children(recursive=True)]
        except psutil.Error:
            pass
    for p in tree:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in tree]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from flwr_transports.testing.deploy import free_port, run_config_toml

    base = tmp_path_factory.mktemp("simulation")
    app = base / "app"
    migrate(app)
    bindir = Path(sys.executable).parent
    ray_tmp = tempfile.mkdtemp(prefix="ftxray-")  # short: Ray's socket paths must stay short
    control_port = free_port()
    env = dict(
        os.environ,
        PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        FLWR_HOME=str(base / "flwr-home"),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        # use this environment (the checkout under test), not a fresh one per run
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        RAY_TMPDIR=ray_tmp,
        PYTHONUNBUFFERED="1",
    )
    outputs, models, seen = {}, {}, set()
    try:
        for name, transport in (("inband", "inband"), ("shm", "shm://")):
            cfg = base / f"{name}.toml"
            out = base / f"{name}.npz"
            cfg.write_text(run_config_toml({"transport": transport, "result-path": str(out),
                                            "num-server-rounds": ROUNDS}), encoding="utf-8")
            t0 = time.perf_counter()
            res = subprocess.run(
                [str(bindir / "flwr"), "run", str(app), "local", "--stream",
                 "--federation-config", "num-supernodes=2", "--run-config", str(cfg)],
                capture_output=True, text=True, env=env, cwd=base, timeout=300, check=False,
            )
            outputs[name] = res.stdout + res.stderr
            print(f"simulation run {name}: {time.perf_counter() - t0:.1f} s")
            for p in _local_superlinks(control_port):
                seen |= {p.pid, *(c.pid for c in p.children(recursive=True))}
            # flwr run exits 0 even when the run failed: the result file is the proof
            assert out.is_file(), f"{name}: no result (rc {res.returncode}):\n" \
                                  f"{outputs[name][-4000:]}"
            with np.load(out) as z:
                models[name] = [z[f"arr_{i}"] for i in range(len(z.files))]
    finally:
        superlinks = _local_superlinks(control_port)
        stopped = _stop_tree(superlinks)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    alive = [pid for pid in seen | set(stopped) if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    return {"outputs": outputs, "models": models, "superlinks": superlinks, "alive": alive}


@pytest.mark.integration
@pytest.mark.slow
def test_offloaded_simulation_gives_the_in_band_model(sim):
    a, b = sim["models"]["inband"], sim["models"]["shm"]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7)  # streaming aggregation
    assert float(np.abs(a[1]).max()) > 0  # the bias started at zero: training happened


@pytest.mark.integration
@pytest.mark.slow
def test_simulation_ran_in_the_simulation_runtime_and_offloaded(sim):
    out = sim["outputs"]["shm"]
    assert "Starting Flower Simulation" in out  # Ray's Simulation runtime, not a deployment
    m = re.search(r"^flwr-transports stats: (\{.*\})\s*$", out, flags=re.MULTILINE)
    assert m, out[-3000:]
    stats = ast.literal_eval(m.group(1))
    model_bytes = sum(x.nbytes for x in sim["models"]["shm"])
    assert stats["link_bytes_sent"] >= 4 * ROUNDS * model_bytes, stats
    assert stats["link_bytes_received"] >= 2 * ROUNDS * model_bytes, stats
    assert stats["inband_bytes_sent"] < 64 * 1024 and stats["replies_rejected"] == 0, stats
    inband = ast.literal_eval(re.search(r"^flwr-transports stats: (\{.*\})\s*$",
                                        sim["outputs"]["inband"], flags=re.MULTILINE).group(1))
    assert inband["link_bytes_sent"] == 0 and inband["inband_bytes_sent"] >= 4 * model_bytes


@pytest.mark.integration
@pytest.mark.slow
def test_local_superlink_was_started_then_stopped(sim):
    assert len(sim["superlinks"]) == 1, "flwr run did not leave exactly one local SuperLink"
    assert sim["alive"] == []

"""Smoke tests of ``ftx-bench`` on tiny sizes (loopback), WAN setup/teardown.

Speed is not asserted here (that is what the benchmark prints); these tests check that
every command runs real transfers end to end, reports sane numbers, writes its
outputs and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from ftx_bench import cli, report
from ftx_bench.p2p import backend_unavailable, percentile, run_p2p
from ftx_bench.wan import PROFILES, can_emulate, get_profile, list_namespaces

KiB = 1024


def _ftx_shm() -> set[str]:
    return set(glob.glob("/dev/shm/ftx-*"))


def test_percentile_and_sizes():
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0], 0.95) == 5.0
    assert cli._sizes("1MB,2KiB") == [1_000_000, 2048]
    with pytest.raises(argparse.ArgumentTypeError):
        cli._sizes("0")
    with pytest.raises(argparse.ArgumentTypeError):
        cli._ints("0,3")


def test_profiles():
    assert {"lan", "geo-proximal", "geo-distributed"} <= set(PROFILES)
    assert PROFILES["geo-distributed"].rtt_ms > PROFILES["geo-proximal"].rtt_ms > 0
    p = get_profile("50ms/500mbit")
    assert (p.rtt_ms, p.rate_mbit) == (50.0, 500.0)
    assert get_profile("10ms/2gbit").rate_mbit == 2000
    for bad in ("moon", "50ms", "-1ms/5mbit", "5000ms/10mbit"):
        with pytest.raises(ValueError):
            get_profile(bad)


def test_p2p_loopback_tiny():
    """Real transfers through each backend that can run here, 64 KiB, K=1 and 2."""
    backends = ["raw-tcp", "grpc-unary", "grpc-stream", "link-shm", "link-file"]
    before = _ftx_shm()
    rows = run_p2p([64 * KiB], backends, [1, 2], repeat=2, warmup=1)
    assert len(rows) == len(backends) * 2
    for r in rows:
        if "skipped" in r:  # grpcio missing, for instance
            assert backend_unavailable(r["backend"])
            continue
        assert "error" not in r, r
        assert len(r["latency_s"]) == 2
        assert all(x > 0 for x in r["latency_s"])
        assert r["latency_median_s"] <= r["latency_p95_s"] + 1e-12
        assert r["throughput_MBps"] > 0
        # peak vs base are two samples of a live process: allow 1 MiB of jitter
        assert r["receiver_peak_rss_bytes"] >= r["receiver_base_rss_bytes"] - (1 << 20) > 0
    # the shm link removed what it published (names of live processes belong to other
    # test runs sharing /dev/shm; a leftover is a new name whose owner is gone)
    from flwr_transports.links.base import owner_pid, pid_alive

    left = {n for n in _ftx_shm() - before
            if not pid_alive(owner_pid(n.rsplit("/", 1)[-1]) or 0)}
    assert left == set()


def test_unknown_and_unavailable_backends():
    assert "unknown backend" in backend_unavailable("carrier-pigeon")
    assert backend_unavailable("link-shm", wan=True)  # same-host only
    assert backend_unavailable("mpi-buffer", wan=True)
    # a backend whose dependency is missing is reported as skipped, with the reason
    missing = next((b for b in ("torch-rpc", "link-s3-radosgw") if backend_unavailable(b)), None)
    if missing is not None:
        rows = run_p2p([1024], [missing], [1], 1, 0)
        assert "skipped" in rows[0] and rows[0]["skipped"] == backend_unavailable(missing)


@pytest.mark.mpi
@pytest.mark.skipif(backend_unavailable("mpi-buffer") is not None,
                    reason=f"MPI not available: {backend_unavailable('mpi-buffer')}")
def test_p2p_mpi_tiny():
    rows = run_p2p([64 * KiB], ["mpi-buffer", "mpi-pickle"], [1], repeat=2, warmup=1)
    for r in rows:
        assert "error" not in r, r
        assert r["throughput_MBps"] > 0


def test_cli_p2p_outputs(tmp_path, capsys):
    rc = cli.main(["p2p", "--sizes", "32KiB,64KiB", "--backends", "raw-tcp,link-shm,torch-rpc",
                   "--concurrency", "1", "--repeat", "2", "--warmup", "0",
                   "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "p2p.json").read_text())
    assert doc["kind"] == "p2p"
    assert doc["environment"]["cpus"] >= 1 and doc["environment"]["versions"]["flwr"]
    names = {(r["backend"], r["size_bytes"]) for r in doc["results"]}
    assert ("raw-tcp", 65536) in names and ("link-shm", 32768) in names
    md = (tmp_path / "p2p.md").read_text()
    assert "| raw-tcp | 64 KiB | 1 |" in md
    assert "torch" in md  # the skipped backend is listed with its reason
    assert "| raw-tcp |" in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    png = tmp_path / "p2p-throughput-k1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_input(capsys):
    assert cli.main(["p2p", "--backends", "nope", "--sizes", "1KiB"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["p2p", "--sizes", "lots"])
    assert cli.main(["p2p", "--sizes", "1KiB", "--backends", "raw-tcp", "--wan", "moon"]) == 2


def test_e2e_report_and_ratios(tmp_path):
    from ftx_bench.e2e import ratios

    rows = [
        {"transport": "inband", "model_mib": 8, "kind": "model", "round_s": 10.0,
         "floor_s": 2.0, "overhead_s": 8.0, "superlink_peak_rss_bytes": 300 << 20,
         "stats": {"inband_bytes_sent": 100}},
        {"transport": "shm://", "model_mib": 8, "kind": "model", "round_s": 3.0,
         "floor_s": 2.0, "overhead_s": 1.0, "superlink_peak_rss_bytes": 100 << 20,
         "stats": {"link_bytes_sent": 100}},
        {"transport": "tcp://", "model_mib": 8, "kind": "model", "round_s": 1.9,
         "floor_s": 2.0, "overhead_s": -0.1, "superlink_peak_rss_bytes": 100 << 20},
        {"transport": "s3://", "model_mib": 8, "skipped": "no S3"},
        {"transport": "inband", "model_mib": 0.01, "kind": "floor", "round_s": 2.0,
         "superlink_peak_rss_bytes": 100 << 20},
        {"transport": "shm://", "model_mib": 0.01, "kind": "floor", "round_s": 1.0,
         "superlink_peak_rss_bytes": 100 << 20},
        {"transport": "tcp://", "model_mib": 0.01, "kind": "floor", "round_s": 1.5,
         "superlink_peak_rss_bytes": 100 << 20},
    ]
    r = ratios(rows)
    # median of the three floor runs: 1.5 s -> in-band 8.5 s, shm 1.5 s above it
    assert r["8 MiB inband/shm:// overhead above the pooled floor (1.50 s)"] == pytest.approx(
        8.5 / 1.5)
    assert r["8 MiB inband/shm:// overhead"] == pytest.approx(8.0)
    assert r["8 MiB inband/shm:// round"] == pytest.approx(10 / 3)
    assert "8 MiB inband/tcp:// overhead" not in r  # below the noise: not a ratio
    paths = report.write_outputs("e2e", rows, {"nodes": 2, "rounds": 2, "ratios": r},
                                 tmp_path)
    with open(paths["markdown"], encoding="utf-8") as f:
        md = f.read()
    assert "| shm:// | 8 MiB | 3.00 |" in md and "no S3" in md


# ---- WAN emulation -------------------------------------------------------------------

_NO_WAN = can_emulate()


@pytest.mark.skipif(_NO_WAN is not None, reason=f"WAN emulation unavailable: {_NO_WAN}")
@pytest.mark.integration
def test_wan_setup_teardown_and_delay():
    """A 40 ms profile: the RTT is real for TCP, raw TCP crosses it, all is removed."""
    from ftx_bench.p2p import Placement
    from ftx_bench.wan import WanEmulation

    wan = WanEmulation("40ms/200mbit")
    with wan:
        names = set(list_namespaces())
        assert {wan.ns_a, wan.ns_b, wan.ns_r} <= names
        relay = wan.relay.pid
        rtt = wan.measure_rtt_ms()
        assert 38 <= rtt <= 80, rtt  # the connect handshake takes one RTT
        place = Placement(host=wan.addr_a, sender_prefix=wan.prefix("a"),
                          receiver_prefix=wan.prefix("b"), wan=True)
        rows = run_p2p([256 * KiB], ["raw-tcp", "link-shm"], [1], 2, 1, place=place)
        tcp = rows[0]
        assert "error" not in tcp, tcp
        assert tcp["latency_median_s"] >= 0.020  # at least half an RTT
        assert "same-host" in rows[1]["skipped"]
        qd = subprocess.run(["tc", "-n", wan.ns_a, "qdisc", "show", "dev", "a0"],
                            capture_output=True, text=True, check=True).stdout
        assert "tbf" in qd and "200Mbit" in qd
    assert not ({wan.ns_a, wan.ns_b, wan.ns_r} & set(list_namespaces()))
    assert not os.path.exists(f"/proc/{relay}")


@pytest.mark.skipif(_NO_WAN is not None, reason=f"WAN emulation unavailable: {_NO_WAN}")
@pytest.mark.integration
def test_wan_removed_on_sigterm(tmp_path):
    """SIGTERM to a process holding a WAN up: namespaces and relay are gone afterwards."""
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys,time\n"
        "from ftx_bench.wan import WanEmulation\n"
        "w=WanEmulation('20ms/100mbit')\n"
        "with w:\n"
        "    print(w.tag, w.relay.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        tag, relay = p.stdout.readline().split()
        assert f"{tag}-r" in list_namespaces()
        p.terminate()
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not [n for n in list_namespaces() if n.startswith(tag + "-")]
    assert not os.path.exists(f"/proc/{relay}")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink", path=os.path.dirname(sys.executable))
                    is None, reason="flower-superlink not installed next to this Python")
def test_cli_e2e_tiny(tmp_path):
    """A real SuperLink + 2 SuperNodes, one tiny model in-band and over shm://."""
    rc = cli.main(["e2e", "--sizes", "1MiB", "--transports", "inband,shm://", "--rounds", "1",
                   "--floor-mib", "0", "--no-plots", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "e2e.json").read_text())
    assert rc == 0, doc["results"]
    rows = {r["transport"]: r for r in doc["results"]}
    assert rows["inband"]["round_s"] > 0 and rows["shm://"]["round_s"] > 0
    assert rows["inband"]["stats"]["link_bytes_sent"] == 0
    assert rows["shm://"]["stats"]["link_bytes_sent"] >= 1 << 20
    assert rows["shm://"]["superlink_peak_rss_bytes"] > 0
    # every process traced its payload work: the round's critical path, from real events
    (b,) = rows["shm://"]["breakdown"]
    assert b["round"] == 1
    for k in ("publish", "to_clients", "fetch", "app", "upload", "to_server", "aggregate"):
        assert b[k] >= 0, k
    assert b["fetch_mib_s"] > 0
    # publish -> clients -> fetch ... -> aggregate end happen in order inside the round
    assert b["total"] >= b["to_clients"] + b["fetch_max"] + b["to_server"]
    assert b["total"] <= rows["shm://"]["round_s"] + 1
    (ib,) = rows["inband"]["breakdown"]  # in-band: no payload events, only app + aggregation
    assert "fetch" not in ib and "upload" not in ib and ib["app"] >= 0 and ib["aggregate"] >= 0


@pytest.mark.skipif(_NO_WAN is not None, reason=f"WAN emulation unavailable: {_NO_WAN}")
def test_wan_cleanup_stale_removes_dead_runs_only():
    from ftx_bench.wan import cleanup_stale

    dead = 4_000_000 - 7  # above the default pid_max (4194304 max): no such process
    ns = f"ftxb-{dead}-a"
    mine = f"ftxb-{os.getpid()}-a"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "add", mine], check=True)
    try:
        assert ns in cleanup_stale(dry_run=True)
        assert ns in list_namespaces()  # dry run removes nothing
        removed = cleanup_stale()
        assert ns in removed and mine not in removed  # a live owner keeps its namespace
        assert ns not in list_namespaces() and mine in list_namespaces()
    finally:
        for n in (ns, mine):
            subprocess.run(["ip", "netns", "del", n], check=False, capture_output=True)


def test_cli_plot_from_e2e_json(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib")
    docs = []
    for prof, rt in ((None, 3.0), ("geo-distributed", 9.0)):
        doc = {"kind": "e2e", "meta": {"wan": prof}, "results": [
            {"transport": "inband", "model_mib": 8, "kind": "model", "round_s": rt * 2,
             "floor_s": 1.0},
            {"transport": "tcp://", "model_mib": 8, "kind": "model", "round_s": rt,
             "floor_s": 1.0}]}
        p = tmp_path / f"{prof}.json"
        p.write_text(json.dumps(doc))
        docs.append(str(p))
    out = tmp_path / "x.png"
    assert cli.main(["plot", *docs, "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "p2p"}))
    assert cli.main(["plot", str(bad), "--out", str(out)]) == 2


@pytest.mark.skipif(_NO_WAN is not None, reason=f"WAN emulation unavailable: {_NO_WAN}")
@pytest.mark.integration
def test_cli_p2p_wan_sigterm_mid_run_leaves_nothing(tmp_path):
    """SIGTERM while a transfer is in flight: workers, relay and namespaces all go."""
    import time

    p = subprocess.Popen(
        [sys.executable, "-m", "ftx_bench", "p2p", "--wan", "40ms/100mbit",
         "--sizes", "50MB", "--backends", "raw-tcp", "--concurrency", "1", "--repeat", "20",
         "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    tag = f"ftxb-{p.pid}-"
    try:
        deadline = time.monotonic() + 60
        while not any(n.startswith(tag) for n in list_namespaces()):
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.2)
        kids: list[str] = []
        while len(kids) < 2:  # into the transfers: the relay and a worker are running
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.2)
            kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)],
                                  capture_output=True, text=True, check=False).stdout.split()
        p.terminate()
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert not [n for n in list_namespaces() if n.startswith(tag)]
    deadline = time.monotonic() + 10  # until every child has exited and been reaped
    while [k for k in kids if os.path.exists(f"/proc/{k}")] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [k for k in kids if os.path.exists(f"/proc/{k}")]
    assert not (tmp_path / "out").exists()


def test_ftx_bench_is_the_harness():
    from pathlib import Path

    import ftx_bench.cli
    import ftx_bench.wan

    assert Path(ftx_bench.wan.RELAY_SOURCE).is_file()
    assert ftx_bench.cli._parser().prog == "ftx-bench"

"""The WAN delay relays (C and Python) in benchmarks/ftx_bench/wan.py: build, bring a
profile up, move a few MB through it, check the RTT and the relay's counters, tear
down and check nothing is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from ftx_bench import wan

NEEDS_ROOT = pytest.mark.skipif(
    wan.can_emulate() is not None, reason=f"WAN emulation unavailable: {wan.can_emulate()}"
)
PAYLOAD = 8 * 1024 * 1024


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "flwr-transports"


def _compiler() -> bool:
    return bool(wan.shutil.which("gcc") or wan.shutil.which("cc"))


@pytest.mark.skipif(not _compiler(), reason="no C compiler (gcc/cc) on this machine")
def test_c_relay_compiles_once_and_is_cached(cache):
    binary, note = wan.build_c_relay()
    assert binary is not None, note
    assert "compiled now" in note and binary.parent == cache
    assert os.access(binary, os.X_OK)
    assert (cache.stat().st_mode & 0o777) == 0o700
    again, note2 = wan.build_c_relay()
    assert again == binary and "compiled now" not in note2
    # a cached binary others could overwrite is not trusted: rebuilt
    os.chmod(binary, 0o777)
    third, note3 = wan.build_c_relay()
    assert third == binary and "compiled now" in note3
    assert (binary.stat().st_mode & 0o022) == 0
    # the relay checks its arguments
    p = subprocess.run([str(binary), "a", "b", "-5", "100"], capture_output=True, text=True,
                       check=False)
    assert p.returncode == 2 and "bad delay" in p.stderr


def test_no_compiler_is_reported(cache, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    binary, note = wan.build_c_relay()
    assert binary is None and "no C compiler" in note


def test_relay_choice_is_validated():
    with pytest.raises(ValueError, match="relay must be one of"):
        wan.WanEmulation("20ms/100mbit", relay="rust")


def _running(pid: int) -> bool:
    """Alive and not a zombie (a reparented zombie may wait for a busy init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ours(tag: str) -> list[str]:
    return [ns for ns in wan.list_namespaces() if ns.startswith(tag + "-")]


def _transfer(w: wan.WanEmulation, nbytes: int) -> int:
    """Send nbytes from A to a receiver in B; return what B counted."""
    rx = subprocess.Popen(
        [*w.prefix("b"), sys.executable, "-c",
         ("import socket\n"
         f"s=socket.create_server(('{w.addr_b}',0));print(s.getsockname()[1],flush=True)\n"
         "c,_=s.accept();n=0\n"
         "while True:\n  b=c.recv(1<<20)\n  if not b: break\n  n+=len(b)\n"
         "print(n,flush=True)\n")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        port = int(rx.stdout.readline())
        subprocess.run(
            [*w.prefix("a"), sys.executable, "-c",
             ("import socket\n"
             f"c=socket.create_connection(('{w.addr_b}',{port}),timeout=20)\n"
             f"c.sendall(bytes({nbytes}));c.close()\n")],
            check=True, timeout=60,
        )
        return int(rx.stdout.readline())
    finally:
        if rx.poll() is None:
            rx.kill()
        rx.wait()
        rx.stdout.close()


def _bring_up_move_tear_down(relay: str, tag: str) -> wan.WanEmulation:
    w = wan.WanEmulation("20ms/200mbit", tag=tag, relay=relay)
    with w:
        pid = w.relay.pid
        rtt = w.measure_rtt_ms(n=3)
        assert 19 <= rtt <= 40, rtt
        assert _transfer(w, PAYLOAD) == PAYLOAD
        stats = w.relay_stats()
        assert len(stats) == 2
        ab, ba = stats
        assert ab["bytes"] >= PAYLOAD and ba["frames"] > 0
        assert ab["drops_full"] == 0 and ab["truncated"] == 0
        assert ab["queue_max_bytes"] > 0
        assert w.relay_cpu_seconds() is not None
        assert len(_ours(tag)) == 3
    assert _ours(tag) == []
    assert not _running(pid)
    assert w.relay is None and w.relay_final and w.relay_final[0]["bytes"] >= PAYLOAD
    return w


@NEEDS_ROOT
@pytest.mark.skipif(not _compiler(), reason="no C compiler (gcc/cc) on this machine")
def test_c_relay_profile_up_transfer_down(cache):
    w = _bring_up_move_tear_down("c", f"ftxt-{os.getpid()}-c")
    assert w.relay_kind == "c" and "C relay" in w.relay_note


@NEEDS_ROOT
def test_auto_falls_back_to_python_without_compiler(cache, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    w = _bring_up_move_tear_down("auto", f"ftxt-{os.getpid()}-p")
    assert w.relay_kind == "python"
    assert "fallback" in w.relay_note and "no C compiler" in w.relay_note


@NEEDS_ROOT
def test_c_required_but_missing_fails_cleanly(cache, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    tag = f"ftxt-{os.getpid()}-m"
    with pytest.raises(RuntimeError, match="C delay relay unavailable"):
        wan.WanEmulation("20ms/100mbit", tag=tag, relay="c").up()
    assert _ours(tag) == []


@NEEDS_ROOT
@pytest.mark.skipif(not _compiler(), reason="no C compiler (gcc/cc) on this machine")
def test_c_relay_dies_with_killed_driver(cache):
    """SIGKILL the driver: the relay goes too (PR_SET_PDEATHSIG); cleanup_stale removes
    the namespaces the dead driver left."""
    code = (
        "import sys,time\n"
        "from ftx_bench.wan import WanEmulation\n"
        "w=WanEmulation('20ms/100mbit',relay='c');w.up()\n"
        "print(w.relay.pid,w.tag,flush=True);time.sleep(120)\n"
    )
    drv = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid_s, tag = drv.stdout.readline().split()
        relay_pid = int(pid_s)
        assert _running(relay_pid)
        drv.send_signal(signal.SIGKILL)
        drv.wait(10)
        deadline = time.monotonic() + 10
        while _running(relay_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(relay_pid)
        assert len(_ours(tag)) == 3
        removed = wan.cleanup_stale()
        assert {f"{tag}-{s}" for s in "abr"} <= set(removed)
        assert _ours(tag) == []
    finally:
        if drv.poll() is None:
            drv.kill()
            drv.wait()
        drv.stdout.close()

"""`flwr-transports cleanup` finds leftovers of crashed runs (dead owner pid) and keeps live ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from flwr_transports.cli import main


def _crashed_server(transport: str) -> int:
    """A real process that publishes a payload on the link and is then killed -9."""
    code = textwrap.dedent(f"""
        import sys, numpy as np
        from flwr.app import ArrayRecord
        from flwr_transports.codec import encode
        from flwr_transports.links import server_link
        link = server_link({transport!r}, 5)
        link.publish("r1-train-0", encode(ArrayRecord([np.ones(1000)])))
        link.issue_slot("r1-train-n1-s0", 10**6)
        print(link.prefix, flush=True)
        sys.stdin.read()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    prefix = p.stdout.readline().strip()
    assert prefix.startswith("ftx-")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return prefix


def test_cleanup_file_link_removes_only_dead_runs(tmp_path, capsys):
    url = f"file://{tmp_path}"
    prefix = _crashed_server(url)
    left = [e for e in os.listdir(tmp_path) if e.startswith(prefix)]
    assert left, "the crashed run should have left its payload"
    live = tmp_path / f"ftx-{os.getpid()}-9-abcd-r1-train-0"  # owned by a live pid
    live.write_bytes(b"x")
    other = tmp_path / "unrelated.bin"
    other.write_bytes(b"y")
    assert main(["cleanup", "--dry-run", url]) == 0
    assert "would remove 1 object" in capsys.readouterr().out
    assert main(["cleanup", url]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name])
    assert main(["cleanup", "--all", url]) == 0
    assert os.listdir(tmp_path) == [other.name]


def test_cleanup_shm_link():
    prefix = _crashed_server("shm://")
    assert any(e.startswith(prefix) for e in os.listdir("/dev/shm"))
    assert main(["cleanup", "shm://"]) == 0
    assert not any(e.startswith(prefix) for e in os.listdir("/dev/shm"))


def test_cleanup_bad_url(capsys):
    assert main(["cleanup", "file://relative/dir"]) == 1
    assert "not host 'relative'" in capsys.readouterr().out

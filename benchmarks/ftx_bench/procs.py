"""Child-process helpers shared by the benchmark modules (p2p, e2e, wan).

Kept apart so those modules do not import each other for them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

PR_SET_PDEATHSIG = 1


def stop_proc(proc: subprocess.Popen, timeout: float = 5) -> None:
    """SIGTERM the child's process group, then SIGKILL after ``timeout``; reap it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def set_pdeathsig() -> None:
    """Die with the parent (so a driver killed with SIGKILL leaves no child behind)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass

"""``flwr-transports doctor``: which links can run on this machine, and why not.

Checks are local and quick (nothing is installed, nothing is left behind):

* ``shm``  /dev/shm exists, is writable, and how much room it has;
* ``file`` the temporary directory is writable (a shared directory is up to you);
* ``s3``   boto3 is importable;
* ``tcp``  a payload server can listen on 127.0.0.1 and be reached; TLS available;
* ``rdma`` NVIDIA NIXL is importable, and which UCX transports (cma, tcp; rc/ud/dc
  where an RDMA device exists) really do a one-sided READ here (a probe per
  transport in a child process, about a second);
* ``mpi``  mpi4py is importable and an ``mpiexec`` is on PATH.

Exit status 0; ``--json`` prints a machine-readable report.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import socket
import sys
import sysconfig
import tempfile


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_shm() -> tuple[bool, str]:
    d = "/dev/shm"
    if not os.path.isdir(d):
        return False, "/dev/shm is missing (shm:// needs Linux POSIX shared memory); use file://"
    if not os.access(d, os.W_OK):
        return False, "/dev/shm is not writable by this user"
    free = shutil.disk_usage(d).free
    note = "" if free >= 2**30 else " (small: mount -o remount,size=16G /dev/shm for big models)"
    return True, f"/dev/shm writable, {_gib(free)} free{note}"


def check_file() -> tuple[bool, str]:
    d = tempfile.gettempdir()
    if not os.access(d, os.W_OK):
        return False, f"{d} is not writable"
    return True, (f"local directories work (e.g. {d}, {_gib(shutil.disk_usage(d).free)} free); "
                  "across hosts use a directory every party mounts at the same path")


def _version(mod: str) -> str | None:
    try:
        m = importlib.import_module(mod)
    except ImportError:
        return None
    except Exception as exc:  # noqa: BLE001 - a broken install fails in many ways
        return f"broken ({exc})"
    return str(getattr(m, "__version__", "?"))


def check_s3() -> tuple[bool, str]:
    v = _version("boto3")
    if v is None:
        return False, "boto3 is not installed: pip install 'flwr-transports[s3]'"
    if v.startswith("broken"):
        return False, f"boto3 is {v}"
    return True, f"boto3 {v} importable (endpoint and credentials are checked at run time)"


def check_tcp() -> tuple[bool, str]:
    try:
        import ssl

        tls = f"TLS via {ssl.OPENSSL_VERSION}"
    except ImportError:
        tls = "no ssl module: tls_cert/tls_key unavailable"
    try:
        srv = socket.create_server(("127.0.0.1", 0))
    except OSError as exc:
        return False, f"cannot listen on 127.0.0.1: {exc}"
    try:
        port = srv.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    except OSError as exc:
        return False, f"cannot connect to a local listener: {exc}"
    finally:
        srv.close()
    return True, (f"can listen and connect on loopback; {tls}; clients must reach "
                  "tcp://HOST:PORT (open the port in firewalls)")


def check_rdma() -> tuple[bool, str]:
    from .links.rdma import rdma_status

    ok, why = rdma_status()
    if ok:
        return True, why
    return False, f"{why}; use tcp://"


def _mpiexec() -> str | None:
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        p = os.path.join(d, "mpiexec")
        if os.access(p, os.X_OK):
            return p
    return shutil.which("mpiexec")


def check_mpi() -> tuple[bool, str]:
    v = _version("mpi4py")
    exe = _mpiexec()
    if v is None:
        return False, "mpi4py is not installed: pip install 'flwr-transports[mpi]'"
    if v.startswith("broken"):
        return False, f"mpi4py is {v}"
    if exe is None:
        return False, f"mpi4py {v} importable but no mpiexec on PATH (install an MPI, e.g. mpich)"
    return True, f"mpi4py {v}, mpiexec at {exe}"


#: the built-in links' checks (with install hints); other registered links use their
#: class's ``check_here()``
CHECKS = {
    "shm": check_shm, "file": check_file, "s3": check_s3, "tcp": check_tcp,
    "rdma": check_rdma,
}


def _checks():
    """One check per registered link (the registry is the one list of schemes), then MPI."""
    from .links import link_classes, schemes

    def generic(scheme: str):
        def check() -> tuple[bool, str]:
            return link_classes(scheme)[0].check_here()
        return check

    for scheme in schemes():
        yield scheme, CHECKS.get(scheme) or generic(scheme)
    yield "mpi", check_mpi


def report() -> dict[str, dict[str, object]]:
    out = {}
    for name, fn in _checks():
        try:
            ok, why = fn()
        except Exception as exc:  # noqa: BLE001 - the doctor must not crash on a check
            ok, why = False, f"check failed: {exc!r}"
        out[name] = {"ok": ok, "detail": why}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flwr-transports doctor",
                                 description="Report which links can run on this machine.")
    ap.add_argument("--json", action="store_true", help="print a JSON report")
    args = ap.parse_args(argv)
    rep = report()
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print("flwr-transports doctor: links on this machine\n")
    for name, r in rep.items():
        mark = "yes" if r["ok"] else "no "
        label = "mpi" if name == "mpi" else f"{name}://"  # MPI is a runtime, not a link URL
        print(f"  {label:<8} {mark}  {r['detail']}")
    print("\n  inband   yes  always (Flower's own message path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

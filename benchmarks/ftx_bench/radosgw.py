#!/usr/bin/env python3
"""A one-node Ceph cluster with radosgw on 127.0.0.1: a real S3 server with real auth.

No ``apt install``: the Debian packages are fetched with ``apt-get download`` and
unpacked with ``dpkg -x`` into a cache folder (default ``.cache/radosgw`` in the repo,
gitignored), then one monitor, one memstore OSD and one radosgw run from there, on
free ports, with every file of the cluster under a run folder.

    python -m ftx_bench.radosgw fetch                # download + unpack (once, ~66 MB)
    python -m ftx_bench.radosgw start [--dir D]       # prints JSON: endpoint, keys, pids
    python -m ftx_bench.radosgw stop  [--dir D]       # stops the processes, removes D
    python -m ftx_bench.radosgw env   [--dir D]       # shell exports for a started cluster

``start`` writes ``D/state.json`` (endpoint, access/secret key, pids). ``stop`` kills
exactly those pids (by process group) and removes ``D``. Tests call ``start``/``stop``
through :func:`start` / :func:`stop` (importable).

Cluster-internal auth is off (``auth ... required = none``); S3 requests are still
signed and checked by radosgw (SigV4, presigned URL expiry, secrets).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid


def _default_cache() -> str:
    """FTX_RADOSGW_CACHE, else .cache/radosgw of a source checkout, else the user cache."""
    if os.environ.get("FTX_RADOSGW_CACHE"):
        return os.environ["FTX_RADOSGW_CACHE"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(repo, "pyproject.toml")):
        return os.path.join(repo, ".cache", "radosgw")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flwr-transports", "radosgw")


DEFAULT_CACHE = _default_cache()
PACKAGES = ["radosgw", "ceph-mon", "ceph-osd"]
EXTRA_PACKAGES = ["libfuse2"]
ACCESS_KEY = "FTXTESTACCESSKEY0001"
SECRET_KEY = "ftx-test-secret-key-0123456789abcdefghij"
USER = "ftx"


class RadosgwError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _root(cache: str) -> str:
    return os.path.join(cache, "root")


def fetch(cache: str = DEFAULT_CACHE, *, quiet: bool = False) -> str:
    """Download and unpack the Ceph packages into ``cache``; return the unpacked root."""
    root = _root(cache)
    if os.path.exists(os.path.join(root, "usr", "bin", "radosgw")):
        return root
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise RadosgwError("apt-get/dpkg not found: radosgw needs a Debian/Ubuntu host")
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    out = None if not quiet else subprocess.DEVNULL

    def sim() -> list[str]:
        r = subprocess.run(
            ["apt-get", "install", "-s", "--no-install-recommends", *PACKAGES],
            capture_output=True, text=True, check=False,
        )
        if r.returncode != 0:
            raise RadosgwError(f"apt-get install -s failed: {r.stderr.strip()[-500:]}")
        return [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("Inst ")]

    try:
        names = sim()
    except RadosgwError:
        subprocess.run(["apt-get", "update", "-qq"], stdout=out, stderr=out, check=False)
        names = sim()
    if not names:
        raise RadosgwError("apt-get install -s radosgw found nothing to download "
                           "(are the Ceph packages already installed system-wide?)")
    names += EXTRA_PACKAGES
    r = subprocess.run(["apt-get", "download", *names], cwd=debs, stdout=out, stderr=out,
                           check=False)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], stdout=out, stderr=out, check=False)
        r = subprocess.run(["apt-get", "download", *names], cwd=debs, stdout=out, stderr=out,
                           check=False)
        if r.returncode != 0:
            raise RadosgwError("apt-get download of the Ceph packages failed (no network or "
                               "no Debian mirror?)")
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for f in sorted(os.listdir(debs)):
        if f.endswith(".deb"):
            subprocess.run(["dpkg", "-x", os.path.join(debs, f), tmp], check=True)
    os.rename(tmp, root)
    shutil.rmtree(debs, ignore_errors=True)
    return root


def _env(root: str) -> dict[str, str]:
    env = dict(os.environ)
    libs = [f"{root}/usr/lib/x86_64-linux-gnu", f"{root}/usr/lib/x86_64-linux-gnu/ceph",
            f"{root}/lib/x86_64-linux-gnu", f"{root}/usr/lib"]
    env["LD_LIBRARY_PATH"] = ":".join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PYTHONPATH"] = f"{root}/usr/lib/python3/dist-packages"
    env.pop("PYTHONHOME", None)
    return env


def _conf(d: str, root: str, mon_port: int, rgw_port: int, fsid: str, mem_bytes: int,
          host: str = "127.0.0.1") -> str:
    lib = f"{root}/usr/lib/x86_64-linux-gnu"
    return f"""[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{mon_port}
mon initial members = a
ms bind msgr2 = false
ms bind ipv6 = false
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
# the OSD's own start-up commands to the monitor (crush placement, device class) fail
# now and then with 'wrong fsid' (sent before its monitor client has the map) and the
# OSD then exits: place it in the CRUSH map from the admin side instead
osd crush update on start = false
osd class update on start = false
osd objectstore = memstore
memstore device bytes = {mem_bytes}
osd max object size = 1073741824
plugin dir = {lib}/ceph
erasure code dir = {lib}/ceph/erasure-code
osd class dir = {lib}/rados-classes
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
keyring = {d}/keyring
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
crash dir = {d}/crash
exec dir = {d}/run

[client.rgw.ftx]
rgw frontends = beast endpoint={host}:{rgw_port}
rgw data = {d}/rgw
rgw dns name = localhost
rgw thread pool size = 64
# deleted objects' data (multipart parts) is reclaimed by radosgw's garbage collector,
# by default 2 hours later: with a memstore OSD capped at a few GiB, benchmarks that
# move GBs would fill the OSD and radosgw then blocks every write. Reclaim at once.
rgw gc obj min wait = 0
rgw gc processor period = 5
rgw gc processor max time = 5
"""


def _run(cmd: list[str], env: dict, d: str, what: str, timeout: float = 60) -> str:
    r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout, cwd=d)
    if r.returncode != 0:
        raise RadosgwError(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
    return r.stdout


def _spawn(cmd: list[str], env: dict, d: str, name: str) -> int:
    with open(os.path.join(d, "log", f"{name}.out"), "ab") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=d,
                             start_new_session=True)
    return p.pid


def _save(d: str, state: dict) -> None:
    with open(os.path.join(d, "state.json.tmp"), "w") as f:
        json.dump(state, f, indent=1)
    os.replace(os.path.join(d, "state.json.tmp"), os.path.join(d, "state.json"))


def start(d: str | None = None, *, cache: str = DEFAULT_CACHE, mem_bytes: int = 3 << 30,
          timeout: float = 120, host: str = "127.0.0.1") -> dict:
    """Start mon + memstore osd + radosgw; return the state (endpoint, keys, pids, dir).

    ``host``: the address radosgw's S3 endpoint listens on (default 127.0.0.1; the
    benchmark's WAN emulation gives the store namespace's address). The monitor and the
    OSD stay on 127.0.0.1 of the namespace the cluster is started in."""
    root = fetch(cache, quiet=True)
    d = d or tempfile.mkdtemp(prefix="ftx-radosgw-")
    d = os.path.abspath(d)
    for sub in ("run", "log", "mon", "osd/ceph-0", "rgw", "crash"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    env = _env(root)
    bin_ = f"{root}/usr/bin"
    mon_port, rgw_port = _free_port(), _free_port()
    fsid = str(uuid.uuid4())
    conf = os.path.join(d, "ceph.conf")
    with open(conf, "w") as f:
        f.write(_conf(d, root, mon_port, rgw_port, fsid, mem_bytes, host))
    state = {"dir": d, "endpoint": f"http://{host}:{rgw_port}", "access_key": ACCESS_KEY,
             "secret_key": SECRET_KEY, "region": "us-east-1", "pids": {}, "conf": conf,
             "root": root}
    _save(d, state)
    c = ["-c", conf]
    ceph = ["/usr/bin/python3", f"{bin_}/ceph", *c, "--connect-timeout", "20"]
    try:
        kr = os.path.join(d, "keyring")
        _run([f"{bin_}/ceph-authtool", "--create-keyring", kr, "--gen-key", "-n", "mon.",
              "--cap", "mon", "allow *"], env, d, "ceph-authtool")
        monmap = os.path.join(d, "monmap")
        _run([f"{bin_}/monmaptool", "--create", "--add", "a", f"v1:127.0.0.1:{mon_port}",
              "--fsid", fsid, monmap], env, d, "monmaptool")
        _run([f"{bin_}/ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", kr],
             env, d, "ceph-mon --mkfs")
        state["pids"]["mon"] = _spawn([f"{bin_}/ceph-mon", *c, "-i", "a", "-f"], env, d, "mon")
        _save(d, state)
        osd_id = _run([*ceph, "osd", "create"], env, d, "ceph osd create").strip()
        if osd_id != "0":
            raise RadosgwError(f"unexpected osd id {osd_id!r}")
        _run([*ceph, "osd", "crush", "add", "osd.0", "1.0", "root=default"], env, d,
             "ceph osd crush add")
        _run([f"{bin_}/ceph-osd", *c, "-i", "0", "--mkfs"], env, d, "ceph-osd --mkfs")
        state["pids"]["osd"] = _spawn([f"{bin_}/ceph-osd", *c, "-i", "0", "-f"], env, d, "osd")
        _save(d, state)
        state["pids"]["rgw"] = _spawn([f"{bin_}/radosgw", *c, "-n", "client.rgw.ftx", "-f"],
                                      env, d, "rgw")
        _save(d, state)
        deadline = time.monotonic() + timeout
        while True:
            for name, pid in state["pids"].items():
                if not _alive(pid):
                    raise RadosgwError(f"{name} exited during start-up")
            try:
                urllib.request.urlopen(state["endpoint"], timeout=2).read()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RadosgwError(f"radosgw did not answer within {timeout:.0f}s; see {d}/log/")
            time.sleep(0.5)
        _run([f"{bin_}/radosgw-admin", *c, "user", "create", f"--uid={USER}",
              "--display-name=flwr-transports tests", f"--access-key={ACCESS_KEY}",
              f"--secret={SECRET_KEY}"], env, d, "radosgw-admin user create", timeout=120)
    except RadosgwError as exc:
        tails = _log_tails(d)
        stop(d)
        raise RadosgwError(f"{exc}\n{tails}") from None
    except BaseException:
        stop(d)
        raise
    return state


def create_bucket(s3, bucket: str, *, timeout: float = 90) -> None:
    """Create ``bucket`` with a boto3 ``s3`` client of a freshly started cluster.

    radosgw learns about the user made by radosgw-admin a little later (its user cache
    is refreshed by notification; seconds under load): ``InvalidAccessKeyId`` is
    retried until ``timeout``. A put/delete afterwards makes radosgw create its pools,
    so the first measured or tested request does not pay for that.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            s3.create_bucket(Bucket=bucket)
            break
        except s3.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code != "InvalidAccessKeyId" or time.monotonic() > deadline:
                raise
            time.sleep(1)
    s3.put_object(Bucket=bucket, Key="warm-up", Body=b"x" * 1024)
    s3.delete_object(Bucket=bucket, Key="warm-up")
    # a multipart upload makes radosgw create one more pool (1-2 s): pay it here too
    up = s3.create_multipart_upload(Bucket=bucket, Key="warm-up")
    part = s3.upload_part(Bucket=bucket, Key="warm-up", UploadId=up["UploadId"], PartNumber=1,
                          Body=b"x" * 1024)
    s3.complete_multipart_upload(Bucket=bucket, Key="warm-up", UploadId=up["UploadId"],
                                 MultipartUpload={"Parts": [{"PartNumber": 1,
                                                             "ETag": part["ETag"]}]})
    s3.delete_object(Bucket=bucket, Key="warm-up")


def _log_tails(d: str, n: int = 1500) -> str:
    """The last bytes of each daemon log (the folder is removed on failure)."""
    out = []
    logdir = os.path.join(d, "log")
    try:
        names = sorted(os.listdir(logdir))
    except OSError:
        return ""
    for name in names:
        try:
            with open(os.path.join(logdir, name), "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                out.append(f"--- {name} ---\n" + f.read().decode("utf-8", "replace"))
        except OSError:
            pass
    return "\n".join(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def stop(d: str, *, keep: bool = False) -> None:
    """Stop the processes recorded in ``d/state.json`` and remove ``d``."""
    try:
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {"pids": {}}
    pids = list(state.get("pids", {}).values())
    for pid in reversed(pids):  # rgw, osd, mon
        try:
            os.killpg(pid, signal.SIGTERM)  # each was started in its own session
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 10
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    if not keep and os.path.basename(d.rstrip("/")).startswith("ftx-radosgw-"):
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["fetch", "start", "stop", "env"])
    ap.add_argument("--dir", help="run folder (start: default a new temp dir)")
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--mem", default=str(3 << 30), help="memstore bytes (default 3 GiB)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address the S3 endpoint listens on (default 127.0.0.1)")
    a = ap.parse_args(argv)
    try:
        if a.command == "fetch":
            print(fetch(a.cache))
        elif a.command == "start":
            print(json.dumps(start(a.dir, cache=a.cache, mem_bytes=int(a.mem), host=a.host),
                             indent=1), flush=True)
        elif a.command == "stop":
            if not a.dir:
                ap.error("stop needs --dir")
            stop(a.dir)
        elif a.command == "env":
            if not a.dir:
                ap.error("env needs --dir")
            with open(os.path.join(a.dir, "state.json")) as f:
                s = json.load(f)
            print(f"export AWS_ACCESS_KEY_ID={s['access_key']}\n"
                  f"export AWS_SECRET_ACCESS_KEY={s['secret_key']}\n"
                  f"export AWS_DEFAULT_REGION={s['region']}\n"
                  f"export FTX_S3_ENDPOINT={s['endpoint']}")
    except RadosgwError as exc:
        print(f"radosgw: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

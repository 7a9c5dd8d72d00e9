"""A real local Flower deployment on 127.0.0.1, for tests, benchmarks and the demo.

``LocalDeployment`` starts one ``flower-superlink`` and N ``flower-supernode``
processes on free loopback ports, with a private ``FLWR_HOME`` whose
``config.toml`` names the SuperLink connection ``local``. ``run()`` submits a Flower
app with ``flwr run APP local --stream`` and samples the memory of the SuperLink
(and, separately, of the processes it spawns, e.g. ``flwr-serverapp``) while the
run is in flight.

Every process is started in its own session; on exit the whole tree (including the
detached ``flower-superexec`` / ``flwr-serverapp`` / ``flwr-clientapp`` children
Flower spawns) gets SIGTERM, then SIGKILL. Logs stay in the work directory.

Example::

    with LocalDeployment(n_supernodes=2) as dep:
        res = dep.run("examples/quickstart-offload", {"transport": "shm://"})
        print(res.wall_s, res.superlink_peak_rss)
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

__all__ = ["DeploymentError", "LocalDeployment", "RunResult", "free_port"]

_HOST = "127.0.0.1"
_CONNECTION = "local"
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")


class DeploymentError(RuntimeError):
    """A deployment process failed to start, or a run could not be submitted."""


def _psutil():
    try:
        import psutil
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "LocalDeployment needs psutil: pip install 'flwr-transports[testing]' (or pip install psutil)"
        ) from err
    return psutil


def free_port(host: str = _HOST) -> int:
    """Return a TCP port that was free on ``host`` a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, n_bytes: int = 4000) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - n_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError as err:
        return f"<cannot read {path}: {err}>"


def _toml_value(value: Any) -> str:
    """One TOML value (bool, int, finite float or str), safely quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"run-config floats must be finite, got {value!r}")
        return repr(value)
    if isinstance(value, str):
        # TOML basic string: json escaping is a valid subset for these characters.
        return json.dumps(value, ensure_ascii=True)
    raise TypeError(f"run-config values must be bool/int/float/str, got {type(value).__name__}")


def run_config_toml(run_config: dict[str, Any]) -> str:
    """Render a flat run-config override dict as a TOML document."""
    lines = []
    for key, value in run_config.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"invalid run-config key {key!r} (letters, digits, '-', '_')")
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _kind(proc) -> str:
    """A readable name for a Flower process: the script name, not 'python3'."""
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001 - process gone or inaccessible
        return "?"
    if not cmd:
        return "?"
    first = os.path.basename(cmd[0])
    if first.startswith("python") and len(cmd) > 1:
        return os.path.basename(cmd[1]) if not cmd[1].startswith("-") else first
    return first


@dataclass
class RunResult:
    """What one ``flwr run`` did."""

    returncode: int | None
    wall_s: float
    output: str
    run_id: int | None = None
    status: str | None = None
    timed_out: bool = False
    superlink_rss_before: int = 0
    superlink_peak_rss: int = 0
    children_peak_rss: dict[str, int] = field(default_factory=dict)
    supernodes_peak_rss: dict[str, int] = field(default_factory=dict)
    #: pid -> (kind, create_time) of every SuperLink/SuperNode descendant seen during
    #: the run (e.g. the run's ``flwr-serverapp``), for leak checks
    processes: dict[int, tuple[str, float]] = field(default_factory=dict)
    log_path: str = ""

    def pids_of(self, kind: str) -> list[int]:
        """PIDs seen during the run whose program is ``kind`` (e.g. 'flwr-serverapp')."""
        return sorted(pid for pid, (k, _) in self.processes.items() if k == kind)

    @property
    def ok(self) -> bool:
        """The CLI exited 0 and (when it could be read) the run finished successfully."""
        if self.timed_out or self.returncode != 0:
            return False
        return self.status is None or "completed" in self.status


class _Sampler(threading.Thread):
    """Peak RSS of the SuperLink, its descendants and the SuperNode trees."""

    def __init__(self, superlink_pid: int, supernode_pids: list[int], interval: float):
        super().__init__(name="ftx-rss-sampler", daemon=True)
        self._psutil = _psutil()
        self._interval = interval
        self._halt = threading.Event()
        self._sl = self._psutil.Process(superlink_pid)
        self._sn = [self._psutil.Process(p) for p in supernode_pids]
        self.superlink_peak = 0
        self.children_peak: dict[str, int] = {}
        self.supernodes_peak: dict[str, int] = {}
        self._procs: dict[int, tuple[Any, str, str]] = {}  # pid -> (proc, group, kind)
        self.seen: dict[int, tuple[str, float]] = {}  # pid -> (kind, create_time)
        self._last_scan = 0.0

    def _scan(self) -> None:
        ps = self._psutil
        procs: dict[int, tuple[Any, str, str]] = {}
        for group, roots in (("superlink", [self._sl]), ("supernode", self._sn)):
            for root in roots:
                try:
                    if group == "supernode":
                        procs[root.pid] = (root, group, "flower-supernode")
                    children = root.children(recursive=True)
                except ps.Error:
                    continue
                for child in children:
                    old = self._procs.get(child.pid)
                    if old is not None:
                        procs[child.pid] = old
                        continue
                    kind = _kind(child)
                    if kind == "?":  # gone already (or unreadable): skip
                        continue
                    procs[child.pid] = (child, group, kind)
                    try:
                        self.seen[child.pid] = (kind, child.create_time())
                    except ps.Error:
                        pass
        self._procs = procs

    def sample(self) -> None:
        ps = self._psutil
        now = time.monotonic()
        if now - self._last_scan > 0.5:
            self._scan()
            self._last_scan = now
        try:
            self.superlink_peak = max(self.superlink_peak, self._sl.memory_info().rss)
        except ps.Error:
            pass
        for proc, group, kind in list(self._procs.values()):
            try:
                rss = proc.memory_info().rss
            except ps.Error:
                continue
            target = self.children_peak if group == "superlink" else self.supernodes_peak
            target[kind] = max(target.get(kind, 0), rss)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self._interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.sample()


class LocalDeployment:
    """SuperLink + N SuperNodes on 127.0.0.1 with free ports (a context manager).

    Parameters
    ----------
    n_supernodes:
        Number of SuperNodes; node ``i`` gets ``--node-config
        "partition-id=i num-partitions=N"``.
    workdir:
        Where logs, ``FLWR_HOME`` and run-config files go. Kept on exit when given;
        a temporary one is created (and removed on a clean exit) otherwise.
    env:
        Extra environment variables for every process (SuperLink, SuperNodes, flwr).
    startup_timeout:
        Seconds to wait for the SuperLink and all SuperNodes to be up.
    sample_interval:
        Seconds between RSS samples while a run is in flight.
    """

    def __init__(
        self,
        n_supernodes: int = 2,
        workdir: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 90.0,
        sample_interval: float = 0.05,
    ) -> None:
        if not isinstance(n_supernodes, int) or not 1 <= n_supernodes <= 64:
            raise ValueError(f"n_supernodes must be an int in [1, 64], got {n_supernodes!r}")
        self.n_supernodes = n_supernodes
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ftx-deploy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.sample_interval = sample_interval
        self.superlink_port: int | None = None
        self.supernode_ports: list[int] = []
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self._all_popen: list[subprocess.Popen] = []
        self._seen: dict[int, float] = {}  # pid -> create_time of every descendant seen
        self._runs = 0
        self._failed = False
        self._started = False
        self._lock = threading.Lock()
        bindir = Path(sys.executable).parent
        self._bindir = bindir

    # ------------------------------------------------------------------ helpers
    def _exe(self, name: str) -> str:
        cand = self._bindir / name
        if cand.exists():
            return str(cand)
        found = shutil.which(name)
        if not found:
            raise DeploymentError(f"'{name}' not found next to {sys.executable} or on PATH")
        return found

    @property
    def env(self) -> dict[str, str]:
        env = os.environ.copy()
        env["PATH"] = f"{self._bindir}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_HOME"] = str(self.flwr_home)
        env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.extra_env)
        return env

    def _spawn(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        log_path = self.workdir / log_name
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,
            )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self._all_popen.append(proc)
        return proc

    def _remember_descendants(self) -> None:
        """Record every descendant (Flower detaches them into their own sessions)."""
        ps = _psutil()
        roots: dict[int, float | None] = {p.pid: None for p in self._all_popen}
        roots.update(self._seen)
        for pid, ctime in roots.items():
            try:
                root = ps.Process(pid)
                if ctime is not None and abs(root.create_time() - ctime) > 0.01:
                    continue
                for child in root.children(recursive=True):
                    self._seen.setdefault(child.pid, child.create_time())
            except ps.Error:
                continue

    @staticmethod
    def _http_ok(port: int, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"http://{_HOST}:{port}/health", timeout=timeout) as r:
                return 200 <= r.status < 300
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _fail(self, what: str) -> DeploymentError:
        self._failed = True
        parts = [f"{what} (logs in {self.workdir})"]
        for popen in self._all_popen:
            log_path = getattr(popen, "log_path", None)
            if log_path is None:
                continue
            state = "running" if popen.poll() is None else f"exited {popen.returncode}"
            parts.append(f"--- {log_path.name} ({state}) ---\n{_tail(log_path, 2500)}")
        return DeploymentError("\n".join(parts))

    def _write_cli_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{_CONNECTION}"\n\n'
            f"[superlink.{_CONNECTION}]\n"
            f'address = "{_HOST}:{self.superlink_port}"\n'
            "insecure = true\n",
            encoding="utf-8",
        )

    def _wait(self, cond, what: str, procs: list[subprocess.Popen]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise self._fail(f"{what}: a process exited with code {p.returncode}")
            if cond():
                return
            time.sleep(0.25)
        raise self._fail(f"{what}: not ready after {self.startup_timeout:.0f} s")

    def online_nodes(self) -> int:
        """Number of SuperNodes the SuperLink reports online (via `flwr supernode ls`)."""
        out = subprocess.run(
            [self._exe("flwr"), "supernode", "ls", _CONNECTION, "--format", "json"],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.workdir,
            timeout=60,
            check=False,
        )
        try:
            data = json.loads(out.stdout)
        except json.JSONDecodeError:
            return 0
        return sum(1 for n in data.get("nodes", []) if n.get("status") == "online")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LocalDeployment:
        if self._started:
            return self
        self._started = True
        atexit.register(self.stop)
        try:
            self._start_superlink()
            self._start_supernodes()
        except BaseException:
            self._failed = True
            self.stop()
            raise
        return self

    def _start_superlink(self) -> None:
        for attempt in range(3):
            self.superlink_port = free_port()
            self._write_cli_config()
            cmd = [
                self._exe("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                _HOST,
                "--port",
                str(self.superlink_port),
            ]
            self.superlink = self._spawn(cmd, "superlink.log")
            try:
                self._wait(
                    lambda: self._http_ok(self.superlink_port), "SuperLink", [self.superlink]
                )
                return
            except DeploymentError:
                log = _tail(self.superlink.log_path)  # type: ignore[attr-defined]
                if attempt < 2 and "address already in use" in log.lower():
                    self._all_popen.remove(self.superlink)
                    continue
                raise

    def _start_supernodes(self) -> None:
        n = self.n_supernodes
        for i in range(n):
            port = free_port()
            self.supernode_ports.append(port)
            cmd = [
                self._exe("flower-supernode"),
                "--insecure",
                "--superlink",
                f"{_HOST}:{self.superlink_port}",
                "--host",
                _HOST,
                "--port",
                str(port),
                "--node-config",
                f"partition-id={i} num-partitions={n}",
            ]
            self.supernodes.append(self._spawn(cmd, f"supernode-{i}.log"))
        procs = [self.superlink, *self.supernodes]
        for i, port in enumerate(self.supernode_ports):
            self._wait(lambda p=port: self._http_ok(p), f"SuperNode {i}", procs)
        self._wait(lambda: self.online_nodes() >= n, f"{n} SuperNodes online", procs)
        self._remember_descendants()

    def _live_procs(self) -> list[Any]:
        """psutil handles of our processes that are still running (zombies excluded)."""
        ps = _psutil()
        self._remember_descendants()
        cands: dict[int, float | None] = {p.pid: None for p in self._all_popen}
        cands.update(self._seen)
        out = []
        for pid, ctime in cands.items():
            try:
                proc = ps.Process(pid)
                if ctime is not None and abs(proc.create_time() - ctime) > 0.01:
                    continue  # PID reused by an unrelated process
                if proc.status() == ps.STATUS_ZOMBIE:
                    continue
                out.append(proc)
            except ps.Error:
                continue
        return out

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process of the deployment: SIGTERM, then SIGKILL after ``grace``."""
        with self._lock:
            if not self._all_popen:
                return
            ps = _psutil()
            targets = self._live_procs()
            for proc in targets:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ps.Error:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                for popen in self._all_popen:
                    popen.poll()  # reap our direct children
                if not self._live_procs():
                    break
                time.sleep(0.1)
            for proc in self._live_procs():
                try:
                    proc.kill()
                except ps.Error:
                    pass
            for popen in self._all_popen:
                try:
                    popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            leftover = self._live_procs()
            self._all_popen.clear()
            self._seen.clear()
        if leftover:
            self._failed = True
            raise DeploymentError(
                f"processes still alive after SIGKILL: {[p.pid for p in leftover]}"
            )
        if self._own_workdir and not self._failed:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def pids(self) -> list[int]:
        """PIDs of every live process of this deployment (for leak checks)."""
        return sorted(p.pid for p in self._live_procs())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._failed = True
        self.stop()

    # ------------------------------------------------------------------ runs
    def run(
        self,
        app_dir: str | os.PathLike[str],
        run_config: dict[str, Any] | None = None,
        timeout: float = 600.0,
    ) -> RunResult:
        """Run ``flwr run APP local --stream`` and wait for it to end.

        ``run_config`` overrides keys of the app's ``[tool.flwr.app.config]``
        (values: bool, int, float, str). Returns wall time, exit code, output, the
        run's final status and the peak RSS figures sampled while it ran.
        """
        if self.superlink is None or self.superlink.poll() is not None:
            raise self._fail("the SuperLink is not running")
        app = Path(app_dir).resolve()
        if not (app / "pyproject.toml").is_file():
            raise ValueError(f"{app} is not a Flower app (no pyproject.toml)")
        self._runs += 1
        k = self._runs
        cmd = [self._exe("flwr"), "run", str(app), _CONNECTION, "--stream"]
        if run_config:
            cfg_path = self.workdir / f"run-{k}-config.toml"
            cfg_path.write_text(run_config_toml(run_config), encoding="utf-8")
            cmd += ["--run-config", str(cfg_path)]
        log_path = self.workdir / f"run-{k}.log"

        ps = _psutil()
        rss_before = ps.Process(self.superlink.pid).memory_info().rss
        sampler = _Sampler(
            self.superlink.pid, [p.pid for p in self.supernodes], self.sample_interval
        )
        sampler.start()
        timed_out = False
        t0 = time.perf_counter()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop()
        self._remember_descendants()
        for pid, (_, ctime) in sampler.seen.items():
            self._seen.setdefault(pid, ctime)
        output = log_path.read_text("utf-8", "replace")
        match = _RUN_ID_RE.search(output)
        run_id = int(match.group(1)) if match else None
        status = None
        if run_id is not None:
            if timed_out:
                self._flwr_stop(run_id)
            status = self.run_status(run_id)
        return RunResult(
            returncode=rc,
            wall_s=wall,
            output=output,
            run_id=run_id,
            status=status,
            timed_out=timed_out,
            superlink_rss_before=rss_before,
            superlink_peak_rss=sampler.superlink_peak,
            children_peak_rss=dict(sampler.children_peak),
            supernodes_peak_rss=dict(sampler.supernodes_peak),
            processes=dict(sampler.seen),
            log_path=str(log_path),
        )

    def _flwr_stop(self, run_id: int) -> None:
        subprocess.run(
            [self._exe("flwr"), "stop", str(run_id), _CONNECTION],
            capture_output=True,
            env=self.env,
            cwd=self.workdir,
            timeout=60,
            check=False,
        )

    def run_status(self, run_id: int, wait: float = 30.0) -> str | None:
        """The run's status as `flwr ls` reports it (e.g. 'finished:completed')."""
        deadline = time.monotonic() + wait
        status = None
        while True:
            out = subprocess.run(
                [self._exe("flwr"), "ls", _CONNECTION, "--run-id", str(run_id), "--format", "json"],
                capture_output=True,
                text=True,
                env=self.env,
                cwd=self.workdir,
                timeout=60,
                check=False,
            )
            try:
                runs = json.loads(out.stdout).get("runs", [])
                status = str(runs[0].get("status")) if runs else None
            except (json.JSONDecodeError, AttributeError, IndexError):
                status = None
            if status is None or status.startswith("finished") or time.monotonic() > deadline:
                return status
            time.sleep(0.5)

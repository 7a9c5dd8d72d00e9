"""``flwr-transports demo``: one machine, a real Flower deployment, every local link.

Starts a SuperLink and 2 SuperNodes on 127.0.0.1 (free ports), runs the example app
(examples/quickstart-offload) for a few rounds in-band and over shm://, file:// and,
when the s3 extra and moto are installed, s3:// against an embedded S3 server; then
prints round time, bytes through Flower, bytes through the link, SuperLink peak RSS,
and whether every transport produced the same final model (to float rounding: the
offloaded runs aggregate while uploads land, see docs/aggregation.md). Cleans up after
itself (processes, payloads, the temporary S3 bucket).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def find_example_app() -> Path:
    from .settings import raw

    env = raw("FLWR_TRANSPORTS_DEMO_APP")
    cands = [Path(env)] if env else []
    here = Path(__file__).resolve()
    cands += [here.parent.parent / "examples" / "quickstart-offload",
              Path.cwd() / "examples" / "quickstart-offload"]
    for c in cands:
        if (c / "pyproject.toml").is_file():
            return c
    raise SystemExit(
        "flwr-transports demo: cannot find examples/quickstart-offload; run it from a "
        "source checkout or set FLWR_TRANSPORTS_DEMO_APP=/path/to/quickstart-offload"
    )


def _mib(n: float) -> str:
    if n < 2**20:
        return f"{n / 1024:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB"


class _Ticker:
    """One progress line with elapsed seconds while a step runs."""

    def __init__(self, label: str):
        self.label = label
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._tty = sys.stdout.isatty()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            if self._tty:
                print(f"\r  {self.label} ... {time.perf_counter() - self.t0:5.1f}s",
                      end="", flush=True)

    def __enter__(self) -> _Ticker:
        if not self._tty:
            print(f"  {self.label} ...", flush=True)
        self._th.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join()
        end = "\r" if self._tty else ""
        print(f"{end}  {self.label} ... done in {time.perf_counter() - self.t0:.1f}s ",
              flush=True)


def _start_moto():
    """An embedded S3 server (moto) on a free port; returns (server, url, env) or None."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("boto3") is None:
        return None
    if importlib.util.find_spec("flwr_transports.links.s3") is None:
        return None
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
           "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="demo",
                 aws_secret_access_key="demo", region_name="us-east-1").create_bucket(
        Bucket="flwr-transports-demo")
    return server, f"s3://flwr-transports-demo/demo?endpoint_url={endpoint}", env


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="flwr-transports demo", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model-mib", type=float, default=256.0,
                   help="model size in MiB (default 256: large enough for the payload "
                        "to matter next to Flower's ~10 s polling floor per round)")
    p.add_argument("--transports", default="shm,file,s3,inband",
                   help="comma list of: inband and registered link schemes, e.g. shm, file, s3 "
                        "(moto), tcp (default: shm,file,s3,inband). "
                        "In-band runs last: one SuperLink serves all runs and its memory "
                        "does not shrink after an in-band run")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    a = p.parse_args(argv)

    from .testing.deploy import LocalDeployment

    app = find_example_app()
    work = Path(tempfile.mkdtemp(prefix="ftx-demo-"))
    payload_dir = work / "payloads"
    payload_dir.mkdir()
    wanted = [t.strip() for t in a.transports.split(",") if t.strip()]
    moto = None
    env: dict[str, str] = {}
    transports: list[tuple[str, str]] = []
    for t in wanted:
        if t == "inband":
            transports.append(("inband", "inband"))
        elif t == "shm":
            transports.append(("shm://", "shm://"))
        elif t == "file":
            transports.append(("file://", f"file://{payload_dir}"))
        elif t == "s3":
            moto = _start_moto()
            if moto is None:
                print("  (s3:// skipped: pip install 'flwr-transports[s3]' moto[server])")
                continue
            env.update(moto[2])
            transports.append(("s3:// (moto)", moto[1]))
        else:  # any other registered link that runs on this machine alone
            from .links import LinkError, link_classes, schemes

            local = None
            if t in schemes():
                try:
                    local = link_classes(t)[0].local_url(str(payload_dir))
                except LinkError as exc:
                    print(f"  ({t}:// skipped: {exc})")
                    continue
            if local is None:
                print(f"unknown transport {t!r} (known: inband, "
                      f"{', '.join(schemes())})", file=sys.stderr)
                return 2
            transports.append((f"{t}://", local))
    print(f"flwr-transports demo: {a.rounds} rounds, {a.model_mib:g} MiB model, "
          f"2 SuperNodes on 127.0.0.1; work dir {work}")
    rows = []
    models = {}
    try:
        with _Ticker("starting SuperLink + 2 SuperNodes"):
            dep = LocalDeployment(n_supernodes=2, workdir=work / "deploy", env=env).start()
        with dep:
            for label, url in transports:
                result_path = work / f"result-{len(rows)}.npz"
                with _Ticker(f"flwr run ({label})"):
                    r = dep.run(app, {"transport": url, "num-server-rounds": a.rounds,
                                      "model-mib": float(a.model_mib),
                                      "result-path": str(result_path)}, timeout=900)
                if not r.ok or not result_path.exists():
                    print(f"  run with {label} failed (exit {r.returncode}, status "
                          f"{r.status}); log: {r.log_path}")
                    print("\n".join(r.output.splitlines()[-15:]))
                    rows.append((label, None, None, None, r.superlink_peak_rss))
                    continue
                summary = json.loads(result_path.with_suffix(".json").read_text())
                with np.load(result_path) as z:
                    models[label] = {k: z[k] for k in z.files}
                st = summary.get("stats", {})
                rows.append((label, summary["round_s_mean"],
                             st.get("inband_bytes_sent", 0) + st.get("inband_bytes_received", 0),
                             st.get("link_bytes_sent", 0) + st.get("link_bytes_received", 0),
                             r.superlink_peak_rss))
    finally:
        if moto is not None:
            moto[0].stop()
        leftovers = [e for e in os.listdir(payload_dir) if e.lstrip(".").startswith("ftx-")]
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    base = next(iter(models.values()), None)

    def same(label: str) -> str:
        m = models.get(label)
        if m is None or base is None:
            return "-"
        # offloaded runs aggregate while uploads land (aggregation=auto): the same mean,
        # summed in another order, so equal to in-band up to float rounding
        ok = m.keys() == base.keys() and all(
            m[k].dtype == base[k].dtype and m[k].shape == base[k].shape and (
                np.array_equal(m[k], base[k]) or np.max(np.abs(m[k] - base[k]))
                <= 1e-6 * max(float(np.max(np.abs(base[k]))), 1e-30)) for k in m)
        return "yes" if ok else "NO"

    head = ("transport", "round time", "via Flower", "via link", "SuperLink peak RSS",
            "same model (to 1e-6)")
    table = [head]
    for label, rt, fb, lb, rss in rows:
        table.append((label, f"{rt:.2f} s" if rt is not None else "failed",
                      _mib(fb) if fb is not None else "-", _mib(lb) if lb is not None else "-",
                      _mib(rss), same(label)))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print()
    for i, r in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\nRound time includes Flower's own polling floor (~10 s a train+evaluate round "
          "here); see docs/benchmarks.md for the payload overhead above it.")
    if any(label.startswith("s3://") for label, *_ in rows):
        print("s3:// runs against moto, a single-process test server (~100 MB/s), not a "
              "real object store: it shows the path works, not how fast S3 is.")
    if leftovers:
        print(f"WARNING: payload files left behind: {leftovers}")
        return 1
    failed = any(r[1] is None for r in rows) or any(same(r[0]) == "NO" for r in rows)
    return 1 if failed else 0

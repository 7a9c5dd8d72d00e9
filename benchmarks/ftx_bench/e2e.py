"""End-to-end benchmark: a REAL Flower deployment per transport and model size.

For every transport and model size it runs the ``quickstart-offload`` example app
(FedAvg wrapped by ``offload``) with ``flwr run`` on a :class:`~.deploy.LocalDeployment`
(one ``flower-superlink``, N ``flower-supernode``), and collects:

* the ServerApp's per-round times (train + evaluate round trips; from the app's
  result JSON), and the ``flwr run`` wall time;
* the control-plane **floor**: the same transport with a tiny model, so
  ``overhead = round - floor`` is what the payload costs above Flower's polling;
* bytes through Flower vs through the link (the wrapper's ``stats``);
* SuperLink and ServerApp peak RSS (sampled by the deployment harness).

With ``--wan`` the SuperLink, the ServerApp and the link servers (tcp payload server,
moto S3) run in namespace A and the SuperNodes (and their ClientApps) in namespace B:
this module re-runs itself inside A (``ip netns exec``) and starts the SuperNodes
through ``ip netns exec B``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr_transports import trace

MiB = 1024 * 1024


def _local_only(scheme: str) -> bool:
    from flwr_transports.links import link_spec

    return link_spec(scheme).local_only


def default_app() -> Path | None:
    app = Path(__file__).resolve().parents[2] / "examples" / "quickstart-offload"
    return app if (app / "pyproject.toml").is_file() else None


def _scheme(t: str) -> str:
    return "inband" if t == "inband" else t.split("://", 1)[0].lower()


def _node_prefixes(supernode_prefix) -> list[list[str]]:
    """One command prefix (``ip netns exec NS``) or a list of them (one per client
    namespace, node i runs behind prefix i mod len) -> a list of prefixes."""
    if not supernode_prefix:
        return []
    if all(isinstance(x, str) for x in supernode_prefix):
        return [list(supernode_prefix)]
    return [list(x) for x in supernode_prefix]


def _deployment_class(supernode_prefix, superlink_addr: str | None):
    """LocalDeployment, or a subclass whose SuperNodes run elsewhere (other namespaces)."""
    from flwr_transports.testing.deploy import DeploymentError, LocalDeployment, free_port

    prefixes = _node_prefixes(supernode_prefix)
    if not prefixes:
        return LocalDeployment

    class SplitDeployment(LocalDeployment):
        """SuperLink listens on every address of its namespace; SuperNodes run behind a
        command prefix (``ip netns exec B``) and dial ``superlink_addr``."""

        def _start_superlink(self) -> None:
            for attempt in range(3):
                self.superlink_port = free_port()
                self._write_cli_config()
                cmd = [self._exe("flower-superlink"), "--insecure",
                       "--disable-runtime-dependency-installation",
                       "--host", "0.0.0.0", "--port", str(self.superlink_port)]
                self.superlink = self._spawn(cmd, "superlink.log")
                try:
                    self._wait(lambda: self._http_ok(self.superlink_port), "SuperLink",
                               [self.superlink])
                    return
                except DeploymentError:
                    if attempt < 2 and self.superlink.poll() is not None:
                        self._all_popen.remove(self.superlink)
                        continue
                    raise

        def _start_supernodes(self) -> None:
            n = self.n_supernodes
            for i in range(n):
                # inside namespace B nothing else listens: any high port is free (a fresh one
                # per deployment, so a previous node's lingering socket cannot clash)
                port = 20000 + secrets.randbelow(20000)
                while port in self.supernode_ports:
                    port = 20000 + secrets.randbelow(20000)
                self.supernode_ports.append(port)
                cmd = [*prefixes[i % len(prefixes)], self._exe("flower-supernode"), "--insecure",
                       "--superlink", f"{superlink_addr}:{self.superlink_port}",
                       "--host", "127.0.0.1", "--port", str(port),
                       "--node-config", f"partition-id={i} num-partitions={n}"]
                self.supernodes.append(self._spawn(cmd, f"supernode-{i}.log"))
            procs = [self.superlink, *self.supernodes]
            self._wait(lambda: self.online_nodes() >= n, f"{n} SuperNodes online", procs)
            self._remember_descendants()

    return SplitDeployment


def _mean_round(per_round: list[float]) -> float:
    # the first round also pays one-off costs (ClientApp start, link setup): drop it
    # when there are 3 or more rounds
    xs = per_round[1:] if len(per_round) >= 3 else per_round
    return statistics.mean(xs)


def _serverapp_peak(children: dict[str, int]) -> int:
    return max((v for k, v in children.items() if "serverapp" in k), default=0)


S3_STORES = ("moto", "radosgw")


def split_s3_store(t: str) -> tuple[str, str]:
    """``s3://?store=radosgw&concurrency=16`` -> ("radosgw", "concurrency=16"): the bench's
    own ``store`` option (which S3 server to start: moto, the default, or a one-node Ceph
    radosgw) taken out of the link options that follow ``s3://?``."""
    rest = t[len("s3://"):] if t.startswith("s3://") else ""
    if not rest.startswith("?"):
        return "moto", ""
    store, kept = "moto", []
    for kv in rest[1:].split("&"):
        if not kv:
            continue
        k, _, v = kv.partition("=")
        if k == "store":
            if v not in S3_STORES:
                raise ValueError(f"s3 store must be one of {', '.join(S3_STORES)}, not {v!r}")
            store = v
        else:
            kept.append(kv)
    return store, "&".join(kept)


def prepare_stores(transports: Sequence[str]) -> str | None:
    """Download what the transports' stores need, HERE: in the caller's network namespace,
    before any run enters an emulated WAN's namespaces (which have no route out). For
    ``s3://?store=radosgw``: the Ceph packages (``radosgw.fetch``, a no-op once unpacked);
    returns their cache directory (None: no radosgw store)."""
    if not any(t.startswith("s3://") and split_s3_store(t)[0] == "radosgw" for t in transports):
        return None
    from . import radosgw

    cache = radosgw.DEFAULT_CACHE
    radosgw.fetch(cache, quiet=True)
    return cache


class _S3:
    """The S3 server of s3:// runs (stopped at the end): an embedded moto server next to
    the server, or a one-node Ceph radosgw (real SigV4) started behind ``prefix`` (the
    store's namespace under a star WAN) listening on ``host``."""

    def __init__(self, host: str, kind: str = "moto", prefix: Sequence[str] | None = None,
                 cache: str | None = None):
        self.kind = kind
        self.proc = None
        self.rgw: dict[str, Any] | None = None
        if kind == "moto":
            from .p2p import _start_moto

            self.proc, self.port = _start_moto(host)
            self.endpoint = f"http://{host}:{self.port}"
            self.env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                        "AWS_DEFAULT_REGION": "us-east-1"}
            import boto3

            boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="bench",
                         aws_secret_access_key="bench", region_name="us-east-1",
                         ).create_bucket(Bucket="ftxbench")
            return
        self.rgw = _start_radosgw(host, prefix, cache)
        try:
            st = self.rgw
            self.endpoint = st["endpoint"]
            self.env = {"AWS_ACCESS_KEY_ID": st["access_key"],
                        "AWS_SECRET_ACCESS_KEY": st["secret_key"],
                        "AWS_DEFAULT_REGION": st.get("region", "us-east-1"),
                        "AWS_EC2_METADATA_DISABLED": "true"}
            import boto3
            from botocore.config import Config

            from . import radosgw

            s3 = boto3.session.Session(
                aws_access_key_id=st["access_key"], aws_secret_access_key=st["secret_key"],
                region_name=st.get("region", "us-east-1"),
            ).client("s3", endpoint_url=self.endpoint, config=Config(
                s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                response_checksum_validation="when_required"))
            radosgw.create_bucket(s3, "ftxbench")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        from .procs import stop_proc

        if self.proc is not None:
            stop_proc(self.proc)
            self.proc = None
        if self.rgw is not None:
            from . import radosgw

            radosgw.stop(self.rgw["dir"])
            self.rgw = None


RGW_MEM_BYTES = 5 << 30  # memstore cap (RAM) of the bench's radosgw


def _start_radosgw(host: str, prefix: Sequence[str] | None,
                   cache: str | None = None) -> dict[str, Any]:
    """A one-node Ceph radosgw listening on ``host``; started through ``prefix`` (another
    namespace) when given: the helper module runs there and prints its state as JSON.
    The Ceph packages must already be in ``cache`` (:func:`prepare_stores`, run before
    entering any namespace): inside one there is no network to download them."""
    from . import radosgw

    cache = cache or radosgw.DEFAULT_CACHE
    if not os.path.exists(os.path.join(radosgw._root(cache), "usr", "bin", "radosgw")):
        raise RuntimeError(f"the Ceph packages are not unpacked in {cache}: prepare_stores() "
                           "(radosgw.fetch) must run before entering a network namespace")

    d = tempfile.mkdtemp(prefix="ftx-radosgw-")
    last: Exception | None = None
    for attempt in range(3):  # a one-node Ceph sometimes fails on a loaded machine
        try:
            if not prefix:
                return radosgw.start(d, cache=cache, mem_bytes=RGW_MEM_BYTES, host=host)
            p = subprocess.run(
                [*prefix, sys.executable, "-m", "ftx_bench.radosgw", "start",
                 "--dir", d, "--mem", str(RGW_MEM_BYTES), "--host", host, "--cache", cache],
                capture_output=True, text=True, timeout=300, check=False)
            if p.returncode == 0:
                return json.loads(p.stdout)
            last = radosgw.RadosgwError(p.stderr[-1500:])
        except radosgw.RadosgwError as exc:
            last = exc
        radosgw.stop(d)
        d = tempfile.mkdtemp(prefix="ftx-radosgw-")
        time.sleep(2 * (attempt + 1))
    shutil.rmtree(d, ignore_errors=True)
    raise RuntimeError(f"radosgw did not start: {last}")


def _iface_bytes(dev: str) -> tuple[int, int] | None:
    """(rx, tx) byte counters of ``dev`` in this process's network namespace."""
    try:
        with open("/proc/self/net/dev", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == dev:
                    x = rest.split()
                    return int(x[0]), int(x[8])
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_e2e_local(
    sizes_mib: Sequence[float], transports: Sequence[str], nodes: int = 2, rounds: int = 2,
    floor_mib: float = 0.01, repeat: int = 1, timeout: float = 900, app: Path | None = None,
    progress: Callable[[str], None] | None = None, host: str = "127.0.0.1",
    supernode_prefix: Sequence[Any] | None = None, wan: bool = False,
    store_prefix: Sequence[str] | None = None, store_host: str | None = None,
    uplink_dev: str | None = None, floor_once: bool = False, rgw_cache: str | None = None,
    weights_dir: str | Path | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    say = progress or (lambda s: None)
    if rgw_cache is None and not wan:  # on loopback: fetch here (no namespace yet)
        rgw_cache = prepare_stores(transports)
    app = Path(app) if app else default_app()
    if app is None or not (app / "pyproject.toml").is_file():
        raise ValueError("Flower app not found: pass --app (e.g. examples/quickstart-offload)")
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="ftxb-e2e-"))
    stores: dict[str, _S3] = {}
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "GRPC_VERBOSITY": "ERROR"}
    plan: list[tuple[str, str | None, str | None]] = []  # (transport, url, skip reason)
    plan_env: dict[str, dict[str, str]] = {}  # transport -> extra env (the store's keys)
    try:
        for t in transports:
            sch = _scheme(t)
            if wan and sch != "inband" and _local_only(sch):
                plan.append((t, None, "same-host only (no network path to emulate)"))
            elif sch == "inband":
                plan.append((t, "inband", None))
            elif sch == "shm":  # "shm://" or "shm://?aggregation=inner"
                plan.append((t, "shm://" + t[len("shm://"):], None))
            elif sch == "file":
                d, q, query = t[len("file://"):].partition("?")
                d = d or str(work / "file-link")
                os.makedirs(d, exist_ok=True)
                plan.append((t, f"file://{d}{q}{query}", None))
            elif sch in ("tcp", "rdma"):
                # "tcp://", "rdma://?ucx_tls=tcp": the payload server on this side's address
                rest = t[len(sch) + 3:] if t.startswith(f"{sch}://") else ""
                url = f"{sch}://{host}:0{rest}" if rest.startswith("?") or not rest else t
                plan.append((t, url, None))
            elif sch == "s3":
                rest = t[len("s3://"):] if t.startswith("s3://") else ""
                if rest and not rest.startswith("?"):
                    plan.append((t, t, None))  # a real bucket URL, used as given
                    continue
                try:
                    kind, opts = split_s3_store(t)
                    if kind not in stores:
                        if kind == "radosgw":
                            say("starting radosgw" + (f" at {store_host}" if store_host else ""))
                            stores[kind] = _S3(store_host or host, kind, store_prefix,
                                               rgw_cache)
                        else:
                            stores[kind] = _S3(host, kind, cache=rgw_cache)
                    s3 = stores[kind]
                    extra = f"&{opts}" if opts else ""
                    plan.append(
                        (t, f"s3://ftxbench/e2e?endpoint_url={s3.endpoint}{extra}", None)
                    )
                    plan_env[t] = s3.env
                except Exception as exc:  # noqa: BLE001
                    plan.append((t, None, f"no S3 server: {exc}"))
            else:
                # any other registered link: "scheme://" or "scheme://?opts" runs on the
                # URL the link itself says works on this machine
                rest = t.split("://", 1)[1] if "://" in t else ""
                if rest and not rest.startswith("?"):
                    plan.append((t, t, None))
                    continue
                from flwr_transports.links import LinkError, link_classes

                try:
                    local = link_classes(sch)[0].local_url(str(work / f"{sch}-link"), host)
                except LinkError as exc:
                    plan.append((t, None, str(exc)))
                    continue
                if local is None:
                    plan.append((t, None, f"{sch}:// needs a location (give a full URL)"))
                else:
                    os.makedirs(work / f"{sch}-link", exist_ok=True)
                    if rest:
                        local += ("&" + rest[1:]) if "?" in local else rest
                    plan.append((t, local, None))
        cls = _deployment_class(supernode_prefix, host if supernode_prefix else None)
        n_live = sum(1 for _, u, _ in plan if u)
        n_floor = (1 if floor_once else n_live) if floor_mib else 0
        n_runs = n_live * len(sizes_mib) + n_floor
        k = 0
        shared_floor: float | None = None  # floor_once: the first transport's floor
        for ti, (t, url, skip) in enumerate(plan):
            if skip:
                for m in sizes_mib:
                    rows.append({"transport": t, "model_mib": m, "skipped": skip})
                say(f"{t}: skipped: {skip}")
                continue
            # a fresh deployment per transport: the SuperLink keeps the memory an earlier
            # in-band run grew it to, which would be charged to the next transport
            trace_dir = work / f"trace-{ti}"  # every process's payload timings
            with cls(n_supernodes=nodes, workdir=work / f"deploy-{ti}",
                     env={**env, **plan_env.get(t, {}), trace.ENV: str(trace_dir)}) as dep:
                say(f"deployment up for {t}: SuperLink + {nodes} SuperNodes")
                floor = shared_floor
                own_floor = floor_mib and not (floor_once and shared_floor is not None)
                todo = ([("floor", floor_mib)] if own_floor else []) + [("model", m)
                                                                         for m in sizes_mib]
                for kind, m in todo:
                    k += 1
                    say(f"[{k}/{n_runs}] {t:<10} {m:g} MiB ({kind}), {rounds} rounds ...")
                    before = _iface_bytes(uplink_dev) if uplink_dev else None
                    row = _one(dep, app, url, m, rounds, repeat, timeout, work, t,
                               trace_dir, weights_dir)
                    after = _iface_bytes(uplink_dev) if uplink_dev else None
                    if before and after:  # every repeat of the point, all rounds
                        row["server_rx_bytes"] = after[0] - before[0]
                        row["server_tx_bytes"] = after[1] - before[1]
                    row["kind"] = kind
                    if "error" in row:
                        say(f"[{k}/{n_runs}] {t:<10} {m:g} MiB FAILED: {row['error'][:300]}")
                    else:
                        say(f"[{k}/{n_runs}] {t:<10} {m:g} MiB round {row['round_s']:.2f} s  "
                            f"SuperLink peak {row['superlink_peak_rss_bytes'] / MiB:.0f} MiB  "
                            f"ServerApp peak {row['serverapp_peak_rss_bytes'] / MiB:.0f} MiB  "
                            f"aggregation tail {_fmt_s(row.get('agg_tail_s'))}"
                            + (" (per round " + ", ".join(
                                f"{x:.2f}" for x in row["agg_tail_per_round_s"]) + ")"
                               if row.get("agg_tail_per_round_s") else ""))
                        if row.get("breakdown_mean"):
                            say("    where a round's seconds go (mean over rounds): " + ", ".join(
                                f"{k} {v:.2f}" for k, v in row["breakdown_mean"].items()))
                    if kind == "floor":
                        floor = row.get("round_s")
                        row["floor_s"] = floor
                        if floor_once:
                            shared_floor = floor
                    elif floor is not None and "round_s" in row:
                        row["floor_s"] = floor
                        row["overhead_s"] = row["round_s"] - floor
                    rows.append(row)
    finally:
        for st in stores.values():
            st.close()
        shutil.rmtree(work, ignore_errors=True)
    return rows, ratios(rows)


def _one(dep, app: Path, url: str, model_mib: float, rounds: int, repeat: int,
         timeout: float, work: Path, label: str, trace_dir: Path | None = None,
         weights_dir: str | Path | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"transport": label, "url": url, "model_mib": model_mib}
    results = []
    breakdown: list[dict[str, Any]] = []  # train rounds of every repeat
    for rep in range(repeat):
        if trace_dir is not None:
            shutil.rmtree(trace_dir, ignore_errors=True)
        res_path = work / f"result-{_scheme(label)}-{model_mib:g}-{rep}-{time.monotonic_ns()}.npz"
        cfg = {"transport": url, "model-mib": float(model_mib), "num-server-rounds": rounds,
               "result-path": str(res_path)}
        if weights_dir:  # trained weights: the app ignores model-mib
            cfg["weights-dir"] = str(weights_dir)
        try:
            r = dep.run(app, cfg, timeout=timeout)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"
            return row
        js = res_path.with_suffix(".json")
        if not r.ok or not js.is_file():
            row["error"] = (f"flwr run failed (rc={r.returncode}, status={r.status}, "
                            f"timed_out={r.timed_out}): {r.output[-600:]}")
            return row
        summary = json.loads(js.read_text(encoding="utf-8"))
        for p in (res_path, js):
            p.unlink(missing_ok=True)
        results.append((r, summary))
        if trace_dir is not None:
            breakdown += [{**b, "repeat": rep}
                          for b in trace.breakdown(trace.read_events(trace_dir))]
            shutil.rmtree(trace_dir, ignore_errors=True)
    # the repeat with the median round time represents the point
    results.sort(key=lambda x: _mean_round(x[1]["per_round_s"]))
    r, summary = results[len(results) // 2]
    row.update(
        round_s=_mean_round(summary["per_round_s"]),
        per_round_s=summary["per_round_s"],
        round_s_all_repeats=[_mean_round(s["per_round_s"]) for _, s in results],
        wall_s=r.wall_s,
        serverapp_total_s=summary.get("total_s"),
        model_bytes=summary.get("model_bytes"),
        stats=summary.get("stats") or {},
        superlink_rss_before_bytes=r.superlink_rss_before,
        superlink_peak_rss_bytes=r.superlink_peak_rss,
        serverapp_peak_rss_bytes=_serverapp_peak(r.children_peak_rss),
        children_peak_rss_bytes=r.children_peak_rss,
        supernodes_peak_rss_bytes=r.supernodes_peak_rss,
    )
    # aggregation tail: last upload landed on the link -> aggregate_train returned
    # (per round, measured in the ServerApp by the offload wrapper)
    tails = (summary.get("stats") or {}).get("agg_tail_s") or []
    if tails:
        row["agg_tail_s"] = statistics.mean(tails)
        row["agg_tail_max_s"] = max(tails)
        row["agg_tail_per_round_s"] = tails  # the median repeat's rounds, in order
    pulls = (summary.get("stats") or {}).get("receive_pulls") or []
    if pulls:  # offload's receive loop: SuperLink pulls per train/evaluate phase
        row["pulls_per_phase"] = pulls
    if breakdown:  # the train rounds' critical path, from every process's trace events
        row["breakdown"] = breakdown
        keys = [k for k in breakdown[0] if k not in ("round", "repeat")]
        row["breakdown_mean"] = {k: round(statistics.mean(b[k] for b in breakdown if k in b), 3)
                                 for k in keys}
    inside = (summary.get("stats") or {}).get("agg_train_s") or []
    if inside:  # of which aggregate_train itself (the rest: Flower delivering replies)
        row["agg_train_s"] = statistics.mean(inside)
    return row


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def pooled_floor(rows: list[dict[str, Any]]) -> float | None:
    """Median of every floor run of the invocation. A floor run's tiny model stays
    in-band below the offload threshold whatever the transport, so all floor runs
    measure the same thing; their spread (Flower's 1-3 s polling) is noise that a
    per-transport floor puts straight into that transport's overhead."""
    fl = sorted(r["round_s"] for r in rows if r.get("kind") == "floor" and "round_s" in r)
    if not fl:
        return None
    mid = len(fl) // 2
    return fl[mid] if len(fl) % 2 else (fl[mid - 1] + fl[mid]) / 2


def without_codec(transport: str) -> str | None:
    """``tcp://?codec=delta`` -> ``tcp://`` (the same link with raw payloads); None when
    ``transport`` names no codec (or ``codec=raw``)."""
    head, q, query = transport.partition("?")
    if not q:
        return None
    opts = query.split("&")
    codecs = [o for o in opts if o.startswith("codec=")]
    if not codecs or codecs[-1] == "codec=raw":
        return None
    rest = [o for o in opts if not o.startswith("codec=")]
    return head + ("?" + "&".join(rest) if rest else "")


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """in-band / transport, per model size: on the overhead (round - floor), on the
    overhead above the pooled floor (see :func:`pooled_floor`) and raw. And for a
    transport with a codec, the same link's raw round / its round."""
    out: dict[str, float] = {}
    pooled = pooled_floor(rows)
    models = [r for r in rows if r.get("kind") == "model" and "round_s" in r]
    for r in models:
        base_t = without_codec(r["transport"])
        raw = [x for x in models if base_t is not None and x["transport"] == base_t
               and x["model_mib"] == r["model_mib"]]
        if raw and r["round_s"] > 0:
            out[f"{r['model_mib']:g} MiB {base_t}/{r['transport']} round"] = (
                raw[0]["round_s"] / r["round_s"])
    for r in models:
        if r["transport"] == "inband":
            continue
        ib = [x for x in models if x["transport"] == "inband" and x["model_mib"] == r["model_mib"]]
        if not ib:
            continue
        b = ib[0]
        tag = f"{r['model_mib']:g} MiB inband/{r['transport']}"
        if r["round_s"] > 0:
            out[f"{tag} round"] = b["round_s"] / r["round_s"]
        # a ratio of overheads only means something when both stand above the noise
        # of the floor (a few hundred ms here); otherwise it is left out
        ro, bo = r.get("overhead_s"), b.get("overhead_s")
        if ro is not None and bo is not None and ro > 0.05 and bo > 0.05:
            out[f"{tag} overhead"] = bo / ro
        if pooled is not None:
            ro, bo = r["round_s"] - pooled, b["round_s"] - pooled
            if ro > 0.05 and bo > 0.05:
                out[f"{tag} overhead above the pooled floor ({pooled:.2f} s)"] = bo / ro
    return out


def run_e2e(sizes_mib: Sequence[float], transports: Sequence[str], nodes: int = 2,
            rounds: int = 2, floor_mib: float = 0.01, repeat: int = 1, timeout: float = 900,
            app: Path | None = None, progress: Callable[[str], None] | None = None,
            wan=None, floor_once: bool = False, weights_dir: str | Path | None = None
            ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Loopback, or across a :class:`~.wan.WanEmulation` (driver re-run inside namespace A).

    ``floor_once``: one floor run (with the first transport), used for every transport
    (a floor run's tiny model stays in-band whatever the transport)."""
    rgw_cache = prepare_stores(transports)  # before any namespace: they have no network
    if wan is None:
        return run_e2e_local(sizes_mib, transports, nodes, rounds, floor_mib, repeat, timeout,
                             app, progress, floor_once=floor_once, rgw_cache=rgw_cache,
                             weights_dir=weights_dir)
    app = Path(app) if app else default_app()
    spec = {
        "sizes_mib": list(sizes_mib), "transports": list(transports), "nodes": nodes,
        "rounds": rounds, "floor_mib": floor_mib, "repeat": repeat, "timeout": timeout,
        "app": str(app) if app else None, "host": wan.addr_a,
        "supernode_prefix": [list(x) for x in wan.client_prefixes()],
        "store_prefix": list(wan.prefix("s")) if wan.ns_s else None,
        "store_host": wan.addr_s, "floor_once": floor_once, "rgw_cache": rgw_cache,
        "weights_dir": str(weights_dir) if weights_dir else None,
    }
    fd, spec_path = tempfile.mkstemp(prefix="ftxb-e2e-spec-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    try:
        proc = subprocess.Popen(
            [*wan.prefix("a"), sys.executable, "-m", "ftx_bench.e2e", "inner",
             spec_path],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        from .p2p import communicate
        from .procs import stop_proc

        try:
            out, _ = communicate(proc, timeout * (len(sizes_mib) + 1)
                                 * max(1, len(transports)) * repeat + 300)
        except BaseException:
            stop_proc(proc, timeout=30)  # SIGTERM: the inner driver stops its deployment
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"e2e driver inside the WAN namespace failed ({proc.returncode})")
        doc = json.loads(out.strip().splitlines()[-1])
        return doc["rows"], doc["ratios"]
    finally:
        os.unlink(spec_path)


def _inner(spec_path: str) -> int:
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    from .procs import set_pdeathsig

    set_pdeathsig()
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    rows, rat = run_e2e_local(
        spec["sizes_mib"], spec["transports"], spec["nodes"], spec["rounds"],
        spec["floor_mib"], spec["repeat"], spec["timeout"],
        Path(spec["app"]) if spec["app"] else None,
        lambda s: print(s, file=sys.stderr, flush=True),
        host=spec["host"], supernode_prefix=spec["supernode_prefix"], wan=True,
        store_prefix=spec.get("store_prefix"), store_host=spec.get("store_host"),
        uplink_dev="a0", floor_once=spec.get("floor_once", False),
        rgw_cache=spec.get("rgw_cache"), weights_dir=spec.get("weights_dir"),
    )
    print(json.dumps({"rows": rows, "ratios": rat}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "inner":
        sys.exit(_inner(sys.argv[2]))
    print("internal entry point; use 'ftx-bench e2e'", file=sys.stderr)
    sys.exit(2)

"""Run an example Flower app in a local deployment on 127.0.0.1, as the examples'
READMEs say (and as CI runs them: tests/integration/test_examples.py).

    python examples/run_local.py examples/quickstart-offload --run-config "transport='shm://'"

What it does, with stock Flower commands (flwr_transports.testing.LocalDeployment):

1. ``flower-superlink --insecure --disable-runtime-dependency-installation`` and N
   ``flower-supernode --insecure --superlink 127.0.0.1:PORT --node-config
   "partition-id=I num-partitions=N"`` on free ports. Why the flag: Flower 1.42's
   SuperLink installs an app's dependencies at run time with ``uv sync`` by default;
   flwr-transports is not on PyPI yet (that install would fail) and an unpinned torch
   from PyPI is a CUDA build of several GB. With the flag, the apps run in the
   environment the SuperLink and SuperNodes run in: install flwr-transports (and torch,
   for llm-offload) there first.
2. A private Flower CLI config (``FLWR_HOME`` in a temporary directory) naming that
   SuperLink ``local``: your ``~/.flwr/config.toml`` is neither read nor changed.
3. ``flwr run APP local --stream --run-config ...``; prints the run's output.
4. Stops every process it started (and their children), removes the temporary files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("app", help="the Flower app directory (holds pyproject.toml)")
    ap.add_argument("--run-config", default="",
                    help="overrides, as for flwr run: \"transport='shm://' num-server-rounds=2\"")
    ap.add_argument("--nodes", type=int, default=2, help="SuperNodes (default 2)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for the run")
    a = ap.parse_args(argv)

    from flwr.common.config import parse_config_args

    from flwr_transports.testing import LocalDeployment

    cfg = parse_config_args([a.run_config]) if a.run_config.strip() else {}
    with tempfile.TemporaryDirectory(prefix="ftx-example-") as work:
        print(f"starting a SuperLink and {a.nodes} SuperNodes on 127.0.0.1 ...", flush=True)
        with LocalDeployment(n_supernodes=a.nodes, workdir=Path(work)) as dep:
            print(f"flwr run {a.app} local --stream --run-config {a.run_config!r}", flush=True)
            res = dep.run(a.app, cfg, timeout=a.timeout)
    print(res.output)
    if not res.ok:
        print(f"run failed: exit {res.returncode}, status {res.status}", file=sys.stderr)
        return 1
    print(f"run finished in {res.wall_s:.1f} s (status {res.status})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

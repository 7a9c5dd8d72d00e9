"""Smoke test of an INSTALLED flwr-transports (scripts/test-wheel.sh): the package comes
from site-packages, not a checkout; the harness is not there; a real local Flower
deployment runs the quickstart app over tcp:// with the public
``flwr_transports.testing.LocalDeployment``.

    python scripts/wheel_smoke.py examples/quickstart-offload
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path


def main(app: str) -> int:
    import flwr_transports
    from flwr_transports.testing import LocalDeployment

    where = Path(flwr_transports.__file__).resolve()
    assert "site-packages" in where.parts, f"not the installed package: {where}"
    assert importlib.util.find_spec("ftx_bench") is None, "the harness is installed"
    print(f"wheel smoke: flwr_transports {flwr_transports.__version__} from {where.parent}")
    with tempfile.TemporaryDirectory(prefix="ftx-wheel-smoke-") as work, \
            LocalDeployment(n_supernodes=2, workdir=Path(work) / "deploy") as dep:
        for transport in ("tcp://127.0.0.1:0",):
            res = dep.run(app, {"transport": transport, "num-server-rounds": 1,
                                "model-mib": 2.0}, timeout=300)
            if not res.ok:
                print(res.output[-3000:], file=sys.stderr)
                print(f"wheel smoke: FAILED over {transport} (status {res.status})",
                      file=sys.stderr)
                return 1
            print(f"wheel smoke: {transport} ok in {res.wall_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

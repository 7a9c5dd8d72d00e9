"""docs/migrate.md followed from a plain Flower app to a working offloaded one.

The plain app (tests/apps/plain_app: NumPy linear model, FedAvg, no flwr-transports)
runs in a real local deployment (``flower-superlink`` + 2 ``flower-supernode`` on
127.0.0.1); then the diff blocks of docs/migrate.md are applied to a copy of it
(tests/migrate_doc.py) and the migrated app runs over ``shm://`` in the same
deployment. Checked: both final models are bit-identical (and trained), the payloads
went over the link and not through Flower (the ``strategy.stats`` line and the log
lines that the page's Step 4 adds, as the page describes them), no reply was
rejected, and nothing is left in /dev/shm.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from migrate_doc import PLAIN_APP, migrate  # tests/ is on sys.path (tests/conftest.py)

ROUNDS = 1


@dataclass
class Runs:
    plain: Any
    migrated: Any
    plain_model: list[np.ndarray]
    migrated_model: list[np.ndarray]
    shm_after: set[str]


def _load(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ftx_names) -> Runs:
    import psutil  # noqa: F401 - a dev dependency: missing is a failure

    from flwr_transports.testing import LocalDeployment

    base = tmp_path_factory.mktemp("migrate")
    app = base / "migrated_app"
    changed = migrate(app)
    assert "plain_app/client_app.py" in changed and "plain_app/server_app.py" in changed
    with LocalDeployment(n_supernodes=2, workdir=base / "deploy") as dep:
        common = {"num-server-rounds": ROUNDS}
        plain = dep.run(PLAIN_APP, {**common, "result-path": str(base / "plain.npz")},
                        timeout=300)
        assert plain.ok, f"plain app failed ({plain.status}):\n{plain.output[-4000:]}"
        migrated = dep.run(app, {**common, "result-path": str(base / "migrated.npz"),
                                 "transport": "shm://"}, timeout=300)
        assert migrated.ok, f"migrated app failed ({migrated.status}):\n{migrated.output[-4000:]}"
    print(f"plain run {plain.wall_s:.1f} s, migrated (shm://) run {migrated.wall_s:.1f} s")
    return Runs(plain, migrated, _load(base / "plain.npz"), _load(base / "migrated.npz"),
                ftx_names())


def _plain_task():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plain_app_task_for_tests",
                                                  PLAIN_APP / "plain_app" / "task.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stats(output: str) -> dict[str, Any]:
    m = re.search(r"^flwr-transports stats: (\{.*\})\s*$", output, flags=re.MULTILINE)
    assert m, f"no 'flwr-transports stats:' line (migrate.md Step 4) in:\n{output[-3000:]}"
    return ast.literal_eval(m.group(1))


@pytest.mark.integration
def test_migrated_app_gives_the_plain_apps_model(runs):
    init = list(_plain_task().init_model().values())
    assert len(runs.plain_model) == len(runs.migrated_model) == len(init) == 2
    for a, b, c in zip(runs.plain_model, runs.migrated_model, init, strict=True):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == c.shape
        # offload's default aggregation streams FedAvg's weighted mean (float rounding
        # differs from Flower's within 1e-6 relative; aggregation=inner is bit-identical)
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(runs.plain_model[0], init[0])  # the round trained the model


@pytest.mark.integration
def test_payloads_went_out_of_band(runs):
    model_bytes = sum(a.nbytes for a in runs.plain_model)
    stats = _stats(runs.migrated.output)
    # the model to 2 nodes for train and for evaluate each round; 2 updates back
    assert stats["link_bytes_sent"] >= ROUNDS * 4 * model_bytes, stats
    assert stats["link_bytes_received"] >= ROUNDS * 2 * model_bytes, stats
    assert stats["inband_bytes_sent"] < 64 * 1024, stats
    assert stats["inband_bytes_received"] < 64 * 1024, stats
    assert stats["replies_rejected"] == 0, stats


@pytest.mark.integration
def test_log_lines_the_page_describes(runs):
    out = runs.migrated.output
    published = re.findall(r"flwr-transports: round (\d+) (train|evaluate): published 'arrays' "
                           r"\(([\d.]+) MiB, 2 arrays\) on shm://", out)
    assert [(r, p) for r, p, _ in published] == [
        (str(r), p) for r in range(1, ROUNDS + 1) for p in ("train", "evaluate")
    ], out[-3000:]
    assert all(abs(float(mib) - 2.0) < 0.05 for _, _, mib in published), published
    summary = re.search(r"flwr-transports summary: in-band [\d.]+ MiB sent / [\d.]+ MiB "
                        r"received; shm ([\d.]+) MiB sent / ([\d.]+) MiB received; "
                        r"0 replies rejected", out)
    assert summary, out[-3000:]
    assert float(summary.group(1)) >= 4 * 2.0 * ROUNDS
    assert "rejected the reply payload" not in out
    # the plain app never touched flwr-transports
    assert "flwr-transports:" not in runs.plain.output
    assert "flwr-transports stats" not in runs.plain.output


@pytest.mark.integration
def test_nothing_left_in_dev_shm(runs):
    servers = runs.migrated.pids_of("flwr-serverapp")
    assert servers, runs.migrated.processes
    prefixes = tuple(f"ftx-{pid}-" for pid in servers)
    # (only this run's names: other processes on the machine may use /dev/shm meanwhile)
    assert not {n for n in runs.shm_after if n.lstrip(".").startswith(prefixes)}

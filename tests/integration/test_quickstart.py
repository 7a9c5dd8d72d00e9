"""The README's quick start works pasted into a Flower app (issue 22).

The three marked blocks of README.md (pyproject, server, client; identical in
docs/index.md) are pasted into the plain Flower app tests/apps/plain_app
(tests/quickstart_doc.py), and the result runs in a real local deployment
(``flower-superlink`` + 2 ``flower-supernode``, ``LocalDeployment``) with
``--run-config "transport='shm://'"``: it must finish, publish every round's model on
shm://, reject no reply, train the model and leave nothing in /dev/shm.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from quickstart_doc import ROOT, build_app, quickstart_blocks


def test_docs_index_shows_the_same_quick_start():
    assert quickstart_blocks(ROOT / "docs" / "index.md") == quickstart_blocks()


def test_blocks_are_what_the_issue_asks_for():
    b = quickstart_blocks()
    assert b["pyproject"].splitlines()[:2] == ["[tool.flwr.app.config]", 'transport = "inband"']
    assert 'context.run_config["transport"]' in b["server"]
    assert ".get(" not in b["server"]
    assert "payload_mod" in b["client"]


@pytest.mark.integration
@pytest.mark.slow
def test_quick_start_pasted_into_a_flower_app_runs_over_shm(tmp_path, ftx_names):
    from flwr_transports.testing import LocalDeployment

    app = build_app(tmp_path / "quickstart_app")
    server = (app / "plain_app" / "server_app.py").read_text()
    for line in quickstart_blocks()["server"].strip().splitlines():
        assert line.strip() in server  # pasted as written
    before = ftx_names()
    result = tmp_path / "final.npz"
    trace = tmp_path / "trace"  # flwr_transports.trace: what went over which link
    trace.mkdir()
    with LocalDeployment(n_supernodes=2, workdir=tmp_path / "deploy",
                         env={"FLWR_TRANSPORTS_TRACE": str(trace)}) as dep:
        # LocalDeployment passes the run config as a TOML file to --run-config; the
        # same key/value as --run-config "transport='shm://'"
        res = dep.run(app, {"transport": "shm://", "result-path": str(result)}, timeout=600)
    assert res.ok, f"quick-start app failed ({res.status}):\n{res.output[-4000:]}"
    events = [json.loads(line) for f in sorted(trace.glob("ftx-trace-*.jsonl"))
              for line in f.read_text().splitlines()]
    published = sorted({(e["round"], e["phase"]) for e in events
                        if e["ev"] == "publish" and e.get("scheme") == "shm"})
    # num_rounds=3 of the snippet, train and evaluate each round, over shm://
    assert published == [(r, p) for r in (1, 2, 3) for p in ("evaluate", "train")], events
    fetched = [e for e in events if e["ev"] == "fetch" and e["role"] == "client"]
    assert len(fetched) == 12 and {e.get("scheme") for e in fetched} == {"shm"}, fetched
    assert {e["round"] for e in events if e["ev"] == "upload"} == {1, 2, 3}
    with np.load(result) as z:
        assert len(z.files) == 2 and np.all(np.isfinite(z["arr_0"]))
    # shm names are ftx-<pid of the creating process>-...: ours are those of this run's
    # processes (other runs on a shared machine may have their own there meanwhile)
    pids = {str(p) for p in res.processes}
    left = {n for n in ftx_names() - before if n.lstrip(".").split("-")[1] in pids}
    assert not left, f"shm:// payloads left behind: {left}"


def test_run_config_cli_form_matches_the_readme():
    """The README's own command line: the run-config string it shows parses to the
    value the deployment test passes."""
    from flwr.common.config import parse_config_args

    readme = (Path(ROOT) / "README.md").read_text()
    assert "--run-config \"transport='shm://'\"" in readme
    assert parse_config_args(["transport='shm://'"]) == {"transport": "shm://"}

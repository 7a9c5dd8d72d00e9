"""docs/migrate.md's diffs apply to the plain app, strictly (fast; no deployment).

tests/integration/test_migrate.py runs the result in a real deployment.
"""

from __future__ import annotations

import tomllib

import pytest
from migrate_doc import DOC, PLAIN_APP, DiffError, diff_blocks, migrate


def test_plain_app_knows_nothing_of_flwr_transports():
    for path in PLAIN_APP.rglob("*.py"):
        assert "flwr_transports" not in path.read_text(encoding="utf-8"), path
    project = tomllib.loads((PLAIN_APP / "pyproject.toml").read_text(encoding="utf-8"))
    assert not [d for d in project["project"]["dependencies"] if "transports" in d]
    assert "transport" not in project["tool"]["flwr"]["app"]["config"]


def test_page_diffs_apply_and_make_the_documented_changes(tmp_path):
    app = tmp_path / "app"
    changed = migrate(app)
    assert changed == ["pyproject.toml", "plain_app/server_app.py", "plain_app/client_app.py",
                       "plain_app/server_app.py"]
    project = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    assert "flwr-transports" in project["project"]["dependencies"]
    assert project["tool"]["flwr"]["app"]["config"]["transport"] == "inband"
    server = (app / "plain_app" / "server_app.py").read_text(encoding="utf-8")
    client = (app / "plain_app" / "client_app.py").read_text(encoding="utf-8")
    assert "from flwr_transports import offload" in server
    assert 'strategy = offload(strategy, transport=context.run_config["transport"])' in server
    assert 'print("flwr-transports stats:", strategy.stats)' in server
    assert "from flwr_transports import payload_mod" in client
    assert "app = ClientApp(mods=[payload_mod])" in client
    for path in (app / "plain_app").glob("*.py"):
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
    # Steps 2 and 3 are the promised "two lines in server_app.py, one in client_app.py"
    plus = [[ln for ln in b.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
            for b in diff_blocks()]
    assert [len(p) for p in plus[1:3]] == [2, 2]  # server: import + wrap; client: import + mods
    assert sum(1 for ln in plus[2] if "ClientApp(" in ln) == 1


def test_applier_rejects_a_diff_that_does_not_match(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    broken = text.replace("     strategy = FedAvg(fraction_evaluate=1.0, min_available_nodes=2)\n"
                          "+    strategy = offload(",
                          "     strategy = FedAvg(fraction_evaluate=0.5, min_available_nodes=2)\n"
                          "+    strategy = offload(", 1)
    assert broken != text
    with pytest.raises(DiffError, match="does not match the file"):
        migrate(tmp_path / "app", broken)
    miscounted = text.replace("@@ -2,10 +2,11 @@", "@@ -2,10 +2,12 @@", 1)
    assert miscounted != text
    with pytest.raises(DiffError, match="header says"):
        migrate(tmp_path / "app2", miscounted)


def _error(call) -> str:
    try:
        call()
    except (ValueError, TypeError) as exc:
        return str(exc)
    raise AssertionError("no error raised")


def test_error_messages_quoted_on_the_page_are_the_codes():
    """The 'Common errors' table quotes what the code says (fragments: the table
    elides the variable parts with '...')."""
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.serverapp.strategy import FedAvg

    from flwr_transports import offload
    from flwr_transports.links import server_link

    page = DOC.read_text(encoding="utf-8")
    cases = [
        (lambda: offload(FedAvg(), "shmm://"),
         ["unknown transport scheme 'shmm'; known: inband, shm://, file://, s3://, tcp://"]),
        (lambda: offload(FedAvg(), "shm://?foo=1"),
         ["unknown option(s) for shm://: foo (link options: ",
          "; wrapper options: threshold, max_reply_size, reply_slots, fetch_workers"]),
        (lambda: offload(FedAvg(), "inband", foo=1),
         ["unknown option(s) for transport 'inband': foo (link options: none; wrapper "
          "options: "]),
        (lambda: offload(LegacyFedAvg(), "shm://"),
         ["offload() wraps a Message-API strategy (flwr.serverapp.strategy.Strategy), got "]),
        (lambda: offload(offload(FedAvg()), "shm://"),
         ["strategy is already wrapped by offload()"]),
        (lambda: server_link("shm:///x", 1, {}),
         ["shm:// takes no host or path (got 'shm:///x'); use 'shm://'"]),
        (lambda: server_link("file:relative/dir", 1, {}),
         ["file:// needs an absolute directory, e.g. file:///shared/dir (got "]),
        (lambda: server_link("tcp://0.0.0.0:0", 1, {}),
         [("tcp:// HOST is the address clients dial, not '0.0.0.0'; put a reachable name in "
          "the URL and use bind=0.0.0.0 to listen on every interface")]),
    ]
    for call, fragments in cases:
        message = _error(call)
        for fragment in fragments:
            assert fragment in message, (fragment, message)
            assert fragment in page, f"migrate.md does not quote {fragment!r}"

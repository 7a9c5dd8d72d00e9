"""Smaller items of issue 22: options that do not apply are refused, size units say
what they mean, the docs agree with the code, the LICENSE is there."""

from __future__ import annotations

from pathlib import Path

import pytest

from flwr_transports import offload, offload_grid
from flwr_transports.errors import ConfigError
from flwr_transports.options import parse_size
from flwr_transports.testing import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]


def _grid():
    return InProcessGrid(lambda msg, ctx: msg, num_nodes=1)


@pytest.mark.parametrize("transport, kw", [
    ("shm://?aggregation=streaming", {}),
    ("shm://", {"aggregation": "inner"}),
    ("inband", {"aggregation": "auto"}),
    ("tcp://127.0.0.1:0?threshold=4MiB&aggregation=inner", {}),
    ("shm://?ray_shards=4", {}),
    ("shm://", {"ray_address": "auto"}),
])
def test_offload_grid_refuses_aggregation(transport, kw):
    with pytest.raises(ConfigError, match=r"'(aggregation|ray_\w+)'.* apply to offload\(strategy"):
        offload_grid(_grid(), transport, **kw)


def test_offload_grid_keeps_the_options_that_apply():
    with offload_grid(_grid(), "shm://?threshold=4MiB", fetch_workers=2) as g:
        assert g.threshold == 4 << 20 and g.fetch_workers == 2
    from flwr.serverapp.strategy import FedAvg

    assert offload(FedAvg(), "shm://?aggregation=inner").aggregation == "inner"


def test_size_units_binary_and_decimal_and_the_error_says_which():
    assert parse_size("16G") == parse_size("16GiB") == parse_size("16gib") == 16 * 2**30
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("512k") == 512 * 1024 and parse_size("512KB") == 512_000
    with pytest.raises(ConfigError) as exc:
        parse_size("16 gigs")
    msg = str(exc.value)
    assert "'16G' is 16 GiB" in msg and "'16GB' is 16 * 10^9 bytes" in msg


def test_offload_docstring_and_docs_agree_on_fda():
    doc = offload.__doc__
    assert "OUTERMOST" not in doc and "FDA(offload(FedAvg()))" in doc
    page = (ROOT / "docs" / "offload.md").read_text()
    assert "**outermost**" not in page and "`FDA(offload(FedAvg()))`" in page
    assert "`16G` is\n16 GiB" in page or "`16G` is 16 GiB" in page


def test_docs_nav_and_api_reference():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert "aggregation.md" in nav
    api = (ROOT / "docs" / "api.md").read_text()
    assert "::: flwr_transports.torch" in api and "::: flwr_transports.policy.ClientPolicy" in api
    index = (ROOT / "docs" / "index.md").read_text()
    assert "fails fast" not in index


def test_license_file_and_pyproject():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "radosgw.sh" not in pyproject and "*.c" not in pyproject
    assert 'license-files = ["LICENSE"]' in pyproject


def test_offload_of_an_own_loop_strategy_still_takes_aggregation():
    """offload(strategy) wraps the grid itself for a strategy with its own start(): the
    strategy's options pass there (the refusal is for offload_grid() only)."""
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    class OwnLoop(FedAvg):
        def start(self, grid, initial_arrays, num_rounds=3, **kw):
            self.seen = grid
            return "ran"

    inner = OwnLoop()
    s = offload(inner, "shm://?aggregation=inner", aggregation="inner")
    import numpy as np

    arrays = ArrayRecord([np.zeros(4, dtype=np.float32)])
    assert s.start(_grid(), arrays, num_rounds=1) == "ran"
    assert inner.seen is not None

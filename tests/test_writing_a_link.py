"""docs/links/writing-a-link.md cannot rot: its link, entry point and test class are
extracted from the page into a separate directory (a plugin package: the module plus a
generated *.dist-info with the page's entry point, as ``pip install`` lays it out),
then

* the shipped contract suite runs against it in a fresh pytest process (the page's own
  one-class test file, outside this repository's tests/ and conftest);
* a real Flower deployment (LocalDeployment: SuperLink, 2 SuperNodes, ``flwr run`` of
  examples/quickstart-offload) runs 2 rounds over ``box://`` with the plugin directory
  on every process's PYTHONPATH (integration).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from flwr_transports.testing.link_contract import LinkContract

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "links" / "writing-a-link.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """The page's link installed in a directory of its own (module + .dist-info)."""
    d = tmp_path_factory.mktemp("box-plugin")
    link_code, test_code = _blocks("python")
    assert "class BoxServerLink(ServerLink)" in link_code
    (d / "box_link.py").write_text(link_code)
    meta = tomllib.loads(_blocks("toml")[0])["project"]
    eps = meta["entry-points"]["flwr_transports.links"]
    assert eps == {"box": "box_link:BoxServerLink"}
    info = d / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\n"
                                   f"Version: {meta['version']}\n")
    (info / "entry_points.txt").write_text(
        "[flwr_transports.links]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    (d / "tests").mkdir()
    (d / "tests" / "test_box.py").write_text(test_code)
    return d


def test_the_page_link_passes_the_shipped_contract_suite(plugin_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(plugin_dir), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(plugin_dir), f"--basetemp={tmp_path / 'bt'}", str(plugin_dir / "tests")],
        check=False, cwd=plugin_dir, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    n = len([m for m in dir(LinkContract) if m.startswith("test_")])
    assert re.search(rf"\b{n} passed\b", out), out[-3000:]
    assert "skipped" not in out and "failed" not in out, out[-3000:]
    assert [e for e in os.listdir(tmp_path / "bt") if "ftx-" in e] == []


@pytest.mark.integration
def test_the_page_link_runs_a_real_deployment_round(plugin_dir, tmp_path, quickstart_app):
    from flwr_transports.testing import LocalDeployment

    box = tmp_path / "box"
    box.mkdir()
    result = tmp_path / "final.npz"
    pythonpath = os.pathsep.join([str(plugin_dir),
                                  *filter(None, [os.environ.get("PYTHONPATH")])])
    seen: set[str] = set()
    with LocalDeployment(n_supernodes=2, workdir=tmp_path / "deploy",
                         env={"PYTHONPATH": pythonpath}) as dep:
        res = dep.run(quickstart_app, {"transport": f"box://{box}", "model-mib": 2.0,
                                       "num-server-rounds": 2,
                                       "result-path": str(result)}, timeout=480)
        seen |= set(os.listdir(box))
    assert res.ok, f"box:// run failed ({res.status}):\n{res.output[-4000:]}"
    summary = json.loads(result.with_suffix(".json").read_text())
    st = summary["stats"]
    assert st["replies_rejected"] == 0
    assert st["link_bytes_sent"] > 1 << 20 and st["link_bytes_received"] > 1 << 20
    assert st["inband_bytes_sent"] < 100_000  # references and tickets only
    with np.load(result) as z:
        assert len(z.files) > 0
    assert os.listdir(box) == []  # close() removed every payload

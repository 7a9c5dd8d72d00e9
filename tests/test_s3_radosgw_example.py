"""examples/s3-radosgw: the llm-offload app with its weights in Ceph radosgw (real auth).

Reuses the module-scoped radosgw cluster of test_s3_radosgw (``rgw``), then runs the
example's own ``run_example`` (a real local Flower deployment, tiny model, 2 rounds,
``s3://`` with threshold 0 so every model goes through the bucket).

Checked: the run succeeds; the loss goes down; the bf16 weights went through S3
(wrapper statistics) and every transfer was bit-exact (tests/llm_checks.py); the
bucket is empty afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import boto3  # noqa: F401 - a dev dependency: missing is a failure
import pytest

pytest.importorskip("torch", reason="the llm-offload example needs torch")

sys.path.insert(0, os.path.dirname(__file__))
from llm_checks import TINY, check_loss_goes_down, check_transfers_bit_exact
from test_s3_radosgw import rgw  # noqa: F401 - the module-scoped radosgw fixture

pytestmark = [pytest.mark.radosgw, pytest.mark.integration]
ROUNDS = 2
RUN = Path(__file__).resolve().parent.parent / "examples" / "s3-radosgw" / "run.py"


def _example():
    spec = importlib.util.spec_from_file_location("ftx_s3_example", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_llm_example_through_radosgw(rgw, tmp_path):  # noqa: F811 - fixture
    import psutil  # noqa: F401 - a dev dependency: missing is a failure
    ex = _example()
    cfg = {**TINY, "num-server-rounds": ROUNDS}
    _, summary, out = ex.run_example(rgw["endpoint"], rgw["access_key"], rgw["secret_key"],
                                     rgw["bucket"], cfg, tmp_path)
    assert summary["transport"].startswith(f"s3://{rgw['bucket']}/llm?")
    check_loss_goes_down(summary, ROUNDS)
    check_transfers_bit_exact(out, summary, ROUNDS)
    st = summary["stats"]
    assert st["link_bytes_sent"] >= ROUNDS * 2 * summary["model_bytes"]
    assert st["link_bytes_received"] >= ROUNDS * 2 * summary["model_bytes"]
    assert st["replies_rejected"] == 0
    s3 = ex.s3_client(rgw["endpoint"], rgw["access_key"], rgw["secret_key"])
    assert ex.bucket_leftovers(s3, rgw["bucket"]) == []

"""Trained weights for the codec benchmarks (issue 25): benchmarks/trained_weights.py,
the quickstart app's ``weights-dir`` mode and the raw/codec ratios of ``ftx-bench``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples" / "quickstart-offload"))

from ftx_bench.e2e import without_codec
from ftx_bench.reproduce import e2e_points


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="scripts/test.sh installs torch==2.13.0")
    import trained_weights

    out = tmp_path_factory.mktemp("w") / "tiny"
    logs: list[str] = []
    trained_weights.ensure(["--out", str(out), "--preset", "tiny", "--rounds", "1",
                            "--steps", "1"], log=logs.append)
    # a second call with the same settings reuses the set
    trained_weights.ensure(["--out", str(out), "--preset", "tiny", "--rounds", "1",
                            "--steps", "1"], log=logs.append)
    assert logs[-1].startswith("trained weights already in")
    return out


def test_the_app_starts_from_the_trained_model_and_replies_a_real_update(tiny_weights):
    from quickstart_offload.task import load_trained, trained_update

    idx = json.loads((tiny_weights / "index.json").read_text())
    base = load_trained(str(tiny_weights))
    assert list(base) == idx["names"]
    assert sum(a.size for a in base.values()) == idx["elements"]
    received = {k: np.array(v) + np.float32(0.5) for k, v in base.items()}
    for pid in (0, 1, 2):  # partition 2 reuses update 0 (two recorded updates)
        upd = np.load(tiny_weights / f"update-{pid % 2}.npy")
        out = trained_update(received, pid, str(tiny_weights))
        got = np.concatenate([out[k].reshape(-1) for k in idx["names"]])
        want = np.concatenate([received[k].reshape(-1) for k in idx["names"]]) + upd
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        assert np.count_nonzero(upd) > upd.size // 2  # training moved most weights
    with pytest.raises(ValueError, match="not the one in weights-dir"):
        trained_update({"other": np.zeros(3, np.float32)}, 0, str(tiny_weights))
    with pytest.raises(ValueError, match="absolute"):
        load_trained("relative/dir")


def test_a_truncated_weights_file_is_refused(tiny_weights, tmp_path):
    from quickstart_offload.task import load_trained

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.json").write_bytes((tiny_weights / "index.json").read_bytes())
    np.save(bad / "base.npy", np.load(tiny_weights / "base.npy")[:-1])
    with pytest.raises(ValueError, match="does not match"):
        load_trained(str(bad))
    with pytest.raises(FileNotFoundError, match="trained_weights.py"):
        load_trained(str(tmp_path / "missing"))


@pytest.mark.parametrize("t,raw", [
    ("tcp://", None), ("tcp://?codec=raw", None), ("tcp://?codec=delta", "tcp://"),
    ("s3://?store=radosgw&codec=q8", "s3://?store=radosgw"),
    ("s3://?codec=lossless&store=radosgw", "s3://?store=radosgw"),
])
def test_a_codec_transport_is_paired_with_the_same_link_raw(t, raw):
    assert without_codec(t) == raw


def test_codec_rounds_are_compared_with_the_same_links_raw_rounds():
    rows = [{"transport": t, "model_mib": 475.0, "kind": "model", "round_s": s,
             "server_tx_bytes": tx}
            for t, s, tx in (("tcp://", 30.0, 2 << 30), ("tcp://?codec=delta", 20.0, 1 << 30),
                             ("s3://?store=radosgw&codec=delta", 25.0, 1 << 29))]
    pts, ratios = e2e_points({"results": rows})
    assert ratios == {"tcp:///tcp://?codec=delta@475MiB round": 1.5}  # s3 has no raw row
    assert pts["tcp://?codec=delta@475MiB"]["server_tx_mib"] == 1024.0
    assert "overhead_s" not in pts["tcp://@475MiB"]  # no floor run, no overhead

"""``flwr-transports doctor``: reports every link with a reason, never crashes."""

from __future__ import annotations

import json

import pytest

from flwr_transports import doctor
from flwr_transports.cli import main as cli_main
from flwr_transports.links import rdma


def test_cli_text_report(capsys):
    assert cli_main(["doctor"]) == 0
    out = capsys.readouterr().out
    for label in ("shm://", "file://", "s3://", "tcp://", "rdma://", "mpi "):
        assert label in out
    assert "tcp://   yes" in out  # loopback TCP works on any test machine


def test_json_report_matches_rdma_status(capsys):
    assert doctor.main(["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) == {"shm", "file", "s3", "tcp", "rdma", "mpi"}
    assert all(isinstance(r["ok"], bool) and r["detail"] for r in rep.values())
    ok, why = rdma.rdma_status()
    assert rep["rdma"]["ok"] is ok and why in rep["rdma"]["detail"]
    if not ok:
        assert "tcp://" in rep["rdma"]["detail"]


def test_missing_optional_dependencies_give_install_hints(monkeypatch):
    monkeypatch.setattr(doctor, "_version", lambda mod: None)
    ok, why = doctor.check_s3()
    assert not ok and "flwr-transports[s3]" in why
    ok, why = doctor.check_mpi()
    assert not ok and "flwr-transports[mpi]" in why


def test_mpi_without_mpiexec(monkeypatch):
    monkeypatch.setattr(doctor, "_version", lambda mod: "4.1.0")
    monkeypatch.setattr(doctor, "_mpiexec", lambda: None)
    ok, why = doctor.check_mpi()
    assert not ok and "no mpiexec" in why


def test_shm_missing(monkeypatch):
    real = doctor.os.path.isdir
    monkeypatch.setattr(doctor.os.path, "isdir", lambda p: False if p == "/dev/shm" else real(p))
    ok, why = doctor.check_shm()
    assert not ok and "file://" in why


def test_a_crashing_check_is_reported_not_raised(monkeypatch):
    def boom():
        raise RuntimeError("kaput")

    monkeypatch.setitem(doctor.CHECKS, "tcp", boom)
    rep = doctor.report()
    assert rep["tcp"]["ok"] is False and "kaput" in rep["tcp"]["detail"]


@pytest.mark.skipif(rdma.rdma_status()[0], reason="this machine has RDMA")
def test_rdma_reported_unavailable_here():
    ok, why = doctor.check_rdma()
    assert not ok and "tcp://" in why

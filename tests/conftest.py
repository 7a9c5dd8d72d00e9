"""Shared test fixtures (kept small: most helpers live next to the tests using them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A bug must fail the tests: with this set, the offload wrapper re-raises an unexpected
# exception type met while handling one reply instead of only rejecting that reply
# (production behaviour). Deployment subprocesses inherit it.
os.environ.setdefault("FLWR_TRANSPORTS_STRICT", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def quickstart_app() -> Path:
    """The example Flower app driven by the deployment tests and benchmarks."""
    app = EXAMPLES / "quickstart-offload"
    assert (app / "pyproject.toml").is_file(), f"example app missing at {app}"
    return app


def _ftx_names(root: Path, prefix: str = "ftx-") -> set[str]:
    try:
        names = [p.name for p in root.iterdir()]
    except OSError:
        return set()
    return {n for n in names if n.lstrip(".").startswith(prefix)}


@pytest.fixture(scope="session")
def ftx_names():
    """``ftx_names(dir=/dev/shm)``: names a link created there (hidden temp names too)."""
    return lambda root=Path("/dev/shm"): _ftx_names(Path(root))


@pytest.fixture(scope="session", autouse=True)
def _no_hydra_leftovers():
    """MPICH's mpiexec (Hydra) writes /tmp/hydra_hwloc_xmlfile_* and leaves it behind
    when a job ends through MPI_Abort, which the failure tests do on purpose (a stalled
    or dead rank). Remove the ones this test session created (mpiexec ignores TMPDIR)."""
    import glob
    import os

    pattern = "/tmp/hydra_hwloc_xmlfile_*"
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        try:
            os.unlink(path)
        except OSError:
            pass


@pytest.fixture(scope="session")
def rgw_server():
    """One Ceph radosgw (real SigV4 auth) for the whole session: state dict with
    endpoint, access_key, secret_key, a boto3 client ``s3`` and a ``bucket``.
    Skipped with the reason when the Ceph packages cannot be fetched here."""
    import uuid

    from ftx_bench import radosgw as script

    try:
        script.fetch(quiet=True)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch: skip with the reason
        pytest.skip(f"Ceph radosgw packages unavailable here: {exc}")
    # A one-node Ceph occasionally fails to come up on a loaded 2-core machine (seen:
    # the OSD exiting during start-up); try a fresh cluster up to 3 times.
    for attempt in range(3):
        try:
            state = script.start(mem_bytes=2 << 30)
            break
        except script.RadosgwError as exc:
            if attempt == 2:
                raise
            print(f"radosgw start attempt {attempt + 1} failed, retrying: {exc}")
    try:
        import boto3
        from botocore.config import Config

        # a fresh session with explicit keys: boto3's default session caches the first
        # credentials it resolved in this process (another test module's, for instance)
        s3 = boto3.session.Session(
            aws_access_key_id=state["access_key"], aws_secret_access_key=state["secret_key"],
            region_name="us-east-1",
        ).client("s3", endpoint_url=state["endpoint"], config=Config(
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
            response_checksum_validation="when_required"))
        bucket = f"ftx-{uuid.uuid4().hex[:10]}"
        script.create_bucket(s3, bucket)
        yield {**state, "s3": s3, "bucket": bucket}
    finally:
        script.stop(state["dir"])

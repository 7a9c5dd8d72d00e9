"""A real S3 server for tests (moto's, in a thread on loopback), shared by the test
modules instead of each starting its own the same way."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

#: credentials moto accepts (any work); the metadata service is never asked
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextmanager
def moto_endpoint(*, set_env: bool = True) -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (a free port); yield its endpoint URL.
    ``set_env``: export :data:`CREDS` while it runs (boto3's default chain, as a
    ServerApp would find them), restoring the environment after."""
    from moto.server import ThreadedMotoServer

    old = {k: os.environ.get(k) for k in CREDS}
    if set_env:
        os.environ.update(CREDS)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        srv.stop()
        if set_env:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

"""A model kept in the store past its run (``final_model=store``, docs/aggregation.md).

With ``offload(strategy, "s3://...?aggregation=ray&final_model=store")`` the shard
owners' last model is copied inside the store (no byte through the ServerApp) and
``Result.arrays`` is a *stored-model reference*: an ``ArrayRecord`` of one array
(stype :data:`STORED_STYPE`) whose data is JSON ``{"v", "bucket", "key", "digest",
"size", "n_arrays"}``. :func:`flwr_transports.loading.load_model` reads the model back later: a HEAD checks the
size, ranged GETs read it, and every byte is verified against the digest. The same
reference may be the next run's ``initial_arrays`` (the model is then copied inside the
store and handed out from there: ``OffloadStrategy._adopt_initial``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from flwr.app import Array, ArrayRecord

STORED_ARRAY = "flwr_transports.stored_model"
STORED_STYPE = "flwr_transports.stored (a model kept in the store: flwr_transports.load_model)"
_MAX_SIZE = 1 << 50
_DIGEST = re.compile(r"sha256t:[0-9a-f]{64}")


class StoredModelError(ValueError):
    """A stored-model reference that is malformed, or names an object that is not there
    (or not what the reference says)."""


def stored_ref(bucket: str, key: str, digest: str, size: int, n_arrays: int) -> ArrayRecord:
    body = json.dumps({"v": 1, "bucket": bucket, "key": key, "digest": digest,
                       "size": size, "n_arrays": n_arrays}, sort_keys=True).encode()
    return ArrayRecord({STORED_ARRAY: Array(dtype="uint8", shape=(len(body),),
                                            stype=STORED_STYPE, data=body)})


def is_stored_ref(rec: object) -> bool:
    return (isinstance(rec, ArrayRecord) and len(rec) == 1 and STORED_ARRAY in rec
            and rec[STORED_ARRAY].stype == STORED_STYPE)


def parse_stored_ref(rec: object) -> dict[str, Any]:
    """The fields of a stored-model reference, each checked (type, range, format)."""
    if not is_stored_ref(rec):
        raise StoredModelError("not a stored-model reference (Result.arrays of a run with "
                               "final_model=store)")
    data = rec[STORED_ARRAY].data
    if not isinstance(data, bytes) or len(data) > 4096:
        raise StoredModelError("stored-model reference: no (or an oversized) body")
    try:
        d = json.loads(data)
    except ValueError:
        raise StoredModelError("stored-model reference: its body is not JSON") from None
    ok = (isinstance(d, dict) and d.get("v") == 1
          and isinstance(d.get("bucket"), str) and d["bucket"]
          and isinstance(d.get("key"), str) and d["key"] and len(d["key"].encode()) <= 1024
          and isinstance(d.get("digest"), str) and _DIGEST.fullmatch(d["digest"])
          and type(d.get("size")) is int and 0 < d["size"] <= _MAX_SIZE
          and type(d.get("n_arrays")) is int and d["n_arrays"] >= 0)
    if not ok:
        raise StoredModelError("stored-model reference: a field is missing or invalid "
                               "(v, bucket, key, digest, size, n_arrays)")
    return d

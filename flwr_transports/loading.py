"""``flwr_transports.load_model``: read back a model a ``final_model=store`` run kept.

Its own module (not :mod:`.stored`): it needs the links and the wrapper's options,
which themselves use :mod:`.stored`'s reference helpers.
"""

from __future__ import annotations

from flwr.app import ArrayRecord

from .stored import StoredModelError, parse_stored_ref


def load_model(url: str, ref: ArrayRecord) -> ArrayRecord:
    """Read the model a ``final_model=store`` run kept (``ref``: its ``Result.arrays``)
    with the store named by ``url`` (the same ``s3://bucket/...?endpoint_url=...`` as
    the run; its bucket must be the reference's). Raises :class:`StoredModelError` when
    the object is missing or its size differs, ``PayloadError`` when its bytes do not
    match the digest."""
    from .codec import decode
    from .flower.wrapper import WRAPPER_OPTIONS
    from .links import parse, server_link

    d = parse_stored_ref(ref)
    spec = parse(url, WRAPPER_OPTIONS)  # the run's URL: its wrapper options are ignored
    if spec.scheme != "s3":
        raise StoredModelError(f"load_model reads s3:// stores, not {spec.scheme}://")
    link = server_link(spec, "load")
    try:
        if link.cfg.bucket != d["bucket"]:
            raise StoredModelError(f"the reference is in bucket {d['bucket']!r}, the URL "
                                   f"names {link.cfg.bucket!r}: pass the run's URL")
        head = link._head(d["key"], f"reading s3://{d['bucket']}/{d['key']}")
        if head is None:
            raise StoredModelError(f"s3://{d['bucket']}/{d['key']}: no such object (the "
                                   f"stored model was removed?)")
        if head.get("ContentLength") != d["size"]:
            raise StoredModelError(f"s3://{d['bucket']}/{d['key']}: {head.get('ContentLength')} "
                                   f"bytes, the reference says {d['size']}")
        src = link._reader(d["key"], d["size"], {"enc": None, "name": "stored model",
                                                  "part": link._owned_unit(d["size"], None)})
        try:
            return decode(src.read, d["size"], d["digest"])
        finally:
            src.close()
    finally:
        link.close()

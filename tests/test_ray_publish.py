"""aggregation=ray, ray_model=store: the next model's payload written by the shard
owners (flwr_transports.aggregation.ray_publish), without Ray: the layout, the parts
and their leaf hashes give exactly the bytes and the digest ``encode`` gives for the
same record, whatever the owners' element split (the end-to-end tests on a Ray cluster
and moto are in tests/test_ray_aggregation.py)."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from flwr_transports.aggregation.fold import WINDOW
from flwr_transports.aggregation.layout import NPY_STYPE, npy_header
from flwr_transports.aggregation.ray_publish import (
    MAX_PARTS,
    MIN_PART,
    OutArray,
    fill_part,
    leaves_of,
    output_layout,
    part_bounds,
)
from flwr_transports.codec import DIGEST_ALGO, decode_bytes, encode


def _record() -> ArrayRecord:
    """~33 MiB: three windows, arrays straddling them, odd header lengths (float64 and
    float16 elements then start at odd offsets: parts split elements)."""
    r = np.random.default_rng(11)
    return ArrayRecord({"w": Array(r.standard_normal(4_200_001).astype(np.float32)),
                        "odd.name/ü": Array(r.standard_normal((1001, 1003))),
                        "h": Array(r.standard_normal(30_001).astype(np.float16)),
                        "empty": Array(np.zeros((0, 3), dtype=np.float32)),
                        "steps": Array(np.arange(7, dtype=np.int64))})


def _owners(rec: ArrayRecord, cuts: list[float]):
    """Owner j holds elements [cuts[j], cuts[j+1]) (fractions) of every array."""
    flats = [np.ascontiguousarray(a.numpy()).reshape(-1) for a in rec.values()]
    k = len(cuts) - 1
    outs, infos = [{} for _ in range(k)], [{} for _ in range(k)]
    for i, f in enumerate(flats):
        bounds = [round(c * len(f)) for c in cuts]
        for j in range(k):
            lo, hi = bounds[j], bounds[j + 1]
            if hi > lo:
                outs[j][i] = (lo, f[lo:hi])
                infos[j][i] = (lo, hi - lo)
    arrays = [OutArray(i, n, a.dtype, tuple(a.shape), NPY_STYPE,
                       npy_header(a.numpy().dtype, tuple(a.shape), False),
                       a.numpy().dtype.itemsize) for i, (n, a) in enumerate(rec.items())]
    return outs, infos, arrays


@pytest.mark.parametrize("cuts", [[0, 1], [0, 0.5, 1], [0, 0.13, 0.5, 0.77, 1],
                                  [0, 0, 0.9, 1]])
def test_owners_parts_are_encodes_bytes_and_digest(cuts):
    """Also with encrypt=true (first split): each sealed part is, byte for byte, what
    the link's own publish stores for that payload and key (links/s3_http.build_part)."""
    from flwr_transports.aggregation.ray_publish import seal_part
    from flwr_transports.links.s3 import ENC_CHUNK
    from flwr_transports.links.s3_http import (
        Cipher,
        Layout,
        SegmentReader,
        build_part,
        new_encryption,
    )

    rec = _record()
    want = encode(rec)
    outs, infos, arrays = _owners(rec, cuts)
    lay = output_layout(arrays, infos)
    assert lay.size == want.size
    body, leaves = bytearray(), []
    for p0, p1 in part_bounds(lay.size):
        # as write_model does: the writer's own elements from `out`, the others' pieces
        # fetched (here: sliced from the other owners, by reference index)
        writer = 0
        spec = {"size": p1 - p0, "segs": []}
        foreign = []
        for s in lay.segments(p0, p1):
            if s[0] == "b":
                spec["segs"].append(s)
                continue
            _, off, j, key, e0, e1, skip, nbytes = s
            if j == writer:
                spec["segs"].append(("e", off, None, key, e0, e1, skip, nbytes))
            else:
                foreign.append(outs[j][key][1][e0:e1])
                spec["segs"].append(("e", off, len(foreign) - 1, key, e0, e1, skip, nbytes))
        buf = fill_part(outs[writer], spec, foreign, lambda x: x)
        leaves += leaves_of(buf)
        body += buf
        if cuts == [0, 1]:
            enc = new_encryption(ENC_CHUNK)
            lay_enc = Layout(want.size, ENC_CHUNK)
            assert seal_part(buf, enc, p0, want.size) == build_part(
                SegmentReader(want), lay_enc, Cipher(enc, want.size), WINDOW, p0 // WINDOW)
    assert bytes(body) == want.to_bytes()
    assert f"{DIGEST_ALGO}:{hashlib.sha256(b''.join(leaves)).hexdigest()}" == want.digest
    got = decode_bytes(bytes(body), want.digest)  # what a client decodes
    for k in rec:
        assert np.array_equal(got[k].numpy(), rec[k].numpy())


def test_parts_are_whole_windows_within_s3s_limits():
    for size in (1, WINDOW - 1, WINDOW, WINDOW + 1, 5 * WINDOW + 7, (MAX_PARTS + 3) * WINDOW):
        b = part_bounds(size)
        assert b[0][0] == 0 and b[-1][1] == size and len(b) <= MAX_PARTS
        assert all(x[1] == y[0] for x, y in itertools.pairwise(b))
        assert all((p1 - p0) % WINDOW == 0 and p1 - p0 >= MIN_PART for p0, p1 in b[:-1])


def test_owners_that_do_not_tile_an_array_are_refused():
    rec = ArrayRecord({"w": Array(np.arange(10, dtype=np.float32))})
    _outs, infos, arrays = _owners(rec, [0, 0.5, 1])
    infos[1][0] = (6, 4)  # element 5 held by nobody
    with pytest.raises(RuntimeError, match="do not tile"):
        output_layout(arrays, infos)
    infos[1][0] = (5, 4)  # element 9 held by nobody
    with pytest.raises(RuntimeError, match="hold 9 of the 10"):
        output_layout(arrays, infos)

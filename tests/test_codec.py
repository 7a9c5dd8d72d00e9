"""Codec: ArrayRecord <-> bytes round trips, digest, hostile payloads, interop, copies."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from flwr_transports.codec import (
    PayloadError,
    decode,
    decode_bytes,
    encode,
    encode_to_bytes,
    parse_size,
)

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
          np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, np.complex64]


def _record() -> ArrayRecord:
    rng = np.random.default_rng(0)
    arrays = {}
    for dt in DTYPES:
        arrays[f"x_{np.dtype(dt).name}"] = (rng.random((3, 5)) * 100).astype(dt)
    arrays["zero_d"] = np.array(3.5, dtype=np.float32)
    arrays["empty"] = np.zeros((0, 7), dtype=np.float32)
    arrays["empty1d"] = np.zeros((0,), dtype=np.int64)
    arrays["fortran"] = np.asfortranarray(rng.random((4, 6)))
    arrays["bigendian"] = np.arange(5, dtype=">i4")
    arrays["weird name/with.dots and spaces ü"] = np.ones(2)
    rec = ArrayRecord()
    for k, v in arrays.items():
        rec[k] = Array(v)
    # a non-numpy serialization type travels verbatim
    rec["custom"] = Array(dtype="bfloat16", shape=(2,), stype="custom.raw", data=b"\x01\x02\x03\x04")
    return rec


def test_roundtrip_all_dtypes_shapes_order_names():
    rec = _record()
    raw, digest = encode_to_bytes(rec)
    out = decode_bytes(raw, digest)
    assert list(out.keys()) == list(rec.keys())
    for k in rec:
        a, b = rec[k], out[k]
        assert (a.dtype, tuple(a.shape), a.stype, a.data) == (b.dtype, tuple(b.shape), b.stype, b.data)
        if a.stype == "numpy.ndarray":
            na, nb = a.numpy(), b.numpy()
            assert na.dtype == nb.dtype and na.shape == nb.shape
            np.testing.assert_array_equal(na, nb)


def test_digest_is_sha256_of_bytes_and_detects_any_flip():
    rec = _record()
    raw, digest = encode_to_bytes(rec)
    leaf = hashlib.sha256(raw).digest()  # < 16 MiB: a single chunk
    assert digest == "sha256t:" + hashlib.sha256(leaf).hexdigest()
    for pos in (0, 9, len(raw) // 2, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        with pytest.raises(PayloadError):
            decode_bytes(bytes(bad), digest)


def test_empty_record_roundtrip():
    raw, digest = encode_to_bytes(ArrayRecord())
    assert len(decode_bytes(raw, digest)) == 0


def test_safetensors_interop():
    import safetensors.numpy as safetensors  # a hard dependency: never skipped
    rec = _record()
    raw, _ = encode_to_bytes(rec)
    loaded = safetensors.load(raw)
    # every array is a U8 tensor holding exactly Array.data
    assert len(loaded) == len(rec)
    datas = sorted(bytes(v.tobytes()) for v in loaded.values())
    assert datas == sorted(a.data for a in rec.values())


@pytest.mark.parametrize("mutate, msg", [
    (lambda raw: raw[:4], "too small"),
    (lambda raw: struct.pack("<Q", 2**40) + raw[8:], "header length"),
    (lambda raw: raw[:-1], "offsets"),
    (lambda raw: raw + b"x", "trailing"),
    (lambda raw: struct.pack("<Q", 8) + b"not json" + raw[16:], "malformed"),
])
def test_hostile_payloads_rejected(mutate, msg):
    raw, _ = encode_to_bytes(_record())
    with pytest.raises(PayloadError, match=msg):
        decode_bytes(mutate(raw), None)


def test_header_offsets_must_be_contiguous():
    import json
    raw, _ = encode_to_bytes(_record())
    (hlen,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8 : 8 + hlen])
    hdr["a00000001"]["data_offsets"][0] += 1
    new = json.dumps(hdr).encode()
    new += b" " * ((-len(new)) % 8)
    forged = struct.pack("<Q", len(new)) + new + raw[8 + hlen :]
    with pytest.raises(PayloadError, match="offsets"):
        decode_bytes(forged, None)


def test_chunked_digest_matches_definition_across_segment_boundaries():
    from flwr_transports.codec import DIGEST_CHUNK, hash_segments
    rng = np.random.default_rng(1)
    blob = rng.integers(0, 255, 2 * DIGEST_CHUNK + 12345, dtype=np.uint8).tobytes()
    cuts = [0, 7, DIGEST_CHUNK - 3, DIGEST_CHUNK + 5, len(blob)]
    segs = [blob[a:b] for a, b in zip(cuts, cuts[1:])]
    leaves = b"".join(hashlib.sha256(blob[i:i + DIGEST_CHUNK]).digest()
                      for i in range(0, len(blob), DIGEST_CHUNK))
    assert hash_segments(segs) == "sha256t:" + hashlib.sha256(leaves).hexdigest()
    assert hash_segments(segs) == hash_segments([blob])
    flipped = bytearray(blob)
    flipped[DIGEST_CHUNK + 1] ^= 1
    assert hash_segments([bytes(flipped)]) != hash_segments([blob])


def test_wrong_digest_algorithm_rejected():
    raw, _ = encode_to_bytes(_record())
    with pytest.raises(PayloadError, match="algorithm"):
        decode_bytes(raw, "md5:abcd")


def test_encode_copies_no_array_data():
    """encode() returns the Arrays' own bytes objects as segments (no copy) and
    allocates only the header."""
    rec = ArrayRecord([np.ones((1024, 1024), dtype=np.float32) for _ in range(8)])  # 32 MiB
    tracemalloc.start()
    payload = encode(rec)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1024 * 1024, f"encode allocated {peak} bytes for a 32 MiB record"
    assert all(seg is arr.data for seg, arr in zip(payload.segments[1:], rec.values()))


def test_decode_allocates_one_copy():
    """decode() builds each Array from the bytes its reader returns: one copy in total."""
    rec = ArrayRecord([np.ones((1024, 1024), dtype=np.float32) for _ in range(8)])  # 32 MiB
    raw, digest = encode_to_bytes(rec)
    mv = memoryview(raw)
    tracemalloc.start()
    out = decode(lambda o, n: bytes(mv[o : o + n]), len(raw), digest)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.1 * len(raw), f"decode peak {peak} for a {len(raw)}-byte payload"
    assert len(out) == 8


@pytest.mark.parametrize("s, n", [("64MiB", 64 * 2**20), ("1GB", 10**9), ("512k", 512 * 1024),
                                  (1048576, 1048576), ("2.5m", int(2.5 * 2**20)), ("10", 10)])
def test_parse_size(s, n):
    assert parse_size(s) == n


@pytest.mark.parametrize("s", ["-1", "abc", "12 parsecs", True, -5])
def test_parse_size_rejects(s):
    with pytest.raises(ValueError):
        parse_size(s)

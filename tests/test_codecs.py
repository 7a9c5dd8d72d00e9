"""Payload codecs (issue 25): lossless/delta exactness on every dtype, hostile streams
refused with PayloadError (never a crash, never an oversized allocation), q8 error
feedback converging on a known quadratic objective."""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flwr_transports import codec
from flwr_transports.codec import PayloadError
from flwr_transports.codecs import (
    Base,
    Decoder,
    ErrorFeedback,
    decode_payload,
    decode_record,
    encode,
    is_encoded,
    read_info,
)
from flwr_transports.codecs import q8 as q8mod
from flwr_transports.codecs import stream as S

SMALL_WINDOW = 64 * 1024  # many windows from small arrays

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
          np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, np.complex64, np.complex128]


def _record(seed: int = 0, n: int = 40_000) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    rec = ArrayRecord()
    for dt in DTYPES:
        v = rng.standard_normal(n) * 0.05
        if np.dtype(dt).kind == "c":
            v = v + 1j * rng.standard_normal(n)
        rec[f"x_{np.dtype(dt).name}"] = Array(np.asarray(v * (1 if np.dtype(dt).kind in "fc"
                                                             else 1000)).astype(dt))
    rec["zero_d"] = Array(np.array(3.5, dtype=np.float32))
    rec["empty"] = Array(np.zeros((0, 7), dtype=np.float16))
    rec["bigendian_f4"] = Array((rng.standard_normal(5000) * 0.1).astype(">f4"))
    rec["bigendian_i8"] = Array(np.arange(3001, dtype=">i8"))
    bf = (rng.standard_normal(30_001).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    rec["bf16_as_u16"] = Array(bf)
    rec["bf16_as_V2"] = Array(bf.view("V2"))
    rec["fortran"] = Array(np.asfortranarray(rng.random((40, 60))))
    rec["odd/name ü"] = Array(np.ones(3))
    # raw bytes of a torch tensor (torch.raw) and an unknown serialization type
    rec["torch_bf16"] = Array(dtype="torch.bfloat16", shape=(7, 1001), stype="torch.raw",
                              data=bf[: 7 * 1001].tobytes())
    rec["torch_f32"] = Array(dtype="torch.float32", shape=(999,), stype="torch.raw",
                             data=(rng.standard_normal(999) * 0.02).astype("<f4").tobytes())
    rec["custom"] = Array(dtype="whatever", shape=(5,), stype="custom.raw",
                          data=b"\x01\x02\x03\x04\x05")
    return rec


def _raw(rec: ArrayRecord, meta=None) -> codec.EncodedPayload:
    return codec.encode(rec, meta)


def _same_records(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for k in a:
        x, y = a[k], b[k]
        assert (x.dtype, tuple(x.shape), x.stype, bytes(x.data)) == \
            (y.dtype, tuple(y.shape), y.stype, bytes(y.data)), k


def _decode_every_way(wire: bytes, raw: bytes, base: Base | None = None) -> None:
    """Whole, into a record (arrays' final bytes), through the ranged reader, window by
    window: every way gives exactly the raw payload."""
    assert is_encoded(wire) and not is_encoded(raw)
    out = decode_payload(wire, base=base, verify=True)
    assert bytes(out) == raw
    assert bytes(decode_payload(wire, base=base, threads=1)) == raw
    dec = Decoder(lambda o, n: wire[o: o + n], len(wire), base=base)
    rec = decode_record(dec, verify=True)
    assert codec.encode(rec).to_bytes() == raw if not _has_meta(raw) else True
    assert codec.decode(dec.reader(), dec.size, None) is not None
    for k in reversed(range(dec.info.nwin)):  # any order: windows are independent
        w0, w1 = dec.window_span(k)
        assert bytes(dec.decode_window(k)) == raw[w0:w1]


def _has_meta(raw: bytes) -> bool:
    return b'"weight"' in raw[:4096]


@pytest.mark.parametrize("window", [SMALL_WINDOW, S.WINDOW])
def test_lossless_is_exact_on_every_dtype(window):
    rec = _record()
    p = _raw(rec)
    raw = p.to_bytes()
    e = encode(p, "lossless", window=window)
    wire = e.to_bytes()
    assert e.digest == codec.hash_segments([wire])  # the digest covers the wire bytes
    info = read_info(lambda o, n: wire[o: o + n], len(wire))
    assert (info.codec, info.size, info.content_digest, info.base_digest) == \
        ("lossless", len(raw), p.digest, None)
    assert info.nwin == -(-len(raw) // window)
    _decode_every_way(wire, raw)
    _same_records(decode_record(Decoder(lambda o, n: wire[o: o + n], len(wire))), rec)
    assert len(wire) < 0.9 * len(raw)  # something was gained (ints, zeros, exponents)


def test_lossless_without_entropy_coder_and_raw_is_identity():
    p = _raw(_record(1, 5000))
    assert encode(p, "raw") is p
    wire = encode(p, "lossless", compress=False, window=SMALL_WINDOW).to_bytes()
    _decode_every_way(wire, p.to_bytes())


def test_lossless_tiny_and_one_byte_payloads():
    for rec in (ArrayRecord(), ArrayRecord({"a": Array(np.zeros((), np.int8))})):
        p = _raw(rec)
        wire = encode(p, "lossless").to_bytes()
        _decode_every_way(wire, p.to_bytes())


def _trained(rec: ArrayRecord, seed: int, names: set[str]) -> ArrayRecord:
    """``rec`` with small changes to the float arrays in ``names`` (the rest frozen)."""
    rng = np.random.default_rng(seed)
    out = ArrayRecord()
    for k, a in rec.items():
        if k in names and a.stype == "numpy.ndarray" and a.numpy().dtype.kind in "fc":
            v = a.numpy()
            out[k] = Array(np.asarray(v + (rng.standard_normal(v.shape) * 1e-3)).astype(v.dtype))
        elif k in names:  # bits flipped here and there (ints, V2, torch.raw)
            d = bytearray(a.data)
            d[:: 7] = bytes((x ^ 1) for x in d[:: 7])  # flip low bits here and there
            out[k] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=bytes(d))
        else:
            out[k] = a
    return out


@pytest.mark.parametrize("window", [SMALL_WINDOW, S.WINDOW])
def test_delta_is_exact_against_the_base_it_names(window):
    rec = _record()
    base_p = _raw(rec)
    base = Base.from_payload(base_p)
    new = _trained(rec, 1, {"x_float32", "x_float16", "bf16_as_V2", "torch_bf16", "zero_d",
                            "x_complex64", "bigendian_f4"})
    # the reply differs in layout too: extra metadata (header length), a new array,
    # a dropped one, a reshaped one, another order
    new["new_one"] = Array(np.arange(100, dtype=np.float32))
    del new["x_int8"]
    new["fortran"] = Array(np.asfortranarray(np.zeros((60, 40))))
    p = _raw(new, meta={"weight": "12"})
    e = encode(p, "delta", base=base, window=window)
    wire = e.to_bytes()
    info = read_info(lambda o, n: wire[o: o + n], len(wire))
    assert (info.codec, info.base_digest, info.content_digest) == ("delta", base.digest, p.digest)
    _decode_every_way(wire, p.to_bytes(), base)
    out = decode_record(Decoder(lambda o, n: wire[o: o + n], len(wire), base=base), verify=True)
    _same_records(out, new)


def test_delta_of_frozen_layers_costs_almost_nothing():
    rng = np.random.default_rng(3)
    rec = ArrayRecord({f"l{i}": Array((rng.standard_normal(100_000) * 0.02).astype(np.float32))
                       for i in range(8)})
    base = Base.from_payload(_raw(rec))
    new = ArrayRecord(dict(rec.items()))
    new["l0"] = Array((rng.standard_normal(100_000) * 0.02).astype(np.float32))  # 1 of 8 moved
    p = _raw(new)
    wire = encode(p, "delta", base=base).to_bytes()
    _decode_every_way(wire, p.to_bytes(), base)
    lossless = encode(p, "lossless").to_bytes()
    # 7 frozen layers of 8 cost ~nothing: the delta is about one layer's lossless size
    assert len(wire) < len(lossless) / 8 * 1.1 + 4096


def test_delta_against_another_base_or_none_is_refused():
    rec = _record(0, 3000)
    base = Base.from_payload(_raw(rec))
    other = Base.from_payload(_raw(_record(5, 3000)))
    p = _raw(_trained(rec, 2, {"x_float32"}))
    wire = encode(p, "delta", base=base).to_bytes()
    with pytest.raises(PayloadError, match="not the base held here"):
        decode_payload(wire, base=other)
    with pytest.raises(PayloadError, match="no base is held here"):
        decode_payload(wire)
    # a base that claims the right digest but holds other bytes is caught by verify
    liar = Base(base.digest, other.segments)
    with pytest.raises(PayloadError):
        decode_payload(wire, base=liar, verify=True)


def test_encoder_refuses_bad_arguments():
    p = _raw(_record(0, 100))
    with pytest.raises(ValueError, match="unknown codec"):
        encode(p, "zip")
    with pytest.raises(ValueError, match="needs the base"):
        encode(p, "delta")
    with pytest.raises(ValueError, match="window"):
        encode(p, "lossless", window=1000)


# ----------------------------------------------------------------- hostile streams


def _frame(parts: list[tuple[int, int, int, int, int]], blobs: list[bytes], dlen: int) -> bytes:
    """A window frame from (kind, itemsize, dtype, dlen, base_off) parts and the parts'
    data already laid out as blobs (one bytes per part)."""
    descs = b"".join(S._PD.pack(k, isz, dt, 0, pl, len(b), 0, bo)
                     for (k, isz, dt, pl, bo), b in zip(parts, blobs, strict=True))
    elen = S._WH.size + len(descs) + sum(len(b) for b in blobs)
    return S._WH.pack(b"FW", len(parts), dlen, elen, 0) + descs + b"".join(blobs)


def _stream(frames: list[bytes], size: int, *, codec_id: int = 1, window: int = SMALL_WINDOW,
            base: bytes = bytes(32), nwin: int | None = None, qblock: int = 0,
            version: int = 1) -> bytes:
    nwin = len(frames) if nwin is None else nwin
    hdr = S._SH.pack(S.MAGIC, version, codec_id, qblock, window, nwin, size, bytes(32), base)
    return hdr + struct.pack(f"<{len(frames)}I", *map(len, frames)) + b"".join(frames)


def _stored(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _zblob(z: bytes) -> bytes:
    return struct.pack("<I", len(z) | S._ZBIT) + z


def _zstd(data: bytes, **kw) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor(level=1, **kw).compress(data)


def _patch_fcs(z: bytes, value: int) -> bytes:
    """A zstd frame with its Frame_Content_Size field rewritten (same field width)."""
    fhd = z[4]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    assert width in (2, 4, 8)
    if width == 2:
        value -= 256
    return z[:pos] + value.to_bytes(width, "little") + z[pos + width:]


def _refused(wire: bytes, base: Base | None = None, max_size: int = S.MAX_DECODED,
             match: str | None = None) -> None:
    with pytest.raises(PayloadError, match=match):
        decode_payload(wire, base=base, max_size=max_size, threads=1)


def _valid_one_window(data: bytes) -> bytes:
    return _stream([_frame([(0, 1, 0, len(data), 0)], [_stored(data)], len(data))], len(data))


def test_hand_built_stream_decodes():
    data = bytes(range(256)) * 10
    assert bytes(decode_payload(_valid_one_window(data))) == data


def test_bomb_windows_are_refused_before_allocation():
    n = 4096
    big = bytes(4 * S.WINDOW)  # compresses to a few hundred bytes
    small = bytes(n // 2)
    cases = {
        # a blob that expands to far more than its window (declared honestly)
        "declares": _zblob(_zstd(big)),
        # declares the window's size but expands to more, or to less
        "expands to more": _zblob(_patch_fcs(_zstd(bytes(2 * n)), n)),
        "expands to less": _zblob(_patch_fcs(_zstd(small), n)),
        # no declared size at all
        "no size": _zblob(_zstd(bytes(n), write_content_size=False)),
        # trailing bytes after the zstd frame, inside the blob
        "trailing": _zblob(_zstd(bytes(n)) + b"xx"),
        # two frames
        "two frames": _zblob(_zstd(bytes(n // 2)) + _zstd(bytes(n // 2))),
    }
    for name, blob in cases.items():
        wire = _stream([_frame([(0, 1, 0, n, 0)], [blob], n)], n)
        tracemalloc.start()
        try:
            with pytest.raises(PayloadError, match="zstd"):
                decode_payload(wire, threads=1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, (name, peak)  # never the 64 MiB the bomb asks for


def test_lying_sizes_are_refused():
    data = bytes(range(256)) * 16
    n = len(data)
    good = _frame([(0, 1, 0, n, 0)], [_stored(data)], n)
    _refused(_stream([good], n + 1), match="window|table")  # size vs table
    _refused(_stream([good], n, nwin=1 << 30), match="window count|table")
    _refused(_stream([good, good], n), match="window count")
    _refused(_stream([good], n, window=1000), match="window size")
    _refused(_stream([good], n, window=1 << 30), match="window size")
    _refused(_stream([good], n), max_size=n - 1, match="over the limit")
    _refused(_stream([good], n, codec_id=9), match="codec id")
    _refused(_stream([good], n, codec_id=2), match="base")  # delta without a base digest
    _refused(_stream([good], n, base=b"\x01" * 32), match="base digest set")
    _refused(_stream([good], n, qblock=256), match="q8 block")
    _refused(_stream([good], n)[:-1])  # truncated
    _refused(_stream([good], n) + b"x")  # trailing
    _refused(b"FTXZ" + bytes(10))
    for fr in (
        _frame([(0, 1, 0, n - 1, 0)], [_stored(data[:-1])], n),  # parts short of window
        _frame([(0, 1, 0, n, 0)], [_stored(data[:-1])], n),  # stored blob short
        _frame([(0, 3, 0, n, 0)], [_stored(data)], n),  # n % itemsize
        _frame([(7, 1, 0, n, 0)], [_stored(data)], n),  # unknown kind
        _frame([(0, 1, 0, n, 5)], [_stored(data)], n),  # base offset on a plain part
        _frame([(1, 1, 0, n, 0)], [_stored(data)], n),  # xor part, no base
        _frame([(0, 1, 0, n, 0)], [struct.pack("<I", 1 << 30) + data], n),  # blob overrun
        _frame([(0, 2, 0, n, 0)], [_stored(data[: n // 2]) + b"\0\0"], n),  # 2nd word short
        good[:-1] + b"",
        b"XW" + good[2:],
    ):
        _refused(_stream([fr], n))


def test_parts_referring_outside_the_base_or_wrong_kind_are_refused():
    rec = _record(0, 3000)
    base = Base.from_payload(_raw(rec))
    n = 4096
    braw = bytes.fromhex(base.digest.split(":")[1])
    oob = _frame([(1, 1, 0, n, base.size - 10)], [_stored(bytes(n))], n)
    _refused(_stream([oob], n, codec_id=2, base=braw), base=base, match="outside the base")
    q8_in_delta = _frame([(2, 4, 1, n, 0)], [_stored(bytes(4 * 4)) + _stored(bytes(n // 4))], n)
    _refused(_stream([q8_in_delta], n, codec_id=2, base=braw), base=base, match="q8")
    bad_scale = _frame([(2, 4, 1, n, 0)],
                       [_stored(np.array([np.nan] * 4, "<f4").tobytes()) + _stored(bytes(n // 4))],
                       n)
    _refused(_stream([bad_scale], n, codec_id=3, base=braw, qblock=256), base=base,
             match="scale")


def test_sub_parts_are_refused_in_a_version_1_stream_or_with_a_bad_itemsize():
    rec = _record(0, 3000)
    base = Base.from_payload(_raw(rec))
    braw = bytes.fromhex(base.digest.split(":")[1])
    n = 4096
    sub = [_stored(bytes(n // 4))] * 4
    ok = _frame([(3, 4, 0, n, 0)], [b"".join(sub)], n)
    assert bytes(decode_payload(_stream([ok], n, codec_id=2, base=braw, version=2),
                                base=base, threads=1))  # all-zero differences: the base
    _refused(_stream([ok], n, codec_id=2, base=braw, version=1), base=base, match="sub part")
    odd = _frame([(3, 1, 0, n, 0)], [_stored(bytes(n))], n)
    _refused(_stream([odd], n, codec_id=2, base=braw, version=2), base=base, match="sub part")
    typed = _frame([(3, 4, 1, n, 0)], [b"".join(sub)], n)
    _refused(_stream([typed], n, codec_id=2, base=braw, version=2), base=base,
             match="descriptor")
    _refused(_stream([ok], n, codec_id=2, base=braw, version=3), base=base,
             match="upgrade flwr-transports")


_F32_BITS = st.one_of(st.integers(0, 2**32 - 1),
                      st.sampled_from([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001,
                                       0xFFFFFFFF, 1, 0x80000001, 0x007FFFFF, 0x3F800000]))
_F16_BITS = st.one_of(st.integers(0, 2**16 - 1),
                      st.sampled_from([0, 0x8000, 0x7C00, 0xFC00, 0x7E01, 0xFFFF, 1, 0x8001]))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(_F32_BITS, _F32_BITS), min_size=1, max_size=3000),
       st.lists(st.tuples(_F16_BITS, _F16_BITS), min_size=1, max_size=3000))
def test_sub_coding_is_exact_for_every_bit_pattern(f32, f16):
    """delta codes little-endian floats as the difference of their ordered bit patterns:
    exact for any pair of patterns (NaN payloads, infinities, -0.0, subnormals, a sign
    change, the extremes) in float32, float16 and bfloat16 (torch raw bytes)."""
    # tiled past SMALL (16 KiB): smaller arrays are coded as plain bytes, not as sub
    b32, n32 = (np.resize(np.array(x, "<u4"), 4 * 1024 + 7).view("<f4")
                for x in zip(*f32, strict=True))
    b16, n16 = (np.resize(np.array(x, "<u2"), 8 * 1024 + 3) for x in zip(*f16, strict=True))

    def rec(a32, a16):
        return ArrayRecord({"f32": Array(a32), "f16": Array(a16.view("<f2")),
                            "bf16": Array(dtype="torch.bfloat16", shape=(len(a16),),
                                          stype="torch.raw", data=a16.tobytes())})
    base = Base.from_payload(_raw(rec(b32, b16)))
    p = _raw(rec(n32, n16))
    wire = encode(p, "delta", base=base, window=SMALL_WINDOW).to_bytes()
    assert bytes(decode_payload(wire, base=base, verify=True, threads=1)) == p.to_bytes()
    raw = p.to_bytes()
    assert S.K_SUB in {r.kind for r in S._plan(codec.read_header(lambda o, n: raw[o: o + n], p.size), p.size,
                                               base, "delta")}


def test_delta_codes_float_arrays_as_differences():
    """The float arrays of a delta go as ``sub`` parts (kind 3) in a version-2 stream,
    and a small update costs fewer bytes than XOR would (the coder's reason to exist)."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal(200_000) * 0.02).astype("<f4")
    upd = w + (rng.standard_normal(w.size) * 1e-4).astype("<f4")
    base = Base.from_payload(_raw(ArrayRecord({"w": Array(w)})))
    p = _raw(ArrayRecord({"w": Array(upd)}))
    wire = encode(p, "delta", base=base).to_bytes()
    info = read_info(lambda o, n: wire[o: o + n], len(wire))
    assert info.version == 2
    frame = wire[info.offsets[0]:]
    kinds = {S._PD.unpack_from(frame, S._WH.size + S._PD.size * i)[0]
             for i in range(S._WH.unpack_from(frame, 0)[1])}
    assert S.K_SUB in kinds
    old = S._plan  # the same payload with every sub part coded as XOR instead

    def xor_plan(*a):
        return [S._Part(S.K_XOR if r.kind == S.K_SUB else r.kind, r.itemsize, r.start,
                        r.length, r.base_off) for r in old(*a)]
    S._plan = xor_plan
    try:
        xor_wire = encode(p, "delta", base=base).to_bytes()
    finally:
        S._plan = old
    assert bytes(decode_payload(xor_wire, base=base, verify=True)) == p.to_bytes()
    assert len(wire) < 0.97 * len(xor_wire), (len(wire), len(xor_wire))


def _valid_wire() -> tuple[bytes, bytes, Base]:
    rec = _record(0, 20_000)
    base = Base.from_payload(_raw(rec))
    p = _raw(_trained(rec, 4, {"x_float32", "torch_bf16", "x_int32"}))
    return encode(p, "delta", base=base, window=SMALL_WINDOW).to_bytes(), p.to_bytes(), base


_WIRE, _PLAIN, _BASE = _valid_wire()
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(_WIRE) - 1), st.integers(0, 255)),
                min_size=1, max_size=8),
       st.one_of(st.none(), st.integers(0, len(_WIRE))))
def test_fuzz_mutated_streams_decode_exactly_or_are_refused(flips, cut):
    """Any byte changes and/or truncation: either PayloadError, or (a change the coder
    does not read) exactly the original payload; never another exception, never more
    memory than a few windows."""
    wire = bytearray(_WIRE)
    for pos, val in flips:
        wire[pos] = val
    if cut is not None:
        del wire[cut:]
    tracemalloc.start()
    try:
        try:
            out = decode_payload(bytes(wire), base=_BASE, verify=True, threads=1)
        except PayloadError:
            out = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if out is not None and bytes(out) != _PLAIN:
        # the magic itself was hit: it reads as a raw payload, which the payload
        # decoder refuses in turn
        assert not is_encoded(bytes(wire))
        with pytest.raises(PayloadError):
            codec.decode_bytes(out, None)
    assert peak < len(_PLAIN) + 8 * SMALL_WINDOW + 2 * len(_WIRE)


@FUZZ
@given(st.binary(min_size=0, max_size=600).map(lambda b: b"FTXZ" + b))
def test_fuzz_random_streams_are_refused(data):
    with pytest.raises(PayloadError):
        decode_payload(data, threads=1)


_FIELDS = ["4s", "B", "B", "H", "I", "I", "Q", "32s", "32s"]


@FUZZ
@given(st.integers(1, len(_FIELDS) - 1), st.integers(0, 2**64 - 1))
def test_fuzz_header_fields(i, value):
    """Each stream-header field (version, codec, qblock, window, nwin, size, content and
    base digests) set to any value: refused unless it is the true one."""
    fmt = "<" + "".join(_FIELDS)
    vals = list(struct.unpack(fmt, _WIRE[: S.STREAM_HEADER]))
    orig = vals[i]
    if isinstance(orig, bytes):
        vals[i] = value.to_bytes(8, "little") * 4
    else:
        vals[i] = value % (1 << (8 * struct.calcsize("<" + _FIELDS[i])))
    wire = struct.pack(fmt, *vals) + _WIRE[S.STREAM_HEADER:]
    try:
        out = decode_payload(wire, base=_BASE, verify=True, threads=1)
    except PayloadError:
        return
    assert vals[i] == orig and bytes(out) == _PLAIN


# ----------------------------------------------------------------- q8


@pytest.mark.parametrize("dt", ["float32", "float16", "bfloat16"])
def test_q8_roundtrip_error_is_bounded_by_half_a_step(dt):
    rng = np.random.default_rng(0)
    n = 10_000
    b = (rng.standard_normal(n) * 0.02).astype(np.float32)
    x = b + (rng.standard_normal(n) * 1e-3).astype(np.float32)
    if dt == "bfloat16":
        bb, xb = q8mod.from_f32(b, q8mod.BF16), q8mod.from_f32(x, q8mod.BF16)
        def mk(raw):
            return Array(dtype="torch.bfloat16", shape=(n,), stype="torch.raw",
                         data=raw.tobytes())
    else:
        bb = b.astype(dt).view(np.uint8)
        xb = x.astype(dt).view(np.uint8)
        def mk(raw):
            return Array(raw.view(dt))
    code = {"float32": q8mod.F32, "float16": q8mod.F16, "bfloat16": q8mod.BF16}[dt]
    base = Base.from_payload(_raw(ArrayRecord({"w": mk(bb), "i": Array(np.arange(10))})))
    p = _raw(ArrayRecord({"w": mk(xb), "i": Array(np.arange(10))}))
    fb = ErrorFeedback()
    e = encode(p, "q8", base=base, feedback=fb)
    wire = e.to_bytes()
    assert read_info(lambda o, n_: wire[o: o + n_], len(wire)).codec == "q8"
    out = decode_record(Decoder(lambda o, n_: wire[o: o + n_], len(wire), base=base))
    assert bytes(out["i"].data) == bytes(p.segments[2])  # non-float arrays stay exact
    got = q8mod.to_f32(np.frombuffer(out["w"].data[-len(xb):], np.uint8), code)
    want = q8mod.to_f32(xb, code)
    bf = q8mod.to_f32(bb, code)
    ulp = np.abs(want) * {"float32": 2**-23, "float16": 2**-10, "bfloat16": 2**-7}[dt]
    err = np.abs(got - want)
    bound = (np.abs(want - bf).max() / 127) * 0.5 + 2 * ulp + 1e-12
    assert (err <= bound).all()
    assert err.max() > 0  # it did quantise
    # the residual is what was not sent: (x + 0) - y, exactly
    r = fb.residual("w", n)
    np.testing.assert_array_equal(r, want - got)
    assert len(wire) < 0.3 * p.size * (4 / {"float32": 4, "float16": 2, "bfloat16": 2}[dt])


def test_q8_non_finite_values_stay_exact():
    b = np.zeros(1000, np.float32)
    x = np.linspace(-1, 1, 1000).astype(np.float32)
    x[500] = np.inf
    x[3] = np.nan
    base = Base.from_payload(_raw(ArrayRecord({"w": Array(b)})))
    p = _raw(ArrayRecord({"w": Array(x)}))
    wire = encode(p, "q8", base=base, feedback=ErrorFeedback()).to_bytes()
    assert bytes(decode_payload(wire, base=base)) == p.to_bytes()


def _quadratic():
    """3 clients, f_k(w) = 1/2 sum_i d_i (w_i - t_ki)^2 over 1024 coordinates: even ones
    stiff (d = 1) with targets that differ a lot between clients (scale 10), odd ones
    soft (d = 0.05, scale 1). The optimum of sum_k f_k is the mean of the t_k."""
    rng = np.random.default_rng(7)
    dim, k = 1024, 3
    stiff = np.arange(dim) % 2 == 0
    d = np.where(stiff, 1.0, 0.05).astype(np.float32)
    t = (np.where(stiff, 10.0, 1.0) * rng.standard_normal((k, dim))).astype(np.float32)
    return d, t, stiff


def _fed_quadratic(use_q8: bool, feedback: bool, rounds: int, tail: int) -> np.ndarray:
    """FedAvg, one local gradient step (lr 1) per client and round, through real payloads
    (q8: encode against the global model, decode against it); returns the mean of the
    global model over the last ``tail`` rounds."""
    d, t, _ = _quadratic()
    k, dim = t.shape
    w = np.zeros(dim, np.float32)
    acc = np.zeros(dim)
    fbs = [ErrorFeedback() if feedback else None for _ in range(k)]
    for r in range(rounds):
        base = Base.from_payload(_raw(ArrayRecord({"w": Array(w)})))
        got = []
        for c in range(k):
            local = (w - d * (w - t[c])).astype(np.float32)
            p = _raw(ArrayRecord({"w": Array(local)}))
            if use_q8:
                wire = encode(p, "q8", base=base, feedback=fbs[c], threads=1).to_bytes()
            else:
                wire = p.to_bytes()
            got.append(codec.decode_bytes(decode_payload(wire, base=base, threads=1),
                                          None)["w"].numpy())
        w = np.mean(got, axis=0).astype(np.float32)
        if r >= rounds - tail:
            acc += w
    return acc / tail


def test_q8_error_feedback_converges_on_a_quadratic():
    """Stated tolerance: over rounds 200-300 the mean global model with q8 + error
    feedback is within 2e-3 (relative L2) of the exact optimum, and its soft coordinates
    within 1e-2 (raw: ~1e-6). Without error feedback the soft coordinates' updates stay
    below half a quantisation step of their block (the stiff ones, which disagree
    between clients, set the scale) and never move: > 10x further away, and the soft
    coordinates > 0.5 away."""
    _, t, stiff = _quadratic()
    w_star = t.astype(np.float64).mean(0)  # equal curvatures across clients

    def rel(w, sel=slice(None)):
        return float(np.linalg.norm((w - w_star)[sel]) / np.linalg.norm(w_star[sel]))

    raw = _fed_quadratic(False, False, 300, 100)
    ef = _fed_quadratic(True, True, 300, 100)
    no_ef = _fed_quadratic(True, False, 300, 100)
    assert rel(raw) < 1e-5
    assert rel(ef) < 2e-3 and rel(ef, ~stiff) < 1e-2, (rel(ef), rel(ef, ~stiff))
    assert rel(no_ef) > 10 * rel(ef) and rel(no_ef, ~stiff) > 0.5, (rel(no_ef), rel(ef))


# ----------------------------------------------------------------- through offload()
# the ServerApp's wrapper and the ClientApp's payload_mod, real links, the in-process
# grid (tests/inproc.py); the real deployment: tests/integration/test_codecs_deployment.py


def _offload_run(transport, codec, strategy=None, rounds=2, grid=None, **opts):
    from apps_inproc import initial_arrays, make_app
    from flwr.serverapp.strategy import FedAvg
    from inproc import InProcessGrid

    from flwr_transports import offload

    s = offload(strategy or FedAvg(), transport=transport, codec=codec, aggregation="inner",
                **opts)
    g = grid or InProcessGrid(make_app())
    res = s.start(g, initial_arrays(), num_rounds=rounds)
    return s, res, g


def _same_arrays(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for x, y in zip(a.to_numpy_ndarrays(), b.to_numpy_ndarrays(), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def _strategy_matrix():
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideFixedClipping,
        FedAdam,
        FedAvg,
        FedProx,
    )
    return {
        "fedavg": lambda: FedAvg(),
        "fedprox": lambda: FedProx(proximal_mu=0.1),
        "fedadam": lambda: FedAdam(eta=0.05),
        "dp-fixed": lambda: DifferentialPrivacyServerSideFixedClipping(
            FedAvg(), noise_multiplier=0.0, clipping_norm=1e6, num_sampled_clients=2),
    }


@pytest.mark.parametrize("name", list(_strategy_matrix()))
def test_offload_lossless_and_delta_change_no_bit(name, tmp_path):
    """The strategy matrix with codec=lossless and codec=delta: the same global model as
    raw, to the bit; the links carried fewer bytes; nothing was rejected."""
    mk = _strategy_matrix()[name]
    for transport in ("shm://", f"file://{tmp_path}"):
        s_raw, raw, _ = _offload_run(transport, "raw", mk())
        for cname in ("lossless", "delta"):
            s, res, grid = _offload_run(transport, cname, mk())
            _same_arrays(raw.arrays, res.arrays)
            assert s.stats["replies_rejected"] == 0
            assert s.stats["link_bytes_sent"] < 0.95 * s_raw.stats["link_bytes_sent"]
            assert s.stats["link_bytes_received"] < s_raw.stats["link_bytes_received"]
            refs = [json.loads(m.content["arrays"]["__flwr_transports_ref__"].data)
                    for m in grid.sent if m.metadata.message_type == "train"]
            assert refs and all(r["codec"] == "lossless" for r in refs)  # downlink
            tickets = [json.loads(m.content["flwr_transports.ticket"]["ticket"])
                       for m in grid.sent if m.metadata.message_type == "train"]
            assert all(t["codec"] == cname for t in tickets)
    assert not list(tmp_path.iterdir())


def test_offload_q8_is_close_and_keeps_residuals_in_context_state():
    from flwr_transports.codecs.wire import FEEDBACK_STATE_KEY, load_feedback

    s_raw, raw, _ = _offload_run("shm://", "raw", rounds=3)
    s, res, grid = _offload_run("shm://", "q8", rounds=3)
    assert s.stats["replies_rejected"] == 0
    # replies are int8 updates: about a quarter of the float32 reply bytes
    assert s.stats["link_bytes_received"] < 0.35 * s_raw.stats["link_bytes_received"]
    for x, y in zip(raw.arrays.to_numpy_ndarrays(), res.arrays.to_numpy_ndarrays(),
                    strict=True):
        assert x.dtype == y.dtype
        if x.dtype == np.float32:
            # the updates are +0.25/+0.5 everywhere: within a block they are equal, so
            # q8 carries them to float rounding
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
        else:  # float64 and int64 are not quantised: exact (delta)
            assert np.array_equal(x, y)
    for ctx in grid.contexts.values():  # each client kept its residuals for the next round
        assert FEEDBACK_STATE_KEY in ctx.state
        assert len(load_feedback(ctx.state)) == 1  # the float32 array


def test_codec_option_is_validated():
    from flwr.serverapp.strategy import FedAvg

    from flwr_transports import offload
    from flwr_transports.errors import ConfigError

    with pytest.raises(ConfigError, match="one of raw, lossless, delta, q8"):
        offload(FedAvg(), "shm://?codec=zip")
    s = offload(FedAvg(), "shm://?codec=DELTA")  # URL option, parsed once, any case
    assert s.codec == "delta" and s.streaming  # auto: the coded uploads are folded


from rdma_param import RDMA as _RDMA


@pytest.mark.parametrize("cname", ["lossless", "delta", "q8"])
@pytest.mark.parametrize("transport", ["shm", "file", "tcp", _RDMA])
def test_streaming_folds_coded_uploads(cname, transport, tmp_path):
    """Streaming aggregation folds the decoded uploads window by window (eagerly on
    landing where the link reports it): the same model as the inner strategy on the
    same codec (within the float rounding of a running sum), no reply rejected."""
    url = {"shm": "shm://", "file": f"file://{tmp_path}", "tcp": "tcp://127.0.0.1:0",
           "rdma": "rdma://127.0.0.1:0?chunk_size=256KiB"}[transport]
    _, r_in, _ = _offload_run(url, cname, rounds=2)
    from apps_inproc import initial_arrays, make_app
    from flwr.serverapp.strategy import FedAvg
    from inproc import InProcessGrid

    from flwr_transports import offload

    s = offload(FedAvg(), transport=url, codec=cname, aggregation="streaming")
    res = s.start(InProcessGrid(make_app()), initial_arrays(), num_rounds=2)
    assert s.stats["agg_streamed_rounds"] == 2 and s.stats["replies_rejected"] == 0
    assert s.stats["agg_eager_folds"] + s.stats["agg_settle_folds"] == 4
    assert s.stats["agg_rebuilds"] == 0
    for x, y in zip(r_in.arrays.to_numpy_ndarrays(), res.arrays.to_numpy_ndarrays(),
                    strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)
    assert not list(tmp_path.iterdir())


def test_a_coded_reply_in_a_raw_run_is_rejected():
    from flwr_transports.refs import is_ref_record, parse_ref_record

    def tamper(node, reply):
        if reply.has_content() and is_ref_record(reply.content.get("arrays")):
            ref = parse_ref_record(reply.content["arrays"])
            ref.codec = "lossless"
            reply.content["arrays"] = ref.to_record()
        return reply

    from apps_inproc import make_app
    from inproc import InProcessGrid

    s, _, _ = _offload_run("shm://", "raw", rounds=1,
                           grid=InProcessGrid(make_app(), tamper=tamper))
    assert s.stats["replies_rejected"] == 2


def test_ticket_and_reference_codec_fields_are_checked():
    from flwr.app import ConfigRecord

    from flwr_transports.refs import Reference, RefError, Ticket

    t = Ticket(id="x", scheme="shm", run=1, round=1, node=1, msg_type="train", max_size=10,
               threshold=1, codec="delta")
    assert Ticket.from_record(t.to_record()).codec == "delta"
    doc = json.loads(t.to_record()["ticket"])
    doc["codec"] = "zip9"
    with pytest.raises(RefError, match="upgrade"):
        Ticket.from_record(ConfigRecord({"ticket": json.dumps(doc)}))
    r = Reference(scheme="shm", loc={}, size=5, digest="sha256t:" + "0" * 64, codec="q8")
    assert Reference.from_json(r.to_json()).codec == "q8"
    assert Reference.from_json(Reference("shm", {}, 5, r.digest).to_json()).codec == "raw"
    bad = json.loads(r.to_json())
    bad["codec"] = ["lossless"]
    with pytest.raises(RefError):
        Reference.from_json(json.dumps(bad).encode())


def test_decode_from_wire_checks_digest_cap_and_base():
    from flwr_transports.codecs.wire import ServerBases, decode_from_wire, encode_for_wire

    rec = _record(0, 20_000)
    p = _raw(rec)
    bases = ServerBases()
    bases.add("r1", p)
    new = _raw(_trained(rec, 1, {"x_float32"}))
    wire, codec = encode_for_wire(new, "delta", base=bases.lookup(p.digest))
    assert codec == "delta"
    buf = wire.to_bytes()

    def read(off, n):
        return buf[off: off + n]

    out = decode_from_wire(read, len(buf), wire.digest, max_size=1 << 30,
                           lookup_base=bases.lookup)
    assert codec_digest(out) == new.digest
    with pytest.raises(PayloadError, match="digest mismatch"):  # over the wire bytes
        decode_from_wire(read, len(buf), p.digest, max_size=1 << 30, lookup_base=bases.lookup)
    with pytest.raises(PayloadError, match="over the limit"):  # decoded size, before decoding
        decode_from_wire(read, len(buf), wire.digest, max_size=new.size - 1,
                         lookup_base=bases.lookup)
    bases.drop("r1")  # a model the server no longer holds (or never sent)
    with pytest.raises(PayloadError, match="no base is held here"):
        decode_from_wire(read, len(buf), wire.digest, max_size=1 << 30,
                         lookup_base=bases.lookup)
    # a raw payload decodes as before; a stream that would not be smaller is not sent
    assert codec_digest(decode_from_wire(lambda o, n: p.to_bytes()[o: o + n], p.size,
                                         p.digest, max_size=1)) == p.digest
    tiny = _raw(ArrayRecord({"r": Array(np.random.default_rng(0).integers(
        0, 255, 5000).astype(np.uint8))}))
    assert encode_for_wire(tiny, "lossless") == (tiny, "raw")


def codec_digest(rec: ArrayRecord) -> str:
    return codec.encode(rec).digest


def test_inspect_lists_the_arrays_of_coded_payloads(tmp_path, capsys):
    from flwr_transports.inspect import main as inspect_main

    rec = _record(0, 2000)
    p = _raw(rec)
    base_file = tmp_path / "base.ftx"
    base_file.write_bytes(p.to_bytes())
    new = _raw(_trained(rec, 3, {"x_float32"}))
    lossless = encode(new, "lossless")
    delta = encode(new, "delta", base=Base.from_payload(p))
    (tmp_path / "l.ftx").write_bytes(lossless.to_bytes())
    (tmp_path / "d.ftx").write_bytes(delta.to_bytes())
    assert inspect_main([str(tmp_path / "l.ftx"), "--digest", lossless.digest]) == 0
    out = capsys.readouterr().out
    assert "coded payload: codec lossless" in out and "digest OK" in out
    assert f"{len(rec)} arrays" in out
    assert inspect_main([str(tmp_path / "d.ftx")]) == 0
    assert "pass --base FILE" in capsys.readouterr().out
    assert inspect_main([str(tmp_path / "d.ftx"), "--base", str(base_file)]) == 0
    assert f"{len(rec)} arrays" in capsys.readouterr().out
    # against another base: refused
    (tmp_path / "other.ftx").write_bytes(_raw(_record(9, 2000)).to_bytes())
    assert inspect_main([str(tmp_path / "d.ftx"), "--base", str(tmp_path / "other.ftx")]) == 1
    assert "no base is held here" in capsys.readouterr().out


def test_streaming_falls_back_to_decoded_coded_uploads():
    """Replies laid out unlike the model sent cannot be folded: the round is aggregated
    from the coded uploads already open, decoded (wire digest checked)."""
    from apps_inproc import initial_arrays
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import FedAvg
    from inproc import InProcessGrid

    from flwr_transports import offload, payload_mod

    app = ClientApp(mods=[payload_mod])

    @app.train()
    def _train(msg, ctx):
        arrs = [a + 0.5 for a in msg.content["arrays"].to_numpy_ndarrays()]
        arrs.append(np.ones(10, np.float32))  # one array more than the model sent
        return Message(RecordDict({"arrays": ArrayRecord(arrs),
                                   "metrics": MetricRecord({"num-examples": 3})}),
                       reply_to=msg)

    @app.evaluate()
    def _evaluate(msg, ctx):
        return Message(RecordDict({"metrics": MetricRecord({"loss": 1.0, "num-examples": 1})}),
                       reply_to=msg)

    out = {}
    for agg in ("inner", "streaming"):
        s = offload(FedAvg(), transport="shm://", codec="delta", aggregation=agg)
        out[agg] = (s, s.start(InProcessGrid(app), initial_arrays(), num_rounds=1))
    s, res = out["streaming"]
    assert s.stats["replies_rejected"] == 0 and s.stats["agg_streamed_rounds"] == 0
    _same_arrays(out["inner"][1].arrays, res.arrays)

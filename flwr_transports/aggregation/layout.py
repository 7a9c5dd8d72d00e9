"""Where each array's elements lie in an encoded reply payload, and how they fold.

A payload (see :mod:`flwr_transports.codec`) is a safetensors header followed by each
Flower ``Array.data`` back to back; for ``stype == "numpy.ndarray"`` that data is a
``.npy`` file: a small header, then the elements in storage order. :func:`plan_payload`
reads ONLY the headers (bounded, validated: this is network input) and returns a
:class:`Plan`: per array, the byte range of its elements, the dtype they are read as,
and the dtypes Flower's FedAvg would produce; plus the weight the client claimed (put
in the payload metadata by ``payload_mod``) and the header bytes it planned from
("pins"; the fold checks that the bytes it hashes there are the same, so a payload
rewritten after planning cannot be folded with a stale layout).
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from ..codec import MAX_ARRAYS, PayloadError, read_header  # noqa: F401 - MAX_ARRAYS re-exported

#: payload metadata key of the weight the client claims (value of weighted_by_key)
WEIGHT_META = "flwr_transports.weight"
NPY_STYPE = "numpy.ndarray"
#: stype of the arrays of a stub ArrayRecord that stands for a model the shard owners of
#: ``aggregation=ray`` wrote to the store (:mod:`.ray_publish`): names, dtypes and shapes,
#: no data; the offload wrapper hands out its reference (its arrays are NumPy arrays)
OWNED_STYPE = "flwr_transports.owned (aggregation=ray: the model is in the store)"
MAX_NPY_HEADER = 64 * 1024
NPY_PEEK = 256  # bytes read first at each array (its .npy header, usually 128)


class Unfoldable(ValueError):
    """A well-formed payload the streaming fold does not handle (the wrapper then lets
    the inner strategy aggregate the round from decoded replies, as Flower would)."""


@dataclass
class ArrayPlan:
    name: str
    dtype: str  # Flower's Array.dtype string
    shape: tuple[int, ...]
    stype: str
    start: int  # absolute offset of Array.data in the payload
    data_start: int  # first element byte
    end: int  # end of Array.data
    in_dtype: np.dtype  # how the stored elements are read
    fortran: bool
    kind: str  # "same" (fold in the stored dtype), "cast" (accumulate wider), "bf16"
    acc_dtype: np.dtype
    out_dtype: np.dtype | None  # None for bf16 (written back as the input's bytes)
    npy_header: bytes

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.in_dtype.itemsize

    def signature(self) -> tuple:
        return (self.name, self.dtype, self.shape, self.stype, self.in_dtype.str, self.fortran)


@dataclass
class Plan:
    size: int
    base: int  # end of the safetensors header
    arrays: list[ArrayPlan]
    weight: float | int | None
    pins: dict[int, bytes] = field(default_factory=dict)  # offset -> bytes planned from

    def signature(self) -> tuple:
        return tuple(a.signature() for a in self.arrays)

    def segments(self) -> list[tuple[int, int, int]]:
        """``(start, end, k)`` covering ``[0, size)``: k = -1 for pinned header bytes,
        else the index of the array whose elements lie there."""
        segs = [(0, self.base, -1)]
        for k, a in enumerate(self.arrays):
            if a.data_start > a.start:
                segs.append((a.start, a.data_start, -1))
            if a.end > a.data_start:
                segs.append((a.data_start, a.end, k))
        return segs


def _fold_dtypes(in_dtype: np.dtype, flower_dtype: str) -> tuple[str, np.dtype, np.dtype | None]:
    """(kind, accumulator dtype, output dtype) for arrays stored as ``in_dtype``.

    The output dtype is what Flower's ``aggregate_arrayrecords`` yields
    (``x.numpy() * float`` under NumPy's weak-scalar rules: floats and complex keep
    their dtype, integers and bool become float64); float16 accumulates in float32.
    """
    if flower_dtype == "bfloat16":
        if in_dtype.itemsize == 2 and in_dtype.kind in "uiV" and in_dtype.byteorder in "<=|":
            return "bf16", np.dtype(np.float32), None
        raise Unfoldable(f"bfloat16 array stored as {in_dtype.str}")
    if in_dtype.hasobject or in_dtype.kind not in "biufc" or in_dtype.fields is not None:
        raise Unfoldable(f"dtype {in_dtype.str} is not averaged by FedAvg")
    if in_dtype.kind == "f" and in_dtype.itemsize > 8:
        raise Unfoldable(f"dtype {in_dtype.str} (extended precision) is not streamed")
    out = np.result_type(np.zeros(0, in_dtype), 1.0).newbyteorder("=")
    if out.kind == "f" and out.itemsize < 4:
        return "cast", np.dtype(np.float32), out
    if in_dtype == out and in_dtype.isnative:
        return "same", out, out
    return "cast", out, out


def _parse_npy(head: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    f = io.BytesIO(head)
    try:
        major, minor = np.lib.format.read_magic(f)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif major in (2, 3) and minor == 0:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy version {major}.{minor}")
    except (ValueError, SyntaxError, TypeError, EOFError, struct.error) as exc:
        raise PayloadError(f"malformed .npy header: {exc}") from None
    return dtype, tuple(int(s) for s in shape), bool(fortran), f.tell()


def _npy_header_len(prefix: bytes) -> int:
    """Total .npy header length from its first 12 bytes."""
    if len(prefix) < 10 or prefix[:6] != b"\x93NUMPY":
        raise PayloadError("array data is not a .npy file")
    major = prefix[6]
    if major == 1:
        return 10 + struct.unpack("<H", prefix[8:10])[0]
    if major in (2, 3) and len(prefix) >= 12:
        return 12 + struct.unpack("<I", prefix[8:12])[0]
    raise PayloadError(f"unsupported .npy version {major}")


def _read(read, off: int, n: int) -> bytes:
    b = bytes(read(off, n))
    if len(b) != n:
        raise PayloadError(f"short read at offset {off}: wanted {n}, got {len(b)}")
    return b


def _predicted_npy(dtype: str, shape: tuple[int, ...], length: int) -> bytes | None:
    """The ``.npy`` header an array of Flower dtype ``dtype`` and ``shape`` whose
    ``Array.data`` has ``length`` bytes would carry (C order), if that fits exactly."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return None
    if dt.hasobject or dt.kind not in "biufc":
        return None
    try:
        h = npy_header(dt, shape, False)
    except (ValueError, TypeError):
        return None
    return h if len(h) + math.prod(shape) * dt.itemsize == length else None


def plan_payload(read, size: int, predict: bool = False) -> Plan:
    """Read and validate the headers of a ``size``-byte payload (``read(off, n)``).

    Raises PayloadError for a malformed payload and :class:`Unfoldable` for a valid
    one the fold does not handle (non-numpy arrays, object or string dtypes, ...).

    ``predict``: an array's ``.npy`` header is not read but predicted from its dtype
    and shape (what ``np.save`` writes) where that fits its length exactly; it is
    pinned like every header byte, so the fold checks it when it reads that window (an
    upload that is still arriving is planned from its first bytes alone).
    """
    head = read_header(read, size)  # the one header parser (bounded, validated)
    wraw = head.meta.get(WEIGHT_META)
    weight = None
    if wraw is not None:
        try:
            weight = json.loads(wraw) if isinstance(wraw, str) and len(wraw) < 64 else None
        except ValueError:
            weight = None
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
                math.isfinite(weight)):
            weight = None  # no usable claim: folded once the in-band weight is known
    plan = Plan(size=size, base=head.base, arrays=[], weight=weight, pins={0: head.raw})
    for e in head.arrays:
        name, dtype, shape, stype, start, stop = (e.name, e.dtype, e.shape, e.stype,
                                                  e.start, e.end)
        if stype != NPY_STYPE:
            raise Unfoldable(f"array {name!r} has stype {stype!r}")
        npy = _predicted_npy(dtype, shape, stop - start) if predict else None
        if npy is not None:
            hl = len(npy)
        else:
            # one read for the usual header (np.save pads it to 128 bytes), a second
            # only for a longer one: each read may be a round trip to a store
            npy = _read(read, start, min(NPY_PEEK, stop - start))
            hl = _npy_header_len(npy[:12])
            if hl > MAX_NPY_HEADER or start + hl > stop:
                raise PayloadError(f"array {name!r} has an invalid .npy header length")
            npy = npy[:hl] if hl <= len(npy) else _read(read, start, hl)
        in_dtype, nshape, fortran, used = _parse_npy(npy)
        if used != hl:
            raise PayloadError(f"array {name!r}: .npy header length mismatch")
        if nshape != shape:
            raise PayloadError(f"array {name!r}: .npy shape {nshape} != declared {shape}")
        if math.prod(shape) * in_dtype.itemsize != stop - start - hl:
            raise PayloadError(f"array {name!r}: data length does not match its shape")
        kind, acc, out = _fold_dtypes(in_dtype, dtype)
        plan.pins[start] = npy
        plan.arrays.append(ArrayPlan(
            name=name, dtype=dtype, shape=shape, stype=stype, start=start,
            data_start=start + hl, end=stop, in_dtype=in_dtype, fortran=fortran, kind=kind,
            acc_dtype=acc, out_dtype=out, npy_header=npy))
    return plan


def layout_of(plan: Plan) -> tuple:
    """What must match the model the server sent: per array (name, shape, stype), in
    name order. The dtype may differ (FedAvg turns an int64 model into float64, and a
    client may send its own dtype back): the accumulator is then at most 16 bytes per
    element of the model the server sent, never sized by the upload."""
    return tuple(sorted((a.name, a.shape, a.stype) for a in plan.arrays))


def expected_layout(record) -> tuple | None:
    """:func:`layout_of` for the replies to ``record`` (an ``ArrayRecord``: the model
    the server sent), or None when it cannot be streamed. The streaming fold sizes its
    accumulator only from an upload whose layout equals this: never from bytes that
    no check has passed (a hostile upload of cap size in a narrow dtype would
    otherwise allocate an accumulator many times the model's size)."""
    try:
        out = [(name, tuple(arr.shape), NPY_STYPE if arr.stype == OWNED_STYPE else arr.stype)
               for name, arr in record.items()]
    except (AttributeError, TypeError, ValueError):
        return None
    if any(stype != NPY_STYPE for _, _, stype in out):
        return None
    return tuple(sorted(out))


def npy_header(dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> bytes:
    """The ``.npy`` header ``np.save`` (hence Flower's ``Array``) writes for an array."""
    bio = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran,
         "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(bio, d)
    except ValueError:  # header too long for version 1.0
        np.lib.format.write_array_header_2_0(bio, d)
    return bio.getvalue()

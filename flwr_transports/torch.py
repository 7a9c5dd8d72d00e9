"""PyTorch state_dicts of any dtype (bfloat16, float8, complex, bool, ints) as ArrayRecords.

Flower's own ``Array(tensor)`` converts through ``tensor.numpy()``, which fails for
``torch.bfloat16`` and the float8 types (numpy has no such dtypes), and upcasting a
bf16 checkpoint to float32 doubles every byte on every link. This module carries each
tensor as its raw bytes instead:

===============  =====================================================================
``Array.stype``  ``"torch.raw"`` (:data:`TORCH_RAW_STYPE`)
``Array.dtype``  the torch dtype as ``str(dtype)``, e.g. ``"torch.bfloat16"``
                 (:data:`BF16`); the accepted names are :data:`TORCH_DTYPES`
``Array.shape``  the tensor's shape (``()`` for a 0-d tensor)
``Array.data``   the tensor's elements, C order, little-endian, exactly
                 ``numel * element_size`` bytes (no header)
===============  =====================================================================

The codec (``flwr_transports.codec``) and Flower's in-band serialization carry these
Arrays unchanged, so they work with and without :func:`flwr_transports.offload`.

**Copies.** By default :func:`state_dict_to_arrays` copies each tensor's bytes once
into a ``bytes`` object, which every Flower path accepts (protobuf for ``context.state``,
pickling in the Ray simulation runtime, ``copy.deepcopy``). With ``copy=False`` it does
not copy a contiguous CPU tensor: the Array's ``data`` is a ``memoryview`` of the
tensor's memory (which it keeps alive). Use that for a record that goes straight into
a Message (Flower's gRPC path and :func:`flwr_transports.offload` take any buffer), not
for ``context.state`` or the Ray simulation (they need ``bytes``), and do not modify the
tensors until the message is sent. Non-contiguous, GPU and conjugate/negative-view
tensors are first copied to a contiguous CPU tensor.
:func:`arrays_to_state_dict` returns tensors that share memory with the Arrays' bytes
(``torch.frombuffer``, no copy) unless ``copy=True``: ``model.load_state_dict(...)``
copies them into the parameters, which is the intended use; do not modify them in
place (they alias the record's ``bytes``).

**Flower's strategies.** Flower's built-in strategies aggregate with ``Array.numpy()``.
For a ``torch.raw`` Array that raises ``TypeError: Unsupported serialization type for
numpy conversion: 'torch.raw'``, and the dtype string (``"torch.bfloat16"``) is one
numpy cannot parse, so nothing reinterprets the bits silently. Two ways to aggregate:

* *upcast path*: wrap the strategy, ``offload(upcast(FedAvg()), transport=...)``.
  The transfers stay bf16; :class:`UpcastStrategy` converts each reply's ``torch.raw``
  arrays to numpy (bf16/float8 -> float32, complex32 -> complex64, others unchanged)
  before the strategy aggregates, and rounds the strategy's result back to the dtypes
  the clients sent (round to nearest even). The same helpers are public:
  :func:`to_numpy_record` and :func:`from_numpy_record`.
* the streaming aggregator accumulates ``torch.raw`` bf16 in float32 and writes bf16;
  it recognises the Arrays by :data:`TORCH_RAW_STYPE` and :data:`BF16`, and can use
  :func:`bf16_to_float32` / :func:`float32_to_bf16` (numpy only, no torch needed).

torch is optional (``pip install "flwr-transports[torch]"``); it is imported only when
a function that needs it is called.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message
from flwr.serverapp.strategy import Strategy

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

log = logging.getLogger("flwr_transports")
#: Error code of replies ``upcast()`` rejected (the same as ``offload``'s rejections)
REJECTED_REPLY_CODE = 0x4654

#: ``Array.stype`` of a tensor carried as raw bytes by this module.
TORCH_RAW_STYPE = "torch.raw"
#: Prefix of every ``Array.dtype`` this module writes (``str(torch_dtype)``).
DTYPE_PREFIX = "torch."
#: ``Array.dtype`` of a bfloat16 tensor.
BF16 = "torch.bfloat16"
#: The torch dtype names (after ``torch.``) accepted in ``Array.dtype``, with their
#: element sizes in bytes. Only those the installed torch has are usable. Quantized and
#: sub-byte dtypes are not carried (they need more than bytes + shape).
TORCH_DTYPES: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 4, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
}
#: Torch dtype name -> the numpy dtype :func:`to_numpy_record` converts it to.
NUMPY_OF: dict[str, str] = {
    "bool": "bool", "uint8": "uint8", "int8": "int8", "int16": "int16", "int32": "int32",
    "int64": "int64", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "float16": "float16", "float32": "float32", "float64": "float64",
    "complex64": "complex64", "complex128": "complex128", "complex32": "complex64",
    "bfloat16": "float32", "float8_e4m3fn": "float32", "float8_e4m3fnuz": "float32",
    "float8_e5m2": "float32", "float8_e5m2fnuz": "float32", "float8_e8m0fnu": "float32",
}
_INSTALL_HINT = (
    "flwr_transports.torch needs PyTorch: install a CPU build, e.g. "
    "`pip install torch --index-url https://download.pytorch.org/whl/cpu`, "
    'or `pip install "flwr-transports[torch]"`'
)


def _torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - exercised only without torch
        raise ImportError(_INSTALL_HINT) from err
    return torch


def _check_byteorder() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise NotImplementedError("torch.raw Arrays are little-endian; this host is big-endian")


def dtype_name(dtype: _torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; raises ValueError for a dtype not carried."""
    s = str(dtype)
    name = s.removeprefix(DTYPE_PREFIX)
    if name not in TORCH_DTYPES:
        raise ValueError(f"tensors of dtype {s} cannot be carried as raw bytes "
                         f"(supported: {', '.join(TORCH_DTYPES)})")
    return name


def _parse_dtype(array_dtype: str):
    """``"torch.bfloat16"`` -> ``torch.bfloat16``, refusing anything else."""
    torch = _torch()
    if not (isinstance(array_dtype, str) and array_dtype.startswith(DTYPE_PREFIX)):
        raise ValueError(f"not a torch dtype string: {array_dtype!r}")
    name = array_dtype[len(DTYPE_PREFIX):]
    dt = getattr(torch, name, None) if name in TORCH_DTYPES else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(  # noqa: TRY004 - bad data, not a bad argument type
            f"unsupported torch dtype {array_dtype!r} in a {TORCH_RAW_STYPE} Array")
    return dt


def is_torch_raw(arr: Array) -> bool:
    """Whether ``arr`` was written by this module (``stype == "torch.raw"``)."""
    return arr.stype == TORCH_RAW_STYPE


def tensor_to_array(tensor: _torch.Tensor, *, copy: bool = True) -> Array:
    """One tensor as a ``torch.raw`` Array (see the module docstring for the layout and
    for what ``copy=False`` allows)."""
    torch = _torch()
    _check_byteorder()
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"only dense tensors can be carried, got layout {tensor.layout}")
    name = dtype_name(tensor.dtype)
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_complex():
        t = t.resolve_conj()
    t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    shape = tuple(int(s) for s in t.shape)
    if t.numel() == 0:
        data: bytes | memoryview = b""
    else:
        # A flat uint8 view of the same memory; numpy keeps the tensor alive and
        # exposes the buffer protocol that torch tensors lack.
        raw = t.reshape(-1).view(torch.uint8).numpy()
        data = raw.tobytes() if copy else memoryview(raw).cast("B")
    arr = Array(dtype=DTYPE_PREFIX + name, shape=shape, stype=TORCH_RAW_STYPE, data=b"")
    arr.data = data  # Array() insists on bytes; Flower and the codec take any buffer
    return arr


def state_dict_to_arrays(state_dict: Mapping[str, _torch.Tensor], *,
                         copy: bool = True) -> ArrayRecord:
    """A state_dict (name -> tensor, any supported dtype) as an ArrayRecord of
    ``torch.raw`` Arrays, in the state_dict's order. Each Array owns a ``bytes`` copy;
    ``copy=False``: memoryviews of contiguous CPU tensors, no copy (see the module
    docstring for where those can go)."""
    rec = ArrayRecord()
    for key, tensor in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {type(key).__name__}")
        rec[key] = tensor_to_array(tensor, copy=copy)
    return rec


def _writable(a: np.ndarray) -> np.ndarray:
    return a if a.flags.writeable else a.copy()


def array_to_tensor(arr: Array, *, copy: bool = False) -> _torch.Tensor:
    """One Array as a tensor: ``torch.raw`` bit-exactly; a ``numpy.ndarray`` Array (what
    Flower's own ``Array(...)`` writes) through ``torch.from_numpy``.

    Raises ValueError when the dtype is unknown or the byte count does not match the
    shape (bytes from the network are not trusted)."""
    torch = _torch()
    if arr.stype != TORCH_RAW_STYPE:
        return torch.from_numpy(_writable(arr.numpy()))
    _check_byteorder()
    dt = _parse_dtype(arr.dtype)
    shape = arr.shape
    if not all(isinstance(s, int) and s >= 0 for s in shape) or len(shape) > 64:
        raise ValueError(f"bad shape {shape!r} in a {TORCH_RAW_STYPE} Array")
    want = math.prod(shape) * TORCH_DTYPES[arr.dtype[len(DTYPE_PREFIX):]]
    data = arr.data
    n = memoryview(data).nbytes
    if n != want:
        raise ValueError(f"{TORCH_RAW_STYPE} Array of dtype {arr.dtype} and shape {tuple(shape)} "
                         f"needs {want} bytes, has {n}")
    if n == 0:
        return torch.empty(shape, dtype=dt)
    with warnings.catch_warnings():
        # frombuffer warns that bytes are not writable: the tensor is meant to be
        # read (load_state_dict copies it); copy=True gives a writable one.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8)
    aligned = flat.data_ptr() % TORCH_DTYPES[arr.dtype[len(DTYPE_PREFIX):]] == 0
    if copy or not aligned:
        flat = flat.clone()
    return flat.view(dt).reshape(shape)


def arrays_to_state_dict(record: ArrayRecord, *, copy: bool = False) -> dict[str, _torch.Tensor]:
    """An ArrayRecord (``torch.raw`` or numpy Arrays) as ``{name: tensor}`` in record order.

    With ``copy=False`` the tensors share memory with the record's bytes (load them
    with ``model.load_state_dict``, which copies); ``copy=True`` returns tensors that
    own their memory."""
    return {key: array_to_tensor(arr, copy=copy) for key, arr in record.items()}


# ----------------------------------------------------------------- bf16 without torch
def bf16_to_float32(data: bytes | bytearray | memoryview,
                    shape: Iterable[int] | None = None) -> np.ndarray:
    """bfloat16 bytes (little-endian) -> float32 array, exactly (bf16 is the top half of
    a float32). numpy only."""
    u16 = np.frombuffer(data, dtype="<u2")
    out = (u16.astype(np.uint32) << 16).view(np.float32)
    return out.reshape(tuple(shape)) if shape is not None else out


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (a ``uint16`` array), rounded to nearest even,
    NaN -> 0x7FC0 (a quiet NaN): the same bits as ``tensor.to(torch.bfloat16)`` for
    every non-NaN value. numpy only."""
    a = np.ascontiguousarray(values, dtype=np.float32)
    u = a.view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded).astype("<u2", copy=False)


# ------------------------------------------------------------------- the upcast path
def to_numpy_record(record: ArrayRecord, float_dtype: str = "float32") -> ArrayRecord:
    """Convert ``torch.raw`` Arrays to Flower's numpy Arrays so numpy strategies can
    aggregate them: bfloat16 and float8 become ``float_dtype`` (exact), complex32
    becomes complex64, other dtypes keep theirs. numpy Arrays pass through."""
    torch = _torch()
    out = ArrayRecord()
    for key, arr in record.items():
        if arr.stype != TORCH_RAW_STYPE:
            out[key] = arr
            continue
        name = arr.dtype[len(DTYPE_PREFIX):]
        target = NUMPY_OF.get(name)
        if target is None:
            raise ValueError(f"{arr.dtype} (array {key!r}) has no numpy equivalent")
        t = array_to_tensor(arr)
        if target == "float32":
            t = t.to(getattr(torch, float_dtype))
        elif name == "complex32":
            t = t.to(torch.complex64)
        out[key] = Array(t.numpy())
    return out


def from_numpy_record(record: ArrayRecord, like: Mapping[str, Any], *,
                      copy: bool = True) -> ArrayRecord:
    """Cast a numpy ArrayRecord back to ``torch.raw`` Arrays with the dtypes of ``like``
    (an ArrayRecord of ``torch.raw`` Arrays, or ``{name: torch dtype}``), rounding to
    nearest even. Names not in ``like`` and non-``torch.raw`` entries pass through.
    ``copy=False``: the Arrays are memoryviews of the freshly cast tensors (nothing else
    holds them), see :func:`state_dict_to_arrays`."""
    torch = _torch()
    out = ArrayRecord()
    for key, arr in record.items():
        ref = like.get(key)
        if isinstance(ref, Array):
            dt = _parse_dtype(ref.dtype) if ref.stype == TORCH_RAW_STYPE else None
        else:
            dt = ref
        if dt is None or arr.stype == TORCH_RAW_STYPE:
            out[key] = arr
            continue
        t = torch.from_numpy(_writable(arr.numpy())).to(dt)
        out[key] = tensor_to_array(t, copy=copy)
    return out


def _raw_like(records: Iterable[ArrayRecord]) -> dict[str, Array]:
    like: dict[str, Array] = {}
    for rec in records:
        for key, arr in rec.items():
            if arr.stype == TORCH_RAW_STYPE:
                like.setdefault(key, arr)
    return like


class UpcastStrategy(Strategy):
    """Lets a numpy-based Flower strategy aggregate ``torch.raw`` (e.g. bf16) Arrays.

    Replies' ``torch.raw`` Arrays are converted with :func:`to_numpy_record` before the
    inner strategy's ``aggregate_train``/``aggregate_evaluate``; its result is cast back
    to the dtypes the replies had (:func:`from_numpy_record`). ``configure_*`` hands the
    inner strategy an upcast copy of the global arrays (FedAdam and friends keep them
    as numpy) and puts the original ``torch.raw`` record in the outgoing messages, so
    the bytes on the wire stay bf16. Put it inside ``offload``:
    ``offload(upcast(FedAvg()), transport=...)``. The aggregated Arrays (and so
    ``Result.arrays``) hold memoryviews of the cast tensors, not ``bytes``: pass them
    through :func:`arrays_to_state_dict`, or copy them before putting them in
    ``context.state``.
    """

    def __init__(self, strategy: Strategy, float_dtype: str = "float32") -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"upcast() wraps a Message-API strategy, got {type(strategy).__name__}")
        self.inner = strategy
        self.float_dtype = float_dtype
        self._like: dict[str, Array] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def summary(self) -> None:
        self.inner.summary()

    def _configure(self, fn, server_round: int, arrays: ArrayRecord, config, grid):
        like = _raw_like([arrays])
        if not like:
            return fn(server_round, arrays, config, grid)
        self._like.update(like)
        up = to_numpy_record(arrays, self.float_dtype)
        messages = list(fn(server_round, up, config, grid))
        # Strategies share one record (often one RecordDict) across messages: convert
        # each distinct record once, so offload() still encodes it once.
        done: dict[int, tuple[ArrayRecord, ArrayRecord]] = {id(up): (up, arrays)}
        for m in messages:
            for key, rec in list(m.content.items()):
                if not isinstance(rec, ArrayRecord) or rec is arrays:
                    continue
                if id(rec) not in done:
                    done[id(rec)] = (rec, from_numpy_record(rec, like))
                m.content[key] = done[id(rec)][1]
        return messages

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return self._configure(self.inner.configure_train, server_round, arrays, config, grid)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return self._configure(self.inner.configure_evaluate, server_round, arrays, config,
                               grid)

    def _upcast_replies(self, replies: Iterable[Message]) -> tuple[list[Message], dict]:
        """Upcast every reply's ``torch.raw`` Arrays. A reply whose Arrays are invalid
        (unknown dtype, byte count not matching the shape: bytes from the network) is
        replaced by an error reply, as ``offload`` does, so the round goes on with the
        other nodes."""
        out: list[Message] = []
        like: dict[str, Array] = {}
        for msg in replies:
            if msg.has_error():
                out.append(msg)
                continue
            content = msg.content
            try:
                converted = {key: to_numpy_record(rec, self.float_dtype)
                             for key, rec in content.items()
                             if isinstance(rec, ArrayRecord) and _raw_like([rec])}
            except (ValueError, TypeError) as exc:
                reason = (f"flwr-transports upcast() rejected the reply of node "
                          f"{msg.metadata.src_node_id}: {exc}")
                log.warning(reason)
                out.append(Message(metadata=msg.metadata,
                                   error=Error(code=REJECTED_REPLY_CODE, reason=reason)))
                continue
            for key, rec in converted.items():
                for k, v in _raw_like([content[key]]).items():
                    like.setdefault(k, v)
                content[key] = rec
            out.append(msg)
        return out, like

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies, like = self._upcast_replies(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        like = like or self._like
        if arrays is not None and like:
            # the cast tensors are new and held by nobody else: no second copy
            arrays = from_numpy_record(arrays, like, copy=False)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies, _ = self._upcast_replies(replies)
        return self.inner.aggregate_evaluate(server_round, replies)


def upcast(strategy: Strategy, float_dtype: str = "float32") -> UpcastStrategy:
    """Wrap a numpy-based strategy so it aggregates ``torch.raw`` Arrays in
    ``float_dtype`` and returns the clients' dtypes (see :class:`UpcastStrategy`)."""
    return UpcastStrategy(strategy, float_dtype)

"""Receive buffers that become Flower's ``Array.data`` without a copy.

Flower's ``Array`` holds its data as ``bytes``. A transfer that receives into a
scratch buffer and then builds ``bytes`` from it pays twice for fresh memory: the
page faults of both buffers (on a small VM ~0.5-1 CPU-second per GiB, more than the
copy itself) and the copy. :func:`alloc_bytes` instead returns a brand-new, not yet
shared ``bytes`` object plus a writable view of its storage, as C extensions do with
``PyBytes_FromStringAndSize(NULL, n)``: the wire writes into it and the object goes
to ``Array`` as is.

Rules for callers (the object is immutable to everyone else):

* write only before the object is handed to anyone (it has no cached hash yet);
* keep a reference to the object for as long as anything may write through the
  view (the view does not keep the object alive).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

ZC_MIN = 1 << 16  # below this a bytearray (and one small copy later) is simpler


def _zero_copy_wanted() -> bool:
    """FLWR_TRANSPORTS_ZERO_COPY (older name: ..._MPI_ZERO_COPY), read at each call."""
    from .settings import raw

    v = raw("FLWR_TRANSPORTS_ZERO_COPY") or raw("FLWR_TRANSPORTS_MPI_ZERO_COPY") or "1"
    return v.strip() != "0"


def _setup_zero_copy():
    if sys.implementation.name != "cpython":
        return None
    try:
        api = ctypes.pythonapi
        new = api.PyBytes_FromStringAndSize
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
        ptr = api.PyBytes_AsString
        ptr.restype = ctypes.c_void_p
        ptr.argtypes = [ctypes.py_object]
        return new, ptr
    except (AttributeError, OSError):  # pragma: no cover
        return None


_ZC = _setup_zero_copy()

_HUGE_MIN = 4 << 20
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def _setup_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn, os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # pragma: no cover
        return None


_MADVISE = _setup_madvise()


def zero_copy_available() -> bool:
    return _ZC is not None and _zero_copy_wanted()


def madvise_range(addr: int, n: int, advice: int) -> bool:
    """``madvise`` the whole pages inside ``[addr, addr + n)``; False if not done."""
    if _MADVISE is None:
        return False
    fn, page = _MADVISE
    start = (addr + page - 1) & ~(page - 1)
    end = (addr + n) & ~(page - 1)
    if end <= start:
        return False
    return fn(start, end - start, advice) == 0  # advice only: failure is harmless


def populate(view: memoryview) -> None:
    """Fault in the pages under a writable view in one system call (not one fault per
    4 KiB page inside the receive loop). A no-op where unsupported."""
    if _MADVISE is None or len(view) < _HUGE_MIN or view.readonly:
        return
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return
    madvise_range(addr, len(view), MADV_POPULATE_WRITE)


def alloc_bytes(n: int, *, huge: bool = False) -> tuple[Any, memoryview]:
    """Return ``(obj, writable view of obj)`` for an ``n``-byte receive.

    On CPython ``obj`` is a fresh ``bytes`` object of length ``n`` (content
    undefined until written). Elsewhere, or below :data:`ZC_MIN`, or with
    FLWR_TRANSPORTS_ZERO_COPY=0, it is a bytearray (turn it into ``bytes`` later, one
    copy). ``huge`` asks for transparent huge pages (fewer faults where THP is cheap).
    """
    if _ZC is not None and n >= ZC_MIN and _zero_copy_wanted():
        new, ptr = _ZC
        obj = new(None, n)
        addr = ptr(obj)
        if huge and n >= _HUGE_MIN:
            madvise_range(addr, n, MADV_HUGEPAGE)
        view = memoryview((ctypes.c_char * n).from_address(addr)).cast("B")
        return obj, view
    buf = bytearray(n)
    view = memoryview(buf)
    if huge and n >= _HUGE_MIN:
        madvise_range(ctypes.addressof(ctypes.c_char.from_buffer(buf)), n, MADV_HUGEPAGE)
    return buf, view

"""Payload codecs: fewer bytes on the wire (issue 25).

===========  ========  ===============================================================
codec        exact?    what travels
===========  ========  ===============================================================
``raw``      yes       the payload as :mod:`flwr_transports.codec` writes it (default)
``lossless`` yes       per 16 MiB window: each array's element bytes split into byte
                       planes (sign/exponent bytes together), low-entropy planes
                       entropy-coded with zstd, the others stored
``delta``    yes       like ``lossless``, but arrays present in a *base* payload the
                       receiver holds (the model it sent / received) travel as the XOR
                       of their bit patterns with the base's: unchanged bytes cost
                       ~nothing. Refused by a receiver that does not hold that base.
``q8``       **no**    the update (value - base) of float32/float16/bfloat16 arrays as
                       int8 with one float32 scale per 256 elements, with client-side
                       error feedback (:class:`ErrorFeedback`); everything else as
                       ``delta``. Changes the arithmetic; never a default.
===========  ========  ===============================================================

Windows are independent (ranged reads and parallel decoding work window by window).
The format and its checks: :mod:`flwr_transports.codecs.stream`; the quantiser:
:mod:`flwr_transports.codecs.q8`. Encoded payloads are not safetensors files; a raw
payload is recognised by its first bytes (:func:`is_encoded`), so a receiver accepts
both.
"""

from __future__ import annotations

from ..codec import PayloadError
from .q8 import QBLOCK, ErrorFeedback
from .stream import (
    CODECS,
    DELTA,
    LOSSLESS,
    Q8,
    RAW,
    WINDOW,
    Base,
    Decoder,
    SegmentReader,
    SegmentWriter,
    StreamInfo,
    content_digest,
    decode_payload,
    decode_record,
    encode,
    is_encoded,
    read_info,
)

__all__ = [
    "CODECS", "DELTA", "LOSSLESS", "Q8", "QBLOCK", "RAW", "WINDOW", "Base", "Decoder",
    "ErrorFeedback", "PayloadError", "SegmentReader", "SegmentWriter", "StreamInfo",
    "content_digest", "decode_payload", "decode_record", "encode", "is_encoded",
    "read_info",
]

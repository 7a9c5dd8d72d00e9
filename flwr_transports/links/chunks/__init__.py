"""The chunk engine (a package: ``protocol``, ``buffers``, ``client``, ``server``) shared by the ``tcp://`` and ``rdma://`` links.

A payload is cut into fixed-size chunks (the last one shorter). Each chunk has a
CRC-32 in a *chunk table* that the server computes once when it publishes the payload
(uploads: the client sends each chunk's CRC with it). Transfers run over ``streams``
parallel connections; each connection keeps up to ``window`` chunk requests in
flight (pipelining). A shared :class:`ChunkScheduler` hands chunk indices to the
connections, takes back the ones that failed (a CRC mismatch re-requests that chunk
only; a dropped connection puts its in-flight chunks back and the connection is
re-opened, so the transfer resumes from the chunks already received) and gives up
with a clear error after too many failures.

Wire format (all integers big-endian). Every request starts with::

    REQ  = magic "FTXQ" | op u8 | flags u8 | id_len u16 | token 32s | a u64 | b u64 | crc u32
    then id_len bytes of object id (ASCII), then for PUT a body of b bytes

and every response with::

    RSP  = magic "FTXR" | status u8 | flags u8 | 0 u16 | a u64 | b u64 | crc u32
    then b bytes of body (chunk data, chunk table, bitmap or an error message)

The token is ``HMAC-SHA256(server secret, kind + "\\0" + object id)`` (kind ``get``
or ``put``), checked on EVERY request in constant time: a request for another
object, or a download token used to upload, is refused, logged, and the connection
closed. Nothing in a request is trusted: ids are matched against a strict pattern,
indices and lengths against the object's table, declared upload sizes against the
slot's cap before anything is allocated.

The data of a chunk normally travels inline after its header (``tcp://``). ``rdma://``
moves it by one-sided RDMA reads instead and uses this server only for its control
exchange: the extension ops ``RDMA_GET`` / ``RDMA_PUT`` (token-checked like every
other op) are served by :meth:`ServerConn.extension`, and the transfers reuse
:class:`ChunkScheduler`, the chunk table and the receive placements defined here.
"""

from __future__ import annotations

from .buffers import (  # noqa: F401
    CLIENT_POOL,
    DONE,
    INFLIGHT,
    PENDING,
    POOL_GRAIN,
    BufferPool,
    ByteBudget,
    ChunkScheduler,
    alloc_buffer,
    alloc_spill,
    close_map,
    drop_pages,
    spill_pool,
)
from .client import (  # noqa: F401
    AUTO_MAX_STREAMS,
    AUTO_MIN_STREAMS,
    AUTO_TARGET_RATE,
    MAX_SNIFF_HEADER,
    SEND_BUFFER_PAYLOAD,
    Busy,
    ClientConn,
    ConnFactory,
    Endpoint,
    FlatDest,
    ScatterDest,
    auto_streams,
    busy_pause,
    conn_rtt,
    download,
    first_request,
    keep_forever,
    pinned_client_context,
    raise_status,
    stream_window,
    upload,
)
from .protocol import (  # noqa: F401
    AUTO_CHUNK_MIN,
    BAD_CRC,
    BAD_REQUEST,
    BUSY,
    BUSY_RETRY_FOR,
    DEFAULT_CHUNK,
    DENIED,
    EVICT_IDLE,
    EXT_OPS,
    F_OUT_OF_BAND,
    ID_RE,
    INCOMPLETE,
    MAGIC_REQ,
    MAGIC_RSP,
    MAX_CHUNK,
    MAX_ERR_BODY,
    MAX_ID,
    MIN_CHUNK,
    NOT_FOUND,
    OK,
    OP_GET,
    OP_HELLO,
    OP_INFO,
    OP_KIND,
    OP_NAMES,
    OP_PUT,
    OP_PUT_DONE,
    OP_PUT_OPEN,
    OP_RDMA_GET,
    OP_RDMA_PUT,
    PREAUTH_TIMEOUT,
    REQ,
    RSP,
    SNDBUF_ENV,
    STATUS_NAMES,
    TABLE_HEAD,
    TOO_BIG,
    ProtocolError,
    Refused,
    SegmentView,
    auto_chunk_size,
    build_table,
    check_chunk_size,
    chunk_len,
    crc_views,
    drain,
    make_token,
    n_chunks,
    pack_table,
    recv_exact,
    recv_exact_into,
    send_buffer_request,
    send_views,
    table_limit,
    tune_socket,
    unpack_table,
)
from .server import (  # noqa: F401
    ChunkServer,
    PublishedObject,
    ServerConn,
    UploadSlot,
    peer_group,
)

"""The link interface: one small class per side, one module per URL scheme.

A **ServerLink** lives in the ServerApp for one run. It publishes encoded payloads
(the global model, once per round and distinct record), prepares upload *slots* for
replies, opens what clients uploaded (after the wrapper validated the reference) and
removes everything it created on ``close()``.

A **ClientLink** lives in a ClientApp process. It needs no configuration: everything
it needs is in the reference / ticket slot the server sent. It must still validate
those (a reference is network input).

Descriptors (``loc`` and slots) are small JSON-able dicts; their content is private
to each link.
"""

from __future__ import annotations

import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from ..codec import EncodedPayload

NAME_PREFIX = "ftx-"  # every object a link creates starts with this (cleanup looks for it)


class LinkError(RuntimeError):
    """A link could not do its job (with a message that says what to do)."""


class PayloadSource:
    """A fetched (or fetchable) payload: ``read(offset, n) -> bytes`` and ``close()``."""

    def __init__(self, read: Callable[[int, int], bytes], size: int, close=None):
        self.read = read
        self.size = size
        self._close = close

    def close(self) -> None:
        if self._close is not None:
            c, self._close = self._close, None
            c()

    def __enter__(self) -> PayloadSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def split_url(url: str) -> tuple[str, str, str, dict[str, str]]:
    """Return (scheme, netloc, path, query options) of a transport URL."""
    parts = urlsplit(url)
    opts = dict(parse_qsl(parts.query, keep_blank_values=True))
    return parts.scheme.lower(), parts.netloc, parts.path, opts


def new_run_prefix(run_id: int | str) -> str:
    """A name prefix unique to this run and process: ftx-<pid>-<run>-<nonce>."""
    run = str(run_id).replace("-", "")[:20] or "0"
    return f"{NAME_PREFIX}{os.getpid()}-{run}-{secrets.token_hex(4)}"


def parse_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in {"1", "true", "yes", "on"}:
        return True
    if s in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {v!r}")


class ServerLink(ABC):
    """Server (ServerApp) side of a link, for one run."""

    scheme: ClassVar[str]
    #: option names this link accepts (from the URL query string or offload kwargs)
    options: ClassVar[tuple[str, ...]] = ()
    #: time.perf_counter() when the link last saw an upload complete (None: unknown)
    last_landed: float | None = None

    def __init__(self, url: str, run_id: int | str, options: dict[str, Any]):
        unknown = set(options) - set(self.options)
        if unknown:
            raise ValueError(
                f"unknown option(s) for {self.scheme}:// link: {', '.join(sorted(unknown))} "
                f"(known: {', '.join(self.options) or 'none'})"
            )
        self.url = url
        self.run_id = run_id
        self.prefix = new_run_prefix(run_id)

    @abstractmethod
    def publish(self, name: str, payload: EncodedPayload) -> dict[str, Any]:
        """Store a payload readable by clients; return its location descriptor."""

    @abstractmethod
    def release(self, name: str) -> None:
        """Remove a published payload (idempotent)."""

    @abstractmethod
    def issue_slot(self, name: str, max_size: int) -> dict[str, Any]:
        """Prepare a place a client may upload one reply payload to."""

    @abstractmethod
    def open_upload(self, slot: dict[str, Any], loc: dict[str, Any], size: int) -> PayloadSource:
        """Open what a client uploaded into ``slot``; ``loc`` is what the client claims.

        Must raise ``refs.RefError`` if ``loc`` is not exactly the slot's location (e.g.
        a path outside the link's root), and check the stored size equals ``size``.
        """

    def on_upload(self, slot: dict[str, Any], fn: Callable[[PayloadSource], None]) -> bool:
        """Ask to be told when an upload into ``slot`` is complete: the link then calls
        ``fn(source)`` once, in a background thread, with the payload open for reading
        from the link's own buffers (closed after ``fn`` returns). Nothing is checked
        yet (no reference has arrived): ``fn`` must treat the bytes as untrusted.
        Returns False when the link cannot (the caller reads the upload later with
        ``open_upload``). Streaming aggregation folds uploads this way as they land."""
        return False

    @abstractmethod
    def discard_slot(self, slot: dict[str, Any]) -> None:
        """Remove whatever was uploaded into ``slot`` (idempotent)."""

    @abstractmethod
    def close(self) -> None:
        """Remove everything this link created for the run."""

    @classmethod
    def cleanup(cls, url: str, *, dry_run: bool = False, all_: bool = False) -> list[str]:
        """Find (and unless dry_run remove) leftovers of crashed runs under ``url``."""
        return []


class ClientLink(ABC):
    """Client (ClientApp) side of a link. Stateless; built from the scheme alone."""

    scheme: ClassVar[str]

    @abstractmethod
    def open(self, loc: dict[str, Any], size: int) -> PayloadSource:
        """Open a published payload for reading."""

    @abstractmethod
    def upload(self, slot: dict[str, Any], payload: EncodedPayload) -> dict[str, Any]:
        """Write a reply payload into a server-issued slot; return its location."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_pid(name: str) -> int | None:
    """The server pid encoded in an ``ftx-<pid>-...`` name, if any."""
    base = name.lstrip(".")
    if not base.startswith(NAME_PREFIX):
        return None
    head = base[len(NAME_PREFIX):].split("-", 1)[0]
    return int(head) if head.isdigit() else None

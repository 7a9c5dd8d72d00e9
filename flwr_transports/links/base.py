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
from ..errors import FlwrTransportsError
from ..options import Option, Options, parse_bool, parse_options  # noqa: F401 - re-exported

NAME_PREFIX = "ftx-"  # every object a link creates starts with this (cleanup looks for it)


class LinkError(FlwrTransportsError, RuntimeError):
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


class ServerLink(ABC):
    """Server (ServerApp) side of a link, for one run."""

    scheme: ClassVar[str]
    #: the options this link accepts (URL query or offload keywords), declared once
    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    #: time.perf_counter() when the link last saw an upload complete (None: unknown)
    last_landed: float | None = None

    def __init__(self, url: str, run_id: int | str, options: Options | dict[str, Any]):
        """``options``: parsed :class:`Options` (used as given), or raw keyword values,
        merged over the URL's query and parsed here, once."""
        if not isinstance(options, Options):
            options = parse_options(self.OPTIONS, {**split_url(url)[3], **options},
                                    what=f"the {self.scheme}:// link")
        self.options = options
        self.url = url
        self.run_id = run_id
        self.prefix = new_run_prefix(run_id)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(o.name for o in cls.OPTIONS)

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

    #: URL ``flwr-transports cleanup`` scans when called without URLs (None: needs one)
    default_cleanup_url: ClassVar[str | None] = None

    @classmethod
    def local_url(cls, workdir: str, host: str = "127.0.0.1") -> str | None:
        """A URL on which this link runs on this machine with nothing else started
        (demo, bench, contract tests); None when it needs an external service."""
        return None

    @classmethod
    def check_here(cls) -> tuple[bool, str]:
        """``flwr-transports doctor``'s check: can this link run on this machine?"""
        return True, f"{cls.__module__}.{cls.__name__} importable"


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
    """Whether process ``pid`` runs on this host. A zombie (exited, not yet reaped:
    Flower's SuperExec never waits on the ServerApp it started) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not pid_zombie(pid)


def pid_zombie(pid: int) -> bool:
    """True if ``/proc/<pid>/stat`` says the process is a zombie (state ``Z``) or dead
    (``X``); False where /proc is unavailable."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return False
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the
    # LAST closing parenthesis
    _, _, rest = raw.rpartition(b")")
    fields = rest.split()
    return bool(fields) and fields[0] in (b"Z", b"X")


def owner_pid(name: str) -> int | None:
    """The server pid encoded in an ``ftx-<pid>-...`` name, if any."""
    base = name.lstrip(".")
    if not base.startswith(NAME_PREFIX):
        return None
    head = base[len(NAME_PREFIX):].split("-", 1)[0]
    return int(head) if head.isdigit() else None

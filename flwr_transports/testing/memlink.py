"""An in-memory reference link, ``mem://`` (as httpx ships ``MockTransport``): payloads
live in a dict of this process (``STORE``), so it works in one process only (unit tests
of code that takes a link, the link contract suite). Not registered by default::

    from flwr_transports.links import register_link
    from flwr_transports.testing.memlink import MemClientLink, MemServerLink

    register_link("mem", MemServerLink, MemClientLink)

It is written the way a plugin author writes a link, with every check the contract suite
(:mod:`flwr_transports.testing.link_contract`) demands. ``memep://`` is the same link
under another scheme (the tests install it through an entry point)."""

from __future__ import annotations

import threading
from typing import Any

from ..links.base import (
    NAME_PREFIX,
    ClientLink,
    LinkError,
    PayloadSource,
    ServerLink,
    owner_pid,
    pid_alive,
)
from ..options import Option, parse_bool
from ..refs import RefError

STORE: dict[str, bytes] = {}
_LOCK = threading.Lock()


def _key(loc: Any) -> str:
    key = loc.get("key") if isinstance(loc, dict) else None
    if not isinstance(key, str) or not key.startswith(NAME_PREFIX) or len(key) > 256:
        raise RefError(f"invalid mem:// location {loc!r}")
    return key


def _source(key: str, size: int) -> PayloadSource:
    with _LOCK:
        data = STORE.get(key)
    if data is None:
        raise LinkError(f"mem:// payload {key!r} does not exist")
    if len(data) != size:
        raise RefError(f"mem:// payload {key!r} has {len(data)} bytes, {size} claimed")
    view = memoryview(data)
    return PayloadSource(lambda off, n: bytes(view[off:off + n]), size)


class MemClientLink(ClientLink):
    scheme = "mem"

    def endpoints(self, desc, *, upload):
        _key(desc)  # malformed: refused before anything runs
        return []  # contacts nothing outside this process

    def open(self, loc, size):
        return _source(_key(loc), size)

    def upload(self, slot, payload):
        key = _key(slot)
        if payload.size > int(slot.get("max", 0)):
            raise RefError("payload above the slot's maximum size")
        with _LOCK:
            STORE[key] = payload.to_bytes()
        return {"key": key}


class MemServerLink(ServerLink):
    scheme = "mem"
    client_class = MemClientLink
    OPTIONS = (Option("verbose", parse_bool, False, "log every put"),)

    def __init__(self, url, run_id, options):
        super().__init__(url, run_id, options)
        self._keys: set[str] = set()

    def _k(self, name: str) -> str:
        key = f"{self.prefix}-{name}"
        self._keys.add(key)
        return key

    def publish(self, name, payload):
        key = self._k(name)
        with _LOCK:
            STORE[key] = payload.to_bytes()
        return {"key": key}

    def release(self, name):
        with _LOCK:
            STORE.pop(f"{self.prefix}-{name}", None)

    def issue_slot(self, name, max_size):
        return {"key": self._k(f"slot-{name}"), "max": max_size}

    def open_upload(self, slot, loc, size):
        if _key(loc) != _key(slot):
            raise RefError("reply location is not the location issued for this slot")
        return _source(_key(loc), size)

    def discard_slot(self, slot):
        with _LOCK:
            STORE.pop(_key(slot), None)

    def close(self):
        with _LOCK:
            for k in self._keys:
                STORE.pop(k, None)
        self._keys.clear()

    @classmethod
    def cleanup(cls, url, *, dry_run=False, all_=False):
        with _LOCK:
            found = [k for k in STORE if k.startswith(NAME_PREFIX)
                     and (all_ or not pid_alive(owner_pid(k) or 0))]
            if not dry_run:
                for k in found:
                    STORE.pop(k, None)
        return found

    @classmethod
    def local_url(cls, workdir, host="127.0.0.1"):
        return f"{cls.scheme}://"


class EpMemClientLink(MemClientLink):
    scheme = "memep"


class EpMemServerLink(MemServerLink):
    """The same link, installed under ``memep://`` through an entry point."""

    scheme = "memep"
    client_class = EpMemClientLink

"""Client side: keep a payload the server says it will send again, instead of fetching
it twice across the network.

FedAvg-style strategies send the same global model twice: to evaluate in round ``r``
and to train in round ``r + 1``. The server knows when that happens (a next round
follows) and marks the evaluate phase's references ``keep``; it then hands out the
very same payload for the next train round (see ``OffloadStrategy``). A client that
fetched a ``keep`` payload over a network link writes it to its cache directory, in
the background while its app evaluates; the next reference with the same digest is
read from there instead of the network (checked like any fetch: a regular file of
exactly the size, owned by this user, no symlink, and the SHA-256 digest of exactly
the bytes decoded) and the file is removed at once. A kept payload is bound to the run
(Flower's run id of the message) and to the exact location the server published it at
(:func:`binding`): another run or another server on the same SuperNode that knows the
digest neither gets it nor learns that this client holds it.

Settings: ``PayloadMod(cache=...)`` or ``FLWR_TRANSPORTS_CACHE``: a directory, ``off``,
or unset (``<tempdir>/flwr-transports-cache-<uid>``): before anything in it is read,
written or removed, the directory and the node's must be this user's, not symlinks, not
writable by others (:func:`_private_dir`), else the cache is not used (logged once). Only
payloads of network links (``tcp``, ``rdma``, ``s3``, third-party links not marked local)
are kept: re-reading a shared-memory or shared-file payload is as cheap as a cache. Bounded: one payload at a
time per node (a new one replaces the old), at most :data:`MAX_TOTAL` bytes and half the
file system's free space for all nodes of this host together (the oldest kept payloads
of other nodes go first), files older than :data:`MAX_AGE` seconds (a run that ended,
crashed, or did not sample this client again) are removed when a ``PayloadMod`` starts
and whenever the cache is used. A full disk only costs the optimisation (logged once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from typing import Any

from flwr.app import ArrayRecord

from ..codec import EncodedPayload, decode, encode
from ..errors import FlwrTransportsError
from ..links.fs import atomic_write, open_payload, remove_path
from ..settings import raw as raw_setting

log = logging.getLogger("flwr_transports")

CACHE_ENV = "FLWR_TRANSPORTS_CACHE"
#: seconds after which a kept payload is stale and removed
MAX_AGE = 1800.0
#: bytes kept by all nodes of this host together (also at most half the free space)
MAX_TOTAL = 4 * 2**30
_NAME = re.compile(r"^(?:[0-9a-f]{32}-)?([0-9a-f]{64})\.ftx$")
_TMP = re.compile(r"^\.(?:[0-9a-f]{32}-)?[0-9a-f]{64}\.ftx\.tmp-[0-9a-f]{8}$")
_NODE = re.compile(r"^node-[0-9]{1,20}$")
_warned_full = False
_warned_unsafe: set[str] = set()  # directories refused (logged once each)


def _private_dir(d: str) -> bool | None:
    """True if ``d`` is a directory of this user that no one else can write (not a
    symlink); None if it does not exist; else False (logged once per directory). The
    cache reads, writes and removes nothing under a directory that is not private:
    another local user who pre-created it (the default name is predictable) or put a
    symlink there could swap kept files or steer the cleanup outside it."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = exc.strerror or str(exc)
    else:
        if stat.S_ISLNK(st.st_mode):
            why = "a symbolic link"
        elif not stat.S_ISDIR(st.st_mode):
            why = "not a directory"
        elif st.st_uid != os.getuid():
            why = f"owned by uid {st.st_uid}, not {os.getuid()}"
        elif st.st_mode & 0o022:
            why = f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
        else:
            return True
    if d not in _warned_unsafe:
        _warned_unsafe.add(d)
        log.warning("flwr-transports: payload cache %r is %s; not used (payloads are "
                    "fetched in full, nothing in it is read or removed): remove it, or set "
                    "%s to a directory only this user can write", d, why, CACHE_ENV)
    return False


def resolve_setting(setting: Any = None) -> str | None:
    """The cache directory for ``setting`` (``PayloadMod(cache=...)``): None = the
    environment variable, else the default directory; ``False`` or ``"off"`` = no
    cache; a path = that directory."""
    if setting is None:
        setting = raw_setting(CACHE_ENV) or True
    if setting is False or str(setting).strip().lower() in ("off", "0", "false", "no", ""):
        return None
    if setting is True:
        return os.path.join(tempfile.gettempdir(), f"flwr-transports-cache-{os.getuid()}")
    return os.path.abspath(os.path.expanduser(str(setting)))


def binding(run_id: Any, scheme: str, loc: Any) -> str:
    """What a kept payload is bound to: the run (Flower's run id, set by the
    SuperLink, not by the server's payload) and the exact location the server
    published it at (the same publication is handed out again for the next round)."""
    raw = json.dumps([str(run_id), scheme, loc], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def sweep_host(directory: str, max_age: float = MAX_AGE) -> None:
    """Remove stale kept payloads of every node under ``directory`` (and empty node
    directories): run when a ``PayloadMod`` starts, so files of nodes that stopped do
    not stay in a (often RAM-backed) temp directory until that node runs again."""
    if not _private_dir(directory):
        return
    for node in _node_dirs(directory):
        PayloadCache(directory, node[len("node-"):]).sweep(max_age=max_age)


def _node_dirs(directory: str) -> list[str]:
    try:
        return [n for n in os.listdir(directory) if _NODE.match(n)]
    except OSError:
        return []


class PayloadCache:
    """Kept payloads of one node, named by digest, in ``<directory>/<node>`` (nodes of
    one host share the base directory; see the module docs)."""

    def __init__(self, directory: str, node: int | str = 0):
        self.base = directory
        self.dir = os.path.join(directory, f"node-{node}")
        self._writer: threading.Thread | None = None

    # -- the directory -------------------------------------------------------------
    def _ready(self) -> bool:
        """Create the directories (0700) if needed; False if one is unsafe to use: not
        a directory, a symlink, writable by others, or not owned by this user."""
        for d in (self.base, self.dir):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                log.debug("flwr-transports: payload cache %r unusable: %s", d, exc)
                return False
            if not _private_dir(d):
                return False
        return True

    def _usable(self) -> bool:
        """Both directories exist and are private (:func:`_private_dir`): checked before
        anything in them is read or removed."""
        return bool(_private_dir(self.base)) and bool(_private_dir(self.dir))

    def _tidy(self) -> None:
        """Remove this node's directory, and the base, once empty (nothing is left
        behind when no payload is kept)."""
        for d in (self.dir, self.base):
            try:
                os.rmdir(d)
            except OSError:
                return

    def path(self, digest: str, bind: str = "") -> str | None:
        algo, _, hexd = digest.partition(":")
        if not re.fullmatch(r"[0-9a-f]{64}", hexd) or not algo:
            return None
        if bind and not re.fullmatch(r"[0-9a-f]{32}", bind):
            return None
        return os.path.join(self.dir, f"{bind}-{hexd}.ftx" if bind else f"{hexd}.ftx")

    def entries(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.dir) if _NAME.match(n) or _TMP.match(n))
        except OSError:
            return []

    def sweep(self, keep: str | None = None, max_age: float = MAX_AGE) -> None:
        """Remove stale files (older than ``max_age``), and every kept payload but
        ``keep`` (a path) when one is given."""
        if not self._usable():
            return
        now = time.time()
        for name in self.entries():
            p = os.path.join(self.dir, name)
            if p == keep:
                continue
            try:
                old = now - os.lstat(p).st_mtime > max_age
            except OSError:
                continue
            if old or (keep is not None and _NAME.match(name)):
                remove_path(p)
        if keep is None:
            self._tidy()

    # -- use -----------------------------------------------------------------------
    def take(self, size: int, digest: str, bind: str = "", *, again: bool = False
             ) -> ArrayRecord | None:
        """The kept payload with this digest and :func:`binding`, decoded and
        verified, or None; the file is removed (it is used once), unless ``again``:
        the server marked it ``keep`` once more (the base of the next downlink delta),
        then a verified file stays."""
        p = self.path(digest, bind)
        if p is None or not self._usable() or not os.path.lexists(p):
            self.sweep()
            return None
        ok = False
        try:
            with open_payload(p, size, owner=os.getuid()) as src:
                rec = decode(src.read, size, digest)
            ok = True
            return rec
        except FlwrTransportsError as exc:
            log.warning("flwr-transports: kept payload %s not used (%s); fetching it", p, exc)
            return None
        finally:
            if not (ok and again):
                remove_path(p)
            else:
                try:
                    os.utime(p)  # kept one more phase: not stale
                except OSError:
                    pass
            self.sweep()

    def use_base(self, digest: str, bind: str, max_size: int, fn):
        """Call ``fn(base)`` with the kept payload ``digest`` (bound to ``bind``) as a
        :class:`~flwr_transports.codecs.Base` read on demand from the file (nothing
        held in memory; ``fn`` must verify what it decodes against it), and return
        its result; None (``fn`` not called) when no such payload is kept here. The
        file is removed afterwards either way (a new model replaces it)."""
        from ..codecs.stream import Base

        p = self.path(digest, bind)
        if p is None or not self._usable() or not os.path.lexists(p):
            return None
        try:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode) or st.st_size > max_size:
                log.warning("flwr-transports: kept base %s not used (not a regular file "
                            "within the payload limit)", p)
                return None
            with open_payload(p, st.st_size, owner=os.getuid()) as src:
                return fn(Base.from_read(digest, src.read, st.st_size))
        finally:
            remove_path(p)
            self.sweep()

    def discard(self) -> None:
        """Remove every payload this node keeps (the server's reference says nothing
        is needed again: the run's last phase), and the emptied directories."""
        self.wait()
        if not self._usable():
            return
        for name in self.entries():
            if _NAME.match(name):
                remove_path(os.path.join(self.dir, name))
        self._tidy()

    def keep(self, record: ArrayRecord, size: int, digest: str, bind: str = "") -> None:
        """Write ``record``'s payload in the background (see :meth:`wait`), if it
        re-encodes to exactly the referenced bytes."""
        self._start_write(lambda: encode(record), size, digest, bind)

    def keep_payload(self, payload: EncodedPayload, bind: str = "") -> None:
        """Write a payload whose digest was verified (a decoded model's raw payload:
        header + the arrays' own bytes, nothing re-encoded or hashed again) in the
        background."""
        self._start_write(lambda: payload, payload.size, payload.digest, bind)

    def _start_write(self, make, size: int, digest: str, bind: str) -> None:
        self.wait()
        p = self.path(digest, bind)
        if p is None or not self._ready():
            return
        self._writer = threading.Thread(target=self._write, args=(make, size, digest, p),
                                        name="ftx-cache-write", daemon=True)
        self._writer.start()

    def _write(self, make, size: int, digest: str, p: str) -> None:
        global _warned_full
        try:
            payload: EncodedPayload = make()
            if payload.size != size or payload.digest != digest:
                log.debug("flwr-transports: payload does not re-encode to its reference; "
                          "not kept")
                return
            self.sweep(keep=p)
            if not self._room(size):
                return
            atomic_write(p, payload)
        except Exception as exc:  # noqa: BLE001 - the cache is only an optimisation
            if not _warned_full:
                _warned_full = True
                log.warning("flwr-transports: cannot keep a payload in %s (%s); it will be "
                            "fetched again", self.dir, exc)

    def _room(self, size: int) -> bool:
        """Make room for ``size`` bytes within the host's bound (all nodes' kept
        payloads under the base directory), evicting the oldest; False if it cannot."""
        try:
            st = os.statvfs(self.base)
            free = st.f_bavail * st.f_frsize
        except OSError:
            return False
        total, files = self._total()
        cap = min(MAX_TOTAL, (free + total) // 2)
        if size > cap:
            log.info("flwr-transports: payload of %d bytes not kept (the cache's bound on "
                     "this host is %d bytes)", size, cap)
            return False
        for _, n, p in sorted(files):  # oldest first (writes in progress stay)
            if total + size <= cap:
                break
            if _NAME.match(os.path.basename(p)):
                remove_path(p)
                total -= n
        return total + size <= cap

    def _total(self) -> tuple[int, list[tuple[float, int, str]]]:
        files = []
        for node in _node_dirs(self.base):
            d = os.path.join(self.base, node)
            if not _private_dir(d):  # (a symlink there is followed by nothing here)
                continue
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if _NAME.match(name) or _TMP.match(name):
                    try:
                        st = os.lstat(os.path.join(d, name))
                    except OSError:
                        continue
                    files.append((st.st_mtime, st.st_size, os.path.join(d, name)))
        return sum(n for _, n, _ in files), files

    def wait(self) -> None:
        """Wait for a background write (call before the process may exit)."""
        w, self._writer = self._writer, None
        if w is not None:
            w.join()

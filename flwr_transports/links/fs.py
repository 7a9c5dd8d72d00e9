"""``shm://`` and ``file:///dir`` links: payloads as files in a directory.

``shm://`` uses POSIX shared memory, which on Linux is the tmpfs at ``/dev/shm``
(``shm_open(name)`` is ``/dev/shm/name``): for ServerApp and ClientApps on one host
(LIFL-style co-location). ``file:///dir`` uses any directory all parties see at the
same path: a local disk or a shared filesystem (NFS, Lustre, ...).

Every name starts with ``ftx-<server pid>-<run>-<nonce>``; writers write to a
temporary name and ``rename()`` it into place, so no reader ever sees a half-written
payload. Readers open with ``O_NOFOLLOW`` and check the file type and size before
reading. The server removes everything of its run on ``close()``; names whose owner
pid is gone are what ``flwr-transports cleanup`` removes.

URL options: ``mode`` (octal permission bits of created files, default ``600``;
use e.g. ``640`` when SuperNodes run as other users of a shared group), ``fsync``
(``file://`` only, default false: flush to stable storage before the rename),
``eager`` (default true: a watcher thread decodes each reply as soon as its file
appears, while the round still waits for other nodes and Flower's polling; the
wrapper then only compares digests, so the decode is off the round's critical path).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import _membuf
from ..codec import EncodedPayload, decode_hashed
from ..options import Option, octal_mode, parse_bool
from ..refs import RefError
from .base import (
    NAME_PREFIX,
    ClientLink,
    Endpoint,
    LinkError,
    PayloadSource,
    ServerLink,
    TransportSpec,
    as_spec,
    owner_pid,
    pid_alive,
)

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^ftx-[A-Za-z0-9_.-]{1,200}$")
_MAX_PREAD = 0x7FFFF000  # Linux caps one read() at this many bytes
_WRITE_CHUNK = 1 << 30


def _write_all(fd: int, payload: EncodedPayload) -> None:
    for seg in payload.segments:
        mv = memoryview(seg).cast("B")
        while len(mv):
            n = os.write(fd, mv[:_WRITE_CHUNK])
            mv = mv[n:]


def atomic_write(path: str, payload: EncodedPayload, *, mode: int = 0o600,
                 fsync: bool = False) -> None:
    """Write ``payload`` to ``path`` via a temporary name and rename (atomic)."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.tmp-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileNotFoundError:
        raise LinkError(f"directory {d!r} does not exist (create it or fix the URL)") from None
    except PermissionError:
        raise LinkError(f"no permission to create files in {d!r}") from None
    try:
        try:
            _write_all(fd, payload)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        remove_path(tmp)
        if exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(d).free
            raise LinkError(
                f"no space left in {d!r} for a {payload.size}-byte payload ({free} bytes "
                f"free); enlarge it (e.g. mount -o remount,size=16G /dev/shm) or use "
                f"another link"
            ) from None
        raise
    except BaseException:
        remove_path(tmp)
        raise


def remove_path(path: str) -> bool:
    """Remove whatever is at ``path`` (file, FIFO, socket, symlink, or a directory a
    client put there); True if something was removed. Never raises: a failure is
    logged and cleanup of the other names goes on."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.EPERM):
            log.warning("flwr-transports: cannot remove %r: %s", path, exc.strerror or exc)
            return False
    try:  # a directory: rmtree removes it without following symlinks inside
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EPERM, "not removable")
        shutil.rmtree(path)
        log.warning("flwr-transports: removed a directory found at payload path %r", path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("flwr-transports: cannot remove %r: %s", path, exc.strerror or exc)
        return False


def open_payload(path: str, size: int, *, owner: int | None = None) -> PayloadSource:
    """Open a payload file for ranged reads from the descriptor that was checked.

    The open never blocks and never follows a symlink (``O_NONBLOCK | O_NOFOLLOW``: a
    FIFO at the path cannot stall the reader). ``fstat`` of that descriptor must show a
    regular file of exactly ``size`` bytes with one hard link (and, if ``owner`` is
    given, owned by that uid). Reads use ``pread`` on the same descriptor (never a
    memory map, which would turn a file truncated under the reader into SIGBUS): a
    file that shrinks while it is read is a :class:`RefError`; one whose content
    changes fails the digest of exactly the bytes decoded.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                     | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise LinkError(f"payload {path!r} does not exist (expired, cleaned up, or never written)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefError(f"payload {path!r} is a symbolic link; refused") from None
        raise LinkError(f"cannot open payload {path!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefError(f"payload {path!r} is not a regular file; refused")
        if st.st_nlink != 1:
            raise RefError(f"payload {path!r} has {st.st_nlink} hard links (want 1); refused")
        if owner is not None and st.st_uid != owner:
            raise RefError(f"payload {path!r} is owned by uid {st.st_uid}, not {owner}; refused")
        if st.st_size != size:
            raise RefError(f"payload {path!r} has {st.st_size} bytes, the reference says {size}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise

    def read(off: int, n: int) -> bytes:
        if off < 0 or n < 0 or off + n > size:
            raise RefError(f"read({off}, {n}) outside a {size}-byte payload")
        if n <= _MAX_PREAD:
            b = os.pread(fd, n, off)
            if len(b) != n:
                raise RefError(f"payload {path!r} shrank while it was read; refused")
            return b
        obj, view = _membuf.alloc_bytes(n)  # > 2 GiB: several preads, one buffer
        pos = 0
        while pos < n:
            got = os.preadv(fd, [view[pos:pos + _MAX_PREAD]], off + pos)
            if got <= 0:
                raise RefError(f"payload {path!r} shrank while it was read; refused")
            pos += got
        view.release()
        return obj if isinstance(obj, bytes) else bytes(obj)

    def readinto(off: int, dest: memoryview) -> None:
        """Read ``len(dest)`` bytes at ``off`` into a caller's (reused) buffer."""
        got, n = 0, len(dest)
        if off < 0 or off + n > size:
            raise RefError(f"readinto({off}, {n}) outside a {size}-byte payload")
        while got < n:
            k = os.preadv(fd, [dest[got:got + _MAX_PREAD]], off + got)
            if k <= 0:
                raise RefError(f"payload {path!r} shrank while it was read; refused")
            got += k

    src = PayloadSource(read, size, lambda: os.close(fd))
    src.readinto = readinto
    return src


class _EagerDecoder:
    """Watches issued upload slots; decodes a reply as soon as its file appears.

    Writers rename a complete file into place, so the first time a slot's path
    exists it holds a whole payload. The file is checked as ``open_payload`` does
    (regular file, no symlink) and must not exceed the slot's ``max_size``; it is
    decoded with the digest of exactly the bytes decoded (:func:`decode_hashed`),
    which the wrapper compares with what the reply claims before using the record.
    """

    POLL = 0.02

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.watch: dict[str, int] = {}  # path -> max size
        self.results: dict[str, tuple[int, Future]] = {}  # path -> (size, decode)
        self.hooks: dict[str, Any] = {}  # path -> fn(source), called instead of decoding
        self.last_landed: float | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ftx-fs-eager")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ftx-fs-watch", daemon=True)
        self.thread.start()

    def add(self, path: str, max_size: int) -> None:
        with self.lock:
            self.watch[path] = max_size

    def take(self, path: str, size: int) -> Future | None:
        with self.lock:
            self.watch.pop(path, None)
            got = self.results.pop(path, None)
        if got is None or got[0] != size:
            return None
        return got[1]

    def hook(self, path: str, fn) -> None:
        with self.lock:
            self.hooks[path] = fn

    def drop(self, path: str) -> None:
        with self.lock:
            self.watch.pop(path, None)
            self.hooks.pop(path, None)
            got = self.results.pop(path, None)
        if got is not None:
            got[1].cancel()

    def _run(self) -> None:
        while not self.stop.wait(self.POLL):
            with self.lock:
                items = list(self.watch.items())
            for path, cap in items:
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                with self.lock:
                    if self.watch.pop(path, None) is None:
                        continue  # taken or dropped meanwhile
                    self.last_landed = time.perf_counter()
                    fn = self.hooks.pop(path, None)
                    if stat.S_ISREG(st.st_mode) and 8 <= st.st_size <= cap:
                        if fn is not None:  # the caller reads it (no decoded copy here)
                            self.pool.submit(_run_hook, fn, path, st.st_size)
                        else:
                            fut = self.pool.submit(_decode_file, path, st.st_size)
                            self.results[path] = (st.st_size, fut)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2.0)
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self.lock:
            self.watch.clear()
            self.results.clear()
            self.hooks.clear()


def _decode_file(path: str, size: int):
    with open_payload(path, size) as src:
        return decode_hashed(src.read, size)


def _run_hook(fn, path: str, size: int) -> None:
    try:
        with open_payload(path, size) as src:
            fn(src)
    except Exception as exc:  # noqa: BLE001 - untrusted file; the wrapper re-reads it later
        log.debug("flwr-transports: landing hook for %s failed: %s", path, exc)


class _FsServerLink(ServerLink):
    OPTIONS = (
        Option("mode", octal_mode, 0o600, "file mode of published payloads and upload slots "
               "(octal; 640 lets a group of client users read)", shown="600"),
        Option("fsync", parse_bool, False, "fsync every payload before it is announced"),
        Option("eager", parse_bool, True, "decode each reply as soon as its file is complete, "
               "before Flower hands over the reply"),
    )

    def __init__(self, url: TransportSpec | str, run_id, options, root: str):
        super().__init__(url, run_id, options)
        options = self.options
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise LinkError(f"{self.scheme}:// root {self.root!r} is not a directory")
        if not os.access(self.root, os.W_OK):
            raise LinkError(f"{self.scheme}:// root {self.root!r} is not writable")
        self.mode = options.mode
        # uploads must be owned by this user unless the mode shares files with a group
        self._owner = os.geteuid() if not self.mode & 0o077 else None
        self.fsync = options.fsync
        self._published: dict[str, str] = {}
        self._eager = _EagerDecoder() if options.eager else None

    # names -> paths -> descriptors
    def _path(self, name: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        return os.path.join(self.root, f"{self.prefix}-{safe}")

    def _desc(self, path: str) -> dict[str, Any]:
        return {"path": path}

    def _claimed_path(self, loc: dict[str, Any]) -> str:
        p = loc.get("path") if isinstance(loc, dict) else None
        if not isinstance(p, str) or "\x00" in p or not os.path.isabs(p):
            raise RefError("reply location is not an absolute path")
        return p

    def publish(self, name: str, payload: EncodedPayload) -> dict[str, Any]:
        path = self._path(name)
        atomic_write(path, payload, mode=self.mode, fsync=self.fsync)
        self._published[name] = path
        return self._desc(path)

    def release(self, name: str) -> None:
        path = self._published.pop(name, None)
        if path:
            remove_path(path)

    def issue_slot(self, name: str, max_size: int) -> dict[str, Any]:
        path = self._path(name)
        if self._eager is not None:
            self._eager.add(path, max_size)
        return {**self._desc(path), "mode": f"{self.mode:o}"}

    def on_upload(self, slot: dict[str, Any], fn) -> bool:
        """See ServerLink.on_upload: called when the slot's file appears (renamed into
        place complete), instead of the eager decode."""
        if self._eager is None:
            return False
        path = self._claimed_path(slot)
        remote = self._remote(path, None)
        if remote is not None:  # aggregation=ray: the shard owners read the file
            def hooked(src, _inner=fn, _remote=remote):
                src.remote = {**_remote, "size": src.size}
                _inner(src)

            self._eager.hook(path, hooked)
            return True
        self._eager.hook(path, fn)
        return True

    def _remote(self, path: str, size: int | None) -> dict[str, Any] | None:
        """What another process needs to read this upload (``aggregation=ray``'s shard
        owners, :mod:`..aggregation.ray_shards`): the path THIS link issued (never one a
        client named), its size and owner; None where others cannot read it."""
        return None

    @property
    def last_landed(self) -> float | None:
        return self._eager.last_landed if self._eager is not None else None

    def open_upload(self, slot: dict[str, Any], loc: dict[str, Any], size: int) -> PayloadSource:
        claimed = self._claimed_path(loc)
        parent = os.path.realpath(os.path.dirname(os.path.normpath(claimed)))
        if parent != self.root or os.path.normpath(claimed) != claimed:
            raise RefError(f"reply location {claimed!r} is outside the link's root {self.root!r}")
        expected = self._claimed_path(slot)
        if claimed != expected:
            raise RefError(f"reply location {claimed!r} is not the location issued for this slot")
        src = open_payload(claimed, size, owner=self._owner)  # checked, decoded or not
        remote = self._remote(expected, size)
        if remote is not None:
            src.remote = remote
        pre = self._eager.take(claimed, size) if self._eager is not None else None
        if pre is not None:
            src.predecoded = lambda timeout=None: pre.result(timeout)
        return src

    def discard_slot(self, slot: dict[str, Any]) -> None:
        path = self._claimed_path(slot)
        if self._eager is not None:
            self._eager.drop(path)
        remove_path(path)

    def close(self) -> None:
        if self._eager is not None:
            self._eager.close()
        for name in list(self._published):
            self.release(name)
        try:
            entries = os.listdir(self.root)
        except OSError:
            return
        for e in entries:  # slots, temporaries, anything else of this run
            if e.lstrip(".").startswith(self.prefix):
                remove_path(os.path.join(self.root, e))

    @classmethod
    def _cleanup_root(cls, root: str, dry_run: bool, all_: bool) -> list[str]:
        found = []
        try:
            entries = sorted(os.listdir(root))
        except FileNotFoundError:
            return []
        for e in entries:
            if not e.lstrip(".").startswith(NAME_PREFIX):
                continue
            pid = owner_pid(e)
            if not all_ and pid is not None and pid_alive(pid):
                continue  # a live run owns it
            path = os.path.join(root, e)
            if not os.path.lexists(path):
                continue
            # whatever it is (a file, or a directory/FIFO/link a client put at its
            # slot path): ftx- names are ours; removal never follows a link
            if dry_run or remove_path(path):
                found.append(path)
        return found


class ShmServerLink(_FsServerLink):
    """``shm://``: payloads in POSIX shared memory (``/dev/shm``)."""

    scheme = "shm"
    default_cleanup_url = "shm://"

    @classmethod
    def local_url(cls, workdir: str, host: str = "127.0.0.1") -> str | None:
        return "shm://"

    def __init__(self, url: TransportSpec | str, run_id, options: dict[str, Any] | None = None):
        t = as_spec(url)
        netloc, path, url = t.netloc, t.path, t.url
        if netloc or path.strip("/"):
            raise ValueError(f"shm:// takes no host or path (got {url!r}); use 'shm://'")
        if not os.path.isdir(SHM_DIR):
            raise LinkError(f"{SHM_DIR} is missing: shm:// needs Linux POSIX shared memory; use file://")
        super().__init__(t, run_id, options, SHM_DIR)
        self.fsync = False

    def _desc(self, path: str) -> dict[str, Any]:
        return {"name": os.path.basename(path)}

    def _claimed_path(self, loc: dict[str, Any]) -> str:
        return _shm_path(loc)

    @classmethod
    def cleanup(cls, url: TransportSpec | str, *, dry_run: bool = False,
                all_: bool = False) -> list[str]:
        return cls._cleanup_root(SHM_DIR, dry_run, all_)


def _shm_path(loc: dict[str, Any]) -> str:
    name = loc.get("name") if isinstance(loc, dict) else None
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in {".", ".."}:
        raise RefError(f"invalid shm:// segment name {name!r}")
    return os.path.join(SHM_DIR, name)


def _file_root(url: TransportSpec | str) -> str:
    t = as_spec(url)
    netloc, path, url = t.netloc, t.path, t.url
    if netloc not in ("", "localhost"):
        raise ValueError(f"file:// URLs name a local or mounted directory, not host {netloc!r}")
    if not path or not os.path.isabs(path):
        raise ValueError(f"file:// needs an absolute directory, e.g. file:///shared/dir (got {url!r})")
    return path


class FileServerLink(_FsServerLink):
    """``file:///dir``: payloads as files in a directory every party can see."""

    scheme = "file"

    @classmethod
    def local_url(cls, workdir: str, host: str = "127.0.0.1") -> str | None:
        return f"file://{os.path.abspath(workdir)}"

    def __init__(self, url: TransportSpec | str, run_id, options: dict[str, Any] | None = None):
        super().__init__(url, run_id, options, _file_root(url))

    def _remote(self, path: str, size: int | None) -> dict[str, Any] | None:
        return {"kind": "file", "path": path, "size": size, "owner": self._owner,
                "label": os.path.basename(path)}

    @classmethod
    def cleanup(cls, url: TransportSpec | str, *, dry_run: bool = False,
                all_: bool = False) -> list[str]:
        return cls._cleanup_root(os.path.realpath(_file_root(url)), dry_run, all_)


class _FsClientLink(ClientLink):
    def _resolve(self, loc: dict[str, Any]) -> str:
        raise NotImplementedError

    def open(self, loc: dict[str, Any], size: int) -> PayloadSource:
        return open_payload(self._resolve(loc), size)

    def upload(self, slot: dict[str, Any], payload: EncodedPayload) -> dict[str, Any]:
        path = self._resolve(slot)
        try:
            mode = int(str(slot.get("mode", "600")), 8) & 0o666
        except ValueError:
            raise RefError("ticket slot has an invalid mode") from None
        atomic_write(path, payload, mode=mode)
        return {k: v for k, v in slot.items() if k != "mode"}

    def endpoints(self, desc: dict[str, Any], *, upload: bool) -> list[Endpoint]:
        """The one file the location / slot names."""
        if not isinstance(desc, dict):
            raise RefError(f"{self.scheme}:// descriptor is not an object")
        return [Endpoint.file("name" if self.scheme == "shm" else "path", self._resolve(desc))]


class ShmClientLink(_FsClientLink):
    scheme = "shm"

    def _resolve(self, loc: dict[str, Any]) -> str:
        return _shm_path(loc)


class FileClientLink(_FsClientLink):
    scheme = "file"

    def _resolve(self, loc: dict[str, Any]) -> str:
        p = loc.get("path") if isinstance(loc, dict) else None
        if not isinstance(p, str) or "\x00" in p or not os.path.isabs(p):
            raise RefError("file:// location is not an absolute path")
        if os.path.normpath(p) != p or not _NAME_RE.match(os.path.basename(p)):
            raise RefError(f"file:// location {p!r} is not a flwr-transports payload name")
        return p

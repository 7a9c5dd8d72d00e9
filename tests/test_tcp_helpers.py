"""Helpers for the tcp:// / rdma:// tests: a fault-injecting TCP proxy, payloads."""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
from flwr.app import ArrayRecord

from flwr_transports.codec import encode


def make_payload(nbytes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rec = ArrayRecord([rng.random(nbytes // 8), np.arange(5, dtype=np.int32)])
    return rec, encode(rec)


class FaultProxy:
    """Forward 127.0.0.1:port -> upstream; optionally damage the FIRST connection.

    ``kill_after=(direction, nbytes)``: close both sides once that many bytes went
    that way ("down" = server->client, "up" = client->server).
    ``flip_at=(direction, offset)``: invert one byte at that stream offset.
    """

    def __init__(self, upstream_port: int, kill_after=None, flip_at=None):
        self.upstream = upstream_port
        self.kill_after, self.flip_at = kill_after, flip_at
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns = 0
        self.killed = 0
        self.flipped = 0
        self._socks: list[socket.socket] = []
        self._stop = False
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.upstream))
            first = self.conns == 0
            self.conns += 1
            self._socks += [c, u]
            for src, dst, d in ((c, u, "up"), (u, c, "down")):
                threading.Thread(target=self._pump, args=(src, dst, d, first, c, u),
                                 daemon=True).start()

    def _pump(self, src, dst, direction, first, c, u):
        seen = 0
        buf = bytearray(256 * 1024)
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                chunk = buf[:n]
                if first and self.flip_at and self.flip_at[0] == direction:
                    off = self.flip_at[1] - seen
                    if 0 <= off < n:
                        chunk[off] ^= 0xFF
                        self.flipped += 1
                if first and self.kill_after and self.kill_after[0] == direction:
                    limit = self.kill_after[1] - seen
                    if limit <= n:
                        dst.sendall(chunk[:max(limit, 0)])
                        self.killed += 1
                        for s in (c, u):
                            try:
                                s.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                        return
                dst.sendall(chunk)
                seen += n
        except OSError:
            pass
        finally:
            for s in (dst,):
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def close(self):
        self._stop = True
        self.sock.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass


def self_signed_cert(tmp_path, cn: str = "localhost"):
    """A throwaway self-signed certificate + key (PEM files) for TLS tests."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cp, kp = os.path.join(tmp_path, f"{cn}.crt"), os.path.join(tmp_path, f"{cn}.key")
    with open(cp, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kp, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cp, kp


def mapping_of(buf) -> tuple[int, str]:
    """(bytes of ``buf``'s mapping resident in this process, the mapping's path) read
    from /proc/self/smaps: what a spill buffer keeps in the process."""
    addr = int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)
    found, rss, path = False, 0, ""
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                if found:
                    break
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                found = lo <= addr < hi
                path = " ".join(head[5:]) if found else ""
            elif found and head[0] == "Rss:":
                rss = int(head[1]) * 1024
    assert found, "no mapping holds the buffer"
    return rss, path


def raw_put(slot: dict, size: int, chunks: dict | None = None, *, timeout: float = 5.0):
    """A hand-driven upload into ``slot`` (a client that follows no client code: a
    hostile one, or one mixing wires): PUT_OPEN announcing ``size`` bytes, then the
    chunks given as {index: bytes} (each answered OK). Returns the open socket."""
    import zlib

    from flwr_transports.links import chunks as ch

    oid, tok, cs = slot["id"].encode(), bytes.fromhex(slot["token"]), slot["chunk_size"]
    s = socket.create_connection(("127.0.0.1", slot["port"]), timeout=timeout)

    def answer() -> tuple[int, bytes]:
        _, st, _, _, _, n, _ = ch.RSP.unpack(ch.recv_exact(s, ch.RSP.size))
        return st, ch.recv_exact(s, n)

    s.sendall(ch.REQ.pack(ch.MAGIC_REQ, ch.OP_PUT_OPEN, 0, len(oid), tok, cs, size, 0) + oid)
    st, body = answer()
    assert st == ch.OK, (st, body)
    for i, data in (chunks or {}).items():
        s.sendall(ch.REQ.pack(ch.MAGIC_REQ, ch.OP_PUT, 0, len(oid), tok, i, len(data),
                              zlib.crc32(data)) + oid + data)
        assert answer()[0] == ch.OK
    return s


def spill_maps(directory) -> int:
    """Bytes of unlinked files in ``directory`` (a test's spill_dir) mapped by this
    process: the disk its spill files hold (each is exactly as large as its mapping;
    O_TMPFILE files have no name, only their directory)."""
    prefix = os.path.realpath(str(directory)) + "/"
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if len(head) == 6 and head[5].startswith(prefix) and head[5].rstrip().endswith(
                    "(deleted)"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                total += hi - lo
    return total

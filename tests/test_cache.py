"""Client-side keeping of a payload the server sends again (evaluate -> next train):
the cache's own checks, and a real federation over tcp:// that fetches less."""

from __future__ import annotations

import logging
import os
import stat
import time

import numpy as np
import pytest
from apps_inproc import initial_arrays, make_app
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg
from inproc import InProcessGrid

from flwr_transports import offload
from flwr_transports.codec import encode
from flwr_transports.flower import cache as C
from flwr_transports.links import network_scheme
from flwr_transports.links.tcp import TcpClientLink
from flwr_transports.refs import Reference


def _rec(seed: int = 0, n: int = 50_000) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord([rng.standard_normal(n).astype(np.float32), np.arange(7)])


def _same(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for x, y in zip(a.to_numpy_ndarrays(), b.to_numpy_ndarrays(), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def _kept(c: C.PayloadCache) -> list[str]:
    return [n for n in c.entries() if n.endswith(".ftx")]


def test_keep_then_take_once(tmp_path):
    c = C.PayloadCache(str(tmp_path / "cache"), node=7)
    rec = _rec()
    p = encode(rec)
    c.keep(rec, p.size, p.digest)
    c.wait()
    (name,) = _kept(c)
    path = os.path.join(c.dir, name)
    assert c.dir.endswith("node-7")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(c.dir).st_mode) == 0o700
    got = c.take(p.size, p.digest)
    _same(got, rec)
    assert not os.path.exists(path)  # used once
    assert c.take(p.size, p.digest) is None
    assert not os.path.exists(tmp_path / "cache")  # emptied directories go too


def test_only_exact_bytes_are_kept(tmp_path):
    c = C.PayloadCache(str(tmp_path / "cache"))
    rec = _rec()
    p = encode(rec)
    c.keep(rec, p.size, "sha256t:" + "0" * 64)  # not what the record encodes to
    c.wait()
    assert _kept(c) == []
    c.keep(rec, p.size + 1, p.digest)
    c.wait()
    assert _kept(c) == []


def test_a_changed_file_is_not_used(tmp_path, caplog):
    c = C.PayloadCache(str(tmp_path / "cache"))
    rec = _rec()
    p = encode(rec)
    c.keep(rec, p.size, p.digest)
    c.wait()
    path = c.path(p.digest)
    with open(path, "r+b") as f:
        f.seek(p.size - 3)
        f.write(b"\xff\xfe\xfd")
    with caplog.at_level(logging.WARNING, logger="flwr_transports"):
        assert c.take(p.size, p.digest) is None
    assert "not used" in caplog.text and not os.path.exists(path)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dir", "short"])
def test_hostile_things_at_the_path_are_refused_and_removed(tmp_path, kind):
    c = C.PayloadCache(str(tmp_path / "cache"))
    assert c._ready()
    rec = _rec()
    p = encode(rec)
    path = c.path(p.digest)
    target = tmp_path / "target"
    target.write_bytes(p.to_bytes())  # the right bytes, but not a file we wrote
    if kind == "symlink":
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        os.mkdir(path)
    else:
        with open(path, "wb") as f:
            f.write(p.to_bytes()[:-1])
    t0 = time.monotonic()
    assert c.take(p.size, p.digest) is None
    assert time.monotonic() - t0 < 5  # a FIFO does not block the reader
    assert not os.path.lexists(path)
    assert target.read_bytes() == p.to_bytes()  # a symlink's target is untouched


def test_unsafe_directory_is_not_used(tmp_path):
    base = tmp_path / "cache"
    base.mkdir(mode=0o777)
    os.chmod(base, 0o777)  # writable by anyone: another user could plant files
    c = C.PayloadCache(str(base))
    rec = _rec()
    p = encode(rec)
    c.keep(rec, p.size, p.digest)
    c.wait()
    assert not os.path.exists(c.dir)


def test_one_payload_at_a_time_and_stale_ones_go(tmp_path):
    c = C.PayloadCache(str(tmp_path / "cache"))
    a, b = _rec(1), _rec(2)
    pa, pb = encode(a), encode(b)
    c.keep(a, pa.size, pa.digest)
    c.keep(b, pb.size, pb.digest)  # waits for a's write, then replaces it
    c.wait()
    assert _kept(c) == [os.path.basename(c.path(pb.digest))]
    old = time.time() - C.MAX_AGE - 10
    os.utime(c.path(pb.digest), (old, old))
    junk = os.path.join(c.dir, "." + "a" * 64 + ".ftx.tmp-0123abcd")  # a crashed write
    open(junk, "wb").close()
    os.utime(junk, (old, old))
    mine = os.path.join(c.dir, "notes.txt")  # not ours: never touched
    open(mine, "w").close()
    assert c.take(pa.size, pa.digest) is None  # a miss sweeps
    assert sorted(os.listdir(c.dir)) == ["notes.txt"]


def test_settings(monkeypatch, tmp_path):
    monkeypatch.delenv(C.CACHE_ENV, raising=False)
    assert C.resolve_setting(None).endswith(f"flwr-transports-cache-{os.getuid()}")
    monkeypatch.setenv(C.CACHE_ENV, "off")
    assert C.resolve_setting(None) is None
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path))
    assert C.resolve_setting(None) == str(tmp_path)
    assert C.resolve_setting(False) is None and C.resolve_setting("off") is None
    assert C.resolve_setting(str(tmp_path / "x")) == str(tmp_path / "x")
    assert network_scheme("tcp") and network_scheme("s3")
    assert not network_scheme("shm") and not network_scheme("file")
    assert not network_scheme("nope")


def test_reference_keep_flag():
    ref = Reference(scheme="tcp", loc={}, size=1, digest="sha256t:" + "a" * 64, keep=True)
    assert Reference.from_json(ref.to_json()).keep is True
    ref.keep = False
    raw = ref.to_json()
    assert b"keep" not in raw and Reference.from_json(raw).keep is False
    hostile = raw[:-1] + b',"keep":"yes"}'
    assert Reference.from_json(hostile).keep is False  # only a JSON true counts


# -- a real federation ----------------------------------------------------------------
def _federate(monkeypatch, cache_env: str, rounds: int = 3):
    opens: list[int] = []
    real_open = TcpClientLink.open

    def counting_open(self, loc, size):
        opens.append(size)
        return real_open(self, loc, size)

    monkeypatch.setattr(TcpClientLink, "open", counting_open)
    monkeypatch.setenv(C.CACHE_ENV, cache_env)
    s = offload(FedAvg(), transport="tcp://127.0.0.1:0", aggregation="inner")
    res = s.start(InProcessGrid(make_app()), initial_arrays(), num_rounds=rounds)
    monkeypatch.setattr(TcpClientLink, "open", real_open)
    return res, opens, s


def test_federation_fetches_the_next_rounds_model_once(monkeypatch, tmp_path):
    """3 rounds, 2 nodes, train + evaluate: without the cache every phase fetches (12
    fetches); with it, rounds 2 and 3 train on the model kept from the evaluate phase
    before (8 fetches). The model is the same either way, and nothing is left."""
    base, off_opens, _ = _federate(monkeypatch, "off")
    assert len(off_opens) == 12
    cache_dir = tmp_path / "cache"
    res, on_opens, s = _federate(monkeypatch, str(cache_dir))
    assert len(on_opens) == 8
    _same(base.arrays, res.arrays)
    assert s.stats["replies_rejected"] == 0
    assert not cache_dir.exists()  # the last evaluate was not marked keep; all used


def _planted(tmp_path):
    """A file of ours OUTSIDE the cache, named and placed like a stale kept payload of
    node 3 (what a symlink planted by another user would point the cache at)."""
    rec = _rec()
    p = encode(rec)
    victim = tmp_path / "victim"
    (victim / "node-3").mkdir(parents=True)
    f = victim / "node-3" / f"{p.digest.partition(':')[2]}.ftx"
    f.write_bytes(p.to_bytes())
    os.utime(f, (0, 0))  # stale: any sweep would remove it
    return rec, p, victim, f


@pytest.mark.parametrize("where", ["base", "node"])
def test_a_symlinked_cache_directory_is_neither_read_nor_cleaned(tmp_path, caplog, where):
    """Another local user pre-creates the (predictable) cache directory, or a node's
    directory in it, as a symlink: nothing is read through it (the client fetches the
    model in full), nothing is removed through it (cleanup stays inside the cache), and
    it is said once."""
    rec, p, victim, f = _planted(tmp_path)
    base = tmp_path / "cache"
    if where == "base":
        os.symlink(victim, base)
    else:
        base.mkdir(mode=0o700)
        os.symlink(victim / "node-3", base / "node-3")
    c = C.PayloadCache(str(base), node=3)
    with caplog.at_level(logging.WARNING, logger="flwr_transports"):
        C.sweep_host(str(base), max_age=0)
        assert c.take(p.size, p.digest) is None
        assert c.use_base(p.digest, "", 1 << 30, lambda b: "used") is None
        c.sweep(max_age=0)
        c.discard()
        c.keep(rec, p.size, p.digest)
        c.wait()
    assert f.read_bytes() == p.to_bytes() and os.listdir(victim / "node-3") == [f.name]
    assert caplog.text.count("payloads are fetched in full") == 1
    assert "a symbolic link" in caplog.text


@pytest.mark.parametrize("how", ["other-user", "world-writable", "group-writable"])
def test_a_kept_payload_in_a_directory_others_control_is_not_used(tmp_path, caplog, how):
    """A payload we kept, in a cache directory that then is another user's or writable
    by others (who could swap its files): not read, not removed, said once."""
    if how == "other-user" and os.getuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    base = tmp_path / "cache"
    c = C.PayloadCache(str(base), node=3)
    rec = _rec()
    p = encode(rec)
    c.keep(rec, p.size, p.digest)
    c.wait()
    (name,) = _kept(c)
    if how == "other-user":
        os.chown(base, 65534, 65534)
    else:
        os.chmod(base, 0o777 if how == "world-writable" else 0o770)
    with caplog.at_level(logging.WARNING, logger="flwr_transports"):
        assert c.take(p.size, p.digest) is None
        assert c.use_base(p.digest, "", 1 << 30, lambda b: "used") is None
        C.sweep_host(str(base), max_age=0)
    assert os.path.exists(os.path.join(c.dir, name))
    assert caplog.text.count("payloads are fetched in full") == 1
    os.chown(base, os.getuid(), os.getgid())
    os.chmod(base, 0o700)
    c.discard()
    assert not base.exists()

"""Option parsing and the star WAN topology of ``bench e2e`` (store namespace, one
namespace per client). The topology test needs root (network namespaces)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest
from ftx_bench import cli
from ftx_bench.e2e import _node_prefixes, split_s3_store
from ftx_bench.wan import (
    ADDR_B,
    ADDR_S,
    WanEmulation,
    can_emulate,
    client_addr,
    list_namespaces,
    parse_rate,
)


def test_split_s3_store():
    assert split_s3_store("s3://") == ("moto", "")
    assert split_s3_store("s3://?concurrency=16") == ("moto", "concurrency=16")
    assert split_s3_store("s3://?store=radosgw") == ("radosgw", "")
    assert split_s3_store("s3://?store=radosgw&concurrency=16&part_size=8MiB") == (
        "radosgw", "concurrency=16&part_size=8MiB")
    assert split_s3_store("s3://?concurrency=4&store=moto") == ("moto", "concurrency=4")
    with pytest.raises(ValueError, match="store"):
        split_s3_store("s3://?store=minio")


def test_parse_rate_and_addresses():
    assert parse_rate("1gbit") == 1000
    assert parse_rate("500mbit") == 500
    assert parse_rate("2.5Gbit") == 2500
    for bad in ("1g", "fast", "0mbit", "200gbit"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    assert client_addr(0) == ADDR_B
    addrs = {client_addr(i) for i in range(32)}
    assert len(addrs) == 32 and ADDR_S not in addrs


def test_node_prefixes():
    assert _node_prefixes(None) == []
    one = ["ip", "netns", "exec", "x-b"]
    assert _node_prefixes(one) == [one]
    two = [["ip", "netns", "exec", "x-b"], ["ip", "netns", "exec", "x-b1"]]
    assert _node_prefixes(two) == two


def _args(**kw) -> argparse.Namespace:
    base = {"transports": ["inband"], "topology": "pair", "server_rate": None,
            "client_rate": None, "nodes": 4}
    return argparse.Namespace(**{**base, **kw})


def test_star_options():
    assert cli.star_options(_args()) == {}
    got = cli.star_options(_args(topology="star", server_rate="1gbit"))
    assert got == {"topology": "star", "clients": 4, "server_rate_mbit": 1000.0,
                   "client_rate_mbit": None}
    with pytest.raises(ValueError):  # rates only mean something in the star
        cli.star_options(_args(server_rate="1gbit"))
    with pytest.raises(ValueError):
        cli.star_options(_args(transports=["s3://?store=ceph"]))
    # and the CLI turns it into a usage error before anything starts
    assert cli.main(["e2e", "--sizes", "1KiB", "--transports", "inband",
                     "--server-rate", "1gbit"]) == 2


def test_wan_star_arguments():
    with pytest.raises(ValueError):
        WanEmulation("lan", topology="ring")
    with pytest.raises(ValueError):
        WanEmulation("lan", clients=2)  # several client namespaces need the star
    with pytest.raises(ValueError):
        WanEmulation("lan", topology="star", clients=0)
    w = WanEmulation("20ms/100mbit", topology="star", clients=3, server_rate_mbit=50)
    assert w.client_rate_mbit == 100 and w.server_rate_mbit == 50
    assert len(w.client_prefixes()) == 3 and w.prefix("b2")[-1].endswith("-b2")
    with pytest.raises(ValueError):
        w.prefix("b3")
    with pytest.raises(ValueError):
        WanEmulation("20ms/100mbit").prefix("s")  # no store namespace in the pair


@pytest.mark.skipif(can_emulate() is not None, reason="needs root, ip and tc")
def test_wan_star_up_delays_and_shapes():
    """The store is next to the server (no added delay) and across the WAN from every
    client; each client's link and the server's uplink carry their own tbf."""
    w = WanEmulation("40ms/200mbit", topology="star", clients=2, server_rate_mbit=100)
    with w:
        names = set(list_namespaces())
        assert {w.ns_a, w.ns_s, *w.client_ns, w.ns_r} <= names
        assert w.measure_rtt_ms(n=2, dst="s") < 5
        assert 39 < w.measure_rtt_ms(n=2, src="b1", dst="s") < 60
        assert 39 < w.measure_rtt_ms(n=2, src="b1", dst="a") < 60
        qd = subprocess.run(["tc", "-n", w.ns_a, "qdisc", "show", "dev", "a0"],
                            capture_output=True, text=True, check=True).stdout
        assert "tbf" in qd and "100Mbit" in qd
        qd = subprocess.run(["tc", "-n", w.client_ns[1], "qdisc", "show", "dev", "b0"],
                            capture_output=True, text=True, check=True).stdout
        assert "200Mbit" in qd
    assert not ({w.ns_a, w.ns_s, *w.client_ns, w.ns_r} & set(list_namespaces()))
    assert os.getuid() == 0


# -- the real store's prep step: Ceph is fetched BEFORE entering a namespace --------------
def test_radosgw_in_a_namespace_needs_the_packages_fetched_first(tmp_path, monkeypatch):
    """Started behind a namespace prefix with an empty cache, the store fails at once with
    the reason (it used to run 'radosgw start' inside the namespace, which has no network,
    and fail there on apt-get download)."""
    from ftx_bench import e2e, radosgw

    empty = tmp_path / "empty-cache"
    monkeypatch.setattr(radosgw, "DEFAULT_CACHE", str(empty))
    with pytest.raises(RuntimeError, match="before entering a network namespace"):
        e2e._start_radosgw("10.0.0.1", ["false"], str(empty))
    assert not empty.exists()  # nothing was attempted
    assert e2e.prepare_stores(["inband", "tcp://", "s3://?store=moto"]) is None
    assert not empty.exists()


@pytest.mark.radosgw
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(can_emulate() is not None, reason="needs root, ip and tc")
def test_star_store_prep_from_an_empty_cache(tmp_path, monkeypatch):
    """What 'ftx-bench e2e --wan ... --topology star --transports s3://?store=radosgw'
    does before its runs, from an EMPTY Ceph cache: prepare_stores downloads the packages
    here (outside every namespace), then radosgw starts inside the store's namespace,
    which has no route out, and serves S3 on its WAN address."""
    if os.environ.get("FTX_RADOSGW") == "0":
        pytest.skip("radosgw: not downloaded (FTX_RADOSGW=0)")
    from ftx_bench import e2e, radosgw

    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        pytest.skip("apt-get/dpkg not found: radosgw needs a Debian/Ubuntu host")
    empty = tmp_path / "ceph-cache"
    monkeypatch.setattr(radosgw, "DEFAULT_CACHE", str(empty))
    transports = ["inband", "s3://?store=radosgw"]
    cache = e2e.prepare_stores(transports)  # the driver's step, in this namespace
    assert cache == str(empty)
    assert (empty / "root" / "usr" / "bin" / "radosgw").is_file()
    w = WanEmulation("20ms/1gbit", topology="star", clients=1)
    with w:
        routes = subprocess.run(["ip", "-n", w.ns_s, "route", "show", "default"],
                                capture_output=True, text=True, check=True).stdout
        assert routes.strip() == ""  # no way out of the store's namespace
        # what _S3 does for a star WAN (from the driver inside namespace A)
        state = e2e._start_radosgw(w.addr_s, w.prefix("s"), cache)
        try:
            assert state["endpoint"].startswith(f"http://{w.addr_s}:")
            assert state["root"].startswith(str(empty))
            # served on the store's WAN address, reachable from the server's namespace
            probe = subprocess.run(
                [*w.prefix("a"), sys.executable, "-c",
                 ("import sys, urllib.request; "
                  "print(urllib.request.urlopen(sys.argv[1], timeout=20).status)"),
                 state["endpoint"]], capture_output=True, text=True, timeout=60, check=False)
            assert probe.stdout.strip() == "200", probe.stderr[-2000:]
        finally:
            radosgw.stop(state["dir"])

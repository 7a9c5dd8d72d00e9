"""Options have one owner; the registry is open.

Every option is declared once (name, parser, default, doc) by the wrapper or by a link;
the URL query and ``offload(**kwargs)`` are parsed ONCE, at ``offload()``; the wrapper
keeps its keys and the link is built with the rest. The docs' option tables are
generated from the declarations (checked here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

from flwr_transports import offload
from flwr_transports.errors import ConfigError, FlwrTransportsError, RejectedInput
from flwr_transports.flower.wrapper import WRAPPER_OPTIONS
from flwr_transports.links import (
    LinkError,
    link_classes,
    register_link,
    schemes,
    server_link,
    unregister_link,
)
from flwr_transports.options import Options, parse_size
from flwr_transports.refs import RefError

sys.path.insert(0, str(Path(__file__).parent))
from inproc import InProcessGrid
from test_offload import initial_arrays, make_app

REPO = Path(__file__).resolve().parent.parent
WRAPPER_URL = ("threshold=4MiB&max_reply_size=64MiB&reply_slots=1&fetch_workers=2"
               "&aggregation=inner")


def _links_here(tmp_path):
    urls = {"shm": "shm://", "file": f"file://{tmp_path}", "tcp": "tcp://127.0.0.1:0"}
    return urls


@pytest.mark.parametrize("scheme", ["shm", "file", "tcp"])
def test_every_wrapper_option_in_the_url_builds_the_link_and_runs(scheme, tmp_path):
    """The bug this replaces: wrapper options in the URL reached the link and failed at
    the first round ("unknown option(s) for shm:// link: threshold")."""
    url = _links_here(tmp_path)[scheme]
    sep = "&" if "?" in url else "?"
    s = offload(FedAvg(), transport=f"{url}{sep}{WRAPPER_URL}")
    assert (s.threshold, s.max_reply_size, s.reply_slots, s.fetch_workers) == (
        4 * 2**20, 64 * 2**20, 1, 2)
    assert set(s.link_options) == set(link_classes(scheme)[0].option_names())
    # the link is really built and used: a round with a model above the threshold
    big = initial_arrays(1_200_000)  # 4.6 MiB: above the threshold
    result = s.start(InProcessGrid(make_app()), big, num_rounds=1)
    ref = FedAvg().start(InProcessGrid(make_app(with_mod=False)), big, num_rounds=1)
    assert s.stats["link_bytes_sent"] >= big.count_bytes()
    assert s.stats["link_bytes_received"] >= 2 * big.count_bytes()
    assert s.stats["replies_rejected"] == 0
    for k in ref.arrays:
        assert np.array_equal(result.arrays[k].numpy(), ref.arrays[k].numpy())


def test_link_options_are_typed_and_defaults_filled(tmp_path):
    s = offload(FedAvg(), transport=f"file://{tmp_path}?mode=640", eager="false")
    assert s.link_options == {"mode": 0o640, "fsync": False, "eager": False}
    assert isinstance(s.link_options, Options) and s.link_options.mode == 0o640
    s = offload(FedAvg(), transport="tcp://127.0.0.1:0?streams=auto&chunk_size=2MiB")
    assert s.link_options.streams == 0 and s.link_options.chunk_size == 2 * 2**20
    assert s.link_options.timeout == 60.0 and s.link_options.max_conns == 256


@pytest.mark.parametrize("transport, kwargs", [
    ("shm://?treshold=4MiB", {}),
    ("shm://", {"fetch_worker": 2}),
    ("tcp://127.0.0.1:0?stream=4", {}),
    (f"file:///tmp?{WRAPPER_URL}&moed=600", {}),
])
def test_a_typo_fails_at_offload_with_both_option_lists(transport, kwargs):
    with pytest.raises(ConfigError) as ei:
        offload(FedAvg(), transport=transport, **kwargs)
    msg = str(ei.value)
    scheme = transport.split(":")[0]
    assert "unknown option" in msg
    assert all(o.name in msg for o in WRAPPER_OPTIONS)
    assert all(n in msg for n in link_classes(scheme)[0].option_names())


@pytest.mark.parametrize("transport, kwargs, what", [
    ("shm://?mode=999", {}, "mode"),
    ("shm://?threshold=lots", {}, "threshold"),
    ("tcp://127.0.0.1:0?window=0", {}, "window"),
    ("tcp://127.0.0.1:0?chunk_size=1KiB", {}, "chunk_size"),
    ("shm://", {"reply_slots": 99}, "reply_slots"),
    ("shm://?eager=perhaps", {}, "eager"),
])
def test_a_bad_value_fails_at_offload_naming_the_option(transport, kwargs, what):
    with pytest.raises(ConfigError, match=what):
        offload(FedAvg(), transport=transport, **kwargs)


def test_error_hierarchy():
    assert issubclass(ConfigError, FlwrTransportsError) and issubclass(ConfigError, ValueError)
    assert issubclass(RejectedInput, FlwrTransportsError)
    assert issubclass(RefError, RejectedInput)
    from flwr_transports.codec import PayloadError

    assert issubclass(PayloadError, RejectedInput)
    assert issubclass(LinkError, FlwrTransportsError)
    assert not issubclass(ConfigError, RejectedInput)
    with pytest.raises(ConfigError):
        parse_size("12 parsecs")


def _update_docs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("option_docs",
                                                  REPO / "scripts" / "option_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.update_docs


def test_docs_option_tables_are_generated_from_the_code():
    stale = _update_docs()(str(REPO / "docs"), check=True)
    assert stale == [], (f"option tables out of date in {stale}: run "
                         "python scripts/option_docs.py")
    for scheme in ("shm", "file", "tcp", "s3"):
        text = (REPO / "docs" / "links" / f"{scheme}.md").read_text()
        for name in link_classes(scheme)[0].option_names():
            assert f"| `{name}` |" in text, (scheme, name)


def test_register_link_validates_and_refuses_duplicates():
    from flwr_transports.testing.memlink import MemServerLink

    with pytest.raises(ConfigError, match="already registered"):
        register_link("shm", MemServerLink)
    with pytest.raises(ConfigError, match="invalid link scheme"):
        register_link("in band", MemServerLink)
    with pytest.raises(ConfigError, match="not a ServerLink"):
        register_link("bogus", object, object)
    register_link("memx", MemServerLink)  # client class from MemServerLink.client_class
    try:
        assert "memx" in schemes()
        s = offload(FedAvg(), "memx://?verbose=true&threshold=2MiB")
        assert s.link_options == {"verbose": True} and s.threshold == 2 * 2**20
        with pytest.raises(ConfigError, match="verbose"):
            offload(FedAvg(), "memx://?verbos=true")
        assert server_link("memx://", 1).options.verbose is False
    finally:
        unregister_link("memx")
    with pytest.raises(ConfigError, match="unknown transport scheme"):
        offload(FedAvg(), "memx://")


def test_missing_dependency_names_the_extra():
    register_link("needsdep", "flwr_transports_no_such_module:Server",
                  "flwr_transports_no_such_module:Client", extra="nope")
    try:
        with pytest.raises(LinkError, match=r"flwr-transports\[nope\]"):
            offload(FedAvg(), "needsdep://")
    finally:
        unregister_link("needsdep")


def test_cleanup_and_doctor_iterate_the_registry(capsys):
    from flwr_transports import doctor
    from flwr_transports.cleanup import default_urls
    from flwr_transports.testing.memlink import MemServerLink

    register_link("memd", MemServerLink)
    try:
        rep = doctor.report()
        assert list(rep)[:5] == ["shm", "file", "s3", "tcp", "rdma"]
        assert rep["memd"]["ok"] and "MemServerLink" in rep["memd"]["detail"]
        assert "shm://" in default_urls()
    finally:
        unregister_link("memd")


def test_record_default_threshold_keeps_small_models_inband():
    s = offload(FedAvg(), "shm://")
    s.start(InProcessGrid(make_app()), initial_arrays(1000), num_rounds=1)
    assert s.stats["link_bytes_sent"] == 0 and s.stats["inband_bytes_sent"] > 0

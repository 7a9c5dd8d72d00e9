"""Offload's own receive loop (flwr_transports/flower/receive.py), in process.

A Grid that runs each ClientApp in a thread when its message is pushed and hands the
reply out on the first pull after it finished (as a SuperLink does), and declares
``send_and_receive_polls``: the wrapper pushes and pulls itself. Checked: replies are
pulled as soon as the uploads land (the backoff alone would wait 30 s here); Flower's
semantics stay: the timeout (no pull at or after it; ``timeout=0`` pulls nothing), a
node that never answers, a late reply rejected, error replies passed on, replies in
pull order; the inner strategy sees the user's grid; in-band runs keep the grid's own
send_and_receive. The real deployment is tests/integration/test_receive_deployment.py.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.superlink.grid import HttpGrid, InMemoryGrid

from flwr_transports import offload
from flwr_transports.flower import receive as R
from flwr_transports.flower.wrapper import REJECTED_REPLY_CODE, OffloadGrid
from flwr_transports.links.base import ServerLink

sys.path.insert(0, str(Path(__file__).parent))
from apps_inproc import initial_arrays, make_app
from inproc import InProcessGrid


def _rdma_here() -> bool:
    try:
        from flwr_transports.links import rdma

        rdma.load_nixl()
        return True
    except Exception:  # noqa: BLE001 - NIXL missing: rdma:// is not tested here
        return False


TRANSPORTS = ["shm://", "tcp://127.0.0.1:0",
              pytest.param("rdma://127.0.0.1:0?chunk_size=256KiB", marks=pytest.mark.skipif(
                  not _rdma_here(), reason="NIXL is not installed"))]


class PollGrid(InProcessGrid):
    """Pushed messages run at once in threads; each reply is pullable ``delays[node]``
    s after its ClientApp returned (``never``: nodes that never answer). Pull start times are
    kept. Its own ``send_and_receive`` is a push + pull loop (what in-band runs use)."""

    send_and_receive_polls = True

    def __init__(self, app, n_nodes: int = 2, delays: dict[int, float] | None = None,
                 never: tuple[int, ...] = (), **kw: Any):
        super().__init__(app, n_nodes, **kw)
        self.delays, self.never = delays or {}, set(never)
        self.done: dict[str, Message] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.pushed_at: list[float] = []
        self.pull_starts: list[float] = []
        self.own_loop_calls = 0

    def push_messages(self, messages):
        ids = list(super().push_messages(messages))
        self.pushed_at.append(time.time())
        for mid in ids:
            msg = self._pending.pop(mid)
            node = msg.metadata.dst_node_id
            if node in self.never:
                continue
            t = threading.Thread(target=self._answer, args=(mid, msg, self.delays.get(node, 0.0)))
            t.start()
            self.threads.append(t)
        return ids

    def _answer(self, mid: str, msg: Message, delay: float) -> None:
        reply = self._execute(msg)  # fetch, train, upload: the upload lands now
        time.sleep(delay)  # then the reply travels through Flower
        with self.lock:
            self.done[mid] = reply

    def pull_messages(self, message_ids):
        self.pull_starts.append(time.time())
        with self.lock:
            return [self.done.pop(m) for m in list(message_ids) if m in self.done]

    def send_and_receive(self, messages, *, timeout=None):
        self.own_loop_calls += 1
        ids = set(self.push_messages(messages))
        end, out = time.time() + (timeout or 0.0), []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(ids))
            out += got
            ids -= {m.metadata.reply_to_message_id for m in got}
            if not ids:
                break
            time.sleep(0.05)
        return out

    def join(self) -> None:
        for t in self.threads:
            t.join(30)


def _msgs(grid: Grid, rnd: int = 1) -> list[Message]:
    content = RecordDict({"arrays": initial_arrays(), "config": ConfigRecord({"server-round": rnd})})
    return [grid.create_message(content, "train", n, str(rnd)) for n in grid.get_node_ids()]


@pytest.fixture
def slow_backoff(monkeypatch):
    """Without a landing the loop would now wait 30 s between pulls."""
    monkeypatch.setattr(R, "MIN_WAIT", 30.0)
    monkeypatch.setattr(R, "MAX_WAIT", 30.0)


def test_polls_replies_only_for_push_then_poll_grids():
    class OwnLoop(HttpGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return []

    assert R.polls_replies(HttpGrid.__new__(HttpGrid))  # Flower's deployment grid
    assert not R.polls_replies(OwnLoop.__new__(OwnLoop))  # its own send_and_receive
    assert not R.polls_replies(InMemoryGrid.__new__(InMemoryGrid))  # polls every 0.1 s
    assert not R.polls_replies(InProcessGrid(make_app()))
    assert R.polls_replies(PollGrid(make_app()))  # declared


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_replies_pulled_as_soon_as_the_uploads_land(transport, slow_backoff):
    grid = PollGrid(make_app(), 2, delays={101: 0.2, 102: 0.5})
    with OffloadGrid(grid, transport) as og:
        replies = list(og.send_and_receive(_msgs(og), timeout=120))
        assert sorted(r.metadata.src_node_id for r in replies) == [101, 102]
        assert not any(r.has_error() for r in replies)
        # the backoff alone would have pulled at 0 s and 30 s: each landing woke it
        assert grid.pull_starts[-1] - grid.pushed_at[0] < 10.0, grid.pull_starts
        assert og.stats["pulls"] == len(grid.pull_starts) == og.stats["receive_pulls"][0]
        assert og.link.last_landed is not None
    grid.join()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timeout_slow_and_silent_nodes_late_reply_rejected(transport):
    grid = PollGrid(make_app(), 3, delays={102: 1.5}, never=(103,))
    with OffloadGrid(grid, transport) as og:
        msgs = _msgs(og)
        replies = list(og.send_and_receive(msgs, timeout=0.6))
        end = grid.pull_starts[0] + 0.6  # the first pull starts right after the loop did
        assert [r.metadata.src_node_id for r in replies] == [101]
        assert not replies[0].has_error() and "arrays" in replies[0].content
        # Flower's loop: no pull starts at or after the deadline
        assert grid.pull_starts and max(grid.pull_starts) < end
        grid.join()  # node 102 answers now, after the timeout: its ticket is gone
        late = list(og.pull_messages([m.metadata.message_id for m in msgs]))
        assert [r.metadata.src_node_id for r in late] == [102]
        assert late[0].has_error() and late[0].error.code == REJECTED_REPLY_CODE
        assert og.stats["replies_rejected"] == 1


def test_timeout_zero_pulls_nothing_as_flower_does():
    grid = PollGrid(make_app(), 2)
    with OffloadGrid(grid, "shm://") as og:
        assert list(og.send_and_receive(_msgs(og), timeout=0)) == []
        assert grid.pull_starts == [] and og.stats["receive_pulls"] == [0]
        grid.join()  # the clients' uploads land before close() sweeps the run's names
        prefix = og.link.prefix
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def test_error_replies_pass_through_in_pull_order():
    app = make_app()

    def raising(msg, ctx):
        if ctx.node_id == 102:
            raise RuntimeError("node 102 broke")
        return app(msg, ctx)

    grid = PollGrid(raising, 2, delays={101: 0.4})
    with OffloadGrid(grid, "shm://") as og:
        replies = list(og.send_and_receive(_msgs(og), timeout=None))
        assert [r.metadata.src_node_id for r in replies] == [102, 101]  # as they came
        assert replies[0].has_error()
        assert replies[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert not replies[1].has_error()
    grid.join()


def test_strategy_loop_same_result_inner_sees_the_users_grid():
    seen: list[Grid] = []

    class Spy(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            seen.append(grid)
            return super().configure_train(server_round, arrays, config, grid)

    grid = PollGrid(make_app(), 2, delays={102: 0.1})
    s = offload(Spy(), "shm://", aggregation="inner")  # bit-exact with FedAvg
    res = s.start(grid, initial_arrays(), num_rounds=2)
    assert seen == [grid, grid] and grid.own_loop_calls == 0
    assert len(s.stats["receive_pulls"]) == 4  # train + evaluate, 2 rounds
    assert s.stats["pulls"] == sum(s.stats["receive_pulls"]) == len(grid.pull_starts)
    ref = offload(FedAvg(), "inband").start(InProcessGrid(make_app()), initial_arrays(),
                                            num_rounds=2)
    for a, b in zip(res.arrays.to_numpy_ndarrays(), ref.arrays.to_numpy_ndarrays(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    grid.join()


def test_inband_keeps_the_grids_own_send_and_receive():
    grid = PollGrid(make_app(), 2)
    s = offload(FedAvg(), "inband")
    s.start(grid, initial_arrays(), num_rounds=1)
    assert grid.own_loop_calls == 2 and s.stats["pulls"] == 0
    grid.join()


class _Link(ServerLink):
    scheme = "test"

    def publish(self, name, payload):
        return {}

    def release(self, name):
        pass

    def issue_slot(self, name, max_size):
        return {}

    def open_upload(self, slot, loc, size):
        raise NotImplementedError

    def discard_slot(self, slot):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("notify", [True, False])
def test_wait_landed_wakes_on_a_landing(notify):
    link = _Link("test://", 1, {})
    assert link.wait_landed(None, 0.05) is None  # nothing lands: the timeout
    link.last_landed = 1.0
    assert link.wait_landed(None, 0.0) == 1.0
    assert link.wait_landed(1.0, 0.05) == 1.0  # nothing new

    def land():
        time.sleep(0.1)
        link.last_landed = 2.0
        if notify:
            link.notify_landed()

    t = threading.Thread(target=land)
    t.start()
    assert link.wait_landed(1.0, 30.0) == 2.0  # woken (a timeout would return 1.0 late)
    t.join()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_uploads_fold_as_they_land_on_every_network_link(transport):
    """The landing hook is there on each link: streaming aggregation folds every
    upload when it lands (rdma:// too), and the result equals the in-band FedAvg."""
    grid = PollGrid(make_app(), 2, delays={101: 0.2, 102: 0.2})
    s = offload(FedAvg(), transport, aggregation="streaming")
    res = s.start(grid, initial_arrays(), num_rounds=1)
    grid.join()
    assert s.stats["agg_eager_folds"] == 2 and s.stats["agg_rebuilds"] == 0
    assert len(s.stats["agg_tail_s"]) == 1  # the link reported when the uploads landed
    ref = offload(FedAvg(), "inband").start(InProcessGrid(make_app()), initial_arrays(),
                                            num_rounds=1)
    for a, b in zip(res.arrays.to_numpy_ndarrays(), ref.arrays.to_numpy_ndarrays(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

"""Offload's own receive loop: replies pulled as soon as they can be.

Flower's deployment Grid (``HttpGrid.send_and_receive``) pushes the messages, pulls,
and then sleeps a fixed 3 s between pulls until every reply is in or the timeout has
passed. With payloads on a link, the ServerApp knows more than Flower does: the link
sees each reply's upload land, and the Flower reply follows within a fraction of a
second. :func:`receive` is the same loop with a different pace:

* it pulls at once after the push (as Flower does), then waits with a short backoff
  (``MIN_WAIT`` doubling up to ``MAX_WAIT``) for phases where nothing lands (evaluate
  metrics, error replies);
* a landed upload (``ServerLink.wait_landed``) wakes it at once, and for
  ``LANDED_WINDOW`` seconds after a landing, or after a reply came in, the waits stay
  at or below ``LANDED_WAIT`` (the reply follows the upload through the SuperNode,
  which itself checks every 0.5 s for a finished ClientApp);
* everything else is Flower's loop unchanged: ``timeout`` (None: wait forever; the
  loop runs while ``time.time() < push + timeout``, and a reply not pulled by then is
  not returned, so its late arrival is rejected by the wrapper), the replies in the
  order the pulls returned them, error replies passed through as they come.

Cost to the SuperLink: at most one pull per ``MAX_WAIT`` second while nothing
happens, plus about ``LANDED_WINDOW / LANDED_WAIT`` pulls after each landing or
reply (each pull is one small request; ``stats["pulls"]`` counts them).

Only a Grid whose ``send_and_receive`` is known to be that push-then-poll loop is
driven this way (:func:`polls_replies`): Flower's own deployment grids, and any Grid
that declares ``send_and_receive_polls = True`` (a delegating wrapper whose
``send_and_receive`` is push + pull until done). Any other Grid (a simulation's
``InMemoryGrid``, which polls every 0.1 s already, a test grid, a grid of your own)
keeps its own ``send_and_receive``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from .. import trace

#: first wait after a pull that brought nothing (seconds); doubles up to MAX_WAIT
MIN_WAIT = 0.05
#: longest wait between two pulls while nothing lands and no reply comes (seconds)
MAX_WAIT = 1.0
#: after a landed upload or a reply: waits stay at or below this for LANDED_WINDOW s
LANDED_WAIT = 0.2
LANDED_WINDOW = 2.0

#: Flower's Grids whose send_and_receive is push, then pull every 3 s (module, class)
_FLOWER_POLLING_GRIDS = (
    ("flwr.superlink.grid.http_grid", "HttpGrid"),  # flwr 1.42+
    ("flwr.server.grid.grpc_grid", "GrpcGrid"),  # flwr 1.41
    ("flwr.server.grid.http_grid", "HttpGrid"),
)
_known: tuple[Callable[..., Any], ...] | None = None


def _flower_loops() -> tuple[Callable[..., Any], ...]:
    global _known
    if _known is None:
        found = []
        for mod, cls in _FLOWER_POLLING_GRIDS:
            try:
                found.append(getattr(importlib.import_module(mod), cls).send_and_receive)
            except (ImportError, AttributeError):
                continue
        _known = tuple(found)
    return _known


def polls_replies(grid: Grid) -> bool:
    """Whether ``grid.send_and_receive`` is the push-then-poll loop :func:`receive`
    may replace: one of Flower's deployment grids (or a subclass that keeps its
    ``send_and_receive``), or a grid that declares ``send_and_receive_polls = True``."""
    if getattr(grid, "send_and_receive_polls", False) is True:
        return True
    return getattr(type(grid), "send_and_receive", None) in _flower_loops()


def receive(grid: Grid, msg_ids: Iterable[str], timeout: float | None, link: Any,
            stats: dict[str, Any], fields: dict[str, Any] | None = None) -> list[Message]:
    """Pull the replies to ``msg_ids`` (already pushed) until all are in or
    ``timeout`` has passed, waking at once when ``link`` reports a landed upload.
    Pulls with ``grid.pull_messages`` (the wrapped grid: no offload work). Returns the
    replies in the order the pulls returned them. Counts the pulls in
    ``stats["pulls"]`` (total) and ``stats["receive_pulls"]`` (per call); traces a
    ``receive`` event with ``pulls``, ``replies`` and ``landed_to_reply`` (seconds
    from the last upload landing to the pull that brought the last reply)."""
    pull = grid.pull_messages
    pending = set(msg_ids)
    t_start = time.time()
    end_time = t_start + (timeout if timeout is not None else 0.0)
    ret: list[Message] = []
    pulls = 0
    wait = MIN_WAIT
    landed = landed0 = link.last_landed if link is not None else None
    busy_until = 0.0  # monotonic: short waits until then (a landing or a reply)
    last_reply_at: float | None = None  # perf_counter of the pull that brought the last
    while timeout is None or time.time() < end_time:
        res = list(pull(pending))
        pulls += 1
        ret.extend(res)
        pending.difference_update({m.metadata.reply_to_message_id for m in res})
        if res:
            last_reply_at = time.perf_counter()
            busy_until = time.monotonic() + LANDED_WINDOW
            wait = MIN_WAIT
        if not pending:
            break
        left = None if timeout is None else end_time - time.time()
        if left is not None and left <= 0:
            break
        step = wait if left is None else min(wait, left)
        if time.monotonic() < busy_until:
            step = min(step, LANDED_WAIT)
        now_landed = _wait_landed(link, landed, step)
        if now_landed is not None and now_landed != landed:
            landed = now_landed  # an upload landed: its reply follows shortly
            busy_until = time.monotonic() + LANDED_WINDOW
            wait = MIN_WAIT
        else:
            wait = min(wait * 2, MAX_WAIT)
    stats["pulls"] = stats.get("pulls", 0) + pulls
    stats.setdefault("receive_pulls", []).append(pulls)
    extra: dict[str, Any] = {"pulls": pulls, "replies": len(ret), "missing": len(pending)}
    landed = link.last_landed if link is not None else None
    if (landed is not None and landed != landed0 and last_reply_at is not None
            and last_reply_at >= landed):  # an upload of this call landed, then its reply
        extra["landed_to_reply"] = round(last_reply_at - landed, 4)
    trace.record("receive", t_start, time.time(), role="server", **(fields or {}), **extra)
    return ret


def _wait_landed(link: Any, since: float | None, timeout: float) -> float | None:
    """``link.wait_landed(since, timeout)`` where the link has it, else a plain sleep."""
    if link is None:
        time.sleep(max(timeout, 0.0))
        return since
    return link.wait_landed(since, timeout)

"""Public helpers to test Flower apps that use flwr-transports (see docs/testing.md).

* :class:`InProcessGrid` — a Grid that delivers each message to a ClientApp in this
  process. It stands in for the NETWORK only: each node keeps its own ``Context``
  across rounds (as on a SuperNode), every message and reply goes through Flower's own
  object encoding (server and clients never share Python objects), a ClientApp that
  raises becomes an error reply as in Flower's runtime, and the real ClientApp runs
  with its real mods (``payload_mod`` included). Fast: use it for strategy logic.
* :class:`LocalDeployment` — a real Flower deployment on loopback (one SuperLink and
  N SuperNodes as subprocesses, a private ``FLWR_HOME``), started and stopped by a
  context manager; ``dep.run(app_dir, run_config)`` runs ``flwr run`` against it and
  reports the outcome and each process's peak memory. Use it for the real thing.
  Needs only ``psutil`` besides Flower (``pip install 'flwr-transports[testing]'``);
  neither pytest nor moto.

Example::

    from flwr_transports import offload
    from flwr_transports.testing import InProcessGrid

    grid = InProcessGrid(client_app, num_nodes=3)
    result = offload(FedAvg(), "shm://").start(grid, initial_arrays, num_rounds=2)

Flower offers no public in-process Grid; the workarounds this needs (setting the task
identity that ``Message`` requires outside a runtime, and assigning message ids) are
here and nowhere else.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from .deploy import DeploymentError, LocalDeployment, RunResult, run_config_toml

__all__ = [
    "DeploymentError",
    "InProcessGrid",
    "LocalDeployment",
    "RunResult",
    "run_config_toml",
    "set_task_identity",
]


def set_task_identity(run_id: int = 1, node_id: int = SUPERLINK_NODE_ID) -> None:
    """``Message`` needs a task identity, which a real runtime sets; set one here."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id


def _roundtrip(content: RecordDict) -> RecordDict:
    """Flower's own encoding and decoding of a RecordDict (fresh objects)."""
    objs = get_all_nested_objects(content)
    blobs = {oid: obj.deflate() for oid, obj in objs.items()}
    return inflate_object_from_contents(content.object_id, blobs)  # type: ignore[return-value]


class InProcessGrid(Grid):
    """A Grid delivering each message to ``app(message, context_of_its_node)``.

    ``app``: a ``ClientApp`` (or any ``(Message, Context) -> Message`` callable).
    ``num_nodes`` nodes get ids ``first_node_id``, ``first_node_id + 1``, ...; or pass
    ``contexts`` ({node id: Context}) to choose them. ``serialize=False`` hands the same
    objects across (faster, for benchmarks of very large models). ``tamper(node, reply)``
    may rewrite a reply before the server sees it (attack tests).
    Replies of ``send_and_receive`` come back sorted by node id (deterministic), or in
    push order with ``sort_replies=False`` (as the MPI runtime returns them).
    """

    def __init__(
        self,
        app: Callable[[Message, Context], Message],
        num_nodes: int = 2,
        *,
        run_id: int = 1,
        run_config: dict[str, Any] | None = None,
        node_config_fn: Callable[[int], dict[str, Any]] | None = None,
        contexts: dict[int, Context] | None = None,
        first_node_id: int = 100,
        serialize: bool = True,
        tamper: Callable[[int, Message], Message] | None = None,
        sort_replies: bool = True,
    ) -> None:
        set_task_identity(run_id)
        self.app = app
        self.serialize = serialize
        self.tamper = tamper
        self.sort_replies = sort_replies
        self._run = Run.create_empty(run_id)
        if contexts is None:
            contexts = {}
            for i in range(num_nodes):
                node = first_node_id + i
                cfg = (node_config_fn(i) if node_config_fn
                       else {"partition-id": i, "num-partitions": num_nodes})
                contexts[node] = Context(run_id=run_id, node_id=node, node_config=cfg,
                                         state=RecordDict(), run_config=dict(run_config or {}))
        self.contexts = contexts
        self.node_ids = list(contexts)
        self._pending: dict[str, Message] = {}  # pushed, not yet pulled
        self._ids = itertools.count(1)
        #: every message pushed, in order (tests inspect what the server sent)
        self.sent: list[Message] = []
        self.delivered = 0

    # Grid interface -------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid  # the runtime assigns it on push
            self.sent.append(msg)
            self._pending[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Each pulled message is delivered to its node now (the ClientApp runs when its
        reply is pulled, so a subclass can order, delay or drop nodes)."""
        return [self._execute(self._pending.pop(mid)) for mid in list(message_ids)
                if mid in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = list(self.pull_messages(self.push_messages(messages)))
        if self.sort_replies:
            replies.sort(key=lambda m: m.metadata.src_node_id)
        return replies

    # delivery -------------------------------------------------------------------------
    def _execute(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if node not in self.contexts:
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no node {node}"),
                           reply_to=msg)
        if self.serialize:
            msg = Message(content=_roundtrip(msg.content), metadata=msg.metadata)
        self.delivered += 1
        try:
            reply = self.app(msg, self.contexts[node])
        except Exception as exc:  # noqa: BLE001 - as Flower's runtime: an error reply
            reason = str(type(exc)) + ":<'" + str(exc) + "'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                           reply_to=msg)
        if self.serialize and reply.has_content():
            reply = Message(content=_roundtrip(reply.content), metadata=reply.metadata)
        if self.tamper is not None:
            reply = self.tamper(node, reply)
        return reply


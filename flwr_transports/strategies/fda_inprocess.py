"""A small in-process Grid that delivers messages to a ClientApp directly.

It stands in for the network (SuperLink + SuperNodes) in unit tests and in the FDA
benchmark: each node has its own persistent :class:`Context` (so ``context.state``
survives across rounds as it does on a SuperNode), and by default every message and
reply is serialized and deserialized (Flower's own object encoding) so that server and
clients never share Python objects. Replies are returned sorted by source node id, so
aggregation order is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


def ensure_task_identity(run_id: int = 1) -> None:
    """Messages need a task identity; a real runtime sets it, here we set it once."""
    try:
        TaskIdentity.run_id  # noqa: B018 - property raises when unset
    except RuntimeError:
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID


def _roundtrip(content: RecordDict) -> RecordDict:
    objs = get_all_nested_objects(content)
    blobs = {oid: obj.deflate() for oid, obj in objs.items()}
    return inflate_object_from_contents(content.object_id, blobs)  # type: ignore[return-value]


class InProcessGrid(Grid):
    """Grid delivering each message to ``app(message, context_of_its_node)``."""

    def __init__(
        self,
        app: ClientApp | Callable[[Message, Context], Message],
        num_nodes: int,
        *,
        run_id: int = 1,
        run_config: dict[str, Any] | None = None,
        node_config_fn: Callable[[int], dict[str, Any]] | None = None,
        serialize: bool = True,
    ) -> None:
        ensure_task_identity(run_id)
        self.app = app
        self.serialize = serialize
        self._run = Run.create_empty(run_id)
        self.node_ids = [100 + i for i in range(num_nodes)]
        self.contexts: dict[int, Context] = {}
        for i, node in enumerate(self.node_ids):
            node_config = (
                node_config_fn(i)
                if node_config_fn
                else {"partition-id": i, "num-partitions": num_nodes}
            )
            self.contexts[node] = Context(
                run_id=run_id,
                node_id=node,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
        self._replies: dict[str, Message] = {}
        self._next_id = 0
        self.delivered = 0

    # Grid interface -------------------------------------------------------------------
    def set_run(self, run: Run) -> None:  # pragma: no cover - not used in-process
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
            self._next_id += 1
            mid = f"m{self._next_id}"
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            self._replies[mid] = self._deliver(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = list(self.pull_messages(self.push_messages(messages)))
        return sorted(replies, key=lambda m: m.metadata.src_node_id)

    # delivery -------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if node not in self.contexts:
            return Message(
                Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no node {node}"), reply_to=msg
            )
        if self.serialize:
            msg = Message(content=_roundtrip(msg.content), metadata=msg.metadata)
        self.delivered += 1
        try:
            reply = self.app(msg, self.contexts[node])
        except Exception as exc:  # noqa: BLE001 - a ClientApp crash becomes an error reply
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc)), reply_to=msg
            )
        if self.serialize and reply.has_content():
            reply = Message(content=_roundtrip(reply.content), metadata=reply.metadata)
        return reply

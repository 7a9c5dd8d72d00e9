"""An in-process Grid for unit tests: a test double of the NETWORK only.

Messages are deep-copied on the way out and back (as a real deployment gives each
side its own objects), then handed to a real ClientApp (with its real mods).
The real Flower deployment is exercised in tests/integration/.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class _Run:
    def __init__(self, run_id: int):
        self.run_id = run_id


class InProcessGrid(Grid):
    def __init__(self, app, n_nodes: int = 2, run_id: int = 7,
                 tamper: Callable[[int, Message], Message] | None = None):
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.app = app
        self._run = _Run(run_id)
        self.node_ids = [101 + i for i in range(n_nodes)]
        self.contexts = {
            nid: Context(run_id=run_id, node_id=nid,
                         node_config={"partition-id": i, "num-partitions": n_nodes},
                         state=RecordDict(), run_config={})
            for i, nid in enumerate(self.node_ids)
        }
        self.tamper = tamper
        self._ids = itertools.count(1)
        self._pending: dict[str, Message] = {}
        self.sent: list[Message] = []

    def set_run(self, run):  # pragma: no cover - not used
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{next(self._ids)}"
            m.metadata.__dict__["_message_id"] = mid
            self.sent.append(m)
            self._pending[mid] = m
            ids.append(mid)
        return ids

    def _execute(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        incoming = copy.deepcopy(msg)
        try:
            reply = self.app(incoming, self.contexts[node])
        except Exception as exc:  # noqa: BLE001 - as Flower: an exception becomes an error reply
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(exc)),
                            reply_to=incoming)
        reply = copy.deepcopy(reply)
        if self.tamper is not None:
            reply = self.tamper(node, reply)
        return reply

    def pull_messages(self, message_ids):
        return [self._execute(self._pending.pop(mid)) for mid in list(message_ids)]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

"""The unit tests' Grid: :class:`flwr_transports.testing.InProcessGrid` with the node
ids (101, 102, ...) and run id (7) these tests were written against."""

from __future__ import annotations

from flwr_transports.testing import InProcessGrid as _InProcessGrid


class InProcessGrid(_InProcessGrid):
    def __init__(self, app, n_nodes: int = 2, run_id: int = 7, tamper=None):
        super().__init__(app, n_nodes, run_id=run_id, tamper=tamper, first_node_id=101)

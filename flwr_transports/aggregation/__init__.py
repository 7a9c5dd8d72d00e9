"""Streaming (LIFL-style) weighted-mean aggregation for ``offload(...)``.

See docs/aggregation.md. :mod:`.layout` plans a reply payload from its headers,
:mod:`.fold` keeps the running weighted sum and folds payload windows into it in
parallel, :mod:`.policy` decides which strategies stream, :mod:`.round` tracks one
training round's uploads, and :mod:`.inject` is the one place that hands the streamed
mean to the inner strategy.
"""

from .choice import STREAMING_ATTR, streaming_decision
from .fold import Source, WeightedSum
from .layout import WEIGHT_META, Plan, Unfoldable, plan_payload

__all__ = ["STREAMING_ATTR", "WEIGHT_META", "Plan", "Source", "Unfoldable", "WeightedSum",
           "plan_payload", "streaming_decision"]

"""The package's exception hierarchy.

* :class:`FlwrTransportsError` — base of everything this package raises on purpose.
* :class:`ConfigError` — the *user's* configuration is wrong (unknown option, bad
  value, unknown scheme). Raised at ``offload(...)`` / link construction time.
* :class:`RejectedInput` — input that came from the network (a reference, a ticket,
  a payload, a wire message) was refused. The peer is wrong or hostile; the run goes
  on without it.

Both subclass :class:`ValueError`, so code written against earlier versions that
caught ``ValueError`` keeps working.
"""

from __future__ import annotations


class FlwrTransportsError(Exception):
    """Base class of every error raised on purpose by flwr-transports."""


class ConfigError(FlwrTransportsError, ValueError):
    """Invalid configuration (options, URLs, schemes): fix the call or the run config."""


class RejectedInput(FlwrTransportsError, ValueError):
    """Network input (reference, ticket, payload, wire message) that was refused."""

"""The exception classes every part of flwr-transports shares.

``RejectedInput``: something that came from the other side (a reference, ticket,
slot descriptor, payload, wire message) is malformed or not acceptable. It is never a
bug on this side: the server turns it into a rejected reply, the client fails the
message with it.

``ConfigError``: this side's own configuration (a transport URL, an option, a
client policy) is wrong.
"""

from __future__ import annotations


class FlwrTransportsError(Exception):
    """Base class of the errors flwr-transports raises on purpose."""


class RejectedInput(FlwrTransportsError, ValueError):
    """Input from the other party that is malformed or refused."""


class ConfigError(FlwrTransportsError, ValueError):
    """This side's configuration is invalid."""

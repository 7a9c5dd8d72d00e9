"""Every environment variable flwr-transports reads, in ONE place.

Nothing else in the library reads ``os.environ`` for its own settings (third-party
variables a link hands to its engine, such as UCX's, stay with that link). Each
setting is read when it is used, not at import, so a test or a long-lived process
may change it between runs.

Precedence, wherever a setting also exists as an option:

* **server side** (``offload()`` / ``offload_grid()`` options, URL query): an option
  given explicitly wins over the environment; the environment wins over the default.
* **client side** (``PayloadMod``): an argument given to ``PayloadMod`` wins over the
  environment. A client-side *cap* (s3 concurrency, tcp timeout, ``wait``) is never
  raised by what a server sends: the smaller of the two applies.

The table (``python -c "import flwr_transports.settings as s; print(s.markdown())"``):
see :data:`SETTINGS` and docs/settings.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    env: str
    default: str  # as text, the way it would be written in the environment
    side: str  # "client", "server", "both"
    doc: str


_S = [
    Setting("FLWR_TRANSPORTS_ALLOWED_SCHEMES", "", "client",
            "client policy: link schemes a server may make this client use (comma "
            "separated; empty: every registered link)"),
    Setting("FLWR_TRANSPORTS_ALLOWED_HOSTS", "", "client",
            "client policy: hosts, `*.suffix` patterns, addresses or networks a payload "
            "may live on (empty: any host except link-local / cloud metadata)"),
    Setting("FLWR_TRANSPORTS_ALLOWED_PORTS", "", "client",
            "client policy: ports or ranges (`9000-9100`) (empty: any port)"),
    Setting("FLWR_TRANSPORTS_FILE_ROOTS", "", "client",
            "client policy: directories file:// payloads may live in (os.pathsep "
            "separated; empty: anywhere outside system directories)"),
    Setting("FLWR_TRANSPORTS_MAX_PAYLOAD", "64GiB", "client",
            "client policy: largest payload a client agrees to fetch"),
    Setting("FLWR_TRANSPORTS_ALLOW_LINK_LOCAL", "0", "client",
            "client policy: allow link-local and cloud metadata addresses"),
    Setting("FLWR_TRANSPORTS_MAX_WAIT", "900", "client",
            "client policy: a cap (seconds) on how long a server may make this client "
            "wait for a payload to appear (s3:// `wait`); the smaller applies"),
    Setting("FLWR_TRANSPORTS_CACHE", "", "client",
            "where payload_mod keeps a payload the server will send again (a directory, "
            "`off`; empty: a private directory under the system temp dir)"),
    Setting("FLWR_TRANSPORTS_S3_CONCURRENCY", "", "both",
            "s3://: parallel part uploads / ranged GETs; on a client a cap on what the "
            "server asks for, on the server the default when the URL sets none"),
    Setting("FLWR_TRANSPORTS_PROGRESS", "", "both",
            "s3://: a progress line on stderr for long transfers (1/0; empty: the "
            "link's `progress` option)"),
    Setting("FLWR_TRANSPORTS_TCP_TIMEOUT", "", "client",
            "tcp:// / rdma://: a cap (seconds) on the socket timeout a server asks for"),
    Setting("FLWR_TRANSPORTS_SNDBUF", "auto", "both",
            "tcp:// / rdma:// chunk connections: SO_SNDBUF in bytes, `auto` (the larger "
            "of autotuning's cap and net.core.wmem_max) or `off`"),
    Setting("FLWR_TRANSPORTS_BUFFER_POOL", "1GiB", "server",
            "tcp:// / rdma:// server: memory for receive buffers of uploads in flight"),
    Setting("FLWR_TRANSPORTS_NIXL_PROGRESS_US", "100", "both",
            "rdma://: NIXL progress-thread delay in microseconds"),
    Setting("FLWR_TRANSPORTS_FOLD_WORKERS", "0", "server",
            "streaming aggregation: threads folding windows (0: one per core, at most 8)"),
    Setting("FLWR_TRANSPORTS_ZERO_COPY", "1", "both",
            "hand array memory to Flower without a copy where safe (0: always copy)"),
    Setting("FLWR_TRANSPORTS_MPI_ZERO_COPY", "1", "both",
            "older name of FLWR_TRANSPORTS_ZERO_COPY (used when that one is unset)"),
    Setting("FLWR_TRANSPORTS_TRACE", "", "both",
            "write a JSON-lines trace of every transfer phase into this directory "
            "(docs/trace.md)"),
    Setting("FLWR_TRANSPORTS_STRICT", "", "server",
            "re-raise an unexpected exception while handling one reply (tests; "
            "production rejects only that reply)"),
    Setting("FLWR_TRANSPORTS_DEMO_APP", "", "both",
            "`flwr-transports demo`: the Flower app directory to run"),
]

#: every setting, by environment variable name
SETTINGS: dict[str, Setting] = {s.env: s for s in _S}


def raw(env: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The variable's text, or None when unset or blank. ``env`` must be a declared
    setting (a typo is a bug, not a silently ignored variable)."""
    if env not in SETTINGS:
        raise KeyError(f"{env} is not a declared flwr-transports setting")
    v = (os.environ if environ is None else environ).get(env)
    return v if v is not None and v.strip() != "" else None


def text(env: str, environ: Mapping[str, str] | None = None) -> str:
    """The variable's text, else the declared default."""
    v = raw(env, environ)
    return SETTINGS[env].default if v is None else v


def flag(env: str, environ: Mapping[str, str] | None = None) -> bool | None:
    """A yes/no setting: True/False when set, None when unset."""
    v = raw(env, environ)
    if v is None:
        return None
    return v.strip().lower() in {"1", "true", "yes", "on"}


def markdown() -> str:
    """The docs table of every setting."""
    rows = ["| variable | default | side | meaning |", "|---|---|---|---|"]
    for s in _S:
        rows.append(f"| `{s.env}` | `{s.default or '(unset)'}` | {s.side} | {s.doc} |")
    return "\n".join(rows)

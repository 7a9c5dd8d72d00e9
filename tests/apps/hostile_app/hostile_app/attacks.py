"""A hostile client: attacks on the offload wrapper from a ClientApp that has a ticket.

``hostile_mod`` runs the honest ``payload_mod`` (so a real upload sits in the slot),
then, on the node with ``partition-id`` 0, applies ONE attack per train message (the
next name of the attack list, counted in the node's state) to the reply or to what it
uploaded. Every attack must end in a rejected reply; none may crash, stall or starve
the ServerApp. ``EXPECT`` maps each attack to a piece of the rejection reason.

Used by tests/test_harden.py (in-process grid) and by the deployment test
(tests/integration/test_hostile_deployment.py) through this app's ClientApp.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import subprocess
import sys
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from flwr_transports.codec import EncodedPayload, hash_segments
from flwr_transports.flower.mod import payload_mod
from flwr_transports.links import client_link
from flwr_transports.refs import REF_ARRAY, REF_STYPE, TICKET_KEY, Reference, Ticket

DEEP = 20_000

#: attack -> substring of the server's rejection reason (None: any rejection)
EXPECT = {
    "deep-ref": "nested",
    "deep-header": "nested",
    "garbage-payload": "payload",
    "forged-ticket": "never issued",
    "size-lie": "bytes",  # "has N bytes, the reference says M" (s3: "... needs M")
    "digest-lie": "digest mismatch",
    "slot-replay": "reuses slot",
    "huge-size": "above the cap",
    # shm:// and file://
    "truncate": "bytes, the reference says",
    "dir-at-slot": "not a regular file",
    "fifo-at-slot": "not a regular file",
    "symlink": "symbolic link",
    "hardlink": "hard links",
    "outside-root": None,
    # tcp://
    "flood": "digest mismatch",
    "other-slot": "not the upload slot",
    # s3://
    "foreign-key": None,
}
COMMON = ["deep-ref", "deep-header", "garbage-payload", "forged-ticket", "size-lie",
          "digest-lie", "slot-replay", "huge-size"]
PER_LINK = {
    "shm": ["truncate", "dir-at-slot", "fifo-at-slot", "symlink", "hardlink", "outside-root"],
    "file": ["truncate", "dir-at-slot", "fifo-at-slot", "symlink", "hardlink",
             "outside-root"],
    "tcp": ["flood", "other-slot"],
    "s3": ["foreign-key"],
}


def attacks_for(scheme: str) -> list[str]:
    return COMMON + PER_LINK.get(scheme, [])


def _doc(rec: ArrayRecord) -> dict:
    return json.loads(rec[REF_ARRAY].data)


def _rec(data: bytes) -> ArrayRecord:
    return ArrayRecord({REF_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=REF_STYPE,
                                         data=data)})


def _upload(ticket: Ticket, slot: int, raw: bytes, key: str) -> ArrayRecord:
    """Upload ``raw`` into a slot with a matching size and digest (an honest-looking
    reference to hostile bytes)."""
    p = EncodedPayload(segments=[raw], size=len(raw), digest=hash_segments([raw]),
                       n_arrays=1)
    loc = client_link(ticket.scheme).upload(ticket.slots[slot], p)
    return Reference(scheme=ticket.scheme, loc=loc, size=p.size, digest=p.digest,
                     n_arrays=1, ticket=ticket.id, slot=slot, key=key).to_record()


def _fs_path(scheme: str, loc: dict) -> str:
    return f"/dev/shm/{loc['name']}" if scheme == "shm" else loc["path"]


def _replace(path: str, make) -> None:
    os.unlink(path)
    make(path)


def start_flood(host: str, port: int, hold: float) -> subprocess.Popen:
    """A process holding as many idle connections to host:port as it can for ``hold``
    seconds, re-opening every one the server closes (ftx-bench flood)."""
    from ftx_bench.flood import FLOOD_SCRIPT

    return subprocess.Popen([sys.executable, "-c", FLOOD_SCRIPT, host, str(port), "idle",
                             str(hold), "1024", "x", "00"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def attack(name: str, ticket: Ticket, reply: Message) -> None:
    """Apply attack ``name`` to an honest reply whose 'arrays' record is a reference."""
    content = reply.content
    ref_rec = content["arrays"]
    doc = _doc(ref_rec)
    scheme = ticket.scheme
    if name == "deep-ref":
        content["arrays"] = _rec(b"[" * DEEP + b"]" * DEEP)
    elif name == "deep-header":
        h = b'{"__metadata__":' + b"[" * DEEP + b"]" * DEEP + b"}"
        h += b" " * (-len(h) % 8)
        content["arrays"] = _upload(ticket, 1, struct.pack("<Q", len(h)) + h, "arrays")
    elif name == "garbage-payload":
        content["arrays"] = _upload(ticket, 1, secrets.token_bytes(5000), "arrays")
    elif name == "forged-ticket":
        doc["ticket"] = secrets.token_hex(16)
        content["arrays"] = _rec(json.dumps(doc).encode())
    elif name == "size-lie":
        doc["size"] -= 1
        content["arrays"] = _rec(json.dumps(doc).encode())
    elif name == "digest-lie":
        doc["digest"] = "sha256t:" + "0" * 64
        content["arrays"] = _rec(json.dumps(doc).encode())
    elif name == "slot-replay":
        content["arrays2"] = Reference(**{**doc, "key": "arrays2"}).to_record()
    elif name == "huge-size":
        doc["size"] = 2**40
        content["arrays"] = _rec(json.dumps(doc).encode())
    elif name in ("truncate", "dir-at-slot", "fifo-at-slot", "symlink", "hardlink"):
        path = _fs_path(scheme, doc["loc"])
        if name == "truncate":
            os.truncate(path, 0)
        elif name == "dir-at-slot":
            def mk(p):
                os.mkdir(p)
                with open(os.path.join(p, "inside"), "w") as f:
                    f.write("x")
            _replace(path, mk)
        elif name == "fifo-at-slot":
            _replace(path, os.mkfifo)
        elif name == "symlink":
            _replace(path, lambda p: os.symlink("/etc/hostname", p))
        else:  # a second hard link to the upload (e.g. a file the client keeps writing)
            os.link(path, path + "-keep")
    elif name == "outside-root":
        if scheme == "shm":
            doc["loc"]["name"] = "../etc/passwd"
        else:
            doc["loc"]["path"] = "/etc/passwd"
        content["arrays"] = _rec(json.dumps(doc).encode())
    elif name == "flood":
        slot = ticket.slots[0]
        start_flood(slot["host"], slot["port"], 12.0)
        time.sleep(2.0)  # the flood is in place while the honest node transfers
        doc["digest"] = "sha256t:" + "1" * 64  # and this reply is rejected anyway
        content["arrays"] = _rec(json.dumps(doc).encode())
    elif name == "other-slot":
        doc["loc"]["id"] = doc["loc"]["id"][:-4] + "beef"
        content["arrays"] = _rec(json.dumps(doc).encode())
    elif name == "foreign-key":
        doc["loc"]["key"] = doc["loc"]["key"] + "-other"
        content["arrays"] = _rec(json.dumps(doc).encode())
    else:
        raise ValueError(f"unknown attack {name!r}")


def hostile_mod(msg: Message, ctx: Context, call_next) -> Message:
    """payload_mod, then one attack per train message on partition 0."""
    hostile = int(ctx.node_config.get("partition-id", 1)) == 0
    ticket = None
    if hostile and msg.has_content() and TICKET_KEY in msg.content:
        ticket = Ticket.from_record(msg.content[TICKET_KEY])
    reply = payload_mod(msg, ctx, call_next)
    if ticket is None or msg.metadata.message_type != "train" or not reply.has_content():
        return reply
    names = str(ctx.run_config.get("attacks", "")) or os.environ.get("HOSTILE_ATTACKS", "")
    names = [n for n in names.split(",") if n]
    if not names:
        return reply
    state = ctx.state.config_records.get("hostile", ConfigRecord({"n": 0}))
    k = int(state["n"])
    ctx.state.config_records["hostile"] = ConfigRecord({"n": k + 1})
    attack(names[k % len(names)], ticket, reply)
    return reply

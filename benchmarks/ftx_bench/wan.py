"""WAN emulation with network namespaces, veth pairs, ``tc tbf`` and a userspace delay stage.

Topology (every name carries this process's pid, so concurrent runs never collide)::

    ns ftxb-<pid>-a            ns ftxb-<pid>-r                   ns ftxb-<pid>-b
    a0 10.77.0.1/24 ==veth== ra  <-- delay relay -->  rb ==veth== b0 10.77.0.2/24
    tbf on a0 egress                                           tbf on b0 egress

* **Bandwidth**: ``tc qdisc ... tbf`` on each endpoint's egress (``mtu 64kb`` so GSO
  frames are not split before the relay).
* **Delay (RTT)**: this kernel has no ``netem``. The relay in the middle namespace is
  a userspace L2 bridge: two ``AF_PACKET`` sockets (with ``PACKET_VNET_HDR`` so 64 KiB
  GSO frames pass whole), each frame is held ``RTT/2`` in a FIFO and then sent out of
  the other port. Unlike a TCP proxy it does not terminate TCP: the endpoints see the
  real RTT, so slow start and single-stream window limits (BDP > socket buffers) show
  up as they would on a real WAN. ARP passes through it like any frame.
  Two implementations with the same behaviour: ``delay_relay.c`` (shipped with the
  package, compiled at first use with the machine's C compiler into
  ``$XDG_CACHE_HOME/flwr-transports`` or ``~/.cache/flwr-transports``, keyed by a hash of
  the source; a byte ring per direction, frames received straight into it) and a
  Python one (the fallback when no compiler is found). The queue of each is bounded
  (tail drop, counted).
* A profile with RTT 0 (``lan``) joins a0 and b0 with one veth pair, no relay.
* ``topology="star"`` (``bench e2e --topology star``): two bridges in the middle
  namespace (server region, client region) joined by the relay; the server (A) and an
  object-store namespace S on the server side, one namespace per client on the other,
  each with its own tbf; the server's uplink rate and the clients' rate are separate
  (see :meth:`WanEmulation._build_star`).

Limits (documented in docs/benchmarks.md): constant delay, no jitter, no random loss
(drops only when the relay's bounded queue or tbf overflows); the Python relay
forwards about 1-2 Gbit/s of GSO frames on this 2-core machine, the C relay several
Gbit/s (see docs/benchmarks.md); IPv6 is disabled in the namespaces.

Needs root (CAP_NET_ADMIN) and ``ip``/``tc`` (iproute2). Everything is removed by
:meth:`WanEmulation.down` (called from ``__exit__``, atexit and SIGTERM/SIGINT/SIGHUP);
``cleanup_stale()`` removes namespaces of runs whose process is gone.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .procs import set_pdeathsig, stop_proc

NS_PREFIX = "ftxb-"
ADDR_A = "10.77.0.1"
ADDR_B = "10.77.0.2"
ADDR_S = "10.77.0.3"  # the object store (star topology)
STORE_WMEM = 32 << 20  # tcp_wmem max in the store's namespace (star topology)
TOPOLOGIES = ("pair", "star")
MAX_CLIENTS = 32


def client_addr(i: int) -> str:
    """Address of client namespace ``i`` in the star topology (client 0 keeps ADDR_B)."""
    return ADDR_B if i == 0 else f"10.77.0.{100 + i}"


def parse_rate(text: str) -> float:
    """``1gbit``/``500mbit``/``2.5gbit`` -> Mbit/s."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(mbit|gbit)", text.strip().lower())
    if not m:
        raise ValueError(f"bad rate {text!r}: write e.g. 500mbit or 1gbit")
    rate = float(m[1]) * (1000 if m[2] == "gbit" else 1)
    if not 1 <= rate <= 100_000:
        raise ValueError("rate out of range (1 Mbit/s - 100 Gbit/s)")
    return rate

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32


@dataclass(frozen=True)
class Profile:
    name: str
    rtt_ms: float
    rate_mbit: float
    note: str = ""

    def describe(self) -> str:
        rtt = f"RTT {self.rtt_ms:g} ms" if self.rtt_ms else "RTT native veth (<0.1 ms)"
        return f"{self.name}: {rtt}, {self.rate_mbit:g} Mbit/s each way"


# Cross-region lines between cloud VMs carry several Gbit/s; 5 Gbit/s is the cap AWS
# documents for one flow leaving a cluster placement group (and for traffic to other
# regions from instances below 32 vCPUs). What limits a single TCP stream at these RTTs
# is its window, not the line: ~220 Mbit/s at 100 ms with Linux's default buffers.
PROFILES: dict[str, Profile] = {
    "lan": Profile("lan", 0.0, 10_000, "same data center: one veth pair, 10 Gbit/s"),
    "geo-proximal": Profile("geo-proximal", 20.0, 5_000,
                            "neighbouring regions (e.g. us-east-1 <-> us-east-2)"),
    "geo-distributed": Profile("geo-distributed", 100.0, 5_000,
                               "distant regions (e.g. us-east-1 <-> eu-central-1)"),
}

_CUSTOM = re.compile(r"^(?P<rtt>\d+(?:\.\d+)?)ms/(?P<rate>\d+(?:\.\d+)?)(?P<u>mbit|gbit)$")


def get_profile(spec: str) -> Profile:
    """A named profile, or a custom one written ``RTTms/RATE{mbit,gbit}`` (e.g. 50ms/500mbit)."""
    if spec in PROFILES:
        return PROFILES[spec]
    m = _CUSTOM.match(spec.strip().lower())
    if not m:
        raise ValueError(
            f"unknown WAN profile {spec!r}: use one of {', '.join(PROFILES)} or RTTms/RATEmbit "
            f"(e.g. 50ms/500mbit)"
        )
    rtt = float(m["rtt"])
    rate = float(m["rate"]) * (1000 if m["u"] == "gbit" else 1)
    if not (0 <= rtt <= 2000) or not (1 <= rate <= 100_000):
        raise ValueError("custom profile out of range (RTT 0-2000 ms, rate 1 Mbit/s-100 Gbit/s)")
    return Profile(spec, rtt, rate, "custom")


def can_emulate() -> str | None:
    """Why WAN emulation cannot run here (or None)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc); running on loopback instead"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"'{tool}' (iproute2) not found"
    if not os.path.exists("/var/run/netns") and not os.access("/var/run", os.W_OK):
        return "cannot create /var/run/netns"
    return None


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


RELAY_KINDS = ("auto", "c", "python")
RELAY_SOURCE = Path(__file__).with_name("delay_relay.c")


def relay_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flwr-transports"


def build_c_relay(cache_dir: Path | None = None) -> tuple[Path | None, str]:
    """Compile ``delay_relay.c`` once per source version; (binary or None, what happened).

    The binary is cached as ``delay_relay-<sha256 of source and compiler>`` in a 0700
    directory; an existing one is used only if it belongs to us and nobody else can
    write it."""
    try:
        src = RELAY_SOURCE.read_bytes()
    except OSError as exc:
        return None, f"C relay source missing ({exc})"
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc or not shutil.which(cc):
        return None, "no C compiler (gcc/cc) found"
    key = hashlib.sha256(src + b"\0" + os.fsencode(cc)).hexdigest()[:16]
    d = cache_dir or relay_cache_dir()
    binary = d / f"delay_relay-{key}"
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = binary.stat()
        if st.st_uid == os.geteuid() and not st.st_mode & 0o022 and st.st_mode & 0o100:
            return binary, f"C relay {binary}"
        binary.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        return None, f"cannot use cache dir {d} ({exc})"
    tmp = d / f".delay_relay-{key}.{os.getpid()}.tmp"
    try:
        p = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(RELAY_SOURCE)],
                           capture_output=True, text=True, timeout=120, check=False)
        if p.returncode != 0:
            return None, f"C relay did not compile: {(p.stderr or p.stdout).strip()[-400:]}"
        os.chmod(tmp, 0o700)
        os.replace(tmp, binary)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"C relay did not compile ({exc})"
    finally:
        tmp.unlink(missing_ok=True)
    return binary, f"C relay {binary} (compiled now)"


def _relay_qmax(profile: Profile) -> int:
    """Bytes each direction of the relay may hold: 2x what is in flight in it, + 16 MiB."""
    in_flight = profile.rate_mbit * 1e6 / 8 * profile.rtt_ms / 2 / 1000
    return int(2 * in_flight + 16 * 1024 * 1024)


RELAY_RT_PRIORITY = 10


def _prioritize(pid: int, realtime: bool) -> str:
    """A router does not share its CPU with the hosts: run the relay SCHED_FIFO (bounded by
    the kernel's RT throttling, and it sleeps between frames) or at least at nice -10, so
    the endpoints' work does not hold frames past their due time."""
    if realtime:
        try:
            os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(RELAY_RT_PRIORITY))
            return f"SCHED_FIFO {RELAY_RT_PRIORITY}"
        except (OSError, AttributeError):
            pass
    try:
        os.setpriority(os.PRIO_PROCESS, pid, -10)
        return "nice -10"
    except OSError:
        return "normal priority"


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class WanEmulation:
    """Two namespaces A (sender/server side) and B (receiver/client side) joined by an
    emulated WAN. Use as a context manager; ``prefix("a")`` gives the command prefix
    that runs a program inside A."""

    def __init__(self, profile: Profile | str, tag: str | None = None, relay: str = "auto",
                 realtime: bool = True, topology: str = "pair", clients: int = 1,
                 server_rate_mbit: float | None = None, client_rate_mbit: float | None = None):
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, not {topology!r}")
        if not 1 <= clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be in 1..{MAX_CLIENTS}")
        if topology == "pair" and (clients != 1 or server_rate_mbit or client_rate_mbit):
            raise ValueError("clients/server_rate/client_rate need topology='star'")
        self.topology = topology
        self.n_clients = clients
        self.server_rate_mbit = server_rate_mbit or self.profile.rate_mbit
        self.client_rate_mbit = client_rate_mbit or self.profile.rate_mbit
        if relay not in RELAY_KINDS:
            raise ValueError(f"relay must be one of {', '.join(RELAY_KINDS)}, not {relay!r}")
        self.relay_choice = relay
        self.realtime = realtime
        self.relay_kind: str | None = None  # "c" or "python" once up (None: no relay)
        self.relay_note = "no relay (RTT 0)"
        self.relay_final: list[dict[str, float]] = []  # last stats of the relay, per direction
        self.tag = tag or f"{NS_PREFIX}{os.getpid()}"
        if not re.fullmatch(r"[a-z0-9-]{1,20}", self.tag):
            raise ValueError(f"invalid namespace tag {self.tag!r}")
        self.ns_a, self.ns_b, self.ns_r = f"{self.tag}-a", f"{self.tag}-b", f"{self.tag}-r"
        self.addr_a, self.addr_b = ADDR_A, ADDR_B
        # star: the object store's namespace (server side) and one namespace per client
        self.ns_s = f"{self.tag}-s" if topology == "star" else None
        self.addr_s = ADDR_S if topology == "star" else None
        self.client_ns = [self.ns_b] + [f"{self.tag}-b{i}" for i in range(1, clients)]
        self.relay: subprocess.Popen | None = None
        self._created: list[str] = []
        self._old_handlers: dict[int, object] = {}
        self._up = False

    # --- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> WanEmulation:  # noqa: PYI034
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def prefix(self, side: str) -> tuple[str, ...]:
        """``ip netns exec NS``: side "a" (server), "b" (client 0), "s" (store, star only),
        or "b<i>" (client i)."""
        if side == "s":
            if self.ns_s is None:
                raise ValueError("no store namespace: topology='star' only")
            ns = self.ns_s
        elif side == "a":
            ns = self.ns_a
        elif side == "b":
            ns = self.ns_b
        elif side.startswith("b") and side[1:].isdigit() and int(side[1:]) < self.n_clients:
            ns = self.client_ns[int(side[1:])]
        else:
            raise ValueError(f"unknown side {side!r}")
        return ("ip", "netns", "exec", ns)

    def client_prefixes(self) -> list[tuple[str, ...]]:
        """One command prefix per client namespace (one in the pair topology)."""
        return [("ip", "netns", "exec", ns) for ns in self.client_ns]

    def describe(self) -> str:
        """The profile plus, for the star, the per-link rates."""
        if self.topology == "pair":
            return self.profile.describe()
        return (f"{self.profile.name}: star, RTT {self.profile.rtt_ms:g} ms between regions; "
                f"server uplink {self.server_rate_mbit:g} Mbit/s; {self.n_clients} client(s), "
                f"each {self.client_rate_mbit:g} Mbit/s each way; object store in the "
                f"server's region (no added delay to the server, its link unshaped)")

    def up(self) -> None:
        why = can_emulate()
        if why:
            raise RuntimeError(f"WAN emulation unavailable: {why}")
        self._install_handlers()
        atexit.register(self.down)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._up = True

    def _ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        for key in ("all", "default"):
            _run("ip", "netns", "exec", name, "sysctl", "-qw",
                 f"net.ipv6.conf.{key}.disable_ipv6=1", check=False)

    def _tbf(self, ns: str, dev: str, rate_mbit: float | None = None) -> None:
        rate_mbit = rate_mbit or self.profile.rate_mbit
        rate_bps = rate_mbit * 1e6
        burst = int(max(256 * 1024, rate_bps / 8 * 0.001))  # >= 1 ms at line rate
        _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
             "rate", f"{rate_mbit:g}mbit", "burst", str(burst),
             "mtu", "65536", "latency", "100ms")

    def _build(self) -> None:
        if self.topology == "star":
            self._build_star()
            return
        p = self.profile
        self._ns(self.ns_a)
        self._ns(self.ns_b)
        if p.rtt_ms <= 0:
            _run("ip", "link", "add", "name", "a0", "netns", self.ns_a, "type", "veth",
                 "peer", "name", "b0", "netns", self.ns_b)
        else:
            self._ns(self.ns_r)
            _run("ip", "link", "add", "name", "a0", "netns", self.ns_a, "type", "veth",
                 "peer", "name", "ra", "netns", self.ns_r)
            _run("ip", "link", "add", "name", "b0", "netns", self.ns_b, "type", "veth",
                 "peer", "name", "rb", "netns", self.ns_r)
            for dev in ("ra", "rb"):
                _run("ip", "-n", self.ns_r, "link", "set", dev, "up")
        _run("ip", "-n", self.ns_a, "addr", "add", f"{ADDR_A}/24", "dev", "a0")
        _run("ip", "-n", self.ns_b, "addr", "add", f"{ADDR_B}/24", "dev", "b0")
        _run("ip", "-n", self.ns_a, "link", "set", "a0", "up")
        _run("ip", "-n", self.ns_b, "link", "set", "b0", "up")
        self._tbf(self.ns_a, "a0")
        self._tbf(self.ns_b, "b0")
        if p.rtt_ms > 0:
            self._start_relay()
        self._wait_reachable()

    def _build_star(self) -> None:
        """Server region and client region, each a bridge in the middle namespace R, joined
        by the delay relay (or directly when RTT is 0)::

            A a0 --pa-+                               +-pb0-- b0 B   (client 0)
                      |-bra-rap==ra <relay> rb==rbp-brb-pb1-- b0 B1  (client 1) ...
            S s0 --ps-+

        tbf: a0 egress (server uplink), b0 egress in each client namespace (client uplink)
        and pb<i> egress (client downlink). The store's link and the server's downlink
        are not shaped (the store stands for a scaled regional object store; the server's
        ingress is limited by the clients' uplinks)."""
        R = self.ns_r
        self._ns(self.ns_a)
        self._ns(self.ns_s)
        # the store stands for a production object store, whose hosts are tuned for
        # long fat networks: a send buffer autotuned up to STORE_WMEM (the kernel's
        # default cap, 4 MiB, moves at most ~22 MB/s per connection at 100 ms)
        _run("ip", "netns", "exec", self.ns_s, "sysctl", "-qw",
             f"net.ipv4.tcp_wmem=4096 16384 {STORE_WMEM}")
        for ns in self.client_ns:
            self._ns(ns)
        self._ns(R)
        for br in ("bra", "brb"):
            _run("ip", "-n", R, "link", "add", br, "type", "bridge", "forward_delay", "0",
                 "stp_state", "0")
        _run("ip", "link", "add", "name", "a0", "netns", self.ns_a, "type", "veth",
             "peer", "name", "pa", "netns", R)
        _run("ip", "link", "add", "name", "s0", "netns", self.ns_s, "type", "veth",
             "peer", "name", "ps", "netns", R)
        ports = {"pa": "bra", "ps": "bra"}
        for i, ns in enumerate(self.client_ns):
            _run("ip", "link", "add", "name", "b0", "netns", ns, "type", "veth",
                 "peer", "name", f"pb{i}", "netns", R)
            ports[f"pb{i}"] = "brb"
        if self.profile.rtt_ms > 0:
            _run("ip", "-n", R, "link", "add", "ra", "type", "veth", "peer", "name", "rap")
            _run("ip", "-n", R, "link", "add", "rb", "type", "veth", "peer", "name", "rbp")
            ports.update(rap="bra", rbp="brb")
            for dev in ("ra", "rb"):
                _run("ip", "-n", R, "link", "set", dev, "up")
        else:  # no delay: the two regions are one switch
            _run("ip", "-n", R, "link", "add", "wa", "type", "veth", "peer", "name", "wb")
            ports.update(wa="bra", wb="brb")
        for dev, br in ports.items():
            _run("ip", "-n", R, "link", "set", dev, "master", br)
            _run("ip", "-n", R, "link", "set", dev, "up")
        for br in ("bra", "brb"):
            _run("ip", "-n", R, "link", "set", br, "up")
        for ns, dev, addr in ([(self.ns_a, "a0", ADDR_A), (self.ns_s, "s0", ADDR_S)]
                              + [(ns, "b0", client_addr(i))
                                 for i, ns in enumerate(self.client_ns)]):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        self._tbf(self.ns_a, "a0", self.server_rate_mbit)
        for i, ns in enumerate(self.client_ns):
            self._tbf(ns, "b0", self.client_rate_mbit)
            self._tbf(R, f"pb{i}", self.client_rate_mbit)
        if self.profile.rtt_ms > 0:
            self._start_relay()
        self._wait_reachable()
        for addr in [client_addr(i) for i in range(1, self.n_clients)] + [ADDR_S]:
            self._wait_reachable(dst=addr)

    def _start_relay(self) -> None:
        one_way_ms = self.profile.rtt_ms / 2
        qmax = _relay_qmax(self.profile)
        binary, note = None, "Python relay (--relay python)"
        if self.relay_choice != "python":
            binary, note = build_c_relay()
            if binary is None:
                if self.relay_choice == "c":
                    raise RuntimeError(f"C delay relay unavailable: {note}")
                note = f"Python relay (fallback: {note})"
        if binary is not None:
            cmd = [str(binary), "ra", "rb", f"{one_way_ms * 1000:.3f}", str(qmax)]
            self.relay_kind = "c"
        else:
            cmd = [sys.executable, "-m", "ftx_bench.wan", "relay", "ra", "rb",
                   f"{one_way_ms}", str(qmax)]
            self.relay_kind = "python"
        self.relay_note = note
        self.relay = subprocess.Popen(
            ["ip", "netns", "exec", self.ns_r, *cmd],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        r, _, _ = select.select([self.relay.stdout], [], [], 20)
        line = self.relay.stdout.readline() if r else ""
        if line.strip() != "ready":
            raise RuntimeError(f"delay relay did not start ({self.relay.poll()})")
        self.relay_note += f"; {_prioritize(self.relay.pid, self.realtime)}"

    def relay_cpu_seconds(self) -> float | None:
        """CPU time (user + system) the relay process has used so far."""
        return _cpu_seconds(self.relay.pid) if self.relay is not None else None

    def relay_stats(self, timeout: float = 5) -> list[dict[str, float]]:
        """Counters of the running relay, one dict per direction (0: A->B, 1: B->A):
        frames, bytes, drops_full, drops_send, truncated, late_avg_us, late_max_us,
        queue_max_bytes."""
        if self.relay is None or self.relay.poll() is not None:
            return []
        self.relay.send_signal(signal.SIGUSR1)
        return _read_stats(self.relay.stdout, "stats", timeout)

    def _wait_reachable(self, timeout: float = 15, dst: str = ADDR_B) -> None:
        """ARP + a TCP handshake across the path, from inside A."""
        code = (
            "import socket,sys,time\n"
            f"ls=None\n"
            "d=time.monotonic()+%f\n"
            "while time.monotonic()<d:\n"
            f"  try: socket.create_connection(('{dst}',9),timeout=1).close(); break\n"
            "  except ConnectionRefusedError: break\n"
            "  except OSError: time.sleep(0.1)\n"
            "else: sys.exit(1)\n" % timeout
        )
        # port 9 (discard) has no listener in B: a RST proves the round trip works
        p = subprocess.run([*self.prefix("a"), sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=timeout + 10, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"emulated WAN path does not carry traffic: {p.stderr[-300:]}")

    def down(self) -> None:
        """Remove everything (idempotent): processes in our namespaces, then namespaces."""
        if self.relay is not None:
            _stop(self.relay)
            try:
                self.relay_final = _read_stats(self.relay.stdout, "final", 1) or self.relay_final
                self.relay.stdout.close()
            except (OSError, ValueError):
                pass
            self.relay = None
        for ns in reversed(self._created):
            _kill_ns_pids(ns)
            _run("ip", "netns", "del", ns, check=False)
        self._created.clear()
        self._up = False
        self._restore_handlers()
        atexit.unregister(self.down)

    # --- signals ---------------------------------------------------------------------
    def _install_handlers(self) -> None:
        def handler(signum, frame):  # turn the signal into an exception: finally blocks run
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _restore_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()

    # --- measurement -----------------------------------------------------------------
    def measure_rtt_ms(self, n: int = 5, src: str = "a", dst: str = "b") -> float:
        """Median TCP connect time from side ``src`` to side ``dst`` (a listener is started
        in ``dst`` for it)."""
        dst_addr = {"a": ADDR_A, "b": ADDR_B, "s": ADDR_S}.get(dst) or client_addr(int(dst[1:]))
        srv = subprocess.Popen(
            [*self.prefix(dst), sys.executable, "-c",
             ("import socket,sys\n"
              f"s=socket.create_server(('{dst_addr}',0));print(s.getsockname()[1],flush=True)\n"
              "while True:\n  c,_=s.accept();c.close()\n")],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            port = int(srv.stdout.readline())
            code = (
                "import socket,time,statistics\nxs=[]\n"
                f"for _ in range({n + 1}):\n"
                "  t=time.perf_counter()\n"
                f"  socket.create_connection(('{dst_addr}',{port}),timeout=10).close()\n"
                "  xs.append(time.perf_counter()-t)\n"
                "print(statistics.median(xs[1:])*1e3)\n"
            )
            out = subprocess.run([*self.prefix(src), sys.executable, "-c", code],
                                 capture_output=True, text=True, timeout=60, check=True)
            return float(out.stdout.strip())
        finally:
            _stop(srv)


def _read_stats(stream, word: str, timeout: float) -> list[dict[str, float]]:
    """Read the relay's two "WORD dir=N key=value ..." lines (other lines are skipped).

    Reads the pipe's file descriptor directly (no text buffering hiding a second line
    from select)."""
    fd = stream.fileno()
    out: list[dict[str, float]] = []
    buf = b""
    deadline = time.monotonic() + timeout
    while len(out) < 2:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            parts = line.decode("ascii", "replace").split()
            if not parts or parts[0] != word:
                continue
            row: dict[str, float] = {}
            for kv in parts[1:]:
                k, _, v = kv.partition("=")
                try:
                    row[k] = float(v)
                except ValueError:
                    pass
            out.append(row)
    return out


def _stop(proc: subprocess.Popen, timeout: float = 3) -> None:
    stop_proc(proc, timeout)


def _kill_ns_pids(ns: str) -> None:
    """Kill processes still inside one of OUR namespaces (unique names: only ours)."""
    p = _run("ip", "netns", "pids", ns, check=False)
    pids = [int(x) for x in p.stdout.split() if x.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        time.sleep(0.3)
        pids = alive


def list_namespaces() -> list[str]:
    p = _run("ip", "netns", "list", check=False)
    return [ln.split()[0] for ln in p.stdout.splitlines() if ln.strip()]


def cleanup_stale(dry_run: bool = False) -> list[str]:
    """Remove ftxb-<pid>-* namespaces whose creating process is gone."""
    from flwr_transports.links.base import pid_alive

    found = []
    for ns in list_namespaces():
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)-(?:[abrs]|b\d+)", ns)
        if not m or pid_alive(int(m[1])):
            continue
        found.append(ns)
        if not dry_run:
            _kill_ns_pids(ns)
            _run("ip", "netns", "del", ns, check=False)
    return found


# --------------------------------------------------------------------------------------
# the delay relay (runs inside the middle namespace)


def _packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    try:
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass  # old kernel: outgoing frames are filtered by address below
    for opt in (SO_RCVBUFFORCE, SO_SNDBUFFORCE):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, 32 * 1024 * 1024)
        except OSError:
            pass
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


def relay_main(argv: list[str]) -> int:
    """``relay IF1 IF2 ONE_WAY_MS MAX_QUEUE_BYTES``: bridge two interfaces with a delay
    (same behaviour and stats lines as delay_relay.c)."""
    set_pdeathsig()
    if os.getppid() == 1:
        return 1
    if1, if2, delay_ms, qmax = argv[0], argv[1], float(argv[2]), int(argv[3])
    delay = delay_ms / 1000.0
    a, b = _packet_socket(if1), _packet_socket(if2)
    socks = (a, b)
    peer = {a: b, b: a}
    queue: dict[socket.socket, collections.deque] = {a: collections.deque(), b: collections.deque()}
    qbytes = {a: 0, b: 0}
    # per direction (received on a: 0, on b: 1)
    st = {s: {"frames": 0, "bytes": 0, "drops_full": 0, "drops_send": 0, "truncated": 0,
              "late_sum": 0.0, "late_max": 0.0, "qmax": 0} for s in socks}
    stop = False

    def report(word: str) -> None:
        for d, s in enumerate(socks):
            x = st[s]
            n = x["frames"] or 1
            print(f"{word} dir={d} frames={x['frames']} bytes={x['bytes']} "
                  f"drops_full={x['drops_full']} drops_send={x['drops_send']} "
                  f"truncated={x['truncated']} late_avg_us={x['late_sum'] / n * 1e6:.1f} "
                  f"late_max_us={x['late_max'] * 1e6:.1f} queue_max_bytes={x['qmax']}",
                  flush=True)

    def on_term(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGUSR1, lambda signum, frame: report("stats"))
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        timeout = None
        for s in socks:  # send what is due
            q = queue[s]
            out = peer[s]
            x = st[s]
            while q and q[0][0] <= now:
                due, frame = q.popleft()
                qbytes[s] -= len(frame)
                try:
                    out.send(frame)
                except (BlockingIOError, OSError):
                    x["drops_send"] += 1
                    continue
                x["frames"] += 1
                x["bytes"] += len(frame)
                late = time.monotonic() - due
                x["late_sum"] += late
                x["late_max"] = max(x["late_max"], late)
            if q:
                t = q[0][0] - now
                timeout = t if timeout is None or t < timeout else timeout
        try:
            ready, _, _ = select.select(socks, (), (), timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        due = now + delay
        for s in ready:
            q = queue[s]
            x = st[s]
            for _ in range(256):
                try:
                    frame = s.recv(70000)
                except (BlockingIOError, InterruptedError):
                    break
                if qbytes[s] + len(frame) > qmax:
                    x["drops_full"] += 1  # tail drop, like a full router queue
                    continue
                q.append((due, frame))
                qbytes[s] += len(frame)
                x["qmax"] = max(x["qmax"], qbytes[s])
    report("final")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "relay":
        return relay_main(argv[1:])
    print("internal entry point; use 'ftx-bench --wan PROFILE'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Five-namespace test topology for polevpn end-to-end tests, demo and benchmark.

    hostA --LAN A-- gwA ==underlay== router ==underlay== gwB --LAN B-- hostB

Addresses (documentation/benchmark ranges only):

* LAN A:    hostA 198.18.10.2/24, 2001:db8:10::2/64; gwA 198.18.10.1/24, 2001:db8:10::1/64
* LAN B:    hostB 198.18.20.2/24, 2001:db8:20::2/64; gwB 198.18.20.1/24, 2001:db8:20::1/64
* Underlay: gwA 198.19.0.2/30 <-> router 198.19.0.1/30
            gwB 198.19.0.6/30 <-> router 198.19.0.5/30

Every namespace name carries a per-instance random prefix (``pv<4 hex>-``), so
parallel or leftover runs never collide.  ``teardown()`` kills every process
started through :meth:`Topology.popen` by PID and deletes every namespace
(deleting a namespace removes the veth pairs inside it).

``Topology(impair=True)`` adds a sixth namespace ``imp`` on the gwA <-> router
underlay; every address stays as above:

    gwA wan0 ==== a0 [imp] r0 ==== ul-a router

imp has no addresses of its own: it answers ARP for both ends (proxy ARP), knows
both ends' MACs statically and forwards.  :meth:`Topology.start_impair` starts
the userspace element ``tests/impair.py`` on two TUN devices (``impu`` for
gwA -> router, ``impd`` for router -> gwA) and adds the policy rules
``iif a0 lookup 101`` / ``iif r0 lookup 102`` that send every underlay packet
through them; without the element (or after :meth:`Topology.stop_impair`) imp
is a plain kernel router.  :meth:`Topology.set_loss` installs an nftables
random-drop rule (in imp, or in router without impair) usable on its own or
together with the element.

``Topology.set_line(Line(...))`` makes that underlay a long-haul line (issue 16): rate, a
drop-tail bottleneck queue, delay, random and bursty loss, each way.  Per direction, in the
order a packet meets them (``up`` shown; ``down`` is the mirror image, entering at r0):

    gwA wan0 -> a0: nft random drop (loss_pct) -> impu: tbf (rate_mbit, queue) ->
    element: Gilbert-Elliott drop, delay_ms -> r0 -> router ul-a

The queue is a tc tbf on the element's TUN (``impu`` / ``impd``), i.e. in imp, off every
host that sends: no sender ever feels it as local back-pressure (socket buffer, TCP small
queues), as it would with tbf on its own interface; it sees only what a cheap line shows,
delay and drops.  Its limit is ``queue_ms`` worth of bytes at the rate (default 100 ms, so
375 kB at 30 Mbit/s, a modest ISP buffer; drop-tail); the token bucket's burst is 1 ms at the
rate, at least three 1500-byte packets (smaller bursts lose a few % of the rate to timer
slack).  tbf counts IP bytes (a TUN has no link header).  Loss drawn by nft happens before
the queue (the packet costs no line time), bursty loss after it (it did).  The delay comes
after the queue, so a queue that fills adds to the base round trip of 2 x delay_ms.  The
line exists while the element runs; ``set_line`` starts it (or changes its parameters),
``clear_line`` lifts every limit.

``Topology(shared_line=True)`` (implies impair) puts gwB behind the same line, for two
gateways on one bottleneck: gwB's underlay ends in imp (``b0``) instead of the router, and
imp sends what gwB sends into the same TUN (same queue, delay and loss) as gwA's:

    gwA wan0 ==== a0 [imp] r0 ==== ul-a router   198.19.0.1/30 and 198.19.0.5/32 on ul-a
    gwB wan0 ==== b0 [imp]                       gwB keeps 198.19.0.6/30 and dials .5

The router has no ``ul-b``; it holds gwB's link address 198.19.0.5 as a /32 on ul-a and
reaches 198.19.0.6 by a host route on ul-a (proxy ARP in imp, as for gwA).  Whatever comes
out of the up TUN goes to the router (``iif impu lookup 103``), so gwA and gwB reach each
other only through the router, crossing the line up and down.

``Topology(dual_uplink=True)`` gives gwA a second underlay link to the router, IPv6 only,
and makes the first one IPv4 only (IPv6 disabled on wan0 and ul-a, so not even link-local
addresses remain):

    gwA wan0 ==== ul-a  router    198.19.0.2/30 <-> 198.19.0.1/30             (IPv4 only)
    gwA wan1 ==== ul-a6 router    2001:db8:ff01::2/64 <-> 2001:db8:ff01::1/64 (IPv6 only)

Both ends of wan1 keep their addresses across ``ip link set down`` (keep_addr_on_down), so
:meth:`Topology.link_down` / :meth:`Topology.link_up` and :meth:`Topology.flap` model a
cable pulled and plugged back.  :meth:`Topology.rate_limit` (tc tbf, egress) and
:meth:`Topology.if_bytes` work on any interface of any topology.

:meth:`Topology.add_vpc` adds a host ``vpc`` behind the router on 198.18.30.0/24 (router
``vpc0`` 198.18.30.1, vpc 198.18.30.2), for the router's own TUN:

    vpc --198.18.30.0/24-- router [polevpn0: 169.254.0.254]

:meth:`Topology.add_router2` adds a second router ``router2`` (a cluster of two, issue 17),
linked to the router, and a second underlay link from gwB to it; the router namespace
forwards between its links, so every gateway reaches both routers:

    router ul-r2 198.19.0.13/30 <-> router2 ul-r1 198.19.0.14/30      (the routers' link)
    gwB wan1     198.19.0.18/30 <-> router2 ul-b  198.19.0.17/30

:meth:`Topology.add_office` adds a further office (``OFFICES``): gwC (or gwD) with a LAN and
hostC (hostD) as gwA's, an underlay link to the router and, after add_router2, one to
router2, so that the office can be attached to either router or to both (``links``):

    hostC 198.18.40.2/24, 2001:db8:40::2/64 -- gwC .1, ::1; tunnel 169.254.0.3, 2001:db8:ff::3
    gwC wan0 198.19.0.22/30 <-> router ul-c 198.19.0.21/30
    gwC wan1 198.19.0.26/30 <-> router2 ul-c 198.19.0.25/30
    (gwD: 198.18.50.0/24, 2001:db8:50::/64, 169.254.0.4; 198.19.0.28/30 and 198.19.0.32/30)

``Topology(service_address=True)`` gives the router a service address on ``lo``, the one
gateways dial, apart from its link addresses (a secondary, floating or anycast address; issue
21), and both underlay links an IPv6 subnet too:

    router lo     198.19.0.1/32, 2001:db8:ff02::1/128                      (service)
    gwA wan0 ==== ul-a router    198.19.0.10/30 <-> 198.19.0.9/30, 2001:db8:ff0a::2/64 <-> ::1
    gwB wan0 ==== ul-b router    198.19.0.6/30  <-> 198.19.0.5/30, 2001:db8:ff0b::2/64 <-> ::1

The gateways reach the service address through host routes via the router's link address;
the router's routes back have no ``src``, so a reply from a wildcard socket that does not
choose its source leaves from the link address.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NODES = ("hostA", "gwA", "router", "gwB", "hostB")

HOST_A = "198.18.10.2"
GW_A_LAN = "198.18.10.1"
HOST_B = "198.18.20.2"
GW_B_LAN = "198.18.20.1"
HOST_A6 = "2001:db8:10::2"
GW_A_LAN6 = "2001:db8:10::1"
HOST_B6 = "2001:db8:20::2"
GW_B_LAN6 = "2001:db8:20::1"
LAN_A = "198.18.10.0/24"
LAN_B = "198.18.20.0/24"
LAN_A6 = "2001:db8:10::/64"
LAN_B6 = "2001:db8:20::/64"

GW_A_UL = "198.19.0.2"
ROUTER_UL_A = "198.19.0.1"
GW_B_UL = "198.19.0.6"
ROUTER_UL_B = "198.19.0.5"
# Interface names of gwA's (first) underlay link; IPv4 only with dual_uplink=True.
GW_A_UL_IF = "wan0"
ROUTER_UL_A_IF = "ul-a"

# Topology(dual_uplink=True): gwA's second underlay link, IPv6 only.  2001:db8:ff01::/64 is
# apart from the LANs (2001:db8:10::, :20::) and the tunnel addresses (2001:db8:ff::/64).
UL_A6 = "2001:db8:ff01::/64"
GW_A_UL6 = "2001:db8:ff01::2"
ROUTER_UL_A6 = "2001:db8:ff01::1"
GW_A_UL6_IF = "wan1"  # in gwA
ROUTER_UL_A6_IF = "ul-a6"  # in router

# Topology(service_address=True): the router's service address on lo, its link addresses.
SERVICE4 = ROUTER_UL_A  # 198.19.0.1: what gateways dial, as without the option
SERVICE6 = "2001:db8:ff02::1"
SVC_GW_A_UL = "198.19.0.10"
SVC_ROUTER_UL_A = "198.19.0.9"
SVC_GW_A_UL6 = "2001:db8:ff0a::2"
SVC_ROUTER_UL_A6 = "2001:db8:ff0a::1"
SVC_GW_B_UL6 = "2001:db8:ff0b::2"
SVC_ROUTER_UL_B6 = "2001:db8:ff0b::1"

# Topology.add_router2(): a second router (a cluster, issue 17), its link to the router and
# gwB's link to it
ROUTER2 = "router2"
ROUTER_RR = "198.19.0.13"  # the router's end of the routers' link
ROUTER2_RR = "198.19.0.14"  # router2's end
ROUTER2_UL_B = "198.19.0.17"
GW_B_UL2 = "198.19.0.18"

# Topology.add_office("C" | "D"): a further office, gwX with its LAN and hostX, with an underlay
# link to the router and one to router2 (when there is one): a cluster's dual-homed offices
@dataclass(frozen=True)
class Office:
    lan: str  # IPv4 LAN, host .2 and gateway .1
    lan6: str  # IPv6 LAN, host ::2 and gateway ::1
    tun4: str  # the gateway's tunnel addresses
    tun6: str
    ul: str  # /30 to the router: router .1, gateway .2 of it
    ul2: str  # /30 to router2: router2 .1, gateway .2 of it

    def _at(self, net: str, i: int) -> str:
        base, _ = net.split("/")
        if ":" in base:
            return f"{base.rstrip(':')}::{i}"
        a, b, c, d = base.split(".")
        return f"{a}.{b}.{c}.{int(d) + i}"

    @property
    def host(self) -> str:
        return self._at(self.lan, 2)

    @property
    def gw_lan(self) -> str:
        return self._at(self.lan, 1)

    @property
    def host6(self) -> str:
        return self._at(self.lan6, 2)

    @property
    def gw_lan6(self) -> str:
        return self._at(self.lan6, 1)

    @property
    def router_ul(self) -> str:
        """The router's end of the office's link to it (what the gateway dials there)."""
        return self._at(self.ul, 1)

    @property
    def gw_ul(self) -> str:
        return self._at(self.ul, 2)

    @property
    def router2_ul(self) -> str:
        """router2's end of the office's link to it."""
        return self._at(self.ul2, 1)

    @property
    def gw_ul2(self) -> str:
        return self._at(self.ul2, 2)


OFFICES = {
    "C": Office("198.18.40.0/24", "2001:db8:40::/64", "169.254.0.3", "2001:db8:ff::3",
                "198.19.0.20/30", "198.19.0.24/30"),
    "D": Office("198.18.50.0/24", "2001:db8:50::/64", "169.254.0.4", "2001:db8:ff::4",
                "198.19.0.28/30", "198.19.0.32/30"),
}
HOST_C = OFFICES["C"].host
HOST_C6 = OFFICES["C"].host6
LAN_C = OFFICES["C"].lan
LAN_C6 = OFFICES["C"].lan6
GW_C_TUN4 = OFFICES["C"].tun4
GW_C_TUN6 = OFFICES["C"].tun6

# Topology.add_vpc(): a host behind the router, for the router's own TUN ("tun" in its config)
VPC = "198.18.30.0/24"
VPC_HOST = "198.18.30.2"
VPC_ROUTER = "198.18.30.1"
VPC_ROUTER_IF = "vpc0"  # in router

# Impairment middlebox (Topology(impair=True)): node, interfaces, TUNs, routing tables.
IMP_NODE = "imp"
IMP_IF_A = "a0"  # imp's end of the link to gwA's wan0
IMP_IF_R = "r0"  # imp's end of the link to router's ul-a
IMP_IF_B = "b0"  # imp's end of the link to gwB's wan0 (Topology(shared_line=True))
IMP_TUNS = {"up": "impu", "down": "impd"}  # up: gwA -> router, down: router -> gwA
IMP_TABLES = {"up": 101, "down": 102}
IMP_IIF = {"up": IMP_IF_A, "down": IMP_IF_R}
IMP_UP_OUT_TABLE = 103  # shared_line: what leaves the up TUN, always towards the router
IMPAIR_SCRIPT = str(Path(__file__).resolve().with_name("impair.py"))
NFT_LOSS_TABLE = "pvloss"

# (namespace, route) pairs for plain-routing mode (no tunnel).
PLAIN_ROUTES = (
    ("gwA", f"{LAN_B} via {ROUTER_UL_A}"),
    ("router", f"{LAN_A} via {GW_A_UL}"),
    ("router", f"{LAN_B} via {GW_B_UL}"),
    ("gwB", f"{LAN_A} via {ROUTER_UL_B}"),
)


# Bounded TCP sender / receiver, run with sys.executable inside a namespace.
_RECEIVER = r"""
import hashlib, json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
srv = socket.socket(fam, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(1); srv.settimeout(timeout)
print("ready", flush=True)
conn, peer = srv.accept(); conn.settimeout(timeout)
h = hashlib.sha256(); n = 0; t0 = time.monotonic()
while True:
    b = conn.recv(1 << 16)
    if not b:
        break
    h.update(b); n += len(b)
dt = time.monotonic() - t0
print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "seconds": dt}), flush=True)
"""

# Without a 5th argument as fast as it can; with ``rate`` (bytes/s) paced, never faster, also
# after a stall, and printing "progress <bytes>" after every MiB, for Topology.start_transfer
# (a stream that lasts long enough to break something under it).
_SENDER = r"""
import hashlib, json, os, socket, sys, time
host, port, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rate = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection((host, port), timeout=timeout); break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
h = hashlib.sha256(); sent = 0; t0 = due = time.monotonic(); mark = 0
while sent < size:
    if rate:
        ahead = due - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    b = os.urandom(min(1 << 16, size - sent))
    s.sendall(b); h.update(b); sent += len(b)
    if rate:
        # no catching up after a stall: the stream keeps its pace, so it outlasts the stall
        due = max(due, time.monotonic()) + len(b) / rate
        if sent >> 20 != mark:
            mark = sent >> 20
            print("progress", sent, flush=True)
s.shutdown(socket.SHUT_WR)
s.settimeout(timeout)
while s.recv(4096):
    pass
dt = time.monotonic() - t0
print(json.dumps({"bytes": sent, "sha256": h.hexdigest(), "seconds": dt}), flush=True)
"""

# Numbered UDP datagrams (4-byte big-endian sequence number, padded), for udp_probe().
_UDP_RECEIVER = r"""
import json, socket, struct, sys, time
host, port, quiet, budget = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((host, port))
print("ready", flush=True)
order = []; end = time.monotonic() + budget; last = None
while time.monotonic() < end:
    wait = 10.0 if last is None else quiet - (time.monotonic() - last)
    if wait <= 0:
        break
    s.settimeout(min(wait, max(end - time.monotonic(), 0.01)))
    try:
        b = s.recv(65536)
    except socket.timeout:
        if last is None:
            break
        continue
    last = time.monotonic()
    order.append(struct.unpack("!I", b[:4])[0])
print(json.dumps(order), flush=True)
"""

_UDP_SENDER = r"""
import socket, struct, sys, time
host, port, count, interval, size = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                      float(sys.argv[4]), int(sys.argv[5]))
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
pad = bytes(max(size - 4, 0)); t0 = time.monotonic()
for i in range(count):
    ahead = t0 + i * interval - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
    s.sendto(struct.pack("!I", i) + pad, (host, port))
"""


class TopologyError(RuntimeError):
    pass


LINE_MTU = 1500  # the underlay's MTU: the largest packet the line's token bucket must pass


@dataclass(frozen=True)
class Line:
    """A long-haul line on the gwA <-> router underlay (see the module docstring and
    :meth:`Topology.set_line`): the same in both directions.

    ``rate_mbit``: the bottleneck's rate (IP bytes); ``delay_ms``: one-way delay;
    ``loss_pct``: random loss (nftables numgen); ``ge_*``: Gilbert-Elliott bursty loss in the
    impairment element (``ge_gb_pct`` 0: off; see tests/impair.py); ``queue_ms``: the
    drop-tail bottleneck queue, in ms at the rate; ``seed``: the element's random seed (used
    when set_line starts the element)."""

    rate_mbit: float
    delay_ms: float = 0.0
    loss_pct: float = 0.0
    ge_gb_pct: float = 0.0
    ge_bg_pct: float = 0.0
    ge_loss_good_pct: float = 0.0
    ge_loss_bad_pct: float = 100.0
    queue_ms: float = 100.0
    seed: int = 1

    def __post_init__(self) -> None:
        if self.rate_mbit <= 0 or self.queue_ms <= 0:
            raise ValueError(f"line rate and queue must be > 0: {self}")
        if not 0 <= self.loss_pct <= 100 or self.delay_ms < 0:
            raise ValueError(f"line loss 0..100 % and delay >= 0 ms: {self}")

    @property
    def bytes_per_s(self) -> float:
        return self.rate_mbit * 1e6 / 8

    @property
    def queue_bytes(self) -> int:
        """tbf's limit: queue_ms at the rate, never less than the burst and two packets."""
        return max(int(self.bytes_per_s * self.queue_ms / 1000), self.burst_bytes + 2 * LINE_MTU)

    @property
    def burst_bytes(self) -> int:
        """1 ms at the rate, at least 3 packets (below that tbf loses rate to timer slack)."""
        return max(3 * LINE_MTU, int(self.bytes_per_s / 1000))

    @property
    def bursty(self) -> bool:
        return self.ge_gb_pct > 0

    @property
    def ge_mean_loss_pct(self) -> float:
        """The Gilbert-Elliott chain's long-run loss (its stationary bad-state share times
        the bad state's loss, plus the good state's)."""
        if not self.bursty:
            return 0.0
        bad = self.ge_gb_pct / (self.ge_gb_pct + self.ge_bg_pct)
        return bad * self.ge_loss_bad_pct + (1 - bad) * self.ge_loss_good_pct

    @property
    def ge_mean_burst(self) -> float:
        """Packets per visit to the bad state (mean), 0 without the model."""
        return 100.0 / self.ge_bg_pct if self.bursty else 0.0

    def impair_params(self) -> dict[str, float]:
        """The element's parameters (both directions) for this line."""
        params: dict[str, float] = {"delay_ms": self.delay_ms}
        if self.bursty:
            params.update(ge_gb_pct=self.ge_gb_pct, ge_bg_pct=self.ge_bg_pct,
                          ge_loss_good_pct=self.ge_loss_good_pct,
                          ge_loss_bad_pct=self.ge_loss_bad_pct)
        return params

    def label(self) -> str:
        """E.g. "30 Mbit/s, 65 ms, 3%" or "30 Mbit/s, 65 ms, GE 2.9% (bursts of 5)"."""
        loss = []
        if self.loss_pct:
            loss.append(f"{self.loss_pct:g}%")
        if self.bursty:
            loss.append(f"GE {self.ge_mean_loss_pct:.2g}% (bursts of {self.ge_mean_burst:.2g})")
        return f"{self.rate_mbit:g} Mbit/s, {self.delay_ms:g} ms, {' + '.join(loss) or 'no loss'}"


@dataclass
class LinkFlapper:
    """A link taken down and up ``times`` times in a background thread (see Topology.flap).

    The thread never runs longer than ``max_total`` s after start (the last down is cut short
    if need be) and always leaves the link up.  ``events`` lists ``(time.monotonic(), "down"
    | "up")`` as they happened.
    """

    topo: Topology
    node: str
    ifname: str
    times: int
    down_s: float
    up_s: float
    delay: float
    max_total: float
    events: list[tuple[float, str]] = field(default_factory=list)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> LinkFlapper:
        self._thread = threading.Thread(
            target=self._run, name=f"flap-{self.node}-{self.ifname}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_total

        def pause(seconds: float) -> bool:
            """Sleep, cut short by stop() or the deadline; False once flapping must end."""
            left = deadline - time.monotonic()
            self._stop.wait(max(0.0, min(seconds, left)))
            return not self._stop.is_set() and time.monotonic() < deadline

        is_down = False
        try:
            if not pause(self.delay):
                return
            for i in range(self.times):
                self.topo.link_down(self.node, self.ifname)
                is_down = True
                self.events.append((time.monotonic(), "down"))
                stopping = not pause(self.down_s)
                self.topo.link_up(self.node, self.ifname)
                is_down = False
                self.events.append((time.monotonic(), "up"))
                if stopping or (i + 1 < self.times and not pause(self.up_s)):
                    return
        except Exception as exc:  # reported by join(); the thread must not die silently
            self.error = exc
        finally:
            if is_down:  # an error between down and up: the link must not stay cut
                with contextlib.suppress(Exception):
                    self.topo.link_up(self.node, self.ifname)
                    self.events.append((time.monotonic(), "up"))

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    @property
    def cycles(self) -> int:
        """Completed down-and-up cycles so far."""
        return sum(1 for _, what in self.events if what == "up")

    def join(self, timeout: float | None = None) -> None:
        """Wait for the end (by default bounded by max_total + 15 s); raise what went wrong."""
        if self._thread is None:
            raise TopologyError("flapper was never started")
        self._thread.join(self.max_total + 15 if timeout is None else timeout)
        if self._thread.is_alive():
            raise TopologyError(f"flapping {self.node}/{self.ifname} did not end in time")
        if self.error is not None:
            raise TopologyError(f"flapping {self.node}/{self.ifname}: {self.error}")

    def stop(self, timeout: float = 15) -> None:
        """End early (the link is left up); errors are not raised here."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


@dataclass
class BackgroundTransfer:
    """A paced TCP transfer running in the background (see Topology.start_transfer)."""

    topo: Topology
    rx: subprocess.Popen
    tx: subprocess.Popen
    size: int
    timeout: float

    def sent(self) -> int:
        """Bytes the sender has handed to its socket so far (to the last MiB)."""
        lines = re.findall(rb"^progress (\d+)$", self.tx.log_path.read_bytes(), re.M)
        return int(lines[-1]) if lines else 0

    def running(self) -> bool:
        return self.tx.poll() is None

    def result(self) -> dict:
        """Wait for both ends (bounded by the transfer's timeout); same dict as transfer()."""
        try:
            self.tx.wait(timeout=self.timeout + 15)
            self.rx.wait(timeout=self.timeout + 15)
            sent = _last_json(self.tx.log_path)
            received = _last_json(self.rx.log_path)
        finally:
            self.topo.stop(self.tx, timeout=2)
            self.topo.stop(self.rx, timeout=2)
        ok = (
            sent is not None
            and received is not None
            and sent["sha256"] == received["sha256"]
            and sent["bytes"] == received["bytes"] == self.size
        )
        return {"sent": sent, "received": received, "ok": ok}


@dataclass
class Iperf3Run:
    """An iperf3 client running in the background (see Topology.start_iperf3)."""

    topo: Topology
    server: subprocess.Popen
    client: subprocess.Popen
    seconds: float

    def running(self) -> bool:
        return self.client.poll() is None

    def result(self) -> dict:
        """Wait for the client (bounded by its duration + 40 s); its parsed JSON report.
        Raises TopologyError when it failed; both ends are stopped in any case."""
        try:
            try:
                self.client.wait(timeout=self.seconds + 40)
            except subprocess.TimeoutExpired:
                raise TopologyError(f"iperf3 did not end: {self.client.log_path}") from None
            text = Path(self.client.log_path).read_text(errors="replace")
        finally:
            self.topo.stop(self.client, timeout=2)
            self.topo.stop(self.server, timeout=2)
        try:
            data = json.loads(text)
        except ValueError:
            raise TopologyError(f"iperf3 gave no JSON: {text[-300:]}") from None
        if self.client.returncode != 0 or data.get("error"):
            raise TopologyError(f"iperf3 failed: {data.get('error') or text[-300:]}")
        return data


# "[  5]   1.00-2.00   sec  3.50 MBytes  29.4 Mbits/sec" (a report line of one stream)
_IPERF_INTERVAL = re.compile(
    r"^\[\s*\d+\]\s+([\d.]+)-([\d.]+)\s+sec\s+[\d.]+ \w?Bytes\s+([\d.]+) (\w?)bits/sec\s*$",
    re.M)


def iperf3_received(data: dict) -> list[tuple[float, float]]:
    """The receiver's goodput over time from an iperf3 report made with
    ``--get-server-output`` (Topology.start_iperf3): ``(end of interval s, Mbit/s)``, one
    stream.  The sender's ``intervals`` count what went into its socket, which comes in
    bursts; this is what arrived."""
    text = data.get("server_output_text") or ""
    text = text.split("- - -", 1)[0]  # the intervals; the summary follows
    scale = {"": 1e-6, "K": 1e-3, "M": 1.0, "G": 1e3}
    return [(float(end), float(rate) * scale.get(unit, 1.0))
            for start, end, rate, unit in _IPERF_INTERVAL.findall(text)
            if float(end) - float(start) >= 0.1]  # not the last few ms after the end


def _last_json(path: Path) -> dict | None:
    """The JSON result a _SENDER/_RECEIVER prints last; None if it died before printing."""
    lines = Path(path).read_text(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def daemons_ready() -> tuple[bool, str]:
    """Whether end-to-end tests with the real daemons can run here, and if not, why."""
    ok, reason = have_netns_support()
    if ok and shutil.which("ping") is None:
        return False, "'ping' (iputils-ping) not found"
    scripts = (console_script("polevpn-router"), console_script("polevpn-gateway"))
    if ok and None in scripts:
        return False, "polevpn console scripts not installed (run 'make venv')"
    return ok, reason


def have_netns_support() -> tuple[bool, str]:
    """Return (ok, reason) telling whether this machine can build a Topology."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, TUN devices)"
    if shutil.which("ip") is None:
        return False, "iproute2 'ip' command not found"
    return True, ""


class Topology:
    """Builds and tears down hostA / gwA / router / gwB / hostB namespaces."""

    def __init__(
        self,
        prefix: str | None = None,
        log_dir: str | os.PathLike | None = None,
        impair: bool = False,
        dual_uplink: bool = False,
        service_address: bool = False,
        shared_line: bool = False,
    ):
        impair = impair or shared_line
        if service_address and (impair or dual_uplink):
            raise ValueError("service_address goes with neither impair nor dual_uplink")
        self.prefix = prefix or f"pv{secrets.token_hex(2)}"
        self.impair = impair
        self.shared_line = shared_line
        self.line: Line | None = None
        self.dual_uplink = dual_uplink
        self.service_address = service_address
        self._flappers: list[LinkFlapper] = []
        self.nodes: tuple[str, ...] = (*NODES, IMP_NODE) if impair else NODES
        self.ns = {node: f"{self.prefix}-{node}" for node in self.nodes}
        # Without an explicit log_dir the logs go to a private temp dir that
        # teardown() removes again.
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix=f"{self.prefix}-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._log_files: list = []
        self.plain_routing = False
        # Interface names (inside their namespaces; short to fit IFNAMSIZ).
        self.if_hosta = "eth0"  # in hostA, peer of gwA's "lan0"
        self.if_hostb = "eth0"
        # impairment element (impair=True only)
        self.impair_proc: subprocess.Popen | None = None
        self._imp_dir: Path | None = None
        self.last_impair_stats: dict | None = None

    # ------------------------------------------------------------------ helpers
    def name(self, node: str) -> str:
        return self.ns[node]

    def _ip(
        self, *args: str, check: bool = True, timeout: float = 10
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", *args], check=check, capture_output=True, text=True, timeout=timeout
        )

    def run(
        self,
        node: str,
        cmd: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        input: str | bytes | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside ``node``'s namespace and wait (bounded by ``timeout``)."""
        full = ["ip", "netns", "exec", self.ns[node], *cmd]
        if input is not None and not text and isinstance(input, str):
            input = input.encode()
        res = subprocess.run(
            full, capture_output=True, text=text, timeout=timeout, input=input
        )
        if check and res.returncode != 0:
            raise TopologyError(
                f"[{node}] {' '.join(cmd)} -> rc={res.returncode}\n"
                f"stdout: {res.stdout}\nstderr: {res.stderr}"
            )
        return res

    def popen(
        self,
        node: str,
        cmd: Sequence[str],
        log_name: str | None = None,
        env: dict | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.Popen:
        """Start ``cmd`` in the background in ``node``'s namespace.

        stdout and stderr go to ``<log_dir>/<log_name>[-N].log`` (a new file per
        start); the process is tracked and killed by PID on teardown.  ``proc.log_path`` is set.
        """
        log_name = log_name or f"{node}-{Path(cmd[0]).name}"
        log_path = self.log_dir / f"{log_name}.log"
        n = 1
        while log_path.exists():  # a restart gets a fresh log: no stale matches
            n += 1
            log_path = self.log_dir / f"{log_name}-{n}.log"
        fh = open(log_path, "wb")  # noqa: SIM115 - closed in teardown
        self._log_files.append(fh)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[node], *cmd],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float = 5, sig: int = signal.SIGTERM) -> int | None:
        """Stop one process by PID: ``sig`` first, SIGKILL if it lingers."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)
        return proc.returncode

    # ------------------------------------------------------------------- build
    def setup(self) -> Topology:
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def _add_ns(self, node: str) -> None:
        ns = self.ns[node]
        self._ip("netns", "add", ns)
        self._created.append(ns)
        self.run(node, ["ip", "link", "set", "lo", "up"])

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        # Create both ends in a's namespace with final names, then move b's end.
        tmp = f"{self.prefix}t{secrets.token_hex(2)}"[:15]
        self.run(a, ["ip", "link", "add", a_if, "type", "veth", "peer", "name", tmp])
        self.run(a, ["ip", "link", "set", tmp, "netns", self.ns[b]])
        self.run(b, ["ip", "link", "set", tmp, "name", b_if])
        self.run(a, ["ip", "link", "set", a_if, "up"])
        self.run(b, ["ip", "link", "set", b_if, "up"])

    def _addr(self, node: str, ifname: str, cidr: str) -> None:
        cmd = ["ip", "addr", "add", cidr, "dev", ifname]
        if ":" in cidr:
            cmd.append("nodad")
        self.run(node, cmd)

    def _sysctl(self, node: str, key: str, value: str) -> None:
        self.run(node, ["sysctl", "-q", "-w", f"{key}={value}"])

    def add_site(self, node: str, gw_ul: str, router_ul: str, router_if: str) -> None:
        """A further office gateway host ``node`` on its own /30 underlay to the router
        (no LAN behind it); removed with the rest on teardown."""
        self.ns[node] = f"{self.prefix}-{node}"
        self._add_ns(node)
        self._veth(node, "wan0", "router", router_if)
        self._addr(node, "wan0", f"{gw_ul}/30")
        self._addr("router", router_if, f"{router_ul}/30")
        self._sysctl(node, "net.ipv4.ip_forward", "1")

    def add_router2(self) -> None:
        """A second router ``router2``: a /30 to the router (198.19.0.12/30) and one to gwB
        (gwB's ``wan1``, 198.19.0.16/30), with routes so that gwA, gwB and both routers
        reach each other's underlay addresses (the router and router2 forward between
        their links); removed with the rest on teardown."""
        self.ns[ROUTER2] = f"{self.prefix}-{ROUTER2}"
        self._add_ns(ROUTER2)
        self._veth("router", "ul-r2", ROUTER2, "ul-r1")
        self._addr("router", "ul-r2", f"{ROUTER_RR}/30")
        self._addr(ROUTER2, "ul-r1", f"{ROUTER2_RR}/30")
        self._veth("gwB", "wan1", ROUTER2, "ul-b")
        self._addr("gwB", "wan1", f"{GW_B_UL2}/30")
        self._addr(ROUTER2, "ul-b", f"{ROUTER2_UL_B}/30")
        for node in ("router", ROUTER2):
            self._sysctl(node, "net.ipv4.ip_forward", "1")
        # gwA reaches router2 through the router; router2 reaches gwA's and gwB's first
        # links the same way; the router reaches gwB's second link through router2
        self.run("gwA", ["ip", "route", "add", "198.19.0.12/30", "via", ROUTER_UL_A])
        self.run("gwA", ["ip", "route", "add", "198.19.0.16/30", "via", ROUTER_UL_A])
        self.run(ROUTER2, ["ip", "route", "add", "198.19.0.0/29", "via", ROUTER_RR])
        self.run("router", ["ip", "route", "add", "198.19.0.16/30", "via", ROUTER2_RR])

    def add_office(self, letter: str) -> None:
        """A further office ``letter`` (``OFFICES``: "C" or "D"): gw<letter> with its LAN
        and host<letter> as gwA and hostA, an underlay link (its ``wan0``) to the router
        (``ul-<letter>`` there) and, when router2 exists (add_router2 first), one (``wan1``)
        to router2; removed with the rest on teardown.

            host<X> eth0 --LAN-- lan0 gw<X> wan0 ==== ul-<x> router
                                            wan1 ==== ul-<x> router2
        """
        office = OFFICES[letter]
        gw, host, rif = f"gw{letter}", f"host{letter}", f"ul-{letter.lower()}"
        for node in (gw, host):
            self.ns[node] = f"{self.prefix}-{node}"
            self._add_ns(node)
        plen = office.lan.split("/")[1]
        plen6 = office.lan6.split("/")[1]
        self._veth(gw, "lan0", host, "eth0")
        self._addr(gw, "lan0", f"{office.gw_lan}/{plen}")
        self._addr(gw, "lan0", f"{office.gw_lan6}/{plen6}")
        self._addr(host, "eth0", f"{office.host}/{plen}")
        self._addr(host, "eth0", f"{office.host6}/{plen6}")
        self.run(host, ["ip", "route", "add", "default", "via", office.gw_lan])
        self.run(host, ["ip", "-6", "route", "add", "default", "via", office.gw_lan6])
        self._veth(gw, "wan0", "router", rif)
        self._addr(gw, "wan0", f"{office.gw_ul}/30")
        self._addr("router", rif, f"{office.router_ul}/30")
        if ROUTER2 in self.ns:
            self._veth(gw, "wan1", ROUTER2, rif)
            self._addr(gw, "wan1", f"{office.gw_ul2}/30")
            self._addr(ROUTER2, rif, f"{office.router2_ul}/30")
        self._sysctl(gw, "net.ipv4.ip_forward", "1")
        self._sysctl(gw, "net.ipv6.conf.all.forwarding", "1")

    def add_vpc(self) -> None:
        """A host ``vpc`` behind the router (the cloud VM's VPC, for the router's own TUN):
        vpc eth0 198.18.30.2/24 <-> router vpc0 198.18.30.1/24, the vpc's default route via
        the router, and forwarding on in the router namespace; removed with the rest."""
        self.ns["vpc"] = f"{self.prefix}-vpc"
        self._add_ns("vpc")
        self._veth("router", VPC_ROUTER_IF, "vpc", "eth0")
        self._addr("router", VPC_ROUTER_IF, f"{VPC_ROUTER}/24")
        self._addr("vpc", "eth0", f"{VPC_HOST}/24")
        self.run("vpc", ["ip", "route", "add", "default", "via", VPC_ROUTER])
        self._sysctl("router", "net.ipv4.ip_forward", "1")

    def _setup(self) -> None:
        for node in self.nodes:
            self._add_ns(node)

        # LAN A
        self._veth("gwA", "lan0", "hostA", "eth0")
        self._addr("gwA", "lan0", f"{GW_A_LAN}/24")
        self._addr("gwA", "lan0", f"{GW_A_LAN6}/64")
        self._addr("hostA", "eth0", f"{HOST_A}/24")
        self._addr("hostA", "eth0", f"{HOST_A6}/64")
        self.run("hostA", ["ip", "route", "add", "default", "via", GW_A_LAN])
        self.run("hostA", ["ip", "-6", "route", "add", "default", "via", GW_A_LAN6])

        # LAN B
        self._veth("gwB", "lan0", "hostB", "eth0")
        self._addr("gwB", "lan0", f"{GW_B_LAN}/24")
        self._addr("gwB", "lan0", f"{GW_B_LAN6}/64")
        self._addr("hostB", "eth0", f"{HOST_B}/24")
        self._addr("hostB", "eth0", f"{HOST_B6}/64")
        self.run("hostB", ["ip", "route", "add", "default", "via", GW_B_LAN])
        self.run("hostB", ["ip", "-6", "route", "add", "default", "via", GW_B_LAN6])

        # Underlay
        if self.impair:
            self._veth("gwA", "wan0", IMP_NODE, IMP_IF_A)
            self._veth(IMP_NODE, IMP_IF_R, "router", "ul-a")
        else:
            self._veth("gwA", "wan0", "router", "ul-a")
        if self.service_address:
            self._setup_service_address()
        else:
            self._addr("gwA", "wan0", f"{GW_A_UL}/30")
            self._addr("router", "ul-a", f"{ROUTER_UL_A}/30")
        if self.shared_line:
            # gwB behind the same line: its link ends in imp; the router keeps gwB's link
            # address as a /32 on ul-a and reaches gwB by a host route there (see above)
            self._veth("gwB", "wan0", IMP_NODE, IMP_IF_B)
            self._addr("gwB", "wan0", f"{GW_B_UL}/30")
            self._addr("router", "ul-a", f"{ROUTER_UL_B}/32")
            self.run("router", ["ip", "route", "add", f"{GW_B_UL}/32", "dev", "ul-a",
                                "src", ROUTER_UL_B])
        else:
            self._veth("gwB", "wan0", "router", "ul-b")
            self._addr("gwB", "wan0", f"{GW_B_UL}/30")
            self._addr("router", "ul-b", f"{ROUTER_UL_B}/30")

        for gw in ("gwA", "gwB"):
            self._sysctl(gw, "net.ipv4.ip_forward", "1")
            self._sysctl(gw, "net.ipv6.conf.all.forwarding", "1")
        if self.service_address:
            self._service_routes()
        if self.impair:
            self._setup_imp()
        if self.dual_uplink:
            self._setup_dual_uplink()

    def _setup_service_address(self) -> None:
        """The router's service address on lo; gwA's link renumbered off it (see above)."""
        self._addr("router", "lo", f"{SERVICE4}/32")
        self._addr("router", "lo", f"{SERVICE6}/128")
        self._addr("gwA", "wan0", f"{SVC_GW_A_UL}/30")
        self._addr("router", "ul-a", f"{SVC_ROUTER_UL_A}/30")

    def _service_routes(self) -> None:
        links = (
            ("gwA", SVC_GW_A_UL6, SVC_ROUTER_UL_A6, "ul-a", SVC_ROUTER_UL_A),
            ("gwB", SVC_GW_B_UL6, SVC_ROUTER_UL_B6, "ul-b", ROUTER_UL_B),
        )
        for gw, gw6, router6, router_if, router4 in links:
            self._addr(gw, "wan0", f"{gw6}/64")
            self._addr("router", router_if, f"{router6}/64")
            self.run(gw, ["ip", "route", "add", f"{SERVICE4}/32", "via", router4])
            self.run(gw, ["ip", "-6", "route", "add", f"{SERVICE6}/128", "via", router6])

    def _setup_dual_uplink(self) -> None:
        """gwA's second underlay link (IPv6 only); the first becomes IPv4 only."""
        # No IPv6 at all on the first link, link-local included: whatever crosses it is IPv4.
        self._sysctl("gwA", f"net.ipv6.conf.{GW_A_UL_IF}.disable_ipv6", "1")
        self._sysctl("router", f"net.ipv6.conf.{ROUTER_UL_A_IF}.disable_ipv6", "1")
        self._veth("gwA", GW_A_UL6_IF, "router", ROUTER_UL_A6_IF)
        for node, ifname in (("gwA", GW_A_UL6_IF), ("router", ROUTER_UL_A6_IF)):
            # The kernel flushes IPv6 addresses on link down by default, so after link_up()
            # the link would stay dead; a pulled cable keeps its configuration.
            self._sysctl(node, f"net.ipv6.conf.{ifname}.keep_addr_on_down", "1")
            # no router advertisements or autoconfigured addresses besides ours
            self._sysctl(node, f"net.ipv6.conf.{ifname}.accept_ra", "0")
            self._sysctl(node, f"net.ipv6.conf.{ifname}.autoconf", "0")
        prefix_len = UL_A6.split("/")[1]
        self._addr("gwA", GW_A_UL6_IF, f"{GW_A_UL6}/{prefix_len}")  # nodad: usable at once
        self._addr("router", ROUTER_UL_A6_IF, f"{ROUTER_UL_A6}/{prefix_len}")

    def _mac(self, node: str, ifname: str) -> str:
        res = self.run(node, ["ip", "-j", "link", "show", "dev", ifname])
        return json.loads(res.stdout)[0]["address"]

    def _setup_imp(self) -> None:
        """Make imp an address-less IPv4 middlebox between gwA (198.19.0.2) and router (.1)."""
        imp = IMP_NODE
        a, r, b = IMP_IF_A, IMP_IF_R, IMP_IF_B
        edges = (a, r, b) if self.shared_line else (a, r)
        # Forwarding without addresses: reverse-path filtering would drop packets coming
        # back out of the TUNs (their source lies behind a0/r0), and redirects make no sense.
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ):
            self._sysctl(imp, key, value)
        for ifname in edges:
            # proxy ARP: gwA and router resolve each other to imp's MACs; proxy_delay 0
            # answers broadcast requests at once instead of after up to 0.8 s.
            self._sysctl(imp, f"net.ipv4.conf.{ifname}.proxy_arp", "1")
            self._sysctl(imp, f"net.ipv4.neigh.{ifname}.proxy_delay", "0")
            self._sysctl(imp, f"net.ipv4.conf.{ifname}.rp_filter", "0")
        # imp never ARPs itself (it has no address to ARP from): static neighbours.
        self.run(imp, ["ip", "neigh", "replace", GW_A_UL, "lladdr", self._mac("gwA", "wan0"),
                       "dev", a, "nud", "permanent"])
        self.run(imp, ["ip", "neigh", "replace", ROUTER_UL_A, "lladdr",
                       self._mac("router", "ul-a"), "dev", r, "nud", "permanent"])
        if self.shared_line:
            self.run(imp, ["ip", "neigh", "replace", GW_B_UL, "lladdr",
                           self._mac("gwB", "wan0"), "dev", b, "nud", "permanent"])
            for route in (f"{GW_B_UL}/32 dev {b}", f"{LAN_B} via {GW_B_UL} dev {b} onlink"):
                self.run(imp, ["ip", "route", "replace", *route.split()])
            # what leaves the up TUN goes to the router, whatever its destination: gwA and
            # gwB never reach each other inside imp, only through the router (and the line
            # both ways)
            self.run(imp, ["ip", "route", "replace", "default", "via", ROUTER_UL_A, "dev", r,
                           "onlink", "table", str(IMP_UP_OUT_TABLE)])
            self.run(imp, ["ip", "rule", "add", "iif", IMP_TUNS["up"], "lookup",
                           str(IMP_UP_OUT_TABLE), "pref", str(IMP_UP_OUT_TABLE)])
        # Main table: what leaves the TUNs (and everything while no element runs).  LAN A
        # sits behind gwA (plain routing), everything else behind the router.
        for route in (
            f"{GW_A_UL}/32 dev {a}",
            f"{ROUTER_UL_A}/32 dev {r}",
            f"{LAN_A} via {GW_A_UL} dev {a} onlink",
            f"default via {ROUTER_UL_A} dev {r} onlink",
        ):
            self.run(imp, ["ip", "route", "replace", *route.split()])
        # Persistent TUNs, so the routes below exist before the element attaches.
        for direction, tun in IMP_TUNS.items():
            self.run(imp, ["ip", "tuntap", "add", "dev", tun, "mode", "tun"])
            # no IPv6 link-local / router solicitations looping through the element
            self.run(imp, ["ip", "link", "set", tun, "addrgenmode", "none"])
            self.run(imp, ["ip", "link", "set", tun, "mtu", "1500", "txqueuelen", "1000", "up"])
            self._sysctl(imp, f"net.ipv4.conf.{tun}.rp_filter", "0")
            self.run(imp, ["ip", "route", "replace", "default", "dev", tun,
                           "table", str(IMP_TABLES[direction])])

    # ------------------------------------------------------------ plain routes
    def enable_plain_routing(self) -> None:
        """Route LAN A <-> LAN B over the underlay without any tunnel (IPv4 only)."""
        if self.plain_routing:
            return
        self._sysctl("router", "net.ipv4.ip_forward", "1")
        for node, route in PLAIN_ROUTES:
            self.run(node, ["ip", "route", "replace", *route.split()])
        self.plain_routing = True

    def disable_plain_routing(self) -> None:
        for node, route in PLAIN_ROUTES:
            self.run(node, ["ip", "route", "del", *route.split()], check=False)
        self._sysctl("router", "net.ipv4.ip_forward", "0")
        self.plain_routing = False

    # -------------------------------------------------------------- impairment
    def _need_imp(self) -> None:
        if not self.impair:
            raise TopologyError("this Topology was built without impair=True")

    def _imp_iifs(self) -> dict[str, tuple[str, ...]]:
        """Per direction, imp's interfaces whose packets go through that direction's TUN."""
        up = (IMP_IF_A, IMP_IF_B) if self.shared_line else (IMP_IF_A,)
        return {"up": up, "down": (IMP_IF_R,)}

    def _impair_rules(self, add: bool) -> None:
        for direction, iifs in self._imp_iifs().items():
            table = str(IMP_TABLES[direction])
            for iif in iifs:
                rule = ["iif", iif, "lookup", table, "pref", table]
                # delete first: a restart after the element died must not stack duplicates
                self.run(IMP_NODE, ["ip", "rule", "del", *rule], check=False)
                if add:
                    self.run(IMP_NODE, ["ip", "rule", "add", *rule])

    def start_impair(
        self, seed: int = 1, limit: int | None = None, **params: Any
    ) -> subprocess.Popen:
        """Start tests/impair.py in imp and steer the gwA <-> router underlay through it.

        ``params`` (see ``impair.Params``: delay_ms, jitter_ms, jitter_dist, jitter_reorder,
        reorder_pct, reorder_ms, dup_pct, loss_pct, ge_gb_pct, ge_bg_pct, ge_loss_good_pct,
        ge_loss_bad_pct) apply to both directions; change them later with set_impair().
        """
        self._need_imp()
        if self.impair_proc is not None and self.impair_proc.poll() is None:
            raise TopologyError("impairment element already running")
        if self._imp_dir is None:
            # short private dir: a UNIX socket path must fit in 108 bytes
            self._imp_dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-imp-"))
        sock = self._imp_dir / "impair.sock"
        cmd = [sys.executable, IMPAIR_SCRIPT, "--control", str(sock), "--seed", str(seed),
               "--params", json.dumps(params)]
        for direction, tun in IMP_TUNS.items():
            cmd += ["--tun", f"{direction}={tun}"]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        proc = self.popen(IMP_NODE, cmd, log_name="impair")
        self.impair_proc = proc
        wait_for_log(proc, '"event": "ready"', timeout=10)
        # Rules only while the element runs: without a reader the TUNs would blackhole.
        self._impair_rules(add=True)
        return proc

    def stop_impair(self) -> dict:
        """Bypass and stop the element (imp forwards in the kernel again); final counters."""
        self._need_imp()
        self._impair_rules(add=False)
        proc, self.impair_proc = self.impair_proc, None
        if proc is None:
            return {}
        self.stop(proc, timeout=5)
        final: dict = {}
        for line in proc.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"final"' in line:
                final = _flatten_stats(json.loads(line))
        self.last_impair_stats = final
        return final

    def _impair_request(self, req: dict, timeout: float = 5.0) -> dict:
        self._need_imp()
        if self.impair_proc is None or self.impair_proc.poll() is not None or not self._imp_dir:
            raise TopologyError("impairment element is not running (start_impair first)")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self._imp_dir / "impair.sock"))
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise TopologyError(f"impair {req.get('cmd')}: {reply.get('error')}")
        return reply

    def set_impair(self, direction: str = "both", merge: bool = False, **params: Any) -> dict:
        """Change impairment at runtime for ``"up"`` (gwA -> router), ``"down"`` or ``"both"``.

        Replaces the direction's parameters (unnamed ones back to defaults) unless ``merge``;
        ``set_impair()`` with no params clears the impairment.  Returns all parameters.
        """
        reply = self._impair_request(
            {"cmd": "set", "dir": direction, "params": params, "merge": merge}
        )
        return reply["params"]

    def impair_params(self) -> dict:
        return self._impair_request({"cmd": "get"})["params"]

    def impair_stats(self, reset: bool = False) -> dict:
        """Counters ``{"up": {...}, "down": {...}, "total": {...}}``; ``reset`` zeroes them."""
        return _flatten_stats(self._impair_request({"cmd": "stats", "reset": reset})["stats"])

    def _loss_target(self) -> tuple[str, dict[str, str]]:
        # Drop where packets first meet the middle: imp's veths when it exists (before the
        # element, at prerouting), else the router's end of the gwA link.
        if self.impair:
            iifs = self._imp_iifs()
            return IMP_NODE, {d: "iifname { " + ", ".join(f'"{i}"' for i in names) + " }"
                              for d, names in iifs.items()}
        return "router", {"up": 'iifname "ul-a"', "down": 'oifname "ul-a"'}

    def set_loss(self, percent: float | None, direction: str = "both") -> None:
        """Kernel random loss (nftables numgen) on the gwA <-> router underlay.

        ``percent`` None or 0 removes the rule.  Resolution is 0.01 %.
        """
        node, match = self._loss_target()
        dirs = list(match) if direction == "both" else [direction]
        if any(d not in match for d in dirs):
            raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")
        script = f"table inet {NFT_LOSS_TABLE}\ndelete table inet {NFT_LOSS_TABLE}\n"
        if percent:
            if not 0 < percent <= 100:
                raise ValueError(f"loss percent {percent} not in 0..100")
            threshold = round(percent * 100)
            pre, post = [], []
            for d in dirs:
                rule = f"{match[d]} numgen random mod 10000 < {threshold} counter drop"
                (post if match[d].startswith("oif") else pre).append(rule)
            # priority -300 (raw): drop before conntrack and before the routing decision
            script += f"table inet {NFT_LOSS_TABLE} {{\n"
            script += "  chain pre {\n    type filter hook prerouting priority -300;\n"
            script += "".join(f"    {r}\n" for r in pre) + "  }\n"
            script += "  chain post {\n    type filter hook postrouting priority -300;\n"
            script += "".join(f"    {r}\n" for r in post) + "  }\n}\n"
        self.run(node, ["nft", "-f", "-"], input=script)

    def loss_stats(self) -> int:
        """Packets dropped so far by the set_loss() rules (0 when none are installed)."""
        node, _ = self._loss_target()
        res = self.run(node, ["nft", "-j", "list", "table", "inet", NFT_LOSS_TABLE], check=False)
        if res.returncode != 0:
            return 0
        total = 0
        for item in json.loads(res.stdout).get("nftables", []):
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += expr["counter"]["packets"]
        return total

    def set_line(self, line: Line) -> Line:
        """Make the gwA <-> router underlay (with shared_line also gwB's) the long-haul
        ``line``, both directions (see the module docstring): starts the impairment element
        with the line's delay and bursty loss (or changes a running one's), puts tbf on its
        TUNs and the random-loss rule in imp.  Call again to change the line."""
        self._need_imp()
        params = line.impair_params()
        if self.impair_proc is None or self.impair_proc.poll() is not None:
            self.start_impair(seed=line.seed, **params)
        else:
            self.set_impair(**params)
        for tun in IMP_TUNS.values():
            self.run(IMP_NODE, ["tc", "qdisc", "replace", "dev", tun, "root", "tbf",
                                "rate", f"{line.rate_mbit:g}mbit",
                                "burst", str(line.burst_bytes),
                                "limit", str(line.queue_bytes)], timeout=10)
        self.set_loss(line.loss_pct or None)
        self.line = line
        return line

    def clear_line(self) -> None:
        """No rate, queue, delay or loss on the underlay any more (the element keeps
        running, as a pass-through)."""
        self._need_imp()
        for tun in IMP_TUNS.values():
            self.run(IMP_NODE, ["tc", "qdisc", "del", "dev", tun, "root"], check=False,
                     timeout=10)
        self.set_loss(None)
        if self.impair_proc is not None and self.impair_proc.poll() is None:
            self.set_impair()
        self.line = None

    def line_drops(self) -> dict[str, int]:
        """Packets the line dropped so far: ``queue`` (tbf overflow, both directions),
        ``random`` (nft), ``bursty`` (the element's Gilbert-Elliott drops)."""
        queue = 0
        for tun in IMP_TUNS.values():
            res = self.run(IMP_NODE, ["tc", "-s", "-j", "qdisc", "show", "dev", tun],
                           timeout=10)
            queue += sum(int(q.get("drops", 0)) for q in json.loads(res.stdout or "[]")
                         if q.get("kind") == "tbf")
        bursty = 0
        if self.impair_proc is not None and self.impair_proc.poll() is None:
            bursty = int(self.impair_stats().get("total", {}).get("dropped_burst", 0))
        return {"queue": queue, "random": self.loss_stats(), "bursty": bursty}

    # ------------------------------------------------------------------- links
    def link_down(self, node: str, ifname: str) -> None:
        """``ip link set down``: the peer end loses carrier too (veth)."""
        self.run(node, ["ip", "link", "set", "dev", ifname, "down"], timeout=10)

    def link_up(self, node: str, ifname: str) -> None:
        self.run(node, ["ip", "link", "set", "dev", ifname, "up"], timeout=10)

    def flap(
        self,
        node: str,
        ifname: str,
        times: int,
        down_s: float,
        up_s: float,
        delay: float = 0.0,
        max_total: float | None = None,
    ) -> LinkFlapper:
        """Start taking ``ifname`` down for ``down_s`` and up for ``up_s``, ``times`` times,
        after ``delay`` s, in a background thread; join() the handle for the outcome.

        ``max_total`` (default: the planned time plus 10 s) bounds the whole run; teardown
        stops a flapper still running.
        """
        if times < 1 or down_s < 0 or up_s < 0 or delay < 0:
            raise ValueError("times must be >= 1 and durations >= 0")
        if max_total is None:
            max_total = delay + times * (down_s + up_s) + 10
        flapper = LinkFlapper(self, node, ifname, times, down_s, up_s, delay, max_total)
        self._flappers.append(flapper)
        return flapper.start()

    def rate_limit(
        self,
        node: str,
        ifname: str,
        mbit: float,
        burst: int | None = None,
        latency_ms: float = 50,
    ) -> None:
        """Shape what ``ifname`` sends to ``mbit`` Mbit/s with a tbf root qdisc (egress only:
        limit both ends of a link for both directions).  ``burst`` (bytes) defaults to 10 ms
        at the rate, at least 32 KiB (below rate/HZ tbf cannot reach its rate); ``latency_ms``
        bounds the queue.  Replaces an earlier limit; gone with the namespace on teardown."""
        if mbit <= 0:
            raise ValueError(f"rate {mbit} Mbit/s must be > 0")
        if burst is None:
            burst = max(32 * 1024, int(mbit * 1e6 / 8 / 100))
        self.run(node, ["tc", "qdisc", "replace", "dev", ifname, "root", "tbf",
                        "rate", f"{mbit:g}mbit", "burst", str(burst),
                        "latency", f"{latency_ms:g}ms"], timeout=10)

    def clear_rate_limit(self, node: str, ifname: str) -> None:
        """Remove a rate_limit() (the interface's default qdisc returns)."""
        self.run(node, ["tc", "qdisc", "del", "dev", ifname, "root"], check=False, timeout=10)

    def qdiscs(self, node: str, ifname: str) -> list[dict]:
        """``tc -j qdisc show dev ifname``, parsed (each entry has "kind", "options"...)."""
        res = self.run(node, ["tc", "-j", "qdisc", "show", "dev", ifname], timeout=10)
        return json.loads(res.stdout or "[]")

    def if_bytes(self, node: str, ifname: str) -> tuple[int, int]:
        """(rx, tx) byte counters of ``ifname`` in ``node`` (all traffic, 64-bit)."""
        res = self.run(node, ["ip", "-s", "-j", "link", "show", "dev", ifname], timeout=10)
        stats = json.loads(res.stdout)[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def busiest_link(self, node: str, ifnames: Sequence[str], seconds: float = 0.5
                     ) -> tuple[str, dict[str, int]]:
        """The interface of ``ifnames`` that sent the most in the next ``seconds`` (the one
        carrying a flow that is running now), and each one's tx byte growth."""
        before = {i: self.if_bytes(node, i)[1] for i in ifnames}
        time.sleep(seconds)
        grown = {i: self.if_bytes(node, i)[1] - before[i] for i in ifnames}
        return max(grown, key=grown.__getitem__), grown

    # ------------------------------------------------------------------ checks
    def ping(
        self, node: str, dst: str, count: int = 3, wait: int = 2, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        """Bounded ping; returns the CompletedProcess (check ``returncode``)."""
        cmd = ["ping", "-n", "-c", str(count), "-W", str(wait), "-w", str(count * wait + 2)]
        if ":" in dst:
            cmd.insert(1, "-6")
        cmd.append(dst)
        return self.run(node, cmd, check=False, timeout=timeout or count * wait + 10)

    def ping_stats(
        self, node: str, dst: str, count: int = 100, interval: float = 0.01, wait: float = 2
    ) -> dict:
        """``count`` pings ``interval`` s apart (no -w: exactly ``count`` are sent); parsed.

        Returns transmitted, received, duplicates, loss_pct, rtt_min/avg/max/mdev (ms, None
        without replies) and the raw stdout.
        """
        cmd = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait)]
        if ":" in dst:
            cmd.insert(1, "-6")
        res = self.run(node, [*cmd, dst], check=False, timeout=count * interval + wait + 15)
        return parse_ping(res.stdout)

    def wait_ping(self, node: str, dst: str, deadline: float = 10.0) -> float | None:
        """Ping once a second until it answers; return seconds taken or None."""
        start = time.monotonic()
        while time.monotonic() - start < deadline:
            if self.ping(node, dst, count=1, wait=1).returncode == 0:
                return time.monotonic() - start
            time.sleep(0.2)
        return None

    def first_reply(
        self, node: str, dst: str, deadline: float = 10.0, interval: float = 0.2
    ) -> float | None:
        """Seconds until the first echo reply, pinging every ``interval`` s; None by ``deadline``.

        One ping process with ``-c 1 -w deadline`` keeps sending until one probe is answered,
        so the answer is exact to ``interval`` (``wait_ping`` is exact to about a second).
        """
        cmd = ["ping", "-n", "-q", "-c", "1", "-i", str(interval), "-W", "1",
               "-w", str(max(1, round(deadline)))]
        if ":" in dst:
            cmd.insert(1, "-6")
        start = time.monotonic()
        res = self.run(node, [*cmd, dst], check=False, timeout=deadline + 10)
        return time.monotonic() - start if res.returncode == 0 else None

    def start_pings(
        self, node: str, dst: str, count: int, interval: float, size: int = 56
    ) -> subprocess.Popen:
        """``count`` pings ``interval`` s apart in the background, each reply logged with its
        wall-clock time (``ping -D``); read them with ``ping_replies(proc.log_path)``.  Ends
        by itself 1 s after the last (no ``-w``: that would send more to make up for lost
        ones); teardown stops it in any case."""
        cmd = ["ping", "-n", "-D", "-c", str(count), "-i", str(interval), "-s", str(size),
               "-W", "1"]
        if ":" in dst:
            cmd.insert(1, "-6")
        return self.popen(node, [*cmd, dst], log_name=f"pings-{secrets.token_hex(2)}")

    def cut_during_pings(
        self,
        src: str,
        dst: str,
        node: str,
        ifnames: Sequence[str],
        seconds: float = 4.0,
        interval: float = 0.05,
        lead: float = 1.5,
        size: int = 1000,
    ) -> LinkCut:
        """Ping ``dst`` from ``src`` every ``interval`` s for ``seconds``; ``lead`` s in, take
        down the interface of ``ifnames`` (in ``node``) that carries the pings, and bring it
        back when they end.  How long the pings stopped is ``.recovery``."""
        pings = self.start_pings(src, dst, count=round(seconds / interval), interval=interval,
                                 size=size)
        try:
            time.sleep(max(0.0, lead - 0.5))
            carrier, _ = self.busiest_link(node, ifnames, 0.5)
            at = time.time()  # ping -D stamps the replies with the wall clock
            self.link_down(node, carrier)
            done = time.time()
            try:
                pings.wait(timeout=seconds + 15)
            finally:
                self.link_up(node, carrier)
        finally:
            self.stop(pings, timeout=2)
        replies = ping_replies(pings.log_path)
        return LinkCut(carrier, at, done, replies, recovery_time(replies, at, done))

    # ---------------------------------------------------------------- traffic
    def _start_receiver(
        self, dst: str, dst_addr: str, port: int, timeout: float, log_name: str
    ) -> subprocess.Popen:
        """A _RECEIVER in ``dst``, listening once this returns (stopped if it never does)."""
        rx = self.popen(
            dst,
            [sys.executable, "-c", _RECEIVER, dst_addr, str(port), str(timeout)],
            log_name=f"{log_name}-{secrets.token_hex(2)}",
        )
        deadline = time.monotonic() + 10
        while b"ready" not in rx.log_path.read_bytes():
            if rx.poll() is not None or time.monotonic() > deadline:
                self.stop(rx, timeout=2)
                raise TopologyError(
                    f"receiver did not start: {rx.log_path.read_text(errors='replace')}"
                )
            time.sleep(0.05)
        return rx

    def transfer(
        self,
        src: str,
        dst: str,
        dst_addr: str,
        size: int,
        port: int = 5099,
        timeout: float = 120,
    ) -> dict:
        """Send ``size`` random bytes over TCP from ``src`` to ``dst_addr`` (in ``dst``).

        Returns ``{"sent": {...}, "received": {...}, "ok": bool, "mbit_s": float}``
        where each side reports bytes, sha256 and seconds.
        """
        rx = self._start_receiver(dst, dst_addr, port, timeout, "xfer-rx")
        try:
            tx = self.run(
                src,
                [sys.executable, "-c", _SENDER, dst_addr, str(port), str(size), str(timeout)],
                timeout=timeout + 15,
            )
            sent = json.loads(tx.stdout.strip().splitlines()[-1])
            rx.wait(timeout=timeout)
            lines = rx.log_path.read_text(errors="replace").strip().splitlines()
            received = json.loads(lines[-1])
        finally:
            self.stop(rx, timeout=2)
        ok = sent["sha256"] == received["sha256"] and sent["bytes"] == received["bytes"] == size
        mbit_s = size * 8 / max(sent["seconds"], 1e-9) / 1e6
        return {"sent": sent, "received": received, "ok": ok, "mbit_s": mbit_s}

    def start_transfer(
        self,
        src: str,
        dst: str,
        dst_addr: str,
        size: int,
        rate: float,
        port: int = 5097,
        timeout: float = 60,
    ) -> BackgroundTransfer:
        """Start sending ``size`` random bytes at about ``rate`` bytes/s over TCP, in the
        background; ``timeout`` bounds every blocking socket call on both ends.  The caller
        gets the outcome from ``.result()``; teardown stops both ends in any case."""
        rx = self._start_receiver(dst, dst_addr, port, timeout, "paced-rx")
        tx = self.popen(
            src,
            [sys.executable, "-c", _SENDER, dst_addr, str(port), str(size), str(timeout),
             str(rate)],
            log_name=f"paced-tx-{secrets.token_hex(2)}",
        )
        return BackgroundTransfer(self, rx, tx, size, timeout)

    def udp_probe(
        self,
        src: str,
        dst: str,
        dst_addr: str,
        count: int = 500,
        interval: float = 0.001,
        size: int = 200,
        port: int = 5098,
        quiet: float = 1.0,
    ) -> dict:
        """Send ``count`` numbered UDP datagrams ``interval`` s apart; report what arrived.

        Returns ``{"sent", "order" (sequence numbers in arrival order), "received",
        "unique", "duplicates", "lost", "late"}``; ``late`` counts arrivals behind a higher
        sequence number (reordering).  The receiver stops ``quiet`` s after the last datagram.
        """
        budget = count * interval + quiet + 20
        rx = self.popen(
            dst,
            [sys.executable, "-c", _UDP_RECEIVER, dst_addr, str(port), str(quiet), str(budget)],
            log_name=f"udp-rx-{secrets.token_hex(2)}",
        )
        try:
            deadline = time.monotonic() + 10
            while b"ready" not in rx.log_path.read_bytes():
                if rx.poll() is not None or time.monotonic() > deadline:
                    raise TopologyError(
                        f"UDP receiver did not start: {rx.log_path.read_text(errors='replace')}"
                    )
                time.sleep(0.05)
            self.run(
                src,
                [sys.executable, "-c", _UDP_SENDER, dst_addr, str(port), str(count),
                 str(interval), str(size)],
                timeout=count * interval + 30,
            )
            rx.wait(timeout=budget + 5)
            order = json.loads(rx.log_path.read_text(errors="replace").strip().splitlines()[-1])
        finally:
            self.stop(rx, timeout=2)
        late = 0
        highest = -1
        for seq in order:
            if seq < highest:
                late += 1
            highest = max(highest, seq)
        unique = len(set(order))
        return {
            "sent": count,
            "order": order,
            "received": len(order),
            "unique": unique,
            "duplicates": len(order) - unique,
            "lost": count - unique,
            "late": late,
        }

    def iperf3(
        self,
        client: str,
        server: str,
        server_addr: str,
        seconds: int = 10,
        port: int = 5201,
        streams: int = 1,
    ) -> dict:
        """Bounded iperf3 TCP run (client -> server, ``streams`` in parallel); parsed JSON."""
        srv = self.popen(
            server,
            ["iperf3", "-s", "-1", "-B", server_addr, "-p", str(port)],
            log_name=f"iperf3-server-{secrets.token_hex(2)}",
        )
        try:
            time.sleep(0.5)
            res = None
            for _ in range(10):  # server may need a moment to bind
                res = self.run(
                    client,
                    ["iperf3", "-c", server_addr, "-p", str(port), "-t", str(seconds), "-J",
                     "-P", str(streams), "--connect-timeout", "3000"],
                    check=False,
                    timeout=seconds + 30,
                )
                if res.returncode == 0:
                    break
                time.sleep(0.5)
            if res is None or res.returncode != 0:
                detail = f"{res.stdout} {res.stderr}" if res else ""
                raise TopologyError(f"iperf3 failed: {detail}")
            data = json.loads(res.stdout)
        finally:
            self.stop(srv, timeout=2)
        return data

    def start_iperf3(
        self,
        client: str,
        server: str,
        server_addr: str,
        seconds: float = 10,
        port: int = 5201,
        streams: int = 1,
        congestion: str | None = None,
        interval: float = 1.0,
    ) -> Iperf3Run:
        """iperf3 TCP ``client`` -> ``server_addr`` in the background (several can run at
        once, on different ports): the server is listening when this returns; ``congestion``
        is the sender's TCP congestion control (``-C``), ``interval`` the report interval of
        both ends (the JSON's ``intervals``: the sender's; ``server_output_text``: the
        receiver's report, see ``iperf3_received``).  ``.result()`` waits for the parsed
        report; teardown stops both ends in any case."""
        tag = secrets.token_hex(2)
        srv = self.popen(server, ["iperf3", "-s", "-1", "-B", server_addr, "-p", str(port),
                                  "-i", f"{interval:g}", "--forceflush"],
                         log_name=f"iperf3-server-{tag}")
        try:
            wait_for_log(srv, "server listening", timeout=10)
        except TopologyError:
            self.stop(srv, timeout=2)
            raise
        cmd = ["iperf3", "-c", server_addr, "-p", str(port), "-t", f"{seconds:g}", "-J",
               "-P", str(streams), "-i", f"{interval:g}", "--connect-timeout", "10000",
               "--get-server-output"]
        if congestion:
            cmd += ["-C", congestion]
        cli = self.popen(client, cmd, log_name=f"iperf3-client-{tag}")
        return Iperf3Run(self, srv, cli, seconds)

    def iperf3_spread(
        self,
        client: str,
        server: str,
        server_addr: str,
        node: str,
        ifnames: Sequence[str],
        received: bool = False,
        seconds: int = 6,
        streams: int = 8,
        min_share: float = 0.1,
        attempts: int = 3,
    ) -> tuple[dict, dict[str, float]]:
        """iperf3 with ``streams`` parallel streams, and each of ``node``'s ``ifnames``'s
        share of the bytes it sent (``received``: took in) meanwhile.  Flows spread over
        links by a hash of their 5-tuple all take one link now and then (8 flows on 2 links:
        2/256); a run where a link's share stays below ``min_share`` is repeated (new
        ephemeral ports), up to ``attempts`` runs; the last run's result is returned."""
        side = 0 if received else 1
        for _ in range(attempts):
            before = {i: self.if_bytes(node, i)[side] for i in ifnames}
            data = self.iperf3(client, server, server_addr, seconds=seconds, streams=streams)
            moved = {i: self.if_bytes(node, i)[side] - before[i] for i in ifnames}
            total = sum(moved.values()) or 1
            shares = {i: round(n / total, 3) for i, n in moved.items()}
            if min(shares.values()) >= min_share:
                break
        return data, shares

    # ---------------------------------------------------------------- teardown
    def teardown(self) -> None:
        # flappers first: they would run commands in namespaces about to disappear
        for flapper in self._flappers:
            with contextlib.suppress(Exception):
                flapper.stop(timeout=15)
        self._flappers.clear()
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):  # keep tearing down
                self.stop(proc, timeout=3)
        self._procs.clear()
        for fh in self._log_files:
            with contextlib.suppress(Exception):
                fh.close()
        self._log_files.clear()
        for ns in reversed(self._created):
            self._ip("netns", "del", ns, check=False)
        self._created.clear()
        self.impair_proc = None
        if self._imp_dir is not None:
            shutil.rmtree(self._imp_dir, ignore_errors=True)
            self._imp_dir = None
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Topology:
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()


_PING_SUMMARY = re.compile(
    r"(\d+) packets transmitted, (\d+) received(?:, \+(\d+) duplicates)?"
)
_PING_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def parse_ping(stdout: str) -> dict:
    """Summary of iputils ping output (see Topology.ping_stats)."""
    out: dict = {"transmitted": 0, "received": 0, "duplicates": 0, "loss_pct": 100.0,
                 "rtt_min": None, "rtt_avg": None, "rtt_max": None, "rtt_mdev": None,
                 "stdout": stdout}
    m = _PING_SUMMARY.search(stdout)
    if m:
        tx, rx = int(m.group(1)), int(m.group(2))
        out.update(transmitted=tx, received=rx, duplicates=int(m.group(3) or 0))
        out["loss_pct"] = 100.0 * (tx - rx) / tx if tx else 100.0
    m = _PING_RTT.search(stdout)
    if m:
        for key, value in zip(("rtt_min", "rtt_avg", "rtt_max", "rtt_mdev"), m.groups(),
                              strict=True):
            out[key] = float(value)
    return out


_PING_REPLY = re.compile(r"^\[(\d+\.\d+)\] .*icmp_seq=(\d+) .*time=([\d.]+) ms", re.M)


@dataclass(frozen=True)
class PingReply:
    """One echo reply of ``ping -D``: when it arrived (epoch s) and its round trip."""

    seq: int
    received: float
    rtt_ms: float

    @property
    def sent(self) -> float:
        return self.received - self.rtt_ms / 1000


@dataclass(frozen=True)
class LinkCut:
    """What Topology.cut_during_pings saw: the interface cut, when (epoch s: ``at`` as the
    command started, ``done`` once it had returned), every reply, and the seconds from
    ``at`` until a request sent after ``done`` was answered (None: never)."""

    ifname: str
    at: float
    done: float
    replies: list[PingReply]
    recovery: float | None

    def after(self) -> list[PingReply]:
        """The replies to requests sent after the cut."""
        return [r for r in self.replies if r.sent > self.done]


def ping_replies(path: str | os.PathLike) -> list[PingReply]:
    """The replies a ``start_pings`` process has logged so far."""
    text = Path(path).read_text(errors="replace")
    return [PingReply(int(seq), float(when), float(rtt))
            for when, seq, rtt in _PING_REPLY.findall(text)]


def recovery_time(replies: Sequence[PingReply], since: float,
                  cut: float | None = None) -> float | None:
    """Seconds from ``since`` (epoch) until the first reply to an echo request sent after
    ``cut`` (default ``since``) arrived: how long traffic stopped when a link was cut.  A
    command that cuts a link takes effect some ms after it starts, so a caller stamps
    ``since`` before it and ``cut`` after it returned.  None: no such reply came."""
    after = since if cut is None else cut
    for r in replies:
        if r.sent > after:
            return r.received - since
    return None


def _flatten_stats(stats: dict) -> dict:
    """impair.py's ``{"dirs": {"up": .., "down": ..}, "total": ..}`` -> one level."""
    return {**stats.get("dirs", {}), "total": stats.get("total", {})}


def leftover_namespaces(prefix: str) -> list[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in res.stdout.splitlines() if line.startswith(prefix)]


def teardown_and_warn(topo: Topology) -> None:
    """For the benchmark scripts: tear ``topo`` down, and say (not raise) if a namespace of
    it is left, so a long run's other results are still written."""
    topo.teardown()
    left = leftover_namespaces(topo.prefix)
    if left:
        print(f"WARNING: namespaces left: {left}", file=sys.stderr)


def print_failure(label: str, exc: BaseException, log_dir: Path,
                  show: Callable[[str], bool] = lambda name: True) -> None:
    """For the benchmark scripts: ``label`` failed with ``exc``; the tail of each daemon
    log in ``log_dir`` whose name ``show`` accepts, on stderr."""
    print(f"{label} FAILED: {exc}", file=sys.stderr, flush=True)
    for path in sorted(log_dir.glob("*.log")):
        if show(path.name):
            print(f"----- {path.name} -----\n{log_tail(path, 15)}", file=sys.stderr)


@contextlib.contextmanager
def built(topo: Topology) -> Iterator[Topology]:
    """``topo`` set up for the ``with`` body, then torn down (also on failure), and checked
    to have left no namespace behind."""
    try:
        topo.setup()
        yield topo
    finally:
        topo.teardown()
        left = leftover_namespaces(topo.prefix)
        assert not left, f"namespaces left behind: {left}"


# --------------------------------------------------------------------------
# polevpn daemon helpers shared by test_e2e.py, demo.py and bench.py
# --------------------------------------------------------------------------
GW_A_TUN4 = "169.254.0.1"
GW_B_TUN4 = "169.254.0.2"
GW_A_TUN6 = "2001:db8:ff::1"
GW_B_TUN6 = "2001:db8:ff::2"


def console_script(name: str) -> str | None:
    """Path of a console script installed next to the running interpreter."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(path, os.X_OK):
        return path
    return shutil.which(name)


def log_tail(path: str | os.PathLike, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def last_stats(path: str | os.PathLike, prefix: str = "stats") -> dict[str, str]:
    """The key=value pairs of the daemon's newest ``stats`` line (empty before the first)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return {}
    lines = [ln for ln in text.splitlines() if f" event={prefix} " in ln]
    return dict(re.findall(r"(\w+)=(\S+)", lines[-1])) if lines else {}


def log_lines(path: str | os.PathLike, *needles: str) -> list[str]:
    """Lines of the log containing every needle (case-sensitive)."""
    text = Path(path).read_text(errors="replace")
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def count_log_lines(path: str | os.PathLike, *needles: str) -> int:
    return len(log_lines(path, *needles))


def wait_log_lines(
    path: str | os.PathLike, count: int, *needles: str, timeout: float, why: str = ""
) -> str:
    """Wait until the log has ``count`` lines with every needle; return the newest."""
    deadline = time.monotonic() + timeout
    while True:
        found = log_lines(path, *needles)
        if len(found) >= count:
            return found[-1]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{why or needles!r}: {len(found)} of {count} lines after {timeout}s in "
                f"{path}:\n{log_tail(path)}"
            )
        time.sleep(0.05)


def log_time(line: str) -> float:
    """Wall-clock time (epoch seconds) of a daemon log line (its leading ``time=`` field)."""
    assert line.startswith("time="), line
    stamp = datetime.datetime.strptime(line[5:29], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


def find_log_line(path: str | os.PathLike, *needles: str) -> str | None:
    """First line of the log containing every needle (case-insensitive)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    low = [n.lower() for n in needles]
    for line in text.splitlines():
        ll = line.lower()
        if all(n in ll for n in low):
            return line
    return None


def wait_for_log(
    proc: subprocess.Popen, *needles: str, timeout: float = 15.0, allow_exit: bool = False
) -> str:
    """Poll ``proc.log_path`` until one line contains all ``needles``; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        line = find_log_line(proc.log_path, *needles)
        if line is not None:
            return line
        if proc.poll() is not None and not allow_exit:
            raise TopologyError(
                f"process exited (rc={proc.returncode}) before logging {needles!r}; "
                f"log {proc.log_path}:\n{log_tail(proc.log_path)}"
            )
        if time.monotonic() > deadline:
            raise TopologyError(
                f"timeout ({timeout}s) waiting for {needles!r}; "
                f"log {proc.log_path}:\n{log_tail(proc.log_path)}"
            )
        time.sleep(0.1)


def router_config(keys_dir: str | os.PathLike, listen: str = "0.0.0.0:443",
                  **overrides) -> dict:
    """Router config for the topology; ``listen`` is the tls and the kcp listener's address.

    Each listener takes one address: "0.0.0.0:443" serves IPv4 only; "[::]:443" serves both
    families on tls and kcp (IPv4 peers appear as ::ffff:a.b.c.d)."""
    keys = Path(keys_dir)
    cfg = {
        "tls": {
            "listen": listen,
            "enable": True,
            "cert_file": str(keys / "server.crt"),
            "key_file": str(keys / "server.key"),
        },
        "kcp": {
            "listen": listen,
            "enable": False,
            "cert_file": str(keys / "server.crt"),
            "key_file": str(keys / "server.key"),
        },
        "key_file": str(keys / "shared.key"),
        "log_level": "info",
        "idle_timeout": 60,
        "auth_timeout": 10,
    }
    cfg.update(overrides)
    return cfg


def site_networks(side: str) -> list[str]:
    """The LAN networks (IPv4, IPv6) of office ``side``: "A", "B", or one of ``OFFICES``."""
    if side == "A":
        return [LAN_A, LAN_A6]
    if side == "B":
        return [LAN_B, LAN_B6]
    return [OFFICES[side].lan, OFFICES[side].lan6]


def gateway_config(side: str, keys_dir: str | os.PathLike, peers: str | None = None,
                   **overrides) -> dict:
    """Gateway config for office ``"A"`` (gwA), ``"B"`` (gwB) or one of ``OFFICES`` (gwC,
    gwD: its route server the router's end of its wan0). ``peers`` names the offices whose
    LANs it routes into the tunnel (and its ACLs let in), e.g. ``"BC"``; by default the
    other of A and B (for C and D: both)."""
    keys = Path(keys_dir)
    if side == "A":
        server, gw4, gw6 = ROUTER_UL_A, GW_A_TUN4, GW_A_TUN6
    elif side == "B":
        server, gw4, gw6 = ROUTER_UL_B, GW_B_TUN4, GW_B_TUN6
    elif side in OFFICES:
        office = OFFICES[side]
        server, gw4, gw6 = office.router_ul, office.tun4, office.tun6
    else:
        raise ValueError(side)
    if peers is None:
        peers = {"A": "B", "B": "A"}.get(side, "AB")
    local = site_networks(side)
    remote = [net for peer in peers for net in site_networks(peer)]
    cfg = {
        "route_server": f"tls://{server}:443",
        "key_file": str(keys / "shared.key"),
        "gateway": gw4,
        "gateway6": gw6,
        "local_networks": local,
        "route_networks": remote,
        "acls": [*remote, "169.254.0.0/16", "2001:db8:ff::/64"],
        "ca_file": str(keys / "ca.crt"),
        "server_name": "polevpn-router",
        "tun_name": "polevpn0",
        "mtu": 1400,
        "heartbeat_interval": 10,
        "heartbeat_timeout": 20,
        "reconnect_min_delay": 0.2,
        "reconnect_max_delay": 2,
        "log_level": "info",
    }
    cfg.update(overrides)
    return cfg


# Multi-link (issue 8, Topology(dual_uplink=True)): gwA's links by name, each with its route
# server address and its (gwA, router) interfaces.
ML_LINKS = {
    "v4": (ROUTER_UL_A, GW_A_UL_IF, ROUTER_UL_A_IF),
    "v6": (f"[{ROUTER_UL_A6}]", GW_A_UL6_IF, ROUTER_UL_A6_IF),
}


def ml_link(name: str, scheme: str = "tls", **extra) -> dict:
    """gwA's ``links`` entry ``"v4"`` (over wan0, bound to the interface) or ``"v6"`` (over
    wan1, bound to its source address); ``extra`` adds weight, backup..."""
    server, gw_if, _ = ML_LINKS[name]
    entry: dict = {"name": name, "route_server": f"{scheme}://{server}:443"}
    entry.update({"interface": gw_if} if name == "v4" else {"bind": GW_A_UL6})
    entry.update(extra)
    return entry


def ml_router_config(keys_dir: str | os.PathLike, **overrides) -> dict:
    """The router for gwA's two links: tls and kcp on [::]:443 (both families)."""
    cfg = router_config(keys_dir, listen="[::]:443", **overrides)
    cfg["kcp"]["enable"] = True
    return cfg


def ml_gateway_config(keys_dir: str | os.PathLike, links: Sequence[dict],
                      **overrides) -> dict:
    """gwA with ``links`` instead of a route server; heartbeats every 0.25 s, a link counts
    as down after 1 s of silence."""
    cfg = gateway_config("A", keys_dir, links=list(links), link_heartbeat_interval=0.25,
                         link_timeout=1.0, **overrides)
    del cfg["route_server"]
    return cfg


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def start_router(topo: Topology, config: str | os.PathLike, log_name: str = "router",
                 timeout: float = 15.0, node: str = "router") -> subprocess.Popen:
    """Start polevpn-router in ``node`` (the router namespace, or router2) and wait for its
    listening line."""
    exe = console_script("polevpn-router")
    if exe is None:
        raise TopologyError("polevpn-router console script not found")
    proc = topo.popen(node, [exe, f"-configPath={config}"], log_name=log_name)
    wait_for_log(proc, "listening", "tls", timeout=timeout)
    return proc


def start_gateway(topo: Topology, node: str, config: str | os.PathLike,
                  log_name: str | None = None, wait: bool = True,
                  timeout: float = 20.0) -> subprocess.Popen:
    """Start polevpn-gateway in ``node`` and (optionally) wait until registered."""
    exe = console_script("polevpn-gateway")
    if exe is None:
        raise TopologyError("polevpn-gateway console script not found")
    proc = topo.popen(node, [exe, f"-configPath={config}"], log_name=log_name or node)
    if wait:
        wait_for_log(proc, "registered", timeout=timeout)
    return proc


# --------------------------------------------------------------------------
# NatTopology: offices behind NATs, the router on a public segment (issue 18)
# --------------------------------------------------------------------------
NAT_NODES = ("hostA", "gwA", "natA", "inet", "router", "natB", "gwB", "hostB")
# the offices' private segments (between a gateway and its NAT)
PRIV_A = "198.18.101.0/24"
NAT_A_PRIV = "198.18.101.1"
GW_A_PRIV = "198.18.101.2"
PRIV_B = "198.18.102.0/24"
NAT_B_PRIV = "198.18.102.1"
GW_B_PRIV = "198.18.102.2"
GW_C_PRIV = "198.18.102.3"  # NatTopology.add_gateway_c(): a third gateway behind natB
GW_C_TUN4 = "169.254.0.3"
# the public segments, each a /24 between one NAT (or the router) and inet
NAT_A_PUB = "198.19.1.1"
INET_A = "198.19.1.254"
PUB_A = "198.19.1.0/24"
NAT_B_PUB = "198.19.2.1"
INET_B = "198.19.2.254"
PUB_B = "198.19.2.0/24"
ROUTER_PUB = "198.19.3.1"
INET_R = "198.19.3.254"
PUB_R = "198.19.3.0/24"
INET_NODE = "inet"
# the impairment element's TUNs in inet: to the router, from the router, between the NATs
NAT_TUNS = {"up": "tup", "down": "tdown", "peer": "tpeer"}
NAT_TABLES = {"up": 111, "down": 112, "peer": 113}
NFT_NAT_TABLE = "pvnat"
NFT_CUT_TABLE = "pvcut"
# the router's default delays (ms, each way) on each of its links and between the NATs
NAT_ROUTER_DELAY_MS = 40.0
NAT_PEER_DELAY_MS = 5.0


class NatTopology(Topology):
    """Two offices, each behind its own NAT, and the router on a "public" segment (issue 18):

        hostA -LAN A- gwA -priv A- natA ==pa [inet] pr== router
                                              pb
        hostB -LAN B- gwB -priv B- natB ======'

    * LAN A / LAN B and the hosts as in ``Topology`` (hostA 198.18.10.2, gwA 198.18.10.1;
      hostB 198.18.20.2, gwB 198.18.20.1; and the IPv6 addresses).
    * Private segments: gwA ``wan0`` 198.18.101.2/24 - natA ``lan0`` 198.18.101.1;
      gwB ``wan0`` 198.18.102.2/24 - natB ``br0`` 198.18.102.1 (a bridge, so that
      :meth:`add_gateway_c` can put a third gateway, gwC 198.18.102.3, next to gwB:
      two offices behind one NAT). Hosts and gateways have default routes outwards, each
      NAT a route to its office's LAN (IPv4) via the gateway; private addresses are routed
      nowhere else (as on the internet), so only the NATs' public addresses meet.
    * Public: natA ``wan0`` 198.19.1.1/24 - inet ``pa`` .254; natB ``wan0`` 198.19.2.1/24
      - inet ``pb`` .254; router ``pub0`` 198.19.3.1/24 - inet ``pr`` .254. inet is a plain
      router between the three segments, so natA and natB reach each other directly, not
      only through the router.
    * NAT: nftables ``masquerade`` out of each NAT's ``wan0``: Linux keeps the private
      source port where it can, so one socket keeps one public port whatever it sends to
      (endpoint-independent mapping), and conntrack lets in only replies from an endpoint
      the socket has sent to (address- and port-dependent filtering). ``symmetric=True``
      (or :meth:`set_nat`) uses ``masquerade fully-random``: a new random port per
      conntrack entry, i.e. per destination endpoint. Each NAT also drops unsolicited UDP
      to its own public address (input, ``ct state new``), as an office router's firewall
      does; without that a peer's punch arriving before our first outbound datagram would
      create a conntrack entry towards the NAT itself, which then takes the very public
      port our mapping wants (Linux picks another one for the clashing tuple).
    * Delay: the userspace impairment element (tests/impair.py) in inet, one TUN per class
      of path: ``up`` (natA or natB -> router), ``down`` (router -> natA or natB),
      ``peer`` (natA <-> natB, both ways). ``router_delay_ms`` (default 40) each way on the
      router's paths, ``peer_delay_ms`` (default 5) each way between the NATs: hostA ->
      hostB is 160 ms round trip through the router, 10 ms direct. Both 0: no element,
      inet forwards in the kernel. :meth:`set_impair` changes them while running
      (directions "up", "down", "peer", "both").
    * :meth:`cut_peer_udp` / :meth:`restore_peer_udp`: nftables in inet drops UDP between
      the two NATs' public addresses (only that: ICMP and everything to the router pass).

    Teardown, logs and traffic helpers are ``Topology``'s.
    """

    def __init__(
        self,
        prefix: str | None = None,
        log_dir: str | os.PathLike | None = None,
        symmetric: bool = False,
        router_delay_ms: float = NAT_ROUTER_DELAY_MS,
        peer_delay_ms: float = NAT_PEER_DELAY_MS,
    ) -> None:
        super().__init__(prefix=prefix, log_dir=log_dir)
        self.nodes = NAT_NODES
        self.ns = {node: f"{self.prefix}-{node}" for node in self.nodes}
        self.nat_symmetric = {"A": symmetric, "B": symmetric}
        self.router_delay_ms = router_delay_ms
        self.peer_delay_ms = peer_delay_ms
        # the element (when delays are set) is the base class's impair_proc, in inet
        self.impair = bool(router_delay_ms or peer_delay_ms)

    def _setup(self) -> None:
        for node in self.nodes:
            self._add_ns(node)
        # LANs, as in Topology
        for gw, host, gw4, gw6, host4, host6 in (
            ("gwA", "hostA", GW_A_LAN, GW_A_LAN6, HOST_A, HOST_A6),
            ("gwB", "hostB", GW_B_LAN, GW_B_LAN6, HOST_B, HOST_B6),
        ):
            self._veth(gw, "lan0", host, "eth0")
            self._addr(gw, "lan0", f"{gw4}/24")
            self._addr(gw, "lan0", f"{gw6}/64")
            self._addr(host, "eth0", f"{host4}/24")
            self._addr(host, "eth0", f"{host6}/64")
            self.run(host, ["ip", "route", "add", "default", "via", gw4])
            self.run(host, ["ip", "-6", "route", "add", "default", "via", gw6])
            self._sysctl(gw, "net.ipv4.ip_forward", "1")
            self._sysctl(gw, "net.ipv6.conf.all.forwarding", "1")
        # private segments: gwA - natA directly, gwB - natB's bridge
        self._veth("gwA", "wan0", "natA", "lan0")
        self._addr("gwA", "wan0", f"{GW_A_PRIV}/24")
        self._addr("natA", "lan0", f"{NAT_A_PRIV}/24")
        self.run("natB", ["ip", "link", "add", "br0", "type", "bridge"])
        self.run("natB", ["ip", "link", "set", "br0", "up"])
        self._addr("natB", "br0", f"{NAT_B_PRIV}/24")
        self._bridge_port("gwB", "lb")
        self._addr("gwB", "wan0", f"{GW_B_PRIV}/24")
        self.run("gwA", ["ip", "route", "add", "default", "via", NAT_A_PRIV])
        self.run("gwB", ["ip", "route", "add", "default", "via", NAT_B_PRIV])
        # public segments around inet
        for node, ifname, addr, inet_if, inet_addr in (
            ("natA", "wan0", NAT_A_PUB, "pa", INET_A),
            ("natB", "wan0", NAT_B_PUB, "pb", INET_B),
            ("router", "pub0", ROUTER_PUB, "pr", INET_R),
        ):
            self._veth(node, ifname, INET_NODE, inet_if)
            self._addr(node, ifname, f"{addr}/24")
            self._addr(INET_NODE, inet_if, f"{inet_addr}/24")
            self.run(node, ["ip", "route", "add", "default", "via", inet_addr])
        for node in ("natA", "natB", INET_NODE):
            self._sysctl(node, "net.ipv4.ip_forward", "1")
        # each NAT routes its office's LAN to the office's gateway (plain routing inside)
        self.run("natA", ["ip", "route", "add", LAN_A, "via", GW_A_PRIV])
        self.run("natB", ["ip", "route", "add", LAN_B, "via", GW_B_PRIV])
        for side in "AB":
            self.set_nat(side, self.nat_symmetric[side])
        if self.impair:
            self._setup_nat_impair()

    def _bridge_port(self, node: str, port: str) -> None:
        """``node``'s ``wan0`` on natB's bridge (natB's end named ``port``)."""
        self._veth(node, "wan0", "natB", port)
        self.run("natB", ["ip", "link", "set", port, "master", "br0"])

    def add_gateway_c(self) -> None:
        """A third gateway host gwC (198.18.102.3) on natB's private segment, next to gwB:
        two offices behind one NAT; no LAN of its own (the tests run protocol-level
        clients in it). Removed with the rest on teardown."""
        self.ns["gwC"] = f"{self.prefix}-gwC"
        self._add_ns("gwC")
        self._bridge_port("gwC", "lc")
        self._addr("gwC", "wan0", f"{GW_C_PRIV}/24")
        self.run("gwC", ["ip", "route", "add", "default", "via", NAT_B_PRIV])

    # ------------------------------------------------------------------- NAT
    def set_nat(self, side: str, symmetric: bool) -> None:
        """natA (``side`` "A") or natB: plain masquerade (endpoint-independent mapping) or
        ``fully-random`` (a new port per destination). Conntrack entries made before keep
        their mapping: a socket opened afterwards sees the new behaviour."""
        node = f"nat{side}"
        flag = " fully-random" if symmetric else ""
        script = (
            f"table ip {NFT_NAT_TABLE}\ndelete table ip {NFT_NAT_TABLE}\n"
            f"table ip {NFT_NAT_TABLE} {{\n"
            "  chain post {\n    type nat hook postrouting priority 100;\n"
            f'    oifname "wan0" masquerade{flag}\n  }}\n'
            "  chain input {\n    type filter hook input priority 0;\n"
            '    iifname "wan0" meta l4proto udp ct state new counter drop\n  }\n}\n'
        )
        self.run(node, ["nft", "-f", "-"], input=script)
        self.nat_symmetric[side] = symmetric

    # ------------------------------------------------------------- impairment
    def _setup_nat_impair(self) -> None:
        inet = INET_NODE
        for key in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"):
            self._sysctl(inet, key, "0")
        for direction, tun in NAT_TUNS.items():
            self.run(inet, ["ip", "tuntap", "add", "dev", tun, "mode", "tun"])
            self.run(inet, ["ip", "link", "set", tun, "addrgenmode", "none"])
            self.run(inet, ["ip", "link", "set", tun, "mtu", "1500", "txqueuelen", "1000",
                            "up"])
            self._sysctl(inet, f"net.ipv4.conf.{tun}.rp_filter", "0")
            self.run(inet, ["ip", "route", "replace", "default", "dev", tun,
                            "table", str(NAT_TABLES[direction])])
        self._imp_dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-imp-"))
        sock = self._imp_dir / "impair.sock"
        cmd = [sys.executable, IMPAIR_SCRIPT, "--control", str(sock), "--seed", "1"]
        for direction, tun in NAT_TUNS.items():
            cmd += ["--tun", f"{direction}={tun}"]
        delays = {"up": self.router_delay_ms, "down": self.router_delay_ms,
                  "peer": self.peer_delay_ms}
        for direction, ms in delays.items():
            cmd += ["--dir", f"{direction}={json.dumps({'delay_ms': ms})}"]
        proc = self.popen(inet, cmd, log_name="impair")
        self.impair_proc = proc
        wait_for_log(proc, '"event": "ready"', timeout=10)
        # only while the element runs (without a reader the TUNs would blackhole)
        rules = (
            ("pa", PUB_R, "up"), ("pb", PUB_R, "up"),
            ("pr", None, "down"),
            ("pa", PUB_B, "peer"), ("pb", PUB_A, "peer"),
        )
        for iif, to, direction in rules:
            table = str(NAT_TABLES[direction])
            rule = ["iif", iif, *(["to", to] if to else []), "lookup", table, "pref", table]
            self.run(inet, ["ip", "rule", "add", *rule])

    def start_impair(self, *args: Any, **kw: Any) -> subprocess.Popen:
        raise TopologyError("NatTopology starts its element itself (router/peer delays)")

    def stop_impair(self) -> dict:
        raise TopologyError("NatTopology's element runs for the topology's life")

    # -------------------------------------------------------------------- cut
    def cut_peer_udp(self) -> None:
        """Drop UDP between natA's and natB's public addresses (both ways) in inet."""
        script = (
            f"table inet {NFT_CUT_TABLE}\ndelete table inet {NFT_CUT_TABLE}\n"
            f"table inet {NFT_CUT_TABLE} {{\n"
            "  chain pre {\n    type filter hook prerouting priority -300;\n"
            f"    ip saddr {NAT_A_PUB} ip daddr {NAT_B_PUB} meta l4proto udp counter drop\n"
            f"    ip saddr {NAT_B_PUB} ip daddr {NAT_A_PUB} meta l4proto udp counter drop\n"
            "  }\n}\n"
        )
        self.run(INET_NODE, ["nft", "-f", "-"], input=script)

    def restore_peer_udp(self) -> None:
        self.run(INET_NODE, ["nft", "delete", "table", "inet", NFT_CUT_TABLE], check=False)

    def cut_drops(self) -> int:
        """Packets the cut has dropped so far (0 without a cut)."""
        return _nft_counter_packets(self, INET_NODE, "inet", NFT_CUT_TABLE)

    def nat_refused(self, side: str) -> int:
        """Unsolicited UDP that nat``side`` dropped at its public address so far."""
        return _nft_counter_packets(self, f"nat{side}", "ip", NFT_NAT_TABLE)


def _nft_counter_packets(topo: Topology, node: str, family: str, table: str) -> int:
    res = topo.run(node, ["nft", "-j", "list", "table", family, table], check=False)
    if res.returncode != 0:
        return 0
    total = 0
    for item in json.loads(res.stdout).get("nftables", []):
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += expr["counter"]["packets"]
    return total


# A tiny UDP echo for the NAT topology's tests: answers every datagram with the source
# endpoint it saw ("ip:port"); ends after ``count`` datagrams or ``seconds``.
UDP_ECHO = r"""
import socket, sys, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
print("ready", flush=True)
end = time.monotonic() + seconds
n = 0
while n < count and time.monotonic() < end:
    s.settimeout(max(0.01, end - time.monotonic()))
    try:
        data, src = s.recvfrom(2048)
    except socket.timeout:
        break
    s.sendto(f"{src[0]}:{src[1]}".encode(), src)
    n += 1
"""

# One UDP socket, one datagram to each "ip:port" argument (resent up to 5 times until
# answered); prints {"ip:port": "what the echo saw" or None, ...}.
UDP_ASK = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
s.settimeout(0.5)
out = {}
for dest in sys.argv[1:]:
    ip, port = dest.rsplit(":", 1)
    out[dest] = None
    for _ in range(5):
        s.sendto(b"?", (ip, int(port)))
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        out[dest] = data.decode()
        break
print(json.dumps(out), flush=True)
"""

# Simultaneous UDP "hole punching" between two sockets (the same script on both sides):
# bind ``port``, send a datagram to peer ip:port every ``interval`` for ``seconds``, count
# what comes back from there; prints {"sent": n, "received": n}.
UDP_PUNCH = r"""
import json, socket, sys, time
port, peer, peer_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
seconds, interval = float(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.setblocking(False)
sent = received = 0
end = time.monotonic() + seconds
nxt = time.monotonic()
while time.monotonic() < end:
    if time.monotonic() >= nxt:
        s.sendto(b"punch %d" % sent, (peer, peer_port))
        sent += 1
        nxt += interval
    try:
        while True:
            data, src = s.recvfrom(2048)
            if src[0] == peer:
                received += 1
    except BlockingIOError:
        pass
    time.sleep(0.005)
print(json.dumps({"sent": sent, "received": received}), flush=True)
"""


def udp_punch(topo: Topology, a: tuple[str, str], b: tuple[str, str], port: int = 7100,
              seconds: float = 1.5, interval: float = 0.05) -> tuple[dict, dict]:
    """Both ``(node, peer address)`` ends run UDP_PUNCH at once, on ``port``, towards the
    other's address (its NAT's public one): what each received."""
    procs = [topo.popen(node, [sys.executable, "-c", UDP_PUNCH, str(port), peer, str(port),
                               str(seconds), str(interval)],
                        log_name=f"punch-{node}-{secrets.token_hex(2)}")
             for node, peer in (a, b)]
    out = []
    for proc in procs:
        try:
            proc.wait(timeout=seconds + 15)
        finally:
            topo.stop(proc, timeout=2)
        got = _last_json(proc.log_path)
        if got is None:
            raise TopologyError(f"punch script failed: {log_tail(proc.log_path)}")
        out.append(got)
    return out[0], out[1]


_HTTP_GET = (
    "import sys, urllib.request\n"
    "h = {'Authorization': 'Bearer ' + sys.argv[2]} if sys.argv[2] else {}\n"
    "r = urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=h), timeout=5)\n"
    "sys.stdout.write(r.read().decode())\n"
)


def http_get_text(topo: Topology, node: str, url: str, token: str | None = None,
                  timeout: float = 10) -> str:
    """GET ``url`` from inside ``node`` (the daemons' HTTP servers listen on the
    namespace's loopback): the body."""
    return topo.run(node, [sys.executable, "-c", _HTTP_GET, url, token or ""],
                    timeout=timeout).stdout


def http_get_json(topo: Topology, node: str, url: str, token: str | None = None,
                  timeout: float = 10) -> Any:
    """As http_get_text, parsed as JSON."""
    return json.loads(http_get_text(topo, node, url, token, timeout))


# The daemons' HTTP servers in the NAT topology's tests (each in its own namespace).
NAT_API_PORT = 9500  # the router's API
NAT_METRICS_PORT = 9400  # the router's and each gateway's /metrics
NAT_API_TOKEN = "polevpn-test-api-token-0123456789"


def nat_router_config(keys_dir: str | os.PathLike, **overrides: Any) -> dict:
    """The router of the NAT topology: tls:// and kcp:// on 0.0.0.0:443 (the kcp://
    port is also where gateways' endpoint probes go), its API and /metrics on loopback,
    stats every second."""
    cfg = router_config(keys_dir, stats_interval=1, api_listen=f"127.0.0.1:{NAT_API_PORT}",
                        api_token=NAT_API_TOKEN,
                        metrics_listen=f"127.0.0.1:{NAT_METRICS_PORT}", **overrides)
    cfg["kcp"]["enable"] = True
    return cfg


def router_api(topo: Topology, path: str, node: str = "router") -> Any:
    """``GET /api/v1/<path>`` of the router in ``node`` (nat_router_config's API)."""
    return http_get_json(topo, node, f"http://127.0.0.1:{NAT_API_PORT}/api/v1/{path}",
                         NAT_API_TOKEN)


def router_forwarded_bytes(topo: Topology, node: str = "router") -> int:
    """IP bytes the router has forwarded to gateways so far (``bytes_forwarded`` of
    /api/v1/status's counters, the figure of polevpn_router_forwarded_bytes): what went
    through the router between gateways."""
    return int(router_api(topo, "status", node)["counters"]["bytes_forwarded"])


def metrics(topo: Topology, node: str, port: int = NAT_METRICS_PORT
            ) -> list[tuple[str, dict[str, str], float]]:
    """The samples of ``node``'s /metrics (router or gateway, metrics_listen on loopback)."""
    return parse_metrics(http_get_text(topo, node, f"http://127.0.0.1:{port}/metrics"))


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", re.M)
_METRIC_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> (name, labels, value) per sample."""
    out = []
    for name, labels, value in _METRIC_LINE.findall(text):
        try:
            v = float(value)
        except ValueError:
            continue
        out.append((name, dict(_METRIC_LABEL.findall(labels or "")), v))
    return out


def metric_sum(samples: Sequence[tuple[str, dict[str, str], float]], name: str,
               **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == x for k, x in labels.items()))



if __name__ == "__main__":  # manual smoke test: plain routing only
    with Topology() as topo:
        topo.enable_plain_routing()
        for src, dst in (("hostA", HOST_B), ("hostB", HOST_A), ("hostA", GW_A_LAN6)):
            r = topo.ping(src, dst, count=2, wait=1)
            print(f"{src} -> {dst}: rc={r.returncode}")
        x = topo.transfer("hostA", "hostB", HOST_B, 5_000_000)
        print("transfer ok:", x["ok"], f"{x['mbit_s']:.0f} Mbit/s")
        d = topo.iperf3("hostA", "hostB", HOST_B, seconds=2)
        print("iperf3:", d["end"]["sum_received"]["bits_per_second"] / 1e6, "Mbit/s")
        topo.disable_plain_routing()
        r = topo.ping("hostA", HOST_B, count=1, wait=1)
        print(f"after disable hostA -> {HOST_B}: rc={r.returncode} (expected != 0)")
        left = topo.prefix
    print("leftover:", leftover_namespaces(left))

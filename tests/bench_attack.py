#!/usr/bin/env python3
"""`make attack`: the attacks of issue 20 against a real router, and what a gateway still gets.

For each attack a fresh ``polevpn-router`` process (tls:// and kcp:// on one port of
``[::]``, a shared key plus a ``gateways`` table, API and /metrics on 127.0.0.1) in a
network namespace of its own, whose loopback carries the attackers' source addresses
(127.0.0.0/8 and 2001:db8::/32 only). Per run:

* idle: two registered tls:// test gateways echo a packet every PROBE_INTERVAL through the
  router (round-trip latency), one gateway of the ``gateways`` table connects on tls:// and
  on kcp:// (connect, AUTH, REGISTER), router VmRSS and CPU;
* attack: a generator process (``--generate NAME``, bounded in time and count) runs the
  attack at the rate that broke the router in the attack run, while the echo goes on, the
  table's gateway connects again and again on both transports, VmRSS is sampled every
  0.1 s (and, for the API attacks, the operator asks the API and scrapes /metrics);
* after: the generator has ended; the gateway connects once more on both transports, and
  VmRSS AFTER_SECONDS later (past auth_timeout, so pending connections are gone).

Targets (issue 20, "Tests and figures"): the gateway connects within 2 s on both
transports during the attack, echo latency (median) within 2x idle, VmRSS under 200 MB
during and within 20% of idle after. CPU per attack MB (router CPU seconds in the attack
window / MB the generator sent) is reported. Medians of RUNS runs per attack.

Writes the attack section of docs/benchmarks.md (between ATTACK_BEGIN and ATTACK_END) and
the "attack" entry of docs/benchmarks.json, leaving the rest; `make bench` runs this too
and keeps the section when it rewrites the file. ``--runs``, ``--only`` and ``--no-write``
for trying it out. Needs root (the namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import random
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostinfo  # noqa: E402
import strictdtls  # noqa: E402
from protoclient import ProtoClient, RouterProcess, RouterRefused, udp_packet  # noqa: E402

from polevpn.kcp import dtls  # noqa: E402
from polevpn.packet import gso  # noqa: E402
from polevpn.proto import messages, wire  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
ATTACK_BEGIN = "<!-- attack:begin -->"
ATTACK_END = "<!-- attack:end -->"

RUNS = 3
ATTACK_SECONDS = 4.0  # every generator's time bound (the oversized burst is shorter)
IDLE_SECONDS = 2.0
AFTER_SECONDS = 7.0  # auth_timeout (5 s) and some
AUTH_TIMEOUT = 5.0
PROBE_INTERVAL = 0.05
PROBE_TIMEOUT = 2.0
CONNECT_TIMEOUT = 5.0
API_TOKEN = "bench-attack-token-0123456789"

# targets
CONNECT_LIMIT_S = 2.0
LATENCY_FACTOR = 2.0
RSS_LIMIT_MB = 200.0
RSS_AFTER_FACTOR = 1.2

# addresses (all on the namespace's loopback)
ROUTER_V4 = "127.0.0.1"
ECHO_SRC, PINGER_SRC = "127.0.100.1", "127.0.100.2"
PROBE_SRC = "127.0.200.1"
OPERATOR_SRC = "127.0.0.1"
ECHO_GW, ECHO_NET, ECHO_HOST = "169.254.9.1", "198.18.99.0/24", "198.18.99.1"
PINGER_GW, PINGER_NET, PINGER_HOST = "169.254.9.2", "198.18.98.0/24", "198.18.98.1"
GRANT_GW, GRANT_NET = "169.254.50.1", "198.18.50.0/24"
GRANT_KEY = "grant-key-of-the-probe-gateway-0123"
# one IPv6 /59 (32 /64s), one address per /64, for the idle TCP connections
SLASH59 = [f"2001:db8:1:{i:x}::1" for i in range(32)]


@dataclass(frozen=True)
class Attack:
    key: str
    finding: str
    title: str
    rate: str
    generator: str = ""  # GENERATORS key, if not ``key``
    params: tuple[tuple[str, Any], ...] = ()  # for the generator

    @property
    def gen(self) -> str:
        return self.generator or self.key


ATTACKS = [
    Attack("oversized", "1", "oversized UDP datagrams to the kcp:// port",
           "65,000-byte datagrams at 1,000/s for 1.5 s (1,500), no key"),
    Attack("fec", "2", "FEC groups k=m=64 after a DTLS handshake, no AUTH",
           "4 data (other ones each group) + 60 parity shards of 2 bytes per group, ~400 KiB/s"),
    Attack("superpacket", "3", "super-packet amplification (shared key)",
           "250 IPv6 dest-options headers, gso_size 1, ~1.3 MB/s to a plain gateway"),
    Attack("unauth_kcp", "4", "unauthenticated kcp:// sessions that never send sn 0",
           "8 addresses x 32 sessions, 128 segments of 1,300 bytes each from sn 1"),
    Attack("kcp_fragments", "4", "stalled kcp:// handshakes holding out-of-order fragments",
           "8 addresses of 8 /24s x 32 handshakes, 11 fragments of 100 KB messages each",
           "pending_kcp", (("spread", True), ("fragments", True))),
    Attack("pending_tcp", "5", "idle TCP connections from one IPv6 /59",
           "33 per /64 x 32 /64s (1,056), reopened when closed"),
    Attack("pending_kcp", "5", "kcp:// handshakes stalled after the cookie, 8 addresses",
           "8 addresses of one /24, 32 in flight each, replaced when done"),
    Attack("pending_kcp_spread", "5", "as above, the 8 addresses in 8 different /24s",
           "8 addresses of 8 /24s, 32 in flight each, replaced when done",
           "pending_kcp", (("spread", True),)),
    Attack("refused_hello", "6", "refused ClientHellos with valid cookies, blocked source",
           "400/s cookie ClientHellos from a source blocked for AUTH failures"),
    Attack("register_flood", "8", "REGISTER floods (shared key)",
           "3,000 multi-link REGISTERs in one write, a new connection every 0.25 s"),
    Attack("register_flood_fast", "8", "REGISTER floods, reconnecting at once",
           "3,000 multi-link REGISTERs in one write per connection, up to 200 connections",
           "register_flood", (("interval", 0.0), ("max_connections", 200))),
    Attack("api_idle", "10", "idle connections to the API and /metrics, scrapes",
           "64 idle connections to each + 250 unauthenticated /metrics scrapes/s"),
    Attack("content_length", "11", "huge Content-Length to the API and /metrics",
           "50 requests/s with a 5,000-digit Content-Length"),
]
BY_KEY = {a.key: a for a in ATTACKS}
# the router's counters (its stats line) that show what it made of each attack
EVIDENCE = {
    "oversized": ("kcp_rejected_datagrams", "kcp_datagrams_in"),
    "fec": ("kcp_handshakes", "kcp_datagrams_in", "auth_timeouts", "fec_recovered"),
    "superpacket": ("dropped_malformed", "segmented", "packets_forwarded"),
    "unauth_kcp": ("kcp_handshakes", "kcp_datagrams_in", "kcp_refused_handshakes",
                   "auth_timeouts", "refused_pending_per_source", "refused_pending_per_prefix"),
    "pending_tcp": ("connections_accepted", "refused_pending", "refused_pending_per_source",
                    "refused_pending_per_prefix", "pre_tls_timeouts", "handshake_timeouts"),
    "pending_kcp_spread": ("kcp_hello_verify_sent", "kcp_refused_handshakes",
                           "kcp_handshake_timeouts", "refused_pending_per_prefix"),
    "kcp_fragments": ("kcp_hello_verify_sent", "kcp_refused_handshakes",
                      "kcp_handshake_timeouts"),
    "register_flood_fast": ("register_flood", "registrations", "connections_accepted"),
    "pending_kcp": ("kcp_hello_verify_sent", "kcp_refused_handshakes", "kcp_handshake_timeouts",
                    "refused_pending_per_source", "refused_pending_per_prefix"),
    "refused_hello": ("auth_failures", "refused_rate_limited", "kcp_refused_handshakes",
                      "kcp_handshakes"),
    "register_flood": ("register_flood", "registrations", "connections_accepted"),
    "api_idle": (),
    "content_length": (),
}


# ==== generators (run in their own process: --generate NAME) ================================


@dataclass
class GenStats:
    bytes: int = 0
    items: int = 0
    connections: int = 0
    refused: int = 0
    received_bytes: int = 0
    note: str = ""


def _dtls_ctx() -> tuple[Any, dtls.Verification]:
    verify = dtls.Verification(insecure=True)
    return dtls.client_context(verify), verify


class DtlsPeer(asyncio.DatagramProtocol):
    """A DTLS client on its own UDP socket; ``stall`` drops its own flights after the cookie
    ClientHello (a handshake that holds its slot until the router's deadline)."""

    def __init__(self, ctx: Any, verify: dtls.Verification, stall: bool = False) -> None:
        self.session = dtls.DtlsSession.client(ctx, verify, 1400, 0.0)
        self.stall = stall
        self.transport: asyncio.DatagramTransport | None = None
        self.ch2: bytes | None = None
        self.flight = False  # the router answered the cookie ClientHello
        self.lost = False
        self.started = time.monotonic()
        self.sent = 0  # handshake bytes (records from send_record are counted by the caller)
        self.fragments = False  # stalled: send out_of_order_fragments once the flight came

    def _send(self, datagrams: list[bytes]) -> None:
        for d in datagrams:
            kind = strictdtls.first_kind(d)
            if kind == "CH2" and self.ch2 is None:
                self.ch2 = bytes(d)
            if self.stall and kind not in ("CH", "CH2"):
                continue
            if self.transport is not None and not self.transport.is_closing():
                self.transport.sendto(d)
                self.sent += len(d)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._send(self.session.step(time.monotonic()))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if strictdtls.first_kind(data) != "HVR":
            if not self.flight and self.fragments and self.transport is not None:
                for d in out_of_order_fragments():
                    self.transport.sendto(d)
                    self.sent += len(d)
            self.flight = True
        _, out = self.session.receive(data, time.monotonic())
        self._send(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def send_record(self, plaintext: bytes) -> int:
        rec = self.session.send(plaintext)
        if rec is None or self.transport is None or self.transport.is_closing():
            return 0
        self.transport.sendto(rec)
        return len(rec)

    async def handshake(self, within: float) -> bool:
        deadline = time.monotonic() + within
        while not self.session.established:
            if time.monotonic() > deadline or self.session.closed:
                return False
            await asyncio.sleep(0.02)
            self._send(self.session.handle_timeout(time.monotonic()))
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def dtls_peer(
    ctx: Any, verify: dtls.Verification, src: str, port: int, stall: bool = False
) -> DtlsPeer:
    loop = asyncio.get_running_loop()
    peer = DtlsPeer(ctx, verify, stall)
    await loop.create_datagram_endpoint(
        lambda: peer, local_addr=(src, 0), remote_addr=(ROUTER_V4, port)
    )
    return peer


def out_of_order_fragments() -> list[bytes]:
    """Epoch-0 handshake records, each a 16-byte fragment (at offset 1) of a 102,400-byte
    message (OpenSSL's largest by default), message_seq 2..12: OpenSSL keeps a buffer of the
    whole message for each (future messages up to 10 ahead) until the handshake ends."""
    out = []
    for i, mseq in enumerate(range(2, 13)):
        hs = struct.pack(">B3sH3s3s", 16, (102400).to_bytes(3, "big"), mseq,
                         (1).to_bytes(3, "big"), (16).to_bytes(3, "big")) + bytes(16)
        out.append(struct.pack(">BHH6sH", 22, 0xFEFD, 0, (100 + i).to_bytes(6, "big"), len(hs))
                   + hs)
    return out


def kcp_push(sn: int, data: bytes) -> bytes:
    """An ikcp PUSH segment of conversation 0 (little-endian, as ikcp)."""
    return struct.pack("<IBBHIIII", 0, 81, 0, 256, 0, sn, 0, len(data)) + data


def udp6_options_super_packet(src: str, dst: str, options: int, payload: int, gso_size: int):
    """Virtio-net header + IPv6/UDP super-packet behind ``options`` 8-byte destination-options
    headers: the attack run's shape (as tests/test_router_loopback.py)."""
    ext = b"".join(bytes([60 if i + 1 < options else 17, 0]) + bytes(6) for i in range(options))
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    ulen = 8 + payload
    pseudo = gso.internet_checksum(s + d + struct.pack(">IxxxB", ulen, 17))
    udp = struct.pack(">HHHH", 5353, 4500, ulen, pseudo) + bytes(payload)
    ip = struct.pack(">IHBB16s16s", 6 << 28, len(ext) + ulen, 60, 64, s, d)
    vnet = gso.VNET_HDR.pack(gso.F_NEEDS_CSUM, gso.GSO_UDP_L4, 0, gso_size, 40 + len(ext), 6)
    return vnet + ip + ext + udp


class Paced:
    """``rate`` events per second from now: how many are due."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t0 = time.monotonic()
        self.done = 0

    def due(self) -> int:
        return max(0, int((time.monotonic() - self.t0) * self.rate) - self.done)


def ready() -> None:
    print("ready", flush=True)


async def gen_oversized(t: dict, st: GenStats) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.11.1", 0))
    sock.setblocking(False)
    junk = b"\x16\xfe\xfd" + bytes(65000 - 3)
    pace, count = Paced(1000), 1500
    ready()
    try:
        while st.items < count:
            for _ in range(min(pace.due(), count - st.items)):
                try:
                    sock.sendto(junk, (ROUTER_V4, t["kcp"]))
                    st.bytes += len(junk)
                except BlockingIOError:
                    st.refused += 1  # our own socket buffer: not sent
                st.items += 1
                pace.done += 1
            await asyncio.sleep(0.002)
    finally:
        sock.close()


async def gen_fec(t: dict, st: GenStats) -> None:
    """Groups of 4 data shards and 60 parity shards (k = m = 64) of a 2-byte region,
    ~124 groups/s (~400 KiB/s with DTLS); a new session every 4 s (the router closes one
    that has not authenticated after auth_timeout)."""
    ctx, verify = _dtls_ctx()
    end = time.monotonic() + t["seconds"]
    seq = group = 0
    first = True
    rng = random.Random(20)
    while time.monotonic() < end and group < 5000:
        peer = await dtls_peer(ctx, verify, "127.0.12.1", t["kcp"])
        st.connections += 1
        ok = await peer.handshake(3.0)
        st.bytes += peer.sent
        if not ok:
            st.refused += 1
            peer.close()
            continue
        if first:
            ready()
            first = False
        pace = Paced(124)
        until = min(end, time.monotonic() + 4.0)
        while time.monotonic() < until and not peer.lost and group < 5000:
            for _ in range(pace.due()):
                # 4 of the 64 data shards, another choice each group, so that no two groups
                # need the same matrix (the decoder caches inverses by loss pattern)
                for i in rng.sample(range(64), 4):
                    shard = struct.pack(">BBIIBBH", 0xF3, i, seq, group, 0, 64, 0)
                    st.bytes += peer.send_record(shard)
                    seq += 1
                for j in range(60):
                    shard = struct.pack(">BBIIBB", 0xF3, 1 << 6 | j, seq, group, 64, 64) + b"xy"
                    st.bytes += peer.send_record(shard)
                    seq += 1
                group += 1
                st.items += 1
                pace.done += 1
            await asyncio.sleep(0.005)
        peer.close()


async def gen_superpacket(t: dict, st: GenStats) -> None:
    """A shared-key gateway with super-packets sends the amplification shape to a plain
    gateway (also here, counting what reaches it)."""
    host, port, key = ROUTER_V4, t["tls"], t["key"]
    plain = await ProtoClient.connect_tls(host, port, source="127.0.13.2")
    await plain.login(key, "169.254.13.2", ["2001:db8:20::/64"])
    atk = await ProtoClient.connect_tls(host, port, source="127.0.13.1")
    await atk.login(key, "169.254.13.1", ["2001:db8:10::/64"],
                    features=frozenset({messages.FEATURE_SUPER}))
    sp = udp6_options_super_packet("2001:db8:10::2", "2001:db8:20::2", 250, 254, 1)
    frame = wire.super_header(len(sp)) + sp
    pace = Paced(1.3e6 / len(frame))
    count = int(pace.rate * t["seconds"])
    ready()
    end = time.monotonic() + t["seconds"]
    while time.monotonic() < end and st.items < count and not atk.closed.done():
        n = min(pace.due(), count - st.items)
        if n:
            atk.write(frame * n)
            st.bytes += len(frame) * n
            st.items += n
            pace.done += n
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.5)  # what is still on its way
    st.received_bytes = plain.recv.bytes
    st.note = f"{plain.recv.packets} packets reached the plain gateway"
    for c in (atk, plain):
        c.close()


async def gen_unauth_kcp(t: dict, st: GenStats) -> None:
    """8 addresses x 32 sessions, each sending 128 PUSH segments from sn 1 (sn 0 never
    comes), replaced when the router closes them, until the time is up."""
    ctx, verify = _dtls_ctx()
    end = time.monotonic() + t["seconds"]
    data = bytes(1300)
    segments = [kcp_push(sn, data) for sn in range(1, 129)]
    sem = asyncio.Semaphore(16)
    first = asyncio.Event()

    async def session(src: str) -> None:
        while time.monotonic() < end and st.connections < 1024:
            async with sem:
                peer = await dtls_peer(ctx, verify, src, t["kcp"])
                st.connections += 1
                ok = await peer.handshake(3.0)
                st.bytes += peer.sent
            if not ok:
                st.refused += 1
                peer.close()
                await asyncio.sleep(0.2)
                continue
            first.set()
            for i, seg in enumerate(segments):
                st.bytes += peer.send_record(seg)
                st.items += 1
                if i % 32 == 31:
                    await asyncio.sleep(0.01)
            while not peer.lost and time.monotonic() < end:
                # the router closes the session after auth_timeout; UDP says nothing, so
                # look at the clock as the attacker would
                if time.monotonic() - peer.started > AUTH_TIMEOUT + 0.5:
                    break
                await asyncio.sleep(0.1)
            peer.close()

    tasks = [
        asyncio.create_task(session(f"127.0.{21 + a}.1")) for a in range(8) for _ in range(32)
    ]
    await asyncio.wait_for(first.wait(), 20)
    ready()
    await asyncio.gather(*tasks)


async def gen_pending_tcp(t: dict, st: GenStats) -> None:
    """1,056 idle TCP connections (33 per /64 of one /59) that never send a byte; one the
    router closes is opened again (at most 500 a second)."""
    loop = asyncio.get_running_loop()
    end = time.monotonic() + t["seconds"]
    socks: list[socket.socket | None] = [None] * (33 * len(SLASH59))

    async def open_one(i: int) -> None:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((SLASH59[i % len(SLASH59)], 0))
            await asyncio.wait_for(loop.sock_connect(s, ("::1", t["tls"])), 2)
        except (OSError, TimeoutError):
            st.refused += 1
            s.close()
            return
        socks[i] = s
        st.connections += 1

    def alive(s: socket.socket) -> bool:
        try:
            return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    await asyncio.gather(*(open_one(i) for i in range(len(socks))))
    ready()
    try:
        while time.monotonic() < end and st.connections < 20000:
            again = []
            for i, s in enumerate(socks):
                if s is None or not alive(s):
                    if s is not None:
                        s.close()
                        st.items += 1  # closed by the router
                    socks[i] = None
                    again.append(i)
            await asyncio.gather(*(open_one(i) for i in again[:250]))
            await asyncio.sleep(0.5)
    finally:
        for s in socks:
            if s is not None:
                s.close()


async def gen_pending_kcp(t: dict, st: GenStats) -> None:
    """32 stalled handshakes in flight from each of 8 addresses of one /24; one the router
    refused (only a HelloVerifyRequest) or gave up on is replaced."""
    ctx, verify = _dtls_ctx()
    end = time.monotonic() + t["seconds"]
    if t.get("spread"):
        sources = [f"127.0.{31 + a}.1" for a in range(8)]
    else:
        sources = [f"127.0.31.{1 + a}" for a in range(8)]
    peers: list[DtlsPeer | None] = [None] * (32 * len(sources))
    first = True
    while time.monotonic() < end and st.connections < 20000:
        now = time.monotonic()
        for i, p in enumerate(peers):
            if p is not None:
                refused = not p.flight and now - p.started > 1.0
                if refused or now - p.started > AUTH_TIMEOUT + 0.5:
                    st.refused += refused
                    st.bytes += p.sent
                    p.close()
                    peers[i] = None
            if peers[i] is None:
                peers[i] = p = await dtls_peer(ctx, verify, sources[i % 8], t["kcp"], stall=True)
                p.fragments = bool(t.get("fragments"))
                st.connections += 1
                st.items += 1
        if first:
            ready()
            first = False
        await asyncio.sleep(0.25)
    for p in peers:
        if p is not None:
            st.bytes += p.sent
            p.close()


async def gen_refused_hello(t: dict, st: GenStats) -> None:
    """A source blocked for AUTH failures (11 wrong keys over tls://) sends the same
    cookie ClientHello again and again from 4 sockets, 400 a second."""
    src = "127.0.41.1"
    for i in range(11):
        try:
            c = await ProtoClient.connect_tls(ROUTER_V4, t["tls"], source=src, timeout=3)
        except (OSError, TimeoutError, ssl.SSLError):
            break  # blocked already
        with contextlib.suppress(RouterRefused):
            await c.auth(f"wrong-key-{i}", timeout=3)
        c.close()
    ctx, verify = _dtls_ctx()
    peers = [await dtls_peer(ctx, verify, src, t["kcp"]) for _ in range(4)]
    await asyncio.sleep(0.5)
    peers = [p for p in peers if p.ch2 is not None]
    if not peers:
        raise RuntimeError("no cookie ClientHello")
    st.note = f"{sum(p.flight for p in peers)} of {len(peers)} got a server flight"
    pace, count = Paced(400), int(400 * t["seconds"])
    ready()
    while st.items < count:
        for _ in range(min(pace.due(), count - st.items)):
            p = peers[st.items % len(peers)]
            assert p.transport is not None and p.ch2 is not None
            p.transport.sendto(p.ch2)
            st.bytes += len(p.ch2)
            st.items += 1
            pace.done += 1
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)
    st.refused = sum(p.flight for p in peers)  # a flight after the replays: not refused
    for p in peers:
        p.close()


async def gen_register_flood(t: dict, st: GenStats) -> None:
    key = t["key"]
    end = time.monotonic() + t["seconds"]
    reg = {"gateway": "169.254.51.1", "key": key, "network": ["198.18.51.0/24"]}
    flood = b"".join(
        wire.encode_frame(
            wire.REGISTER, json.dumps({**reg, "link": {"name": f"l{i % 8}"}}).encode(), i
        )
        for i in range(3000)
    )
    first = True
    while time.monotonic() < end and st.connections < t.get("max_connections", 40):
        c = await ProtoClient.connect_tls(ROUTER_V4, t["tls"], source="127.0.51.1")
        st.connections += 1
        await c.auth(key, frozenset({messages.FEATURE_MULTILINK}))
        if first:
            ready()
            first = False
        c.write(flood)
        st.bytes += len(flood)
        st.items += 3000
        if not await c.wait_closed(2.0):
            st.refused += 1  # still open: the flood was not cut
            c.close()
        await asyncio.sleep(t.get("interval", 0.25))


async def _http(host: str, port: int, request: bytes, src: str, timeout: float) -> bytes:
    """One request on a new connection; the status line (b"" if none)."""
    r, w = await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(src, 0)), timeout
    )
    try:
        w.write(request)
        line = await asyncio.wait_for(r.readline(), timeout)
        await asyncio.wait_for(r.read(), timeout)
        return line
    finally:
        w.close()


async def gen_api_idle(t: dict, st: GenStats) -> None:
    loop = asyncio.get_running_loop()
    idle: list[socket.socket] = []
    for port in (t["api"], t["metrics"]):
        for i in range(64):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.bind((f"127.0.61.{1 + i % 4}", 0))
            try:
                await asyncio.wait_for(loop.sock_connect(s, (ROUTER_V4, port)), 2)
                idle.append(s)
                st.connections += 1
            except (OSError, TimeoutError):
                st.refused += 1
                s.close()
    scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    pace, count = Paced(250), int(250 * t["seconds"])
    answered = 0

    async def one(i: int) -> None:
        nonlocal answered
        try:
            line = await _http(ROUTER_V4, t["metrics"], scrape, f"127.0.62.{1 + i % 8}", 2)
            answered += line.startswith(b"HTTP/1.1 200")
        except (OSError, TimeoutError):
            pass

    ready()
    tasks = []
    end = time.monotonic() + t["seconds"]
    while st.items < count and time.monotonic() < end:
        for _ in range(min(pace.due(), count - st.items)):
            tasks.append(asyncio.create_task(one(st.items)))
            st.bytes += len(scrape)
            st.items += 1
            pace.done += 1
        await asyncio.sleep(0.004)
    await asyncio.gather(*tasks)
    st.note = f"{answered} of {st.items} scrapes answered"
    for s in idle:
        s.close()


async def gen_content_length(t: dict, st: GenStats) -> None:
    pace, count = Paced(50), int(50 * t["seconds"])
    replies: dict[str, int] = {}

    async def one(i: int) -> None:
        port = (t["api"], t["metrics"])[i % 2]
        path = b"/api/v1/status" if i % 2 == 0 else b"/metrics"
        req = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000
               + b"\r\n\r\n")
        st.bytes += len(req)
        try:
            line = await _http(ROUTER_V4, port, req, "127.0.63.1", 2)
            k = line.split(b" ")[1].decode() if line else "no reply"
        except (OSError, TimeoutError):
            k = "no reply"
        except IndexError:
            k = "bad reply"
        k = f"{('API', '/metrics')[i % 2]} {k}"
        replies[k] = replies.get(k, 0) + 1

    ready()
    tasks = []
    while st.items < count:
        for _ in range(min(pace.due(), count - st.items)):
            tasks.append(asyncio.create_task(one(st.items)))
            st.items += 1
            pace.done += 1
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    st.note = "replies: " + ", ".join(f"{k} x{v}" for k, v in sorted(replies.items()))


GENERATORS = {
    "oversized": gen_oversized,
    "fec": gen_fec,
    "superpacket": gen_superpacket,
    "unauth_kcp": gen_unauth_kcp,
    "pending_tcp": gen_pending_tcp,
    "pending_kcp": gen_pending_kcp,
    "refused_hello": gen_refused_hello,
    "register_flood": gen_register_flood,
    "api_idle": gen_api_idle,
    "content_length": gen_content_length,
}


def generate(name: str, target: dict) -> int:
    import uvloop

    st = GenStats()

    async def run() -> None:
        # every generator is bounded in count; this bounds it in time as well
        try:
            await asyncio.wait_for(GENERATORS[name](target, st), target["seconds"] + 30)
        except TimeoutError:
            st.note += " (generator timed out)"

    uvloop.run(run())
    print(json.dumps(asdict(st)), flush=True)
    return 0


# ==== measuring (in the namespace, --inner) =================================================


class EchoGateway(ProtoClient):
    """Sends every packet back with source and destination swapped."""

    def _packet(self, pkt: memoryview) -> None:
        super()._packet(pkt)
        p = bytes(pkt)
        self.send_packets([p[:12] + p[16:20] + p[12:16] + p[20:]])


class Pinger(ProtoClient):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.waiting: dict[int, asyncio.Future[float]] = {}

    def _packet(self, pkt: memoryview) -> None:
        super()._packet(pkt)
        from protoclient import marker

        m = marker(pkt)
        fut = self.waiting.pop(m[1], None) if m else None
        if fut is not None and not fut.done():
            fut.set_result(time.monotonic())


@dataclass
class Window:
    """What one phase (idle, attack, after) measured."""

    seconds: float = 0.0
    rtt_ms: list[float] = field(default_factory=list)
    lost_probes: int = 0
    connect_tls_s: list[float | None] = field(default_factory=list)  # None: failed
    connect_kcp_s: list[float | None] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    cpu_s: float = 0.0
    api_ms: list[float | None] = field(default_factory=list)
    metrics_ms: list[float | None] = field(default_factory=list)


def router_cfg(keys: Any) -> dict:
    listener = {"listen": "[::]:0", "enable": True, "cert_file": str(keys.server_cert),
                "key_file": str(keys.server_key)}
    return {
        "tls": dict(listener),
        "kcp": dict(listener),
        "key_file": str(keys.shared_key),
        "gateways": {GRANT_GW: {"key": GRANT_KEY, "networks": [GRANT_NET]}},
        "api_listen": "127.0.0.1:0",
        "api_token": API_TOKEN,
        "metrics_listen": "127.0.0.1:0",
        "log_level": "info",
        "stats_interval": 1,
        "auth_timeout": AUTH_TIMEOUT,
    }


def http_ports(router: RouterProcess) -> dict[str, int]:
    """The API's and /metrics' ports, from the log (they start after the listeners)."""
    import re

    deadline = time.monotonic() + 10
    while True:
        text = router.log_path.read_text(errors="replace")
        found = {m[1]: int(m[2])
                 for m in re.finditer(r"(api|metrics) listening\"? address=\S+ port=(\d+)", text)}
        if len(found) == 2:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"no API/metrics listening lines in the log: {found}")
        time.sleep(0.05)


async def connect_probe(router: RouterProcess, transport: str) -> float | None:
    """A gateway of the ``gateways`` table: connect, AUTH, REGISTER; seconds, or None."""
    t0 = time.monotonic()
    c: ProtoClient | None = None
    try:
        if transport == "kcp":
            c = await ProtoClient.connect_kcp(ROUTER_V4, router.ports["kcp"], source=PROBE_SRC,
                                              timeout=CONNECT_TIMEOUT)
        else:
            c = await ProtoClient.connect_tls(ROUTER_V4, router.ports["tls"], source=PROBE_SRC,
                                              timeout=CONNECT_TIMEOUT)
        left = max(0.1, CONNECT_TIMEOUT - (time.monotonic() - t0))
        await c.login(GRANT_KEY, GRANT_GW, [GRANT_NET], timeout=left)
        return time.monotonic() - t0
    except (OSError, TimeoutError, ssl.SSLError, RouterRefused, ConnectionError):
        return None
    except Exception as exc:  # the kcp:// client's own errors (handshake refused, ...)
        if type(exc).__name__.endswith(("Error", "Refused", "Timeout")):
            return None
        raise
    finally:
        if c is not None:
            c.close()
            await c.wait_closed(2)


async def operator_request(port: int, path: str, token: bool) -> float | None:
    auth = f"Authorization: Bearer {API_TOKEN}\r\n" if token else ""
    req = f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode()
    t0 = time.monotonic()
    try:
        line = await _http(ROUTER_V4, port, req, OPERATOR_SRC, 2.0)
    except (OSError, TimeoutError):
        return None
    return time.monotonic() - t0 if line.startswith(b"HTTP/1.1 200") else None


class Probes:
    """The echo, the connect probes, VmRSS sampling and the operator's requests, running
    until ``stop``; results into the current ``Window``."""

    def __init__(self, router: RouterProcess, pinger: Pinger, http: dict[str, int],
                 operator: bool) -> None:
        self.router = router
        self.pinger = pinger
        self.http = http
        self.operator = operator
        self.seq = 0

    async def echo(self, w: Window, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.seq += 1
            fut = asyncio.get_running_loop().create_future()
            self.pinger.waiting[self.seq] = fut
            t0 = time.monotonic()
            self.pinger.send_packets([udp_packet(PINGER_HOST, ECHO_HOST, 1, self.seq)])
            try:
                t1 = await asyncio.wait_for(fut, PROBE_TIMEOUT)
                w.rtt_ms.append((t1 - t0) * 1000)
            except TimeoutError:
                self.pinger.waiting.pop(self.seq, None)
                w.lost_probes += 1
            await asyncio.sleep(PROBE_INTERVAL)

    async def rss(self, w: Window, stop: asyncio.Event) -> None:
        while not stop.is_set():
            w.rss_kb.append(self.router.rss_kb())
            await asyncio.sleep(0.1)

    async def connects(self, w: Window, stop: asyncio.Event, delay: float) -> None:
        await asyncio.sleep(delay)
        while True:
            w.connect_tls_s.append(await connect_probe(self.router, "tls"))
            w.connect_kcp_s.append(await connect_probe(self.router, "kcp"))
            if stop.is_set():
                return
            await asyncio.sleep(0.2)

    async def api(self, w: Window, stop: asyncio.Event) -> None:
        while not stop.is_set():
            w.api_ms.append(await operator_request(self.http["api"], "/api/v1/status", True))
            w.metrics_ms.append(await operator_request(self.http["metrics"], "/metrics", False))
            await asyncio.sleep(0.3)

    async def run(self, w: Window, until: Any, connect_delay: float) -> None:
        """Probes until the awaitable ``until`` is done (the connect probes finish their
        round, so each phase has at least one of each)."""
        stop = asyncio.Event()
        cpu0, t0 = self.router.cpu_seconds(), time.monotonic()
        tasks = [asyncio.create_task(self.echo(w, stop)), asyncio.create_task(self.rss(w, stop))]
        connects = asyncio.create_task(self.connects(w, stop, connect_delay))
        if self.operator:
            tasks.append(asyncio.create_task(self.api(w, stop)))
        try:
            result = await until
        finally:
            w.cpu_s = self.router.cpu_seconds() - cpu0
            w.seconds = time.monotonic() - t0
            stop.set()
            await asyncio.gather(*tasks, connects)
        return result


async def read_generator(proc: asyncio.subprocess.Process, started: asyncio.Future) -> dict:
    assert proc.stdout is not None
    stats: dict = {}
    async for raw in proc.stdout:
        line = raw.decode().strip()
        if line == "ready" and not started.done():
            started.set_result(time.monotonic())
        elif line.startswith("{"):
            stats = json.loads(line)
    await proc.wait()
    if not started.done():
        started.set_result(time.monotonic())
    if proc.returncode or not stats:
        err = (await proc.stderr.read()).decode()[-2000:] if proc.stderr else ""
        raise RuntimeError(f"generator exited {proc.returncode}: {err}")
    return stats


async def measure(attack: Attack, keys: Any, workdir: Path, seconds: float) -> dict:
    key = keys.shared_key.read_text().strip()
    router = RouterProcess.start(router_cfg(keys), workdir)
    http = http_ports(router)
    echo: ProtoClient | None = None
    pinger: Pinger | None = None
    try:
        port = router.ports["tls"]
        echo = await EchoGateway.connect_tls(ROUTER_V4, port, source=ECHO_SRC)
        await echo.login(key, ECHO_GW, [ECHO_NET])
        pinger = await Pinger.connect_tls(ROUTER_V4, port, source=PINGER_SRC)
        await pinger.login(key, PINGER_GW, [PINGER_NET])
        for c in (echo, pinger):
            c.start_heartbeats(5)
        probes = Probes(router, pinger, http, attack.key in ("api_idle", "content_length"))
        # warm-up: one of each connect and some echoes, not counted
        await probes.run(Window(), asyncio.sleep(1.0), 0.0)
        idle = Window()
        await probes.run(idle, asyncio.sleep(IDLE_SECONDS), 0.2)

        target = {"tls": router.ports["tls"], "kcp": router.ports["kcp"], "key": key,
                  "seconds": seconds, **http, **dict(attack.params)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--generate", attack.gen, "--target", json.dumps(target),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        started: asyncio.Future = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(read_generator(proc, started))
        try:
            await asyncio.wait_for(asyncio.shield(started), 60)
            during = Window()
            gen = await probes.run(during, reader, 0.2)
        finally:
            if proc.returncode is None:  # this run failed: its generator goes too
                proc.kill()
                await proc.wait()

        after = Window()
        settle = asyncio.sleep(AFTER_SECONDS)
        await probes.run(after, settle, 1.0)
        rss_after_kb = router.rss_kb()
        if router.proc.poll() is not None:
            raise RuntimeError("router exited")
        stats = router.stats()
    finally:
        for c in (echo, pinger):
            if c is not None:
                c.close()
        router.stop()
    return summarize(attack, idle, during, after, rss_after_kb, gen, stats)


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _worst(values: list[float | None]) -> float | None:
    """The slowest connect; None if none or any failed (reported as failed)."""
    if not values or any(v is None for v in values):
        return None
    return max(v for v in values if v is not None)


def summarize(attack: Attack, idle: Window, during: Window, after: Window, rss_after_kb: int,
              gen: dict, stats: dict) -> dict:
    mb_sent = gen["bytes"] / 1e6
    out = {
        "attack": attack.key,
        "seconds": round(during.seconds, 2),
        "generator": gen,
        "attack_mb": round(mb_sent, 2),
        "rtt_idle_ms": _med(idle.rtt_ms),
        "rtt_attack_ms": _med(during.rtt_ms),
        "rtt_attack_p95_ms": (sorted(during.rtt_ms)[int(len(during.rtt_ms) * 0.95)]
                              if during.rtt_ms else None),
        "lost_probes": during.lost_probes,
        "connect_tls_idle_s": _worst(idle.connect_tls_s),
        "connect_kcp_idle_s": _worst(idle.connect_kcp_s),
        "connect_tls_s": during.connect_tls_s,
        "connect_kcp_s": during.connect_kcp_s,
        "connect_tls_worst_s": _worst(during.connect_tls_s),
        "connect_kcp_worst_s": _worst(during.connect_kcp_s),
        "connect_tls_after_s": _worst(after.connect_tls_s),
        "connect_kcp_after_s": _worst(after.connect_kcp_s),
        "rss_idle_mb": round(_med(idle.rss_kb) / 1024, 1) if idle.rss_kb else None,
        # the router may still be working through what the attack sent after it ended
        "rss_max_mb": round(max(during.rss_kb + after.rss_kb + [rss_after_kb]) / 1024, 1),
        "rss_after_mb": round(rss_after_kb / 1024, 1),
        "cpu_attack_s": round(during.cpu_s, 2),
        "cpu_idle_s_per_s": round(idle.cpu_s / idle.seconds, 3),
        "cpu_ms_per_mb": round(1000 * during.cpu_s / mb_sent, 1) if mb_sent >= 0.01 else None,
        "cpu_busy_pct": round(100 * during.cpu_s / during.seconds, 1),
        "router_stats": stats,
        "evidence": {k: stats.get(k) for k in EVIDENCE[attack.key]},
    }
    for name in ("api_ms", "metrics_ms"):
        vals = getattr(during, name)
        if vals:
            ok = [v * 1000 for v in vals if v is not None]
            out[name.replace("_ms", "_answered")] = f"{len(ok)}/{len(vals)}"
            out[name.replace("_ms", "_median_ms")] = round(_med(ok), 1) if ok else None
    return out


def _num(v: Any, nd: int = 2) -> Any:
    return None if v is None else round(v, nd)


def combine(attack: Attack, runs: list[dict]) -> dict:
    """Medians over the runs; a failed connect in any run counts as failed."""

    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return _num(statistics.median(vals), 3) if vals else None

    def worst(key: str) -> float | None:
        vals = [r[key] for r in runs]
        return None if any(v is None for v in vals) else _num(max(vals), 3)

    row = {
        "attack": attack.key, "finding": attack.finding, "title": attack.title,
        "rate": attack.rate, "runs": len(runs),
        "attack_mb": med("attack_mb"),
        "rtt_idle_ms": med("rtt_idle_ms"), "rtt_attack_ms": med("rtt_attack_ms"),
        "rtt_attack_p95_ms": med("rtt_attack_p95_ms"),
        "lost_probes": max(r["lost_probes"] for r in runs),
        "connect_tls_idle_s": worst("connect_tls_idle_s"),
        "connect_kcp_idle_s": worst("connect_kcp_idle_s"),
        "connect_tls_s": worst("connect_tls_worst_s"),
        "connect_kcp_s": worst("connect_kcp_worst_s"),
        "connect_tls_after_s": worst("connect_tls_after_s"),
        "connect_kcp_after_s": worst("connect_kcp_after_s"),
        "rss_idle_mb": med("rss_idle_mb"), "rss_max_mb": max(r["rss_max_mb"] for r in runs),
        "rss_after_mb": med("rss_after_mb"),
        "cpu_ms_per_mb": med("cpu_ms_per_mb"), "cpu_busy_pct": med("cpu_busy_pct"),
        "notes": sorted({r["generator"]["note"] for r in runs if r["generator"].get("note")}),
        "evidence": [r["evidence"] for r in runs],
    }
    for k in ("api_answered", "metrics_answered"):
        if k in runs[0]:
            row[k] = [r[k] for r in runs]
            row[k.replace("answered", "median_ms")] = med(k.replace("answered", "median_ms"))
    if attack.key == "superpacket":
        sent = statistics.median(r["generator"]["bytes"] for r in runs)
        got = statistics.median(r["generator"]["received_bytes"] for r in runs)
        row["delivered_mb"] = round(got / 1e6, 3)
        row["amplification"] = round(got / sent, 3) if sent else None
    row["targets"] = targets(row)
    return row


def targets(row: dict) -> dict[str, bool]:
    def within(v: float | None) -> bool:
        return v is not None and v <= CONNECT_LIMIT_S

    t = {
        "connect": within(row["connect_tls_s"]) and within(row["connect_kcp_s"]),
        "latency": (row["rtt_attack_ms"] is not None and row["rtt_idle_ms"] is not None
                    and row["rtt_attack_ms"] <= LATENCY_FACTOR * row["rtt_idle_ms"]),
        "rss_during": row["rss_max_mb"] < RSS_LIMIT_MB,
        "rss_after": (row["rss_idle_mb"] is not None
                      and row["rss_after_mb"] <= RSS_AFTER_FACTOR * row["rss_idle_mb"]),
    }
    if "api_answered" in row:
        t["operator"] = all(a.split("/")[0] == a.split("/")[1]
                            for a in row["api_answered"] + row["metrics_answered"])
    return t


def run_all(only: list[str] | None, runs: int, seconds: float,
            failed: list[dict]) -> list[dict]:
    import uvloop

    from polevpn.keygen import generate as keygen

    rows = []
    with tempfile.TemporaryDirectory(prefix="polevpn-attack-") as tmp:
        keys = keygen(Path(tmp) / "keys")
        for attack in ATTACKS:
            if only and attack.key not in only:
                continue
            results = []
            for n in range(runs):
                work = Path(tmp) / f"{attack.key}-{n}"
                work.mkdir()
                try:
                    r = uvloop.run(asyncio.wait_for(measure(attack, keys, work, seconds), 300))
                except (RuntimeError, OSError, TimeoutError, AssertionError, RouterRefused,
                        ssl.SSLError) as exc:
                    # one attack's run failing is a result too; the others still run
                    print(f"  {attack.key} run {n + 1} FAILED: {exc!r}", flush=True)
                    failed.append({"attack": attack.key, "run": n + 1, "error": repr(exc)})
                    continue
                results.append(r)
                print(f"  {attack.key} run {n + 1}: {brief(r)}", flush=True)
            if not results:
                continue
            row = combine(attack, results)
            row["run_results"] = results
            rows.append(row)
            met = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in row["targets"].items())
            print(f"{attack.key}: {met}", flush=True)
    return rows


def brief(r: dict) -> str:
    def s(v: Any) -> str:
        return "failed" if v is None else f"{v:.2f}"

    return (f"{r['attack_mb']} MB, rtt {s(r['rtt_idle_ms'])} -> {s(r['rtt_attack_ms'])} ms, "
            f"connect tls {s(r['connect_tls_worst_s'])} kcp {s(r['connect_kcp_worst_s'])} s "
            f"(after {s(r['connect_tls_after_s'])}/{s(r['connect_kcp_after_s'])}), rss "
            f"{r['rss_idle_mb']} / {r['rss_max_mb']} / {r['rss_after_mb']} MB, cpu "
            f"{r['cpu_busy_pct']}% ({s(r['cpu_ms_per_mb'])} ms/MB); generator {r['generator']}; "
            f"router {r['evidence']}")


# ==== the namespace =========================================================================


def in_namespace(argv: list[str]) -> int:
    """Run this script with ``argv`` in a new network namespace whose loopback has the
    attackers' IPv6 addresses; the namespace goes when it ends, also on failure."""
    ns = f"pvatk{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        batch = "".join(f"addr add {a}/128 dev lo nodad\n" for a in SLASH59)
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch.encode(), check=True)
        inner = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "--inner", *argv]
        )

        def forward(signum: int, frame: Any) -> None:
            inner.send_signal(signum)  # it stops its router and generator, then exits

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        return inner.wait()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


# ==== output ================================================================================


def _s(v: float | None) -> str:
    return "failed" if v is None else f"{v:.2f}"


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def before_lines(before: dict) -> list[str]:
    """The same attacks against another build's router (``--router``, e.g. the one before
    the fixes of issue 20), with the same probes and generators."""
    lines = [
        f"### Before the fixes: {before['label']}",
        "",
        f"{before['date']}, `{before['command']}`, median of {before['runs']} runs; the same "
        "generators and probes against that build's `polevpn-router`.",
        "",
        "| # | attack | connect tls / kcp s during | after | echo ms idle / during "
        "| VmRSS MB idle / max / after | router CPU ms/MB (busy) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in before["attacks"]:
        lines.append(
            f"| {r['finding']} | {r['title']} | {_s(r['connect_tls_s'])} / "
            f"{_s(r['connect_kcp_s'])} | {_s(r['connect_tls_after_s'])} / "
            f"{_s(r['connect_kcp_after_s'])} | {_s(r['rtt_idle_ms'])} / {_s(r['rtt_attack_ms'])} "
            f"| {r['rss_idle_mb']} / {r['rss_max_mb']} / {r['rss_after_mb']} "
            f"| {_n(r['cpu_ms_per_mb'])} ({r['cpu_busy_pct']}%) |"
        )
    extra = []
    for r in before["attacks"]:
        if "amplification" in r:
            extra.append(f"* {r['finding']} ({r['attack']}): {r['delivered_mb']} MB reached the "
                         f"plain gateway (x{r['amplification']} of what was sent).")
        if "api_answered" in r:
            extra.append(f"* {r['finding']} ({r['attack']}): the operator's API requests "
                         f"answered {', '.join(r['api_answered'])}, its /metrics scrapes "
                         f"{', '.join(r['metrics_answered'])}.")
        for n in r["notes"]:
            extra.append(f"* {r['finding']} ({r['attack']}): generator: {n}.")
    for f in before.get("failed_runs", []):
        extra.append(f"* run {f['run']} of {f['attack']} FAILED: {f['error']}")
    return [*lines, "", *extra] if extra else lines


def section(report: dict, before: dict | None = None) -> str:
    m = report["machine"]
    lines = [
        ATTACK_BEGIN,
        "## Under attack (issue 20): does a legitimate gateway still get through?",
        "",
        f"Written by `{report['command']}` (`tests/bench_attack.py`, also run by "
        "`make bench`), raw data under `attack` in `benchmarks.json`.",
        "",
        f"{report['date']}, {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, "
        f"Python {m['python']}, polevpn {report['git']}; median of {report['runs']} runs "
        "per attack (connect times: the worst of all runs; a connect that failed in any run "
        "is *failed*).",
        "",
        "Per run a fresh `polevpn-router` process in a network namespace of its own "
        "(tls:// and kcp:// on `[::]`, shared key and a `gateways` table, API and /metrics "
        "on 127.0.0.1, `auth_timeout` 5 s), two registered tls:// test gateways echoing a "
        f"packet every {PROBE_INTERVAL * 1000:.0f} ms through it, then the attack from a "
        f"generator process for up to {report['seconds']:g} s at the rate that broke the "
        "router in the attack run. While it runs, a gateway of the `gateways` table connects "
        "(TCP/DTLS, AUTH, REGISTER) over and over on tls:// and on kcp:// from another "
        "address; once more 1 s after the attack. VmRSS every 0.1 s from the attack's start "
        f"to {AFTER_SECONDS:g} s after its end (max), and at that end (after). Both the "
        "generator and the router share the "
        "machine's cores with the probes.",
        "",
        f"Targets: connect within {CONNECT_LIMIT_S:g} s on both transports during the "
        f"attack; echo round trip (median) within {LATENCY_FACTOR:g}x idle; VmRSS under "
        f"{RSS_LIMIT_MB:g} MB during and within {100 * (RSS_AFTER_FACTOR - 1):.0f}% of idle "
        "after. CPU ms/MB: the router's CPU milliseconds in the attack window per MB the generator "
        "sent; busy: the router's CPU in that window.",
        "",
        "| # | attack (rate) | MB sent | connect tls / kcp s (idle) | during | after "
        "| echo ms idle / during (p95) | VmRSS MB idle / max / after | router CPU ms/MB (busy) "
        "| connect | latency | RSS during | RSS after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for r in report["attacks"]:
        t = r["targets"]
        lines.append(
            f"| {r['finding']} | {r['title']} ({r['rate']}) | {r['attack_mb']} "
            f"| {_s(r['connect_tls_idle_s'])} / {_s(r['connect_kcp_idle_s'])} "
            f"| {_s(r['connect_tls_s'])} / {_s(r['connect_kcp_s'])} "
            f"| {_s(r['connect_tls_after_s'])} / {_s(r['connect_kcp_after_s'])} "
            f"| {_s(r['rtt_idle_ms'])} / {_s(r['rtt_attack_ms'])} ({_s(r['rtt_attack_p95_ms'])}) "
            f"| {r['rss_idle_mb']} / {r['rss_max_mb']} / {r['rss_after_mb']} "
            f"| {_n(r['cpu_ms_per_mb'])} ({r['cpu_busy_pct']}%) "
            f"| {_mark(t['connect'])} | {_mark(t['latency'])} | {_mark(t['rss_during'])} "
            f"| {_mark(t['rss_after'])} |"
        )
    lines.append("")
    extra = []
    for r in report["attacks"]:
        bits = []
        if "amplification" in r:
            bits.append(f"{r['delivered_mb']} MB reached the plain gateway (x{r['amplification']} "
                        "of what was sent; the attack run had x254)")
        if "api_answered" in r:
            bits.append(f"the operator's API requests answered {', '.join(r['api_answered'])} "
                        f"(median {_s(r.get('api_median_ms'))} ms), its /metrics scrapes "
                        f"{', '.join(r['metrics_answered'])} (median "
                        f"{_s(r.get('metrics_median_ms'))} ms): "
                        f"{_mark(r['targets']['operator'])}")
        if r["lost_probes"]:
            bits.append(f"up to {r['lost_probes']} echo probes lost (no answer in "
                        f"{PROBE_TIMEOUT:g} s)")
        bits += [f"generator: {n}" for n in r["notes"]]
        if r.get("evidence") and r["evidence"][0]:
            ev = r["evidence"][0]
            bits.append("router counters (run 1): "
                        + ", ".join(f"{k} {v}" for k, v in ev.items()))
        if bits:
            extra.append(f"* {r['finding']} ({r['attack']}): " + "; ".join(bits) + ".")
    lines += extra
    for f in report.get("failed_runs", []):
        lines.append(f"* run {f['run']} of {f['attack']} FAILED: {f['error']}")
    if report.get("notes"):
        lines += ["", *report["notes"]]
    if before:
        lines += ["", *before_lines(before)]
    lines += ["", ATTACK_END]
    return "\n".join(lines)


def with_attack_section(text: str, section_text: str | None = None,
                        path: Path | None = None) -> str:
    """``text`` with the attack section: ``section_text``, or the one in the file at
    ``path`` (what `make bench` keeps). It replaces the old one in place, or goes before
    the soak section, or at the end."""
    import soak

    if section_text is None:
        section_text = soak.marked_section(path, ATTACK_BEGIN, ATTACK_END)
        if section_text is None:
            return text
    replaced = soak.replace_marked(text, ATTACK_BEGIN, ATTACK_END, section_text)
    if replaced is not None:
        return replaced

    i = text.find(soak.SOAK_BEGIN)
    if i >= 0:
        return text[:i] + section_text + "\n\n" + text[i:]
    return text.rstrip("\n") + "\n\n" + section_text + "\n"


def write_docs(report: dict, before: bool = False) -> None:
    """``report`` as the attack entry of benchmarks.json (or, with ``before``, as the
    "attack_before" entry), and the section from both."""
    DOCS.mkdir(exist_ok=True)
    js = DOCS / "benchmarks.json"
    data = json.loads(js.read_text()) if js.exists() else {}
    data["attack_before" if before else "attack"] = report
    js.write_text(json.dumps(data, indent=2) + "\n")
    if not data.get("attack"):
        return
    md = DOCS / "benchmarks.md"
    old = md.read_text() if md.exists() else "# Benchmarks\n"
    md.write_text(with_attack_section(old, section(data["attack"], data.get("attack_before"))))


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: router, generator, temp dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=RUNS)
    ap.add_argument("--seconds", type=float, default=ATTACK_SECONDS)
    ap.add_argument("--only", type=lambda s: s.split(","), help=f"of {', '.join(BY_KEY)}")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--command", default="make attack", help="the command named in the docs")
    ap.add_argument("--note", action="append", default=[],
                    help="a paragraph for the docs section (repeatable)")
    ap.add_argument("--router", metavar="EXE",
                    help="another build's polevpn-router (e.g. from before the fixes); its "
                    "figures go to the section's 'before' table")
    ap.add_argument("--label", default="", help="what --router is (for the docs)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--generate", choices=sorted(GENERATORS), help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        return generate(args.generate, json.loads(args.target))
    if args.only and not set(args.only) <= BY_KEY.keys():
        ap.error(f"--only: unknown {sorted(set(args.only) - BY_KEY.keys())}")
    if not args.inner:
        if os.geteuid() != 0:
            print("bench_attack needs root (a network namespace)", file=sys.stderr)
            return 2
        return in_namespace(sys.argv[1:])
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _terminate)
    if args.router:
        import protoclient

        exe = str(Path(args.router).resolve())
        protoclient.topology.console_script = lambda name: exe  # type: ignore[assignment]
    failed: list[dict] = []
    rows = run_all(args.only, args.runs, args.seconds, failed)
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": args.command,
        "git": hostinfo.git_rev(),
        "machine": hostinfo.machine(),
        "runs": args.runs,
        "seconds": args.seconds,
        "label": args.label or args.router or "",
        "attacks": rows,
        "failed_runs": failed,
        "notes": args.note,
    }
    print("\n" + section(report) if not args.router else "\n".join(before_lines(report)))
    if not args.no_write:
        entry = "attack_before" if args.router else "attack"
        if args.only:  # keep the other attacks' rows from the last full run
            js = DOCS / "benchmarks.json"
            old = (json.loads(js.read_text()) if js.exists() else {}).get(entry) or {}
            mine = {r["attack"] for r in rows}
            kept = [r for r in old.get("attacks", []) if r["attack"] not in mine]
            order = {a.key: i for i, a in enumerate(ATTACKS)}
            report["attacks"] = sorted(kept + rows, key=lambda r: order[r["attack"]])
        write_docs(report, before=bool(args.router))
        print(f"wrote the attack section of {DOCS / 'benchmarks.md'} and benchmarks.json")
    print(f"attack bench wall time {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

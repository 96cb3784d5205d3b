"""A live router process takes 10,000 pieces of garbage and still carries real gateways.

The real ``polevpn-router`` runs as a child process on 127.0.0.1 (ports 0, read from its
log). Garbage goes at it from loopback sources the legitimate gateways never use, because
the router limits what one source address may do:

* 127.0.6.x: raw TCP bytes without TLS;
* 127.0.3.x: TLS, before AUTH: garbage and truncated frames, frames over the length limits,
  AUTH with junk JSON, other commands first;
* 127.0.4.x: TLS, after a good AUTH and REGISTER: random commands and bodies, garbage IP
  packets, then truncated headers and oversized lengths;
* 127.0.5.x: UDP to the kcp port: random bytes, truncated DTLS records, ClientHello-shaped
  records, real ClientHellos (with and without their cookie, then abandoned), and over
  completed DTLS handshakes, garbage KCP segments, FEC shards and frame streams.

Then the process must still be alive, a tls:// gateway (from 127.0.2.1) and a kcp:// one
(``kcp_transport.connect``, which binds no source address: 127.0.0.1, which no garbage
uses) must AUTH, REGISTER and exchange packets through it, and its log must hold no
traceback. Everything is bounded in count and time; the router is ended by its PID.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import uvloop

from polevpn.config import FecParams, KcpParams
from polevpn.io import kcp_transport
from polevpn.kcp import dtls
from polevpn.kcp.fec import MAGIC
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.keygen import generate
from polevpn.proto import messages, wire

TOTAL = 10_000  # garbage frames and datagrams, at least
N_PACKETS = 20  # legitimate packets each way afterwards
AUTH_TIMEOUT = 2.0
IO_TIMEOUT = 3.0

PRE_AUTH_SOURCES = [f"127.0.3.{i}" for i in range(1, 61)]
POST_AUTH_SOURCES = [f"127.0.4.{i}" for i in range(1, 21)]
UDP_SOURCES = [f"127.0.5.{i}" for i in range(1, 41)]
RAW_TCP_SOURCES = [f"127.0.6.{i}" for i in range(1, 41)]
LEGIT_TLS_SOURCES = ("127.0.2.1", "127.0.2.2")
KCP_PARAMS = KcpParams(fec=FecParams(mode="off"))
KCP_HEADER = struct.Struct("<IBBHIIII")  # conv cmd frg wnd ts sn una len


# ---- the router process -----------------------------------------------------------------


class RouterProcess:
    def __init__(self, workdir: Path, keys) -> None:
        self.log_path = workdir / "router.log"
        cfg = {
            "tls": {
                "listen": "127.0.0.1:0",
                "cert_file": str(keys.server_cert),
                "key_file": str(keys.server_key),
            },
            "kcp": {
                "listen": "127.0.0.1:0",
                "cert_file": str(keys.server_cert),
                "key_file": str(keys.server_key),
            },
            "key_file": str(keys.shared_key),
            "log_level": "info",
            "stats_interval": 1,
            "auth_timeout": AUTH_TIMEOUT,
            "idle_timeout": 30,
        }
        config = workdir / "router.json"
        config.write_text(json.dumps(cfg, indent=2))
        exe = Path(sys.executable).with_name("polevpn-router")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(exe), f"-configPath={config}"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.tls_port = self._port("tls")
        self.kcp_port = self._port("kcp")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _port(self, transport: str, timeout: float = 20.0) -> int:
        pattern = re.compile(rf"listening transport={transport} address=\S+ port=(\d+)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.log())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"router did not listen on {transport}:\n{self.log()[-3000:]}")

    def stats_lines(self) -> list[str]:
        return [ln for ln in self.log().splitlines() if " event=stats " in ln]

    def wait_stats_after(self, count: int, timeout: float = 10.0) -> str:
        """The first stats line logged after the ``count`` seen so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.stats_lines()
            if len(lines) > count:
                return lines[-1]
            time.sleep(0.1)
        raise AssertionError("no stats line")

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


# ---- garbage ------------------------------------------------------------------------------


def frame(cmd: int, body: bytes = b"", seq: int = 0) -> bytes:
    return struct.pack(">HHI", len(body) + 8, cmd, seq) + body


JUNK_JSON = [
    b'{"key":' + b"[" * 30000 + b"]" * 30000 + b"}",
    b'{"key":"\\ud800"}',
    b'{"key":' + b"9" * 5000 + b"}",
    b'{"key":1e999}',
    b'{"key":NaN,"features":' + json.dumps(["x"] * 2000).encode() + b"}",
    b'{"key":"wrong"}',
    b'{"key":null}',
    b"[]",
    b"null",
    b'"key"',
    b"\xff\xfe{}",
    '{"key":"x"}'.encode("utf-16"),
    b"{" * 100,
    b"",
    # a long non-ASCII value, quoted in the error reply (JSON escaping triples its size)
    json.dumps({"gateway": "\u00e9" * 30000, "key": "x"}, ensure_ascii=False).encode(),
    json.dumps(
        {"gateway": "169.254.9.9", "network": ["\u4e2d" * 20000]}, ensure_ascii=False
    ).encode(),
]


def junk_body(rnd: random.Random) -> bytes:
    if rnd.random() < 0.5:
        return rnd.choice(JUNK_JSON)
    if rnd.random() < 0.5:
        return rnd.randbytes(rnd.randrange(200))
    value = rnd.choice([{}, {"key": rnd.random()}, {"gateway": [1]}, {"network": {"a": 1}}])
    return json.dumps(value).encode()


def garbage_ip(rnd: random.Random) -> bytes:
    kind = rnd.randrange(4)
    if kind == 0:
        return rnd.randbytes(rnd.randrange(60))
    if kind == 1:  # IPv4 header, any destination (now and then another garbage gateway)
        dst = rnd.getrandbits(32) if rnd.random() < 0.7 else (198 << 24 | 18 << 16 | 100 << 8)
        return (
            b"\x45"
            + rnd.randbytes(11)
            + rnd.randbytes(4)
            + dst.to_bytes(4, "big")
            + (rnd.randbytes(rnd.randrange(100)))
        )
    if kind == 2:
        return b"\x60" + rnd.randbytes(39 + rnd.randrange(60))
    return bytes([rnd.randrange(16)]) + rnd.randbytes(rnd.randrange(120))  # virtio-net-ish


def fatal_item(rnd: random.Random) -> bytes:
    """Something that ends a connection: a short length, an oversized super-packet, a
    truncated frame (the peer closes after it), or a bad REGISTER body."""
    return rnd.choice(
        [
            struct.pack(">HHI", rnd.randrange(8), rnd.randrange(5), rnd.getrandbits(32)),
            struct.pack(
                ">HHI", 8, wire.SUPER_IPDATA, wire.MAX_SUPER_BODY + 1 + rnd.randrange(1 << 20)
            ),
            struct.pack(">HHI", 0xFFFF, wire.C2S_IPDATA, 0) + rnd.randbytes(rnd.randrange(2000)),
            struct.pack(">HHI", 8 + 100, wire.C2S_IPDATA, 0)[: rnd.randrange(1, 8)],
            frame(wire.REGISTER, junk_body(rnd)),
        ]
    )


class Tally(Counter):
    """Garbage items handed to a socket, by kind; keys starting with ``_`` count other
    things (refused connections, sessions established)."""

    def sent(self) -> int:
        return sum(v for k, v in self.items() if not k.startswith("_"))


def tcp(src: str, port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), IO_TIMEOUT, source_address=(src, 0))
    sock.settimeout(IO_TIMEOUT)
    return sock


TLS_CLIENT = ssl.create_default_context()
TLS_CLIENT.check_hostname = False
TLS_CLIENT.verify_mode = ssl.CERT_NONE


def tls(src: str, port: int) -> ssl.SSLSocket:
    return TLS_CLIENT.wrap_socket(tcp(src, port), server_hostname="polevpn-router")


@contextmanager
def counted(t: Tally, kind: str) -> Iterator[None]:
    """Failures of a garbage connection are expected (the router closes or refuses it)."""
    try:
        yield
    except (OSError, ssl.SSLError) as exc:
        t[f"_{kind}_{type(exc).__name__}"] += 1


def raw_tcp_job(seed: int, port: int) -> Tally:
    rnd, t = random.Random(seed), Tally()
    with counted(t, "raw"), tcp(rnd.choice(RAW_TCP_SOURCES), port) as s:
        for _ in range(rnd.randint(1, 3)):
            head = rnd.choice([b"", b"\x16\x03\x01", b"\x16\x03\x01\x02\x00\x01", b"GET / "])
            s.sendall(head + rnd.randbytes(rnd.randrange(1500)))
            t["raw_tcp"] += 1
    return t


def pre_auth_item(rnd: random.Random, kind: int) -> bytes:
    if kind == 0:
        return frame(wire.AUTH, junk_body(rnd), rnd.getrandbits(32))
    if kind == 1:  # anything but AUTH first
        return frame(rnd.randrange(1, 0x10000), rnd.randbytes(rnd.randrange(64)))
    if kind == 2:
        return rnd.randbytes(rnd.randrange(1, 300))
    if kind == 3:  # a truncated frame, then nothing more
        return frame(wire.AUTH, messages.encode_auth("123"))[: rnd.randrange(1, 20)]
    return fatal_item(rnd)


# what the first frame of a connection is, in turn: each junk AUTH body, then the rest
PRE_AUTH_FIRST = [frame(wire.AUTH, body) for body in JUNK_JSON]


def pre_auth_job(index: int, port: int) -> Tally:
    rnd, t = random.Random(index), Tally()
    with counted(t, "pre"), tls(PRE_AUTH_SOURCES[index % len(PRE_AUTH_SOURCES)], port) as s:
        if index < len(PRE_AUTH_FIRST):
            s.sendall(PRE_AUTH_FIRST[index])
            t["pre_auth"] += 1
        for _ in range(rnd.randint(1, 4)):
            s.sendall(pre_auth_item(rnd, rnd.randrange(6)))
            t["pre_auth"] += 1
    return t


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def login(s: socket.socket, key: str, gateway: str, networks: list[str], super_: bool) -> None:
    s.sendall(
        frame(
            wire.AUTH,
            messages.encode_auth(key, frozenset({"super-packets"}) if super_ else frozenset()),
        )
    )
    length, cmd, _ = struct.unpack(">HHI", recv_exact(s, 8))
    assert cmd == wire.AUTH
    assert messages.parse_reply(recv_exact(s, length - 8)).error is None
    s.sendall(frame(wire.REGISTER, messages.encode_register(gateway, key, networks), 1))
    length, cmd, _ = struct.unpack(">HHI", recv_exact(s, 8))
    assert cmd == wire.REGISTER
    reply = messages.parse_reply(recv_exact(s, length - 8))
    assert reply.error is None, reply.error


def post_auth_job(index: int, port: int, key: str, items: int) -> Tally:
    rnd, t = random.Random(1000 + index), Tally()
    with counted(t, "post"), tls(POST_AUTH_SOURCES[index], port) as s:
        net = f"198.18.{100 + index}.0/24"
        login(s, key, f"169.254.4.{index + 1}", [net], super_=index % 2 == 0)
        t["_logged_in"] += 1
        s.settimeout(0.0)  # never wait on the router's answers; read and drop them
        for _ in range(items):
            kind = rnd.randrange(8)
            if kind <= 2:
                item = frame(wire.C2S_IPDATA, garbage_ip(rnd), rnd.getrandbits(32))
            elif kind == 3:
                body = garbage_ip(rnd)
                item = struct.pack(">HHI", 8, wire.SUPER_IPDATA, len(body)) + body
            elif kind == 4:
                item = frame(wire.HEART_BEAT, b"", rnd.getrandbits(32))
            elif kind == 5:
                cmd = rnd.choice([wire.AUTH, wire.S2C_IPDATA, *range(5, 16), 17, 0xFFFF])
                item = frame(cmd, junk_body(rnd)[:2000], rnd.getrandbits(32))
            else:
                item = frame(rnd.randrange(5, 0x10000), rnd.randbytes(rnd.randrange(300)))
            s.settimeout(IO_TIMEOUT)
            s.sendall(item)
            s.settimeout(0.0)
            t["post_auth"] += 1
            with suppress(BlockingIOError, ssl.SSLWantReadError):
                s.recv(65536)
        s.settimeout(IO_TIMEOUT)
        # each junk REGISTER body once, then the other ways to end a connection
        last = JUNK_JSON[index] if index < len(JUNK_JSON) else None
        s.sendall(fatal_item(rnd) if last is None else frame(wire.REGISTER, last))
        t["post_auth"] += 1
    return t


# -- UDP


def dtls_record(ctype: int, epoch: int, seq: int, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (
        struct.pack(">BHH", ctype, 0xFEFD, epoch)
        + seq.to_bytes(6, "big")
        + struct.pack(">H", n)
        + body
    )


def hello_like(rnd: random.Random) -> bytes:
    body = rnd.randbytes(rnd.randrange(200))
    hs = (
        bytes([1])
        + len(body).to_bytes(3, "big")
        + rnd.randbytes(2)
        + bytes(3)
        + len(body).to_bytes(3, "big")
        + body
    )
    return dtls_record(22, 0, rnd.getrandbits(48), hs)


def dtls_client() -> dtls.DtlsSession:
    verify = dtls.Verification(insecure=True)
    return dtls.DtlsSession.client(dtls.client_context(verify), verify, 1400, time.monotonic())


def udp(src: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    s.settimeout(IO_TIMEOUT)
    return s


def udp_job(seed: int, port: int, count: int) -> Tally:
    rnd, t = random.Random(seed), Tally()
    hellos = [d for _ in range(2) for d in dtls_client().step(0.0)]
    socks = [udp(src, port) for src in rnd.sample(UDP_SOURCES, 4)]
    try:
        for _ in range(count):
            s = rnd.choice(socks)
            kind = rnd.randrange(6)
            if kind == 0:
                d = rnd.randbytes(rnd.randrange(1401))
            elif kind == 1:  # a record whose length runs past the datagram
                body = rnd.randbytes(rnd.randrange(100))
                d = dtls_record(
                    rnd.choice([20, 21, 22, 23]),
                    rnd.randrange(3),
                    0,
                    body,
                    len(body) + 1 + rnd.randrange(500),
                )
            elif kind == 2:
                d = hello_like(rnd)
            elif kind == 3:
                d = rnd.choice(hellos)  # a real ClientHello: a HelloVerifyRequest comes back
            elif kind == 4:
                h = bytearray(rnd.choice(hellos))
                h[rnd.randrange(len(h))] = rnd.randrange(256)
                d = bytes(h[: rnd.randrange(1, len(h) + 1)])
            else:
                d = b"\x16\xfe\xfd" + rnd.randbytes(rnd.randrange(20))
            with counted(t, "udp"):
                s.send(d)
                t["udp"] += 1
    finally:
        for s in socks:
            s.close()
    return t


def dtls_handshake(
    src: str, port: int, cookie_only: bool = False
) -> tuple[socket.socket, dtls.DtlsSession]:
    """A real DTLS client over a blocking socket; ``cookie_only`` stops once the router has
    taken the cookie (it now holds a half-open handshake, which the client abandons)."""
    s = udp(src, port)
    client = dtls_client()
    for d in client.step(time.monotonic()):
        s.send(d)
    flights = 0
    deadline = time.monotonic() + 5
    while not client.established and not client.closed and time.monotonic() < deadline:
        try:
            d = s.recv(65536)
        except TimeoutError:
            out = client.handle_timeout(time.monotonic())
        else:
            _, out = client.receive(d, time.monotonic())
            flights += 1
        for o in out:
            s.send(o)
        if cookie_only and flights >= 1:
            break
    return s, client


def kcp_segment(rnd: random.Random, sn: int, data: bytes, cmd: int = 81, frg: int = 0) -> bytes:
    return KCP_HEADER.pack(0, cmd, frg, 512, rnd.getrandbits(32), sn, 0, len(data)) + data


def kcp_shaped(rnd: random.Random) -> bytes:
    """A conversation-0 segment with any command and fields, except sequence number 0,
    so the stream stays stalled (and the session open) while the garbage goes in."""
    cmd, frg, wnd = rnd.randrange(80, 86), rnd.randrange(256), rnd.randrange(1 << 16)
    ts, una = rnd.getrandbits(32), rnd.choice([0, rnd.randrange(64), rnd.getrandbits(32)])
    sn = rnd.choice([rnd.randrange(1, 64), rnd.randrange(1, 1 << 32)])
    data = rnd.randbytes(rnd.randrange(300))
    length = rnd.choice([len(data), rnd.randrange(1 << 16)])
    return KCP_HEADER.pack(0, cmd, frg, wnd, ts, sn, una, length) + data


def fec_shaped(rnd: random.Random) -> bytes:
    kind_index, seq, gid = rnd.randrange(256), rnd.getrandbits(32), rnd.getrandbits(32)
    k, m = rnd.choice([0, rnd.randrange(65), rnd.randrange(256)]), rnd.randrange(65)
    if kind_index < 64 and rnd.random() < 0.5:  # a well-formed data shard
        payload = kcp_shaped(rnd)
        body = struct.pack(">H", len(payload)) + payload
        return struct.pack(">BBIIBB", MAGIC, kind_index, seq, gid, 0, m) + body
    body = rnd.randbytes(rnd.randrange(300))
    return struct.pack(">BBIIBB", MAGIC, kind_index, seq, gid, k, m) + body


def encrypted_garbage_job(index: int, port: int, count: int) -> Tally:
    """Garbage inside a real DTLS association, for the router's KCP and FEC layers, and at
    the end a garbage frame stream for its session."""
    rnd, t = random.Random(5000 + index), Tally()
    s, client = dtls_handshake(UDP_SOURCES[-1 - index], port)
    with counted(t, "dtls"), s:
        if not client.established:
            t["_dtls_not_established"] += 1
            return t
        t["_dtls_sessions"] += 1
        items = [
            rnd.choice([rnd.randbytes(rnd.randrange(1, 1300)), kcp_shaped(rnd), fec_shaped(rnd)])
            for _ in range(count)
        ]
        stream = b"".join(
            frame(rnd.randrange(0, 20), junk_body(rnd)[:500]) for _ in range(5)
        ) + rnd.randbytes(100)
        items += [kcp_segment(rnd, sn, stream[sn * 200 : sn * 200 + 200]) for sn in range(4)]
        for plain in items:
            d = client.send(plain)
            if d is not None:
                s.send(bytes(d))
                t["dtls_garbage"] += 1
    return t


def half_open_job(index: int, port: int) -> Tally:
    t = Tally()
    with counted(t, "half"):
        s, _ = dtls_handshake(UDP_SOURCES[index], port, cookie_only=True)
        s.close()
        t["udp_half_open"] += 1
    return t


# ---- the legitimate gateways ----------------------------------------------------------------


def ipv4_udp(src: str, dst: str, seq: int) -> bytes:
    payload = b"legit" + seq.to_bytes(4, "big") + bytes(23)
    total = 20 + 8 + len(payload)
    ip = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        total,
        seq,
        0,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return ip + struct.pack(">HHHH", 40000, 9, 8 + len(payload), 0) + payload


class Gateway:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> tuple[int, bytes]:
        length, cmd, _ = struct.unpack(
            ">HHI", await asyncio.wait_for(self.reader.readexactly(8), timeout)
        )
        return cmd, await asyncio.wait_for(self.reader.readexactly(length - 8), timeout)

    async def login(self, key: str, gateway: str, networks: list[str]) -> None:
        await self.send(frame(wire.AUTH, messages.encode_auth(key)))
        cmd, body = await self.recv()
        assert cmd == wire.AUTH and messages.parse_reply(body).error is None, body
        await self.send(frame(wire.REGISTER, messages.encode_register(gateway, key, networks), 3))
        cmd, body = await self.recv()
        assert cmd == wire.REGISTER and messages.parse_reply(body).error is None, body


async def tls_gateway(port: int, source: str) -> Gateway:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        port,
        ssl=TLS_CLIENT,
        server_hostname="polevpn-router",
        local_addr=(source, 0),
    )
    return Gateway(reader, writer)


async def kcp_gateway(port: int) -> Gateway:
    reader = asyncio.StreamReader()
    proto = asyncio.StreamReaderProtocol(reader)
    verify = dtls.Verification(insecure=True)
    transport = await kcp_transport.connect(
        proto, "127.0.0.1", port, dtls.client_context(verify), verify, KCP_PARAMS, KcpPool(), 5
    )
    loop = asyncio.get_running_loop()
    return Gateway(reader, asyncio.StreamWriter(transport, proto, reader, loop))  # type: ignore[arg-type]


async def exchange(gateways: list[Gateway], count: int) -> dict[str, int]:
    """``count`` packets from each gateway to the next (in a ring), each waited for."""
    delivered: dict[str, int] = {}
    for i, src in enumerate(gateways):
        j = (i + 1) % len(gateways)
        dst = gateways[j]
        name = f"{i}->{j}"
        delivered[name] = 0
        for seq in range(count):
            pkt = ipv4_udp(f"198.18.{i + 1}.7", f"198.18.{j + 1}.7", seq)
            await src.send(frame(wire.C2S_IPDATA, pkt))
            try:
                cmd, body = await dst.recv()
            except (TimeoutError, asyncio.IncompleteReadError):
                continue
            delivered[name] += cmd == wire.S2C_IPDATA and body == pkt
    return delivered


async def flood_scenario(router: RouterProcess, key: str) -> tuple[Tally, dict[str, int]]:
    """Gateways 0 (tls) and 1 (kcp) log in before the flood and must ride it out; 2 (tls)
    and 3 (kcp) log in after it, once what the garbage left pending has timed out."""
    tp, kp = router.tls_port, router.kcp_port
    before = [await tls_gateway(tp, LEGIT_TLS_SOURCES[0]), await kcp_gateway(kp)]
    for i, gw in enumerate(before):
        await gw.login(key, f"169.254.2.{i + 1}", [f"198.18.{i + 1}.0/24"])
    loop = asyncio.get_running_loop()
    tally = await loop.run_in_executor(None, flood, tp, kp, key)
    assert router.proc.poll() is None, f"router died:\n{router.log()[-3000:]}"
    await asyncio.sleep(AUTH_TIMEOUT + 0.5)
    after = [await tls_gateway(tp, LEGIT_TLS_SOURCES[1]), await kcp_gateway(kp)]
    for i, gw in enumerate(after, start=len(before)):
        await gw.login(key, f"169.254.2.{i + 1}", [f"198.18.{i + 1}.0/24"])
    gateways = before + after
    delivered = await exchange(gateways, N_PACKETS)
    for gw in gateways:
        gw.writer.close()
    return tally, delivered


# ---- the test ---------------------------------------------------------------------------------


def run_jobs(jobs: list[Callable[[], Tally]], workers: int = 6) -> Tally:
    total = Tally()
    with ThreadPoolExecutor(workers) as pool:
        for t in pool.map(lambda job: job(), jobs):
            total.update(t)
    return total


def flood(tls_port: int, kcp_port: int, key: str) -> Tally:
    tp, kp = tls_port, kcp_port
    tally = Tally()
    tally.update(run_jobs([lambda i=i: raw_tcp_job(i, tp) for i in range(150)]))
    tally.update(run_jobs([lambda i=i: pre_auth_job(i, tp) for i in range(250)]))
    posts = [lambda i=i: post_auth_job(i, tp, key, 240) for i in range(len(POST_AUTH_SOURCES))]
    tally.update(run_jobs(posts))
    tally.update(run_jobs([lambda i=i: udp_job(i, kp, 550) for i in range(8)]))
    tally.update(run_jobs([lambda i=i: half_open_job(i, kp) for i in range(10)]))
    dtls_jobs = [lambda i=i: encrypted_garbage_job(i, kp, 150) for i in range(4)]
    tally.update(run_jobs(dtls_jobs, workers=4))
    return tally


RSS_LIMIT_KB = 120 * 1024


def test_garbage_flood_leaves_the_router_working(tmp_path: Path) -> None:
    keys = generate(tmp_path / "keys")
    key = keys.shared_key.read_text().strip()
    started = time.monotonic()
    router = RouterProcess(tmp_path, keys)
    try:
        tally, delivered = uvloop.run(asyncio.wait_for(flood_scenario(router, key), 90))
        sent = tally.sent()
        print(f"\ngarbage sent: {sent} {dict(sorted(tally.items()))}")
        print(f"legitimate packets delivered (of {N_PACKETS} each): {delivered}")
        assert sent >= TOTAL, tally
        assert tally["_logged_in"] == len(POST_AUTH_SOURCES), "post-AUTH garbage never got in"
        assert tally["_dtls_sessions"] >= 3, "the DTLS garbage sessions were not established"
        assert delivered == {f"{i}->{(i + 1) % 4}": N_PACKETS for i in range(4)}
        assert router.proc.poll() is None
        stats = router.wait_stats_after(len(router.stats_lines()))
        print(f"router {stats.split(' event=stats ', 1)[1]}")
        rss = router.rss_kb()
        print(f"router RSS {rss} kB; whole test {time.monotonic() - started:.1f}s")
        # measured 55 MB after the flood (42 MB idle): bounded queues, no garbage kept
        assert rss < RSS_LIMIT_KB, f"router RSS {rss} kB after the flood"
        # what the flood left pending has been closed or timed out: no slot leaks
        assert "pending=0" in stats, stats
        log = router.log()
        for bad in ("Traceback", "internal error"):
            if bad in log:
                lines = log[log.index(bad) - 300 :].splitlines()[:40]
                excerpt = "\n".join(ln[:300] for ln in lines)
                raise AssertionError(f"{bad!r} in the router log:\n{excerpt}")
    finally:
        router.stop()

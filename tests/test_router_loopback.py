"""A real router on loopback, driven by protocol-level test gateways (no root, no TUN).

The router runs in-process on the test's event loop so its counters can be inspected; the
gateways are plain TLS clients speaking the wire protocol byte for byte.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import ssl
import struct
from pathlib import Path

import pytest
import uvloop

from polevpn.cli import RouterDaemon
from polevpn.config import FecParams, KcpParams, Listener, RouterConfig
from polevpn.io import kcp_transport
from polevpn.kcp import dtls
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.keygen import generate
from polevpn.packet import gso
from polevpn.proto import wire
from polevpn.router.router import Router

KEY = "123456"

# Which transport ProtoGateway.connect uses; "mixed" alternates kcp and tls, so forwarding
# between the two is exercised by every multi-gateway test.
_transport = {"mode": "tls", "count": 0}
KCP_PARAMS = KcpParams(fec=FecParams(mode="off"))


@pytest.fixture(autouse=True, params=["tls", "kcp", "mixed"])
def transport(request: pytest.FixtureRequest) -> str:
    _transport["mode"] = request.param
    _transport["count"] = 0
    return request.param


def _next_transport() -> str:
    mode = _transport["mode"]
    _transport["count"] += 1
    if mode == "mixed":
        return "kcp" if _transport["count"] % 2 else "tls"
    return mode


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("keys"))


def router_config(keys, **overrides) -> RouterConfig:
    listener = Listener(True, "127.0.0.1", 0, keys.server_cert, keys.server_key)
    args = dict(
        path=Path("test.json"),
        tls=listener,
        kcp=listener,
        key=KEY,
        stats_interval=0,
        kcp_params=KCP_PARAMS,
    )
    args.update(overrides)
    return RouterConfig(**args)


def frame(cmd: int, body: bytes = b"", seq: int = 0) -> bytes:
    return struct.pack(">HHI", len(body) + 8, cmd, seq) + body


def ipv4_packet(src: str, dst: str, payload: bytes = b"x" * 32) -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return hdr + payload


def ipv6_packet(src: str, dst: str, payload: bytes = b"y" * 16) -> bytes:
    hdr = struct.pack(
        ">IHBB16s16s",
        6 << 28,
        len(payload),
        17,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return hdr + payload


class ProtoGateway:
    """A protocol-level gateway: TLS client, frames in and out, no TUN."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, router: Router) -> ProtoGateway:
        if _next_transport() == "kcp":
            return await cls.connect_kcp(router)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", router.tls_port, ssl=ctx, server_hostname="polevpn.com"
        )
        return cls(reader, writer)

    @classmethod
    async def connect_kcp(
        cls,
        router: Router,
        host: str = "127.0.0.1",
        verify: dtls.Verification | None = None,
    ) -> ProtoGateway:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        proto = asyncio.StreamReaderProtocol(reader)
        verify = verify or dtls.Verification(insecure=True)
        transport = await kcp_transport.connect(
            proto,
            host,
            router.kcp_port,
            dtls.client_context(verify),
            verify,
            KCP_PARAMS,
            KcpPool(),
            timeout=5,
        )
        writer = asyncio.StreamWriter(transport, proto, reader, loop)  # type: ignore[arg-type]
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv_frame(self, timeout: float = 3.0) -> tuple[int, int, bytes]:
        hdr = await asyncio.wait_for(self.reader.readexactly(8), timeout)
        length, cmd, seq = struct.unpack(">HHI", hdr)
        body = await asyncio.wait_for(self.reader.readexactly(length - 8), timeout)
        return cmd, seq, body

    async def login(
        self,
        gateway: str,
        networks: list[str],
        key: str = KEY,
        features: list[str] | None = None,
        link: dict | None = None,
    ) -> bytes:
        """AUTH (offering ``features``) and REGISTER (with ``link``, if given); returns the
        AUTH reply's body."""
        auth: dict = {"key": key}
        if features is not None:
            auth["features"] = features
        await self.send(frame(0, json.dumps(auth).encode()))
        cmd, seq, reply = await self.recv_frame()
        assert (cmd, seq) == (0, 0)
        if features is None:
            assert reply == b"{}"
        register: dict = {"gateway": gateway, "key": key, "network": networks}
        if link is not None:
            register["link"] = link
        await self.send(frame(1, json.dumps(register).encode(), 7))
        assert await self.recv_frame() == (1, 7, b"{}")
        return reply

    async def recv_any(self, timeout: float = 3.0) -> tuple[int, bytes]:
        """(command, body) of the next frame, SUPER_IPDATA's 32-bit length included."""
        hdr = await asyncio.wait_for(self.reader.readexactly(8), timeout)
        length, cmd, seq = struct.unpack(">HHI", hdr)
        n = seq if cmd == 16 and length == 8 else length - 8
        return cmd, await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def closed_by_peer(self, timeout: float = 3.0) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except (ConnectionError, ssl.SSLError):
            return True
        while data:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
            except (ConnectionError, ssl.SSLError):
                return True
        return True

    def close(self) -> None:
        self.writer.close()


async def started(cfg: RouterConfig) -> Router:
    router = Router(cfg)
    await router.start()
    return router


async def started_ops(cfg: RouterConfig) -> tuple[Router, RouterDaemon]:
    """The router with its ops servers (/metrics, the API), wired as polevpn-router does;
    ``router.stop()`` closes them too."""
    daemon = RouterDaemon(cfg)
    await daemon.start()
    return daemon.router, daemon


def run(coro):
    # the daemons run on uvloop, whose transports differ from asyncio's in buffering and SSL
    return uvloop.run(asyncio.wait_for(coro, 30))


def test_go_gateway_auth_and_register_bytes(keys):
    """The exact bytes the Go gateway sends are accepted and answered as Go's router does."""

    async def scenario():
        router = await started(router_config(keys))
        gw = await ProtoGateway.connect(router)
        auth = bytes.fromhex("0018000000000000") + b'{"key":"123456"}'
        await gw.send(auth)
        hdr = await gw.reader.readexactly(10)
        assert hdr == bytes.fromhex("000a000000000000") + b"{}"
        register = bytes.fromhex("004d000100000000") + (
            b'{"gateway":"169.254.0.1","key":"123456","network":["198.18.10.0/24"]}'
        )
        assert len(register) == 0x4D
        await gw.send(register)
        assert await gw.reader.readexactly(10) == bytes.fromhex("000a000100000000") + b"{}"
        # heartbeat: an empty frame, echoed as is with its sequence
        await gw.send(bytes.fromhex("0008000400000005"))
        assert await gw.reader.readexactly(8) == bytes.fromhex("0008000400000005")
        routes = {str(n) for n, _ in router.routes.routes()}
        assert routes == {"169.254.0.1/32", "198.18.10.0/24"}
        gw.close()
        await router.stop()

    run(scenario())


def test_wrong_key_gets_error_and_close(keys, caplog):
    async def scenario():
        router = await started(router_config(keys))
        gw = await ProtoGateway.connect(router)
        await gw.send(frame(0, b'{"key":"wrong"}', 3))
        cmd, seq, body = await gw.recv_frame()
        assert (cmd, seq) == (0, 3)
        assert json.loads(body) == {"error": "invalid key"}
        assert await gw.closed_by_peer()
        assert router.stats.auth_failures == 1
        await router.stop()

    with caplog.at_level("WARNING", logger="polevpn.router"):
        run(scenario())
    assert any(
        'msg="auth rejected"' in ln and 'reason="invalid key"' in ln
        for ln in caplog.text.splitlines()
    )
    assert "wrong" not in caplog.text, "the rejected key must not be logged"


def test_frames_before_auth_and_malformed_frames_close_only_that_connection(keys):
    async def scenario():
        router = await started(router_config(keys))
        a = await ProtoGateway.connect(router)
        b = await ProtoGateway.connect(router)
        await a.login("169.254.0.1", ["198.18.10.0/24"])
        await b.login("169.254.0.2", ["198.18.20.0/24"])
        bad1 = await ProtoGateway.connect(router)
        await bad1.send(frame(1, b'{"gateway":"169.254.0.9","key":"123456"}'))
        assert await bad1.closed_by_peer()
        bad2 = await ProtoGateway.connect(router)
        await bad2.login("169.254.0.3", [])
        await bad2.send(b"\x00\x03\x00\x03\x00\x00\x00\x00garbage")
        assert await bad2.closed_by_peer()
        bad3 = await ProtoGateway.connect(router)
        await bad3.send(frame(0, b"not json"))
        assert await bad3.closed_by_peer()
        # the good gateways still pass traffic both ways
        await a.send(frame(3, ipv4_packet("198.18.10.2", "198.18.20.2")))
        cmd, _, body = await b.recv_frame()
        assert cmd == 2 and body == ipv4_packet("198.18.10.2", "198.18.20.2")
        await b.send(frame(3, ipv4_packet("198.18.20.2", "198.18.10.2")))
        cmd, _, body = await a.recv_frame()
        assert cmd == 2 and body[16:20] == ipaddress.IPv4Address("198.18.10.2").packed
        assert router.stats.malformed_frames >= 2
        await router.stop()

    run(scenario())


def test_longest_prefix_forwarding_v4_v6_and_default(keys):
    async def scenario():
        router = await started(router_config(keys))
        wide = await ProtoGateway.connect(router)
        narrow = await ProtoGateway.connect(router)
        default = await ProtoGateway.connect(router)
        await wide.login("169.254.0.1", ["198.18.0.0/15", "2001:db8::/33"])
        await narrow.login("169.254.0.2", ["198.18.20.0/24", "2001:db8:20::/64"])
        await default.login("169.254.0.3", ["0.0.0.0/0", "::/0"])

        async def expect(sender, pkt, receiver):
            await sender.send(frame(3, pkt))
            cmd, _, body = await receiver.recv_frame()
            assert (cmd, body) == (2, pkt)

        # registered in the order wide, narrow: the narrower prefix still wins
        await expect(default, ipv4_packet("169.254.77.1", "198.18.20.7"), narrow)
        await expect(default, ipv4_packet("169.254.77.1", "198.18.21.7"), wide)
        await expect(narrow, ipv4_packet("198.18.20.7", "169.254.99.9"), default)
        await expect(default, ipv4_packet("169.254.77.1", "169.254.0.2"), narrow)
        await expect(default, ipv6_packet("2001:db8:ff::1", "2001:db8:20::5"), narrow)
        await expect(default, ipv6_packet("2001:db8:ff::1", "2001:db8:21::5"), wide)
        await expect(wide, ipv6_packet("2001:db8:ff::1", "2001:db8:8000::1"), default)
        await router.stop()

    run(scenario())


def test_no_route_dropped_and_counted(keys):
    async def scenario():
        router = await started(router_config(keys))
        a = await ProtoGateway.connect(router)
        await a.login("169.254.0.1", ["198.18.10.0/24"])
        await a.send(frame(3, ipv4_packet("198.18.10.2", "198.18.99.1")))
        await a.send(frame(3, ipv4_packet("198.18.10.2", "198.18.10.9")))  # back to itself
        await a.send(frame(3, b"\x45short"))
        for _ in range(50):
            if router.stats.dropped_no_route and router.stats.dropped_hairpin:
                break
            await asyncio.sleep(0.02)
        assert router.stats.dropped_no_route == 1
        assert router.stats.dropped_hairpin == 1
        assert router.stats.dropped_malformed == 1
        await router.stop()

    run(scenario())


def test_reregister_replaces_old_connection(keys):
    async def scenario():
        router = await started(router_config(keys))
        old = await ProtoGateway.connect(router)
        other = await ProtoGateway.connect(router)
        await old.login("169.254.0.1", ["198.18.10.0/24"])
        await other.login("169.254.0.2", ["198.18.20.0/24"])
        new = await ProtoGateway.connect(router)
        await new.login("169.254.0.1", ["198.18.11.0/24"])
        assert await old.closed_by_peer()
        await other.send(frame(3, ipv4_packet("198.18.20.2", "198.18.11.5")))
        cmd, _, body = await new.recv_frame()
        assert cmd == 2
        routes = {str(n) for n, _ in router.routes.routes()}
        assert "198.18.10.0/24" not in routes and "198.18.11.0/24" in routes
        assert router.stats.replaced == 1
        await router.stop()

    run(scenario())


def test_idle_and_auth_timeouts(keys):
    async def scenario():
        router = await started(router_config(keys, idle_timeout=0.6, auth_timeout=0.4))
        silent = await ProtoGateway.connect(router)  # never authenticates
        idle = await ProtoGateway.connect(router)
        await idle.login("169.254.0.1", ["198.18.10.0/24"])
        alive = await ProtoGateway.connect(router)
        await alive.login("169.254.0.2", ["198.18.20.0/24"])
        loop = asyncio.get_running_loop()
        start = loop.time()
        idle_closed = asyncio.create_task(idle.closed_by_peer(5))
        while loop.time() - start < 1.5:
            await alive.send(frame(4))
            assert (await alive.recv_frame())[0] == 4
            await asyncio.sleep(0.2)
        assert await silent.closed_by_peer(3)
        assert await idle_closed
        assert {str(n) for n, _ in router.routes.routes()} == {"169.254.0.2/32", "198.18.20.0/24"}
        assert router.stats.auth_timeouts == 1, router.stats
        assert router.stats.idle_timeouts == 1, router.stats
        await router.stop()

    run(scenario())


def test_slow_gateway_does_not_stall_others(keys):
    """A gateway that stops reading loses its own packets; the others keep flowing."""

    async def scenario():
        router = await started(router_config(keys, send_queue_bytes=65536))
        src = await ProtoGateway.connect(router)
        slow = await ProtoGateway.connect(router)
        fast = await ProtoGateway.connect(router)
        await src.login("169.254.0.1", ["198.18.10.0/24"])
        await slow.login("169.254.0.2", ["198.18.20.0/24"])
        await fast.login("169.254.0.3", ["198.18.30.0/24"])
        to_slow = frame(3, ipv4_packet("198.18.10.2", "198.18.20.2", b"z" * 1300))
        # far more than the socket buffers and the router's queue can hold
        for _ in range(200):
            await src.send(to_slow * 100)
        to_fast = ipv4_packet("198.18.10.2", "198.18.30.2")
        await src.send(frame(3, to_fast))
        cmd, _, body = await fast.recv_frame(5)
        assert (cmd, body) == (2, to_fast)
        assert router.stats.dropped_queue_full > 0
        await router.stop()

    run(scenario())


def test_router_listens_on_ipv6(keys, transport):
    if transport != "tls":
        pytest.skip("the tls listener only; kcp over IPv6 has its own test")

    async def scenario():
        listener = Listener(True, "::1", 0, keys.server_cert, keys.server_key)
        router = await started(router_config(keys, tls=listener))
        assert router.listen_sockets[0].family.name == "AF_INET6"
        ctx = ssl.create_default_context(cafile=str(keys.ca_cert))
        reader, writer = await asyncio.open_connection(
            "::1", router.tls_port, ssl=ctx, server_hostname="polevpn-router"
        )
        gw = ProtoGateway(reader, writer)
        await gw.login("169.254.0.1", ["2001:db8:10::/64"])
        assert {str(n) for n, _ in router.routes.routes()} == {
            "169.254.0.1/32",
            "2001:db8:10::/64",
        }
        gw.close()
        await router.stop()

    run(scenario())


def test_kcp_over_ipv6(keys, transport):
    if transport != "kcp":
        pytest.skip("one run is enough")

    async def scenario():
        listener = Listener(True, "::1", 0, keys.server_cert, keys.server_key)
        router = await started(router_config(keys, kcp=listener))
        verify = dtls.Verification(ca_file=keys.ca_cert, server_name="polevpn-router")
        gw = await ProtoGateway.connect_kcp(router, "::1", verify)
        await gw.login("169.254.0.1", ["2001:db8:10::/64"])
        (conn,) = router.connections
        assert conn.transport_name == "kcp" and conn.peer.startswith("[::1]:")
        gw.close()
        await router.stop()

    run(scenario())


# ---- super-packets ----------------------------------------------------------------------

SUPER = ["super-packets"]


def tcp_super_packet(src: str, dst: str, payload: bytes, mss: int) -> bytes:
    """Virtio-net header + IPv4/TCP packet as a TUN with TSO reads it: partial checksum."""
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 0, 0x1234, 0x4000, 64, 6, 0, s, d)
    tcp_len = 20 + len(payload)
    pseudo = gso.internet_checksum(s + d + struct.pack(">BBH", 0, 6, tcp_len))
    tcp = struct.pack(">HHIIBBHHH", 40000, 5201, 1000, 1, 5 << 4, 0x18, 512, pseudo, 0)
    vnet = gso.VNET_HDR.pack(gso.F_NEEDS_CSUM, gso.GSO_TCPV4, 40, mss, 20, 16)
    return vnet + ip + tcp + payload


def test_super_packets_whole_to_a_negotiated_gateway_cut_for_a_plain_one(keys):
    payload = bytes(range(256)) * 40  # 10240 bytes: 8 segments of 1360, the last shorter
    sp = tcp_super_packet("198.18.10.2", "198.18.20.2", payload, 1360)
    sp_plain = tcp_super_packet("198.18.10.2", "198.18.30.2", payload, 1360)

    async def scenario():
        router = await started(router_config(keys))
        a = await ProtoGateway.connect(router)
        b = await ProtoGateway.connect(router)
        plain = await ProtoGateway.connect(router)
        assert await a.login("169.254.0.1", ["198.18.10.0/24"], features=SUPER) == (
            b'{"features":["super-packets"]}'
        )
        await b.login("169.254.0.2", ["198.18.20.0/24"], features=SUPER)
        await plain.login("169.254.0.3", ["198.18.30.0/24"])
        await a.send(wire.super_header(len(sp)) + sp)
        assert await b.recv_any() == (wire.SUPER_IPDATA, sp)
        # counted as the IP packet it carries, without the virtio-net header
        assert router.stats.bytes_forwarded == len(sp) - gso.VNET_HDR_LEN
        await a.send(wire.super_header(len(sp_plain)) + sp_plain)
        got = [await plain.recv_any() for _ in range(8)]
        assert {cmd for cmd, _ in got} == {wire.S2C_IPDATA}
        assert b"".join(p[40:] for _, p in got) == payload
        for _, pkt in got:
            assert len(pkt) <= 1400
            assert gso.internet_checksum(pkt[:20]) == 0xFFFF
            pseudo = pkt[12:20] + struct.pack(">BBH", 0, 6, len(pkt) - 20)
            assert gso.internet_checksum(pseudo + pkt[20:]) == 0xFFFF
        assert router.stats.segmented == 1
        # from a gateway that did not negotiate it, the same frame is not passed on
        await plain.send(wire.super_header(len(sp)) + sp)
        await plain.send(frame(3, sp))
        await a.send(frame(3, ipv4_packet("198.18.10.2", "198.18.30.2")))
        assert await plain.recv_any() == (2, ipv4_packet("198.18.10.2", "198.18.30.2"))
        await plain.send(frame(3, ipv4_packet("198.18.30.2", "198.18.20.2")))
        assert await b.recv_any() == (2, ipv4_packet("198.18.30.2", "198.18.20.2"))
        assert router.stats.dropped_malformed == 1
        await router.stop()

    run(scenario())


def test_an_over_long_packet_does_not_black_hole_other_gateways(keys):
    """Issue 19 bug 1: a super frame carrying a 65,528-65,590-byte IP packet (or a segment
    of 65,528-65,535 bytes) for a gateway without super-packets raised struct.error half-way
    through a batch: the sender was closed, and a gateway whose frames were already batched
    in that read got nothing from anyone again. Now the packet is dropped and counted."""
    big = gso.PLAIN_HDR + ipv4_packet("198.18.10.2", "198.18.20.9", bytes(65530 - 20))
    seg = tcp_super_packet("198.18.10.2", "198.18.20.9", bytes(65535 - 40), 65535 - 40)
    seg = seg[:12] + struct.pack(">H", 65535) + seg[14:]  # the segment's IPv4 total length

    async def scenario():
        router = await started(router_config(keys))
        a = await ProtoGateway.connect(router)
        b = await ProtoGateway.connect(router)
        c = await ProtoGateway.connect(router)
        d = await ProtoGateway.connect(router)
        await a.login("169.254.0.1", ["198.18.10.0/24"], features=SUPER)
        await b.login("169.254.0.2", ["198.18.20.0/24"])
        await c.login("169.254.0.3", ["198.18.30.0/24"])
        await d.login("169.254.0.4", ["198.18.40.0/24"])
        for n, bad in enumerate((big, seg)):
            to_c = ipv4_packet("198.18.10.2", "198.18.30.2", bytes([n]) * 40)
            await a.send(frame(3, to_c) + wire.super_header(len(bad)) + bad + frame(3, to_c))
            assert await c.recv_any() == (2, to_c)
            assert await c.recv_any() == (2, to_c)
            # and c goes on getting what others send it
            from_d = ipv4_packet("198.18.40.2", "198.18.30.2", bytes([n]) * 20)
            await d.send(frame(3, from_d))
            assert await c.recv_any() == (2, from_d)
            assert router.stats.dropped_oversized == n + 1
        # the sender broke no rule that closes it, and b still gets its packets
        to_b = ipv4_packet("198.18.10.2", "198.18.20.2")
        await a.send(frame(3, to_b))
        assert await b.recv_any() == (2, to_b)
        assert router.stats.malformed_frames == 0
        await router.stop()

    run(scenario())


def test_an_exception_while_forwarding_strands_nothing(keys, monkeypatch):
    """Whatever goes wrong in one read costs that read's sender its connection; frames
    already routed to others in that read are not left behind to block their later ones."""
    import polevpn.router.router as router_mod

    real = router_mod.forward

    def failing(packets, src, routes, anti_spoofing=True):
        real(packets, src, routes, anti_spoofing)  # routes everything, then fails
        if any(len(p) == 99 for p in packets):
            raise RuntimeError("a bug reached by a peer's bytes")
        return real(packets, src, routes, anti_spoofing)

    monkeypatch.setattr(router_mod, "forward", failing)

    async def scenario():
        router = await started(router_config(keys))
        a = await ProtoGateway.connect(router)
        b = await ProtoGateway.connect(router)
        c = await ProtoGateway.connect(router)
        await a.login("169.254.0.1", ["198.18.10.0/24"])
        await b.login("169.254.0.2", ["198.18.20.0/24"])
        await c.login("169.254.0.3", ["198.18.30.0/24"])
        poison = ipv4_packet("198.18.10.2", "198.18.20.2", bytes(79))
        await a.send(frame(3, ipv4_packet("198.18.10.2", "198.18.20.2")) + frame(3, poison))
        assert await a.closed_by_peer()
        to_b = ipv4_packet("198.18.30.2", "198.18.20.2")
        await c.send(frame(3, to_b))
        assert await b.recv_any() == (2, to_b)
        await router.stop()

    run(scenario())


def udp6_options_super_packet(src: str, dst: str, options: int, payload: int, gso_size: int):
    """Virtio-net header + IPv6/UDP super-packet behind ``options`` 8-byte destination-options
    headers: the attack run's shape (one copy of the whole chain per segment)."""
    ext = b"".join(bytes([60 if i + 1 < options else 17, 0]) + bytes(6) for i in range(options))
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    ulen = 8 + payload
    pseudo = gso.internet_checksum(s + d + struct.pack(">IxxxB", ulen, 17))
    udp = struct.pack(">HHHH", 5353, 4500, ulen, pseudo) + bytes(payload)
    ip = struct.pack(">IHBB16s16s", 6 << 28, len(ext) + ulen, 60, 64, s, d)
    vnet = gso.VNET_HDR.pack(gso.F_NEEDS_CSUM, gso.GSO_UDP_L4, 0, gso_size, 40 + len(ext), 6)
    return vnet + ip + ext + udp


def test_super_packet_amplification_is_refused(keys):
    """Issue 20 finding 3: 250 destination-options headers and gso_size 1 made 255 segments
    with a copy of the 2 KB chain each (2.3 KB in, 520 KB out to a gateway without
    super-packets). Now it is dropped and counted; an ordinary one still goes through."""
    attack = udp6_options_super_packet("2001:db8:10::2", "2001:db8:20::2", 250, 254, 1)
    fine = udp6_options_super_packet("2001:db8:10::2", "2001:db8:20::2", 1, 2500, 1232)
    small = udp6_options_super_packet("2001:db8:10::2", "2001:db8:20::2", 0, 254, 1)

    async def scenario():
        router = await started(router_config(keys))
        a = await ProtoGateway.connect(router)
        plain = await ProtoGateway.connect(router)
        await a.login("169.254.0.1", ["2001:db8:10::/64"], features=SUPER)
        await plain.login("169.254.0.2", ["2001:db8:20::/64"])
        for sp in (attack, small, fine):
            await a.send(wire.super_header(len(sp)) + sp)
        got = [await plain.recv_any() for _ in range(3)]
        assert [len(p) for _, p in got] == [40 + 8 + 8 + 1232] * 2 + [40 + 8 + 8 + 36]
        assert router.stats.dropped_malformed == 2
        assert router.stats.segmented == 1
        assert router.stats.packets_forwarded == 3
        await router.stop()

    run(scenario())


def test_bad_virtio_net_headers_do_not_reach_a_super_packet_gateway(keys):
    """Issue 20 finding 7: headers with gso_size 0, gso_type 0xff, UFO or csum_start/
    csum_offset of 65000 were dropped for a gateway without super-packets but passed on
    unchanged to one with them, which writes them to its TUN. Both drop them now."""
    payload = bytes(range(256)) * 12
    good = tcp_super_packet("198.18.10.2", "198.18.20.2", payload, 1360)

    def bad(**kw: int) -> bytes:
        names = ("flags", "type", "hdr_len", "gso_size", "start", "offset")
        fields = dict(zip(names, gso.VNET_HDR.unpack(good[:10]), strict=True)) | kw
        return gso.VNET_HDR.pack(*fields.values()) + good[10:]

    bads = [
        bad(gso_size=0),
        bad(type=0xFF),
        bad(type=gso.GSO_UDP),
        bad(start=65000),
        bad(offset=65000),
        bad(type=gso.GSO_NONE, start=65000),
        bad(gso_size=1),  # 3,072 one-byte segments, each behind a copy of the headers
    ]

    async def scenario():
        router = await started(router_config(keys))
        a = await ProtoGateway.connect(router)
        b = await ProtoGateway.connect(router)
        await a.login("169.254.0.1", ["198.18.10.0/24"], features=SUPER)
        await b.login("169.254.0.2", ["198.18.20.0/24"], features=SUPER)
        await a.send(b"".join(wire.super_header(len(sp)) + sp for sp in [*bads, good]))
        assert await b.recv_any() == (wire.SUPER_IPDATA, good)
        assert router.stats.dropped_malformed == len(bads)
        await router.stop()

    run(scenario())


def test_router_with_super_packets_off_answers_like_go(keys):
    async def scenario():
        router = await started(router_config(keys, super_packets=False))
        a = await ProtoGateway.connect(router)
        assert await a.login("169.254.0.1", ["198.18.10.0/24"], features=SUPER) == b"{}"
        sp = tcp_super_packet("198.18.10.2", "198.18.20.2", b"z" * 3000, 1360)
        await a.send(wire.super_header(len(sp)) + sp)
        await a.send(frame(4, b"", 9))
        assert await a.recv_any() == (4, b"")
        await router.stop()

    run(scenario())


def test_kcp_session_ends_when_the_peer_falls_silent(keys):
    """A restarted router has lost the session and drops its datagrams without a word:
    the gateway's transport gives up ``silence_timeout`` after its data went unanswered,
    instead of after the 20 s heartbeat timeout. (A router sending to a vanished gateway
    gives up the same way.)"""
    import dataclasses

    params = dataclasses.replace(KCP_PARAMS, silence_timeout=0.5)

    async def scenario():
        router = await started(router_config(keys, kcp_params=params))
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        proto = asyncio.StreamReaderProtocol(reader)
        verify = dtls.Verification(insecure=True)
        transport = await kcp_transport.connect(
            proto,
            "127.0.0.1",
            router.kcp_port,
            dtls.client_context(verify),
            verify,
            params,
            KcpPool(),
            timeout=5,
        )
        gw = ProtoGateway(reader, asyncio.StreamWriter(transport, proto, reader, loop))
        await gw.login("169.254.0.1", ["198.18.10.0/24"])
        server = router.kcp_server
        assert server is not None
        # the router "restarts": everything from now on falls on deaf ears
        server.datagram_received = lambda *_args: None  # type: ignore[method-assign]
        start = loop.time()
        await gw.send(frame(4, b"", 1))
        assert await gw.closed_by_peer(5)
        took = loop.time() - start
        assert 0.5 <= took < 2.5, took
        await router.stop()

    if _transport["mode"] != "kcp":
        pytest.skip("kcp only")
    run(scenario())


def test_listening_on_the_ipv6_wildcard_serves_both_families(keys):
    """"[::]:443" takes IPv4 and IPv6 gateways on tls:// as on kcp://, so one router address
    per family is not needed (a site with an IPv4 and an IPv6 uplink reaches the same
    listener both ways)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")

    async def scenario():
        listener = Listener(True, "::", 0, keys.server_cert, keys.server_key)
        router = await started(router_config(keys, tls=listener, kcp=listener))
        try:
            assert len(router.listen_sockets) == 1
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            for i, host in enumerate(("127.0.0.1", "::1")):
                reader, writer = await asyncio.open_connection(
                    host, router.tls_port, ssl=ctx, server_hostname="polevpn.com"
                )
                gw = ProtoGateway(reader, writer)
                await gw.login(f"169.254.0.{i + 1}", [f"198.18.{10 + i}.0/24"])
            for i, host in enumerate(("127.0.0.1", "::1")):
                gw = await ProtoGateway.connect_kcp(router, host=host)
                await gw.login(f"169.254.1.{i + 1}", [f"198.18.{20 + i}.0/24"])
            assert router.stats.registrations == 4
        finally:
            await router.stop()

    run(scenario())


# ---- multi-link gateways (issue 8) --------------------------------------------------------

ML = ["multi-link"]
SITE, LAN_SITE, LAN_SITE6 = "169.254.0.1", "198.18.10.0/24", "2001:db8:10::/64"
OTHER, LAN_OTHER = "169.254.0.2", "198.18.20.0/24"
# the link a test silences says it may be quiet this long; the others much longer, so a
# busy machine does not take them for dead
SHORT_MS, LONG_MS = 300, 5000


def link_obj(name: str, timeout_ms: int = LONG_MS, **extra) -> dict:
    return {"name": name, "heartbeat_ms": 50, "timeout_ms": timeout_ms, **extra}


class LinkPeer:
    """One link of a protocol-level multi-link gateway: it sends a heartbeat every 30 ms
    (unless ``muted``) and collects the IP packets the router sends down it."""

    def __init__(self, gw: ProtoGateway, name: str) -> None:
        self.gw = gw
        self.name = name
        self.muted = False
        self.packets: list[bytes] = []
        self.closed = asyncio.Event()
        self._tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._read())]

    async def _beat(self) -> None:
        while not self.closed.is_set():
            if not self.muted and not self.gw.writer.is_closing():
                self.gw.writer.write(frame(4))
            await asyncio.sleep(0.03)

    async def _read(self) -> None:
        reader = self.gw.reader
        try:
            while True:
                length, cmd, _ = struct.unpack(">HHI", await reader.readexactly(8))
                body = await reader.readexactly(length - 8)
                if cmd == 2:
                    self.packets.append(body)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.closed.set()

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.gw.close()


async def ml_login(
    router: Router, name: str, gateway: str = SITE, nets: list[str] | None = None, **link
) -> tuple[ProtoGateway, dict]:
    """AUTH offering multi-link, REGISTER naming link ``name``: the REGISTER reply."""
    gw = await ProtoGateway.connect(router)
    await gw.send(frame(0, json.dumps({"key": KEY, "features": ML}).encode()))
    assert await gw.recv_frame() == (0, 0, b'{"features":["multi-link"]}')
    body = {
        "gateway": gateway,
        "key": KEY,
        "network": [LAN_SITE, LAN_SITE6] if nets is None else nets,
        "link": link_obj(name, **link),
    }
    await gw.send(frame(1, json.dumps(body).encode(), 8))
    cmd, seq, reply = await gw.recv_frame()
    assert (cmd, seq) == (1, 8)
    return gw, json.loads(reply)


async def ml_link(router: Router, name: str, **kw) -> LinkPeer:
    gw, reply = await ml_login(router, name, **kw)
    assert reply == {}
    return LinkPeer(gw, name)


async def until(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def flow_packet(sport: int, dport: int = 5201, seq: int = 0, v6: bool = False) -> bytes:
    """A UDP packet from the other site into the multi-link site; the ports make the flow."""
    payload = struct.pack(">HHI", sport, dport, seq) + b"f" * 24
    if v6:
        return ipv6_packet("2001:db8:20::5", "2001:db8:10::7", payload)
    return ipv4_packet("198.18.20.5", "198.18.10.7", payload)


def flow_of(pkt: bytes) -> tuple[int, int, int]:
    off = 40 if pkt[0] >> 4 == 6 else 20
    return (pkt[0] >> 4, *struct.unpack(">HH", pkt[off : off + 4]))


async def send_flows(
    src: ProtoGateway, peers: list[LinkPeer], packets: list[bytes]
) -> dict[str, set[tuple[int, int, int]]]:
    """Send ``packets`` and wait for all of them to arrive: which flows each link got."""
    for p in peers:
        p.packets.clear()
    await src.send(b"".join(frame(3, p) for p in packets))
    await until(lambda: sum(len(p.packets) for p in peers) >= len(packets))
    got = {p.name: {flow_of(pkt) for pkt in p.packets} for p in peers}
    assert sorted(pkt for p in peers for pkt in p.packets) == sorted(packets)
    return got


async def other_site(router: Router) -> ProtoGateway:
    gw = await ProtoGateway.connect(router)
    await gw.login(OTHER, [LAN_OTHER, "2001:db8:20::/64"])
    return gw


def conn_of(router: Router, peer_name: str):
    site = router.sites[ipaddress.ip_address(SITE)]
    (conn,) = [c for c in site.links.connections() if c.link.name == peer_name]
    return conn


def ml_run(router_cfg: RouterConfig, scenario) -> None:
    """Run ``scenario(router, peers)``; every link peer it adds to ``peers`` is stopped."""

    async def main() -> None:
        router = await started(router_cfg)
        peers: list[LinkPeer] = []
        try:
            await scenario(router, peers)
        finally:
            for p in peers:
                p.stop()
            await router.stop()

    run(main())


def test_multilink_two_links_one_site_flows_spread(keys, caplog):
    """Two connections registering one gateway with different link names make one site;
    packets to it spread over both links by flow, and one flow stays on one link."""

    async def scenario(router: Router, peers: list[LinkPeer]) -> None:
        peers += [await ml_link(router, "v4", weight=1), await ml_link(router, "v6", weight=2)]
        b = await other_site(router)
        site = router.sites[ipaddress.ip_address(SITE)]
        assert ipaddress.ip_address(SITE) not in router.by_gateway
        assert {c.link.name for c in site.links.connections()} == {"v4", "v6"}
        assert [str(n) for n in site.networks] == [LAN_SITE, LAN_SITE6]
        assert {str(n) for n, t in router.routes.routes() if t is site} == {
            SITE + "/32",
            LAN_SITE,
            LAN_SITE6,
        }
        assert not any(p.closed.is_set() for p in peers)
        # many flows, v4 and v6: both links carry some
        flows = [flow_packet(sport) for sport in range(20000, 20200)]
        flows += [flow_packet(sport, v6=True) for sport in range(30000, 30050)]
        got = await send_flows(b, peers, flows)
        assert got["v4"] and got["v6"] and not got["v4"] & got["v6"]
        # weight 2 against 1: v6 carries more of them
        assert len(got["v6"]) > len(got["v4"])
        # one flow's packets, whatever their payload, all take one link
        one = [flow_packet(40000, seq=i) for i in range(30)]
        got = await send_flows(b, peers, one)
        assert sorted(len(p.packets) for p in peers) == [0, 30]
        # and the site's links send like any gateway
        await peers[0].gw.send(frame(3, ipv4_packet("198.18.10.7", "198.18.20.5")))
        await peers[1].gw.send(frame(3, ipv6_packet("2001:db8:10::7", "2001:db8:20::5")))
        assert (await b.recv_frame())[0] == 2 and (await b.recv_frame())[0] == 2
        assert router.stats.dropped_spoofed == 0

    with caplog.at_level(logging.INFO, logger="polevpn.router"):
        ml_run(router_config(keys), scenario)
    assert "link=v4 weight=1 backup=false" in caplog.text
    assert "link=v6 weight=2 backup=false" in caplog.text  # fields of the logfmt lines


SPREAD = [flow_packet(sport) for sport in range(21000, 21100)]


def _flows(packets: list[bytes]) -> set[tuple[int, int, int]]:
    return {flow_of(p) for p in packets}


class TestMultiLinkTls:
    """Link bookkeeping is the same on either transport: tls:// only, to stay quick."""

    @pytest.fixture(autouse=True)
    def transport(self) -> str:
        _transport["mode"] = "tls"
        _transport["count"] = 0
        return "tls"

    def test_silent_link_goes_down_and_back_up(self, keys, caplog):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            v4 = await ml_link(router, "v4", timeout_ms=SHORT_MS)
            v6 = await ml_link(router, "v6")
            peers += [v4, v6]
            b = await other_site(router)
            before = await send_flows(b, peers, SPREAD)
            assert before["v4"] and before["v6"]

            v4.muted = True
            await until(lambda: router.stats.links_down == 1)
            c4 = conn_of(router, "v4")
            assert not c4.link_up and c4.link_downs == 1
            assert conn_of(router, "v6").link_up and conn_of(router, "v6").link_downs == 0
            # every flow takes the other link; the silent one stays registered
            down = await send_flows(b, peers, SPREAD)
            assert down == {"v4": set(), "v6": _flows(SPREAD)}
            assert not v4.closed.is_set() and len(router.sites) == 1

            v4.muted = False
            await until(lambda: c4.link_up)
            # exactly its old flows come back to it
            assert await send_flows(b, peers, SPREAD) == before
            assert router.stats.links_down == 1 and router.stats.dropped_links_down == 0

        with caplog.at_level(logging.INFO, logger="polevpn.router"):
            ml_run(router_config(keys), scenario)
        down = [ln for ln in caplog.text.splitlines() if 'msg="link down"' in ln]
        assert len(down) == 1
        assert f"gateway={SITE} link=v4 " in down[0] and "silent_ms=" in down[0]
        silent_ms = int(down[0].rsplit("silent_ms=", 1)[1])
        assert silent_ms >= SHORT_MS  # never before its timeout (printed in whole ms)
        assert f'msg="link up" gateway={SITE} link=v4 ' in caplog.text

    def test_all_links_silent_drops_and_counts(self, keys):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            peers += [
                await ml_link(router, "v4", timeout_ms=SHORT_MS),
                await ml_link(router, "v6", timeout_ms=SHORT_MS),
            ]
            b = await other_site(router)
            for p in peers:
                p.muted = True
            await until(lambda: router.stats.links_down == 2)
            await b.send(b"".join(frame(3, p) for p in SPREAD[:10]))
            await until(lambda: router.stats.dropped_links_down == 10)
            assert all(not p.packets for p in peers)
            # the routes stay: the links are down, not gone
            assert router.stats.dropped_no_route == 0
            peers[1].muted = False
            await until(lambda: conn_of(router, "v6").link_up)
            assert await send_flows(b, peers, SPREAD[:10]) == {
                "v4": set(),
                "v6": _flows(SPREAD[:10]),
            }

        ml_run(router_config(keys), scenario)

    def test_backup_link_only_while_no_primary_is_up(self, keys):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            primary = await ml_link(router, "main", timeout_ms=SHORT_MS, weight=1)
            # a heavier backup still waits for the primary to fail
            backup = await ml_link(router, "lte", backup=True, weight=5)
            peers += [primary, backup]
            assert conn_of(router, "lte").link.backup
            b = await other_site(router)
            assert await send_flows(b, peers, SPREAD) == {"main": _flows(SPREAD), "lte": set()}
            primary.muted = True
            await until(lambda: not conn_of(router, "main").link_up)
            assert await send_flows(b, peers, SPREAD) == {"main": set(), "lte": _flows(SPREAD)}
            primary.muted = False
            await until(lambda: conn_of(router, "main").link_up)
            assert await send_flows(b, peers, SPREAD) == {"main": _flows(SPREAD), "lte": set()}

        ml_run(router_config(keys), scenario)

    def test_same_link_name_replaces_that_link_only(self, keys):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            old_v4, v6 = await ml_link(router, "v4"), await ml_link(router, "v6")
            peers += [old_v4, v6]
            b = await other_site(router)
            before = await send_flows(b, peers, SPREAD)
            old_conn = conn_of(router, "v4")
            new_v4 = await ml_link(router, "v4")
            peers.append(new_v4)
            await asyncio.wait_for(old_v4.closed.wait(), 3)
            assert router.stats.replaced == 1
            site = router.sites[ipaddress.ip_address(SITE)]
            assert len(site.links.connections()) == 2 and not v6.closed.is_set()
            assert conn_of(router, "v4") is not old_conn and old_conn.site is None
            got = await send_flows(b, [new_v4, v6], SPREAD)
            # the reconnected link takes back the flows it had
            assert got == {"v4": before["v4"], "v6": before["v6"]}

        ml_run(router_config(keys), scenario)

    def test_plain_register_replaces_the_whole_site(self, keys):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            peers += [await ml_link(router, "v4"), await ml_link(router, "v6")]
            b = await other_site(router)
            plain = await ProtoGateway.connect(router)
            await plain.login(SITE, [LAN_SITE])
            for p in peers:
                await asyncio.wait_for(p.closed.wait(), 3)
            assert router.stats.replaced == 2
            assert router.sites == {}
            conn = router.by_gateway[ipaddress.ip_address(SITE)]
            assert conn.link is None and conn.site is None
            assert {str(n) for n, t in router.routes.routes() if t is conn} == {
                SITE + "/32",
                LAN_SITE,
            }
            assert LAN_SITE6 not in {str(n) for n, _ in router.routes.routes()}
            await b.send(frame(3, SPREAD[0]))
            assert await plain.recv_frame() == (2, 0, SPREAD[0])

        ml_run(router_config(keys), scenario)

    def test_link_register_replaces_a_plain_registration(self, keys):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            gw = await ProtoGateway.connect(router)
            await gw.login(SITE, [LAN_SITE])
            plain = LinkPeer(gw, "plain")
            peers.append(plain)
            b = await other_site(router)
            peers.append(await ml_link(router, "v4"))
            await asyncio.wait_for(plain.closed.wait(), 3)
            assert router.stats.replaced == 1
            assert ipaddress.ip_address(SITE) not in router.by_gateway
            site = router.sites[ipaddress.ip_address(SITE)]
            assert [c.link.name for c in site.links.connections()] == ["v4"]
            got = await send_flows(b, peers[1:], SPREAD)
            assert got == {"v4": _flows(SPREAD)}

        ml_run(router_config(keys), scenario)

    def test_at_most_eight_links(self, keys, caplog):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            for i in range(8):
                peers.append(await ml_link(router, f"l{i}"))
            gw, reply = await ml_login(router, "l8")
            assert "at most 8 links" in reply["error"]
            assert await gw.closed_by_peer()
            assert router.stats.register_refused == 1
            site = router.sites[ipaddress.ip_address(SITE)]
            assert len(site.links.connections()) == 8
            assert not any(p.closed.is_set() for p in peers)
            # a full site still takes a link reconnecting under its own name
            peers.append(await ml_link(router, "l3"))
            await asyncio.wait_for(peers[3].closed.wait(), 3)
            assert len(site.links.connections()) == 8

        with caplog.at_level(logging.WARNING, logger="polevpn.router"):
            ml_run(router_config(keys), scenario)
        assert 'msg="registration refused" gateway=169.254.0.1' in caplog.text

    def test_hairpin_between_links_of_one_site_is_dropped(self, keys):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            v4 = await ml_link(router, "v4")
            v6 = await ml_link(router, "v6")
            peers += [v4, v6]
            b = await other_site(router)
            # flows from every bucket: whichever link a flow maps to, it is not sent back
            back = [
                ipv4_packet("198.18.10.5", "198.18.10.9", struct.pack(">HH", port, 53) + bytes(8))
                for port in range(100)
            ]
            await v4.gw.send(b"".join(frame(3, p) for p in back))
            await v6.gw.send(frame(3, ipv6_packet("2001:db8:10::5", "2001:db8:10::9")))
            await until(lambda: router.stats.dropped_hairpin == 101)
            # a packet forwarded afterwards arrives: nothing of the above was queued before it
            await b.send(frame(3, SPREAD[0]))
            await until(lambda: len(v4.packets) + len(v6.packets) == 1)
            assert (v4.packets + v6.packets) == [SPREAD[0]]

        ml_run(router_config(keys), scenario)

    def test_hairpin_of_a_super_packet_between_links_is_dropped(self, keys):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            gws = []
            for name in ("v4", "v6"):
                gw = await ProtoGateway.connect(router)
                reply = await gw.login(
                    SITE, [LAN_SITE], features=[*ML, *SUPER], link=link_obj(name)
                )
                assert json.loads(reply) == {"features": ["multi-link", "super-packets"]}
                gws.append(gw)
            peers += [LinkPeer(gw, n) for gw, n in zip(gws, ("v4", "v6"), strict=True)]
            sp = tcp_super_packet("198.18.10.2", "198.18.10.3", b"z" * 3000, 1360)
            await gws[0].send(wire.super_header(len(sp)) + sp)
            await until(lambda: router.stats.dropped_hairpin == 1)
            assert router.stats.segmented == 0
            assert not peers[0].packets and not peers[1].packets

        ml_run(router_config(keys), scenario)

    def test_last_link_closing_withdraws_the_site(self, keys):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            v4, v6 = await ml_link(router, "v4"), await ml_link(router, "v6")
            peers += [v4, v6]
            b = await other_site(router)
            site = router.sites[ipaddress.ip_address(SITE)]
            v4.stop()
            await until(lambda: len(site.links.connections()) == 1)
            assert await send_flows(b, [v6], SPREAD) == {"v6": _flows(SPREAD)}
            v6.stop()
            await until(lambda: not router.sites)
            assert {str(n) for n, _ in router.routes.routes()} == {
                OTHER + "/32",
                LAN_OTHER,
                "2001:db8:20::/64",
            }
            await b.send(frame(3, SPREAD[0]) + frame(3, SPREAD[1]))
            await until(lambda: router.stats.dropped_no_route == 2)
            assert router.stats.dropped_links_down == 0

        ml_run(router_config(keys), scenario)

    def test_link_without_multi_link_agreed_is_plain(self, keys):
        """A link object on a session that did not agree to multi-link is ignored: the
        REGISTER is a plain one, and replaces the gateway's earlier connection."""

        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            first = await ProtoGateway.connect(router)
            await first.login(SITE, [LAN_SITE], link=link_obj("v4"))
            conn = router.by_gateway[ipaddress.ip_address(SITE)]
            assert conn.link is None and conn.site is None and router.sites == {}
            assert conn.session.features == frozenset()
            second = await ProtoGateway.connect(router)
            await second.login(SITE, [LAN_SITE], features=SUPER, link=link_obj("v6"))
            assert await first.closed_by_peer()
            assert router.stats.replaced == 1 and router.sites == {}
            assert router.by_gateway[ipaddress.ip_address(SITE)].link is None

        ml_run(router_config(keys), scenario)

    def test_second_register_with_another_link_name_moves_the_connection(self, keys):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            gw, reply = await ml_login(router, "v4")
            assert reply == {}
            (conn,) = router.connections
            body = {"gateway": SITE, "key": KEY, "network": [LAN_SITE], "link": link_obj("v6")}
            await gw.send(frame(1, json.dumps(body).encode(), 9))
            assert await gw.recv_frame() == (1, 9, b"{}")
            site = router.sites[ipaddress.ip_address(SITE)]
            assert [c.link.name for c in site.links.connections()] == ["v6"]
            assert conn.link.name == "v6" and conn.site is site
            assert {str(n) for n, t in router.routes.routes() if t is site} == {
                SITE + "/32",
                LAN_SITE,
            }
            gw.close()

        ml_run(router_config(keys), scenario)

    def test_plain_register_on_a_link_connection_makes_it_plain(self, keys):
        async def scenario(router: Router, peers: list[LinkPeer]) -> None:
            gw, reply = await ml_login(router, "v4")
            assert reply == {}
            (conn,) = router.connections
            body = {"gateway": SITE, "key": KEY, "network": [LAN_SITE]}
            await gw.send(frame(1, json.dumps(body).encode(), 10))
            assert await gw.recv_frame() == (1, 10, b"{}")
            assert router.sites == {} and router.by_gateway[ipaddress.ip_address(SITE)] is conn
            assert conn.site is None
            assert conn.link is None
            assert conn.queue_limit == router.cfg.send_queue_bytes
            gw.close()

        ml_run(router_config(keys, send_queue_bytes=4 << 20), scenario)


def test_a_replaced_connection_s_data_is_discarded(keys, caplog, transport):
    """Issue 19 bug 11, the router's side: when a link's connection (or a gateway's) has been
    replaced by a new one, whatever the old one still sends (its queue, once a cut link
    comes back) is discarded: not forwarded, and no ``link up`` for it."""
    if transport == "mixed":
        pytest.skip("tls and kcp runs cover it")

    async def scenario(router: Router, peers: list[LinkPeer]) -> None:
        old = await ml_link(router, "v4", timeout_ms=SHORT_MS)
        peers.append(old)
        b = await other_site(router)
        old.muted = True
        await until(lambda: router.stats.links_down == 1)
        old_conn = conn_of(router, "v4")
        new = await ml_link(router, "v4")
        peers.append(new)
        await until(lambda: router.stats.replaced == 1)
        # the old connection's queue arrives at last, heartbeats and packets: over the wire,
        # and as a transport that shuts down hands over what it had buffered (asyncio's
        # SSL protocol does, from the close on)
        stale = [ipv4_packet("198.18.10.7", "198.18.20.5", bytes([i]) * 20) for i in range(20)]
        queued = frame(4) + b"".join(frame(3, p) for p in stale) + frame(4)
        old.gw.writer.write(queued)
        old_conn.data_received(queued)
        await asyncio.sleep(0.3)
        fresh = ipv4_packet("198.18.10.8", "198.18.20.5")
        await new.gw.send(frame(3, fresh))
        assert await b.recv_frame() == (2, 0, fresh)
        with pytest.raises(TimeoutError):
            await b.recv_frame(0.3)
        assert router.stats.packets_forwarded == 1
        assert router.stats.dropped_closing >= 20
        # a plain gateway replaced the same way
        (b_conn,) = [c for c in router.connections if str(c.gateway) == OTHER]
        gw = await ProtoGateway.connect(router)
        await gw.login(OTHER, [LAN_OTHER])
        await until(lambda: router.stats.replaced == 2)
        b_conn.data_received(frame(3, ipv4_packet("198.18.20.5", "198.18.10.7")))
        await asyncio.sleep(0.2)
        assert router.stats.packets_forwarded == 1
        assert not new.packets
        return old_conn.peer

    peers_seen: list[str] = []

    async def wrapped(router: Router, peers: list[LinkPeer]) -> None:
        peers_seen.append(await scenario(router, peers))

    with caplog.at_level(logging.INFO, logger="polevpn.router"):
        ml_run(router_config(keys), wrapped)
    ups = [r.getMessage() for r in caplog.records if r.getMessage().startswith("link up")]
    assert not [m for m in ups if f"peer={peers_seen[0]}" in m], ups

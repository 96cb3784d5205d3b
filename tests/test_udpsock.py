"""The source-address-aware UDP socket: a reply leaves from the address its peer dialled.

Every client here uses a connected UDP socket, as a gateway does: the kernel drops a reply
from any other address, which is how the bug of issue 21 shows. IPv4 has 127.0.0.0/8 on
``lo`` to dial two local addresses without root; IPv6 has only ::1, so the IPv6 cases and the
address that disappears run inside a network namespace of their own (test_in_a_namespace
runs this file's ``inside_`` tests there, with 2001:db8:: and 198.18.0.0/15 addresses on
its ``lo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop

from polevpn.config import FecParams, KcpParams
from polevpn.io import kcp_transport, udpsock
from polevpn.io.udp_batch import UdpBatchSender
from polevpn.kcp import dtls
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.keygen import generate

NETNS_ENV = "POLEVPN_UDPSOCK_NETNS"
inside = pytest.mark.skipif(
    not os.environ.get(NETNS_ENV), reason="runs inside the namespace of test_in_a_namespace"
)
# on the namespace's lo: dialled by the inside_ tests; .3/::3 and .4/::4 are taken away
NS_ADDRS = (
    "198.18.0.1/32", "198.18.0.2/32", "198.18.0.3/32", "198.18.0.4/32",
    "2001:db8::1/128", "2001:db8::2/128", "2001:db8::3/128", "2001:db8::4/128",
)


class Echo(asyncio.DatagramProtocol):
    """Answers every datagram with its own bytes, from the address it was sent to."""

    def __init__(self, batch: bool = False) -> None:
        self.transport: udpsock.UdpEndpoint | None = None
        self.batch: UdpBatchSender | None = None
        self.use_batch = batch
        self.sources: list[udpsock.Source | None] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.batch = UdpBatchSender(transport)

    def datagram_received(self, data: bytes, addr, ancdata=None) -> None:
        source = udpsock.source_of(ancdata)
        self.sources.append(source)
        assert self.transport is not None and self.batch is not None
        if self.use_batch:
            # a window's worth in one go: UDP_SEGMENT and the source together
            self.batch.send([data] * 8, addr, source)
        else:
            self.transport.sendto(data, addr, source)


def _client(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    c = socket.socket(family, socket.SOCK_DGRAM)
    if os.environ.get(NETNS_ENV):
        # not from the dialled address itself (the kernel's choice for a local one): the
        # inside_ tests take that address away, and only the router's side should notice
        c.bind(_loopback(host))
    c.connect((host, port))
    c.setblocking(False)
    return c


def _loopback(host: str) -> tuple[str, int]:
    return ("::1", 0) if ":" in host else ("127.0.0.1", 0)


async def _recv(c: socket.socket, timeout: float = 2.0) -> tuple[bytes, str] | None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        try:
            data, addr = c.recvfrom(65536)
            return data, addr[0]
        except BlockingIOError:
            await asyncio.sleep(0.005)
    return None


async def _echo_from(listen: str, dialled: list[str], batch: bool = False) -> list[list[str]]:
    """For each dialled address: the source addresses of the replies its client got."""
    echo = Echo(batch)
    ep = await udpsock.open_endpoint(echo, listen, 0)
    port = ep.get_extra_info("sockname")[1]
    out: list[list[str]] = []
    try:
        for host in dialled:
            c = _client(host, port)
            try:
                c.send(b"ping " + host.encode())
                got: list[str] = []
                for _ in range(8 if batch else 1):
                    r = await _recv(c)
                    if r is None:
                        break
                    assert r[0] == b"ping " + host.encode()
                    got.append(r[1])
                out.append(got)
            finally:
                c.close()
        if batch:
            assert echo.batch is not None and echo.batch.batches >= 1, "no UDP_SEGMENT batch"
    finally:
        if echo.batch is not None:
            echo.batch.close()
        ep.close()
        await asyncio.sleep(0)
    return out


def test_the_bug_without_a_source() -> None:
    """Control: the wildcard socket's plain reply to a peer that dialled 127.0.0.2 leaves
    from 127.0.0.1, and the peer's connected socket drops it (the reply never arrives)."""

    async def main() -> tuple[bytes, str] | None:
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        srv.bind(("0.0.0.0", 0))
        c = _client("127.0.0.2", srv.getsockname()[1])
        try:
            c.send(b"x")
            data, addr = srv.recvfrom(100)
            srv.sendto(data, addr)
            return await _recv(c, 0.5)
        finally:
            c.close()
            srv.close()

    assert uvloop.run(main()) is None


@pytest.mark.parametrize("batch", [False, True], ids=["single", "gso-batch"])
@pytest.mark.parametrize("listen", ["0.0.0.0", "::"], ids=["v4", "dual-stack"])
def test_reply_leaves_from_the_dialled_ipv4_address(listen: str, batch: bool) -> None:
    dialled = ["127.0.0.2", "127.0.0.1", "127.0.0.3"]
    got = uvloop.run(_echo_from(listen, dialled, batch))
    n = 8 if batch else 1
    assert got == [[host] * n for host in dialled]


def test_a_bound_socket_needs_no_source() -> None:
    """Bound to one address, every datagram's destination is that address: no ancillary
    data is asked for and replies go out as before."""

    async def main() -> tuple[bool, list]:
        echo = Echo()
        ep = await udpsock.open_endpoint(echo, "127.0.0.2", 0)
        c = _client("127.0.0.2", ep.get_extra_info("sockname")[1])
        try:
            c.send(b"x")
            assert await _recv(c) == (b"x", "127.0.0.2")
            return ep.pktinfo, echo.sources
        finally:
            c.close()
            ep.close()
            await asyncio.sleep(0)

    pktinfo, sources = uvloop.run(main())
    assert not pktinfo and sources == [None]


def test_source_of_reads_both_families() -> None:
    v4 = udpsock.source_of([(socket.IPPROTO_IP, udpsock.IP_PKTINFO,
                              bytes([7, 0, 0, 0]) + socket.inet_aton("198.18.0.9") * 2)])
    assert v4 is not None and v4.address == "198.18.0.9" and v4.family == socket.AF_INET
    # the interface stays out: the route back decides it
    assert v4.cmsg[2][:4] == bytes(4) and v4.cmsg[2][4:8] == socket.inet_aton("198.18.0.9")
    mapped = udpsock.source_of([(socket.IPPROTO_IPV6, udpsock.IPV6_PKTINFO,
                                  socket.inet_pton(socket.AF_INET6, "::ffff:198.18.0.9")
                                  + bytes([3, 0, 0, 0]))])
    assert mapped is not None and mapped.address == "198.18.0.9"
    assert mapped.family == socket.AF_INET and mapped.cmsg[0] == socket.IPPROTO_IPV6
    ll = udpsock.source_of([(socket.IPPROTO_IPV6, udpsock.IPV6_PKTINFO,
                             socket.inet_pton(socket.AF_INET6, "fe80::1") + bytes([3, 0, 0, 0]))])
    assert ll is not None and ll.scope_id == 3  # a link-local source keeps its interface
    assert udpsock.source_of(None) is None and udpsock.source_of([(17, 104, bytes(4))]) is None


class _Blocking:
    """A socket whose sends say EAGAIN while ``blocked``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.blocked = True

    def sendto(self, data: bytes, addr) -> int:
        if self.blocked:
            raise BlockingIOError
        return self.sock.sendto(data, addr)

    def sendmsg(self, *args) -> int:
        if self.blocked:
            raise BlockingIOError
        return self.sock.sendmsg(*args)

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


def test_a_full_send_buffer_queues_in_order_and_drops_beyond_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(udpsock, "SEND_QUEUE_BYTES", 3000)

    async def main() -> None:
        echo = Echo()
        ep = await udpsock.open_endpoint(echo, "0.0.0.0", 0)
        c = _client("127.0.0.2", ep.get_extra_info("sockname")[1])
        try:
            c.send(b"x")
            assert await _recv(c) is not None
            source, peer = echo.sources[0], c.getsockname()
            fake = _Blocking(ep._sock)
            ep._sock = fake  # type: ignore[assignment]
            for i in range(4):  # 3 x 1000 bytes fit the queue, the 4th does not
                ep.sendto(bytes([i]) * 1000, peer, source)
            assert ep.get_write_buffer_size() == 3000 and ep.send_dropped == 1
            fake.blocked = False
            got = [await _recv(c) for _ in range(3)]
            assert got == [(bytes([i]) * 1000, "127.0.0.2") for i in range(3)]
            assert ep.get_write_buffer_size() == 0
            ep.sendto(b"after", peer, source)  # straight out again
            assert await _recv(c) == (b"after", "127.0.0.2")
        finally:
            c.close()
            ep.close()
            await asyncio.sleep(0)

    uvloop.run(main())


# ---- a kcp:// session through KcpServer ---------------------------------------------------

PARAMS = KcpParams(fec=FecParams(mode="off"))


class Collect(asyncio.Protocol):
    def __init__(self, want: int) -> None:
        self.want = want
        self.data = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.want and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class EchoStream(asyncio.Protocol):
    def __init__(self, sessions: list[EchoStream]) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()
        sessions.append(self)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("keys"))


async def kcp_server(keys, listen: str) -> tuple[kcp_transport.KcpServer, udpsock.UdpEndpoint,
                                                 list[EchoStream]]:
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    sessions: list[EchoStream] = []
    server = kcp_transport.KcpServer(
        ctx, jar, PARAMS, lambda _started: EchoStream(sessions), handshake_timeout=5
    )
    ep = await udpsock.open_endpoint(server, listen, 0)
    return server, ep, sessions


async def kcp_client(host: str, port: int, want: int) -> tuple[kcp_transport.KcpTransport,
                                                               Collect]:
    verify = dtls.Verification(insecure=True)
    proto = Collect(want)
    t = await kcp_transport.connect(
        proto, host, port, dtls.client_context(verify), verify, PARAMS, KcpPool(), timeout=3,
        local_addr=_loopback(host) if os.environ.get(NETNS_ENV) else None,
    )
    return t, proto


async def echo_through(t: kcp_transport.KcpTransport, proto: Collect, payload: bytes) -> None:
    t.write(payload)
    await asyncio.wait_for(asyncio.shield(proto.done), 10)
    assert bytes(proto.data) == payload


@pytest.mark.parametrize("listen", ["0.0.0.0", "::"], ids=["v4", "dual-stack"])
def test_kcp_session_with_a_second_local_address(keys, listen: str) -> None:
    """A gateway dialling 127.0.0.2 completes the cookie exchange and the handshake and
    gets a window of data back (UDP_SEGMENT batches): every reply from 127.0.0.2."""

    async def main() -> int:
        server, ep, _ = await kcp_server(keys, listen)
        port = ep.get_extra_info("sockname")[1]
        try:
            payload = os.urandom(400_000)
            t, proto = await kcp_client("127.0.0.2", port, len(payload))
            try:
                await echo_through(t, proto, payload)
            finally:
                t.close()
            return server.counters().udp_batches
        finally:
            ep.close()
            await asyncio.sleep(0.01)

    assert uvloop.run(main()) > 0


# ---- inside a namespace: IPv6, and addresses that go away -------------------------------


@inside
@pytest.mark.parametrize("batch", [False, True], ids=["single", "gso-batch"])
def test_inside_reply_from_the_dialled_ipv6_address(batch: bool) -> None:
    n = 8 if batch else 1
    dialled = ["2001:db8::2", "2001:db8::1", "198.18.0.2", "198.18.0.1"]
    assert uvloop.run(_echo_from("::", dialled, batch)) == [[h] * n for h in dialled]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@inside
@pytest.mark.parametrize("listen,gone,stays", [
    ("0.0.0.0", "198.18.0.3", "198.18.0.1"),
    ("::", "198.18.0.3", "198.18.0.1"),
    ("::", "2001:db8::3", "2001:db8::1"),
], ids=["v4", "mapped", "v6"])
def test_inside_a_vanished_source_raises(listen: str, gone: str, stays: str) -> None:
    """sendmsg from an address that left the host says EINVAL or ENETUNREACH; the layer
    tells it apart (SourceGone) for single sends and batches, and GSO stays on."""

    async def main() -> None:
        echo = Echo()
        ep = await udpsock.open_endpoint(echo, listen, 0)
        port = ep.get_extra_info("sockname")[1]
        clients = [_client(h, port) for h in (gone, stays)]
        try:
            for c in clients:
                c.send(b"hello")
                assert await _recv(c) is not None
            (src_gone, peer_gone), (src_stays, peer_stays) = [
                (s, c.getsockname()) for s, c in zip(echo.sources, clients, strict=True)
            ]
            assert src_gone is not None and src_gone.address == gone
            if listen == "::" and ":" not in gone:
                peer_gone = ("::ffff:" + peer_gone[0], peer_gone[1], 0, 0)
            plen = "128" if ":" in gone else "32"
            _ip("addr", "del", f"{gone}/{plen}", "dev", "lo")
            try:
                with pytest.raises(udpsock.SourceGone):
                    ep.sendto(b"late", peer_gone, src_gone)
                assert echo.batch is not None
                with pytest.raises(udpsock.SourceGone):
                    echo.batch.send([b"a" * 100] * 4, peer_gone, src_gone)
                assert echo.batch.gso, "a vanished source turned GSO off"
                # the other address answers as before, batched too
                echo.batch.send([b"b" * 100] * 4, echo_peer(listen, clients[1]), src_stays)
                got = [await _recv(clients[1]) for _ in range(4)]
                assert got == [(b"b" * 100, stays)] * 4
            finally:
                _ip("addr", "add", f"{gone}/{plen}", "dev", "lo", *(["nodad"] if plen == "128"
                                                                     else []))
        finally:
            for c in clients:
                c.close()
            if echo.batch is not None:
                echo.batch.close()
            ep.close()
            await asyncio.sleep(0)

    uvloop.run(main())


def echo_peer(listen: str, c: socket.socket):
    addr = c.getsockname()
    if listen == "::" and c.family == socket.AF_INET:
        return ("::ffff:" + addr[0], addr[1], 0, 0)
    return addr


@inside
@pytest.mark.parametrize("gone", ["2001:db8::4", "198.18.0.4"], ids=["v6", "mapped"])
def test_inside_kcp_session_closes_when_its_address_goes(keys, gone: str) -> None:
    """The session whose dialled address left is closed at its next send (instead of
    answering from another address); a session on another address carries on."""

    async def main() -> None:
        server, ep, sessions = await kcp_server(keys, "::")
        port = ep.get_extra_info("sockname")[1]
        stays = "2001:db8::1" if ":" in gone else "198.18.0.1"
        try:
            t1, p1 = await kcp_client(gone, port, 1000)
            await echo_through(t1, p1, os.urandom(1000))
            t2, p2 = await kcp_client(stays, port, 1000)
            await echo_through(t2, p2, os.urandom(1000))
            assert len(server.sessions) == 2 and len(sessions) == 2
            plen = "128" if ":" in gone else "32"
            _ip("addr", "del", f"{gone}/{plen}", "dev", "lo")
            try:
                doomed = sessions[0]
                assert doomed.transport is not None
                doomed.transport.write(b"anyone there?")
                await asyncio.wait_for(asyncio.shield(doomed.lost), 2)
                assert server.stats.source_gone == 1
                assert len(server.sessions) == 1 and not sessions[1].lost.done()
                p2.data.clear()
                p2.done = asyncio.get_running_loop().create_future()
                await echo_through(t2, p2, os.urandom(1000))
            finally:
                _ip("addr", "add", f"{gone}/{plen}", "dev", "lo",
                    *(["nodad"] if plen == "128" else []))
            t1.abort()
            t2.close()
        finally:
            ep.close()
            await asyncio.sleep(0.01)

    uvloop.run(main())


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="needs root and iproute2 (network namespace)")
def test_in_a_namespace() -> None:
    """Runs the inside_ tests in a fresh namespace with two addresses per family on lo."""
    ns = f"pv{secrets.token_hex(2)}-udpsock"
    _ip("netns", "add", ns)
    try:
        def run(*cmd: str) -> None:
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True,
                           timeout=10)

        run("ip", "link", "set", "lo", "up")
        for a in NS_ADDRS:
            run("ip", "addr", "add", a, "dev", "lo", *(["nodad"] if ":" in a else []))
        env = dict(os.environ, **{NETNS_ENV: ns})
        res = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "pytest", "-q",
             "-p", "no:cacheprovider", "-k", "inside_", str(Path(__file__))],
            capture_output=True, text=True, timeout=120, env=env,
        )
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
        # every inside_ test ran (none skipped), so the namespace really was used
        assert "7 passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-2000:]
    finally:
        with contextlib.suppress(Exception):
            _ip("netns", "del", ns)

"""The router's kcp:// endpoint before a session exists: cookie listener, pending handshakes,
admission, and what a datagram from an address with a live session is taken for.

A ``KcpServer`` on loopback; the client is our DTLS session behind the strict replay window
of ``strictdtls`` (as pion's), driven datagram by datagram over a real UDP socket so that
chosen datagrams can be lost.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import strictdtls

from polevpn.config import HandshakeLimits, KcpParams
from polevpn.io.kcp_transport import HandshakeSlots, KcpServer
from polevpn.kcp import dtls
from polevpn.keygen import generate


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("kcpserverkeys"))


class Slots:
    """The router's admission as the server sees it: who holds a slot, who was refused."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.held = 0
        self.asked = 0

    def admit(self, addr) -> bool:
        self.asked += 1
        if self.refuse:
            return False
        self.held += 1
        return True

    def release(self, addr) -> None:
        self.held -= 1


class Sink(asyncio.Protocol):
    made: list[Sink] = []

    def __init__(self, started: float) -> None:
        self.started = started

    def connection_made(self, transport) -> None:
        Sink.made.append(self)


async def serve(keys, slots: Slots | None = None, **kw) -> tuple[KcpServer, int]:
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    slots = slots or Slots()
    server = KcpServer(
        ctx,
        jar,
        KcpParams(),
        Sink,
        handshake_timeout=kw.pop("handshake_timeout", 5.0),
        admit=slots.admit,
        release=slots.release,
        **kw,
    )
    udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: server, local_addr=("127.0.0.1", 0)
    )
    return server, udp.get_extra_info("sockname")[1]


class UdpClient(asyncio.DatagramProtocol):
    """A ``strictdtls.Client`` on a UDP socket, losing what ``path`` says."""

    def __init__(self, client: strictdtls.Client, path: strictdtls.Path) -> None:
        self.client = client
        self.path = path
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[bytes] = []
        self.cookie_sent: float | None = None

    def send(self, datagrams: list[bytes]) -> None:
        assert self.transport is not None
        for d in datagrams:
            if self.cookie_sent is None and strictdtls.first_kind(d) == "CH2":
                self.cookie_sent = time.monotonic()
            if self.path.passes("c2s", d):
                self.transport.sendto(d)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.send(self.client.start())

    def datagram_received(self, data: bytes, addr) -> None:
        self.received.append(data)
        if self.path.passes("s2c", data):
            self.send(self.client.receive(data))

    async def handshake(self, within: float) -> float:
        start = time.monotonic()
        while not self.client.established:
            if time.monotonic() - start > within:
                raise AssertionError(f"no handshake within {within}s: {self.path.log}")
            await asyncio.sleep(0.02)
            self.send(self.client.handle_timeout())
        return time.monotonic() - start


async def connect(
    port: int, loss: dict | None = None, strict: bool = True, source: str = "127.0.0.1"
) -> tuple[UdpClient, asyncio.DatagramTransport]:
    proto = UdpClient(strictdtls.Client(strict), strictdtls.Path(dict(loss or {})))
    udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: proto, local_addr=(source, 0), remote_addr=("127.0.0.1", port)
    )
    return proto, udp


def test_lost_server_finished_is_resent_at_once(keys):
    """The router's last handshake datagram (CCS, Finished) is lost: the gateway's
    retransmitted flight (epoch-0 ClientKeyExchange first) reaches the session, which sends
    its Finished again; no 5 s stall, no second pending slot, no orphan session."""

    async def scenario():
        Sink.made.clear()
        slots = Slots()
        server, port = await serve(keys, slots)
        gw, udp = await connect(port, {("s2c", "CCS"): 1})
        took = await gw.handshake(within=4.0)
        assert took < 2.5, took
        assert not any(gw.path.lose.values()), gw.path.log
        assert gw.client.strict.dropped == []
        assert server.pending == {} and len(server.sessions) == 1
        assert slots.asked == 1 and slots.held == 1 and len(Sink.made) == 1
        assert server.stats.handshakes == 1
        # and the session carries data: the retransmission did not replace it
        (t,) = server.sessions.values()
        rec = gw.client.session.send(b"\x00" * 24)
        assert rec is not None
        before = t.datagrams_in
        udp.sendto(rec)
        await asyncio.sleep(0.1)
        assert t.datagrams_in == before + 1
        udp.close()
        server.transport.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("loss", ["first ClientHello lost", "server flight lost"])
def test_strict_client_over_loopback(keys, loss):
    """Issue 15 through the real endpoint: a pion-like client that lost its first
    ClientHello (or our flight) completes, with nothing dropped as a replay."""

    async def scenario():
        server, port = await serve(keys)
        gw, udp = await connect(port, strictdtls.LOSSES[loss])
        await gw.handshake(within=5.0)
        assert gw.client.strict.dropped == []
        assert len(server.sessions) == 1 and server.pending == {}
        udp.close()
        server.transport.close()

    asyncio.run(scenario())


def test_restarted_gateway_on_the_same_port_replaces_its_session(keys):
    """A new ClientHello (another random) from the address of a live session still goes
    through the cookie exchange and then replaces the session."""

    async def scenario():
        server, port = await serve(keys)
        gw, udp = await connect(port)
        await gw.handshake(within=3.0)
        (old,) = server.sessions.values()
        # the same socket, a new client: a gateway restarted with the same source port
        gw.client = strictdtls.Client(True)
        gw.send(gw.client.start())
        await gw.handshake(within=3.0)
        (new,) = server.sessions.values()
        assert new is not old and old.is_closing()
        assert server.stats.handshakes == 2
        udp.close()
        server.transport.close()

    asyncio.run(scenario())


def test_full_pending_table_still_answers_the_cookie_exchange(keys):
    """With every handshake slot taken, a new peer still gets its (stateless)
    HelloVerifyRequest; its cookie ClientHello is then refused without a server flight
    (issue 19 bug 9)."""

    async def scenario():
        server, port = await serve(keys, limits=HandshakeLimits(max_handshakes=1))
        # A gets through the cookie and then loses everything it sends: it holds the slot
        a, a_udp = await connect(port, {("c2s", "CKE"): 100})
        deadline = time.monotonic() + 3
        while not server.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(server.pending) == 1
        b, b_udp = await connect(port, source="127.0.0.2")
        await asyncio.sleep(0.3)
        assert strictdtls.kinds(b.received) == ["HVR"], strictdtls.kinds(b.received)
        assert server.stats.refused_handshakes == 1 and len(server.pending) == 1
        for u in (a_udp, b_udp):
            u.close()
        server.transport.close()

    asyncio.run(scenario())


def test_refused_handshake_gets_no_server_flight(keys):
    """Admission (pending caps, a source blocked for AUTH failures) is asked once the cookie
    is good and before any handshake work: a refused peer gets its HelloVerifyRequest and
    then nothing, retransmissions included (docs/protocol.md section 11; issue 20
    finding 6)."""

    async def scenario():
        slots = Slots(refuse=True)
        server, port = await serve(keys, slots)
        gw, udp = await connect(port)
        await asyncio.sleep(1.3)  # past the client's first retransmission of its ClientHello
        gw.send(gw.client.handle_timeout())
        await asyncio.sleep(0.2)
        assert strictdtls.kinds(gw.received) == ["HVR"], strictdtls.kinds(gw.received)
        assert slots.asked >= 2 and slots.held == 0
        assert server.pending == {} and server.sessions == {}
        assert server.stats.refused_handshakes == slots.asked
        udp.close()
        server.transport.close()

    asyncio.run(scenario())


def test_oversized_datagram_leaves_nothing_behind(keys):
    """One oversized datagram (no key, source may be forged) must not delay the next peer's
    ClientHello (issue 20 finding 1)."""

    async def scenario():
        server, port = await serve(keys)
        junk_udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=("127.0.0.1", port)
        )
        junk_udp.sendto(b"\x16\xfe\xfd" + b"\x00" * 65000)
        await asyncio.sleep(0.1)
        gw, udp = await connect(port)
        # under the client's 1 s resend timer: its first ClientHello was answered
        assert await gw.handshake(within=3.0) < 0.9
        assert server.stats.rejected_datagrams >= 1
        for u in (junk_udp, udp):
            u.close()
        server.transport.close()

    asyncio.run(scenario())


def test_handshake_slots_are_shared_per_prefix():
    """One IPv4 /24, one IPv6 /64, /56 or /48 cannot take every handshake slot (issue 20
    finding 5): defaults 256 in all, 32 per /24 or /64, 64 per /56, 128 per /48."""
    slots = HandshakeSlots(HandshakeLimits())
    taken = [slots.take(f"198.18.7.{i}") for i in range(40)]
    assert sum(t is not None for t in taken) == 32
    assert slots.take("198.18.8.1") is not None  # the next /24 is another share
    # a /48 spread over many /64s and /56s: 128 at most, and the rest is left for others
    got = 0
    for sub in range(256):
        for host in range(3):
            got += slots.take(f"2001:db8:77:{sub:02x}{host:02x}::1") is not None
    assert got == 128  # the /48's share, though no /64 or /56 of it is full
    assert slots.total == 33 + 128
    assert slots.take("2001:db8:78::1") is not None
    # an IPv4-mapped address counts as the IPv4 one
    assert slots.take("::ffff:198.18.7.200") is None
    # giving back frees exactly what was charged
    charged = slots.take("198.18.9.1")
    assert charged is not None
    before = dict(slots.by_prefix)
    slots.give_back(charged)
    assert slots.by_prefix.get("198.18.9.0/24", 0) == before["198.18.9.0/24"] - 1


def test_handshake_slots_total_and_small_tables():
    slots = HandshakeSlots(
        HandshakeLimits(max_handshakes=4, max_per_prefix=32, reserved_share_known=0)
    )
    # no prefix more than half the table, whatever max_per_prefix says
    assert [slots.take("198.18.1.1") is not None for _ in range(3)] == [True, True, False]
    assert slots.take("198.18.2.1") and slots.take("198.18.3.1")
    assert slots.take("198.18.4.1") is None  # the total
    assert slots.total == 4


def test_known_sources_keep_a_share_of_the_handshake_table():
    """Issue 20 finding 5: strangers spread over many networks fill at most 3/4 of the
    table; a known source (it passed AUTH lately) still gets a slot, charged to no prefix,
    and only the total stops it."""
    slots = HandshakeSlots(HandshakeLimits(max_handshakes=16, max_per_prefix=2))
    strangers = [slots.take(f"198.18.{i}.1") for i in range(16)]
    assert sum(s is not None for s in strangers) == 12
    assert slots.take("198.18.200.1") is None  # a stranger: the strangers' part is full
    known = [slots.take("198.18.0.1", known=True) for _ in range(5)]
    assert known == [(), (), (), (), None]  # the reserve, then the total
    assert slots.total == 16 and slots.by_prefix["198.18.0.0/24"] == 1
    slots.give_back(())  # a known peer's handshake ended: no stranger slot comes free
    assert slots.take("198.18.201.1") is None and slots.take("198.18.0.1", known=True) == ()
    slots.give_back(strangers[0])
    assert slots.take("198.18.201.1") is not None


def test_one_prefix_cannot_fill_the_kcp_handshake_table(keys):
    """Through the endpoint: with max_handshakes 2 (one prefix may hold 1), a second
    stalled handshake from 127.0.0.0/24 is refused while another /24 still gets in."""

    async def scenario():
        server, port = await serve(keys, limits=HandshakeLimits(max_handshakes=2))
        stall = {("c2s", "CKE"): 100}
        a, a_udp = await connect(port, stall, source="127.0.0.2")
        b, b_udp = await connect(port, stall, source="127.0.0.3")
        await asyncio.sleep(0.3)
        assert len(server.pending) == 1 and server.stats.refused_handshakes >= 1
        assert strictdtls.kinds(b.received) == ["HVR"]
        assert server.slots.by_prefix == {"127.0.0.0/24": 1}
        for u in (a_udp, b_udp):
            u.close()
        server.transport.close()
        await asyncio.sleep(0.01)
        assert server.pending == {} and server.slots.total == 0

    asyncio.run(scenario())


def test_kcp_connection_has_auth_timeout_from_the_cookie(keys):
    """README: a connection has auth_timeout from its DTLS cookie for the handshake, AUTH
    and REGISTER. A gateway whose handshake took 1 s (a lost flight) and then sends nothing
    is closed auth_timeout after the cookie, not auth_timeout after the handshake (issue 20
    finding 13: it lasted up to twice auth_timeout)."""
    from test_router_loopback import router_config
    from test_router_loopback import run as run_uvloop

    from polevpn.router.router import Router

    async def scenario():
        router = Router(router_config(keys, auth_timeout=1.2))
        await router.start()
        try:
            gw, udp = await connect(router.kcp_port, {("c2s", "CKE"): 1})
            await gw.handshake(within=3.0)
            assert gw.cookie_sent is not None
            assert time.monotonic() - gw.cookie_sent > 0.9  # the lost flight cost a second
            assert len(router.connections) == 1
            while router.connections and time.monotonic() - gw.cookie_sent < 4:
                await asyncio.sleep(0.02)
            took = time.monotonic() - gw.cookie_sent
            assert router.stats.auth_timeouts == 1
            assert took < 1.2 + 0.6, took
            assert router.admission.pending == 0 and router.kcp_server.slots.total == 0
            udp.close()
        finally:
            await router.stop()

    run_uvloop(scenario())


def test_short_and_stale_handshake_datagrams_leave_a_live_session_alone(keys):
    """From a live session's address: an empty datagram, a cut record, and a late copy of
    the session's own ClientHello (same random) go to the session, which drops them; none
    starts a cookie exchange or ends the session."""

    async def scenario():
        server, port = await serve(keys)
        gw, udp = await connect(port)
        first = gw.client.session.conn.client_random()
        await gw.handshake(within=3.0)
        (t,) = server.sessions.values()
        hvr_before = server.stats.hello_verify_sent
        own_hello = strictdtls.Client(True)
        hello = own_hello.start()[0]
        late_copy = hello[:27] + first + hello[59:]  # the session's random, as if delayed
        for d in (b"", b"\x16", b"\x16\xfe\xfd\x00\x00", late_copy):
            udp.sendto(d)
        await asyncio.sleep(0.1)
        assert server.sessions == {t.peer: t} and not t.is_closing()
        assert server.stats.hello_verify_sent == hvr_before
        udp.close()
        server.transport.close()

    asyncio.run(scenario())


def test_a_session_whose_start_fails_is_aborted_and_the_server_carries_on(keys, caplog):
    """Review finding: a protocol that raises when its session starts ends that session
    alone; the demux's timer stays armed, so another peer's stalled handshake still times
    out and gives its slot back, and the next peer gets a session."""

    class Failing(Sink):
        fail = True

        def connection_made(self, transport) -> None:
            if Failing.fail:
                Failing.fail = False
                raise RuntimeError("boom")
            super().connection_made(transport)

    async def scenario():
        Sink.made.clear()
        slots = Slots()
        ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
        server = KcpServer(
            ctx,
            jar,
            KcpParams(),
            Failing,
            handshake_timeout=1.0,
            admit=slots.admit,
            release=slots.release,
        )
        udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: server, local_addr=("127.0.0.1", 0)
        )
        port = udp.get_extra_info("sockname")[1]
        # a peer that stalls after the cookie: its handshake stays pending
        stalled, s_udp = await connect(port, {("c2s", "CKE"): 100}, source="127.0.0.2")
        stalled.send(stalled.client.start())
        gw, g_udp = await connect(port)
        await gw.handshake(within=4.0)
        await asyncio.sleep(0.1)
        assert not server.sessions and not Sink.made  # the failed start was aborted
        deadline = time.monotonic() + 4
        while server.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # the stalled peer's slot came back; the one left is the failed session's, which
        # belongs to its protocol once established (the router's gives it back when lost)
        assert not server.pending and slots.held == 1
        again, a_udp = await connect(port, source="127.0.0.3")
        await again.handshake(within=4.0)
        await asyncio.sleep(0.1)
        assert len(Sink.made) == 1
        for u in (s_udp, g_udp, a_udp, udp):
            u.close()

    asyncio.run(scenario())
    assert "internal error starting a kcp session" in caplog.text

"""kcp:// without sockets: a client ``KcpConnection`` and the router's ``KcpServerCore``
wired through an in-memory link that delivers, drops and duplicates datagrams by hand, on a
fake clock.

One thing is not on the fake clock: OpenSSL's DTLS retransmission timer reads the wall clock
itself (pyOpenSSL offers no DTLS_set_timer_cb), so the one test that needs the client to
resend a handshake flight waits for it (about a second); everything else, KCP, FEC, the
silence and handshake deadlines, runs on ``Clock``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from polevpn.config import HandshakeLimits, KcpParams
from polevpn.kcp import dtls
from polevpn.kcp.connection import (
    ConnectionTerminated,
    Event,
    HandshakeCompleted,
    KcpConnection,
    StreamDataReceived,
)
from polevpn.kcp.kcp_link import PRE_AUTH_WINDOW
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.kcp.server import (
    HandshakeEnded,
    HandshakeRefused,
    KcpServerCore,
    SessionEstablished,
    SessionReplaced,
)
from polevpn.keygen import generate

GW = ("198.18.0.2", 40000)
OTHER = ("198.18.0.66", 40000)
SOURCE = "reply-source-198.19.0.1"  # opaque to the demux: handed back with every reply
HS_SERVER_HELLO = 2
HS_HELLO_VERIFY_REQUEST = 3
CT_CHANGE_CIPHER_SPEC = 20


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("kcpconnkeys"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, dt: float) -> float:
        self.now += dt
        return self.now


class Admission:
    def __init__(self) -> None:
        self.held = 0
        self.asked = 0

    def admit(self, addr) -> bool:
        self.asked += 1
        self.held += 1
        return True

    def release(self, addr) -> None:
        self.held -= 1


def handshake_types(datagram: bytes) -> list[int]:
    """The handshake types of a datagram's epoch-0 handshake records (CCS as -20)."""
    out = []
    for rec in dtls.split_records(datagram):
        if rec[3:5] != b"\x00\x00":
            continue
        if rec[0] == dtls.CT_HANDSHAKE:
            out.append(rec[dtls.RECORD_HEADER])
        elif rec[0] == CT_CHANGE_CIPHER_SPEC:
            out.append(-CT_CHANGE_CIPHER_SPEC)
    return out


@dataclass
class Net:
    """One gateway (``client``) and the router's demux (``server``), datagrams held in
    flight until the test delivers them."""

    keys: Any
    params: KcpParams = field(default_factory=KcpParams)
    limits: HandshakeLimits | None = None
    clock: Clock = field(default_factory=Clock)
    addr: tuple = GW
    jar_secret: bytes | None = None

    def __post_init__(self) -> None:
        ctx, jar = dtls.server_context(
            self.keys.server_cert, self.keys.server_key, cookie_secret=self.jar_secret
        )
        self.admission = Admission()
        self.pool = KcpPool()
        self.server = KcpServerCore(
            ctx,
            jar,
            self.params,
            handshake_timeout=5.0,
            pool=self.pool,
            admit=self.admission.admit,
            release=self.admission.release,
            limits=self.limits,
        )
        self.client = self.new_client()
        self.c2s: list[bytes] = []
        self.s2c: list[bytes] = []
        self.server_events: list[Any] = []
        self.client_events: list[Event] = []
        self.server_conn_events: list[Event] = []

    def new_client(self) -> KcpConnection:
        verify = dtls.Verification(insecure=True)
        session = dtls.DtlsSession.client(
            dtls.client_context(verify), verify, self.params.dtls_mtu, self.clock.now
        )
        return KcpConnection(session, self.params, self.pool, self.clock.now, peer=("router",))

    # -- collecting output

    def collect(self) -> None:
        now = self.clock.now
        self.c2s.extend(self.client.datagrams_to_send(now))
        for datagrams, addr, source in self.server.datagrams_to_send():
            assert addr == self.addr and source == SOURCE, (addr, source)
            self.s2c.extend(datagrams)
        for conn in self.server.sessions.values():
            assert conn.source == SOURCE
            self.s2c.extend(conn.datagrams_to_send(now))
        ev = self.server.next_event()
        while ev is not None:
            self.server_events.append(ev)
            ev = self.server.next_event()
        for conn, sink in ((self.client, self.client_events), (self.conn, None)):
            if conn is None:
                continue
            sink = sink if sink is not None else self.server_conn_events
            e = conn.next_event()
            while e is not None:
                sink.append(e)
                e = conn.next_event()

    @property
    def conn(self) -> KcpConnection | None:
        return self.server.sessions.get(self.addr)

    # -- delivery

    def to_server(self, datagrams: list[bytes], addr: tuple | None = None) -> None:
        for d in datagrams:
            self.server.datagram_received(d, addr or self.addr, SOURCE, self.clock.now)
        self.collect()

    def to_client(self, datagrams: list[bytes]) -> None:
        for d in datagrams:
            self.client.receive_datagram(d, self.clock.now)
        self.collect()

    def step(self, drop_s2c=lambda d: False, drop_c2s=lambda d: False) -> bool:
        """Deliver what the client has in flight, then what the server has (its answers
        included); False when nothing was in flight."""
        self.collect()
        c2s, self.c2s = self.c2s, []
        self.to_server([d for d in c2s if not drop_c2s(d)])
        s2c, self.s2c = self.s2c, []
        self.to_client([d for d in s2c if not drop_s2c(d)])
        return bool(c2s or s2c)

    def run(self, rounds: int = 20, **drops) -> None:
        for _ in range(rounds):
            if not self.step(**drops):
                return

    def handshake(self) -> KcpConnection:
        self.client.connect(self.clock.now)
        self.run()
        assert self.client.established, self.client_events
        assert self.conn is not None and self.conn.established
        return self.conn

    def received(self, events: list[Event]) -> bytes:
        return b"".join(e.data for e in events if isinstance(e, StreamDataReceived))

    def tick(self, dt: float) -> None:
        """Advance the clock and run every timer that is due."""
        now = self.clock.advance(dt)
        for conn in (self.client, self.conn):
            if conn is not None:
                at = conn.get_timer()
                if at is not None and at <= now:
                    conn.handle_timer(now)
        at = self.server.get_timer()
        if at is not None and at <= now:
            self.server.handle_timer(now)
        self.collect()


def test_handshake_and_stream_data_both_ways(keys):
    net = Net(keys)
    cookie_time = net.clock.now
    conn = net.handshake()
    assert any(isinstance(e, HandshakeCompleted) for e in net.client_events)
    (ev,) = [e for e in net.server_events if isinstance(e, SessionEstablished)]
    assert ev.conn is conn and ev.addr == GW and ev.started == cookie_time
    assert net.server.pending == {} and net.server.stats.handshakes == 1
    # the admission slot is the caller's once established; the demux's own slot is free
    assert net.admission.held == 1 and net.server.slots.total == 0
    assert not conn.authenticated and net.client.authenticated

    up = bytes(range(256)) * 40
    net.client.send(up, net.clock.now)
    for _ in range(200):  # what the pacing holds back follows on the timer
        net.run()
        if len(net.received(net.server_conn_events)) == len(up):
            break
        net.tick(0.002)
    assert net.received(net.server_conn_events) == up
    conn.authenticate(net.clock.now)
    down = b"\x5a" * 30000
    conn.send(down, net.clock.now)
    # more than the pacing lets go at once: the rest follows on the connection's timer
    for _ in range(200):
        net.run()
        if len(net.received(net.client_events)) == len(down):
            break
        net.tick(0.002)
    assert net.received(net.client_events) == down
    # the two ClientHellos went to the cookie listener, before the connection existed
    assert net.client.datagrams_out == conn.datagrams_in + 2

    # a clean close: the close_notify ends the server's session, without an error
    net.client.close(net.clock.now)
    net.collect()
    assert net.client_events[-1] == ConnectionTerminated(None, False)
    net.run()
    assert net.server_conn_events[-1] == ConnectionTerminated(None, False)


def test_a_lost_datagram_is_resent_on_the_fake_clock(keys):
    net = Net(keys)
    conn = net.handshake()
    conn.authenticate(net.clock.now)
    net.client.send(b"first", net.clock.now)
    net.collect()
    assert net.c2s
    net.c2s.clear()  # lost
    net.run()
    assert net.received(net.server_conn_events) == b""
    at = net.client.get_timer()
    assert at is not None and at <= net.clock.now + 0.5
    for _ in range(100):
        net.tick(0.01)
        net.run()
        if net.received(net.server_conn_events):
            break
    assert net.received(net.server_conn_events) == b"first"
    assert net.client.link is not None and net.client.link.retransmissions >= 1


def test_duplicated_datagrams_deliver_once(keys):
    net = Net(keys)
    conn = net.handshake()
    net.client.send(b"x" * 5000, net.clock.now)
    net.collect()
    net.c2s = net.c2s + net.c2s
    net.run()
    assert net.received(net.server_conn_events) == b"x" * 5000
    assert conn.dtls.bad_records == 0


def test_reload_keeps_the_cookie_bound_to_the_address(keys):
    """Issue 19 bug 2: after a reload (a new context and jar, the same secret), a
    cookie-bearing ClientHello replayed from another address gets only a
    HelloVerifyRequest; from the address it was issued to it still starts the handshake."""
    secret = b"s" * 32
    net = Net(keys, jar_secret=secret)
    ctx2, jar2 = dtls.server_context(keys.server_cert, keys.server_key, cookie_secret=secret)
    net.server.set_context(ctx2, jar2)

    net.client.connect(net.clock.now)
    net.step()  # ClientHello -> HelloVerifyRequest -> ClientHello with the cookie
    (with_cookie,) = net.c2s
    net.c2s = []

    net.server.datagram_received(with_cookie, OTHER, SOURCE, net.clock.now)
    replies = net.server.datagrams_to_send()
    assert len(replies) == 1
    datagrams, addr, source = replies[0]
    assert addr == OTHER and source == SOURCE
    assert [handshake_types(d) for d in datagrams] == [[HS_HELLO_VERIFY_REQUEST]]
    assert net.server.pending == {} and net.admission.asked == 0

    net.to_server([with_cookie])
    assert GW in net.server.pending and net.admission.asked == 1
    assert HS_SERVER_HELLO in handshake_types(net.s2c[0])


def test_lost_server_finished_is_resent_to_the_retransmitted_flight(keys):
    """Issue 19 bug 3: the router's last handshake datagram (CCS, Finished) is lost. The
    gateway's retransmitted flight (epoch-0 ClientKeyExchange first) goes to the session,
    which sends its Finished again: no stall, no second pending entry, no orphan."""
    net = Net(keys)
    net.client.connect(net.clock.now)

    def finished(d: bytes) -> bool:
        return -CT_CHANGE_CIPHER_SPEC in handshake_types(d)

    lost = []

    def drop(d: bytes) -> bool:
        if finished(d) and not lost:
            lost.append(d)
            return True
        return False

    net.run(drop_s2c=drop)
    assert lost, "the server's Finished flight was never sent"
    conn = net.conn
    assert conn is not None and not net.client.established
    assert net.server.pending == {} and net.server.slots.total == 0

    # OpenSSL's own retransmission timer is on the wall clock (see the module docstring)
    deadline = time.monotonic() + 3.0
    while not net.c2s and time.monotonic() < deadline:
        time.sleep(0.05)
        net.tick(0.05)
    assert net.c2s, "the client never resent its flight"
    assert handshake_types(net.c2s[0])[:1] == [16]  # ClientKeyExchange, epoch 0
    net.run()
    assert net.client.established
    assert net.conn is conn and net.server.pending == {} and net.server.slots.total == 0
    assert net.server.stats.handshakes == 1 and net.admission.asked == 1
    assert not any(isinstance(e, SessionReplaced) for e in net.server_events)
    net.client.send(b"after", net.clock.now)
    net.run()
    assert net.received(net.server_conn_events) == b"after"


def test_a_new_client_hello_replaces_a_live_session(keys):
    """A restarted gateway on the same port: its proven ClientHello ends the old session."""
    net = Net(keys)
    old = net.handshake()
    net.client = net.new_client()
    net.client_events = []
    net.server_conn_events = []
    net.handshake()
    assert net.conn is not old and old.closed
    assert any(isinstance(e, SessionReplaced) and e.old is old for e in net.server_events)
    assert net.server.stats.handshakes == 2


def test_a_full_pending_table_still_answers_the_hello_verify_request(keys):
    """Issue 19 bug 9: the cookie reply does not depend on per-session state; a proven
    ClientHello beyond the table is refused without handshake work."""
    net = Net(keys, limits=HandshakeLimits(max_handshakes=1, max_per_prefix=1))
    net.client.connect(net.clock.now)
    net.step()
    net.step()  # the cookie-bearing ClientHello took the only slot
    assert GW in net.server.pending and net.server.slots.total == 1

    other = net.new_client()
    other.connect(net.clock.now)
    (hello,) = other.datagrams_to_send(net.clock.now)
    net.server.datagram_received(hello, OTHER, SOURCE, net.clock.now)
    ((datagrams, addr, _),) = net.server.datagrams_to_send()
    assert addr == OTHER
    assert [handshake_types(d) for d in datagrams] == [[HS_HELLO_VERIFY_REQUEST]]
    for d in datagrams:
        other.receive_datagram(d, net.clock.now)
    (with_cookie,) = other.datagrams_to_send(net.clock.now)
    net.server.datagram_received(with_cookie, OTHER, SOURCE, net.clock.now)
    assert net.server.datagrams_to_send() == []
    assert OTHER not in net.server.pending and net.server.stats.refused_handshakes == 1
    assert net.server.next_event() == HandshakeRefused(OTHER)
    # a full table still answers a fresh ClientHello from the same peer: no state was kept
    net.server.datagram_received(hello, OTHER, SOURCE, net.clock.now)
    ((datagrams, addr, _),) = net.server.datagrams_to_send()
    assert [handshake_types(d) for d in datagrams] == [[HS_HELLO_VERIFY_REQUEST]]


def test_pre_auth_window_is_bounded_until_authenticate(keys):
    """Until AUTH, the router's session announces a small KCP window and buffers no more
    than that for a reader that does not read; ``authenticate`` opens it at once."""
    net = Net(keys)
    conn = net.handshake()
    assert conn.link is not None and conn.link.kcp is not None
    assert conn.link.kcp.rcv_wnd == PRE_AUTH_WINDOW
    conn.set_reading(False, net.clock.now)
    msg = b"m" * 1000
    for _ in range(200):
        net.client.send(msg, net.clock.now)
    for _ in range(30):
        net.run()
        net.tick(0.05)
    kcp = conn.link.kcp
    assert kcp.nrcv_que + kcp.nrcv_buf <= 2 * PRE_AUTH_WINDOW
    assert net.client.link is not None and net.client.link.kcp.rmt_wnd <= PRE_AUTH_WINDOW
    assert net.received(net.server_conn_events) == b""

    conn.authenticate(net.clock.now)
    assert kcp.rcv_wnd == net.params.receive_window
    conn.set_reading(True, net.clock.now)
    for _ in range(100):
        net.run()
        net.tick(0.02)
        if len(net.received(net.server_conn_events)) == 200 * len(msg):
            break
    assert net.received(net.server_conn_events) == msg * 200


def test_a_dead_link_ends_on_the_fake_clock(keys):
    """The peer goes silent with data in flight: the connection ends after
    ``silence_timeout`` of fake time, with a close_notify for the peer."""
    net = Net(keys)
    net.handshake()
    net.client.send(b"lost" * 100, net.clock.now)
    start = net.clock.now
    terminated = None
    while net.clock.now - start < 10.0:
        net.tick(0.05)
        net.c2s.clear()
        net.s2c.clear()
        terminated = next(
            (e for e in net.client_events if isinstance(e, ConnectionTerminated)), None
        )
        if terminated is not None:
            break
    assert terminated is not None and terminated.error is not None
    assert "nothing heard" in terminated.error
    took = net.clock.now - start
    silence = net.params.silence_timeout
    assert silence < took <= silence + 0.2, took
    assert net.client.closed and net.client.get_timer() is None


def test_a_handshake_that_stalls_times_out_on_the_fake_clock(keys):
    """A proven peer that never finishes: its entry, slot and admission go at the deadline
    that runs from its cookie."""
    net = Net(keys)
    net.client.connect(net.clock.now)
    net.step()
    net.step()
    assert GW in net.server.pending
    at = net.server.get_timer()
    assert at is not None and at <= net.clock.now + 5.0
    net.c2s.clear()
    net.s2c.clear()
    for _ in range(60):
        net.tick(0.1)
        net.s2c.clear()
        if not net.server.pending:
            break
    assert net.server.pending == {} and net.server.slots.total == 0
    assert net.admission.held == 0
    (ev,) = [e for e in net.server_events if isinstance(e, HandshakeEnded)]
    assert ev.timed_out and ev.addr == GW
    assert net.server.stats.handshake_timeouts == 1
    assert net.server.get_timer() is None

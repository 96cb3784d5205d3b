"""Path selection (polevpn.direct.path) and anti-spoofing on direct traffic
(polevpn.direct.acl): the state machine by itself, then two gateways behind simulated NATs
(tests/natsim.py) sending a transfer both ways while the path between their NATs is cut
and restored: relayed within 2 s of the cut, direct again once it is back."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from natsim import Filtering, Mapping, Nat, Net, run

from polevpn.direct import keys as K
from polevpn.direct import messages as m
from polevpn.direct.acl import DirectAcl
from polevpn.direct.keys import PairKeys
from polevpn.direct.messages import Cause, Endpoint, PathCode
from polevpn.direct.path import Decision, PathConfig, PathState, PeerPath
from polevpn.direct.punch import PathUp, Puncher, PunchFailed, PunchState

A = ipaddress.ip_address("169.254.0.1")
B = ipaddress.ip_address("169.254.0.2")
EB = Endpoint(ipaddress.ip_address("198.18.0.20"), 6000)
R = Decision.RELAY
P = Decision.PUNCH


# ---- the state machine --------------------------------------------------------------------


def _direct(now: float = 0.0, cfg: PathConfig | None = None) -> PeerPath:
    p = PeerPath(B, cfg)
    assert p.offered(now + 3600, now) == [P] and p.state is PathState.PUNCHING
    p.connected(now + 0.1)
    assert p.state is PathState.DIRECT and p.direct
    return p


def test_an_offer_punches_and_connected_goes_direct():
    p = PeerPath(B)
    assert p.state is PathState.RELAYED and not p.direct and p.next_deadline() is None
    assert p.offered(3600.0, 0.0) == [P]
    assert p.state is PathState.PUNCHING and not p.direct
    assert p.next_deadline() == pytest.approx(10.0)  # the attempt's own timeout
    p.connected(0.2)
    assert p.state is PathState.DIRECT and p.direct and p.cause is Cause.NONE
    # expired material offered: nothing to do
    assert PeerPath(B).offered(5.0, 5.0) == []


def test_silence_after_sending_falls_back_within_two_seconds():
    p = _direct()
    assert p.config.silence == 1.5
    # traffic both ways: stays direct
    for i in range(100):
        t = 1.0 + i * 0.05
        p.sent(t, 100)
        p.heard(t + 0.02, 100)
        assert p.tick(t + 0.02) == []
    assert p.direct and p.bytes_sent == p.bytes_received == 10_000
    # the path is cut at 6.0: sends keep going, nothing comes back
    decisions = []
    i = 0
    while p.direct:
        t = 6.0 + i * 0.01
        p.sent(t)
        decisions += [(round(t, 2), d) for d in p.tick(t)]
        i += 1
    assert decisions == [(6.5, Decision.KEEPALIVE), (7.5, R)]
    assert p.state is PathState.RELAYED and p.cause is Cause.SILENCE
    # one re-punch soon: the path may be back
    assert p.retry_at == pytest.approx(8.5)
    assert p.next_deadline() == pytest.approx(8.5)
    assert p.tick(8.49) == [] and p.tick(8.5) == [P]


def test_a_packet_the_peer_relayed_ends_the_direct_path_at_once():
    """The peer's packets come through the router: it gave the path up (its silence came
    first). Ours ends at once, as after a silence, unless that can be a straggler: within
    ``relay_grace`` of the path coming up, or while the peer is heard directly."""
    cfg = PathConfig()
    assert (cfg.relay_grace, cfg.relay_quiet) == (2.0, 0.5)
    p = _direct()  # up at 0.1
    # relayed before our side came up, still on its way through the router: ignored
    assert p.peer_relayed(0.5) == [] and p.peer_relayed(2.09) == []
    assert p.direct
    # heard directly within the last 0.5 s: the path carries in the peer's direction
    p.heard(5.0, 100)
    assert p.peer_relayed(5.0) == [] and p.peer_relayed(5.49) == []
    assert p.direct
    # nothing direct for 0.5 s and the peer relays: relayed now, no silence to wait out
    assert p.peer_relayed(5.5) == [R]
    assert p.state is PathState.RELAYED and p.cause is Cause.SILENCE and not p.direct
    assert p.retry_at == pytest.approx(6.5) and p.failures == 1
    assert p.tick(6.5) == [P]
    # only while direct: relaying is what a punching or relayed path does itself
    assert p.peer_relayed(7.0) == []
    assert p.state is PathState.PUNCHING
    # a path never heard since it came up (idle), long enough: ends too
    q = _direct(100.0)
    assert q.peer_relayed(102.2) == [R] and q.cause is Cause.SILENCE


def test_idle_direct_path_needs_no_traffic():
    p = _direct()
    # nothing sent, nothing heard, for an hour of minutes: still direct
    assert all(p.tick(t) == [] for t in range(1, 3000, 7))
    assert p.direct and p.next_deadline() == pytest.approx(3600.0)
    # a keepalive goes out (punch.py, every 15 s) and is answered
    p.sent(3000.0)
    p.heard(3000.04)
    assert p.tick(3003.0) == [] and p.direct


def test_only_receiving_is_enough_but_only_sending_is_not():
    p = _direct()
    for i in range(300):
        p.heard(1.0 + i * 0.01)
        assert p.tick(1.0 + i * 0.01) == []
    p = _direct()
    p.sent(1.0)
    p.sent(2.0)  # the clock runs from the first unanswered send
    assert p.tick(2.49) == [Decision.KEEPALIVE]
    assert p.tick(2.5) == [R]


def test_failures_back_off_and_a_stable_path_resets_them():
    cfg = PathConfig(retry_min=10.0, retry_max=60.0, retry_first=1.0, stable=60.0)
    p = PeerPath(B, cfg)
    p.offered(100_000.0, 0.0)
    waits = []
    now = 0.0
    for _ in range(6):
        assert p.failed(now + 3.0, Cause.NO_ANSWER) == [R]
        assert p.cause is Cause.NO_ANSWER
        waits.append(p.retry_at - (now + 3.0))  # type: ignore[operator]
        now = p.retry_at  # type: ignore[assignment]
        assert p.tick(now) == [P]
    assert waits == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    # a renewal during a backoff does not cut it short
    p.failed(now + 3.0)
    assert p.offered(200_000.0, now + 4.0) == [] and p.state is PathState.RELAYED
    assert p.tick(p.retry_at) == [P]  # type: ignore[arg-type]
    # direct for longer than stable: a silence then counts as the first failure again
    p.connected(now + 100.0)
    p.sent(now + 200.0)
    assert p.tick(now + 202.0) == [R]
    assert p.retry_at == pytest.approx(now + 203.0)


def test_flapping_path_backs_off_from_retry_first():
    cfg = PathConfig(retry_first=1.0, stable=60.0)
    p = _direct(0.0, cfg)
    now = 0.1
    waits = []
    for _ in range(4):
        p.sent(now + 1.0)
        (d,) = p.tick(now + 3.0)
        assert d is R
        waits.append(p.retry_at - (now + 3.0))  # type: ignore[operator]
        now = p.retry_at  # type: ignore[assignment]
        assert p.tick(now) == [P]
        p.connected(now + 0.1)
        now += 0.1
    assert waits == pytest.approx([1.0, 2.0, 4.0, 8.0])


def test_attempt_timeout():
    p = PeerPath(B, PathConfig(attempt_timeout=10.0))
    p.offered(3600.0, 0.0)
    assert p.tick(9.9) == [] and p.tick(10.0) == [R]
    assert p.cause is Cause.HANDSHAKE and p.retry_at == pytest.approx(20.0)


def test_expiry_ends_the_path_without_retry():
    p = _direct(0.0)
    p.expires_at = 100.0
    assert p.tick(100.0) == [R] and p.cause is Cause.EXPIRED
    assert p.retry_at is None and p.next_deadline() is None
    # punching when the material runs out
    q = PeerPath(B)
    q.offered(5.0, 0.0)
    assert q.tick(5.0) == [R] and q.cause is Cause.EXPIRED and q.retry_at is None
    # a retry that falls after the expiry does not start
    r = PeerPath(B, PathConfig(retry_min=10.0))
    r.offered(8.0, 0.0)
    r.failed(3.0)
    assert r.tick(13.0) == [] and r.state is PathState.RELAYED and r.cause is Cause.EXPIRED
    # a new offer starts again
    assert r.offered(4000.0, 14.0) == [P]


def test_revoke_and_renewal():
    p = _direct()
    assert p.offered(7200.0, 100.0) == [Decision.REKEY] and p.direct
    assert p.expires_at == 7200.0
    assert p.revoked(200.0) == [R] and p.cause is Cause.REVOKED
    assert p.tick(10_000.0) == [] and p.next_deadline() is None
    assert p.revoked(201.0) == []
    assert p.offered(8000.0, 300.0) == [P]
    # an offer while punching restarts the attempt with the new material
    assert p.offered(9000.0, 301.0) == [P] and p.since == 301.0
    # a failed rekey while direct falls back
    p.connected(302.0)
    assert p.failed(400.0, Cause.HANDSHAKE) == [R] and p.cause is Cause.HANDSHAKE
    assert p.failed(401.0) == []  # already relayed


def test_status_message():
    p = _direct()
    p.sent(1.0, 1500)
    p.heard(1.01, 700)
    p.refused = 3
    st_ = p.status(b"\x07" * 16, 0.01, EB)
    assert (st_.state, st_.cause, st_.bytes_sent, st_.bytes_received, st_.refused) == (
        PathCode.DIRECT,
        Cause.NONE,
        1500,
        700,
        3,
    )
    assert st_.endpoint == EB and m.Status.decode(st_.encode()) == st_
    p.revoked(2.0)
    assert p.status(b"\x07" * 16, None, EB).endpoint is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["offer", "connected", "failed", "revoked", "heard", "sent", "tick"]),
            st.floats(0, 5, allow_nan=False),
        ),
        max_size=60,
    )
)
def test_any_sequence_keeps_the_invariants(ops):
    p = PeerPath(B)
    now = 0.0
    for op, dt in ops:
        now += dt
        if op == "offer":
            out = p.offered(now + 30.0, now)
        elif op == "connected":
            p.connected(now)
            out = []
        elif op == "failed":
            out = p.failed(now)
        elif op == "revoked":
            out = p.revoked(now)
        elif op == "heard":
            p.heard(now, 10)
            out = []
        elif op == "sent":
            p.sent(now, 10)
            out = []
        else:
            out = p.tick(now)
        assert p.direct == (p.state is PathState.DIRECT)
        assert all(isinstance(d, Decision) for d in out)
        if R in out:
            assert p.state is PathState.RELAYED
        if P in out:
            assert p.state is PathState.PUNCHING and p.expires_at is not None
        deadline = p.next_deadline()
        # never before the state began, but for material that expired meanwhile (an
        # event before the tick that would have noticed it): the next tick ends the path
        assert deadline is None or deadline >= p.since or deadline == p.expires_at
        if deadline is not None and deadline < p.since:
            assert R in p.tick(now) and p.state is PathState.RELAYED
        # silence is never longer than configured while direct
        if p.direct and p.waiting_since is not None:
            assert now - p.waiting_since < p.config.silence or p.tick(now) == [R]


# ---- anti-spoofing ------------------------------------------------------------------------


def ip4(src: str, dst: str, size: int = 28) -> bytes:
    s = ipaddress.ip_address(src).packed
    d = ipaddress.ip_address(dst).packed
    return struct.pack(">BBHHHBBH", 0x45, 0, size, 0, 0, 64, 17, 0) + s + d + bytes(size - 20)


def ip6(src: str, dst: str) -> bytes:
    s = ipaddress.ip_address(src).packed
    d = ipaddress.ip_address(dst).packed
    return struct.pack(">IHBB", 0x60000000, 8, 17, 64) + s + d + bytes(8)


GRANT = (ipaddress.ip_network("198.18.20.0/24"), ipaddress.ip_network("2001:db8:20::/48"))
LOCAL = (ipaddress.ip_network("198.18.10.0/24"), ipaddress.ip_network("2001:db8:10::/48"))


def test_only_granted_sources_to_own_destinations_pass():
    acl = DirectAcl(GRANT, peer=B, local=LOCAL + (ipaddress.ip_network(A),))
    good = [
        ip4("198.18.20.5", "198.18.10.7"),
        ip6("2001:db8:20::5", "2001:db8:10::7"),
        ip4("169.254.0.2", "169.254.0.1"),  # the peer's own tunnel address, to ours
    ]
    spoofed = [
        ip4("198.18.30.5", "198.18.10.7"),  # a third site's network
        ip4("198.18.10.9", "198.18.10.7"),  # our own network, from outside
        ip6("2001:db8:30::5", "2001:db8:10::7"),
        ip4("169.254.0.3", "198.18.10.7"),  # another gateway's address
    ]
    transit = [ip4("198.18.20.5", "198.18.30.7"), ip6("2001:db8:20::5", "2001:db8:30::1")]
    junk = [b"", b"\x45" * 10, b"\x50" + bytes(40), b"\x60" + bytes(30)]
    out = acl.filter(good + spoofed + transit + junk)
    assert out == good
    assert (acl.accepted, acl.refused_source, acl.refused_destination) == (3, 4, 2)
    assert acl.refused_malformed == 4 and acl.refused == 10
    # without local networks destinations are not checked
    loose = DirectAcl(GRANT)
    assert loose.filter(transit) == transit and loose.filter(spoofed) == []


def test_super_packets_are_checked_on_the_ip_header_behind_the_virtio_header():
    acl = DirectAcl(GRANT, local=LOCAL)
    vnet = bytes([1, 1, 0, 40, 0x05, 0xB4, 0, 20, 0, 16])
    good = vnet + ip4("198.18.20.5", "198.18.10.7", 60)
    bad = vnet + ip4("198.18.30.5", "198.18.10.7", 60)
    assert acl.filter([good, bad], whole=True) == [good]
    assert acl.refused_source == 1
    # without super-packets agreed the same bytes are malformed
    assert acl.filter([good]) == [] and acl.refused_malformed == 1


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_acl_matches_the_grant_exactly(src, dst):
    acl = DirectAcl(GRANT, local=LOCAL)
    pkt = ip4(str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst)))
    want = ipaddress.IPv4Address(src) in GRANT[0] and ipaddress.IPv4Address(dst) in LOCAL[0]
    assert (acl.filter([pkt]) == [pkt]) is want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=20), st.booleans())
def test_acl_fuzz(packets, whole):
    acl = DirectAcl(GRANT, peer=B, local=LOCAL)
    out = acl.filter(packets, whole=whole)
    assert acl.accepted == len(out) and acl.accepted + acl.refused == len(packets)


# ---- a transfer through simulated NATs, the path cut and restored -------------------------

DATA = b"DATA"
DACK = b"DACK"


class Site:
    """A gateway of the simulation: a direct socket with a puncher, a PeerPath deciding,
    and a transfer that sends a numbered chunk every 10 ms. Chunks go direct while the path
    is direct, else "through the router" (counted, not simulated); the far side answers
    every direct chunk (as KCP acknowledges), and both count what arrived which way."""

    def __init__(self, name: str, address, sock: Endpoint, grant, local) -> None:
        self.name = name
        self.address = address
        self.endpoint = sock
        self.path = PeerPath(B if address == A else A)
        self.keys: PairKeys | None = None
        self.candidates: list[Endpoint] = []
        self.puncher: Puncher | None = None
        self.acl = DirectAcl(grant, local=local)
        self.next_chunk: float | None = None
        self.until = 0.0
        self.seq = 0
        self.peer: Site | None = None
        self.relayed: list[int] = []  # chunk numbers the router carried
        self.received_direct: list[int] = []
        self.log: list[tuple[float, object]] = []
        self.src = "198.18.10.5" if address == A else "198.18.20.5"
        self.dst = "198.18.20.5" if address == A else "198.18.10.5"

    def offer(self, keys: PairKeys, candidates: list[Endpoint], now: float) -> list:
        self.keys, self.candidates = keys, candidates
        return self._decide(self.path.offered(keys.expires_at, now), now)

    def _decide(self, decisions: list[Decision], now: float) -> list:
        out = []
        for d in decisions:
            self.log.append((now, d))
            if d is Decision.PUNCH:
                if self.puncher is not None:
                    self.puncher.close()
                assert self.keys is not None
                self.puncher = Puncher(self.keys, self.candidates, local=[self.endpoint])
                self.puncher.start(now)
            elif d is Decision.KEEPALIVE and self.puncher is not None:
                self.puncher.keepalive_now(now)
            elif d is Decision.RELAY and self.puncher is not None:
                self.puncher.close()
                self.puncher = None
        return out + self._flush(now)

    def _flush(self, now: float) -> list:
        if self.puncher is None:
            return []
        out = self.puncher.datagrams_to_send()
        for data, _ in out:
            if m.parse_datagram(data).kind == m.DatagramKind.PROBE and self.path.direct:
                self.path.sent(now)
        while (ev := self.puncher.next_event()) is not None:
            self.log.append((now, ev))
            if isinstance(ev, PathUp):
                # the DTLS handshake and the proofs would run here; they are tested apart
                self.path.connected(now)
            elif isinstance(ev, PunchFailed):
                out += self._decide(self.path.failed(now, Cause.NO_ANSWER), now)
        return out

    def timer(self) -> float | None:
        times = [self.next_chunk, self.path.next_deadline()]
        if self.puncher is not None:
            times.append(self.puncher.get_timer())
        live = [t for t in times if t is not None]
        return min(live) if live else None

    def fire(self, now: float) -> list:
        out = []
        if self.puncher is not None and (t := self.puncher.get_timer()) is not None and t <= now:
            self.puncher.handle_timer(now)
            out += self._flush(now)
        d = self.path.next_deadline()
        if d is not None and d <= now:
            out += self._decide(self.path.tick(now), now)
        if self.next_chunk is not None and self.next_chunk <= now:
            out += self._chunk(now)
        return out

    def _chunk(self, now: float) -> list:
        self.seq += 1
        self.next_chunk = now + 0.01 if now + 0.01 < self.until else None
        if self.path.direct and self.puncher is not None and self.puncher.selected:
            self.path.sent(now, 64)
            pkt = ip4(self.src, self.dst, 32)
            return [(DATA + struct.pack(">I", self.seq) + pkt, self.puncher.selected)]
        self.relayed.append(self.seq)
        return []

    def datagram(self, data: bytes, src: Endpoint, now: float) -> list:
        if self.puncher is not None and self.puncher.receive(data, src, now):
            if self.path.direct and src == self.puncher.selected:
                self.path.heard(now)
            return self._flush(now)
        if self.puncher is None or src != self.puncher.selected:
            return []  # not from the direct peer: a real gateway's DTLS would drop it
        if data.startswith(DATA):
            self.path.heard(now, len(data) - 8)
            (seq,) = struct.unpack(">I", data[4:8])
            if self.acl.filter([data[8:]]):
                self.received_direct.append(seq)
            self.path.refused = self.acl.refused
            return [(DACK + data[4:8], src)]
        if data.startswith(DACK):
            self.path.heard(now)
        return []


def test_transfer_survives_a_cut_of_the_direct_path():
    na = Nat("198.18.0.10", "198.19.1.0/24", Mapping.INDEPENDENT, Filtering.ADDRESS_PORT, seed=3)
    nb = Nat("198.18.0.20", "198.19.2.0/24", Mapping.INDEPENDENT, Filtering.ADDRESS_PORT, seed=4)
    net = Net([na, nb], delays={("198.18.0.10", "198.18.0.20"): 0.005})
    sock_a = Endpoint(ipaddress.ip_address("198.19.1.2"), 5000)
    sock_b = Endpoint(ipaddress.ip_address("198.19.2.2"), 5000)
    grant_a = (ipaddress.ip_network("198.18.10.0/24"),)
    grant_b = (ipaddress.ip_network("198.18.20.0/24"),)
    sa = Site("A", A, sock_a, grant_b, grant_a)
    sb = Site("B", B, sock_b, grant_a, grant_b)
    # the public mappings as the router's endpoint probes would have found them (the
    # discovery itself is tests/test_direct_punch.py's): EIM, so the mapping any outbound
    # datagram gets is the one
    router = Endpoint(ipaddress.ip_address("198.18.0.1"), 4443)
    pub_a = na.outbound(sock_a, router, 0.0)
    pub_b = nb.outbound(sock_b, router, 0.0)
    material = K.issue()
    ka = PairKeys.derive(material.pair_id, material.secret, A, B, 3600.0)
    kb = PairKeys.derive(material.pair_id, material.secret, B, A, 3600.0)
    actors = [sa, sb]
    for s in actors:
        s.until = 40.0
        s.next_chunk = 0.0
    for data, dst in sa.offer(ka, [sock_b, pub_b], 0.0):
        net.send(sock_a, dst, data, 0.0)
    for data, dst in sb.offer(kb, [sock_a, pub_a], 0.0):
        net.send(sock_b, dst, data, 0.0)

    def both_direct(_t: float) -> bool:
        return sa.path.direct and sb.path.direct

    t_up = run(net, actors, 0.0, 3.0, stop=both_direct)
    assert both_direct(t_up) and t_up < 1.0, "direct within 3 s of the first packet"
    run(net, actors, t_up, 10.0)
    assert sa.path.direct and sb.path.direct
    assert len(sa.received_direct) > 800 and sa.relayed[-1] < 100
    # cut: every datagram between the two NATs is dropped from 10.0 on
    net.cut = lambda src, dst: {src.address, dst.address} == {na.public, nb.public}
    t_relayed = run(net, actors, 10.0, 20.0, stop=lambda t: not sa.path.direct)
    assert t_relayed - 10.0 <= 2.0, "back through the router within 2 s"
    run(net, actors, t_relayed, 13.0, stop=lambda t: not sb.path.direct)
    assert not sb.path.direct and sb.path.cause is Cause.SILENCE
    # what was sent direct into the cut is lost (TCP inside resends); from now on it is
    # relayed: every chunk of both is accounted for, direct or relayed
    cut_at = run(net, actors, 13.0, 15.0)
    relayed_during = [s for s in sa.relayed if s > 1200]
    assert relayed_during, "relayed while cut"
    # the path returns at 15 s: re-punched (1 s, then 2 s, 4 s after failures) and direct
    net.cut = None
    t_back = run(net, actors, cut_at, 40.0, stop=both_direct)
    assert both_direct(t_back) and t_back - 15.0 < 10.0
    assert sa.path.transitions >= 4
    run(net, actors, t_back, 40.0)
    # nothing was refused: every direct chunk came from the grant
    assert sa.acl.refused == sb.acl.refused == 0
    for s in (sa, sb):
        other = sb if s is sa else sa
        lost = set(range(1, s.seq + 1)) - set(s.relayed) - set(other.received_direct)
        # lost only while the cut was not yet noticed (1.5 s of 10 ms chunks, and those
        # in flight)
        assert 100 < len(lost) <= 160, len(lost)
    punches = [(round(t, 2), d) for t, d in sa.log if d is Decision.PUNCH]
    assert punches[0][0] == 0.0 and len(punches) >= 2


def test_spoofed_direct_packets_are_refused_and_counted():
    acl = DirectAcl((ipaddress.ip_network("198.18.20.0/24"),), peer=B)
    spoofed = [ip4("198.18.10.5", "198.18.10.6") for _ in range(5)]
    assert acl.filter(spoofed) == [] and acl.refused_source == 5
    path = PeerPath(A)
    path.refused = acl.refused
    assert path.status(b"\x01" * 16, None, None).refused == 5


def test_punching_state_is_not_direct():
    p = PeerPath(B)
    p.offered(10.0, 0.0)
    assert not p.direct and p.state is PathState.PUNCHING
    assert PunchState.PROBING.value == "probing"


def test_joining_a_punching_peer():
    """A probe of the current material while relayed in a backoff starts an attempt at
    once, but not within retry_first of the last one ending, nor without material."""
    p = PeerPath(B)
    assert p.offered(100.0, 0.0) == [P]
    assert p.failed(3.0) == [R] and p.retry_at == pytest.approx(13.0)
    # the last probes of the attempt that failed on both sides: no new attempt
    assert p.peer_punching(3.5) == [] and p.state is PathState.RELAYED
    # the peer's next attempt, before our own backoff ends: join it
    assert p.peer_punching(8.0) == [P] and p.state is PathState.PUNCHING
    assert p.retry_at is None
    # while punching or direct it changes nothing
    assert p.peer_punching(8.5) == []
    p.connected(9.0)
    assert p.peer_punching(20.0) == [] and p.state is PathState.DIRECT
    # revoked: no material, no attempt
    p.revoked(30.0)
    assert p.peer_punching(40.0) == [] and p.state is PathState.RELAYED


@pytest.mark.parametrize("start", [0.2, 0.8, 0.9, 1.3, 1.8])
def test_a_deadline_is_due_when_next_deadline_says(start):
    """Woken at ``next_deadline``, ``tick`` acts: in floats ``(w + d) - w`` can fall short
    of ``d`` (0.2 + 0.5 - 0.2 < 0.5), and comparing a difference left the caller's timer
    firing at the same instant for ever (the simulation of test_direct_manager hung)."""
    p = _direct(0.0)
    p.sent(start)
    t = p.next_deadline()
    assert t == start + 0.5 and p.tick(t) == [Decision.KEEPALIVE]
    t = p.next_deadline()
    assert t == start + 1.5 and p.tick(t) == [R]
    q = PeerPath(B)
    assert q.offered(100.0, start) == [P]
    t = q.next_deadline()
    assert t == start + 10.0 and q.tick(t) == [R]

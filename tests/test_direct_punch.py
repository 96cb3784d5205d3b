"""Hole punching (polevpn.direct.punch) and endpoint discovery (polevpn.direct.endpoint):
two punchers on a perfect link, what a third party can and cannot do, pacing, deadline and
keepalives; then whole rendezvous runs through simulated NATs (tests/natsim.py): the
router learns each gateway's public mapping from its probes, offers the pair, and the two
punch. Endpoint-independent mapping goes direct, symmetric NAT on both sides stays relayed.
"""

from __future__ import annotations

import ipaddress
import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from natsim import Filtering, Mapping, Nat, Net, run

from polevpn.direct import keys as K
from polevpn.direct import messages as m
from polevpn.direct.endpoint import EndpointProber, EndpointRegistry
from polevpn.direct.keys import PairKeys, Side
from polevpn.direct.messages import (
    Candidate,
    CandidateKind,
    Candidates,
    Datagram,
    DatagramKind,
    Endpoint,
    EndpointParams,
    Offer,
)
from polevpn.direct.punch import (
    KeepaliveAcked,
    PathUp,
    PeerMoved,
    PunchConfig,
    Puncher,
    PunchFailed,
    PunchState,
)

A = ipaddress.ip_address("169.254.0.1")
B = ipaddress.ip_address("169.254.0.2")
C = ipaddress.ip_address("169.254.0.3")
PAIR = bytes(range(16))
SECRET = bytes(range(64, 96))
EA = Endpoint(ipaddress.ip_address("198.18.0.10"), 5000)
EB = Endpoint(ipaddress.ip_address("198.18.0.20"), 6000)
ROUTER_UDP = Endpoint(ipaddress.ip_address("198.18.0.1"), 4443)


def ep(text: str) -> Endpoint:
    host, port = text.rsplit(":", 1)
    return Endpoint(ipaddress.ip_address(host.strip("[]")), int(port))


def _keys(me, peer, pair=PAIR, secret=SECRET, expires=1000.0) -> PairKeys:
    return PairKeys.derive(pair, secret, me, peer, expires)


def _seeded(seed: int = 7):
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def drain(p: Puncher) -> list:
    out = []
    while (ev := p.next_event()) is not None:
        out.append(ev)
    return out


class Wire:
    """Two punchers joined by a perfect link with a fixed one-way delay; ``drop`` decides
    per datagram (source, destination) whether it is lost."""

    def __init__(self, a: Puncher, b: Puncher, delay: float = 0.01) -> None:
        self.ends = {EA: a, EB: b}
        self.delay = delay
        self.flight: list[tuple[float, int, bytes, Endpoint, Endpoint]] = []
        self.seq = itertools.count()
        self.drop = lambda src, dst: False
        self.log: list[tuple[float, Endpoint, Endpoint, bytes]] = []

    def flush(self, src: Endpoint, now: float) -> None:
        for data, dst in self.ends[src].datagrams_to_send():
            self.log.append((now, src, dst, data))
            if not self.drop(src, dst):
                self.flight.append((now + self.delay, next(self.seq), data, src, dst))

    def run(self, now: float, until: float) -> float:
        for _ in range(100_000):
            times = [t for t in (p.get_timer() for p in self.ends.values()) if t is not None]
            times += [f[0] for f in self.flight]
            if not times or min(times) > until:
                return until
            now = max(now, min(times))
            self.flight.sort()
            while self.flight and self.flight[0][0] <= now:
                _, _, data, src, dst = self.flight.pop(0)
                if dst in self.ends:
                    self.ends[dst].receive(data, src, now)
                    self.flush(dst, now)
            for e, p in self.ends.items():
                t = p.get_timer()
                if t is not None and t <= now:
                    p.handle_timer(now)
                    self.flush(e, now)
        raise AssertionError("did not settle")


def _pair_on_wire(config: PunchConfig | None = None, delay: float = 0.01):
    a = Puncher(_keys(A, B), [EB], config, local=[EA], random=_seeded(1))
    b = Puncher(_keys(B, A), [EA], config, local=[EB], random=_seeded(2))
    return a, b, Wire(a, b, delay)


# ---- two punchers on a perfect link -------------------------------------------------------


def test_direct_comes_up_and_the_initiator_nominates():
    a, b, wire = _pair_on_wire()
    a.start(0.0)
    wire.flush(EA, 0.0)
    b.start(0.0)
    wire.flush(EB, 0.0)
    wire.run(0.0, 1.0)
    assert a.state is b.state is PunchState.CONNECTED
    assert a.keys.initiator and not b.keys.initiator
    assert (a.selected, b.selected) == (EB, EA)
    (up_a,) = [e for e in drain(a) if isinstance(e, PathUp)]
    (up_b,) = [e for e in drain(b) if isinstance(e, PathUp)]
    # the initiator learns the round trip of its nomination and how B sees it
    assert up_a.endpoint == EB and up_a.rtt == pytest.approx(0.02) and up_a.mapped == EA
    assert up_b.endpoint == EA and up_b.mapped is None
    # probe, ack, nominate, ack: two round trips
    assert a.rtt == pytest.approx(0.02)
    nominations = [d for _, s, _, d in wire.log if s == EA and m.parse_datagram(d).nominate]
    assert len(nominations) == 1


def test_every_datagram_is_64_bytes_authenticated_with_the_direction_key():
    a, b, wire = _pair_on_wire()
    a.start(0.0)
    b.start(0.0)
    wire.flush(EA, 0.0)
    wire.flush(EB, 0.0)
    wire.run(0.0, 1.0)
    assert wire.log
    for _, src, _, data in wire.log:
        assert len(data) == 64 and m.is_datagram(data)
        sender = wire.ends[src]
        assert m.authentic(data, sender.keys.send_probe_key)
        assert not m.authentic(data, sender.keys.recv_probe_key)


def test_a_silent_peer_fails_at_the_deadline_with_bounded_paced_probes():
    cfg = PunchConfig()
    cands = [ep(f"198.18.0.{i}:7000") for i in range(20, 40)]
    a = Puncher(_keys(A, B), cands, cfg, local=[EA], random=_seeded())
    a.start(0.0)
    sent: list[tuple[float, Endpoint]] = [(0.0, d) for _, d in a.datagrams_to_send()]
    now = 0.0
    while a.state is PunchState.PROBING:
        now = a.get_timer()
        assert now is not None
        a.handle_timer(now)
        sent += [(now, d) for _, d in a.datagrams_to_send()]
    assert a.state is PunchState.FAILED and now == pytest.approx(3.0)
    (failed,) = drain(a)
    assert isinstance(failed, PunchFailed) and "no candidate answered within 3s" in failed.reason
    # 16 candidates at most, each probed in every round, all at the same moments
    rounds = sorted({t for t, _ in sent})
    assert len({d for _, d in sent}) == cfg.max_candidates
    assert all(sum(1 for t, _ in sent if t == r) == cfg.max_candidates for r in rounds)
    gaps = [b - a for a, b in itertools.pairwise(rounds)]
    assert gaps[0] == pytest.approx(0.1) and max(gaps) == pytest.approx(0.5)
    assert all(g2 >= g1 - 1e-9 for g1, g2 in itertools.pairwise(gaps))
    assert len(sent) == a.probes_sent <= cfg.max_probes
    assert a.get_timer() is None


def test_the_probe_budget_is_a_hard_cap():
    cfg = PunchConfig(max_probes=20, interval=0.01, interval_max=0.01)
    cands = [ep(f"198.18.0.{i}:7000") for i in range(20, 30)]
    a = Puncher(_keys(A, B), cands, cfg, random=_seeded())
    a.start(0.0)
    now = 0.0
    while a.state is PunchState.PROBING:
        now = a.get_timer()  # type: ignore[assignment]
        a.handle_timer(now)
    assert a.probes_sent == 20


def test_candidates_are_filtered():
    own = ep("198.18.0.10:5000")
    six = ep("[2001:db8::1]:5000")
    cands = [own, EB, EB, six]
    a = Puncher(_keys(A, B), cands, local=[own])
    # our own endpoint, a duplicate, and a family we have no address of are not probed
    assert a.targets == [EB]
    assert Puncher(_keys(A, B), cands, local=[own, ep("[2001:db8::2]:5000")]).targets == [EB, six]
    assert Puncher(_keys(A, B), cands).targets == [own, EB, six]
    empty = Puncher(_keys(A, B), [own], local=[own])
    empty.start(0.0)
    assert empty.state is PunchState.FAILED and "no candidate" in drain(empty)[0].reason


def test_a_third_party_can_neither_confirm_nor_fake_a_path():
    a, b, wire = _pair_on_wire()
    a.start(0.0)
    b.start(0.0)
    (probe, _), = a.datagrams_to_send()
    b.datagrams_to_send()
    nonce = m.parse_datagram(probe).nonce
    # C holds material for its own pair with A, and knows the A-B pair id from the wire
    c = _keys(C, A, pair=b"\x05" * 16)
    forged_ack = Datagram(DatagramKind.ACK, PAIR, nonce, EA).encode(c.send_probe_key)
    assert a.receive(forged_ack, EB, 0.01) is True
    assert a.refused_tag == 1 and a.state is PunchState.PROBING and a.selected is None
    forged_probe = Datagram(DatagramKind.PROBE, PAIR, 1, flags=m.FLAG_NOMINATE)
    assert b.receive(forged_probe.encode(c.send_probe_key), EA, 0.01) is True
    assert b.refused_tag == 1 and b.state is PunchState.PROBING
    # ... and is not acked: C learns nothing about whether B is there
    assert b.datagrams_to_send() == []
    # a probe of C's own pair is not for this puncher at all: the caller offers it elsewhere
    own_pair = Datagram(DatagramKind.PROBE, c.pair_id, 1).encode(c.send_probe_key)
    assert b.receive(own_pair, EA, 0.01) is False
    # A's own probe reflected back at it: made with A's send key, checked with its receive key
    assert a.receive(probe, EB, 0.02) is True and a.refused_tag == 2
    # not a direct-path datagram at all
    assert a.receive(b"\x16\xfe\xfd" + bytes(61), EB, 0.02) is False


def test_acks_must_be_fresh_and_come_from_where_the_probe_went():
    a, b, _ = _pair_on_wire()
    a.start(0.0)
    (probe, dest), = a.datagrams_to_send()
    nonce = m.parse_datagram(probe).nonce
    ack = Datagram(DatagramKind.ACK, PAIR, nonce, EA).encode(b.keys.send_probe_key)
    # from somewhere else than the probe's destination: not a path
    assert a.receive(ack, ep("198.18.0.99:6000"), 0.01) and a.refused_source == 1
    assert a.selected is None
    assert a.receive(ack, dest, 0.02) and a.selected == EB
    # the same ACK again (a replay): nothing new
    assert a.receive(ack, dest, 0.03) and a.refused_stale == 1
    # an ACK for a nonce never sent
    other = Datagram(DatagramKind.ACK, PAIR, nonce ^ 1, EA).encode(b.keys.send_probe_key)
    assert a.receive(other, dest, 0.03) and a.refused_stale == 2


def test_the_responder_waits_for_the_nomination():
    a, b, wire = _pair_on_wire()
    # A's nominations never arrive: B's probes are answered, but B does not connect
    wire.drop = lambda src, dst: src == EA and wire.log[-1][3][2] == m.FLAG_NOMINATE
    a.start(0.0)
    b.start(0.0)
    wire.flush(EA, 0.0)
    wire.flush(EB, 0.0)
    wire.run(0.0, 5.0)
    assert b.state is PunchState.FAILED and "no nomination" in drain(b)[-1].reason
    assert a.state is PunchState.FAILED
    assert "nominated candidate stopped answering" in drain(a)[-1].reason


def test_learned_candidate_when_the_peer_comes_from_elsewhere():
    """The peer's NAT mapped it anew for us: its probe comes from an endpoint that is no
    candidate; that one is probed at once and can be nominated."""
    actual = ep("198.18.0.20:31337")
    a = Puncher(_keys(A, B), [EB], random=_seeded(1))
    b = Puncher(_keys(B, A), [EA], random=_seeded(2))
    a.start(0.0)
    a.datagrams_to_send()
    b.start(0.0)
    (probe_b, _), = b.datagrams_to_send()
    assert a.receive(probe_b, actual, 0.01)
    out = a.datagrams_to_send()
    kinds = [(m.parse_datagram(d).kind, to) for d, to in out]
    assert kinds == [(DatagramKind.ACK, actual), (DatagramKind.PROBE, actual)]
    assert a.targets == [EB, actual] and a.learned == 1
    # B answers the probe to its real endpoint; A nominates that one
    assert b.receive(out[1][0], EA, 0.02)
    (ack, _), = [x for x in b.datagrams_to_send() if m.parse_datagram(x[0]).kind == 4]
    assert a.receive(ack, actual, 0.03) and a.selected == actual


def test_learning_is_bounded():
    a = Puncher(_keys(A, B), [EB], PunchConfig(max_learned=2), random=_seeded(1))
    b_keys = _keys(B, A)
    a.start(0.0)
    for port in range(40000, 40010):
        probe = Datagram(DatagramKind.PROBE, PAIR, port).encode(b_keys.send_probe_key)
        a.receive(probe, ep(f"198.18.0.20:{port}"), 0.01)
    assert a.learned == 2 and len(a.targets) == 3


def test_acks_are_rate_limited():
    cfg = PunchConfig(max_acks_per_second=10)
    a = Puncher(_keys(A, B), [EB], cfg, random=_seeded(1))
    b_keys = _keys(B, A)
    a.start(0.0)
    a.datagrams_to_send()
    for i in range(50):
        probe = Datagram(DatagramKind.PROBE, PAIR, i).encode(b_keys.send_probe_key)
        a.receive(probe, EB, 0.5)
    assert a.acks_sent == 10 and a.acks_limited == 40
    # 0.3 s later the bucket holds 3 again
    for i in range(100, 110):
        probe = Datagram(DatagramKind.PROBE, PAIR, i).encode(b_keys.send_probe_key)
        a.receive(probe, EB, 0.8)
    assert a.acks_sent == 13


def test_keepalives_hold_the_path_and_measure_it():
    cfg = PunchConfig(keepalive=15.0, keepalive_retry=0.5, keepalive_tries=4)
    a, b, wire = _pair_on_wire(cfg, delay=0.02)
    a.start(0.0)
    b.start(0.0)
    wire.flush(EA, 0.0)
    wire.flush(EB, 0.0)
    wire.run(0.0, 1.0)
    assert a.state is b.state is PunchState.CONNECTED
    drain(a), drain(b)
    start = len(wire.log)
    wire.run(1.0, 46.0)
    sends = [(round(t, 3), s) for t, s, _, _ in wire.log[start:]]
    # each side probes every 15 s and gets an ACK (the other's line): 3 each in 45 s
    probes = [x for x in wire.log[start:] if m.parse_datagram(x[3]).kind == DatagramKind.PROBE]
    assert len(probes) == 6, sends
    acked = [e for e in drain(a) if isinstance(e, KeepaliveAcked)]
    assert len(acked) == 3 and all(e.rtt == pytest.approx(0.04) for e in acked)
    # the initiator's keepalives nominate (the responder follows a NAT that rebinds it)
    assert all(m.parse_datagram(x[3]).nominate for x in probes if x[1] == EA)
    # the peer goes away: resent every 0.5 s, 4 tries, then the next interval
    wire.drop = lambda src, dst: True
    start = len(wire.log)
    now = wire.run(46.0, 80.0)
    times = [t for t, s, _, _ in wire.log[start:] if s == EA]
    base = times[0]
    assert [round(t - base, 3) for t in times] == [0.0, 0.5, 1.0, 1.5, 16.5, 17.0, 17.5, 18.0]
    assert now == 80.0 and a.state is PunchState.CONNECTED  # path.py decides it is dead


def test_the_responder_follows_a_rebound_initiator():
    a, b, wire = _pair_on_wire()
    a.start(0.0)
    b.start(0.0)
    wire.flush(EA, 0.0)
    wire.flush(EB, 0.0)
    wire.run(0.0, 1.0)
    drain(b)
    moved = ep("198.18.0.10:5999")
    probe = Datagram(DatagramKind.PROBE, PAIR, 42, flags=m.FLAG_NOMINATE)
    assert b.receive(probe.encode(a.keys.send_probe_key), moved, 2.0)
    assert b.selected == moved and drain(b) == [PeerMoved(moved)]
    # a non-nominating probe (a late round) does not move it
    late = Datagram(DatagramKind.PROBE, PAIR, 43).encode(a.keys.send_probe_key)
    b.receive(late, EA, 2.1)
    assert b.selected == moved


def test_expired_material_is_refused_and_ends_an_attempt():
    a = Puncher(_keys(A, B, expires=1.0), [EB], random=_seeded(1))
    b_keys = _keys(B, A, expires=1.0)
    a.start(0.0)
    a.datagrams_to_send()
    probe = Datagram(DatagramKind.PROBE, PAIR, 5).encode(b_keys.send_probe_key)
    assert a.receive(probe, EB, 1.0) and a.refused_expired == 1
    assert a.datagrams_to_send() == []
    a.handle_timer(1.0)
    assert a.state is PunchState.FAILED and "expired" in drain(a)[-1].reason


def test_close_stops_everything():
    a, b, _ = _pair_on_wire()
    a.start(0.0)
    a.close()
    assert a.get_timer() is None and a.state is PunchState.CLOSED
    probe = Datagram(DatagramKind.PROBE, PAIR, 1).encode(b.keys.send_probe_key)
    assert a.receive(probe, EB, 0.1) is False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.binary(max_size=80),
                st.binary(min_size=62, max_size=62).map(lambda b: b"\xd1" + bytes([b[0] % 6]) + b),
            ),
            st.sampled_from([EA, EB, ep("198.18.0.99:1")]),
        ),
        max_size=30,
    )
)
def test_fuzz_garbage_never_breaks_a_puncher(garbage):
    a, b, wire = _pair_on_wire()
    a.start(0.0)
    b.start(0.0)
    for i, (data, src) in enumerate(garbage):
        a.receive(data, src, 0.001 * i)
        b.receive(data, src, 0.001 * i)
    # nothing garbage did stops them connecting afterwards
    wire.flush(EA, 0.05)
    wire.flush(EB, 0.05)
    wire.run(0.05, 1.0)
    assert a.state is b.state is PunchState.CONNECTED


# ---- endpoint discovery -------------------------------------------------------------------


def _params(reg: EndpointRegistry, gw=A, now=0.0, lifetime=600) -> EndpointParams:
    params = reg.issue(gw, ROUTER_UDP.port, now, lifetime)
    # over the wire and back, as the gateway gets it
    return m.decode(params.COMMAND, params.encode())  # type: ignore[return-value]


def test_endpoint_probe_and_reply():
    reg = EndpointRegistry(random=_seeded(3))
    prober = EndpointProber(_params(reg), 0.0)
    (probe,) = prober.handle_timer(0.0)
    seen = ep("198.18.0.10:41000")
    reply, obs = reg.receive(probe, seen, 0.01)
    assert obs is not None and (obs.gateway, obs.endpoint, obs.changed) == (A, seen, True)
    assert reg.public(A, 0.01) == seen and len(reply) == len(probe) == 64
    assert prober.receive(reply, 0.02) == seen and prober.public == seen
    # next probe a full interval later (it also keeps the NAT's mapping to the router)
    assert prober.get_timer() == pytest.approx(20.02)
    (probe2,) = prober.handle_timer(20.02)
    reply2, obs2 = reg.receive(probe2, seen, 20.03)
    assert obs2 is not None and not obs2.changed and reply2 is not None


def test_endpoint_refusals():
    reg = EndpointRegistry(random=_seeded(3))
    params = _params(reg, lifetime=10)
    prober = EndpointProber(params, 0.0)
    (probe,) = prober.handle_timer(0.0)
    seen = ep("198.18.0.10:41000")
    assert reg.receive(b"\xd1" + bytes(63), seen, 0.0) == (None, None)
    assert reg.refused_malformed == 1
    stranger = Datagram(DatagramKind.ENDPOINT_PROBE, b"\x01" * 16, 1).encode(bytes(32))
    assert reg.receive(stranger, seen, 0.0) == (None, None) and reg.refused_unknown == 1
    forged = Datagram(DatagramKind.ENDPOINT_PROBE, params.token, 5).encode(bytes(32))
    assert reg.receive(forged, seen, 0.0) == (None, None) and reg.refused_tag == 1
    assert reg.receive(probe, seen, 0.0)[1] is not None
    # the same probe replayed from elsewhere does not move the mapping
    assert reg.receive(probe, ep("198.18.0.66:1"), 0.5) == (None, None)
    assert reg.refused_replay == 1 and reg.public(A, 0.5) == seen
    # a flood of fresh probes is recorded but answered at most every min_interval
    replies = 0
    for i in range(2, 12):
        d = Datagram(DatagramKind.ENDPOINT_PROBE, params.token, i).encode(params.key)
        replies += reg.receive(d, seen, 1.0)[0] is not None
    assert replies == 1 and reg.refused_rate == 9
    late = Datagram(DatagramKind.ENDPOINT_PROBE, params.token, 99).encode(params.key)
    assert reg.receive(late, seen, 10.0) == (None, None) and reg.refused_expired == 1
    assert reg.public(A, 10.0) is None
    # the prober takes only an authentic reply to its latest probe
    assert prober.receive(probe, 0.1) is None and prober.refused == 1
    # a new token replaces the old one; the mapping seen is kept
    params2 = _params(reg, now=20.0)
    assert reg.receive(probe, seen, 20.0) == (None, None) and reg.refused_unknown == 2
    assert reg.public(A, 20.0) == seen and params2.token != params.token
    reg.revoke(A)
    assert reg.public(A, 20.0) is None and len(reg) == 0


def test_endpoint_prober_retries_and_stops_at_expiry():
    reg = EndpointRegistry(random=_seeded(3))
    prober = EndpointProber(_params(reg, lifetime=30), 0.0, interval=20.0, retry=1.0)
    times = []
    now = 0.0
    while (t := prober.get_timer()) is not None and t < 100:
        now = t
        if prober.handle_timer(now):
            times.append(now)
    assert times == [0.0, 1.0, 3.0, 7.0, 15.0]
    # the next one would be due after the token's end: none is sent, and none after
    assert prober.get_timer() is None and now == 31.0


# ---- through simulated NATs ---------------------------------------------------------------


class SimGateway:
    """A gateway of the simulation: its direct socket, the endpoint prober, a puncher."""

    def __init__(self, address, sock: Endpoint) -> None:
        self.address = address
        self.endpoint = sock
        self.prober: EndpointProber | None = None
        self.puncher: Puncher | None = None
        self.events: list[tuple[float, object]] = []

    def timer(self) -> float | None:
        times = [
            t
            for t in (
                self.prober.get_timer() if self.prober else None,
                self.puncher.get_timer() if self.puncher else None,
            )
            if t is not None
        ]
        return min(times) if times else None

    def _out(self, now: float) -> list:
        out = []
        if self.puncher is not None:
            out += self.puncher.datagrams_to_send()
            while (ev := self.puncher.next_event()) is not None:
                self.events.append((now, ev))
        return out

    def fire(self, now: float) -> list:
        out = []
        if self.prober is not None:
            out += [(d, ROUTER_UDP) for d in self.prober.handle_timer(now)]
        if self.puncher is not None:
            self.puncher.handle_timer(now)
        return out + self._out(now)

    def datagram(self, data: bytes, src: Endpoint, now: float) -> list:
        if self.puncher is not None and self.puncher.receive(data, src, now):
            return self._out(now)
        if self.prober is not None and src == ROUTER_UDP:
            self.prober.receive(data, now)
        return []


class SimRouter:
    endpoint = ROUTER_UDP

    def __init__(self) -> None:
        self.registry = EndpointRegistry()

    def timer(self) -> None:
        return None

    def fire(self, now: float) -> list:
        return []

    def datagram(self, data: bytes, src: Endpoint, now: float) -> list:
        reply, _ = self.registry.receive(data, src, now)
        return [(reply, src)] if reply is not None else []


GW_A = ep("198.19.1.2:5000")
GW_B = ep("198.19.2.2:5000")


def rendezvous(nat_a: Nat | None, nat_b: Nat | None, gw_b: Endpoint = GW_B, delay_b=0.0):
    """Both gateways discover their public endpoints, the router offers the pair, both
    punch (B's offer ``delay_b`` later). Returns the gateways, the net, and the time the
    first offer arrived."""
    net = Net([n for n in (nat_a, nat_b) if n is not None], delay=0.02)
    router = SimRouter()
    ga, gb = SimGateway(A, GW_A), SimGateway(B, gw_b)
    for gw in (ga, gb):
        params = router.registry.issue(gw.address, ROUTER_UDP.port, 0.0)
        gw.prober = EndpointProber(m.decode(params.COMMAND, params.encode()), 0.0)
    actors = [ga, gb, router]
    reg = router.registry
    now = run(net, actors, 0.0, 5.0, stop=lambda t: bool(reg.public(A, t) and reg.public(B, t)))
    assert reg.public(A, now) and reg.public(B, now), "the router never saw both gateways"
    sides = []
    for gw in (ga, gb):
        host = m.decode(Candidates.COMMAND, Candidates((gw.endpoint,)).encode())
        cands = tuple(Candidate(CandidateKind.HOST, e) for e in host.endpoints)  # type: ignore[union-attr]
        public = reg.public(gw.address, now)
        if public is not None and public not in host.endpoints:  # type: ignore[union-attr]
            cands += (Candidate(CandidateKind.PUBLIC, public),)
        net_ = ipaddress.ip_network("198.19.1.0/24" if gw is ga else "198.19.2.0/24")
        sides.append(Side(gw.address, cands, (net_,)))
    to_a, to_b = K.pair_offers(K.issue(), sides[0], sides[1])
    t0 = now + 0.1
    for gw, offer, at in ((ga, to_a, t0), (gb, to_b, t0 + delay_b)):
        run(net, actors, now, at)
        now = at
        got: Offer = m.decode(offer.COMMAND, offer.encode())  # type: ignore[assignment]
        keys = PairKeys.from_offer(got, {gw.address}, at)
        gw.puncher = Puncher(keys, [c.endpoint for c in got.candidates], local=[gw.endpoint])
        gw.puncher.start(at)
        for data, dst in gw._out(at):
            net.send(gw.endpoint, dst, data, at)

    def settled(_t: float) -> bool:
        return all(g.puncher.state in (PunchState.CONNECTED, PunchState.FAILED) for g in (ga, gb))  # type: ignore[union-attr]

    run(net, actors, now, t0 + 6.0, stop=settled)
    return ga, gb, net, t0


def _nat(public: str, lan: str, mapping: Mapping, filtering: Filtering, seed: int) -> Nat:
    return Nat(public, lan, mapping, filtering, seed=seed)


EIM = Mapping.INDEPENDENT
SYM = Mapping.ADDRESS_PORT
CASES = [
    # mapping and filtering of A's NAT, of B's NAT, the outcome
    ((EIM, Filtering.INDEPENDENT), (EIM, Filtering.INDEPENDENT), "direct"),
    ((EIM, Filtering.ADDRESS), (EIM, Filtering.ADDRESS), "direct"),
    # port-restricted cone both sides (Linux masquerade): simultaneous probes open both
    ((EIM, Filtering.ADDRESS_PORT), (EIM, Filtering.ADDRESS_PORT), "direct"),
    # symmetric on one side only: the other learns its new mapping from its probe
    ((SYM, Filtering.ADDRESS_PORT), (EIM, Filtering.INDEPENDENT), "direct"),
    ((EIM, Filtering.ADDRESS), (SYM, Filtering.ADDRESS_PORT), "direct"),
    # symmetric against port-restricted: no probe reaches a mapping the other knows
    ((SYM, Filtering.ADDRESS_PORT), (EIM, Filtering.ADDRESS_PORT), "relay"),
    # symmetric on both sides: relay
    ((SYM, Filtering.ADDRESS_PORT), (SYM, Filtering.ADDRESS_PORT), "relay"),
    ((Mapping.ADDRESS, Filtering.ADDRESS), (SYM, Filtering.ADDRESS), "relay"),
]


def _case_id(case) -> str:
    short = {
        Mapping.INDEPENDENT: "eim",
        Mapping.ADDRESS: "adm",
        Mapping.ADDRESS_PORT: "sym",
        Filtering.INDEPENDENT: "eif",
        Filtering.ADDRESS: "adf",
        Filtering.ADDRESS_PORT: "apdf",
    }
    (ma, fa), (mb, fb), outcome = case
    return f"{short[ma]}+{short[fa]}-{short[mb]}+{short[fb]}-{outcome}"


@pytest.mark.parametrize("nat_a, nat_b, outcome", CASES, ids=[_case_id(c) for c in CASES])
def test_rendezvous_through_nats(nat_a, nat_b, outcome):
    na = _nat("198.18.0.10", "198.19.1.0/24", *nat_a, seed=11)
    nb = _nat("198.18.0.20", "198.19.2.0/24", *nat_b, seed=22)
    ga, gb, net, t0 = rendezvous(na, nb)
    pa, pb = ga.puncher, gb.puncher
    assert pa is not None and pb is not None
    if outcome == "direct":
        assert pa.state is pb.state is PunchState.CONNECTED
        ups = [(t, e) for g in (ga, gb) for t, e in g.events if isinstance(e, PathUp)]
        assert len(ups) == 2
        # within 3 s of the offers (the issue's "first packet"); here a few round trips
        assert max(t for t, _ in ups) - t0 < 1.0
        # each side sends to an endpoint of the other's NAT that reaches it
        assert pa.selected.address == nb.public  # type: ignore[union-attr]
        assert pb.selected.address == na.public  # type: ignore[union-attr]
        # and a datagram along the chosen pair arrives at the other gateway's socket
        net.send(GW_A, pa.selected, b"ping", 10.0)  # type: ignore[arg-type]
        net.send(GW_B, pb.selected, b"pong", 10.0)  # type: ignore[arg-type]
        got = net.deliver_due(11.0)
        assert {(d, x) for d, _, x in got} == {(GW_B, b"ping"), (GW_A, b"pong")}
    else:
        assert pa.state is pb.state is PunchState.FAILED
        fails = [(t, e) for g in (ga, gb) for t, e in g.events if isinstance(e, PunchFailed)]
        assert len(fails) == 2
        # given up on the deadline, 3 s after each side started
        assert all(t - t0 == pytest.approx(3.0, abs=0.01) for t, _ in fails)
        assert pa.probes_sent <= PunchConfig().max_probes


def test_symmetric_nats_really_map_per_destination():
    """The simulation's premise, checked: a symmetric NAT gives the router's endpoint
    another public port than it uses towards the peer; an EIM NAT the same one."""
    for mapping, same in ((EIM, True), (SYM, False)):
        nat = _nat("198.18.0.10", "198.19.1.0/24", mapping, Filtering.ADDRESS_PORT, 5)
        to_router = nat.outbound(GW_A, ROUTER_UDP, 0.0)
        to_peer = nat.outbound(GW_A, ep("198.18.0.20:30000"), 0.0)
        assert (to_router == to_peer) is same


def test_nat_filtering_and_timeout():
    peer = ep("198.18.0.20:30000")
    other_port = ep("198.18.0.20:30001")
    other_host = ep("198.18.0.30:30000")
    cases = {
        Filtering.INDEPENDENT: (True, True, True),
        Filtering.ADDRESS: (True, True, False),
        Filtering.ADDRESS_PORT: (True, False, False),
    }
    for filtering, expect in cases.items():
        nat = Nat("198.18.0.10", "198.19.1.0/24", EIM, filtering, timeout=30.0)
        public = nat.outbound(GW_A, peer, 0.0)
        senders = (peer, other_port, other_host)
        got = tuple(nat.inbound(public.port, s, 1.0) == GW_A for s in senders)
        assert got == expect, filtering
        assert nat.inbound(public.port + 1 if public.port < 59999 else 20000, peer, 1.0) is None
        # idle for the timeout: the mapping is gone
        assert nat.inbound(public.port, peer, 31.0) is None and nat.mappings == 0


def test_same_site_gateways_meet_on_their_host_candidates():
    """Two gateways behind one NAT: their LAN addresses answer first (no hairpin needed)."""
    nat = _nat("198.18.0.10", "198.19.1.0/24", EIM, Filtering.ADDRESS_PORT, 1)
    gw_b = ep("198.19.1.3:5000")
    ga, gb, net, t0 = rendezvous(nat, None, gw_b=gw_b)
    assert ga.puncher.state is gb.puncher.state is PunchState.CONNECTED  # type: ignore[union-attr]
    assert ga.puncher.selected == gw_b and gb.puncher.selected == GW_A  # type: ignore[union-attr]


def test_a_late_offer_still_meets_within_the_deadline():
    na = _nat("198.18.0.10", "198.19.1.0/24", EIM, Filtering.ADDRESS_PORT, 11)
    nb = _nat("198.18.0.20", "198.19.2.0/24", EIM, Filtering.ADDRESS_PORT, 22)
    ga, gb, _, t0 = rendezvous(na, nb, delay_b=1.5)
    assert ga.puncher.state is gb.puncher.state is PunchState.CONNECTED  # type: ignore[union-attr]
    ups = [t for g in (ga, gb) for t, e in g.events if isinstance(e, PathUp)]
    assert max(ups) - t0 < 3.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=62, max_size=62), max_size=20), st.integers(0, 6))
def test_fuzz_endpoint_registry_and_prober(bodies, kind):
    reg = EndpointRegistry(random=_seeded(3))
    params = _params(reg)
    prober = EndpointProber(params, 0.0)
    for i, body in enumerate(bodies):
        data = bytes([0xD1, kind]) + body
        reply, obs = reg.receive(data, ep("198.18.0.10:4000"), 0.01 * i)
        assert reply is None and obs is None
        assert prober.receive(data, 0.01 * i) is None
    # still works afterwards
    (probe,) = prober.handle_timer(1.0)
    reply, obs = reg.receive(probe, ep("198.18.0.10:4000"), 1.0)
    assert reply is not None and prober.receive(reply, 1.0) == ep("198.18.0.10:4000")

"""A gateway's direct paths end to end, sans-IO (polevpn.direct.manager and .session), in
virtual time through simulated NATs (tests/natsim.py): endpoint discovery, the offers of one
pair's material, punching, DTLS, the proofs, IP packets both ways; refusals (another
pair's material, spoofed sources); fallback on silence and the retry; revoke; expiry."""

from __future__ import annotations

import ipaddress

import pytest
from natsim import Filtering, Mapping, Nat, Net, run
from test_direct_path import ip4

from polevpn.config import KcpParams
from polevpn.direct import keys as K
from polevpn.direct import messages as m
from polevpn.direct.endpoint import EndpointRegistry
from polevpn.direct.keys import KeyMaterialError, Side
from polevpn.direct.manager import DirectManager
from polevpn.direct.messages import (
    Candidate,
    CandidateKind,
    Candidates,
    Cause,
    Endpoint,
    Offer,
    PathCode,
    Revoke,
    RevokeReason,
    Status,
)
from polevpn.direct.path import PathState
from polevpn.direct.session import DirectContexts
from polevpn.proto import wire
from polevpn.proto.session import ClientSession, DirectFrame

A = ipaddress.ip_address("169.254.0.1")
B = ipaddress.ip_address("169.254.0.2")
C = ipaddress.ip_address("169.254.0.3")
NET_A = ipaddress.ip_network("198.18.10.0/24")
NET_B = ipaddress.ip_network("198.18.20.0/24")
NET_C = ipaddress.ip_network("198.18.30.0/24")
ROUTER_UDP = Endpoint(ipaddress.ip_address("198.18.0.1"), 4443)
PARAMS = KcpParams()


def ep(text: str) -> Endpoint:
    host, port = text.rsplit(":", 1)
    return Endpoint(ipaddress.ip_address(host), int(port))


@pytest.fixture(scope="module")
def contexts() -> DirectContexts:
    return DirectContexts()


class SimGateway:
    """A gateway of the simulation: its direct socket is ``endpoint``, its manager the
    code under test; what the peers' IP packets delivered is kept in ``got``."""

    def __init__(self, address, sock: Endpoint, net, contexts: DirectContexts) -> None:
        self.address = address
        self.endpoint = sock
        self.mgr = DirectManager({address}, [net], PARAMS, contexts=contexts)
        self.mgr.set_local([sock])
        self.got: list[bytes] = []
        self.messages: list = []
        self.changes: list = []

    def _collect(self, now: float) -> list:
        out = self.mgr.datagrams_to_send(now)
        self.got += [bytes(p) for p in self.mgr.take_packets()]
        self.messages += self.mgr.take_messages()
        self.changes += [(now, c) for c in self.mgr.take_changes()]
        return out

    def timer(self) -> float | None:
        return self.mgr.get_timer()

    def fire(self, now: float) -> list:
        self.mgr.handle_timer(now)
        return self._collect(now)

    def datagram(self, data: bytes, src: Endpoint, now: float) -> list:
        self.mgr.receive(data, src, now)
        return self._collect(now)

    def send(self, net: Net, packets: list[bytes], now: float) -> list[bytes]:
        """Packets from the TUN: those for the router come back."""
        rest = self.mgr.route(packets, now)
        for data, dst in self._collect(now):
            net.send(self.endpoint, dst, data, now)
        return rest

    def path(self, peer) -> PathState:
        return self.mgr.peers[peer].path.state


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


class World:
    def __init__(self, contexts: DirectContexts, mapping=Mapping.INDEPENDENT) -> None:
        na = Nat("198.18.0.10", "198.19.1.0/24", mapping, Filtering.ADDRESS_PORT, seed=11)
        nb = Nat("198.18.0.20", "198.19.2.0/24", mapping, Filtering.ADDRESS_PORT, seed=22)
        self.net = Net([na, nb], delay=0.02)
        self.router = SimRouter()
        self.a = SimGateway(A, GW_A, NET_A, contexts)
        self.b = SimGateway(B, GW_B, NET_B, contexts)
        self.actors = [self.a, self.b, self.router]
        self.now = 0.0
        reg = self.router.registry
        for gw in (self.a, self.b):
            params = reg.issue(gw.address, ROUTER_UDP.port, 0.0)
            # the router connection went to 198.18.0.1: the message names no address
            gw.mgr.endpoint(params, ROUTER_UDP.address, 0.0)
            for data, dst in gw._collect(0.0):
                self.net.send(gw.endpoint, dst, data, 0.0)
        self.run(5.0, lambda t: bool(reg.public(A, t) and reg.public(B, t)))
        assert reg.public(A, self.now) and reg.public(B, self.now)

    def run(self, until: float, stop=None) -> float:
        self.now = run(self.net, self.actors, self.now, until, stop=stop)
        return self.now

    def offers(self, lifetime: int = 3600) -> tuple[Offer, Offer]:
        sides = []
        for gw, net in ((self.a, NET_A), (self.b, NET_B)):
            sent = [x for x in gw.messages if isinstance(x, Candidates)][-1]
            cands = tuple(Candidate(CandidateKind.HOST, e) for e in sent.endpoints)
            public = self.router.registry.public(gw.address, self.now)
            assert public is not None
            cands += (Candidate(CandidateKind.PUBLIC, public),)
            sides.append(Side(gw.address, cands, (net,)))
        return K.pair_offers(K.issue(lifetime), sides[0], sides[1])

    def deliver(self, gw: SimGateway, offer: Offer) -> None:
        # through the codec, as it comes off the router connection
        got = m.decode(offer.COMMAND, offer.encode())
        gw.mgr.offer(got, self.now)  # type: ignore[arg-type]
        for data, dst in gw._collect(self.now):
            self.net.send(gw.endpoint, dst, data, self.now)

    def up(self) -> float:
        """Offers to both; returns when both paths are direct."""
        to_a, to_b = self.offers()
        t0 = self.now
        self.deliver(self.a, to_a)
        self.deliver(self.b, to_b)
        self.run(
            t0 + 5.0,
            lambda t: self.a.path(B) is PathState.DIRECT and self.b.path(A) is PathState.DIRECT,
        )
        assert self.a.path(B) is PathState.DIRECT and self.b.path(A) is PathState.DIRECT
        return self.now - t0

    def traffic(self, until: float, every: float = 0.05) -> tuple[int, int]:
        """Packets A -> B and B -> A every ``every`` s until ``until``; returns how many
        of each went to the router instead."""
        relayed = [0, 0]
        n = 0
        while self.now < until:
            n += 1
            pa = ip4("198.18.10.5", "198.18.20.7", 100 + n % 50)
            pb = ip4("198.18.20.7", "198.18.10.5", 100 + n % 50)
            relayed[0] += len(self.a.send(self.net, [pa], self.now))
            relayed[1] += len(self.b.send(self.net, [pb], self.now))
            self.run(self.now + every)
        return relayed[0], relayed[1]


def test_two_gateways_go_direct_and_carry_packets_both_ways(contexts):
    w = World(contexts)
    took = w.up()
    # punch, DTLS, KCP and the proofs over a 40 ms round trip: well within the 3 s
    assert took < 1.0
    sa, sb = w.a.mgr.peers[B].session, w.b.mgr.peers[A].session
    assert sa is not None and sb is not None and sa.ready and sb.ready
    assert sa.keys.initiator and not sb.keys.initiator
    # each side sends to the other's NAT
    assert sa.endpoint.address == ipaddress.ip_address("198.18.0.20")  # type: ignore[union-attr]
    assert sb.endpoint.address == ipaddress.ip_address("198.18.0.10")  # type: ignore[union-attr]
    pa = [ip4("198.18.10.5", "198.18.20.7", 60 + i) for i in range(20)]
    pb = [ip4("198.18.20.7", "198.18.10.5", 60 + i) for i in range(20)]
    other = [ip4("198.18.10.5", "198.18.30.7")]  # a third office: through the router
    assert w.a.send(w.net, pa + other, w.now) == other
    assert w.b.send(w.net, pb, w.now) == []
    w.run(w.now + 0.5)
    assert w.b.got == pa and w.a.got == pb
    # the statuses the router gets: punching, then direct with the endpoint and an RTT
    sts = [x for x in w.a.messages if isinstance(x, Status)]
    assert [s.state for s in sts][:2] == [PathCode.PUNCHING, PathCode.DIRECT]
    assert sts[1].endpoint == sa.endpoint and sts[1].rtt is not None
    st = w.a.mgr.statuses()[0]
    assert (st.peer, st.state, st.bytes_sent, st.bytes_received) == (
        B,
        PathState.DIRECT,
        sum(map(len, pa)),
        sum(map(len, pb)),
    )
    ups = [c for _, c in w.a.changes if c.state is PathState.DIRECT]
    assert len(ups) == 1 and ups[0].endpoint == sa.endpoint
    # DIRECT_STATUS again every 30 s while direct
    before = len([x for x in w.a.messages if isinstance(x, Status)])
    w.traffic(w.now + 31.0, every=1.0)
    after = [x for x in w.a.messages if isinstance(x, Status)]
    assert len(after) == before + 1 and after[-1].state is PathCode.DIRECT
    assert after[-1].bytes_sent > sum(map(len, pa))


def test_the_candidates_and_endpoint_probe(contexts):
    w = World(contexts)
    w.run(w.now + 0.1)
    for gw in (w.a, w.b):
        cands = [x for x in gw.messages if isinstance(x, Candidates)]
        assert cands == [Candidates((gw.endpoint,))]
        assert gw.mgr.prober is not None and gw.mgr.prober.public is not None
        assert gw.mgr.stats.endpoint_replies == 1


def test_another_pairs_material_is_refused_and_counted(contexts):
    """A third gateway C holds material for its own pair with B and tries it against A:
    its probes carry a pair id A does not know, and a proof made with C's material over
    an association with A does not verify (A's session fails on it, counted)."""
    w = World(contexts)
    w.up()
    # C's probe at A's direct socket: refused as an unknown pair
    mat = K.issue()
    keys_c = K.PairKeys.derive(mat.pair_id, mat.secret, C, B, 3600.0)
    probe = m.Datagram(m.DatagramKind.PROBE, mat.pair_id, 7).encode(keys_c.send_probe_key)
    before = w.a.mgr.stats.refused_unknown_pair
    w.a.mgr.receive(probe, ep("198.18.0.30:7000"), w.now)
    assert w.a.mgr.stats.refused_unknown_pair == before + 1
    # a peer whose proof is made with other material: A (initiator) and a responder B'
    # that got another pair's offer with the same pair id (the router's mistake or a
    # forgery): punching needs the probe keys, so B' has the right ones, not the proof's
    w2 = World(contexts)
    to_a, to_b = w2.offers()
    forged = Offer(
        to_b.pair_id,
        to_b.lifetime,
        to_b.secret,
        to_b.you,
        to_b.peer,
        to_b.candidates,
        to_b.networks,
    )
    w2.deliver(w2.a, to_a)
    w2.deliver(w2.b, forged)
    sb = w2.b.mgr.peers[A].session
    assert sb is not None
    # B' proves with the wrong key (another pair's proof key)
    bad = K.PairKeys.derive(mat.pair_id, mat.secret, B, A, 3600.0)
    object.__setattr__(sb.keys, "send_proof_key", bad.send_proof_key)
    w2.run(w2.now + 2.0)
    assert w2.a.path(B) is not PathState.DIRECT
    assert w2.a.mgr.counters().refused_proofs >= 1
    st = [x for x in w2.a.messages if isinstance(x, Status)][-1]
    assert st.state is PathCode.RELAYED and st.cause is Cause.HANDSHAKE


def _forge(gw: SimGateway, pair: bytes, n: int, now: float, kind=m.DatagramKind.PROBE) -> int:
    """``n`` datagrams with ``pair``'s id tagged with a third gateway's key (its own
    pair's material) at ``gw``; returns how many it counted as refused. None answered."""
    mat = K.issue()
    keys_c = K.PairKeys.derive(mat.pair_id, mat.secret, C, B, 3600.0)
    rogue = ep("198.18.0.30:7000")
    seen = rogue if kind is m.DatagramKind.ACK else None
    before = gw.mgr.stats.refused_probes
    for i in range(n):
        d = m.Datagram(kind, pair, 1000 + i, seen).encode(keys_c.send_probe_key)
        gw.mgr.receive(d, rogue, now)
    assert [x for x in gw._collect(now) if x[1] == rogue] == []
    return gw.mgr.stats.refused_probes - before


def test_every_forged_probe_for_a_pair_we_hold_is_counted(contexts):
    """Probes (and acks) with the id of the A-B pair and a tag made with other material:
    each one counted, none answered, whether A's path is up or A has no session; the path
    undisturbed. (Before, only a session's puncher saw them, uncounted outside it.)"""
    w = World(contexts)
    w.up()
    pair = w.a.mgr.peers[B].pair_id
    assert pair is not None
    assert _forge(w.a, pair, 10, w.now) == 10
    assert _forge(w.a, pair, 3, w.now, m.DatagramKind.ACK) == 3
    assert w.a.path(B) is PathState.DIRECT
    # material, no session: A's lone attempt failed (B's offer is late), A waits
    w2 = World(contexts)
    to_a, _ = w2.offers()
    w2.deliver(w2.a, to_a)
    w2.run(w2.now + 5.0)
    assert w2.a.path(B) is PathState.RELAYED and w2.a.mgr.peers[B].session is None
    assert _forge(w2.a, to_a.pair_id, 4, w2.now) == 4
    assert w2.a.path(B) is PathState.RELAYED  # a forged probe joins no attempt


def test_a_source_outside_the_grant_is_refused_and_counted(contexts):
    w = World(contexts)
    w.up()
    good = ip4("198.18.20.7", "198.18.10.5")
    spoofed = ip4("198.18.30.9", "198.18.10.5")  # a third office's network
    transit = ip4("198.18.20.7", "198.18.30.5")  # not one of A's networks
    # B's session sends what it is given: the check is on A's receiving side
    sb = w.b.mgr.peers[A].session
    assert sb is not None
    sb.send_packets([good, spoofed, transit], w.now)
    for data, dst in w.b._collect(w.now):
        w.net.send(w.b.endpoint, dst, data, w.now)
    w.run(w.now + 0.5)
    assert w.a.got == [good]
    assert w.a.mgr.counters().refused_packets == 2
    assert w.a.mgr.statuses()[0].refused == 2
    st = w.a.mgr.peers[B].path.status(b"\0" * 16, None, None)
    assert st.refused == 2


def test_silence_falls_back_within_1_5s_then_retries(contexts):
    w = World(contexts)
    w.up()
    w.traffic(w.now + 1.0)
    cut_at = w.now
    w.net.cut = lambda src, dst: (
        src.address != ROUTER_UDP.address and (dst.address != ROUTER_UDP.address)
    )
    w.traffic(cut_at + 2.0)
    downs = [(t, c) for t, c in w.a.changes if c.previous is PathState.DIRECT]
    assert downs, "A never fell back"
    t_down, change = downs[0]
    assert change.cause is Cause.SILENCE and change.state is PathState.RELAYED
    # silence: 1.5 s after the first unanswered send, which is at most one period later
    assert t_down - cut_at <= 1.5 + 0.05 + 0.011
    # relayed now: packets to B go to the router
    assert w.a.send(w.net, [ip4("198.18.10.5", "198.18.20.7")], w.now) != []
    # the path returns: the retry (1 s after the fall) finds it again
    w.net.cut = None
    w.traffic(w.now + 4.0)
    assert w.a.path(B) is PathState.DIRECT and w.b.path(A) is PathState.DIRECT
    ups = [t for t, c in w.a.changes if c.state is PathState.DIRECT]
    assert len(ups) == 2 and ups[1] - t_down < 3.0
    # and carries again
    w.b.got.clear()
    p = ip4("198.18.10.5", "198.18.20.7", 77)
    assert w.a.send(w.net, [p], w.now) == []
    w.run(w.now + 0.5)
    assert w.b.got == [p]


def test_one_sided_silence_recovers(contexts):
    """During a cut only B sends: B falls back, A (which only received) stays direct.
    Once the path is back and A sends too, A falls back on its own silence (B has no
    session for A's association any more) and punches again, and B meets it: B's own
    attempt if it is under way, or B joins when A's probes come."""
    w = World(contexts)
    w.up()
    w.traffic(w.now + 0.5)
    w.net.cut = lambda src, dst: (
        src.address != ROUTER_UDP.address and (dst.address != ROUTER_UDP.address)
    )
    end = w.now + 2.0
    while w.now < end:
        w.b.send(w.net, [ip4("198.18.20.7", "198.18.10.5")], w.now)
        w.run(w.now + 0.05)
    assert w.b.path(A) is PathState.RELAYED and w.a.path(B) is PathState.DIRECT
    w.net.cut = None
    back = w.now
    w.traffic(w.now + 10.0, every=0.1)
    assert w.a.path(B) is PathState.DIRECT and w.b.path(A) is PathState.DIRECT
    ups = [t for t, c in w.a.changes if c.state is PathState.DIRECT and t > back]
    assert ups and ups[0] - back < 6.0
    # and it carries both ways
    w.a.got.clear()
    w.b.got.clear()
    w.traffic(w.now + 0.5)
    assert w.a.got and w.b.got


ROUTER_DELAY = 0.08  # one way through the router (its two links)


def _echo_through_a_cut(w: World, until: float) -> tuple[list[float], list[float]]:
    """A sends a request to B's LAN every 50 ms; B answers every request it gets, direct
    or through the router. The router delivers what a gateway hands it (the packets
    ``route`` returns) ROUTER_DELAY later, to the TUN and to the manager's ``relayed``,
    as the gateway's router connection does. Returns the send times of the requests that
    reached B and of those whose replies reached A."""
    queue: list[tuple[float, SimGateway, list[bytes]]] = []
    # kept on the world: replies to an earlier call's requests may come in this one
    sent_at: dict[int, float] = w.__dict__.setdefault("sent_at", {})
    at_b: list[float] = []
    answered: list[float] = []
    seq = len(sent_at)

    def settle(gw: SimGateway) -> None:
        for data, dst in gw._collect(w.now):
            w.net.send(gw.endpoint, dst, data, w.now)

    def arrived(gw: SimGateway, packets: list[bytes]) -> None:
        if gw is w.b:
            replies = []
            for pkt in packets:
                n = int.from_bytes(pkt[28:32], "big")
                at_b.append(sent_at[n])
                replies.append(ip4("198.18.20.7", "198.18.10.5", 40)[:28] + pkt[28:40])
            for rest in (w.b.send(w.net, replies, w.now),):
                if rest:
                    queue.append((w.now + ROUTER_DELAY, w.a, rest))
        else:
            answered.extend(sent_at[int.from_bytes(p[28:32], "big")] for p in packets)

    while w.now < until:
        seq += 1
        sent_at[seq] = w.now
        req = ip4("198.18.10.5", "198.18.20.7", 40)[:28] + seq.to_bytes(4, "big") + bytes(8)
        rest = w.a.send(w.net, [req], w.now)
        if rest:
            queue.append((w.now + ROUTER_DELAY, w.b, rest))
        step_end = w.now + 0.05
        while True:
            due = [x for x in queue if x[0] <= step_end]
            nxt = min((x[0] for x in due), default=None)
            w.run(nxt if nxt is not None else step_end)
            if nxt is None:
                break
            for item in [x for x in queue if x[0] <= w.now]:
                queue.remove(item)
                _, gw, packets = item
                gw.mgr.relayed(packets, w.now)
                settle(gw)
                arrived(gw, packets)
        for gw in (w.a, w.b):
            got, gw.got = gw.got, []
            if got:
                arrived(gw, got)
    return at_b, answered


def test_a_peer_that_relays_ends_our_direct_path_at_once(contexts):
    """The path is cut while A sends requests and B answers them. A falls back on its
    silence and relays; B (which sent nothing since the cut: it got nothing to answer)
    falls back on the first request that comes through the router rather than 1.5 s
    after its first reply into the dead path, so replies flow again right after A falls
    back: within the 2 s issue 18 asks of the cut."""
    w = World(contexts)
    w.up()
    _echo_through_a_cut(w, w.now + 2.5)  # past relay_grace, echoes direct
    assert w.a.path(B) is PathState.DIRECT and w.b.path(A) is PathState.DIRECT
    assert w.b.mgr.stats.peer_relayed == 0  # nothing relayed while it works
    # the cut comes between two echoes (as between pings 100 ms apart over a 10 ms path):
    # B owes nothing then, and has nothing to send until a request reaches it
    w.run(w.now + 0.2)
    assert w.b.mgr.peers[A].path.waiting_since is None
    cut_at = w.now
    w.net.cut = lambda src, dst: (
        src.address != ROUTER_UDP.address and (dst.address != ROUTER_UDP.address)
    )
    _, answered = _echo_through_a_cut(w, cut_at + 3.0)
    (t_a, ca), *_ = [(t, c) for t, c in w.a.changes if c.previous is PathState.DIRECT]
    (t_b, cb), *_ = [(t, c) for t, c in w.b.changes if c.previous is PathState.DIRECT]
    assert ca.cause is Cause.SILENCE and cb.cause is Cause.SILENCE
    assert t_a - cut_at <= 1.5 + 0.05 + 0.011
    # B: when the first relayed request came (a router delay after A fell back)
    assert t_b - t_a <= ROUTER_DELAY + 0.05 + 0.001, (t_a, t_b)
    assert w.b.mgr.stats.peer_relayed == 1 and w.a.mgr.stats.peer_relayed == 0
    after = [t for t in answered if t > cut_at]
    assert after and after[0] - cut_at <= 2.0, after[:3]
    # and the path returns once the cut is lifted
    w.net.cut = None
    _echo_through_a_cut(w, w.now + 4.0)
    assert w.a.path(B) is PathState.DIRECT and w.b.path(A) is PathState.DIRECT


def test_relayed_packets_from_a_working_path_do_not_end_it(contexts):
    """Stragglers: the peer's packets relayed before its side came up, and relayed
    packets while the peer is heard directly, leave the path as it is; a source outside
    the peer's grant is not the peer's, and no path's business."""
    w = World(contexts)
    w.up()
    stray = [ip4("198.18.20.7", "198.18.10.5")]
    assert not w.a.mgr.relayed(stray, w.now)  # just came up
    w.traffic(w.now + 2.5)  # both ways, heard all the time
    assert not w.a.mgr.relayed(stray, w.now)
    assert w.a.path(B) is PathState.DIRECT
    w.run(w.now + 1.0)  # quiet now
    other = [ip4("198.18.30.7", "198.18.10.5"), ip4("198.18.10.9", "198.18.10.5")]
    assert not w.a.mgr.relayed(other, w.now)
    assert w.a.path(B) is PathState.DIRECT and w.a.mgr.stats.peer_relayed == 0
    # the peer's own address counts (the router checks sources against it too)
    assert w.a.mgr.relayed([ip4(str(B), "198.18.10.5")], w.now)
    assert w.a.path(B) is PathState.RELAYED and w.a.mgr.stats.peer_relayed == 1


def test_a_relayed_peer_joins_the_others_attempt(contexts):
    """A in a backoff after a failed attempt joins B's attempt when B's probe comes."""
    w = World(contexts)
    to_a, to_b = w.offers()
    w.deliver(w.a, to_a)  # B's offer is late: A's attempt fails alone
    w.run(w.now + 5.0)
    assert w.a.path(B) is PathState.RELAYED and w.a.mgr.peers[B].path.retry_at is not None
    retry_at = w.a.mgr.peers[B].path.retry_at
    w.deliver(w.b, to_b)
    w.run(w.now + 1.0)
    assert w.now < retry_at  # type: ignore[operator]
    assert w.a.path(B) is PathState.DIRECT and w.b.path(A) is PathState.DIRECT


def test_revoke_closes_and_forgets(contexts):
    w = World(contexts)
    w.up()
    pair = w.a.mgr.peers[B].pair_id
    assert pair is not None
    assert w.a.mgr.revoke(Revoke(pair, RevokeReason.PEER_GONE), w.now)
    assert w.a.path(B) is PathState.RELAYED
    peer = w.a.mgr.peers[B]
    assert peer.session is None and peer.keys is None and peer.path.cause is Cause.REVOKED
    # packets to B go to the router again, and no attempt is made
    p = ip4("198.18.10.5", "198.18.20.7")
    assert w.a.send(w.net, [p], w.now) == [p]
    # B hears the close_notify: its session ends at once
    w.run(w.now + 1.0)
    assert w.b.path(A) is PathState.RELAYED
    w.run(w.now + 30.0)
    assert w.a.path(B) is PathState.RELAYED and w.a.mgr.peers[B].session is None
    st = [x for x in w.a.messages if isinstance(x, Status)][-1]
    assert st.state is PathCode.RELAYED and st.cause is Cause.REVOKED
    # a revoke of a pair it does not hold: counted
    assert not w.a.mgr.revoke(Revoke(b"\x01" * 16, RevokeReason.REVOKED), w.now)
    assert w.a.mgr.stats.revokes_unknown == 1


def test_expiry_closes(contexts):
    w = World(contexts)
    to_a, to_b = w.offers(lifetime=5)
    w.deliver(w.a, to_a)
    w.deliver(w.b, to_b)
    w.run(w.now + 2.0)
    assert w.a.path(B) is PathState.DIRECT
    w.traffic(w.now + 4.0, every=0.2)
    assert w.a.path(B) is PathState.RELAYED and w.a.mgr.peers[B].path.cause is Cause.EXPIRED
    assert w.a.mgr.peers[B].keys is None and w.a.mgr.peers[B].session is None
    p = ip4("198.18.10.5", "198.18.20.7")
    assert w.a.send(w.net, [p], w.now) == [p]


def test_a_renewal_moves_the_path_to_the_new_material(contexts):
    w = World(contexts)
    w.up()
    old = w.a.mgr.peers[B].pair_id
    to_a, to_b = w.offers()
    w.deliver(w.a, to_a)
    w.deliver(w.b, to_b)
    w.traffic(w.now + 2.0)
    sa = w.a.mgr.peers[B].session
    assert sa is not None and sa.ready and sa.keys.pair_id == to_a.pair_id != old
    assert w.a.path(B) is PathState.DIRECT


def test_offers_not_for_us_are_refused(contexts):
    w = World(contexts)
    to_a, to_b = w.offers()
    with pytest.raises(KeyMaterialError):
        w.a.mgr.offer(to_b, w.now)  # B's offer: "you" is not A
    assert w.a.mgr.stats.offers_refused == 1 and not w.a.mgr.peers


def test_symmetric_nats_stay_relayed(contexts):
    w = World(contexts, mapping=Mapping.ADDRESS_PORT)
    to_a, to_b = w.offers()
    w.deliver(w.a, to_a)
    w.deliver(w.b, to_b)
    relayed = w.traffic(w.now + 4.0, every=0.1)
    assert w.a.path(B) is PathState.RELAYED and w.a.mgr.peers[B].path.cause is Cause.NO_ANSWER
    # every packet went through the router
    assert relayed[0] == relayed[1] > 30
    assert w.a.mgr.peers[B].session is None


def test_a_session_that_agreed_direct_hands_frames_up():
    client = ClientSession("k", "169.254.0.1", [], 0.0, features=frozenset({"direct"}))
    client.receive(wire.encode_frame(wire.AUTH, b'{"features":["direct"]}'), 0.0)
    client.receive(wire.encode_frame(wire.REGISTER, b"{}"), 0.0)
    revoke = Revoke(b"\x02" * 16, RevokeReason.REVOKED)
    packets, events = client.receive(m.encode(revoke), 0.1)
    assert packets == [] and events == [DirectFrame(revoke.COMMAND, revoke.encode())]
    assert client.unknown_commands == 0

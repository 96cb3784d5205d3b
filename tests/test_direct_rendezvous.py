"""The router's rendezvous of direct paths (polevpn.direct.rendezvous), sans-IO: endpoints,
offers on traffic, one pair per gateway pair, renewal, max_pairs, revocation, statuses."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from polevpn.direct.endpoint import EndpointProber
from polevpn.direct.messages import (
    Candidate,
    CandidateKind,
    Candidates,
    Cause,
    DirectMessageError,
    Endpoint,
    EndpointParams,
    Offer,
    PathCode,
    Revoke,
    RevokeReason,
    Status,
    decode,
    encode,
)
from polevpn.direct.rendezvous import RETRY_AFTER, Rendezvous, Send
from polevpn.proto import wire

A = ipaddress.ip_address("169.254.0.1")
B = ipaddress.ip_address("169.254.0.2")
C = ipaddress.ip_address("169.254.0.3")
NETS = {
    A: (ipaddress.ip_network("169.254.0.1/32"), ipaddress.ip_network("198.18.10.0/24")),
    B: (ipaddress.ip_network("169.254.0.2/32"), ipaddress.ip_network("198.18.20.0/24")),
    C: (ipaddress.ip_network("169.254.0.3/32"), ipaddress.ip_network("198.18.30.0/24")),
}
HOST = {
    A: Endpoint(ipaddress.ip_address("198.18.1.1"), 40001),
    B: Endpoint(ipaddress.ip_address("198.18.2.1"), 40002),
    C: Endpoint(ipaddress.ip_address("198.18.3.1"), 40003),
}
PORT = 4433


def counting_random():
    n = itertools.count(1)
    return lambda size: next(n).to_bytes(size, "big")


def frames(sends: list[Send]) -> list[tuple[object, object]]:
    """(connection, decoded message) of each send."""
    out = []
    for s in sends:
        length, cmd, _seq = wire.HEADER.unpack_from(s.frame)
        assert length == len(s.frame)
        out.append((s.conn, decode(cmd, s.frame[wire.HEADER_LEN :])))
    return out


def candidates_frame(*eps: Endpoint) -> tuple[int, bytes]:
    return wire.Command.DIRECT_CANDIDATES, Candidates(eps).encode()


def up(rdv: Rendezvous, gw, now: float = 0.0, allowed: bool = True, conn=None, host=True):
    """``gw`` registers on ``conn`` (default "conn-<last octet>") and reports its host
    candidate; returns the DIRECT_ENDPOINT it got."""
    conn = conn or f"conn{gw.packed[-1]}"
    sends = rdv.gateway_up(gw, conn, NETS[gw], allowed, now)
    got = [m for c, m in frames(sends) if isinstance(m, EndpointParams)]
    assert len(got) == 1 and frames(sends)[-1][0] == conn
    if host:
        assert rdv.frame(gw, *candidates_frame(HOST[gw]), now) == []
    return got[0]


def offered(rdv: Rendezvous, a, b, now: float = 0.0) -> list[tuple[object, Offer]]:
    if not rdv.seen(a, b):
        return []
    return frames(rdv.offer(a, b, now))  # type: ignore[return-value]


def revokes(sends: list[Send]) -> list[tuple[object, bytes, RevokeReason]]:
    out = []
    for conn, m in frames(sends):
        assert isinstance(m, Revoke)
        out.append((conn, m.pair_id, m.reason))
    return out


def status(pair_id: bytes, state=PathCode.DIRECT, sent=0, received=0, rtt=0.01):
    ep = HOST[B] if state is PathCode.DIRECT else None
    msg = Status(pair_id, state, Cause.NONE, rtt, sent, received, 3, ep)
    return wire.Command.DIRECT_STATUS, msg.encode()


@pytest.fixture
def rdv() -> Rendezvous:
    return Rendezvous(PORT, lifetime=3000, max_pairs=16, random=counting_random())


def test_registration_gets_an_endpoint_token_for_the_kcp_port(rdv):
    params = up(rdv, A, host=False)
    assert params.udp_address is None  # the host the gateway dialled
    assert params.udp_port == PORT and params.lifetime == 3000
    again = up(rdv, A, now=1.0, host=False)
    assert again.token != params.token  # a fresh token per registration


def test_traffic_between_two_eligible_gateways_offers_one_pair(rdv):
    up(rdv, A)
    up(rdv, B)
    got = offered(rdv, A, B, now=5.0)
    assert [c for c, _ in got] == ["conn1", "conn2"]
    to_a, to_b = got[0][1], got[1][1]
    assert (to_a.you, to_a.peer, to_b.you, to_b.peer) == (A, B, B, A)
    assert to_a.pair_id == to_b.pair_id and to_a.secret == to_b.secret
    assert to_a.lifetime == 3000
    # each gets the other's candidates and registered networks (its own address included)
    assert to_a.candidates == (Candidate(CandidateKind.HOST, HOST[B]),)
    assert to_b.candidates == (Candidate(CandidateKind.HOST, HOST[A]),)
    assert to_a.networks == NETS[B] and to_b.networks == NETS[A]
    assert rdv.stats.offers == 2 and len(rdv) == 1
    # one live pair per gateway pair, whichever way the packets go
    assert not rdv.seen(A, B) and not rdv.seen(B, A)
    assert rdv.offer(B, A, 6.0) == [] and rdv.offer(A, B, 6.0) == []


def test_the_public_candidate_comes_from_the_endpoint_probe(rdv):
    params = up(rdv, A)
    up(rdv, B, host=False)
    # B behind a NAT: the router sees its probe come from the NAT's address
    params_b = up(rdv, B, now=0.5, host=False)
    prober = EndpointProber(params_b, 0.5)
    (probe,) = prober.handle_timer(0.5)
    nat = Endpoint(ipaddress.ip_address("198.19.0.7"), 61000)
    reply = rdv.probe(probe, nat, 0.6)
    assert reply is not None and prober.receive(reply, 0.6) == nat
    assert rdv.stats.probes_answered == 1
    # a replayed probe is refused and counted
    assert rdv.probe(probe, nat, 0.7) is None
    assert rdv.view(1.0, 1000.0).probes["replay"] == 1
    got = offered(rdv, B, A, now=1.0)
    to_a = next(m for c, m in got if c == "conn1")
    assert to_a.candidates == (Candidate(CandidateKind.PUBLIC, nat),)
    view = rdv.view(1.0, 1000.0)
    assert {(e.gateway, e.public, e.host) for e in view.endpoints} == {
        (str(A), None, (str(HOST[A]),)),
        (str(B), str(nat), ()),
    }
    assert params.token != params_b.token


def test_no_offer_without_a_candidate_of_each_side(rdv):
    up(rdv, A)
    up(rdv, B, host=False)
    assert offered(rdv, A, B, now=1.0) == []
    assert rdv.stats.no_candidates == 1
    # within the hold it is not tried again (the data path asks once per read)
    assert offered(rdv, A, B, now=1.0 + RETRY_AFTER / 2) == []
    assert rdv.stats.no_candidates == 1
    rdv.frame(B, *candidates_frame(HOST[B]), 1.1)
    assert len(offered(rdv, A, B, now=1.0 + RETRY_AFTER)) == 2


def test_no_offer_when_a_grant_forbids_it_or_a_side_did_not_agree(rdv):
    up(rdv, A)
    up(rdv, B, allowed=False)
    assert offered(rdv, A, B) == []
    # C never agreed direct: the rendezvous does not know it
    assert offered(rdv, A, C) == []
    assert len(rdv) == 0 and rdv.stats.offers == 0
    # the grant allows it after a reload
    assert rdv.set_allowed(B, True, 1.0) == []
    assert len(offered(rdv, A, B, now=2.0)) == 2


def test_no_offer_while_direct_is_off(rdv):
    rdv.reconfigure(False, 3000, 16, 0.0)
    sends = rdv.gateway_up(A, "conn1", NETS[A], True, 0.0)
    assert sends == []  # no endpoint token either
    rdv.gateway_up(B, "conn2", NETS[B], True, 0.0)
    assert not rdv.seen(A, B) and rdv.offer(A, B, 0.0) == []
    # on again: the connected gateways get their tokens
    sends = rdv.reconfigure(True, 3000, 16, 1.0)
    assert sorted(c for c, m in frames(sends) if isinstance(m, EndpointParams)) == [
        "conn1",
        "conn2",
    ]


def test_max_pairs_bounds_the_live_pairs(rdv):
    rdv.max_pairs = 1
    for g in (A, B, C):
        up(rdv, g)
    assert len(offered(rdv, A, B, now=1.0)) == 2
    assert offered(rdv, A, C, now=1.0) == []
    assert rdv.stats.pairs_full == 1 and len(rdv) == 1
    # A-B unused after its offer: not renewed, it lapses at its expiry, and A-C gets room
    assert not any(isinstance(m, Offer) for _, m in frames(rdv.handle_timer(1.0 + 2000)))
    assert len(rdv) == 1
    assert not any(isinstance(m, Offer) for _, m in frames(rdv.handle_timer(1.0 + 3000)))
    assert len(rdv) == 0
    assert len(offered(rdv, A, C, now=3002.0)) == 2


def test_renewal_at_two_thirds_of_the_lifetime_while_traffic_flows(rdv):
    up(rdv, A)
    up(rdv, B)
    first = offered(rdv, A, B, now=0.0)[0][1].pair_id
    assert not rdv.seen(A, B)  # traffic after the offer: the pair is in use
    # the endpoint tokens are renewed at two thirds as well; only offers are looked at here
    assert [m for _, m in frames(rdv.handle_timer(1999.0)) if isinstance(m, Offer)] == []
    got = [(c, m) for c, m in frames(rdv.handle_timer(2000.0)) if isinstance(m, Offer)]
    assert [c for c, _ in got] == ["conn1", "conn2"]
    second = got[0][1].pair_id
    assert second != first and got[1][1].pair_id == second
    assert len(rdv) == 1  # still one pair per gateway pair
    # the old material is still valid on the gateways: its statuses are taken...
    rdv.frame(A, *status(first), 2001.0)
    assert rdv.stats.statuses == 1
    # ...and a revocation names both ids
    got_r = revokes(rdv.grant_changed(B, 2002.0))
    assert sorted((c, i) for c, i, _ in got_r) == sorted(
        (c, i) for c in ("conn1", "conn2") for i in (first, second)
    )
    assert {r for _, _, r in got_r} == {RevokeReason.REVOKED}


def test_renewal_counts_direct_traffic_the_router_does_not_see(rdv):
    up(rdv, A)
    up(rdv, B)
    pair_id = offered(rdv, A, B)[0][1].pair_id
    rdv.frame(A, *status(pair_id, sent=100, received=100), 10.0)
    # no packet through the router since the offer, but the direct path carried some
    assert any(isinstance(m, Offer) for _, m in frames(rdv.handle_timer(2000.0)))


def test_a_pair_not_in_use_is_not_renewed(rdv):
    up(rdv, A)
    up(rdv, B)
    pair_id = offered(rdv, A, B)[0][1].pair_id
    # statuses that carry nothing new do not count as traffic
    rdv.frame(A, *status(pair_id, sent=0, received=0), 10.0)
    rdv.frame(A, *status(pair_id, state=PathCode.RELAYED), 11.0)
    assert not any(isinstance(m, Offer) for _, m in frames(rdv.handle_timer(2000.0)))
    assert len(rdv) == 1
    rdv.handle_timer(3000.0)
    assert len(rdv) == 0
    assert rdv.grant_changed(A, 3001.0) == []  # nothing left to revoke


def test_revocations(rdv):
    for g in (A, B, C):
        up(rdv, g)
    ab = offered(rdv, A, B)[0][1].pair_id
    ac = offered(rdv, A, C)[0][1].pair_id
    bc = offered(rdv, B, C)[0][1].pair_id
    # C's last connection closes: its peers are told, reason 2
    got = revokes(rdv.connection_closed(C, "conn3", 1.0))
    assert sorted(got) == sorted(
        [("conn1", ac, RevokeReason.PEER_GONE), ("conn2", bc, RevokeReason.PEER_GONE)]
    )
    assert rdv.stats.revokes_peer_gone == 2
    # A's grant changes: both sides of its pairs, reason 1
    got = revokes(rdv.grant_changed(A, 2.0))
    assert sorted(got) == [("conn1", ab, RevokeReason.REVOKED), ("conn2", ab, RevokeReason.REVOKED)]
    assert len(rdv) == 0


def test_revoked_when_direct_is_turned_off(rdv):
    up(rdv, A)
    up(rdv, B)
    ab = offered(rdv, A, B)[0][1].pair_id
    got = revokes(rdv.set_allowed(B, False, 1.0))
    assert sorted(got) == [
        ("conn1", ab, RevokeReason.DISABLED),
        ("conn2", ab, RevokeReason.DISABLED),
    ]
    ab2 = offered(rdv, A, B, now=1.0)
    assert ab2 == []  # B may not any more
    rdv.set_allowed(B, True, 2.0)
    ab2 = offered(rdv, A, B, now=2.0)[0][1].pair_id
    got = revokes(rdv.reconfigure(False, 3000, 16, 3.0))
    assert sorted(got) == [
        ("conn1", ab2, RevokeReason.DISABLED),
        ("conn2", ab2, RevokeReason.DISABLED),
    ]
    assert len(rdv.registry) == 0  # the endpoint tokens are forgotten too
    assert rdv.stats.revokes_disabled == 4


def test_reregistering_other_networks_revokes(rdv):
    up(rdv, A)
    up(rdv, B)
    ab = offered(rdv, A, B)[0][1].pair_id
    wider = (*NETS[A], ipaddress.ip_network("198.18.11.0/24"))
    sends = rdv.gateway_up(A, "conn1", wider, True, 1.0)
    got = [(c, m) for c, m in frames(sends) if isinstance(m, Revoke)]
    assert sorted((c, m.pair_id, m.reason) for c, m in got) == [
        ("conn1", ab, RevokeReason.REVOKED),
        ("conn2", ab, RevokeReason.REVOKED),
    ]
    # the same networks again (a reconnect): nothing revoked
    sends = rdv.gateway_up(A, "conn1b", wider, True, 2.0)
    assert not any(isinstance(m, Revoke) for _, m in frames(sends))


def test_frames_go_to_the_newest_connection_and_the_last_one_closing_revokes(rdv):
    up(rdv, A, conn="linkA1")
    up(rdv, A, conn="linkA2", host=False)
    up(rdv, B)
    got = offered(rdv, B, A)
    assert sorted(c for c, _ in got) == ["conn2", "linkA2"]
    pair_id = got[0][1].pair_id
    # the newest closes: no revocation, the older link takes over
    assert rdv.connection_closed(A, "linkA2", 1.0) == []
    assert rdv.connection_closed(A, "unknown", 1.0) == []
    got = revokes(rdv.grant_changed(B, 2.0))
    assert sorted(c for c, _, _ in got) == ["conn2", "linkA1"]
    assert all(i == pair_id for _, i, _ in got)


def test_statuses_are_kept_per_pair_and_gateway(rdv):
    for g in (A, B, C):
        up(rdv, g)
    pair_id = offered(rdv, A, B)[0][1].pair_id
    rdv.frame(A, *status(pair_id, sent=1000, received=2000, rtt=0.012), 5.0)
    rdv.frame(B, *status(pair_id, state=PathCode.PUNCHING), 6.0)
    # a third gateway's, and an unknown pair's, are ignored and counted
    rdv.frame(C, *status(pair_id), 7.0)
    rdv.frame(A, *status(bytes(16)), 7.0)
    assert rdv.stats.statuses == 2 and rdv.stats.statuses_unknown == 2
    view = rdv.view(10.0, 1010.0)
    (pv,) = view.pairs
    assert pv.pair_id == pair_id.hex() and pv.gateways == (str(A), str(B))
    assert (pv.created, pv.expires) == (1000.0, 4000.0)
    a, b = pv.sides
    assert (a.gateway, a.state, a.cause, a.rtt_ms) == (str(A), "direct", "none", 12.0)
    assert (a.bytes_sent, a.bytes_received, a.refused) == (1000, 2000, 3)
    assert a.endpoint == str(HOST[B]) and a.reported == 1005.0
    assert (b.state, b.endpoint) == ("punching", None)
    # the pair is direct only when both sides say so
    assert pv.state == "punching"


def test_bad_and_unexpected_frames(rdv):
    up(rdv, A)
    with pytest.raises(DirectMessageError):
        rdv.frame(A, wire.Command.DIRECT_CANDIDATES, b"\x01\x00\x09", 0.0)
    # another version: ignored, counted
    rdv.frame(A, wire.Command.DIRECT_STATUS, b"\x02\x00", 0.0)
    # a router -> gateway command from a gateway, and a proof: ignored, counted
    assert rdv.frame(A, wire.Command.DIRECT_REVOKE, Revoke(bytes(16), 1).encode(), 0.0) == []
    assert rdv.stats.frames_ignored == 2


def test_endpoint_tokens_are_renewed_before_they_expire(rdv):
    first = up(rdv, A)
    assert rdv.handle_timer(1000.0) == []
    got = frames(rdv.handle_timer(2000.0))
    assert len(got) == 1 and got[0][0] == "conn1"
    assert isinstance(got[0][1], EndpointParams) and got[0][1].token != first.token
    # the old token stops working
    prober = EndpointProber(first, 0.0)
    (probe,) = prober.handle_timer(0.0)
    assert rdv.probe(probe, HOST[A], 2001.0) is None


def test_the_offer_frames_are_whole_frames():
    rdv = Rendezvous(PORT, random=counting_random())
    up(rdv, A)
    up(rdv, B)
    sends = rdv.offer(A, B, 0.0)
    offer = frames(sends)[0][1]
    assert sends[0].frame == encode(offer)

"""The router-link handshake (router-peer, docs/protocol.md section 17), sans-IO: a dialing
router's PeerClientSession against a listening router's ServerSession, bytes shuttled by
hand. Right key, wrong key, the previous key during a rotation, another cluster, a man in
the middle, and routers or gateways without the feature."""

from __future__ import annotations

import json

import pytest

from polevpn.proto import messages, peering, wire
from polevpn.proto.auth import keys_equal
from polevpn.proto.messages import FEATURE_MULTILINK, FEATURE_PEER, FEATURE_SUPER
from polevpn.proto.peering import PeerCredentials
from polevpn.proto.session import (
    AuthFailed,
    AuthSucceeded,
    ClientSession,
    ConnectionLost,
    HeartbeatReceived,
    PeerAuthenticated,
    PeerClientSession,
    Registered,
    RegisterRequested,
    Rejected,
    ServerSession,
    State,
)
from polevpn.proto.wire import FrameDecoder, encode_frame

GW_KEY = "123456"
K1 = "cluster-credential-one"
K2 = "cluster-credential-two"
BINDING = b"\x5a" * 48
HB, HB_TIMEOUT = 0.25, 1.0
ALL = frozenset({FEATURE_SUPER, FEATURE_MULTILINK})


def creds(router_id: str, key: str = K1, previous: str | None = None, cluster: str = "c1"):
    return PeerCredentials(cluster, router_id, key, previous)


def listener(
    c: PeerCredentials | None, binding: bytes | None = BINDING, offer: frozenset[str] = ALL
) -> ServerSession:
    return ServerSession(
        lambda key: keys_equal(key, GW_KEY), 0.0, offer, peer=lambda: c, binding=binding
    )


def dialer(c: PeerCredentials, binding: bytes = BINDING, expected: str | None = None):
    return PeerClientSession(c, binding, 0.0, HB, HB_TIMEOUT, expected=expected)


def shuttle(d: ClientSession, s: ServerSession, now: float = 0.1):
    """Run the handshake to its end; every event of both sides, in order."""
    d_events: list = []
    s_events: list = []
    for _ in range(4):
        out = d.data_to_send()
        if out:
            _, ev = s.receive(b"".join(out), now)
            s_events += ev
        back = s.data_to_send()
        if back:
            _, ev = d.receive(b"".join(back), now)
            d_events += ev
        if not out and not back:
            break
    return d_events, s_events


def test_the_right_key_brings_the_link_up_on_both_sides() -> None:
    d, s = dialer(creds("r1"), expected="r2"), listener(creds("r2"))
    d_events, s_events = shuttle(d, s)
    assert d_events == [PeerAuthenticated("r2")]
    assert s_events == [PeerAuthenticated("r1")]
    assert d.state is State.REGISTERED and s.state is State.REGISTERED
    assert d.peer_id == "r2" and s.peer_id == "r1"
    # super-packets agreed, multi-link never on a router link
    assert d.features == s.features == frozenset({FEATURE_PEER, FEATURE_SUPER})
    assert d.super_packets and s.super_packets
    # data both ways, as S2C_IPDATA frames (what forwarding writes to any destination)
    pkt = bytes.fromhex("4500001c000000004011") + bytes(18)
    got, _ = s.receive(encode_frame(wire.S2C_IPDATA, pkt), 0.2)
    assert [bytes(p) for p in got] == [pkt]
    got, _ = d.receive(encode_frame(wire.S2C_IPDATA, pkt), 0.2)
    assert [bytes(p) for p in got] == [pkt]
    # a super-packet passes whole
    body = bytes(10) + pkt
    got, _ = s.receive(wire.super_header(len(body)) + body, 0.2)
    assert [bytes(p) for p in got] == [body]
    # heartbeats: the dialer sends them, the listener echoes them
    assert d.tick(0.1 + HB) is None
    hb = b"".join(d.data_to_send())
    assert FrameDecoder().feed(hb)[0][0] == wire.HEART_BEAT
    _, ev = s.receive(hb, 0.4)
    assert ev == [HeartbeatReceived()]
    _, ev = d.receive(b"".join(s.data_to_send()), 0.45)
    assert isinstance(ev[0], HeartbeatReceived) and ev[0].rtt == pytest.approx(0.1)
    # and a silent listener is noticed within the timeout
    lost = d.tick(0.45 + HB_TIMEOUT + 0.01)
    assert isinstance(lost, ConnectionLost)


def test_neither_side_sends_a_credential() -> None:
    d, s = dialer(creds("r1", K1, K2)), listener(creds("r2", K1))
    wire_bytes = b""
    for _ in range(3):
        out = b"".join(d.data_to_send())
        wire_bytes += out
        s.receive(out, 0.1)
        back = b"".join(s.data_to_send())
        wire_bytes += back
        d.receive(back, 0.1)
    assert d.state is State.REGISTERED
    for key in (K1, K2):
        assert key.encode() not in wire_bytes
        assert key.encode().hex().encode() not in wire_bytes


def test_a_wrong_key_is_refused_and_counted_as_a_router_failure() -> None:
    d, s = dialer(creds("r1", "not-the-cluster-key")), listener(creds("r2"))
    d_events, s_events = shuttle(d, s)
    assert s_events == [AuthFailed("invalid cluster credential", peer=True)]
    assert d_events == [Rejected("REGISTER", "invalid cluster credential")]
    assert s.state is State.CLOSED and d.state is State.CLOSED
    assert s.peer_id is None


@pytest.mark.parametrize(
    ("dialer_keys", "listener_keys", "ok"),
    [
        # a rotation under way: one side has the new credential with the old one as previous
        ((K2, K1), (K1, None), True),
        ((K1, None), (K2, K1), True),
        ((K2, K1), (K2, K1), True),
        # no credential in common
        ((K2, None), (K1, None), False),
        ((K1, None), (K2, None), False),
    ],
)
def test_the_previous_key_is_accepted_during_a_rotation(dialer_keys, listener_keys, ok) -> None:
    d = dialer(creds("r1", *dialer_keys))
    s = listener(creds("r2", *listener_keys))
    d_events, s_events = shuttle(d, s)
    if ok:
        assert d_events == [PeerAuthenticated("r2")]
        assert s_events == [PeerAuthenticated("r1")]
    else:
        assert s_events == [AuthFailed("invalid cluster credential", peer=True)]
        assert d.state is State.CLOSED


def test_a_man_in_the_middle_cannot_relay_the_proofs() -> None:
    """Two TLS connections, two channel bindings: proofs made for one fail on the other."""
    d = dialer(creds("r1"), binding=b"\x01" * 48)
    s = listener(creds("r2"), binding=b"\x02" * 48)
    d_events, s_events = shuttle(d, s)
    assert s_events == [AuthFailed("invalid cluster credential", peer=True)]
    assert d.state is State.CLOSED


def test_another_cluster_or_the_same_id_is_refused_at_auth() -> None:
    d, s = dialer(creds("r1", cluster="other")), listener(creds("r2"))
    d_events, s_events = shuttle(d, s)
    assert s_events == [AuthFailed("not a router of this cluster", peer=True)]
    assert d_events == [Rejected("AUTH", "not a router of this cluster")]
    d, s = dialer(creds("r2")), listener(creds("r2"))
    _, s_events = shuttle(d, s)
    assert s_events == [AuthFailed("router id is this router's own", peer=True)]


def test_the_dialer_refuses_a_router_other_than_the_one_it_meant() -> None:
    d, s = dialer(creds("r1"), expected="r3"), listener(creds("r2"))
    d_events, s_events = shuttle(d, s)
    assert d_events == [Rejected("AUTH", "router 'r2' answered, not 'r3'")]
    assert d.state is State.CLOSED
    # it sent no proof
    assert s_events == []
    assert s.state is State.AUTHENTICATED


def test_the_dialer_refuses_a_listener_that_does_not_prove_the_key() -> None:
    """An impostor at the dialed address: it answers AUTH, then accepts any proof."""
    d = dialer(creds("r1"))
    d.data_to_send()
    impostor = peering.PeerCredentials("c1", "r2", "whatever-it-guessed").hello()
    welcome = messages.encode_peer_welcome(impostor, frozenset({FEATURE_PEER}))
    d.receive(encode_frame(wire.AUTH, welcome), 0.1)
    assert d.state is State.AUTHENTICATED
    d.data_to_send()
    reply = messages.encode_peer_proof(b"\x00" * 32)
    _, events = d.receive(encode_frame(wire.REGISTER, reply), 0.1)
    assert events == [Rejected("REGISTER", "the far end did not prove the cluster credential")]
    assert d.state is State.CLOSED and d.peer_id is None


def test_a_router_without_a_cluster_treats_a_dialing_router_as_a_stranger() -> None:
    """A router with no cluster section (or a Go PoleVPN one): the router's AUTH has no key
    it knows, so it is refused as any bad key is, and the dialer gives up."""
    d = dialer(creds("r1"))
    s = ServerSession(lambda key: keys_equal(key, GW_KEY), 0.0, ALL)
    d_events, s_events = shuttle(d, s)
    assert s_events == [AuthFailed("invalid key")]
    assert d_events == [Rejected("AUTH", "invalid key")]
    # and one that took the key but not the feature (none does; still refused by the dialer)
    d = dialer(creds("r1"))
    d.data_to_send()
    d.receive(encode_frame(wire.AUTH, messages.encode_ok(frozenset({FEATURE_SUPER}))), 0.1)
    assert d.state is State.CLOSED


def test_router_peer_is_refused_on_a_connection_without_channel_binding() -> None:
    """kcp:// (no tls-unique): the router link is not offered, the AUTH is a bad key's."""
    d, s = dialer(creds("r1")), listener(creds("r2"), binding=None)
    _, s_events = shuttle(d, s)
    assert s_events == [AuthFailed("invalid key")]


def test_a_reload_that_leaves_the_cluster_refuses_the_next_handshake() -> None:
    d, s = dialer(creds("r1")), listener(None)
    _, s_events = shuttle(d, s)
    assert s_events == [AuthFailed("not a router of a cluster", peer=True)]


def test_gateways_are_unchanged_on_a_router_of_a_cluster() -> None:
    """A gateway's AUTH and REGISTER, byte for byte the Go gateway's, on a listener that
    takes router links: the same replies as on any router."""
    s = listener(creds("r2"))
    go_auth = bytes.fromhex("0018 0000 00000000") + b'{"key":"123456"}'
    _, events = s.receive(go_auth, 0.1)
    assert events == [AuthSucceeded()]
    assert b"".join(s.data_to_send()) == encode_frame(wire.AUTH, b"{}")
    reg = messages.encode_register("169.254.0.1", GW_KEY, ["198.18.10.0/24"])
    _, events = s.receive(encode_frame(wire.REGISTER, reg), 0.1)
    assert isinstance(events[0], RegisterRequested)
    s.accept_register(0)
    assert s.peer_id is None
    # a gateway's S2C_IPDATA is no data (it is what the router sends)
    got, _ = s.receive(encode_frame(wire.S2C_IPDATA, bytes(20)), 0.2)
    assert got == [] and s.unknown_commands == 1
    # a gateway's client session never offers router-peer
    c = ClientSession(GW_KEY, "169.254.0.1", [], 0.0, features=frozenset({FEATURE_SUPER}))
    auth = FrameDecoder().feed(b"".join(c.data_to_send()))[0][2]
    assert FEATURE_PEER not in json.loads(bytes(auth))["features"]
    _, events = shuttle(c, listener(creds("r2")))
    assert Registered() not in events  # REGISTER not answered here: only AUTH ran


@pytest.mark.parametrize(
    "router",
    [
        None,
        "not an object",
        {"cluster": "c1", "id": "r1"},
        {"cluster": "c1", "id": "r1", "nonce": "zz" * 32},
        {"cluster": "c1", "id": "r 1", "nonce": "00" * 32},
        {"cluster": "c1/..", "id": "r1", "nonce": "00" * 32},
        {"cluster": "c1", "id": "r1", "nonce": "00" * 31},
    ],
)
def test_a_malformed_router_auth_closes_the_connection(router) -> None:
    s = listener(creds("r2"))
    body = {"key": "", "features": [FEATURE_PEER]}
    if router is not None:
        body["router"] = router
    _, events = s.receive(encode_frame(wire.AUTH, json.dumps(body).encode()), 0.1)
    assert len(events) == 1 and isinstance(events[0], ConnectionLost)
    assert s.state is State.CLOSED
    # answered with an error, as a malformed REGISTER is
    (cmd, _, reply) = FrameDecoder().feed(b"".join(s.data_to_send()))[0]
    assert cmd == wire.AUTH and "error" in json.loads(bytes(reply))


@pytest.mark.parametrize("proofs", [[], ["00" * 32] * 3, ["00" * 31], [1], "00" * 32, None])
def test_a_malformed_router_register_closes_the_connection(proofs) -> None:
    d, s = dialer(creds("r1")), listener(creds("r2"))
    s.receive(b"".join(d.data_to_send()), 0.1)
    d.receive(b"".join(s.data_to_send()), 0.1)
    d.data_to_send()  # the real proofs: not sent
    router = {} if proofs is None else {"proofs": proofs}
    body = json.dumps({"router": router}).encode()
    _, events = s.receive(encode_frame(wire.REGISTER, body), 0.1)
    assert len(events) == 1 and isinstance(events[0], ConnectionLost)
    assert s.state is State.CLOSED and s.peer_id is None


def test_data_before_the_link_is_up_is_not_taken() -> None:
    d, s = dialer(creds("r1")), listener(creds("r2"))
    s.receive(b"".join(d.data_to_send()), 0.1)
    pkt = encode_frame(wire.S2C_IPDATA, bytes(20))
    got, _ = s.receive(pkt, 0.1)
    assert got == []
    got, _ = d.receive(b"".join(s.data_to_send()) + pkt, 0.1)
    assert got == []


def test_a_second_register_on_an_up_link_closes_it() -> None:
    d, s = dialer(creds("r1")), listener(creds("r2"))
    shuttle(d, s)
    body = messages.encode_peer_proofs([b"\x00" * 32])
    _, events = s.receive(encode_frame(wire.REGISTER, body), 0.2)
    assert isinstance(events[-1], ConnectionLost)
    assert s.state is State.CLOSED


def test_verify_compares_every_credential_and_proof() -> None:
    text = b"transcript"
    p1 = peering.prove(K1, peering.DIALER, text)
    p2 = peering.prove(K2, peering.DIALER, text)
    assert peering.verify([p2, p1], [K1], peering.DIALER, text) == K1
    assert peering.verify([p1], [K2, K1], peering.DIALER, text) == K1
    assert peering.verify([p1], [K2], peering.DIALER, text) is None
    # a role's proof is no proof for the other role
    assert peering.verify([p1], [K1], peering.LISTENER, text) is None
    assert PeerCredentials("c", "r", K1, K1).keys == (K1,)


def test_a_router_link_never_agrees_direct_paths() -> None:
    """A dialing router offering direct (a newer one, say) is not agreed it: the link
    is no gateway, and DIRECT_* frames on it stay unknown commands."""
    from polevpn.proto.messages import FEATURE_DIRECT

    s = listener(creds("r2"), offer=ALL | {FEATURE_DIRECT})
    hello = creds("r1").hello()
    auth = messages.encode_peer_auth(hello, frozenset({FEATURE_PEER, FEATURE_DIRECT}))
    s.receive(encode_frame(wire.AUTH, auth, 1), 0.0)
    assert s.state is State.AUTHENTICATED
    assert s.features == frozenset({FEATURE_PEER})

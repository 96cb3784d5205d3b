"""Direct-path messages (polevpn.direct.messages): layouts, round trips, strict refusals,
and fuzzing: any bytes decode to a message that encodes back to exactly those bytes, or
raise DirectMessageError, nothing else."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polevpn.direct import messages as m
from polevpn.direct.messages import (
    Candidate,
    CandidateKind,
    Candidates,
    Cause,
    Datagram,
    DatagramKind,
    DirectMessageError,
    Endpoint,
    EndpointParams,
    Offer,
    PathCode,
    Proof,
    Revoke,
    RevokeReason,
    Status,
    UnsupportedVersion,
)
from polevpn.proto import wire

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

A1 = ipaddress.ip_address("169.254.0.1")
A2 = ipaddress.ip_address("169.254.0.2")
EP4 = Endpoint(ipaddress.ip_address("198.18.0.10"), 40001)
EP6 = Endpoint(ipaddress.ip_address("2001:db8::10"), 40002)
PAIR = bytes(range(16))
SECRET = bytes(range(32, 64))


# ---- strategies ---------------------------------------------------------------------------

v4 = st.builds(
    ipaddress.IPv4Address, st.integers(0, 2**32 - 1).filter(lambda x: 0 < x < 0xE0000000)
)
v6 = st.builds(
    ipaddress.IPv6Address,
    st.integers(1, 2**128 - 1).filter(lambda x: x >> 120 != 0xFF and x >> 32 != 0xFFFF),
)
addresses = st.one_of(v4, v6)
endpoints = st.builds(Endpoint, addresses, st.integers(1, 65535))
networks = st.one_of(
    st.builds(
        lambda a, p: ipaddress.ip_network((int(a), p), strict=False), v4, st.integers(0, 32)
    ),
    st.builds(
        lambda a, p: ipaddress.ip_network((int(a), p), strict=False), v6, st.integers(0, 128)
    ),
)
ids = st.binary(min_size=16, max_size=16)
lifetimes = st.integers(1, m.MAX_LIFETIME)


@st.composite
def offers(draw) -> Offer:
    you, peer = draw(st.lists(addresses, min_size=2, max_size=2, unique=True))
    eps = draw(st.lists(endpoints, min_size=1, max_size=m.MAX_OFFER_CANDIDATES, unique=True))
    kinds = draw(st.lists(st.sampled_from(CandidateKind), min_size=len(eps), max_size=len(eps)))
    nets = draw(st.lists(networks, max_size=40, unique=True))
    return Offer(
        draw(ids),
        draw(lifetimes),
        draw(st.binary(min_size=32, max_size=32)),
        you,
        peer,
        tuple(Candidate(k, e) for k, e in zip(kinds, eps, strict=True)),
        tuple(nets),
    )


messages = st.one_of(
    st.builds(
        EndpointParams,
        st.one_of(st.none(), addresses),
        st.integers(1, 65535),
        ids,
        st.binary(min_size=32, max_size=32),
        lifetimes,
    ),
    st.builds(
        Candidates,
        st.lists(endpoints, max_size=m.MAX_LOCAL_CANDIDATES, unique=True).map(tuple),
    ),
    offers(),
    st.builds(Revoke, ids, st.sampled_from(RevokeReason)),
    st.builds(
        Status,
        ids,
        st.sampled_from(PathCode),
        st.sampled_from(Cause),
        st.one_of(st.none(), st.integers(0, m.RTT_UNKNOWN - 1).map(lambda us: us / 1e6)),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.one_of(st.none(), endpoints),
    ),
    st.builds(Proof, ids, st.binary(min_size=32, max_size=32)),
)


def _offer(**kw) -> Offer:
    base = dict(
        pair_id=PAIR,
        lifetime=3600,
        secret=SECRET,
        you=A1,
        peer=A2,
        candidates=(Candidate(CandidateKind.PUBLIC, EP4),),
        networks=(ipaddress.ip_network("198.18.20.0/24"),),
    )
    base.update(kw)
    return Offer(**base)  # type: ignore[arg-type]


# ---- layouts ------------------------------------------------------------------------------


def test_offer_bytes_are_the_documented_layout():
    """docs/protocol.md section 18 shows these bytes."""
    offer = _offer(
        candidates=(Candidate(CandidateKind.HOST, EP4), Candidate(CandidateKind.PUBLIC, EP6)),
        networks=(ipaddress.ip_network("198.18.20.0/24"), ipaddress.ip_network("2001:db8:20::/48")),
    )
    body = offer.encode()
    assert body == bytes.fromhex(
        "0100"  # version 1, flags 0
        "000102030405060708090a0b0c0d0e0f"  # pair id
        "00000e10"  # lifetime 3600 s
        "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"  # secret
        "04a9fe0001"  # you: 169.254.0.1
        "04a9fe0002"  # peer: 169.254.0.2
        "02"  # 2 candidates
        "01" "04c612000a" "9c41"  # host 198.18.0.10:40001
        "02" "0620010db8000000000000000000000010" "9c42"  # public [2001:db8::10]:40002
        "0002"  # 2 networks
        "0418c6121400"  # 198.18.20.0/24
        "063020010db8002000000000000000000000"  # 2001:db8:20::/48
    )
    frame = m.encode(offer, seq=7)
    assert frame[:8] == wire.frame_header(wire.Command.DIRECT_OFFER, len(body), 7)
    assert m.decode(wire.Command.DIRECT_OFFER, frame[8:]) == offer


def test_small_message_layouts():
    assert Revoke(PAIR, RevokeReason.PEER_GONE).encode() == bytes.fromhex("0100") + PAIR + b"\2"
    assert Candidates((EP4,)).encode() == bytes.fromhex("010001" "04c612000a9c41")
    assert Candidates(()).encode() == bytes.fromhex("010000")
    params = EndpointParams(None, 4443, PAIR, SECRET, 600)
    assert params.encode() == (
        bytes.fromhex("0100" "00" "115b") + PAIR + SECRET + bytes.fromhex("00000258")
    )
    status = Status(PAIR, PathCode.DIRECT, Cause.NONE, 0.0125, 1000, 2000, 3, EP4)
    assert status.encode() == (
        bytes.fromhex("0100")
        + PAIR
        + bytes.fromhex("0200" "000030d4")
        + (1000).to_bytes(8, "big")
        + (2000).to_bytes(8, "big")
        + (3).to_bytes(8, "big")
        + bytes.fromhex("04c612000a9c41")
    )
    unknown = Status(PAIR, PathCode.RELAYED, Cause.NO_ANSWER, None, 0, 0, 0)
    assert unknown.encode()[18:24] == bytes.fromhex("0001" "ffffffff")
    assert Status.decode(unknown.encode()).rtt is None
    assert Proof(PAIR, SECRET).encode() == b"\1\0" + PAIR + SECRET


def test_datagram_layout():
    key = bytes(32)
    d = Datagram(DatagramKind.ACK, PAIR, 0x0102030405060708, EP4)
    raw = d.encode(key)
    assert len(raw) == 64
    assert raw[:4] == bytes([0xD1, 4, 0, 0])
    assert raw[4:20] == PAIR
    assert raw[20:28] == bytes.fromhex("0102030405060708")
    assert raw[28:47] == bytes.fromhex("04c612000a") + bytes(12) + bytes.fromhex("9c41")
    assert raw[47] == 0
    assert raw[48:] == m.tag(key, raw[:48])
    probe = Datagram(DatagramKind.PROBE, PAIR, 1, flags=m.FLAG_NOMINATE).encode(key)
    assert probe[2] == 1 and probe[28:48] == bytes(20)
    six = Datagram(DatagramKind.ENDPOINT_REPLY, PAIR, 9, EP6).encode(key)
    assert six[28:47] == bytes.fromhex("0620010db8000000000000000000000010" "9c42")
    assert m.parse_datagram(six).seen == EP6


def test_datagram_kinds_do_not_collide_with_the_other_traffic_of_a_socket():
    """The first byte tells a direct datagram from DTLS records (20..25), bare KCP (0) and
    FEC shards (0xF3), which share the gateway's socket or the router's kcp:// port."""
    from polevpn.kcp import dtls, fec

    raw = Datagram(DatagramKind.PROBE, PAIR, 1).encode(bytes(32))
    assert m.is_datagram(raw)
    assert not dtls.looks_like_dtls(raw)
    assert raw[0] not in (0, fec.MAGIC)
    assert not m.is_datagram(raw[:63]) and not m.is_datagram(b"\x16" + raw[1:])


# ---- round trips --------------------------------------------------------------------------


@FUZZ
@given(messages)
def test_round_trip(msg):
    body = msg.encode()
    assert len(body) <= wire.MAX_BODY
    assert m.decode(msg.COMMAND, body) == msg
    frame = m.encode(msg, seq=3)
    dec = wire.FrameDecoder()
    ((command, seq, got),) = dec.feed(frame)
    assert (command, seq) == (msg.COMMAND, 3)
    assert m.decode(command, got) == msg


@FUZZ
@given(
    st.sampled_from(DatagramKind),
    ids,
    st.integers(0, 2**64 - 1),
    endpoints,
    st.booleans(),
    st.binary(min_size=32, max_size=32),
)
def test_datagram_round_trip(kind, ident, nonce, seen, nominate, key):
    answer = kind in (DatagramKind.ACK, DatagramKind.ENDPOINT_REPLY)
    flags = m.FLAG_NOMINATE if nominate and kind is DatagramKind.PROBE else 0
    d = Datagram(kind, ident, nonce, seen if answer else None, flags)
    raw = d.encode(key)
    assert m.parse_datagram(raw) == d
    assert m.authentic(raw, key)
    other = bytes([key[0] ^ 1]) + key[1:]
    assert not m.authentic(raw, other)
    # any one bit flipped in the signed part or the tag: no longer authentic
    for i in (0, 3, 20, 47, 48, 63):
        bad = bytearray(raw)
        bad[i] ^= 0x40
        assert not m.authentic(bytes(bad), key)


def test_largest_offer_fits_a_frame():
    nets = tuple(
        ipaddress.ip_network((0x20010DB8 << 96 | i << 64, 64)) for i in range(m.MAX_OFFER_NETWORKS)
    )
    cands = tuple(
        Candidate(CandidateKind.HOST, Endpoint(ipaddress.ip_address(f"2001:db8::{i + 1:x}"), 1))
        for i in range(m.MAX_OFFER_CANDIDATES)
    )
    offer = _offer(candidates=cands, networks=nets)
    frame = m.encode(offer)
    assert len(frame) <= wire.MAX_FRAME
    assert m.decode(offer.COMMAND, frame[8:]) == offer


# ---- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "after the message"),
        (lambda b: b"\x09" + b[1:], "version 9"),
        (lambda b: b[:1] + b"\x80" + b[2:], "flags"),
        (lambda b: b[:18] + b"\0\0\0\0" + b[22:], "lifetime 0"),
        (lambda b: b[:18] + (86_401).to_bytes(4, "big") + b[22:], "lifetime 86401"),
        (lambda b: b[:54] + b"\x05" + b[55:], "family 5"),
        # you == peer
        (lambda b: b[:63] + b"\x01" + b[64:], "to itself"),
        # 0 candidates
        (lambda b: b[:64] + b"\x00" + b[65:], "0 candidates"),
        # candidate kind 3
        (lambda b: b[:65] + b"\x03" + b[66:], "candidate kind 3"),
        # candidate port 0
        (lambda b: b[:71] + b"\0\0" + b[73:], "port 0"),
        # candidate address 0.0.0.0
        (lambda b: b[:67] + bytes(4) + b[71:], "not a unicast"),
        # network with host bits: 198.18.20.1/24
        (lambda b: b[:-1] + b"\x01", "host bits"),
        # network prefix length 33
        (lambda b: b[:76] + b"\x21" + b[77:], "prefix length 33"),
        # more networks than follow
        (lambda b: b[:73] + b"\x00\x02" + b[75:], "truncated"),
    ],
)
def test_offer_refusals(mutate, message):
    body = _offer().encode()
    # the layout the offsets above assume
    assert body[54] == 4 and body[64] == 1 and body[65] == 2 and len(body) == 81
    with pytest.raises(DirectMessageError, match=message):
        Offer.decode(mutate(body))


def test_unsupported_version_is_its_own_error():
    body = b"\x02" + Revoke(PAIR, RevokeReason.REVOKED).encode()[1:]
    with pytest.raises(UnsupportedVersion):
        Revoke.decode(body)
    # a DirectMessageError too, so a caller that does not care needs one except clause
    assert issubclass(UnsupportedVersion, DirectMessageError)
    assert issubclass(DirectMessageError, ValueError)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: _offer(you=A2), "to itself"),
        (lambda: _offer(pair_id=b"short"), "pair id"),
        (lambda: _offer(secret=bytes(31)), "secret"),
        (lambda: _offer(candidates=()), "0 candidates"),
        (lambda: _offer(candidates=(Candidate(1, EP4), Candidate(2, EP4))), "twice"),
        (lambda: _offer(networks=(ipaddress.ip_network("198.18.0.0/15"),) * 2), "twice"),
        (lambda: _offer(peer=ipaddress.ip_address("224.0.0.1")), "unicast"),
        (lambda: _offer(peer=ipaddress.ip_address("::ffff:198.18.0.1")), "IPv4-mapped"),
        (lambda: Candidate(3, EP4), "candidate kind 3"),
        (lambda: Candidates((EP4,) * 2), "twice"),
        (
            lambda: Candidates(
                tuple(Endpoint(ipaddress.ip_address("198.18.0.1"), p) for p in range(1, 10))
            ),
            "9 candidates",
        ),
        (lambda: Endpoint(ipaddress.ip_address("198.18.0.1"), 0), "port 0"),
        (lambda: Endpoint(ipaddress.ip_address("0.0.0.0"), 1), "unicast"),
        (lambda: Endpoint(ipaddress.ip_address("255.255.255.255"), 1), "unicast"),
        (lambda: Endpoint("198.18.0.1", 1), "not an address"),  # type: ignore[arg-type]
        (lambda: EndpointParams(None, 0, PAIR, SECRET, 60), "port 0"),
        (lambda: EndpointParams(None, 1, PAIR, SECRET, 0), "lifetime 0"),
        (lambda: Revoke(PAIR, 9), "revoke reason 9"),  # type: ignore[arg-type]
        (lambda: Status(PAIR, 3, 0, None, 0, 0, 0), "path state 3"),  # type: ignore[arg-type]
        (lambda: Status(PAIR, 0, 6, None, 0, 0, 0), "cause 6"),  # type: ignore[arg-type]
        (lambda: Status(PAIR, 0, 0, -1.0, 0, 0, 0), "rtt"),  # type: ignore[arg-type]
        (lambda: Status(PAIR, 0, 0, None, 2**64, 0, 0), "bytes_sent"),  # type: ignore[arg-type]
        (lambda: Proof(PAIR, b""), "proof"),
        (lambda: Datagram(DatagramKind.PROBE, PAIR, 1, EP4), "only an answer"),
        (lambda: Datagram(DatagramKind.ACK, PAIR, 1), "only an answer"),
        (lambda: Datagram(DatagramKind.ACK, PAIR, 1, EP4, m.FLAG_NOMINATE), "flags"),
        (lambda: Datagram(DatagramKind.PROBE, PAIR, 2**64), "nonce"),
        (lambda: Datagram(5, PAIR, 1), "datagram kind 5"),  # type: ignore[arg-type]
    ],
)
def test_nothing_invalid_is_built(build, message):
    with pytest.raises(DirectMessageError, match=message):
        build()


def test_endpoint_from_sockaddr():
    assert Endpoint.from_sockaddr(("198.18.0.10", 40001)) == EP4
    assert Endpoint.from_sockaddr(("2001:db8::10", 40002, 0, 0)) == EP6
    # an IPv4 peer on a dual-stack socket is the IPv4 endpoint
    assert Endpoint.from_sockaddr(("::ffff:198.18.0.10", 40001, 0, 0)) == EP4
    assert EP4.sockaddr() == ("198.18.0.10", 40001)
    assert str(EP6) == "[2001:db8::10]:40002" and str(EP4) == "198.18.0.10:40001"
    with pytest.raises(DirectMessageError):
        Endpoint.from_sockaddr(("fe80::1%eth0", 1, 0, 0))
    with pytest.raises(DirectMessageError, match="not an IP address"):
        Endpoint.from_sockaddr(("example.org", 1))


def test_decode_refuses_other_commands():
    with pytest.raises(DirectMessageError, match="not a direct-path command"):
        m.decode(wire.REGISTER, b"{}")
    assert sorted(m.COMMANDS) == [32, 33, 34, 35, 36, 37]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:63], "63 bytes"),
        (lambda b: b"\xd2" + b[1:], "magic"),
        (lambda b: b[:1] + b"\x07" + b[2:], "kind 7"),
        (lambda b: b[:3] + b"\x01" + b[4:], "reserved"),
        (lambda b: b[:47] + b"\x01" + b[48:], "reserved"),
        (lambda b: b[:28] + b"\x09" + b[29:], "family 9"),
        (lambda b: b[:40] + b"\x01" + b[41:], "IPv4 with bytes after"),
        (lambda b: b[:45] + b"\0\0" + b[47:], "port 0"),
        (lambda b: b[:2] + b"\x01" + b[3:], "flags"),  # nominate on an ACK
    ],
)
def test_datagram_refusals(mutate, message):
    raw = Datagram(DatagramKind.ACK, PAIR, 1, EP4).encode(bytes(32))
    with pytest.raises(DirectMessageError, match=message):
        m.parse_datagram(mutate(raw))


def test_probe_with_an_endpoint_slot_is_refused():
    raw = bytearray(Datagram(DatagramKind.PROBE, PAIR, 1).encode(bytes(32)))
    raw[28:47] = bytes.fromhex("04c612000a") + bytes(12) + bytes.fromhex("9c41")
    with pytest.raises(DirectMessageError, match="only an answer"):
        m.parse_datagram(bytes(raw))
    raw[28:47] = bytes(18) + b"\x01"
    with pytest.raises(DirectMessageError, match="family 0 with bytes"):
        m.parse_datagram(bytes(raw))


# ---- fuzz ---------------------------------------------------------------------------------


@FUZZ
@given(st.sampled_from(sorted(m.COMMANDS)), st.binary(max_size=300))
def test_fuzz_arbitrary_bodies(command, body):
    """Any bytes: a message that encodes back to the same bytes (the encoding is
    canonical), or DirectMessageError."""
    try:
        msg = m.decode(command, body)
    except DirectMessageError:
        return
    assert msg.encode() == body


@FUZZ
@given(messages, st.data())
def test_fuzz_mutated_messages(msg, data):
    body = bytearray(msg.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(body) - 1)))
        if op == "flip" and body:
            body[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del body[pos:]
        else:
            body[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    try:
        got = m.decode(msg.COMMAND, bytes(body))
    except DirectMessageError:
        return
    assert got.encode() == bytes(body)


@FUZZ
@given(st.binary(min_size=64, max_size=64), st.data())
def test_fuzz_datagrams(raw, data):
    raw = bytes([0xD1, data.draw(st.integers(0, 6))]) + raw[2:]
    try:
        d = m.parse_datagram(raw)
    except DirectMessageError:
        return
    # whatever parsed is canonical: re-encoding reproduces the signed part
    assert d.encode(bytes(32))[:48] == raw[:48]


def test_key_material_is_not_in_reprs():
    offer = _offer()
    params = EndpointParams(None, 1, PAIR, SECRET, 60)
    for obj in (offer, params):
        assert SECRET.hex() not in repr(obj) and repr(SECRET) not in repr(obj)


def test_harmless_to_sessions_that_did_not_agree_it():
    """``direct`` is a known feature now, but a DIRECT_* frame reaching a session that
    did not agree it is ignored and counted like any unknown command, on both ends."""
    from polevpn.proto.messages import FEATURE_DIRECT, KNOWN_FEATURES, parse_auth
    from polevpn.proto.session import ClientSession, ServerSession, State

    assert FEATURE_DIRECT == "direct" and FEATURE_DIRECT in KNOWN_FEATURES
    assert parse_auth(b'{"key":"k","features":["direct"]}').features == {"direct"}
    offer = m.encode(_offer())
    revoke = m.encode(Revoke(PAIR, RevokeReason.REVOKED))

    server = ServerSession(lambda key: key == "k", 0.0)
    server.receive(wire.encode_frame(wire.AUTH, b'{"key":"k","features":["direct"]}'), 0.0)
    assert server.features == frozenset() and server.state is State.AUTHENTICATED
    packets, events = server.receive(offer + m.encode(Candidates((EP4,))), 0.1)
    assert (packets, events) == ([], []) and server.unknown_commands == 2
    assert server.state is State.AUTHENTICATED

    client = ClientSession("k", "169.254.0.1", [], 0.0)
    client.receive(wire.encode_frame(wire.AUTH, b'{"features":["direct"]}'), 0.0)
    client.receive(wire.encode_frame(wire.REGISTER, b"{}"), 0.0)
    assert client.features == frozenset() and client.state is State.REGISTERED
    packets, events = client.receive(offer + revoke, 0.1)
    assert (packets, events) == ([], []) and client.unknown_commands == 2
    assert client.state is State.REGISTERED

"""Direct-path key material (polevpn.direct.keys): HKDF against RFC 5869, both gateways
derive matching per-direction keys bound to the pair and both addresses, refusals of
material that is not theirs or has expired, and channel proofs over a real DTLS
association's exporter value (a relayed proof fails)."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polevpn.direct import keys as K
from polevpn.direct.keys import KeyExpired, KeyMaterialError, PairKeyring, PairKeys, Side
from polevpn.direct.messages import Candidate, CandidateKind, Endpoint, Offer, Proof

A = ipaddress.ip_address("169.254.0.1")
B = ipaddress.ip_address("169.254.0.2")
C = ipaddress.ip_address("169.254.0.3")
A6 = ipaddress.ip_address("2001:db8:ff::1")
PAIR = bytes(range(16))
SECRET = bytes(range(100, 132))


def _counter_random():
    """A deterministic stand-in for os.urandom: each call a new pattern."""
    n = itertools.count(1)
    return lambda size: bytes([next(n) % 256]) * size


# ---- HKDF ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ikm, salt, info, length, okm",
    [
        # RFC 5869 A.1
        (
            "0b" * 22,
            "000102030405060708090a0b0c",
            "f0f1f2f3f4f5f6f7f8f9",
            42,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
            "34007208d5b887185865",
        ),
        # RFC 5869 A.2
        (
            bytes(range(0x00, 0x50)).hex(),
            bytes(range(0x60, 0xB0)).hex(),
            bytes(range(0xB0, 0x100)).hex(),
            82,
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
            "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
            "cc30c58179ec3e87c14c01d5c1f3434f1d87",
        ),
        # RFC 5869 A.3: no salt, no info
        (
            "0b" * 22,
            "",
            "",
            42,
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
            "9d201395faa4b61a96c8",
        ),
    ],
)
def test_hkdf_rfc5869(ikm, salt, info, length, okm):
    prk = K.hkdf_extract(bytes.fromhex(salt), bytes.fromhex(ikm))
    assert K.hkdf_expand(prk, bytes.fromhex(info), length).hex() == okm


def test_hkdf_bounds():
    with pytest.raises(ValueError):
        K.hkdf_expand(bytes(32), b"", 0)
    with pytest.raises(ValueError):
        K.hkdf_expand(bytes(32), b"", 255 * 32 + 1)
    assert len(K.hkdf_expand(bytes(32), b"", 255 * 32)) == 255 * 32


# ---- derivation ---------------------------------------------------------------------------


def _pair(me=A, peer=B, pair=PAIR, secret=SECRET, expires=100.0) -> PairKeys:
    return PairKeys.derive(pair, secret, me, peer, expires)


def test_both_sides_derive_matching_direction_keys():
    a, b = _pair(A, B), _pair(B, A)
    assert a.initiator and not b.initiator
    assert a.send_probe_key == b.recv_probe_key and b.send_probe_key == a.recv_probe_key
    assert a.send_proof_key == b.recv_proof_key and b.send_proof_key == a.recv_proof_key
    assert a.psk == b.psk and a.psk_identity == b.psk_identity
    # every key distinct: a probe reflected to its sender does not verify there
    keys = {a.send_probe_key, a.recv_probe_key, a.send_proof_key, a.recv_proof_key, a.psk}
    assert len(keys) == 5 and all(len(k) == 32 for k in keys)


def test_derivation_is_pinned():
    """A change of the derivation changes the wire: both ends must agree, so it is fixed."""
    a = _pair(A, B)
    prk = K.hkdf_extract(PAIR, SECRET)
    info = (
        b"\x00\x10polevpn direct 1"
        + b"\x00\x0bprobe lo>hi"
        + b"\x00\x10"
        + PAIR
        + b"\x00\x05\x04\xa9\xfe\x00\x01"
        + b"\x00\x05\x04\xa9\xfe\x00\x02"
    )
    assert a.send_probe_key == K.hkdf_expand(prk, info, 32)


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=32, max_size=32),
    st.sampled_from([(A, B), (B, A), (A, A6), (A6, C)]),
)
def test_keys_are_bound_to_the_pair_and_both_addresses(pair, secret, addrs):
    me, peer = addrs
    base = _pair(me, peer, pair, secret)
    other_pair = _pair(me, peer, bytes([pair[0] ^ 1]) + pair[1:], secret)
    other_secret = _pair(me, peer, pair, bytes([secret[0] ^ 1]) + secret[1:])
    third = _pair(me, C if peer != C else B, pair, secret)
    for other in (other_pair, other_secret, third):
        assert other.send_probe_key != base.send_probe_key
        assert other.recv_proof_key != base.recv_proof_key
        assert other.psk != base.psk


def test_ordering_puts_ipv4_first():
    assert _pair(A6, A).initiator is False and _pair(A, A6).initiator is True


def test_a_pair_with_itself_or_short_material_is_refused():
    with pytest.raises(KeyMaterialError, match="itself"):
        _pair(A, A)
    with pytest.raises(KeyMaterialError, match="size"):
        _pair(secret=b"short")
    with pytest.raises(KeyMaterialError, match="lifetime"):
        K.PairMaterial(PAIR, SECRET, 0)


# ---- offers -------------------------------------------------------------------------------


def _sides():
    ea = Candidate(CandidateKind.PUBLIC, Endpoint(ipaddress.ip_address("198.18.1.1"), 5000))
    eb = Candidate(CandidateKind.PUBLIC, Endpoint(ipaddress.ip_address("198.18.2.1"), 6000))
    sa = Side(A, (ea,), (ipaddress.ip_network("198.18.10.0/24"),))
    sb = Side(B, (eb,), (ipaddress.ip_network("198.18.20.0/24"),))
    return sa, sb


def test_pair_offers_and_issue():
    material = K.issue(600, random=_counter_random())
    sa, sb = _sides()
    to_a, to_b = K.pair_offers(material, sa, sb)
    assert (to_a.you, to_a.peer, to_b.you, to_b.peer) == (A, B, B, A)
    assert to_a.candidates == sb.candidates and to_a.networks == sb.networks
    assert to_b.candidates == sa.candidates and to_b.networks == sa.networks
    assert to_a.pair_id == to_b.pair_id == material.pair_id
    assert to_a.secret == to_b.secret == material.secret and to_a.lifetime == 600
    # both parts drawn from the random source, separately; each issue is fresh
    assert (material.pair_id, material.secret) == (b"\x01" * 16, b"\x02" * 32)
    assert K.issue().pair_id != K.issue().pair_id
    ka = PairKeys.from_offer(Offer.decode(to_a.encode()), {A, A6}, now=10.0)
    kb = PairKeys.from_offer(Offer.decode(to_b.encode()), {B}, now=11.0)
    assert ka.send_probe_key == kb.recv_probe_key
    assert (ka.expires_at, kb.expires_at) == (610.0, 611.0)


def test_offers_not_for_this_gateway_are_refused():
    material = K.issue()
    sa, sb = _sides()
    to_a, _ = K.pair_offers(material, sa, sb)
    with pytest.raises(KeyMaterialError, match="not this gateway"):
        PairKeys.from_offer(to_a, {C}, 0.0)
    with pytest.raises(KeyMaterialError, match="as its peer"):
        PairKeys.from_offer(to_a, {A, B}, 0.0)
    assert K.own_addresses("169.254.0.1", None, A6) == {A, A6}


def test_expiry():
    k = _pair(expires=100.0)
    k.check(99.9)
    assert not k.expired(99.9) and k.expired(100.0)
    with pytest.raises(KeyExpired):
        k.check(100.0)


def test_keyring_refuses_unknown_and_expired_and_is_bounded():
    ring = PairKeyring(max_pairs=2)
    k1 = _pair(expires=100.0)
    k2 = _pair(A, C, pair=bytes(16), expires=50.0)
    ring.add(k1, 0.0)
    ring.add(k2, 0.0)
    assert ring.get(PAIR, 1.0) is k1 and ring.for_peer(C) == [k2]
    with pytest.raises(KeyMaterialError, match="already 2 pairs"):
        ring.add(_pair(A, C, pair=b"\1" * 16), 1.0)
    with pytest.raises(KeyMaterialError, match="another pair"):
        ring.add(_pair(A, C, pair=PAIR), 1.0)
    assert ring.get(b"\x09" * 16, 1.0) is None and ring.refused_unknown == 1
    assert ring.get(bytes(16), 50.0) is None and ring.refused_expired == 1
    assert len(ring) == 1
    # expired material does not go in at all
    with pytest.raises(KeyExpired):
        ring.add(_pair(A, C, pair=b"\2" * 16, expires=60.0), 60.0)
    # the same pair again (a re-derivation) replaces
    ring.add(_pair(expires=200.0), 70.0)
    assert ring.get(PAIR, 150.0).expires_at == 200.0  # type: ignore[union-attr]
    assert ring.expire(200.0)[0].pair_id == PAIR and len(ring) == 0
    assert ring.remove(PAIR) is None


def test_key_bytes_are_not_in_reprs():
    k = _pair()
    text = repr(k) + repr(K.PairMaterial(PAIR, SECRET))
    for secret in (k.send_probe_key, k.recv_proof_key, k.psk, SECRET):
        assert secret.hex() not in text and repr(secret) not in text


# ---- channel proofs -----------------------------------------------------------------------


def test_channel_proof_checks():
    a, b = _pair(A, B), _pair(B, A)
    binding = bytes(range(32))
    pa = a.channel_proof(binding)
    assert b.verify_channel_proof(pa, binding, 0.0)
    # not to its own sender (a reflected proof), not for another binding or pair, not late
    assert not a.verify_channel_proof(pa, binding, 0.0)
    assert not b.verify_channel_proof(pa, bytes(32), 0.0)
    assert not b.verify_channel_proof(Proof(bytes(16), pa.proof), binding, 0.0)
    assert not b.verify_channel_proof(pa, binding, 100.0)
    # a third gateway with material of its own pair with B cannot prove the A-B pair
    c = _pair(C, B)
    forged = Proof(PAIR, c.channel_proof(binding).proof)
    assert not b.verify_channel_proof(forged, binding, 0.0)


@pytest.fixture(scope="module")
def router_keys(tmp_path_factory):
    from polevpn.keygen import generate

    return generate(tmp_path_factory.mktemp("keys"))


def _dtls_pair(keys, peer):
    """A DTLS client and server over memory BIOs, handshake done (as tests/test_dtls.py)."""
    from polevpn.kcp import dtls

    verify = dtls.Verification(insecure=True)
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    listener = dtls.CookieListener(ctx, jar)
    client = dtls.DtlsSession.client(dtls.client_context(verify), verify)
    server = None
    to_server = client.step(0.0)
    for _ in range(10):
        to_client: list[bytes] = []
        for d in to_server:
            if server is None:
                replies, server = listener.receive(d, dtls.peer_key(peer), 0.0)
                to_client += replies
            else:
                to_client += server.receive(d, 0.0)[1]
        to_server = [out for d in to_client for out in client.receive(d, 0.0)[1]]
        if not to_server and not to_client:
            break
    assert client.established and server is not None and server.established
    return client, server


def _binding(session) -> bytes:
    return session.conn.export_keying_material(K.EXPORTER_LABEL, K.EXPORTER_LEN)


def test_proofs_over_a_real_dtls_association(router_keys):
    """Both ends of one association see the same exporter value, so the proofs verify; a
    man in the middle holds two associations with two values, and relaying fails."""
    a, b = _pair(A, B), _pair(B, A)
    client, server = _dtls_pair(router_keys, ("198.18.1.1", 5000))
    assert _binding(client) == _binding(server)
    assert b.verify_channel_proof(a.channel_proof(_binding(client)), _binding(server), 0.0)
    assert a.verify_channel_proof(b.channel_proof(_binding(server)), _binding(client), 0.0)
    # the middle: A's association ends at M (client1/server1), M's own to B (client2/server2)
    client1, server1 = _dtls_pair(router_keys, ("198.18.1.1", 5001))
    client2, server2 = _dtls_pair(router_keys, ("198.18.3.1", 5002))
    relayed = a.channel_proof(_binding(client1))
    assert not b.verify_channel_proof(relayed, _binding(server2), 0.0)

"""Who may register what: the router's credentials and grants, without sockets."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polevpn.proto.auth import Authority, GatewayGrant, keys_equal

N = ipaddress.ip_network
A = ipaddress.ip_address
FP_A = hashlib.sha256(b"cert A").digest()
FP_B = hashlib.sha256(b"cert B").digest()

GW_A = GatewayGrant(A("169.254.0.1"), "key-a", None, (N("198.18.10.0/24"), N("2001:db8:10::/64")))
GW_B = GatewayGrant(A("169.254.0.2"), None, FP_B, (N("198.18.20.0/24"),))
GW_C = GatewayGrant(A("169.254.0.3"), "key-c", FP_A, (N("198.18.30.0/24"),))


def table(shared: str | None = None) -> Authority:
    return Authority(shared, [GW_A, GW_B, GW_C])


def test_keys_equal() -> None:
    assert keys_equal("k", "k")
    assert not keys_equal("k", "K")
    assert not keys_equal("", "k")
    assert keys_equal("kéy", "kéy")


def test_authenticate_accepts_any_listed_credential_or_the_shared_key() -> None:
    auth = table("shared")
    assert auth.authenticate("shared", None)
    assert auth.authenticate("key-a", None)
    assert auth.authenticate("", FP_B)
    assert auth.authenticate("whatever", FP_A)
    assert not auth.authenticate("key-b", None)
    assert not auth.authenticate("", None)
    assert not table(None).authenticate("shared", None)


def test_register_within_grant() -> None:
    auth = table()
    d = auth.authorize(
        "key-a", None, A("169.254.0.1"), [N("198.18.10.0/25"), N("2001:db8:10::/64")]
    )
    assert d.ok and d.grant is GW_A
    # the gateway's own address needs no grant
    assert auth.authorize("key-a", None, A("169.254.0.1"), []).ok


@pytest.mark.parametrize("net", ["198.18.20.0/24", "198.18.10.0/23", "0.0.0.0/0", "2001:db8::/32"])
def test_register_outside_grant_is_refused(net: str) -> None:
    d = table().authorize("key-a", None, A("169.254.0.1"), [N(net)])
    assert not d.ok
    assert d.error == f"network {N(net)} is not granted to gateway 169.254.0.1"


def test_credentials_must_be_the_gateways_own() -> None:
    auth = table("shared")
    assert auth.authorize("key-c", FP_A, A("169.254.0.1"), []).error == (
        "invalid credentials for gateway 169.254.0.1"
    )
    # the shared key does not open a listed gateway
    assert not auth.authorize("shared", None, A("169.254.0.1"), []).ok
    # certificate-only entry: the key does not matter, the fingerprint does
    assert auth.authorize("", FP_B, A("169.254.0.2"), [N("198.18.20.0/24")]).ok
    assert not auth.authorize("", FP_A, A("169.254.0.2"), []).ok
    assert not auth.authorize("", None, A("169.254.0.2"), []).ok
    # both listed: both must match
    assert auth.authorize("key-c", FP_A, A("169.254.0.3"), []).ok
    assert not auth.authorize("key-c", None, A("169.254.0.3"), []).ok
    assert not auth.authorize("key-c", FP_B, A("169.254.0.3"), []).ok
    assert not auth.authorize("key-a", FP_A, A("169.254.0.3"), []).ok


def test_unlisted_gateway_needs_the_shared_key() -> None:
    assert table().authorize("key-a", None, A("169.254.0.9"), []).error == (
        "gateway 169.254.0.9 is not configured on this router"
    )
    assert Authority("shared").authorize("nope", None, A("169.254.0.9"), []).error == "invalid key"
    assert Authority("shared").authorize("shared", None, A("169.254.0.9"), [N("0.0.0.0/0")]).ok


def test_shared_key_cannot_take_what_a_listed_gateway_is_granted() -> None:
    auth = table("shared")
    gw = A("169.254.0.9")
    assert auth.authorize("shared", None, gw, [N("198.18.40.0/24")]).ok
    for net, owner in [
        ("198.18.10.0/24", "169.254.0.1"),
        ("198.18.10.128/25", "169.254.0.1"),
        ("198.18.0.0/16", "169.254.0.1"),
        ("2001:db8:10::5/128", "169.254.0.1"),
        ("169.254.0.2/32", "169.254.0.2"),
    ]:
        d = auth.authorize("shared", None, gw, [N(net)])
        assert d.error == f"network {N(net)} belongs to gateway {owner}", net
    # nor register a listed gateway's address as its own host route
    d = auth.authorize("shared", None, A("198.18.20.7"), [])
    assert d.error == "network 198.18.20.7/32 belongs to gateway 169.254.0.2"


def test_table_rejects_duplicates_and_empty_credentials() -> None:
    with pytest.raises(ValueError, match="twice"):
        Authority(None, [GW_A, GW_A])
    with pytest.raises(ValueError, match="neither"):
        Authority(None, [GatewayGrant(A("169.254.0.5"), None, None, ())])


def test_overlapping_grants_are_reported() -> None:
    wide = GatewayGrant(A("169.254.0.4"), "k", None, (N("198.18.0.0/16"),))
    pairs = Authority(None, [GW_A, GW_B, wide]).overlaps()
    assert {(a.gateway, b.gateway) for a, b, _ in pairs} == {
        (GW_A.gateway, wide.gateway),
        (GW_B.gateway, wide.gateway),
    }
    assert table().overlaps() == []


_nets = st.one_of(
    st.builds(
        lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
        st.integers(0, 2**128 - 1),
        st.integers(0, 128),
    ),
)


@given(
    key=st.text(max_size=20),
    fp=st.one_of(st.none(), st.binary(min_size=32, max_size=32), st.sampled_from([FP_A, FP_B])),
    gw=st.sampled_from(["169.254.0.1", "169.254.0.2", "169.254.0.3", "169.254.0.9", "2001:db8::1"]),
    nets=st.lists(_nets, max_size=4),
    shared=st.sampled_from([None, "shared"]),
)
def test_authorize_is_total_and_never_grants_a_foreign_network(key, fp, gw, nets, shared) -> None:
    auth = table(shared)
    d = auth.authorize(key, fp, A(gw), nets)
    if not d.ok:
        return
    grant = auth.grants.get(A(gw))
    for net in nets:
        if grant is not None:
            assert grant.covers(net)
        else:
            assert auth.owner_of(net) is None

"""Longest-prefix match: agreement with a brute-force reference, claimant stacking, families."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from hypothesis import given
from hypothesis import strategies as st

from polevpn.packet.routing import NetworkSet, RouteTable, announcement_error

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Reference:
    """The table's contract, written the slow and obvious way."""

    def __init__(self) -> None:
        self.claims: dict[IPNetwork, list[str]] = {}

    def add(self, net: IPNetwork, owner: str) -> None:
        claim = self.claims.setdefault(net, [])
        if owner in claim:
            claim.remove(owner)
        claim.append(owner)

    def add_fallback(self, net: IPNetwork, owner: str) -> None:
        claim = self.claims.setdefault(net, [])
        if owner in claim:
            claim.remove(owner)
        claim.insert(0, owner)

    def remove(self, net: IPNetwork, owner: str) -> bool:
        claim = self.claims.get(net)
        if not claim or owner not in claim:
            return False
        claim.remove(owner)
        if not claim:
            del self.claims[net]
        return True

    def lookup(self, addr: IPv4Address | IPv6Address) -> str | None:
        best: IPNetwork | None = None
        for net in self.claims:
            inside = net.version == addr.version and addr in net
            if inside and (best is None or net.prefixlen > best.prefixlen):
                best = net
        return None if best is None else self.claims[best][-1]


# Addresses drawn from a small neighbourhood so that prefixes overlap and nest often.
v4_addrs = st.integers(0, 0xFF).map(lambda b: IPv4Address(0xC6120000 | (b << 8) | b))
v4_addrs = v4_addrs | st.integers(0, 2**32 - 1).map(IPv4Address)
v6_addrs = st.integers(0, 0xFF).map(lambda b: IPv6Address((0x20010DB8 << 96) | (b << 80) | b))
v6_addrs = v6_addrs | st.integers(0, 2**128 - 1).map(IPv6Address)


def _net(addr: IPv4Address | IPv6Address, plen: int) -> IPNetwork:
    return ip_network((addr, plen), strict=False)


v4_nets = st.builds(_net, v4_addrs, st.integers(0, 32))
v6_nets = st.builds(_net, v6_addrs, st.integers(0, 128))
nets = v4_nets | v6_nets
owners = st.sampled_from(["gw-a", "gw-b", "gw-c", "gw-d"])
addrs = v4_addrs | v6_addrs


def probe_addresses(ref: Reference, extra: list) -> list:
    """Random addresses plus the edges of every prefix, where off-by-one masks show."""
    out = list(extra)
    for net in ref.claims:
        out += [net.network_address, net.broadcast_address]
        if net.prefixlen > 0:
            # just outside the prefix on either side
            out.append(ip_address((int(net.network_address) - 1) % (1 << net.max_prefixlen)))
            out.append(ip_address((int(net.broadcast_address) + 1) % (1 << net.max_prefixlen)))
    return out


def check_agrees(table: RouteTable[str], ref: Reference, probes: list) -> None:
    for addr in probe_addresses(ref, probes):
        want = ref.lookup(addr)
        assert table.lookup(addr) == want, addr
        if addr.version == 4:
            assert table.lookup_v4(int(addr)) == want
        else:
            assert table.lookup_v6(int(addr)) == want
    assert len(table) == len(ref.claims)
    assert sorted(table.routes(), key=str) == sorted(
        ((n, c[-1]) for n, c in ref.claims.items()), key=str
    )


@given(st.lists(st.tuples(nets, owners), max_size=30), st.lists(addrs, max_size=30))
def test_lpm_matches_brute_force(routes: list, probes: list) -> None:
    table: RouteTable[str] = RouteTable()
    ref = Reference()
    for net, owner in routes:
        table.add(net, owner)
        ref.add(net, owner)
    check_agrees(table, ref, probes)


@given(
    st.lists(nets, min_size=1, max_size=6, unique=True),
    st.lists(st.tuples(st.booleans(), st.integers(0, 5), owners), max_size=40),
    st.lists(addrs, max_size=10),
)
def test_adds_and_removes_match_brute_force(pool: list, ops: list, probes: list) -> None:
    # a small pool of prefixes, so the same prefix is claimed, re-claimed and withdrawn often
    table: RouteTable[str] = RouteTable()
    ref = Reference()
    for is_add, index, owner in ops:
        net = pool[index % len(pool)]
        if is_add:
            table.add(net, owner)
            ref.add(net, owner)
        else:
            assert table.remove(net, owner) == ref.remove(net, owner)
        check_agrees(table, ref, probes)


@given(
    st.lists(nets, min_size=1, max_size=6, unique=True),
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5), owners), max_size=40),
    st.lists(addrs, max_size=10),
)
def test_fallback_claims_match_brute_force(pool: list, ops: list, probes: list) -> None:
    """Claims, fallback claims (below every other) and withdrawals, in any order."""
    table: RouteTable[str] = RouteTable()
    ref = Reference()
    for op, index, owner in ops:
        net = pool[index % len(pool)]
        if op == 0:
            table.add(net, owner)
            ref.add(net, owner)
        elif op == 1:
            table.add_fallback(net, owner)
            ref.add_fallback(net, owner)
        else:
            assert table.remove(net, owner) == ref.remove(net, owner)
        check_agrees(table, ref, probes)


def test_a_fallback_claim_is_active_only_while_nobody_else_claims() -> None:
    table: RouteTable[str] = RouteTable()
    net = ip_network("198.18.10.0/24")
    addr = ip_address("198.18.10.7")
    table.add_fallback(net, "remote")
    assert table.lookup(addr) == "remote"
    table.add(net, "local")
    assert table.lookup(addr) == "local"
    # a fallback claim made later still stays below
    table.add_fallback(net, "remote-2")
    assert table.lookup(addr) == "local"
    table.remove(net, "local")
    assert table.lookup(addr) == "remote"
    # a longer prefix wins whoever claims the shorter one
    table.add(ip_network("198.18.0.0/16"), "wide-local")
    assert table.lookup(addr) == "remote"
    assert table.lookup(ip_address("198.18.11.1")) == "wide-local"


def test_longest_prefix_wins() -> None:
    table: RouteTable[str] = RouteTable()
    table.add(ip_network("198.18.0.0/15"), "wide")
    table.add(ip_network("198.19.0.0/16"), "mid")
    table.add(ip_network("198.19.2.0/24"), "narrow")
    table.add(ip_network("198.19.2.3/32"), "host")
    assert table.lookup(ip_address("198.19.2.3")) == "host"
    assert table.lookup(ip_address("198.19.2.4")) == "narrow"
    assert table.lookup(ip_address("198.19.3.4")) == "mid"
    assert table.lookup(ip_address("198.18.2.0")) == "wide"
    assert table.lookup(ip_address("11.0.0.0")) is None
    assert table.lookup(ip_address("9.255.255.255")) is None


def test_removal_restores_earlier_claimant() -> None:
    table: RouteTable[str] = RouteTable()
    net = ip_network("198.18.10.0/24")
    addr = ip_address("198.18.10.7")
    table.add(net, "first")
    table.add(net, "second")
    table.add(net, "third")
    assert table.lookup(addr) == "third"
    assert table.remove(net, "third")
    assert table.lookup(addr) == "second"
    # removing a non-active claimant leaves the active one in place
    assert table.remove(net, "first")
    assert table.lookup(addr) == "second"
    assert table.remove(net, "second")
    assert table.lookup(addr) is None
    assert len(table) == 0
    assert not table.remove(net, "second")


def test_reclaim_moves_owner_to_top() -> None:
    table: RouteTable[str] = RouteTable()
    net = ip_network("2001:db8:10::/64")
    table.add(net, "a")
    table.add(net, "b")
    table.add(net, "a")
    assert table.lookup(ip_address("2001:db8:10::5")) == "a"
    table.remove(net, "a")
    assert table.lookup(ip_address("2001:db8:10::5")) == "b"
    assert len(table) == 1


def test_remove_unknown_returns_false() -> None:
    table: RouteTable[str] = RouteTable()
    table.add(ip_network("198.18.0.0/15"), "a")
    assert not table.remove(ip_network("198.18.0.0/15"), "b")
    assert not table.remove(ip_network("198.18.0.0/16"), "a")
    assert not table.remove(ip_network("::/0"), "a")
    assert table.lookup(ip_address("198.18.9.9")) == "a"


def test_removing_last_of_a_length_keeps_other_lengths() -> None:
    table: RouteTable[str] = RouteTable()
    table.add(ip_network("198.18.0.0/15"), "wide")
    table.add(ip_network("198.19.0.0/16"), "narrow")
    table.remove(ip_network("198.19.0.0/16"), "narrow")
    assert table.lookup(ip_address("198.19.0.1")) == "wide"
    table.add(ip_network("198.19.0.0/16"), "again")
    assert table.lookup(ip_address("198.19.0.1")) == "again"


def test_default_routes() -> None:
    table: RouteTable[str] = RouteTable()
    table.add(ip_network("0.0.0.0/0"), "v4-default")
    table.add(ip_network("::/0"), "v6-default")
    table.add(ip_network("198.18.0.0/15"), "v4-specific")
    assert table.lookup(ip_address("0.0.0.0")) == "v4-default"
    assert table.lookup(ip_address("255.255.255.255")) == "v4-default"
    assert table.lookup(ip_address("198.19.1.1")) == "v4-specific"
    assert table.lookup(ip_address("::")) == "v6-default"
    assert table.lookup(ip_address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")) == "v6-default"
    assert table.lookup_v4(0xC6120001) == "v4-specific"
    assert table.lookup_v6(1) == "v6-default"
    table.remove(ip_network("0.0.0.0/0"), "v4-default")
    assert table.lookup(ip_address("8.8.8.8")) is None
    assert table.lookup(ip_address("2001:4860::8888")) == "v6-default"


def test_v4_and_v6_are_independent() -> None:
    table: RouteTable[str] = RouteTable()
    # the same integer value in both families must not collide
    table.add(ip_network("198.18.0.0/15"), "v4")
    assert table.lookup_v6(0xC6120001) is None
    assert table.lookup(ip_address("::c612:1")) is None
    table.add(ip_network("::/96"), "v6")
    assert table.lookup_v4(0xC6120001) == "v4"
    assert table.lookup_v6(0xC6120001) == "v6"
    assert table.lookup(ip_address("1.2.3.4")) is None
    table.add(ip_network("0.0.0.0/0"), "v4-default")
    assert table.lookup(ip_address("2001:db8::1")) is None
    table.remove(ip_network("::/96"), "v6")
    assert table.lookup_v4(0xC6120001) == "v4"
    assert table.lookup_v6(0xC6120001) is None


def test_ipv4_mapped_ipv6_is_not_ipv4() -> None:
    table: RouteTable[str] = RouteTable()
    table.add(ip_network("0.0.0.0/0"), "v4")
    assert table.lookup(ip_address("::ffff:198.18.0.1")) is None


def test_routes_and_len() -> None:
    table: RouteTable[str] = RouteTable()
    assert len(table) == 0
    assert table.routes() == []
    table.add(ip_network("198.18.0.0/15"), "a")
    table.add(ip_network("198.18.0.0/15"), "b")
    table.add(ip_network("2001:db8::/32"), "c")
    assert len(table) == 2
    assert sorted(table.routes(), key=str) == sorted(
        [(ip_network("198.18.0.0/15"), "b"), (ip_network("2001:db8::/32"), "c")], key=str
    )


# ---- NetworkSet -------------------------------------------------------------------------


def test_network_set_membership() -> None:
    acl = NetworkSet(
        [ip_network("198.18.20.0/24"), ip_network("169.254.0.0/16"), ip_network("2001:db8:20::/64")]
    )
    assert ip_address("198.18.20.1") in acl
    assert ip_address("198.18.20.255") in acl
    assert ip_address("169.254.7.7") in acl
    assert ip_address("198.18.21.0") not in acl
    assert ip_address("198.18.19.255") not in acl
    assert ip_address("2001:db8:20::1") in acl
    assert ip_address("2001:db8:21::1") not in acl
    assert acl.contains_v4(int(ip_address("198.18.20.9")))
    assert not acl.contains_v4(int(ip_address("198.18.0.1")))
    assert acl.contains_v6(int(ip_address("2001:db8:20::ffff")))
    assert not acl.contains_v6(int(ip_address("2001:db8:20:1::")))
    assert len(acl.networks) == 3


def test_empty_network_set_contains_nothing() -> None:
    acl = NetworkSet([])
    assert ip_address("0.0.0.0") not in acl
    assert ip_address("::") not in acl
    assert not acl.contains_v4(0)
    assert not acl.contains_v6(0)


def test_network_set_defaults_and_duplicates() -> None:
    acl = NetworkSet((ip_network("0.0.0.0/0"), ip_network("0.0.0.0/0")))
    assert ip_address("198.18.5.5") in acl
    assert ip_address("2001:db8::1") not in acl


@given(st.lists(nets, max_size=15), st.lists(addrs, max_size=20))
def test_network_set_matches_brute_force(networks: list, probes: list) -> None:
    acl = NetworkSet(networks)
    ref = Reference()
    for n in networks:
        ref.add(n, "x")
    for addr in probe_addresses(ref, probes):
        want = any(addr.version == n.version and addr in n for n in networks)
        assert (addr in acl) == want
        if addr.version == 4:
            assert acl.contains_v4(int(addr)) == want
        else:
            assert acl.contains_v6(int(addr)) == want


def test_announcement_error_bounds_networks_and_prefix_lengths() -> None:
    """Issue 20 finding 12: one REGISTER with 118 distinct IPv6 prefix lengths doubled the
    per-packet lookup cost for everyone."""
    host = ip_network("169.254.0.1/32")
    many = [ip_network(f"2001:db8:{i:x}::/{i + 8}", strict=False) for i in range(24, 119)]
    assert announcement_error([host, *many], 256, 16) == (
        "95 distinct IPv6 prefix lengths (at most 16)"
    )
    # 16 per family, the host prefix counted among the v4 ones
    v4 = [ip_network(f"198.18.0.0/{n}") for n in range(16, 31)]
    v6 = [ip_network(f"2001:db8::/{n}") for n in range(33, 49)]
    assert announcement_error([host, *v4, *v6], 256, 16) is None
    assert announcement_error([host, *v4, ip_network("198.18.0.0/31"), *v6], 256, 16) == (
        "17 distinct IPv4 prefix lengths (at most 16)"
    )
    # networks: the host prefix is not one of them
    nets = [ip_network(f"198.18.{i}.0/24") for i in range(256)]
    assert announcement_error([host, *nets], 256, 16) is None
    assert announcement_error([host, *nets, ip_network("198.19.0.0/24")], 256, 16) == (
        "257 networks (at most 256)"
    )

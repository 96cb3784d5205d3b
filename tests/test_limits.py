"""Admission control: pending caps per source and in total, and the AUTH failure limit."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polevpn.router.limits import (
    HTTP_REFUSED_FULL,
    HTTP_REFUSED_SOURCE,
    REFUSED_RATE,
    REFUSED_SOURCE,
    REFUSED_TOTAL,
    Admission,
    ClientLimits,
    ClientSlots,
    ClientVerdict,
    LimitParams,
    prefixes,
    source_key,
)


@pytest.mark.parametrize(
    "host,key",
    [
        ("198.18.0.7", "198.18.0.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9%eth0", "2001:db8:1:2::/64"),
        ("::ffff:198.18.0.7", "198.18.0.7"),
        ("not an address", "not an address"),
    ],
)
def test_source_key(host: str, key: str) -> None:
    assert source_key(host) == key


def test_per_source_and_total_caps() -> None:
    adm = Admission(LimitParams(max_pending=4, max_pending_per_source=2, reserved_share_known=0))
    assert adm.admit("a", 0) is None
    assert adm.admit("a", 0) is None
    assert adm.admit("a", 0) == REFUSED_SOURCE
    assert adm.admit("b", 0) is None
    assert adm.admit("c", 0) is None
    assert adm.admit("d", 0) == REFUSED_TOTAL
    assert adm.pending == 4
    adm.release("a")
    assert adm.admit("d", 0) is None
    assert adm.stats.refused_pending == 1
    assert adm.stats.refused_pending_per_source == 1
    for s in ("a", "b", "c", "d"):
        adm.release(s)
    assert adm.pending == 0 and adm.by_source == {}
    # releasing what was never admitted changes nothing
    adm.release("zzz")
    assert adm.pending == 0


def test_auth_failures_block_a_source_for_the_window() -> None:
    adm = Admission(LimitParams(auth_failures=3, auth_failure_window=10))
    assert not adm.failure("a", 0)
    assert not adm.failure("a", 1)
    assert adm.failure("a", 2)  # the third one blocks
    assert adm.admit("a", 3) == REFUSED_RATE
    assert adm.admit("b", 3) is None
    # the first failure ages out at t=10: two left in the window, below the limit
    assert adm.admit("a", 10.5) is None
    assert adm.stats.refused_rate_limited == 1
    # and once all have aged out the source is forgotten
    assert not adm.blocked("a", 100)
    assert "a" not in adm.failures


def test_failure_table_is_bounded() -> None:
    adm = Admission(LimitParams(auth_failures=2, max_tracked_sources=100))
    for i in range(10_000):
        adm.failure(f"s{i}", 0)
    assert len(adm.failures) == 100
    # the newest are the ones kept
    assert "s9999" in adm.failures and "s0" not in adm.failures


@given(
    st.lists(
        st.tuples(st.sampled_from(["admit", "release", "fail", "auth"]), st.integers(0, 5)),
        max_size=200,
    )
)
def test_counts_stay_consistent(ops) -> None:
    p = LimitParams(
        max_pending=5,
        max_pending_per_source=3,
        auth_failures=2,
        max_pending_share_per_net=0.8,
        reserved_share_known=0.4,
    )
    adm = Admission(p)
    held: dict[str, int] = {}
    t = 0.0
    sources = ["198.18.0.1", "198.18.0.2", "198.18.1.1", "2001:db8::/64", "2001:db8:0:1::/64", "x"]
    for op, n in ops:
        src = sources[n]
        t += 1
        if op == "admit":
            if adm.admit(src, t) is None:
                held[src] = held.get(src, 0) + 1
        elif op == "release":
            adm.release(src)
            if held.get(src):
                held[src] -= 1
        elif op == "auth":
            adm.authenticated(src, t)
        else:
            adm.failure(src, t)
        assert adm.pending == sum(held.values()) <= 5
        assert adm.strangers == sum(adm.stranger_slots.values()) <= p.shared() == 3
        assert all(v <= 3 for v in adm.by_source.values())
        assert all(v <= p.net_cap() for v in adm.by_prefix.values())
        assert all(adm.stranger_slots[s] <= adm.by_source[s] for s in adm.stranger_slots)
        assert {k: v for k, v in held.items() if v} == adm.by_source
    for src, n in held.items():
        for _ in range(n):
            adm.release(src)
    assert adm.pending == adm.strangers == 0
    assert adm.by_prefix == {} and adm.stranger_slots == {}


# -- fairness between networks, and the known gateways' reserve


def _v6(i: int, base: int = 0x20010DB8_0000_0020) -> str:
    """The source_key of the ``i``-th /64 after 2001:db8:0:20::/64."""
    return source_key(str(ipaddress.IPv6Address(((base + i) << 64) | 1)))


def test_one_ipv6_slash59_no_longer_takes_every_pending_slot() -> None:
    # issue 20 finding 5: 32 /64s x 32 idle connections filled all 1,024 slots
    adm = Admission(LimitParams())
    took = sum(adm.admit(_v6(i), 0) is None for i in range(32) for _ in range(32))
    assert took == LimitParams().net_cap() == 64  # one /56 holds the /59
    assert adm.stats.refused_pending_per_prefix == 32 * 32 - 64
    # strangers elsewhere and a known gateway still get in
    assert adm.admit("198.18.7.7", 0) is None
    assert adm.admit("2001:db8:77::/64", 0) is None
    adm.authenticated(_v6(33), 0)
    assert adm.admit(_v6(33), 1) is None


def test_one_slash48_gets_its_share_spread_over_many_slash56() -> None:
    adm = Admission(LimitParams())
    took = 0
    for i in range(256):  # one /64 in each /56 of 2001:db8:5::/48
        src = f"2001:db8:5:{i:02x}00::/64"
        took += sum(adm.admit(src, 0) is None for _ in range(32))
    assert took == LimitParams().site_cap() == 128
    assert adm.admit("2001:db8:6::/64", 0) is None


def test_ipv4_slash24_share() -> None:
    adm = Admission(LimitParams(max_pending=100, max_pending_per_source=5))
    cap = LimitParams(max_pending=100).net_cap()
    assert cap == 7
    took = sum(adm.admit(f"198.18.3.{i}", 0) is None for i in range(10) for _ in range(5))
    assert took == cap
    assert adm.admit("198.18.4.1", 0) is None


def test_strangers_cannot_take_the_known_gateways_share() -> None:
    p = LimitParams(max_pending=16, max_pending_per_source=1, reserved_share_known=0.25)
    adm = Admission(p)
    strangers = [f"198.18.{i}.1" for i in range(20)]
    took = [s for s in strangers if adm.admit(s, 0) is None]
    assert len(took) == p.shared() == 12
    assert adm.admit("198.18.100.1", 0) == REFUSED_TOTAL
    # four known gateways get the rest, then nobody does
    for i in range(5):
        adm.authenticated(f"198.19.0.{i}", 0)
    assert [adm.admit(f"198.19.0.{i}", 1) for i in range(5)] == [None] * 4 + [REFUSED_TOTAL]
    assert adm.stats.admitted_known == 4
    # a known one that registers frees a known slot; a stranger's release a shared one
    adm.release("198.19.0.0")
    adm.release(took[0])
    assert adm.admit("198.18.100.1", 2) is None
    assert adm.admit("198.19.0.4", 2) is None
    # knowledge ages out
    assert not adm.is_known("198.19.0.1", 1 + p.known_source_ttl + 1)


def test_a_source_that_authenticates_while_pending_releases_cleanly() -> None:
    adm = Admission(LimitParams())
    assert adm.admit("2001:db8:1:2::/64", 0) is None
    adm.authenticated("2001:db8:1:2::/64", 1)
    adm.release("2001:db8:1:2::/64")
    assert adm.pending == adm.strangers == 0 and adm.by_prefix == {}


def test_a_revoked_source_is_no_longer_known() -> None:
    """Review finding: a gateway whose credentials a reload revokes keeps no reserved slot."""
    p = LimitParams(max_pending=16, max_pending_per_source=1, reserved_share_known=0.25)
    adm = Admission(p)
    for i in range(12):
        assert adm.admit(f"198.18.{i}.1", 0) is None
    adm.authenticated("198.19.0.1", 0)
    adm.forget("198.19.0.1")
    assert not adm.is_known("198.19.0.1", 1)
    assert adm.admit("198.19.0.1", 1) == REFUSED_TOTAL  # a stranger again: the shared part is full


def test_known_table_is_bounded() -> None:
    adm = Admission(LimitParams(max_tracked_sources=10))
    for i in range(100):
        adm.authenticated(f"198.18.0.{i}", 0)
    assert len(adm.known) == 10 and "198.18.0.99" in adm.known


@pytest.mark.parametrize(
    "source,above",
    [
        ("198.18.3.4", (("198.18.3.0/24", False),)),
        ("2001:db8:1:2::/64", (("2001:db8:1::/56", False), ("2001:db8:1::/48", True))),
        ("2001:db8:1:2ff::/64", (("2001:db8:1:200::/56", False), ("2001:db8:1::/48", True))),
        ("x", ()),
    ],
)
def test_prefixes(source, above) -> None:
    assert prefixes(source) == above


# -- HTTP clients


def test_http_slots_per_client_and_the_reserve() -> None:
    slots = ClientSlots(ClientLimits(max_clients=6, per_client=2, reserved=2))
    assert slots.admit(1, "198.18.0.1") == ClientVerdict()
    assert slots.admit(2, "198.18.0.1") == ClientVerdict()
    assert slots.admit(3, "198.18.0.1").refused == HTTP_REFUSED_SOURCE
    # one IPv6 /64 is one client
    assert slots.admit(4, "2001:db8:1:2::1") == ClientVerdict()
    assert slots.admit(5, "2001:db8:1:2::2") == ClientVerdict()
    assert slots.admit(6, "2001:db8:1:2::3").refused == HTTP_REFUSED_SOURCE
    # four remote ones take everything but the reserve
    assert slots.admit(7, "198.18.0.9").refused == HTTP_REFUSED_FULL
    # loopback (IPv4, IPv6, mapped) takes the reserve, then the oldest waiting remote slot
    assert slots.admit(8, "127.0.0.1") == ClientVerdict()
    assert slots.admit(9, "::1") == ClientVerdict()
    assert slots.admit(10, "::ffff:127.0.0.1") == ClientVerdict(None, evict=1)
    assert 1 not in slots.clients and slots.evicted == 1
    # a remote client being served is not evicted; a trusted waiting one is, last
    for cid in (2, 4, 5):
        slots.started(cid)
    assert slots.admit(11, "127.0.0.1") == ClientVerdict(None, evict=8)
    for cid in (9, 10, 11):
        slots.started(cid)
    assert slots.admit(12, "127.0.0.1").refused == HTTP_REFUSED_FULL
    assert slots.refused == 4
    for cid in list(slots.clients):
        slots.release(cid)
    slots.release(2)  # twice: nothing changes
    assert slots.clients == {} and slots.untrusted == 0 and slots.by_source == {}


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "start", "release"]),
            st.integers(0, 30),
            st.sampled_from(["127.0.0.1", "198.18.0.1", "198.18.0.2", "2001:db8::1"]),
        ),
        max_size=200,
    )
)
def test_http_slots_stay_consistent(ops) -> None:
    p = ClientLimits(max_clients=8, per_client=3, reserved=3)
    slots = ClientSlots(p)
    for op, cid, host in ops:
        if op == "admit":
            if cid in slots.clients:
                continue
            v = slots.admit(cid, host)
            if v.refused is None:
                assert cid in slots.clients and v.evict not in slots.clients
        elif op == "start":
            slots.started(cid)
        else:
            slots.release(cid)
        remote = [c for c in slots.clients.values() if not c.trusted]
        assert len(slots.clients) <= p.max_clients
        assert slots.untrusted == len(remote) <= p.max_clients - p.reserved
        assert all(n <= p.per_client for n in slots.by_source.values())
        assert sum(slots.by_source.values()) == len(remote)

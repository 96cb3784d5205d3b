"""The cluster's key layout and ClusterState (polevpn/cluster/keys.py, state.py), sans-IO:
store events in, remote routes and the keys to write out."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polevpn.cluster.keys import (
    Layout,
    Malformed,
    RouteInfo,
    RouteKey,
    RouterInfo,
    RouterKey,
    decode_route,
    decode_router,
    encode_route,
    encode_router,
)
from polevpn.cluster.state import CONNECTED, LOST, ClusterState

L = Layout("/polevpn", "net")
ME = RouterInfo(("198.18.0.1", 443), 1000.0, "0.1.0")
R2 = RouterInfo(("198.18.0.2", 443), 1001.0, "0.1.0")


def net(text: str) -> Any:
    return ipaddress.ip_network(text)


@dataclass(frozen=True)
class Route:
    """The shape of polevpn.cluster.routes.RemoteRoute."""

    router_id: str
    network: Any
    gateway: str
    site: str


class FakeRemoteRoutes:
    """The agreed RemoteRoutes interface, as a plain dict, with a log of calls."""

    def __init__(self) -> None:
        self.by_router: dict[str, dict[Any, Route]] = {}
        self.calls: list[str] = []

    def replace_router(self, router_id: str, routes: Any) -> None:
        self.calls.append(f"replace {router_id}")
        self.by_router[router_id] = {r.network: r for r in routes}

    def add(self, route: Route) -> None:
        self.calls.append(f"add {route.router_id} {route.network}")
        self.by_router.setdefault(route.router_id, {})[route.network] = route

    def remove(self, router_id: str, network: Any) -> bool:
        self.calls.append(f"remove {router_id} {network}")
        return self.by_router.get(router_id, {}).pop(network, None) is not None

    def drop_router(self, router_id: str) -> None:
        self.calls.append(f"drop {router_id}")
        self.by_router.pop(router_id, None)

    def flat(self) -> dict[tuple[str, str], str]:
        return {
            (rid, str(n)): r.gateway
            for rid, nets in self.by_router.items()
            for n, r in nets.items()
        }


def state() -> tuple[ClusterState, FakeRemoteRoutes]:
    sink = FakeRemoteRoutes()
    return ClusterState(L, "r1", ME, sink, Route), sink


def route_kv(rid: str, network: str, gateway: str, lease: int = 7) -> tuple[bytes, bytes, int]:
    return (
        L.route_key(rid, net(network)),
        encode_route(RouteInfo(gateway, gateway)),
        lease,
    )


def router_kv(rid: str, info: RouterInfo = R2, lease: int = 7) -> tuple[bytes, bytes, int]:
    return L.router_key(rid), encode_router(info), lease


# ---- keys ------------------------------------------------------------------------------


def test_layout_round_trip() -> None:
    assert L.root == b"/polevpn/net/"
    assert L.router_key("r1") == b"/polevpn/net/routers/r1"
    assert L.route_key("r1", net("198.18.10.0/24")) == b"/polevpn/net/routes/r1/198.18.10.0/24"
    assert L.parse(b"/polevpn/net/routers/r-2.x") == RouterKey("r-2.x")
    assert L.parse(b"/polevpn/net/routes/r1/2001:db8:10::/64") == RouteKey(
        "r1", net("2001:db8:10::/64")
    )
    assert decode_router(encode_router(ME)) == ME
    assert decode_route(encode_route(RouteInfo("169.254.0.1", "local"))) == RouteInfo(
        "169.254.0.1", "local"
    )
    v6 = RouterInfo(("2001:db8::1", 8443), 5.5)
    assert decode_router(encode_router(v6)) == v6


@pytest.mark.parametrize(
    "key",
    [
        b"/polevpn/other/routers/r1",
        b"/polevpn/net/routers/",
        b"/polevpn/net/routers/a/b",
        b"/polevpn/net/routers/..",
        b"/polevpn/net/routers/" + b"x" * 65,
        b"/polevpn/net/routes/r1",
        b"/polevpn/net/routes/r1/198.18.10.1/24",  # host bits set
        b"/polevpn/net/routes/r1/2001:DB8::/64",  # not canonical
        b"/polevpn/net/routes/r1/nonsense",
        b"/polevpn/net/routes/r 1/198.18.10.0/24",
        b"/polevpn/net/whatever/r1",
        b"/polevpn/net/routers/r\xff",
    ],
)
def test_malformed_keys(key: bytes) -> None:
    with pytest.raises(Malformed):
        L.parse(key)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"not json",
        b"[]",
        b'{"peer_address": "198.18.0.1", "started": 1}',
        b'{"peer_address": "198.18.0.1:0", "started": 1}',
        b'{"peer_address": "198.18.0.1:443", "started": "1"}',
        b'{"peer_address": "198.18.0.1:443", "started": true}',
        b'{"peer_address": "198.18.0.1:443", "started": -1}',
        b'{"peer_address": "198.18.0.1:443", "started": 1e999}',
        b'{"peer_address": "198.18.0.1:443", "started": 1, "version": 5}',
        b'{"peer_address": "a\\nb:443", "started": 1}',
        b"[" * 100000,
        b'{"peer_address": "' + b"a" * 5000 + b':1", "started": 1}',
    ],
)
def test_malformed_router_values(value: bytes) -> None:
    with pytest.raises(Malformed):
        decode_router(value)


@pytest.mark.parametrize(
    "value",
    [
        b"{}",
        b'{"gateway": "169.254.0.1"}',
        b'{"gateway": "nope", "site": "x"}',
        b'{"gateway": 1, "site": "x"}',
        b'{"gateway": "169.254.0.1", "site": ""}',
        b"\xff\xfe",
    ],
)
def test_malformed_route_values(value: bytes) -> None:
    with pytest.raises(Malformed):
        decode_route(value)


# ---- remote routes ---------------------------------------------------------------------


def test_snapshot_applies_other_routers_and_never_our_own() -> None:
    s, sink = state()
    s.snapshot(
        10,
        [
            router_kv("r2"),
            route_kv("r2", "198.18.20.0/24", "169.254.0.2"),
            route_kv("r2", "169.254.0.2/32", "169.254.0.2"),
            router_kv("r1", ME),
            route_kv("r1", "198.18.10.0/24", "169.254.0.1"),
        ],
    )
    assert sink.flat() == {
        ("r2", "198.18.20.0/24"): "169.254.0.2",
        ("r2", "169.254.0.2/32"): "169.254.0.2",
    }
    assert set(s.routers) == {"r2"}
    assert s.routers["r2"].info == R2
    assert s.revision == 10 and s.stats.resyncs == 1
    assert s.routes_count() == 2


def test_watch_events_add_change_and_remove_routes() -> None:
    s, sink = state()
    s.snapshot(10, [router_kv("r2")])
    k, v, _ = route_kv("r2", "198.18.20.0/24", "169.254.0.2")
    s.put(k, v, 11)
    assert sink.flat() == {("r2", "198.18.20.0/24"): "169.254.0.2"}
    # the same event again (a watch resumed one revision early): nothing new
    sink.calls.clear()
    s.put(k, v, 11)
    assert sink.calls == []
    k2, v2, _ = route_kv("r2", "198.18.20.0/24", "169.254.0.9")
    s.put(k2, v2, 12)
    assert sink.flat() == {("r2", "198.18.20.0/24"): "169.254.0.9"}
    s.delete(k, 13)
    assert sink.flat() == {}
    assert set(s.routers) == {"r2"}  # its router key is still there
    s.delete(L.router_key("r2"), 14)
    assert s.routers == {} and sink.calls[-1] == "drop r2"
    assert s.revision == 14


def test_a_router_whose_lease_expired_vanishes_with_its_routes() -> None:
    s, sink = state()
    s.snapshot(
        10,
        [router_kv("r2"), route_kv("r2", "198.18.20.0/24", "169.254.0.2"), router_kv("r3")],
    )
    notified = []
    s.on_routers = lambda: notified.append(set(s.routers))
    # etcd deletes a lease's keys in one revision
    s.delete(L.router_key("r2"), 11)
    s.delete(L.route_key("r2", net("198.18.20.0/24")), 11)
    # (the second delete is at the same revision: it must still apply)
    assert sink.flat() == {}
    assert set(s.routers) == {"r3"}
    assert notified and notified[-1] == {"r3"}


def test_bad_keys_and_values_are_ignored_and_counted() -> None:
    s, sink = state()
    s.snapshot(
        10,
        [
            (b"/polevpn/net/junk", b"x", 0),
            (L.router_key("r2"), b"not json", 0),
            (L.route_key("r2", net("198.18.20.0/24")), b"{}", 0),
            route_kv("r3", "198.18.30.0/24", "169.254.0.3"),
        ],
    )
    assert s.stats.bad_keys == 1 and s.stats.bad_values == 2
    assert sink.flat() == {("r3", "198.18.30.0/24"): "169.254.0.3"}
    assert s.routers["r3"].info is None and s.router_state(s.routers["r3"]) == "incomplete"
    # a route overwritten with garbage: what it said no longer stands
    s.put(L.route_key("r3", net("198.18.30.0/24")), b"\x00", 11)
    assert sink.flat() == {} and s.stats.bad_values == 3
    s.put(b"/polevpn/net/routes/r3/300.1.1.0/24", b"{}", 12)
    assert s.stats.bad_keys == 2


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [b"/polevpn/net/routes/r2/", b"/polevpn/net/routers/", b"/polevpn/net/"]
            ),
            st.binary(max_size=40),
            st.binary(max_size=80) | st.sampled_from([b"{}", b'{"gateway":"169.254.0.1"}']),
            st.booleans(),
        ),
        max_size=30,
    )
)
def test_fuzz_store_events_never_raise(events: list[tuple[bytes, bytes, bytes, bool]]) -> None:
    s, sink = state()
    s.snapshot(1, [(p + k, v, 0) for p, k, v, _ in events[:5]])
    for i, (p, k, v, is_delete) in enumerate(events, start=2):
        if is_delete:
            s.delete(p + k, i)
        else:
            s.put(p + k, v, i)
    # what the sink holds is exactly what the state says the routers hold
    assert sink.flat() == {
        (rid, str(n)): info.gateway for rid, r in s.routers.items() for n, info in r.routes.items()
    }
    assert "r1" not in sink.by_router


# ---- the store lost and back -----------------------------------------------------------


def test_store_lost_keeps_routes_and_a_resync_replaces_them() -> None:
    s, sink = state()
    s.store_up(1.0)
    s.snapshot(
        10,
        [
            router_kv("r2"),
            route_kv("r2", "198.18.20.0/24", "169.254.0.2"),
            router_kv("r3"),
            route_kv("r3", "198.18.30.0/24", "169.254.0.3"),
        ],
    )
    s.store_lost(5.0)
    assert (s.store, s.since, s.stale) == (LOST, 5.0, True)
    assert len(sink.flat()) == 2  # nothing withdrawn: forwarding goes on
    assert s.router_state(s.routers["r2"]) == "stale"
    s.store_lost(6.0)  # still lost: since stays
    assert s.since == 5.0
    s.store_up(9.0)
    assert s.store == CONNECTED
    # meanwhile r3 went and r2 gained a route: the snapshot replaces all
    s.snapshot(
        20,
        [
            router_kv("r2"),
            route_kv("r2", "198.18.20.0/24", "169.254.0.2"),
            route_kv("r2", "198.18.21.0/24", "169.254.0.4"),
        ],
    )
    assert sink.flat() == {
        ("r2", "198.18.20.0/24"): "169.254.0.2",
        ("r2", "198.18.21.0/24"): "169.254.0.4",
    }
    assert "drop r3" in sink.calls
    assert not s.stale and s.router_state(s.routers["r2"]) == "up"
    assert s.stats.resyncs == 2


def test_compaction_asks_for_a_resync_and_keeps_what_is_known() -> None:
    s, sink = state()
    s.snapshot(10, [router_kv("r2"), route_kv("r2", "198.18.20.0/24", "169.254.0.2")])
    s.compacted()
    assert s.needs_resync and len(sink.flat()) == 1
    s.snapshot(30, [router_kv("r2"), route_kv("r2", "198.18.20.0/24", "169.254.0.2")])
    assert not s.needs_resync and s.revision == 30
    # an event older than the snapshot is not applied again
    s.delete(L.route_key("r2", net("198.18.20.0/24")), 25)
    assert len(sink.flat()) == 1


# ---- this router's keys ----------------------------------------------------------------


def test_pending_writes_our_keys_and_confirm_settles_them() -> None:
    s, _ = state()
    s.lease_granted(7)
    s.set_gateway("169.254.0.1", "169.254.0.1", [net("169.254.0.1/32"), net("198.18.10.0/24")])
    puts, deletes = s.pending()
    assert set(puts) == {
        L.router_key("r1"),
        L.route_key("r1", net("169.254.0.1/32")),
        L.route_key("r1", net("198.18.10.0/24")),
    }
    assert json.loads(puts[L.route_key("r1", net("198.18.10.0/24"))]) == {
        "gateway": "169.254.0.1",
        "site": "169.254.0.1",
    }
    assert deletes == []
    s.confirm(puts, deletes)
    assert s.pending() == ({}, [])
    # the gateway's last link goes: its keys are deleted, the router key stays
    s.drop_gateway("169.254.0.1")
    puts, deletes = s.pending()
    assert puts == {}
    assert set(deletes) == {
        L.route_key("r1", net("169.254.0.1/32")),
        L.route_key("r1", net("198.18.10.0/24")),
    }
    s.confirm(puts, deletes)
    assert s.pending() == ({}, []) and s.held == 1


def test_a_new_lease_writes_everything_again() -> None:
    s, _ = state()
    s.lease_granted(7)
    s.set_gateway("169.254.0.1", "169.254.0.1", [net("198.18.10.0/24")])
    s.confirm(*s.pending())
    s.lease_granted(8)
    puts, deletes = s.pending()
    assert len(puts) == 2 and deletes == []


def test_our_keys_in_a_snapshot_count_only_under_our_lease() -> None:
    """A restart within the TTL finds its predecessor's keys (another lease): they are
    written again under the new lease, and the ones no longer due are deleted."""
    s, sink = state()
    s.lease_granted(8)
    s.set_gateway("169.254.0.1", "169.254.0.1", [net("198.18.10.0/24")])
    s.snapshot(
        5,
        [
            router_kv("r1", ME, lease=7),
            route_kv("r1", "198.18.10.0/24", "169.254.0.1", lease=7),
            route_kv("r1", "198.18.11.0/24", "169.254.0.1", lease=8),
        ],
    )
    puts, deletes = s.pending()
    assert set(puts) == {L.router_key("r1"), L.route_key("r1", net("198.18.10.0/24"))}
    assert deletes == [L.route_key("r1", net("198.18.11.0/24"))]
    assert sink.flat() == {}


def test_our_key_deleted_from_outside_is_written_again() -> None:
    s, _ = state()
    s.lease_granted(7)
    s.set_gateway("169.254.0.1", "169.254.0.1", [net("198.18.10.0/24")])
    s.confirm(*s.pending())
    key = L.route_key("r1", net("198.18.10.0/24"))
    assert not s.dirty
    s.delete(key, 3)
    assert s.dirty  # the store adapter writes it again without waiting for a change
    assert list(s.pending()[0]) == [key]
    assert not s.dirty
    # written by another process with our id: counted, and ours is due again
    s.confirm(*s.pending())
    s.put(key, b'{"gateway":"169.254.0.9","site":"x"}', 4, lease=99)
    assert s.stats.foreign_writes == 1
    assert list(s.pending()[0]) == [key]


def test_two_local_gateways_on_one_network_the_later_holds_it() -> None:
    """As in the router's table: the later registration is in force, and the earlier
    takes over again when the later leaves."""
    s, _ = state()
    s.set_gateway("169.254.0.1", "169.254.0.1", [net("198.18.10.0/24")])
    s.set_gateway("169.254.0.2", "169.254.0.2", [net("198.18.10.0/24")])
    assert s.local_routes()[net("198.18.10.0/24")].gateway == "169.254.0.2"
    s.drop_gateway("169.254.0.2")
    assert s.local_routes()[net("198.18.10.0/24")].gateway == "169.254.0.1"
    # a second REGISTER of the same gateway replaces what it announced
    s.set_gateway("169.254.0.1", "169.254.0.1", [net("198.18.11.0/24")])
    assert list(s.local_routes()) == [net("198.18.11.0/24")]


def test_peer_address_change_rewrites_the_router_key() -> None:
    s, _ = state()
    s.lease_granted(7)
    s.confirm(*s.pending())
    s.set_me(RouterInfo(("198.18.0.9", 443), ME.started, ME.version))
    puts, _ = s.pending()
    assert json.loads(puts[L.router_key("r1")])["peer_address"] == "198.18.0.9:443"


# ---- authority -------------------------------------------------------------------------


def test_conflict_refuses_a_network_another_router_holds_for_another_gateway() -> None:
    s, _ = state()
    s.snapshot(
        10,
        [
            route_kv("r2", "198.18.20.0/24", "169.254.0.2"),
            route_kv("r2", "169.254.0.2/32", "169.254.0.2"),
            route_kv("r3", "2001:db8:30::/48", "169.254.0.3"),
        ],
    )
    # the same gateway at two routers: one office with two links
    assert s.conflict("169.254.0.2", [net("198.18.20.0/24")]) is None
    assert s.conflict("169.254.0.9", [net("198.18.21.0/24"), net("2001:db8:31::/48")]) is None
    why = s.conflict("169.254.0.9", [net("198.18.21.0/24"), net("198.18.20.0/24")])
    assert why == (
        "198.18.20.0/24 overlaps 198.18.20.0/24, held by router r2 for gateway 169.254.0.2"
    )
    # within it, around it, and IPv6
    assert "198.18.20.0/24" in (s.conflict("169.254.0.9", [net("198.18.20.128/25")]) or "")
    assert "198.18.20.0/24" in (s.conflict("169.254.0.9", [net("198.18.0.0/16")]) or "")
    assert "r3" in (s.conflict("169.254.0.9", [net("2001:db8:30:5::/64")]) or "")
    assert "r3" in (s.conflict("169.254.0.9", [net("2001:db8::/32")]) or "")
    # a gateway address taken by another gateway elsewhere
    assert "169.254.0.2/32" in (s.conflict("169.254.0.9", [net("169.254.0.0/16")]) or "")
    assert s.stats.conflicts == 6
    # gone from the store: allowed again
    s.delete(L.route_key("r2", net("198.18.20.0/24")), 11)
    assert s.conflict("169.254.0.9", [net("198.18.20.0/24")]) is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 255), st.integers(16, 32)), max_size=20),
    st.tuples(st.integers(0, 255), st.integers(8, 32)),
    st.lists(st.integers(0, 19), max_size=10),
)
def test_conflict_matches_a_scan(
    remote: list[tuple[int, int]], mine: tuple[int, int], deleted: list[int]
) -> None:
    """The indexed overlap check finds exactly what a scan over every remote route finds,
    also after deletes."""
    s, _ = state()
    nets = [ipaddress.ip_network((0xC6120000 | (o << 8), p), strict=False) for o, p in remote]
    s.snapshot(1, [route_kv(f"r{i % 3 + 2}", str(n), "169.254.0.2") for i, n in enumerate(nets)])
    rev = 2
    for i in deleted:
        if i < len(nets):
            s.delete(L.route_key(f"r{i % 3 + 2}", nets[i]), rev)
            rev += 1
    left = [n for r in s.routers.values() for n in r.routes]
    o, p = mine
    asked = ipaddress.ip_network((0xC6120000 | (o << 8), p), strict=False)
    expect = any(asked.overlaps(n) for n in left)
    assert (s.conflict("169.254.0.9", [asked]) is not None) == expect

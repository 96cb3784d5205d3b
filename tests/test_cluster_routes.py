"""The remote route table (polevpn.cluster.routes): what the store says, the choice among
routers that announce the same network, and what it installs in the router's table."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from hypothesis import given, settings
from hypothesis import strategies as st

from polevpn.cluster.routes import RemoteRoute, RemoteRoutes
from polevpn.packet.routing import RouteTable


class Hop:
    """A link to a router, as the table sees it: an opaque object."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<hop {self.name}>"


def route(router: str, net: str, gateway: str = "169.254.0.1", site: str = "s") -> RemoteRoute:
    return RemoteRoute(router, ip_network(net), gateway, site)


def test_add_remove_replace_drop_and_counts() -> None:
    rr: RemoteRoutes[Hop] = RemoteRoutes()
    rr.add(route("r2", "198.18.2.0/24"))
    rr.add(route("r2", "198.18.22.0/24"))
    rr.add(route("r3", "2001:db8:3::/48"))
    assert len(rr) == 3
    assert rr.routers() == {"r2", "r3"}
    assert rr.lookup(ip_address("198.18.2.9")) == route("r2", "198.18.2.0/24")
    assert rr.lookup(ip_address("2001:db8:3::1")) == route("r3", "2001:db8:3::/48")
    assert rr.lookup(ip_address("198.18.3.1")) is None
    # the same route again changes nothing; a changed one replaces it
    rr.add(route("r2", "198.18.2.0/24"))
    rr.add(route("r2", "198.18.2.0/24", gateway="169.254.0.9"))
    assert len(rr) == 3
    assert rr.lookup(ip_address("198.18.2.9")).gateway == "169.254.0.9"  # type: ignore[union-attr]
    assert rr.remove("r2", ip_network("198.18.22.0/24"))
    assert not rr.remove("r2", ip_network("198.18.22.0/24"))
    assert not rr.remove("r9", ip_network("198.18.2.0/24"))
    assert rr.lookup(ip_address("198.18.22.1")) is None
    # a resync: what is not listed goes, what is listed stays or comes
    rr.replace_router("r2", [route("r2", "198.18.5.0/24"), route("r2", "198.18.6.0/24")])
    assert [r.network for r in rr.routes() if r.router_id == "r2"] == [
        ip_network("198.18.5.0/24"),
        ip_network("198.18.6.0/24"),
    ]
    assert rr.lookup(ip_address("198.18.2.9")) is None
    rr.drop_router("r2")
    assert rr.routers() == {"r3"}
    assert len(rr) == 1
    rr.drop_router("r3")
    rr.drop_router("never-there")
    assert len(rr) == 0 and rr.routers() == set()
    assert rr.routes() == []


def test_own_routes_are_ignored() -> None:
    rr: RemoteRoutes[Hop] = RemoteRoutes(self_id="r1")
    rr.add(route("r1", "198.18.1.0/24"))
    rr.replace_router("r1", [route("r1", "198.18.1.0/24")])
    assert len(rr) == 0
    assert rr.lookup(ip_address("198.18.1.1")) is None


def test_only_routes_with_a_live_link_reach_the_data_path() -> None:
    table: RouteTable[object] = RouteTable()
    rr: RemoteRoutes[Hop] = RemoteRoutes(table)
    h2 = Hop("r2")
    rr.add(route("r2", "198.18.2.0/24"))
    # known, but no link to r2 yet: nothing to forward it to
    assert table.lookup(ip_address("198.18.2.1")) is None
    assert rr.active(ip_network("198.18.2.0/24")) is None
    rr.set_hop("r2", h2)
    assert table.lookup(ip_address("198.18.2.1")) is h2
    assert rr.active(ip_network("198.18.2.0/24")) == route("r2", "198.18.2.0/24")
    # routes learnt while the link is up go straight in
    rr.add(route("r2", "2001:db8:2::/48"))
    assert table.lookup(ip_address("2001:db8:2::1")) is h2
    # a new link (r2 reconnected) takes over every route
    h2b = Hop("r2-again")
    rr.set_hop("r2", h2b)
    assert table.lookup(ip_address("198.18.2.1")) is h2b
    assert table.lookup(ip_address("2001:db8:2::1")) is h2b
    assert len(table) == 2
    rr.set_hop("r2", None)
    assert table.lookup(ip_address("198.18.2.1")) is None
    assert len(table) == 0
    # the route itself is still known
    assert rr.lookup(ip_address("198.18.2.1")) == route("r2", "198.18.2.0/24")
    rr.set_hop("r2", h2)
    rr.drop_router("r2")
    assert len(table) == 0


def test_local_routes_outrank_remote_ones_of_the_same_prefix_not_longer_ones() -> None:
    table: RouteTable[object] = RouteTable()
    rr: RemoteRoutes[Hop] = RemoteRoutes(table)
    h2 = Hop("r2")
    rr.set_hop("r2", h2)
    table.add(ip_network("198.18.0.0/16"), "local-wide")
    table.add(ip_network("198.18.7.0/24"), "local-gw")
    rr.add(route("r2", "198.18.7.0/24"))
    rr.add(route("r2", "198.18.8.0/24"))
    assert table.lookup(ip_address("198.18.7.1")) == "local-gw"
    assert table.lookup(ip_address("198.18.8.1")) is h2
    assert table.lookup(ip_address("198.18.9.1")) == "local-wide"
    # the local gateway leaves: the other router's route takes over
    table.remove(ip_network("198.18.7.0/24"), "local-gw")
    assert table.lookup(ip_address("198.18.7.1")) is h2
    # and back
    table.add(ip_network("198.18.7.0/24"), "local-gw")
    assert table.lookup(ip_address("198.18.7.1")) == "local-gw"
    # the remote route withdrawn: the local one is untouched
    rr.remove("r2", ip_network("198.18.7.0/24"))
    assert table.lookup(ip_address("198.18.7.1")) == "local-gw"


def test_two_routers_one_network_lowest_live_id_wins() -> None:
    table: RouteTable[object] = RouteTable()
    rr: RemoteRoutes[Hop] = RemoteRoutes(table)
    net = ip_network("198.18.30.0/24")
    addr = ip_address("198.18.30.1")
    h2, h3 = Hop("r2"), Hop("r3")
    rr.add(route("r3", str(net), site="c"))
    rr.add(route("r2", str(net), site="c"))
    assert [r.router_id for r in rr.announcers(net)] == ["r2", "r3"]
    assert len(rr) == 2
    # no link: the record answered is the lowest id's, the data path has none
    assert rr.lookup(addr).router_id == "r2"  # type: ignore[union-attr]
    assert table.lookup(addr) is None
    rr.set_hop("r3", h3)
    assert table.lookup(addr) is h3
    assert rr.lookup(addr).router_id == "r3"  # type: ignore[union-attr]
    rr.set_hop("r2", h2)
    assert table.lookup(addr) is h2
    assert len(table) == 1
    # r2's link goes down: r3 takes it; r2 withdraws the route: still r3
    rr.set_hop("r2", None)
    assert table.lookup(addr) is h3
    rr.set_hop("r2", h2)
    rr.remove("r2", net)
    assert table.lookup(addr) is h3
    rr.drop_router("r3")
    assert table.lookup(addr) is None
    assert rr.lookup(addr) is None


def test_sources_follow_each_routers_announcements() -> None:
    rr: RemoteRoutes[Hop] = RemoteRoutes()
    src2 = rr.sources("r2")
    assert len(src2) == 0
    rr.add(route("r2", "198.18.2.0/24"))
    rr.add(route("r2", "2001:db8:2::/48"))
    rr.add(route("r3", "198.18.3.0/24"))
    # the same object all along: a link holds it for its life
    assert rr.sources("r2") is src2
    assert ip_address("198.18.2.200") in src2
    assert ip_address("2001:db8:2::9") in src2
    assert src2.contains_v4(int(ip_address("198.18.2.1")))
    assert src2.contains_v6(int(ip_address("2001:db8:2::1")))
    assert ip_address("198.18.3.1") not in src2
    assert ip_address("198.18.3.1") in rr.sources("r3")
    # an announcement shared by two routers stays a source of the one that keeps it
    rr.add(route("r3", "198.18.2.0/24"))
    rr.remove("r2", ip_network("198.18.2.0/24"))
    assert ip_address("198.18.2.1") not in src2
    assert ip_address("198.18.2.1") in rr.sources("r3")
    rr.drop_router("r2")
    assert len(src2) == 0


routers = st.sampled_from(["r1", "r2", "r3"])
pool = [ip_network(n) for n in ("198.18.0.0/16", "198.18.1.0/24", "198.18.1.128/25")]
ops = st.one_of(
    st.tuples(st.just("add"), routers, st.integers(0, 2)),
    st.tuples(st.just("add"), routers, st.integers(0, 2)),
    st.tuples(st.just("up"), routers, st.integers(0, 1)),
    st.tuples(st.just("remove"), routers, st.integers(0, 2)),
    st.tuples(st.just("drop"), routers, st.just(0)),
    st.tuples(st.just("up"), routers, st.integers(0, 1)),
    st.tuples(st.just("down"), routers, st.just(0)),
    st.tuples(st.just("local"), st.just(""), st.integers(0, 2)),
    st.tuples(st.just("unlocal"), st.just(""), st.integers(0, 2)),
)
probes = [ip_address(a) for a in ("198.18.1.200", "198.18.1.1", "198.18.9.9", "198.19.0.1")]


@settings(max_examples=300)
@given(st.lists(ops, min_size=4, max_size=40))
def test_the_data_path_matches_a_brute_force_reference(steps: list) -> None:
    """Whatever the order of announcements, withdrawals, link changes and local claims,
    the router's table answers as the rule says: the longest prefix among local networks
    and remote ones with a live link; at equal length local first, then the lowest router
    id with a live link."""
    table: RouteTable[object] = RouteTable()
    rr: RemoteRoutes[Hop] = RemoteRoutes(table)
    hops = {(r, i): Hop(f"{r}.{i}") for r in ("r1", "r2", "r3") for i in (0, 1)}
    announced: dict[str, set] = {"r1": set(), "r2": set(), "r3": set()}
    live: dict[str, Hop] = {}
    local: set = set()
    for op, rid, i in steps:
        if op == "add":
            rr.add(route(rid, str(pool[i])))
            announced[rid].add(pool[i])
        elif op == "remove":
            assert rr.remove(rid, pool[i]) == (pool[i] in announced[rid])
            announced[rid].discard(pool[i])
        elif op == "drop":
            rr.drop_router(rid)
            announced[rid].clear()
        elif op == "up":
            rr.set_hop(rid, hops[rid, i])
            live[rid] = hops[rid, i]
        elif op == "down":
            rr.set_hop(rid, None)
            live.pop(rid, None)
        elif op == "local":
            table.add(pool[i], "local")
            local.add(pool[i])
        else:
            table.remove(pool[i], "local")
            local.discard(pool[i])
        for addr in probes:
            want = None
            for net in sorted(pool, key=lambda n: -n.prefixlen):
                if addr not in net:
                    continue
                if net in local:
                    want = "local"
                    break
                holders = sorted(r for r in live if net in announced[r])
                if holders:
                    want = live[holders[0]]
                    break
            assert table.lookup(addr) == want, (steps, addr)
        assert len(rr) == sum(len(n) for n in announced.values())

"""The dual-uplink topology (issue 8's test bed) and the link helpers, without any daemon.

    gwA wan0 ==== ul-a  router   198.19.0.2 <-> 198.19.0.1               IPv4 only
    gwA wan1 ==== ul-a6 router   2001:db8:ff01::2 <-> 2001:db8:ff01::1   IPv6 only

Checks that each link carries its own family and only that, that link_down / link_up cut
and restore a link (addresses kept), that if_bytes sees pings cross a link and only that
link, that flap() runs its cycles in the background and leaves the link up, that
rate_limit() installs a tbf qdisc (no timing: the machine is shared), and that teardown
leaves no namespace.  Needs root, iproute2, ping and tc.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

try:
    import topology as t
except ImportError:
    from tests import topology as t

_ok, _reason = t.have_netns_support()
for _tool in ("ping", "tc"):
    if _ok and shutil.which(_tool) is None:
        _ok, _reason = False, f"'{_tool}' not found"
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

GW, ROUTER = "gwA", "router"
V4 = (t.GW_A_UL_IF, t.ROUTER_UL_A_IF)  # (gwA side, router side)
V6 = (t.GW_A_UL6_IF, t.ROUTER_UL_A6_IF)


@pytest.fixture(scope="module")
def topo() -> Iterator[t.Topology]:
    topo = t.Topology(dual_uplink=True).setup()
    try:
        yield topo
    finally:
        topo.teardown()
        assert t.leftover_namespaces(topo.prefix) == []


def _addrs(topo: t.Topology, node: str, ifname: str) -> list[tuple[str, str, str]]:
    """(family, address, scope) of every address on the interface."""
    res = topo.run(node, ["ip", "-j", "addr", "show", "dev", ifname])
    return [(a["family"], a["local"], a["scope"]) for a in json.loads(res.stdout)[0]["addr_info"]]


def _reachable(topo: t.Topology, dst: str) -> bool:
    """Two echo replies from gwA (one failed probe gives 1 s of grace: ``-w 3``)."""
    cmd = ["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", "-w", "3", dst]
    return topo.run(GW, cmd, check=False, timeout=15).returncode == 0


def _unreachable(topo: t.Topology, dst: str) -> bool:
    """No reply to a single probe within 1 s (a cut link fails at once or never answers)."""
    cmd = ["ping", "-n", "-q", "-c", "1", "-W", "1", dst]
    return topo.run(GW, cmd, check=False, timeout=15).returncode != 0


def test_each_link_carries_one_family(topo: t.Topology) -> None:
    assert _addrs(topo, GW, V4[0]) == [("inet", t.GW_A_UL, "global")]
    assert _addrs(topo, ROUTER, V4[1]) == [("inet", t.ROUTER_UL_A, "global")]
    for node, ifname, addr in ((GW, V6[0], t.GW_A_UL6), (ROUTER, V6[1], t.ROUTER_UL_A6)):
        found = _addrs(topo, node, ifname)
        assert {f for f, _, _ in found} == {"inet6"}, found  # no IPv4 at all
        assert [a for f, a, s in found if s == "global"] == [addr], found
    assert _reachable(topo, t.ROUTER_UL_A)
    assert _reachable(topo, t.ROUTER_UL_A6)
    # The router's IPv4 address is not reachable over the IPv6 link and vice versa: with the
    # first link down, IPv4 to the router has no way left.
    route6 = topo.run(GW, ["ip", "-6", "route", "get", t.ROUTER_UL_A6]).stdout
    assert f"dev {V6[0]}" in route6, route6
    topo.link_down(GW, V4[0])
    try:
        assert _unreachable(topo, t.ROUTER_UL_A)
        assert _reachable(topo, t.ROUTER_UL_A6)
    finally:
        topo.link_up(GW, V4[0])


def test_tcp_over_the_ipv6_link(topo: t.Topology) -> None:
    # a listener on the router's new address accepts from gwA (nothing filters the link)
    res = topo.transfer(GW, ROUTER, t.ROUTER_UL_A6, 200_000, port=5301, timeout=20)
    assert res["ok"], res


@pytest.mark.parametrize("side", [0, 1], ids=["gw-side", "router-side"])
def test_link_down_and_up(topo: t.Topology, side: int) -> None:
    node = (GW, ROUTER)[side]
    ifname = V6[side]
    topo.link_down(node, ifname)
    try:
        assert _unreachable(topo, t.ROUTER_UL_A6)
        assert _reachable(topo, t.ROUTER_UL_A)  # the other link does not care
    finally:
        topo.link_up(node, ifname)
    # addresses survive the down (keep_addr_on_down), so the link is usable again
    assert topo.wait_ping(GW, t.ROUTER_UL_A6, deadline=10) is not None
    assert t.GW_A_UL6 in [a for _, a, _ in _addrs(topo, GW, V6[0])]


def test_if_bytes_count_only_the_link_used(topo: t.Topology) -> None:
    v4_before = topo.if_bytes(GW, V4[0])
    v6_before = topo.if_bytes(GW, V6[0])
    router_before = topo.if_bytes(ROUTER, V6[1])
    res = topo.run(GW, ["ping", "-6", "-n", "-q", "-c", "10", "-i", "0.01", "-s", "1000",
                        "-W", "2", t.ROUTER_UL_A6], check=False, timeout=20)
    assert res.returncode == 0, res.stdout
    v6_rx, v6_tx = topo.if_bytes(GW, V6[0])
    r_rx, r_tx = topo.if_bytes(ROUTER, V6[1])
    # 10 echo requests of > 1000 bytes out, 10 replies in, on both ends of the link
    assert v6_tx - v6_before[1] >= 10_000 and v6_rx - v6_before[0] >= 10_000
    assert r_rx - router_before[0] >= 10_000 and r_tx - router_before[1] >= 10_000
    # the IPv4 link saw none of it (IPv6 disabled there: no neighbour discovery either)
    v4_rx, v4_tx = topo.if_bytes(GW, V4[0])
    assert v4_rx - v4_before[0] < 1000 and v4_tx - v4_before[1] < 1000


def test_flap_in_background(topo: t.Topology) -> None:
    flapper = topo.flap(GW, V6[0], times=3, down_s=0.3, up_s=0.3, delay=0.1)
    flapper.join()
    assert flapper.done and flapper.cycles == 3
    assert [what for _, what in flapper.events] == ["down", "up"] * 3
    stamps = [when for when, _ in flapper.events]
    assert stamps == sorted(stamps)
    assert topo.wait_ping(GW, t.ROUTER_UL_A6, deadline=10) is not None


def test_flap_is_bounded_and_leaves_link_up(topo: t.Topology) -> None:
    # max_total cuts a long plan short, during a down, and the link still ends up
    flapper = topo.flap(GW, V6[0], times=100, down_s=0.5, up_s=0.1, max_total=1.0)
    flapper.join(timeout=15)
    assert 1 <= flapper.cycles < 100
    assert flapper.events[-1][1] == "up"
    assert flapper.events[-1][0] - flapper.events[0][0] < 5
    link = json.loads(topo.run(GW, ["ip", "-j", "link", "show", "dev", V6[0]]).stdout)[0]
    assert "UP" in link["flags"], link


def test_rate_limit_installs_tbf(topo: t.Topology) -> None:
    ifname = V6[0]
    topo.rate_limit(GW, ifname, 50)
    try:
        out = topo.run(GW, ["tc", "qdisc", "show", "dev", ifname]).stdout
        assert "tbf" in out and "root" in out, out
        (tbf,) = [q for q in topo.qdiscs(GW, ifname) if q["kind"] == "tbf"]
        assert tbf["root"] and tbf["options"]["rate"] == 50_000_000 // 8, tbf
        topo.rate_limit(GW, ifname, 20)  # replaces, does not stack
        kinds = [q["kind"] for q in topo.qdiscs(GW, ifname)]
        assert kinds == ["tbf"], kinds
        assert _reachable(topo, t.ROUTER_UL_A6)  # shaped, not blocked
    finally:
        topo.clear_rate_limit(GW, ifname)
    assert "tbf" not in topo.run(GW, ["tc", "qdisc", "show", "dev", ifname]).stdout


def test_teardown_removes_everything() -> None:
    topo = t.Topology(dual_uplink=True).setup()
    flapper = topo.flap(GW, V6[0], times=50, down_s=0.2, up_s=0.2)
    topo.teardown()  # with a flapper still running
    assert flapper.done
    assert t.leftover_namespaces(topo.prefix) == []

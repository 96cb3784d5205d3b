"""The NAT topology of issue 18 (tests/topology.py ``NatTopology``) proves itself, and the
VPN relays over it as it does today:

    hostA - gwA - natA ==(40 ms)== [inet] ==(40 ms)== router
                        \\==(5 ms)==  [inet]  ==(40 ms)== natB - gwB - hostB

* hosts and gateways reach the router through their NAT, which it sees as the source;
  natA and natB reach each other's public address; private addresses are routed nowhere;
* one UDP socket behind natA keeps one public port towards two destinations under plain
  masquerade (endpoint-independent mapping) and gets one per destination with
  ``fully-random`` (symmetric); two sockets behind the NATs punch through each other's
  NAT in the first case and not when both are symmetric;
* the cut drops UDP between the NATs (nothing else) and restore lets it through again;
* the round trips are the configured delays (router 40 ms each way, NAT to NAT 5 ms);
* the router and both gateways over the NATs, kcp:// and tls://, direct paths off: pings
  and a SHA-256-checked transfer hostA -> hostB relayed, about 160 ms round trip.

One topology for the module (built in about half a second); the VPN runs are started and
stopped inside it.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator

import pytest

try:
    import topology as t
    from test_e2e import keys  # noqa: F401
except ImportError:
    from tests import topology as t
    from tests.test_e2e import keys  # noqa: F401

_ok, _reason = t.daemons_ready()
if _ok and shutil.which("nft") is None:
    _ok, _reason = False, "'nft' (nftables) not found"
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

ROUTER_RTT = 4 * t.NAT_ROUTER_DELAY_MS  # hostA -> router -> hostB and back
NAT_RTT = 2 * t.NAT_PEER_DELAY_MS


@pytest.fixture(scope="module")
def nat(tmp_path_factory) -> Iterator[t.NatTopology]:
    topo = t.NatTopology(log_dir=tmp_path_factory.mktemp("nat") / "logs")
    with t.built(topo):
        yield topo


def _echo(topo: t.Topology, node: str, port: int, seconds: float = 20) -> None:
    """A UDP echo (tests/topology.py UDP_ECHO) in ``node`` on ``port``, listening on return."""
    proc = topo.popen(node, [sys.executable, "-c", t.UDP_ECHO, "0.0.0.0", str(port), "50",
                             str(seconds)], log_name=f"echo-{node}-{port}")
    t.wait_for_log(proc, "ready", timeout=10)


def _ask(topo: t.Topology, node: str, *dests: str) -> dict[str, str | None]:
    """From one new UDP socket in ``node``: the source each echo at ``dests`` saw."""
    res = topo.run(node, [sys.executable, "-c", t.UDP_ASK, *dests], timeout=30)
    return json.loads(res.stdout)


def _port(seen: str | None) -> int:
    assert seen is not None, "the echo did not answer"
    return int(seen.rsplit(":", 1)[1])


# ---------------------------------------------------------------------- reachability
def test_offices_reach_the_router_through_their_nat(nat):
    _echo(nat, "router", 7001)
    for node, public in (("hostA", t.NAT_A_PUB), ("gwA", t.NAT_A_PUB),
                         ("hostB", t.NAT_B_PUB), ("gwB", t.NAT_B_PUB)):
        seen = _ask(nat, node, f"{t.ROUTER_PUB}:7001")[f"{t.ROUTER_PUB}:7001"]
        assert seen is not None and seen.startswith(f"{public}:"), (node, seen)
    # nothing outside an office reaches its private addresses
    for src, dst in (("router", t.GW_A_PRIV), ("natB", t.GW_A_PRIV), ("natA", t.GW_B_PRIV),
                     ("router", t.HOST_B)):
        assert nat.ping(src, dst, count=1, wait=1).returncode != 0, (src, dst)


def test_nats_reach_each_others_public_address(nat):
    for src, dst in (("natA", t.NAT_B_PUB), ("natB", t.NAT_A_PUB), ("gwA", t.NAT_B_PUB),
                     ("gwB", t.NAT_A_PUB)):
        st = nat.ping_stats(src, dst, count=2, interval=0.05, wait=1)
        assert st["received"] == 2, f"{src} -> {dst}:\n{st['stdout']}"


# ----------------------------------------------------------------------------- mapping
def test_masquerade_keeps_one_port_and_fully_random_one_per_destination(nat):
    _echo(nat, "router", 7002)
    _echo(nat, "router", 7003)
    dests = (f"{t.ROUTER_PUB}:7002", f"{t.ROUTER_PUB}:7003")
    seen = _ask(nat, "gwA", *dests)
    assert all(s is not None and s.startswith(f"{t.NAT_A_PUB}:") for s in seen.values()), seen
    assert _port(seen[dests[0]]) == _port(seen[dests[1]]), f"not independent: {seen}"
    try:
        nat.set_nat("A", symmetric=True)
        seen = _ask(nat, "gwA", *dests)
        assert all(s is not None and s.startswith(f"{t.NAT_A_PUB}:") for s in seen.values())
        assert _port(seen[dests[0]]) != _port(seen[dests[1]]), f"not symmetric: {seen}"
    finally:
        nat.set_nat("A", symmetric=False)


def test_two_sockets_punch_through_independent_nats_not_symmetric_ones(nat):
    a, b = t.udp_punch(nat, ("gwA", t.NAT_B_PUB), ("gwB", t.NAT_A_PUB), port=7110)
    assert a["received"] > 0 and b["received"] > 0, (a, b)
    refused = nat.nat_refused("A") + nat.nat_refused("B")
    try:
        nat.set_nat("A", symmetric=True)
        nat.set_nat("B", symmetric=True)
        # new ports (new conntrack entries): each side's datagrams go to a port the other
        # NAT never mapped, and are dropped there as unsolicited
        a, b = t.udp_punch(nat, ("gwA", t.NAT_B_PUB), ("gwB", t.NAT_A_PUB), port=7111)
        assert a["received"] == 0 and b["received"] == 0, (a, b)
        assert nat.nat_refused("A") + nat.nat_refused("B") > refused
    finally:
        nat.set_nat("A", symmetric=False)
        nat.set_nat("B", symmetric=False)


# --------------------------------------------------------------------------------- cut
def test_cut_drops_udp_between_the_nats_only_and_restore_lets_it_through(nat):
    _echo(nat, "router", 7004)
    a, b = t.udp_punch(nat, ("gwA", t.NAT_B_PUB), ("gwB", t.NAT_A_PUB), port=7120)
    assert a["received"] > 0 and b["received"] > 0, (a, b)
    try:
        nat.cut_peer_udp()
        a, b = t.udp_punch(nat, ("gwA", t.NAT_B_PUB), ("gwB", t.NAT_A_PUB), port=7120)
        assert a["received"] == 0 and b["received"] == 0, (a, b)
        assert nat.cut_drops() >= a["sent"] + b["sent"]
        # only UDP between the NATs: ICMP between them and UDP to the router pass
        assert nat.ping("natA", t.NAT_B_PUB, count=1, wait=1).returncode == 0
        assert _ask(nat, "gwA", f"{t.ROUTER_PUB}:7004")[f"{t.ROUTER_PUB}:7004"] is not None
    finally:
        nat.restore_peer_udp()
    assert nat.cut_drops() == 0  # the table is gone
    a, b = t.udp_punch(nat, ("gwA", t.NAT_B_PUB), ("gwB", t.NAT_A_PUB), port=7120)
    assert a["received"] > 0 and b["received"] > 0, (a, b)


# -------------------------------------------------------------------------------- delay
def test_round_trips_match_the_configured_delays(nat):
    for src, dst, rtt in (("hostA", t.ROUTER_PUB, 2 * t.NAT_ROUTER_DELAY_MS),
                          ("hostB", t.ROUTER_PUB, 2 * t.NAT_ROUTER_DELAY_MS),
                          ("natA", t.NAT_B_PUB, NAT_RTT),
                          ("gwB", t.NAT_A_PUB, NAT_RTT)):
        st = nat.ping_stats(src, dst, count=10, interval=0.05)
        assert st["received"] == 10, st["stdout"]
        # never below the delay; a few ms of Python element and scheduling on top
        assert rtt <= st["rtt_min"] and st["rtt_avg"] < rtt + 10, (src, dst, st)


# ----------------------------------------------------------------- relayed baseline
@pytest.mark.parametrize("scheme", ["kcp", "tls"])
def test_vpn_relays_over_the_nats(nat, keys, scheme, tmp_path):  # noqa: F811
    """Today's VPN over the NATs, direct paths off ("direct": false is ignored by a
    gateway without the feature): pings both ways and a SHA-256-checked transfer, each
    packet through the router, about 160 ms round trip."""
    router_cfg = t.nat_router_config(keys)
    server = f"{scheme}://{t.ROUTER_PUB}:443"
    router = t.start_router(nat, t.write_json(tmp_path / "router.json", router_cfg),
                            log_name=f"router-{scheme}")
    gws = []
    try:
        for side in "AB":
            cfg = t.gateway_config(side, keys, route_server=server, direct=False)
            gws.append(t.start_gateway(nat, f"gw{side}",
                                       t.write_json(tmp_path / f"gw{side}.json", cfg),
                                       log_name=f"gw{side}-{scheme}"))
        for gw, public in ((t.GW_A_TUN4, t.NAT_A_PUB), (t.GW_B_TUN4, t.NAT_B_PUB)):
            line = t.find_log_line(router.log_path, f"registered gateway={gw}")
            assert line and f"peer={public}:" in line and f"transport={scheme}" in line, line
        assert nat.wait_ping("hostA", t.HOST_B, deadline=15) is not None, \
            t.log_tail(router.log_path)
        assert nat.ping("hostB", t.HOST_A, count=2, wait=2).returncode == 0
        st = nat.ping_stats("hostA", t.HOST_B, count=10, interval=0.05)
        assert st["received"] == 10, st["stdout"]
        assert st["rtt_min"] >= ROUTER_RTT and st["rtt_avg"] < ROUTER_RTT + 30, st
        before = t.router_forwarded_bytes(nat)
        size = 2 * 1024 * 1024
        res = nat.transfer("hostA", "hostB", t.HOST_B, size, timeout=60)
        assert res["ok"], f"SHA-256 or size mismatch: {res}"
        # the router carried it all (and the ACKs back)
        assert t.router_forwarded_bytes(nat) - before >= size
    finally:
        for proc in (*gws, router):
            t.Topology.stop(proc, timeout=5)

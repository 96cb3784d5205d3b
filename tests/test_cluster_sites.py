"""Three offices on a cluster of two routers, end to end (issue 17): gwA attached to r1 only,
gwB to r2 only, gwC to both (``links``, one to each router).

    hostA -- gwA ==> r1 (router) <==router link==> r2 (router2) <== gwB -- hostB
                       ^                              ^
                       +========= gwC (wan0, wan1) ===+
                                   |
                                 hostC

tests/topology.py builds the namespaces (``add_router2``, ``add_office("C")``), tests/etcd.py
runs etcd in a namespace of its own and joins both routers' namespaces to it. Covered here:
every pair of offices (pings, both families, and SHA-256 transfers), r1 SIGKILLed under a
transfer from gwC to gwB, etcd stopped for longer than the lease, and what the cluster
refuses (a router without its credential, a gateway announcing another's network). Needs
root, iproute2 and etcd-server; everything created is removed again, also on failure.
"""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from test_cluster_e2e import router_cfg, start_cluster

try:
    import topology as t
except ImportError:
    from tests import topology as t

import etcd as etcd_fixture

_ok, _reason = t.daemons_ready()
_etcd_ok, _etcd_reason = etcd_fixture.have_etcd()

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not _ok, reason=_reason),
    pytest.mark.skipif(not _etcd_ok, reason=_etcd_reason),
]

C = t.OFFICES["C"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from polevpn.keygen import generate

    return generate(tmp_path_factory.mktemp("keys")).out_dir


R1_VIA_A = f"tls://{t.ROUTER_UL_A}:443"
R2_VIA_A = f"tls://{t.ROUTER2_RR}:443"  # through the router's namespace, which forwards
R2_VIA_B = f"tls://{t.ROUTER2_UL_B}:443"
R1_VIA_C = f"tls://{C.router_ul}:443"
R2_VIA_C = f"tls://{C.router2_ul}:443"
# office -> (host namespace, IPv4 host, IPv6 host)
HOSTS = {
    "A": ("hostA", t.HOST_A, t.HOST_A6),
    "B": ("hostB", t.HOST_B, t.HOST_B6),
    "C": ("hostC", C.host, C.host6),
}


def gw_a(keys: Path, **extra: Any) -> dict:
    """gwA: r1, and r2 (reached through the router's namespace) should r1 fail."""
    cfg = t.gateway_config("A", keys, peers="BC", route_servers=[R1_VIA_A, R2_VIA_A], **extra)
    del cfg["route_server"]
    return cfg


def gw_b(keys: Path, **extra: Any) -> dict:
    """gwB: r2 only, over its wan1."""
    return t.gateway_config("B", keys, peers="AC", route_server=R2_VIA_B, **extra)


def gw_c(keys: Path, r2_backup: bool = False, **extra: Any) -> dict:
    """gwC: a link to each router (wan0 to r1, wan1 to r2), heartbeats every 0.25 s and a
    link down after 1 s of silence; ``r2_backup`` makes the link to r2 a backup link."""
    links = [
        {"name": "r1", "route_server": R1_VIA_C},
        {"name": "r2", "route_server": R2_VIA_C, **({"backup": True} if r2_backup else {})},
    ]
    cfg = t.gateway_config(
        "C", keys, peers="AB", links=links, link_heartbeat_interval=0.25, link_timeout=1.0,
        **extra,
    )
    del cfg["route_server"]
    return cfg


def three_offices(topo: t.Topology, etcd: Any, keys: Path, tmp: Path, r2_backup: bool = False):
    """Both routers linked, then gwA, gwB and gwC registered (gwC at both routers)."""
    topo.add_router2()
    topo.add_office("C")
    r1, r2 = start_cluster(topo, etcd, keys, tmp)
    ga = t.start_gateway(topo, "gwA", t.write_json(tmp / "gwA.json", gw_a(keys)))
    gb = t.start_gateway(topo, "gwB", t.write_json(tmp / "gwB.json", gw_b(keys)))
    gc = t.start_gateway(topo, "gwC", t.write_json(tmp / "gwC.json", gw_c(keys, r2_backup)))
    for name in ("r1", "r2"):
        t.wait_log_lines(gc.log_path, 1, 'msg="link up"', f" link={name} ", timeout=15)
    # gwC is registered at both: each router knows it as a local gateway
    for r in (r1, r2):
        t.wait_log_lines(r.log_path, 1, "registered", f"gateway={C.tun4} ", timeout=5)
    return r1, r2, ga, gb, gc


def test_every_pair_of_three_offices_on_two_routers(tmp_path: Path, keys: Path) -> None:
    """Pings (IPv4 and IPv6) and SHA-256 transfers between every pair of offices, both
    directions: A-B always crosses the router link, A-C and B-C take whichever of gwC's
    links its flow hashes to (the other router, then the router link, or straight)."""
    topo = t.Topology(log_dir=tmp_path / "logs")
    with etcd_fixture.Etcd() as etcd, t.built(topo):
        r1, r2, *_ = three_offices(topo, etcd, keys, tmp_path)
        # each router learns the other's gateways from etcd
        assert topo.wait_ping("hostA", t.HOST_B, deadline=15) is not None, (
            t.log_tail(r1.log_path) + "\n" + t.log_tail(r2.log_path)
        )
        for src, dst in itertools.permutations("ABC", 2):
            node, *_ = HOSTS[src]
            _, dst4, dst6 = HOSTS[dst]
            for addr in (dst4, dst6):
                assert topo.wait_ping(node, addr, deadline=5) is not None, (src, dst, addr)
        port = 5090
        for src, dst in itertools.permutations("ABC", 2):
            node, *_ = HOSTS[src]
            dnode, dst4, _ = HOSTS[dst]
            port += 1
            res = topo.transfer(node, dnode, dst4, 4 << 20, port=port, timeout=60)
            assert res["ok"], (src, dst, res)
        # IPv6 too, once between the two single-homed offices
        res = topo.transfer("hostB", "hostA", t.HOST_A6, 2 << 20, port=5099, timeout=60)
        assert res["ok"], res
        # A-B crossed the router link both ways; nothing was taken for spoofed or passed on
        for r in (r1, r2):
            n = t.count_log_lines(r.log_path, "event=stats")
            t.wait_log_lines(r.log_path, n + 1, "event=stats", timeout=5)
            stats = t.last_stats(r.log_path)
            assert int(stats["peer_links_up"]) == 1 and int(stats["peer_links_down"]) == 0
            assert int(stats["peer_dropped_spoofed"]) == 0
            assert int(stats["peer_dropped_transit"]) == 0
            assert int(stats["bytes_forwarded"]) > 4 << 20


def test_r1_killed_under_a_transfer_from_the_dual_homed_office(
    tmp_path: Path, keys: Path
) -> None:
    """r1 SIGKILLed while hostC sends to hostB. gwC's link to r2 is its backup, so the
    transfer certainly crossed r1 (and the router link) before the kill: it completes with a
    matching SHA-256 over gwC's link to r2, pings from hostC to hostB resume within 2 s, and
    gwA, whose only link was to r1, registers at r2 (next in its route_servers) and reaches
    hostB again within 5 s."""
    topo = t.Topology(log_dir=tmp_path / "logs")
    with etcd_fixture.Etcd() as etcd, t.built(topo):
        r1, r2, ga, gb, gc = three_offices(topo, etcd, keys, tmp_path, r2_backup=True)
        assert topo.wait_ping("hostC", t.HOST_B, deadline=15) is not None
        assert topo.wait_ping("hostA", t.HOST_B, deadline=10) is not None
        xfer = topo.start_transfer("hostC", "hostB", t.HOST_B, 6 << 20, 1 << 20)
        from_c = topo.start_pings("hostC", t.HOST_B, count=80, interval=0.1)
        from_a = topo.start_pings("hostA", t.HOST_B, count=80, interval=0.1)
        while xfer.sent() < 2 << 20:
            assert xfer.running(), "the transfer ended early"
            time.sleep(0.05)
        carrier, grown = topo.busiest_link("gwC", ["wan0", "wan1"], 0.3)
        assert carrier == "wan0", grown  # to r1
        killed = time.time()
        topo.stop(r1, sig=signal.SIGKILL)
        result = xfer.result()
        assert result["ok"], (result, t.log_tail(gc.log_path))
        from_c.wait(timeout=30)
        from_a.wait(timeout=30)
        back_c = t.recovery_time(t.ping_replies(from_c.log_path), killed)
        back_a = t.recovery_time(t.ping_replies(from_a.log_path), killed)
        print(f"r1 killed: hostC -> hostB after {back_c} s, hostA -> hostB after {back_a} s")
        assert back_c is not None and back_c < 2.0, t.log_tail(gc.log_path)
        assert back_a is not None and back_a < 5.0, t.log_tail(ga.log_path)
        line = t.wait_for_log(ga, "using fallback route server", timeout=1)
        assert t.log_time(line) - killed < 5.0
        # gwC's link to r1 went down, the one to r2 carried on; r2 noticed r1 gone
        assert t.find_log_line(gc.log_path, "link down", "link=r1") is not None
        assert t.find_log_line(gc.log_path, "link down", "link=r2") is None
        assert t.find_log_line(r2.log_path, "router link down", "router=r1") is not None
        assert gb.poll() is None and t.count_log_lines(gb.log_path, "registered") == 1


def test_etcd_away_longer_than_the_lease(tmp_path: Path, keys: Path) -> None:
    """etcd stopped for longer than the routers' lease (3 s): hostA and hostB, known to each
    other's routers, keep talking without a gap and the router link stays up; gwC, which
    registers at r1 meanwhile (one link), is out of r2's reach until etcd is back, and then
    reachable from hostB."""
    topo = t.Topology(log_dir=tmp_path / "logs")
    with etcd_fixture.Etcd() as etcd, t.built(topo):
        topo.add_router2()
        topo.add_office("C")
        r1, r2 = start_cluster(topo, etcd, keys, tmp_path)
        t.start_gateway(topo, "gwA", t.write_json(tmp_path / "gwA.json", gw_a(keys)))
        t.start_gateway(topo, "gwB", t.write_json(tmp_path / "gwB.json", gw_b(keys)))
        assert topo.wait_ping("hostA", t.HOST_B, deadline=15) is not None
        # every 0.1 s from before etcd goes until after it is back (stopped then)
        pings = topo.start_pings("hostA", t.HOST_B, count=400, interval=0.1)
        time.sleep(0.5)
        etcd.stop()
        stopped = time.monotonic()
        for r in (r1, r2):
            t.wait_for_log(r, "cluster store lost", timeout=10)
        gc_cfg = t.gateway_config("C", keys, peers="AB", route_server=R1_VIA_C)
        gc = t.start_gateway(topo, "gwC", t.write_json(tmp_path / "gwC.json", gc_cfg))
        assert topo.wait_ping("hostA", C.host, deadline=5) is not None  # r1's own gateway
        time.sleep(max(0.0, stopped + 4.5 - time.monotonic()))  # past the 3 s lease
        assert topo.ping("hostB", C.host, count=1, wait=1).returncode != 0  # r2 knows nothing
        etcd.start()
        back = time.monotonic()
        for r in (r1, r2):
            t.wait_for_log(r, "cluster store back", timeout=15)
        took = topo.wait_ping("hostB", C.host, deadline=10)
        assert took is not None, t.log_tail(r2.log_path)
        print(f"etcd away {back - stopped:.1f} s; hostC from hostB {took:.1f} s after it was back")
        assert topo.ping("hostC", t.HOST_B, count=2, wait=1).returncode == 0
        time.sleep(2)  # the lease renewed (or granted anew) and the keys rewritten by now
        topo.stop(pings, timeout=3, sig=signal.SIGINT)
        seqs = {r.seq for r in t.ping_replies(pings.log_path)}
        missing = sorted(set(range(min(seqs), max(seqs) + 1)) - seqs)
        print(f"{len(seqs)} pings answered, missing: {missing}")
        assert len(missing) <= 1, f"pings lost while etcd was away or coming back: {missing}"
        # no flapping: the router link stayed up throughout, the gateways registered once
        for r in (r1, r2):
            assert t.find_log_line(r.log_path, "router link down") is None, t.log_tail(r.log_path)
        assert t.count_log_lines(gc.log_path, "registered") == 1


def test_a_router_outside_the_cluster_and_a_foreign_network_are_refused(
    tmp_path: Path, keys: Path
) -> None:
    """A third router with the cluster's name and etcd but not its credential (r0, so it is
    the one that dials r1 and r2) is refused by both and counted, and links nowhere. With
    gwB's networks granted to gwB in both routers' ``gateways``, a gateway at r1 announcing
    LAN B (gwB is at r2) is refused by the grant, and one at r2 announcing LAN A (held by
    gwA at r1, whose networks no grant names) is refused because the store says r1 holds it
    for another gateway. hostA and hostB talk throughout."""
    b_key = "a-key-for-gateway-b-only-0123456789"
    (tmp_path / "gwB.key").write_text(b_key + "\n")
    grants = {
        t.GW_B_TUN4: {"key": b_key, "networks": [t.LAN_B, t.LAN_B6, f"{t.GW_B_TUN6}/128"]}
    }
    topo = t.Topology(log_dir=tmp_path / "logs")
    with etcd_fixture.Etcd() as etcd, t.built(topo):
        topo.add_router2()
        topo.add_office("C")
        etcd.attach(topo.name("router"))
        etcd.attach(topo.name(t.ROUTER2))
        cfgs = {
            rid: t.write_json(
                tmp_path / f"{rid}.json",
                router_cfg(keys, rid, addr, etcd.endpoints, gateways=grants),
            )
            for rid, addr in (("r1", t.ROUTER_RR), ("r2", t.ROUTER2_RR))
        }
        r1 = t.start_router(topo, cfgs["r1"], log_name="r1")
        r2 = t.start_router(topo, cfgs["r2"], log_name="r2", node=t.ROUTER2)
        t.wait_for_log(r1, "router link up", "router=r2", timeout=15)
        t.start_gateway(topo, "gwA", t.write_json(tmp_path / "gwA.json", gw_a(keys)))
        gb_cfg = gw_b(keys, key_file=str(tmp_path / "gwB.key"))
        t.start_gateway(topo, "gwB", t.write_json(tmp_path / "gwB.json", gb_cfg))
        assert topo.wait_ping("hostA", t.HOST_B, deadline=15) is not None

        # the stranger: r2's namespace, its own port, the cluster's etcd, another credential
        rogue = router_cfg(keys, "r0", t.ROUTER2_RR, etcd.endpoints, listen="0.0.0.0:8443")
        rogue["cluster"]["peer_address"] = f"{t.ROUTER2_RR}:8443"
        rogue["cluster"]["peer_key"] = "not-the-cluster-credential-at-all"
        r0 = t.start_router(topo, t.write_json(tmp_path / "r0.json", rogue), log_name="r0",
                            node=t.ROUTER2)
        for r in (r1, r2):
            t.wait_for_log(r, "auth rejected", "router=1", timeout=15)
        t.wait_log_lines(r0.log_path, 2, "router link refused", timeout=10)
        n = [t.count_log_lines(r.log_path, "event=stats") for r in (r1, r2)]
        for r, k in zip((r1, r2), n, strict=True):
            t.wait_log_lines(r.log_path, k + 1, "event=stats", timeout=5)
            stats = t.last_stats(r.log_path)
            assert int(stats["peer_refused"]) >= 1, stats
            assert int(stats["peer_links_up"]) == 1  # r1 <-> r2 only
        assert t.find_log_line(r0.log_path, "router link up") is None
        for r in (r1, r2):
            assert t.find_log_line(r.log_path, "router link up", "router=r0") is None
        topo.stop(r0)

        # gateways announcing another office's network, from gwC's namespace
        impostor = {"gateway": "169.254.0.9", "gateway6": None, "peers": "AB"}
        cases = [
            # at r1, gwB's network: gwB holds the grant (and is at r2)
            ("at-r1", R1_VIA_C, [t.LAN_B], r1,
             f"network {t.LAN_B} belongs to gateway {t.GW_B_TUN4}"),
            # at r2, gwA's network: no grant, but the store says r1 holds it for gwA
            ("at-r2", R2_VIA_C, [t.LAN_A], r2, "held by another gateway of the cluster"),
        ]
        for name, server, nets, router, why in cases:
            cfg = t.gateway_config("C", keys, route_server=server, local_networks=nets,
                                   **impostor)
            proc = t.start_gateway(topo, "gwC", t.write_json(tmp_path / f"{name}.json", cfg),
                                   log_name=name, wait=False)
            assert proc.wait(timeout=20) == 1, t.log_tail(proc.log_path)
            line = t.find_log_line(proc.log_path, "registration rejected by router")
            assert line and why in line, t.log_tail(proc.log_path)
            assert t.find_log_line(router.log_path, "registration refused", "169.254.0.9")
        # the holder is named in r2's log, not to the gateway
        line = t.find_log_line(r2.log_path, "registration refused", "169.254.0.9")
        assert line is not None and "r1" in line and t.GW_A_TUN4 in line, line
        # nothing moved: A and B still reach each other
        assert topo.ping("hostA", t.HOST_B, count=2, wait=1).returncode == 0
        assert topo.ping("hostB", t.HOST_A, count=2, wait=1).returncode == 0

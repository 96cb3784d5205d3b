"""Two router processes of one cluster, end to end (issue 17): routes shared through a real
etcd, packets carried over the router link between them.

    hostA -- gwA ==tls==> router (r1) <==router link==> router2 (r2) <==tls== gwB -- hostB
                               \\________ etcd (a namespace of its own) ________/

tests/topology.py builds the namespaces (``add_router2``), tests/etcd.py runs one etcd
member and joins both router namespaces to it. Needs root, iproute2 and etcd-server;
everything created here is removed again, also on failure.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

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

PEER_KEY = "a-cluster-credential-for-tests"
R1_SERVER = f"tls://{t.ROUTER_UL_A}:443"
R2_SERVER_VIA_B = f"tls://{t.ROUTER2_UL_B}:443"
R2_SERVER_VIA_A = f"tls://{t.ROUTER2_RR}:443"
R1_SERVER_VIA_B = f"tls://{t.ROUTER_UL_B}:443"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from polevpn.keygen import generate

    return generate(tmp_path_factory.mktemp("keys")).out_dir


def router_cfg(keys: Path, rid: str, peer: str, endpoints: list[str], **extra: Any) -> dict:
    return t.router_config(
        keys,
        stats_interval=1,
        cluster={
            "name": "e2e",
            "router_id": rid,
            "etcd": {"endpoints": endpoints},
            "lease_ttl": 3,
            "peer_address": f"{peer}:443",
            "peer_key": PEER_KEY,
        },
        **extra,
    )


def start_cluster(topo: t.Topology, etcd: Any, keys: Path, tmp: Path):
    """r1 in the router namespace and r2 in router2 (added unless it is there already),
    both joined to ``etcd``, with their router link up."""
    if t.ROUTER2 not in topo.ns:
        topo.add_router2()
    etcd.attach(topo.name("router"))
    etcd.attach(topo.name(t.ROUTER2))
    c1 = t.write_json(tmp / "r1.json", router_cfg(keys, "r1", t.ROUTER_RR, etcd.endpoints))
    c2 = t.write_json(tmp / "r2.json", router_cfg(keys, "r2", t.ROUTER2_RR, etcd.endpoints))
    r1 = t.start_router(topo, c1, log_name="r1")
    r2 = t.start_router(topo, c2, log_name="r2", node=t.ROUTER2)
    # r1 ("r1" < "r2") dials r2 once the store has told it where r2 is
    t.wait_for_log(r1, "router link up", "router=r2", "direction=dialed", timeout=15)
    t.wait_for_log(r2, "router link up", "router=r1", "direction=accepted", timeout=5)
    return r1, r2


def test_gateways_on_two_routers_reach_each_other(tmp_path: Path, keys: Path) -> None:
    """gwA at r1 only, gwB at r2 only: pings both ways and both families, and SHA-256
    transfers both ways, every packet across the router link."""
    topo = t.Topology(log_dir=tmp_path / "logs")
    with etcd_fixture.Etcd() as etcd, t.built(topo):
        r1, r2 = start_cluster(topo, etcd, keys, tmp_path)
        gw_a = t.gateway_config("A", keys, route_server=R1_SERVER)
        gw_b = t.gateway_config("B", keys, route_server=R2_SERVER_VIA_B)
        t.start_gateway(topo, "gwA", t.write_json(tmp_path / "gwA.json", gw_a))
        t.start_gateway(topo, "gwB", t.write_json(tmp_path / "gwB.json", gw_b))
        # each router learns the other's gateway from etcd
        assert topo.wait_ping("hostA", t.HOST_B, deadline=15) is not None, (
            t.log_tail(r1.log_path) + "\n" + t.log_tail(r2.log_path)
        )
        assert topo.ping("hostB", t.HOST_A, count=3, wait=1).returncode == 0
        assert topo.wait_ping("hostA", t.HOST_B6, deadline=5) is not None
        assert topo.ping("hostB", t.HOST_A6, count=3, wait=1).returncode == 0
        there = topo.transfer("hostA", "hostB", t.HOST_B, 8 * 1024 * 1024, timeout=60)
        assert there["ok"], there
        back = topo.transfer("hostB", "hostA", t.HOST_A, 8 << 20, timeout=60, port=5098)
        assert back["ok"], back
        # it all crossed the link: r2 received from r1 what gwA sent, and nothing was
        # dropped as spoofed or passed on to a third router
        n = t.count_log_lines(r2.log_path, "event=stats")
        t.wait_log_lines(r2.log_path, n + 1, "event=stats", timeout=5)
        stats = t.last_stats(r2.log_path)
        assert int(stats["peer_links_up"]) == 1 and int(stats["peer_links_down"]) == 0
        assert int(stats["peer_dropped_spoofed"]) == 0 and int(stats["peer_dropped_transit"]) == 0
        # to gwB at least what hostA sent (super-packets: few packets, many bytes)
        assert int(stats["bytes_forwarded"]) > 8 * 1024 * 1024
        print(f"cross-router transfer: {there['mbit_s']:.0f} / {back['mbit_s']:.0f} Mbit/s")


def test_a_router_killed_its_gateways_move_to_the_other(tmp_path: Path, keys: Path) -> None:
    """gwA has a link to each router (multi-link), gwB one link at a time with r2 first and
    r1 next in route_servers. r2 is SIGKILLed during a transfer from hostA to hostB: gwA's
    link to r2 goes down and its flows take the link to r1, gwB moves to r1, the transfer
    completes with a matching SHA-256 and pings resume within seconds."""
    topo = t.Topology(log_dir=tmp_path / "logs")
    with etcd_fixture.Etcd() as etcd, t.built(topo):
        r1, r2 = start_cluster(topo, etcd, keys, tmp_path)
        links = [
            {"name": "r1", "route_server": R1_SERVER},
            {"name": "r2", "route_server": R2_SERVER_VIA_A},
        ]
        gw_a = t.gateway_config(
            "A", keys, links=links, link_heartbeat_interval=0.25, link_timeout=1.0
        )
        del gw_a["route_server"]
        gw_b = t.gateway_config(
            "B", keys, route_servers=[R2_SERVER_VIA_B, R1_SERVER_VIA_B], stats_interval=1
        )
        del gw_b["route_server"]
        ga = t.start_gateway(topo, "gwA", t.write_json(tmp_path / "gwA.json", gw_a))
        t.wait_log_lines(ga.log_path, 2, "link up", timeout=10, why="both of gwA's links")
        gb = t.start_gateway(topo, "gwB", t.write_json(tmp_path / "gwB.json", gw_b))
        assert topo.wait_ping("hostA", t.HOST_B, deadline=15) is not None
        # a paced transfer that outlasts the failover, and pings every 0.1 s
        xfer = topo.start_transfer("hostA", "hostB", t.HOST_B, 6 * 1024 * 1024, 1 << 20)
        pings = topo.start_pings("hostA", t.HOST_B, count=150, interval=0.1)
        while xfer.sent() < 2 * 1024 * 1024:
            assert xfer.running(), "the transfer ended early"
            time.sleep(0.05)
        killed = time.time()
        topo.stop(r2, sig=signal.SIGKILL)
        # gwB falls back to r1, its next route server
        line = t.wait_for_log(gb, "using fallback route server", timeout=10)
        moved = t.log_time(line) - killed
        result = xfer.result()
        assert result["ok"], result
        pings.wait(timeout=30)
        replies = t.ping_replies(pings.log_path)
        recovery = t.recovery_time(replies, killed)
        assert recovery is not None and recovery < 5.0, (recovery, t.log_tail(ga.log_path))
        print(f"gwB on r1 {moved:.2f} s after the kill; pings back after {recovery:.2f} s")
        # gwA's link to r2 went down, the one to r1 carried on
        assert t.find_log_line(ga.log_path, "link down", "link=r2") is not None
        assert t.find_log_line(ga.log_path, "link down", "link=r1") is None
        # and r1 noticed its link to r2 was gone
        assert t.find_log_line(r1.log_path, "router link down", "router=r2") is not None


def test_a_hung_router_is_left_within_the_heartbeat_timeout(tmp_path: Path, keys: Path) -> None:
    """r2 frozen (SIGSTOP): its kernel still completes TCP handshakes and takes data, so
    nothing resets; only silence tells. gwA's link to r2 is down after link_timeout and its
    flows move to r1; gwB, with heartbeats every 0.3 s and a 1.5 s timeout, gives r2 up and
    registers at r1, its next route server, without first spending connect_timeout on the
    hung r2 again."""
    topo = t.Topology(log_dir=tmp_path / "logs")
    with etcd_fixture.Etcd() as etcd, t.built(topo):
        r1, r2 = start_cluster(topo, etcd, keys, tmp_path)
        links = [
            {"name": "r1", "route_server": R1_SERVER},
            {"name": "r2", "route_server": R2_SERVER_VIA_A},
        ]
        gw_a = t.gateway_config(
            "A", keys, links=links, link_heartbeat_interval=0.25, link_timeout=1.0
        )
        del gw_a["route_server"]
        gw_b = t.gateway_config(
            "B",
            keys,
            route_servers=[R2_SERVER_VIA_B, R1_SERVER_VIA_B],
            heartbeat_interval=0.3,
            heartbeat_timeout=1.5,
            connect_timeout=5,
        )
        del gw_b["route_server"]
        ga = t.start_gateway(topo, "gwA", t.write_json(tmp_path / "gwA.json", gw_a))
        t.wait_log_lines(ga.log_path, 2, "link up", timeout=10, why="both of gwA's links")
        gb = t.start_gateway(topo, "gwB", t.write_json(tmp_path / "gwB.json", gw_b))
        assert topo.wait_ping("hostA", t.HOST_B, deadline=15) is not None
        pings = topo.start_pings("hostA", t.HOST_B, count=120, interval=0.1)
        time.sleep(1)
        frozen = time.time()
        r2.send_signal(signal.SIGSTOP)
        try:
            line = t.wait_for_log(gb, "using fallback route server", timeout=15)
            moved = t.log_time(line) - frozen
            pings.wait(timeout=30)
        finally:
            r2.send_signal(signal.SIGCONT)
        replies = t.ping_replies(pings.log_path)
        recovery = t.recovery_time(replies, frozen)
        print(f"hung r2: gwB on r1 after {moved:.2f} s, pings back after {recovery} s")
        # 1.5 s of silence, then r1 first: trying the hung r2 again would have cost another
        # connect_timeout (capped at heartbeat_timeout, 1.5 s) before r1 (3.2 s measured)
        assert moved < 2.8, t.log_tail(gb.log_path)
        assert recovery is not None and recovery < 3.0
        assert t.find_log_line(gb.log_path, "cannot connect") is None
        assert t.find_log_line(ga.log_path, "link down", "link=r2") is not None

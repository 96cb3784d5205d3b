"""The cluster in ops: its read model (polevpn/cluster/view.py), the API's /api/v1/cluster
reply, the polevpn_cluster_* metrics and polevpn-ctl cluster, from a ClusterMember whose
state is fed by hand (no etcd here; tests/test_cluster_router.py has the live API)."""

from __future__ import annotations

import ipaddress
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from test_cluster_state import FakeRemoteRoutes, Route, route_kv, router_kv

from polevpn.cluster.member import ClusterMember
from polevpn.cluster.view import PeerLinkView, cluster_view
from polevpn.config import ClusterConfig
from polevpn.ops import api, ctl, metrics
from polevpn.router.view import ROUTER_DROPS, RouterView

CFG = ClusterConfig(
    name="net",
    router_id="r1",
    etcd_endpoints=("http://198.19.250.1:2379",),
    peer_address=("198.18.0.1", 443),
    peer_key="k" * 20,
    prefix="/polevpn",
)


def member() -> ClusterMember:
    m = ClusterMember(CFG, sink=FakeRemoteRoutes(), make_route=Route)
    m.state.store_up(100.0)
    m.state.snapshot(
        42,
        [
            router_kv("r2"),
            route_kv("r2", "198.18.20.0/24", "169.254.0.2"),
            route_kv("r2", "169.254.0.2/32", "169.254.0.2"),
            route_kv("r3", "2001:db8:30::/48", "169.254.0.3"),
        ],
    )
    m.gateway_up(
        ipaddress.ip_address("169.254.0.1"),
        [ipaddress.ip_network("169.254.0.1/32"), ipaddress.ip_network("198.18.10.0/24")],
    )
    m.store.lease, m.store.lease_ttl, m.store.lease_remaining = 0xABC, 5, 4
    return m


def router_view(c: Any) -> RouterView:
    return RouterView(
        listeners=(), connections={}, gateways=(), routes=(), pending=0,
        stats=dict.fromkeys(ROUTER_DROPS, 0), admission={}, kcp=None, cluster=c,
    )  # fmt: skip


def test_cluster_view() -> None:
    m = member()
    v = cluster_view(m, now=110.0, wall=1_000_010.0)
    assert (v.name, v.router_id, v.peer_address) == ("net", "r1", "198.18.0.1:443")
    assert v.store.state == "connected" and v.store.since == 1_000_000.0
    assert (v.store.revision, v.store.lease, v.store.lease_ttl) == (42, 0xABC, 5)
    assert [(r.router_id, r.state, r.routes) for r in v.routers] == [
        ("r1", "self", 2),
        ("r2", "up", 2),
        ("r3", "incomplete", 1),
    ]
    assert [(r.router_id, r.network, r.gateway) for r in v.remote_routes] == [
        ("r2", "169.254.0.2/32", "169.254.0.2"),
        ("r2", "198.18.20.0/24", "169.254.0.2"),
        ("r3", "2001:db8:30::/48", "169.254.0.3"),
    ]
    assert v.local_routes == 2
    assert v.stats["resyncs"] == 1 and v.stats["store_errors"] == 0
    m.state.store_lost(120.0)
    v = cluster_view(m, now=130.0, wall=1_000_030.0)
    assert v.store.state == "lost" and v.store.stale and v.store.since == 1_000_020.0
    assert {r.state for r in v.routers[1:]} == {"stale"}


def test_api_reply() -> None:
    cv = cluster_view(
        member(),
        peer_links=(PeerLinkView("r2", "198.18.0.2:443", "up", 1_000_000.0, 1, 2, 300, 400, 0.5),),
        now=110.0,
        wall=1_000_010.0,
    )
    server = api.ApiServer(lambda: router_view(cv), lambda: "t", control=None)  # type: ignore[arg-type]
    reply = server.cluster()
    assert reply is not None
    assert reply["store"] == {
        "state": "connected",
        "since": "1970-01-12T13:46:40.000Z",
        "endpoint": "http://198.19.250.1:2379",
        "revision": 42,
        "lease": "abc",
        "lease_ttl": 5,
        "lease_remaining": 4,
        "keys": 0,
        "stale": False,
        "last_error": None,
    }
    assert [r["router_id"] for r in reply["routers"]] == ["r1", "r2", "r3"]
    assert reply["routers"][1]["started_at"] == "1970-01-01T00:16:41.000Z"
    assert len(reply["remote_routes"]) == 3 and reply["local_routes"] == 2
    assert reply["peer_links"][0]["bytes_out"] == 400
    # the reply's keys are exactly the documented ones (schemathesis checks the values live)
    doc = api.openapi.document([])["components"]["schemas"]
    assert set(reply) == set(doc["Cluster"]["required"])
    assert set(reply["store"]) == set(doc["ClusterStore"]["required"])
    assert set(reply["routers"][0]) == set(doc["ClusterRouter"]["required"])
    assert set(reply["remote_routes"][0]) == set(doc["RemoteRoute"]["required"])
    assert set(reply["peer_links"][0]) == set(doc["PeerLink"]["required"])
    # the status says whether there is a cluster (the dashboard asks for it only then)
    assert server.status()["cluster"] == {"name": "net", "router_id": "r1", "store": "connected"}
    alone = api.ApiServer(lambda: router_view(None), lambda: "t", control=None)  # type: ignore[arg-type]
    assert alone.cluster() is None and alone.status()["cluster"] is None


def test_metrics() -> None:
    m = member()
    views = {"v": cluster_view(m)}

    class One:
        def collect(self) -> Any:
            return metrics.RouterCollector(lambda: router_view(views["v"]))._cluster(views["v"])

    reg = CollectorRegistry()
    reg.register(One())  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    assert "polevpn_cluster_store_up 1.0" in text
    assert "polevpn_cluster_remote_routes 3.0" in text
    assert "polevpn_cluster_local_routes 2.0" in text
    assert 'polevpn_cluster_routers{state="up"} 1.0' in text
    assert 'polevpn_cluster_routers{state="incomplete"} 1.0' in text
    assert "polevpn_cluster_store_errors_total 0.0" in text
    assert "polevpn_cluster_bad_values_total 0.0" in text
    m.state.store_lost(1.0)
    m.store.stats.errors = 3
    views["v"] = cluster_view(m)
    text = generate_latest(reg).decode()
    assert "polevpn_cluster_store_up 0.0" in text and "polevpn_cluster_stale 1.0" in text
    assert "polevpn_cluster_store_errors_total 3.0" in text


def test_ctl_formats_the_cluster() -> None:
    cv = cluster_view(
        member(),
        peer_links=(PeerLinkView("r2", "198.18.0.2:443", "up", None, 10, 20, 3000, 4000, 1.25),),
    )
    server = api.ApiServer(lambda: router_view(cv), lambda: "t", control=None)  # type: ignore[arg-type]
    reply = server.cluster()
    assert reply is not None
    out = ctl.format_cluster(reply)
    lines = out.splitlines()
    assert lines[0] == "cluster net, router r1 at 198.18.0.1:443"
    assert "store connected since" in lines[1] and "lease abc ttl 5s" in lines[1]
    assert any(line.split()[:3] == ["r2", "198.18.0.2:443", "up"] for line in lines)
    assert any(line.split()[:2] == ["r3", "-"] and "incomplete" in line for line in lines)
    assert any(line.startswith("r2") and "1.2 ms" in line and "3.9 KiB" in line for line in lines)
    assert any(line.split() == ["2001:db8:30::/48", "r3", "169.254.0.3", "169.254.0.3"]
               for line in lines)  # fmt: skip
    reply["remote_routes"] = []
    reply["store"].update(state="lost", stale=True, last_error="connection refused")
    out = ctl.format_cluster(reply)
    assert "store lost" in out and "last error: connection refused" in out
    assert out.endswith("no remote routes")

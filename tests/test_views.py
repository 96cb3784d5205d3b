"""The read models (polevpn.router.view, polevpn.gateway.view) and the one projection of a
connection's transport figures (pathstats.transport_figures), fed given counters: no
network, no running router or gateway."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
from pathlib import Path
from types import SimpleNamespace

import pytest

from polevpn.config import Listener, RouterConfig
from polevpn.gateway import view as gateway_view
from polevpn.io import pathstats
from polevpn.kcp.fec import FecStats
from polevpn.ops import api
from polevpn.router import view
from polevpn.router.sitelinks import LinkInfo, Site


class FakeTransport:
    """A transport whose extra info holds a KcpLink (or nothing: no TCP socket either)."""

    def __init__(self, kcp: object | None = None) -> None:
        self.kcp = kcp

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.kcp if name == "kcp_link" else default


@dataclasses.dataclass
class FakeKcp:
    """What the projection reads of a KcpLink."""

    srtt_ms: int | None = 31
    retransmissions: int | None = 4
    segments_sent: int | None = 96
    fec_state: str = "on"
    fec: object | None = None
    cc: object | None = None  # congestion control off
    kcp: object | None = None
    hole_seconds: float = 0.0
    urgent_segments: int = 0
    urgent_copies: int = 0


FEC = FecStats(
    recovered=3,
    unrecoverable=1,
    parity_sent=9,
    parity=2,
    loss_ppm=2500,
    peer_loss_ppm=310000,
    oversized=5,
    undecoded=6,
    decodes_refused=7,
)


def kcp_transport(fec: FecStats | None = FEC) -> FakeTransport:
    return FakeTransport(FakeKcp(fec=SimpleNamespace(stats=fec) if fec is not None else None))


# -- the transport's figures


def test_transport_figures_of_a_kcp_link():
    f = pathstats.transport_figures(kcp_transport(), "kcp")
    # KCP's srtt; 4 resends among 96 first sends + 4
    assert f.path == pathstats.PathFigures(31.0, 4, 100)
    assert f.path.loss == 0.04
    assert f.kcp == pathstats.KcpFigures(
        31.0,
        4,
        "on",
        pathstats.FecFigures(
            parity=2,
            parity_sent=9,
            recovered=3,
            unrecoverable=1,
            loss=0.0025,
            peer_loss=0.31,
            oversized=5,
            undecoded=6,
            decodes_refused=7,
        ),
    )
    # path_figures, which the gateway's own figures use, is the same projection's path
    assert pathstats.path_figures(kcp_transport(), "kcp") == f.path


def test_transport_figures_without_fec_or_control_block_or_socket():
    f = pathstats.transport_figures(kcp_transport(fec=None), "kcp")
    assert f.kcp is not None and f.kcp.fec is None and f.kcp.fec_state == "on"
    # before KCP has measured anything: no RTT, no loss
    unknown = FakeTransport(FakeKcp(srtt_ms=None, retransmissions=None, segments_sent=None))
    f = pathstats.transport_figures(unknown, "kcp")
    assert f.path == pathstats.PathFigures() and f.path.loss is None
    assert f.kcp == pathstats.KcpFigures(None, None, "on", None)
    # a kcp:// transport without its link, tls:// without a TCP socket, no transport at all
    assert pathstats.transport_figures(FakeTransport(), "kcp") == pathstats.TransportFigures()
    assert pathstats.transport_figures(FakeTransport(), "tls") == pathstats.TransportFigures()
    assert pathstats.transport_figures(None, "tls") == pathstats.TransportFigures()


# -- the router's view


class FakeConnection(SimpleNamespace):
    # the router keeps connections in sets and dicts: hashed and compared by identity
    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other


def connection(
    gateway: str,
    networks: list[str],
    *,
    transport_name: str = "tls",
    transport: object = None,
    link: LinkInfo | None = None,
    connected_at: float = 100.0,
    counters: tuple[int, int, int, int] = (0, 0, 0, 0),
    features: frozenset[str] = frozenset(),
    unregistered: int = 0,
    peer: str = "198.18.0.1:40000",
    **extra: object,
) -> FakeConnection:
    """What the projection reads of a GatewayConnection."""
    addr = ipaddress.ip_address(gateway)
    return FakeConnection(
        gateway=addr,
        peer=peer,
        transport_name=transport_name,
        transport=transport,
        prefixes=[ipaddress.ip_network(addr), *map(ipaddress.ip_network, networks)],
        session=SimpleNamespace(features=features, dropped_unregistered=unregistered),
        connected_at=connected_at,
        connected_wall=1_700_000_000.0 + connected_at,
        packets_in=counters[0],
        packets_out=counters[1],
        bytes_in=counters[2],
        bytes_out=counters[3],
        link=link,
        link_up=extra.get("link_up", True),
        link_downs=extra.get("link_downs", 0),
        link_timeout=extra.get("link_timeout", 1.0),
    )


def test_connection_view_of_a_plain_gateway():
    conn = connection(
        "169.254.0.1",
        ["198.18.10.0/24", "2001:db8:10::/48"],
        transport_name="kcp",
        transport=kcp_transport(),
        counters=(1, 2, 300, 400),
        features=frozenset({"super", "multilink"}),
    )
    v = view.connection_view(conn, now=112.5)  # type: ignore[arg-type]
    assert v.gateway == "169.254.0.1"
    # the gateway's own address is not one of its networks
    assert v.networks == ("198.18.10.0/24", "2001:db8:10::/48")
    assert v.features == ("multilink", "super")
    assert v.uptime == 12.5 and v.connected_wall == 1_700_000_100.0
    assert v.traffic == view.Traffic(1, 2, 300, 400)
    assert v.transport == "kcp" and v.figures.path.rtt_ms == 31.0
    assert v.link is None
    # a clock read before the connection was made gives no negative uptime
    assert view.connection_view(conn, now=99.0).uptime == 0.0  # type: ignore[arg-type]


def test_connection_view_of_a_link():
    conn = connection(
        "169.254.0.9",
        ["198.18.90.0/24"],
        link=LinkInfo("lte", 2.5, backup=True),
        link_up=False,
        link_downs=3,
        link_timeout=0.75,
    )
    v = view.connection_view(conn, now=101.0)  # type: ignore[arg-type]
    assert v.link == view.LinkState("lte", 2.5, True, False, 3, 0.75)
    assert v.link.role == "backup"
    # tls:// without a TCP socket to read: nothing known of the path
    assert v.figures == pathstats.TransportFigures()


def test_api_renders_a_link_view_as_documented():
    conn = connection(
        "169.254.0.9",
        ["198.18.90.0/24"],
        transport_name="kcp",
        transport=kcp_transport(),
        link=LinkInfo("v4", 1.0),
        counters=(10, 20, 1000, 2000),
        link_timeout=0.75,
    )
    v = view.connection_view(conn, now=102.0)  # type: ignore[arg-type]
    server = api.ApiServer(lambda: None, lambda: None, None)  # type: ignore[arg-type]
    got = server.link_view(v)
    assert got == {
        "name": "v4",
        "weight": 1.0,
        "backup": False,
        "up": True,
        "downs": 0,
        "timeout_ms": 750,
        "transport": "kcp",
        "peer": "198.18.0.1:40000",
        "features": [],
        "connected_at": "2023-11-14T22:15:00.000Z",
        "uptime": 2.0,
        "packets_in": 10,
        "packets_out": 20,
        "bytes_in": 1000,
        "bytes_out": 2000,
        "rtt_ms": 31.0,
        "retransmissions": 4,
        "segments_sent": 100,
        "loss": 0.04,
        "kcp": {
            "srtt_ms": 31.0,
            "retransmissions": 4,
            "fec": {
                "state": "on",
                "parity": 2,
                "parity_sent": 9,
                "recovered": 3,
                "unrecoverable": 1,
                "loss": 0.0025,
            },
        },
    }


def _site(*conns: FakeConnection) -> Site:
    site: Site = Site(conns[0].gateway)
    site.prefixes = list(conns[0].prefixes)
    for c in conns:
        site.links.register(c, c.link)
    return site


def test_site_view_sums_its_links_and_lists_them_by_name():
    b = connection(
        "169.254.0.9",
        ["198.18.90.0/24"],
        link=LinkInfo("b"),
        connected_at=105.0,
        counters=(1, 2, 3, 4),
        features=frozenset({"multilink"}),
        peer="198.18.0.2:1",
    )
    a = connection(
        "169.254.0.9",
        ["198.18.90.0/24"],
        transport_name="kcp",
        link=LinkInfo("a"),
        connected_at=101.0,
        counters=(10, 20, 30, 40),
        features=frozenset({"super", "multilink"}),
        peer="[2001:db8::2]:2",
    )
    v = view.site_view(_site(b, a), now=111.0, wall=0.0)
    assert [c.link.name for c in v.links] == ["a", "b"]  # type: ignore[union-attr]
    assert v.peer == "[2001:db8::2]:2, 198.18.0.2:1"
    assert v.transport == "mixed"
    assert v.features == ("multilink", "super")
    assert v.traffic == view.Traffic(11, 22, 33, 44)
    assert v.networks == ("198.18.90.0/24",)
    # its oldest link's age
    assert v.uptime == 10.0 and v.connected_wall == a.connected_wall


@pytest.fixture
def router(tmp_path: Path):
    from polevpn.router.router import Router

    off = Listener(False, "127.0.0.1", 0, None, None)
    return Router(RouterConfig(path=tmp_path / "r.json", tls=off, kcp=off, key="123456"))


def test_snapshot_of_a_router(router):
    v6 = connection("2001:db8::1", ["2001:db8:1::/48"], unregistered=2)
    v4b = connection("169.254.0.20", ["198.18.20.0/24"], transport_name="kcp")
    v4a = connection("169.254.0.3", ["198.18.3.0/24"], unregistered=5)
    pending = connection("169.254.0.99", [])
    link = connection("169.254.0.9", ["198.18.90.0/24"], link=LinkInfo("x"), link_up=False)
    for c in (v6, v4b, v4a):
        router.by_gateway[c.gateway] = c
        for net in c.prefixes[1:]:
            router.routes.add(net, c)
    site = _site(link)
    router.sites[link.gateway] = site
    router.routes.add(ipaddress.ip_network("198.18.90.0/24"), site)
    router.connections.update([v6, v4b, v4a, pending, link])
    # the router's own TUN, the pseudo-gateway "local": in the table, never a connection
    local = FakeConnection(gateway=ipaddress.ip_address("169.254.0.254"), transport_name="tun")
    router.routes.add(ipaddress.ip_network("198.18.30.0/24"), local)
    router.stats.dropped_unregistered = 10
    router.stats.dropped_spoofed = 4

    snap = view.snapshot(router, now=200.0, wall=1_700_000_000.0)
    # IPv4 before IPv6, each by number (not by text: .3 before .20)
    assert [g.gateway for g in snap.gateways] == [
        "169.254.0.3",
        "169.254.0.9",
        "169.254.0.20",
        "2001:db8::1",
    ]
    assert isinstance(snap.gateway("169.254.0.9"), view.SiteView)
    assert snap.gateway("169.254.0.77") is None
    assert [c.link.up for c in snap.links] == [False]  # type: ignore[union-attr]
    assert dict(snap.connections) == {"tls": 4, "kcp": 1}
    assert [(r.network, r.gateway, r.transport) for r in snap.routes] == [
        ("198.18.3.0/24", "169.254.0.3", "tls"),
        ("198.18.20.0/24", "169.254.0.20", "kcp"),
        ("198.18.30.0/24", "169.254.0.254", "tun"),
        ("198.18.90.0/24", "169.254.0.9", "tls"),
        ("2001:db8:1::/48", "2001:db8::1", "tls"),
    ]
    # the live sessions' drops before REGISTER count with those of closed ones
    assert snap.stats["dropped_unregistered"] == 17
    assert snap.drops["unregistered"] == 17 and snap.drops["spoofed"] == 4
    assert set(snap.drops) == set(view.ROUTER_DROPS.values())
    assert snap.kcp is None and snap.listeners == ()
    assert snap.pending == 0
    # a snapshot: the router goes on, the view does not
    router.stats.dropped_spoofed = 9
    v4a.packets_in = 99
    assert snap.drops["spoofed"] == 4 and snap.gateways[0].traffic.packets_in == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.pending = 1  # type: ignore[misc]


# -- the gateway's view


def router_link(scheme: str = "tls", registered: bool = True, closed: bool = False, **kw):
    """What the projection reads of a gateway's RouterLink."""
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(None)
    pending: concurrent.futures.Future = concurrent.futures.Future()
    server = SimpleNamespace(url=f"{scheme}://198.19.0.1:443", scheme=scheme)
    return SimpleNamespace(
        server=server,
        registered=done if registered else pending,
        closed=done if closed else pending,
        session=SimpleNamespace(rtt=kw.get("rtt")),
        transport=kw.get("transport"),
    )


def test_gateway_connection_view():
    link = router_link("kcp", rtt=0.02, transport=kcp_transport())
    v = gateway_view.connection_view(link)  # type: ignore[arg-type]
    assert v.route_server == "kcp://198.19.0.1:443" and v.transport == "kcp"
    assert v.registered and v.heartbeat_rtt == 0.02
    assert v.figures.path.loss == 0.04 and v.figures.kcp is not None
    assert not gateway_view.connection_view(router_link(closed=True)).registered  # type: ignore[arg-type]
    assert not gateway_view.connection_view(router_link(registered=False)).registered  # type: ignore[arg-type]


def test_uplink_view_counts_closed_connections_too():
    link = router_link()
    link.packets_out, link.bytes_out, link.packets_in, link.bytes_in = 10, 1000, 20, 3000
    closed = [5, 500, 7, 700]
    u = SimpleNamespace(
        name="v4",
        config=SimpleNamespace(weight=2.0, backup=True, server=link.server),
        up=True,
        downs=1,
        connects=2,
        link=link,
        totals=lambda: (
            closed[0] + link.packets_out,
            closed[1] + link.bytes_out,
            closed[2] + link.packets_in,
            closed[3] + link.bytes_in,
        ),
    )
    v = gateway_view.uplink_view(u)  # type: ignore[arg-type]
    assert v.traffic == gateway_view.LinkTraffic(15, 1500, 27, 3700)
    got = (v.name, v.weight, v.role, v.up, v.downs, v.connects)
    assert got == ("v4", 2.0, "backup", True, 1, 2)
    assert v.registered
    u.link = None
    v = gateway_view.uplink_view(u)  # type: ignore[arg-type]
    assert v.connection is None and not v.registered


def test_gateway_snapshot_takes_the_tun_counters_without_touching_the_stats():
    from polevpn.gateway.gateway import GatewayStats

    gw = SimpleNamespace(
        stats=GatewayStats(packets_to_router=3),
        tun=SimpleNamespace(write_dropped=8, write_errors=1),
        link=router_link(registered=False),
        uplinks={},
    )
    v = gateway_view.snapshot(gw)  # type: ignore[arg-type]
    assert v.stats["tun_write_dropped"] == 8 and v.stats["tun_write_errors"] == 1
    assert v.stats["packets_to_router"] == 3
    assert gw.stats.tun_write_dropped == 0
    assert not v.connected and v.uplinks == ()
    gw.link = router_link()
    assert gateway_view.snapshot(gw).connected  # type: ignore[arg-type]

"""The router's read model: a snapshot of its state as plain, frozen values.

Operations (the REST API, ``/metrics``) read the router only through ``snapshot``: they
never see a connection, a site or the routing table, so they need nothing of router.py,
and the router needs nothing of them (polevpn/__init__.py has the layers). A snapshot is
taken when it is asked for, never per packet; everything in it is copied, so it can be
read at leisure while the router goes on.

Each connection of a gateway, a plain gateway's only one as much as each link of a
multi-link gateway, is projected by ``connection_view`` alone; a multi-link gateway's
figures are made from its links' views.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

from polevpn.cluster.view import ClusterView, cluster_view
from polevpn.direct.rendezvous import RendezvousView
from polevpn.io.pathstats import TransportFigures, transport_figures
from polevpn.router.sitelinks import Site

if TYPE_CHECKING:
    from polevpn.router.router import GatewayConnection, Router


# RouterStats fields that are packets dropped, by the ``reason`` the API and /metrics give
ROUTER_DROPS = {
    "dropped_no_route": "no_route",
    "dropped_spoofed": "spoofed",
    "dropped_malformed": "malformed",
    "dropped_queue_full": "queue_full",
    "dropped_hairpin": "hairpin",
    "dropped_unregistered": "unregistered",
    "dropped_link_local": "link_local",
    "dropped_links_down": "links_down",
    "dropped_oversized": "oversized",
    "dropped_closing": "closing",
    "dropped_peer_transit": "peer_transit",
}


@dataclass(frozen=True, slots=True)
class Traffic:
    """Packets and IP bytes; "in" is what the gateway sent to the router."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    @staticmethod
    def total(parts: Iterable[Traffic]) -> Traffic:
        pi = po = bi = bo = 0
        for t in parts:
            pi, po = pi + t.packets_in, po + t.packets_out
            bi, bo = bi + t.bytes_in, bo + t.bytes_out
        return Traffic(pi, po, bi, bo)


@dataclass(frozen=True, slots=True)
class LinkState:
    """What makes a connection one link of a multi-link gateway, and its health."""

    name: str
    weight: float
    backup: bool
    up: bool
    downs: int
    timeout: float  # s of silence after which the router takes the link for down

    @property
    def role(self) -> str:
        return "backup" if self.backup else "primary"


@dataclass(frozen=True, slots=True)
class ConnectionView:
    """One registered connection: a plain gateway's, or one link of a multi-link one."""

    gateway: str
    peer: str
    transport: str
    # the gateway's networks, without its own address
    networks: tuple[str, ...]
    features: tuple[str, ...]
    connected_wall: float  # time.time() when the connection was made
    uptime: float  # s since then, at the snapshot
    traffic: Traffic
    figures: TransportFigures
    link: LinkState | None = None  # None: a plain gateway


@dataclass(frozen=True, slots=True)
class SiteView:
    """A multi-link gateway: its links (by name), and what holds for all of them."""

    gateway: str
    networks: tuple[str, ...]
    links: tuple[ConnectionView, ...]
    connected_wall: float  # of its oldest link: reachable at least that long
    uptime: float

    @property
    def peer(self) -> str:
        return ", ".join(c.peer for c in self.links)

    @property
    def transport(self) -> str:
        return shared_transport(c.transport for c in self.links)

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(sorted({f for c in self.links for f in c.features}))

    @property
    def traffic(self) -> Traffic:
        return Traffic.total(c.traffic for c in self.links)


GatewayView = ConnectionView | SiteView


@dataclass(frozen=True, slots=True)
class RouteView:
    network: str
    gateway: str
    transport: str


@dataclass(frozen=True, slots=True)
class ListenerView:
    transport: str
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class RouterView:
    listeners: tuple[ListenerView, ...]
    # open connections (registered or not yet) by transport name
    connections: Mapping[str, int]
    # plain gateways and multi-link ones, by address (IPv4 first)
    gateways: tuple[GatewayView, ...]
    routes: tuple[RouteView, ...]
    pending: int  # connections accepted and not yet registered
    # RouterStats, with dropped_unregistered counting the live sessions' too (monotonic)
    stats: Mapping[str, int]
    admission: Mapping[str, int]  # AdmissionStats
    kcp: Mapping[str, int] | None  # KcpServerStats; None without a kcp:// listener
    # the router's cluster (cfg.cluster), its links to the other routers included; None
    # for a router alone
    cluster: ClusterView | None = None
    # direct paths between gateways (polevpn.direct.rendezvous); None without a kcp://
    # listener, where they cannot be
    direct: RendezvousView | None = None

    @property
    def links(self) -> tuple[ConnectionView, ...]:
        """Every link of every multi-link gateway."""
        return tuple(c for g in self.gateways if isinstance(g, SiteView) for c in g.links)

    @property
    def drops(self) -> dict[str, int]:
        """Packets dropped, by reason."""
        return {reason: self.stats[name] for name, reason in ROUTER_DROPS.items()}

    def gateway(self, address: str) -> GatewayView | None:
        for g in self.gateways:
            if g.gateway == address:
                return g
        return None


class RouterControl(Protocol):
    """What operations may ask of the router besides reading it."""

    def reload(self) -> list[str]:
        """Re-read the config and apply it; raises ConfigError and changes nothing."""
        ...


def shared_transport(names: Iterable[str]) -> str:
    """The transport some connections share, or "mixed" (a multi-link gateway's links)."""
    found = set(names)
    return found.pop() if len(found) == 1 else "mixed"


def connection_view(conn: GatewayConnection, now: float) -> ConnectionView:
    """``conn`` at monotonic time ``now``: the one projection of a gateway's connection."""
    info = conn.link
    link = None
    if info is not None:
        link = LinkState(
            name=str(info.name),
            weight=info.weight,
            backup=info.backup,
            up=conn.link_up,
            downs=conn.link_downs,
            timeout=conn.link_timeout,
        )
    return ConnectionView(
        gateway=str(conn.gateway),
        peer=conn.peer,
        transport=conn.transport_name,
        # the first prefix is the gateway's own address
        networks=tuple(str(n) for n in conn.prefixes[1:]),
        features=tuple(sorted(conn.session.features)) if conn.session else (),
        connected_wall=conn.connected_wall,
        uptime=max(0.0, now - conn.connected_at),
        traffic=Traffic(conn.packets_in, conn.packets_out, conn.bytes_in, conn.bytes_out),
        figures=transport_figures(conn.transport, conn.transport_name),
        link=link,
    )


def site_view(site: Site, now: float, wall: float) -> SiteView:
    """A multi-link gateway at monotonic ``now`` (and wall-clock ``wall``)."""
    named = [c for c in site.links.connections() if c.link is not None]
    named.sort(key=lambda c: str(c.link.name))  # type: ignore[union-attr]
    first = min(named, key=lambda c: c.connected_at) if named else None
    return SiteView(
        gateway=str(site.gateway),
        networks=tuple(str(n) for n in site.networks),
        links=tuple(connection_view(c, now) for c in named),
        connected_wall=first.connected_wall if first else wall,
        uptime=max(0.0, now - first.connected_at) if first else 0.0,
    )


def _listeners(router: Router) -> tuple[ListenerView, ...]:
    out = []
    for sock in router.listen_sockets:
        try:
            host, port = sock.getsockname()[:2]
        except OSError:  # closed while stopping
            continue
        out.append(ListenerView("tls", host, port))
    udp = router.kcp_server.transport if router.kcp_server is not None else None
    if udp is not None:
        sockname = udp.get_extra_info("sockname")
        if sockname:
            out.append(ListenerView("kcp", sockname[0], sockname[1]))
    return tuple(out)


def _counters(obj: object) -> dict[str, int]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}  # type: ignore[arg-type]


def _cluster(router: Router, now: float, wall: float) -> ClusterView | None:
    member = getattr(router, "cluster", None)
    if member is None:
        return None
    peers = getattr(router, "peers", None)
    if peers is None:
        return cluster_view(member, now=now, wall=wall)
    links = peers.view(now, wall)
    return cluster_view(
        member, peer_links=links.links, peer_stats=links.stats, now=now, wall=wall
    )


def snapshot(router: Router, now: float | None = None, wall: float | None = None) -> RouterView:
    """The router's state now."""
    now = time.monotonic() if now is None else now
    wall = time.time() if wall is None else wall
    conns = list(router.connections)
    by_transport: dict[str, int] = {"tls": 0, "kcp": 0}
    for c in conns:
        by_transport[c.transport_name] = by_transport.get(c.transport_name, 0) + 1
    gateways: list[tuple[object, GatewayView]] = [
        (addr, connection_view(c, now)) for addr, c in router.by_gateway.items()
    ]
    gateways += [(addr, site_view(s, now, wall)) for addr, s in router.sites.items()]
    gateways.sort(key=lambda ag: (ag[0].version, int(ag[0])))  # type: ignore[attr-defined]

    routes = []
    table = sorted(
        router.routes.routes(),
        key=lambda nt: (nt[0].version, int(nt[0].network_address), nt[0].prefixlen),
    )
    for net, target in table:
        if getattr(target, "router_link", False):
            # another router's route (cluster.routes): the cluster's view lists those
            continue
        # a plain gateway's connection, or a multi-link gateway's site
        members = target.links.connections() if isinstance(target, Site) else [target]
        transport = shared_transport(c.transport_name for c in members)
        routes.append(RouteView(str(net), str(target.gateway), transport))

    stats = _counters(router.stats)
    # sessions count what arrives before REGISTER themselves; the router adds it up at
    # disconnect, so live sessions are added here to keep the figure monotonic
    stats["dropped_unregistered"] += sum(c.session.dropped_unregistered for c in conns if c.session)
    kcp = _counters(router.kcp_server.counters()) if router.kcp_server is not None else None
    return RouterView(
        listeners=_listeners(router),
        connections=by_transport,
        gateways=tuple(g for _, g in gateways),
        routes=tuple(routes),
        pending=router.admission.pending,
        stats=stats,
        admission=_counters(router.admission.stats),
        kcp=kcp,
        cluster=_cluster(router, now, wall),
        direct=_direct(router, now, wall),
    )


def _direct(router: Router, now: float, wall: float) -> RendezvousView | None:
    rdv = getattr(router, "rendezvous", None)
    return None if rdv is None else rdv.view(now, wall)

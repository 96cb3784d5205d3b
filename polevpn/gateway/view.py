"""The gateway's read model: a snapshot of its state as plain, frozen values.

``/metrics`` (and the stats line) read the gateway only through ``snapshot``, so
operations need nothing of gateway.py and the gateway nothing of them (polevpn/__init__.py
has the layers). Taken when asked for, never per packet; nothing in it changes afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from polevpn.direct.manager import PeerStatus
from polevpn.io.pathstats import TransportFigures, transport_figures

if TYPE_CHECKING:
    from polevpn.gateway.gateway import Gateway, RouterLink, Uplink


# GatewayStats fields that are packets dropped, by the ``reason`` label /metrics gives them
GATEWAY_DROPS = {
    "dropped_no_link": "no_link",
    "dropped_link_busy": "link_busy",
    "dropped_acl": "acl",
    "dropped_spoofed": "spoofed",
    "dropped_malformed": "malformed",
    "dropped_too_big": "too_big",
    "tun_write_dropped": "tun_full",
}


@dataclass(frozen=True, slots=True)
class ConnectionView:
    """One connection to a router (``RouterLink``)."""

    route_server: str  # its URL
    transport: str  # tls or kcp
    # registered and not closed since
    registered: bool
    heartbeat_rtt: float | None  # s, of the last answered heartbeat
    figures: TransportFigures


@dataclass(frozen=True, slots=True)
class LinkTraffic:
    """Packets and IP bytes over all of a link's connections so far."""

    packets_out: int = 0  # to the router
    bytes_out: int = 0
    packets_in: int = 0  # from the router
    bytes_in: int = 0


@dataclass(frozen=True, slots=True)
class UplinkView:
    """One link of a multi-link gateway."""

    name: str
    weight: float
    backup: bool
    route_server: str
    transport: str
    up: bool
    downs: int
    connects: int
    traffic: LinkTraffic
    connection: ConnectionView | None  # the link's connection now, if any

    @property
    def role(self) -> str:
        return "backup" if self.backup else "primary"

    @property
    def registered(self) -> bool:
        return self.connection is not None and self.connection.registered


@dataclass(frozen=True, slots=True)
class DirectView:
    """The gateway's direct paths (issue 18): each peer it has had an offer for, and the
    manager's counters (polevpn.direct.manager.DirectStats)."""

    port: int  # the direct socket's UDP port
    peers: tuple[PeerStatus, ...]
    stats: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class GatewayView:
    # GatewayStats, with the TUN's own write failures
    stats: Mapping[str, int]
    link: ConnectionView | None  # a plain gateway's connection
    uplinks: tuple[UplinkView, ...]  # a multi-link gateway's links, in config order
    # None: direct paths are off (direct.enable false, or the socket could not be opened)
    direct: DirectView | None = None

    @property
    def connected(self) -> bool:
        """Registered with a router (on any of its links, with several)."""
        return (self.link is not None and self.link.registered) or any(
            u.registered for u in self.uplinks
        )


def connection_view(link: RouterLink) -> ConnectionView:
    """The one projection of a gateway's connection to a router."""
    scheme = link.server.scheme
    return ConnectionView(
        route_server=link.server.url,
        transport=scheme,
        registered=link.registered.done() and not link.closed.done(),
        heartbeat_rtt=link.session.rtt,
        figures=transport_figures(link.transport, scheme),
    )


def uplink_view(u: Uplink) -> UplinkView:
    server = u.config.server
    return UplinkView(
        name=u.name,
        weight=u.config.weight,
        backup=u.config.backup,
        route_server=server.url,
        transport=server.scheme,
        up=u.up,
        downs=u.downs,
        connects=u.connects,
        traffic=LinkTraffic(*u.totals()),
        connection=connection_view(u.link) if u.link is not None else None,
    )


def direct_peer_text(p: PeerStatus) -> str:
    """One peer for the stats line: ``169.254.0.2:direct:rtt_ms=3:tx=1200:rx=800:refused=0``."""
    rtt = f":rtt_ms={p.rtt * 1000:.0f}" if p.rtt is not None else ""
    cause = f":cause={p.cause.name.lower()}" if p.cause.value else ""
    return (
        f"{p.peer}:{p.state.value}{rtt}{cause}"
        f":tx={p.bytes_sent}:rx={p.bytes_received}:refused={p.refused}"
    )


def direct_view(gw: Gateway) -> DirectView | None:
    d = getattr(gw, "direct", None)
    if d is None:
        return None
    stats = d.manager.counters()
    return DirectView(
        port=d.socket.port,
        peers=tuple(d.manager.statuses()),
        stats={f.name: getattr(stats, f.name) for f in fields(stats)},
    )


def snapshot(gw: Gateway) -> GatewayView:
    """The gateway's state now."""
    stats = {f.name: getattr(gw.stats, f.name) for f in fields(gw.stats)}
    if gw.tun is not None:
        # the TUN counts its own write failures; GatewayStats has them only after a summary
        stats["tun_write_dropped"] = gw.tun.write_dropped
        stats["tun_write_errors"] = gw.tun.write_errors
    link = gw.link
    return GatewayView(
        stats=stats,
        link=connection_view(link) if link is not None else None,
        uplinks=tuple(uplink_view(u) for u in gw.uplinks.values()),
        direct=direct_view(gw),
    )

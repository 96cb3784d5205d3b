"""The cluster's read model: frozen snapshots of a ClusterMember for ops (the API, /metrics,
the dashboard, polevpn-ctl), taken when asked for, never per packet.

``peer_links`` holds the figures of the links to the other routers (polevpn.cluster.peers
fills it); without them it is empty.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polevpn.cluster.member import ClusterMember


@dataclass(frozen=True, slots=True)
class StoreView:
    # "connecting" (never connected yet), "connected" or "lost"
    state: str
    # wall-clock time of the last change of state; None before the first
    since: float | None
    # the etcd endpoint in use (or last tried)
    endpoint: str
    # the store revision what is known reflects
    revision: int
    # this router's lease (0: none) and its TTL as granted and as last renewed
    lease: int
    lease_ttl: int
    lease_remaining: int
    # this router's keys the store holds under the lease
    keys: int
    # what is known may be out of date (the store is lost)
    stale: bool
    last_error: str | None


@dataclass(frozen=True, slots=True)
class ClusterRouterView:
    router_id: str
    # "host:port", or "" while its router key is missing
    peer_address: str
    started: float | None
    version: str
    # "self", "up", "stale" (the store is lost) or "incomplete" (routes, no router key)
    state: str
    routes: int


@dataclass(frozen=True, slots=True)
class RemoteRouteView:
    router_id: str
    network: str
    gateway: str
    site: str


@dataclass(frozen=True, slots=True)
class PeerLinkView:
    """Another router of the cluster and the link to it (polevpn.cluster.peers).

    The counters run over every link to that router so far ("in": what it sent here)."""

    router_id: str
    # where this router dials it; "" when the store has no address for it
    address: str
    # "up"; "connecting" (this router dials it); "down" (it is to dial this router)
    state: str
    # wall-clock time the link came up; None while it is not up
    since: float | None
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    # heartbeat round trip on a link this router dialed, TCP's estimate on one it accepted
    rtt_ms: float | None = None
    # "dialed" or "accepted" while up; "dials" or "accepts" while not
    direction: str = ""
    # the far end of the link up: the other router's source address on an accepted one
    peer: str = ""
    connects: int = 0
    # why the last attempt or link failed; "" once up
    last_error: str = ""
    # IP bytes per second over the last second or so
    rate_in: float = 0.0
    rate_out: float = 0.0
    # packets not sent (queue full) or dropped from it (sources it does not announce, or
    # for a third router)
    dropped_queue_full: int = 0
    dropped_spoofed: int = 0
    dropped_transit: int = 0


@dataclass(frozen=True, slots=True)
class ClusterView:
    name: str
    router_id: str
    peer_address: str
    store: StoreView
    # this router first, then the others by id
    routers: tuple[ClusterRouterView, ...]
    remote_routes: tuple[RemoteRouteView, ...]
    # networks this router publishes (its gateways' and its own)
    local_routes: int
    # the state's and the store's counters
    stats: Mapping[str, int]
    peer_links: tuple[PeerLinkView, ...] = ()


def cluster_view(
    member: ClusterMember,
    peer_links: tuple[PeerLinkView, ...] = (),
    now: float | None = None,
    wall: float | None = None,
    peer_stats: Mapping[str, int] | None = None,
) -> ClusterView:
    """``peer_links`` and ``peer_stats`` (the links' counters, given "peer_" prefixes in
    ``stats``): polevpn.cluster.peers.PeerLinks.view."""
    now = time.monotonic() if now is None else now
    wall = time.time() if wall is None else wall
    state, store, cfg = member.state, member.store, member.cfg
    since = None if state.since is None else wall - (now - state.since)
    local = state.local_routes()
    routers = [
        ClusterRouterView(
            cfg.router_id, cfg.peer_address_text, state.me.started, state.me.version, "self",
            len(local),
        )
    ]
    remote: list[RemoteRouteView] = []
    for rid in sorted(state.routers):
        r = state.routers[rid]
        routers.append(
            ClusterRouterView(
                rid,
                r.info.peer_address_text if r.info else "",
                r.info.started if r.info else None,
                r.info.version if r.info else "",
                state.router_state(r),
                len(r.routes),
            )
        )
        for net in sorted(r.routes, key=lambda n: (n.version, int(n.network_address), n.prefixlen)):
            info = r.routes[net]
            remote.append(RemoteRouteView(rid, str(net), info.gateway, info.site))
    return ClusterView(
        name=cfg.name,
        router_id=cfg.router_id,
        peer_address=cfg.peer_address_text,
        store=StoreView(
            state=state.store,
            since=since,
            endpoint=store.endpoint,
            revision=state.revision,
            lease=store.lease,
            lease_ttl=store.lease_ttl,
            lease_remaining=store.lease_remaining,
            keys=state.held,
            stale=state.stale,
            last_error=store.last_error,
        ),
        routers=tuple(routers),
        remote_routes=tuple(remote),
        local_routes=len(local),
        stats={
            **state.stats.fields(),
            **store.stats.fields("store_"),
            **{f"peer_{k}": v for k, v in (peer_stats or {}).items()},
        },
        peer_links=peer_links,
    )

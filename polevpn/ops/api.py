"""The router's REST API: JSON under /api/v1, bearer-token auth, on the router's own loop.

Every reply is built when it is asked for, from what the router already keeps
(connections, routing table, stats, the admission limits, the kcp:// server), so the API
costs nothing per packet. Endpoints (``polevpn.ops.openapi`` has the precise shapes):

  GET  /api/v1/status             version, uptime, listeners, counts, counters, drops
  GET  /api/v1/gateways           registered gateways with transport, networks, counters, RTT,
                                  and each link of a multi-link gateway
  GET  /api/v1/gateways/{address} one of them, or 404
  GET  /api/v1/routes             the routing table
  GET  /api/v1/cluster            the router's cluster: its store, the routers, the remote
                                  routes, the links to other routers (404 without a cluster)
  GET  /api/v1/direct             direct paths between gateways: the pairs the router offered
                                  and their state as the gateways report it, the endpoints
  POST /api/v1/reload             the router's reload(): 200 with the changes, 400 with the error
  GET  /api/v1/openapi.json       the OpenAPI document (public: it holds no data)
  GET  /                          the dashboard page, polevpn/ops/web/index.html (public)

Every reply is made from one snapshot of the router's read model (``polevpn.router.view``);
the reload goes through the narrow ``RouterControl``. The token is compared in constant
time and read at each request, so a reload that changes it takes effect at once. It is
never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from polevpn import __version__
from polevpn.common.logfmt import kv
from polevpn.config import ConfigError
from polevpn.io import pathstats
from polevpn.io.pathstats import KcpFigures
from polevpn.ops import httpserver, openapi
from polevpn.ops.httpserver import HttpError, Reply, Request
from polevpn.router.view import (
    ConnectionView,
    GatewayView,
    RouterControl,
    RouterView,
    SiteView,
    Traffic,
)

log = logging.getLogger("polevpn.api")

P = openapi.API_PREFIX
JSON = "application/json"


def json_error(status: int, message: str) -> tuple[str, bytes]:
    return JSON, _dumps({"error": message})


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _ok(obj: Any) -> Reply:
    return 200, JSON, _dumps(obj), {}


def rfc3339(wall: float) -> str:
    return (
        datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def tcp_rtt_ms(transport: object) -> float | None:
    """The kernel's smoothed RTT of a TCP connection (TCP_INFO), or None if unavailable."""
    info = pathstats.tcp_info(transport)
    return None if info is None else info.rtt_us / 1000


def _kcp(kcp: KcpFigures | None) -> dict[str, Any] | None:
    if kcp is None:
        return None
    fec = None
    if kcp.fec is not None:
        s = kcp.fec
        fec = {
            "state": kcp.fec_state,
            "parity": s.parity,
            "parity_sent": s.parity_sent,
            "recovered": s.recovered,
            "unrecoverable": s.unrecoverable,
            "loss": s.loss,
        }
    return {"srtt_ms": kcp.srtt_ms, "retransmissions": kcp.retransmissions, "fec": fec}


def _traffic(t: Traffic) -> dict[str, int]:
    return {
        "packets_in": t.packets_in,
        "packets_out": t.packets_out,
        "bytes_in": t.bytes_in,
        "bytes_out": t.bytes_out,
    }


def _since(wall: float, uptime: float) -> dict[str, Any]:
    return {"connected_at": rfc3339(wall), "uptime": round(uptime, 3)}


class ApiServer(httpserver.HttpServer):
    """The API of the router whose state ``view`` returns (a fresh snapshot at each call).

    ``token`` gives the bearer token of the moment and ``control`` takes the reload: both
    are read at each request, so a reload that changes the token applies at once.
    """

    def __init__(
        self,
        view: Callable[[], RouterView],
        token: Callable[[], str | None],
        control: RouterControl,
    ) -> None:
        self.view = view
        self.token = token
        self.control = control
        self.started_at = time.time()
        self._started = time.monotonic()
        routes: dict[tuple[str, str], httpserver.Handler] = {
            ("GET", "/"): self._index,
            ("GET", "/favicon.ico"): self._favicon,
            ("GET", f"{P}/openapi.json"): self._openapi,
            ("GET", f"{P}/status"): self._authorized(self._status),
            ("GET", f"{P}/gateways"): self._authorized(self._gateways),
            ("GET", f"{P}/gateways/{{address}}"): self._authorized(self._gateway),
            ("GET", f"{P}/routes"): self._authorized(self._routes),
            ("GET", f"{P}/cluster"): self._authorized(self._cluster),
            ("GET", f"{P}/direct"): self._authorized(self._direct),
            ("POST", f"{P}/reload"): self._authorized(self._reload),
        }
        super().__init__(
            routes,
            name="api",
            error_body=json_error,
            headers={
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
            },
        )

    # -- auth

    def _authorized(self, handler: httpserver.Handler) -> httpserver.Handler:
        async def checked(request: Request) -> Reply:
            token = self.token()
            value = request.headers.get("authorization")
            if value is None:
                raise HttpError(401, "bearer token required", {"WWW-Authenticate": "Bearer"})
            scheme, _, given = value.partition(" ")
            # latin-1 as the header was decoded: any byte string compares, none raises
            if (
                token is None
                or scheme.lower() != "bearer"
                or not hmac.compare_digest(given.strip().encode("latin-1"), token.encode())
            ):
                raise HttpError(
                    401, "wrong bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
                )
            return await handler(request)

        return checked

    # -- replies, from the router's read model (polevpn.router.view)

    def counter_names(self) -> list[str]:
        v = self.view()
        return [*v.stats, *v.admission]

    def status(self, v: RouterView | None = None) -> dict[str, Any]:
        v = self.view() if v is None else v
        counters: dict[str, int] = {**v.stats, **v.admission}
        if v.kcp is not None:
            counters.update({f"kcp_{name}": value for name, value in v.kcp.items()})
        links = v.links
        return {
            "version": __version__,
            "started_at": rfc3339(self.started_at),
            "uptime": round(time.monotonic() - self._started, 3),
            "listen": [
                {"transport": x.transport, "address": x.address, "port": x.port}
                for x in v.listeners
            ],
            "connections": sum(v.connections.values()),
            "gateways": len(v.gateways),
            "links": len(links),
            "links_up": sum(1 for c in links if c.link is not None and c.link.up),
            "routes": len(v.routes),
            "pending": v.pending,
            "counters": counters,
            "drops": v.drops,
            # the details are /api/v1/cluster's
            "cluster": None
            if v.cluster is None
            else {
                "name": v.cluster.name,
                "router_id": v.cluster.router_id,
                "store": v.cluster.store.state,
            },
        }

    def gateway_view(self, conn: ConnectionView) -> dict[str, Any]:
        """A plain (single-link) gateway."""
        return {
            "gateway": conn.gateway,
            "peer": conn.peer,
            "transport": conn.transport,
            "networks": list(conn.networks),
            "features": list(conn.features),
            **_since(conn.connected_wall, conn.uptime),
            **_traffic(conn.traffic),
            "rtt_ms": conn.figures.path.rtt_ms,
            "kcp": _kcp(conn.figures.kcp),
            "links": [],
        }

    def link_view(self, conn: ConnectionView) -> dict[str, Any]:
        """One link of a multi-link gateway."""
        link = conn.link
        assert link is not None
        path = conn.figures.path
        return {
            "name": link.name,
            "weight": link.weight,
            "backup": link.backup,
            "up": link.up,
            "downs": link.downs,
            "timeout_ms": round(link.timeout * 1000),
            "transport": conn.transport,
            "peer": conn.peer,
            "features": list(conn.features),
            **_since(conn.connected_wall, conn.uptime),
            **_traffic(conn.traffic),
            "rtt_ms": path.rtt_ms,
            "retransmissions": path.retransmissions,
            "segments_sent": path.segments_sent,
            "loss": path.loss,
            "kcp": _kcp(conn.figures.kcp),
        }

    def site_view(self, site: SiteView) -> dict[str, Any]:
        """A multi-link gateway: what holds for all its links, its traffic summed over them,
        and each link (by name)."""
        return {
            "gateway": site.gateway,
            "peer": site.peer,
            "transport": site.transport,
            "networks": list(site.networks),
            "features": list(site.features),
            **_since(site.connected_wall, site.uptime),
            **_traffic(site.traffic),
            # each link has its own
            "rtt_ms": None,
            "kcp": None,
            "links": [self.link_view(c) for c in site.links],
        }

    def one_gateway(self, g: GatewayView) -> dict[str, Any]:
        return self.site_view(g) if isinstance(g, SiteView) else self.gateway_view(g)

    def gateways(self, v: RouterView | None = None) -> list[dict[str, Any]]:
        v = self.view() if v is None else v
        return [self.one_gateway(g) for g in v.gateways]

    def routes(self, v: RouterView | None = None) -> list[dict[str, Any]]:
        v = self.view() if v is None else v
        return [
            {"network": r.network, "gateway": r.gateway, "transport": r.transport}
            for r in v.routes
        ]

    def cluster(self, v: RouterView | None = None) -> dict[str, Any] | None:
        """The cluster section's view, None for a router alone."""
        v = self.view() if v is None else v
        c = v.cluster
        if c is None:
            return None
        st = c.store
        return {
            "name": c.name,
            "router_id": c.router_id,
            "peer_address": c.peer_address,
            "store": {
                "state": st.state,
                "since": rfc3339(st.since) if st.since is not None else None,
                "endpoint": st.endpoint,
                "revision": st.revision,
                "lease": f"{st.lease:x}" if st.lease else None,
                "lease_ttl": st.lease_ttl,
                "lease_remaining": st.lease_remaining,
                "keys": st.keys,
                "stale": st.stale,
                "last_error": st.last_error,
            },
            "routers": [
                {
                    "router_id": r.router_id,
                    "peer_address": r.peer_address,
                    "started_at": rfc3339(r.started) if r.started is not None else None,
                    "version": r.version,
                    "state": r.state,
                    "routes": r.routes,
                }
                for r in c.routers
            ],
            "remote_routes": [
                {"router_id": r.router_id, "network": r.network, "gateway": r.gateway,
                 "site": r.site}
                for r in c.remote_routes
            ],  # fmt: skip
            "local_routes": c.local_routes,
            "counters": dict(c.stats),
            "peer_links": [
                {
                    "router_id": p.router_id,
                    "address": p.address,
                    "state": p.state,
                    "since": rfc3339(p.since) if p.since is not None else None,
                    "packets_in": p.packets_in,
                    "packets_out": p.packets_out,
                    "bytes_in": p.bytes_in,
                    "bytes_out": p.bytes_out,
                    "rtt_ms": p.rtt_ms,
                    "direction": p.direction,
                    "peer": p.peer,
                    "connects": p.connects,
                    "last_error": p.last_error,
                    "rate_in": p.rate_in,
                    "rate_out": p.rate_out,
                    "drops": {
                        "queue_full": p.dropped_queue_full,
                        "spoofed": p.dropped_spoofed,
                        "transit": p.dropped_transit,
                    },
                }
                for p in c.peer_links
            ],
        }

    def direct(self, v: RouterView | None = None) -> dict[str, Any]:
        """Direct paths: what the rendezvous holds (polevpn.direct.rendezvous)."""
        v = self.view() if v is None else v
        d = v.direct
        if d is None:
            return {"enabled": False, "pairs": [], "endpoints": [], "counters": {}}
        return {
            "enabled": d.enabled,
            "pairs": [
                {
                    "pair_id": p.pair_id,
                    "gateways": list(p.gateways),
                    "created": rfc3339(p.created),
                    "expires": rfc3339(p.expires),
                    "state": p.state,
                    "sides": [
                        {
                            "gateway": s.gateway,
                            "state": s.state,
                            "cause": s.cause,
                            "rtt_ms": s.rtt_ms,
                            "bytes_sent": s.bytes_sent,
                            "bytes_received": s.bytes_received,
                            "refused": s.refused,
                            "endpoint": s.endpoint,
                            "reported": rfc3339(s.reported) if s.reported is not None else None,
                        }
                        for s in p.sides
                    ],
                }
                for p in d.pairs
            ],
            "endpoints": [
                {"gateway": e.gateway, "public": e.public, "host": list(e.host)}
                for e in d.endpoints
            ],
            "counters": {
                **d.stats,
                **{f"probes_{k}": n for k, n in d.probes.items() if f"probes_{k}" not in d.stats},
            },
        }

    # -- handlers

    async def _status(self, request: Request) -> Reply:
        return _ok(self.status())

    async def _gateways(self, request: Request) -> Reply:
        return _ok({"gateways": self.gateways()})

    async def _gateway(self, request: Request) -> Reply:
        text = request.params["address"]
        try:
            # the canonical form: 2001:DB8::0001 names 2001:db8::1
            address = str(ipaddress.ip_address(text))
        except ValueError:
            address = None
        found = self.view().gateway(address) if address is not None else None
        if found is None:
            raise HttpError(404, f"no registered gateway {text!r}")
        return _ok(self.one_gateway(found))

    async def _routes(self, request: Request) -> Reply:
        return _ok({"routes": self.routes()})

    async def _cluster(self, request: Request) -> Reply:
        found = self.cluster()
        if found is None:
            raise HttpError(404, "this router is in no cluster (no cluster section)")
        return _ok(found)

    async def _direct(self, request: Request) -> Reply:
        return _ok(self.direct())

    async def _reload(self, request: Request) -> Reply:
        log.info("reload requested over the API")
        try:
            changes = self.control.reload()
        except ConfigError as exc:
            # logged as for SIGHUP: the journal tells the whole story either way
            log.error("reload failed, keeping the running config", extra=kv(error=exc))
            raise HttpError(400, str(exc)) from None
        return _ok({"reloaded": True, "changes": changes})

    async def _openapi(self, request: Request) -> Reply:
        return _ok(openapi.document(self.counter_names()))

    async def _index(self, request: Request) -> Reply:
        try:
            page = resources.files("polevpn.ops").joinpath("web/index.html").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise HttpError(404, "no dashboard installed (polevpn/ops/web/index.html)") from None
        return 200, "text/html; charset=utf-8", page, {}

    async def _favicon(self, request: Request) -> Reply:
        return 204, "image/x-icon", b"", {}


async def serve(
    view: Callable[[], RouterView],
    token: Callable[[], str | None],
    control: RouterControl,
    listen: tuple[str, int],
) -> ApiServer:
    server = ApiServer(view, token, control)
    await server.start(*listen)
    return server

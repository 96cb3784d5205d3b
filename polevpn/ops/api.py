"""The router's REST API: JSON under /api/v1, bearer-token auth, on the router's own loop.

Every reply is built when it is asked for, from what the router already keeps
(connections, routing table, stats, the admission limits, the kcp:// server), so the API
costs nothing per packet. Endpoints (``polevpn.ops.openapi`` has the precise shapes):

  GET  /api/v1/status             version, uptime, listeners, counts, counters, drops
  GET  /api/v1/gateways           registered gateways with transport, networks, counters, RTT,
                                  and each link of a multi-link gateway
  GET  /api/v1/gateways/{address} one of them, or 404
  GET  /api/v1/routes             the routing table
  POST /api/v1/reload             Router.reload(): 200 with the changes, 400 with the error
  GET  /api/v1/openapi.json       the OpenAPI document (public: it holds no data)
  GET  /                          the dashboard page, polevpn/ops/web/index.html (public)

The token is compared in constant time and read from the router's config at each request,
so a reload that changes it takes effect at once. It is never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
from dataclasses import fields
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

from polevpn import __version__
from polevpn.common.logfmt import kv
from polevpn.config import ConfigError
from polevpn.io import pathstats
from polevpn.ops import httpserver, openapi
from polevpn.ops.httpserver import HttpError, Reply, Request
from polevpn.ops.metrics import ROUTER_DROPS

if TYPE_CHECKING:
    from polevpn.kcp.kcp_link import KcpLink
    from polevpn.router.router import GatewayConnection, Router, Site

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


def _kcp_view(link: KcpLink) -> dict[str, Any]:
    srtt, retrans = link.srtt_ms, link.retransmissions
    fec = None
    if link.fec is not None:
        s = link.fec.stats
        fec = {
            "state": link.fec_state,
            "parity": s.parity,
            "parity_sent": s.parity_sent,
            "recovered": s.recovered,
            "unrecoverable": s.unrecoverable,
            "loss": s.loss_ppm / 1e6,
        }
    return {
        "srtt_ms": None if srtt is None else float(srtt),
        "retransmissions": retrans,
        "fec": fec,
    }


def _traffic(conns: list[GatewayConnection]) -> dict[str, int]:
    return {
        "packets_in": sum(c.packets_in for c in conns),
        "packets_out": sum(c.packets_out for c in conns),
        "bytes_in": sum(c.bytes_in for c in conns),
        "bytes_out": sum(c.bytes_out for c in conns),
    }


def _transport_of(conns: list[GatewayConnection]) -> str:
    """The transport the connections share, or "mixed" (a multi-link gateway's links)."""
    names = {c.transport_name for c in conns}
    return names.pop() if len(names) == 1 else "mixed"


def _network_key(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int, int]:
    return net.version, int(net.network_address), net.prefixlen


class ApiServer(httpserver.HttpServer):
    def __init__(self, router: Router) -> None:
        self.router = router
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
            token = self.router.cfg.api_token
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

    # -- views

    def counter_names(self) -> list[str]:
        r = self.router
        return [f.name for f in fields(r.stats)] + [f.name for f in fields(r.admission.stats)]

    def _listeners(self) -> list[dict[str, Any]]:
        r = self.router
        out = []
        for sock in r.listen_sockets:
            try:
                host, port = sock.getsockname()[:2]
            except OSError:  # closed while stopping
                continue
            out.append({"transport": "tls", "address": host, "port": port})
        udp = r.kcp_server.transport if r.kcp_server is not None else None
        if udp is not None:
            sockname = udp.get_extra_info("sockname")
            if sockname:
                out.append({"transport": "kcp", "address": sockname[0], "port": sockname[1]})
        return out

    def status(self) -> dict[str, Any]:
        r = self.router
        stats = r.stats
        conns = list(r.connections)
        links = [c for site in r.sites.values() for c in site.links.connections()]
        counters: dict[str, int] = {f.name: getattr(stats, f.name) for f in fields(stats)}
        # sessions count what arrives before REGISTER themselves; the router adds it up at
        # disconnect, so live sessions are added here to keep the figure monotonic
        counters["dropped_unregistered"] += sum(
            c.session.dropped_unregistered for c in conns if c.session
        )
        adm = r.admission.stats
        counters.update({f.name: getattr(adm, f.name) for f in fields(adm)})
        if r.kcp_server is not None:
            ks = r.kcp_server.counters()
            counters.update({f"kcp_{f.name}": getattr(ks, f.name) for f in fields(ks)})
        return {
            "version": __version__,
            "started_at": rfc3339(self.started_at),
            "uptime": round(time.monotonic() - self._started, 3),
            "listen": self._listeners(),
            "connections": len(conns),
            "gateways": len(r.by_gateway) + len(r.sites),
            "links": len(links),
            "links_up": sum(1 for c in links if c.link_up),
            "routes": len(r.routes),
            "pending": r.admission.pending,
            "counters": counters,
            "drops": {reason: counters[field] for field, reason in ROUTER_DROPS.items()},
        }

    def gateway_view(self, conn: GatewayConnection) -> dict[str, Any]:
        """A plain (single-link) gateway."""
        transport = conn.transport
        kcp = None
        rtt: float | None = None
        if conn.transport_name == "kcp":
            get = getattr(transport, "get_extra_info", None)
            link = get("kcp_link") if get is not None else None
            if link is not None:
                kcp = _kcp_view(link)
                rtt = kcp["srtt_ms"]
        elif transport is not None:
            rtt = tcp_rtt_ms(transport)
        return {
            "gateway": str(conn.gateway),
            "peer": conn.peer,
            "transport": conn.transport_name,
            # the first prefix is the gateway's own address
            "networks": [str(n) for n in conn.prefixes[1:]],
            "features": sorted(conn.session.features) if conn.session else [],
            **self._since(conn.connected_wall, conn.connected_at),
            **_traffic([conn]),
            "rtt_ms": rtt,
            "kcp": kcp,
            "links": [],
        }

    def link_view(self, conn: GatewayConnection) -> dict[str, Any]:
        """One link of a multi-link gateway: the connection registered under its name."""
        info = conn.link
        assert info is not None
        transport = conn.transport
        get = getattr(transport, "get_extra_info", None)
        kcp_link = get("kcp_link") if get is not None and conn.transport_name == "kcp" else None
        path = pathstats.path_figures(transport, conn.transport_name)
        return {
            "name": info.name,
            "weight": info.weight,
            "backup": info.backup,
            "up": conn.link_up,
            "downs": conn.link_downs,
            "timeout_ms": round(conn.link_timeout * 1000),
            "transport": conn.transport_name,
            "peer": conn.peer,
            "features": sorted(conn.session.features) if conn.session else [],
            **self._since(conn.connected_wall, conn.connected_at),
            **_traffic([conn]),
            "rtt_ms": path.rtt_ms,
            "retransmissions": path.retransmissions,
            "segments_sent": path.segments_sent,
            "loss": path.loss,
            "kcp": _kcp_view(kcp_link) if kcp_link is not None else None,
        }

    def site_view(self, site: Site) -> dict[str, Any]:
        """A multi-link gateway: what holds for all its links, its traffic summed over them,
        and each link (by name)."""
        named = [(c.link.name, c) for c in site.links.connections() if c.link is not None]
        conns = [c for _, c in sorted(named, key=lambda nc: str(nc[0]))]
        first = min(conns, key=lambda c: c.connected_at) if conns else None
        features: set[str] = set()
        for c in conns:
            if c.session is not None:
                features |= c.session.features
        return {
            "gateway": str(site.gateway),
            "peer": ", ".join(c.peer for c in conns),
            "transport": _transport_of(conns),
            "networks": [str(n) for n in site.networks],
            "features": sorted(features),
            # its oldest link: the gateway has been reachable at least that long
            **self._since(
                first.connected_wall if first else time.time(),
                first.connected_at if first else time.monotonic(),
            ),
            **_traffic(conns),
            # each link has its own
            "rtt_ms": None,
            "kcp": None,
            "links": [self.link_view(c) for c in conns],
        }

    def _since(self, wall: float, mono: float) -> dict[str, Any]:
        return {
            "connected_at": rfc3339(wall),
            "uptime": round(max(0.0, time.monotonic() - mono), 3),
        }

    def gateways(self) -> list[dict[str, Any]]:
        r = self.router
        views: list[tuple[Any, dict[str, Any]]] = [
            (addr, self.gateway_view(conn)) for addr, conn in r.by_gateway.items()
        ]
        views += [(addr, self.site_view(site)) for addr, site in r.sites.items()]
        views.sort(key=lambda av: (av[0].version, int(av[0])))
        return [view for _, view in views]

    def routes(self) -> list[dict[str, Any]]:
        from polevpn.router.router import Site

        table = sorted(self.router.routes.routes(), key=lambda nv: _network_key(nv[0]))
        out = []
        for net, target in table:
            # a plain gateway's connection, or a multi-link gateway's site
            links = target.links.connections() if isinstance(target, Site) else [target]
            out.append(
                {
                    "network": str(net),
                    "gateway": str(target.gateway),
                    "transport": _transport_of(links),
                }
            )
        return out

    # -- handlers

    async def _status(self, request: Request) -> Reply:
        return _ok(self.status())

    async def _gateways(self, request: Request) -> Reply:
        return _ok({"gateways": self.gateways()})

    async def _gateway(self, request: Request) -> Reply:
        text = request.params["address"]
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            addr = None
        if addr is not None:
            conn = self.router.by_gateway.get(addr)
            if conn is not None:
                return _ok(self.gateway_view(conn))
            site = self.router.sites.get(addr)
            if site is not None:
                return _ok(self.site_view(site))
        raise HttpError(404, f"no registered gateway {text!r}")

    async def _routes(self, request: Request) -> Reply:
        return _ok({"routes": self.routes()})

    async def _reload(self, request: Request) -> Reply:
        log.info("reload requested over the API")
        try:
            changes = self.router.reload()
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


async def serve(router: Router, listen: tuple[str, int]) -> ApiServer:
    server = ApiServer(router)
    await server.start(*listen)
    return server

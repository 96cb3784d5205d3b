"""The router (hub): accepts gateways over TLS and forwards IP packets between them.

The protocol logic lives in ``session.ServerSession``, the table in ``routing``, who may
announce what in ``auth`` and the connection limits in ``limits``; this module wires them to
asyncio transports. Forwarding, the hot path, is ``forwarding.forward``: it reads source
and destination straight out of each packet, drops spoofed sources and returns the frames
per destination connection, which ``Router.forward`` writes with one call each.

The router accepts TCP connections itself, so that each is counted against the
pending-connection limits (and refused) before any TLS work is spent on it; an admitted
socket is handed to ``loop.connect_accepted_socket`` for the handshake. (uvloop's
``start_tls`` cannot take over a server-side connection: the ClientHello is read before the
TLS protocol is installed.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from polevpn.cluster.member import ClusterMember
from polevpn.cluster.peers import PeerLink, PeerLinks, channel_binding
from polevpn.cluster.routes import RemoteRoutes
from polevpn.common.counters import Counters
from polevpn.common.logfmt import endpoint, kv
from polevpn.config import (
    ClusterConfig,
    ConfigError,
    RouterConfig,
    load_router_config,
    reloading,
    set_log_level,
)
from polevpn.direct import messages as direct_messages
from polevpn.direct.rendezvous import Rendezvous, Send
from polevpn.host import memory, netconf, privileges
from polevpn.io import linksock, tcpcc, udpsock
from polevpn.io.kcp_transport import KcpServer
from polevpn.io.tlsconf import server_context
from polevpn.io.tun import Tun, TunDevice
from polevpn.kcp import dtls
from polevpn.kcp.kcp_link import urgent_frames
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.packet.gso import VNET_HDR_LEN as _VNET
from polevpn.packet.routing import IPAddress, NetworkSet, RouteTable, announcement_error
from polevpn.proto import wire
from polevpn.proto.certs import cert_fingerprint
from polevpn.proto.messages import (
    FEATURE_DIRECT,
    FEATURE_MULTILINK,
    FEATURE_SUPER,
    FEATURE_UNORDERED,
)
from polevpn.proto.peering import PeerCredentials
from polevpn.proto.session import (
    AuthFailed,
    AuthSucceeded,
    ConnectionLost,
    DirectFrame,
    PeerAuthenticated,
    RegisterRequested,
    ServerSession,
    State,
)
from polevpn.router.forwarding import Forwarded, forward
from polevpn.router.limits import Admission, source_key
from polevpn.router.local import LocalEndpoint, conflict
from polevpn.router.sitelinks import LinkInfo, Site, TooManyLinks

if TYPE_CHECKING:
    from polevpn.kcp.kcp_link import KcpLink

log = logging.getLogger("polevpn.router")

_HDR = wire.HEADER_LEN

# how often the links' silence is checked: a link is found down within this of its timeout
LINK_CHECK_INTERVAL = 0.1


@dataclass
class RouterStats(Counters):
    """The router's counters. ``packets_forwarded`` / ``bytes_forwarded`` are the IP packets
    and bytes the router itself wrote to a destination (a gateway, or its own TUN): what
    it relayed, data only, never a control frame. Packets two offices exchange over a
    direct path (docs/protocol.md section 18) never reach the router and are not in them:
    they are /api/v1/status ``counters.bytes_forwarded`` and /metrics
    ``polevpn_router_forwarded_bytes_total``; per gateway, ``bytes_out`` of
    /api/v1/gateways/{address} and ``polevpn_router_gateway_sent_bytes_total``."""

    connections_accepted: int = 0
    accept_errors: int = 0
    connections_closed: int = 0
    handshake_failures: int = 0
    handshake_timeouts: int = 0
    auth_failures: int = 0
    auth_timeouts: int = 0
    idle_timeouts: int = 0
    registrations: int = 0
    register_refused: int = 0
    # closed for sending REGISTER faster than session.REGISTER_BURST/REGISTER_RATE allow
    register_flood: int = 0
    # registered connections closed because a reload withdrew their credentials
    revoked: int = 0
    replaced: int = 0
    malformed_frames: int = 0
    oversized_frames: int = 0
    # closed because it sent control frames faster than it read the replies
    closed_unread: int = 0
    packets_forwarded: int = 0
    bytes_forwarded: int = 0
    dropped_no_route: int = 0
    dropped_spoofed: int = 0
    dropped_malformed: int = 0
    dropped_queue_full: int = 0
    dropped_hairpin: int = 0
    # IP packets of 65,528 bytes or more, which fit a super-packet but no PoleVPN frame,
    # for a gateway without super-packets
    dropped_oversized: int = 0
    # IPv6 from :: or fe80::/10 that the gateway did not register: its host's own MLD reports
    # and solicitations, link-scope chatter that is never forwarded (and is no attack)
    dropped_link_local: int = 0
    dropped_unregistered: int = 0
    # from a connection the router is closing (replaced by a newer one of its gateway or
    # link, say): stale, never forwarded
    dropped_closing: int = 0
    # to a multi-link gateway none of whose links is up
    dropped_links_down: int = 0
    # from another router of the cluster, for a third router (never passed on)
    dropped_peer_transit: int = 0
    # super-packets cut into plain packets for a gateway that did not negotiate them
    segmented: int = 0
    # links of multi-link gateways that fell silent (and were given up for the others)
    links_down: int = 0
    # the router's own TUN ("tun" in the config): IP packets and bytes read from it and
    # written to it (those written are in packets_forwarded too), and what the kernel refused
    tun_packets_in: int = 0
    tun_bytes_in: int = 0
    tun_packets_out: int = 0
    tun_bytes_out: int = 0
    tun_write_dropped: int = 0
    tun_write_errors: int = 0


class Endpoint(Protocol):
    """A source of ``Router.forward``: a gateway's connection, "local" or a router link."""

    bytes_in: int
    router_link: bool


class TunSetupError(OSError):
    """The router's TUN could not be opened or configured at start."""


class GatewayConnection(asyncio.Protocol):
    """One gateway's connection (tls or kcp), as seen by the router.

    It holds one of the router's pending-connection slots for ``source`` from acceptance
    until it registers or closes.
    """

    # a gateway, not a link to another router (cluster.peers.PeerLink): see forwarding
    router_link = False

    def __init__(
        self, router: Router, transport_name: str, accepted_at: float | None = None
    ) -> None:
        self.router = router
        self.transport_name = transport_name
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.source = "?"
        self.holds_slot = True
        self.accepted_at = accepted_at
        self.fingerprint: bytes | None = None
        self.session: ServerSession | None = None
        self.gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.prefixes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        # what REGISTER presented, so that a reload can check it against new credentials
        self.register_key = ""
        self.networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
        # sources this gateway may send from: what it registered
        self.sources = NetworkSet(())
        # one link of a multi-link gateway (its site), or None for a plain gateway
        self.link: LinkInfo | None = None
        self.site: Site | None = None
        self.link_up = True
        self.link_downs = 0
        self.link_timeout = 1.0
        self.connected_at = 0.0
        self.connected_wall = 0.0
        self.packets_in = 0
        self.packets_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.closing = False
        # a router of the cluster proved itself on this connection: it is a router link
        # now (cluster.peers), and this object has nothing more to do with it
        self.handed_over: PeerLink | None = None
        # set from the config when the connection is made; a link's is shorter
        self.queue_limit = router.cfg.send_queue_bytes
        # a kcp:// session with congestion control: its queue is bounded by time too
        self.kcp_link: KcpLink | None = None
        # the gateway it registered, while it agreed direct paths and the router's
        # rendezvous holds it (forward asks this of sources and destinations)
        self.direct: IPAddress | None = None

    def __repr__(self) -> str:
        return f"<gateway {self.gateway or '-'} {self.peer}>"

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self.transport = transport  # type: ignore[assignment]
        kcp_link = transport.get_extra_info("kcp_link")
        if kcp_link is not None and kcp_link.queue_budget is not None:
            self.kcp_link = kcp_link
        peer = transport.get_extra_info("peername")
        self.peer = endpoint(peer)
        if peer:
            self.source = source_key(peer[0])
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is not None:
            der = ssl_obj.getpeercert(binary_form=True)
        else:
            der = transport.get_extra_info("peercert_der")
        self.fingerprint = cert_fingerprint(der)
        now = time.monotonic()
        self.connected_at = now
        # for the API: a wall-clock time derived from the uptime would drift per request
        self.connected_wall = time.time()
        router, fingerprint = self.router, self.fingerprint
        self.session = ServerSession(
            # the authority of the moment: a reload may have replaced it since the accept
            lambda key: router.authority.authenticate(key, fingerprint),
            # the AUTH deadline runs from the TCP accept, so TLS and AUTH share one budget
            self.accepted_at if self.accepted_at is not None else now,
            # out-of-order delivery: a kcp:// session only (tls:// delivers in order)
            self.router.features | {FEATURE_UNORDERED}
            if kcp_link is not None and self.router.cfg.kcp_params.unordered != "off"
            else self.router.features,
            # another router of the cluster may dial in here (tls:// only: the proofs
            # cover the TLS channel binding)
            peer=(lambda: router.peer_credentials) if router.peers is not None else None,
            binding=channel_binding(transport) if router.peers is not None else None,
        )
        limit = self.router.cfg.send_queue_bytes
        transport.set_write_buffer_limits(high=limit, low=limit // 2)
        self.router.on_connect(self)

    def release_slot(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.router.admission.release(self.source)

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception:
            # a bug reached by one peer's bytes costs that peer its connection, nothing more
            log.exception("internal error handling data; closing it", extra=kv(peer=self.peer))
            self.router.stats.malformed_frames += 1
            self.close(None)

    def _received(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        packets, events = session.receive(data, time.monotonic())
        if self.closing:
            # closed by the router: replaced by a newer connection of its gateway or link,
            # refused or revoked. What it still sends is stale (a transport hands over
            # what it had buffered while it shuts down), and it is no link any more
            self.router.stats.dropped_closing += len(packets)
            return
        if not self.link_up:
            self.router.link_heard(self)
        if events:
            for ev in events:
                self.router.on_event(self, ev)
            if self.handed_over is not None:
                # what came after the handshake in the same read is the link's
                if packets:
                    self.handed_over.take(packets)
                return
        if packets:
            self.packets_in += len(packets)
            self.router.forward(self, packets)
        if session.outbox:
            self._write_control(session.data_to_send())
        if session.state is State.CLOSED and not self.closing:
            self.close(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.release_slot()
        if self.session is not None:
            self.router.on_disconnect(self, exc)
        # break the transport <-> protocol cycle now rather than at the next full GC
        self.transport = None

    # -- output

    def _write_control(self, frames: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > self.queue_limit:
            # replies it does not read (heartbeats, say) would otherwise pile up here
            self.router.stats.closed_unread += 1
            self.close("sends control frames without reading the replies", abort=True)
            return
        transport.write(b"".join(frames))

    @property
    def super_packets(self) -> bool:
        """Whether it negotiated super-packets: it is sent SUPER_IPDATA frames as they are."""
        session = self.session
        return session is not None and session.super_packets

    def send_batch(self, parts: list[bytes | memoryview], supers: int) -> None:
        """Write frames from ``Router.forward`` (headers and bodies, alternating; ``supers``
        of them SUPER_IPDATA) with one call, as far as the queue limit lets them in; the
        rest are dropped and counted."""
        stats = self.router.stats
        transport = self.transport
        if transport is None or self.closing:
            stats.dropped_queue_full += len(parts) // 2
            return
        # one write means one TLS record stream instead of a record per frame
        data = b"".join(parts)
        limit = self.queue_limit
        kcp_link = self.kcp_link
        if kcp_link is not None:
            # a few tens of ms at the line's rate, not megabytes (bufferbloat, issue 16)
            limit = min(limit, kcp_link.queue_budget)
        room = limit - transport.get_write_buffer_size()
        if len(data) > room:
            # a slow gateway loses its own packets; it never holds up anyone else. The
            # limit holds for the batch as it is, however many frames one read turned into
            kept, supers = wire.fitting(parts, supers, room)
            fitted = parts[:kept]
            if kcp_link is not None and kept < len(parts):
                # urgent packets (a ping, a TCP ACK) still go, ahead of the queue, within
                # its headroom (KcpLink.urgent_budget)
                used = sum(map(len, fitted))
                fitted += urgent_frames(parts, kept, kcp_link.urgent_room() - used)
            stats.dropped_queue_full += (len(parts) - len(fitted)) // 2
            if not fitted:
                return
            parts = fitted
            data = b"".join(parts)
        count = len(parts) // 2
        ip_bytes = len(data) - count * _HDR - supers * _VNET
        self.bytes_out += ip_bytes
        self.packets_out += count
        stats.packets_forwarded += count
        stats.bytes_forwarded += ip_bytes
        transport.write(data)

    def send_control(self, frame: bytes) -> None:
        """A control frame from the router itself (direct paths), after whatever the
        session has queued; nothing when the connection is closing."""
        transport = self.transport
        if transport is None or self.closing or transport.is_closing():
            return
        session = self.session
        if session is not None and session.outbox:
            transport.write(b"".join(session.data_to_send()))
        transport.write(frame)

    def close(self, reason: str | None, abort: bool = False) -> None:
        """Close after flushing what is queued (an error frame, say), or at once with
        ``abort``. A peer that stops reading cannot hold a closing connection open: it is
        aborted after ``auth_timeout``."""
        if self.closing:
            return
        self.closing = True
        if reason:
            log.info(
                "closing connection", extra=kv(peer=self.peer, gateway=self.gateway, reason=reason)
            )
        # its routes go now: the close itself may wait on a peer that no longer answers
        self.router.withdraw(self)
        transport = self.transport
        if transport is None:
            return
        if abort:
            if self.transport_name == "kcp":
                # kcp's close sends one close_notify and waits for nothing; it saves a
                # live peer its own timeout
                transport.close()
            else:
                transport.abort()
            return
        if self.session is not None and self.session.outbox:
            out = self.session.data_to_send()
            if not transport.is_closing():
                transport.write(b"".join(out))
        transport.close()
        asyncio.get_running_loop().call_later(self.router.cfg.auth_timeout, transport.abort)


class Service(Protocol):
    """What the entry point runs next to the router (the ops servers, polevpn.cli): opened
    once the listeners are up and before privileges are dropped (so a port below 1024
    works), closed when the router stops. The router knows nothing else of them."""

    async def open(self) -> None: ...

    def close(self) -> None: ...


class Router:
    def __init__(self, cfg: RouterConfig) -> None:
        # a network leads to a plain gateway's connection, or to a multi-link gateway's site
        self.routes: RouteTable[GatewayConnection | Site] = RouteTable()
        self.by_gateway: dict[IPAddress, GatewayConnection] = {}
        self.sites: dict[IPAddress, Site] = {}
        self.connections: set[GatewayConnection] = set()
        self.stats = RouterStats()
        self.listen_sockets: list[socket.socket] = []
        self.kcp_server: KcpServer | None = None
        self._kcp_udp: udpsock.UdpEndpoint | None = None
        self.kcp_pool = KcpPool()
        self._tasks: list[asyncio.Task] = []
        # TLS upgrades under way; held here because the loop keeps only weak references
        self._upgrades: set[asyncio.Task] = set()
        self._tls_ctx: ssl.SSLContext | None = None
        # the tls:// sockets' congestion control, decided at start (_start_tls)
        self.congestion: tcpcc.Choice | None = None
        self._take(cfg)
        self.admission = Admission(cfg.limits)
        self.services: Sequence[Service] = ()
        # the router's own TUN and its pseudo-gateway "local"; None unless cfg.tun is set
        self.tun: Tun | None = None
        self.local: LocalEndpoint | None = None
        # this router's part in a cluster (cfg.cluster); None for a router alone. With it:
        # the other routers' routes, installed in ``routes`` below every local claim, and
        # the links to those routers
        self.cluster: ClusterMember | None = None
        self.remote: RemoteRoutes | None = None
        self.peers: PeerLinks | None = None
        # direct paths between gateways (cfg.direct): the rendezvous, with the kcp://
        # listener (where the endpoint probes go); None without one
        self.rendezvous: Rendezvous | None = None

    def _take(self, cfg: RouterConfig) -> None:
        """The config and what follows from it alone: at start, and again on reload."""
        self.cfg = cfg
        offered = {
            FEATURE_SUPER: cfg.super_packets,
            FEATURE_MULTILINK: cfg.multi_link,
            # the endpoint probes go to the kcp:// listener's UDP port
            FEATURE_DIRECT: cfg.direct.enable and cfg.kcp.enable,
        }
        self.features = frozenset(name for name, on in offered.items() if on)
        self.authority = cfg.authority()
        peers = getattr(self, "peers", None)
        creds = self.peer_credentials
        if peers is not None and creds is not None:
            # a rotated cluster credential counts from the next handshake on
            peers.set_credentials(creds)

    @property
    def peer_credentials(self) -> PeerCredentials | None:
        """What this router proves itself with to the other routers of its cluster now."""
        c = self.cfg.cluster
        if c is None:
            return None
        return PeerCredentials(c.name, c.router_id, c.peer_key, c.peer_key_previous)

    # -- lifecycle

    async def start(self, services: Sequence[Service] = ()) -> None:
        for warning in self.cfg.warnings:
            log.warning("%s", warning)
        if self.cfg.tun is not None:
            # needs CAP_NET_ADMIN: before privileges are dropped
            await self._start_tun()
        if self.cfg.tls.enable:
            await self._start_tls()
        if self.cfg.kcp.enable:
            await self._start_kcp()
        self._start_direct()
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self._tasks.append(asyncio.create_task(self._watch_links()))
        if self.cfg.cluster is not None:
            self._join_cluster()
        self.services = services
        for service in services:
            # before dropping privileges, so that a port below 1024 works
            await service.open()
        self._drop_privileges()

    def _drop_privileges(self) -> None:
        """Sockets are bound and keys loaded: nothing left that needs root."""
        if os.geteuid() != 0:
            return
        if self.cfg.user is None:
            log.warning(
                'running as root: set "user" in the config to drop privileges once listening',
                extra=kv(config=self.cfg.path),
            )
            return
        uid, gid = privileges.drop_to_user(self.cfg.user)
        log.info("dropped privileges", extra=kv(user=self.cfg.user, uid=uid, gid=gid))

    async def _start_kcp(self) -> None:
        kcp = self.cfg.kcp
        assert kcp.cert_file is not None and kcp.key_file is not None
        ctx, jar = dtls.server_context(
            kcp.cert_file, kcp.key_file, client_ca=self.cfg.client_ca_file
        )
        server = KcpServer(
            ctx,
            jar,
            self.cfg.kcp_params,
            # the AUTH deadline runs from the cookie, as the handshake's does: one budget
            lambda started: GatewayConnection(self, "kcp", accepted_at=started),
            handshake_timeout=self.cfg.auth_timeout,
            pool=self.kcp_pool,
            admit=self._admit_kcp,
            release=lambda addr: self.admission.release(source_key(addr[0])),
            limits=self.cfg.kcp_handshakes,
            known=lambda addr: self.admission.is_known(source_key(addr[0]), time.monotonic()),
        )
        # our own reader: replies leave from the address each peer sent to (udpsock)
        udp = await udpsock.open_endpoint(server, kcp.host, kcp.port)
        self.kcp_server = server
        self._kcp_udp = udp
        host, port = udp.get_extra_info("sockname")[:2]
        fec = self.cfg.kcp_params.fec
        log.info(
            "listening",
            extra=kv(
                transport="kcp",
                address=host,
                port=port,
                fec=f"{fec.mode}:{fec.data_shards}+{fec.parity_shards}" if fec.enabled else "off",
            ),
        )

    def _start_direct(self) -> None:
        d = self.cfg.direct
        if self.kcp_server is None:
            if d.enable:
                log.info(
                    "direct paths off: they need the kcp listener (endpoint probes go to "
                    "its UDP port)",
                    extra=kv(config=self.cfg.path),
                )
            return
        self.rendezvous = Rendezvous(self.kcp_port, d.enable, d.lifetime, d.max_pairs)
        self.kcp_server.direct = self._direct_probe

    def _direct_probe(self, data: bytes, addr: tuple) -> bytes | None:
        """An ENDPOINT_PROBE on the kcp:// port (KcpServer.direct): the reply, or None."""
        rdv = self.rendezvous
        if rdv is None:
            return None
        try:
            src = direct_messages.Endpoint.from_sockaddr(addr)
        except direct_messages.DirectMessageError:
            rdv.registry.refused_malformed += 1
            return None
        return rdv.probe(data, src, time.monotonic())

    def _send_direct(self, sends: list[Send]) -> None:
        for s in sends:
            s.conn.send_control(s.frame)  # type: ignore[attr-defined]

    def _direct_frame(self, conn: GatewayConnection, ev: DirectFrame) -> None:
        rdv = self.rendezvous
        if rdv is None or conn.direct is None:
            if conn.session is not None:
                conn.session.unknown_commands += 1
            return
        try:
            sends = rdv.frame(conn.direct, ev.command, ev.body, time.monotonic())
        except direct_messages.DirectMessageError as exc:
            # malformed like a bad REGISTER: a protocol violation, this connection only
            self.stats.malformed_frames += 1
            log.warning("protocol error", extra=kv(peer=conn.peer, reason=exc))
            conn.close(f"bad direct-path frame: {exc}")
            return
        self._send_direct(sends)

    def _direct_registered(self, conn: GatewayConnection, gateway: IPAddress, prefixes) -> None:
        """``conn`` registered ``gateway``: the rendezvous takes it if it agreed direct."""
        rdv = self.rendezvous
        assert conn.session is not None
        now = time.monotonic()
        if conn.direct is not None and conn.direct != gateway:
            # the same connection registers another gateway now
            self._send_direct(rdv.connection_closed(conn.direct, conn, now) if rdv else [])
            conn.direct = None
        if rdv is None or FEATURE_DIRECT not in conn.session.features:
            return
        grant = self.authority.grants.get(gateway)
        allowed = grant.direct if grant is not None else True
        conn.direct = gateway
        self._send_direct(rdv.gateway_up(gateway, conn, prefixes, allowed, now))

    def _reload_direct(self, old_grants: dict) -> None:
        """A reload: the direct section, and the grants of the gateways the rendezvous
        holds (changed or removed: their pairs are revoked)."""
        rdv = self.rendezvous
        if rdv is None:
            return
        now = time.monotonic()
        d = self.cfg.direct
        sends = rdv.reconfigure(d.enable, d.lifetime, d.max_pairs, now)
        sends += rdv.grants_changed(old_grants, self.authority.grants, now)
        self._send_direct(sends)

    @property
    def kcp_port(self) -> int:
        assert self._kcp_udp is not None
        return self._kcp_udp.get_extra_info("sockname")[1]

    def _set_congestion(self, listener: socket.socket) -> None:
        """The configured congestion control on a tls:// listener, decided (and logged) on
        the first: accepted sockets inherit it, and it is set here, before privileges are
        dropped, because an unprivileged process may not set every algorithm."""
        if self.congestion is None:
            self.congestion = tcpcc.decide(self.cfg.tcp_congestion)
            self.congestion.log(log, self.cfg.path)
        tcpcc.apply(listener, self.congestion)

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        tls = self.cfg.tls
        assert tls.cert_file is not None and tls.key_file is not None
        self._tls_ctx = server_context(tls.cert_file, tls.key_file, self.cfg.client_ca_file)
        infos = await loop.getaddrinfo(
            tls.host, tls.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        infos = list(dict.fromkeys(infos))
        both = {info[0] for info in infos} >= {socket.AF_INET, socket.AF_INET6}
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # an IPv6 socket next to an IPv4 one of the same name serves IPv6 only
                    # (as asyncio does); "[::]" alone serves both families, as kcp:// does
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if both else 0)
                sock.bind(addr)
                self._set_congestion(sock)
                sock.listen(1024)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            self.listen_sockets.append(sock)
            host, port = sock.getsockname()[:2]
            log.info("listening", extra=kv(transport="tls", address=host, port=port))
        for sock in self.listen_sockets:
            self._tasks.append(asyncio.create_task(self._accept_loop(sock)))

    @property
    def tls_port(self) -> int:
        return self.listen_sockets[0].getsockname()[1]

    # -- admission

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:
                # out of file descriptors, say: existing gateways go on; retry shortly
                n = self.stats.accept_errors = self.stats.accept_errors + 1
                if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th...: the log stays readable
                    log.warning("accept failed", extra=kv(times=n, error=exc))
                await asyncio.sleep(0.1)
                continue
            self.accept_tls(sock, addr)

    def accept_tls(self, sock: socket.socket, addr: tuple) -> None:
        """A new TCP connection: refuse it, or start its TLS handshake."""
        now = time.monotonic()
        source = source_key(addr[0]) if addr else "?"
        refused = self.admission.admit(source, now)
        if refused is not None:
            log.debug("refused tls connection", extra=kv(source=source, reason=refused))
            # a reset rather than a close: nothing of it stays behind in TIME_WAIT here
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            sock.close()
            return
        task = asyncio.get_running_loop().create_task(self._handshake(sock, source, now))
        self._upgrades.add(task)
        task.add_done_callback(self._upgrades.discard)

    async def _first_bytes(self, sock: socket.socket) -> bool:
        """Whether the client's first bytes, a TLS handshake record, come within
        ``limits.pre_tls_timeout``: an idle TCP connection holds its pending slot for that
        long, not for the whole ``auth_timeout``."""
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        pre_tls, whole = self.cfg.limits.pre_tls_timeout, self.cfg.auth_timeout
        try:
            await asyncio.wait_for(readable, min(pre_tls, whole))
        except TimeoutError:
            self.stats.handshake_timeouts += 1
            if pre_tls < whole:
                self.admission.stats.pre_tls_timeouts += 1
            return False
        finally:
            loop.remove_reader(fd)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True  # not readable after all: the TLS handshake timeout decides
        except OSError:
            first = b""
        if first != b"\x16":  # closed, or not a TLS handshake record
            self.stats.handshake_failures += 1
            return False
        return True

    async def _handshake(self, sock: socket.socket, source: str, now: float) -> None:
        try:
            first = await self._first_bytes(sock)
        except asyncio.CancelledError:
            sock.close()
            self.admission.release(source)
            raise
        if not first:
            # a reset, as for a refused connection: nothing stays behind in TIME_WAIT
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            sock.close()
            self.admission.release(source)
            return
        conn = GatewayConnection(self, "tls", accepted_at=now)
        conn.source = source
        loop = asyncio.get_running_loop()
        assert self._tls_ctx is not None
        try:
            await loop.connect_accepted_socket(
                lambda: conn,
                sock,
                ssl=self._tls_ctx,
                ssl_handshake_timeout=max(0.1, self.cfg.auth_timeout - (time.monotonic() - now)),
            )
        except Exception as exc:
            # timeouts surface as ConnectionAbortedError; tell them apart by the clock
            if time.monotonic() - now >= self.cfg.auth_timeout * 0.99:
                self.stats.handshake_timeouts += 1
            else:
                self.stats.handshake_failures += 1
            log.debug("tls handshake failed", extra=kv(source=source, error=repr(exc)))
            conn.release_slot()

    def _admit_kcp(self, addr: tuple) -> bool:
        source = source_key(addr[0])
        refused = self.admission.admit(source, time.monotonic())
        if refused is not None:
            log.debug("refused kcp handshake", extra=kv(source=source, reason=refused))
            return False
        return True

    async def stop(self) -> None:
        if self.peers is not None:
            self.peers.close()
        for conn in list(self.connections):
            conn.close("router shutting down")
        for task in self._tasks:
            task.cancel()
        for task in list(self._upgrades):
            task.cancel()
        if self._kcp_udp is not None:
            self._kcp_udp.close()
        for sock in self.listen_sockets:
            sock.close()
        for service in self.services:
            service.close()
        self._stop_tun()
        if self.cluster is not None:
            # the lease revoked: this router's keys vanish from the store at once
            await self.cluster.stop()
        log.info("stopped", extra=kv(**self.stats.fields()))

    # -- reload

    def reload(self) -> list[str]:
        """Re-read the config file and apply it; returns what changed, one line each.

        An invalid file raises ConfigError and changes nothing. Connections stay up unless
        the new credentials no longer allow what they registered: those are closed (and
        their routes withdrawn) with the reason in the log.
        """
        plan = reloading.plan(self.cfg, load_router_config(self.cfg.path))
        cfg = plan.config
        old_cluster = self.cfg.cluster
        old_grants = dict(self.authority.grants)
        # certificates are read again on every reload (renewed files keep their names);
        # one that fails to load fails the reload before anything has changed
        tls_ctx = dtls_ctx = None
        try:
            if self._tls_ctx is not None:
                assert cfg.tls.cert_file is not None and cfg.tls.key_file is not None
                tls_ctx = server_context(cfg.tls.cert_file, cfg.tls.key_file, cfg.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(cfg.path, "tls.cert_file", f"cannot load: {exc}") from None
        try:
            if self.kcp_server is not None:
                assert cfg.kcp.cert_file is not None and cfg.kcp.key_file is not None
                # one cookie jar for the server's life: cookies issued before the reload
                # stay valid, and stay bound to their address
                dtls_ctx = dtls.server_context(
                    cfg.kcp.cert_file,
                    cfg.kcp.key_file,
                    client_ca=cfg.client_ca_file,
                    jar=self.kcp_server.listener.jar,
                )
        except Exception as exc:  # pyOpenSSL raises its own errors, and OSError
            raise ConfigError(cfg.path, "kcp.cert_file", f"cannot load: {exc}") from None
        self._take(cfg)
        if tls_ctx is not None:
            self._tls_ctx = tls_ctx
        if self.kcp_server is not None and dtls_ctx is not None:
            self.kcp_server.set_context(*dtls_ctx)
            self.kcp_server.handshake_timeout = cfg.auth_timeout
            self.kcp_server.slots.limits = cfg.kcp_handshakes
        self.admission.params = cfg.limits
        for conn in self.connections:
            conn.queue_limit = self._queue_limit(conn)
        set_log_level(cfg.log_level)
        changes = plan.describe()
        for warning in cfg.warnings:
            log.warning("%s", warning)
        # before the recheck closes what the new grants refuse: their peers hear reason 1
        self._reload_direct(old_grants)
        for line in self._recheck():
            changes.append(line)
        if plan.changed("cluster"):
            self._reload_cluster(old_cluster)
        reloading.log_changes(log, cfg.path, changes)
        return changes

    def _recheck(self) -> list[str]:
        """Close the registered connections the new credentials refuse."""
        closed = []
        for conn in list(self.connections):
            if conn.gateway is None or conn.closing:
                continue
            decision = self.authority.authorize(
                conn.register_key, conn.fingerprint, conn.gateway, conn.networks
            )
            if decision.error is None:
                continue
            self.stats.revoked += 1
            closed.append(f"closed gateway {conn.gateway}: {decision.error}")
            # a revoked holder keeps no reserved pending or kcp:// handshake slots
            self.admission.forget(conn.source)
            conn.close(f"no longer allowed after reload: {decision.error}")
        return closed

    def _live(self) -> int:
        """Connections, pending TCP connections and kcp:// handshakes and sessions now."""
        n = len(self.connections) + self.admission.pending
        if self.kcp_server is not None:
            n += len(self.kcp_server.pending) + len(self.kcp_server.sessions)
        return n

    async def _housekeeping(self) -> None:
        next_stats = time.monotonic() + self.cfg.stats_interval
        trim, trim_policy = memory.malloc_trim(), memory.TrimPolicy()
        while True:
            # the config of the moment: a reload may change the timeouts and the interval
            cfg = self.cfg
            await asyncio.sleep(max(0.05, min(1.0, cfg.idle_timeout / 4, cfg.auth_timeout / 4)))
            cfg = self.cfg
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.session is None or conn.closing:
                    continue
                registered = conn.session.state is State.REGISTERED
                reason = conn.session.check_timeouts(now, cfg.auth_timeout, cfg.idle_timeout)
                if reason:
                    if registered:
                        self.stats.idle_timeouts += 1
                    else:
                        self.stats.auth_timeouts += 1
                    # a silent peer would never acknowledge a TLS close_notify
                    conn.close(reason, abort=True)
            if self.rendezvous is not None:
                self._send_direct(self.rendezvous.handle_timer(now))
            if trim is not None and trim_policy.due(self._live(), now):
                trim()
            if cfg.stats_interval and now >= next_stats:
                next_stats = now + cfg.stats_interval
                log.info(
                    "stats",
                    extra=kv(
                        connections=len(self.connections),
                        routes=len(self.routes),
                        pending=self.admission.pending,
                        **self.stats.fields(),
                        **self.admission.stats.fields(),
                        **(self.peers.stats.fields("peer_") if self.peers is not None else {}),
                        **(
                            {**self.kcp_server.counters().fields("kcp_"), **self._fec_totals()}
                            if self.kcp_server
                            else {}
                        ),
                    ),
                )

    def _fec_totals(self) -> dict[str, int]:
        """FEC counters summed over the live kcp:// sessions."""
        assert self.kcp_server is not None
        recovered = parity_sent = unrecoverable = 0
        for t in self.kcp_server.sessions.values():
            fec = t.link.fec
            if fec is not None:
                recovered += fec.stats.recovered
                parity_sent += fec.stats.parity_sent
                unrecoverable += fec.stats.unrecoverable
        return {
            "fec_recovered": recovered,
            "fec_parity_sent": parity_sent,
            "fec_unrecoverable": unrecoverable,
        }

    # -- control plane

    def on_connect(self, conn: GatewayConnection) -> None:
        self.stats.connections_accepted += 1
        self.connections.add(conn)
        log.debug("connection", extra=kv(peer=conn.peer))

    def on_event(self, conn: GatewayConnection, ev: object) -> None:
        if isinstance(ev, RegisterRequested):
            self._register(conn, ev)
        elif isinstance(ev, DirectFrame):
            self._direct_frame(conn, ev)
        elif isinstance(ev, PeerAuthenticated):
            self._hand_over(conn)
        elif isinstance(ev, AuthSucceeded):
            if conn.transport_name == "kcp" and conn.transport is not None:
                # kcp:// sessions keep a small receive window and decode no FEC until now
                conn.transport.authenticated = True  # type: ignore[attr-defined]
                if FEATURE_UNORDERED in conn.session.features:
                    kcp_link = conn.transport.get_extra_info("kcp_link")
                    if kcp_link is not None:
                        kcp_link.unordered_send = True
            # its source keeps a share of the pending slots that strangers cannot take
            self.admission.authenticated(conn.source, time.monotonic())
        elif isinstance(ev, AuthFailed):
            self.stats.auth_failures += 1
            if ev.peer and self.peers is not None:
                self.peers.refused()
            log.warning(
                "auth rejected",
                extra=kv(peer=conn.peer, reason=ev.reason, **({"router": 1} if ev.peer else {})),
            )
            self._failed(conn)
        elif isinstance(ev, ConnectionLost):
            if ev.kind == "oversized":
                self.stats.oversized_frames += 1
            elif ev.kind == "flood":
                self.stats.register_flood += 1
            else:
                self.stats.malformed_frames += 1
            log.warning("protocol error", extra=kv(peer=conn.peer, reason=ev.reason))

    def _hand_over(self, conn: GatewayConnection) -> None:
        """Another router of the cluster proved itself on ``conn``: the connection leaves
        the gateways' world (and the pending-connection limits) for cluster.peers."""
        assert self.peers is not None and conn.session is not None
        conn.closing = True
        conn.release_slot()
        self.admission.authenticated(conn.source, time.monotonic())
        self.connections.discard(conn)
        transport, session = conn.transport, conn.session
        conn.transport = None
        assert transport is not None
        conn.handed_over = self.peers.adopt(transport, session, conn.peer)

    def _failed(self, conn: GatewayConnection) -> None:
        """Credentials refused: count it against the source's AUTH failure budget."""
        if self.admission.failure(conn.source, time.monotonic()):
            p = self.cfg.limits
            log.warning(
                "blocked",
                extra=kv(
                    source=conn.source,
                    window=f"{p.auth_failure_window:g}s",
                    failures=p.auth_failures,
                ),
            )

    def _register(self, conn: GatewayConnection, ev: RegisterRequested) -> None:
        req = ev.request
        assert conn.session is not None
        host = ipaddress.ip_network(req.gateway)
        prefixes = [host, *req.networks]
        limits = self.cfg.limits
        too_many = announcement_error(
            prefixes, limits.max_networks_per_gateway, limits.max_prefix_lengths_per_gateway
        )
        if too_many is not None:
            # a config matter, not a credential one: no AUTH failure is counted
            self.stats.register_refused += 1
            log.warning(
                "registration refused",
                extra=kv(gateway=req.gateway, peer=conn.peer, reason=too_many),
            )
            conn.session.reject_register(ev.seq, too_many)
            return
        if self._tun_refuses(conn, ev):
            return
        decision = self.authority.authorize(
            req.key, conn.fingerprint, req.gateway, req.networks
        )
        if decision.error is not None:
            # nothing of it is installed, and an existing registration stays as it is
            self.stats.register_refused += 1
            log.warning(
                "registration refused",
                extra=kv(gateway=req.gateway, peer=conn.peer, reason=decision.error),
            )
            conn.session.reject_register(ev.seq, decision.error)
            self._failed(conn)
            return
        if self._cluster_refuses(conn, ev, prefixes):
            return
        link = req.link if FEATURE_MULTILINK in conn.session.features else None
        if conn.gateway is not None:
            # a second REGISTER on the same connection replaces what it announced before
            self.withdraw(conn)
        if link is None:
            self._replace_all(conn, req.gateway)
            for net in prefixes:
                self.routes.add(net, conn)
            conn.prefixes = prefixes
            self.by_gateway[req.gateway] = conn
        else:
            info = LinkInfo(link.name, link.weight, link.backup)
            try:
                self._join_site(conn, req.gateway, info, prefixes)
            except TooManyLinks as exc:
                self.stats.register_refused += 1
                log.warning(
                    "registration refused",
                    extra=kv(gateway=req.gateway, peer=conn.peer, reason=exc),
                )
                conn.session.reject_register(ev.seq, str(exc))
                return
            conn.link_timeout = link.timeout
        # a link's queue is short; a connection that was a link until now has a plain one
        self._set_queue(conn)
        conn.gateway = req.gateway
        conn.register_key = req.key
        conn.networks = tuple(req.networks)
        conn.sources = NetworkSet(prefixes)
        conn.session.accept_register(ev.seq)
        conn.release_slot()
        self.stats.registrations += 1
        self._direct_registered(conn, req.gateway, prefixes)
        if self.cluster is not None:
            self.cluster.gateway_up(req.gateway, prefixes)
        log.info(
            "registered",
            extra=kv(
                gateway=req.gateway,
                peer=conn.peer,
                transport=conn.transport_name,
                features=",".join(sorted(conn.session.features)) or "-",
                networks=",".join(str(n) for n in req.networks) or "-",
                **(
                    {"link": link.name, "weight": f"{link.weight:g}", "backup": link.backup}
                    if link is not None
                    else {}
                ),
            ),
        )

    def _replace_all(self, conn: GatewayConnection, gateway: IPAddress) -> None:
        """A plain REGISTER: whatever held ``gateway`` before (a connection, or every link of
        a site) is closed, as PoleVPN's router does."""
        olds = []
        old = self.by_gateway.get(gateway)
        if old is not None and old is not conn:
            olds.append(old)
        site = self.sites.get(gateway)
        if site is not None:
            olds += [c for c in site.links.connections() if c is not conn]
            self._drop_site(site)
        for old in olds:
            self._replace(old, conn, f"gateway {gateway}")

    def _replace(self, old: GatewayConnection, conn: GatewayConnection, what: str) -> None:
        """``conn`` registered ``what`` (a gateway, or one link of it) that ``old`` held."""
        self.stats.replaced += 1
        log.info("re-registered", extra=kv(what=what, peer=conn.peer, replaced_peer=old.peer))
        self.withdraw(old)
        old.close("replaced by a new registration")

    def _join_site(
        self, conn: GatewayConnection, gateway: IPAddress, info: LinkInfo, prefixes: list
    ) -> None:
        """A REGISTER naming a link: ``conn`` becomes that link of the gateway's site.

        Raises TooManyLinks before anything has changed.
        """
        site = self.sites.get(gateway)
        if site is None:
            site = Site(gateway)
        replaced = site.links.register(conn, info)
        self.sites[gateway] = site
        plain = self.by_gateway.get(gateway)
        if plain is not None:
            replaced.append(plain)
        for old in replaced:
            # out of the site already: its withdrawal must not touch the site's links
            old.site = None
            self._replace(old, conn, f"gateway {gateway} link {info.name}")
        if site.prefixes != prefixes:
            # every link registers the same networks; the newest registration says which
            for net in site.prefixes:
                self.routes.remove(net, site)
            for net in prefixes:
                self.routes.add(net, site)
            site.prefixes = prefixes
        conn.site = site
        conn.link = info
        conn.link_up = True
        # a new link is up: a site whose routes were given up takes them back
        self._site_claims(site)

    def _set_queue(self, conn: GatewayConnection) -> None:
        conn.queue_limit = limit = self._queue_limit(conn)
        if conn.transport is None:
            return
        if conn.link is None:
            conn.transport.set_write_buffer_limits(high=limit, low=limit // 2)
        else:
            linksock.shorten_queue(conn.transport, limit)

    def _queue_limit(self, conn: GatewayConnection) -> int:
        limit = self.cfg.send_queue_bytes
        return limit if conn.link is None else min(limit, linksock.LINK_QUEUE_BYTES)

    def _drop_site(self, site: Site) -> None:
        for net in site.prefixes:
            self.routes.remove(net, site)
        if site.prefixes and self.cluster is not None:
            self.cluster.gateway_down(site.gateway)
        site.prefixes = []
        if self.sites.get(site.gateway) is site:
            del self.sites[site.gateway]
        for conn in site.links.connections():
            conn.site = None

    def withdraw(self, conn: GatewayConnection) -> None:
        """Remove ``conn``'s routes; it may be called again, and then does nothing."""
        for net in conn.prefixes:
            self.routes.remove(net, conn)
        conn.prefixes = []
        if conn.gateway is not None and self.by_gateway.get(conn.gateway) is conn:
            del self.by_gateway[conn.gateway]
            if self.cluster is not None:
                self.cluster.gateway_down(conn.gateway)
        site = conn.site
        if site is not None:
            # no longer a link: a REGISTER on it now makes it one again, or a plain gateway
            conn.site = None
            conn.link = None
            conn.link_up = True
            if site.links.unregister(conn):
                # its last link: the site's networks are unreachable now
                self._drop_site(site)
            else:
                self._site_claims(site)

    # -- link health of multi-link gateways

    def link_heard(self, conn: GatewayConnection) -> None:
        """A link marked down is talking again: it takes its flows back."""
        site = conn.site
        if site is None or conn.closing:
            return
        conn.link_up = True
        site.links.set_up(conn, True)
        self._site_claims(site)
        assert conn.link is not None
        log.info("link up", extra=kv(gateway=conn.gateway, link=conn.link.name, peer=conn.peer))

    def _site_claims(self, site: Site) -> None:
        """A router of a cluster gives up the routes of a site none of whose links is up
        here, and takes them back when one is: meanwhile another router's route to the
        same networks (the gateway's link to that router) carries its packets. Alone, a
        router keeps them, and counts what it cannot deliver as ``links_down``."""
        if self.remote is None:
            return
        up = site.links.any_up()
        if up and site.withdrawn:
            site.withdrawn = False
            for net in site.prefixes:
                self.routes.add(net, site)
        elif not up and not site.withdrawn and site.prefixes:
            site.withdrawn = True
            for net in site.prefixes:
                self.routes.remove(net, site)

    def _check_links(self, now: float) -> None:
        """Give up on links that have been silent longer than they said they may be."""
        for site in list(self.sites.values()):
            for conn in site.links.connections():
                if not conn.link_up or conn.session is None:
                    continue
                silent = now - conn.session.last_heard
                if silent <= conn.link_timeout:
                    continue
                conn.link_up = False
                conn.link_downs += 1
                self.stats.links_down += 1
                site.links.set_up(conn, False)
                self._site_claims(site)
                assert conn.link is not None
                log.warning(
                    "link down",
                    extra=kv(
                        gateway=conn.gateway,
                        link=conn.link.name,
                        peer=conn.peer,
                        silent_ms=int(silent * 1000),
                    ),
                )

    async def _watch_links(self) -> None:
        while True:
            await asyncio.sleep(LINK_CHECK_INTERVAL)
            if self.sites:
                self._check_links(time.monotonic())

    def on_disconnect(self, conn: GatewayConnection, exc: Exception | None) -> None:
        self.connections.discard(conn)
        self.stats.connections_closed += 1
        if conn.session is not None:
            self.stats.dropped_unregistered += conn.session.dropped_unregistered
        if conn.direct is not None and self.rendezvous is not None:
            gone = conn.direct
            conn.direct = None
            self._send_direct(self.rendezvous.connection_closed(gone, conn, time.monotonic()))
        if conn.gateway is not None:
            self.withdraw(conn)
            kcp = conn.transport.get_extra_info("kcp_link") if conn.transport else None
            fec = kcp.fec if kcp is not None else None
            log.info(
                "disconnected",
                extra=kv(
                    gateway=conn.gateway,
                    peer=conn.peer,
                    transport=conn.transport_name,
                    packets_in=conn.packets_in,
                    packets_out=conn.packets_out,
                    bytes_in=conn.bytes_in,
                    bytes_out=conn.bytes_out,
                    **(fec.stats.fields("fec_") if fec is not None else {}),
                    **({"error": exc} if exc else {}),
                ),
            )

    # -- data plane

    def forward(self, src: Endpoint, packets: list[memoryview] | list[bytes]) -> Forwarded:
        """Route one read's packets (forwarding.forward) and write each destination's
        frames with one call; nothing of it is kept for the next read. The result is
        returned for the drop counts a router link keeps of its own."""
        out = forward(packets, src, self.routes, self.cfg.anti_spoofing)  # type: ignore[arg-type]
        src.bytes_in += out.bytes_in
        out.add_to(self.stats)
        supers = out.supers
        for dst, parts in out.batches.items():
            dst.send_batch(parts, supers.get(dst, 0) if supers else 0)
        a = getattr(src, "direct", None)
        if a is not None and self.rendezvous is not None:
            # two gateways that agreed direct paths talk through the router: one probe per
            # destination of this read, an offer when their pair has no material yet
            rdv = self.rendezvous
            for dst in out.batches:
                b = getattr(dst, "direct", None)
                if b is not None and rdv.seen(a, b):
                    self._send_direct(rdv.offer(a, b, time.monotonic()))
        return out

    # -- the router's own TUN (cfg.tun): the pseudo-gateway "local"

    async def _start_tun(self) -> None:
        """Open the TUN, give it its addresses and the routes to the offices, and put
        "local" in the table: its packets are routed like a gateway's from now on.

        Plain packets, no offloads: the router host's own traffic is small next to what
        passes between offices, and gateways' super-packets are cut for it by forwarding.
        Nothing of it needs a privilege later: the routes are the configured ones, and
        closing the device at exit takes its addresses and routes with it.
        """
        tcfg = self.cfg.tun
        assert tcfg is not None
        try:
            tun = TunDevice(tcfg.name)
        except OSError as exc:
            denied = isinstance(exc, PermissionError)
            hint = " (run as root or with CAP_NET_ADMIN)" if denied else ""
            raise TunSetupError(
                exc.errno, f"cannot create TUN device {tcfg.name}: {exc.strerror or exc}{hint}"
            ) from None
        try:
            await asyncio.to_thread(
                netconf.configure_tun,
                tun.name,
                tcfg.mtu,
                tcfg.addresses,
                list(tcfg.route_networks),
            )
        except Exception as exc:
            tun.close()
            raise TunSetupError(0, f"cannot configure TUN device {tun.name}: {exc}") from None
        self.tun = tun
        local = self.local = LocalEndpoint(tcfg, tun, self.stats, self._tun_failed)
        for net in local.prefixes:
            self.routes.add(net, local)
        asyncio.get_running_loop().add_reader(tun.fileno(), self._on_tun_readable)
        log.info(
            "tun up",
            extra=kv(
                name=tun.name,
                address=",".join(str(a) for a in tcfg.addresses),
                networks=",".join(str(n) for n in tcfg.networks) or "-",
                routes=",".join(str(n) for n in tcfg.route_networks) or "-",
            ),
        )

    def _on_tun_readable(self) -> None:
        """The router host's packets: forwarded with "local" as their source."""
        tun, local = self.tun, self.local
        assert tun is not None and local is not None
        try:
            packets = tun.read_batch()
        except OSError as exc:
            self._tun_failed("read", exc)
            return
        if not packets:
            return
        stats = self.stats
        stats.tun_packets_in += len(packets)
        stats.tun_bytes_in += sum(map(len, packets))
        local.packets_in += len(packets)
        self.forward(local, packets)

    def _tun_failed(self, op: str, exc: OSError) -> None:
        """The TUN failed for good (deleted under us, say): the offices lose the router
        host's networks, and everything else goes on."""
        if self.tun is None:
            return
        log.error(
            "tun failed; its networks are withdrawn",
            extra=kv(name=self.tun.name if self.tun else "-", op=op, error=exc.strerror or exc),
        )
        self._stop_tun()

    def _stop_tun(self) -> None:
        tun, local = self.tun, self.local
        self.tun = self.local = None
        if local is not None:
            for net in local.prefixes:
                self.routes.remove(net, local)
        if tun is not None:
            self.stats.tun_write_dropped = tun.write_dropped
            self.stats.tun_write_errors = tun.write_errors
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(tun.fileno())
            tun.close()

    def _tun_refuses(self, conn: GatewayConnection, ev: RegisterRequested) -> bool:
        """Refuse a REGISTER that claims the tun's addresses or networks, whatever key
        it holds (a credential matter: it counts as an AUTH failure)."""
        if self.cfg.tun is None:
            return False
        req = ev.request
        reason = conflict(self.cfg.tun, req.gateway, req.networks)
        if reason is None:
            return False
        assert conn.session is not None
        self.stats.register_refused += 1
        log.warning(
            "registration refused", extra=kv(gateway=req.gateway, peer=conn.peer, reason=reason)
        )
        conn.session.reject_register(ev.seq, reason)
        self._failed(conn)
        return True

    # -- the cluster (cfg.cluster): routes shared with other routers through etcd

    def _join_cluster(self) -> None:
        """Become a member: everything registered here is published, the store runs, and
        the other routers it lists are dialed (cluster.peers)."""
        cfg = self.cfg.cluster
        assert cfg is not None
        member = self.cluster = ClusterMember(cfg, self.routes)
        # the other routers' routes (cluster.routes.RemoteRoutes), which the member's state
        # keeps and the links to those routers bring into the data path
        self.remote = member.remote
        self._open_peers()
        member.state.on_routers = self._routers_changed
        if self.local is not None and self.cfg.tun is not None:
            member.local_up(self.cfg.tun.gateway, self.local.prefixes)
        for gateway, conn in self.by_gateway.items():
            member.gateway_up(gateway, conn.prefixes)
        for gateway, site in self.sites.items():
            if site.prefixes:
                member.gateway_up(gateway, site.prefixes)
        member.start()

    def _open_peers(self) -> None:
        creds = self.peer_credentials
        assert creds is not None and self.remote is not None
        self.remote.self_id = creds.router_id
        self.peers = PeerLinks(
            creds,
            self.remote,
            self.forward,
            min(self.cfg.send_queue_bytes, linksock.LINK_QUEUE_BYTES),
            lambda: self.congestion,
        )
        self.peers.start()

    def _routers_changed(self) -> None:
        """The store's list of the other routers changed: dial those to dial."""
        member, peers = self.cluster, self.peers
        if member is None or peers is None:
            return
        peers.set_peers(
            {
                rid: r.info.peer_address
                for rid, r in member.state.routers.items()
                if r.info is not None
            }
        )

    def _reload_cluster(self, old: ClusterConfig | None) -> None:
        """The cluster section was added, removed or changed by a reload."""
        new, member = self.cfg.cluster, self.cluster
        if member is not None and new is None:
            self.cluster = None
            if self.peers is not None:
                self.peers.close()
            self.peers = None
            self.remote = None
            for site in self.sites.values():
                # alone again: a site's routes stay whatever its links do
                if site.withdrawn:
                    site.withdrawn = False
                    for net in site.prefixes:
                        self.routes.add(net, site)
            task = asyncio.create_task(member.stop())
            self._upgrades.add(task)  # held until done, like a TLS upgrade
            task.add_done_callback(self._upgrades.discard)
        elif member is None and new is not None:
            self._join_cluster()
        elif member is not None and new is not None:
            if old is not None and (old.name, old.router_id) != (new.name, new.router_id):
                # another router now: its links go, and those of the new identity come
                if self.peers is not None:
                    self.peers.close()
                self._open_peers()
            member.reconfigure(new)
            self._routers_changed()

    def _cluster_refuses(
        self, conn: GatewayConnection, ev: RegisterRequested, prefixes: list
    ) -> bool:
        """Another router of the cluster holds one of these networks for another gateway
        (as the store says): refused, not counted as a failed AUTH (it may be a gateway that
        moved, whose old registration has yet to expire)."""
        if self.cluster is None:
            return False
        why = self.cluster.refuses(ev.request.gateway, prefixes)
        if why is None:
            return False
        assert conn.session is not None
        self.stats.register_refused += 1
        log.warning(
            "registration refused",
            extra=kv(gateway=ev.request.gateway, peer=conn.peer, reason=why),
        )
        # the gateway is told no more than that: which router and gateway hold it is ours
        conn.session.reject_register(ev.seq, "a network is held by another gateway of the cluster")
        return True

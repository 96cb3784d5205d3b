"""The router (hub): accepts gateways over TLS and forwards IP packets between them.

The protocol logic lives in ``session.ServerSession`` and the table in ``routing``; this
module wires them to asyncio transports. The forwarding loop is the hot path: it reads the
destination straight out of the packet, batches frames per destination connection and
writes each batch with one call.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass

from . import dtls, wire
from .config import RouterConfig
from .counters import Counters
from .gso import VNET_HDR_LEN as _VNET
from .gso import GsoError, to_plain
from .ippacket import dst_addr
from .kcp_pool import KcpPool
from .kcp_transport import KcpServer
from .messages import FEATURE_SUPER
from .routing import RouteTable
from .session import (
    AuthFailed,
    ConnectionLost,
    RegisterRequested,
    ServerSession,
    State,
    keys_equal,
)
from .tlsconf import server_context

log = logging.getLogger("polevpn.router")

_S2C = wire.S2C_IPDATA
_SUPER = wire.SUPER_IPDATA
_HDR = wire.HEADER_LEN
_pack = wire.HEADER.pack


@dataclass
class RouterStats(Counters):
    connections_accepted: int = 0
    connections_closed: int = 0
    auth_failures: int = 0
    registrations: int = 0
    replaced: int = 0
    timeouts: int = 0
    malformed_frames: int = 0
    packets_forwarded: int = 0
    bytes_forwarded: int = 0
    dropped_no_route: int = 0
    dropped_malformed: int = 0
    dropped_queue_full: int = 0
    dropped_hairpin: int = 0
    dropped_unregistered: int = 0
    # super-packets cut into plain packets for a gateway that did not negotiate them
    segmented: int = 0


class GatewayConnection(asyncio.Protocol):
    """One gateway's TLS connection, as seen by the router."""

    def __init__(self, router: Router, transport_name: str) -> None:
        self.router = router
        self.transport_name = transport_name
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.session: ServerSession | None = None
        self.gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.prefixes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.pending: list[bytes | memoryview] = []
        # SUPER_IPDATA frames in ``pending``: their bodies carry a virtio-net header too
        self.pending_super = 0
        self.connected_at = 0.0
        self.packets_in = 0
        self.packets_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.closing = False

    def __repr__(self) -> str:
        return f"<gateway {self.gateway or '-'} {self.peer}>"

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        now = time.monotonic()
        self.connected_at = now
        self.session = ServerSession(self.router.check_key, now, self.router.features)
        limit = self.router.cfg.send_queue_bytes
        transport.set_write_buffer_limits(high=limit, low=limit // 2)
        self.router.on_connect(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception:
            # a bug reached by one peer's bytes costs that peer its connection, nothing more
            log.exception("internal error handling data from peer=%s; closing it", self.peer)
            self.router.stats.malformed_frames += 1
            self.close(None)

    def _received(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        packets, events = session.receive(data, time.monotonic())
        if events:
            for ev in events:
                self.router.on_event(self, ev)
        if packets:
            self.packets_in += len(packets)
            self.router.forward(self, packets)
        if session.outbox:
            self._write_control(session.data_to_send())
        if session.state is State.CLOSED and not self.closing:
            self.close(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.router.on_disconnect(self, exc)

    # -- output

    def _write_control(self, frames: list[bytes]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(frames))

    def flush(self) -> None:
        """Write the frames batched by ``Router.forward`` with one call, or drop them."""
        pending = self.pending
        transport = self.transport
        if transport is None or self.closing:
            self.router.stats.dropped_queue_full += len(pending) // 2
        elif transport.get_write_buffer_size() >= self.router.cfg.send_queue_bytes:
            # a slow gateway loses its own packets; it never holds up anyone else
            self.router.stats.dropped_queue_full += len(pending) // 2
        else:
            # one write means one TLS record stream instead of a record per frame
            data = b"".join(pending)
            count = len(pending) // 2
            ip_bytes = len(data) - count * _HDR - self.pending_super * _VNET
            self.bytes_out += ip_bytes
            self.packets_out += count
            stats = self.router.stats
            stats.packets_forwarded += count
            stats.bytes_forwarded += ip_bytes
            transport.write(data)
        pending.clear()
        self.pending_super = 0

    def close(self, reason: str | None) -> None:
        if self.closing:
            return
        self.closing = True
        if reason:
            log.info(
                "closing connection peer=%s gateway=%s reason=%s", self.peer, self.gateway, reason
            )
        if self.session is not None and self.session.outbox:
            self._write_control(self.session.data_to_send())
        if self.transport is not None:
            self.transport.close()


class Router:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.routes: RouteTable[GatewayConnection] = RouteTable()
        self.by_gateway: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, GatewayConnection] = {}
        self.connections: set[GatewayConnection] = set()
        self.stats = RouterStats()
        self.servers: list[asyncio.AbstractServer] = []
        self.kcp_server: KcpServer | None = None
        self._kcp_udp: asyncio.DatagramTransport | None = None
        self.kcp_pool = KcpPool()
        self._tasks: list[asyncio.Task] = []
        self.features = frozenset({FEATURE_SUPER}) if cfg.super_packets else frozenset()

    # -- lifecycle

    async def start(self) -> None:
        if self.cfg.tls.enable:
            await self._start_tls()
        if self.cfg.kcp.enable:
            await self._start_kcp()
        self._tasks.append(asyncio.create_task(self._housekeeping()))

    async def _start_kcp(self) -> None:
        loop = asyncio.get_running_loop()
        kcp = self.cfg.kcp
        assert kcp.cert_file is not None and kcp.key_file is not None
        ctx, jar = dtls.server_context(kcp.cert_file, kcp.key_file)
        server = KcpServer(
            ctx,
            jar,
            self.cfg.kcp_params,
            lambda: GatewayConnection(self, "kcp"),
            handshake_timeout=self.cfg.auth_timeout,
            pool=self.kcp_pool,
        )
        udp, _ = await loop.create_datagram_endpoint(
            lambda: server, local_addr=(kcp.host, kcp.port)
        )
        self.kcp_server = server
        self._kcp_udp = udp
        host, port = udp.get_extra_info("sockname")[:2]
        fec = self.cfg.kcp_params.fec
        log.info(
            "listening transport=kcp address=%s port=%d fec=%s",
            host,
            port,
            f"{fec.mode}:{fec.data_shards}+{fec.parity_shards}" if fec.enabled else "off",
        )

    @property
    def kcp_port(self) -> int:
        assert self._kcp_udp is not None
        return self._kcp_udp.get_extra_info("sockname")[1]

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        tls = self.cfg.tls
        assert tls.cert_file is not None and tls.key_file is not None
        ctx = server_context(tls.cert_file, tls.key_file)
        server = await loop.create_server(
            lambda: GatewayConnection(self, "tls"),
            host=tls.host,
            port=tls.port,
            ssl=ctx,
            ssl_handshake_timeout=self.cfg.auth_timeout,
            reuse_address=True,
            backlog=1024,
        )
        self.servers.append(server)
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            log.info("listening transport=tls address=%s port=%d", host, port)

    @property
    def tls_port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.close("router shutting down")
        for task in self._tasks:
            task.cancel()
        if self._kcp_udp is not None:
            self._kcp_udp.close()
        for server in self.servers:
            await server.wait_closed()
        log.info("stopped %s", self.stats.summary())

    async def _housekeeping(self) -> None:
        cfg = self.cfg
        period = max(0.05, min(1.0, cfg.idle_timeout / 4, cfg.auth_timeout / 4))
        next_stats = time.monotonic() + cfg.stats_interval if cfg.stats_interval else None
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.session is None or conn.closing:
                    continue
                reason = conn.session.check_timeouts(now, cfg.auth_timeout, cfg.idle_timeout)
                if reason:
                    self.stats.timeouts += 1
                    conn.close(reason)
            if next_stats is not None and now >= next_stats:
                next_stats = now + cfg.stats_interval
                log.info(
                    "stats connections=%d routes=%d %s%s",
                    len(self.connections),
                    len(self.routes),
                    self.stats.summary(),
                    f" {self.kcp_server.counters().summary('kcp_')}{self._fec_totals()}"
                    if self.kcp_server
                    else "",
                )

    def _fec_totals(self) -> str:
        """FEC counters summed over the live kcp:// sessions."""
        assert self.kcp_server is not None
        recovered = parity_sent = unrecoverable = 0
        for t in self.kcp_server.sessions.values():
            fec = t.link.fec
            if fec is not None:
                recovered += fec.stats.recovered
                parity_sent += fec.stats.parity_sent
                unrecoverable += fec.stats.unrecoverable
        return (
            f" fec_recovered={recovered} fec_parity_sent={parity_sent}"
            f" fec_unrecoverable={unrecoverable}"
        )

    # -- control plane

    def check_key(self, key: str) -> bool:
        return keys_equal(key, self.cfg.key)

    def on_connect(self, conn: GatewayConnection) -> None:
        self.stats.connections_accepted += 1
        self.connections.add(conn)
        log.debug("connection from %s", conn.peer)

    def on_event(self, conn: GatewayConnection, ev: object) -> None:
        if isinstance(ev, RegisterRequested):
            self._register(conn, ev)
        elif isinstance(ev, AuthFailed):
            self.stats.auth_failures += 1
            log.warning("auth rejected peer=%s reason=%s", conn.peer, ev.reason)
        elif isinstance(ev, ConnectionLost):
            self.stats.malformed_frames += 1
            log.warning("protocol error peer=%s reason=%s", conn.peer, ev.reason)

    def _register(self, conn: GatewayConnection, ev: RegisterRequested) -> None:
        req = ev.request
        old = self.by_gateway.get(req.gateway)
        if old is not None and old is not conn:
            self.stats.replaced += 1
            log.info(
                "gateway %s re-registered from %s, replacing connection from %s",
                req.gateway,
                conn.peer,
                old.peer,
            )
            self._withdraw(old)
            old.close("replaced by a new registration")
        if conn.gateway is not None:
            # a second REGISTER on the same connection replaces what it announced before
            self._withdraw(conn)
        host = ipaddress.ip_network(req.gateway)
        prefixes = [host, *req.networks]
        for net in prefixes:
            self.routes.add(net, conn)
        conn.gateway = req.gateway
        conn.prefixes = prefixes
        self.by_gateway[req.gateway] = conn
        assert conn.session is not None
        conn.session.accept_register(ev.seq)
        self.stats.registrations += 1
        log.info(
            "registered gateway=%s peer=%s transport=%s features=%s networks=%s",
            req.gateway,
            conn.peer,
            conn.transport_name,
            ",".join(sorted(conn.session.features)) or "-",
            ",".join(str(n) for n in req.networks) or "-",
        )

    def _withdraw(self, conn: GatewayConnection) -> None:
        for net in conn.prefixes:
            self.routes.remove(net, conn)
        conn.prefixes = []
        if conn.gateway is not None and self.by_gateway.get(conn.gateway) is conn:
            del self.by_gateway[conn.gateway]

    def on_disconnect(self, conn: GatewayConnection, exc: Exception | None) -> None:
        self.connections.discard(conn)
        self.stats.connections_closed += 1
        if conn.session is not None:
            self.stats.dropped_unregistered += conn.session.dropped_unregistered
        if conn.gateway is not None:
            self._withdraw(conn)
            kcp = conn.transport.get_extra_info("kcp_link") if conn.transport else None
            fec = kcp.fec if kcp is not None else None
            log.info(
                "gateway disconnected gateway=%s peer=%s transport=%s packets_in=%d "
                "packets_out=%d bytes_in=%d bytes_out=%d%s%s",
                conn.gateway,
                conn.peer,
                conn.transport_name,
                conn.packets_in,
                conn.packets_out,
                conn.bytes_in,
                conn.bytes_out,
                f" {fec.stats.summary('fec_')}" if fec is not None else "",
                f" error={exc}" if exc else "",
            )

    # -- data plane

    def forward(self, src: GatewayConnection, packets: list[memoryview]) -> None:
        lookup4 = self.routes.lookup_v4
        lookup6 = self.routes.lookup_v6
        stats = self.stats
        touched: list[GatewayConnection] = []
        nbytes = 0
        for pkt in packets:
            version, addr = dst_addr(pkt)
            if version == 4:
                dst = lookup4(addr)
            elif version == 6:
                dst = lookup6(addr)
            else:
                # the session passes SUPER_IPDATA bodies only from a gateway that offered them
                nbytes += self._forward_super(src, pkt, touched)
                continue
            if dst is None:
                stats.dropped_no_route += 1
                continue
            if dst is src:
                # sending it back would loop between gateway and router until TTL ran out
                stats.dropped_hairpin += 1
                continue
            pending = dst.pending
            if not pending:
                touched.append(dst)
            n = len(pkt)
            pending.append(_pack(n + _HDR, _S2C, 0))
            pending.append(pkt)
            nbytes += n
        src.bytes_in += nbytes
        for dst in touched:
            dst.flush()

    def _forward_super(
        self, src: GatewayConnection, buf: memoryview, touched: list[GatewayConnection]
    ) -> int:
        """Virtio-net header + packet, or garbage; returns the IP bytes taken."""
        stats = self.stats
        assert src.session is not None
        if buf and buf[0] < 0x10 and src.session.super_packets:
            version, addr = dst_addr(buf[_VNET:])
        else:
            # garbage, or a plain frame dressed as a super-packet by a peer that did not offer
            version, addr = 0, 0
        if version == 4:
            dst = self.routes.lookup_v4(addr)
        elif version == 6:
            dst = self.routes.lookup_v6(addr)
        else:
            stats.dropped_malformed += 1
            return 0
        if dst is None:
            stats.dropped_no_route += 1
            return 0
        if dst is src:
            stats.dropped_hairpin += 1
            return 0
        assert dst.session is not None
        pending = dst.pending
        start = len(pending)
        if dst.session.super_packets:
            pending.append(_pack(_HDR, _SUPER, len(buf)))
            pending.append(buf)
            dst.pending_super += 1
        elif not (buf[0] or buf[1]):
            ip = buf[_VNET:]
            pending.append(_pack(len(ip) + _HDR, _S2C, 0))
            pending.append(ip)
        else:
            try:
                pkts = to_plain(buf)
            except GsoError:
                stats.dropped_malformed += 1
                return 0
            stats.segmented += 1
            for pkt in pkts:
                pending.append(_pack(len(pkt) + _HDR, _S2C, 0))
                pending.append(pkt)
        if not start:
            touched.append(dst)
        return len(buf) - _VNET

"""The gateway (office side): a TUN device on one end, the router connection on the other.

``session.ClientSession`` holds the protocol; this module owns the TUN reader, the TLS
connection with reconnect and backoff, and the ACL check on packets coming from the tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from OpenSSL import SSL

from polevpn.common.counters import Counters
from polevpn.common.logfmt import kv
from polevpn.config import (
    GatewayConfig,
    LinkConfig,
    RouteServer,
    load_gateway_config,
    reloading,
    set_log_level,
)
from polevpn.config.reloading import ReloadError
from polevpn.gateway import view
from polevpn.gateway.direct import GatewayDirect
from polevpn.host import netconf
from polevpn.host.hostsetup import HostSetup, HostSetupError
from polevpn.io import kcp_transport, linksock, pathstats, tcpcc
from polevpn.io.tlsconf import client_context, server_hostname
from polevpn.io.tun import Tun, TunDevice
from polevpn.kcp import dtls
from polevpn.kcp.kcp_link import KcpLink, urgent_of
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.packet.gso import VNET_HDR_LEN as _VNET
from polevpn.packet.gso import GsoError, Packet, to_plain
from polevpn.packet.ippacket import src_addr
from polevpn.packet.mss import clamped, clamped_vnet, limits
from polevpn.packet.multipath import FlowTable, Path
from polevpn.packet.routing import NetworkSet
from polevpn.proto import wire
from polevpn.proto.certs import pin_matches
from polevpn.proto.messages import (
    FEATURE_DIRECT,
    FEATURE_SUPER,
    FEATURE_UNORDERED,
    LinkRequest,
)
from polevpn.proto.session import (
    AuthSucceeded,
    ClientSession,
    ConnectionLost,
    DirectFrame,
    Registered,
    Rejected,
    State,
)

log = logging.getLogger("polevpn.gateway")

_C2S = wire.C2S_IPDATA
_SUPER = wire.SUPER_IPDATA
_HDR = wire.HEADER_LEN
_pack = wire.HEADER.pack
# struct linger {l_onoff 1, l_linger 0}: close() discards the send queue and resets
_LINGER_RESET = struct.pack("ii", 1, 0)


class FatalError(Exception):
    """The router refused us for a reason that retrying will not change (wrong key)."""


class SetupError(FatalError):
    """The host would not give us the TUN device, its addresses or its routes."""


class TunError(FatalError):
    """The TUN device failed (deleted, or an I/O error): the data path cannot go on."""


class NoMultiLink(Exception):
    """The router took AUTH but not multi-link: it can hold one connection per gateway."""


@dataclass
class GatewayStats(Counters):
    connects: int = 0
    reconnects: int = 0
    fallbacks: int = 0
    server_switches: int = 0
    packets_to_router: int = 0
    bytes_to_router: int = 0
    packets_from_router: int = 0
    bytes_from_router: int = 0
    dropped_no_link: int = 0
    # a multi-link gateway's packets for a link whose queue was full
    dropped_link_busy: int = 0
    links_down: int = 0
    dropped_acl: int = 0
    # from the tunnel with one of this office's own addresses as source
    dropped_spoofed: int = 0
    dropped_malformed: int = 0
    dropped_too_big: int = 0
    # super-packets cut into plain packets here because the router did not take them whole
    segmented: int = 0
    tun_write_dropped: int = 0
    tun_write_errors: int = 0
    # from direct paths (issue 18), written to the TUN
    packets_from_direct: int = 0
    bytes_from_direct: int = 0


class RouterLink(asyncio.Protocol):
    """One connection to the router, tls:// or kcp://. Lives until the connection is lost."""

    def __init__(self, gw: Gateway, server: RouteServer, link: LinkRequest | None = None) -> None:
        """``link``: this is one link of a multi-link gateway."""
        self.gw = gw
        self.server = server
        cfg = gw.cfg
        offload = gw.tun is not None and gw.tun.vnet_hdr
        features = {FEATURE_SUPER} if offload else set()
        if gw.direct is not None:
            features.add(FEATURE_DIRECT)
        if server.scheme == "kcp" and cfg.kcp_params.unordered != "off":
            features.add(FEATURE_UNORDERED)
        self.session = ClientSession(
            cfg.key,
            str(cfg.gateway),
            cfg.announced,
            time.monotonic(),
            link.heartbeat if link is not None else cfg.heartbeat_interval,
            cfg.heartbeat_timeout,
            features=frozenset(features),
            link=link,
        )
        self.multi = link is not None
        self.packets_out = 0
        self.bytes_out = 0
        self.packets_in = 0
        self.bytes_in = 0
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        self.registered = loop.create_future()
        self.paused = False
        # a kcp:// link with congestion control bounds its queue by time and drops beyond
        # it, so the TUN is read on while it is paused: the packets are dropped and counted
        # here, not left to the kernel's TUN queue (hundreds of ms on a slow line)
        self.sheds = False
        self.kcp_link: KcpLink | None = None  # a link that sheds: its queue budget
        self.rejected: Rejected | None = None
        # given up for silence (heartbeat_timeout): the router may be hung or gone
        self.silent = False

    @property
    def ready(self) -> bool:
        return self.session.ready and not self.paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self.transport = transport  # type: ignore[assignment]
        kcp_link = transport.get_extra_info("kcp_link")
        self.sheds = kcp_link is not None and kcp_link.queue_budget is not None
        self.kcp_link = kcp_link if self.sheds else None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.type == socket.SOCK_STREAM:
            # after the TLS handshake, before the tunnel's data: a few packets on the default
            tcpcc.apply(sock, self.gw.tcp_congestion())
        limit = self.gw.cfg.send_queue_bytes
        if self.multi:
            linksock.shorten_queue(transport, limit // 4)
        else:
            transport.set_write_buffer_limits(high=limit // 4, low=limit // 8)
        cfg = self.gw.cfg
        if cfg.cert_pin is not None:
            ssl_obj = transport.get_extra_info("ssl_object")
            if ssl_obj is not None:
                der = ssl_obj.getpeercert(binary_form=True)
            else:
                der = transport.get_extra_info("peercert_der")
            if not pin_matches(der, cfg.cert_pin):
                log.error(
                    "router certificate does not match cert_pin; closing", extra=kv(config=cfg.path)
                )
                self.session.state = State.CLOSED
                transport.abort()
                return
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception:
            # drop this connection and reconnect rather than let the daemon die
            log.exception("internal error handling data from the router; reconnecting")
            self.abort()

    def _received(self, data: bytes) -> None:
        session = self.session
        packets, events = session.receive(data, time.monotonic())
        if events:
            for ev in events:
                self._on_event(ev)
        if packets:
            self.packets_in += len(packets)
            self.bytes_in += self.gw.to_tun(packets, session.super_packets)
            direct = self.gw.direct
            if direct is not None and direct.any_direct:
                direct.relayed(packets, session.super_packets)
        if session.outbox:
            self.flush()
        if session.state is State.CLOSED and self.transport is not None:
            self.transport.close()

    def _on_event(self, ev: object) -> None:
        if isinstance(ev, AuthSucceeded):
            log.debug("authenticated with router")
        elif isinstance(ev, Registered):
            if FEATURE_UNORDERED in self.session.features and self.transport is not None:
                # the router agreed in its AUTH reply: our data may go up out of order
                kcp_link = self.transport.get_extra_info("kcp_link")
                if kcp_link is not None:
                    kcp_link.unordered_send = True
            if not self.registered.done():
                self.registered.set_result(None)
            self.gw.on_registered(self)
        elif isinstance(ev, Rejected):
            self.rejected = ev
        elif isinstance(ev, ConnectionLost):
            log.warning("closing connection to router", extra=kv(reason=ev.reason))
        elif isinstance(ev, DirectFrame) and self.gw.direct is not None:
            error = self.gw.direct.on_frame(ev, self.transport)
            if error is not None:
                log.warning("closing connection to router", extra=kv(reason=error))
                self.session.state = State.CLOSED

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.state = State.CLOSED
        if not self.closed.done():
            self.closed.set_result(exc)
        if not self.registered.done():
            self.registered.set_exception(exc or ConnectionResetError("connection closed"))
            self.registered.exception()  # retrieved: nobody may be waiting any more
        self.gw.on_link_lost(self)

    def pause_writing(self) -> None:
        # the gateway stops reading the TUN while its link is paused: the kernel queues and
        # then drops, which TCP inside reads as congestion, instead of our buffer growing.
        # One link of several drops its own packets instead: the others must go on.
        self.paused = True
        self.gw.sync_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self.gw.sync_reading()

    def abort(self) -> None:
        """Give the connection up with everything it still has queued: asyncio's buffer, and
        for tls:// the kernel's send queue too (SO_LINGER 0: a reset instead of a FIN after
        the data). A plain abort() leaves the kernel sending that queue, so a cut link that
        came back delivered the abandoned connection's stale data (68 KB seen) to the
        router, seconds late and out of order with what the other links had carried."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and getattr(sock, "type", None) == socket.SOCK_STREAM:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            out = self.session.data_to_send()
            if out:
                self.transport.write(b"".join(out))

    def tick(self, now: float) -> None:
        lost = self.session.tick(now)
        if lost is not None:
            self.silent = True
            log.warning("closing connection to router", extra=kv(reason=lost.reason))
            self.abort()
            return
        if self.session.outbox:
            self.flush()

    def urgent_of(self, packets: Sequence[Packet]) -> list[Packet]:
        """Of packets read from the TUN while the queue is full, the urgent ones that its
        headroom takes (KcpLink.urgent_budget)."""
        kcp_link = self.kcp_link
        if kcp_link is None or not self.session.ready:
            return []
        room = kcp_link.urgent_room()
        if room <= 0:
            return []
        tun = self.gw.tun
        return urgent_of(packets, room, _VNET if tun is not None and tun.vnet_hdr else 0)

    def send_packets(self, packets: Sequence[Packet]) -> None:
        """Packets as read from the TUN: with a virtio-net header when it has offloads."""
        stats = self.gw.stats
        out: list[bytes | memoryview] = []
        nbytes = 0
        if self.gw.tun is not None and self.gw.tun.vnet_hdr:
            nbytes = self._frame_vnet(packets, out)
        else:
            nbytes = self._frame_plain(packets, out)
        if out:
            count = len(out) // 2
            stats.packets_to_router += count
            stats.bytes_to_router += nbytes
            self.packets_out += count
            self.bytes_out += nbytes
            assert self.transport is not None
            self.transport.write(b"".join(out))

    def _frame_vnet(self, bufs: Sequence[Packet], out: list[bytes | memoryview]) -> int:
        """Frame header + packet pairs into ``out``; returns the IP bytes framed."""
        stats = self.gw.stats
        whole = self.session.super_packets
        nbytes = 0
        for buf in bufs:
            if buf[0] or buf[1]:
                # a partial checksum or a super-packet: the far kernel finishes it, or we do
                if whole:
                    out.append(_pack(_HDR, _SUPER, len(buf)))
                    out.append(buf)
                    nbytes += len(buf) - _VNET
                    continue
                try:
                    pkts = to_plain(buf)
                except GsoError:
                    stats.dropped_malformed += 1
                    continue
                stats.segmented += 1
            else:
                pkts = [memoryview(buf)[_VNET:]]
            nbytes += self._frame_plain(pkts, out)
        return nbytes

    def _frame_plain(self, pkts: Sequence[Packet], out: list[bytes | memoryview]) -> int:
        """C2S_IPDATA header + packet pairs into ``out``; returns the IP bytes framed."""
        nbytes = 0
        for pkt in pkts:
            n = len(pkt)
            if n > wire.MAX_BODY:
                self.gw.stats.dropped_too_big += 1
                continue
            out.append(_pack(n + _HDR, _C2S, 0))
            out.append(pkt)
            nbytes += n
        return nbytes


def backoff(cfg: GatewayConfig, failed: int) -> float:
    """Seconds to wait before the next try after ``failed`` rounds that did not last.

    Full jitter: uniform(min, ceiling), the ceiling doubling from reconnect_min_delay with
    every failed round up to reconnect_max_delay (see Gateway._connect_loop for why the cap
    is short). A zero reconnect_min_delay still backs off (from 0.1 s) unless the cap is zero.
    """
    failed = min(failed, 32)  # 2**failed stays a float
    ceiling = min(cfg.reconnect_max_delay, max(cfg.reconnect_min_delay, 0.1) * 2**failed)
    return random.uniform(cfg.reconnect_min_delay, max(ceiling, cfg.reconnect_min_delay))


class Uplink:
    """One link of a multi-link gateway: its own connection to the router, kept up with its
    own backoff, and its health as the flow table sees it.

    The link is up while it is registered and the router has been heard within
    ``link_timeout``; heartbeats every ``link_heartbeat_interval`` make sure there is
    something to hear. A link that stays silent for a few timeouts is closed and connected
    afresh: TCP's retransmission backoff would otherwise keep it away for seconds after its
    uplink came back.
    """

    def __init__(self, gw: Gateway, config: LinkConfig, path_id: int) -> None:
        self.gw = gw
        self.config = config
        self.path_id = path_id
        self.link: RouterLink | None = None
        self.up = False
        self.downs = 0
        self.connects = 0
        self.reconnect_now = False
        # taken out of the config by a reload: its end is no failure
        self.retired = False
        # what the link's closed connections carried: counters that survive reconnects
        self._closed = [0, 0, 0, 0]

    @property
    def name(self) -> str:
        return self.config.name

    def totals(self) -> tuple[int, int, int, int]:
        """(packets_out, bytes_out, packets_in, bytes_in) over all of this link's
        connections so far, the open one included."""
        t = self._closed
        link = self.link
        if link is None:
            return t[0], t[1], t[2], t[3]
        return (
            t[0] + link.packets_out,
            t[1] + link.bytes_out,
            t[2] + link.packets_in,
            t[3] + link.bytes_in,
        )

    def path(self) -> Path:
        """The link as the flow table knows it."""
        return Path(self.path_id, self.config.weight, self.config.backup)

    def request(self) -> LinkRequest:
        cfg, c = self.gw.cfg, self.config
        return LinkRequest(
            c.name, c.weight, c.backup, cfg.link_heartbeat_interval, cfg.link_timeout
        )

    async def run(self) -> None:
        gw = self.gw
        failed = 0
        while not gw._stopping.is_set():
            cfg = gw.cfg
            server = self.config.server
            try:
                log.info("connecting", extra=kv(link=self.name, server=server.url))
                link = await gw._establish(server, self.config, self.request())
            except FatalError:
                raise
            except (TimeoutError, OSError, dtls.DtlsError, SSL.Error) as exc:
                # SSL.Error: the DTLS client context (its certificate or key) or the
                # handshake; retried like any failure to connect, not the end of the daemon
                log.warning(
                    "cannot connect",
                    extra=kv(link=self.name, server=server.url, error=str(exc) or "timeout"),
                )
                failed += 1
            else:
                since = time.monotonic()
                self.connects += 1
                gw.stats.connects += 1
                if self.connects > 1:
                    gw.stats.reconnects += 1
                why = await self._serve(link)
                if gw._stopping.is_set():
                    break
                if self.reconnect_now:
                    self.reconnect_now = False
                    failed = 0
                    continue
                log.warning("link lost", extra=kv(link=self.name, server=server.url, reason=why))
                # see Gateway._connect_loop: a link dropped at once keeps backing off
                failed = 0 if time.monotonic() - since >= cfg.heartbeat_interval else failed + 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gw._stopping.wait(), timeout=backoff(cfg, failed))

    async def _serve(self, link: RouterLink) -> str:
        """Carry traffic on ``link`` until it is lost; returns why it was."""
        gw = self.gw
        self.link = link
        why = "closed by the router"
        try:
            self._set(True, "registered")
            while True:
                cfg = gw.cfg
                await asyncio.wait([link.closed], timeout=min(0.1, cfg.link_heartbeat_interval))
                if link.closed.done():
                    exc = link.closed.result()
                    if exc is not None:
                        why = str(exc) or type(exc).__name__
                    break
                now = time.monotonic()
                link.tick(now)
                silent = now - link.session.last_heard
                if silent <= cfg.link_timeout:
                    if not self.up:
                        self._set(True, "heard again")
                elif self.up:
                    self._set(False, f"silent for {silent * 1000:.0f} ms")
                elif silent > 3 * cfg.link_timeout and link.transport is not None:
                    why = f"silent for {silent * 1000:.0f} ms"
                    link.abort()
        finally:
            self._closed = list(self.totals())
            self.link = None
            if self.up:
                self._set(False, "connection lost")
        if link.rejected is not None:
            raise gw._fatal(link)
        return why

    def _set(self, up: bool, reason: str) -> None:
        self.up = up
        gw = self.gw
        gw.flows.set_up(self.path_id, up)
        if up:
            assert self.link is not None
            gw.by_path[self.path_id] = self.link
            log.info(
                "link up", extra=kv(link=self.name, server=self.config.server.url, reason=reason)
            )
        else:
            gw.by_path.pop(self.path_id, None)
            if gw._stopping.is_set() or gw._stopping_links or self.retired:
                return  # not a failure: the gateway is closing its links
            self.downs += 1
            gw.stats.links_down += 1
            log.warning(
                "link down", extra=kv(link=self.name, server=self.config.server.url, reason=reason)
            )


class Service(Protocol):
    """What the entry point runs next to the gateway (its /metrics, polevpn.cli): opened
    once the TUN and the host are set up, closed when the gateway stops, before the host
    changes are undone. The gateway knows nothing else of it."""

    async def open(self) -> None: ...

    def close(self) -> None: ...


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.stats = GatewayStats()
        self._filters(cfg)
        self.tun: Tun | None = None
        # the link of a plain gateway (see the property); None while there is none
        self._link: RouterLink | None = None
        # the data path runs (from set-up to shut-down), and the TUN reader is registered
        self._data_path = False
        self._reading = False
        self._stopping = asyncio.Event()
        self.kcp_pool = KcpPool()
        self._dtls_ctx: SSL.Context | None = None
        # the next link loss is ours, to apply a reload: reconnect at once
        self._reconnect_now = False
        self._reloading = asyncio.Lock()
        # multi-link: each link and which of them carries which flows
        self.uplinks = {
            c.name: Uplink(self, c, i) for i, c in enumerate(cfg.links, 1) if cfg.multi_link
        }
        self.flows = FlowTable(u.path() for u in self.uplinks.values())
        # path id -> the RouterLink of an up link
        self.by_path: dict[int, RouterLink] = {}
        self._stopping_links = False
        # a link keeps its path id (its flows) across reloads that change it
        self._path_ids = {name: u.path_id for name, u in self.uplinks.items()}
        self._link_tasks: dict[str, asyncio.Task] = {}
        self._links_changed = asyncio.Event()
        # _run_uplinks runs the links' tasks: before it, it starts each itself
        self._uplinks_running = False
        # the task that connects and serves (see _serve_links); stop() cancels it
        self._serving: asyncio.Future[None] | None = None
        # the TUN failed: run() raises this once it has undone the host changes
        self._tun_error: TunError | None = None
        # the tls:// sockets' congestion control, decided once (tcp_congestion())
        self._congestion: tcpcc.Choice | None = None
        # direct paths to other offices (opened by run when direct.enable)
        self.direct: GatewayDirect | None = None

    def tcp_congestion(self) -> tcpcc.Choice:
        """The congestion control for tls:// connections: decided and logged at start, or at
        the first tls:// connection (a reload may bring tls:// route servers in)."""
        if self._congestion is None:
            self._congestion = tcpcc.decide(self.cfg.tcp_congestion)
            self._congestion.log(log, self.cfg.path)
        return self._congestion

    def _filters(self, cfg: GatewayConfig) -> None:
        self.acl = NetworkSet(cfg.acls)
        # this office's own addresses never arrive from the tunnel, whatever acls allows
        own = [ipaddress.ip_network(cfg.gateway), *cfg.local_networks]
        if cfg.gateway6 is not None:
            own.append(ipaddress.ip_network(cfg.gateway6))
        self.own = NetworkSet(own if cfg.anti_spoofing else ())
        # (IPv4, IPv6) MSS limits for SYNs crossing the tunnel either way; None: no clamping
        self.mss: tuple[int, int] | None = limits(cfg.mtu) if cfg.mss_clamp else None

    # -- reload

    async def reload(self) -> list[str]:
        """Re-read the config file and apply it; returns what changed, one line each.

        An invalid file raises ConfigError and changes nothing. New networks to announce
        mean registering again, which this gateway does by reconnecting at once (a PoleVPN
        router knows no second REGISTER); other changes leave the link alone.
        """
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> list[str]:
        old = self.cfg
        plan = reloading.plan(old, load_gateway_config(old.path))
        cfg = plan.config
        if plan.changed("route_networks") and self.tun is not None:
            add = [n for n in cfg.route_networks if n not in old.route_networks]
            remove = [n for n in old.route_networks if n not in cfg.route_networks]
            try:
                await asyncio.to_thread(netconf.update_routes, self.tun.name, add, remove)
            except Exception as exc:
                # put back what was there, so the running config stays true
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(netconf.update_routes, self.tun.name, remove, add)
                raise ReloadError(f"cannot change the routes into {self.tun.name}: {exc}") from None
        self.cfg = cfg
        self._filters(cfg)
        set_log_level(cfg.log_level)
        # certificates and keys are read again at the next connection
        self._dtls_ctx = None
        for warning in cfg.warnings:
            log.warning("%s", warning)
        changes = plan.describe()
        if plan.changed("links") and self.uplinks:
            changes += self._apply_links(old, cfg)
        if cfg.announced != old.announced:
            for u in self.uplinks.values():
                if u.link is not None and u.link.transport is not None:
                    changes.append(f"reconnecting link {u.name} to register the new networks")
                    u.reconnect_now = True
                    u.link.transport.close()
        link = self.link
        if link is not None and link.transport is not None:
            why = None
            if cfg.announced != old.announced:
                why = "to register the new local networks"
            elif link.server not in cfg.route_servers:
                why = f"{link.server.url} is no longer a route server"
            if why is not None:
                changes.append(f"reconnecting {why}")
                self._reconnect_now = True
                link.transport.close()
        reloading.log_changes(log, cfg.path, changes)
        return changes

    # -- TUN side

    def host_setup(self) -> HostSetup:
        """The host settings (forwarding, masquerading) that run makes and undoes."""
        cfg = self.cfg
        nets = (*cfg.local_networks, *cfg.route_networks)
        return HostSetup(
            cfg.tun_name,
            forwarding=cfg.forwarding,
            masquerade=cfg.masquerade,
            ipv6=cfg.gateway6 is not None or any(n.version == 6 for n in nets),
        )

    def open_tun(self) -> None:
        cfg = self.cfg
        if cfg.offload:
            try:
                self.tun = TunDevice(cfg.tun_name, offload=True)
            except OSError as exc:
                log.warning("tun offloads unavailable; reading plain packets", extra=kv(error=exc))
        if self.tun is None:
            self.tun = TunDevice(cfg.tun_name)
        log.info(
            "opened tun device",
            extra=kv(name=self.tun.name, mtu=cfg.mtu, offloads=f"0x{self.tun.offloads:x}"),
        )

    async def configure_tun(self) -> None:
        cfg = self.cfg
        assert self.tun is not None
        addrs = [cfg.gateway] + ([cfg.gateway6] if cfg.gateway6 else [])
        await asyncio.to_thread(
            netconf.configure_tun, self.tun.name, cfg.mtu, addrs, list(cfg.route_networks)
        )
        log.info(
            "tun up",
            extra=kv(
                name=self.tun.name,
                address=",".join(str(a) for a in addrs),
                routes=",".join(str(n) for n in cfg.route_networks) or "-",
            ),
        )

    @property
    def link(self) -> RouterLink | None:
        """The link of a plain gateway. Changing it decides again whether to read the TUN."""
        return self._link

    @link.setter
    def link(self, link: RouterLink | None) -> None:
        self._link = link
        self.sync_reading()

    def sync_reading(self) -> None:
        """Read the TUN iff the data path runs and the current link (if any) is not paused.

        Derived from the state of the moment, never from the order of events: a paused link
        that stops being the current one (a move to the preferred server) must not leave
        the TUN unread. Without a link the TUN is read and its packets are dropped, so that
        stale ones are not sent later; a link of a multi-link gateway never pauses the TUN.
        """
        link = self._link
        want = (
            self._data_path
            and self.tun is not None
            and (link is None or link.multi or link.sheds or not link.paused)
        )
        if want == self._reading:
            return
        assert self.tun is not None
        loop = asyncio.get_running_loop()
        if want:
            loop.add_reader(self.tun.fileno(), self._on_tun_readable)
        else:
            loop.remove_reader(self.tun.fileno())
        self._reading = want

    def _start_data_path(self) -> None:
        self._data_path = True
        self.sync_reading()

    def _stop_data_path(self) -> None:
        self._data_path = False
        self.sync_reading()

    def _tun_failed(self, op: str, exc: OSError) -> None:
        """A TUN read or write failed for good (EBADFD once the device is deleted, EIO):
        stop, so that run() undoes the host changes and raises TunError, and the service
        manager starts us afresh. Said once: the loop would call a failing reader again
        and again, and every write to a dead device fails."""
        if self._tun_error is not None:
            return
        name = self.tun.name if self.tun is not None else self.cfg.tun_name
        self._tun_error = TunError(
            f"TUN device {name} failed on {op}: {exc.strerror or exc}; exiting"
        )
        self._stop_data_path()
        self.stop()

    def _on_tun_readable(self) -> None:
        assert self.tun is not None
        try:
            packets = self.tun.read_batch()
        except OSError as exc:
            self._tun_failed("read", exc)
            return
        if not packets:
            return
        direct = self.direct
        if direct is not None and direct.any_direct:
            packets = self._route_direct(direct, packets)
            if not packets:
                return
        multi = bool(self.uplinks)
        link = self.link
        if multi:
            if not self.by_path:
                self.stats.dropped_no_link += len(packets)
                return
        elif link is None or not link.ready:
            if link is None or not link.paused:
                self.stats.dropped_no_link += len(packets)
                return
            # its queue is full (a link that sheds: see RouterLink.sheds); urgent packets
            # (a ping, a TCP ACK) still go, ahead of the queue, within its headroom
            urgent = link.urgent_of(packets)
            self.stats.dropped_link_busy += len(packets) - len(urgent)
            if not urgent:
                return
            packets = urgent
        mss = self.mss
        if mss is not None:
            # before framing or segmenting: a NEEDS_CSUM SYN keeps its partial sum as it is
            clamp = clamped_vnet if self.tun.vnet_hdr else clamped
            m4, m6 = mss
            packets = [clamp(p, m4, m6) for p in packets]
        if multi:
            self._spread(packets)
        else:
            assert link is not None
            link.send_packets(packets)

    def _route_direct(self, direct: GatewayDirect, packets: list[Packet]) -> list[Packet]:
        """The packets a direct path takes go there (clamped first, as for the router);
        the rest are returned."""
        assert self.tun is not None
        mss = self.mss
        if mss is not None:
            clamp = clamped_vnet if self.tun.vnet_hdr else clamped
            packets = [clamp(p, *mss) for p in packets]
        return direct.route(packets, self.tun.vnet_hdr)

    def _direct_to_tun(self, packets: list[memoryview]) -> None:
        if self.tun is not None:
            self.to_tun(packets, direct=True)

    def _direct_frames(self, data: bytes, via: object | None = None) -> bool:
        """Write DIRECT_* frames to a registered router connection that agreed direct:
        ``via`` first (the one whose DIRECT_* frame is being answered; the router sends
        them only on connections that agreed, and DIRECT_ENDPOINT comes with the REGISTER
        reply, before that connection is the gateway's link)."""
        if via is not None:
            transport = cast(asyncio.WriteTransport, via)
            if not transport.is_closing():
                transport.write(data)
                return True
        links = [self.link, *(u.link for u in self.uplinks.values())]
        for link in links:
            if (
                link is not None
                and link.session.ready
                and FEATURE_DIRECT in link.session.features
                and link.transport is not None
                and not link.transport.is_closing()
            ):
                link.transport.write(data)
                return True
        return False

    async def _open_direct(self) -> None:
        if not self.cfg.direct.enable:
            return
        direct = GatewayDirect(self.cfg, self.kcp_pool, self._direct_to_tun, self._direct_frames)
        try:
            await direct.open()
        except OSError as exc:
            log.warning(
                "cannot open the direct socket; running without direct paths",
                extra=kv(port=self.cfg.direct.port, error=exc.strerror or exc),
            )
            return
        self.direct = direct

    def _spread(self, packets: list[Packet]) -> None:
        """Each packet to the link of its flow, one write per link."""
        assert self.tun is not None
        skip = _VNET if self.tun.vnet_hdr else 0
        pick = self.flows.pick
        groups: dict[int, list[Packet]] = {}
        for pkt in packets:
            path_id = pick(memoryview(pkt)[skip:] if skip else pkt)
            group = groups.get(path_id)  # type: ignore[arg-type]
            if group is None:
                groups[path_id] = [pkt]  # type: ignore[index]
            else:
                group.append(pkt)
        by_path = self.by_path
        for path_id, group in groups.items():
            link = by_path.get(path_id)
            if link is None:
                self.stats.dropped_no_link += len(group)
            elif link.paused:
                # its queue is full: the packets go, as a full TUN queue drops them for one link
                self.stats.dropped_link_busy += len(group)
            else:
                link.send_packets(group)

    def to_tun(self, packets: list[memoryview], whole: bool = False, direct: bool = False) -> int:
        """Packets from the router: only sources within ``acls`` reach the TUN. Returns the
        IP bytes written.

        ``whole``: the link negotiated super-packets, so a packet may be a SUPER_IPDATA body.
        ``direct``: they came over a direct path (its anti-spoofing check passed), and are
        counted as such.
        """
        tun = self.tun
        assert tun is not None
        acl4 = self.acl.contains_v4
        acl6 = self.acl.contains_v6
        own4 = self.own.contains_v4
        own6 = self.own.contains_v6
        stats = self.stats
        write = tun.write
        mss = self.mss
        m4, m6 = mss or (0, 0)
        delivered = 0
        nbytes = 0
        try:
            for pkt in packets:
                version, addr = src_addr(pkt)
                if version == 4:
                    if own4(addr):
                        stats.dropped_spoofed += 1
                        continue
                    allowed = acl4(addr)
                elif version == 6:
                    if own6(addr):
                        stats.dropped_spoofed += 1
                        continue
                    allowed = acl6(addr)
                else:
                    if not whole:
                        stats.dropped_malformed += 1
                        continue
                    n = self._super_to_tun(pkt)
                    if n:
                        delivered += 1
                        nbytes += n
                    continue
                if not allowed:
                    stats.dropped_acl += 1
                    continue
                if mss is not None:
                    pkt = clamped(pkt, m4, m6)
                write(pkt)
                delivered += 1
                nbytes += len(pkt)
        except OSError as exc:
            # the device is gone (TunDevice raises only then): the data path cannot go on
            self._tun_failed("write", exc)
        if direct:
            stats.packets_from_direct += delivered
            stats.bytes_from_direct += nbytes
        else:
            stats.packets_from_router += delivered
            stats.bytes_from_router += nbytes
        return nbytes

    def _super_to_tun(self, buf: memoryview) -> int:
        """Virtio-net header + packet from the router, or garbage; returns IP bytes written."""
        tun = self.tun
        assert tun is not None
        version, addr = src_addr(buf[_VNET:]) if buf and buf[0] < 0x10 else (0, 0)
        if version == 4:
            spoofed = self.own.contains_v4(addr)
            allowed = self.acl.contains_v4(addr)
        elif version == 6:
            spoofed = self.own.contains_v6(addr)
            allowed = self.acl.contains_v6(addr)
        else:
            self.stats.dropped_malformed += 1
            return 0
        if spoofed:
            self.stats.dropped_spoofed += 1
            return 0
        if not allowed:
            self.stats.dropped_acl += 1
            return 0
        if self.mss is not None:
            buf = clamped_vnet(buf, *self.mss)
        # the kernel validates the header and segments or checksums as it forwards
        tun.write_super(buf)
        return len(buf) - _VNET

    # -- router side

    def on_registered(self, link: RouterLink) -> None:
        cfg = self.cfg
        log.info(
            "registered with router",
            extra=kv(
                server=link.server.url,
                gateway=cfg.gateway,
                features=",".join(sorted(link.session.features)) or "-",
                networks=",".join(cfg.announced) or "-",
            ),
        )

    def on_link_lost(self, link: RouterLink) -> None:
        if self.link is link:
            self.link = None

    async def _connect_once(
        self, server: RouteServer, via: LinkConfig | None, request: LinkRequest | None
    ) -> RouterLink:
        """``via``: the uplink to use (source address, device); ``request``: the link this
        connection is, for a multi-link gateway."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        link = RouterLink(self, server, request)
        bind = via.bind if via is not None else None
        interface = via.interface if via is not None else None
        if server.scheme == "kcp":
            await kcp_transport.connect(
                link,
                server.host,
                server.port,
                self._dtls_context(),
                dtls.Verification(
                    ca_file=cfg.ca_file,
                    server_name=server_hostname(cfg, server),
                    pin=cfg.cert_pin,
                    insecure=cfg.insecure_skip_verify,
                ),
                cfg.kcp_params,
                self.kcp_pool,
                timeout=cfg.connect_timeout,
                local_addr=(bind, 0) if bind is not None else None,
                interface=interface,
            )
            return link
        if bind is None and interface is None:
            # create_connection resolves the name again on every attempt, so a router that
            # moved to a new address is found
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: link,
                    host=server.host,
                    port=server.port,
                    ssl=client_context(cfg),
                    server_hostname=server_hostname(cfg, server),
                    ssl_handshake_timeout=cfg.connect_timeout,
                ),
                timeout=cfg.connect_timeout,
            )
            return link
        connecting = self._connect_via(link, server, bind, interface)
        await asyncio.wait_for(connecting, cfg.connect_timeout)
        return link

    async def _connect_via(
        self, link: RouterLink, server: RouteServer, bind: str | None, interface: str | None
    ) -> None:
        """tls:// from a given source address or device: connect our own socket first."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        family, addr = await linksock.resolve(server.host, server.port, socket.SOCK_STREAM, bind)
        sock = linksock.bound_socket(family, socket.SOCK_STREAM, bind, interface)
        try:
            await loop.sock_connect(sock, addr)
            await loop.create_connection(
                lambda: link,
                sock=sock,
                ssl=client_context(cfg),
                server_hostname=server_hostname(cfg, server),
                ssl_handshake_timeout=cfg.connect_timeout,
            )
        except BaseException:
            sock.close()
            raise

    def _dtls_context(self) -> SSL.Context:
        if self._dtls_ctx is None:
            cfg = self.cfg
            self._dtls_ctx = dtls.client_context(
                dtls.Verification(
                    ca_file=cfg.ca_file, pin=cfg.cert_pin, insecure=cfg.insecure_skip_verify
                ),
                cfg.client_cert_file,
                cfg.client_key_file,
            )
        return self._dtls_ctx

    async def _establish(
        self,
        server: RouteServer,
        via: LinkConfig | None = None,
        request: LinkRequest | None = None,
    ) -> RouterLink:
        """Connect and register; a server that accepts the handshake but never registers us
        (KCP that cannot get through, say) counts as a failure like a refused connection."""
        link = await self._connect_once(server, via, request)
        try:
            done, _ = await asyncio.wait(
                [link.registered, link.closed],
                timeout=self.cfg.heartbeat_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            # a gateway stopping, or dropping its other links: this one goes with them
            link.abort()
            raise
        if link.registered.done() and link.registered.exception() is None:
            return link
        link.abort()
        if link.session.multilink_refused:
            raise NoMultiLink(server.url)
        if link.rejected is not None:
            raise self._fatal(link)
        raise TimeoutError("no registration" if not done else "connection closed")

    @staticmethod
    def _fatal(link: RouterLink) -> FatalError:
        rej = link.rejected
        assert rej is not None
        return FatalError(
            f"{'authentication' if rej.stage == 'AUTH' else 'registration'} "
            f"rejected by router: {rej.error}"
        )

    async def _try_servers(self, indices: Sequence[int]) -> tuple[RouterLink, int] | None:
        """The first of ``route_servers[indices]`` that registers us, in order."""
        servers = self.cfg.route_servers
        for i in indices:
            server = servers[i]
            try:
                log.info("connecting", extra=kv(server=server.url))
                # a plain gateway with links (one, or a router without multi-link) keeps
                # each server to its own uplink
                via = self.cfg.links[i] if self.cfg.links else None
                return await self._establish(server, via), i
            except FatalError:
                raise
            except (TimeoutError, OSError, dtls.DtlsError, SSL.Error) as exc:
                # SSL.Error: see Uplink.run
                log.warning(
                    "cannot connect to router",
                    extra=kv(server=server.url, error=str(exc) or "timeout"),
                )
        return None

    def _server_index(self, server: RouteServer) -> int:
        """``server``'s place in route_servers now; 0 (nothing better) once it is not there
        (the reload that removed it is closing its link)."""
        servers = self.cfg.route_servers
        return servers.index(server) if server in servers else 0

    async def _run_link(self, link: RouterLink) -> RouterLink:
        """Serve on ``link`` until it is lost; while it is not the preferred route server,
        try the better ones now and then and move over to one that works. Returns the link
        it ended on.

        Every turn reads the config of the moment: a reload may reorder route_servers (which
        servers are better than this one) or change preferred_retry_interval."""
        probe: asyncio.Task | None = None
        # the link's start counts as a try of the better servers
        last_probe = time.monotonic()
        try:
            while True:
                cfg = self.cfg
                tick = min(1.0, cfg.heartbeat_interval / 2)
                self.link = link
                await asyncio.wait(
                    [link.closed, probe] if probe is not None else [link.closed], timeout=tick
                )
                now = time.monotonic()
                # the probe first: once it has registered, the router closes the old link
                if probe is not None and probe.done():
                    result = None
                    if not probe.cancelled():
                        if probe.exception() is not None:
                            log.warning(
                                "retrying the preferred route server failed",
                                extra=kv(error=repr(probe.exception())),
                            )
                        else:
                            result = probe.result()
                    probe = None
                    last_probe = now
                    if result is not None:
                        old, (link, _) = link, result
                        self.stats.server_switches += 1
                        log.info(
                            "moved to preferred route server", extra=kv(server=link.server.url)
                        )
                        self.link = link
                        if old.transport is not None:
                            old.transport.close()
                        continue
                if link.closed.done():
                    if probe is not None:
                        # the router may have closed this link because the probe's
                        # registration replaced it; the probe's result decides
                        await asyncio.wait([probe])
                        continue
                    break
                link.tick(now)
                if probe is None and now >= last_probe + cfg.preferred_retry_interval:
                    index = self._server_index(link.server)
                    if index > 0:
                        probe = asyncio.create_task(self._try_servers(range(index)))
        finally:
            if probe is not None:
                probe.cancel()
                # the gateway stopping: a probe that registered just before is closed too
                await asyncio.wait([probe])
                if not probe.cancelled() and probe.exception() is None:
                    won = probe.result()
                    if won is not None and won[0].transport is not None:
                        won[0].transport.close()
        if link.rejected is not None:
            raise self._fatal(link)
        return link

    async def run(self, services: Sequence[Service] = ()) -> None:
        cfg = self.cfg
        for warning in cfg.warnings:
            log.warning("%s", warning)
        if any(server.scheme == "tls" for server in cfg.route_servers):
            self.tcp_congestion()
        try:
            self.open_tun()
        except OSError as exc:
            hint = (
                " (run as root or with CAP_NET_ADMIN)" if isinstance(exc, PermissionError) else ""
            )
            raise SetupError(
                f"cannot create TUN device {cfg.tun_name}: {exc.strerror or exc}{hint}"
            ) from None
        host = self.host_setup()
        opened: list[Service] = []
        try:
            try:
                await self.configure_tun()
            except Exception as exc:
                assert self.tun is not None
                raise SetupError(f"cannot configure TUN device {self.tun.name}: {exc}") from None
            try:
                await asyncio.to_thread(host.apply)
            except HostSetupError as exc:
                raise SetupError(str(exc)) from None
            await self._open_direct()
            self._start_data_path()
            stats_task = asyncio.create_task(self._stats_loop())
            try:
                for service in services:
                    opened.append(service)
                    await service.open()
                await self._serve_links()
                if self._tun_error is not None:
                    raise self._tun_error
            finally:
                stats_task.cancel()
        finally:
            summary: dict = {}
            try:
                self._stopping.set()
                self._stop_data_path()
                for service in opened:
                    service.close()
                if self.direct is not None:
                    self.direct.close()
                self._close_links()
                summary = self._summary()
            finally:
                # whatever failed above, the host changes are undone
                if self.tun is not None:
                    self.tun.close()
                    self.tun = None
                # blocking but bounded (nft timeout); the loop has nothing else left to do
                host.undo()
            log.info("stopped", extra=kv(**summary))

    async def _serve_links(self) -> None:
        """Connect and carry traffic until stop(), in a task of its own that stop() cancels:
        an attempt in flight (connecting, registering, probing the preferred server) ends
        with it and closes what it made. Otherwise one that succeeded after the stop would
        serve on, and the daemon would not exit and undo its host changes."""
        serving = asyncio.ensure_future(
            self._run_uplinks() if self.uplinks else self._connect_loop()
        )
        self._serving = serving
        if self._stopping.is_set():
            serving.cancel()
        try:
            await asyncio.wait([serving])
        finally:
            self._serving = None
            if not serving.done():  # run() itself was cancelled
                serving.cancel()
                await asyncio.wait([serving])
        if not serving.cancelled():
            serving.result()  # FatalError ends the gateway

    async def _connect_loop(self) -> None:
        # Between two rounds over the route servers the gateway sleeps uniform(min, ceiling)
        # (full jitter); the ceiling doubles from reconnect_min_delay with every failed round,
        # up to reconnect_max_delay.
        #
        # The cap is what an operator feels: once the router is back, every office is back
        # within one sleep (at most reconnect_max_delay) plus a handshake, however long the
        # outage was. Hence 3 s by default, not the customary 30 s: after a 20 s router
        # outage traffic resumed 2-24 s after the router was back with 30 s, 1-2 s with 3 s
        # (tls://, five runs each). kcp:// sees no reset from a restarted router: it notices
        # an ICMP error while the router is down, or else kcp.silence_timeout after its first
        # data to the new router went unanswered, and the cap counts from there.
        # A short cap does not hammer a router that is down: a try at a host whose daemon is
        # gone costs a SYN and a RST (kcp://: a datagram and an ICMP error), so 200 offices
        # trying every ~1.75 s on average are ~115 small packets/s, and the jitter spreads
        # their handshakes over the 3 s after it returns. No office tries more often than
        # every reconnect_min_delay.
        #
        # A link lost within heartbeat_interval of registering does not reset the ceiling: a
        # router that takes us and drops us at once (another office registering the same
        # gateway address, say) sees us about once per cap, not twice a second.
        #
        # A link given up for silence (heartbeat_timeout) starts the next round with the
        # server after its own: that router may be hung or gone without a reset (a frozen
        # process, a host that lost power), and trying it first again would cost another
        # connect_timeout before the next server, whose router (another of a cluster, or
        # another address of this one) may well be up. The preferred server is tried again
        # every preferred_retry_interval from there, as after any fallback.
        failed = 0  # rounds since the last link that lasted
        first = 0  # the server the next round starts with
        while not self._stopping.is_set():
            # the config of the moment: a reload may have changed the servers and delays
            cfg = self.cfg
            servers = cfg.route_servers
            first = first if first < len(servers) else 0
            order = [*range(first, len(servers)), *range(first)]
            first = 0
            result = await self._try_servers(order)
            if result is None:
                failed += 1
            else:
                link, index = result
                self.stats.connects += 1
                if self.stats.connects > 1:
                    self.stats.reconnects += 1
                if index > 0:
                    self.stats.fallbacks += 1
                    log.warning(
                        "using fallback route server",
                        extra=kv(
                            server=link.server.url,
                            retry=servers[0].url,
                            every=f"{cfg.preferred_retry_interval:g}s",
                        ),
                    )
                since = time.monotonic()
                link = await self._run_link(link)
                if self._stopping.is_set():
                    break
                if self._reconnect_now:
                    self._reconnect_now = False
                    failed = 0
                    continue
                why = link.closed.result() if link.closed.done() else None
                log.warning(
                    "connection to router lost", extra=kv(server=link.server.url, reason=why)
                )
                lasted = time.monotonic() - since >= self.cfg.heartbeat_interval
                failed = 0 if lasted else failed + 1
                if link.silent:
                    first = self._server_index(link.server) + 1
            failed = min(failed, 32)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=backoff(self.cfg, failed))

    async def _stats_loop(self) -> None:
        interval = self.cfg.stats_interval
        if not interval:
            return
        while True:
            await asyncio.sleep(interval)
            log.info("stats", extra=kv(**self._summary()))

    def _summary(self) -> dict[str, object]:
        # the TUN counts its own write failures; copy them in when reporting
        if self.tun is not None:
            self.stats.tun_write_errors = self.tun.write_errors
            self.stats.tun_write_dropped = self.tun.write_dropped
        fields = self.stats.fields()
        link = self.link
        kcp = link.transport.get_extra_info("kcp_link") if link and link.transport else None
        if kcp is not None:
            fields.update(transport="kcp", fec=kcp.fec_state, srtt_ms=kcp.srtt_ms)
            # out-of-order delivery (kcp.unordered): whether we send so, and what came so
            fields.update(
                kcp_unordered=int(kcp.unordered_send),
                kcp_early=kcp.early_deliveries,
                kcp_urgent=kcp.urgent_segments,
                kcp_urgent_copies=kcp.urgent_copies,
            )
            # what in-order delivery cost: time received data waited behind a hole
            fields["kcp_hole_ms"] = int(kcp.hole_seconds * 1000)
            cc = pathstats.congestion_figures(kcp)
            if cc is not None:
                fields.update(
                    cc_state=cc.state,
                    cc_pacing_mbit=round(cc.pacing_rate * 8e-6, 2),
                    cc_btl_bw_mbit=round(cc.bottleneck_bandwidth * 8e-6, 2),
                    cc_min_rtt_ms=None if cc.min_rtt is None else round(cc.min_rtt * 1e3, 1),
                    cc_cwnd=cc.cwnd,
                    cc_inflight=cc.inflight,
                    cc_queued=cc.queued,
                    cc_queue_cuts=cc.queue_corrections,
                    cc_foreign_queues=cc.foreign_queues,
                    kcp_retrans=kcp.retransmissions,
                )
            if kcp.fec is not None:
                fields.update(kcp.fec.stats.fields("fec_"))
        elif link is not None:
            fields["transport"] = link.server.scheme
        if self.uplinks:
            fields["links"] = ",".join(self._link_state(u) for u in self.uplinks.values())
        if self.direct is not None and self.direct.manager.peers:
            fields["direct"] = ",".join(
                view.direct_peer_text(p) for p in self.direct.manager.statuses()
            )
        return fields

    @staticmethod
    def _link_state(u: Uplink) -> str:
        """One link for the stats line: ``v4:up:rtt_ms=3:loss=0.0012:downs=0:tx=1200:rx=800``
        (loss: pathstats' retransmitted share of what we sent; bytes over all of its
        connections)."""
        v = view.uplink_view(u)
        conn = v.connection if v.up else None
        rtt = conn.heartbeat_rtt if conn is not None else None
        loss = conn.figures.path.loss if conn is not None else None
        tx, rx = v.traffic.bytes_out, v.traffic.bytes_in
        return (
            f"{u.name}:{'up' if u.up else 'down'}"
            + (f":rtt_ms={rtt * 1000:.0f}" if rtt is not None else "")
            + (f":loss={loss:.4f}" if loss is not None else "")
            + f":downs={u.downs}:tx={tx}:rx={rx}"
        )

    def stop(self) -> None:
        self._stopping.set()
        self._close_links()
        if self._serving is not None:
            self._serving.cancel()

    def _start_uplink(self, u: Uplink) -> None:
        self._link_tasks[u.name] = asyncio.create_task(u.run())
        self._links_changed.set()

    def _apply_links(self, old: GatewayConfig, cfg: GatewayConfig) -> list[str]:
        """A reload's links, while the gateway has several before and after: links that
        went are closed, new ones connect, and changed ones connect again (REGISTER
        carries weight and role, and the router holds them per connection)."""
        before = {c.name: c for c in old.links}
        after = {c.name: c for c in cfg.links}
        changes = []
        for name in [n for n in before if n not in after]:
            u = self.uplinks.pop(name)
            u.retired = True
            task = self._link_tasks.pop(name, None)
            if u.link is not None and u.link.transport is not None:
                u.link.transport.close()
            if task is not None:
                task.cancel()
            self.flows.remove(u.path_id)
            self.by_path.pop(u.path_id, None)
            changes.append(f"closed link {name}")
        for name, c in after.items():
            if name not in before:
                path_id = self._path_ids.get(name)
                if path_id is None:
                    path_id = max(self._path_ids.values(), default=0) + 1
                    self._path_ids[name] = path_id
                u = self.uplinks[name] = Uplink(self, c, path_id)
                self.flows.add(u.path(), up=False)
                if self._uplinks_running:
                    self._start_uplink(u)
                changes.append(f"added link {name}")
            elif before[name] != c:
                u = self.uplinks[name]
                u.config = c
                self.flows.add(u.path(), up=u.up)
                if u.link is not None and u.link.transport is not None:
                    u.reconnect_now = True
                    u.link.transport.close()
                changes.append(f"reconnecting link {name} with its new settings")
        return changes

    def _close_links(self) -> None:
        links = [self.link] + [u.link for u in self.uplinks.values()]
        for link in links:
            if link is not None and link.transport is not None:
                link.transport.close()

    async def _run_uplinks(self) -> None:
        """Every link on its own until the gateway stops; a refusal by the router ends all.

        A router without multi-link (PoleVPN's) would let each link's REGISTER replace the
        others'. The gateway then uses one link at a time, as route_servers in the order of
        ``links``, until it is restarted.
        """
        self._uplinks_running = True
        for u in self.uplinks.values():
            self._start_uplink(u)
        refused: NoMultiLink | None = None
        try:
            while not self._stopping.is_set():
                # a reload may add links (and their tasks) while we wait
                self._links_changed.clear()
                changed = asyncio.ensure_future(self._links_changed.wait())
                tasks = set(self._link_tasks.values())
                try:
                    done, _ = await asyncio.wait(
                        tasks | {changed}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    changed.cancel()
                for task in done & tasks:
                    self._link_tasks = {n: t for n, t in self._link_tasks.items() if t is not task}
                    if not task.cancelled():
                        task.result()  # FatalError ends the gateway, NoMultiLink below
        except NoMultiLink as exc:
            refused = exc
        finally:
            self._stopping_links = True
            for u in self.uplinks.values():
                if u.link is not None and u.link.transport is not None:
                    u.link.transport.close()
            tasks = list(self._link_tasks.values())
            self._link_tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._stopping_links = False
            self._uplinks_running = False
        if refused is None:
            return
        log.warning(
            "router does not take multi-link (a PoleVPN router, an older polevpn, or "
            "multi_link off): using one link at a time, in the order of links, until restarted",
            extra=kv(router=refused),
        )
        self.uplinks = {}
        self.by_path.clear()
        await self._connect_loop()

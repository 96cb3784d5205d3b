"""Router-to-router links: one TLS connection between each pair of routers of a cluster.

A router link is the PoleVPN framing over tls:// with the ``router-peer`` feature agreed in
AUTH (docs/protocol.md section 17; the handshake is ``proto.session.PeerClientSession``
and ``ServerSession``, the proofs ``proto.peering``). Once up it is, to forwarding, one
more endpoint (``PeerLink``): a destination for what only that router holds (its routes
are fallback claims in the router's table, ``cluster.routes``), and a source whose packets
may carry only the source addresses that router announces and go to local gateways only.
Super-packets cross it whole: both ends always agree ``super-packets``.

**One link per pair.** Of two routers, the one with the lower id (plain string order)
dials, the other only accepts. Both know both ids from the cluster's store, so exactly one
side dials, and no duplicate has to be found and closed. Should two links to one router be
up anyway (a router restarted and dialed before its old link was noticed dead), the newer
replaces the older. The dialing side reconnects with a jittered backoff
(RECONNECT_MIN..RECONNECT_MAX), from the moment its link is lost.

**Liveness.** The dialing side sends a heartbeat every PEER_HEARTBEAT, which the other side
echoes; either side takes the link for dead after PEER_TIMEOUT of silence (any frame counts)
and closes it, and its routes leave the data path at once (``RemoteRoutes.set_hop``). A
router that dies is therefore noticed within PEER_TIMEOUT + LIVENESS_INTERVAL, sooner when
its host's kernel resets the connection.

The listening side's connection starts as any gateway's (the router's ``GatewayConnection``,
counted against the same pending-connection limits, refused and counted the same way); when
its handshake succeeds the router hands the transport and session to ``PeerLinks.adopt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from polevpn.cluster.routes import PeerSources, RemoteRoutes
from polevpn.cluster.view import PeerLinkView
from polevpn.common.counters import Counters
from polevpn.common.logfmt import kv
from polevpn.io import linksock, tcpcc
from polevpn.io.pathstats import path_figures
from polevpn.packet.gso import VNET_HDR_LEN
from polevpn.proto import wire
from polevpn.proto.peering import PeerCredentials
from polevpn.proto.session import (
    ConnectionLost,
    PeerAuthenticated,
    PeerClientSession,
    Rejected,
    ServerSession,
    State,
)

log = logging.getLogger("polevpn.cluster")

# s between the dialing side's heartbeats, and of silence after which a link is dead
PEER_HEARTBEAT = 0.25
PEER_TIMEOUT = 1.5
# how often links are checked for silence (and heartbeats sent)
LIVENESS_INTERVAL = 0.1
# s for TCP and TLS, and again for the handshake's AUTH and REGISTER
CONNECT_TIMEOUT = 5.0
# the dialing side's backoff between attempts: uniform(min, ceiling), the ceiling doubling
# from RECONNECT_MIN per failed attempt up to RECONNECT_MAX
RECONNECT_MIN = 0.2
RECONNECT_MAX = 3.0
# the rates in the view are over at least this long
RATE_INTERVAL = 1.0

_HDR = wire.HEADER_LEN
_LINGER_RESET = b"\1\0\0\0\0\0\0\0"


@dataclass
class PeerStats(Counters):
    # attempts to dial another router, and those that did not bring a link up
    dials: int = 0
    dial_failures: int = 0
    # links that came up (either direction) and links that went down after being up
    links_up: int = 0
    links_down: int = 0
    # went down because nothing was heard for PEER_TIMEOUT
    timeouts: int = 0
    # handshakes this router refused: a wrong credential, another cluster, our own id
    refused: int = 0
    # handshakes the dialed router refused, or in which it did not prove the credential
    rejected: int = 0
    # an up link replaced by a newer one to the same router
    replaced: int = 0
    # packets not sent on a link: its queue was full, or it was closing
    dropped_queue_full: int = 0
    # packets that arrived on a link this router was closing
    dropped_closing: int = 0
    # packets from a link: sources the router does not announce, or for a third router
    dropped_spoofed: int = 0
    dropped_transit: int = 0


def backoff(failed: int) -> float:
    """Seconds before the next dial after ``failed`` attempts that did not last."""
    ceiling = min(RECONNECT_MAX, RECONNECT_MIN * 2 ** min(failed, 16))
    return random.uniform(RECONNECT_MIN, max(RECONNECT_MIN, ceiling))


def client_context() -> ssl.SSLContext:
    """The dialing side's TLS: the certificate is not what authenticates the other router
    (the proofs over the channel binding are), so it is not checked against a CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def channel_binding(transport: asyncio.BaseTransport) -> bytes | None:
    """The TLS connection's ``tls-unique`` binding, the same at both ends; None if none."""
    ssl_obj = transport.get_extra_info("ssl_object")
    if ssl_obj is None:
        return None
    try:
        return ssl_obj.get_channel_binding("tls-unique")
    except (ValueError, ssl.SSLError):
        return None


_NO_SOURCES = PeerSources()


class PeerLink(asyncio.Protocol):
    """One link to another router: dialed by this router, or accepted and then adopted."""

    # what forwarding asks of an endpoint (forwarding.Endpoint)
    site = None
    router_link = True
    transport_name = "tls"

    def __init__(self, links: PeerLinks, dialed: bool, address: str, expected: str | None):
        self.links = links
        self.dialed = dialed
        # the address dialed, or the other router's source address
        self.address = address
        self.router_id = expected
        self.transport: asyncio.Transport | None = None
        self.session: PeerClientSession | ServerSession | None = None
        # what that router announces: what it may send from; nothing until the link is up
        self.sources: PeerSources = _NO_SOURCES
        self.up = False
        self.closing = False
        self.up_at = 0.0
        self.rejected: str | None = None
        self.packets_in = 0
        self.packets_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped_queue_full = 0
        self.dropped_spoofed = 0
        self.dropped_transit = 0
        self.queue_limit = links.queue_bytes
        loop = asyncio.get_running_loop()
        self.authenticated: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def __repr__(self) -> str:
        return f"<router link {self.router_id or '?'} {self.address}>"

    @property
    def super_packets(self) -> bool:
        session = self.session
        return session is not None and session.super_packets

    # -- asyncio callbacks (the dialing side; an adopted link gets its transport handed in)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._set_queue()
        choice = self.links.congestion()
        if choice is not None:
            tcpcc.apply(transport.get_extra_info("socket"), choice)
        binding = channel_binding(transport)
        if binding is None:
            log.warning("router link without a TLS channel binding", extra=kv(peer=self.address))
            transport.abort()  # type: ignore[attr-defined]
            return
        self.session = PeerClientSession(
            self.links.credentials,
            binding,
            time.monotonic(),
            PEER_HEARTBEAT,
            PEER_TIMEOUT,
            expected=self.router_id,
        )
        self.flush()

    def _set_queue(self) -> None:
        assert self.transport is not None
        self.queue_limit = linksock.shorten_queue(self.transport, self.links.queue_bytes)

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception:
            # a bug reached by the other router's bytes costs this link, nothing more
            log.exception("internal error on a router link; closing it", extra=kv(**self._who()))
            self.close(None, abort=True)

    def _received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        packets, events = session.receive(data, time.monotonic())
        if self.closing:
            # a link being closed (replaced, timed out): what it still delivers is stale
            self.links.stats.dropped_closing += len(packets)
            return
        for ev in events:
            self._event(ev)
        if packets and self.up:
            self.take(packets)
        if session.outbox:
            self.flush()
        if session.state is State.CLOSED and not self.closing:
            self.close(None)

    def take(self, packets: list[memoryview]) -> None:
        """Packets from the other router, into forwarding."""
        self.packets_in += len(packets)
        out = self.links.deliver(self, packets)
        if out is not None:
            spoofed, transit = out.dropped_spoofed, out.dropped_peer_transit
            if spoofed or transit:
                self.dropped_spoofed += spoofed
                self.dropped_transit += transit
                stats = self.links.stats
                stats.dropped_spoofed += spoofed
                stats.dropped_transit += transit

    def _event(self, ev: object) -> None:
        if isinstance(ev, PeerAuthenticated):
            self.links._up(self, ev.router_id)
        elif isinstance(ev, Rejected):
            self.rejected = ev.error
            self.links.stats.rejected += 1
            log.warning(
                "router link refused", extra=kv(**self._who(), stage=ev.stage, reason=ev.error)
            )
        elif isinstance(ev, ConnectionLost):
            log.warning("router link protocol error", extra=kv(**self._who(), reason=ev.reason))

    def _who(self) -> dict[str, object]:
        return {"router": self.router_id or "?", "peer": self.address}

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.links._down(self, exc)
        if not self.closed.done():
            self.closed.set_result(None)
        self.transport = None

    # -- output

    def flush(self) -> None:
        transport, session = self.transport, self.session
        if transport is None or session is None or transport.is_closing():
            return
        out = session.data_to_send()
        if out:
            transport.write(b"".join(out))

    def send_batch(self, parts: list[bytes | memoryview], supers: int) -> None:
        """Frames from forwarding (headers and bodies, alternating; ``supers`` of them
        SUPER_IPDATA), written with one call as far as the queue lets them in."""
        stats = self.links.stats
        transport = self.transport
        if transport is None or self.closing or not self.up:
            n = len(parts) // 2
            self.dropped_queue_full += n
            stats.dropped_queue_full += n
            return
        data = b"".join(parts)
        room = self.queue_limit - transport.get_write_buffer_size()
        if len(data) > room:
            kept, supers = wire.fitting(parts, supers, room)
            n = (len(parts) - kept) // 2
            self.dropped_queue_full += n
            stats.dropped_queue_full += n
            if not kept:
                return
            parts = parts[:kept]
            data = b"".join(parts)
        count = len(parts) // 2
        self.packets_out += count
        self.bytes_out += len(data) - count * _HDR - supers * VNET_HDR_LEN
        transport.write(data)

    def tick(self, now: float) -> None:
        """Heartbeats (the dialing side) and silence (both sides)."""
        session = self.session
        if session is None or self.closing:
            return
        if isinstance(session, PeerClientSession):
            lost = session.tick(now)
            if lost is not None:
                if self.up:
                    self.links.stats.timeouts += 1
                self.close(lost.reason, abort=True)
                return
            if session.outbox:
                self.flush()
        elif now - session.last_heard > PEER_TIMEOUT:
            self.links.stats.timeouts += 1
            self.close(f"nothing heard for {PEER_TIMEOUT:g}s", abort=True)

    def close(self, reason: str | None, abort: bool = False) -> None:
        """Close the link; ``abort``: at once, with a reset, dropping what is queued."""
        if self.closing:
            return
        self.closing = True
        if reason:
            log.info("closing router link", extra=kv(**self._who(), reason=reason))
        # its routes leave the data path now, not when the close completes
        self.links._down(self, None)
        transport = self.transport
        if transport is None:
            if not self.closed.done():
                self.closed.set_result(None)
            return
        if abort:
            # a reset: nothing queued is sent late, nothing stays behind in TIME_WAIT
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            transport.abort()
        else:
            self.flush()
            transport.close()
            asyncio.get_running_loop().call_later(CONNECT_TIMEOUT, transport.abort)


# -- the read model


@dataclass(frozen=True, slots=True)
class PeerLinksView:
    """The links to the other routers (ClusterView.peer_links) and their counters."""

    router_id: str
    cluster: str
    links: tuple[PeerLinkView, ...]
    stats: Mapping[str, int]

    @property
    def up(self) -> int:
        return sum(1 for link in self.links if link.state == "up")


@dataclass
class _Totals:
    """One other router's figures across its links, and the last rate sample."""

    connects: int = 0
    last_error: str = ""
    closed: list[int] = field(default_factory=lambda: [0] * 7)
    sample_at: float = 0.0
    sample: tuple[int, int] = (0, 0)
    rate_in: float = 0.0
    rate_out: float = 0.0


def _figures(link: PeerLink | None) -> list[int]:
    if link is None:
        return [0] * 7
    return [
        link.packets_in,
        link.packets_out,
        link.bytes_in,
        link.bytes_out,
        link.dropped_queue_full,
        link.dropped_spoofed,
        link.dropped_transit,
    ]


Deliver = Callable[[PeerLink, list[memoryview]], Any]


class PeerLinks:
    """This router's links to the other routers of its cluster.

    ``set_peers`` says which routers there are and where they are reached (the cluster
    state calls it as the store changes); the links to those with a higher id are dialed
    and kept up. ``deliver(link, packets)`` is the router's forwarding, which returns its
    ``Forwarded`` (for the per-link drop counts).
    """

    def __init__(
        self,
        credentials: PeerCredentials,
        remote: RemoteRoutes[Any],
        deliver: Deliver,
        queue_bytes: int = linksock.LINK_QUEUE_BYTES,
        congestion: Callable[[], tcpcc.Choice | None] = lambda: None,
    ) -> None:
        self.credentials = credentials
        self.remote = remote
        self.deliver = deliver
        self.queue_bytes = queue_bytes
        self.congestion = congestion
        self.stats = PeerStats()
        # up links by router id; links dialing or shaking hands
        self.links: dict[str, PeerLink] = {}
        self.pending: set[PeerLink] = set()
        # every other router the store knows, and where
        self.peers: dict[str, tuple[str, int]] = {}
        self._dialers: dict[str, tuple[tuple[str, int], asyncio.Task[None]]] = {}
        self._totals: dict[str, _Totals] = {}
        self._ctx = client_context()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def router_id(self) -> str:
        return self.credentials.router_id

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def close(self) -> None:
        """Stop dialing and close every link (the router is stopping, or leaving its
        cluster); for good: nothing is dialed after this."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for _, task in self._dialers.values():
            task.cancel()
        self._dialers.clear()
        for link in [*self.links.values(), *self.pending]:
            link.close("router shutting down", abort=True)

    def set_credentials(self, credentials: PeerCredentials) -> None:
        """A reload's: the next handshakes use them; links up stay up."""
        self.credentials = credentials

    def set_peers(self, peers: Mapping[str, tuple[str, int]]) -> None:
        """The other routers and their peer addresses, as the cluster's store has them.

        Those with a higher id than this router's are dialed (again, if their address
        changed); the others dial this router. A router that is no longer listed is not
        dialed any more, but a link up to it stays up until it fails: its routes went with
        its keys anyway, and a store that lost it for a moment costs no packets. Listed
        again, it is dialed again only once that link fails.
        """
        if self._closed:
            return
        own = self.router_id
        self.peers = {rid: addr for rid, addr in peers.items() if rid != own}
        wanted = {rid: addr for rid, addr in self.peers.items() if rid > own}
        for rid, (addr, task) in list(self._dialers.items()):
            if wanted.get(rid) != addr:
                task.cancel()
                del self._dialers[rid]
        loop = asyncio.get_running_loop()
        for rid, addr in wanted.items():
            if rid not in self._dialers:
                task = loop.create_task(self._dial_loop(rid, addr))
                self._dialers[rid] = (addr, task)

    # -- the listening side

    def adopt(
        self, transport: asyncio.BaseTransport, session: ServerSession, peer: str
    ) -> PeerLink:
        """A connection to this router's listener whose session has just proved itself a
        router of the cluster: from now on a router link."""
        link = PeerLink(self, dialed=False, address=peer, expected=session.peer_id)
        link.session = session
        link.transport = transport  # type: ignore[assignment]
        transport.set_protocol(link)
        link._set_queue()
        # the handshake's last reply (our proof) is still in the session's outbox
        link.flush()
        assert session.peer_id is not None
        self._up(link, session.peer_id)
        return link

    def refused(self) -> None:
        """The router refused a router-link handshake on its listener."""
        self.stats.refused += 1

    # -- link state

    def _totals_of(self, rid: str) -> _Totals:
        t = self._totals.get(rid)
        if t is None:
            t = self._totals[rid] = _Totals()
        return t

    def _up(self, link: PeerLink, rid: str) -> None:
        old = self.links.get(rid)
        if old is not None and old is not link:
            self.stats.replaced += 1
            old.close("replaced by a newer link to the same router", abort=True)
        link.router_id = rid
        link.up = True
        link.up_at = time.monotonic()
        link.sources = self.remote.sources(rid)
        self.pending.discard(link)
        self.links[rid] = link
        self.remote.set_hop(rid, link)
        self.stats.links_up += 1
        totals = self._totals_of(rid)
        totals.connects += 1
        totals.last_error = ""
        log.info(
            "router link up",
            extra=kv(
                router=rid,
                peer=link.address,
                direction="dialed" if link.dialed else "accepted",
                features=",".join(sorted(link.session.features)) if link.session else "-",
            ),
        )
        if not link.authenticated.done():
            link.authenticated.set_result(None)

    def _down(self, link: PeerLink, exc: Exception | None) -> None:
        self.pending.discard(link)
        if not link.up:
            return
        link.up = False
        rid = link.router_id
        assert rid is not None
        totals = self._totals_of(rid)
        totals.closed = [a + b for a, b in zip(totals.closed, _figures(link), strict=True)]
        if exc is not None:
            totals.last_error = str(exc) or type(exc).__name__
        self.stats.links_down += 1
        if self.links.get(rid) is link:
            del self.links[rid]
            self.remote.set_hop(rid, None)
        log.warning(
            "router link down",
            extra=kv(
                router=rid,
                peer=link.address,
                up_s=round(time.monotonic() - link.up_at, 3),
                packets_in=link.packets_in,
                packets_out=link.packets_out,
                **({"error": exc} if exc else {}),
            ),
        )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(LIVENESS_INTERVAL)
            now = time.monotonic()
            for link in [*self.links.values(), *self.pending]:
                link.tick(now)
            for rid, t in self._totals.items():
                if now - t.sample_at >= RATE_INTERVAL:
                    f = self._sum(rid)
                    if t.sample_at:
                        dt = now - t.sample_at
                        t.rate_in = (f[2] - t.sample[0]) / dt
                        t.rate_out = (f[3] - t.sample[1]) / dt
                    t.sample_at, t.sample = now, (f[2], f[3])

    def _sum(self, rid: str) -> list[int]:
        t = self._totals_of(rid)
        live = _figures(self.links.get(rid))
        return [a + b for a, b in zip(t.closed, live, strict=True)]

    # -- the dialing side

    async def _dial_loop(self, rid: str, addr: tuple[str, int]) -> None:
        host, port = addr
        text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        failed = 0
        kept = self.links.get(rid)
        if kept is not None and kept.up and kept.dialed and kept.address == text:
            # the link of an earlier dialer, kept while the store did not list the router
            # (its lease lapsed, and its keys are back): it is dialed again when it fails,
            # not replaced now, which would drop what is queued on it
            try:
                await asyncio.shield(kept.closed)
            except asyncio.CancelledError:
                return
            await asyncio.sleep(backoff(failed))
        while True:
            link = PeerLink(self, dialed=True, address=text, expected=rid)
            error = await self._dial(link, host, port)
            if link.up:
                try:
                    await asyncio.shield(link.closed)
                except asyncio.CancelledError:
                    # not dialed any more (set_peers): the link stays until it fails
                    return
                lasted = time.monotonic() - link.up_at >= PEER_TIMEOUT
                failed = 0 if lasted else failed + 1
            else:
                failed += 1
                self.stats.dial_failures += 1
                self._totals_of(rid).last_error = error
                if failed & (failed - 1) == 0:  # 1st, 2nd, 4th...: the log stays readable
                    log.warning(
                        "cannot reach router",
                        extra=kv(router=rid, peer=text, attempts=failed, error=error),
                    )
            await asyncio.sleep(backoff(failed))

    async def _dial(self, link: PeerLink, host: str, port: int) -> str:
        """One attempt: the link up, or why not."""
        self.stats.dials += 1
        self.pending.add(link)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: link,
                    host,
                    port,
                    ssl=self._ctx,
                    ssl_handshake_timeout=CONNECT_TIMEOUT,
                ),
                CONNECT_TIMEOUT,
            )
            await asyncio.wait(
                [link.authenticated, link.closed],
                timeout=CONNECT_TIMEOUT,
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            self.pending.discard(link)
            link.close(None, abort=True)
            raise
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.pending.discard(link)
            link.close(None, abort=True)
            return str(exc) or type(exc).__name__
        if link.up:
            return ""
        self.pending.discard(link)
        link.close(None, abort=True)
        return link.rejected or ("closed" if link.closed.done() else "no handshake")

    # -- the read model

    def view(self, now: float | None = None, wall: float | None = None) -> PeerLinksView:
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        rows = []
        for rid in sorted(set(self.peers) | set(self.links) | set(self._totals)):
            link = self.links.get(rid)
            t = self._totals_of(rid)
            f = self._sum(rid)
            dials = rid > self.router_id
            rtt_ms: float | None = None
            if link is not None:
                state = "up"
                direction = "dialed" if link.dialed else "accepted"
                session = link.session
                if isinstance(session, PeerClientSession) and session.rtt is not None:
                    rtt_ms = session.rtt * 1000
                else:
                    rtt_ms = path_figures(link.transport, "tls").rtt_ms
            else:
                state = "connecting" if dials and rid in self._dialers else "down"
                direction = "dials" if dials else "accepts"
            addr = self.peers.get(rid)
            rows.append(
                PeerLinkView(
                    router_id=rid,
                    address="" if addr is None else _address(addr),
                    state=state,
                    since=wall - (now - link.up_at) if link is not None else None,
                    packets_in=f[0],
                    packets_out=f[1],
                    bytes_in=f[2],
                    bytes_out=f[3],
                    rtt_ms=rtt_ms,
                    direction=direction,
                    peer=link.address if link is not None else "",
                    connects=t.connects,
                    last_error=t.last_error,
                    rate_in=t.rate_in if link is not None else 0.0,
                    rate_out=t.rate_out if link is not None else 0.0,
                    dropped_queue_full=f[4],
                    dropped_spoofed=f[5],
                    dropped_transit=f[6],
                )
            )
        return PeerLinksView(
            router_id=self.router_id,
            cluster=self.credentials.cluster,
            links=tuple(rows),
            stats=dict(self.stats.fields()),  # type: ignore[arg-type]
        )


def _address(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""kcp:// sockets: UDP datagrams, DTLS, then ``KcpLink``, shown to the protocols as a stream.

``KcpTransport`` looks like an asyncio stream transport (write, close, flow control through
pause_writing/resume_writing), so the router's ``GatewayConnection`` and the gateway's
``RouterLink`` run unchanged on kcp:// and tls://. ``KcpServer`` is the router's UDP
endpoint: one socket (a ``udpsock.UdpEndpoint``), sessions told apart by the peer's address,
the cookie exchange in front of any per-peer state, every reply from the local address the
peer sent to. ``connect`` is the gateway's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from polevpn.common.logfmt import endpoint as fmt
from polevpn.common.logfmt import kv
from polevpn.config import HandshakeLimits, KcpParams
from polevpn.direct.messages import is_datagram
from polevpn.io import linksock
from polevpn.io.udp_batch import SOL_UDP, UdpBatchSender
from polevpn.io.udpsock import Ancillary, Source, SourceGone, source_of
from polevpn.kcp.connection import (
    ConnectionTerminated,
    Event,
    HandshakeCompleted,
    KcpConnection,
    StreamDataReceived,
    WritableChanged,
)
from polevpn.kcp.dtls import (
    CookieJar,
    CookieListener,
    DtlsError,
    DtlsSession,
    Verification,
)
from polevpn.kcp.kcp_link import KcpLink
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.kcp.server import (
    HandshakeEnded,
    HandshakeSlots,
    KcpServerCore,
    KcpServerStats,
    Pending,
    SessionEstablished,
    SessionReplaced,
)

__all__ = ["HandshakeSlots", "KcpServer", "KcpServerStats", "KcpTransport", "connect"]

log = logging.getLogger("polevpn.kcp")

Addr = tuple[Any, ...]


class KcpTransport:
    """One kcp:// session (a ``KcpConnection``) as a stream transport."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: KcpConnection,
        send_many: Callable[[list[bytes]], None],
        on_closed: Callable[[KcpTransport], None],
    ) -> None:
        self._loop = loop
        self.conn = conn
        self._send_many = send_many
        self.peer: Addr = conn.peer
        self._on_closed = on_closed
        self._protocol: asyncio.Protocol | None = None
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._settle_scheduled = False

    # -- what the orchestrators and the tests read

    @property
    def dtls(self) -> DtlsSession:
        return self.conn.dtls

    @property
    def link(self) -> KcpLink:
        link = self.conn.link
        assert link is not None, "a KcpTransport is made once the handshake is done"
        return link

    @property
    def last_heard(self) -> float:
        return self.conn.last_heard

    @property
    def datagrams_in(self) -> int:
        return self.conn.datagrams_in

    @property
    def datagrams_out(self) -> int:
        return self.conn.datagrams_out

    # -- asyncio transport surface

    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.Protocol | None:
        return self._protocol

    def start(self, protocol: asyncio.Protocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)  # type: ignore[arg-type]
        self._pump(time.monotonic())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        if name == "peercert_der":
            cert = self.dtls.conn.get_peer_certificate(as_cryptography=True)
            if cert is None:
                return default
            return cert.public_bytes(Encoding.DER)
        if name == "cipher":
            return self.dtls.conn.get_cipher_name()
        if name == "kcp_link":
            return self.conn.link
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 1 << 20
        if low is None:
            low = high // 4
        self.conn.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.conn.pending_bytes

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | memoryview) -> None:
        if self._closing:
            return
        now = time.monotonic()
        self.conn.send(data, now)
        self._pump(now)

    def pause_reading(self) -> None:
        self.conn.set_reading(False, time.monotonic())

    def resume_reading(self) -> None:
        if self.conn.reading or self._closing:
            return
        now = time.monotonic()
        self.conn.set_reading(True, now)
        self._pump(now)

    def is_reading(self) -> bool:
        return self.conn.reading

    @property
    def authenticated(self) -> bool:
        """False on the router's side until the orchestrator sees AUTH succeed: until then
        the session has a small KCP receive window and decodes no FEC (issue 20)."""
        return self.conn.authenticated

    @authenticated.setter
    def authenticated(self, value: bool) -> None:
        if not value or self.conn.authenticated or self._closing:
            return
        now = time.monotonic()
        self.conn.authenticate(now)
        self._pump(now)

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def close(self) -> None:
        if self._closing:
            return
        now = time.monotonic()
        self.conn.close(now, notify_peer=True)
        self._pump(now)

    def abort(self) -> None:
        if self._closing:
            return
        now = time.monotonic()
        self.conn.close(now, notify_peer=False)
        self._pump(now)

    # -- input from the endpoint

    def datagram_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.conn.receive_datagram(data, time.monotonic())
        self.received()

    def received(self) -> None:
        """The connection was given a datagram (here or by the server's demux)."""
        if self.conn.closed:
            self._pump(time.monotonic())
        elif not self._settle_scheduled:
            # after every datagram the loop has read in this pass: one ACK datagram and
            # one delivery upwards for the lot
            self._settle_scheduled = True
            self._loop.call_soon(self._settle)

    def _settle(self) -> None:
        if not self._settle_scheduled or self._closing:
            return
        self._settle_scheduled = False
        try:
            self._pump(time.monotonic())
        except Exception:
            log.exception("internal error on kcp input; closing it", extra=kv(peer=fmt(self.peer)))
            self.abort()

    # -- output, events and timers

    def _pump(self, now: float) -> None:
        """Send what the connection has, act on its events, and arm the timer."""
        if self._closing:
            return
        conn = self.conn
        out = conn.datagrams_to_send(now)
        if out:
            if conn.closed:
                # a close_notify: what KCP still held is lost, the peer is told anyway
                with contextlib.suppress(OSError):
                    self._send_many(out)
            else:
                self._send_many(out)
        ev = conn.next_event()
        while ev is not None:
            self._event(ev)
            ev = conn.next_event()
        if self._closing:
            return
        deadline = conn.get_timer()
        if deadline is None:
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _event(self, ev: Event) -> None:
        protocol = self._protocol
        if isinstance(ev, StreamDataReceived):
            if protocol is not None and not self._closing:
                protocol.data_received(ev.data)
        elif isinstance(ev, WritableChanged):
            if protocol is not None and not self._closing:
                if ev.writable:
                    protocol.resume_writing()
                else:
                    protocol.pause_writing()
        elif isinstance(ev, ConnectionTerminated):
            self._finish(None if ev.error is None else ConnectionResetError(ev.error))

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing:
            return
        try:
            now = time.monotonic()
            self.conn.handle_timer(now)
            self._pump(now)
        except Exception:
            log.exception("internal error in kcp timer; closing it", extra=kv(peer=fmt(self.peer)))
            self.abort()

    def _finish(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_closed(self)
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            # no reference back to the protocol once it is told: transport and protocol
            # would otherwise hold each other (DTLS, KCP and FEC state with them) until the
            # cyclic garbage collector ran, which a soak of 1000 sessions measured as 5.7 MB
            self._loop.call_soon(protocol.connection_lost, exc)


SOCKET_BUFFER = 4 * 1024 * 1024  # as PoleVPN sets for KCP
UDP_GRO = 104


def enlarge_buffers(udp: asyncio.BaseTransport, size: int = SOCKET_BUFFER) -> None:
    """KCP without a congestion window sends a whole window at once; the kernel's default
    UDP buffers (about 200 KB) drop most of a 512-segment burst before we can read it."""
    sock = udp.get_extra_info("socket")
    if sock is None:
        return
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
        try:
            # SO_RCVBUFFORCE / SO_SNDBUFFORCE pass net.core.rmem_max with CAP_NET_ADMIN
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


def enable_gro(udp: asyncio.BaseTransport) -> bool:
    """Let the kernel hand over a run of datagrams from one peer as one buffer (UDP GRO).

    Every datagram here is whole DTLS records, which carry their own lengths, and DTLS
    parses back-to-back records out of one buffer; so a coalesced read is simply several
    datagrams' records in a row, and costs one read and one callback instead of dozens.
    """
    sock = udp.get_extra_info("socket")
    if sock is None or os.environ.get("POLEVPN_NO_UDP_GRO"):
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


# ---- router side --------------------------------------------------------------------------


class KcpServer(asyncio.DatagramProtocol):
    """The router's UDP endpoint: a ``KcpServerCore`` (the no-I/O demux) on a socket, a
    ``KcpTransport`` per established session, one loop timer for the handshakes under way."""

    def __init__(
        self,
        ctx: SSL.Context,
        jar: CookieJar,
        params: KcpParams,
        protocol_factory: Callable[[float], asyncio.Protocol],
        handshake_timeout: float,
        pool: KcpPool | None = None,
        admit: Callable[[Addr], bool] | None = None,
        release: Callable[[Addr], None] | None = None,
        limits: HandshakeLimits | None = None,
        known: Callable[[Addr], bool] | None = None,
    ) -> None:
        """See ``KcpServerCore`` for ``admit``, ``release``, ``limits`` and ``known``. Once
        established, the admission slot belongs to the protocol ``protocol_factory`` made,
        which is given the time of the cookie (its deadlines run from there)."""
        self.core = KcpServerCore(
            ctx,
            jar,
            params,
            handshake_timeout,
            pool,
            admit,
            release,
            limits,
            make_source=source_of,
            known=known,
        )
        self.factory = protocol_factory
        self.sessions: dict[Addr, KcpTransport] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.batch: UdpBatchSender | None = None
        self._loop = asyncio.get_event_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._source_gone_closing: set[KcpTransport] = set()
        # direct paths' endpoint probes (docs/protocol.md section 18): 64-byte datagrams
        # starting 0xD1 (no DTLS record, KCP buffer or FEC shard starts so) go here before
        # any DTLS handling; what it returns goes back to their source. Set by the router.
        self.direct: Callable[[bytes, Addr], bytes | None] | None = None

    # the demux's parts, where the router and the tests have always found them

    @property
    def params(self) -> KcpParams:
        return self.core.params

    @property
    def pool(self) -> KcpPool:
        return self.core.pool

    @property
    def listener(self) -> CookieListener:
        return self.core.listener

    @property
    def slots(self) -> HandshakeSlots:
        return self.core.slots

    @property
    def pending(self) -> dict[Addr, Pending]:
        return self.core.pending

    @property
    def stats(self) -> KcpServerStats:
        return self.core.stats

    @property
    def handshake_timeout(self) -> float:
        return self.core.handshake_timeout

    @handshake_timeout.setter
    def handshake_timeout(self, value: float) -> None:
        self.core.handshake_timeout = value

    def set_context(self, ctx: SSL.Context, jar: CookieJar) -> None:
        """A reloaded certificate: new handshakes use ``ctx``, whose cookie callbacks must
        be ``jar``'s (the listener tells its jar each datagram's address)."""
        self.core.set_context(ctx, jar)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        enlarge_buffers(transport)
        enable_gro(transport)
        self.batch = UdpBatchSender(self.transport)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for one peer arrive on the shared socket; the session's own timeouts
        # decide, not one error
        log.debug("udp error", extra=kv(error=exc))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.batch is not None:
            self.batch.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for t in list(self.sessions.values()):
            t.abort()
        self.core.abort_all(time.monotonic())
        self._events()

    def datagram_received(self, data: bytes, addr: Addr, ancdata: Ancillary | None = None) -> None:
        """``ancdata``: what ``udpsock.UdpEndpoint`` read with it (the destination address);
        the demux makes it into a reply source (``source_of``) only for a peer without a
        session."""
        core = self.core
        direct = self.direct
        if direct is not None and is_datagram(data):
            try:
                reply = direct(data, addr)
            except Exception:
                log.exception("internal error handling an endpoint probe", extra=kv(peer=fmt(addr)))
                return
            if reply is not None:
                self._sendto(reply, addr, source_of(ancdata))
            return
        try:
            conn = core.datagram_received(data, addr, ancdata, time.monotonic())
            if conn is not None:
                t = self.sessions.get(addr)
                if t is not None and t.conn is conn:
                    t.received()
                return
            self._flush()
        except Exception:
            log.exception(
                "internal error handling a datagram; dropping its session",
                extra=kv(peer=fmt(addr)),
            )
            t = self.sessions.get(addr)
            if t is not None:
                t.abort()
            core.drop_pending(addr, time.monotonic())
            self._flush()

    def _flush(self) -> None:
        """The demux's own datagrams and events, then its timer."""
        try:
            for datagrams, addr, source in self.core.datagrams_to_send():
                for d in datagrams:
                    self._sendto(d, addr, source)
            self._events()
        finally:
            # whatever failed above, the handshakes under way keep their deadlines: an
            # unarmed timer would leave them (and their admission slots) until some
            # unrelated datagram came
            self._arm()

    def _events(self) -> None:
        core = self.core
        ev = core.next_event()
        while ev is not None:
            if isinstance(ev, SessionEstablished):
                try:
                    self._established(ev)
                except Exception:
                    # that session alone: the other events still go their way
                    log.exception(
                        "internal error starting a kcp session", extra=kv(peer=fmt(ev.addr))
                    )
                    t = self.sessions.get(ev.addr)
                    if t is not None and t.conn is ev.conn:
                        t.abort()
            elif isinstance(ev, SessionReplaced):
                log.info(
                    "kcp peer started a new handshake; closing its old session",
                    extra=kv(peer=fmt(ev.addr)),
                )
                t = self.sessions.get(ev.addr)
                if t is not None and t.conn is ev.old:
                    t.abort()
            elif isinstance(ev, HandshakeEnded) and not ev.timed_out:
                log.info("kcp handshake failed", extra=kv(peer=fmt(ev.addr), error=ev.error))
            ev = core.next_event()

    def _established(self, ev: SessionEstablished) -> None:
        conn, addr = ev.conn, ev.addr
        src = conn.source
        transport = KcpTransport(
            self._loop,
            conn,
            lambda ds, a=addr: self._send_many(ds, a, src),
            self._session_closed,
        )
        self.sessions[addr] = transport
        transport.start(self.factory(ev.started))
        # application data that arrived with the datagram that finished the handshake
        transport.received()

    def _arm(self) -> None:
        at = self.core.get_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.core.handle_timer(time.monotonic())
        except Exception:
            log.exception("internal error in the kcp handshake timer")
        self._flush()

    def _session_closed(self, t: KcpTransport) -> None:
        if self.sessions.get(t.peer) is t:
            del self.sessions[t.peer]
        self.core.forget(t.peer, t.conn)

    def _sendto(self, data: bytes, addr: Addr, source: Source | None = None) -> None:
        if self.transport is None:
            return
        try:
            if source is None:
                self.transport.sendto(data, addr)
            else:
                self.transport.sendto(data, addr, source)  # type: ignore[call-arg]
        except SourceGone as exc:
            self._source_gone(addr, exc)

    def _send_many(self, datagrams: list[bytes], addr: Addr, source: Source | None = None) -> None:
        if self.batch is not None:
            try:
                self.batch.send(datagrams, addr, source)
            except SourceGone as exc:
                self._source_gone(addr, exc)

    def _source_gone(self, addr: Addr, exc: SourceGone) -> None:
        """The address this peer dialled has left the host: replying from another one would
        only be dropped by the peer's connected socket, so the session ends and the gateway
        reconnects (to an address that is there). A handshake under way just times out."""
        t = self.sessions.get(addr)
        if t is None or t.is_closing() or t in self._source_gone_closing:
            return
        self.stats.source_gone += 1
        log.warning(
            "kcp source address gone; closing its session",
            extra=kv(peer=fmt(addr), error=exc.strerror),
        )
        # not inside the session's own send path (KCP's flush): on the next turn
        self._source_gone_closing.add(t)
        self._loop.call_soon(self._close_session, addr, t)

    def _close_session(self, addr: Addr, t: KcpTransport) -> None:
        self._source_gone_closing.discard(t)
        if self.sessions.get(addr) is t:
            t.abort()

    def counters(self) -> KcpServerStats:
        """The stats, with the batch sender's own counts copied in at reading time."""
        if self.batch is not None:
            self.stats.udp_batches = self.batch.batches
            self.stats.udp_batched = self.batch.batched_datagrams
        self.stats.udp_send_dropped = getattr(self.transport, "send_dropped", 0)
        return self.stats


# ---- gateway side -------------------------------------------------------------------------


class _ClientEndpoint(asyncio.DatagramProtocol):
    """Runs the handshake of a client ``KcpConnection``, then hands datagrams to the
    ``KcpTransport``."""

    def __init__(self, conn: KcpConnection) -> None:
        self.conn = conn
        self.transport: asyncio.DatagramTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.kcp: KcpTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        enlarge_buffers(transport)
        enable_gro(transport)
        self.conn.connect(time.monotonic())
        self._flight()

    def _flight(self) -> None:
        assert self.transport is not None
        conn = self.conn
        for d in conn.datagrams_to_send(time.monotonic()):
            self.transport.sendto(d)
        if self.done.done():
            return
        ev = conn.next_event()
        while ev is not None:
            if isinstance(ev, HandshakeCompleted):
                self.done.set_result(None)
                return
            if isinstance(ev, ConnectionTerminated):
                self.done.set_exception(DtlsError(ev.error or "handshake failed"))
                return
            ev = conn.next_event()
        if self._timer is not None:
            self._timer.cancel()
        at = conn.get_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(at if at is not None else loop.time() + 1.0, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self.done.done():
            self.conn.handle_timer(time.monotonic())
            self._flight()

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        if self.kcp is not None:
            try:
                self.kcp.datagram_received(data)
            except Exception:
                log.exception("internal error handling data from the router; reconnecting")
                self.kcp.abort()
            return
        if self.done.done():
            return
        self.conn.receive_datagram(data, time.monotonic())
        self._flight()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: nobody listens there, or a firewall rejects; fail fast so
        # the gateway can fall back instead of waiting for its timeout
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()
        elif self.kcp is not None and isinstance(exc, ConnectionRefusedError):
            self.kcp.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.done.done():
            self.done.set_exception(exc or ConnectionAbortedError("udp socket closed"))
            self.done.exception()  # whoever waited has given up; do not warn about it
        if self.kcp is not None:
            self.kcp.abort()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def connect(
    protocol: asyncio.Protocol,
    host: str,
    port: int,
    ctx: SSL.Context,
    verify: Verification,
    params: KcpParams,
    pool: KcpPool,
    timeout: float,
    local_addr: tuple[str, int] | None = None,
    interface: str | None = None,
) -> KcpTransport:
    """Resolve, handshake and start a kcp:// session; ``protocol`` gets connection_made.

    ``local_addr``: the source address (and port) to send from; ``interface``: the device
    to send through (one link of a multi-link gateway)."""
    loop = asyncio.get_running_loop()
    bind = local_addr[0] if local_addr else None
    family, addr = await linksock.resolve(host, port, socket.SOCK_DGRAM, bind)
    now = time.monotonic()
    dtls = DtlsSession.client(ctx, verify, params.dtls_mtu, now, verify.server_name)
    conn = KcpConnection(dtls, params, pool, now, peer=addr)
    endpoint = _ClientEndpoint(conn)
    if interface is None:
        udp, _ = await loop.create_datagram_endpoint(
            lambda: endpoint, local_addr=local_addr, remote_addr=addr[:2], family=family
        )
    else:
        sock = linksock.bound_socket(family, socket.SOCK_DGRAM, bind, interface)
        try:
            sock.connect(addr)
            udp, _ = await loop.create_datagram_endpoint(lambda: endpoint, sock=sock)
        except BaseException:
            # the endpoint did not take the socket (or closed it already: closing twice is
            # harmless), so it is ours to close
            sock.close()
            raise
    batch: UdpBatchSender | None = None

    def closed(_t: KcpTransport) -> None:
        endpoint.cancel()
        if batch is not None:
            batch.close()
        udp.close()

    try:
        await asyncio.wait_for(asyncio.shield(endpoint.done), timeout)
        batch = UdpBatchSender(udp)
        transport = KcpTransport(loop, conn, batch.send, closed)
    except BaseException:
        # nothing may outlive a failed attempt: the socket, nor the batch sender's copy of it
        endpoint.cancel()
        if batch is not None:
            batch.close()
        udp.abort()
        raise
    endpoint.kcp = transport
    transport.start(protocol)
    return transport

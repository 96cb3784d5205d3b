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
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from polevpn.common.counters import Counters
from polevpn.common.logfmt import endpoint as fmt
from polevpn.common.logfmt import kv
from polevpn.config import HandshakeLimits, KcpParams
from polevpn.io import linksock
from polevpn.io.udp_batch import SOL_UDP, UdpBatchSender
from polevpn.io.udpsock import Ancillary, Source, SourceGone, source_of
from polevpn.kcp.dtls import (
    CT_HANDSHAKE,
    HS_CLIENT_HELLO,
    RECORD_HEADER,
    CookieJar,
    CookieListener,
    DtlsError,
    DtlsSession,
    Verification,
    looks_like_dtls,
    peer_key,
)
from polevpn.kcp.kcp_link import KcpLink
from polevpn.kcp.kcp_pool import KcpPool

log = logging.getLogger("polevpn.kcp")

Addr = tuple[Any, ...]
# the first two bytes of a record's epoch; 0 means a new handshake (a fresh ClientHello)
_EPOCH = slice(3, 5)


class KcpTransport:
    """One established kcp:// session as a stream transport."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        dtls: DtlsSession,
        link: KcpLink,
        sendto: Callable[[bytes], None],
        peer: Addr,
        on_closed: Callable[[KcpTransport], None],
        send_many: Callable[[list[bytes]], None] | None = None,
    ) -> None:
        self._loop = loop
        self.dtls = dtls
        self.link = link
        self._sendto = sendto
        self._send_many = send_many or self._send_each
        self.peer = peer
        self._on_closed = on_closed
        self._protocol: asyncio.Protocol | None = None
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._high = 1 << 20
        self._low = 1 << 18
        self._paused = False
        self._settle_scheduled = False
        self.last_heard = time.monotonic()
        # since when data has been waiting for an acknowledgement (None: nothing waiting)
        self._waiting_since: float | None = None
        self.datagrams_in = 0
        self.datagrams_out = 0

    # -- asyncio transport surface

    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.Protocol | None:
        return self._protocol

    def start(self, protocol: asyncio.Protocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)  # type: ignore[arg-type]
        self._pump()

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
            return self.link
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 1 << 20
        if low is None:
            low = high // 4
        self._high, self._low = high, low

    def get_write_buffer_size(self) -> int:
        return self.link.pending_bytes

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | memoryview) -> None:
        if self._closing:
            return
        self.link.write(data, time.monotonic())
        self._pump()
        if not self._paused and self.link.pending_bytes > self._high and self._protocol:
            self._paused = True
            self._protocol.pause_writing()

    def pause_reading(self) -> None:
        self.link.reading = False

    def resume_reading(self) -> None:
        if self.link.reading or self._closing:
            return
        self.link.reading = True
        data = self.link.drain()
        self.link.announce_window(time.monotonic())
        self._pump()
        if data and self._protocol is not None:
            self._protocol.data_received(data)

    def is_reading(self) -> bool:
        return self.link.reading

    @property
    def authenticated(self) -> bool:
        """False on the router's side until the orchestrator sees AUTH succeed: until then
        the session has a small KCP receive window and decodes no FEC (issue 20)."""
        return self.link.authenticated

    @authenticated.setter
    def authenticated(self, value: bool) -> None:
        if not value or self.link.authenticated or self._closing:
            return
        self.link.authenticate(time.monotonic())
        self._pump()

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def close(self) -> None:
        self._shutdown(None, notify_peer=True)

    def abort(self) -> None:
        self._shutdown(None, notify_peer=False)

    # -- input from the endpoint

    def datagram_received(self, data: bytes) -> None:
        if self._closing:
            return
        now = time.monotonic()
        self.datagrams_in += 1
        records, replies = self.dtls.receive(data, now)
        for d in replies:
            self._send(d)
        if records:
            self.records_received(records, now)
        if self.dtls.closed and not self._closing:
            # what arrived before the close_notify (a last error reply, say) still goes up
            self._settle()
            err = None if self.dtls.peer_closed else ConnectionResetError(self.dtls.error)
            self._shutdown(err, False)

    def records_received(self, records: list[bytes], now: float) -> None:
        if records:
            self.last_heard = now
            feed = self.link.feed
            for r in records:
                feed(r, now)
            if not self._settle_scheduled:
                # after every datagram the loop has read in this pass: one ACK datagram and
                # one delivery upwards for the lot
                self._settle_scheduled = True
                self._loop.call_soon(self._settle)

    def _settle(self) -> None:
        if not self._settle_scheduled or self._closing:
            return
        self._settle_scheduled = False
        try:
            data_in = self.link.settle(time.monotonic())
            self._pump()
            if data_in and self._protocol is not None:
                self._protocol.data_received(data_in)
            self._maybe_resume_writing()
        except Exception:
            log.exception("internal error on kcp input; closing it", extra=kv(peer=fmt(self.peer)))
            self._shutdown(None, False)

    def _maybe_resume_writing(self) -> None:
        if self._paused and self.link.pending_bytes <= self._low and self._protocol:
            self._paused = False
            self._protocol.resume_writing()

    # -- output and timers

    def _send(self, datagram: bytes) -> None:
        self.datagrams_out += 1
        self._sendto(datagram)

    def _send_each(self, datagrams: list[bytes]) -> None:
        for d in datagrams:
            self._sendto(d)

    def _pump(self) -> None:
        """Encrypt what KCP produced, send it, and arm the timer for what is in flight."""
        if self._closing:
            return
        send = self.dtls.send
        out = [d for d in map(send, self.link.records_to_send()) if d]
        if out:
            self.datagrams_out += len(out)
            self._send_many(out)
        now = time.monotonic()
        deadline = self.link.next_deadline(now)
        if deadline is None:
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing:
            return
        try:
            now = time.monotonic()
            self.link.poll(now)
            if self.link.dead:
                self._shutdown(ConnectionResetError("kcp: peer stopped acknowledging"), True)
                return
            if self._silent(now):
                self._shutdown(
                    ConnectionResetError(
                        f"kcp: nothing heard for {self.link.params.silence_timeout:g}s "
                        "with data unacknowledged"
                    ),
                    True,
                )
                return
            self._pump()
            self._maybe_resume_writing()
        except Exception:
            log.exception("internal error in kcp timer; closing it", extra=kv(peer=fmt(self.peer)))
            self._shutdown(None, False)

    def _silent(self, now: float) -> bool:
        """Data has waited ``silence_timeout`` without a single record from the peer.

        A live peer acknowledges within a round trip whatever the loss, so this is a peer
        that is gone, or one that restarted and lost our session: there is no reset in
        kcp://, and otherwise only heartbeat_timeout (20 s) would tell.
        """
        if not self.link.pending_bytes:
            self._waiting_since = None
            return False
        if self._waiting_since is None:
            self._waiting_since = now
            return False
        quiet_since = max(self.last_heard, self._waiting_since)
        return now - quiet_since > self.link.params.silence_timeout

    def _shutdown(self, exc: Exception | None, notify_peer: bool) -> None:
        if self._closing:
            return
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if notify_peer:
            try:
                # what KCP still holds is lost; the close_notify saves the peer its timeout
                for d in self.dtls.close():
                    self._send(d)
            except OSError:
                pass
        else:
            self.dtls.closed = True
        self.link.close()
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


@dataclass
class KcpServerStats(Counters):
    datagrams_in: int = 0
    hello_verify_sent: int = 0
    handshakes: int = 0
    handshake_failures: int = 0
    handshake_timeouts: int = 0
    # cookie-proven handshakes the router's connection limits turned away
    refused_handshakes: int = 0
    rejected_datagrams: int = 0
    sessions: int = 0
    # sendmsg calls that carried several datagrams (UDP GSO), and how many they carried
    udp_batches: int = 0
    udp_batched: int = 0
    # sessions closed because the local address their peer dialled left the host
    source_gone: int = 0
    # datagrams dropped because the socket's send buffer and our queue behind it were full
    udp_send_dropped: int = 0


class HandshakeSlots:
    """The kcp:// handshakes in progress, counted per network prefix (no I/O).

    A slot is taken when a ClientHello returns a valid cookie and given back when the
    handshake ends either way. Besides the total, each peer counts against its IPv4 /24, or
    its IPv6 /64, /56 and /48 (see ``HandshakeLimits``): one host, or one site's whole
    IPv6 allocation, cannot take every slot from other gateways.
    """

    __slots__ = ("limits", "total", "by_prefix")

    def __init__(self, limits: HandshakeLimits) -> None:
        self.limits = limits
        self.total = 0
        self.by_prefix: dict[str, int] = {}

    def shares(self, host: str) -> tuple[tuple[str, int], ...]:
        """The prefixes ``host`` counts against, each with its limit."""
        per = self.limits.max_per_prefix
        cap = max(1, self.limits.max_handshakes // 2)
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return ((host, min(per, cap)),)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if isinstance(addr, ipaddress.IPv4Address):
            return ((str(ipaddress.IPv4Network((addr, 24), strict=False)), min(per, cap)),)
        return tuple(
            (str(ipaddress.IPv6Network((addr, bits), strict=False)), min(per * mult, cap))
            for bits, mult in ((64, 1), (56, 2), (48, 4))
        )

    def take(self, host: str) -> tuple[str, ...] | None:
        """The prefixes charged for a new handshake from ``host``, or None: no room."""
        if self.total >= self.limits.max_handshakes:
            return None
        shares = self.shares(host)
        by_prefix = self.by_prefix
        if any(by_prefix.get(key, 0) >= limit for key, limit in shares):
            return None
        for key, _ in shares:
            by_prefix[key] = by_prefix.get(key, 0) + 1
        self.total += 1
        return tuple(key for key, _ in shares)

    def give_back(self, prefixes: tuple[str, ...]) -> None:
        self.total -= 1
        for key in prefixes:
            n = self.by_prefix[key] - 1
            if n:
                self.by_prefix[key] = n
            else:
                del self.by_prefix[key]


class _Pending:
    """A peer whose cookie was good and whose handshake is under way."""

    __slots__ = ("dtls", "source", "started", "timer", "prefixes")

    def __init__(
        self,
        dtls: DtlsSession,
        started: float,
        prefixes: tuple[str, ...],
        source: Source | None = None,
    ) -> None:
        self.dtls = dtls
        # when the peer proved its address: its handshake, AUTH and REGISTER must all be
        # done within auth_timeout of this
        self.started = started
        self.timer: asyncio.TimerHandle | None = None
        self.prefixes = prefixes
        # the local address the peer sent to: every reply leaves from it
        self.source = source


class KcpServer(asyncio.DatagramProtocol):
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
    ) -> None:
        """``admit``: asked once a peer has proved its address (valid cookie), and before
        any handshake work, whether its handshake may take a slot; ``release`` gives the
        slot back if the handshake fails. Once established, the slot belongs to the
        protocol ``protocol_factory`` made, which is given the time of the cookie (its
        deadlines run from there). ``limits``: the handshakes in progress this server
        allows (``HandshakeSlots``), before ``admit`` is asked."""
        self.admit = admit
        self.release = release
        self.slots = HandshakeSlots(limits or HandshakeLimits())
        self.params = params
        self.listener = CookieListener(ctx, jar, params.dtls_mtu)
        self.factory = protocol_factory
        self.handshake_timeout = handshake_timeout
        self.pool = pool or KcpPool()
        self.pending: dict[Addr, _Pending] = {}
        self.sessions: dict[Addr, KcpTransport] = {}
        self.stats = KcpServerStats()
        self.transport: asyncio.DatagramTransport | None = None
        self.batch: UdpBatchSender | None = None
        self._loop = asyncio.get_event_loop()
        # the ancillary data (destination address) of the datagram being handled
        self._ancdata: Ancillary | None = None
        self._source_gone_closing: set[KcpTransport] = set()

    def set_context(self, ctx: SSL.Context, jar: CookieJar) -> None:
        """A reloaded certificate: new handshakes use ``ctx``, whose cookie callbacks must
        be ``jar``'s (the listener tells its jar each datagram's address)."""
        self.listener.ctx = ctx
        self.listener.jar = jar

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
        for t in list(self.sessions.values()):
            t.abort()
        for addr in list(self.pending):
            self._drop_pending(addr)

    def datagram_received(self, data: bytes, addr: Addr, ancdata: Ancillary | None = None) -> None:
        """``ancdata``: what ``udpsock.UdpEndpoint`` read with it (the destination address);
        made into a reply source only for a peer without a session (``_current_source``)."""
        self.stats.datagrams_in += 1
        self._ancdata = ancdata
        try:
            self._received(data, addr)
        except Exception:
            log.exception(
                "internal error handling a datagram; dropping its session",
                extra=kv(peer=fmt(addr)),
            )
            t = self.sessions.get(addr)
            if t is not None:
                t.abort()
            self._drop_pending(addr)

    def _received(self, data: bytes, addr: Addr) -> None:
        t = self.sessions.get(addr)
        if t is not None:
            if _is_new_hello(data, t.dtls):
                # a new handshake from an address with a live session: the gateway restarted
                # and reused its port. Only a proven (cookie) peer may replace the session.
                self._hello(data, addr, replacing=t)
                return
            # anything else, epoch-0 handshake records included, is the session's own: the
            # gateway's flight retransmitted because our Finished was lost, which OpenSSL
            # answers by sending its Finished again
            t.datagram_received(data)
            return
        p = self.pending.get(addr)
        if p is not None:
            self._continue(p, data, addr)
            return
        self._hello(data, addr, replacing=None)

    def _hello(self, data: bytes, addr: Addr, replacing: KcpTransport | None) -> None:
        now = time.monotonic()

        held: tuple[str, ...] | None = None

        def admit() -> bool:
            # asked only for a valid cookie, before any handshake work: the
            # HelloVerifyRequest itself is stateless and never refused
            nonlocal held
            held = self.slots.take(str(addr[0]))
            if held is None:
                return False
            if self.admit is not None and not self.admit(addr):
                self.slots.give_back(held)
                held = None
                return False
            return True

        replies, dtls = self.listener.receive(data, peer_key(addr), now, admit)
        self.stats.hello_verify_sent = self.listener.hello_verify_sent
        self.stats.rejected_datagrams = self.listener.rejected
        self.stats.refused_handshakes = self.listener.refused
        source = self._current_source()
        for d in replies:
            self._sendto(d, addr, source)
        if dtls is None or held is None:
            return
        if replacing is not None:
            log.info(
                "kcp peer started a new handshake; closing its old session",
                extra=kv(peer=fmt(addr)),
            )
            replacing.abort()
        p = _Pending(dtls, now, held, source)
        self.pending[addr] = p
        self._arm(p, addr)
        self._check_established(p, addr)

    def _continue(self, p: _Pending, data: bytes, addr: Addr) -> None:
        now = time.monotonic()
        records, replies = p.dtls.receive(data, now)
        for d in replies:
            self._sendto(d, addr, p.source)
        self._check_established(p, addr, records)

    def _check_established(
        self, p: _Pending, addr: Addr, records: list[bytes] | None = None
    ) -> None:
        dtls = p.dtls
        if dtls.closed:
            self.stats.handshake_failures += 1
            log.info("kcp handshake failed", extra=kv(peer=fmt(addr), error=dtls.error))
            self._drop_pending(addr)
            return
        if not dtls.established:
            self._arm(p, addr)
            return
        self._drop_pending(addr, established=True)
        self.stats.handshakes += 1
        now = time.monotonic()
        # small receive state until the router flips ``authenticated`` after AUTH
        link = KcpLink(self.params, self.pool, dtls.cleartext_mtu, now, authenticated=False)
        src = p.source
        transport = KcpTransport(
            self._loop,
            dtls,
            link,
            lambda d, a=addr: self._sendto(d, a, src),
            addr,
            self._session_closed,
            lambda ds, a=addr: self._send_many(ds, a, src),
        )
        self.sessions[addr] = transport
        self.stats.sessions = len(self.sessions)
        transport.start(self.factory(p.started))
        if records:
            # application data that arrived in the datagram that finished the handshake
            transport.records_received(records, now)

    def _arm(self, p: _Pending, addr: Addr) -> None:
        if p.timer is not None:
            p.timer.cancel()
        t = p.dtls.timeout()
        deadline = p.started + self.handshake_timeout
        now = time.monotonic()
        at = min(now + t, deadline) if t is not None else deadline
        p.timer = self._loop.call_at(at, self._pending_timer, addr)

    def _pending_timer(self, addr: Addr) -> None:
        p = self.pending.get(addr)
        if p is None:
            return
        p.timer = None
        now = time.monotonic()
        if now >= p.started + self.handshake_timeout:
            self.stats.handshake_timeouts += 1
            self._drop_pending(addr)
            return
        for d in p.dtls.handle_timeout(now):
            self._sendto(d, addr, p.source)
        self._check_established(p, addr)

    def _drop_pending(self, addr: Addr, established: bool = False) -> None:
        p = self.pending.pop(addr, None)
        if p is None:
            return
        self.slots.give_back(p.prefixes)
        if p.timer is not None:
            p.timer.cancel()
        if not established and self.release is not None:
            self.release(addr)

    def _session_closed(self, t: KcpTransport) -> None:
        if self.sessions.get(t.peer) is t:
            del self.sessions[t.peer]
        self.stats.sessions = len(self.sessions)

    def _current_source(self) -> Source | None:
        """The reply source of the datagram being handled (None: the socket's own)."""
        return source_of(self._ancdata)

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


# where a ClientHello's random starts: record header, handshake header, client_version
_HELLO_RANDOM = slice(RECORD_HEADER + 12 + 2, RECORD_HEADER + 12 + 2 + 32)


def _is_new_hello(data: bytes, session: DtlsSession) -> bool:
    """A ClientHello (epoch 0, handshake type 1, first fragment) of another handshake than
    ``session``'s: its random differs. The ClientHello that returns a cookie repeats the
    first one's random (RFC 6347 section 4.2.1), so a restarted gateway's pair, message_seq
    0 and 1, both qualify, while a late copy of the session's own ClientHello does not."""
    if (
        len(data) < _HELLO_RANDOM.stop
        or data[0] != CT_HANDSHAKE
        or data[_EPOCH] != b"\x00\x00"
        or not looks_like_dtls(data)
        or data[RECORD_HEADER] != HS_CLIENT_HELLO
        or data[RECORD_HEADER + 6 : RECORD_HEADER + 9] != b"\x00\x00\x00"  # fragment_offset
    ):
        return False
    try:
        current = session.conn.client_random()
    except SSL.Error:
        current = None
    return data[_HELLO_RANDOM] != current


# ---- gateway side -------------------------------------------------------------------------


class _ClientEndpoint(asyncio.DatagramProtocol):
    """Runs the DTLS handshake, then hands datagrams to the ``KcpTransport``."""

    def __init__(self, dtls: DtlsSession) -> None:
        self.dtls = dtls
        self.transport: asyncio.DatagramTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.kcp: KcpTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        enlarge_buffers(transport)
        enable_gro(transport)
        self._flight(self.dtls.step(time.monotonic()))

    def _flight(self, datagrams: list[bytes]) -> None:
        assert self.transport is not None
        for d in datagrams:
            self.transport.sendto(d)
        self._settle()

    def _settle(self) -> None:
        if self.done.done():
            return
        if self.dtls.closed:
            self.done.set_exception(DtlsError(self.dtls.error or "handshake failed"))
        elif self.dtls.established:
            self.done.set_result(None)
        else:
            if self._timer is not None:
                self._timer.cancel()
            t = self.dtls.timeout()
            self._timer = asyncio.get_running_loop().call_later(
                t if t is not None else 1.0, self._on_timer
            )

    def _on_timer(self) -> None:
        self._timer = None
        if not self.done.done():
            self._flight(self.dtls.handle_timeout(time.monotonic()))

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
        _records, replies = self.dtls.receive(data, time.monotonic())
        self._flight(replies)

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
    dtls = DtlsSession.client(ctx, verify, params.dtls_mtu, time.monotonic(), verify.server_name)
    endpoint = _ClientEndpoint(dtls)
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
        link = KcpLink(params, pool, dtls.cleartext_mtu, time.monotonic())
        batch = UdpBatchSender(udp)
        transport = KcpTransport(loop, dtls, link, udp.sendto, addr, closed, batch.send)
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

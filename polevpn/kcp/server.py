"""The router's kcp:// demux, without I/O: address -> ``KcpConnection``, cookies in front.

Datagrams come in with the peer's address, an opaque reply ``source`` (the local address the
peer sent to; the I/O layer makes it from IP_PKTINFO and sends every reply from it) and the
time; out come datagrams to send with the address and source to send them with, events, and
the next deadline. Nothing is kept for a peer that has not proved its address (the cookie
exchange of ``CookieListener``); a proven one takes a ``HandshakeSlots`` slot and the
caller's ``admit`` before any handshake work, and keeps them until its handshake ends.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL

from polevpn.common.counters import Counters
from polevpn.config import HandshakeLimits, KcpParams
from polevpn.kcp.connection import (
    ConnectionTerminated,
    HandshakeCompleted,
    KcpConnection,
)
from polevpn.kcp.dtls import (
    CT_HANDSHAKE,
    HS_CLIENT_HELLO,
    RECORD_HEADER,
    CookieJar,
    CookieListener,
    DtlsSession,
    looks_like_dtls,
    peer_key,
)
from polevpn.kcp.kcp_pool import KcpPool

Addr = tuple[Any, ...]
# the first two bytes of a record's epoch; 0 means a new handshake (a fresh ClientHello)
_EPOCH = slice(3, 5)


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
    IPv6 allocation, cannot take every slot from other gateways. A share of the table
    (``reserved_share_known``) is kept for known peers, which count against no prefix.
    """

    __slots__ = ("limits", "total", "strangers", "by_prefix")

    def __init__(self, limits: HandshakeLimits) -> None:
        self.limits = limits
        self.total = 0
        self.strangers = 0
        self.by_prefix: dict[str, int] = {}

    def stranger_cap(self) -> int:
        lim = self.limits
        return lim.max_handshakes - int(lim.max_handshakes * lim.reserved_share_known)

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

    def take(self, host: str, known: bool = False) -> tuple[str, ...] | None:
        """The prefixes charged for a new handshake from ``host``, or None: no room. A
        known peer is charged to no prefix (the empty tuple)."""
        if self.total >= self.limits.max_handshakes:
            return None
        if known:
            self.total += 1
            return ()
        if self.strangers >= self.stranger_cap():
            return None
        shares = self.shares(host)
        by_prefix = self.by_prefix
        if any(by_prefix.get(key, 0) >= limit for key, limit in shares):
            return None
        for key, _ in shares:
            by_prefix[key] = by_prefix.get(key, 0) + 1
        self.total += 1
        self.strangers += 1
        return tuple(key for key, _ in shares)

    def give_back(self, prefixes: tuple[str, ...]) -> None:
        self.total -= 1
        if prefixes:  # a stranger's: every stranger is charged to at least one prefix
            self.strangers -= 1
        for key in prefixes:
            n = self.by_prefix[key] - 1
            if n:
                self.by_prefix[key] = n
            else:
                del self.by_prefix[key]


class Pending:
    """A peer whose cookie was good and whose handshake is under way."""

    __slots__ = ("conn", "started", "prefixes")

    def __init__(self, conn: KcpConnection, started: float, prefixes: tuple[str, ...]) -> None:
        self.conn = conn
        # when the peer proved its address: its handshake, AUTH and REGISTER must all be
        # done within auth_timeout of this
        self.started = started
        self.prefixes = prefixes

    @property
    def dtls(self) -> DtlsSession:
        return self.conn.dtls

    @property
    def source(self) -> Any:
        return self.conn.source


# ---- events -------------------------------------------------------------------------------


@dataclass(slots=True)
class SessionEstablished:
    """A handshake completed: ``conn`` is live (and in ``sessions``); ``started`` is the time
    of its cookie, from which the caller's own deadlines (AUTH) run."""

    addr: Addr
    conn: KcpConnection
    started: float


@dataclass(slots=True)
class SessionReplaced:
    """A proven new handshake from ``addr`` ended its live session ``old`` (the gateway
    restarted and reused its port); ``old`` is closed without a close_notify."""

    addr: Addr
    old: KcpConnection


@dataclass(slots=True)
class HandshakeEnded:
    """A pending handshake failed (``timed_out`` False) or ran out of time; its slot and
    the caller's admission (``release``) were given back."""

    addr: Addr
    error: str | None
    timed_out: bool


@dataclass(slots=True)
class HandshakeRefused:
    """A peer proved its address (valid cookie) but its handshake found no room: the
    handshake table (``HandshakeSlots``) or the caller's ``admit`` turned it away, before
    any handshake work. It was sent nothing; its HelloVerifyRequests are still answered."""

    addr: Addr


ServerEvent = SessionEstablished | SessionReplaced | HandshakeEnded | HandshakeRefused
Outgoing = tuple[list[bytes], Addr, Any]


class KcpServerCore:
    """Address -> connection, the cookie listener, pending handshakes and admission."""

    def __init__(
        self,
        ctx: SSL.Context,
        jar: CookieJar,
        params: KcpParams,
        handshake_timeout: float,
        pool: KcpPool | None = None,
        admit: Callable[[Addr], bool] | None = None,
        release: Callable[[Addr], None] | None = None,
        limits: HandshakeLimits | None = None,
        make_source: Callable[[Any], Any] | None = None,
        known: Callable[[Addr], bool] | None = None,
    ) -> None:
        """``admit``: asked once a peer has proved its address (valid cookie), and before
        any handshake work, whether its handshake may take a slot; ``release`` gives it back
        if the handshake fails. Once established, the slot is the caller's (it has the
        ``SessionEstablished`` event). ``limits``: the handshakes in progress allowed
        (``HandshakeSlots``), before ``admit`` is asked. ``make_source``: turns the ``source``
        a datagram came with into the reply source kept for its peer; called only for a
        datagram the demux answers itself (a live session's own datagrams need none).
        ``known``: whether a peer's source is known (it passed AUTH lately), so that it
        may use the share of the table strangers cannot take."""
        self.known = known
        self.make_source = make_source
        self.admit = admit
        self.release = release
        self.slots = HandshakeSlots(limits or HandshakeLimits())
        self.params = params
        self.listener = CookieListener(ctx, jar, params.dtls_mtu)
        self._handshake_timeout = handshake_timeout
        self.pool = pool or KcpPool()
        self.pending: dict[Addr, Pending] = {}
        self.sessions: dict[Addr, KcpConnection] = {}
        self.stats = KcpServerStats()
        self._out: list[Outgoing] = []
        self._events: deque[ServerEvent] = deque()
        # the earliest pending deadline, recomputed only when the pending table changed
        self._timer: float | None = None
        self._timer_stale = False

    @property
    def handshake_timeout(self) -> float:
        """Seconds from a peer's cookie to its handshake's end (a reload may change it)."""
        return self._handshake_timeout

    @handshake_timeout.setter
    def handshake_timeout(self, value: float) -> None:
        self._handshake_timeout = value
        self._timer_stale = True

    def set_context(self, ctx: SSL.Context, jar: CookieJar) -> None:
        """A reloaded certificate: new handshakes use ``ctx``, whose cookie callbacks must
        be ``jar``'s (the listener tells its jar each datagram's address)."""
        self.listener.ctx = ctx
        self.listener.jar = jar

    # -- input

    def datagram_received(
        self, data: bytes, addr: Addr, source: Any, now: float
    ) -> KcpConnection | None:
        """One datagram. Returns the live session it was fed to (its own output and events
        are the session's: ``datagrams_to_send`` on it), or None when the demux handled it
        (cookie exchange, a handshake under way: see ``datagrams_to_send`` here)."""
        self.stats.datagrams_in += 1
        conn = self.sessions.get(addr)
        if conn is not None:
            if _is_new_hello(data, conn.dtls):
                # a new handshake from an address with a live session: the gateway restarted
                # and reused its port. Only a proven (cookie) peer may replace the session.
                self._hello(data, addr, source, now, replacing=conn)
                return None
            # anything else, epoch-0 handshake records included, is the session's own: the
            # gateway's flight retransmitted because our Finished was lost, which OpenSSL
            # answers by sending its Finished again
            conn.receive_datagram(data, now)
            return conn
        p = self.pending.get(addr)
        if p is not None:
            p.conn.receive_datagram(data, now)
            self._after_pending(p, addr, now)
            return None
        self._hello(data, addr, source, now, replacing=None)
        return None

    def _hello(
        self, data: bytes, addr: Addr, source: Any, now: float, replacing: KcpConnection | None
    ) -> None:
        held: tuple[str, ...] | None = None

        def admit() -> bool:
            # asked only for a valid cookie, before any handshake work: the
            # HelloVerifyRequest itself is stateless and never refused
            nonlocal held
            known = self.known is not None and self.known(addr)
            held = self.slots.take(str(addr[0]), known)
            if held is None:
                return False
            if self.admit is not None and not self.admit(addr):
                self.slots.give_back(held)
                held = None
                return False
            return True

        listener = self.listener
        refused = listener.refused
        replies, dtls = listener.receive(data, peer_key(addr), now, admit)
        if self.make_source is not None and (replies or dtls is not None):
            # only for a peer answered or kept: junk costs no ancillary-data parsing
            source = self.make_source(source)
        self.stats.hello_verify_sent = listener.hello_verify_sent
        self.stats.rejected_datagrams = listener.rejected
        self.stats.refused_handshakes = listener.refused
        if listener.refused != refused:
            self._events.append(HandshakeRefused(addr))
        if replies:
            self._out.append((replies, addr, source))
        if dtls is None or held is None:
            return
        if replacing is not None:
            self.close_session(addr, replacing, now, notify_peer=False)
            self._events.append(SessionReplaced(addr, replacing))
        # small receive state until the caller calls ``authenticate`` after AUTH
        conn = KcpConnection(dtls, self.params, self.pool, now, authenticated=False, peer=addr)
        conn.source = source
        p = Pending(conn, now, held)
        self.pending[addr] = p
        self._timer_stale = True
        self._after_pending(p, addr, now)

    def _after_pending(self, p: Pending, addr: Addr, now: float) -> None:
        conn = p.conn
        out = conn.datagrams_to_send(now)
        if out:
            self._out.append((out, addr, conn.source))
        self._timer_stale = True
        if conn.closed:
            self.stats.handshake_failures += 1
            self._drop_pending(addr, now)
            self._events.append(HandshakeEnded(addr, conn.dtls.error, False))
            return
        if not conn.established:
            return
        self._drop_pending(addr, now, established=True)
        # the HandshakeCompleted event is the demux's to take: the caller is told here
        while True:
            ev = conn.next_event()
            if ev is None or isinstance(ev, HandshakeCompleted):
                break
        self.stats.handshakes += 1
        self.sessions[addr] = conn
        self.stats.sessions = len(self.sessions)
        self._events.append(SessionEstablished(addr, conn, p.started))

    # -- sessions

    def close_session(
        self, addr: Addr, conn: KcpConnection, now: float, notify_peer: bool = True
    ) -> None:
        """End a live session (``conn.close``), and forget it if it is still ``addr``'s."""
        conn.close(now, notify_peer)
        self.forget(addr, conn)

    def forget(self, addr: Addr, conn: KcpConnection) -> None:
        """``conn`` has terminated: it no longer owns ``addr``."""
        if self.sessions.get(addr) is conn:
            del self.sessions[addr]
        self.stats.sessions = len(self.sessions)

    def abort_all(self, now: float) -> list[KcpConnection]:
        """Shut everything down (the socket is gone); returns the sessions that were live."""
        live = list(self.sessions.values())
        for conn in live:
            conn.close(now, notify_peer=False)
        self.sessions.clear()
        self.stats.sessions = 0
        for addr in list(self.pending):
            self._drop_pending(addr, now)
        return live

    # -- output

    def datagrams_to_send(self) -> list[Outgoing]:
        """Cookie replies and handshake flights: (datagrams, address, source) each."""
        out = self._out
        if out:
            self._out = []
        return out

    def next_event(self) -> ServerEvent | None:
        events = self._events
        return events.popleft() if events else None

    # -- timers

    def get_timer(self) -> float | None:
        """The earliest deadline of the handshakes under way (None: none pending)."""
        if self._timer_stale:
            self._timer_stale = False
            best: float | None = None
            timeout = self.handshake_timeout
            for p in self.pending.values():
                at = p.started + timeout
                t = p.conn.dtls.next_timeout()
                if t is not None and t < at:
                    at = t
                if best is None or at < best:
                    best = at
            self._timer = best
        return self._timer

    def handle_timer(self, now: float) -> None:
        timeout = self.handshake_timeout
        for addr, p in list(self.pending.items()):
            if now >= p.started + timeout:
                self.stats.handshake_timeouts += 1
                p.conn.close(now, notify_peer=False)
                self._drop_pending(addr, now)
                self._events.append(HandshakeEnded(addr, None, True))
                continue
            t = p.conn.dtls.next_timeout()
            if t is not None and now >= t:
                p.conn.handle_timer(now)
                self._after_pending(p, addr, now)
        self._timer_stale = True

    def drop_pending(self, addr: Addr, now: float) -> None:
        """Forget ``addr``'s handshake under way (an internal error while handling it)."""
        self._drop_pending(addr, now)

    def _drop_pending(self, addr: Addr, now: float, established: bool = False) -> None:
        p = self.pending.pop(addr, None)
        if p is None:
            return
        self._timer_stale = True
        self.slots.give_back(p.prefixes)
        if not established:
            if not p.conn.closed:
                p.conn.close(now, notify_peer=False)
            if self.release is not None:
                self.release(addr)


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


__all__ = [
    "ConnectionTerminated",
    "HandshakeEnded",
    "HandshakeRefused",
    "HandshakeSlots",
    "KcpServerCore",
    "KcpServerStats",
    "Pending",
    "SessionEstablished",
    "SessionReplaced",
]

"""One kcp:// association with one peer, without I/O: DTLS, then FEC and KCP (``KcpLink``).

In the manner of aioquic's ``QuicConnection``: datagrams and the time go in
(``receive_datagram``, ``handle_timer``, ``send``), datagrams to send, the next deadline and
events come out (``datagrams_to_send``, ``get_timer``, ``next_event``). The caller owns the
socket and the clock; nothing here reads either. ``polevpn.io.kcp_transport`` is the asyncio
adapter, ``polevpn.kcp.server`` the router's demux in front of many of these.

Batching: ``receive_datagram`` only feeds records to KCP; the next ``datagrams_to_send``
settles the lot (one ACK flush, one ``StreamDataReceived``), so a run of datagrams read in
one pass of the event loop costs one ACK datagram, as it did before this was split out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from polevpn.config import KcpParams
from polevpn.kcp.dtls import DtlsSession
from polevpn.kcp.kcp_link import KcpLink
from polevpn.kcp.kcp_pool import KcpPool

# how often a handshake without an OpenSSL timer is looked at again (as the client did)
HANDSHAKE_POLL = 1.0
DEFAULT_HIGH = 1 << 20


# ---- events -------------------------------------------------------------------------------


class Event:
    __slots__ = ()


@dataclass(slots=True)
class HandshakeCompleted(Event):
    """DTLS is up and KCP runs: stream data may be sent."""


@dataclass(slots=True)
class StreamDataReceived(Event):
    data: bytes


@dataclass(slots=True)
class WritableChanged(Event):
    """The bytes waiting in KCP crossed the high (False) or low (True) water mark."""

    writable: bool


@dataclass(slots=True)
class ConnectionTerminated(Event):
    """The association is over. ``error`` None: closed cleanly (by us, or the peer's
    close_notify); otherwise why (handshake failure, a fatal alert, a dead link)."""

    error: str | None
    handshake: bool = False  # it ended before the handshake completed


class KcpConnection:
    """DTLS + KCP/FEC for one peer. No sockets, no clock: ``now`` comes with every call."""

    def __init__(
        self,
        dtls: DtlsSession,
        params: KcpParams,
        pool: KcpPool,
        now: float,
        authenticated: bool = True,
        peer: Any = None,
    ) -> None:
        """``dtls``: a client session not yet started (``connect``), or a server session the
        cookie listener made (its first flight already taken). ``authenticated`` False (the
        router's side until AUTH): a small KCP receive window and no FEC decoding."""
        self.dtls = dtls
        self.params = params
        self.pool = pool
        self.peer = peer
        # the local address the peer sent to (an opaque value kept for the demux)
        self.source: Any = None
        self.link: KcpLink | None = None
        self._authenticated = authenticated
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self._now = now
        self.closed = False
        self._unsettled = False
        self._high = DEFAULT_HIGH
        self._low = DEFAULT_HIGH // 4
        self._writable = True
        self.last_heard = now
        # since when data has been waiting for an acknowledgement (None: nothing waiting)
        self._waiting_since: float | None = None
        self.datagrams_in = 0
        self.datagrams_out = 0
        if dtls.established:  # pragma: no cover - the listener hands over handshaking ones
            self._established(now)

    # -- state

    @property
    def established(self) -> bool:
        return self.link is not None

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def pending_bytes(self) -> int:
        """The write buffer (``KcpLink.queued_bytes``: with congestion control, only what
        waits to be sent)."""
        link = self.link
        return link.queued_bytes if link is not None else 0

    def _high_mark(self, link: KcpLink) -> tuple[int, int]:
        """The write-buffer marks: the configured ones, or lower ones from the link's
        time budget (congestion control)."""
        budget = link.queue_budget
        if budget is None or budget >= self._high:
            return self._high, self._low
        return budget, budget // 4

    @property
    def reading(self) -> bool:
        link = self.link
        return link.reading if link is not None else True

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        self._high, self._low = high, low

    def next_event(self) -> Event | None:
        events = self._events
        return events.popleft() if events else None

    # -- input

    def connect(self, now: float) -> None:
        """Start a client's handshake: its first flight goes into ``datagrams_to_send``."""
        self._now = now
        self._out.extend(self.dtls.step(now))
        self._check_handshake(now)

    def receive_datagram(self, data: bytes, now: float) -> None:
        if self.closed:
            return
        self._now = now
        self.datagrams_in += 1
        dtls = self.dtls
        was_up = self.link is not None
        records, replies = dtls.receive(data, now)
        if replies:
            self._out.extend(replies)
        if not was_up:
            self._check_handshake(now)
        link = self.link
        if records and link is not None:
            self.last_heard = now
            feed = link.feed
            for r in records:
                feed(r, now)
            self._unsettled = True
        if dtls.closed and not self.closed:
            # what arrived before the close_notify (a last error reply, say) still goes up
            self._settle(now)
            self._terminate(None if dtls.peer_closed else dtls.error, notify_peer=False)

    def send(self, data: bytes | memoryview, now: float) -> None:
        """Stream bytes to the peer (the frame stream; message mode, see ``KcpLink.write``)."""
        link = self.link
        if self.closed or link is None:
            return
        self._now = now
        link.write(data, now)
        if self._writable and link.queued_bytes > self._high_mark(link)[0]:
            self._writable = False
            self._events.append(WritableChanged(False))

    def set_reading(self, reading: bool, now: float) -> None:
        """False while the reader above is full: data stays in KCP, whose receive window
        then closes and stops the sender. True again delivers what waited and announces
        the open window at once."""
        link = self.link
        if link is None or self.closed or link.reading == reading:
            return
        self._now = now
        link.reading = reading
        if reading:
            data = link.drain()
            link.announce_window(now)
            if data:
                self._events.append(StreamDataReceived(data))

    def authenticate(self, now: float) -> None:
        """The peer passed AUTH: the configured KCP window and FEC decoding (issue 20)."""
        if self._authenticated or self.closed:
            return
        self._authenticated = True
        self._now = now
        if self.link is not None:
            self.link.authenticate(now)

    def close(self, now: float, notify_peer: bool = True) -> None:
        """End the association; ``notify_peer``: a close_notify goes out (what KCP still
        holds is lost; the close_notify saves the peer its timeout)."""
        self._now = now
        self._terminate(None, notify_peer)

    # -- output

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Settle what was received since the last call, then everything to send."""
        self._now = now
        link = self.link
        if link is not None and not self.closed:
            if self._unsettled:
                self._settle(now)
            records = link.records_to_send()
            if records:
                send = self.dtls.send
                out = self._out
                for r in records:
                    d = send(r)
                    if d:
                        out.append(d)
        out = self._out
        if not out:
            return out
        self._out = []
        self.datagrams_out += len(out)
        return out

    # -- timers

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must run next (None: nothing in flight, no timer)."""
        if self.closed:
            return None
        link = self.link
        if link is not None:
            return link.next_deadline(self._now)
        t = self.dtls.next_timeout()
        return t if t is not None else self._now + HANDSHAKE_POLL

    def handle_timer(self, now: float) -> None:
        if self.closed:
            return
        self._now = now
        link = self.link
        if link is None:
            self._out.extend(self.dtls.handle_timeout(now))
            self._check_handshake(now)
            return
        link.poll(now)
        if link.dead:
            self._terminate("kcp: peer stopped acknowledging", notify_peer=True)
            return
        if self._silent(now):
            self._terminate(
                f"kcp: nothing heard for {self.params.silence_timeout:g}s "
                "with data unacknowledged",
                notify_peer=True,
            )
            return
        self._maybe_writable()

    def _silent(self, now: float) -> bool:
        """Data has waited ``silence_timeout`` without a single record from the peer.

        A live peer acknowledges within a round trip whatever the loss, so this is a peer
        that is gone, or one that restarted and lost our session: there is no reset in
        kcp://, and otherwise only heartbeat_timeout (20 s) would tell.
        """
        assert self.link is not None
        if not self.link.pending_bytes:
            self._waiting_since = None
            return False
        if self._waiting_since is None:
            self._waiting_since = now
            return False
        quiet_since = max(self.last_heard, self._waiting_since)
        return now - quiet_since > self.params.silence_timeout

    # -- internals

    def _check_handshake(self, now: float) -> None:
        dtls = self.dtls
        if self.link is not None or self.closed:
            return
        if dtls.closed:
            self._terminate(dtls.error or "handshake failed", notify_peer=False)
            return
        if dtls.established:
            self._established(now)

    def _established(self, now: float) -> None:
        self.link = KcpLink(
            self.params, self.pool, self.dtls.cleartext_mtu, now, self._authenticated
        )
        self.last_heard = now
        self._events.append(HandshakeCompleted())

    def _settle(self, now: float) -> None:
        self._unsettled = False
        link = self.link
        if link is None:
            return
        data = link.settle(now)
        if data:
            self._events.append(StreamDataReceived(data))
        self._maybe_writable()

    def _maybe_writable(self) -> None:
        link = self.link
        if self._writable or link is None:
            return
        if link.queued_bytes <= self._high_mark(link)[1]:
            self._writable = True
            self._events.append(WritableChanged(True))

    def _terminate(self, error: str | None, notify_peer: bool) -> None:
        if self.closed:
            return
        self.closed = True
        handshake = self.link is None
        if notify_peer:
            self._out.extend(self.dtls.close())
        else:
            self.dtls.closed = True
        if self.link is not None:
            self.link.close()
        self._events.append(ConnectionTerminated(error, handshake))

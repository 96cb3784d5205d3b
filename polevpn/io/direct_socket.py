"""The gateway's direct socket: one unconnected UDP socket for every direct path (issue 18).

The asyncio shell around ``polevpn.direct.manager.DirectManager``, which decides
everything: this reads datagrams and hands them over with the time, sends what the
manager has (runs of datagrams to one peer in one system call, ``udp_batch``), runs its
timer, and passes on the peers' IP packets (``deliver``), the messages for the router
(``send_messages``) and one log line per path state change. The socket is bound once, at
start-up, and outlives the router connections: a direct path does not care which router
connection is up.

Datagrams read in one pass of the event loop are settled together (one call of
``datagrams_to_send`` after the lot), so a burst costs one KCP acknowledgement, as on the
router link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

from polevpn.common.logfmt import kv
from polevpn.direct import messages as m
from polevpn.direct.manager import Change, DirectManager
from polevpn.direct.messages import DirectMessageError, Endpoint
from polevpn.direct.path import PathState
from polevpn.io.kcp_transport import enlarge_buffers
from polevpn.io.udp_batch import UdpBatchSender

log = logging.getLogger("polevpn.direct")


def describe(change: Change) -> tuple[str, dict[str, object]]:
    """The log line of a path state change: message and fields."""
    fields: dict[str, object] = {"peer": str(change.peer)}
    cause = change.cause.name.lower()
    if change.state is PathState.DIRECT:
        fields["endpoint"] = str(change.endpoint) if change.endpoint is not None else "?"
        if change.rtt is not None:
            fields["rtt_ms"] = round(change.rtt * 1000, 1)
        return "direct path up", fields
    if change.state is PathState.PUNCHING:
        return "direct path punching", fields
    fields["cause"] = cause
    if change.retry_in is not None:
        fields["retry_in"] = f"{change.retry_in:.1f}s"
    if change.previous is PathState.DIRECT:
        return "direct path down", fields
    return "direct path failed", fields


class DirectSocket(asyncio.DatagramProtocol):
    def __init__(
        self,
        manager: DirectManager,
        deliver: Callable[[list[memoryview]], None],
        send_messages: Callable[[list[m.Message]], None],
    ) -> None:
        """``deliver``: the peers' IP packets (the gateway's acls, then its TUN);
        ``send_messages``: DIRECT_CANDIDATES and DIRECT_STATUS for the router."""
        self.manager = manager
        self.deliver = deliver
        self.send_messages = send_messages
        self.transport: asyncio.DatagramTransport | None = None
        self.batch: UdpBatchSender | None = None
        self.family = socket.AF_INET
        self.port = 0
        self.bad_source = 0
        self.send_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._settle_scheduled = False

    # -- life

    async def open(self, port: int = 0, host: str | None = None) -> None:
        """Bind: ``host`` or every address (IPv6 and IPv4 where the host has IPv6)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        sock = self._socket(port, host)
        try:
            await loop.create_datagram_endpoint(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]

    def _socket(self, port: int, host: str | None) -> socket.socket:
        if host is not None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
            self.family = family
            return sock
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:
            sock = None
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", port))
                self.family = socket.AF_INET6
                return sock
            except OSError:
                sock.close()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            sock.close()
            raise
        self.family = socket.AF_INET
        return sock

    def close(self) -> None:
        """Close every session (a close_notify each), then the socket."""
        if self.transport is None:
            return
        with contextlib.suppress(Exception):
            self.manager.close(time.monotonic())
            self._pump()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.batch is not None:
            self.batch.close()
        self.transport.close()
        self.transport = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        enlarge_buffers(transport)
        self.batch = UdpBatchSender(self.transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def error_received(self, exc: Exception) -> None:
        # an ICMP error for one peer: its path's silence decides, not one error
        log.debug("direct socket error", extra=kv(error=exc))

    # -- input

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            src = Endpoint.from_sockaddr(addr)
        except DirectMessageError:
            self.bad_source += 1
            return
        try:
            self.manager.receive(data, src, time.monotonic())
        except Exception:
            log.exception("internal error on a direct datagram", extra=kv(peer=str(src)))
        if not self._settle_scheduled and self._loop is not None:
            self._settle_scheduled = True
            self._loop.call_soon(self._settle)

    def _settle(self) -> None:
        self._settle_scheduled = False
        self._pump()

    # -- the data path

    def route(self, packets: list, vnet: bool = False) -> list:
        """The TUN's packets: those a direct path takes go; the rest are returned."""
        manager = self.manager
        if not manager.any_direct:
            return packets
        rest = manager.route(packets, time.monotonic(), vnet)
        if len(rest) != len(packets):
            self._pump()
        return rest

    def relayed(self, packets: list, whole: bool = False) -> None:
        """Packets that came through the router: a direct peer's ends its path."""
        if self.manager.relayed(packets, time.monotonic(), whole):
            self._pump()

    # -- output, events, timer

    def _sockaddr(self, ep: Endpoint) -> tuple:
        if self.family == socket.AF_INET6 and ep.address.version == 4:
            return (f"::ffff:{ep.address}", ep.port)
        return (str(ep.address), ep.port)

    def _pump(self) -> None:
        manager = self.manager
        now = time.monotonic()
        try:
            out = manager.datagrams_to_send(now)
        except Exception:
            log.exception("internal error in the direct paths")
            out = []
        if out and self.transport is not None:
            self._send(out)
        packets = manager.take_packets()
        if packets:
            self.deliver(packets)
        msgs = manager.take_messages()
        if msgs:
            self.send_messages(msgs)
        for change in manager.take_changes():
            msg, fields = describe(change)
            level = logging.WARNING if msg == "direct path down" else logging.INFO
            log.log(level, msg, extra=kv(**fields))
        self._arm()

    def _send(self, out: list[tuple[bytes, Endpoint]]) -> None:
        batch = self.batch
        if batch is None:
            return
        # runs to one destination in order, one batch each
        groups: dict[Endpoint, list[bytes]] = {}
        for data, dest in out:
            group = groups.get(dest)
            if group is None:
                groups[dest] = [data]
            else:
                group.append(data)
        for dest, datagrams in groups.items():
            try:
                batch.send(datagrams, self._sockaddr(dest))
            except OSError:
                # unreachable and the like: lost as a datagram would be
                self.send_errors += 1

    def _arm(self) -> None:
        if self._loop is None or self.transport is None:
            return
        at = self.manager.get_timer()
        if at == self._timer_at and self._timer is not None:
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
            self.manager.handle_timer(time.monotonic())
        except Exception:
            log.exception("internal error in the direct paths' timer")
        self._pump()

"""A UDP listening socket that answers each peer from the local address the peer sent to.

On a host with several addresses (a service address on ``lo``, a secondary or floating
address, two NICs) a wildcard-bound UDP socket sends with the route's preferred source, which
need not be the address a peer dialled; the peer's connected socket then drops the reply. So
the socket asks for the destination of every datagram (``IP_PKTINFO``, ``IPV6_RECVPKTINFO``:
ancillary data, which asyncio's datagram transport does not hand over; hence this reader of
our own) and a reply carries that address back as its source (``sendmsg`` with
``IP_PKTINFO``'s ``ipi_spec_dst`` or ``IPV6_PKTINFO``), as WireGuard does. A dual-stack
``[::]`` socket reports IPv4 destinations as ``::ffff:a.b.c.d``, and Linux takes the same
form back as an IPv4 source.

When the address a peer used disappears, ``sendmsg`` refuses it (EINVAL, ENETUNREACH or
EADDRNOTAVAIL); a bind test tells that apart from an ordinary unreachable peer, and the
caller hears ``SourceGone`` so it can close that peer's session instead of letting replies
leave from another address.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from typing import Any

log = logging.getLogger("polevpn.udp")

# <linux/in.h>, <linux/in6.h>: Python's socket module lacks IP_PKTINFO
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
SOL_IP = socket.IPPROTO_IP
SOL_IPV6 = socket.IPPROTO_IPV6

# a UDP GRO read is up to 64 KiB of coalesced datagrams
RECV_SIZE = 1 << 16
# in6_pktinfo (20 bytes) and in_pktinfo (12) and the UDP_GRO segment size (int) together
ANC_SIZE = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4)
# datagrams read per wake-up before the loop gets a turn again
READ_BATCH = 64
# datagrams waiting for a full send buffer, in bytes; beyond it they are dropped and counted
SEND_QUEUE_BYTES = 4 << 20

# what sendmsg says when the source in IP_PKTINFO / IPV6_PKTINFO is not (or no longer) ours
_SOURCE_ERRNOS = frozenset((errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH))

_in_pktinfo = struct.Struct("=i4s4s")  # ipi_ifindex, ipi_spec_dst, ipi_addr
_in6_pktinfo = struct.Struct("=16si")  # ipi6_addr, ipi6_ifindex

Ancillary = list[tuple[int, int, bytes]]


class SourceGone(OSError):
    """The local address a reply was to leave from is no longer on this host."""


class Source:
    """A local address replies leave from: the ancillary data ``sendmsg`` takes for it."""

    __slots__ = ("address", "cmsg", "cmsgs", "family", "gone", "scope_id")

    def __init__(self, address: str, cmsg: tuple[int, int, bytes], family: int,
                 scope_id: int = 0) -> None:
        self.address = address
        self.cmsg = cmsg
        self.cmsgs = [cmsg]  # what sendmsg takes, made once (it is only read)
        self.family = family
        self.scope_id = scope_id
        # set once sendmsg found the address missing: no further system calls for it
        self.gone = False

    def __repr__(self) -> str:
        return f"Source({self.address})"

    def present(self) -> bool:
        """Whether the address is still one of this host's (binding to it tells)."""
        probe = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            if self.family == socket.AF_INET6:
                probe.bind((self.address, 0, 0, self.scope_id))
            else:
                probe.bind((self.address, 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
        finally:
            probe.close()
        return True


def source_of(ancdata: Ancillary | None) -> Source | None:
    """The reply source for a datagram received with ``ancdata`` (None: none reported).

    Only the address goes back, not the interface the datagram came in on: with a service
    address on ``lo`` the way back to the peer is the routing table's choice."""
    if not ancdata:
        return None
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_PKTINFO and len(data) >= _in_pktinfo.size:
            _ifindex, _spec_dst, addr = _in_pktinfo.unpack_from(data)
            cmsg = (SOL_IP, IP_PKTINFO, _in_pktinfo.pack(0, addr, bytes(4)))
            return Source(socket.inet_ntop(socket.AF_INET, addr), cmsg, socket.AF_INET)
        if level == SOL_IPV6 and kind == IPV6_PKTINFO and len(data) >= _in6_pktinfo.size:
            addr, ifindex = _in6_pktinfo.unpack_from(data)
            ip = ipaddress.IPv6Address(addr)
            if ip.ipv4_mapped is not None:
                # an IPv4 peer of a dual-stack socket; Linux takes the mapped form as source
                cmsg = (SOL_IPV6, IPV6_PKTINFO, _in6_pktinfo.pack(addr, 0))
                return Source(str(ip.ipv4_mapped), cmsg, socket.AF_INET)
            # a link-local address means nothing without its interface
            scope = ifindex if ip.is_link_local else 0
            cmsg = (SOL_IPV6, IPV6_PKTINFO, _in6_pktinfo.pack(addr, scope))
            return Source(str(ip), cmsg, socket.AF_INET6, scope)
    return None


def is_wildcard(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_unspecified


def enable_pktinfo(sock: socket.socket) -> bool:
    """Ask for every datagram's destination address; False where the kernel refuses."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(SOL_IP, IP_PKTINFO, 1)
    except OSError:
        return False
    return True


class UdpEndpoint:
    """A datagram transport over a socket of our own: reads with ``recvmsg`` (ancillary
    data), writes with ``sendmsg`` (a chosen source).

    The protocol gets ``datagram_received(data, addr, ancdata)``; turning ``ancdata`` into a
    ``Source`` is left to it (``source_of``), as only new peers need one. The asyncio
    transport surface it offers (sendto, get_extra_info, get_write_buffer_size, close) is
    what ``enlarge_buffers``, ``enable_gro`` and ``UdpBatchSender`` use.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.DatagramProtocol) -> None:
        self._loop = loop
        self._sock = sock
        self._fileno = sock.fileno()
        self._protocol = protocol
        self._extra = {"socket": sock, "sockname": sock.getsockname()}
        # (data, addr, source) waiting for the send buffer, and their bytes
        self._queue: collections.deque[tuple[bytes, Any, Source | None]] = collections.deque()
        self._queued = 0
        self._closing = False
        self.send_dropped = 0
        # whether datagrams come with their destination (a wildcard bind); else no source
        # is ever needed: the socket's own address is the only one
        self.pktinfo = is_wildcard(sock) and enable_pktinfo(sock)
        self._anc_size = ANC_SIZE  # also with pktinfo off: UDP GRO's segment size
        loop.add_reader(self._fileno, self._read_ready)
        protocol.connection_made(self)  # type: ignore[arg-type]

    # -- asyncio transport surface

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def get_protocol(self) -> asyncio.DatagramProtocol:
        return self._protocol

    def get_write_buffer_size(self) -> int:
        return self._queued

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fileno)
        if self._queue:
            self._loop.remove_writer(self._fileno)
            self._queue.clear()
            self._queued = 0
        self._loop.call_soon(self._finish)

    abort = close

    def _finish(self) -> None:
        try:
            self._protocol.connection_lost(None)
        finally:
            self._sock.close()

    # -- reading

    def _read_ready(self) -> None:
        recvmsg = self._sock.recvmsg
        received = self._protocol.datagram_received
        size, anc = RECV_SIZE, self._anc_size
        for _ in range(READ_BATCH):
            try:
                data, ancdata, _flags, addr = recvmsg(size, anc)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # an ICMP error queued on the socket: the protocol decides
                self._protocol.error_received(exc)
                return
            received(data, addr, ancdata)  # type: ignore[call-arg]
            if self._closing:
                return

    # -- writing

    def sendto(self, data: bytes, addr: Any = None, source: Source | None = None) -> None:
        """Send one datagram, from ``source`` if given; raises ``SourceGone`` if that
        address has left the host, reports other errors to the protocol."""
        if self._queue or self._closing:
            if not self._closing:
                self._enqueue(data, addr, source)
            return
        # _send inlined: this is every datagram the router sends
        try:
            if source is None:
                self._sock.sendto(data, addr)
            elif source.gone:
                raise SourceGone(errno.EADDRNOTAVAIL, f"{source.address} is no longer local")
            else:
                self._sock.sendmsg([data], source.cmsgs, 0, addr)
        except (BlockingIOError, InterruptedError):
            self._enqueue(data, addr, source)
            self._loop.add_writer(self._fileno, self._write_ready)
        except SourceGone:
            raise
        except OSError as exc:
            if source is not None:
                exc = source_error(exc, source)
                if isinstance(exc, SourceGone):
                    raise exc from None
            self._protocol.error_received(exc)

    def _send(self, data: bytes, addr: Any, source: Source | None) -> None:
        if source is None:
            self._sock.sendto(data, addr)
            return
        if source.gone:
            raise SourceGone(errno.EADDRNOTAVAIL, f"{source.address} is no longer local")
        try:
            self._sock.sendmsg([data], source.cmsgs, 0, addr)
        except OSError as exc:
            raise source_error(exc, source) from None

    def _enqueue(self, data: bytes, addr: Any, source: Source | None) -> None:
        if self._queued + len(data) > SEND_QUEUE_BYTES:
            self.send_dropped += 1
            return
        self._queue.append((data, addr, source))
        self._queued += len(data)

    def _write_ready(self) -> None:
        queue = self._queue
        while queue:
            data, addr, source = queue[0]
            try:
                self._send(data, addr, source)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # a vanished source shows up on that peer's next direct send; here the
                # datagram is lost like any other
                self._protocol.error_received(exc)
            queue.popleft()
            self._queued -= len(data)
        self._loop.remove_writer(self._fileno)


def source_error(exc: OSError, source: Source) -> OSError:
    """``exc`` from a send from ``source``, as ``SourceGone`` if the address has left."""
    if isinstance(exc, SourceGone):
        return exc
    if exc.errno in _SOURCE_ERRNOS and (source.gone or not source.present()):
        source.gone = True
        return SourceGone(exc.errno, f"{source.address} is no longer local ({exc.strerror})")
    return exc


async def open_endpoint(protocol: asyncio.DatagramProtocol, host: str | None,
                        port: int) -> UdpEndpoint:
    """Bind a UDP socket to ``host``:``port`` (as ``create_datagram_endpoint`` resolves it)
    and start reading it into ``protocol``. ``::`` serves IPv4 peers too."""
    loop = asyncio.get_running_loop()
    # "" (a listen of ":443") is the wildcard, as for bind; getaddrinfo wants None for it
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_DGRAM,
                                   flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned nothing")
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        if family == socket.AF_INET6 and ipaddress.ip_address(addr[0]).is_unspecified:
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.setblocking(False)
        return UdpEndpoint(loop, sock, protocol)
    except BaseException:
        sock.close()
        raise

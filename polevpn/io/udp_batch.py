"""Several UDP datagrams to one peer with one system call, through Linux UDP GSO.

KCP sends a window's worth of equal-sized segments at once; one ``sendmsg`` with the
``UDP_SEGMENT`` option hands the kernel a run of them and it cuts the datagrams itself (or
the NIC does). On the wire nothing changes: the peer receives ordinary datagrams, so a Go
PoleVPN peer is unaffected. Where the kernel or the route refuses (EIO: no checksum offload
on the way out), the sender falls back to one datagram per call for good.

A ``source`` (``udpsock.Source``) rides along as ``IP_PKTINFO`` / ``IPV6_PKTINFO`` next to
``UDP_SEGMENT``, so a batch leaves from the same local address as single datagrams do; a
source that has left the host raises ``udpsock.SourceGone`` to the caller.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from polevpn.io.udpsock import Source, SourceGone, source_error

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = 103
# the kernel's UDP_MAX_SEGMENTS was 64 before Linux 6.2
MAX_SEGMENTS = 64
# what one IPv4/IPv6 UDP datagram may carry before it is cut
MAX_BATCH_BYTES = 65000

_u16 = struct.Struct("=H").pack
_GSO_REFUSED = (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT)


class UdpBatchSender:
    """Sends lists of datagrams for an asyncio datagram transport.

    It writes on a duplicate of the transport's socket, and only while the transport's own
    buffer is empty, so datagrams never overtake ones the transport still holds.
    """

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport
        self.batches = 0
        self.batched_datagrams = 0
        self.send_errors = 0
        self._sock: socket.socket | None = None
        sock = transport.get_extra_info("socket")
        if sock is None or os.environ.get("POLEVPN_NO_UDP_GSO"):
            return
        try:
            dup = socket.socket(sock.family, socket.SOCK_DGRAM, 0, os.dup(sock.fileno()))
        except OSError:
            return
        dup.setblocking(False)
        self._sock = dup

    @property
    def gso(self) -> bool:
        return self._sock is not None

    def send(self, datagrams: Sequence[bytes], addr: Any = None,
             source: Source | None = None) -> None:
        """``source``: the local address to send from (a ``udpsock.UdpEndpoint`` only)."""
        sock = self._sock
        n = len(datagrams)
        if sock is None or n < 2 or self.transport.get_write_buffer_size():
            self._send_each(datagrams, addr, source)
            return
        sendto = self.transport.sendto
        extra: list[tuple[int, int, bytes]] = []
        if source is not None:
            if source.gone:
                raise SourceGone(errno.EADDRNOTAVAIL, f"{source.address} is no longer local")
            extra.append(source.cmsg)
        i = 0
        while i < n:
            size = len(datagrams[i])
            total = size
            j = i + 1
            # a run: equal sizes, and the last one may be shorter (GSO's own rule)
            while j < n and j - i < MAX_SEGMENTS:
                k = len(datagrams[j])
                if k > size or total + k > MAX_BATCH_BYTES:
                    break
                total += k
                j += 1
                if k < size:
                    break
            if j - i == 1:
                if source is None:
                    sendto(datagrams[i], addr)
                else:
                    sendto(datagrams[i], addr, source)  # type: ignore[call-arg]
                i = j
                continue
            payload = b"".join(datagrams[i:j])
            cmsg = [(SOL_UDP, UDP_SEGMENT, _u16(size)), *extra]
            try:
                if addr is None:
                    sock.sendmsg([payload], cmsg)
                else:
                    sock.sendmsg([payload], cmsg, 0, addr)
            except BlockingIOError:
                # the socket buffer is full: the transport queues the rest, in order
                self._send_each(datagrams[i:], addr, source)
                return
            except OSError as exc:
                if source is not None:
                    # EINVAL from a vanished source is no verdict on GSO
                    exc = source_error(exc, source)
                    if isinstance(exc, SourceGone):
                        raise exc from None
                if exc.errno in _GSO_REFUSED:
                    self.close()
                    self._send_each(datagrams[i:], addr, source)
                    return
                # unreachable and the like: this run is lost as a datagram would be and KCP
                # retransmits. The call consumed the socket's pending error (an ICMP port
                # unreachable on a connected socket), so the protocol must hear it from us,
                # as it would from the transport's own sendto; later, not inside KCP's flush.
                self.send_errors += 1
                self._report(exc)
            else:
                self.batches += 1
                self.batched_datagrams += j - i
            i = j

    def _report(self, exc: OSError) -> None:
        protocol = self.transport.get_protocol()
        if protocol is not None:
            asyncio.get_running_loop().call_soon(protocol.error_received, exc)

    def _send_each(self, datagrams: Sequence[bytes], addr: Any,
                   source: Source | None = None) -> None:
        sendto = self.transport.sendto
        if source is None:
            for d in datagrams:
                sendto(d, addr)
        else:
            for d in datagrams:
                sendto(d, addr, source)  # type: ignore[call-arg]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

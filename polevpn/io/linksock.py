"""Sockets of one link of a multi-link gateway: bound to its uplink, with a short queue.

A gateway with two uplinks reaches the router through each of them on purpose, so a link's
socket is tied to its uplink by source address (``bind``) or by device (``interface``,
SO_BINDTODEVICE) rather than left to the routing table, which would send both the same way.

A link's send queue is kept short on both ends. Its heartbeats wait behind whatever is
queued, so a long queue on a slow uplink would look like a dead link, and a dead link would
hide behind seconds of buffered data; a full queue costs packets instead, which TCP inside
the tunnel takes as congestion.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket

# how much may wait in our buffer for one link (the rest is dropped): ~170 ms at 50 Mbit/s
LINK_QUEUE_BYTES = 1 << 20
# and how much of it the kernel holds unsent (TCP_NOTSENT_LOWAT)
LINK_NOTSENT_BYTES = 128 * 1024
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


async def resolve(
    host: str, port: int, kind: socket.SocketKind, bind: str | None
) -> tuple[socket.AddressFamily, tuple]:
    """The router's address to use: the first, or the first of ``bind``'s family."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=kind)
    if bind is not None:
        want = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
        infos = [info for info in infos if info[0] == want]
    if not infos:
        raise OSError(f"cannot resolve {host}" + (f" to an address like {bind}" if bind else ""))
    family, _, _, _, addr = infos[0]
    return family, addr


def bound_socket(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    bind: str | None,
    interface: str | None,
) -> socket.socket:
    """A non-blocking socket that sends from ``bind`` and through ``interface``."""
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        if interface is not None:
            # no capability needed since Linux 5.7 (CAP_NET_RAW before)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        if bind is not None:
            sock.bind((bind, 0))
    except OSError:
        sock.close()
        raise
    return sock


def shorten_queue(transport: asyncio.BaseTransport, limit: int) -> int:
    """Bound what waits on ``transport`` to ``limit`` (at most LINK_QUEUE_BYTES); returns
    the bound used."""
    limit = min(limit, LINK_QUEUE_BYTES)
    transport.set_write_buffer_limits(high=limit, low=limit // 2)  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.type == socket.SOCK_STREAM:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, LINK_NOTSENT_BYTES)
    return limit

"""Linux TUN device through the kernel's ioctl interface, with batched non-blocking I/O.

With ``offload`` the device is opened with IFF_VNET_HDR and told (TUNSETOFFLOAD) that we take
partial checksums and TCP/UDP segmentation offload: the kernel then hands us TCP super-packets
of up to 64 KiB instead of MTU-sized ones, each after a 10-byte virtio-net header, and takes
the same back. One read and one write per 64 KiB instead of per 1400 bytes is where a
userspace VPN's throughput comes from.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Protocol

from polevpn.packet.gso import PLAIN_HDR, VNET_HDR_LEN

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

# a TUN hands out one IP packet per read, at most 64 KiB (plus the virtio-net header)
READ_SIZE = 65536 + 64


class Tun(Protocol):
    """What the gateway needs of a TUN device: ``TunDevice``, or an in-memory fake in tests.

    ``fileno`` is what the event loop watches for readability; ``read_batch`` returns the
    packets ready now (maybe none) and raises OSError only when the device is unusable;
    ``write`` and ``write_super`` drop and count what the kernel refuses, and raise OSError
    only when the device is gone.
    """

    name: str
    vnet_hdr: bool
    offloads: int
    write_errors: int
    write_dropped: int

    def fileno(self) -> int: ...

    def read_batch(self, limit: int = 64, max_bytes: int = 1 << 20) -> list[bytes]: ...

    def write(self, packet: bytes | memoryview) -> None: ...

    def write_super(self, buf: bytes | memoryview) -> None: ...

    def close(self) -> None: ...


class TunDevice:
    """An open TUN interface. ``read_batch`` and the writes never block.

    With ``offload``, every packet read starts with a virtio-net header, ``write_super``
    takes header + packet, and ``write`` adds an all-zero header itself.
    """

    def __init__(self, name: str, offload: bool = False) -> None:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            res = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
            self.offloads = _enable_offloads(fd) if offload else 0
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        self.name = res[:16].rstrip(b"\0").decode()
        self.vnet_hdr = offload
        self.write_errors = 0
        self.write_dropped = 0

    def fileno(self) -> int:
        return self.fd

    @property
    def uso(self) -> bool:
        return bool(self.offloads & TUN_F_USO4)

    def read_batch(self, limit: int = 64, max_bytes: int = 1 << 20) -> list[bytes]:
        """Packets that are ready now, up to ``limit`` or about ``max_bytes``; maybe none."""
        out: list[bytes] = []
        read = os.read
        fd = self.fd
        total = 0
        try:
            for _ in range(limit):
                pkt = read(fd, READ_SIZE)
                out.append(pkt)
                total += len(pkt)
                if total >= max_bytes:
                    break
        except BlockingIOError:
            pass
        except OSError:
            # the device failed: what was read first goes out, and the next read raises
            if not out:
                raise
        return out

    def write(self, packet: bytes | memoryview) -> None:
        """A plain IP packet."""
        try:
            if self.vnet_hdr:
                os.writev(self.fd, (PLAIN_HDR, packet))
            else:
                os.write(self.fd, packet)
        except OSError as exc:
            self._write_failed(exc)

    def write_super(self, buf: bytes | memoryview) -> None:
        """Virtio-net header + IP packet; only on a device opened with ``offload``."""
        try:
            os.write(self.fd, buf)
        except OSError as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        if isinstance(exc, BlockingIOError):
            self.write_dropped += 1
        elif exc.errno in (errno.EBADF, errno.EBADFD):
            raise exc
        else:
            # EINVAL and friends: the kernel refused this one packet; the device is fine
            self.write_errors += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _enable_offloads(fd: int) -> int:
    """Ask for the most the kernel gives; USO arrived in Linux 6.2. Returns the flags set."""
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
    base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    for flags in (base | TUN_F_USO4 | TUN_F_USO6, base):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return 0

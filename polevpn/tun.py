"""Linux TUN device through the kernel's ioctl interface, with batched non-blocking I/O."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

# a TUN never hands out more than one IP packet per read, and an IP packet is at most 64 KiB
READ_SIZE = 65536


class TunDevice:
    """An open TUN interface. ``read_batch`` and ``write`` never block."""

    def __init__(self, name: str) -> None:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        self.name = res[:16].rstrip(b"\0").decode()
        self.write_errors = 0
        self.write_dropped = 0

    def read_batch(self, limit: int = 64) -> list[bytes]:
        """Up to ``limit`` packets that are ready now; an empty list when none are."""
        out: list[bytes] = []
        read = os.read
        fd = self.fd
        try:
            for _ in range(limit):
                out.append(read(fd, READ_SIZE))
        except BlockingIOError:
            pass
        return out

    def write(self, packet: bytes | memoryview) -> None:
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            self.write_dropped += 1
        except OSError as exc:
            # EINVAL and friends: the kernel refused this one packet; the device is fine
            if exc.errno in (errno.EBADF, errno.EBADFD):
                raise
            self.write_errors += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

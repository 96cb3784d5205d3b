"""Giving freed heap back to the operating system after a burst of connections ends.

glibc keeps what the process frees in its heap (below the trim threshold, and in free
pages between live allocations), so a router that held many sessions, or many handshakes
an attacker opened, stays at its peak RSS long after they are gone: 57 MB idle, 96-181 MB
after the attacks of ``make attack``. ``malloc_trim(0)`` returns the free pages
(MADV_DONTNEED); it walks the heap, a few milliseconds for a hundred megabytes, so it runs
only after the number of live connections has fallen, and at most every ``interval``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Callable


class TrimPolicy:
    """When to trim (no I/O): after the live count fell below its peak since the last
    trim, and not within ``interval`` seconds of the last one."""

    __slots__ = ("interval", "peak", "last")

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.peak = 0
        self.last = float("-inf")

    def due(self, live: int, now: float) -> bool:
        if live > self.peak:
            self.peak = live
            return False
        if live < self.peak and now - self.last >= self.interval:
            self.peak = live
            self.last = now
            return True
        return False


def malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where there is no glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)

"""Reusable KCP control blocks.

The ``kcp`` package (Cython over ikcp.c) never calls ``ikcp_release``: every ``KCP`` object
that is dropped leaks its control block, send buffer and queued segments, about 4 KB each
(more with data in flight). A router that sees gateways reconnect for months would grow
without bound. So KCP objects are never dropped: a closed session's object goes back to a
pool, and before it is handed out again its control block is swapped for a fresh one from
``ikcp_create`` while the old one is released with ``ikcp_release``, through ctypes on the
extension's own exported symbols.

Swapping needs the address of the ``IKCPCB*`` inside the Cython object. ``_probe`` finds
it once at import by creating an object with distinctive settings and checking the
structure it points to; if a future ``kcp`` release changes its layout, the probe fails,
``RESET_SUPPORTED`` is False, and the pool still reuses nothing it cannot reset (objects
are then dropped and leak as before, with a warning) instead of corrupting memory.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import kcp as _kcp_pkg
from kcp import KCP
from kcp import extension as _ext

from .logfmt import kv

log = logging.getLogger("polevpn.kcp")

IKCP_OVERHEAD = 24
_u32 = ctypes.c_uint32
_i32 = ctypes.c_int32


class _QueueHead(ctypes.Structure):
    _fields_ = [("next", ctypes.c_void_p), ("prev", ctypes.c_void_p)]


class IKCPCB(ctypes.Structure):
    """Mirror of ``struct IKCPCB`` in ikcp.h (the copy shipped with the ``kcp`` package)."""

    _fields_ = [
        *[(n, _u32) for n in ("conv", "mtu", "mss", "state")],
        *[(n, _u32) for n in ("snd_una", "snd_nxt", "rcv_nxt")],
        *[(n, _u32) for n in ("ts_recent", "ts_lastack", "ssthresh")],
        *[(n, _i32) for n in ("rx_rttval", "rx_srtt", "rx_rto", "rx_minrto")],
        *[(n, _u32) for n in ("snd_wnd", "rcv_wnd", "rmt_wnd", "cwnd", "probe")],
        *[(n, _u32) for n in ("current", "interval", "ts_flush", "xmit")],
        *[(n, _u32) for n in ("nrcv_buf", "nsnd_buf", "nrcv_que", "nsnd_que")],
        *[(n, _u32) for n in ("nodelay", "updated", "ts_probe", "probe_wait")],
        *[(n, _u32) for n in ("dead_link", "incr")],
        *[(n, _QueueHead) for n in ("snd_queue", "rcv_queue", "snd_buf", "rcv_buf")],
        ("acklist", ctypes.c_void_p),
        ("ackcount", _u32),
        ("ackblock", _u32),
        ("user", ctypes.c_void_p),
        ("buffer", ctypes.c_void_p),
        *[(n, ctypes.c_int) for n in ("fastresend", "fastlimit", "nocwnd", "stream", "logmask")],
        ("output", ctypes.c_void_p),
        ("writelog", ctypes.c_void_p),
    ]


_lib = ctypes.CDLL(_ext.__file__)
_create = _lib.ikcp_create
_create.restype = ctypes.c_void_p
_create.argtypes = [_u32, ctypes.c_void_p]
_release = _lib.ikcp_release
_release.restype = None
_release.argtypes = [ctypes.c_void_p]


def _probe() -> int | None:
    """Byte offset of the ``IKCPCB*`` field in a ``KCP`` object, or None if not found."""
    conv, mtu = 0x5A17C0DE, 1234
    obj = KCP(conv, max_transmission=mtu, send_window_size=77, receive_window_size=1333)
    base = id(obj)
    # PyObject header, then Cython's vtable pointer, then the first cdef field
    for offset in range(16, 64, 8):
        ptr = ctypes.c_void_p.from_address(base + offset).value
        if not ptr:
            continue
        try:
            cb = IKCPCB.from_address(ptr)
        except (ValueError, OSError):
            continue
        if (cb.conv, cb.mtu, cb.mss, cb.snd_wnd, cb.rcv_wnd, cb.user) == (
            conv,
            mtu,
            mtu - IKCP_OVERHEAD,
            77,
            1333,
            base,
        ):
            _KEEP.append(obj)  # reused below, never dropped
            return offset
    return None


_KEEP: list[KCP] = []
try:
    _OFFSET = _probe() if sys.implementation.name == "cpython" else None
except Exception:  # any surprise in the probe means: do not touch the objects
    _OFFSET = None
RESET_SUPPORTED = _OFFSET is not None


def control_block(obj: KCP) -> IKCPCB:
    """The live C structure behind ``obj`` (read-only use: stats such as srtt)."""
    if _OFFSET is None:
        raise RuntimeError("kcp object layout unknown")
    ptr = ctypes.c_void_p.from_address(id(obj) + _OFFSET).value
    return IKCPCB.from_address(ptr)


def reset(obj: KCP, conv: int) -> None:
    """Give ``obj`` a brand-new control block and release the old one."""
    assert _OFFSET is not None
    slot = ctypes.c_void_p.from_address(id(obj) + _OFFSET)
    old = slot.value
    old_cb = IKCPCB.from_address(old)
    new = _create(conv, id(obj))
    if not new:
        raise MemoryError("ikcp_create failed")
    new_cb = IKCPCB.from_address(new)
    # the output hook is Cython's static trampoline; it is not exported, so copy it over
    new_cb.output = old_cb.output
    slot.value = new
    _release(old)


class KcpPool:
    """Hands out KCP objects configured as asked; takes them back when a session ends."""

    def __init__(self) -> None:
        self._free: list[KCP] = list(_KEEP) if RESET_SUPPORTED else []
        _KEEP.clear()
        self.created = 0
        self.reused = 0
        self._warned = False

    def acquire(
        self,
        conv: int,
        mtu: int,
        nodelay: bool,
        interval: int,
        resend: int,
        no_congestion_window: bool,
        send_window: int,
        receive_window: int,
    ) -> KCP:
        if self._free:
            obj = self._free.pop()
            reset(obj, conv)
            self.reused += 1
        else:
            obj = KCP(conv)
            self.created += 1
        obj.set_maximum_transmission(mtu)
        obj.set_performance_options(nodelay, interval, resend, no_congestion_window)
        obj.set_window_size(send_window, receive_window)
        return obj

    def release(self, obj: KCP) -> None:
        if RESET_SUPPORTED:
            # its handler closes over a finished session; drop that reference now
            obj.include_outbound_handler(_discard)
            self._free.append(obj)
        elif not self._warned:
            self._warned = True
            log.warning(
                "kcp object layout not recognised, KCP objects cannot be reused "
                "and each closed session leaks about 4 KB",
                extra=kv(kcp_version=getattr(_kcp_pkg, "__version__", "?")),
            )

    @property
    def idle(self) -> int:
        return len(self._free)


def _discard(obj: KCP, data: bytes) -> None:
    pass

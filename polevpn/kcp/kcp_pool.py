"""KCP control blocks for kcp:// sessions, handed out configured and taken back reset.

KCP itself is ``polevpn.kcp._ikcp`` (ikcp.c vendored under ``polevpn/kcp/vendor/kcp``, with a
small CPython wrapper): a ``Kcp`` object owns its control block and frees it when it is
dropped. The pool saves the allocation for the next session, nothing more: ``release``
resets the object at once, so a closed session's segments (send queue, receive buffer,
ACK list) are freed when it closes, not when the object is reused, and at most
``max_idle`` reset objects (about 4.5 KB each) are kept.
"""

from __future__ import annotations

from polevpn.kcp._ikcp import Kcp

IKCP_OVERHEAD = 24
MAX_IDLE = 64


class KcpPool:
    """Hands out KCP objects configured as asked; takes them back when a session ends."""

    def __init__(self, max_idle: int = MAX_IDLE) -> None:
        self._free: list[Kcp] = []
        self.max_idle = max_idle
        self.created = 0
        self.reused = 0

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
    ) -> Kcp:
        if self._free:
            obj = self._free.pop()
            if obj.conv != conv:
                obj.reset(conv)
            self.reused += 1
        else:
            obj = Kcp(conv)
            self.created += 1
        # the order the `kcp` package used (its constructor, then these): same settings
        obj.setmtu(mtu)
        obj.nodelay(nodelay, interval, resend, no_congestion_window)
        obj.wndsize(send_window, receive_window)
        return obj

    def release(self, obj: Kcp) -> None:
        # its output closes over a finished session; its segments go now
        obj.set_output(None)
        obj.reset(0)
        if len(self._free) < self.max_idle:
            self._free.append(obj)

    @property
    def idle(self) -> int:
        return len(self._free)

"""Admission control for the router: pending-connection caps and the AUTH failure limit.

No I/O: addresses and times in, verdicts out. A connection is *pending* from the moment it
is accepted (TCP accept, or a DTLS ClientHello with a valid cookie) until it has registered
or closed. Sources are counted per address, except IPv6, which is counted per /64: one
host is routinely given a whole /64, and counting per address would let it open 2^64
"sources".

Every table here is bounded: a source with nothing pending and no recent failures is
forgotten, and when the failure table is full the oldest entry is evicted.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass

from .counters import Counters

REFUSED_TOTAL = "pending"
REFUSED_SOURCE = "pending-per-source"
REFUSED_RATE = "auth-rate-limited"


@dataclass(frozen=True)
class LimitParams:
    max_pending: int = 1024
    max_pending_per_source: int = 32
    # a source with this many failed AUTH/REGISTER attempts within the window is refused
    auth_failures: int = 10
    auth_failure_window: float = 60.0
    max_tracked_sources: int = 65536
    # what one gateway may announce in REGISTER: networks, and distinct prefix lengths per
    # address family (its own address included). The route lookup probes one table per
    # distinct length present, so one gateway with a hundred lengths slows every packet
    max_networks_per_gateway: int = 256
    max_prefix_lengths_per_gateway: int = 16


@dataclass
class AdmissionStats(Counters):
    refused_pending: int = 0
    refused_pending_per_source: int = 0
    refused_rate_limited: int = 0


def source_key(host: str) -> str:
    """The unit that limits apply to: the IPv4 address, or the /64 of an IPv6 address."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if addr.version == 6:
        mapped = addr.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


class Admission:
    __slots__ = ("params", "pending", "by_source", "failures", "stats")

    def __init__(self, params: LimitParams) -> None:
        self.params = params
        self.pending = 0
        self.by_source: dict[str, int] = {}
        # source -> times of its recent failures (at most auth_failures of them)
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()
        self.stats = AdmissionStats()

    def admit(self, source: str, now: float) -> str | None:
        """Take a pending slot for ``source`` (a ``source_key``), or say why not."""
        p = self.params
        if self.blocked(source, now):
            self.stats.refused_rate_limited += 1
            return REFUSED_RATE
        if self.pending >= p.max_pending:
            self.stats.refused_pending += 1
            return REFUSED_TOTAL
        n = self.by_source.get(source, 0)
        if n >= p.max_pending_per_source:
            self.stats.refused_pending_per_source += 1
            return REFUSED_SOURCE
        self.by_source[source] = n + 1
        self.pending += 1
        return None

    def release(self, source: str) -> None:
        """The pending connection registered or closed."""
        n = self.by_source.get(source)
        if n is None:
            return
        self.pending -= 1
        if n <= 1:
            del self.by_source[source]
        else:
            self.by_source[source] = n - 1

    def blocked(self, source: str, now: float) -> bool:
        times = self.failures.get(source)
        if times is None:
            return False
        while times and now - times[0] > self.params.auth_failure_window:
            times.popleft()
        if not times:
            del self.failures[source]
            return False
        return len(times) >= self.params.auth_failures

    def failure(self, source: str, now: float) -> bool:
        """Count a failed AUTH or REGISTER; True when this one blocks the source."""
        times = self.failures.get(source)
        if times is None:
            if len(self.failures) >= self.params.max_tracked_sources:
                self.failures.popitem(last=False)
            times = self.failures[source] = deque(maxlen=self.params.auth_failures)
        else:
            self.failures.move_to_end(source)
        times.append(now)
        return len(times) == self.params.auth_failures and self.blocked(source, now)

"""Admission control for the router: pending-connection caps and the AUTH failure limit.

No I/O: addresses and times in, verdicts out. A connection is *pending* from the moment it
is accepted (TCP accept, or a DTLS ClientHello with a valid cookie) until it has registered
or closed. Sources are counted per address, except IPv6, which is counted per /64: one
host is routinely given a whole /64, and counting per address would let it open 2^64
"sources".

One network must not take every pending slot either: an IPv6 /59 opened all 1,024 of them
with 32 per /64. So pending connections are also counted per IPv4 /24 and per IPv6 /56 and
/48, each capped at a share of ``max_pending``, and a share of ``max_pending`` is kept for
the sources of known gateways (that passed AUTH within ``known_source_ttl``), which
strangers cannot take.

Every table here is bounded: a source with nothing pending and no recent failures is
forgotten, and when the failure table is full the oldest entry is evicted.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass

from polevpn.common.counters import Counters
from polevpn.config import LimitParams

REFUSED_TOTAL = "pending"
REFUSED_SOURCE = "pending-per-source"
REFUSED_PREFIX = "pending-per-prefix"
REFUSED_RATE = "auth-rate-limited"


@dataclass
class AdmissionStats(Counters):
    refused_pending: int = 0
    refused_pending_per_source: int = 0
    refused_pending_per_prefix: int = 0
    refused_rate_limited: int = 0
    admitted_known: int = 0
    pre_tls_timeouts: int = 0


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


@functools.lru_cache(maxsize=4096)
def prefixes(source: str) -> tuple[tuple[str, bool], ...]:
    """The networks above a ``source_key`` that pending slots are also counted in, each with
    whether it is a site (/48, the site cap) rather than a net (/24 or /56, the net cap)."""
    try:
        net = ipaddress.ip_network(source, strict=False)
    except ValueError:
        return ()
    if net.version == 4:
        return ((str(net.supernet(new_prefix=24)), False),) if net.prefixlen > 24 else ()
    if net.prefixlen <= 48:
        return ()
    return (
        (str(net.supernet(new_prefix=56)), False),
        (str(net.supernet(new_prefix=48)), True),
    )


class Admission:
    __slots__ = (
        "params",
        "pending",
        "by_source",
        "by_prefix",
        "strangers",
        "stranger_slots",
        "known",
        "failures",
        "stats",
    )

    def __init__(self, params: LimitParams) -> None:
        self.params = params
        self.pending = 0
        self.by_source: dict[str, int] = {}
        # slots of sources that were not known when admitted, per /24, /56 and /48
        self.by_prefix: dict[str, int] = {}
        self.strangers = 0
        self.stranger_slots: dict[str, int] = {}
        # source -> when a connection from it last passed AUTH (oldest first)
        self.known: OrderedDict[str, float] = OrderedDict()
        # source -> times of its recent failures (at most auth_failures of them)
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()
        self.stats = AdmissionStats()

    def admit(self, source: str, now: float) -> str | None:
        """Take a pending slot for ``source`` (a ``source_key``), or say why not."""
        p = self.params
        if self.blocked(source, now):
            self.stats.refused_rate_limited += 1
            return REFUSED_RATE
        known = self.is_known(source, now)
        if self.pending >= p.max_pending or (not known and self.strangers >= p.shared()):
            self.stats.refused_pending += 1
            return REFUSED_TOTAL
        n = self.by_source.get(source, 0)
        if n >= p.max_pending_per_source:
            self.stats.refused_pending_per_source += 1
            return REFUSED_SOURCE
        if known:
            self.stats.admitted_known += 1
        else:
            above = prefixes(source)
            for net, site in above:
                if self.by_prefix.get(net, 0) >= (p.site_cap() if site else p.net_cap()):
                    self.stats.refused_pending_per_prefix += 1
                    return REFUSED_PREFIX
            for net, _ in above:
                self.by_prefix[net] = self.by_prefix.get(net, 0) + 1
            self.strangers += 1
            self.stranger_slots[source] = self.stranger_slots.get(source, 0) + 1
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
        # a stranger's slot first: the source may have become known since it was admitted
        s = self.stranger_slots.get(source)
        if s is None:
            return
        self.strangers -= 1
        if s <= 1:
            del self.stranger_slots[source]
        else:
            self.stranger_slots[source] = s - 1
        for net, _ in prefixes(source):
            m = self.by_prefix[net]
            if m <= 1:
                del self.by_prefix[net]
            else:
                self.by_prefix[net] = m - 1

    def authenticated(self, source: str, now: float) -> None:
        """A connection from ``source`` passed AUTH: it is a known source from now on."""
        known = self.known
        if source in known:
            known.move_to_end(source)
        elif len(known) >= self.params.max_tracked_sources:
            known.popitem(last=False)
        known[source] = now

    def forget(self, source: str) -> None:
        """``source`` is no longer known (its gateway's credentials were revoked)."""
        self.known.pop(source, None)

    def is_known(self, source: str, now: float) -> bool:
        when = self.known.get(source)
        if when is None:
            return False
        if now - when > self.params.known_source_ttl:
            del self.known[source]
            return False
        return True

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


# -- HTTP clients (the REST API and /metrics)


@dataclass(frozen=True)
class ClientLimits:
    """How many HTTP clients a server (the API, /metrics) serves at once.

    ``reserved`` of the ``max_clients`` slots are only for trusted clients (loopback: the
    operator's polevpn-ctl, an SSH tunnel to the dashboard, a local Prometheus), and a
    trusted client that finds every slot taken closes the oldest connection still waiting
    for its request, so idle connections, wherever they come from, cannot lock it out.
    Others get at most ``per_client`` connections per source (an address, or an IPv6 /64).
    """

    max_clients: int = 64
    per_client: int = 8
    reserved: int = 16


HTTP_REFUSED_FULL = "full"
HTTP_REFUSED_SOURCE = "per-client"


def is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:  # type: ignore[union-attr]
        addr = addr.ipv4_mapped  # type: ignore[union-attr]
    return addr.is_loopback


@dataclass
class _Client:
    source: str
    trusted: bool
    waiting: bool = True  # its request head has not arrived yet: it may be evicted


@dataclass(frozen=True)
class ClientVerdict:
    refused: str | None = None
    # a connection to close to make room for this one (its id), or None
    evict: object | None = None


class ClientSlots:
    """Slot accounting for one HTTP server: ids and addresses in, verdicts out (no I/O)."""

    def __init__(self, params: ClientLimits, trusted=is_loopback) -> None:
        self.params = params
        self.trusted = trusted
        # id -> client, in order of arrival (the first waiting one is the oldest)
        self.clients: dict[object, _Client] = {}
        self.untrusted = 0
        self.by_source: dict[str, int] = {}
        self.refused = 0
        self.evicted = 0

    def admit(self, cid: object, host: str) -> ClientVerdict:
        """A new connection ``cid`` from ``host``: take a slot, maybe after evicting one."""
        p = self.params
        trusted = bool(self.trusted(host))
        source = source_key(host)
        evict = None
        if trusted:
            if len(self.clients) >= p.max_clients:
                evict = self._oldest_waiting()
                if evict is None:
                    self.refused += 1
                    return ClientVerdict(HTTP_REFUSED_FULL)
                self.release(evict)
                self.evicted += 1
        else:
            if self.by_source.get(source, 0) >= p.per_client:
                self.refused += 1
                return ClientVerdict(HTTP_REFUSED_SOURCE)
            if self.untrusted >= p.max_clients - p.reserved or len(self.clients) >= p.max_clients:
                self.refused += 1
                return ClientVerdict(HTTP_REFUSED_FULL)
            self.untrusted += 1
            self.by_source[source] = self.by_source.get(source, 0) + 1
        self.clients[cid] = _Client(source, trusted)
        return ClientVerdict(None, evict)

    def _oldest_waiting(self) -> object | None:
        # an untrusted one first: a local client never loses its slot to a remote one
        first_trusted = None
        for cid, c in self.clients.items():
            if c.waiting:
                if not c.trusted:
                    return cid
                if first_trusted is None:
                    first_trusted = cid
        return first_trusted

    def started(self, cid: object) -> None:
        """Its request head arrived: it is being served and is no longer evicted."""
        c = self.clients.get(cid)
        if c is not None:
            c.waiting = False

    def release(self, cid: object) -> None:
        c = self.clients.pop(cid, None)
        if c is None or c.trusted:
            return
        self.untrusted -= 1
        n = self.by_source[c.source]
        if n <= 1:
            del self.by_source[c.source]
        else:
            self.by_source[c.source] = n - 1

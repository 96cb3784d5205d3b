"""A small NAT simulator for the direct-path tests: UDP between hosts on private LANs
behind NATs and hosts on a public segment, in virtual time, deterministic per seed.

A ``Nat`` has one public address and a private LAN. Outbound, it maps the private source
endpoint to a public port, per RFC 4787's three behaviours:

    Mapping.INDEPENDENT     one public port per private endpoint, whatever the destination
                            ("endpoint-independent": full, restricted and port-restricted
                            cone NATs, most home and office routers, Linux masquerade)
    Mapping.ADDRESS         one per private endpoint and destination address
    Mapping.ADDRESS_PORT    one per private endpoint and destination endpoint ("symmetric":
                            a new random port for every destination)

Inbound, to a public port with a live mapping, it lets a datagram in per its filtering:

    Filtering.INDEPENDENT   from anyone
    Filtering.ADDRESS       from an address the mapping has sent to
    Filtering.ADDRESS_PORT  from an endpoint the mapping has sent to

Mappings idle for ``timeout`` are forgotten (outbound traffic refreshes them). Private
addresses of another LAN are not routed. Hosts on one LAN reach each other directly.

``Net`` moves datagrams: ``send`` now, ``deliver_due`` at arrival, with a one-way delay per
pair of public addresses, and ``cut`` (a predicate on the public endpoints) drops what a
test wants dropped. ``run`` drives ``Actor``s (gateways and the router of a test) and the
network from one virtual clock.

Addresses: only 198.18.0.0/15 (public segment 198.18.0.0/24, LANs in 198.19.0.0/16).
"""

from __future__ import annotations

import heapq
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from polevpn.direct.messages import Endpoint

Datagrams = list[tuple[bytes, Endpoint]]


class Mapping(Enum):
    INDEPENDENT = "endpoint-independent"
    ADDRESS = "address-dependent"
    ADDRESS_PORT = "address-and-port-dependent"


class Filtering(Enum):
    INDEPENDENT = "endpoint-independent"
    ADDRESS = "address-dependent"
    ADDRESS_PORT = "address-and-port-dependent"


@dataclass
class _Binding:
    private: Endpoint
    port: int
    last: float
    addresses: set = field(default_factory=set)
    endpoints: set = field(default_factory=set)


class Nat:
    def __init__(
        self,
        public: str,
        lan: str,
        mapping: Mapping = Mapping.INDEPENDENT,
        filtering: Filtering = Filtering.ADDRESS_PORT,
        timeout: float = 30.0,
        seed: int = 1,
    ) -> None:
        self.public = ipaddress.ip_address(public)
        self.lan = ipaddress.ip_network(lan)
        self.mapping = mapping
        self.filtering = filtering
        self.timeout = timeout
        self._rng = random.Random(seed)
        self._by_key: dict[tuple, _Binding] = {}
        self._by_port: dict[int, _Binding] = {}
        self.dropped_filtered = 0
        self.dropped_unmapped = 0

    def _key(self, src: Endpoint, dst: Endpoint) -> tuple:
        if self.mapping is Mapping.INDEPENDENT:
            return (src,)
        if self.mapping is Mapping.ADDRESS:
            return (src, dst.address)
        return (src, dst)

    def _live(self, binding: _Binding | None, now: float) -> _Binding | None:
        if binding is not None and now - binding.last >= self.timeout:
            self._by_port.pop(binding.port, None)
            self._by_key = {k: b for k, b in self._by_key.items() if b is not binding}
            return None
        return binding

    def outbound(self, src: Endpoint, dst: Endpoint, now: float) -> Endpoint:
        key = self._key(src, dst)
        binding = self._live(self._by_key.get(key), now)
        if binding is None:
            port = self._rng.randrange(20000, 60000)
            while port in self._by_port:
                port = self._rng.randrange(20000, 60000)
            binding = _Binding(src, port, now)
            self._by_key[key] = binding
            self._by_port[port] = binding
        binding.last = now
        binding.addresses.add(dst.address)
        binding.endpoints.add(dst)
        return Endpoint(self.public, binding.port)

    def inbound(self, port: int, src: Endpoint, now: float) -> Endpoint | None:
        binding = self._live(self._by_port.get(port), now)
        if binding is None:
            self.dropped_unmapped += 1
            return None
        if self.filtering is Filtering.ADDRESS and src.address not in binding.addresses:
            self.dropped_filtered += 1
            return None
        if self.filtering is Filtering.ADDRESS_PORT and src not in binding.endpoints:
            self.dropped_filtered += 1
            return None
        return binding.private

    @property
    def mappings(self) -> int:
        return len(self._by_port)


class Net:
    """The datagrams in flight, between private and public endpoints."""

    def __init__(
        self,
        nats: list[Nat],
        delay: float = 0.005,
        lan_delay: float = 0.0005,
        delays: dict[frozenset, float] | None = None,
    ) -> None:
        self.nats = nats
        self.delay = delay
        self.lan_delay = lan_delay
        # one-way delay per pair of public addresses (strings), both directions
        self.delays = {
            frozenset(ipaddress.ip_address(a) for a in k): v for k, v in (delays or {}).items()
        }
        self.cut: Callable[[Endpoint, Endpoint], bool] | None = None
        self._queue: list[tuple[float, int, Endpoint, Endpoint, bytes, bool]] = []
        self._seq = 0
        self.sent = 0
        self.delivered = 0
        self.dropped_unroutable = 0
        self.dropped_cut = 0
        self.dropped_nat = 0
        # every datagram put on the public segment: (time, public source, destination)
        self.log: list[tuple[float, Endpoint, Endpoint]] = []

    def _nat_of(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Nat | None:
        for nat in self.nats:
            if addr.version == nat.lan.version and addr in nat.lan:
                return nat
        return None

    def _nat_at(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Nat | None:
        for nat in self.nats:
            if nat.public == addr:
                return nat
        return None

    def send(self, src: Endpoint, dst: Endpoint, data: bytes, now: float) -> None:
        self.sent += 1
        home = self._nat_of(src.address)
        there = self._nat_of(dst.address)
        if there is not None:
            if there is home:
                self._push(now + self.lan_delay, src, dst, data, local=True)
            else:
                # a private address of another site: no route on the public segment
                self.dropped_unroutable += 1
            return
        wire_src = home.outbound(src, dst, now) if home is not None else src
        self.log.append((now, wire_src, dst))
        pair = frozenset((wire_src.address, dst.address))
        self._push(now + self.delays.get(pair, self.delay), wire_src, dst, data, local=False)

    def _push(self, at: float, src: Endpoint, dst: Endpoint, data: bytes, local: bool) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, src, dst, data, local))

    def next_time(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def deliver_due(self, now: float) -> list[tuple[Endpoint, Endpoint, bytes]]:
        """(destination host endpoint, source as the host sees it, data) of what arrived."""
        out = []
        while self._queue and self._queue[0][0] <= now:
            at, _, src, dst, data, local = heapq.heappop(self._queue)
            if local:
                out.append((dst, src, data))
                continue
            if self.cut is not None and self.cut(src, dst):
                self.dropped_cut += 1
                continue
            nat = self._nat_at(dst.address)
            if nat is not None:
                private = nat.inbound(dst.port, src, at)
                if private is None:
                    self.dropped_nat += 1
                    continue
                dst = private
            out.append((dst, src, data))
        self.delivered += len(out)
        return out


class Actor(Protocol):
    """A host of a simulation: one UDP socket (``endpoint``)."""

    endpoint: Endpoint

    def timer(self) -> float | None: ...

    def fire(self, now: float) -> Datagrams: ...

    def datagram(self, data: bytes, src: Endpoint, now: float) -> Datagrams: ...


def run(
    net: Net,
    actors: list,
    start: float,
    until: float,
    stop: Callable[[float], bool] | None = None,
    max_steps: int = 200_000,
) -> float:
    """Advance the clock from ``start`` event by event until ``until`` (or ``stop`` says
    so after a step); returns the time reached. Bounded in steps, so a bug cannot hang."""
    by_endpoint = {a.endpoint: a for a in actors}
    now = start
    for _ in range(max_steps):
        times = [t for t in (a.timer() for a in actors) if t is not None]
        t_net = net.next_time()
        if t_net is not None:
            times.append(t_net)
        if not times:
            return until
        now = max(now, min(times))
        if now > until:
            return until
        for dst, src, data in net.deliver_due(now):
            actor = by_endpoint.get(dst)
            if actor is not None:
                for out, to in actor.datagram(data, src, now):
                    net.send(actor.endpoint, to, out, now)
        for actor in actors:
            t = actor.timer()
            if t is not None and t <= now:
                for out, to in actor.fire(now):
                    net.send(actor.endpoint, to, out, now)
        if stop is not None and stop(now):
            return now
    raise AssertionError(f"simulation did not settle in {max_steps} steps")

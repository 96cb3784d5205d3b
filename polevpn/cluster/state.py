"""What this router knows of its cluster, and what it must write to the store. No I/O.

``ClusterState`` takes the store's events in (a snapshot at a revision, a put, a delete, a
compacted watch, the store lost and back, a new lease) and keeps:

* the other routers and their routes, applied to a ``RouteSink`` (the remote route table,
  polevpn.cluster.routes.RemoteRoutes) as they change: never this router's own keys;
* this router's own registrations (``set_gateway`` / ``drop_gateway``), and from them the
  keys it must hold: ``pending()`` is the difference from what the store has confirmed
  under the current lease, for the store adapter to write;
* the answer to "may this gateway announce these networks" as far as the store knows:
  ``conflict()`` refuses a network another router holds for a different gateway.

When the store is lost, everything known is kept (forwarding goes on with it, nothing
flaps) and marked stale; the snapshot taken when it is back replaces it whole. Whatever in
the store does not parse is ignored and counted, never raised.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from polevpn.cluster.keys import (
    Layout,
    Malformed,
    RouteInfo,
    RouteKey,
    RouterInfo,
    RouterKey,
    decode_route,
    decode_router,
    encode_route,
    encode_router,
)
from polevpn.common.counters import Counters
from polevpn.packet.routing import IPNetwork


class RouteSink(Protocol):
    """The remote route table (polevpn.cluster.routes.RemoteRoutes), as the state uses it."""

    def replace_router(self, router_id: str, routes: Iterable[Any]) -> None: ...

    def add(self, route: Any) -> None: ...

    def remove(self, router_id: str, network: IPNetwork) -> Any: ...

    def drop_router(self, router_id: str) -> None: ...


# RemoteRoute(router_id, network, gateway, site)
RouteFactory = Callable[[str, IPNetwork, str, str], Any]

CONNECTING = "connecting"
CONNECTED = "connected"
LOST = "lost"


@dataclass(slots=True)
class StateStats(Counters):
    # keys under the cluster's prefix that are no router's, and values that do not parse
    bad_keys: int = 0
    bad_values: int = 0
    # full snapshots applied (the first, and each resync after a reconnect or compaction)
    resyncs: int = 0
    # watch events applied
    events: int = 0
    # REGISTERs refused for a network another router holds for another gateway
    conflicts: int = 0
    # this router's own keys written by someone else (another router with the same id?)
    foreign_writes: int = 0


@dataclass
class RemoteRouter:
    """Another router of the cluster, as the store shows it."""

    router_id: str
    # None while its router key is missing (its routes arrived first, or it was deleted)
    info: RouterInfo | None = None
    routes: dict[IPNetwork, RouteInfo] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Claim:
    gateway: str
    site: str
    value: bytes


class ClusterState:
    def __init__(
        self,
        layout: Layout,
        router_id: str,
        me: RouterInfo,
        sink: RouteSink,
        make_route: RouteFactory,
    ) -> None:
        self.layout = layout
        self.router_id = router_id
        self.sink = sink
        self.make_route = make_route
        self.stats = StateStats()
        # the other routers, by id
        self.routers: dict[str, RemoteRouter] = {}
        # the store's revision that what is known reflects, and that of the last snapshot
        # (events at or before it are in it; the events of one transaction share a revision)
        self.revision = 0
        self._floor = 0
        self.store = CONNECTING
        # monotonic time of the last change of ``store``; None before the first
        self.since: float | None = None
        # known, but the store has been unreachable since: it may have changed
        self.stale = False
        # the watch lost its place (compaction): read a new snapshot
        self.needs_resync = False
        # called when the other routers (or what they say of themselves) change
        self.on_routers: Callable[[], None] | None = None
        # network -> holders (router id -> route), and per family the sorted (address,
        # length) of every remote network and the count of each length: conflict() looks
        # up a network's supernets and subnets without a scan
        self._holders: dict[IPNetwork, dict[str, RouteInfo]] = {}
        self._sorted: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        self._lens: dict[int, Counter[int]] = {4: Counter(), 6: Counter()}
        # this router: its own keys' values; the claims on each network in registration
        # order (the last is the one in force, as in the router's table); the keys the
        # store has confirmed under ``lease``
        self._me = me
        self._me_value = encode_router(me)
        self._claims: dict[IPNetwork, list[_Claim]] = {}
        self._by_gateway: dict[str, tuple[str, list[IPNetwork]]] = {}
        self._held: dict[bytes, bytes] = {}
        self.lease = 0
        # a key of ours left the store (or was overwritten) since pending() last ran
        self.dirty = False

    # ------------------------------------------------------------------ the store
    def snapshot(self, revision: int, kvs: Iterable[tuple[bytes, bytes, int]]) -> None:
        """Every key of the cluster at ``revision`` (key, value, lease): replaces all that
        was known (the first read, and each resync)."""
        routers: dict[str, RemoteRouter] = {}
        held: dict[bytes, bytes] = {}
        for key, value, lease in kvs:
            parsed = self._parse(key)
            if parsed is None:
                continue
            if parsed.router_id == self.router_id:
                if lease == self.lease and lease:
                    held[key] = value
                continue
            r = routers.get(parsed.router_id)
            if r is None:
                r = routers[parsed.router_id] = RemoteRouter(parsed.router_id)
            if isinstance(parsed, RouterKey):
                r.info = self._router_info(value)
            else:
                info = self._route_info(value)
                if info is not None:
                    r.routes[parsed.network] = info
        old = self.routers
        self.routers = {rid: r for rid, r in routers.items() if r.info or r.routes}
        self._held = held
        for rid in old:
            if rid not in self.routers:
                self.sink.drop_router(rid)
        for rid, r in self.routers.items():
            self.sink.replace_router(
                rid, [self.make_route(rid, n, i.gateway, i.site) for n, i in r.routes.items()]
            )
        self._reindex()
        self.revision = self._floor = revision
        self.stale = False
        self.needs_resync = False
        self.stats.resyncs += 1
        self._routers_changed()

    def put(self, key: bytes, value: bytes, revision: int, lease: int = 0) -> None:
        """A key written at ``revision`` (the watch)."""
        if revision and revision <= self._floor:
            return  # in the snapshot already
        self.revision = max(self.revision, revision)
        self.stats.events += 1
        parsed = self._parse(key)
        if parsed is None:
            return
        rid = parsed.router_id
        if rid == self.router_id:
            if lease == self.lease and lease:
                self._held[key] = value
            elif self._held.pop(key, None) is not None or key in self.desired():
                # not under our lease: someone else wrote it; ours is due again
                self.stats.foreign_writes += 1
                self.dirty = True
            return
        r = self.routers.get(rid)
        if r is None:
            r = self.routers[rid] = RemoteRouter(rid)
        if isinstance(parsed, RouterKey):
            info = self._router_info(value)
            if info != r.info:
                r.info = info
                self._forget_if_empty(r)
                self._routers_changed()
            return
        route = self._route_info(value)
        if route is None:  # what it said before no longer stands
            self._remove_route(r, parsed.network)
        elif r.routes.get(parsed.network) != route:
            self._add_route(r, parsed.network, route)
        self._forget_if_empty(r)

    def delete(self, key: bytes, revision: int) -> None:
        """A key deleted (or expired with its lease) at ``revision``."""
        if revision and revision <= self._floor:
            return  # in the snapshot already
        self.revision = max(self.revision, revision)
        self.stats.events += 1
        parsed = self._parse(key)
        if parsed is None:
            return
        if parsed.router_id == self.router_id:
            # gone from the store (our lease expired, or someone deleted it): due again
            if self._held.pop(key, None) is not None:
                self.dirty = True
            return
        r = self.routers.get(parsed.router_id)
        if r is None:
            return
        if isinstance(parsed, RouterKey):
            if r.info is not None:
                r.info = None
                self._forget_if_empty(r)
                self._routers_changed()
            return
        self._remove_route(r, parsed.network)
        self._forget_if_empty(r)

    def compacted(self) -> None:
        """The watch cannot resume where it was: a new snapshot is due. What is known stays
        until then."""
        self.needs_resync = True

    def store_lost(self, now: float) -> None:
        """The store is unreachable: keep every route (forwarding goes on), mark stale."""
        if self.store != LOST:
            self.store = LOST
            self.since = now
            self.stale = True
            self._routers_changed()

    def store_up(self, now: float) -> None:
        """Connected (again): a snapshot follows, which clears the stale mark."""
        if self.store != CONNECTED:
            self.store = CONNECTED
            self.since = now
            self._routers_changed()

    def lease_granted(self, lease: int) -> None:
        """A new lease: nothing of this router's is in the store under it yet."""
        self.lease = lease
        self._held.clear()

    # ------------------------------------------------------------------ this router
    def set_me(self, me: RouterInfo) -> None:
        self._me = me
        self._me_value = encode_router(me)

    @property
    def me(self) -> RouterInfo:
        return self._me

    def set_gateway(self, gateway: str, site: str, networks: Iterable[IPNetwork]) -> None:
        """``gateway`` holds ``networks`` at this router now (its address among them)."""
        self.drop_gateway(gateway)
        nets = list(dict.fromkeys(networks))
        value = b""
        for net in nets:
            claim = _Claim(gateway, site, value or encode_route(RouteInfo(gateway, site)))
            value = claim.value
            self._claims.setdefault(net, []).append(claim)
        self._by_gateway[gateway] = (site, nets)

    def drop_gateway(self, gateway: str) -> None:
        """``gateway``'s last link is gone: its networks are no longer held here."""
        _, nets = self._by_gateway.pop(gateway, ("", []))
        for net in nets:
            claims = self._claims.get(net, [])
            claims[:] = [c for c in claims if c.gateway != gateway]
            if not claims:
                self._claims.pop(net, None)

    def gateways(self) -> dict[str, tuple[str, list[IPNetwork]]]:
        """The gateways registered here: their site and networks."""
        return dict(self._by_gateway)

    def local_routes(self) -> dict[IPNetwork, RouteInfo]:
        """What this router holds: network -> the gateway in force for it."""
        return {net: RouteInfo(c[-1].gateway, c[-1].site) for net, c in self._claims.items()}

    def desired(self) -> dict[bytes, bytes]:
        """Every key this router must hold in the store, with its value."""
        out = {self.layout.router_key(self.router_id): self._me_value}
        for net, claims in self._claims.items():
            out[self.layout.route_key(self.router_id, net)] = claims[-1].value
        return out

    def pending(self) -> tuple[dict[bytes, bytes], list[bytes]]:
        """What to write: the puts and the deletes that make the store hold ``desired()``
        under the current lease."""
        self.dirty = False
        want = self.desired()
        puts = {k: v for k, v in want.items() if self._held.get(k) != v}
        deletes = [k for k in self._held if k not in want]
        return puts, deletes

    def confirm(self, puts: dict[bytes, bytes], deletes: Iterable[bytes]) -> None:
        """The store took ``puts`` (under the current lease) and ``deletes``."""
        self._held.update(puts)
        for k in deletes:
            self._held.pop(k, None)

    @property
    def held(self) -> int:
        return len(self._held)

    # ------------------------------------------------------------------ questions
    def conflict(self, gateway: str, networks: Iterable[IPNetwork]) -> str | None:
        """Why ``gateway`` may not announce ``networks`` here, as far as the store says: one
        of them overlaps a network another router holds for a different gateway. None when
        nothing does (the same gateway at two routers is one office with two links)."""
        for net in networks:
            for other in self._overlapping(net):
                for rid, info in sorted(self._holders.get(other, {}).items()):
                    if info.gateway != gateway:
                        self.stats.conflicts += 1
                        return (
                            f"{net} overlaps {other}, held by router {rid} for gateway "
                            f"{info.gateway}"
                        )
        return None

    def routes_count(self) -> int:
        return sum(len(r.routes) for r in self.routers.values())

    def router_state(self, r: RemoteRouter) -> str:
        """``up``: its key is in the store; ``stale``: the store is lost, so not known now;
        ``incomplete``: routes without its router key."""
        if self.stale:
            return "stale"
        return "up" if r.info is not None else "incomplete"

    # ------------------------------------------------------------------ inside
    def _parse(self, key: bytes) -> RouterKey | RouteKey | None:
        try:
            return self.layout.parse(key)
        except Malformed:
            self.stats.bad_keys += 1
            return None

    def _router_info(self, value: bytes) -> RouterInfo | None:
        try:
            return decode_router(value)
        except Malformed:
            self.stats.bad_values += 1
            return None

    def _route_info(self, value: bytes) -> RouteInfo | None:
        try:
            return decode_route(value)
        except Malformed:
            self.stats.bad_values += 1
            return None

    def _add_route(self, r: RemoteRouter, net: IPNetwork, info: RouteInfo) -> None:
        if net not in r.routes:
            self._index_add(net)
        r.routes[net] = info
        self._holders.setdefault(net, {})[r.router_id] = info
        self.sink.add(self.make_route(r.router_id, net, info.gateway, info.site))

    def _remove_route(self, r: RemoteRouter, net: IPNetwork) -> None:
        if r.routes.pop(net, None) is None:
            return
        holders = self._holders.get(net, {})
        holders.pop(r.router_id, None)
        if not holders:
            self._holders.pop(net, None)
        self._index_remove(net)
        self.sink.remove(r.router_id, net)

    def _forget_if_empty(self, r: RemoteRouter) -> None:
        if r.info is None and not r.routes and self.routers.get(r.router_id) is r:
            del self.routers[r.router_id]
            self.sink.drop_router(r.router_id)
            self._routers_changed()

    def _routers_changed(self) -> None:
        if self.on_routers is not None:
            self.on_routers()

    # the index of remote networks: one entry per (router, network), so that a network two
    # routers hold stays until both have dropped it
    def _reindex(self) -> None:
        self._holders = {}
        self._sorted = {4: [], 6: []}
        self._lens = {4: Counter(), 6: Counter()}
        for rid, r in self.routers.items():
            for net, info in r.routes.items():
                self._holders.setdefault(net, {})[rid] = info
                self._sorted[net.version].append((int(net.network_address), net.prefixlen))
                self._lens[net.version][net.prefixlen] += 1
        for entries in self._sorted.values():
            entries.sort()

    def _index_add(self, net: IPNetwork) -> None:
        bisect.insort(self._sorted[net.version], (int(net.network_address), net.prefixlen))
        self._lens[net.version][net.prefixlen] += 1

    def _index_remove(self, net: IPNetwork) -> None:
        entries = self._sorted[net.version]
        item = (int(net.network_address), net.prefixlen)
        i = bisect.bisect_left(entries, item)
        if i < len(entries) and entries[i] == item:
            del entries[i]
        lens = self._lens[net.version]
        lens[net.prefixlen] -= 1
        if lens[net.prefixlen] <= 0:
            del lens[net.prefixlen]

    def _overlapping(self, net: IPNetwork) -> list[IPNetwork]:
        """Remote networks that contain ``net``, equal it or lie within it."""
        found: list[IPNetwork] = []
        for plen in self._lens[net.version]:
            if plen <= net.prefixlen:
                sup = net.supernet(new_prefix=plen) if plen < net.prefixlen else net
                if sup in self._holders:
                    found.append(sup)
        start = int(net.network_address)
        end = int(net.broadcast_address)
        entries = self._sorted[net.version]
        i = bisect.bisect_left(entries, (start, net.prefixlen + 1))
        while i < len(entries) and entries[i][0] <= end:
            addr, plen = entries[i]
            if plen > net.prefixlen:
                cls = ipaddress.IPv4Network if net.version == 4 else ipaddress.IPv6Network
                found.append(cls((addr, plen)))
            i += 1
        return found

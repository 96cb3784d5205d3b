"""The routes other routers of the cluster hold: which router has which network. No I/O.

The cluster's store (etcd) says which router registered which network for which gateway;
``RemoteRoutes`` keeps that as a table, told of every change by the cluster state. It
answers three questions:

* ``lookup``: which remote route holds an address (longest prefix over remote routes
  only), for the control plane, the API and tests;
* the data path's: each network some reachable router announces is installed in a
  ``RouteTable`` (the router's own, given at construction) as a *fallback* claim whose
  value is the link to that router (``set_hop``). A gateway of this router claiming the
  same prefix outranks it, a longer prefix wins as ever, and forwarding does one lookup
  per packet, as without a cluster;
* ``sources(router_id)``: the networks a router announces, which are the only sources
  packets from its link may carry (anti-spoofing on router-to-router links).

When two routers announce the same network (a gateway with a link to each), both routes
are kept; the data path uses the router with the lowest id (plain string order) among
those whose link is up, so every router of the cluster makes the same choice and the
choice moves only when a link goes up or down.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from polevpn.packet.routing import IPAddress, IPNetwork, RouteTable

H = TypeVar("H")


@dataclass(frozen=True)
class RemoteRoute:
    """One network registered at another router: by which gateway, of which site."""

    router_id: str
    network: IPNetwork
    gateway: str
    site: str


class PeerSources:
    """The networks one router announces: the sources its link may send from.

    The same membership test as ``NetworkSet`` (``contains_v4``/``contains_v6`` on integer
    addresses, what forwarding calls per packet), but kept up to date as routes come and go.
    """

    __slots__ = ("_table", "contains_v4", "contains_v6")

    def __init__(self) -> None:
        self._table: RouteTable[bool] = RouteTable()
        # bound once: forwarding fetches them per call, the table never changes identity
        self.contains_v4 = self._contains_v4
        self.contains_v6 = self._contains_v6

    def _contains_v4(self, addr: int) -> bool:
        return self._table.lookup_v4(addr) is not None

    def _contains_v6(self, addr: int) -> bool:
        return self._table.lookup_v6(addr) is not None

    def __contains__(self, addr: IPAddress) -> bool:
        return self._table.lookup(addr) is not None

    def __len__(self) -> int:
        return len(self._table)

    def _add(self, net: IPNetwork) -> None:
        self._table.add(net, True)

    def _remove(self, net: IPNetwork) -> None:
        self._table.remove(net, True)


class RemoteRoutes(Generic[H]):
    """Routes of the other routers of the cluster, and the links (hops) that reach them.

    ``table``: the router's own RouteTable, which gets the reachable remote routes as
    fallback claims whose value is the hop (None: a table of its own, ``self.table``).
    ``self_id``: this router's id; routes said to be its own are ignored (the store's
    watch reports them too).
    """

    def __init__(self, table: RouteTable[Any] | None = None, self_id: str | None = None) -> None:
        self.table: RouteTable[Any] = table if table is not None else RouteTable()
        self.self_id = self_id
        # router id -> network -> its route; what the store says
        self._by_router: dict[str, dict[IPNetwork, RemoteRoute]] = {}
        # network -> router id -> its route: who announces a network
        self._by_net: dict[IPNetwork, dict[str, RemoteRoute]] = {}
        # LPM over the networks: the route ``lookup`` answers with, and that route by network
        self._records: RouteTable[RemoteRoute] = RouteTable()
        self._record: dict[IPNetwork, RemoteRoute] = {}
        # network -> the route installed in ``table`` and the hop it was installed with
        self._installed: dict[IPNetwork, tuple[RemoteRoute, H]] = {}
        self._hops: dict[str, H] = {}
        self._sources: dict[str, PeerSources] = {}

    # -- what the store says

    def add(self, route: RemoteRoute) -> None:
        """A route registered (or changed) at ``route.router_id``."""
        if route.router_id == self.self_id:
            return
        nets = self._by_router.setdefault(route.router_id, {})
        old = nets.get(route.network)
        if old == route:
            return
        nets[route.network] = route
        self._by_net.setdefault(route.network, {})[route.router_id] = route
        if old is None:
            self.sources(route.router_id)._add(route.network)
        self._choose(route.network)

    def remove(self, router_id: str, network: IPNetwork) -> bool:
        """``router_id`` no longer holds ``network``; False if it did not."""
        nets = self._by_router.get(router_id)
        if nets is None or network not in nets:
            return False
        del nets[network]
        if not nets:
            del self._by_router[router_id]
        holders = self._by_net[network]
        del holders[router_id]
        if not holders:
            del self._by_net[network]
        self._sources[router_id]._remove(network)
        self._choose(network)
        return True

    def replace_router(self, router_id: str, routes: Iterable[RemoteRoute]) -> None:
        """Everything ``router_id`` holds is ``routes`` (a resync after a watch restart or
        a compaction); what is not among them goes."""
        new = {r.network: r for r in routes if r.router_id == router_id}
        if router_id == self.self_id:
            return
        for net in list(self._by_router.get(router_id, {})):
            if net not in new:
                self.remove(router_id, net)
        for route in new.values():
            self.add(route)

    def drop_router(self, router_id: str) -> None:
        """``router_id`` is gone (its lease expired): all its routes go."""
        for net in list(self._by_router.get(router_id, {})):
            self.remove(router_id, net)

    # -- the links to the routers

    def set_hop(self, router_id: str, hop: H | None) -> None:
        """The link that reaches ``router_id`` now, or None while there is none: its routes
        are installed with it, or withdrawn from the data path."""
        if hop is None:
            if self._hops.pop(router_id, None) is None:
                return
        else:
            if self._hops.get(router_id) is hop:
                return
            self._hops[router_id] = hop
        for net in list(self._by_router.get(router_id, {})):
            self._choose(net)

    def hop(self, router_id: str) -> H | None:
        return self._hops.get(router_id)

    def sources(self, router_id: str) -> PeerSources:
        """What ``router_id``'s link may send from: the networks it announces (kept up to
        date; the same object for the router's whole life here)."""
        src = self._sources.get(router_id)
        if src is None:
            src = self._sources[router_id] = PeerSources()
        return src

    # -- questions

    def lookup(self, addr: IPAddress) -> RemoteRoute | None:
        """The remote route for ``addr`` (longest prefix over remote routes alone): the one
        the data path uses, or while no announcer is reachable the lowest router id's."""
        return self._records.lookup(addr)

    def announcers(self, network: IPNetwork) -> list[RemoteRoute]:
        """Every router's route for exactly ``network``, by router id."""
        holders = self._by_net.get(network, {})
        return [holders[rid] for rid in sorted(holders)]

    def routers(self) -> set[str]:
        """Routers that hold at least one route."""
        return set(self._by_router)

    def routes(self) -> list[RemoteRoute]:
        """Every remote route, by router id, then address family, address and length."""
        out = []
        for rid in sorted(self._by_router):
            nets = self._by_router[rid]
            out += [nets[n] for n in sorted(nets, key=_net_order)]
        return out

    def active(self, network: IPNetwork) -> RemoteRoute | None:
        """The route the data path uses for ``network``, or None (no reachable router)."""
        got = self._installed.get(network)
        return got[0] if got is not None else None

    def __len__(self) -> int:
        return sum(len(nets) for nets in self._by_router.values())

    # -- the choice among announcers

    def _choose(self, network: IPNetwork) -> None:
        holders = self._by_net.get(network)
        chosen: RemoteRoute | None = None
        record: RemoteRoute | None = None
        if holders:
            order = sorted(holders)
            record = holders[order[0]]
            for rid in order:
                if rid in self._hops:
                    chosen = record = holders[rid]
                    break
        # the record lookup answers with
        old_record = self._record.get(network)
        if old_record is not record:
            if old_record is not None:
                self._records.remove(network, old_record)
                del self._record[network]
            if record is not None:
                self._records.add(network, record)
                self._record[network] = record
        # the data path
        want = (chosen, self._hops[chosen.router_id]) if chosen is not None else None
        have = self._installed.get(network)
        if have is not None and want is not None and have[1] is want[1]:
            self._installed[network] = want
            return
        if have is not None:
            self.table.remove(network, have[1])
            del self._installed[network]
        if want is not None:
            self.table.add_fallback(network, want[1])
            self._installed[network] = want


def _net_order(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)

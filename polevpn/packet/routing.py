"""Longest-prefix-match table for IPv4 and IPv6, keyed by integer addresses. No I/O.

Lookups walk the distinct prefix lengths present, longest first, with one dict probe each.
Real tables hold a handful of distinct lengths, so this beats a bit-by-bit trie in Python.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Family(Generic[T]):
    __slots__ = ("bits", "levels", "by_len", "owners")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        # (mask, {masked address: value}) for each prefix length present, longest first
        self.levels: list[tuple[int, dict[int, T]]] = []
        self.by_len: dict[int, dict[int, T]] = {}
        # every claimant of a prefix in registration order; the last one is active, and an
        # earlier one takes over again when a later one leaves. A fallback claim goes to the
        # front, so it is active only while no other claim is left
        self.owners: dict[tuple[int, int], list[T]] = {}

    def _rebuild(self) -> None:
        full = (1 << self.bits) - 1
        self.levels = [
            (full ^ ((1 << (self.bits - plen)) - 1), self.by_len[plen])
            for plen in sorted(self.by_len, reverse=True)
        ]

    def add(self, addr: int, plen: int, value: T, fallback: bool = False) -> None:
        key = (addr, plen)
        claim = self.owners.setdefault(key, [])
        if value in claim:
            claim.remove(value)
        if fallback:
            claim.insert(0, value)
        else:
            claim.append(value)
        active = claim[-1]
        level = self.by_len.get(plen)
        if level is None:
            level = self.by_len[plen] = {}
            level[addr] = active
            self._rebuild()
        else:
            level[addr] = active

    def remove(self, addr: int, plen: int, value: T) -> bool:
        key = (addr, plen)
        claim = self.owners.get(key)
        if not claim or value not in claim:
            return False
        claim.remove(value)
        level = self.by_len[plen]
        if claim:
            level[addr] = claim[-1]
            return True
        del self.owners[key]
        del level[addr]
        if not level:
            del self.by_len[plen]
            self._rebuild()
        return True

    def lookup(self, addr: int) -> T | None:
        for mask, level in self.levels:
            value = level.get(addr & mask)
            if value is not None:
                return value
        return None


class RouteTable(Generic[T]):
    """Maps prefixes to values (gateway connections); ``lookup_*`` take integer addresses."""

    __slots__ = ("_v4", "_v6")

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)

    def _family(self, net: IPNetwork) -> _Family[T]:
        return self._v4 if net.version == 4 else self._v6

    def add(self, net: IPNetwork, value: T) -> None:
        self._family(net).add(int(net.network_address), net.prefixlen, value)

    def add_fallback(self, net: IPNetwork, value: T) -> None:
        """Claim ``net`` below every other claim on it: ``value`` is active only while no
        one else claims ``net`` (a route through another router of a cluster, which a
        gateway of this router's own outranks). A longer prefix still wins, as ever."""
        self._family(net).add(int(net.network_address), net.prefixlen, value, fallback=True)

    def remove(self, net: IPNetwork, value: T) -> bool:
        """Withdraw ``value``'s claim on ``net``; an earlier claimant becomes active again."""
        return self._family(net).remove(int(net.network_address), net.prefixlen, value)

    def lookup_v4(self, addr: int) -> T | None:
        return self._v4.lookup(addr)

    def lookup_v6(self, addr: int) -> T | None:
        return self._v6.lookup(addr)

    def lookup(self, addr: IPAddress) -> T | None:
        fam = self._v4 if addr.version == 4 else self._v6
        return fam.lookup(int(addr))

    def routes(self) -> list[tuple[IPNetwork, T]]:
        """Active routes, for status output and tests."""
        out: list[tuple[IPNetwork, T]] = []
        for fam, cls in ((self._v4, ipaddress.IPv4Network), (self._v6, ipaddress.IPv6Network)):
            for (addr, plen), claim in fam.owners.items():
                out.append((cls((addr, plen)), claim[-1]))
        return out

    def __len__(self) -> int:
        return len(self._v4.owners) + len(self._v6.owners)


class NetworkSet:
    """Membership test for a fixed list of networks (ACLs)."""

    __slots__ = ("_table", "networks")

    def __init__(self, networks: list[IPNetwork] | tuple[IPNetwork, ...]) -> None:
        self.networks = tuple(networks)
        self._table: RouteTable[bool] = RouteTable()
        for net in self.networks:
            self._table.add(net, True)

    def contains_v4(self, addr: int) -> bool:
        return self._table.lookup_v4(addr) is not None

    def contains_v6(self, addr: int) -> bool:
        return self._table.lookup_v6(addr) is not None

    def __contains__(self, addr: IPAddress) -> bool:
        return self._table.lookup(addr) is not None


def announcement_error(
    networks: list[IPNetwork] | tuple[IPNetwork, ...], max_networks: int, max_lengths: int
) -> str | None:
    """Why one gateway may not announce ``networks`` (its host prefix included), or None:
    more than ``max_networks`` of them (the host prefix not counted), or more than
    ``max_lengths`` distinct prefix lengths in one address family."""
    if len(networks) - 1 > max_networks:
        return f"{len(networks) - 1} networks (at most {max_networks})"
    for version in (4, 6):
        lengths = {n.prefixlen for n in networks if n.version == version}
        if len(lengths) > max_lengths:
            return f"{len(lengths)} distinct IPv{version} prefix lengths (at most {max_lengths})"
    return None

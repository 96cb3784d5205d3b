"""Spreading flows over several links of one site (sans-IO).

A flow is what must not be reordered: one TCP or UDP conversation (5-tuple), or for other
protocols and for fragments the (source, destination, protocol) triple. Every packet of a
flow hashes to one of ``BUCKETS`` buckets, and each bucket belongs to one link, so a flow
stays on one link while the set of healthy links stays the same.

Buckets are given to links by weighted rendezvous hashing: each bucket goes to the link with
the highest score ``weight / -ln(u)``, ``u`` a fixed pseudo-random number of (bucket, link).
The shares then follow the weights, and when a link goes down only its own buckets move (to
the survivors, in proportion to their weights); when it comes back exactly those return. A
backup link gets buckets only while no primary link is up.

The per-packet cost is one hash of a few header bytes and a list lookup; the table is
rebuilt only when a link changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from zlib import crc32

BUCKETS = 1024
_MASK = BUCKETS - 1

_TCP, _UDP, _SCTP, _UDPLITE = 6, 17, 132, 136
_PORTS = frozenset({_TCP, _UDP, _SCTP, _UDPLITE})


def flow_hash(pkt: bytes | memoryview) -> int:
    """A 32-bit hash of the packet's flow; 0 for what is not an IPv4 or IPv6 header.

    IPv4 fragments (and the first fragment too, so that all pieces stay together) hash by
    addresses and protocol only. IPv6 takes the ports when the first next header carries
    them; with extension headers in between it falls back to addresses and next header.
    """
    n = len(pkt)
    if n < 20:
        return 0
    v = pkt[0] >> 4
    if v == 4:
        proto = pkt[9]
        ihl = (pkt[0] & 0x0F) * 4
        fragmented = (pkt[6] & 0x3F) or pkt[7]  # MF flag or a fragment offset
        if proto in _PORTS and not fragmented and ihl >= 20 and n >= ihl + 4:
            # not bytes 9-20 whole: the header checksum changes with every packet's IP ID
            return crc32(pkt[ihl : ihl + 4], crc32(pkt[12:20], proto))
        return crc32(pkt[12:20], proto)
    if v == 6 and n >= 40:
        nxt = pkt[6]
        if nxt in _PORTS and n >= 44:
            return crc32(pkt[40:44], crc32(pkt[6:7], crc32(pkt[8:40])))
        return crc32(pkt[8:40], nxt)
    return 0


@dataclass(frozen=True)
class Path:
    """One link of a site as the flow table sees it."""

    id: int
    weight: float = 1.0
    backup: bool = False

    def __post_init__(self) -> None:
        if not self.weight > 0 or math.isinf(self.weight):
            raise ValueError(f"path {self.id}: weight must be a positive number")


_M64 = (1 << 64) - 1


def _unit(bucket: int, path_id: int) -> float:
    """A fixed number in (0, 1) for the pair; the same in every process and run.

    splitmix64's finaliser: a CRC would be linear, and scores of different paths would then
    rise and fall together across buckets, which skews the shares.
    """
    x = (bucket * 0x9E3779B97F4A7C15 + (path_id & _M64) * 0xD1B54A32D192ED03) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    x ^= x >> 31
    return ((x >> 11) + 0.5) / 9007199254740992.0  # 53 bits, never 0 or 1


class FlowTable:
    """Which link each flow takes, for one site; links come and go as they fail and return."""

    __slots__ = ("paths", "up", "table", "_scores")

    def __init__(self, paths: Iterable[Path] = ()) -> None:
        self.paths: dict[int, Path] = {}
        self.up: set[int] = set()
        self.table: list[int | None] = [None] * BUCKETS
        # per path, its score in every bucket: computed once per path, not per rebuild
        self._scores: dict[int, list[float]] = {}
        for p in paths:
            self.add(p, up=False)

    def add(self, path: Path, up: bool = True) -> None:
        """Add or replace a path (its weight or role may have changed)."""
        self.paths[path.id] = path
        w = path.weight
        self._scores[path.id] = [w / -math.log(_unit(b, path.id)) for b in range(BUCKETS)]
        if up:
            self.up.add(path.id)
        else:
            self.up.discard(path.id)
        self._rebuild()

    def remove(self, path_id: int) -> None:
        self.paths.pop(path_id, None)
        self._scores.pop(path_id, None)
        self.up.discard(path_id)
        self._rebuild()

    def set_up(self, path_id: int, up: bool) -> bool:
        """Mark a known path up or down; True when that changed anything."""
        if path_id not in self.paths or (path_id in self.up) == up:
            return False
        if up:
            self.up.add(path_id)
        else:
            self.up.discard(path_id)
        self._rebuild()
        return True

    def active(self) -> list[int]:
        """The paths that carry traffic now: the primaries that are up, or else the backups."""
        primaries = [i for i in self.up if not self.paths[i].backup]
        return sorted(primaries or self.up)

    def _rebuild(self) -> None:
        active = self.active()
        if not active:
            self.table = [None] * BUCKETS
            return
        if len(active) == 1:
            self.table = [active[0]] * BUCKETS
            return
        columns = [(i, self._scores[i]) for i in active]
        table: list[int | None] = []
        for b in range(BUCKETS):
            best, best_score = None, -1.0
            for i, scores in columns:
                s = scores[b]
                if s > best_score:
                    best, best_score = i, s
            table.append(best)
        self.table = table

    def pick(self, pkt: bytes | memoryview) -> int | None:
        """The path for this packet, or None when no path is up."""
        return self.table[flow_hash(pkt) & _MASK]

    def shares(self) -> dict[int, float]:
        """Fraction of the buckets each path holds now (for logs, status and tests)."""
        out: dict[int, float] = {}
        for i in self.table:
            if i is not None:
                out[i] = out.get(i, 0.0) + 1.0 / BUCKETS
        return out

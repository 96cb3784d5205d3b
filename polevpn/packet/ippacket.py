"""Reading addresses out of raw IP packets. No I/O.

The data path calls these once per packet, so they slice and convert without building
ipaddress objects; callers get the version and integer addresses.
"""

from __future__ import annotations

_from_bytes = int.from_bytes


def dst_addr(pkt: bytes | memoryview) -> tuple[int, int]:
    """(version, destination as int); version 0 means the packet is not a valid IP header."""
    n = len(pkt)
    if n >= 20:
        v = pkt[0] >> 4
        if v == 4:
            return 4, _from_bytes(pkt[16:20], "big")
        if v == 6 and n >= 40:
            return 6, _from_bytes(pkt[24:40], "big")
    return 0, 0


def src_addr(pkt: bytes | memoryview) -> tuple[int, int]:
    """(version, source as int); version 0 means the packet is not a valid IP header."""
    n = len(pkt)
    if n >= 20:
        v = pkt[0] >> 4
        if v == 4:
            return 4, _from_bytes(pkt[12:16], "big")
        if v == 6 and n >= 40:
            return 6, _from_bytes(pkt[8:24], "big")
    return 0, 0


def addrs(pkt: bytes | memoryview) -> tuple[int, int, int]:
    """(version, source, destination as ints); version 0 means not a valid IP header."""
    n = len(pkt)
    if n >= 20:
        v = pkt[0] >> 4
        if v == 4:
            return 4, _from_bytes(pkt[12:16], "big"), _from_bytes(pkt[16:20], "big")
        if v == 6 and n >= 40:
            return 6, _from_bytes(pkt[8:24], "big"), _from_bytes(pkt[24:40], "big")
    return 0, 0, 0

"""Flows over several links of a site: stable per flow, shares by weight, minimal moves."""

from __future__ import annotations

import ipaddress
import os
import struct
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polevpn.packet.multipath import BUCKETS, FlowTable, Path, flow_hash


def v4(
    src: str,
    dst: str,
    proto: int = 6,
    sport: int = 1000,
    dport: int = 80,
    ident: int = 0,
    frag: int = 0,
    payload: bytes = b"",
) -> bytes:
    body = struct.pack(">HH", sport, dport) + b"\0" * 16 + payload
    hdr = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(body),
        ident,
        frag,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    # a real checksum, so that packets of one flow differ in it as they do on the wire
    s = sum(struct.unpack(">10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return hdr[:10] + struct.pack(">H", ~s & 0xFFFF) + hdr[12:] + body


def v6(
    src: str,
    dst: str,
    nxt: int = 6,
    sport: int = 1000,
    dport: int = 80,
    flow: int = 0,
    payload: bytes = b"",
) -> bytes:
    body = struct.pack(">HH", sport, dport) + b"\0" * 16 + payload
    return (
        struct.pack(">IHBB", (6 << 28) | flow, len(body), nxt, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + body
    )


A, B = "198.18.10.2", "198.18.20.2"


def test_one_flow_one_hash_whatever_changes_per_packet() -> None:
    first = flow_hash(v4(A, B, ident=1, payload=b"x"))
    assert first == flow_hash(v4(A, B, ident=2, payload=b"yyyy" * 100))
    assert first != flow_hash(v4(A, B, sport=1001))
    assert first != flow_hash(v4(A, B, proto=17))
    a6 = flow_hash(v6("2001:db8:10::2", "2001:db8:20::2", flow=1, payload=b"a"))
    assert a6 == flow_hash(v6("2001:db8:10::2", "2001:db8:20::2", flow=1, payload=b"bbb"))
    assert a6 != flow_hash(v6("2001:db8:10::2", "2001:db8:20::2", dport=443))


def test_fragments_stay_with_each_other() -> None:
    # the first fragment (MF, offset 0) and a later one (offset 185 * 8) carry one datagram
    first = v4(A, B, proto=17, sport=5000, frag=0x2000)
    later = v4(A, B, proto=17, sport=0, dport=0, frag=185)
    assert flow_hash(first) == flow_hash(later)


def test_protocols_without_ports_hash_by_addresses() -> None:
    icmp = flow_hash(v4(A, B, proto=1, sport=8, dport=1))
    assert icmp == flow_hash(v4(A, B, proto=1, sport=0, dport=7))
    esp6 = flow_hash(v6("2001:db8:10::2", "2001:db8:20::2", nxt=50, sport=1))
    assert esp6 == flow_hash(v6("2001:db8:10::2", "2001:db8:20::2", nxt=50, sport=2))


@given(st.binary(max_size=80))
def test_any_bytes_hash_without_error(data: bytes) -> None:
    h = flow_hash(data)
    assert 0 <= h < 2**32
    assert flow_hash(memoryview(data)) == h


def _spread(table: FlowTable, n: int = 4000) -> dict[int | None, int]:
    got: dict[int | None, int] = {}
    for i in range(n):
        p = table.pick(v4(f"198.18.{10 + i % 7}.{i % 250 + 1}", B, sport=1024 + i))
        got[p] = got.get(p, 0) + 1
    return got


def test_shares_follow_the_weights() -> None:
    table = FlowTable([Path(1, 1.0), Path(2, 3.0)])
    assert table.pick(v4(A, B)) is None  # nothing is up yet
    table.set_up(1, True)
    table.set_up(2, True)
    shares = table.shares()
    assert shares[2] == pytest.approx(0.75, abs=0.05) and sum(shares.values()) == pytest.approx(1)
    spread = _spread(table)
    assert spread[2] / sum(spread.values()) == pytest.approx(0.75, abs=0.05)


def test_a_failed_link_moves_only_its_own_flows_and_they_come_back() -> None:
    table = FlowTable([Path(1), Path(2), Path(3, 2.0)])
    for i in (1, 2, 3):
        table.set_up(i, True)
    before = list(table.table)
    assert table.set_up(2, False) and not table.set_up(2, False)
    during = table.table
    for b in range(BUCKETS):
        if before[b] != 2:
            assert during[b] == before[b]  # nobody else's flows moved
        else:
            assert during[b] in (1, 3)
    # the orphaned buckets go to the survivors by weight (3 has twice 1's weight)
    moved = [during[b] for b in range(BUCKETS) if before[b] == 2]
    assert moved.count(3) / len(moved) == pytest.approx(2 / 3, abs=0.1)
    table.set_up(2, True)
    assert table.table == before


def test_backup_only_while_no_primary_is_up() -> None:
    table = FlowTable([Path(1), Path(2), Path(9, backup=True)])
    for i in (1, 2, 9):
        table.set_up(i, True)
    assert set(table.table) == {1, 2}
    table.set_up(1, False)
    assert set(table.table) == {2}
    table.set_up(2, False)
    assert set(table.table) == {9} and table.active() == [9]
    table.set_up(1, True)
    assert set(table.table) == {1}
    table.set_up(1, False)
    table.set_up(9, False)
    assert set(table.table) == {None} and table.pick(v4(A, B)) is None


def test_replacing_and_removing_paths() -> None:
    table = FlowTable()
    table.add(Path(1))
    table.add(Path(2))
    assert table.shares()[1] == pytest.approx(0.5, abs=0.06)
    table.add(Path(2, weight=9.0))  # a new weight for a known path
    assert table.shares()[2] == pytest.approx(0.9, abs=0.04)
    table.remove(2)
    assert table.shares() == {1: pytest.approx(1.0)}
    with pytest.raises(ValueError):
        Path(3, weight=0)
    with pytest.raises(ValueError):
        Path(3, weight=float("nan"))


def test_the_mapping_is_the_same_in_every_process() -> None:
    """No per-process hash seed goes into it: runs and logs stay comparable."""
    code = (
        "from polevpn.packet.multipath import FlowTable, Path\n"
        "t = FlowTable([Path(1), Path(2), Path(3, 2.5)])\n"
        "[t.set_up(i, True) for i in (1, 2, 3)]\n"
        "print(t.table)\n"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(runs) == 1

"""Address extraction from raw IP packets: v4, v6, and anything else a TUN might hand over."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polevpn.packet.ippacket import addrs, dst_addr, src_addr


def ipv4_packet(src: str, dst: str, payload: bytes = b"", proto: int = 17) -> bytes:
    total = 20 + len(payload)
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0x1234,
        0,
        64,
        proto,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes = b"", next_header: int = 58) -> bytes:
    header = struct.pack(
        ">IHBB16s16s",
        6 << 28,
        len(payload),
        next_header,
        64,
        IPv6Address(src).packed,
        IPv6Address(dst).packed,
    )
    return header + payload


def test_ipv4_addresses() -> None:
    pkt = ipv4_packet("198.18.10.5", "198.18.20.7", b"hello")
    assert dst_addr(pkt) == (4, int(IPv4Address("198.18.20.7")))
    assert src_addr(pkt) == (4, int(IPv4Address("198.18.10.5")))


def test_ipv6_addresses() -> None:
    pkt = ipv6_packet("2001:db8:10::5", "2001:db8:20::7", b"\x80\x00ping")
    assert dst_addr(pkt) == (6, int(IPv6Address("2001:db8:20::7")))
    assert src_addr(pkt) == (6, int(IPv6Address("2001:db8:10::5")))


def test_memoryview_input() -> None:
    v4 = ipv4_packet("198.18.0.1", "198.18.0.2")
    v6 = ipv6_packet("::1", "::2")
    buf = memoryview(b"\x00" * 8 + v4 + v6)
    assert dst_addr(buf[8 : 8 + len(v4)]) == (4, 0xC6120002)
    assert src_addr(buf[8 : 8 + len(v4)]) == (4, 0xC6120001)
    assert dst_addr(buf[8 + len(v4) :]) == (6, 2)
    assert src_addr(buf[8 + len(v4) :]) == (6, 1)


def test_minimal_headers_are_enough() -> None:
    v4 = ipv4_packet("1.2.3.4", "5.6.7.8")
    assert len(v4) == 20
    assert dst_addr(v4) == (4, 0x05060708)
    v6 = ipv6_packet("::a", "::b")
    assert len(v6) == 40
    assert src_addr(v6) == (6, 0xA)


@pytest.mark.parametrize("n", [0, 1, 10, 19])
def test_short_ipv4_is_version_0(n: int) -> None:
    pkt = ipv4_packet("198.18.0.1", "198.18.0.2")[:n]
    assert dst_addr(pkt) == (0, 0)
    assert src_addr(pkt) == (0, 0)


@pytest.mark.parametrize("n", [0, 1, 20, 24, 39])
def test_short_ipv6_is_version_0(n: int) -> None:
    pkt = ipv6_packet("2001:db8::1", "2001:db8::2")[:n]
    assert dst_addr(pkt) == (0, 0)
    assert src_addr(pkt) == (0, 0)


@pytest.mark.parametrize("version", [0, 1, 2, 3, 5, 7, 8, 15])
def test_other_versions_are_version_0(version: int) -> None:
    pkt = bytes([version << 4 | 5]) + ipv6_packet("::1", "::2")[1:]
    assert dst_addr(pkt) == (0, 0)
    assert src_addr(pkt) == (0, 0)


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.binary(max_size=64))
def test_any_ipv4(src: IPv4Address, dst: IPv4Address, payload: bytes) -> None:
    pkt = ipv4_packet(str(src), str(dst), payload)
    assert dst_addr(pkt) == (4, int(dst))
    assert src_addr(pkt) == (4, int(src))
    assert addrs(pkt) == (4, int(src), int(dst))


@given(st.ip_addresses(v=6), st.ip_addresses(v=6), st.binary(max_size=64))
def test_any_ipv6(src: IPv6Address, dst: IPv6Address, payload: bytes) -> None:
    pkt = ipv6_packet(str(src), str(dst), payload)
    assert dst_addr(pkt) == (6, int(dst))
    assert src_addr(pkt) == (6, int(src))
    assert addrs(pkt) == (6, int(src), int(dst))


def _expected(pkt: bytes, off4: int, off6: int) -> tuple[int, int]:
    if len(pkt) >= 20 and pkt[0] >> 4 == 4:
        return 4, int.from_bytes(pkt[off4 : off4 + 4], "big")
    if len(pkt) >= 40 and pkt[0] >> 4 == 6:
        return 6, int.from_bytes(pkt[off6 : off6 + 16], "big")
    return 0, 0


@given(st.binary(max_size=80))
def test_arbitrary_bytes_never_raise(pkt: bytes) -> None:
    assert dst_addr(pkt) == _expected(pkt, 16, 24)
    assert src_addr(pkt) == _expected(pkt, 12, 8)
    assert dst_addr(memoryview(pkt)) == dst_addr(pkt)
    assert src_addr(memoryview(pkt)) == src_addr(pkt)
    # the router's one-call form agrees with the two single ones
    version, src = src_addr(pkt)
    assert addrs(memoryview(pkt)) == (version, src, dst_addr(pkt)[1])

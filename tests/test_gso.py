"""Software GSO: cutting TUN super-packets into plain packets, checksums completed.

Every output is checked against a deliberately naive reference checksum (a loop over
16-bit words), never against polevpn.packet.gso's own arithmetic.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from polevpn.packet.gso import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    MAX_EXPANSION,
    PLAIN_HDR,
    VNET_HDR,
    VNET_HDR_LEN,
    GsoError,
    check,
    internet_checksum,
    needs_work,
    segment,
    to_plain,
)

TCP, UDP = 6, 17
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
SRC4, DST4 = bytes([198, 18, 10, 2]), bytes([198, 18, 20, 7])
SRC6 = bytes.fromhex("20010db8000000000000000000000001")
DST6 = bytes.fromhex("20010db8000000010000000000000042")

# IPv4 options: router alert, then NOPs and an end-of-list to reach a multiple of 4.
IP_OPTS = b"\x94\x04\x00\x00" + b"\x01\x01\x01\x00"
# TCP options: timestamps, and timestamps plus one SACK block.
TS_OPTS = b"\x01\x01\x08\x0a" + struct.pack("!II", 0x11223344, 0x55667788)
SACK_OPTS = TS_OPTS + b"\x01\x01\x05\x0a" + struct.pack("!II", 1000, 2000)


# -- reference arithmetic, written for obviousness rather than speed


def ref_sum(data: bytes) -> int:
    """One's-complement sum of 16-bit big-endian words, end-around carry, not inverted."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header(v6: bool, src: bytes, dst: bytes, proto: int, l4_len: int) -> bytes:
    if v6:
        return src + dst + struct.pack("!I3xB", l4_len, proto)
    return src + dst + struct.pack("!xBH", proto, l4_len)


# -- packet construction


def ipv4_header(payload_len: int, proto: int, ident: int, options: bytes = b"") -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            (ihl * 4 + payload_len) & 0xFFFF,
            ident,
            0x4000,  # DF
            64,
            proto,
            0,
            SRC4,
            DST4,
        )
        + options
    )
    struct.pack_into("!H", hdr, 10, 0xFFFF - ref_sum(bytes(hdr)))
    return bytes(hdr)


def ipv6_header(payload_len: int, next_header: int) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28 | 0xABCDE, payload_len, next_header, 64, SRC6, DST6)


def v6_ext_chain(kinds: list[int], final: int) -> tuple[int, bytes]:
    """(first next-header value, bytes) for a chain of options headers ending in `final`.

    Each header is padded with a PadN option; the second one is 16 bytes long to make
    sure lengths other than 8 are followed.
    """
    out = b""
    for i in range(len(kinds)):
        nxt = kinds[i + 1] if i + 1 < len(kinds) else final
        units = 1 if i % 2 == 0 else 2
        pad = units * 8 - 4
        out += bytes([nxt, units - 1, 1, pad]) + bytes(pad)
    return (kinds[0] if kinds else final), out


def tcp_header(seq: int, flags: int, options: bytes = b"") -> bytes:
    assert len(options) % 4 == 0
    doff = 5 + len(options) // 4
    return (
        struct.pack("!HHIIBBHHH", 40000, 443, seq, 0xCAFEBABE, doff << 4, flags, 501, 0, 7)
        + options
    )


def udp_header(length: int) -> bytes:
    return struct.pack("!HHHH", 5353, 4500, length & 0xFFFF, 0)


@dataclass
class Super:
    """A super-packet as the kernel would hand it over, plus what the test needs to check."""

    v6: bool
    proto: int
    hdr: bytes
    pkt: bytes
    l4: int  # offset of the TCP/UDP header
    hlen: int  # IP + extension + L4 headers
    payload: bytes
    gso_size: int
    seq: int = 0
    flags: int = 0
    ident: int = 0


def build(
    v6: bool,
    proto: int,
    payload: bytes,
    gso_size: int,
    *,
    ip_opts: bytes = b"",
    ext: tuple[int, ...] = (),
    tcp_opts: bytes = b"",
    flags: int = ACK | PSH,
    seq: int = 0x10000000,
    ident: int = 0x1234,
    ecn: bool = False,
    gso_type: int | None = None,
    vnet_flags: int = F_NEEDS_CSUM,
    hdr_len: int | None = None,
    partial: bool = True,
) -> Super:
    """Build a super-packet with the pseudo-header sum in the checksum field, as Linux does."""
    l4_hdr = tcp_header(seq, flags, tcp_opts) if proto == TCP else udp_header(8 + len(payload))
    l4_len = len(l4_hdr) + len(payload)
    if v6:
        first, ext_bytes = v6_ext_chain(list(ext), proto)
        ip = ipv6_header(len(ext_bytes) + l4_len, first) + ext_bytes
        src, dst = SRC6, DST6
    else:
        ip = ipv4_header(l4_len, proto, ident, ip_opts)
        src, dst = SRC4, DST4
    csum_at = 16 if proto == TCP else 6
    l4 = bytearray(l4_hdr)
    # Not inverted: the partial sum that NEEDS_CSUM asks to be completed.
    partial_sum = ref_sum(pseudo_header(v6, src, dst, proto, l4_len)) if partial else 0xBEEF
    struct.pack_into("!H", l4, csum_at, partial_sum)
    pkt = ip + bytes(l4) + payload
    if gso_type is None:
        gso_type = GSO_UDP_L4 if proto == UDP else GSO_TCPV6 if v6 else GSO_TCPV4
    if ecn:
        gso_type |= GSO_ECN
    hlen = len(ip) + len(l4_hdr)
    hdr = VNET_HDR.pack(
        vnet_flags,
        gso_type,
        hlen if hdr_len is None else hdr_len,
        gso_size,
        len(ip),
        csum_at,
    )
    return Super(v6, proto, hdr, pkt, len(ip), hlen, payload, gso_size, seq, flags, ident)


def rand_bytes(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


# -- checking outputs


def verify_checksums(v6: bool, proto: int, seg: bytes, l4: int) -> None:
    """IP header and L4 checksums verify with the reference sum; lengths match the buffer."""
    if v6:
        assert seg[0] >> 4 == 6
        assert struct.unpack_from("!H", seg, 4)[0] == len(seg) - 40
        src, dst = seg[8:24], seg[24:40]
    else:
        ihl = (seg[0] & 0x0F) * 4
        assert ihl == l4
        assert struct.unpack_from("!H", seg, 2)[0] == len(seg)
        assert ref_sum(seg[:ihl]) == 0xFFFF, "IPv4 header checksum"
        src, dst = seg[12:16], seg[16:20]
    l4_len = len(seg) - l4
    assert ref_sum(pseudo_header(v6, src, dst, proto, l4_len) + seg[l4:]) == 0xFFFF, "L4 checksum"
    if proto == UDP:
        assert struct.unpack_from("!H", seg, l4 + 4)[0] == l4_len
        assert struct.unpack_from("!H", seg, l4 + 6)[0] != 0, "UDP checksum 0 means none"


def masked_headers(sp: Super, seg: bytes) -> bytes:
    """The segment's headers with every field GSO is allowed to change zeroed."""
    h = bytearray(seg[: sp.hlen])
    if sp.v6:
        h[4:6] = bytes(2)
    else:
        h[2:6] = bytes(4)
        h[10:12] = bytes(2)
    if sp.proto == TCP:
        h[sp.l4 + 4 : sp.l4 + 8] = bytes(4)
        h[sp.l4 + 13] = 0
        h[sp.l4 + 16 : sp.l4 + 18] = bytes(2)
    else:
        h[sp.l4 + 4 : sp.l4 + 8] = bytes(4)
    return bytes(h)


def check_segments(sp: Super, out: list) -> list[bytes]:
    segs = [bytes(s) for s in out]
    plen = len(sp.payload)
    expected = max(1, -(-plen // sp.gso_size))
    assert len(segs) == expected
    reference_headers = masked_headers(sp, sp.pkt)
    payload = b""
    for i, seg in enumerate(segs):
        assert len(seg) <= sp.hlen + sp.gso_size
        assert len(seg) <= 65535
        if i < len(segs) - 1:
            assert len(seg) == sp.hlen + sp.gso_size, "only the last segment is short"
        verify_checksums(sp.v6, sp.proto, seg, sp.l4)
        assert masked_headers(sp, seg) == reference_headers, "headers and options copied as is"
        if not sp.v6:
            assert struct.unpack_from("!H", seg, 4)[0] == (sp.ident + i) & 0xFFFF
        if sp.proto == TCP:
            seq = struct.unpack_from("!I", seg, sp.l4 + 4)[0]
            assert seq == (sp.seq + i * sp.gso_size) & 0xFFFFFFFF
            flags = seg[sp.l4 + 13]
            last, first = i == len(segs) - 1, i == 0
            assert flags & (FIN | PSH) == (sp.flags & (FIN | PSH) if last else 0)
            assert flags & CWR == (sp.flags & CWR if first else 0)
            keep = ~(FIN | PSH | CWR) & 0xFF
            assert flags & keep == sp.flags & keep
        payload += seg[sp.hlen :]
    assert payload == sp.payload
    return segs


def run(sp: Super) -> list[bytes]:
    out = to_plain(sp.hdr + sp.pkt)
    segs = check_segments(sp, out)
    assert [bytes(s) for s in segment(sp.hdr, sp.pkt)] == segs
    return segs


# -- internet_checksum


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"\0\0\0", 0),
        (b"\xff\xff", 0xFFFF),
        (b"\xff\xff\xff\xff", 0xFFFF),  # a multiple of 0xFFFF but not zero
        (b"\x00\x01\xff\xfe", 0xFFFF),
        (b"\x12", 0x1200),  # an odd byte is the high half of a padded word
        (b"\x00\x01\xf2\x03\xf4\xf5\xf6\xf7", 0xDDF2),  # RFC 1071's example
    ],
)
def test_internet_checksum_known_values(data: bytes, expected: int) -> None:
    assert internet_checksum(data) == expected == ref_sum(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_internet_checksum_matches_reference(data: bytes, initial: int) -> None:
    assert internet_checksum(data) == ref_sum(data)
    expected = ref_sum(struct.pack("!H", initial) + data)
    assert internet_checksum(data, initial) == expected
    assert internet_checksum(memoryview(data)) == internet_checksum(bytearray(data))


@pytest.mark.parametrize("n", [4095, 4096, 8192, 8193, 8194, 12289, 65535, 65536])
def test_internet_checksum_long_buffers(n: int) -> None:
    data = rand_bytes(n, seed=n)
    assert internet_checksum(data) == ref_sum(data)
    assert internet_checksum(memoryview(data)[1:]) == ref_sum(data[1:])


# -- headers that need nothing, and needs_work


def test_needs_work_looks_at_flags_and_type() -> None:
    assert not needs_work(PLAIN_HDR + b"\x45")
    assert not needs_work(bytes([F_DATA_VALID, GSO_NONE]) + bytes(8))
    assert needs_work(bytes([F_NEEDS_CSUM, GSO_NONE]) + bytes(8))
    assert needs_work(bytes([0, GSO_TCPV4]) + bytes(8))
    assert needs_work(bytes([0, GSO_ECN]) + bytes(8))
    # Too short to judge: say yes, so to_plain gets to reject it.
    assert needs_work(b"") and needs_work(b"\0")


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_plain_packet_is_returned_without_copy(kind: type) -> None:
    sp = build(False, TCP, b"hello", 1400, vnet_flags=0, gso_type=GSO_NONE)
    buf = kind(PLAIN_HDR + sp.pkt)
    (out,) = to_plain(buf)
    assert isinstance(out, memoryview) and out.obj is buf
    assert bytes(out) == sp.pkt
    (out,) = segment(PLAIN_HDR, sp.pkt)
    assert out is sp.pkt


def test_data_valid_alone_is_plain() -> None:
    hdr = VNET_HDR.pack(F_DATA_VALID, GSO_NONE, 0, 0, 0, 0)
    (out,) = to_plain(hdr + b"not even an IP packet")
    assert bytes(out) == b"not even an IP packet"


# -- NEEDS_CSUM without GSO


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
@pytest.mark.parametrize("size", [0, 1, 2, 1000, 1401])
def test_needs_csum_is_completed(v6: bool, proto: int, size: int) -> None:
    sp = build(v6, proto, rand_bytes(size, size), 0, gso_type=GSO_NONE, tcp_opts=TS_OPTS)
    buf = bytearray(sp.hdr + sp.pkt)
    (out,) = to_plain(buf)
    assert buf == sp.hdr + sp.pkt, "the input is not modified"
    out = bytes(out)
    verify_checksums(v6, proto, out, sp.l4)
    # Only the checksum field changes.
    at = sp.l4 + (16 if proto == TCP else 6)
    assert out[:at] == sp.pkt[:at] and out[at + 2 :] == sp.pkt[at + 2 :]


def test_needs_csum_v6_with_extension_headers() -> None:
    sp = build(True, TCP, rand_bytes(777), 0, gso_type=GSO_NONE, ext=(0, 60))
    assert sp.l4 == 40 + 8 + 16
    (out,) = to_plain(sp.hdr + sp.pkt)
    verify_checksums(True, TCP, bytes(out), sp.l4)


def udp_payload_with_zero_checksum(v6: bool, size: int, seed: int) -> bytes:
    """A UDP payload whose datagram checksums to exactly 0 (complement of 0xFFFF).

    The first two payload bytes are chosen so the one's-complement sum of pseudo-header,
    UDP header and payload comes to 0xFFFF.
    """
    assert size >= 2
    payload = bytearray(rand_bytes(size, seed))
    payload[0:2] = b"\0\0"
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    l4_len = 8 + size
    s = ref_sum(pseudo_header(v6, src, dst, UDP, l4_len) + udp_header(l4_len) + payload)
    struct.pack_into("!H", payload, 0, 0xFFFF - s)
    full = pseudo_header(v6, src, dst, UDP, l4_len) + udp_header(l4_len) + payload
    assert ref_sum(bytes(full)) == 0xFFFF
    return bytes(payload)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_needs_csum_udp_zero_is_sent_as_ffff(v6: bool) -> None:
    payload = udp_payload_with_zero_checksum(v6, 301, seed=3)
    sp = build(v6, UDP, payload, 0, gso_type=GSO_NONE)
    (out,) = to_plain(sp.hdr + sp.pkt)
    out = bytes(out)
    assert struct.unpack_from("!H", out, sp.l4 + 6)[0] == 0xFFFF
    verify_checksums(v6, UDP, out, sp.l4)


def test_needs_csum_rejects_inconsistent_packets() -> None:
    sp = build(False, UDP, b"abcdef", 0, gso_type=GSO_NONE)
    hdr = VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6)
    assert to_plain(hdr + sp.pkt)
    with pytest.raises(GsoError):
        to_plain(hdr + sp.pkt + b"x")  # total length disagrees
    with pytest.raises(GsoError):
        to_plain(VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 13) + sp.pkt)  # field past end
    with pytest.raises(GsoError):
        to_plain(VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 0xFFFF, 6) + sp.pkt)
    with pytest.raises(GsoError):
        to_plain(VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 10, 6) + sp.pkt)  # inside IP hdr
    with pytest.raises(GsoError):
        to_plain(hdr + b"\x55" + sp.pkt[1:])  # IP version 5


# -- TCP segmentation


TCP_LAYOUTS = {
    "v4": dict(v6=False),
    "v4-ipopts": dict(v6=False, ip_opts=IP_OPTS),
    "v4-ts": dict(v6=False, tcp_opts=TS_OPTS),
    "v4-ipopts-sack": dict(v6=False, ip_opts=IP_OPTS, tcp_opts=SACK_OPTS),
    "v6": dict(v6=True),
    "v6-ts": dict(v6=True, tcp_opts=TS_OPTS),
    "v6-hbh": dict(v6=True, ext=(0,), tcp_opts=TS_OPTS),
    "v6-hbh-dstopts": dict(v6=True, ext=(0, 60)),
    "v6-dstopts": dict(v6=True, ext=(60,), tcp_opts=SACK_OPTS),
}
SIZES = {
    "uneven": (10_000, 1448),
    "multiple": (1448 * 7, 1448),
    "smaller": (500, 1448),
    "equal": (1448, 1448),
    "empty": (0, 1448),
    "odd-mss": (9999, 1001),
    "full-64k": (65535 - 80 - 40, 1360),
}


@pytest.mark.parametrize("layout", TCP_LAYOUTS)
@pytest.mark.parametrize("size", SIZES)
def test_tcp_segmentation(layout: str, size: str) -> None:
    plen, mss = SIZES[size]
    sp = build(proto=TCP, payload=rand_bytes(plen, plen), gso_size=mss, **TCP_LAYOUTS[layout])
    segs = run(sp)
    if plen <= mss:
        assert len(segs) == 1


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_tcp_flags_fin_psh_last_cwr_first(v6: bool) -> None:
    flags = FIN | PSH | ACK | CWR | ECE | URG
    sp = build(v6, TCP, rand_bytes(5000), 1000, flags=flags, ecn=True)
    segs = run(sp)
    got = [s[sp.l4 + 13] for s in segs]
    assert got == [ACK | CWR | ECE | URG] + [ACK | ECE | URG] * 3 + [ACK | ECE | URG | FIN | PSH]


def test_tcp_single_segment_keeps_all_flags() -> None:
    sp = build(False, TCP, b"tail", 1000, flags=FIN | PSH | ACK | CWR)
    (seg,) = run(sp)
    assert seg[sp.l4 + 13] == FIN | PSH | ACK | CWR


def test_tcp_sequence_wraps() -> None:
    sp = build(False, TCP, rand_bytes(4000), 1000, seq=0xFFFFFC00)
    segs = run(sp)
    assert [struct.unpack_from("!I", s, 24)[0] for s in segs] == [
        0xFFFFFC00,
        (0xFFFFFC00 + 1000) & 0xFFFFFFFF,
        (0xFFFFFC00 + 2000) & 0xFFFFFFFF,
        (0xFFFFFC00 + 3000) & 0xFFFFFFFF,
    ]


def test_ipv4_id_wraps() -> None:
    sp = build(False, TCP, rand_bytes(5000), 1000, ident=0xFFFE)
    segs = run(sp)
    assert [struct.unpack_from("!H", s, 4)[0] for s in segs] == [0xFFFE, 0xFFFF, 0, 1, 2]


def test_tcp_checksum_zero_is_kept_as_zero() -> None:
    """A TCP segment whose checksum computes to 0 carries 0, as the kernel's GSO sends it."""
    payload = bytearray(rand_bytes(1000, 9))
    payload[0:2] = b"\0\0"
    sp = build(False, TCP, bytes(payload), 1000)
    seg = bytearray(sp.pkt)
    seg[sp.l4 + 16 : sp.l4 + 18] = b"\0\0"
    l4_len = len(seg) - sp.l4
    s = ref_sum(pseudo_header(False, SRC4, DST4, TCP, l4_len) + bytes(seg[sp.l4 :]))
    struct.pack_into("!H", payload, 0, 0xFFFF - s)
    sp = build(False, TCP, bytes(payload), 1000)
    (seg,) = run(sp)
    assert struct.unpack_from("!H", seg, sp.l4 + 16)[0] == 0


def test_gso_without_needs_csum_or_partial_sum_is_still_correct() -> None:
    # The checksum field holds garbage and the flag is off: segments are summed from scratch.
    sp = build(False, TCP, rand_bytes(3000), 1000, vnet_flags=0, partial=False)
    run(sp)
    sp = build(True, UDP, rand_bytes(3000), 1000, vnet_flags=F_DATA_VALID, partial=False)
    run(sp)


@pytest.mark.parametrize("hdr_len", [0, 1, 54, 0xFFFF])
def test_hdr_len_is_only_a_hint(hdr_len: int) -> None:
    run(build(False, TCP, rand_bytes(3000), 1000, tcp_opts=TS_OPTS, hdr_len=hdr_len))


def test_input_buffers_of_any_kind() -> None:
    sp = build(True, TCP, rand_bytes(3000), 1000)
    buf = sp.hdr + sp.pkt
    for b in (buf, bytearray(buf), memoryview(buf), memoryview(bytearray(buf))):
        check_segments(sp, to_plain(b))
    check_segments(sp, segment(memoryview(sp.hdr), memoryview(sp.pkt)))
    check_segments(sp, segment(bytearray(sp.hdr), bytearray(sp.pkt)))


# -- UDP segmentation offload


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("size", SIZES)
def test_udp_segmentation(v6: bool, size: str) -> None:
    plen, gso_size = SIZES[size]
    plen = min(plen, 65535 - 8 - (0 if v6 else 20))
    run(build(v6, UDP, rand_bytes(plen, plen), gso_size))


def test_udp_v4_with_ip_options_and_v6_with_extension_headers() -> None:
    run(build(False, UDP, rand_bytes(4000), 1200, ip_opts=IP_OPTS))
    run(build(True, UDP, rand_bytes(4000), 1200, ext=(0, 60)))


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("last", [600, 1199, 1200])
def test_udp_zero_checksum_becomes_ffff(v6: bool, last: int) -> None:
    gso_size = 1200
    tail = udp_payload_with_zero_checksum(v6, last, seed=last)
    sp = build(v6, UDP, rand_bytes(3 * gso_size, 5) + tail, gso_size)
    segs = run(sp)
    assert len(segs) == 4
    assert struct.unpack_from("!H", segs[-1], sp.l4 + 6)[0] == 0xFFFF


def test_udp_ipv4_ids_are_consecutive() -> None:
    sp = build(False, UDP, rand_bytes(3000), 1000, ident=0xFFFF)
    segs = run(sp)
    assert [struct.unpack_from("!H", s, 4)[0] for s in segs] == [0xFFFF, 0, 1]


# -- limits


@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
@pytest.mark.parametrize("gso_size", [1, 7, 200])
def test_255_segments_pass_256_are_refused(proto: int, gso_size: int) -> None:
    sp = build(False, proto, rand_bytes(255 * gso_size), gso_size)
    assert len(run(sp)) == 255
    sp = build(False, proto, rand_bytes(255 * gso_size + 1), gso_size)
    with pytest.raises(GsoError, match="256 segments"):
        to_plain(sp.hdr + sp.pkt)


def test_output_packets_never_exceed_65535() -> None:
    # A single TCP segment carrying the whole 64 KiB: 20 + 20 + 65495 is exactly the limit.
    run(build(False, TCP, rand_bytes(65495), 65535))
    sp = build(False, TCP, rand_bytes(65496), 65535)
    with pytest.raises(GsoError):
        to_plain(sp.hdr + sp.pkt)
    run(build(True, UDP, rand_bytes(65535 - 40 - 8), 65535))


def test_super_packet_length_fields_may_be_zero_or_unrepresentable() -> None:
    sp = build(False, TCP, rand_bytes(20000), 1448)
    pkt = bytearray(sp.pkt)
    pkt[2:4] = b"\0\0"
    check_segments(sp, to_plain(sp.hdr + bytes(pkt)))
    sp = build(True, TCP, rand_bytes(20000), 1448)
    pkt = bytearray(sp.pkt)
    pkt[4:6] = b"\0\0"
    check_segments(sp, to_plain(sp.hdr + bytes(pkt)))
    # The IP payload is 65535 bytes, so the IPv4 total length cannot hold the packet size.
    sp = build(False, TCP, rand_bytes(65535 - 20), 1448)
    assert len(sp.pkt) == 65555
    check_segments(sp, to_plain(sp.hdr + sp.pkt))


# -- rejection


def _mutated(sp: Super, at: int, value: bytes) -> bytes:
    """Header + packet with `value` written at `at` (an offset into header + packet)."""
    buf = bytearray(sp.hdr + sp.pkt)
    buf[at : at + len(value)] = value
    return bytes(buf)


def _cut(sp: Super, n: int) -> bytes:
    """Header + the first n bytes of the packet, the IP length field zeroed so it passes."""
    pkt = bytearray(sp.pkt)
    if sp.v6:
        pkt[4:6] = b"\0\0"
    else:
        pkt[2:4] = b"\0\0"
    return sp.hdr + bytes(pkt[:n])


def _rejections() -> dict[str, tuple[bytes, str]]:
    """name -> (header + packet, what the error must say)."""
    t4 = build(False, TCP, rand_bytes(3000), 1000)
    t6 = build(True, TCP, rand_bytes(3000), 1000)
    u4 = build(False, UDP, rand_bytes(3000), 1000)
    ts4 = build(False, TCP, rand_bytes(3000), 1000, tcp_opts=TS_OPTS)
    dst6 = build(True, TCP, rand_bytes(100), 1000, ext=(60,))
    big4 = build(False, TCP, rand_bytes(65535 - 20), 1400)
    big6 = build(True, UDP, rand_bytes(65535 - 8), 1400)
    h = VNET_HDR_LEN
    names = ("flags", "type", "hdr_len", "gso_size", "start", "offset")

    def hdr(**kw: int) -> bytes:
        fields = dict(zip(names, VNET_HDR.unpack(t4.hdr), strict=True)) | kw
        return VNET_HDR.pack(*fields.values()) + t4.pkt

    def gso(kind: int, start: int, offset: int, sp: Super) -> bytes:
        return VNET_HDR.pack(F_NEEDS_CSUM, kind, 0, 1000, start, offset) + sp.pkt

    return {
        "empty": (b"", "shorter than the virtio-net header"),
        "short header": (t4.hdr[:9], "shorter than the virtio-net header"),
        "header only": (t4.hdr, "empty packet"),
        "header and one byte": (_cut(t4, 1), "truncated IPv4 header"),
        "truncated IPv4 header": (_cut(t4, 19), "truncated IPv4 header"),
        "truncated IPv6 header": (_cut(t6, 39), "truncated IPv6 header"),
        "truncated TCP header": (_cut(t4, 39), "truncated TCP header"),
        "truncated UDP header": (_cut(u4, 27), "truncated UDP header"),
        "UFO": (hdr(type=GSO_UDP), "UFO"),
        "unknown type": (hdr(type=2), "unknown gso_type 0x2"),
        "ECN alone": (hdr(type=GSO_ECN), "unknown gso_type 0x80"),
        "gso_size 0": (hdr(gso_size=0), "gso_size is 0"),
        "csum_start past the end": (hdr(start=0xFFFF), "csum_start"),
        "csum_start inside the IP header": (hdr(start=10), "csum_start"),
        "csum_offset not the TCP checksum": (hdr(offset=6), "csum_start"),
        "IP version 5": (_mutated(t4, h, b"\x55"), "IP version 5"),
        "IP version 0": (_mutated(t4, h, b"\x05"), "IP version 0"),
        "IHL below 5": (_mutated(t4, h, b"\x44"), "bad IPv4 header length"),
        "IHL past the buffer": (
            _cut(t4, 40)[:h] + b"\x4f" + _cut(t4, 40)[h + 1 :],
            "bad IPv4 header length",
        ),
        "total length too small": (
            _mutated(t4, h + 2, struct.pack("!H", 100)),
            "total length disagrees",
        ),
        "total length too large": (
            _mutated(t4, h + 2, struct.pack("!H", 60000)),
            "total length disagrees",
        ),
        "fragment": (_mutated(t4, h + 6, b"\x20\x00"), "fragment"),
        "protocol not TCP": (_mutated(t4, h + 9, b"\x11"), "IPv4 protocol 17"),
        "TCP data offset below 5": (_mutated(t4, h + 20 + 12, b"\x40"), "TCP data offset"),
        "TCP data offset past the buffer": (_cut(ts4, 20 + 24), "TCP data offset"),
        "TCPV4 on an IPv6 packet": (gso(GSO_TCPV4, 40, 16, t6), "TCPV4 segmentation of an IPv6"),
        "TCPV6 on an IPv4 packet": (gso(GSO_TCPV6, 20, 16, t4), "TCPV6 segmentation of an IPv4"),
        "UDP_L4 on a TCP packet": (gso(GSO_UDP_L4, 20, 6, t4), "IPv4 protocol 6"),
        "TCPV4 on a UDP packet": (gso(GSO_TCPV4, 20, 16, u4), "IPv4 protocol 17"),
        "v6 payload length wrong": (
            _mutated(t6, h + 4, struct.pack("!H", 5)),
            "IPv6 payload length disagrees",
        ),
        "v6 next header ICMPv6": (_mutated(t6, h + 6, b"\x3a"), "IPv6 next header 58"),
        "v6 routing header": (_mutated(dst6, h + 6, b"\x2b"), "IPv6 next header 43"),
        "v6 fragment header": (_mutated(dst6, h + 6, b"\x2c"), "IPv6 next header 44"),
        # A 2048-byte destination options header in a 188-byte packet.
        "v6 extension header past the end": (
            _mutated(dst6, h + 41, b"\xff"),
            "truncated IPv6 extension header",
        ),
        "v6 extension header cut": (_cut(dst6, 44), "truncated IPv6 extension header"),
        "too many segments": (hdr(gso_size=11), "273 segments"),
        "IPv4 super-packet too large": (big4.hdr + big4.pkt + b"x", "super-packet too large"),
        "IPv6 super-packet too large": (big6.hdr + big6.pkt + b"x", "super-packet too large"),
    }


REJECTIONS = _rejections()


@pytest.mark.parametrize("name", REJECTIONS)
def test_malformed_input_raises_gso_error(name: str) -> None:
    buf, reason = REJECTIONS[name]
    with pytest.raises(GsoError, match=reason):
        to_plain(buf)


def test_gso_error_is_a_value_error() -> None:
    assert issubclass(GsoError, ValueError)
    with pytest.raises(GsoError, match="UFO"):
        segment(VNET_HDR.pack(F_NEEDS_CSUM, GSO_UDP, 0, 1000, 20, 6), bytes(100))
    with pytest.raises(GsoError):
        segment(b"\0" * 9, bytes(100))


# -- what one super-packet may turn into (issue 20, finding 3)


def options_chain(sizes: list[int], final: int) -> tuple[int, bytes]:
    """(first next header, bytes) of destination-options headers of ``sizes`` bytes each
    (multiples of 8), padded with Pad1 options."""
    out = b""
    for i, size in enumerate(sizes):
        nxt = 60 if i + 1 < len(sizes) else final
        out += bytes([nxt, size // 8 - 1]) + bytes(size - 2)
    return (60 if sizes else final), out


def chained(sizes: list[int], payload: bytes, gso_size: int) -> bytes:
    """Virtio-net header + IPv6/UDP super-packet behind the given options headers."""
    first, ext = options_chain(sizes, UDP)
    udp = bytearray(udp_header(8 + len(payload)))
    l4_len = len(udp) + len(payload)
    struct.pack_into("!H", udp, 6, ref_sum(pseudo_header(True, SRC6, DST6, UDP, l4_len)))
    pkt = ipv6_header(len(ext) + l4_len, first) + ext + bytes(udp) + payload
    hdr = VNET_HDR.pack(F_NEEDS_CSUM, GSO_UDP_L4, 40 + len(ext) + 8, gso_size, 40 + len(ext), 6)
    return hdr + pkt


def test_the_amplification_attack_is_refused() -> None:
    """The attack run's shape: many destination-options headers (one copy of the whole chain
    per segment) and gso_size 1, 255 segments: about 254 times the bytes sent."""
    buf = chained([8] * 250, rand_bytes(254), 1)
    assert len(buf) < 2400
    with pytest.raises(GsoError, match="more than 3 IPv6 extension headers"):
        to_plain(buf)
    with pytest.raises(GsoError):
        check(buf)
    # one 2 KB header in place of many: refused by length
    buf = chained([2048], rand_bytes(254), 1)
    with pytest.raises(GsoError, match="longer than 512 bytes"):
        to_plain(buf)


def test_options_headers_within_the_caps_are_cut() -> None:
    payload = rand_bytes(3 * 1200 + 17)
    for sizes in ([8], [8, 16, 8], [256, 248, 8]):
        buf = chained(sizes, payload, 1200)
        check(buf)
        segs = to_plain(buf)
        assert len(segs) == 4
        hlen = 40 + sum(sizes) + 8
        assert b"".join(bytes(s[hlen:]) for s in segs) == payload
    with pytest.raises(GsoError, match="more than 3"):
        to_plain(chained([8, 8, 8, 8], payload, 1200))
    with pytest.raises(GsoError, match="longer than 512"):
        to_plain(chained([256, 256, 8], payload, 1200))


def test_output_of_one_super_packet_is_capped() -> None:
    # 255 segments of 16 bytes behind 560 bytes of headers: 147 KB out of 5 KB
    buf = chained([256, 256], rand_bytes(255 * 16), 16)
    with pytest.raises(GsoError, match="add up to more than 131070 bytes"):
        to_plain(buf)


def test_small_real_segments_pass_and_header_multiplication_does_not() -> None:
    """Small segments a real flow makes (a TCP peer's MSS of 400, UDP GSO of 148-byte
    datagrams) pass check, and cut; gso_size 1 or 8 behind the headers (41 and 6 times the
    bytes) is refused by check, which the router applies whole or cut (to_plain itself, which
    a gateway uses on its own kernel's packets, keeps only the absolute bound)."""
    for v6 in (False, True):
        for proto, size in ((TCP, 400), (UDP, 148), (TCP, 96)):
            sp = build(v6, proto, rand_bytes(20 * size), size)
            check(sp.hdr + sp.pkt)
            assert len(to_plain(sp.hdr + sp.pkt)) == 20
        for size in (1, 8):
            sp = build(v6, TCP, rand_bytes(200), size)
            with pytest.raises(GsoError, match=f"more than {MAX_EXPANSION} times the packet"):
                check(sp.hdr + sp.pkt)


@pytest.mark.parametrize("name", REJECTIONS)
def test_check_refuses_what_to_plain_refuses(name: str) -> None:
    buf, reason = REJECTIONS[name]
    with pytest.raises(GsoError, match=reason):
        check(buf)


def test_check_refuses_headers_a_kernel_would_not_write() -> None:
    """Finding 7: these reached a super-packet gateway's TUN unchanged."""
    t4 = build(False, TCP, rand_bytes(3000), 1360)
    names = ("flags", "type", "hdr_len", "gso_size", "start", "offset")

    def hdr(**kw: int) -> bytes:
        fields = dict(zip(names, VNET_HDR.unpack(t4.hdr), strict=True)) | kw
        return VNET_HDR.pack(*fields.values()) + t4.pkt

    check(hdr())
    for bad, reason in (
        (hdr(gso_size=0), "gso_size is 0"),
        (hdr(type=0xFF), "unknown gso_type"),
        (hdr(type=GSO_UDP), "UFO"),
        (hdr(start=65000), "csum_start"),
        (hdr(offset=65000), "csum_start"),
        (hdr(type=GSO_NONE, start=65000), "outside the packet"),
        (hdr(type=GSO_NONE, offset=65000), "outside the packet"),
        (hdr(flags=0x04), "unknown virtio-net flags"),
        (hdr(hdr_len=len(t4.pkt) + 1), "hdr_len"),
    ):
        with pytest.raises(GsoError, match=reason):
            check(bad)
    # a plain packet, a checksum to complete
    check(PLAIN_HDR + t4.pkt[:40])
    u4 = build(False, UDP, rand_bytes(100), 1360, gso_type=GSO_NONE)
    check(u4.hdr + u4.pkt)


# -- property tests


@st.composite
def super_packets(draw: st.DrawFn) -> Super:
    v6 = draw(st.booleans())
    proto = draw(st.sampled_from([TCP, UDP]))
    plen = draw(st.integers(0, 65000))
    gso_size = draw(st.integers(max(1, -(-plen // 255)), 9000))
    kw: dict = {}
    if v6:
        kw["ext"] = tuple(draw(st.lists(st.sampled_from([0, 60]), max_size=3)))
    else:
        kw["ip_opts"] = draw(st.sampled_from([b"", IP_OPTS, b"\x01" * 40]))
        kw["ident"] = draw(st.integers(0, 0xFFFF))
    if proto == TCP:
        kw["tcp_opts"] = draw(st.sampled_from([b"", TS_OPTS, SACK_OPTS, b"\x01" * 40]))
        kw["flags"] = draw(st.integers(0, 0xFF))
        kw["seq"] = draw(st.integers(0, 0xFFFFFFFF))
        kw["ecn"] = draw(st.booleans())
    payload = rand_bytes(plen, draw(st.integers(0, 2**32)))
    return build(v6, proto, payload, gso_size, **kw)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(super_packets())
def test_random_super_packets(sp: Super) -> None:
    run(sp)


HEADERS = st.builds(
    VNET_HDR.pack,
    st.sampled_from([0, F_NEEDS_CSUM, F_DATA_VALID, 3, 0xFF]),
    st.sampled_from([GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, 0x81, 0x85, 2, 0xFF]),
    st.integers(0, 0xFFFF),
    st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF)),
    st.one_of(st.sampled_from([20, 24, 40, 48]), st.integers(0, 0xFFFF)),
    st.one_of(st.sampled_from([6, 16]), st.integers(0, 0xFFFF)),
)


def _accepts_or_rejects(buf: bytes) -> None:
    try:
        out = to_plain(buf)
    except GsoError:
        return
    assert out
    if not needs_work(buf):
        return
    for seg in out:
        assert 0 < len(seg) <= 65535
        if buf[1] != GSO_NONE:
            seg = bytes(seg)
            if seg[0] >> 4 == 4:
                assert struct.unpack_from("!H", seg, 2)[0] == len(seg)
                assert ref_sum(seg[: (seg[0] & 0xF) * 4]) == 0xFFFF
            else:
                assert struct.unpack_from("!H", seg, 4)[0] == len(seg) - 40


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_only_raise_gso_error(buf: bytes) -> None:
    _accepts_or_rejects(buf)


@settings(max_examples=400, deadline=None)
@given(
    HEADERS,
    st.sampled_from([b"\x45", b"\x46", b"\x4f", b"\x60", b"\x00"]),
    st.binary(max_size=200),
    st.booleans(),
)
def test_arbitrary_packets_only_raise_gso_error(
    hdr: bytes, first: bytes, rest: bytes, fix_length: bool
) -> None:
    pkt = bytearray(first + rest)
    if fix_length and len(pkt) >= 6:
        # Get past the length checks so the rest of the parser sees garbage too.
        if pkt[0] >> 4 == 6:
            struct.pack_into("!H", pkt, 4, max(0, len(pkt) - 40))
        else:
            struct.pack_into("!H", pkt, 2, len(pkt))
    _accepts_or_rejects(hdr + bytes(pkt))


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    v6 = draw(st.booleans())
    proto = draw(st.sampled_from([TCP, UDP]))
    plen = draw(st.integers(0, 3000))
    gso_size = draw(st.integers(1, 1500))
    assume(-(-plen // gso_size) <= 255)
    ext = tuple(draw(st.lists(st.sampled_from([0, 60]), max_size=2))) if v6 else ()
    sp = build(
        v6,
        proto,
        rand_bytes(plen),
        gso_size,
        ext=ext,
        gso_type=draw(st.sampled_from([None, GSO_NONE])),
    )
    buf = bytearray(sp.hdr + sp.pkt)
    # Mutations mostly land in the headers, where they matter.
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, min(len(buf) - 1, sp.hlen + VNET_HDR_LEN + 8)))
        buf[at] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(buf))))
    if cut is not None:
        del buf[cut:]
    buf += draw(st.just(b"") | st.binary(min_size=1, max_size=8))
    return bytes(buf)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_packets())
def test_mutated_packets_only_raise_gso_error(buf: bytes) -> None:
    _accepts_or_rejects(buf)

"""MSS clamping (polevpn.packet.mss): exact bytes, checksums recomputed from scratch, fuzzing.

The expected packet after clamping is always built afresh with the lower MSS and its
checksum computed over the whole segment, so the incremental update is never checked
against its own arithmetic.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polevpn.packet.gso import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_NONE,
    PLAIN_HDR,
    VNET_HDR,
    internet_checksum,
    to_plain,
)
from polevpn.packet.mss import clamp_mss, clamped, clamped_vnet, limits

TCP, UDP = 6, 17
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
SRC4, DST4 = bytes([198, 18, 10, 2]), bytes([198, 18, 20, 2])
SRC6 = bytes.fromhex("20010db8001000000000000000000002")
DST6 = bytes.fromhex("20010db8002000000000000000000002")
MSS4, MSS6 = limits(1400)

# What Linux puts in a SYN: MSS, SACK permitted, timestamps, NOP, window scale.
TS = b"\x08\x0a" + struct.pack("!II", 0x01020304, 0)
LINUX_TAIL = b"\x04\x02" + TS + b"\x01\x03\x03\x07"

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- packet construction


def mss_opt(mss: int) -> bytes:
    return struct.pack("!BBH", 2, 4, mss)


def pad4(opts: bytes) -> bytes:
    return opts + b"\0" * (-len(opts) % 4)


def tcp_segment(flags: int, options: bytes = b"", payload: bytes = b"") -> bytearray:
    """TCP header (checksum 0) + payload; options are padded with EOL to a multiple of 4."""
    options = pad4(options)
    doff = 5 + len(options) // 4
    hdr = struct.pack("!HHIIBBHHH", 40000, 5099, 0x11223344, 0, doff << 4, flags, 64240, 0, 0)
    return bytearray(hdr + options + payload)


def pseudo(v6: bool, l4_len: int) -> bytes:
    if v6:
        return SRC6 + DST6 + struct.pack("!I3xB", l4_len, TCP)
    return SRC4 + DST4 + struct.pack("!xBH", TCP, l4_len)


def tcp_checksum(v6: bool, seg: bytes) -> int:
    """From scratch: complement of the sum over pseudo-header and segment (field zeroed)."""
    seg = bytearray(seg)
    seg[16:18] = b"\0\0"
    return 0xFFFF - internet_checksum(pseudo(v6, len(seg)) + seg)


def checksum_ok(v6: bool, seg: bytes) -> bool:
    """A receiver's check: everything, checksum field included, sums to 0xFFFF."""
    return internet_checksum(pseudo(v6, len(seg)) + bytes(seg)) == 0xFFFF


def ipv4(seg: bytes, ip_opts: bytes = b"", frag: int = 0x4000, total: int | None = None,
         proto: int = TCP) -> bytearray:
    ihl = 5 + len(ip_opts) // 4
    n = ihl * 4 + len(seg) if total is None else total
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, n, 0x1234, frag, 64, proto, 0,
                                SRC4, DST4) + ip_opts)
    struct.pack_into("!H", hdr, 10, 0xFFFF - internet_checksum(hdr))
    return hdr + seg


def ipv6(seg: bytes, ext: bytes = b"", first_nh: int = TCP) -> bytearray:
    plen = len(ext) + len(seg)
    return bytearray(struct.pack("!IHBB16s16s", 6 << 28, plen, first_nh, 64, SRC6, DST6)
                     + ext + seg)


def syn(v6: bool, mss: int | None, flags: int = SYN, before: bytes = b"",
        after: bytes = LINUX_TAIL, payload: bytes = b"", ext: bytes = b"",
        first_nh: int = TCP, ip_opts: bytes = b"") -> bytearray:
    """A SYN with a complete checksum; ``before``/``after`` are options around the MSS."""
    opts = before + (mss_opt(mss) if mss is not None else b"") + after
    seg = tcp_segment(flags, opts, payload)
    struct.pack_into("!H", seg, 16, tcp_checksum(v6, seg))
    return ipv6(seg, ext, first_nh) if v6 else ipv4(seg, ip_opts)


def l4_of(pkt: bytes) -> int:
    if pkt[0] >> 4 == 4:
        return (pkt[0] & 15) * 4
    return 40


def clamp_both(pkt: bytearray) -> tuple[bool, bytearray]:
    """clamp_mss on a copy, checked against clamped on read-only bytes: they must agree."""
    ro = bytes(pkt)
    out = clamped(ro, MSS4, MSS6)
    buf = bytearray(pkt)
    changed = clamp_mss(buf, MSS4, MSS6)
    assert bytes(out) == bytes(buf)
    assert (out is not ro) == changed
    assert ro == bytes(pkt)  # the read-only input is never written
    return changed, buf


# -- exact bytes


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("flags", [SYN, SYN | ACK], ids=["syn", "synack"])
def test_linux_style_syn_is_clamped_exactly(v6, flags):
    limit = MSS6 if v6 else MSS4
    changed, out = clamp_both(syn(v6, 8960, flags))
    assert changed
    assert out == syn(v6, limit, flags)
    assert checksum_ok(v6, out[l4_of(out):])


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize(
    "before,after",
    [
        (b"", b""),  # MSS alone
        (b"\x01", b"\x01\x01\x01"),  # MSS value at an odd offset from the TCP header
        (b"\x01\x01\x01", b"\x01"),
        (b"\x04\x02\x01", b"\x01" + TS),  # SACK-permitted first, MSS value odd again
        (b"\x01\x03\x03\x07", LINUX_TAIL),
        (b"\xfe\x06abcd", b"\x00"),  # an unknown option before, EOL after
    ],
)
def test_option_layouts(v6, before, after):
    limit = MSS6 if v6 else MSS4
    changed, out = clamp_both(syn(v6, 65535, before=before, after=after))
    assert changed
    assert out == syn(v6, limit, before=before, after=after)
    assert checksum_ok(v6, out[l4_of(out):])


def test_syn_with_data_is_clamped():
    # TCP Fast Open: the checksum covers the payload as well
    changed, out = clamp_both(syn(False, 1460, payload=b"GET / HTTP/1.1\r\n\r\n"))
    assert changed
    assert out == syn(False, MSS4, payload=b"GET / HTTP/1.1\r\n\r\n")


def test_ipv4_options_are_skipped():
    ip_opts = b"\x94\x04\x00\x00" + b"\x01\x01\x01\x00"  # router alert, NOPs, EOL
    changed, out = clamp_both(syn(False, 1460, ip_opts=ip_opts))
    assert changed
    assert out == syn(False, MSS4, ip_opts=ip_opts)
    assert out[:28] == syn(False, 1460, ip_opts=ip_opts)[:28]  # IP header untouched


def _ext(nxt: int, units: int) -> bytes:
    """An options-style extension header of ``units`` * 8 bytes with PadN padding."""
    pad = units * 8 - 4
    return bytes([nxt, units - 1, 1, pad]) + bytes(pad)


def _routing(nxt: int) -> bytes:
    # type 0 routing header with segments_left 0 and one address: 24 bytes
    return bytes([nxt, 2, 0, 0]) + bytes(4) + SRC6


@pytest.mark.parametrize(
    "first,ext",
    [
        (0, _ext(TCP, 1)),  # hop-by-hop
        (0, _ext(60, 1) + _ext(TCP, 2)),  # hop-by-hop, destination options (16 bytes)
        (0, _ext(43, 1) + _routing(60) + _ext(TCP, 1)),  # ..., routing, destination options
    ],
    ids=["hbh", "hbh-dst", "hbh-rt-dst"],
)
def test_ipv6_extension_headers_are_walked(first, ext):
    changed, out = clamp_both(syn(True, 8940, ext=ext, first_nh=first))
    assert changed
    assert out == syn(True, MSS6, ext=ext, first_nh=first)
    assert checksum_ok(True, out[40 + len(ext):])


def test_every_mss_option_is_clamped():
    pkt = syn(False, 9000, after=mss_opt(1500) + mss_opt(1000))
    changed, out = clamp_both(pkt)
    assert changed
    assert out == syn(False, MSS4, after=mss_opt(MSS4) + mss_opt(1000))


def test_checksum_sum_needing_a_second_fold():
    # ~HC + ~old + new == 0x1FFFF: one end-around carry leaves 0x10000, which must be
    # folded again. Only an MSS at an odd offset gets there (its bytes count swapped, so
    # the "new" word can be the larger); two payload bytes steer a valid packet's
    # checksum to the HC that does it.
    def swap(v: int) -> int:
        return (v >> 8) | (v & 0xFF) << 8

    old, new = 8960, MSS4
    want_hc = 0xFFFF - (0x1FFFF - (0xFFFF - swap(old)) - swap(new))
    around = {"before": b"\x01", "after": b"\x01\x01\x01", "payload": b"\0\0"}
    pkt = syn(False, old, **around)
    pkt[36:38] = b"\0\0"
    s = internet_checksum(pseudo(False, len(pkt) - 20) + pkt[20:])
    struct.pack_into("!H", pkt, len(pkt) - 2, (0xFFFF - want_hc - s) % 0xFFFF)
    struct.pack_into("!H", pkt, 36, tcp_checksum(False, pkt[20:]))
    assert struct.unpack_from("!H", pkt, 36)[0] == want_hc
    changed, out = clamp_both(pkt)
    assert changed
    expected = bytearray(pkt)
    struct.pack_into("!H", expected, 43, new)
    struct.pack_into("!H", expected, 36, tcp_checksum(False, expected[20:]))
    assert out == expected
    assert checksum_ok(False, out[20:])


def test_base_offset():
    pkt = syn(True, 8940)
    buf = bytearray(b"xyz") + pkt
    assert clamp_mss(buf, MSS4, MSS6, base=3)
    assert buf == b"xyz" + syn(True, MSS6)
    assert bytes(clamped(b"xyz" + pkt, MSS4, MSS6, base=3)) == buf


def test_writable_memoryview():
    pkt = syn(False, 8960)
    backing = bytearray(4) + pkt
    assert clamp_mss(memoryview(backing)[4:], MSS4, MSS6)
    assert backing[4:] == syn(False, MSS4)


def test_readonly_memoryview_is_copied():
    data = bytes(syn(False, 8960))
    mv = memoryview(data)[0:]
    out = clamped(mv, MSS4, MSS6)
    assert isinstance(out, bytearray) and out == syn(False, MSS4)
    assert data == syn(False, 8960)


def test_limits():
    assert limits(1400) == (1360, 1340)
    assert limits(9000) == (8960, 8940)


# -- left alone


def _untouched(pkt: bytes | bytearray) -> None:
    pkt = bytearray(pkt)
    ro = bytes(pkt)
    assert clamped(ro, MSS4, MSS6) is ro
    buf = bytearray(pkt)
    assert not clamp_mss(buf, MSS4, MSS6)
    assert buf == pkt
    vnet = PLAIN_HDR + ro
    assert clamped_vnet(vnet, MSS4, MSS6) is vnet


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("flags", [ACK, ACK | PSH, FIN | ACK, RST, 0], ids=str)
def test_non_syn_untouched(v6, flags):
    # an MSS option in a non-SYN means nothing; it stays
    _untouched(syn(v6, 8960, flags))


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("mss", [536, 1200, MSS4 - 20, MSS6, MSS4])
def test_small_mss_untouched(v6, mss):
    if v6 and mss > MSS6:
        mss = MSS6
    _untouched(syn(v6, mss))


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_syn_without_mss_untouched(v6):
    _untouched(syn(v6, None))


def test_not_tcp_untouched():
    seg = tcp_segment(SYN, mss_opt(8960))  # TCP-looking bytes carried as UDP
    _untouched(ipv4(seg, proto=UDP))
    _untouched(ipv6(seg, first_nh=UDP))
    _untouched(ipv6(seg, _ext(UDP, 1), first_nh=0))


@pytest.mark.parametrize(
    "opts",
    [
        b"\x04\x00" + mss_opt(8960),  # length 0: would loop forever
        b"\x04\x01" + mss_opt(8960),  # length 1
        b"\x08\x0a\x00\x00" + mss_opt(8960),  # timestamps overrunning the header
        b"\x02\x03\x23\x18",  # MSS of length 3
        b"\x02\x05\x23\x18\x00",  # MSS of length 5
        mss_opt(8960) + b"\x01\x01\x01\x08",  # a kind byte with no room for its length
    ],
)
def test_malformed_options_untouched(opts):
    seg = tcp_segment(SYN, b"")
    seg[12] = (5 + -(-len(opts) // 4)) << 4
    seg[20:] = pad4(opts)
    struct.pack_into("!H", seg, 16, tcp_checksum(False, seg))
    _untouched(ipv4(seg))


def test_mss_after_eol_untouched():
    _untouched(syn(False, None, after=b"\x00\x01\x01\x01" + mss_opt(8960)))


@pytest.mark.parametrize("doff", [0, 4, 15])
def test_bad_data_offset_untouched(doff):
    pkt = syn(False, 8960)
    pkt[20 + 12] = doff << 4  # 15: 60 bytes, more than the packet has
    _untouched(pkt)


def test_truncated_untouched():
    pkt = syn(False, 8960)
    for n in range(len(pkt)):
        _untouched(pkt[:n])  # also: IP length now disagrees with the buffer
    v6 = syn(True, 8960)
    for n in range(len(v6)):
        _untouched(v6[:n])


def test_ip_length_shorter_than_options_untouched():
    pkt = syn(False, 8960, before=LINUX_TAIL, after=b"")
    # the IP datagram ends inside the options (as a first fragment cut short would)
    struct.pack_into("!H", pkt, 2, 20 + 24)
    _untouched(pkt)


def test_fragments():
    seg = syn(False, 8960)[20:]
    # a later fragment: what looks like a TCP header is payload
    _untouched(ipv4(seg, frag=0x2000 | 185))
    _untouched(ipv4(seg, frag=1))
    _untouched(ipv4(seg, frag=0x0100))  # offset 256 * 8: only the high offset bits set
    # a first fragment (MF, offset 0) holding the whole TCP header is clamped
    changed, out = clamp_both(ipv4(seg, frag=0x2000))
    assert changed
    assert out[20:] == syn(False, MSS4)[20:]
    # IPv6 fragment header: not reassembled here, left alone
    frag_hdr = bytes([TCP, 0, 0, 0]) + b"\0\0\0\x01"
    _untouched(ipv6(syn(True, 8960)[40:], frag_hdr, first_nh=44))


def test_unknown_ipv6_header_untouched():
    _untouched(ipv6(syn(True, 8960)[40:], _ext(TCP, 1), first_nh=51))  # AH
    # hop-by-hop header claiming more bytes than the packet holds
    ext = bytearray(_ext(TCP, 1))
    ext[1] = 200
    _untouched(ipv6(syn(True, 8960)[40:], bytes(ext), first_nh=0))


def test_other_ip_versions_untouched():
    pkt = syn(False, 8960)
    for version in (0, 5, 7, 15):
        pkt[0] = version << 4 | 5
        _untouched(pkt)


# -- partial checksums (virtio-net NEEDS_CSUM)


def partial_syn(v6: bool, mss: int, flags: int = SYN, after: bytes = LINUX_TAIL) -> bytearray:
    """vnet header + SYN as a TUN with checksum offload hands it over: NEEDS_CSUM, the
    field holding the folded pseudo-header sum (not complemented)."""
    pkt = syn(v6, mss, flags, after=after)
    l4 = l4_of(pkt)
    struct.pack_into("!H", pkt, l4 + 16, internet_checksum(pseudo(v6, len(pkt) - l4)))
    return bytearray(VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, l4, 16)) + pkt


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("flags", [SYN, SYN | ACK], ids=["syn", "synack"])
def test_needs_csum_leaves_checksum_field(v6, flags):
    limit = MSS6 if v6 else MSS4
    buf = bytes(partial_syn(v6, 8960, flags))
    out = clamped_vnet(buf, MSS4, MSS6)
    assert out is not buf
    expected = bytearray(buf)
    l4 = 10 + l4_of(buf[10:])
    struct.pack_into("!H", expected, l4 + 22, limit)  # the MSS value, nothing else
    assert out == expected
    # completing the checksum the way the kernel does gives the from-scratch packet
    (plain,) = to_plain(out)
    assert bytes(plain) == syn(v6, limit, flags)


def test_needs_csum_with_a_normal_update_would_be_wrong():
    # Why the partial case is different: updating the partial sum like a full checksum
    # leaves a packet whose completed checksum is invalid.
    buf = partial_syn(False, 8960)
    assert clamp_mss(buf, MSS4, MSS6, base=10)  # treated as a full checksum
    (plain,) = to_plain(buf)
    assert not checksum_ok(False, plain[20:])
    buf = partial_syn(False, 8960)
    assert clamp_mss(buf, MSS4, MSS6, base=10, csum_start=20)
    (plain,) = to_plain(buf)
    assert checksum_ok(False, plain[20:])


def test_needs_csum_elsewhere_untouched():
    for start, offset in ((0, 16), (24, 16), (20, 6)):
        buf = partial_syn(False, 8960)
        struct.pack_into("<HH", buf, 6, start, offset)
        ro = bytes(buf)
        assert clamped_vnet(ro, MSS4, MSS6) is ro


@pytest.mark.parametrize("flag", [0, F_DATA_VALID])
def test_vnet_without_needs_csum_updates_checksum(flag):
    pkt = syn(True, 8960)
    hdr = VNET_HDR.pack(flag, GSO_NONE, 0, 0, 0, 0)
    out = clamped_vnet(hdr + pkt, MSS4, MSS6)
    assert out == hdr + syn(True, MSS6)


# -- fuzzing


@FUZZ
@given(data=st.binary(max_size=120), base=st.integers(0, 12))
def test_arbitrary_bytes_never_raise(data, base):
    buf = bytearray(data)
    changed = clamp_mss(buf, MSS4, MSS6, base)
    assert len(buf) == len(data)
    assert (bytes(buf) != data) == changed
    out = clamped(data, MSS4, MSS6, base)
    assert bytes(out) == bytes(buf)
    clamped_vnet(data, MSS4, MSS6)
    clamp_mss(bytearray(data), MSS4, MSS6, base, csum_start=base)


def _head(v6: bool) -> bytes:
    """A valid header prefix that lets fuzzed bytes past the early exit."""
    if v6:
        return struct.pack("!IHBB16s16s", 6 << 28, 0, TCP, 64, SRC6, DST6)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, TCP, 0, SRC4, DST4)


@FUZZ
@given(v6=st.booleans(), tail=st.binary(max_size=80), flags=st.integers(0, 255),
       doff=st.integers(0, 15))
def test_fuzzed_tcp_headers_never_raise(v6, tail, flags, doff):
    # Random TCP headers and options behind a valid IP header: the option walker, not the
    # early exit, sees the garbage.
    tcp = bytearray(tail.ljust(20, b"\0")[:20]) + tail[20:]
    tcp[12] = doff << 4
    tcp[13] = flags | SYN
    pkt = bytearray(_head(v6)) + tcp
    if not v6:
        struct.pack_into("!H", pkt, 2, len(pkt) & 0xFFFF)
    else:
        struct.pack_into("!H", pkt, 4, len(tcp))
    buf = bytearray(pkt)
    changed = clamp_mss(buf, MSS4, MSS6)
    l4 = l4_of(pkt)
    diff = [i for i in range(len(pkt)) if buf[i] != pkt[i]]
    assert bool(diff) == changed
    # only option bytes and the checksum may change
    assert all(i in (l4 + 16, l4 + 17) or l4 + 20 <= i < l4 + doff * 4 for i in diff)


_options = st.lists(
    st.one_of(
        st.just(b"\x01"),  # NOP
        st.just(b"\x04\x02"),  # SACK permitted
        st.just(b"\x01\x03\x03\x07"),  # NOP, window scale
        st.binary(min_size=8, max_size=8).map(lambda b: b"\x08\x0a" + b),  # timestamps
        st.tuples(st.integers(3, 253), st.binary(max_size=10)).map(
            lambda t: bytes([t[0] if t[0] != 8 else 9, len(t[1]) + 2]) + t[1]
        ),  # unknown kinds
    ),
    max_size=5,
)


@st.composite
def syn_options(draw):
    """(before, after) option bytes around one MSS option, at most 40 bytes with it."""
    before = b"".join(draw(_options))
    after = b"".join(draw(_options))
    if len(before) + len(after) + 4 > 40:
        after = b""
    if len(before) + 4 > 40:
        before = before[:0]
    return before, after


@FUZZ
@given(v6=st.booleans(), mss=st.integers(0, 65535), opts=syn_options(),
       ack=st.booleans(), payload=st.binary(max_size=40), mtu=st.integers(576, 9000))
def test_valid_syns_clamped_with_valid_checksum(v6, mss, opts, ack, payload, mtu):
    before, after = opts
    mss4, mss6 = limits(mtu)
    limit = mss6 if v6 else mss4
    flags = SYN | (ACK if ack else 0)
    pkt = syn(v6, mss, flags, before, after, payload)
    buf = bytearray(pkt)
    changed = clamp_mss(buf, mss4, mss6)
    assert changed == (mss > limit)
    assert buf == syn(v6, min(mss, limit), flags, before, after, payload)
    l4 = l4_of(buf)
    assert checksum_ok(v6, buf[l4:])
    assert struct.unpack_from("!H", buf, l4 + 20 + len(before) + 2)[0] == min(mss, limit)


@FUZZ
@given(v6=st.booleans(), mss=st.integers(0, 65535), opts=syn_options(), ack=st.booleans())
def test_valid_partial_syns_complete_to_valid_checksum(v6, mss, opts, ack):
    before, after = opts
    limit = MSS6 if v6 else MSS4
    flags = SYN | (ACK if ack else 0)
    pkt = syn(v6, mss, flags, before, after)
    l4 = l4_of(pkt)
    struct.pack_into("!H", pkt, l4 + 16, internet_checksum(pseudo(v6, len(pkt) - l4)))
    buf = VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, l4, 16) + pkt
    out = clamped_vnet(buf, MSS4, MSS6)
    assert (out is not buf) == (mss > limit)
    (plain,) = to_plain(out)
    assert bytes(plain) == syn(v6, min(mss, limit), flags, before, after)

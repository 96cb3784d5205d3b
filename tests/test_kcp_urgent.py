"""Urgent packets on kcp:// (issue 16): small light packets (a ping, a TCP ACK) go ahead
of the data that waits to be sent (``Kcp.write_frames(..., urgent=True)``, ikcp_send_urgent
in the vendored ikcp.c), and past a full send queue within its headroom (``KcpLink``).
Control blocks joined in memory; no sockets."""

from __future__ import annotations

import struct

from polevpn.kcp._ikcp import Kcp, urgent_packet
from test_kcp_unordered import HEAVY, LIGHT, ipv4, ipv6, marks, pair, run, seqs

from polevpn.config import KcpParams
from polevpn.kcp.kcp_link import URGENT_HEADROOM, KcpLink, urgent_frames, urgent_of
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.packet.gso import VNET_HDR_LEN
from polevpn.proto import wire

PING = ipv4(1, 56)
BULK = ipv4(6, 1200)  # one frame per segment


def frame(packet: bytes, seq: int) -> bytes:
    return wire.encode_frame(wire.C2S_IPDATA, packet, seq)


def held(a: Kcp, out: list[bytes], cwnd_segments: int) -> list[tuple[int, int]]:
    """Let ``cwnd_segments`` of what is queued go (the in-flight cap holds the rest)."""
    a.set_cwnd_bytes(cwnd_segments * (len(BULK) + 8))
    a.update(10)
    return marks(out)


def released(a: Kcp, out: list[bytes], t: int = 20) -> list[tuple[int, int]]:
    """(sn, frg) of what goes once the cap is lifted (the buffers stay in ``out``)."""
    before = len(out)
    a.set_cwnd_bytes(10**7)
    a.update(t)
    return marks(out[before:])


def test_urgent_packets_are_the_light_small_ones():
    small_light = [p for p in LIGHT if len(p) <= 320]
    assert small_light and len(small_light) < len(LIGHT)  # a 1200-byte UDP packet is bulk
    for p in small_light:
        assert urgent_packet(p), p.hex()
    for p in HEAVY + [ipv4(17, 1200), ipv6(17, 300)]:
        assert not urgent_packet(p), p.hex()


def test_an_urgent_frame_goes_ahead_of_queued_data():
    a, b, oa, ob = pair()
    bulk = b"".join(frame(BULK, i) for i in range(20))
    a.write_frames(bulk, True, True)
    held(a, oa, 2)
    a.write_frames(frame(PING, 99), True, True)
    sent = released(a, oa)
    # the first segment after the two already sent is the ping, alone, unordered
    assert sent[0] == (2, 0xFF)
    assert [frg for _sn, frg in sent[1:]] == [0] * 18
    assert a.urgent_segments == 1
    # the receiver gets every frame whole, the ping third
    got = run(a, b, oa, ob, len(bulk) + len(frame(PING, 99)), loss=0.0)
    assert seqs(got) == [0, 1, 99] + list(range(2, 20))


def test_without_urgent_it_waits_its_turn():
    a, _b, oa, _ob = pair()
    a.write_frames(b"".join(frame(BULK, i) for i in range(20)), True)
    held(a, oa, 2)
    a.write_frames(frame(PING, 99), True)
    sent = released(a, oa)
    assert sent[-1] == (20, 0xFF)
    assert a.urgent_segments == 0


def test_an_urgent_frame_never_splits_a_message_partly_sent():
    """A frame of three segments (TCP data: a plain message, frg 2, 1, 0), one of them
    sent: the ping goes after the other two, before the next message."""
    a, b, oa, ob = pair()
    big = frame(ipv4(6, 3000), 0)
    data = big + frame(BULK, 1) + frame(BULK, 2)
    a.write_frames(data, True, True)
    a.set_cwnd_bytes(1)  # one segment in flight
    a.update(10)
    assert [frg for _sn, frg in marks(oa)] == [2]
    a.write_frames(frame(PING, 99), True, True)
    sent = released(a, oa)
    assert [frg for _sn, frg in sent] == [1, 0, 0xFF, 0, 0]
    got = run(a, b, oa, ob, len(data) + len(frame(PING, 99)), loss=0.0)
    assert seqs(got) == [0, 99, 1, 2]


def test_urgent_frames_keep_their_order_and_a_flood_goes_at_the_tail():
    a, _b, oa, _ob = pair()
    a.write_frames(b"".join(frame(BULK, i) for i in range(10)), True, True)
    held(a, oa, 1)
    for i in range(40):  # one write each: forty messages of one ping
        a.write_frames(frame(PING, 100 + i), True, True)
    sent = released(a, oa)
    kinds = ["u" if frg == 0xFF else "b" for _sn, frg in sent]
    ahead = 33  # IKCP_URGENT_MAX_AHEAD passed over, then the one inserted behind them
    assert kinds == ["u"] * ahead + ["b"] * 9 + ["u"] * (40 - ahead)
    assert a.urgent_segments == ahead


def test_urgent_frames_arrive_once_each_with_loss():
    a, b, oa, ob = pair()
    data = b""
    for i in range(200):
        data += frame(PING if i % 4 == 0 else BULK, i)
    a.write_frames(data, True, True)
    got = run(a, b, oa, ob, len(data), loss=0.1)
    order = seqs(got)
    assert sorted(order) == list(range(200))
    bulk = [s for s in order if s % 4]
    assert bulk == sorted(bulk)  # TCP data stays in order


# -- KcpLink: the headroom past a full queue


def link(urgent: bool = True) -> KcpLink:
    params = KcpParams(urgent=urgent)
    lk = KcpLink(params, KcpPool(), 1400, 0.0, seed=1)
    lk.unordered_send = True
    return lk


def test_urgent_budget_is_the_queue_budget_and_its_headroom():
    lk = link()
    budget = lk.queue_budget
    assert budget is not None
    assert lk.urgent_budget == budget + int(budget * URGENT_HEADROOM)
    assert lk.urgent_room() == lk.urgent_budget  # nothing queued
    assert link(urgent=False).urgent_budget is None
    lk.unordered_send = False  # a Go peer: its stream is cut anywhere, nothing goes ahead
    assert lk.urgent_budget is None and lk.urgent_room() == 0


def test_urgent_of_picks_urgent_packets_within_the_room():
    pkts = [BULK, PING, ipv6(6, 0), BULK, PING]
    assert urgent_of(pkts, 10**6) == [PING, ipv6(6, 0), PING]
    assert urgent_of(pkts, 1) == [PING]  # the room is spent after the first
    assert urgent_of(pkts, 0) == []
    vnet = [bytes(VNET_HDR_LEN) + p for p in pkts]
    gso = bytes([1, 1]) + bytes(VNET_HDR_LEN - 2) + PING  # a GSO packet: bulk
    got = urgent_of(vnet + [gso], 10**6, VNET_HDR_LEN)
    assert [bytes(p) for p in got] == [vnet[1], vnet[2], vnet[4]]


def test_urgent_frames_picks_whole_ipdata_frames():
    parts: list[bytes | memoryview] = []
    for p in (BULK, PING, BULK, ipv6(58, 56)):
        parts += [wire.frame_header(wire.S2C_IPDATA, len(p)), p]
    parts += [wire.super_header(len(PING) + VNET_HDR_LEN), bytes(VNET_HDR_LEN) + PING]
    got = urgent_frames(parts, 2, 10**6)
    assert got == [parts[2], parts[3], parts[6], parts[7]]
    assert urgent_frames(parts, 4, 10**6) == [parts[6], parts[7]]
    assert urgent_frames(parts, 0, 1) == [parts[2], parts[3]]
    header = struct.unpack(">HHI", got[0])
    assert header[1] == wire.S2C_IPDATA


def paced_then_ping(urgent_on: bool) -> tuple[int, list[tuple[int, int]]]:
    a, _b, oa, _ob = pair()
    if urgent_on:
        a.set_urgent_dup(0)  # KcpLink does so once unordered is agreed
    a.set_pacing(125_000, 2 * 1300)  # 1 Mbit/s, a burst of two segments
    a.tick(10_000)
    a.write_frames(b"".join(frame(BULK, i) for i in range(20)), True, True)
    a.tick(20_000)
    first = len(marks(oa))
    a.write_frames(frame(PING, 99), True, True)
    before = len(oa)
    a.tick(60_000)  # 40 ms at 1 Mbit/s: a few segments
    return first, marks(oa[before:])


def test_what_the_pacing_holds_waits_where_an_urgent_frame_can_pass_it():
    """Paced, only what the tokens let go leaves snd_queue: the rest (a queue's worth of
    bulk data) is not numbered yet, so a ping written later goes next."""
    first, later = paced_then_ping(True)
    assert 1 <= first <= 3
    assert later and later[0] == (first, 0xFF)
    assert len(later) < 20 - first  # the pacing still holds the rest
    # without urgent messages (the default: a Go peer), KCP numbers all of it at once
    first, later = paced_then_ping(False)
    assert later and later[0] == (first, 0)


def test_an_urgent_segment_goes_twice_when_asked():
    a, b, oa, ob = pair()
    a.set_urgent_dup(10)
    a.write_frames(frame(PING, 1), True, True)
    a.update(10)
    a.update(15)
    assert len(marks(oa)) == 1
    a.update(21)
    assert [sn for sn, _frg in marks(oa)] == [0, 0]
    assert a.urgent_dups == 1 and a.xmit == 0  # a copy, not a resend
    # the receiver takes one; the sender's ACK accounting is as for one
    for d in oa:
        b.input(d)
    b.update(30)
    assert seqs(b.recv_all()) == [1]
    for d in ob:
        a.input(d)
    assert a.waitsnd() == 0
    # bulk frames are never copied
    a.write_frames(frame(BULK, 2), True, True)
    for t in range(40, 200, 10):
        a.update(t)
    assert a.urgent_dups == 1

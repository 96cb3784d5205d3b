"""Out-of-order delivery on kcp:// (issue 16): messages of whole frames that the peer may
deliver ahead of a hole (``Kcp.write_frames`` / ``Kcp.set_unordered``), in the vendored
ikcp.c. Two control blocks joined in memory, with loss; no sockets."""

from __future__ import annotations

import random
import struct

from polevpn.kcp._ikcp import Kcp

from polevpn.proto import wire


def pair(unordered: bool = True) -> tuple[Kcp, Kcp, list[bytes], list[bytes]]:
    a, b = Kcp(0), Kcp(0)
    for k in (a, b):
        k.setmtu(1400)
        k.nodelay(1, 10, 2, 1)
        k.wndsize(1024, 1024)
    out_a: list[bytes] = []
    out_b: list[bytes] = []
    a.set_output(out_a.append)
    b.set_output(out_b.append)
    b.set_unordered(unordered)
    return a, b, out_a, out_b


def run(a: Kcp, b: Kcp, out_a: list[bytes], out_b: list[bytes], want: int, loss: float,
        seed: int = 7) -> bytes:
    rng = random.Random(seed)
    got = b""
    t = 0
    for _ in range(3000):
        t += 10
        a.update(t)
        b.update(t)
        for d in out_a:
            if rng.random() >= loss:
                b.input(d)
        out_a.clear()
        for d in out_b:
            a.input(d)
        out_b.clear()
        got += b.recv_all()
        if len(got) >= want:
            break
    return got


def seqs(stream: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(stream):
        length, command, seq = struct.unpack_from(">HHI", stream, pos)
        if command == wire.SUPER_IPDATA and length == wire.HEADER_LEN:
            length += seq
            seq = -1
        out.append(seq)
        pos += length
    assert pos == len(stream)
    return out


def frames(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [wire.encode_frame(wire.C2S_IPDATA, bytes([i % 256]) * rng.randint(20, 1500), i)
            for i in range(n)]


def test_frames_arrive_once_each_and_ahead_of_a_hole():
    a, b, oa, ob = pair()
    data = b"".join(frames(300))
    n, aligned = a.write_frames(data)
    assert aligned and n < 300  # small frames share a message
    got = run(a, b, oa, ob, len(data), loss=0.1)
    order = seqs(got)
    assert sorted(order) == list(range(300))  # every frame, once
    assert order != sorted(order)  # some went up ahead of a hole
    assert b.early_segments > 0


def test_a_receiver_that_did_not_agree_delivers_in_order():
    a, b, oa, ob = pair(unordered=False)
    data = b"".join(frames(300))
    a.write_frames(data)
    got = run(a, b, oa, ob, len(data), loss=0.1)
    assert got == data
    assert b.early_segments == 0


def test_no_loss_no_reordering():
    a, b, oa, ob = pair()
    data = b"".join(frames(200))
    a.write_frames(data)
    assert run(a, b, oa, ob, len(data), loss=0.0) == data


def test_frames_longer_than_the_mss_go_up_whole_ahead_of_a_hole():
    """A full-size IP packet (1400 bytes and the header) or a super-packet is longer than
    one segment: its fragments are marked so the receiver knows where it begins and
    when it has all of it, and it goes up whole, maybe before what was sent ahead."""
    a, b, oa, ob = pair()
    rng = random.Random(11)
    parts = []
    for i in range(200):
        if i % 20 == 0:
            body = bytes([i % 256]) * rng.randint(3000, 60000)  # a super-packet
            parts.append(wire.super_header(len(body)) + body)
        else:
            parts.append(wire.encode_frame(wire.C2S_IPDATA, bytes([i % 256]) * 1400, i))
    data = b"".join(parts)
    n, aligned = a.write_frames(data)
    assert aligned and n == 200  # one message each: none fits another beside it
    got = run(a, b, oa, ob, len(data), loss=0.05, seed=3)
    assert len(got) == len(data)
    assert sorted(seqs(got)) == sorted(seqs(data))
    for part in parts[::20]:
        assert part in got  # each super-packet whole
    order = [s for s in seqs(got) if s >= 0]
    assert order != sorted(order)
    assert b.early_segments > 0


def test_a_message_of_many_fragments_never_goes_up_in_part():
    """Fragments of one message that arrive out of order, with one missing: nothing of it
    goes up until the last one is there."""
    a, b, oa, ob = pair()
    body = bytes(range(256)) * 30  # 7.7 kB: six fragments
    frame = wire.super_header(len(body)) + body
    small = wire.encode_frame(wire.C2S_IPDATA, b"h" * 100, 1)
    a.write_frames(small)
    a.write_frames(frame)
    a.update(10)
    segs = list(oa)  # one datagram each: the small frame, then the fragments
    oa.clear()
    assert len(segs) == 7
    # the small frame and the second fragment lost
    for d in segs[1:2] + segs[3:]:
        b.input(d)
    b.update(10)
    assert b.recv_all() == b""  # five of six: nothing of it
    b.input(segs[2])
    assert b.recv_all() == frame  # whole, ahead of the small frame still missing
    b.input(segs[0])
    assert b.recv_all() == small


def test_bytes_that_are_not_whole_frames_go_in_order():
    a, b, oa, ob = pair()
    data = b"".join(frames(50))
    cut = data[: len(data) - 7]  # the last frame cut short
    n, aligned = a.write_frames(cut)
    assert not aligned
    rest = data[len(data) - 7:]
    a.write(rest)
    got = run(a, b, oa, ob, len(data), loss=0.1, seed=5)
    assert sorted(seqs(got)) == list(range(50))


# -- kcp.unordered "light": only packets nothing gains from having in order go so


def ipv4(proto: int, payload: int, frag: int = 0) -> bytes:
    """An IPv4 packet from 198.18.0.1 to 198.19.0.1: for TCP a 20-byte header (data
    offset 5) then ``payload`` bytes; for others ``payload`` bytes after the IP header."""
    body = (struct.pack(">HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
            if proto == 6 else b"")
    body += b"\x00" * payload
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, frag, 64, proto, 0,
                       bytes([198, 18, 0, 1]), bytes([198, 19, 0, 1])) + body


def ipv6(nh: int, payload: int) -> bytes:
    body = (struct.pack(">HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
            if nh == 6 else b"")
    body += b"\x00" * payload
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("20010db8000100000000000000000001")
    return struct.pack(">IHBB16s16s", 6 << 28, len(body), nh, 64, src, dst) + body


LIGHT = [ipv4(1, 56), ipv4(17, 1200), ipv4(6, 0), ipv6(58, 56), ipv6(17, 300), ipv6(6, 0)]
# TCP with payload, an IPv4 fragment of a TCP segment, an unknown protocol, an IPv6
# extension header, a TCP header cut short (data offset beyond the packet)
HEAVY = [ipv4(6, 1), ipv4(6, 1300), ipv4(6, 0, frag=0x00B9), ipv4(47, 100), ipv6(6, 1200),
         ipv6(0, 64), ipv4(6, 0)[:30]]


def marks(out: list[bytes]) -> list[tuple[int, int]]:
    """(sn, frg) of every data segment in KCP output buffers (cmd 81: push)."""
    got = []
    for buf in out:
        pos = 0
        while pos + 24 <= len(buf):
            _conv, cmd, frg, _wnd, _ts, sn, _una, length = struct.unpack_from(
                "<IBBHIIII", buf, pos)
            if cmd == 81:
                got.append((sn, frg))
            pos += 24 + length
    return got


def test_light_sends_only_light_packets_unordered():
    for packet, unordered in [(p, True) for p in LIGHT] + [(p, False) for p in HEAVY]:
        a, b, oa, ob = pair()
        frame = wire.encode_frame(wire.C2S_IPDATA, packet, 1)
        n, aligned = a.write_frames(frame, True)
        assert (n, aligned) == (1, True)
        a.update(10)
        (sn, frg), = marks(oa)
        assert (frg == 0xFF) is unordered, (packet.hex(), frg)
        assert frg in (0, 0xFF)
        # without "light", every frame goes unordered
        a, b, oa, ob = pair()
        a.write_frames(frame)
        a.update(10)
        assert marks(oa)[0][1] == 0xFF


def test_light_keeps_runs_of_a_kind_together_and_the_stream_whole():
    """Light and heavy frames interleaved: each run of one kind packs into messages of its
    own; without loss the stream arrives as written, with loss every frame arrives once,
    the heavy ones (TCP data) in their order."""
    rng = random.Random(3)
    kinds = [rng.random() < 0.5 for _ in range(400)]
    pkts = [rng.choice(LIGHT) if light else ipv4(6, rng.randint(1, 1400)) for light in kinds]
    data = b"".join(wire.encode_frame(wire.C2S_IPDATA, p, i) for i, p in enumerate(pkts))
    a, b, oa, ob = pair()
    n, aligned = a.write_frames(data, True)
    assert aligned and n < 400
    assert run(a, b, oa, ob, len(data), loss=0.0) == data
    a, b, oa, ob = pair()
    a.write_frames(data, True)
    got = run(a, b, oa, ob, len(data), loss=0.1)
    order = seqs(got)
    assert sorted(order) == list(range(400))
    heavy = [s for s in order if not kinds[s]]
    assert heavy == sorted(heavy)  # TCP data never overtakes TCP data
    light = [s for s in order if kinds[s]]
    assert light != sorted(light) or order != sorted(order)
    assert b.early_segments > 0


def test_light_super_packets_and_control_frames_stay_in_order():
    sup = wire.super_header(200) + b"\x00" * 200
    ctl = wire.encode_frame(wire.Command.HEART_BEAT, b"", 5)
    for frame in (sup, ctl):
        a, b, oa, ob = pair()
        assert a.write_frames(frame, True)[1]
        a.update(10)
        assert [frg for _sn, frg in marks(oa)] == [0]

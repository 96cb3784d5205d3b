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

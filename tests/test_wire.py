"""Frame codec: exact Go PoleVPN bytes, round trips, arbitrary splitting, hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polevpn.proto import messages, wire
from polevpn.proto.wire import HEADER_LEN, MAX_BODY, FrameDecoder, ProtocolError, encode_frame

# Captured from the Go PoleVPN gateway and router (see docs/protocol.md).
GO_AUTH = bytes.fromhex("0018 0000 00000000") + b'{"key":"123456"}'
GO_REGISTER = (
    bytes.fromhex("004d 0001 00000000")
    + b'{"gateway":"169.254.0.1","key":"123456","network":["198.18.10.0/24"]}'
)
GO_HEARTBEAT = bytes.fromhex("0008 0004 00000000")


def go_ok_reply(command: int, seq: int) -> bytes:
    return bytes.fromhex("000a") + command.to_bytes(2, "big") + seq.to_bytes(4, "big") + b"{}"


def as_tuples(frames: list[wire.Frame]) -> list[tuple[int, int, bytes]]:
    return [(c, s, bytes(b)) for c, s, b in frames]


# ---- exact bytes ----------------------------------------------------------------------------


def test_command_numbers_match_polevpn() -> None:
    assert (wire.AUTH, wire.REGISTER, wire.S2C_IPDATA, wire.C2S_IPDATA, wire.HEART_BEAT) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert HEADER_LEN == 8
    assert MAX_BODY == 0xFFFF - 8


def test_go_auth_bytes() -> None:
    assert encode_frame(wire.AUTH, messages.encode_auth("123456"), 0) == GO_AUTH
    assert len(GO_AUTH) == 0x18


def test_go_register_bytes() -> None:
    body = messages.encode_register("169.254.0.1", "123456", ["198.18.10.0/24"])
    assert encode_frame(wire.REGISTER, body, 0) == GO_REGISTER
    assert len(GO_REGISTER) == 0x4D


def test_go_heartbeat_bytes() -> None:
    assert encode_frame(wire.HEART_BEAT) == GO_HEARTBEAT
    assert encode_frame(wire.HEART_BEAT, b"", 0) == GO_HEARTBEAT
    assert wire.frame_header(wire.HEART_BEAT, 0, 0) == GO_HEARTBEAT


@pytest.mark.parametrize("seq", [0, 1, 7, 0x01020304, 0xFFFFFFFF])
@pytest.mark.parametrize("command", [wire.AUTH, wire.REGISTER])
def test_go_success_reply_bytes(command: int, seq: int) -> None:
    expected = go_ok_reply(command, seq)
    assert expected[:2] == b"\x00\x0a"
    assert encode_frame(command, messages.OK_BODY, seq) == expected


def test_frame_header_matches_encode_frame() -> None:
    body = bytes(range(200))
    assert wire.frame_header(wire.C2S_IPDATA, len(body), 99) + body == encode_frame(
        wire.C2S_IPDATA, body, 99
    )


def test_decode_go_stream() -> None:
    stream = GO_AUTH + GO_REGISTER + GO_HEARTBEAT + go_ok_reply(wire.AUTH, 5)
    frames = as_tuples(FrameDecoder().feed(stream))
    assert frames == [
        (wire.AUTH, 0, b'{"key":"123456"}'),
        (wire.REGISTER, 0, GO_REGISTER[8:]),
        (wire.HEART_BEAT, 0, b""),
        (wire.AUTH, 5, b"{}"),
    ]
    assert messages.parse_auth(frames[0][2]).key == "123456"


def test_encode_accepts_bytearray_and_memoryview() -> None:
    body = b"\x45\x00payload"
    expected = encode_frame(wire.S2C_IPDATA, body, 3)
    assert encode_frame(wire.S2C_IPDATA, bytearray(body), 3) == expected
    assert encode_frame(wire.S2C_IPDATA, memoryview(body), 3) == expected


# ---- limits -----------------------------------------------------------------------------


def test_max_body_encodes_and_decodes() -> None:
    body = bytes([0xAB]) * MAX_BODY
    frame = encode_frame(wire.C2S_IPDATA, body, 1)
    assert frame[:2] == b"\xff\xff"
    dec = FrameDecoder()
    assert dec.feed(frame[:1000]) == []
    assert dec.buffered == 1000
    frames = dec.feed(frame[1000:])
    assert as_tuples(frames) == [(wire.C2S_IPDATA, 1, body)]
    assert dec.buffered == 0


@pytest.mark.parametrize("size", [MAX_BODY + 1, MAX_BODY + 100, 0x10000])
def test_body_over_max_rejected(size: int) -> None:
    with pytest.raises(ValueError):
        encode_frame(wire.C2S_IPDATA, bytes(size))
    # the unchecked hot-path helper still refuses to build a wrapped-around length
    with pytest.raises((ValueError, struct.error)):
        wire.frame_header(wire.C2S_IPDATA, size)


@pytest.mark.parametrize("length", range(HEADER_LEN))
def test_length_shorter_than_header_rejected(length: int) -> None:
    bad = length.to_bytes(2, "big") + b"\x00\x04" + b"\x00\x00\x00\x00"
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(bad)
    # after a good frame in the same chunk
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(GO_HEARTBEAT + bad)


@pytest.mark.parametrize("length", range(HEADER_LEN))
@pytest.mark.parametrize("split", range(1, HEADER_LEN))
def test_length_shorter_than_header_rejected_when_split(length: int, split: int) -> None:
    bad = length.to_bytes(2, "big") + b"\x00\x04" + b"\x00\x00\x00\x00"
    dec = FrameDecoder()
    # the header is incomplete: nothing to judge yet
    assert dec.feed(GO_HEARTBEAT + bad[:split]) == [(wire.HEART_BEAT, 0, b"")]
    with pytest.raises(ProtocolError):
        dec.feed(bad[split:])


@pytest.mark.parametrize("split", range(1, HEADER_LEN))
def test_short_length_rejected_byte_by_byte_after_pending_frame(split: int) -> None:
    # a frame finished from the pending buffer, followed by a bad header split in two
    bad = b"\x00\x03\x00\x00\x00\x00\x00\x00"
    dec = FrameDecoder()
    assert dec.feed(GO_AUTH[:5]) == []
    with pytest.raises(ProtocolError):
        dec.feed(GO_AUTH[5:] + bad[:split])
        dec.feed(bad[split:])


# ---- incremental decoding ---------------------------------------------------------------


def test_byte_by_byte() -> None:
    stream = GO_AUTH + GO_HEARTBEAT + GO_REGISTER
    dec = FrameDecoder()
    frames: list[wire.Frame] = []
    for i in range(len(stream)):
        frames += dec.feed(stream[i : i + 1])
    assert as_tuples(frames) == as_tuples(FrameDecoder().feed(stream))
    assert dec.buffered == 0


def test_empty_feed_is_harmless() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.feed(GO_AUTH[:3]) == []
    assert dec.feed(b"") == []
    assert dec.buffered == 3
    assert as_tuples(dec.feed(GO_AUTH[3:])) == [(wire.AUTH, 0, GO_AUTH[8:])]


def test_bodies_stay_valid_after_later_feeds() -> None:
    dec = FrameDecoder()
    first = encode_frame(wire.S2C_IPDATA, b"first-body", 1)
    second = encode_frame(wire.S2C_IPDATA, b"second-body", 2)
    held = dec.feed(first[:4])
    held += dec.feed(first[4:] + second[:10])
    held += dec.feed(second[10:] + GO_HEARTBEAT)
    assert as_tuples(held) == [
        (wire.S2C_IPDATA, 1, b"first-body"),
        (wire.S2C_IPDATA, 2, b"second-body"),
        (wire.HEART_BEAT, 0, b""),
    ]


frames_st = st.lists(
    st.tuples(
        st.integers(0, 0xFFFF).filter(lambda c: c != wire.SUPER_IPDATA),
        st.integers(0, 0xFFFFFFFF),
        st.one_of(st.binary(max_size=64), st.binary(min_size=200, max_size=2000)),
    ),
    max_size=12,
)


def any_frame(command: int, seq: int, body: bytes) -> bytes:
    if command == wire.SUPER_IPDATA:
        return wire.super_header(len(body)) + body
    return encode_frame(command, body, seq)


# super-packet frames among ordinary ones; their seq position is the body length
mixed_st = st.lists(
    st.one_of(
        frames_st.map(lambda fs: fs[:1]),
        st.binary(max_size=70000).map(lambda b: [(wire.SUPER_IPDATA, len(b), b)]),
    ),
    max_size=6,
).map(lambda groups: [f for g in groups for f in g])


@given(frames_st)
def test_round_trip_in_one_chunk(frames: list[tuple[int, int, bytes]]) -> None:
    stream = b"".join(encode_frame(c, b, s) for c, s, b in frames)
    dec = FrameDecoder()
    assert as_tuples(dec.feed(stream)) == frames
    assert dec.buffered == 0


@given(frames_st, st.data())
def test_round_trip_split_anywhere(
    frames: list[tuple[int, int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(c, b, s) for c, s, b in frames)
    assert_decodes_split(stream, frames, data, 20)


def assert_decodes_split(
    stream: bytes, frames: list[tuple[int, int, bytes]], data: st.DataObject, max_cuts: int
) -> None:
    """``stream`` cut at drawn places decodes to exactly ``frames``, nothing left over."""
    cuts = sorted(
        data.draw(st.lists(st.integers(0, len(stream)), max_size=max_cuts), label="cuts")
    )
    bounds = [0, *cuts, len(stream)]
    dec = FrameDecoder()
    out: list[wire.Frame] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        out += dec.feed(stream[a:b])
    assert as_tuples(out) == frames
    assert dec.buffered == 0


@given(mixed_st, st.data())
def test_super_frames_round_trip_split_anywhere(
    frames: list[tuple[int, int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(any_frame(*f) for f in frames)
    assert_decodes_split(stream, frames, data, 10)


def test_super_header_bytes() -> None:
    # length field 8 (header alone), command 16, body length where the seq would be
    assert wire.super_header(65546) == bytes.fromhex("0008 0010 0001000a")
    assert wire.SUPER_IPDATA == 16


def test_largest_super_frame_decodes() -> None:
    body = bytes(range(256)) * (wire.MAX_SUPER_BODY // 256) + bytes(wire.MAX_SUPER_BODY % 256)
    (frame,) = FrameDecoder().feed(wire.super_header(len(body)) + body)
    assert frame[0] == wire.SUPER_IPDATA and bytes(frame[2]) == body


def test_super_header_refuses_oversized_body() -> None:
    with pytest.raises(ValueError):
        wire.super_header(wire.MAX_SUPER_BODY + 1)


@pytest.mark.parametrize("split", [0, 3, 8])
def test_oversized_super_frame_is_a_protocol_error(split: int) -> None:
    header = struct.pack(">HHI", HEADER_LEN, wire.SUPER_IPDATA, wire.MAX_SUPER_BODY + 1)
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        if split:
            dec.feed(header[:split])
        dec.feed(header[split:] + bytes(100))


def test_other_commands_keep_the_16_bit_length() -> None:
    # a heartbeat is a header-only frame too: its seq is a sequence number, not a length
    stream = GO_HEARTBEAT.replace(b"\0\0\0\0", b"\0\0\1\0") + GO_HEARTBEAT
    assert [c for c, _, _ in FrameDecoder().feed(stream)] == [wire.HEART_BEAT] * 2


def reference_decode(stream: bytes) -> tuple[list[tuple[int, int, bytes]], bool, int]:
    """(frames, whether a too-short length appears, bytes left over) by the spec, naively."""
    frames = []
    pos = 0
    while len(stream) - pos >= HEADER_LEN:
        length = int.from_bytes(stream[pos : pos + 2], "big")
        command = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        seq = int.from_bytes(stream[pos + 4 : pos + 8], "big")
        if length < HEADER_LEN:
            return frames, True, 0
        if command == wire.SUPER_IPDATA and length == HEADER_LEN:
            if seq > wire.MAX_SUPER_BODY:
                return frames, True, 0
            length += seq
        if pos + length > len(stream):
            break
        frames.append((command, seq, stream[pos + 8 : pos + length]))
        pos += length
    return frames, False, len(stream) - pos


@given(st.binary(max_size=400), st.data())
def test_garbage_in_chunks_yields_frames_or_protocol_error(
    garbage: bytes, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(garbage)), max_size=30), label="cuts"))
    bounds = [0, *cuts, len(garbage)]
    expected, expect_error, leftover = reference_decode(garbage)
    dec = FrameDecoder()
    out: list[wire.Frame] = []
    raised = False
    for a, b in zip(bounds, bounds[1:], strict=False):
        try:
            out += dec.feed(garbage[a:b])
        except ProtocolError:
            raised = True
            break
    got = as_tuples(out)
    assert raised == expect_error
    if raised:
        # frames from the chunk that held the bad header may be lost, never invented
        assert got == expected[: len(got)]
    else:
        assert got == expected
        assert dec.buffered == leftover


@given(st.binary(min_size=2, max_size=64))
def test_garbage_with_plausible_lengths(tail: bytes) -> None:
    # garbage whose length fields are small, so frames actually complete in the stream
    stream = b"".join(bytes([0, 8 + (b % 12)]) + bytes(8 + (b % 12) - 2) for b in tail)
    expected, expect_error, leftover = reference_decode(stream)
    dec = FrameDecoder()
    out: list[wire.Frame] = []
    try:
        for i in range(0, len(stream), 3):
            out += dec.feed(stream[i : i + 3])
    except ProtocolError:
        assert expect_error
    else:
        assert not expect_error
        assert as_tuples(out) == expected
        assert dec.buffered == leftover

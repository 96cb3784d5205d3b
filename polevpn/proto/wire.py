"""PoleVPN frame codec: bytes in, frames out, and frames to bytes. No I/O.

A frame is an 8-byte big-endian header ``[u16 length incl. header][u16 command][u32 seq]``
followed by the body. The decoder is the only place that trusts nothing about its input.

``SUPER_IPDATA`` (ours, sent only to a peer that negotiated it in AUTH) carries a super-packet
of up to 64 KiB, which the 16-bit length cannot describe: its length field is 8 (the header
alone) and the u32 in the seq position is the body length. The body is a 10-byte virtio-net
header followed by the IP packet (docs/protocol.md, section 15).
"""

from __future__ import annotations

import struct
from enum import IntEnum

HEADER = struct.Struct(">HHI")
HEADER_LEN = HEADER.size
MAX_FRAME = 0xFFFF
MAX_BODY = MAX_FRAME - HEADER_LEN
# virtio-net header + the largest IPv6 packet without jumbograms (40 + 65535), rounded up
MAX_SUPER_BODY = 0x10000 + 64


class Command(IntEnum):
    AUTH = 0
    REGISTER = 1
    S2C_IPDATA = 2
    C2S_IPDATA = 3
    HEART_BEAT = 4
    SUPER_IPDATA = 16
    # direct paths between gateways (docs/protocol.md section 18, polevpn.direct), only
    # on a connection that agreed "direct" in AUTH
    DIRECT_ENDPOINT = 32
    DIRECT_CANDIDATES = 33
    DIRECT_OFFER = 34
    DIRECT_REVOKE = 35
    DIRECT_STATUS = 36
    DIRECT_PROOF = 37


AUTH = int(Command.AUTH)
REGISTER = int(Command.REGISTER)
S2C_IPDATA = int(Command.S2C_IPDATA)
C2S_IPDATA = int(Command.C2S_IPDATA)
HEART_BEAT = int(Command.HEART_BEAT)
SUPER_IPDATA = int(Command.SUPER_IPDATA)

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


class ProtocolError(Exception):
    """The peer sent bytes that cannot be a frame; the connection must be closed."""


class FrameTooLong(ProtocolError):
    """A frame longer than the protocol allows (counted apart: it is how floods look)."""


def encode_frame(command: int, body: bytes | bytearray | memoryview = b"", seq: int = 0) -> bytes:
    n = len(body)
    if n > MAX_BODY:
        raise ValueError(f"frame body of {n} bytes exceeds {MAX_BODY}")
    return _pack(n + HEADER_LEN, command, seq) + bytes(body)


def frame_header(command: int, body_len: int, seq: int = 0) -> bytes:
    """Header alone, so the data path can write header and payload without joining them."""
    return _pack(body_len + HEADER_LEN, command, seq)


def super_header(body_len: int) -> bytes:
    """Header of a SUPER_IPDATA frame whose body (virtio-net header + packet) follows."""
    if body_len > MAX_SUPER_BODY:
        raise ValueError(f"super-packet body of {body_len} bytes exceeds {MAX_SUPER_BODY}")
    return _pack(HEADER_LEN, SUPER_IPDATA, body_len)


def fitting(parts: list[bytes | memoryview], supers: int, room: int) -> tuple[int, int]:
    """How many of ``parts`` (frame headers and bodies, alternating: whole frames) fit in
    ``room`` bytes, and how many of those are SUPER_IPDATA frames (``supers`` of ``parts``
    are). For the data path's queue limits: what does not fit is dropped and counted."""
    used = kept = 0
    kept_supers = 0
    for i in range(0, len(parts), 2):
        n = len(parts[i]) + len(parts[i + 1])
        if used + n > room:
            break
        used += n
        kept = i + 2
        if supers and parts[i][2:4] == b"\0\x10":
            kept_supers += 1
    return kept, kept_supers


def _frame_length(length: int, command: int, seq: int) -> int:
    """Total length of the frame whose header was just read, or ProtocolError."""
    if length < HEADER_LEN:
        raise ProtocolError(f"frame length {length} is shorter than the header")
    if command == SUPER_IPDATA and length == HEADER_LEN:
        if seq > MAX_SUPER_BODY:
            raise FrameTooLong(f"super-packet of {seq} bytes exceeds {MAX_SUPER_BODY}")
        return HEADER_LEN + seq
    return length


Frame = tuple[int, int, memoryview]
"""(command, seq, body). The body is a view into the bytes passed to ``feed``."""


class FrameDecoder:
    """Incremental frame parser for a byte stream.

    ``feed`` returns complete frames; a partial frame at the end is kept for the next call.
    Bodies are memoryviews over immutable bytes, so callers may hold on to them.
    """

    __slots__ = ("_pending", "_need")

    def __init__(self) -> None:
        self._pending = bytearray()
        # bytes still needed to finish the pending frame (0 when nothing is pending)
        self._need = 0

    @property
    def buffered(self) -> int:
        return len(self._pending)

    @property
    def pending_length(self) -> int:
        """The whole length of the partial frame kept for the next ``feed`` (as far as its
        header, once complete, says), or 0."""
        return len(self._pending) + self._need if self._pending else 0

    def clear(self) -> None:
        """Drop the partial frame (the connection is closing: free its memory now)."""
        self._pending = bytearray()
        self._need = 0

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        pos = 0
        end = len(data)
        if self._pending:
            pos = self._complete_pending(data, frames)
            if self._pending:
                return frames
        mv = memoryview(data)
        append = frames.append
        while end - pos >= HEADER_LEN:
            length, command, seq = _unpack_from(data, pos)
            if length <= HEADER_LEN:
                # header-only control frames, super-packets and garbage take the slow path
                length = _frame_length(length, command, seq)
            stop = pos + length
            if stop > end:
                break
            append((command, seq, mv[pos + HEADER_LEN : stop]))
            pos = stop
        if pos < end:
            self._pending += mv[pos:]
            self._need = self._pending_need()
        return frames

    def _pending_need(self) -> int:
        p = self._pending
        if len(p) < HEADER_LEN:
            return HEADER_LEN - len(p)
        return _frame_length(*_unpack_from(p, 0)) - len(p)

    def _complete_pending(self, data: bytes, frames: list[Frame]) -> int:
        """Finish the pending frame from the head of ``data``; return bytes consumed."""
        pos = 0
        end = len(data)
        while True:
            take = min(self._need, end - pos)
            self._pending += data[pos : pos + take]
            pos += take
            # once the header is complete this re-reads the real frame length
            self._need = self._pending_need()
            if self._need == 0:
                _, command, seq = _unpack_from(self._pending, 0)
                frame = bytes(self._pending)
                self._pending.clear()
                frames.append((command, seq, memoryview(frame)[HEADER_LEN:]))
                return pos
            if pos == end:
                return pos

"""UDP GSO batching: datagrams arrive whole, in order, and as ordinary datagrams."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from polevpn.io.udp_batch import MAX_SEGMENTS, UdpBatchSender


class Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.event = asyncio.Event()
        self.want = 0

    def datagram_received(self, data: bytes, addr) -> None:
        self.got.append(data)
        if len(self.got) >= self.want:
            self.event.set()


async def _exchange(datagrams: list[bytes], connected: bool) -> tuple[list[bytes], UdpBatchSender]:
    loop = asyncio.get_running_loop()
    sink = Sink()
    sink.want = len(datagrams)
    rx, _ = await loop.create_datagram_endpoint(lambda: sink, local_addr=("127.0.0.1", 0))
    rx.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    dest = rx.get_extra_info("sockname")
    if connected:
        tx, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=dest)
    else:
        tx, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
        )
    sender = UdpBatchSender(tx)
    try:
        sender.send(datagrams, None if connected else dest)
        await asyncio.wait_for(sink.event.wait(), 5)
    finally:
        sender.close()
        tx.close()
        rx.close()
    return sink.got, sender


def run(datagrams: list[bytes], connected: bool = False) -> tuple[list[bytes], UdpBatchSender]:
    return uvloop.run(_exchange(datagrams, connected))


def numbered(sizes: list[int]) -> list[bytes]:
    return [bytes([i % 256]) * n for i, n in enumerate(sizes)]


@pytest.mark.parametrize("connected", [False, True], ids=["server", "client"])
def test_a_window_of_equal_segments_goes_in_few_calls(connected: bool) -> None:
    sent = numbered([1200] * 150 + [700])
    got, sender = run(sent, connected)
    assert got == sent
    assert sender.batches >= 3 and sender.batched_datagrams == len(sent)


def test_mixed_sizes_split_into_valid_runs() -> None:
    # a shorter datagram ends a run; a longer one starts a new run
    sizes = [1000, 1000, 500, 1000, 1000, 1000, 60, 60, 1400, 1, 1400]
    sent = numbered(sizes)
    got, sender = run(sent)
    assert got == sent
    # runs [1000 1000 500] [1000 1000 1000 60] [60] [1400 1] [1400]; single ones go plainly
    assert (sender.batches, sender.batched_datagrams) == (3, 9)


def test_runs_respect_the_segment_and_byte_limits() -> None:
    sent = numbered([100] * (MAX_SEGMENTS * 2 + 1) + [1400] * 60)
    got, sender = run(sent)
    assert got == sent
    # 64 + 64 + 1 small ones; 60 * 1400 bytes need two runs under 65000 bytes
    assert sender.batches == 4 and sender.batched_datagrams == MAX_SEGMENTS * 2 + 60


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLEVPN_NO_UDP_GSO", "1")
    sent = numbered([1200] * 20)
    got, sender = run(sent)
    assert got == sent and sender.batches == 0 and not sender.gso


class _Recorder(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.errors: list[Exception] = []

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


class _BareTransport:
    """A connected socket the loop does not watch, so only the batched send can see its
    pending error: the race the real transport loses now and then, made certain."""

    def __init__(self, sock: socket.socket, protocol: asyncio.DatagramProtocol) -> None:
        self.sock = sock
        self.protocol = protocol

    def get_extra_info(self, name: str):
        return self.sock if name == "socket" else None

    def get_write_buffer_size(self) -> int:
        return 0

    def get_protocol(self) -> asyncio.DatagramProtocol:
        return self.protocol

    def sendto(self, data: bytes, addr=None) -> None:
        self.sock.send(data)


def test_a_refused_batch_reaches_the_protocol() -> None:
    """The ICMP port unreachable that a batch consumes is how a gateway learns at once
    that the router restarted; swallowed, it waited for KCP's silence timeout instead."""

    async def main() -> list[Exception]:
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind(("127.0.0.1", 0))
        dest = closed.getsockname()
        closed.close()  # nobody listens there now
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(dest)
        sock.setblocking(False)
        recorder = _Recorder()
        sender = UdpBatchSender(_BareTransport(sock, recorder))  # type: ignore[arg-type]
        try:
            if not sender.gso:
                pytest.skip("UDP GSO unavailable")
            sock.send(b"x")  # the kernel answers on loopback before send returns
            sender.send(numbered([500] * 4))
            assert sender.send_errors == 1
            await asyncio.sleep(0)
            return recorder.errors
        finally:
            sender.close()
            sock.close()

    errors = uvloop.run(main())
    assert len(errors) == 1 and isinstance(errors[0], ConnectionRefusedError)

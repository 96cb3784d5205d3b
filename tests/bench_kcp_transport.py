#!/usr/bin/env python3
"""kcp:// through the asyncio adapter on loopback: ``kcp_transport.connect`` to a
``KcpServer``, one process, both ends. The gateway side writes 1,300-byte messages (a
tunnel's IP packets) in batches of 64 while the transport is not paused; the router side
counts what arrives. The figure is CPU seconds of this process per GB delivered (steadier
than Mbit/s on a shared machine), FEC off and adaptive.

``--memory``: once the handshake is done on loopback, the two transports' datagrams go to
each other in memory (delivered at once, read-side work still settled once per loop pass):
no socket, no loss, so the figure is the Python data path alone and far steadier.

Not a pytest test. ``python tests/bench_kcp_transport.py [--mb MB] [--repeat N] [--memory]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polevpn.config import FecParams, KcpParams
from polevpn.io import kcp_transport
from polevpn.kcp import dtls
from polevpn.keygen import generate

MSG = 1300
BATCH = 64


class Sink(asyncio.Protocol):
    def __init__(self, started: float) -> None:
        self.got = 0
        self.done: asyncio.Future[None] | None = None
        self.want = 0

    def connection_made(self, transport) -> None:
        transport.authenticated = True
        SINKS.append(self)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.done is not None and self.got >= self.want and not self.done.done():
            self.done.set_result(None)


SINKS: list[Sink] = []


class Writer(asyncio.Protocol):
    def __init__(self) -> None:
        self.can = asyncio.Event()
        self.can.set()

    def pause_writing(self) -> None:
        self.can.clear()

    def resume_writing(self) -> None:
        self.can.set()


def in_memory(client: kcp_transport.KcpTransport, server: kcp_transport.KcpServer) -> None:
    """Short-circuit the sockets of an established pair (see the module docstring)."""
    ((addr, st),) = server.sessions.items()

    def to_server(datagrams: list[bytes]) -> None:
        for d in datagrams:
            server.datagram_received(d, addr)

    def to_client(datagrams: list[bytes]) -> None:
        for d in datagrams:
            client.datagram_received(d)

    client._send_many = to_server
    st._send_many = to_client


async def run(keys, fec_mode: str, mb: int, memory: bool) -> float:
    params = KcpParams(fec=FecParams(mode=fec_mode))
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    loop = asyncio.get_running_loop()
    server = kcp_transport.KcpServer(ctx, jar, params, Sink, handshake_timeout=5.0)
    udp, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
    port = udp.get_extra_info("sockname")[1]
    verify = dtls.Verification(insecure=True)
    SINKS.clear()
    w = Writer()
    t = await kcp_transport.connect(
        w, "127.0.0.1", port, dtls.client_context(verify), verify, params, server.pool, 5.0
    )
    while not SINKS:
        await asyncio.sleep(0.01)
    sink = SINKS[0]
    if memory:
        in_memory(t, server)
    want = mb * 1_000_000
    sink.want = want
    sink.done = loop.create_future()
    msg = bytes(MSG)
    sent = 0
    c0 = time.process_time()
    while sent < want:
        await w.can.wait()
        for _ in range(BATCH):
            t.write(msg)
        sent += MSG * BATCH
        await asyncio.sleep(0)
    await asyncio.wait_for(sink.done, 120)
    cpu = time.process_time() - c0
    t.close()
    udp.close()
    await asyncio.sleep(0.05)
    return cpu / (sink.got / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory", action="store_true")
    args = ap.parse_args()
    keys = generate(Path(tempfile.mkdtemp(prefix="benchkcp")))
    for mode in ("off", "adaptive"):
        runs = [asyncio.run(run(keys, mode, args.mb, args.memory)) for _ in range(args.repeat)]
        print(
            f"fec {mode:8}: CPU s/GB best {min(runs):.2f} median {statistics.median(runs):.2f}"
            f" ({args.repeat} x {args.mb} MB{', in memory' if args.memory else ''})"
        )


if __name__ == "__main__":
    main()

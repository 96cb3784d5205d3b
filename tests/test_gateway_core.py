"""The gateway orchestrator against in-memory fakes: a TUN (polevpn.io.tun.Tun) and routers.

Everything of the gateway is real but the two ends: ``FakeTun`` stands in for the device
and ``FakeServer`` for each route server (``FakeGateway.net``), each connection a
``FakeTransport`` that runs a real ``ServerSession`` and accepts every REGISTER. No
namespaces, no root; loopback sockets only where the kernel's behaviour is the point
(a link's send queue, the kcp:// client's socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest
from OpenSSL import SSL

from polevpn.config import GatewayConfig, KcpParams, LinkConfig, RouteServer, load_gateway_config
from polevpn.gateway import gateway as gwmod
from polevpn.gateway.gateway import Gateway, RouterLink
from polevpn.host.hostsetup import HostSetup
from polevpn.io import kcp_transport, linksock
from polevpn.io.tun import TunDevice
from polevpn.kcp import dtls
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.proto import wire
from polevpn.proto.messages import FEATURE_MULTILINK, FEATURE_SUPER, LinkRequest
from polevpn.proto.session import RegisterRequested, ServerSession

A = "tls://198.19.0.1:443"
B = "tls://198.19.0.2:443"
C = "tls://198.19.0.3:443"


def udp4(src: str, dst: str, payload: bytes = b"x" * 20) -> bytes:
    """An IPv4 UDP packet (checksums zero: nothing here checks them)."""
    total = 20 + 8 + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return ip + struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0) + payload


LAN_PACKET = udp4("198.18.10.5", "198.18.20.5")  # this office -> the far one
FAR_PACKET = udp4("198.18.20.5", "198.18.10.5")  # the far office -> this one


class FakeTun:
    """The TUN as the gateway sees it; a socketpair end gives the loop a readable fd."""

    name = "fake0"
    vnet_hdr = False
    offloads = 0

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self.inbound: deque[bytes] = deque()  # from the LAN, for the gateway to read
        self.written: list[bytes] = []  # what the gateway wrote towards the LAN
        self.reads = 0
        self.read_error: OSError | None = None
        self.write_error: OSError | None = None
        self.write_errors = 0
        self.write_dropped = 0
        self.closed = False

    def fileno(self) -> int:
        return self._r.fileno()

    def inject(self, *packets: bytes) -> None:
        """Packets arriving from the LAN: the fd becomes readable."""
        self.inbound.extend(packets)
        self._w.send(b"!")

    def read_batch(self, limit: int = 64, max_bytes: int = 1 << 20) -> list[bytes]:
        self.reads += 1
        if self.read_error is not None:
            raise self.read_error
        with contextlib.suppress(BlockingIOError):
            self._r.recv(4096)
        out = []
        while self.inbound and len(out) < limit:
            out.append(self.inbound.popleft())
        return out

    def write(self, packet: bytes | memoryview) -> None:
        if self.write_error is not None:
            raise self.write_error
        self.written.append(bytes(packet))

    def write_super(self, buf: bytes | memoryview) -> None:
        self.write(buf)

    def close(self) -> None:
        self.closed = True
        self._r.close()
        self._w.close()


class FakeServer:
    """One route server: refuses while down; with ``gate`` set it answers REGISTER only once
    the gate is done."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.up = True
        self.connect_error: BaseException | None = None
        self.gate: asyncio.Future | None = None
        self.attempts = 0
        self.connections: list[FakeTransport] = []
        # takes what it is sent and answers nothing: a cut path
        self.mute = False

    def received(self) -> list[bytes]:
        return [p for t in self.connections for p in t.packets]


class FakeSocket:
    """The transport's socket: the options set on it."""

    type = socket.SOCK_STREAM

    def __init__(self) -> None:
        self.options: dict[tuple[int, int], bytes] = {}

    def setsockopt(self, level: int, name: int, value: bytes) -> None:
        self.options[level, name] = value

    @property
    def discards(self) -> bool:
        """SO_LINGER 0: closing resets and drops the kernel's send queue."""
        return self.options.get((socket.SOL_SOCKET, socket.SO_LINGER)) == struct.pack("ii", 1, 0)


class FakeTransport:
    """A connection to a FakeServer, in the shape of an asyncio transport."""

    def __init__(
        self,
        protocol: RouterLink,
        server: FakeServer,
        features: frozenset[str] = frozenset({FEATURE_SUPER, FEATURE_MULTILINK}),
    ) -> None:
        self.protocol = protocol
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.session = ServerSession(lambda key: True, time.monotonic(), features)
        self.packets: list[bytes] = []
        self.closing = False
        self.aborted = False
        self.sock = FakeSocket()
        server.connections.append(self)
        protocol.connection_made(self)

    # what the gateway calls
    def write(self, data: bytes | memoryview) -> None:
        if self.closing or self.server.mute:
            return
        packets, events = self.session.receive(bytes(data), time.monotonic())
        self.packets += [bytes(p) for p in packets]
        for ev in events:
            if isinstance(ev, RegisterRequested):
                self._register(ev.seq)
        self._flush()

    def close(self) -> None:
        self._lose()

    def abort(self) -> None:
        self.aborted = True
        self._lose()

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.sock if name == "socket" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    # what the test calls
    def send_packets(self, *packets: bytes) -> None:
        """Packets from the router to the gateway."""
        data = b"".join(wire.encode_frame(wire.S2C_IPDATA, p) for p in packets)
        self.loop.call_soon(self._deliver, data)

    def _register(self, seq: int) -> None:
        gate = self.server.gate
        if gate is None or gate.done():
            self.session.accept_register(seq)
            return

        def accept(_: object) -> None:
            self.session.accept_register(seq)
            self._flush()

        gate.add_done_callback(accept)

    def _flush(self) -> None:
        out = self.session.data_to_send()
        if out:
            self.loop.call_soon(self._deliver, b"".join(out))

    def _deliver(self, data: bytes) -> None:
        if not self.closing:
            self.protocol.data_received(data)

    def _lose(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.loop.call_soon(self.protocol.connection_lost, None)


class FakeGateway(Gateway):
    """A Gateway whose TUN, host and route servers are the fakes above."""

    def __init__(self, cfg: GatewayConfig, proc_sys: Path) -> None:
        super().__init__(cfg)
        self.net = {s.url: FakeServer(s.url) for s in cfg.route_servers}
        self.proc_sys = proc_sys
        self.fake_tun = FakeTun()

    def open_tun(self) -> None:
        self.tun = self.fake_tun

    async def configure_tun(self) -> None:
        pass

    def host_setup(self) -> HostSetup:
        # forwarding on a private /proc/sys: whether run() undoes its host changes shows
        return HostSetup(self.cfg.tun_name, forwarding=True, proc_sys=self.proc_sys)

    async def _connect_once(
        self, server: RouteServer, via: LinkConfig | None, request: LinkRequest | None
    ) -> RouterLink:
        fake = self.net.setdefault(server.url, FakeServer(server.url))
        fake.attempts += 1
        await asyncio.sleep(0)
        if fake.connect_error is not None:
            raise fake.connect_error
        if not fake.up:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "connection refused")
        link = RouterLink(self, server, request)
        FakeTransport(link, fake)
        return link


def write_config(path: Path, **fields: object) -> Path:
    obj = {
        "route_servers": [A, B],
        "key": "123456",
        "gateway": "169.254.0.1",
        "insecure_skip_verify": True,
        "local_networks": ["198.18.10.0/24"],
        "route_networks": ["198.18.20.0/24"],
        "acls": ["198.18.20.0/24"],
        "preferred_retry_interval": 0.1,
        # the link loop wakes every heartbeat_interval / 2: probes every 0.1 s
        "heartbeat_interval": 0.2,
        "reconnect_min_delay": 0.0,
        "reconnect_max_delay": 0.05,
        "stats_interval": 0,
        **fields,
    }
    path.write_text(json.dumps({k: v for k, v in obj.items() if v is not None}))
    return path


@pytest.fixture
def proc_sys(tmp_path: Path) -> Path:
    """A /proc/sys of our own with forwarding off: the gateway turns it on and back off."""
    root = tmp_path / "proc_sys"
    (root / "net" / "ipv4").mkdir(parents=True)
    (root / "net" / "ipv4" / "ip_forward").write_text("0\n")
    return root


def forwarding(proc_sys: Path) -> str:
    return (proc_sys / "net" / "ipv4" / "ip_forward").read_text().strip()


def make_gateway(tmp_path: Path, proc_sys: Path, **fields: object) -> FakeGateway:
    cfg = load_gateway_config(write_config(tmp_path / "gateway.json", **fields))
    return FakeGateway(cfg, proc_sys)


async def until(cond: Callable[[], object], timeout: float = 3.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.005)


def on(gw: Gateway, url: str) -> bool:
    """The gateway's link is registered with ``url``."""
    link = gw.link
    return link is not None and link.server.url == url and link.session.ready


async def finish(gw: Gateway, task: asyncio.Task) -> None:
    gw.stop()
    await asyncio.wait_for(task, 3.0)


# ---- bug 4: TUN reading follows the current link ----------------------------------------


def test_tun_is_read_after_moving_off_a_paused_fallback(tmp_path, proc_sys) -> None:
    """The fallback link's queue is full (the TUN reader is off) when the preferred server
    comes back: after the move, the new link's traffic must flow."""

    async def main() -> None:
        gw = make_gateway(tmp_path, proc_sys)
        gw.net[A].up = False
        task = asyncio.create_task(gw.run())
        await until(lambda: on(gw, B), what="fallback link")
        fallback = gw.link
        assert fallback is not None
        fallback.pause_writing()  # what the transport does when its buffer is full
        gw.net[A].up = True
        await until(lambda: on(gw, A), what="move to the preferred server")
        await until(lambda: fallback.closed.done(), what="fallback closed")
        gw.fake_tun.inject(LAN_PACKET)
        await until(lambda: gw.net[A].received() == [LAN_PACKET], what="packet via A")
        await finish(gw, task)

    asyncio.run(main())


def test_tun_reading_pauses_and_resumes_with_the_current_link(tmp_path, proc_sys) -> None:
    async def main() -> None:
        gw = make_gateway(tmp_path, proc_sys)
        task = asyncio.create_task(gw.run())
        await until(lambda: on(gw, A))
        link = gw.link
        assert link is not None
        link.pause_writing()
        gw.fake_tun.inject(LAN_PACKET)
        await asyncio.sleep(0.05)
        assert gw.fake_tun.reads == 0 and gw.net[A].received() == []
        link.resume_writing()
        await until(lambda: gw.net[A].received() == [LAN_PACKET])
        await finish(gw, task)

    asyncio.run(main())


# ---- bug 5: a stop during a connection attempt ------------------------------------------


def test_stop_while_registering_ends_the_gateway(tmp_path, proc_sys) -> None:
    """SIGTERM while the router has not yet answered REGISTER, which it then does: the
    gateway exits, closes that connection and undoes its host changes."""

    async def main() -> None:
        gw = make_gateway(tmp_path, proc_sys)
        gate = gw.net[A].gate = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(gw.run())
        await until(lambda: gw.net[A].connections, what="a connection to A")
        assert forwarding(proc_sys) == "1"
        gw.stop()
        gate.set_result(None)  # the attempt would now succeed
        await asyncio.wait_for(task, 3.0)
        assert forwarding(proc_sys) == "0"
        assert [t.closing for t in gw.net[A].connections] == [True]
        assert gw.fake_tun.closed

    asyncio.run(main())


def test_stop_while_probing_the_preferred_server_ends_the_gateway(tmp_path, proc_sys) -> None:
    async def main() -> None:
        gw = make_gateway(tmp_path, proc_sys)
        gw.net[A].up = False
        task = asyncio.create_task(gw.run())
        await until(lambda: on(gw, B), what="fallback link")
        gate = gw.net[A].gate = asyncio.get_running_loop().create_future()
        gw.net[A].up = True
        await until(lambda: gw.net[A].connections, what="the probe's connection to A")
        gw.stop()
        gate.set_result(None)
        await asyncio.wait_for(task, 3.0)
        assert forwarding(proc_sys) == "0"
        assert all(t.closing for t in gw.net[A].connections + gw.net[B].connections)

    asyncio.run(main())


def test_stop_while_a_link_registers_ends_a_multi_link_gateway(tmp_path, proc_sys) -> None:
    async def main() -> None:
        links = [{"name": "one", "route_server": A}, {"name": "two", "route_server": B}]
        gw = make_gateway(tmp_path, proc_sys, route_servers=None, links=links)
        gate = asyncio.get_running_loop().create_future()
        gw.net[A].gate = gw.net[B].gate = gate
        task = asyncio.create_task(gw.run())
        await until(lambda: gw.net[A].connections and gw.net[B].connections)
        gw.stop()
        gate.set_result(None)
        await asyncio.wait_for(task, 3.0)
        assert forwarding(proc_sys) == "0"
        assert all(t.closing for t in gw.net[A].connections + gw.net[B].connections)

    asyncio.run(main())


# ---- bug 6: a TUN that fails ends the gateway -------------------------------------------


@pytest.mark.parametrize("err", [errno.EBADFD, errno.EIO])
def test_a_tun_read_error_ends_the_gateway_once(tmp_path, proc_sys, err: int) -> None:
    """EBADFD (the device was deleted) or EIO: one read, one error, exit non-zero with the
    host changes undone, instead of a reader that fails on every turn of the loop."""

    async def main() -> None:
        gw = make_gateway(tmp_path, proc_sys)
        task = asyncio.create_task(gw.run())
        await until(lambda: on(gw, A))
        gw.fake_tun.read_error = OSError(err, os.strerror(err))
        gw.fake_tun.inject(LAN_PACKET)
        with pytest.raises(gwmod.FatalError, match="fake0 failed on read"):
            await asyncio.wait_for(task, 3.0)
        assert gw.fake_tun.reads == 1
        assert forwarding(proc_sys) == "0"
        assert [t.closing for t in gw.net[A].connections] == [True]

    asyncio.run(main())


def test_a_tun_write_error_ends_the_gateway(tmp_path, proc_sys) -> None:
    """A write to a deleted device: exit, rather than abort the link and reconnect forever."""

    async def main() -> None:
        gw = make_gateway(tmp_path, proc_sys)
        task = asyncio.create_task(gw.run())
        await until(lambda: on(gw, A))
        gw.fake_tun.write_error = OSError(errno.EBADFD, os.strerror(errno.EBADFD))
        gw.net[A].connections[0].send_packets(FAR_PACKET, FAR_PACKET)
        with pytest.raises(gwmod.FatalError, match="fake0 failed on write"):
            await asyncio.wait_for(task, 3.0)
        assert forwarding(proc_sys) == "0"
        assert len(gw.net[A].connections) == 1

    asyncio.run(main())


def test_packets_from_the_router_reach_the_tun(tmp_path, proc_sys) -> None:
    async def main() -> None:
        gw = make_gateway(tmp_path, proc_sys)
        task = asyncio.create_task(gw.run())
        await until(lambda: on(gw, A))
        gw.net[A].connections[0].send_packets(FAR_PACKET)
        await until(lambda: gw.fake_tun.written == [FAR_PACKET])
        await finish(gw, task)

    asyncio.run(main())


def test_tun_device_read_batch_keeps_what_it_read_before_an_error(monkeypatch) -> None:
    results: list[bytes | OSError] = [b"p1", b"p2", OSError(errno.EIO, "EIO")]

    def read(fd: int, n: int) -> bytes:
        r = results.pop(0) if results else OSError(errno.EIO, "EIO")
        if isinstance(r, OSError):
            raise r
        return r

    tun = TunDevice.__new__(TunDevice)
    tun.fd = 1000
    monkeypatch.setattr(os, "read", read)
    assert tun.read_batch() == [b"p1", b"p2"]
    with pytest.raises(OSError):
        tun.read_batch()


# ---- bug 8: the link loop follows reloads -----------------------------------------------


def test_a_reload_that_reorders_route_servers_probes_the_new_better_ones(
    tmp_path, proc_sys
) -> None:
    """On C (third of A, B, C); a reload makes C the first: nothing is better, so nothing
    is probed (before: the first two of the new order, C itself and A)."""

    async def main() -> None:
        gw = make_gateway(tmp_path, proc_sys, route_servers=[A, B, C])
        gw.net[A].up = gw.net[B].up = False
        task = asyncio.create_task(gw.run())
        await until(lambda: on(gw, C))
        await gw.reload()  # unchanged: the loop must go on probing A and B
        attempts = gw.net[A].attempts
        await until(lambda: gw.net[A].attempts > attempts, what="a probe of A")
        write_config(tmp_path / "gateway.json", route_servers=[C, A, B])
        gw.net[A].up = gw.net[B].up = True
        await gw.reload()
        attempts = gw.net[A].attempts, gw.net[B].attempts
        await asyncio.sleep(0.5)  # five preferred_retry_intervals
        assert (gw.net[A].attempts, gw.net[B].attempts) == attempts
        assert len(gw.net[C].connections) == 1 and on(gw, C)
        await finish(gw, task)

    asyncio.run(main())


def test_a_reload_that_makes_c_second_probes_only_the_first(tmp_path, proc_sys) -> None:
    async def main() -> None:
        gw = make_gateway(tmp_path, proc_sys, route_servers=[A, B, C])
        gw.net[A].up = gw.net[B].up = False
        task = asyncio.create_task(gw.run())
        await until(lambda: on(gw, C))
        write_config(tmp_path / "gateway.json", route_servers=[B, C, A])
        gw.net[A].up = True
        await gw.reload()
        attempts = gw.net[A].attempts
        b_attempts = gw.net[B].attempts
        await until(lambda: gw.net[B].attempts >= b_attempts + 2, what="probes of B")
        # before: the first two of the new order, B and C itself, so C a second time
        assert gw.net[A].attempts == attempts and on(gw, C)
        assert len(gw.net[C].connections) == 1
        await finish(gw, task)

    asyncio.run(main())


def test_a_reload_of_preferred_retry_interval_applies_to_the_running_link(
    tmp_path, proc_sys
) -> None:
    async def main() -> None:
        gw = make_gateway(tmp_path, proc_sys, preferred_retry_interval=3600)
        gw.net[A].up = False
        task = asyncio.create_task(gw.run())
        await until(lambda: on(gw, B))
        gw.net[A].up = True
        write_config(tmp_path / "gateway.json", preferred_retry_interval=0.1)
        await gw.reload()
        await until(lambda: on(gw, A), what="move to A")
        await finish(gw, task)

    asyncio.run(main())


# ---- bug 10: an SSL.Error from connecting is one more failed attempt --------------------


def test_an_ssl_error_while_connecting_is_retried(tmp_path, proc_sys) -> None:
    """The DTLS client context (a bad client certificate, say) raises SSL.Error: the gateway
    logs it and tries the next server, and the failing one again later."""

    async def main() -> None:
        gw = make_gateway(tmp_path, proc_sys)
        gw.net[A].connect_error = SSL.Error([("SSL routines", "", "ee key too small")])
        task = asyncio.create_task(gw.run())
        await until(lambda: on(gw, B), what="fallback to B")
        attempts = gw.net[A].attempts
        await until(lambda: gw.net[A].attempts > attempts, what="A tried again")
        gw.net[A].connect_error = None
        await until(lambda: on(gw, A), what="move to A")
        await finish(gw, task)

    asyncio.run(main())


def test_an_ssl_error_while_connecting_a_link_is_retried(tmp_path, proc_sys) -> None:
    async def main() -> None:
        links = [{"name": "one", "route_server": A}, {"name": "two", "route_server": B}]
        gw = make_gateway(tmp_path, proc_sys, route_servers=None, links=links)
        gw.net[B].connect_error = SSL.Error([("SSL routines", "", "ee key too small")])
        task = asyncio.create_task(gw.run())
        await until(lambda: gw.uplinks["one"].up and gw.net[B].attempts >= 2)
        gw.net[B].connect_error = None
        await until(lambda: gw.uplinks["two"].up, what="link two up")
        await finish(gw, task)

    asyncio.run(main())


# ---- bug 11: a lost link goes with its queue --------------------------------------------


def test_a_silent_link_is_aborted_with_its_queue(tmp_path, proc_sys) -> None:
    """A multi-link gateway gives a link up after 3 link_timeouts of silence: its kernel
    queue must go too (SO_LINGER 0 before the abort), or the connection would deliver it
    when the cut path returns."""

    async def main() -> None:
        links = [{"name": "one", "route_server": A}, {"name": "two", "route_server": B}]
        gw = make_gateway(
            tmp_path,
            proc_sys,
            route_servers=None,
            links=links,
            link_timeout=0.1,
            link_heartbeat_interval=0.02,
        )
        task = asyncio.create_task(gw.run())
        await until(lambda: gw.uplinks["one"].up and gw.uplinks["two"].up)
        gw.net[A].mute = True
        first = gw.net[A].connections[0]
        await until(lambda: first.closing, what="the silent link given up")
        assert first.aborted and first.sock.discards
        assert not any(t.closing for t in gw.net[B].connections)
        await finish(gw, task)

    asyncio.run(main())


def test_a_timed_out_link_discards_the_kernel_send_queue(tmp_path) -> None:
    """Over real loopback TCP: the router reads nothing, so the gateway's data sits in the
    kernel. Once the heartbeat timeout gives the link up, the router must get nothing more
    than it had already received (before: the kernel went on sending the queue)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        cfg = load_gateway_config(write_config(tmp_path / "gateway.json"))
        gw = Gateway(cfg)
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        link = RouterLink(gw, cfg.route_servers[0])
        accepting = asyncio.ensure_future(loop.sock_accept(listener))
        await loop.create_connection(lambda: link, *listener.getsockname())
        router, _ = await accepting
        try:
            assert link.transport is not None
            link.transport.write(b"\0" * (4 << 20))
            await asyncio.sleep(0.1)
            fd = link.transport.get_extra_info("socket").fileno()
            unsent = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]
            buffered = struct.unpack("i", fcntl.ioctl(router, termios.FIONREAD, b"\0" * 4))[0]
            assert unsent > 0, "the kernel's send queue should hold data"
            link.tick(time.monotonic() + 3600)  # the heartbeat timeout: the link is lost
            await asyncio.sleep(0.05)
            got = 0
            router.setblocking(True)
            router.settimeout(1.0)
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                while chunk := router.recv(1 << 20):
                    got += len(chunk)
            assert got <= buffered, f"{got - buffered} stale bytes reached the router"
        finally:
            router.close()
            listener.close()

    asyncio.run(main())


# ---- item 14: a failed kcp:// attempt leaves no socket behind ----------------------------


def test_kcp_connect_closes_its_socket_when_the_endpoint_fails(monkeypatch) -> None:
    made: list[socket.socket] = []
    bound_socket = linksock.bound_socket

    def record(*args: object) -> socket.socket:
        sock = bound_socket(*args)  # type: ignore[arg-type]
        made.append(sock)
        return sock

    async def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOBUFS, "no buffer space")

    async def main() -> None:
        monkeypatch.setattr(asyncio.get_running_loop(), "create_datagram_endpoint", refuse)
        ctx = dtls.client_context(dtls.Verification(insecure=True))
        with pytest.raises(OSError, match="no buffer space"):
            await kcp_transport.connect(
                asyncio.Protocol(),
                "127.0.0.1",
                9,
                ctx,
                dtls.Verification(insecure=True),
                KcpParams(),
                KcpPool(),
                timeout=1.0,
                interface="lo",
            )

    monkeypatch.setattr(linksock, "bound_socket", record)
    asyncio.run(main())
    assert len(made) == 1 and made[0].fileno() == -1


# ---- issue 16: urgent packets pass a full kcp:// queue -----------------------------------


def test_a_full_queue_still_takes_urgent_packets(tmp_path) -> None:
    """What the gateway reads from its TUN while its link's queue is over its budget (the
    link is paused and sheds): the urgent packets among them (a ping, a TCP ACK) go within
    the headroom (KcpLink.urgent_room), the rest is dropped; none before registration."""
    import types

    from test_kcp_unordered import ipv4

    async def main() -> None:
        cfg = load_gateway_config(write_config(tmp_path / "gateway.json"))
        gw = Gateway(cfg)
        link = RouterLink(gw, cfg.route_servers[0])
        room = [1000]
        link.kcp_link = types.SimpleNamespace(urgent_room=lambda: room[0])  # type: ignore[assignment]
        bulk, ping, ack = ipv4(6, 1300), ipv4(1, 56), ipv4(6, 0)
        assert link.urgent_of([bulk, ping, bulk, ack]) == []  # not registered yet
        link.session = types.SimpleNamespace(ready=True)  # type: ignore[assignment]
        assert link.urgent_of([bulk, ping, bulk, ack]) == [ping, ack]
        room[0] = 0
        assert link.urgent_of([ping]) == []

    asyncio.run(main())

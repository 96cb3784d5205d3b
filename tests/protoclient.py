"""Protocol-level test gateways (no TUN, no root) and a router process to point them at.

``ProtoClient`` is one gateway as the router sees it, on tls:// (stdlib ``ssl`` under an
asyncio Protocol) or kcp:// (``polevpn.io.kcp_transport`` with the same Protocol): it connects
from a chosen loopback source address, AUTHs, REGISTERs, sends IP packets as C2S_IPDATA
frames, counts the S2C_IPDATA packets it receives, sends heartbeats so the router's idle
timeout leaves it alone, and answers nothing. Many of them run on one event loop, which is
what the load test and the soak benchmark need; the frame encoding is ``polevpn.proto.wire`` and
``polevpn.proto.messages``, so these clients check the router, not a second copy of the codec.

``RouterProcess`` runs the real ``polevpn-router`` console script on 127.0.0.1 (port 0, the
ports read from its log) and reads its memory, descriptors and stats lines from /proc and
the log.

Packets built by ``udp_packet`` carry a marker (sender id, sequence number) in their UDP
payload, so a receiver can count what it got per sender.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import json
import os
import re
import signal
import ssl
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polevpn.config import FecParams, KcpParams
from polevpn.io import kcp_transport
from polevpn.kcp import dtls
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.packet.gso import internet_checksum
from polevpn.packet.ippacket import dst_addr
from polevpn.proto import messages, wire

try:  # tests/ is on sys.path (pytest rootdir-less import mode) ...
    import topology
except ImportError:  # ... or tests/ is a package
    from tests import topology  # type: ignore[no-redef]

# The Go gateway does not speak our FEC; a client without it also keeps the test process's
# CPU for the router. The router still offers FEC, which such a client ignores.
KCP_PARAMS = KcpParams(fec=FecParams(mode="off"))

# ---- packets --------------------------------------------------------------------------------

MARK = struct.Struct(">4sHI")  # magic, sender id, sequence number
MAGIC = b"pvlt"
UDP_SPORT, UDP_DPORT = 40000, 9  # discard


def _addr(addr: str) -> tuple[int, bytes]:
    a = ipaddress.ip_address(addr)
    return a.version, a.packed


def udp_packet(src: str, dst: str, sender: int = 0, seq: int = 0, size: int = 64) -> bytes:
    """A valid IPv4 or IPv6 UDP packet of ``size`` payload bytes (at least the marker),
    checksums included; the payload starts with the (sender, seq) marker."""
    v, s = _addr(src)
    v2, d = _addr(dst)
    if v != v2:
        raise ValueError(f"{src} and {dst} are not the same IP version")
    payload = MARK.pack(MAGIC, sender, seq)
    payload += b"\0" * max(0, size - len(payload))
    ulen = 8 + len(payload)
    tail = struct.pack(">BBH", 0, 17, ulen) if v == 4 else struct.pack(">IxxxB", ulen, 17)
    pseudo = s + d + tail
    udp = struct.pack(">HHHH", UDP_SPORT, UDP_DPORT, ulen, 0) + payload
    csum = 0xFFFF - internet_checksum(pseudo + udp)
    # 0 means "no checksum" in IPv4 and is forbidden in IPv6; the complement of 0 is 0xFFFF
    udp = udp[:6] + struct.pack(">H", csum or 0xFFFF) + udp[8:]
    if v == 6:
        return struct.pack(">IHBB16s16s", 6 << 28, ulen, 17, 64, s, d) + udp
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, 64, 17, 0, s, d)
    hdr = hdr[:10] + struct.pack(">H", 0xFFFF - internet_checksum(hdr)) + hdr[12:]
    return hdr + udp


def marker(pkt: bytes | memoryview) -> tuple[int, int] | None:
    """(sender, seq) from a packet built by ``udp_packet``, or None."""
    if not pkt:
        return None
    off = (pkt[0] & 0x0F) * 4 + 8 if pkt[0] >> 4 == 4 else 48
    if len(pkt) < off + MARK.size:
        return None
    magic, sender, seq = MARK.unpack_from(pkt, off)
    return (sender, seq) if magic == MAGIC else None


# ---- the client -----------------------------------------------------------------------------


class RouterRefused(Exception):
    """The router answered AUTH or REGISTER with an error."""


@dataclass
class Received:
    packets: int = 0
    bytes: int = 0
    # packets per sender id (from the marker); unmarked packets count under -1
    by_sender: collections.Counter[int] = field(default_factory=collections.Counter)
    # packets whose destination is not one of the networks this client registered
    misdelivered: int = 0
    heartbeats: int = 0
    other_frames: int = 0


class ProtoClient(asyncio.Protocol):
    """One protocol-level gateway on one tls:// or kcp:// connection."""

    def __init__(self, name: str = "", keep_packets: bool = False) -> None:
        self.name = name
        self.transport: Any = None  # asyncio, uvloop or kcp transport: alike, not one class
        self.decoder = wire.FrameDecoder()
        self.replies: asyncio.Queue[tuple[int, int, bytes]] = asyncio.Queue()
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.recv = Received()
        # S2C_IPDATA packets themselves, for tests that look at them (None: count only)
        self.inbox: asyncio.Queue[bytes] | None = asyncio.Queue() if keep_packets else None
        self._ranges: list[tuple[int, int, int]] = []  # (version, first, last) registered
        self._hb_task: asyncio.Task | None = None
        self._hb_seq = 0
        self.sent = 0

    def __repr__(self) -> str:
        return f"<ProtoClient {self.name}>"

    # -- connecting

    @classmethod
    async def connect_tls(
        cls,
        host: str,
        port: int,
        source: str | None = None,
        ctx: ssl.SSLContext | None = None,
        server_name: str = "polevpn-router",
        timeout: float = 10.0,
        **kw: Any,
    ) -> ProtoClient:
        if ctx is None:
            ctx = insecure_tls_context()
        loop = asyncio.get_running_loop()
        client = cls(**kw)
        await asyncio.wait_for(
            loop.create_connection(
                lambda: client,
                host,
                port,
                ssl=ctx,
                server_hostname=server_name,
                local_addr=(source, 0) if source else None,
            ),
            timeout,
        )
        return client

    @classmethod
    async def connect_kcp(
        cls,
        host: str,
        port: int,
        source: str | None = None,
        ctx: Any = None,
        verify: dtls.Verification | None = None,
        params: KcpParams = KCP_PARAMS,
        pool: KcpPool | None = None,
        timeout: float = 10.0,
        **kw: Any,
    ) -> ProtoClient:
        verify = verify or dtls.Verification(insecure=True)
        ctx = ctx or dtls.client_context(verify)
        pool = pool or _POOL
        client = cls(**kw)
        local = (source, 0) if source is not None else None
        await kcp_transport.connect(
            client, host, port, ctx, verify, params, pool, timeout, local_addr=local
        )
        return client

    # -- asyncio callbacks

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for cmd, seq, body in self.decoder.feed(data):
            if cmd == wire.S2C_IPDATA:
                self._packet(body)
            elif cmd == wire.HEART_BEAT:
                self.recv.heartbeats += 1
            elif cmd in (wire.AUTH, wire.REGISTER):
                self.replies.put_nowait((cmd, seq, bytes(body)))
            else:
                self.recv.other_frames += 1

    def _packet(self, pkt: memoryview) -> None:
        recv = self.recv
        recv.packets += 1
        recv.bytes += len(pkt)
        m = marker(pkt)
        recv.by_sender[m[0] if m else -1] += 1
        version, addr = dst_addr(pkt)
        if not any(v == version and lo <= addr <= hi for v, lo, hi in self._ranges):
            recv.misdelivered += 1
        if self.inbox is not None:
            self.inbox.put_nowait(bytes(pkt))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._hb_task is not None:
            self._hb_task.cancel()
        if not self.closed.done():
            self.closed.set_result(exc)

    # -- control plane

    async def _request(self, cmd: int, body: bytes, seq: int, timeout: float) -> messages.Reply:
        self.write(wire.encode_frame(cmd, body, seq))
        got = asyncio.ensure_future(self.replies.get())
        done, _ = await asyncio.wait(
            {got, self.closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if got not in done:
            got.cancel()
            what = "closed the connection" if self.closed in done else f"no answer in {timeout}s"
            raise RouterRefused(f"{self.name}: {wire.Command(cmd).name}: router {what}")
        rcmd, rseq, rbody = got.result()
        if (rcmd, rseq) != (cmd, seq):
            raise AssertionError(f"{self.name}: reply {rcmd}/{rseq} to request {cmd}/{seq}")
        reply = messages.parse_reply(rbody)
        if reply.error is not None:
            raise RouterRefused(f"{self.name}: {wire.Command(cmd).name}: {reply.error}")
        return reply

    async def auth(
        self, key: str, features: frozenset[str] = frozenset(), timeout: float = 10.0
    ) -> messages.Reply:
        return await self._request(wire.AUTH, messages.encode_auth(key, features), 0, timeout)

    async def register(
        self, key: str, gateway: str, networks: list[str], timeout: float = 10.0
    ) -> messages.Reply:
        self._ranges = []
        for net in (f"{gateway}/{32 if ':' not in gateway else 128}", *networks):
            n = ipaddress.ip_network(net, strict=False)
            self._ranges.append((n.version, int(n.network_address), int(n.broadcast_address)))
        body = messages.encode_register(gateway, key, networks)
        return await self._request(wire.REGISTER, body, 1, timeout)

    async def login(
        self,
        key: str,
        gateway: str,
        networks: list[str],
        features: frozenset[str] = frozenset(),
        timeout: float = 10.0,
    ) -> messages.Reply:
        """AUTH then REGISTER; returns AUTH's reply (the features the router accepted)."""
        reply = await self.auth(key, features, timeout)
        await self.register(key, gateway, networks, timeout)
        return reply

    # -- data plane

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_packets(self, packets: list[bytes]) -> int:
        """All of ``packets`` as C2S_IPDATA frames in one write; how many went out."""
        if self.transport is None or self.transport.is_closing():
            return 0
        self.transport.write(b"".join(wire.encode_frame(wire.C2S_IPDATA, p) for p in packets))
        self.sent += len(packets)
        return len(packets)

    def start_heartbeats(self, interval: float) -> None:
        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                self._hb_seq += 1
                self.write(wire.frame_header(wire.HEART_BEAT, 0, self._hb_seq))

        if self._hb_task is None:
            self._hb_task = asyncio.get_running_loop().create_task(beat())

    # -- closing

    def close(self) -> None:
        if self._hb_task is not None:
            self._hb_task.cancel()
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self, timeout: float = 5.0) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            return False
        return True


@functools.cache
def insecure_tls_context() -> ssl.SSLContext:
    """As PoleVPN's gateway with insecure_skip_verify: the tests check the router, not PKI.
    One shared context: creating one loads the system CA store, about 25 ms each."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_POOL = KcpPool()


# ---- the router process ---------------------------------------------------------------------

_LISTENING = re.compile(r"listening transport=(\w+) address=\S+ port=(\d+)")


def router_config(keys: Any, **overrides: Any) -> dict:
    """tls and kcp listeners on 127.0.0.1, ports chosen by the kernel; ``keys`` is a
    ``polevpn.keygen.KeygenResult``."""
    listener = {
        "listen": "127.0.0.1:0",
        "enable": True,
        "cert_file": str(keys.server_cert),
        "key_file": str(keys.server_key),
    }
    cfg = {
        "tls": dict(listener),
        "kcp": dict(listener),
        "key_file": str(keys.shared_key),
        "log_level": "info",
        "stats_interval": 1,
    }
    cfg.update(overrides)
    return cfg


@dataclass
class RouterProcess:
    proc: subprocess.Popen
    log_path: Path
    ports: dict[str, int]

    @classmethod
    def start(
        cls,
        config: dict,
        workdir: Path,
        timeout: float = 20.0,
        name: str = "router",
        netns: str | None = None,
    ) -> RouterProcess:
        """The router with ``config`` (written to ``workdir/<name>.json``, its log next to
        it), in the network namespace ``netns`` if given (``ip netns exec`` execs the
        router: the process is the router's own, its PID the one to end)."""
        exe = topology.console_script("polevpn-router")
        if exe is None:
            raise RuntimeError("polevpn-router console script not found (run 'make venv')")
        cfg_path = workdir / f"{name}.json"
        cfg_path.write_text(json.dumps(config, indent=2) + "\n")
        log_path = workdir / f"{name}.log"
        prefix = ["ip", "netns", "exec", netns] if netns else []
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*prefix, exe, f"-configPath={cfg_path}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        router = cls(proc, log_path, {})
        want = {name for name in ("tls", "kcp") if config.get(name, {}).get("enable")}
        deadline = time.monotonic() + timeout
        try:
            while True:
                text = log_path.read_text(errors="replace")
                router.ports = {m[1]: int(m[2]) for m in _LISTENING.finditer(text)}
                if want <= router.ports.keys():
                    return router
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"router did not start (rc={proc.poll()}); log:\n"
                        f"{topology.log_tail(log_path)}"
                    )
                time.sleep(0.05)
        except BaseException:
            router.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM and the other Vm* lines of /proc/PID/status, in kB."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Vm"):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
        return out

    def rss_kb(self) -> int:
        return self.status()["VmRSS"]

    def cpu_seconds(self) -> float:
        """User + system CPU time the router has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stats(self) -> dict[str, str]:
        return topology.last_stats(self.log_path)

    def stats_line_count(self) -> int:
        return self.log_path.read_text(errors="replace").count(" event=stats connections=")

    def wait_stats(self, check: Any, timeout: float = 20.0) -> dict[str, str]:
        """Until a stats line written after this call satisfies ``check`` (the router logs
        one every stats_interval); returns it, or raises with the last one."""
        seen = self.stats_line_count()
        deadline = time.monotonic() + timeout
        stats: dict[str, str] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited (rc={self.proc.returncode})")
            n = self.stats_line_count()
            if n > seen:
                seen = n
                stats = self.stats()
                if check(stats):
                    return stats
            time.sleep(0.1)
        raise TimeoutError(f"router stats did not get there in {timeout}s; last: {stats}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 5 s, by this process's PID only."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

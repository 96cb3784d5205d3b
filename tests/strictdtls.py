"""A strict DTLS peer for the tests: OpenSSL behind the RFC 6347 replay window on every epoch.

OpenSSL applies the replay window (RFC 6347 section 4.1.2.6) to protected records only;
pion (Go PoleVPN's DTLS) applies it to epoch 0 as well, so a ServerHello numbered like a
HelloVerifyRequest it has already seen is dropped as a replay. ``Strict`` puts that window
in front of a ``DtlsSession`` (or the router's cookie listener), and ``run`` drives a
handshake between two sides over a lossy in-memory path, with OpenSSL's own (wall-clock)
retransmission timers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from polevpn.kcp import dtls

WINDOW = 64


class ReplayWindow:
    """The sliding window of RFC 6347 section 4.1.2.6, one per epoch."""

    def __init__(self) -> None:
        self.top: dict[int, int] = {}
        self.bits: dict[int, int] = {}

    def accept(self, epoch: int, seq: int) -> bool:
        top = self.top.get(epoch)
        if top is None:
            self.top[epoch], self.bits[epoch] = seq, 1
            return True
        if seq > top:
            self.bits[epoch] = ((self.bits[epoch] << (seq - top)) | 1) & ((1 << WINDOW) - 1)
            self.top[epoch] = seq
            return True
        back = top - seq
        if back >= WINDOW or self.bits[epoch] >> back & 1:
            return False
        self.bits[epoch] |= 1 << back
        return True


def describe(rec: bytes) -> tuple[int, int, int, int | None]:
    """(content type, epoch, record seq, handshake type for epoch-0 handshake records)."""
    epoch = int.from_bytes(rec[3:5], "big")
    hs = rec[13] if rec[0] == dtls.CT_HANDSHAKE and epoch == 0 and len(rec) > 13 else None
    return rec[0], epoch, dtls.record_seq(rec), hs


@dataclass
class Strict:
    """Drops every record whose (epoch, seq) the window refuses before OpenSSL sees it."""

    enforce: bool = True
    window: ReplayWindow = field(default_factory=ReplayWindow)
    dropped: list[tuple[int, int, int, int | None]] = field(default_factory=list)

    def filter(self, datagram: bytes) -> bytes:
        if not self.enforce:
            return datagram
        keep = []
        for rec in dtls.split_records(datagram):
            _, epoch, seq, _ = d = describe(rec)
            if self.window.accept(epoch, seq):
                keep.append(rec)
            else:
                self.dropped.append(d)
        return b"".join(keep)


class Client:
    """Our client session behind an optional strict window."""

    def __init__(self, strict: bool, mtu: int = 1400) -> None:
        verify = dtls.Verification(insecure=True)
        self.session = dtls.DtlsSession.client(dtls.client_context(verify), verify, mtu, 0.0)
        self.strict = Strict(strict)

    @property
    def established(self) -> bool:
        return self.session.established

    def start(self) -> list[bytes]:
        return self.session.step(time.monotonic())

    def receive(self, datagram: bytes) -> list[bytes]:
        data = self.strict.filter(datagram)
        return self.session.receive(data, time.monotonic())[1] if data else []

    def timeout(self) -> float | None:
        return self.session.timeout()

    def handle_timeout(self) -> list[bytes]:
        return self.session.handle_timeout(time.monotonic())


class Server:
    """The router's sans-IO side for one peer: cookie listener, then the session."""

    def __init__(self, listener: dtls.CookieListener, peer: bytes, strict: bool) -> None:
        self.listener = listener
        self.peer = peer
        self.session: dtls.DtlsSession | None = None
        self.strict = Strict(strict)

    @property
    def established(self) -> bool:
        return self.session is not None and self.session.established

    def receive(self, datagram: bytes) -> list[bytes]:
        data = self.strict.filter(datagram)
        if not data:
            return []
        now = time.monotonic()
        if self.session is None:
            replies, self.session = self.listener.receive(data, self.peer, now)
            return replies
        return self.session.receive(data, now)[1]

    def timeout(self) -> float | None:
        return self.session.timeout() if self.session is not None else None

    def handle_timeout(self) -> list[bytes]:
        if self.session is None:
            return []
        return self.session.handle_timeout(time.monotonic())


def first_kind(datagram: bytes) -> str:
    """A name for what a datagram starts with: CH, HVR, SH, CKE, CCS, ... or the type."""
    recs = dtls.split_records(datagram)
    if not recs:
        return "junk"
    ctype, epoch, _, hs = describe(recs[0])
    if ctype == 20:
        return "CCS"
    names = {1: "CH", 3: "HVR", 2: "SH", 11: "CERT", 16: "CKE", 14: "SHD", 12: "SKE"}
    if hs == 1 and recs[0][17:19] != b"\x00\x00":
        return "CH2"  # the ClientHello that returns the cookie (message_seq 1)
    if hs is not None:
        return names.get(hs, f"hs{hs}")
    return f"ct{ctype}/e{epoch}"


@dataclass
class Path:
    """Drops the first ``n`` datagrams of each named kind in each direction."""

    lose: dict[tuple[str, str], int] = field(default_factory=dict)
    log: list[tuple[str, str, bool]] = field(default_factory=list)

    def passes(self, direction: str, datagram: bytes) -> bool:
        key = (direction, first_kind(datagram))
        left = self.lose.get(key, 0)
        if left:
            self.lose[key] = left - 1
        self.log.append((direction, key[1], not left))
        return not left


def run(client: Client, server: Server, path: Path, deadline: float = 8.0) -> float:
    """Handshake until both sides are established; returns how long it took."""
    start = time.monotonic()
    to_server = client.start()
    to_client: list[bytes] = []
    while not (client.established and server.established):
        if time.monotonic() - start > deadline:
            raise AssertionError(f"handshake did not complete; path: {path.log}")
        while to_server or to_client:
            for d in to_server:
                if path.passes("c2s", d):
                    to_client += server.receive(d)
            to_server = []
            for d in to_client:
                if path.passes("s2c", d):
                    to_server += client.receive(d)
            to_client = []
        if client.established and server.established:
            break
        waits = [t for t in (client.timeout(), server.timeout()) if t is not None]
        time.sleep(min(waits) + 0.01 if waits else 0.05)
        to_server += client.handle_timeout()
        to_client += server.handle_timeout()
    return time.monotonic() - start


def exchange(client: Client, server: Server) -> None:
    """Application data both ways, to show the association works."""
    assert server.session is not None
    d = client.session.send(b"ping")
    assert d is not None and server.session.receive(d, 0.0)[0] == [b"ping"]
    d = server.session.send(b"pong")
    assert d is not None and client.session.receive(d, 0.0)[0] == [b"pong"]


Loss = dict[tuple[str, str], int]
LOSSES: dict[str, Loss] = {
    "nothing lost": {},
    "first ClientHello lost": {("c2s", "CH"): 1},
    "two ClientHellos lost": {("c2s", "CH"): 2},
    "HelloVerifyRequest lost": {("s2c", "HVR"): 1},
    "ClientHello with cookie lost": {("c2s", "CH2"): 1},
    "server flight lost": {("s2c", "SH"): 1, ("s2c", "SHD"): 1},
    "client Finished flight lost": {("c2s", "CKE"): 1},
    "server Finished lost": {("s2c", "CCS"): 1},
    "first ClientHello and server flight lost": {("c2s", "CH"): 1, ("s2c", "SH"): 1},
}


def kinds(datagrams: list[bytes]) -> list[str]:
    return [first_kind(d) for d in datagrams]

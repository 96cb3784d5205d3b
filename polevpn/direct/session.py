"""One attempt at a direct path to one peer, and the path while it lasts. No I/O.

In the manner of ``kcp.connection``: datagrams (with their source) and the time go in
(``receive``, ``handle_timer``, ``send_packets``), datagrams to send (with their
destination), the next deadline, events and the peer's IP packets come out
(``datagrams_to_send``, ``get_timer``, ``next_event``, ``take_packets``). The caller owns
the one UDP socket the punch probes and the session share (``polevpn.io.direct_socket``).

The stages (docs/protocol.md section 18):

    PUNCHING    a ``punch.Puncher`` probes the peer's candidates; the initiator nominates
    HANDSHAKE   on the nominated pair of endpoints: DTLS 1.2 with ECDHE (the initiator is
                the client), then KCP+FEC with the router link's parameters: the kcp://
                stack of section 14, a ``kcp.connection.KcpConnection``
    PROVING     the first frame each way is DIRECT_PROOF: an HMAC with the pair's proof
                key over the association's exporter value (RFC 5705), so a proof made for
                another association (a man in the middle holds two) or with another pair's
                material fails, and the session with it
    UP          IP packets as C2S_IPDATA frames both ways; what arrives passes the pair's
                ``acl.DirectAcl`` (sources within the peer's grant, destinations within
                our networks), the rest is refused and counted
    CLOSED      failed (``SessionFailed``) or closed by the caller

The certificate the responder presents is an ephemeral self-signed one (``DirectContexts``)
and is not checked: the proofs authenticate. What the session hears and sends is reported
to the peer's ``path.PeerPath`` as it happens (``heard``, ``sent``), which decides when the
path is silent; the session itself gives up a handshake that takes longer than
``handshake_timeout``.

A responder whose session is up and that receives a new ClientHello from the peer's
endpoint (another random than the one it answered) takes it as the peer starting over (it
fell back on silence and punched again) and answers it with a fresh server session.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from polevpn.config import KcpParams
from polevpn.direct import messages as m
from polevpn.direct.acl import DirectAcl
from polevpn.direct.keys import EXPORTER_LABEL, EXPORTER_LEN, PairKeys
from polevpn.direct.messages import Cause, DatagramKind, Endpoint, Proof
from polevpn.direct.path import PeerPath
from polevpn.direct.punch import (
    KeepaliveAcked,
    PathUp,
    PeerMoved,
    PunchConfig,
    Puncher,
    PunchFailed,
)
from polevpn.kcp.connection import (
    ConnectionTerminated,
    HandshakeCompleted,
    KcpConnection,
    StreamDataReceived,
)
from polevpn.kcp.dtls import CIPHERS, DTLS1_2_VERSION, DtlsSession, Verification
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.packet.routing import IPNetwork
from polevpn.proto import wire
from polevpn.proto.wire import FrameDecoder, ProtocolError

_C2S = wire.C2S_IPDATA
_PROOF = int(wire.Command.DIRECT_PROOF)
_pack = wire.HEADER.pack
_HDR = wire.HEADER_LEN
_PROBE = int(DatagramKind.PROBE)
# the packets a session holds for KCP to send at most (bytes); beyond it they are dropped
# and counted, as a full link drops them: a direct path never buffers seconds of traffic
SEND_QUEUE_BYTES = 4 << 20
HANDSHAKE_TIMEOUT = 5.0


class Phase(Enum):
    PUNCHING = "punching"
    HANDSHAKE = "handshake"
    PROVING = "proving"
    UP = "up"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionUp:
    """Both proofs are in: IP packets may go direct to ``endpoint``."""

    endpoint: Endpoint
    rtt: float | None


@dataclass(frozen=True, slots=True)
class SessionFailed:
    cause: Cause
    reason: str


SessionEvent = SessionUp | SessionFailed


class DirectContexts:
    """The DTLS contexts of a gateway's direct sessions: a client that checks nothing (the
    proofs authenticate) and a server with an ephemeral self-signed ECDSA certificate,
    made once per gateway run."""

    def __init__(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "polevpn-direct")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        self.client = self._base(SSL.DTLS_CLIENT_METHOD)
        self.client.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        self.server = self._base(SSL.DTLS_SERVER_METHOD)
        self.server.use_certificate(cert)
        self.server.use_privatekey(key)
        self.server.check_privatekey()

    @staticmethod
    def _base(method: int) -> SSL.Context:
        ctx = SSL.Context(method)
        ctx.set_min_proto_version(DTLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
        ctx.set_cipher_list(CIPHERS)
        return ctx


def _client_hello_random(data: bytes | memoryview) -> bytes | None:
    """The random of a DTLS ClientHello (epoch 0, handshake type 1, first fragment), or
    None when ``data`` is none."""
    if (
        len(data) >= 59
        and data[0] == 22
        and data[1] == 0xFE
        and data[3] == 0
        and data[4] == 0
        and data[13] == 1
    ):
        return bytes(data[27:59])
    return None


class DirectSession:
    """One peer, one pair's material, one attempt; then the path while it lasts."""

    def __init__(
        self,
        keys: PairKeys,
        candidates: Iterable[Endpoint],
        granted: Iterable[IPNetwork],
        local_networks: Iterable[IPNetwork] | None,
        path: PeerPath,
        contexts: DirectContexts,
        params: KcpParams,
        pool: KcpPool,
        local: Iterable[Endpoint] = (),
        punch_config: PunchConfig | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.keys = keys
        self.path = path
        self.contexts = contexts
        self.params = params
        self.pool = pool
        self.handshake_timeout = handshake_timeout
        self.puncher = Puncher(keys, candidates, punch_config, local=local)
        self.acl = DirectAcl(granted, keys.peer, local_networks)
        self.phase = Phase.PUNCHING
        self.conn: KcpConnection | None = None
        self.endpoint: Endpoint | None = None
        self.rtt: float | None = None
        self._handshake_deadline: float | None = None
        self._binding = b""
        self._hello: bytes | None = None  # the ClientHello random a responder answered
        self._decoder = FrameDecoder()
        self._events: deque[SessionEvent] = deque()
        self._packets: list[memoryview] = []
        self._out: list[tuple[bytes, Endpoint]] = []
        # counters
        self.refused_proof = 0
        self.refused_frames = 0
        self.refused_stray = 0
        self.dropped_full = 0
        self.restarts = 0
        self.packets_sent = 0
        self.packets_received = 0

    # ---- state ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """IP packets may go direct."""
        return self.phase is Phase.UP

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def next_event(self) -> SessionEvent | None:
        return self._events.popleft() if self._events else None

    def take_packets(self) -> list[memoryview]:
        """The peer's IP packets that passed the ACL, since the last call."""
        out, self._packets = self._packets, []
        return out

    # ---- input ---------------------------------------------------------------------------

    def start(self, now: float) -> None:
        self.puncher.start(now)
        self._punch_events(now)

    def receive(self, data: bytes, src: Endpoint, now: float) -> bool:
        """A datagram from ``src``; False: not this session's (for the caller to count)."""
        if self.phase is Phase.CLOSED:
            return False
        if m.is_datagram(data):
            puncher = self.puncher
            taken = puncher.receive(data, src, now)
            if taken and puncher.last_heard == now and self.phase is Phase.UP:
                self.path.heard(now)
            self._punch_events(now)
            return taken
        conn = self.conn
        if conn is None or src != self.endpoint:
            return False
        if not self.keys.initiator and conn.established:
            hello = _client_hello_random(data)
            if hello is not None and hello != self._hello:
                # the peer started over on this path (its side fell silent and it punched
                # again): answer it afresh; packets go relayed until the proofs are in
                self.restarts += 1
                conn.close(now, notify_peer=False)
                conn = self._new_connection(now)
        before = conn.last_heard
        conn.receive_datagram(data, now)
        if conn.link is not None and conn.last_heard != before and self.phase is Phase.UP:
            self.path.heard(now)
        elif conn.link is None and self._hello is None and not self.keys.initiator:
            self._hello = _client_hello_random(data)
        return True

    def send_packets(self, packets: list[memoryview] | list[bytes], now: float) -> int:
        """Plain IP packets to the peer; returns the IP bytes queued (0 unless UP)."""
        conn = self.conn
        if self.phase is not Phase.UP or conn is None:
            return 0
        if conn.pending_bytes > SEND_QUEUE_BYTES:
            self.dropped_full += len(packets)
            return 0
        parts: list[bytes | memoryview] = []
        nbytes = 0
        for pkt in packets:
            n = len(pkt)
            if n > wire.MAX_BODY:
                self.dropped_full += 1
                continue
            parts.append(_pack(n + _HDR, _C2S, 0))
            parts.append(pkt)
            nbytes += n
        if not parts:
            return 0
        conn.send(b"".join(parts), now)
        self.packets_sent += len(parts) // 2
        self.path.sent(now, nbytes)
        return nbytes

    def keepalive_now(self, now: float) -> None:
        self.puncher.keepalive_now(now)

    def close(self, now: float, notify_peer: bool = True) -> None:
        """End the session; ``datagrams_to_send`` has a close_notify for the peer."""
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.puncher.close()
        if self.conn is not None:
            self.conn.close(now, notify_peer)
            self._conn_events(now)

    # ---- output and timers -----------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out = self._out
        self._out = []
        up = self.phase is Phase.UP
        for d, dest in self.puncher.datagrams_to_send():
            if up and d[1] == _PROBE:
                # a keepalive: the path owes us an answer (path.py's silence)
                self.path.sent(now)
            out.append((d, dest))
        conn = self.conn
        if conn is not None and self.endpoint is not None:
            ep = self.endpoint
            datagrams = conn.datagrams_to_send(now)
            if self._conn_events(now):
                # the proof, or what closing wrote
                datagrams += conn.datagrams_to_send(now)
            out.extend((d, ep) for d in datagrams)
        return out

    def get_timer(self) -> float | None:
        if self.phase is Phase.CLOSED:
            conn = self.conn
            return None if conn is None or conn.closed else conn.get_timer()
        times = []
        t = self.puncher.get_timer()
        if t is not None:
            times.append(t)
        if self.conn is not None:
            t = self.conn.get_timer()
            if t is not None:
                times.append(t)
        if self._handshake_deadline is not None and self.phase is not Phase.UP:
            times.append(self._handshake_deadline)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.puncher.handle_timer(now)
        self._punch_events(now)
        conn = self.conn
        if conn is not None and not conn.closed:
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
                self._conn_events(now)
        deadline = self._handshake_deadline
        if (
            deadline is not None
            and now >= deadline
            and self.phase in (Phase.HANDSHAKE, Phase.PROVING)
        ):
            what = f"no DTLS handshake and proofs within {self.handshake_timeout:g}s"
            self._fail(now, Cause.HANDSHAKE, what)

    # ---- internals -------------------------------------------------------------------------

    def _new_connection(self, now: float) -> KcpConnection:
        params = self.params
        if self.keys.initiator:
            dtls = DtlsSession.client(self.contexts.client, Verification(), params.dtls_mtu, now)
        else:
            ssl = SSL.Connection(self.contexts.server, None)
            ssl.set_accept_state()
            ssl.set_ciphertext_mtu(params.dtls_mtu)
            dtls = DtlsSession(ssl, server=True, mtu=params.dtls_mtu, now=now)
            self._hello = None
        conn = KcpConnection(dtls, params, self.pool, now, peer=self.endpoint)
        self.conn = conn
        self._decoder = FrameDecoder()
        self._binding = b""
        self.phase = Phase.HANDSHAKE
        self._handshake_deadline = now + self.handshake_timeout
        if self.keys.initiator:
            conn.connect(now)
        return conn

    def _punch_events(self, now: float) -> None:
        puncher = self.puncher
        ev = puncher.next_event()
        while ev is not None:
            if isinstance(ev, PathUp):
                self.endpoint = ev.endpoint
                self.rtt = ev.rtt
                if self.phase is Phase.PUNCHING:
                    self._new_connection(now)
            elif isinstance(ev, PunchFailed):
                self._fail(now, Cause.NO_ANSWER, ev.reason)
            elif isinstance(ev, KeepaliveAcked):
                self.rtt = ev.rtt
            elif isinstance(ev, PeerMoved):
                # the initiator's NAT rebound it: the session follows
                self.endpoint = ev.endpoint
                if self.conn is not None:
                    self.conn.peer = ev.endpoint
            ev = puncher.next_event()
        self._out.extend(puncher.datagrams_to_send())

    def _conn_events(self, now: float) -> bool:
        """Act on the connection's events; True if that queued something to send."""
        conn = self.conn
        if conn is None:
            return False
        wrote = False
        ev = conn.next_event()
        while ev is not None:
            if isinstance(ev, StreamDataReceived):
                self._stream(ev.data, now)
            elif isinstance(ev, HandshakeCompleted):
                wrote = self._send_proof(now) or wrote
            elif isinstance(ev, ConnectionTerminated):
                wrote = True
                if self.phase is not Phase.CLOSED:
                    cause = Cause.SILENCE if self.phase is Phase.UP else Cause.HANDSHAKE
                    self._fail(now, cause, ev.error or "the peer closed the session")
            ev = conn.next_event()
        return wrote

    def _send_proof(self, now: float) -> bool:
        conn = self.conn
        assert conn is not None
        binding = conn.dtls.conn.export_keying_material(EXPORTER_LABEL, EXPORTER_LEN)
        if not binding or len(binding) != EXPORTER_LEN:
            self._fail(now, Cause.HANDSHAKE, "no DTLS exporter value")
            return True
        self._binding = bytes(binding)
        self.phase = Phase.PROVING
        conn.send(m.encode(self.keys.channel_proof(self._binding)), now)
        return True

    def _stream(self, data: bytes, now: float) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self.refused_frames += 1
            self._fail(now, Cause.HANDSHAKE, f"malformed frame from the peer: {exc}")
            return
        packets: list[memoryview] = []
        for command, _seq, body in frames:
            if self.phase is Phase.PROVING:
                if not self._check_proof(command, body, now):
                    return
            elif self.phase is Phase.UP and command == _C2S:
                packets.append(body)
            elif self.phase is Phase.CLOSED:
                return
            else:
                # nothing else is sent on a direct session: ignored, counted
                self.refused_frames += 1
        if packets:
            passed = self.acl.filter(packets)
            self.path.refused = self.acl.refused
            self.packets_received += len(passed)
            self.path.heard(now, sum(map(len, passed)))
            if passed:
                self._packets.extend(passed)  # type: ignore[arg-type]

    def _check_proof(self, command: int, body: memoryview, now: float) -> bool:
        if command != _PROOF:
            self.refused_proof += 1
            what = f"the peer's first frame is command {command}, no proof"
            self._fail(now, Cause.HANDSHAKE, what)
            return False
        try:
            proof = m.decode(command, body)
        except m.DirectMessageError as exc:
            self.refused_proof += 1
            self._fail(now, Cause.HANDSHAKE, f"bad DIRECT_PROOF: {exc}")
            return False
        assert isinstance(proof, Proof)
        if not self.keys.verify_channel_proof(proof, self._binding, now):
            self.refused_proof += 1
            self._fail(now, Cause.HANDSHAKE, "the peer's DIRECT_PROOF does not verify")
            return False
        self.phase = Phase.UP
        self._handshake_deadline = None
        assert self.endpoint is not None
        self._events.append(SessionUp(self.endpoint, self.rtt))
        return True

    def _fail(self, now: float, cause: Cause, reason: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.puncher.close()
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.close(now, notify_peer=True)
        self._events.append(SessionFailed(cause, reason))

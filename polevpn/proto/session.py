"""Connection state machines for both ends of a PoleVPN link. No sockets, no clocks.

Each session takes received bytes and the current time, and returns the IP packets carried
and a list of control events; what it wants sent accumulates in ``outbox`` until the I/O
layer collects it with ``data_to_send``. IP packets are returned as memoryviews in a list of
their own because they are the hot path and must not be wrapped in an object each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from polevpn.proto import messages, peering, wire
from polevpn.proto.messages import (
    FEATURE_MULTILINK,
    FEATURE_PEER,
    FEATURE_SUPER,
    LinkRequest,
    MessageError,
    PeerHello,
    RegisterRequest,
)
from polevpn.proto.peering import PeerCredentials
from polevpn.proto.wire import FrameDecoder, FrameTooLong, ProtocolError, encode_frame

# the longest frame the router takes before AUTH: an AUTH body is a key and a few features,
# and a connection that has not authenticated holds at most this much of a partial frame
# (1,024 pending connections with partial 65,600-byte frames held +230 MB)
PRE_AUTH_MAX_FRAME = 4096


class State(Enum):
    AWAIT_AUTH = "await-auth"
    AUTHENTICATED = "authenticated"
    REGISTERED = "registered"
    CLOSED = "closed"


# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthSucceeded:
    pass


@dataclass(frozen=True, slots=True)
class AuthFailed:
    reason: str
    # a router of the cluster (or one claiming to be) that failed the router-link handshake
    peer: bool = False


@dataclass(frozen=True, slots=True)
class PeerAuthenticated:
    """Both routers proved the cluster credential: the link to ``router_id`` is up."""

    router_id: str


@dataclass(frozen=True, slots=True)
class RegisterRequested:
    request: RegisterRequest
    seq: int


@dataclass(frozen=True, slots=True)
class Registered:
    pass


@dataclass(frozen=True, slots=True)
class Rejected:
    """The router refused AUTH or REGISTER; retrying with the same config will not help."""

    stage: str
    error: str


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    rtt: float | None = None


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The session is over: protocol violation or timeout. The I/O layer closes the link.

    ``kind``: "malformed" (bytes that are no frame), "oversized" (a frame longer than the
    protocol allows), "flood" (REGISTER faster than REGISTER_BURST/REGISTER_RATE allow) or
    "protocol" (a valid frame at the wrong time or with a bad body).
    """

    reason: str
    kind: str = "protocol"


@dataclass(frozen=True, slots=True)
class DirectFrame:
    """A DIRECT_* frame (commands 32..37, docs/protocol.md section 18) on a connection that
    agreed ``direct``; its body is for ``polevpn.direct.messages`` to parse."""

    command: int
    body: bytes


# the commands of direct paths (wire.Command.DIRECT_ENDPOINT .. DIRECT_PROOF)
DIRECT_COMMANDS = frozenset(range(32, 38))


Event = (
    AuthSucceeded
    | AuthFailed
    | PeerAuthenticated
    | RegisterRequested
    | Registered
    | Rejected
    | HeartbeatReceived
    | ConnectionLost
    | DirectFrame
)

Packets = list[memoryview]


class _FramedSession:
    """What both ends share: the frame decoder, the outbox and the liveness clock.

    ``features`` holds the extensions both ends agreed on in AUTH. With super-packets agreed,
    a SUPER_IPDATA body (virtio-net header + IP packet) is returned among the IP packets: its
    first byte is the header's flags (below 0x10), which no IPv4 or IPv6 packet starts with,
    so the data path tells the two apart without a second list.
    """

    __slots__ = ("state", "_decoder", "outbox", "last_heard", "unknown_commands", "features")

    def __init__(self, now: float) -> None:
        self.state = State.AWAIT_AUTH
        self._decoder = FrameDecoder()
        self.outbox: list[bytes] = []
        self.last_heard = now
        self.unknown_commands = 0
        self.features: frozenset[str] = frozenset()

    @property
    def super_packets(self) -> bool:
        return messages.FEATURE_SUPER in self.features

    def _super_body(self, body: memoryview) -> bool:
        """Whether a SUPER_IPDATA body may be passed on; counts it as unknown if not."""
        if self.state is State.REGISTERED and self.super_packets and body and body[0] < 0x10:
            return True
        self.unknown_commands += 1
        return False

    def data_to_send(self) -> list[bytes]:
        out, self.outbox = self.outbox, []
        return out

    def _frames(self, data: bytes, now: float, events: list[Event]) -> list[wire.Frame]:
        """Decode ``data``; on garbage, close the session and report why."""
        if self.state is State.CLOSED:
            return []
        self.last_heard = now
        try:
            return self._decoder.feed(data)
        except FrameTooLong as exc:
            self._lose(events, f"frame too long: {exc}", "oversized")
        except ProtocolError as exc:
            self._lose(events, f"malformed frame: {exc}", "malformed")
        return []

    def _lose(self, events: list[Event], reason: str, kind: str = "protocol") -> list[Event]:
        self.state = State.CLOSED
        events.append(ConnectionLost(reason, kind))
        return events


# ---- router side --------------------------------------------------------------------------

# REGISTER per connection: a token bucket of this many, refilled at this rate (per second).
# A gateway registers once per connection, and again on a reload that changes what it
# announces; each REGISTER costs the router a route-table update and, for a link, a rebuild
# of its site's flow table (about 2 ms). Past the bucket the REGISTER is answered with an
# error and the connection closed, like any protocol violation: the gateway reconnects and
# registers once. It also bounds the REGISTER work one read can cause to REGISTER_BURST.
REGISTER_BURST = 5
REGISTER_RATE = 2.0


class ServerSession(_FramedSession):
    """The router's view of one gateway connection.

    AUTH must come first. REGISTER is reported as an event and answered by the orchestrator
    through ``accept_register`` or ``reject_register``, because only it knows the routing
    table. IP data before a successful REGISTER is dropped and counted.

    With ``peer`` (a router of a cluster, on a connection with a TLS channel ``binding``),
    an AUTH offering ``router-peer`` starts the router-link handshake instead (section 17
    of docs/protocol.md, ``peering``): REGISTER then carries the dialing router's proofs,
    and success is reported as ``PeerAuthenticated``. ``peer`` is asked at that AUTH, so
    a reload's new credential counts from the next handshake on.
    """

    __slots__ = (
        "_check_key",
        "opened_at",
        "dropped_unregistered",
        "_offer",
        "_register_tokens",
        "_register_at",
        "_peer",
        "_binding",
        "_peer_creds",
        "_dialer",
        "_listener",
        "peer_id",
    )

    def __init__(
        self,
        check_key: Callable[[str], bool],
        now: float,
        features: frozenset[str] = frozenset(),
        peer: Callable[[], PeerCredentials | None] | None = None,
        binding: bytes | None = None,
    ) -> None:
        super().__init__(now)
        self._check_key = check_key
        self.opened_at = now
        self.dropped_unregistered = 0
        self._offer = features
        self._register_tokens = float(REGISTER_BURST)
        self._register_at = now
        self._peer = peer if binding is not None else None
        self._binding = binding or b""
        # the router-link handshake under way: the credentials of the moment and both hellos
        self._peer_creds: PeerCredentials | None = None
        self._dialer: PeerHello | None = None
        self._listener: PeerHello | None = None
        # the other router's id, once it has proved the cluster credential
        self.peer_id: str | None = None

    def receive(self, data: bytes, now: float) -> tuple[Packets, list[Event]]:
        packets: Packets = []
        events: list[Event] = []
        frames = self._frames(data, now, events)
        if self.state is State.AWAIT_AUTH and self._first_frame_too_long(frames):
            self._decoder.clear()
            self._lose(events, f"frame before AUTH over {PRE_AUTH_MAX_FRAME} bytes", "oversized")
            return packets, events
        registered = self.state is State.REGISTERED
        for command, seq, body in frames:
            if command == wire.C2S_IPDATA:
                if registered:
                    packets.append(body)
                    continue
                if self.state is not State.AWAIT_AUTH:
                    # between AUTH and REGISTER: harmless, PoleVPN gateways race this
                    self.dropped_unregistered += 1
                    continue
            elif command == wire.SUPER_IPDATA and self.state is not State.AWAIT_AUTH:
                if self._super_body(body):
                    packets.append(body)
                continue
            elif command == wire.S2C_IPDATA and registered and self.peer_id is not None:
                # a router link: the other router forwards as it does to gateways
                packets.append(body)
                continue
            self._control(command, seq, body, now, events)
            if self.state is State.CLOSED:
                break
            registered = self.state is State.REGISTERED
        return packets, events

    def _refuse(self, command: int, error: str, seq: int) -> None:
        """Answer an AUTH or REGISTER with an error body (PoleVPN's shape)."""
        self.outbox.append(encode_frame(command, messages.encode_error(error), seq))

    def _first_frame_too_long(self, frames: list[wire.Frame]) -> bool:
        """Whether the connection's first frame (AUTH, or the connection is closed anyway)
        is longer than PRE_AUTH_MAX_FRAME, complete or, from its header, still partial.
        Frames after it in the same read may be longer: AUTH, REGISTER and data are often
        sent in one go."""
        if frames:
            return len(frames[0][2]) + wire.HEADER_LEN > PRE_AUTH_MAX_FRAME
        return self._decoder.pending_length > PRE_AUTH_MAX_FRAME

    def _register_allowed(self, now: float) -> bool:
        """Take a REGISTER token, if there is one (REGISTER_BURST, REGISTER_RATE)."""
        tokens = self._register_tokens + (now - self._register_at) * REGISTER_RATE
        self._register_at = now
        if tokens < 1.0:
            self._register_tokens = tokens
            return False
        self._register_tokens = min(float(REGISTER_BURST), tokens) - 1.0
        return True

    def _control(
        self, command: int, seq: int, body: memoryview, now: float, events: list[Event]
    ) -> None:
        if self.state is State.AWAIT_AUTH and command != wire.AUTH:
            self._lose(events, f"command {command} before AUTH")
            return
        if command == wire.AUTH:
            if self.state is not State.AWAIT_AUTH:
                # a repeated AUTH changes nothing; answer it so a confused peer can go on
                self.outbox.append(encode_frame(wire.AUTH, messages.OK_BODY, seq))
                return
            try:
                auth = messages.parse_auth(body)
            except MessageError as exc:
                self._lose(events, f"bad AUTH: {exc}")
                return
            if FEATURE_PEER in auth.features and self._peer is not None:
                self._peer_auth(auth.features, body, seq, events)
                return
            if not self._check_key(auth.key):
                self._refuse(wire.AUTH, "invalid key", seq)
                self.state = State.CLOSED
                events.append(AuthFailed("invalid key"))
                return
            self.state = State.AUTHENTICATED
            self.features = auth.features & self._offer
            self.outbox.append(encode_frame(wire.AUTH, messages.encode_ok(self.features), seq))
            events.append(AuthSucceeded())
        elif command == wire.REGISTER:
            if not self._register_allowed(now):
                self._refuse(wire.REGISTER, "too many REGISTER", seq)
                self._lose(
                    events,
                    f"REGISTER flood (more than {REGISTER_BURST} at once, "
                    f"{REGISTER_RATE:g} a second)",
                    "flood",
                )
                return
            if self._dialer is not None:
                self._peer_register(body, seq, events)
                return
            try:
                req = messages.parse_register(body)
            except MessageError as exc:
                self._refuse(wire.REGISTER, str(exc), seq)
                self._lose(events, f"bad REGISTER: {exc}")
                return
            if not self._check_key(req.key):
                self._refuse(wire.REGISTER, "invalid key", seq)
                self.state = State.CLOSED
                events.append(AuthFailed("invalid key in REGISTER"))
                return
            events.append(RegisterRequested(req, seq))
        elif command == wire.HEART_BEAT:
            # echoed as is, sequence included, as PoleVPN's router does
            self.outbox.append(wire.frame_header(wire.HEART_BEAT, 0, seq))
            events.append(HeartbeatReceived())
        elif (
            command in DIRECT_COMMANDS
            and self.state is State.REGISTERED
            and messages.FEATURE_DIRECT in self.features
        ):
            # the router's rendezvous parses it (polevpn.direct.messages); before REGISTER
            # it names no gateway, and it is counted as unknown like on a side that did
            # not agree
            events.append(DirectFrame(command, bytes(body)))
        else:
            # S2C_IPDATA from a gateway or a command from a newer protocol: ignore, count
            self.unknown_commands += 1

    def _peer_refuse(self, command: int, error: str, seq: int, events: list[Event]) -> None:
        self._refuse(command, error, seq)
        self.state = State.CLOSED
        events.append(AuthFailed(error, peer=True))

    def _peer_auth(
        self, offered: frozenset[str], body: memoryview, seq: int, events: list[Event]
    ) -> None:
        """AUTH from a router dialing this one: check who it says it is, answer with our
        hello. Nothing is trusted until its REGISTER proves the cluster credential."""
        creds = self._peer() if self._peer is not None else None
        if creds is None:
            # no longer a router of a cluster (a reload): a stranger like any other
            self._peer_refuse(wire.AUTH, "not a router of a cluster", seq, events)
            return
        try:
            hello = messages.parse_peer_auth(body)
        except MessageError as exc:
            self._refuse(wire.AUTH, str(exc), seq)
            self._lose(events, f"bad router AUTH: {exc}")
            return
        if hello.cluster != creds.cluster:
            self._peer_refuse(wire.AUTH, "not a router of this cluster", seq, events)
            return
        if hello.router_id == creds.router_id:
            self._peer_refuse(wire.AUTH, "router id is this router's own", seq, events)
            return
        self._peer_creds = creds
        self._dialer = hello
        self._listener = creds.hello()
        self.state = State.AUTHENTICATED
        # a router link is no gateway: multi-link and direct paths mean nothing on it
        self.features = offered & (
            (self._offer | {FEATURE_PEER}) - {FEATURE_MULTILINK, messages.FEATURE_DIRECT}
        )
        reply = messages.encode_peer_welcome(self._listener, self.features)
        self.outbox.append(encode_frame(wire.AUTH, reply, seq))

    def _peer_register(self, body: memoryview, seq: int, events: list[Event]) -> None:
        """REGISTER on a router link: the dialing router's proofs, answered with ours."""
        creds, dialer, listener = self._peer_creds, self._dialer, self._listener
        assert creds is not None and dialer is not None and listener is not None
        if self.state is not State.AUTHENTICATED:
            self._refuse(wire.REGISTER, "router link is up already", seq)
            self._lose(events, "REGISTER again on a router link")
            return
        try:
            proofs = messages.parse_peer_proofs(body)
        except MessageError as exc:
            self._refuse(wire.REGISTER, str(exc), seq)
            self._lose(events, f"bad router REGISTER: {exc}")
            return
        text = peering.transcript(dialer, listener, self._binding)
        key = peering.verify(proofs, creds.keys, peering.DIALER, text)
        if key is None:
            self._peer_refuse(wire.REGISTER, "invalid cluster credential", seq, events)
            return
        self.state = State.REGISTERED
        self.peer_id = dialer.router_id
        reply = messages.encode_peer_proof(peering.prove(key, peering.LISTENER, text))
        self.outbox.append(encode_frame(wire.REGISTER, reply, seq))
        events.append(PeerAuthenticated(dialer.router_id))

    def accept_register(self, seq: int) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.REGISTERED
        self.outbox.append(encode_frame(wire.REGISTER, messages.OK_BODY, seq))

    def reject_register(self, seq: int, error: str) -> None:
        if self.state is State.CLOSED:
            return
        self._refuse(wire.REGISTER, error, seq)
        self.state = State.CLOSED

    def check_timeouts(self, now: float, auth_timeout: float, idle_timeout: float) -> str | None:
        """Reason to close the connection, or None while it is within its deadlines."""
        if self.state is State.CLOSED:
            return None
        if self.state is not State.REGISTERED and now - self.opened_at > auth_timeout:
            self.state = State.CLOSED
            return f"no AUTH/REGISTER within {auth_timeout:g}s"
        if now - self.last_heard > idle_timeout:
            self.state = State.CLOSED
            return f"idle for {idle_timeout:g}s"
        return None


# ---- gateway side -------------------------------------------------------------------------


class ClientSession(_FramedSession):
    """The gateway's side of one connection: AUTH, then REGISTER, then data and heartbeats."""

    __slots__ = (
        "key",
        "gateway",
        "networks",
        "heartbeat_interval",
        "heartbeat_timeout",
        "started_at",
        "_next_heartbeat",
        "_hb_seq",
        "_hb_sent",
        "rtt",
        "_offer",
        "link",
        "multilink_refused",
    )

    def __init__(
        self,
        key: str,
        gateway: str,
        networks: list[str],
        now: float,
        heartbeat_interval: float = 10.0,
        heartbeat_timeout: float = 20.0,
        features: frozenset[str] = frozenset(),
        link: LinkRequest | None = None,
    ) -> None:
        """``link``: this connection is one of several links of the gateway; it offers
        multi-link and names the link in REGISTER (a router without it is refused here)."""
        super().__init__(now)
        if link is not None:
            features = features | {FEATURE_MULTILINK}
        self._offer = features
        self.link = link
        # the router took AUTH but not multi-link: it knows one connection per gateway
        self.multilink_refused = False
        self.key = key
        self.gateway = gateway
        self.networks = networks
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.outbox.append(encode_frame(wire.AUTH, self._auth_body(), 0))
        self.started_at = now
        self._next_heartbeat = now + heartbeat_interval
        self._hb_seq = 0
        self._hb_sent: dict[int, float] = {}
        self.rtt: float | None = None

    def _auth_body(self) -> bytes:
        return messages.encode_auth(self.key, self._offer)

    @property
    def ready(self) -> bool:
        return self.state is State.REGISTERED

    def receive(self, data: bytes, now: float) -> tuple[Packets, list[Event]]:
        packets: Packets = []
        events: list[Event] = []
        frames = self._frames(data, now, events)
        for command, seq, body in frames:
            if command == wire.S2C_IPDATA:
                if self.state is State.REGISTERED:
                    packets.append(body)
                continue
            if command == wire.SUPER_IPDATA:
                if self._super_body(body):
                    packets.append(body)
                continue
            self._control(command, seq, body, now, events)
            if self.state is State.CLOSED:
                break
        return packets, events

    def _control(
        self, command: int, seq: int, body: memoryview, now: float, events: list[Event]
    ) -> None:
        if command == wire.HEART_BEAT:
            sent = self._hb_sent.pop(seq, None)
            rtt = None if sent is None else now - sent
            if rtt is not None:
                self.rtt = rtt
            events.append(HeartbeatReceived(rtt))
            return
        if command in DIRECT_COMMANDS and messages.FEATURE_DIRECT in self.features:
            # a side that did not agree ignores and counts them, as any unknown command
            events.append(DirectFrame(command, bytes(body)))
            return
        if command not in (wire.AUTH, wire.REGISTER):
            self.unknown_commands += 1
            return
        stage = "AUTH" if command == wire.AUTH else "REGISTER"
        try:
            reply = messages.parse_reply(body)
        except MessageError as exc:
            self._lose(events, f"bad {stage} reply: {exc}")
            return
        if reply.error is not None:
            self.state = State.CLOSED
            events.append(Rejected(stage, reply.error))
            return
        if command == wire.AUTH and self.state is State.AWAIT_AUTH:
            self.state = State.AUTHENTICATED
            # only what we offered: a router must not switch on something we cannot handle
            self.features = reply.features & self._offer
            if self.link is not None and FEATURE_MULTILINK not in self.features:
                # a plain REGISTER would replace the gateway's other links at the router
                self.state = State.CLOSED
                self.multilink_refused = True
                events.append(
                    Rejected(
                        "AUTH",
                        "the router does not take multi-link (a PoleVPN router, an older "
                        "polevpn, or multi_link off)",
                    )
                )
                return
            body_out = messages.encode_register(
                self.gateway, self.key, self.networks, self.link
            )
            self.outbox.append(encode_frame(wire.REGISTER, body_out, 0))
            events.append(AuthSucceeded())
        elif command == wire.REGISTER and self.state is State.AUTHENTICATED:
            self.state = State.REGISTERED
            events.append(Registered())

    def tick(self, now: float) -> ConnectionLost | None:
        """Queue a heartbeat when one is due; report a dead link. Call about once a second."""
        if self.state is State.CLOSED:
            return None
        if self.state is not State.REGISTERED and now - self.started_at > self.heartbeat_timeout:
            self.state = State.CLOSED
            return ConnectionLost(f"not registered within {self.heartbeat_timeout:g}s")
        if now - self.last_heard > self.heartbeat_timeout:
            self.state = State.CLOSED
            return ConnectionLost(f"nothing heard from the router for {self.heartbeat_timeout:g}s")
        if self.state is State.REGISTERED and now >= self._next_heartbeat:
            self._next_heartbeat = now + self.heartbeat_interval
            self._hb_seq = (self._hb_seq + 1) & 0xFFFFFFFF
            # keep only recent probes: a router that never echoes must not grow this
            if len(self._hb_sent) > 16:
                self._hb_sent.clear()
            self._hb_sent[self._hb_seq] = now
            self.outbox.append(wire.frame_header(wire.HEART_BEAT, 0, self._hb_seq))
        return None


# ---- router links -------------------------------------------------------------------------


class PeerClientSession(ClientSession):
    """A router's side of a router link it dialed (docs/protocol.md section 17).

    AUTH carries its hello; the listening router answers with its own; REGISTER carries a
    proof per credential this router holds; the reply carries the listener's proof, which
    must match one of them too. Then data flows both ways as S2C_IPDATA (and SUPER_IPDATA),
    and this side sends the heartbeats, which the listener echoes. ``expected``: the id the
    cluster's store gives the address dialed; another router answering there is refused.
    """

    __slots__ = ("credentials", "expected", "peer_id", "_binding", "_hello", "_welcome")

    def __init__(
        self,
        credentials: PeerCredentials,
        binding: bytes,
        now: float,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        expected: str | None = None,
        nonce: bytes | None = None,
    ) -> None:
        self.credentials = credentials
        self.expected = expected
        self.peer_id: str | None = None
        self._binding = binding
        self._hello = credentials.hello(nonce)
        self._welcome: PeerHello | None = None
        super().__init__(
            "",
            credentials.router_id,
            [],
            now,
            heartbeat_interval,
            heartbeat_timeout,
            features=frozenset({FEATURE_SUPER, FEATURE_PEER}),
        )

    def _auth_body(self) -> bytes:
        return messages.encode_peer_auth(self._hello, self._offer)

    def _refused(self, stage: str, error: str, events: list[Event]) -> None:
        self.state = State.CLOSED
        events.append(Rejected(stage, error))

    def _control(
        self, command: int, seq: int, body: memoryview, now: float, events: list[Event]
    ) -> None:
        if command == wire.HEART_BEAT:
            super()._control(command, seq, body, now, events)
            return
        if command == wire.AUTH and self.state is State.AWAIT_AUTH:
            self._welcomed(body, events)
        elif command == wire.REGISTER and self.state is State.AUTHENTICATED:
            self._proved(body, events)
        else:
            self.unknown_commands += 1

    def _welcomed(self, body: memoryview, events: list[Event]) -> None:
        try:
            reply = messages.parse_peer_welcome(body)
        except MessageError as exc:
            self._lose(events, f"bad router AUTH reply: {exc}")
            return
        if reply.error is not None:
            self._refused("AUTH", reply.error, events)
            return
        hello = reply.hello
        assert hello is not None
        creds = self.credentials
        if FEATURE_PEER not in reply.features:
            self._refused("AUTH", "the far end does not take router links", events)
        elif hello.cluster != creds.cluster:
            self._refused("AUTH", f"the far end is of cluster {hello.cluster!r}", events)
        elif hello.router_id == creds.router_id:
            self._refused("AUTH", "the far end has this router's own id", events)
        elif self.expected is not None and hello.router_id != self.expected:
            self._refused(
                "AUTH", f"router {hello.router_id!r} answered, not {self.expected!r}", events
            )
        else:
            self._welcome = hello
            self.features = reply.features & self._offer
            self.state = State.AUTHENTICATED
            text = peering.transcript(self._hello, hello, self._binding)
            proofs = [peering.prove(k, peering.DIALER, text) for k in creds.keys]
            body_out = messages.encode_peer_proofs(proofs)
            self.outbox.append(encode_frame(wire.REGISTER, body_out, 0))

    def _proved(self, body: memoryview, events: list[Event]) -> None:
        try:
            reply = messages.parse_peer_proof_reply(body)
        except MessageError as exc:
            self._lose(events, f"bad router REGISTER reply: {exc}")
            return
        if reply.error is not None:
            self._refused("REGISTER", reply.error, events)
            return
        welcome = self._welcome
        assert welcome is not None
        text = peering.transcript(self._hello, welcome, self._binding)
        if peering.verify([reply.proof], self.credentials.keys, peering.LISTENER, text) is None:
            self._refused("REGISTER", "the far end did not prove the cluster credential", events)
            return
        self.state = State.REGISTERED
        self.peer_id = welcome.router_id
        events.append(PeerAuthenticated(welcome.router_id))

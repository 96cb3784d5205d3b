"""Direct paths: the DIRECT_* control frame bodies and the 64-byte UDP probes. No I/O.

docs/protocol.md section 18 has the layouts. The bodies are binary, big-endian like the
frame header: they carry keys, addresses and ports, which JSON would spell in hex and
strings only to be parsed back. Every body starts with a version byte (1) and a flags byte
(0); a version other than 1 is ``UnsupportedVersion``, which a receiver ignores and counts
like an unknown command, every other fault ``DirectMessageError``. Parsing is strict:
exact lengths, no trailing bytes, reserved bits zero, counts and values within bounds,
no duplicates. The same checks run when a message is built (the dataclasses check
themselves), so nothing invalid is ever encoded either.

Addresses on the wire:

    A   u8 family (4 or 6) | 4 or 16 bytes                      an address
    A0  as A, or family 0 and nothing more                       an optional address
    E   A | u16 port                                             an endpoint
    E0  as E, or family 0 and nothing more                       an optional endpoint
    N   u8 family | u8 prefix length | 4 or 16 bytes             a network, host bits zero
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, TypeVar

from polevpn.packet.routing import IPAddress, IPNetwork
from polevpn.proto import wire

VERSION = 1
PAIR_ID_LEN = 16
SECRET_LEN = 32
TOKEN_LEN = 16
ENDPOINT_KEY_LEN = 32
PROOF_LEN = 32
# key material and endpoint credentials live at most a day; the router renews them sooner
MAX_LIFETIME = 86_400
# a gateway reports at most this many local endpoints (its addresses, the direct socket's
# port); an offer carries those and the public ones the router saw
MAX_LOCAL_CANDIDATES = 8
MAX_OFFER_CANDIDATES = 16
# a grant: what a gateway may register (256 networks, its own addresses) with room to spare
MAX_OFFER_NETWORKS = 1024
# an RTT in microseconds; this value says "not measured"
RTT_UNKNOWN = 0xFFFFFFFF


_E = TypeVar("_E", bound=IntEnum)


class DirectMessageError(ValueError):
    """Bytes that are not a valid direct-path message (or a message that cannot be built)."""


class UnsupportedVersion(DirectMessageError):
    """A body of another version of the direct-path messages: ignore it, count it."""


# ---- addresses ----------------------------------------------------------------------------


def _check_unicast(addr: IPAddress, what: str) -> None:
    # an address a gateway could be reached at: no wildcard, no group, and one spelling per
    # IPv4 address (an IPv4-mapped IPv6 address would be a second)
    if addr.is_unspecified or addr.is_multicast:
        raise DirectMessageError(f"{what} {addr} is not a unicast address")
    if addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255"):
        raise DirectMessageError(f"{what} {addr} is not a unicast address")
    if addr.version == 6 and addr.ipv4_mapped is not None:  # type: ignore[union-attr]
        raise DirectMessageError(f"{what} {addr} is IPv4-mapped: send it as IPv4")
    if addr.version == 6 and addr.scope_id is not None:  # type: ignore[union-attr]
        # a zone means something on one host only, and the wire has no room for it
        raise DirectMessageError(f"{what} {addr} has a zone")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A UDP address and port."""

    address: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise DirectMessageError(f"endpoint address {self.address!r} is not an address")
        _check_unicast(self.address, "endpoint")
        if not 1 <= self.port <= 0xFFFF:
            raise DirectMessageError(f"endpoint port {self.port} is not within 1..65535")

    @classmethod
    def from_sockaddr(cls, sockaddr: tuple) -> Endpoint:
        """From a socket address tuple ("198.18.0.1", 4000) or IPv6's 4-tuple. An IPv4
        peer seen on an IPv6 socket (::ffff:a.b.c.d) becomes its IPv4 endpoint."""
        try:
            addr = ipaddress.ip_address(sockaddr[0])
        except ValueError:
            raise DirectMessageError(f"{sockaddr[0]!r} is not an IP address") from None
        if addr.version == 6 and addr.ipv4_mapped is not None:  # type: ignore[union-attr]
            addr = addr.ipv4_mapped  # type: ignore[union-attr]
        return cls(addr, int(sockaddr[1]))

    def sockaddr(self) -> tuple[str, int]:
        return str(self.address), self.port

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


class _Reader:
    """Reads a body front to back; any shortfall is a DirectMessageError."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self.data = bytes(data)
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise DirectMessageError(f"{self.what}: truncated at byte {len(self.data)}")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def address(self, optional: bool = False) -> IPAddress | None:
        family = self.u8()
        if family == 4:
            return ipaddress.IPv4Address(self.take(4))
        if family == 6:
            return ipaddress.IPv6Address(self.take(16))
        if family == 0 and optional:
            return None
        raise DirectMessageError(f"{self.what}: address family {family} is not 4 or 6")

    def endpoint(self, optional: bool = False) -> Endpoint | None:
        addr = self.address(optional)
        if addr is None:
            return None
        return Endpoint(addr, self.u16())

    def network(self) -> IPNetwork:
        family = self.u8()
        plen = self.u8()
        if family == 4:
            raw, bits = self.take(4), 32
        elif family == 6:
            raw, bits = self.take(16), 128
        else:
            raise DirectMessageError(f"{self.what}: network family {family} is not 4 or 6")
        if plen > bits:
            raise DirectMessageError(f"{self.what}: prefix length {plen} exceeds {bits}")
        try:
            return ipaddress.ip_network((raw, plen))
        except ValueError:
            raise DirectMessageError(f"{self.what}: network with host bits set") from None

    def header(self) -> None:
        """The version and flags bytes every body starts with."""
        version = self.u8()
        if version != VERSION:
            raise UnsupportedVersion(f"{self.what}: version {version} (this end speaks 1)")
        flags = self.u8()
        if flags:
            raise DirectMessageError(f"{self.what}: flags {flags:#04x} (none are defined)")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise DirectMessageError(
                f"{self.what}: {len(self.data) - self.pos} bytes after the message"
            )


def _address(addr: IPAddress | None) -> bytes:
    if addr is None:
        return b"\0"
    return (b"\x04" if addr.version == 4 else b"\x06") + addr.packed


def _endpoint(ep: Endpoint | None) -> bytes:
    if ep is None:
        return b"\0"
    return _address(ep.address) + ep.port.to_bytes(2, "big")


def _network(net: IPNetwork) -> bytes:
    fam = b"\x04" if net.version == 4 else b"\x06"
    return fam + bytes([net.prefixlen]) + net.network_address.packed


def _check_bytes(value: object, size: int, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise DirectMessageError(f"{what} is not {size} bytes")


def _check_lifetime(lifetime: int) -> None:
    if not 1 <= lifetime <= MAX_LIFETIME:
        raise DirectMessageError(f"lifetime {lifetime} s is not within 1..{MAX_LIFETIME}")


def _check_unique(items: tuple, what: str) -> None:
    if len(set(items)) != len(items):
        raise DirectMessageError(f"{what} named twice")


def _enum(cls: type[_E], value: int, what: str) -> _E:
    try:
        return cls(value)
    except (ValueError, TypeError):
        names = ", ".join(f"{m.value} {m.name.lower()}" for m in cls)
        raise DirectMessageError(f"{what} {value!r} is not one of {names}") from None


_HEADER = bytes([VERSION, 0])


# ---- control frames -----------------------------------------------------------------------


class CandidateKind(IntEnum):
    """Where an endpoint in an offer comes from."""

    HOST = 1  # the gateway reported it (DIRECT_CANDIDATES): an address of its own host
    PUBLIC = 2  # the router saw the gateway's endpoint probe come from it (its NAT mapping)


@dataclass(frozen=True, slots=True)
class Candidate:
    kind: CandidateKind
    endpoint: Endpoint

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _enum(CandidateKind, self.kind, "candidate kind"))
        if not isinstance(self.endpoint, Endpoint):
            raise DirectMessageError(f"candidate {self.endpoint!r} is not an Endpoint")


@dataclass(frozen=True, slots=True)
class EndpointParams:
    """DIRECT_ENDPOINT, router -> gateway: where and with what to send endpoint probes.

    ``udp_address`` None: the host the gateway dialled (the router's kcp:// listener there).
    ``token`` names the gateway in its probes; ``key`` authenticates them and the replies.
    """

    COMMAND: ClassVar[int] = wire.Command.DIRECT_ENDPOINT

    udp_address: IPAddress | None
    udp_port: int
    token: bytes
    key: bytes = field(repr=False)
    lifetime: int

    def __post_init__(self) -> None:
        if self.udp_address is not None:
            _check_unicast(self.udp_address, "router UDP address")
        if not 1 <= self.udp_port <= 0xFFFF:
            raise DirectMessageError(f"router UDP port {self.udp_port} is not within 1..65535")
        _check_bytes(self.token, TOKEN_LEN, "endpoint token")
        _check_bytes(self.key, ENDPOINT_KEY_LEN, "endpoint key")
        _check_lifetime(self.lifetime)

    def encode(self) -> bytes:
        return b"".join(
            (
                _HEADER,
                _address(self.udp_address),
                self.udp_port.to_bytes(2, "big"),
                self.token,
                self.key,
                self.lifetime.to_bytes(4, "big"),
            )
        )

    @classmethod
    def decode(cls, body: bytes | memoryview) -> EndpointParams:
        r = _Reader(body, "DIRECT_ENDPOINT")
        r.header()
        addr = r.address(optional=True)
        port = r.u16()
        token = r.take(TOKEN_LEN)
        key = r.take(ENDPOINT_KEY_LEN)
        lifetime = r.u32()
        r.end()
        return cls(addr, port, token, key, lifetime)


@dataclass(frozen=True, slots=True)
class Candidates:
    """DIRECT_CANDIDATES, gateway -> router: the gateway's own endpoints (its host's
    addresses with the direct socket's port). The router adds the public one it saw."""

    COMMAND: ClassVar[int] = wire.Command.DIRECT_CANDIDATES

    endpoints: tuple[Endpoint, ...]

    def __post_init__(self) -> None:
        if len(self.endpoints) > MAX_LOCAL_CANDIDATES:
            raise DirectMessageError(
                f"{len(self.endpoints)} candidates (at most {MAX_LOCAL_CANDIDATES})"
            )
        for ep in self.endpoints:
            if not isinstance(ep, Endpoint):
                raise DirectMessageError(f"candidate {ep!r} is not an Endpoint")
        _check_unique(self.endpoints, "a candidate")

    def encode(self) -> bytes:
        return _HEADER + bytes([len(self.endpoints)]) + b"".join(map(_endpoint, self.endpoints))

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Candidates:
        r = _Reader(body, "DIRECT_CANDIDATES")
        r.header()
        n = r.u8()
        if n > MAX_LOCAL_CANDIDATES:
            raise DirectMessageError(f"{n} candidates (at most {MAX_LOCAL_CANDIDATES})")
        eps = tuple(r.endpoint() for _ in range(n))
        r.end()
        return cls(eps)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Offer:
    """DIRECT_OFFER, router -> gateway: go direct to ``peer``.

    ``you``: the receiving gateway's address as the router registered it (the key
    derivation binds both addresses, so the gateway checks it is its own); ``peer``: the
    other gateway's; ``candidates``: where the peer may be reached; ``networks``: what the
    router grants the peer, the only sources accepted from it directly; ``pair_id``,
    ``secret`` and ``lifetime``: the key material of this pair, the same in both offers.
    """

    COMMAND: ClassVar[int] = wire.Command.DIRECT_OFFER

    pair_id: bytes
    lifetime: int
    secret: bytes = field(repr=False)
    you: IPAddress
    peer: IPAddress
    candidates: tuple[Candidate, ...]
    networks: tuple[IPNetwork, ...]

    def __post_init__(self) -> None:
        _check_bytes(self.pair_id, PAIR_ID_LEN, "pair id")
        _check_bytes(self.secret, SECRET_LEN, "pair secret")
        _check_lifetime(self.lifetime)
        for what, addr in (("your address", self.you), ("peer address", self.peer)):
            if not isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise DirectMessageError(f"{what} {addr!r} is not an address")
            _check_unicast(addr, what)
        if self.you == self.peer:
            raise DirectMessageError(f"offer of a direct path from {self.you} to itself")
        if not 1 <= len(self.candidates) <= MAX_OFFER_CANDIDATES:
            raise DirectMessageError(
                f"{len(self.candidates)} candidates (1 to {MAX_OFFER_CANDIDATES})"
            )
        for c in self.candidates:
            if not isinstance(c, Candidate):
                raise DirectMessageError(f"candidate {c!r} is not a Candidate")
        _check_unique(tuple(c.endpoint for c in self.candidates), "a candidate endpoint")
        if len(self.networks) > MAX_OFFER_NETWORKS:
            raise DirectMessageError(
                f"{len(self.networks)} networks (at most {MAX_OFFER_NETWORKS})"
            )
        for net in self.networks:
            if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise DirectMessageError(f"network {net!r} is not a network")
        _check_unique(self.networks, "a network")

    def encode(self) -> bytes:
        cands = b"".join(bytes([c.kind]) + _endpoint(c.endpoint) for c in self.candidates)
        return b"".join(
            (
                _HEADER,
                self.pair_id,
                self.lifetime.to_bytes(4, "big"),
                self.secret,
                _address(self.you),
                _address(self.peer),
                bytes([len(self.candidates)]),
                cands,
                len(self.networks).to_bytes(2, "big"),
                b"".join(map(_network, self.networks)),
            )
        )

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Offer:
        r = _Reader(body, "DIRECT_OFFER")
        r.header()
        pair_id = r.take(PAIR_ID_LEN)
        lifetime = r.u32()
        secret = r.take(SECRET_LEN)
        you = r.address()
        peer = r.address()
        n = r.u8()
        if not 1 <= n <= MAX_OFFER_CANDIDATES:
            raise DirectMessageError(f"{n} candidates (1 to {MAX_OFFER_CANDIDATES})")
        cands = []
        for _ in range(n):
            kind = r.u8()
            cands.append(Candidate(kind, r.endpoint()))  # type: ignore[arg-type]
        m = r.u16()
        if m > MAX_OFFER_NETWORKS:
            raise DirectMessageError(f"{m} networks (at most {MAX_OFFER_NETWORKS})")
        nets = tuple(r.network() for _ in range(m))
        r.end()
        return cls(pair_id, lifetime, secret, you, peer, tuple(cands), nets)  # type: ignore[arg-type]


class RevokeReason(IntEnum):
    REVOKED = 1  # the router no longer grants the peer (a reload removed or changed it)
    PEER_GONE = 2  # the peer's last connection to the router closed
    REPLACED = 3  # newer key material for this pair follows (or went out) in an offer
    DISABLED = 4  # direct paths were turned off for one of the two


@dataclass(frozen=True, slots=True)
class Revoke:
    """DIRECT_REVOKE, router -> gateway: close the direct path of this pair now and forget
    its key material; its traffic goes through the router again."""

    COMMAND: ClassVar[int] = wire.Command.DIRECT_REVOKE

    pair_id: bytes
    reason: RevokeReason

    def __post_init__(self) -> None:
        _check_bytes(self.pair_id, PAIR_ID_LEN, "pair id")
        object.__setattr__(self, "reason", _enum(RevokeReason, self.reason, "revoke reason"))

    def encode(self) -> bytes:
        return _HEADER + self.pair_id + bytes([self.reason])

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Revoke:
        r = _Reader(body, "DIRECT_REVOKE")
        r.header()
        pair_id = r.take(PAIR_ID_LEN)
        reason = r.u8()
        r.end()
        return cls(pair_id, reason)  # type: ignore[arg-type]


class PathCode(IntEnum):
    RELAYED = 0
    PUNCHING = 1
    DIRECT = 2


class Cause(IntEnum):
    """Why a path is not (or no longer) direct."""

    NONE = 0
    NO_ANSWER = 1  # punching found no candidate pair that answers (symmetric NAT, firewall)
    SILENCE = 2  # the direct path fell silent
    HANDSHAKE = 3  # DTLS or the channel proof failed
    EXPIRED = 4  # the key material expired before a new offer came
    REVOKED = 5  # the router revoked the pair


@dataclass(frozen=True, slots=True)
class Status:
    """DIRECT_STATUS, gateway -> router: how the path of a pair is doing (visibility).

    ``rtt`` in seconds or None; byte counts of IP packets over the direct path since the
    offer; ``refused``: packets from the peer dropped by the anti-spoofing check;
    ``endpoint``: the peer endpoint in use, if direct."""

    COMMAND: ClassVar[int] = wire.Command.DIRECT_STATUS

    pair_id: bytes
    state: PathCode
    cause: Cause
    rtt: float | None
    bytes_sent: int
    bytes_received: int
    refused: int
    endpoint: Endpoint | None = None

    def __post_init__(self) -> None:
        _check_bytes(self.pair_id, PAIR_ID_LEN, "pair id")
        object.__setattr__(self, "state", _enum(PathCode, self.state, "path state"))
        object.__setattr__(self, "cause", _enum(Cause, self.cause, "cause"))
        if self.rtt is not None and not 0 <= self.rtt < RTT_UNKNOWN / 1e6:
            raise DirectMessageError(f"rtt {self.rtt} s out of range")
        for name in ("bytes_sent", "bytes_received", "refused"):
            if not 0 <= getattr(self, name) < 1 << 64:
                raise DirectMessageError(f"{name} out of range")

    def encode(self) -> bytes:
        rtt = RTT_UNKNOWN if self.rtt is None else min(round(self.rtt * 1e6), RTT_UNKNOWN - 1)
        return (
            _HEADER
            + self.pair_id
            + struct.pack(
                ">BBIQQQ",
                self.state,
                self.cause,
                rtt,
                self.bytes_sent,
                self.bytes_received,
                self.refused,
            )
            + _endpoint(self.endpoint)
        )

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Status:
        r = _Reader(body, "DIRECT_STATUS")
        r.header()
        pair_id = r.take(PAIR_ID_LEN)
        state, cause = r.u8(), r.u8()
        rtt_us = r.u32()
        sent, received, refused = r.u64(), r.u64(), r.u64()
        ep = r.endpoint(optional=True)
        r.end()
        rtt = None if rtt_us == RTT_UNKNOWN else rtt_us / 1e6
        return cls(pair_id, state, cause, rtt, sent, received, refused, ep)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Proof:
    """DIRECT_PROOF, gateway -> gateway, the first frame each way on a direct path's
    session: proves the pair's key material, bound to this DTLS association
    (``keys.PairKeys.channel_proof``)."""

    COMMAND: ClassVar[int] = wire.Command.DIRECT_PROOF

    pair_id: bytes
    proof: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.pair_id, PAIR_ID_LEN, "pair id")
        _check_bytes(self.proof, PROOF_LEN, "proof")

    def encode(self) -> bytes:
        return _HEADER + self.pair_id + self.proof

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Proof:
        r = _Reader(body, "DIRECT_PROOF")
        r.header()
        pair_id = r.take(PAIR_ID_LEN)
        proof = r.take(PROOF_LEN)
        r.end()
        return cls(pair_id, proof)


Message = EndpointParams | Candidates | Offer | Revoke | Status | Proof

_BY_COMMAND: dict[int, type] = {
    cls.COMMAND: cls for cls in (EndpointParams, Candidates, Offer, Revoke, Status, Proof)
}
COMMANDS = frozenset(_BY_COMMAND)


def decode(command: int, body: bytes | memoryview) -> Message:
    """The message of a DIRECT_* frame; DirectMessageError if it is none."""
    cls = _BY_COMMAND.get(command)
    if cls is None:
        raise DirectMessageError(f"command {command} is not a direct-path command")
    if len(body) > wire.MAX_BODY:
        raise DirectMessageError(f"body of {len(body)} bytes")
    return cls.decode(body)


def encode(msg: Message, seq: int = 0) -> bytes:
    """The whole frame (header and body) of ``msg``."""
    return wire.encode_frame(msg.COMMAND, msg.encode(), seq)


# ---- UDP probes ---------------------------------------------------------------------------

# the first byte of every direct-path datagram: not a DTLS record (20..25), not a bare KCP
# buffer (0x00), not an FEC shard (0xF3), so one socket tells them apart by it
MAGIC = 0xD1
DATAGRAM_LEN = 64
TAG_LEN = 16
SIGNED_LEN = DATAGRAM_LEN - TAG_LEN
# the fixed endpoint slot: u8 family (0, 4, 6) | 16 bytes address (IPv4 in the first 4,
# the rest zero) | u16 port
_SLOT = 28
_SLOT_LEN = 19
FLAG_NOMINATE = 0x01


class DatagramKind(IntEnum):
    ENDPOINT_PROBE = 1  # gateway -> router's kcp:// port
    ENDPOINT_REPLY = 2  # router -> gateway: the endpoint the probe came from
    PROBE = 3  # gateway -> gateway, to a candidate
    ACK = 4  # gateway -> gateway: the answer to a PROBE, with its source as seen


@dataclass(frozen=True, slots=True)
class Datagram:
    """One 64-byte direct-path datagram (docs/protocol.md section 18).

    ``ident``: the endpoint token (ENDPOINT_*) or the pair id (PROBE, ACK); ``nonce``: the
    probe's counter or random token, which the answer echoes; ``seen``: in an answer, the
    endpoint the probe came from as the answering side saw it; ``flags``: FLAG_NOMINATE on
    a PROBE only.
    """

    kind: DatagramKind
    ident: bytes
    nonce: int
    seen: Endpoint | None = None
    flags: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _enum(DatagramKind, self.kind, "datagram kind"))
        _check_bytes(self.ident, 16, "datagram id")
        if not 0 <= self.nonce < 1 << 64:
            raise DirectMessageError("datagram nonce out of range")
        answer = self.kind in (DatagramKind.ENDPOINT_REPLY, DatagramKind.ACK)
        if (self.seen is not None) != answer:
            raise DirectMessageError("only an answer names the endpoint it saw")
        allowed = FLAG_NOMINATE if self.kind is DatagramKind.PROBE else 0
        if self.flags & ~allowed:
            raise DirectMessageError(f"datagram flags {self.flags:#04x}")

    @property
    def nominate(self) -> bool:
        return bool(self.flags & FLAG_NOMINATE)

    def encode(self, key: bytes) -> bytes:
        """The datagram, tagged with ``key`` (HMAC-SHA256, the first 16 bytes)."""
        if self.seen is None:
            slot = bytes(_SLOT_LEN)
        else:
            addr = self.seen.address.packed.ljust(16, b"\0")
            fam = 4 if self.seen.address.version == 4 else 6
            slot = bytes([fam]) + addr + self.seen.port.to_bytes(2, "big")
        signed = (
            bytes([MAGIC, self.kind, self.flags, 0])
            + self.ident
            + self.nonce.to_bytes(8, "big")
            + slot
            + b"\0"
        )
        return signed + tag(key, signed)


def tag(key: bytes, signed: bytes) -> bytes:
    return hmac.new(key, signed, hashlib.sha256).digest()[:TAG_LEN]


def is_datagram(data: bytes | memoryview) -> bool:
    """Whether a received datagram is a direct-path one (the demux's test)."""
    return len(data) == DATAGRAM_LEN and data[0] == MAGIC


def parse_datagram(data: bytes | memoryview) -> Datagram:
    """The fields of a direct-path datagram, its tag not yet checked (``authentic``): the
    receiver needs ``ident`` to find the key."""
    data = bytes(data)
    if len(data) != DATAGRAM_LEN:
        raise DirectMessageError(f"datagram of {len(data)} bytes (not {DATAGRAM_LEN})")
    if data[0] != MAGIC:
        raise DirectMessageError(f"datagram magic {data[0]:#04x}")
    kind = data[1]
    if data[3] or data[47]:
        raise DirectMessageError("datagram reserved bytes not zero")
    slot = data[_SLOT : _SLOT + _SLOT_LEN]
    fam = slot[0]
    seen: Endpoint | None
    if fam == 0:
        if any(slot):
            raise DirectMessageError("datagram endpoint slot: family 0 with bytes set")
        seen = None
    elif fam == 4:
        if any(slot[5:17]):
            raise DirectMessageError("datagram endpoint slot: IPv4 with bytes after it")
        seen = Endpoint(ipaddress.IPv4Address(slot[1:5]), int.from_bytes(slot[17:19], "big"))
    elif fam == 6:
        seen = Endpoint(ipaddress.IPv6Address(slot[1:17]), int.from_bytes(slot[17:19], "big"))
    else:
        raise DirectMessageError(f"datagram endpoint family {fam}")
    return Datagram(
        kind,  # type: ignore[arg-type]
        data[4:20],
        int.from_bytes(data[20:28], "big"),
        seen,
        data[2],
    )


def authentic(data: bytes | memoryview, key: bytes) -> bool:
    """Whether the datagram's tag was made with ``key`` (compared in constant time)."""
    if len(data) != DATAGRAM_LEN:
        return False
    data = bytes(data)
    return hmac.compare_digest(data[SIGNED_LEN:], tag(key, data[:SIGNED_LEN]))

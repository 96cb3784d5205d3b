"""JSON bodies of the control frames (AUTH, REGISTER and their replies). No I/O.

Parsing is strict about types and lenient about extra fields: unknown fields are ignored so
that later features can be negotiated by adding fields, as PoleVPN peers do.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass

from polevpn.packet.routing import IPAddress, IPNetwork

OK_BODY = b"{}"

# Optional extensions, offered by the gateway in AUTH ("features") and accepted by the router
# listing the ones it will use in its AUTH reply. A PoleVPN peer ignores the field.
FEATURE_SUPER = "super-packets"
# several connections (links) of one gateway, each REGISTER carrying a "link" object
FEATURE_MULTILINK = "multi-link"
# a link between two routers of a cluster (docs/protocol.md section 17): AUTH and REGISTER
# carry a "router" object instead of a gateway's key and networks
FEATURE_PEER = "router-peer"
# direct paths between gateways through NAT (docs/protocol.md section 18): the messages
# (commands 32..37) are in polevpn.direct
FEATURE_DIRECT = "direct"
KNOWN_FEATURES = frozenset({FEATURE_SUPER, FEATURE_MULTILINK, FEATURE_PEER, FEATURE_DIRECT})

# a link name: what logs, metrics labels and the API show, so short and plain
# links one multi-link site may have at once (docs/protocol.md section 16)
MAX_LINKS = 8
LINK_NAME = re.compile(r"[A-Za-z0-9._-]{1,32}")
# what an address field may hold before ``ipaddress`` reads it: hex digits, dots, colons and
# the prefix slash. ``ipaddress`` itself takes IPv6 zone IDs ("2001:db8::1%x", any bytes
# after the %), which would make a second, distinct "address" for one gateway and carry
# control characters into the logs
ADDRESS_CHARS = re.compile(r"[0-9A-Fa-f.:]{1,45}")
NETWORK_CHARS = re.compile(r"[0-9A-Fa-f.:]{1,45}(/[0-9]{1,3})?")
# a cluster's name and a router's id, as the config takes them
CLUSTER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# a nonce and an HMAC-SHA256 proof of a router link, in hex
PEER_NONCE_BYTES = 32
PEER_PROOF_BYTES = 32
# proofs a dialing router may send: one per cluster credential it holds (current, previous)
MAX_PEER_PROOFS = 2


class MessageError(ValueError):
    """A control body that is not valid JSON of the expected shape."""


@dataclass(frozen=True, slots=True)
class AuthRequest:
    key: str
    features: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class LinkRequest:
    """REGISTER's "link" object: which of the gateway's links this connection is.

    ``heartbeat`` and ``timeout`` (seconds) tell the router how often the gateway sends
    heartbeats on it and after how much silence the link counts as down.
    """

    name: str
    weight: float = 1.0
    backup: bool = False
    heartbeat: float = 0.25
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    gateway: IPAddress
    key: str
    networks: tuple[IPNetwork, ...]
    link: LinkRequest | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """The router's answer to AUTH or REGISTER: ``error`` is None on success."""

    error: str | None
    features: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PeerHello:
    """A router's part of the router-link AUTH: who it is, and its fresh nonce."""

    cluster: str
    router_id: str
    nonce: bytes


@dataclass(frozen=True, slots=True)
class PeerWelcome:
    """The listening router's AUTH reply on a router link: an error, or its hello."""

    error: str | None
    features: frozenset[str] = frozenset()
    hello: PeerHello | None = None


@dataclass(frozen=True, slots=True)
class PeerProofReply:
    """The listening router's REGISTER reply on a router link: an error, or its proof."""

    error: str | None
    proof: bytes = b""


def _unique(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, or MessageError if it names a key twice: which of the two counts would
    be a guess (Python takes the last, other parsers the first)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise MessageError(f"key {_quote(key)} appears twice")
            seen.add(key)
    return obj


def _load_object(body: bytes | memoryview) -> dict:
    try:
        # UTF-8 only, as RFC 8259 asks of JSON between systems and as Go's encoding/json
        # writes it; json.loads on bytes would also take UTF-16 and UTF-32
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("body is not UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique)
    except MessageError:
        raise
    except ValueError as exc:
        raise MessageError(f"body is not JSON: {exc}") from None
    except RecursionError:
        # an unauthenticated peer can nest brackets tens of thousands deep in one frame
        raise MessageError("body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise MessageError("body is not a JSON object")
    return obj


def _key(obj: dict) -> str:
    key = obj.get("key", "")
    if not isinstance(key, str):
        raise MessageError("key is not a string")
    try:
        # JSON's \ud800 escapes decode to lone surrogates, which no configured key holds
        # and which the key comparison (on UTF-8 bytes) cannot encode
        key.encode()
    except UnicodeEncodeError:
        raise MessageError("key is not valid Unicode") from None
    return key


# how much of a bad value an error message quotes: the message goes back to the peer in the
# REGISTER reply, where JSON's \uXXXX escapes make a long non-ASCII value up to 3x its size
# and too long for one frame
QUOTE_MAX = 64


def _quote(value: str) -> str:
    if len(value) <= QUOTE_MAX:
        return repr(value)
    return f"{value[:QUOTE_MAX]!r}... ({len(value)} characters)"


def _printable(text: str) -> str:
    """``text`` with lone surrogates escaped, so logging it cannot fail."""
    return text.encode("utf-8", "backslashreplace").decode()


def _features(obj: dict) -> frozenset[str]:
    """Known feature names; anything else in the list is for a newer peer and ignored."""
    raw = obj.get("features")
    if not isinstance(raw, list):
        return frozenset()
    return frozenset(f for f in raw if isinstance(f, str) and f in KNOWN_FEATURES)


def parse_auth(body: bytes | memoryview) -> AuthRequest:
    obj = _load_object(body)
    return AuthRequest(key=_key(obj), features=_features(obj))


def parse_register(body: bytes | memoryview) -> RegisterRequest:
    obj = _load_object(body)
    raw_gw = obj.get("gateway")
    if not isinstance(raw_gw, str):
        raise MessageError("gateway is missing or not a string")
    try:
        if not ADDRESS_CHARS.fullmatch(raw_gw):
            raise ValueError
        gateway = ipaddress.ip_address(raw_gw)
    except ValueError:
        raise MessageError(f"gateway {_quote(raw_gw)} is not an IP address") from None
    raw_nets = obj.get("network", [])
    if raw_nets is None:
        raw_nets = []
    elif isinstance(raw_nets, str):
        # the Go gateway of some versions sends one network as a plain string
        raw_nets = [raw_nets] if raw_nets else []
    if not isinstance(raw_nets, list):
        raise MessageError("network is not a list or string")
    networks = []
    for item in raw_nets:
        if not isinstance(item, str):
            raise MessageError("network entry is not a string")
        try:
            if not NETWORK_CHARS.fullmatch(item):
                raise ValueError
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise MessageError(f"network {_quote(item)} is not a CIDR") from None
    link = _link(obj["link"]) if obj.get("link") is not None else None
    return RegisterRequest(gateway=gateway, key=_key(obj), networks=tuple(networks), link=link)


def _number(obj: dict, name: str, default: float, low: float, high: float) -> float:
    value = obj.get(name, default)
    # bool is an int to Python, and no weight or timeout is true or false
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MessageError(f"link {name} is not a number")
    # the range check before any float(): a JSON integer may be too large for a float
    if not (low <= value <= high) or not math.isfinite(value):
        text = str(value)
        if len(text) > QUOTE_MAX:
            text = f"{text[:QUOTE_MAX]}... ({len(text)} digits)"
        raise MessageError(f"link {name} {text} is not within {low:g}..{high:g}")
    return float(value)


def _link(raw: object) -> LinkRequest:
    if not isinstance(raw, dict):
        raise MessageError("link is not a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not LINK_NAME.fullmatch(name):
        shown = _quote(name) if isinstance(name, str) else type(name).__name__
        raise MessageError(f"link name {shown} is not 1-32 of A-Z a-z 0-9 . _ -")
    backup = raw.get("backup", False)
    if not isinstance(backup, bool):
        raise MessageError("link backup is not true or false")
    heartbeat = _number(raw, "heartbeat_ms", 250, 10, 60_000) / 1000
    timeout = _number(raw, "timeout_ms", 1000, 100, 600_000) / 1000
    if timeout <= heartbeat:
        raise MessageError("link timeout_ms must be longer than heartbeat_ms")
    return LinkRequest(
        name=name,
        weight=_number(raw, "weight", 1, 0.001, 1000),
        backup=backup,
        heartbeat=heartbeat,
        timeout=timeout,
    )


def parse_reply(body: bytes | memoryview) -> Reply:
    obj = _load_object(body)
    err = obj.get("error")
    if err is None or err == "":
        return Reply(error=None, features=_features(obj))
    return Reply(error=_printable(str(err)))


def encode_auth(key: str, features: frozenset[str] = frozenset()) -> bytes:
    # compact separators reproduce the Go gateway's bytes exactly when nothing is offered
    body: dict = {"key": key}
    if features:
        body["features"] = sorted(features)
    return json.dumps(body, separators=(",", ":")).encode()


def encode_ok(features: frozenset[str] = frozenset()) -> bytes:
    if not features:
        return OK_BODY
    return json.dumps({"features": sorted(features)}, separators=(",", ":")).encode()


def encode_register(
    gateway: str, key: str, networks: list[str], link: LinkRequest | None = None
) -> bytes:
    body: dict = {"gateway": gateway, "key": key, "network": networks}
    if link is not None:
        body["link"] = {
            "name": link.name,
            "weight": link.weight,
            "backup": link.backup,
            "heartbeat_ms": round(link.heartbeat * 1000),
            "timeout_ms": round(link.timeout * 1000),
        }
    return json.dumps(body, separators=(",", ":")).encode()


def encode_error(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode()


# ---- router links (FEATURE_PEER) -----------------------------------------------------------


def _hex(raw: object, name: str, size: int) -> bytes:
    if not isinstance(raw, str) or len(raw) != 2 * size:
        raise MessageError(f"router {name} is not {size} bytes in hex")
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise MessageError(f"router {name} is not {size} bytes in hex") from None


def _router_object(obj: dict) -> dict:
    raw = obj.get("router")
    if not isinstance(raw, dict):
        raise MessageError("router is missing or not a JSON object")
    return raw


def _hello(raw: dict) -> PeerHello:
    out = []
    for name in ("cluster", "id"):
        value = raw.get(name)
        if not isinstance(value, str) or not CLUSTER_ID.fullmatch(value):
            shown = _quote(value) if isinstance(value, str) else type(value).__name__
            raise MessageError(f"router {name} {shown} is not 1-64 of A-Z a-z 0-9 . _ -")
        out.append(value)
    return PeerHello(out[0], out[1], _hex(raw.get("nonce"), "nonce", PEER_NONCE_BYTES))


def _hello_json(hello: PeerHello) -> dict:
    return {"cluster": hello.cluster, "id": hello.router_id, "nonce": hello.nonce.hex()}


def encode_peer_auth(hello: PeerHello, features: frozenset[str]) -> bytes:
    """A dialing router's AUTH: no key (a router holds none of the gateways' keys)."""
    body = {"key": "", "features": sorted(features), "router": _hello_json(hello)}
    return json.dumps(body, separators=(",", ":")).encode()


def parse_peer_auth(body: bytes | memoryview) -> PeerHello:
    return _hello(_router_object(_load_object(body)))


def encode_peer_welcome(hello: PeerHello, features: frozenset[str]) -> bytes:
    body = {"features": sorted(features), "router": _hello_json(hello)}
    return json.dumps(body, separators=(",", ":")).encode()


def parse_peer_welcome(body: bytes | memoryview) -> PeerWelcome:
    obj = _load_object(body)
    err = obj.get("error")
    if err is not None and err != "":
        return PeerWelcome(error=_printable(str(err)))
    return PeerWelcome(None, _features(obj), _hello(_router_object(obj)))


def encode_peer_proofs(proofs: list[bytes]) -> bytes:
    """A dialing router's REGISTER: a proof per credential it holds."""
    body = {"router": {"proofs": [p.hex() for p in proofs]}}
    return json.dumps(body, separators=(",", ":")).encode()


def parse_peer_proofs(body: bytes | memoryview) -> list[bytes]:
    raw = _router_object(_load_object(body)).get("proofs")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_PEER_PROOFS:
        raise MessageError(f"router proofs is not a list of 1 to {MAX_PEER_PROOFS}")
    return [_hex(p, "proof", PEER_PROOF_BYTES) for p in raw]


def encode_peer_proof(proof: bytes) -> bytes:
    return json.dumps({"router": {"proof": proof.hex()}}, separators=(",", ":")).encode()


def parse_peer_proof_reply(body: bytes | memoryview) -> PeerProofReply:
    obj = _load_object(body)
    err = obj.get("error")
    if err is not None and err != "":
        return PeerProofReply(error=_printable(str(err)))
    return PeerProofReply(None, _hex(_router_object(obj).get("proof"), "proof", PEER_PROOF_BYTES))

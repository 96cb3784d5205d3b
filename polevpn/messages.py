"""JSON bodies of the control frames (AUTH, REGISTER and their replies). No I/O.

Parsing is strict about types and lenient about extra fields: unknown fields are ignored so
that later features can be negotiated by adding fields, as PoleVPN peers do.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from .routing import IPAddress, IPNetwork

OK_BODY = b"{}"

# Optional extensions, offered by the gateway in AUTH ("features") and accepted by the router
# listing the ones it will use in its AUTH reply. A PoleVPN peer ignores the field.
FEATURE_SUPER = "super-packets"
KNOWN_FEATURES = frozenset({FEATURE_SUPER})


class MessageError(ValueError):
    """A control body that is not valid JSON of the expected shape."""


@dataclass(frozen=True, slots=True)
class AuthRequest:
    key: str
    features: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    gateway: IPAddress
    key: str
    networks: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """The router's answer to AUTH or REGISTER: ``error`` is None on success."""

    error: str | None
    features: frozenset[str] = frozenset()


def _load_object(body: bytes | memoryview) -> dict:
    try:
        obj = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
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
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise MessageError(f"network {_quote(item)} is not a CIDR") from None
    return RegisterRequest(gateway=gateway, key=_key(obj), networks=tuple(networks))


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


def encode_register(gateway: str, key: str, networks: list[str]) -> bytes:
    body = {"gateway": gateway, "key": key, "network": networks}
    return json.dumps(body, separators=(",", ":")).encode()


def encode_error(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode()

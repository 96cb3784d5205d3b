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


class MessageError(ValueError):
    """A control body that is not valid JSON of the expected shape."""


@dataclass(frozen=True, slots=True)
class AuthRequest:
    key: str


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    gateway: IPAddress
    key: str
    networks: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """The router's answer to AUTH or REGISTER: ``error`` is None on success."""

    error: str | None


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
    return key


def parse_auth(body: bytes | memoryview) -> AuthRequest:
    return AuthRequest(key=_key(_load_object(body)))


def parse_register(body: bytes | memoryview) -> RegisterRequest:
    obj = _load_object(body)
    raw_gw = obj.get("gateway")
    if not isinstance(raw_gw, str):
        raise MessageError("gateway is missing or not a string")
    try:
        gateway = ipaddress.ip_address(raw_gw)
    except ValueError:
        raise MessageError(f"gateway {raw_gw!r} is not an IP address") from None
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
            raise MessageError(f"network {item!r} is not a CIDR") from None
    return RegisterRequest(gateway=gateway, key=_key(obj), networks=tuple(networks))


def parse_reply(body: bytes | memoryview) -> Reply:
    obj = _load_object(body)
    err = obj.get("error")
    if err is None or err == "":
        return Reply(error=None)
    return Reply(error=str(err))


def encode_auth(key: str) -> bytes:
    # compact separators reproduce the Go gateway's bytes exactly
    return json.dumps({"key": key}, separators=(",", ":")).encode()


def encode_register(gateway: str, key: str, networks: list[str]) -> bytes:
    body = {"gateway": gateway, "key": key, "network": networks}
    return json.dumps(body, separators=(",", ":")).encode()


def encode_error(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode()

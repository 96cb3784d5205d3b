"""The cluster's keys in etcd: their layout, and what their values hold. No I/O.

Under ``{prefix}/{name}/`` (ClusterConfig.prefix and .name), every key of a router is
attached to that router's lease, so all of them vanish when it stops renewing it::

    {prefix}/{name}/routers/{router_id}            {"peer_address": "198.18.0.1:443",
                                                    "started": 1767225600.0, "version": "0.1.0"}
    {prefix}/{name}/routes/{router_id}/{network}   {"gateway": "169.254.0.1",
                                                    "site": "169.254.0.1"}

``network`` is the CIDR text (``198.18.10.0/24``, ``2001:db8:10::/64``); router ids have no
"/", so the key splits unambiguously. ``gateway`` is the tunnel address of the gateway
that registered the network at that router, ``site`` the office it belongs to: the gateway
address as well for a gateway (a multi-link gateway is one site over its links), ``local``
for the router host's own networks (the router's TUN).

Whatever another router, an older version or a person with etcdctl put there is read with
suspicion: a key or value that does not parse is reported as such (``Malformed``), never
raised past the caller.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass

from polevpn.packet.routing import IPNetwork

ROUTERS = "routers"
ROUTES = "routes"
# a router id, as the config allows it (polevpn.config._CLUSTER_ID)
ROUTER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# the largest value read back: ours are under 200 bytes
MAX_VALUE = 4096
SITE_LOCAL = "local"


class Malformed(ValueError):
    """A key or value in the cluster's prefix that is not what a router writes."""


@dataclass(frozen=True, slots=True)
class RouterKey:
    router_id: str


@dataclass(frozen=True, slots=True)
class RouteKey:
    router_id: str
    network: IPNetwork


@dataclass(frozen=True, slots=True)
class RouterInfo:
    """What a router says of itself: where peers reach it, and since when it runs."""

    peer_address: tuple[str, int]
    started: float
    version: str = ""

    @property
    def peer_address_text(self) -> str:
        host, port = self.peer_address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """What a route key holds: the gateway that registered the network, and its site."""

    gateway: str
    site: str


def _valid_id(text: str) -> bool:
    return bool(ROUTER_ID.fullmatch(text)) and text not in (".", "..")


@dataclass(frozen=True)
class Layout:
    """The keys of one cluster: ``prefix`` ("/polevpn") and ``name`` from its config."""

    prefix: str
    name: str

    @property
    def root(self) -> bytes:
        """Every key of the cluster starts with this (what a router watches)."""
        return f"{self.prefix}/{self.name}/".encode()

    def router_key(self, router_id: str) -> bytes:
        return f"{self.prefix}/{self.name}/{ROUTERS}/{router_id}".encode()

    def route_key(self, router_id: str, network: IPNetwork) -> bytes:
        return f"{self.prefix}/{self.name}/{ROUTES}/{router_id}/{network}".encode()

    def parse(self, key: bytes) -> RouterKey | RouteKey:
        """Which router's (and network's) key ``key`` is; Malformed if it is none."""
        root = self.root
        if not key.startswith(root):
            raise Malformed("outside the cluster's prefix")
        try:
            rest = key[len(root) :].decode("ascii")
        except UnicodeDecodeError:
            raise Malformed("not ASCII") from None
        kind, _, tail = rest.partition("/")
        if kind == ROUTERS:
            if not _valid_id(tail):
                raise Malformed(f"router id {tail[:70]!r}")
            return RouterKey(tail)
        if kind == ROUTES:
            router_id, _, net_text = tail.partition("/")
            if not _valid_id(router_id):
                raise Malformed(f"router id {router_id[:70]!r}")
            try:
                network = ipaddress.ip_network(net_text)
            except ValueError:
                raise Malformed(f"network {net_text[:60]!r}") from None
            if str(network) != net_text:
                # only the canonical text: two spellings of one network would be two keys
                raise Malformed(f"network {net_text[:60]!r} is not in canonical form")
            return RouteKey(router_id, network)
        raise Malformed(f"unknown kind {kind[:20]!r}")


def _object(value: bytes) -> dict[str, object]:
    if len(value) > MAX_VALUE:
        raise Malformed(f"value of {len(value)} bytes")
    try:
        obj = json.loads(value)
    except (ValueError, RecursionError):
        raise Malformed("value is not JSON") from None
    if not isinstance(obj, dict):
        raise Malformed("value is not a JSON object")
    return obj


def _text(obj: dict[str, object], key: str, limit: int = 256) -> str:
    val = obj.get(key)
    if not isinstance(val, str) or not val or len(val) > limit or not val.isprintable():
        raise Malformed(f"{key} is not a short printable string")
    return val


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; Malformed otherwise."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise Malformed(f"{text[:80]!r} is not host:port")
    if not 0 < int(port) < 65536:
        raise Malformed(f"port {port} out of range")
    return host, int(port)


def encode_router(info: RouterInfo) -> bytes:
    return json.dumps(
        {
            "peer_address": info.peer_address_text,
            "started": info.started,
            "version": info.version,
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()


def decode_router(value: bytes) -> RouterInfo:
    obj = _object(value)
    started = obj.get("started")
    if isinstance(started, bool) or not isinstance(started, int | float):
        raise Malformed("started is not a number")
    if not math.isfinite(started) or started < 0:
        raise Malformed("started is not a time")
    version = obj.get("version", "")
    if not isinstance(version, str) or len(version) > 64 or not version.isprintable():
        raise Malformed("version is not a short string")
    return RouterInfo(split_host_port(_text(obj, "peer_address")), float(started), version)


def encode_route(info: RouteInfo) -> bytes:
    return json.dumps(
        {"gateway": info.gateway, "site": info.site}, separators=(",", ":"), sort_keys=True
    ).encode()


def decode_route(value: bytes) -> RouteInfo:
    obj = _object(value)
    gateway = _text(obj, "gateway", 64)
    try:
        ipaddress.ip_address(gateway)
    except ValueError:
        raise Malformed(f"gateway {gateway!r} is not an IP address") from None
    return RouteInfo(gateway, _text(obj, "site", 64))

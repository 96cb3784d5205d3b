"""Typed configuration for router and gateway, parsed and validated once at start-up.

Field names and shapes follow PoleVPN's config.json; additions are optional. Every error
names the file, the field and the problem, so an operator can fix it from one log line.
Relative paths inside a config file are resolved against that file's directory.
"""

from __future__ import annotations

import encodings.idna
import hashlib
import ipaddress
import json
import logging
import math
import os
import pwd
import re
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from polevpn.common.logfmt import LogfmtFormatter
from polevpn.packet.routing import IPAddress, IPNetwork
from polevpn.proto.auth import Authority, GatewayGrant
from polevpn.proto.messages import LINK_NAME, MAX_LINKS

LOG_LEVELS = ("debug", "info", "warning", "error")
# the smallest link MTU IPv6 allows
IPV6_MIN_MTU = 1280


class ConfigError(Exception):
    def __init__(self, path: Path | str, field_name: str, problem: str) -> None:
        self.path = str(path)
        self.field = field_name
        self.problem = problem
        super().__init__(f"{self.path}: {field_name}: {problem}")


@dataclass(frozen=True)
class Listener:
    enable: bool
    host: str
    port: int
    cert_file: Path | None
    key_file: Path | None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class FecParams:
    """Forward error correction on kcp://, used only towards a peer that speaks it."""

    mode: str = "adaptive"  # "off", "fixed" (always parity_shards) or "adaptive" (0..parity_shards)
    data_shards: int = 10
    parity_shards: int = 3
    group_timeout: float = 0.020

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class KcpParams:
    """KCP tuning; the defaults are PoleVPN's fast mode."""

    nodelay: bool = True
    interval: int = 10  # ms
    resend: int = 2
    no_congestion_window: bool = True
    send_window: int = 512
    receive_window: int = 2048
    # sender-side congestion control (polevpn.kcp.congestion): "bbr" paces sends at the
    # path's estimated rate and sizes the windows from its bandwidth-delay product;
    # "off" is KCP as PoleVPN runs it (fixed windows, no pacing)
    congestion: str = "bbr"
    # with congestion "bbr": the most segments the windows grow to (send and receive);
    # bounds what one session may buffer (about max_window x 1.3 kB each way)
    max_window: int = 8192
    # IP packets between our own gateways and routers may go up out of order (they are
    # IP: nothing needs them in order), so a lost segment holds up only its own packets;
    # negotiated in AUTH ("unordered"), never with a Go PoleVPN peer. One of UNORDERED_MODES:
    # "off"; "all" (true in the file): every packet; "light": ICMP, UDP and TCP segments
    # without payload, so pings, calls, DNS and TCP's ACKs do not wait behind a lost
    # segment, while TCP data stays in order: a cubic sender reads every data segment that
    # came a round trip late as a loss (docs/benchmarks.md, long-haul)
    unordered: str = "light"
    # with "unordered" agreed: small light packets (a ping, a TCP ACK, a call's audio:
    # URGENT_IP_MAX in polevpn/kcp/_ikcp.c) go ahead of the data that waits to be sent,
    # and past a full send queue up to URGENT_HEADROOM (polevpn/kcp/kcp_link.py), rather
    # than waiting behind bulk data or being dropped with it (docs/protocol.md section 14)
    urgent: bool = True
    dtls_mtu: int = 1400
    # data unacknowledged this long with nothing at all from the peer: the peer is gone
    silence_timeout: float = 2.0
    fec: FecParams = field(default_factory=FecParams)


FEC_MODES = ("off", "fixed", "adaptive")
CONGESTION_MODES = ("bbr", "off")
UNORDERED_MODES = ("off", "light", "all")


@dataclass(frozen=True)
class HandshakeLimits:
    """kcp:// handshakes in progress at the router (cookie returned, DTLS not finished).

    ``max_per_prefix`` is the most from one IPv4 /24 or IPv6 /64; an IPv6 /56 may hold twice
    that and a /48 four times, and no prefix more than half of ``max_handshakes``, so that
    one network cannot take every slot."""

    max_handshakes: int = 256
    max_per_prefix: int = 32
    # kept for known sources (a connection from there passed AUTH lately, as the router's
    # admission tracks them): strangers from many networks cannot take the whole table, and
    # a known source is not counted against its networks
    reserved_share_known: float = 0.25


@dataclass(frozen=True)
class LimitParams:
    """The router's abuse limits (the `limits` section); polevpn.router.limits applies them."""

    max_pending: int = 1024
    # per IPv4 address or IPv6 /64
    max_pending_per_source: int = 32
    # shares of max_pending one network may hold: an IPv4 /24 or IPv6 /56, and an IPv6 /48
    max_pending_share_per_net: float = 1 / 16
    max_pending_share_per_site: float = 1 / 8
    # share of max_pending only known gateways' sources may take
    reserved_share_known: float = 1 / 4
    # a source whose connection passed AUTH within this many seconds is a known one
    known_source_ttl: float = 86400.0
    # seconds a new TCP connection may stay silent before its first TLS bytes
    pre_tls_timeout: float = 3.0
    # a source with this many failed AUTH/REGISTER attempts within the window is refused
    auth_failures: int = 10
    auth_failure_window: float = 60.0
    max_tracked_sources: int = 65536
    # what one gateway may announce in REGISTER: networks, and distinct prefix lengths per
    # address family (its own address included). The route lookup probes one table per
    # distinct length present, so one gateway with a hundred lengths slows every packet
    max_networks_per_gateway: int = 256
    max_prefix_lengths_per_gateway: int = 16

    def net_cap(self) -> int:
        return max(1, math.ceil(self.max_pending * self.max_pending_share_per_net))

    def site_cap(self) -> int:
        return max(1, math.ceil(self.max_pending * self.max_pending_share_per_site))

    def shared(self) -> int:
        """Pending slots open to any source; the rest are for known ones."""
        return max(1, self.max_pending - math.floor(self.max_pending * self.reserved_share_known))


@dataclass(frozen=True)
class RouterTun:
    """The router's own TUN (the ``tun`` section): the router host joins the network.

    ``gateway``/``gateway6`` are the router's tunnel addresses, ``networks`` the networks
    behind the router host (its VPC): together they are the pseudo-gateway "local" in the
    router's table, always registered. ``route_networks`` are routed into the TUN on the
    router host (the offices' networks), as a gateway's are.
    """

    name: str
    gateway: ipaddress.IPv4Address
    gateway6: ipaddress.IPv6Address | None
    networks: tuple[IPNetwork, ...]
    route_networks: tuple[IPNetwork, ...]
    mtu: int = 1400

    @property
    def prefixes(self) -> tuple[IPNetwork, ...]:
        """What the pseudo-gateway holds in the table: its addresses and its networks."""
        hosts: list[IPNetwork] = [ipaddress.ip_network(self.gateway)]
        if self.gateway6 is not None:
            hosts.append(ipaddress.ip_network(self.gateway6))
        return (*hosts, *(n for n in self.networks if n not in hosts))

    @property
    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [self.gateway] + ([self.gateway6] if self.gateway6 is not None else [])


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """The ``cluster`` section: this router is one of several that share their routes
    through etcd (polevpn.cluster). Absent: a router alone, needing no etcd."""

    # the cluster's name: its keys live under {prefix}/{name}/
    name: str
    # this router's id within the cluster, unique among its routers
    router_id: str
    # "http(s)://host:port" of the etcd members, tried in turn
    etcd_endpoints: tuple[str, ...]
    # (host, port) other routers dial this router on: its tls:// listener as they reach it
    peer_address: tuple[str, int]
    # the credential routers authenticate each other with, and the one before it while a
    # rotation is under way (accepted, not sent)
    peer_key: str = field(repr=False)
    peer_key_previous: str | None = field(default=None, repr=False)
    etcd_username: str | None = None
    etcd_password: str | None = field(default=None, repr=False)
    # TLS to etcd: the CA that signed the members' certificates, and a client certificate
    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    # the root of the keys in etcd, shared by every cluster on those members
    prefix: str = "/polevpn"
    # seconds this router's keys outlive it (or its loss of etcd)
    lease_ttl: int = 5

    @property
    def peer_address_text(self) -> str:
        host, port = self.peer_address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# the most key-material lifetime (s) the protocol allows (polevpn.direct.messages)
MAX_DIRECT_LIFETIME = 86_400


@dataclass(frozen=True)
class RouterDirectConfig:
    """The router's part in direct paths between gateways (issue 18, docs/protocol.md
    section 18): the ``direct`` section. ``enable``: agree the ``direct`` feature with
    gateways that offer it (only with a kcp listener, whose UDP port takes the endpoint
    probes); ``lifetime``: seconds the endpoint tokens and each pair's key material live
    (renewed at two thirds while used); ``max_pairs``: pairs of gateways with live key
    material at once (more wait, relayed)."""

    enable: bool = True
    lifetime: int = 3600
    max_pairs: int = 4096

    def __str__(self) -> str:
        # one reload change line; no "=" (a log line would read it as a field)
        if not self.enable:
            return "off"
        return f"on, lifetime {self.lifetime} s, max_pairs {self.max_pairs}"


@dataclass(frozen=True)
class RouterConfig:
    path: Path
    tls: Listener
    kcp: Listener
    # PoleVPN's shared key; None when only the ``gateways`` table may connect
    key: str | None
    kcp_params: KcpParams = field(default_factory=KcpParams)
    kcp_handshakes: HandshakeLimits = field(default_factory=HandshakeLimits)
    log_level: str = "info"
    idle_timeout: float = 60.0
    auth_timeout: float = 5.0
    send_queue_bytes: int = 4 * 1024 * 1024
    stats_interval: float = 300.0
    # accept super-packets from gateways that offer them (segmenting for those that do not)
    super_packets: bool = True
    # accept gateways with several links (one session per link); false answers as PoleVPN
    multi_link: bool = True
    gateways: tuple[GatewayGrant, ...] = ()
    # CA of the gateways' client certificates; the listeners ask for one when this is set
    client_ca_file: Path | None = None
    # drop packets whose source is not within the sending gateway's registered networks
    anti_spoofing: bool = True
    limits: LimitParams = field(default_factory=LimitParams)
    # started as root: become this user once the listeners are bound
    user: str | None = None
    # (host, port) to serve Prometheus metrics on; None: off
    metrics_listen: tuple[str, int] | None = None
    # bearer token /metrics requires; None: none
    metrics_token: str | None = field(default=None, repr=False)
    # (host, port) of the REST API (polevpn.ops.api) and the bearer token it requires; None: off
    api_listen: tuple[str, int] | None = None
    api_token: str | None = field(default=None, repr=False)
    # the router's own TUN; None (the default): off, and the router needs no privilege
    tun: RouterTun | None = None
    # TCP congestion control of tls:// sockets: None (not set): bbr if the kernel has it;
    # "": the kernel's default; else that algorithm (polevpn.io.tcpcc)
    tcp_congestion: str | None = None
    # several routers sharing routes through etcd; None (the default): this router alone
    cluster: ClusterConfig | None = None
    # direct paths between gateways, the router as rendezvous (polevpn.direct.rendezvous)
    direct: RouterDirectConfig = field(default_factory=RouterDirectConfig)
    warnings: tuple[str, ...] = field(default=())

    def authority(self) -> Authority:
        return Authority(self.key, self.gateways)


@dataclass(frozen=True)
class RouteServer:
    scheme: str
    host: str
    port: int
    url: str


@dataclass(frozen=True)
class LinkConfig:
    """One uplink of a gateway with several (``links``): its route server and how to reach
    it. ``bind``: local source address; ``interface``: the device to send through."""

    name: str
    server: RouteServer
    bind: str | None = None
    interface: str | None = None
    weight: float = 1.0
    backup: bool = False


@dataclass(frozen=True)
class DirectConfig:
    """The gateway's direct paths to other offices (issue 18, docs/protocol.md section 18).

    ``enable`` False: never offer the feature (a plain gateway as before). ``port``: the
    UDP port of the direct socket (0: ephemeral). ``candidates``: this gateway's own
    addresses to report as host candidates; empty: the address the kernel picks towards
    the router (a connected UDP socket's local address)."""

    enable: bool = True
    port: int = 0
    candidates: tuple[IPAddress, ...] = ()


# the most host candidates DIRECT_CANDIDATES carries (polevpn.direct.messages)
MAX_DIRECT_CANDIDATES = 8


@dataclass(frozen=True)
class GatewayConfig:
    path: Path
    # with ``links``: each link's server, in order
    route_servers: tuple[RouteServer, ...]
    # sent in AUTH and REGISTER; empty when a client certificate alone identifies us
    key: str
    gateway: ipaddress.IPv4Address
    gateway6: ipaddress.IPv6Address | None
    local_networks: tuple[IPNetwork, ...]
    route_networks: tuple[IPNetwork, ...]
    acls: tuple[IPNetwork, ...]
    ca_file: Path | None = None
    cert_pin: bytes | None = None
    insecure_skip_verify: bool = False
    server_name: str | None = None
    tun_name: str = "polevpn0"
    mtu: int = 1400
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 20.0
    # one attempt to reach a route server (TCP + TLS, or the DTLS handshake); AUTH and
    # REGISTER then have heartbeat_timeout
    connect_timeout: float = 5.0
    reconnect_min_delay: float = 0.5
    reconnect_max_delay: float = 3.0  # see Gateway._connect_loop for why this short
    send_queue_bytes: int = 4 * 1024 * 1024
    log_level: str = "info"
    stats_interval: float = 300.0
    kcp_params: KcpParams = field(default_factory=KcpParams)
    # how often a gateway that fell back to a later route server tries the preferred one again
    preferred_retry_interval: float = 30.0
    # TUN with virtio-net header and TSO/USO, and super-packets offered to the router
    offload: bool = True
    # client certificate for routers that identify gateways by certificate fingerprint
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    # (host, port) to serve Prometheus metrics on; None: off
    metrics_listen: tuple[str, int] | None = None
    # bearer token /metrics requires; None: none
    metrics_token: str | None = field(default=None, repr=False)
    # drop packets from the tunnel whose source is one of this office's own addresses
    anti_spoofing: bool = True
    # lower the MSS option of TCP SYNs crossing the tunnel to fit the TUN mtu (polevpn.packet.mss)
    mss_clamp: bool = True
    # host settings made at start and taken back on exit (polevpn.host.hostsetup)
    forwarding: bool = False
    masquerade: bool = False
    # several uplinks used at once (polevpn.packet.multipath); empty: route_servers as PoleVPN has
    links: tuple[LinkConfig, ...] = ()
    # on each link of a multi-link gateway: heartbeats this often, and down after this silence
    link_heartbeat_interval: float = 0.25
    link_timeout: float = 1.0
    # as RouterConfig.tcp_congestion, for the gateway's tls:// connections
    tcp_congestion: str | None = None
    # direct paths to other offices through NAT (the socket is opened at start)
    direct: DirectConfig = field(default_factory=DirectConfig)
    warnings: tuple[str, ...] = field(default=())

    @property
    def multi_link(self) -> bool:
        """Two links or more: one gateway with a session per link. One link is plain."""
        return len(self.links) > 1

    @property
    def route_server(self) -> RouteServer:
        """The preferred route server."""
        return self.route_servers[0]

    @property
    def announced(self) -> list[str]:
        """REGISTER's network list: the office networks, and the IPv6 gateway address as a
        /128 because REGISTER has a field only for the IPv4 one."""
        nets = [str(n) for n in self.local_networks]
        if self.gateway6 is not None:
            host = f"{self.gateway6}/128"
            if host not in nets:
                nets.append(host)
        return nets


class _Reader:
    """Typed accessors over one JSON object that raise ConfigError with the field path."""

    def __init__(self, path: Path, obj: dict[str, Any], prefix: str = "") -> None:
        self.path = path
        self.obj = obj
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.name(key), problem)

    def has(self, key: str) -> bool:
        return key in self.obj and self.obj[key] is not None

    def section(self, key: str, required: bool = True) -> _Reader | None:
        if not self.has(key):
            if required:
                raise self.fail(key, "missing (expected an object)")
            return None
        val = self.obj[key]
        if not isinstance(val, dict):
            raise self.fail(key, f"expected an object, got {type(val).__name__}")
        return _Reader(self.path, val, f"{self.name(key)}.")

    def string(self, key: str, default: str | None = None) -> str:
        if not self.has(key):
            if default is None:
                raise self.fail(key, "missing")
            return default
        val = self.obj[key]
        if not isinstance(val, str):
            raise self.fail(key, f"expected a string, got {type(val).__name__}")
        return val

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        val = self.obj[key]
        if not isinstance(val, bool):
            raise self.fail(key, f"expected true or false, got {json.dumps(val)}")
        return val

    def number(self, key: str, default: float, minimum: float, maximum: float) -> float:
        if not self.has(key):
            return default
        val = self.obj[key]
        if isinstance(val, bool) or not isinstance(val, int | float):
            raise self.fail(key, f"expected a number, got {json.dumps(val)}")
        if not minimum <= val <= maximum:
            raise self.fail(key, f"{val} is outside {minimum:g}..{maximum:g}")
        return float(val)

    def integer(self, key: str, default: int, minimum: int, maximum: int) -> int:
        val = self.number(key, default, minimum, maximum)
        if val != int(val):
            raise self.fail(key, f"expected a whole number, got {val}")
        return int(val)

    def file(self, key: str, required: bool) -> Path | None:
        if not self.has(key):
            if required:
                raise self.fail(key, "missing (expected a file path)")
            return None
        text = self.string(key)
        if "\0" in text:
            raise self.fail(key, "contains a NUL character")
        try:
            p = Path(text).expanduser()
        except RuntimeError as exc:  # ~user with no such user
            raise self.fail(key, f"cannot expand {text!r}: {exc}") from None
        if not p.is_absolute():
            p = self.path.parent / p
        try:
            with open(p, "rb"):
                pass
        except OSError as exc:
            raise self.fail(key, f"cannot read {p}: {exc.strerror or exc}") from None
        return p

    def networks(self, key: str, required: bool = True) -> tuple[IPNetwork, ...]:
        if not self.has(key):
            if required:
                raise self.fail(key, "missing (expected a list of CIDR strings)")
            return ()
        val = self.obj[key]
        if isinstance(val, str):
            val = [val]
        if not isinstance(val, list):
            raise self.fail(key, f"expected a list of CIDR strings, got {type(val).__name__}")
        out: list[IPNetwork] = []
        for i, item in enumerate(val):
            if not isinstance(item, str):
                raise ConfigError(self.path, f"{self.name(key)}[{i}]", "expected a CIDR string")
            try:
                net = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ConfigError(
                    self.path, f"{self.name(key)}[{i}]", f"{item!r} is not a valid CIDR network"
                ) from None
            out.append(net)
        return tuple(out)

    def log_level(self) -> str:
        level = self.string("log_level", "info").lower()
        if level not in LOG_LEVELS:
            raise self.fail("log_level", f"{level!r} is not one of {', '.join(LOG_LEVELS)}")
        return level


def _load_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "(file)", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            path, "(file)", f"not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            path, "(file)", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise ConfigError(path, "(file)", "JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ConfigError(path, "(file)", "expected a JSON object at the top level")
    return obj


def _split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [host]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number 0..65535")
    return host, int(port)


def _key(r: _Reader, secrets: list[Path]) -> str:
    """`key` inline, as PoleVPN has it, or `key_file` (what `make keys` writes)."""
    if r.has("key_file"):
        p = r.file("key_file", required=True)
        assert p is not None
        try:
            key = p.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise r.fail("key_file", f"{p} is not UTF-8 text") from None
        if not key:
            raise r.fail("key_file", f"{p} is empty")
        secrets.append(p)
        return key
    key = r.string("key")
    if not key:
        raise r.fail("key", "is empty")
    secrets.append(r.path)
    return key


def _permission_warnings(secrets: list[Path]) -> list[str]:
    """A warning for each file holding a secret that group or others may read."""
    out = []
    for p in dict.fromkeys(secrets):
        try:
            mode = stat.S_IMODE(os.stat(p).st_mode)
        except OSError:
            continue
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            out.append(
                f"{p} holds a secret but is readable by group or others "
                f"(mode {mode:04o}); chmod 600 it"
            )
    return out


def _fingerprint(r: _Reader, name: str, what: str) -> bytes | None:
    """A SHA-256 certificate fingerprint: 64 hex digits, colons and a sha256/ prefix allowed."""
    if not r.has(name):
        return None
    text = r.string(name).replace(":", "").strip().lower()
    for prefix in ("sha256/", "sha256:"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    try:
        pin = bytes.fromhex(text)
    except ValueError:
        pin = b""
    if len(pin) != hashlib.sha256().digest_size:
        raise r.fail(name, f"expected the SHA-256 of {what} as 64 hex digits")
    return pin


def _gateways(r: _Reader, secrets: list[Path]) -> tuple[GatewayGrant, ...]:
    sec = r.section("gateways", required=False)
    if sec is None:
        return ()
    grants: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, GatewayGrant] = {}
    for text, entry in sec.obj.items():
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise sec.fail(
                text, "is not an IP address (gateways is keyed by gateway address)"
            ) from None
        if addr in grants:
            raise sec.fail(text, f"{addr} is listed twice")
        if not isinstance(entry, dict):
            raise sec.fail(text, f"expected an object, got {type(entry).__name__}")
        er = _Reader(r.path, entry, sec.name(text) + ".")
        key = _key(er, secrets) if er.has("key") or er.has("key_file") else None
        fp = _fingerprint(er, "cert_fingerprint", "the gateway's client certificate")
        if key is None and fp is None:
            raise er.fail("key", "missing: a gateway needs key, key_file or cert_fingerprint")
        grants[addr] = GatewayGrant(
            addr, key, fp, er.networks("networks", required=True), er.boolean("direct", True)
        )
    return tuple(grants.values())


def _metrics_listen(
    r: _Reader, has_token: bool = False
) -> tuple[tuple[str, int] | None, list[str]]:
    """`metrics_listen` ("127.0.0.1:9400"), and a warning if others could scrape it."""
    if not r.has("metrics_listen"):
        return None, []
    try:
        host, port = _split_host_port(r.string("metrics_listen"))
        addr = ipaddress.ip_address(host) if host != "localhost" else None
    except ValueError as exc:
        raise r.fail("metrics_listen", f"{exc} (expected host:port, e.g. 127.0.0.1:9400)") from None
    if addr is not None and not addr.is_loopback and not has_token:
        return (host, port), [
            f"metrics_listen {host}:{port} is not a loopback address: the metrics are not "
            "authenticated and show every gateway and its traffic to whoever reaches them"
        ]
    return (host, port), []


def _secret(r: _Reader, inline: str, secrets: list[Path]) -> tuple[str, str] | None:
    """A secret given inline (``inline``) or in a file (``inline``_file), not both: (the
    field it came from, its text), None when neither is set. The file holding it (the
    config itself, for an inline one) goes into ``secrets`` (its permissions are checked)."""
    in_file = f"{inline}_file"
    if r.has(inline) and r.has(in_file):
        raise r.fail(inline, f"set {inline} or {in_file}, not both")
    if r.has(in_file):
        p = r.file(in_file, required=True)
        assert p is not None
        try:
            text = p.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise r.fail(in_file, f"{p} is not UTF-8 text") from None
        if not text:
            raise r.fail(in_file, f"{p} is empty")
        secrets.append(p)
        return in_file, text
    if r.has(inline):
        text = r.string(inline)
        if not text:
            raise r.fail(inline, "is empty")
        secrets.append(r.path)
        return inline, text
    return None


def _api_token(r: _Reader, secrets: list[Path], prefix: str = "api") -> tuple[str, list[str]]:
    """`api_token` inline or `api_token_file`; the API has no other way in. With ``prefix``
    "metrics": `metrics_token` or `metrics_token_file` (call only when one is set)."""
    found = _secret(r, f"{prefix}_token", secrets)
    if found is None:
        raise r.fail(
            "api_token",
            "missing: api_listen needs api_token or api_token_file "
            "(a random string, e.g. from openssl rand -hex 32)",
        )
    name, token = found
    # it travels in an Authorization header
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise r.fail(name, "must be printable ASCII without spaces")
    if len(token) < 16:
        return token, [f"{name} is short ({len(token)} characters): use 16 or more random ones"]
    return token, []


def _metrics_token(r: _Reader, secrets: list[Path]) -> tuple[str | None, list[str]]:
    """`metrics_token` or `metrics_token_file`: optional; /metrics then needs it as a bearer
    token (Prometheus: `authorization: {credentials: ...}` in the scrape config)."""
    if not (r.has("metrics_token") or r.has("metrics_token_file")):
        return None, []
    return _api_token(r, secrets, "metrics")


def _api(r: _Reader, secrets: list[Path]) -> tuple[tuple[str, int] | None, str | None, list[str]]:
    """`api_listen` ("127.0.0.1:8080"), its token, and warnings."""
    if not r.has("api_listen"):
        if r.has("api_token") or r.has("api_token_file"):
            return None, None, ["an API token is set but api_listen is not: the API is off"]
        return None, None, []
    try:
        host, port = _split_host_port(r.string("api_listen"))
        addr = ipaddress.ip_address(host) if host != "localhost" else None
    except ValueError as exc:
        raise r.fail("api_listen", f"{exc} (expected host:port, e.g. 127.0.0.1:8080)") from None
    token, warnings = _api_token(r, secrets)
    if addr is not None and not addr.is_loopback:
        warnings.append(
            f"api_listen {host}:{port} is not a loopback address: the API's token and "
            "replies travel in clear; reach it through an SSH tunnel or a TLS reverse proxy"
        )
    return (host, port), token, warnings


@dataclass(frozen=True)
class ApiAccess:
    """What polevpn-ctl needs from a router config: where the API listens, and its token."""

    host: str
    port: int
    token: str = field(repr=False)


def load_api_access(path: str | Path) -> ApiAccess:
    """The API fields of a router config, parsed as the router does, without the rest (so
    that reading it needs no access to the router's keys)."""
    path = Path(path)
    r = _Reader(path, _load_json(path))
    listen, token, _ = _api(r, [])
    if listen is None or token is None:
        raise r.fail("api_listen", "missing: the router's REST API is off")
    return ApiAccess(listen[0], listen[1], token)


def _user(r: _Reader) -> str | None:
    if not r.has("user"):
        return None
    name = r.string("user")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise r.fail("user", f"no such user {name!r}") from None
    if pw.pw_uid == 0:
        raise r.fail("user", f"{name!r} is root; name an unprivileged user")
    return name


def _limits(r: _Reader) -> LimitParams:
    sec = r.section("limits", required=False)
    d = LimitParams()
    if sec is None:
        return d
    return LimitParams(
        max_pending=sec.integer("max_pending", d.max_pending, 1, 1 << 20),
        max_pending_per_source=sec.integer(
            "max_pending_per_source", d.max_pending_per_source, 1, 1 << 20
        ),
        max_pending_share_per_net=sec.number(
            "max_pending_share_per_net", d.max_pending_share_per_net, 0, 1
        ),
        max_pending_share_per_site=sec.number(
            "max_pending_share_per_site", d.max_pending_share_per_site, 0, 1
        ),
        reserved_share_known=sec.number("reserved_share_known", d.reserved_share_known, 0, 0.9),
        known_source_ttl=sec.number("known_source_ttl", d.known_source_ttl, 0, 30 * 86400),
        pre_tls_timeout=sec.number("pre_tls_timeout", d.pre_tls_timeout, 0.1, 3600),
        auth_failures=sec.integer("auth_failures", d.auth_failures, 1, 1 << 20),
        auth_failure_window=sec.number("auth_failure_window", d.auth_failure_window, 0, 86400),
        max_networks_per_gateway=sec.integer(
            "max_networks_per_gateway", d.max_networks_per_gateway, 1, 1 << 16
        ),
        max_prefix_lengths_per_gateway=sec.integer(
            "max_prefix_lengths_per_gateway", d.max_prefix_lengths_per_gateway, 1, 129
        ),
    )


def _router_warnings(
    key: str | None, grants: tuple[GatewayGrant, ...], anti_spoofing: bool
) -> list[str]:
    out = []
    if key is not None and not grants:
        out.append(
            "all gateways share one key: any holder of it may register any network, "
            "including another office's (list each gateway in \"gateways\" to prevent that)"
        )
    elif key is not None:
        out.append(
            "the shared key is still accepted: a gateway not listed in \"gateways\" may "
            "register any network not granted to a listed gateway"
        )
    for a, b, net in Authority(None, grants).overlaps():
        out.append(f"gateways {a.gateway} and {b.gateway} are both granted {net} (or part of it)")
    if not anti_spoofing:
        out.append("anti_spoofing is off: gateways may send packets with any source address")
    return out


# a kernel congestion control module's name (TCP_CA_NAME_MAX is 16 with the NUL)
_TCP_CONGESTION = re.compile(r"[a-z0-9_]{1,15}")


def _tcp_congestion(r: _Reader) -> str | None:
    """None when absent (bbr where the kernel has it), "" for the kernel's default."""
    if not r.has("tcp_congestion"):
        return None
    name = r.string("tcp_congestion")
    if name in ("", "default"):
        return ""
    if not _TCP_CONGESTION.fullmatch(name):
        raise r.fail(
            "tcp_congestion",
            f"{name!r} is not a congestion control name (1-15 of a-z, 0-9, _; "
            '"default" for the kernel\'s)',
        )
    return name


def _listener(r: _Reader, name: str, required: bool) -> Listener:
    sec = r.section(name, required=required)
    if sec is None:
        return Listener(False, "0.0.0.0", 443, None, None)
    enable = sec.boolean("enable", True)
    try:
        host, port = _split_host_port(sec.string("listen", "0.0.0.0:443"))
    except ValueError as exc:
        raise sec.fail("listen", str(exc)) from None
    if host in ("", "*"):
        host = "0.0.0.0"
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise sec.fail("listen", f"{host!r} is not an IP address") from None
    cert = sec.file("cert_file", required=enable)
    key = sec.file("key_file", required=enable)
    if enable and cert and key:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise sec.fail("cert_file", f"cannot load {cert} with {key}: {exc}") from None
    return Listener(enable, host, port, cert, key)


def load_router_config(path: str | Path) -> RouterConfig:
    path = Path(path)
    r = _Reader(path, _load_json(path))
    tls = _listener(r, "tls", required=False)
    kcp = _listener(r, "kcp", required=False)
    if not (tls.enable or kcp.enable):
        if not (r.has("tls") or r.has("kcp")):
            raise r.fail("tls", "missing: a router needs a tls or a kcp listener (or both)")
        raise r.fail(
            "tls.enable" if r.has("tls") else "kcp.enable",
            "no listener is enabled: enable tls, kcp or both",
        )
    kcp_sec = r.section("kcp", required=False)
    secrets: list[Path] = []
    grants = _gateways(r, secrets)
    has_key = r.has("key") or r.has("key_file")
    key = _key(r, secrets) if has_key or not grants else None
    client_ca = r.file("client_ca_file", required=False)
    if client_ca is not None:
        try:
            ssl.create_default_context(cafile=str(client_ca))
        except (ssl.SSLError, OSError) as exc:
            raise r.fail("client_ca_file", f"cannot load {client_ca}: {exc}") from None
    elif any(g.cert_fingerprint for g in grants):
        raise r.fail(
            "client_ca_file",
            "missing: gateways with cert_fingerprint need the CA that signed their certificates",
        )
    secrets += [p for p in (tls.key_file, kcp.key_file) if p is not None]
    api_listen, api_token, api_warnings = _api(r, secrets)
    metrics_token, token_warnings = _metrics_token(r, secrets)
    anti_spoofing = r.boolean("anti_spoofing", True)
    cluster = _cluster(r, tls, secrets)
    warnings = _router_warnings(key, grants, anti_spoofing) + _permission_warnings(secrets)
    metrics_listen, metrics_warnings = _metrics_listen(r, metrics_token is not None)
    warnings += metrics_warnings + api_warnings + token_warnings
    tun, tun_warnings = _router_tun(r, grants)
    warnings += tun_warnings
    return RouterConfig(
        path=path,
        tls=tls,
        kcp=kcp,
        key=key,
        gateways=grants,
        client_ca_file=client_ca,
        anti_spoofing=anti_spoofing,
        limits=_limits(r),
        user=_user(r),
        warnings=tuple(warnings),
        kcp_params=_kcp_params(kcp_sec) if kcp_sec else KcpParams(),
        kcp_handshakes=_handshake_limits(kcp_sec),
        log_level=r.log_level(),
        idle_timeout=r.number("idle_timeout", 60.0, 0.1, 86400),
        auth_timeout=r.number("auth_timeout", 5.0, 0.1, 3600),
        send_queue_bytes=r.integer("send_queue_bytes", 4 * 1024 * 1024, 65536, 1 << 30),
        stats_interval=r.number("stats_interval", 300.0, 0, 86400),
        super_packets=r.boolean("super_packets", True),
        multi_link=r.boolean("multi_link", True),
        metrics_listen=metrics_listen,
        metrics_token=metrics_token,
        api_listen=api_listen,
        api_token=api_token,
        tun=tun,
        tcp_congestion=_tcp_congestion(r),
        cluster=cluster,
        direct=_router_direct(r),
    )


def _switch_or_section(r: _Reader, name: str, keys: tuple[str, ...]) -> bool | _Reader | None:
    """A setting given as true / false or as an object of ``keys``: None when absent, the
    bool, or the object's reader (an unknown key or another type is an error)."""
    if not r.has(name):
        return None
    raw = r.obj[name]
    if isinstance(raw, bool):
        return raw
    if not isinstance(raw, dict):
        raise r.fail(name, f"expected true, false or an object, got {type(raw).__name__}")
    sec = r.section(name)
    assert sec is not None
    unknown = sorted(set(sec.obj) - set(keys))
    if unknown:
        raise sec.fail(unknown[0], f"unknown setting (expected {', '.join(keys)})")
    return sec


def _router_direct(r: _Reader) -> RouterDirectConfig:
    """The router's ``direct`` section: {"enable", "lifetime", "max_pairs"}, or a bare
    true / false for ``enable``."""
    sec = _switch_or_section(r, "direct", ("enable", "lifetime", "max_pairs"))
    if not isinstance(sec, _Reader):
        return RouterDirectConfig() if sec is None else RouterDirectConfig(enable=sec)
    return RouterDirectConfig(
        enable=sec.boolean("enable", True),
        # a minute at least: the material is renewed at two thirds of it
        lifetime=sec.integer("lifetime", 3600, 60, MAX_DIRECT_LIFETIME),
        max_pairs=sec.integer("max_pairs", 4096, 1, 1_000_000),
    )


# a cluster's name and a router's id: they are parts of etcd keys
_CLUSTER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# the shortest cluster credential: it is all that keeps a stranger from joining as a router
PEER_KEY_MIN = 16


def _cluster_id(r: _Reader, key: str) -> str:
    text = r.string(key)
    if not _CLUSTER_ID.fullmatch(text) or text in (".", ".."):
        raise r.fail(key, f"{text!r}: use 1-64 of A-Z a-z 0-9 . _ - (it is part of etcd keys)")
    return text


def _etcd_endpoints(r: _Reader) -> tuple[str, ...]:
    raw = r.obj.get("endpoints")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise r.fail("endpoints", "missing or empty (expected a list of http(s)://host:port)")
    out: list[str] = []
    for i, url in enumerate(raw):
        name = f"endpoints[{i}]"
        if not isinstance(url, str):
            raise r.fail(name, f"expected a URL string, got {type(url).__name__}")
        parts = urlsplit(url)
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise r.fail(name, f"{url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not host or port is None:
            raise r.fail(name, f"{url!r}: expected http://host:port or https://host:port")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise r.fail(name, f"{url!r}: expected scheme://host:port and nothing else")
        problem = _host_problem(host)
        if problem is not None:
            raise r.fail(name, f"{url!r}: host {host!r} is not a valid host name: {problem}")
        shown = f"[{host}]" if ":" in host else host
        out.append(f"{parts.scheme}://{shown}:{port}")
    schemes = {u.split(":", 1)[0] for u in out}
    if len(schemes) > 1:
        raise r.fail("endpoints", "mixes http:// and https://: use one for every member")
    return tuple(dict.fromkeys(out))


def _peer_key(r: _Reader, key: str, secrets: list[Path], required: bool) -> str | None:
    """``peer_key`` inline, or ``peer_key_file`` (likewise ``peer_key_previous``)."""
    found = _secret(r, key, secrets)
    if found is None:
        if not required:
            return None
        raise r.fail(
            key,
            "missing: the routers of a cluster authenticate each other with it "
            f"(at least {PEER_KEY_MIN} random characters, e.g. from openssl rand -hex 32)",
        )
    name, text = found
    if len(text) < PEER_KEY_MIN:
        raise r.fail(name, f"{len(text)} characters: use at least {PEER_KEY_MIN} random ones")
    if not all(0x21 <= ord(c) <= 0x7E for c in text):
        raise r.fail(name, "must be printable ASCII without spaces")
    return text


def _cluster(r: _Reader, tls: Listener, secrets: list[Path]) -> ClusterConfig | None:
    """The optional ``cluster`` section (see ClusterConfig)."""
    sec = r.section("cluster", required=False)
    if sec is None:
        return None
    if not tls.enable:
        raise r.fail("cluster", "the routers of a cluster reach each other on the tls "
                     "listener: enable tls")
    name = _cluster_id(sec, "name")
    router_id = _cluster_id(sec, "router_id")
    etcd = sec.section("etcd")
    assert etcd is not None
    endpoints = _etcd_endpoints(etcd)
    username = etcd.string("username") if etcd.has("username") else None
    password = etcd.string("password") if etcd.has("password") else None
    if (username is None) != (password is None):
        raise etcd.fail(
            "password" if password is None else "username", "missing: set username and password"
        )
    if username is not None and not username:
        raise etcd.fail("username", "is empty")
    if password is not None:
        secrets.append(r.path)
    ca = etcd.file("ca", required=False)
    cert = etcd.file("cert", required=etcd.has("key"))
    key = etcd.file("key", required=cert is not None)
    https = endpoints[0].startswith("https:")
    if (ca or cert) and not https:
        raise etcd.fail("ca" if ca else "cert", "set for TLS, but the endpoints are http://")
    if ca is not None:
        try:
            ssl.create_default_context(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            raise etcd.fail("ca", f"cannot load {ca}: {exc}") from None
    if cert is not None and key is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise etcd.fail("cert", f"cannot load {cert} with {key}: {exc}") from None
        secrets.append(key)
    prefix = etcd.string("prefix", "/polevpn").rstrip("/")
    if not prefix.startswith("/") or "//" in prefix or not all(
        _CLUSTER_ID.fullmatch(p) for p in prefix.split("/")[1:]
    ):
        raise etcd.fail("prefix", f"{prefix!r}: expected /name[/name...] of A-Z a-z 0-9 . _ -")
    try:
        host, port = _split_host_port(sec.string("peer_address"))
    except ValueError as exc:
        raise sec.fail("peer_address", f"{exc} (expected host:port, e.g. 198.18.0.1:443)") from None
    problem = _host_problem(host) if host else "empty"
    if problem is not None or port == 0:
        raise sec.fail("peer_address", f"{host!r}:{port}: not a host and port others can dial")
    peer_key = _peer_key(sec, "peer_key", secrets, required=True)
    assert peer_key is not None
    previous = _peer_key(sec, "peer_key_previous", secrets, required=False)
    if previous == peer_key:
        previous = None
    return ClusterConfig(
        name=name,
        router_id=router_id,
        etcd_endpoints=endpoints,
        etcd_username=username,
        etcd_password=password,
        etcd_ca=ca,
        etcd_cert=cert,
        etcd_key=key,
        prefix=prefix,
        lease_ttl=sec.integer("lease_ttl", 5, 2, 60),
        peer_address=(host, port),
        peer_key=peer_key,
        peer_key_previous=previous,
    )


def _tun_name(r: _Reader, key: str) -> str:
    name = r.string(key, "polevpn0")
    if not 0 < len(name.encode()) < 16 or "/" in name or " " in name:
        raise r.fail(key, f"{name!r} is not a valid interface name (1-15 characters)")
    return name


def _router_tun(
    r: _Reader, grants: tuple[GatewayGrant, ...]
) -> tuple[RouterTun | None, list[str]]:
    """The optional ``tun`` section; its addresses and networks must be nobody else's."""
    sec = r.section("tun", required=False)
    if sec is None or not sec.boolean("enable", True):
        return None, []
    gateway, gateway6 = _tunnel_addresses(sec)
    mtu = sec.integer("mtu", 1400, 576, 65535 - 8)
    if gateway6 is not None and mtu < IPV6_MIN_MTU:
        raise sec.fail("mtu", f"{mtu}: IPv6 (gateway6 is set) needs at least {IPV6_MIN_MTU}")
    tun = RouterTun(
        name=_tun_name(sec, "name"),
        gateway=gateway,
        gateway6=gateway6,
        networks=sec.networks("networks", required=False),
        route_networks=sec.networks("route_networks", required=False),
        mtu=mtu,
    )
    own = tun.prefixes
    for key, nets in (("networks", tun.networks), ("route_networks", tun.route_networks)):
        for i, net in enumerate(nets):
            if key == "route_networks" and any(
                net.version == o.version and net.subnet_of(o)  # type: ignore[arg-type]
                for o in own
            ):
                # they would go into the TUN, come back to the router and be dropped
                raise ConfigError(
                    r.path,
                    f"{sec.name(key)}[{i}]",
                    f"{net} is within the tun's own address or networks; "
                    "route_networks are the offices' networks",
                )
    for net in own:
        for g in grants:
            if g.gateway.version == net.version and net.overlaps(ipaddress.ip_network(g.gateway)):
                raise sec.fail("networks", f"{net} overlaps gateway {g.gateway}'s address")
            for granted in g.networks:
                if granted.version == net.version and net.overlaps(granted):  # type: ignore[arg-type]
                    raise sec.fail(
                        "networks", f"{net} overlaps {granted}, granted to gateway {g.gateway}"
                    )
    warnings = []
    if not tun.route_networks:
        warnings.append(
            "tun.route_networks is empty: the router host routes nothing into its tun, so "
            "the offices' packets reach it but its replies take the host's other routes"
        )
    return tun, warnings


def _tunnel_addresses(r: _Reader) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address | None]:
    """``gateway`` (IPv4, required) and ``gateway6`` (IPv6, optional): a TUN's own tunnel
    addresses, the gateway's or the router's."""
    text = r.string("gateway")
    try:
        gateway = ipaddress.IPv4Address(text)
    except ValueError:
        raise r.fail("gateway", f"{text!r} is not an IPv4 address") from None
    if not r.has("gateway6"):
        return gateway, None
    text6 = r.string("gateway6")
    try:
        return gateway, ipaddress.IPv6Address(text6)
    except ValueError:
        raise r.fail("gateway6", f"{text6!r} is not an IPv6 address") from None


def _handshake_limits(sec: _Reader | None) -> HandshakeLimits:
    d = HandshakeLimits()
    if sec is None:
        return d
    total = sec.integer("max_handshakes", d.max_handshakes, 1, 1 << 16)
    return HandshakeLimits(
        max_handshakes=total,
        max_per_prefix=sec.integer(
            "max_handshakes_per_prefix", min(d.max_per_prefix, total), 1, total
        ),
        reserved_share_known=sec.number(
            "reserved_share_known", d.reserved_share_known, 0, 0.9
        ),
    )


def _kcp_params(sec: _Reader) -> KcpParams:
    fec = FecParams()
    fsec = sec.section("fec", required=False)
    if fsec is not None:
        mode = fsec.string("mode", fec.mode)
        if mode not in FEC_MODES:
            raise fsec.fail("mode", f"{mode!r} is not one of {', '.join(FEC_MODES)}")
        data = fsec.integer("data_shards", fec.data_shards, 1, 64)
        parity = fsec.integer("parity_shards", fec.parity_shards, 0, 32)
        if mode == "fixed" and parity == 0:
            raise fsec.fail("parity_shards", "must be at least 1 in fixed mode (or mode: off)")
        fec = FecParams(
            mode=mode,
            data_shards=data,
            parity_shards=parity,
            group_timeout=fsec.number("group_timeout_ms", 20, 1, 1000) / 1000,
        )
    congestion = sec.string("congestion", "bbr")
    if congestion not in CONGESTION_MODES:
        raise sec.fail("congestion", f"{congestion!r} is not one of {', '.join(CONGESTION_MODES)}")
    return KcpParams(
        nodelay=sec.boolean("nodelay", True),
        interval=sec.integer("interval", 10, 1, 1000),
        resend=sec.integer("resend", 2, 0, 100),
        no_congestion_window=sec.boolean("no_congestion_window", True),
        send_window=sec.integer("send_window", 512, 16, 32768),
        receive_window=sec.integer("receive_window", 2048, 16, 32768),
        congestion=congestion,
        max_window=sec.integer("max_window", 8192, 64, 32768),
        unordered=_unordered_mode(sec),
        urgent=sec.boolean("urgent", True),
        dtls_mtu=sec.integer("dtls_mtu", 1400, 576, 9000),
        silence_timeout=sec.number("silence_timeout", 2.0, 0.2, 3600),
        fec=fec,
    )


def _unordered_mode(sec: _Reader) -> str:
    """``kcp.unordered``: true / false (as "all" / "off") or one of UNORDERED_MODES."""
    if not sec.has("unordered"):
        return KcpParams.unordered
    raw = sec.obj["unordered"]
    if isinstance(raw, bool):
        return "all" if raw else "off"
    if not isinstance(raw, str) or raw not in UNORDERED_MODES:
        raise sec.fail("unordered", f"expected true, false or one of {', '.join(UNORDERED_MODES)}, "
                       f"got {raw!r}")
    return raw


def _parse_route_server(r: _Reader, name: str, url: object) -> RouteServer:
    if not isinstance(url, str):
        raise r.fail(name, f"expected a URL string, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("tls", "kcp"):
        raise r.fail(name, f"{url!r}: scheme must be tls:// or kcp://")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise r.fail(name, f"{url!r}: {exc}") from None
    if not host or port is None:
        raise r.fail(name, f"{url!r}: expected scheme://host:port")
    problem = _host_problem(host)
    if problem is not None:
        raise r.fail(name, f"{url!r}: host {host!r} is not a valid host name: {problem}")
    return RouteServer(parts.scheme, host, port, url)


def _route_servers(r: _Reader) -> tuple[RouteServer, ...]:
    """`route_servers` (tried in order) or PoleVPN's single `route_server`."""
    if r.has("route_servers"):
        urls = r.obj["route_servers"]
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not urls:
            raise r.fail("route_servers", "expected a non-empty list of URLs")
        return tuple(
            _parse_route_server(r, f"route_servers[{i}]", u) for i, u in enumerate(urls)
        )
    return (_parse_route_server(r, "route_server", r.string("route_server")),)


# a DNS label as a host name has it (RFC 952/1123): letters, digits and inner hyphens; and
# underscores, which such rules forbid but DNS, the IDNA codec and TLS take (Docker's
# service names have them), so a router so named keeps working
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _host_problem(host: str) -> str | None:
    """Why ``host`` cannot name a router (in DNS, SNI and the certificate check), or None.

    An IP literal, or a host name by IDNA and hostname rules: labels of 1-63 characters
    once IDNA-encoded, letters, digits, underscores and inner hyphens, at most 253
    characters. What
    fails here would fail at every connection attempt instead (the IDNA codec raises
    UnicodeError for a label over 63 characters)."""
    if _literal_family(host) is not None:
        return None
    if not host:
        return "empty"
    labels = host.split(".")
    if "" in labels:
        return "has an empty label (a leading, trailing or doubled dot)"
    ascii_labels = []
    for label in labels:
        shown = label if len(label) <= 20 else label[:20] + "..."
        if label.isascii() and len(label) > 63:
            return f"label {shown!r} has {len(label)} characters (at most 63)"
        try:
            encoded = encodings.idna.ToASCII(label).decode("ascii")
        except UnicodeError as exc:
            return f"label {shown!r} is not valid IDNA: {exc}"
        if not _HOST_LABEL.fullmatch(encoded):
            return (
                f"label {shown!r}: use letters, digits, underscores and hyphens (not first "
                "or last), 1-63 characters"
            )
        ascii_labels.append(encoded)
    if len(".".join(ascii_labels)) > 253:
        return f"{len('.'.join(ascii_labels))} characters (at most 253)"
    return None


def _literal_family(host: str) -> int | None:
    """4 or 6 for an IP address literal, None for a name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def _links(r: _Reader) -> tuple[LinkConfig, ...]:
    """`links`: several uplinks, each with its own route server."""
    raw = r.obj["links"]
    if not isinstance(raw, list) or not raw:
        raise r.fail("links", "expected a non-empty list of objects")
    if len(raw) > MAX_LINKS:
        raise r.fail("links", f"{len(raw)} links: at most {MAX_LINKS}")
    if r.has("route_server") or r.has("route_servers"):
        raise r.fail("links", "set links or route_server(s), not both")
    links: list[LinkConfig] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise r.fail(f"links[{i}]", f"expected an object, got {type(item).__name__}")
        sec = _Reader(r.path, item, f"{r.name('links')}[{i}].")
        name = sec.string("name", f"link{i + 1}")
        if not LINK_NAME.fullmatch(name):
            raise sec.fail("name", f"{name!r}: use 1-32 of A-Z a-z 0-9 . _ -")
        if any(link.name == name for link in links):
            raise sec.fail("name", f"{name!r} is used by another link")
        server = _parse_route_server(sec, "route_server", sec.string("route_server"))
        bind = sec.string("bind") if sec.has("bind") else None
        if bind is not None:
            try:
                ipaddress.ip_address(bind)
            except ValueError:
                raise sec.fail("bind", f"{bind!r} is not an IP address") from None
        if bind is not None and _literal_family(server.host) not in (
            None,
            ipaddress.ip_address(bind).version,
        ):
            raise sec.fail("bind", f"{bind} cannot reach {server.url}: another address family")
        interface = sec.string("interface") if sec.has("interface") else None
        if interface is not None and (
            not 0 < len(interface.encode()) < 16 or "/" in interface or " " in interface
        ):
            raise sec.fail("interface", f"{interface!r} is not a valid interface name")
        links.append(
            LinkConfig(
                name=name,
                server=server,
                bind=bind,
                interface=interface,
                weight=sec.number("weight", 1.0, 0.001, 1000),
                backup=sec.boolean("backup", False),
            )
        )
    if all(link.backup for link in links) and len(links) > 1:
        raise r.fail("links", "every link is a backup: mark at least one as primary")
    return tuple(links)


def _direct(r: _Reader) -> DirectConfig:
    """`direct`: true / false, or {"enable", "port", "candidates"}."""
    sec = _switch_or_section(r, "direct", ("enable", "port", "candidates"))
    if not isinstance(sec, _Reader):
        return DirectConfig() if sec is None else DirectConfig(enable=sec)
    candidates: list[IPAddress] = []
    if sec.has("candidates"):
        items = sec.obj["candidates"]
        if not isinstance(items, list):
            raise sec.fail(
                "candidates", f"expected a list of addresses, got {type(items).__name__}"
            )
        if len(items) > MAX_DIRECT_CANDIDATES:
            raise sec.fail(
                "candidates", f"{len(items)} addresses (at most {MAX_DIRECT_CANDIDATES})"
            )
        for i, item in enumerate(items):
            name = f"candidates[{i}]"
            if not isinstance(item, str):
                raise sec.fail(name, f"expected an address string, got {type(item).__name__}")
            try:
                addr = ipaddress.ip_address(item.strip())
            except ValueError:
                raise sec.fail(name, f"{item!r} is not an IP address") from None
            if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
                raise sec.fail(name, f"{addr} cannot be reached from another office")
            if addr.version == 6 and addr.ipv4_mapped is not None:  # type: ignore[union-attr]
                raise sec.fail(name, f"{addr} is IPv4-mapped: write it as IPv4")
            if addr in candidates:
                raise sec.fail(name, f"{addr} is listed twice")
            candidates.append(addr)
    return DirectConfig(
        enable=sec.boolean("enable", True),
        port=sec.integer("port", 0, 0, 65535),
        candidates=tuple(candidates),
    )


def _client_cert(r: _Reader, secrets: list[Path]) -> tuple[Path | None, Path | None]:
    cert = r.file("client_cert_file", required=r.has("client_key_file"))
    key = r.file("client_key_file", required=cert is not None)
    if cert is None or key is None:
        return None, None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise r.fail("client_cert_file", f"cannot load {cert} with {key}: {exc}") from None
    secrets.append(key)
    return cert, key


def load_gateway_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    r = _Reader(path, _load_json(path))
    links = _links(r) if r.has("links") else ()
    servers = tuple(link.server for link in links) if links else _route_servers(r)
    gateway, gateway6 = _tunnel_addresses(r)
    server_name = r.string("server_name") if r.has("server_name") else None
    if server_name is not None:
        problem = _host_problem(server_name)
        if problem is not None:
            raise r.fail("server_name", f"{server_name!r} is not a valid host name: {problem}")
    warnings: list[str] = []
    acls = r.networks("acls", required=False)
    if not acls:
        warnings.append("acls is empty: every packet arriving from the tunnel will be dropped")
    ca_file = r.file("ca_file", required=False)
    pin = _fingerprint(r, "cert_pin", "the router certificate")
    insecure = r.boolean("insecure_skip_verify", False)
    if not (ca_file or pin or insecure):
        raise r.fail(
            "ca_file",
            "missing: set ca_file or cert_pin to verify the router "
            "(or insecure_skip_verify: true to skip verification as PoleVPN does)",
        )
    if insecure:
        warnings.append(
            "insecure_skip_verify is set: the router's certificate is not verified and "
            "anyone on the path can impersonate it"
        )
    if ca_file:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise r.fail("ca_file", f"cannot load {ca_file}: {exc}") from None
    tun_name = _tun_name(r, "tun_name")
    hb_interval = r.number("heartbeat_interval", 10.0, 0.05, 3600)
    hb_timeout = r.number("heartbeat_timeout", 20.0, 0.1, 86400)
    if hb_timeout <= hb_interval:
        raise r.fail("heartbeat_timeout", "must be longer than heartbeat_interval")
    rmin = r.number("reconnect_min_delay", 0.5, 0.0, 3600)
    # a reconnect_min_delay above the default cap raises the default cap with it
    rmax = r.number("reconnect_max_delay", max(3.0, rmin), 0.0, 86400)
    if rmax < rmin:
        raise r.fail("reconnect_max_delay", "must not be smaller than reconnect_min_delay")
    kcp_sec = r.section("kcp", required=False)
    secrets: list[Path] = []
    client_cert, client_key = _client_cert(r, secrets)
    has_key = r.has("key") or r.has("key_file")
    key = _key(r, secrets) if has_key or client_cert is None else ""
    metrics_token, token_warnings = _metrics_token(r, secrets)
    warnings += _permission_warnings(secrets)
    metrics_listen, metrics_warnings = _metrics_listen(r, metrics_token is not None)
    warnings += metrics_warnings + token_warnings
    mtu = r.integer("mtu", 1400, 576, 65535 - 8)
    if gateway6 is not None and mtu < IPV6_MIN_MTU:
        # below it the kernel turns IPv6 off on the device (RFC 8200 section 5)
        raise r.fail("mtu", f"{mtu}: IPv6 (gateway6 is set) needs at least {IPV6_MIN_MTU}")
    link_hb = r.number("link_heartbeat_interval", 0.25, 0.01, 60)
    link_timeout = r.number("link_timeout", 1.0, 0.1, 600)
    if link_timeout <= link_hb:
        raise r.fail("link_timeout", "must be longer than link_heartbeat_interval")
    return GatewayConfig(
        path=path,
        route_servers=servers,
        key=key,
        client_cert_file=client_cert,
        client_key_file=client_key,
        anti_spoofing=r.boolean("anti_spoofing", True),
        gateway=gateway,
        gateway6=gateway6,
        local_networks=r.networks("local_networks", required=False),
        route_networks=r.networks("route_networks", required=False),
        acls=acls,
        ca_file=ca_file,
        cert_pin=pin,
        insecure_skip_verify=insecure,
        server_name=server_name,
        tun_name=tun_name,
        mtu=mtu,
        heartbeat_interval=hb_interval,
        heartbeat_timeout=hb_timeout,
        connect_timeout=min(r.number("connect_timeout", 5.0, 0.1, 3600), hb_timeout),
        reconnect_min_delay=rmin,
        reconnect_max_delay=rmax,
        send_queue_bytes=r.integer("send_queue_bytes", 4 * 1024 * 1024, 65536, 1 << 30),
        log_level=r.log_level(),
        stats_interval=r.number("stats_interval", 300.0, 0, 86400),
        kcp_params=_kcp_params(kcp_sec) if kcp_sec else KcpParams(),
        preferred_retry_interval=r.number("preferred_retry_interval", 30.0, 0.1, 86400),
        offload=r.boolean("offload", True),
        metrics_listen=metrics_listen,
        metrics_token=metrics_token,
        mss_clamp=r.boolean("mss_clamp", True),
        forwarding=r.boolean("forwarding", False),
        masquerade=r.boolean("masquerade", False),
        links=links,
        link_heartbeat_interval=link_hb,
        link_timeout=link_timeout,
        tcp_congestion=_tcp_congestion(r),
        direct=_direct(r),
        warnings=tuple(warnings),
    )


def configure_logging(level: str) -> None:
    """One logfmt line per event on stderr (journald takes it from there)."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def set_log_level(level: str) -> None:
    """A reload's log level, without replacing the handlers."""
    logging.getLogger().setLevel(getattr(logging, level.upper()))

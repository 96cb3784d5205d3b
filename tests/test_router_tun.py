"""The router's own TUN ("tun" in its config): the pseudo-gateway "local".

Config and reload plan; forwarding decisions with the TUN as a destination and as a source
(``forwarding.forward`` with a ``LocalEndpoint`` over an in-memory Tun); and a router on
loopback whose TUN is that in-memory one (no device, no netlink), with protocol-level
gateways. The real device is in test_topology_routertun.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_forwarding import A, B, Peer, frames, ipv4, table, tcp_super
from test_router_loopback import KEY, ProtoGateway, frame, ipv4_packet, router_config, run
from test_router_security import auth, register, tls_gateway

from polevpn.config import ConfigError, RouterTun, load_router_config
from polevpn.config.reloading import plan
from polevpn.keygen import generate
from polevpn.proto import wire
from polevpn.router import router as router_mod
from polevpn.router.forwarding import forward
from polevpn.router.local import LocalEndpoint, conflict
from polevpn.router.router import Router, RouterStats

TUN_ADDR = "169.254.0.254"
VPC = "198.18.30.0/24"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("keys"))


class MemTun:
    """A Tun in memory: ``written`` is what the router wrote; ``inject`` queues a packet to
    be read and makes ``fileno`` (a pipe) readable, so an event loop can watch it."""

    def __init__(self, name: str = "polevpn0", offload: bool = False) -> None:
        assert not offload, "the router's TUN is opened without offloads"
        self.name = name
        self.vnet_hdr = False
        self.offloads = 0
        self.write_errors = 0
        self.write_dropped = 0
        self.written: list[bytes] = []
        self.queued: list[bytes] = []
        self.gone = False
        self.closed = False
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def inject(self, pkt: bytes) -> None:
        self.queued.append(pkt)
        os.write(self._w, b"x")

    def read_batch(self, limit: int = 64, max_bytes: int = 1 << 20) -> list[bytes]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        out, self.queued = self.queued[:limit], self.queued[limit:]
        return out

    def write(self, packet: bytes | memoryview) -> None:
        if self.gone:
            raise OSError(errno.EBADFD, "File descriptor in bad state")
        self.written.append(bytes(packet))

    def write_super(self, buf: bytes | memoryview) -> None:
        raise AssertionError("no super-packets to the router's TUN")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)


def tun_cfg(**changes: Any) -> RouterTun:
    args: dict[str, Any] = dict(
        name="polevpn0",
        gateway=ipaddress.IPv4Address(TUN_ADDR),
        gateway6=ipaddress.IPv6Address("2001:db8:ff::fe"),
        networks=(ipaddress.ip_network(VPC),),
        route_networks=(ipaddress.ip_network("198.18.10.0/24"),),
    )
    args.update(changes)
    return RouterTun(**args)


# -- config


def router_file(tmp_path: Path, keys, tun: Any, **extra: Any) -> Path:
    obj: dict[str, Any] = {
        "tls": {
            "listen": "127.0.0.1:0",
            "cert_file": str(keys.server_cert),
            "key_file": str(keys.server_key),
        },
        "key": "123456",
        **extra,
    }
    if tun is not None:
        obj["tun"] = tun
    path = tmp_path / "config.json"
    path.write_text(json.dumps(obj))
    path.chmod(0o600)
    return path


FULL = {
    "name": "pvr0",
    "gateway": TUN_ADDR,
    "gateway6": "2001:db8:ff::fe",
    "networks": [VPC, "2001:db8:30::/64"],
    "route_networks": ["198.18.0.0/20", "2001:db8:10::/48"],
    "mtu": 1380,
}


def test_tun_section_is_parsed_and_off_by_default(tmp_path: Path, keys) -> None:
    assert load_router_config(router_file(tmp_path, keys, None)).tun is None
    assert load_router_config(router_file(tmp_path, keys, dict(FULL, enable=False))).tun is None
    cfg = load_router_config(router_file(tmp_path, keys, FULL))
    tun = cfg.tun
    assert tun is not None
    assert (tun.name, tun.mtu) == ("pvr0", 1380)
    assert tun.addresses == [
        ipaddress.IPv4Address(TUN_ADDR),
        ipaddress.IPv6Address("2001:db8:ff::fe"),
    ]
    assert [str(n) for n in tun.prefixes] == [
        f"{TUN_ADDR}/32",
        "2001:db8:ff::fe/128",
        VPC,
        "2001:db8:30::/64",
    ]
    assert [str(n) for n in tun.route_networks] == ["198.18.0.0/20", "2001:db8:10::/48"]
    assert not any("tun" in w for w in cfg.warnings)
    # the least that works: an address; the default name and mtu
    cfg = load_router_config(router_file(tmp_path, keys, {"gateway": TUN_ADDR}))
    assert cfg.tun is not None and (cfg.tun.name, cfg.tun.mtu) == ("polevpn0", 1400)
    assert cfg.tun.prefixes == (ipaddress.ip_network(TUN_ADDR),)
    assert any("tun.route_networks is empty" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"gateway": None}, "tun.gateway", ["missing"]),
        ({"gateway": "2001:db8::1"}, "tun.gateway", ["not an IPv4 address"]),
        ({"gateway6": "169.254.0.1"}, "tun.gateway6", ["not an IPv6 address"]),
        ({"name": "a" * 16}, "tun.name", ["not a valid interface name"]),
        ({"mtu": 1279}, "tun.mtu", ["IPv6", "1280"]),
        ({"mtu": 100}, "tun.mtu", ["outside"]),
        ({"networks": ["198.18.30.0/33"]}, "tun.networks[0]", ["not a valid CIDR"]),
        # the router's own networks routed into its own TUN would come straight back
        ({"route_networks": ["198.18.30.128/25"]}, "tun.route_networks[0]", ["within"]),
        ({"route_networks": [f"{TUN_ADDR}/32"]}, "tun.route_networks[0]", ["within"]),
        ({"enable": "yes"}, "tun.enable", ["true or false"]),
    ],
)
def test_tun_section_errors_name_the_field(
    tmp_path: Path, keys, change: dict, field: str, words: list[str]
) -> None:
    path = router_file(tmp_path, keys, dict(FULL, **change))
    with pytest.raises(ConfigError) as info:
        load_router_config(path)
    exc = info.value
    assert exc.path == str(path) and exc.field == field, exc
    for w in words:
        assert w in exc.problem, exc


@pytest.mark.parametrize(
    "grant, words",
    [
        ({"169.254.0.1": {"key": "k" * 16, "networks": ["198.18.30.64/26"]}}, ["granted"]),
        ({TUN_ADDR: {"key": "k" * 16, "networks": ["198.18.10.0/24"]}}, ["address"]),
    ],
)
def test_tun_networks_granted_to_a_gateway_are_refused(
    tmp_path: Path, keys, grant: dict, words: list[str]
) -> None:
    path = router_file(tmp_path, keys, FULL, gateways=grant)
    with pytest.raises(ConfigError) as info:
        load_router_config(path)
    assert info.value.field == "tun.networks"
    for w in words:
        assert w in info.value.problem


def test_reload_keeps_the_tun_until_a_restart(tmp_path: Path, keys) -> None:
    old = load_router_config(router_file(tmp_path, keys, FULL))
    new = load_router_config(router_file(tmp_path, keys, dict(FULL, networks=["198.18.31.0/24"])))
    p = plan(old, new)
    assert p.needs_restart == ("tun",)
    assert p.config.tun == old.tun
    assert "tun: changed, takes effect after a restart" in p.describe()
    off = load_router_config(router_file(tmp_path, keys, None))
    assert plan(old, off).config.tun == old.tun


# -- forwarding: the TUN as a destination and as a source


def local_endpoint(**changes: Any) -> tuple[LocalEndpoint, MemTun, RouterStats, list]:
    tun = MemTun()
    stats = RouterStats()
    failures: list = []
    local = LocalEndpoint(tun_cfg(**changes), tun, stats, lambda op, exc: failures.append(op))
    return local, tun, stats, failures


def routes_with(local: LocalEndpoint, *peers: Peer):
    routes = table(*peers)
    for net in local.prefixes:
        routes.add(net, local)
    return routes


def test_packets_to_the_tun_address_and_networks_are_written_to_the_tun() -> None:
    local, tun, stats, _ = local_endpoint()
    routes = routes_with(local, A, B)
    to_vm = ipv4("198.18.10.2", TUN_ADDR, 80)
    to_vpc = ipv4("198.18.10.2", "198.18.30.7", 90)
    to_b = ipv4("198.18.10.2", "198.18.20.2")
    out = forward([memoryview(p) for p in (to_vm, to_b, to_vpc)], A, routes)
    assert set(out.batches) == {local, B}
    assert [body for _, body in frames(out.batches[local])] == [to_vm, to_vpc]
    local.send_batch(out.batches[local], 0)
    # plain IP packets on the TUN, no frame headers
    assert tun.written == [to_vm, to_vpc]
    assert (stats.tun_packets_out, stats.tun_bytes_out) == (2, 170)
    assert (stats.packets_forwarded, stats.bytes_forwarded) == (2, 170)
    assert (local.packets_out, local.bytes_out) == (2, 170)


def test_a_gateways_super_packet_is_cut_for_the_tun() -> None:
    local, tun, stats, _ = local_endpoint()
    routes = routes_with(local, A)
    sp = tcp_super("198.18.10.2", "198.18.30.7", 3000, 1000)
    out = forward([memoryview(sp)], A, routes)
    assert out.segmented == 1 and not out.supers
    local.send_batch(out.batches[local], 0)
    assert len(tun.written) == 3
    assert all(len(p) == 40 + 1000 for p in tun.written)
    assert all(p[16:20] == ipaddress.IPv4Address("198.18.30.7").packed for p in tun.written)


def test_packets_from_the_tun_are_routed_and_checked_like_a_gateways() -> None:
    local, _, _, _ = local_endpoint()
    routes = routes_with(local, A, B)
    from_vm = ipv4(TUN_ADDR, "198.18.10.2")
    from_vpc = ipv4("198.18.30.7", "198.18.20.2", 100)
    pkts = [
        from_vm,
        from_vpc,
        ipv4("198.18.99.1", "198.18.10.2"),  # not the router host's: spoofed
        ipv4("198.18.30.7", "198.18.30.9"),  # back into the TUN: a hairpin
        ipv4(TUN_ADDR, "198.18.99.9"),  # nobody's
    ]
    out = forward([memoryview(p) for p in pkts], local, routes)
    assert [body for _, body in frames(out.batches[A])] == [from_vm]
    assert [body for _, body in frames(out.batches[B])] == [from_vpc]
    assert (out.dropped_spoofed, out.dropped_hairpin, out.dropped_no_route) == (1, 1, 1)
    assert out.bytes_in == len(from_vm) + len(from_vpc)
    # anti_spoofing off lets the spoofed one through, as for a gateway
    out = forward([memoryview(pkts[2])], local, routes, anti_spoofing=False)
    assert list(out.batches) == [A]


def test_a_tun_that_is_gone_reports_once_and_raises_nothing() -> None:
    local, tun, stats, failures = local_endpoint()
    tun.gone = True
    pkt = ipv4("198.18.10.2", "198.18.30.7")
    local.send_batch([wire.HEADER.pack(len(pkt) + 8, wire.S2C_IPDATA, 0), pkt], 0)
    assert failures == ["write"]
    assert stats.tun_packets_out == 0


def test_conflict_with_the_tun() -> None:
    tun = tun_cfg()
    ip = ipaddress.ip_address
    net = ipaddress.ip_network
    assert conflict(tun, ip("169.254.0.1"), [net("198.18.10.0/24")]) is None
    assert "belongs to the router's tun" in (conflict(tun, ip(TUN_ADDR), []) or "")
    assert conflict(tun, ip("169.254.0.1"), [net("198.18.30.128/25")]) is not None
    assert conflict(tun, ip("169.254.0.1"), [net("198.18.0.0/16")]) is not None
    assert conflict(tun, ip("169.254.0.1"), [net("2001:db8:ff::fe/128")]) is not None


# -- a router on loopback with an in-memory TUN


@pytest.fixture
def mem_tun(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The router's TunDevice and netconf replaced: what it opened and configured."""
    made: dict[str, Any] = {}

    def device(name: str, offload: bool = False) -> MemTun:
        made["tun"] = MemTun(name, offload)
        return made["tun"]

    def configure(name: str, mtu: int, addresses: list, routes: list) -> None:
        made["configured"] = (name, mtu, [str(a) for a in addresses], [str(r) for r in routes])

    monkeypatch.setattr(router_mod, "TunDevice", device)
    monkeypatch.setattr(router_mod.netconf, "configure_tun", configure)
    return made


async def until(cond, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_router_with_a_tun_forwards_both_ways_and_refuses_its_networks(keys, mem_tun) -> None:
    async def scenario() -> None:
        router = Router(router_config(keys, tun=tun_cfg()))
        await router.start()
        tun = mem_tun["tun"]
        assert mem_tun["configured"] == (
            "polevpn0",
            1400,
            [TUN_ADDR, "2001:db8:ff::fe"],
            ["198.18.10.0/24"],
        )
        table = {str(n): v for n, v in router.routes.routes()}
        assert table[VPC] is router.local and table[f"{TUN_ADDR}/32"] is router.local
        # a gateway claiming the VPC, or the tun's address, is refused whatever its key
        for addr, nets in (("169.254.0.9", ["198.18.30.0/25"]), (TUN_ADDR, [])):
            rogue = await tls_gateway(router)
            assert await auth(rogue, KEY) == {}
            reply = await register(rogue, addr, KEY, nets)
            assert "belongs to the router's tun" in reply["error"]
            assert await rogue.closed_by_peer()
        assert router.stats.register_refused == 2
        assert {str(n): v for n, v in router.routes.routes()}[VPC] is router.local
        gw = await ProtoGateway.connect(router)
        await gw.login("169.254.0.1", ["198.18.10.0/24"])
        # an office to the router host's service and to the VPC behind it
        to_vm = ipv4_packet("198.18.10.2", TUN_ADDR)
        to_vpc = ipv4_packet("198.18.10.2", "198.18.30.7")
        await gw.send(frame(3, to_vm) + frame(3, to_vpc))
        await until(lambda: len(tun.written) == 2)
        assert tun.written == [to_vm, to_vpc]
        # and back, from the router host and the VPC; a spoofed one is dropped
        back = ipv4_packet(TUN_ADDR, "198.18.10.2")
        tun.inject(ipv4_packet("198.18.99.1", "198.18.10.2"))
        tun.inject(back)
        assert await gw.recv_frame() == (2, 0, back)
        vpc = ipv4_packet("198.18.30.7", "198.18.10.2", b"v" * 40)
        tun.inject(vpc)
        assert await gw.recv_frame() == (2, 0, vpc)
        s = router.stats
        assert (s.tun_packets_in, s.tun_packets_out, s.dropped_spoofed) == (3, 2, 1)
        gw.close()
        await router.stop()
        assert tun.closed and router.local is None
        assert all(v is not None and v.transport_name != "tun" for _, v in router.routes.routes())

    run(scenario())


def test_router_without_a_tun_opens_none(keys, mem_tun) -> None:
    async def scenario() -> None:
        router = Router(router_config(keys))
        await router.start()
        assert router.tun is None and router.local is None and "tun" not in mem_tun
        await router.stop()

    run(scenario())


def test_a_tun_that_cannot_be_opened_fails_the_start(keys, monkeypatch) -> None:
    def denied(name: str, offload: bool = False) -> MemTun:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(router_mod, "TunDevice", denied)

    async def scenario() -> None:
        router = Router(router_config(keys, tun=tun_cfg()))
        with pytest.raises(router_mod.TunSetupError) as info:
            await router.start()
        assert "CAP_NET_ADMIN" in info.value.strerror

    run(scenario())


def test_a_tun_gone_under_the_router_withdraws_local_and_nothing_else(keys, mem_tun, caplog):
    async def scenario() -> None:
        router = Router(router_config(keys, tun=tun_cfg()))
        await router.start()
        tun = mem_tun["tun"]
        a = await ProtoGateway.connect(router)
        await a.login("169.254.0.1", ["198.18.10.0/24"])
        b = await ProtoGateway.connect(router)
        await b.login("169.254.0.2", ["198.18.20.0/24"])
        tun.gone = True
        await a.send(frame(3, ipv4_packet("198.18.10.2", "198.18.30.7")))
        await until(lambda: router.local is None)
        assert tun.closed
        assert {str(n) for n, _ in router.routes.routes()} == {
            "169.254.0.1/32",
            "169.254.0.2/32",
            "198.18.10.0/24",
            "198.18.20.0/24",
        }
        # the gateway whose packet found the TUN gone is still connected and forwarding
        pkt = ipv4_packet("198.18.10.2", "198.18.20.2")
        await a.send(frame(3, pkt))
        assert await b.recv_frame() == (2, 0, pkt)
        # the VPC has no route now: dropped and counted, not sent anywhere
        await a.send(frame(3, ipv4_packet("198.18.10.2", "198.18.30.7")))
        await until(lambda: router.stats.dropped_no_route == 1)
        assert router.stats.malformed_frames == 0
        a.close()
        b.close()
        await router.stop()

    with caplog.at_level("ERROR", logger="polevpn.router"):
        run(scenario())
    assert sum("tun failed" in r.getMessage() for r in caplog.records) == 1

"""Config reload: what changes, what waits for a restart, and who stays connected.

The plan is pure (``polevpn.config.reloading``); the router's part runs in-process on loopback
with protocol-level gateways, its config a real file rewritten between reloads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path

import pytest
import topology as t
from test_router_loopback import ProtoGateway, frame, ipv4_packet, run
from test_router_security import auth, register, tls_gateway

from polevpn import keygen
from polevpn.config import ConfigError, load_gateway_config, load_router_config
from polevpn.config.reloading import plan
from polevpn.kcp import dtls
from polevpn.router.router import Router

A, B, C = "169.254.0.1", "169.254.0.2", "169.254.0.3"
LAN_A, LAN_B, LAN_C = "198.18.10.0/24", "198.18.20.0/24", "198.18.30.0/24"
KEY_A, KEY_B, KEY_C = "a" * 24, "b" * 24, "c" * 24


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reloadkeys")
    keygen.generate(out)
    return out


def tls(keys: Path, listen: str = "127.0.0.1:0", cert: Path | None = None) -> dict:
    return {
        "listen": listen,
        "enable": True,
        "cert_file": str(cert or keys / "server.crt"),
        "key_file": str(keys / "server.key"),
    }


def router_file(path: Path, keys: Path, **overrides) -> Path:
    cfg = t.router_config(
        keys,
        tls=tls(keys),
        gateways={A: {"key": KEY_A, "networks": [LAN_A]}, B: {"key": KEY_B, "networks": [LAN_B]}},
        stats_interval=0,
    )
    del cfg["key_file"]
    cfg.update(overrides)
    return t.write_json(path, cfg)


# -- the plan


def test_plan_applies_live_fields_and_keeps_restart_ones(tmp_path: Path, keys: Path) -> None:
    path = router_file(tmp_path / "r.json", keys)
    old = load_router_config(path)
    router_file(
        path,
        keys,
        idle_timeout=30,
        log_level="debug",
        tls=tls(keys, "127.0.0.1:8443"),
        gateways={A: {"key": KEY_C, "networks": [LAN_A, LAN_C]}, C: {"key": KEY_C, "networks": []}},
        user="nobody",
    )
    p = plan(old, load_router_config(path))
    assert p.config.idle_timeout == 30 and p.config.log_level == "debug"
    # bound at start: the running values stay, and the change is reported as waiting
    assert p.config.tls.port == old.tls.port and p.config.user is None
    assert set(p.needs_restart) == {"tls.port", "user"}
    assert "idle_timeout: 60.0 -> 30.0" in p.changes
    assert "gateways: added 169.254.0.3; removed 169.254.0.2; changed 169.254.0.1" in p.changes
    assert p.changed("gateways", "x") and not p.changed("limits")
    # no secret in what is logged and returned by the API
    assert not any(KEY_C in line or KEY_A in line for line in p.describe())
    assert "tls.port: changed, takes effect after a restart" in p.describe()


def test_plan_of_an_unchanged_file_is_empty(tmp_path: Path, keys: Path) -> None:
    path = router_file(tmp_path / "r.json", keys)
    p = plan(load_router_config(path), load_router_config(path))
    assert p.changes == () and p.needs_restart == () and p.describe() == []


def test_gateway_plan(tmp_path: Path, keys: Path) -> None:
    path = t.write_json(tmp_path / "g.json", t.gateway_config("A", keys))
    old = load_gateway_config(path)
    t.write_json(
        path,
        t.gateway_config("A", keys, acls=[LAN_B], mtu=1300, route_networks=[LAN_B, LAN_C]),
    )
    p = plan(old, load_gateway_config(path))
    assert p.config.mtu == old.mtu and p.needs_restart == ("mtu",)
    assert p.changed("acls", "route_networks") and not p.changed("local_networks")
    assert [str(n) for n in p.config.acls] == [LAN_B]


def _links_file(path: Path, keys: Path, links: list[dict], **overrides) -> Path:
    cfg = t.gateway_config("A", keys, links=links, **overrides)
    del cfg["route_server"]
    return t.write_json(path, cfg)


V4 = {"name": "v4", "route_server": "tls://198.19.0.1:443", "weight": 1}
V6 = {"name": "v6", "route_server": "kcp://[2001:db8:ff01::1]:443", "weight": 2}


@pytest.mark.parametrize(
    "new_links",
    [
        [V4, dict(V6, weight=3)],  # a weight
        [V4, dict(V6, route_server="tls://[2001:db8:ff01::1]:443")],  # a server
        [V4, V6, {"name": "lte", "route_server": "tls://198.19.1.1:443", "backup": True}],
        [dict(V6, name="v6b"), V4],  # renamed, reordered
    ],
)
def test_gateway_plan_applies_new_links(tmp_path: Path, keys: Path, new_links: list[dict]) -> None:
    # several links before and after: the gateway changes them in place
    path = _links_file(tmp_path / "g.json", keys, [V4, V6])
    old = load_gateway_config(path)
    _links_file(path, keys, new_links, acls=[LAN_B])
    new = load_gateway_config(path)
    assert new.links != old.links
    p = plan(old, new)
    assert p.needs_restart == ()
    assert p.config.links == new.links
    # the servers are the links': they follow without a line of their own
    assert p.config.route_servers == new.route_servers
    assert p.changed("links") and not p.changed("route_servers")
    assert not any("route_servers" in line for line in p.describe())
    (line,) = [line for line in p.describe() if line.startswith("links:")]
    assert line.startswith("links: v4 tls://198.19.0.1:443, v6 kcp://[2001:db8:ff01::1]:443 ")
    assert "=" not in line  # it goes into a logfmt line as one value
    assert p.changed("acls") and [str(n) for n in p.config.acls] == [LAN_B]


def test_gateway_plan_down_to_one_link_waits_for_a_restart(tmp_path: Path, keys: Path) -> None:
    # one link is a plain gateway: another way of running, so the running links stay
    path = _links_file(tmp_path / "g.json", keys, [V4, V6])
    old = load_gateway_config(path)
    _links_file(path, keys, [V4], acls=[LAN_B])
    p = plan(old, load_gateway_config(path))
    assert p.needs_restart == ("links",)
    assert p.config.links == old.links
    assert p.config.route_servers == old.route_servers
    assert not p.changed("route_servers", "links")
    assert not any("route_servers" in line for line in p.describe())
    assert "links: changed, takes effect after a restart" in p.describe()
    assert p.changed("acls") and [str(n) for n in p.config.acls] == [LAN_B]


def test_gateway_plan_plain_to_links_and_back(tmp_path: Path, keys: Path) -> None:
    plain_path = t.write_json(tmp_path / "plain.json", t.gateway_config("A", keys))
    links_path = _links_file(tmp_path / "links.json", keys, [V4, V6])
    plain, links = load_gateway_config(plain_path), load_gateway_config(links_path)
    p = plan(plain, links)
    assert p.needs_restart == ("links",)
    assert p.config.links == () and p.config.route_servers == plain.route_servers
    p = plan(links, plain)
    assert p.needs_restart == ("links",)
    assert p.config.links == links.links and p.config.route_servers == links.route_servers


def test_gateway_plan_link_timing_waits_for_a_restart(tmp_path: Path, keys: Path) -> None:
    path = _links_file(tmp_path / "g.json", keys, [V4, V6])
    old = load_gateway_config(path)
    _links_file(path, keys, [V4, V6], link_heartbeat_interval=0.1, link_timeout=0.4)
    p = plan(old, load_gateway_config(path))
    assert set(p.needs_restart) == {"link_heartbeat_interval", "link_timeout"}
    assert (p.config.link_heartbeat_interval, p.config.link_timeout) == (0.25, 1.0)
    assert p.config.links == old.links and p.changes == ()


def test_tcp_congestion_waits_for_a_restart(tmp_path: Path, keys: Path) -> None:
    # set on the listeners (router) and decided once (both) at start: polevpn.io.tcpcc
    path = router_file(tmp_path / "r.json", keys)
    old = load_router_config(path)
    router_file(path, keys, tcp_congestion="reno")
    p = plan(old, load_router_config(path))
    assert p.needs_restart == ("tcp_congestion",) and p.changes == ()
    assert p.config.tcp_congestion is None
    path = t.write_json(tmp_path / "g.json", t.gateway_config("A", keys))
    old = load_gateway_config(path)
    t.write_json(path, t.gateway_config("A", keys, tcp_congestion="default"))
    p = plan(old, load_gateway_config(path))
    assert p.needs_restart == ("tcp_congestion",) and p.changes == ()
    assert p.config.tcp_congestion is None


def test_gateway_plan_unchanged_links(tmp_path: Path, keys: Path) -> None:
    path = _links_file(tmp_path / "g.json", keys, [V4, V6])
    p = plan(load_gateway_config(path), load_gateway_config(path))
    assert p.changes == () and p.needs_restart == ()


# -- the router, in-process


async def _login(router: Router, source: str, addr: str, key: str, nets: list[str]) -> ProtoGateway:
    gw = await tls_gateway(router, source=source)
    assert await auth(gw, key) == {}
    assert await register(gw, addr, key, nets) == {}
    return gw


async def _passes(router: Router, src: ProtoGateway, dst: ProtoGateway, s: str, d: str) -> bool:
    await src.send(frame(3, ipv4_packet(s, d)))
    try:
        cmd, _, body = await dst.recv_frame(timeout=2)
    except TimeoutError:
        return False
    return cmd == 2 and body[12:16] == bytes(map(int, s.split(".")))


def test_router_reload_revokes_only_what_changed(tmp_path: Path, keys: Path, caplog) -> None:
    path = router_file(tmp_path / "r.json", keys)

    async def scenario() -> None:
        router = Router(load_router_config(path))
        await router.start()
        try:
            a = await _login(router, "127.0.1.1", A, KEY_A, [LAN_A])
            b = await _login(router, "127.0.1.2", B, KEY_B, [LAN_B])
            assert await _passes(router, a, b, "198.18.10.5", "198.18.20.5")

            # B's credentials go, C's arrive; A's entry is untouched
            router_file(
                path,
                keys,
                gateways={
                    A: {"key": KEY_A, "networks": [LAN_A]},
                    C: {"key": KEY_C, "networks": [LAN_C]},
                },
                idle_timeout=45,
            )
            changes = router.reload()
            assert "gateways: added 169.254.0.3; removed 169.254.0.2" in changes
            assert f"closed gateway {B}: gateway {B} is not configured on this router" in changes
            assert await b.closed_by_peer()
            assert router.stats.revoked == 1 and router.cfg.idle_timeout == 45
            assert sorted(str(n) for n, _ in router.routes.routes()) == [A + "/32", LAN_A]
            # A's connection is the same one, and C may now come in
            c = await _login(router, "127.0.1.3", C, KEY_C, [LAN_C])
            assert await _passes(router, a, c, "198.18.10.5", "198.18.30.5")
            assert await _passes(router, c, a, "198.18.30.5", "198.18.10.5")
            assert router.stats.registrations == 3

            # a broken file changes nothing, with the start-up message
            path.write_text(json.dumps({"tls": {"listen": "127.0.0.1:0"}, "idle_timeout": -1}))
            with pytest.raises(ConfigError) as err:
                router.reload()
            assert str(path) in str(err.value)
            assert router.cfg.idle_timeout == 45
            assert await _passes(router, c, a, "198.18.30.5", "198.18.10.5")

            # a certificate that does not load fails the reload as a whole
            bad = tmp_path / "bad.crt"
            bad.write_text(
                "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
            )
            router_file(path, keys, tls=tls(keys, cert=bad), idle_timeout=20)
            with pytest.raises(ConfigError, match="tls.cert_file: cannot load"):
                router.reload()
            assert router.cfg.idle_timeout == 45
            assert len(router.authority.grants) == 2
        finally:
            await router.stop()

    with caplog.at_level(logging.INFO, logger="polevpn.router"):
        run(scenario())
    assert 'event=reload change="gateways: added' in caplog.text
    assert KEY_B not in caplog.text and KEY_C not in caplog.text


def test_pending_connections_authenticate_against_the_new_credentials(
    tmp_path: Path, keys: Path
) -> None:
    path = router_file(tmp_path / "r.json", keys)

    async def scenario() -> None:
        router = Router(load_router_config(path))
        await router.start()
        try:
            early = await tls_gateway(router, source="127.0.1.4")  # accepted before the reload
            for _ in range(100):  # the server side finishes its handshake a little later
                if router.connections:
                    break
                await asyncio.sleep(0.01)
            assert router.connections
            router_file(path, keys, gateways={C: {"key": KEY_C, "networks": [LAN_C]}})
            router.reload()
            assert await auth(early, KEY_C) == {}
            assert await register(early, C, KEY_C, [LAN_C]) == {}
            late = await tls_gateway(router, source="127.0.1.5")
            assert "error" in await auth(late, KEY_A)
        finally:
            await router.stop()

    run(scenario())


def test_reload_keeps_the_kcp_cookie_bound_to_the_address(tmp_path: Path, keys: Path) -> None:
    """After a reload (which loads the DTLS certificate again) a cookie issued to one
    address and replayed from another still gets only a HelloVerifyRequest: no server
    flight, no pending handshake (issue 19 bug 2: the new context had a jar of its own,
    which the listener never told the peer's address)."""
    kcp = {**tls(keys), "enable": True}
    path = router_file(tmp_path / "r.json", keys, kcp=kcp)

    async def exchange(sock: socket.socket, datagram: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, datagram)
        return await asyncio.wait_for(loop.sock_recv(sock, 4096), 2)

    def udp(source: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        return sock

    async def scenario() -> None:
        router = Router(load_router_config(path))
        await router.start()
        xs = [udp("127.0.1.6", router.kcp_port) for _ in range(2)]
        y = udp("127.0.1.7", router.kcp_port)
        try:
            router_file(path, keys, kcp=kcp, idle_timeout=30)
            router.reload()
            assert router.kcp_server is not None
            verify = dtls.Verification(insecure=True)
            for i, x in enumerate(xs):  # the second runs on what the first handshake left
                client = dtls.DtlsSession.client(dtls.client_context(verify), verify)
                hvr = await exchange(x, client.step(0.0)[0])
                assert hvr[0] == dtls.CT_HANDSHAKE and hvr[13] == 3  # HelloVerifyRequest
                with_cookie = client.receive(hvr, 0.0)[1][0]
                reply = await exchange(y, with_cookie)
                assert reply[13] == 3 and len(dtls.split_records(reply)) == 1, "not bound"
                assert len(router.kcp_server.pending) == i
                # from the address it was issued to, the cookie is good: the flight comes
                reply = await exchange(x, with_cookie)
                assert reply[13] == 2  # ServerHello
                assert len(router.kcp_server.pending) == i + 1
        finally:
            for sock in (*xs, y):
                sock.close()
            await router.stop()

    run(scenario())

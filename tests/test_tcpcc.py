"""TCP congestion control of the tls:// tunnel sockets (polevpn.io.tcpcc, issue 16 item 3).

The decision is pure (``choose``); what the kernel offers is read from /proc and corrected by
trying the one asked for (``usable``); the router's accepted sockets and the gateway's
connections are checked on loopback with getsockopt(TCP_CONGESTION).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import pwd
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_router_loopback import KEY, router_config, run

from polevpn.config import GatewayConfig, LinkConfig, RouteServer
from polevpn.gateway.gateway import Gateway
from polevpn.io import tcpcc
from polevpn.keygen import generate
from polevpn.router.router import Router


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("keys"))


def kernel() -> tuple[set[str], str]:
    available, default = tcpcc.usable("")
    return set(available), default


def settable(algorithm: str) -> bool:
    """By this process: root may set any available one, others only the allowed ones."""
    with contextlib.closing(socket.socket()) as sock:
        return tcpcc.try_set(sock, algorithm)


# -- the decision (sans-IO)


def test_absent_takes_bbr_where_there_is_bbr() -> None:
    c = tcpcc.choose(None, ["reno", "cubic", "bbr"], "cubic")
    assert (c.algorithm, c.used, c.unavailable) == ("bbr", "bbr", False)
    assert c.fields() == {"algorithm": "bbr", "requested": "unset"}


def test_absent_without_bbr_keeps_the_default_quietly() -> None:
    c = tcpcc.choose(None, ["reno", "cubic"], "cubic")
    assert (c.algorithm, c.used, c.unavailable) == (None, "cubic", False)


def test_default_asked_keeps_the_default() -> None:
    c = tcpcc.choose("", ["reno", "cubic", "bbr"], "cubic")
    assert (c.algorithm, c.used, c.unavailable) == (None, "cubic", False)
    assert c.fields() == {"algorithm": "cubic", "requested": "default"}


def test_available_request_is_used() -> None:
    c = tcpcc.choose("reno", ["reno", "cubic", "bbr"], "cubic")
    assert (c.algorithm, c.used, c.unavailable) == ("reno", "reno", False)
    assert c.fields() == {"algorithm": "reno", "requested": "reno"}


def test_unavailable_request_falls_back_with_a_warning(caplog) -> None:
    c = tcpcc.choose("vegas", ["reno", "cubic"], "cubic")
    assert (c.algorithm, c.used, c.requested, c.unavailable) == (None, "cubic", "vegas", True)
    caplog.set_level(logging.INFO)
    c.log(logging.getLogger("test"), Path("gateway.json"))
    warning, used = caplog.records
    # names what was asked, what there is and what is used
    assert warning.levelno == logging.WARNING
    assert warning.kv == {  # type: ignore[attr-defined]
        "config": Path("gateway.json"),
        "requested": "vegas",
        "algorithm": "cubic",
        "available": "cubic reno",
    }
    assert used.levelno == logging.INFO and used.getMessage() == "tcp congestion control"
    assert used.kv == {"transport": "tls", "algorithm": "cubic", "requested": "vegas"}  # type: ignore[attr-defined]
    # nothing known of the kernel (no /proc): still says what happens
    c = tcpcc.choose("bbr", [], "")
    assert (c.algorithm, c.used, c.unavailable, c.available) == (
        None,
        "the kernel default",
        True,
        (),
    )


def test_available_request_logs_one_line(caplog) -> None:
    caplog.set_level(logging.INFO)
    tcpcc.choose(None, ["bbr"], "cubic").log(logging.getLogger("test"), Path("config.json"))
    (line,) = caplog.records
    assert line.levelno == logging.INFO
    assert line.kv == {"transport": "tls", "algorithm": "bbr", "requested": "unset"}  # type: ignore[attr-defined]


# -- what the kernel offers: the list, corrected by trying


def _proc(tmp_path: Path, available: str, default: str) -> Path:
    (tmp_path / "tcp_available_congestion_control").write_text(available + "\n")
    (tmp_path / "tcp_congestion_control").write_text(default + "\n")
    return tmp_path


def test_usable_drops_a_listed_name_the_kernel_refuses(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "reno cubic nosuch_cc", "cubic")
    assert tcpcc.usable("nosuch_cc", proc) == (["reno", "cubic"], "cubic")
    c = tcpcc.decide("nosuch_cc", proc)
    assert (c.algorithm, c.unavailable, c.available) == (None, True, ("cubic", "reno"))


def test_usable_adds_an_unlisted_name_the_kernel_takes(tmp_path: Path) -> None:
    # reno is built into every kernel: setting it works whatever the list says
    proc = _proc(tmp_path, "cubic", "cubic")
    assert tcpcc.usable("reno", proc) == (["cubic", "reno"], "cubic")
    assert tcpcc.decide("reno", proc).algorithm == "reno"


def test_usable_without_proc(tmp_path: Path) -> None:
    assert tcpcc.usable("", tmp_path / "none") == ([], "")
    assert tcpcc.decide(None, tmp_path / "none").algorithm in (None, "bbr")


# -- on loopback: the router's accepted socket and the gateway's connection


def _gateway_config(port: int, tcp_congestion: str | None) -> GatewayConfig:
    return GatewayConfig(
        path=Path("gateway.json"),
        route_servers=(RouteServer("tls", "127.0.0.1", port, f"tls://127.0.0.1:{port}"),),
        key=KEY,
        gateway=ipaddress.IPv4Address("169.254.0.1"),
        gateway6=None,
        local_networks=(),
        route_networks=(),
        acls=(),
        insecure_skip_verify=True,
        stats_interval=0,
        tcp_congestion=tcp_congestion,
    )


async def _both_ends(
    keys, tcp_congestion: str | None, via: LinkConfig | None = None
) -> tuple[str | None, str | None, str | None, Router, Gateway]:
    """(the router's listener's, its accepted socket's, the gateway's socket's) algorithm."""
    router = Router(router_config(keys, tcp_congestion=tcp_congestion))
    await router.start()
    gw = None
    try:
        gw = Gateway(_gateway_config(router.tls_port, tcp_congestion))
        server = gw.cfg.route_servers[0]
        link = await asyncio.wait_for(gw._connect_once(server, via, None), 10)
        for _ in range(200):
            if router.connections:
                break
            await asyncio.sleep(0.01)
        (conn,) = router.connections
        assert conn.transport is not None and link.transport is not None
        return (
            tcpcc.current(router.listen_sockets[0]),
            tcpcc.current(conn.transport.get_extra_info("socket")),
            tcpcc.current(link.transport.get_extra_info("socket")),
            router,
            gw,
        )
    finally:
        if gw is not None and gw._link is not None and gw._link.transport is not None:
            gw._link.transport.abort()
        for c in list(router.connections):
            if c.transport is not None:
                c.transport.abort()
        await router.stop()


BBR = pytest.param(
    "bbr",
    marks=pytest.mark.skipif(
        "bbr" not in kernel()[0], reason="this kernel has no bbr (tcp_bbr not loaded or built)"
    ),
)


@pytest.mark.parametrize("algorithm", ["reno", "cubic", BBR])
@pytest.mark.parametrize(
    "via", [None, LinkConfig("v4", RouteServer("tls", "", 0, ""), "127.0.0.1")]
)
def test_loopback_sockets_use_the_configured_algorithm(
    keys, algorithm: str, via: LinkConfig | None
) -> None:
    if not settable(algorithm):
        # cubic is outside tcp_allowed_congestion_control on some hosts: root may set it
        pytest.skip(f"{algorithm} is not available to this process")
    listener, accepted, gateway, router, gw = run(_both_ends(keys, algorithm, via))
    assert (listener, accepted, gateway) == (algorithm, algorithm, algorithm)
    assert router.congestion is not None and router.congestion.used == algorithm
    assert gw.tcp_congestion().algorithm == algorithm


def test_default_leaves_the_kernel_default(keys) -> None:
    _, default = kernel()
    _, accepted, gateway, router, _ = run(_both_ends(keys, ""))
    assert router.congestion is not None and router.congestion.algorithm is None
    assert accepted == gateway == default


def test_unavailable_request_falls_back_and_warns(keys, caplog) -> None:
    _, default = kernel()
    caplog.set_level(logging.INFO)
    _, accepted, gateway, router, gw = run(_both_ends(keys, "nosuch_cc"))
    assert accepted == gateway == default
    warnings = [r for r in caplog.records if r.getMessage().startswith("tcp_congestion")]
    # one from the router, one from the gateway, each naming what is used instead
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
    assert all(r.kv["requested"] == "nosuch_cc" for r in warnings)
    assert all(r.kv["algorithm"] == default for r in warnings)
    used = [r.kv for r in caplog.records if r.getMessage() == "tcp congestion control"]
    assert used == [{"transport": "tls", "algorithm": default, "requested": "nosuch_cc"}] * 2


# -- after the router drops privileges


_DROPPED = textwrap.dedent(
    """
    import asyncio, json, os, ssl, sys
    sys.path.insert(0, sys.argv[1])
    from test_router_loopback import router_config
    from polevpn.io import tcpcc
    from polevpn.keygen import KeygenResult
    from polevpn.router.router import Router

    async def main():
        keys = KeygenResult(**json.loads(sys.argv[2]))
        router = Router(router_config(keys, tcp_congestion=sys.argv[3], user="nobody"))
        await router.start()
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        _, writer = await asyncio.open_connection("127.0.0.1", router.tls_port, ssl=ctx)
        for _ in range(200):
            if router.connections:
                break
            await asyncio.sleep(0.01)
        (conn,) = router.connections
        sock = conn.transport.get_extra_info("socket")
        fresh = tcpcc.try_set(__import__("socket").socket(), sys.argv[3])
        print(json.dumps([os.geteuid(), tcpcc.current(sock), fresh]))
        writer.close()
        await router.stop()

    asyncio.run(main())
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to drop privileges")
def test_accepted_sockets_keep_the_algorithm_after_the_privilege_drop(keys) -> None:
    """Set on the listener as root, inherited by sockets accepted as nobody: also an
    algorithm nobody may not set itself (outside tcp_allowed_congestion_control)."""
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("no user nobody")
    available, _ = kernel()
    allowed = set(Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split())
    # one not allowed to the unprivileged where there is one: the case that needs the listener
    algorithm = next(iter(sorted(available - allowed)), "reno")
    fields = {f.name: str(getattr(keys, f.name)) for f in dataclasses.fields(keys)}
    out = subprocess.run(
        [sys.executable, "-c", _DROPPED, str(Path(__file__).parent), json.dumps(fields), algorithm],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    uid, accepted, fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert uid == nobody
    assert accepted == algorithm
    if algorithm not in allowed:
        # without the listener's, nobody could not have set it on the accepted socket
        assert fresh is False

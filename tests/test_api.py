"""The router's REST API (polevpn.ops.api), its OpenAPI document, its config and polevpn-ctl.

An in-process router with protocol-level gateways (test_router_loopback.ProtoGateway) is
checked over HTTP against what the test itself sent; schemathesis then fuzzes every
operation against the router's own served document; polevpn-ctl runs as a subprocess
against a real polevpn-router process on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_router_loopback as loopback
import uvloop
from test_direct_router import direct_pair
from test_metrics import (
    LINK_TIMEOUT_MS,
    Keepalive,
    flows_to,
    http,
    login_link,
    receive_packets,
    recv_ip,
    router_file,
    wait_until,
)
from test_router_loopback import (
    ProtoGateway,
    frame,
    ipv4_packet,
    router_config,
    run,
    started_ops,
)

from polevpn.cli import RouterDaemon
from polevpn.common.logfmt import endpoint
from polevpn.config import ConfigError, Listener, load_api_access, load_router_config
from polevpn.io import pathstats
from polevpn.keygen import generate
from polevpn.ops import api, ctl, metrics, openapi
from polevpn.router.router import Router

try:
    import topology as t
except ImportError:  # pragma: no cover
    from tests import topology as t

A, B = "169.254.0.1", "169.254.0.2"
LAN_A, LAN_B = "198.18.10.0/24", "198.18.20.0/24"
LAN_A6 = "2001:db8:10::/64"
# a third gateway, with two links, for polevpn-ctl
C, LAN_C = "169.254.0.3", "198.18.30.0/24"
TOKEN = "t0k3n-" + "x" * 26


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("keys"))


def api_config(keys, **overrides):
    return router_config(keys, api_listen=("127.0.0.1", 0), api_token=TOKEN, **overrides)


async def get(port: int, path: str, token: str | None = TOKEN, method: str = "GET"):
    """(status, headers, parsed JSON or raw body) of one request."""
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    req = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n"
    status, headers, body = await http(port, req.encode())
    if headers.get("content-type", "").startswith("application/json") and body:
        return status, headers, json.loads(body)
    return status, headers, body


# -- how peers are written


@pytest.mark.parametrize(
    "addr,text",
    [
        (("198.19.0.6", 45443), "198.19.0.6:45443"),
        (("::ffff:198.19.0.6", 45443, 0, 0), "198.19.0.6:45443"),
        (("2001:db8:f1::2", 52085, 0, 0), "[2001:db8:f1::2]:52085"),
        (("2001:0db8:0000::1", 1), "[2001:db8::1]:1"),
        (("fe80::1%eth0", 7, 0, 2), "[fe80::1%eth0]:7"),
        (None, "?"),
    ],
)
def test_endpoint(addr, text):
    assert endpoint(addr) == text


def test_peers_on_a_dual_stack_listener_are_unmapped_and_bracketed(keys, caplog):
    """Issue 19 bug 13: on a [::] listener an IPv4 peer was ``::ffff:127.0.0.1:5`` and an
    IPv6 one ``::1:5``, in the API and in the log alike."""
    cert, key = keys.server_cert, keys.server_key
    any6 = Listener(True, "::", 0, cert, key)
    cfg = api_config(keys, tls=any6, kcp=any6)

    async def scenario():
        router, ops = await started_ops(cfg)
        gws = []
        try:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            for host in ("127.0.0.1", "::1"):
                reader, writer = await asyncio.open_connection(
                    host, router.tls_port, ssl=ctx, server_hostname="polevpn.com"
                )
                gws.append(ProtoGateway(reader, writer))
            await gws[0].login(A, [LAN_A])
            await gws[1].login(B, [LAN_B])
            _, _, body = await get(ops.api.port, "/api/v1/gateways")
            peers = {g["gateway"]: g["peer"] for g in body["gateways"]}
            local = [g.writer.get_extra_info("sockname") for g in gws]
            return peers, local
        finally:
            for g in gws:
                g.close()
            await router.stop()

    with caplog.at_level("INFO", logger="polevpn.router"):
        peers, (local4, local6) = run(scenario())
    assert peers == {A: f"127.0.0.1:{local4[1]}", B: f"[::1]:{local6[1]}"}
    assert f"event=registered gateway={A} peer=127.0.0.1:{local4[1]} " in caplog.text
    assert f"event=registered gateway={B} peer=[::1]:{local6[1]} " in caplog.text
    assert "::ffff:" not in caplog.text


# -- auth and HTTP behaviour


def test_token_required_and_public_paths(keys):
    async def scenario():
        router, ops = await started_ops(api_config(keys))
        port = ops.api.port
        try:
            for path in ("status", "gateways", "routes", f"gateways/{A}"):
                status, headers, body = await get(port, f"/api/v1/{path}", token=None)
                assert status == 401, path
                assert headers["www-authenticate"].startswith("Bearer")
                assert set(body) == {"error"}
                assert headers["cache-control"] == "no-store"
                status, _, body = await get(port, f"/api/v1/{path}", token=TOKEN[:-1] + "y")
                assert status == 401 and "error" in body
            status, _, _ = await get(port, "/api/v1/reload", token=None, method="POST")
            assert status == 401
            # another scheme with the right secret, and the token with a prefix, are refused
            for value in (f"Basic {TOKEN}", f"Bearer x{TOKEN}", "Bearer", "Bearer "):
                req = f"GET /api/v1/status HTTP/1.1\r\nAuthorization: {value}\r\n\r\n"
                status, _, _ = await http(port, req.encode())
                assert status == 401, value
            status, _, body = await get(port, "/api/v1/status")
            assert status == 200 and body["gateways"] == 0

            # no data there: no token needed
            status, headers, doc = await get(port, "/api/v1/openapi.json", token=None)
            assert status == 200 and doc["openapi"].startswith("3.")
            status, headers, page = await get(port, "/", token=None)
            assert status == 200 and headers["content-type"].startswith("text/html")
            assert b"<html" in page.lower()
            status, headers, body = await get(port, "/favicon.ico", token=None)
            assert status == 204 and body == b"" and "content-length" not in headers

            # JSON errors everywhere, 405 says what is allowed, HEAD has no body
            status, _, body = await get(port, "/api/v1/nothing")
            assert status == 404 and "error" in body
            status, headers, body = await get(port, "/api/v1/status", method="DELETE")
            assert status == 405 and headers["allow"] == "GET, HEAD" and "error" in body
            status, headers, body = await get(port, "/api/v1/reload")
            assert status == 405 and headers["allow"] == "POST"
            status, headers, body = await get(port, "/api/v1/status", method="HEAD")
            assert status == 200 and body == b"" and int(headers["content-length"]) > 0
            status, _, body = await http(port, b"garbage\r\n\r\n")
            assert status == 400 and json.loads(body)["error"]
            req = b"POST /api/v1/reload HTTP/1.1\r\nContent-Length: 99999\r\n\r\n"
            status, _, _ = await http(port, req)
            assert status == 413
            req = b"POST /api/v1/reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            status, _, _ = await http(port, req)
            assert status == 411
            status, _, _ = await get(port, "/api/v1/gateways/%ff%fe")
            assert status == 400
        finally:
            await router.stop()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(scenario())


def test_malformed_content_length_is_a_400(keys, caplog):
    """Issue 20 finding 11: 4,301 digits raised ValueError in int() (no reply, a traceback
    logged); repeated Content-Length headers are refused too."""

    async def scenario():
        router, ops = await started_ops(api_config(keys))
        port = ops.api.port
        try:
            out = []
            for value in ("9" * 4301, "1" * 13, "-1", "+5", "1_0", "0x10", "١٢"):
                req = f"POST /api/v1/reload HTTP/1.1\r\nContent-Length: {value}\r\n\r\n"
                out.append((await http(port, req.encode("utf-8")))[0])
            req = b"POST /api/v1/reload HTTP/1.1\r\nContent-Length: 0\r\nContent-length: 5\r\n\r\n"
            out.append((await http(port, req))[0])
            # a plain zero, and a bounded body, still work
            status, _, _ = await get(port, "/api/v1/status")
            return out, status
        finally:
            await router.stop()

    with caplog.at_level("ERROR"):
        statuses, ok = run(scenario())
    assert statuses == [400] * 8 and ok == 200
    assert "Traceback" not in caplog.text and "exc=" not in caplog.text


# -- the views


def _recent(stamp: str) -> bool:
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    now = datetime.now(UTC)
    return now - timedelta(minutes=5) < when <= now + timedelta(seconds=1)


@pytest.mark.parametrize("transport", ["tls", "kcp"])
def test_views_follow_two_gateways_and_their_traffic(keys, transport, monkeypatch):
    monkeypatch.setitem(loopback._transport, "mode", transport)
    n_ab, n_ba = 11, 5

    async def scenario():
        router, ops = await started_ops(api_config(keys))
        port = ops.api.port
        try:
            # B registers first: the list is sorted by address, not by arrival
            gb = await ProtoGateway.connect(router)
            ga = await ProtoGateway.connect(router)
            await gb.login(B, [LAN_B])
            await ga.login(A, [LAN_A6, LAN_A])

            status, _, st = await get(port, "/api/v1/status")
            assert status == 200
            assert (st["gateways"], st["connections"], st["routes"], st["pending"]) == (2, 2, 5, 0)
            assert st["counters"]["registrations"] == 2
            assert {(x["transport"], x["port"]) for x in st["listen"]} == {
                ("tls", router.tls_port),
                ("kcp", router.kcp_port),
            }
            assert _recent(st["started_at"]) and 0 <= st["uptime"] < 60

            status, _, body = await get(port, "/api/v1/gateways")
            gws = body["gateways"]
            assert [g["gateway"] for g in gws] == [A, B]
            a, b = gws
            assert a["networks"] == [LAN_A6, LAN_A] and b["networks"] == [LAN_B]
            assert a["transport"] == b["transport"] == transport
            local = ga.writer.get_extra_info("sockname")
            if local is not None:  # a TCP client; the kcp test transport has no sockname
                assert a["peer"] == f"{local[0]}:{local[1]}"
            assert a["peer"].startswith("127.0.0.1:") and a["peer"] != b["peer"]
            assert _recent(a["connected_at"]) and 0 <= a["uptime"] < 60
            assert (a["packets_in"], a["packets_out"], a["bytes_in"], a["bytes_out"]) == (0,) * 4
            if transport == "kcp":
                assert a["kcp"] is not None and set(a["kcp"]) == {
                    "srtt_ms",
                    "retransmissions",
                    "fec",
                }
                assert a["rtt_ms"] == a["kcp"]["srtt_ms"]
            else:
                assert a["kcp"] is None
                # the kernel's estimate of a loopback TCP connection: small, not missing
                assert a["rtt_ms"] is not None and 0 < a["rtt_ms"] < 1000

            # sizes differ per packet so bytes cannot come out right by accident
            ab = [ipv4_packet("198.18.10.5", "198.18.20.9", b"a" * (10 + i)) for i in range(n_ab)]
            ba = [ipv4_packet("198.18.20.9", "198.18.10.5", b"b" * (50 + i)) for i in range(n_ba)]
            # and 3 to nowhere
            nowhere = [ipv4_packet("198.18.10.5", "198.18.99.1") for _ in range(3)]
            await ga.send(b"".join(frame(3, p) for p in nowhere + ab))
            await gb.send(b"".join(frame(3, p) for p in ba))
            assert await receive_packets(gb, n_ab) == ab
            assert await receive_packets(ga, n_ba) == ba

            status, _, a2 = await get(port, f"/api/v1/gateways/{A}")
            assert status == 200
            assert a2["packets_in"] == n_ab + 3
            assert a2["bytes_in"] == sum(map(len, ab))
            assert a2["packets_out"] == n_ba and a2["bytes_out"] == sum(map(len, ba))
            _, _, b2 = await get(port, f"/api/v1/gateways/{B}")
            assert b2["packets_out"] == n_ab and b2["bytes_out"] == sum(map(len, ab))
            _, _, st2 = await get(port, "/api/v1/status")
            assert st2["counters"]["packets_forwarded"] == n_ab + n_ba
            assert st2["counters"]["bytes_forwarded"] == sum(map(len, ab + ba))
            assert st2["drops"]["no_route"] == 3 and st2["drops"]["spoofed"] == 0
            assert st2["uptime"] >= st["uptime"]

            _, _, body = await get(port, "/api/v1/routes")
            assert body["routes"] == [
                {"network": f"{A}/32", "gateway": A, "transport": transport},
                {"network": f"{B}/32", "gateway": B, "transport": transport},
                {"network": LAN_A, "gateway": A, "transport": transport},
                {"network": LAN_B, "gateway": B, "transport": transport},
                {"network": LAN_A6, "gateway": A, "transport": transport},
            ]

            for missing in ("169.254.0.9", "not-an-address", "198.18.10.0"):
                status, _, body = await get(port, f"/api/v1/gateways/{missing}")
                assert status == 404 and "error" in body

            # a gateway that leaves leaves the views
            gb.close()
            deadline = time.monotonic() + 10
            while (await get(port, "/api/v1/status"))[2]["gateways"] != 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            _, _, body = await get(port, "/api/v1/gateways")
            assert [g["gateway"] for g in body["gateways"]] == [A]
            assert (await get(port, f"/api/v1/gateways/{B}"))[0] == 404
            _, _, body = await get(port, "/api/v1/routes")
            assert {r["gateway"] for r in body["routes"]} == {A}
            ga.close()
        finally:
            await router.stop()

    run(scenario())


def test_tcp_rtt_reads_tcp_info():
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    with a, b:
        rtt = api.tcp_rtt_ms(SimpleNamespace(get_extra_info=lambda name: a))
        # an established loopback connection has an estimate from its handshake
        assert rtt is not None and 0 < rtt < 1000
    unix_a, unix_b = socket.socketpair()
    with unix_a, unix_b:
        assert api.tcp_rtt_ms(SimpleNamespace(get_extra_info=lambda name: unix_a)) is None
    assert api.tcp_rtt_ms(SimpleNamespace(get_extra_info=lambda name: None)) is None


LINK_FIELDS = set(openapi.LINK["properties"])


@pytest.mark.parametrize("transport", ["tls", "mixed"])
def test_views_of_a_multi_link_gateway(keys, transport, monkeypatch):
    """A gateway registering two links is one entry with both links; its counters are the
    links' sums, and a link that falls silent is shown down, then up again."""
    monkeypatch.setitem(loopback._transport, "mode", transport)
    monkeypatch.setitem(loopback._transport, "count", 0)

    async def scenario():
        router, ops = await started_ops(api_config(keys))
        port = ops.api.port
        alive: list[Keepalive] = []
        gws: list[ProtoGateway] = []
        try:
            # mixed: B on kcp, v4 on tls, v6 on kcp
            gb, v4, v6 = [await ProtoGateway.connect(router) for _ in range(3)]
            gws += [gb, v4, v6]
            await gb.login(B, [LAN_B])
            # v6 first: links are listed by name, not by arrival
            await login_link(v6, A, [LAN_A, LAN_A6], "v6", weight=2)
            alive.append(Keepalive(v6))
            await login_link(v4, A, [LAN_A, LAN_A6], "v4", weight=0.5, backup=True)
            alive.append(Keepalive(v4))
            link_transport = {"v4": "tls", "v6": "kcp" if transport == "mixed" else "tls"}
            site_transport = "mixed" if transport == "mixed" else "tls"

            status, _, st = await get(port, "/api/v1/status")
            assert status == 200
            assert (st["gateways"], st["links"], st["connections"], st["routes"]) == (2, 2, 3, 5)
            assert st["counters"]["registrations"] == 3
            assert st["drops"]["links_down"] == 0

            _, _, body = await get(port, "/api/v1/gateways")
            assert [g["gateway"] for g in body["gateways"]] == [A, B]
            a, b = body["gateways"]
            assert b["links"] == [] and b["transport"] == ("kcp" if transport == "mixed" else "tls")
            assert a["networks"] == [LAN_A, LAN_A6]
            assert a["transport"] == site_transport
            assert a["rtt_ms"] is None and a["kcp"] is None
            assert "multi-link" in a["features"]
            assert [x["name"] for x in a["links"]] == ["v4", "v6"]
            l4, l6 = a["links"]
            assert set(l4) == LINK_FIELDS
            assert (l4["weight"], l4["backup"], l6["weight"], l6["backup"]) == (0.5, True, 2, False)
            assert l4["timeout_ms"] == l6["timeout_ms"] == LINK_TIMEOUT_MS
            assert l4["transport"] == "tls" and l6["transport"] == link_transport["v6"]
            local = v4.writer.get_extra_info("sockname")
            assert l4["peer"] == f"{local[0]}:{local[1]}"
            assert a["peer"] == f"{l4['peer']}, {l6['peer']}"
            assert _recent(l4["connected_at"]) and _recent(l6["connected_at"])
            # the gateway's since its oldest link: v4 connected first (v6 registered first)
            assert a["connected_at"] == l4["connected_at"] <= l6["connected_at"]
            for link in (l4, l6):
                assert "multi-link" in link["features"]
                assert link["rtt_ms"] is not None and 0 <= link["rtt_ms"] < 1000
                # at least the AUTH and REGISTER replies went out, and loopback loses nothing
                # (a KCP resend on a stalled loop is possible, so that one is bounded only)
                assert link["segments_sent"] >= 2
                assert 0 <= link["retransmissions"] <= link["segments_sent"]
                assert link["loss"] == link["retransmissions"] / link["segments_sent"]
                if link["transport"] == "tls":
                    assert link["retransmissions"] == 0 and link["kcp"] is None
                else:
                    assert link["rtt_ms"] == link["kcp"]["srtt_ms"]

            _, _, body = await get(port, "/api/v1/routes")
            assert {(r["network"], r["gateway"], r["transport"]) for r in body["routes"]} >= {
                (f"{A}/32", A, site_transport),
                (LAN_A, A, site_transport),
                (LAN_A6, A, site_transport),
            }

            # traffic each way; each link's counters against what that link carried
            to_a = flows_to("198.18.10", "198.18.20", 16)
            await gb.send(b"".join(frame(3, x) for x in to_a))

            async def all_sent():
                _, _, g = await get(port, f"/api/v1/gateways/{A}")
                assert g["packets_out"] == sum(x["packets_out"] for x in g["links"])
                return g if g["packets_out"] == len(to_a) else None

            a = await wait_until(all_sent, "packets to A")
            got = {x["name"]: x for x in a["links"]}
            on_v4 = [await recv_ip(v4) for _ in range(got["v4"]["packets_out"])]
            on_v6 = [await recv_ip(v6) for _ in range(got["v6"]["packets_out"])]
            assert sorted(on_v4 + on_v6) == sorted(to_a)
            # v4 is a backup: the primary, up, carries everything (v4 only if v6 stalled)
            assert len(on_v6) >= len(on_v4)
            assert got["v4"]["bytes_out"] == sum(map(len, on_v4))
            assert got["v6"]["bytes_out"] == sum(map(len, on_v6))
            assert a["bytes_out"] == sum(map(len, to_a))

            from_v4 = flows_to("198.18.20", "198.18.10", 3)
            from_v6 = flows_to("198.18.20", "198.18.10", 7)
            await v4.send(b"".join(frame(3, x) for x in from_v4))
            await v6.send(b"".join(frame(3, x) for x in from_v6))
            assert sorted(await receive_packets(gb, 10)) == sorted(from_v4 + from_v6)
            _, _, a = await get(port, f"/api/v1/gateways/{A}")
            l4, l6 = a["links"]
            assert (l4["packets_in"], l6["packets_in"], a["packets_in"]) == (3, 7, 10)
            assert l4["bytes_in"] == sum(map(len, from_v4))
            assert a["bytes_in"] == sum(map(len, from_v4 + from_v6))

            # v6 falls silent past its timeout: down (and its flows on v4), then up again
            await alive[0].stop()

            async def v6_down():
                _, _, g = await get(port, f"/api/v1/gateways/{A}")
                l4, l6 = g["links"]
                return g if not l6["up"] and l4["up"] else None

            a = await wait_until(v6_down, "link v6 down")
            assert a["links"][1]["downs"] >= 1
            _, _, st = await get(port, "/api/v1/status")
            assert st["counters"]["links_down"] >= 1
            await v6.send(frame(4))

            async def v6_up():
                _, _, g = await get(port, f"/api/v1/gateways/{A}")
                return g if g["links"][1]["up"] else None

            a = await wait_until(v6_up, "link v6 up again")
            assert a["links"][1]["downs"] >= 1

            # a link that closes leaves the list; the last one takes the gateway with it
            v4.close()

            async def one_link():
                _, _, g = await get(port, f"/api/v1/gateways/{A}")
                return g if [x["name"] for x in g["links"]] == ["v6"] else None

            await wait_until(one_link, "v4 gone")
            v6.close()

            async def site_gone():
                return (await get(port, f"/api/v1/gateways/{A}"))[0] == 404

            await wait_until(site_gone, "A gone")
            _, _, st = await get(port, "/api/v1/status")
            assert (st["gateways"], st["links"], st["links_up"]) == (1, 0, 0)
        finally:
            for k in alive:
                await k.stop()
            for gw in gws:
                gw.close()
            await router.stop()

    run(scenario())


def test_tcp_info_fields():
    """The TCP_INFO offsets: an exact count of data segments sent and no retransmissions."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    with a, b:
        a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = SimpleNamespace(get_extra_info=lambda name: a)
        before = pathstats.tcp_info(transport)
        assert before is not None and before.data_segs_out == 0
        for i in range(5):
            a.sendall(b"x" * (100 + i))
            # one write on the wire at a time: five segments, not coalesced
            assert len(b.recv(1000)) == 100 + i
        info = pathstats.tcp_info(transport)
        assert info is not None
        assert info.data_segs_out == 5 and info.total_retrans == 0
        # the SYN and bare ACKs count in segs_out, not in data_segs_out
        assert info.segs_out is not None and info.segs_out > 5
        assert 0 < info.rtt_us < 1_000_000
        figures = pathstats.path_figures(transport, "tls")
        assert (figures.segments_sent, figures.retransmissions, figures.loss) == (5, 0, 0.0)
    assert pathstats.PathFigures(1.0, 3, 12).loss == 0.25
    assert pathstats.PathFigures(1.0, 0, 0).loss is None
    assert pathstats.path_figures(None, "tls") == pathstats.PathFigures()


# -- the OpenAPI document


def test_openapi_document_is_valid_and_complete(keys):
    import schemathesis

    async def scenario():
        router, ops = await started_ops(api_config(keys))
        try:
            status, _, doc = await get(ops.api.port, "/api/v1/openapi.json", token=None)
            server_routes = {(r.method, "/".join(r.segments)) for r in ops.api._routes}
        finally:
            await router.stop()
        return doc, server_routes

    doc, server_routes = run(scenario())
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()
    documented = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert documented == server_routes
    assert set(doc["components"]["schemas"]["Status"]["properties"]["drops"]["required"]) == set(
        metrics.ROUTER_DROPS.values()
    )
    assert set(openapi.DROP_REASONS) == set(metrics.ROUTER_DROPS.values())


# -- reload


def _write_router_file(path: Path, keys, **extra) -> Path:
    listener = {
        "listen": "127.0.0.1:0",
        "cert_file": str(keys.server_cert),
        "key_file": str(keys.server_key),
    }
    obj = {
        "tls": listener,
        "key": loopback.KEY,
        "stats_interval": 0,
        "kcp": {**listener, "fec": {"mode": "off"}},
        **extra,
    }
    path.write_text(json.dumps(obj))
    path.chmod(0o600)
    return path


def test_reload_over_the_api(keys, tmp_path):
    path = _write_router_file(
        tmp_path / "router.json", keys, api_listen="127.0.0.1:0", api_token=TOKEN
    )
    cfg = load_router_config(path)

    async def scenario():
        router, ops = await started_ops(cfg)
        port = ops.api.port
        try:
            status, _, body = await get(port, "/api/v1/reload", token=None, method="POST")
            assert status == 401
            status, _, body = await get(port, "/api/v1/reload", method="POST")
            assert status == 200, body
            assert body == {"reloaded": True, "changes": []}

            # a new token takes effect with the reload that brings it
            new_token = "n3w-" + "y" * 28
            _write_router_file(path, keys, api_listen="127.0.0.1:0", api_token=new_token)
            status, _, body = await get(port, "/api/v1/reload", method="POST")
            assert status == 200 and any("api_token" in c for c in body["changes"]), body
            assert new_token not in json.dumps(body)
            assert (await get(port, "/api/v1/status"))[0] == 401
            assert (await get(port, "/api/v1/status", token=new_token))[0] == 200

            path.write_text("{ not json")
            status, _, body = await get(port, "/api/v1/reload", token=new_token, method="POST")
            assert status == 400
            assert str(path) in body["error"] and "JSON" in body["error"]
            # nothing changed
            assert (await get(port, "/api/v1/status", token=new_token))[0] == 200
        finally:
            await router.stop()

    run(scenario())


# -- direct paths


def test_direct_over_the_api(keys):
    """/api/v1/direct: the pair, both sides (one reported, one not yet), the endpoints
    (public: where the UDP probe came from; host: what the gateway reported)."""

    async def scenario():
        loopback._transport["mode"] = "tls"
        router, ops = await started_ops(api_config(keys))
        try:
            a, b = await direct_pair(router)
            status, _, body = await get(ops.api.port, "/api/v1/direct")
            assert status == 200
            assert body["enabled"] is True
            (pair,) = body["pairs"]
            assert pair["gateways"] == ["169.254.0.21", "169.254.0.22"]
            assert len(pair["pair_id"]) == 32 and pair["state"] == "relayed"
            created = datetime.fromisoformat(pair["created"].replace("Z", "+00:00"))
            expires = datetime.fromisoformat(pair["expires"].replace("Z", "+00:00"))
            assert timedelta(seconds=3599) < expires - created < timedelta(seconds=3601)
            side_a, side_b = pair["sides"]
            assert side_a == {
                "gateway": "169.254.0.21",
                "state": "direct",
                "cause": "none",
                "rtt_ms": 4.2,
                "bytes_sent": 1000,
                "bytes_received": 2000,
                "refused": 5,
                "endpoint": "198.18.0.22:40000",
                "reported": side_a["reported"],
            }
            assert side_a["reported"] is not None
            assert side_b["state"] == "relayed" and side_b["cause"] == "unreported"
            assert body["endpoints"] == [
                {"gateway": g.address, "public": str(g.udp.endpoint), "host": [str(g.host)]}
                for g in (a, b)
            ]
            assert body["counters"]["offers"] == 2
            assert body["counters"]["probes_answered"] == 2
            for g in (a, b):
                g.close()
        finally:
            await router.stop()

    run(scenario())


# -- schemathesis against the live API


class ThreadedRouter:
    """A router on its own event loop in a thread, so that a synchronous client (requests,
    as schemathesis uses) can talk to it from the test's thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def threaded_router(
    cfg, gateways: int = 2
) -> Iterator[tuple[Router, ThreadedRouter, RouterDaemon]]:
    """The router with ``gateways`` plain gateways and a multi-link one of two links
    (169.254.0.9, 198.18.90.0/24), one link kept up and one silent (so down soon)."""
    tr = ThreadedRouter()
    router, ops = tr.call(started_ops(cfg))
    gws: list[ProtoGateway] = []
    alive: list[Keepalive] = []
    try:

        async def connect() -> None:
            for i in range(gateways):
                gw = await ProtoGateway.connect(router)
                await gw.login(f"169.254.0.{i + 1}", [f"198.18.{10 * (i + 1)}.0/24"])
                gws.append(gw)
            for name in ("up", "silent"):
                gw = await ProtoGateway.connect(router)
                await login_link(gw, "169.254.0.9", ["198.18.90.0/24"], name)
                gws.append(gw)
            alive.append(Keepalive(gws[-2]))
            await gws[0].send(frame(3, ipv4_packet("198.18.10.5", "198.18.20.9")))
            await gws[1].recv_frame(timeout=5)

        tr.call(connect())
        yield router, tr, ops
    finally:
        shut_down(tr, router, alive, gws)


def shut_down(
    tr: ThreadedRouter, router: Router, alive: list[Keepalive], gws: list[ProtoGateway]
) -> None:
    """Stop the keepalives, close the gateways, stop the router and its thread."""

    async def stop() -> None:
        for k in alive:
            await k.stop()
        for gw in gws:
            gw.close()
        await router.stop()

    try:
        tr.call(stop())
    finally:
        tr.close()


# bounded so the whole run stays well under 20 s on a busy 2-core machine
FUZZ_EXAMPLES = 25


def fuzz(base: str, max_examples: int = FUZZ_EXAMPLES) -> list[str]:
    """schemathesis over every operation of the served document; the operations run."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        ignored_auth,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        response_headers_conformance,
        ignored_auth,
    ]
    schema = schemathesis.openapi.from_url(f"{base}/api/v1/openapi.json", timeout=10)
    ran = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            case.call_and_validate(
                base_url=base,
                headers={"Authorization": f"Bearer {TOKEN}"},
                checks=checks,
                timeout=10,
            )

        check()
        ran.append(operation.label)
    return ran


def test_schemathesis_against_the_served_document(keys, tmp_path, monkeypatch):
    monkeypatch.setitem(loopback._transport, "mode", "mixed")
    # a real, valid config file: the fuzzed POST /reload re-reads it and changes nothing
    path = _write_router_file(
        tmp_path / "router.json", keys, api_listen="127.0.0.1:0", api_token=TOKEN
    )
    cfg = load_router_config(path)
    t0 = time.monotonic()
    with threaded_router(cfg) as (router, tr, ops):
        # two gateways with a direct pair, one side's status reported: every part of
        # /api/v1/direct's reply is there to be checked against the document
        pair = tr.call(direct_pair(router))
        try:
            ran = fuzz(f"http://127.0.0.1:{ops.api.port}")
        finally:

            async def close() -> None:
                for g in pair:
                    g.close()

            tr.call(close())
    # every operation but the document itself, which schemathesis leaves out
    assert set(ran) >= {
        "GET /api/v1/status",
        "GET /api/v1/gateways",
        "GET /api/v1/gateways/{address}",
        "GET /api/v1/routes",
        "GET /api/v1/direct",
        "POST /api/v1/reload",
        "GET /",
        "GET /favicon.ico",
    }, ran
    # not a speed assertion: a reminder to keep the example count bounded
    print(f"schemathesis: {len(ran)} operations in {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("view,field", [("gateway_view", "packets_in"), ("link_view", "downs")])
def test_schemathesis_catches_a_reply_that_strays_from_the_document(keys, monkeypatch, view, field):
    """The fuzz test can fail: a gateway view, or a link of a multi-link gateway's, with a
    field of the wrong type is reported."""
    from schemathesis.core.failures import FailureGroup

    monkeypatch.setitem(loopback._transport, "mode", "tls")
    real = getattr(api.ApiServer, view)

    def broken(self, conn):
        good = real(self, conn)
        return {**good, field: str(good[field])}

    monkeypatch.setattr(api.ApiServer, view, broken)
    with (
        threaded_router(api_config(keys)) as (router, _, ops),
        pytest.raises((FailureGroup, AssertionError)) as err,
    ):
        fuzz(f"http://127.0.0.1:{ops.api.port}", max_examples=5)
    assert field in str(err.value)


# -- config


def _api_warnings(cfg) -> list[str]:
    return [w for w in cfg.warnings if "api" in w.lower()]


def test_config_api_listen_needs_a_token(tmp_path, keys):
    with pytest.raises(ConfigError) as err:
        load_router_config(router_file(tmp_path, keys, api_listen="127.0.0.1:8080"))
    assert err.value.field == "api_token" and "api_token_file" in err.value.problem

    cfg = load_router_config(
        router_file(tmp_path, keys, api_listen="127.0.0.1:8080", api_token=TOKEN)
    )
    assert cfg.api_listen == ("127.0.0.1", 8080) and cfg.api_token == TOKEN
    assert not _api_warnings(cfg)
    assert TOKEN not in repr(cfg)
    assert load_router_config(router_file(tmp_path, keys)).api_listen is None

    for bad, field in [
        ({"api_listen": "8080", "api_token": TOKEN}, "api_listen"),
        ({"api_listen": "example.org:8080", "api_token": TOKEN}, "api_listen"),
        ({"api_listen": "127.0.0.1:8080", "api_token": ""}, "api_token"),
        ({"api_listen": "127.0.0.1:8080", "api_token": "with space " + TOKEN}, "api_token"),
        ({"api_listen": "127.0.0.1:8080", "api_token": 12345}, "api_token"),
        (
            {"api_listen": "127.0.0.1:8080", "api_token": TOKEN, "api_token_file": "f"},
            "api_token",
        ),
        ({"api_listen": "127.0.0.1:8080", "api_token_file": "missing"}, "api_token_file"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_router_config(router_file(tmp_path, keys, **bad))
        assert err.value.field == field, bad


def test_config_api_token_file_and_warnings(tmp_path, keys):
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    path = router_file(tmp_path, keys, api_listen="[::1]:8080", api_token_file="api.token")
    cfg = load_router_config(path)
    assert cfg.api_token == TOKEN and cfg.api_listen == ("::1", 8080)
    assert not _api_warnings(cfg)
    access = load_api_access(path)
    assert (access.host, access.port, access.token) == ("::1", 8080, TOKEN)

    token_file.chmod(0o644)
    cfg = load_router_config(path)
    assert any(str(token_file) in w and "chmod 600" in w for w in cfg.warnings)

    token_file.write_text("\n")
    with pytest.raises(ConfigError) as err:
        load_router_config(path)
    assert err.value.field == "api_token_file" and "empty" in err.value.problem

    # a token inline makes the config file a secret too
    path = router_file(tmp_path, keys, api_listen="127.0.0.1:8080", api_token=TOKEN)
    path.chmod(0o644)
    assert any(str(path) in w and "chmod 600" in w for w in load_router_config(path).warnings)

    cfg = load_router_config(
        router_file(tmp_path, keys, api_listen="198.18.0.1:8080", api_token="short")
    )
    warnings = _api_warnings(cfg)
    assert any("not a loopback address" in w and "SSH tunnel" in w for w in warnings)
    assert any("short" in w for w in warnings)

    with pytest.raises(ConfigError) as err:
        load_api_access(router_file(tmp_path, keys))
    assert err.value.field == "api_listen"


def test_router_logs_where_the_api_listens_never_the_token(tmp_path, keys, caplog):
    cfg = dataclasses.replace(api_config(keys), log_level="debug")

    async def scenario():
        router, ops = await started_ops(cfg)
        try:
            await get(ops.api.port, "/api/v1/status")
            await get(ops.api.port, "/api/v1/status", token="wrong")
            await get(ops.api.port, "/api/v1/reload", method="POST")
            return ops.api.port
        finally:
            await router.stop()

    with caplog.at_level("DEBUG"):
        port = run(scenario())
    assert f'msg="api listening" address=127.0.0.1 port={port}' in caplog.text
    assert TOKEN not in caplog.text


# -- polevpn-ctl


def test_ctl_formatting():
    assert ctl.human_bytes(0) == "0 B"
    assert ctl.human_bytes(1536) == "1.5 KiB"
    assert ctl.human_bytes(5 * 1024**3) == "5.0 GiB"
    assert ctl.human_count(999) == "999" and ctl.human_count(12345) == "12.3k"
    assert ctl.human_duration(0.25) == "0.2s"
    assert ctl.human_duration(75) == "1m15s"
    assert ctl.human_duration(2 * 86400 + 3 * 3600) == "2d03h"
    assert ctl._url_for("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert ctl._url_for("::", 8080) == "http://[::1]:8080"
    assert ctl._url_for("::1", 1) == "http://[::1]:1"
    listeners = [
        {"transport": t, "address": a, "port": p}
        for t, a, p in [("tls", "::", 443), ("kcp", "0.0.0.0", 443), ("tls", "2001:db8::1", 8443)]
    ]
    assert [ctl._endpoint(x) for x in listeners] == [
        "tls://[::]:443",
        "kcp://0.0.0.0:443",
        "tls://[2001:db8::1]:8443",
    ]


def _view(gateway: str, transport: str, peer: str, n: int, **extra) -> dict:
    """A gateway (or link) view as the API gives it, with ``n`` packets and 1000n bytes."""
    return {
        "gateway": gateway,
        "transport": transport,
        "peer": peer,
        "networks": [LAN_A],
        "uptime": 75.0,
        "rtt_ms": None,
        "packets_in": n,
        "packets_out": n,
        "bytes_in": 1000 * n,
        "bytes_out": 1000 * n,
        "links": [],
        **extra,
    }


def test_ctl_lists_each_link_under_its_gateway():
    v4 = _view(A, "tls", "198.19.0.2:41234", 30, name="v4", up=True, backup=False, weight=1)
    v4.update(rtt_ms=12.4, loss=0.000508)
    v6 = _view(A, "kcp", "[2001:db8:ff01::2]:50111", 12, name="v6", up=False, backup=True)
    v6.update(weight=2.5, loss=None)
    site = _view(A, "mixed", "198.19.0.2:41234, [2001:db8:ff01::2]:50111", 42, links=[v4, v6])
    plain = _view(B, "tls", "198.19.0.6:5000", 7, rtt_ms=3.0)
    lines = ctl.format_gateways([site, plain]).splitlines()
    assert " ".join(lines[0].split()) == (
        "GATEWAY TRANSPORT PEER NETWORKS UPTIME RTT LOSS PKTS IN PKTS OUT BYTES IN BYTES OUT"
    )
    # the site's row counts its links up; each link's row follows it, indented
    words = [" ".join(line.split()) for line in lines]
    assert words[1] == f"{A} mixed 1/2 links up {LAN_A} 1m15s - - 42 42 41.0 KiB 41.0 KiB"
    assert lines[2].startswith("  v4 up ")
    assert words[2] == "v4 up tls 198.19.0.2:41234 1m15s 12.4 ms 0.05% 30 30 29.3 KiB 29.3 KiB"
    assert lines[3].startswith("  v6 DOWN backup weight 2.5 ")
    assert words[3] == (
        "v6 DOWN backup weight 2.5 kcp [2001:db8:ff01::2]:50111 1m15s - - 12 12 11.7 KiB 11.7 KiB"
    )
    # a plain gateway has no link rows, and its peer as before
    assert lines[4].split()[:3] == [B, "tls", "198.19.0.6:5000"] and len(lines) == 5
    # the table's columns line up: every row's BYTES OUT ends where the header does
    assert len({len(line) for line in lines}) == 1
    assert ctl._loss(0) == "0%" and ctl._loss(0.00001) == "<0.01%" and ctl._loss(0.25) == "25.0%"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_have_scripts = t.console_script("polevpn-router") and t.console_script("polevpn-ctl")


async def _ctl(*args: str) -> tuple[int, str, str]:
    exe = t.console_script("polevpn-ctl")
    assert exe is not None
    # away from the repository's own config.json, and without a token in the environment
    env = {k: v for k, v in os.environ.items() if k != "POLEVPN_API_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        exe, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.skipif(not _have_scripts, reason="console scripts not installed (run 'make venv')")
def test_ctl_against_a_router_process(keys, tmp_path, monkeypatch):
    monkeypatch.setitem(loopback._transport, "mode", "tls")
    tls_port, api_port = _free_port(), _free_port()
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    config = tmp_path / "router.json"
    config.write_text(
        json.dumps(
            {
                "tls": {
                    "listen": f"127.0.0.1:{tls_port}",
                    "cert_file": str(keys.server_cert),
                    "key_file": str(keys.server_key),
                },
                "key": loopback.KEY,
                "api_listen": f"127.0.0.1:{api_port}",
                "api_token_file": str(token_file),
            }
        )
    )
    config.chmod(0o600)
    log_path = tmp_path / "router.log"
    exe = t.console_script("polevpn-router")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [exe, f"-configPath={config}"], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        # up once the API answers (it starts after the listeners)
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", api_port)):
                break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)

        async def scenario():
            shim = SimpleNamespace(tls_port=tls_port)
            ga = await ProtoGateway.connect(shim)
            gb = await ProtoGateway.connect(shim)
            await ga.login(A, [LAN_A])
            await gb.login(B, [LAN_B])
            pkts = [ipv4_packet("198.18.10.5", "198.18.20.9", b"z" * 1000) for _ in range(3)]
            await ga.send(b"".join(frame(3, p) for p in pkts))
            await receive_packets(gb, 3)
            await ga.send(frame(3, ipv4_packet("198.18.10.5", "198.18.99.1")))
            # C: a multi-link gateway, v4 kept alive, its backup v6 silent (so soon down)
            c4 = await ProtoGateway.connect(shim)
            c6 = await ProtoGateway.connect(shim)
            await login_link(c4, C, [LAN_C], "v4")
            keep = Keepalive(c4)
            await login_link(c6, C, [LAN_C], "v6", backup=True)

            async def v6_down():
                _, _, body = await get(api_port, f"/api/v1/gateways/{C}")
                return not next(x for x in body["links"] if x["name"] == "v6")["up"]

            try:
                await wait_until(v6_down, "C's silent link down")
                rc, out, err = await _ctl(f"-configPath={config}", "status")
                assert rc == 0, err
                assert "polevpn router" in out and f"127.0.0.1:{tls_port}" in out
                assert re.search(r"links: [0-1]/2 up", out), out
                lines = out.splitlines()
                row_a = next(ln for ln in lines if ln.startswith(A))
                row_b = next(ln for ln in lines if ln.startswith(B))
                assert LAN_A in row_a and "tls" in row_a and LAN_B in row_b
                # B received 3 packets of 1020 bytes
                assert "3.0 KiB" in row_b
                assert "drops: no_route=1" in out

                rc, out, err = await _ctl(f"-configPath={config}", "routes")
                assert rc == 0, err
                assert [ln.split()[:2] for ln in out.splitlines()[1:]] == [
                    [f"{A}/32", A],
                    [f"{B}/32", B],
                    [f"{C}/32", C],
                    [LAN_A, A],
                    [LAN_B, B],
                    [LAN_C, C],
                ]

                # C's row, then one indented row per link, by name
                rc, out, err = await _ctl(f"-configPath={config}", "gateways")
                assert rc == 0, err
                lines = out.splitlines()
                at = next(i for i, ln in enumerate(lines) if ln.startswith(C))
                assert LAN_C in lines[at] and "/2 links up" in lines[at]
                row_v4, row_v6 = lines[at + 1 : at + 3]
                assert re.match(r"  v4 (up|DOWN) +tls ", row_v4), row_v4
                assert "backup" not in row_v4
                assert row_v6.startswith("  v6 DOWN backup "), row_v6
                port_v6 = c6.writer.get_extra_info("sockname")[1]
                assert f":{port_v6} " in row_v6
                assert len(lines) == at + 3

                rc, out, err = await _ctl(f"-configPath={config}", "gateways", "--json")
                assert rc == 0, err
                gateways = json.loads(out)["gateways"]
                assert [g["gateway"] for g in gateways] == [A, B, C]
                assert [x["name"] for x in gateways[2]["links"]] == ["v4", "v6"]
                rc, out, err = await _ctl(
                    "--url",
                    f"http://127.0.0.1:{api_port}",
                    "--token-file",
                    str(token_file),
                    "status",
                    "--json",
                )
                assert rc == 0, err
                assert json.loads(out)["status"]["gateways"] == 3

                # errors: one line on stderr, and the exit status says which kind
                wrong = tmp_path / "wrong.token"
                wrong.write_text("nope")
                rc, out, err = await _ctl(
                    f"-configPath={config}", "--token-file", str(wrong), "status"
                )
                assert rc == 1 and "401" in err and len(err.splitlines()) == 1 and not out
                rc, _, err = await _ctl("--url", f"http://127.0.0.1:{_free_port()}", "status")
                assert rc == 2  # no token: the default config.json is not there
                rc, _, err = await _ctl(
                    "--url",
                    f"http://127.0.0.1:{_free_port()}",
                    "--token-file",
                    str(wrong),
                    "routes",
                )
                assert rc == 1 and "cannot reach" in err and len(err.splitlines()) == 1
                rc, _, err = await _ctl(f"-configPath={tmp_path / 'none.json'}", "status")
                assert rc == 2 and "none.json" in err
                rc, _, err = await _ctl(f"-configPath={config}", "bogus")
                assert rc == 2
            finally:
                await keep.stop()
                for gw in (ga, gb, c4, c6):
                    gw.close()

        run(scenario())
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert TOKEN not in log_path.read_text()


def test_ctl_formats_direct_paths():
    reply = {
        "enabled": True,
        "pairs": [
            {
                "pair_id": "00112233445566778899aabbccddeeff",
                "gateways": ["169.254.0.1", "169.254.0.2"],
                "created": "2026-01-01T00:00:00.000Z",
                "expires": "2026-01-01T01:00:00.000Z",
                "state": "punching",
                "sides": [
                    {"gateway": "169.254.0.1", "state": "direct", "cause": "none",
                     "rtt_ms": 4.2, "bytes_sent": 2048, "bytes_received": 0, "refused": 3,
                     "endpoint": "198.18.0.2:40000", "reported": None},
                    {"gateway": "169.254.0.2", "state": "punching", "cause": "unreported",
                     "rtt_ms": None, "bytes_sent": 0, "bytes_received": 0, "refused": 0,
                     "endpoint": None, "reported": None},
                ],
            }
        ],
        "endpoints": [
            {"gateway": "169.254.0.1", "public": "198.19.0.7:61000", "host": ["198.18.0.1:4"]},
            {"gateway": "169.254.0.2", "public": None, "host": []},
        ],
        "counters": {},
    }  # fmt: skip
    text = ctl.format_direct(reply)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["PAIR", "GATEWAY", "STATE", "CAUSE"]
    assert lines[1].split()[:6] == ["00112233", "169.254.0.1", "direct", "none", "4.2", "ms"]
    assert "198.18.0.2:40000" in lines[1] and lines[1].rstrip().endswith("3")
    assert lines[2].split()[:3] == ["169.254.0.2", "punching", "unreported"]
    assert "198.19.0.7:61000" in text and "198.18.0.1:4" in text
    assert ctl.format_direct({"enabled": False, "pairs": [], "endpoints": []}) == (
        "direct paths off"
    )
    empty = ctl.format_direct({"enabled": True, "pairs": [], "endpoints": []})
    assert empty == "no direct pairs\n\nno gateway with direct paths"

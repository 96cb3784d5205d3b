"""Prometheus metrics: what the router and gateway report, and the small HTTP server.

The loopback tests run a real router in-process with protocol-level gateways (as in
test_router_loopback) and scrape ``/metrics`` over HTTP; the counters are checked against
what the test itself sent, not against the router's own fields. The netns test runs the
real daemons.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_router_loopback as loopback
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from test_router_loopback import (
    ProtoGateway,
    frame,
    ipv4_packet,
    router_config,
    run,
    started_ops,
)

from polevpn.config import (
    ConfigError,
    FecParams,
    KcpParams,
    load_gateway_config,
    load_router_config,
)
from polevpn.gateway import view as gateway_view
from polevpn.gateway.gateway import Gateway
from polevpn.kcp.fec import FecStats
from polevpn.keygen import generate
from polevpn.ops import metrics
from polevpn.router.limits import ClientLimits

A, B = "169.254.0.1", "169.254.0.2"
LAN_A, LAN_B = "198.18.10.0/24", "198.18.20.0/24"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("keys"))


@pytest.fixture(autouse=True)
def _fresh_pages(monkeypatch):
    """Scrapes here follow traffic within a second: no cached page, except where a test
    checks the cache itself (test_scrapes_within_a_second_share_one_rendering)."""
    monkeypatch.setattr(metrics, "CACHE_SECONDS", 0.0)


async def http(port: int, request: bytes, host: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """One request; (status, headers, body) of the reply read to EOF."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, {k.lower(): v for k, v in headers.items()}, body


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


async def scrape(port: int) -> Samples:
    status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    assert int(headers["content-length"]) == len(body)
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def matching(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def receive_packets(gw: ProtoGateway, n: int) -> list[bytes]:
    got = []
    for _ in range(n):
        cmd, _, body = await gw.recv_frame(timeout=5)
        assert cmd == 2
        got.append(body)
    return got


@pytest.mark.parametrize("transport", ["tls", "kcp"])
def test_router_metrics_count_what_the_gateways_sent(keys, transport, monkeypatch):
    # ProtoGateway.connect's transport, put back afterwards for the modules that share it
    monkeypatch.setitem(loopback._transport, "mode", transport)
    n_ab, n_ba = 23, 7
    # fixed FEC on the router's side: its parity is a known number even towards a peer
    # that never takes FEC up
    cfg = router_config(
        keys,
        metrics_listen=("127.0.0.1", 0),
        kcp_params=KcpParams(fec=FecParams(mode="fixed", data_shards=4, parity_shards=2)),
    )

    async def scenario():
        router, ops = await started_ops(cfg)
        assert ops.metrics is not None
        port = ops.metrics.port
        try:
            ga = await ProtoGateway.connect(router)
            gb = await ProtoGateway.connect(router)
            await ga.login(A, [LAN_A])
            await gb.login(B, [LAN_B])

            # sizes differ per packet so bytes cannot come out right by accident
            ab = [ipv4_packet("198.18.10.5", "198.18.20.9", b"a" * (10 + i)) for i in range(n_ab)]
            ba = [ipv4_packet("198.18.20.9", "198.18.10.5", b"b" * (50 + i)) for i in range(n_ba)]
            await ga.send(b"".join(frame(3, p) for p in ab))
            await gb.send(b"".join(frame(3, p) for p in ba))
            assert await receive_packets(gb, n_ab) == ab
            assert await receive_packets(ga, n_ba) == ba

            before = await scrape(port)
            gw_a = {"gateway": A, "transport": transport}
            gw_b = {"gateway": B, "transport": transport}
            p = "polevpn_router_"
            bytes_ab = sum(len(x) for x in ab)
            bytes_ba = sum(len(x) for x in ba)
            assert value(before, f"{p}gateway_received_packets_total", **gw_a) == n_ab
            assert value(before, f"{p}gateway_received_bytes_total", **gw_a) == bytes_ab
            assert value(before, f"{p}gateway_sent_packets_total", **gw_b) == n_ab
            assert value(before, f"{p}gateway_sent_bytes_total", **gw_b) == bytes_ab
            assert value(before, f"{p}gateway_received_packets_total", **gw_b) == n_ba
            assert value(before, f"{p}gateway_sent_bytes_total", **gw_a) == bytes_ba
            assert sum(matching(before, f"{p}connections").values()) == 2
            assert value(before, f"{p}connections", transport=transport) == 2
            assert value(before, f"{p}registered_gateways") == 2
            assert value(before, f"{p}registrations_total") == 2
            assert value(before, f"{p}forwarded_packets_total") == n_ab + n_ba
            assert value(before, f"{p}dropped_packets_total", reason="no_route") == 0
            assert value(before, f"{p}dropped_packets_total", reason="spoofed") == 0
            if transport == "kcp":
                for gw in (gw_a, gw_b):
                    assert value(before, f"{p}gateway_fec_parity_shards", **gw) == 2
                    # loopback: a resend only when the loaded machine delays an ACK past the RTO
                    assert 0 <= value(before, f"{p}gateway_kcp_retransmissions_total", **gw) < 50
                    assert value(before, f"{p}gateway_fec_recovered_total", **gw) == 0
                    assert 0 <= value(before, f"{p}gateway_kcp_srtt_seconds", **gw) < 1.0
                assert value(before, f"{p}kcp_sessions") == 2
                assert value(before, f"{p}kcp_handshakes_total") == 2
            else:
                assert not matching(before, f"{p}gateway_fec_parity_shards")

            # 3 to nowhere, 2 from a source A did not register; then one good packet, whose
            # arrival at B shows the router has handled everything sent before it
            await ga.send(
                b"".join(frame(3, ipv4_packet("198.18.10.5", "198.18.99.1")) for _ in range(3))
                + b"".join(frame(3, ipv4_packet("198.18.30.1", "198.18.20.9")) for _ in range(2))
                + frame(3, ab[0])
            )
            assert await receive_packets(gb, 1) == [ab[0]]
            after = await scrape(port)
            assert value(after, f"{p}dropped_packets_total", reason="no_route") == 3
            assert value(after, f"{p}dropped_packets_total", reason="spoofed") == 2
            assert value(after, f"{p}dropped_packets_total", reason="queue_full") == 0
            assert value(after, f"{p}gateway_received_packets_total", **gw_a) == n_ab + 6
            assert value(after, f"{p}gateway_sent_packets_total", **gw_b) == n_ab + 1

            # a wrong key on a third connection shows up as an auth failure, and a closed
            # gateway leaves the per-gateway series and the connection count
            bad = await ProtoGateway.connect(router)
            await bad.send(frame(0, b'{"key":"wrong"}'))
            assert await bad.closed_by_peer()
            gb.close()
            deadline = time.monotonic() + 10
            while True:
                last = await scrape(port)
                if sum(matching(last, f"{p}connections").values()) == 1:
                    break
                assert time.monotonic() < deadline, matching(last, f"{p}connections")
                await asyncio.sleep(0.05)
            assert value(last, f"{p}auth_failures_total") == 1
            assert value(last, f"{p}connections_closed_total") == 2
            assert (f"{p}gateway_sent_packets_total", tuple(sorted(gw_b.items()))) not in last
            assert value(last, f"{p}registered_gateways") == 1
            ga.close()
        finally:
            await router.stop()
        # the port is closed with the router
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(scenario())


# -- multi-link gateways (helpers shared with test_api)

LINK_HEARTBEAT_MS, LINK_TIMEOUT_MS = 50, 300


async def login_link(
    gw: ProtoGateway,
    gateway: str,
    networks: list[str],
    name: str,
    weight: float = 1,
    backup: bool = False,
) -> None:
    """AUTH offering multi-link and REGISTER naming link ``name`` of ``gateway``, with a
    short timeout (LINK_TIMEOUT_MS) so that a silent link is down soon."""
    link = {
        "name": name,
        "weight": weight,
        "backup": backup,
        "heartbeat_ms": LINK_HEARTBEAT_MS,
        "timeout_ms": LINK_TIMEOUT_MS,
    }
    reply = await gw.login(gateway, networks, features=["multi-link"], link=link)
    assert "multi-link" in json.loads(reply)["features"], reply


class Keepalive:
    """Heartbeats on a link every LINK_HEARTBEAT_MS until stopped, so that it stays up."""

    def __init__(self, gw: ProtoGateway) -> None:
        self.gw = gw
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await self.gw.send(frame(4))
                await asyncio.sleep(LINK_HEARTBEAT_MS / 1000)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def recv_ip(gw: ProtoGateway, timeout: float = 5) -> bytes:
    """The next packet the router sent ``gw``, skipping the echoes of its heartbeats."""
    while True:
        cmd, _, body = await gw.recv_frame(timeout=timeout)
        if cmd != 4:
            assert cmd == 2, cmd
            return body


def flows_to(dst_lan_prefix: str, src_lan_prefix: str, n: int) -> list[bytes]:
    """``n`` packets of distinct flows (addresses vary), each a different size."""
    return [
        ipv4_packet(f"{src_lan_prefix}.{1 + i}", f"{dst_lan_prefix}.{1 + i}", b"f" * (20 + i))
        for i in range(n)
    ]


async def sent_to_site(port: int, gateway: str, n: int) -> Samples | None:
    """The scrape once the router has sent ``n`` packets to ``gateway``'s links in all."""
    m = await scrape(port)
    sent = matching(m, "polevpn_router_link_sent_packets_total")
    total = sum(v for labels, v in sent.items() if ("gateway", gateway) in labels)
    assert total <= n
    return m if total == n else None


async def wait_until(probe, what: str, timeout: float = 10.0):
    """Poll the coroutine function ``probe`` until it returns something true; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        got = await probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("transport", ["tls", "kcp"])
def test_router_metrics_per_link_of_a_multi_link_gateway(keys, transport, monkeypatch):
    monkeypatch.setitem(loopback._transport, "mode", transport)
    p = "polevpn_router_"

    async def scenario():
        router, ops = await started_ops(router_config(keys, metrics_listen=("127.0.0.1", 0)))
        port = ops.metrics.port
        alive: list[Keepalive] = []
        gws: list[ProtoGateway] = []
        try:
            gb, v4, v6 = [await ProtoGateway.connect(router) for _ in range(3)]
            gws += [gb, v4, v6]
            await gb.login(B, [LAN_B])
            await login_link(v4, A, [LAN_A], "v4")
            alive.append(Keepalive(v4))
            await login_link(v6, A, [LAN_A], "v6", weight=2, backup=True)
            alive.append(Keepalive(v6))

            # B -> the site (on v4 while it is up, v6 being a backup; either way each link's
            # counters are checked against what it received)
            to_a = flows_to("198.18.10", "198.18.20", 12)
            await gb.send(b"".join(frame(3, x) for x in to_a))
            m = await wait_until(lambda: sent_to_site(port, A, len(to_a)), "packets to A")
            got_v4 = [
                await recv_ip(v4)
                for _ in range(int(value(m, f"{p}link_sent_packets_total", gateway=A, link="v4")))
            ]
            got_v6 = [
                await recv_ip(v6)
                for _ in range(int(value(m, f"{p}link_sent_packets_total", gateway=A, link="v6")))
            ]
            assert sorted(got_v4 + got_v6) == sorted(to_a)
            # each link -> B
            from_v4 = flows_to("198.18.20", "198.18.10", 5)
            from_v6 = flows_to("198.18.20", "198.18.10", 3)
            await v4.send(b"".join(frame(3, x) for x in from_v4))
            await v6.send(b"".join(frame(3, x) for x in from_v6))
            got = [await recv_ip(gb) for _ in range(8)]
            assert sorted(got) == sorted(from_v4 + from_v6)

            m = await scrape(port)
            v4l, v6l = {"gateway": A, "link": "v4"}, {"gateway": A, "link": "v6"}
            assert value(m, f"{p}registered_gateways") == 2
            assert value(m, f"{p}links", state="up") == 2
            assert value(m, f"{p}links", state="down") == 0
            assert value(m, f"{p}link_info", transport=transport, role="primary", **v4l) == 1
            assert value(m, f"{p}link_info", transport=transport, role="backup", **v6l) == 1
            assert value(m, f"{p}link_weight", **v6l) == 2
            assert value(m, f"{p}link_sent_bytes_total", **v4l) == sum(map(len, got_v4))
            assert value(m, f"{p}link_sent_bytes_total", **v6l) == sum(map(len, got_v6))
            assert value(m, f"{p}link_received_packets_total", **v4l) == 5
            assert value(m, f"{p}link_received_bytes_total", **v6l) == sum(map(len, from_v6))
            # the gateway's own series: the sums over its links
            gw_a = {"gateway": A, "transport": transport}
            assert value(m, f"{p}gateway_received_packets_total", **gw_a) == 8
            assert value(m, f"{p}gateway_received_bytes_total", **gw_a) == sum(
                map(len, from_v4 + from_v6)
            )
            assert value(m, f"{p}gateway_sent_packets_total", **gw_a) == len(to_a)
            for link in (v4l, v6l):
                assert 0 <= value(m, f"{p}link_rtt_seconds", **link) < 1.0
                resent = value(m, f"{p}link_retransmissions_total", **link)
                sent = value(m, f"{p}link_sent_segments_total", **link)
                # at least the AUTH and REGISTER replies went out on each
                assert sent >= 2 and 0 <= resent <= sent
                assert value(m, f"{p}link_loss_ratio", **link) == pytest.approx(resent / sent)
            # the per-gateway KCP series stay with plain gateways; a link has its own
            assert not [
                k for k in matching(m, f"{p}gateway_kcp_srtt_seconds") if ("gateway", A) in k
            ]
            if transport == "kcp":
                assert 0 <= value(m, f"{p}link_kcp_srtt_seconds", **v6l) < 1.0
            else:
                assert not matching(m, f"{p}link_kcp_srtt_seconds")

            # v6 falls silent: it is down within its timeout (checked every 0.1 s)
            await alive[1].stop()

            async def v6_down():
                m = await scrape(port)
                return m if value(m, f"{p}link_up", **v6l) == 0 else None

            m = await wait_until(v6_down, "link v6 down")
            assert value(m, f"{p}link_downs_total", **v6l) >= 1
            assert value(m, f"{p}links_down_total") >= 1
            assert value(m, f"{p}links", state="down") >= 1

            # and up again as soon as it is heard from
            await v6.send(frame(4))

            async def v6_up():
                m = await scrape(port)
                return m if value(m, f"{p}link_up", **v6l) == 1 else None

            await wait_until(v6_up, "link v6 up again")

            # both silent: packets to the site are dropped for it
            await alive[0].stop()

            async def both_down():
                m = await scrape(port)
                return m if value(m, f"{p}links", state="down") == 2 else None

            await wait_until(both_down, "both links down")
            await gb.send(frame(3, to_a[0]))

            async def dropped():
                m = await scrape(port)
                n = value(m, f"{p}dropped_packets_total", reason="links_down")
                return m if n >= 1 else None

            m = await wait_until(dropped, "a links_down drop")
            assert value(m, f"{p}dropped_packets_total", reason="links_down") == 1

            # the site leaves with its last link, and its series with it
            v4.close()
            v6.close()

            async def gone():
                m = await scrape(port)
                return m if value(m, f"{p}registered_gateways") == 1 else None

            m = await wait_until(gone, "the site gone")
            assert not matching(m, f"{p}link_up")
            assert value(m, f"{p}links", state="up") + value(m, f"{p}links", state="down") == 0
        finally:
            for k in alive:
                await k.stop()
            for gw in gws:
                gw.close()
            await router.stop()

    run(scenario())


def test_router_metrics_and_api_off_by_default(keys):
    async def scenario():
        router, ops = await started_ops(router_config(keys))
        try:
            assert ops.metrics is None and ops.api is None
        finally:
            await router.stop()

    run(scenario())


# -- the HTTP server


def test_http_other_paths_methods_and_garbage(keys):
    async def scenario():
        router, ops = await started_ops(router_config(keys, metrics_listen=("127.0.0.1", 0)))
        port = ops.metrics.port
        try:
            status, _, _ = await http(port, b"GET / HTTP/1.1\r\n\r\n")
            assert status == 404
            status, _, _ = await http(port, b"GET /metricsx HTTP/1.0\r\n\r\n")
            assert status == 404
            status, _, _ = await http(port, b"POST /metrics HTTP/1.1\r\n\r\n")
            assert status == 405
            status, _, _ = await http(port, b"\x16\x03\x01garbage\r\n\r\n")
            assert status == 400
            # a query string is fine, and HEAD gets the headers only
            status, _, body = await http(port, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n")
            assert status == 200 and b"polevpn_router_connections" in body
            status, headers, body = await http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        finally:
            await router.stop()

    run(scenario())


def test_http_oversized_and_slow_requests_are_cut_off(keys, monkeypatch):
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.5)
    monkeypatch.setattr(metrics, "HEADER_TIMEOUT", 0.5)

    async def scenario():
        router, ops = await started_ops(router_config(keys, metrics_listen=("127.0.0.1", 0)))
        port = ops.metrics.port
        try:
            big = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"p" * (2 * metrics.MAX_REQUEST)
            status, _, _ = await http(port, big)
            assert status == 431

            # a client that sends half a request line and then nothing is closed unanswered
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /met")
            t0 = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert time.monotonic() - t0 < 8
            writer.close()

            # issue 20 finding 10: 16 idle connections blocked every scrape (and 64, the
            # limit now, would have too); a loopback client takes the slot of the oldest
            # idle one, and the idle ones are closed after HEADER_TIMEOUT
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(70)]
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            assert (await scrape(port))[("polevpn_router_registered_gateways", ())] == 0
            assert time.monotonic() - t0 < 0.4  # not after the idle ones timed out
            for r, w in held:
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(r.read(), 10) == b""
                w.close()
            assert time.monotonic() - t0 < 3
        finally:
            await router.stop()

    run(scenario())


def _registry() -> tuple[CollectorRegistry, list[int]]:
    """A registry whose collector counts how often it is rendered."""
    calls = [0]

    class Counting:
        def collect(self):
            calls[0] += 1
            yield GaugeMetricFamily("polevpn_test_renderings", "renderings", value=calls[0])

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Counting())
    return reg, calls


async def _idle(host: str, port: int, n: int) -> list:
    out = []
    for _ in range(n):
        out.append(await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0)))
    await asyncio.sleep(0.05)
    return out


async def _refused(conn) -> bool:
    """The server closed ``conn`` at once, unanswered."""
    reader, writer = conn
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 1) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


def test_http_clients_limited_per_client_with_a_reserve_for_the_operator(monkeypatch):
    """Remote clients (here: 127.0.0.3-6, with only 127.0.0.2 trusted) get ``per_client``
    connections each and together at most ``max_clients - reserved``; the trusted client
    still scrapes, and when every slot is taken it takes an idle remote one's."""
    limits = ClientLimits(max_clients=6, per_client=2, reserved=2)

    async def scenario():
        reg, _ = _registry()
        server = metrics.MetricsServer(
            reg, limits=limits, trusted=lambda h: h == "127.0.0.2", header_timeout=5
        )
        await server.start("127.0.0.1", 0)
        port = server.port
        try:
            a = await _idle("127.0.0.3", port, 2)
            assert await _refused((await _idle("127.0.0.3", port, 1))[0])  # per client
            b = await _idle("127.0.0.4", port, 2)
            assert await _refused((await _idle("127.0.0.5", port, 1))[0])  # the reserve
            assert server.slots.untrusted == 4 and server.slots.refused == 2
            # the operator: two slots of the reserve, then an idle remote client's
            ops = await _idle("127.0.0.2", port, 2)
            (reader, writer), = await _idle("127.0.0.2", port, 1)
            writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
            reply = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert reply.startswith(b"HTTP/1.1 200 ") and b"polevpn_test_renderings" in reply
            assert server.slots.evicted == 1
            # the oldest idle remote connection was the one closed
            assert await asyncio.wait_for(a[0][0].read(), 1) == b""
            for _, w in a + b + ops:
                w.close()
        finally:
            server.close()

    run(scenario())


def test_scrapes_within_a_second_share_one_rendering(monkeypatch):
    monkeypatch.setattr(metrics, "CACHE_SECONDS", 1.0)

    async def scenario():
        reg, calls = _registry()
        server = metrics.MetricsServer(reg)
        await server.start("127.0.0.1", 0)
        try:
            t0 = time.monotonic()
            bodies = set()
            for _ in range(20):
                status, _, body = await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
                assert status == 200
                bodies.add(body)
            if time.monotonic() - t0 < 0.9:
                assert calls[0] == 1 and len(bodies) == 1
            await asyncio.sleep(1.05)
            await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert calls[0] == server.renderings >= 2
        finally:
            server.close()

    run(scenario())


def test_metrics_bearer_token_when_configured(tmp_path, keys):
    token = "m" * 32
    cfg = load_router_config(
        router_file(
            tmp_path,
            keys,
            metrics_listen="127.0.0.1:0",
            metrics_token=token,
            tls={
                "listen": "127.0.0.1:0",
                "cert_file": str(keys.server_cert),
                "key_file": str(keys.server_key),
            },
        )
    )
    assert cfg.metrics_token == token and token not in repr(cfg)

    async def scenario():
        router, ops = await started_ops(cfg)
        port = ops.metrics.port
        try:
            wrong = ("", "Authorization: Bearer x\r\n", f"Authorization: Basic {token}\r\n")
            for auth in wrong:
                req = f"GET /metrics HTTP/1.1\r\n{auth}\r\n".encode()
                status, headers, _ = await http(port, req)
                assert status == 401 and headers["www-authenticate"] == "Bearer", auth
            req = f"GET /metrics HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            status, _, body = await http(port, req)
            assert status == 200 and b"polevpn_router_registered_gateways" in body
        finally:
            await router.stop()

    run(scenario())


# -- the gateway's collector, fed a gateway's state without a network


@dataclasses.dataclass
class FakeSession:
    rtt: float | None = None


class FakeTransport:
    def __init__(self, kcp: object | None = None) -> None:
        self.kcp = kcp

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.kcp if name == "kcp_link" else default


@dataclasses.dataclass
class FakeKcp:
    """What the collector reads of a KcpLink."""

    srtt_ms: int | None
    retransmissions: int | None
    segments_sent: int | None = None
    fec_state: str = "off"
    fec: object | None = None
    cc: object | None = None  # congestion control off
    kcp: object | None = None
    hole_seconds: float = 0.0
    urgent_segments: int = 0
    urgent_copies: int = 0


@dataclasses.dataclass
class FakeRouterLink:
    """What the collector reads of a gateway's RouterLink: its counters, session and
    whether it registered and is still open."""

    server: object
    packets_out: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    bytes_in: int = 0
    rtt: float | None = None
    kcp: FakeKcp | None = None
    open: bool = True

    def __post_init__(self) -> None:
        self.session = FakeSession(self.rtt)
        self.transport = FakeTransport(self.kcp)
        self.registered: concurrent.futures.Future = concurrent.futures.Future()
        self.registered.set_result(None)
        self.closed: concurrent.futures.Future = concurrent.futures.Future()
        if not self.open:
            self.closed.set_result(None)


def _gateway_scrape(gw: Gateway) -> Samples:
    registry = metrics.gateway_registry(lambda: gateway_view.snapshot(gw))
    return parse(generate_latest(registry).decode())


def _ml_gateway(tmp_path: Path) -> Gateway:
    links = [
        {"name": "v4", "route_server": "tls://198.19.0.1:443", "interface": "wan0"},
        {"name": "v6", "route_server": "kcp://[2001:db8:ff01::1]:443", "weight": 2.5},
        {"name": "spare", "route_server": "tls://198.19.0.9:443", "backup": True},
    ]
    path = _gateway_file(tmp_path, links=links)
    obj = json.loads(path.read_text())
    del obj["route_server"]
    path.write_text(json.dumps(obj))
    return Gateway(load_gateway_config(path))


def test_gateway_metrics_per_link_of_a_multi_link_gateway(tmp_path):
    gw = _ml_gateway(tmp_path)
    g = "polevpn_gateway_"
    v4, v6, spare = (gw.uplinks[n] for n in ("v4", "v6", "spare"))

    # nothing connected yet: every configured link is listed, down, with zero counters
    m = _gateway_scrape(gw)
    assert value(m, f"{g}connected") == 0
    assert value(m, f"{g}links", state="down") == 3
    assert value(m, f"{g}links", state="up") == 0
    for u in (v4, v6, spare):
        assert value(m, f"{g}link_up", link=u.name) == 0
        assert value(m, f"{g}link_sent_bytes_total", link=u.name) == 0
    assert not matching(m, f"{g}link_heartbeat_rtt_seconds")
    info = matching(m, f"{g}link_info")
    assert info == {
        (
            ("link", "v4"),
            ("role", "primary"),
            ("route_server", "tls://198.19.0.1:443"),
            ("transport", "tls"),
        ): 1,
        (
            ("link", "v6"),
            ("role", "primary"),
            ("route_server", "kcp://[2001:db8:ff01::1]:443"),
            ("transport", "kcp"),
        ): 1,
        (
            ("link", "spare"),
            ("role", "backup"),
            ("route_server", "tls://198.19.0.9:443"),
            ("transport", "tls"),
        ): 1,
    }
    assert value(m, f"{g}link_weight", link="v6") == 2.5
    assert value(m, f"{g}link_weight", link="v4") == 1

    # v4 up on its second connection, whose first carried traffic; v6 up on kcp; the
    # backup connected but silent (down), its first connection's RTT not reported
    v4.link = FakeRouterLink(v4.config.server, 10, 1000, 20, 3000, rtt=0.012)  # type: ignore[assignment]
    v4._closed = [5, 500, 7, 700]
    v4.up, v4.downs, v4.connects = True, 1, 2
    fec = FecStats(recovered=3, unrecoverable=1, parity_sent=9, parity=2, loss_ppm=2500)
    kcp = FakeKcp(
        srtt_ms=31,
        retransmissions=4,
        segments_sent=96,
        fec_state="on",
        fec=SimpleNamespace(stats=fec),
    )
    v6.link = FakeRouterLink(v6.config.server, 1, 100, 2, 200, kcp=kcp)  # type: ignore[assignment]
    v6.up, v6.connects = True, 1
    spare.link = FakeRouterLink(spare.config.server, rtt=0.5, open=False)  # type: ignore[assignment]
    spare.downs, spare.connects = 4, 3
    gw.stats.dropped_link_busy = 6
    gw.stats.links_down = 5

    m = _gateway_scrape(gw)
    assert value(m, f"{g}connected") == 1
    assert value(m, f"{g}links", state="up") == 2
    assert value(m, f"{g}links", state="down") == 1
    assert value(m, f"{g}dropped_packets_total", reason="link_busy") == 6
    assert not matching(m, f"{g}dropped_link_busy_total")
    assert value(m, f"{g}links_down_total") == 5
    for name, up, downs, connects in (("v4", 1, 1, 2), ("v6", 1, 0, 1), ("spare", 0, 4, 3)):
        assert value(m, f"{g}link_up", link=name) == up
        assert value(m, f"{g}link_downs_total", link=name) == downs
        assert value(m, f"{g}link_connects_total", link=name) == connects
    # the closed connection's traffic counts with the open one's
    assert value(m, f"{g}link_sent_packets_total", link="v4") == 15
    assert value(m, f"{g}link_sent_bytes_total", link="v4") == 1500
    assert value(m, f"{g}link_received_packets_total", link="v4") == 27
    assert value(m, f"{g}link_received_bytes_total", link="v4") == 3700
    assert value(m, f"{g}link_received_bytes_total", link="v6") == 200
    assert matching(m, f"{g}link_heartbeat_rtt_seconds") == {(("link", "v4"),): 0.012}
    # KCP's figures for the kcp:// link only
    assert matching(m, f"{g}link_kcp_srtt_seconds") == {(("link", "v6"),): 0.031}
    assert value(m, f"{g}link_kcp_retransmissions_total", link="v6") == 4
    # 4 resends among 96 + 4 segments sent; v4's fake transport has no TCP socket to read
    assert matching(m, f"{g}link_loss_ratio") == {(("link", "v6"),): 0.04}
    assert value(m, f"{g}link_fec_recovered_total", link="v6") == 3
    assert value(m, f"{g}link_fec_unrecoverable_total", link="v6") == 1
    assert value(m, f"{g}link_fec_parity_sent_total", link="v6") == 9
    assert value(m, f"{g}link_fec_parity_shards", link="v6") == 2
    assert value(m, f"{g}link_fec_loss_ratio", link="v6") == 0.0025
    assert matching(m, f"{g}link_fec_state") == {(("link", "v6"), ("state", "on")): 1}
    # a multi-link gateway has no gateway-wide link figures: each link has its own
    for name in ("heartbeat_rtt_seconds", "kcp_srtt_seconds", "fec_state"):
        assert not matching(m, f"{g}{name}")

    # v4 reconnecting: between connections it keeps what it carried (monotonic counters)
    v4._closed, v4.link, v4.up = list(v4.totals()), None, False
    m = _gateway_scrape(gw)
    assert value(m, f"{g}link_sent_bytes_total", link="v4") == 1500
    assert value(m, f"{g}link_up", link="v4") == 0
    assert matching(m, f"{g}link_heartbeat_rtt_seconds") == {}


def test_gateway_metrics_of_a_plain_gateway_have_no_link_series(tmp_path):
    gw = Gateway(load_gateway_config(_gateway_file(tmp_path)))
    g = "polevpn_gateway_"
    assert gw.uplinks == {}
    m = _gateway_scrape(gw)
    assert value(m, f"{g}connected") == 0
    assert not matching(m, f"{g}link_info")
    gw.link = FakeRouterLink(gw.cfg.route_server, 3, 300, 4, 400, rtt=0.02)  # type: ignore[assignment]
    m = _gateway_scrape(gw)
    assert value(m, f"{g}connected") == 1
    # link and role are empty, which Prometheus reads as absent: the series it always had
    info = matching(m, f"{g}link_info")
    assert info == {
        (
            ("link", ""),
            ("role", ""),
            ("route_server", "tls://198.19.0.1:443"),
            ("transport", "tls"),
        ): 1
    }
    assert value(m, f"{g}heartbeat_rtt_seconds") == 0.02
    assert not [name for name, _ in m if name.startswith(f"{g}link_") and name != f"{g}link_info"]
    assert not matching(m, f"{g}links")


# -- configuration


def router_file(tmp_path: Path, keys, **extra) -> Path:
    """A minimal router config file (tls on 127.0.0.1:443, shared key) plus ``extra``."""
    obj = {
        "tls": {
            "listen": "127.0.0.1:443",
            "cert_file": str(keys.server_cert),
            "key_file": str(keys.server_key),
        },
        "key": "123456",
        **extra,
    }
    path = tmp_path / "router.json"
    path.write_text(json.dumps(obj))
    path.chmod(0o600)
    return path


def _gateway_file(tmp_path: Path, **extra) -> Path:
    obj = {
        "route_server": "tls://198.19.0.1:443",
        "key": "123456",
        "gateway": A,
        "acls": [LAN_B],
        "insecure_skip_verify": True,
        **extra,
    }
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(obj))
    path.chmod(0o600)
    return path


def _metrics_warnings(warnings: tuple[str, ...]) -> list[str]:
    return [w for w in warnings if "metrics_listen" in w]


@pytest.mark.parametrize(
    "text,expected,warned",
    [
        ("127.0.0.1:9400", ("127.0.0.1", 9400), False),
        ("[::1]:9400", ("::1", 9400), False),
        ("localhost:0", ("localhost", 0), False),
        ("198.18.0.1:9400", ("198.18.0.1", 9400), True),
        ("0.0.0.0:9400", ("0.0.0.0", 9400), True),
        ("[2001:db8::1]:9400", ("2001:db8::1", 9400), True),
    ],
)
def test_config_metrics_listen(tmp_path, keys, text, expected, warned):
    rc = load_router_config(router_file(tmp_path, keys, metrics_listen=text))
    gc = load_gateway_config(_gateway_file(tmp_path, metrics_listen=text))
    for cfg in (rc, gc):
        assert cfg.metrics_listen == expected
        assert bool(_metrics_warnings(cfg.warnings)) == warned


def test_config_metrics_listen_absent_and_invalid(tmp_path, keys):
    assert load_router_config(router_file(tmp_path, keys)).metrics_listen is None
    assert load_gateway_config(_gateway_file(tmp_path)).metrics_listen is None
    for bad in ("9400", "127.0.0.1:http", "127.0.0.1:70000", "example.org:9400", ":9400", 9400):
        with pytest.raises(ConfigError) as err:
            load_router_config(router_file(tmp_path, keys, metrics_listen=bad))
        assert "metrics_listen" in str(err.value)
        with pytest.raises(ConfigError) as err:
            load_gateway_config(_gateway_file(tmp_path, metrics_listen=bad))
        assert "metrics_listen" in str(err.value)


@pytest.mark.parametrize("which", ["metrics", "api"])
def test_a_busy_metrics_or_api_port_stops_the_router_with_one_line(tmp_path, keys, capfd, which):
    """polevpn-router opens its ops servers before it drops privileges; one whose port is
    taken ends start-up as a busy listener does: one "cannot listen" line, exit status 1."""
    import socket

    from polevpn import cli

    tls = {
        "listen": "127.0.0.1:0",
        "cert_file": str(keys.server_cert),
        "key_file": str(keys.server_key),
    }
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        extra: dict = {f"{which}_listen": f"127.0.0.1:{port}", "tls": tls, "stats_interval": 0}
        if which == "api":
            extra["api_token"] = "t" * 32
        path = router_file(tmp_path, keys, **extra)
        capfd.readouterr()
        assert cli.router_main([f"-configPath={path}"]) == 1
    errors = [line for line in capfd.readouterr().err.splitlines() if "level=error" in line]
    assert len(errors) == 1, errors
    assert 'msg="cannot listen"' in errors[0] and str(port) in errors[0]


def test_router_logs_where_metrics_listen_and_the_config_warning(tmp_path, keys, caplog):
    tls = {
        "listen": "127.0.0.1:0",
        "cert_file": str(keys.server_cert),
        "key_file": str(keys.server_key),
    }
    cfg = load_router_config(router_file(tmp_path, keys, metrics_listen="127.0.0.1:0", tls=tls))
    # the start-up warning of a non-loopback address, logged the way the router logs it,
    # without opening a port beyond loopback in a test
    exposed = load_router_config(
        router_file(tmp_path, keys, metrics_listen="198.18.0.1:9400", tls=tls)
    )
    cfg = dataclasses.replace(cfg, warnings=exposed.warnings)

    async def scenario():
        router, ops = await started_ops(cfg)
        try:
            port = ops.metrics.port
            assert (await scrape(port))[("polevpn_router_registered_gateways", ())] == 0
        finally:
            await router.stop()
        return port

    with caplog.at_level("INFO"):
        port = run(scenario())
    assert "metrics_listen 198.18.0.1:9400 is not a loopback address" in caplog.text
    assert f'msg="metrics listening" address=127.0.0.1 port={port}' in caplog.text


# -- real daemons in network namespaces

try:
    import topology as t
except ImportError:  # pragma: no cover
    from tests import topology as t

_ok, _reason = t.have_netns_support()
if _ok and shutil.which("ping") is None:
    _ok, _reason = False, "'ping' (iputils-ping) not found"
if _ok and t.console_script("polevpn-gateway") is None:
    _ok, _reason = False, "polevpn console scripts not installed (run 'make venv')"

_SCRAPE = r"""
import sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode())
"""


def _scrape_ns(topo, node: str, port: int) -> Samples:
    res = topo.run(node, [sys.executable, "-c", _SCRAPE, str(port)], timeout=20)
    return parse(res.stdout)


@pytest.mark.netns
@pytest.mark.skipif(not _ok, reason=_reason)
def test_e2e_gateway_and_router_metrics(tmp_path_factory):
    """gwA with two links (tls:// over IPv4, kcp:// over IPv6) and gwB plain, all three
    daemons scraped in one run."""
    from test_e2e import running_vpn

    work = tmp_path_factory.mktemp("metrics-e2e")
    keys_dir = work / "keys"
    generate(keys_dir)
    router = t.ml_router_config(keys_dir, metrics_listen="127.0.0.1:9400")
    links = [t.ml_link("v4"), t.ml_link("v6", "kcp", weight=2)]
    gw_a = t.ml_gateway_config(keys_dir, links, metrics_listen="127.0.0.1:9401")
    gw_b = t.gateway_config("B", keys_dir, metrics_listen="127.0.0.1:9402", heartbeat_interval=0.3)
    g = "polevpn_gateway_"
    with running_vpn(work, keys_dir, router=router, gw_a=gw_a, dual_uplink=True) as vpn:
        # gwB again, now serving metrics
        vpn.stop_gateway("gwB")
        vpn.start_gateway("gwB", t.write_json(work / "gateway-b-metrics.json", gw_b))

        def both_links_measured() -> Samples | None:
            m = _scrape_ns(vpn.topo, "gwA", 9401)
            ready = (
                value(m, f"{g}links", state="up") == 2
                and len(matching(m, f"{g}link_heartbeat_rtt_seconds")) == 2
                and matching(m, f"{g}link_kcp_srtt_seconds")
            )
            return m if ready else None

        before = _poll(both_links_measured, "gwA's links up with RTTs")
        assert value(before, f"{g}connected") == 1
        assert value(
            before,
            f"{g}link_info",
            link="v6",
            role="primary",
            route_server=links[1]["route_server"],
            transport="kcp",
        )
        assert value(before, f"{g}link_weight", link="v6") == 2
        for name in ("v4", "v6"):
            assert 0 < value(before, f"{g}link_heartbeat_rtt_seconds", link=name) < 5
            assert value(before, f"{g}link_connects_total", link=name) >= 1
        assert list(matching(before, f"{g}link_kcp_srtt_seconds")) == [(("link", "v6"),)]

        res = vpn.topo.ping("hostA", t.HOST_B, count=5, wait=2)
        assert res.returncode == 0, res.stdout
        after = _scrape_ns(vpn.topo, "gwA", 9401)

        def both(m: Samples, name: str) -> float:
            return sum(matching(m, f"{g}link_{name}").values())

        # 5 echo requests of 84 IP bytes each, at least, went to the router on the links
        assert both(after, "sent_bytes_total") >= both(before, "sent_bytes_total") + 5 * 84
        assert both(after, "received_packets_total") >= both(before, "received_packets_total") + 5

        def plain_measured() -> Samples | None:
            m = _scrape_ns(vpn.topo, "gwB", 9402)
            return m if matching(m, f"{g}heartbeat_rtt_seconds") else None

        plain = _poll(plain_measured, "gwB's heartbeat RTT")
        assert value(plain, f"{g}connected") == 1
        assert 0 < value(plain, f"{g}heartbeat_rtt_seconds") < 5
        # the echo replies went out through gwB
        assert value(plain, f"{g}to_router_bytes_total") >= 5 * 84
        assert value(plain, f"{g}from_router_packets_total") >= 5
        assert value(
            plain,
            f"{g}link_info",
            link="",
            role="",
            route_server=gw_b["route_server"],
            transport="tls",
        )
        assert value(plain, f"{g}connects_total") == 1
        assert not matching(plain, f"{g}link_up")

        r = _scrape_ns(vpn.topo, "router", 9400)
        p = "polevpn_router_"
        assert value(r, f"{p}registered_gateways") == 2
        sent_by_a = value(
            r, f"{p}gateway_received_packets_total", gateway=t.GW_A_TUN4, transport="mixed"
        )
        assert sent_by_a >= 5
        assert value(r, f"{p}link_up", gateway=t.GW_A_TUN4, link="v6") == 1


def _poll(probe, what: str, timeout: float = 15.0):
    """Call ``probe`` until it returns something true; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_congestion_figures_of_a_kcp_link():
    """A kcp:// link with congestion control: its controller's figures in the read model
    and as metrics (issue 16)."""
    from polevpn.config import FecParams, KcpParams
    from polevpn.io import pathstats
    from polevpn.kcp.kcp_link import KcpLink
    from polevpn.kcp.kcp_pool import KcpPool

    pool = KcpPool()
    link = KcpLink(KcpParams(fec=FecParams(mode="off")), pool, 1363, 0.0)
    link.write(b"x" * 5000, 0.0)
    figures = pathstats.kcp_figures(link)
    cc = figures.congestion
    assert cc is not None and cc.state == "startup"
    assert cc.pacing_rate > 0 and cc.cwnd == link.cc.cwnd and cc.inflight > 0
    assert cc.queue_budget == link.queue_budget
    lm = metrics._LinkMetrics("link_", ["link"])
    lm.add(["a"], figures)
    samples = {
        (s.name, s.labels.get("state")): s.value
        for fam in lm.families() for s in fam.samples
    }
    assert samples[("link_kcp_pacing_rate_bits", None)] == cc.pacing_rate * 8
    assert samples[("link_kcp_cwnd_bytes", None)] == cc.cwnd
    assert samples[("link_kcp_congestion_state", "startup")] == 1
    link.cc.foreign_queues = 3  # as if a TCP beside the tunnel had held the queue
    events = {
        s.labels["event"]: s.value
        for fam in _families_of(pathstats.kcp_figures(link)) for s in fam.samples
        if s.name == "link_kcp_congestion_events_total"
    }
    assert events == {"queue": 0, "foreign_queue": 3, "path_change": 0, "startup_queue": 0}
    link._hole_time = 1.5  # as if data had waited 1.5 s behind holes
    holes = [
        s.value for fam in _families_of(pathstats.kcp_figures(link)) for s in fam.samples
        if s.name == "link_kcp_hole_seconds_total"
    ]
    assert holes == [1.5]
    urgent = {
        s.labels["kind"]: s.value
        for fam in _families_of(pathstats.kcp_figures(link)) for s in fam.samples
        if s.name == "link_kcp_urgent_total"
    }
    assert urgent == {"ahead": 0, "copy": 0}
    off = KcpLink(KcpParams(fec=FecParams(mode="off"), congestion="off"), pool, 1363, 0.0)
    assert pathstats.kcp_figures(off).congestion is None
    link.close()
    off.close()


def _families_of(figures):
    lm = metrics._LinkMetrics("link_", ["link"])
    lm.add(["a"], figures)
    return lm.families()


def test_router_direct_metrics(keys, monkeypatch):
    """polevpn_direct_*: a pair offered, its path as the statuses say, endpoint probes by
    result, a revocation by reason; the control frames are not in the forwarded bytes."""
    import os
    import socket

    from test_direct_router import direct_pair

    from polevpn.direct.messages import Datagram, DatagramKind

    monkeypatch.setitem(loopback._transport, "mode", "tls")
    cfg = router_config(keys, metrics_listen=("127.0.0.1", 0))

    async def scenario():
        router, ops = await started_ops(cfg)
        assert ops.metrics is not None
        port = ops.metrics.port
        try:
            a, b = await direct_pair(router)
            # a stranger's probe: the right size and magic, an unknown token
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                probe = Datagram(DatagramKind.ENDPOINT_PROBE, os.urandom(16), 1)
                s.sendto(probe.encode(os.urandom(32)), ("127.0.0.1", router.kcp_port))
            rdv = router.rendezvous
            assert rdv is not None
            await loopback.until(lambda: rdv.registry.refused_unknown == 1)
            got = await scrape(port)
            d = "polevpn_direct_"
            assert value(got, f"{d}pairs") == 1
            assert value(got, f"{d}enabled") == 1
            assert value(got, f"{d}offers_total") == 2
            assert value(got, f"{d}endpoint_probes_total", result="answered") == 2
            assert value(got, f"{d}endpoint_probes_total", result="unknown_token") == 1
            assert value(got, f"{d}endpoint_probes_total", result="bad_tag") == 0
            # A reports direct, B nothing yet: the pair is not direct
            assert value(got, f"{d}paths", state="relayed") == 1
            assert value(got, f"{d}paths", state="direct") == 0
            assert value(got, f"{d}statuses_total") == 1
            assert value(got, f"{d}revokes_total", reason="peer_gone") == 0
            # the one IP packet, 20 + 32 bytes: DIRECT_* frames are not forwarded bytes
            assert value(got, "polevpn_router_forwarded_bytes_total") == 52
            a.close()
            await loopback.until(lambda: len(rdv) == 0)
            got = await scrape(port)
            assert value(got, f"{d}revokes_total", reason="peer_gone") == 1
            assert value(got, f"{d}pairs") == 0
            b.close()
        finally:
            await router.stop()

    run(scenario())

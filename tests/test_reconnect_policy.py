"""The gateway's reconnect policy (Gateway._connect_loop), without a network.

The sleeps between rounds are read off ``random.uniform``'s bounds: every try fails (or
every link is lost) at once, and the sleep itself is cut to zero.  The end-to-end bound this
policy buys (router back => offices back within seconds) is in test_faults.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
from pathlib import Path

import pytest

from polevpn.config import GatewayConfig, RouteServer, load_gateway_config
from polevpn.gateway import gateway as gwmod


def _config(**overrides) -> GatewayConfig:
    cfg = GatewayConfig(
        path=Path("gateway.json"),
        route_servers=(RouteServer("tls", "198.19.0.1", 443, "tls://198.19.0.1:443"),),
        key="k",
        gateway=ipaddress.IPv4Address("169.254.0.1"),
        gateway6=None,
        local_networks=(),
        route_networks=(),
        acls=(),
    )
    return dataclasses.replace(cfg, **overrides)


def _sleeps(
    monkeypatch, cfg: GatewayConfig, rounds: int, connect: bool = False
) -> list[tuple[float, float]]:
    """(low, high) of the jitter before each of ``rounds`` rounds after the first; with
    ``connect`` every round registers and the link is lost at once, else every round fails."""
    bounds: list[tuple[float, float]] = []
    gw = gwmod.Gateway(cfg)

    def uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        if len(bounds) >= rounds:
            gw._stopping.set()
        return 0.0

    class Link:
        server = cfg.route_servers[0]
        rejected = None
        silent = False

    async def try_servers(indices: range):
        if not connect:
            return None
        link = Link()
        # the gateway logs why a link was lost: what its closed future holds
        link.closed = asyncio.get_running_loop().create_future()  # type: ignore[attr-defined]
        link.closed.set_result(ConnectionResetError("lost at once"))  # type: ignore[attr-defined]
        return link, 0

    async def run_link(link):
        return link

    monkeypatch.setattr(gwmod.random, "uniform", uniform)
    monkeypatch.setattr(gw, "_try_servers", try_servers)
    monkeypatch.setattr(gw, "_run_link", run_link)

    async def main() -> None:
        await asyncio.wait_for(gw._connect_loop(), timeout=10)

    asyncio.run(main())
    return bounds


def _load(tmp_path: Path, **fields) -> GatewayConfig:
    obj = {
        "route_server": "tls://198.19.0.1:443",
        "key": "123456",
        "gateway": "169.254.0.1",
        "insecure_skip_verify": True,
        "local_networks": ["198.18.10.0/24"],
        "route_networks": ["198.18.20.0/24"],
        "acls": ["198.18.20.0/24"],
        **fields,
    }
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(obj))
    return load_gateway_config(path)


def test_defaults_cap_the_wait_at_three_seconds(tmp_path):
    cfg = _load(tmp_path)
    assert (cfg.reconnect_min_delay, cfg.reconnect_max_delay) == (0.5, 3.0)
    assert (_config().reconnect_min_delay, _config().reconnect_max_delay) == (0.5, 3.0)


def test_a_min_delay_above_the_default_cap_raises_the_cap(tmp_path):
    cfg = _load(tmp_path, reconnect_min_delay=5)
    assert (cfg.reconnect_min_delay, cfg.reconnect_max_delay) == (5.0, 5.0)


def test_failed_rounds_double_the_ceiling_up_to_the_cap(monkeypatch):
    bounds = _sleeps(monkeypatch, _config(), rounds=8)
    assert [low for low, _ in bounds] == [0.5] * 8
    assert [high for _, high in bounds] == [1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]


def test_a_long_outage_keeps_the_cap(monkeypatch):
    # 2**failed must not overflow a float however long the router stays away
    bounds = _sleeps(monkeypatch, _config(), rounds=2000)
    assert max(high for _, high in bounds) == 3.0


def test_zero_min_delay_still_backs_off(monkeypatch):
    bounds = _sleeps(monkeypatch, _config(reconnect_min_delay=0.0), rounds=6)
    assert [high for _, high in bounds] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.0, 3.0])


def test_a_link_that_lasted_resets_the_backoff(monkeypatch):
    # heartbeat_interval 0: every link counts as lasting, so each loss waits the minimum
    cfg = _config(heartbeat_interval=0.0)
    bounds = _sleeps(monkeypatch, cfg, rounds=5, connect=True)
    assert bounds == [(0.5, 0.5)] * 5


def test_a_link_lost_at_once_keeps_backing_off(monkeypatch):
    # a router that registers us and drops us at once is tried at most about once per cap
    cfg = _config(heartbeat_interval=3600.0)
    bounds = _sleeps(monkeypatch, cfg, rounds=5, connect=True)
    assert [high for _, high in bounds] == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_a_link_lost_to_silence_starts_the_next_round_with_the_next_server(monkeypatch):
    """A router gone silent (hung, or its host lost without a reset) is not tried first
    again: that would cost connect_timeout before the next route server. A link that was
    reset (a router restarting) starts from the preferred server, as ever."""
    servers = tuple(
        RouteServer("tls", f"198.19.0.{i}", 443, f"tls://198.19.0.{i}:443") for i in (1, 2, 3)
    )
    cfg = _config(route_servers=servers, heartbeat_interval=0.0)
    gw = gwmod.Gateway(cfg)
    rounds: list[list[int]] = []
    # which server each round registers with, and whether that link then falls silent
    script = [(0, True), (1, False), (1, True), (2, True)]

    class Link:
        rejected = None

        def __init__(self, server: RouteServer, silent: bool) -> None:
            self.server = server
            self.silent = silent
            self.closed = asyncio.get_running_loop().create_future()
            self.closed.set_result(None)

    async def try_servers(indices):
        rounds.append(list(indices))
        if len(rounds) > len(script):
            gw._stopping.set()
            return None
        index, silent = script[len(rounds) - 1]
        return Link(servers[index], silent), index

    async def run_link(link):
        return link

    monkeypatch.setattr(gwmod.random, "uniform", lambda low, high: 0.0)
    monkeypatch.setattr(gw, "_try_servers", try_servers)
    monkeypatch.setattr(gw, "_run_link", run_link)

    async def main() -> None:
        await asyncio.wait_for(gw._connect_loop(), timeout=10)

    asyncio.run(main())
    assert rounds == [
        [0, 1, 2],  # the first round: in order
        [1, 2, 0],  # the link to server 0 fell silent: server 1 first
        [0, 1, 2],  # the link to server 1 was reset: from the preferred again
        [2, 0, 1],  # the link to server 1 fell silent: server 2 first
        [0, 1, 2],  # the link to server 2 fell silent: wraps to server 0
    ]

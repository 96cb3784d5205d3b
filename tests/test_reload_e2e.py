"""Reload without restart, end to end: real router and gateways in namespaces, SIGHUP.

A transfer running through both reloads completes intact, and no connection was dropped
for a change that did not concern it; gateway routes, ACLs and announced networks change
in place; a broken file is refused and the running config stays.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import topology as t
from test_e2e import Vpn, keys, running_vpn  # noqa: F401

_ok, _reason = t.have_netns_support()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

MIB = 1 << 20
LAN_C = "198.18.30.0/24"
LAN_A2 = "198.18.11.0/24"


@pytest.fixture(scope="module")
def vpn(tmp_path_factory, keys):  # noqa: F811
    with running_vpn(tmp_path_factory.mktemp("reload"), keys) as v:
        yield v


def _hup(proc: subprocess.Popen | None, log: Path) -> str:
    """SIGHUP the daemon and return the line that says how this reload ended."""
    assert proc is not None and proc.poll() is None

    def outcomes() -> list[str]:
        return [
            ln
            for ln in t.log_lines(log, "reload")
            if "event=reloaded" in ln or "reload failed" in ln
        ]

    done = len(outcomes())
    proc.send_signal(signal.SIGHUP)  # ``ip netns exec`` execs the daemon: its own PID
    deadline = time.monotonic() + 10
    while len(outcomes()) <= done:
        assert time.monotonic() < deadline, f"no reload outcome\n{t.log_tail(log)}"
        time.sleep(0.05)
    return outcomes()[done]


def _reloaded(proc: subprocess.Popen | None, log: Path) -> list[str]:
    """SIGHUP, check the reload succeeded, return this reload's change lines."""
    before = t.count_log_lines(log, "reload change=")
    line = _hup(proc, log)
    assert "event=reloaded" in line, f"{line}\n{t.log_tail(log)}"
    return t.log_lines(log, "reload change=")[before:]


def _gw_config(vpn: Vpn, side: str, **overrides) -> None:
    t.write_json(
        vpn.gw_cfg[f"gw{side}"], t.gateway_config(side, vpn.keys, stats_interval=1, **overrides)
    )


def _links_lost(vpn: Vpn) -> int:
    assert vpn.router is not None
    lost = t.count_log_lines(vpn.router.log_path, "event=disconnected")
    for proc in vpn.gw.values():
        lost += t.count_log_lines(proc.log_path, "connection to router", "lost")
    return lost


def test_a_running_transfer_survives_reloads(vpn: Vpn) -> None:
    assert vpn.router is not None
    lost = _links_lost(vpn)
    x = vpn.topo.start_transfer("hostA", "hostB", t.HOST_B, 12 * MIB, 3 * MIB)
    try:
        # router: a new office's credentials, other timeouts, more logging
        t.write_json(
            vpn.router_cfg,
            t.router_config(
                vpn.keys,
                stats_interval=1,
                idle_timeout=50,
                log_level="debug",
                gateways={"169.254.0.9": {"key": "n" * 24, "networks": [LAN_C]}},
            ),
        )
        changes = _reloaded(vpn.router, vpn.router.log_path)
        assert any("gateways: added 169.254.0.9" in c for c in changes), changes
        assert any("idle_timeout: 60.0 -> 50.0" in c for c in changes), changes
        # gateway A: one more ACL entry
        _gw_config(vpn, "A", acls=[t.LAN_B, t.LAN_B6, "169.254.0.0/16", "2001:db8:ff::/64", LAN_C])
        changes = _reloaded(vpn.gw["gwA"], vpn.gw["gwA"].log_path)
        assert any("acls:" in c for c in changes), changes
        assert x.sent() < 12 * MIB, "the transfer ended before the reloads"
        res = x.result()
    finally:
        t.write_json(vpn.router_cfg, t.router_config(vpn.keys, stats_interval=1))
        _reloaded(vpn.router, vpn.router.log_path)
        _gw_config(vpn, "A")
        _reloaded(vpn.gw["gwA"], vpn.gw["gwA"].log_path)
    assert res["ok"], f"transfer broken by a reload: {res}\n{vpn.logs()}"
    assert _links_lost(vpn) == lost, f"a reload dropped a connection\n{vpn.logs()}"


def test_acls_change_in_place(vpn: Vpn) -> None:
    gwb = vpn.gw["gwB"]
    lost = _links_lost(vpn)
    try:
        _gw_config(vpn, "B", acls=[t.LAN_A6, "169.254.0.0/16", "2001:db8:ff::/64"])
        _reloaded(gwb, gwb.log_path)
        res = vpn.topo.ping("hostA", t.HOST_B, count=2, wait=1)
        assert res.returncode != 0, f"v4 from LAN A passes gwB's new acls:\n{res.stdout}"
        assert vpn.topo.ping("hostA", t.HOST_B6, count=2, wait=2).returncode == 0, vpn.logs()
    finally:
        _gw_config(vpn, "B")
        _reloaded(gwb, gwb.log_path)
    assert vpn.wait_ping("hostA", t.HOST_B, deadline=10) is not None, vpn.logs()
    assert _links_lost(vpn) == lost, vpn.logs()


def _tun_routes(vpn: Vpn, node: str) -> str:
    return vpn.topo.run(node, ["ip", "route", "show", "dev", "polevpn0"]).stdout


def test_route_and_local_networks(vpn: Vpn) -> None:
    assert vpn.router is not None
    gwa, gwb = vpn.gw["gwA"], vpn.gw["gwB"]
    registered = t.count_log_lines(vpn.router.log_path, "event=registered gateway=169.254.0.1 ")
    try:
        # gwB routes one more network into its TUN, without touching its link
        _gw_config(vpn, "B", route_networks=[t.LAN_A, t.LAN_A6, LAN_A2])
        changes = _reloaded(gwb, gwb.log_path)
        assert not any("reconnecting" in c for c in changes), changes
        assert LAN_A2 in _tun_routes(vpn, "gwB"), _tun_routes(vpn, "gwB")
        # gwA announces it: it registers again, and the router routes it
        _gw_config(vpn, "A", local_networks=[t.LAN_A, t.LAN_A6, LAN_A2])
        changes = _reloaded(gwa, gwa.log_path)
        assert any("reconnecting to register" in c for c in changes), changes
        line = t.wait_log_lines(
            vpn.router.log_path, registered + 1, "event=registered gateway=169.254.0.1 ", timeout=10
        )
        assert LAN_A2 in line, line
    finally:
        _gw_config(vpn, "B")
        _reloaded(gwb, gwb.log_path)
        _gw_config(vpn, "A")
        _reloaded(gwa, gwa.log_path)
    assert LAN_A2 not in _tun_routes(vpn, "gwB")
    assert vpn.wait_ping("hostA", t.HOST_B, deadline=10) is not None, vpn.logs()


@pytest.mark.parametrize("daemon", ["router", "gwB"])
def test_a_broken_file_keeps_the_running_config(vpn: Vpn, daemon: str) -> None:
    proc = vpn.router if daemon == "router" else vpn.gw[daemon]
    path = vpn.router_cfg if daemon == "router" else vpn.gw_cfg[daemon]
    assert proc is not None
    good = path.read_text()
    try:
        path.write_text(good.replace('"log_level": "info"', '"log_level": "loud"'))
        line = _hup(proc, proc.log_path)
        assert "reload failed, keeping the running config" in line, line
        assert f"{path}: log_level: 'loud' is not one of" in line, line
        assert proc.poll() is None
        assert vpn.topo.ping("hostA", t.HOST_B, count=2, wait=2).returncode == 0, vpn.logs()
    finally:
        path.write_text(good)

"""The gateway's ``forwarding`` and ``masquerade`` options, end to end in namespaces.

    hostA -- gwA ==tls==> router <==tls== gwB -- hostB

One topology and router serve the module; each test starts the gateways it needs with its
own configs and stops them again. Needs root, iproute2 and nft.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ is on sys.path (pytest rootdir-less import mode) ...
    import topology as t
    from test_e2e import Vpn, keys  # noqa: F401 - keys is a fixture used here
except ImportError:  # ... or tests/ is a package
    from tests import topology as t
    from tests.test_e2e import Vpn, keys  # noqa: F401

from polevpn.host.hostsetup import table_name

_ok, _reason = t.have_netns_support()
if _ok and shutil.which("nft") is None:
    _ok, _reason = False, "'nft' (nftables) not found"
if _ok and shutil.which("ping") is None:
    _ok, _reason = False, "'ping' (iputils-ping) not found"
if _ok and t.console_script("polevpn-gateway") is None:
    _ok, _reason = False, "polevpn console scripts not installed (run 'make venv')"

pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

TABLE = table_name("polevpn0")
V4 = "net.ipv4.ip_forward"
V6 = "net.ipv6.conf.all.forwarding"

# Accepts one TCP connection (bounded wait) and prints the peer's address.
_PEER_SERVER = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
srv = socket.socket(fam, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(1); srv.settimeout(20)
print("ready", flush=True)
conn, peer = srv.accept()
print("peer", peer[0], flush=True)
conn.close()
"""

_CONNECT = r"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 15
while True:
    try:
        socket.create_connection((host, port), timeout=3).close(); break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory, keys) -> Iterator[Vpn]:
    """Topology and router; the tests start and stop the gateways."""
    work = tmp_path_factory.mktemp("hostsetup")
    with t.built(t.Topology(log_dir=work / "logs")) as topo:
        v = Vpn(topo, work, keys)
        v.start_router()
        yield v


def sysctl(v: Vpn, node: str, key: str, value: str | None = None) -> str:
    if value is not None:
        v.topo.run(node, ["sysctl", "-q", "-w", f"{key}={value}"])
    return v.topo.run(node, ["sysctl", "-n", key]).stdout.strip()


def gateway(v: Vpn, node: str, name: str, **overrides) -> Path:
    side = node[-1]
    cfg = t.gateway_config(side, v.keys, stats_interval=1, **overrides)
    return t.write_json(v.work / f"{name}.json", cfg)


def tables(v: Vpn, node: str) -> str:
    return v.topo.run(node, ["nft", "list", "tables"]).stdout


def stop_all(v: Vpn) -> None:
    for node in list(v.gw):
        v.stop_gateway(node)


def peer_seen_by_host_a(v: Vpn, server: str, port: int) -> str:
    """hostB connects to hostA's ``server`` address; the source address hostA saw."""
    srv = v.topo.popen("hostA", [sys.executable, "-c", _PEER_SERVER, server, str(port)])
    try:
        t.wait_for_log(srv, "ready", timeout=10)
        v.topo.run("hostB", [sys.executable, "-c", _CONNECT, server, str(port)], timeout=25)
        line = t.wait_for_log(srv, "peer ", timeout=10, allow_exit=True)
        return line.split()[-1]
    finally:
        t.Topology.stop(srv, timeout=2)


def test_forwarding_enabled_while_running_and_restored_on_exit(site: Vpn) -> None:
    v = site
    try:
        assert sysctl(v, "gwA", V4, "0") == "0" and sysctl(v, "gwA", V6, "0") == "0"
        v.start_gateway("gwA", gateway(v, "gwA", "fwd-a", forwarding=True))
        v.start_gateway("gwB", gateway(v, "gwB", "fwd-b"))
        # gwA forwards hostA's packets into the tunnel only because it switched forwarding on
        assert v.wait_ping("hostA", t.HOST_B, deadline=15) is not None, v.logs()
        assert v.wait_ping("hostA", t.HOST_B6, deadline=15) is not None, v.logs()
        assert sysctl(v, "gwA", V4) == "1" and sysctl(v, "gwA", V6) == "1"
        v.stop_gateway("gwA")
        assert sysctl(v, "gwA", V4) == "0", v.logs()
        assert sysctl(v, "gwA", V6) == "0", v.logs()
        # and without the gateway's help hostA's traffic stops at gwA again
        v.start_gateway("gwA", gateway(v, "gwA", "plain-a"))
        assert v.topo.ping("hostA", t.HOST_B, count=2, wait=1).returncode != 0
    finally:
        stop_all(v)
        sysctl(v, "gwA", V4, "1")
        sysctl(v, "gwA", V6, "1")


def masquerade_run(v: Vpn, name: str) -> tuple[str, str, str]:
    """gwB masquerading: the sources hostA sees over IPv4 and IPv6, and gwB's log."""
    # hostA's office must route gwB's tunnel addresses back through the tunnel
    gw_a = gateway(
        v, "gwA", f"{name}-a",
        route_networks=[t.LAN_B, t.LAN_B6, f"{t.GW_B_TUN4}/32", f"{t.GW_B_TUN6}/128"],
    )
    v.start_gateway("gwA", gw_a)
    gw_b = v.start_gateway("gwB", gateway(v, "gwB", f"{name}-b", masquerade=True))
    assert v.wait_ping("hostB", t.HOST_A, deadline=15) is not None, v.logs()
    listed = v.topo.run("gwB", ["nft", "list", "table", "inet", TABLE]).stdout
    assert 'oifname "polevpn0" masquerade' in listed, listed
    assert "stale" not in listed, listed
    peer4 = peer_seen_by_host_a(v, t.HOST_A, 5601)
    peer6 = peer_seen_by_host_a(v, t.HOST_A6, 5602)
    v.stop_gateway("gwB")
    assert TABLE not in tables(v, "gwB"), v.logs()
    return peer4, peer6, gw_b.log_path.read_text(errors="replace")


def test_masquerade_rewrites_sources_into_the_tunnel_and_is_removed(site: Vpn) -> None:
    v = site
    try:
        assert TABLE not in tables(v, "gwB")
        peer4, peer6, log = masquerade_run(v, "masq")
        assert peer4 == t.GW_B_TUN4, f"hostA saw {peer4}\n{v.logs()}"
        assert peer6 == t.GW_B_TUN6, f"hostA saw {peer6}\n{v.logs()}"
        assert "replaced nftables table" not in log
        # control: without masquerade hostA sees hostB itself
        v.start_gateway("gwB", gateway(v, "gwB", "plain-b"))
        assert v.wait_ping("hostB", t.HOST_A, deadline=15) is not None, v.logs()
        assert peer_seen_by_host_a(v, t.HOST_A, 5603) == t.HOST_B
    finally:
        stop_all(v)


def test_stale_table_from_a_crash_is_replaced(site: Vpn) -> None:
    v = site
    stale = (
        f"table inet {TABLE} {{\n"
        "  chain stale {\n"
        "    type filter hook output priority 0; policy accept;\n"
        '    counter comment "stale"\n'
        "  }\n"
        "}\n"
    )
    try:
        v.topo.run("gwB", ["nft", "-f", "-"], input=stale)
        assert "stale" in v.topo.run("gwB", ["nft", "list", "table", "inet", TABLE]).stdout
        peer4, _, log = masquerade_run(v, "stale")
        assert peer4 == t.GW_B_TUN4, v.logs()
        assert "replaced nftables table" in log, log
    finally:
        stop_all(v)
        v.topo.run("gwB", ["nft", "delete", "table", "inet", TABLE], check=False)


def test_forwarding_failure_stops_start_up_cleanly(site: Vpn) -> None:
    """A gateway that cannot make its host settings exits non-zero and leaves nothing."""
    v = site
    # an interface name nft cannot quote: masquerade fails after forwarding was switched on
    cfg = gateway(v, "gwA", "bad-a", forwarding=True, masquerade=True, tun_name='pv"0')
    try:
        sysctl(v, "gwA", V4, "0")
        proc = t.start_gateway(v.topo, "gwA", cfg, log_name="bad-a", wait=False)
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.returncode not in (None, 0), t.log_tail(proc.log_path)
        assert "cannot masquerade" in proc.log_path.read_text(), t.log_tail(proc.log_path)
        assert sysctl(v, "gwA", V4) == "0"
        assert TABLE not in tables(v, "gwA")
    finally:
        sysctl(v, "gwA", V4, "1")

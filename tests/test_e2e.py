"""End-to-end tests: router + two gateways in five network namespaces.

    hostA -- gwA ==tls==> router <==tls== gwB -- hostB

Needs root and iproute2.  Every namespace, interface and process is created
here and removed again, also on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ is on sys.path (pytest rootdir-less import mode) ...
    import topology as t
except ImportError:  # ... or tests/ is a package
    from tests import topology as t

_ok, _reason = t.daemons_ready()

pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

TRANSFER_BYTES = 50 * 1024 * 1024


class Vpn:
    """The running system: topology, config files and daemon processes."""

    def __init__(self, topo: t.Topology, work: Path, keys: Path):
        self.topo = topo
        self.work = work
        self.keys = keys
        # stats every second: tests read counters from the log lines
        self.router_cfg = t.write_json(
            work / "config.json", t.router_config(keys, stats_interval=1)
        )
        self.gw_cfg = {
            "gwA": t.write_json(
                work / "gateway-a.json", t.gateway_config("A", keys, stats_interval=1)
            ),
            "gwB": t.write_json(
                work / "gateway-b.json", t.gateway_config("B", keys, stats_interval=1)
            ),
        }
        self.router: subprocess.Popen | None = None
        self.gw: dict[str, subprocess.Popen] = {}

    def start_router(self) -> None:
        self.router = t.start_router(self.topo, self.router_cfg)

    def start_gateway(self, node: str, config: Path | None = None) -> subprocess.Popen:
        proc = t.start_gateway(self.topo, node, config or self.gw_cfg[node])
        self.gw[node] = proc
        return proc

    def stop_gateway(self, node: str) -> None:
        proc = self.gw.pop(node)
        rc = t.Topology.stop(proc, timeout=5)
        assert rc is not None, f"{node} gateway did not stop"

    def logs(self) -> str:
        parts = []
        for path in sorted(self.topo.log_dir.glob("*.log")):
            parts.append(f"----- {path.name} -----\n{t.log_tail(path, 25)}")
        return "\n".join(parts)

    def wait_ping(self, src: str, dst: str, deadline: float = 10.0) -> float | None:
        return self.topo.wait_ping(src, dst, deadline=deadline)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    res = subprocess.run(
        [sys.executable, "-m", "polevpn.keygen", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, f"keygen failed: {res.stdout}\n{res.stderr}"
    for name in ("ca.crt", "server.crt", "server.key", "shared.key"):
        assert (out / name).is_file(), f"keygen did not write {name}"
    return out


@contextlib.contextmanager
def running_vpn(
    work: Path,
    keys: Path,
    router: dict | None = None,
    gw_a: dict | None = None,
    impair_delay_ms: float | None = None,
    dual_uplink: bool = False,
) -> Iterator[Vpn]:
    """Topology, router and both gateways up and passing pings; all removed afterwards.

    ``router`` and ``gw_a`` replace the default configs; ``impair_delay_ms`` puts the
    impairment element, with that delay, between gwA and the router; ``dual_uplink`` gives
    gwA its second (IPv6) underlay link (see topology.py).
    """
    topo = t.Topology(log_dir=work / "logs", impair=impair_delay_ms is not None,
                      dual_uplink=dual_uplink)
    with t.built(topo):
        if impair_delay_ms is not None:
            topo.start_impair(delay_ms=impair_delay_ms)
        v = Vpn(topo, work, keys)
        if router is not None:
            v.router_cfg = t.write_json(work / "config.json", router)
        if gw_a is not None:
            v.gw_cfg["gwA"] = t.write_json(work / "gateway-a.json", gw_a)
        v.start_router()
        v.start_gateway("gwA")
        v.start_gateway("gwB")
        waited = v.wait_ping("hostA", t.HOST_B, deadline=15)
        assert waited is not None, f"no connectivity after start\n{v.logs()}"
        yield v


@pytest.fixture(scope="module")
def vpn(tmp_path_factory, keys):
    with running_vpn(tmp_path_factory.mktemp("vpn"), keys) as v:
        yield v


# ------------------------------------------------------------------- pings
@pytest.mark.parametrize(
    "src,dst",
    [
        ("hostA", t.HOST_B),
        ("hostB", t.HOST_A),
        ("hostA", t.HOST_B6),
        ("hostB", t.HOST_A6),
    ],
    ids=["v4-A-to-B", "v4-B-to-A", "v6-A-to-B", "v6-B-to-A"],
)
def test_ping(vpn, src, dst):
    res = vpn.topo.ping(src, dst, count=3, wait=2)
    assert res.returncode == 0, f"ping {src} -> {dst} failed:\n{res.stdout}\n{vpn.logs()}"


def test_traffic_goes_through_tunnel(vpn):
    """No plain routes exist: LAN B is reachable from gwA only via the TUN device."""
    res = vpn.topo.run("gwA", ["ip", "route", "get", t.HOST_B])
    assert "polevpn0" in res.stdout, res.stdout
    res = vpn.topo.run("gwA", ["ip", "-6", "route", "get", t.HOST_B6])
    assert "polevpn0" in res.stdout, res.stdout


def test_no_link_local_chatter_into_the_tunnel(vpn):
    """The TUN has no IPv6 link-local address, so the kernel sends no router solicitations
    or MLD reports into the tunnel, which the router would count as spoofed sources."""
    for node in ("gwA", "gwB"):
        res = vpn.topo.run(node, ["ip", "-6", "addr", "show", "dev", "polevpn0", "scope", "link"])
        assert res.stdout.strip() == "", res.stdout
    # a router solicitation goes out within a second or so of the link coming up
    t.wait_log_lines(vpn.router.log_path, 4, "event=stats", timeout=10)
    stats = t.last_stats(vpn.router.log_path)
    assert stats and stats["dropped_spoofed"] == "0", (stats, vpn.logs())


# ---------------------------------------------------------------- transfer
def test_tcp_transfer_50mb_sha256(vpn):
    res = vpn.topo.transfer("hostA", "hostB", t.HOST_B, TRANSFER_BYTES, timeout=120)
    assert res["received"]["bytes"] == TRANSFER_BYTES, (res, vpn.logs())
    assert res["ok"], f"SHA-256 mismatch: {res}"
    print(f"50 MB hostA->hostB through the tunnel: {res['mbit_s']:.1f} Mbit/s")


def test_tcp_transfer_ipv6(vpn):
    res = vpn.topo.transfer("hostB", "hostA", t.HOST_A6, 5 * 1024 * 1024, timeout=60)
    assert res["ok"], f"IPv6 transfer failed: {res}\n{vpn.logs()}"


# ------------------------------------------------------------ super-packets
def _counter(log: Path, name: str) -> int:
    """``name`` in the newest stats line; counters only grow within one process's log."""
    return int(t.last_stats(log).get(name, 0))


def test_gateways_negotiate_super_packets(vpn):
    for gw in ("169.254.0.1", "169.254.0.2"):
        line = t.find_log_line(vpn.router.log_path, f"registered gateway={gw} ", "features=")
        assert line and "features=super-packets" in line, t.log_tail(vpn.router.log_path)
    for node in ("gwA", "gwB"):
        line = t.find_log_line(vpn.gw[node].log_path, "opened tun device", "offloads=")
        assert line and "offloads=0x0" not in line, line


_USO_RECEIVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2]))); s.settimeout(3)
print("ready", flush=True)
got = []
try:
    while True:
        got.append(s.recv(65535).hex())
except socket.timeout:
    pass
print(" ".join(got), flush=True)
"""

# one sendmsg with UDP_SEGMENT: the kernel hands gwA's TUN a single USO super-packet
_USO_SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"".join(bytes([i]) * 1000 for i in range(20)) + b"tail"
s.sendmsg([payload], [(socket.SOL_UDP, 103, (1000).to_bytes(2, sys.byteorder))], 0,
           (sys.argv[1], int(sys.argv[2])))
"""


def _uso_burst(vpn) -> list[bytes]:
    rx = vpn.topo.popen(
        "hostB", [sys.executable, "-c", _USO_RECEIVER, t.HOST_B, "5301"], log_name="uso-rx"
    )
    try:
        deadline = time.monotonic() + 10
        while b"ready" not in rx.log_path.read_bytes():
            assert rx.poll() is None and time.monotonic() < deadline, "receiver did not start"
            time.sleep(0.05)
        vpn.topo.run("hostA", [sys.executable, "-c", _USO_SENDER, t.HOST_B, "5301"], timeout=10)
        rx.wait(timeout=15)
    finally:
        t.Topology.stop(rx)
    lines = rx.log_path.read_text().split("\n")
    return [bytes.fromhex(h) for h in lines[1].split()] if len(lines) > 1 else []


USO_EXPECTED = [bytes([i]) * 1000 for i in range(20)] + [b"tail"]


def test_udp_segmentation_offload_crosses_whole(vpn):
    assert _uso_burst(vpn) == USO_EXPECTED, vpn.logs()


def test_router_cuts_super_packets_for_a_plain_gateway(vpn):
    """gwB without offloads, as a PoleVPN gateway: the router segments what gwA sends whole."""
    cfg = t.write_json(
        vpn.work / "gateway-b-plain.json", t.gateway_config("B", vpn.keys, offload=False)
    )
    vpn.stop_gateway("gwB")
    try:
        before = _counter(vpn.router.log_path, "segmented")
        vpn.start_gateway("gwB", cfg)
        assert vpn.wait_ping("hostA", t.HOST_B, deadline=10) is not None, vpn.logs()
        line = t.find_log_line(vpn.router.log_path, "registered gateway=169.254.0.2 ", "features=-")
        assert line, t.log_tail(vpn.router.log_path)
        res = vpn.topo.transfer("hostA", "hostB", t.HOST_B, 8 * 1024 * 1024, timeout=60)
        assert res["ok"], f"transfer to the plain gateway failed: {res}\n{vpn.logs()}"
        res = vpn.topo.transfer("hostB", "hostA", t.HOST_A6, 4 * 1024 * 1024, timeout=60)
        assert res["ok"], f"transfer from the plain gateway failed: {res}\n{vpn.logs()}"
        # a USO super-packet from hostA is cut into its 21 datagrams for the plain gateway
        time.sleep(1.5)  # the stats line after the transfers
        before = _counter(vpn.router.log_path, "segmented")
        assert _uso_burst(vpn) == USO_EXPECTED, vpn.logs()
        line = t.find_log_line(vpn.gw["gwA"].log_path, "opened tun device", "offloads=")
        if line and int(line.rsplit("offloads=", 1)[1].split()[0], 16) & 0x20:
            deadline = time.monotonic() + 5
            while _counter(vpn.router.log_path, "segmented") <= before:
                assert time.monotonic() < deadline, "the USO burst was not one super-packet"
                time.sleep(0.2)
        deadline = time.monotonic() + 5
        while _counter(vpn.router.log_path, "segmented") <= before:
            assert time.monotonic() < deadline, "router never segmented a super-packet"
            time.sleep(0.2)
    finally:
        vpn.stop_gateway("gwB")
        vpn.start_gateway("gwB")
    assert vpn.wait_ping("hostA", t.HOST_B, deadline=10) is not None, vpn.logs()


def test_gateway_cuts_super_packets_when_the_router_refuses_them(vpn):
    cfg = t.write_json(vpn.work / "config-plain.json", _router_config(vpn, super_packets=False))
    old_cfg, vpn.router_cfg = vpn.router_cfg, cfg
    before = _counter(vpn.gw["gwA"].log_path, "segmented")
    try:
        _restart_router(vpn)
        res = vpn.topo.transfer("hostA", "hostB", t.HOST_B, 8 * 1024 * 1024, timeout=60)
        assert res["ok"], f"transfer failed: {res}\n{vpn.logs()}"
        deadline = time.monotonic() + 5
        while _counter(vpn.gw["gwA"].log_path, "segmented") <= before:
            assert time.monotonic() < deadline, f"gwA never segmented\n{vpn.logs()}"
            time.sleep(0.2)
    finally:
        vpn.router_cfg = old_cfg
        _restart_router(vpn)


def _router_config(vpn, **overrides) -> dict:
    return t.router_config(vpn.keys, stats_interval=1, **overrides)


def _restart_router(vpn) -> None:
    assert vpn.router is not None
    t.Topology.stop(vpn.router)
    vpn.start_router()
    assert vpn.wait_ping("hostA", t.HOST_B, deadline=20) is not None, vpn.logs()


# --------------------------------------------------------------------- ACL
def test_acl_drops_unlisted_source(vpn):
    """gwB restarted with acls lacking LAN A's IPv4 net: v4 from A dropped, v6 passes."""
    acls = [t.LAN_A6, "169.254.0.0/16", "2001:db8:ff::/64"]
    cfg = t.write_json(vpn.work / "gateway-b-acl.json", t.gateway_config("B", vpn.keys, acls=acls))
    vpn.stop_gateway("gwB")
    try:
        vpn.start_gateway("gwB", cfg)
        assert vpn.wait_ping("hostA", t.HOST_B6, deadline=10) is not None, (
            f"IPv6 (allowed) does not pass after gwB restart\n{vpn.logs()}"
        )
        res = vpn.topo.ping("hostA", t.HOST_B, count=3, wait=1)
        assert res.returncode != 0, f"ACL did not drop hostA -> hostB v4:\n{res.stdout}"
        res = vpn.topo.ping("hostB", t.HOST_A, count=2, wait=1)
        assert res.returncode != 0, f"replies from LAN A v4 not dropped:\n{res.stdout}"
        res = vpn.topo.ping("hostB", t.HOST_A6, count=2, wait=2)
        assert res.returncode == 0, f"IPv6 hostB -> hostA failed:\n{res.stdout}"
    finally:
        if "gwB" in vpn.gw:
            vpn.stop_gateway("gwB")
        vpn.start_gateway("gwB")
    assert vpn.wait_ping("hostA", t.HOST_B, deadline=10) is not None, (
        f"v4 not restored after gwB restart with full acls\n{vpn.logs()}"
    )


# --------------------------------------------------------------- wrong key
def _extra_gateway(vpn, name: str, **overrides) -> Path:
    cfg = t.gateway_config(
        "A",
        vpn.keys,
        tun_name=f"pv{name}0",
        gateway="169.254.0.10",
        gateway6="2001:db8:ff::10",
        local_networks=["198.18.41.0/24"],
        route_networks=["198.18.40.0/24"],
        reconnect_min_delay=0.2,
        reconnect_max_delay=0.5,
    )
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return t.write_json(vpn.work / f"gateway-{name}.json", cfg)


def test_wrong_key_rejected(vpn):
    bad_key = vpn.work / "wrong.key"
    bad_key.write_text("definitely-not-the-shared-key\n")
    cfg = _extra_gateway(vpn, "bad", key_file=str(bad_key))
    proc = t.start_gateway(vpn.topo, "gwA", cfg, log_name="gw-wrong-key", wait=False)
    try:
        rc = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        t.Topology.stop(proc)
        pytest.fail(f"gateway with wrong key did not exit\n{t.log_tail(proc.log_path)}")
    assert rc == 1, f"exit status {rc}, expected 1\n{t.log_tail(proc.log_path)}"
    line = t.find_log_line(proc.log_path, "authentication rejected by router: invalid key")
    assert line, f"no clear rejection line in gateway log:\n{t.log_tail(proc.log_path)}"
    line = t.find_log_line(vpn.router.log_path, "auth rejected", "invalid key")
    assert line, f"router did not log the rejection:\n{t.log_tail(vpn.router.log_path)}"
    # The good gateways are unaffected.
    res = vpn.topo.ping("hostA", t.HOST_B, count=2, wait=2)
    assert res.returncode == 0, f"tunnel broken after wrong-key attempt\n{vpn.logs()}"


def test_key_inline_in_config(vpn):
    """ "key" given inline instead of key_file: the gateway registers."""
    shared = (vpn.keys / "shared.key").read_text().strip()
    cfg = t.gateway_config("B", vpn.keys, key=shared)
    cfg.pop("key_file")
    path = t.write_json(vpn.work / "gateway-b-inline.json", cfg)
    vpn.stop_gateway("gwB")
    try:
        vpn.start_gateway("gwB", path)
        assert vpn.wait_ping("hostA", t.HOST_B, deadline=10) is not None, vpn.logs()
    finally:
        vpn.stop_gateway("gwB")
        vpn.start_gateway("gwB")
    assert vpn.wait_ping("hostA", t.HOST_B, deadline=10) is not None, vpn.logs()


# ---------------------------------------------------------- router restart
def test_router_sigkill_and_restart(vpn):
    old = vpn.router
    assert old is not None and old.poll() is None
    os.kill(old.pid, signal.SIGKILL)
    old.wait(timeout=5)
    res = vpn.topo.ping("hostA", t.HOST_B, count=1, wait=1)
    assert res.returncode != 0, "ping succeeded with the router dead?"
    t0 = time.monotonic()
    vpn.start_router()
    waited = vpn.wait_ping("hostA", t.HOST_B, deadline=20)
    total = time.monotonic() - t0
    assert waited is not None, f"ping did not resume within 20 s\n{vpn.logs()}"
    assert total <= 10.0, f"ping resumed only after {total:.1f} s (want <= 10 s)"
    res = vpn.topo.ping("hostB", t.HOST_A6, count=2, wait=2)
    assert res.returncode == 0, f"IPv6 did not resume\n{vpn.logs()}"
    print(f"ping resumed {total:.1f} s after router restart")


# ------------------------------------------------- router certificate checks
def _run_until_log(vpn, cfg: Path, name: str, *needles: str) -> str | None:
    """Start a gateway in gwA, wait (bounded) for a log line, stop it by PID."""
    proc = t.start_gateway(vpn.topo, "gwA", cfg, log_name=f"gw-{name}", wait=False)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = t.find_log_line(proc.log_path, *needles)
            if line or proc.poll() is not None:
                return line
            time.sleep(0.1)
        return None
    finally:
        t.Topology.stop(proc, timeout=5)


def test_router_certificate_is_verified(vpn, tmp_path):
    from polevpn.keygen import generate

    other = generate(tmp_path / "other-ca")
    wrong_ca = _extra_gateway(vpn, "badca", ca_file=str(other.ca_cert))
    line = _run_until_log(vpn, wrong_ca, "badca", "cannot connect", "CERTIFICATE_VERIFY_FAILED")
    assert line, "a router certificate from another CA was accepted"

    der = ssl.PEM_cert_to_DER_cert((vpn.keys / "server.crt").read_text())
    good_pin = hashlib.sha256(der).hexdigest()
    pinned = _extra_gateway(vpn, "pin", ca_file=None, cert_pin=good_pin)
    assert _run_until_log(vpn, pinned, "pin", "registered with router"), "pinned gateway failed"

    bad_pin = _extra_gateway(vpn, "badpin", ca_file=None, cert_pin="00" * 32)
    line = _run_until_log(vpn, bad_pin, "badpin", "does not match cert_pin")
    assert line, "a router certificate not matching the pin was accepted"
    assert t.find_log_line(vpn.topo.log_dir / "gw-badpin.log", "registered") is None
    # the office gateways were not disturbed
    assert vpn.topo.ping("hostA", t.HOST_B, count=2, wait=2).returncode == 0

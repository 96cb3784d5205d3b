"""End-to-end over kcp://: real router and gateways, real TUN devices, in namespaces.

    hostA -- gwA ==kcp (DTLS, FEC, KCP)==> router <==tls== gwB -- hostB

gwA speaks kcp:// and gwB tls://, so every packet here also crosses from one transport to
the other inside the router. Impairment (loss, delay) has its own module.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import topology as t
    from test_e2e import _extra_gateway, _run_until_log, keys, running_vpn  # noqa: F401
except ImportError:
    from tests import topology as t
    from tests.test_e2e import (  # noqa: F401
        _extra_gateway,
        _run_until_log,
        keys,
        running_vpn,
    )

pytestmark = [pytest.mark.netns]
if not t.have_netns_support()[0]:
    pytestmark.append(pytest.mark.skip(reason=t.have_netns_support()[1]))

KCP_A = f"kcp://{t.ROUTER_UL_A}:443"
TLS_A = f"tls://{t.ROUTER_UL_A}:443"


def router_kcp_config(keys: Path, **kcp_overrides) -> dict:
    cfg = t.router_config(keys)
    cfg["kcp"]["enable"] = True
    cfg["kcp"].update(kcp_overrides)
    cfg["stats_interval"] = 1
    return cfg


@pytest.fixture(scope="module")
def kvpn(tmp_path_factory, keys):
    gw_a = t.gateway_config("A", keys, route_server=KCP_A, stats_interval=1)
    with running_vpn(
        tmp_path_factory.mktemp("kvpn"), keys, router=router_kcp_config(keys), gw_a=gw_a
    ) as v:
        yield v


def test_kcp_registration_logged(kvpn):
    line = t.find_log_line(kvpn.router.log_path, "registered gateway=169.254.0.1", "transport=kcp")
    assert line, t.log_tail(kvpn.router.log_path)
    assert t.find_log_line(kvpn.router.log_path, "listening transport=kcp")


@pytest.mark.parametrize(
    "src,dst",
    [("hostA", t.HOST_B), ("hostB", t.HOST_A), ("hostA", t.HOST_B6), ("hostB", t.HOST_A6)],
    ids=["v4-A-to-B", "v4-B-to-A", "v6-A-to-B", "v6-B-to-A"],
)
def test_ping_over_kcp(kvpn, src, dst):
    res = kvpn.topo.ping(src, dst, count=3, wait=2)
    assert res.returncode == 0, f"ping {src} -> {dst} failed:\n{res.stdout}\n{kvpn.logs()}"


def test_tcp_transfer_over_kcp_sha256(kvpn):
    size = 20 * 1024 * 1024
    res = kvpn.topo.transfer("hostA", "hostB", t.HOST_B, size, timeout=120)
    assert res["received"]["bytes"] == size, (res, kvpn.logs())
    assert res["ok"], f"SHA-256 mismatch: {res}"
    res = kvpn.topo.transfer("hostB", "hostA", t.HOST_A, size // 4, timeout=120)
    assert res["ok"], f"B->A transfer failed: {res}\n{kvpn.logs()}"


_GARBAGE = r"""
import os, random, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rnd = random.Random(7)
for i in range(count):
    kind = i % 4
    if kind == 0:
        d = os.urandom(rnd.randrange(1, 1400))
    elif kind == 1:  # looks like a DTLS handshake record, then nonsense
        d = bytes([22, 0xFE, 0xFD, 0, 0]) + os.urandom(rnd.randrange(8, 300))
    elif kind == 2:  # application data under epoch 1, as if from a session
        d = bytes([23, 0xFE, 0xFD, 0, 1]) + os.urandom(rnd.randrange(8, 1400))
    else:  # a bare KCP segment of conversation 0
        d = bytes(4) + os.urandom(rnd.randrange(20, 200))
    s.sendto(d, (host, port))
print("sent", count)
"""


def test_garbage_datagrams_do_not_disturb_sessions(kvpn):
    # from the same namespace as gwA but another source port, and from gwB's side
    for node, dst in (("gwA", t.ROUTER_UL_A), ("gwB", t.ROUTER_UL_B)):
        res = kvpn.topo.run(node, [sys.executable, "-c", _GARBAGE, dst, "443", "3000"], timeout=30)
        assert res.returncode == 0, res.stderr
    assert kvpn.router.poll() is None, f"router died\n{kvpn.logs()}"
    res = kvpn.topo.ping("hostA", t.HOST_B, count=3, wait=2)
    assert res.returncode == 0, f"session disturbed by garbage\n{kvpn.logs()}"


def test_wrong_certificate_refused_without_disturbing(kvpn, tmp_path):
    from polevpn.keygen import generate

    other = generate(tmp_path / "other-ca")
    cfg = _extra_gateway(kvpn, "kbadca", route_server=KCP_A, ca_file=str(other.ca_cert))
    line = _run_until_log(kvpn, cfg, "kbadca", "cannot connect", "certificate verify failed")
    assert line, t.log_tail(kvpn.topo.log_dir / "gw-kbadca.log")
    assert t.find_log_line(kvpn.topo.log_dir / "gw-kbadca.log", "registered") is None
    cfg = _extra_gateway(kvpn, "kbadpin", route_server=KCP_A, ca_file=None, cert_pin="00" * 32)
    line = _run_until_log(kvpn, cfg, "kbadpin", "does not match cert_pin")
    assert line, t.log_tail(kvpn.topo.log_dir / "gw-kbadpin.log")
    res = kvpn.topo.ping("hostA", t.HOST_B, count=3, wait=2)
    assert res.returncode == 0, f"established session disturbed\n{kvpn.logs()}"


# ---------------------------------------------------------------------------- fallback
@contextlib.contextmanager
def udp_blocked(topo: t.Topology, port: int = 443):
    """Drop UDP to ``port`` in the router's namespace (nftables), also on failure."""
    table = f"pvblock{port}"
    script = (
        f"table inet {table} {{\n chain input {{\n"
        f"  type filter hook input priority 0;\n  udp dport {port} drop\n }}\n}}\n"
    )
    res = topo.run("router", ["nft", "-f", "-"], input=script, timeout=10)
    assert res.returncode == 0, res.stderr
    try:
        yield
    finally:
        topo.run("router", ["nft", "delete", "table", "inet", table], check=False, timeout=10)


def _counter(proc: subprocess.Popen, text: str) -> int:
    return Path(proc.log_path).read_text(errors="replace").count(text)


def test_fallback_to_tls_and_back(kvpn):
    cfg = t.gateway_config(
        "A",
        kvpn.keys,
        route_server=None,
        route_servers=[KCP_A, TLS_A],
        preferred_retry_interval=2,
        heartbeat_interval=1,
        heartbeat_timeout=3,
    )
    cfg.pop("route_server")
    path = t.write_json(kvpn.work / "gateway-a-fallback.json", cfg)
    kvpn.stop_gateway("gwA")
    try:
        with udp_blocked(kvpn.topo):
            proc = t.start_gateway(kvpn.topo, "gwA", path, log_name="gwA-fallback", wait=False)
            kvpn.gw["gwA"] = proc
            t.wait_for_log(proc, "using fallback route server", TLS_A, timeout=20)
            assert kvpn.wait_ping("hostA", t.HOST_B, deadline=10) is not None, kvpn.logs()
            line = t.find_log_line(
                kvpn.router.log_path, "registered gateway=169.254.0.1", "transport=tls"
            )
            assert line, t.log_tail(kvpn.router.log_path)
            before = _counter(kvpn.router, "transport=kcp")
        # UDP open again: within a few retry intervals the gateway is back on kcp://
        t.wait_for_log(proc, "moved to preferred route server", KCP_A, timeout=20)
        deadline = time.monotonic() + 10
        while _counter(kvpn.router, "transport=kcp") <= before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _counter(kvpn.router, "transport=kcp") > before, t.log_tail(kvpn.router.log_path)
        assert kvpn.wait_ping("hostA", t.HOST_B, deadline=10) is not None, kvpn.logs()
    finally:
        if "gwA" in kvpn.gw:
            kvpn.stop_gateway("gwA")
        kvpn.start_gateway("gwA")
    assert kvpn.wait_ping("hostA", t.HOST_B, deadline=10) is not None, kvpn.logs()

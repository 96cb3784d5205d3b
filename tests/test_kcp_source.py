"""kcp:// on a router with more than one address (issue 21), end to end in namespaces.

The router's service address (what gateways dial) is on ``lo``, its link addresses on the
interfaces toward the offices, and its routes back have no ``src`` (Topology with
``service_address=True``). A gateway's connected UDP socket takes replies from the dialled
address only; before the fix every reply left from the link address, and kcp:// never
connected. nftables counters in each gateway's namespace show where the replies came from.

    hostA -- gwA ==kcp://198.19.0.1==> router (lo: 198.19.0.1, 2001:db8:ff02::1) <== gwB -- hostB
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import topology as t
    from test_e2e import Vpn, keys  # noqa: F401
except ImportError:
    from tests import topology as t
    from tests.test_e2e import Vpn, keys  # noqa: F401

pytestmark = [pytest.mark.netns]
if not t.have_netns_support()[0]:
    pytestmark.append(pytest.mark.skip(reason=t.have_netns_support()[1]))

KCP4 = f"kcp://{t.SERVICE4}:443"
KCP6 = f"kcp://[{t.SERVICE6}]:443"
COUNT_TABLE = "pvsrc"

# listen address, what gwA dials, what gwB dials
CASES = {
    "listen-v4": ("0.0.0.0:443", KCP4, KCP4),
    "listen-dual-stack": ("[::]:443", KCP4, KCP6),
}


def count_reply_sources(topo: t.Topology, node: str) -> None:
    """Counters in ``node`` for UDP from port 443: from the service addresses, and all."""
    script = (
        f"table inet {COUNT_TABLE} {{\n chain input {{\n"
        "  type filter hook input priority -10;\n"
        f"  udp sport 443 ip saddr {t.SERVICE4} counter\n"
        f"  udp sport 443 ip6 saddr {t.SERVICE6} counter\n"
        "  udp sport 443 counter\n }\n}\n"
    )
    topo.run(node, ["nft", "-f", "-"], input=script, timeout=10)


def reply_sources(topo: t.Topology, node: str) -> tuple[int, int]:
    """(datagrams from the service addresses, datagrams from port 443 at all)."""
    out = topo.run(node, ["nft", "list", "table", "inet", COUNT_TABLE], timeout=10).stdout
    service4, service6, total = (int(n) for n in re.findall(r"counter packets (\d+)", out))
    return service4 + service6, total


@contextlib.contextmanager
def service_vpn(work: Path, keys: Path, listen: str, dial_a: str, dial_b: str
                ) -> Iterator[Vpn]:
    topo = t.Topology(log_dir=work / "logs", service_address=True)
    with t.built(topo):
        v = Vpn(topo, work, keys)
        router = t.router_config(keys, listen=listen, stats_interval=1)
        router["kcp"]["enable"] = True
        v.router_cfg = t.write_json(work / "config.json", router)
        for node, side, dial in (("gwA", "A", dial_a), ("gwB", "B", dial_b)):
            cfg = t.gateway_config(side, keys, route_server=dial, stats_interval=1,
                                   heartbeat_interval=1, heartbeat_timeout=3)
            v.gw_cfg[node] = t.write_json(work / f"gateway-{side.lower()}.json", cfg)
            count_reply_sources(topo, node)
        v.start_router()
        v.start_gateway("gwA")
        v.start_gateway("gwB")
        assert v.wait_ping("hostA", t.HOST_B, deadline=15) is not None, v.logs()
        yield v


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def svpn(request, tmp_path_factory, keys):
    listen, dial_a, dial_b = CASES[request.param]
    with service_vpn(tmp_path_factory.mktemp("svc"), keys, listen, dial_a, dial_b) as v:
        v.dialled = {"gwA": dial_a, "gwB": dial_b}  # type: ignore[attr-defined]
        yield v


def test_gateways_register_over_kcp_to_the_service_address(svpn):
    for gw_tun in (t.GW_A_TUN4, t.GW_B_TUN4):
        line = t.find_log_line(svpn.router.log_path, f"registered gateway={gw_tun}",
                               "transport=kcp")
        assert line, t.log_tail(svpn.router.log_path)


@pytest.mark.parametrize(
    "src,dst",
    [("hostA", t.HOST_B), ("hostB", t.HOST_A), ("hostA", t.HOST_B6), ("hostB", t.HOST_A6)],
    ids=["v4-A-to-B", "v4-B-to-A", "v6-A-to-B", "v6-B-to-A"],
)
def test_ping(svpn, src, dst):
    res = svpn.topo.ping(src, dst, count=3, wait=2)
    assert res.returncode == 0, f"ping {src} -> {dst} failed:\n{res.stdout}\n{svpn.logs()}"


def test_transfer_sha256_and_every_reply_from_the_service_address(svpn):
    size = 8 * 1024 * 1024
    for src, dst, addr in (("hostA", "hostB", t.HOST_B), ("hostB", "hostA", t.HOST_A6)):
        res = svpn.topo.transfer(src, dst, addr, size, timeout=120)
        assert res["ok"], f"{src} -> {dst}: {res}\n{svpn.logs()}"
    for gw in ("gwA", "gwB"):
        from_service, total = reply_sources(svpn.topo, gw)
        # thousands of datagrams each way (fewer packets here: UDP_SEGMENT batches cross
        # the veth whole)
        assert total > 100, (gw, total)
        assert from_service == total, f"{gw}: {total - from_service} replies from elsewhere"


def test_session_closed_when_its_address_goes_and_the_gateway_reconnects(svpn):
    """gwB's dialled address leaves the router: the router closes that session at its next
    reply (it does not answer from a link address), and gwB comes back once the address
    does."""
    dial = svpn.dialled["gwB"]
    address = t.SERVICE6 if dial == KCP6 else t.SERVICE4
    plen = "128" if ":" in address else "32"
    log = Path(svpn.router.log_path)
    before = log.read_text(errors="replace").count(f"registered gateway={t.GW_B_TUN4}")
    svpn.topo.run("router", ["ip", "addr", "del", f"{address}/{plen}", "dev", "lo"])
    try:
        # traffic toward gwB: the router must send to it, from an address it no longer has
        svpn.topo.ping("hostA", t.HOST_B, count=3, wait=1)
        line = t.find_log_line(log, "is no longer local", "closing the session")
        deadline = time.monotonic() + 10
        while line is None and time.monotonic() < deadline:
            svpn.topo.ping("hostA", t.HOST_B, count=1, wait=1)
            line = t.find_log_line(log, "is no longer local", "closing the session")
        # (with listen-v4 gwA dialled that address too: its session goes the same way)
        assert line, t.log_tail(log)
    finally:
        svpn.topo.run("router", ["ip", "addr", "add", f"{address}/{plen}", "dev", "lo",
                                 *(["nodad"] if plen == "128" else [])])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count(f"registered gateway={t.GW_B_TUN4}") > before:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"gwB did not reconnect\n{svpn.logs()}")
    assert svpn.wait_ping("hostA", t.HOST_B, deadline=15) is not None, svpn.logs()
    assert svpn.wait_ping("hostB", t.HOST_A, deadline=15) is not None, svpn.logs()

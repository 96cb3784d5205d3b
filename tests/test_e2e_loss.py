"""kcp:// under loss and delay, through the userspace impairment element (tests/impair.py).

    hostA -- gwA ==kcp==> [imp: 20 ms each way, loss] ==> router <==tls== gwB -- hostB

Loss comes from the kernel (nftables numgen) on the imp middlebox, delay from the element,
so both transports would see exactly the same path.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

try:
    import topology as t
    from test_e2e import keys, running_vpn  # noqa: F401
except ImportError:
    from tests import topology as t
    from tests.test_e2e import keys, running_vpn  # noqa: F401

pytestmark = [pytest.mark.netns]
if not t.have_netns_support()[0]:
    pytestmark.append(pytest.mark.skip(reason=t.have_netns_support()[1]))

KCP_A = f"kcp://{t.ROUTER_UL_A}:443"


def wait_stats(path: Path, after: float, timeout: float = 5.0) -> dict[str, str]:
    """The first stats line written after ``after`` (wall clock, from the log's mtime)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.stat().st_mtime > after:
            time.sleep(0.05)
            return t.last_stats(path)
        time.sleep(0.1)
    return t.last_stats(path)


@pytest.fixture(scope="module")
def lossy(tmp_path_factory, keys):
    router = t.router_config(keys, stats_interval=1)
    router["kcp"]["enable"] = True
    gw_a = t.gateway_config("A", keys, route_server=KCP_A, stats_interval=1)
    with running_vpn(
        tmp_path_factory.mktemp("lossy"), keys, router=router, gw_a=gw_a, impair_delay_ms=20
    ) as v:
        yield v


def test_delay_is_on_the_path(lossy):
    st = lossy.topo.ping_stats("hostA", t.HOST_B, count=10, interval=0.05)
    assert st["received"] == 10, st["stdout"]
    assert st["rtt_min"] >= 40.0, f"the 2x20 ms delay is missing: {st['rtt_min']} ms"


def test_adaptive_fec_stays_at_zero_parity_on_a_clean_link(lossy):
    res = lossy.topo.transfer("hostA", "hostB", t.HOST_B, 2 * 1024 * 1024, timeout=60)
    assert res["ok"], (res, lossy.logs())
    log = Path(lossy.gw["gwA"].log_path)
    stats = wait_stats(log, time.time())
    assert stats.get("transport") == "kcp" and stats.get("fec") == "on", stats
    assert stats["fec_parity"] == "0", stats
    assert int(stats["fec_parity_sent"]) == 0, stats
    assert int(stats["fec_data_sent"]) > 1000, stats


def test_20mb_at_5pct_loss_and_20ms_delay(lossy):
    topo = lossy.topo
    topo.set_loss(5)
    try:
        size = 20 * 1024 * 1024
        res = topo.transfer("hostA", "hostB", t.HOST_B, size, timeout=240)
        assert res["received"]["bytes"] == size, (res, lossy.logs())
        assert res["ok"], f"SHA-256 mismatch: {res}"
        assert topo.loss_stats() > 100, "the loss rule dropped nothing"
        print(f"20 MB over kcp:// at 5% loss, 2x20 ms: {res['mbit_s']:.1f} Mbit/s")
        # adaptive FEC saw the loss: parity went up and repaired shards on both ends
        log = Path(lossy.gw["gwA"].log_path)
        stats = wait_stats(log, time.time())
        assert int(stats["fec_parity_sent"]) > 0, stats
        assert int(stats["fec_recovered"]) > 0, stats
        router = t.last_stats(lossy.router.log_path)
        assert int(router["fec_recovered"]) > 0, router
        assert int(router["fec_parity_sent"]) > 0, router
        st = topo.ping_stats("hostA", t.HOST_B, count=50, interval=0.02)
        assert st["received"] >= 45, st["stdout"]
    finally:
        topo.set_loss(None)


def test_unordered_delivery_under_loss(tmp_path_factory, keys):
    """kcp.unordered on both ends: the gateway and the router agree it in AUTH, a transfer
    at 5 % loss arrives whole, and the gateway took messages ahead of a hole."""
    router = t.router_config(keys, stats_interval=1)
    router["kcp"]["enable"] = True
    router.setdefault("kcp", {})["unordered"] = True
    gw_a = t.gateway_config("A", keys, route_server=KCP_A, stats_interval=1)
    gw_a.setdefault("kcp", {})["unordered"] = True
    with running_vpn(
        tmp_path_factory.mktemp("unordered"), keys, router=router, gw_a=gw_a,
        impair_delay_ms=20,
    ) as v:
        log = Path(v.gw["gwA"].log_path)
        line = t.find_log_line(log, "registered with router")
        assert line is not None and "unordered" in line, line
        v.topo.set_loss(5)
        try:
            size = 8 * 1024 * 1024
            res = v.topo.transfer("hostA", "hostB", t.HOST_B, size, timeout=240)
            assert res["received"]["bytes"] == size, (res, v.logs())
            assert res["ok"], f"SHA-256 mismatch: {res}"
            # the other way too: the router's data to gwA goes unordered as well
            back = v.topo.transfer("hostB", "hostA", t.HOST_A, 2 * 1024 * 1024, timeout=240)
            assert back["ok"], (back, v.logs())
            stats = wait_stats(log, time.time())
            assert stats.get("kcp_unordered") == "1", stats
            assert int(stats["kcp_early"]) > 0, stats
        finally:
            v.topo.set_loss(None)

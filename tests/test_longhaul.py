"""kcp:// on a long-haul line (issue 16): a rate-limited, delayed, lossy underlay.

    hostA -- gwA ==kcp==> [imp: 30 Mbit/s, 100 ms queue, 20 ms each way, 2% loss] ==> router
                                                                 <==kcp== gwB -- hostB

The line is ``Topology.set_line`` (tests/topology.py): tbf on the impairment element's TUNs
in the middlebox imp, delay from the element, random loss from nftables.  With
``Topology(shared_line=True)`` gwB sits behind the same line, and both offices send to the
host ``vpc`` behind the router's own TUN.

The first group checks the line itself with plain routing (rate, delay, bounded queue,
gwB on the shared line); the next runs SHA-256-checked transfers over kcp:// on the line,
from one gateway and from two at once, and prints what iperf3 gets.  Issue 16's figures (a
cubic sender over kcp:// gets at least 60% of the line, two gateways on one line each
35-65%, a plain TCP flow keeps 25%, ping p99 within base RTT + 60 ms) are speed targets:
as the developers' guide has it, they are measured (``pytest -m bench``, and `make longhaul`
for the whole table, tests/bench_longhaul.py) and not asserted in the CI run, where two
cores shared with the rest of the suite make them vary by a third.  The controller's own
behaviour is asserted deterministically on simulated lines (tests/test_kcp_congestion_sim.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

try:
    import bench_longhaul as bl
    import topology as t
except ImportError:
    from tests import bench_longhaul as bl
    from tests import topology as t

_ok, _reason = t.daemons_ready()
for _cmd in ("iperf3", "nft", "tc"):
    if _ok and shutil.which(_cmd) is None:
        _ok, _reason = False, f"{_cmd!r} not found"
netns = pytest.mark.netns
needs_netns = pytest.mark.skipif(not _ok, reason=_reason)

RATE = 30.0
LINE = t.Line(RATE, delay_ms=20, loss_pct=2)  # 40 ms round trip, 2% loss each way
CLEAN = t.Line(RATE, delay_ms=LINE.delay_ms)  # while the tunnels connect
SECONDS = 15  # the CI measurements
FILL_SHARE = 0.6  # a cubic sender over kcp:// reaches this share of the line
SHARE_RANGE = bl.SHARE_RANGE  # each of two gateways on one line
XFER_BYTES = 8 * 1024 * 1024


# ====================================================================== unit tests
def test_line_queue_and_burst_follow_the_rate() -> None:
    line = t.Line(30, delay_ms=65, loss_pct=3)
    assert line.bytes_per_s == 3_750_000
    assert line.queue_bytes == 375_000  # 100 ms at 30 Mbit/s
    assert line.burst_bytes == 4500  # three packets (1 ms would be 3750 B)
    fast = t.Line(1000, queue_ms=50)
    assert fast.burst_bytes == 125_000 and fast.queue_bytes == 6_250_000
    slow = t.Line(1, queue_ms=10)  # 1250 B would not even hold the burst
    assert slow.queue_bytes == slow.burst_bytes + 2 * t.LINE_MTU
    assert line.impair_params() == {"delay_ms": 65}
    assert line.label() == "30 Mbit/s, 65 ms, 3%"


def test_line_bursty_loss_parameters() -> None:
    ge = t.Line(30, delay_ms=65, ge_gb_pct=0.6, ge_bg_pct=20)
    assert ge.bursty and ge.ge_mean_burst == 5
    assert ge.ge_mean_loss_pct == pytest.approx(100 * 0.6 / 20.6)
    assert ge.impair_params() == {"delay_ms": 65, "ge_gb_pct": 0.6, "ge_bg_pct": 20,
                                  "ge_loss_good_pct": 0.0, "ge_loss_bad_pct": 100.0}
    assert ge.label() == "30 Mbit/s, 65 ms, GE 2.9% (bursts of 5)"
    assert t.Line(30).ge_mean_loss_pct == 0 and t.Line(30).label() == "30 Mbit/s, 0 ms, no loss"
    for bad in ({"rate_mbit": 0}, {"rate_mbit": 30, "loss_pct": 101},
                {"rate_mbit": 30, "queue_ms": 0}, {"rate_mbit": 30, "delay_ms": -1}):
        with pytest.raises(ValueError):
            t.Line(**bad)


def test_iperf3_received_reads_the_receivers_intervals() -> None:
    text = """Accepted connection from 198.18.10.2, port 49504
[  5] local 198.18.20.2 port 5201 connected to 198.18.10.2 port 49520
[ ID] Interval           Transfer     Bitrate
[  5]   0.00-0.50   sec   632 KBytes  10.4 Mbits/sec
[  5]   0.50-1.00   sec  1.57 MBytes  26.3 Mbits/sec
[  5]   1.00-1.50   sec  60.0 KBytes   983 Kbits/sec
[  5]   1.50-2.00   sec   760 MBytes  12.7 Gbits/sec
[  5]   2.00-2.01   sec  10.1 KBytes  8.1 Mbits/sec
- - - - - - - - - - - - - - - - - - - - - - - - -
[ ID] Interval           Transfer     Bitrate
[  5]   0.00-2.01   sec  2.76 MBytes  11.5 Mbits/sec                  receiver
"""
    got = t.iperf3_received({"server_output_text": text})
    assert got == [(0.5, 10.4), (1.0, 26.3), (1.5, pytest.approx(0.983)), (2.0, 12700.0)]
    assert t.iperf3_received({}) == []


# ==================================================================== netns: the line
def _mbit(data: dict) -> float:
    return data["end"]["sum_received"]["bits_per_second"] / 1e6


@netns
@needs_netns
def test_line_has_its_rate_delay_and_a_bounded_queue(tmp_path: Path) -> None:
    """Plain routing over the line, no loss: bbr fills it; cubic fills the queue, which
    adds at most queue_ms to the round trip."""
    line = t.Line(RATE, delay_ms=20)
    topo = t.Topology(log_dir=tmp_path / "logs", impair=True)
    with t.built(topo):
        topo.enable_plain_routing()
        topo.set_line(line)
        idle = topo.ping_stats("hostA", t.HOST_B, count=10, interval=0.05)
        assert idle["received"] == 10, idle["stdout"]
        assert 2 * line.delay_ms <= idle["rtt_min"] < 2 * line.delay_ms + 10, idle
        bbr = _mbit(topo.start_iperf3("hostA", "hostB", t.HOST_B, seconds=5,
                                      congestion="bbr").result())
        # TCP/IP headers: 1448 of every 1500 line bytes are goodput
        assert 0.85 * RATE <= bbr <= RATE, f"bbr over the line: {bbr:.1f} Mbit/s"
        run = topo.start_iperf3("hostA", "hostB", t.HOST_B, seconds=6, congestion="cubic")
        loaded = topo.ping_stats("hostA", t.HOST_B, count=40, interval=0.1)
        cubic = _mbit(run.result())
        assert cubic >= 0.8 * RATE, f"cubic over the line: {cubic:.1f} Mbit/s"
        # the queue fills (cubic fills any drop-tail queue) and never holds more than
        # queue_ms (the ping shares it with the data one way only)
        assert loaded["rtt_max"] > idle["rtt_min"] + 0.3 * line.queue_ms, loaded
        assert loaded["rtt_max"] < idle["rtt_min"] + line.queue_ms + 25, loaded
        assert topo.line_drops()["queue"] > 0
        topo.set_line(t.Line(RATE, delay_ms=20, loss_pct=10))
        topo.ping_stats("hostA", t.HOST_B, count=100, interval=0.01)
        assert topo.line_drops()["random"] > 0
        topo.clear_line()
        assert topo.ping_stats("hostA", t.HOST_B, count=5, interval=0.05)["rtt_max"] < 10


@netns
@needs_netns
def test_shared_line_carries_both_gateways(tmp_path: Path) -> None:
    """gwB behind the same line: its underlay has the line's delay, its traffic enters the
    same queue, and gwA and gwB reach each other only through the router."""
    topo = t.Topology(log_dir=tmp_path / "logs", shared_line=True)
    with t.built(topo):
        assert topo.impair
        topo.set_line(t.Line(RATE, delay_ms=15))
        for gw, router_addr in (("gwA", t.ROUTER_UL_A), ("gwB", t.ROUTER_UL_B)):
            st = topo.ping_stats(gw, router_addr, count=5, interval=0.05)
            assert st["received"] == 5 and st["rtt_min"] >= 30, (gw, st)
        rules = topo.run(t.IMP_NODE, ["ip", "rule"]).stdout
        assert f"iif {t.IMP_IF_B} lookup {t.IMP_TABLES['up']}" in rules, rules
        topo.enable_plain_routing()
        st = topo.ping_stats("hostA", t.HOST_B, count=5, interval=0.05)
        assert st["received"] == 5 and st["rtt_min"] >= 60, st  # up and down the line twice
        before = topo.impair_stats()["up"]["received"]
        topo.ping_stats("gwB", t.ROUTER_UL_B, count=20, interval=0.01)
        assert topo.impair_stats()["up"]["received"] - before >= 20


# ============================================================ netns: kcp:// on the line
@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bl.keygen(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def kcp_line(tmp_path_factory: pytest.TempPathFactory, keys: Path):
    """kcp:// between both gateways and the router, gwA's underlay the long-haul line."""
    if not _ok:
        pytest.skip(_reason)
    work = tmp_path_factory.mktemp("kcp-line")
    topo = t.Topology(log_dir=work / "logs", impair=True)
    with t.built(topo):
        topo.set_line(CLEAN)
        bl.start_polevpn(topo, work, keys, "kcp")
        topo.set_line(LINE)
        yield topo


@pytest.fixture(scope="module")
def shared_kcp_line(tmp_path_factory: pytest.TempPathFactory, keys: Path):
    """gwA and gwB on kcp:// behind one line, both offices reaching the vpc host."""
    if not _ok:
        pytest.skip(_reason)
    work = tmp_path_factory.mktemp("shared-line")
    topo = t.Topology(log_dir=work / "logs", shared_line=True)
    with t.built(topo):
        topo.add_vpc()
        topo.set_line(CLEAN)
        bl.start_polevpn(topo, work, keys, "kcp", vpc=True)
        assert topo.wait_ping("hostB", t.VPC_HOST, deadline=20) is not None
        topo.set_line(LINE)
        yield topo


def _shares(topo: t.Topology, seconds: float) -> dict[str, float]:
    """Both offices send to the vpc host at once (cubic); each one's Mbit/s."""
    runs = {gw: topo.start_iperf3(host, "vpc", t.VPC_HOST, seconds=seconds,
                                  port=bl.VPC_PORTS[gw], congestion="cubic")
            for gw, host in (("gwA", "hostA"), ("gwB", "hostB"))}
    return {gw: _mbit(run.result()) for gw, run in runs.items()}


@netns
@needs_netns
def test_kcp_transfer_over_a_lossy_line(kcp_line: t.Topology) -> None:
    topo = kcp_line
    xfer = topo.transfer("hostA", "hostB", t.HOST_B, XFER_BYTES, timeout=120)
    assert xfer["received"]["bytes"] == XFER_BYTES, xfer
    assert xfer["ok"], f"SHA-256 mismatch: {xfer}"
    got = _mbit(topo.start_iperf3("hostA", "hostB", t.HOST_B, seconds=SECONDS,
                                  congestion="cubic").result())
    assert got > 0
    print(f"kcp:// on {LINE.label()}: iperf3 cubic {got:.1f} Mbit/s ({got / RATE:.0%}), "
          f"8 MiB transfer {xfer['mbit_s']:.1f} Mbit/s, line drops {topo.line_drops()}")


@netns
@needs_netns
@pytest.mark.bench
def test_kcp_fills_a_lossy_line_with_a_cubic_sender(kcp_line: t.Topology) -> None:
    topo = kcp_line
    xfer = topo.transfer("hostA", "hostB", t.HOST_B, XFER_BYTES, timeout=120)
    assert xfer["ok"], f"SHA-256 mismatch: {xfer}"
    got = _mbit(topo.start_iperf3("hostA", "hostB", t.HOST_B, seconds=SECONDS,
                                  congestion="cubic").result())
    drops = topo.line_drops()
    print(f"kcp:// on {LINE.label()}: iperf3 cubic {got:.1f} Mbit/s ({got / RATE:.0%}), "
          f"8 MiB transfer {xfer['mbit_s']:.1f} Mbit/s, line drops {drops}")
    assert got >= FILL_SHARE * RATE, (
        f"kcp:// with a cubic sender: {got:.1f} Mbit/s of the {RATE:g} Mbit/s line "
        f"({got / RATE:.0%} < {FILL_SHARE:.0%}); line drops {drops}")


@netns
@needs_netns
def test_two_kcp_gateways_transfer_at_once_over_one_line(shared_kcp_line: t.Topology) -> None:
    topo = shared_kcp_line
    xfers = {gw: topo.start_transfer(host, "vpc", t.VPC_HOST, XFER_BYTES // 2, rate=0,
                                     port=port, timeout=120)
             for gw, host, port in (("gwA", "hostA", 5097), ("gwB", "hostB", 5096))}
    for gw, x in xfers.items():
        res = x.result()
        assert res["ok"], f"{gw}: SHA-256 transfer to the vpc host failed: {res}"
        print(f"{gw}: {XFER_BYTES // 2 >> 20} MiB to the vpc host: {res}")


@netns
@needs_netns
@pytest.mark.bench
def test_two_kcp_gateways_share_one_line(shared_kcp_line: t.Topology) -> None:
    topo = shared_kcp_line
    got = _shares(topo, SECONDS)
    total = sum(got.values())
    share = {gw: v / total for gw, v in got.items()}
    print(f"two kcp:// gateways on {LINE.label()}, {SECONDS} s: "
          + ", ".join(f"{gw} {v:.1f} Mbit/s ({share[gw]:.0%})" for gw, v in got.items()))
    lo, hi = SHARE_RANGE
    assert all(lo <= s <= hi for s in share.values()), (
        f"unfair: {got} Mbit/s, shares {share}, not all within {lo:.0%}-{hi:.0%}")


# ====================================================== bench: the 30 s measurements
@netns
@needs_netns
@pytest.mark.bench
def test_two_kcp_gateways_share_one_line_over_30s(shared_kcp_line: t.Topology) -> None:
    got = _shares(shared_kcp_line, 30)
    total = sum(got.values())
    lo, hi = SHARE_RANGE
    print(f"two kcp:// gateways on {LINE.label()}, 30 s: {got} Mbit/s")
    assert all(lo <= v / total <= hi for v in got.values()), (
        f"unfair over 30 s: {got} Mbit/s, not each {lo:.0%}-{hi:.0%} of {total:.1f}")


@netns
@needs_netns
@pytest.mark.bench
def test_plain_tcp_keeps_a_quarter_of_the_line_next_to_kcp(kcp_line: t.Topology) -> None:
    # on the clean line (TCP alone fills it): on LINE the 2 % loss alone holds a cubic TCP
    # to about a tenth of the line, whatever shares it (bench_longhaul.TCP_SHARE_LINES)
    kcp_line.set_line(CLEAN)
    try:
        tcp = kcp_line.start_iperf3("gwA", "router", t.ROUTER_UL_A, seconds=30,
                                    port=bl.TCP_SHARE_PORT, congestion="cubic")
        kcp = kcp_line.start_iperf3("hostA", "hostB", t.HOST_B, seconds=30,
                                    congestion="cubic")
        tcp_mbit, kcp_mbit = _mbit(tcp.result()), _mbit(kcp.result())
    finally:
        kcp_line.set_line(LINE)
    print(f"plain TCP {tcp_mbit:.1f} Mbit/s next to kcp:// {kcp_mbit:.1f} Mbit/s")
    assert tcp_mbit >= bl.TCP_MIN_SHARE * RATE, (
        f"plain TCP got {tcp_mbit:.1f} Mbit/s ({tcp_mbit / RATE:.0%} of the line, less than "
        f"{bl.TCP_MIN_SHARE:.0%}) next to kcp:// {kcp_mbit:.1f} Mbit/s")


@netns
@needs_netns
@pytest.mark.bench
def test_ping_under_load_stays_within_base_rtt_plus_60ms(kcp_line: t.Topology) -> None:
    topo = kcp_line
    base = bl.base_rtt(topo)
    assert base["p50_ms"] is not None, base
    cell = bl.measure(topo, "cubic", 20, None)
    assert "error" not in cell, cell
    print(f"idle {base['p50_ms']} ms; under load p50 {cell['p50_ms']} p99 {cell['p99_ms']} ms, "
          f"{cell['mbit_s']} Mbit/s")
    limit = base["p50_ms"] + bl.PING_P99_MARGIN_MS
    assert cell["p99_ms"] <= limit, (
        f"ping p99 {cell['p99_ms']} ms under load > {limit:.0f} ms (idle {base['p50_ms']} ms "
        f"+ {bl.PING_P99_MARGIN_MS:g}); p50 {cell['p50_ms']} ms, {cell['mbit_s']} Mbit/s")

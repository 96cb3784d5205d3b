"""The link simulator (tests/linksim.py) itself: its line model against figures worked out by
hand, and two KcpLinks driven end to end through it. No sockets, no clock, no root."""

from __future__ import annotations

import dataclasses
import random

import pytest
from linksim import (
    FRAME_MIN,
    KIND_BULK,
    KIND_PING,
    FlowSpec,
    Line,
    LineParams,
    LinePinger,
    Scenario,
    Sim,
    StreamReceiver,
    make_message,
    percentile,
    run_scenario,
    tbf_limit_bytes,
)

from polevpn.config import FecParams, KcpParams


class Sink:
    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.arrivals: list[tuple[float, int]] = []

    def __call__(self, arg: int) -> None:
        self.arrivals.append((self.sim.now, arg))


def line(sim: Sim, seed: int = 1, **kw) -> Line:
    kw.setdefault("overhead", 0)
    return Line(sim, LineParams(**kw), random.Random(seed))


def constant_source(sim: Sim, ln: Line, sink: Sink, size: int, rate_bps: float, n: int) -> None:
    gap = size * 8 / rate_bps
    for i in range(n):
        sim.at(i * gap, lambda i: ln.send(size, sink, i), i)


# -- the line -----------------------------------------------------------------------------


def test_a_source_above_the_line_rate_is_delivered_at_the_line_rate_not_faster():
    sim = Sim()
    ln = line(sim, rate_bps=10e6, delay_ms=5, queue_ms=None, queue_bytes=None)
    sink = Sink(sim)
    constant_source(sim, ln, sink, 1000, 20e6, 2000)  # 2 s worth at the line rate, in 1 s
    sim.run(10.0)
    times = [t for t, _ in sink.arrivals]
    assert len(times) == 2000 and ln.stats.queue_drops == 0
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # back to back at the rate: 1000 B at 10 Mbit/s = 0.8 ms apart, never closer
    assert min(gaps) == pytest.approx(0.0008, abs=1e-9)
    assert max(gaps) == pytest.approx(0.0008, abs=1e-9)
    assert times[-1] == pytest.approx(2000 * 0.0008 + 0.005)
    assert [i for _, i in sink.arrivals] == list(range(2000))  # FIFO


def test_a_source_below_the_line_rate_passes_unqueued():
    sim = Sim()
    ln = line(sim, rate_bps=10e6, delay_ms=5)
    sink = Sink(sim)
    constant_source(sim, ln, sink, 1000, 5e6, 1000)
    sim.run(10.0)
    assert len(sink.arrivals) == 1000
    assert max(ln.stats.queue_delay) == 0.0 and ln.stats.max_queue_bytes == 1000
    # each arrives its serialisation time plus the delay after it was sent
    for t, i in sink.arrivals:
        assert t == pytest.approx(i * 0.0016 + 0.0008 + 0.005)


def test_delay_is_propagation_plus_queueing():
    sim = Sim()
    ln = line(sim, rate_bps=8e6, delay_ms=30, queue_ms=None)
    sink = Sink(sim)
    for i in range(10):  # a burst at t=0: 1000 B take 1 ms each
        ln.send(1000, sink, i)
    sim.run(1.0)
    for t, i in sink.arrivals:
        assert t == pytest.approx(0.030 + (i + 1) * 0.001)
    # the k-th waited k ms before its first bit went out
    assert ln.stats.queue_delay == pytest.approx([i * 0.001 for i in range(10)])
    assert ln.stats.max_queue_bytes == 10_000


def test_overhead_counts_on_the_wire():
    sim = Sim()
    ln = line(sim, rate_bps=8e6, delay_ms=0, overhead=65)
    sink = Sink(sim)
    ln.send(935, sink, 0)
    sim.run(1.0)
    assert sink.arrivals[0][0] == pytest.approx(0.001)  # 1000 B on the wire at 1 MB/s
    assert ln.stats.offered_bytes == 1000 and ln.stats.delivered_bytes == 1000


def test_the_drop_tail_queue_drops_what_exceeds_its_bound():
    sim = Sim()
    ln = line(sim, rate_bps=8e6, delay_ms=10, queue_bytes=10_000, queue_ms=None)
    sink = Sink(sim)
    for i in range(30):
        ln.send(1000, sink, i)
    # 5.5 ms later 5.5 packets have gone: room for 5 more, not 6
    sim.at(0.0055, lambda _: [ln.send(1000, sink, 100 + i) for i in range(10)])
    sim.run(1.0)
    got = [i for _, i in sink.arrivals]
    assert got == list(range(10)) + [100, 101, 102, 103, 104]
    assert ln.stats.queue_drops == 20 + 5 and ln.stats.queue_drop_bytes == 25_000
    assert ln.stats.max_queue_bytes == 10_000 and ln.stats.delivered == 15


def test_a_queue_bounded_in_time_holds_that_long_at_the_rate():
    p = LineParams(rate_bps=8e6, queue_ms=50, queue_bytes=None)
    assert p.limit_bytes == 50_000
    assert LineParams(rate_bps=8e6, queue_ms=50, queue_bytes=20_000).limit_bytes == 20_000
    assert LineParams(rate_bps=None).limit_bytes == float("inf")
    sim = Sim()
    ln = Line(sim, p, random.Random(1))
    sink = Sink(sim)
    for i in range(100):
        ln.send(1000 - p.overhead, sink, i)
    sim.run(1.0)
    assert len(sink.arrivals) == 50 and ln.stats.queue_drops == 50
    assert max(ln.stats.queue_delay) == pytest.approx(0.049)


def test_random_loss_matches_its_rate():
    sim = Sim()
    ln = line(sim, seed=3, rate_bps=None, delay_ms=1, loss_pct=5)
    sink = Sink(sim)
    n = 100_000
    for i in range(n):
        ln.send(100, sink, i)
    sim.run(1.0)
    lost = n - len(sink.arrivals)
    assert lost == ln.stats.random_drops and ln.stats.burst_drops == 0
    # binomial: sigma = 69 packets; 5 sigma either way
    assert abs(lost - 5000) < 350, lost


def bursts(received: set[int], n: int) -> list[int]:
    runs, run = [], 0
    for i in range(n):
        if i in received:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    if run:
        runs.append(run)
    return runs


def test_gilbert_elliott_loss_comes_in_bursts_of_the_configured_mean_length():
    sim = Sim()
    # bad state loses everything and lasts 1/0.25 = 4 packets on average; stationary share
    # of the bad state 0.01 / (0.01 + 0.25) = 3.85%
    ln = line(sim, seed=5, rate_bps=None, delay_ms=1, ge_gb_pct=1, ge_bg_pct=25)
    sink = Sink(sim)
    n = 200_000
    for i in range(n):
        ln.send(100, sink, i)
    sim.run(1.0)
    runs = bursts({i for _, i in sink.arrivals}, n)
    mean = sum(runs) / len(runs)
    assert 3.7 < mean < 4.3, mean
    assert ln.stats.burst_drops == sum(runs) and ln.stats.random_drops == 0
    assert 0.034 < sum(runs) / n < 0.043
    # the same loss rate at random comes in runs of about 1 / (1 - p)
    sim = Sim()
    ln = line(sim, seed=5, rate_bps=None, delay_ms=1, loss_pct=3.85)
    sink = Sink(sim)
    for i in range(n):
        ln.send(100, sink, i)
    sim.run(1.0)
    runs = bursts({i for _, i in sink.arrivals}, n)
    assert sum(runs) / len(runs) < 1.1


def test_loss_after_the_queue_takes_capacity_before_it_does_not():
    def run(before: bool) -> Line:
        sim = Sim()
        ln = line(sim, rate_bps=8e6, delay_ms=1, loss_pct=50, loss_before_queue=before,
                  queue_ms=None)
        for i in range(100):
            ln.send(1000, Sink(sim), i)
        sim.run(1.0)
        return ln

    after, before = run(False), run(True)
    assert len(after.stats.queue_delay) == 100  # every packet went through the queue
    assert 30 < len(before.stats.queue_delay) < 70  # only those not lost
    assert after.stats.random_drops + after.stats.delivered == 100


def test_line_params_are_checked():
    with pytest.raises(ValueError, match="loss_pct"):
        LineParams(loss_pct=101)
    with pytest.raises(ValueError, match="ge_bg_pct"):
        LineParams(ge_gb_pct=1)
    with pytest.raises(ValueError, match="rate_bps"):
        LineParams(rate_bps=0)


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    xs = [float(i) for i in range(1, 101)]
    assert (percentile(xs, 50), percentile(xs, 99), percentile(xs, 100)) == (50.0, 99.0, 100.0)
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0


# -- the stream checks --------------------------------------------------------------------


class FakeEndpoint:
    flow_index = 0

    def __init__(self) -> None:
        self.got: list[tuple[int, int]] = []

    def on_message(self, kind, seq, t_sent, size, now):
        self.got.append((kind, seq))


def test_the_receiver_accepts_the_stream_in_any_split():
    ep = FakeEndpoint()
    rx = StreamReceiver(ep)  # type: ignore[arg-type]
    data = b"".join(make_message(KIND_BULK, 0, i, 0.5, 1300) for i in range(5))
    data += make_message(KIND_PING, 0, 0, 0.5, 64)
    for i in range(0, len(data), 777):
        rx.consume(data[i : i + 777], 1.0)
    assert ep.got == [(KIND_BULK, i) for i in range(5)] + [(KIND_PING, 0)]
    assert rx.errors == 0 and not rx.buf


@pytest.mark.parametrize("fault", ["flip", "reorder", "gap", "other_flow"])
def test_the_receiver_catches_corruption_and_disorder(fault):
    msgs = [make_message(KIND_BULK, 0, i, 0.0, 200) for i in range(4)]
    if fault == "flip":
        m = bytearray(msgs[2])
        m[100] ^= 1
        msgs[2] = bytes(m)
    elif fault == "reorder":
        msgs[1], msgs[2] = msgs[2], msgs[1]
    elif fault == "gap":
        del msgs[1]
    else:
        msgs[2] = make_message(KIND_BULK, 1, 2, 0.0, 200)
    ep = FakeEndpoint()
    rx = StreamReceiver(ep)  # type: ignore[arg-type]
    rx.consume(b"".join(msgs), 1.0)
    assert rx.errors == 1 and rx.error is not None
    assert len(ep.got) < 4
    assert FRAME_MIN == 20


# -- end to end: two KcpLinks through the lines ------------------------------------------


def bulk_bytes(r) -> int:
    return sum(f.delivered_bytes for f in r.flows)


def test_the_stream_arrives_complete_and_in_order_over_a_clean_fast_line():
    sc = Scenario(rate_bps=1e9, rtt_ms=10, seconds=0.5, queue_ms=None)
    r = run_scenario(sc)
    f = r.flows[0]
    assert r.errors == 0 and f.error is None and f.dead_at is None
    # every message checked; with a 512-segment window and 10 ms RTT KCP moves about
    # 512 x 1300 B per RTT: over 10 MB in 0.5 s
    assert f.delivered_bytes > 10_000_000 and f.delivered_bytes % 1300 == 0
    assert r.up.drops == 0 and r.down.drops == 0
    # nothing sent twice; at the end some segments may still wait for the pacing
    assert f.retransmission_ratio <= 0.0 and f.push_segments <= f.new_segments
    assert f.timeout_retransmissions == 0


@pytest.mark.parametrize("fec", ["off", "adaptive"])
def test_the_stream_arrives_complete_and_in_order_over_a_lossy_line(fec):
    sc = Scenario(rate_bps=None, rtt_ms=40, loss_pct=5, seconds=3.0, fec=fec)
    r = run_scenario(sc)
    f = r.flows[0]
    assert r.errors == 0 and f.error is None and f.dead_at is None
    assert f.delivered_bytes > 5_000_000
    assert r.up.random_drops > 100 and r.down.random_drops > 10
    assert f.push_segments > f.new_segments  # lost segments were sent again
    if fec == "adaptive":
        assert f.fec is not None and f.fec["state"] == "on"
        assert f.fec["recovered"] > 0 and f.parity_records > 0


def test_records_arriving_together_are_settled_together():
    """On a line without a rate a whole flush arrives at one instant: one settle, so one
    ACK record acknowledges many segments (about 56 ACKs fit a record)."""
    r = run_scenario(Scenario(rate_bps=None, rtt_ms=20, seconds=0.5))
    assert r.errors == 0 and r.up.offered > 5000
    assert r.down.offered < r.up.offered / 20, (r.up.offered, r.down.offered)


def test_the_write_buffer_pauses_at_high_water_and_resumes_at_low_water():
    # without congestion control: the configured marks alone (with it, a time budget
    # lowers them: test_kcp_congestion_sim)
    sc = Scenario(rate_bps=10e6, rtt_ms=40, seconds=3.0, high_water=64_000, low_water=16_000,
                  kcp_options={"congestion": "off"})
    r = run_scenario(sc)
    f = r.flows[0]
    assert r.errors == 0 and f.pause_events > 3
    # it stops with the write that crosses high water
    assert 64_000 < f.max_pending_bytes <= 64_000 + 1300
    default = run_scenario(dataclasses.replace(sc, high_water=1 << 20, low_water=1 << 18))
    assert default.flows[0].max_pending_bytes > 1 << 20


@pytest.mark.timeout(60)
def test_a_timer_due_now_does_not_stall_the_clock():
    """FEC's group timer: next_deadline gives t0 + timeout, poll wants now - t0 >= timeout,
    and at t = 4.0001248 s of this run the two disagree by a rounding error. Timers due now
    run a microsecond later; this run used to spin forever at that instant."""
    sc = Scenario(rate_bps=30e6, rtt_ms=40, loss_pct=2, seconds=5.0, fec="adaptive")
    r = run_scenario(sc)
    assert r.errors == 0 and r.goodput_between(4.0, 5.0) > 0


def test_goodput_never_beats_the_line():
    """By any time t the receiver cannot have more than the line carried: each message took
    its bytes, KCP's header and the overhead on the wire (bins may: a hole filled late
    releases what waited behind it at once)."""
    sc = Scenario(rate_bps=10e6, rtt_ms=40, seconds=5.0, loss_pct=1)
    r = run_scenario(sc)
    assert r.errors == 0 and r.goodput_bps > 1e6
    cum = 0
    for i, b in enumerate(r.bins):
        cum += b
        t = (i + 1) * sc.bin_s - sc.rtt_ms / 2000
        assert cum <= 10e6 / 8 * t * r.ideal_utilisation, (i, cum)
    assert r.utilisation < r.ideal_utilisation
    assert r.up.delivered_bytes <= 10e6 / 8 * sc.seconds


def test_pings_take_the_round_trip_on_an_idle_flow():
    spec = FlowSpec(bulk=False, ping_ms=100)
    sc = Scenario(rate_bps=30e6, rtt_ms=60, seconds=2.0, flow_specs=(spec,), line_ping_ms=50)
    r = run_scenario(sc)
    # 20 pings, 0 s .. 1.9 s; each answered one RTT later (plus two 153-byte serialisations)
    assert len(r.ping_rtt) == 20 and len(r.ping_oneway) == 20
    assert all(0.060 < x < 0.0602 for x in r.ping_rtt), r.ping_rtt
    assert all(0.030 < x < 0.0301 for x in r.ping_oneway), r.ping_oneway
    # 40 line pings, the last (1.95 s) back after the end; every other one sent at the
    # instant a tunnel ping is, and queued behind it for 153 B
    assert len(r.line_ping_rtt) == 39 and all(0.060 < x < 0.0602 for x in r.line_ping_rtt)
    assert r.flows[0].delivered_bytes == 0 and r.errors == 0


def test_line_pings_see_the_bottleneck_queue():
    """A raw source at twice the rate keeps the 50 ms queue full: pings beside it take the
    round trip plus up to the queue's bound."""
    sim = Sim()
    up = line(sim, rate_bps=10e6, delay_ms=20, queue_ms=50)
    down = line(sim, rate_bps=10e6, delay_ms=20, queue_ms=50)
    constant_source(sim, up, Sink(sim), 1000, 20e6, 5000)  # 2 s
    pinger = LinePinger(sim, up, down, 0.05, size=84)
    sim.at(0.0, pinger.start)
    sim.run(1.98)
    rtt = pinger.rtt
    # 39 sent, the last back after the end, a few lost to the full queue (drop-tail)
    assert 30 < len(rtt) < 39
    # the first behind the source's first packet only (both sent at 0, the source's first)
    assert rtt[0] == pytest.approx(0.040 + (1000 + 2 * 84) * 8 / 10e6)
    # once the queue has filled: behind about 50 ms of it (less what drained since the last
    # drop), never more
    assert all(0.085 < x < 0.0902 for x in rtt[5:]), rtt
    assert up.stats.queue_drops > 2000


def test_pings_through_a_loaded_tunnel_wait_behind_its_write_buffer():
    sc = Scenario(rate_bps=10e6, rtt_ms=40, seconds=4.0, ping_ms=50, line_ping_ms=50)
    r = run_scenario(sc)
    assert r.errors == 0 and len(r.ping_rtt) > 5 and len(r.line_ping_rtt) > 70
    assert percentile(r.ping_rtt, 50) > percentile(r.line_ping_rtt, 50) > 0.040


def test_a_rate_limited_source_gets_its_rate():
    spec = FlowSpec(bulk=False, rate_bps=5e6)
    sc = Scenario(rate_bps=30e6, rtt_ms=40, seconds=4.0, flow_specs=(spec,))
    r = run_scenario(sc)
    assert r.errors == 0 and r.flows[0].source_drops == 0
    assert r.goodput_between(1.0, 4.0) == pytest.approx(5e6, rel=0.02)
    assert r.up.queue_drops == 0


def test_an_on_off_source_is_off_half_the_time():
    spec = FlowSpec(bulk=False, rate_bps=4e6, on_s=0.5, off_s=0.5)
    sc = Scenario(rate_bps=30e6, rtt_ms=20, seconds=4.0, flow_specs=(spec,))
    r = run_scenario(sc)
    assert r.errors == 0
    assert r.goodput_between(0.1, 0.5) == pytest.approx(4e6, rel=0.05)
    assert r.goodput_between(0.6, 1.0) == 0.0
    assert r.goodput_between(0.0, 4.0) == pytest.approx(2e6, rel=0.05)


def test_two_flows_share_one_line():
    sc = Scenario(rate_bps=10e6, rtt_ms=40, seconds=4.0, flows=2)
    r = run_scenario(sc)
    assert r.errors == 0 and len(r.flows) == 2
    assert all(f.delivered_bytes > 0 for f in r.flows)
    assert sum(f.share for f in r.flows) == pytest.approx(1.0)
    assert sum(r.shares_between(1.0, 4.0)) == pytest.approx(1.0)
    # together they cannot beat the line
    assert r.goodput_bps <= 10e6 * r.ideal_utilisation


def test_reverse_bulk_flows_both_ways():
    spec = FlowSpec(reverse_bulk=True)
    sc = Scenario(rate_bps=10e6, rtt_ms=20, seconds=2.0, flow_specs=(spec,))
    r = run_scenario(sc)
    f = r.flows[0]
    assert r.errors == 0 and f.delivered_bytes > 500_000 and f.reverse_delivered_bytes > 500_000


def test_the_kcp_params_factory_is_used_per_side():
    seen: list[tuple[int, str]] = []

    def factory(flow: int, side: str) -> KcpParams:
        seen.append((flow, side))
        return KcpParams(send_window=32 if side == "a" else 512, fec=FecParams(mode="off"),
                         congestion="off")

    base = Scenario(rate_bps=30e6, rtt_ms=100, seconds=3.0, kcp_options={"congestion": "off"})
    small = run_scenario(dataclasses.replace(base, kcp_params=factory))
    assert seen == [(0, "a"), (0, "b")]
    # 32 segments of 1300 B per 100 ms round trip: about 3.3 Mbit/s at most
    assert small.goodput_bps < 3.5e6 and small.up.queue_drops == 0
    assert run_scenario(base).goodput_bps > 3 * small.goodput_bps
    # kcp_options: the same through the default params, on both sides
    opt = run_scenario(
        dataclasses.replace(base, kcp_options={"send_window": 32, "congestion": "off"})
    )
    assert opt.summary()["flows"] == small.summary()["flows"]


def test_tbf_limit_matches_the_topology_rate_limit():
    assert tbf_limit_bytes(30e6) == 187_500 + 37_500
    assert tbf_limit_bytes(1e6) == 6_250 + 32 * 1024


def test_the_same_seed_gives_the_same_run_and_another_seed_another():
    sc = Scenario(rate_bps=10e6, rtt_ms=40, loss_pct=3, seconds=2.0, fec="adaptive",
                  ping_ms=100, ge_gb_pct=0.5, ge_bg_pct=30)

    def figures(r) -> dict:
        s = r.summary()
        del s["cpu_s"]
        return s

    a, b = run_scenario(sc), run_scenario(sc)
    assert figures(a) == figures(b) and a.bins == b.bins and a.ping_rtt == b.ping_rtt
    c = run_scenario(dataclasses.replace(sc, seed=2))
    assert figures(c) != figures(a)

"""The kcp:// congestion controller (polevpn.kcp.congestion.Bbr) on its own: rate samples
in, state, pacing rate and in-flight cap out. No KCP, no sockets, no clock.

``Path`` makes the samples a steady path would: an ACK batch every ``step`` seconds, each
delivering what the line carried in that time, with the sample's interval one RTT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from polevpn.kcp.congestion import (
    DRAIN,
    HIGH_GAIN,
    MIN_RTT_WINDOW,
    PROBE_BW,
    PROBE_RTT,
    STARTUP,
    Bbr,
    RateSample,
)

MSS = 1315


@dataclass
class Path:
    rate: float  # bytes/s the line delivers
    rtt: float  # s
    step: float = 0.005
    now: float = 0.0
    delivered: int = 0

    def __post_init__(self) -> None:
        self.history: list[tuple[float, int]] = [(0.0, 0)]

    def sample(
        self,
        rate: float | None = None,
        rtt: float | None = None,
        app_limited: bool = False,
        retrans: bool = False,
    ) -> RateSample:
        """The next ACK batch: ``rate`` bytes/s delivered over the last step, samples taken
        over one round trip (what was delivered since the newest acked segment was sent)."""
        rate = self.rate if rate is None else rate
        rtt = self.rtt if rtt is None else rtt
        self.now += self.step
        acked = int(rate * self.step)
        self.delivered += acked
        self.history.append((self.now, self.delivered))
        t0 = self.now - rtt
        t_prior, prior = max(((t, d) for t, d in self.history if t <= t0 + 1e-9),
                             default=(0.0, 0))
        return RateSample(
            delivered=self.delivered,
            prior_delivered=prior,
            sample_delivered=self.delivered - prior,
            interval_us=round((self.now - t_prior) * 1e6),
            min_rtt_us=round(rtt * 1e6),
            acked=acked,
            app_limited=app_limited,
            retrans=retrans,
        )


def run(cc: Bbr, path: Path, seconds: float, **kw) -> None:
    end = path.now + seconds
    while path.now < end:
        rs = path.sample(**kw)
        cc.on_sample(rs, min(cc.cwnd, int(path.rate * path.rtt)), path.now)


def fresh(max_cwnd: int = 8192 * MSS) -> Bbr:
    return Bbr(MSS, 0.0, max_cwnd, seed=1)


def test_startup_finds_the_rate_then_drains_and_cruises():
    cc = fresh()
    assert cc.state == STARTUP
    path = Path(rate=30e6 / 8, rtt=0.04)
    run(cc, path, 3.0)
    assert cc.filled_pipe
    assert cc.state == PROBE_BW
    assert cc.btl_bw == 30e6 / 8
    assert cc.min_rtt == 0.04
    # about two bandwidth-delay products in flight, and pacing within the probing gains
    bdp = 30e6 / 8 * 0.04
    assert 2 * bdp <= cc.cwnd <= 2 * bdp + 4 * MSS
    assert 0.75 * cc.btl_bw <= cc.pacing_rate <= 1.25 * cc.btl_bw


def test_startup_doubles_the_rate_each_round_trip():
    cc = fresh()
    path = Path(rate=10e9 / 8, rtt=0.1)
    rates = []
    for _ in range(4):
        before = cc.round_count
        while cc.round_count == before:
            # what STARTUP's pacing lets through: the line is far from full yet
            rs = path.sample(rate=min(cc.pacing_rate, path.rate))
            cc.on_sample(rs, cc.cwnd, path.now)
        rates.append(cc.pacing_rate)
    assert cc.state == STARTUP
    for a, b in zip(rates, rates[1:], strict=False):
        assert b >= 1.5 * a, rates


def test_startup_paces_no_slower_than_its_window():
    """A sender inside the tunnel that ramps up (app-limited samples): STARTUP's window
    grows with what is delivered, and the pacing rate lets that window out within a third
    of a round trip, not only at 2.9 x the (lagging) rate estimate."""
    cc = fresh()
    path = Path(rate=50e3, rtt=0.2)
    while path.now < 1.0:  # the inner sender's rate doubles each round trip
        rs = path.sample(rate=path.rate * 2 ** (path.now / path.rtt), app_limited=True)
        cc.on_sample(rs, 0, path.now)
    assert cc.state == STARTUP
    assert cc.cwnd > 1.5 * cc.btl_bw * cc.min_rtt  # the window is ahead of the estimate
    # (the rate is set before the window grows with the same sample)
    assert cc.pacing_rate >= HIGH_GAIN * cc.cwnd / cc.min_rtt * 0.95
    assert cc.pacing_rate > 4 * cc.btl_bw


def test_drain_follows_startup_until_the_queue_is_gone():
    cc = fresh()
    path = Path(rate=10e6 / 8, rtt=0.05)
    seen = set()
    end = 3.0
    while path.now < end:
        rs = path.sample()
        # STARTUP left a queue: in flight is three BDPs until DRAIN has paced slower for
        # a moment
        inflight = int(path.rate * path.rtt * (3 if cc.state == STARTUP else 1))
        cc.on_sample(rs, inflight, path.now)
        seen.add(cc.state)
        if cc.state == DRAIN:
            assert cc.pacing_rate < cc.btl_bw
    assert DRAIN in seen and cc.state == PROBE_BW


def test_random_loss_is_not_congestion():
    """At 10 % random loss the estimate is what gets delivered (90 % of the line), and
    the sender paces at it: no backing off below it, as a loss-based sender would (it
    halves its rate at every loss), and no leaving PROBE_BW."""
    cc = fresh()
    path = Path(rate=20e6 / 8, rtt=0.08)
    run(cc, path, 5.0)
    run(cc, path, 10.0, rate=0.9 * path.rate)  # 10 % of what went out is lost
    assert math.isclose(cc.btl_bw, 0.9 * path.rate, rel_tol=0.02)
    assert cc.pacing_rate >= 0.75 * 0.9 * path.rate
    assert cc.state in (PROBE_BW, PROBE_RTT)


def test_app_limited_samples_do_not_lower_the_estimate():
    cc = fresh()
    path = Path(rate=30e6 / 8, rtt=0.04)
    run(cc, path, 3.0)
    before = cc.btl_bw
    run(cc, path, 3.0, rate=1e6 / 8, app_limited=True)
    assert cc.btl_bw == before


def test_a_resent_segments_sample_is_ignored():
    cc = fresh()
    path = Path(rate=30e6 / 8, rtt=0.04)
    run(cc, path, 3.0)
    before = cc.btl_bw
    # a spurious resend: the ACK of the first transmission makes a sample ten times the line
    rs = path.sample(rate=10 * path.rate, retrans=True)
    cc.on_sample(rs, cc.cwnd, path.now)
    assert cc.btl_bw == before
    rs = path.sample(rate=10 * path.rate)
    cc.on_sample(rs, cc.cwnd, path.now)
    assert cc.btl_bw > 1.5 * before  # without the flag, it would have counted


def test_a_sample_of_resent_segments_does_not_end_a_round_trip():
    """A resent segment's record is taken at the resend; an ACK that was for its first copy
    then looks like the end of a round trip a few ms after the last one. Counted, such
    rounds had STARTUP give up after 1 s at a sixth of a 260 ms line's rate (three
    "rounds" without growth) and the estimate's ten-round window shrink to 100 ms."""
    cc = fresh()
    path = Path(rate=30e6 / 8, rtt=0.26)
    run(cc, path, 0.6)
    rounds = cc.round_count
    rs = path.sample()
    resent = RateSample(
        delivered=rs.delivered + MSS,
        prior_delivered=rs.delivered,  # its record: taken just now, at the resend
        sample_delivered=MSS,
        interval_us=260_000,
        min_rtt_us=-1,
        acked=MSS,
        app_limited=False,
        retrans=True,
    )
    for _ in range(5):
        cc.on_sample(resent, cc.cwnd, path.now)
    assert cc.round_count == rounds
    assert cc.state == STARTUP and not cc.filled_pipe


def test_startup_ends_when_a_queue_forms():
    """The RTT of a round's first samples rises well above the path's: the line is full,
    STARTUP ends there (before three rounds without growth would have overrun the line's
    buffer at 2.89 x its rate)."""
    cc = fresh()
    path = Path(rate=10e9 / 8, rtt=0.04)
    # growing: what STARTUP's pacing lets through, the line far from full
    while path.now < 0.2:
        rs = path.sample(rate=min(cc.pacing_rate, path.rate))
        cc.on_sample(rs, cc.cwnd, path.now)
    assert cc.state == STARTUP
    before = cc.startup_queue_exits
    # the queue: every RTT 10 ms above the path's from now on
    end = path.now + 0.1
    while path.now < end and cc.state == STARTUP:
        rs = path.sample(rate=min(cc.pacing_rate, path.rate), rtt=0.05)
        cc.on_sample(rs, cc.cwnd, path.now)
    assert cc.filled_pipe and cc.state != STARTUP
    assert cc.startup_queue_exits == before + 1


def test_an_app_limited_flow_stays_in_startup_when_its_rtt_rises():
    """A flow that sends less than the line takes (the ACKs of uploads, in bursts) keeps
    STARTUP's pacing when its RTT rises: its estimate is only what it sent, and paced at
    that its bursts queued at the sender (the RTT inside the tunnel grew by 100-400 ms)."""
    cc = fresh()
    path = Path(rate=30e6 / 8, rtt=0.13)
    while path.now < 1.0:
        rs = path.sample(rate=100e3, app_limited=True)
        cc.on_sample(rs, 2 * MSS, path.now)
    assert cc.state == STARTUP
    rate = cc.pacing_rate
    end = path.now + 1.0
    while path.now < end:
        rs = path.sample(rate=100e3, rtt=0.2, app_limited=True)
        cc.on_sample(rs, 2 * MSS, path.now)
    assert cc.state == STARTUP and cc.startup_queue_exits == 0
    assert cc.pacing_rate >= rate


def test_startup_keeps_two_bdps_in_flight_at_most():
    cc = fresh()
    path = Path(rate=30e6 / 8, rtt=0.04)
    for _ in range(40):
        rs = path.sample()
        cc.on_sample(rs, cc.cwnd, path.now)
        if cc.state == STARTUP and cc.btl_bw:
            # the cap, and one batch of ACKs that grew it beyond
            assert cc.cwnd <= 2 * cc.bdp() + 3 * MSS + rs.acked


def test_a_sample_shorter_than_the_rtt_is_ignored():
    cc = fresh()
    path = Path(rate=30e6 / 8, rtt=0.04)
    run(cc, path, 3.0)
    before = cc.btl_bw
    rs = path.sample()
    rs.sample_delivered *= 10
    rs.interval_us = 5000  # a bunch of ACKs over 5 ms, on a 40 ms path
    cc.on_sample(rs, cc.cwnd, path.now)
    assert cc.btl_bw == before


def _corrected(queue_rtt: float) -> tuple[Bbr, Path]:
    """A controller on a 40 ms path whose estimate a shaper's burst made 30 % too high,
    pacing at it with a queue standing (every RTT ``queue_rtt``), until it corrects."""
    cc = fresh()
    path = Path(rate=30e6 / 8, rtt=0.04)
    run(cc, path, 3.0)
    cc._bw_rounds.clear()
    cc._bw_rounds.append((cc.round_count, 1.3 * path.rate))
    cc.btl_bw = 1.3 * path.rate
    end = path.now + 2.0
    while not cc.queue_corrections and path.now < end:
        cc.on_sample(path.sample(rtt=queue_rtt), cc.cwnd, path.now)
    return cc, path


def test_a_standing_queue_brings_an_inflated_estimate_down():
    """Two round trips of a standing queue outside the probing phase: the delivered rate
    (the line's) becomes the estimate, and the draining phase follows."""
    cc, path = _corrected(0.065)  # 25 ms of queue on a 40 ms path
    assert cc.queue_corrections == 1
    assert math.isclose(cc.btl_bw, path.rate, rel_tol=0.1)
    assert cc.pacing_gain == 0.75


def test_a_queue_draining_does_not_shrink_is_not_cut_again():
    """A loss-based flow beside the tunnel keeps the queue full whatever the tunnel sends:
    after two round trips of draining with the queue still there, the next standing queue
    is not cut (the minimum RTT is measured again instead)."""
    cc, path = _corrected(0.09)
    assert cc.queue_corrections == 1 and cc.pacing_gain == 0.75
    end = path.now + 10 * path.rtt
    while path.now < end:
        # the other flow takes more and more of the line
        cc.on_sample(path.sample(rate=0.6 * path.rate, rtt=0.09), cc.cwnd, path.now)
    assert cc.queue_corrections == 1 and cc.foreign_queues >= 1


def test_a_queue_while_probing_is_expected():
    """The 1.25 phase builds a queue on purpose: no correction for it."""
    cc = fresh()
    path = Path(rate=30e6 / 8, rtt=0.04)
    run(cc, path, 3.0)
    cc._cycle_index, cc.pacing_gain = 0, 1.25
    cc._cycle_stamp = path.now + 100  # stay in the probing phase
    for _ in range(100):
        rs = path.sample(rtt=0.065)
        cc.on_sample(rs, cc.cwnd, path.now)
    assert cc.queue_corrections == 0


def test_probe_rtt_after_ten_seconds_without_a_lower_rtt():
    cc = fresh()
    path = Path(rate=30e6 / 8, rtt=0.04)
    run(cc, path, 3.0)
    # from now on every RTT sample is above the minimum (a queue of someone else's)
    states = set()
    end = path.now + MIN_RTT_WINDOW + 2.0
    while path.now < end:
        rs = path.sample(rtt=0.05)
        inflight = cc.cwnd
        cc.on_sample(rs, inflight, path.now)
        states.add(cc.state)
        if cc.state == PROBE_RTT:
            # half a BDP (BBR v2), not four segments
            assert cc.cwnd == max(4 * MSS, int(0.5 * cc.btl_bw * cc.min_rtt))
    assert PROBE_RTT in states
    assert cc.state == PROBE_BW  # and back after 200 ms and a round trip
    assert cc.min_rtt == 0.05  # the new minimum


def test_cwnd_is_bounded_by_max_window():
    cc = fresh(max_cwnd=100 * MSS)
    path = Path(rate=100e6 / 8, rtt=0.3)
    run(cc, path, 5.0)
    assert cc.cwnd <= 100 * MSS


def test_from_tuple_matches_the_extension():
    from polevpn.kcp._ikcp import Kcp

    k = Kcp(0)
    assert k.take_rate_sample() is None  # nothing acknowledged yet
    rs = RateSample.from_tuple((10, 2, 8, 1000, 500, 8, 1, 0))
    assert (rs.delivered, rs.sample_delivered, rs.app_limited, rs.retrans) == (10, 8, True, False)


def test_a_path_whose_rtt_grows_is_followed_at_once():
    """The first packets saw 0.2 ms (the delay came later: a reroute, or a line switched
    in); every round trip since sees 40 ms. A queue of our own cannot explain that (at
    most one BDP over the minimum); the new minimum is taken at once, not ten seconds
    later, so the window is not held to a fraction of the path's BDP meanwhile."""
    cc = fresh()
    path = Path(rate=30e6 / 8, rtt=0.0002, step=0.0001)
    run(cc, path, 0.05)
    assert cc.min_rtt < 0.001
    path.step = 0.005
    run(cc, path, 1.0, rtt=0.04)
    assert cc.min_rtt == 0.04 and cc.path_changes == 1
    run(cc, path, 3.0, rtt=0.04)
    assert cc.cwnd >= 2 * 30e6 / 8 * 0.04 * 0.9

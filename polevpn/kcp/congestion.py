"""Sender-side congestion control for kcp://, without I/O: a delivery-rate model in the
manner of BBR (v1, draft-cardwell-iccrg-bbr-congestion-control).

KCP as PoleVPN runs it has no congestion window: it sends whatever its fixed window
allows, at once. On a rate-limited line that overruns the bottleneck's queue, makes its
own loss, and the retransmissions and FEC parity then compete with new data for the same
line. This controller instead estimates the path's bottleneck rate (the most delivered per
unit of time over the last ten round trips) and its round-trip propagation time (the least
RTT seen over ten seconds), paces sends at about that rate, and keeps about two
bandwidth-delay products in flight. Random loss is not read as congestion (the estimate
comes from what is delivered, not from what is lost); a queue shows up as RTT above the
minimum, which the 0.75 phase of each probing cycle and PROBE_RTT drain.

The C side (``polevpn/kcp/_ikcp.c``, ``kcp->rate`` in ikcp.c) records the rate sampler's
state per transmission and builds one sample per batch of input; ``KcpLink`` hands each
sample to ``on_sample`` and applies ``pacing_rate`` and ``cwnd`` (``Kcp.set_pacing``,
``Kcp.set_cwnd_bytes``). Everything here is plain arithmetic on those numbers: tested
directly and in the link simulator (tests/linksim.py).

Units: bytes of KCP payload, seconds, bytes per second.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

STARTUP = "startup"
DRAIN = "drain"
PROBE_BW = "probe_bw"
PROBE_RTT = "probe_rtt"

HIGH_GAIN = 2 / math.log(2)  # 2.885: doubles the delivery rate each round in STARTUP
# STARTUP's in-flight cap, in BDPs, as BBR v2 and v3 have it: v1's 2.885 put 1.9 BDPs in a
# queue whose buffer is often less (a 50 ms buffer at a 40 ms RTT is 1.25 BDPs)
STARTUP_CWND_GAIN = 2.0
# STARTUP ends when the least RTT of a round's first samples is this much above the path's
STARTUP_RTT_SAMPLES = 8
STARTUP_RTT_MIN_RISE = 0.004  # s
STARTUP_RTT_MAX_RISE = 0.016  # s
CYCLE = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # PROBE_BW's pacing gains
CWND_GAIN = 2.0
BW_WINDOW_ROUNDS = 10
MIN_RTT_WINDOW = 10.0  # s
PROBE_RTT_TIME = 0.2  # s
FULL_BW_GROWTH = 1.25
FULL_BW_ROUNDS = 3
# a standing queue: a whole round trip, outside the probing phase, whose least RTT is this
# much above the path's: a little for timer and batching jitter, or a small fraction of a
# long path's RTT (a line's buffer is often 50 ms whatever the RTT, so not more)
QUEUE_RTT_FRACTION = 0.05
QUEUE_RTT_SLACK = 0.005  # s
QUEUE_ROUNDS = 2
# a whole round trip whose least RTT is above this many times the minimum (plus the slack):
# no queue of ours can explain it (we keep at most cwnd_gain BDPs in flight, so our queue
# adds at most cwnd_gain - 1 minimum RTTs); the path itself changed (a reroute, or a delay
# that appeared after the first packets), and the old minimum would hold the window to a
# fraction of the new path's BDP until it expires ten seconds later
PATH_CHANGE_RTT_FACTOR = 4.0
# the line is full when a round trip delivers this share of the estimate or more
LINE_FULL = 0.8
# the least in-flight cap: a tunnel reads and writes in batches (64 TUN reads, 64 KB
# super-packets of ~50 segments), so on a path whose RTT is well under a millisecond a cap
# of a few BDPs would let one batch out per round trip of the event loop; the pacing, not
# this, holds the rate on such a path. Up to BATCH_TIME at the estimated rate (on a slow
# line that is a few segments, and the cap stays what the model says)
MIN_CWND_BYTES = 256 * 1024
BATCH_TIME = 0.01  # s


@dataclass(slots=True)
class RateSample:
    """One batch of acknowledgements, as ``Kcp.take_rate_sample`` returns it."""

    delivered: int  # payload bytes acknowledged since the start, now
    prior_delivered: int  # ... when the newest acknowledged segment was sent
    sample_delivered: int  # delivered over the sample's interval
    interval_us: int
    min_rtt_us: int  # least RTT of segments sent once in this batch, -1: none
    acked: int  # payload bytes newly acknowledged
    app_limited: bool
    # the newest acknowledged segment had been sent again: if the first transmission got
    # through after all (a spurious resend, or FEC rebuilt it), the sample's interval is
    # short by up to a round trip and its rate far too high
    retrans: bool = False

    @classmethod
    def from_tuple(cls, t: tuple[int, int, int, int, int, int, int, int]) -> RateSample:
        return cls(t[0], t[1], t[2], t[3], t[4], t[5], bool(t[6]), bool(t[7]))


class Bbr:
    """BBR v1's model and state machine over KCP's rate samples."""

    def __init__(
        self,
        mss: int,
        now: float,
        max_cwnd: int,
        initial_cwnd_segments: int = 32,
        initial_rtt: float = 0.05,
        seed: int | None = None,
    ) -> None:
        self.mss = mss
        self.max_cwnd = max(max_cwnd, 4 * mss)
        self.min_cwnd = 4 * mss
        self.state = STARTUP
        self.btl_bw = 0.0  # bytes/s, the windowed max
        self._bw_rounds: deque[tuple[int, float]] = deque()  # (round, best that round)
        self.min_rtt = math.inf  # s
        self._min_rtt_stamp = now
        self.round_count = 0
        self._next_round_delivered = 0
        self._round_start = False
        self._full_bw = 0.0
        self._full_bw_count = 0
        self.filled_pipe = False
        self.pacing_gain = HIGH_GAIN
        self.cwnd_gain = STARTUP_CWND_GAIN
        self._cycle_index = 0
        self._cycle_stamp = now
        # the current round trip: when it began, what was delivered then, its least RTT
        self._round_t0 = now
        self._round_delivered = 0
        self._round_min_rtt = math.inf
        self._round_rtt_samples = 0
        self._round_app_limited = False
        self._queue_rounds = 0
        self.round_rate = 0.0  # what the last whole round trip delivered (line bytes/s)
        self.queue_corrections = 0  # how often a standing queue brought the estimate down
        # the least RTT of the round that made the last correction, while the queue it saw
        # has not gone (None: no correction outstanding)
        self._corrected_rtt: float | None = None
        # the least RTT of the round trip after that correction (its draining phase; None
        # while that round trip is still to end)
        self._drained_rtt: float | None = None
        self.foreign_queues = 0  # corrections not made: draining had not shrunk the queue
        self.path_changes = 0  # how often the minimum RTT was replaced by a much larger one
        self.startup_queue_exits = 0  # STARTUP left because a queue stood a whole round
        self._probe_rtt_done: float | None = None
        self._probe_rtt_round_done = False
        self._prior_cwnd = 0
        self._rng = random.Random(seed)
        # bytes on the line per byte acknowledged, besides resends: 1 + the FEC parity
        # share (set by the caller). Samples count only acknowledged payload, and pacing
        # covers the parity too: the model works in line bytes, so the parity share can
        # change without the estimate going wrong (unscaled, each round would deliver less
        # than the one before and the estimate would spiral down)
        self.sample_scale = 1.0
        self._cwnd = initial_cwnd_segments * mss
        # no estimate yet: the initial window over a guessed RTT, at startup's gain
        self._pacing_rate = HIGH_GAIN * self._cwnd / initial_rtt
        self._rate_guessed = True

    # -- outputs

    @property
    def pacing_rate(self) -> float:
        return self._pacing_rate

    @property
    def cwnd(self) -> int:
        return self._cwnd

    @property
    def line_full(self) -> bool:
        """The last round trip delivered most of what the path can carry: more parity
        (FEC) would take the place of data rather than use spare capacity."""
        return self.btl_bw > 0 and self.round_rate >= LINE_FULL * self.btl_bw

    @property
    def round_start(self) -> bool:
        """The last sample began a new round trip."""
        return self._round_start

    def bdp(self, gain: float = 1.0) -> int:
        if not self.btl_bw or self.min_rtt == math.inf:
            return self._cwnd
        return int(gain * self.btl_bw * self.min_rtt)

    # -- input

    def on_sample(self, rs: RateSample, inflight: int, now: float) -> None:
        """One batch of acknowledgements; ``inflight``: payload bytes still unacknowledged."""
        self._update_round(rs)
        if self._round_start:
            self._check_queue(rs, now)
        if rs.min_rtt_us >= 0:
            self._round_min_rtt = min(self._round_min_rtt, rs.min_rtt_us / 1e6)
            self._round_rtt_samples += 1
        if rs.app_limited:
            self._round_app_limited = True
        if rs.min_rtt_us >= 0 and self.state == STARTUP and not self._round_app_limited:
            self._check_startup_queue()
        self._update_bw(rs)
        self._update_cycle(rs, inflight, now)
        self._check_full_pipe(rs, inflight)
        self._check_drain(inflight, now)
        self._update_min_rtt(rs, inflight, now)
        self._set_pacing_rate()
        self._set_cwnd(rs, inflight)

    def _update_round(self, rs: RateSample) -> None:
        self._round_start = False
        # a sample of resent segments only does not end a round trip: its ACK may be
        # for the first copy (Karn), sent long before the record it carries
        if rs.acked and not rs.retrans and rs.prior_delivered >= self._next_round_delivered:
            self._next_round_delivered = rs.delivered
            self.round_count += 1
            self._round_start = True

    def _check_queue(self, rs: RateSample, now: float) -> None:
        """At the end of a round trip: was there a queue all along?

        The estimate is the most delivered per unit of time, and a token-bucket shaper
        (what most lines are) lets a burst of its bucket through at the speed of the wire
        after each quiet moment: samples that include one are too high, the max filter
        keeps them for ten rounds, and pacing at that rate builds a queue that the shaper
        then drops from. A queue that stands for whole round trips outside the probing
        phase means the line is full; what was delivered over those round trips is then
        the line's rate, and it replaces the estimate. The draining phase comes next.
        """
        elapsed = now - self._round_t0
        delivered = rs.delivered - self._round_delivered
        rate = delivered * self.sample_scale / elapsed if elapsed > 0 else 0.0
        self.round_rate = rate
        round_min, app_limited = self._round_min_rtt, self._round_app_limited
        self._round_t0, self._round_delivered = now, rs.delivered
        self._round_min_rtt = math.inf
        self._round_rtt_samples = 0
        self._round_app_limited = False
        if self._corrected_rtt is not None and self._drained_rtt is None:
            # the round trip after a correction, paced at 0.75: the least RTT it saw is
            # what draining left of the queue
            self._drained_rtt = round_min
        if (
            self.min_rtt != math.inf
            and round_min != math.inf
            and round_min > PATH_CHANGE_RTT_FACTOR * self.min_rtt + QUEUE_RTT_SLACK
        ):
            self.min_rtt = round_min
            self._min_rtt_stamp = now
            self.path_changes += 1
            return
        probing = self.pacing_gain > 1
        if self.state != PROBE_BW or probing or app_limited or self.min_rtt == math.inf:
            # only a round the sender kept busy tells what the line delivers
            self._queue_rounds = 0
            return
        excess = max(QUEUE_RTT_SLACK, QUEUE_RTT_FRACTION * self.min_rtt)
        if round_min > self.min_rtt + excess:
            self._queue_rounds += 1
        else:
            self._queue_rounds = 0
            self._corrected_rtt = self._drained_rtt = None  # the queue is gone
        # at most halved at once: a round's rate can be low for reasons of its own (the
        # application sent little, a loss held the window)
        rate = max(rate, self.btl_bw / 2)
        if self._queue_rounds >= QUEUE_ROUNDS and rate < self.btl_bw:
            self._queue_rounds = 0
            last, drained = self._corrected_rtt, self._drained_rtt
            if (
                last is not None
                and drained is not None
                and drained > last - max(excess, (last - self.min_rtt) / 2)
            ):
                # the last correction's draining did not take even half the queue away:
                # it is not ours, but a loss-based flow's that shares the line (it fills
                # any buffer whatever we send). Cutting again and again would hand it the
                # whole line, a round trip at a time (a Reno flow beside us on a 100 ms
                # buffer left us 5 % of the line); from here the model is BBR's own, whose
                # window follows the RTT once the old minimum expires; it expires now, so
                # that the window covers the RTT the line has while that flow is on it
                self.foreign_queues += 1
                self._min_rtt_stamp = now - MIN_RTT_WINDOW
                return
            self._corrected_rtt, self._drained_rtt = round_min, None
            self.queue_corrections += 1
            self._bw_rounds.clear()
            self._bw_rounds.append((self.round_count, rate))
            self.btl_bw = rate
            self._cycle_index = 1  # the 0.75 phase: drain what stands
            self._cycle_stamp = now
            self.pacing_gain = CYCLE[1]

    def _check_startup_queue(self) -> None:
        """STARTUP: the least RTT of this round's first samples stands well above the
        path's: a queue has formed, so the line is full already (HyStart's delay test, as
        HyStart++ and BBR v3's startup have it). BBR v1 waits for three rounds without
        growth, by when 2.89 x the rate has overrun a shallow buffer: a 50 ms buffer at a
        40 ms RTT dropped 1 % of everything sent, and its queue was most of the p99.

        Not in a round the application kept short of data (as BBR's own full-pipe test):
        the RTT of a flow that sends less than the line takes rises for reasons that are
        not its queue, and the estimate is only what it sent. The router's side of an office
        link carries the ACKs of the office's uploads, in bursts: it left STARTUP on such a
        rise with an estimate of 0.3-0.9 Mbit/s and paced the bursts at that, which added
        100-400 ms to the RTT of the TCP inside the tunnel (its timeouts fired, and it
        resent whole windows)."""
        if (
            self._round_rtt_samples >= STARTUP_RTT_SAMPLES
            and self.btl_bw
            and self.min_rtt != math.inf
            and self._round_min_rtt > self.min_rtt + min(
                max(STARTUP_RTT_MIN_RISE, self.min_rtt / 8), STARTUP_RTT_MAX_RISE
            )
        ):
            self.filled_pipe = True
            self.startup_queue_exits += 1

    def _update_bw(self, rs: RateSample) -> None:
        if rs.interval_us <= 0 or rs.sample_delivered <= 0 or rs.retrans:
            return
        # a sample shorter than the path's RTT spans too few acknowledgements to trust
        # (acknowledgements that come in a bunch make such a sample far too high)
        if self.min_rtt != math.inf and rs.interval_us < self.min_rtt * 1e6:
            return
        bw = rs.sample_delivered * self.sample_scale * 1e6 / rs.interval_us
        if rs.app_limited and bw < self.btl_bw:
            return  # the sender, not the path, set this rate
        rounds = self._bw_rounds
        r = self.round_count
        if rounds and rounds[-1][0] == r:
            if bw > rounds[-1][1]:
                rounds[-1] = (r, bw)
        else:
            rounds.append((r, bw))
        while rounds and rounds[0][0] <= r - BW_WINDOW_ROUNDS:
            rounds.popleft()
        self.btl_bw = max(b for _, b in rounds)

    def _update_cycle(self, rs: RateSample, inflight: int, now: float) -> None:
        if self.state != PROBE_BW:
            return
        elapsed = now - self._cycle_stamp > self.min_rtt
        gain = self.pacing_gain
        if gain > 1:
            advance = elapsed and inflight >= self.bdp(gain)
            # a probe that cannot fill (not enough data) still ends after a while
            advance = advance or now - self._cycle_stamp > 2 * self.min_rtt
        elif gain < 1:
            advance = elapsed or inflight <= self.bdp()
        else:
            advance = elapsed
        if advance:
            self._cycle_index = (self._cycle_index + 1) % len(CYCLE)
            self._cycle_stamp = now
            self.pacing_gain = CYCLE[self._cycle_index]

    def _check_full_pipe(self, rs: RateSample, inflight: int) -> None:
        # an app-limited round says nothing about the path, unless a bandwidth-delay
        # product was in flight anyway (traffic that arrives in bursts as fast as the line)
        if self.filled_pipe or not self._round_start:
            return
        if rs.app_limited and inflight < self.bdp():
            return
        if self.btl_bw >= self._full_bw * FULL_BW_GROWTH:
            self._full_bw = self.btl_bw
            self._full_bw_count = 0
            return
        self._full_bw_count += 1
        if self._full_bw_count >= FULL_BW_ROUNDS:
            self.filled_pipe = True

    def _check_drain(self, inflight: int, now: float) -> None:
        if self.state == STARTUP and self.filled_pipe:
            self.state = DRAIN
            self.pacing_gain = 1 / HIGH_GAIN
            self.cwnd_gain = STARTUP_CWND_GAIN
        if self.state == DRAIN and inflight <= self.bdp():
            self._enter_probe_bw(now)

    def _enter_probe_bw(self, now: float) -> None:
        self.state = PROBE_BW
        self.cwnd_gain = CWND_GAIN
        # any phase but the draining one, so that flows started together do not probe
        # in step
        index = self._rng.randrange(len(CYCLE) - 1)
        self._cycle_index = index + 1 if index >= 1 else 0
        self._cycle_stamp = now
        self.pacing_gain = CYCLE[self._cycle_index]

    def _update_min_rtt(self, rs: RateSample, inflight: int, now: float) -> None:
        expired = now - self._min_rtt_stamp > MIN_RTT_WINDOW
        if rs.min_rtt_us >= 0:
            rtt = rs.min_rtt_us / 1e6
            if rtt <= self.min_rtt or expired:
                self.min_rtt = max(rtt, 1e-6)
                self._min_rtt_stamp = now
        if expired and self.state != PROBE_RTT and self.min_rtt != math.inf:
            # ten seconds without a lower RTT: a queue may hide the true one; drain to
            # four segments for a moment to see it (and let other flows see theirs)
            self.state = PROBE_RTT
            self.pacing_gain = 1.0
            self._prior_cwnd = max(self._prior_cwnd, self._cwnd)
            self._probe_rtt_done = None
        if self.state == PROBE_RTT:
            if self._probe_rtt_done is None and inflight <= self._probe_rtt_cwnd():
                self._probe_rtt_done = now + PROBE_RTT_TIME
                self._probe_rtt_round_done = False
                self._next_round_delivered = rs.delivered
            elif self._probe_rtt_done is not None:
                if self._round_start:
                    self._probe_rtt_round_done = True
                if self._probe_rtt_round_done and now >= self._probe_rtt_done:
                    self._min_rtt_stamp = now
                    self._cwnd = max(self._cwnd, self._prior_cwnd)
                    self._prior_cwnd = 0
                    if self.filled_pipe:
                        self._enter_probe_bw(now)
                    else:
                        self.state = STARTUP
                        self.pacing_gain = HIGH_GAIN
                        self.cwnd_gain = STARTUP_CWND_GAIN

    def _probe_rtt_cwnd(self) -> int:
        """In flight during PROBE_RTT: half a BDP, as BBR v2 has it, not BBR v1's four
        segments: enough to drain the queue and see the path's RTT, and a tunnel's traffic
        (a ping, a call) does not stall for the 200 ms every ten seconds."""
        return max(self.min_cwnd, self.bdp(0.5))

    def _set_pacing_rate(self) -> None:
        if self._rate_guessed and self.min_rtt != math.inf:
            # the first round trip measured: the window over it replaces the constructor's
            # guess (which assumed 50 ms; a 1 Mbit/s line at 300 ms took 20 times its rate
            # for the whole of STARTUP, since STARTUP's rate only grows)
            self._rate_guessed = False
            self._pacing_rate = HIGH_GAIN * self._cwnd / self.min_rtt
        if not self.btl_bw:
            return
        rate = self.pacing_gain * self.btl_bw
        if self.state == STARTUP and self.min_rtt != math.inf:
            # STARTUP paces no slower than its window allows. The sender inside the tunnel
            # (a TCP in slow start) doubles its rate each round trip too, and the
            # estimate lags it by a round trip: paced at 2.9 x the estimate only, its
            # packets queued in front of ours long enough (over 16 ms) for its own
            # slow-start exit (Linux HyStart) to take the queue for a full line, and a cubic
            # sender went on at a twentieth of it
            rate = max(rate, HIGH_GAIN * self._cwnd / self.min_rtt)
        # until the pipe is full the rate only grows: early samples undercount
        if self.filled_pipe or rate > self._pacing_rate:
            self._pacing_rate = rate

    def _set_cwnd(self, rs: RateSample, inflight: int) -> None:
        if self.state == PROBE_RTT:
            self._cwnd = self._probe_rtt_cwnd()
            return
        floor = min(MIN_CWND_BYTES, int(self.btl_bw * BATCH_TIME))
        target = max(self.bdp(self.cwnd_gain) + 3 * self.mss, floor)
        if self.btl_bw and self.min_rtt != math.inf:
            target = min(target, self.max_cwnd)
        if self.filled_pipe:
            self._cwnd = min(self._cwnd + rs.acked, target)
        elif self._cwnd < target or rs.delivered < 10 * self.mss:
            self._cwnd += rs.acked
        self._cwnd = max(min(self._cwnd, self.max_cwnd), self.min_cwnd)

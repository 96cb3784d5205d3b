"""A deterministic link simulator that drives kcp:// (``KcpLink``, FEC and KCP) without sockets.

No sockets, no wall clock, no threads: a virtual clock and a heap of events, and one seeded
``random.Random`` per line direction, so a scenario run twice gives the same figures.

Model
=====

``Line``: one direction of a path, in this order per packet::

    offered -> [loss before the queue, if asked] -> drop-tail queue -> bottleneck at
    ``rate_bps`` -> [random / bursty loss on the wire] -> propagation delay -> delivered

* Bytes on the wire are the record's length plus ``overhead`` per packet (default 65: 28
  for IPv4 + UDP, 37 for a DTLS 1.2 AES-GCM record: 13 header + 8 explicit nonce + 16 tag;
  a ``dtls_mtu`` of 1400 leaves a 1363-byte record, the ``record_mtu`` used here).
* The queue is FIFO and drains at the line rate; it is bounded in bytes (``queue_bytes``)
  and/or in time at the line rate (``queue_ms``, as tbf's ``latency``); a packet that would
  take it over the bound is dropped (drop-tail). Its backlog is kept as the time the
  bottleneck stays busy, so no per-packet dequeue event is needed: a packet's queue delay
  (its *sojourn*, recorded per packet) is the time it waits before its first bit is sent.
* Loss is applied *after* the bottleneck by default (``loss_before_queue`` False): a packet
  lost on the wire has taken its share of the queue and the rate, as on a real line whose
  loss is past the bottleneck. First the Gilbert-Elliott chain steps (good <-> bad, once per
  packet) and the packet is lost with its state's loss probability, then Bernoulli loss, as
  in ``tests/impair.py`` (same ``ge_*`` parameter names, percentages).
* An unlimited line (``rate_bps`` None) has no queue: packets only take the delay.

``Endpoint``: one ``KcpLink`` (no DTLS: records go straight to the line, DTLS is in the
per-packet overhead) driven as ``polevpn.io.kcp_transport`` drives it: records read after
every call that can make them (write, settle, poll), ``poll`` at ``next_deadline`` (a timer
is only moved earlier, as ``_pump`` arms it), records arriving at the same virtual instant
fed one by one and settled once (one ACK flush for the batch). The write buffer has the
transport's hysteresis: writing stops once the write buffer (``KcpLink.queued_bytes``: with
congestion control only what waits to be sent) exceeds ``high_water`` and resumes when it is
back at ``low_water`` (``KcpConnection``'s 1 MiB / 256 KiB by default), or the lower marks
of the link's time budget (``KcpLink.queue_budget``), as ``KcpConnection`` sets them.

Traffic (all through the KCP stream of a flow, framed so the receiver checks order and
integrity: length, kind, flow, sequence number, send time, CRC-32):

* bulk: an endless source, written whenever the link is writable (like a TCP sender that
  always has data; the gateway stops reading its TUN while the link is paused);
* rate: ``rate_bps`` while on (``on_s`` / ``off_s`` periods); messages that find the link
  paused are dropped and counted, as the TUN queue would drop them;
* ping (``ping_ms``): a small timestamped message, answered by the far end with a pong
  through the reverse direction of the same flow; one-way and round-trip times measured.
  Pings and pongs wait in an application queue while the link is paused and go first when
  it resumes, so they see the write buffer's delay as tunnelled traffic would;
* line ping (``line_ping_ms``): a raw packet straight through the lines, beside the tunnel,
  that sees only the bottleneck's queue.

Goodput counts stream payload bytes delivered *in order* to the receiving application:
the whole bulk and rate messages (what a tunnel's reader gets: its frames, i.e. the
tunnelled IP packets), not pings, not KCP/FEC/DTLS headers, not retransmissions.
Utilisation is that goodput over the line rate; with 1300-byte messages, 24 bytes of KCP
header and 65 of overhead a perfect sender reaches ``msg / (msg + 24 + overhead)`` = 93.6%
(``Result.ideal_utilisation``), a little less with FEC (14 more bytes a record, plus parity).

Use from a test::

    from linksim import Scenario, run_scenario
    r = run_scenario(Scenario(rate_bps=30e6, rtt_ms=40, loss_pct=2, seconds=20))
    assert r.utilisation >= 0.6 and r.errors == 0

To switch on a new option (a congestion controller, say) on both sides of every flow, give
``Scenario(kcp_options={"name": value})``; for anything finer, ``kcp_params`` takes a
factory ``(flow_index, side) -> KcpParams`` (side "a" sends the bulk, "b" receives).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from polevpn.config import FecParams, KcpParams
from polevpn.kcp.kcp_link import KcpLink
from polevpn.kcp.kcp_pool import KcpPool

RECORD_MTU = 1363  # dtls_mtu 1400 minus DTLS 1.2 AES-GCM's 37 bytes
OVERHEAD = 65  # IPv4 + UDP (28) and DTLS (37) per packet
HIGH_WATER = 1 << 20  # polevpn.kcp.connection's write-buffer limits
LOW_WATER = HIGH_WATER // 4
MIN_QUEUE = 1600  # a queue bounded in time still holds one full-sized packet
TIMER_MIN = 1e-6  # s: a timer due now runs this much later (see Endpoint.pump)

KCP_HEADER = 24
KCP_PUSH = 81
FEC_MAGIC = 0xF3
FEC_DATA_OVERHEAD = 14  # shard header (12) + u16 payload length

_u32le = struct.Struct("<I").unpack_from

# -- virtual clock ------------------------------------------------------------------------


class Sim:
    """A virtual clock and a heap of events ``(time, seq, fn, arg)``; equal times run in the
    order they were scheduled."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self.end = math.inf
        self.events = 0

    def at(self, t: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, arg))

    def run(self, until: float) -> None:
        """Run every event up to and including ``until``; the clock ends at ``until``."""
        self.end = until
        heap = self._heap
        pop = heapq.heappop
        n = 0
        while heap and heap[0][0] <= until:
            t, _, fn, arg = pop(heap)
            self.now = t
            fn(arg)
            n += 1
        self.events += n
        self.now = until


# -- statistics helpers -------------------------------------------------------------------


def percentile(samples: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None without samples."""
    if not samples:
        return None
    s = sorted(samples)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def _mean(samples: list[float]) -> float | None:
    return sum(samples) / len(samples) if samples else None


# -- one direction of a path --------------------------------------------------------------


@dataclass
class LineStats:
    offered: int = 0  # packets
    offered_bytes: int = 0  # on the wire (payload + overhead)
    queue_drops: int = 0
    queue_drop_bytes: int = 0
    random_drops: int = 0  # Bernoulli
    burst_drops: int = 0  # Gilbert-Elliott
    delivered: int = 0  # arrived within the simulated time
    delivered_bytes: int = 0
    max_queue_bytes: int = 0
    # per packet that entered the queue: seconds it waited before its first bit went out
    queue_delay: list[float] = field(default_factory=list)

    @property
    def drops(self) -> int:
        return self.queue_drops + self.random_drops + self.burst_drops

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "queue_delay"
        }
        qd = self.queue_delay
        out["queue_delay_p50_ms"] = _ms(percentile(qd, 50))
        out["queue_delay_p99_ms"] = _ms(percentile(qd, 99))
        out["queue_delay_max_ms"] = _ms(max(qd) if qd else None)
        return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


@dataclass(frozen=True)
class LineParams:
    rate_bps: float | None = 30e6  # None: unlimited (no queue)
    delay_ms: float = 20.0  # one-way propagation delay
    queue_bytes: int | None = None  # drop-tail bound in bytes
    queue_ms: float | None = 50.0  # drop-tail bound in time at the line rate (tbf latency)
    overhead: int = OVERHEAD  # bytes added to every packet on the wire
    loss_pct: float = 0.0  # Bernoulli
    ge_gb_pct: float = 0.0  # Gilbert-Elliott good -> bad per packet (0: off)
    ge_bg_pct: float = 0.0  # bad -> good per packet
    ge_loss_good_pct: float = 0.0
    ge_loss_bad_pct: float = 100.0
    loss_before_queue: bool = False  # True: lost packets never reach the queue

    def __post_init__(self) -> None:
        for name in ("loss_pct", "ge_gb_pct", "ge_bg_pct", "ge_loss_good_pct", "ge_loss_bad_pct"):
            v = getattr(self, name)
            if not 0.0 <= v <= 100.0:
                raise ValueError(f"{name}={v} is not a percentage 0..100")
        if self.ge_gb_pct > 0 and self.ge_bg_pct <= 0:
            raise ValueError("ge_bg_pct must be > 0 when ge_gb_pct > 0 (bad state never ends)")
        if self.rate_bps is not None and not self.rate_bps > 0:
            raise ValueError(f"rate_bps={self.rate_bps} must be > 0 (or None: unlimited)")
        if self.delay_ms < 0:
            raise ValueError(f"delay_ms={self.delay_ms} must be >= 0")

    @property
    def limit_bytes(self) -> float:
        """The queue's bound in bytes (inf: unbounded)."""
        limit = math.inf
        if self.queue_bytes is not None:
            limit = float(self.queue_bytes)
        if self.queue_ms is not None and self.rate_bps is not None:
            limit = min(limit, max(MIN_QUEUE, self.rate_bps / 8 * self.queue_ms / 1000))
        return limit


def tbf_limit_bytes(rate_bps: float, latency_ms: float = 50.0) -> int:
    """The queue of tests/topology.py's ``rate_limit`` (tc tbf): ``latency`` at the rate plus
    its burst (10 ms at the rate, at least 32 KiB), for ``queue_bytes`` when a run should
    match the netns set-up rather than a plain 50 ms queue."""
    burst = max(32 * 1024, int(rate_bps / 8 / 100))
    return int(rate_bps / 8 * latency_ms / 1000) + burst


class Line:
    """One direction: drop-tail queue, bottleneck, loss, delay (see the module docstring)."""

    def __init__(self, sim: Sim, params: LineParams, rng: random.Random, name: str = "") -> None:
        self.sim = sim
        self.params = params
        self.name = name
        self.rng = rng
        self.stats = LineStats()
        self._byte_rate = params.rate_bps / 8 if params.rate_bps is not None else None
        self._limit = params.limit_bytes
        self._delay = params.delay_ms / 1000
        self._overhead = params.overhead
        self._busy_until = 0.0
        self._loss = params.loss_pct / 100
        self._ge = params.ge_gb_pct > 0
        self._gb = params.ge_gb_pct / 100
        self._bg = params.ge_bg_pct / 100
        self._loss_good = params.ge_loss_good_pct / 100
        self._loss_bad = params.ge_loss_bad_pct / 100
        self.bad = False
        self._lossy = self._ge or self._loss > 0

    def _lost(self) -> bool:
        rnd = self.rng.random
        st = self.stats
        if self._ge:
            if self.bad:
                if rnd() < self._bg:
                    self.bad = False
            elif rnd() < self._gb:
                self.bad = True
            if rnd() < (self._loss_bad if self.bad else self._loss_good):
                st.burst_drops += 1
                return True
        if self._loss and rnd() < self._loss:
            st.random_drops += 1
            return True
        return False

    def send(self, length: int, fn: Callable[[Any], None], arg: Any) -> bool:
        """Offer a packet of ``length`` payload bytes; ``fn(arg)`` runs when it arrives.
        Returns whether it will arrive (it may still arrive after the simulation ends)."""
        now = self.sim.now
        size = length + self._overhead
        st = self.stats
        st.offered += 1
        st.offered_bytes += size
        before = self.params.loss_before_queue
        if before and self._lossy and self._lost():
            return False
        rate = self._byte_rate
        if rate is not None:
            wait = self._busy_until - now
            if wait < 0.0:
                wait = 0.0
            backlog = wait * rate
            # (a rounding error's slack: a packet that fits exactly is not dropped)
            if backlog + size > self._limit + 1e-6:
                st.queue_drops += 1
                st.queue_drop_bytes += size
                return False
            q = int(backlog) + size
            if q > st.max_queue_bytes:
                st.max_queue_bytes = q
            st.queue_delay.append(wait)
            done = now + wait + size / rate
            self._busy_until = done
        else:
            done = now
        if not before and self._lossy and self._lost():
            return False
        t = done + self._delay
        if t <= self.sim.end:
            st.delivered += 1
            st.delivered_bytes += size
        self.sim.at(t, fn, arg)
        return True

    @property
    def backlog_bytes(self) -> float:
        rate = self._byte_rate
        if rate is None:
            return 0.0
        return max(0.0, self._busy_until - self.sim.now) * rate


# -- the framed stream --------------------------------------------------------------------

# length (whole message), kind, flow, sequence number, send time (ns of virtual time);
# a CRC-32 of everything before it ends the message
_FRAME = struct.Struct(">HBBIQ")
FRAME_HEADER = _FRAME.size
FRAME_MIN = FRAME_HEADER + 4
_CRC = struct.Struct(">I")
KIND_BULK = 1
KIND_RATE = 2
KIND_PING = 3
KIND_PONG = 4
PING_SIZE = 64
_FILL = random.Random(0x5EED).randbytes(1 << 16)


def make_message(kind: int, flow: int, seq: int, t: float, size: int) -> bytes:
    """A framed message of ``size`` bytes (at least ``FRAME_MIN``)."""
    n = size - FRAME_MIN
    off = (seq * 7919) & 0x7FFF
    body = _FRAME.pack(size, kind, flow, seq & 0xFFFFFFFF, int(t * 1e9)) + _FILL[off : off + n]
    return body + _CRC.pack(zlib.crc32(body))


def add_to_bin(bins: list[int], now: float, bin_s: float, n: int) -> None:
    """Count ``n`` bytes delivered at ``now`` into ``bins`` (one per ``bin_s``)."""
    i = int(now / bin_s)
    if i >= len(bins):
        bins.extend([0] * (i + 1 - len(bins)))
    bins[i] += n


def bins_rate(bins: list[int], bin_s: float, t0: float, t1: float) -> float:
    """Bits per second over the whole bins within [t0, t1)."""
    i0, i1 = int(round(t0 / bin_s)), int(round(t1 / bin_s))
    if i1 <= i0:
        return 0.0
    return sum(bins[i0:i1]) * 8 / ((i1 - i0) * bin_s)


class StreamReceiver:
    """Parses the reassembled stream of one direction: checks the CRC of every message and
    that each kind's sequence numbers come 0, 1, 2, ... Stops at the first error (the
    framing is then lost)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.ep = endpoint
        self.buf = bytearray()
        self.expected = {KIND_BULK: 0, KIND_RATE: 0, KIND_PING: 0, KIND_PONG: 0}
        self.errors = 0
        self.error: str | None = None
        self.messages = 0

    def consume(self, data: bytes, now: float) -> None:
        if self.error is not None or not data:
            return
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        ep = self.ep
        expected = self.expected
        unpack = _FRAME.unpack_from
        while end - pos >= FRAME_HEADER:
            size, kind, flow, seq, t_ns = unpack(buf, pos)
            if size < FRAME_MIN or kind not in expected:
                self._fail(f"bad frame at message {self.messages}: size {size} kind {kind}")
                return
            if end - pos < size:
                break
            stop = pos + size - 4
            if zlib.crc32(memoryview(buf)[pos:stop]) != _CRC.unpack_from(buf, stop)[0]:
                self._fail(f"checksum mismatch at message {self.messages} (kind {kind})")
                return
            if seq != expected[kind] or flow != ep.flow_index:
                self._fail(
                    f"kind {kind} flow {flow}: sequence {seq}, expected {expected[kind]}"
                )
                return
            expected[kind] = (seq + 1) & 0xFFFFFFFF
            self.messages += 1
            ep.on_message(kind, seq, t_ns / 1e9, size, now)
            pos += size
        del buf[:pos]

    def _fail(self, why: str) -> None:
        self.errors += 1
        self.error = why
        self.buf = bytearray()


# -- traffic ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowSpec:
    """One kcp:// association (a pair of links) whose side "a" sends to side "b"."""

    bulk: bool = True  # an endless source a -> b
    start_s: float = 0.0  # when a's sources start
    stop_s: float | None = None  # when they stop (None: the end)
    rate_bps: float | None = None  # a rate-limited source a -> b (instead of / beside bulk)
    on_s: float | None = None  # on-off periods of the rate source (None: always on)
    off_s: float = 0.0
    reverse_bulk: bool = False  # an endless source b -> a too
    ping_ms: float | None = None  # a ping a -> b -> a through this flow every ping_ms


class Endpoint:
    """One side of a flow: a KcpLink, its sources, its receiver, driven like the transport."""

    def __init__(
        self,
        sim: Sim,
        link: KcpLink,
        out_line: Line,
        flow_index: int,
        side: str,
        high_water: int,
        low_water: int,
        msg_size: int,
        bin_s: float,
        rx_coalesce_s: float = 0.0,
    ) -> None:
        self.sim = sim
        self.link = link
        self.line = out_line
        self.peer: Endpoint | None = None
        self.flow_index = flow_index
        self.side = side
        self.high = high_water
        self.low = low_water
        self.msg_size = min(msg_size, link.mss)
        self.bin_s = bin_s
        self.rx_coalesce_s = rx_coalesce_s
        self.receiver = StreamReceiver(self)
        self.writable = True
        self.pause_events = 0
        self.bulk = False
        self.bulk_seq = 0
        self.rate_seq = 0
        self.ping_seq = 0
        self.app_queue: deque[bytes] = deque()
        self.source_drops = 0  # rate-source messages that found the link paused
        self.written_bytes = 0
        self.max_pending = 0  # the most pending_bytes seen after a write
        # received, in order: data message bytes (bulk + rate) per time bin
        self.bins: list[int] = []
        self.delivered_bytes = 0
        self.ping_rtt: list[float] = []  # at the pinging side
        self.ping_oneway: list[float] = []  # at the answering side
        self.dead_at: float | None = None
        # what KcpConnection would do: give up when nothing is heard for silence_timeout
        # with data unacknowledged (recorded, not acted on)
        self.last_heard = 0.0
        self._waiting_since: float | None = None
        self.silence_at: float | None = None
        # on the wire (what this side sent)
        self.records_out = 0
        self.record_bytes_out = 0
        self.push_segments = 0  # KCP data segments, first sends and resends
        self.parity_records = 0
        self._settle_pending = False
        self._timer_at: float | None = None

    # -- output

    def _flush(self) -> None:
        records = self.link.records_to_send()
        if not records:
            return
        peer = self.peer
        assert peer is not None
        deliver = peer.deliver
        send = self.line.send
        pushes = 0
        nbytes = 0
        for r in records:
            n = len(r)
            nbytes += n
            first = r[0]
            if first == 0:
                off = 0
            elif first == FEC_MAGIC:
                kind = r[1] >> 6
                if kind != 0:
                    if kind == 1:
                        self.parity_records += 1
                    send(n, deliver, r)
                    continue
                off = FEC_DATA_OVERHEAD
            else:
                off = n
            # the KCP segments of this buffer: count data (push) segments
            while off + KCP_HEADER <= n:
                if r[off + 4] == KCP_PUSH:
                    pushes += 1
                off += KCP_HEADER + _u32le(r, off + 20)[0]
            send(n, deliver, r)
        self.records_out += len(records)
        self.record_bytes_out += nbytes
        self.push_segments += pushes

    def _marks(self) -> tuple[int, int]:
        """The write buffer's marks, as ``KcpConnection`` sets them: the configured ones,
        or lower ones from the link's time budget (congestion control)."""
        budget = self.link.queue_budget
        if budget is None or budget >= self.high:
            return self.high, self.low
        return budget, budget // 4

    def _write(self, msg: bytes) -> None:
        link = self.link
        link.write(msg, self.sim.now)
        self.written_bytes += len(msg)
        # the transport's write buffer: with congestion control only what waits to be sent
        pending = link.queued_bytes
        if pending > self.max_pending:
            self.max_pending = pending
        if self.writable and pending > self._marks()[0]:
            self.writable = False
            self.pause_events += 1

    def _fill(self) -> None:
        """Write what waits, then bulk data, while the link is writable."""
        q = self.app_queue
        while self.writable and q:
            self._write(q.popleft())
        if self.bulk and self.writable:
            now = self.sim.now
            size = self.msg_size
            flow = self.flow_index
            while self.writable:
                self._write(make_message(KIND_BULK, flow, self.bulk_seq, now, size))
                self.bulk_seq += 1

    def pump(self, _: Any = None) -> None:
        """After anything that may have changed the link: writable again?, fill, send the
        records, arm the timer (only ever earlier, as the transport does)."""
        if self.dead_at is not None:
            return
        link = self.link
        if not self.writable and link.queued_bytes <= self._marks()[1]:
            self.writable = True
        if self.writable and (self.bulk or self.app_queue):
            self._fill()
        self._flush()
        now = self.sim.now
        deadline = link.next_deadline(now)
        if deadline is None:
            return
        if deadline <= now:
            # a real clock has moved on by the time the timer runs; here it has not, and a
            # deadline computed as t0 + timeout can fall a rounding error short of what
            # ``poll`` checks (now - t0 >= timeout), which would repeat forever
            deadline = now + TIMER_MIN
        at = self._timer_at
        if at is not None and at <= deadline:
            return
        self._timer_at = deadline
        self.sim.at(deadline, self._on_timer, deadline)

    def _on_timer(self, at: float) -> None:
        if at != self._timer_at:
            return  # replaced by an earlier one
        self._timer_at = None
        if self.dead_at is not None:
            return
        now = self.sim.now
        link = self.link
        link.poll(now)
        if link.dead:
            self.dead_at = now
            return
        if self.silence_at is None:
            if not link.pending_bytes:
                self._waiting_since = None
            elif self._waiting_since is None:
                self._waiting_since = now
            elif now - max(self.last_heard, self._waiting_since) > (
                link.params.silence_timeout
            ):
                self.silence_at = now
        self.pump()

    # -- input

    def deliver(self, record: bytes) -> None:
        """A record arrives: fed now, settled once for everything arriving at this instant
        (or within ``rx_coalesce_s``)."""
        if self.dead_at is not None:
            return
        now = self.sim.now
        self.last_heard = now
        self.link.feed(record, now)
        if not self._settle_pending:
            self._settle_pending = True
            self.sim.at(now + self.rx_coalesce_s, self._settle, None)

    def _settle(self, _: Any) -> None:
        self._settle_pending = False
        if self.dead_at is not None:
            return
        now = self.sim.now
        data = self.link.settle(now)
        if data:
            self.receiver.consume(data, now)
        self.pump()

    def on_message(self, kind: int, seq: int, t_sent: float, size: int, now: float) -> None:
        if kind in (KIND_BULK, KIND_RATE):
            add_to_bin(self.bins, now, self.bin_s, size)
            self.delivered_bytes += size
        elif kind == KIND_PING:
            self.ping_oneway.append(now - t_sent)
            # answered at once through the reverse direction (waits if that is paused)
            self.app_queue.append(make_message(KIND_PONG, self.flow_index, seq, t_sent, size))
            # the pump after this settle writes it
        elif kind == KIND_PONG:
            self.ping_rtt.append(now - t_sent)

    # -- sources

    def start_bulk(self, _: Any = None) -> None:
        self.bulk = True
        self.pump()

    def stop_bulk(self, _: Any = None) -> None:
        self.bulk = False

    def start_rate(self, spec: FlowSpec) -> None:
        assert spec.rate_bps is not None
        self._rate_spec = spec
        self._rate_gap = self.msg_size * 8 / spec.rate_bps
        self._rate_on_until = (
            self.sim.now + spec.on_s if spec.on_s is not None else math.inf
        )
        self._rate_tick(None)

    def _rate_tick(self, _: Any) -> None:
        spec = self._rate_spec
        now = self.sim.now
        if self.dead_at is not None or (spec.stop_s is not None and now >= spec.stop_s):
            return
        if now >= self._rate_on_until:
            assert spec.on_s is not None
            self._rate_on_until = now + spec.off_s + spec.on_s
            self.sim.at(now + spec.off_s, self._rate_tick, None)
            return
        if self.writable:
            self._write(make_message(KIND_RATE, self.flow_index, self.rate_seq, now, self.msg_size))
            self.rate_seq += 1
            self.pump()
        else:
            self.source_drops += 1
        self.sim.at(now + self._rate_gap, self._rate_tick, None)

    def start_ping(self, interval: float) -> None:
        self._ping_interval = interval
        self._ping_tick(None)

    def _ping_tick(self, _: Any) -> None:
        if self.dead_at is not None:
            return
        now = self.sim.now
        self.app_queue.append(make_message(KIND_PING, self.flow_index, self.ping_seq, now,
                                           PING_SIZE))
        self.ping_seq += 1
        self.pump()
        self.sim.at(now + self._ping_interval, self._ping_tick, None)


class LinePinger:
    """Raw pings through the lines beside the tunnel: the bottleneck's queue as other
    traffic on the line sees it."""

    def __init__(self, sim: Sim, up: Line, down: Line, interval: float, size: int = 84) -> None:
        self.sim, self.up, self.down = sim, up, down
        self.interval = interval
        self.size = size - up.params.overhead  # ``size`` is the packet on the wire
        self.rtt: list[float] = []
        self.sent = 0

    def start(self, _: Any = None) -> None:
        self.sent += 1
        self.up.send(self.size, self._echo, self.sim.now)
        self.sim.at(self.sim.now + self.interval, self.start, None)

    def _echo(self, t_sent: float) -> None:
        self.down.send(self.size, self._back, t_sent)

    def _back(self, t_sent: float) -> None:
        self.rtt.append(self.sim.now - t_sent)


class TcpFlow:
    """A loss-based TCP beside the tunnel on the same lines (what an office's other traffic
    is): Reno's slow start and additive increase with CUBIC's multiplicative decrease (0.7),
    one decrease per window of losses (the recovery ends with the first packet sent after
    it), no pacing, a full-sized packet every time the window allows (ACK clocked).

    Loss detection is ideal SACK: a packet the line drops is known lost one smoothed RTT
    after it was sent, and its slot is free again then; resends are not modelled (goodput is
    what arrives, each byte once). ACKs are small packets on the reverse line; an ACK the
    line drops is as if the next one covered it (cumulative ACKs).
    """

    PACKET = 1500  # IP bytes on the wire
    MSS = 1448  # goodput per packet (TCP/IP headers with timestamps)
    ACK = 52
    BETA = 0.7

    def __init__(self, sim: Sim, up: Line, down: Line, bin_s: float) -> None:
        self.sim, self.up, self.down, self.bin_s = sim, up, down, bin_s
        self.cwnd = 10.0
        self.ssthresh = math.inf
        self.inflight = 0
        self.seq = 0
        self.recover = -1  # the window of the last decrease ends after this sequence number
        self.srtt: float | None = None
        self.delivered_bytes = 0
        self.bins: list[int] = []
        self.losses = 0
        self.decreases = 0
        self.on = False

    def start(self, _: Any = None) -> None:
        self.on = True
        self._pump()

    def stop(self, _: Any = None) -> None:
        self.on = False

    def _pump(self) -> None:
        up = self.up
        length = max(1, self.PACKET - up.params.overhead)
        while self.on and self.inflight < int(self.cwnd):
            seq = self.seq
            self.seq += 1
            self.inflight += 1
            arg = (seq, self.sim.now)
            if not up.send(length, self._arrive, arg):
                self.losses += 1
                rtt = self.srtt if self.srtt is not None else 2 * up.params.delay_ms / 1000
                self.sim.at(self.sim.now + rtt, self._lost, seq)

    def _arrive(self, arg: tuple[int, float]) -> None:
        add_to_bin(self.bins, self.sim.now, self.bin_s, self.MSS)
        self.delivered_bytes += self.MSS
        down = self.down
        if not down.send(max(1, self.ACK - down.params.overhead), self._acked, arg):
            self.sim.at(self.sim.now + down.params.delay_ms / 1000, self._acked, arg)

    def _acked(self, arg: tuple[int, float]) -> None:
        rtt = self.sim.now - arg[1]
        self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt
        self.inflight -= 1
        if self.cwnd < self.ssthresh:
            self.cwnd += 1.0
        else:
            self.cwnd += 1.0 / self.cwnd
        self._pump()

    def _lost(self, seq: int) -> None:
        self.inflight -= 1
        if seq > self.recover:
            self.decreases += 1
            self.cwnd = max(2.0, self.cwnd * self.BETA)
            self.ssthresh = self.cwnd
            self.recover = self.seq - 1
        self._pump()


# -- scenarios ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A path (two lines), flows over it, and how long to run. Lines: ``up`` carries a -> b
    (the bulk data), ``down`` b -> a (ACKs); both have ``rate_bps`` and half the RTT of
    delay; loss and the queue apply to both unless the ``down_*`` fields say otherwise."""

    rate_bps: float | None = 30e6
    rtt_ms: float = 40.0
    loss_pct: float = 0.0
    seconds: float = 20.0
    fec: str = "off"  # "off", "fixed", "adaptive": FecParams.mode of the default KcpParams
    flows: int = 1  # bulk flows a -> b sharing the line (ignored if flow_specs is given)
    flow_specs: tuple[FlowSpec, ...] | None = None
    ping_ms: float | None = None  # a ping through flow 0 every ping_ms
    # loss-based TCP flows beside the tunnel on the same lines (TcpFlow): (start_s, stop_s)
    tcp_flows: tuple[tuple[float, float | None], ...] = ()
    line_ping_ms: float | None = None  # a raw ping beside the tunnel every line_ping_ms
    queue_ms: float | None = 50.0
    queue_bytes: int | None = None
    overhead: int = OVERHEAD
    ge_gb_pct: float = 0.0
    ge_bg_pct: float = 0.0
    ge_loss_good_pct: float = 0.0
    ge_loss_bad_pct: float = 100.0
    loss_before_queue: bool = False
    down_rate_bps: float | None | str = "same"  # "same": rate_bps
    down_loss_pct: float | None = None  # None: loss_pct (GE applies to both either way)
    high_water: int = HIGH_WATER
    low_water: int = LOW_WATER
    msg_size: int = 1300
    record_mtu: int = RECORD_MTU
    bin_s: float = 0.1
    rx_coalesce_s: float = 0.0
    seed: int = 1
    # fields of KcpParams to set on both sides of every flow, e.g. {"send_window": 1024}
    kcp_options: dict[str, Any] | None = None
    # (flow index, side "a"|"b") -> KcpParams; None: KcpParams(fec=FecParams(mode=fec)) with
    # kcp_options (both ignored when this is given)
    kcp_params: Callable[[int, str], KcpParams] | None = None

    def line_params(self, direction: str) -> LineParams:
        rate = self.rate_bps
        loss = self.loss_pct
        if direction == "down":
            if self.down_rate_bps != "same":
                rate = self.down_rate_bps  # type: ignore[assignment]
            if self.down_loss_pct is not None:
                loss = self.down_loss_pct
        return LineParams(
            rate_bps=rate,
            delay_ms=self.rtt_ms / 2,
            queue_bytes=self.queue_bytes,
            queue_ms=self.queue_ms,
            overhead=self.overhead,
            loss_pct=loss,
            ge_gb_pct=self.ge_gb_pct,
            ge_bg_pct=self.ge_bg_pct,
            ge_loss_good_pct=self.ge_loss_good_pct,
            ge_loss_bad_pct=self.ge_loss_bad_pct,
            loss_before_queue=self.loss_before_queue,
        )

    def specs(self) -> tuple[FlowSpec, ...]:
        if self.flow_specs is not None:
            return self.flow_specs
        return tuple(FlowSpec() for _ in range(self.flows))

    def params_for(self, flow: int, side: str) -> KcpParams:
        if self.kcp_params is not None:
            return self.kcp_params(flow, side)
        return KcpParams(fec=FecParams(mode=self.fec), **(self.kcp_options or {}))


@dataclass
class FlowResult:
    index: int
    delivered_bytes: int  # a -> b data messages delivered in order (goodput bytes)
    goodput_bps: float  # over the whole run
    share: float  # of all flows' delivered bytes
    bins: list[int]  # delivered bytes per bin (a -> b)
    reverse_delivered_bytes: int  # b -> a data messages (reverse_bulk)
    new_segments: int  # a's KCP data segments sent for the first time (snd_nxt)
    push_segments: int  # a's KCP data segments on the wire, first sends and resends
    timeout_retransmissions: int  # a's resends after their RTO (ikcp's xmit)
    retransmission_ratio: float  # (push_segments - new_segments) / new_segments
    parity_records: int  # a's FEC parity shards
    records_out: int
    pause_events: int  # a's write buffer went over high_water
    max_pending_bytes: int  # the most a's write buffer held
    source_drops: int  # a's rate-source messages dropped while paused
    ping_rtt: list[float]
    ping_oneway: list[float]
    fec: dict[str, Any] | None  # a's FEC state and counters
    srtt_ms: int | None
    errors: int  # order / integrity errors in either direction (must be 0)
    error: str | None
    dead_at: float | None  # KCP gave up (dead_link)
    silence_at: float | None  # KcpConnection would have closed for silence_timeout here

    def summary(self) -> dict[str, Any]:
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("bins", "ping_rtt", "ping_oneway")
        }
        out["ping_rtt_p50_ms"] = _ms(percentile(self.ping_rtt, 50))
        out["ping_rtt_p99_ms"] = _ms(percentile(self.ping_rtt, 99))
        return out


@dataclass
class Result:
    scenario: Scenario
    flows: list[FlowResult]
    up: LineStats
    down: LineStats
    goodput_bps: float  # all flows a -> b, stream payload bytes in order, whole run
    utilisation: float  # goodput_bps / rate_bps (0 for an unlimited line)
    ideal_utilisation: float  # what a perfect sender would get (headers, overhead; no FEC)
    bins: list[int]  # all flows, delivered bytes per bin
    ping_rtt: list[float]  # through flow 0 (the tunnel)
    ping_oneway: list[float]
    line_ping_rtt: list[float]  # beside the tunnel
    tcp: list[TcpFlow]  # the loss-based flows beside the tunnel (Scenario.tcp_flows)
    errors: int
    events: int
    cpu_s: float

    def goodput_between(self, t0: float, t1: float, flow: int | None = None) -> float:
        """Goodput (bit/s) over whole bins within [t0, t1) of all flows or one."""
        bins = self.bins if flow is None else self.flows[flow].bins
        return bins_rate(bins, self.scenario.bin_s, t0, t1)

    def tcp_goodput_between(self, t0: float, t1: float, index: int = 0) -> float:
        """Goodput (bit/s) of a TCP flow beside the tunnel over whole bins within [t0, t1)."""
        return bins_rate(self.tcp[index].bins, self.scenario.bin_s, t0, t1)

    def utilisation_between(self, t0: float, t1: float) -> float:
        rate = self.scenario.rate_bps
        return self.goodput_between(t0, t1) / rate if rate else 0.0

    def shares_between(self, t0: float, t1: float) -> list[float]:
        """Each flow's share of the bytes delivered within [t0, t1)."""
        got = [self.goodput_between(t0, t1, i) for i in range(len(self.flows))]
        total = sum(got)
        return [g / total if total else 0.0 for g in got]

    @property
    def retransmission_ratio(self) -> float:
        new = sum(f.new_segments for f in self.flows)
        push = sum(f.push_segments for f in self.flows)
        return (push - new) / new if new else 0.0

    def summary(self) -> dict[str, Any]:
        s = self.scenario
        return {
            "rate_mbit": None if s.rate_bps is None else s.rate_bps / 1e6,
            "rtt_ms": s.rtt_ms,
            "loss_pct": s.loss_pct,
            "fec": s.fec,
            "seconds": s.seconds,
            "line_up": dataclasses.asdict(s.line_params("up")),
            "line_down": dataclasses.asdict(s.line_params("down")),
            "kcp_options": s.kcp_options,
            "custom_kcp_params": s.kcp_params is not None,
            "goodput_mbit": round(self.goodput_bps / 1e6, 3),
            "utilisation": round(self.utilisation, 4),
            "ideal_utilisation": round(self.ideal_utilisation, 4),
            "retransmission_ratio": round(self.retransmission_ratio, 4),
            "ping_rtt_p50_ms": _ms(percentile(self.ping_rtt, 50)),
            "ping_rtt_p99_ms": _ms(percentile(self.ping_rtt, 99)),
            "line_ping_rtt_p50_ms": _ms(percentile(self.line_ping_rtt, 50)),
            "line_ping_rtt_p99_ms": _ms(percentile(self.line_ping_rtt, 99)),
            "up": self.up.summary(),
            "down": self.down.summary(),
            "flows": [f.summary() for f in self.flows],
            "errors": self.errors,
            "events": self.events,
            "cpu_s": round(self.cpu_s, 3),
        }


def _line_rng(seed: int, name: str) -> random.Random:
    return random.Random(f"linksim:{seed}:{name}")


def run_scenario(sc: Scenario) -> Result:
    """Build the path and the flows, run ``sc.seconds`` of virtual time, collect figures."""
    cpu0 = time.process_time()
    sim = Sim()
    sim.end = sc.seconds
    up = Line(sim, sc.line_params("up"), _line_rng(sc.seed, "up"), "up")
    down = Line(sim, sc.line_params("down"), _line_rng(sc.seed, "down"), "down")
    pool = KcpPool()
    pairs: list[tuple[Endpoint, Endpoint]] = []
    specs = sc.specs()
    for i, spec in enumerate(specs):
        # the congestion controller's randomness (its probing phase) from the scenario's seed
        seed = sc.seed * 1009 + 2 * i
        la = KcpLink(sc.params_for(i, "a"), pool, sc.record_mtu, 0.0, seed=seed)
        lb = KcpLink(sc.params_for(i, "b"), pool, sc.record_mtu, 0.0, seed=seed + 1)
        common = (sc.high_water, sc.low_water, sc.msg_size, sc.bin_s, sc.rx_coalesce_s)
        a = Endpoint(sim, la, up, i, "a", *common)
        b = Endpoint(sim, lb, down, i, "b", *common)
        a.peer, b.peer = b, a
        pairs.append((a, b))
        if spec.bulk:
            sim.at(spec.start_s, a.start_bulk)
            if spec.stop_s is not None:
                sim.at(spec.stop_s, a.stop_bulk)
        if spec.reverse_bulk:
            sim.at(spec.start_s, b.start_bulk)
            if spec.stop_s is not None:
                sim.at(spec.stop_s, b.stop_bulk)
        if spec.rate_bps is not None:
            sim.at(spec.start_s, a.start_rate, spec)
        ping = spec.ping_ms if spec.ping_ms is not None else (sc.ping_ms if i == 0 else None)
        if ping is not None:
            sim.at(spec.start_s, a.start_ping, ping / 1000)
        # FEC offers and KCP's first update: the transport pumps once at the start
        sim.at(0.0, a.pump)
        sim.at(0.0, b.pump)
    pinger = None
    if sc.line_ping_ms is not None:
        pinger = LinePinger(sim, up, down, sc.line_ping_ms / 1000)
        sim.at(0.0, pinger.start)
    tcp: list[TcpFlow] = []
    for start_s, stop_s in sc.tcp_flows:
        flow = TcpFlow(sim, up, down, sc.bin_s)
        tcp.append(flow)
        sim.at(start_s, flow.start)
        if stop_s is not None:
            sim.at(stop_s, flow.stop)
    sim.run(sc.seconds)

    nbins = int(math.ceil(sc.seconds / sc.bin_s - 1e-9))
    total_bytes = sum(b.delivered_bytes for _, b in pairs)
    flows: list[FlowResult] = []
    for i, (a, b) in enumerate(pairs):
        link = a.link
        fec = None
        if link.fec is not None:
            fec = {"state": link.fec_state, **link.fec.stats.fields()}
        new = link.segments_sent or 0
        bins = (b.bins + [0] * nbins)[:nbins]
        flows.append(
            FlowResult(
                index=i,
                delivered_bytes=b.delivered_bytes,
                goodput_bps=b.delivered_bytes * 8 / sc.seconds,
                share=b.delivered_bytes / total_bytes if total_bytes else 0.0,
                bins=bins,
                reverse_delivered_bytes=a.delivered_bytes,
                new_segments=new,
                push_segments=a.push_segments,
                timeout_retransmissions=link.retransmissions or 0,
                retransmission_ratio=(a.push_segments - new) / new if new else 0.0,
                parity_records=a.parity_records,
                records_out=a.records_out,
                pause_events=a.pause_events,
                max_pending_bytes=a.max_pending,
                source_drops=a.source_drops,
                ping_rtt=a.ping_rtt,
                ping_oneway=b.ping_oneway,
                fec=fec,
                srtt_ms=link.srtt_ms,
                errors=a.receiver.errors + b.receiver.errors,
                error=b.receiver.error or a.receiver.error,
                dead_at=a.dead_at if a.dead_at is not None else b.dead_at,
                silence_at=a.silence_at if a.silence_at is not None else b.silence_at,
            )
        )
        link.close()
        b.link.close()
    all_bins = [sum(col) for col in zip(*(f.bins for f in flows), strict=True)] if flows else []
    goodput = total_bytes * 8 / sc.seconds
    rate = sc.rate_bps
    msg = min(sc.msg_size, sc.record_mtu - KCP_HEADER)
    return Result(
        scenario=sc,
        flows=flows,
        up=up.stats,
        down=down.stats,
        goodput_bps=goodput,
        utilisation=goodput / rate if rate else 0.0,
        ideal_utilisation=msg / (msg + KCP_HEADER + sc.overhead),
        bins=all_bins,
        ping_rtt=flows[0].ping_rtt if flows else [],
        ping_oneway=flows[0].ping_oneway if flows else [],
        line_ping_rtt=pinger.rtt if pinger is not None else [],
        tcp=tcp,
        errors=sum(f.errors for f in flows),
        events=sim.events,
        cpu_s=time.process_time() - cpu0,
    )

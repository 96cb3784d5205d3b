"""The layers between DTLS and the frame stream on kcp://: FEC (optional) and KCP. Sans-IO.

    DTLS record plaintext  <->  FEC shard | bare KCP output  <->  KCP  <->  frame stream

``KcpLink`` takes decrypted DTLS record payloads and the time, and returns stream bytes for
the session layer; stream bytes written to it come out as record payloads for DTLS. KCP's
own output buffer (one or more segments, at most its MTU) is one record, as kcp-go does.

FEC is used towards a peer only after it has shown it speaks it: while FEC is *offered*,
our data goes out as bare KCP segments (what PoleVPN's Go side expects) and a small FEC
control shard (a loss report) is sent now and then; a peer that understands it answers in
kind, and from the first valid shard we receive, our data goes out as FEC shards. The Go
side feeds an unknown first byte to KCP, which rejects it as a foreign conversation and
drops it, so offering costs nothing there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from polevpn.config import KcpParams
from polevpn.kcp._ikcp import urgent_packet
from polevpn.kcp.congestion import Bbr, RateSample
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.packet.gso import Packet
from polevpn.proto.wire import C2S_IPDATA, S2C_IPDATA

if TYPE_CHECKING:
    from polevpn.kcp import fec as fec_mod
    from polevpn.kcp._ikcp import Kcp

# the commands of frames that carry one IP packet, as bytes 2-3 of their header hold them
_IPDATA = (S2C_IPDATA.to_bytes(2, "big"), C2S_IPDATA.to_bytes(2, "big"))

CONV = 0  # PoleVPN uses conversation id 0 on every kcp:// session
# KCP receive window (segments) towards a peer that has not authenticated yet: enough for
# AUTH, and it bounds what an unauthenticated peer can make us buffer (out-of-order
# segments waiting for sn 0, in-order ones waiting to be read) to about 2 x 32 segments
PRE_AUTH_WINDOW = 32
# ACKs queued within one batch of records before they are sent anyway: bounds ikcp's ACK
# list, which grows with every in-window segment (repeats too) and never shrinks
ACK_FLUSH = 512
OFFER_INTERVAL = 0.5  # s, how often an unanswered FEC offer is repeated
# pacing: the bucket holds this much time at the pacing rate (at least PACE_BURST_SEGMENTS
# segments), so that a timer that fires a little late does not cost rate
PACE_BURST_TIME = 0.003  # s
PACE_BURST_SEGMENTS = 2
PACE_MIN_WAIT = 0.001  # s: timers no finer than this
# with congestion control, the bytes waiting to be sent are bounded by time at the pacing
# rate (the transport's write buffer): a longer queue is only delay (bufferbloat) for every
# flow in the tunnel, and TCP inside reads the drops beyond it as congestion
QUEUE_TIME = 0.03  # s
QUEUE_FLOOR_SEGMENTS = 16
# urgent packets (a ping, a TCP ACK: _ikcp.c frame_urgent) are still taken when the queue
# is at its budget, up to this share of the budget more: a full queue of bulk data must
# not cost a call its audio or a download its ACKs (they go ahead of the queue, so this
# headroom is not delay for them; it bounds what a flood of small packets may add)
URGENT_HEADROOM = 0.5
# ... and while the peer reports at least this loss on what we send (FEC's loss reports),
# each goes a second time this long after the first (a later datagram): a lost ping or
# ACK otherwise waits a round trip or more for its resend (the ping's p99 on a lossy line)
URGENT_DUP_LOSS_PPM = 1000
URGENT_DUP_MS = 10
MIN_RTO_MS = 30  # ikcp's own floor in nodelay mode
RTO_RTT_FACTOR = 1.5  # with congestion control: the RTO is at least this x the least RTT

FEC_OFF = "off"
FEC_OFFERED = "offered"
FEC_ON = "on"


@dataclass
class LinkStats:
    records_in: int = 0
    records_out: int = 0
    kcp_errors: int = 0
    stream_bytes_in: int = 0
    stream_bytes_out: int = 0


class KcpLink:
    def __init__(
        self,
        params: KcpParams,
        pool: KcpPool,
        record_mtu: int,
        now: float,
        authenticated: bool = True,
        seed: int | None = None,
    ) -> None:
        """``authenticated`` False (the router's side, until AUTH succeeds): a small KCP
        receive window and no FEC decoding, see ``authenticate``. ``seed``: the congestion
        controller's randomness (its probing phase), for reproducible simulations."""
        self.params = params
        self.pool = pool
        self.stats = LinkStats()
        fp = params.fec
        self.fec: fec_mod.FecSession | None = None
        self.fec_state = FEC_OFF
        if fp.enabled:
            from polevpn.kcp import fec as fec_mod

            self._fec_mod = fec_mod
            self.fec = fec_mod.FecSession(
                fec_mod.FecConfig(
                    data_shards=fp.data_shards,
                    parity_shards=fp.parity_shards,
                    group_timeout=fp.group_timeout,
                    adaptive=fp.mode == "adaptive",
                )
            )
            self.fec_state = FEC_OFFERED
            # sized for FEC even before it is on: KCP's MTU is fixed for the session
            kcp_mtu = fec_mod.max_payload(record_mtu)
        else:
            kcp_mtu = record_mtu
        self.kcp_mtu = kcp_mtu
        self._out: list[bytes] = []
        # False while the reader above is full: data stays in KCP, whose receive window then
        # closes and stops the sender
        self.reading = True
        # time received data waited behind a missing segment (in-order delivery held up)
        self._hole_time = 0.0
        self._hole_since: float | None = None
        self._t0 = now
        self._next_offer = now
        self.cc: Bbr | None = None
        send_window = params.send_window
        if params.congestion == "bbr":
            # the controller's in-flight cap does the limiting; the send window (a span of
            # sequence numbers) only has to cover the holes that loss leaves in it
            send_window = params.max_window
        resend = params.resend
        if self.fec is not None and params.resend > 0:
            # a lost segment that the group's parity will rebuild is acknowledged once the
            # parity is in: only acknowledgements from beyond its group mean it is lost
            # for good, so wait for those before resending it (issue 16)
            resend += params.fec.data_shards + params.fec.parity_shards
        self.kcp: Kcp | None = pool.acquire(
            CONV,
            self.kcp_mtu,
            params.nodelay,
            params.interval,
            resend,
            params.no_congestion_window,
            send_window,
            params.receive_window,
        )
        # without FEC each KCP output buffer is a record as it is: straight into the list
        self.kcp.set_output(self._on_output if self.fec is not None else self._out.append)
        self.mss = self.kcp_mtu - 24
        self._parity_bytes = 0  # FEC parity sent (paced with the data)
        self._parity_ratio = 0.0  # parity bytes per data byte, recently
        self._ratio_mark = (0, 0)  # (payload sent, parity sent) when it was last worked out
        self._minrto = 0
        if params.congestion == "bbr":
            self.cc = Bbr(self.mss, now, params.max_window * self.mss, seed=seed)
        self.authenticated = authenticated
        # the peer agreed "unordered" (docs/protocol.md section 14): our writes go as
        # messages of whole frames that it may deliver ahead of a hole. Off for good once a
        # write was not whole frames: what follows would be parsed from inside a frame
        self.unordered_send = False
        # ... all of them, or only light ones (kcp.unordered "light": _ikcp.c, frame_light)
        self._unordered_light = params.unordered == "light"
        # ... and small light packets ahead of the queue (kcp.urgent)
        self._urgent = params.urgent
        self._urgent_dup_ms = -1  # what Kcp.set_urgent_dup was last given (-1: its default)
        self.misaligned_writes = 0
        if authenticated:
            self._repeat_acks()
            self.kcp.set_unordered(True)
        if not authenticated:
            self.kcp.set_rcv_wnd(min(PRE_AUTH_WINDOW, params.receive_window))
            if self.fec is not None:
                self.fec.decoding = False
        self.kcp.tick(self._us(now))
        if self.cc is not None:
            self._apply_cc()

    def authenticate(self, now: float) -> None:
        """The peer has authenticated: the configured receive window (announced at once,
        so its sender need not wait for a probe) and FEC decoding."""
        if self.authenticated:
            return
        self.authenticated = True
        if self.fec is not None:
            self.fec.decoding = True
        kcp = self.kcp
        if kcp is None:
            return
        # only a peer that agreed marks messages so (Go's KCP never does): from one that
        # passed AUTH, they go up as they come
        kcp.set_unordered(True)
        send_window = self.params.max_window if self.cc is not None else self.params.send_window
        kcp.wndsize(send_window, self.params.receive_window)
        self._repeat_acks()
        self.announce_window(now)

    # -- clock (KCP's: microseconds since the link began; ikcp takes whole ms of it)

    def _us(self, now: float) -> int:
        return int((now - self._t0) * 1_000_000)

    # -- congestion control

    def _apply_cc(self) -> None:
        """The controller's rate and in-flight cap into KCP."""
        cc, kcp = self.cc, self.kcp
        assert cc is not None and kcp is not None
        rate = cc.pacing_rate
        burst = max(PACE_BURST_SEGMENTS * self.kcp_mtu, int(rate * PACE_BURST_TIME))
        kcp.set_pacing(max(int(rate), 1), burst)
        kcp.set_cwnd_bytes(cc.cwnd)

    def _on_sample(self, kcp: Kcp, now: float) -> None:
        t = kcp.take_rate_sample()
        if t is None:
            return
        cc = self.cc
        assert cc is not None
        rs = RateSample.from_tuple(t)
        # FEC parity is paced with the data (``pace_debit``): the model counts it
        cc.sample_scale = 1.0 + self._parity_ratio
        cc.on_sample(rs, kcp.inflight, now)
        if cc.round_start:
            fec = self.fec
            self._update_urgent_dup(kcp)
            if fec is not None:
                # a round trip that delivered most of what the line carries: parity would
                # take data's place (fec.py). Not "no app-limited sample": a TCP flow inside
                # the tunnel leaves the queue empty now and then in every round trip
                fec.saturated = cc.line_full
            sent, parity = self._ratio_mark
            d = kcp.sent_bytes - sent
            if d > 0:
                ratio = min((self._parity_bytes - parity) / d, 1.0)
                self._parity_ratio = 0.5 * self._parity_ratio + 0.5 * ratio
                self._ratio_mark = (kcp.sent_bytes, self._parity_bytes)
        if rs.min_rtt_us >= 0:
            # a paced sender's RTT is steady, so KCP's RTO (srtt + 4 x rttvar) closes in on
            # it; the queue a bandwidth probe builds (a quarter of a round trip) then made
            # whole windows time out at once and be sent again. Keep the RTO above the
            # probe's RTT
            minrto = max(MIN_RTO_MS, int(cc.min_rtt * 1000 * RTO_RTT_FACTOR))
            if minrto != self._minrto:
                self._minrto = minrto
                kcp.set_minrto(minrto)
        self._apply_cc()

    def _update_urgent_dup(self, kcp: Kcp) -> None:
        """Urgent messages once the peer agreed unordered (with kcp.urgent); each goes
        twice while the peer reports loss (URGENT_DUP_LOSS_PPM; without FEC's loss
        reports, never)."""
        fec = self.fec
        lossy = (
            fec is not None
            and self.fec_state == FEC_ON
            and fec.stats.peer_loss_ppm >= URGENT_DUP_LOSS_PPM
        )
        ms = URGENT_DUP_MS if lossy else 0
        if not (self.unordered_send and self._urgent):
            ms = -1  # no copies, and paced data is numbered at once, as KCP does
        if ms != self._urgent_dup_ms:
            self._urgent_dup_ms = ms
            kcp.set_urgent_dup(ms)

    def _repeat_acks(self) -> None:
        """As a receiver, with congestion control on: an ACK of a segment beyond a hole
        goes out twice (two flushes apart). Nothing else covers its loss until the hole is
        filled, so its sender (ours or Go's) resends it on a timeout for nothing: at 2 %
        loss each way that was some 7 % of what a sender sent. Costs ACK bytes only while
        there is a hole, and 1 kB per session, so not before AUTH."""
        if self.cc is not None and self.kcp is not None:
            self.kcp.set_repeat_acks(True)

    def _grow_receive_window(self, kcp: Kcp) -> None:
        """Receive-window autotuning: a peer whose data (out of order, or in order and not
        yet read) fills half our window is held back by it; double it, up to max_window.
        The window goes to the peer in every segment's header."""
        if not self.authenticated:
            return
        wnd = kcp.rcv_wnd
        if wnd < self.params.max_window and kcp.nrcv_buf + kcp.nrcv_que > wnd // 2:
            kcp.set_rcv_wnd(min(2 * wnd, self.params.max_window))

    # -- KCP output -> records

    def _on_output(self, data: bytes) -> None:
        if self.fec_state == FEC_ON:
            assert self.fec is not None
            shards = self.fec.send(data, self._now)
            if len(shards) > 1:
                self._parity(shards, len(data))
            self._out.extend(shards)
        else:
            self._out.append(data)

    def _parity(self, shards: list[bytes], data_len: int) -> None:
        """Shards FEC just made besides KCP's own data: their bytes come out of the pacing
        budget. ``data_len``: the payload of the data shard among them (-1: none is)."""
        n = sum(map(len, shards))
        if data_len >= 0:
            n -= data_len + self._fec_mod.HEADER_LEN
        self._parity_bytes += n
        kcp = self.kcp
        if self.cc is not None and kcp is not None:
            kcp.pace_debit(n)

    _now = 0.0

    def records_to_send(self) -> list[bytes]:
        # the list itself stays: KCP's output appends to it
        out = self._out.copy()
        self._out.clear()
        self.stats.records_out += len(out)
        return out

    # -- stream in (from the session layer)

    def write(self, data: bytes | memoryview, now: float) -> None:
        """Queue stream bytes; message mode, each message at most one MSS as kcp-go does."""
        kcp = self.kcp
        if kcp is None:
            return
        self._now = now
        self.stats.stream_bytes_out += len(data)
        if self.unordered_send:
            if not kcp.write_frames(data, self._unordered_light, self._urgent)[1]:
                self.unordered_send = False
                self.misaligned_writes += 1
        else:
            kcp.write(data)
        kcp.tick(self._us(now))
        kcp.flush()

    # -- records in (from DTLS)

    def receive(self, record: bytes, now: float) -> bytes:
        """One decrypted record; returns stream bytes now in order (maybe empty)."""
        self.feed(record, now)
        return self.settle(now)

    def feed(self, record: bytes, now: float) -> None:
        """One decrypted record into FEC and KCP. ACKs and stream bytes wait for ``settle``,
        so a burst of records read in one go costs one ACK datagram, not one each."""
        kcp = self.kcp
        if kcp is None or not record:
            return
        self._now = now
        self.stats.records_in += 1
        kcp.clock(self._us(now))
        fec = self.fec
        if record[0] == 0:
            payloads: list[bytes] | tuple[bytes, ...] = (record,)
        elif fec is not None and self._fec_mod.is_fec_shard(record):
            before = fec.stats.received
            payloads = fec.receive(record, now)
            if self.fec_state == FEC_OFFERED and fec.stats.received > before:
                self.fec_state = FEC_ON
        else:
            self.stats.kcp_errors += 1
            return
        for p in payloads:
            if kcp.input(p) < 0:
                # a foreign conversation id or a malformed segment: KCP ignores it, so do we
                self.stats.kcp_errors += 1
        if kcp.ackcount >= ACK_FLUSH:
            kcp.flush()

    def settle(self, now: float) -> bytes:
        """After a batch of ``feed``: ACK at once and return the stream bytes now in order."""
        kcp = self.kcp
        if kcp is None:
            return b""
        self._now = now
        # immediate ACKs, as PoleVPN sets: the sender's window opens one RTT sooner
        kcp.tick(self._us(now))
        if self.cc is not None:
            self._on_sample(kcp, now)
            self._grow_receive_window(kcp)
        kcp.flush()
        if kcp.nrcv_buf:
            if self._hole_since is None:
                self._hole_since = now
        elif self._hole_since is not None:
            self._hole_time += now - self._hole_since
            self._hole_since = None
        return self.drain() if self.reading else b""

    def drain(self) -> bytes:
        """Stream bytes KCP holds in order."""
        kcp = self.kcp
        if kcp is None:
            return b""
        data = kcp.recv_all()
        self.stats.stream_bytes_in += len(data)
        return data

    def announce_window(self, now: float) -> None:
        """Tell the peer our receive window has opened again, without waiting for its
        zero-window probe (KCP first probes after 7 s)."""
        kcp = self.kcp
        if kcp is None:
            return
        kcp.ask_tell()
        kcp.tick(self._us(now))
        kcp.flush()

    # -- timers

    def poll(self, now: float) -> None:
        kcp = self.kcp
        if kcp is None:
            return
        self._now = now
        kcp.tick(self._us(now))
        if self.cc is not None and (kcp.nsnd_que or kcp.buf_bytes > kcp.inflight):
            # data held back by the pacing: its tokens may be there by now
            kcp.flush()
        fec = self.fec
        if fec is not None:
            if self.fec_state == FEC_ON:
                shards = fec.poll(now)
                if shards:
                    self._parity(shards, -1)
                self._out.extend(shards)
            elif self.fec_state == FEC_OFFERED and now >= self._next_offer:
                self._next_offer = now + OFFER_INTERVAL
                self._out.extend(fec.offer(now))

    def next_deadline(self, now: float) -> float | None:
        """When ``poll`` must run next; None while nothing is in flight."""
        kcp = self.kcp
        if kcp is None:
            return None
        deadline = None
        if kcp.waitsnd() > 0:
            deadline = now + self.params.interval / 1000
            if self.cc is not None:
                wait = kcp.pace_wait_us()
                if wait:
                    deadline = min(deadline, now + max(wait / 1e6, PACE_MIN_WAIT))
        fec = self.fec
        if fec is not None:
            if self.fec_state == FEC_ON:
                d = fec.next_deadline()
            elif self.fec_state == FEC_OFFERED:
                d = self._next_offer
            else:
                d = None
            if d is not None and (deadline is None or d < deadline):
                deadline = d
        return deadline

    # -- state

    @property
    def pending_bytes(self) -> int:
        """Payload bytes queued or unacknowledged in KCP: the transport's write-buffer size.
        Real bytes (counted by the extension as segments come and go), not segments times
        the MSS, which made 100-byte packets weigh 13 times their size."""
        kcp = self.kcp
        return kcp.snd_bytes if kcp is not None else 0

    @property
    def queued_bytes(self) -> int:
        """The transport's write-buffer size. With congestion control, the payload bytes
        not yet sent: what is in flight is the controller's business (its cap follows the
        path's bandwidth-delay product, which no fixed buffer limit can), what waits is
        queueing delay. Without, every byte queued or unacknowledged, as before."""
        kcp = self.kcp
        if kcp is None:
            return 0
        if self.cc is None:
            return kcp.snd_bytes
        return kcp.snd_bytes - kcp.inflight

    @property
    def queue_budget(self) -> int | None:
        """With congestion control, the most ``queued_bytes`` should reach: QUEUE_TIME at
        the estimated line rate (not the pacing rate, which the draining phase lowers for
        a round trip: the queue then grows, as it should, and must not overflow for it).
        None without (the configured limits hold as they are)."""
        cc = self.cc
        if cc is None:
            return None
        rate = max(cc.btl_bw, cc.pacing_rate)
        return max(QUEUE_FLOOR_SEGMENTS * self.mss, int(rate * QUEUE_TIME))

    @property
    def urgent_budget(self) -> int | None:
        """The most ``queued_bytes`` may reach with urgent packets (``urgent_packet``)
        once the queue is at its budget; None while they do not go ahead of the queue
        (no congestion control, not agreed with the peer, or kcp.urgent off)."""
        budget = self.queue_budget
        if budget is None or not (self.unordered_send and self._urgent):
            return None
        return budget + int(budget * URGENT_HEADROOM)

    def urgent_room(self) -> int:
        """Bytes of urgent packets that may still be queued (0: none, or not agreed)."""
        limit = self.urgent_budget
        return max(0, limit - self.queued_bytes) if limit is not None else 0

    @property
    def urgent_segments(self) -> int:
        """Urgent messages that went ahead of data waiting to be sent."""
        return self.kcp.urgent_segments if self.kcp is not None else 0

    @property
    def urgent_copies(self) -> int:
        """Urgent segments sent a second time (the peer reported loss)."""
        return self.kcp.urgent_dups if self.kcp is not None else 0

    @property
    def early_deliveries(self) -> int | None:
        """Messages delivered ahead of a hole (the peer sent them unordered)."""
        return self.kcp.early_segments if self.kcp is not None else None

    @property
    def hole_seconds(self) -> float:
        """How long received data has waited behind a missing segment, in all (segments
        beyond a hole are held until a resend or FEC fills it): on a lossy line, the time
        in-order delivery costs what the tunnel carries."""
        since = self._hole_since
        return self._hole_time + (max(0.0, self._now - since) if since is not None else 0.0)

    @property
    def dead(self) -> bool:
        """KCP gave up on a segment after ``dead_link`` retransmissions."""
        if self.kcp is None:
            return True
        return self.kcp.state == 0xFFFFFFFF

    @property
    def srtt_ms(self) -> int | None:
        return self.kcp.srtt if self.kcp is not None else None

    @property
    def retransmissions(self) -> int | None:
        """Segments sent again after their retransmission timeout (ikcp's ``xmit``)."""
        return self.kcp.xmit if self.kcp is not None else None

    @property
    def segments_sent(self) -> int | None:
        """Data segments sent for the first time (ikcp's ``snd_nxt``: each new segment
        takes the next sequence number; resends do not), the base of a retransmission
        ratio."""
        return self.kcp.snd_nxt if self.kcp is not None else None

    def close(self) -> None:
        """Free what the session holds now (KCP's segments, FEC's receive groups), not
        when the last reference to it goes: the API or a log line may still hold one."""
        if self.kcp is not None:
            self.pool.release(self.kcp)
            self.kcp = None
        if self.fec is not None:
            self.fec.release()


def urgent_of(packets: Sequence[Packet], room: int, skip: int = 0) -> list[Packet]:
    """The urgent packets (``urgent_packet``: small ICMP, UDP and TCP without payload)
    among ``packets``, as many as ``room`` bytes take; for a queue that is full of bulk
    data, and only then: a Python loop over the packets. ``skip``: bytes before each IP
    packet (a virtio-net header, whose second byte, the GSO type, is 0 for one packet)."""
    out: list[Packet] = []
    for p in packets:
        if room <= 0:
            break
        if skip:
            if len(p) <= skip or p[1]:
                continue
            ip: Packet = memoryview(p)[skip:]
        else:
            ip = p
        if urgent_packet(ip):
            out.append(p)
            room -= len(ip)
    return out


def urgent_frames(
    parts: Sequence[bytes | memoryview], start: int, room: int
) -> list[bytes | memoryview]:
    """The same for frames (headers and bodies, alternating, from ``start``): the IPDATA
    frames whose packet is urgent, headers with them, as many as ``room`` bytes take.
    SUPER_IPDATA frames are TCP bulk and never urgent."""
    out: list[bytes | memoryview] = []
    for i in range(start, len(parts) - 1, 2):
        if room <= 0:
            break
        head, body = parts[i], parts[i + 1]
        if head[2:4] not in _IPDATA or not urgent_packet(body):
            continue
        out.append(head)
        out.append(body)
        room -= len(head) + len(body)
    return out

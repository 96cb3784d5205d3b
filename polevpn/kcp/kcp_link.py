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

from dataclasses import dataclass
from typing import TYPE_CHECKING

from polevpn.config import KcpParams
from polevpn.kcp.kcp_pool import KcpPool

if TYPE_CHECKING:
    from polevpn.kcp import fec as fec_mod
    from polevpn.kcp._ikcp import Kcp

CONV = 0  # PoleVPN uses conversation id 0 on every kcp:// session
# KCP receive window (segments) towards a peer that has not authenticated yet: enough for
# AUTH, and it bounds what an unauthenticated peer can make us buffer (out-of-order
# segments waiting for sn 0, in-order ones waiting to be read) to about 2 x 32 segments
PRE_AUTH_WINDOW = 32
# ACKs queued within one batch of records before they are sent anyway: bounds ikcp's ACK
# list, which grows with every in-window segment (repeats too) and never shrinks
ACK_FLUSH = 512
OFFER_INTERVAL = 0.5  # s, how often an unanswered FEC offer is repeated

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
    ) -> None:
        """``authenticated`` False (the router's side, until AUTH succeeds): a small KCP
        receive window and no FEC decoding, see ``authenticate``."""
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
        self._t0 = now
        self._next_offer = now
        self.kcp: Kcp | None = pool.acquire(
            CONV,
            self.kcp_mtu,
            params.nodelay,
            params.interval,
            params.resend,
            params.no_congestion_window,
            params.send_window,
            params.receive_window,
        )
        # without FEC each KCP output buffer is a record as it is: straight into the list
        self.kcp.set_output(self._on_output if self.fec is not None else self._out.append)
        self.mss = self.kcp_mtu - 24
        self.authenticated = authenticated
        if not authenticated:
            self.kcp.set_rcv_wnd(min(PRE_AUTH_WINDOW, params.receive_window))
            if self.fec is not None:
                self.fec.decoding = False
        self.kcp.update(self._ms(now))

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
        kcp.wndsize(self.params.send_window, self.params.receive_window)
        self.announce_window(now)

    # -- clock

    def _ms(self, now: float) -> int:
        return int((now - self._t0) * 1000) & 0xFFFFFFFF

    # -- KCP output -> records

    def _on_output(self, data: bytes) -> None:
        if self.fec_state == FEC_ON:
            assert self.fec is not None
            self._out.extend(self.fec.send(data, self._now))
        else:
            self._out.append(data)

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
        kcp.write(data)
        kcp.update(self._ms(now))
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
        kcp.update(self._ms(now))
        kcp.flush()
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
        kcp.update(self._ms(now))
        kcp.flush()

    # -- timers

    def poll(self, now: float) -> None:
        kcp = self.kcp
        if kcp is None:
            return
        self._now = now
        kcp.update(self._ms(now))
        fec = self.fec
        if fec is not None:
            if self.fec_state == FEC_ON:
                self._out.extend(fec.poll(now))
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

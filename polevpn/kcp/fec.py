"""Forward error correction between DTLS and KCP on kcp:// (sans-IO: no sockets, no clocks).

    UDP datagram -> DTLS record -> FEC shard | bare KCP segment -> KCP

The sender groups KCP output buffers ("payloads") into groups of up to ``data_shards``
and adds parity shards of a systematic Reed-Solomon code (:mod:`polevpn.kcp.gf256`), so the
receiver rebuilds up to ``m`` lost payloads of a group without waiting for KCP to
retransmit. Data shards leave at once; only parity waits for the group to fill or for
``group_timeout`` (a lone ping is never held back). Order does not matter: KCP reorders.

Shard header, 12 bytes, big-endian::

    0  u8   magic 0xF3      a bare KCP segment starts with conversation id 0 (4 zero bytes)
    1  u8   kind << 6 | index
            kind 0 data    index = position in the group, 0..63
            kind 1 parity  index = parity row j, 0..m-1
            kind 2 report  index = 0
    2  u32  seq             per sender, +1 for every shard of any kind: the receiver
                            measures loss from the gaps
    6  u32  group           group id, +1 per group (0 in reports)
    10 u8   k               parity: number of data shards of the group, 1..64 (a group closed
                            by the timer has fewer than configured); data and report: 0
    11 u8   m               data and parity: parity shards of the group, 0..64 (fixed when
                            the group opens); report: 0

    data    header | u16 n | payload (n bytes)
    parity  header | coded region of length L
    report  header | u32 expected | u32 lost   (shards the reporter should have received
                                                over its last interval, and how many did not
                                                come)

The coded region of a data shard is everything after the header, ``u16 n | payload``,
zero-padded to the group's longest; parity ``j`` is ``XOR_i P[j][i] * region_i`` over
GF(256), so a rebuilt region gives back the exact payload. A data shard's region is sent
unpadded. Data shards of a group with ``m = 0`` need no receive state at all.

Adaptive parity: every ``report_interval`` in which it received shards, a session sends a
loss report. The sender keeps a decaying sum of the reports and picks the smallest parity
``m`` such that P(more than ``m`` of ``k + m`` shards lost) stays under
``residual_target`` at ``loss_margin`` times the estimated loss rate. More parity applies
from the next group on; less only after ``down_reports`` reports in a row asked for it,
one step at a time, so it does not flap, and a clean link decays to no parity at all
(data shards still carry the header, so loss stays measurable).

Receiving never raises: malformed shards, duplicates and shards of groups already
forgotten are counted in :class:`FecStats` and dropped, except that a late data shard is
still delivered (KCP drops a duplicate segment itself; dropping a real one would cost a
retransmission). Until ``decoding`` is switched on (the peer has authenticated), data
shards only pass their payloads on and parity shards are dropped: no receive state at all.
Groups larger than this side's own ``data_shards`` and ``parity_shards`` are not decoded
(counted in ``oversized``; a data shard's payload still goes to KCP), and decoding is
bounded by a token bucket of ``decode_rate`` groups per second per session
(``decodes_refused``).
Receive state is bounded by ``rx_groups`` groups and ``rx_bytes`` bytes of
shards (the oldest group goes first; no shard is longer than ``max_shard``), and a group is
forgotten once ``rx_group_ttl`` has passed since its first shard (checked by ``poll`` and
whenever a group opens, so it needs no timer of its own).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import NamedTuple

from polevpn.common.counters import Counters
from polevpn.kcp import gf256

MAGIC = 0xF3
KIND_DATA = 0
KIND_PARITY = 1
KIND_REPORT = 2

MAX_DATA_SHARDS = 64  # the 6-bit index
MAX_PARITY_SHARDS = 64
MAX_PAYLOAD = 0xFFFF  # the u16 length

_HEADER = struct.Struct(">BBIIBB")
_DATA = struct.Struct(">BBIIBBH")  # header and the payload length
_REPORT = struct.Struct(">BBIIBBII")
_U16 = struct.Struct(">H")
HEADER_LEN = _HEADER.size
DATA_OVERHEAD = _DATA.size
REPORT_LEN = _REPORT.size

_MASK32 = 0xFFFFFFFF
_HALF32 = 0x80000000
_SEQ_JUMP = 1 << 16  # a larger forward jump in seq is a restarted peer, not loss

_unpack_header = _HEADER.unpack_from
_pack_data = _DATA.pack
_pack_header_into = _HEADER.pack_into
_unpack_u16 = _U16.unpack_from
_matmul = gf256.matmul
_parity_matrix = gf256.parity_matrix
_decode_matrix = gf256.decode_matrix


def is_fec_shard(datagram: bytes | bytearray | memoryview) -> bool:
    """True for an FEC shard, False for a bare KCP segment (or anything else)."""
    return len(datagram) > 0 and datagram[0] == MAGIC


def max_payload(budget: int) -> int:
    """Largest payload whose data shard fits ``budget`` bytes (then so do its parity
    shards): the MTU to give KCP when records are at most ``budget`` bytes."""
    n = budget - DATA_OVERHEAD
    if n < 1:
        raise ValueError(f"a budget of {budget} bytes leaves no room for a payload")
    return min(n, MAX_PAYLOAD)


class FecError(ValueError):
    """A bad FecConfig or a payload that cannot be sent (never raised by ``receive``)."""


@dataclass(frozen=True)
class FecConfig:
    data_shards: int = 10
    parity_shards: int = 3  # fixed mode: always; adaptive: the most the controller uses
    group_timeout: float = 0.020  # s: parity of a group not full by then goes out anyway
    adaptive: bool = False
    report_interval: float = 0.5  # s between loss reports while shards are coming in
    rx_groups: int = 256  # receive groups kept at most (bounds memory)
    # shards longer than this are dropped: no peer's DTLS record is (dtls_mtu is at most 9000)
    max_shard: int = 9216
    # bytes of shards held for decoding; beyond it the oldest groups are forgotten first
    rx_bytes: int = 4 << 20
    rx_group_ttl: float = 1.0  # s: KCP has retransmitted by then, recovery is pointless
    # decodes (groups rebuilt from parity) per second at most, and the burst allowed; a
    # 10+3 decode costs 30-80 us, so this bounds one session to about 16% of a core
    decode_rate: float = 2000.0
    decode_burst: float = 400.0
    # adaptive controller
    residual_target: float = 0.01  # acceptable P(a group loses more than its parity)
    # ... while the line is full (``FecSession.saturated``): each parity shard then takes
    # the place of a data segment, and KCP's retransmission repairs a loss for one
    # segment where parity costs several, so parity covers only the common case (at 2 %
    # loss none, at 5 % one shard in ten; a cubic sender inside got 57 against 62-66 % of
    # a 30 Mbit/s line at 2 % loss with 0.1)
    saturated_residual_target: float = 0.3
    loss_margin: float = 1.5  # the measured rate is scaled by this before sizing parity
    loss_memory: float = 0.5  # weight of the history at each report (per-report decay)
    min_samples: int = 20  # a report counts as covering at least this many shards
    down_reports: int = 3  # reports in a row asking for less parity before one step down

    def __post_init__(self) -> None:
        if not 1 <= self.data_shards <= MAX_DATA_SHARDS:
            raise FecError(f"data_shards must be 1..{MAX_DATA_SHARDS}")
        if not 0 <= self.parity_shards <= MAX_PARITY_SHARDS:
            raise FecError(f"parity_shards must be 0..{MAX_PARITY_SHARDS}")
        if not self.group_timeout > 0 or not self.report_interval > 0:
            raise FecError("group_timeout and report_interval must be positive")
        if self.rx_groups < 1 or not self.rx_group_ttl > 0:
            raise FecError("rx_groups and rx_group_ttl must be positive")
        if not 0 < self.residual_target < 1 or not 0 < self.saturated_residual_target < 1:
            raise FecError("residual targets must be in (0, 1)")
        if self.loss_margin < 1:
            raise FecError("loss_margin must be at least 1")
        if not 0 <= self.loss_memory < 1 or self.min_samples < 1 or self.down_reports < 1:
            raise FecError("bad loss_memory, min_samples or down_reports")
        if not self.decode_rate > 0 or self.decode_burst < 1:
            raise FecError("decode_rate must be positive and decode_burst at least 1")


@dataclass
class FecStats(Counters):
    data_sent: int = 0
    parity_sent: int = 0
    received: int = 0  # valid shards of any kind (duplicates excluded)
    recovered: int = 0  # payloads rebuilt from parity
    duplicates: int = 0
    late: int = 0  # shards of groups already forgotten
    undecoded: int = 0  # parity shards dropped while decoding is off (peer not authenticated)
    # shards of groups larger than configured (k > data_shards or m > parity_shards): their
    # groups are not kept (a data shard's payload still goes to KCP)
    oversized: int = 0
    decodes_refused: int = 0  # groups given up because the decode budget was spent
    malformed: int = 0
    unrecoverable: int = 0  # groups forgotten with data missing and too little parity
    reports_sent: int = 0
    reports_received: int = 0
    parity: int = 0  # parity shards per group now
    # Two directions: ``parity`` follows ``peer_loss_ppm`` (what the peer reports on our
    # shards), never ``loss_ppm`` (what we measure on the peer's). On a line whose queue
    # drops only our bulk data the first is high while the second is 0 (issue 19, bug 12):
    # export and read them side by side, never one for the other.
    loss_ppm: int = 0  # loss measured on what we receive, last report interval
    peer_loss_ppm: int = 0  # loss the peer measures on what we send (smoothed)


class Header(NamedTuple):
    """A parsed shard header (see the module docstring), from :func:`parse_header`."""

    kind: int
    index: int
    seq: int
    group: int
    k: int
    m: int


def parse_header(datagram: bytes | bytearray | memoryview) -> Header | None:
    """(kind, index, seq, group, k, m) of a shard, None when it is not one."""
    if len(datagram) < HEADER_LEN or datagram[0] != MAGIC:
        return None
    _, ki, seq, group, k, m = _unpack_header(datagram)
    return Header(ki >> 6, ki & 63, seq, group, k, m)


def parity_for_loss(k: int, loss: float, max_parity: int, residual_target: float) -> int:
    """Smallest m <= max_parity with P(Binomial(k + m, loss) > m) <= residual_target."""
    if loss <= 0:
        return 0
    if loss >= 1:
        return max_parity
    q = 1 - loss
    for m in range(max_parity + 1):
        n = k + m
        # P(X <= m), summed in the log domain so large n cannot underflow q**n
        ok = sum(
            math.exp(
                math.lgamma(n + 1)
                - math.lgamma(x + 1)
                - math.lgamma(n - x + 1)
                + x * math.log(loss)
                + (n - x) * math.log(q)
            )
            for x in range(m + 1)
        )
        if 1 - ok <= residual_target:
            return m
    return max_parity


class _RxGroup:
    """Receive state of one group: the shards kept for decoding, and which came."""

    __slots__ = (
        "t0",
        "k",
        "m",
        "length",
        "data",
        "parity",
        "nd",
        "np",
        "dmask",
        "pmask",
        "dmax",
        "done",
        "held",
    )

    def __init__(self, t0: float, m: int) -> None:
        self.t0 = t0
        self.k = 0  # data shards in the group; 0 until a parity shard tells
        self.m = m
        self.length = 0  # coded length (parity region), 0 until known
        self.data: list[bytes | None] | None = [None] * MAX_DATA_SHARDS
        self.parity: list[bytes | None] | None = [None] * m
        self.nd = 0
        self.np = 0
        self.dmask = 0  # bit i: data shard i came (or was rebuilt)
        self.pmask = 0
        self.dmax = 0  # longest data region seen
        self.done = False  # all data delivered; shards freed, masks kept for duplicates
        self.held = 0  # bytes of shards kept


class FecSession:
    """FEC towards one peer, both directions. Feed it payloads, shards and the time."""

    def __init__(self, config: FecConfig | None = None) -> None:
        self.config = cfg = config if config is not None else FecConfig()
        self.stats = FecStats()
        self._k = cfg.data_shards
        self._timeout = cfg.group_timeout
        self._report_interval = cfg.report_interval
        self.parity = 0 if cfg.adaptive else cfg.parity_shards
        self.stats.parity = self.parity
        # -- send
        self._seq = 0
        self._tx_gid = 0
        self._tx_n = 0  # data shards in the open group
        self._tx_m = 0  # its parity count, fixed when it opened
        self._tx_t0 = 0.0
        self._tx_shards: list[bytes] = []
        # -- receive
        self._groups: dict[int, _RxGroup] = {}
        self._held = 0  # bytes of shards in all groups
        self._max_shard = cfg.max_shard
        self._floor: int | None = None  # groups before this one are forgotten
        self._rx_hi = -1  # highest seq seen; -1 before the first shard
        self._rx_expected = 0  # seqs the highest one advanced over, this interval
        self._rx_base = 0  # stats.received when this interval began
        self._next_report: float | None = None  # armed by the first shard of an interval
        # False until the peer has authenticated: data shards go straight to KCP and
        # parity is dropped, so an unauthenticated peer gets no receive state and no
        # decoding work out of us
        self.decoding = True
        # the largest groups accepted: what this side is configured for (a larger group
        # costs more to decode than anything we agreed to)
        self._max_k = cfg.data_shards
        self._max_m = cfg.parity_shards
        # decode budget: a token bucket, refilled at decode_rate per second
        self._tokens = cfg.decode_burst
        self._tokens_at: float | None = None
        # -- adaptive controller
        self._est_lost = 0.0
        self._est_expected = 0.0
        self._down = 0
        self._saturated = False

    # -- send

    def send(self, payload: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """The data shard for ``payload``, plus the group's parity if this filled it."""
        n = len(payload)
        if n > MAX_PAYLOAD:
            raise FecError(f"payload of {n} bytes exceeds {MAX_PAYLOAD}")
        idx = self._tx_n
        out: list[bytes] | None = None
        if idx and now - self._tx_t0 >= self._timeout:
            out = self._close_group()
            idx = 0
        if not idx:
            self._tx_m = self.parity
            self._tx_t0 = now
        m = self._tx_m
        seq = self._seq
        shard = _pack_data(MAGIC, idx, seq, self._tx_gid, 0, m, n) + payload
        self._seq = (seq + 1) & _MASK32
        self._tx_n = idx = idx + 1
        self.stats.data_sent += 1
        if m:
            self._tx_shards.append(shard)
        if out is None:
            out = [shard]
        else:
            out.append(shard)
        if idx >= self._k:
            out += self._close_group()
        return out

    def _close_group(self) -> list[bytes]:
        """Close the open group; its parity shards (none if it has m = 0)."""
        k, m, shards = self._tx_n, self._tx_m, self._tx_shards
        gid = self._tx_gid
        self._tx_gid = (gid + 1) & _MASK32
        self._tx_n = 0
        if not m:
            return []
        self._tx_shards = []
        length = max(map(len, shards)) - HEADER_LEN
        size = HEADER_LEN + length
        bufs = [bytearray(size) for _ in range(m)]
        seq = self._seq
        kind = KIND_PARITY << 6
        for j, buf in enumerate(bufs):
            _pack_header_into(buf, 0, MAGIC, kind | j, (seq + j) & _MASK32, gid, k, m)
        self._seq = (seq + m) & _MASK32
        # the coded regions sit behind the headers, in place
        _matmul(_parity_matrix(k, m), m, shards, bufs, length, HEADER_LEN, HEADER_LEN)
        self.stats.parity_sent += m
        return [bytes(b) for b in bufs]

    def poll(self, now: float) -> list[bytes]:
        """Timers: parity of a group open for ``group_timeout``, a loss report when due.
        Also forgets receive groups older than ``rx_group_ttl``."""
        out: list[bytes] = []
        if self._tx_n and now - self._tx_t0 >= self._timeout:
            out = self._close_group()
        if self._next_report is not None and now >= self._next_report:
            out.append(self._report())
        self._expire(now)
        return out

    def next_deadline(self) -> float | None:
        """When ``poll`` has work next; None while nothing waits (an idle link sleeps)."""
        deadline = self._tx_t0 + self._timeout if self._tx_n and self._tx_m else None
        r = self._next_report
        if r is not None and (deadline is None or r < deadline):
            deadline = r
        return deadline

    def offer(self, now: float) -> list[bytes]:
        """A loss report to send right away: probes whether the peer speaks FEC (one that
        does counts it as a valid shard and answers with shards of its own)."""
        return [self._report()]

    def _report(self) -> bytes:
        expected, count = self._rx_expected, self.stats.received - self._rx_base
        lost = max(0, expected - count)
        self._rx_expected = 0
        self._rx_base = self.stats.received
        self._next_report = None
        if expected:
            self.stats.loss_ppm = lost * 1_000_000 // expected
        shard = _REPORT.pack(MAGIC, KIND_REPORT << 6, self._seq, 0, 0, 0, expected, lost)
        self._seq = (self._seq + 1) & _MASK32
        self.stats.reports_sent += 1
        return shard

    # -- receive

    def receive(self, datagram: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """Payloads for KCP from one shard: a data shard's own payload at once, plus any
        payloads its group's parity now rebuilds. Never raises."""
        n = len(datagram)
        if n < HEADER_LEN or datagram[0] != MAGIC or n > self._max_shard:
            self.stats.malformed += 1
            return []
        if type(datagram) is not bytes:
            datagram = bytes(datagram)  # kept in group state: must not change under us
        _, ki, seq, gid, k, m = _unpack_header(datagram)
        if ki >= 64:
            if ki >> 6 == KIND_PARITY:
                return self._receive_parity(datagram, n, ki & 63, seq, gid, k, m, now)
            if ki == KIND_REPORT << 6 and n >= REPORT_LEN:
                self._receive_report(datagram, seq, now)
            else:
                self.stats.malformed += 1
            return []
        # a data shard, the common case: kept inline
        if (
            n < DATA_OVERHEAD
            or k
            or m > MAX_PARITY_SHARDS
            or (datagram[12] << 8 | datagram[13]) != n - DATA_OVERHEAD
        ):
            self.stats.malformed += 1
            return []
        out = [datagram[DATA_OVERHEAD:]]
        if m and (m > self._max_m or ki >= self._max_k):
            # a group larger than we decode: keep nothing of it, pass the payload on
            self.stats.oversized += 1
            m = 0
        if m and self.decoding:
            group = self._groups.get(gid)
            if group is None:
                if self._is_forgotten(gid):
                    self.stats.late += 1
                    self._account(seq, now)
                    return out
                group = self._new_group(gid, m, now)
            elif group.m != m or (group.k and (ki >= group.k or n - HEADER_LEN > group.length)):
                self.stats.malformed += 1
                return []
            bit = 1 << ki
            if group.dmask & bit:
                self.stats.duplicates += 1
                return []
            group.dmask |= bit
            if not group.done:  # (a real peer cannot send more after done)
                group.data[ki] = datagram  # type: ignore[index]
                group.held += n
                self._held += n
                group.nd += 1
                if n - HEADER_LEN > group.dmax:
                    group.dmax = n - HEADER_LEN
                if group.k:
                    self._progress(group, out, now)
        # _account() for the usual case, inline: the next seq of an ongoing interval
        hi = self._rx_hi
        d = (seq - hi) & _MASK32
        if 0 < d < _SEQ_JUMP and hi >= 0 and self._next_report is not None:
            self.stats.received += 1
            self._rx_hi = seq
            self._rx_expected += d
        else:
            self._account(seq, now)
        return out

    def _account(self, seq: int, now: float) -> None:
        """A valid, new shard: loss accounting by seq, and arm the next report."""
        self.stats.received += 1
        hi = self._rx_hi
        d = (seq - hi) & _MASK32
        if 0 < d < _SEQ_JUMP and hi >= 0:
            self._rx_hi = seq
            self._rx_expected += d
        elif hi < 0 or _SEQ_JUMP <= d < _HALF32:
            # the first shard, or the peer restarted its numbering: not loss
            self._rx_hi = seq
            self._rx_expected += 1
        # else reordered or repeated: received now, expected was counted with the gap
        if self._next_report is None:
            self._next_report = now + self._report_interval

    def _receive_parity(
        self, datagram: bytes, n: int, j: int, seq: int, gid: int, k: int, m: int, now: float
    ) -> list[bytes]:
        length = n - HEADER_LEN
        if not (0 < k <= MAX_DATA_SHARDS and j < m <= MAX_PARITY_SHARDS) or length < 2:
            self.stats.malformed += 1
            return []
        if not self.decoding:
            self.stats.undecoded += 1
            self._account(seq, now)
            return []
        if k > self._max_k or m > self._max_m:
            self.stats.oversized += 1
            self._account(seq, now)
            return []
        group = self._groups.get(gid)
        if group is None:
            if self._is_forgotten(gid):
                self.stats.late += 1
                self._account(seq, now)
                return []
            group = self._new_group(gid, m, now)
        elif group.m != m or (group.k and (group.k != k or group.length != length)):
            self.stats.malformed += 1
            return []
        bit = 1 << j
        if group.pmask & bit:
            self.stats.duplicates += 1
            return []
        if not group.k:
            if group.dmask >> k or group.dmax > length:
                # data shards this parity cannot have been computed over: a broken sender
                self.stats.malformed += 1
                return []
            group.k = k
            group.length = length
        self._account(seq, now)
        group.pmask |= bit
        out: list[bytes] = []
        if group.done:
            return out
        group.parity[j] = datagram  # type: ignore[index]
        group.held += n
        self._held += n
        group.np += 1
        self._progress(group, out, now)
        return out

    def _progress(self, group: _RxGroup, out: list[bytes], now: float) -> None:
        """The group's size is known: finish it, rebuilding lost data if parity allows."""
        k = group.k
        if group.nd >= k:
            self._finish(group)
            return
        if group.nd + group.np < k:
            return
        if not self._take_token(now):
            # over budget: give the group up (KCP retransmits what it lacked)
            self.stats.decodes_refused += 1
            self._finish(group)
            return
        data, parity = group.data, group.parity
        assert data is not None and parity is not None
        lost = tuple(i for i in range(k) if data[i] is None)
        rows = tuple(j for j, p in enumerate(parity) if p is not None)[: len(lost)]
        srcs = [parity[j] for j in rows]
        srcs += [d for d in data[:k] if d is not None]
        length = group.length
        bufs = [bytearray(length) for _ in lost]
        _matmul(_decode_matrix(k, lost, rows), len(lost), srcs, bufs, length, HEADER_LEN)
        self._finish(group)
        for buf in bufs:
            size = _unpack_u16(buf)[0]
            if size > length - 2:
                self.stats.malformed += 1  # inconsistent shards decode to garbage
                continue
            out.append(bytes(buf[2 : 2 + size]))
            self.stats.recovered += 1

    def _take_token(self, now: float) -> bool:
        cfg = self.config
        last = self._tokens_at
        tokens = self._tokens
        if last is not None and now > last:
            tokens = min(cfg.decode_burst, tokens + (now - last) * cfg.decode_rate)
        self._tokens_at = now
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True

    def _finish(self, group: _RxGroup) -> None:
        group.done = True
        group.dmask = (1 << group.k) - 1
        group.data = group.parity = None
        self._held -= group.held
        group.held = 0

    def _receive_report(self, datagram: bytes, seq: int, now: float) -> None:
        expected, lost = _REPORT.unpack_from(datagram)[6:]
        if lost > expected:
            self.stats.malformed += 1
            return
        self._account(seq, now)
        self.stats.reports_received += 1
        if expected:
            self._on_report(expected, lost)

    # -- receive groups: creation, forgetting

    def _new_group(self, gid: int, m: int, now: float) -> _RxGroup:
        groups = self._groups
        self._expire(now)
        cfg = self.config
        while groups and (len(groups) >= cfg.rx_groups or self._held > cfg.rx_bytes):
            self._forget(next(iter(groups)))
        group = groups[gid] = _RxGroup(now, m)
        return group

    def _expire(self, now: float) -> None:
        groups = self._groups
        limit = now - self.config.rx_group_ttl
        while groups:
            gid = next(iter(groups))
            if groups[gid].t0 > limit:
                break
            self._forget(gid)

    def _forget(self, gid: int) -> None:
        group = self._groups.pop(gid)
        self._held -= group.held
        if not group.done and group.k and group.nd < group.k:
            self.stats.unrecoverable += 1
        floor = self._floor
        nxt = (gid + 1) & _MASK32
        if floor is None or 0 < (nxt - floor) & _MASK32 < _HALF32:
            self._floor = nxt

    def _is_forgotten(self, gid: int) -> bool:
        floor = self._floor
        return floor is not None and (floor - 1 - gid) & _MASK32 < _HALF32

    def release(self) -> None:
        """The session is over: drop every shard kept (receive groups, the open send
        group); the counters stay readable."""
        self._groups.clear()
        self._held = 0
        self._tx_shards = []
        self._tx_n = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of shards kept for decoding, at most about ``rx_bytes`` plus one group."""
        return self._held

    @property
    def open_groups(self) -> int:
        """Receive groups held (finished ones are kept, without their shards, to spot
        duplicates)."""
        return len(self._groups)

    # -- adaptive parity

    @property
    def saturated(self) -> bool:
        """Whether the line is full (the congestion controller's view): parity is then
        sized for ``saturated_residual_target`` instead of ``residual_target``."""
        return self._saturated

    @saturated.setter
    def saturated(self, value: bool) -> None:
        if value == self._saturated:
            return
        self._saturated = value
        cfg = self.config
        if not cfg.adaptive or not self._est_expected:
            return
        target = self._target()
        if value and target < self.parity:
            # the line just filled up: make room for data at once, not three reports later
            self.parity = target
            self._down = 0
            self.stats.parity = target

    def _target(self) -> int:
        cfg = self.config
        rate = self._est_lost / max(self._est_expected, cfg.min_samples)
        residual = cfg.saturated_residual_target if self._saturated else cfg.residual_target
        return parity_for_loss(self._k, rate * cfg.loss_margin, cfg.parity_shards, residual)

    def _on_report(self, expected: int, lost: int) -> None:
        cfg = self.config
        keep = cfg.loss_memory
        self._est_lost = self._est_lost * keep + lost
        self._est_expected = self._est_expected * keep + expected
        rate = self._est_lost / max(self._est_expected, cfg.min_samples)
        self.stats.peer_loss_ppm = int(rate * 1_000_000)
        if not cfg.adaptive:
            return
        target = self._target()
        if target > self.parity:
            self.parity = target
            self._down = 0
            if self._tx_n and not self._tx_m:
                # an open group without parity: let the next payload start one with parity
                self._close_group()
        elif target < self.parity:
            self._down += 1
            if self._down >= cfg.down_reports:
                self.parity -= 1
                self._down = 0
        else:
            self._down = 0
        self.stats.parity = self.parity

"""What the transport under a gateway connection knows about its path: RTT and retransmissions.

Read when the API or ``/metrics`` is asked, never per packet: the kernel's ``TCP_INFO`` for
tls://, KCP's control block (through ``KcpLink``) for kcp://.

``loss`` is the share of the data segments this side (the router) sent on the connection
that were retransmissions, since the connection began. It estimates loss on the path
towards the gateway, and a little more than that: a lost ACK also costs a resend.

- tls://: ``tcpi_total_retrans / tcpi_data_segs_out`` (the kernel counts resends in both).
- kcp://: ``xmit / (snd_nxt + xmit)``: KCP's resends after a timeout over first sends plus
  those resends. Fast retransmissions (on duplicate ACKs) are counted by neither.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

# struct tcp_info (linux/tcp.h): eight u8 fields, then u32s from offset 8. tcpi_rtt (µs) is
# the 16th u32; tcpi_total_retrans follows tcpi_rcv_space; then four u64s (pacing rates,
# bytes acked and received), tcpi_segs_out, tcpi_segs_in, tcpi_notsent_bytes, tcpi_min_rtt,
# tcpi_data_segs_in and tcpi_data_segs_out (Linux 4.6).
TCPI_RTT = 68
TCPI_TOTAL_RETRANS = 100
TCPI_SEGS_OUT = 136
TCPI_DATA_SEGS_OUT = 156
# older kernels return less; newer ones no more than asked for
TCP_INFO_LEN = 160


@dataclass(frozen=True, slots=True)
class TcpInfo:
    rtt_us: int
    total_retrans: int | None
    segs_out: int | None
    data_segs_out: int | None


def tcp_info(transport: object) -> TcpInfo | None:
    """The fields of the kernel's TCP_INFO of ``transport``'s socket that the kernel
    returned, or None (no TCP socket, or no TCP_INFO on this system)."""
    get = getattr(transport, "get_extra_info", None)
    sock = get("socket") if get is not None else None
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    except (OSError, AttributeError, TypeError):
        return None

    def u32(offset: int) -> int | None:
        # the kernel copies min(asked, its struct's size): a field past the end is unknown
        return struct.unpack_from("=I", info, offset)[0] if len(info) >= offset + 4 else None

    rtt = u32(TCPI_RTT)
    if rtt is None:
        return None
    return TcpInfo(rtt, u32(TCPI_TOTAL_RETRANS), u32(TCPI_SEGS_OUT), u32(TCPI_DATA_SEGS_OUT))


@dataclass(frozen=True, slots=True)
class PathFigures:
    """RTT and retransmissions of one connection; None where the transport cannot tell."""

    rtt_ms: float | None = None
    retransmissions: int | None = None
    # data segments sent, resends included
    segments_sent: int | None = None

    @property
    def loss(self) -> float | None:
        """Retransmitted share of the data segments sent (see the module docstring); None
        when unknown or before anything was sent."""
        if self.retransmissions is None or not self.segments_sent:
            return None
        return min(1.0, self.retransmissions / self.segments_sent)


def path_figures(transport: object, transport_name: str) -> PathFigures:
    if transport_name == "kcp":
        return transport_figures(transport, transport_name).path
    info = tcp_info(transport) if transport is not None else None
    if info is None:
        return PathFigures()
    return PathFigures(info.rtt_us / 1000, info.total_retrans, info.data_segs_out)


# -- one connection's transport figures, as the read models (router.view, gateway.view) give
# them to operations: the one place that reads a transport for the API, /metrics and the logs


@dataclass(frozen=True, slots=True)
class FecFigures:
    """A kcp:// link's FEC session (``FecStats``) at one moment."""

    parity: int
    parity_sent: int
    recovered: int
    unrecoverable: int
    # what this side receives (last report interval), and what the peer reports on what this
    # side sends (smoothed; adaptive parity follows it), as ratios
    loss: float
    peer_loss: float
    # work refused: oversized groups, parity before AUTH, groups over the decode budget
    oversized: int
    undecoded: int
    decodes_refused: int


@dataclass(frozen=True, slots=True)
class CongestionFigures:
    """The sender's congestion controller (polevpn.kcp.congestion) at one moment."""

    state: str  # startup, drain, probe_bw, probe_rtt
    pacing_rate: float  # bytes/s
    bottleneck_bandwidth: float  # bytes/s, the estimate (0: none yet)
    min_rtt: float | None  # s
    cwnd: int  # bytes the controller lets be in flight
    inflight: int  # bytes sent and not acknowledged
    queued: int  # bytes waiting to be sent
    queue_budget: int  # the most that may wait (bytes)
    # how often the model was corrected, and why (Bbr's counters of the same names)
    queue_corrections: int = 0  # a standing queue of ours: estimate cut to the delivered rate
    foreign_queues: int = 0  # a standing queue draining did not shrink: not cut (a TCP's)
    path_changes: int = 0  # the minimum RTT replaced by a much larger one
    startup_queue_exits: int = 0  # STARTUP ended by a queue rather than by a flat rate


@dataclass(frozen=True, slots=True)
class KcpFigures:
    """KCP's control block and FEC of a kcp:// link at one moment."""

    srtt_ms: float | None
    retransmissions: int | None
    fec_state: str
    fec: FecFigures | None
    congestion: CongestionFigures | None = None
    hole_seconds: float = 0.0  # received data held behind a missing segment, in all
    urgent_ahead: int = 0  # urgent messages that went ahead of queued data
    urgent_copies: int = 0  # urgent segments sent a second time (the peer reported loss)


@dataclass(frozen=True, slots=True)
class TransportFigures:
    """What the transport of one connection knows: its path, and KCP's figures on kcp://."""

    path: PathFigures = PathFigures()
    kcp: KcpFigures | None = None


def transport_figures(transport: object, transport_name: str) -> TransportFigures:
    """``transport``'s figures; a kcp:// transport holds its ``KcpLink`` as extra info."""
    if transport is None:
        return TransportFigures()
    if transport_name != "kcp":
        return TransportFigures(path_figures(transport, transport_name))
    # KCP's control block: srtt, and xmit / (snd_nxt + xmit) (the module docstring)
    get = getattr(transport, "get_extra_info", None)
    link = get("kcp_link") if get is not None else None
    if link is None:
        return TransportFigures()
    kcp = kcp_figures(link)
    resent, first = link.retransmissions, link.segments_sent
    path = PathFigures(
        kcp.srtt_ms, resent, None if resent is None or first is None else first + resent
    )
    return TransportFigures(path, kcp)


def kcp_figures(link: Any) -> KcpFigures:
    """A ``KcpLink``'s KCP and FEC figures at this moment."""
    srtt = link.srtt_ms
    fec = None
    if link.fec is not None:
        s = link.fec.stats
        fec = FecFigures(
            parity=s.parity,
            parity_sent=s.parity_sent,
            recovered=s.recovered,
            unrecoverable=s.unrecoverable,
            loss=s.loss_ppm / 1e6,
            peer_loss=s.peer_loss_ppm / 1e6,
            oversized=s.oversized,
            undecoded=s.undecoded,
            decodes_refused=s.decodes_refused,
        )
    return KcpFigures(
        None if srtt is None else float(srtt),
        link.retransmissions,
        link.fec_state,
        fec,
        congestion_figures(link),
        link.hole_seconds,
        link.urgent_segments,
        link.urgent_copies,
    )


def congestion_figures(link: Any) -> CongestionFigures | None:
    cc, kcp = link.cc, link.kcp
    if cc is None or kcp is None:
        return None
    return CongestionFigures(
        state=cc.state,
        pacing_rate=cc.pacing_rate,
        bottleneck_bandwidth=cc.btl_bw,
        min_rtt=None if cc.min_rtt == float("inf") else cc.min_rtt,
        cwnd=cc.cwnd,
        inflight=kcp.inflight,
        queued=link.queued_bytes,
        queue_budget=link.queue_budget or 0,
        queue_corrections=cc.queue_corrections,
        foreign_queues=cc.foreign_queues,
        path_changes=cc.path_changes,
        startup_queue_exits=cc.startup_queue_exits,
    )

"""Prometheus metrics for the router and the gateway, served from the daemon's own loop.

Nothing here runs per packet: when ``/metrics`` is scraped, the collectors take a snapshot
of the daemon's read model (``polevpn.router.view``, ``polevpn.gateway.view``: the counters
the daemons already keep, each connection's packets and bytes, KCP's control block and the
FEC session's stats) through the callable they were given.

The HTTP side is ``polevpn.ops.httpserver`` on the daemon's loop rather than
``prometheus_client.start_http_server``: that one runs a thread, and the gateway drops its
capabilities thread by thread while the router may switch to another uid after binding.
Every scrape gets one response and a close; a request is bounded in size and time, and so
is the number of clients at once (with a reserve for loopback ones). The rendered page is
kept for CACHE_SECONDS, so a flood of scrapes costs one rendering a second, and an optional
bearer token (``metrics_token``) keeps the page from anyone without it.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from polevpn.cluster.view import ClusterView
from polevpn.direct.rendezvous import RendezvousView
from polevpn.gateway.view import GATEWAY_DROPS, DirectView, GatewayView, UplinkView
from polevpn.io.pathstats import KcpFigures
from polevpn.ops import httpserver
from polevpn.router.view import ROUTER_DROPS, ConnectionView, RouterView, SiteView

MAX_REQUEST = 4096  # bytes of request line and headers; a GET needs a fraction of that
REQUEST_TIMEOUT = 5.0  # s for the whole request to arrive, and again for the reply to leave
HEADER_TIMEOUT = 2.0  # s for the request head to arrive
# s a rendered page is served again: Prometheus scrapes every 15-60 s, so nobody who scrapes
# sanely sees a difference, and 250 scrapes a second cost one rendering a second
CACHE_SECONDS = 1.0

__all__ = ["GATEWAY_DROPS", "ROUTER_DROPS", "MetricsServer", "serve"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- collectors


def _counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    m = CounterMetricFamily(name, doc, labels=list(labels) if labels else None)
    m.add_metric(list(labels.values()) if labels else [], value)
    return m


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


class _LinkMetrics:
    """KCP and FEC figures of kcp:// links, one sample per label set."""

    def __init__(self, prefix: str, label_names: list[str]) -> None:
        self.retransmissions = CounterMetricFamily(
            f"{prefix}kcp_retransmissions",
            "KCP segments sent again after their retransmission timeout (ikcp xmit)",
            labels=label_names,
        )
        self.srtt = GaugeMetricFamily(
            f"{prefix}kcp_srtt_seconds", "KCP's smoothed round-trip time", labels=label_names
        )
        self.recovered = CounterMetricFamily(
            f"{prefix}fec_recovered",
            "payloads rebuilt from FEC parity shards (losses KCP did not have to resend)",
            labels=label_names,
        )
        self.unrecoverable = CounterMetricFamily(
            f"{prefix}fec_unrecoverable",
            "FEC groups given up with data missing and too little parity",
            labels=label_names,
        )
        self.parity_sent = CounterMetricFamily(
            f"{prefix}fec_parity_sent", "FEC parity shards sent", labels=label_names
        )
        self.parity = GaugeMetricFamily(
            f"{prefix}fec_parity_shards",
            "parity shards per FEC group now (adaptive mode moves it with the loss)",
            labels=label_names,
        )
        # Two directions, two figures (issue 19, bug 12). fec_parity_shards follows the loss
        # the *peer* reports on the shards this side sends (peer_loss_ppm, smoothed), the
        # same direction as kcp_retransmissions and loss_ratio. fec_loss_ratio is the other
        # direction: what this side receives. Behind a rate-limited line the loss is all in
        # the direction of the bulk data (the queue drops it), so a sender showed parity at
        # its maximum with fec_loss_ratio 0.0 next to a loss_ratio of 0.3: both true, but
        # the figure that explained the parity was not exported.
        self.loss = GaugeMetricFamily(
            f"{prefix}fec_loss_ratio",
            "loss FEC measures on the shards this side receives (the peer's direction; "
            "last report interval)",
            labels=label_names,
        )
        self.peer_loss = GaugeMetricFamily(
            f"{prefix}fec_peer_loss_ratio",
            "loss the peer reports on the shards this side sends (smoothed): what adaptive "
            "parity (fec_parity_shards) follows",
            labels=label_names,
        )
        # the sender's congestion controller (kcp.congestion "bbr")
        self.pacing_rate = GaugeMetricFamily(
            f"{prefix}kcp_pacing_rate_bits", "rate the sender paces at (bit/s)",
            labels=label_names,
        )
        self.btl_bw = GaugeMetricFamily(
            f"{prefix}kcp_bottleneck_bandwidth_bits",
            "the controller's estimate of the path's bottleneck rate (bit/s)",
            labels=label_names,
        )
        self.min_rtt = GaugeMetricFamily(
            f"{prefix}kcp_min_rtt_seconds", "least RTT seen over the last 10 s",
            labels=label_names,
        )
        self.cwnd = GaugeMetricFamily(
            f"{prefix}kcp_cwnd_bytes", "bytes the controller lets be in flight",
            labels=label_names,
        )
        self.inflight = GaugeMetricFamily(
            f"{prefix}kcp_inflight_bytes", "bytes sent and not acknowledged",
            labels=label_names,
        )
        self.queued = GaugeMetricFamily(
            f"{prefix}kcp_queued_bytes",
            "bytes waiting to be sent (bounded to 30 ms at the pacing rate)",
            labels=label_names,
        )
        self.cc_state = GaugeMetricFamily(
            f"{prefix}kcp_congestion_state",
            "1 for the controller's state (startup, drain, probe_bw, probe_rtt)",
            labels=[*label_names, "state"],
        )
        self.hole = CounterMetricFamily(
            f"{prefix}kcp_hole_seconds",
            "time received data waited behind a missing segment (KCP delivers in order: "
            "what FEC did not repair waits for a resend), in all",
            labels=label_names,
        )
        self.urgent = CounterMetricFamily(
            f"{prefix}kcp_urgent",
            "urgent packets (small ICMP, UDP, TCP without payload; kcp.urgent): ahead (went "
            "ahead of data queued for sending), copy (sent a second time on a lossy line)",
            labels=[*label_names, "kind"],
        )
        self.cc_events = CounterMetricFamily(
            f"{prefix}kcp_congestion_events",
            "corrections of the controller's model: queue (a standing queue of its own cut "
            "the estimate), foreign_queue (a queue draining did not shrink, another flow's: "
            "not cut), path_change (a much larger minimum RTT), startup_queue (STARTUP left "
            "on a queue)",
            labels=[*label_names, "event"],
        )
        self.refused = CounterMetricFamily(
            f"{prefix}fec_refused",
            "FEC work refused: shards of groups larger than configured (oversized), parity "
            "before AUTH (unauthenticated), groups over the decode budget (budget)",
            labels=[*label_names, "reason"],
        )

    def add(self, labels: list[str], kcp: KcpFigures) -> None:
        if kcp.srtt_ms is not None and kcp.retransmissions is not None:
            self.retransmissions.add_metric(labels, kcp.retransmissions)
            self.srtt.add_metric(labels, kcp.srtt_ms / 1000)
            self.hole.add_metric(labels, kcp.hole_seconds)
            self.urgent.add_metric([*labels, "ahead"], kcp.urgent_ahead)
            self.urgent.add_metric([*labels, "copy"], kcp.urgent_copies)
        c = kcp.congestion
        if c is not None:
            self.pacing_rate.add_metric(labels, c.pacing_rate * 8)
            self.btl_bw.add_metric(labels, c.bottleneck_bandwidth * 8)
            if c.min_rtt is not None:
                self.min_rtt.add_metric(labels, c.min_rtt)
            self.cwnd.add_metric(labels, c.cwnd)
            self.inflight.add_metric(labels, c.inflight)
            self.queued.add_metric(labels, c.queued)
            self.cc_state.add_metric([*labels, c.state], 1)
            self.cc_events.add_metric([*labels, "queue"], c.queue_corrections)
            self.cc_events.add_metric([*labels, "foreign_queue"], c.foreign_queues)
            self.cc_events.add_metric([*labels, "path_change"], c.path_changes)
            self.cc_events.add_metric([*labels, "startup_queue"], c.startup_queue_exits)
        s = kcp.fec
        if s is not None:
            self.recovered.add_metric(labels, s.recovered)
            self.unrecoverable.add_metric(labels, s.unrecoverable)
            self.parity_sent.add_metric(labels, s.parity_sent)
            self.parity.add_metric(labels, s.parity)
            self.loss.add_metric(labels, s.loss)
            self.peer_loss.add_metric(labels, s.peer_loss)
            self.refused.add_metric([*labels, "oversized"], s.oversized)
            self.refused.add_metric([*labels, "unauthenticated"], s.undecoded)
            self.refused.add_metric([*labels, "budget"], s.decodes_refused)

    def families(self) -> list[Metric]:
        return [
            self.retransmissions,
            self.srtt,
            self.hole,
            self.urgent,
            self.pacing_rate,
            self.btl_bw,
            self.min_rtt,
            self.cwnd,
            self.inflight,
            self.queued,
            self.cc_state,
            self.cc_events,
            self.recovered,
            self.unrecoverable,
            self.parity_sent,
            self.parity,
            self.loss,
            self.peer_loss,
            self.refused,
        ]


class RouterCollector(Collector):
    """The router's metrics, from a fresh snapshot of its read model at each collection."""

    P = "polevpn_router_"

    def __init__(self, view: Callable[[], RouterView]) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        v = self.view()
        p = self.P
        stats = v.stats
        yield from self._per_gateway(v)
        yield from self._per_link(v)

        by_transport = GaugeMetricFamily(
            f"{p}connections",
            "open gateway connections, registered or not yet",
            labels=["transport"],
        )
        for name in ("tls", "kcp"):
            by_transport.add_metric([name], v.connections.get(name, 0))
        yield by_transport
        yield _gauge(
            f"{p}registered_gateways",
            "gateways registered now (a multi-link gateway counts once)",
            len(v.gateways),
        )
        links = v.links
        by_state = GaugeMetricFamily(
            f"{p}links", "links of multi-link gateways, by state", labels=["state"]
        )
        up = sum(1 for c in links if c.link is not None and c.link.up)
        by_state.add_metric(["up"], up)
        by_state.add_metric(["down"], len(links) - up)
        yield by_state
        yield _gauge(
            f"{p}pending_connections",
            "connections accepted and not yet registered (counted against the limits)",
            v.pending,
        )
        yield _gauge(f"{p}routes", "prefixes in the routing table", len(v.routes))

        drops = CounterMetricFamily(
            f"{p}dropped_packets", "packets the router dropped, by reason", labels=["reason"]
        )
        for reason, value in v.drops.items():
            drops.add_metric([reason], value)
        yield drops
        yield _counter(
            f"{p}forwarded_packets", "packets forwarded to a gateway", stats["packets_forwarded"]
        )
        yield _counter(
            f"{p}forwarded_bytes", "IP bytes forwarded to a gateway", stats["bytes_forwarded"]
        )

        timeouts = CounterMetricFamily(
            f"{p}timeouts", "connections closed for a timeout, by stage", labels=["stage"]
        )
        timeouts.add_metric(["handshake"], stats["handshake_timeouts"])
        timeouts.add_metric(["auth"], stats["auth_timeouts"])
        timeouts.add_metric(["idle"], stats["idle_timeouts"])
        yield timeouts
        skip = set(ROUTER_DROPS) | {
            "packets_forwarded",
            "bytes_forwarded",
            "handshake_timeouts",
            "auth_timeouts",
            "idle_timeouts",
        }
        for name, value in stats.items():
            if name not in skip:
                yield _counter(f"{p}{name}", f"RouterStats.{name}", value)

        refused = CounterMetricFamily(
            f"{p}admission_refused",
            "connections refused by the connection limits, by reason",
            labels=["reason"],
        )
        for name, value in v.admission.items():
            if name.startswith("refused_"):
                refused.add_metric([name.removeprefix("refused_")], value)
            else:  # admitted_known, pre_tls_timeouts
                yield _counter(f"{p}admission_{name}", f"AdmissionStats.{name}", value)
        yield refused

        if v.kcp is not None:
            for name, value in v.kcp.items():
                if name == "sessions":
                    yield _gauge(f"{p}kcp_sessions", "established kcp:// sessions", value)
                else:
                    yield _counter(f"{p}kcp_{name}", f"KcpServerStats.{name}", value)
        if v.cluster is not None:
            yield from self._cluster(v.cluster)
        if v.direct is not None:
            yield from self._direct(v.direct)

    def _direct(self, d: RendezvousView) -> Iterable[Metric]:
        """Direct paths between gateways: polevpn_direct_*."""
        p = "polevpn_direct_"
        stats = d.stats
        yield _gauge(
            f"{p}pairs", "pairs of gateways with live direct-path key material", len(d.pairs)
        )
        yield _counter(
            f"{p}offers",
            "DIRECT_OFFER frames sent (two per pair offered or renewed)",
            stats["offers"],
        )
        revokes = CounterMetricFamily(
            f"{p}revokes", "DIRECT_REVOKE frames sent, by reason", labels=["reason"]
        )
        for reason in ("revoked", "peer_gone", "replaced", "disabled"):
            revokes.add_metric([reason], stats[f"revokes_{reason}"])
        yield revokes
        probes = CounterMetricFamily(
            f"{p}endpoint_probes",
            "endpoint probes on the kcp:// port, by result (answered, rate_limited: valid "
            "and recorded but not answered, the rest refused)",
            labels=["result"],
        )
        for result, n in d.probes.items():
            probes.add_metric([result], n)
        yield probes
        paths = GaugeMetricFamily(
            f"{p}paths",
            "pairs by the state of their path (direct only when both gateways report it)",
            labels=["state"],
        )
        states = Counter(pair.state for pair in d.pairs)
        for state in ("relayed", "punching", "direct"):
            paths.add_metric([state], states.get(state, 0))
        yield paths
        yield _gauge(f"{p}enabled", "1 while direct paths are offered", int(d.enabled))
        for name in (
            "pairs_full",
            "no_candidates",
            "statuses",
            "statuses_unknown",
            "frames_ignored",
        ):
            yield _counter(f"{p}{name}", f"RendezvousStats.{name}", stats[name])

    def _cluster(self, c: ClusterView) -> Iterable[Metric]:
        """The router's cluster: polevpn_cluster_*."""
        p = "polevpn_cluster_"
        st = c.store
        yield _gauge(
            f"{p}store_up", "1 while the router is connected to etcd, 0 while it is lost or "
            "not yet connected", 1 if st.state == "connected" else 0
        )
        yield _gauge(
            f"{p}stale", "1 while the routes known may be out of date (the store is lost)",
            1 if st.stale else 0,
        )
        yield _gauge(f"{p}store_revision", "the etcd revision the known routes reflect",
                     st.revision)
        yield _gauge(f"{p}lease_remaining_seconds", "the lease's TTL at its last renewal",
                     st.lease_remaining)
        yield _gauge(f"{p}local_routes", "networks this router publishes", c.local_routes)
        yield _gauge(f"{p}remote_routes", "networks other routers publish", len(c.remote_routes))
        routers = GaugeMetricFamily(
            f"{p}routers", "other routers of the cluster, by state", labels=["state"]
        )
        for state in ("up", "stale", "incomplete"):
            routers.add_metric([state], sum(1 for r in c.routers if r.state == state))
        yield routers
        stats = dict(c.stats)
        yield _counter(
            f"{p}store_errors", "failed store sessions (an endpoint gone, a call failed)",
            stats.pop("store_errors", 0),
        )
        for name, value in stats.items():
            yield _counter(f"{p}{name}", f"the cluster's {name}", value)
        if c.peer_links:
            names = ["router"]
            up = GaugeMetricFamily(f"{p}peer_link_up", "1 while the link to a router is up",
                                   labels=names)
            rx_p = CounterMetricFamily(f"{p}peer_received_packets",
                                       "packets received from a router", labels=names)
            tx_p = CounterMetricFamily(f"{p}peer_sent_packets", "packets sent to a router",
                                       labels=names)
            rx_b = CounterMetricFamily(f"{p}peer_received_bytes",
                                       "IP bytes received from a router", labels=names)
            tx_b = CounterMetricFamily(f"{p}peer_sent_bytes", "IP bytes sent to a router",
                                       labels=names)
            connects = CounterMetricFamily(
                f"{p}peer_connects", "times a link to a router came up", labels=names
            )
            drops = CounterMetricFamily(
                f"{p}peer_dropped_packets",
                "packets of the link to a router dropped: its queue full (queue_full), from "
                "a source that router does not announce (spoofed), from it for a third "
                "router (transit)",
                labels=[*names, "reason"],
            )
            rtt = GaugeMetricFamily(
                f"{p}peer_rtt_seconds",
                "round trip of the link to a router: heartbeats on a link this router "
                "dialed, TCP's estimate on one it accepted",
                labels=names,
            )
            for link in c.peer_links:
                labels = [link.router_id]
                up.add_metric(labels, 1 if link.state == "up" else 0)
                rx_p.add_metric(labels, link.packets_in)
                tx_p.add_metric(labels, link.packets_out)
                rx_b.add_metric(labels, link.bytes_in)
                tx_b.add_metric(labels, link.bytes_out)
                connects.add_metric(labels, link.connects)
                drops.add_metric([*labels, "queue_full"], link.dropped_queue_full)
                drops.add_metric([*labels, "spoofed"], link.dropped_spoofed)
                drops.add_metric([*labels, "transit"], link.dropped_transit)
                if link.rtt_ms is not None:
                    rtt.add_metric(labels, link.rtt_ms / 1000)
            yield from (up, rx_p, tx_p, rx_b, tx_b, connects, drops, rtt)

    def _per_gateway(self, v: RouterView) -> Iterable[Metric]:
        """Per gateway; a multi-link gateway's counters are its links' sums (they drop when
        a link reconnects, which Prometheus reads as a reset) and its KCP figures are
        per link only."""
        p = self.P
        names = ["gateway", "transport"]
        # "received" is what the gateway sent to the router, "sent" what the router sent it
        rx_p = CounterMetricFamily(
            f"{p}gateway_received_packets", "packets received from the gateway", labels=names
        )
        tx_p = CounterMetricFamily(
            f"{p}gateway_sent_packets", "packets sent to the gateway", labels=names
        )
        rx_b = CounterMetricFamily(
            f"{p}gateway_received_bytes",
            "IP bytes received from the gateway and forwarded or dropped",
            labels=names,
        )
        tx_b = CounterMetricFamily(
            f"{p}gateway_sent_bytes", "IP bytes sent to the gateway", labels=names
        )
        links = _LinkMetrics(f"{p}gateway_", names)
        for g in v.gateways:
            labels = [g.gateway, g.transport]
            t = g.traffic
            rx_p.add_metric(labels, t.packets_in)
            tx_p.add_metric(labels, t.packets_out)
            rx_b.add_metric(labels, t.bytes_in)
            tx_b.add_metric(labels, t.bytes_out)
            if not isinstance(g, SiteView) and g.figures.kcp is not None:
                links.add(labels, g.figures.kcp)
        return [rx_p, tx_p, rx_b, tx_b, *links.families()]

    def _per_link(self, v: RouterView) -> Iterable[Metric]:
        """Each link of each multi-link gateway, labelled gateway and link (its name)."""
        p = f"{self.P}link_"
        names = ["gateway", "link"]
        info = GaugeMetricFamily(
            f"{p}info",
            "a link of a multi-link gateway (value 1): its transport and role",
            labels=[*names, "transport", "role"],
        )
        weight = GaugeMetricFamily(f"{p}weight", "the link's weight", labels=names)
        up = GaugeMetricFamily(
            f"{p}up", "1 while the router hears from the link, 0 after its timeout", labels=names
        )
        downs = CounterMetricFamily(
            f"{p}downs", "times the link went down since it connected", labels=names
        )
        rx_p = CounterMetricFamily(
            f"{p}received_packets", "packets received on the link", labels=names
        )
        tx_p = CounterMetricFamily(f"{p}sent_packets", "packets sent on the link", labels=names)
        rx_b = CounterMetricFamily(
            f"{p}received_bytes", "IP bytes received on the link", labels=names
        )
        tx_b = CounterMetricFamily(f"{p}sent_bytes", "IP bytes sent on the link", labels=names)
        rtt = GaugeMetricFamily(
            f"{p}rtt_seconds",
            "round-trip time: KCP's srtt on kcp://, the kernel's TCP estimate on tls://",
            labels=names,
        )
        resent = CounterMetricFamily(
            f"{p}retransmissions",
            "data segments the router sent again (TCP total_retrans, KCP timeout resends)",
            labels=names,
        )
        segments = CounterMetricFamily(
            f"{p}sent_segments", "data segments the router sent, resends included", labels=names
        )
        loss = GaugeMetricFamily(
            f"{p}loss_ratio",
            "retransmissions / sent_segments since the link connected",
            labels=names,
        )
        kcp = _LinkMetrics(p, names)
        for site in v.gateways:
            if not isinstance(site, SiteView):
                continue
            for c in site.links:
                link = c.link
                assert link is not None
                labels = [site.gateway, link.name]
                info.add_metric([*labels, c.transport, link.role], 1)
                weight.add_metric(labels, link.weight)
                up.add_metric(labels, int(link.up))
                downs.add_metric(labels, link.downs)
                _traffic(labels, c, rx_p, tx_p, rx_b, tx_b)
                path = c.figures.path
                if path.rtt_ms is not None:
                    rtt.add_metric(labels, path.rtt_ms / 1000)
                if path.retransmissions is not None and path.segments_sent is not None:
                    resent.add_metric(labels, path.retransmissions)
                    segments.add_metric(labels, path.segments_sent)
                if path.loss is not None:
                    loss.add_metric(labels, path.loss)
                if c.figures.kcp is not None:
                    kcp.add(labels, c.figures.kcp)
        return [
            info,
            weight,
            up,
            downs,
            rx_p,
            tx_p,
            rx_b,
            tx_b,
            rtt,
            resent,
            segments,
            loss,
            *kcp.families(),
        ]


def _traffic(labels: list[str], c: ConnectionView, *families: CounterMetricFamily) -> None:
    """A connection's packets and bytes: received and sent packets, received and sent bytes."""
    t = c.traffic
    for family, value in zip(
        families, (t.packets_in, t.packets_out, t.bytes_in, t.bytes_out), strict=True
    ):
        family.add_metric(labels, value)


class GatewayCollector(Collector):
    """The gateway's metrics, from a fresh snapshot of its read model at each collection."""

    P = "polevpn_gateway_"

    def __init__(self, view: Callable[[], GatewayView]) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        v = self.view()
        p = self.P
        stats = v.stats
        yield _counter(
            f"{p}to_router_packets", "packets sent to the router", stats["packets_to_router"]
        )
        yield _counter(
            f"{p}to_router_bytes", "IP bytes sent to the router", stats["bytes_to_router"]
        )
        yield _counter(
            f"{p}from_router_packets",
            "packets from the router written to the TUN",
            stats["packets_from_router"],
        )
        yield _counter(
            f"{p}from_router_bytes",
            "IP bytes from the router written to the TUN",
            stats["bytes_from_router"],
        )
        drops = CounterMetricFamily(
            f"{p}dropped_packets", "packets the gateway dropped, by reason", labels=["reason"]
        )
        for field, reason in GATEWAY_DROPS.items():
            drops.add_metric([reason], stats[field])
        yield drops
        skip = set(GATEWAY_DROPS) | {
            "packets_to_router",
            "bytes_to_router",
            "packets_from_router",
            "bytes_from_router",
        }
        for name, value in stats.items():
            if name not in skip:
                yield _counter(f"{p}{name}", f"GatewayStats.{name}", value)

        yield _gauge(
            f"{p}connected",
            "1 while registered with a router (on any of its links, with several)",
            int(v.connected),
        )
        # one family for both kinds of gateway: ``link`` and ``role`` are empty (to
        # Prometheus, absent) on a plain one, whose series stays what it always was
        info = GaugeMetricFamily(
            f"{p}link_info",
            "the route server of each link (value 1); a plain gateway's while connected",
            labels=["route_server", "transport", "link", "role"],
        )
        rtt = GaugeMetricFamily(
            f"{p}heartbeat_rtt_seconds", "round-trip time of the last answered heartbeat"
        )
        links = _LinkMetrics(p, [])
        fec_state = GaugeMetricFamily(
            f"{p}fec_state", "FEC state of the kcp:// link (value 1)", labels=["state"]
        )
        link = v.link
        if link is not None and link.registered:
            info.add_metric([link.route_server, link.transport, "", ""], 1)
            if link.heartbeat_rtt is not None:
                rtt.add_metric([], link.heartbeat_rtt)
            kcp = link.figures.kcp
            if kcp is not None:
                links.add([], kcp)
                fec_state.add_metric([kcp.fec_state], 1)
        for u in v.uplinks:
            info.add_metric([u.route_server, u.transport, u.name, u.role], 1)
        yield info
        yield rtt
        yield fec_state
        yield from links.families()
        if v.uplinks:
            yield from self._per_link(v.uplinks)
        if v.direct is not None:
            yield from self._direct(v.direct)

    def _direct(self, d: DirectView) -> Iterable[Metric]:
        """Direct paths to other offices (issue 18), per peer gateway."""
        p = f"{self.P}direct_"
        paths = GaugeMetricFamily(
            f"{p}paths", "peer gateways by the state of their direct path", labels=["state"]
        )
        for state in ("relayed", "punching", "direct"):
            paths.add_metric([state], sum(1 for x in d.peers if x.state.value == state))
        nbytes = CounterMetricFamily(
            f"{p}bytes",
            "IP bytes over the direct path to a peer gateway, by direction",
            labels=["peer", "direction"],
        )
        refused = CounterMetricFamily(
            f"{p}refused",
            "packets from a direct peer refused by the anti-spoofing check",
            labels=["peer"],
        )
        rtt = GaugeMetricFamily(
            f"{p}rtt_seconds", "round-trip time of a direct path, while direct", labels=["peer"]
        )
        for x in d.peers:
            peer = str(x.peer)
            nbytes.add_metric([peer, "sent"], x.bytes_sent)
            nbytes.add_metric([peer, "received"], x.bytes_received)
            refused.add_metric([peer], x.refused)
            if x.rtt is not None:
                rtt.add_metric([peer], x.rtt)
        out: list[Metric] = [paths, nbytes, refused, rtt]
        for name, value in d.stats.items():
            if name != "refused_packets":
                out.append(_counter(f"{p}{name}", f"DirectStats.{name}", value))
        return out

    def _per_link(self, uplinks: tuple[UplinkView, ...]) -> Iterable[Metric]:
        """Each link of a multi-link gateway, labelled ``link`` (its name). Its packet and
        byte counters add up all of the link's connections, so they survive reconnects."""
        p = f"{self.P}link_"
        names = ["link"]
        by_state = GaugeMetricFamily(
            f"{self.P}links", "links of this multi-link gateway, by state", labels=["state"]
        )
        up_now = sum(1 for u in uplinks if u.up)
        by_state.add_metric(["up"], up_now)
        by_state.add_metric(["down"], len(uplinks) - up_now)
        weight = GaugeMetricFamily(f"{p}weight", "the link's weight", labels=names)
        up = GaugeMetricFamily(
            f"{p}up",
            "1 while registered and the router was heard within link_timeout, else 0",
            labels=names,
        )
        downs = CounterMetricFamily(f"{p}downs", "times the link went down", labels=names)
        connects = CounterMetricFamily(
            f"{p}connects", "connections of the link that registered", labels=names
        )
        tx_p = CounterMetricFamily(
            f"{p}sent_packets", "packets sent to the router on the link", labels=names
        )
        tx_b = CounterMetricFamily(
            f"{p}sent_bytes", "IP bytes sent to the router on the link", labels=names
        )
        rx_p = CounterMetricFamily(
            f"{p}received_packets", "packets received from the router on the link", labels=names
        )
        rx_b = CounterMetricFamily(
            f"{p}received_bytes", "IP bytes received from the router on the link", labels=names
        )
        rtt = GaugeMetricFamily(
            f"{p}heartbeat_rtt_seconds",
            "round-trip time of the link's last answered heartbeat, while connected",
            labels=names,
        )
        fec_state = GaugeMetricFamily(
            f"{p}fec_state",
            "FEC state of a kcp:// link (value 1), while connected",
            labels=[*names, "state"],
        )
        loss = GaugeMetricFamily(
            f"{p}loss_ratio",
            "share of the data segments the gateway sent on the link's connection that were "
            "retransmissions (TCP_INFO on tls://, KCP's counters on kcp://), while connected",
            labels=names,
        )
        kcp = _LinkMetrics(p, names)
        for u in uplinks:
            labels = [u.name]
            weight.add_metric(labels, u.weight)
            up.add_metric(labels, int(u.up))
            downs.add_metric(labels, u.downs)
            connects.add_metric(labels, u.connects)
            t = u.traffic
            tx_p.add_metric(labels, t.packets_out)
            tx_b.add_metric(labels, t.bytes_out)
            rx_p.add_metric(labels, t.packets_in)
            rx_b.add_metric(labels, t.bytes_in)
            conn = u.connection
            if conn is None or not conn.registered:
                continue
            if conn.heartbeat_rtt is not None:
                rtt.add_metric(labels, conn.heartbeat_rtt)
            ratio = conn.figures.path.loss
            if ratio is not None:
                loss.add_metric(labels, ratio)
            k = conn.figures.kcp
            if k is not None:
                kcp.add(labels, k)
                fec_state.add_metric([*labels, k.fec_state], 1)
        return [
            by_state,
            weight,
            up,
            downs,
            connects,
            tx_p,
            tx_b,
            rx_p,
            rx_b,
            rtt,
            loss,
            fec_state,
            *kcp.families(),
        ]


def router_registry(view: Callable[[], RouterView]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RouterCollector(view))
    return reg


def gateway_registry(view: Callable[[], GatewayView]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GatewayCollector(view))
    return reg


# -- HTTP


def _metrics_error(status: int, message: str) -> tuple[str, bytes]:
    if status == 404:
        message = "not found; try /metrics"
    return httpserver.text_error(status, message)


class MetricsServer(httpserver.HttpServer):
    """``GET /metrics`` on one address, from the running event loop.

    ``token`` gives the bearer token scrapes need (read at each request, so a reload that
    changes it applies at once), or None for none.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        token: Callable[[], str | None] = lambda: None,
        cache_seconds: float | None = None,
        header_timeout: float | None = None,
        **kw,
    ) -> None:
        super().__init__(
            {("GET", "/metrics"): self._metrics},
            name="metrics",
            error_body=_metrics_error,
            max_request=MAX_REQUEST,
            # a scrape has no body
            max_body=0,
            timeout=REQUEST_TIMEOUT,
            header_timeout=HEADER_TIMEOUT if header_timeout is None else header_timeout,
            **kw,
        )
        self.registry = registry
        self.token = token
        self.cache_seconds = CACHE_SECONDS if cache_seconds is None else cache_seconds
        self._page = b""
        self._page_until = float("-inf")
        self.renderings = 0

    def page(self, now: float) -> bytes:
        """The rendered metrics, at most ``cache_seconds`` old."""
        if now >= self._page_until:
            self._page = generate_latest(self.registry)
            self._page_until = now + self.cache_seconds
            self.renderings += 1
        return self._page

    async def _metrics(self, request: httpserver.Request) -> httpserver.Reply:
        token = self.token()
        if token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # latin-1 as the header was decoded: any byte string compares, none raises
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("latin-1"), token.encode()
            ):
                raise httpserver.HttpError(
                    401, "bearer token required", {"WWW-Authenticate": "Bearer"}
                )
        return 200, CONTENT_TYPE_LATEST, self.page(time.monotonic()), {}


async def serve(
    registry: CollectorRegistry,
    listen: tuple[str, int],
    token: Callable[[], str | None] = lambda: None,
) -> MetricsServer:
    server = MetricsServer(registry, token)
    await server.start(*listen)
    return server

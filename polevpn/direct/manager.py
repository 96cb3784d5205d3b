"""A gateway's direct paths, all peers: the router's messages, the direct socket's
datagrams, which packets go direct, the statuses to report. No I/O.

The gateway's asyncio shell (``polevpn.io.direct_socket``) owns the UDP socket and the
clock; the gateway hands over what the router sent (``endpoint``, ``offer``, ``revoke``)
and what the TUN read (``route``: the packets a direct path takes are taken, the rest go
to the router as before). Out come datagrams with their destination
(``datagrams_to_send``), the peers' IP packets (``take_packets``, ACL passed), DIRECT_*
messages for the router (``take_messages``: DIRECT_CANDIDATES, DIRECT_STATUS), one
``Change`` per path state change (``take_changes``, for the log), the next deadline.

Per peer gateway: its ``path.PeerPath`` (relayed, punching, direct; the timing), the
current key material (the latest offer) and a ``session.DirectSession`` while an attempt or
a path lives. A packet goes direct when its destination's longest match among the peers'
granted networks (the offers') is a peer whose path is direct and whose session is up.
Datagrams are told apart by their first byte and length: 64 bytes starting 0xD1 are
probes (by pair id to the peer, ENDPOINT_REPLY to the prober), anything else belongs to
the session whose peer endpoint sent it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from polevpn.common.counters import Counters
from polevpn.config import KcpParams
from polevpn.direct import messages as m
from polevpn.direct.endpoint import EndpointProber
from polevpn.direct.keys import KeyMaterialError, PairKeys
from polevpn.direct.messages import (
    Candidates,
    Cause,
    DatagramKind,
    Endpoint,
    EndpointParams,
    Offer,
    Revoke,
    Status,
)
from polevpn.direct.path import Decision, PathConfig, PathState, PeerPath
from polevpn.direct.punch import PunchConfig
from polevpn.direct.session import DirectContexts, DirectSession, SessionFailed, SessionUp
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.packet.gso import VNET_HDR_LEN, GsoError, to_plain
from polevpn.packet.ippacket import dst_addr, src_addr
from polevpn.packet.routing import IPAddress, IPNetwork, RouteTable

STATUS_INTERVAL = 30.0
MAX_PEERS = 1024
_PROBE = int(DatagramKind.PROBE)
_ACK = int(DatagramKind.ACK)
_REPLY = int(DatagramKind.ENDPOINT_REPLY)


@dataclass
class DirectStats(Counters):
    offers: int = 0
    offers_refused: int = 0
    revokes: int = 0
    revokes_unknown: int = 0
    datagrams_in: int = 0
    datagrams_out: int = 0
    # 0xD1 datagrams of no pair we hold, and other datagrams from no session's peer
    refused_unknown_pair: int = 0
    # probes and acks with the id of a pair we hold whose tag does not verify with its
    # key (another pair's material, a forgery): every one counted, none answered
    refused_probes: int = 0
    refused_stray: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    bytes_in: int = 0
    # sessions ended by a proof that failed (another pair's material, a man in the middle)
    refused_proofs: int = 0
    # packets from a direct peer the anti-spoofing check refused (DirectAcl)
    refused_packets: int = 0
    # a session's send queue was full, or a super-packet could not be cut
    dropped: int = 0
    endpoint_probes: int = 0
    endpoint_replies: int = 0
    # direct paths ended because the peer's packets came through the router (it had
    # given the path up first; path.PeerPath.peer_relayed)
    peer_relayed: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    """A peer's path changed state (one log line each)."""

    peer: IPAddress
    state: PathState
    previous: PathState
    cause: Cause
    endpoint: Endpoint | None
    rtt: float | None
    retry_in: float | None


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One peer as the read model shows it."""

    peer: IPAddress
    pair_id: bytes | None
    state: PathState
    cause: Cause
    rtt: float | None
    endpoint: Endpoint | None
    bytes_sent: int
    bytes_received: int
    refused: int
    expires_at: float | None


@dataclass(eq=False)
class _Peer:
    address: IPAddress
    path: PeerPath
    offer: Offer | None = None
    keys: PairKeys | None = None
    # the pair id the router knows this peer's path by (kept after revoke/expiry for the
    # last status)
    pair_id: bytes | None = None
    session: DirectSession | None = None
    # sessions closed, until their last datagrams (a close_notify) are out
    closing: list[DirectSession] = field(default_factory=list)
    status_at: float | None = None
    rtt: float | None = None
    endpoint: Endpoint | None = None
    # what closed sessions had refused (the path's figure spans sessions)
    refused_before: int = 0


class DirectManager:
    def __init__(
        self,
        own: Collection[IPAddress],
        local_networks: Iterable[IPNetwork],
        params: KcpParams,
        pool: KcpPool | None = None,
        contexts: DirectContexts | None = None,
        path_config: PathConfig | None = None,
        punch_config: PunchConfig | None = None,
        status_interval: float = STATUS_INTERVAL,
        max_peers: int = MAX_PEERS,
    ) -> None:
        """``own``: the gateway's addresses (IPv4, IPv6); ``local_networks``: what it
        announces, the only destinations a peer may send to it directly (with ``own``)."""
        self.own = frozenset(own)
        nets = [*local_networks, *(ipaddress.ip_network(a) for a in self.own)]
        self.local_networks = tuple(nets)
        self.params = params
        self.pool = pool or KcpPool()
        self.contexts = contexts or DirectContexts()
        self.path_config = path_config
        self.punch_config = punch_config
        self.status_interval = status_interval
        self.max_peers = max_peers
        self.stats = DirectStats()
        self.peers: dict[IPAddress, _Peer] = {}
        # this gateway's own endpoints (host candidates): never probed, and what it reports
        self.local: tuple[Endpoint, ...] = ()
        self.prober: EndpointProber | None = None
        self.router_udp: Endpoint | None = None
        self._by_pair: dict[bytes, _Peer] = {}
        self._by_endpoint: dict[Endpoint, _Peer] = {}
        self._routes: RouteTable[_Peer] = RouteTable()
        # some peer's packets go direct now: the data path looks packets up only then
        self.any_direct = False
        self._out: list[tuple[bytes, Endpoint]] = []
        self._packets: list[memoryview] = []
        self._messages: list[m.Message] = []
        self._changes: list[Change] = []

    # ---- the router's messages -------------------------------------------------------------

    def set_local(self, endpoints: Iterable[Endpoint]) -> None:
        self.local = tuple(dict.fromkeys(endpoints))[: m.MAX_LOCAL_CANDIDATES]

    def endpoint(self, params: EndpointParams, dialled: IPAddress, now: float) -> None:
        """DIRECT_ENDPOINT: probe the router's UDP port (at ``dialled``, the address the
        router connection went to, unless it names one) and report our host candidates."""
        addr = params.udp_address if params.udp_address is not None else dialled
        self.router_udp = Endpoint(addr, params.udp_port)
        self.prober = EndpointProber(params, now)
        self._messages.append(Candidates(self.local))
        self._prober_due(now)

    def offer(self, offer: Offer, now: float) -> None:
        """DIRECT_OFFER; KeyMaterialError when it is not for this gateway (counted)."""
        try:
            keys = PairKeys.from_offer(offer, self.own, now)
        except KeyMaterialError:
            self.stats.offers_refused += 1
            raise
        peer = self.peers.get(offer.peer)
        if peer is None:
            if len(self.peers) >= self.max_peers:
                self._forget_idle()
            if len(self.peers) >= self.max_peers:
                self.stats.offers_refused += 1
                raise KeyMaterialError(f"already {self.max_peers} direct peers")
            path = PeerPath(offer.peer, self.path_config)
            peer = self.peers[offer.peer] = _Peer(offer.peer, path)
        elif peer.keys is not None and peer.keys.pair_id == offer.pair_id:
            return  # the same offer again
        self.stats.offers += 1
        peer.offer, peer.keys, peer.pair_id = offer, keys, offer.pair_id
        self._rebuild()
        before = peer.path.state
        self._act(peer, peer.path.offered(keys.expires_at, now), now)
        self._note(peer, before, now)

    def revoke(self, revoke: Revoke, now: float) -> bool:
        """DIRECT_REVOKE: close the pair's path, forget its material. False: no such pair
        (an older one's, counted)."""
        peer = self._by_pair.get(revoke.pair_id)
        if peer is None:
            self.stats.revokes_unknown += 1
            return False
        self.stats.revokes += 1
        before = peer.path.state
        self._act(peer, peer.path.revoked(now), now)
        self._drop_material(peer)
        self._note(peer, before, now, force=True)
        return True

    def take_messages(self) -> list[m.Message]:
        """DIRECT_CANDIDATES and DIRECT_STATUS messages for the router."""
        out, self._messages = self._messages, []
        return out

    def take_changes(self) -> list[Change]:
        out, self._changes = self._changes, []
        return out

    # ---- the data path ---------------------------------------------------------------------

    def route(self, packets: list, now: float, vnet: bool = False) -> list:
        """Send the packets whose destination is a direct peer's over its session; returns
        the others, for the router. ``vnet``: the packets start with a virtio-net header
        (a TUN with offloads); what goes direct goes as plain packets."""
        if not self.any_direct:
            return packets
        lookup4, lookup6 = self._routes.lookup_v4, self._routes.lookup_v6
        rest = []
        groups: dict[_Peer, list] = {}
        skip = VNET_HDR_LEN if vnet else 0
        for pkt in packets:
            version, addr = dst_addr(memoryview(pkt)[skip:] if skip else pkt)
            if version == 4:
                peer = lookup4(addr)
            elif version == 6:
                peer = lookup6(addr)
            else:
                peer = None
            s = peer.session if peer is not None else None
            if s is None or not s.ready or not peer.path.direct:  # type: ignore[union-attr]
                rest.append(pkt)
                continue
            group = groups.get(peer)  # type: ignore[arg-type]
            if group is None:
                groups[peer] = [pkt]  # type: ignore[index]
            else:
                group.append(pkt)
        stats = self.stats
        for peer, group in groups.items():
            if vnet:
                group = self._plain(group)
            s = peer.session
            assert s is not None
            dropped = s.dropped_full
            nbytes = s.send_packets(group, now)
            stats.dropped += s.dropped_full - dropped
            if nbytes:
                stats.packets_out += len(group) - (s.dropped_full - dropped)
                stats.bytes_out += nbytes
        return rest

    def _plain(self, bufs: list) -> list:
        out = []
        for buf in bufs:
            if buf[0] or buf[1]:
                # a super-packet or a partial checksum: finished here (none go whole)
                try:
                    out.extend(to_plain(buf))
                except GsoError:
                    self.stats.dropped += 1
            else:
                out.append(memoryview(buf)[VNET_HDR_LEN:])
        return out

    def receive(self, data: bytes, src: Endpoint, now: float) -> None:
        """A datagram the direct socket read from ``src``."""
        self.stats.datagrams_in += 1
        if m.is_datagram(data):
            kind = data[1]
            if kind == _REPLY:
                if self.prober is not None and src == self.router_udp:
                    if self.prober.receive(data, now) is not None:
                        self.stats.endpoint_replies += 1
                else:
                    self.stats.refused_stray += 1
                return
            if kind not in (_PROBE, _ACK):
                self.stats.refused_stray += 1
                return
            peer = self._by_pair.get(bytes(data[4:20]))
            if peer is None:
                self.stats.refused_unknown_pair += 1
                return
            keys = peer.keys
            if keys is None or not m.authentic(data, keys.recv_probe_key):
                # the right id, a tag from other material: refused here, whatever the
                # session's state (none, punching, up), so each one is counted
                self.stats.refused_probes += 1
                return
            if peer.session is None:
                self._peer_probing(peer, data, src, now)
            if peer.session is not None:
                peer.session.receive(data, src, now)
                self._poll(peer, now)
            return
        peer = self._by_endpoint.get(src)
        if peer is None or peer.session is None or not peer.session.receive(data, src, now):
            self.stats.refused_stray += 1

    def _peer_probing(self, peer: _Peer, data: bytes, src: Endpoint, now: float) -> None:
        """An authentic probe for a pair with no attempt under way: the peer is punching;
        join it."""
        if data[1] != _PROBE:
            return
        before = peer.path.state
        self._act(peer, peer.path.peer_punching(now), now)
        self._note(peer, before, now)

    def relayed(self, packets: Iterable, now: float, whole: bool = False) -> bool:
        """IP packets that came through the router (a router connection, which lets
        through from a gateway only sources within the networks it registered: the offer's
        networks of that peer). One from a peer whose path is direct and whose session is
        up means the peer sends through the router now: our path ends too
        (``PeerPath.peer_relayed`` says when that does not count). ``whole``: a packet may
        be a super-packet (virtio-net header first). True: a path changed (the caller
        sends what that queued). Costs a lookup per packet only while some path is
        direct."""
        if not self.any_direct:
            return False
        lookup4, lookup6 = self._routes.lookup_v4, self._routes.lookup_v6
        seen: list[_Peer] = []
        for pkt in packets:
            version, addr = src_addr(pkt)
            if not version and whole and len(pkt) > VNET_HDR_LEN and pkt[0] < 0x10:
                version, addr = src_addr(memoryview(pkt)[VNET_HDR_LEN:])
            if version == 4:
                peer = lookup4(addr)
            elif version == 6:
                peer = lookup6(addr)
            else:
                continue
            if peer is None or not peer.path.direct or peer in seen:
                continue
            s = peer.session
            if s is None or not s.ready:
                continue  # a rekey under way: both sides relay until its proofs are in
            seen.append(peer)
        changed = False
        for peer in seen:
            before = peer.path.state
            decisions = peer.path.peer_relayed(now)
            if decisions:
                self.stats.peer_relayed += 1
                self._act(peer, decisions, now)
                self._note(peer, before, now)
                changed = True
        return changed

    def take_packets(self) -> list[memoryview]:
        """The peers' IP packets (ACL passed) since the last call, for the gateway's acls
        and the TUN."""
        out, self._packets = self._packets, []
        return out

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out, self._out = self._out, []
        for peer in list(self.peers.values()):
            s = peer.session
            if s is not None:
                out += s.datagrams_to_send(now)
                self._poll(peer, now)
                if peer.session is not s:
                    out += s.datagrams_to_send(now)
            if peer.closing:
                for c in peer.closing:
                    out += c.datagrams_to_send(now)
                peer.closing.clear()
            if peer.session is not None and peer.session.ready:
                got = peer.session.take_packets()
                if got:
                    self.stats.packets_in += len(got)
                    self.stats.bytes_in += sum(map(len, got))
                    self._packets += got
        if self._out:
            out += self._out
            self._out = []
        self.stats.datagrams_out += len(out)
        return out

    # ---- time ------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        times: list[float] = []
        if self.prober is not None:
            t = self.prober.get_timer()
            if t is not None:
                times.append(t)
        for peer in self.peers.values():
            t = peer.path.next_deadline()
            if t is not None:
                times.append(t)
            if peer.session is not None:
                t = peer.session.get_timer()
                if t is not None:
                    times.append(t)
            if peer.keys is not None:
                times.append(peer.keys.expires_at)
            if peer.status_at is not None:
                times.append(peer.status_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._prober_due(now)
        for peer in list(self.peers.values()):
            s = peer.session
            if s is not None:
                s.handle_timer(now)
                self._poll(peer, now)
            before = peer.path.state
            self._act(peer, peer.path.tick(now), now)
            if peer.keys is not None and peer.keys.expired(now):
                self._drop_material(peer)
                if peer.session is not None:
                    self._close(peer, now)
            self._note(peer, before, now)
            if peer.status_at is not None and now >= peer.status_at:
                self._status(peer, now)

    def close(self, now: float) -> None:
        """The gateway stops: every session ends (close_notify to each peer)."""
        for peer in self.peers.values():
            if peer.session is not None:
                self._close(peer, now)

    # ---- what the read model shows ---------------------------------------------------------

    def statuses(self) -> list[PeerStatus]:
        out = []
        for peer in self.peers.values():
            p = peer.path
            s = peer.session
            out.append(
                PeerStatus(
                    peer=peer.address,
                    pair_id=peer.pair_id,
                    state=p.state,
                    cause=p.cause,
                    rtt=(s.rtt if s is not None else None) if p.direct else None,
                    endpoint=peer.endpoint if p.direct else None,
                    bytes_sent=p.bytes_sent,
                    bytes_received=p.bytes_received,
                    refused=p.refused,
                    expires_at=peer.keys.expires_at if peer.keys is not None else None,
                )
            )
        return out

    def counters(self) -> DirectStats:
        """The stats, with the sessions' refusals summed in."""
        refused = 0
        for peer in self.peers.values():
            refused += peer.path.refused
        self.stats.refused_packets = refused
        return self.stats

    # ---- internals -------------------------------------------------------------------------

    def _prober_due(self, now: float) -> None:
        prober, dest = self.prober, self.router_udp
        if prober is None or dest is None:
            return
        t = prober.get_timer()
        if t is not None and t <= now:
            for d in prober.handle_timer(now):
                self.stats.endpoint_probes += 1
                self._out.append((d, dest))

    def _act(self, peer: _Peer, decisions: list[Decision], now: float) -> None:
        for d in decisions:
            if d is Decision.PUNCH or d is Decision.REKEY:
                # a rekey is a new attempt with the new material on the same path; its
                # packets go through the router until the new session's proofs are in
                self._start(peer, now)
            elif d is Decision.KEEPALIVE:
                if peer.session is not None:
                    peer.session.keepalive_now(now)
            elif d is Decision.RELAY and peer.session is not None:
                self._close(peer, now)

    def _start(self, peer: _Peer, now: float) -> None:
        if peer.session is not None:
            self._close(peer, now)
        keys, offer = peer.keys, peer.offer
        if keys is None or offer is None:
            return
        s = DirectSession(
            keys,
            [c.endpoint for c in offer.candidates],
            offer.networks,
            self.local_networks,
            peer.path,
            self.contexts,
            self.params,
            self.pool,
            local=self.local,
            punch_config=self.punch_config,
        )
        peer.session = s
        s.start(now)
        self._poll(peer, now)

    def _close(self, peer: _Peer, now: float) -> None:
        s = peer.session
        if s is None:
            return
        peer.session = None
        s.close(now)
        peer.refused_before = peer.path.refused
        self.stats.refused_proofs += s.refused_proof
        peer.closing.append(s)
        self._by_endpoint = {e: p for e, p in self._by_endpoint.items() if p is not peer}
        self._update_direct()

    def _poll(self, peer: _Peer, now: float) -> None:
        """Act on the session's events."""
        s = peer.session
        if s is None:
            return
        if s.endpoint is not None and self._by_endpoint.get(s.endpoint) is not peer:
            self._by_endpoint = {e: p for e, p in self._by_endpoint.items() if p is not peer}
            self._by_endpoint[s.endpoint] = peer
        ev = s.next_event()
        while ev is not None:
            before = peer.path.state
            if isinstance(ev, SessionUp):
                peer.endpoint = ev.endpoint
                peer.path.connected(now)
            elif isinstance(ev, SessionFailed):
                self._act(peer, peer.path.failed(now, ev.cause), now)
                if peer.session is s:
                    self._close(peer, now)
            self._note(peer, before, now, force=isinstance(ev, SessionUp))
            ev = s.next_event()
        if peer.session is s and s.ready:
            got = s.take_packets()
            if got:
                self.stats.packets_in += len(got)
                self.stats.bytes_in += sum(map(len, got))
                self._packets += got
        self._update_direct()

    def _update_direct(self) -> None:
        self.any_direct = any(
            p.path.direct and p.session is not None and p.session.ready for p in self.peers.values()
        )

    def _note(self, peer: _Peer, before: PathState, now: float, force: bool = False) -> None:
        """A state change: a log line and a status for the router."""
        p = peer.path
        if p.state is before and not force:
            return
        if p.state is not before:
            s = peer.session
            retry = p.retry_at - now if p.retry_at is not None else None
            self._changes.append(
                Change(
                    peer.address,
                    p.state,
                    before,
                    p.cause,
                    peer.endpoint if p.direct else None,
                    s.rtt if s is not None and p.direct else None,
                    retry,
                )
            )
        self._update_direct()
        self._status(peer, now)

    def _status(self, peer: _Peer, now: float) -> None:
        p = peer.path
        if peer.pair_id is None:
            peer.status_at = None
            return
        s = peer.session
        rtt = s.rtt if s is not None and p.direct else None
        self._messages.append(p.status(peer.pair_id, rtt, peer.endpoint))
        peer.status_at = now + self.status_interval if p.direct else None

    def _drop_material(self, peer: _Peer) -> None:
        peer.keys = None
        peer.offer = None
        self._rebuild()

    def _rebuild(self) -> None:
        """The pair ids and the routes of the peers with material."""
        self._by_pair = {}
        routes: RouteTable[_Peer] = RouteTable()
        for peer in self.peers.values():
            if peer.keys is None or peer.offer is None:
                continue
            self._by_pair[peer.keys.pair_id] = peer
            for net in peer.offer.networks:
                routes.add(net, peer)
            routes.add(ipaddress.ip_network(peer.address), peer)
        self._routes = routes

    def _forget_idle(self) -> None:
        """Peers without material or session: kept for the read model until room is
        needed."""
        for addr in [a for a, p in self.peers.items() if p.keys is None and p.session is None]:
            del self.peers[addr]


__all__ = ["Change", "DirectManager", "DirectStats", "PeerStatus", "Status"]

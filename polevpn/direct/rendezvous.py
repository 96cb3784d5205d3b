"""The router as rendezvous of direct paths between gateways (docs/protocol.md section 18).
No I/O: the router tells it what happens (a gateway registered or left, a DIRECT_* frame
came, two gateways' packets crossed the router, an endpoint probe arrived, time passed)
and writes the frames it returns (``Send``: a connection and a whole frame).

What it keeps, per gateway whose connection agreed ``direct``: its connections (frames go
to the newest; a multi-link gateway has one direct socket whatever link it registered
on, so any link will do, and when the newest closes the next newest takes over), the
networks it registered (the sources its peers will accept from it directly, the same the
router's own anti-spoofing checks), its grant's ``direct`` flag, its host candidates
(DIRECT_CANDIDATES) and, in the ``EndpointRegistry``, the token of its endpoint probes and
the public endpoint they came from (renewed at two thirds of the lifetime).

Per pair of gateways at most one live issue of key material (``_Pair``): offered as soon
as the router forwards a packet between two eligible gateways (both agreed, both grants
allow it, a candidate of each known), renewed with a new pair id at two thirds of the
lifetime if the pair's traffic still flows (packets through the router, or a DIRECT_STATUS
whose byte counts grew), forgotten at its expiry otherwise. At most ``max_pairs`` pairs at
once; past that, further pairs stay relayed (``pairs_full``) until one lapses.

Revocation (DIRECT_REVOKE, for the current and every unexpired earlier pair id): to both
gateways of each pair of a gateway whose grant a reload removed or changed, or whose
registered networks changed (reason 1); to the peers of a gateway whose last connection
closed (reason 2); to both when its grant's ``direct`` was turned off, or the router's
(reason 4).

The data path's cost: ``seen`` (one dict probe) per distinct pair of gateways in one read's
batches; everything else runs per control frame, per second (``handle_timer``) or per
API request.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from polevpn.common.counters import Counters
from polevpn.direct import keys
from polevpn.direct.endpoint import EndpointRegistry
from polevpn.direct.messages import (
    MAX_OFFER_NETWORKS,
    Candidate,
    CandidateKind,
    Candidates,
    DirectMessageError,
    Endpoint,
    PathCode,
    Revoke,
    RevokeReason,
    Status,
    UnsupportedVersion,
    decode,
    encode,
)
from polevpn.packet.routing import IPAddress, IPNetwork
from polevpn.proto.auth import GatewayGrant

DEFAULT_LIFETIME = 3600
DEFAULT_MAX_PAIRS = 4096
# how much of a lifetime passes before the material (or an endpoint token) is renewed
RENEW_AT = 2 / 3
# a pair refused an offer (no candidate of a side yet, max_pairs live) is tried again
# after this, whatever its traffic: the first offer waits for the gateways' candidates,
# which come within a round trip or two of their registration
RETRY_AFTER = 0.25
# pairs held back at once; past it the oldest holds are forgotten (they are only a saving)
MAX_RETRIES = 65536


def _order(addr: IPAddress) -> tuple[int, int]:
    return addr.version, int(addr)


@dataclass(frozen=True, slots=True)
class Send:
    """A frame for the router to write on one of a gateway's connections."""

    conn: Hashable
    frame: bytes


@dataclass
class RendezvousStats(Counters):
    # DIRECT_OFFER frames sent (two per pair offered or renewed)
    offers: int = 0
    # pairs whose traffic wanted an offer while max_pairs were live
    pairs_full: int = 0
    # pairs whose traffic wanted an offer, refused: a side without a candidate yet
    no_candidates: int = 0
    # pairs whose offer could not be built (more networks than an offer carries)
    offers_unbuildable: int = 0
    # DIRECT_REVOKE frames sent, by reason
    revokes_revoked: int = 0
    revokes_peer_gone: int = 0
    revokes_replaced: int = 0
    revokes_disabled: int = 0
    # DIRECT_ENDPOINT frames sent
    endpoints: int = 0
    # DIRECT_CANDIDATES and DIRECT_STATUS taken
    candidates: int = 0
    statuses: int = 0
    # DIRECT_STATUS for a pair this router does not hold, or not of the sender
    statuses_unknown: int = 0
    # DIRECT_* frames ignored: another version, or a command a gateway does not send
    frames_ignored: int = 0
    # endpoint probes answered, and valid ones recorded but not answered (rate limit)
    probes_answered: int = 0
    probes_rate_limited: int = 0


# the probes' results as /metrics labels them, from EndpointRegistry's refusal counters
PROBE_REFUSALS = {
    "refused_malformed": "malformed",
    "refused_unknown": "unknown_token",
    "refused_tag": "bad_tag",
    "refused_replay": "replay",
    "refused_expired": "expired",
}


@dataclass
class _Gateway:
    address: IPAddress
    # the connections that agreed direct, oldest first: frames go to the last
    conns: list[Hashable] = field(default_factory=list)
    # what it registered, its own address first: the sources its peers accept from it
    networks: tuple[IPNetwork, ...] = ()
    allowed: bool = True
    host: tuple[Endpoint, ...] = ()
    endpoint_renew_at: float | None = None
    # the pairs it is part of, by the other gateway
    pairs: dict[IPAddress, _Pair] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SideStatus:
    """The latest DIRECT_STATUS of one gateway of a pair, and when it came."""

    status: Status
    at: float


@dataclass
class _Pair:
    lo: IPAddress
    hi: IPAddress
    pair_id: bytes
    created: float
    expires: float
    renew_at: float
    # traffic since the last offer: what renewal asks
    active: bool = False
    # earlier pair ids of this pair, still valid on the gateways until these times
    old_ids: dict[bytes, float] = field(default_factory=dict)
    sides: dict[IPAddress, SideStatus] = field(default_factory=dict)

    def ids(self, now: float) -> list[bytes]:
        return [self.pair_id, *(i for i, t in self.old_ids.items() if t > now)]


# ---- the read model ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SideView:
    gateway: str
    state: str  # relayed, punching, direct
    cause: str
    rtt_ms: float | None
    bytes_sent: int
    bytes_received: int
    refused: int
    endpoint: str | None
    reported: float | None  # wall-clock time of the status, None: none yet


@dataclass(frozen=True, slots=True)
class PairView:
    pair_id: str
    gateways: tuple[str, str]
    created: float  # wall clock
    expires: float
    sides: tuple[SideView, SideView]

    @property
    def state(self) -> str:
        """The pair's path: direct only when both sides say so, else the lesser state."""
        rank = {"relayed": 0, "punching": 1, "direct": 2}
        return min((s.state for s in self.sides), key=rank.__getitem__)


@dataclass(frozen=True, slots=True)
class EndpointView:
    gateway: str
    public: str | None
    host: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RendezvousView:
    enabled: bool
    lifetime: int
    max_pairs: int
    pairs: tuple[PairView, ...]
    endpoints: tuple[EndpointView, ...]
    stats: dict[str, int]
    # endpoint probes by result: answered, rate_limited and the refusals (PROBE_REFUSALS)
    probes: dict[str, int]


_CAUSES = {0: "none", 1: "no_answer", 2: "silence", 3: "handshake", 4: "expired", 5: "revoked"}
_STATES = {PathCode.RELAYED: "relayed", PathCode.PUNCHING: "punching", PathCode.DIRECT: "direct"}


class Rendezvous:
    """The router's direct-path bookkeeping; see the module docstring."""

    def __init__(
        self,
        udp_port: int,
        enabled: bool = True,
        lifetime: int = DEFAULT_LIFETIME,
        max_pairs: int = DEFAULT_MAX_PAIRS,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        # the kcp:// listener's port, where gateways send their endpoint probes
        self.udp_port = udp_port
        self.enabled = enabled
        self.lifetime = lifetime
        self.max_pairs = max_pairs
        self._random = random
        self.registry = EndpointRegistry(random=random)
        self.stats = RendezvousStats()
        self._gateways: dict[IPAddress, _Gateway] = {}
        # both orientations of each pair's addresses: the data path's one probe
        self._live: dict[tuple[IPAddress, IPAddress], _Pair] = {}
        self._by_id: dict[bytes, _Pair] = {}
        # pairs refused an offer a moment ago, until when they wait
        self._retry: dict[tuple[IPAddress, IPAddress], float] = {}

    def __len__(self) -> int:
        """Pairs with live key material."""
        return len(self._live) // 2

    # -- gateways

    def gateway_up(
        self,
        address: IPAddress,
        conn: Hashable,
        networks: Iterable[IPNetwork],
        allowed: bool,
        now: float,
    ) -> list[Send]:
        """``conn`` (which agreed direct) registered ``address`` with ``networks`` (its own
        address first); ``allowed``: its grant's direct flag. Returns its DIRECT_ENDPOINT
        (and revocations, if the networks differ from its earlier registration's)."""
        gw = self._gateways.get(address)
        if gw is None:
            gw = self._gateways[address] = _Gateway(address)
        nets = tuple(dict.fromkeys(networks))
        out: list[Send] = []
        if gw.networks and nets != gw.networks:
            # its peers hold the old networks as what it may send from
            out += self._revoke_gateway(gw, RevokeReason.REVOKED, now)
        gw.networks = nets
        if conn in gw.conns:
            gw.conns.remove(conn)
        gw.conns.append(conn)
        out += self.set_allowed(address, allowed, now)
        if self.enabled:
            out.append(self._endpoint(gw, conn, now))
        return out

    def connection_closed(self, address: IPAddress, conn: Hashable, now: float) -> list[Send]:
        """``conn`` of ``address`` closed (or registered another address): with its last
        connection the gateway is gone, and its peers are told (reason 2)."""
        gw = self._gateways.get(address)
        if gw is None or conn not in gw.conns:
            return []
        gw.conns.remove(conn)
        if gw.conns:
            return []
        out = self._revoke_gateway(gw, RevokeReason.PEER_GONE, now, to_self=False)
        self.registry.revoke(address)
        del self._gateways[address]
        return out

    def set_allowed(self, address: IPAddress, allowed: bool, now: float) -> list[Send]:
        """The gateway's grant says ``direct`` is (no longer) allowed (reason 4)."""
        gw = self._gateways.get(address)
        if gw is None:
            return []
        was, gw.allowed = gw.allowed, allowed
        if was and not allowed:
            return self._revoke_gateway(gw, RevokeReason.DISABLED, now)
        return []

    def grant_changed(self, address: IPAddress, now: float) -> list[Send]:
        """A reload removed or changed the gateway's grant (reason 1)."""
        gw = self._gateways.get(address)
        if gw is None:
            return []
        return self._revoke_gateway(gw, RevokeReason.REVOKED, now)

    def grants_changed(
        self,
        old: Mapping[IPAddress, GatewayGrant],
        new: Mapping[IPAddress, GatewayGrant],
        now: float,
    ) -> list[Send]:
        """A reload's grants (by gateway address; a gateway without one registered with
        the shared key, and may go direct): a gateway held here whose grant was removed or
        changed has its pairs revoked (reason 1), one whose grant only turned ``direct``
        off likewise with reason 4."""
        out: list[Send] = []
        for address in list(self._gateways):
            before, after = old.get(address), new.get(address)
            if before == after:
                continue
            only_direct = (
                before is not None
                and after is not None
                and dataclasses.replace(before, direct=after.direct) == after
            )
            if not only_direct:
                out += self.grant_changed(address, now)
            out += self.set_allowed(address, after.direct if after is not None else True, now)
        return out

    def reconfigure(self, enabled: bool, lifetime: int, max_pairs: int, now: float) -> list[Send]:
        """A reload's ``direct`` section: turned off, every pair is revoked (reason 4) and
        every endpoint token forgotten; turned on, the gateways still connected that agreed
        direct get their DIRECT_ENDPOINT. ``lifetime`` and ``max_pairs`` count for what
        is issued from now on."""
        out: list[Send] = []
        self.lifetime = lifetime
        self.max_pairs = max_pairs
        if self.enabled and not enabled:
            for gw in self._gateways.values():
                out += self._revoke_gateway(gw, RevokeReason.DISABLED, now)
                self.registry.revoke(gw.address)
                gw.endpoint_renew_at = None
        elif enabled and not self.enabled:
            for gw in self._gateways.values():
                if gw.conns:
                    out.append(self._endpoint(gw, gw.conns[-1], now))
        self.enabled = enabled
        return out

    def _endpoint(self, gw: _Gateway, conn: Hashable, now: float) -> Send:
        params = self.registry.issue(gw.address, self.udp_port, now, self.lifetime)
        gw.endpoint_renew_at = now + self.lifetime * RENEW_AT
        self.stats.endpoints += 1
        return Send(conn, encode(params))

    # -- frames from gateways

    def frame(self, address: IPAddress, command: int, body: bytes, now: float) -> list[Send]:
        """A DIRECT_* frame from the gateway ``address``. Raises DirectMessageError for a
        malformed one (a protocol violation: the router closes the connection)."""
        try:
            msg = decode(command, body)
        except UnsupportedVersion:
            self.stats.frames_ignored += 1
            return []
        gw = self._gateways.get(address)
        if isinstance(msg, Candidates):
            self.stats.candidates += 1
            if gw is not None:
                gw.host = msg.endpoints
        elif isinstance(msg, Status):
            self._status(address, msg, now)
        else:
            # router -> gateway commands, or DIRECT_PROOF, which belongs on a direct path
            self.stats.frames_ignored += 1
        return []

    def _status(self, address: IPAddress, msg: Status, now: float) -> None:
        pair = self._by_id.get(msg.pair_id)
        if pair is None or address not in (pair.lo, pair.hi):
            self.stats.statuses_unknown += 1
            return
        self.stats.statuses += 1
        before = pair.sides.get(address)
        moved = msg.bytes_sent + msg.bytes_received
        if before is not None:
            moved -= before.status.bytes_sent + before.status.bytes_received
        if msg.state is PathCode.DIRECT and moved > 0:
            # the pair's traffic flows on the direct path, which the router does not see
            pair.active = True
        pair.sides[address] = SideStatus(msg, now)

    # -- endpoint probes (the kcp:// port)

    def probe(self, data: bytes, src: Endpoint, now: float) -> bytes | None:
        """An ENDPOINT_PROBE from ``src``: the ENDPOINT_REPLY to send back, or None."""
        reply, observed = self.registry.receive(data, src, now)
        if reply is not None:
            self.stats.probes_answered += 1
        elif observed is not None:
            self.stats.probes_rate_limited += 1
        return reply

    # -- traffic

    def seen(self, a: IPAddress, b: IPAddress) -> bool:
        """The router forwarded packets from ``a`` to ``b`` (gateways whose connections
        agreed direct): True when the pair has no live material, and ``offer`` is due."""
        pair = self._live.get((a, b))
        if pair is None:
            return self.enabled
        pair.active = True
        return False

    def offer(self, a: IPAddress, b: IPAddress, now: float) -> list[Send]:
        """Offer the pair, if both are eligible and there is room."""
        if not self.enabled or (a, b) in self._live:
            return []
        if self._retry.get((a, b), now) > now:
            return []
        out = self._try(a, b, now)
        if not out:
            if len(self._retry) >= MAX_RETRIES:
                self._retry.clear()
            self._retry[(a, b)] = now + RETRY_AFTER
        return out

    def _try(self, a: IPAddress, b: IPAddress, now: float) -> list[Send]:
        ga, gb = self._gateways.get(a), self._gateways.get(b)
        if ga is None or gb is None or not (ga.allowed and gb.allowed):
            return []
        if not (ga.conns and gb.conns):
            return []
        if len(self._live) // 2 >= self.max_pairs:
            self.stats.pairs_full += 1
            return []
        return self._issue(ga, gb, now, None)

    def _candidates(self, gw: _Gateway, now: float) -> tuple[Candidate, ...]:
        out = [Candidate(CandidateKind.HOST, ep) for ep in gw.host]
        public = self.registry.public(gw.address, now)
        if public is not None and public not in gw.host:
            out.append(Candidate(CandidateKind.PUBLIC, public))
        return tuple(out)

    def _issue(self, ga: _Gateway, gb: _Gateway, now: float, old: _Pair | None) -> list[Send]:
        ca, cb = self._candidates(ga, now), self._candidates(gb, now)
        if not ca or not cb:
            self.stats.no_candidates += 1
            return []
        if len(ga.networks) > MAX_OFFER_NETWORKS or len(gb.networks) > MAX_OFFER_NETWORKS:
            self.stats.offers_unbuildable += 1
            return []
        material = keys.issue(self.lifetime, self._random)
        try:
            to_a, to_b = keys.pair_offers(
                material,
                keys.Side(ga.address, ca, ga.networks),
                keys.Side(gb.address, cb, gb.networks),
            )
        except DirectMessageError:
            self.stats.offers_unbuildable += 1
            return []
        lo, hi = (ga, gb) if _order(ga.address) < _order(gb.address) else (gb, ga)
        pair = _Pair(
            lo.address,
            hi.address,
            material.pair_id,
            created=now,
            expires=now + material.lifetime,
            renew_at=now + material.lifetime * RENEW_AT,
        )
        if old is not None:
            # the gateways keep using the old material until the new path is up
            pair.old_ids = {i: t for i, t in old.old_ids.items() if t > now}
            pair.old_ids[old.pair_id] = old.expires
            pair.sides = old.sides
            del self._by_id[old.pair_id]
        for i in pair.old_ids:
            self._by_id[i] = pair
        self._by_id[pair.pair_id] = pair
        self._live[(lo.address, hi.address)] = self._live[(hi.address, lo.address)] = pair
        ga.pairs[gb.address] = gb.pairs[ga.address] = pair
        self.stats.offers += 2
        return [Send(ga.conns[-1], encode(to_a)), Send(gb.conns[-1], encode(to_b))]

    # -- revocation and expiry

    def _forget(self, pair: _Pair) -> None:
        self._live.pop((pair.lo, pair.hi), None)
        self._live.pop((pair.hi, pair.lo), None)
        for i in (pair.pair_id, *pair.old_ids):
            if self._by_id.get(i) is pair:
                del self._by_id[i]
        for a, b in ((pair.lo, pair.hi), (pair.hi, pair.lo)):
            gw = self._gateways.get(a)
            if gw is not None and gw.pairs.get(b) is pair:
                del gw.pairs[b]

    def _revoke_gateway(
        self, gw: _Gateway, reason: RevokeReason, now: float, to_self: bool = True
    ) -> list[Send]:
        out: list[Send] = []
        for peer_addr, pair in list(gw.pairs.items()):
            self._forget(pair)
            targets = [self._gateways.get(peer_addr)] + ([gw] if to_self else [])
            for target in targets:
                if target is None or not target.conns:
                    continue
                for pair_id in pair.ids(now):
                    out.append(Send(target.conns[-1], encode(Revoke(pair_id, reason))))
                    name = f"revokes_{reason.name.lower()}"
                    setattr(self.stats, name, getattr(self.stats, name) + 1)
        return out

    def handle_timer(self, now: float) -> list[Send]:
        """Renewals (endpoint tokens and the material of pairs still in use) and expiry;
        the router calls it about once a second."""
        out: list[Send] = []
        if self._retry:
            self._retry = {k: t for k, t in self._retry.items() if t > now}
        if self.enabled:
            for gw in self._gateways.values():
                due = gw.endpoint_renew_at
                if due is not None and now >= due and gw.conns:
                    out.append(self._endpoint(gw, gw.conns[-1], now))
        seen: set[int] = set()
        for pair in list(self._live.values()):
            if id(pair) in seen:
                continue
            seen.add(id(pair))
            for i in [i for i, t in pair.old_ids.items() if t <= now]:
                del pair.old_ids[i]
                if self._by_id.get(i) is pair:
                    del self._by_id[i]
            if now >= pair.renew_at and pair.active and self.enabled:
                ga, gb = self._gateways.get(pair.lo), self._gateways.get(pair.hi)
                if ga is not None and gb is not None and ga.allowed and gb.allowed:
                    renewed = self._issue(ga, gb, now, pair)
                    if renewed:
                        out += renewed
                        continue
            if now >= pair.expires:
                # unused since its renewal was due: it lapses on the gateways as well
                self._forget(pair)
        return out

    # -- the read model

    def view(self, now: float, wall: float) -> RendezvousView:
        def at(t: float) -> float:
            return wall - (now - t)

        pairs = []
        done: set[int] = set()
        for pair in self._live.values():
            if id(pair) in done:
                continue
            done.add(id(pair))
            sides = []
            for g in (pair.lo, pair.hi):
                s = pair.sides.get(g)
                if s is None:
                    sides.append(
                        SideView(str(g), "relayed", "unreported", None, 0, 0, 0, None, None)
                    )
                    continue
                st = s.status
                sides.append(
                    SideView(
                        str(g),
                        _STATES[st.state],
                        _CAUSES[int(st.cause)],
                        None if st.rtt is None else round(st.rtt * 1000, 3),
                        st.bytes_sent,
                        st.bytes_received,
                        st.refused,
                        str(st.endpoint) if st.endpoint is not None else None,
                        at(s.at),
                    )
                )
            pairs.append(
                PairView(
                    pair.pair_id.hex(),
                    (str(pair.lo), str(pair.hi)),
                    at(pair.created),
                    at(pair.expires),
                    (sides[0], sides[1]),
                )
            )
        pairs.sort(key=lambda p: p.created)
        endpoints = []
        for addr in sorted(self._gateways, key=_order):
            gw = self._gateways[addr]
            public = self.registry.public(addr, now)
            endpoints.append(
                EndpointView(
                    str(addr),
                    str(public) if public is not None else None,
                    tuple(str(ep) for ep in gw.host),
                )
            )
        reg = self.registry
        probes = {
            "answered": self.stats.probes_answered,
            "rate_limited": self.stats.probes_rate_limited,
            **{label: getattr(reg, name) for name, label in PROBE_REFUSALS.items()},
        }
        return RendezvousView(
            enabled=self.enabled,
            lifetime=self.lifetime,
            max_pairs=self.max_pairs,
            pairs=tuple(pairs),
            endpoints=tuple(endpoints),
            stats=dict(self.stats.fields()),  # type: ignore[arg-type]
            probes=probes,
        )

"""Endpoint discovery: the gateway's UDP probe to the router's kcp:// port, from which the
router learns the gateway's public mapping (its NAT's address and port). No I/O.

The router hands each gateway that agreed ``direct`` a token and a key (DIRECT_ENDPOINT,
``EndpointRegistry.issue``). The gateway sends ENDPOINT_PROBE datagrams from its direct
socket (the one it punches with: a NAT maps each socket on its own, and a kcp://
gateway's session socket is connected to the router and cannot take a peer's datagrams)
to the router's UDP port (``EndpointProber``). The router checks the tag, that the counter
grew (a replayed probe from elsewhere cannot move the mapping) and the token's lifetime,
records where the probe came from as the gateway's PUBLIC candidate, and answers with an
ENDPOINT_REPLY naming it. Probe and reply are both 64 bytes, so the router never sends
more than it got, and it answers a token at most once per ``min_interval``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from polevpn.direct.messages import (
    ENDPOINT_KEY_LEN,
    TOKEN_LEN,
    Datagram,
    DatagramKind,
    DirectMessageError,
    Endpoint,
    EndpointParams,
    authentic,
    parse_datagram,
)
from polevpn.packet.routing import IPAddress

DEFAULT_LIFETIME = 3600


@dataclass
class _Entry:
    gateway: IPAddress
    key: bytes = field(repr=False)
    expires_at: float
    counter: int = 0
    public: Endpoint | None = None
    last_reply: float = float("-inf")


@dataclass(frozen=True, slots=True)
class Observed:
    """A valid probe: who sent it, from where, and whether that moved its mapping."""

    gateway: IPAddress
    endpoint: Endpoint
    changed: bool


class EndpointRegistry:
    """The router's side: a token per gateway, the public endpoint each was last seen at.

    ``receive`` returns the reply to send back (to the datagram's source) and what was
    observed, or ``(None, None)`` for anything refused; refusals are counted by reason.
    """

    def __init__(
        self,
        min_interval: float = 0.1,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.min_interval = min_interval
        self._random = random
        self._by_token: dict[bytes, _Entry] = {}
        self._by_gateway: dict[IPAddress, bytes] = {}
        self.refused_malformed = 0
        self.refused_unknown = 0
        self.refused_tag = 0
        self.refused_replay = 0
        self.refused_expired = 0
        self.refused_rate = 0

    def issue(
        self,
        gateway: IPAddress,
        udp_port: int,
        now: float,
        lifetime: int = DEFAULT_LIFETIME,
        udp_address: IPAddress | None = None,
    ) -> EndpointParams:
        """A fresh token and key for ``gateway``; its previous token stops working, the
        public endpoint already seen is kept (the NAT mapping has not changed)."""
        old = self._by_gateway.pop(gateway, None)
        public = None
        if old is not None:
            public = self._by_token.pop(old).public
        token = self._random(TOKEN_LEN)
        key = self._random(ENDPOINT_KEY_LEN)
        params = EndpointParams(udp_address, udp_port, token, key, lifetime)
        self._by_token[token] = _Entry(gateway, key, now + lifetime, public=public)
        self._by_gateway[gateway] = token
        return params

    def revoke(self, gateway: IPAddress) -> None:
        """The gateway is gone (its last connection closed, or a reload removed it)."""
        token = self._by_gateway.pop(gateway, None)
        if token is not None:
            del self._by_token[token]

    def public(self, gateway: IPAddress, now: float) -> Endpoint | None:
        token = self._by_gateway.get(gateway)
        if token is None:
            return None
        entry = self._by_token[token]
        return None if now >= entry.expires_at else entry.public

    def __len__(self) -> int:
        return len(self._by_token)

    def receive(
        self, data: bytes, src: Endpoint, now: float
    ) -> tuple[bytes | None, Observed | None]:
        try:
            probe = parse_datagram(data)
        except DirectMessageError:
            self.refused_malformed += 1
            return None, None
        if probe.kind is not DatagramKind.ENDPOINT_PROBE:
            self.refused_malformed += 1
            return None, None
        entry = self._by_token.get(probe.ident)
        if entry is None:
            self.refused_unknown += 1
            return None, None
        if not authentic(data, entry.key):
            self.refused_tag += 1
            return None, None
        if now >= entry.expires_at:
            self.refused_expired += 1
            return None, None
        if probe.nonce <= entry.counter:
            self.refused_replay += 1
            return None, None
        entry.counter = probe.nonce
        changed = entry.public != src
        entry.public = src
        observed = Observed(entry.gateway, src, changed)
        if now - entry.last_reply < self.min_interval:
            # recorded, not answered: a reply per probe would let a flood of them (each
            # with a fresh counter, from the gateway itself) cost the router sends
            self.refused_rate += 1
            return None, observed
        entry.last_reply = now
        reply = Datagram(DatagramKind.ENDPOINT_REPLY, probe.ident, probe.nonce, src)
        return reply.encode(entry.key), observed


class EndpointProber:
    """The gateway's side: probes to the router until one is answered, then one every
    ``interval`` (which also keeps the NAT's mapping towards the router open).

    ``public``: the endpoint the router last saw us at (for logs and metrics)."""

    def __init__(
        self,
        params: EndpointParams,
        now: float,
        interval: float = 20.0,
        retry: float = 1.0,
    ) -> None:
        self.params = params
        self.interval = interval
        self.retry = retry
        self.expires_at = now + params.lifetime
        self.public: Endpoint | None = None
        self.sent = 0
        self.refused = 0
        self._counter = 0
        # the wait after the next probe if it goes unanswered: retry, doubling to interval
        self._gap = retry
        self._next: float | None = now

    def get_timer(self) -> float | None:
        return self._next

    def handle_timer(self, now: float) -> list[bytes]:
        """The probes due now (at most one)."""
        if self._next is None or now < self._next:
            return []
        if now >= self.expires_at:
            # the router renews the token before this; without a new one, stop
            self._next = None
            return []
        self._counter += 1
        self.sent += 1
        self._next = now + self._gap
        self._gap = min(self.interval, self._gap * 2)
        probe = Datagram(DatagramKind.ENDPOINT_PROBE, self.params.token, self._counter)
        return [probe.encode(self.params.key)]

    def receive(self, data: bytes, now: float) -> Endpoint | None:
        """The public endpoint of a valid reply to our latest probe, else None (counted)."""
        try:
            reply = parse_datagram(data)
        except DirectMessageError:
            self.refused += 1
            return None
        if (
            reply.kind is not DatagramKind.ENDPOINT_REPLY
            or reply.ident != self.params.token
            or reply.nonce != self._counter
            or not authentic(data, self.params.key)
        ):
            self.refused += 1
            return None
        self.public = reply.seen
        self._gap = self.retry
        if self._next is not None:
            self._next = now + self.interval
        return reply.seen

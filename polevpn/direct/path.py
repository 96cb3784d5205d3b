"""Which way a gateway sends a peer's packets: relayed (through the router), punching (an
attempt at a direct path under way, packets still relayed) or direct. No I/O.

Time and facts go in (an offer arrived, the direct transport came up or failed, something
was heard from the peer or sent to it, the router revoked the pair), decisions come out
of ``tick`` and ``offered``:

    PUNCH      start an attempt (a ``punch.Puncher``, then DTLS and the proofs) with the
               pair's current material; call ``connected`` or ``failed`` when it ends
    REKEY      new material while direct: handshake again with it on the same path and
               swap the transports when it is up; the old one keeps carrying until then
    KEEPALIVE  data went out and nothing came back for ``nudge``: send a keepalive now,
               so an idle path that just got busy is checked in a round trip
    RELAY      stop sending direct and close the direct transport: the router carries
               the peer's packets again

Direct lasts while the peer is heard: once something has been sent (data or keepalive) and
nothing at all has come back for ``silence`` (1.5 s), the path falls back to relayed
(within the 2 s issue 18 asks), as a kcp:// session gives up on silence. An idle path
sends only keepalives (punch.py, every 15 s), and an unanswered one ends it the same way.
A packet from the peer that comes through the router while direct means the peer has
given the path up (its own silence came first): it ends ours at once (``peer_relayed``),
so our replies go where the peer's packets come from rather than into a dead path.
After a silence the next attempt follows ``retry_first`` later; after a failed attempt
(symmetric NAT, a firewall) ``retry_min`` later; each failure in a row doubles the wait up
to ``retry_max``, and a direct path that has lasted ``stable`` starts the count over.
Expired or revoked material ends the path with no retry: the router's next offer starts
again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from polevpn.direct.messages import Cause, Endpoint, PathCode, Status
from polevpn.packet.routing import IPAddress


class PathState(Enum):
    RELAYED = "relayed"
    PUNCHING = "punching"
    DIRECT = "direct"


class Decision(Enum):
    PUNCH = "punch"
    REKEY = "rekey"
    KEEPALIVE = "keepalive"
    RELAY = "relay"


@dataclass(frozen=True)
class PathConfig:
    # the bound is 2 s from the path falling silent to traffic on the router;
    # 1.5 s leaves room for the caller's timer and the first send after the silence began
    silence: float = 1.5
    nudge: float = 0.5
    retry_first: float = 1.0
    retry_min: float = 10.0
    retry_max: float = 600.0
    retry_factor: float = 2.0
    stable: float = 60.0
    # an attempt that neither connects nor fails in this long has failed (the punch
    # deadline is 3 s; the DTLS handshake and the proofs take a few round trips more)
    attempt_timeout: float = 10.0
    # a packet from the peer through the router while direct (``peer_relayed``) ends the
    # path, unless the path came up less than ``relay_grace`` ago (the peer's packets
    # relayed before its side came up are still on their way through the router, behind
    # its queues) or the peer was heard directly less than ``relay_quiet`` ago (the path
    # carries in its direction: a straggler, not a peer that gave the path up)
    relay_grace: float = 2.0
    relay_quiet: float = 0.5


_CODES = {
    PathState.RELAYED: PathCode.RELAYED,
    PathState.PUNCHING: PathCode.PUNCHING,
    PathState.DIRECT: PathCode.DIRECT,
}


class PeerPath:
    """The path to one peer gateway. ``direct`` is what the data path reads per packet."""

    __slots__ = (
        "peer",
        "config",
        "state",
        "cause",
        "direct",
        "expires_at",
        "failures",
        "retry_at",
        "since",
        "last_heard",
        "waiting_since",
        "nudged",
        "bytes_sent",
        "bytes_received",
        "refused",
        "transitions",
    )

    def __init__(self, peer: IPAddress, config: PathConfig | None = None) -> None:
        self.peer = peer
        self.config = config or PathConfig()
        self.state = PathState.RELAYED
        self.cause = Cause.NONE
        self.direct = False
        # the current material's end (None: there is none, so no attempt can start)
        self.expires_at: float | None = None
        self.failures = 0
        self.retry_at: float | None = None
        self.since = 0.0  # when the state was entered
        self.last_heard: float | None = None
        # the first send since the peer was last heard; None while nothing is owed
        self.waiting_since: float | None = None
        self.nudged = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.refused = 0
        self.transitions = 0

    # ---- facts in ----------------------------------------------------------------------

    def offered(self, expires_at: float, now: float) -> list[Decision]:
        """New key material for this pair (an offer, or its renewal)."""
        if expires_at <= now:
            return []
        self.expires_at = expires_at
        if self.state is PathState.DIRECT:
            return [Decision.REKEY]
        if self.state is PathState.PUNCHING:
            # the attempt under way uses the old material: start over with the new
            self._enter(PathState.PUNCHING, now)
            return [Decision.PUNCH]
        if self.retry_at is not None and self.failures:
            # in a backoff after failures: a renewal does not cut it short
            return []
        return self._punch(now)

    def connected(self, now: float) -> None:
        """The direct transport is up and the peer proved the pair's material."""
        if self.state is not PathState.PUNCHING:
            return
        self._enter(PathState.DIRECT, now)
        self.cause = Cause.NONE
        self.last_heard = now
        self.waiting_since = None
        self.nudged = False
        self.retry_at = None

    def failed(self, now: float, cause: Cause = Cause.NO_ANSWER) -> list[Decision]:
        """The attempt (or a rekey while direct) failed: relayed, retry after a backoff."""
        if self.state is PathState.RELAYED:
            return []
        self.failures += 1
        return self._relay(now, cause, self.config.retry_min)

    def revoked(self, now: float, cause: Cause = Cause.REVOKED) -> list[Decision]:
        """The router revoked the pair (or the gateway dropped its material): relayed, and
        no attempt until a new offer."""
        self.expires_at = None
        out = self._relay(now, cause, None) if self.state is not PathState.RELAYED else []
        self.cause = cause
        self.retry_at = None
        self.failures = 0
        return out

    def peer_punching(self, now: float) -> list[Decision]:
        """An authentic probe of the current material came while no attempt is under way:
        the peer is punching (it fell back on silence, or its backoff ended first), and a
        punch succeeds only while both probe. Join it now rather than at the end of our own
        wait; not within ``retry_first`` of our last attempt or path ending, so the last
        probes of an attempt that failed on both sides do not start the next at once."""
        if self.state is not PathState.RELAYED or now - self.since < self.config.retry_first:
            return []
        self.retry_at = None
        return self._punch(now)

    def peer_relayed(self, now: float) -> list[Decision]:
        """A packet from the peer came through the router (the authenticated router link,
        its source within the peer's grant) while our path to it is direct and our
        session up: the peer no longer sends directly (it fell back on its own silence).
        Our side would notice only ``silence`` after its next unanswered send, i.e. the
        replies to what the peer now relays would go into a dead path for another 1.5 s:
        fall back now (cause silence, retry as after a silence). See ``relay_grace`` and
        ``relay_quiet`` for what does not count."""
        cfg = self.config
        if self.state is not PathState.DIRECT or now < self.since + cfg.relay_grace:
            return []
        if self.last_heard is not None and now < self.last_heard + cfg.relay_quiet:
            return []
        return self._silent(now)

    def heard(self, now: float, nbytes: int = 0) -> None:
        """Something authentic came from the peer over the direct path (data, an ACK, a
        keepalive). ``nbytes``: IP bytes delivered."""
        self.last_heard = now
        self.waiting_since = None
        self.nudged = False
        self.bytes_received += nbytes

    def sent(self, now: float, nbytes: int = 0) -> None:
        """Something went to the peer over the direct path."""
        if self.waiting_since is None:
            self.waiting_since = now
        self.bytes_sent += nbytes

    # ---- decisions out -----------------------------------------------------------------

    def tick(self, now: float) -> list[Decision]:
        cfg = self.config
        if self.state is PathState.DIRECT:
            if self.expires_at is not None and now >= self.expires_at:
                self.expires_at = None
                return self._relay(now, Cause.EXPIRED, None)
            waiting = self.waiting_since
            # compared as next_deadline computes them (a sum), never as a difference: in
            # floats ``(w + d) - w`` may fall short of ``d``, and a caller woken at the
            # deadline would find nothing due and be woken again at once, for ever
            if waiting is not None:
                if now >= waiting + cfg.silence:
                    return self._silent(now)
                if now >= waiting + cfg.nudge and not self.nudged:
                    self.nudged = True
                    return [Decision.KEEPALIVE]
            return []
        if self.state is PathState.PUNCHING:
            if self.expires_at is not None and now >= self.expires_at:
                self.expires_at = None
                return self._relay(now, Cause.EXPIRED, None)
            if now >= self.since + cfg.attempt_timeout:
                self.failures += 1
                return self._relay(now, Cause.HANDSHAKE, cfg.retry_min)
            return []
        if self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            return self._punch(now)
        return []

    def next_deadline(self) -> float | None:
        """When ``tick`` may next decide something (None: only new facts can)."""
        cfg = self.config
        times: list[float] = []
        if self.state is PathState.RELAYED:
            if self.retry_at is not None:
                times.append(self.retry_at)
        else:
            if self.expires_at is not None:
                times.append(self.expires_at)
            if self.state is PathState.PUNCHING:
                times.append(self.since + cfg.attempt_timeout)
            elif self.waiting_since is not None:
                times.append(self.waiting_since + cfg.silence)
                if not self.nudged:
                    times.append(self.waiting_since + cfg.nudge)
        return min(times) if times else None

    def status(self, pair_id: bytes, rtt: float | None, endpoint: Endpoint | None) -> Status:
        """The DIRECT_STATUS for the router's view of this path."""
        return Status(
            pair_id,
            _CODES[self.state],
            self.cause,
            rtt,
            self.bytes_sent,
            self.bytes_received,
            self.refused,
            endpoint if self.state is PathState.DIRECT else None,
        )

    # ---- internals ---------------------------------------------------------------------

    def _enter(self, state: PathState, now: float) -> None:
        if state is not self.state:
            self.transitions += 1
        self.state = state
        self.direct = state is PathState.DIRECT
        self.since = now

    def _punch(self, now: float) -> list[Decision]:
        if self.expires_at is None or now >= self.expires_at:
            self.expires_at = None
            self.cause = Cause.EXPIRED
            return []
        self._enter(PathState.PUNCHING, now)
        return [Decision.PUNCH]

    def _silent(self, now: float) -> list[Decision]:
        """The peer is not heard on the path any more: relayed, retry soon."""
        if now - self.since >= self.config.stable:
            self.failures = 0
        self.failures += 1
        return self._relay(now, Cause.SILENCE, self.config.retry_first)

    def _relay(self, now: float, cause: Cause, wait: float | None) -> list[Decision]:
        self._enter(PathState.RELAYED, now)
        self.cause = cause
        self.waiting_since = None
        self.nudged = False
        if wait is None:
            self.retry_at = None
        else:
            cfg = self.config
            backoff = wait * cfg.retry_factor ** max(0, self.failures - 1)
            self.retry_at = now + min(cfg.retry_max, backoff)
        return [Decision.RELAY]

"""Hole punching for one pair of gateways: probes, acks, nomination, keepalives. No I/O.

In the manner of ``kcp.connection``: datagrams and the time go in (``receive``,
``handle_timer``), datagrams to send (with their destination), the next deadline and events
come out (``datagrams_to_send``, ``get_timer``, ``next_event``). The caller owns the one UDP
socket both the probes and the path's DTLS use.

Both gateways start when their offers arrive and send a PROBE to every candidate of the
other at once, in rounds (the gap growing from ``interval`` by ``backoff`` to
``interval_max``; at most ``max_probes`` in all). Each outbound probe opens the sender's
NAT towards that candidate, so once both have probed, the other's next probe gets
through. Every authentic PROBE is answered with an ACK to where it came from, naming that
source (the prober's mapping as seen); a probe from an endpoint that is not a candidate (a
NAT that mapped the prober anew for this peer) makes that endpoint a candidate too
("learned", at most ``max_learned``) and gets a probe at once.

A candidate pair is valid when an ACK to one of our probes comes back from the endpoint
the probe went to, with the probe's random nonce: a third party that cannot compute the
pair's HMAC can neither confirm a path nor fake one, and an old ACK is not taken twice.
The initiator (the lower gateway address, also the DTLS client) takes the first valid
pair and nominates it: a PROBE with the nominate flag to that endpoint; when its ACK
comes back, the initiator is CONNECTED; the responder is CONNECTED when it receives the
nomination, and uses its source. No nomination by ``deadline`` (3 s): FAILED, the pair
stays on the router ("relay"). Endpoint-independent mapping (most home and office NATs)
meets in a round trip or two; when both sides map per destination (symmetric NAT), no
probe ever reaches a mapping the other knows of, and the attempt fails.

CONNECTED, each side sends a keepalive probe every ``keepalive`` seconds (the initiator's
nominate again, so the responder follows a NAT that rebinds the initiator), resent every
``keepalive_retry`` until answered (at most ``keepalive_tries`` times); each ACK gives the
round-trip time. Deciding that the path is dead is ``path.PeerPath``'s job.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from polevpn.direct.keys import PairKeys
from polevpn.direct.messages import (
    FLAG_NOMINATE,
    Datagram,
    DatagramKind,
    DirectMessageError,
    Endpoint,
    authentic,
    is_datagram,
    parse_datagram,
)


class PunchState(Enum):
    IDLE = "idle"
    PROBING = "probing"
    CONNECTED = "connected"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True)
class PunchConfig:
    interval: float = 0.1
    backoff: float = 1.5
    interval_max: float = 0.5
    deadline: float = 3.0
    max_candidates: int = 16
    max_learned: int = 4
    max_probes: int = 256
    keepalive: float = 15.0
    keepalive_retry: float = 0.5
    keepalive_tries: int = 4
    # ACKs answered per second at most: a captured probe replayed from a forged source
    # makes us send an ACK of the same size there, no more often than this
    max_acks_per_second: float = 100.0
    # probe nonces outstanding (sent, not yet answered) that are remembered
    max_outstanding: int = 512


# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathUp:
    """Both directions work between the sockets: send to ``endpoint``. ``mapped``: our own
    endpoint as the peer sees it (initiator only; None for the responder)."""

    endpoint: Endpoint
    rtt: float | None
    mapped: Endpoint | None


@dataclass(frozen=True, slots=True)
class PunchFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class KeepaliveAcked:
    rtt: float


@dataclass(frozen=True, slots=True)
class PeerMoved:
    """The initiator's keepalives now come from ``endpoint`` (its NAT rebound it): the
    responder sends there from now on."""

    endpoint: Endpoint


PunchEvent = PathUp | PunchFailed | KeepaliveAcked | PeerMoved


@dataclass(slots=True)
class _Sent:
    dest: Endpoint
    at: float
    nominate: bool


class Puncher:
    """One attempt at a direct path to one peer, then its keepalives while it lasts."""

    def __init__(
        self,
        keys: PairKeys,
        candidates: Iterable[Endpoint],
        config: PunchConfig | None = None,
        local: Iterable[Endpoint] = (),
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """``candidates``: the peer's, from the offer; ``local``: this gateway's own (never
        probed: a candidate that is our own endpoint would answer us ourselves); when
        given, only candidates of an address family among them are probed."""
        self.keys = keys
        self.config = cfg = config or PunchConfig()
        self._random = random
        own = set(local)
        families = {e.address.version for e in own} or {4, 6}
        targets: list[Endpoint] = []
        for ep in candidates:
            if ep in own or ep in targets or ep.address.version not in families:
                continue
            if len(targets) < cfg.max_candidates:
                targets.append(ep)
        self.targets = targets
        self.learned = 0
        self.state = PunchState.IDLE
        self.selected: Endpoint | None = None
        self.mapped: Endpoint | None = None
        self.rtt: float | None = None
        self.started_at: float | None = None
        self.last_heard: float | None = None
        self._deadline = 0.0
        self._next_round: float | None = None
        self._gap = cfg.interval
        self._outstanding: dict[int, _Sent] = {}
        self._nominated = False  # initiator: a nomination is under way
        self._next_keepalive: float | None = None
        self._keepalive_tries = 0
        self._acks = cfg.max_acks_per_second
        self._acks_at = 0.0
        self._out: list[tuple[bytes, Endpoint]] = []
        self._events: deque[PunchEvent] = deque()
        # counters
        self.probes_sent = 0
        self.acks_sent = 0
        self.refused_malformed = 0
        self.refused_tag = 0
        self.refused_stale = 0
        self.refused_source = 0
        self.refused_expired = 0
        self.acks_limited = 0

    # ---- the caller's interface ---------------------------------------------------------

    def start(self, now: float) -> None:
        if self.state is not PunchState.IDLE:
            return
        self.started_at = now
        if not self.targets:
            self._fail("no candidate to probe")
            return
        self.state = PunchState.PROBING
        self._deadline = now + self.config.deadline
        self._next_round = now
        self.handle_timer(now)

    def close(self) -> None:
        self.state = PunchState.CLOSED
        self._next_round = self._next_keepalive = None
        self._outstanding.clear()

    def get_timer(self) -> float | None:
        if self.state is PunchState.PROBING:
            if self._next_round is None:
                return self._deadline
            return min(self._deadline, self._next_round)
        if self.state is PunchState.CONNECTED:
            return self._next_keepalive
        return None

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> PunchEvent | None:
        return self._events.popleft() if self._events else None

    def handle_timer(self, now: float) -> None:
        if self.state is PunchState.PROBING:
            if self.keys.expired(now):
                self._fail("key material expired")
            elif now >= self._deadline:
                what = "no nomination" if not self.keys.initiator else "no candidate answered"
                if self._nominated:
                    what = "the nominated candidate stopped answering"
                self._fail(f"{what} within {self.config.deadline:g}s")
            elif self._next_round is not None and now >= self._next_round:
                self._round(now)
        elif (
            self.state is PunchState.CONNECTED
            and self._next_keepalive is not None
            and now >= self._next_keepalive
        ):
            self._keepalive(now)

    def receive(self, data: bytes, src: Endpoint, now: float) -> bool:
        """Take a datagram the socket received from ``src``. False: not a probe or ack
        of this pair (another pair's, or no direct-path datagram at all), for the caller
        to offer elsewhere; True: it was, valid or refused (then counted)."""
        if self.state in (PunchState.IDLE, PunchState.CLOSED) or not is_datagram(data):
            return False
        try:
            msg = parse_datagram(data)
        except DirectMessageError:
            self.refused_malformed += 1
            return False
        if msg.kind not in (DatagramKind.PROBE, DatagramKind.ACK):
            return False
        if msg.ident != self.keys.pair_id:
            return False
        if not authentic(data, self.keys.recv_probe_key):
            self.refused_tag += 1
            return True
        if self.keys.expired(now):
            self.refused_expired += 1
            return True
        if msg.kind is DatagramKind.PROBE:
            self._on_probe(msg, src, now)
        else:
            self._on_ack(msg, src, now)
        return True

    # ---- probing ------------------------------------------------------------------------

    def _probe(self, dest: Endpoint, now: float, nominate: bool = False) -> bool:
        if self.probes_sent >= self.config.max_probes and self.state is PunchState.PROBING:
            return False
        if len(self._outstanding) >= self.config.max_outstanding:
            # the oldest nonce goes: its ack is long overdue
            del self._outstanding[next(iter(self._outstanding))]
        nonce = int.from_bytes(self._random(8), "big")
        self._outstanding[nonce] = _Sent(dest, now, nominate)
        flags = FLAG_NOMINATE if nominate else 0
        probe = Datagram(DatagramKind.PROBE, self.keys.pair_id, nonce, flags=flags)
        self._out.append((probe.encode(self.keys.send_probe_key), dest))
        self.probes_sent += 1
        return True

    def _round(self, now: float) -> None:
        cfg = self.config
        if self._nominated and self.selected is not None:
            self._probe(self.selected, now, nominate=True)
        else:
            for dest in self.targets:
                if not self._probe(dest, now):
                    break
        self._next_round = now + self._gap
        self._gap = min(cfg.interval_max, self._gap * cfg.backoff)

    def _ack(self, msg: Datagram, src: Endpoint, now: float) -> None:
        rate = self.config.max_acks_per_second
        self._acks = min(rate, self._acks + (now - self._acks_at) * rate)
        self._acks_at = now
        if self._acks < 1.0:
            self.acks_limited += 1
            return
        self._acks -= 1.0
        ack = Datagram(DatagramKind.ACK, self.keys.pair_id, msg.nonce, seen=src)
        self._out.append((ack.encode(self.keys.send_probe_key), src))
        self.acks_sent += 1

    def _on_probe(self, msg: Datagram, src: Endpoint, now: float) -> None:
        self.last_heard = now
        self._ack(msg, src, now)
        if self.state is PunchState.PROBING:
            if src not in self.targets and self.learned < self.config.max_learned:
                # the peer's NAT gave it another mapping for us than the router saw
                self.targets.append(src)
                self.learned += 1
                if not self._nominated:
                    self._probe(src, now)
            if msg.nominate and not self.keys.initiator:
                self._connected(src, None, None, now)
        elif (
            self.state is PunchState.CONNECTED
            and msg.nominate
            and not self.keys.initiator
            and src != self.selected
        ):
            self.selected = src
            self._events.append(PeerMoved(src))

    def _on_ack(self, msg: Datagram, src: Endpoint, now: float) -> None:
        sent = self._outstanding.get(msg.nonce)
        if sent is None:
            # not ours, answered already, or forgotten: nothing to learn from it
            self.refused_stale += 1
            return
        if sent.dest != src:
            # an answer must come from where the probe went, or the path is not one
            self.refused_source += 1
            return
        del self._outstanding[msg.nonce]
        rtt = now - sent.at
        self.last_heard = now
        self.rtt = rtt
        if self.state is PunchState.PROBING:
            if not self.keys.initiator:
                return  # the responder waits for the initiator's nomination
            if sent.nominate and src == self.selected:
                self._connected(src, rtt, msg.seen, now)
            elif not self._nominated:
                self.selected = src
                self._nominated = True
                self._probe(src, now, nominate=True)
        elif self.state is PunchState.CONNECTED and src == self.selected:
            self._keepalive_tries = 0
            self._next_keepalive = now + self.config.keepalive
            self._events.append(KeepaliveAcked(rtt))

    def _connected(
        self, endpoint: Endpoint, rtt: float | None, mapped: Endpoint | None, now: float
    ) -> None:
        self.state = PunchState.CONNECTED
        self.selected = endpoint
        self.mapped = mapped
        self._next_round = None
        # the probes of the other candidates are not answered any more, or do not matter
        self._outstanding.clear()
        self._keepalive_tries = 0
        self._next_keepalive = now + self.config.keepalive
        self._events.append(PathUp(endpoint, rtt, mapped))

    def _fail(self, reason: str) -> None:
        self.state = PunchState.FAILED
        self._next_round = None
        self._outstanding.clear()
        self._events.append(PunchFailed(reason))

    # ---- keepalives ---------------------------------------------------------------------

    def _keepalive(self, now: float) -> None:
        assert self.selected is not None
        cfg = self.config
        self._probe(self.selected, now, nominate=self.keys.initiator)
        self._keepalive_tries += 1
        if self._keepalive_tries < cfg.keepalive_tries:
            self._next_keepalive = now + cfg.keepalive_retry
        else:
            # unanswered: try again after a full interval; path.py has given up by then
            self._keepalive_tries = 0
            self._next_keepalive = now + cfg.keepalive

    def keepalive_now(self, now: float) -> None:
        """Send a keepalive at once (path.py asks when data went out unanswered)."""
        if self.state is PunchState.CONNECTED:
            self._keepalive(now)

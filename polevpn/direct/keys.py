"""Key material of a direct path: what the router issues per pair of gateways, and what
both gateways derive from it. No I/O (randomness is a parameter).

The router issues, for one pair of gateways and one offer, a fresh random ``secret`` (32
bytes), a random ``pair_id`` (16 bytes) and a lifetime, and sends the same three to both
in their DIRECT_OFFER (``pair_offers``). Each gateway derives with HKDF-SHA256 (RFC 5869,
salt the pair id, input the secret), every output bound to the pair id and to both gateway
addresses in a fixed order (the lower address first, so both ends compute the same):

    probe lo>hi, probe hi>lo   HMAC keys of the punch probes and acks, one per direction,
                               so a datagram reflected back to its sender does not verify
    proof lo>hi, proof hi>lo   HMAC keys of the DIRECT_PROOF each side sends first on the
                               path's session, over the DTLS association's exporter value
    psk                        a pre-shared key (and ``psk_identity``) for an ECDHE-PSK
                               DTLS suite, should the transport take one instead of proofs

Material is refused when it is not for this gateway (``you`` is not its address), names
this gateway as its own peer, or has expired (``KeyExpired``): the lifetime runs from the
moment the offer arrived, on the gateway's own clock, since the two hosts' clocks need
not agree.

What the router knows: the secret, hence every key above; it could impersonate either
gateway to the other, as it can already by forwarding (it is the authority that grants
networks). What it does not know: the DTLS traffic keys, which come from an ephemeral
ECDHE exchange between the two gateways; a router (or anyone who learns the secret later)
that only watches the direct path's datagrams cannot read them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from polevpn.direct.messages import (
    MAX_LIFETIME,
    PAIR_ID_LEN,
    SECRET_LEN,
    Candidate,
    Offer,
    Proof,
)
from polevpn.packet.routing import IPAddress, IPNetwork

LABEL = b"polevpn direct 1"
PROOF_LABEL = b"polevpn direct proof 1"
# the label the DTLS exporter (RFC 5705) is asked with for the channel binding the proofs
# cover; no context, 32 bytes
EXPORTER_LABEL = b"EXPORTER-polevpn-direct"
EXPORTER_LEN = 32
# how long a pair's material lives unless the router says otherwise; it renews it while
# the pair's traffic flows (docs/protocol.md section 18)
DEFAULT_LIFETIME = 3600
KEY_LEN = 32


class KeyMaterialError(ValueError):
    """Key material that this gateway must not use."""


class KeyExpired(KeyMaterialError):
    """The material's lifetime is over: a new offer is needed."""


# ---- HKDF (RFC 5869) ----------------------------------------------------------------------


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    if not 0 < length <= 255 * 32:
        raise ValueError(f"HKDF-SHA256 cannot expand to {length} bytes")
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _field(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _addr(addr: IPAddress) -> bytes:
    return bytes([addr.version]) + addr.packed


def _order(addr: IPAddress) -> tuple[int, int]:
    return addr.version, int(addr)


# ---- what the router issues ---------------------------------------------------------------


@dataclass(frozen=True)
class PairMaterial:
    """One issue of key material for one pair of gateways."""

    pair_id: bytes
    secret: bytes = field(repr=False)
    lifetime: int = DEFAULT_LIFETIME

    def __post_init__(self) -> None:
        if len(self.pair_id) != PAIR_ID_LEN or len(self.secret) != SECRET_LEN:
            raise KeyMaterialError("pair id or secret of the wrong size")
        if not 1 <= self.lifetime <= MAX_LIFETIME:
            raise KeyMaterialError(f"lifetime {self.lifetime} s is not within 1..{MAX_LIFETIME}")


def issue(
    lifetime: int = DEFAULT_LIFETIME, random: Callable[[int], bytes] = os.urandom
) -> PairMaterial:
    """Fresh material for one pair: every offer gets its own, never reused."""
    return PairMaterial(random(PAIR_ID_LEN), random(SECRET_LEN), lifetime)


@dataclass(frozen=True)
class Side:
    """What the router tells the other gateway about one gateway of a pair: its address,
    where it may be reached, and what it is granted."""

    address: IPAddress
    candidates: tuple[Candidate, ...]
    networks: tuple[IPNetwork, ...]


def pair_offers(material: PairMaterial, a: Side, b: Side) -> tuple[Offer, Offer]:
    """The DIRECT_OFFER for ``a`` and the one for ``b``: the same material in both, each
    naming the other as its peer, with the other's candidates and grant."""
    m = material
    to_a = Offer(m.pair_id, m.lifetime, m.secret, a.address, b.address, b.candidates, b.networks)
    to_b = Offer(m.pair_id, m.lifetime, m.secret, b.address, a.address, a.candidates, a.networks)
    return to_a, to_b


# ---- what a gateway derives ---------------------------------------------------------------


@dataclass(frozen=True)
class PairKeys:
    """The keys of one pair as one gateway (``me``) holds them.

    ``initiator``: this gateway has the lower address; it nominates the candidate pair
    (punch.py) and is the DTLS client. ``expires_at`` is on the caller's clock.
    """

    pair_id: bytes
    me: IPAddress
    peer: IPAddress
    expires_at: float
    initiator: bool
    send_probe_key: bytes = field(repr=False)
    recv_probe_key: bytes = field(repr=False)
    send_proof_key: bytes = field(repr=False)
    recv_proof_key: bytes = field(repr=False)
    psk: bytes = field(repr=False)

    @classmethod
    def derive(
        cls, pair_id: bytes, secret: bytes, me: IPAddress, peer: IPAddress, expires_at: float
    ) -> PairKeys:
        if len(pair_id) != PAIR_ID_LEN or len(secret) != SECRET_LEN:
            raise KeyMaterialError("pair id or secret of the wrong size")
        if me == peer:
            raise KeyMaterialError(f"a pair of {me} with itself")
        initiator = _order(me) < _order(peer)
        lo, hi = (me, peer) if initiator else (peer, me)
        prk = hkdf_extract(pair_id, secret)
        bound = _field(pair_id) + _field(_addr(lo)) + _field(_addr(hi))

        def key(purpose: bytes) -> bytes:
            return hkdf_expand(prk, _field(LABEL) + _field(purpose) + bound, KEY_LEN)

        up, down = key(b"probe lo>hi"), key(b"probe hi>lo")
        proof_up, proof_down = key(b"proof lo>hi"), key(b"proof hi>lo")
        return cls(
            pair_id=pair_id,
            me=me,
            peer=peer,
            expires_at=expires_at,
            initiator=initiator,
            send_probe_key=up if initiator else down,
            recv_probe_key=down if initiator else up,
            send_proof_key=proof_up if initiator else proof_down,
            recv_proof_key=proof_down if initiator else proof_up,
            psk=key(b"psk"),
        )

    @classmethod
    def from_offer(cls, offer: Offer, own: Collection[IPAddress], now: float) -> PairKeys:
        """The keys of an offer, if it is for this gateway (``own``: its addresses, the
        IPv4 and the IPv6 one); KeyMaterialError otherwise."""
        if offer.you not in own:
            mine = ", ".join(sorted(map(str, own))) or "none"
            raise KeyMaterialError(f"offer for {offer.you}, not this gateway ({mine})")
        if offer.peer in own:
            raise KeyMaterialError(f"offer names this gateway ({offer.peer}) as its peer")
        return cls.derive(offer.pair_id, offer.secret, offer.you, offer.peer, now + offer.lifetime)

    @property
    def psk_identity(self) -> bytes:
        return b"polevpn-direct-1:" + self.pair_id.hex().encode()

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def check(self, now: float) -> None:
        if self.expired(now):
            raise KeyExpired(f"key material of the pair with {self.peer} has expired")

    def _proof(self, key: bytes, binding: bytes) -> bytes:
        text = _field(PROOF_LABEL) + _field(self.pair_id) + _field(binding)
        return hmac.new(key, text, hashlib.sha256).digest()

    def channel_proof(self, binding: bytes) -> Proof:
        """This side's DIRECT_PROOF for the DTLS association whose exporter value (label
        EXPORTER_LABEL, EXPORTER_LEN bytes) is ``binding``."""
        return Proof(self.pair_id, self._proof(self.send_proof_key, binding))

    def verify_channel_proof(self, proof: Proof, binding: bytes, now: float) -> bool:
        """Whether the peer's DIRECT_PROOF is for this pair, this association, made with
        the peer's key, and the material still valid. A proof replayed from another
        association, or relayed by someone in the middle (who holds two associations,
        with two exporter values), fails."""
        ok = hmac.compare_digest(proof.proof, self._proof(self.recv_proof_key, binding))
        return ok and hmac.compare_digest(proof.pair_id, self.pair_id) and not self.expired(now)


class PairKeyring:
    """The pairs a gateway holds material for, by pair id, at most ``max_pairs``: the key
    that checks an incoming probe. Unknown and expired pair ids are refused and counted;
    expired material is dropped as it is met (and by ``expire``)."""

    __slots__ = ("max_pairs", "_pairs", "refused_unknown", "refused_expired")

    def __init__(self, max_pairs: int = 1024) -> None:
        self.max_pairs = max_pairs
        self._pairs: dict[bytes, PairKeys] = {}
        self.refused_unknown = 0
        self.refused_expired = 0

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, keys: PairKeys, now: float) -> None:
        self.expire(now)
        old = self._pairs.get(keys.pair_id)
        if old is not None and (old.me, old.peer) != (keys.me, keys.peer):
            raise KeyMaterialError("pair id already in use for another pair")
        if old is None and len(self._pairs) >= self.max_pairs:
            raise KeyMaterialError(f"already {self.max_pairs} pairs")
        keys.check(now)
        self._pairs[keys.pair_id] = keys

    def get(self, pair_id: bytes, now: float) -> PairKeys | None:
        keys = self._pairs.get(pair_id)
        if keys is None:
            self.refused_unknown += 1
            return None
        if keys.expired(now):
            del self._pairs[pair_id]
            self.refused_expired += 1
            return None
        return keys

    def remove(self, pair_id: bytes) -> PairKeys | None:
        return self._pairs.pop(pair_id, None)

    def expire(self, now: float) -> list[PairKeys]:
        gone = [k for k in self._pairs.values() if k.expired(now)]
        for k in gone:
            del self._pairs[k.pair_id]
        return gone

    def for_peer(self, peer: IPAddress) -> list[PairKeys]:
        return [k for k in self._pairs.values() if k.peer == peer]


def own_addresses(*addresses: str | IPAddress | None) -> frozenset[IPAddress]:
    """A gateway's own addresses (``gateway``, ``gateway6``) as ``from_offer`` takes them."""
    return frozenset(ipaddress.ip_address(a) for a in addresses if a is not None)

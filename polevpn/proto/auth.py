"""Who may connect to the router and what each gateway may announce. No I/O.

Two kinds of credential exist side by side:

* the shared ``key`` of PoleVPN: whoever holds it may register any gateway address and any
  network, except (when a ``gateways`` table exists too) the addresses and networks granted
  to a listed gateway;
* a ``gateways`` table keyed by gateway address, each entry with its own key, a client
  certificate fingerprint, or both (then both must match), and the networks it may announce.

Keys are compared with ``hmac.compare_digest``. To find which entries a key could belong to
without comparing it against every entry, keys are indexed by their SHA-256 digest: the
timing of a dict probe on a digest tells an attacker nothing about the key's bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from polevpn.packet.routing import IPAddress, IPNetwork


@dataclass(frozen=True)
class GatewayGrant:
    """One row of the router's ``gateways`` table."""

    gateway: IPAddress
    key: str | None
    cert_fingerprint: bytes | None
    networks: tuple[IPNetwork, ...]
    # direct paths to and from other gateways (docs/protocol.md section 18); false: the
    # router never offers this gateway one
    direct: bool = True

    def covers(self, net: IPNetwork) -> bool:
        return any(net.version == g.version and net.subnet_of(g) for g in self.networks)  # type: ignore[arg-type]


def keys_equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on a REGISTER: ``error`` is None when it may be installed."""

    error: str | None
    grant: GatewayGrant | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Authority:
    __slots__ = ("shared_key", "grants", "_key_index", "_fingerprints")

    def __init__(self, shared_key: str | None, grants: Iterable[GatewayGrant] = ()) -> None:
        self.shared_key = shared_key or None
        self.grants: dict[IPAddress, GatewayGrant] = {}
        for g in grants:
            if g.gateway in self.grants:
                raise ValueError(f"gateway {g.gateway} is listed twice")
            if g.key is None and g.cert_fingerprint is None:
                raise ValueError(f"gateway {g.gateway} has neither a key nor a fingerprint")
            self.grants[g.gateway] = g
        self._key_index = {_digest(g.key) for g in self.grants.values() if g.key is not None}
        self._fingerprints = {
            g.cert_fingerprint for g in self.grants.values() if g.cert_fingerprint is not None
        }

    @property
    def per_gateway(self) -> bool:
        return bool(self.grants)

    def authenticate(self, key: str, fingerprint: bytes | None) -> bool:
        """AUTH: whether the key (or client certificate) belongs to anyone at all.

        Which gateway it belongs to is only known at REGISTER, where ``authorize`` decides.
        """
        if self.shared_key is not None and keys_equal(key, self.shared_key):
            return True
        if key and _digest(key) in self._key_index:
            return True
        return fingerprint is not None and fingerprint in self._fingerprints

    def _credentials_match(self, g: GatewayGrant, key: str, fingerprint: bytes | None) -> bool:
        ok = True
        if g.key is not None:
            ok = keys_equal(key, g.key)
        if g.cert_fingerprint is not None:
            ok = (
                fingerprint is not None and hmac.compare_digest(fingerprint, g.cert_fingerprint)
            ) and ok
        return ok

    def authorize(
        self,
        key: str,
        fingerprint: bytes | None,
        gateway: IPAddress,
        networks: Sequence[IPNetwork],
    ) -> Decision:
        """REGISTER: may these credentials install ``gateway`` and ``networks``?"""
        grant = self.grants.get(gateway)
        if grant is not None:
            if not self._credentials_match(grant, key, fingerprint):
                return Decision(f"invalid credentials for gateway {gateway}")
            for net in networks:
                if not grant.covers(net):
                    return Decision(f"network {net} is not granted to gateway {gateway}")
            return Decision(None, grant)
        if self.shared_key is None or not keys_equal(key, self.shared_key):
            if self.per_gateway:
                return Decision(f"gateway {gateway} is not configured on this router")
            return Decision("invalid key")
        # the shared key may not take what the table gives to a listed gateway
        host = ipaddress.ip_network(gateway)
        for net in (host, *networks):
            owner = self.owner_of(net)
            if owner is not None:
                return Decision(f"network {net} belongs to gateway {owner.gateway}")
        return Decision(None)

    def owner_of(self, net: IPNetwork) -> GatewayGrant | None:
        """The listed gateway whose grant overlaps ``net``, if any."""
        for g in self.grants.values():
            if g.gateway.version == net.version and net.overlaps(ipaddress.ip_network(g.gateway)):
                return g
            for own in g.networks:
                if own.version == net.version and net.overlaps(own):  # type: ignore[arg-type]
                    return g
        return None

    def overlaps(self) -> list[tuple[GatewayGrant, GatewayGrant, IPNetwork]]:
        """Pairs of listed gateways granted overlapping networks, for a start-up warning."""
        out = []
        rows = list(self.grants.values())
        for i, a in enumerate(rows):
            for b in rows[i + 1 :]:
                for net in a.networks:
                    if any(
                        net.version == o.version and net.overlaps(o)  # type: ignore[arg-type]
                        for o in b.networks
                    ):
                        out.append((a, b, net))
                        break
        return out

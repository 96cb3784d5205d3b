"""Mutual authentication of two routers of a cluster on a router link. No I/O.

Both routers hold the cluster credential (``peer_key``, and during a rotation the one
before it). Neither sends it: each proves it holds a credential with an HMAC-SHA256 over
a transcript of the handshake, which names the cluster, both routers and both fresh nonces,
and ends with the TLS channel binding (``tls-unique``) of the connection as each end sees
it. A proof is therefore good for this one TLS connection only: a replayed proof, or one
relayed by a man in the middle (who holds two TLS connections, with two bindings), fails.

The dialing router proves first (its REGISTER), with one proof per credential it holds;
the listening router checks each against each of its own, and answers with its proof made
with the credential that matched. A stranger dialing a router learns no proof at all.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from polevpn.proto.messages import PEER_NONCE_BYTES, PeerHello

LABEL = b"polevpn router-peer 1"
DIALER = b"dialer"
LISTENER = b"listener"


@dataclass(frozen=True)
class PeerCredentials:
    """What a router of a cluster proves itself with: the cluster, its id, its credential
    and, during a rotation, the previous one (accepted from others, proved with too)."""

    cluster: str
    router_id: str
    key: str = field(repr=False)
    previous: str | None = field(default=None, repr=False)

    @property
    def keys(self) -> tuple[str, ...]:
        if self.previous is None or self.previous == self.key:
            return (self.key,)
        return (self.key, self.previous)

    def hello(self, nonce: bytes | None = None) -> PeerHello:
        return PeerHello(self.cluster, self.router_id, nonce or os.urandom(PEER_NONCE_BYTES))


def _field(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def transcript(dialer: PeerHello, listener: PeerHello, binding: bytes) -> bytes:
    """What both proofs cover: every part length-prefixed, so no two differ only in where
    one part ends and the next begins."""
    return b"".join(
        _field(part)
        for part in (
            LABEL,
            dialer.cluster.encode(),
            dialer.router_id.encode(),
            dialer.nonce,
            listener.router_id.encode(),
            listener.nonce,
            binding,
        )
    )


def prove(key: str, role: bytes, text: bytes) -> bytes:
    return hmac.new(key.encode(), _field(role) + text, hashlib.sha256).digest()


def verify(proofs: Sequence[bytes], keys: Sequence[str], role: bytes, text: bytes) -> str | None:
    """The credential of ``keys`` one of ``proofs`` was made with, or None. Every pair is
    compared, so the time taken says nothing about which matched."""
    found = None
    for key in keys:
        want = prove(key, role, text)
        for proof in proofs:
            if hmac.compare_digest(proof, want) and found is None:
                found = key
    return found

"""Anti-spoofing on a direct path: what a gateway accepts from one direct peer. No I/O.

The router's authority covers direct paths too: a packet that came over the direct path
from a peer must have a source within the networks the router granted that peer (the
DIRECT_OFFER's list, which includes the peer's own tunnel addresses) and, when the
gateway gives its own networks, a destination within them: a peer must not use this
gateway as a relay to a third place, which the router would never have routed through
it. Everything else is refused and counted, by reason; the gateway's usual ``acls`` and
own-address checks (``Gateway.to_tun``) apply after this, as to packets from the router.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from polevpn.packet.gso import VNET_HDR_LEN
from polevpn.packet.ippacket import addrs
from polevpn.packet.routing import IPAddress, IPNetwork, NetworkSet


class DirectAcl:
    """The checks for one peer. ``filter`` is the data path's call: one list in, the
    packets that pass out, counters up."""

    __slots__ = (
        "granted",
        "local",
        "accepted",
        "refused_source",
        "refused_destination",
        "refused_malformed",
    )

    def __init__(
        self,
        granted: Iterable[IPNetwork],
        peer: IPAddress | None = None,
        local: Iterable[IPNetwork] | None = None,
    ) -> None:
        """``granted``: the networks of the offer; ``peer``: the peer's gateway address,
        taken as granted too (REGISTER installs it without a grant); ``local``: this
        gateway's own networks and addresses, or None not to check destinations."""
        nets = list(granted)
        if peer is not None:
            nets.append(ipaddress.ip_network(peer))
        self.granted = NetworkSet(nets)
        self.local = NetworkSet(list(local)) if local is not None else None
        self.accepted = 0
        self.refused_source = 0
        self.refused_destination = 0
        self.refused_malformed = 0

    @property
    def refused(self) -> int:
        return self.refused_source + self.refused_destination + self.refused_malformed

    def filter(
        self, packets: list[memoryview] | list[bytes], whole: bool = False
    ) -> list[memoryview] | list[bytes]:
        """The packets that pass. ``whole``: the path carries super-packets too, whose
        body starts with a 10-byte virtio-net header (first byte below 0x10)."""
        g4, g6 = self.granted.contains_v4, self.granted.contains_v6
        local = self.local
        l4 = local.contains_v4 if local is not None else None
        l6 = local.contains_v6 if local is not None else None
        out = []
        bad_src = bad_dst = malformed = 0
        for pkt in packets:
            hdr = pkt[VNET_HDR_LEN:] if whole and pkt and pkt[0] < 0x10 else pkt
            version, src, dst = addrs(hdr)
            if version == 4:
                if not g4(src):
                    bad_src += 1
                    continue
                if l4 is not None and not l4(dst):
                    bad_dst += 1
                    continue
            elif version == 6:
                if not g6(src):
                    bad_src += 1
                    continue
                if l6 is not None and not l6(dst):
                    bad_dst += 1
                    continue
            else:
                malformed += 1
                continue
            out.append(pkt)
        self.accepted += len(out)
        self.refused_source += bad_src
        self.refused_destination += bad_dst
        self.refused_malformed += malformed
        return out  # type: ignore[return-value]

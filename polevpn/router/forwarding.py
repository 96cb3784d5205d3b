"""The router's forwarding: the packets of one read in, frames per destination out. No I/O.

``forward`` reads source and destination straight out of each packet, drops spoofed
sources, hairpins and packets without a route, picks a multi-link site's link per flow,
sends what another router of a cluster holds over the link to it (a route there is a
fallback claim in the same table, ``cluster.routes``) but never passes on to a third router
what came from one,
passes super-packets on whole to gateways that negotiated them and cuts them for the
others, and returns the frames each destination is to get plus what it dropped and why.
Everything it builds is local to the call: the router writes the result and keeps nothing,
so an exception half-way (a bug reached by a peer's bytes) cannot strand a batch that
another destination would otherwise never get and that would grow with every read.

Frames that the 16-bit length of a PoleVPN frame cannot describe (an IP packet of more than
65,527 bytes) are dropped and counted as ``dropped_oversized``; only ``SUPER_IPDATA`` frames,
sent to gateways that negotiated them, carry more.
"""

from __future__ import annotations

from typing import Any, Protocol

from polevpn.packet.gso import VNET_HDR_LEN, GsoError, check, to_plain
from polevpn.packet.ippacket import addrs
from polevpn.packet.routing import RouteTable
from polevpn.proto import wire
from polevpn.router.sitelinks import Site

_S2C = wire.S2C_IPDATA
_SUPER = wire.SUPER_IPDATA
_HDR = wire.HEADER_LEN
_MAX_FRAME = wire.MAX_FRAME
# the largest IP packet an S2C_IPDATA frame holds
MAX_PLAIN = _MAX_FRAME - _HDR
_pack = wire.HEADER.pack


class Sources(Protocol):
    """Membership of a source address (a NetworkSet, or a router's announced networks)."""

    def contains_v4(self, addr: int) -> bool: ...

    def contains_v6(self, addr: int) -> bool: ...


class Endpoint(Protocol):
    """A gateway connection as forwarding sees it (the router's GatewayConnection), the
    router's own TUN (``local.LocalEndpoint``, which never negotiates super-packets), or a
    link to another router of the cluster (``cluster.peers.PeerLink``): each is a
    destination of the table and a source of ``forward``, checked the same way."""

    # the sources it may send from: what it registered (a router link: what that router
    # announces in the cluster's store)
    sources: Sources
    # the multi-link site it is a link of, or None
    site: Site | None
    # a link to another router: what comes from it goes to this router's own gateways only
    router_link: bool

    @property
    def super_packets(self) -> bool:
        """Whether it negotiated super-packets (SUPER_IPDATA frames) in AUTH."""
        ...


# the drop reasons, each a RouterStats field of the same name
DROPS = (
    "dropped_spoofed",
    "dropped_link_local",
    "dropped_no_route",
    "dropped_hairpin",
    "dropped_links_down",
    "dropped_malformed",
    "dropped_oversized",
    "dropped_peer_transit",
)


class Forwarded:
    """The result of one ``forward`` call.

    ``batches``: destination -> frame headers and bodies, alternating, in arrival order, to
    be written with one call each; ``supers``: how many of a destination's frames are
    SUPER_IPDATA (their bodies hold a 10-byte virtio-net header besides the IP packet);
    ``bytes_in``: IP bytes taken from the sender; ``segmented``: super-packets cut for a
    gateway without them; the ``dropped_*`` fields: packets dropped, by reason.
    """

    __slots__ = ("batches", "supers", "bytes_in", "segmented", *DROPS)

    def __init__(self) -> None:
        self.batches: dict[Any, list[bytes | memoryview]] = {}
        self.supers: dict[Any, int] = {}
        self.bytes_in = 0
        self.segmented = 0
        self.dropped_spoofed = 0
        self.dropped_link_local = 0
        self.dropped_no_route = 0
        self.dropped_hairpin = 0
        self.dropped_links_down = 0
        self.dropped_malformed = 0
        self.dropped_oversized = 0
        self.dropped_peer_transit = 0

    def add_to(self, stats: Any) -> None:
        """Add the drop and segmentation counts to ``stats`` (RouterStats)."""
        for name in DROPS:
            n = getattr(self, name)
            if n:
                setattr(stats, name, getattr(stats, name) + n)
        if self.segmented:
            stats.segmented += self.segmented


def forward(
    packets: list[memoryview],
    src: Endpoint,
    routes: RouteTable[Any],
    anti_spoofing: bool = True,
) -> Forwarded:
    """Route ``packets`` (IP packets, and SUPER_IPDATA bodies when ``src`` negotiated them)
    from ``src``: the frames per destination and the drop counts.

    A route leads to an Endpoint, or to a Site, whose ``links.pick`` chooses the link. A
    packet from another router (``src.router_link``) whose route leads to a router link again is
    dropped as ``dropped_peer_transit``: routers pass on only what their own gateways hold,
    so a packet crosses at most one router link and two routers whose tables disagree for
    a moment cannot bounce it between them.
    """
    out = Forwarded()
    batches = out.batches
    lookup4 = routes.lookup_v4
    lookup6 = routes.lookup_v6
    from4 = src.sources.contains_v4
    from6 = src.sources.contains_v6
    # the other links of src's own site are src too, as far as loops go
    home = src.site
    from_peer = src.router_link
    spoofed = link_local = no_route = hairpin = links_down = transit = 0
    nbytes = 0
    for pkt in packets:
        version, saddr, addr = addrs(pkt)
        if version == 4:
            if anti_spoofing and not from4(saddr):
                spoofed += 1
                continue
            dst = lookup4(addr)
        elif version == 6:
            if anti_spoofing and not from6(saddr):
                # IPv6 from :: or fe80::/10 that the gateway did not register: its host's
                # own MLD reports and solicitations, link-scope chatter (and no attack)
                if saddr == 0 or saddr >> 118 == 0x3FA:
                    link_local += 1
                else:
                    spoofed += 1
                continue
            dst = lookup6(addr)
        else:
            # the session passes SUPER_IPDATA bodies only from a gateway that offered them
            nbytes += _super(pkt, src, routes, anti_spoofing, out)
            continue
        if dst is None:
            no_route += 1
            continue
        if dst is src or dst is home:
            # sending it back would loop between gateway and router until TTL ran out
            hairpin += 1
            continue
        if dst.__class__ is Site:
            dst = dst.links.pick(pkt)
            if dst is None:
                links_down += 1
                continue
        elif from_peer and dst.router_link:
            transit += 1
            continue
        # the session's decoder took it in one frame, so it fits in one frame again
        n = len(pkt)
        parts = batches.get(dst)
        if parts is None:
            parts = batches[dst] = []
        parts.append(_pack(n + _HDR, _S2C, 0))
        parts.append(pkt)
        nbytes += n
    out.bytes_in = nbytes
    out.dropped_spoofed += spoofed
    out.dropped_link_local += link_local
    out.dropped_no_route += no_route
    out.dropped_hairpin += hairpin
    out.dropped_links_down += links_down
    out.dropped_peer_transit += transit
    return out


def _super(
    buf: memoryview, src: Endpoint, routes: RouteTable[Any], anti_spoofing: bool, out: Forwarded
) -> int:
    """Virtio-net header + packet, or garbage; returns the IP bytes taken."""
    if buf and buf[0] < 0x10 and src.super_packets:
        ip = buf[VNET_HDR_LEN:]
        version, saddr, addr = addrs(ip)
    else:
        # garbage, or a plain frame dressed as a super-packet by a peer that did not offer
        version, saddr, addr = 0, 0, 0
    if version == 4:
        allowed = src.sources.contains_v4(saddr)
        dst = routes.lookup_v4(addr)
    elif version == 6:
        allowed = src.sources.contains_v6(saddr)
        dst = routes.lookup_v6(addr)
    else:
        out.dropped_malformed += 1
        return 0
    if not allowed and anti_spoofing:
        out.dropped_spoofed += 1
        return 0
    if dst is None:
        out.dropped_no_route += 1
        return 0
    if dst is src or dst is src.site:
        out.dropped_hairpin += 1
        return 0
    if dst.__class__ is Site:
        dst = dst.links.pick(ip)
        if dst is None:
            out.dropped_links_down += 1
            return 0
    elif src.router_link and dst.router_link:
        out.dropped_peer_transit += 1
        return 0
    try:
        # whole or cut, the header must be one a kernel would write: the far kernel acts
        # on it, and the cutter's output must stay within a small multiple of the input
        check(buf)
    except GsoError:
        out.dropped_malformed += 1
        return 0
    if dst.super_packets:
        parts = out.batches.setdefault(dst, [])
        parts.append(_pack(_HDR, _SUPER, len(buf)))
        parts.append(buf)
        out.supers[dst] = out.supers.get(dst, 0) + 1
        return len(ip)
    if not (buf[0] or buf[1]):
        pkts: list = [ip]
    else:
        try:
            pkts = to_plain(buf)
        except GsoError:
            out.dropped_malformed += 1
            return 0
        out.segmented += 1
    parts = out.batches.setdefault(dst, [])
    for pkt in pkts:
        n = len(pkt)
        if n > MAX_PLAIN:
            # fits a super-packet, not a PoleVPN frame: 65,528 to 65,535 bytes
            out.dropped_oversized += 1
            continue
        parts.append(_pack(n + _HDR, _S2C, 0))
        parts.append(pkt)
    if not parts:
        del out.batches[dst]
    return len(ip)

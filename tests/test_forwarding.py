"""polevpn.router.forwarding: one read's packets in, frames per destination and drop counts out.

No router, no sockets: endpoints are plain objects, the routes a real RouteTable.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polevpn.cluster.routes import RemoteRoute, RemoteRoutes
from polevpn.packet import gso
from polevpn.packet.routing import NetworkSet, RouteTable
from polevpn.proto import wire
from polevpn.router.forwarding import DROPS, MAX_PLAIN, forward
from polevpn.router.sitelinks import LinkInfo, Site


@dataclass(eq=False)
class Peer:
    name: str
    networks: tuple[str, ...]
    super_packets: bool = False
    site: Site | None = None
    router_link: bool = False

    def __post_init__(self) -> None:
        self.sources = NetworkSet([ipaddress.ip_network(n) for n in self.networks])


def table(*peers: Peer) -> RouteTable:
    routes: RouteTable = RouteTable()
    for p in peers:
        for n in p.networks:
            routes.add(ipaddress.ip_network(n), p)
    return routes


def ipv4(src: str, dst: str, size: int = 60, proto: int = 17) -> bytes:
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, proto, 0, s, d)
    return hdr + bytes(size - 20)


def tcp_super(src: str, dst: str, payload_len: int, mss: int) -> bytes:
    """Virtio-net header + IPv4/TCP super-packet with a partial checksum, as a TUN reads it."""
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    total = 40 + payload_len
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0, s, d)
    pseudo = gso.internet_checksum(s + d + struct.pack(">BBH", 0, 6, 20 + payload_len))
    tcp = struct.pack(">HHIIBBHHH", 40000, 5201, 1000, 1, 5 << 4, 0x18, 512, pseudo, 0)
    vnet = gso.VNET_HDR.pack(gso.F_NEEDS_CSUM, gso.GSO_TCPV4, 40, mss, 20, 16)
    return vnet + ip + tcp + bytes(payload_len)


def frames(parts: list) -> list[tuple[int, bytes]]:
    """(command, body) of the frames in a batch, decoded as a peer would."""
    return [(cmd, bytes(body)) for cmd, _, body in wire.FrameDecoder().feed(b"".join(parts))]


A = Peer("a", ("169.254.0.1/32", "198.18.10.0/24"), super_packets=True)
B = Peer("b", ("169.254.0.2/32", "198.18.20.0/24"))
C = Peer("c", ("169.254.0.3/32", "198.18.30.0/24"), super_packets=True)


def test_frames_per_destination_in_order_and_drops_by_reason() -> None:
    routes = table(A, B, C)
    to_b1 = ipv4("198.18.10.2", "198.18.20.2")
    to_c = ipv4("198.18.10.2", "198.18.30.2", 100)
    to_b2 = ipv4("198.18.10.3", "198.18.20.3", 80)
    pkts = [
        to_b1,
        to_c,
        ipv4("198.18.99.1", "198.18.20.2"),  # spoofed
        ipv4("198.18.10.2", "198.18.99.9"),  # no route
        ipv4("198.18.10.2", "198.18.10.9"),  # back to A
        to_b2,
    ]
    out = forward([memoryview(p) for p in pkts], A, routes)
    assert set(out.batches) == {B, C}
    assert frames(out.batches[B]) == [(2, to_b1), (2, to_b2)]
    assert frames(out.batches[C]) == [(2, to_c)]
    assert (out.dropped_spoofed, out.dropped_no_route, out.dropped_hairpin) == (1, 1, 1)
    assert out.bytes_in == 60 + 100 + 80
    assert not out.supers
    # without anti-spoofing the spoofed one goes through
    out = forward([memoryview(pkts[2])], A, routes, anti_spoofing=False)
    assert frames(out.batches[B]) == [(2, pkts[2])]


@pytest.mark.parametrize("size", [65528, 65535])
def test_an_over_long_packet_in_a_super_frame_is_dropped_not_raised(size: int) -> None:
    """Issue 19 bug 1: a 65,528-65,590-byte IP packet in a super frame (all-zero header) for
    a gateway without super-packets raised struct.error half-way through the batch."""
    routes = table(A, B, C)
    before = ipv4("198.18.10.2", "198.18.30.2")
    big = gso.PLAIN_HDR + ipv4("198.18.10.2", "198.18.20.9", size)
    after = ipv4("198.18.10.2", "198.18.20.2")
    out = forward([memoryview(before), memoryview(big), memoryview(after)], A, routes)
    assert out.dropped_oversized == 1
    assert frames(out.batches[B]) == [(2, after)]
    assert frames(out.batches[C]) == [(2, before)]
    # the largest body a SUPER_IPDATA frame holds: 65,590 bytes of "IP packet"
    huge = gso.PLAIN_HDR + ipv4("198.18.10.2", "198.18.20.9", 65535) + bytes(55)
    assert len(huge) == wire.MAX_SUPER_BODY
    out = forward([memoryview(huge)], A, routes)
    assert out.dropped_oversized == 1 and not out.batches
    # to a gateway with super-packets it goes whole, as SUPER_IPDATA
    C2 = Peer("c2", ("198.18.40.0/24",), super_packets=True)
    big_c = gso.PLAIN_HDR + ipv4("198.18.10.2", "198.18.40.9", size)
    out = forward([memoryview(big_c)], A, table(A, C2))
    assert frames(out.batches[C2]) == [(wire.SUPER_IPDATA, big_c)]
    assert out.supers == {C2: 1}


@pytest.mark.parametrize("seg_len", [65528, 65535])
def test_an_over_long_segment_is_dropped_not_raised(seg_len: int) -> None:
    """The same through the cutter: one segment of 65,528-65,535 bytes."""
    routes = table(A, B, C)
    sp = tcp_super("198.18.10.2", "198.18.20.9", seg_len - 40, seg_len - 40)
    assert len(gso.to_plain(sp)) == 1
    before = ipv4("198.18.10.2", "198.18.20.2")
    other = ipv4("198.18.10.2", "198.18.30.2")
    out = forward([memoryview(before), memoryview(other), memoryview(sp)], A, routes)
    assert out.dropped_oversized == 1
    assert frames(out.batches[B]) == [(2, before)]
    assert frames(out.batches[C]) == [(2, other)]


def test_super_packets_whole_cut_or_refused() -> None:
    routes = table(A, B, C)
    sp_c = tcp_super("198.18.10.2", "198.18.30.2", 4000, 1360)
    sp_b = tcp_super("198.18.10.2", "198.18.20.2", 4000, 1360)
    out = forward([memoryview(sp_c), memoryview(sp_b)], A, routes)
    assert frames(out.batches[C]) == [(wire.SUPER_IPDATA, sp_c)]
    got = frames(out.batches[B])
    assert [cmd for cmd, _ in got] == [2, 2, 2]
    assert out.segmented == 1 and out.supers == {C: 1}
    assert out.bytes_in == 2 * (len(sp_c) - gso.VNET_HDR_LEN)
    # a header the far kernel should never see is dropped for both kinds of destination
    bad = bytearray(sp_c)
    struct.pack_into("<H", bad, 4, 0)  # gso_size 0
    bad_b = bytearray(sp_b)
    bad_b[1] = 0xFF  # gso_type
    out = forward([memoryview(bytes(bad)), memoryview(bytes(bad_b))], A, routes)
    assert out.dropped_malformed == 2 and not out.batches
    # from a sender that did not negotiate them, a super body is garbage
    out = forward([memoryview(sp_c)], B, routes)
    assert out.dropped_malformed == 1 and not out.batches


def test_a_multi_link_site_gets_one_link_per_flow_and_no_hairpin() -> None:
    site: Site = Site(ipaddress.ip_address("169.254.0.5"))
    l1 = Peer("l1", ("169.254.0.5/32", "198.18.50.0/24"), site=site)
    l2 = Peer("l2", ("169.254.0.5/32", "198.18.50.0/24"), site=site)
    site.links.register(l1, LinkInfo("one"))
    site.links.register(l2, LinkInfo("two"))
    routes = table(A)
    routes.add(ipaddress.ip_network("198.18.50.0/24"), site)
    pkts = [memoryview(ipv4("198.18.10.2", "198.18.50.7")) for _ in range(5)]
    out = forward(pkts, A, routes)
    ((dst, parts),) = out.batches.items()
    assert dst in (l1, l2) and len(parts) == 10
    # from one link of the site to the site: a loop
    out = forward([memoryview(ipv4("198.18.50.2", "198.18.50.9"))], l1, routes)
    assert out.dropped_hairpin == 1 and not out.batches
    site.links.set_up(l1, False)
    site.links.set_up(l2, False)
    out = forward(pkts, A, routes)
    assert out.dropped_links_down == 5 and not out.batches


def test_nothing_survives_a_call_that_raises() -> None:
    """A call that fails half-way leaves nothing behind: no endpoint holds anything of it,
    and the next call returns its own frames only."""
    routes = table(A, B, C)
    to_b = ipv4("198.18.10.2", "198.18.20.2")
    snapshot = {p.name: dict(vars(p)) for p in (A, B, C)}
    with pytest.raises(TypeError):
        forward([memoryview(to_b), None], A, routes)  # type: ignore[list-item]
    assert {p.name: dict(vars(p)) for p in (A, B, C)} == snapshot
    to_b2 = ipv4("198.18.10.2", "198.18.20.3")
    out = forward([memoryview(to_b2)], A, routes)
    assert frames(out.batches[B]) == [(2, to_b2)]


def test_max_plain_is_the_largest_packet_a_frame_holds() -> None:
    assert MAX_PLAIN == 65527
    assert len(wire.encode_frame(wire.S2C_IPDATA, bytes(MAX_PLAIN))) == 0xFFFF
    with pytest.raises(ValueError):
        wire.encode_frame(wire.S2C_IPDATA, bytes(MAX_PLAIN + 1))


# ---- a cluster: routes held by other routers, packets from other routers --------------------


class RouterLink:
    """A link to another router as forwarding sees it: its sources are what that router
    announces (RemoteRoutes.sources), and it takes super-packets whole."""

    site = None
    router_link = True
    super_packets = True

    def __init__(self, name: str, remote: RemoteRoutes) -> None:
        self.name = name
        self.sources = remote.sources(name)
        remote.set_hop(name, self)

    def __repr__(self) -> str:
        return f"<router link {self.name}>"


def cluster(*local: Peer) -> tuple[RouteTable, RemoteRoutes, RouterLink, RouterLink]:
    """This router with ``local`` gateways; r2 holds 198.18.60.0/24, 198.18.10.128/25 (longer
    than A's 198.18.10.0/24) and C's own 198.18.30.0/24 too (C dual-homed); r3 holds
    198.18.70.0/24 and 2001:db8:70::/48."""
    routes = table(*local)
    remote: RemoteRoutes = RemoteRoutes(routes, self_id="r1")
    for rid, net in (
        ("r2", "198.18.60.0/24"),
        ("r2", "198.18.10.128/25"),
        ("r2", "198.18.30.0/24"),
        ("r3", "198.18.70.0/24"),
        ("r3", "2001:db8:70::/48"),
    ):
        remote.add(RemoteRoute(rid, ipaddress.ip_network(net), "169.254.9.9", "s"))
    return routes, remote, RouterLink("r2", remote), RouterLink("r3", remote)


def ipv6(src: str, dst: str, size: int = 60) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    return struct.pack(">IHBB16s16s", 6 << 28, size - 40, 17, 64, s, d) + bytes(size - 40)


def test_what_only_another_router_holds_goes_over_the_link_to_it() -> None:
    routes, remote, r2, r3 = cluster(A, B, C)
    to_r2 = ipv4("198.18.10.2", "198.18.60.5")
    to_r3 = ipv4("198.18.10.2", "198.18.70.5")
    # C is reachable here and through r2: its own router's link wins
    to_c = ipv4("198.18.10.2", "198.18.30.5")
    # a longer prefix at r2 wins over A's own /24: A sends it, and it is no hairpin
    to_r2_longer = ipv4("198.18.10.2", "198.18.10.200")
    to_a = ipv4("198.18.20.2", "198.18.10.7")
    out = forward([memoryview(p) for p in (to_r2, to_r3, to_c, to_r2_longer)], A, routes)
    assert frames(out.batches[r2]) == [(2, to_r2), (2, to_r2_longer)]
    assert frames(out.batches[r3]) == [(2, to_r3)]
    assert frames(out.batches[C]) == [(2, to_c)]
    out = forward([memoryview(to_a)], B, routes)
    assert frames(out.batches[A]) == [(2, to_a)]
    # C's link here gone: r2's route for C's network takes over
    routes.remove(ipaddress.ip_network("198.18.30.0/24"), C)
    out = forward([memoryview(to_c)], A, routes)
    assert frames(out.batches[r2]) == [(2, to_c)]
    # r2's link down: its routes leave the data path (no route), r3's stay
    remote.set_hop("r2", None)
    out = forward([memoryview(p) for p in (to_r2, to_c, to_r3)], A, routes)
    assert out.dropped_no_route == 2
    assert frames(out.batches[r3]) == [(2, to_r3)]
    # and A's /24 covers 198.18.10.200 again
    from_b = ipv4("198.18.20.2", "198.18.10.200")
    out = forward([memoryview(from_b)], B, routes)
    assert frames(out.batches[A]) == [(2, from_b)]


def test_what_came_from_a_router_goes_to_local_gateways_only() -> None:
    routes, remote, r2, r3 = cluster(A, B, C)
    to_a = ipv4("198.18.60.1", "198.18.10.7")
    to_c = ipv4("198.18.60.1", "198.18.30.7")
    to_r3 = ipv4("198.18.60.1", "198.18.70.7")
    to_r3_v6 = ipv6("2001:db8:70::1", "2001:db8:70::2")
    back_to_r2 = ipv4("198.18.60.1", "198.18.10.200")
    out = forward([memoryview(p) for p in (to_a, to_c, to_r3, back_to_r2)], r2, routes)
    assert frames(out.batches[A]) == [(2, to_a)]
    assert frames(out.batches[C]) == [(2, to_c)]
    assert set(out.batches) == {A, C}
    # never on to a third router; to the router it came from: a hairpin as ever
    assert out.dropped_peer_transit == 1
    assert out.dropped_hairpin == 1
    # the same for IPv6, from r3 to r3 (hairpin) and from r2 with r3's source (spoofed)
    out = forward([memoryview(to_r3_v6)], r2, routes)
    assert out.dropped_spoofed == 1 and not out.batches
    # a super-packet from a router for a third router is dropped the same way
    sp = tcp_super("198.18.60.1", "198.18.70.7", 4000, 1360)
    out = forward([memoryview(sp)], r2, routes)
    assert out.dropped_peer_transit == 1 and not out.batches
    # with a local gateway for it, what came from r2 is delivered (no route to r3 needed)
    D = Peer("d", ("169.254.0.4/32", "198.18.70.0/25"))
    for net in D.networks:
        routes.add(ipaddress.ip_network(net), D)
    out = forward([memoryview(to_r3)], r2, routes)
    assert frames(out.batches[D]) == [(2, to_r3)]


def test_a_router_may_send_only_from_what_it_announces() -> None:
    routes, remote, r2, r3 = cluster(A, B)
    ok = ipv4("198.18.60.1", "198.18.10.7")
    ok_longer = ipv4("198.18.10.130", "198.18.20.7")  # r2's /25 within A's /24
    not_r2s = ipv4("198.18.70.1", "198.18.10.7")  # r3's network
    nobodys = ipv4("198.18.99.1", "198.18.10.7")
    pkts = [memoryview(p) for p in (ok, ok_longer, not_r2s, nobodys)]
    out = forward(pkts, r2, routes)
    assert frames(out.batches[A]) == [(2, ok)]
    assert frames(out.batches[B]) == [(2, ok_longer)]
    assert out.dropped_spoofed == 2
    # r2 announces 198.18.70.0/24 too now (a gateway dual-homed to r2 and r3): trusted
    remote.add(RemoteRoute("r2", ipaddress.ip_network("198.18.70.0/24"), "169.254.9.8", "t"))
    out = forward([memoryview(not_r2s)], r2, routes)
    assert frames(out.batches[A]) == [(2, not_r2s)]
    # withdrawn: not any more
    remote.remove("r2", ipaddress.ip_network("198.18.60.0/24"))
    out = forward([memoryview(ok)], r2, routes)
    assert out.dropped_spoofed == 1
    # the router's anti_spoofing switch holds for router links as for gateways
    out = forward([memoryview(nobodys)], r2, routes, anti_spoofing=False)
    assert frames(out.batches[A]) == [(2, nobodys)]


def test_super_packets_cross_router_links_whole() -> None:
    routes, remote, r2, r3 = cluster(A, B)
    sp = tcp_super("198.18.10.2", "198.18.60.2", 4000, 1360)
    out = forward([memoryview(sp)], A, routes)
    assert frames(out.batches[r2]) == [(wire.SUPER_IPDATA, sp)]
    assert out.supers == {r2: 1}
    # arriving whole at the far router: cut for a gateway without super-packets
    back = tcp_super("198.18.60.2", "198.18.20.2", 4000, 1360)
    out = forward([memoryview(back)], r2, routes)
    assert [cmd for cmd, _ in frames(out.batches[B])] == [2, 2, 2]
    assert out.segmented == 1


# ---- the router's writing of a batch -------------------------------------------------------


class FakeTransport:
    """What GatewayConnection.send_batch uses of a transport: a write buffer that holds
    everything written (the peer reads nothing)."""

    def __init__(self, buffered: int = 0) -> None:
        self.buffered = buffered
        self.written: list[bytes] = []

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.buffered += len(data)

    def is_closing(self) -> bool:
        return False


def test_the_queue_limit_holds_for_the_whole_batch(tmp_path) -> None:
    """Issue 20 finding 3: the limit was checked once before a batch of any size (one read,
    or one super-packet cut into many) was written whole. Now what does not fit in what is
    left of the queue is dropped and counted, whole frames only."""
    from polevpn.config import Listener, RouterConfig
    from polevpn.router.router import GatewayConnection, Router

    off = Listener(False, "127.0.0.1", 0, None, None)
    router = Router(RouterConfig(path=tmp_path / "r.json", tls=off, kcp=off, key="k"))
    conn = GatewayConnection(router, "tls")
    conn.queue_limit = 65536
    conn.transport = FakeTransport(buffered=1000)  # type: ignore[assignment]
    pkt = ipv4("198.18.10.2", "198.18.20.2", 4000)
    parts: list = []
    for _ in range(40):  # 160 KB in one batch
        parts += [wire.frame_header(wire.S2C_IPDATA, len(pkt)), pkt]
    conn.send_batch(parts, 0)
    (data,) = conn.transport.written  # type: ignore[attr-defined]
    assert len(data) == 16 * 4008 <= 65536 - 1000 < 17 * 4008
    assert [cmd for cmd, _ in frames([data])] == [2] * 16
    assert router.stats.dropped_queue_full == 24
    assert router.stats.packets_forwarded == 16
    assert router.stats.bytes_forwarded == 16 * 4000
    # full: nothing more goes in
    conn.send_batch(parts[:2], 0)
    assert len(conn.transport.written) == 1  # type: ignore[attr-defined]
    assert router.stats.dropped_queue_full == 25
    # super frames count as such in what is kept
    conn.transport = FakeTransport()  # type: ignore[assignment]
    sp = tcp_super("198.18.10.2", "198.18.20.2", 30000, 1360)
    sparts = [wire.super_header(len(sp)), sp] * 3
    conn.send_batch(sparts, 3)
    assert router.stats.dropped_queue_full == 26
    assert router.stats.bytes_forwarded == 16 * 4000 + 2 * (len(sp) - gso.VNET_HDR_LEN)


class FakeKcpLink:
    """What send_batch uses of a kcp:// link with congestion control."""

    def __init__(self, transport: FakeTransport, budget: int) -> None:
        self.transport = transport
        self.queue_budget = budget

    def urgent_room(self) -> int:
        return self.queue_budget * 3 // 2 - self.transport.buffered


def test_urgent_packets_pass_a_full_kcp_queue_within_its_headroom(tmp_path) -> None:
    """A kcp:// gateway's queue at its time budget: bulk frames beyond it are dropped, the
    pings among them (urgent: KcpLink.urgent_budget) still go, up to the headroom."""
    from polevpn.config import Listener, RouterConfig
    from polevpn.router.router import GatewayConnection, Router

    off = Listener(False, "127.0.0.1", 0, None, None)
    router = Router(RouterConfig(path=tmp_path / "r.json", tls=off, kcp=off, key="k"))
    conn = GatewayConnection(router, "kcp")
    transport = FakeTransport(buffered=1000)
    conn.transport = transport  # type: ignore[assignment]
    conn.kcp_link = FakeKcpLink(transport, 65536)  # type: ignore[assignment]
    bulk = ipv4("198.18.10.2", "198.18.20.2", 4000)
    ping = ipv4("198.18.10.2", "198.18.20.2", 84, proto=1)
    parts: list = []
    for i in range(40):
        p = ping if i % 4 == 3 else bulk
        parts += [wire.frame_header(wire.S2C_IPDATA, len(p)), p]
    conn.send_batch(parts, 0)
    (data,) = transport.written
    sizes = [len(body) for _cmd, body in frames([data])]
    wanted = [len(parts[i + 1]) for i in range(0, len(parts), 2)]
    kept, used = 0, 0
    while used + wanted[kept] + wire.HEADER_LEN <= 65536 - 1000:
        used += wanted[kept] + wire.HEADER_LEN
        kept += 1
    # what fits of the batch's head, then every later ping
    later_pings = wanted[kept:].count(84)
    assert later_pings > 0 and kept + later_pings < 40
    assert sizes == wanted[:kept] + [84] * later_pings
    dropped = 40 - kept - later_pings
    assert router.stats.dropped_queue_full == dropped
    # past the headroom, not even a ping goes
    transport.buffered = 65536 * 3 // 2
    conn.send_batch(parts[6:8], 0)
    assert len(transport.written) == 1
    assert router.stats.dropped_queue_full == dropped + 1


# ---- properties ----------------------------------------------------------------------------

_ADDRS = st.sampled_from(
    ["198.18.10.2", "198.18.20.2", "198.18.30.2", "198.18.99.1", "169.254.0.2", "198.18.10.9"]
)


@st.composite
def _plain(draw: st.DrawFn) -> bytes:
    size = draw(st.integers(20, 1500))
    pkt = bytearray(ipv4(draw(_ADDRS), draw(_ADDRS), size))
    if draw(st.booleans()):  # a few broken bits here and there
        for _ in range(draw(st.integers(1, 3))):
            pkt[draw(st.integers(0, size - 1))] = draw(st.integers(0, 255))
    return bytes(pkt)


@given(st.lists(_plain(), max_size=40))
@settings(max_examples=300, deadline=None)
def test_every_packet_is_forwarded_once_or_dropped_once(pkts: list[bytes]) -> None:
    """Plain packets: one frame each, or one count under one drop reason, never both."""
    out = forward([memoryview(p) for p in pkts], A, table(A, B, C))
    sent = sum(len(parts) // 2 for parts in out.batches.values())
    dropped = sum(getattr(out, name) for name in DROPS)
    assert sent + dropped == len(pkts)
    for dst, parts in out.batches.items():
        assert dst in (B, C)
        assert all(cmd == 2 for cmd, _ in frames(parts))


@given(st.lists(st.binary(min_size=0, max_size=200), max_size=20), st.booleans())
@settings(max_examples=300, deadline=None)
def test_arbitrary_bodies_never_raise(bodies: list[bytes], super_ok: bool) -> None:
    src = A if super_ok else B
    out = forward([memoryview(b) for b in bodies], src, table(A, B, C), anti_spoofing=False)
    assert sum(getattr(out, name) for name in DROPS) <= len(bodies)

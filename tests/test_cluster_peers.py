"""Router links on loopback: two (or three) real routers in one event loop, each told of
the others (``PeerLinks.set_peers``) and of their routes (``RemoteRoutes``) by the test
as the cluster's state would, with protocol-level gateways (no root, no TUN, no etcd)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from test_forwarding import tcp_super
from test_router_loopback import (
    ProtoGateway,
    frame,
    ipv4_packet,
    router_config,
    run,
    until,
)

from polevpn.cluster import member as member_mod
from polevpn.cluster import peers as peers_mod
from polevpn.cluster.peers import PeerLink
from polevpn.cluster.routes import RemoteRoute
from polevpn.config import ClusterConfig, Listener, RouterConfig, load_router_config
from polevpn.keygen import generate
from polevpn.ops import metrics
from polevpn.packet import gso
from polevpn.proto import wire
from polevpn.proto.peering import PeerCredentials
from polevpn.proto.session import PeerAuthenticated, PeerClientSession
from polevpn.router import view
from polevpn.router.router import Router

K1 = "the-cluster-credential-1"
K2 = "the-cluster-credential-2"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("keys"))


@pytest.fixture(autouse=True)
def no_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """No etcd here: the test tells the routers what the store would (set_peers, the
    remote routes), and the member's store never runs."""

    async def stop(self: member_mod.ClusterMember) -> None:
        return None

    monkeypatch.setattr(member_mod.ClusterMember, "start", lambda self: None)
    monkeypatch.setattr(member_mod.ClusterMember, "stop", stop)


def cluster_config(keys, rid: str, key: str = K1, previous: str | None = None, name="c1"):
    cluster = ClusterConfig(
        name=name,
        router_id=rid,
        etcd_endpoints=("http://127.0.0.1:2379",),
        peer_address=("127.0.0.1", 0),
        peer_key=key,
        peer_key_previous=previous,
    )
    # tls:// only: router links need it, and the gateways here use it
    no_kcp = Listener(False, "127.0.0.1", 0, None, None)
    return router_config(keys, cluster=cluster, kcp=no_kcp)


async def started(cfg: RouterConfig) -> Router:
    router = Router(cfg)
    await router.start()
    return router


def mesh(*routers: Router) -> None:
    """Tell every router where the others are, as the cluster's state does."""
    for r in routers:
        assert r.peers is not None
        r.peers.set_peers(
            {
                o.cfg.cluster.router_id: ("127.0.0.1", o.tls_port)  # type: ignore[union-attr]
                for o in routers
                if o is not r
            }
        )


def announce(router: Router, owner: Router, *nets: str, gateway: str = "169.254.0.9") -> None:
    assert router.remote is not None and owner.cfg.cluster is not None
    for net in nets:
        rid = owner.cfg.cluster.router_id
        router.remote.add(RemoteRoute(rid, ipaddress.ip_network(net), gateway, "site"))


def link_up(a: Router, b: Router) -> bool:
    assert a.peers is not None and b.cfg.cluster is not None
    return b.cfg.cluster.router_id in a.peers.links


def test_gateways_on_two_routers_reach_each_other_over_the_router_link(keys):
    async def scenario():
        r1 = await started(cluster_config(keys, "r1"))
        r2 = await started(cluster_config(keys, "r2"))
        mesh(r1, r2)
        await until(lambda: link_up(r1, r2) and link_up(r2, r1), 5)
        # r1 ("r1" < "r2") dialed, r2 accepted; one link each way round, no duplicate
        assert r1.peers.links["r2"].dialed and not r2.peers.links["r1"].dialed
        assert r1.peers.stats.dials == 1
        assert not r2.connections, "the accepted link left the gateways' connections"
        announce(r1, r2, "169.254.0.2/32", "198.18.20.0/24")
        announce(r2, r1, "169.254.0.1/32", "198.18.10.0/24")
        a = await ProtoGateway.connect(r1)
        await a.login("169.254.0.1", ["198.18.10.0/24"])
        b = await ProtoGateway.connect(r2)
        await b.login("169.254.0.2", ["198.18.20.0/24"])
        there = ipv4_packet("198.18.10.2", "198.18.20.2")
        await a.send(frame(3, there))
        assert await b.recv_frame() == (2, 0, there)
        back = ipv4_packet("198.18.20.2", "198.18.10.2")
        await b.send(frame(3, back))
        assert await a.recv_frame() == (2, 0, back)
        # what crossed is on the link's figures at both ends
        v1 = view.snapshot(r1).cluster
        assert v1 is not None
        (row,) = v1.peer_links
        assert (row.router_id, row.state, row.direction) == ("r2", "up", "dialed")
        assert (row.packets_out, row.packets_in) == (1, 1)
        assert row.bytes_out == len(there) and row.bytes_in == len(back)
        v2 = view.snapshot(r2).cluster
        assert v2 is not None and v2.peer_links[0].direction == "accepted"
        assert v2.peer_links[0].since is not None and v2.stats["peer_links_up"] == 1
        # the router's own route listing shows its gateways only
        assert {r.gateway for r in view.snapshot(r1).routes} == {"169.254.0.1"}
        # and /metrics has the link
        page = generate_latest(metrics.router_registry(lambda: view.snapshot(r1))).decode()
        for line in (
            'polevpn_cluster_peer_link_up{router="r2"} 1.0',
            'polevpn_cluster_peer_sent_packets_total{router="r2"} 1.0',
            'polevpn_cluster_peer_received_packets_total{router="r2"} 1.0',
            f'polevpn_cluster_peer_sent_bytes_total{{router="r2"}} {float(len(there))}',
            'polevpn_cluster_peer_dropped_packets_total{reason="transit",router="r2"} 0.0',
            'polevpn_cluster_peer_connects_total{router="r2"} 1.0',
            "polevpn_cluster_peer_links_up_total 1.0",
            'polevpn_router_dropped_packets_total{reason="peer_transit"} 0.0',
        ):
            assert line in page.splitlines(), line
        a.close()
        b.close()
        await r1.stop()
        await r2.stop()

    run(scenario())


def test_super_packets_cross_whole_and_are_cut_for_a_gateway_without_them(keys):
    async def scenario():
        r1 = await started(cluster_config(keys, "r1"))
        r2 = await started(cluster_config(keys, "r2"))
        mesh(r1, r2)
        await until(lambda: link_up(r1, r2) and link_up(r2, r1), 5)
        assert r1.peers.links["r2"].super_packets and r2.peers.links["r1"].super_packets
        announce(r1, r2, "198.18.20.0/24", "198.18.30.0/24")
        announce(r2, r1, "198.18.10.0/24")
        a = await ProtoGateway.connect(r1)
        await a.login("169.254.0.1", ["198.18.10.0/24"], features=["super-packets"])
        b = await ProtoGateway.connect(r2)
        await b.login("169.254.0.2", ["198.18.20.0/24"], features=["super-packets"])
        c = await ProtoGateway.connect(r2)
        await c.login("169.254.0.3", ["198.18.30.0/24"])
        sp_b = tcp_super("198.18.10.2", "198.18.20.2", 8000, 1360)
        sp_c = tcp_super("198.18.10.2", "198.18.30.2", 8000, 1360)
        await a.send(wire.super_header(len(sp_b)) + sp_b + wire.super_header(len(sp_c)) + sp_c)
        assert await b.recv_any() == (wire.SUPER_IPDATA, sp_b)
        cut = [await c.recv_any() for _ in gso.to_plain(sp_c)]
        assert [bytes(p) for p in gso.to_plain(sp_c)] == [body for _, body in cut]
        # cut at r2, the router of the gateway without them: whole on the router link
        assert r2.stats.segmented == 1 and r1.stats.segmented == 0
        for gw in (a, b, c):
            gw.close()
        await r1.stop()
        await r2.stop()

    run(scenario())


def test_what_came_from_a_router_is_not_sent_on_to_a_third(keys):
    async def scenario():
        r1 = await started(cluster_config(keys, "r1"))
        r2 = await started(cluster_config(keys, "r2"))
        mesh(r1, r2)
        await until(lambda: link_up(r1, r2) and link_up(r2, r1), 5)
        # r1 thinks r2 holds 198.18.30.0/24; r2 thinks r1 does (a moment of disagreement)
        announce(r1, r2, "198.18.30.0/24")
        announce(r2, r1, "198.18.30.0/24", "198.18.10.0/24")
        a = await ProtoGateway.connect(r1)
        await a.login("169.254.0.1", ["198.18.10.0/24"])
        await a.send(frame(3, ipv4_packet("198.18.10.2", "198.18.30.2")))
        # r2 sends it back to the router it came from: a hairpin, dropped
        await until(lambda: r2.stats.dropped_hairpin == 1)
        # a third router's network at r2: dropped as transit, counted on the link too
        r3_link = object.__new__(PeerLink)  # stands in for a link to r3 in r2's table
        r3_link.router_link = True  # type: ignore[misc]
        r2.routes.add_fallback(ipaddress.ip_network("198.18.40.0/24"), r3_link)
        announce(r1, r2, "198.18.40.0/24")
        await a.send(frame(3, ipv4_packet("198.18.10.2", "198.18.40.2")))
        await until(lambda: r2.stats.dropped_peer_transit == 1)
        assert r2.peers.links["r1"].dropped_transit == 1
        assert r2.peers.stats.dropped_transit == 1
        # a source r1 does not announce: spoofed, counted on the link
        announce(r1, r2, "198.18.50.0/24")
        r1.cfg = RouterConfig(**{**r1.cfg.__dict__, "anti_spoofing": False})
        await a.send(frame(3, ipv4_packet("198.18.99.9", "198.18.50.2")))
        await until(lambda: r2.stats.dropped_spoofed == 1)
        assert r2.peers.links["r1"].dropped_spoofed == 1
        a.close()
        await r1.stop()
        await r2.stop()

    run(scenario())


def test_a_wrong_credential_or_another_cluster_is_refused_and_counted(keys):
    async def scenario():
        r2 = await started(cluster_config(keys, "r2"))
        bad = await started(cluster_config(keys, "r1", key="not-the-credential-at-all"))
        other = await started(cluster_config(keys, "r0", name="c2"))
        mesh(r2, bad)
        mesh(r2, other)
        await until(lambda: r2.peers.stats.refused >= 2, 5)
        await until(lambda: bad.peers.stats.dial_failures >= 1)
        await until(lambda: other.peers.stats.dial_failures >= 1)
        assert bad.peers.stats.rejected >= 1 and other.peers.stats.rejected >= 1
        assert not r2.peers.links and not bad.peers.links and not other.peers.links
        assert r2.stats.auth_failures >= 2
        (row,) = view.snapshot(bad).cluster.peer_links  # type: ignore[union-attr]
        assert row.state == "connecting" and row.last_error == "invalid cluster credential"
        (row,) = view.snapshot(other).cluster.peer_links  # type: ignore[union-attr]
        assert row.last_error == "not a router of this cluster"
        # a router without a cluster section refuses a dialing router as any bad key
        plain = await started(router_config(keys))
        assert plain.peers is None
        bad.peers.set_peers({"r9": ("127.0.0.1", plain.tls_port)})
        await until(lambda: plain.stats.auth_failures >= 1)
        for r in (r2, bad, other, plain):
            await r.stop()

    run(scenario())


def test_the_previous_credential_is_accepted_during_a_rotation(keys):
    async def scenario():
        r1 = await started(cluster_config(keys, "r1", key=K2, previous=K1))
        r2 = await started(cluster_config(keys, "r2", key=K1))
        mesh(r1, r2)
        await until(lambda: link_up(r1, r2) and link_up(r2, r1), 5)
        await r1.stop()
        await r2.stop()

    run(scenario())


def test_a_silent_router_is_noticed_and_its_routes_leave_then_come_back(keys, monkeypatch):
    async def scenario():
        r1 = await started(cluster_config(keys, "r1"))
        r2 = await started(cluster_config(keys, "r2"))
        mesh(r1, r2)
        await until(lambda: link_up(r1, r2) and link_up(r2, r1), 5)
        announce(r1, r2, "198.18.20.0/24")
        probe = ipaddress.ip_address("198.18.20.1")
        assert r1.routes.lookup(probe) is r1.peers.links["r2"]
        # r2 stops reading and answering, and gives up on nothing (a hung host)
        link2 = r2.peers.links["r1"]
        link2.tick = lambda now: None  # type: ignore[method-assign]
        transport2 = link2.transport
        transport2.pause_reading()
        t0 = time.monotonic()
        await until(lambda: not link_up(r1, r2), 5)
        silent = time.monotonic() - t0
        assert silent < peers_mod.PEER_TIMEOUT + 0.5
        assert r1.routes.lookup(probe) is None
        assert r1.peers.stats.timeouts == 1
        # r2 wakes up (and finds its old link reset); r1 dials again: routes back
        if not transport2.is_closing():
            transport2.resume_reading()
        await until(lambda: link_up(r1, r2) and r2.peers.links.get("r1") is not link2, 8)
        assert r1.routes.lookup(probe) is r1.peers.links["r2"]
        assert r1.peers.links["r2"] is not None and r1.peers.stats.links_up == 2
        await r1.stop()
        await r2.stop()

    run(scenario())


def test_a_router_that_stops_is_noticed_at_once_and_redialled_when_back(keys):
    async def scenario():
        r1 = await started(cluster_config(keys, "r1"))
        r2 = await started(cluster_config(keys, "r2"))
        port = r2.tls_port
        mesh(r1, r2)
        await until(lambda: link_up(r1, r2), 5)
        t0 = time.monotonic()
        await r2.stop()
        await until(lambda: "r2" not in r1.peers.links, 3)
        assert time.monotonic() - t0 < 1.0
        await until(lambda: r1.peers.stats.dial_failures >= 1, 5)
        # back on the same port: dialed again within the backoff's ceiling
        cfg = cluster_config(keys, "r2")
        listener = Listener(True, "127.0.0.1", port, cfg.tls.cert_file, cfg.tls.key_file)
        r2b = await started(RouterConfig(**{**cfg.__dict__, "tls": listener}))
        await until(lambda: link_up(r1, r2b), peers_mod.RECONNECT_MAX + 3)
        await r1.stop()
        await r2b.stop()

    run(scenario())


def test_a_newer_link_to_the_same_router_replaces_the_older(keys):
    """Two links between one pair of routers (r1 restarted and dialed before its old link
    was noticed dead, say; here r2 dials as well): the newer replaces the older, and one
    link is left at both ends."""

    async def scenario():
        r1 = await started(cluster_config(keys, "r1"))
        r2 = await started(cluster_config(keys, "r2"))
        mesh(r1, r2)
        await until(lambda: link_up(r1, r2) and link_up(r2, r1), 5)
        old1 = r1.peers.links["r2"]
        # r1 stops dialing (the link it has stays up), and r2 dials r1 too
        r1.peers.set_peers({})
        assert r1.peers.links["r2"] is old1
        r2.peers._dialers["r1"] = (
            ("127.0.0.1", r1.tls_port),
            asyncio.get_running_loop().create_task(
                r2.peers._dial_loop("r1", ("127.0.0.1", r1.tls_port))
            ),
        )
        await until(lambda: r1.peers.stats.replaced == 1, 5)
        await until(lambda: old1.closing and r2.peers.links.get("r1") is not None, 5)
        new1 = r1.peers.links["r2"]
        assert not new1.dialed and r2.peers.links["r1"].dialed
        await until(lambda: not r2.peers.pending)
        assert len(r1.peers.links) == 1 and len(r2.peers.links) == 1
        # and traffic takes the new link
        announce(r1, r2, "198.18.20.0/24")
        assert r1.routes.lookup(ipaddress.ip_address("198.18.20.1")) is new1
        await r1.stop()
        await r2.stop()

    run(scenario())


def test_a_router_listed_again_keeps_the_link_that_stayed_up(keys):
    """The store forgets r2 for a moment (its lease lapsed while etcd was away; its keys
    are written again as soon as it is back) while the link to it stays up: r1 does not
    dial a second link that would replace the first (and drop what is queued on it), but
    dials again once that link fails."""

    async def scenario():
        r1 = await started(cluster_config(keys, "r1"))
        r2 = await started(cluster_config(keys, "r2"))
        mesh(r1, r2)
        await until(lambda: link_up(r1, r2) and link_up(r2, r1), 5)
        old = r1.peers.links["r2"]
        r1.peers.set_peers({})  # r2's keys gone
        mesh(r1, r2)  # and back
        await asyncio.sleep(0.5)
        assert r1.peers.links["r2"] is old and not old.closing
        assert r1.peers.stats.dials == 1 and r2.peers.stats.replaced == 0
        # when it fails, the dialer of the moment brings a new one up
        old.close("cut for the test", abort=True)
        await until(lambda: link_up(r1, r2) and r1.peers.links["r2"] is not old, 5)
        assert r1.peers.stats.dials == 2
        await r1.stop()
        await r2.stop()

    run(scenario())


def test_a_site_silent_here_is_reached_through_the_other_router(keys):
    """gwC has a link to each router. Its link to r1 falls silent (its uplink to r1 cut,
    r1 alive): after the link's timeout r1 gives C's routes up to r2's, and gwA's packets
    for C go through r2; when the link is heard again r1 delivers to it directly."""

    async def scenario():
        r1 = await started(cluster_config(keys, "r1"))
        r2 = await started(cluster_config(keys, "r2"))
        mesh(r1, r2)
        await until(lambda: link_up(r1, r2) and link_up(r2, r1), 5)
        link = {"heartbeat_ms": 50, "timeout_ms": 300}
        c1 = await ProtoGateway.connect(r1)
        await c1.login("169.254.0.3", ["198.18.30.0/24"], features=["multi-link"],
                       link={"name": "to-r1", **link})  # fmt: skip
        c2 = await ProtoGateway.connect(r2)
        await c2.login("169.254.0.3", ["198.18.30.0/24"], features=["multi-link"],
                       link={"name": "to-r2", **link})  # fmt: skip
        # what the store would say: each router holds C
        announce(r1, r2, "169.254.0.3/32", "198.18.30.0/24", gateway="169.254.0.3")
        announce(r2, r1, "169.254.0.3/32", "198.18.30.0/24", gateway="169.254.0.3")
        a = await ProtoGateway.connect(r1)
        await a.login("169.254.0.1", ["198.18.10.0/24"])
        announce(r2, r1, "198.18.10.0/24")
        pkt = ipv4_packet("198.18.10.2", "198.18.30.2")
        # both of C's links alive: r1 delivers on its own
        beat = asyncio.create_task(_beat(c2))
        await c1.send(frame(4))
        assert await c1.recv_frame() == (4, 0, b"")
        await a.send(frame(3, pkt))
        assert await c1.recv_frame() == (2, 0, pkt)
        # c1 silent: r1 gives C up after 0.3 s, and the packet goes r1 -> r2 -> c2
        await until(lambda: r1.stats.links_down == 1, 3)
        await a.send(frame(3, pkt))
        assert await _data(c2) == (2, pkt)
        assert r1.stats.dropped_links_down == 0
        assert r1.peers.links["r2"].packets_out == 1
        # c1 talks again: r1 takes C back
        await c1.send(frame(4))
        assert await c1.recv_frame() == (4, 0, b"")
        await until(lambda: not r1.sites[ipaddress.ip_address("169.254.0.3")].withdrawn)
        await a.send(frame(3, pkt))
        assert await c1.recv_frame() == (2, 0, pkt)
        beat.cancel()
        for gw in (a, c1, c2):
            gw.close()
        await r1.stop()
        await r2.stop()

    run(scenario())


async def _data(gw: ProtoGateway) -> tuple[int, bytes]:
    """The next frame that is not a heartbeat's echo."""
    while True:
        got = await gw.recv_any()
        if got[0] != wire.HEART_BEAT:
            return got


async def _beat(gw: ProtoGateway) -> None:
    """Heartbeats every 50 ms (their echoes: see _data)."""
    while True:
        await gw.send(frame(4))
        await asyncio.sleep(0.05)


def test_data_right_behind_the_handshake_is_forwarded(keys):
    """A dialing router whose first packet follows its REGISTER in the same write: the
    listener reads both at once, hands the connection over to the router link and
    forwards the packet too (a hand-written dialer over a real TLS connection)."""

    async def scenario():
        r2 = await started(cluster_config(keys, "r2"))
        r2.remote.add(RemoteRoute("r1", ipaddress.ip_network("198.18.10.0/24"), "g", "s"))
        b = await ProtoGateway.connect(r2)
        await b.login("169.254.0.2", ["198.18.20.0/24"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", r2.tls_port, ssl=peers_mod.client_context()
        )
        binding = writer.get_extra_info("ssl_object").get_channel_binding("tls-unique")
        creds = PeerCredentials("c1", "r1", K1)
        session = PeerClientSession(creds, binding, time.monotonic(), 0.25, 1.5)
        writer.write(b"".join(session.data_to_send()))
        events: list = []
        while not session.outbox:  # the AUTH reply, and our REGISTER to answer it
            _, ev = session.receive(await reader.read(65536), time.monotonic())
            events += ev
        pkt = ipv4_packet("198.18.10.2", "198.18.20.2")
        writer.write(b"".join(session.data_to_send()) + wire.encode_frame(wire.S2C_IPDATA, pkt))
        assert await b.recv_frame() == (2, 0, pkt)
        while session.peer_id is None:
            _, ev = session.receive(await reader.read(65536), time.monotonic())
            events += ev
        assert events == [PeerAuthenticated("r2")]
        assert r2.peers.links["r1"].packets_in == 1
        writer.close()
        b.close()
        await r2.stop()

    run(scenario())


def test_rotating_the_cluster_credential_by_reload_keeps_the_routers_linked(keys, tmp_path):
    """peer_key rolled over router by router with reloads, the old one as
    peer_key_previous meanwhile: every new link between the two comes up; a router left
    with a credential the other does not hold is refused."""

    def write(rid: str, key: str, previous: str | None = None) -> Path:
        cluster = {
            "name": "c1",
            "router_id": rid,
            "etcd": {"endpoints": ["http://127.0.0.1:2379"]},
            "peer_address": "127.0.0.1:443",
            "peer_key": key,
            **({"peer_key_previous": previous} if previous else {}),
        }
        obj = {
            "tls": {
                "listen": "127.0.0.1:0",
                "cert_file": str(keys.server_cert),
                "key_file": str(keys.server_key),
            },
            "key": "123456",
            "stats_interval": 0,
            "cluster": cluster,
        }
        path = tmp_path / f"{rid}.json"
        path.write_text(json.dumps(obj))
        path.chmod(0o600)
        return path

    async def relink(r1: Router, r2: Router) -> None:
        """Cut the link; r1 dials again with the credentials of the moment (a reload
        asks the cluster state which routers there are: told again here, no store)."""
        mesh(r1, r2)
        old = r1.peers.links["r2"]
        old.close("test", abort=True)
        await until(lambda: r1.peers.links.get("r2") not in (None, old), 8)
        await until(lambda: link_up(r2, r1), 3)

    async def scenario():
        r1 = await started(load_router_config(write("r1", K1)))
        r2 = await started(load_router_config(write("r2", K1)))
        mesh(r1, r2)
        await until(lambda: link_up(r1, r2) and link_up(r2, r1), 5)
        write("r2", K2, previous=K1)
        r2.reload()
        await relink(r1, r2)
        write("r1", K2, previous=K1)
        r1.reload()
        await relink(r1, r2)
        write("r1", K2)
        r1.reload()
        write("r2", K2)
        r2.reload()
        await relink(r1, r2)
        refused = r2.peers.stats.refused
        write("r1", "a-credential-nobody-else-has")
        r1.reload()
        mesh(r1, r2)
        r1.peers.links["r2"].close("test", abort=True)
        await until(lambda: r2.peers.stats.refused > refused, 8)
        assert "r2" not in r1.peers.links
        await r1.stop()
        await r2.stop()

    run(scenario())

"""The gateway's part of direct paths (polevpn.gateway.direct): the router's DIRECT_*
frames, the candidates and endpoint probes that follow, refusals; and the metrics."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from test_gateway_core import (
    FAR_PACKET,
    FakeGateway,
    FakeServer,
    FakeTransport,
    finish,
    until,
    write_config,
)
from test_gateway_core import A as ROUTER_A
from test_metrics import matching, parse

from polevpn.config import load_gateway_config
from polevpn.direct import keys as K
from polevpn.direct import messages as m
from polevpn.direct.keys import Side
from polevpn.direct.manager import PeerStatus
from polevpn.direct.messages import (
    Candidate,
    CandidateKind,
    Candidates,
    Cause,
    Endpoint,
    EndpointParams,
)
from polevpn.direct.path import PathState
from polevpn.gateway.direct import GatewayDirect
from polevpn.gateway.gateway import RouterLink
from polevpn.gateway.view import DirectView, GatewayView
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.ops.metrics import GatewayCollector
from polevpn.proto.messages import FEATURE_DIRECT, FEATURE_SUPER
from polevpn.proto.session import DirectFrame, RegisterRequested

A = ipaddress.ip_address("169.254.0.1")
B = ipaddress.ip_address("169.254.0.2")


def _config(tmp_path: Path, **direct):
    obj = {
        "route_server": "kcp://127.0.0.1:4443",
        "key": "123456",
        "gateway": str(A),
        "insecure_skip_verify": True,
        "local_networks": ["198.18.10.0/24"],
        "acls": ["198.18.20.0/24"],
        "direct": {"candidates": ["198.18.1.2"], **direct},
    }
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(obj))
    return load_gateway_config(path)


def _frame(msg) -> DirectFrame:
    return DirectFrame(msg.COMMAND, msg.encode())


def test_endpoint_offer_and_refusals(tmp_path: Path) -> None:
    cfg = _config(tmp_path)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        router = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        router.bind(("127.0.0.1", 0))
        router.setblocking(False)
        sent: list[bytes] = []
        gd = GatewayDirect(cfg, KcpPool(), lambda ps: None, lambda d, via: sent.append(d) or True)
        try:
            await gd.open()
            port = gd.socket.port
            params = EndpointParams(None, router.getsockname()[1], b"t" * 16, b"k" * 32, 60)
            transport = SimpleNamespace(get_extra_info=lambda name: ("127.0.0.1", 4443))
            assert gd.on_frame(_frame(params), transport) is None
            # DIRECT_CANDIDATES with the configured address and the direct socket's port
            cands = m.decode(m.Candidates.COMMAND, sent[0][8:])
            assert cands == Candidates((Endpoint(ipaddress.ip_address("198.18.1.2"), port),))
            # the endpoint probe, from the direct socket, to the router's UDP port at the
            # address the connection went to
            data, src = await asyncio.wait_for(loop.sock_recvfrom(router, 100), 2)
            assert len(data) == 64 and data[0] == 0xD1 and src[1] == port
            # an offer for this gateway: a peer, punching
            to_a, to_b = K.pair_offers(
                K.issue(),
                Side(A, (Candidate(CandidateKind.HOST, Endpoint(B, 5000)),), ()),
                Side(B, (Candidate(CandidateKind.HOST, Endpoint(B, 5001)),), ()),
            )
            assert gd.on_frame(_frame(to_a), transport) is None
            assert gd.manager.peers[B].path.state is PathState.PUNCHING
            # the other side's offer: not for us, refused (logged), the link stays
            assert gd.on_frame(_frame(to_b), transport) is None
            assert gd.manager.stats.offers_refused == 1
            # a malformed body closes the connection; another version is ignored, counted
            bad = DirectFrame(to_a.COMMAND, to_a.encode()[:-1])
            assert "bad direct-path message" in (gd.on_frame(bad, transport) or "")
            newer = DirectFrame(to_a.COMMAND, b"\x02" + to_a.encode()[1:])
            assert gd.on_frame(newer, transport) is None and gd.unsupported == 1
            # a gateway-to-router message from the router: ignored, counted
            assert gd.on_frame(_frame(cands), transport) is None and gd.unsupported == 2
        finally:
            gd.close()
            router.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_direct_metrics() -> None:
    peers = (
        PeerStatus(B, b"\1" * 16, PathState.DIRECT, Cause.NONE, 0.004, None, 1000, 2000, 3, 9.0),
        PeerStatus(
            ipaddress.ip_address("169.254.0.3"),
            None,
            PathState.RELAYED,
            Cause.NO_ANSWER,
            None,
            None,
            0,
            0,
            0,
            None,
        ),
    )
    view = GatewayView(
        stats={
            "packets_to_router": 0,
            "bytes_to_router": 0,
            "packets_from_router": 0,
            "bytes_from_router": 0,
            "dropped_no_link": 0,
            "dropped_link_busy": 0,
            "dropped_acl": 0,
            "dropped_spoofed": 0,
            "dropped_malformed": 0,
            "dropped_too_big": 0,
            "tun_write_dropped": 0,
        },
        link=None,
        uplinks=(),
        direct=DirectView(port=40001, peers=peers, stats={"offers": 2, "refused_packets": 3}),
    )
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GatewayCollector(lambda: view))
    samples = parse(generate_latest(reg).decode())
    paths = matching(samples, "polevpn_gateway_direct_paths")
    assert paths == {
        (("state", "relayed"),): 1,
        (("state", "punching"),): 0,
        (("state", "direct"),): 1,
    }
    got = matching(samples, "polevpn_gateway_direct_bytes_total")
    assert got[(("direction", "sent"), ("peer", "169.254.0.2"))] == 1000
    assert got[(("direction", "received"), ("peer", "169.254.0.2"))] == 2000
    refused = matching(samples, "polevpn_gateway_direct_refused_total")
    assert refused[(("peer", "169.254.0.2"),)] == 3
    assert matching(samples, "polevpn_gateway_direct_rtt_seconds") == {
        (("peer", "169.254.0.2"),): 0.004
    }
    assert matching(samples, "polevpn_gateway_direct_offers_total") == {(): 2}


# ---- the wiring in the gateway (tests/test_gateway_core.py's fakes) ----------------------


class _DirectRouter(FakeTransport):
    """A fake router connection that agrees ``direct`` and, as the router does, sends
    DIRECT_ENDPOINT right behind the REGISTER reply (one chunk); keeps the DIRECT_*
    messages the gateway sends."""

    def __init__(self, protocol, server) -> None:
        self.direct_in: list = []
        super().__init__(protocol, server, frozenset({FEATURE_SUPER, FEATURE_DIRECT}))

    def write(self, data) -> None:
        if self.closing:
            return
        packets, events = self.session.receive(bytes(data), time.monotonic())
        self.packets += [bytes(p) for p in packets]
        for ev in events:
            if isinstance(ev, RegisterRequested):
                self.session.accept_register(ev.seq)
                out = b"".join(self.session.data_to_send())
                params = EndpointParams(
                    ipaddress.ip_address("127.0.0.1"), 9, b"t" * 16, b"k" * 32, 60
                )
                self.loop.call_soon(self._deliver, out + m.encode(params))
            elif isinstance(ev, DirectFrame):
                self.direct_in.append(m.decode(ev.command, ev.body))
        self._flush()


class _DirectGateway(FakeGateway):
    async def _connect_once(self, server, via, request):
        fake = self.net.setdefault(server.url, FakeServer(server.url))
        await asyncio.sleep(0)
        link = RouterLink(self, server, request)
        _DirectRouter(link, fake)
        return link


@pytest.fixture
def proc_sys(tmp_path: Path) -> Path:
    """As test_gateway_core's: a /proc/sys of the test's own."""
    root = tmp_path / "proc_sys"
    (root / "net" / "ipv4").mkdir(parents=True)
    (root / "net" / "ipv4" / "ip_forward").write_text("0\n")
    return root


def _direct_gateway(tmp_path: Path, proc_sys: Path) -> _DirectGateway:
    path = write_config(
        tmp_path / "gateway.json",
        route_servers=[ROUTER_A],
        direct={"candidates": ["198.18.1.2"]},
    )
    return _DirectGateway(load_gateway_config(path), proc_sys)


def test_the_candidates_answer_the_endpoint_on_its_connection(tmp_path, proc_sys) -> None:
    """DIRECT_ENDPOINT comes with the REGISTER reply, before the gateway has made that
    connection its link: the DIRECT_CANDIDATES in answer go back on it (they were
    dropped, and the router knew no host candidate of the gateway)."""

    async def main() -> None:
        gw = _direct_gateway(tmp_path, proc_sys)
        task = asyncio.create_task(gw.run())
        try:
            await until(lambda: gw.direct is not None and gw.direct.manager.prober is not None)
            conn = gw.net[ROUTER_A].connections[0]
            await until(lambda: conn.direct_in, what="DIRECT_CANDIDATES at the router")
            assert gw.direct is not None and gw.direct.messages_dropped == 0
            port = gw.direct.socket.port
            assert conn.direct_in[0] == Candidates(
                (Endpoint(ipaddress.ip_address("198.18.1.2"), port),)
            )
        finally:
            await finish(gw, task)

    asyncio.run(asyncio.wait_for(main(), 10))


def test_packets_from_the_router_are_shown_to_the_direct_paths(
    tmp_path, proc_sys, monkeypatch
) -> None:
    """While some path is direct, what the router connection delivers goes to the
    manager's ``relayed`` too (a direct peer's packets that come this way end its path:
    tests/test_direct_manager.py); while none is, not even that."""

    async def main() -> None:
        gw = _direct_gateway(tmp_path, proc_sys)
        task = asyncio.create_task(gw.run())
        try:
            await until(lambda: gw.link is not None and gw.link.session.ready)
            assert gw.direct is not None
            mgr = gw.direct.manager
            seen: list[list[bytes]] = []
            monkeypatch.setattr(
                mgr, "relayed", lambda ps, now, whole=False: seen.append(list(map(bytes, ps)))
            )
            conn = gw.net[ROUTER_A].connections[0]
            conn.send_packets(FAR_PACKET)
            await until(lambda: gw.fake_tun.written, what="the packet at the TUN")
            assert seen == []  # no path direct: not looked at
            mgr.any_direct = True
            conn.send_packets(FAR_PACKET, FAR_PACKET)
            await until(lambda: seen, what="the packets shown to the manager")
            assert seen == [[FAR_PACKET, FAR_PACKET]]
            mgr.any_direct = False
        finally:
            await finish(gw, task)

    asyncio.run(asyncio.wait_for(main(), 10))

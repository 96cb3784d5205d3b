"""The router's side of direct paths (docs/protocol.md section 18) on loopback, no root:
protocol-level gateways (test_router_loopback.ProtoGateway) that agree ``direct`` get
DIRECT_ENDPOINT, probe the kcp:// port over UDP, report candidates, and get DIRECT_OFFER
when their packets cross the router, DIRECT_REVOKE when the peer leaves; a gateway
without the feature, and a Go-style AUTH, see none of it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import test_router_loopback as loopback
from test_router_loopback import ProtoGateway, frame, ipv4_packet, router_config, run, started

from polevpn.config import Listener, RouterDirectConfig
from polevpn.direct.endpoint import EndpointProber
from polevpn.direct.messages import (
    Candidate,
    CandidateKind,
    Candidates,
    Cause,
    Endpoint,
    EndpointParams,
    Offer,
    PathCode,
    Revoke,
    RevokeReason,
    Status,
    decode,
)
from polevpn.proto import wire
from polevpn.router.router import Router

DIRECT = set(range(32, 38))


@pytest.fixture(params=["tls", "kcp"])
def transport(request):
    """The gateways' control connection; the endpoint probes go over UDP either way."""
    loopback._transport["mode"] = request.param
    loopback._transport["count"] = 0
    return request.param


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from polevpn.keygen import generate

    return generate(tmp_path_factory.mktemp("keys"))


class Udp(asyncio.DatagramProtocol):
    """A gateway's direct socket, as far as endpoint probes go."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[bytes, tuple]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.inbox.put_nowait((data, addr))

    @property
    def endpoint(self) -> Endpoint:
        assert self.transport is not None
        return Endpoint.from_sockaddr(self.transport.get_extra_info("sockname"))


async def udp_socket() -> Udp:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
    return proto


async def next_frame(gw: ProtoGateway, timeout: float = 3.0) -> tuple[int, bytes]:
    cmd, _seq, body = await gw.recv_frame(timeout)
    return cmd, body


async def until_command(gw: ProtoGateway, command: int, timeout: float = 3.0) -> bytes:
    """The body of the next ``command`` frame; data frames before it are skipped, anything
    else fails."""
    deadline = time.monotonic() + timeout
    while True:
        cmd, body = await next_frame(gw, max(0.01, deadline - time.monotonic()))
        if cmd == command:
            return body
        assert cmd == wire.S2C_IPDATA, f"frame {cmd} while waiting for {command}"


async def nothing_direct(gw: ProtoGateway) -> list[int]:
    """The commands that reach ``gw`` before the echo of a heartbeat sent now: the frames
    queued for it (none of them may be a direct-path one)."""
    await gw.send(wire.frame_header(wire.HEART_BEAT, 0, 99))
    seen = []
    while True:
        cmd, seq, _body = await gw.recv_frame()
        if cmd == wire.HEART_BEAT and seq == 99:
            return seen
        seen.append(cmd)


class DirectGateway:
    """A protocol-level gateway that agreed direct: its control connection and its UDP
    direct socket."""

    def __init__(self, gw: ProtoGateway, udp: Udp, address: str, networks: list[str]) -> None:
        self.gw = gw
        self.udp = udp
        self.address = address
        self.networks = networks
        self.params: EndpointParams | None = None
        self.public: Endpoint | None = None
        last = address.rsplit(".", 1)[1]
        self.host = Endpoint.from_sockaddr((f"198.18.0.{last}", 40000))

    @classmethod
    async def join(cls, router: Router, address: str, networks: list[str]) -> DirectGateway:
        gw = await ProtoGateway.connect(router)
        reply = await gw.login(address, networks, features=["direct"])
        assert json.loads(reply) == {"features": ["direct"]}
        self = cls(gw, await udp_socket(), address, networks)
        params = decode(wire.Command.DIRECT_ENDPOINT, await until_command(gw, 32))
        assert isinstance(params, EndpointParams)
        self.params = params
        return self

    async def probe(self, router: Router) -> Endpoint:
        """ENDPOINT_PROBE to the router's kcp:// port (the host the gateway dialled), until
        the ENDPOINT_REPLY names where it came from."""
        assert self.params is not None and self.udp.transport is not None
        assert self.params.udp_address is None and self.params.udp_port == router.kcp_port
        prober = EndpointProber(self.params, time.monotonic())
        (probe,) = prober.handle_timer(time.monotonic())
        self.udp.transport.sendto(probe, ("127.0.0.1", self.params.udp_port))
        data, addr = await asyncio.wait_for(self.udp.inbox.get(), 3)
        assert addr[1] == router.kcp_port and len(data) == 64
        seen = prober.receive(data, time.monotonic())
        assert seen is not None
        self.public = seen
        return seen

    async def report(self) -> None:
        body = Candidates((self.host,)).encode()
        await self.gw.send(frame(wire.Command.DIRECT_CANDIDATES, body))

    def close(self) -> None:
        self.gw.close()
        if self.udp.transport is not None:
            self.udp.transport.close()


async def direct_pair(router: Router) -> list:
    """Two gateways that agreed direct (169.254.0.21 and .22), probed and reported, with
    a pair offered by their traffic and A's DIRECT_STATUS in; returns them (to close)."""
    a = await DirectGateway.join(router, "169.254.0.21", ["198.18.21.0/24"])
    b = await DirectGateway.join(router, "169.254.0.22", ["198.18.22.0/24"])
    for g in (a, b):
        await g.probe(router)
        await g.report()
    rdv = router.rendezvous
    assert rdv is not None
    await loopback.until(lambda: sum(bool(e.host) for e in rdv.view(0, 0).endpoints) >= 2)
    await a.gw.send(frame(wire.C2S_IPDATA, ipv4_packet("198.18.21.5", "198.18.22.5")))
    offer = decode(34, await until_command(a.gw, 34))
    await until_command(b.gw, 34)
    peer = Endpoint.from_sockaddr(("198.18.0.22", 40000))
    status = Status(offer.pair_id, PathCode.DIRECT, Cause.NONE, 0.0042, 1000, 2000, 5, peer)
    await a.gw.send(frame(wire.Command.DIRECT_STATUS, status.encode()))
    await loopback.until(lambda: rdv.stats.statuses == 1)
    return [a, b]


def test_two_gateways_meet_through_the_router(keys, transport):
    async def scenario():
        router = await started(router_config(keys))
        a = await DirectGateway.join(router, "169.254.0.1", ["198.18.10.0/24"])
        b = await DirectGateway.join(router, "169.254.0.2", ["198.18.20.0/24"])
        for g in (a, b):
            assert await g.probe(router) == g.udp.endpoint
            await g.report()
        assert router.rendezvous is not None
        await loopback.until(lambda: all(e.host for e in router.rendezvous.view(0, 0).endpoints))
        sent_at = time.monotonic()
        await a.gw.send(frame(wire.C2S_IPDATA, ipv4_packet("198.18.10.5", "198.18.20.5")))
        offers = {}
        for g in (a, b):
            offers[g.address] = decode(34, await until_command(g.gw, 34))
        # well within the few hundred ms the direct path's 3 s budget leaves
        assert time.monotonic() - sent_at < 1.0
        to_a, to_b = offers[a.address], offers[b.address]
        assert isinstance(to_a, Offer) and isinstance(to_b, Offer)
        assert to_a.pair_id == to_b.pair_id and to_a.secret == to_b.secret
        assert (str(to_a.you), str(to_a.peer)) == (a.address, b.address)
        assert (str(to_b.you), str(to_b.peer)) == (b.address, a.address)
        assert to_a.candidates == (
            Candidate(CandidateKind.HOST, b.host),
            Candidate(CandidateKind.PUBLIC, b.udp.endpoint),
        )
        assert to_b.candidates == (
            Candidate(CandidateKind.HOST, a.host),
            Candidate(CandidateKind.PUBLIC, a.udp.endpoint),
        )
        assert [str(n) for n in to_a.networks] == ["169.254.0.2/32", "198.18.20.0/24"]
        assert [str(n) for n in to_b.networks] == ["169.254.0.1/32", "198.18.10.0/24"]
        # more traffic, both ways: no second offer (one pair per gateway pair)
        await b.gw.send(frame(wire.C2S_IPDATA, ipv4_packet("198.18.20.5", "198.18.10.5")))
        await a.gw.send(frame(wire.C2S_IPDATA, ipv4_packet("198.18.10.5", "198.18.20.5")))
        assert set(await nothing_direct(a.gw)) <= {wire.S2C_IPDATA}
        assert set(await nothing_direct(b.gw)) <= {wire.S2C_IPDATA}
        # B's status is kept for the API
        status = Status(to_b.pair_id, PathCode.DIRECT, Cause.NONE, 0.004, 10, 20, 0, a.host)
        await b.gw.send(frame(wire.Command.DIRECT_STATUS, status.encode()))
        await loopback.until(lambda: router.rendezvous.stats.statuses == 1)
        (pair,) = router.rendezvous.view(time.monotonic(), time.time()).pairs
        assert pair.sides[1].state == "direct" and pair.sides[1].rtt_ms == 4.0
        # A leaves: B is told, reason 2
        a.close()
        revoke = decode(35, await until_command(b.gw, 35))
        assert revoke == Revoke(to_b.pair_id, RevokeReason.PEER_GONE)
        assert len(router.rendezvous) == 0
        b.close()
        await router.stop()

    run(scenario())


def test_a_gateway_without_the_feature_sees_nothing_of_it(keys, transport):
    async def scenario():
        router = await started(router_config(keys))
        b = await DirectGateway.join(router, "169.254.0.2", ["198.18.20.0/24"])
        await b.probe(router)
        await b.report()
        # a Go-style AUTH (no features): answered "{}" as ever (login checks it)
        go = await ProtoGateway.connect(router)
        await go.login("169.254.0.3", ["198.18.30.0/24"])
        # one of ours with other features only
        plain = await ProtoGateway.connect(router)
        reply = await plain.login("169.254.0.4", ["198.18.40.0/24"], features=["super-packets"])
        assert json.loads(reply) == {"features": ["super-packets"]}
        for gw, src in ((go, "198.18.30.5"), (plain, "198.18.40.5")):
            await gw.send(frame(wire.C2S_IPDATA, ipv4_packet(src, "198.18.20.5")))
            await b.gw.send(frame(wire.C2S_IPDATA, ipv4_packet("198.18.20.5", src)))
            await until_command(gw, wire.S2C_IPDATA)
            assert await nothing_direct(gw) == []
        await loopback.until(lambda: router.stats.packets_forwarded == 4)
        assert await nothing_direct(b.gw) == [wire.S2C_IPDATA] * 2
        assert router.rendezvous is not None and len(router.rendezvous) == 0
        # direct-path frames from a side that did not agree: ignored and counted
        body = Candidates(()).encode()
        await go.send(frame(wire.Command.DIRECT_CANDIDATES, body))
        assert await nothing_direct(go) == []
        conn = router.by_gateway[loopback.ipaddress.ip_address("169.254.0.3")]
        assert conn.session is not None and conn.session.unknown_commands == 1
        for gw in (go, plain):
            gw.close()
        b.close()
        await router.stop()

    run(scenario())


def test_a_malformed_direct_frame_closes_that_connection_only(keys, transport):
    async def scenario():
        router = await started(router_config(keys))
        a = await DirectGateway.join(router, "169.254.0.1", ["198.18.10.0/24"])
        b = await DirectGateway.join(router, "169.254.0.2", ["198.18.20.0/24"])
        before = router.stats.malformed_frames
        # a count of 9 candidates: more than a gateway may report
        await a.gw.send(frame(wire.Command.DIRECT_CANDIDATES, b"\x01\x00\x09"))
        assert await a.gw.closed_by_peer()
        assert router.stats.malformed_frames == before + 1
        # another version is ignored, not a violation
        await b.gw.send(frame(wire.Command.DIRECT_STATUS, b"\x02\x00"))
        assert await nothing_direct(b.gw) == []
        assert router.rendezvous is not None and router.rendezvous.stats.frames_ignored == 1
        a.close()
        b.close()
        await router.stop()

    run(scenario())


@pytest.mark.parametrize("why", ["off", "tls only"])
def test_no_direct_when_off_or_without_a_kcp_listener(keys, why):
    async def scenario():
        loopback._transport["mode"] = "tls"
        if why == "off":
            cfg = router_config(keys, direct=RouterDirectConfig(enable=False))
        else:
            cfg = router_config(keys, kcp=Listener(False, "127.0.0.1", 0, None, None))
        router = await started(cfg)
        gw = await ProtoGateway.connect(router)
        reply = await gw.login("169.254.0.1", ["198.18.10.0/24"], features=["direct"])
        assert reply == b"{}"
        assert await nothing_direct(gw) == []
        assert (router.rendezvous is None) == (why == "tls only")
        gw.close()
        await router.stop()

    run(scenario())


def test_a_reload_that_changes_a_grant_revokes_its_pairs(keys, tmp_path):
    """Reason 1 to both gateways of the pair when A's grant changes, reason 4 when B's
    grant turns direct off; a pair is offered again once allowed."""

    async def scenario():
        loopback._transport["mode"] = "tls"
        path = tmp_path / "router.json"

        def write(a_nets: list[str], b_direct: bool) -> None:
            gateways = {
                "169.254.0.1": {"key": "key-a-123456", "networks": a_nets},
                "169.254.0.2": {
                    "key": "key-b-123456",
                    "networks": ["198.18.20.0/24"],
                    "direct": b_direct,
                },
            }
            listener = {
                "enable": True,
                "host": "127.0.0.1",
                "port": 0,
                "cert_file": str(keys.server_cert),
                "key_file": str(keys.server_key),
            }
            conf = {"tls": listener, "kcp": listener, "gateways": gateways, "stats_interval": 0}
            path.write_text(json.dumps(conf))

        from polevpn.config import load_router_config

        write(["198.18.10.0/24"], True)
        router = Router(load_router_config(path))
        await router.start()

        async def join(addr: str, nets: list[str], key: str) -> DirectGateway:
            gw = await ProtoGateway.connect(router)
            await gw.login(addr, nets, key=key, features=["direct"])
            d = DirectGateway(gw, await udp_socket(), addr, nets)
            d.params = decode(32, await until_command(gw, 32))  # type: ignore[assignment]
            await d.report()
            return d

        a = await join("169.254.0.1", ["198.18.10.0/24"], "key-a-123456")
        b = await join("169.254.0.2", ["198.18.20.0/24"], "key-b-123456")

        async def pair() -> bytes:
            await loopback.until(lambda: len(router.rendezvous.view(0, 0).endpoints) == 2)
            endpoints = router.rendezvous.view
            await loopback.until(lambda: all(e.host for e in endpoints(0, 0).endpoints))
            await a.gw.send(frame(wire.C2S_IPDATA, ipv4_packet("198.18.10.5", "198.18.20.5")))
            got = decode(34, await until_command(a.gw, 34))
            assert decode(34, await until_command(b.gw, 34)).pair_id == got.pair_id
            return got.pair_id

        first = await pair()
        # A's grant gains a network (it stays connected): both hear reason 1
        write(["198.18.10.0/24", "198.18.11.0/24"], True)
        router.reload()
        for g in (a, b):
            assert decode(35, await until_command(g.gw, 35)) == Revoke(first, RevokeReason.REVOKED)
        second = await pair()
        # B's grant turns direct off: reason 4, and no new offer for its traffic
        write(["198.18.10.0/24", "198.18.11.0/24"], False)
        router.reload()
        for g in (a, b):
            revoke = decode(35, await until_command(g.gw, 35))
            assert revoke == Revoke(second, RevokeReason.DISABLED)
        await a.gw.send(frame(wire.C2S_IPDATA, ipv4_packet("198.18.10.5", "198.18.20.5")))
        assert set(await nothing_direct(b.gw)) == {wire.S2C_IPDATA}
        assert set(await nothing_direct(a.gw)) <= {wire.S2C_IPDATA}
        a.close()
        b.close()
        await router.stop()

    run(scenario())

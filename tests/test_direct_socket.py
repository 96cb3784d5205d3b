"""The direct socket's asyncio shell on loopback (polevpn.io.direct_socket): two gateways'
sockets on 127.0.0.1, with offers naming each other, punch, handshake, prove and carry
IP packets both ways; one log line per state change; close sends a close_notify."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

from test_direct_path import ip4

from polevpn.config import KcpParams
from polevpn.direct import keys as K
from polevpn.direct.keys import Side
from polevpn.direct.manager import DirectManager
from polevpn.direct.messages import Candidate, CandidateKind, Endpoint, Status
from polevpn.direct.path import PathState
from polevpn.direct.session import DirectContexts
from polevpn.io.direct_socket import DirectSocket

A = ipaddress.ip_address("169.254.0.1")
B = ipaddress.ip_address("169.254.0.2")
NET_A = ipaddress.ip_network("198.18.10.0/24")
NET_B = ipaddress.ip_network("198.18.20.0/24")
LOOP = ipaddress.ip_address("127.0.0.1")


async def until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


class Side_:
    def __init__(self, address, net, contexts) -> None:
        self.address = address
        self.mgr = DirectManager({address}, [net], KcpParams(), contexts=contexts)
        self.got: list[bytes] = []
        self.messages: list = []
        self.sock = DirectSocket(
            self.mgr, lambda ps: self.got.extend(bytes(p) for p in ps), self.messages.extend
        )

    async def open(self) -> Endpoint:
        await self.sock.open(0, "127.0.0.1")
        ep = Endpoint(LOOP, self.sock.port)
        self.mgr.set_local([ep])
        return ep


def test_two_direct_sockets_on_loopback_go_direct_and_carry_packets(caplog) -> None:
    caplog.set_level(logging.INFO, logger="polevpn.direct")
    contexts = DirectContexts()

    async def main() -> None:
        a, b = Side_(A, NET_A, contexts), Side_(B, NET_B, contexts)
        try:
            ea, eb = await a.open(), await b.open()
            to_a, to_b = K.pair_offers(
                K.issue(),
                Side(A, (Candidate(CandidateKind.HOST, ea),), (NET_A,)),
                Side(B, (Candidate(CandidateKind.HOST, eb),), (NET_B,)),
            )
            now = time.monotonic()
            a.mgr.offer(to_a, now)
            b.mgr.offer(to_b, now)
            a.sock._pump()
            b.sock._pump()
            started = time.monotonic()
            await until(
                lambda: (
                    a.mgr.peers[B].path.state is PathState.DIRECT
                    and b.mgr.peers[A].path.state is PathState.DIRECT
                )
            )
            assert time.monotonic() - started < 3.0
            pa = [ip4("198.18.10.5", "198.18.20.7", 100 + i) for i in range(50)]
            pb = [ip4("198.18.20.7", "198.18.10.5", 100 + i) for i in range(50)]
            far = [ip4("198.18.10.5", "198.18.30.7")]
            assert a.sock.route(pa + far) == far
            assert b.sock.route(pb) == []
            await until(lambda: len(a.got) == 50 and len(b.got) == 50)
            assert b.got == pa and a.got == pb
            sts = [x for x in a.messages if isinstance(x, Status)]
            assert sts[-1].endpoint == eb and sts[-1].rtt is not None
            # the batch sender sent from the one socket
            assert a.sock.batch is not None
        finally:
            a.sock.close()
            # B hears A's close_notify: its path ends at once, not after a silence
            await until(lambda: b.mgr.peers[A].path.state is PathState.RELAYED, 2.0)
            b.sock.close()

    asyncio.run(asyncio.wait_for(main(), 20))
    lines = [r.getMessage() for r in caplog.records if r.name == "polevpn.direct"]
    assert lines.count("direct path punching") == 2
    assert lines.count("direct path up") == 2
    up = next(r for r in caplog.records if r.getMessage() == "direct path up")
    fields = getattr(up, "fields", None) or up.__dict__
    text = str(fields)
    assert "169.254.0.2" in text and "127.0.0.1:" in text and "rtt_ms" in text
    assert lines.count("direct path down") == 1

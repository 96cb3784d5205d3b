#!/usr/bin/env python3
"""A rogue third gateway for tests/test_direct_e2e.py (issue 18): it logs in to the router
as a protocol-level gateway that agreed ``direct``, gets real key material for a pair of
its own (itself and gwA: it sends a packet towards gwA's LAN, so the router offers), and
then uses that material against gwB, which holds another pair's (gwA and gwB):

* PROBEs with its own pair id and keys (a pair gwB knows nothing of);
* PROBEs with the gwA-gwB pair id (the router's API shows it) tagged with the key its own
  material gives for that direction: the right id, a key from another pair.

They go to gwB's direct socket on the office segment both sit on (its host candidate),
``count`` of each, and the script listens for anything coming back. Prints one JSON line:
``{"offer": pair id hex or null, "sent": n, "answers": n}``. Bounded: it gives up after
``--timeout`` seconds.

    direct_rogue.py ROUTER_IP KEY_FILE GATEWAY NETWORK SOURCE PACKET_SRC PACKET_DST
                    VICTIM_ENDPOINT VICTIM_PAIR_HEX [--count N] [--timeout S]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protoclient  # noqa: E402

from polevpn.direct import messages as dm  # noqa: E402
from polevpn.direct.keys import PairKeys  # noqa: E402
from polevpn.proto import wire  # noqa: E402


class Rogue(protoclient.ProtoClient):
    """A ProtoClient that keeps the DIRECT_* frames the router sends it."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.direct: asyncio.Queue[dm.Message] = asyncio.Queue()

    def data_received(self, data: bytes) -> None:
        # ProtoClient's, with the DIRECT_* frames kept
        for cmd, seq, body in self.decoder.feed(data):
            if cmd in dm.COMMANDS:
                self.direct.put_nowait(dm.decode(cmd, bytes(body)))
            elif cmd == wire.S2C_IPDATA:
                self._packet(body)
            elif cmd == wire.HEART_BEAT:
                self.recv.heartbeats += 1
            elif cmd in (wire.AUTH, wire.REGISTER):
                self.replies.put_nowait((cmd, seq, bytes(body)))
            else:
                self.recv.other_frames += 1


async def next_of(client: Rogue, kind: type, until: float) -> dm.Message:
    while True:
        left = until - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {kind.__name__} from the router")
        try:
            msg = await asyncio.wait_for(client.direct.get(), left)
        except TimeoutError:
            raise TimeoutError(f"no {kind.__name__} from the router") from None
        if isinstance(msg, kind):
            return msg


async def run(a: argparse.Namespace) -> dict:
    until = time.monotonic() + a.timeout
    key = Path(a.key_file).read_text().strip()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 0))
    udp.setblocking(False)
    port = udp.getsockname()[1]
    me = ipaddress.ip_address(a.gateway)
    client = await Rogue.connect_tls(a.router, 443, name="rogue")
    out: dict = {"offer": None, "sent": 0, "answers": 0}
    try:
        reply = await client.login(key, a.gateway, [a.network], frozenset({"direct"}))
        out["features"] = sorted(reply.features)
        client.start_heartbeats(2.0)
        ep = await next_of(client, dm.EndpointParams, until)
        assert isinstance(ep, dm.EndpointParams)
        # a well-behaved gateway so far: its candidates, an endpoint probe to the router
        host = dm.Endpoint(ipaddress.ip_address(a.source), port)
        client.write(dm.encode(dm.Candidates((host,))))
        router_udp = (str(ep.udp_address or a.router), ep.udp_port)
        udp.sendto(dm.Datagram(dm.DatagramKind.ENDPOINT_PROBE, ep.token, 1).encode(ep.key),
                   router_udp)
        # traffic towards gwA's LAN: the router offers the pair (rogue, gwA)
        offer = None
        while offer is None:
            client.send_packets([protoclient.udp_packet(a.packet_src, a.packet_dst, seq=i)
                                 for i in range(3)])
            try:
                offer = await next_of(client, dm.Offer, min(until, time.monotonic() + 0.5))
            except TimeoutError:
                if time.monotonic() >= until:
                    raise
        assert isinstance(offer, dm.Offer)
        out["offer"] = offer.pair_id.hex()
        own = PairKeys.from_offer(offer, {me}, time.monotonic())
        victim_ip, victim_port = a.victim.rsplit(":", 1)
        dest = (victim_ip, int(victim_port))
        victim_pair = bytes.fromhex(a.victim_pair)
        for _ in range(a.count):
            for pair in (own.pair_id, victim_pair):
                nonce = int.from_bytes(os.urandom(8), "big")
                probe = dm.Datagram(dm.DatagramKind.PROBE, pair, nonce)
                udp.sendto(probe.encode(own.send_probe_key), dest)
                out["sent"] += 1
            await asyncio.sleep(0.02)
        # whatever gwB sends back (an ACK would mean it took the material)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                data, src = udp.recvfrom(2048)
            except BlockingIOError:
                await asyncio.sleep(0.02)
                continue
            if src[0] == victim_ip:
                out["answers"] += 1
    finally:
        client.close()
        udp.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("router")
    ap.add_argument("key_file")
    ap.add_argument("gateway", help="the rogue's tunnel address")
    ap.add_argument("network", help="the network it registers")
    ap.add_argument("source", help="its own address on the segment (its host candidate)")
    ap.add_argument("packet_src", help="source of the packets that make the router offer")
    ap.add_argument("packet_dst", help="their destination (in gwA's LAN)")
    ap.add_argument("victim", help="gwB's direct endpoint ip:port")
    ap.add_argument("victim_pair", help="the gwA-gwB pair id, hex")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=15.0)
    a = ap.parse_args()
    try:
        out = asyncio.run(run(a))
    except Exception as exc:  # reported, the test shows it
        out = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())

"""End to end: the gateways clamp the MSS of SYNs and SYN-ACKs crossing the tunnel.

    hostA (eth0 MTU 9000) -- gwA (lan0 MTU 9000) ==tunnel, TUN mtu 1400== gwB -- hostB

hostA's jumbo MTU makes its kernel advertise MSS 8960 (IPv4) / 8940 (IPv6). A raw
AF_PACKET socket on hostB's eth0 records the MSS options of every SYN and SYN-ACK arriving
from hostA, which must be at most 1400 - 40 / 1400 - 60. Switching ``mss_clamp`` off on
one gateway at a time shows each direction works on its own (gwA: LAN into the tunnel,
gwB: tunnel out to the LAN), and off on both shows the capture would see the jumbo MSS.

Skipped until GatewayConfig has ``mss_clamp``: the gateway integration switches it on.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sys
import time
from pathlib import Path

import pytest
import topology as t
from test_e2e import (
    keys,  # noqa: F401  (module fixture: CA, router certificate, shared key)
    running_vpn,
)

from polevpn.config import GatewayConfig
from polevpn.packet.mss import limits

_ok, _reason = t.daemons_ready()
_integrated = any(f.name == "mss_clamp" for f in dataclasses.fields(GatewayConfig))

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not _ok, reason=_reason),
    pytest.mark.skipif(not _integrated, reason="awaits gateway integration (mss_clamp)"),
]

TUN_MTU = 1400
JUMBO = 9000
MSS4, MSS6 = limits(TUN_MTU)
JUMBO4, JUMBO6 = limits(JUMBO)
TRANSFER = 2 * 1024 * 1024
SMALL = 64 * 1024

# Prints one JSON line per TCP packet with SYN set arriving on the interface (not the ones
# this host sends), until its deadline; every blocking call is bounded.
_CAPTURE = r"""
import json, socket, struct, sys, time
ifname, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((ifname, 0))
s.settimeout(0.2)
print("ready", flush=True)
while time.monotonic() < deadline:
    try:
        frame, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING or len(frame) < 14:
        continue
    etype, ip = struct.unpack_from("!H", frame, 12)[0], frame[14:]
    if etype == 0x0800 and len(ip) >= 20 and ip[9] == 6:
        src, l4 = socket.inet_ntop(socket.AF_INET, ip[12:16]), (ip[0] & 15) * 4
    elif etype == 0x86DD and len(ip) >= 40 and ip[6] == 6:
        src, l4 = socket.inet_ntop(socket.AF_INET6, ip[8:24]), 40
    else:
        continue
    tcp = ip[l4:]
    if len(tcp) < 20 or not tcp[13] & 0x02:
        continue
    sport, dport = struct.unpack_from("!HH", tcp)
    opts, mss, i = tcp[20:(tcp[12] >> 4) * 4], [], 0
    while i < len(opts) and opts[i] != 0:
        if opts[i] == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        if opts[i] == 2 and opts[i + 1] == 4:
            mss.append(struct.unpack_from("!H", opts, i + 2)[0])
        i += opts[i + 1]
    print(json.dumps({"src": src, "sport": sport, "dport": dport,
                      "ack": bool(tcp[13] & 0x10), "mss": mss}), flush=True)
"""

# (name, sender, receiver, receiver address, port, bytes). hostB sees hostA's SYN-ACK in
# the first two and hostA's SYN in the last two.
#
# Without clamping, hostA's full-sized data to hostB draws "fragmentation needed" from gwA,
# and from then on hostA's kernel itself advertises the learnt path MTU - 40 to hostB: the
# order keeps every handshake of hostA's before it sends data to that address, and probe()
# flushes hostA's route cache first, so only the gateways can lower what hostB sees.
FLOWS = (
    ("synack4", "hostB", "hostA", t.HOST_A, 5103, SMALL),
    ("synack6", "hostB", "hostA", t.HOST_A6, 5104, SMALL),
    ("syn4", "hostA", "hostB", t.HOST_B, 5101, TRANSFER),
    ("syn6", "hostA", "hostB", t.HOST_B6, 5102, SMALL),
)


class Site:
    """The running VPN with hostA on jumbo frames, and the gateways' mss_clamp settings."""

    def __init__(self, vpn, work: Path, keys_dir: Path) -> None:
        self.vpn = vpn
        self.work = work
        self.keys = keys_dir
        # each gateway's config settings beyond gateway_config's defaults
        self.extra: dict[str, dict] = {"gwA": {}, "gwB": {}}

    def set_clamp(self, node: str, value: bool | None, **extra) -> None:
        """Restart ``node`` with mss_clamp ``value`` (None: left out of the config) and
        ``extra`` settings, unless it runs with those already."""
        if value is not None:
            extra["mss_clamp"] = value
        if self.extra[node] == extra:
            return
        side = node[-1]
        cfg = t.write_json(
            self.work / f"gateway-{side.lower()}-{secrets.token_hex(2)}.json",
            t.gateway_config(side, self.keys, stats_interval=1, **extra),
        )
        self.vpn.stop_gateway(node)
        self.vpn.start_gateway(node, cfg)
        self.extra[node] = extra
        waited = self.vpn.wait_ping("hostA", t.HOST_B, deadline=30)
        assert waited is not None, f"no connectivity after restarting {node}\n{self.vpn.logs()}"
        # the other address family too, so no flow below waits on neighbour discovery
        waited = self.vpn.wait_ping("hostA", t.HOST_B6, deadline=15)
        assert waited is not None, f"no IPv6 after restarting {node}\n{self.vpn.logs()}"

    def probe(self) -> dict[str, list[int]]:
        """Run every flow while capturing on hostB: {flow name: MSS values hostB saw}."""
        topo = self.vpn.topo
        # forget path MTUs learnt by earlier probes (see FLOWS)
        topo.run("hostA", ["ip", "route", "flush", "cache"])
        topo.run("hostA", ["ip", "-6", "route", "flush", "cache"])
        cap = topo.popen(
            "hostB",
            [sys.executable, "-c", _CAPTURE, topo.if_hostb, "120"],
            log_name=f"syncap-{secrets.token_hex(2)}",
        )
        try:
            deadline = time.monotonic() + 10
            while b"ready" not in cap.log_path.read_bytes():
                assert cap.poll() is None and time.monotonic() < deadline, (
                    f"capture did not start: {cap.log_path.read_text(errors='replace')}"
                )
                time.sleep(0.05)
            for name, src, dst, addr, port, size in FLOWS:
                res = topo.transfer(src, dst, addr, size, port=port, timeout=60)
                assert res["ok"], f"{name}: transfer failed {res}\n{self.vpn.logs()}"
            time.sleep(0.3)  # the last handshake was long done; let the capture print it
        finally:
            t.Topology.stop(cap, timeout=3)
        seen: dict[str, list[int]] = {}
        records = [
            json.loads(line)
            for line in cap.log_path.read_text(errors="replace").splitlines()
            if line.startswith("{")
        ]
        for name, src, _dst, addr, port, _size in FLOWS:
            from_a = t.HOST_A6 if ":" in addr else t.HOST_A
            for r in records:
                if r["src"] != from_a:
                    continue
                # hostA's SYN to the port, or its SYN-ACK from it
                syn_from_a = src == "hostA"
                if r["ack"] != syn_from_a and r["dport" if syn_from_a else "sport"] == port:
                    seen.setdefault(name, []).extend(r["mss"])
        missing = [f[0] for f in FLOWS if not seen.get(f[0])]
        assert not missing, f"no SYN/SYN-ACK with MSS captured for {missing}: {records}"
        return seen


@pytest.fixture(scope="module")
def site(tmp_path_factory, keys):  # noqa: F811
    work = tmp_path_factory.mktemp("mss")
    with running_vpn(work, keys) as vpn:
        topo = vpn.topo
        topo.run("gwA", ["ip", "link", "set", "lan0", "mtu", str(JUMBO)])
        topo.run("hostA", ["ip", "link", "set", topo.if_hosta, "mtu", str(JUMBO)])
        yield Site(vpn, work, keys)


def _limit(name: str) -> int:
    return MSS6 if name.endswith("6") else MSS4


def _jumbo(name: str) -> int:
    return JUMBO6 if name.endswith("6") else JUMBO4


def test_both_gateways_default(site):
    """mss_clamp left out of both configs: on by default; 2 MB arrive intact."""
    site.set_clamp("gwA", None)
    site.set_clamp("gwB", None)
    seen = site.probe()
    for name, values in seen.items():
        assert set(values) == {_limit(name)}, (name, values)


@pytest.mark.parametrize(
    "clamping,other,offload",
    [("gwA", "gwB", True), ("gwB", "gwA", True), ("gwB", "gwA", False)],
    ids=["lan-to-tunnel-gwA", "tunnel-to-lan-gwB", "tunnel-to-lan-gwB-plain"],
)
def test_one_direction_alone(site, clamping, other, offload):
    """Only one gateway clamps: gwA on packets from its LAN into the tunnel, or gwB on
    packets from the tunnel out to its LAN. Either alone brings the MSS down.

    With offloads, hostA's handshakes reach gwB as super-packet bodies (they carry a
    partial checksum); with gwA's offloads off they arrive as plain packets."""
    site.set_clamp(other, False, **({} if offload else {"offload": False}))
    site.set_clamp(clamping, True)
    seen = site.probe()
    for name, values in seen.items():
        assert set(values) == {_limit(name)}, (clamping, name, values)


def test_without_clamping_hostb_sees_jumbo_mss(site):
    """The control: with clamping off on both, the capture sees hostA's jumbo MSS, so the
    tests above measure the gateways and not something else on the path."""
    site.set_clamp("gwA", False)
    site.set_clamp("gwB", False)
    seen = site.probe()
    for name, values in seen.items():
        assert set(values) == {_jumbo(name)}, (name, values)

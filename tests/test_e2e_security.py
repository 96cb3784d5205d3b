"""Attacks on a per-gateway router, with real daemons and TUN devices in namespaces.

Three offices: A and B as in every e2e test, and C, a gateway host on its own underlay
link with no LAN, whose credentials are valid for its own grant only. C tries to take B's
subnet (with its own key, and with the shared key that the router also accepts), then
sends packets with other offices' source addresses. Meanwhile a TCP stream from A to B
runs; it must finish with a matching SHA-256. gwB connects over kcp:// with a client
certificate and a key, so the DTLS client-certificate path is exercised by real daemons.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import topology as t
from test_e2e import keys  # noqa: F401  (module fixture: CA, router certificate, shared key)

from polevpn import keygen

GW_C = "169.254.0.3"
LAN_C = "198.18.30.0/24"
GW_C_UL, ROUTER_UL_C = "198.19.0.10", "198.19.0.9"
UDP_PORT = 5301

pytestmark = pytest.mark.skipif(not t.have_netns_support()[0], reason=t.have_netns_support()[1])

_UDP_COUNT = r"""
import collections, json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(0.5)
print("ready", flush=True)
seen = collections.Counter(); end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        _, (src, _) = s.recvfrom(2048)
    except socket.timeout:
        continue
    seen[src] += 1
print(json.dumps(seen), flush=True)
"""

# IPv4/UDP with any source address, through the routing table (into the TUN)
_SPOOF = r"""
import socket, struct, sys, time
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff)
    return ~(s + (s >> 16)) & 0xffff
src, dst, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for i in range(count):
    payload = b"probe %d" % i
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    r.sendto(hdr + udp, (dst, 0))
    time.sleep(0.01)
"""


def creds(keys_dir: Path) -> dict[str, keygen.GatewayCredentials]:  # noqa: F811
    specs = [
        f"{t.GW_A_TUN4}={t.LAN_A},{t.LAN_A6},{t.GW_A_TUN6}/128",
        f"{t.GW_B_TUN4}={t.LAN_B},{t.LAN_B6},{t.GW_B_TUN6}/128",
        f"{GW_C}={LAN_C}",
    ]
    return {c.address: c for c in keygen.issue_gateways(keys_dir, specs, client_certs=True)}


@pytest.fixture(scope="module")
def office_keys(tmp_path_factory, keys):  # noqa: F811
    out = tmp_path_factory.mktemp("offices")
    for name in ("ca.crt", "ca.key", "server.crt", "server.key", "shared.key"):
        (out / name).write_bytes((keys / name).read_bytes())
        (out / name).chmod(0o600)
    return out, creds(out)


def _udp_counts(proc) -> dict[str, int]:
    """Datagrams per source address, once the receiver's time budget has run out."""
    proc.wait(timeout=30)
    lines = [ln for ln in proc.log_path.read_text().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def _stats_when(proc, ok, timeout: float = 5.0) -> dict[str, str]:
    """The daemon's newest stats line once ``ok`` holds for it (it logs every second)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = t.last_stats(proc.log_path)
        if ok(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_subnet_hijack_and_spoofed_sources_are_refused(tmp_path, office_keys):
    keys_dir, c = office_keys
    grants = keygen.router_gateways_table(list(c.values()))
    # B is known by certificate and key; the others by key alone
    for addr in (t.GW_A_TUN4, GW_C):
        del grants[addr]["cert_fingerprint"]
    router = t.router_config(
        keys_dir,
        stats_interval=1,
        log_level="debug",
        gateways=grants,
        client_ca_file=str(keys_dir / "ca.crt"),
        kcp={
            "listen": "0.0.0.0:443",
            "enable": True,
            "cert_file": str(keys_dir / "server.crt"),
            "key_file": str(keys_dir / "server.key"),
        },
    )
    gw_a = t.gateway_config(
        "A", keys_dir, key_file=str(c[t.GW_A_TUN4].key_file), stats_interval=1, log_level="debug"
    )
    gw_b = t.gateway_config(
        "B",
        keys_dir,
        route_server=f"kcp://{t.ROUTER_UL_B}:443",
        key_file=str(c[t.GW_B_TUN4].key_file),
        client_cert_file=str(c[t.GW_B_TUN4].client_cert_file),
        client_key_file=str(c[t.GW_B_TUN4].client_key_file),
        stats_interval=1,
    )
    good_c = t.gateway_config(
        "A",
        keys_dir,
        route_server=f"tls://{ROUTER_UL_C}:443",
        key_file=str(c[GW_C].key_file),
        gateway=GW_C,
        gateway6=None,
        local_networks=[LAN_C],
        route_networks=[t.LAN_B],
        acls=[t.LAN_B, "169.254.0.0/16"],
    )
    hijack_own_key = dict(good_c, local_networks=[LAN_C, t.LAN_B])
    hijack_shared = dict(
        good_c,
        key_file=str(keys_dir / "shared.key"),
        gateway="169.254.0.9",
        local_networks=[t.LAN_B],
    )

    topo = t.Topology(log_dir=tmp_path / "logs")
    try:
        topo.setup()
        topo.add_site("gwC", GW_C_UL, ROUTER_UL_C, "ul-c")
        cfg = {
            name: t.write_json(tmp_path / f"{name}.json", obj)
            for name, obj in [
                ("router", router),
                ("gwA", gw_a),
                ("gwB", gw_b),
                ("hijack1", hijack_own_key),
                ("hijack2", hijack_shared),
                ("gwC", good_c),
            ]
        }
        rproc = t.start_router(topo, cfg["router"])
        t.start_gateway(topo, "gwA", cfg["gwA"])
        bproc = t.start_gateway(topo, "gwB", cfg["gwB"])
        t.wait_for_log(bproc, "registered with router", "kcp://")
        assert t.find_log_line(rproc.log_path, f"registered gateway={t.GW_B_TUN4} ", "kcp")
        assert topo.wait_ping("hostA", t.HOST_B, deadline=15) is not None
        stream = topo.start_transfer("hostA", "hostB", t.HOST_B, 12 << 20, rate=3 << 20)

        # 1. C announces B's subnet with its own valid key, then with the shared key
        for name, why in [
            ("hijack1", f"network {t.LAN_B} is not granted to gateway {GW_C}"),
            ("hijack2", f"network {t.LAN_B} belongs to gateway {t.GW_B_TUN4}"),
        ]:
            proc = t.start_gateway(topo, "gwC", cfg[name], log_name=name, wait=False)
            assert proc.wait(timeout=20) == 1, t.log_tail(proc.log_path)
            line = t.find_log_line(proc.log_path, "registration rejected by router")
            assert line and why in line, t.log_tail(proc.log_path)
            assert t.find_log_line(rproc.log_path, "registration refused", why)
        # nothing moved: B's subnet still leads to B
        assert topo.ping("hostA", t.HOST_B, count=2, wait=2).returncode == 0

        # 2. C, registered for its own subnet, sends with A's and B's addresses as source
        cproc = t.start_gateway(topo, "gwC", cfg["gwC"], log_name="gwC")
        rx = topo.popen(
            "hostB", [sys.executable, "-c", _UDP_COUNT, str(UDP_PORT), "4"], log_name="udp-rx"
        )
        t.wait_for_log(rx, "ready", timeout=10)
        for src in (t.HOST_A, "198.18.20.77", "198.18.40.1", GW_C):
            topo.run("gwC", [sys.executable, "-c", _SPOOF, src, t.HOST_B, str(UDP_PORT), "20"])
        seen = _udp_counts(rx)
        assert seen.get(GW_C, 0) >= 18, seen  # C's own address is C's to use
        assert set(seen) == {GW_C}, f"spoofed sources reached hostB: {seen}"
        # 60 spoofed probes, plus whatever IPv6 the hosts' kernels send from link-local
        # addresses into the TUNs (router solicitations): no gateway registers fe80::/10
        stats = _stats_when(rproc, lambda st: int(st.get("dropped_spoofed", 0)) >= 60)
        assert int(stats["register_refused"]) == 2, stats

        # 3. the victim's stream went on undisturbed
        res = stream.result()
        assert res["ok"], res
        assert cproc.poll() is None

        # 4. no secret in any log, the debug-level ones included
        secrets = [Path(x.key_file).read_text().strip() for x in c.values()]
        secrets.append((keys_dir / "shared.key").read_text().strip())
        for log in topo.log_dir.glob("*.log"):
            text = log.read_text(errors="replace")
            for secret in secrets:
                assert secret not in text, f"a key appears in {log.name}"
    finally:
        topo.teardown()
        assert not t.leftover_namespaces(topo.prefix)


def test_gateway_drops_its_own_addresses_arriving_from_the_tunnel(tmp_path, keys):  # noqa: F811
    """Behind a router that does not filter (a PoleVPN router, or anti_spoofing off), a
    gateway still refuses packets from the tunnel that claim to come from its own LAN."""
    router = t.router_config(keys, stats_interval=1, anti_spoofing=False)
    topo = t.Topology(log_dir=tmp_path / "logs")
    try:
        topo.setup()
        rproc = t.start_router(topo, t.write_json(tmp_path / "router.json", router))
        t.start_gateway(
            topo,
            "gwA",
            t.write_json(tmp_path / "a.json", t.gateway_config("A", keys, stats_interval=1)),
        )
        bproc = t.start_gateway(
            topo,
            "gwB",
            t.write_json(tmp_path / "b.json", t.gateway_config("B", keys, stats_interval=1)),
        )
        assert topo.wait_ping("hostA", t.HOST_B, deadline=15) is not None
        rx = topo.popen(
            "hostB", [sys.executable, "-c", _UDP_COUNT, str(UDP_PORT), "3"], log_name="udp-rx"
        )
        t.wait_for_log(rx, "ready", timeout=10)
        # from gwA's host, through its TUN: B's own LAN as source, then A's (legitimate)
        topo.run(
            "gwA", [sys.executable, "-c", _SPOOF, "198.18.20.77", t.HOST_B, str(UDP_PORT), "10"]
        )
        topo.run("gwA", [sys.executable, "-c", _SPOOF, t.HOST_A, t.HOST_B, str(UDP_PORT), "10"])
        seen = _udp_counts(rx)
        assert set(seen) == {t.HOST_A} and seen[t.HOST_A] >= 9, seen
        assert "anti_spoofing is off" in (t.find_log_line(rproc.log_path, "anti_spoofing") or "")
        stats = _stats_when(bproc, lambda st: int(st.get("dropped_spoofed", 0)) >= 10)
        assert int(stats["dropped_spoofed"]) == 10, stats
    finally:
        topo.teardown()
        assert not t.leftover_namespaces(topo.prefix)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_daemons_run_with_least_privilege(tmp_path, keys):  # noqa: F811
    """The gateway keeps CAP_NET_ADMIN alone; the router drops to ``user`` after binding,
    and runs started unprivileged from the outset, as its systemd unit starts it."""
    # pytest's tmp_path lies under a root-only directory: nobody needs a place of its own
    private = Path(tempfile.mkdtemp(prefix="polevpn-nobody-"))
    for name in ("ca.crt", "server.crt", "server.key", "shared.key"):
        (private / name).write_bytes((keys / name).read_bytes())
        (private / name).chmod(0o600)
        os.chown(private / name, 65534, 65534)
    os.chown(private, 65534, 65534)
    topo = t.Topology(log_dir=tmp_path / "logs")
    try:
        topo.setup()
        cfg = t.write_json(
            tmp_path / "router.json", t.router_config(private, user="nobody", stats_interval=1)
        )
        cfg.chmod(0o644)
        rproc = t.start_router(topo, cfg)
        t.wait_for_log(rproc, "dropped privileges", "user=nobody")
        gws = [
            t.start_gateway(
                topo, n, t.write_json(tmp_path / f"{n}.json", t.gateway_config(s, keys))
            )
            for n, s in (("gwA", "A"), ("gwB", "B"))
        ]
        assert topo.wait_ping("hostA", t.HOST_B, deadline=15) is not None
        st = _status(rproc.pid)
        assert st["Uid"].split() == ["65534"] * 4, st["Uid"]
        assert int(st["CapEff"], 16) == 0 and st["NoNewPrivs"] == "1"
        for proc in gws:
            st = _status(proc.pid)
            for cap in ("CapEff", "CapPrm", "CapBnd"):
                assert int(st[cap], 16) == 1 << 12, (cap, st[cap])  # CAP_NET_ADMIN only
            assert st["NoNewPrivs"] == "1"
        topo.stop(rproc)
        # as the unit does it: user nobody from exec on, CAP_NET_BIND_SERVICE for port 443
        unpriv = t.write_json(private / "router2.json", t.router_config(private))
        os.chown(unpriv, 65534, 65534)
        exe = t.console_script("polevpn-router")
        rproc = topo.popen(
            "router",
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all,+net_bind_service",
                "--ambient-caps=-all,+net_bind_service",
                "--bounding-set=-all,+net_bind_service",
                "--no-new-privs",
                exe,
                f"-configPath={unpriv}",
            ],
            log_name="router-unprivileged",
        )
        t.wait_for_log(rproc, "listening", "tls")
        assert topo.wait_ping("hostA", t.HOST_B, deadline=20) is not None
        assert int(_status(rproc.pid)["CapBnd"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE
        assert t.find_log_line(rproc.log_path, "running as root") is None
    finally:
        topo.teardown()
        shutil.rmtree(private, ignore_errors=True)
        assert not t.leftover_namespaces(topo.prefix)

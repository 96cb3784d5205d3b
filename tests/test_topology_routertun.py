"""The router's own TUN end to end: the router host joins the network.

    hostA -- gwA ==tls==> router <==tls== gwB -- hostB
                            | polevpn0 169.254.0.254, 2001:db8:ff::fe
                            | vpc0 198.18.30.1
                           vpc 198.18.30.2

The router runs with ``"tun"`` in its config and ``"user": "nobody"``: it opens and
configures the TUN as root, then drops every privilege. hostA reaches a TCP service bound
on the router's tunnel address; the vpc host behind the router reaches hostB and back.
Needs root and iproute2; everything created here is removed again, also on failure.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

try:
    import topology as t
except ImportError:
    from tests import topology as t

_ok, _reason = t.daemons_ready()

pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

TUN4 = "169.254.0.254"
TUN6 = "2001:db8:ff::fe"
NOBODY = 65534


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from polevpn.keygen import generate

    return generate(tmp_path_factory.mktemp("keys")).out_dir


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        out[name] = value.strip()
    return out


def test_router_tun_serves_the_router_host_and_the_vpc_behind_it(tmp_path: Path, keys) -> None:
    # pytest's tmp_path lies under a root-only directory: nobody needs a place of its own
    private = Path(tempfile.mkdtemp(prefix="polevpn-nobody-"))
    for name in ("ca.crt", "server.crt", "server.key", "shared.key"):
        (private / name).write_bytes((keys / name).read_bytes())
        (private / name).chmod(0o600)
        os.chown(private / name, NOBODY, NOBODY)
    os.chown(private, NOBODY, NOBODY)
    topo = t.Topology(log_dir=tmp_path / "logs")
    try:
        with t.built(topo):
            topo.add_vpc()
            tun = {
                "name": "polevpn0",
                "gateway": TUN4,
                "gateway6": TUN6,
                "networks": [t.VPC],
                "route_networks": [t.LAN_A, t.LAN_B, t.LAN_A6, t.LAN_B6],
            }
            cfg = t.write_json(
                tmp_path / "router.json",
                t.router_config(private, user="nobody", stats_interval=1, tun=tun),
            )
            cfg.chmod(0o644)
            router = t.start_router(topo, cfg)
            t.wait_for_log(router, "dropped privileges", "user=nobody")
            t.wait_for_log(router, "tun up", f"address={TUN4},{TUN6}")
            st = _status(router.pid)
            assert st["Uid"].split() == [str(NOBODY)] * 4, st["Uid"]
            assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
            own = [TUN4 + "/32", TUN6 + "/128", t.VPC]
            gw_a = t.gateway_config(
                "A", keys, route_networks=[t.LAN_B, t.LAN_B6, *own], stats_interval=1
            )
            gw_b = t.gateway_config(
                "B",
                keys,
                route_networks=[t.LAN_A, t.LAN_A6, *own],
                acls=[t.LAN_A, t.LAN_A6, t.VPC, "169.254.0.0/16", "2001:db8:ff::/64"],
            )
            t.start_gateway(topo, "gwA", t.write_json(tmp_path / "gwA.json", gw_a))
            t.start_gateway(topo, "gwB", t.write_json(tmp_path / "gwB.json", gw_b))
            assert topo.wait_ping("hostA", t.HOST_B, deadline=15) is not None

            # an office reaches the router host's own address, both families
            assert topo.wait_ping("hostA", TUN4, deadline=10) is not None, t.log_tail(
                router.log_path
            )
            assert topo.wait_ping("hostA", TUN6, deadline=10) is not None
            # a TCP service bound on the router's tunnel address
            x = topo.transfer("hostA", "router", TUN4, 2 * 1024 * 1024, timeout=60)
            assert x["ok"], x
            # the VPC behind the router reaches an office, and the office the VPC
            assert topo.wait_ping("vpc", t.HOST_B, deadline=10) is not None
            assert topo.ping("hostB", t.VPC_HOST, count=2).returncode == 0
            x = topo.transfer("vpc", "hostB", t.HOST_B, 2 * 1024 * 1024, timeout=60)
            assert x["ok"], x
            x = topo.transfer("hostB", "vpc", t.VPC_HOST, 1024 * 1024, timeout=60, port=5098)
            assert x["ok"], x

            # a stats line written after the transfers (stats_interval is 1 s)
            n = t.count_log_lines(router.log_path, "tun_packets_in=")
            t.wait_log_lines(router.log_path, n + 1, "tun_packets_in=", timeout=5)
            last = t.last_stats(router.log_path)
            assert int(last["tun_packets_in"]) > 1000 and int(last["tun_packets_out"]) > 1000
            assert int(last["dropped_spoofed"]) == 0
            # the tun is gone with the router, routes and addresses with it
            assert topo.stop(router) == 0
            left = topo.run("router", ["ip", "link", "show", "polevpn0"], check=False)
            assert left.returncode != 0
    finally:
        for p in private.iterdir():
            p.unlink()
        private.rmdir()

"""Direct office-to-office paths through NAT (issue 18), end to end in namespaces.

    hostA - gwA - natA ==(40 ms)== [inet] ==(40 ms)== router
                          \\=(5 ms)= [inet] =(40 ms)== natB - gwB - hostB
                                                          \\- gwC (a rogue, test 5)

tests/topology.py ``NatTopology``: nftables masquerade NATs, the router on a public segment,
the delays from the impairment element, a cut of UDP between the NATs. The router runs
tls:// and kcp:// (the endpoint probes go to the kcp:// port), gwA dials kcp:// and gwB
tls:// (both ways of endpoint discovery), both with ``direct`` on. The issue's five:

1. the direct path is up within 3 s of the first packet; pings and a SHA-256-checked
   transfer then bypass the router: its forwarded bytes (``bytes_forwarded`` of
   /api/v1/status, the figure of polevpn_router_forwarded_bytes) stay flat, the
   gateways' direct byte counters grow;
2. RTT hostA -> hostB about 160 ms relayed (the path cut) and about 10 ms direct;
3. both NATs symmetric (``masquerade fully-random``): the pair is offered, the punch
   fails, traffic stays relayed and works (its own topology, built first);
4. UDP between the NATs cut during a transfer: it completes with a matching SHA-256,
   traffic is back on the router within 2 s of the cut, direct again once it is restored;
5. a third gateway (tests/direct_rogue.py, next to gwB behind natB) with real material of
   its own pair, and gwA sending from a source outside its grant: refused and counted.

What these tests take from the feature (DIRECT_WIRING.md): the config keys ("direct" in
gateway.json and config.json); the log lines ``direct path up`` / ``direct path down``
with ``peer=<gateway address>`` (and ``endpoint=``); /api/v1/direct (pairs with
``pair_id``, ``gateways``, ``sides[].state``; ``endpoints[].public`` / ``host``); the
router metrics ``polevpn_direct_offers_total`` and ``polevpn_direct_paths{state}``; the
gateway metrics ``polevpn_gateway_direct_paths{state}``,
``polevpn_gateway_direct_bytes_total{peer,direction}`` and
``polevpn_gateway_direct_refused_total{peer}``, plus some ``polevpn_gateway_direct_*``
counter with "refused" in its name for probes with unknown or wrong material.

Skipped unless the installed polevpn has the feature (polevpn/direct/rendezvous.py and
``polevpn.config.DirectConfig``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import polevpn
import polevpn.config

try:
    import topology as t
    from test_e2e import keys  # noqa: F401
except ImportError:
    from tests import topology as t
    from tests.test_e2e import keys  # noqa: F401


def have_direct() -> tuple[bool, str]:
    """Whether the installed polevpn has direct paths wired (router and gateway sides)."""
    if not (Path(polevpn.__file__).parent / "direct" / "rendezvous.py").is_file():
        return False, "polevpn has no direct-path rendezvous (polevpn/direct/rendezvous.py)"
    if not hasattr(polevpn.config, "DirectConfig"):
        return False, "polevpn.config has no DirectConfig (the gateway's direct setting)"
    return True, ""


_ok, _reason = t.daemons_ready()
if _ok and shutil.which("nft") is None:
    _ok, _reason = False, "'nft' (nftables) not found"
if _ok:
    _ok, _reason = have_direct()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

A, B, C = t.GW_A_TUN4, t.GW_B_TUN4, t.GW_C_TUN4
ROUTER_RTT = 4 * t.NAT_ROUTER_DELAY_MS  # 160 ms: hostA -> router -> hostB and back
DIRECT_RTT = 2 * t.NAT_PEER_DELAY_MS  # 10 ms
FLAT = 16 * 1024  # "flat": the router forwards less than this while the path is direct
SPOOFED = "198.18.99.7"  # outside every grant
ROGUE = Path(__file__).resolve().with_name("direct_rogue.py")


# ============================================================================ the system
@dataclass
class DirectVpn:
    """A NatTopology with the router and gwA (kcp://) and gwB (tls://), direct on."""

    topo: t.NatTopology
    work: Path
    keys: Path
    router: subprocess.Popen | None = None
    gw: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, direct: bool = True) -> DirectVpn:
        router = t.nat_router_config(self.keys, direct={"enable": True, "lifetime": 3600,
                                                        "max_pairs": 64})
        self.router = t.start_router(self.topo, t.write_json(self.work / "router.json",
                                                             router))
        # both spellings of the gateway's setting; the candidates are left to the default
        settings = {"A": ("kcp", {"enable": direct, "port": 0}), "B": ("tls", direct)}
        for side, (scheme, setting) in settings.items():
            cfg = t.gateway_config(side, self.keys,
                                   route_server=f"{scheme}://{t.ROUTER_PUB}:443",
                                   direct=setting, stats_interval=1,
                                   metrics_listen=f"127.0.0.1:{t.NAT_METRICS_PORT}")
            path = t.write_json(self.work / f"gw{side}.json", cfg)
            self.gw[f"gw{side}"] = t.start_gateway(self.topo, f"gw{side}", path)
        if direct:
            self.wait_endpoints()
        return self

    def logs(self) -> str:
        parts = [f"----- {p.name} -----\n{t.log_tail(p, 30)}"
                 for p in sorted(self.topo.log_dir.glob("*.log"))
                 if p.name.startswith(("router", "gw"))]
        return "\n".join(parts)

    def api(self, path: str) -> dict:
        return t.router_api(self.topo, path)

    def wait_endpoints(self, timeout: float = 10) -> dict:
        """Until the router knows a public endpoint of both gateways (their endpoint probes
        came through their NATs)."""
        deadline = time.monotonic() + timeout
        while True:
            eps = {e["gateway"]: e for e in self.api("direct")["endpoints"]}
            if all(eps.get(g, {}).get("public") for g in (A, B)):
                return eps
            if time.monotonic() > deadline:
                raise AssertionError(f"no public endpoints: {eps}\n{self.logs()}")
            time.sleep(0.1)

    # -- the gateways' view
    def log(self, node: str) -> Path:
        return self.gw[node].log_path

    def ups(self, node: str = "gwA", peer: str = B) -> int:
        return t.count_log_lines(self.log(node), "direct path up", f"peer={peer}")

    def downs(self, node: str = "gwA", peer: str = B) -> int:
        return t.count_log_lines(self.log(node), "direct path down", f"peer={peer}")

    def wait_up(self, count: int, node: str = "gwA", peer: str = B, timeout: float = 10
                ) -> str:
        return t.wait_log_lines(self.log(node), count, "direct path up", f"peer={peer}",
                                timeout=timeout, why=f"{node}: direct path up to {peer}")

    def wait_down(self, count: int, node: str = "gwA", peer: str = B, timeout: float = 5
                  ) -> str:
        return t.wait_log_lines(self.log(node), count, "direct path down", f"peer={peer}",
                                timeout=timeout, why=f"{node}: direct path down to {peer}")

    def metrics(self, node: str) -> list[tuple[str, dict[str, str], float]]:
        return t.metrics(self.topo, node)

    def direct_paths(self, node: str = "gwA") -> int:
        return int(t.metric_sum(self.metrics(node), "polevpn_gateway_direct_paths",
                                state="direct"))

    def direct_bytes(self, node: str, peer: str) -> float:
        """Bytes sent and received directly with ``peer`` (every direction label)."""
        return t.metric_sum(self.metrics(node), "polevpn_gateway_direct_bytes_total",
                            peer=peer)

    def refused(self, node: str) -> float:
        """Every ``polevpn_gateway_direct_*refused*`` sample: what the gateway refused on
        its direct socket and paths (probes, proofs, packets)."""
        return sum(v for n, _, v in self.metrics(node)
                   if n.startswith("polevpn_gateway_direct_") and "refused" in n)

    def forwarded(self) -> int:
        return t.router_forwarded_bytes(self.topo)

    def ensure_direct(self, timeout: float = 25) -> None:
        """gwA's path to gwB direct (traffic starts it, a failed attempt retries)."""
        # the count first: a path that comes up between the two reads is then a new line
        # (read after the check, it was counted already and waited for in vain: CI, stop 27)
        n = self.ups()
        if self.direct_paths("gwA") >= 1:
            return
        pings = self.topo.start_pings("hostA", t.HOST_B, count=round(timeout / 0.2),
                                      interval=0.2)
        try:
            self.wait_up(n + 1, timeout=timeout)
        finally:
            t.Topology.stop(pings, timeout=2)
        time.sleep(0.3)  # the other side's line and the first status


@pytest.fixture(scope="module")
def dvpn(tmp_path_factory, keys) -> Iterator[DirectVpn]:  # noqa: F811
    work = tmp_path_factory.mktemp("direct")
    topo = t.NatTopology(log_dir=work / "logs")
    with t.built(topo):
        topo.add_gateway_c()
        yield DirectVpn(topo, work, keys).start()


def _last_json(text: str) -> dict | None:
    lines = text.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def _rtts(topo: t.Topology, count: int = 20, interval: float = 0.05) -> dict:
    st = topo.ping_stats("hostA", t.HOST_B, count=count, interval=interval)
    assert st["received"] >= count - 1, st["stdout"]
    return st


# ====================================== 3. both NATs symmetric (its own topology, first)
def test_symmetric_nats_stay_relayed_and_work(tmp_path, keys):  # noqa: F811
    topo = t.NatTopology(log_dir=tmp_path / "logs", symmetric=True, router_delay_ms=0,
                         peer_delay_ms=0)
    with t.built(topo):
        v = DirectVpn(topo, tmp_path, keys).start()
        offers = t.metric_sum(v.metrics("router"), "polevpn_direct_offers_total")
        before = v.forwarded()
        first = time.monotonic()
        pings = topo.start_pings("hostA", t.HOST_B, count=50, interval=0.1)
        size = 1024 * 1024
        res = topo.transfer("hostA", "hostB", t.HOST_B, size, timeout=60)
        assert res["ok"], f"transfer between symmetric NATs: {res}\n{v.logs()}"
        # the pair was offered, and the punch (3 s) has had its time to fail
        deadline = first + 8
        while t.metric_sum(v.metrics("router"), "polevpn_direct_offers_total") <= offers:
            assert time.monotonic() < deadline, f"no offer\n{v.logs()}"
            time.sleep(0.2)
        pings.wait(timeout=20)
        replies = t.ping_replies(pings.log_path)
        assert len(replies) >= 45, f"{len(replies)} of 50 pings answered\n{v.logs()}"
        # all of it through the router, never direct
        assert v.forwarded() - before >= size
        for node in ("gwA", "gwB"):
            assert t.find_log_line(v.log(node), "direct path up") is None, v.logs()
            assert v.direct_paths(node) == 0
        pairs = v.api("direct")["pairs"]
        assert pairs and sorted(pairs[0]["gateways"]) == [A, B], pairs
        assert all(s["state"] != "direct" for p in pairs for s in p["sides"]), pairs
        assert t.metric_sum(v.metrics("router"), "polevpn_direct_paths", state="direct") == 0


# ======================================================= 1. direct within 3 s, bypass
def test_direct_within_3s_of_the_first_packet_and_the_router_is_bypassed(dvpn):
    v = dvpn
    for gw in (A, B):  # both agreed the feature
        line = t.find_log_line(v.router.log_path, f"registered gateway={gw}")
        assert line and "direct" in line.split("features=")[1].split()[0], line
    # the router saw each gateway's endpoint probe come from its NAT's public address
    eps = {e["gateway"]: e for e in v.api("direct")["endpoints"]}
    assert eps[A]["public"].startswith(f"{t.NAT_A_PUB}:"), eps
    assert eps[B]["public"].startswith(f"{t.NAT_B_PUB}:"), eps
    assert v.ups() == 0, "a direct path before any traffic"
    first = time.time()  # the first ping goes out right after (ping -D: wall clock too)
    pings = v.topo.start_pings("hostA", t.HOST_B, count=40, interval=0.1)
    line = v.wait_up(1, timeout=10)
    took = t.log_time(line) - first
    assert took <= 3.0, f"direct path up {took:.2f} s after the first packet\n{v.logs()}"
    # through the NATs: gwA sends to natB's public address (the private one is unrouted)
    assert f"endpoint={t.NAT_B_PUB}:" in line, line
    v.wait_up(1, node="gwB", peer=A, timeout=3)
    pings.wait(timeout=15)
    assert len(t.ping_replies(pings.log_path)) >= 37, f"pings lost\n{v.logs()}"

    # now the router carries none of it
    time.sleep(0.5)  # what was relayed before the switch has been counted
    forwarded = v.forwarded()
    direct_a = v.direct_bytes("gwA", B)
    st = _rtts(v.topo)
    size = 4 * 1024 * 1024
    res = v.topo.transfer("hostA", "hostB", t.HOST_B, size, timeout=60)
    assert res["ok"], f"SHA-256 or size mismatch: {res}\n{v.logs()}"
    res = v.topo.transfer("hostB", "hostA", t.HOST_A, size // 4, timeout=60)
    assert res["ok"], f"B -> A: {res}\n{v.logs()}"
    grown = v.forwarded() - forwarded
    assert grown < FLAT, f"the router forwarded {grown} bytes meanwhile\n{v.logs()}"
    assert v.direct_bytes("gwA", B) - direct_a >= size
    assert v.direct_bytes("gwB", A) >= size
    assert st["rtt_avg"] < DIRECT_RTT + 20, st

    # and the router shows it: the pair, both sides direct (from their DIRECT_STATUS)
    deadline = time.monotonic() + 5
    while True:
        pairs = v.api("direct")["pairs"]
        states = sorted((s["gateway"], s["state"]) for p in pairs for s in p["sides"])
        if states == [(A, "direct"), (B, "direct")]:
            break
        assert time.monotonic() < deadline, pairs
        time.sleep(0.2)
    assert sorted(pairs[0]["gateways"]) == [A, B] and len(pairs) == 1, pairs
    assert t.metric_sum(v.metrics("router"), "polevpn_direct_paths", state="direct") >= 1
    assert v.direct_paths("gwA") == 1 and v.direct_paths("gwB") == 1


# ================================================================ 2. 160 ms -> 10 ms
def test_rtt_about_160_ms_relayed_and_10_ms_direct(dvpn):
    v = dvpn
    v.ensure_direct()
    direct = _rtts(v.topo)
    assert direct["rtt_min"] >= DIRECT_RTT and direct["rtt_avg"] < DIRECT_RTT + 15, direct
    downs, ups = v.downs(), v.ups()
    # relayed, in the same run: the path cut, traffic falls back to the router
    keep = v.topo.start_pings("hostA", t.HOST_B, count=30, interval=0.1)
    try:
        v.topo.cut_peer_udp()
        v.wait_down(downs + 1, timeout=5)
        relayed = _rtts(v.topo, count=10, interval=0.1)
    finally:
        v.topo.restore_peer_udp()
        t.Topology.stop(keep, timeout=2)
    assert relayed["rtt_min"] >= ROUTER_RTT and relayed["rtt_avg"] < ROUTER_RTT + 30, relayed
    v.ensure_direct()
    assert v.ups() > ups
    again = _rtts(v.topo)
    assert again["rtt_min"] >= DIRECT_RTT and again["rtt_avg"] < DIRECT_RTT + 15, again
    assert relayed["rtt_avg"] > 8 * again["rtt_avg"], (relayed, again)


# =================================================== 4. the path cut during a transfer
def test_cut_during_a_transfer_falls_back_within_2s_and_returns(dvpn):
    v = dvpn
    v.ensure_direct()
    downs, ups = v.downs(), v.ups()
    size, rate = 8 * 1024 * 1024, 1024 * 1024  # 8 s at 1 MB/s
    xfer = v.topo.start_transfer("hostA", "hostB", t.HOST_B, size, rate, timeout=60)
    interval = 0.05
    pings = v.topo.start_pings("hostA", t.HOST_B, count=round(7 / interval),
                               interval=interval)
    try:
        time.sleep(1.5)
        forwarded = v.forwarded()
        cut = time.time()
        v.topo.cut_peer_udp()
        cut_done = time.time()
        line = v.wait_down(downs + 1, timeout=5)
        down_after = t.log_time(line) - cut
        assert v.direct_paths("gwA") == 0
        time.sleep(0.3)
    finally:
        v.topo.restore_peer_udp()
    v.wait_up(ups + 1, timeout=25)
    res = xfer.result()
    pings.wait(timeout=15)
    assert res["ok"], f"SHA-256 or size mismatch across the cut: {res}\n{v.logs()}"
    assert down_after <= 2.0, f"direct path down {down_after:.2f} s after the cut"
    # the first ping sent after the cut that was answered went out within 2 s of it
    after = [r for r in t.ping_replies(pings.log_path) if r.sent > cut_done]
    assert after, f"no ping answered after the cut\n{v.logs()}"
    resumed = after[0].sent - cut
    assert resumed <= 2.0 + interval, f"traffic resumed {resumed:.2f} s after the cut"
    # the router carried the transfer while the path was cut
    assert v.forwarded() - forwarded > 100_000


# =============================================== 5. other pairs' material, spoofing
def test_third_gateway_material_and_spoofed_sources_are_refused(dvpn):
    v = dvpn
    v.ensure_direct()
    pairs = [p for p in v.api("direct")["pairs"] if sorted(p["gateways"]) == [A, B]]
    assert pairs, v.api("direct")
    eps = {e["gateway"]: e for e in v.api("direct")["endpoints"]}
    victim = next(h for h in eps[B]["host"] if h.startswith(f"{t.GW_B_PRIV}:"))
    refused = v.refused("gwB")
    count = 10
    res = v.topo.run("gwC", [
        sys.executable, str(ROGUE), t.ROUTER_PUB, str(v.keys / "shared.key"), C,
        t.OFFICES["C"].lan, t.GW_C_PRIV, t.OFFICES["C"].host, t.HOST_A, victim,
        pairs[0]["pair_id"], "--count", str(count), "--timeout", "15",
    ], check=False, timeout=40)
    out = _last_json(res.stdout)
    assert out and "error" not in out, f"rogue: {res.stdout}{res.stderr}\n{v.logs()}"
    assert "direct" in out["features"] and out["offer"], out  # real material of its own
    assert out["offer"] != pairs[0]["pair_id"].lower()
    assert out["sent"] == 2 * count and out["answers"] == 0, out
    deadline = time.monotonic() + 3
    while v.refused("gwB") - refused < 2 * count:
        assert time.monotonic() < deadline, (
            f"gwB counted {v.refused('gwB') - refused} of {2 * count} forged probes")
        time.sleep(0.2)
    assert v.direct_paths("gwB") == 1  # undisturbed

    # gwA sends from an address outside its grant, over the direct path: gwB refuses
    before = t.metric_sum(v.metrics("gwB"), "polevpn_gateway_direct_refused_total", peer=A)
    forwarded = v.forwarded()
    v.topo.run("gwA", ["ip", "addr", "add", f"{SPOOFED}/32", "dev", "lo"])
    try:
        res = v.topo.run("gwA", ["ping", "-n", "-c", "5", "-i", "0.05", "-W", "1",
                                 "-I", SPOOFED, t.HOST_B], check=False, timeout=15)
    finally:
        v.topo.run("gwA", ["ip", "addr", "del", f"{SPOOFED}/32", "dev", "lo"], check=False)
    assert " 0 received" in res.stdout, res.stdout
    deadline = time.monotonic() + 3
    while True:
        now = t.metric_sum(v.metrics("gwB"), "polevpn_gateway_direct_refused_total", peer=A)
        if now - before >= 5:
            break
        assert time.monotonic() < deadline, f"gwB refused {now - before} of 5\n{v.logs()}"
        time.sleep(0.2)
    assert v.forwarded() - forwarded < FLAT  # they went direct, not through the router
    st = _rtts(v.topo, count=5)
    assert st["rtt_avg"] < DIRECT_RTT + 20, st  # and the path still carries the rest


"""Tests of the impairment element (tests/impair.py) and Topology(impair=True).

The first group drives ``impair.Direction`` directly with a fake writer (no root needed):
the per-packet decisions and their statistics.  The netns group builds the topology with
the ``imp`` middlebox, plain routing (no VPN) and the element in the path, and checks that
delay, loss, duplication, reordering and bursty loss show up in real traffic, that the
nftables loss rule works with and without imp, and that everything is torn down again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

try:  # tests/ is on sys.path (pytest rootdir-less import mode) ...
    import impair
    import topology as t
except ImportError:  # ... or tests/ is a package
    from tests import impair
    from tests import topology as t

_ok, _reason = t.have_netns_support()
if _ok and shutil.which("ping") is None:
    _ok, _reason = False, "'ping' (iputils-ping) not found"
if _ok and shutil.which("nft") is None:
    _ok, _reason = False, "'nft' (nftables) not found"
if _ok and not os.path.exists("/dev/net/tun"):
    _ok, _reason = False, "/dev/net/tun missing"
netns = pytest.mark.netns
needs_netns = pytest.mark.skipif(not _ok, reason=_reason)


# ====================================================================== unit tests
class Sink:
    """Fake TUN writer: records what the Direction emits."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def __call__(self, pkt: bytes) -> int:
        self.out.append(pkt)
        return len(pkt)


def _direction(seed: int = 1, **params: object) -> tuple[impair.Direction, Sink]:
    sink = Sink()
    d = impair.Direction("up", sink, seed=seed, params=impair.Params.from_dict(params))
    return d, sink


def _feed(d: impair.Direction, n: int, spacing: float = 0.001) -> float:
    """Admit packets b'0'..b'n-1' ``spacing`` s apart, releasing as time goes; end time."""
    now = 1000.0
    for i in range(n):
        d.admit(str(i).encode(), now)
        d.release(now)
        now += spacing
    now += 10.0
    d.release(now)
    return now


def _late(seqs: list[int]) -> int:
    late, high = 0, -1
    for s in seqs:
        late += s < high
        high = max(high, s)
    return late


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="unknown"):
        impair.Params.from_dict({"delay": 20})  # typo must not mean "no impairment"
    with pytest.raises(ValueError, match="percentage"):
        impair.Params.from_dict({"loss_pct": 130})
    with pytest.raises(ValueError, match="ge_bg_pct"):
        impair.Params.from_dict({"ge_gb_pct": 5})
    with pytest.raises(ValueError, match="jitter_dist"):
        impair.Params.from_dict({"jitter_ms": 1, "jitter_dist": "pareto"})
    base = impair.Params.from_dict({"delay_ms": 20, "loss_pct": 1})
    merged = impair.Params.from_dict({"loss_pct": 2}, base)
    assert (merged.delay_ms, merged.loss_pct) == (20.0, 2.0)
    assert impair.Params().passthrough and not base.passthrough


def test_passthrough_and_fixed_delay() -> None:
    d, sink = _direction()
    d.admit(b"a", 0.0)
    assert sink.out == [b"a"] and not d.heap
    d, sink = _direction(delay_ms=20)
    d.admit(b"a", 1.0)
    d.release(1.0199)
    assert sink.out == []  # never early
    d.release(1.02)
    assert sink.out == [b"a"]
    assert d.stats()["delayed"] == 1 and d.stats()["passed"] == 1


@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_jitter_keeps_fifo_unless_allowed_to_reorder(dist: str) -> None:
    d, sink = _direction(delay_ms=10, jitter_ms=5, jitter_dist=dist)
    _feed(d, 2000, spacing=0.0005)
    assert [int(p) for p in sink.out] == list(range(2000))
    d, sink = _direction(delay_ms=10, jitter_ms=5, jitter_dist=dist, jitter_reorder=True)
    _feed(d, 2000, spacing=0.0005)
    seqs = [int(p) for p in sink.out]
    assert sorted(seqs) == list(range(2000)) and _late(seqs) > 100


def test_explicit_reorder_holds_packets_back() -> None:
    d, sink = _direction(reorder_pct=10, reorder_ms=5)
    _feed(d, 2000, spacing=0.001)
    seqs = [int(p) for p in sink.out]
    assert sorted(seqs) == list(range(2000))
    assert 120 < d.reordered < 280
    assert _late(seqs) == d.reordered  # each held packet arrives behind its successors


def test_loss_and_duplication_rates() -> None:
    d, sink = _direction(loss_pct=30)
    _feed(d, 10_000)
    assert 2700 < d.dropped_random < 3300 and len(sink.out) == 10_000 - d.dropped
    d, sink = _direction(dup_pct=20)
    _feed(d, 10_000)
    assert 1700 < d.duplicated < 2300 and len(sink.out) == 10_000 + d.duplicated


def test_gilbert_elliott_is_bursty() -> None:
    # stationary loss gb / (gb + bg) = 5 / 25 = 20 %, mean burst 1 / bg = 5 packets
    d, sink = _direction(ge_gb_pct=5, ge_bg_pct=20)
    _feed(d, 20_000)
    got = {int(p) for p in sink.out}
    runs = _loss_runs(got, 20_000)
    assert 0.14 < d.dropped_burst / 20_000 < 0.26
    assert 3.5 < sum(runs) / len(runs) < 7
    # Bernoulli at the same rate: mean run 1 / (1 - 0.2) = 1.25
    d, sink = _direction(loss_pct=20)
    _feed(d, 20_000)
    runs = _loss_runs({int(p) for p in sink.out}, 20_000)
    assert sum(runs) / len(runs) < 1.5


def test_seed_reproducible() -> None:
    outs = []
    for _ in range(2):
        d, sink = _direction(seed=7, loss_pct=10, dup_pct=5, jitter_ms=3, jitter_reorder=True)
        _feed(d, 1000)
        outs.append(sink.out)
    assert outs[0] == outs[1]
    d, sink = _direction(seed=8, loss_pct=10, dup_pct=5, jitter_ms=3, jitter_reorder=True)
    _feed(d, 1000)
    assert sink.out != outs[0]


def test_queue_limit_drops() -> None:
    sink = Sink()
    d = impair.Direction("up", sink, params=impair.Params(delay_ms=100), limit=10)
    for i in range(15):
        d.admit(bytes([i]), 0.0)
    assert d.dropped_overflow == 5 and len(d.heap) == 10


def _loss_runs(got: set[int], n: int) -> list[int]:
    runs, run = [], 0
    for i in range(n):
        if i in got:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    if run:
        runs.append(run)
    return runs


# ==================================================================== netns tests
@pytest.fixture(scope="module")
def topo_imp():
    topo = t.Topology(impair=True)
    try:
        topo.setup()
        topo.enable_plain_routing()
        topo.start_impair(seed=1)
        assert topo.wait_ping("hostA", t.HOST_B, deadline=10) is not None
        yield topo
    finally:
        prefix = topo.prefix
        topo.teardown()
        assert not t.leftover_namespaces(prefix), "namespaces left behind"


@pytest.fixture
def imp(topo_imp: t.Topology) -> t.Topology:
    """The shared topology with impairment cleared and counters zeroed."""
    topo_imp.set_loss(None)
    topo_imp.set_impair()
    topo_imp.impair_stats(reset=True)
    return topo_imp


def _logs(topo: t.Topology) -> str:
    return "\n".join(
        f"----- {p.name} -----\n{t.log_tail(p, 20)}" for p in sorted(topo.log_dir.glob("*.log"))
    )


@netns
@needs_netns
class TestNetns:
    def test_path_goes_through_imp(self, imp: t.Topology) -> None:
        # gwA resolves the router's address to imp's MAC (proxy ARP), addresses unchanged
        assert imp.ping("gwA", t.ROUTER_UL_A, count=1, wait=1).returncode == 0
        neigh = imp.run("gwA", ["ip", "-j", "neigh", "show", t.ROUTER_UL_A, "dev", "wan0"])
        assert json.loads(neigh.stdout)[0]["lladdr"] == imp._mac(t.IMP_NODE, t.IMP_IF_A)
        st = imp.impair_stats()
        assert st["up"]["passed"] >= 1 and st["down"]["passed"] >= 1, st

    def test_delay_adds_rtt(self, imp: t.Topology) -> None:
        imp.set_impair(delay_ms=20)
        r = imp.ping_stats("hostA", t.HOST_B, count=10, interval=0.05)
        assert r["received"] == 10, r["stdout"]
        assert r["rtt_min"] >= 40.0 and r["rtt_avg"] < 300, r["stdout"]
        # one way only: 30 ms up, nothing down
        imp.set_impair("up", delay_ms=30)
        imp.set_impair("down")
        imp.impair_stats(reset=True)
        r = imp.ping_stats("hostA", t.HOST_B, count=5, interval=0.05)
        assert r["received"] == 5 and 30.0 <= r["rtt_min"] < 300, r["stdout"]
        st = imp.impair_stats()
        assert st["up"]["delayed"] >= 5 and st["down"]["delayed"] == 0, st

    def test_loss_shows_in_ping(self, imp: t.Topology) -> None:
        imp.set_impair("up", loss_pct=30)
        r = imp.ping_stats("hostA", t.HOST_B, count=300, interval=0.005, wait=1)
        assert r["transmitted"] == 300, r["stdout"]
        assert 15 <= r["loss_pct"] <= 45, r["stdout"]
        st = imp.impair_stats()
        assert st["up"]["dropped_random"] >= 45 and st["down"]["dropped"] == 0, st

    def test_duplication_shows_dup(self, imp: t.Topology) -> None:
        imp.set_impair("up", dup_pct=100)
        r = imp.ping("hostA", t.HOST_B, count=3, wait=2)
        assert "DUP!" in r.stdout, r.stdout
        assert imp.impair_stats()["up"]["duplicated"] >= 3

    def test_udp_jitter_fifo_reorder_dup(self, imp: t.Topology) -> None:
        kw = {"count": 300, "interval": 0.001, "quiet": 0.5}
        imp.set_impair("up", delay_ms=5, jitter_ms=4)  # jitter, FIFO kept
        r = imp.udp_probe("hostA", "hostB", t.HOST_B, **kw)
        assert r["lost"] == 0 and r["late"] == 0 and r["duplicates"] == 0, r
        imp.set_impair("up", reorder_pct=20, reorder_ms=5)
        r = imp.udp_probe("hostA", "hostB", t.HOST_B, **kw)
        assert r["lost"] == 0 and r["late"] >= 20, r
        assert imp.impair_stats()["up"]["reordered"] >= 20
        imp.set_impair("up", delay_ms=5, jitter_ms=4, jitter_reorder=True)
        r = imp.udp_probe("hostA", "hostB", t.HOST_B, **kw)
        assert r["lost"] == 0 and r["late"] >= 20, r
        imp.set_impair("up", dup_pct=50)
        r = imp.udp_probe("hostA", "hostB", t.HOST_B, **kw)
        assert r["lost"] == 0 and 90 <= r["duplicates"] <= 210, r

    def test_udp_gilbert_elliott_burst_loss(self, imp: t.Topology) -> None:
        # 20 % loss in bursts of mean 5 packets (Bernoulli 20 % would give runs of ~1.25)
        imp.set_impair("up", ge_gb_pct=5, ge_bg_pct=20)
        r = imp.udp_probe("hostA", "hostB", t.HOST_B, count=1000, interval=0.0005, quiet=0.5)
        runs = _loss_runs(set(r["order"]), 1000)
        assert 80 <= r["lost"] <= 350, r["lost"]
        assert sum(runs) / len(runs) >= 2.5, runs
        st = imp.impair_stats()["up"]
        assert st["dropped_burst"] == r["lost"] and st["dropped_random"] == 0, st

    def test_tcp_transfer_through_delay_jitter_loss(self, imp: t.Topology) -> None:
        imp.set_impair(delay_ms=10, jitter_ms=2, loss_pct=1)
        res = imp.transfer("hostA", "hostB", t.HOST_B, 2_000_000, port=5097, timeout=40)
        assert res["ok"], f"{res}\n{_logs(imp)}"
        st = imp.impair_stats()["total"]
        assert st["dropped_random"] > 0 and st["delayed"] > 1000, st

    def test_runtime_control(self, imp: t.Topology) -> None:
        proc = imp.impair_proc
        assert proc is not None
        imp.set_impair(delay_ms=5, loss_pct=1)
        got = imp.set_impair("down", merge=True, loss_pct=2)
        assert got["down"]["delay_ms"] == 5 and got["down"]["loss_pct"] == 2
        assert got["up"]["loss_pct"] == 1
        with pytest.raises(t.TopologyError, match="unknown parameter"):
            imp.set_impair(dleay_ms=5)
        assert imp.impair_params() == got  # a bad request changes nothing
        assert imp.impair_proc is proc and proc.poll() is None  # same process throughout
        os.kill(proc.pid, signal.SIGUSR1)
        line = t.wait_for_log(proc, '"event":"stats"', timeout=5)
        assert '"up"' in line and '"down"' in line

    def test_nft_loss_in_imp(self, imp: t.Topology) -> None:
        imp.set_loss(40, direction="up")
        r = imp.ping_stats("hostA", t.HOST_B, count=300, interval=0.005, wait=1)
        assert 20 <= r["loss_pct"] <= 60, r["stdout"]
        dropped = imp.loss_stats()
        assert dropped >= 60, dropped
        # dropped in the kernel, before the element: it never saw those packets
        assert imp.impair_stats()["up"]["received"] <= 300 - dropped + 5
        imp.set_loss(None)
        assert imp.loss_stats() == 0
        r = imp.ping_stats("hostA", t.HOST_B, count=50, interval=0.005, wait=1)
        assert r["received"] == 50, r["stdout"]


@netns
@needs_netns
def test_without_impair_topology_unchanged_and_nft_loss_in_router() -> None:
    topo = t.Topology()
    try:
        topo.setup()
        assert t.IMP_NODE not in topo.ns
        assert not [n for n in t.leftover_namespaces(topo.prefix) if n.endswith("-imp")]
        topo.enable_plain_routing()
        assert topo.ping("gwA", t.ROUTER_UL_A, count=1, wait=1).returncode == 0
        neigh = topo.run("gwA", ["ip", "-j", "neigh", "show", t.ROUTER_UL_A, "dev", "wan0"])
        assert json.loads(neigh.stdout)[0]["lladdr"] == topo._mac("router", "ul-a")
        with pytest.raises(t.TopologyError):
            topo.start_impair()
        topo.set_loss(50)  # both directions: ~75 % ping loss
        r = topo.ping_stats("hostA", t.HOST_B, count=200, interval=0.005, wait=1)
        assert 55 <= r["loss_pct"] <= 92, r["stdout"]
        assert topo.loss_stats() >= 100
        topo.set_loss(None)
        r = topo.ping_stats("hostA", t.HOST_B, count=20, interval=0.005, wait=1)
        assert r["received"] == 20, r["stdout"]
    finally:
        prefix = topo.prefix
        topo.teardown()
    assert not t.leftover_namespaces(prefix)


@netns
@needs_netns
def test_stop_impair_and_teardown_clean() -> None:
    topo = t.Topology(impair=True)
    try:
        topo.setup()
        topo.enable_plain_routing()
        proc = topo.start_impair(delay_ms=15)
        sock_dir = Path(topo._imp_dir or "")
        r = topo.ping_stats("hostA", t.HOST_B, count=3, interval=0.05)
        assert r["received"] == 3 and r["rtt_min"] >= 30, r["stdout"]
        final = topo.stop_impair()
        assert proc.poll() is not None
        assert final["total"]["passed"] >= 6, final
        # element gone, rules gone: imp forwards in the kernel, no added delay
        r = topo.ping_stats("hostA", t.HOST_B, count=3, interval=0.05)
        assert r["received"] == 3 and r["rtt_min"] < 15, r["stdout"]
        topo.start_impair()  # restartable; teardown must end it
        proc = topo.impair_proc
        assert topo.wait_ping("hostA", t.HOST_B, deadline=5) is not None
    finally:
        prefix = topo.prefix
        topo.teardown()
    assert proc is not None and proc.poll() is not None
    assert not sock_dir.exists()
    assert not t.leftover_namespaces(prefix)


@netns
@needs_netns
def test_failed_setup_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    topo = t.Topology(impair=True)

    def boom(self: t.Topology) -> None:
        raise subprocess.SubprocessError("injected failure while building imp")

    monkeypatch.setattr(t.Topology, "_setup_imp", boom)
    with pytest.raises(subprocess.SubprocessError):
        topo.setup()
    assert not t.leftover_namespaces(topo.prefix)

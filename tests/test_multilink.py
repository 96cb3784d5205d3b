"""Multi-link gateways (issue 8) end to end: gwA reaches the router over two underlay links.

    hostA -- gwA ==wan0 (IPv4 only)== ul-a  router ==== gwB -- hostB
                 ==wan1 (IPv6 only)== ul-a6

gwA's ``links`` are "v4" (tls:// to 198.19.0.1, bound to wan0) and "v6" (to
[2001:db8:ff01::1], bound to gwA's address there), both through the real daemons, with
heartbeats every 0.25 s and a link down after 1 s of silence.  The failover transfers use
tls:// on one link and kcp:// on the other, so both transports lose and take over flows;
the aggregation and the backup tests use tls:// on both (the rate limit then shapes the
same kind of traffic on both links).

* a 50 MB transfer hostA -> hostB keeps its SHA-256 while the link carrying it is taken
  down (the flow moves to the other link) and brought back (the flow returns);
* the same while both links flap, one after the other, three times each;
* with tc tbf at 50 Mbit/s on both ends of both links, 8 parallel iperf3 streams get at
  least 1.6 times what they get with one link down, in both directions, and with one link
  down still at least 0.7 of the 50 Mbit/s;
* a backup link carries heartbeats only while the primary is up, and traffic within 2 s
  of the primary going down.

Flows are spread by a hash of their 5-tuple, so 8 streams all land on one link with
probability 2/2^8.  The aggregation test reads gwA's per-interface byte counters: when one
link carried (almost) nothing, the run is repeated with new ephemeral ports (at most
twice), and a third such run fails the test (the flows are not being spread at all).

Needs root, iproute2, ping, tc and iperf3.  Everything is removed again, also on failure.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

try:
    import topology as t
    from test_e2e import Vpn, keys, running_vpn  # noqa: F401
except ImportError:
    from tests import topology as t
    from tests.test_e2e import Vpn, keys, running_vpn  # noqa: F401

_ok, _reason = t.daemons_ready()
for _tool in ("tc", "iperf3"):
    if _ok and shutil.which(_tool) is None:
        _ok, _reason = False, f"'{_tool}' not found"
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

MIB = 1 << 20
SIZE = 50 * MIB
# link name -> (gwA interface, router interface)
IFS = {name: (gw_if, r_if) for name, (_, gw_if, r_if) in t.ML_LINKS.items()}
GW_IFS = [gw_if for gw_if, _ in IFS.values()]
LINK_OF = {gw_if: name for name, (gw_if, _) in IFS.items()}
RATE_MBIT = 50
STREAMS = 8
IPERF_SECONDS = 6
# a share below this means no flow took the link
MIN_SHARE = 0.1
# what a backup link may carry while its primary is up: heartbeats (4 a second each way,
# ~100 bytes on the wire with TCP and TLS) and their ACKs, for the few seconds measured
BACKUP_IDLE_BYTES = 64 * 1024

TLS_KCP = [t.ml_link("v4"), t.ml_link("v6", "kcp")]
TLS_TLS = [t.ml_link("v4"), t.ml_link("v6")]
WITH_BACKUP = [t.ml_link("v4"), t.ml_link("v6", backup=True)]


@pytest.fixture(scope="module")
def vpn(tmp_path_factory, keys):  # noqa: F811 - the keys fixture imported above
    work = tmp_path_factory.mktemp("multilink")
    with running_vpn(
        work,
        keys,
        router=t.ml_router_config(keys, stats_interval=1),
        gw_a=t.ml_gateway_config(keys, TLS_KCP, stats_interval=1),
        dual_uplink=True,
    ) as v:
        _wait_links(v, ["v4", "v6"])
        yield v


# ------------------------------------------------------------------------------- helpers
def _gw_log(vpn: Vpn) -> Path:
    return vpn.gw["gwA"].log_path


def _link_lines(vpn: Vpn, what: str, name: str) -> int:
    """gwA's log lines saying link ``name`` went ``what`` ("up" or "down")."""
    return t.count_log_lines(_gw_log(vpn), f'msg="link {what}"', f" link={name} ")


def _wait_link_event(vpn: Vpn, what: str, name: str, count: int, timeout: float = 15) -> None:
    t.wait_log_lines(_gw_log(vpn), count, f'msg="link {what}"', f" link={name} ",
                     timeout=timeout, why=f"gwA: link {name} {what} (#{count})")


def _wait_links(vpn: Vpn, names: list[str]) -> None:
    for name in names:
        _wait_link_event(vpn, "up", name, 1)
    assert vpn.wait_ping("hostA", t.HOST_B, deadline=15) is not None, vpn.logs()


def use_links(vpn: Vpn, tag: str, links: list[dict]) -> None:
    """gwA running with ``links`` (restarted unless it runs with them already), every link
    up and the tunnel passing pings."""
    cfg = t.ml_gateway_config(vpn.keys, links, stats_interval=1)
    current = json.loads(Path(vpn.gw_cfg["gwA"]).read_text())
    if current == cfg and vpn.gw["gwA"].poll() is None:
        return
    vpn.gw_cfg["gwA"] = t.write_json(vpn.work / f"gateway-a-{tag}.json", cfg)
    vpn.stop_gateway("gwA")
    vpn.start_gateway("gwA")
    _wait_links(vpn, [link["name"] for link in links])


def _tx(vpn: Vpn, ifname: str) -> int:
    return vpn.topo.if_bytes("gwA", ifname)[1]


def _wait_tx_growth(vpn: Vpn, ifname: str, grow: int, timeout: float, why: str) -> None:
    start = _tx(vpn, ifname)
    deadline = time.monotonic() + timeout
    while _tx(vpn, ifname) - start < grow:
        assert time.monotonic() < deadline, f"{why}: {ifname} did not send {grow} bytes\n" \
            f"{vpn.logs()}"
        time.sleep(0.1)


def _wait_sent(x: t.BackgroundTransfer, size: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while x.sent() < size:
        assert x.running() and time.monotonic() < deadline, "the transfer did not get going"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- failover
def test_transfer_survives_its_link_going_down_and_back(vpn):
    use_links(vpn, "tls-kcp", TLS_KCP)
    x = vpn.topo.start_transfer("hostA", "hostB", t.HOST_B, SIZE, rate=5 * MIB, timeout=60)
    _wait_sent(x, 4 * MIB)
    carrier, grown = vpn.topo.busiest_link("gwA", GW_IFS)
    other = next(i for i in GW_IFS if i != carrier)
    name = LINK_OF[carrier]
    assert grown[carrier] > 512 * 1024, f"no link carries the transfer: {grown}"
    downs, ups = _link_lines(vpn, "down", name), _link_lines(vpn, "up", name)
    vpn.topo.link_down("gwA", carrier)
    try:
        _wait_link_event(vpn, "down", name, downs + 1, timeout=10)
        # the flow left the dead link for the other one
        _wait_tx_growth(vpn, other, 2 * MIB, 10, f"after {carrier} went down")
    finally:
        vpn.topo.link_up("gwA", carrier)
    _wait_link_event(vpn, "up", name, ups + 1, timeout=20)
    assert x.sent() < SIZE - 4 * MIB, "the transfer ended before the link came back"
    # and comes back to its own link
    _wait_tx_growth(vpn, carrier, 2 * MIB, 10, f"after {carrier} came back")
    res = x.result()
    assert res["ok"], f"transfer across the link failure failed: {res}\n{vpn.logs()}"
    print(f"{name} ({carrier}) down and back during 50 MB: {res['sent']['seconds']:.1f} s")


def test_transfer_survives_both_links_flapping(vpn):
    use_links(vpn, "tls-kcp", TLS_KCP)
    # 3 MiB/s: the 50 MB outlast the flapping (about 12.5 s) whatever the stalls
    x = vpn.topo.start_transfer("hostA", "hostB", t.HOST_B, SIZE, rate=3 * MIB, timeout=60)
    _wait_sent(x, 2 * MIB)
    downs = {name: _link_lines(vpn, "down", name) for name in IFS}
    # Three cuts of 1.3 s (longer than link_timeout) per link, the links taking turns with
    # 0.7 s between one coming back and the other going down; v4 cut at gwA, v6 at the
    # router (the cable's other end).
    flappers = [
        vpn.topo.flap("gwA", IFS["v4"][0], times=3, down_s=1.3, up_s=2.7),
        vpn.topo.flap("router", IFS["v6"][1], times=3, down_s=1.3, up_s=2.7, delay=2.0),
    ]
    for f in flappers:
        f.join()
    assert [f.cycles for f in flappers] == [3, 3]
    assert x.sent() < SIZE, "the transfer ended before the flapping did"
    res = x.result()
    assert res["ok"], f"transfer across flapping links failed: {res}\n{vpn.logs()}"
    for name, before in downs.items():
        assert _link_lines(vpn, "down", name) > before, f"gwA never saw {name} down"
    print(f"50 MB across 6 link flaps: {res['sent']['seconds']:.1f} s")


# -------------------------------------------------------------------------- aggregation
def _mbit(data: dict) -> float:
    return data["end"]["sum_received"]["bits_per_second"] / 1e6


def _spread(vpn: Vpn, client: str, server: str, server_addr: str) -> tuple[float, dict]:
    """8 streams over both links; each link's share of the bytes at gwA (what it sent for
    A -> B, what it received for B -> A)."""
    data, shares = vpn.topo.iperf3_spread(client, server, server_addr, "gwA", GW_IFS,
                                          received=client == "hostB", seconds=IPERF_SECONDS,
                                          streams=STREAMS, min_share=MIN_SHARE)
    shares = {LINK_OF[i]: share for i, share in shares.items()}
    assert min(shares.values()) >= MIN_SHARE, (
        f"{client} -> {server}: 3 runs of {STREAMS} streams each, every one on one link "
        f"only: {shares}\n{vpn.logs()}")
    return _mbit(data), shares


def test_aggregation_over_two_rate_limited_links(vpn):
    use_links(vpn, "tls-tls", TLS_TLS)
    topo = vpn.topo
    shaped = [(node, ifname) for pair in IFS.values() for node, ifname in zip(
        ("gwA", "router"), pair, strict=True)]
    v6_downs, v6_ups = _link_lines(vpn, "down", "v6"), _link_lines(vpn, "up", "v6")
    try:
        for node, ifname in shaped:
            topo.rate_limit(node, ifname, RATE_MBIT)
        # A -> B: gwA spreads the flows; B -> A: the router does
        up, up_shares = _spread(vpn, "hostA", "hostB", t.HOST_B)
        down, down_shares = _spread(vpn, "hostB", "hostA", t.HOST_A)
        topo.link_down("gwA", IFS["v6"][0])
        try:
            _wait_link_event(vpn, "down", "v6", v6_downs + 1, timeout=10)
            single = _mbit(topo.iperf3("hostA", "hostB", t.HOST_B, seconds=IPERF_SECONDS,
                                       streams=STREAMS))
        finally:
            topo.link_up("gwA", IFS["v6"][0])
    finally:
        for node, ifname in shaped:
            topo.clear_rate_limit(node, ifname)
    _wait_link_event(vpn, "up", "v6", v6_ups + 1, timeout=20)
    print(f"{STREAMS} streams over two {RATE_MBIT} Mbit/s links: A->B {up:.1f} Mbit/s "
          f"{up_shares}, B->A {down:.1f} Mbit/s {down_shares}; one link: {single:.1f} Mbit/s; "
          f"ratio {up / single:.2f} / {down / single:.2f}")
    assert single >= 0.7 * RATE_MBIT, f"one link gave only {single:.1f} Mbit/s"
    assert up >= 1.6 * single, f"A->B over two links {up:.1f} vs one {single:.1f} Mbit/s"
    assert down >= 1.6 * single, f"B->A over two links {down:.1f} vs one {single:.1f} Mbit/s"


# ------------------------------------------------------------------------------- backup
def _bytes(vpn: Vpn, ifname: str) -> int:
    rx, tx = vpn.topo.if_bytes("gwA", ifname)
    return rx + tx


def _backup_idle_during_transfers(vpn: Vpn) -> None:
    primary, backup = IFS["v4"][0], IFS["v6"][0]
    p0, b0 = _bytes(vpn, primary), _bytes(vpn, backup)
    for src, dst, addr, size in (("hostA", "hostB", t.HOST_B, 16 * MIB),
                                 ("hostB", "hostA", t.HOST_A, 8 * MIB)):
        res = vpn.topo.transfer(src, dst, addr, size, timeout=60)
        assert res["ok"], f"{src} -> {dst} with a backup link failed: {res}\n{vpn.logs()}"
    p, b = _bytes(vpn, primary) - p0, _bytes(vpn, backup) - b0
    assert p >= 24 * MIB, f"the primary carried only {p} bytes"
    assert b < BACKUP_IDLE_BYTES, f"the backup carried {b} bytes while the primary was up"


def test_backup_link_idle_until_the_primary_fails(vpn):
    use_links(vpn, "backup", WITH_BACKUP)
    primary, backup = IFS["v4"][0], IFS["v6"][0]
    _backup_idle_during_transfers(vpn)

    v4_ups = _link_lines(vpn, "up", "v4")
    b0 = _bytes(vpn, backup)
    # 1000-byte pings every 0.1 s for 6 s, the primary cut 1.5 s in
    cut = vpn.topo.cut_during_pings("hostA", t.HOST_B, "gwA", [primary], seconds=6,
                                    interval=0.1)
    assert any(r.sent < cut.at for r in cut.replies), f"no pings before the cut\n{vpn.logs()}"
    print(f"primary down: pings flow again over the backup after {cut.recovery} s; "
          f"{len(cut.after())} replies after the cut")
    assert cut.recovery is not None, f"no ping got through after the cut\n{vpn.logs()}"
    assert cut.recovery <= 2.0, f"traffic took {cut.recovery:.2f} s to move to the backup\n" \
        f"{vpn.logs()}"
    # the pings after the move, both ways, crossed the backup
    assert _bytes(vpn, backup) - b0 > 2 * 1000 * len(cut.after()) * 0.9
    assert len(cut.after()) >= 25, f"pings stopped again: {len(cut.after())} after the cut"

    # the primary back: traffic leaves the backup again
    _wait_link_event(vpn, "up", "v4", v4_ups + 1, timeout=20)
    _backup_idle_during_transfers(vpn)


# ----------------------------------------------------------------------------- reload
def test_reload_changes_the_links_in_place(vpn):
    """SIGHUP with other links: the backup v6 gives way to a primary v6b on the same uplink
    (one link closed, one added) while v4 and the process stay, and v6b takes flows."""
    from test_reload_e2e import _reloaded

    use_links(vpn, "backup", WITH_BACKUP)
    proc, log = vpn.gw["gwA"], _gw_log(vpn)
    v4_downs = _link_lines(vpn, "down", "v4")
    renamed = [t.ml_link("v4"), {**t.ml_link("v6"), "name": "v6b"}]
    t.write_json(vpn.gw_cfg["gwA"], t.ml_gateway_config(vpn.keys, renamed, stats_interval=1))
    changes = _reloaded(proc, log)
    assert any("change=\"closed link v6\"" in c for c in changes), changes
    assert any("change=\"added link v6b\"" in c for c in changes), changes
    assert not any("restart" in c for c in changes), changes
    _wait_link_event(vpn, "up", "v6b", 1)
    assert vpn.router is not None
    router_log = vpn.router.log_path  # type: ignore[attr-defined]
    t.wait_log_lines(router_log, 1, "event=registered", " link=v6b ", "backup=false",
                     timeout=10, why="router: v6b registered as a primary link")
    # the same process, v4 never went down, and both links carry flows again
    assert proc.poll() is None and vpn.gw["gwA"] is proc
    assert _link_lines(vpn, "down", "v4") == v4_downs
    _, shares = vpn.topo.iperf3_spread("hostA", "hostB", t.HOST_B, "gwA", GW_IFS, seconds=2,
                                       streams=STREAMS, min_share=MIN_SHARE)
    assert min(shares.values()) >= MIN_SHARE, f"a link carried no flow: {shares}"

    # a new weight: that link registers again with it, the other stays as it is
    renamed[1]["weight"] = 3
    t.write_json(vpn.gw_cfg["gwA"], t.ml_gateway_config(vpn.keys, renamed, stats_interval=1))
    changes = _reloaded(proc, log)
    assert any("reconnecting link v6b" in c for c in changes), changes
    t.wait_log_lines(router_log, 1, "event=registered", " link=v6b ", "weight=3 ",
                     timeout=10, why="router: v6b registered again with weight 3")
    assert _link_lines(vpn, "down", "v4") == v4_downs
    assert vpn.wait_ping("hostA", t.HOST_B, deadline=10) is not None, vpn.logs()


# ------------------------------------------------------------------ router without it
def test_router_without_multi_link_gets_one_link_at_a_time(vpn):
    """A router that does not take multi-link (PoleVPN's; here ours with multi_link off)
    would let each link's REGISTER replace the other's: gwA uses its links one at a time,
    in order, as route_servers, and nothing is refused or lost."""
    use_links(vpn, "tls-tls", TLS_TLS)
    router_cfg = vpn.router_cfg
    plain = t.ml_router_config(vpn.keys, stats_interval=1, multi_link=False)
    vpn.router_cfg = t.write_json(vpn.work / "config-no-multi-link.json", plain)
    try:
        assert t.Topology.stop(vpn.router, timeout=5) is not None, "router did not stop"
        vpn.stop_gateway("gwA")
        vpn.start_router()
        vpn.start_gateway("gwA")
        log = _gw_log(vpn)
        t.wait_log_lines(log, 1, "does not take multi-link", timeout=20,
                         why="gwA: the router's refusal of multi-link")
        assert vpn.wait_ping("hostA", t.HOST_B, deadline=20) is not None, vpn.logs()
        res = vpn.topo.transfer("hostA", "hostB", t.HOST_B, 4 * MIB, timeout=60)
        assert res["ok"], f"transfer over one link failed: {res}\n{vpn.logs()}"
        # one plain registration, over the first link, and no replacing back and forth
        assert vpn.router is not None
        router_log = vpn.router.log_path  # type: ignore[attr-defined]
        regs = t.log_lines(router_log, "event=registered", "gateway=169.254.0.1 ")
        assert len(regs) == 1 and " link=" not in regs[0], regs
        assert f"peer={t.GW_A_UL}:" in regs[0] or f"peer=::ffff:{t.GW_A_UL}:" in regs[0], regs
        assert t.count_log_lines(router_log, "re-registered") == 0
        assert t.count_log_lines(log, "link down") == 0
    finally:
        # the module's other tests run against the multi-link router
        vpn.router_cfg = router_cfg
        t.Topology.stop(vpn.router, timeout=5)
        vpn.stop_gateway("gwA")
        vpn.start_router()
        vpn.start_gateway("gwA")
        _wait_links(vpn, ["v4", "v6"])

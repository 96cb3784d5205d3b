"""Scale of a cluster (issue 17): 2000 protocol-level gateways spread over two router
processes that share their routes through a real etcd.

Both routers (tls:// on fixed loopback ports, a router link between them) and every gateway
run in the etcd fixture's namespace (tests/etcd.py), so nothing here needs a Topology: the
routers are started with ``ip netns exec`` into it, the gateways (``tests/protoclient.py``)
connect from a thread that joined it, each from its own loopback source address. Gateway
i registers 169.254.x.y and one /28 of 198.18.0.0/15, at r1 when i is even and at r2 when
odd; then it sends one packet to gateway i+1 (at the other router: across the router link)
and one to gateway i+2 (at its own router).

Checked: every gateway received exactly its two packets, from those two senders, and
nothing else; each router's peak RSS (VmHWM) stays under RSS_LIMIT_MB; etcd holds exactly
one key per registered network and gateway address (and one per router), each under its
router's prefix, and none once the gateways are gone. Also ``make cluster-bench`` runs it;
N_CLUSTER_GATEWAYS in the environment sets another count.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from pathlib import Path
from typing import Any

import etcd as etcd_fixture
import pytest
import uvloop
from protoclient import ProtoClient, RouterProcess, router_config, udp_packet
from test_cluster_store import keys_under

from polevpn.keygen import generate

_ok, _reason = etcd_fixture.have_etcd()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

N = int(os.environ.get("N_CLUSTER_GATEWAYS", 2000))
RSS_LIMIT_MB = 150
CLUSTER = "scale"
PEER_KEY = "a-cluster-credential-for-the-scale-test"
# fixed ports: the routers are alone in the etcd namespace, and peer_address must be known
PORTS = {"r1": 4431, "r2": 4432}
METRICS = {"r1": 9101, "r2": 9102}
CONNECTING = 100  # gateways connecting at once


def router_of(i: int) -> str:
    return "r1" if i % 2 == 0 else "r2"


def gateway_addr(i: int) -> str:
    return f"169.254.{1 + i // 250}.{1 + i % 250}"


def source_addr(i: int) -> str:
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


def net4(i: int) -> str:
    return f"198.18.{i // 16}.{(i % 16) * 16}/28"


def host4(i: int) -> str:
    a, b, c, d = net4(i).split("/")[0].split(".")
    return f"{a}.{b}.{c}.{int(d) + 1}"


def cluster_router_config(keys: Any, rid: str, endpoints: list[str]) -> dict:
    cfg = router_config(
        keys,
        idle_timeout=300,
        auth_timeout=120,
        stats_interval=1,
        metrics_listen=f"127.0.0.1:{METRICS[rid]}",
        # every source is in 127.0.x.0/24: the per-network shares are off with the
        # per-source cap, as in test_load
        limits={
            "max_pending": 1024,
            "max_pending_per_source": 1024,
            "max_pending_share_per_net": 1,
            "max_pending_share_per_site": 1,
        },
        cluster={
            "name": CLUSTER,
            "router_id": rid,
            "etcd": {"endpoints": endpoints},
            "peer_address": f"127.0.0.1:{PORTS[rid]}",
            "peer_key": PEER_KEY,
        },
    )
    cfg["tls"]["listen"] = f"127.0.0.1:{PORTS[rid]}"
    cfg["kcp"]["enable"] = False
    return cfg


_SAMPLE = re.compile(r"^(\w+(?:\{[^}]*\})?) (\S+)$", re.M)


async def metrics(port: int) -> dict[str, float]:
    """The router's /metrics: sample (with its labels, as written) -> value (from this
    event loop's thread: it is the one inside the namespace)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        body = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return {m[1]: float(m[2]) for m in _SAMPLE.finditer(body.decode(errors="replace"))}


async def until(check: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not await check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


def run_scale(etcd: Any, workdir: Path, n: int = N) -> dict[str, Any]:
    """The whole scenario; its figures (also for tests/bench_cluster.py). Raises
    AssertionError when a check fails; the routers are ended by their PIDs in any case."""
    keys = generate(workdir / "keys")
    key = keys.shared_key.read_text().strip()
    routers: dict[str, RouterProcess] = {}
    try:
        for rid in ("r1", "r2"):
            cfg = cluster_router_config(keys, rid, etcd.endpoints)
            routers[rid] = RouterProcess.start(cfg, workdir, name=rid, netns=etcd.ns)
        out: dict[str, Any] = {}
        etcd.call(lambda: uvloop.run(asyncio.wait_for(_scenario(etcd, routers, key, n, out),
                                                      600)), timeout=660)
        return out
    except BaseException:
        for rid, r in routers.items():
            print(f"{rid} log tail:\n{r.log_path.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        for r in routers.values():
            r.stop()


async def _scenario(
    etcd: Any, routers: dict[str, RouterProcess], key: str, n: int, out: dict[str, Any]
) -> None:
    t_start = time.monotonic()
    half = {rid: sum(1 for i in range(n) if router_of(i) == rid) for rid in routers}

    async def linked() -> bool:
        try:
            m = [await metrics(METRICS[rid]) for rid in routers]
        except OSError:  # the metrics listener comes up just after the tls one
            return False
        r1, r2 = m
        return (r1.get('polevpn_cluster_peer_link_up{router="r2"}') == 1
                and r2.get('polevpn_cluster_peer_link_up{router="r1"}') == 1)

    await until(linked, 20, "the router link")
    rss_idle = {rid: r.rss_kb() for rid, r in routers.items()}

    sem = asyncio.Semaphore(CONNECTING)

    async def connect(i: int) -> ProtoClient:
        async with sem:
            c = await ProtoClient.connect_tls(
                "127.0.0.1", PORTS[router_of(i)], source=source_addr(i), name=f"gw{i}",
                timeout=60,
            )
            await c.login(key, gateway_addr(i), [net4(i)], timeout=60)
            return c

    t0 = time.monotonic()
    gws = list(await asyncio.gather(*(connect(i) for i in range(n))))
    out["connect_s"] = round(time.monotonic() - t0, 1)

    async def converged() -> bool:
        for rid in routers:
            m = await metrics(METRICS[rid])
            other = n - half[rid]
            if m.get("polevpn_router_registered_gateways") != half[rid]:
                return False
            if m.get("polevpn_cluster_remote_routes") != 2 * other:
                return False
        return True

    out["converge_s"] = round(await until(converged, 120, "every route at both routers"), 1)

    # etcd: a key per network and per gateway address, under the router that has them
    keys = await asyncio.to_thread(keys_under, etcd, f"/polevpn/{CLUSTER}/")
    out["etcd_keys"] = len(keys)
    want = {f"/polevpn/{CLUSTER}/routers/{rid}" for rid in routers}
    for i in range(n):
        want.add(f"/polevpn/{CLUSTER}/routes/{router_of(i)}/{gateway_addr(i)}/32")
        want.add(f"/polevpn/{CLUSTER}/routes/{router_of(i)}/{net4(i)}")
    assert set(keys) == want, (len(keys), len(want), sorted(set(keys) ^ want)[:10])

    # one packet across the router link and one through the own router, each gateway
    t0 = time.monotonic()
    for i, g in enumerate(gws):
        g.send_packets([
            udp_packet(host4(i), host4((i + 1) % n), i, 0),
            udp_packet(host4(i), host4((i + 2) % n), i, 1),
        ])  # fmt: skip
        if i % 100 == 99:
            await asyncio.sleep(0)

    async def delivered() -> bool:
        return sum(g.recv.packets for g in gws) >= 2 * n

    with contextlib.suppress(AssertionError):  # what is missing is listed below
        await until(delivered, 30, "every packet delivered")
    out["deliver_s"] = round(time.monotonic() - t0, 2)
    problems = []
    for i, g in enumerate(gws):
        want_from = {(i - 1) % n: 1, (i - 2) % n: 1}
        if dict(g.recv.by_sender) != want_from or g.recv.misdelivered:
            problems.append(f"gw{i}: {dict(g.recv.by_sender)} misdelivered {g.recv.misdelivered}")
    out["received"] = sum(g.recv.packets for g in gws)
    assert not problems, f"{len(problems)} gateways without their packets: {problems[:10]}"

    status = {rid: r.status() for rid, r in routers.items()}
    out["rss_idle_mb"] = {rid: round(kb / 1024, 1) for rid, kb in rss_idle.items()}
    out["rss_mb"] = {rid: round(s["VmRSS"] / 1024, 1) for rid, s in status.items()}
    out["hwm_mb"] = {rid: round(s["VmHWM"] / 1024, 1) for rid, s in status.items()}
    out["cpu_s"] = {rid: round(r.cpu_seconds(), 1) for rid, r in routers.items()}
    for rid, s in status.items():
        assert s["VmHWM"] < RSS_LIMIT_MB * 1024, (rid, out)

    # the gateways gone: their keys go with them
    for g in gws:
        g.close()
    t0 = time.monotonic()

    async def withdrawn() -> bool:
        left = await asyncio.to_thread(keys_under, etcd, f"/polevpn/{CLUSTER}/routes/")
        return not left

    await until(withdrawn, 60, "every route key withdrawn")
    out["withdraw_s"] = round(time.monotonic() - t0, 1)
    out["total_s"] = round(time.monotonic() - t_start, 1)


def test_2000_gateways_on_two_routers(tmp_path: Path) -> None:
    with etcd_fixture.Etcd() as etcd:
        out = run_scale(etcd, tmp_path)
    print(f"{N} gateways on two routers: {out}")

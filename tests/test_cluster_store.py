"""The cluster store adapter (polevpn/cluster/store.py) against a real etcd (Debian's
etcd-server in a namespace of its own, tests/etcd.py): keys under a lease, a second router's
watch, the store lost and back, compaction.

Each test runs its asyncio code in a thread inside the etcd namespace (``Etcd.call``); two
"routers" are two ClusterStore instances with their own ClusterState and remote tables.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import etcd as etcd_fixture
import pytest
from test_cluster_state import FakeRemoteRoutes, Route

from polevpn.cluster.etcd import EtcdUnavailable
from polevpn.cluster.keys import Layout, RouterInfo
from polevpn.cluster.state import CONNECTED, LOST, ClusterState
from polevpn.cluster.store import ClusterStore, wait_connected
from polevpn.config import ClusterConfig

_ok, _reason = etcd_fixture.have_etcd()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

GW1 = "169.254.0.1"
NET1 = ipaddress.ip_network("198.18.10.0/24")
NET1B = ipaddress.ip_network("198.18.11.0/24")
GW2 = "169.254.0.2"
NET2 = ipaddress.ip_network("198.18.20.0/24")


@pytest.fixture(scope="module")
def etcd() -> Any:
    with etcd_fixture.Etcd() as e:
        yield e


def cfg(endpoints: list[str], router_id: str, name: str, ttl: int = 2) -> ClusterConfig:
    return ClusterConfig(
        name=name,
        router_id=router_id,
        etcd_endpoints=tuple(endpoints),
        peer_address=(f"198.18.0.{router_id[-1]}", 443),
        peer_key="k" * 20,
        lease_ttl=ttl,
    )


class Node:
    """One router's cluster side: state, remote table, store."""

    def __init__(self, c: ClusterConfig) -> None:
        self.remote = FakeRemoteRoutes()
        me = RouterInfo(c.peer_address, time.time(), "test")
        self.state = ClusterState(Layout(c.prefix, c.name), c.router_id, me, self.remote, Route)
        self.store = ClusterStore(c, self.state)

    def add(self, gateway: str, *nets: Any) -> None:
        host = ipaddress.ip_network(gateway)
        self.state.set_gateway(gateway, gateway, [host, *nets])
        self.store.kick()


def in_etcd(etcd: Any, fn: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    etcd.call(lambda: asyncio.run(fn()), timeout=timeout)


async def until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def keys_under(etcd: Any, prefix: str) -> dict[str, int]:
    """key -> lease, as etcd has them (read from outside the code under test)."""
    p = prefix.encode()
    end = p[:-1] + bytes([p[-1] + 1])
    reply = etcd.request(
        "/v3/kv/range",
        {"key": base64.b64encode(p).decode(), "range_end": base64.b64encode(end).decode()},
    )
    return {
        base64.b64decode(kv["key"]).decode(): int(kv.get("lease", 0))
        for kv in reply.get("kvs", [])
    }


def test_keys_under_a_lease_seen_by_another_router_and_gone_on_stop(etcd: Any) -> None:
    # a TTL well above the time allowed for the keys to go: gone by the revoke, not expired
    c1, c2 = cfg(etcd.endpoints, "r1", "t1", ttl=6), cfg(etcd.endpoints, "r2", "t1")
    seen: dict[str, Any] = {}

    async def run() -> None:
        a, b = Node(c1), Node(c2)
        a.add(GW1, NET1)
        a.store.start()
        b.store.start()
        assert await wait_connected(a.store, 5) and await wait_connected(b.store, 5)
        await until(lambda: ("r1", str(NET1)) in b.remote.flat(), 3, "r2 sees r1's route")
        seen["keys"] = await asyncio.to_thread(keys_under, etcd, "/polevpn/t1/")
        assert b.state.routers["r1"].info is not None
        assert b.state.routers["r1"].info.peer_address == ("198.18.0.1", 443)
        # a network added, and a gateway gone: the other router follows
        a.add(GW1, NET1, NET1B)
        await until(lambda: ("r1", str(NET1B)) in b.remote.flat(), 3, "the new network")
        a.state.drop_gateway(GW1)
        a.store.kick()
        await until(lambda: not b.remote.by_router.get("r1"), 3, "r1's routes withdrawn")
        assert "r1" in b.state.routers  # its router key stays
        a.add(GW1, NET1)
        await until(lambda: ("r1", str(NET1)) in b.remote.flat(), 3, "r1's route back")
        # a clean stop revokes the lease: gone at once, not after the TTL
        await a.store.stop()
        await until(lambda: "r1" not in b.state.routers, 3.0, "r1 gone")
        assert b.remote.flat() == {}
        await b.store.stop()

    in_etcd(etcd, run)
    lease = seen["keys"]["/polevpn/t1/routers/r1"]
    assert lease != 0
    assert seen["keys"] == {
        "/polevpn/t1/routers/r1": lease,
        "/polevpn/t1/routers/r2": seen["keys"]["/polevpn/t1/routers/r2"],
        f"/polevpn/t1/routes/r1/{GW1}/32": lease,
        f"/polevpn/t1/routes/r1/{NET1}": lease,
    }
    assert keys_under(etcd, "/polevpn/t1/") == {}


def test_a_router_that_dies_has_its_keys_expire_with_the_lease(etcd: Any) -> None:
    """No revoke (a router killed): its keys go when the lease's TTL runs out, and the
    other router drops its routes then."""
    c1, c2 = cfg(etcd.endpoints, "r1", "t2", ttl=2), cfg(etcd.endpoints, "r2", "t2")

    async def run() -> None:
        a, b = Node(c1), Node(c2)
        a.add(GW1, NET1)
        a.store.start()
        b.store.start()
        await until(lambda: ("r1", str(NET1)) in b.remote.flat(), 5, "r2 sees r1")
        await a.store.stop(revoke=False)  # no more keepalives, as after SIGKILL
        t = await until(lambda: "r1" not in b.state.routers, 6, "r1's lease expired")
        assert 1.0 < t < 4.0, t
        assert b.remote.flat() == {}
        await b.store.stop()

    in_etcd(etcd, run)


def test_store_lost_keeps_routes_then_resyncs_and_rewrites_after_the_lease_expired() -> None:
    """etcd stopped for longer than the lease: both routers keep what they knew (stale);
    a gateway registered at r1 meanwhile is seen by r2 once etcd is back, and r1's keys,
    which expired with its lease, are written again under a new one."""
    with etcd_fixture.Etcd() as etcd:
        c1, c2 = cfg(etcd.endpoints, "r1", "t3", ttl=2), cfg(etcd.endpoints, "r2", "t3")
        nodes: dict[str, Node] = {}

        async def start() -> None:
            a, b = Node(c1), Node(c2)
            nodes.update(a=a, b=b)
            a.add(GW1, NET1)
            b.add(GW2, NET2)
            a.store.start()
            b.store.start()
            await until(lambda: ("r1", str(NET1)) in b.remote.flat(), 5, "r2 sees r1")
            await until(lambda: ("r2", str(NET2)) in a.remote.flat(), 5, "r1 sees r2")
            etcd.stop()
            await until(lambda: a.state.store == LOST and b.state.store == LOST, 5, "lost")
            await asyncio.sleep(3)  # longer than the lease
            # nothing withdrawn: forwarding goes on with what is known
            assert ("r1", str(NET1)) in b.remote.flat()
            assert ("r2", str(NET2)) in a.remote.flat()
            assert a.state.stale and a.state.router_state(a.state.routers["r2"]) == "stale"
            a.add("169.254.0.3", ipaddress.ip_network("198.18.30.0/24"))
            await asyncio.to_thread(etcd.start)
            await until(lambda: ("r1", "198.18.30.0/24") in b.remote.flat(), 10, "meanwhile")
            assert a.state.store == CONNECTED and not b.state.stale
            assert ("r1", str(NET1)) in b.remote.flat()
            assert ("r2", str(NET2)) in a.remote.flat()
            # every key of r1's under the lease it holds now (etcd extends leases across its
            # own restart; one that lapsed meanwhile is granted anew and the keys rewritten)
            keys = await asyncio.to_thread(keys_under, etcd, "/polevpn/t3/routes/r1/")
            assert keys == {
                f"/polevpn/t3/routes/r1/{n}": a.store.lease
                for n in (f"{GW1}/32", NET1, "169.254.0.3/32", "198.18.30.0/24")
            }
            await a.store.stop()
            await b.store.stop()

        in_etcd(etcd, start)


def test_a_compacted_watch_resyncs(etcd: Any) -> None:
    """r2's watch breaks; while it is away r1 writes and etcd compacts past r2's revision:
    the watch cannot resume, r2 reads a new snapshot and sees r1's route."""
    c1, c2 = cfg(etcd.endpoints, "r1", "t4"), cfg(etcd.endpoints, "r2", "t4")

    async def run() -> None:
        a, b = Node(c1), Node(c2)
        real_watch = b.store.client.watch
        broken = asyncio.Event()
        release = asyncio.Event()

        async def watch(prefix: bytes, start: int) -> AsyncIterator[Any]:
            if broken.is_set():
                await release.wait()
            async for batch in real_watch(prefix, start):
                yield batch
                if broken.is_set() and not release.is_set():
                    raise EtcdUnavailable("broken by the test")

        b.store.client.watch = watch  # type: ignore[method-assign]
        a.store.start()
        b.store.start()
        await until(lambda: "r1" in b.state.routers, 5, "r2 sees r1")
        broken.set()
        a.add(GW1, NET1)  # the event that breaks r2's watch
        await until(lambda: b.store.stats.watch_restarts == 1, 3, "r2's watch broke")
        # two revisions on, so that the one r2 resumes from is compacted
        a.add(GW1, NET1, NET1B)
        await until(lambda: a.state.pending() == ({}, []), 3, "r1 wrote")
        a.add(GW1, NET1, NET1B, NET2)
        await until(lambda: a.state.pending() == ({}, []), 3, "r1 wrote again")
        revision, _ = await a.store.client.snapshot(b"/polevpn/t4/")
        await a.store.client.compact(revision)
        release.set()
        await until(lambda: ("r1", str(NET2)) in b.remote.flat(), 5, "r2 resynced")
        assert ("r1", str(NET1B)) in b.remote.flat()
        assert b.store.stats.compactions == 1 and b.store.stats.watch_restarts == 1
        assert b.state.revision >= revision
        await a.store.stop()
        await b.store.stop()

    in_etcd(etcd, run)


def test_three_members_one_lost_is_no_outage_two_lost_is() -> None:
    """With three members, the member in use stopped or frozen moves the router to another
    at once (never "lost", routes kept); two of three stopped (no quorum) is the store lost,
    and it is back when they are."""
    with etcd_fixture.Etcd(members=3) as etcd:
        c1 = cfg(etcd.endpoints, "r1", "t5", ttl=3)
        c2 = cfg(list(reversed(etcd.endpoints)), "r2", "t5", ttl=3)

        async def run() -> None:
            a, b = Node(c1), Node(c2)
            a.add(GW1, NET1)
            a.store.start()
            b.store.start()
            await until(lambda: ("r1", str(NET1)) in b.remote.flat(), 5, "r2 sees r1")
            assert a.store.endpoint == etcd.endpoint(0)
            await asyncio.to_thread(etcd.stop_member, 0)
            await until(lambda: a.store.endpoint != etcd.endpoint(0)
                        and a.state.store == CONNECTED, 5, "r1 on another member")  # fmt: skip
            a.add(GW1, NET1, NET1B)
            await until(lambda: ("r1", str(NET1B)) in b.remote.flat(), 5, "a change goes on")
            # a frozen member (its sockets open, no answer): the keepalive times out
            in_use = etcd.endpoints.index(b.store.endpoint)
            etcd.pause_member(in_use)
            try:
                await until(lambda: b.store.endpoint != etcd.endpoint(in_use)
                            and b.store.stats.errors >= 1 and b.state.store == CONNECTED,
                            6, "r2 off the frozen member")  # fmt: skip
            finally:
                etcd.resume_member(in_use)
            assert a.store.stats.lost == 0 and b.store.stats.lost == 0
            assert ("r1", str(NET1)) in b.remote.flat()
            # no quorum: lost, routes kept
            await asyncio.to_thread(etcd.stop_member, 1)
            await asyncio.to_thread(etcd.stop_member, 2)
            await until(lambda: a.state.store == LOST and b.state.store == LOST, 10, "lost")
            assert ("r1", str(NET1B)) in b.remote.flat() and b.state.stale
            await asyncio.to_thread(etcd.start)
            await until(lambda: a.state.store == CONNECTED and b.state.store == CONNECTED
                        and not b.state.stale, 15, "back")  # fmt: skip
            assert ("r1", str(NET1B)) in b.remote.flat()
            await a.store.stop()
            await b.store.stop()

        in_etcd(etcd, run, timeout=90)


def test_a_lease_revoked_under_a_running_router_is_replaced_without_an_outage(etcd: Any) -> None:
    """The lease gone while etcd answers (revoked from outside, or expired through a long
    pause): a new one at once, every key written again, and no "store lost"."""
    c1, c2 = cfg(etcd.endpoints, "r1", "t6", ttl=3), cfg(etcd.endpoints, "r2", "t6")

    async def run() -> None:
        a, b = Node(c1), Node(c2)
        a.add(GW1, NET1)
        a.store.start()
        b.store.start()
        await until(lambda: ("r1", str(NET1)) in b.remote.flat(), 5, "r2 sees r1")
        old = a.store.lease
        await b.store.client.lease_revoke(old)
        await until(lambda: a.store.lease not in (0, old) and a.state.pending() == ({}, []),
                    5, "a new lease, keys rewritten")  # fmt: skip
        await until(lambda: ("r1", str(NET1)) in b.remote.flat(), 3, "r1's route back")
        assert a.store.stats.leases_lost == 1 and a.store.stats.lost == 0
        assert a.state.store == CONNECTED
        keys = await asyncio.to_thread(keys_under, etcd, "/polevpn/t6/routes/r1/")
        assert set(keys.values()) == {a.store.lease}
        await a.store.stop()
        await b.store.stop()

    in_etcd(etcd, run)

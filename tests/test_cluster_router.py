"""A router with a ``cluster`` section against a real etcd (tests/etcd.py), in process: what
it publishes as gateways come and go, what it refuses because another router holds it, its
keys gone when it stops, and the section added, changed and removed by a reload.

The router and its protocol-level gateways run in a thread inside the etcd namespace. The
remote route table is the test's (the agreed RemoteRoutes interface, as a fake): these tests
are about the store side, not forwarding.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from pathlib import Path
from typing import Any

import etcd as etcd_fixture
import pytest
import uvloop
from test_cluster_state import FakeRemoteRoutes, Route
from test_cluster_store import keys_under, until
from test_router_loopback import KEY, ProtoGateway, frame, router_config

from polevpn.cluster import member as member_mod
from polevpn.config import ClusterConfig
from polevpn.keygen import generate
from polevpn.router.router import Router

_ok, _reason = etcd_fixture.have_etcd()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

PEER_KEY = "p" * 24


@pytest.fixture(scope="module")
def etcd() -> Any:
    with etcd_fixture.Etcd() as e:
        yield e


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return generate(tmp_path_factory.mktemp("keys"))


@pytest.fixture(autouse=True)
def fake_remote(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeRemoteRoutes]:
    made: dict[str, FakeRemoteRoutes] = {}

    def remote_routes(table: Any, router_id: str) -> tuple[FakeRemoteRoutes, type]:
        made[router_id] = FakeRemoteRoutes()
        return made[router_id], Route

    monkeypatch.setattr(member_mod, "_remote_routes", remote_routes)
    return made


def cluster(etcd: Any, name: str, **kw: Any) -> ClusterConfig:
    args: dict[str, Any] = dict(
        name=name,
        router_id="r1",
        etcd_endpoints=tuple(etcd.endpoints),
        peer_address=("198.18.0.1", 443),
        peer_key=PEER_KEY,
        lease_ttl=2,
    )
    args.update(kw)
    return ClusterConfig(**args)


async def gateway(router: Router) -> ProtoGateway:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", router.tls_port, ssl=ctx, server_hostname="polevpn.com"
    )
    return ProtoGateway(reader, writer)


async def register(gw: ProtoGateway, address: str, networks: list[str]) -> tuple[int, bytes]:
    """AUTH and REGISTER; the REGISTER reply's command and body."""
    await gw.send(frame(0, json.dumps({"key": KEY}).encode()))
    await gw.recv_frame()
    body = {"gateway": address, "key": KEY, "network": networks}
    await gw.send(frame(1, json.dumps(body).encode(), 7))
    cmd, _, reply = await gw.recv_frame()
    return cmd, reply


def put_foreign(etcd: Any, name: str, router_id: str, network: str, gateway: str) -> None:
    """Another router's keys, written straight into etcd under a lease of their own."""
    lease = etcd.request("/v3/lease/grant", {"TTL": "60"})["ID"]
    for key, value in (
        (f"/polevpn/{name}/routers/{router_id}", {"peer_address": "198.18.0.2:443",
                                                  "started": 1.0, "version": "x"}),
        (f"/polevpn/{name}/routes/{router_id}/{network}", {"gateway": gateway, "site": gateway}),
    ):
        etcd.request("/v3/kv/put", {
            "key": base64.b64encode(key.encode()).decode(),
            "value": base64.b64encode(json.dumps(value).encode()).decode(),
            "lease": lease,
        })  # fmt: skip


def in_etcd(etcd: Any, fn: Any) -> None:
    etcd.call(lambda: uvloop.run(asyncio.wait_for(fn(), 40)), timeout=60)


def test_router_publishes_refuses_and_withdraws(
    etcd: Any, keys: Any, fake_remote: dict[str, FakeRemoteRoutes]
) -> None:
    put_foreign(etcd, "c1", "r2", "198.18.20.0/24", "169.254.0.2")
    got: dict[str, Any] = {}

    def ours() -> dict[str, int]:
        return keys_under(etcd, "/polevpn/c1/routes/r1/")

    async def scenario() -> None:
        router = Router(router_config(keys, cluster=cluster(etcd, "c1")))
        await router.start()
        try:
            remote = fake_remote["r1"]
            await until(lambda: ("r2", "198.18.20.0/24") in remote.flat(), 5, "r2's route")
            gw1 = await gateway(router)
            assert await register(gw1, "169.254.0.1", ["198.18.10.0/24"]) == (1, b"{}")
            await until(lambda: len(ours()) == 2, 3, "gw1's keys")
            got["published"] = ours()
            # another gateway announcing r2's network (or a part of it): refused
            gw3 = await gateway(router)
            cmd, reply = await register(gw3, "169.254.0.3", ["198.18.20.128/25"])
            got["refused"] = (cmd, reply)
            assert router.stats.register_refused == 1
            assert router.cluster is not None and router.cluster.state.stats.conflicts == 1
            assert not any("198.18.20" in str(n) for n, _ in router.routes.routes())
            # the gateway r2 has, registering here too (its second link): accepted
            gw2 = await gateway(router)
            assert await register(gw2, "169.254.0.2", ["198.18.20.0/24"]) == (1, b"{}")
            await until(lambda: len(ours()) == 4, 3, "gw2's keys")
            # a gateway gone: its keys go
            gw1.close()
            await until(lambda: len(ours()) == 2, 3, "gw1's keys withdrawn")
            got["after_gw1"] = sorted(ours())
            gw2.close()
            gw3.close()
        finally:
            t = time.monotonic()
            await router.stop()
            got["stop_s"] = time.monotonic() - t
        got["after_stop"] = keys_under(etcd, "/polevpn/c1/")

    in_etcd(etcd, scenario)
    lease = got["published"]["/polevpn/c1/routes/r1/198.18.10.0/24"]
    assert lease != 0
    assert got["published"] == {
        "/polevpn/c1/routes/r1/169.254.0.1/32": lease,
        "/polevpn/c1/routes/r1/198.18.10.0/24": lease,
    }
    cmd, reply = got["refused"]
    assert cmd == 1 and b"held by another gateway of the cluster" in reply
    assert b"r2" not in reply and b"169.254.0.2" not in reply  # told nothing of others
    assert got["after_gw1"] == [
        "/polevpn/c1/routes/r1/169.254.0.2/32",
        "/polevpn/c1/routes/r1/198.18.20.0/24",
    ]
    # revoked on stop: only r2's keys are left
    assert set(got["after_stop"]) == {
        "/polevpn/c1/routers/r2",
        "/polevpn/c1/routes/r2/198.18.20.0/24",
    }


def write_config(path: Path, keys: Any, cluster: dict[str, Any] | None) -> Path:
    obj: dict[str, Any] = {
        "tls": {
            "listen": "127.0.0.1:0",
            "cert_file": str(keys.server_cert),
            "key_file": str(keys.server_key),
        },
        "key": KEY,
        "stats_interval": 0,
    }
    if cluster is not None:
        obj["cluster"] = cluster
    path.write_text(json.dumps(obj))
    path.chmod(0o600)
    return path


def test_reload_joins_rotates_and_leaves(etcd: Any, keys: Any, tmp_path: Path) -> None:
    section = {
        "name": "c2",
        "router_id": "r1",
        "etcd": {"endpoints": etcd.endpoints},
        "peer_address": "198.18.0.1:443",
        "peer_key": PEER_KEY,
        "lease_ttl": 8,
    }
    path = write_config(tmp_path / "config.json", keys, None)
    got: dict[str, Any] = {}

    def ours() -> dict[str, int]:
        return keys_under(etcd, "/polevpn/c2/")

    async def scenario() -> None:
        from polevpn.config import load_router_config

        router = Router(load_router_config(path))
        await router.start()
        try:
            gw = await gateway(router)
            assert await register(gw, "169.254.0.1", ["198.18.10.0/24"]) == (1, b"{}")
            assert router.cluster is None
            # joined by a reload: what is registered already is published
            write_config(path, keys, section)
            got["join"] = router.reload()
            await until(lambda: len(ours()) == 3, 5, "published after joining")
            member = router.cluster
            assert member is not None
            store, lease = member.store, member.store.lease
            # a new credential: no new session, no new lease
            write_config(path, keys, {**section, "peer_key": "n" * 24,
                                      "peer_key_previous": PEER_KEY})  # fmt: skip
            got["rotate"] = router.reload()
            assert router.cluster is member and member.store is store
            assert member.store.lease == lease and member.cfg.peer_key == "n" * 24
            assert router.cfg.cluster is not None
            assert router.cfg.cluster.peer_key_previous == PEER_KEY
            # a new peer address: the router key says so
            write_config(path, keys, {**section, "peer_address": "198.18.0.9:443"})
            router.reload()
            await until(
                lambda: b"198.18.0.9" in base64.b64decode(etcd.request(
                    "/v3/kv/range",
                    {"key": base64.b64encode(b"/polevpn/c2/routers/r1").decode()},
                )["kvs"][0]["value"]),
                3,
                "new peer address",
            )  # fmt: skip
            # left by a reload: the keys vanish at once
            write_config(path, keys, None)
            got["leave"] = router.reload()
            assert router.cluster is None
            # (well within the TTL: revoked, not expired)
            await until(lambda: ours() == {}, 3, "keys gone after leaving")
            gw.close()
        finally:
            await router.stop()

    in_etcd(etcd, scenario)
    assert "cluster: joined c2 as r1" in got["join"]
    assert got["rotate"] == ["cluster: peer_key changed; peer_key_previous changed"]
    assert "cluster: left" in got["leave"]


def test_schemathesis_covers_the_cluster_reply(etcd: Any, keys: Any) -> None:
    """The live /api/v1/cluster of a router in a cluster (another router's route in the
    store) against the served document, with the API's fuzz test."""
    from test_api import TOKEN, ThreadedRouter, fuzz
    from test_router_loopback import started_ops

    put_foreign(etcd, "c3", "r2", "198.18.20.0/24", "169.254.0.2")
    cfg = router_config(
        keys, api_listen=("127.0.0.1", 0), api_token=TOKEN, cluster=cluster(etcd, "c3")
    )
    tr = ThreadedRouter()
    try:
        # the router's loop thread joins the etcd namespace before it opens anything
        tr.loop.call_soon_threadsafe(etcd_fixture._setns, f"/var/run/netns/{etcd.ns}")
        router, ops = tr.call(started_ops(cfg))
        try:

            async def joined() -> None:
                assert router.cluster is not None
                await until(lambda: "r2" in router.cluster.state.routers, 5, "r2 known")

            tr.call(joined())
            base = f"http://127.0.0.1:{ops.api.port}"
            ran = etcd.call(lambda: fuzz(base, max_examples=5), timeout=120)
            assert "GET /api/v1/cluster" in ran
        finally:
            tr.call(router.stop())
    finally:
        tr.close()


def _router_key(etcd: Any, name: str) -> bool:
    reply = etcd.request(
        "/v3/kv/range", {"key": base64.b64encode(f"/polevpn/{name}/routers/r1".encode()).decode()}
    )
    return bool(reply.get("kvs"))


def _wait(cond: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def test_router_process_keys_vanish_at_stop_and_after_the_ttl_when_killed(
    etcd: Any, keys: Any, tmp_path: Path
) -> None:
    """polevpn-router with a cluster section: its key is there while it runs; SIGTERM
    revokes its lease (gone at once); SIGKILL leaves it to expire with the TTL."""
    pytest.importorskip("polevpn.cluster.routes")  # the remote route table (router links)
    import signal
    import subprocess

    from topology import console_script

    exe = console_script("polevpn-router")
    assert exe is not None
    section = {
        "name": "c4",
        "router_id": "r1",
        "etcd": {"endpoints": etcd.endpoints},
        "peer_address": "198.18.0.1:443",
        "peer_key": PEER_KEY,
        "lease_ttl": 5,
    }
    path = write_config(tmp_path / "config.json", keys, section)
    # revoked at once on SIGTERM; on SIGKILL, left to expire with the 5 s TTL
    for sig, within in ((signal.SIGTERM, (0.0, 2.5)), (signal.SIGKILL, (2.5, 9.0))):
        with open(tmp_path / f"router-{sig.name}.log", "wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", etcd.ns, exe, f"-configPath={path}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                _wait(lambda: _router_key(etcd, "c4"), 10, "the router's key")
                proc.send_signal(sig)
                proc.wait(10)
                gone = _wait(lambda: not _router_key(etcd, "c4"), 10, "the key gone")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        assert within[0] <= gone <= within[1], (sig.name, gone)

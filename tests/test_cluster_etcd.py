"""The etcd JSON-gateway client's parsing (polevpn/cluster/etcd.py), without etcd: what the
watch stream and replies may hold, bad input included (tests/test_cluster_store.py has it
against a real etcd); and the store's pace of retries while no endpoint answers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polevpn.cluster.etcd import (
    Compacted,
    EtcdError,
    EtcdUnavailable,
    Event,
    _decode,
    _watch_message,
    prefix_end,
)
from polevpn.cluster.state import LOST
from polevpn.cluster.store import ClusterStore
from polevpn.config import ClusterConfig


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_prefix_end() -> None:
    assert prefix_end(b"/polevpn/net/") == b"/polevpn/net0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


def test_watch_messages() -> None:
    header = {"revision": "12"}
    created = {"result": {"header": header, "created": True}}
    assert _watch_message(json.dumps(created).encode()) is None
    events = {
        "result": {
            "header": header,
            "events": [
                {"kv": {"key": b64(b"/a"), "value": b64(b"1"), "mod_revision": "11",
                        "lease": "7"}},
                {"type": "DELETE", "kv": {"key": b64(b"/b"), "mod_revision": "12"}},
            ],
        }
    }  # fmt: skip
    batch = _watch_message(json.dumps(events).encode())
    assert batch is not None and batch.revision == 12
    assert batch.events == (Event(b"/a", b"1", 11, 7), Event(b"/b", None, 12, 0))
    with pytest.raises(Compacted) as info:
        _watch_message(b'{"result": {"header": {}, "compact_revision": "30", "canceled": true}}')
    assert info.value.compact_revision == 30
    with pytest.raises(EtcdUnavailable):
        _watch_message(b'{"result": {"header": {}, "canceled": true}}')
    with pytest.raises(EtcdUnavailable):
        _watch_message(b'{"error": {"grpc_code": 14, "message": "unavailable"}}')


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[]",
        b'{"result": 5}',
        b'{"result": {"header": {}, "events": 5}}',
        b'{"result": {"header": {}, "events": [5]}}',
        b'{"result": {"header": {}, "events": [{"kv": {"key": "!!"}}]}}',
        b'{"result": {"header": {"revision": "x"}, "events": [{"kv": {}}]}}',
        b"[" * 10000,
    ],
)
def test_bad_watch_messages_raise_etcd_errors_only(line: bytes) -> None:
    with pytest.raises(EtcdError):
        _watch_message(line)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.builds(lambda o: json.dumps(o).encode(), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["result", "header", "events", "kv", "key", "type", "error",
                         "compact_revision", "canceled", "revision"]), c, max_size=4),
    max_leaves=12)))  # fmt: skip
def test_fuzz_watch_messages_and_replies(line: bytes) -> None:
    """Whatever an endpoint sends is a batch, nothing, or an EtcdError: never another
    exception (the session that reads it ends and starts again; the router goes on)."""
    with contextlib.suppress(EtcdError):
        _watch_message(line)
    with contextlib.suppress(EtcdError):
        _decode(200, line)


def test_error_replies() -> None:
    assert _decode(200, b'{"header": {"revision": "3"}}') == {"header": {"revision": "3"}}
    with pytest.raises(EtcdError) as info:
        _decode(400, b'{"error": "etcdserver: requested lease not found", "code": 5}')
    assert info.value.code == 5 and not isinstance(info.value, EtcdUnavailable)
    with pytest.raises(EtcdUnavailable):
        _decode(503, b'{"error": "etcdserver: no leader", "code": 14}')
    with pytest.raises(EtcdError):
        _decode(200, b"<html>")


class Unreachable:
    """An etcd client none of whose endpoints answers."""

    endpoint = "http://198.18.0.10:2379"

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        raise EtcdUnavailable(f"{self.endpoint}: [Errno 111] Connection refused")

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("ttl", [2, 3, 5, 15])
def test_a_lost_store_is_retried_within_a_third_of_the_lease(
    ttl: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd back after an outage restores every lease with its TTL: a router must renew its
    own within that, so its attempts while the store is lost are never further apart than a
    third of the TTL (with the jitter and a call's timeout, well inside it). Retrying every
    5 s let the keys of a router with a 3 s lease (or the 5 s default) vanish just as etcd
    returned, and the other routers dropped its routes for a moment."""
    from test_cluster_state import state

    cfg = ClusterConfig(
        name="net", router_id="r1", etcd_endpoints=(Unreachable.endpoint,),
        peer_address=("198.18.0.1", 443), peer_key="k" * 20, lease_ttl=ttl,
    )  # fmt: skip
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result: object = None) -> object:
        pauses.append(delay)
        return await real_sleep(0, result)

    async def scenario() -> None:
        st, _ = state()
        store = ClusterStore(cfg, st, Unreachable())  # type: ignore[arg-type]
        monkeypatch.setattr(asyncio, "sleep", sleep)
        store.start()
        while len(pauses) < 12:
            await real_sleep(0)
        monkeypatch.undo()
        await store.stop(revoke=False)
        assert st.store == LOST and store.stats.errors >= 12

    asyncio.run(scenario())
    assert pauses[0] < 0.2  # at first at once, then backing off
    assert max(pauses) <= 1.2 * min(5.0, ttl / 3) + 1e-9, pauses
    assert max(pauses) >= 0.8 * min(5.0, ttl / 3) - 1e-9, pauses  # but backing off

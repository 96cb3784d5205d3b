"""KCP object reuse and the KcpLink layer, driven in memory (no sockets)."""

from __future__ import annotations

import asyncio
import gc
import random
from pathlib import Path

import pytest
import uvloop
from kcp import KCP

from polevpn import dtls, kcp_pool, kcp_transport
from polevpn.config import FecParams, KcpParams, Listener, RouterConfig
from polevpn.kcp_link import KcpLink
from polevpn.kcp_pool import KcpPool, control_block
from polevpn.keygen import generate
from polevpn.router import Router

NO_FEC = KcpParams(fec=FecParams(mode="off"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_probe_found_the_control_block():
    assert kcp_pool.RESET_SUPPORTED, "kcp's object layout was not recognised"
    obj = KCP(7, max_transmission=999, send_window_size=64, receive_window_size=256)
    cb = control_block(obj)
    assert (cb.conv, cb.mtu, cb.mss, cb.snd_wnd, cb.rcv_wnd) == (7, 999, 975, 64, 256)
    kcp_pool._KEEP.append(obj)  # never dropped


def test_reset_gives_a_fresh_session():
    pool = KcpPool()
    args = (0, 1300, True, 10, 2, True, 128, 512)
    obj = pool.acquire(*args)
    out: list[bytes] = []
    obj.include_outbound_handler(lambda k, d: out.append(d))
    obj.update(0)
    for _ in range(5):
        obj.enqueue(b"x" * 100)
    obj.flush()
    assert control_block(obj).snd_nxt == 5 and out
    pool.release(obj)
    again = pool.acquire(*args)
    assert again is obj, "the pool did not reuse the object"
    cb = control_block(again)
    assert (cb.snd_nxt, cb.rcv_nxt, cb.nsnd_que, cb.nsnd_buf) == (0, 0, 0, 0)
    assert (cb.mtu, cb.snd_wnd, cb.rcv_wnd, cb.nodelay, cb.interval) == (1300, 128, 512, 1, 10)
    # and it still works: a full exchange with a fresh peer
    peer = pool.acquire(*args)
    a_out: list[bytes] = []
    b_out: list[bytes] = []
    again.include_outbound_handler(lambda k, d: a_out.append(d))
    peer.include_outbound_handler(lambda k, d: b_out.append(d))
    again.update(0)
    peer.update(0)
    again.enqueue(b"hello")
    again.flush()
    for d in a_out:
        peer.receive(d)
    assert list(peer.get_all_received()) == [bytearray(b"hello")]


def test_reuse_does_not_leak():
    """Dropping KCP objects leaks their control blocks; the pool must not."""
    pool = KcpPool()
    args = (0, 1350, True, 10, 2, True, 512, 2048)

    def cycles(n: int, reuse: bool) -> int:
        gc.collect()
        before = rss_bytes()
        for _ in range(n):
            obj = pool.acquire(*args) if reuse else KCP(0, 1350, True, 10, 2, True, 512, 2048)
            obj.include_outbound_handler(lambda k, d: None)
            obj.update(0)
            obj.enqueue(b"z" * 1300)
            obj.flush()
            if reuse:
                pool.release(obj)
        gc.collect()
        return rss_bytes() - before

    cycles(200, True)  # warm up allocator arenas
    grown_pool = cycles(3000, True)
    grown_plain = cycles(3000, False)
    # measured here: ~0 MB with the pool, ~12 MB without (about 4 KB per object)
    assert grown_pool < 2 * 1024 * 1024, grown_pool
    assert grown_plain > grown_pool + 4 * 1024 * 1024, (grown_plain, grown_pool)


def pump(a: KcpLink, b: KcpLink, now: float, loss: float, rnd: random.Random) -> bytes:
    got = b""
    for rec in a.records_to_send():
        if rnd.random() >= loss:
            got += b.receive(rec, now)
    return got


@pytest.mark.parametrize("loss", [0.0, 0.1, 0.3])
def test_link_pair_delivers_the_stream_under_loss(loss):
    rnd = random.Random(42)
    pool = KcpPool()
    a = KcpLink(NO_FEC, pool, 1363, 0.0)
    b = KcpLink(NO_FEC, pool, 1363, 0.0)
    data = bytes(rnd.getrandbits(8) for _ in range(300_000))
    a.write(data[:100_000], 0.0)
    a.write(memoryview(data)[100_000:], 0.0)
    assert a.pending_bytes > 0
    received = b""
    now = 0.0
    for _ in range(3000):
        now += 0.01
        received += pump(a, b, now, loss, rnd)
        pump(b, a, now, loss, rnd)
        a.poll(now)
        b.poll(now)
        if len(received) == len(data) and a.pending_bytes == 0:
            break
    assert received == data
    assert a.next_deadline(now) is None, "nothing in flight, no timer"
    assert not a.dead and not b.dead
    assert a.stats.kcp_errors == 0
    a.close()
    b.close()
    assert pool.idle >= 2


def test_link_ignores_foreign_records():
    pool = KcpPool()
    link = KcpLink(NO_FEC, pool, 1363, 0.0)
    for junk in (b"\x00" * 10, b"\x00\x00\x00\x01" + b"\x51" * 30, b"\xff" * 40, b"\x00" * 24):
        assert link.receive(junk, 0.0) == b""
    assert link.stats.kcp_errors >= 3
    link.close()


def test_peer_that_stops_acknowledging_is_dead():
    pool = KcpPool()
    a = KcpLink(NO_FEC, pool, 1363, 0.0)
    a.write(b"x" * 1000, 0.0)
    now = 0.0
    # 20 transmissions with the RTO growing 1.5x each: about 20 minutes of KCP time
    while not a.dead and now < 4000:
        now += 0.5
        a.poll(now)
        a.records_to_send()
    assert a.dead, "KCP never gave up on a peer that never answers"
    a.close()


def test_thousand_reconnects_keep_router_memory_flat(tmp_path: Path):
    """1000 kcp:// sessions opened and closed against one router: RSS grows < 4 MB."""
    keys = generate(tmp_path / "keys")
    listener = Listener(True, "127.0.0.1", 0, keys.server_cert, keys.server_key)
    cfg = RouterConfig(
        path=Path("t.json"),
        tls=listener,
        kcp=listener,
        key="123456",
        stats_interval=0,
        kcp_params=NO_FEC,
    )

    async def scenario() -> tuple[int, int, int]:
        router = Router(cfg)
        await router.start()
        verify = dtls.Verification(insecure=True)
        ctx = dtls.client_context(verify)
        client_pool = KcpPool()

        async def one() -> None:
            reader = asyncio.StreamReader()
            proto = asyncio.StreamReaderProtocol(reader)
            tr = await kcp_transport.connect(
                proto, "127.0.0.1", router.kcp_port, ctx, verify, NO_FEC, client_pool, 5
            )
            tr.write(b"\x00\x18\x00\x00\x00\x00\x00\x00" + b'{"key":"123456"}')
            assert await asyncio.wait_for(reader.readexactly(10), 5) == (
                b"\x00\x0a\x00\x00\x00\x00\x00\x00{}"
            )
            tr.close()

        for _ in range(100):
            await one()
        await asyncio.sleep(0.1)
        gc.collect()
        before = rss_bytes()
        for _ in range(1000):
            await one()
        await asyncio.sleep(0.2)
        gc.collect()
        grown = rss_bytes() - before
        assert router.kcp_server is not None
        sessions = len(router.kcp_server.sessions)
        created = router.kcp_pool.created
        await router.stop()
        return grown, sessions, created

    grown, sessions, created = uvloop.run(scenario())
    assert sessions == 0, "closed sessions were not removed"
    assert created <= 3, f"the router created {created} KCP objects instead of reusing"
    assert grown < 4 * 1024 * 1024, f"RSS grew {grown / 1e6:.1f} MB over 1000 reconnects"

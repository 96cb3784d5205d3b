"""KCP object reuse and the KcpLink layer, driven in memory (no sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import random
import struct
from pathlib import Path

import pytest
import uvloop

from polevpn.config import FecParams, KcpParams, Listener, RouterConfig
from polevpn.io import kcp_transport, pathstats
from polevpn.kcp import _ikcp, dtls, kcp_link
from polevpn.kcp import fec as fec_mod
from polevpn.kcp.kcp_link import KcpLink
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.keygen import generate
from polevpn.ops import metrics
from polevpn.router.router import Router

NO_FEC = KcpParams(fec=FecParams(mode="off"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_pool_configures_the_control_block():
    pool = KcpPool()
    obj = pool.acquire(7, 999, True, 10, 2, True, 64, 256)
    assert (obj.conv, obj.mtu, obj.mss, obj.snd_wnd, obj.rcv_wnd) == (7, 999, 975, 64, 256)
    assert (obj.nodelay_mode, obj.interval, obj.minrto) == (1, 10, 30)
    # ikcp_wndsize keeps a receive window of at least 128 (its largest fragment count)
    obj.wndsize(16, 8)
    assert (obj.snd_wnd, obj.rcv_wnd) == (16, 128)
    obj.set_rcv_wnd(8)
    assert obj.rcv_wnd == 8


def test_reset_gives_a_fresh_session():
    pool = KcpPool()
    args = (0, 1300, True, 10, 2, True, 128, 512)
    obj = pool.acquire(*args)
    out: list[bytes] = []
    obj.set_output(out.append)
    obj.update(0)
    for _ in range(5):
        obj.send(b"x" * 100)
    obj.flush()
    assert obj.snd_nxt == 5 and out
    pool.release(obj)
    assert (obj.nsnd_buf, obj.snd_bytes, obj.buffered()) == (0, 0, (0, 0, 0, 0))
    again = pool.acquire(*args)
    assert again is obj, "the pool did not reuse the object"
    assert (again.snd_nxt, again.rcv_nxt, again.nsnd_que, again.nsnd_buf) == (0, 0, 0, 0)
    assert (again.mtu, again.snd_wnd, again.rcv_wnd, again.nodelay_mode, again.interval) == (
        1300,
        128,
        512,
        1,
        10,
    )
    # and it still works: a full exchange with a fresh peer
    peer = pool.acquire(*args)
    a_out: list[bytes] = []
    b_out: list[bytes] = []
    again.set_output(a_out.append)
    peer.set_output(b_out.append)
    again.update(0)
    peer.update(0)
    again.send(b"hello")
    again.flush()
    for d in a_out:
        assert peer.input(d) == 0
    assert peer.recv_all() == b"hello"
    assert peer.recv() is None


def test_output_callback_errors_propagate():
    k = _ikcp.Kcp(0)

    def boom(data: bytes) -> None:
        raise RuntimeError("boom")

    k.set_output(boom)
    k.update(0)
    k.send(b"x")
    with pytest.raises(RuntimeError, match="boom"):
        k.flush()
    k.set_output(None)
    k.flush()  # nothing raised, nothing kept


def test_closed_objects_leave_nothing_allocated():
    """Control blocks are freed on release (pool) and on drop (no pool), segments and all."""
    pool = KcpPool()
    args = (0, 1350, True, 10, 2, True, 512, 2048)
    gc.collect()
    base = _ikcp.allocated()

    def cycles(n: int, reuse: bool) -> int:
        gc.collect()
        before = rss_bytes()
        for _ in range(n):
            obj = pool.acquire(*args) if reuse else _ikcp.Kcp(0)
            obj.set_output(lambda d: None)
            obj.update(0)
            obj.send(b"z" * 1300)
            obj.flush()
            if reuse:
                pool.release(obj)
        gc.collect()
        return rss_bytes() - before

    cycles(200, True)  # warm up allocator arenas
    grown_pool = cycles(3000, True)
    grown_plain = cycles(3000, False)
    assert grown_pool < 2 * 1024 * 1024, grown_pool
    assert grown_plain < 2 * 1024 * 1024, grown_plain
    # what remains is the pool's one idle, reset object: a control block and its buffer
    held, blocks = _ikcp.allocated()
    assert blocks - base[1] == 2 and held - base[0] < 5000, (held - base[0], blocks - base[1])


def test_wire_bytes_match_the_kcp_package():
    """Every buffer of a lossy two-way exchange (fragmented messages, ACKs, resends) is
    byte-identical to what the `kcp` 0.1.6 package (the C core used before vendoring, the
    one Go PoleVPN interop was tested with) produced for the same script, that package built
    with IKCP_FASTACK_CONSERVE as ours is (setup.py). Built without it, the package gives
    707,440 bytes and sha256 7fcd95d7...c4fa05e45 for this script."""
    rnd = random.Random(7)
    ao: list[bytes] = []
    bo: list[bytes] = []
    a, b = _ikcp.Kcp(0), _ikcp.Kcp(0)
    for k, out in ((a, ao), (b, bo)):
        k.set_output(out.append)
        k.setmtu(1363)
        k.nodelay(True, 10, 2, True)
        k.wndsize(512, 2048)
    digest = hashlib.sha256()
    first = None
    got = b""
    sent = b""
    for t in range(0, 3000, 5):
        a.update(t)
        b.update(t)
        if t < 1500:
            for _ in range(rnd.randrange(0, 6)):
                d = rnd.randbytes(rnd.choice([1, 40, 500, 1339, 3000]))
                sent += d
                a.send(d)
        a.flush()
        b.flush()
        for src, dst in ((ao, b), (bo, a)):
            for d in src:
                digest.update(len(d).to_bytes(4, "big") + d)
                if first is None:
                    first = d
                if rnd.random() >= 0.1:
                    dst.input(d)
            src.clear()
        got += b.recv_all()
    assert got == sent[: len(got)] and len(got) == 702859
    # conv 0, cmd 81 (push), frg 0, wnd 2048, ts 0, sn 0, una 0, len 40; little-endian
    assert first is not None
    assert first[:24].hex() == "000000005100000800000000000000000000000028000000"
    assert digest.hexdigest() == (
        "be85ac5ced8a73a74cd7f15dcf52b268cd68da8e1b00d29d1a8d060a7bcb7b33"
    )


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


# -- before AUTH: small, bounded receive state (issue 20, finding 4)

_SEG = struct.Struct("<IBBHIIII")  # ikcp's segment header: conv cmd frg wnd ts sn una len


def push(sn: int, data: bytes) -> bytes:
    return _SEG.pack(0, 81, 0, 2048, 0, sn, 0, len(data)) + data


FEC_FIXED = KcpParams(fec=FecParams(mode="fixed"))


@pytest.mark.parametrize("params", [NO_FEC, FEC_FIXED], ids=["no-fec", "fec"])
def test_unauthenticated_session_buffers_little_and_frees_all(params):
    """A peer that never sends sn 0 but everything after it: before AUTH KCP keeps at most
    PRE_AUTH_WINDOW segments and FEC nothing; a closed session keeps nothing at all."""
    pool = KcpPool()
    gc.collect()
    base = _ikcp.allocated()
    payload = b"p" * 1300

    def session() -> KcpLink:
        link = KcpLink(params, pool, 1363, 0.0, authenticated=False)
        fec = link.fec
        for sn in range(1, 2048):
            seg = push(sn, payload)
            if fec is not None:
                # data shard sn of a group of 10 with 3 parity shards to come
                seg = (
                    fec_mod.MAGIC.to_bytes(1, "big")
                    + struct.pack(">BIIBBH", sn % 10, sn, sn // 10, 0, 3, len(seg))
                    + seg
                )
            link.feed(seg, 0.001)
        link.settle(0.002)
        return link

    link = session()
    kcp = link.kcp
    assert kcp is not None
    assert kcp.rcv_wnd == kcp_link.PRE_AUTH_WINDOW
    assert kcp.nrcv_buf <= kcp_link.PRE_AUTH_WINDOW and kcp.nrcv_que == 0
    assert kcp.buffered()[2] <= kcp_link.PRE_AUTH_WINDOW * 1300
    assert kcp.ackblock <= 2 * kcp_link.ACK_FLUSH
    if link.fec is not None:
        assert link.fec.held_bytes == 0 and link.fec.open_groups == 0
    link.close()
    assert kcp.buffered() == (0, 0, 0, 0) and kcp.nrcv_buf == 0
    # a bounded loop of such sessions: the C side returns to one idle object, RSS stays flat
    rss0 = rss_bytes()
    for _ in range(30):
        session().close()
    gc.collect()
    held, blocks = _ikcp.allocated()
    assert blocks - base[1] == 2 and held - base[0] < 5000, (held - base[0], blocks - base[1])
    assert rss_bytes() - rss0 < 4 * 1024 * 1024


def test_authenticate_opens_the_window_and_decoding():
    link = KcpLink(FEC_FIXED, KcpPool(), 1363, 0.0, authenticated=False)
    assert link.fec is not None and not link.fec.decoding
    link.authenticate(0.01)
    kcp = link.kcp
    assert kcp is not None and kcp.rcv_wnd == 2048 and link.fec.decoding
    # the new window went out at once in a window-size segment (cmd 84, wnd 2048)
    segs = [r for r in link.records_to_send() if r[:1] == b"\x00"]
    assert any(r[4] == 84 and _SEG.unpack_from(r)[3] == 2048 for r in segs)
    for sn in range(1, 2048):
        link.feed(push(sn, b"q" * 100), 0.02)
    assert kcp.nrcv_buf == 2047
    # an authenticated session does keep FEC groups for decoding: until it closes
    tx = fec_mod.FecSession(fec_mod.FecConfig(data_shards=10, parity_shards=3))
    for i in range(5):
        for shard in tx.send(push(3000 + i, b"r" * 200), 0.03):
            link.feed(shard, 0.03)
    assert link.fec.held_bytes > 0 and link.fec.open_groups == 1
    link.close()
    assert kcp.nrcv_buf == 0 and link.fec.held_bytes == 0 and link.fec.open_groups == 0


def test_router_authenticates_the_kcp_session_after_auth(tmp_path: Path):
    keys = generate(tmp_path / "keys")
    listener = Listener(True, "127.0.0.1", 0, keys.server_cert, keys.server_key)
    cfg = RouterConfig(
        path=Path("t.json"), tls=listener, kcp=listener, key="123456", stats_interval=0
    )

    async def scenario() -> tuple[bool, int, bool, int]:
        router = Router(cfg)
        await router.start()
        try:
            verify = dtls.Verification(insecure=True)
            reader = asyncio.StreamReader()
            proto = asyncio.StreamReaderProtocol(reader)
            tr = await kcp_transport.connect(
                proto,
                "127.0.0.1",
                router.kcp_port,
                dtls.client_context(verify),
                verify,
                KcpParams(),
                KcpPool(),
                5,
            )
            assert router.kcp_server is not None
            (server,) = router.kcp_server.sessions.values()
            before = (server.authenticated, server.link.kcp.rcv_wnd)
            tr.write(b"\x00\x18\x00\x00\x00\x00\x00\x00" + b'{"key":"123456"}')
            await asyncio.wait_for(reader.readexactly(10), 5)
            after = (server.authenticated, server.link.kcp.rcv_wnd)
            tr.close()
            return (*before, *after)
        finally:
            await router.stop()

    assert uvloop.run(scenario()) == (False, kcp_link.PRE_AUTH_WINDOW, True, 2048)


# -- adaptive FEC behind a rate-limited line (issue 19, bug 12)


class RateLimitedLine:
    """A tbf in miniature: a drop-tail queue of ``limit`` bytes drained at ``rate`` bit/s,
    then a fixed delay. Deterministic."""

    def __init__(self, rate: float, limit: int, delay: float) -> None:
        self.rate, self.limit, self.delay = rate / 8, limit, delay
        self.queue: list[bytes] = []
        self.queued = 0
        self.free_at = 0.0
        self.flight: list[tuple[float, bytes]] = []
        self.sent = self.dropped = 0

    def put(self, record: bytes) -> None:
        self.sent += 1
        if self.queued + len(record) > self.limit:
            self.dropped += 1
            return
        self.queue.append(record)
        self.queued += len(record)

    def take(self, now: float) -> list[bytes]:
        t = max(self.free_at, now - 0.001)
        while self.queue and t <= now:
            record = self.queue.pop(0)
            self.queued -= len(record)
            t += len(record) / self.rate
            self.flight.append((t + self.delay, record))
        self.free_at = t
        n = 0
        while n < len(self.flight) and self.flight[n][0] <= now:
            n += 1
        out = [r for _, r in self.flight[:n]]
        del self.flight[:n]
        return out


def test_adaptive_fec_metrics_agree_behind_a_rate_limited_line():
    """Bulk data a -> b through a 50 Mbit/s drop-tail queue, ACKs back on a clean path:
    a's parity goes to its maximum while the loss a *measures* (on what it receives) is 0.
    The metrics must show the figure the parity follows, next to the link's loss. The
    sender runs without congestion control, as PoleVPN's does: the queue overrun is the
    situation under test."""
    params = KcpParams(fec=FecParams(mode="adaptive"), congestion="off")
    pool = KcpPool()
    a = KcpLink(params, pool, 1363, 0.0)
    b = KcpLink(params, pool, 1363, 0.0)
    up = RateLimitedLine(50e6, 64 * 1024, 0.01)
    down = RateLimitedLine(1e9, 1 << 20, 0.01)
    now = 0.0
    while now < 4.0:
        now += 0.001
        while a.pending_bytes < 1 << 20:
            a.write(b"x" * 1300, now)
        for r in a.records_to_send():
            up.put(r)
        for r in up.take(now):
            b.feed(r, now)
        b.settle(now)
        a.poll(now)
        b.poll(now)
        for r in b.records_to_send():
            down.put(r)
        for r in down.take(now):
            a.feed(r, now)
        a.settle(now)
    assert a.fec is not None and a.fec_state == "on"
    resent, first = a.retransmissions, a.segments_sent
    assert resent is not None and first is not None
    link_loss = resent / (first + resent)
    # the situation of the report: parity at its maximum, FEC's receive-side loss 0,
    # the link's loss (KCP resends of what a sent) high
    assert a.fec.stats.parity == 3 and a.fec.stats.loss_ppm == 0 and link_loss > 0.3
    assert up.dropped > up.sent // 4 and down.dropped == 0

    lm = metrics._LinkMetrics("link_", ["link"])
    lm.add(["a"], pathstats.kcp_figures(a))
    samples = {
        s.name: s.value for fam in lm.families() for s in fam.samples if "reason" not in s.labels
    }
    peer_loss = samples["link_fec_peer_loss_ratio"]
    assert samples["link_fec_parity_shards"] == 3 and samples["link_fec_loss_ratio"] == 0.0
    # the exported figure explains the parity: at this loss the controller wants the maximum
    cfg = a.fec.config
    assert fec_mod.parity_for_loss(10, peer_loss * cfg.loss_margin, 3, cfg.residual_target) == 3
    assert peer_loss > 0.1
    a.close()
    b.close()


def test_pending_bytes_counts_real_bytes():
    """Flow control (the transport's write buffer) counts payload bytes, not segments x MSS
    (issue 19, bug 14). Without congestion control, so that ikcp's own window is what
    lets the first segments out."""
    pool = KcpPool()
    params = dataclasses.replace(NO_FEC, congestion="off")
    a = KcpLink(params, pool, 1363, 0.0)
    b = KcpLink(params, pool, 1363, 0.0)
    for _ in range(1000):
        a.write(b"s" * 100, 0.0)
    a.write(b"L" * 3000, 0.0)  # three segments: 1315 + 1315 + 370
    assert a.pending_bytes == 100_000 + 3000
    assert a.kcp is not None and a.kcp.waitsnd() == 1003
    # the first window went out (128 segments: ikcp's assumed peer window); once those are
    # acknowledged, their bytes are gone
    sent = a.records_to_send()
    for r in sent:
        b.feed(r, 0.01)
    b.settle(0.01)
    for r in b.records_to_send():
        a.feed(r, 0.02)
    assert a.kcp.snd_nxt == 128 and a.kcp.nsnd_buf == 0
    assert a.pending_bytes == 100_000 + 3000 - 128 * 100
    a.close()
    b.close()


# -- acknowledgements beyond a hole go out twice (issue 16)


def ack_sns(records: list[bytes]) -> list[int]:
    """The sequence numbers KCP ACK segments (command 82) in ``records`` acknowledge."""
    out = []
    for r in records:
        off = 0
        while off + 24 <= len(r):
            cmd = r[off + 4]
            sn = struct.unpack_from("<I", r, off + 12)[0]
            length = struct.unpack_from("<I", r, off + 20)[0]
            if cmd == 82:
                out.append(sn)
            off += 24 + length
    return out


def _first_of_four_lost(a: KcpLink, b: KcpLink, now: float) -> list[bytes]:
    """``a`` sends four segments (a record each); all but the first reach ``b`` at
    ``now`` and wait behind it. Returns the four records."""
    for _ in range(4):
        a.write(b"d" * 1000, 0.0)
    records = a.records_to_send()
    assert len(records) == 4
    for r in records[1:]:
        b.feed(r, now)
    assert b.settle(now) == b""  # held back
    return records


@pytest.mark.parametrize("congestion", ["bbr", "off"])
def test_acks_beyond_a_hole_are_sent_twice(congestion):
    """Segment 0 is lost, 1-3 arrive: their ACKs are all the sender will hear of them until
    0 is resent, so with congestion control on (our receivers) they go out again with the
    next flush; an ACK below the hole is not repeated (the una of every segment covers it)."""
    params = dataclasses.replace(NO_FEC, congestion=congestion)
    pool = KcpPool()
    a = KcpLink(params, pool, 1363, 0.0)
    b = KcpLink(params, pool, 1363, 0.0)
    records = _first_of_four_lost(a, b, 0.01)
    assert sorted(ack_sns(b.records_to_send())) == [1, 2, 3]
    b.poll(0.03)  # the next flush, nothing new received
    again = ack_sns(b.records_to_send())
    assert sorted(again) == ([1, 2, 3] if congestion == "bbr" else [])
    b.poll(0.05)
    assert ack_sns(b.records_to_send()) == []  # once more only
    # the hole filled: nothing beyond it any more, nothing repeated
    b.feed(records[0], 0.06)
    b.settle(0.06)
    assert ack_sns(b.records_to_send()) == [0]
    b.poll(0.08)
    assert ack_sns(b.records_to_send()) == []
    a.close()
    b.close()


def test_hole_seconds_count_the_time_data_waits_behind_a_missing_segment():
    """Segment 0 lost, 1-3 in at 10 ms: they wait until 0 arrives at 60 ms (50 ms of hole);
    in-order arrivals add nothing; an open hole counts up to the last time the link saw."""
    pool = KcpPool()
    a = KcpLink(NO_FEC, pool, 1363, 0.0)
    b = KcpLink(NO_FEC, pool, 1363, 0.0)
    a.write(b"c" * 1000, 0.0)
    (first,) = a.records_to_send()
    assert len(b.receive(first, 0.005)) == 1000  # in order: no hole
    assert b.hole_seconds == 0.0
    records = _first_of_four_lost(a, b, 0.01)
    b.receive(records[1], 0.03)  # a duplicate: the hole is still open
    assert b.hole_seconds == pytest.approx(0.02)
    assert len(b.receive(records[0], 0.06)) == 4000
    assert b.hole_seconds == pytest.approx(0.05)
    b.receive(b"", 0.5)
    assert b.hole_seconds == pytest.approx(0.05)
    a.close()
    b.close()

"""Sans-IO session state machines: router side, gateway side, and both wired together."""

from __future__ import annotations

import ipaddress
import json
import struct

import pytest

from polevpn.proto import messages, wire
from polevpn.proto.auth import keys_equal
from polevpn.proto.session import (
    PRE_AUTH_MAX_FRAME,
    REGISTER_BURST,
    REGISTER_RATE,
    AuthFailed,
    AuthSucceeded,
    ClientSession,
    ConnectionLost,
    HeartbeatReceived,
    Registered,
    RegisterRequested,
    Rejected,
    ServerSession,
    State,
)
from polevpn.proto.wire import FrameDecoder, encode_frame

KEY = "123456"
GO_AUTH = bytes.fromhex("0018 0000 00000000") + b'{"key":"123456"}'
GO_REGISTER = (
    bytes.fromhex("004d 0001 00000000")
    + b'{"gateway":"169.254.0.1","key":"123456","network":["198.18.10.0/24"]}'
)


def check_key(key: str) -> bool:
    return keys_equal(key, KEY)


def decode(chunks: list[bytes]) -> list[tuple[int, int, bytes]]:
    frames = FrameDecoder().feed(b"".join(chunks))
    return [(c, s, bytes(b)) for c, s, b in frames]


def heartbeat(seq: int) -> bytes:
    return encode_frame(wire.HEART_BEAT, b"", seq)


def register_body(key: str = KEY, networks: tuple[str, ...] = ("198.18.10.0/24",)) -> bytes:
    return messages.encode_register("169.254.0.1", key, list(networks))


def authed_server(now: float = 0.0) -> ServerSession:
    s = ServerSession(check_key, now)
    s.receive(encode_frame(wire.AUTH, messages.encode_auth(KEY), 1), now)
    s.data_to_send()
    return s


def registered_server(now: float = 0.0) -> ServerSession:
    s = authed_server(now)
    _, events = s.receive(encode_frame(wire.REGISTER, register_body(), 2), now)
    (ev,) = events
    assert isinstance(ev, RegisterRequested)
    s.accept_register(ev.seq)
    s.data_to_send()
    return s


# ---- ServerSession ----------------------------------------------------------------------


def test_keys_equal() -> None:
    assert keys_equal("123456", "123456")
    assert not keys_equal("123457", "123456")
    assert not keys_equal("", "123456")
    assert keys_equal("kéy", "kéy")


def test_server_go_auth_accepted() -> None:
    s = ServerSession(check_key, 0.0)
    assert s.state is State.AWAIT_AUTH
    packets, events = s.receive(GO_AUTH, 1.0)
    assert packets == []
    assert events == [AuthSucceeded()]
    assert s.state is State.AUTHENTICATED
    assert s.data_to_send() == [bytes.fromhex("000a 0000 00000000") + b"{}"]
    assert s.data_to_send() == []


@pytest.mark.parametrize("seq", [1, 0x01020304, 0xFFFFFFFF])
def test_server_auth_reply_carries_request_seq(seq: int) -> None:
    s = ServerSession(check_key, 0.0)
    s.receive(encode_frame(wire.AUTH, messages.encode_auth(KEY), seq), 0.0)
    assert decode(s.data_to_send()) == [(wire.AUTH, seq, b"{}")]


def test_server_bad_key() -> None:
    s = ServerSession(check_key, 0.0)
    _, events = s.receive(encode_frame(wire.AUTH, messages.encode_auth("wrong"), 9), 0.0)
    assert len(events) == 1
    assert isinstance(events[0], AuthFailed)
    assert s.state is State.CLOSED
    ((command, seq, body),) = decode(s.data_to_send())
    assert (command, seq) == (wire.AUTH, 9)
    assert messages.parse_reply(body).error
    # nothing more is processed on a closed session
    assert s.receive(encode_frame(wire.AUTH, messages.encode_auth(KEY), 10), 1.0) == ([], [])
    assert s.data_to_send() == []


@pytest.mark.parametrize(
    "frame",
    [
        heartbeat(0),
        encode_frame(wire.REGISTER, register_body()),
        encode_frame(wire.S2C_IPDATA, b"x"),
        encode_frame(77, b"{}"),
    ],
)
def test_server_requires_auth_first(frame: bytes) -> None:
    s = ServerSession(check_key, 0.0)
    _, events = s.receive(frame + GO_AUTH, 0.0)
    assert len(events) == 1
    assert isinstance(events[0], ConnectionLost)
    assert s.state is State.CLOSED
    # the AUTH after the offending frame is not honoured
    assert s.data_to_send() == []


def test_server_ip_data_before_auth_is_a_protocol_violation() -> None:
    s = ServerSession(check_key, 0.0)
    packets, events = s.receive(encode_frame(wire.C2S_IPDATA, b"\x45" + bytes(19)), 0.0)
    assert packets == []
    assert len(events) == 1 and isinstance(events[0], ConnectionLost)
    assert "before AUTH" in events[0].reason
    assert s.state is State.CLOSED


def test_server_ip_data_between_auth_and_register_dropped_and_counted() -> None:
    s = ServerSession(check_key, 0.0)
    s.receive(encode_frame(wire.AUTH, b'{"key":"123456"}'), 0.0)
    packets, events = s.receive(encode_frame(wire.C2S_IPDATA, b"\x45" + bytes(19)), 0.0)
    assert (packets, events) == ([], [])
    assert s.dropped_unregistered == 1
    assert s.state is State.AUTHENTICATED


@pytest.mark.parametrize("body", [b"", b"[]", b'{"key":1}', b"\xff"])
def test_server_malformed_auth(body: bytes) -> None:
    s = ServerSession(check_key, 0.0)
    _, events = s.receive(encode_frame(wire.AUTH, body), 0.0)
    assert len(events) == 1
    assert isinstance(events[0], ConnectionLost)
    assert s.state is State.CLOSED


def test_server_malformed_frame() -> None:
    s = ServerSession(check_key, 0.0)
    _, events = s.receive(b"\x00\x02\x00\x00\x00\x00\x00\x00", 0.0)
    assert len(events) == 1
    assert isinstance(events[0], ConnectionLost)
    assert "malformed" in events[0].reason
    assert s.state is State.CLOSED


def test_server_auth_split_across_receives() -> None:
    s = ServerSession(check_key, 0.0)
    for i in range(len(GO_AUTH) - 1):
        assert s.receive(GO_AUTH[i : i + 1], 0.0) == ([], [])
    assert s.receive(GO_AUTH[-1:], 0.0) == ([], [AuthSucceeded()])


def test_server_repeated_auth_is_answered() -> None:
    s = authed_server()
    _, events = s.receive(encode_frame(wire.AUTH, b"garbage", 5), 0.0)
    assert events == []
    assert decode(s.data_to_send()) == [(wire.AUTH, 5, b"{}")]
    assert s.state is State.AUTHENTICATED


def test_server_register_go_bytes() -> None:
    s = authed_server()
    _, events = s.receive(GO_REGISTER, 0.0)
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, RegisterRequested)
    assert ev.seq == 0
    assert ev.request.gateway == ipaddress.ip_address("169.254.0.1")
    assert ev.request.networks == (ipaddress.ip_network("198.18.10.0/24"),)
    # the orchestrator decides; nothing is sent until it does
    assert s.data_to_send() == []
    assert s.state is State.AUTHENTICATED
    s.accept_register(ev.seq)
    assert s.state is State.REGISTERED
    assert s.data_to_send() == [bytes.fromhex("000a 0001 00000000") + b"{}"]


def test_server_accept_register_uses_given_seq() -> None:
    s = authed_server()
    _, (ev,) = s.receive(encode_frame(wire.REGISTER, register_body(), 42), 0.0)
    assert isinstance(ev, RegisterRequested)
    assert ev.seq == 42
    s.accept_register(ev.seq)
    assert decode(s.data_to_send()) == [(wire.REGISTER, 42, b"{}")]


def test_server_reject_register() -> None:
    s = authed_server()
    _, (ev,) = s.receive(encode_frame(wire.REGISTER, register_body(), 3), 0.0)
    s.reject_register(ev.seq, "network 198.18.10.0/24 is taken")
    assert s.state is State.CLOSED
    ((command, seq, body),) = decode(s.data_to_send())
    assert (command, seq) == (wire.REGISTER, 3)
    assert messages.parse_reply(body).error == "network 198.18.10.0/24 is taken"
    # a late accept cannot reopen it
    s.accept_register(3)
    assert s.state is State.CLOSED
    assert s.data_to_send() == []


def test_server_register_with_wrong_key() -> None:
    s = authed_server()
    _, events = s.receive(encode_frame(wire.REGISTER, register_body(key="nope"), 4), 0.0)
    assert len(events) == 1
    assert isinstance(events[0], AuthFailed)
    assert s.state is State.CLOSED
    ((command, seq, body),) = decode(s.data_to_send())
    assert (command, seq) == (wire.REGISTER, 4)
    assert messages.parse_reply(body).error


def test_server_bad_register_body() -> None:
    s = authed_server()
    body = b'{"gateway":"not-an-ip","key":"123456"}'
    _, events = s.receive(encode_frame(wire.REGISTER, body, 6), 0.0)
    assert len(events) == 1
    assert isinstance(events[0], ConnectionLost)
    assert s.state is State.CLOSED
    ((command, seq, reply),) = decode(s.data_to_send())
    assert (command, seq) == (wire.REGISTER, 6)
    assert messages.parse_reply(reply).error


def test_server_register_flood_closes_after_the_burst() -> None:
    """Issue 20 finding 8: 3,000 REGISTERs in one write each cost the router a table update.
    A burst of REGISTER_BURST passes; the next one in that read is answered with an error,
    the session closes and nothing after it in the read is looked at."""
    s = authed_server(0.0)
    flood = b"".join(encode_frame(wire.REGISTER, register_body(), i) for i in range(3000))
    _, events = s.receive(flood, 0.5)
    assert [type(e) for e in events] == [RegisterRequested] * REGISTER_BURST + [ConnectionLost]
    assert events[-1].kind == "flood"
    assert s.state is State.CLOSED
    assert decode(s.data_to_send()) == [
        (wire.REGISTER, REGISTER_BURST, b'{"error":"too many REGISTER"}')
    ]


def test_server_register_tokens_refill_at_the_rate() -> None:
    s = authed_server(0.0)
    t = 0.0
    for i in range(REGISTER_BURST):
        _, events = s.receive(encode_frame(wire.REGISTER, register_body(), i), t)
        assert isinstance(events[0], RegisterRequested)
        s.accept_register(i)
    # then one every 1/REGISTER_RATE seconds, forever: a reload a second is no flood
    for i in range(20):
        t += 1 / REGISTER_RATE
        _, events = s.receive(encode_frame(wire.REGISTER, register_body(), 100 + i), t)
        assert isinstance(events[0], RegisterRequested), i
    # and a refill never goes past the burst
    t += 3600
    frames = b"".join(encode_frame(wire.REGISTER, register_body(), i) for i in range(10))
    _, events = s.receive(frames, t)
    assert sum(isinstance(e, RegisterRequested) for e in events) == REGISTER_BURST
    assert isinstance(events[-1], ConnectionLost)


def test_server_ip_data_before_register_dropped() -> None:
    s = authed_server()
    pkt = b"\x45" + bytes(19)
    packets, events = s.receive(encode_frame(wire.C2S_IPDATA, pkt) * 3, 0.0)
    assert packets == []
    assert events == []
    assert s.dropped_unregistered == 3


def test_server_ip_data_after_register_returned() -> None:
    s = registered_server()
    pkts = [b"\x45" + bytes([i]) * 30 for i in range(4)]
    stream = b"".join(encode_frame(wire.C2S_IPDATA, p) for p in pkts)
    got: list[bytes] = []
    # and split unevenly across receives
    for a in range(0, len(stream), 7):
        packets, events = s.receive(stream[a : a + 7], 0.0)
        assert events == []
        got += [bytes(p) for p in packets]
    assert got == pkts
    assert s.dropped_unregistered == 0


def test_server_heartbeat_echoed_with_seq() -> None:
    s = registered_server()
    packets, events = s.receive(heartbeat(17) + heartbeat(18), 5.0)
    assert packets == []
    assert events == [HeartbeatReceived(), HeartbeatReceived()]
    assert b"".join(s.data_to_send()) == heartbeat(17) + heartbeat(18)
    assert s.last_heard == 5.0


def test_server_heartbeat_before_register_echoed() -> None:
    s = authed_server()
    _, events = s.receive(heartbeat(2), 0.0)
    assert events == [HeartbeatReceived()]
    assert s.data_to_send() == [heartbeat(2)]


def test_server_unknown_commands_counted() -> None:
    s = registered_server()
    packets, events = s.receive(encode_frame(wire.S2C_IPDATA, b"x") + encode_frame(99), 0.0)
    assert (packets, events) == ([], [])
    assert s.unknown_commands == 2
    assert s.state is State.REGISTERED


def test_server_auth_timeout() -> None:
    s = ServerSession(check_key, 100.0)
    assert s.check_timeouts(110.0, auth_timeout=10.0, idle_timeout=60.0) is None
    reason = s.check_timeouts(110.5, auth_timeout=10.0, idle_timeout=60.0)
    assert reason is not None
    assert "AUTH" in reason
    assert s.state is State.CLOSED
    # reported once
    assert s.check_timeouts(200.0, auth_timeout=10.0, idle_timeout=60.0) is None


def test_server_auth_timeout_applies_until_registered() -> None:
    s = authed_server(now=100.0)
    s.receive(heartbeat(1), 109.0)  # talking is not enough
    assert s.check_timeouts(110.5, auth_timeout=10.0, idle_timeout=60.0) is not None


def test_server_registered_idle_timeout() -> None:
    s = registered_server(now=100.0)
    # well past the auth deadline: a registered session only has the idle deadline
    assert s.check_timeouts(150.0, auth_timeout=10.0, idle_timeout=60.0) is None
    s.receive(heartbeat(1), 150.0)
    assert s.check_timeouts(210.0, auth_timeout=10.0, idle_timeout=60.0) is None
    reason = s.check_timeouts(210.1, auth_timeout=10.0, idle_timeout=60.0)
    assert reason is not None
    assert "idle" in reason
    assert s.state is State.CLOSED


def test_server_idle_timeout_before_register() -> None:
    s = ServerSession(check_key, 0.0)
    assert s.check_timeouts(5.1, auth_timeout=100.0, idle_timeout=5.0) is not None


# ---- ClientSession ----------------------------------------------------------------------


def new_client(now: float = 0.0, interval: float = 10.0, timeout: float = 20.0) -> ClientSession:
    return ClientSession(
        KEY,
        "169.254.0.1",
        ["198.18.10.0/24"],
        now,
        heartbeat_interval=interval,
        heartbeat_timeout=timeout,
    )


def ok_reply(command: int, seq: int = 0) -> bytes:
    return encode_frame(command, messages.OK_BODY, seq)


def registered_client(now: float = 0.0, **kw: float) -> ClientSession:
    c = new_client(now, **kw)
    c.data_to_send()
    c.receive(ok_reply(wire.AUTH) + ok_reply(wire.REGISTER), now)
    c.data_to_send()
    assert c.ready
    return c


def test_client_first_output_is_go_auth() -> None:
    c = new_client()
    assert c.state is State.AWAIT_AUTH
    assert not c.ready
    assert c.data_to_send() == [GO_AUTH]
    assert c.data_to_send() == []


def test_client_registers_after_auth_ok() -> None:
    c = new_client()
    c.data_to_send()
    packets, events = c.receive(ok_reply(wire.AUTH, 0), 0.5)
    assert packets == []
    assert events == [AuthSucceeded()]
    assert c.state is State.AUTHENTICATED
    assert c.data_to_send() == [GO_REGISTER]
    packets, events = c.receive(ok_reply(wire.REGISTER, 0), 0.6)
    assert events == [Registered()]
    assert c.state is State.REGISTERED
    assert c.ready
    assert c.data_to_send() == []


def test_client_register_carries_all_networks() -> None:
    c = ClientSession("k", "169.254.0.2", ["198.18.20.0/24", "2001:db8:20::/64"], 0.0)
    c.data_to_send()
    c.receive(ok_reply(wire.AUTH), 0.0)
    ((command, _, body),) = decode(c.data_to_send())
    assert command == wire.REGISTER
    req = messages.parse_register(body)
    assert req.gateway == ipaddress.ip_address("169.254.0.2")
    assert req.key == "k"
    assert [str(n) for n in req.networks] == ["198.18.20.0/24", "2001:db8:20::/64"]


def test_client_register_ok_before_auth_ok_is_ignored() -> None:
    c = new_client()
    _, events = c.receive(ok_reply(wire.REGISTER), 0.0)
    assert events == []
    assert c.state is State.AWAIT_AUTH


def test_client_rejected_at_auth() -> None:
    c = new_client()
    _, events = c.receive(encode_frame(wire.AUTH, messages.encode_error("invalid key")), 0.0)
    assert events == [Rejected("AUTH", "invalid key")]
    assert c.state is State.CLOSED
    assert c.data_to_send() == [GO_AUTH]  # only what was queued before; no REGISTER


def test_client_rejected_at_register() -> None:
    c = new_client()
    c.receive(ok_reply(wire.AUTH), 0.0)
    c.data_to_send()
    _, events = c.receive(encode_frame(wire.REGISTER, messages.encode_error("taken"), 0), 0.0)
    assert events == [Rejected("REGISTER", "taken")]
    assert c.state is State.CLOSED
    assert not c.ready


@pytest.mark.parametrize("command", [wire.AUTH, wire.REGISTER])
def test_client_bad_reply_body(command: int) -> None:
    c = new_client()
    _, events = c.receive(encode_frame(command, b"[1,2]"), 0.0)
    assert len(events) == 1
    assert isinstance(events[0], ConnectionLost)
    assert c.state is State.CLOSED


def test_client_malformed_frame() -> None:
    c = new_client()
    _, events = c.receive(b"\x00\x00" + bytes(6), 0.0)
    assert len(events) == 1
    assert isinstance(events[0], ConnectionLost)
    assert c.state is State.CLOSED
    assert c.receive(ok_reply(wire.AUTH), 0.0) == ([], [])


def test_client_ip_data_only_when_registered() -> None:
    c = new_client()
    c.receive(ok_reply(wire.AUTH), 0.0)
    packets, _ = c.receive(encode_frame(wire.S2C_IPDATA, b"early"), 0.0)
    assert packets == []
    c.receive(ok_reply(wire.REGISTER), 0.0)
    packets, events = c.receive(
        encode_frame(wire.S2C_IPDATA, b"one") + encode_frame(wire.S2C_IPDATA, b"two"), 0.0
    )
    assert [bytes(p) for p in packets] == [b"one", b"two"]
    assert events == []


def test_client_unknown_commands_counted() -> None:
    c = registered_client()
    packets, events = c.receive(encode_frame(wire.C2S_IPDATA, b"x") + encode_frame(50), 0.0)
    assert (packets, events) == ([], [])
    assert c.unknown_commands == 2


def test_client_no_heartbeat_before_registered() -> None:
    c = new_client(interval=1.0, timeout=20.0)
    c.data_to_send()
    for t in (1.0, 2.0, 5.0, 10.0):
        assert c.tick(t) is None
    assert c.data_to_send() == []


def test_client_heartbeats_at_interval() -> None:
    c = registered_client(now=0.0, interval=10.0, timeout=20.0)
    assert c.tick(5.0) is None
    assert c.tick(9.99) is None
    assert c.data_to_send() == []
    assert c.tick(10.0) is None
    assert c.data_to_send() == [heartbeat(1)]
    assert c.tick(10.5) is None
    assert c.tick(19.9) is None
    assert c.data_to_send() == []
    c.receive(heartbeat(1), 19.95)
    assert c.tick(20.0) is None
    assert c.data_to_send() == [heartbeat(2)]
    assert c.tick(30.0) is None
    assert c.data_to_send() == [heartbeat(3)]


def test_client_lost_after_heartbeat_timeout_of_silence() -> None:
    c = registered_client(now=0.0, interval=10.0, timeout=20.0)
    assert c.tick(10.0) is None
    assert c.tick(20.0) is None
    lost = c.tick(20.01)
    assert isinstance(lost, ConnectionLost)
    assert c.state is State.CLOSED
    assert c.tick(40.0) is None


def test_client_any_traffic_keeps_link_alive() -> None:
    c = registered_client(now=0.0, interval=10.0, timeout=20.0)
    for t in range(5, 200, 5):
        c.receive(encode_frame(wire.S2C_IPDATA, b"p"), float(t))
        assert c.tick(float(t) + 1) is None
    assert c.ready


def test_client_lost_when_not_registered_in_time() -> None:
    c = new_client(now=0.0, interval=10.0, timeout=20.0)
    c.receive(ok_reply(wire.AUTH), 1.0)
    # the router keeps talking but never answers REGISTER
    c.receive(heartbeat(0), 19.0)
    assert c.tick(20.0) is None
    lost = c.tick(20.5)
    assert isinstance(lost, ConnectionLost)
    assert "registered" in lost.reason
    assert c.state is State.CLOSED


def test_client_rtt_from_echoed_heartbeat() -> None:
    c = registered_client(now=0.0, interval=10.0, timeout=20.0)
    assert c.rtt is None
    c.tick(10.0)
    ((_, seq, _),) = decode(c.data_to_send())
    _, events = c.receive(heartbeat(seq), 10.25)
    assert events == [HeartbeatReceived(rtt=0.25)]
    assert c.rtt == 0.25
    # a second echo of the same seq, or an unknown seq, has no RTT and keeps the last one
    _, events = c.receive(heartbeat(seq) + heartbeat(999), 11.0)
    assert events == [HeartbeatReceived(rtt=None), HeartbeatReceived(rtt=None)]
    assert c.rtt == 0.25
    c.tick(20.0)
    ((_, seq2, _),) = decode(c.data_to_send())
    assert seq2 != seq
    _, events = c.receive(heartbeat(seq2), 20.5)
    assert events == [HeartbeatReceived(rtt=0.5)]
    assert c.rtt == 0.5


def test_client_unanswered_heartbeats_do_not_accumulate() -> None:
    c = registered_client(now=0.0, interval=1.0, timeout=20.0)
    for t in range(1, 200):
        c.receive(b"", float(t))  # something arrived, but never an echo
        c.tick(float(t))
    sent = decode(c.data_to_send())
    assert len(sent) == 199
    # the most recent probe is still measurable
    _, events = c.receive(heartbeat(sent[-1][1]), 199.5)
    assert events == [HeartbeatReceived(rtt=0.5)]


# ---- both ends wired together -----------------------------------------------------------


class Link:
    """Moves bytes between a client and a server session, a few bytes at a time."""

    def __init__(self, client: ClientSession, server: ServerSession, chunk: int = 5) -> None:
        self.client = client
        self.server = server
        self.chunk = chunk
        self.server_events: list = []
        self.client_events: list = []
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []

    def pump(self, now: float) -> None:
        for _ in range(20):
            c_out = b"".join(self.client.data_to_send())
            for i in range(0, len(c_out), self.chunk):
                packets, events = self.server.receive(c_out[i : i + self.chunk], now)
                self.to_server += [bytes(p) for p in packets]
                self.server_events += events
                for ev in events:
                    if isinstance(ev, RegisterRequested):
                        self.server.accept_register(ev.seq)
            s_out = b"".join(self.server.data_to_send())
            for i in range(0, len(s_out), self.chunk):
                packets, events = self.client.receive(s_out[i : i + self.chunk], now)
                self.to_client += [bytes(p) for p in packets]
                self.client_events += events
            if not c_out and not s_out:
                return
        raise AssertionError("sessions kept talking")


def test_full_loop() -> None:
    client = new_client(now=0.0, interval=10.0, timeout=30.0)
    server = ServerSession(check_key, 0.0)
    link = Link(client, server)
    link.pump(0.1)
    assert client.state is State.REGISTERED
    assert server.state is State.REGISTERED
    assert link.client_events == [AuthSucceeded(), Registered()]
    assert [type(e) for e in link.server_events] == [AuthSucceeded, RegisterRequested]
    req = link.server_events[1].request
    assert req.networks == (ipaddress.ip_network("198.18.10.0/24"),)

    up = [b"\x45" + bytes([i]) * 40 for i in range(3)]
    for p in up:
        client.outbox.append(encode_frame(wire.C2S_IPDATA, p))
    down = [b"\x60" + bytes([i]) * 50 for i in range(2)]
    for p in down:
        server.outbox.append(encode_frame(wire.S2C_IPDATA, p))
    link.pump(1.0)
    assert link.to_server == up
    assert link.to_client == down
    assert server.dropped_unregistered == 0

    # a heartbeat round trip measures the RTT at the client
    assert client.tick(10.0) is None
    link.pump(10.5)
    assert client.rtt == 0.5
    assert HeartbeatReceived() in link.server_events
    assert server.check_timeouts(11.0, auth_timeout=5.0, idle_timeout=60.0) is None
    assert client.tick(11.0) is None


def test_full_loop_wrong_key() -> None:
    client = ClientSession("wrong", "169.254.0.1", [], 0.0)
    server = ServerSession(check_key, 0.0)
    link = Link(client, server, chunk=1)
    link.pump(0.0)
    assert server.state is State.CLOSED
    assert client.state is State.CLOSED
    assert link.client_events == [Rejected("AUTH", "invalid key")]
    assert [type(e) for e in link.server_events] == [AuthFailed]


# ---- super-packets (negotiated in AUTH) ---------------------------------------------------

SUPER = frozenset({messages.FEATURE_SUPER})
# virtio-net header (NEEDS_CSUM, TCPv4, hdr_len 40, gso_size 1360, csum 20/16) + IPv4 packet
SUPER_BODY = bytes.fromhex("01 01 2800 5005 1400 1000") + b"\x45" + bytes(4000)


def super_frame(body: bytes = SUPER_BODY) -> bytes:
    return wire.super_header(len(body)) + body


def test_client_offers_super_packets_in_auth() -> None:
    c = ClientSession(KEY, "169.254.0.1", [], 0.0, features=SUPER)
    (auth,) = c.data_to_send()
    assert auth[8:] == b'{"key":"123456","features":["super-packets"]}'
    assert messages.parse_auth(auth[8:]).features == SUPER


def test_server_accepts_offered_feature_it_supports() -> None:
    s = ServerSession(check_key, 0.0, SUPER)
    s.receive(encode_frame(wire.AUTH, messages.encode_auth(KEY, SUPER), 3), 0.0)
    assert decode(s.data_to_send()) == [(wire.AUTH, 3, b'{"features":["super-packets"]}')]
    assert s.super_packets


def test_server_without_the_feature_answers_like_go() -> None:
    s = ServerSession(check_key, 0.0)
    s.receive(encode_frame(wire.AUTH, messages.encode_auth(KEY, SUPER), 3), 0.0)
    assert decode(s.data_to_send()) == [(wire.AUTH, 3, b"{}")]
    assert not s.super_packets


def test_server_does_not_offer_what_a_go_gateway_did_not_ask_for() -> None:
    s = ServerSession(check_key, 0.0, SUPER)
    s.receive(GO_AUTH, 0.0)
    assert decode(s.data_to_send()) == [(wire.AUTH, 0, b"{}")]
    assert not s.super_packets


def test_client_ignores_features_it_did_not_offer() -> None:
    c = new_client()
    c.data_to_send()
    c.receive(encode_frame(wire.AUTH, messages.encode_ok(SUPER)), 0.0)
    assert c.state is State.AUTHENTICATED and not c.super_packets


def negotiated_pair() -> tuple[ClientSession, ServerSession, Link]:
    client = ClientSession(KEY, "169.254.0.1", ["198.18.10.0/24"], 0.0, features=SUPER)
    server = ServerSession(check_key, 0.0, SUPER)
    link = Link(client, server, chunk=1000)
    link.pump(0.0)
    assert client.super_packets and server.super_packets
    return client, server, link


def test_super_packets_cross_both_ways_when_negotiated() -> None:
    client, server, link = negotiated_pair()
    client.outbox.append(super_frame())
    server.outbox.append(super_frame(SUPER_BODY[:-7]))
    link.pump(1.0)
    assert link.to_server == [SUPER_BODY]
    assert link.to_client == [SUPER_BODY[:-7]]
    assert client.unknown_commands == server.unknown_commands == 0


def test_super_frames_without_negotiation_are_counted_not_passed() -> None:
    s = registered_server()
    packets, events = s.receive(super_frame(), 1.0)
    assert packets == [] and events == []
    assert s.unknown_commands == 1 and s.state is State.REGISTERED
    c = registered_client()
    packets, events = c.receive(super_frame(), 1.0)
    assert packets == [] and c.unknown_commands == 1


def test_super_frame_before_auth_is_a_protocol_violation() -> None:
    s = ServerSession(check_key, 0.0, SUPER)
    _, events = s.receive(super_frame(), 0.0)
    assert s.state is State.CLOSED and isinstance(events[0], ConnectionLost)


@pytest.mark.parametrize("first", [0x10, 0x45, 0x60, 0xFF])
def test_super_body_that_cannot_be_a_virtio_header_is_dropped(first: int) -> None:
    # a body starting like an IP packet would be taken for a plain packet further on
    client, server, link = negotiated_pair()
    client.outbox.append(super_frame(bytes([first]) + SUPER_BODY[1:]))
    client.outbox.append(super_frame(b""))
    link.pump(1.0)
    assert link.to_server == [] and server.unknown_commands == 2


# ---- multi-link (negotiated in AUTH, named in REGISTER) -----------------------------------

MULTILINK = frozenset({messages.FEATURE_MULTILINK})
LINK = messages.LinkRequest("v4", weight=2.0, backup=False, heartbeat=0.1, timeout=0.3)


def link_client(features: frozenset[str] = frozenset()) -> ClientSession:
    return ClientSession(KEY, "169.254.0.1", ["198.18.10.0/24"], 0.0, features=features, link=LINK)


def test_client_with_a_link_offers_multi_link() -> None:
    c = link_client()
    ((command, _, body),) = decode(c.data_to_send())
    assert command == wire.AUTH
    assert json.loads(body) == {"key": KEY, "features": ["multi-link"]}
    assert messages.parse_auth(body).features == MULTILINK


def test_client_with_a_link_keeps_its_other_features() -> None:
    c = link_client(SUPER)
    ((_, _, body),) = decode(c.data_to_send())
    assert messages.parse_auth(body).features == SUPER | MULTILINK


def test_client_without_a_link_offers_no_multi_link() -> None:
    c = ClientSession(KEY, "169.254.0.1", [], 0.0, features=SUPER)
    ((_, _, body),) = decode(c.data_to_send())
    assert messages.parse_auth(body).features == SUPER


def test_client_sends_its_link_in_register_when_agreed() -> None:
    c = link_client()
    c.data_to_send()
    _, events = c.receive(encode_frame(wire.AUTH, messages.encode_ok(MULTILINK)), 0.0)
    assert events == [AuthSucceeded()]
    assert c.features == MULTILINK
    ((command, _, body),) = decode(c.data_to_send())
    assert command == wire.REGISTER
    assert json.loads(body)["link"] == {
        "name": "v4",
        "weight": 2.0,
        "backup": False,
        "heartbeat_ms": 100,
        "timeout_ms": 300,
    }
    req = messages.parse_register(body)
    assert req.link == LINK
    assert req.gateway == ipaddress.ip_address("169.254.0.1")
    _, events = c.receive(ok_reply(wire.REGISTER), 0.1)
    assert events == [Registered()] and c.ready


@pytest.mark.parametrize(
    "reply",
    [
        messages.OK_BODY,  # a PoleVPN router: no features at all
        messages.encode_ok(SUPER),  # another feature, not this one
        b'{"features":"multi-link"}',  # not a list: no features
    ],
)
def test_client_with_a_link_refuses_a_router_without_multi_link(reply: bytes) -> None:
    c = link_client(SUPER)
    c.data_to_send()
    _, events = c.receive(encode_frame(wire.AUTH, reply), 0.0)
    assert len(events) == 1
    (ev,) = events
    assert isinstance(ev, Rejected) and ev.stage == "AUTH"
    assert "multi-link" in ev.error
    assert c.state is State.CLOSED and not c.ready
    # the gateway tells this apart from a refused key by it: it goes on with one link
    assert c.multilink_refused
    # no REGISTER: a plain one would replace the gateway's other links at the router
    assert c.data_to_send() == []
    # a REGISTER reply arriving anyway changes nothing
    assert c.receive(ok_reply(wire.REGISTER), 0.1) == ([], [])


def test_client_without_a_link_ignores_an_unasked_multi_link() -> None:
    c = new_client()
    c.data_to_send()
    c.receive(encode_frame(wire.AUTH, messages.encode_ok(MULTILINK)), 0.0)
    assert c.features == frozenset()
    assert c.data_to_send() == [GO_REGISTER]


def test_server_agrees_to_multi_link_and_passes_the_link_on() -> None:
    s = ServerSession(check_key, 0.0, MULTILINK | SUPER)
    s.receive(encode_frame(wire.AUTH, messages.encode_auth(KEY, MULTILINK), 4), 0.0)
    assert decode(s.data_to_send()) == [(wire.AUTH, 4, b'{"features":["multi-link"]}')]
    assert s.features == MULTILINK
    body = messages.encode_register("169.254.0.1", KEY, ["198.18.10.0/24"], LINK)
    _, events = s.receive(encode_frame(wire.REGISTER, body, 5), 0.0)
    (ev,) = events
    assert isinstance(ev, RegisterRequested) and ev.request.link == LINK


def test_server_without_multi_link_does_not_agree() -> None:
    s = ServerSession(check_key, 0.0, SUPER)
    s.receive(encode_frame(wire.AUTH, messages.encode_auth(KEY, MULTILINK), 4), 0.0)
    assert decode(s.data_to_send()) == [(wire.AUTH, 4, b"{}")]
    assert s.features == frozenset()


def test_server_reports_a_bad_link_object_and_closes() -> None:
    s = authed_server()
    body = json.dumps(
        {"gateway": "169.254.0.1", "key": KEY, "network": [], "link": {"name": "no spaces"}}
    ).encode()
    _, events = s.receive(encode_frame(wire.REGISTER, body, 6), 0.0)
    assert len(events) == 1 and isinstance(events[0], ConnectionLost)
    ((command, seq, reply),) = decode(s.data_to_send())
    assert (command, seq) == (wire.REGISTER, 6)
    assert "link name" in (messages.parse_reply(reply).error or "")


def test_full_loop_with_a_link() -> None:
    client = link_client()
    server = ServerSession(check_key, 0.0, MULTILINK)
    link = Link(client, server, chunk=7)
    link.pump(0.0)
    assert client.state is State.REGISTERED and server.state is State.REGISTERED
    assert client.features == server.features == MULTILINK
    req = link.server_events[1].request
    assert req.link == LINK


def test_full_loop_with_a_link_against_a_plain_router() -> None:
    client = link_client()
    server = ServerSession(check_key, 0.0)  # our router with the feature off, or PoleVPN's
    link = Link(client, server)
    link.pump(0.0)
    assert client.state is State.CLOSED
    assert [type(e) for e in link.client_events] == [Rejected]
    # the server never saw a REGISTER
    assert [type(e) for e in link.server_events] == [AuthSucceeded]
    assert server.state is State.AUTHENTICATED


def test_client_with_a_link_refused_key_is_not_a_multi_link_refusal() -> None:
    # a wrong key stops the gateway; only a router that took AUTH without multi-link
    # sends it down to one link at a time
    c = link_client(SUPER)
    c.data_to_send()
    _, events = c.receive(encode_frame(wire.AUTH, messages.encode_error("invalid key")), 0.0)
    assert events == [Rejected("AUTH", "invalid key")]
    assert not c.multilink_refused


# ---- the first frame before AUTH is small


@pytest.mark.parametrize(
    "header",
    [
        struct.pack(">HHI", 0xFFFF, wire.AUTH, 0),  # a 64 KB AUTH, of which the header came
        struct.pack(">HHI", 8, wire.SUPER_IPDATA, 65_592),  # a 65,600-byte super-packet
        struct.pack(">HHI", PRE_AUTH_MAX_FRAME + 1, wire.AUTH, 0),
    ],
)
def test_a_long_first_frame_closes_before_it_is_buffered(header: bytes) -> None:
    # issue 20: 1,024 connections holding partial 65,600-byte frames before AUTH: +230 MB
    s = ServerSession(check_key, 0.0)
    packets, events = s.receive(header + b"x" * 100, 0.0)
    assert packets == [] and s.state is State.CLOSED
    assert [(type(e), e.kind) for e in events] == [(ConnectionLost, "oversized")]
    assert s._decoder.buffered == 0


def test_first_frame_limit_is_inclusive_and_later_frames_are_not_limited() -> None:
    body = json.dumps({"key": KEY, "pad": "p" * 4000}).encode()
    body += b" " * (PRE_AUTH_MAX_FRAME - wire.HEADER_LEN - len(body))
    s = ServerSession(check_key, 0.0)
    # exactly the limit, arriving a byte at a time
    frame = encode_frame(wire.AUTH, body, 1)
    assert len(frame) == PRE_AUTH_MAX_FRAME
    for i in range(len(frame) - 1):
        assert s.receive(frame[i : i + 1], 0.0) == ([], [])
    _, events = s.receive(frame[-1:], 0.0)
    assert [type(e) for e in events] == [AuthSucceeded]
    # AUTH, REGISTER and a full-size frame in one read, as gateways send them
    s = ServerSession(check_key, 0.0)
    big = encode_frame(wire.C2S_IPDATA, b"\x45" + b"\0" * (wire.MAX_BODY - 1))
    chunk = encode_frame(wire.AUTH, messages.encode_auth(KEY), 1) + big
    _, events = s.receive(chunk, 0.0)
    assert [type(e) for e in events] == [AuthSucceeded] and s.state is State.AUTHENTICATED
    assert s.dropped_unregistered == 1


def test_server_direct_frames_once_registered_with_direct_agreed() -> None:
    """Commands 32..37 become DirectFrame events on a registered connection that agreed
    direct; before REGISTER, or without the feature, they are ignored and counted."""
    from polevpn.proto.session import DirectFrame

    offer = frozenset({messages.FEATURE_DIRECT})
    s = ServerSession(check_key, 0.0, offer)
    s.receive(encode_frame(wire.AUTH, messages.encode_auth(KEY, offer), 1), 0.0)
    assert s.features == offer
    body = b"\x01\x00\x00"
    # before REGISTER it names no gateway
    _, events = s.receive(encode_frame(wire.Command.DIRECT_CANDIDATES, body), 0.0)
    assert events == [] and s.unknown_commands == 1
    _, events = s.receive(encode_frame(wire.REGISTER, register_body(), 2), 0.0)
    s.accept_register(events[0].seq)
    for cmd in range(32, 38):
        _, events = s.receive(encode_frame(cmd, body), 0.0)
        assert events == [DirectFrame(cmd, body)]
    assert s.unknown_commands == 1
    # a gateway that did not offer it: counted, as any unknown command
    plain = registered_server()
    _, events = plain.receive(encode_frame(wire.Command.DIRECT_STATUS, body), 0.0)
    assert events == [] and plain.unknown_commands == 1

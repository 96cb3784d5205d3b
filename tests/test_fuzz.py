"""Bad input never escapes a parser as anything but its documented error.

Each parser that touches network bytes has fuzz tests next to its unit tests (test_wire,
test_messages, test_gso, test_ippacket, test_fec, test_dtls). This module covers what those
leave out: the two session state machines fed arbitrary frame sequences at any state,
control bodies with extreme JSON, FEC receive state under random group ids, KcpLink fed
arbitrary records, and DTLS listener and sessions fed datagram sequences. Each property is
"only the documented outcomes, and the object still works afterwards".
"""

from __future__ import annotations

import json
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polevpn.config import FecParams, KcpParams
from polevpn.kcp import dtls
from polevpn.kcp.fec import (
    HEADER_LEN,
    KIND_DATA,
    KIND_PARITY,
    KIND_REPORT,
    MAGIC,
    FecConfig,
    FecSession,
)
from polevpn.kcp.kcp_link import KcpLink
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.keygen import generate
from polevpn.proto import messages, wire
from polevpn.proto.auth import keys_equal
from polevpn.proto.messages import MessageError
from polevpn.proto.session import (
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
from polevpn.proto.wire import FrameDecoder

KEY = "123456"


SUPER = frozenset({messages.FEATURE_SUPER})
MULTILINK = frozenset({messages.FEATURE_MULTILINK})
LINK = messages.LinkRequest("v4", weight=2.0, heartbeat=0.1, timeout=0.3)
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- JSON-ish bodies --------------------------------------------------------------------

# lone surrogates often: json.dumps escapes them as \udXXX, which json.loads gives back
_text = st.text(
    st.characters(categories=["Cs"]) | st.characters(exclude_categories=()), max_size=12
)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()  # NaN and Infinity too: Python's json writes and reads them
    | _text
    | st.sampled_from(
        [
            KEY,
            "169.254.0.1",
            "::1",
            "198.18.0.0/15",
            "2001:db8::/32",
            "1.2.3.4/33",
            "super-packets",
            "multi-link",
            "v4",
        ]
    )
)
_LINK_FIELDS = ["name", "weight", "backup", "heartbeat_ms", "timeout_ms"]
json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["key", "gateway", "network", "features", "error", "link"])
            | st.sampled_from(_LINK_FIELDS)
            | _text,
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)
shaped = st.fixed_dictionaries(
    {},
    optional={
        "key": st.just(KEY) | _text | json_values,
        "gateway": st.sampled_from(["169.254.0.1", "2001:db8::1"]) | json_values,
        "network": st.just(["198.18.1.0/24"]) | json_values,
        "features": st.just(["super-packets"]) | st.just(["multi-link"]) | json_values,
        "error": json_values,
        "link": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["v4", "a" * 32, "a" * 33, "", "v 4"]) | json_values,
                "weight": st.sampled_from([1, 0.001, 1000, 0, 1001]) | json_values,
                "backup": st.booleans() | json_values,
                "heartbeat_ms": st.sampled_from([10, 250, 60_000, 9]) | json_values,
                "timeout_ms": st.sampled_from([100, 1000, 600_000, 99, 600_001]) | json_values,
            },
        ),
    },
)


def _deep(n: int, field: str = "key") -> bytes:
    return b'{"%s":' % field.encode() + b"[" * n + b"]" * n + b"}"


# bodies no strategy reaches by chance: the limits of Python's json module
SPECIAL_BODIES = [
    _deep(32000),
    _deep(32000, "network"),
    _deep(32000, "gateway"),
    _deep(32000, "features"),
    _deep(32000, "error"),
    b'{"a":' * 12000 + b"1" + b"}" * 12000,
    b'{"key":' + b"9" * 5000 + b"}",  # beyond int's 4300-digit str limit: ValueError
    b'{"key":' + b"9" * 4300 + b"}",
    b'{"key":1e999,"gateway":-1e999}',
    b'{"key":NaN,"error":Infinity}',
    b'{"error":-Infinity}',
    b'{"key":"\\ud800"}',
    b'{"key":"\\udfff\\ud800","gateway":"169.254.0.1"}',
    b'{"gateway":"169.254.0.1\\u0000","key":"123456"}',
    b'{"gateway":"169.254.0.1","key":"123456","network":"\\ud800"}',
    b'{"error":"\\ud800"}',
    b'{"error":{"error":"\\udc00"}}',
    b'{"key":"123456","features":' + json.dumps(["x"] * 5000).encode() + b"}",
    b'{"gateway":"169.254.0.1","key":"123456","network":'
    + json.dumps(["198.18.1.0/24"] * 3000).encode()
    + b"}",
    # long non-ASCII values: JSON-escaped in an error reply they grow up to 3x
    json.dumps({"gateway": "\u00e9" * 30000, "key": KEY}, ensure_ascii=False).encode(),
    json.dumps(
        {"gateway": "169.254.0.1", "key": KEY, "network": ["\u4e2d" * 20000]}, ensure_ascii=False
    ).encode(),
    '{"key":"123456"}'.encode("utf-16"),
    '{"key":"123456"}'.encode("utf-32"),
    b"\xef\xbb\xbf" + b'{"key":"123456"}',
    b"\xff\xfe\x00",
    b"\x00" * 8,
    b'{"key":"123456"' + b" " * 60000 + b"}",
    b"",
    # REGISTER's link object at the edges
    _deep(32000, "link"),
    b'{"gateway":"169.254.0.1","key":"123456","link":{"name":'
    + b"[" * 30000
    + b"]" * 30000
    + b"}}",
    b'{"gateway":"169.254.0.1","key":"123456","link":{"name":"v4","weight":NaN}}',
    b'{"gateway":"169.254.0.1","key":"123456","link":{"name":"v4","weight":Infinity}}',
    b'{"gateway":"169.254.0.1","key":"123456","link":{"name":"v4","timeout_ms":-Infinity}}',
    b'{"gateway":"169.254.0.1","key":"123456","link":{"name":"v4","heartbeat_ms":1e999}}',
    b'{"gateway":"169.254.0.1","key":"123456","link":{"name":"v4","weight":1e-999}}',
    b'{"gateway":"169.254.0.1","key":"123456","link":{"name":"\\ud800"}}',
    b'{"gateway":"169.254.0.1","key":"123456","link":{"name":"v4\\u0000"}}',
    b'{"gateway":"169.254.0.1","key":"123456","link":{"name":"v4","backup":0}}',
    json.dumps(
        {"gateway": "169.254.0.1", "key": KEY, "link": {"name": "\u00e9" * 30000}},
        ensure_ascii=False,
    ).encode(),
]

bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    shaped.map(lambda v: json.dumps(v).encode()),
    shaped.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.sampled_from(SPECIAL_BODIES),
)

PARSERS = [messages.parse_auth, messages.parse_register, messages.parse_reply]


def _parse_all(body: bytes) -> None:
    """Every parser either refuses ``body`` with MessageError or gives text that can be
    compared with the router's key and logged."""
    for parse in PARSERS:
        try:
            parsed = parse(body)
        except MessageError:
            continue
        for text in (getattr(parsed, "key", ""), getattr(parsed, "error", None) or ""):
            text.encode()
        keys_equal(getattr(parsed, "key", ""), KEY)
        link = getattr(parsed, "link", None)
        if link is not None:
            # what the router trusts of it: a plain name, and numbers within their ranges
            assert messages.LINK_NAME.fullmatch(link.name)
            assert 0.001 <= link.weight <= 1000 and isinstance(link.backup, bool)
            assert 0.01 <= link.heartbeat < link.timeout <= 600


@pytest.mark.parametrize("body", SPECIAL_BODIES, ids=range(len(SPECIAL_BODIES)))
def test_extreme_bodies_only_raise_message_error(body: bytes) -> None:
    _parse_all(body)


@FUZZ
@given(st.one_of(json_values, shaped).map(lambda v: json.dumps(v).encode()) | bodies)
def test_control_bodies_only_raise_message_error(body: bytes) -> None:
    _parse_all(body)


# ---- session state machines -------------------------------------------------------------

ALL_COMMANDS = [wire.AUTH, wire.REGISTER, wire.S2C_IPDATA, wire.C2S_IPDATA, wire.HEART_BEAT]
commands = st.sampled_from([*ALL_COMMANDS, wire.SUPER_IPDATA]) | st.integers(0, 0xFFFF)
seqs = st.sampled_from([0, 1, 7, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF)

GOOD_AUTH = [
    messages.encode_auth(KEY),
    messages.encode_auth(KEY, SUPER),
    messages.encode_auth("wrong"),
    messages.encode_auth(KEY, MULTILINK),
    messages.encode_auth(KEY, SUPER | MULTILINK),
]
GOOD_REGISTER = [
    messages.encode_register("169.254.0.1", KEY, ["198.18.1.0/24"]),
    messages.encode_register("169.254.0.2", KEY, []),
    messages.encode_register("2001:db8::1", KEY, ["2001:db8:1::/64", "0.0.0.0/0"]),
    messages.encode_register("169.254.0.3", "wrong", ["198.18.3.0/24"]),
    messages.encode_register("169.254.0.1", KEY, ["198.18.1.0/24"], LINK),
    messages.encode_register("169.254.0.1", KEY, ["198.18.1.0/24"], messages.LinkRequest("v6")),
    messages.encode_register(
        "169.254.0.1", KEY, [], messages.LinkRequest("b", 0.001, True, 60.0, 600.0)
    ),
]
GOOD_REPLIES = [
    b"{}",
    messages.encode_ok(SUPER),
    messages.encode_error("no"),
    b'{"error":""}',
    messages.encode_ok(MULTILINK),
    messages.encode_ok(SUPER | MULTILINK),
]
IP_BODIES = [
    bytes.fromhex("4500001c000000004011000098120102981202020000000000000000"),
    bytes(12) + bytes.fromhex("60000000000011402001") + bytes(30),
]


@st.composite
def frames(draw: st.DrawFn, good: list[tuple[int, bytes]]) -> bytes:
    """One item of a stream: mostly frames with a valid header, sometimes raw garbage."""
    kind = draw(st.integers(0, 9))
    if kind <= 2:
        cmd, body = draw(st.sampled_from(good))
        return wire.encode_frame(cmd, body, draw(seqs))
    if kind <= 6:
        # AUTH and REGISTER, whose bodies are parsed, more often than the rest
        cmd = draw(st.sampled_from([wire.AUTH, wire.REGISTER]) if kind <= 4 else commands)
        body = draw(bodies | st.sampled_from(IP_BODIES))[: wire.MAX_BODY]
        return wire.encode_frame(cmd, body, draw(seqs))
    if kind == 7:
        # SUPER_IPDATA: a virtio-net-looking header or not; a length over the cap is fatal
        body = draw(st.binary(max_size=80))
        if draw(st.booleans()):
            body = bytes([draw(st.integers(0, 0x0F))]) + body
        n = draw(st.just(len(body)) | st.integers(0, wire.MAX_SUPER_BODY + 10))
        return struct.pack(">HHI", wire.HEADER_LEN, wire.SUPER_IPDATA, n) + body
    if kind == 8:
        # a header whose length field is anything, followed by whatever is there
        return struct.pack(">HHI", *draw(st.tuples(st.integers(0, 0xFFFF), commands, seqs)))
    return draw(st.binary(min_size=1, max_size=24))


@st.composite
def chunked(draw: st.DrawFn, good: list[tuple[int, bytes]], prelude: list[bytes]) -> list[bytes]:
    """A stream of items cut at arbitrary points into the reads that deliver it, after none,
    one or both frames of a good login, so later states see as much garbage as the first."""
    head = b"".join(prelude[: draw(st.integers(0, len(prelude)))])
    stream = b"".join(draw(st.lists(frames(good), min_size=1, max_size=12)))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    bounds = [0, *cuts, len(stream)]
    # the login in a read of its own, so the driver can accept REGISTER before the rest
    return [head] + [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


SERVER_GOOD = (
    [(wire.AUTH, b) for b in GOOD_AUTH]
    + [(wire.REGISTER, b) for b in GOOD_REGISTER]
    + [(wire.C2S_IPDATA, b) for b in IP_BODIES * 3]
    + [(wire.HEART_BEAT, b"")]
)
CLIENT_GOOD = (
    [(wire.AUTH, b) for b in GOOD_REPLIES]
    + [(wire.REGISTER, b) for b in GOOD_REPLIES]
    + [(wire.S2C_IPDATA, b) for b in IP_BODIES * 3]
    + [(wire.HEART_BEAT, b"")]
)
SERVER_EVENTS = (AuthSucceeded, AuthFailed, RegisterRequested, HeartbeatReceived, ConnectionLost)
SERVER_PRELUDE = [
    wire.encode_frame(wire.AUTH, GOOD_AUTH[1], 1),
    wire.encode_frame(wire.REGISTER, GOOD_REGISTER[0], 2),
]
CLIENT_PRELUDE = [
    # both features: a plain client ignores multi-link, a client with a link needs it
    wire.encode_frame(wire.AUTH, messages.encode_ok(SUPER | MULTILINK)),
    wire.encode_frame(wire.REGISTER, GOOD_REPLIES[0]),
]
CLIENT_EVENTS = (AuthSucceeded, Registered, Rejected, HeartbeatReceived, ConnectionLost)


def decode_outbox(out: list[bytes]) -> list[tuple[int, int, bytes]]:
    """What a session sent, which must itself be well-formed frames."""
    frames_out = FrameDecoder().feed(b"".join(out))
    assert sum(len(b) + wire.HEADER_LEN for _, _, b in frames_out) == sum(map(len, out))
    return [(c, s, bytes(b)) for c, s, b in frames_out]


def body_was_sent(packet: memoryview, chunks: list[bytes]) -> bool:
    return bytes(packet) in b"".join(chunks)


@FUZZ
@given(
    chunked(SERVER_GOOD, SERVER_PRELUDE),
    st.booleans(),
    st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_server_session_any_frames_any_state(
    chunks: list[bytes], offer: bool, verdicts: list[bool]
) -> None:
    s = ServerSession(
        lambda k: keys_equal(k, KEY), 0.0, SUPER | MULTILINK if offer else frozenset()
    )
    sent: list[tuple[int, int, bytes]] = []
    authenticated = accepted = False
    requests = 0
    for i, chunk in enumerate(chunks):
        now = 0.01 * (i + 1)
        before = s.state
        packets, events = s.receive(chunk, now)
        if before is State.CLOSED:
            assert (packets, events) == ([], [])
        if packets:
            assert before is State.REGISTERED
            assert all(type(p) is memoryview and body_was_sent(p, chunks) for p in packets)
        for ev in events:
            assert isinstance(ev, SERVER_EVENTS), ev
            if isinstance(ev, AuthSucceeded):
                assert not authenticated
                authenticated = True
                assert s.features <= s._offer
            elif isinstance(ev, RegisterRequested):
                assert authenticated
                assert keys_equal(ev.request.key, KEY)
                if verdicts[requests % len(verdicts)]:
                    s.accept_register(ev.seq)
                    accepted = s.state is State.REGISTERED or accepted
                else:
                    s.reject_register(ev.seq, "refused")
                requests += 1
            elif isinstance(ev, AuthFailed | ConnectionLost):
                assert s.state is State.CLOSED
        if s.state is State.REGISTERED:
            assert accepted
        sent += decode_outbox(s.data_to_send())
        s.check_timeouts(now, 10.0, 60.0)
    s.check_timeouts(1e6, 10.0, 60.0)
    assert s.state is State.CLOSED  # every session ends, one way or another
    for cmd, _, body in sent:
        assert cmd in (wire.AUTH, wire.REGISTER, wire.HEART_BEAT)
        if cmd == wire.HEART_BEAT:
            assert body == b""
        else:
            messages.parse_reply(body)  # every answer is one a gateway can read


@FUZZ
@given(bodies, st.integers(0, 0xFFFFFFFF))
def test_server_session_any_auth_or_register_body(body: bytes, seq: int) -> None:
    """The bodies the router parses before it knows who is talking, aimed at directly."""
    s = ServerSession(lambda k: keys_equal(k, KEY), 0.0)
    _, events = s.receive(wire.encode_frame(wire.AUTH, body[: wire.MAX_BODY], seq), 0.0)
    assert [type(e) for e in events] in ([AuthSucceeded], [AuthFailed], [ConnectionLost])
    s = ServerSession(lambda k: keys_equal(k, KEY), 0.0)
    _, events = s.receive(
        wire.encode_frame(wire.AUTH, GOOD_AUTH[0], 1)
        + wire.encode_frame(wire.REGISTER, body[: wire.MAX_BODY], seq),
        0.0,
    )
    assert [type(e) for e in events[1:]] in ([RegisterRequested], [AuthFailed], [ConnectionLost])
    for _, got_seq, reply in decode_outbox(s.data_to_send()):
        assert got_seq in (1, seq)
        messages.parse_reply(reply)


@pytest.mark.parametrize("field", ["weight", "heartbeat_ms", "timeout_ms"])
def test_server_session_link_number_beyond_a_float(field: str) -> None:
    """JSON integers have no size limit; one too large for a float is just out of range."""
    s = ServerSession(lambda k: keys_equal(k, KEY), 0.0, MULTILINK)
    body = b'{"gateway":"169.254.0.1","key":"123456","link":{"name":"v4","%s":1%s}}' % (
        field.encode(),
        b"0" * 400,
    )
    _, events = s.receive(
        wire.encode_frame(wire.AUTH, GOOD_AUTH[0], 1) + wire.encode_frame(wire.REGISTER, body, 2),
        0.0,
    )
    assert [type(e) for e in events] == [AuthSucceeded, ConnectionLost]
    (_, (cmd, seq, reply)) = decode_outbox(s.data_to_send())
    assert (cmd, seq) == (wire.REGISTER, 2) and messages.parse_reply(reply).error


@FUZZ
@given(chunked(CLIENT_GOOD, CLIENT_PRELUDE), st.booleans(), st.booleans())
def test_client_session_any_frames_any_state(chunks: list[bytes], offer: bool, link: bool) -> None:
    c = ClientSession(
        KEY,
        "169.254.0.1",
        ["198.18.1.0/24"],
        0.0,
        heartbeat_interval=0.02,
        heartbeat_timeout=5.0,
        features=SUPER if offer else frozenset(),
        link=LINK if link else None,
    )
    sent = decode_outbox(c.data_to_send())
    assert [cmd for cmd, _, _ in sent] == [wire.AUTH]
    authenticated = registered = False
    for i, chunk in enumerate(chunks):
        now = 0.03 * (i + 1)
        before = c.state
        packets, events = c.receive(chunk, now)
        if before is State.CLOSED:
            assert (packets, events) == ([], [])
        assert all(type(p) is memoryview and body_was_sent(p, chunks) for p in packets)
        for ev in events:
            assert isinstance(ev, CLIENT_EVENTS), ev
            if isinstance(ev, AuthSucceeded):
                assert not authenticated
                authenticated = True
                assert c.features <= c._offer
                # a client with a link goes on only with a router that agreed to multi-link
                assert (messages.FEATURE_MULTILINK in c.features) == link
            elif isinstance(ev, Registered):
                assert authenticated and not registered
                registered = True
            elif isinstance(ev, HeartbeatReceived):
                assert ev.rtt is None or ev.rtt >= 0
            elif isinstance(ev, Rejected | ConnectionLost):
                assert c.state is State.CLOSED
                if isinstance(ev, Rejected):
                    ev.error.encode()  # it is logged
        if packets:
            # the replies to AUTH and REGISTER may come in the same read as the data
            assert registered
        lost = c.tick(now)
        assert lost is None or c.state is State.CLOSED
        for cmd, _, body in decode_outbox(c.data_to_send()):
            if cmd == wire.REGISTER:
                assert authenticated
                req = messages.parse_register(body)
                assert req.key == KEY
                assert req.link == (LINK if link else None)
            else:
                assert cmd == wire.HEART_BEAT and registered and body == b""
        assert len(c._hb_sent) <= 17


# ---- FEC receive state ------------------------------------------------------------------


def shard(kind: int, index: int, seq: int, gid: int, k: int, m: int, body: bytes) -> bytes:
    return struct.pack(">BBIIBB", MAGIC, kind << 6 | index, seq, gid, k, m) + body


def data_shard(index: int, seq: int, gid: int, m: int, payload: bytes) -> bytes:
    return shard(KIND_DATA, index, seq, gid, 0, m, struct.pack(">H", len(payload)) + payload)


def held_bytes(rx: FecSession) -> int:
    total = 0
    for g in rx._groups.values():
        for part in (g.data or [], g.parity or []):
            total += sum(len(s) for s in part if s is not None)
    return total


def test_fec_receive_state_stays_under_its_cap_with_random_group_ids() -> None:
    """10,000 distinct random group ids at one instant (the TTL never helps): the group
    table stays at ``rx_groups``, and every data payload still goes up to KCP."""
    rnd = random.Random(7)
    cfg = FecConfig()
    rx = FecSession(cfg)
    delivered = peak = peak_bytes = 0
    for i, gid in enumerate(rnd.sample(range(1 << 32), 10_000)):
        if i % 3:
            # shard counts within the configured ones: other groups are never opened
            k = rnd.randint(1, cfg.data_shards)
            m = rnd.randint(1, cfg.parity_shards)
            d = data_shard(rnd.randrange(k), rnd.getrandbits(32), gid, m, b"p")
            delivered += len(rx.receive(d, 0.0))
        else:
            k, m = rnd.randint(1, cfg.data_shards), rnd.randint(1, cfg.parity_shards)
            rx.receive(shard(KIND_PARITY, rnd.randrange(m), i, gid, k, m, bytes(40)), 0.0)
        peak = max(peak, rx.open_groups)
        if i % 250 == 0:
            peak_bytes = max(peak_bytes, held_bytes(rx))
    assert peak == cfg.rx_groups, peak
    assert delivered >= 6000  # data shards are never held back, group state or not
    # what the table holds is bounded by what came in: whole shards, no expansion
    assert peak_bytes <= cfg.rx_groups * 64
    rx.poll(cfg.rx_group_ttl + 1)
    assert rx.open_groups == 0 and held_bytes(rx) == 0


def test_fec_receive_state_holds_at_most_rx_groups_times_64_shards() -> None:
    """The byte bound, as it stands: shards are kept only until their group can be decoded,
    which is when ``k`` of them are there (k <= 64), or when ``k`` is not yet known (no
    parity came) for up to 64 data shards. So at most ``rx_groups * 64`` shards, each as
    large as the record that carried it, for up to ``rx_group_ttl``. (Groups beyond the
    configured shard counts are never opened, so this takes a config of 64 + 64.)"""
    cfg = FecConfig(rx_groups=16, data_shards=64, parity_shards=64)
    seq = 0
    rx = FecSession(cfg)
    for gid in range(100):
        for i in range(62):
            rx.receive(data_shard(i, seq, gid, 64, b"x" * 96), 0.0)
            seq += 1
        for j in range(64):  # the second one completes the group, the rest are spare
            rx.receive(shard(KIND_PARITY, j, seq, gid, 64, 64, rnd_bytes(100, seq)), 0.0)
            seq += 1
    assert rx.open_groups == 16
    assert rx.stats.recovered + rx.stats.malformed == 100 * 2
    assert held_bytes(rx) == 0, "a decoded group still holds its shards"
    rx = FecSession(cfg)
    for gid in range(0, 200, 2):
        for i in range(64):  # k is never told: the group stays open
            rx.receive(data_shard(i, seq, gid, 64, b"x" * 96), 0.0)
            seq += 1
        for j in range(63):  # k = 64 told: one short of decoding
            rx.receive(shard(KIND_PARITY, j, seq, gid + 1, 64, 64, rnd_bytes(98, seq)), 0.0)
            seq += 1
    assert rx.open_groups == 16
    shard_len = HEADER_LEN + 2 + 96
    assert held_bytes(rx) == 8 * 64 * shard_len + 8 * 63 * shard_len


def rnd_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


fec_fields = st.tuples(
    st.sampled_from([KIND_DATA, KIND_PARITY, KIND_REPORT, 3]),
    st.integers(0, 63),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF) | st.integers(0, 3) | st.integers(0xFFFFFFFC, 0xFFFFFFFF),
    st.integers(0, 255) | st.integers(0, 8),
    st.integers(0, 255) | st.integers(0, 8),
)


@st.composite
def fec_datagrams(draw: st.DrawFn) -> bytes:
    kind, index, seq, gid, k, m = draw(fec_fields)
    if kind == KIND_DATA and draw(st.booleans()):
        payload = draw(st.binary(max_size=40))
        return data_shard(index, seq, gid, m, payload)
    return shard(kind, index, seq, gid, k, m, draw(st.binary(max_size=40)))


@FUZZ
@given(st.lists(fec_datagrams() | st.binary(max_size=30), max_size=60), st.data())
def test_fec_random_headers_over_the_whole_id_space(datagrams: list[bytes], data) -> None:
    rx = FecSession(FecConfig(rx_groups=8, adaptive=data.draw(st.booleans())))
    now = 0.0
    for d in datagrams:
        now += data.draw(st.sampled_from([0.0, 0.001, 0.3, 2.0]))
        out = rx.receive(d, now)
        assert all(type(p) is bytes for p in out)
        rx.poll(now)
        assert rx.open_groups <= 8
        assert 0 <= rx.parity <= rx.config.parity_shards
    # the sender side still works after whatever the receiver was told
    shards = rx.send(b"after", now)
    assert shards and shards[0].endswith(b"after")


# ---- KcpLink ----------------------------------------------------------------------------

NO_FEC = KcpParams(fec=FecParams(mode="off"))
WITH_FEC = KcpParams(fec=FecParams(mode="fixed", data_shards=4, parity_shards=2))
KCP_COMMANDS = [81, 82, 83, 84]  # PUSH, ACK, WASK, WINS
POOL = KcpPool()


@st.composite
def kcp_segments(draw: st.DrawFn) -> bytes:
    """KCP-shaped: conversation 0, any command, fragment, window, sequence and length."""
    data = draw(st.binary(max_size=48))
    length = draw(st.just(len(data)) | st.integers(0, 0xFFFFFFFF))
    cmd = draw(st.sampled_from(KCP_COMMANDS) | st.integers(0, 255))
    return (
        struct.pack(
            "<IBBHIIII",
            draw(st.just(0) | st.integers(0, 0xFFFFFFFF)),
            cmd,
            draw(st.integers(0, 255)),
            draw(st.integers(0, 0xFFFF)),
            draw(st.integers(0, 0xFFFFFFFF)),
            draw(st.integers(0, 8) | st.integers(0, 0xFFFFFFFF)),
            draw(st.integers(0, 8) | st.integers(0, 0xFFFFFFFF)),
            length,
        )
        + data
    )


kcp_records = st.lists(
    st.one_of(
        st.binary(max_size=64),
        kcp_segments(),
        st.lists(kcp_segments(), min_size=2, max_size=4).map(b"".join),
        fec_datagrams(),
        kcp_segments().map(lambda s: data_shard(0, 0, 0, 0, s)),
    ),
    max_size=25,
)


def exchange(a: KcpLink, b: KcpLink, payload: bytes, now: float, rounds: int = 400) -> bytes:
    """Run a's stream to b over a clean in-memory link; returns what b delivered."""
    a.write(payload, now)
    got = b""
    for _ in range(rounds):
        now += 0.01
        for rec in a.records_to_send():
            got += b.receive(rec, now)
        for rec in b.records_to_send():
            a.receive(rec, now)
        a.poll(now)
        b.poll(now)
        if len(got) >= len(payload) and a.pending_bytes == 0:
            break
    return got


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kcp_records, st.sampled_from([NO_FEC, WITH_FEC]))
def test_kcp_link_survives_any_records(records: list[bytes], params: KcpParams) -> None:
    link = KcpLink(params, POOL, 1363, 0.0)
    try:
        now = 0.0
        for r in records:
            now += 0.005
            link.feed(r, now)
            assert type(link.settle(now)) is bytes
            link.poll(now)
            link.records_to_send()
            assert link.next_deadline(now) is None or link.next_deadline(now) >= now
        # still a working object: it queues, sends and times out as before
        link.write(b"z" * 3000, now)
        assert link.pending_bytes > 0
        link.poll(now + 0.1)
        out = link.records_to_send()
        assert all(len(r) <= 1363 for r in out)
        # unless a segment announced a closed window, which KCP waits out by probing
        assert out or link.kcp.rmt_wnd == 0
        assert link.stats.records_in == sum(1 for r in records if r)
    finally:
        link.close()


def foreign_segment(rnd: random.Random, n: int) -> bytes:
    """A KCP segment of another conversation: its first byte may well be 0, as ours is."""
    conv = rnd.randrange(1, 1 << 24) << 8
    fields = (rnd.choice(KCP_COMMANDS), rnd.randrange(4), rnd.randrange(1 << 16))
    seq_fields = (rnd.getrandbits(32), rnd.randrange(64), rnd.randrange(64), n)
    return struct.pack("<IBBHIIII", conv, *fields, *seq_fields) + rnd.randbytes(n)


def foreign(rnd: random.Random, n: int) -> bytes:
    """What a peer may send that must not disturb the stream: no conversation-0 segment,
    but FEC shards with colliding group ids, parity of garbage and loss reports."""
    kind = rnd.randrange(5)
    if kind == 0:
        first = rnd.choice([b for b in range(1, 256) if b != MAGIC])
        return bytes([first]) + rnd.randbytes(n)
    if kind == 1:
        return foreign_segment(rnd, n)
    gid, seq = rnd.randrange(8), rnd.getrandbits(32)
    if kind == 2:
        return data_shard(rnd.randrange(4), seq, gid, rnd.randrange(3), foreign_segment(rnd, n))
    if kind == 3:
        k, m = rnd.randint(1, 6), rnd.randint(1, 4)
        return shard(KIND_PARITY, rnd.randrange(m), seq, gid, k, m, rnd.randbytes(n + 2))
    expected = rnd.randrange(1000)
    return shard(KIND_REPORT, 0, seq, 0, 0, 0, struct.pack(">II", expected, expected // 2))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.sampled_from([NO_FEC, WITH_FEC]))
def test_kcp_stream_is_exact_with_foreign_records_interleaved(seed: int, params) -> None:
    rnd = random.Random(seed)
    a = KcpLink(params, POOL, 1363, 0.0)
    b = KcpLink(params, POOL, 1363, 0.0)
    try:
        payload = rnd.randbytes(20_000)
        a.write(payload, 0.0)
        got = b""
        now = 0.0
        for _ in range(500):
            now += 0.01
            for rec in a.records_to_send():
                for _ in range(rnd.randint(0, 2)):
                    got += b.receive(foreign(rnd, rnd.randint(0, 80)), now)
                if rnd.random() >= 0.15:  # lost records: FEC and retransmission must work
                    got += b.receive(rec, now)
            for rec in b.records_to_send():
                a.receive(foreign(rnd, 30), now)
                a.receive(rec, now)
            a.poll(now)
            b.poll(now)
            if len(got) >= len(payload) and a.pending_bytes == 0:
                break
        assert got == payload
        assert b.stats.kcp_errors > 0
        assert exchange(b, a, b"and back", now) == b"and back"
    finally:
        a.close()
        b.close()


# ---- DTLS -------------------------------------------------------------------------------

PEER = ("127.0.3.1", 40000)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("fuzzkeys"))


def handshake(
    listener: dtls.CookieListener, peer=PEER, mtu: int = 1400
) -> tuple[dtls.DtlsSession, dtls.DtlsSession | None]:
    verify = dtls.Verification(insecure=True)
    client = dtls.DtlsSession.client(dtls.client_context(verify), verify, mtu, 0.0)
    server: dtls.DtlsSession | None = None
    to_server = client.step(0.0)
    for _ in range(10):
        to_client: list[bytes] = []
        for d in to_server:
            if server is None:
                replies, server = listener.receive(d, dtls.peer_key(peer), 0.0)
                to_client += replies
            else:
                to_client += server.receive(d, 0.0)[1]
        to_server = [o for d in to_client for o in client.receive(d, 0.0)[1]]
        if not to_server and not to_client:
            break
    return client, server


def record(ctype: int, epoch: int, seq: int, body: bytes, version: int = 0xFEFD) -> bytes:
    return (
        struct.pack(">BHH", ctype, version, epoch)
        + seq.to_bytes(6, "big")
        + (struct.pack(">H", len(body)) + body)
    )


@st.composite
def hello_like(draw: st.DrawFn) -> bytes:
    """Records that get past ``looks_like_dtls``: handshake type, ClientHello-shaped."""
    msg_type = draw(st.sampled_from([1, 1, 1, 3, 11, 16, 20]) | st.integers(0, 255))
    body = draw(st.binary(max_size=120))
    length = draw(st.just(len(body)) | st.integers(0, 0xFFFFFF))
    frag_off = draw(st.just(0) | st.integers(0, 0xFFFFFF))
    frag_len = draw(st.just(len(body)) | st.integers(0, 0xFFFFFF))
    hs = (
        bytes([msg_type])
        + length.to_bytes(3, "big")
        + draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
        + frag_off.to_bytes(3, "big")
        + frag_len.to_bytes(3, "big")
        + body
    )
    rec = record(
        draw(st.sampled_from([22, 22, 20, 21, 23])),
        draw(st.just(0) | st.integers(0, 0xFFFF)),
        draw(st.integers(0, 2**48 - 1)),
        hs,
        draw(st.sampled_from([0xFEFD, 0xFEFF, 0xFE00])),
    )
    cut = draw(st.none() | st.integers(0, len(rec)))
    return rec if cut is None else rec[:cut]


def first_hellos(listener: dtls.CookieListener, peer=PEER) -> tuple[bytes, bytes]:
    """A genuine first ClientHello, and the one carrying ``listener``'s cookie."""
    verify = dtls.Verification(insecure=True)
    client = dtls.DtlsSession.client(dtls.client_context(verify), verify, 1400, 0.0)
    first = client.step(0.0)[0]
    hvr, _ = listener.receive(first, dtls.peer_key(peer), 0.0)
    return first, client.receive(hvr[0], 0.0)[1][0]


# filled once per module by the fixture below: strategies draw from it lazily
_HELLOS: list[bytes] = []


@pytest.fixture(autouse=True, scope="module")
def _real_hellos(keys):
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    _HELLOS[:] = first_hellos(dtls.CookieListener(ctx, jar))
    yield


@st.composite
def mutated_hellos(draw: st.DrawFn) -> bytes:
    buf = bytearray(draw(st.sampled_from(_HELLOS)))
    for _ in range(draw(st.integers(0, 4))):
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    return bytes(buf[: draw(st.integers(0, len(buf)))])


datagrams = st.one_of(st.binary(max_size=200), hello_like(), mutated_hellos())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(datagrams, min_size=1, max_size=30))
def test_dtls_listener_takes_any_datagram_sequence_then_still_handshakes(
    keys, datagrams_in: list[bytes]
) -> None:
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    listener = dtls.CookieListener(ctx, jar)
    for i, d in enumerate(datagrams_in):
        replies, sess = listener.receive(d, dtls.peer_key(("127.0.3.9", 1000 + i)), 0.0)
        assert all(len(r) <= 1400 for r in replies)
        # no cookie was issued to these addresses: nothing may get state
        assert sess is None
    client, server = handshake(listener)
    assert server is not None and server.established and client.established


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(datagrams, min_size=1, max_size=10))
def test_dtls_half_open_server_session_takes_garbage(keys, datagrams_in: list[bytes]) -> None:
    """After the cookie, before the handshake finishes: the session gets the garbage."""
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    listener = dtls.CookieListener(ctx, jar)
    _, with_cookie = first_hellos(listener)
    _, server = listener.receive(with_cookie, dtls.peer_key(PEER), 0.0)
    assert server is not None and not server.established
    for d in datagrams_in:
        records, out = server.receive(d, 0.0)
        assert records == [] or server.established
        assert all(len(o) <= 1400 for o in out)
        server.handle_timeout(0.0)
        assert server.timeout() is None or server.timeout() >= 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.builds(
            lambda ctype, epoch, seq, body: record(ctype, epoch, seq, body),
            st.sampled_from([20, 21, 22, 23]),
            st.integers(0, 3),
            st.integers(0, 64),
            st.binary(max_size=1200),
        )
        | st.binary(max_size=300),
        min_size=1,
        max_size=40,
    )
)
def test_dtls_established_session_survives_spoofed_garbage(keys, junk: list[bytes]) -> None:
    """Anyone can put the peer's address on a datagram: nothing unauthenticated may close
    the association, whether it comes alone or coalesced into a GRO-sized run."""
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    client, server = handshake(dtls.CookieListener(ctx, jar))
    assert server is not None and server.established
    for d in junk:
        assert server.receive(d, 0.0)[0] == []
    coalesced = b"".join(junk) * (1 + 20_000 // max(1, len(b"".join(junk))))
    assert server.receive(coalesced, 0.0)[0] == []
    assert not server.closed, server.error
    good = client.send(b"still here")
    assert good is not None
    assert server.receive(good, 0.0)[0] == [b"still here"]


def test_fec_receive_bytes_stay_within_rx_bytes_and_max_shard() -> None:
    """A peer filling groups with the largest shards it may send, never completing one:
    what is kept stays near ``rx_bytes`` (plus the group being filled), whatever
    ``rx_groups`` allows, and a shard longer than ``max_shard`` is not kept at all."""
    cfg = FecConfig(rx_groups=256, rx_bytes=1 << 20, max_shard=2000)
    rx = FecSession(cfg)
    big = b"x" * (2000 - HEADER_LEN - 2)
    seq = 0
    peak = 0
    for gid in range(200):
        for i in range(64):  # k never told: all 64 kept
            rx.receive(data_shard(i, seq, gid, 8, big), 0.0)
            seq += 1
        assert rx.held_bytes == held_bytes(rx)
        peak = max(peak, rx.held_bytes)
    assert peak <= cfg.rx_bytes + 64 * 2000, peak
    assert rx.open_groups < 20  # the byte budget, not rx_groups, is what bounds it here
    before = rx.stats.malformed
    assert rx.receive(data_shard(0, seq, 9999, 8, b"y" * 2000), 0.0) == []
    assert rx.stats.malformed == before + 1
    # decoding and forgetting give the bytes back
    rx._expire(10.0)
    assert rx.held_bytes == 0 == held_bytes(rx)

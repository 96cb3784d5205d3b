"""AUTH / REGISTER / reply bodies: Go shapes, leniency about extras, strictness about types."""

from __future__ import annotations

import contextlib
import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polevpn.proto import messages, wire
from polevpn.proto.messages import MessageError, parse_auth, parse_register, parse_reply

GO_AUTH_BODY = b'{"key":"123456"}'
GO_REGISTER_BODY = b'{"gateway":"169.254.0.1","key":"123456","network":["198.18.10.0/24"]}'


# ---- AUTH -------------------------------------------------------------------------------


def test_parse_go_auth() -> None:
    assert parse_auth(GO_AUTH_BODY) == messages.AuthRequest(key="123456")
    assert parse_auth(memoryview(GO_AUTH_BODY)).key == "123456"


def test_auth_missing_key_is_empty() -> None:
    assert parse_auth(b"{}").key == ""


def test_auth_extra_fields_ignored() -> None:
    body = b'{"key":"k","version":3,"features":["kcp"],"nested":{"a":null}}'
    assert parse_auth(body).key == "k"


def test_auth_unicode_key_round_trip() -> None:
    assert parse_auth(messages.encode_auth("kéy-\u2603")).key == "kéy-\u2603"


@pytest.mark.parametrize(
    "body",
    [
        b'{"key":123456}',
        b'{"key":["123456"]}',
        b'{"key":{"k":1}}',
        b'{"key":true}',
        b"[]",
        b'"123456"',
        b"123",
        b"null",
        b"",
        b"{",
        b"not json",
        b"\xff\xfe\x00garbage",
        b'{"key":"\xff"}',
    ],
)
def test_auth_bad_bodies(body: bytes) -> None:
    with pytest.raises(MessageError):
        parse_auth(body)


# ---- REGISTER ---------------------------------------------------------------------------


def test_parse_go_register() -> None:
    req = parse_register(GO_REGISTER_BODY)
    assert req.gateway == ipaddress.IPv4Address("169.254.0.1")
    assert req.key == "123456"
    assert req.networks == (ipaddress.IPv4Network("198.18.10.0/24"),)


def test_register_round_trip() -> None:
    body = messages.encode_register(
        "169.254.0.9", "secret", ["198.18.10.0/24", "2001:db8:10::/64", "198.18.0.0/15"]
    )
    req = parse_register(body)
    assert req.gateway == ipaddress.ip_address("169.254.0.9")
    assert req.key == "secret"
    assert [str(n) for n in req.networks] == ["198.18.10.0/24", "2001:db8:10::/64", "198.18.0.0/15"]


def test_register_network_as_single_string() -> None:
    body = b'{"gateway":"169.254.0.1","key":"k","network":"198.18.10.0/24"}'
    assert parse_register(body).networks == (ipaddress.ip_network("198.18.10.0/24"),)


@pytest.mark.parametrize("network", ['""', "null", "[]"])
def test_register_empty_networks(network: str) -> None:
    body = f'{{"gateway":"169.254.0.1","key":"k","network":{network}}}'.encode()
    assert parse_register(body).networks == ()


def test_register_network_missing_is_empty() -> None:
    assert parse_register(b'{"gateway":"169.254.0.1","key":"k"}').networks == ()


def test_register_host_bits_are_masked() -> None:
    body = b'{"gateway":"169.254.0.1","network":["198.18.10.7/24"]}'
    assert parse_register(body).networks == (ipaddress.ip_network("198.18.10.0/24"),)


def test_register_ipv6_gateway() -> None:
    body = b'{"gateway":"2001:db8:ff::1","key":"k","network":["2001:db8:10::/64"]}'
    req = parse_register(body)
    assert req.gateway == ipaddress.IPv6Address("2001:db8:ff::1")
    assert req.networks == (ipaddress.IPv6Network("2001:db8:10::/64"),)


def test_register_extra_fields_ignored() -> None:
    obj = json.loads(GO_REGISTER_BODY)
    obj.update({"gateway6": "2001:db8::1", "mtu": 1400, "future": {"x": [1, 2]}})
    req = parse_register(json.dumps(obj).encode())
    assert req == parse_register(GO_REGISTER_BODY)


@pytest.mark.parametrize(
    "obj",
    [
        {"key": "k", "network": []},  # gateway missing
        {"gateway": None, "key": "k"},
        {"gateway": 169, "key": "k"},
        {"gateway": ["169.254.0.1"], "key": "k"},
        {"gateway": "169.254.0", "key": "k"},
        {"gateway": "not-an-ip", "key": "k"},
        {"gateway": "", "key": "k"},
        {"gateway": "169.254.0.1", "key": 5},
        {"gateway": "169.254.0.1", "key": "k", "network": 5},
        {"gateway": "169.254.0.1", "key": "k", "network": {"a": "198.18.0.0/15"}},
        {"gateway": "169.254.0.1", "key": "k", "network": [5]},
        {"gateway": "169.254.0.1", "key": "k", "network": [None]},
        {"gateway": "169.254.0.1", "key": "k", "network": ["198.18.0.0/33"]},
        {"gateway": "169.254.0.1", "key": "k", "network": ["198.18.0.0/15", "bogus"]},
        {"gateway": "169.254.0.1", "key": "k", "network": "bogus"},
        {"gateway": "169.254.0.1", "key": "k", "network": [["198.18.0.0/15"]]},
    ],
)
def test_register_bad_types(obj: dict) -> None:
    with pytest.raises(MessageError):
        parse_register(json.dumps(obj).encode())


@pytest.mark.parametrize("body", [b"[]", b"", b"{", b'"x"', b"\x80"])
def test_register_not_an_object(body: bytes) -> None:
    with pytest.raises(MessageError):
        parse_register(body)


# ---- replies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"{}", b'{"error":""}', b'{"error":null}', b'{"other":"x"}', messages.OK_BODY]
)
def test_reply_success(body: bytes) -> None:
    assert parse_reply(body) == messages.Reply(error=None)


def test_reply_error() -> None:
    assert parse_reply(b'{"error":"invalid key"}').error == "invalid key"
    assert parse_reply(messages.encode_error('bad "network"')).error == 'bad "network"'


def test_reply_error_non_string_is_stringified() -> None:
    reply = parse_reply(b'{"error":42}')
    assert reply.error == "42"


@pytest.mark.parametrize("body", [b"", b"[]", b"null", b"nope", b'"error"', b"\xc3"])
def test_reply_bad(body: bytes) -> None:
    with pytest.raises(MessageError):
        parse_reply(body)


def test_encode_error_is_compact_json() -> None:
    assert messages.encode_error("invalid key") == b'{"error":"invalid key"}'


def test_message_error_is_value_error() -> None:
    # callers that only know ValueError still catch it
    assert issubclass(MessageError, ValueError)


# ---- fuzz -------------------------------------------------------------------------------

PARSERS = [parse_auth, parse_register, parse_reply]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["169.254.0.1", "::1", "198.18.0.0/15", "2001:db8::/32", "1.2.3.4/33"]),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)

# objects that put arbitrary values into the fields the parsers actually read
shaped_objects = st.fixed_dictionaries(
    {},
    optional={
        "key": json_values,
        "gateway": json_values,
        "network": json_values,
        "error": json_values,
    },
)


def only_message_errors(parse, body: bytes) -> None:
    with contextlib.suppress(MessageError):
        parse(body)


@given(st.binary(max_size=300))
def test_fuzz_bytes(body: bytes) -> None:
    for parse in PARSERS:
        only_message_errors(parse, body)


@given(json_values)
def test_fuzz_json_values(value: object) -> None:
    body = json.dumps(value).encode()
    for parse in PARSERS:
        only_message_errors(parse, body)


@given(shaped_objects, st.dictionaries(st.text(max_size=8), json_values, max_size=3))
def test_fuzz_shaped_objects(obj: dict, extra: dict) -> None:
    merged = {**extra, **obj}
    body = json.dumps(merged).encode()
    for parse in PARSERS:
        only_message_errors(parse, body)


@given(st.text(max_size=200))
def test_fuzz_text(text: str) -> None:
    for parse in PARSERS:
        only_message_errors(parse, text.encode("utf-8", "surrogatepass"))


@given(
    st.ip_addresses(),
    st.text(),
    st.lists(st.ip_addresses().map(lambda a: f"{a}/{a.max_prefixlen}"), max_size=5),
)
def test_register_round_trip_any(addr, key: str, nets: list[str]) -> None:
    req = parse_register(messages.encode_register(str(addr), key, nets))
    assert req.gateway == addr
    assert req.key == key
    assert [str(n) for n in req.networks] == nets


@pytest.mark.parametrize("parse", PARSERS)
def test_deeply_nested_json_is_a_message_error(parse) -> None:
    # fits in one frame (MAX_BODY is 65527); an unauthenticated peer can send it as AUTH
    body = b'{"key":' + b"[" * 32000 + b"]" * 32000 + b"}"
    assert len(body) <= wire.MAX_BODY
    with pytest.raises(MessageError):
        parse(body)


@pytest.mark.parametrize(
    ("body", "features"),
    [
        (b'{"key":"k","features":["super-packets"]}', {"super-packets"}),
        (b'{"key":"k","features":["super-packets","from-the-future",7,null]}', {"super-packets"}),
        (b'{"key":"k","features":"super-packets"}', set()),
        (b'{"key":"k","features":{"super-packets":true}}', set()),
        (b'{"key":"k"}', set()),
    ],
)
def test_auth_features_known_names_only(body: bytes, features: set[str]) -> None:
    assert messages.parse_auth(body).features == features
    assert messages.parse_reply(body.replace(b'"key":"k",', b"")).features == features


def test_auth_without_features_is_go_bytes() -> None:
    assert messages.encode_auth("123456") == b'{"key":"123456"}'
    assert messages.encode_ok() == b"{}"


def test_error_reply_carries_no_features() -> None:
    reply = messages.parse_reply(b'{"error":"invalid key","features":["super-packets"]}')
    assert reply.error == "invalid key" and reply.features == frozenset()


@pytest.mark.parametrize(
    "body",
    [
        b'{"key":"\\ud800"}',
        b'{"key":"ok\\udfff"}',
        b'{"gateway":"169.254.0.1","key":"\\udc80","network":[]}',
    ],
)
def test_key_with_a_lone_surrogate_is_a_message_error(body: bytes) -> None:
    # json turns the escape into a str that cannot be encoded: the key comparison on UTF-8
    # bytes raised UnicodeEncodeError, an unauthenticated peer's way to a router traceback
    parse = parse_register if b"gateway" in body else parse_auth
    with pytest.raises(MessageError):
        parse(body)


def test_key_with_a_surrogate_pair_is_fine() -> None:
    assert parse_auth(b'{"key":"\\ud83d\\ude00"}').key == "\U0001f600"


def test_reply_error_with_a_lone_surrogate_can_be_logged() -> None:
    err = parse_reply(b'{"error":"no \\ud800 way"}').error
    assert err is not None and "no" in err
    err.encode()  # what a log handler does with it


@pytest.mark.parametrize(
    "obj",
    [
        {"gateway": "\u00e9" * 30000, "key": "k"},
        {"gateway": "169.254.0.1", "key": "k", "network": ["\U0001f600" * 15000]},
        {"gateway": "\x01" * 10000, "key": "k"},
    ],
)
def test_error_for_a_long_bad_value_fits_a_reply_frame(obj: dict) -> None:
    # the router sends the message back in its REGISTER reply; quoting a 60 KB value whole
    # made a body JSON escaping grew past MAX_BODY, and encode_frame raised in the session
    body = json.dumps(obj, ensure_ascii=False).encode()
    assert len(body) <= wire.MAX_BODY
    with pytest.raises(MessageError) as exc:
        parse_register(body)
    reply = messages.encode_error(str(exc.value))
    assert len(reply) < 1024
    assert "characters" in str(exc.value)


# ---- multi-link: REGISTER's "link" object ------------------------------------------------

LINK_REGISTER = {"gateway": "169.254.0.1", "key": "123456", "network": ["198.18.10.0/24"]}


def register_with_link(link: object) -> bytes:
    return json.dumps({**LINK_REGISTER, "link": link}).encode()


def test_register_link_round_trip() -> None:
    link = messages.LinkRequest("v6.backup_2", weight=2.5, backup=True, heartbeat=0.1, timeout=0.3)
    body = messages.encode_register("169.254.0.1", "123456", ["198.18.10.0/24"], link)
    assert json.loads(body)["link"] == {
        "name": "v6.backup_2",
        "weight": 2.5,
        "backup": True,
        "heartbeat_ms": 100,
        "timeout_ms": 300,
    }
    req = parse_register(body)
    assert req.link == link
    assert req.networks == (ipaddress.ip_network("198.18.10.0/24"),)


def test_register_link_defaults() -> None:
    req = parse_register(register_with_link({"name": "v4"}))
    assert req.link == messages.LinkRequest("v4", weight=1.0, backup=False, heartbeat=0.25)
    assert req.link.timeout == 1.0


@pytest.mark.parametrize("link", [None, "absent"])
def test_register_without_link_is_plain(link: object) -> None:
    obj = dict(LINK_REGISTER) if link == "absent" else {**LINK_REGISTER, "link": link}
    assert parse_register(json.dumps(obj).encode()).link is None


def test_register_without_link_is_go_bytes() -> None:
    # a single-link gateway's REGISTER stays byte for byte what PoleVPN's Go gateway sends
    assert messages.encode_register("169.254.0.1", "123456", ["198.18.10.0/24"]) == GO_REGISTER_BODY
    assert messages.encode_register("169.254.0.1", "123456", ["198.18.10.0/24"], None) == (
        GO_REGISTER_BODY
    )
    assert parse_register(GO_REGISTER_BODY).link is None


@pytest.mark.parametrize("name", ["a", "A" * 32, "link-1", "v4.primary", "under_score", "0", "._-"])
def test_register_link_names_accepted(name: str) -> None:
    req = parse_register(register_with_link({"name": name}))
    assert req.link is not None and req.link.name == name


@pytest.mark.parametrize(
    ("link", "words"),
    [
        ([], "not a JSON object"),
        ("v4", "not a JSON object"),
        (7, "not a JSON object"),
        ({}, "name"),
        ({"name": None}, "name"),
        ({"name": 4}, "name int"),
        ({"name": ["v4"]}, "name list"),
        ({"name": ""}, "name"),
        ({"name": "A" * 33}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": "slash/y"}, "name"),
        ({"name": "v4\n"}, "name"),
        ({"name": "é"}, "name"),
        ({"name": "v4", "weight": 0}, "weight 0 is not within 0.001..1000"),
        ({"name": "v4", "weight": 0.0009}, "weight"),
        ({"name": "v4", "weight": -1}, "weight"),
        ({"name": "v4", "weight": 1000.5}, "weight"),
        ({"name": "v4", "weight": True}, "weight is not a number"),
        ({"name": "v4", "weight": False}, "weight is not a number"),
        ({"name": "v4", "weight": "1"}, "weight is not a number"),
        ({"name": "v4", "weight": None}, "weight is not a number"),
        ({"name": "v4", "weight": float("nan")}, "weight"),
        ({"name": "v4", "weight": float("inf")}, "weight"),
        ({"name": "v4", "weight": float("-inf")}, "weight"),
        ({"name": "v4", "backup": 1}, "backup is not true or false"),
        ({"name": "v4", "backup": "true"}, "backup"),
        ({"name": "v4", "backup": None}, "backup"),
        ({"name": "v4", "heartbeat_ms": 9}, "heartbeat_ms"),
        ({"name": "v4", "heartbeat_ms": 60_001, "timeout_ms": 600_000}, "heartbeat_ms"),
        ({"name": "v4", "heartbeat_ms": "250"}, "heartbeat_ms is not a number"),
        ({"name": "v4", "heartbeat_ms": float("nan")}, "heartbeat_ms"),
        ({"name": "v4", "timeout_ms": 99}, "timeout_ms"),
        ({"name": "v4", "timeout_ms": 600_001}, "timeout_ms"),
        ({"name": "v4", "timeout_ms": True}, "timeout_ms is not a number"),
        ({"name": "v4", "timeout_ms": float("inf")}, "timeout_ms"),
        ({"name": "v4", "heartbeat_ms": 300, "timeout_ms": 300}, "longer than heartbeat_ms"),
        ({"name": "v4", "heartbeat_ms": 500, "timeout_ms": 400}, "longer than heartbeat_ms"),
        # the default heartbeat (250 ms) against a short timeout
        ({"name": "v4", "timeout_ms": 200}, "longer than heartbeat_ms"),
    ],
)
def test_register_link_bad(link: object, words: str) -> None:
    with pytest.raises(MessageError) as exc:
        parse_register(register_with_link(link))
    assert words in str(exc.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("weight", 0.001),
        ("weight", 1000),
        ("heartbeat_ms", 10),
        ("timeout_ms", 600_000),
        ("timeout_ms", 100),
    ],
)
def test_register_link_range_ends_accepted(field: str, value: float) -> None:
    link = {"name": "v4", field: value}
    if field == "timeout_ms" and value == 100:
        link["heartbeat_ms"] = 99
    req = parse_register(register_with_link(link))
    assert req.link is not None
    got = {"weight": req.link.weight, "heartbeat_ms": req.link.heartbeat * 1000}
    got["timeout_ms"] = req.link.timeout * 1000
    assert got[field] == pytest.approx(value)


def test_register_link_extra_fields_ignored() -> None:
    req = parse_register(register_with_link({"name": "v4", "mtu": 1400, "future": [1]}))
    assert req.link == messages.LinkRequest("v4")


def test_register_link_error_for_a_long_name_fits_a_reply_frame() -> None:
    # the router sends the message back in its REGISTER reply
    with pytest.raises(MessageError) as exc:
        parse_register(register_with_link({"name": "\u00e9" * 30000}))
    assert len(messages.encode_error(str(exc.value))) < 1024


@pytest.mark.parametrize("field", ["weight", "heartbeat_ms", "timeout_ms"])
def test_register_link_huge_integer_is_a_message_error(field: str) -> None:
    # JSON integers have no size limit: an int too large for a float must be refused like
    # any other out-of-range number, not escape as OverflowError
    body = register_with_link({"name": "v4", field: 10**400})
    with pytest.raises(MessageError) as exc:
        parse_register(body)
    assert len(messages.encode_error(str(exc.value))) < 1024


def test_auth_features_with_multi_link() -> None:
    both = frozenset({messages.FEATURE_SUPER, messages.FEATURE_MULTILINK})
    body = messages.encode_auth("123456", both)
    assert json.loads(body) == {"key": "123456", "features": ["multi-link", "super-packets"]}
    assert parse_auth(body).features == both
    assert parse_reply(messages.encode_ok(both)).features == both
    only = frozenset({messages.FEATURE_MULTILINK})
    assert parse_auth(b'{"key":"k","features":["multi-link","x"]}').features == only
    assert messages.encode_ok(only) == b'{"features":["multi-link"]}'


link_objects = st.fixed_dictionaries(
    {"name": st.from_regex(messages.LINK_NAME, fullmatch=True)},
    optional={
        "weight": st.floats(0.001, 1000),
        "backup": st.booleans(),
    },
)


@given(link_objects, st.integers(10, 60_000), st.integers(1, 540_000))
def test_register_link_round_trip_any(link: dict, heartbeat_ms: int, extra_ms: int) -> None:
    timeout_ms = min(600_000, max(100, heartbeat_ms + extra_ms))
    link = {**link, "heartbeat_ms": heartbeat_ms, "timeout_ms": timeout_ms}
    req = parse_register(register_with_link(link)).link
    assert req is not None
    again = parse_register(messages.encode_register("169.254.0.1", "k", [], req)).link
    assert again == req
    assert (req.name, req.weight, req.backup) == (
        link["name"],
        link.get("weight", 1.0),
        link.get("backup", False),
    )
    assert round(req.heartbeat * 1000) == heartbeat_ms
    assert round(req.timeout * 1000) == timeout_ms


@given(
    st.dictionaries(
        st.sampled_from(["name", "weight", "backup", "heartbeat_ms", "timeout_ms"]),
        json_values,
        max_size=5,
    )
)
def test_fuzz_link_object(link: dict) -> None:
    only_message_errors(parse_register, register_with_link(link))


# ---- address fields and body encoding (issue 20 finding 9 and informational) ----------------


@pytest.mark.parametrize(
    "gateway",
    [
        "2001:db8:55::1%x",  # a zone ID: a second "address" next to 2001:db8:55::1
        "fe80::1%eth0",
        "2001:db8:55::1%\x1b[31m level=error peer=198.18.9.9",
        "169.254.0.1\n",
        "169.254.0.1\x00",
        " 169.254.0.1",
        "\u0661\u0666\u0669.254.0.1",
        "169.254.0.1\u200b",
    ],
)
def test_register_refuses_zone_ids_and_control_characters_in_gateway(gateway: str) -> None:
    body = json.dumps({"gateway": gateway, "key": "k", "network": []}).encode()
    with pytest.raises(MessageError, match="is not an IP address") as err:
        parse_register(body)
    assert not any(ch < " " or ch == "\x7f" for ch in str(err.value)), "raw bytes in the error"


@pytest.mark.parametrize(
    "network",
    [
        "fe80::%eth0/64",
        "2001:db8:55::%x/64",
        "198.18.10.0/24\n",
        "198.18.10.0/24\x1b",
        "198.18.10.0\t/24",
        "198.18.10.0/\u0662\u0664",
    ],
)
def test_register_refuses_zone_ids_and_control_characters_in_networks(network: str) -> None:
    body = json.dumps({"gateway": "169.254.0.1", "key": "k", "network": [network]}).encode()
    with pytest.raises(MessageError, match="is not a CIDR") as err:
        parse_register(body)
    assert not any(ch < " " or ch == "\x7f" for ch in str(err.value))


def test_register_address_forms_still_accepted() -> None:
    body = json.dumps(
        {
            "gateway": "2001:DB8:55::1",
            "key": "k",
            "network": ["198.18.10.0/24", "2001:db8:10::/64", "::ffff:198.18.0.0/112", "::/0"],
        }
    ).encode()
    req = parse_register(body)
    assert req.gateway == ipaddress.ip_address("2001:db8:55::1")
    assert [str(n) for n in req.networks][-1] == "::/0"
    assert parse_register(body.replace(b'"network"', b'"network":"198.18.1.1","x"')).networks


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be"])
def test_bodies_that_are_not_utf8_are_refused(encoding: str) -> None:
    auth = GO_AUTH_BODY.decode().encode(encoding)
    register = GO_REGISTER_BODY.decode().encode(encoding)
    assert json.loads(auth) == {"key": "123456"}, "json.loads alone would take it"
    # without a byte-order mark, UTF-16 and UTF-32 ASCII are valid UTF-8 with NULs in it
    with pytest.raises(MessageError, match="not UTF-8|not JSON"):
        parse_auth(auth)
    with pytest.raises(MessageError, match="not UTF-8|not JSON"):
        parse_register(register)
    with pytest.raises(MessageError, match="not UTF-8|not JSON"):
        parse_reply("{}".encode(encoding))


def test_a_utf8_byte_order_mark_is_refused() -> None:
    with pytest.raises(MessageError, match="not JSON"):
        parse_auth(b"\xef\xbb\xbf" + GO_AUTH_BODY)


@pytest.mark.parametrize(
    "body",
    [
        b'{"key":"wrong","key":"123456"}',
        b'{"key":"123456","features":[],"features":["super-packets"]}',
    ],
)
def test_auth_with_a_duplicated_key_is_refused(body: bytes) -> None:
    with pytest.raises(MessageError, match="appears twice"):
        parse_auth(body)


@pytest.mark.parametrize(
    "body",
    [
        GO_REGISTER_BODY[:-1] + b',"gateway":"169.254.0.9"}',
        GO_REGISTER_BODY[:-1] + b',"network":["198.18.99.0/24"]}',
        b'{"gateway":"169.254.0.1","key":"123456","link":{"name":"a","name":"b"}}',
    ],
)
def test_register_with_a_duplicated_key_is_refused(body: bytes) -> None:
    with pytest.raises(MessageError, match="appears twice"):
        parse_register(body)


def test_go_bytes_still_accepted() -> None:
    assert parse_auth(GO_AUTH_BODY).key == "123456"
    req = parse_register(GO_REGISTER_BODY)
    assert str(req.gateway) == "169.254.0.1"
    assert [str(n) for n in req.networks] == ["198.18.10.0/24"]
    assert parse_reply(b"{}").error is None
    assert parse_reply(b'{"error":"invalid key"}').error == "invalid key"
    # UTF-8 beyond ASCII is UTF-8
    assert parse_auth('{"key":"kéy"}'.encode()).key == "kéy"

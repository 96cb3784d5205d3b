"""Structured log lines: one line per record, logfmt fields, values never parsed from text."""

from __future__ import annotations

import logging
import sys

from hypothesis import given
from hypothesis import strategies as st

from polevpn.common.logfmt import LogfmtFormatter, kv, lines, pairs, parse, quote, render


def _record(msg: str, *args: object, fields: dict | None = None, level=logging.INFO):
    record = logging.LogRecord("polevpn.router", level, __file__, 1, msg, args, None)
    if fields is not None:
        record.__dict__.update(kv(**fields))
    return record


def test_event_and_fields() -> None:
    line = render(
        "registered", {"gateway": "169.254.0.1", "transport": "kcp", "networks": "198.18.10.0/24"}
    )
    assert line == "event=registered gateway=169.254.0.1 transport=kcp networks=198.18.10.0/24"


def test_several_words_and_spaced_values_are_quoted() -> None:
    line = render("auth rejected", {"peer": "198.19.0.2:5", "reason": 'invalid "key"'})
    assert line == 'msg="auth rejected" peer=198.19.0.2:5 reason="invalid \\"key\\""'
    assert parse(line) == {
        "msg": "auth rejected",
        "peer": "198.19.0.2:5",
        "reason": 'invalid "key"',
    }


def test_values_are_typed_and_empty_ones_kept() -> None:
    line = render("x y", {"backup": False, "up": True, "none": None, "n": 3, "empty": ""})
    assert line == 'msg="x y" backup=false up=true none=- n=3 empty='


def test_free_text_is_one_msg() -> None:
    assert render("connection lost: reset") == 'msg="connection lost: reset"'
    assert render("") == 'msg=""'


INJECTED = "x peer=198.18.9.9 gateway=169.254.0.1"


def test_a_peer_supplied_value_cannot_add_fields() -> None:
    # issue 19 bug 7: a gateway name that looks like pairs stays one field
    line = LogfmtFormatter().format(_record("registered", fields={"gateway": INJECTED}))
    got = pairs(line)
    assert [k for k, _ in got] == ["time", "level", "logger", "event", "gateway"]
    assert dict(got)["gateway"] == INJECTED


def test_a_message_is_never_parsed_into_fields() -> None:
    # the same value interpolated into the text (a call site not converted) is only text
    line = LogfmtFormatter().format(_record("registered gateway=%s", INJECTED))
    fields = parse(line)
    assert "peer" not in fields and "gateway" not in fields
    assert fields["msg"] == f"registered gateway={INJECTED}"


def test_control_characters_are_escaped() -> None:
    nasty = "a\x1b[31mred\x00\x7f\x85\u2028b\nlevel=error peer=1"
    line = LogfmtFormatter().format(
        _record("link up", fields={"gateway": nasty}, level=logging.WARNING)
    )
    assert line.isprintable() and len(line.splitlines()) == 1
    assert "\x1b" not in line and "\\x1b" in line
    got = pairs(line)
    assert [k for k, _ in got] == ["time", "level", "logger", "msg", "gateway"]
    assert dict(got)["gateway"] == nasty and dict(got)["level"] == "warning"
    # a bare-looking value with a control character in it is quoted too
    assert quote("ab\x1bc") == '"ab\\x1bc"'


def test_bad_keys_do_not_break_the_line() -> None:
    line = render("x", {"a b=c": "v"})
    assert parse(line) == {"event": "x", "field_a_b_c": "v"}


def test_lines_formats_captured_records() -> None:
    rec = _record("api listening", fields={"address": "127.0.0.1", "port": 8080})
    assert lines([rec])[0].endswith('msg="api listening" address=127.0.0.1 port=8080')


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
word = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)


@given(text, st.dictionaries(word, text, max_size=6))
def test_one_line_and_everything_comes_back(message: str, fields: dict[str, str]) -> None:
    line = LogfmtFormatter().format(_record("%s", message, fields=fields))
    assert line.isprintable()
    got = pairs(line)
    assert got[3][1] == message
    assert got[4:] == list(fields.items())


def test_formatter_line_with_traceback() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = _record("closing", fields={"peer": "x"}, level=logging.ERROR)
        record.exc_info = sys.exc_info()
    line = LogfmtFormatter().format(record)
    assert "\n" not in line
    fields = parse(line)
    assert fields["level"] == "error" and fields["logger"] == "polevpn.router"
    assert fields["event"] == "closing" and fields["peer"] == "x"
    assert fields["time"].endswith("Z") and "T" in fields["time"]
    assert "ValueError: bad\nthing" in fields["exc"]

"""Structured log lines: one line per record, logfmt fields, the message recoverable."""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from polevpn.logfmt import LogfmtFormatter, pairs, parse, render


def _message(fields: list[tuple[str, str]]) -> str:
    """The message ``render`` was given, rebuilt from its fields."""
    parts = []
    for i, (key, value) in enumerate(fields):
        if i == 0 and key in ("event", "msg"):
            parts.append(value)
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def test_event_and_pairs() -> None:
    line = render("registered gateway=169.254.0.1 transport=kcp networks=198.18.10.0/24,-")
    assert line == "event=registered gateway=169.254.0.1 transport=kcp networks=198.18.10.0/24,-"


def test_several_words_and_spaced_values_are_quoted() -> None:
    line = render('auth rejected peer=198.19.0.2:5 reason=invalid "key"')
    assert line == 'msg="auth rejected" peer=198.19.0.2:5 reason="invalid \\"key\\""'
    assert parse(line) == {
        "msg": "auth rejected",
        "peer": "198.19.0.2:5",
        "reason": 'invalid "key"',
    }


def test_free_text_is_one_msg() -> None:
    assert render("connection lost: reset") == 'msg="connection lost: reset"'
    assert render("") == 'msg=""'


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
word = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
shaped = st.lists(st.one_of(text, word.map(lambda w: w + "="), st.tuples(word, text).map("=".join)))


@given(st.one_of(text, shaped.map(" ".join)))
def test_one_line_and_the_message_comes_back(message: str) -> None:
    line = render(message)
    assert "\n" not in line and "\r" not in line
    assert _message(pairs(line)) == message


def test_formatter_line_with_traceback() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord(
            "polevpn.router", logging.ERROR, __file__, 1, "closing peer=%s", ("x",), True
        )
        import sys

        record.exc_info = sys.exc_info()
    line = LogfmtFormatter().format(record)
    assert "\n" not in line
    fields = parse(line)
    assert fields["level"] == "error" and fields["logger"] == "polevpn.router"
    assert fields["event"] == "closing" and fields["peer"] == "x"
    assert fields["time"].endswith("Z") and "T" in fields["time"]
    assert "ValueError: bad\nthing" in fields["exc"]

"""One log line per event, in logfmt (``key=value``), for journald and log shippers.

Every line starts ``time=... level=... logger=...``, then the message, then the record's
fields. The message is fixed text chosen by the code: a single word becomes ``event=``,
anything else one quoted ``msg``. Values that vary, above all anything a peer sent, go in
structured fields, never into the message::

    log.info("link up", extra=kv(gateway=name, link=link, peer=peer))

The message is never parsed for ``key=value`` pairs: a peer-supplied value such as a
gateway name ``x peer=198.18.9.9`` stays inside its one quoted field. Every value is quoted
when it needs to be, and control characters (newlines, ESC, ...) are escaped, so one record
is always one line. Tracebacks go into one escaped ``exc`` field.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Iterable

# a value that needs no quotes in logfmt (and has no control characters: checked apart)
_BARE = re.compile(r"[^\s\"=\\]+")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_SIMPLE_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {"n": "\n", "r": "\r", "t": "\t"}
# the attribute of a LogRecord that holds its fields (set through ``extra=kv(...)``)
FIELDS = "kv"


def kv(**fields: object) -> dict[str, dict[str, object]]:
    """``extra=`` for a logging call: the record's fields, in this order."""
    return {FIELDS: fields}


def endpoint(addr: tuple | None) -> str:
    """A socket address as logs, the API, polevpn-ctl and the dashboard show it.

    ``198.19.0.6:45443`` and ``[2001:db8::1]:50111``: an IPv4-mapped address from a ``[::]``
    listener is shown as the IPv4 address it is, and an IPv6 address is bracketed so that
    its port cannot be read as part of it. None (no address known) is ``?``.
    """
    if not addr:
        return "?"
    host, port = str(addr[0]), addr[1]
    bare, pct, zone = host.partition("%")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if ip.version == 6:
        mapped = ip.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            return f"{mapped}:{port}"
        return f"[{ip}{pct}{zone}]:{port}"
    return f"{ip}:{port}"


def _escape(c: str) -> str:
    simple = _SIMPLE_ESCAPES.get(c)
    if simple is not None:
        return simple
    if c == " " or c.isprintable():
        return c
    # control and separator characters (ESC, DEL, NEL, U+2028, ...): they could end a
    # line or rewrite a terminal, so they never reach the log raw
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def quote(value: str) -> str:
    """``value`` as a logfmt value: bare when it can be, else quoted and escaped."""
    if value and _BARE.fullmatch(value) and value.isprintable():
        return value
    return '"' + "".join(_escape(c) for c in value) + '"'


def value_text(value: object) -> str:
    """How a field's value is written: booleans as ``true``/``false``, None as ``-``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "-"
    return str(value)


def render(message: str, fields: dict[str, object] | None = None) -> str:
    """The message part of a line: ``event=...`` or ``msg="..."``, then the fields."""
    head = f"event={message}" if _WORD.fullmatch(message) else f"msg={quote(message)}"
    if not fields:
        return head
    parts = [head]
    for key, value in fields.items():
        # keys come from the code, but a bad one must not break the line's shape either
        k = key if _KEY.fullmatch(key) else "field_" + re.sub(r"[^A-Za-z0-9_.]", "_", key)
        text = value_text(value)
        parts.append(f"{k}={quote(text) if text else ''}")
    return " ".join(parts)


class LogfmtFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # UTC with milliseconds and a Z: sortable, and unambiguous across hosts
        t = time.gmtime(record.created)
        return f"{time.strftime('%Y-%m-%dT%H:%M:%S', t)}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, FIELDS, None)
        line = (
            f"time={self.formatTime(record)} level={record.levelname.lower()} "
            f"logger={quote(record.name)} "
            f"{render(record.getMessage(), fields if isinstance(fields, dict) else None)}"
        )
        if record.exc_info:
            line += f" exc={quote(self.formatException(record.exc_info))}"
        elif record.exc_text:
            line += f" exc={quote(record.exc_text)}"
        if record.stack_info:
            line += f" stack={quote(self.formatStack(record.stack_info))}"
        return line


def lines(records: Iterable[logging.LogRecord]) -> list[str]:
    """The lines the daemons would write for ``records`` (for tests, e.g. pytest's caplog)."""
    formatter = LogfmtFormatter()
    return [formatter.format(r) for r in records]


def parse(line: str) -> dict[str, str]:
    """The fields of one logfmt line (for tests and tools); quoted values unescaped."""
    return dict(pairs(line))


def _unescape(line: str, j: int) -> tuple[str, int]:
    """The character escaped at ``line[j]`` (just after a backslash), and where it ends."""
    c = line[j]
    width = {"x": 2, "u": 4, "U": 8}.get(c)
    if width is not None:
        digits = line[j + 1 : j + 1 + width]
        if len(digits) == width and all(d in "0123456789abcdefABCDEF" for d in digits):
            return chr(int(digits, 16)), j + 1 + width
    return _UNESCAPES.get(c, c), j + 1


def pairs(line: str) -> list[tuple[str, str]]:
    """The ``(key, value)`` pairs of one logfmt line, in order, duplicates kept."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        j = i
        while j < n and line[j] not in "= ":
            j += 1
        key = line[i:j]
        if j >= n or line[j] != "=":
            if key:
                out.append((key, ""))
            i = j
            continue
        j += 1
        if j < n and line[j] == '"':
            j += 1
            chars = []
            while j < n and line[j] != '"':
                c = line[j]
                if c == "\\" and j + 1 < n:
                    c, j = _unescape(line, j + 1)
                else:
                    j += 1
                chars.append(c)
            out.append((key, "".join(chars)))
            i = j + 1
        else:
            k = j
            while k < n and line[k] != " ":
                k += 1
            out.append((key, line[j:k]))
            i = k
    return out

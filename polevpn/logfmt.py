"""One log line per event, in logfmt (``key=value``), for journald and log shippers.

Every line starts ``time=... level=... logger=...``. The daemons write their messages as
``"<what happened> key=value key=value"``; the formatter keeps such key=value pairs as
fields of the line and puts the leading words in ``event=`` (one word) or ``msg="..."``
(several), so a line reads the same to a person and parses as logfmt. A message that does
not have that shape becomes one quoted ``msg``. Tracebacks go into one escaped ``exc``
field: a multi-line record would be split into several journal entries.
"""

from __future__ import annotations

import logging
import re
import time

# a value that needs no quotes in logfmt
_BARE = re.compile(r"[^\s\"=\\]+")
_PAIR = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*=")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def quote(value: str) -> str:
    """``value`` as a logfmt value: bare when it can be, else quoted and escaped."""
    if value and _BARE.fullmatch(value):
        return value
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def render(message: str) -> str:
    """The message part of a line: ``event=...`` or ``msg="..."``, then its pairs.

    Words after a pair that are not pairs themselves continue its value
    (``reason=idle for 60s`` is ``reason="idle for 60s"``).
    """
    words = message.split(" ")
    i = 0
    while i < len(words) and not _PAIR.match(words[i]):
        i += 1
    head = " ".join(words[:i])
    pairs: list[list[str]] = []
    for w in words[i:]:
        m = _PAIR.match(w)
        if m is not None:
            key, _, value = w.partition("=")
            pairs.append([key, value])
        else:
            pairs[-1][1] += " " + w
    if i == 0:
        lead = [] if pairs else ['msg=""']
    elif _WORD.fullmatch(head):
        lead = [f"event={head}"]
    else:
        lead = [f"msg={quote(head)}"]
    return " ".join(lead + [f"{k}={quote(v) if v else v}" for k, v in pairs])


class LogfmtFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # UTC with milliseconds and a Z: sortable, and unambiguous across hosts
        t = time.gmtime(record.created)
        return f"{time.strftime('%Y-%m-%dT%H:%M:%S', t)}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"time={self.formatTime(record)} level={record.levelname.lower()} "
            f"logger={record.name} {render(record.getMessage())}"
        )
        if record.exc_info:
            line += f" exc={quote(self.formatException(record.exc_info))}"
        elif record.exc_text:
            line += f" exc={quote(record.exc_text)}"
        if record.stack_info:
            line += f" stack={quote(self.formatStack(record.stack_info))}"
        return line


def parse(line: str) -> dict[str, str]:
    """The fields of one logfmt line (for tests and tools); quoted values unescaped."""
    return dict(pairs(line))


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
                    j += 1
                    c = {"n": "\n", "r": "\r"}.get(line[j], line[j])
                chars.append(c)
                j += 1
            out.append((key, "".join(chars)))
            i = j + 1
        else:
            k = j
            while k < n and line[k] != " ":
                k += 1
            out.append((key, line[j:k]))
            i = k
    return out

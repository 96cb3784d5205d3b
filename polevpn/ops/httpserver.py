"""A small HTTP/1.1 server on the daemon's own event loop, for /metrics and the REST API.

Not a general web server: one request per connection (the reply says ``Connection:
close``), request line and headers bounded in size and in time (HEADER_TIMEOUT from the
connection), a body only by a well-formed Content-Length and only up to a small limit, the
body and the reply each bounded in time, and a bounded number of clients at once with a
share per client and a reserve for trusted (loopback) ones (``limits.ClientSlots``). So a
slow or hostile client costs at most a few sockets for a few seconds, cannot lock out the
operator, and nothing it sends can raise out of the server: a handler's exception is logged
and answered with a 500.

It is asyncio rather than ``http.server`` in a thread because the gateway drops its
capabilities thread by thread and the router may switch to another uid after binding; a
thread started before that would keep them.

Routes map (method, path pattern) to an async handler. A pattern segment ``{name}`` matches
one path segment, percent-decoded into ``Request.params[name]``. GET routes answer HEAD too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote

from polevpn.common.logfmt import kv
from polevpn.router.limits import ClientLimits, ClientSlots, is_loopback

log = logging.getLogger("polevpn.http")

MAX_REQUEST = 8192  # bytes of request line and headers
MAX_BODY = 4096  # bytes of request body
REQUEST_TIMEOUT = 5.0  # s for the whole request to arrive, and again for the reply to leave
# s from the connection until its request line and headers are in: an idle or slow client
# gives its slot back soon (a real client sends its request at once)
HEADER_TIMEOUT = 2.0
# a Content-Length of more digits than this is refused before it is turned into a number
MAX_LENGTH_DIGITS = 12


@dataclass
class Request:
    method: str
    path: str  # without the query string, not decoded
    query: str
    headers: dict[str, str]  # names lower-case; a repeated header keeps its last value
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)


# (status, content type, body, extra headers)
Reply = tuple[int, str, bytes, dict[str, str]]
Handler = Callable[[Request], Awaitable[Reply]]
# the body of an error reply: (content type, body) for a status and a one-line message
ErrorBody = Callable[[int, str], tuple[str, bytes]]


def text_error(status: int, message: str) -> tuple[str, bytes]:
    return "text/plain; charset=utf-8", f"{message}\n".encode()


class HttpError(Exception):
    """Raised by a handler for an error reply with the server's error body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def content_length(value: str | None) -> int | None:
    """The body length a Content-Length header gives (0 without one), or None if it is
    malformed: only ASCII digits, and few enough of them to be a sane number (Python's
    int() refuses more than 4,300 digits with a ValueError)."""
    if value is None:
        return 0
    value = value.strip()
    if not value:
        return 0
    if len(value) > MAX_LENGTH_DIGITS or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


@dataclass
class _Route:
    method: str
    segments: tuple[str, ...]
    handler: Handler

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for pattern, seg in zip(self.segments, segments, strict=True):
            if pattern.startswith("{") and pattern.endswith("}"):
                if not seg:
                    return None
                params[pattern[1:-1]] = unquote(seg, errors="strict")
            elif pattern != seg:
                return None
        return params


class HttpServer:
    """Serves ``routes`` on one address. ``name`` starts the "listening" log line."""

    def __init__(
        self,
        routes: dict[tuple[str, str], Handler],
        *,
        name: str = "http",
        error_body: ErrorBody = text_error,
        headers: dict[str, str] | None = None,
        max_request: int = MAX_REQUEST,
        max_body: int = MAX_BODY,
        timeout: float = REQUEST_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        limits: ClientLimits | None = None,
        trusted: Callable[[str], bool] = is_loopback,
    ) -> None:
        self._routes = [
            _Route(method, tuple(path.split("/")), handler)
            for (method, path), handler in routes.items()
        ]
        self.name = name
        self.error_body = error_body
        # sent with every reply, errors included
        self.headers = headers or {}
        self.max_request = max_request
        self.max_body = max_body
        self.timeout = timeout
        self.header_timeout = min(header_timeout, timeout)
        self.slots = ClientSlots(limits or ClientLimits(), trusted)
        self.server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(
            self._client, host, port, limit=self.max_request, reuse_address=True
        )
        addr = self.server.sockets[0].getsockname()
        log_name = f"polevpn.{self.name}"
        logging.getLogger(log_name).info(
            f"{self.name} listening", extra=kv(address=addr[0], port=addr[1])
        )
        return addr[0], addr[1]

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        # aborted rather than cancelled: the handlers then end as for any lost client
        for writer in list(self._clients):
            writer.transport.abort()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        verdict = self.slots.admit(writer, str(peer[0]) if peer else "?")
        if verdict.refused is not None:
            writer.transport.abort()
            return
        if verdict.evict is not None:
            # its handler ends as for any lost client; its slot is already given back
            verdict.evict.transport.abort()  # type: ignore[attr-defined]
        self._clients.add(writer)
        try:
            reply = await self._reply(reader, writer)
            if reply:
                writer.write(reply)
                await asyncio.wait_for(writer.drain(), self.timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception:
            # a request must never take the daemon down
            log.exception(f"{self.name} request failed")
        finally:
            self._clients.discard(writer)
            self.slots.release(writer)
            writer.close()

    def _error(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        head_only: bool = False,
    ) -> bytes:
        ctype, body = self.error_body(status, message)
        return self._response(status, ctype, body, headers or {}, head_only)

    def _response(
        self, status: int, ctype: str, body: bytes, headers: dict[str, str], head_only: bool = False
    ) -> bytes:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}"]
        if status == 204:
            # RFC 9110: no content, and no Content-Length saying so
            body = b""
        else:
            lines += [f"Content-Type: {ctype}", f"Content-Length: {len(body)}"]
        lines.append("Connection: close")
        lines += [f"{k}: {v}" for k, v in {**self.headers, **headers}.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + body

    async def _reply(self, reader: asyncio.StreamReader, writer: object = None) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.header_timeout)
        except (asyncio.LimitOverrunError, ValueError):
            return self._error(431, "request too large")
        except TimeoutError:
            return None
        except asyncio.IncompleteReadError:
            return None
        self.slots.started(writer)
        request = self._parse(head)
        if isinstance(request, bytes):
            return request
        if "transfer-encoding" in request.headers:
            return self._error(411, "a request body needs Content-Length")
        length = content_length(request.headers.get("content-length"))
        if length is None:
            return self._error(400, "bad Content-Length")
        if length > self.max_body:
            return self._error(413, f"request body over {self.max_body} bytes")
        if length:
            try:
                request.body = await asyncio.wait_for(
                    reader.readexactly(length), max(0.0, deadline - loop.time())
                )
            except TimeoutError:
                return None
        return await self._dispatch(request)

    def _parse(self, head: bytes) -> Request | bytes:
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
            return self._error(400, "bad request")
        lines = text.split("\r\n")
        line = lines[0].split(" ")
        if len(line) != 3 or not line[2].startswith("HTTP/1.") or not line[1].startswith("/"):
            return self._error(400, "bad request")
        headers: dict[str, str] = {}
        for raw in lines[1:]:
            if not raw:
                continue
            name, sep, value = raw.partition(":")
            if not sep or not name or name != name.strip():
                return self._error(400, "bad header line")
            key = name.lower()
            if key in ("content-length", "transfer-encoding") and key in headers:
                # two framings of one body: refused, whichever a proxy in front would take
                return self._error(400, f"repeated {name}")
            headers[key] = value.strip()
        path, _, query = line[1].partition("?")
        return Request(line[0], path, query, headers)

    async def _dispatch(self, request: Request) -> bytes:
        segments = request.path.split("/")
        allowed: list[str] = []
        method = "GET" if request.method == "HEAD" else request.method
        chosen: tuple[_Route, dict[str, str]] | None = None
        for route in self._routes:
            try:
                params = route.match(segments)
            except UnicodeDecodeError:
                return self._error(400, "path is not UTF-8 after percent-decoding")
            if params is None:
                continue
            allowed.append(route.method)
            if route.method == method and chosen is None:
                chosen = (route, params)
        if chosen is None:
            if not allowed:
                return self._error(404, "not found")
            methods = sorted(set(allowed) | ({"HEAD"} if "GET" in allowed else set()))
            return self._error(405, "method not allowed", {"Allow": ", ".join(methods)})
        route, request.params = chosen
        head_only = request.method == "HEAD"
        try:
            status, ctype, body, headers = await route.handler(request)
        except HttpError as exc:
            return self._error(exc.status, exc.message, exc.headers, head_only)
        except Exception:
            log.exception(
                f"{self.name} handler failed", extra=kv(method=request.method, path=request.path)
            )
            return self._error(500, "internal error", head_only=head_only)
        return self._response(status, ctype, body, headers, head_only)

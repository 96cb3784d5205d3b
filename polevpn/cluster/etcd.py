"""A small etcd v3 client over etcd's JSON gateway (``/v3/...``, HTTP/1.1), on asyncio streams
and h11.

Chosen over gRPC clients by measurement (docs/benchmarks.md, "etcd client"): the calls the
cluster needs (range, put and delete in transactions, lease grant/keepalive/revoke, one watch
stream) are a handful of JSON requests; this needs no gRPC runtime (aetcd pulls in grpcio and
protobuf, about 22 MB, and speaks neither TLS nor a list of endpoints), and it runs on
uvloop like the rest of the router.

Keys and values are bytes (base64 on the wire); 64-bit numbers arrive as strings. One
persistent connection serves the unary calls one at a time; a watch has a connection of its
own. A connection that fails moves the client to the next endpoint; the caller (the store
adapter) decides about retries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11

# a JSON reply or one watch message larger than this is refused (a broken or hostile
# endpoint cannot make the router buffer without bound)
MAX_BODY = 64 * 1024 * 1024
MAX_WATCH_MESSAGE = 16 * 1024 * 1024
# etcd's default --max-txn-ops: the most operations one transaction may hold
MAX_TXN_OPS = 128
# keys per page of a snapshot (pages are read at one revision)
PAGE = 1000
_READ = 65536


class EtcdError(Exception):
    """An error etcd answered with (a gRPC code and message), or a reply that makes no sense."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message if code is None else f"{message} (code {code})")
        self.code = code


class EtcdUnavailable(EtcdError):
    """No answer: the endpoint could not be reached, closed the connection or timed out."""


class Compacted(EtcdError):
    """A watch asked for revisions etcd no longer has: read a new snapshot."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted up to {compact_revision}")
        self.compact_revision = compact_revision


# the gRPC codes of errors that say the lease or the auth token is gone
GRPC_NOT_FOUND = 5
GRPC_INVALID_ARGUMENT = 3
GRPC_UNAUTHENTICATED = 16
GRPC_UNAVAILABLE = 14


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Event:
    """One change under a watch: a put (``value`` set) or a delete (``value`` None)."""

    key: bytes
    value: bytes | None
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class WatchBatch:
    revision: int
    events: tuple[Event, ...]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise EtcdError(f"expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EtcdError("invalid base64 in a reply") from None


def _int(obj: dict[str, Any], key: str, default: int = 0) -> int:
    val = obj.get(key, default)
    try:
        return int(val)
    except (TypeError, ValueError):
        raise EtcdError(f"{key}: expected a number, got {val!r}") from None


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def _kv(obj: object) -> KeyValue:
    if not isinstance(obj, dict):
        raise EtcdError("a key-value is not an object")
    return KeyValue(
        key=_unb64(obj.get("key", "")),
        value=_unb64(obj.get("value", "")),
        mod_revision=_int(obj, "mod_revision"),
        lease=_int(obj, "lease"),
    )


def _header_revision(reply: dict[str, Any]) -> int:
    header = reply.get("header")
    if not isinstance(header, dict):
        raise EtcdError("reply without a header")
    return _int(header, "revision")


class _Connection:
    """One HTTP/1.1 connection to one endpoint."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(our_role=h11.CLIENT)

    @classmethod
    async def open(
        cls, url: str, ssl_ctx: ssl.SSLContext | None, timeout: float
    ) -> tuple[_Connection, str]:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 2379
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ssl_ctx, server_hostname=host if ssl_ctx else None,
                    limit=_READ,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise EtcdUnavailable(f"{url}: {exc or type(exc).__name__}") from None
        return cls(reader, writer), parts.netloc

    async def send(self, netloc: str, path: str, body: bytes, token: str | None) -> None:
        headers = [
            ("Host", netloc),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
        ]
        if token:
            headers.append(("Authorization", token))
        data = self.h11.send(h11.Request(method="POST", target=path, headers=headers))
        data = (data or b"") + (self.h11.send(h11.Data(data=body)) or b"")
        data += self.h11.send(h11.EndOfMessage()) or b""
        self.writer.write(data)
        await self.writer.drain()

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(_READ)
                if not data and self.reader.at_eof():
                    self.h11.receive_data(b"")
                    continue
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise EtcdUnavailable("connection closed")
            return event

    async def response(self) -> tuple[int, AsyncIterator[bytes]]:
        event = await self.next_event()
        if not isinstance(event, h11.Response):
            raise EtcdUnavailable(f"unexpected {type(event).__name__}")
        return event.status_code, self._body()

    async def _body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        self.writer.close()


def _decode(status: int, raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        raise EtcdError(f"HTTP {status}: reply is not JSON") from None
    if not isinstance(obj, dict):
        raise EtcdError(f"HTTP {status}: reply is not a JSON object")
    if status != 200 or "error" in obj:
        code = obj.get("code")
        message = obj.get("message") or obj.get("error") or f"HTTP {status}"
        err_cls = EtcdUnavailable if code == GRPC_UNAVAILABLE or status >= 502 else EtcdError
        raise err_cls(str(message)[:200], code if isinstance(code, int) else None)
    return obj


class EtcdClient:
    """The calls the cluster store needs, to whichever endpoint answers."""

    def __init__(
        self,
        endpoints: Iterable[str],
        *,
        username: str | None = None,
        password: str | None = None,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.endpoints = tuple(endpoints)
        if not self.endpoints:
            raise ValueError("no etcd endpoints")
        self.username = username
        self.password = password
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if self.endpoints[0].startswith("https:"):
            ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
            if cert is not None and key is not None:
                ctx.load_cert_chain(cert, key)
            self._ssl = ctx
        self._index = 0
        self._conn: _Connection | None = None
        self._netloc = ""
        self._lock = asyncio.Lock()
        self._token: str | None = None
        # the endpoint of the last connection made, for logs and the API
        self.endpoint = self.endpoints[0]

    # ------------------------------------------------------------ connections
    def rotate(self) -> None:
        """Use the next endpoint from the next connection on."""
        self._index = (self._index + 1) % len(self.endpoints)
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _connect(self) -> tuple[_Connection, str]:
        self.endpoint = self.endpoints[self._index]
        return await _Connection.open(self.endpoint, self._ssl, self.timeout)

    async def close(self) -> None:
        self._drop()

    async def _exchange(
        self, conn: _Connection, netloc: str, path: str, body: bytes, token: str | None
    ) -> tuple[int, bytes]:
        await conn.send(netloc, path, body, token)
        status, chunks = await conn.response()
        parts: list[bytes] = []
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > MAX_BODY:
                raise EtcdUnavailable(f"{path}: reply over {MAX_BODY} bytes")
            parts.append(chunk)
        return status, b"".join(parts)

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One unary request on the shared connection; its JSON reply."""
        data = json.dumps(body, separators=(",", ":")).encode()
        async with self._lock:
            for attempt in range(2):
                await self._authenticate()
                # a kept connection the server has closed meanwhile fails at once: one more
                # try on a new one (every call here may be repeated: puts and deletes of the
                # same keys, a keepalive; a lease granted twice expires unused)
                reused = self._conn is not None
                try:
                    async with asyncio.timeout(self.timeout):
                        if self._conn is None:
                            self._conn, self._netloc = await self._connect()
                        status, raw = await self._exchange(
                            self._conn, self._netloc, path, data, self._token
                        )
                except TimeoutError:  # (an OSError: first)
                    self.rotate()
                    raise EtcdUnavailable(f"{self.endpoint}{path}: timed out") from None
                except (OSError, ssl.SSLError, h11.ProtocolError, EtcdUnavailable) as exc:
                    if reused and attempt == 0:
                        self._drop()
                        continue
                    self.rotate()
                    if isinstance(exc, EtcdUnavailable):
                        raise
                    raise EtcdUnavailable(f"{self.endpoint}{path}: {exc}") from None
                except BaseException:
                    # cancelled half-way: the connection is in no known state
                    self._drop()
                    raise
                if not self._conn.reusable():
                    self._drop()
                try:
                    return _decode(status, raw)
                except EtcdError as exc:
                    if exc.code == GRPC_UNAUTHENTICATED and self.username and attempt == 0:
                        self._token = None  # expired: authenticate again, once
                        continue
                    if isinstance(exc, EtcdUnavailable):
                        self.rotate()
                    raise
        raise AssertionError("unreachable")

    async def _authenticate(self) -> None:
        if self.username is None or self._token is not None:
            return
        body = json.dumps({"name": self.username, "password": self.password}).encode()
        try:
            async with asyncio.timeout(self.timeout):
                if self._conn is None:
                    self._conn, self._netloc = await self._connect()
                status, raw = await self._exchange(
                    self._conn, self._netloc, "/v3/auth/authenticate", body, None
                )
        except (OSError, ssl.SSLError, h11.ProtocolError, EtcdUnavailable) as exc:
            self.rotate()
            raise EtcdUnavailable(f"{self.endpoint}: authenticate: {exc or 'timed out'}") from None
        except BaseException:
            self._drop()
            raise
        if not self._conn.reusable():
            self._drop()
        token = _decode(status, raw).get("token")
        if not isinstance(token, str) or not token:
            raise EtcdError("authenticate: no token in the reply")
        self._token = token

    # ------------------------------------------------------------ KV
    async def snapshot(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` at one revision, read a page at a time; the revision."""
        end = prefix_end(prefix)
        start, revision = prefix, 0
        out: list[KeyValue] = []
        while True:
            body: dict[str, Any] = {
                "key": _b64(start),
                "range_end": _b64(end),
                "limit": PAGE,
            }
            if revision:
                body["revision"] = revision
            reply = await self.call("/v3/kv/range", body)
            if not revision:
                revision = _header_revision(reply)
            kvs = reply.get("kvs", [])
            if not isinstance(kvs, list):
                raise EtcdError("range: kvs is not a list")
            out += [_kv(item) for item in kvs]
            if not reply.get("more") or not kvs:
                return revision, out
            start = out[-1].key + b"\0"

    async def txn(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes],
                  lease: int = 0) -> int:
        """Puts (under ``lease``) and deletes, in transactions of up to MAX_TXN_OPS; the
        revision after the last."""
        ops: list[dict[str, Any]] = [
            {"request_put": {"key": _b64(k), "value": _b64(v), "lease": str(lease)}}
            for k, v in puts
        ] + [{"request_delete_range": {"key": _b64(k)}} for k in deletes]
        revision = 0
        for i in range(0, len(ops), MAX_TXN_OPS):
            reply = await self.call("/v3/kv/txn", {"success": ops[i : i + MAX_TXN_OPS]})
            revision = _header_revision(reply)
        return revision

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body = {"key": _b64(key), "value": _b64(value), "lease": str(lease)}
        return _header_revision(await self.call("/v3/kv/put", body))

    async def delete(self, key: bytes) -> int:
        return _header_revision(await self.call("/v3/kv/deleterange", {"key": _b64(key)}))

    async def compact(self, revision: int) -> None:
        await self.call("/v3/kv/compaction", {"revision": str(revision)})

    # ------------------------------------------------------------ leases
    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: its id and TTL."""
        reply = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        if reply.get("error"):
            raise EtcdError(f"lease grant: {reply['error']}")
        return _int(reply, "ID"), _int(reply, "TTL")

    async def lease_keepalive(self, lease: int) -> int:
        """Renew ``lease``; its TTL now, 0 or less when it has expired."""
        reply = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = reply.get("result", reply)
        if not isinstance(result, dict):
            raise EtcdError("keepalive: no result")
        return _int(result, "TTL")

    async def lease_revoke(self, lease: int) -> None:
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if exc.code != GRPC_NOT_FOUND:
                raise

    # ------------------------------------------------------------ watch
    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Changes under ``prefix`` from ``start_revision`` on, on a connection of its own,
        until it fails (EtcdUnavailable) or the revision is gone (Compacted)."""
        await self._authenticate()
        try:
            conn, netloc = await self._connect()
        except EtcdUnavailable:
            self.rotate()
            raise
        try:
            body = {
                "create_request": {
                    "key": _b64(prefix),
                    "range_end": _b64(prefix_end(prefix)),
                    "start_revision": str(start_revision),
                }
            }
            data = json.dumps(body, separators=(",", ":")).encode()
            try:
                async with asyncio.timeout(self.timeout):
                    await conn.send(netloc, "/v3/watch", data, self._token)
                    status, chunks = await conn.response()
                if status != 200:
                    raw = b"".join([c async for c in chunks])[:MAX_WATCH_MESSAGE]
                    _decode(status, raw)
                    raise EtcdError(f"watch: HTTP {status}")
                buf = b""
                async for chunk in chunks:
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            batch = _watch_message(line)
                            if batch is not None:
                                yield batch
                    if len(buf) > MAX_WATCH_MESSAGE:
                        raise EtcdUnavailable("watch message too large")
                if buf.strip():
                    batch = _watch_message(buf)
                    if batch is not None:
                        yield batch
                raise EtcdUnavailable("watch stream ended")
            except (OSError, TimeoutError, ssl.SSLError, h11.ProtocolError) as exc:
                raise EtcdUnavailable(f"{self.endpoint}/v3/watch: {exc or 'timed out'}") from None
        finally:
            conn.close()


def _watch_message(line: bytes) -> WatchBatch | None:
    """One message of the watch stream: a batch of events, None for one without (created,
    progress), Compacted for a revision gone."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise EtcdError("watch: message is not JSON") from None
    if not isinstance(obj, dict):
        raise EtcdError("watch: message is not an object")
    if "error" in obj:
        err = obj["error"]
        if isinstance(err, dict):
            code = err.get("grpc_code", err.get("code"))
            raise EtcdUnavailable(str(err.get("message", "watch error"))[:200],
                                  code if isinstance(code, int) else None)
        raise EtcdUnavailable(str(err)[:200])
    result = obj.get("result")
    if not isinstance(result, dict):
        raise EtcdError("watch: message without a result")
    compact = _int(result, "compact_revision")
    if compact:
        raise Compacted(compact)
    if result.get("canceled"):
        raise EtcdUnavailable(f"watch canceled: {result.get('cancel_reason', '')}"[:200])
    events = result.get("events")
    if not events:
        return None
    if not isinstance(events, list):
        raise EtcdError("watch: events is not a list")
    out = []
    for ev in events:
        if not isinstance(ev, dict):
            raise EtcdError("watch: an event is not an object")
        kv = _kv(ev.get("kv", {}))
        is_delete = ev.get("type") == "DELETE"
        out.append(Event(kv.key, None if is_delete else kv.value, kv.mod_revision, kv.lease))
    return WatchBatch(_header_revision(result), tuple(out))

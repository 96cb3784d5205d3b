"""DTLS 1.2 over memory BIOs: pyOpenSSL does the crypto, we move the datagrams.

No sockets here. A ``DtlsSession`` takes received datagrams and gives back decrypted
records and datagrams to send; the I/O layer owns the socket and the timers.

Two things pyOpenSSL's memory BIO does not do for us:

* it concatenates everything OpenSSL writes, so ``split_records`` cuts the output at DTLS
  record boundaries and packs whole records into datagrams no larger than the MTU;
* a server must not keep state for a peer that has not proven it can receive at its source
  address, or a spoofed ClientHello would make the router do work and send a certificate
  flight to a victim. ``CookieListener`` runs OpenSSL's stateless cookie exchange
  (HelloVerifyRequest) on a throw-away connection object per datagram, and only a
  ClientHello that returns a valid cookie (and is admitted) gets a ``DtlsSession``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from polevpn.proto.certs import hostname_matches, pin_matches

try:
    # pyOpenSSL's own cffi binding, for the established data path (see _RecordIO)
    from OpenSSL._util import exception_from_error_queue
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - a pyOpenSSL without it takes the public API
    _lib = None

RECORD_HEADER = 13  # type, version, epoch, sequence number (48 bits), length
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23
CT_ALERT = 21
HS_CLIENT_HELLO = 1
# ECDHE-RSA-AES128-GCM-SHA256 is what PoleVPN's Go side chooses; the rest keep ECDSA router
# certificates and stronger suites working
CIPHERS = (
    b"ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256:"
    b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES256-GCM-SHA384:"
    b"ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-CHACHA20-POLY1305"
)
DEFAULT_MTU = 1400
DTLS1_2_VERSION = 0xFEFD  # OpenSSL's constant; pyOpenSSL does not export it
_LEN = struct.Struct(">H")


class DtlsError(Exception):
    """The association failed: handshake error, bad certificate, or a fatal alert."""


def split_records(buf: bytes) -> list[bytes]:
    """Cut OpenSSL's output into whole DTLS records; a truncated tail is dropped."""
    out = []
    pos = 0
    n = len(buf)
    while pos + RECORD_HEADER <= n:
        end = pos + RECORD_HEADER + _LEN.unpack_from(buf, pos + 11)[0]
        if end > n:
            break
        out.append(buf[pos:end])
        pos = end
    return out


def pack_datagrams(records: list[bytes], mtu: int) -> list[bytes]:
    """Put consecutive records into as few datagrams as fit under ``mtu``."""
    out: list[bytes] = []
    cur: list[bytes] = []
    size = 0
    for rec in records:
        if cur and size + len(rec) > mtu:
            out.append(b"".join(cur))
            cur, size = [], 0
        cur.append(rec)
        size += len(rec)
    if cur:
        out.append(b"".join(cur))
    return out


def looks_like_dtls(datagram: bytes) -> bool:
    """A DTLS 1.x record: known content type and version major 0xFE."""
    return len(datagram) >= RECORD_HEADER and 20 <= datagram[0] <= 25 and datagram[1] == 0xFE


# ---- contexts -----------------------------------------------------------------------------


def _base_context(method: int) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    # without this OpenSSL may replace our MTU with what it queries from a socket it has not
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    ctx.set_cipher_list(CIPHERS)
    return ctx


def server_context(
    cert_file: Path,
    key_file: Path,
    cookie_secret: bytes | None = None,
    client_ca: Path | None = None,
    jar: CookieJar | None = None,
) -> tuple[SSL.Context, CookieJar]:
    """``client_ca``: ask gateways for a certificate and verify it against this CA; one that
    sends none is still accepted (PoleVPN gateways have none) and is judged by its key.

    ``jar``: the cookie jar to use, for a reload: the ``CookieListener`` tells its jar the
    address of each datagram, and a context whose callbacks consult another jar would bind
    every cookie to no address at all."""
    ctx = _base_context(SSL.DTLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(cert_file))
    ctx.use_privatekey_file(str(key_file))
    ctx.check_privatekey()
    if client_ca is not None:
        ctx.load_verify_locations(str(client_ca))
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    if jar is None:
        jar = CookieJar(cookie_secret)
    ctx.set_cookie_generate_callback(jar.generate)
    ctx.set_cookie_verify_callback(jar.verify)
    return ctx, jar


@dataclass(frozen=True)
class Verification:
    """How the client checks the router: CA and name, a pin, or (explicitly) not at all."""

    ca_file: Path | None = None
    server_name: str | None = None
    pin: bytes | None = None
    insecure: bool = False


def client_context(
    verify: Verification, cert_file: Path | None = None, key_file: Path | None = None
) -> SSL.Context:
    """``cert_file``/``key_file``: the gateway's client certificate, for routers that know
    gateways by certificate fingerprint."""
    ctx = _base_context(SSL.DTLS_CLIENT_METHOD)
    if cert_file is not None and key_file is not None:
        ctx.use_certificate_chain_file(str(cert_file))
        ctx.use_privatekey_file(str(key_file))
        ctx.check_privatekey()
    if verify.ca_file is not None:
        ctx.load_verify_locations(str(verify.ca_file))
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    else:
        ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    return ctx


def check_peer(conn: SSL.Connection, verify: Verification) -> None:
    """After the handshake: the name (CA mode) or the pin. OpenSSL has checked the chain."""
    cert = conn.get_peer_certificate(as_cryptography=True)
    der = cert.public_bytes(Encoding.DER) if cert is not None else None
    if verify.pin is not None and not pin_matches(der, verify.pin):
        raise DtlsError("router certificate does not match cert_pin")
    if verify.ca_file is not None and verify.server_name:
        if cert is None:
            raise DtlsError("router sent no certificate")
        if not hostname_matches(cert, verify.server_name):
            raise DtlsError(f"router certificate does not name {verify.server_name}")


# ---- cookies ------------------------------------------------------------------------------


class CookieJar:
    """HMAC cookies bound to the peer's address, valid for one secret rotation period."""

    ROTATE = 60.0

    def __init__(self, secret: bytes | None = None) -> None:
        self._secrets = [secret or os.urandom(32)] * 2
        # the caller's clock starts with the first datagram (no clock is read here)
        self._rotated: float | None = None
        self.peer = b""  # the address of the datagram being processed; set by CookieListener

    def rotate_if_due(self, now: float) -> None:
        if self._rotated is None:
            self._rotated = now
        elif now - self._rotated >= self.ROTATE:
            self._secrets = [os.urandom(32), self._secrets[0]]
            self._rotated = now

    def _mac(self, secret: bytes) -> bytes:
        return hmac.new(secret, self.peer, hashlib.sha256).digest()[:16]

    def generate(self, conn: SSL.Connection) -> bytes:
        return self._mac(self._secrets[0])

    def verify(self, conn: SSL.Connection, cookie: bytes) -> bool:
        return any(hmac.compare_digest(cookie, self._mac(s)) for s in self._secrets)


class CookieListener:
    """Answers ClientHellos statelessly until one comes back with a valid cookie.

    ``receive`` returns ``(reply_datagrams, session)``: replies go back to the peer (a
    HelloVerifyRequest, or the first server flight), and ``session`` is set once the peer
    has proven its address and was admitted.

    Nothing is kept for a peer that has not proved its address: every datagram gets a
    connection object of its own (about 6 us), which is dropped unless the cookie was good.
    A shared object would keep what OpenSSL did not consume of one datagram in front of the
    next peer's ClientHello. Datagrams larger than ``mtu`` are dropped unread: a ClientHello
    is a few hundred bytes, and OpenSSL reads a memory BIO 16 KiB at a time.
    """

    def __init__(self, ctx: SSL.Context, jar: CookieJar, mtu: int = DEFAULT_MTU) -> None:
        self.ctx = ctx
        self.jar = jar
        self.mtu = mtu
        self.hello_verify_sent = 0
        self.rejected = 0
        # cookie-proven ClientHellos that ``admit`` turned away (no handshake work done)
        self.refused = 0

    def _fresh(self) -> SSL.Connection:
        conn = SSL.Connection(self.ctx, None)
        conn.set_accept_state()
        conn.set_ciphertext_mtu(self.mtu)
        return conn

    def receive(
        self,
        datagram: bytes,
        peer: bytes,
        now: float,
        admit: Callable[[], bool] | None = None,
    ) -> tuple[list[bytes], DtlsSession | None]:
        """``admit``: asked once the cookie is good and before any handshake work (the
        server flight costs a signature and about 1.4 KB); False leaves the peer unanswered.
        The HelloVerifyRequest never depends on it: it keeps no state."""
        if (
            len(datagram) > self.mtu
            or not looks_like_dtls(datagram)
            or datagram[0] != CT_HANDSHAKE
        ):
            self.rejected += 1
            return [], None
        self.jar.rotate_if_due(now)
        self.jar.peer = peer
        conn = self._fresh()
        try:
            conn.bio_write(datagram)
            conn.DTLSv1_listen()
        except SSL.WantReadError:
            # a ClientHello without a valid cookie: answer it, remember nothing
            replies = _drain(conn, self.mtu)
            if replies:
                self.hello_verify_sent += 1
            else:
                self.rejected += 1
            return replies, None
        except SSL.Error:
            self.rejected += 1
            return [], None
        if admit is not None and not admit():
            self.refused += 1
            return [], None
        session = DtlsSession(conn, server=True, mtu=self.mtu, now=now)
        # our flight continues from the record sequence number of this ClientHello: every
        # HelloVerifyRequest this peer got from us carried a lower one
        session.renumber = _Epoch0Renumber(record_seq(datagram))
        return session.step(now), session


def _read_out(conn: SSL.Connection) -> list[bytes]:
    """Everything OpenSSL has written to the connection's memory BIO, in pieces."""
    chunks = []
    while True:
        try:
            data = conn.bio_read(65536)
        except SSL.WantReadError:
            break
        if not data:
            break
        chunks.append(data)
    return chunks


def _drain(conn: SSL.Connection, mtu: int) -> list[bytes]:
    return _to_datagrams(_read_out(conn), mtu)


def _to_datagrams(chunks: list[bytes], mtu: int) -> list[bytes]:
    """OpenSSL's output, read in pieces, as datagrams of whole records under ``mtu``."""
    if not chunks:
        return []
    return pack_datagrams(split_records(b"".join(chunks)), mtu)


def record_seq(record: bytes) -> int:
    """The 48-bit sequence number in a record's header."""
    return int.from_bytes(record[5:11], "big")


class _Epoch0Renumber:
    """Moves a server's epoch-0 record sequence numbers up to the ClientHello's.

    The HelloVerifyRequest carries the record sequence number of the ClientHello it answers
    (RFC 6347 section 4.2.1), so after a lost first ClientHello the peer has already seen
    our epoch-0 record 1; OpenSSL (3.2 and later) still numbers the server flight from 1,
    and a client that applies the replay window to epoch 0 (pion, Go PoleVPN's gateway)
    drops the ServerHello as a replay. OpenSSL's own DTLSv1_listen used to continue from
    the sequence number of the ClientHello that carried the cookie, which is above every
    HelloVerifyRequest sent to that peer; this does the same from outside. Epoch-0 records
    carry no MAC, so their header may be rewritten; later epochs are left alone.
    """

    __slots__ = ("floor", "shift")

    def __init__(self, floor: int) -> None:
        self.floor = floor
        self.shift: int | None = None  # fixed by the first epoch-0 record we send

    def apply(self, records: list[bytes]) -> list[bytes]:
        out = []
        for rec in records:
            if rec[3:5] == b"\x00\x00":
                seq = record_seq(rec)
                if self.shift is None:
                    self.shift = max(0, self.floor - seq)
                if self.shift:
                    rec = rec[:5] + (seq + self.shift).to_bytes(6, "big") + rec[11:]
            out.append(rec)
        return out


# ---- one association ----------------------------------------------------------------------

_IO_MAX = 65536
# set (to anything) to run established associations on pyOpenSSL's public API, as when its
# internals are missing; the tests run both paths
PUBLIC_API_ENV = "POLEVPN_DTLS_PUBLIC_API"
# the most fed to OpenSSL at once: under its 16 KiB read buffer, over any one datagram
_FEED_MAX = 9216


class _RecordIO:
    """Record I/O of an established association, straight through pyOpenSSL's cffi binding.

    ``Connection.recv``, ``send`` and ``bio_read`` allocate a 64 KiB buffer per call and
    raise an exception whenever a BIO is empty, which happens twice per datagram: at tens
    of thousands of datagrams a second that was a quarter of the router's time (py-spy).
    Here one buffer serves every association (all run on the event loop's thread) and an
    empty BIO is a return value.
    """

    __slots__ = ("ssl", "rbio", "wbio", "buf", "view")
    _shared: tuple[object, object] | None = None

    def __init__(self, conn: SSL.Connection) -> None:
        self.ssl = conn._ssl  # type: ignore[attr-defined]
        self.rbio = conn._into_ssl  # type: ignore[attr-defined]
        self.wbio = conn._from_ssl  # type: ignore[attr-defined]
        if _RecordIO._shared is None:
            buf = _ffi.new("char[]", _IO_MAX)
            _RecordIO._shared = (buf, _ffi.buffer(buf))
        self.buf, self.view = _RecordIO._shared

    @staticmethod
    def create(conn: SSL.Connection) -> _RecordIO | None:
        if _lib is None or os.environ.get(PUBLIC_API_ENV):
            return None
        try:
            return _RecordIO(conn)
        except AttributeError:  # a pyOpenSSL with other internals: the public API it is
            return None

    def drain(self) -> list[bytes]:
        """What OpenSSL wrote, as it wrote it (whole records)."""
        chunks = []
        read, wbio, buf, view = _lib.BIO_read, self.wbio, self.buf, self.view
        while True:
            n = read(wbio, buf, _IO_MAX)
            if n <= 0:
                return chunks
            chunks.append(view[:n])


def _pieces(datagram: bytes) -> Iterator[bytes]:
    """``datagram`` cut at record boundaries into pieces of at most ``_FEED_MAX`` bytes.

    A run of datagrams the kernel coalesced (UDP GRO) can be 64 KiB. OpenSSL takes each read
    of a memory BIO (16 KiB at most) for one datagram: the record cut at the end of a read
    is dropped as truncated, and the next read starts mid-record, so everything up to a
    chance record boundary is dropped as junk (fed whole, 40 records of 1400 bytes gave 16).
    Fed whole records at a time, OpenSSL sees every one.
    """
    n = len(datagram)
    if n <= _FEED_MAX:
        yield datagram
        return
    pos = 0
    while pos < n:
        end = pos
        while end + RECORD_HEADER <= n:
            stop = end + RECORD_HEADER + ((datagram[end + 11] << 8) | datagram[end + 12])
            if stop > n or (stop - pos > _FEED_MAX and end > pos):
                break
            end = stop
        if end == pos:
            end = n  # not a record: DTLS drops it as it would any junk
        yield datagram[pos:end]
        pos = end


def _queued_error() -> str:
    """The reason OpenSSL queued for the last failure; empties the queue."""
    try:
        exception_from_error_queue(SSL.Error)
    except SSL.Error as exc:
        return _ssl_reason(exc)
    return "unknown error"


class DtlsSession:
    """One DTLS association. Datagrams in, records out; plaintext in, datagrams out."""

    def __init__(
        self,
        conn: SSL.Connection,
        server: bool,
        mtu: int = DEFAULT_MTU,
        now: float = 0.0,
        verify: Verification | None = None,
    ) -> None:
        self.conn = conn
        self.server = server
        self.mtu = mtu
        self.verify = verify
        self.established = False
        self.closed = False
        self.started = now
        self.error: str | None = None
        self.peer_closed = False
        self.bad_records = 0
        self._io: _RecordIO | None = None
        # when the handshake flight must be resent, on the caller's clock (None: no timer)
        self._deadline: float | None = None
        # a server session made by CookieListener: how its epoch-0 records are numbered
        self.renumber: _Epoch0Renumber | None = None

    @classmethod
    def client(
        cls,
        ctx: SSL.Context,
        verify: Verification,
        mtu: int = DEFAULT_MTU,
        now: float = 0.0,
        sni: str | None = None,
    ) -> DtlsSession:
        conn = SSL.Connection(ctx, None)
        conn.set_connect_state()
        conn.set_ciphertext_mtu(mtu)
        if sni and not _is_ip(sni):
            conn.set_tlsext_host_name(sni.encode("idna"))
        return cls(conn, server=False, mtu=mtu, now=now, verify=verify)

    @property
    def cleartext_mtu(self) -> int:
        """The largest plaintext that fits one datagram of ``mtu`` bytes."""
        return self.conn.get_cleartext_mtu() if self.established else self.mtu - 64

    def step(self, now: float) -> list[bytes]:
        """Drive the handshake; returns datagrams to send."""
        if self.established or self.closed:
            return []
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            out = self._out(_read_out(self.conn))  # the alert that tells the peer why
            self._fail(f"handshake failed: {_ssl_reason(exc)}")
            return out
        else:
            self.established = True
            self._io = _RecordIO.create(self.conn)
            if self.verify is not None:
                try:
                    check_peer(self.conn, self.verify)
                except DtlsError as exc:
                    self._fail(str(exc))
                    return []
        out = self._out(_read_out(self.conn))
        self._rearm(now)
        return out

    def _rearm(self, now: float) -> None:
        """The retransmission deadline on the caller's clock, from what OpenSSL has left.

        OpenSSL's DTLS timer reads the wall clock itself (pyOpenSSL offers no
        DTLS_set_timer_cb), so its remaining time is carried over to ``now``: the caller
        decides when ``handle_timeout`` runs, and OpenSSL resends only once its own timer has
        also run out (otherwise the deadline moves to what it has left)."""
        if self.established or self.closed:
            self._deadline = None
            return
        t = self.conn.DTLSv1_get_timeout()
        self._deadline = now + t if t is not None else None

    def next_timeout(self) -> float | None:
        """When ``handle_timeout`` must run next, on the caller's clock; None: no timer."""
        if self.established or self.closed:
            return None
        return self._deadline

    def _out(self, chunks: list[bytes]) -> list[bytes]:
        """What OpenSSL wrote, as datagrams to send (epoch-0 records renumbered)."""
        if not chunks:
            return []
        records = split_records(b"".join(chunks))
        if self.renumber is not None:
            records = self.renumber.apply(records)
        return pack_datagrams(records, self.mtu)

    def _fail(self, reason: str) -> None:
        self.closed = True
        self.error = reason

    def receive(self, datagram: bytes, now: float) -> tuple[list[bytes], list[bytes]]:
        """Returns ``(plaintext_records, datagrams_to_send)``."""
        if self.closed:
            return [], []
        if self._io is not None:
            return self._receive_established(self._io, datagram)
        if not self.established:
            return self._receive_handshake(datagram, now)
        # the public API (pyOpenSSL without the internals _RecordIO uses): the same pieces
        records: list[bytes] = []
        conn = self.conn
        for piece in _pieces(datagram):
            if self.closed:
                break
            try:
                conn.bio_write(piece)
            except SSL.Error:
                self.bad_records += 1
                continue
            self._recv_public(records)
        return records, self._out(_read_out(conn))

    def _receive_handshake(self, datagram: bytes, now: float) -> tuple[list[bytes], list[bytes]]:
        conn = self.conn
        try:
            conn.bio_write(datagram)
        except SSL.Error:
            self.bad_records += 1
            return [], []
        out = self.step(now)
        if not self.established:
            return [], out
        # application data in the datagram that finished the handshake
        records: list[bytes] = []
        self._recv_public(records)
        pending = self._out(_read_out(conn))
        return records, out + pending if pending else out

    def _recv_public(self, records: list[bytes]) -> None:
        conn = self.conn
        while not self.closed:
            if _lib is not None:
                # a stale error left in the thread's queue would make SSL_get_error report
                # this read as failed
                _lib.ERR_clear_error()
            try:
                data = conn.recv(65536)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.closed = True
                self.peer_closed = True
                break
            except SSL.Error as exc:
                # DTLS drops records that fail authentication silently; what reaches here
                # is fatal for the association (an alert, or state OpenSSL cannot recover)
                self._fail(f"dtls error: {_ssl_reason(exc)}")
                break
            records.append(data)

    def _receive_established(
        self, io: _RecordIO, datagram: bytes
    ) -> tuple[list[bytes], list[bytes]]:
        records: list[bytes] = []
        if len(datagram) <= _FEED_MAX:
            self._feed(io, datagram, records)
        else:
            for piece in _pieces(datagram):
                if self.closed:
                    break
                self._feed(io, piece, records)
        return records, self._out(io.drain())

    def _feed(self, io: _RecordIO, data: bytes, records: list[bytes]) -> None:
        lib = _lib
        if lib.BIO_write(io.rbio, data, len(data)) != len(data):
            lib.ERR_clear_error()
            self.bad_records += 1
            return
        ssl, buf, view = io.ssl, io.buf, io.view
        while True:
            # a stale error in the thread's queue (left by any other OpenSSL call) would
            # make SSL_get_error report this read as fatal for the association
            lib.ERR_clear_error()
            n = lib.SSL_read(ssl, buf, _IO_MAX)
            if n > 0:
                records.append(view[:n])
                continue
            err = lib.SSL_get_error(ssl, n)
            if err == lib.SSL_ERROR_WANT_READ:
                return
            if err == lib.SSL_ERROR_ZERO_RETURN:
                self.closed = True
                self.peer_closed = True
                return
            # as in the handshake path: what reaches here is fatal for the association
            self._fail(f"dtls error: {_queued_error()}")
            return

    def send(self, plaintext: bytes) -> bytes | None:
        """Encrypt one record; returns the datagram, or None if the association is down."""
        if not self.established or self.closed:
            return None
        io = self._io
        if io is not None:
            if _lib.SSL_write(io.ssl, plaintext, len(plaintext)) <= 0:
                _lib.ERR_clear_error()
                return None
            n = _lib.BIO_read(io.wbio, io.buf, _IO_MAX)
            return io.view[:n] if n > 0 else None
        try:
            self.conn.send(plaintext)
            return self.conn.bio_read(65536)
        except SSL.Error:
            return None

    def timeout(self) -> float | None:
        """Seconds until a handshake flight must be resent, while handshaking."""
        if self.established or self.closed:
            return None
        t = self.conn.DTLSv1_get_timeout()
        return t if t is not None else None

    def handle_timeout(self, now: float) -> list[bytes]:
        """Resend the last flight if its deadline (``next_timeout``) has passed."""
        if self.established or self.closed:
            return []
        if self._deadline is not None and now < self._deadline:
            return []
        try:
            self.conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            self._fail(f"handshake failed: {_ssl_reason(exc)}")
            return []
        out = self._out(_read_out(self.conn))
        self._rearm(now)
        return out

    def close(self) -> list[bytes]:
        """A close_notify for the peer, so it need not wait for its idle timeout."""
        if self.closed:
            return []
        self.closed = True
        if not self.established:
            return []
        with contextlib.suppress(SSL.Error):
            self.conn.shutdown()
        return self._out(_read_out(self.conn))


def _ssl_reason(exc: SSL.Error) -> str:
    errs = exc.args[0] if exc.args else None
    if isinstance(errs, list) and errs and isinstance(errs[0], tuple):
        return errs[-1][-1] or str(errs)
    return str(exc) or type(exc).__name__


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def peer_key(addr: tuple) -> bytes:
    """The bytes a cookie is bound to: address and port of the sender."""
    return f"{addr[0]}|{addr[1]}".encode()

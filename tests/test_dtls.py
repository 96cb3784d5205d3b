"""DTLS over memory BIOs: handshake, cookie exchange, record splitting, certificate checks."""

from __future__ import annotations

import hashlib
import struct
import time

import pytest
import strictdtls
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from polevpn.kcp import dtls
from polevpn.keygen import generate
from polevpn.proto.certs import hostname_matches

PEER = ("198.19.0.2", 40000)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory):
    return generate(tmp_path_factory.mktemp("other"))


def record(ctype: int, epoch: int, seq: int, body: bytes) -> bytes:
    return (
        struct.pack(">BHH", ctype, 0xFEFD, epoch)
        + seq.to_bytes(6, "big")
        + (struct.pack(">H", len(body)) + body)
    )


class Pair:
    """A client session and the router's cookie listener, wired by hand."""

    def __init__(self, keys, verify: dtls.Verification, mtu: int = 1400) -> None:
        ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
        self.listener = dtls.CookieListener(ctx, jar, mtu)
        self.client = dtls.DtlsSession.client(
            dtls.client_context(verify), verify, mtu, 0.0, verify.server_name
        )
        self.server: dtls.DtlsSession | None = None
        self.wire_sizes: list[int] = []

    def handshake(self, peer=PEER, rounds: int = 10) -> None:
        to_server = self.client.step(0.0)
        for _ in range(rounds):
            to_client: list[bytes] = []
            for d in to_server:
                self.wire_sizes.append(len(d))
                if self.server is None:
                    replies, sess = self.listener.receive(d, dtls.peer_key(peer), 0.0)
                    to_client += replies
                    self.server = sess
                else:
                    _, out = self.server.receive(d, 0.0)
                    to_client += out
            to_server = []
            for d in to_client:
                self.wire_sizes.append(len(d))
                _, out = self.client.receive(d, 0.0)
                to_server += out
            if not to_server and not to_client:
                break


@pytest.fixture(params=["cffi", "public"])
def record_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Established associations run on pyOpenSSL's cffi binding (``_RecordIO``) or, as with
    a pyOpenSSL whose internals changed, on its public API: both must behave alike."""
    if request.param == "public":
        monkeypatch.setenv(dtls.PUBLIC_API_ENV, "1")
    else:
        monkeypatch.delenv(dtls.PUBLIC_API_ENV, raising=False)
    return request.param


def test_handshake_cookie_and_data(keys, record_path):
    verify = dtls.Verification(ca_file=keys.ca_cert, server_name="polevpn-router")
    p = Pair(keys, verify)
    p.handshake()
    assert p.client.established and p.server is not None and p.server.established
    assert p.listener.hello_verify_sent == 1, "the first ClientHello must get a cookie, no state"
    assert p.client.conn.get_cipher_name() == "ECDHE-RSA-AES128-GCM-SHA256"
    assert p.client.conn.get_protocol_version_name() == "DTLSv1.2"
    assert max(p.wire_sizes) <= 1400, "a handshake datagram exceeded the DTLS MTU"
    # 1400 - 13 header - 8 explicit nonce - 16 tag
    assert p.client.cleartext_mtu == 1363
    d = p.client.send(b"\x00" * 1363)
    assert d is not None and len(d) == 1400
    records, replies = p.server.receive(d, 0.0)
    assert records == [b"\x00" * 1363] and replies == []
    back = p.server.send(b"hello")
    assert p.client.receive(back, 0.0) == ([b"hello"], [])
    # the path under test is the one taken
    cffi = record_path == "cffi"
    assert (p.server._io is not None) is cffi and (p.client._io is not None) is cffi


def test_tampered_and_replayed_records_are_dropped_not_fatal(keys, record_path):
    p = Pair(keys, dtls.Verification(insecure=True))
    p.handshake()
    assert p.server is not None
    d = p.client.send(b"payload")
    assert d is not None
    bad = d[:-1] + bytes([d[-1] ^ 1])
    assert p.server.receive(bad, 0.0) == ([], [])
    assert p.server.receive(d, 0.0) == ([b"payload"], [])
    assert p.server.receive(d, 0.0) == ([], []), "a replayed record was accepted"
    assert not p.server.closed
    two = [p.client.send(b"one"), p.client.send(b"two")]
    assert p.server.receive(b"".join(two), 0.0) == ([b"one", b"two"], [])


def test_close_notify_is_a_clean_close(keys, record_path):
    p = Pair(keys, dtls.Verification(insecure=True))
    p.handshake()
    assert p.server is not None
    alerts = p.client.close()
    assert alerts
    records, _ = p.server.receive(alerts[0], 0.0)
    assert records == [] and p.server.closed and p.server.peer_closed
    assert p.client.send(b"x") is None


def test_cookie_is_bound_to_the_address(keys):
    """A ClientHello whose cookie was issued to another address gets a new cookie and no
    session: a spoofer cannot reuse a cookie it saw elsewhere."""
    verify = dtls.Verification(insecure=True)
    p = Pair(keys, verify)
    hello = p.client.step(0.0)
    replies, sess = p.listener.receive(hello[0], dtls.peer_key(PEER), 0.0)
    assert sess is None and len(replies) == 1
    hvr = replies[0]
    assert hvr[0] == dtls.CT_HANDSHAKE and hvr[13] == 3  # HelloVerifyRequest
    # the HelloVerifyRequest is small: no amplification towards a spoofed source
    assert len(hvr) <= len(hello[0]) * 3
    _, second = p.client.receive(hvr, 0.0)
    replies, sess = p.listener.receive(second[0], dtls.peer_key(("198.19.0.99", 40000)), 0.0)
    assert sess is None, "a cookie for one address was accepted from another"
    replies, sess = p.listener.receive(second[0], dtls.peer_key(PEER), 0.0)
    assert sess is not None


def test_listener_ignores_junk_and_keeps_working(keys):
    p = Pair(keys, dtls.Verification(insecure=True))
    junk = [
        b"",
        b"\x16",
        b"\x17\xfe\xfd" + b"\x00" * 20,
        record(22, 0, 0, b"\x01\x00\x00\x10garbage-garbage-"),
        record(22, 0, 0, b""),
        b"\x00" * 64,
        bytes(range(256)),
    ]
    for j in junk:
        replies, sess = p.listener.receive(j, dtls.peer_key(PEER), 0.0)
        assert sess is None
    assert p.listener.rejected >= len(junk) - 2
    p.handshake()
    assert p.server is not None and p.server.established


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500))
def test_fuzz_listener_and_session(data):
    ctx, jar = _SERVER
    listener = dtls.CookieListener(ctx, jar)
    replies, sess = listener.receive(data, b"peer", 0.0)
    assert sess is None or isinstance(sess, dtls.DtlsSession)
    assert all(len(r) <= 1400 for r in replies)
    # an established session fed garbage drops it (bad records are dropped in DTLS)
    records, _ = _ESTABLISHED.receive(data, 0.0)
    assert isinstance(records, list)


def _established_server(keys):
    p = Pair(keys, dtls.Verification(insecure=True))
    p.handshake()
    assert p.server is not None
    return p.server


_SERVER = None
_ESTABLISHED = None


@pytest.fixture(autouse=True, scope="module")
def _fuzz_state(keys):
    global _SERVER, _ESTABLISHED
    _SERVER = dtls.server_context(keys.server_cert, keys.server_key)
    _ESTABLISHED = _established_server(keys)
    yield


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.binary(max_size=20))
def test_split_records_roundtrip(bodies, tail):
    recs = [record(23, 1, i, b) for i, b in enumerate(bodies)]
    buf = b"".join(recs)
    assert dtls.split_records(buf) == recs
    # a truncated trailing record is dropped, never returned half
    out = dtls.split_records(buf + tail)
    assert out[: len(recs)] == recs
    assert all(len(r) >= dtls.RECORD_HEADER for r in out)
    for mtu in (200, 576, 1400):
        dgrams = dtls.pack_datagrams(recs, mtu)
        assert b"".join(dgrams) == buf
        assert all(len(d) <= mtu or len(dtls.split_records(d)) == 1 for d in dgrams)


def test_wrong_ca_fails_the_handshake(keys, other_keys):
    p = Pair(keys, dtls.Verification(ca_file=other_keys.ca_cert, server_name="polevpn-router"))
    p.handshake()
    assert not p.client.established and p.client.closed
    assert "certificate verify failed" in (p.client.error or "")


def test_name_mismatch_fails(keys):
    p = Pair(keys, dtls.Verification(ca_file=keys.ca_cert, server_name="not-the-router"))
    p.handshake()
    assert p.client.closed and "does not name" in (p.client.error or "")


def test_pin(keys):
    der = x509.load_pem_x509_certificate(keys.server_cert.read_bytes()).public_bytes(
        dtls.Encoding.DER
    )
    good = hashlib.sha256(der).digest()
    p = Pair(keys, dtls.Verification(pin=good))
    p.handshake()
    assert p.client.established and not p.client.closed
    p = Pair(keys, dtls.Verification(pin=b"\x00" * 32))
    p.handshake()
    assert p.client.closed and "cert_pin" in (p.client.error or "")


def test_hostname_matching(keys):
    cert = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    assert hostname_matches(cert, "polevpn-router")
    assert hostname_matches(cert, "POLEVPN-ROUTER.")
    assert hostname_matches(cert, "127.0.0.1")
    assert hostname_matches(cert, "::1")
    assert not hostname_matches(cert, "127.0.0.2")
    assert not hostname_matches(cert, "polevpn-router.example")
    assert not hostname_matches(cert, "router")


def test_wildcard_rules():
    from polevpn.proto.certs import _dns_match

    assert _dns_match("*.example.net", "a.example.net")
    assert not _dns_match("*.example.net", "a.b.example.net")
    assert not _dns_match("*.example.net", "example.net")
    assert not _dns_match("*.net", "example.net"), "a wildcard must not cover a whole TLD"
    assert not _dns_match("a*.example.net", "ab.example.net")


def test_retransmits_a_lost_flight(keys):
    verify = dtls.Verification(insecure=True)
    client = dtls.DtlsSession.client(dtls.client_context(verify), verify)
    first = client.step(0.0)
    assert first
    timeout = client.timeout()
    assert timeout is not None and 0 < timeout <= 1.0
    # the ClientHello was lost: after OpenSSL's (wall-clock) timer the flight goes out again
    time.sleep(timeout + 0.05)
    again = client.handle_timeout(1.0)
    assert again and again[0][0] == dtls.CT_HANDSHAKE


@pytest.mark.parametrize("count", [1, 6, 7, 12, 40])
def test_coalesced_datagrams_yield_every_record(keys, record_path, count):
    """UDP GRO hands over up to 64 KiB of back-to-back datagrams as one buffer; OpenSSL
    alone would lose the record that straddles its 16 KiB read buffer."""
    p = Pair(keys, dtls.Verification(insecure=True))
    p.handshake()
    assert p.server is not None
    sent = [bytes([i]) * 1363 for i in range(count)]
    coalesced = b"".join(p.client.send(r) for r in sent)
    assert p.server.receive(coalesced, 0.0) == (sent, [])
    # a truncated last record, then junk, cost only themselves
    more = [p.client.send(b"a" * 1000), p.client.send(b"b" * 1000)]
    assert p.server.receive(more[0] + more[1][:-5] + b"\x17junk", 0.0) == ([b"a" * 1000], [])
    assert p.server.receive(p.client.send(b"after"), 0.0) == ([b"after"], [])
    assert not p.server.closed


# ---- record sequence numbers against a strict peer (issue 15) ------------------------------


@pytest.mark.parametrize("loss", list(strictdtls.LOSSES))
def test_strict_client_completes_whatever_is_lost(keys, loss):
    """A client that applies the replay window to epoch 0 (pion, Go PoleVPN's gateway) must
    finish the handshake with the router's listener whichever handshake datagram is lost:
    the server's epoch-0 records never reuse a sequence number it has sent that peer."""
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    client = strictdtls.Client(strict=True)
    server = strictdtls.Server(dtls.CookieListener(ctx, jar), dtls.peer_key(PEER), strict=False)
    path = strictdtls.Path(dict(strictdtls.LOSSES[loss]))
    strictdtls.run(client, server, path)
    assert client.strict.dropped == [], "the client saw a record it had seen before"
    assert not any(n for n in path.lose.values()), f"the loss did not happen: {path.log}"
    strictdtls.exchange(client, server)


@pytest.mark.parametrize("loss", list(strictdtls.LOSSES))
def test_our_client_completes_with_a_strict_server(keys, loss):
    """The other way round: our gateway's client against a server that applies the window
    to epoch 0 (Go PoleVPN's router)."""
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    client = strictdtls.Client(strict=False)
    server = strictdtls.Server(dtls.CookieListener(ctx, jar), dtls.peer_key(PEER), strict=True)
    path = strictdtls.Path(dict(strictdtls.LOSSES[loss]))
    strictdtls.run(client, server, path)
    assert server.strict.dropped == []
    assert not any(n for n in path.lose.values()), f"the loss did not happen: {path.log}"
    strictdtls.exchange(client, server)


def test_server_epoch0_numbers_continue_from_the_cookie_hello(keys):
    """Record level: after a lost first ClientHello the HelloVerifyRequest is record 1
    (mirrored); the flight that follows starts at the cookie ClientHello's number (2)."""
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    listener = dtls.CookieListener(ctx, jar)
    client = strictdtls.Client(strict=True)
    first = client.start()[0]
    retransmitted = first[:5] + (1).to_bytes(6, "big") + first[11:]
    hvr, _ = listener.receive(retransmitted, dtls.peer_key(PEER), 0.0)
    assert [strictdtls.describe(r)[2] for r in dtls.split_records(hvr[0])] == [1]
    with_cookie = client.receive(hvr[0])[0]
    assert dtls.record_seq(with_cookie) == 1  # OpenSSL's client numbers on from its own 0
    with_cookie = with_cookie[:5] + (2).to_bytes(6, "big") + with_cookie[11:]
    flight, session = listener.receive(with_cookie, dtls.peer_key(PEER), 0.0)
    assert session is not None
    seqs = [strictdtls.describe(r)[2] for d in flight for r in dtls.split_records(d)]
    assert seqs == list(range(2, 2 + len(seqs)))


# ---- the cookie listener keeps nothing (issue 20 finding 1) -------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize(
    "junk",
    [
        b"\x16\xfe\xfd" + b"\x00" * 65000,  # a 64 KB datagram that looks like a record
        record(22, 0, 0, b"\x01" + b"\x00" * 300) * 4,  # several records, within the MTU
        record(22, 0, 0, b"\x01\x00\x10\x00" + b"\x00" * 40)[:-20],  # a cut record
    ],
    ids=["oversized", "several-records", "truncated"],
)
def test_junk_does_not_delay_the_next_clienthello(keys, junk):
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    listener = dtls.CookieListener(ctx, jar)
    assert listener.receive(junk, dtls.peer_key(("198.19.0.66", 1)), 0.0) == ([], None)
    client = strictdtls.Client(strict=True)
    hvr, sess = listener.receive(client.start()[0], dtls.peer_key(PEER), 0.0)
    assert sess is None and strictdtls.kinds(hvr) == ["HVR"]
    flight, sess = listener.receive(client.receive(hvr[0])[0], dtls.peer_key(PEER), 0.0)
    assert sess is not None and strictdtls.kinds(flight)[0] == "SH"


def test_junk_datagrams_are_not_retained(keys):
    """What OpenSSL did not consume of a datagram used to stay in a shared BIO, about 48 KB
    per 64 KB datagram: 300 of them would keep 14 MB."""
    ctx, jar = dtls.server_context(keys.server_cert, keys.server_key)
    listener = dtls.CookieListener(ctx, jar)
    junk = b"\x16\xfe\xfd" + bytes(range(256)) * 255
    listener.receive(junk, b"p", 0.0)
    before = _rss()
    for i in range(300):
        listener.receive(junk[:-i] if i else junk, b"p", 0.0)
    assert _rss() - before < 4 << 20


def _stale_openssl_error() -> None:
    """Leave an error in this thread's OpenSSL error queue, as any failed call may."""
    from OpenSSL._util import lib

    ctx = dtls.SSL.Context(dtls.SSL.DTLS_SERVER_METHOD)
    assert lib.SSL_CTX_use_certificate_chain_file(ctx._context, b"/nonexistent/x.pem") == 0
    assert lib.ERR_peek_error() != 0


def test_a_stale_openssl_error_does_not_kill_the_association(keys, record_path):
    """OpenSSL 3.0's SSL_get_error (a system OpenSSL under pyOpenSSL may be one) reports any
    error in the thread's queue as this read's failure, so an unrelated failure would close
    a live session: the queue is cleared before each SSL_read. (OpenSSL 4, bundled with
    cryptography 50, looks only at the call's own errors and passes either way.)"""
    p = Pair(keys, dtls.Verification(insecure=True))
    p.handshake()
    assert p.server is not None
    _stale_openssl_error()
    d = p.client.send(b"still fine")
    assert p.server.receive(d, 0.0) == ([b"still fine"], [])
    assert not p.server.closed, p.server.error

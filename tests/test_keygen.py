"""polevpn-keygen: the files it writes, and that the router certificate really works in TLS."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from polevpn import keygen

EXTRA_SANS = ["vpn.example.com", "198.18.0.5", "2001:db8::1"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> keygen.KeygenResult:
    # RSA key generation is slow-ish; share one set of keys across read-only tests
    out = tmp_path_factory.mktemp("keys") / "nested" / "keys"
    return keygen.generate(out, EXTRA_SANS, days=30, force=False)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_writes_all_files_with_modes(generated: keygen.KeygenResult) -> None:
    names = sorted(p.name for p in generated.out_dir.iterdir())
    assert names == sorted(keygen.ALL_FILES)  # no temporary files left behind
    for path in generated.files:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.name in {"ca.key", "server.key", "shared.key"}:
            assert mode == 0o600, path
        else:
            assert mode == 0o644, path
    assert stat.S_IMODE(generated.out_dir.stat().st_mode) == 0o700


def test_secret_modes_ignore_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        result = keygen.generate(tmp_path, [], days=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(result.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(result.shared_key.stat().st_mode) == 0o600


def test_shared_key_is_one_line_of_32_random_bytes(generated: keygen.KeygenResult) -> None:
    text = generated.shared_key.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    assert len(bytes.fromhex(text.strip())) == 32


def test_server_certificate_content(generated: keygen.KeygenResult) -> None:
    cert = _load_cert(generated.server_cert)
    ca = _load_cert(generated.ca_cert)
    cert.verify_directly_issued_by(ca)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "polevpn-router",
        "localhost",
        "vpn.example.com",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("198.18.0.5"),
        ipaddress.ip_address("2001:db8::1"),
    ]

    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True

    # RSA server key: needed for ECDHE-RSA interop with Go PoleVPN on the DTLS path
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 2048

    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 <= lifetime.days <= 31


def test_pin_is_sha256_of_der(generated: keygen.KeygenResult) -> None:
    pem = generated.server_cert.read_text()
    der = ssl.PEM_cert_to_DER_cert(pem)
    assert generated.fingerprint == hashlib.sha256(der).hexdigest()
    assert len(generated.fingerprint) == 64


def test_san_parsing() -> None:
    assert keygen.parse_san("198.18.0.1") == x509.IPAddress(ipaddress.ip_address("198.18.0.1"))
    assert keygen.parse_san("[2001:db8::2]") == x509.IPAddress(ipaddress.ip_address("2001:db8::2"))
    assert keygen.parse_san("VPN.Example.com.") == x509.DNSName("vpn.example.com")
    for bad in ["", "a b", "https://vpn.example.com", "x" * 64 + ".example.com"]:
        with pytest.raises(keygen.KeygenError):
            keygen.parse_san(bad)


def test_duplicate_sans_collapse() -> None:
    entries = keygen.build_sans(["localhost", "127.0.0.1", "vpn.example.com", "VPN.example.com"])
    assert len(entries) == len(set(entries)) == 5


def test_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "server.key").write_text("precious\n")
    with pytest.raises(keygen.KeygenError):
        keygen.generate(tmp_path, [], days=1, force=False)
    # nothing at all is written when any target exists
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]

    assert keygen.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "refusing to overwrite" in err and "server.key" in err and "--force" in err
    assert (tmp_path / "server.key").read_text() == "precious\n"


def test_force_replaces_everything(tmp_path: Path) -> None:
    first = keygen.generate(tmp_path, [], days=1)
    os.chmod(first.shared_key, 0o644)
    old_shared = first.shared_key.read_text()
    second = keygen.generate(tmp_path, [], days=1, force=True)
    assert second.fingerprint != first.fingerprint
    assert second.shared_key.read_text() != old_shared
    assert stat.S_IMODE(second.shared_key.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keygen.ALL_FILES)


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    assert keygen.main(["--out", str(tmp_path / "k"), "--days", "0"]) == 2
    assert keygen.main(["--out", str(tmp_path / "k"), "--san", "not a name"]) == 2
    assert not (tmp_path / "k").exists()


def test_main_prints_pin_and_snippets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keygen.main(["--out", str(tmp_path), "--san", "vpn.example.com", "--days", "2"]) == 0
    out = capsys.readouterr().out
    pin = hashlib.sha256(
        ssl.PEM_cert_to_DER_cert((tmp_path / "server.crt").read_text())
    ).hexdigest()
    assert f'"cert_pin": "{pin}"' in out
    for fragment in ['"ca_file"', '"server_name": "polevpn-router"', '"cert_file"', '"key_file"']:
        assert fragment in out
    for name in keygen.ALL_FILES:
        assert name in out


def test_runs_as_module(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "polevpn.keygen", "--out", str(tmp_path), "--days", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cert_pin" in proc.stdout
    again = subprocess.run(
        [sys.executable, "-m", "polevpn.keygen", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1


# --- real TLS handshakes against the generated certificate ---------------------------------


@pytest.fixture
def tls_server(generated: keygen.KeygenResult) -> Iterator[tuple[int, list[BaseException]]]:
    """A TLS 1.2+ echo-one-line server on 127.0.0.1 using server.crt/server.key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(generated.server_cert, generated.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    # short accept timeout so teardown notices `stop` quickly (close() does not wake accept)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                raw.settimeout(10)
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    conn.sendall(conn.recv(64))
            except (ssl.SSLError, OSError) as exc:
                # expected when a client rejects the certificate; tests inspect if they care
                errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, errors
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=15)


def _client_context(ca_file: Path, tls12_only: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(ca_file)
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        # the suite Go PoleVPN negotiates on its DTLS path
        ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    return ctx


def _handshake(port: int, ctx: ssl.SSLContext, server_hostname: str) -> tuple[str, str]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as conn,
    ):
        conn.sendall(b"ping")
        assert conn.recv(64) == b"ping"
        cipher = conn.cipher()
        version = conn.version()
        assert cipher is not None and version is not None
        return cipher[0], version


@pytest.mark.parametrize("name", ["polevpn-router", "vpn.example.com", "localhost", "127.0.0.1"])
def test_tls_handshake_verifies(
    generated: keygen.KeygenResult, tls_server: tuple[int, list[BaseException]], name: str
) -> None:
    port, _ = tls_server
    _, version = _handshake(port, _client_context(generated.ca_cert), name)
    assert version in {"TLSv1.2", "TLSv1.3"}


def test_tls12_ecdhe_rsa_aes128_gcm(
    generated: keygen.KeygenResult, tls_server: tuple[int, list[BaseException]]
) -> None:
    port, _ = tls_server
    ctx = _client_context(generated.ca_cert, tls12_only=True)
    cipher, version = _handshake(port, ctx, "polevpn-router")
    assert version == "TLSv1.2"
    assert cipher == "ECDHE-RSA-AES128-GCM-SHA256"


def test_tls_rejects_wrong_name(
    generated: keygen.KeygenResult, tls_server: tuple[int, list[BaseException]]
) -> None:
    port, _ = tls_server
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(port, _client_context(generated.ca_cert), "other.example.com")


def test_tls_rejects_other_ca(tmp_path: Path, tls_server: tuple[int, list[BaseException]]) -> None:
    port, _ = tls_server
    other = keygen.generate(tmp_path, [], days=1)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(port, _client_context(other.ca_cert), "polevpn-router")

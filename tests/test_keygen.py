"""polevpn-keygen: the files it writes, and that its certificates really work in TLS.

Covers the router certificate, and the per-gateway secrets and client certificates
(``--gateway``/``--client-certs``), including adding gateways under an existing CA.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
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


@contextlib.contextmanager
def _tls_echo_server(
    ctx: ssl.SSLContext, seen: list, record_peer: bool = False
) -> Iterator[int]:
    """Echo one read back on each TLS connection to 127.0.0.1:port; handshake failures go
    into ``seen``, and with ``record_peer`` each client's certificate DER (or None) too."""
    listener = socket.create_server(("127.0.0.1", 0))
    # short accept timeout so teardown notices `stop` quickly (close() does not wake accept)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
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
                    if record_peer:
                        seen.append(conn.getpeercert(binary_form=True))
                    conn.sendall(conn.recv(64))
            except (ssl.SSLError, OSError) as exc:
                # expected when one side rejects the other; tests inspect if they care
                seen.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=15)


@pytest.fixture
def tls_server(generated: keygen.KeygenResult) -> Iterator[tuple[int, list[BaseException]]]:
    """A TLS 1.2+ echo-one-line server on 127.0.0.1 using server.crt/server.key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(generated.server_cert, generated.server_key)
    errors: list[BaseException] = []
    with _tls_echo_server(ctx, errors) as port:
        yield port, errors


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


# --- per-gateway credentials -----------------------------------------------------------------

GW1 = "169.254.0.1=198.18.10.0/24,2001:db8:10::/64,2001:db8:ff::1/128"
GW2 = "169.254.0.2=198.18.20.0/24"


@pytest.fixture(scope="module")
def gateways(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, tuple[keygen.GatewayCredentials, ...]]:
    out = tmp_path_factory.mktemp("gwkeys")
    keygen.generate(out, [], days=30)
    return out, keygen.issue_gateways(out, [GW1, GW2], client_certs=True, days=30)


def _sha256_file_der(path: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


def _gateways_json(report: str) -> dict[str, dict[str, object]]:
    """The object after '"gateways": ' in a report, parsed as JSON (so it must be valid)."""
    start = report.index('"gateways": ') + len('"gateways": ')
    table, _ = json.JSONDecoder().raw_decode(report[start:])
    assert isinstance(table, dict)
    return table


def _gateway_block(report: str, address: str) -> dict[str, str]:
    """A gateway's config lines, wrapped in braces and parsed: they must paste as JSON."""
    lines = report.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(f"gateway {address} config"))
    body: list[str] = []
    for line in lines[head + 1 :]:
        if not line.strip():
            break
        body.append(line)
    parsed = json.loads("{" + "\n".join(body) + "}")
    assert isinstance(parsed, dict)
    return parsed


def test_gateway_spec_parsing() -> None:
    spec = keygen.parse_gateway_spec(f" {GW1} ")
    assert spec.address == ipaddress.IPv4Address("169.254.0.1")
    assert [str(n) for n in spec.networks] == [
        "198.18.10.0/24",
        "2001:db8:10::/64",
        "2001:db8:ff::1/128",
    ]
    assert spec.stem == "gw-169.254.0.1"
    # a bare address is a host route; spaces around items and repeats are tolerated
    spec = keygen.parse_gateway_spec("169.254.0.9=198.18.0.7, 2001:db8:ff::9,198.18.0.7/32")
    assert [str(n) for n in spec.networks] == ["198.18.0.7/32", "2001:db8:ff::9/128"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("169.254.0.1", "ADDR=NET"),
        ("169.254.0.1=", "no networks"),
        ("169.254.0.1=198.18.10.0/24,", "empty network"),
        ("169.254.0.1=198.18.10.0/33", "not a network"),
        ("169.254.0.1=lan", "not a network"),
        ("169.254.0.1=198.18.10.1/24", "did you mean 198.18.10.0/24"),
        ("2001:db8:ff::1=198.18.10.0/24", "must be IPv4"),
        ("gw1=198.18.10.0/24", "not an IPv4 address"),
        ("169.254.0.1/32=198.18.10.0/24", "not an IPv4 address"),
        ("0.0.0.0=198.18.10.0/24", "cannot be a gateway address"),
        ("224.0.0.1=198.18.10.0/24", "cannot be a gateway address"),
    ],
)
def test_gateway_spec_rejects(spec: str, message: str) -> None:
    with pytest.raises(keygen.KeygenError, match=message.replace(".", r"\.")):
        keygen.parse_gateway_spec(spec)


def test_duplicate_gateway_address_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(keygen.KeygenError, match="more than once"):
        keygen.parse_gateway_specs([GW2, "169.254.0.2=198.18.21.0/24"])
    out = tmp_path / "k"
    assert keygen.main(["--out", str(out), "--gateway", GW2, "--gateway", GW2]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "169.254.0.2" in err
    assert not out.exists()


def test_gateway_files_and_modes(
    gateways: tuple[Path, tuple[keygen.GatewayCredentials, ...]],
) -> None:
    out, creds = gateways
    expected = set(keygen.ALL_FILES)
    for addr in ("169.254.0.1", "169.254.0.2"):
        expected |= {f"gw-{addr}.key", f"gw-{addr}.crt", f"gw-{addr}.pem"}
    assert {p.name for p in out.iterdir()} == expected  # no temporary files left behind
    assert [c.address for c in creds] == ["169.254.0.1", "169.254.0.2"]
    secrets_seen = {(out / "shared.key").read_text()}
    for c in creds:
        assert c.client_cert_file is not None and c.client_key_file is not None
        assert c.files == (c.key_file, c.client_cert_file, c.client_key_file)
        assert c.key_file.name == f"gw-{c.address}.key"
        assert stat.S_IMODE(c.key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(c.client_key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(c.client_cert_file.stat().st_mode) == 0o644
        text = c.key_file.read_text()
        assert text.endswith("\n") and text.count("\n") == 1
        assert len(bytes.fromhex(text.strip())) == 32
        secrets_seen.add(text)
    assert len(secrets_seen) == 3  # each gateway its own secret, none equal to shared.key
    assert creds[0].networks == ("198.18.10.0/24", "2001:db8:10::/64", "2001:db8:ff::1/128")
    assert creds[1].networks == ("198.18.20.0/24",)


def test_client_certificate_content(
    gateways: tuple[Path, tuple[keygen.GatewayCredentials, ...]],
) -> None:
    out, creds = gateways
    ca = _load_cert(out / "ca.crt")
    for c in creds:
        assert c.client_cert_file is not None and c.client_key_file is not None
        cert = _load_cert(c.client_cert_file)
        cert.verify_directly_issued_by(ca)
        cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
        assert cn == f"polevpn-gateway {c.address}"
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
        # a gateway's certificate must not be usable to impersonate the router
        assert ExtendedKeyUsageOID.SERVER_AUTH not in eku
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(c.address)]

        key = serialization.load_pem_private_key(c.client_key_file.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert key.public_key() == cert.public_key()

        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert 30 <= lifetime.days <= 31
        assert c.not_after == cert.not_valid_after_utc

        assert c.cert_fingerprint == _sha256_file_der(c.client_cert_file)
        assert c.cert_fingerprint == keygen.cert_fingerprint(cert)
        assert len(c.cert_fingerprint) == 64 and c.cert_fingerprint == c.cert_fingerprint.lower()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
def test_openssl_verifies_client_certificate(
    gateways: tuple[Path, tuple[keygen.GatewayCredentials, ...]],
) -> None:
    out, creds = gateways
    for purpose, ok in (("sslclient", True), ("sslserver", False)):
        proc = subprocess.run(
            ["openssl", "verify", "-CAfile", str(out / "ca.crt"), "-purpose", purpose]
            + [str(c.client_cert_file) for c in creds],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (proc.returncode == 0) is ok, (purpose, proc.stdout, proc.stderr)


def test_issue_gateways_without_certificates(tmp_path: Path) -> None:
    # no CA at all: plain secrets do not need one
    (creds,) = keygen.issue_gateways(tmp_path, [GW2], client_certs=False, days=1)
    assert creds.client_cert_file is None and creds.cert_fingerprint is None
    assert [p.name for p in tmp_path.iterdir()] == ["gw-169.254.0.2.key"]
    report = keygen.render_gateways_report(tmp_path, [creds])
    assert _gateways_json(report) == {
        "169.254.0.2": {
            "key_file": str((tmp_path / "gw-169.254.0.2.key").resolve()),
            "networks": ["198.18.20.0/24"],
        }
    }
    assert "client_ca_file" not in report and "client_cert_file" not in report
    assert _gateway_block(report, "169.254.0.2") == {
        "gateway": "169.254.0.2",
        "key_file": str((tmp_path / "gw-169.254.0.2.key").resolve()),
    }


def test_first_run_with_gateways_writes_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k"
    args = ["--out", str(out), "--days", "2", "--gateway", GW1, "--gateway", GW2]
    assert keygen.main([*args, "--client-certs"]) == 0
    report = capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert set(keygen.ALL_FILES) <= names
    assert {"gw-169.254.0.1.crt", "gw-169.254.0.2.pem"} <= names
    assert f'"cert_pin": "{_sha256_file_der(out / "server.crt")}"' in report

    table = _gateways_json(report)
    assert list(table) == ["169.254.0.1", "169.254.0.2"]
    for addr, nets in (
        ("169.254.0.1", ["198.18.10.0/24", "2001:db8:10::/64", "2001:db8:ff::1/128"]),
        ("169.254.0.2", ["198.18.20.0/24"]),
    ):
        crt = out / f"gw-{addr}.crt"
        assert table[addr] == {
            "key_file": str((out / f"gw-{addr}.key").resolve()),
            "cert_fingerprint": _sha256_file_der(crt),
            "networks": nets,
        }
        assert _gateway_block(report, addr) == {
            "gateway": addr,
            "key_file": str((out / f"gw-{addr}.key").resolve()),
            "client_cert_file": str(crt.resolve()),
            "client_key_file": str((out / f"gw-{addr}.pem").resolve()),
        }
        assert f"{_sha256_file_der(crt)}" in report
    ca_line = next(line for line in report.splitlines() if '"client_ca_file"' in line)
    assert json.loads("{" + ca_line.rstrip(",") + "}") == {
        "client_ca_file": str((out / "ca.crt").resolve())
    }


def test_adding_gateways_reuses_existing_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keygen.generate(tmp_path, [], days=5)
    before = {n: (tmp_path / n).read_bytes() for n in keygen.ALL_FILES}

    assert keygen.main(["--out", str(tmp_path), "--gateway", GW1, "--client-certs"]) == 0
    first = capsys.readouterr().out
    gw1 = (tmp_path / "gw-169.254.0.1.crt").read_bytes()
    assert keygen.main(["--out", str(tmp_path), "--gateway", GW2, "--client-certs"]) == 0
    second = capsys.readouterr().out

    # CA, router certificate and shared key untouched; the first gateway too
    assert {n: (tmp_path / n).read_bytes() for n in keygen.ALL_FILES} == before
    assert (tmp_path / "gw-169.254.0.1.crt").read_bytes() == gw1
    ca = _load_cert(tmp_path / "ca.crt")
    for addr in ("169.254.0.1", "169.254.0.2"):
        _load_cert(tmp_path / f"gw-{addr}.crt").verify_directly_issued_by(ca)
    # the add-only report is about the gateways alone
    assert '"cert_pin":' not in first and "server.crt" not in second
    assert list(_gateways_json(second)) == ["169.254.0.2"]
    # a certificate never outlives the CA that signed it
    assert _load_cert(tmp_path / "gw-169.254.0.2.crt").not_valid_after_utc <= (
        ca.not_valid_after_utc
    )


def test_client_certificate_validity_capped_by_ca(tmp_path: Path) -> None:
    keygen.generate(tmp_path, [], days=1)
    (creds,) = keygen.issue_gateways(tmp_path, [GW2], client_certs=True, days=365)
    assert creds.client_cert_file is not None
    cert = _load_cert(creds.client_cert_file)
    assert cert.not_valid_after_utc == _load_cert(tmp_path / "ca.crt").not_valid_after_utc


def test_gateway_files_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keygen.generate(tmp_path, [], days=1)
    (tmp_path / "gw-169.254.0.2.pem").write_text("precious\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["--out", str(tmp_path), "--gateway", GW1, "--gateway", GW2, "--client-certs"]
    assert keygen.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "refusing to overwrite" in err and "gw-169.254.0.2.pem" in err and "--force" in err
    # all or nothing: the other gateway's files are not written either
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "gw-169.254.0.2.pem").read_text() == "precious\n"
    # without --client-certs only gw-ADDR.key is a target, so the stray .pem does not matter
    assert keygen.main(["--out", str(tmp_path), "--gateway", GW2]) == 0


def test_first_run_refuses_existing_gateway_file_before_writing(tmp_path: Path) -> None:
    (tmp_path / "gw-169.254.0.2.key").write_text("precious\n")
    assert keygen.main(["--out", str(tmp_path), "--gateway", GW2]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["gw-169.254.0.2.key"]


def test_force_with_gateways_replaces_ca_and_gateway_files(tmp_path: Path) -> None:
    keygen.generate(tmp_path, [], days=1)
    (old,) = keygen.issue_gateways(tmp_path, [GW2], client_certs=True, days=1)
    old_ca = (tmp_path / "ca.crt").read_bytes()
    args = ["--out", str(tmp_path), "--gateway", GW2, "--client-certs", "--force", "--days", "1"]
    assert keygen.main(args) == 0
    assert (tmp_path / "ca.crt").read_bytes() != old_ca
    assert old.client_cert_file is not None
    cert = _load_cert(old.client_cert_file)
    assert keygen.cert_fingerprint(cert) != old.cert_fingerprint
    cert.verify_directly_issued_by(_load_cert(tmp_path / "ca.crt"))


def _replace_file(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing key", "ca.key not found"),
        ("garbage cert", "cannot load CA certificate"),
        ("garbage key", "cannot load CA key"),
        ("other key", "is not the private key of"),
        ("leaf as CA", "not a CA certificate"),
    ],
)
def test_unusable_ca_is_one_line_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    gateways: tuple[Path, tuple[keygen.GatewayCredentials, ...]],
    breakage: str,
    message: str,
) -> None:
    other_dir, other_creds = gateways
    keygen.generate(tmp_path, [], days=1)
    ca_crt, ca_key = tmp_path / "ca.crt", tmp_path / "ca.key"
    if breakage == "missing key":
        ca_key.unlink()
    elif breakage == "garbage cert":
        _replace_file(ca_crt, b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    elif breakage == "garbage key":
        _replace_file(ca_key, b"not a key\n")
    elif breakage == "other key":
        _replace_file(ca_key, (other_dir / "ca.key").read_bytes())
    else:
        # a matching pair that is not a CA: a gateway certificate and its key
        cert_file, key_file = other_creds[0].client_cert_file, other_creds[0].client_key_file
        assert cert_file is not None and key_file is not None
        _replace_file(ca_crt, cert_file.read_bytes())
        _replace_file(ca_key, key_file.read_bytes())
    before = sorted(p.name for p in tmp_path.iterdir())
    assert keygen.main(["--out", str(tmp_path), "--gateway", GW2, "--client-certs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--client-certs"], "needs at least one --gateway"),
        (["--gateway", GW2, "--san", "vpn.example.com"], "--san only applies"),
        (["--gateway", GW2, "--days", "0"], "--days"),
    ],
)
def test_gateway_usage_errors_with_existing_ca(
    gateways: tuple[Path, tuple[keygen.GatewayCredentials, ...]],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    out, _ = gateways
    before = sorted(p.name for p in out.iterdir())
    assert keygen.main(["--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_keys_adds_gateways(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".venv" / "bin" / "polevpn-keygen").exists():
        pytest.skip("no .venv/bin/polevpn-keygen")
    out = tmp_path / "keys"

    def make(*variables: str) -> subprocess.CompletedProcess[str]:
        # -o: never let this test reinstall the venv
        return subprocess.run(
            ["make", "-s", "-o", ".venv/.installed", "keys", f"KEYS_DIR={out}", *variables],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    first = make()
    assert first.returncode == 0, first.stderr
    server = (out / "server.crt").read_bytes()
    added = make(f"GATEWAYS={GW1} {GW2}", "CLIENT_CERTS=1")
    assert added.returncode == 0, added.stderr
    assert (out / "server.crt").read_bytes() == server
    assert set(_gateways_json(added.stdout)) == {"169.254.0.1", "169.254.0.2"}
    ca = _load_cert(out / "ca.crt")
    _load_cert(out / "gw-169.254.0.2.crt").verify_directly_issued_by(ca)
    again = make(f"GATEWAYS={GW2}")
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    unchanged = make()
    assert unchanged.returncode == 0 and "exists" in unchanged.stdout


# --- a TLS server that asks for client certificates, as the router does ---------------------


@pytest.fixture
def client_auth_server(
    gateways: tuple[Path, tuple[keygen.GatewayCredentials, ...]],
) -> Iterator[tuple[int, list[bytes | None | BaseException]]]:
    """Accepts with CERT_OPTIONAL against ca.crt; records each peer's DER (or None, or error)."""
    out, _ = gateways
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(out / "server.crt", out / "server.key")
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(out / "ca.crt")
    seen: list[bytes | None | BaseException] = []
    with _tls_echo_server(ctx, seen, record_peer=True) as port:
        yield port, seen


def _client_auth_handshake(
    port: int, ca_file: Path, cert: tuple[Path, Path] | None, tls12: bool
) -> None:
    ctx = _client_context(ca_file)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(*cert)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="polevpn-router") as conn,
    ):
        conn.sendall(b"ping")
        # TLS 1.3 reports a rejected client certificate only here, after the handshake
        assert conn.recv(64) == b"ping"


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_tls_server_sees_gateway_fingerprint(
    gateways: tuple[Path, tuple[keygen.GatewayCredentials, ...]],
    client_auth_server: tuple[int, list[bytes | None | BaseException]],
    tls12: bool,
) -> None:
    out, creds = gateways
    port, seen = client_auth_server
    for c in creds:
        assert c.client_cert_file is not None and c.client_key_file is not None
        _client_auth_handshake(port, out / "ca.crt", (c.client_cert_file, c.client_key_file), tls12)
    # CERT_OPTIONAL: a gateway without a certificate still gets in, and is seen as such
    _client_auth_handshake(port, out / "ca.crt", None, tls12)
    assert len(seen) == 3
    ders = [d for d in seen if isinstance(d, bytes)]
    assert [hashlib.sha256(d).hexdigest() for d in ders] == [c.cert_fingerprint for c in creds]
    assert seen[2] is None


def test_tls_server_rejects_client_cert_from_other_ca(
    tmp_path: Path,
    gateways: tuple[Path, tuple[keygen.GatewayCredentials, ...]],
    client_auth_server: tuple[int, list[bytes | None | BaseException]],
) -> None:
    out, _ = gateways
    port, seen = client_auth_server
    keygen.generate(tmp_path, [], days=1)
    (foreign,) = keygen.issue_gateways(tmp_path, [GW1], client_certs=True, days=1)
    assert foreign.client_cert_file is not None and foreign.client_key_file is not None
    with pytest.raises((ssl.SSLError, OSError, AssertionError)):
        _client_auth_handshake(
            port, out / "ca.crt", (foreign.client_cert_file, foreign.client_key_file), False
        )
    deadline = time.monotonic() + 15
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(seen) == 1 and isinstance(seen[0], ssl.SSLCertVerificationError), seen

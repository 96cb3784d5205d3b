"""Development and small-deployment key material for polevpn.

``polevpn-keygen --out DIR`` writes a private CA, a router (server) certificate signed by it,
and the shared key that gateways present in AUTH. The router certificate is RSA 2048 because
the planned kcp:// transport has to interoperate with Go PoleVPN over DTLS 1.2 using
ECDHE-RSA-AES128-GCM-SHA256, which needs an RSA server key. The CA is RSA too, so a peer that
only offers RSA signature schemes can still verify the whole chain.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
SHARED_KEY = "shared.key"
ALL_FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, SHARED_KEY)
SECRET_FILES = frozenset({CA_KEY, SERVER_KEY, SHARED_KEY})

SERVER_NAME = "polevpn-router"
DEFAULT_SANS: tuple[str, ...] = (SERVER_NAME, "localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 3650
RSA_BITS = 2048
SHARED_KEY_BYTES = 32
# Backdate notBefore so a peer whose clock runs a little behind still accepts a fresh cert.
CLOCK_SKEW = dt.timedelta(minutes=5)

EXIT_USAGE = 2

SanName = x509.DNSName | x509.IPAddress


class KeygenError(Exception):
    """A problem the user can fix (existing files, bad SAN); reported as one line, exit 2."""


@dataclass(frozen=True)
class KeygenResult:
    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    shared_key: Path
    sans: tuple[str, ...]
    not_after: dt.datetime
    fingerprint: str
    """SHA-256 of the server certificate's DER, lowercase hex: the gateway's ``cert_pin``."""

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.shared_key)


def parse_san(name: str) -> SanName:
    """Turn a ``--san`` argument into a SAN entry, IP if it parses as one, otherwise DNS."""
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        # people paste IPv6 literals the way they appear in URLs
        text = text[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    text = text.lower().rstrip(".")
    if not text or any(c.isspace() or c in "/:@" for c in text):
        raise KeygenError(f"--san {name!r} is neither an IP address nor a DNS name")
    try:
        # certificates carry A-labels; the idna codec also rejects empty or oversized labels
        ascii_name = text.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise KeygenError(f"--san {name!r} is not a valid DNS name: {exc}") from None
    return x509.DNSName(ascii_name)


def san_text(entry: SanName) -> str:
    if isinstance(entry, x509.IPAddress):
        return f"IP:{entry.value}"
    return f"DNS:{entry.value}"


def build_sans(extra: Iterable[str]) -> list[SanName]:
    """Default names first, then the extras, without duplicates (which some verifiers reject)."""
    seen: set[SanName] = set()
    result: list[SanName] = []
    for name in (*DEFAULT_SANS, *extra):
        entry = parse_san(name)
        if entry not in seen:
            seen.add(entry)
            result.append(entry)
    return result


def cert_fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def _make_ca(
    key: rsa.RSAPrivateKey, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "polevpn"),
            # a random suffix keeps two dev CAs from having the same subject, which would
            # otherwise confuse chain building on a machine that trusts both
            x509.NameAttribute(NameOID.COMMON_NAME, f"polevpn dev CA {secrets.token_hex(4)}"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _make_server(
    key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    sans: Sequence[SanName],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # harmless with ECDHE, and keeps old RSA-key-exchange peers working
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    # unencrypted on purpose: the router must start unattended from systemd
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write via a temporary file so a crash never leaves a half-written key behind.

    The mode is set on the open descriptor, before any secret byte is written, and does not
    depend on the caller's umask. Without ``force`` the final step is a hard link, which
    fails if the target appeared since the up-front check instead of clobbering it.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeygenError(f"{path} appeared while writing; not overwriting it") from None
            os.unlink(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def generate(
    out_dir: Path,
    sans: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> KeygenResult:
    """Create CA, server certificate and shared key in ``out_dir``.

    Raises KeygenError, before writing anything, if a target file exists and ``force`` is
    false, if ``days`` is not positive, or if a SAN is unusable.
    """
    if days < 1:
        raise KeygenError(f"--days must be at least 1, not {days}")
    san_entries = build_sans(sans)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise KeygenError(f"{out_dir} exists and is not a directory")
    paths = {name: out_dir / name for name in ALL_FILES}
    if not force:
        existing = [str(p) for p in paths.values() if p.exists() or p.is_symlink()]
        if existing:
            raise KeygenError(
                f"refusing to overwrite {', '.join(existing)} (use --force to replace)"
            )
    # 0700 only applies to directories we create: the directory holds private keys
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_before = now - CLOCK_SKEW
    not_after = now + dt.timedelta(days=days)

    ca_key = _new_rsa_key()
    ca_cert = _make_ca(ca_key, not_before, not_after)
    server_key = _new_rsa_key()
    server_cert = _make_server(server_key, ca_cert, ca_key, san_entries, not_before, not_after)
    # hex rather than base64: no '-' or '/' to trip up shells, URLs or option parsers
    shared = secrets.token_hex(SHARED_KEY_BYTES) + "\n"

    contents = {
        CA_CERT: _pem_cert(ca_cert),
        CA_KEY: _pem_key(ca_key),
        SERVER_CERT: _pem_cert(server_cert),
        SERVER_KEY: _pem_key(server_key),
        SHARED_KEY: shared.encode("ascii"),
    }
    for name, data in contents.items():
        mode = 0o600 if name in SECRET_FILES else 0o644
        _write(paths[name], data, mode, force)

    return KeygenResult(
        out_dir=out_dir,
        ca_cert=paths[CA_CERT],
        ca_key=paths[CA_KEY],
        server_cert=paths[SERVER_CERT],
        server_key=paths[SERVER_KEY],
        shared_key=paths[SHARED_KEY],
        sans=tuple(san_text(e) for e in san_entries),
        not_after=not_after,
        fingerprint=cert_fingerprint(server_cert),
    )


def render_report(result: KeygenResult) -> str:
    """Human summary plus the config fragments to paste, with absolute paths."""

    def q(p: Path) -> str:
        return '"' + str(p.resolve()) + '"'

    lines = ["wrote:"]
    for path in result.files:
        mode = "0600" if path.name in SECRET_FILES else "0644"
        lines.append(f"  {path}  ({mode})")
    lines += [
        "",
        f"server certificate SANs: {', '.join(result.sans)}",
        f"valid until: {result.not_after.isoformat()}",
        f"server certificate SHA-256 (cert_pin): {result.fingerprint}",
        "",
        "router config (/etc/polevpn/config.json):",
        f'  "key_file": {q(result.shared_key)},',
        '  "tls": {',
        '    "enable": true,',
        '    "listen": "0.0.0.0:443",',
        f'    "cert_file": {q(result.server_cert)},',
        f'    "key_file": {q(result.server_key)}',
        "  }",
        "",
        "gateway config (copy ca.crt and shared.key to the office host; adjust paths):",
        f'  "key_file": {q(result.shared_key)},',
        f'  "ca_file": {q(result.ca_cert)},',
        # this name is in every certificate we issue, so it works even when route_server
        # is an IP address
        f'  "server_name": "{SERVER_NAME}",',
        f'  "cert_pin": "{result.fingerprint}"',
        "",
        f"{CA_KEY} is only needed to issue new certificates: keep it off the router.",
    ]
    return "\n".join(lines) + "\n"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polevpn-keygen",
        description="Write a private CA, an RSA router certificate and a shared key.",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write into")
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="extra subject alternative name (IP or DNS, repeatable), e.g. vpn.example.com",
    )
    parser.add_argument(
        "--days",
        type=int,
        default=DEFAULT_DAYS,
        help=f"validity of CA and server certificate (default {DEFAULT_DAYS})",
    )
    parser.add_argument("--force", action="store_true", help="replace existing files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        result = generate(args.out, args.san, args.days, args.force)
    except KeygenError as exc:
        print(f"polevpn-keygen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"polevpn-keygen: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Development and small-deployment key material for polevpn.

``polevpn-keygen --out DIR`` writes a private CA, a router (server) certificate signed by it,
and the shared key that gateways present in AUTH. With ``--gateway ADDR=NET,...`` it also
issues per-gateway credentials (a secret, and with ``--client-certs`` a client certificate
signed by the same CA) and prints the router's ``gateways`` table for them; when the CA
already exists only the gateway material is issued, so adding an office never needs a new CA.

The router certificate is RSA 2048 because
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
import json
import os
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
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
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

GATEWAY_PREFIX = "gw-"
GATEWAY_CN_PREFIX = "polevpn-gateway "


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


def _leaf(
    subject: x509.Name,
    public: CertificatePublicKeyTypes,
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    not_before: dt.datetime,
    not_after: dt.datetime,
    usage: x509.ObjectIdentifier,
    sans: Sequence[SanName],
    key_encipherment: bool,
) -> x509.Certificate:
    """An end-entity certificate for one ``usage`` (serverAuth or clientAuth) only: a stolen
    gateway certificate must not pass as the router, nor the router's as a gateway."""
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        # an externally made CA may lack an SKI; derive the identifier the same way openssl does
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
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
                key_encipherment=key_encipherment,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, _signature_hash(ca_key))
    )


def _make_server(
    key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    sans: Sequence[SanName],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    return _leaf(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]),
        key.public_key(),
        ca_cert,
        ca_key,
        not_before,
        not_after,
        ExtendedKeyUsageOID.SERVER_AUTH,
        sans,
        # harmless with ECDHE, and keeps old RSA-key-exchange peers working
        key_encipherment=True,
    )


def _pem_key(key: PrivateKeyTypes) -> bytes:
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


def _refuse_existing(paths: Iterable[Path]) -> None:
    # is_symlink: a dangling link would otherwise pass exists() and be written through
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise KeygenError(f"refusing to overwrite {', '.join(existing)} (use --force to replace)")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise KeygenError(f"{out_dir} exists and is not a directory")


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
    _check_out_dir(out_dir)
    paths = {name: out_dir / name for name in ALL_FILES}
    if not force:
        _refuse_existing(paths.values())
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


# --- per-gateway credentials ---------------------------------------------------------------


@dataclass(frozen=True)
class GatewaySpec:
    """One ``--gateway ADDR=NET[,NET...]``: the address it REGISTERs with, what it may announce."""

    address: ipaddress.IPv4Address
    networks: tuple[IPNetwork, ...]

    @property
    def stem(self) -> str:
        return f"{GATEWAY_PREFIX}{self.address}"


@dataclass(frozen=True)
class GatewayCredentials:
    """What ``issue_gateways`` wrote for one gateway; field names match the config keys."""

    address: str
    networks: tuple[str, ...]
    key_file: Path
    """``gw-ADDR.key``: the secret the gateway sends in AUTH/REGISTER (router and gateway)."""
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    cert_fingerprint: str | None = None
    """SHA-256 of the client certificate's DER, lowercase hex (router: ``cert_fingerprint``)."""
    not_after: dt.datetime | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        extra = (self.client_cert_file, self.client_key_file)
        return (self.key_file, *(p for p in extra if p is not None))

    def router_entry(self) -> dict[str, object]:
        """The value under this gateway's address in the router's ``gateways`` table."""
        entry: dict[str, object] = {"key_file": str(self.key_file.resolve())}
        if self.cert_fingerprint is not None:
            entry["cert_fingerprint"] = self.cert_fingerprint
        entry["networks"] = list(self.networks)
        return entry


def parse_gateway_spec(text: str) -> GatewaySpec:
    """Parse ``ADDR=NET[,NET...]``.

    Networks with host bits set are rejected rather than silently masked: ``198.18.10.1/24``
    is more likely a typo for a /32 or a wrong prefix than a deliberate /24, and the router
    would otherwise authorise something the user did not write.
    """
    addr_text, sep, nets_text = text.strip().partition("=")
    if not sep:
        raise KeygenError(f"--gateway {text!r}: expected ADDR=NET[,NET...]")
    try:
        address = ipaddress.ip_address(addr_text.strip())
    except ValueError:
        raise KeygenError(
            f"--gateway {text!r}: {addr_text.strip()!r} is not an IPv4 address"
        ) from None
    if not isinstance(address, ipaddress.IPv4Address):
        # PoleVPN's REGISTER carries the gateway address as IPv4; gateway6 goes in NETs as /128
        raise KeygenError(
            f"--gateway {text!r}: the gateway address must be IPv4 "
            f"(put an IPv6 gateway address into the networks as {address}/128)"
        )
    if (
        address.is_unspecified
        or address.is_multicast
        or address == ipaddress.IPv4Address("255.255.255.255")
    ):
        raise KeygenError(f"--gateway {text!r}: {address} cannot be a gateway address")
    if not nets_text.strip():
        raise KeygenError(f"--gateway {text!r}: no networks after '='")
    networks: list[IPNetwork] = []
    for part in nets_text.split(","):
        item = part.strip()
        if not item:
            raise KeygenError(f"--gateway {text!r}: empty network in the list")
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f"; did you mean {ipaddress.ip_network(item, strict=False)}?"
            if hint and "host bits" in str(exc):
                raise KeygenError(f"--gateway {text!r}: {item} has host bits set{hint}") from None
            raise KeygenError(f"--gateway {text!r}: {item!r} is not a network (CIDR)") from None
        if net not in networks:
            networks.append(net)
    return GatewaySpec(address=address, networks=tuple(networks))


def parse_gateway_specs(specs: Iterable[str | GatewaySpec]) -> tuple[GatewaySpec, ...]:
    """Parse each spec (strings or already parsed) and reject a gateway address given twice."""
    result: list[GatewaySpec] = []
    seen: set[ipaddress.IPv4Address] = set()
    for spec in specs:
        parsed = spec if isinstance(spec, GatewaySpec) else parse_gateway_spec(spec)
        if parsed.address in seen:
            raise KeygenError(f"--gateway {parsed.address} is given more than once")
        seen.add(parsed.address)
        result.append(parsed)
    return tuple(result)


def gateway_paths(out_dir: Path, spec: GatewaySpec, client_certs: bool) -> tuple[Path, ...]:
    """The files ``issue_gateways`` writes for ``spec``: secret, then certificate and its key."""
    names = [".key", ".crt", ".pem"] if client_certs else [".key"]
    return tuple(Path(out_dir) / f"{spec.stem}{suffix}" for suffix in names)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_ca(out_dir: Path) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """Load ``ca.crt``/``ca.key`` from ``out_dir`` and check that they belong together."""
    cert_path, key_path = Path(out_dir) / CA_CERT, Path(out_dir) / CA_KEY
    for path in (cert_path, key_path):
        if not path.exists():
            raise KeygenError(
                f"{path} not found; it is needed to sign client certificates "
                "(restore it, or drop --client-certs)"
            )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise KeygenError(f"cannot load CA certificate {cert_path}: {_one_line(exc)}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError is how cryptography reports a passphrase-protected key
        raise KeygenError(f"cannot load CA key {key_path}: {_one_line(exc)}") from None
    if not isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise KeygenError(f"CA key {key_path} has an unsupported type ({type(key).__name__})")

    def spki(public: object) -> bytes:
        return public.public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    if spki(cert.public_key()) != spki(key.public_key()):
        raise KeygenError(f"{key_path} is not the private key of {cert_path}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise KeygenError(f"{cert_path} is not a CA certificate (basicConstraints CA:TRUE missing)")
    return cert, key


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # EdDSA signs the message itself; cryptography wants no separate hash for it
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _make_client(
    key: ec.EllipticCurvePrivateKey,
    address: ipaddress.IPv4Address,
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "polevpn"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{GATEWAY_CN_PREFIX}{address}"),
        ]
    )
    return _leaf(
        subject,
        key.public_key(),
        ca_cert,
        ca_key,
        not_before,
        not_after,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        [x509.IPAddress(address)],
        # ECDSA keys only sign (CertificateVerify); nothing is encrypted to them
        key_encipherment=False,
    )


def issue_gateways(
    out_dir: Path,
    specs: Sequence[str | GatewaySpec],
    client_certs: bool = False,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> tuple[GatewayCredentials, ...]:
    """Write ``gw-ADDR.key`` (and with ``client_certs`` ``gw-ADDR.crt``/``.pem``) per gateway.

    Client certificates are signed by the CA already in ``out_dir`` (``ca.crt``/``ca.key``),
    so call ``generate`` first for a new directory. Their validity is ``days``, cut to the
    CA's own end: a certificate outliving its issuer would stop verifying anyway.
    Raises KeygenError, before writing anything, on a bad spec, a duplicate address, an
    existing target without ``force``, or an unusable CA.
    """
    if days < 1:
        raise KeygenError(f"--days must be at least 1, not {days}")
    parsed = parse_gateway_specs(specs)
    if not parsed:
        raise KeygenError("no gateways given")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    targets = {spec.address: gateway_paths(out_dir, spec, client_certs) for spec in parsed}
    if not force:
        _refuse_existing(p for paths in targets.values() for p in paths)

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_before = now - CLOCK_SKEW
    not_after = now + dt.timedelta(days=days)
    ca: tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes] | None = None
    if client_certs:
        ca = load_ca(out_dir)
        ca_end = ca[0].not_valid_after_utc
        if ca_end <= now:
            raise KeygenError(
                f"{out_dir / CA_CERT} expired on {ca_end.isoformat()}; use --force to make a new CA"
            )
        not_after = min(not_after, ca_end)

    # build everything in memory first so a failure leaves no half-issued gateway behind
    contents: list[tuple[Path, bytes, int]] = []
    results: list[GatewayCredentials] = []
    for spec in parsed:
        paths = targets[spec.address]
        secret = secrets.token_hex(SHARED_KEY_BYTES) + "\n"
        contents.append((paths[0], secret.encode("ascii"), 0o600))
        fingerprint: str | None = None
        if ca is not None:
            client_key = ec.generate_private_key(ec.SECP256R1())
            cert = _make_client(client_key, spec.address, ca[0], ca[1], not_before, not_after)
            contents.append((paths[1], _pem_cert(cert), 0o644))
            contents.append((paths[2], _pem_key(client_key), 0o600))
            fingerprint = cert_fingerprint(cert)
        results.append(
            GatewayCredentials(
                address=str(spec.address),
                networks=tuple(str(n) for n in spec.networks),
                key_file=paths[0],
                client_cert_file=paths[1] if ca is not None else None,
                client_key_file=paths[2] if ca is not None else None,
                cert_fingerprint=fingerprint,
                not_after=not_after if ca is not None else None,
            )
        )

    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, data, mode in contents:
        _write(path, data, mode, force)
    return tuple(results)


def router_gateways_table(creds: Sequence[GatewayCredentials]) -> dict[str, dict[str, object]]:
    """The router config's ``gateways`` object for ``creds``, with absolute paths."""
    return {c.address: c.router_entry() for c in creds}


def render_gateways_report(out_dir: Path, creds: Sequence[GatewayCredentials]) -> str:
    """Files written plus the router ``gateways`` table and each gateway's config lines."""

    def q(p: Path) -> str:
        return json.dumps(str(p.resolve()))

    def mode_of(p: Path) -> str:
        return "0644" if p.suffix == ".crt" else "0600"

    lines = ["wrote:"]
    for c in creds:
        lines += [f"  {p}  ({mode_of(p)})" for p in c.files]
    with_certs = [c for c in creds if c.cert_fingerprint is not None]
    if with_certs:
        lines.append("")
        for c in with_certs:
            assert c.not_after is not None
            lines.append(
                f"gateway {c.address} client certificate SHA-256 (cert_fingerprint): "
                f"{c.cert_fingerprint}, valid until {c.not_after.isoformat()}"
            )
    table = json.dumps(router_gateways_table(creds), indent=2).replace("\n", "\n  ")
    lines += [
        "",
        'router config (/etc/polevpn/config.json; merge into an existing "gateways" object):',
    ]
    if with_certs:
        lines.append(f'  "client_ca_file": {q(Path(out_dir) / CA_CERT)},')
    lines.append(f'  "gateways": {table}')
    lines.append("  (networks must cover the gateway's local_networks and its gateway6 as a /128)")
    for c in creds:
        lines += [
            "",
            # ca_file/server_name/cert_pin verify the router and do not change per gateway
            f"gateway {c.address} config (sets its gateway and key_file; keep ca_file or "
            f"cert_pin; copy {', '.join(p.name for p in c.files)} to the office host; "
            "adjust paths):",
            f'  "gateway": "{c.address}",',
        ]
        if c.client_cert_file is not None and c.client_key_file is not None:
            lines += [
                f'  "key_file": {q(c.key_file)},',
                f'  "client_cert_file": {q(c.client_cert_file)},',
                f'  "client_key_file": {q(c.client_key_file)}',
            ]
        else:
            lines.append(f'  "key_file": {q(c.key_file)}')
    return "\n".join(lines) + "\n"


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
        description="Write a private CA, an RSA router certificate and a shared key; "
        "optionally per-gateway secrets and client certificates. If DIR already holds ca.crt, "
        "--gateway issues only the gateway files, signed by that CA.",
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
        help=f"validity of the certificates issued (default {DEFAULT_DAYS})",
    )
    parser.add_argument(
        "--gateway",
        action="append",
        default=[],
        metavar="ADDR=NET[,NET...]",
        help="issue gw-ADDR.key for the gateway with IPv4 address ADDR, allowed to announce "
        "the NETs (repeatable), e.g. 169.254.0.1=198.18.10.0/24,2001:db8:ff::1/128",
    )
    parser.add_argument(
        "--client-certs",
        action="store_true",
        help="also issue each gateway a client certificate gw-ADDR.crt and key gw-ADDR.pem",
    )
    parser.add_argument("--force", action="store_true", help="replace existing files")
    return parser


def run(args: argparse.Namespace) -> str:
    """Do what the command line asks and return the report to print."""
    if args.client_certs and not args.gateway:
        raise KeygenError("--client-certs needs at least one --gateway")
    specs = parse_gateway_specs(args.gateway)
    out_dir: Path = args.out
    if specs and not args.force and (out_dir / CA_CERT).exists():
        # adding gateways to an existing setup: the CA, router certificate and shared key stay
        if args.san:
            raise KeygenError(
                f"--san only applies when the router certificate is made, and {out_dir / CA_CERT}"
                " exists (use --force to regenerate everything)"
            )
        creds = issue_gateways(out_dir, specs, args.client_certs, args.days, force=False)
        return render_gateways_report(out_dir, creds)
    if specs and not args.force:
        # checked before generate() writes, so a clash leaves the directory untouched
        _check_out_dir(out_dir)
        _refuse_existing(
            p for spec in specs for p in gateway_paths(out_dir, spec, args.client_certs)
        )
    report = render_report(generate(out_dir, args.san, args.days, args.force))
    if specs:
        creds = issue_gateways(out_dir, specs, args.client_certs, args.days, args.force)
        report += "\n" + render_gateways_report(out_dir, creds)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        report = run(args)
    except KeygenError as exc:
        print(f"polevpn-keygen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"polevpn-keygen: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TLS contexts for both ends, and the gateway's certificate-pin check."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from .config import GatewayConfig, RouteServer


def server_context(
    cert_file: Path, key_file: Path, client_ca: Path | None = None
) -> ssl.SSLContext:
    """``client_ca``: ask for a client certificate signed by it; none at all is accepted
    (PoleVPN gateways have none), one that does not verify fails the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    # the Go gateway sends a fixed SNI; nothing here may depend on it
    return ctx


def client_context(cfg: GatewayConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.client_cert_file is not None and cfg.client_key_file is not None:
        ctx.load_cert_chain(cfg.client_cert_file, cfg.client_key_file)
    if cfg.ca_file is not None:
        ctx.load_verify_locations(cafile=str(cfg.ca_file))
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        # with a pin (or insecure_skip_verify) the chain is not checked here; a pin is
        # compared after the handshake by pin_matches()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_hostname(cfg: GatewayConfig, server: RouteServer | None = None) -> str:
    return cfg.server_name or (server or cfg.route_server).host


def hostname_matches(cert: x509.Certificate, name: str) -> bool:
    """RFC 6125 matching as the ssl module does it, for the DTLS path where pyOpenSSL
    checks only the chain: IP literals against IP SANs, names against DNS SANs with a
    wildcard allowed only as the whole left-most label; the CN only when there are no SANs."""
    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        ip = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if ip is not None:
        return san is not None and ip in san.get_values_for_type(x509.IPAddress)
    if san is not None:
        candidates = san.get_values_for_type(x509.DNSName)
    else:
        candidates = [
            str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    want = name.rstrip(".").lower()
    return any(_dns_match(c.rstrip(".").lower(), want) for c in candidates)


def _dns_match(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    head, _, rest = name.partition(".")
    return bool(head) and rest == pattern[2:] and "." in rest


def cert_fingerprint(der_cert: bytes | None) -> bytes | None:
    return hashlib.sha256(der_cert).digest() if der_cert else None


def pin_matches(der_cert: bytes | None, pin: bytes) -> bool:
    if not der_cert:
        return False
    return hmac.compare_digest(hashlib.sha256(der_cert).digest(), pin)

"""Certificate checks shared by tls:// and kcp:// (DTLS), no I/O: host-name matching as
RFC 6125 and the ssl module do it, and SHA-256 certificate pins."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from cryptography import x509
from cryptography.x509.oid import NameOID


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

"""TLS contexts for both ends, and the gateway's certificate-pin check."""

from __future__ import annotations

import hashlib
import hmac
import ssl
from pathlib import Path

from .config import GatewayConfig


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    # the Go gateway sends a fixed SNI; nothing here may depend on it
    return ctx


def client_context(cfg: GatewayConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
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


def server_hostname(cfg: GatewayConfig) -> str:
    return cfg.server_name or cfg.route_server.host


def pin_matches(der_cert: bytes | None, pin: bytes) -> bool:
    if not der_cert:
        return False
    return hmac.compare_digest(hashlib.sha256(der_cert).digest(), pin)

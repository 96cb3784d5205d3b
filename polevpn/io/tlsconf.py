"""TLS contexts for both ends, and the gateway's certificate-pin check."""

from __future__ import annotations

import ssl
from pathlib import Path

from polevpn.config import GatewayConfig, RouteServer


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

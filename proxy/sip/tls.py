"""TLS for the SIP listener: the server context, with optional client certificates
(mutual TLS for PBXs), and the bounds of a handshake and of a close."""

from __future__ import annotations

import ssl
from pathlib import Path

TLS_HANDSHAKE_TIMEOUT = 10.0  # a handshake is not yet a counted connection: keep it short
TLS_SHUTDOWN_TIMEOUT = 5.0


def server_tls_context(
    cert: Path, key: Path | None = None, client_ca: Path | None = None
) -> ssl.SSLContext:
    """The TLS listener's context. With `client_ca`, a client certificate is asked for
    but optional (phones have none): one that is sent must chain to `client_ca`, and
    only to it (no system CAs), or the handshake fails."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context

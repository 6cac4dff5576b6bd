"""Pointing the real push clients at endpoints of our choosing (the local stand-ins).

This is the one place that touches the libraries' internals, because neither offers an
endpoint option: aioapns takes its host and port from its protocol class, and
firebase-admin builds its FCM URL from a class constant. Pinned versions (pyproject)
keep these seams stable; tests through the real clients catch a change.
"""

from __future__ import annotations

import ssl
from typing import Any, TypeVar, cast
from urllib.parse import quote

from aioapns.connection import (
    APNsDevelopmentClientProtocol,
    APNsProductionClientProtocol,
    APNsTLSClientProtocol,
)
from firebase_admin import messaging  # type: ignore[import-untyped]  # ships no types

from push.apps import ApnsEndpoint, FcmEndpoint

# --- FCM (firebase-admin 7.7.0) ------------------------------------------------------


def install_fcm_client(app: Any, client: Any, endpoint: FcmEndpoint | None) -> Any:
    """Make the messaging service of firebase_admin `app` send through `client` (an
    `HttpxAsyncClient`) to `endpoint`, or to Google when it is None. Returns the client
    it replaced, for the caller to `aclose()` (it never sent anything).

    `_MessagingService.__init__` formats the class constant `FCM_URL` with the project id
    into the instance's `_fcm_url`, and builds its own `_async_client` with the library's
    defaults (120 s timeout, four retries of 500/503 with backoff); neither is an option.
    Both are replaced on this app's instance, never on the class, so other apps in the
    process (one talking to Google next to one talking to the stand-in) are untouched.
    `send_each_async(..., app=app)` then finds this same cached instance.
    """
    service = messaging._get_messaging_service(app)  # created on first use, cached per app
    replaced = service._async_client
    service._async_client = client
    if endpoint is not None:
        project = quote(str(service._project_id), safe="")
        service._fcm_url = f"{endpoint.base_url.rstrip('/')}/v1/projects/{project}/messages:send"
    return replaced


# --- APNs (aioapns 4.0) --------------------------------------------------------------

_Protocol = TypeVar("_Protocol", bound=APNsTLSClientProtocol)


def apns_protocol_for(
    base: type[_Protocol], endpoint: ApnsEndpoint | None, *, sandbox: bool
) -> type[_Protocol]:
    """A subclass of `base` that connects to `endpoint`, or to Apple's production or
    sandbox host when it is None; assign it to an `aioapns.APNs` client's
    `pool.protocol_class` before the first send.

    aioapns has no host or port option: its pool dials `protocol_class.APNS_SERVER` and
    `APNS_PORT` (also sending APNS_SERVER as the `host` header), and picks the class from
    `use_sandbox` when the client is built. A subclass per client keeps the change to that
    client, never to aioapns's own classes.
    """
    if endpoint is None:
        apple = APNsDevelopmentClientProtocol if sandbox else APNsProductionClientProtocol
        host, port = apple.APNS_SERVER, apple.APNS_PORT
    else:
        host, port = endpoint.host, endpoint.port
    name = f"{base.__name__}{'Sandbox' if sandbox else 'Production'}"
    return cast(type[_Protocol], type(name, (base,), {"APNS_SERVER": host, "APNS_PORT": port}))


def apns_ssl_context(endpoint: ApnsEndpoint | None) -> ssl.SSLContext:
    """A new TLS context for one aioapns client: Apple's default trust, or the trust
    (CA certificates, verification, hostname checking) and TLS versions of
    `endpoint.ssl_context`.

    Never hand aioapns a shared context: for certificate auth it loads the app's client
    certificate into the context it is given (`load_cert_chain`), so a shared one would
    present the last app's certificate on every client's connections.
    """
    if endpoint is None:
        return ssl.create_default_context()
    shared = endpoint.ssl_context
    # Certificates loaded from a capath are not listed: give the endpoint a cafile/cadata.
    ca = b"".join(shared.get_ca_certs(binary_form=True))
    context = ssl.create_default_context(cadata=ca) if ca else ssl.create_default_context()
    context.check_hostname = shared.check_hostname
    context.verify_mode = shared.verify_mode
    context.minimum_version = shared.minimum_version
    context.maximum_version = shared.maximum_version
    return context

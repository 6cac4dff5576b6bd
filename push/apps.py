"""The apps softrelay pushes for, with their credentials, and where their pushes go.

Parsed once from the configuration (`[[push.app]]`), or made up by the embedded mode
for the local stand-ins. A binding's app id selects the app; its `pn-provider` selects
APNs (production or sandbox) or FCM.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ApnsCredentials:
    topic: str  # the bundle id; VoIP pushes go to "<topic>.voip"
    # Token auth (the .p8 key Apple issues), or certificate auth: one of the two.
    team_id: str = ""
    key_id: str = ""
    key_pem: str = field(default="", repr=False)
    cert_file: str = ""  # PEM holding the client certificate and its key

    @property
    def token_auth(self) -> bool:
        return bool(self.key_pem)


@dataclass(frozen=True, slots=True)
class FcmCredentials:
    project_id: str
    service_account: dict[str, Any] = field(repr=False)  # the JSON Google issues


@dataclass(frozen=True, slots=True)
class AppCredentials:
    app_id: str
    apns: ApnsCredentials | None = None
    fcm: FcmCredentials | None = None


@dataclass(frozen=True, slots=True)
class ApnsEndpoint:
    """Where APNs requests go instead of Apple (the stand-in); None means Apple."""

    host: str
    port: int
    ssl_context: ssl.SSLContext  # trusts the stand-in's throwaway CA


@dataclass(frozen=True, slots=True)
class FcmEndpoint:
    """Where FCM v1 requests go instead of Google (the stand-in); None means Google."""

    base_url: str  # e.g. http://127.0.0.1:PORT ; /v1/projects/<id>/messages:send is appended

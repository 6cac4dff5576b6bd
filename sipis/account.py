"""What a SIPIS account is, as the registrar engine and the accounts API share it.

An app stores its SIP account with softrelay (`api.py`, kept by `accounts.py` in the
policy's `sip_account` category); `registrar.py` keeps it registered at the provider.
The credential is an HA1, never the password: MD5(user:realm:password) and, for
providers that challenge with RFC 8760's SHA-256, SHA-256(user:realm:password), each
as lower-case hex. Either may be missing; a challenge in an algorithm we hold no HA1
for is a failure with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class SipTransport(StrEnum):
    """How softrelay reaches the provider's registrar and proxy."""

    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"


@dataclass(frozen=True, slots=True)
class Credential:
    """Digest credentials as HA1s (hex, lower case)."""

    auth_user: str  # the digest `username` (often the SIP user)
    realm: str  # the realm the HA1s were computed for
    ha1_md5: str | None = None
    ha1_sha256: str | None = None

    def ha1(self, algorithm: str) -> str | None:
        """The HA1 for a challenge's algorithm (absent: MD5), or None if not held."""
        name = algorithm.upper() or "MD5"
        if name == "MD5":
            return self.ha1_md5
        if name == "SHA-256":
            return self.ha1_sha256
        return None


@dataclass(frozen=True, slots=True)
class Push:
    """Where to wake the app: as the relay's wake takes it (pn-provider, pn-prid,
    pn-param of RFC 8599).

    `token` takes the incoming-call pushes (APNs: the PushKit VoIP token; FCM: the one
    token); "" once the push service declared it dead: it is cleared in the store, as
    the relay clears a binding's, and nothing is pushed to the app until it sends a
    new one. `alert_token` (APNs only) takes the "new message" alert push, which APNs
    does not deliver to a VoIP token; without it an iPhone app gets no push for a text
    (the text still waits for its next connection)."""

    provider: str  # "apns" | "fcm"
    token: str
    app_id: str
    alert_token: str | None = None

    @property
    def live(self) -> bool:
        """Whether a call push can go out (the token was not declared dead)."""
        return bool(self.token)

    @property
    def text_token(self) -> str | None:
        """Where a "new message" push goes: APNs the alert token, FCM the one token;
        None: no push for a text."""
        token = self.alert_token if self.provider == "apns" else self.token
        return token or None


@dataclass(frozen=True, slots=True)
class Account:
    """One app's SIP account at one provider."""

    account_id: str  # random, public: the handle in URLs and in the Contact we register
    registrar_host: str  # the provider's registrar and outbound proxy: host
    registrar_port: int  # its port (5060, or 5061 for TLS, when not given)
    transport: SipTransport
    domain: str  # the address-of-record domain: sip:<user>@<domain>
    user: str  # the SIP user of the address of record
    credential: Credential
    push: Push
    display_name: str | None = None
    paused: bool = False

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@{self.domain}"


class State(StrEnum):
    """An account's registration, as the app and /metrics see it."""

    PENDING = "pending"  # waiting for its turn (start spread, registrar rate)
    REGISTERED = "registered"
    FAILING = "failing"  # with a reason; retried after a capped backoff
    PAUSED = "paused"  # un-REGISTERed on the app's request


@dataclass(frozen=True, slots=True)
class Status:
    state: State
    reason: str = ""  # for FAILING: e.g. "403 Forbidden", "timeout", "no HA1 for SHA-256"
    expires_at: float | None = None  # REGISTERED: when the provider's binding lapses
    retry_at: float | None = None  # FAILING / PENDING: the next attempt

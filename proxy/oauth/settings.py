"""The `[oauth]` section: the providers whose client secret the relay adds, and limits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from yarl import URL

from tomlsections.reader import Section
from webapi.ratelimit import RateLimit, parse_rate

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class ClientAuth(StrEnum):
    """How the client authenticates at the token endpoint (RFC 6749 2.3.1)."""

    POST = "post"  # client_id and client_secret in the form body (Google's default)
    BASIC = "basic"  # HTTP Basic with the url-encoded id and secret


@dataclass(frozen=True, slots=True)
class OAuthProvider:
    name: str  # the <provider> of POST /oauth/<provider>/token
    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    auth: ClientAuth = ClientAuth.POST


@dataclass(frozen=True, slots=True)
class OAuthSettings:
    providers: tuple[OAuthProvider, ...] = ()
    # With no provider configured, `serve` runs a stand-in token endpoint by this name.
    embedded_provider: str = "google"
    timeout: float = 10  # seconds for the upstream's whole answer
    max_body: int = 16 * 1024  # an app's token request
    max_response_body: int = 64 * 1024  # the upstream's answer
    rate: RateLimit = field(default_factory=lambda: RateLimit(per_minute=30, burst=10))

    @property
    def embedded(self) -> bool:
        return not self.providers


def parse_oauth(sec: Section) -> OAuthSettings:
    d = OAuthSettings()
    providers = tuple(_parse_provider(p) for p in sec.sections("provider"))
    names = [p.name for p in providers]
    for name in names:
        if names.count(name) > 1:
            raise sec.error("provider", f"provider {name!r} is configured twice")
    embedded = sec.text("embedded_provider", d.embedded_provider)
    if not _NAME.match(embedded):
        raise sec.error("embedded_provider", "lower-case letters, digits and dashes only")
    timeout = sec.duration("timeout", "10s")
    if timeout < 1:
        raise sec.error("timeout", "must be at least 1s")
    settings = OAuthSettings(
        providers=providers,
        embedded_provider=embedded,
        timeout=timeout,
        max_body=sec.integer("max_body", d.max_body, minimum=256),
        max_response_body=sec.integer("max_response_body", d.max_response_body, minimum=256),
        rate=parse_rate(sec, d.rate),
    )
    sec.finish()
    return settings


def _parse_provider(sec: Section) -> OAuthProvider:
    name = sec.text("name")
    if not _NAME.match(name):
        raise sec.error("name", "lower-case letters, digits and dashes only")
    token_url = sec.text("token_url")
    try:
        url = URL(token_url)
    except ValueError:
        raise sec.error("token_url", f"not a URL: {token_url!r}") from None
    if url.scheme != "https" and not (url.scheme == "http" and url.host in _LOOPBACK):
        raise sec.error("token_url", "must be https (http only on loopback, for tests)")
    client_id = sec.text("client_id")
    if not client_id:
        raise sec.error("client_id", "is empty")
    secret = sec.secret("client_secret")
    auth = ClientAuth(sec.choice("auth_method", tuple(ClientAuth), ClientAuth.POST.value))
    sec.finish()
    return OAuthProvider(name, token_url, client_id, secret, auth)

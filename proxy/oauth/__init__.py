"""The OAuth-secret proxy: the app's token exchange gets the operator's client secret.

    add_oauth(app, settings, clock, limiters)

adds `POST /oauth/<provider>/token` and a cleanup context that owns the HTTP client
and, with no provider configured, the in-process stand-in token endpoint
(`standin.py`). The pieces: `relay.py` (the route), `settings.py` (`[oauth]`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from privacy.clock import Clock
from proxy.oauth.relay import GRANTS, ROUTE, OAuthRelay
from proxy.oauth.settings import OAuthProvider, OAuthSettings
from proxy.oauth.standin import OAuthStandIn
from webapi.errors import OAuthRefusal, speaks
from webapi.openapi import OPENAPI, RETRY_AFTER, OpenApi, json_response
from webapi.ratelimit import Limiters

OAUTH = web.AppKey("oauth", OAuthRelay)
OAUTH_STAND_IN = web.AppKey("oauth_stand_in", OAuthStandIn)


def add_oauth(
    app: web.Application, settings: OAuthSettings, clock: Clock, limiters: Limiters
) -> None:
    limiter = limiters("oauth", settings.rate)

    async def context(app: web.Application) -> AsyncIterator[None]:
        providers: tuple[OAuthProvider, ...] = settings.providers
        stand_in: OAuthStandIn | None = None
        if settings.embedded:
            stand_in = await OAuthStandIn.start(settings.embedded_provider)
            app[OAUTH_STAND_IN] = stand_in
            providers = (stand_in.provider,)
        try:
            # No cookie jar and no environment proxies: nothing of one app's exchange
            # may ride along with another's.
            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
                app[OAUTH] = OAuthRelay(settings, providers, limiter, session)
                yield
        finally:
            if stand_in is not None:
                await stand_in.stop()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[OAUTH].handle(request)

    app.cleanup_ctx.append(context)
    # OAuth clients read RFC 6749's error shape: every refusal under /oauth/ in it, the
    # middleware's own (a wrong method, a header that is not UTF-8) included.
    speaks(app, "/oauth/", OAuthRefusal)
    app.router.add_post(ROUTE, handle)
    if OPENAPI in app:  # build_app's registry; a test's bare app has none
        names = [p.name for p in settings.providers] or [settings.embedded_provider]
        _describe(app[OPENAPI], names)


def _describe(openapi: OpenApi, providers: list[str]) -> None:
    error = openapi.schema(
        "OAuthError",
        {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string"},
                "error_description": {"type": "string"},
            },
        },
    )
    tokens = openapi.schema(
        "OAuthTokens",
        {
            "type": "object",
            "required": ["access_token", "token_type"],
            "properties": {
                "access_token": {"type": "string"},
                "token_type": {"type": "string"},
                "expires_in": {"type": "integer"},
                "refresh_token": {"type": "string"},
                "scope": {"type": "string"},
            },
        },
    )
    text = {"type": "string", "maxLength": 2048}
    openapi.operation(
        ROUTE,
        "post",
        {
            "summary": "Token exchange (RFC 6749 4.1.3, 6); the relay adds the client secret",
            "parameters": [
                {
                    "name": "provider",
                    "in": "path",
                    "required": True,
                    "schema": {"enum": providers},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "required": ["grant_type"],
                            "properties": {
                                "grant_type": {"enum": list(GRANTS)},
                                "code": text,
                                "refresh_token": text,
                                "redirect_uri": text,
                                "code_verifier": text,
                                "client_id": {**text, "description": "replaced by the relay's"},
                            },
                        }
                    }
                },
            },
            # The provider's answer passes through: its tokens, or its RFC 6749 5.2 error.
            "responses": {
                "200": json_response("The provider's tokens", tokens),
                "400": json_response("The request, or the provider, refused the grant", error),
                "401": json_response("The provider refused the client", error),
                "404": json_response("No provider by this name", error),
                "413": json_response("The request body is over the limit", error),
                "429": json_response("slow_down", error) | {"headers": RETRY_AFTER},
                "502": json_response("The provider cannot be reached, or answered too much", error),
                "504": json_response("The provider did not answer in time", error),
            },
        },
    )


def stand_in_notice(app: web.Application) -> str | None:
    """What `serve` prints when the stand-in answers instead of a real provider."""
    stand_in = app.get(OAUTH_STAND_IN)
    if stand_in is None:
        return None
    name = stand_in.provider.name
    return (
        f"softrelay: OAuth stand-in in-process (no [[oauth.provider]] configured): "
        f"/oauth/{name}/token -> {stand_in.provider.token_url}"
    )


__all__ = ["OAUTH", "OAUTH_STAND_IN", "OAuthSettings", "add_oauth", "stand_in_notice"]

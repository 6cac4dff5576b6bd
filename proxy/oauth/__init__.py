"""The OAuth-secret proxy: the app's token exchange gets the operator's client secret.

    add_oauth(app, settings, clock)

adds `POST /oauth/<provider>/token` and a cleanup context that owns the HTTP client
and, with no provider configured, the in-process stand-in token endpoint
(`standin.py`). The pieces: `relay.py` (the route), `settings.py` (`[oauth]`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from privacy.clock import Clock
from proxy.oauth.relay import ROUTE, OAuthRelay
from proxy.oauth.settings import OAuthProvider, OAuthSettings
from proxy.oauth.standin import OAuthStandIn
from proxy.ratelimit import RateLimiter

OAUTH = web.AppKey("oauth", OAuthRelay)
OAUTH_STAND_IN = web.AppKey("oauth_stand_in", OAuthStandIn)


def add_oauth(app: web.Application, settings: OAuthSettings, clock: Clock) -> None:
    limiter = RateLimiter(settings.rate, clock)

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
    app.router.add_post(ROUTE, handle)


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

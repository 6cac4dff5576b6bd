"""The OAuth-secret proxy: `POST /oauth/<provider>/token`.

An app's token exchange (RFC 6749: grant_type authorization_code with its code, or
refresh_token) arrives without a client secret; the relay puts the configured client
id and secret in (replacing any the app sent), posts it to the provider's token
endpoint and returns the provider's status and body unchanged, so the secret never
ships inside the app. Nothing of the request or the answer is kept: the only trace is
a `troubleshooting_log` line with the client's IP, user agent, route and status.

Refusals the relay makes itself are `OAuthRefusal`s (webapi/errors.py): the RFC 6749
5.2 error shape `{"error", "error_description"}`, which OAuth clients already
understand, with Cache-Control: no-store.
"""

from __future__ import annotations

import base64
import logging
from urllib.parse import parse_qsl, quote, urlencode

import aiohttp
from aiohttp import web

from cluster.redis import ClusterUnavailable
from privacy.logs import category_logger
from proxy.oauth.settings import ClientAuth, OAuthProvider, OAuthSettings
from webapi.body import BodyTooLarge, read_capped
from webapi.errors import OAuthRefusal, Refusal
from webapi.ratelimit import Limiter

ROUTE = "/oauth/{provider}/token"
GRANTS = {"authorization_code": "code", "refresh_token": "refresh_token"}
# Copied from the upstream's answer; RFC 6749 5.1 asks for no-store on token answers.
_ANSWER_HEADERS = ("Content-Type", "Cache-Control", "Pragma", "WWW-Authenticate")
_FORM = "application/x-www-form-urlencoded"
trouble = category_logger("troubleshooting_log")
log = logging.getLogger("softrelay.oauth")


class OAuthRelay:
    def __init__(
        self,
        settings: OAuthSettings,
        providers: tuple[OAuthProvider, ...],
        limiter: Limiter,
        session: aiohttp.ClientSession,
    ) -> None:
        self._settings = settings
        self._providers = {p.name: p for p in providers}
        self._limiter = limiter
        self._session = session

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["provider"]
        provider = self._providers.get(name)
        status = 500  # what the middleware answers for an exception not foreseen
        try:
            response = await self._exchange(request, provider)
        except Refusal as refused:
            status = refused.status
            raise
        except ClusterUnavailable:
            status = 503  # the middleware's cluster_unavailable: the shared limit is out
            raise
        else:
            status = response.status
            return response
        finally:
            trouble.info(
                "oauth.token",
                extra={
                    "fields": {
                        "ip": request.remote or "",
                        "user_agent": request.headers.get("User-Agent", ""),
                        # Only a configured name: anything else is what the client typed.
                        "route": f"/oauth/{name if provider else '<unknown>'}/token",
                        "status": status,
                    }
                },
            )

    async def _exchange(self, request: web.Request, provider: OAuthProvider | None) -> web.Response:
        wait = await self._limiter.check(request.remote)
        if wait:
            raise OAuthRefusal(
                429, "slow_down", "too many token requests from this address", retry_after=wait
            )
        if provider is None:
            raise OAuthRefusal(404, "invalid_request", "no OAuth provider by this name is served")
        params = await self._form(request)
        grant = params.get("grant_type", "")
        if grant not in GRANTS:
            raise OAuthRefusal(
                400,
                "unsupported_grant_type",
                "grant_type must be authorization_code or refresh_token",
            )
        if not params.get(GRANTS[grant]):
            raise OAuthRefusal(400, "invalid_request", f"{GRANTS[grant]} is missing")
        return await self._forward(provider, params)

    async def _form(self, request: web.Request) -> dict[str, str]:
        if request.content_type != _FORM:
            raise OAuthRefusal(400, "invalid_request", f"the body must be {_FORM} (RFC 6749 4.1.3)")
        limit = self._settings.max_body
        try:
            raw = await read_capped(request.content, limit, request.content_length)
        except BodyTooLarge:
            raise OAuthRefusal(
                413, "invalid_request", "the request body is over the limit"
            ) from None
        try:
            pairs = parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=bool(raw))
        except (UnicodeDecodeError, ValueError):
            raise OAuthRefusal(400, "invalid_request", "the body is not a form") from None
        params: dict[str, str] = {}
        for key, value in pairs:
            if key in params:  # RFC 6749 3.2: no parameter more than once
                raise OAuthRefusal(400, "invalid_request", f"parameter {key} is repeated")
            params[key] = value
        return params

    async def _forward(self, provider: OAuthProvider, params: dict[str, str]) -> web.Response:
        form = {k: v for k, v in params.items() if k not in ("client_id", "client_secret")}
        headers = {"Content-Type": _FORM, "Accept": "application/json"}
        if provider.auth is ClientAuth.BASIC:
            pair = f"{quote(provider.client_id, safe='')}:{quote(provider.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = provider.client_id
            form["client_secret"] = provider.client_secret
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout)
        try:
            async with self._session.post(
                provider.token_url,
                data=urlencode(form).encode(),
                headers=headers,
                allow_redirects=False,
                timeout=timeout,
            ) as upstream:
                body = await _bounded(upstream, self._settings.max_response_body)
                copied = {h: upstream.headers[h] for h in _ANSWER_HEADERS if h in upstream.headers}
                return web.Response(status=upstream.status, body=body, headers=copied)
        except TimeoutError:
            log.warning("oauth.upstream_timeout", extra={"fields": {"error": "timeout"}})
            raise OAuthRefusal(
                504, "temporarily_unavailable", "the provider did not answer in time"
            ) from None
        except aiohttp.ClientError as exc:
            log.warning("oauth.upstream_failed", extra={"fields": {"error": type(exc).__name__}})
            raise OAuthRefusal(
                502, "temporarily_unavailable", "the provider cannot be reached"
            ) from None


async def _bounded(upstream: aiohttp.ClientResponse, limit: int) -> bytes:
    try:
        return await read_capped(upstream.content, limit, upstream.content_length)
    except BodyTooLarge:
        raise OAuthRefusal(
            502, "temporarily_unavailable", "the provider's answer is over the limit"
        ) from None

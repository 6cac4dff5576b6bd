"""A stand-in OAuth token endpoint (RFC 6749 section 3.2), for tests and `make run`.

With no `[[oauth.provider]]` configured, `serve` starts one in-process on loopback
with a throwaway client id and secret, as `push/embedded.py` does for push. It checks
what a provider checks: the client's id and secret (in the form or by HTTP Basic),
the grant type and its parameter, and that a refresh token is one it issued. Any
authorization code is accepted, except codes scripted to fail:

    stand_in.script[code] = (400, {"error": "invalid_grant"})

`received` keeps the last forms it was sent, in this process's memory only, so a test
can see that the relay added the secret.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections import deque
from typing import Any
from urllib.parse import parse_qsl, unquote

from aiohttp import web

from proxy.oauth.settings import ClientAuth, OAuthProvider

TOKEN_PATH = "/token"  # noqa: S105 (a URL path, not a password)
_MAX_REFRESH_TOKENS = 10_000


class OAuthStandIn:
    def __init__(self, auth: ClientAuth) -> None:
        self._auth = auth
        self.app = web.Application(client_max_size=64 * 1024)
        self.app.router.add_post(TOKEN_PATH, self._token)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.provider = OAuthProvider("", "", "", "", auth)  # set by start()
        self.script: dict[str, tuple[int, dict[str, Any]]] = {}
        self.received: deque[dict[str, str]] = deque(maxlen=100)
        self.authorizations: deque[str] = deque(maxlen=100)
        self._refresh_tokens: dict[str, None] = {}

    @classmethod
    async def start(
        cls, name: str, *, auth: ClientAuth = ClientAuth.POST, host: str = "127.0.0.1"
    ) -> OAuthStandIn:
        stand_in = cls(auth)
        await stand_in.runner.setup()
        try:
            await web.TCPSite(stand_in.runner, host, 0).start()
        except BaseException:
            await stand_in.runner.cleanup()
            raise
        port = stand_in.runner.addresses[0][1]
        stand_in.provider = OAuthProvider(
            name,
            f"http://{host}:{port}{TOKEN_PATH}",
            f"standin-{secrets.token_hex(4)}.apps.example.invalid",
            secrets.token_urlsafe(24),
            auth,
        )
        return stand_in

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        form = dict(parse_qsl((await request.read()).decode(errors="replace")))
        self.received.append(form)
        self.authorizations.append(request.headers.get("Authorization", ""))
        client_id, client_secret = _client_of(request, form)
        if (client_id, client_secret) != (self.provider.client_id, self.provider.client_secret):
            return _error(401, "invalid_client", "client authentication failed")
        grant = form.get("grant_type")
        if grant == "authorization_code":
            code = form.get("code", "")
            if not code:
                return _error(400, "invalid_request", "code is missing")
            if code in self.script:
                status, body = self.script[code]
                return web.json_response(body, status=status, headers=_NO_STORE)
            return self._issue(with_refresh=True)
        if grant == "refresh_token":
            token = form.get("refresh_token", "")
            if token in self.script:
                status, body = self.script[token]
                return web.json_response(body, status=status, headers=_NO_STORE)
            if token not in self._refresh_tokens:
                return _error(400, "invalid_grant", "unknown refresh token")
            return self._issue(with_refresh=False)
        return _error(400, "unsupported_grant_type", "grant type not supported")

    def _issue(self, *, with_refresh: bool) -> web.Response:
        body: dict[str, Any] = {
            "access_token": "ya29.standin-" + secrets.token_urlsafe(24),
            "token_type": "Bearer",
            "expires_in": 3599,
            "scope": "openid email",
        }
        if with_refresh:
            refresh = "1//standin-" + secrets.token_urlsafe(24)
            self._refresh_tokens[refresh] = None
            while len(self._refresh_tokens) > _MAX_REFRESH_TOKENS:
                del self._refresh_tokens[next(iter(self._refresh_tokens))]
            body["refresh_token"] = refresh
        return web.json_response(body, headers=_NO_STORE)


_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _client_of(request: web.Request, form: dict[str, str]) -> tuple[str, str]:
    header = request.headers.get("Authorization", "")
    if header.startswith("Basic "):
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return "", ""
        return unquote(user), unquote(password)
    return form.get("client_id", ""), form.get("client_secret", "")


def _error(status: int, error: str, description: str) -> web.Response:
    headers = dict(_NO_STORE)
    if error == "invalid_client":
        headers["WWW-Authenticate"] = 'Basic realm="stand-in"'
    body = {"error": error, "error_description": description}
    return web.json_response(body, status=status, headers=headers)

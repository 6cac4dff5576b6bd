"""`/sipis/v1/accounts`: an app stores its SIP account, reads its registration's status,
changes or pauses it, and deletes it.

    POST   /sipis/v1/accounts          -> 201 {"account_id", "device_secret", "status"}
    GET    /sipis/v1/accounts/{id}     -> 200 the account, without HA1s or push token
    PATCH  /sipis/v1/accounts/{id}     -> 200 the account ("device_secret" when renewed);
                                          204 when `"push": null` (push disabled: the
                                          account is deleted, as the policy says)
    DELETE /sipis/v1/accounts/{id}     -> 204, and the provider's binding is removed

The account's routes take `Authorization: Bearer <device secret>`, the secret the
POST answered with (sipis/accounts.py keeps only its keyed hash). The credential is an
HA1 (`ha1_md5`, `ha1_sha256`: lower-case hex of MD5 / SHA-256 of user:realm:password),
never the password: a body with a password field is refused, naming the field.

    {"registrar": "sip:sip.example.com;transport=tls", "user": "alice",
     "auth_user": "alice", "realm": "sip.example.com", "display_name": "Alice",
     "ha1_md5": "<32 hex>", "ha1_sha256": "<64 hex>",
     "push": {"provider": "apns", "token": "<VoIP token>", "app_id": "com.example.phone",
              "alert_token": "<ordinary token>"}}

An iPhone app gives two tokens: incoming calls go as PushKit VoIP pushes to `token`, a
waiting text as an alert push to `alert_token` (APNs delivers no alert to a VoIP
token); without `alert_token` its texts get no push and wait for its next connection.
An FCM token takes both. The answers show the push target without its tokens:
`"push": {"provider", "app_id", "state": "valid"|"invalid", "texts": "pushed"|"not_pushed"}`,
`invalid` once the push service declared the token dead (it is cleared; a PATCH with a
new `push` makes it valid again).

`registrar` is `sip:host[:port][;transport=udp|tcp|tls]` or `sips:host[:port]`; the
address of record's domain is `domain` when given, else the registrar's host.

Every refusal is a `Refusal` (webapi/errors.py), JSON `{"error", "detail"}`:

    400 malformed_body, unknown_field, missing_field, bad_field, password_refused,
        immutable_field                 (the detail names the field, never its value)
    401 unauthorized                    no, a wrong or a stale secret, and an unknown
                                        account alike (WWW-Authenticate: Bearer): an
                                        account's existence is not told
    413 body_too_large   415 unsupported_media_type
    429 rate_limited                    per client address (`[sipis] rate_per_minute`)
    503 storage_unavailable, cluster_unavailable (the middleware)
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from push.service import PushService
from push.wake import Service
from sipis.account import Account, Credential, Push, SipTransport, State, Status
from sipis.accounts import Accounts, Registrar
from sipis.settings import SipisSettings
from webapi.body import read_json
from webapi.errors import Refusal
from webapi.openapi import JSON, OPENAPI, RETRY_AFTER, OpenApi, json_response, refusal
from webapi.ratelimit import Limiter, Limiters

PREFIX = "/sipis/v1/accounts"
ACCOUNTS = web.AppKey("sipis_accounts", Accounts)
REGISTRAR = web.AppKey("sipis_registrar", Registrar)
PUSH_PROVIDERS = ("apns", "fcm")
_CREATE_KEYS = frozenset(
    {"registrar", "domain", "user", "auth_user", "realm", "display_name"}
    | {"ha1_md5", "ha1_sha256", "push"}
)
_PATCH_KEYS = frozenset(
    {"registrar", "auth_user", "realm", "display_name", "ha1_md5", "ha1_sha256", "push"}
    | {"paused", "new_secret"}
)
_NAMING_KEYS = frozenset({"user", "domain"})  # they name the account: a new one instead
_PUSH_KEYS = frozenset({"provider", "token", "app_id", "alert_token"})
_HA1 = {"ha1_md5": re.compile(r"^[0-9a-f]{32}$"), "ha1_sha256": re.compile(r"^[0-9a-f]{64}$")}
_USER = re.compile(r"^[A-Za-z0-9._~+-]{1,64}$")
# Inside a quoted digest parameter: printable ASCII but the quote and the backslash.
_QUOTABLE = re.compile(
    r"^[\x21\x23-\x5b\x5d-\x7e](?:[\x20\x21\x23-\x5b\x5d-\x7e]{0,126}[\x21\x23-\x5b\x5d-\x7e])?$"
)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
_REGISTRAR = re.compile(
    r"^(sips?):([^;:@\[\]]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?((?:;[^;]*)*)$"
)
_TOKEN = re.compile(r"^[A-Za-z0-9:_.\-]{1,4096}$")
_APP_ID = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
_DISPLAY_MAX = 64
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="sipis"'}


# A host name's addresses (the API's check; a test gives its own resolver).
Resolve = Callable[[str], Awaitable[list[str]]]
# Whether a push target names an app the server has credentials for (provider, app id).
KnownApp = Callable[[str, str], bool]
_RESOLVE_TIMEOUT = 5.0


async def resolve_host(host: str) -> list[str]:
    """The addresses `host` resolves to now; [] when it does not resolve (in time)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM), _RESOLVE_TIMEOUT
        )
    except (OSError, TimeoutError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


def internal_address(ip: str) -> bool:
    """Loopback, private, link-local, unspecified (or otherwise not globally routable:
    shared, reserved, multicast) - an address an app must not aim REGISTERs at."""
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


class SipisApi:
    """What the handlers share: the accounts, the registrar engine, the client limit,
    and the checks of what an app may name (registrar host, push app)."""

    def __init__(
        self,
        accounts: Accounts,
        registrar: Registrar,
        limiter: Limiter,
        *,
        allow_private: bool = False,
        resolve: Resolve = resolve_host,
        known_app: KnownApp | None = None,
    ) -> None:
        self.accounts = accounts
        self.registrar = registrar
        self.limiter = limiter
        self.allow_private = allow_private
        self.resolve = resolve
        self.known_app = known_app

    async def check_target(self, account: Account, body: dict[str, Any]) -> None:
        """Refuse a registrar on an internal address and a push app the server has no
        credentials for (400 naming the field); only what the body sets is checked."""
        if "registrar" in body and not self.allow_private:
            host = account.registrar_host.strip("[]")
            try:
                addresses = [host] if _is_ip(host) else await self.resolve(host)
                internal = any(internal_address(ip) for ip in addresses)
            except ValueError:
                internal = True  # an address we cannot read is not one we send to
            if internal:
                raise Refusal(
                    400,
                    "bad_field",
                    "field 'registrar': the host is (or resolves to) a loopback, private, "
                    "link-local or unspecified address, which this server does not register at",
                )
        if "push" in body and self.known_app is not None:
            push = account.push
            if not self.known_app(push.provider, push.app_id):
                raise Refusal(
                    400,
                    "bad_field",
                    "field 'push.app_id': not an app this server sends pushes for",
                )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def push_apps(push: PushService) -> KnownApp:
    """The check of a push target against the configured apps, as the relay checks a
    binding's pn-param (`PushService.app_for`)."""

    def known(provider: str, app_id: str) -> bool:
        try:
            service = Service(provider)
        except ValueError:
            return False
        return push.app_for(service, app_id) is not None

    return known


SIPIS_API = web.AppKey("sipis_api", SipisApi)


def add_sipis_api(
    app: web.Application,
    settings: SipisSettings,
    limiters: Limiters,
    *,
    push: web.AppKey[PushService] | None = None,
    resolve: Resolve = resolve_host,
) -> None:
    """The routes and their OpenAPI description. `ACCOUNTS` and `REGISTRAR` (and `push`,
    when given: the configured apps a push target must name) are set by cleanup
    contexts that come earlier (softrelay/app.py)."""
    limiter = limiters("sipis", settings.rate)

    async def context(app: web.Application) -> Any:
        app[SIPIS_API] = SipisApi(
            app[ACCOUNTS],
            app[REGISTRAR],
            limiter,
            allow_private=settings.allow_private_registrars,
            resolve=resolve,
            known_app=push_apps(app[push]) if push is not None else None,
        )
        yield

    app.cleanup_ctx.append(context)
    handlers = _Handlers(settings.max_body)
    app.router.add_post(PREFIX, handlers.create)
    app.router.add_get(PREFIX + "/{account_id}", handlers.read)
    app.router.add_patch(PREFIX + "/{account_id}", handlers.change)
    app.router.add_delete(PREFIX + "/{account_id}", handlers.delete)
    describe(app[OPENAPI])


class _Handlers:
    def __init__(self, max_body: int) -> None:
        self._max_body = max_body

    async def create(self, request: web.Request) -> web.Response:
        api = await _limited(request)
        body = await self._body(request, _CREATE_KEYS)
        draft = _new_account(body)
        await api.check_target(draft, body)
        account, secret = await api.accounts.create(draft)
        # At once (the app waits for it); held if its subject is restricted (Art. 18).
        await api.accounts.hold(api.registrar, account)
        answer = {
            "account_id": account.account_id,
            "device_secret": secret,
            "status": _status(api.registrar.status(account.account_id), account),
            "push": _push_view(account.push),
        }
        return web.json_response(answer, status=201, headers={"Cache-Control": "no-store"})

    async def read(self, request: web.Request) -> web.Response:
        api = await _limited(request)
        account = await _authenticated(request, api)
        return web.json_response(_view(api, account), headers={"Cache-Control": "no-store"})

    async def change(self, request: web.Request) -> web.Response:
        api = await _limited(request)
        account = await _authenticated(request, api)
        body = await self._body(request, _PATCH_KEYS)
        if "push" in body and body["push"] is None:
            # Push disabled: nothing could wake the app, so the account goes (the policy).
            await _delete(api, account.account_id)
            return web.Response(status=204)
        changed = _changed(account, body)
        await api.check_target(changed, body)
        if not await api.accounts.update(changed):
            raise _unauthorized()  # deleted meanwhile: as for any stale secret
        # New wire settings re-register; a pause is answered once the provider's binding
        # is gone, not merely scheduled; a resume registers unless the subject is
        # restricted (Art. 18: then nothing registers it until the mark is lifted).
        await api.accounts.hold(api.registrar, changed)
        answer = _view(api, changed)
        if body.get("new_secret") is True:
            secret = await api.accounts.new_secret(account.account_id)
            if secret is None:
                raise _unauthorized()
            answer["device_secret"] = secret
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    async def delete(self, request: web.Request) -> web.Response:
        api = await _limited(request)
        account = await _authenticated(request, api)
        await _delete(api, account.account_id)
        return web.Response(status=204)

    async def _body(self, request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise Refusal(415, "unsupported_media_type", "send Content-Type: application/json")
        body = await read_json(request, self._max_body)
        if not isinstance(body, dict):
            raise Refusal(400, "malformed_body", "the body must be a JSON object")
        for key in sorted(body):
            if "pass" in key.lower():
                raise Refusal(
                    400,
                    "password_refused",
                    f"{_name(key)}: send ha1_md5/ha1_sha256, not the password",
                )
        for key in sorted(body):
            if key in _NAMING_KEYS and key not in allowed:
                raise Refusal(
                    400,
                    "immutable_field",
                    f"{key}: names the account and cannot change; create a new account",
                )
            if key not in allowed:
                raise Refusal(400, "unknown_field", f"unknown field {_name(key)}")
        return body


async def _delete(api: SipisApi, account_id: str) -> None:
    # The store first: once it is gone no other process registers it again; then the
    # provider's binding (the registrar engine un-REGISTERs).
    await api.accounts.delete(account_id)
    await api.registrar.remove(account_id)


async def _limited(request: web.Request) -> SipisApi:
    api = request.app[SIPIS_API]
    wait = await api.limiter.check(request.remote)
    if wait:
        raise Refusal(429, "rate_limited", "too many requests from this address", retry_after=wait)
    return api


async def _authenticated(request: web.Request, api: SipisApi) -> Account:
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    account_id = request.match_info["account_id"]
    if scheme.lower() != "bearer" or not secret.strip():
        raise _unauthorized()
    account = await api.accounts.authenticate(account_id, secret.strip())
    if account is None:
        raise _unauthorized()
    return account


def _unauthorized() -> Refusal:
    return Refusal(
        401,
        "unauthorized",
        "unknown account or wrong device secret (Authorization: Bearer <device secret>)",
        _UNAUTHORIZED_HEADERS,
    )


def _name(key: str) -> str:
    """A field's name as a detail quotes it: bounded, whatever the client sent."""
    return repr(key[:40])


# --- parsing ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegistrarUri:
    host: str
    port: int
    transport: SipTransport


def parse_registrar(value: object) -> RegistrarUri:
    """`sip:host[:port][;transport=udp|tcp|tls]` or `sips:host[:port]`; ValueError with
    the reason otherwise."""
    if not isinstance(value, str) or len(value) > 300:
        raise ValueError("expected a SIP URI like 'sip:host[:port][;transport=udp|tcp|tls]'")
    match = _REGISTRAR.match(value)
    if match is None:
        raise ValueError("expected 'sip:host[:port][;transport=udp|tcp|tls]' or 'sips:host[:port]'")
    scheme, host, port_text, params = match.groups()
    host = _host(host)
    transport = SipTransport.TLS if scheme == "sips" else SipTransport.UDP
    for param in filter(None, params.split(";")):
        name, _, given = param.partition("=")
        if name.lower() != "transport":
            raise ValueError(f"unknown URI parameter {name[:20]!r} (only transport)")
        try:
            chosen = SipTransport(given.lower())
        except ValueError:
            raise ValueError("transport must be udp, tcp or tls") from None
        if scheme == "sips" and chosen is SipTransport.UDP:
            raise ValueError("sips: needs TLS, not transport=udp")
        transport = SipTransport.TLS if scheme == "sips" else chosen
    port = int(port_text) if port_text else (5061 if transport is SipTransport.TLS else 5060)
    if not 1 <= port <= 65535:
        raise ValueError("port must be between 1 and 65535")
    return RegistrarUri(host, port, transport)


def _host(text: str) -> str:
    if text.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(text[1:-1])}]"
        except ValueError:
            raise ValueError("not an IPv6 address in brackets") from None
    if len(text) > 253 or not _HOSTNAME.match(text):
        raise ValueError("the host is not a host name or an IPv4 address")
    return text.lower().rstrip(".")


def _new_account(body: dict[str, Any]) -> Account:
    for key in ("registrar", "user", "realm", "push"):
        if key not in body:
            raise Refusal(400, "missing_field", f"field {key!r} is missing")
    registrar = _field(body, "registrar", parse_registrar)
    user = _text(body, "user", _USER, "1-64 letters, digits or . _ ~ + -")
    domain = (
        _field(body, "domain", lambda v: _host(_str(v)))
        if body.get("domain") is not None
        else registrar.host.strip("[]")
    )
    auth_user = (
        _text(body, "auth_user", _QUOTABLE, '1-128 printable characters but " and \\')
        if body.get("auth_user") is not None
        else user
    )
    ha1 = _ha1s(body, required=True)
    return Account(
        account_id="",
        registrar_host=registrar.host,
        registrar_port=registrar.port,
        transport=registrar.transport,
        domain=domain,
        user=user,
        credential=Credential(auth_user, _realm(body), ha1["ha1_md5"], ha1["ha1_sha256"]),
        push=_push(body["push"]),
        display_name=_display_name(body),
    )


def _changed(account: Account, body: dict[str, Any]) -> Account:
    """The account with the PATCH's changes (validated)."""
    changed = account
    if "registrar" in body:
        registrar = _field(body, "registrar", parse_registrar)
        changed = replace(
            changed,
            registrar_host=registrar.host,
            registrar_port=registrar.port,
            transport=registrar.transport,
        )
    cred = changed.credential
    auth_user = cred.auth_user
    if "auth_user" in body:
        auth_user = _text(body, "auth_user", _QUOTABLE, '1-128 printable characters but " and \\')
    realm = _realm(body) if "realm" in body else cred.realm
    if any(k in body for k in _HA1):
        # A new credential: both HA1s replaced, so a stale one is never kept.
        ha1 = _ha1s(body, required=True)
        cred = Credential(auth_user, realm, ha1["ha1_md5"], ha1["ha1_sha256"])
    elif (auth_user, realm) != (cred.auth_user, cred.realm):
        raise Refusal(
            400,
            "missing_field",
            "ha1_md5/ha1_sha256: a new auth_user or realm needs the HA1s computed for it",
        )
    changed = replace(changed, credential=cred)
    if "push" in body:
        changed = replace(changed, push=_push(body["push"]))
    if "display_name" in body:
        changed = replace(changed, display_name=_display_name(body))
    if "paused" in body:
        if not isinstance(body["paused"], bool):
            raise Refusal(400, "bad_field", "field 'paused' must be true or false")
        changed = replace(changed, paused=body["paused"])
    if "new_secret" in body and not isinstance(body["new_secret"], bool):
        raise Refusal(400, "bad_field", "field 'new_secret' must be true or false")
    return changed


def _field(body: dict[str, Any], key: str, parse: Any) -> Any:
    try:
        return parse(body[key])
    except ValueError as exc:
        raise Refusal(400, "bad_field", f"field {key!r}: {exc}") from None


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")  # noqa: TRY004 - a bad field, answered 400
    return value


def _text(body: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not pattern.match(value):
        raise Refusal(400, "bad_field", f"field {key!r} must be {what}")
    return value


def _realm(body: dict[str, Any]) -> str:
    return _text(body, "realm", _QUOTABLE, '1-128 printable characters but " and \\')


def _ha1s(body: dict[str, Any], *, required: bool) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for key, pattern in _HA1.items():
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or not pattern.match(value)):
            digits = 32 if key == "ha1_md5" else 64
            raise Refusal(400, "bad_field", f"field {key!r} must be {digits} lower-case hex digits")
        found[key] = value
    if required and not any(found.values()):
        raise Refusal(400, "missing_field", "send ha1_md5 or ha1_sha256 (or both)")
    return found


def _push(value: object) -> Push:
    if not isinstance(value, dict):
        raise Refusal(400, "bad_field", "field 'push' must be an object {provider, token, app_id}")
    for key in sorted(value):
        if key not in _PUSH_KEYS:
            raise Refusal(400, "unknown_field", f"unknown field push.{_name(key)}")
    provider, token, app_id = value.get("provider"), value.get("token"), value.get("app_id")
    if provider not in PUSH_PROVIDERS:
        raise Refusal(400, "bad_field", "field 'push.provider' must be apns or fcm")
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise Refusal(
            400, "bad_field", "field 'push.token' must be 1-4096 letters, digits or : _ . -"
        )
    if not isinstance(app_id, str) or not _APP_ID.match(app_id):
        raise Refusal(
            400, "bad_field", "field 'push.app_id' must be 1-255 letters, digits or . _ -"
        )
    alert_token = value.get("alert_token")
    if alert_token is not None:
        if provider != "apns":
            raise Refusal(
                400,
                "bad_field",
                "field 'push.alert_token': for apns only (an FCM token takes every push)",
            )
        if not isinstance(alert_token, str) or not _TOKEN.match(alert_token):
            raise Refusal(
                400,
                "bad_field",
                "field 'push.alert_token' must be 1-4096 letters, digits or : _ . -",
            )
    return Push(provider, token, app_id, alert_token)


def _display_name(body: dict[str, Any]) -> str | None:
    value = body.get("display_name")
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= _DISPLAY_MAX
        or any(c in '"\\' or not c.isprintable() for c in value)
    ):
        raise Refusal(
            400,
            "bad_field",
            f"field 'display_name' must be 1-{_DISPLAY_MAX} printable characters but \" and \\",
        )
    return value


# --- answers ------------------------------------------------------------------------


def registrar_uri(account: Account) -> str:
    scheme = "sips" if account.transport is SipTransport.TLS else "sip"
    uri = f"{scheme}:{account.registrar_host}:{account.registrar_port}"
    return uri if scheme == "sips" else f"{uri};transport={account.transport.value}"


def _status(status: Status | None, account: Account) -> dict[str, Any]:
    if status is None:
        status = Status(State.PAUSED if account.paused else State.PENDING)
    return {
        "state": status.state.value,
        "reason": status.reason,
        "expires_at": status.expires_at,
        "retry_at": status.retry_at,
    }


def _view(api: SipisApi, account: Account) -> dict[str, Any]:
    """The account as its app may read it: never an HA1, never the push token."""
    cred = account.credential
    return {
        "account_id": account.account_id,
        "registrar": registrar_uri(account),
        "domain": account.domain,
        "user": account.user,
        "auth_user": cred.auth_user,
        "realm": cred.realm,
        "display_name": account.display_name,
        "credential": [
            name for name, ha1 in (("MD5", cred.ha1_md5), ("SHA-256", cred.ha1_sha256)) if ha1
        ],
        "push": _push_view(account.push),
        "paused": account.paused,
        "status": _status(api.registrar.status(account.account_id), account),
    }


def _push_view(push: Push) -> dict[str, Any]:
    """The push target as its app may read it: never a token. `state` "invalid": the
    push service declared the token dead, so nothing is pushed until a PATCH brings a
    new one. `texts` "not_pushed": a waiting text gets no push (APNs without a live
    `alert_token`, which its "new message" alert needs: a VoIP token takes calls only);
    it still reaches the app at its next connection."""
    return {
        "provider": push.provider,
        "app_id": push.app_id,
        "state": "valid" if push.live else "invalid",
        "texts": "pushed" if push.text_token else "not_pushed",
    }


# --- OpenAPI ------------------------------------------------------------------------


def describe(openapi: OpenApi) -> None:
    openapi.security_scheme(
        "deviceSecret",
        {"type": "http", "scheme": "bearer", "description": "the account's device secret"},
    )
    push = {
        "type": "object",
        "required": ["provider", "token", "app_id"],
        "additionalProperties": False,
        "properties": {
            "provider": {"enum": list(PUSH_PROVIDERS)},
            "token": {"type": "string", "pattern": _TOKEN.pattern},
            "app_id": {"type": "string", "pattern": _APP_ID.pattern},
            "alert_token": {
                "type": ["string", "null"],
                "pattern": _TOKEN.pattern,
                "description": "apns only: the app's ordinary token, for the alert push of a"
                " text (the VoIP token takes calls only); without it no push for texts",
            },
        },
    }
    push_view = {
        "type": "object",
        "required": ["provider", "app_id", "state", "texts"],
        "properties": {
            "provider": {"enum": list(PUSH_PROVIDERS)},
            "app_id": {"type": "string"},
            "state": {
                "enum": ["valid", "invalid"],
                "description": "invalid: the push service declared the token dead; no push"
                " until a PATCH sends a new one",
            },
            "texts": {
                "enum": ["pushed", "not_pushed"],
                "description": "not_pushed: a waiting text gets no push (apns without a"
                " live alert_token); it reaches the app at its next connection",
            },
        },
    }
    text = {"type": "string", "maxLength": 300}
    common = {
        "registrar": {
            **text,
            "description": "sip:host[:port][;transport=udp|tcp|tls] or sips:host[:port]",
        },
        "auth_user": {**text, "description": "the digest user name (default: user)"},
        "realm": {**text, "description": "the realm the HA1s were computed for"},
        "display_name": {"type": ["string", "null"], "maxLength": _DISPLAY_MAX},
        "ha1_md5": {"type": ["string", "null"], "pattern": _HA1["ha1_md5"].pattern},
        "ha1_sha256": {"type": ["string", "null"], "pattern": _HA1["ha1_sha256"].pattern},
    }
    create = openapi.schema(
        "SipisAccountCreate",
        {
            "type": "object",
            "required": ["registrar", "user", "realm", "push"],
            "additionalProperties": False,
            "properties": common
            | {
                "user": {"type": "string", "pattern": _USER.pattern},
                "domain": {**text, "description": "the address of record's domain"},
                "push": push,
            },
        },
    )
    change = openapi.schema(
        "SipisAccountChange",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": common
            | {
                "push": {"oneOf": [push, {"type": "null"}], "description": "null: delete"},
                "paused": {"type": "boolean"},
                "new_secret": {"type": "boolean", "description": "true: a new device secret"},
            },
        },
    )
    status = openapi.schema(
        "SipisStatus",
        {
            "type": "object",
            "required": ["state", "reason", "expires_at", "retry_at"],
            "properties": {
                "state": {"enum": [s.value for s in State]},
                "reason": {"type": "string"},
                "expires_at": {"type": ["number", "null"]},
                "retry_at": {"type": ["number", "null"]},
            },
        },
    )
    account = openapi.schema(
        "SipisAccount",
        {
            "type": "object",
            "required": ["account_id", "registrar", "domain", "user", "push", "paused", "status"],
            "properties": {
                "account_id": {"type": "string"},
                "registrar": {"type": "string"},
                "domain": {"type": "string"},
                "user": {"type": "string"},
                "auth_user": {"type": "string"},
                "realm": {"type": "string"},
                "display_name": {"type": ["string", "null"]},
                "credential": {"type": "array", "items": {"enum": ["MD5", "SHA-256"]}},
                "push": push_view,
                "paused": {"type": "boolean"},
                "status": status,
                "device_secret": {"type": "string"},
            },
        },
    )
    json_body = {
        "400": refusal(
            "malformed_body, unknown_field, missing_field, bad_field, password_refused, "
            "immutable_field"
        ),
        "413": refusal("body_too_large"),
        "415": refusal("unsupported_media_type"),
    }
    limited = {"429": refusal("rate_limited", RETRY_AFTER)}
    unauthorized = {
        "401": refusal(
            "unauthorized: no or a wrong device secret, or no such account",
            {"WWW-Authenticate": {"schema": {"type": "string"}}},
        )
    }
    path_id = [{"name": "account_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    openapi.operation(
        PREFIX,
        "post",
        {
            "summary": "Store a SIP account for registering on the app's behalf",
            "requestBody": {"required": True, "content": {JSON: {"schema": create}}},
            "responses": {
                "201": json_response(
                    "Stored; the device secret is shown this once",
                    {
                        "type": "object",
                        "required": ["account_id", "device_secret", "status", "push"],
                        "properties": {
                            "account_id": {"type": "string"},
                            "device_secret": {"type": "string"},
                            "status": status,
                            "push": push_view,
                        },
                    },
                ),
                **json_body,
                **limited,
            },
        },
    )
    secured = {"security": [{"deviceSecret": []}], "parameters": path_id}
    openapi.operation(
        PREFIX + "/{account_id}",
        "get",
        secured
        | {
            "summary": "The account and its registration's status (no HA1, no push token)",
            "responses": {"200": json_response("The account", account), **unauthorized, **limited},
        },
    )
    openapi.operation(
        PREFIX + "/{account_id}",
        "patch",
        secured
        | {
            "summary": "Change the credential, registrar or push target; pause or resume",
            "requestBody": {"required": True, "content": {JSON: {"schema": change}}},
            "responses": {
                "200": json_response("The account as changed", account),
                "204": {"description": "Push disabled: the account was deleted"},
                **json_body,
                **unauthorized,
                **limited,
            },
        },
    )
    openapi.operation(
        PREFIX + "/{account_id}",
        "delete",
        secured
        | {
            "summary": "Delete the account; its registration at the provider is removed",
            "responses": {"204": {"description": "Deleted"}, **unauthorized, **limited},
        },
    )

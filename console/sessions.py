"""Who may use the console: login with the admin token into a session cookie, CSRF
checks on every POST, logout.

Pages (console/pages.py) build on these, all of them reading the request alone:

    session = session_of(request)        # the request's valid Session, or None
    session = require_page(request)      # a page: the Session, or 303 See Other /login
    session.csrf                         # for <meta name="csrf-token" content="..."> and
                                         # the hidden `csrf` field of the logout form
    field = login_csrf(request, response)   # GET /login: the value of the form's hidden
                                         # `csrf` field; sets the pre-login cookie on
                                         # `response` (the POST must carry both)

and `console/pages.py` may define `login_page(request, *, error: str | None, status:
int) -> web.Response`: the login form again with a message, which POST /login answers
a browser with when the token is wrong (401) or too many were (429); without it, and
whenever the client asks for JSON, the answer is a JSON refusal.

The rules:

- A session is 256 random bits (`secrets.token_urlsafe(32)`), kept in this process's
  memory only, for `session_ttl` from the login (then the cookie opens nothing); its
  CSRF token is 256 bits more. The cookie `softrelay_console` is HttpOnly,
  SameSite=Strict, Path=/, and Secure when the listener speaks TLS.
- The admin token is compared in constant time (`hmac.compare_digest`). A wrong one is
  answered 401 and taken from the client's token bucket (per address, IPv6 by /64:
  webapi/ratelimit.py); an empty bucket answers 429 with Retry-After before the token
  is even looked at.
- Every POST (login, logout, the actions) is refused 403, and does nothing, unless its
  `Origin` (when the browser sends one) is the console's own and `Sec-Fetch-Site` (when
  sent) is same-origin; and a POST with a session must carry the session's CSRF token,
  in the `X-CSRF-Token` header or the form's `csrf` field. The login form carries the
  pre-login token of the `softrelay_console_login` cookie (double submit), since no
  session exists yet.
"""

from __future__ import annotations

import hmac
import importlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from privacy.clock import Clock
from webapi.errors import Refusal
from webapi.ratelimit import RateLimit, RateLimiter, client_key

COOKIE = "softrelay_console"
LOGIN_COOKIE = "softrelay_console_login"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"
TOKEN_FIELD = "token"  # noqa: S105 (the name of the form field, no secret)
# Wrong admin tokens a client may send: 5 at once, then one every 12 s.
LOGIN_FAILURES = RateLimit(per_minute=5, burst=5)
MAX_SESSIONS = 1000  # in memory at once; the oldest login goes first
MAX_FORM = 4096  # bytes of a login or logout form
log = logging.getLogger("softrelay.console")


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    csrf: str
    expires_at: float


class Sessions:
    """The logged-in sessions of this process, by id; an expired one is gone."""

    def __init__(self, ttl: float, clock: Clock, limit: int = MAX_SESSIONS) -> None:
        self._ttl = ttl
        self._clock = clock
        self._limit = limit
        self._by_id: OrderedDict[str, Session] = OrderedDict()  # oldest login first

    def __len__(self) -> int:
        return len(self._by_id)

    def create(self) -> Session:
        now = self._clock.now()
        self._forget_expired(now)
        while len(self._by_id) >= self._limit:
            self._by_id.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self._ttl)
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self._clock.now():
            del self._by_id[session_id]
            return None
        return session

    def drop(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def _forget_expired(self, now: float) -> None:
        for key in [k for k, s in self._by_id.items() if s.expires_at <= now]:
            del self._by_id[key]


class Gate:
    """The console's door: sessions, the admin token, the failure bucket."""

    def __init__(self, admin_token: str, ttl: float, clock: Clock, *, tls: bool) -> None:
        self._token = admin_token.encode()
        self.sessions = Sessions(ttl, clock)
        self.failures = RateLimiter(LOGIN_FAILURES, clock)
        self.ttl = ttl
        self.tls = tls

    def token_matches(self, offered: str) -> bool:
        return hmac.compare_digest(offered.encode(), self._token)


GATE = web.AppKey("console_gate", Gate)


def session_of(request: web.Request) -> Session | None:
    """The request's session: its cookie names a live one."""
    return request.app[GATE].sessions.get(request.cookies.get(COOKIE))


def require_page(request: web.Request) -> Session:
    """A page's session, or 303 See Other to /login."""
    session = session_of(request)
    if session is None:
        raise web.HTTPSeeOther("/login", headers={"Cache-Control": "no-store"})
    return session


def require_api(request: web.Request) -> Session:
    """An API route's session, or 401 JSON."""
    session = session_of(request)
    if session is None:
        raise Refusal(401, "unauthorized", "log in to the console first (POST /login)")
    return session


def login_csrf(request: web.Request, response: web.StreamResponse) -> str:
    """The hidden `csrf` field of the login form: the pre-login cookie's value (set on
    `response` when the browser has none yet)."""
    value = request.cookies.get(LOGIN_COOKIE, "")
    if not _well_formed(value):
        value = secrets.token_urlsafe(32)
        response.set_cookie(
            LOGIN_COOKIE,
            value,
            httponly=True,
            samesite="Strict",
            path="/",
            secure=request.app[GATE].tls,
            max_age=3600,
        )
    return value


def check_origin(request: web.Request) -> None:
    """403 unless the POST comes from the console's own pages (or no browser at all)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise Refusal(403, "forbidden_origin", "a POST to the console must come from its own pages")
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise Refusal(403, "forbidden_origin", "a POST to the console must come from its own pages")


def check_csrf(
    request: web.Request, session: Session, form: Mapping[str, Any] | None = None
) -> None:
    """403 unless the POST carries the session's CSRF token and comes from the console."""
    check_origin(request)
    offered = request.headers.get(CSRF_HEADER)
    if offered is None and form is not None:
        field = form.get(CSRF_FIELD)
        offered = field if isinstance(field, str) else None
    if offered is None or not hmac.compare_digest(offered.encode(), session.csrf.encode()):
        raise Refusal(403, "csrf", "the console's CSRF token is missing or wrong")


async def login(request: web.Request) -> web.StreamResponse:
    """POST /login: form fields `token` and `csrf` -> 303 / with the session cookie."""
    gate = request.app[GATE]
    key = client_key(request.remote)
    wait = gate.failures.wait(key)
    if wait > 0:
        return _refused(
            request, Refusal(429, "rate_limited", "too many wrong tokens", retry_after=wait)
        )
    check_origin(request)
    form = await _form(request)
    pre = request.cookies.get(LOGIN_COOKIE, "")
    offered_csrf = form.get(CSRF_FIELD, "")
    if not _well_formed(pre) or not hmac.compare_digest(offered_csrf.encode(), pre.encode()):
        raise Refusal(403, "csrf", "the login form's CSRF field is missing or wrong")
    if not gate.token_matches(form.get(TOKEN_FIELD, "")):
        gate.failures.take(key)
        log.info("console.login_refused")  # no address, no token: the event alone
        return _refused(request, Refusal(401, "unauthorized", "wrong admin token"))
    session = gate.sessions.create()
    log.info("console.login")
    response = web.HTTPSeeOther("/")
    response.set_cookie(
        COOKIE,
        session.id,
        httponly=True,
        samesite="Strict",
        path="/",
        secure=gate.tls,
        max_age=int(gate.ttl),
    )
    response.del_cookie(LOGIN_COOKIE, path="/")
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    """POST /logout: CSRF-checked; the session dropped -> 303 /login."""
    session = session_of(request)
    if session is None:
        check_origin(request)
        raise web.HTTPSeeOther("/login")
    form = await _form(request) if request.content_type != "application/json" else {}
    check_csrf(request, session, form)
    request.app[GATE].sessions.drop(session.id)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


async def _form(request: web.Request) -> dict[str, str]:
    """The urlencoded form of a POST, bounded; 400 when it is none."""
    if request.content_length is not None and request.content_length > MAX_FORM:
        raise Refusal(413, "too_large", f"a console form is at most {MAX_FORM} bytes")
    if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        if request.content_length in (None, 0) and not request.can_read_body:
            return {}
        raise Refusal(415, "unsupported_media_type", "send an urlencoded form")
    body = await request.content.read(MAX_FORM + 1)
    if len(body) > MAX_FORM:
        raise Refusal(413, "too_large", f"a console form is at most {MAX_FORM} bytes")
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refusal(400, "malformed_body", "the form is not valid urlencoded UTF-8") from exc
    return dict(pairs)


def _well_formed(value: str) -> bool:
    return 32 <= len(value) <= 64 and all(c.isalnum() or c in "-_" for c in value)


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _refused(request: web.Request, refusal: Refusal) -> web.Response:
    """A refusal of POST /login: the page again with the message for a browser (when the
    pages define `login_page`), else JSON."""
    page = _login_page()
    if page is None or _wants_json(request):
        return refusal.response()
    response = page(request, error=refusal.detail, status=refusal.status)
    response.headers.update(refusal.headers)
    return response


def _login_page() -> Callable[..., web.Response] | None:
    try:
        pages = importlib.import_module("console.pages")
    except ModuleNotFoundError:
        return None
    page = getattr(pages, "login_page", None)
    return page if callable(page) else None


__all__ = [
    "COOKIE",
    "CSRF_FIELD",
    "CSRF_HEADER",
    "GATE",
    "LOGIN_COOKIE",
    "Gate",
    "Session",
    "Sessions",
    "check_csrf",
    "check_origin",
    "login",
    "login_csrf",
    "logout",
    "require_api",
    "require_page",
    "session_of",
]

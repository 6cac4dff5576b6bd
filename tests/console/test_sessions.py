"""Login, the session cookie, CSRF and Origin, logout: console/sessions.py against the
real admin listener (tests/console/conftest.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import yarl
from aiohttp.test_utils import TestServer

from console.api import FIGURES, STREAMS
from console.history import ManualTicker
from console.server import build_console
from console.sessions import (
    COOKIE,
    CSRF_FIELD,
    GATE,
    LOGIN_COOKIE,
    LOGIN_FAILURES,
    TOKEN_FIELD,
    Sessions,
)
from console.settings import ConsoleSettings
from privacy.clock import ManualClock
from push.fakes.certs import ThrowawayCa
from softrelay.app import CONSOLE
from tests.console.conftest import ADMIN_TOKEN, START, ConsoleWorld

API_ROUTES = (
    "/api/v1/overview",
    "/api/v1/usage",
    "/api/v1/crashes",
    "/api/v1/crashes/0123456789abcdef0123456789abcdef",
    "/api/v1/privacy",
    "/api/v1/cluster",
    "/api/v1/events",
)


async def _pre_login(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(f"{base}/login") as form:
        assert form.status == 200
    return http.cookie_jar.filter_cookies(yarl.URL(base))[LOGIN_COOKIE].value


def _jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)


async def test_login_sets_a_strict_httponly_cookie_and_opens_the_api(
    console: ConsoleWorld,
) -> None:
    async with aiohttp.ClientSession(cookie_jar=_jar()) as http:
        pre = await _pre_login(http, console.base)
        async with http.post(
            f"{console.base}/login",
            data={TOKEN_FIELD: ADMIN_TOKEN, CSRF_FIELD: pre},
            allow_redirects=False,
        ) as answer:
            assert answer.status == 303
            assert answer.headers["Location"] == "/"
            (cookie,) = [
                c for c in answer.headers.getall("Set-Cookie") if c.startswith(f"{COOKIE}=")
            ]
        attributes = [part.strip().lower() for part in cookie.split(";")]
        assert "httponly" in attributes
        assert "samesite=strict" in attributes
        assert "path=/" in attributes
        assert "secure" not in attributes  # plain HTTP on loopback
        session_id = cookie.split(";")[0].split("=", 1)[1]
        assert len(session_id) >= 43  # 256 bits, URL-safe base64
        async with http.get(f"{console.base}/api/v1/overview") as overview:
            assert overview.status == 200
            assert (await overview.json())["node"] == "single"


async def test_a_wrong_token_is_401_json_and_opens_nothing(console: ConsoleWorld) -> None:
    async with aiohttp.ClientSession(cookie_jar=_jar()) as http:
        pre = await _pre_login(http, console.base)
        async with http.post(
            f"{console.base}/login",
            data={TOKEN_FIELD: ADMIN_TOKEN + "x", CSRF_FIELD: pre},
            headers={"Accept": "application/json"},
            allow_redirects=False,
        ) as answer:
            assert answer.status == 401
            assert await answer.json() == {"error": "unauthorized", "detail": "wrong admin token"}
            assert COOKIE not in answer.cookies
        async with http.get(f"{console.base}/api/v1/overview") as overview:
            assert overview.status == 401
    assert len(console.app[CONSOLE].app[GATE].sessions) == 0


async def test_a_wrong_token_from_a_browser_gets_the_login_page_again(
    console: ConsoleWorld,
) -> None:
    async with aiohttp.ClientSession(cookie_jar=_jar()) as http:
        pre = await _pre_login(http, console.base)
        async with http.post(
            f"{console.base}/login",
            data={TOKEN_FIELD: "not-the-token-at-all", CSRF_FIELD: pre},
            headers={"Accept": "text/html"},
            allow_redirects=False,
        ) as answer:
            assert answer.status == 401
            assert answer.content_type == "text/html"
            assert "wrong admin token" in await answer.text()


async def test_wrong_tokens_are_rate_limited_per_client_even_the_right_one_then(
    console: ConsoleWorld,
) -> None:
    """Five wrong tokens at once, then 429 with Retry-After, the right token included;
    once the bucket refills (the injected clock), the right token logs in."""
    async with aiohttp.ClientSession(cookie_jar=_jar()) as http:
        pre = await _pre_login(http, console.base)
        statuses = []
        for _ in range(LOGIN_FAILURES.burst + 1):
            async with http.post(
                f"{console.base}/login",
                data={TOKEN_FIELD: "wrong-token-wrong-token", CSRF_FIELD: pre},
                headers={"Accept": "application/json"},
                allow_redirects=False,
            ) as answer:
                statuses.append(answer.status)
                retry = answer.headers.get("Retry-After")
        assert statuses == [401] * LOGIN_FAILURES.burst + [429]
        assert retry == "12"
        async with http.post(
            f"{console.base}/login",
            data={TOKEN_FIELD: ADMIN_TOKEN, CSRF_FIELD: pre},
            headers={"Accept": "application/json"},
            allow_redirects=False,
        ) as answer:
            assert answer.status == 429
        console.clock.advance(12)
        async with http.post(
            f"{console.base}/login",
            data={TOKEN_FIELD: ADMIN_TOKEN, CSRF_FIELD: pre},
            allow_redirects=False,
        ) as answer:
            assert answer.status == 303


async def test_login_needs_the_pre_login_csrf_and_the_own_origin(console: ConsoleWorld) -> None:
    async with aiohttp.ClientSession(cookie_jar=_jar()) as http:
        pre = await _pre_login(http, console.base)
        for data, headers in (
            ({TOKEN_FIELD: ADMIN_TOKEN}, {}),
            ({TOKEN_FIELD: ADMIN_TOKEN, CSRF_FIELD: pre[:-1] + "A"}, {}),
            ({TOKEN_FIELD: ADMIN_TOKEN, CSRF_FIELD: pre}, {"Origin": "http://evil.example"}),
            ({TOKEN_FIELD: ADMIN_TOKEN, CSRF_FIELD: pre}, {"Sec-Fetch-Site": "cross-site"}),
        ):
            async with http.post(
                f"{console.base}/login", data=data, headers=headers, allow_redirects=False
            ) as answer:
                assert answer.status == 403, (data.keys(), headers)
                assert (await answer.json())["error"] in ("csrf", "forbidden_origin")
    assert len(console.app[CONSOLE].app[GATE].sessions) == 0


async def test_every_api_route_without_a_session_is_401_json(console: ConsoleWorld) -> None:
    async with aiohttp.ClientSession(cookie_jar=_jar()) as http:
        http.cookie_jar.update_cookies({COOKIE: "forged-session-id"}, yarl.URL(console.base))
        for path in API_ROUTES:
            async with http.get(console.base + path) as answer:
                assert answer.status == 401, path
                assert answer.content_type == "application/json"
                assert (await answer.json())["error"] == "unauthorized"
        for path in ("/api/v1/actions/audit", "/api/v1/actions/sweep"):
            async with http.post(console.base + path) as answer:
                assert answer.status == 401, path
        async with http.get(f"{console.base}/", allow_redirects=False) as page:
            assert page.status == 303
            assert page.headers["Location"] == "/login"


async def test_a_post_without_the_csrf_token_or_from_a_foreign_origin_is_403_and_does_nothing(
    console: ConsoleWorld,
) -> None:
    snapshot = console.app[CONSOLE].app[FIGURES].sources.audit
    async with console.logged_in() as admin:
        before = snapshot.taken_at
        console.clock.advance(5)
        for headers in (
            {"X-CSRF-Token": ""},
            {"X-CSRF-Token": admin.csrf[:-2] + "AA"},
            {"Origin": "http://evil.example"},
            {"Sec-Fetch-Site": "cross-site"},
        ):
            answer = await admin.post("/api/v1/actions/audit", headers=headers)
            assert answer.status == 403, headers
        async with admin.http.post(f"{admin.base}/api/v1/actions/audit") as bare:
            assert bare.status == 403
        assert snapshot.taken_at == before  # nothing ran
        async with admin.http.post(f"{admin.base}/logout", allow_redirects=False) as out:
            assert out.status == 403
        assert await admin.json("/api/v1/usage") == {"tenants": []}  # still logged in
        answer = await admin.post("/api/v1/actions/audit", headers={"Origin": admin.base})
        assert answer.status == 200
        assert snapshot.taken_at == START + 5


async def test_logout_drops_the_session(console: ConsoleWorld) -> None:
    async with console.logged_in() as admin:
        async with admin.http.post(
            f"{admin.base}/logout", data={CSRF_FIELD: admin.csrf}, allow_redirects=False
        ) as out:
            assert out.status == 303
            assert out.headers["Location"] == "/login"
        async with admin.http.get(f"{admin.base}/api/v1/overview") as answer:
            assert answer.status == 401
        # The old cookie, sent again by hand, opens nothing either.
        admin.http.cookie_jar.update_cookies({COOKIE: admin.session_id}, yarl.URL(admin.base))
        async with admin.http.get(f"{admin.base}/api/v1/overview") as answer:
            assert answer.status == 401


async def test_a_session_expires_after_its_ttl(console: ConsoleWorld) -> None:
    ttl = ConsoleSettings().session_ttl
    async with console.logged_in() as admin:
        console.clock.advance(ttl - 1)
        assert (await admin.json("/api/v1/overview"))["node"] == "single"
        console.clock.advance(1)
        async with admin.http.get(f"{admin.base}/api/v1/overview") as answer:
            assert answer.status == 401


def test_sessions_are_random_capped_and_expire() -> None:
    clock = ManualClock(START)
    sessions = Sessions(60, clock, limit=2)
    first, second = sessions.create(), sessions.create()
    assert first.id != second.id
    assert first.csrf != second.csrf
    assert sessions.get(first.id) == first
    third = sessions.create()  # over the cap: the oldest login goes
    assert sessions.get(first.id) is None
    assert sessions.get(third.id) == third
    clock.advance(60)
    assert sessions.get(second.id) is None
    assert sessions.get("") is None


async def test_every_answer_carries_the_security_headers(console: ConsoleWorld) -> None:
    async with console.logged_in() as admin:
        for path in ("/login", "/api/v1/overview", "/openapi.json", "/api/v1/nothing"):
            async with admin.http.get(admin.base + path) as answer:
                csp = answer.headers["Content-Security-Policy"]
                assert "default-src 'self'" in csp
                assert "frame-ancestors 'none'" in csp
                assert answer.headers["X-Content-Type-Options"] == "nosniff"
                assert answer.headers["Referrer-Policy"] == "same-origin"
                assert answer.headers["Cache-Control"] == "no-store", path


async def test_over_tls_the_cookie_is_secure(tmp_path: Path, console: ConsoleWorld) -> None:
    """The same admin Application behind TLS: the session cookie gets Secure."""
    ca = ThrowawayCa.create(tmp_path)
    cert = key = ca.issue_server()  # one PEM file: the certificate and its key
    settings = ConsoleSettings(
        listen=("127.0.0.1", 0), admin_token=ADMIN_TOKEN, tls_cert=cert, tls_key=key
    )
    served = console.app[CONSOLE].app[FIGURES].sources
    app = build_console(settings, served, ManualTicker())
    context = settings.ssl_context()
    assert context is not None
    server = TestServer(app, host="127.0.0.1", scheme="https")
    await server.start_server(ssl=context)
    client_context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    try:
        base = str(server.make_url("")).rstrip("/")
        connector = aiohttp.TCPConnector(ssl=client_context)
        async with aiohttp.ClientSession(cookie_jar=_jar(), connector=connector) as http:
            pre = await _pre_login(http, base)
            async with http.post(
                f"{base}/login",
                data={TOKEN_FIELD: ADMIN_TOKEN, CSRF_FIELD: pre},
                allow_redirects=False,
            ) as answer:
                assert answer.status == 303
                (cookie,) = [
                    c for c in answer.headers.getall("Set-Cookie") if c.startswith(f"{COOKIE}=")
                ]
            assert "secure" in [part.strip().lower() for part in cookie.split(";")]
    finally:
        app[STREAMS].close()
        await server.close()

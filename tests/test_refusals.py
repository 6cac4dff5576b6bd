"""Every HTTP refusal of softrelay has one shape per API (webapi/errors.py): JSON
`{"error", "detail"}`, crash ingest's Sentry variant `{"detail"}`, the token relay's
RFC 6749 variant `{"error", "error_description"}`; the middleware's own refusals (a
wrong method, a header that is not UTF-8, a body that does not decode, a failing
handler) included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from crashreports.settings import parse_crashreports
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from proxy.sip.settings import PbxSettings, SipSettings
from push.apps import PushSettings
from softrelay.app import Services, build_app
from tomlsections.reader import Section
from usage.settings import Tenant, UsageSettings
from webapi.body import BadBody
from webapi.errors import OAuthRefusal, Refusal, SentryRefusal, refusals, speaks

TIMEOUT = 10.0  # a bound on waiting for the loopback peer, never a wait for time
PUSH = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.t")
CRASH_KEY = "crashkeyfortests0123456789"
GENERIC, SENTRY, OAUTH = "generic", "sentry", "oauth"


def variant_of(path: str) -> str:
    if path.startswith("/api/"):
        return SENTRY
    if path.startswith("/oauth/"):
        return OAUTH
    return GENERIC


def assert_shape(variant: str, status: int, headers: Any, raw: bytes, where: str) -> None:
    assert headers.get("Content-Type", "").startswith("application/json"), (where, raw[:200])
    body = orjson.loads(raw)
    assert isinstance(body, dict), where
    assert all(isinstance(v, str) and v for v in body.values()), (where, body)
    if variant == SENTRY:
        assert set(body) == {"detail"}, (where, body)
    elif variant == OAUTH:
        assert set(body) == {"error", "error_description"}, (where, body)
        assert body["error"] in OAuthRefusal.CODES, (where, body)
        assert headers.get("Cache-Control") == "no-store", where
    else:
        assert set(body) == {"error", "detail"}, (where, body)
    if status in (429, 503) and "Retry-After" in headers:
        assert int(headers["Retry-After"]) >= 1, where


# --- the type and its variants ------------------------------------------------------


def test_each_variant_renders_its_shape() -> None:
    refusal = Refusal(429, "rate_limited", "too many", {"X-A": "1"}, retry_after=0.2)
    assert refusal.body() == {"error": "rate_limited", "detail": "too many"}
    assert refusal.headers == {"X-A": "1", "Retry-After": "1"}, "rounded up, at least 1"
    assert Refusal(429, "r", "d", retry_after=29.01).headers == {"Retry-After": "30"}
    assert SentryRefusal(400, "malformed", "bad envelope").body() == {"detail": "bad envelope"}
    oauth = OAuthRefusal(400, "invalid_grant", "expired")
    assert oauth.body() == {"error": "invalid_grant", "error_description": "expired"}
    assert oauth.headers == {"Cache-Control": "no-store"}


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (400, "malformed_body", "invalid_request"),
        (400, "bad_header", "invalid_request"),
        (405, "method_not_allowed", "invalid_request"),
        (413, "body_too_large", "invalid_request"),
        (429, "rate_limited", "slow_down"),
        (500, "internal", "server_error"),
        (502, "pbx_failed", "temporarily_unavailable"),
        (400, "invalid_grant", "invalid_grant"),  # an RFC 6749 code stays
    ],
)
def test_a_refusal_recast_for_oauth_gets_an_rfc_6749_code(
    status: int, error: str, code: str
) -> None:
    recast = OAuthRefusal.recast(Refusal(status, error, "why", {"Allow": "POST"}))
    assert (recast.status, recast.error, recast.detail) == (status, code, "why")
    assert recast.headers == {"Allow": "POST", "Cache-Control": "no-store"}


def test_bad_body_is_a_refusal_and_a_value_error() -> None:
    exc = BadBody()
    assert isinstance(exc, ValueError)
    assert (exc.status, exc.error) == (400, "malformed_body")


async def test_the_middleware_answers_a_failing_handler_in_the_routes_variant() -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("a message that may quote the body")

    app = web.Application(middlewares=[refusals])
    speaks(app, "/api/", SentryRefusal)
    speaks(app, "/oauth/", OAuthRefusal)
    for path in ("/api/1/store/", "/oauth/x/token", "/usage/v1/ping"):
        app.router.add_post(path, boom)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        for path, body in [
            ("/api/1/store/", {"detail": "the request failed; retry later"}),
            (
                "/oauth/x/token",
                {"error": "server_error", "error_description": "the request failed; retry later"},
            ),
            ("/usage/v1/ping", {"error": "internal", "detail": "the request failed; retry later"}),
        ]:
            async with http.post(server.make_url(path)) as answer:
                assert (answer.status, await answer.json()) == (500, body)


# --- the whole app's refusals -------------------------------------------------------


@pytest.fixture
async def app_base(tmp_path: Path) -> AsyncIterator[str]:
    """`build_app` as `serve` builds it (no SIP listeners), with a crash project, a
    usage tenant and a PBX, on loopback."""
    crash = parse_crashreports(
        Section({"project": [{"id": "1", "key": CRASH_KEY}]}, tmp_path / "t.toml", "crashreports")
    )
    services = Services(
        load_policy("auerproxy"),
        Keyring.generate(),
        tmp_path,
        ManualClock(1_772_366_400.0),
        sweep_interval=3600,
        push=PUSH,
        sip=SipSettings("relay.example", (PbxSettings("0042137", "pbx-secret-0123456789"),)),
        crash=crash,
        usage=UsageSettings(tenants=(Tenant("acme", "acme-key-0123456789abcdef"),)),
    )
    server = TestServer(build_app(services), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def concrete(path: str) -> str:
    """A route's path with each {placeholder} filled."""
    for name, value in (("{project}", "1"), ("{provider}", "google"), ("{serial}", "0042137")):
        path = path.replace(name, value)
    return path.replace("{path:[\\s\\S]*}", "phone.cfg").replace("{path}", "phone.cfg")


async def raw_request(base: str, head: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), TIMEOUT)
    try:
        writer.write(head)
        reply = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    status_head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = status_head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


async def test_every_refusal_of_the_app_has_its_apis_one_shape(app_base: str) -> None:
    """Each route of the app, asked wrongly in each way the middleware or its handler
    refuses: a method it lacks, no credentials and an empty body, a body that claims
    gzip and is not, a header that is not UTF-8; and a path that does not exist."""
    async with aiohttp.ClientSession() as http, http.get(f"{app_base}/openapi.json") as answer:
        paths = (await answer.json())["paths"]
    seen: dict[str, int] = {GENERIC: 0, SENTRY: 0, OAUTH: 0}
    async with aiohttp.ClientSession() as http:
        for template, operations in sorted(paths.items()):
            path = concrete(template)
            variant = variant_of(path)
            methods = {m.upper() for m in operations}
            asks: list[tuple[str, dict[str, str], bytes]] = [
                ("PATCH" if "PATCH" not in methods else "TRACE", {}, b""),
                *((m, {}, b"") for m in sorted(methods)),
                *(
                    (m, {"Content-Encoding": "gzip", "Content-Type": "application/json"}, b"{}")
                    for m in sorted(methods & {"POST", "PUT"})
                ),
            ]
            for method, headers, body in asks:
                async with http.request(
                    method, f"{app_base}{path}", headers=headers, data=body
                ) as answer:
                    raw = await answer.read()
                    where = f"{method} {path} -> {answer.status}"
                    if answer.status >= 400 and method == "HEAD":  # a head has no body
                        assert answer.content_type == "application/json", where
                    elif answer.status >= 400:
                        assert_shape(variant, answer.status, answer.headers, raw, where)
                        seen[variant] += 1
            method = sorted(methods)[0]
            status, head, raw = await raw_request(
                app_base,
                f"{method} {path} HTTP/1.1\r\nHost: relay\r\n".encode()
                + b"X-Proof: \xed\xa0\x80\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            assert status == 400, (path, raw[:200])
            assert_shape(variant, status, head, raw, f"bad header {path}")
            seen[variant] += 1
        async with http.get(f"{app_base}/no/such/path") as answer:
            assert answer.status == 404
            assert_shape(GENERIC, 404, answer.headers, await answer.read(), "404")
    # Every ask of crash ingest's two routes and OAuth's one was refused (4 asks each),
    # and so were most of the rest (their GET answers, /healthz ..., are no refusals).
    assert (seen[SENTRY], seen[OAUTH]) == (2 * 4, 4), seen
    assert seen[GENERIC] >= 40, seen

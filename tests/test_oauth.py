"""The OAuth-secret proxy: the app's token exchange gets the client secret on the way."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from privacy.audit import scan_for_canaries
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.logs import day_of, log_dir, setup_logging
from privacy.policy import load_policy
from privacy.retention import Sweeper
from proxy.oauth import OAUTH_STAND_IN
from proxy.oauth.settings import ClientAuth, OAuthProvider, OAuthSettings
from proxy.oauth.standin import OAuthStandIn
from push.apps import PushSettings
from softrelay.app import STORE, Services, build_app
from softrelay.config import ConfigError, load_config
from webapi.ratelimit import RateLimit

PUSH = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.example.t")
FORM = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Softphone/2.1 (iOS)"}
APP_IP = "127.0.0.66"


@dataclass
class Relay:
    base: str
    app: web.Application
    data_dir: Path

    def app_client(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(local_addr=(APP_IP, 0), force_close=True)
        return aiohttp.ClientSession(connector=connector)

    @property
    def stand_in(self) -> OAuthStandIn:
        return self.app[OAUTH_STAND_IN]


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def start_relay(tmp_path: Path, clock: ManualClock) -> AsyncIterator[RelayFactory]:
    policy = load_policy("auerproxy")
    async with AsyncExitStack() as stack:
        stack.enter_context(setup_logging(policy, tmp_path, clock))

        async def start(settings: OAuthSettings | None = None) -> Relay:
            services = Services(
                policy,
                Keyring.generate(),
                tmp_path,
                clock,
                sweep_interval=3600,
                push=PUSH,
                oauth=settings or OAuthSettings(),
            )
            app = build_app(services)
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            stack.push_async_callback(server.close)
            return Relay(str(server.make_url("")).rstrip("/"), app, tmp_path)

        yield start


async def test_the_relay_adds_the_secret_the_app_never_sends(start_relay: RelayFactory) -> None:
    relay = await start_relay()
    provider = relay.stand_in.provider
    async with relay.app_client() as client:
        form = {"grant_type": "authorization_code", "code": "4/0AX4Xf", "code_verifier": "v" * 43}
        async with client.post(f"{relay.base}/oauth/google/token", data=form, headers=FORM) as r:
            assert r.status == 200
            assert r.headers["Cache-Control"] == "no-store"
            tokens = await r.json()
        assert tokens["token_type"] == "Bearer"
        assert tokens["access_token"].startswith("ya29.")
        refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        async with client.post(f"{relay.base}/oauth/google/token", data=refresh, headers=FORM) as r:
            assert r.status == 200
            assert "access_token" in await r.json()
    first = relay.stand_in.received[0]
    assert first["client_secret"] == provider.client_secret, "the upstream sees the secret"
    assert first["client_id"] == provider.client_id
    assert first["code"] == "4/0AX4Xf"
    assert first["code_verifier"] == "v" * 43
    assert "client_secret" not in form


async def test_the_upstream_answer_and_status_come_back_unchanged(
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay()
    answer = {"error": "invalid_grant", "error_description": "Bad Request", "extra": [1, 2]}
    relay.stand_in.script["used-code"] = (400, answer)
    relay.stand_in.script["rate-me"] = (429, {"error": "rate_limit_exceeded"})
    async with relay.app_client() as client:
        url = f"{relay.base}/oauth/google/token"
        form = {"grant_type": "authorization_code", "code": "used-code"}
        async with client.post(url, data=form, headers=FORM) as r:
            assert r.status == 400
            assert await r.read() == json.dumps(answer).encode(), "byte for byte"
            assert r.headers["Content-Type"].startswith("application/json")
        form = {"grant_type": "refresh_token", "refresh_token": "rate-me"}
        async with client.post(url, data=form, headers=FORM) as r:
            assert r.status == 429
            assert await r.json() == {"error": "rate_limit_exceeded"}
        form = {"grant_type": "refresh_token", "refresh_token": "never-issued"}
        async with client.post(url, data=form, headers=FORM) as r:
            assert r.status == 400
            assert (await r.json())["error"] == "invalid_grant"


async def test_a_secret_sent_by_the_app_is_replaced(start_relay: RelayFactory) -> None:
    relay = await start_relay()
    form = {
        "grant_type": "authorization_code",
        "code": "c",
        "client_id": "someone-else",
        "client_secret": "leaked-from-an-old-app",
    }
    async with (
        relay.app_client() as client,
        client.post(f"{relay.base}/oauth/google/token", data=form, headers=FORM) as r,
    ):
        assert r.status == 200
    received = relay.stand_in.received[0]
    assert received["client_secret"] == relay.stand_in.provider.client_secret
    assert received["client_id"] == relay.stand_in.provider.client_id


async def test_basic_client_authentication(start_relay: RelayFactory) -> None:
    stand_in = await OAuthStandIn.start("corp", auth=ClientAuth.BASIC)
    try:
        relay = await start_relay(OAuthSettings(providers=(stand_in.provider,)))
        async with relay.app_client() as client:
            form = {"grant_type": "authorization_code", "code": "c"}
            async with client.post(f"{relay.base}/oauth/corp/token", data=form, headers=FORM) as r:
                assert r.status == 200
            async with client.post(
                f"{relay.base}/oauth/google/token", data=form, headers=FORM
            ) as r:
                assert r.status == 404, "only configured providers; no stand-in beside them"
        header = stand_in.authorizations[0]
        user, _, password = base64.b64decode(header.removeprefix("Basic ")).decode().partition(":")
        assert (unquote(user), unquote(password)) == (
            stand_in.provider.client_id,
            stand_in.provider.client_secret,
        )
        assert "client_secret" not in stand_in.received[0]
    finally:
        await stand_in.stop()


@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        (
            b'{"grant_type": "authorization_code"}',
            {"Content-Type": "application/json"},
            400,
            "invalid_request",
        ),
        (b"grant_type=password&username=a&password=b", FORM, 400, "unsupported_grant_type"),
        (b"grant_type=authorization_code", FORM, 400, "invalid_request"),
        (b"grant_type=refresh_token&refresh_token=", FORM, 400, "invalid_request"),
        (b"grant_type=authorization_code&code=a&code=b", FORM, 400, "invalid_request"),
        (b"grant_type=authorization_code&code=" + b"x" * 20000, FORM, 413, "invalid_request"),
    ],
)
async def test_bad_requests_get_an_oauth_error(
    start_relay: RelayFactory, body: bytes, headers: dict[str, str], status: int, error: str
) -> None:
    relay = await start_relay()
    async with (
        relay.app_client() as client,
        client.post(f"{relay.base}/oauth/google/token", data=body, headers=headers) as r,
    ):
        assert r.status == status
        assert (await r.json())["error"] == error
        assert r.headers["Cache-Control"] == "no-store"
    assert not relay.stand_in.received, "nothing bad is forwarded"


async def test_unknown_provider_is_404(start_relay: RelayFactory) -> None:
    relay = await start_relay()
    async with relay.app_client() as client:
        form = {"grant_type": "authorization_code", "code": "c"}
        async with client.post(f"{relay.base}/oauth/github/token", data=form, headers=FORM) as r:
            assert r.status == 404
            assert (await r.json())["error"] == "invalid_request"


async def test_upstream_down_is_502_and_slow_is_504(start_relay: RelayFactory) -> None:
    hang = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await hang.wait()
        return web.Response()

    upstream_app = web.Application()
    upstream_app.router.add_post("/token", slow)
    async with TestServer(upstream_app, host="127.0.0.1") as upstream:
        providers = (
            OAuthProvider("slow", str(upstream.make_url("/token")), "id", "secret"),
            OAuthProvider("down", "http://127.0.0.1:9/token", "id", "secret"),
        )
        relay = await start_relay(OAuthSettings(providers=providers, timeout=0.3))
        form = {"grant_type": "authorization_code", "code": "c"}
        async with relay.app_client() as client:
            async with client.post(f"{relay.base}/oauth/down/token", data=form, headers=FORM) as r:
                assert r.status == 502
                assert (await r.json())["error"] == "temporarily_unavailable"
            async with client.post(f"{relay.base}/oauth/slow/token", data=form, headers=FORM) as r:
                assert r.status == 504
        hang.set()


async def test_per_ip_rate_limit(start_relay: RelayFactory, clock: ManualClock) -> None:
    relay = await start_relay(OAuthSettings(rate=RateLimit(per_minute=6, burst=2)))
    form = {"grant_type": "authorization_code", "code": "c"}
    async with relay.app_client() as client:
        url = f"{relay.base}/oauth/google/token"
        statuses = []
        for _ in range(3):
            async with client.post(url, data=form, headers=FORM) as r:
                statuses.append(r.status)
                retry = r.headers.get("Retry-After")
        assert statuses == [200, 200, 429]
        assert retry == "10"
        clock.advance(10)
        async with client.post(url, data=form, headers=FORM) as r:
            assert r.status == 200


async def test_troubleshooting_log_keeps_ip_and_no_secret_and_rotates(
    start_relay: RelayFactory, clock: ManualClock
) -> None:
    relay = await start_relay()
    code, verifier = "CANARY-CODE-77b1", "CANARY-VERIFIER-" + "q" * 30
    async with relay.app_client() as client:
        form = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier}
        async with client.post(f"{relay.base}/oauth/google/token", data=form, headers=FORM) as r:
            assert r.status == 200
            tokens = await r.json()
    day_file = log_dir(relay.data_dir, "troubleshooting_log") / f"{day_of(clock.now())}.jsonl"
    (line,) = [orjson.loads(raw) for raw in day_file.read_bytes().splitlines()]
    assert line["ip"] == APP_IP, "the troubleshooting log keeps the external IP"
    assert line["user_agent"] == "Softphone/2.1 (iOS)"
    assert (line["route"], line["status"]) == ("/oauth/google/token", 200)
    assert "dropped" not in line
    secret = relay.stand_in.provider.client_secret
    canaries = [code, verifier, secret, tokens["access_token"], tokens["refresh_token"]]
    assert scan_for_canaries(relay.data_dir, canaries) == []
    assert scan_for_canaries(relay.data_dir, [APP_IP]) != [], "the scan does read the log"
    sweeper = Sweeper(relay.app[STORE], relay.data_dir)
    clock.advance(6 * 86400)
    await sweeper.run_once()
    assert day_file.exists(), "kept within the 7 days of rotation"
    clock.advance(86400)
    await sweeper.run_once()
    assert not day_file.exists(), "gone once older than the retention"


def test_config_errors_name_the_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "softrelay.toml"
    provider = '[[oauth.provider]]\nname = "google"\nclient_id = "id"\n'
    config.write_text(
        provider + 'token_url = "http://accounts.example.com/token"\nclient_secret = "env:X"\n'
    )
    with pytest.raises(ConfigError, match=r"oauth\.provider\[0\]\.token_url: must be https"):
        load_config(config)
    monkeypatch.delenv("SOFTRELAY_TEST_SECRET", raising=False)
    url = 'token_url = "https://oauth2.googleapis.com/token"\n'
    config.write_text(provider + url + 'client_secret = "env:SOFTRELAY_TEST_SECRET"\n')
    with pytest.raises(ConfigError, match=r"softrelay\.toml: oauth\.provider\[0\]\.client_secret"):
        load_config(config)
    config.write_text(provider + url + 'client_secret = "inline-secret"\n')
    with pytest.raises(ConfigError, match=r"client_secret: must be 'env:NAME' or 'file:PATH'"):
        load_config(config)
    config.write_text("[oauth]\nrate = 3\n")
    with pytest.raises(ConfigError, match=r"oauth\.rate: unknown key"):
        load_config(config)
    monkeypatch.setenv("SOFTRELAY_TEST_SECRET", "s3cr3t")
    config.write_text(
        provider + url + 'client_secret = "env:SOFTRELAY_TEST_SECRET"\nauth_method = "basic"\n'
    )
    loaded = load_config(config).oauth
    assert loaded.providers[0].client_secret == "s3cr3t"
    assert loaded.providers[0].auth is ClientAuth.BASIC
    assert "s3cr3t" not in repr(loaded)
    assert not loaded.embedded

"""`/sipis/v1/accounts` through the whole app (`build_app`, SIPIS mode on, the registrar
engine a double) on SQLite and PostgreSQL: create, read, change, pause, delete with the
device secret; the HA1, the user and the token never in the clear in the database nor
in an answer; a wrong, stale or missing secret changes nothing and tells nothing; a
password, a bad HA1 or a bad registrar URI is refused naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from privacy.clock import ManualClock
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store
from push.apps import PushSettings
from sipis.account import SipTransport
from sipis.accounts import CATEGORY
from sipis.api import parse_registrar
from sipis.settings import SipisSettings
from softrelay.app import STORE, Services, build_app
from tests.rawdb import RawDatabase
from tests.sipis.test_accounts import Registered
from webapi.ratelimit import RateLimit

pytestmark = pytest.mark.both_backends

USER = "alice-canary-user-9d3a"
HA1_MD5 = "89abcdef0123456789abcdef01234567"
HA1_SHA256 = "cd" * 32
TOKEN = "fcm-token-canary-31b7"
PASSWORD = "sip-password-canary-4c0e"
ACCOUNT: dict[str, Any] = {
    "registrar": "sip:sip.example.com;transport=tcp",
    "user": USER,
    "realm": "example.com",
    "display_name": "Alice Canary",
    "ha1_md5": HA1_MD5,
    "ha1_sha256": HA1_SHA256,
    "push": {"provider": "fcm", "token": TOKEN, "app_id": "com.example.phone"},
}


@dataclass
class World:
    session: aiohttp.ClientSession
    base: str
    store: Store
    registrar: Registered

    async def call(
        self, method: str, path: str, secret: str | None = None, body: Any = None, **kw: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = dict(kw.pop("headers", {}))
        if secret is not None:
            headers["Authorization"] = f"Bearer {secret}"
        url = f"{self.base}sipis/v1/accounts{path}"
        async with self.session.request(method, url, json=body, headers=headers, **kw) as answer:
            text = await answer.text()
            data = await answer.json() if text else None
            return answer.status, data, answer

    async def create(self, body: dict[str, Any] | None = None) -> tuple[str, str]:
        status, data, _ = await self.call("POST", "", body=body or ACCOUNT)
        assert status == 201, data
        return data["account_id"], data["device_secret"]


async def _world(
    tmp_path: Path, store_settings: StoreSettings, rate: RateLimit
) -> AsyncIterator[World]:
    registrar = Registered()
    services = Services(
        load_policy("cloudsoftphone"),
        Keyring.generate(),
        tmp_path,
        ManualClock(1_772_366_400.0),
        sweep_interval=3600,
        # The app the accounts name: a push target must be a configured app.
        push=PushSettings(
            apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.example.phone"
        ),
        store=store_settings,
        # No DNS from the tests (test_sipis_targets.py checks the registrar host).
        sipis=SipisSettings(enabled=True, rate=rate, allow_private_registrars=True),
        sipis_registrar=registrar.opened,
    )
    app = build_app(services)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield World(session, str(server.make_url("/")), app[STORE], registrar)
    finally:
        await server.close()
    assert not registrar.open  # closed with the app


@pytest.fixture
async def world(tmp_path: Path, store_settings: StoreSettings) -> AsyncIterator[World]:
    async for opened in _world(tmp_path, store_settings, RateLimit(per_minute=0)):
        yield opened


async def test_round_trip_create_read_change_pause_resume_delete(world: World) -> None:
    account_id, secret = await world.create()
    assert world.registrar.calls == [("add_now", account_id)]  # registered at once

    status, data, answer = await world.call("GET", f"/{account_id}", secret)
    assert status == 200
    assert answer.headers["Cache-Control"] == "no-store"
    assert data["registrar"] == "sip:sip.example.com:5060;transport=tcp"
    assert (data["user"], data["domain"], data["auth_user"]) == (USER, "sip.example.com", USER)
    assert data["credential"] == ["MD5", "SHA-256"]
    assert data["push"] == {
        "provider": "fcm",
        "app_id": "com.example.phone",
        "state": "valid",
        "texts": "pushed",
    }
    assert data["status"]["state"] == "pending"
    text = str(data)
    for secret_value in (HA1_MD5, HA1_SHA256, TOKEN):
        assert secret_value not in text

    # A new credential for a new realm, over TLS to another registrar.
    change = {"registrar": "sips:sip2.example.com", "realm": "r2", "ha1_sha256": "ef" * 32}
    status, data, _ = await world.call("PATCH", f"/{account_id}", secret, change)
    assert status == 200, data
    assert data["registrar"] == "sips:sip2.example.com:5061"
    assert data["credential"] == ["SHA-256"]  # the MD5 HA1 of the old realm is gone
    held = world.registrar.held[account_id]
    assert held.transport is SipTransport.TLS
    assert (held.credential.realm, held.credential.ha1_md5) == ("r2", None)

    status, data, _ = await world.call("PATCH", f"/{account_id}", secret, {"paused": True})
    assert (status, data["paused"], data["status"]["state"]) == (200, True, "paused")
    assert ("pause", account_id) in world.registrar.calls
    status, data, _ = await world.call("PATCH", f"/{account_id}", secret, {"paused": False})
    assert (status, data["paused"], data["status"]["state"]) == (200, False, "pending")

    status, data, _ = await world.call("DELETE", f"/{account_id}", secret)
    assert (status, data) == (204, None)
    assert world.registrar.removed == [account_id]
    assert await world.store.find(CATEGORY) == []
    status, data, _ = await world.call("GET", f"/{account_id}", secret)
    assert (status, data["error"]) == (401, "unauthorized")  # a deleted account's secret


async def test_the_database_holds_no_ha1_user_token_or_secret_in_the_clear(
    world: World, raw_db: RawDatabase
) -> None:
    account_id, secret = await world.create()
    dump = raw_db.dump()
    assert account_id in dump
    for canary in (secret, HA1_MD5, HA1_SHA256, USER, TOKEN, "Alice Canary"):
        assert canary not in dump, canary


async def test_wrong_stale_or_missing_secret_changes_nothing_and_tells_nothing(
    world: World,
) -> None:
    account_id, secret = await world.create()
    _, other_secret = await world.create(ACCOUNT | {"user": "bob"})
    before = await world.store.find(CATEGORY, account_id=account_id)
    calls = list(world.registrar.calls)
    answers = []
    for method, body in (("GET", None), ("PATCH", {"paused": True}), ("DELETE", None)):
        for path, given in (
            (f"/{account_id}", "wrong" + secret),
            (f"/{account_id}", other_secret),  # another account's secret
            (f"/{account_id}", None),
            ("/AAAAAAAAAAAAAAAAAAAAAA", secret),  # no such account
        ):
            status, data, answer = await world.call(method, path, given, body)
            assert status == 401, (method, path)
            assert answer.headers["WWW-Authenticate"] == 'Bearer realm="sipis"'
            answers.append(data)
    assert all(a == answers[0] for a in answers)  # an unknown account looks the same
    assert await world.store.find(CATEGORY, account_id=account_id) == before
    assert world.registrar.calls == calls

    # A renewed secret makes the old one stale.
    status, data, _ = await world.call("PATCH", f"/{account_id}", secret, {"new_secret": True})
    assert status == 200
    renewed = data["device_secret"]
    assert (await world.call("GET", f"/{account_id}", secret))[0] == 401
    assert (await world.call("GET", f"/{account_id}", renewed))[0] == 200


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"password": PASSWORD}, "password_refused", "'password'"),
        ({"sip_password": PASSWORD}, "password_refused", "'sip_password'"),
        ({"ha1_md5": HA1_MD5.upper()}, "bad_field", "'ha1_md5'"),
        ({"ha1_md5": HA1_MD5[:-1]}, "bad_field", "'ha1_md5'"),
        ({"ha1_sha256": "zz" * 32}, "bad_field", "'ha1_sha256'"),
        ({"ha1_md5": None, "ha1_sha256": None}, "missing_field", "ha1_md5"),
        ({"registrar": "http://sip.example.com"}, "bad_field", "'registrar'"),
        ({"registrar": "sip:alice@sip.example.com"}, "bad_field", "'registrar'"),
        ({"registrar": "sip:sip.example.com;transport=sctp"}, "bad_field", "'registrar'"),
        ({"registrar": "sips:sip.example.com;transport=udp"}, "bad_field", "'registrar'"),
        ({"registrar": "sip:sip.example.com:70000"}, "bad_field", "'registrar'"),
        ({"user": "alice bob"}, "bad_field", "'user'"),
        ({"realm": 'a"b'}, "bad_field", "'realm'"),
        ({"push": {"provider": "hms", "token": "t", "app_id": "a"}}, "bad_field", "push.provider"),
        ({"push": {"provider": "fcm", "token": "t", "app_id": "a", "x": 1}}, "unknown_field", "x"),
        ({"colour": "blue"}, "unknown_field", "'colour'"),
    ],
)
async def test_bad_input_is_refused_naming_the_field(
    world: World, change: dict[str, Any], error: str, field: str
) -> None:
    status, data, _ = await world.call("POST", "", body=ACCOUNT | change)
    assert (status, data["error"]) == (400, error), data
    assert field in data["detail"]
    assert PASSWORD not in data["detail"]
    assert await world.store.find(CATEGORY) == []


async def test_changes_refused_without_a_trace(world: World) -> None:
    """A password, a user (it names the account), a realm without its HA1s: 400, and
    the account and the registrar are as they were."""
    account_id, secret = await world.create()
    before = await world.store.find(CATEGORY)
    calls = list(world.registrar.calls)
    for change, error in (
        ({"password": PASSWORD}, "password_refused"),
        ({"user": "eve"}, "immutable_field"),
        ({"realm": "other"}, "missing_field"),
        ({"paused": "yes"}, "bad_field"),
        ({"ha1_md5": "00"}, "bad_field"),
    ):
        status, data, _ = await world.call("PATCH", f"/{account_id}", secret, change)
        assert (status, data["error"]) == (400, error), change
    assert [r.fields for r in await world.store.find(CATEGORY)] == [r.fields for r in before]
    assert world.registrar.calls == calls


async def test_disabling_push_deletes_the_account(world: World) -> None:
    account_id, secret = await world.create()
    status, _, _ = await world.call("PATCH", f"/{account_id}", secret, {"push": None})
    assert status == 204
    assert world.registrar.removed == [account_id]
    assert await world.store.find(CATEGORY) == []


async def test_media_type_and_size_are_checked(world: World) -> None:
    status, data, _ = await world.call(
        "POST", "", data=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert (status, data["error"]) == (415, "unsupported_media_type")
    big = ACCOUNT | {"display_name": "x" * 20_000}
    status, data, _ = await world.call("POST", "", body=big)
    assert (status, data["error"]) == (413, "body_too_large")
    status, data, _ = await world.call(
        "POST", "", data=b"[1]", headers={"Content-Type": "application/json"}
    )
    assert (status, data["error"]) == (400, "malformed_body")


async def test_requests_are_limited_per_client_address(
    tmp_path: Path, store_settings: StoreSettings
) -> None:
    async for world in _world(tmp_path, store_settings, RateLimit(per_minute=1, burst=2)):
        account_id, secret = await world.create()
        assert (await world.call("GET", f"/{account_id}", secret))[0] == 200
        status, data, answer = await world.call("GET", f"/{account_id}", secret)
        assert (status, data["error"]) == (429, "rate_limited")
        assert int(answer.headers["Retry-After"]) >= 1


@pytest.mark.parametrize(
    ("uri", "host", "port", "transport"),
    [
        ("sip:sip.example.com", "sip.example.com", 5060, SipTransport.UDP),
        ("sip:SIP.Example.com:5080;transport=TCP", "sip.example.com", 5080, SipTransport.TCP),
        ("sip:192.0.2.1;transport=tls", "192.0.2.1", 5061, SipTransport.TLS),
        ("sips:sip.example.com:5062", "sip.example.com", 5062, SipTransport.TLS),
        ("sip:[2001:db8::1]:5070", "[2001:db8::1]", 5070, SipTransport.UDP),
    ],
)
@pytest.mark.sqlite_only("parses a URI; no store")
def test_registrar_uris(uri: str, host: str, port: int, transport: SipTransport) -> None:
    parsed = parse_registrar(uri)
    assert (parsed.host, parsed.port, parsed.transport) == (host, port, transport)

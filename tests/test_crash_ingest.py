"""Crash ingest with the stock sentry-sdk as the client, over real HTTP on 127.0.0.1.

The SDK sends from its worker thread; `flush` runs off the event loop (the server is on
it), so the test waits for the SDK's own flush, never sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import brotli  # type: ignore[import-untyped]  # the package ships no types
import orjson
import pytest
import sentry_sdk
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from crashreports.service import add_crashreports
from crashreports.settings import CrashSettings, parse_crashreports
from privacy.clock import ManualClock
from privacy.database import StoreSettings
from privacy.keys import load_keyring
from privacy.policy import load_policy
from privacy.store import Record, Store
from softrelay.cli import main as cli_main
from tests.limits import LONGEST_WAIT
from tomlsections.reader import Section
from webapi.errors import refusals
from webapi.ratelimit import LocalLimiters

# Ingest, its group commits and the canary audits run on SQLite and on PostgreSQL.
pytestmark = pytest.mark.both_backends

KEY = "0123456789abcdef0123456789abcdef"
OPT_IN = {"softrelay.opt_in": "yes"}
# The SDK's flush returns once its queue is sent, or after this long: it must not give
# up on a report the server is still scrubbing on a loaded machine (a CI run once read
# the store after 10 s with one of two reports still in flight).
FLUSH_SECONDS = LONGEST_WAIT
STORE_KEY = web.AppKey("test_store", Store)
REGISTRY_KEY = web.AppKey("test_registry", CollectorRegistry)

# Planted personal data: module constants, so no frame's local variables hold the list.
EMAIL = "canary.alice@example.org"
PHONE = "+49 151 23456789"
NATIONAL = "0151 98765432"
SIP_USER = "canarysipuser"
IP4 = "198.51.100.77"
IP6 = "2001:db8:77::15"
PASSWORD = "canary-Pa55word-x"
AUTH_TOKEN = "canary-auth-tok-9911"
HOME_USER = "canaryhome"
WIN_USER = "CanaryWin"
CARD = "4111 1111 1111 1111"
IBAN = "DE89 3704 0044 0532 0130 00"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYW5hcnkifQ.c2lnbmF0dXJlY2FuYXJ5"
APNS = "ab" * 32
MAC = "3c:22:fb:7a:11:c0"
IMEI = "490154203237518"
USER_ID = "canary-user-id-4242"
USERNAME = "canary_username"
SERVER_NAME = "canary-host-7731"
DEVICE_NAME = "Canary Alice's iPhone"
COOKIE = "canary-cookie-value"
BODY = "canary-request-body"
QUERY_SECRET = "canary-query-secret"
BREADCRUMB_SECRET = "canary-crumb-session"
CANARIES = (
    EMAIL,
    PHONE,
    NATIONAL,
    SIP_USER,
    IP4,
    IP6,
    PASSWORD,
    AUTH_TOKEN,
    HOME_USER,
    WIN_USER,
    CARD,
    IBAN,
    JWT,
    APNS,
    MAC,
    IMEI,
    USER_ID,
    USERNAME,
    SERVER_NAME,
    DEVICE_NAME,
    COOKIE,
    BODY,
    QUERY_SECRET,
    BREADCRUMB_SECRET,
)


def settings(**crash: Any) -> CrashSettings:
    """Parsed like the configuration file: one project (1) with the key above."""
    table = {"project": [{"id": "1", "key": KEY}], **crash}
    return parse_crashreports(Section(table, Path("test.toml"), "crashreports"))


@dataclass
class Running:
    url: str
    dsn: str
    app: web.Application
    data_dir: Path

    @property
    def store(self) -> Store:
        return self.app[STORE_KEY]

    def count(self, name: str, **labels: str) -> float:
        return self.app[REGISTRY_KEY].get_sample_value(name, labels) or 0.0


Start = Callable[..., Awaitable[Running]]


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, clock: ManualClock, store: StoreSettings | None = None
) -> AsyncIterator[Start]:
    """Starts crash ingests (each with a real store, on `store`'s backend: SQLite by
    default) on 127.0.0.1; stops them at the end."""
    servers: list[TestServer] = []

    async def factory(crash: CrashSettings | None = None) -> Running:
        data_dir = tmp_path / "var"
        data_dir.mkdir(exist_ok=True)
        app = web.Application(middlewares=[refusals])  # renders the refusals, as in build_app
        app[REGISTRY_KEY] = CollectorRegistry()

        async def store_ctx(app: web.Application) -> AsyncIterator[None]:
            keyring = load_keyring("", data_dir)
            app[STORE_KEY] = await Store.create(
                load_policy("auerproxy"), keyring, data_dir, clock, store or StoreSettings()
            )
            yield
            await app[STORE_KEY].close()

        app.cleanup_ctx.append(store_ctx)
        add_crashreports(
            app,
            crash or settings(),
            clock,
            store=STORE_KEY,
            registry=REGISTRY_KEY,
            limiters=LocalLimiters(clock),
        )
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        url = f"http://127.0.0.1:{server.port}"
        return Running(url, f"http://{KEY}@127.0.0.1:{server.port}/1", app, data_dir)

    yield factory
    for server in servers:
        await server.close()


@pytest.fixture
async def start(
    tmp_path: Path, clock: ManualClock, store_settings: StoreSettings
) -> AsyncIterator[Start]:
    """Starts the crash ingest (with a real store on the test's backend) on 127.0.0.1;
    stops it after the test."""
    async with serving(tmp_path, clock, store_settings) as factory:
        yield factory


@pytest.fixture
async def sdk() -> AsyncIterator[Callable[..., None]]:
    """Initialises the stock SDK against a DSN; closed (and its patches idle) after.

    Closing flushes over HTTP to the server on this loop, so it runs off the loop."""

    def init(dsn: str, **options: Any) -> None:
        sentry_sdk.init(
            dsn=dsn,
            release="com.example.phone@2.4.1",
            environment="test",
            server_name=SERVER_NAME,
            include_local_variables=True,
            **options,
        )

    _clear_scopes()
    yield init
    _clear_scopes()
    client = sentry_sdk.get_client()
    if client.is_active():
        await asyncio.to_thread(client.close, FLUSH_SECONDS)
    sentry_sdk.get_global_scope().set_client(None)


def _event(record: Record) -> dict[str, Any]:
    event = record.fields["event"]
    assert isinstance(event, dict)
    return event


def _clear_scopes() -> None:
    sentry_sdk.get_isolation_scope().clear()
    sentry_sdk.get_current_scope().clear()


async def flush() -> None:
    await asyncio.to_thread(sentry_sdk.flush, FLUSH_SECONDS)


def _fail_with_personal_data(account: dict[str, Any]) -> None:
    password = PASSWORD  # noqa: F841 - a local variable the SDK captures
    user_email = EMAIL  # noqa: F841
    log_path = f"/home/{HOME_USER}/Library/Logs/phone.log"  # noqa: F841
    raise ValueError(
        f"REGISTER for sip:{SIP_USER}@pbx.example.com from {IP4} and [{IP6}] failed; "
        f"mail {EMAIL}, call {PHONE} or {NATIONAL}; card {CARD}; iban {IBAN}; "
        f"token {JWT}; push {APNS}; mac {MAC}; imei {IMEI}; "
        f"see C:\\Users\\{WIN_USER}\\AppData\\phone.log"
    )


def _plant_everything() -> None:
    sentry_sdk.set_user({"id": USER_ID, "email": EMAIL, "username": USERNAME, "ip_address": IP4})
    for name, value in OPT_IN.items():
        sentry_sdk.set_tag(name, value)
    sentry_sdk.set_tag("peer", f"sip:{SIP_USER}@pbx.example.com")
    sentry_sdk.set_extra("account", {"profile": {"auth_token": AUTH_TOKEN, "phone": PHONE}})
    sentry_sdk.set_extra("log_file", f"/Users/{HOME_USER}/Library/phone.log")
    sentry_sdk.set_context(
        "device", {"name": DEVICE_NAME, "model": "iPhone15,2", "family": "iOS", "mac": MAC}
    )
    sentry_sdk.set_context("os", {"name": "iOS", "version": "17.4.1"})
    sentry_sdk.set_context("app", {"app_version": "2.4.1", "push_token": APNS})
    sentry_sdk.add_breadcrumb(
        category="ui.click",
        message=f"tapped call {PHONE} for {EMAIL}",
        data={"url": f"https://api.example.com/v1?x=1&session={QUERY_SECRET}", "ip": IP6},
    )
    sentry_sdk.add_breadcrumb(
        category="http", data={"session": BREADCRUMB_SECRET, "status_code": 401}
    )

    def request(event: Any, hint: Any) -> Any:
        event["request"] = {
            "url": f"https://{EMAIL.split('@')[0]}:{PASSWORD}@api.example.com/login",
            "method": "POST",
            "query_string": f"token={QUERY_SECRET}&lang=de",
            "headers": {
                "Authorization": f"Bearer {AUTH_TOKEN}",
                "X-Forwarded-For": IP4,
                "User-Agent": "Phone/2.4.1",
            },
            "cookies": {"sid": COOKIE},
            "data": {"comment": BODY},
            "env": {"REMOTE_ADDR": IP4},
        }
        return event

    sentry_sdk.get_isolation_scope().add_event_processor(request)


async def test_planted_personal_data_is_absent_from_everything_stored_and_kept_fields_stay(
    start: Start,
    sdk: Callable[..., None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_toml: str,
) -> None:
    # What is asked here is what scrubbing leaves, not how fast: the budget (tested in
    # tests/security/test_crash_scrubbing.py) is raised so that a loaded machine cannot drop one of
    # the two events unstored as over it (seen in full CI runs).
    server = await start(settings(scrub_budget_ms=5000))
    sdk(server.dsn)
    with sentry_sdk.new_scope():
        _plant_everything()
        try:
            _fail_with_personal_data({"contact": EMAIL})
        except ValueError:
            sentry_sdk.capture_exception()
        logging.getLogger("phoneapp").error("login of %s from %s failed", EMAIL, IP4)
    await flush()

    records = await server.store.find("crash_report", project="1")
    outcomes = {
        outcome: server.count("softrelay_crash_events_total", project="1", outcome=outcome)
        for outcome in ("stored", "no_opt_in", "over_budget")
    }
    assert len(records) == 2, outcomes
    stored = orjson.dumps([r.fields for r in records]).decode()
    for canary in CANARIES:
        assert canary not in stored, canary
    event = next(e for e in map(_event, records) if "exception" in e)
    # Kept: device model and OS, app version, frames, breadcrumb categories and times.
    assert event["contexts"]["device"]["model"] == "iPhone15,2"
    assert event["contexts"]["os"] == {"name": "iOS", "version": "17.4.1"}
    assert event["contexts"]["app"]["app_version"] == "2.4.1"
    assert event["release"] == "com.example.phone@2.4.1"
    frames = event["exception"]["values"][-1]["stacktrace"]["frames"]
    frame = frames[-1]
    assert frame["function"] == "_fail_with_personal_data"
    assert frame["module"] == "tests.test_crash_ingest"
    assert isinstance(frame["lineno"], int)
    assert frame["vars"]["password"] == "[filtered]"
    assert frame["vars"]["log_path"] == "'/home/[user]/Library/Logs/phone.log'"
    crumbs = event["breadcrumbs"]["values"]
    assert [c["category"] for c in crumbs] == ["ui.click", "http"]
    assert all(c["timestamp"] for c in crumbs)
    assert crumbs[0]["message"] == "tapped call [phone] for [email]"
    value = event["exception"]["values"][-1]["value"]
    for placeholder in ("sip:[sip-user]@pbx.example.com", "[ip]", "[email]", "[phone]", "[card]"):
        assert placeholder in value
    for placeholder in ("[iban]", "[jwt]", "[apns-token]", "[mac]", "[imei]", "\\Users\\[user]"):
        assert placeholder in value
    # Removed outright.
    assert "user" not in event
    assert "server_name" not in event
    assert "sys.argv" not in event.get("extra", {})
    assert "name" not in event["contexts"]["device"]
    assert "data" not in event["request"]
    assert "cookies" not in event["request"]
    assert event["request"]["headers"]["User-Agent"] == "Phone/2.4.1"
    log_event = next(e for e in map(_event, records) if "exception" not in e)
    assert log_event["logentry"]["params"] == ["[email]", "[ip]"]

    # And nowhere under the data directory: database, WAL, logs, keyring.
    await server.app.shutdown()
    await server.app.cleanup()
    config = tmp_path / "empty.toml"
    config.write_text(store_toml)
    monkeypatch.setenv("SOFTRELAY_CONFIG", str(config))
    args = ["audit", "--now", "2026-03-01T13:00:00Z", "--data-dir", str(server.data_dir)]
    for canary in CANARIES:
        args += ["--canary", canary]
    assert await asyncio.to_thread(cli_main, args) == 0


async def test_a_report_without_opt_in_is_stored_nowhere_and_counted(
    start: Start, sdk: Callable[..., None]
) -> None:
    server = await start()
    sdk(server.dsn)
    with sentry_sdk.new_scope():
        sentry_sdk.capture_message(f"no consent from {EMAIL}")
    await flush()
    assert await server.store.find("crash_report") == []
    assert server.count("softrelay_crash_events_total", project="1", outcome="no_opt_in") == 1


async def test_a_project_whose_dsn_is_the_opt_in_needs_no_tag(
    start: Start, sdk: Callable[..., None]
) -> None:
    server = await start(
        parse_crashreports(
            Section({"project": [{"id": "1", "key": KEY, "opt_in": "dsn"}]}, Path("t"), "c")
        )
    )
    sdk(server.dsn)
    sentry_sdk.capture_message("opted in by its DSN")
    await flush()
    assert len(await server.store.find("crash_report")) == 1


async def test_an_attachment_is_refused_and_nothing_of_its_envelope_is_stored(
    start: Start, sdk: Callable[..., None]
) -> None:
    server = await start()
    sdk(server.dsn)
    with sentry_sdk.new_scope() as scope:
        for name, value in OPT_IN.items():
            scope.set_tag(name, value)
        scope.add_attachment(bytes=EMAIL.encode(), filename="log.txt")
        sentry_sdk.capture_message("with an attachment")
    await flush()
    assert await server.store.find("crash_report") == []
    assert server.count("softrelay_crash_requests_total", outcome="attachment") == 1


async def test_the_sdk_honours_the_rate_limit(start: Start, sdk: Callable[..., None]) -> None:
    server = await start(settings(rate_limit=1))
    sdk(server.dsn)
    with sentry_sdk.new_scope() as scope:
        for name, value in OPT_IN.items():
            scope.set_tag(name, value)
        for i in range(3):
            sentry_sdk.capture_message(f"event {i}")
            await flush()
    assert len(await server.store.find("crash_report")) == 1
    assert server.count("softrelay_crash_requests_total", outcome="accepted") == 1
    # The second got 429; the SDK kept the third to itself.
    assert server.count("softrelay_crash_requests_total", outcome="rate_limited") == 1


async def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


def _auth(key: str = KEY) -> dict[str, str]:
    return {"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={key}"}


def _envelope(event: dict[str, Any]) -> bytes:
    payload = orjson.dumps(event)
    return b"{}\n" + orjson.dumps({"type": "event", "length": len(payload)}) + b"\n" + payload


async def test_a_bad_or_missing_key_is_refused_with_a_reason(start: Start) -> None:
    server = await start()
    body = _envelope({"message": "x", "tags": OPT_IN})
    url = f"{server.url}/api/1/envelope/"
    status, reply = await _post(url, body, {})
    assert (status, reply) == (401, {"detail": "missing sentry_key (X-Sentry-Auth or query)"})
    status, reply = await _post(url, body, _auth("f" * 32))
    assert (status, reply) == (403, {"detail": "unknown project or key"})
    status, _ = await _post(f"{server.url}/api/2/envelope/", body, _auth())
    assert status == 403
    # The key in the query and in Basic auth work as well.
    status, _ = await _post(f"{url}?sentry_key={KEY}", body, {})
    assert status == 200
    basic = {
        "Authorization": "Basic " + __import__("base64").b64encode(f"{KEY}:".encode()).decode()
    }
    status, _ = await _post(url, body, basic)
    assert status == 200
    assert len(await server.store.find("crash_report")) == 2


async def test_a_malformed_envelope_gets_400_with_a_reason(start: Start) -> None:
    server = await start()
    url = f"{server.url}/api/1/envelope/"
    status, reply = await _post(url, b"not json\n", _auth())
    assert (status, reply) == (400, {"detail": "malformed envelope: envelope header is not JSON"})
    status, reply = await _post(url, b'{}\n{"type":"event","length":999}\n{}', _auth())
    assert status == 400
    assert "runs past the end" in reply["detail"]
    status, reply = await _post(url, b'{}\n{"type":"event"}\n[1]\n', _auth())
    assert (status, reply) == (400, {"detail": "malformed event: not a JSON object"})
    assert await server.store.find("crash_report") == []


@pytest.mark.parametrize("encoding", ["gzip", "br"])
async def test_a_compression_bomb_gets_413_and_memory_stays_bounded(
    start: Start, encoding: str
) -> None:
    server = await start(settings(max_body=64 * 1024))
    inflated = b"{}\n" + b" " * (64 * 1024 * 1024)  # 64 MiB once decoded
    body = gzip.compress(inflated) if encoding == "gzip" else brotli.compress(inflated)
    assert len(body) < 1024 * 1024
    tracemalloc.start()
    try:
        status, reply = await _post(
            f"{server.url}/api/1/envelope/", body, {**_auth(), "Content-Encoding": encoding}
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413
    assert reply == {"detail": "body larger than 65536 bytes once decoded"}
    assert peak < 16 * 1024 * 1024


async def test_compressed_envelopes_are_decoded(start: Start) -> None:
    server = await start()
    body = _envelope({"message": "zipped", "tags": OPT_IN})
    url = f"{server.url}/api/1/envelope/"
    for encoding, data in (
        ("gzip", gzip.compress(body)),
        ("br", brotli.compress(body)),
        ("deflate", __import__("zlib").compress(body)),
    ):
        status, _ = await _post(url, data, {**_auth(), "Content-Encoding": encoding})
        assert status == 200, encoding
    status, reply = await _post(url, body, {**_auth(), "Content-Encoding": "compress"})
    assert (status, reply) == (415, {"detail": "unsupported Content-Encoding 'compress'"})
    assert len(await server.store.find("crash_report")) == 3


async def test_an_oversize_body_gets_413(start: Start) -> None:
    server = await start(settings(max_body=4096))
    body = _envelope({"message": "x" * 8000, "tags": OPT_IN})
    status, reply = await _post(f"{server.url}/api/1/envelope/", body, _auth())
    assert (status, reply) == (413, {"detail": "body larger than 4096 bytes"})


async def test_the_old_store_endpoint_takes_json_and_base64_zlib(start: Start) -> None:
    server = await start()
    event = orjson.dumps({"message": f"old client {EMAIL}", "tags": OPT_IN})
    url = f"{server.url}/api/1/store/"
    assert (await _post(url, event, _auth()))[0] == 200
    legacy = __import__("base64").b64encode(__import__("zlib").compress(event))
    assert (await _post(url, legacy, _auth()))[0] == 200
    records = await server.store.find("crash_report")
    assert [_event(r)["message"] for r in records] == ["old client [email]"] * 2


async def test_sessions_and_client_reports_are_accepted_and_counted_not_stored(
    start: Start,
) -> None:
    server = await start()
    body = (
        b'{}\n{"type":"session"}\n{"sid":"x","status":"ok"}\n'
        b'{"type":"client_report"}\n{"discarded_events":[]}\n'
    )
    status, reply = await _post(f"{server.url}/api/1/envelope/", body, _auth())
    assert (status, reply) == (200, {})
    assert server.count("softrelay_crash_items_dropped_total", type="session") == 1
    assert server.count("softrelay_crash_items_dropped_total", type="client_report") == 1
    assert await server.store.find("crash_report") == []


async def test_reports_are_gone_after_90_days(start: Start, clock: ManualClock) -> None:
    server = await start()
    status, _ = await _post(
        f"{server.url}/api/1/envelope/", _envelope({"message": "x", "tags": OPT_IN}), _auth()
    )
    assert status == 200
    clock.advance(90 * 86400 - 1)
    assert len(await server.store.find("crash_report")) == 1
    clock.advance(2)
    assert await server.store.find("crash_report") == []
    deleted = await server.store.delete_expired()
    assert deleted["crash_report"][1] == 1


# Issue 14, point 7: what the scrubber used to store unchanged. Each value is a canary.
FREE_PASSWORD = "hunter2xyzCanary"
PW_VALUE = "canaryPwValue7"
PASSWD_VALUE = "canaryPasswdValue8"
DIGEST_USER = "canarydigestuser"
DIGEST_NONCE = "canaryNonce5f1e"
DIGEST_RESPONSE = "6629fae49393a05397450978507c4ef1"
HA1_32 = "5f4dcc3b5aa765d61d8327deb882cf99"
HA1_64 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
REPR_SECRET = "canaryReprSecret"
JSON_SECRET = "canaryJsonSecret"
QUOTED_NAME = "Canaryquoted Smith"
BARE_NAME = "Canarybare Jones"
PERSON_VALUES = {
    "caller_name": "Canary Caller",
    "display_name": "Canary Display",
    "callee": "Canary Callee",
    "contact": "Canary Contact",
    "first_name": "Canaryfirst",
    "last_name": "Canarylast",
    "full_name": "Canary Fullname",
}
LEAKS = (
    FREE_PASSWORD,
    PW_VALUE,
    PASSWD_VALUE,
    DIGEST_USER,
    DIGEST_NONCE,
    DIGEST_RESPONSE,
    HA1_32,
    HA1_64,
    REPR_SECRET,
    JSON_SECRET,
    QUOTED_NAME,
    BARE_NAME,
    *PERSON_VALUES.values(),
)


def _fail_registering() -> None:
    raise PermissionError(
        f'REGISTER refused: Authorization: Digest username="{DIGEST_USER}", '
        f'realm="pbx.example.com", nonce="{DIGEST_NONCE}", uri="sip:pbx.example.com", '
        f'response="{DIGEST_RESPONSE}", algorithm=MD5; From: "{QUOTED_NAME}" '
        f"<sip:alice@pbx.example.com>; To: {BARE_NAME} <sip:bob@pbx.example.com>"
    )


async def test_credentials_digests_display_names_and_person_keys_are_absent_from_the_store(
    start: Start,
    sdk: Callable[..., None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_toml: str,
) -> None:
    server = await start()
    sdk(server.dsn)
    with sentry_sdk.new_scope():
        for name, value in OPT_IN.items():
            sentry_sdk.set_tag(name, value)
        sentry_sdk.set_extra("call", dict(PERSON_VALUES))
        sentry_sdk.set_extra("account", f"{{'sip_password': '{REPR_SECRET}', 'port': 5060}}")
        sentry_sdk.add_breadcrumb(
            category="provisioning",
            message=f'got {{"password": "{JSON_SECRET}", "ha1": "{HA1_64}"}}',
        )
        sentry_sdk.add_breadcrumb(category="sip", message=f"stored ha1={HA1_32}")
        try:
            _fail_registering()
        except PermissionError:
            sentry_sdk.capture_exception()
        logging.getLogger("phoneapp").error(
            "login with password %s failed (pw=%s, passwd = %s)",
            FREE_PASSWORD,
            PW_VALUE,
            PASSWD_VALUE,
        )
    await flush()

    records = await server.store.find("crash_report", project="1")
    assert len(records) == 2
    stored = orjson.dumps([r.fields for r in records]).decode()
    for leak in LEAKS:
        assert leak not in stored, leak
    event = next(e for e in map(_event, records) if "exception" in e)
    value = event["exception"]["values"][-1]["value"]
    assert "Authorization: Digest [filtered]" in value
    assert 'From: "[name]" <sip:[sip-user]@pbx.example.com>' in value
    assert "To: [name] <sip:[sip-user]@pbx.example.com>" in value
    assert event["extra"]["call"] == dict.fromkeys(PERSON_VALUES, "[filtered]")
    assert event["extra"]["account"] == "{'sip_password': '[filtered]', 'port': 5060}"
    crumbs = [c["message"] for c in event["breadcrumbs"]["values"]]
    assert crumbs == [
        'got {"password": "[filtered]", "ha1": "[filtered]"}',
        "stored ha1=[filtered]",
    ]
    # Useful crash content stays: the frame's function and module, the exception type.
    frame = event["exception"]["values"][-1]["stacktrace"]["frames"][-1]
    assert frame["function"] == "_fail_registering"
    assert frame["module"] == "tests.test_crash_ingest"
    assert event["exception"]["values"][-1]["type"] == "PermissionError"
    log_event = next(e for e in map(_event, records) if "exception" not in e)
    assert log_event["logentry"]["params"] == ["[filtered]", "[filtered]", "[filtered]"]

    # And nowhere under the data directory.
    await server.app.shutdown()
    await server.app.cleanup()
    config = tmp_path / "empty.toml"
    config.write_text(store_toml)
    monkeypatch.setenv("SOFTRELAY_CONFIG", str(config))
    args = ["audit", "--now", "2026-03-01T13:00:00Z", "--data-dir", str(server.data_dir)]
    for leak in LEAKS:
        args += ["--canary", leak]
    assert await asyncio.to_thread(cli_main, args) == 0


def test_a_project_key_may_come_from_a_file_and_is_checked_like_a_literal(
    tmp_path: Path,
) -> None:
    """`key = "file:PATH"` (how `make run` gives the demo project a key of its own) is
    read and stripped; a key in the file that is no DSN key, or a file that is not
    there, stops the start naming the file and the key; a literal key still works."""
    from tomlsections.reader import ConfigError

    def project(key: str) -> CrashSettings:
        return parse_crashreports(
            Section({"project": [{"id": "1", "key": key}]}, Path("s.toml"), "crashreports")
        )

    key_file = tmp_path / "crash.key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    assert project(f"file:{key_file}").projects[0].key == KEY
    assert project(KEY).projects[0].key == KEY
    key_file.write_text("not-a-dsn-key!\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="16 to 64 letters or digits") as bad:
        project(f"file:{key_file}")
    assert bad.value.key == "crashreports.project[0].key"
    with pytest.raises(ConfigError, match="cannot read") as missing:
        project(f"file:{tmp_path / 'absent.key'}")
    assert missing.value.key == "crashreports.project[0].key"

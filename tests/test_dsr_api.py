"""`/dsr/v1/...` over HTTP: a subject proves identity with the digest challenge of their
own PBX (softrelay never sees the password), a wrong credential is refused by the PBX,
repeated failures are rate-limited, the operator acts with the admin token, and
schemathesis finds no server error and no response outside `/openapi.json`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from contacts.settings import ContactsSettings
from crashreports.settings import parse_crashreports
from dsr.api import CLIENT_FAILURE_FACTOR
from dsr.service import DsrSettings
from mockphone import digest
from privacy.clock import ManualClock
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store, Subject
from proxy.oauth.settings import OAuthSettings
from proxy.provisioning.settings import ProvisioningSettings
from proxy.sip.digest import DigestAuthority, DigestError
from proxy.sip.flow import Flow
from proxy.sip.message import Request
from proxy.sip.parser import parse
from proxy.sip.relay import Relay
from proxy.sip.settings import PbxSettings, SipSettings
from push.apps import PushSettings
from sipis.settings import SipisSettings
from softrelay.app import RELAY, STORE, Services, build_app
from tests.schemathesis import run_schemathesis
from tests.sip.test_relay import DOMAIN, PBX_SECRET, SERIAL, _link_pbx, _reply
from tests.sipis.test_accounts import Registered
from tomlsections.reader import Section
from usage.settings import Tenant, UsageSettings
from webapi.openapi import OPENAPI, OpenApi, add_openapi_route
from webapi.ratelimit import RateLimit

PASSWORD = "alice-sip-password-canary-61d0"
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
CRASH_KEY = "crashkeyfortests0123456789"
URL_SERIAL = "pbx-by-url"  # a PBX whose provisioning server the relay reaches by URL
UNLIMITED = RateLimit(per_minute=0)
PBX_REALM = "pbx.example"
ALICE = Subject("alice", SERIAL)
# The whole app's store on SQLite and on PostgreSQL (the `world` fixture's store_settings).
pytestmark = pytest.mark.both_backends


class DigestPbx:
    """The PBX's side of its flow: a registrar that challenges and checks digest
    credentials against the user's password, as a real PBX does."""

    def __init__(self, relay: Relay, flow: Flow, clock: ManualClock) -> None:
        self.relay = relay
        self.flow = flow
        self.clock = clock
        self.authority = DigestAuthority(PBX_REALM)
        self.seen: list[Request] = []

    async def send(self, data: bytes) -> None:
        message = parse(data)
        if not isinstance(message, Request) or message.method != "REGISTER":
            return
        self.seen.append(message)
        user = str(message.to.uri).split(":")[1].split("@")[0]
        auth = message.get("Authorization")
        if auth is None:
            challenge = self.authority.challenge(user, self.clock.now(), algorithm="MD5")
            answer = _reply(message, 401, "Unauthorized", f"WWW-Authenticate: {challenge}")
        else:
            try:
                self.authority.verify(auth, user, PASSWORD, "REGISTER", self.clock.now())
                answer = _reply(message, 200, "OK")
            except DigestError:
                answer = _reply(message, 403, "Forbidden")
        await self.relay.handle(answer, self.flow)

    def close(self) -> None:
        pass


@dataclass
class World:
    base: str
    store: Store
    clock: ManualClock
    pbx: DigestPbx


@pytest.fixture
async def world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_settings: StoreSettings
) -> AsyncIterator[World]:
    """The whole app of `softrelay serve` (`build_app`, embedded push and OAuth
    stand-ins, no SIP listeners) on loopback, with one PBX linked over a fake flow.

    The per-client rate limits are lifted, so a fuzzer reaches past them (the DSR
    failure limit stays: the tests below prove it). A usage tenant and a crash project
    take the admin token and CRASH_KEY, so one set of headers opens every API."""
    monkeypatch.setenv("SOFTRELAY_TEST_ADMIN", ADMIN_TOKEN)
    clock = ManualClock(1_772_366_400.0)  # 2026-03-01
    files = web.Application()
    files.router.add_route("*", "/{path:.*}", provisioning_file)
    files_server = TestServer(files, host="127.0.0.1")
    await files_server.start_server()
    by_url = PbxSettings(URL_SERIAL, "", provisioning_url=str(files_server.make_url("/")))
    crash = parse_crashreports(
        Section(
            {"project": [{"id": "1", "key": CRASH_KEY}], "rate_limit": 100_000},
            tmp_path / "test.toml",
            "crashreports",
        )
    )
    services = Services(
        load_policy("auerproxy"),
        Keyring.generate(),
        tmp_path,
        clock,
        sweep_interval=3600,
        push=PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.t"),
        sip=SipSettings(DOMAIN, (PbxSettings(SERIAL, PBX_SECRET), by_url)),
        crash=crash,
        provisioning=ProvisioningSettings(rate=UNLIMITED),
        oauth=OAuthSettings(rate=UNLIMITED),
        dsr=DsrSettings(admin_token="env:SOFTRELAY_TEST_ADMIN", max_failures=3, failure_window=600),
        usage=UsageSettings(tenants=(Tenant("acme", ADMIN_TOKEN),), ip_burst=100_000),
        store=store_settings,
        # Its registrar engine a double; registrar hosts not resolved (no DNS from a fuzzer).
        sipis=SipisSettings(enabled=True, rate=UNLIMITED, allow_private_registrars=True),
        sipis_registrar=Registered().opened,
        contacts=ContactsSettings(rate=UNLIMITED),
    )
    app = build_app(services)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        relay = app[RELAY]
        flow, _, status = await _link_pbx(relay)
        assert status == 200
        pbx = DigestPbx(relay, flow, clock)
        flow.sender = pbx
        yield World(str(server.make_url("/")), app[STORE], clock, pbx)
    finally:
        await server.close()
        await files_server.close()


async def provisioning_file(request: web.Request) -> web.Response:
    """The provisioning server of the PBX reached by URL: a file for any path."""
    await request.read()
    return web.Response(text="# provisioning file\n", content_type="text/plain")


def _authorization(challenge: dict[str, Any], password: str) -> str:
    """The app's answer (the mock parties' digest, not the relay's it is checked by)."""
    (www,) = [c for c in challenge["www_authenticate"] if "MD5" in c]
    return digest.answer(
        www, username="alice", password=password, method="REGISTER", uri=challenge["uri"]
    ).header


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], **kw: Any
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    async with session.post(url, json=body, **kw) as answer:
        return answer.status, await answer.json(), answer


SUBJECT = {"sip_username": "alice", "pbx_serial": SERIAL}


async def _prove(session: aiohttp.ClientSession, base: str, password: str) -> dict[str, Any]:
    status, challenge, _ = await _post(session, f"{base}dsr/v1/challenge", SUBJECT)
    assert status == 200, challenge
    return {
        "challenge_id": challenge["challenge_id"],
        "authorization": _authorization(challenge, password),
    }


async def test_subject_proves_identity_through_the_pbx_and_gets_the_export(world: World) -> None:
    await world.store.put(
        "registration",
        {
            "pbx_serial": SERIAL,
            "sip_username": "alice",
            "instance": "urn:uuid:1",
            "push_token": "tok-alice-1",
        },
    )
    async with aiohttp.ClientSession() as session:
        proof = await _prove(session, world.base, PASSWORD)
        status, export, _ = await _post(session, f"{world.base}dsr/v1/export", SUBJECT | proof)
        assert status == 200, export
        (registration,) = [c for c in export["categories"] if c["category"] == "registration"]
        assert registration["records"][0]["fields"]["push_token"] == "tok-alice-1"
        # The proof is used once.
        status, _, _ = await _post(session, f"{world.base}dsr/v1/export", SUBJECT | proof)
        assert status == 403
    # What the PBX saw: a fetch (no Contact), then the subject's own credentials.
    first, second = world.pbx.seen
    assert not first.contacts
    assert first.get("Authorization") is None
    assert second.get("Authorization") is not None
    (entry, *_) = await world.store.backend.requests(10)
    assert (entry.type, entry.actor, entry.outcome) == ("export", "unproved", "refused")


async def test_wrong_password_is_refused_by_the_pbx_and_failures_are_rate_limited(
    world: World,
) -> None:
    url = f"{world.base}dsr/v1/erase"
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            proof = await _prove(session, world.base, "not-the-password")
            status, body, _ = await _post(session, url, SUBJECT | proof)
            assert (status, body["error"]) == (403, "not_proved")
            assert body["detail"] == "the PBX refused the credentials"
        # Limited now, even with the right password: the PBX is not even asked.
        status, body, answer = await _post(session, f"{world.base}dsr/v1/challenge", SUBJECT)
        assert status == 429
        assert 0 < int(answer.headers["Retry-After"]) <= 600
        world.clock.advance(601)
        proof = await _prove(session, world.base, PASSWORD)
        status, receipt, _ = await _post(session, url, SUBJECT | proof)
        assert status == 200
        assert receipt["type"] == "erase"


def _from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from `address` (any 127.x.y.z reaches the app)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def _fail_proof(session: aiohttp.ClientSession, base: str, user: str) -> int:
    """One wrong-password attempt for `user`; the status it ends with (403, or 429)."""
    subject = {"sip_username": user, "pbx_serial": SERIAL}
    status, challenge, _ = await _post(session, f"{base}dsr/v1/challenge", subject)
    if status != 200:
        return status
    proof = {
        "challenge_id": challenge["challenge_id"],
        "authorization": _authorization(challenge, "not-the-password"),
    }
    status, _, _ = await _post(session, f"{base}dsr/v1/erase", subject | proof)
    return status


async def test_a_strangers_failed_proofs_do_not_lock_the_subject_out(world: World) -> None:
    """Failures count per client and subject: a stranger at another address who sends
    bogus proofs for alice is stopped, and alice herself still proves and acts."""
    async with _from("127.0.0.3") as stranger:
        assert [await _fail_proof(stranger, world.base, "alice") for _ in range(4)] == [
            403,
            403,
            403,
            429,
        ]
    async with _from("127.0.0.2") as alice:
        proof = await _prove(alice, world.base, PASSWORD)
        status, receipt, _ = await _post(alice, f"{world.base}dsr/v1/restrict", SUBJECT | proof)
        assert (status, receipt["type"]) == (200, "restrict")


async def test_one_client_is_stopped_across_subjects(world: World) -> None:
    """Per client, failures add up over every subject (max_failures 3, times
    CLIENT_FAILURE_FACTOR): a client that moves from user to user gets no more guesses."""
    users = [f"user{i}" for i in range(CLIENT_FAILURE_FACTOR)]
    async with _from("127.0.0.4") as client:
        for user in users:
            assert [await _fail_proof(client, world.base, user) for _ in range(3)] == [403] * 3
        # A fresh subject, but this client spent its budget.
        status, body, answer = await _post(
            client, f"{world.base}dsr/v1/challenge", {"sip_username": "fresh", "pbx_serial": SERIAL}
        )
        assert (status, body["error"]) == (429, "rate_limited")
        assert int(answer.headers["Retry-After"]) > 0
    async with _from("127.0.0.5") as other:  # another client is not affected
        assert await _fail_proof(other, world.base, "fresh") == 403


async def test_operator_acts_with_the_admin_token_and_a_wrong_token_is_refused(
    world: World,
) -> None:
    url = f"{world.base}dsr/v1/restrict"
    async with aiohttp.ClientSession() as session:
        bad = {"Authorization": "Bearer not-the-token"}
        status, body, _ = await _post(session, url, SUBJECT, headers=bad)
        assert status == 403
        assert not await world.store.is_restricted(ALICE)
        good = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        status, body, _ = await _post(session, url, SUBJECT, headers=good)
        assert (status, body["restricted"], body["changed"]) == (200, True, True)
        assert await world.store.is_restricted(ALICE)
        # A restricted subject can still prove identity (a fetch changes nothing) and lift it.
        proof = await _prove(session, world.base, PASSWORD)
        status, body, _ = await _post(session, f"{world.base}dsr/v1/unrestrict", SUBJECT | proof)
        assert status == 200
        assert not await world.store.is_restricted(ALICE)
        async with session.get(f"{world.base}dsr/v1/requests", headers=good) as answer:
            trail = (await answer.json())["requests"]
        assert [e["type"] for e in trail][:2] == ["unrestrict", "restrict"]


async def test_bad_input_gets_a_json_reason(world: World) -> None:
    async with aiohttp.ClientSession() as session:
        bodies: list[object] = [{"sip_username": "a\r\nVia: x", "pbx_serial": SERIAL}, {"x": 1}, []]
        for body in bodies:
            async with session.post(f"{world.base}dsr/v1/challenge", json=body) as answer:
                assert answer.status == 400
                assert "error" in await answer.json()
        async with session.post(f"{world.base}dsr/v1/export", data=b"{") as answer:
            assert answer.status == 400


async def test_openapi_document_describes_the_dsr_and_core_routes(world: World) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{world.base}openapi.json") as answer,
    ):
        document = await answer.json()
    assert document["openapi"].startswith("3.1")
    for path in ("/dsr/v1/export", "/dsr/v1/erase", "/dsr/v1/challenge", "/healthz"):
        assert path in document["paths"], path


# Values a fuzzer cannot guess, so it reaches past "who are you" into each handler:
# the crash project, the usage tenant and month (the clock's), the PBX reached by URL,
# a subject at the linked PBX. Every other field is still generated, valid and invalid.
SCHEMATHESIS_CONFIG = f"""
[[operations]]
include-path-regex = "^/api/"
parameters = {{ "path.project" = "1" }}

[[operations]]
include-path = "/usage/v1/ping"
parameters = {{ "body.tenant" = "acme", "body.period" = "2026-03" }}

[[operations]]
include-path = "/provisioning/{{serial}}/{{path}}"
parameters = {{ "path.serial" = "{URL_SERIAL}" }}

[[operations]]
include-path-regex = "^/dsr/v1/"
parameters = {{ "body.sip_username" = "alice", "body.pbx_serial" = "{SERIAL}" }}

[[operations]]
include-path-regex = "^/contacts/v1/(challenge|devices)$"
parameters = {{ "body.sip_username" = "alice", "body.pbx_serial" = "{SERIAL}" }}
"""


async def schemathesis(base: str, config_dir: Path) -> tuple[int, str]:
    """The whole app's operations (about 900 requests, under 15 s)."""
    return await run_schemathesis(
        f"{base}openapi.json",
        SCHEMATHESIS_CONFIG,
        config_dir,
        {
            "Authorization": f"Bearer {ADMIN_TOKEN}",
            "X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={CRASH_KEY}",
        },
    )


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    world: World, tmp_path: Path
) -> None:
    """Every operation of the whole app's /openapi.json (DSR, usage, crash ingest,
    SIPIS accounts, contacts, provisioning, OAuth, the WebSocket upgrades, health and metrics),
    fuzzed: no 5xx, no status, Content-Type or body the document does not describe."""
    returncode, output = await schemathesis(world.base, tmp_path)
    assert returncode == 0, output[-6000:]
    assert "Operations:       39 selected / 39 total" in output, output[:2000]


async def test_schemathesis_run_fails_on_a_server_error_and_an_undocumented_answer(
    tmp_path: Path,
) -> None:
    """The run above can fail: the same invocation against an app whose /healthz
    answers 500 and whose /metrics answers JSON where text is documented."""

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=500)

    async def json_metrics(request: web.Request) -> web.Response:
        return web.json_response({"not": "prometheus"})

    app = web.Application()
    app[OPENAPI] = OpenApi("softrelay", "1")
    add_openapi_route(app)
    app.router.add_get("/healthz", broken)
    app.router.add_get("/metrics", json_metrics)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        returncode, output = await schemathesis(str(server.make_url("/")), tmp_path)
    finally:
        await server.close()
    assert returncode != 0
    assert "Server error" in output, output[-3000:]
    assert "Undocumented Content-Type" in output, output[-3000:]

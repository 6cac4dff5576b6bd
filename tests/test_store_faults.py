"""PostgreSQL stopped under a running softrelay, and started again (issue 16, Faults).

End to end: a real `softrelay serve` on a real PostgreSQL that the test stops and
starts (tests/pgserver.py). While it is down, a phone's REGISTER gets 503 with
Retry-After before the PBX sees it, a usage ping 503 JSON, a crash report 503 in
Sentry's shape, and nothing of them is stored; a call over the PBX flow linked before
reaches the phone registered before; /healthz says the store is unavailable. Once it
is back, without a restart: /healthz is healthy, the next REGISTER is accepted, and
what was stored before the outage is all there.

In process, each piece on its own: the backend notes an outage and its end (a refused
connect, a hung server within the acquire bound, a statement timeout that is no
outage); the restriction marks are not trusted while it lasts (fail closed); a batch
that cannot be stored fails every caller in one go; a sleeping phone is not woken; a
new PBX link is refused while the one in place stays; the HTTP mapping in each API's
shape.

Every wait is bounded; /healthz is polled in a bounded loop, nothing sleeps.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from privacy import postgres
from privacy.backend import RETRY_AFTER, StorageUnavailable
from privacy.batches import Batches
from privacy.clock import ManualClock, SystemClock
from privacy.database import StoreSettings
from privacy.keys import Keyring, load_keyring
from privacy.logs import setup_logging
from privacy.policy import load_policy
from privacy.postgres import PostgresBackend
from privacy.store import Store, Subject, Writable
from proxy.sip.flow import Transport
from proxy.sip.relay import Relay
from proxy.sip.settings import PbxSettings, SipSettings
from push.apps import PushSettings
from softrelay.app import REGISTRY, RELAY, SERVICES, STAND_INS, STORE, Services, build_app
from tests import peers
from tests.conftest import DSN_ENV
from tests.limits import LONGEST_WAIT
from tests.pgserver import PostgresServer
from tests.sip import test_relay as sip
from tests.sip.test_wake import APP_ID, TOKEN, Wire, World, _invite, _register
from tests.sip.test_wake_e2e import CallingPbx, TcpPhone
from usage.period import period_of
from webapi.errors import OAuthRefusal, SentryRefusal, refusals, speaks

POLICY = load_policy("auerproxy")
USAGE_KEY = f"usage-key-{secrets.token_hex(8)}"
CRASH_KEY = "0123456789abcdef0123456789abcdef"
RETRY = str(int(RETRY_AFTER))


# --- end to end: `softrelay serve` ------------------------------------------------------


def _serve_config() -> str:
    """The tables `serve` gets besides its PBX: the store on PostgreSQL (the DSN from
    the environment, as deployed), a usage tenant and a crash project."""
    return (
        f'[store]\nbackend = "postgresql"\ndsn = "env:{DSN_ENV}"\n\n'
        f"[usage]\n[[usage.tenant]]\nid = 'acme'\nkey = 'env:FAULT_USAGE_KEY'\n\n"
        f'[[crashreports.project]]\nid = "1"\nkey = "{CRASH_KEY}"\n'
    )


async def _healthz(session: aiohttp.ClientSession, base: str) -> tuple[int, Any]:
    async with session.get(f"{base}/healthz") as answer:
        return answer.status, await answer.json()


async def _health_becomes(session: aiohttp.ClientSession, base: str, status: int) -> Any:
    """Poll /healthz until it answers `status` (bounded: LONGEST_WAIT); its body."""
    async with asyncio.timeout(LONGEST_WAIT):
        while True:
            got, body = await _healthz(session, base)
            if got == status:
                return body


async def _ping(
    session: aiohttp.ClientSession, base: str, pid: str
) -> tuple[int, dict[str, str], Any]:
    body = {
        "tenant": "acme",
        "period": period_of(time.time()),
        "pid": pid,
        "platform": "ios",
        "app_version": "1.0",
    }
    headers = {"Authorization": f"Bearer {USAGE_KEY}"}
    async with session.post(f"{base}/usage/v1/ping", json=body, headers=headers) as answer:
        return answer.status, dict(answer.headers), await answer.json()


async def _crash_report(
    session: aiohttp.ClientSession, base: str, event_id: str
) -> tuple[int, dict[str, str], Any]:
    """What a stock Sentry SDK sends: an envelope with one event, the user opted in."""
    event = {
        "event_id": event_id,
        "platform": "python",
        "level": "error",
        "message": "crashed",
        "tags": {"softrelay.opt_in": "yes"},
    }
    payload = orjson.dumps(event)
    body = b"{}\n" + orjson.dumps({"type": "event", "length": len(payload)}) + b"\n" + payload
    auth = f"Sentry sentry_key={CRASH_KEY}, sentry_version=7, sentry_client=sentry.python/2.0"
    async with session.post(
        f"{base}/api/1/envelope/", data=body, headers={"X-Sentry-Auth": auth}
    ) as answer:
        return answer.status, dict(answer.headers), await answer.json()


async def _call_connects(pbx: CallingPbx, phone: TcpPhone, contact: Any, path: Any) -> None:
    """The PBX calls the registered phone along its Path: 180, 200, ACK, BYE and its 200."""

    async def caller() -> None:
        dialog = await pbx.invite(contact, path, f"fault-call-{secrets.token_hex(4)}")
        assert (await pbx.provisional()).status == 180, pbx.last()
        answer = await pbx.response("INVITE", 200)
        assert (await pbx.hang_up(answer, dialog)).status == 200, pbx.last()

    async with asyncio.TaskGroup() as group:
        group.create_task(caller())
        group.create_task(phone.take_call())


async def test_serve_rides_out_a_stopped_database_and_resumes_without_a_restart(
    tmp_path: Path,
    postgres_server: PostgresServer,
    postgres_store_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(DSN_ENV, postgres_store_dsn)
    monkeypatch.setenv("FAULT_USAGE_KEY", USAGE_KEY)
    server = await peers.start_server(tmp_path, _serve_config())
    base = f"http://127.0.0.1:{server.http_port()}"
    before, during = uuid.uuid4().hex, uuid.uuid4().hex
    pid_before, pid_during = secrets.token_hex(16), secrets.token_hex(16)
    pbx = await CallingPbx.connect(server.ports["tcp"])
    phone = await TcpPhone.connect(server.ports["tcp"])
    try:
        assert await pbx.link(server.secret) == 200, server.log()
        async with asyncio.TaskGroup() as group:
            group.create_task(phone.register(None))
            accepted = group.create_task(pbx.accept_register(None))
        _, contact, path = accepted.result()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(LONGEST_WAIT)) as http:
            assert (await _healthz(http, base))[0] == 200
            assert (await _ping(http, base, pid_before))[0] == 202
            assert (await _crash_report(http, base, before))[0] == 200

            postgres_server.stop()
            health = await _health_becomes(http, base, 503)
            assert health == {
                "status": "degraded",
                "dependencies": {"store": {"status": "unavailable", "backend": "postgresql"}},
            }

            # The phone's refresh: 503 with Retry-After from the relay, not the PBX's
            # (the next thing the PBX receives is the call below, not this REGISTER).
            refused, _ = await phone.digest_register("alice", peers.PHONE_DOMAIN, None, tag="r")
            assert refused.status == 503, phone.last()
            assert refused.get("Retry-After") == RETRY, phone.last()

            status, headers, body = await _ping(http, base, pid_during)
            assert (status, headers.get("Retry-After"), body["error"]) == (
                503,
                RETRY,
                "storage_unavailable",
            )
            status, headers, body = await _crash_report(http, base, during)
            assert (status, headers.get("Retry-After"), list(body)) == (503, RETRY, ["detail"])

            # Relaying over what was linked before goes on: the call connects.
            await _call_connects(pbx, phone, contact, path)

            postgres_server.start()
            health = await _health_becomes(http, base, 200)
            assert health["dependencies"]["store"]["status"] == "ok"
            async with asyncio.TaskGroup() as group:
                group.create_task(phone.register(None))
                group.create_task(pbx.accept_register(None))
            assert (await _ping(http, base, pid_during))[0] == 202
    except BaseException:
        print("\n".join(pbx.transcript[-10:]))
        print("\n".join(phone.transcript[-6:]))
        print(server.log())
        raise
    finally:
        await phone.close()
        await pbx.close()
    assert await server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()

    # What was stored before the outage is there; of what came during it, only the ping
    # sent again afterwards.
    settings = StoreSettings(backend="postgresql", dsn=postgres_store_dsn)
    keyring = load_keyring("", server.data_dir)
    store = await Store.create(POLICY, keyring, server.data_dir, SystemClock(), settings)
    try:
        (binding,) = await store.find("registration", sip_username="alice")
        assert binding.fields["phone_ip"] == peers.PHONE_IP
        assert len(await store.find("pbx_link", pbx_serial=peers.SERIAL)) == 1
        reports = await store.find("crash_report", project="1")
        assert [r.fields["event_id"] for r in reports] == [before]
        assert len(await store.find("usage", tenant="acme")) == 2
    finally:
        await store.close()


# --- in process: the backend ------------------------------------------------------------


@pytest.fixture
def pg_settings(postgres_store_dsn: str) -> StoreSettings:
    return StoreSettings(backend="postgresql", dsn=postgres_store_dsn)


@pytest.fixture
async def pg_store(
    pg_settings: StoreSettings, tmp_path: Path, clock: ManualClock, postgres_server: PostgresServer
) -> AsyncIterator[Store]:
    store = await Store.create(POLICY, Keyring.generate(), tmp_path, clock, pg_settings)
    try:
        yield store
    finally:
        postgres_server.start()  # a test that stopped it leaves it running
        await store.close()


REGISTRATION: dict[str, Writable] = {
    "pbx_serial": "0042137",
    "sip_username": "alice",
    "instance": "",
    "phone_ip": "198.51.100.23",
    "phone_port": 40001,
    "expires_at": 1_900_000_000,
}


async def test_an_outage_is_noted_by_the_call_that_meets_it_and_ended_by_the_next_that_works(
    pg_store: Store, postgres_server: PostgresServer
) -> None:
    await pg_store.put("registration", REGISTRATION)
    assert pg_store.outage is None
    await pg_store.ping()
    postgres_server.stop()
    with pytest.raises(StorageUnavailable) as lost:
        await pg_store.find("registration", sip_username="alice")
    assert lost.value.retry_after == RETRY_AFTER
    assert isinstance(pg_store.outage, StorageUnavailable)
    with pytest.raises(StorageUnavailable):
        await pg_store.ping()
    postgres_server.start()
    await pg_store.ping()  # the pool connects anew: no reopening
    assert pg_store.outage is None
    assert len(await pg_store.find("registration", sip_username="alice")) == 1


async def test_a_hung_server_is_unavailable_within_the_acquire_bound(
    pg_store: Store, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The postmaster stopped (SIGSTOP): connects are accepted by the kernel and never
    answered. A call needing a new connection gives StorageUnavailable once the acquire
    bound has passed, not a caller stalled."""
    monkeypatch.setattr(postgres, "ACQUIRE_TIMEOUT", 0.5)
    backend = pg_store.backend
    assert isinstance(backend, PostgresBackend)
    pid = int((postgres_server.data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        await backend._pool.expire_connections()  # each call now connects anew
        async with asyncio.timeout(LONGEST_WAIT):
            with pytest.raises(StorageUnavailable) as hung:
                await pg_store.ping()
        assert "timed out" in str(hung.value)
        assert pg_store.outage is not None
    finally:
        os.kill(pid, signal.SIGCONT)
    await pg_store.ping()
    assert pg_store.outage is None


async def test_a_statement_timeout_fails_the_call_but_is_no_outage(
    postgres_store_dsn: str, tmp_path: Path, clock: ManualClock
) -> None:
    settings = StoreSettings(backend="postgresql", dsn=postgres_store_dsn, statement_timeout=1.0)
    backend = await PostgresBackend.create(settings, [])
    try:
        with pytest.raises(StorageUnavailable) as busy:
            async with backend._connection() as conn:
                await conn.execute("SELECT pg_sleep(5)")  # cancelled by the server at 1 s
        assert "57014" in str(busy.value)
        assert backend.outage is None
        await backend.ping()  # the same pool, unharmed
    finally:
        await backend.close()


async def test_restriction_marks_are_not_trusted_while_the_database_is_unreachable(
    pg_store: Store, postgres_server: PostgresServer
) -> None:
    """Fail closed: the marks read a moment ago (fresh by the clock, which does not
    move here) are not used once an outage is known; another process may have set
    one. Back, they are read again."""
    alice = Subject("alice", "0042137")
    assert not await pg_store.is_restricted(alice)
    postgres_server.stop()
    with pytest.raises(StorageUnavailable):
        await pg_store.ping()
    with pytest.raises(StorageUnavailable):
        await pg_store.is_restricted(alice)
    postgres_server.start()
    assert not await pg_store.is_restricted(alice)


class CountingStore(Store):
    """The store, counting the batched writes it is asked for (our own seam)."""

    batches = 0

    async def put_many(self, category: str, records: Sequence[Mapping[str, Writable]]) -> None:
        self.batches += 1
        await super().put_many(category, records)


async def test_a_batch_that_cannot_be_stored_fails_every_caller_at_once(
    pg_settings: StoreSettings,
    tmp_path: Path,
    clock: ManualClock,
    postgres_server: PostgresServer,
) -> None:
    store = await CountingStore.create(POLICY, Keyring.generate(), tmp_path, clock, pg_settings)
    assert isinstance(store, CountingStore)
    try:
        batches = Batches(store, "usage")
        rows = [{"tenant": "acme", "period": "2026-03", "pid": f"{i:032x}"} for i in range(3)]
        postgres_server.stop()
        results = await asyncio.gather(
            *(batches.write(row) for row in rows), return_exceptions=True
        )
        assert [type(r) for r in results] == [StorageUnavailable] * 3
        assert store.batches == 1, "one transaction tried, not again row by row"
        postgres_server.start()
        assert await store.find("usage", tenant="acme") == []
        await batches.write(rows[0])
        assert len(await store.find("usage", tenant="acme")) == 1
    finally:
        postgres_server.start()
        await store.close()


# --- in process: the relay --------------------------------------------------------------


@pytest.fixture
async def pg_app(
    tmp_path: Path, pg_settings: StoreSettings, postgres_server: PostgresServer
) -> AsyncIterator[web.Application]:
    """`serve`'s app on the PostgreSQL store, with the push stand-ins, no listeners."""
    clock = ManualClock(time.time())  # the stand-ins check provider tokens against it
    logs = setup_logging(POLICY, tmp_path, clock)
    sip_settings = SipSettings(sip.DOMAIN, (PbxSettings(sip.SERIAL, sip.PBX_SECRET),))
    push = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id=APP_ID)
    services = Services(
        POLICY, Keyring.generate(), tmp_path, clock, 3600, push, sip_settings, store=pg_settings
    )
    app = build_app(services)
    server = TestServer(app)
    await server.start_server()
    try:
        yield app
    finally:
        postgres_server.start()
        await server.close()
        logs.close()


def _phone_register(cseq: int, contact: str | None) -> bytes:
    return sip._request(
        "REGISTER",
        f"sip:{sip.SERIAL}.{sip.DOMAIN}",
        f"Via: SIP/2.0/TCP 10.0.0.5:5062;branch=z9hG4bKfault{cseq}",
        f"From: <sip:alice@{sip.SERIAL}.{sip.DOMAIN}>;tag=f{cseq}",
        f"To: <sip:alice@{sip.SERIAL}.{sip.DOMAIN}>",
        "Call-ID: fault-reg",
        f"CSeq: {cseq} REGISTER",
        "Max-Forwards: 70",
        *([f"Contact: {contact}"] if contact else []),
        "Expires: 600",
    )


async def test_a_register_that_needs_the_store_gets_503_before_the_pbx_sees_it(
    pg_app: web.Application, postgres_server: PostgresServer
) -> None:
    relay: Relay = pg_app[RELAY]
    pbx, pbx_wire, status = await sip._link_pbx(relay)
    assert status == 200
    postgres_server.stop()
    with pytest.raises(StorageUnavailable):
        await pg_app[STORE].ping()
    phone, phone_wire = sip._flow(Transport.TCP, ("198.51.100.23", 40001))
    contact = "<sip:alice@10.0.0.5:5062;transport=tcp>"
    forwarded = len(pbx_wire.raw)
    await relay.handle(_phone_register(1, contact), phone)
    refused = phone_wire.response()
    assert (refused.status, refused.get("Retry-After")) == (503, RETRY)
    assert len(pbx_wire.raw) == forwarded, "nothing went to the PBX"
    # A fetch of the bindings stores nothing: it goes on to the PBX.
    await relay.handle(_phone_register(2, None), phone)
    assert pbx_wire.request().method == "REGISTER"
    postgres_server.start()
    await relay.handle(_phone_register(3, contact), phone)
    register = pbx_wire.request()
    assert register.cseq.number == 3
    await relay.handle(sip._reply(register, 200, "OK"), pbx)
    assert phone_wire.response().status == 200
    await relay.drain()
    assert len(await pg_app[STORE].find("registration", sip_username="alice")) == 1


async def test_a_new_pbx_link_is_refused_and_the_link_in_place_stays(
    pg_app: web.Application, postgres_server: PostgresServer
) -> None:
    relay: Relay = pg_app[RELAY]
    linked, linked_wire, status = await sip._link_pbx(relay)
    assert status == 200
    postgres_server.stop()
    with pytest.raises(StorageUnavailable):
        await pg_app[STORE].ping()
    newcomer, wire, status = await sip._link_pbx(relay)
    assert status == 503
    assert wire.response().get("Retry-After") == RETRY
    assert relay.pbx_flow(sip.SERIAL) is linked
    assert newcomer is not linked
    # The linked PBX's refresh is answered: its record is stored, calls go on over it.
    clock = pg_app[SERVICES].clock
    assert isinstance(clock, ManualClock)
    clock.advance(1)  # a challenge of its own: the nonce is made of the time and the flow
    await relay.handle(sip._pbx_register(), linked)
    auth = sip._pbx_answer(linked_wire.response().get("WWW-Authenticate") or "")
    await relay.handle(sip._pbx_register(auth), linked)
    assert linked_wire.response().status == 200
    assert relay.pbx_flow(sip.SERIAL) is linked


async def test_a_sleeping_phone_is_not_woken_while_the_store_is_down(
    pg_app: web.Application, postgres_server: PostgresServer
) -> None:
    """Fail closed: the marks cannot rule out a restriction, so no push; the caller gets
    503 with Retry-After at once. Back, the next call wakes the phone."""
    relay: Relay = pg_app[RELAY]
    pbx, _, status = await sip._link_pbx(relay)
    assert status == 200
    pbx_wire = Wire()
    pbx.sender = pbx_wire
    services = pg_app[SERVICES]
    assert isinstance(services.clock, ManualClock)
    world = World(
        relay, pg_app[STORE], pg_app[STAND_INS], services.clock, services.data_dir, pg_app[REGISTRY]
    )
    phone, _, register = await _register(world, pbx, pbx_wire, cseq=1)
    phone.close()  # asleep
    postgres_server.stop()
    await relay.handle(_invite(register, "call-down"), pbx)
    refused = await pbx_wire.response(503)
    assert refused.get("Retry-After") == RETRY
    assert "store unavailable" in (refused.get("Reason") or "")
    stand_ins = pg_app[STAND_INS]
    assert stand_ins.deliveries.for_token(TOKEN) == []
    postgres_server.start()
    await relay.handle(_invite(register, "call-up"), pbx)
    ringing = await pbx_wire.response(180)
    assert ringing.get("Push-Status") == "delivered"
    assert len(stand_ins.deliveries.for_token(TOKEN)) == 1


# --- in process: the HTTP mapping ---------------------------------------------------------


async def _down(request: web.Request) -> web.Response:
    raise StorageUnavailable("database at db.internal:5432/softrelay unavailable: refused")


def _mapped() -> web.Application:
    """An app whose routes, one per API shape, meet an unreachable store."""
    app = web.Application(middlewares=[refusals])
    speaks(app, "/api/", SentryRefusal)
    speaks(app, "/oauth/", OAuthRefusal)
    for path in ("/usage/v1/ping", "/api/1/envelope/", "/oauth/x/token"):
        app.router.add_post(path, _down)
    return app


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/usage/v1/ping",
            {
                "error": "storage_unavailable",
                "detail": "the data store is unavailable; nothing was stored; retry later",
            },
        ),
        (
            "/api/1/envelope/",
            {"detail": "the data store is unavailable; nothing was stored; retry later"},
        ),
        (
            "/oauth/x/token",
            {
                "error": "temporarily_unavailable",
                "error_description": (
                    "the data store is unavailable; nothing was stored; retry later"
                ),
            },
        ),
    ],
)
async def test_storage_unavailable_is_503_with_retry_after_in_each_apis_shape(
    path: str, body: dict[str, str]
) -> None:
    async with TestClient(TestServer(_mapped())) as client, client.post(path) as answer:
        assert answer.status == 503
        assert answer.headers["Retry-After"] == RETRY
        text = await answer.text()
    assert orjson.loads(text) == body
    assert "db.internal" not in text, "the database's host is not told"

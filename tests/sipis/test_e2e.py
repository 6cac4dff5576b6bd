"""SIPIS mode end to end: the whole app (`build_app`, `[sipis]` enabled, the real
registrar engine) against a real Kamailio with HA1-only rows. An app POSTs its account
and its status becomes `registered`; a caller through Kamailio reaches it; PATCH paused
un-registers (the caller gets 480) and says paused, resume registers again; DELETE
un-registers; /metrics counts accounts by state; after a restart of the app the stored
account registers again (a small start spread).

The app's clock is the system clock here (the engine's timers are real): each wait is
on the engine's status change or an answer, bounded, never a sleep. The registrar host
checks (point 4 of issue 18) are here too: loopback, private, link-local and
unspecified registrars are refused unless `allow_private_registrars`, and a push target
must name a configured app.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aiohttp.web import Application

from privacy.clock import SystemClock
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import load_policy
from push.apps import PushSettings
from sipis.account import State, Status
from sipis.api import REGISTRAR, internal_address
from sipis.registrar import Registrations
from sipis.settings import SipisSettings
from softrelay.app import Services, build_app
from tests.kamailio import DOMAIN, Kamailio, Subscriber
from tests.limits import LONGEST_WAIT
from tests.sipis.provider import running_kamailio
from tests.sipis.test_registrar_kamailio import ALICE, ask, registers_logged
from tests.sipis.test_stale_bindings import register_as, users
from webapi.ratelimit import RateLimit

WAIT = LONGEST_WAIT / 3
APP_ID = "com.example.sipis"
TOKEN = "fcm-token-e2e-5b1c"


@pytest.fixture
def kamailio() -> Iterator[Kamailio]:
    with running_kamailio([ALICE]) as server:
        yield server


def body_for(kamailio: Kamailio, sub: Subscriber = ALICE, **changes: Any) -> dict[str, Any]:
    return {
        "registrar": f"sip:127.0.0.1:{kamailio.port};transport=udp",
        "domain": DOMAIN,
        "user": sub.user,
        "realm": DOMAIN,
        "ha1_md5": sub.ha1(),
        "push": {"provider": "fcm", "token": TOKEN, "app_id": APP_ID},
    } | changes


@dataclass
class Running:
    app: Application
    session: aiohttp.ClientSession
    base: str

    @property
    def engine(self) -> Registrations:
        registrar = self.app[REGISTRAR]
        assert isinstance(registrar, Registrations)  # the real engine, not a double
        return registrar

    async def call(
        self, method: str, path: str = "", secret: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        url = f"{self.base}sipis/v1/accounts{path}"
        async with self.session.request(method, url, json=body, headers=headers) as answer:
            text = await answer.text()
            return answer.status, (await answer.json() if text else None)

    async def create(
        self, kamailio: Kamailio, sub: Subscriber = ALICE, *, registered: bool = True
    ) -> tuple[str, str]:
        """The account of `sub` POSTed (201), registered at Kamailio unless `registered`
        is False: its id and device secret."""
        status, created = await self.call("POST", body=body_for(kamailio, sub))
        assert status == 201, created
        account_id, secret = created["account_id"], created["device_secret"]
        if registered:
            await self.until(account_id, State.REGISTERED)
        return account_id, secret

    async def until(self, account_id: str, state: State) -> Status:
        def reached(status: Status | None) -> bool:
            return status is not None and status.state is state

        status = await asyncio.wait_for(self.engine.wait_for(account_id, reached), WAIT)
        assert status is not None
        return status

    async def metric(self, state: State) -> float:
        async with self.session.get(f"{self.base}metrics") as answer:
            text = await answer.text()
        line = f'softrelay_sipis_accounts{{state="{state.value}"}} '
        values = [row.removeprefix(line) for row in text.splitlines() if row.startswith(line)]
        assert len(values) == 1, line
        return float(values[0])


@contextlib.asynccontextmanager
async def running(
    data_dir: Path, keyring: Keyring, store: StoreSettings, sipis: SipisSettings, **more: Any
) -> AsyncIterator[Running]:
    services = Services(
        load_policy("cloudsoftphone"),
        keyring,
        data_dir,
        SystemClock(),
        sweep_interval=3600,
        push=PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id=APP_ID),
        store=store,
        sipis=sipis,  # sipis_registrar None: the real engine
        **more,
    )
    app = build_app(services)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Running(app, session, str(server.make_url("/")))
    finally:
        await server.close()


def settings(**changes: Any) -> SipisSettings:
    base = SipisSettings(
        enabled=True,
        start_spread=1,  # a restart registers within a second
        rate=RateLimit(per_minute=0),
        allow_private_registrars=True,  # Kamailio is on 127.0.0.1
        t1=0.1,
    )
    return SipisSettings(**{**{f: getattr(base, f) for f in base.__slots__}, **changes})


async def test_account_registers_pauses_resumes_and_is_deleted(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with running(tmp_path, Keyring.generate(), StoreSettings(), settings()) as node:
        account_id, secret = await node.create(kamailio)
        status, view = await node.call("GET", f"/{account_id}", secret)
        assert status == 200
        assert view["status"]["state"] == "registered"
        assert view["status"]["expires_at"] is not None
        assert await node.metric(State.REGISTERED) == 1
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 200  # Kamailio routes to us

        status, view = await node.call("PATCH", f"/{account_id}", secret, {"paused": True})
        assert status == 200
        assert view["paused"] is True
        assert view["status"]["state"] == "paused"  # answered once un-registered
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 480
        assert (await node.metric(State.PAUSED), await node.metric(State.REGISTERED)) == (1, 0)

        status, view = await node.call("PATCH", f"/{account_id}", secret, {"paused": False})
        assert status == 200
        await node.until(account_id, State.REGISTERED)
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 200

        status, _ = await node.call("DELETE", f"/{account_id}", secret)
        assert status == 204
        assert node.engine.status(account_id) is None
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 480
        assert await node.metric(State.REGISTERED) == 0
        status, _ = await node.call("GET", f"/{account_id}", secret)
        assert status == 401


async def test_a_restart_registers_the_stored_account_again(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    keyring = Keyring.generate()
    async with running(tmp_path, keyring, StoreSettings(), settings()) as node:
        account_id, secret = await node.create(kamailio)
    # A restart (the first node's binding stays at Kamailio until it lapses): the stored
    # account registers again, within the start spread, from the new node's socket.
    before = registers_logged(kamailio)
    async with running(tmp_path, keyring, StoreSettings(), settings()) as node:
        assert node.engine.status(account_id) is not None  # loaded from the store
        await node.until(account_id, State.REGISTERED)
        after = registers_logged(kamailio)
        assert len(after) > len(before)
        assert after[-1] not in before  # from another source address
        _, view = await node.call("GET", f"/{account_id}", secret)
        assert view["status"]["state"] == "registered"
        assert await node.metric(State.REGISTERED) == 1
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 200  # the new node answers
        # And it alone: its REGISTER carried the account's instance id, the first
        # node's too, so Kamailio replaced that binding instead of adding one.
        bindings = await register_as(kamailio, ALICE)
        assert [f"<{b.uri}>" for b in users(bindings, account_id)] == [
            node.engine.contact(account_id)
        ]


async def test_a_paused_account_stays_unregistered_after_a_restart(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    keyring = Keyring.generate()
    async with running(tmp_path, keyring, StoreSettings(), settings()) as node:
        account_id, secret = await node.create(kamailio)
        await node.call("PATCH", f"/{account_id}", secret, {"paused": True})
    before = len(registers_logged(kamailio))
    async with running(tmp_path, keyring, StoreSettings(), settings()) as node:
        _, view = await node.call("GET", f"/{account_id}", secret)
        assert view["status"]["state"] == "paused"
        assert await ask(kamailio, "OPTIONS", ALICE.user) == 480
        assert len(registers_logged(kamailio)) == before


# --- what an app may name -------------------------------------------------------------


@pytest.mark.parametrize(
    "registrar",
    [
        "sip:127.0.0.1",
        "sip:10.1.2.3:5060;transport=tcp",
        "sip:192.168.0.10",
        "sip:169.254.169.254",  # link-local: a cloud's metadata service
        "sip:0.0.0.0",
        "sip:[::1]",
        "sip:[fe80::1]",
        "sip:[::ffff:127.0.0.1]",
        "sip:localhost",  # a name resolving to loopback (/etc/hosts, no DNS)
    ],
)
async def test_an_internal_registrar_is_refused_naming_the_field(
    kamailio: Kamailio, tmp_path: Path, registrar: str
) -> None:
    strict = settings(allow_private_registrars=False)
    async with running(tmp_path, Keyring.generate(), StoreSettings(), strict) as node:
        status, answer = await node.call("POST", body=body_for(kamailio, registrar=registrar))
        assert status == 400
        assert answer["error"] == "bad_field"
        assert answer["detail"].startswith("field 'registrar':")
        assert node.engine.account_ids() == []


async def test_a_registrar_change_to_an_internal_host_is_refused(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    keyring = Keyring.generate()
    async with running(tmp_path, keyring, StoreSettings(), settings()) as node:
        account_id, secret = await node.create(kamailio, registered=False)
    # The operator turns the setting off: a change naming a registrar is checked, one
    # that does not name it is not (the stored account was allowed when stored).
    strict = settings(allow_private_registrars=False)
    async with running(tmp_path, keyring, StoreSettings(), strict) as node:
        for registrar in (f"sip:127.0.0.1:{kamailio.port}", "sip:192.0.2.1"):  # TEST-NET-1
            status, answer = await node.call(
                "PATCH", f"/{account_id}", secret, {"registrar": registrar}
            )
            assert (status, answer["error"]) == (400, "bad_field")
            assert answer["detail"].startswith("field 'registrar':")
        status, view = await node.call("PATCH", f"/{account_id}", secret, {"display_name": "A"})
        assert status == 200
        assert view["registrar"] == f"sip:127.0.0.1:{kamailio.port};transport=udp"
        await node.call("DELETE", f"/{account_id}", secret)


async def test_a_push_app_that_is_not_configured_is_refused(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    async with running(tmp_path, Keyring.generate(), StoreSettings(), settings()) as node:
        body = body_for(kamailio)
        body["push"] = body["push"] | {"app_id": "com.other.app"}
        status, answer = await node.call("POST", body=body)
        assert status == 400
        assert answer == {
            "error": "bad_field",
            "detail": "field 'push.app_id': not an app this server sends pushes for",
        }
        account_id, secret = await node.create(kamailio, registered=False)
        change = {"push": {"provider": "fcm", "token": TOKEN, "app_id": "com.other.app"}}
        status, answer = await node.call("PATCH", f"/{account_id}", secret, change)
        assert (status, answer["error"]) == (400, "bad_field")
        assert answer["detail"].startswith("field 'push.app_id':")
        await node.until(account_id, State.REGISTERED)
        await node.call("DELETE", f"/{account_id}", secret)


def test_internal_addresses() -> None:
    for ip in ("127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.1.1", "0.0.0.0"):
        assert internal_address(ip), ip
    for ip in ("::1", "::", "fe80::1", "fc00::1", "::ffff:10.0.0.1", "100.64.0.1", "224.0.0.1"):
        assert internal_address(ip), ip
    for ip in ("8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8"):
        assert not internal_address(ip), ip

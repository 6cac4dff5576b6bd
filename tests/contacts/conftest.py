"""Fixtures of the contacts tests: the whole app (`build_app`, cloudsoftphone profile) on
loopback with one PBX linked over a fake flow that checks digest credentials (the mock
PBX the DSR tests use), SIPIS mode on with a registrar double, and the two kinds of
owner of one subject:

    contacts_world   ContactsWorld: base URL, app, store, clock, PBX, registrar, session
    sipis_owner      a SIPIS account of USER at SERIAL (its provider accepts it: its
                     number counts as proved); token "sipis.<account id>.<secret>"
    device_owner     a device of the same subject, registered by the PBX digest proof;
                     token "cd.<device id>.<secret>"

`prove_device(world, user)` registers a device of any user of the PBX (another owner).
`contacts_settings` may be overridden by a test module for other limits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from contacts.settings import ContactsSettings
from dsr.service import DsrSettings
from mockphone import digest
from privacy.clock import ManualClock
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store, Subject
from proxy.sip.settings import PbxSettings, SipSettings
from push.apps import PushSettings
from sipis.account import State, Status
from sipis.settings import SipisSettings
from softrelay.app import RELAY, STORE, SWEEPER, Services, build_app
from softrelay.metrics import AuditedSweeper
from tests.sip.test_relay import DOMAIN, PBX_SECRET, SERIAL, _link_pbx
from tests.sipis.test_accounts import Registered
from tests.test_dsr_api import PASSWORD, DigestPbx
from webapi.ratelimit import RateLimit

USER = "+4930901820"  # a SIP user name that is a phone number (Smart Contacts needs one)
OTHER_USER = "+4930901821"
UNLIMITED = RateLimit(per_minute=0)
APP_ID = "com.example.phone"
START = 1_772_366_400.0  # 2026-03-01T12:00:00Z


class ProvedRegistrar(Registered):
    """The registrar engine double, whose `accepted` accounts are REGISTERED: their
    provider accepted the registration (an owner's number counts as proved)."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted: set[str] = set()

    def status(self, account_id: str) -> Status | None:
        if account_id in self.accepted and account_id in self.held:
            return Status(State.REGISTERED)
        return super().status(account_id)


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> str:
        value = self.json().get("error")
        return str(value)


@dataclass
class ContactsWorld:
    base: str
    app: web.Application
    store: Store
    clock: ManualClock
    pbx: DigestPbx
    registrar: ProvedRegistrar
    session: aiohttp.ClientSession
    settings: ContactsSettings
    data_dir: Path

    @property
    def sweeper(self) -> AuditedSweeper:
        return self.app[SWEEPER]

    async def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> Answer:
        """One request to the app; `token` as `Authorization: Bearer`."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        async with self.session.request(
            method, self.base + path.lstrip("/"), headers=sent, **kw
        ) as answer:
            return Answer(answer.status, answer.headers, await answer.read())


@dataclass(frozen=True)
class OwnerToken:
    token: str
    subject: Subject
    account_id: str | None = None  # a SIPIS account's id


@pytest.fixture
def contacts_settings() -> ContactsSettings:
    """Small limits, so the chunked path and the size cap are reached with small books;
    no per-client rate (the tests drive many requests from one address)."""
    return ContactsSettings(max_book_bytes=64 * 1024, max_chunk_bytes=4096, rate=UNLIMITED)


@pytest.fixture
async def contacts_world(
    tmp_path: Path, store_settings: StoreSettings, contacts_settings: ContactsSettings
) -> AsyncIterator[ContactsWorld]:
    clock = ManualClock(START)
    registrar = ProvedRegistrar()
    services = Services(
        load_policy("cloudsoftphone"),
        Keyring.generate(),
        tmp_path,
        clock,
        sweep_interval=3600,
        push=PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id=APP_ID),
        sip=SipSettings(DOMAIN, (PbxSettings(SERIAL, PBX_SECRET),)),
        dsr=DsrSettings(max_failures=3, failure_window=600),
        store=store_settings,
        sipis=SipisSettings(enabled=True, rate=UNLIMITED, allow_private_registrars=True),
        sipis_registrar=registrar.opened,
        contacts=contacts_settings,
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
        async with aiohttp.ClientSession() as session:
            yield ContactsWorld(
                str(server.make_url("/")),
                app,
                app[STORE],
                clock,
                pbx,
                registrar,
                session,
                contacts_settings,
                tmp_path,
            )
    finally:
        await server.close()


async def prove_device(
    world: ContactsWorld, user: str = USER, password: str = PASSWORD
) -> OwnerToken:
    """A device of `user` at the PBX, registered by the PBX's digest proof. The clock
    moves on a second first: the mock PBX's nonce is its time, and it refuses a nonce
    answered before, as a PBX refuses a replay."""
    world.clock.advance(1)
    subject = {"sip_username": user, "pbx_serial": SERIAL}
    challenge = await world.call("POST", "/contacts/v1/challenge", json=subject)
    assert challenge.status == 200, challenge.body
    offered = challenge.json()
    (www,) = [c for c in offered["www_authenticate"] if "MD5" in c]
    authorization = digest.answer(
        www, username=user, password=password, method="REGISTER", uri=offered["uri"]
    ).header
    body = subject | {"challenge_id": offered["challenge_id"], "authorization": authorization}
    answer = await world.call("POST", "/contacts/v1/devices", json=body)
    assert answer.status == 201, answer.body
    return OwnerToken(str(answer.json()["device_token"]), Subject(user, SERIAL))


async def create_sipis_account(
    world: ContactsWorld, user: str = USER, *, accepted: bool = True
) -> OwnerToken:
    """A SIPIS account of `user` at the PBX's serial as its domain (the same subject as
    the PBX's devices of that user); `accepted`: its provider accepts the registration."""
    body = {
        "registrar": "sip:127.0.0.1:5060;transport=tcp",
        "domain": SERIAL,
        "user": user,
        "realm": "pbx.example",
        "ha1_md5": "89abcdef0123456789abcdef01234567",
        "push": {"provider": "fcm", "token": "fcm-token-contacts", "app_id": APP_ID},
    }
    answer = await world.call("POST", "/sipis/v1/accounts", json=body)
    assert answer.status == 201, answer.body
    created = answer.json()
    account_id = str(created["account_id"])
    if accepted:
        world.registrar.accepted.add(account_id)
    token = f"sipis.{account_id}.{created['device_secret']}"
    return OwnerToken(token, Subject(user, SERIAL), account_id)


@pytest.fixture
async def sipis_owner(contacts_world: ContactsWorld) -> OwnerToken:
    return await create_sipis_account(contacts_world)


@pytest.fixture
async def device_owner(contacts_world: ContactsWorld) -> OwnerToken:
    return await prove_device(contacts_world)

"""The console against a real app: `build_app` with SIP on loopback, the embedded push
stand-ins, a usage tenant and a crash project, and the console's admin listener on a
free port, its clock and ticks in the test's hands.

    async def test_x(console: ConsoleWorld) -> None:
        async with console.logged_in() as admin:      # an aiohttp session with the cookie
            overview = await admin.json("/api/v1/overview")
        console.ticker.tick()                           # one sampler turn (an SSE event)
        phone = await console.phone()                   # a mock phone registered via the PBX
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp.test_utils import TestServer

from console.history import ManualTicker
from console.sessions import COOKIE, CSRF_FIELD, LOGIN_COOKIE, TOKEN_FIELD
from console.settings import ConsoleSettings
from crashreports.settings import parse_crashreports
from mockphone.delays import Pace
from mockphone.pbx import MockPbx
from mockphone.phone import Kind, MockPhone, PhoneSpec
from mockphone.pushes import PushInbox
from mockphone.sip import RelayAddress, Transport
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from proxy.sip.overload import OverloadSettings
from proxy.sip.settings import PbxSettings, SipSettings
from push.apps import PushSettings
from softrelay.app import CONSOLE, RELAY, SIP_TRANSPORTS, STAND_INS, Services, build_app
from tests.limits import LONGEST_WAIT
from tomlsections.reader import Section
from usage.settings import Tenant, UsageSettings

ADMIN_TOKEN = "console-admin-token-" + "x" * 12
SERIAL = "0042137"
DOMAIN = "relay.test"
APP_ID = "com.example.softphone"
TENANT = "acme"
START = 1_772_366_400.0  # 2026-03-01T12:00:00Z
_META = re.compile(r'name="csrf-token" content="([^"]+)"')


@dataclass
class Admin:
    """A logged-in client of the console."""

    http: aiohttp.ClientSession
    base: str
    session_id: str
    csrf: str

    async def json(self, path: str) -> Any:
        async with self.http.get(self.base + path) as answer:
            assert answer.status == 200, (path, answer.status, await answer.text())
            assert answer.content_type == "application/json"
            return await answer.json()

    async def post(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        headers = {"X-CSRF-Token": self.csrf, **kw.pop("headers", {})}
        async with self.http.post(self.base + path, headers=headers, **kw) as answer:
            await answer.read()
            return answer


@dataclass
class ConsoleWorld:
    base: str  # the console, http://127.0.0.1:<port>
    http_base: str  # the main app (usage pings, crash ingest)
    clock: ManualClock
    ticker: ManualTicker
    app: Any
    pbx: MockPbx
    relay_address: RelayAddress
    inbox: PushInbox
    tenant_key: str = field(repr=False)
    crash_key: str = field(repr=False)
    phones: list[MockPhone] = field(default_factory=list)
    # Every secret and personal value the test made, for the "never shown" checks.
    secrets_used: list[str] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def logged_in(self) -> AsyncIterator[Admin]:
        jar = aiohttp.CookieJar(unsafe=True)  # cookies of an IP-address host
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            session_id, csrf = await login(http, self.base)
            yield Admin(http, self.base, session_id, csrf)

    async def phone(self, user: str | None = None) -> MockPhone:
        """A phone registered through the relay at the PBX, with a push token."""
        user = user or f"user{len(self.phones) + 1}"
        password = secrets.token_urlsafe(12)
        self.pbx.add_user(user, password)
        spec = PhoneSpec(user, password, Kind.IOS, Transport.TCP)
        phone = MockPhone(
            spec,
            self.relay_address,
            serial=SERIAL,
            domain=DOMAIN,
            inbox=self.inbox,
            pace=Pace(speed=math.inf),
        )
        self.phones.append(phone)
        assert await phone.start() == 200
        self.secrets_used += [user, password, *phone_secrets(phone)]
        await asyncio.wait_for(self._binding_written(len(self.phones)), LONGEST_WAIT)
        return phone

    async def _binding_written(self, count: int) -> None:
        """The relay forwards the PBX's 200 before it spawns the binding's write: wait
        for its writes (the one a write starts included) until this phone's landed."""
        relay = self.app[RELAY]
        while relay.registered_phones() < count:
            await relay.drain()
            await asyncio.sleep(0)  # one turn of the loop: the spawn after the forward


def phone_secrets(phone: MockPhone) -> list[str]:
    """The phone's push token and its address with its port (what a leak would show)."""
    return [phone.token] if phone.token else []


async def login(http: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    """GET /login for the pre-login cookie, POST the token: the session id and CSRF."""
    async with http.get(f"{base}/login") as form:
        assert form.status == 200
        page = await form.text()
    pre = http.cookie_jar.filter_cookies(yarl.URL(base))[LOGIN_COOKIE].value
    assert f'value="{pre}"' in page or pre in page
    async with http.post(
        f"{base}/login",
        data={TOKEN_FIELD: ADMIN_TOKEN, CSRF_FIELD: pre},
        allow_redirects=False,
    ) as answer:
        assert answer.status == 303, await answer.text()
        assert answer.headers["Location"] == "/"
    session_id = http.cookie_jar.filter_cookies(yarl.URL(base))[COOKIE].value
    async with http.get(f"{base}/") as page_answer:
        assert page_answer.status == 200
        match = _META.search(await page_answer.text())
    assert match is not None, "the overview page carries the CSRF token in a meta tag"
    return session_id, match.group(1)


def console_services(tmp_path: Path, clock: ManualClock, ticker: ManualTicker) -> Services:
    pbx_secret = "pbx-" + secrets.token_hex(12)
    crash_key = secrets.token_hex(16)
    crash = parse_crashreports(
        Section(
            {"project": [{"id": "1", "key": crash_key}], "rate_limit": 10_000},
            tmp_path / "test.toml",
            "crashreports",
        )
    )
    return Services(
        load_policy("auerproxy"),
        Keyring.generate(),
        tmp_path / "var",
        clock,
        sweep_interval=3600,
        push=PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id=APP_ID),
        # The relay shares its loop with the mock PBX and phones: no shedding on its lag.
        sip=SipSettings(
            DOMAIN, (PbxSettings(SERIAL, pbx_secret),), overload=OverloadSettings(lag=0)
        ),
        sip_listen=("127.0.0.1", 0),
        crash=crash,
        usage=UsageSettings(tenants=(Tenant(TENANT, secrets.token_hex(24)),), ip_burst=0),
        console=ConsoleSettings(listen=("127.0.0.1", 0), admin_token=ADMIN_TOKEN),
        console_ticker=ticker,
    )


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[ConsoleWorld]:
    clock = ManualClock(START)
    ticker = ManualTicker()
    services = console_services(tmp_path, clock, ticker)
    (tmp_path / "var").mkdir(mode=0o700)
    app = build_app(services)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    inbox = PushInbox.embedded(app[STAND_INS].deliveries)
    pbx: MockPbx | None = None
    world: ConsoleWorld | None = None
    try:
        ports = {kind.value: port for kind, (_, port) in app[SIP_TRANSPORTS].addresses}
        http_base = str(server.make_url("")).rstrip("/")
        address = RelayAddress("127.0.0.1", ports["tcp"], http_base, udp_port=ports["udp"])
        pbx_secret = services.sip.pbxs[0].secret
        pbx = await MockPbx.connect(
            address, serial=SERIAL, secret=pbx_secret, domain=DOMAIN, users={}, ring_timeout=10.0
        )
        ((host, port),) = app[CONSOLE].addresses
        world = ConsoleWorld(
            base=f"http://{host}:{port}",
            http_base=http_base,
            clock=clock,
            ticker=ticker,
            app=app,
            pbx=pbx,
            relay_address=address,
            inbox=inbox,
            tenant_key=services.usage.tenants[0].key,
            crash_key=services.crash.projects[0].key,
            secrets_used=[ADMIN_TOKEN, pbx_secret],
        )
        yield world
    finally:
        if world is not None:
            for phone in world.phones:
                await phone.stop()
        if pbx is not None:
            await pbx.close()
        await inbox.close()
        await server.close()

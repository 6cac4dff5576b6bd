"""Smart Contacts over HTTP (contacts/discoveryapi.py) with proven owners (SIPIS accounts
through contacts/owners.py, the provider's acceptance played by a registrar double):
a client finds exactly the discoverable numbers of a book of 1,000 among 10,000
registered users, and the numbers that did not match are nowhere (database files, logs,
stdout/stderr, answers); the quota stops an enumeration at exactly quota_per_day, with
Retry-After to the next UTC day, across a restart; the global bucket stops every owner;
opt-out, not_proved, not_a_number, stale_epoch; malformed input is refused naming why,
charging nothing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from contacts import oprf
from contacts.discovery import DAY, QUOTA, Directory
from contacts.discoveryapi import DIRECTORY, add_discovery_routes
from contacts.owners import OWNERS, Devices, Owners
from contacts.settings import ContactsSettings
from contacts.tagset import DELTA, FULL, parse_set
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store, Subject
from sipis.account import Account, Credential, Push, SipTransport, State, Status
from sipis.accounts import Accounts
from tests.conftest import START
from tests.sipis.test_accounts import Registered
from webapi.errors import refusals
from webapi.openapi import OPENAPI, OpenApi
from webapi.ratelimit import LocalLimiter, LocalLimiters, RateLimit

STORE = web.AppKey("store", Store)
SETTINGS = ContactsSettings(quota_per_day=2000, max_elements_per_request=1000)
PREFIX = "/contacts/v1"


def number(i: int) -> str:
    """A valid German mobile number, distinct per i."""
    return f"+4915{1 + i % 7}{i:08d}"


class Provider(Registered):
    """The registrar engine: an account counts as accepted by its provider (REGISTERED)
    once the test says so, else it is still pending."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted: set[str] = set()

    def status(self, account_id: str) -> Status | None:
        return Status(State.REGISTERED if account_id in self.accepted else State.PENDING)


async def _never(_: float) -> None:
    """The periodic check's sleep: the tests call `refresh` themselves."""
    await asyncio.get_running_loop().create_future()


@dataclass
class World:
    data_dir: Path
    keyring: Keyring
    clock: ManualClock
    settings: ContactsSettings
    provider: Provider = field(default_factory=Provider)
    answers: list[bytes] = field(default_factory=list)  # every body the service sent
    app: web.Application | None = None
    base: str = ""
    session: aiohttp.ClientSession | None = None

    @property
    def store(self) -> Store:
        assert self.app is not None
        return self.app[STORE]

    @property
    def directory(self) -> Directory:
        assert self.app is not None
        return self.app[DIRECTORY]

    async def account(self, user: str, *, proved: bool = True) -> str:
        """A SIPIS account of `user` at example.com; its Bearer token."""
        accounts = Accounts(self.store, self.keyring)
        account, secret = await accounts.create(_draft(user))
        if proved:
            self.provider.accepted.add(account.account_id)
        return f"sipis.{account.account_id}.{secret}"

    async def call(
        self, method: str, path: str, token: str | None, **kw: Any
    ) -> tuple[int, bytes, aiohttp.ClientResponse]:
        assert self.session is not None
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = f"{self.base}{PREFIX}{path}"
        async with self.session.request(method, url, headers=headers, **kw) as answer:
            body = await answer.read()
        self.answers.append(body)
        return answer.status, body, answer

    async def json(self, method: str, path: str, token: str | None, **kw: Any) -> tuple[int, Any]:
        status, body, _ = await self.call(method, path, token, **kw)
        return status, (orjson.loads(body) if body else None)


def _draft(user: str) -> Account:
    return Account(
        account_id="",
        registrar_host="sip.example.com",
        registrar_port=5061,
        transport=SipTransport.TLS,
        domain="example.com",
        user=user,
        credential=Credential(user, "example.com", "0123456789abcdef0123456789abcdef", None),
        push=Push("fcm", "fcm-token", "com.example.phone"),
    )


def _build(world: World) -> web.Application:
    """What softrelay/app.py puts together for these routes: the store, the owners
    (SIPIS accounts with the registrar double), the refusal middleware, the OpenAPI."""
    app = web.Application(middlewares=[refusals])
    app[OPENAPI] = OpenApi("test", "1")

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        store = await Store.create(
            load_policy("cloudsoftphone"), world.keyring, world.data_dir, world.clock
        )
        app[STORE] = store
        accounts = Accounts(store, world.keyring)
        limiter = LocalLimiter(RateLimit(per_minute=0), world.clock)
        devices = Devices(store, world.keyring)
        app[OWNERS] = Owners(
            devices, world.settings, limiter, accounts, world.provider, keyring=world.keyring
        )
        yield
        await store.close()

    app.cleanup_ctx.append(store_ctx)
    add_discovery_routes(
        app,
        world.settings,
        LocalLimiters(world.clock),
        store=STORE,
        keyring=world.keyring,
        clock=world.clock,
        sleep=_never,
    )
    return app


@contextlib.asynccontextmanager
async def running(world: World) -> AsyncIterator[World]:
    """The service up on loopback for the world's store files (again: a restart)."""
    world.app = app = _build(world)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            world.session, world.base = session, str(server.make_url("")).rstrip("/")
            yield world
    finally:
        await server.close()


def world_of(tmp_path: Path, settings: ContactsSettings = SETTINGS) -> World:
    return World(tmp_path / "data", Keyring.generate(), ManualClock(START), settings)


class Client:
    """An app: the set downloaded, then blind -> evaluate over HTTP -> unblind -> tag."""

    def __init__(self, world: World, token: str) -> None:
        self.world = world
        self.token = token
        self.epoch = -1
        self.version: str | None = None
        self.tags: set[bytes] = set()

    async def fetch(self) -> tuple[int, list[bytes], list[bytes]]:
        params = {"since": self.version} if self.version else None
        status, body, answer = await self.world.call(
            "GET", "/discovery/set", self.token, params=params
        )
        assert status == 200, body
        assert answer.content_type == "application/octet-stream"
        epoch, kind, added, removed = parse_set(body)
        if kind == FULL:
            self.tags = set(added)
        else:
            assert epoch == self.epoch
            self.tags = (self.tags - set(removed)) | set(added)
        self.epoch, self.version = epoch, answer.headers["ETag"].strip('"')
        return kind, added, removed

    async def evaluate(self, elements: Sequence[bytes]) -> tuple[int, Any]:
        body = {"epoch": self.epoch, "blinded": [base64.b64encode(e).decode() for e in elements]}
        return await self.world.json("POST", "/discovery/evaluate", self.token, json=body)

    async def discover(self, numbers: Sequence[str]) -> set[str]:
        await self.fetch()
        blinds = [oprf.blind(n.encode()) for n in numbers]
        status, answer = await self.evaluate([b for _, b in blinds])
        assert status == 200, answer
        assert answer["epoch"] == self.epoch
        found = set()
        for n, (r, _), value in zip(numbers, blinds, answer["evaluated"], strict=True):
            point = oprf.unblind(r, base64.b64decode(value, validate=True))
            if oprf.tag(point) in self.tags:
                found.add(n)
        return found


def _encodings(text: str) -> list[bytes]:
    """The forms a number could take in a file or a log: E.164, without +, without
    the country code; each as UTF-8, UTF-16 (both byte orders) and hex."""
    forms = {text, text.lstrip("+"), text[3:]}
    found = []
    for form in forms:
        found += [form.encode(), form.encode("utf-16-le"), form.encode("utf-16-be")]
        found.append(form.encode().hex().encode())
    return found


def _files(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


async def test_a_book_of_1000_finds_the_discoverable_of_10000_and_the_rest_leave_no_trace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    world = world_of(tmp_path)
    discoverable = set(range(0, 10_000, 7))  # of 10,000 registered users
    via_http = [0, 7, 14, 21, 28]
    book = [number(i) for i in range(0, 7000, 10)]  # 700 registered users
    book += [number(20_000 + j) for j in range(300)]  # 300 numbers nobody registered
    expected = {number(i) for i in range(0, 7000, 10) if i in discoverable}
    assert len(book) == 1000
    assert len(expected) == 100
    async with running(world):
        for i in via_http:  # proven owners opt in over HTTP
            status, answer = await world.json(
                "PUT", "/discoverable", await world.account(number(i))
            )
            assert status == 200
            assert answer == {"discoverable": True, "number": number(i)}
        directory = world.directory
        for i in sorted(discoverable - set(via_http)):  # the rest through the directory
            await directory.opt_in(Subject(number(i), "example.com"), number(i))
        asker = Client(world, await world.account("alice-asks"))
        assert await asker.discover(book) == expected
    unmatched = [n for n in book if n not in expected]
    files = _files(world.data_dir)
    logged = (
        "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records).encode()
        + caplog.text.encode()
    )
    out = capsys.readouterr()
    printed = (out.out + out.err).encode()
    answers = b"\n".join(world.answers)
    for n in unmatched:
        for form in _encodings(n):
            assert form not in files, n
            assert form not in logged, n
            assert form not in printed, n
            assert form not in answers, n
    for n in expected:  # the store never holds a number, discoverable or not
        assert all(form not in files for form in _encodings(n)), n


async def _enumerate(client: Client, batch: int) -> tuple[int, aiohttp.ClientResponse, Any]:
    """Evaluate until refused, sending what the last answer said remains; the count
    evaluated and the refusal."""
    element = oprf.blind(b"+4915100000001")[1]
    evaluated, remaining = 0, batch
    for _ in range(10_000):
        body = {
            "epoch": client.epoch,
            "blinded": [base64.b64encode(element).decode()] * (min(batch, remaining) or batch),
        }
        status, raw, answer = await client.world.call(
            "POST", "/discovery/evaluate", client.token, json=body
        )
        data = orjson.loads(raw)
        if status != 200:
            return evaluated, answer, data
        evaluated += len(data["evaluated"])
        remaining = data["remaining"]
    raise AssertionError("the quota never stopped the enumeration")


async def test_the_quota_stops_an_enumeration_at_exactly_quota_per_day_across_a_restart(
    tmp_path: Path,
) -> None:
    settings = ContactsSettings(quota_per_day=30, max_elements_per_request=8)
    world = world_of(tmp_path, settings)
    async with running(world):
        token = await world.account("mallory")
        attacker = Client(world, token)
        await attacker.fetch()
        evaluated, answer, refused = await _enumerate(attacker, 8)
        assert evaluated == settings.quota_per_day
        assert answer.status == 429
        assert refused["error"] == "quota_exhausted"
        next_day = (int(START // DAY) + 1) * DAY
        assert answer.headers["Retry-After"] == str(int(next_day - START))
        [record] = await world.store.find(QUOTA, sip_username="mallory")
        assert record.fields["used"] == settings.quota_per_day
    async with running(world):  # a restart: a new app on the same store
        evaluated, answer, refused = await _enumerate(attacker, 1)
        assert (evaluated, answer.status, refused["error"]) == (0, 429, "quota_exhausted")
        world.clock.set(next_day)
        await attacker.fetch()
        status, data = await attacker.evaluate([oprf.blind(b"+4915100000001")[1]] * 5)
        assert status == 200
        assert data["remaining"] == settings.quota_per_day - 5


async def test_the_global_bucket_refuses_every_owner_and_charges_no_quota(tmp_path: Path) -> None:
    # 10 elements a minute, a burst of 10 (one full request): the first owner's request
    # of 10 empties it for everybody.
    settings = ContactsSettings(global_elements_per_minute=10, max_elements_per_request=10)
    world = world_of(tmp_path, settings)
    element = oprf.blind(b"+4915100000001")[1]
    async with running(world):
        first = Client(world, await world.account("first"))
        second = Client(world, await world.account("second"))
        await first.fetch()
        await second.fetch()
        assert (await first.evaluate([element] * 10))[0] == 200
        status, body, answer = await world.call(
            "POST",
            "/discovery/evaluate",
            second.token,
            json={"epoch": second.epoch, "blinded": [base64.b64encode(element).decode()]},
        )
        assert status == 429
        assert orjson.loads(body)["error"] == "rate_limited"
        assert answer.headers["Retry-After"] == "6", "one element refills in 60 / 10 s"
        assert await world.store.find(QUOTA, sip_username="second") == []
        world.clock.advance(6)
        assert (await second.evaluate([element]))[0] == 200


async def test_opt_out_removes_the_number_and_the_next_versions_delta_says_removed(
    tmp_path: Path,
) -> None:
    world = world_of(tmp_path)
    async with running(world):
        owner = await world.account(number(42))
        status, _ = await world.json("PUT", "/discoverable", owner)
        assert status == 200
        assert await world.json("GET", "/discoverable", owner) == (200, {"discoverable": True})
        asker = Client(world, await world.account("asker"))
        assert await asker.discover([number(42), number(43)]) == {number(42)}
        held = asker.version
        status, _, answer = await world.call(
            "GET", "/discovery/set", asker.token, headers={"If-None-Match": f'"{held}"'}
        )
        assert status == 304
        assert answer.headers["ETag"] == f'"{held}"'

        status, body, _ = await world.call("DELETE", "/discoverable", owner)
        assert (status, body) == (204, b"")
        assert await world.json("GET", "/discoverable", owner) == (200, {"discoverable": False})
        kind, added, removed = await asker.fetch()
        assert asker.version != held
        assert (kind, added) == (DELTA, [])
        point = oprf.element(world.app[DIRECTORY].key(asker.epoch), number(42).encode())  # type: ignore[index]
        assert removed == [oprf.tag(point)]
        assert await asker.discover([number(42), number(43)]) == set()
        assert await world.store.find("discoverable") == []


async def test_a_number_nobody_proved_is_never_discoverable(tmp_path: Path) -> None:
    world = world_of(tmp_path)
    async with running(world):
        pending = await world.account(number(5), proved=False)  # provider has not accepted
        status, answer = await world.json("PUT", "/discoverable", pending)
        assert (status, answer["error"]) == (403, "not_proved")
        named = await world.account("alice")  # accepted, but no phone number
        status, answer = await world.json("PUT", "/discoverable", named)
        assert (status, answer["error"]) == (400, "not_a_number")
        for token in (pending, named):
            assert await world.json("GET", "/discoverable", token) == (200, {"discoverable": False})
        status, answer = await world.json("PUT", "/discoverable", "sipis.x.y")
        assert (status, answer["error"]) == (401, "unauthorized")
        assert await world.store.find("discoverable") == []
        asker = Client(world, named)
        assert await asker.discover([number(5)]) == set()
        # Discovery itself needs a proved owner: each one costs an attacker an identity.
        status, _, _ = await world.call("GET", "/discovery/set", pending)
        assert status == 403
        element = base64.b64encode(oprf.blind(number(6).encode())[1]).decode()
        status, answer = await world.json(
            "POST", "/discovery/evaluate", pending, json={"epoch": 0, "blinded": [element]}
        )
        assert (status, answer["error"]) == (403, "not_proved")
        assert await world.store.find(QUOTA, sip_username=number(5)) == []


async def test_an_epoch_change_gets_409_for_the_old_epoch_and_a_fresh_client_the_same_matches(
    tmp_path: Path,
) -> None:
    world = world_of(tmp_path)
    async with running(world):
        directory = world.directory
        for i in range(10):
            await directory.opt_in(Subject(number(i), "example.com"), number(i))
        book = [number(i) for i in range(5, 15)]
        old = Client(world, await world.account("old"))
        matches = await old.discover(book)
        assert matches == {number(i) for i in range(5, 10)}
        world.clock.set((old.epoch + 1) * SETTINGS.key_epoch)
        status, answer = await old.evaluate([oprf.blind(b"+4915100000001")[1]])
        assert (status, answer["error"]) == (409, "stale_epoch")
        fresh = Client(world, await world.account("fresh"))
        assert await fresh.discover(book) == matches
        assert fresh.epoch == old.epoch + 1
        assert {r.fields["epoch"] for r in await world.store.find("discoverable")} == {fresh.epoch}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


GOOD = _b64(oprf.blind(b"+4915100000001")[1])
MALFORMED: list[tuple[str, Any, int, str]] = [
    ("not JSON", b"{not json", 400, "malformed_body"),
    ("a lone surrogate", b'{"epoch": 0, "blinded": ["\\ud800"]}', 400, "malformed_body"),
    ("a list", [GOOD], 400, "malformed_body"),
    ("an unknown field", {"epoch": 0, "blinded": [GOOD], "x": 1}, 400, "unknown_field"),
    ("epoch a string", {"epoch": "E", "blinded": [GOOD]}, 400, "bad_field"),
    ("epoch a boolean", {"epoch": True, "blinded": [GOOD]}, 400, "bad_field"),
    ("no epoch", {"blinded": [GOOD]}, 400, "bad_field"),
    ("blinded a string", {"epoch": "E", "blinded": GOOD}, 400, "bad_field"),
    ("blinded empty", {"epoch": "E", "blinded": []}, 400, "bad_field"),
    ("an element not a string", {"epoch": "E", "blinded": [GOOD, 7]}, 400, "bad_element"),
    ("bad base64", {"epoch": "E", "blinded": [GOOD, "!!!!"]}, 400, "bad_element"),
    ("31 bytes", {"epoch": "E", "blinded": [GOOD, _b64(b"\x01" * 31)]}, 400, "bad_element"),
    ("33 bytes", {"epoch": "E", "blinded": [GOOD, _b64(b"\x01" * 33)]}, 400, "bad_element"),
    ("the identity", {"epoch": "E", "blinded": [GOOD, _b64(bytes(32))]}, 400, "bad_element"),
    ("not a point", {"epoch": "E", "blinded": [GOOD, _b64(b"\xff" * 32)]}, 400, "bad_element"),
    ("too many", {"epoch": "E", "blinded": [GOOD] * 9}, 413, "too_many_elements"),
]


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
async def test_malformed_evaluations_are_refused_with_a_reason_and_charge_nothing(
    tmp_path: Path, body: Any, status: int, error: str
) -> None:
    world = world_of(tmp_path, ContactsSettings(quota_per_day=100, max_elements_per_request=8))
    async with running(world):
        client = Client(world, await world.account("fuzz"))
        await client.fetch()
        if isinstance(body, dict) and body.get("epoch") == "E" and error != "bad_field":
            body = {**body, "epoch": client.epoch}
        if isinstance(body, bytes):
            kw: dict[str, Any] = {"data": body, "headers": {"Content-Type": "application/json"}}
        else:
            kw = {"json": body}
        got, answer = await world.json("POST", "/discovery/evaluate", client.token, **kw)
        assert (got, answer["error"]) == (status, error), answer
        assert answer["detail"]
        if error == "bad_element":
            assert "blinded[1]" in answer["detail"]
        assert await world.store.find(QUOTA, sip_username="fuzz") == []
        # Not JSON by its type: refused before the body is read.
        got, answer = await world.json(
            "POST",
            "/discovery/evaluate",
            client.token,
            data=b"{}",
            headers={"Content-Type": "text/plain"},
        )
        assert (got, answer["error"]) == (415, "unsupported_media_type")


async def test_a_bad_since_is_refused_and_an_unknown_one_gets_the_whole_set(tmp_path: Path) -> None:
    world = world_of(tmp_path)
    async with running(world):
        token = await world.account("reader")
        status, answer = await world.json("GET", "/discovery/set?since=zz", token)
        assert (status, answer["error"]) == (400, "bad_since")
        status, body, _ = await world.call("GET", "/discovery/set?since=" + "0" * 32, token)
        assert status == 200
        assert parse_set(body)[1] == FULL


async def test_the_routes_are_described_in_the_openapi_document(tmp_path: Path) -> None:
    world = world_of(tmp_path)
    async with running(world):
        assert world.app is not None
        paths = world.app[OPENAPI].document()["paths"]
    assert set(paths[f"{PREFIX}/discoverable"]) == {"put", "get", "delete"}
    assert set(paths[f"{PREFIX}/discovery/set"]) == {"get"}
    assert set(paths[f"{PREFIX}/discovery/evaluate"]) == {"post"}
    assert "409" in paths[f"{PREFIX}/discovery/evaluate"]["post"]["responses"]

"""Shared fixtures: an injected clock, a store on a temporary data directory, a real
PostgreSQL server (tests/pgserver.py) with a fresh database per test, and `softrelay
serve` with its peers (tests/peers.py) for the end-to-end tests."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
import uvloop

from privacy.clock import ManualClock, parse_instant
from privacy.database import BackendName, StoreSettings
from privacy.keys import Keyring
from privacy.policy import Category, FieldType, Protection, load_policy
from privacy.store import Store, Value
from tests import peers
from tests.limits import in_ci
from tests.pgserver import PostgresServer, PostgresUnavailable
from tests.rawdb import PostgresRaw, RawDatabase, SQLiteRaw
from tests.redisserver import RedisServer, RedisUnavailable

START = parse_instant("2026-03-01T12:00:00Z")
PROFILES = ("auerproxy", "cloudsoftphone")

StoreFactory = Callable[[str], Awaitable[Store]]
_DATABASES = itertools.count(1)
# The backends a test marked `both_backends` runs on (the `store_backend` fixture).
STORE_BACKENDS: tuple[BackendName, ...] = ("sqlite", "postgresql")
# Where a configuration file used by a test finds the PostgreSQL DSN (`dsn = "env:..."`).
DSN_ENV = "SOFTRELAY_TEST_DSN"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "both_backends: the test's store (store_backend) runs on SQLite and on PostgreSQL",
    )
    config.addinivalue_line(
        "markers",
        "sqlite_only(why): in a both_backends module, a test run on SQLite alone (it looks"
        " at SQLite's own files, or no backend plays a part)",
    )
    config.addinivalue_line(
        "markers",
        "postgresql_only(why): in a both_backends module, a test of what only PostgreSQL"
        " has (its change feed)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A `both_backends` test that opens a store runs once per backend: `store_backend`
    is the one parameter every store fixture below takes its backend from."""
    marked = metafunc.definition.get_closest_marker("both_backends") is not None
    marked = marked and metafunc.definition.get_closest_marker("sqlite_only") is None
    if marked and "store_backend" in metafunc.fixturenames:
        only_pg = metafunc.definition.get_closest_marker("postgresql_only") is not None
        backends = ("postgresql",) if only_pg else STORE_BACKENDS
        metafunc.parametrize("store_backend", backends, indirect=True)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], object]]:
    """The loop `softrelay serve` runs on (softrelay/cli.py), for every in-process test too."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> BackendName:
    """The store's backend: the parameter of a `both_backends` test, else SQLite."""
    return cast(BackendName, getattr(request, "param", "sqlite"))


@pytest.fixture
def store_settings(store_backend: BackendName, request: pytest.FixtureRequest) -> StoreSettings:
    """`[store]` for the test's backend: SQLite under tmp_path, or a fresh, migrated
    PostgreSQL database (the server starts only for a test that runs on it)."""
    if store_backend == "postgresql":
        dsn = request.getfixturevalue("postgres_store_dsn")
        return StoreSettings(backend="postgresql", dsn=dsn)
    return StoreSettings()


@pytest.fixture
def other_store_settings(
    store_settings: StoreSettings, request: pytest.FixtureRequest
) -> Iterator[StoreSettings]:
    """A second, independent store on the test's backend: on SQLite the same settings
    (open it on a data_dir of its own), on PostgreSQL another fresh database."""
    if store_settings.backend == "sqlite":
        yield store_settings
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    template: str = request.getfixturevalue("postgres_migrated")
    for dsn in _fresh_database(server, template):
        yield replace(store_settings, dsn=dsn)


@pytest.fixture
def store_toml(store_settings: StoreSettings, monkeypatch: pytest.MonkeyPatch) -> str:
    """The `[store]` section of a configuration file for the test's backend (empty for
    SQLite); the DSN is read from DSN_ENV, set here, as a deployment reads it."""
    if store_settings.backend == "sqlite":
        return ""
    monkeypatch.setenv(DSN_ENV, store_settings.dsn)
    return f'[store]\nbackend = "postgresql"\ndsn = "env:{DSN_ENV}"\n'


@pytest.fixture
def raw_db(
    store_settings: StoreSettings, tmp_path: Path, request: pytest.FixtureRequest
) -> RawDatabase:
    """The database of the test's store (`store`, `open_store`), read and changed
    through the database's own client."""
    if store_settings.backend == "postgresql":
        server = request.getfixturevalue("postgres_server")
        return PostgresRaw(server, store_settings.dsn)
    return SQLiteRaw(tmp_path)


@pytest.fixture
async def open_store(
    tmp_path: Path, clock: ManualClock, store_settings: StoreSettings
) -> AsyncIterator[StoreFactory]:
    """Opens stores of a profile on the test's backend (SQLite: under tmp_path); all are
    closed after the test."""
    opened: list[Store] = []

    async def factory(profile: str = "auerproxy") -> Store:
        store = await Store.create(
            load_policy(profile), Keyring.generate(), tmp_path, clock, store_settings
        )
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: StoreFactory) -> Store:
    return await open_store("auerproxy")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL 15 server for the session, started on first use. Missing, it
    skips the tests that need it, or fails them when `CI` is set (.ci/run installs it)."""
    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI is set and {exc}")
        pytest.skip(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.close()


def _fresh_database(server: PostgresServer, template: str | None = None) -> Iterator[str]:
    name = f"test_{next(_DATABASES)}"
    yield server.create_database(name, *([template] if template else []))
    # A test that stopped the server (the fault tests) leaves it running again.
    server.start()
    server.drop_database(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis server for the session, started on first use (tests/redisserver.py).
    Missing, it skips the tests that need it, or fails them when `CI` is set (.ci/run
    installs it)."""
    try:
        server = RedisServer()
    except RedisUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI is set and {exc}")
        pytest.skip(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test (FLUSHALL; running again if a test
    before stopped it); its URL, password inside. Pub/sub channels are server-wide, so
    tests of one session share them one after the other, never at once."""
    redis_server.start()
    redis_server.flushall()
    return redis_server.url()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test (the DSN of the test role), dropped after."""
    yield from _fresh_database(postgres_server)


@pytest.fixture(scope="session")
def postgres_migrated(postgres_server: PostgresServer) -> str:
    """A database migrated once (`softrelay db migrate`: schema steps and the tables of
    every profile) that each test's store database is copied from, so no test pays for
    the migration; the name of that template database."""
    name = "softrelay_migrated"
    settings = StoreSettings(backend="postgresql", dsn=postgres_server.create_database(name))

    async def migrate() -> None:
        for profile in PROFILES:
            await Store.migrate(load_policy(profile), Path("/nonexistent"), settings)

    # A session fixture runs outside every test's event loop: a loop of its own.
    asyncio.run(migrate())
    return name


@pytest.fixture
def postgres_store_dsn(postgres_server: PostgresServer, postgres_migrated: str) -> Iterator[str]:
    """A fresh database for this test with the store's schema (from postgres_migrated)."""
    yield from _fresh_database(postgres_server, postgres_migrated)


def sample_fields(category: Category, marker: str = "x") -> dict[str, Value]:
    """A valid record for any category, every declared field filled."""
    values: dict[str, Value] = {}
    for name, spec in category.fields.items():
        if spec.protection is Protection.ANONYMISED:
            values[name] = "203.0.113.77"
        elif spec.type is FieldType.INT:
            values[name] = 5060
        elif spec.type is FieldType.REAL:
            values[name] = 1.5
        elif spec.type is FieldType.JSON:
            values[name] = {"marker": f"{marker}-{name}"}
        else:
            values[name] = f"{marker}-{name}"
    return values


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[peers.Server]]]:
    """Starts `softrelay serve` on tmp_path when called; stops it after the test.

    A test calls it only once its peers are known to be there, and exchanges SIP with
    the server before it stops it: serve sets up its SIGTERM handler just after its
    start-up report.
    """
    started: list[peers.Server] = []

    async def start() -> peers.Server:
        started.append(await peers.start_server(tmp_path))
        return started[-1]

    try:
        yield start
        for srv in started:
            assert await srv.stop() == 0, srv.log()
    finally:
        for srv in started:
            await srv.kill()

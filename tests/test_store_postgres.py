"""What the PostgreSQL backend has of its own: versioned migrations and the refusal of a
database at another version, the `[store]` configuration, connection errors that name
the key and never the DSN, and connection loss surfacing as StorageUnavailable. (The
store's behaviour on both backends is in the suites marked `both_backends`.)"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from privacy.backend import SchemaMismatch, StorageUnavailable
from privacy.clock import ManualClock
from privacy.database import DATABASE_FILE, StoreSettings, parse_store
from privacy.keys import Keyring
from privacy.migrations import MIGRATIONS, SCHEMA_VERSION
from privacy.policy import load_policy
from privacy.store import Store, Subject, Value, stored_categories, table_name
from softrelay.cli import main
from softrelay.config import load_config
from tests.pgserver import PostgresServer, free_port
from tests.rawdb import PostgresRaw
from tomlsections.reader import ConfigError, Section

POLICY = load_policy("auerproxy")
DSN_ENV = "SOFTRELAY_TEST_PG_DSN"
# Usage's indexes: the record key (tenant, period, pid) serves a lookup by tenant, so
# only period has one of its own besides the retention basis and the subject.
USAGE_INDEXES = {"c_usage__basis", "c_usage__subject", "c_usage__period", "c_usage__key"}
MIGRATE_LINE = "run `softrelay db migrate`"
REGISTRATION: dict[str, Value] = {
    "pbx_serial": "0042137",
    "sip_username": "alice",
    "instance": "urn:uuid:00000000-0000-4000-8000-000000000001",
    "phone_ip": "198.51.100.23",
    "phone_port": 5060,
    "pbx_ip": "203.0.113.7",
    "pbx_port": 5061,
    "push_provider": "apns",
    "push_token": "ab" * 32,
    "push_app_id": "com.example.phone.voip",
}


@pytest.fixture
def settings(postgres_dsn: str) -> StoreSettings:
    return StoreSettings(backend="postgresql", dsn=postgres_dsn)


@pytest.fixture
def raw(postgres_server: PostgresServer, postgres_dsn: str) -> PostgresRaw:
    return PostgresRaw(postgres_server, postgres_dsn)


async def _open(settings: StoreSettings, tmp_path: Path, clock: ManualClock) -> Store:
    return await Store.create(POLICY, Keyring.generate(), tmp_path, clock, settings)


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "softrelay.toml"
    path.write_text(body, encoding="utf-8")
    return path


def _pg_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dsn: str) -> Path:
    monkeypatch.setenv(DSN_ENV, dsn)
    return _config(tmp_path, f'[store]\nbackend = "postgresql"\ndsn = "env:{DSN_ENV}"\n')


# --- migrations ------------------------------------------------------------------------


async def test_an_unmigrated_database_is_refused_with_what_to_run(
    settings: StoreSettings, tmp_path: Path, clock: ManualClock, raw: PostgresRaw
) -> None:
    with pytest.raises(SchemaMismatch) as refused:
        await _open(settings, tmp_path, clock)
    assert str(refused.value).endswith(
        f": database schema is version 0, this softrelay needs {SCHEMA_VERSION}: {MIGRATE_LINE}"
    )
    # Opening changed nothing: no table was created.
    assert raw.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").strip() == "0"


async def test_migrate_takes_every_step_once_and_creates_the_policys_tables(
    settings: StoreSettings, tmp_path: Path, clock: ManualClock, raw: PostgresRaw
) -> None:
    done = await Store.migrate(POLICY, tmp_path, settings)
    steps = [f"schema version {v}: {m.name}" for v, m in enumerate(MIGRATIONS, start=1)]
    assert done[: len(steps)] == steps
    for cat in stored_categories(POLICY):
        assert f"table {table_name(cat.name)}" in done
    versions = raw.text(
        "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations"
    )
    assert versions.strip() == ",".join(str(v) for v in range(1, SCHEMA_VERSION + 1))
    assert await Store.migrate(POLICY, tmp_path, settings) == []  # up to date: nothing
    store = await _open(settings, tmp_path, clock)
    try:
        record_id = await store.put("registration", REGISTRATION)
        assert [r.id for r in await store.find("registration", sip_username="alice")] == [record_id]
    finally:
        await store.close()


async def test_two_migrations_at_once_take_turns(
    settings: StoreSettings, tmp_path: Path, raw: PostgresRaw
) -> None:
    """Two `db migrate` of two hosts at once: the advisory lock makes one wait, so each
    step is taken exactly once and neither fails on the other's tables."""
    first, second = await asyncio.gather(
        Store.migrate(POLICY, tmp_path, settings), Store.migrate(POLICY, tmp_path, settings)
    )
    assert sorted([first == [], second == []]) == [False, True]
    assert raw.count("schema_migrations") == SCHEMA_VERSION


async def test_a_newer_database_is_refused_with_upgrade(
    settings: StoreSettings, tmp_path: Path, clock: ManualClock, raw: PostgresRaw
) -> None:
    await Store.migrate(POLICY, tmp_path, settings)
    newer = SCHEMA_VERSION + 1
    raw.execute(f"INSERT INTO schema_migrations (version, name) VALUES ({newer}, 'later')")
    with pytest.raises(SchemaMismatch) as refused:
        await _open(settings, tmp_path, clock)
    assert str(refused.value).endswith(
        f": database schema is version {newer}, written by a newer softrelay"
        f" (this one knows up to {SCHEMA_VERSION}): upgrade softrelay"
    )
    # `db migrate` of the older softrelay refuses too, and changes nothing.
    with pytest.raises(SchemaMismatch, match="upgrade softrelay"):
        await Store.migrate(POLICY, tmp_path, settings)
    assert raw.count("schema_migrations") == newer


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("DROP TABLE c_debug", "table c_debug"),
        ("ALTER TABLE c_registration DROP COLUMN push_app_id", "column c_registration.push_app_id"),
        ("DROP INDEX c_registration__key", "index c_registration__key"),
    ],
    ids=["table", "column", "unique key"],
)
async def test_a_policy_ahead_of_the_tables_is_refused_until_migrated(
    settings: StoreSettings,
    tmp_path: Path,
    clock: ManualClock,
    raw: PostgresRaw,
    change: str,
    named: str,
) -> None:
    """What the policy declares and the database lacks (a new category, field or key
    since the last migration) stops the open, named; `db migrate` creates it."""
    await Store.migrate(POLICY, tmp_path, settings)
    raw.execute(change)
    with pytest.raises(SchemaMismatch) as refused:
        await _open(settings, tmp_path, clock)
    assert str(refused.value).endswith(
        f": {named} is missing (the policy declares it): {MIGRATE_LINE}"
    )
    assert named in await Store.migrate(POLICY, tmp_path, settings)
    store = await _open(settings, tmp_path, clock)
    await store.close()


async def test_delete_subject_removes_every_category_and_the_mark_in_one_go(
    settings: StoreSettings, tmp_path: Path, clock: ManualClock, raw: PostgresRaw
) -> None:
    await Store.migrate(POLICY, tmp_path, settings)
    store = await _open(settings, tmp_path, clock)
    alice = Subject("alice", "0042137")
    try:
        await store.put("registration", REGISTRATION)
        await store.put("debug", {"sip_username": "alice", "pbx_serial": "0042137"})
        await store.restrict(alice, True)
        deleted = await store.delete_subject(alice)  # every category naming a subject
        assert {k: v for k, v in deleted.items() if v} == {"registration": 1, "debug": 1}
    finally:
        await store.close()
    for table in ("c_registration", "c_debug", "subjects", "restrictions"):
        assert raw.count(table) == 0, table


async def test_migrate_drops_an_index_the_policy_no_longer_needs(
    settings: StoreSettings, tmp_path: Path, clock: ManualClock, raw: PostgresRaw
) -> None:
    """An index of a column the policy no longer looks up alone (usage's pid), or that
    the record key's index serves (usage's tenant, the key's first column), only costs
    writes: `db migrate` drops it, and a lookup by that column still works."""
    await Store.migrate(POLICY, tmp_path, settings)
    assert _pg_indexes(raw, "c_usage") == USAGE_INDEXES
    raw.execute(
        "CREATE INDEX c_usage__tenant ON c_usage(tenant)",
        "CREATE INDEX c_usage__pid ON c_usage(pid)",
    )
    done = await Store.migrate(POLICY, tmp_path, settings)
    assert sorted(d for d in done if d.startswith("dropped")) == [
        "dropped index c_usage__pid",
        "dropped index c_usage__tenant",
    ]
    assert _pg_indexes(raw, "c_usage") == USAGE_INDEXES
    store = await _open(settings, tmp_path, clock)
    try:
        await store.put_many("usage", [{"tenant": "acme", "period": "2026-03", "pid": "ab"}])
        assert len(await store.find("usage", tenant="acme")) == 1
    finally:
        await store.close()


def _pg_indexes(raw: PostgresRaw, table: str) -> set[str]:
    found = raw.text(f"SELECT indexname FROM pg_indexes WHERE tablename = '{table}'")
    # Without the primary key's own index, as SQLite's rowid table has none.
    return {line.strip() for line in found.splitlines() if line.strip()} - {f"{table}_pkey"}


# --- SQLite: migrated on open -----------------------------------------------------------


async def test_sqlite_migrates_a_fresh_file_on_open(tmp_path: Path, clock: ManualClock) -> None:
    store = await Store.create(POLICY, Keyring.generate(), tmp_path, clock)
    await store.close()
    with closing(sqlite3.connect(tmp_path / DATABASE_FILE)) as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert await Store.schema_status(POLICY, tmp_path) == (SCHEMA_VERSION, [])


async def test_sqlite_drops_an_index_the_policy_no_longer_needs_on_open(
    tmp_path: Path, clock: ManualClock
) -> None:
    """SQLite's side of the PostgreSQL test above: a fresh file has only the indexes the
    policy needs; a file of an earlier softrelay loses the others at its next open."""
    store = await Store.create(POLICY, Keyring.generate(), tmp_path, clock)
    await store.close()
    path = tmp_path / DATABASE_FILE
    assert _sqlite_indexes(path, "c_usage") == USAGE_INDEXES
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE INDEX c_usage__tenant ON c_usage(tenant)")
        db.execute("CREATE INDEX c_usage__pid ON c_usage(pid)")
        db.commit()
    store = await Store.create(POLICY, Keyring.generate(), tmp_path, clock)
    try:
        assert _sqlite_indexes(path, "c_usage") == USAGE_INDEXES
        await store.put_many("usage", [{"tenant": "acme", "period": "2026-03", "pid": "ab"}])
        assert len(await store.find("usage", tenant="acme")) == 1
    finally:
        await store.close()
    with closing(sqlite3.connect(path)) as db:
        plan = db.execute("EXPLAIN QUERY PLAN SELECT * FROM c_usage WHERE tenant = 'acme'")
        assert "USING INDEX c_usage__key" in " ".join(row[-1] for row in plan)


def _sqlite_indexes(path: Path, table: str) -> set[str]:
    with closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?"
            " AND sql IS NOT NULL",
            (table,),
        )
        return {row[0] for row in rows}


async def test_sqlite_refuses_a_file_of_a_newer_softrelay_and_leaves_it(
    tmp_path: Path, clock: ManualClock
) -> None:
    store = await Store.create(POLICY, Keyring.generate(), tmp_path, clock)
    await store.close()
    path = tmp_path / DATABASE_FILE
    with closing(sqlite3.connect(path)) as db:
        db.execute("INSERT INTO schema_migrations VALUES (99, 'later', 'now')")
        db.execute("DROP TABLE c_debug")
        db.commit()
    with pytest.raises(SchemaMismatch) as refused:
        await Store.create(POLICY, Keyring.generate(), tmp_path, clock)
    assert str(refused.value) == (
        f"{path}: database schema is version 99, written by a newer softrelay"
        f" (this one knows up to {SCHEMA_VERSION}): upgrade softrelay"
    )
    with closing(sqlite3.connect(path)) as db:  # the open's transaction rolled back
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "c_debug" not in tables


# --- configuration ---------------------------------------------------------------------


def _parse(tmp_path: Path, body: dict[str, object]) -> StoreSettings:
    return parse_store(Section(body, tmp_path / "softrelay.toml", "store"))


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        (
            {"backend": "postgresql", "dsn": "postgresql://u:hunter2@db/x"},
            "store.dsn",
            "must be 'env:NAME' or 'file:PATH'",
        ),
        ({"backend": "postgresql"}, "store.dsn", "backend 'postgresql' needs a dsn"),
        ({"dsn": "env:HOME"}, "store.dsn", "only for backend 'postgresql'"),
        ({"backend": "mysql"}, "store.backend", "must be one of sqlite, postgresql"),
        ({"pool_size": 0}, "store.pool_size", "must be at least 1"),
        ({"pool_size": 101}, "store.pool_size", "must be at most 100"),
        ({"statement_timeout": "0s"}, "store.statement_timeout", "must be at least 1s"),
        ({"pool": 3}, "store.pool", "unknown key"),
    ],
    ids=[
        "literal dsn",
        "no dsn",
        "dsn for sqlite",
        "backend",
        "pool 0",
        "pool 101",
        "timeout",
        "typo",
    ],
)
def test_a_bad_store_section_names_file_and_key(
    tmp_path: Path, body: dict[str, object], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        _parse(tmp_path, body)
    assert str(refused.value).startswith(f"{tmp_path / 'softrelay.toml'}: {key}: {message}")
    assert "hunter2" not in str(refused.value)


def test_the_store_section_parses_into_settings_that_never_show_the_dsn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://softrelay:hunter2@db.internal/softrelay\n")
    parsed = _parse(
        tmp_path,
        {
            "backend": "postgresql",
            "dsn": f"file:{secret}",
            "pool_size": 4,
            "statement_timeout": "5s",
        },
    )
    assert parsed == StoreSettings(
        backend="postgresql",
        dsn="postgresql://softrelay:hunter2@db.internal/softrelay",
        pool_size=4,
        statement_timeout=5.0,
        source=str(tmp_path / "softrelay.toml"),
    )
    assert "hunter2" not in repr(parsed)
    config = _pg_config(tmp_path, monkeypatch, "postgresql://softrelay:hunter2@db/x")
    loaded = load_config(config)
    assert loaded.store.dsn.endswith("@db/x")
    assert "hunter2" not in repr(loaded)


def test_a_literal_dsn_is_refused_at_load_by_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(
        tmp_path, '[store]\nbackend = "postgresql"\ndsn = "postgresql://u:hunter2@db/x"\n'
    )
    assert main(["--config", str(config), "policy", "show"]) == 2
    err = capsys.readouterr().err
    assert err == f"softrelay: {config}: store.dsn: must be 'env:NAME' or 'file:PATH'\n"


def _with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.mark.parametrize("argv", [["sweep"], ["serve", "--http-port", "0", "--sip-port", "0"]])
def test_an_unreachable_server_stops_the_start_naming_the_key_not_the_password(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    port = free_port()
    config = _pg_config(
        tmp_path, monkeypatch, f"postgresql://softrelay:hunter2@127.0.0.1:{port}/softrelay"
    )
    assert main([*argv, "--config", str(config), "--data-dir", str(tmp_path / "var")]) == 2
    captured = capsys.readouterr()
    assert captured.err.endswith(
        f"softrelay: {config}: store.dsn: cannot connect to 127.0.0.1:{port}/softrelay:"
        " connection refused\n"
    )
    assert "hunter2" not in captured.out + captured.err


def test_a_wrong_password_stops_the_start_without_printing_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    postgres_dsn: str,
) -> None:
    config = _pg_config(tmp_path, monkeypatch, _with_password(postgres_dsn, "hunter2-wrong"))
    assert main(["sweep", "--config", str(config), "--data-dir", str(tmp_path / "var")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"softrelay: {config}: store.dsn: cannot connect to 127.0.0.1:")
    assert "password authentication failed" in captured.err
    assert "hunter2" not in captured.out + captured.err
    password = urlsplit(postgres_dsn).password
    assert password
    assert password not in captured.out + captured.err


# --- the db command --------------------------------------------------------------------


def test_db_status_then_migrate_then_serve_is_allowed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    postgres_dsn: str,
) -> None:
    config = _pg_config(tmp_path, monkeypatch, postgres_dsn)

    def run(*argv: str) -> int:
        return main([*argv, "--config", str(config), "--data-dir", str(tmp_path / "var")])

    password = urlsplit(postgres_dsn).password
    assert password
    assert run("sweep") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.endswith(f"needs {SCHEMA_VERSION}: {MIGRATE_LINE}\n")
    assert run("db", "status") == 1
    out = capsys.readouterr().out
    assert f"schema version 0, this softrelay needs {SCHEMA_VERSION}" in out
    assert out.endswith(f"softrelay: {MIGRATE_LINE}\n")
    assert run("db", "migrate") == 0
    out = capsys.readouterr().out
    assert "schema version 1: subjects and retention runs" in out
    assert password not in out
    assert run("db", "status") == 0
    assert capsys.readouterr().out.endswith("softrelay: up to date\n")
    assert run("db", "migrate") == 0
    assert "is up to date" in capsys.readouterr().out
    assert run("sweep") == 0


def test_serve_on_an_unmigrated_database_stops_with_one_line_saying_what_to_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    postgres_dsn: str,
) -> None:
    config = _pg_config(tmp_path, monkeypatch, postgres_dsn)
    argv = ["serve", "--http-port", "0", "--sip-port", "0", "--config", str(config)]
    assert main([*argv, "--data-dir", str(tmp_path / "var")]) == 2
    captured = capsys.readouterr()
    # Its last line (warnings of the start before it: a generated keyring, the file limit).
    assert captured.err.splitlines()[-1] == (
        f"softrelay: PostgreSQL at {urlsplit(postgres_dsn).hostname}:"
        f"{urlsplit(postgres_dsn).port}{urlsplit(postgres_dsn).path}: database schema is"
        f" version 0, this softrelay needs {SCHEMA_VERSION}: {MIGRATE_LINE}"
    )
    assert "Traceback" not in captured.err
    assert "softrelay: http://" not in captured.out  # stopped before listening


def test_db_migrate_on_sqlite_reports_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "var"
    assert main(["db", "migrate", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"softrelay: {data / DATABASE_FILE}: schema version 1: " in out
    assert main(["db", "status", "--data-dir", str(data)]) == 0


# --- connection loss -------------------------------------------------------------------


async def test_a_stopped_server_is_storage_unavailable_then_resumes(
    settings: StoreSettings,
    tmp_path: Path,
    clock: ManualClock,
    postgres_server: PostgresServer,
) -> None:
    """Connection loss is one exception type the callers can answer 503 for; once the
    server is back the same store works again, without reopening."""
    await Store.migrate(POLICY, tmp_path, settings)
    store = await _open(settings, tmp_path, clock)
    try:
        await store.put("registration", REGISTRATION)
        postgres_server.stop()
        with pytest.raises(StorageUnavailable) as lost:
            await store.put("registration", REGISTRATION)
        assert "hunter" not in str(lost.value)
        assert str(urlsplit(settings.dsn).password) not in str(lost.value)
        with pytest.raises(StorageUnavailable):
            await store.find("registration", sip_username="alice")
        postgres_server.start()
        assert len(await store.find("registration", sip_username="alice")) == 1
    finally:
        postgres_server.start()
        await store.close()

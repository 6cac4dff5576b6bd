"""Deletion that deletes: a deleted row leaves the database's live files, and the audit
bounds how long it may wait to (privacy/postgres.py `purge_deleted`, privacy/audit.py).

The PostgreSQL tests own the server's data directory (tests/pgserver.py): after a
CHECKPOINT has written every page, they read the database's files (tables, indexes,
TOAST, the catalog) for a marker stored in plain fields. A plain VACUUM is shown to
leave the marker there, so the scans can fail; the purge is shown to take it out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from privacy.audit import PURGE_PREFIX, CategoryVerdict, audit, format_report
from privacy.clock import ManualClock
from privacy.database import StoreSettings, parse_store
from privacy.keys import Keyring
from privacy.notice import Controller, parse_controller, render_notice
from privacy.policy import load_policy
from privacy.store import Store, Subject, table_spec
from tests.pgserver import PostgresServer
from tomlsections.reader import ConfigError, Section

# Stored plain (not encrypted): pbx_serial is indexed too, so the index must lose it.
APP_MARKER = "canary-app-7Q4ZV9"
SERIAL_MARKER = "canary-pbx-XK31QM"
ALICE = Subject("alice", SERIAL_MARKER)
REGISTRATION = "c_registration"


def registration(subject: Subject, app_id: str) -> dict[str, str | int]:
    return {
        "pbx_serial": subject.pbx_serial,
        "sip_username": subject.sip_username,
        "instance": f"urn:uuid:{subject.sip_username}",
        "phone_ip": "198.51.100.7",
        "phone_port": 5060,
        "expires_at": 3600,
        "pbx_ip": "203.0.113.9",
        "pbx_port": 5061,
        "push_provider": "apns",
        "push_token": f"token-of-{subject.sip_username}",
        "push_app_id": app_id,
    }


@pytest.fixture
async def pg_store(
    tmp_path: Path, clock: ManualClock, postgres_store_dsn: str
) -> AsyncIterator[Store]:
    settings = StoreSettings(backend="postgresql", dsn=postgres_store_dsn)
    store = await Store.create(
        load_policy("auerproxy"), Keyring.generate(), tmp_path, clock, settings
    )
    yield store
    await store.close()


def database_name(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


def markers_on_disk(server: PostgresServer, dsn: str) -> set[str]:
    """The markers found in any file of the test's database, every page written first."""
    server.checkpoint()
    found: set[str] = set()
    for path in server.database_files(database_name(dsn)):
        data = path.read_bytes()
        found |= {m for m in (APP_MARKER, SERIAL_MARKER) if m.encode() in data}
    return found


async def put_alice_among_others(store: Store) -> None:
    # Alice last: her row sits lowest in the page, where nothing moves over it when a
    # vacuum compacts the page around the space it freed.
    for name in ("bob", "carol", "dave"):
        await store.put("registration", registration(Subject(name, "0042137"), "app-x"))
    await store.put("registration", registration(ALICE, APP_MARKER))


def purge_row(verdicts: list[CategoryVerdict], table: str = REGISTRATION) -> CategoryVerdict:
    found = [v for v in verdicts if v.category == f"{PURGE_PREFIX}{table}"]
    assert len(found) == 1, [v.category for v in verdicts]
    return found[0]


async def test_a_plain_vacuum_leaves_a_deleted_row_in_the_files_and_the_sweep_purges_it(
    pg_store: Store, postgres_server: PostgresServer, postgres_store_dsn: str, raw_dsn: str
) -> None:
    await put_alice_among_others(pg_store)
    assert markers_on_disk(postgres_server, postgres_store_dsn) == {APP_MARKER, SERIAL_MARKER}

    # A deletion without its purge (as store.delete leaves it for the next sweep), then
    # the vacuum PostgreSQL's autovacuum would run: the bytes stay in heap and index.
    tables = [table_spec(pg_store.policy.category("registration"))]
    deleted = await pg_store.backend.delete_subject(tables, pg_store.subject_index(ALICE))
    assert deleted == {REGISTRATION: 1}
    conn = await asyncpg.connect(raw_dsn)
    try:
        await conn.execute(f"VACUUM {REGISTRATION}")
    finally:
        await conn.close()
    assert markers_on_disk(postgres_server, postgres_store_dsn) == {APP_MARKER, SERIAL_MARKER}
    assert purge_row(await audit(pg_store, Path("/nonexistent"))).oldest_age_seconds is not None

    swept = await pg_store.delete_expired()  # nothing expired; it purges what is marked

    assert swept["registration"][1] == 0
    assert markers_on_disk(postgres_server, postgres_store_dsn) == set()
    assert len(await pg_store.find("registration")) == 3  # the others' rows moved intact
    row = purge_row(await audit(pg_store, Path("/nonexistent")))
    assert (row.verdict, row.oldest_age_seconds, row.limit_seconds) == ("ok", None, 7200)
    assert "none waiting; last rewrite" in row.detail


async def test_an_erasure_takes_the_subjects_row_out_of_table_index_and_catalog_files(
    pg_store: Store, postgres_server: PostgresServer, postgres_store_dsn: str
) -> None:
    await put_alice_among_others(pg_store)
    assert markers_on_disk(postgres_server, postgres_store_dsn) == {APP_MARKER, SERIAL_MARKER}

    deleted = await pg_store.delete_subject(ALICE)  # every category naming a subject
    assert {k: v for k, v in deleted.items() if v} == {"registration": 1}

    assert markers_on_disk(postgres_server, postgres_store_dsn) == set()
    row = purge_row(await audit(pg_store, Path("/nonexistent")))
    assert row.verdict == "ok"
    assert row.detail.startswith("rewritten (VACUUM FULL) after the deletion; none waiting")
    subjects = purge_row(await audit(pg_store, Path("/nonexistent")), "subjects")
    assert "last rewrite" in subjects.detail  # the subject's blind index went too


async def test_the_audit_calls_a_deletion_waiting_past_vacuum_within_a_violation(
    pg_store: Store, raw_dsn: str
) -> None:
    await put_alice_among_others(pg_store)
    await pg_store.delete("registration", pbx_serial=SERIAL_MARKER)  # purged at the sweep
    waiting = purge_row(await audit(pg_store, Path("/nonexistent")))
    assert waiting.verdict == "ok"
    assert waiting.oldest_age_seconds is not None
    assert waiting.oldest_age_seconds < 7200
    assert "; deleted rows waiting " in waiting.detail
    assert " (within 2h)" in waiting.detail

    # Two hours and a minute ago, as a sweeper that stopped would leave it.
    conn = await asyncpg.connect(raw_dsn)
    try:
        await conn.execute(
            "UPDATE purges SET pending_since = now() - interval '2 hours 1 minute'"
            " WHERE table_name = $1",
            REGISTRATION,
        )
    finally:
        await conn.close()
    verdicts = await audit(pg_store, Path("/nonexistent"))
    late = purge_row(verdicts)
    assert late.verdict == "violation"
    assert late.detail.startswith(
        "rewritten (VACUUM FULL) after the deletion; deleted rows waiting 2h 1m (longer than 2h)"
    )
    assert "VIOLATION" in format_report(verdicts)

    await pg_store.delete_expired()
    assert purge_row(await audit(pg_store, Path("/nonexistent"))).verdict == "ok"


async def test_rows_an_open_snapshot_still_sees_stay_marked_until_it_ends(
    pg_store: Store, postgres_server: PostgresServer, postgres_store_dsn: str, raw_dsn: str
) -> None:
    await put_alice_among_others(pg_store)
    # A long reader elsewhere in the database (a report, a dump of other tables): its
    # snapshot predates the erasure, so VACUUM FULL must copy Alice's row along.
    reader = await asyncpg.connect(raw_dsn)
    try:
        snapshot = reader.transaction(isolation="repeatable_read", readonly=True)
        await snapshot.start()
        await reader.fetchval("SELECT count(*) FROM retention_runs")

        await pg_store.delete_subject(ALICE)

        assert markers_on_disk(postgres_server, postgres_store_dsn) == {
            APP_MARKER,
            SERIAL_MARKER,
        }
        row = purge_row(await audit(pg_store, Path("/nonexistent")))
        assert row.oldest_age_seconds is not None  # not called purged
        await snapshot.rollback()
    finally:
        await reader.close()

    assert await pg_store.backend.purge_deleted() == [REGISTRATION, "subjects"]
    assert markers_on_disk(postgres_server, postgres_store_dsn) == set()
    assert purge_row(await audit(pg_store, Path("/nonexistent"))).oldest_age_seconds is None


async def test_a_table_the_role_does_not_own_stays_marked_and_says_why(
    pg_store: Store,
    postgres_server: PostgresServer,
    postgres_store_dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await put_alice_among_others(pg_store)
    # Tables migrated by another role, the service role granted their rows only: VACUUM
    # would warn and skip the table, so the purge must not count it as done.
    database = database_name(postgres_store_dsn)
    postgres_server._admin(f"ALTER DATABASE {database} OWNER TO postgres")
    as_superuser(
        postgres_server,
        database,
        f"ALTER TABLE {REGISTRATION} OWNER TO postgres",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {REGISTRATION} TO softrelay",
    )
    await pg_store.delete("registration", pbx_serial=SERIAL_MARKER)

    assert await pg_store.backend.purge_deleted() == []

    assert markers_on_disk(postgres_server, postgres_store_dsn) == {APP_MARKER, SERIAL_MARKER}
    assert purge_row(await audit(pg_store, Path("/nonexistent"))).oldest_age_seconds is not None
    deferred = [r for r in caplog.records if r.getMessage() == "store.purge_deferred"]
    assert [getattr(r, "fields", None) for r in deferred] == [
        {"table": REGISTRATION, "reason": "the role softrelay connects as does not own it"}
    ]


def as_superuser(server: PostgresServer, database: str, *statements: str) -> None:
    """Statements run by the server's superuser in the test's database (unix socket)."""
    commands = [arg for sql in statements for arg in ("-c", sql)]
    server._tool(
        "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(server.socket_dir),
        "-p", str(server.port), "-U", "postgres", "-d", database, *commands,
        as_server=False,
    )  # fmt: skip


@pytest.fixture
def raw_dsn(postgres_store_dsn: str) -> str:
    """The test database's DSN for a connection of the test's own, beside the store's."""
    return postgres_store_dsn


# --- both backends --------------------------------------------------------------------


@pytest.mark.both_backends
async def test_the_audit_says_how_deleted_rows_leave_the_files_on_either_backend(
    store: Store, store_settings: StoreSettings
) -> None:
    await store.put("registration", registration(ALICE, APP_MARKER))
    await store.delete_subject(ALICE)
    rows = [
        v for v in await audit(store, Path("/nonexistent")) if v.category.startswith(PURGE_PREFIX)
    ]
    assert rows
    assert {v.verdict for v in rows} == {"ok"}
    if store_settings.backend == "sqlite":
        assert [(v.category, v.detail) for v in rows] == [
            (
                f"{PURGE_PREFIX}softrelay.db",
                "overwritten as deleted (secure_delete), the WAL truncated after each"
                " deletion and sweep",
            )
        ]
    else:
        assert purge_row(rows).limit_seconds == 7200


def test_vacuum_within_is_read_from_the_store_section_and_bounded(tmp_path: Path) -> None:
    source = tmp_path / "softrelay.toml"

    def parsed(values: dict[str, object]) -> StoreSettings:
        return parse_store(Section(values, source, "store"))

    assert parsed({}).vacuum_within == 7200
    assert parsed({"vacuum_within": "30m"}).vacuum_within == 1800
    with pytest.raises(ConfigError) as refused:
        parsed({"vacuum_within": "30s"})
    assert str(refused.value) == f"{source}: store.vacuum_within: must be at least 1m"


# --- the notice: the backup and WAL window --------------------------------------------


def controller_with(tmp_path: Path, values: dict[str, object]) -> Controller:
    return parse_controller(Section(values, tmp_path / "softrelay.toml", "controller"))


@pytest.mark.parametrize(
    ("lang", "heading", "window"),
    [
        ("en", "## Deleted data and backups", "for up to 14 days; then they are deleted too"),
        ("de", "## Gelöschte Daten und Sicherungen", "bis zu 14 Tage in"),
    ],
)
def test_the_notice_states_the_backup_window_the_operator_configured(
    tmp_path: Path, lang: str, heading: str, window: str
) -> None:
    controller = controller_with(tmp_path, {"backup_retention": "14d"})
    text = " ".join(render_notice(load_policy("auerproxy"), controller, lang).split())
    assert heading in text
    assert window in text


def test_the_backup_window_is_said_in_whole_days_rounded_up_or_not_at_all(
    tmp_path: Path,
) -> None:
    assert controller_with(tmp_path, {"backup_retention": "36h"}).backup_retention_days == 2
    unset = controller_with(tmp_path, {})
    assert unset.backup_retention_days is None
    assert "backups" not in render_notice(load_policy("auerproxy"), unset, "en")
    with pytest.raises(ConfigError) as refused:
        controller_with(tmp_path, {"backup_retention": "12h"})
    expected = f"{tmp_path / 'softrelay.toml'}: controller.backup_retention: must be at least 1d"
    assert str(refused.value) == expected

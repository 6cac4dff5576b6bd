"""PostgreSQL backend: the store of a fleet, one database several softrelay processes share.

The same tables as SQLite (privacy/sqlite.py), the same meta columns and the same
semantics, statement for statement; column types mapped (`_PG_TYPE`). Driver: asyncpg
(docs/design.md, "PostgreSQL", says why, with the measurements).

Structure, for what later builds on it:
- `_connection()` is the one place a connection is taken from the pool (optionally
  inside a transaction), and the one place driver exceptions become the store's:
  connection loss, a server shutting down or starting, a pool or statement timeout ->
  `StorageUnavailable`. Nothing above this module sees an asyncpg type.
- The schema is never changed by opening: `create` checks the version and the category
  tables and refuses with the line that says what to run; `migrate` (`softrelay db
  migrate`) changes it, in one transaction, under an advisory lock so two migrating
  processes take turns. privacy/migrations.py says why.
- Deletion that deletes: every DELETE marks its table in `purges` in the same
  statement; `purge_deleted()` (after a sweep and an erasure) rewrites each marked table
  with VACUUM FULL, because a plain or auto vacuum only frees a dead row's space and
  leaves its bytes in the table's and its indexes' files until reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeAlias

import asyncpg
import asyncpg.pool

from privacy.backend import (
    JOBS,
    META_COLUMNS,
    ROW_ID,
    ChangeFeed,
    PurgeState,
    RequestEntry,
    RetentionRun,
    Row,
    SchemaMismatch,
    SqlValue,
    StorageUnavailable,
    TableSpec,
    TableStats,
    as_expected,
)
from privacy.batches import GroupCommit
from privacy.database import DSN_KEY, StoreSettings, dsn_target
from privacy.migrations import (
    MIGRATE_COMMAND,
    RESTRICTIONS_CHANNEL,
    check_version,
    pending,
    statements,
)
from privacy.tasks import Tasks
from tomlsections.reader import ConfigError

log = logging.getLogger("softrelay.privacy")

_PG_TYPE = {"TEXT": "TEXT", "INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "BLOB": "BYTEA"}
CONNECT_TIMEOUT = 10.0  # seconds to connect, at start and when the pool reconnects
# Seconds to get a connection of the pool while serving, a new connection's connect
# included: a server gone away (host down, route lost) is StorageUnavailable within
# this, not a caller (a phone's REGISTER) stalled for a TCP connect timeout.
ACQUIRE_TIMEOUT = 5.0
PING_TIMEOUT = 2.0  # seconds for the server to answer the health check's `SELECT 1`
# Taken by `migrate` for its transaction: two `db migrate` at once take turns.
MIGRATE_LOCK = 0x736F_6674_0001  # "soft" 1
# The session locks of the jobs that run on one process at a time (`exclusive`).
JOB_LOCKS = {job: MIGRATE_LOCK + 1 + i for i, job in enumerate(JOBS)}
# The restriction feed (`restriction_changes`): how often its connection must answer,
# and for how long an answer is trusted (the SQLite store's re-read bound); then how
# long it waits before connecting again, doubled per failure up to the cap, jittered.
FEED_HEARTBEAT = 1.0
FEED_TRUSTED = 2.0
FEED_RETRY = 0.5
FEED_RETRY_MAX = 10.0
FEED_APPLICATION = "softrelay-listen"  # its connection's name in pg_stat_activity
# The driver's and the network's ways of saying "the database is not there now": class
# 08 (connection exception), 57P01-57P03 (shutdown, crash, starting up), a connection
# refused or reset, no answer in time. An outage: the pool's connections are dropped.
_LOST: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # Seen when a connection that died in the middle of a statement is used again: one
    # connection is never shared between calls here, so it means that connection is gone.
    asyncpg.InternalClientError,
)
# The server answered, too busy to do it: 53300 (too many connections), 57014 (statement
# timeout: overloaded or locked). This call fails; the pool's connections are sound, and
# dropping them would only add connects to a server short of them.
_BUSY: tuple[type[BaseException], ...] = (
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,
)
_UNAVAILABLE = (*_LOST, *_BUSY)
# What the first connection may fail with besides: the server refusing the role or the
# database, a DSN the driver cannot read.
_CONNECT_FAILED: tuple[type[BaseException], ...] = (
    *_UNAVAILABLE,
    asyncpg.PostgresError,
    asyncpg.ClientConfigurationError,
    ValueError,
)
# Tables an erasure and the account rule delete from besides the category tables.
SUBJECT_TABLES = ("subjects", "restrictions")
# Seconds a purge waits for a table's lock: VACUUM FULL queued behind a long reader
# would hold up every statement on the table queued behind it. Not free: next purge.
PURGE_LOCK_WAIT = 2.0
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# VACUUM VERBOSE's count of deleted rows it had to copy (PostgreSQL's English message;
# a server with other lc_messages reports none, and a purge is trusted as done).
_KEPT = re.compile(r"(\d+) dead row versions cannot be removed yet")
_Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
# The puts of one loop turn committed together hold at most this many: a batch is one
# transaction, its row locks held until its commit.
PUT_BATCH = 128


@dataclass(frozen=True, slots=True)
class _Put:
    """One caller's put, its row built, waiting for its batch."""

    table: TableSpec
    values: Row
    subject: bytes | None
    now: float


class PostgresBackend:
    def __init__(self, pool: asyncpg.Pool, settings: StoreSettings) -> None:
        self._pool = pool
        self._settings = settings
        self._target = dsn_target(settings.dsn)
        self._where = f"PostgreSQL at {self._target}"
        # Set by a call that found the server gone, cleared by the next that reached it.
        self.outage: StorageUnavailable | None = None
        self._feed: RestrictionFeed | None = None
        self._puts: GroupCommit[_Put, int] = GroupCommit(
            self._write_puts, limit=PUT_BATCH, failed="store.put_writer_failed"
        )

    @classmethod
    async def create(cls, settings: StoreSettings, tables: Sequence[TableSpec]) -> PostgresBackend:
        """Connect, and check that the schema is this softrelay's and holds `tables`."""
        backend = cls(await _pool(settings), settings)
        try:
            async with backend._connection() as conn:
                check_version(await _version(conn), backend._where)
                missing = await _missing(conn, tables)
        except BaseException:
            await backend.close()
            raise
        if missing:
            await backend.close()
            raise SchemaMismatch(
                f"{backend._where}: {missing[0]} is missing (the policy declares it):"
                f" run `{MIGRATE_COMMAND}`"
            )
        return backend

    @classmethod
    async def migrate(cls, settings: StoreSettings, tables: Sequence[TableSpec]) -> list[str]:
        """Take the schema steps the database lacks and create the category tables,
        columns and indexes the policy declares; what was done, in order."""
        backend = cls(await _pool(settings), settings)
        done: list[str] = []
        try:
            async with backend._connection(transaction=True) as conn:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                    " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                for version, step in pending(await _version(conn), backend._where):
                    for statement in statements(step.postgresql):
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        step.name,
                    )
                    done.append(f"schema version {version}: {step.name}")
                for table in tables:
                    done += await _ensure_table(conn, table)
        finally:
            await backend.close()
        return done

    @classmethod
    async def status(
        cls, settings: StoreSettings, tables: Sequence[TableSpec]
    ) -> tuple[int, list[str]]:
        """The schema version, and what the policy's tables lack (`db status`)."""
        backend = cls(await _pool(settings), settings)
        try:
            async with backend._connection(transaction=False) as conn:
                version = await _version(conn)
                missing = await _missing(conn, tables) if version else []
        finally:
            await backend.close()
        return version, missing

    @asynccontextmanager
    async def _connection(self, *, transaction: bool = True) -> AsyncIterator[_Conn]:
        """A connection of the pool (in a transaction unless told not), driver errors
        translated: the one place for both, and where an outage begins and ends.

        No circuit breaker: every call tries the server (a refused connect fails in
        microseconds, a silent one within ACQUIRE_TIMEOUT), so the first call after the
        server is back succeeds, and the pool reconnects on its own."""
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                if transaction:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        except _BUSY as exc:
            raise self._unavailable(exc) from exc
        except _LOST as exc:
            raise await self._lost(exc) from exc
        except asyncpg.InternalClientError as exc:
            # The driver's own state broken ("cannot switch to state ..."): what a server
            # going away in the middle of a statement can leave. An outage if the server
            # does not answer now; else a fault to report as such.
            if await self._answers():
                raise
            raise await self._lost(exc) from exc
        if self.outage is not None:
            self.outage = None
            log.warning("store.available", extra={"fields": {"backend": "postgresql"}})

    def _unavailable(self, exc: BaseException) -> StorageUnavailable:
        return StorageUnavailable(f"database at {self._target} unavailable: {_reason(exc)}")

    async def _lost(self, exc: BaseException) -> StorageUnavailable:
        """An outage begins (or goes on): noted, logged once; what to raise."""
        # Connections that were idle in the pool died with the server too: drop them all
        # now, so one failed call per outage, not one per pooled connection.
        await self._pool.expire_connections()
        if self.outage is None:
            log.warning(
                "store.unavailable",
                extra={"fields": {"backend": "postgresql", "reason": _reason(exc)}},
            )
        self.outage = self._unavailable(exc)
        return self._unavailable(exc)

    async def _answers(self) -> bool:
        """Whether the server answers `SELECT 1` now, on a fresh connection of the pool."""
        await self._pool.expire_connections()
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT)
        except _UNAVAILABLE:
            return False
        return True

    async def ping(self) -> None:
        async with self._connection(transaction=False) as conn:
            await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT)

    # --- records --------------------------------------------------------------------

    async def put(
        self, table: TableSpec, row: Callable[[], Row], *, subject: bytes | None, now: float
    ) -> int:
        # Sealed here, on the loop: a few µs of AES-GCM per field; a thread hop per write
        # would cost more (SQLite seals on its own thread, which it has anyway).
        values: Row = {**row(), "subject": subject, "created_at": now, "last_used_at": now}
        return await self._puts.submit(_Put(table, values, subject, now))

    async def _write_puts(self, batch: Sequence[_Put]) -> list[int]:
        """The puts of one loop turn, committed together (privacy/batches.py, group
        commit): their record ids, in order.

        Lock order, so that batches on other connections and processes sharing a record
        or a subject queue instead of deadlocking: the records first, sorted by table and
        record key, then the subjects, sorted; the order of the one-put statement below
        and of `update` (record, then subject). Two puts of one key in a batch are made
        in the order they came, the later one's fields stored, as one after the other."""
        if len(batch) == 1:
            # One statement (the subject's activity in the same one, a CTE): atomic
            # without BEGIN/COMMIT round trips.
            put = batch[0]
            params = list(put.values.values())
            if put.subject is not None:
                params.append(put.now)
            sql = _put_sql(put.table, tuple(put.values), put.subject is not None)
            async with self._connection(transaction=False) as conn:
                record_id: int = await conn.fetchval(sql, *params)
            return [record_id]
        order = sorted(range(len(batch)), key=lambda i: _lock_order(batch[i]))
        ids = [0] * len(batch)
        active: dict[bytes, float] = {}  # each subject's latest use in the batch
        for put in batch:
            if put.subject is not None:
                active[put.subject] = max(put.now, active.get(put.subject, put.now))
        subjects = sorted(active)
        async with self._connection() as conn:
            # One prepared statement per run of the same table and columns, each row's
            # upsert pipelined (`fetchmany`): one round trip per run, not per row.
            start = 0
            while start < len(order):
                first = batch[order[start]]
                names = tuple(first.values)
                end = start + 1
                while end < len(order) and _same_statement(batch[order[end]], first, names):
                    end += 1
                run = order[start:end]
                found = await conn.fetchmany(
                    _upsert_sql(first.table, names) + " RETURNING id",
                    [list(batch[i].values.values()) for i in run],
                )
                for i, record in zip(run, found, strict=True):
                    ids[i] = record[0]
                start = end
            if subjects:
                await conn.execute(_TOUCH_SUBJECTS, subjects, [active[s] for s in subjects])
        return ids

    async def put_new(self, table: TableSpec, row: Callable[[], Row], *, now: float) -> bool:
        values: Row = {**row(), "subject": None, "created_at": now, "last_used_at": now}
        names = ", ".join(values)
        placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        # The key's unique index decides between two processes inserting at once: the
        # second waits for the first's commit, then inserts nothing.
        async with self._connection(transaction=False) as conn:
            status = await conn.execute(
                f"INSERT INTO {table.name} ({names}) VALUES ({placeholders})"
                " ON CONFLICT DO NOTHING",
                *values.values(),
            )
        return _count(status) > 0

    async def replace(
        self,
        table: TableSpec,
        row: Callable[[], Row],
        *,
        subject: bytes,
        where: Mapping[str, SqlValue],
        expect: Mapping[str, SqlValue] | None,
        cutoff: float,
        subject_cutoff: float,
        now: float,
    ) -> bool:
        values: Row = {**row(), "subject": subject, "created_at": now, "last_used_at": now}
        clauses, params = _where(where, first=3)
        select = (
            f"SELECT * FROM {table.name} AS t WHERE {table.basis} > $1 AND (t.subject IS NULL"
            " OR EXISTS (SELECT 1 FROM subjects s WHERE s.subject = t.subject"
            " AND s.last_used_at > $2))"
        )
        if clauses:
            select += " AND " + clauses
        async with self._connection() as conn:
            # A row lock cannot guard a row that is not there yet (the first version of
            # a record): a transaction lock on the table and subject serialises every
            # replace of them, and only replaces take it, so it joins no lock order.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _replace_lock(table, subject))
            found = await conn.fetch(select, cutoff, subject_cutoff, *params)
            if not as_expected([dict(r) for r in found], expect):
                return False
            sql = _put_sql(table, tuple(values), True)
            record_id = await conn.fetchval(sql, *values.values(), now)
            stale = [r["id"] for r in found if r["id"] != record_id]
            if stale:
                await conn.fetchval(
                    _deleting(table.name, "id = ANY($1::bigint[])", 1), stale, table.name
                )
        return True

    async def put_many(
        self, table: TableSpec, rows: Sequence[Callable[[], Row]], *, now: float
    ) -> None:
        if not rows:
            return
        built = [{**row(), "subject": None, "created_at": now, "last_used_at": now} for row in rows]
        # One prepared statement per set of columns (a batch usually has one), all in one
        # transaction: rows whose callers gave different fields keep each value in its
        # own column.
        groups: dict[tuple[str, ...], list[list[SqlValue]]] = {}
        for values in built:
            groups.setdefault(tuple(values), []).append(list(values.values()))
        async with self._connection() as conn:
            for names, params in groups.items():
                await conn.executemany(_upsert_sql(table, names), params)

    async def select(
        self,
        table: TableSpec,
        where: Mapping[str, SqlValue],
        *,
        cutoff: float,
        subject_cutoff: float,
    ) -> list[Row]:
        clauses, params = _where(where, first=3)
        sql = (
            f"SELECT * FROM {table.name} AS t WHERE {table.basis} > $1 AND (t.subject IS NULL"
            " OR EXISTS (SELECT 1 FROM subjects s WHERE s.subject = t.subject"
            " AND s.last_used_at > $2))"
        )
        if clauses:
            sql += " AND " + clauses
        async with self._connection(transaction=False) as conn:
            rows = await conn.fetch(sql + " ORDER BY id", cutoff, subject_cutoff, *params)
        return [dict(row) for row in rows]

    async def touch(self, table: TableSpec, record_id: int, *, now: float) -> bool:
        return await self._update(table, record_id, None, now)

    async def update(
        self,
        table: TableSpec,
        record_id: int,
        values: Callable[[Row], Row],
        *,
        now: float | None,
    ) -> bool:
        return await self._update(table, record_id, values, now)

    async def _update(
        self,
        table: TableSpec,
        record_id: int,
        build: Callable[[Row], Row] | None,
        now: float | None,
    ) -> bool:
        async with self._connection() as conn:
            values: Row = {}
            if build is not None:
                # FOR UPDATE: the row cannot change between reading it and sealing against it.
                current = await conn.fetchrow(
                    f"SELECT * FROM {table.name} WHERE id = $1 FOR UPDATE", record_id
                )
                if current is None:
                    return False
                values = build(dict(current))
            if now is not None:
                values["last_used_at"] = now
            if not values:
                return True
            assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(values, start=2))
            found = await conn.fetch(
                f"UPDATE {table.name} SET {assignments} WHERE id = $1 RETURNING subject",
                record_id,
                *values.values(),
            )
            if found and found[0][0] is not None and now is not None:
                await conn.execute(_TOUCH_SUBJECT, found[0][0], now)
        return bool(found)

    async def scan(self, table: TableSpec, *, after: int, limit: int) -> list[Row]:
        async with self._connection(transaction=False) as conn:
            rows = await conn.fetch(
                f"SELECT * FROM {table.name} WHERE id > $1 ORDER BY id LIMIT $2", after, limit
            )
        return [dict(row) for row in rows]

    async def delete(self, table: TableSpec, where: Mapping[str, SqlValue]) -> int:
        clauses, params = _where(where, first=1)
        async with self._connection(transaction=False) as conn:
            deleted: int = await conn.fetchval(
                _deleting(table.name, clauses or "TRUE", len(params)), *params, table.name
            )
        return deleted

    async def delete_subject(self, tables: Sequence[TableSpec], subject: bytes) -> dict[str, int]:
        # Every table in one transaction: an erasure is whole or not at all.
        async with self._connection() as conn:
            return await _delete_subjects(conn, tables, [subject])

    async def delete_before(self, table: TableSpec, cutoff: float) -> int:
        async with self._connection(transaction=False) as conn:
            deleted: int = await conn.fetchval(
                _deleting(table.name, f"{table.basis} <= $1", 1), cutoff, table.name
            )
        return deleted

    async def delete_inactive_subjects(self, tables: Sequence[TableSpec], cutoff: float) -> int:
        async with self._connection() as conn:
            # FOR UPDATE: a put of another process that marks one of these subjects active
            # waits for this transaction, then records the subject anew with its record.
            rows = await conn.fetch(
                "SELECT subject FROM subjects WHERE last_used_at <= $1 FOR UPDATE", cutoff
            )
            subjects = [row[0] for row in rows]
            await _delete_subjects(conn, tables, subjects)
        return len(subjects)

    # --- restriction (GDPR Art. 18) -------------------------------------------------

    async def restricted_subjects(self) -> frozenset[bytes]:
        async with self._connection(transaction=False) as conn:
            rows = await conn.fetch("SELECT subject FROM restrictions")
        return frozenset(row[0] for row in rows)

    async def restrict(self, subject: bytes, on: bool, *, now: float) -> bool:
        async with self._connection(transaction=False) as conn:
            if on:
                status = await conn.execute(
                    "INSERT INTO restrictions VALUES ($1, $2) ON CONFLICT (subject) DO NOTHING",
                    subject,
                    now,
                )
            else:
                status = await conn.execute("DELETE FROM restrictions WHERE subject = $1", subject)
        return _count(status) > 0

    def restriction_changes(self) -> ChangeFeed | None:
        if self._feed is None:
            # Started by the first reader (serve's relay): a CLI command opens no LISTEN.
            self._feed = RestrictionFeed(self._settings)
            self._feed.start()
        return self._feed

    # --- jobs of one process at a time ----------------------------------------------

    @asynccontextmanager
    async def exclusive(self, job: str) -> AsyncIterator[bool]:
        """A session-level advisory lock, tried without waiting, on a connection of its
        own held for the job: no transaction stays open through a sweep, and a process
        that dies (or loses the connection) releases the lock with its session."""
        key = JOB_LOCKS.get(job)
        if key is None:
            raise ValueError(f"unknown job {job!r}")
        conn = await _connect(self._settings)
        try:
            try:
                got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            except _UNAVAILABLE as exc:
                raise StorageUnavailable(
                    f"database at {self._target} unavailable: {_reason(exc)}"
                ) from exc
            yield got
        finally:
            await _close(conn)  # ends the session, and its lock with it

    # --- the data-subject request trail --------------------------------------------

    async def record_request(self, entry: RequestEntry) -> None:
        async with self._connection(transaction=False) as conn:
            await conn.execute(
                "INSERT INTO dsr_requests (id, type, received_at, actor, outcome, counts)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                entry.id,
                entry.type,
                entry.received_at,
                entry.actor,
                entry.outcome,
                json.dumps(entry.counts, sort_keys=True),
            )

    async def requests(self, limit: int) -> list[RequestEntry]:
        async with self._connection(transaction=False) as conn:
            rows = await conn.fetch(
                "SELECT id, type, received_at, actor, outcome, counts FROM dsr_requests"
                " ORDER BY received_at DESC, seq DESC LIMIT $1",
                limit,
            )
        return [RequestEntry.from_row(dict(r.items())) for r in rows]

    async def subject_last_used(self, subject: bytes) -> float | None:
        async with self._connection(transaction=False) as conn:
            found = await conn.fetchval(
                "SELECT last_used_at FROM subjects WHERE subject = $1", subject
            )
        return None if found is None else float(found)

    # --- audit and bookkeeping ------------------------------------------------------

    async def stats(self, table: TableSpec) -> TableStats:
        return await self._stats(table.name, table.basis)

    async def subject_stats(self) -> TableStats:
        return await self._stats("subjects", "last_used_at")

    async def _stats(self, name: str, basis: str) -> TableStats:
        async with self._connection(transaction=False) as conn:
            row = await conn.fetchrow(f"SELECT count(*), min({basis}) FROM {name}")
        assert row is not None
        return TableStats(row[0], row[1])

    async def tables(self) -> list[str]:
        async with self._connection(transaction=False) as conn:
            return sorted(await _category_tables(conn))

    async def undeclared_columns(self, table: TableSpec) -> dict[str, int]:
        declared = set(META_COLUMNS) | {c.name for c in table.columns}
        async with self._connection(transaction=False) as conn:
            extra = [name for name in await _columns(conn, table.name) if name not in declared]
            return {
                name: await conn.fetchval(f"SELECT count({name}) FROM {table.name}")
                for name in extra
            }

    async def record_runs(self, runs: Sequence[RetentionRun]) -> None:
        async with self._connection() as conn:
            await conn.executemany(
                "INSERT INTO retention_runs (category, cutoff, deleted, ran_at)"
                " VALUES ($1, $2, $3, $4)",
                [(r.category, r.cutoff, r.deleted, r.ran_at) for r in runs],
            )

    async def last_runs(self) -> list[RetentionRun]:
        async with self._connection(transaction=False) as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT ON (category) category, cutoff, deleted, ran_at"
                " FROM retention_runs ORDER BY category, ran_at DESC, id DESC"
            )
        return [RetentionRun(*row) for row in rows]

    async def purge_deleted(self, tables: Sequence[TableSpec] | None = None) -> list[str]:
        names = None if tables is None else [*(t.name for t in tables), *SUBJECT_TABLES]
        purged: list[str] = []
        # VACUUM cannot run in a transaction block: a connection of its own, autocommit.
        async with self._connection(transaction=False) as conn:
            marked = await conn.fetch(
                "SELECT table_name, generation FROM purges WHERE pending_since IS NOT NULL"
                " AND ($1::text[] IS NULL OR table_name = ANY($1)) ORDER BY table_name",
                names,
            )
            for name, generation in marked:
                started = await conn.fetchval("SELECT clock_timestamp()")
                why = await _rewrite(conn, name)
                if why is not None:
                    fields = {"table": name, "reason": why}
                    log.warning("store.purge_deferred", extra={"fields": fields})
                    continue
                # Deleted since the rewrite began (it waited for their locks, or they
                # came after): still marked, from then.
                await conn.execute(
                    "UPDATE purges SET purged_at = clock_timestamp(), pending_since = CASE"
                    " WHEN generation = $2 THEN NULL ELSE $3::timestamptz END"
                    " WHERE table_name = $1",
                    name,
                    generation,
                    started,
                )
                purged.append(name)
        return purged

    async def purge_states(self) -> list[PurgeState]:
        """Every category table and the subjects' tables: the purge marks, with the
        server's own vacuum statistics beside them (a plain vacuum is not a purge)."""
        async with self._connection(transaction=False) as conn:
            rows = await conn.fetch(
                "SELECT t.relname, extract(epoch FROM now() - p.pending_since),"
                " extract(epoch FROM now() - p.purged_at), t.n_dead_tup,"
                " extract(epoch FROM now() - greatest(t.last_vacuum, t.last_autovacuum))"
                " FROM pg_stat_user_tables t LEFT JOIN purges p ON p.table_name = t.relname"
                r" WHERE t.schemaname = current_schema() AND (t.relname LIKE 'c\_%'"
                " OR t.relname = ANY($1)) ORDER BY t.relname",
                list(SUBJECT_TABLES),
            )
        return [
            PurgeState(
                name,
                "rewritten (VACUUM FULL) after the deletion",
                self._settings.vacuum_within,
                None if pending is None else float(pending),
                None if purged is None else float(purged),
                dead,
                None if vacuumed is None else float(vacuumed),
            )
            for name, pending, purged, dead, vacuumed in rows
        ]

    async def close(self) -> None:
        await self._puts.close()  # the puts under way committed (or failed) first
        if self._feed is not None:
            await self._feed.close()
        await self._pool.close()


class RestrictionFeed:
    """LISTEN for changes of the restriction marks on a connection of its own (the
    trigger of migration 3 notifies at each change's commit); see ChangeFeed.

    Live only while the connection has answered within FEED_TRUSTED seconds: a
    connection that died without a word (a network cut) stops being trusted as a
    closed one does, so no reader keeps a stale "not restricted" for longer than the
    re-read bound. Lost, it connects again (capped backoff with jitter); `generation`
    moves at the loss and at the new LISTEN, as changes in between went unheard."""

    def __init__(self, settings: StoreSettings) -> None:
        self._settings = settings
        self._generation = 0
        self._answered: float | None = None  # loop time the connection last answered
        # For a caller that waits (a test): set while LISTEN is on, and at every move
        # of the generation (the waiter clears it).
        self.listening = asyncio.Event()
        self.moved = asyncio.Event()
        self._tasks = Tasks(log, "store.restriction_feed_failed")

    def start(self) -> None:
        self._tasks.spawn(self._run(), name="restriction-feed")

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def live(self) -> bool:
        answered = self._answered
        return answered is not None and asyncio.get_running_loop().time() - answered < FEED_TRUSTED

    async def close(self) -> None:
        await self._tasks.close()

    def _move(self) -> None:
        self._generation += 1
        self.moved.set()

    def _notified(self, *_: object) -> None:
        self._move()
        log.info("store.restrictions_changed", extra={"fields": {}})

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                conn = await _connect(self._settings, FEED_APPLICATION)
            except StorageUnavailable:
                failures += 1
            else:
                failures = 0
                try:
                    await self._listen(conn)
                except Exception as exc:  # any end of the session: heard nothing since
                    log.warning(
                        "store.restrictions_unwatched",
                        extra={"fields": {"error": type(exc).__name__}},
                    )
                finally:
                    self._answered = None
                    self.listening.clear()
                    self._move()
                    await _close(conn)
            delay = min(FEED_RETRY_MAX, FEED_RETRY * 2**failures)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret

    async def _listen(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        loop = asyncio.get_running_loop()
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(RESTRICTIONS_CHANNEL, self._notified)
        # Heard from here on: a read of the marks taken before may be stale.
        self._answered = loop.time()
        self._move()
        self.listening.set()
        log.info("store.restrictions_watched", extra={"fields": {}})
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), FEED_HEARTBEAT)
            if lost.is_set():
                raise StorageUnavailable("the connection closed")
            await conn.fetchval("SELECT 1", timeout=FEED_HEARTBEAT)
            self._answered = loop.time()


# --- connecting ------------------------------------------------------------------------


async def _pool(settings: StoreSettings) -> asyncpg.Pool:
    """The pool, its first connection made: a DSN that cannot work stops here with a
    ConfigError naming the file and `store.dsn`, and the host and port, never the DSN."""
    target = dsn_target(settings.dsn)
    if not settings.dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(settings.source, DSN_KEY, "expected a postgresql:// URL")
    try:
        pool = await asyncpg.create_pool(
            settings.dsn,
            # No floor: asyncpg keeps one up from a task that logs a traceback every
            # retry while the server is down. Connections are made as calls need them.
            min_size=0,
            max_size=settings.pool_size,
            timeout=CONNECT_TIMEOUT,
            # Client side as well: a server that stopped answering mid-statement.
            command_timeout=settings.statement_timeout + 5,
            server_settings={
                "application_name": "softrelay",
                "statement_timeout": str(int(settings.statement_timeout * 1000)),
            },
            reset=_keep_session,
        )
        # The first connection, made now: a DSN that cannot work stops the start.
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT):
                pass
        except BaseException:
            pool.terminate()
            raise
    except _CONNECT_FAILED as exc:
        raise ConfigError(
            settings.source, DSN_KEY, f"cannot connect to {target}: {_reason(exc)}"
        ) from None  # the driver's exception may quote the DSN: not chained
    return pool


async def _keep_session(_conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's reset of a connection given back: nothing beyond what asyncpg always
    does first (roll back a transaction left open, drop the connection's listeners).

    Its default reset query (advisory unlock, CLOSE ALL, UNLISTEN *, RESET ALL) is a
    second round trip per statement (bench/README.md: +21% writes/s without it) and
    would reset nothing here: no pooled connection is given session state. The
    advisory locks are transaction-level (`migrate`) or held on connections of their
    own (`exclusive`), LISTEN has its own connection (`RestrictionFeed`), no cursor
    outlives its transaction, and the one SET (`_rewrite`'s lock_timeout) is RESET
    before the connection goes back."""


async def _connect(
    settings: StoreSettings, application: str = "softrelay"
) -> asyncpg.Connection[asyncpg.Record]:
    """A connection outside the pool: for a job's lock, and for LISTEN, which hold
    theirs for long and must not take one from the statements' pool."""
    try:
        conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
            settings.dsn,
            timeout=CONNECT_TIMEOUT,
            # As the pool's connections (`_pool`).
            command_timeout=settings.statement_timeout + 5,
            server_settings={
                "application_name": application,
                "statement_timeout": str(int(settings.statement_timeout * 1000)),
            },
        )
    except _UNAVAILABLE as exc:
        raise StorageUnavailable(
            f"database at {dsn_target(settings.dsn)} unavailable: {_reason(exc)}"
        ) from None  # the driver's exception may quote the DSN: not chained
    return conn


async def _close(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """End a connection of its own: politely (its session's locks released before
    this returns), or at once if it is broken."""
    try:
        await conn.close(timeout=CONNECT_TIMEOUT)
    except Exception:  # already broken: the server ends the session on its own
        conn.terminate()


def _reason(exc: BaseException) -> str:
    """Why, in a few words that cannot carry the DSN: the OS's reason, or the server's
    SQLSTATE message (which names a role or a database, never a password)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, asyncpg.PostgresError):
        return f"{exc.args[0] if exc.args else type(exc).__name__} ({exc.sqlstate})"
    if isinstance(exc, asyncpg.ClientConfigurationError | ValueError):
        return "the DSN is not valid"
    return type(exc).__name__


# --- schema ----------------------------------------------------------------------------


async def _version(conn: _Conn) -> int:
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return 0
    version: int = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
    return version


async def _category_tables(conn: _Conn) -> list[str]:
    rows = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        r" AND tablename LIKE 'c\_%'"
    )
    return [row[0] for row in rows]


async def _columns(conn: _Conn, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
        table,
    )
    return [row[0] for row in rows]


async def _indexes(conn: _Conn, table: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = $1",
        table,
    )
    return {row[0] for row in rows}


def _index_ddl(table: TableSpec) -> dict[str, str]:
    """Every index the table needs, by name (the same names as SQLite's)."""
    ddl = {
        f"{table.name}__basis": f"CREATE INDEX {table.name}__basis ON {table.name}({table.basis})",
        f"{table.name}__subject": f"CREATE INDEX {table.name}__subject ON {table.name}(subject)",
    }
    for column in table.columns:
        if column.indexed:
            name = f"{table.name}__{column.name}"
            ddl[name] = f"CREATE INDEX {name} ON {table.name}({column.name})"
    if table.unique:
        ddl[f"{table.name}__key"] = (
            f"CREATE UNIQUE INDEX {table.name}__key ON {table.name}({', '.join(table.unique)})"
        )
    return ddl


async def _missing(conn: _Conn, tables: Sequence[TableSpec]) -> list[str]:
    """What the policy's tables need and the database lacks, described."""
    missing: list[str] = []
    for table in tables:
        existing = await _columns(conn, table.name)
        if not existing:
            missing.append(f"table {table.name}")
            continue
        missing += [
            f"column {table.name}.{c}"
            for c in (*META_COLUMNS, *(c.name for c in table.columns))
            if c not in existing
        ]
        indexes = await _indexes(conn, table.name)
        missing += [f"index {name}" for name in _index_ddl(table) if name not in indexes]
    return missing


async def _ensure_table(conn: _Conn, table: TableSpec) -> list[str]:
    """Create the category's table, or add the columns and indexes the policy declares
    since; what was done."""
    done: list[str] = []
    existing = await _columns(conn, table.name)
    if not existing:
        fields = "".join(f", {c.name} {_PG_TYPE[c.sqltype]}" for c in table.columns)
        await conn.execute(
            f"CREATE TABLE {table.name} (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
            " subject BYTEA, created_at DOUBLE PRECISION NOT NULL,"
            f" last_used_at DOUBLE PRECISION NOT NULL, {ROW_ID} BYTEA{fields})"
        )
        done.append(f"table {table.name}")
    else:
        for column in (c for c in table.columns if c.name not in existing):
            await conn.execute(
                f"ALTER TABLE {table.name} ADD COLUMN {column.name} {_PG_TYPE[column.sqltype]}"
            )
            done.append(f"column {table.name}.{column.name}")
    indexes = await _indexes(conn, table.name)
    wanted = _index_ddl(table)
    for name, ddl in wanted.items():
        if name not in indexes:
            await conn.execute(ddl)
            done.append(f"index {name}")
    for column in table.columns:
        name = f"{table.name}__{column.name}"
        if name in indexes and name not in wanted:
            # The policy no longer looks the column up alone (or the key's index serves
            # it): the index would only cost every write.
            await conn.execute(f"DROP INDEX {name}")
            done.append(f"dropped index {name}")
    return done


# --- statements ------------------------------------------------------------------------

_TOUCH_SUBJECT = (
    "INSERT INTO subjects VALUES ($1, $2) ON CONFLICT (subject) DO UPDATE"
    " SET last_used_at = greatest(subjects.last_used_at, excluded.last_used_at)"
)
# Many subjects' activity in one statement, locked in the order given (sorted, distinct:
# ON CONFLICT cannot update one row twice in a statement).
_TOUCH_SUBJECTS = (
    "INSERT INTO subjects SELECT * FROM unnest($1::bytea[], $2::float8[])"
    " ON CONFLICT (subject) DO UPDATE"
    " SET last_used_at = greatest(subjects.last_used_at, excluded.last_used_at)"
)


def _lock_order(put: _Put) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """Where a put's record lock falls in the one order every batch takes its locks in:
    by table, then record key (each value after its type's name, so values of any
    type compare; a table without a key inserts rows no other put can hold)."""
    return put.table.name, tuple(
        (type(v).__name__, v) for v in map(put.values.get, put.table.unique)
    )


def _same_statement(put: _Put, first: _Put, names: tuple[str, ...]) -> bool:
    return put.table.name == first.table.name and tuple(put.values) == names


@lru_cache(maxsize=256)
def _upsert_sql(table: TableSpec, names: tuple[str, ...]) -> str:
    values = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({values})"
    if table.unique:
        # Same key: replace the fields, keep the creation time (the record lives on).
        updates = [
            f"{n} = excluded.{n}" for n in names if n not in table.unique and n != "created_at"
        ]
        sql += f" ON CONFLICT ({', '.join(table.unique)}) DO UPDATE SET {', '.join(updates)}"
    return sql


@lru_cache(maxsize=256)
def _put_sql(table: TableSpec, names: tuple[str, ...], with_subject: bool) -> str:
    upsert = _upsert_sql(table, names) + " RETURNING id"
    if not with_subject:
        return upsert
    subject = f"${names.index('subject') + 1}"
    now = f"${len(names) + 1}"
    return (
        f"WITH put AS ({upsert}), active AS ("
        f"INSERT INTO subjects VALUES ({subject}, {now}) ON CONFLICT (subject) DO UPDATE"
        " SET last_used_at = greatest(subjects.last_used_at, excluded.last_used_at))"
        " SELECT id FROM put"
    )


def _replace_lock(table: TableSpec, subject: bytes) -> int:
    """The advisory lock key of `replace` on a table and subject (a signed 64-bit int)."""
    digest = hashlib.blake2b(table.name.encode() + b"\x00" + subject, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _where(where: Mapping[str, SqlValue], *, first: int) -> tuple[str, list[SqlValue]]:
    clauses: list[str] = []
    params: list[SqlValue] = []
    for name, value in where.items():
        if value is None:
            clauses.append(f"{name} IS NULL")
        else:
            params.append(value)
            clauses.append(f"{name} = ${first + len(params) - 1}")
    return " AND ".join(clauses), params


def _count(status: str) -> int:
    """The row count of a command tag: 'DELETE 3', 'INSERT 0 1'."""
    return int(status.rsplit(" ", 1)[-1])


async def _delete_subjects(
    conn: _Conn, tables: Sequence[TableSpec], subjects: list[bytes]
) -> dict[str, int]:
    """Inside the caller's transaction; rows deleted per table."""
    counts = dict.fromkeys((t.name for t in tables), 0)
    if not subjects:
        return counts
    names = [*(t.name for t in tables), *SUBJECT_TABLES]
    for name in names:
        deleted = await conn.fetchval(
            _deleting(name, "subject = ANY($1::bytea[])", 1), subjects, name
        )
        if name in counts:
            counts[name] += deleted
    return counts


def _deleting(table: str, where: str, params: int) -> str:
    """DELETE FROM `table` WHERE `where` (which uses $1..$params), in one statement with
    the mark that its table holds deleted rows (when any went) and their count: the
    mark commits with the deletion, so no purge can miss it. The table's name is the
    last parameter."""
    name = f"${params + 1}::text"
    return (
        f"WITH gone AS (DELETE FROM {table} WHERE {where} RETURNING 1), marked AS ("
        f"INSERT INTO purges AS p (table_name, pending_since, generation) SELECT {name},"
        " clock_timestamp(), 1 WHERE EXISTS (SELECT FROM gone) ON CONFLICT (table_name)"
        " DO UPDATE SET generation = p.generation + 1,"
        " pending_since = coalesce(p.pending_since, excluded.pending_since))"
        " SELECT count(*) FROM gone"
    )


async def _rewrite(conn: _Conn, name: str) -> str | None:
    """VACUUM FULL one table: None when done, else why not (the caller leaves it marked).

    The rewrite copies the live rows into new files and truncates the old ones at
    commit, indexes and TOAST included. Rows an open transaction may still see (a
    snapshot older than the deletion, a replication slot's) are copied too: VERBOSE
    says how many, and then the purge did not happen."""
    if not _PLAIN_NAME.fullmatch(name):
        return "not a table of softrelay's"
    allowed = await conn.fetchval(
        "SELECT pg_has_role(c.relowner, 'USAGE') OR pg_has_role(d.datdba, 'USAGE')"
        " FROM pg_class c, pg_database d"
        " WHERE c.oid = to_regclass($1) AND d.datname = current_database()",
        name,
    )
    if allowed is None:
        return "no such table"
    if not allowed:
        # VACUUM would only warn and skip it: the role must own the tables (db migrate).
        return "the role softrelay connects as does not own it"
    details: list[str] = []

    def heard(_conn: object, message: asyncpg.PostgresLogMessage) -> None:
        details.append(message.detail or "")

    await conn.execute(f"SET lock_timeout = {int(PURGE_LOCK_WAIT * 1000)}")
    conn.add_log_listener(heard)
    try:
        await conn.execute(f"VACUUM (FULL, ANALYZE, VERBOSE) {name}")
    except asyncpg.LockNotAvailableError:
        return f"its lock was not free within {PURGE_LOCK_WAIT:g} s"
    except asyncpg.QueryCanceledError:
        return "the rewrite took longer than statement_timeout"
    finally:
        conn.remove_log_listener(heard)
        await conn.execute("RESET lock_timeout")
    kept = sum(int(m.group(1)) for d in details if (m := _KEPT.match(d)))
    if kept:
        return f"{kept} deleted row versions still visible to an open transaction"
    return None


__all__ = ["PostgresBackend", "RestrictionFeed"]

"""SQLite backend: the embedded default, one file under data_dir in WAL mode.

One thread owns the connection and runs every statement (`privacy.dbthread`), so the
event loop never blocks on the disk and SQLite never sees two threads; concurrent puts
share a transaction (group commit); WAL checkpoints run on a thread of their own, off
the commit path (`privacy.walcheckpoint`). `secure_delete` overwrites
deleted rows in place and a checkpoint after each sweep truncates the WAL, so data the
sweeper removed does not linger in free pages or the log.

Schema: the numbered steps of `privacy.migrations` for the fixed tables, taken on open
(that module says why SQLite migrates itself and PostgreSQL does not); one table per
database category, created and extended from the policy at open (`c_<category>`).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache, partial
from pathlib import Path
from typing import TypeVar

from privacy.backend import (
    JOBS,
    META_COLUMNS,
    ROW_ID,
    ChangeFeed,
    PurgeState,
    RequestEntry,
    RetentionRun,
    Row,
    SqlValue,
    StorageUnavailable,
    TableSpec,
    TableStats,
    as_expected,
)
from privacy.dbthread import DatabaseThread
from privacy.migrations import pending, statements
from privacy.walcheckpoint import Checkpointer

T = TypeVar("T")


class SQLiteBackend:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._thread: DatabaseThread | None = None
        self._checkpoints: Checkpointer | None = None
        # What the open did to the schema: the steps taken, for `softrelay db migrate`.
        self.applied: list[str] = []

    @classmethod
    async def create(cls, path: Path, tables: Sequence[TableSpec]) -> SQLiteBackend:
        backend = cls(path)
        backend._thread = DatabaseThread(
            "softrelay-sqlite",
            begin=partial(backend._execute, "BEGIN IMMEDIATE"),
            commit=backend._commit,
            rollback=partial(backend._execute, "ROLLBACK"),
        )
        try:
            await backend._run(backend._open, tables)
        except BaseException:
            await backend._thread.stop()
            raise
        return backend

    def _execute(self, sql: str) -> None:
        self.db.execute(sql)

    def _commit(self) -> None:
        self.db.execute("COMMIT")
        if self._checkpoints is not None:
            self._checkpoints.committed(self.db)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        assert self._thread is not None, "backend is closed"
        return await self._thread.call(partial(fn, *args))

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "backend is closed"
        return self._db

    # --- schema ---------------------------------------------------------------------

    def _open(self, tables: Sequence[TableSpec]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self.path.chmod(0o600)
        self._db.row_factory = sqlite3.Row
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "secure_delete=ON",
            "busy_timeout=5000",
        ):
            self._db.execute(f"PRAGMA {pragma}")
        with self._transaction():
            self._migrate()
            for table in tables:
                self._ensure_table(table)
        # Checkpoints on a thread of their own, not inside a commit callers wait for.
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        self._checkpoints = Checkpointer(self.path, page_size)
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.execute(f"PRAGMA journal_size_limit={self._checkpoints.size_limit}")

    def _migrate(self) -> None:
        """Take the steps the file lacks; a file of a newer softrelay raises SchemaMismatch
        (the open's transaction rolls back, the file stays as it was)."""
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        done = self.db.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        for version, step in pending(done.fetchone()[0], str(self.path)):
            for statement in statements(step.sqlite):
                self.db.execute(statement)
            self.db.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, datetime('now'))",
                (version, step.name),
            )
            self.applied.append(f"schema version {version}: {step.name}")

    def _ensure_table(self, table: TableSpec) -> None:
        """Create the category's table, or add the columns the policy declares since."""
        existing = self._columns(table.name)
        if not existing:
            fields = ", ".join(f"{c.name} {c.sqltype}" for c in table.columns)
            self.applied.append(f"table {table.name}")
            self.db.execute(
                f"CREATE TABLE {table.name} (id INTEGER PRIMARY KEY, subject BLOB, "
                f"created_at REAL NOT NULL, last_used_at REAL NOT NULL, {ROW_ID} BLOB, {fields})"
            )
        else:
            if ROW_ID not in existing:  # a database from before the row binding
                self.db.execute(f"ALTER TABLE {table.name} ADD COLUMN {ROW_ID} BLOB")
            for column in table.columns:
                if column.name not in existing:
                    self.applied.append(f"column {table.name}.{column.name}")
                    self.db.execute(
                        f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.sqltype}"
                    )
        self.db.execute(
            f"CREATE INDEX IF NOT EXISTS {table.name}__basis ON {table.name}({table.basis})"
        )
        self.db.execute(
            f"CREATE INDEX IF NOT EXISTS {table.name}__subject ON {table.name}(subject)"
        )
        indexes = self._indexes(table.name)
        own = {f"{table.name}__{suffix}" for suffix in ("basis", "subject", "key")}
        for column in table.columns:
            name = f"{table.name}__{column.name}"
            if column.indexed:
                self.db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table.name}({column.name})")
            elif name in indexes and name not in own:
                # The policy no longer looks the column up alone (or the key's index
                # serves it): the index would only cost every write.
                self.applied.append(f"dropped index {name}")
                self.db.execute(f"DROP INDEX {name}")
        if table.unique:
            self.db.execute(
                f"CREATE UNIQUE INDEX IF NOT EXISTS {table.name}__key "
                f"ON {table.name}({', '.join(table.unique)})"
            )

    def _indexes(self, table: str) -> set[str]:
        rows = self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,)
        )
        return {row[0] for row in rows}

    def _columns(self, name: str) -> list[str]:
        return [row[1] for row in self.db.execute(f"PRAGMA table_info({name})")]

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db, self._checkpoints)

    # --- records --------------------------------------------------------------------

    async def put(
        self, table: TableSpec, row: Callable[[], Row], *, subject: bytes | None, now: float
    ) -> int:
        assert self._thread is not None, "backend is closed"
        return await self._thread.batched(partial(self._put, table, row, subject, now))

    def _put(
        self, table: TableSpec, row: Callable[[], Row], subject: bytes | None, now: float
    ) -> int:
        values: Row = {**row(), "subject": subject, "created_at": now, "last_used_at": now}
        sql = _upsert_sql(table, tuple(values))
        # Inside the batch's transaction. fetchall: RETURNING must run to its end before COMMIT.
        record_id: int = self.db.execute(sql, list(values.values())).fetchall()[0][0]
        if subject is not None:
            self._touch_subject(subject, now)
        return record_id

    async def put_new(self, table: TableSpec, row: Callable[[], Row], *, now: float) -> bool:
        return await self._run(self._put_new, table, row, now)

    def _put_new(self, table: TableSpec, row: Callable[[], Row], now: float) -> bool:
        values: Row = {**row(), "subject": None, "created_at": now, "last_used_at": now}
        names = ", ".join(values)
        sql = (
            f"INSERT INTO {table.name} ({names}) VALUES ({', '.join('?' * len(values))})"
            " ON CONFLICT DO NOTHING"
        )
        with self._transaction():
            inserted: bool = self.db.execute(sql, list(values.values())).rowcount > 0
        return inserted

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
        return await self._run(
            self._replace, table, row, subject, dict(where), expect, cutoff, subject_cutoff, now
        )

    def _replace(
        self,
        table: TableSpec,
        row: Callable[[], Row],
        subject: bytes,
        where: Row,
        expect: Mapping[str, SqlValue] | None,
        cutoff: float,
        subject_cutoff: float,
        now: float,
    ) -> bool:
        # The one writer thread and BEGIN IMMEDIATE: no other write between the read and
        # the put, in this process or another.
        with self._transaction():
            found = self._select(table, where, cutoff, subject_cutoff)
            if not as_expected(found, expect):
                return False
            record_id = self._put(table, row, subject, now)
            stale = [r["id"] for r in found if r["id"] != record_id]
            if stale:
                marks = ", ".join("?" * len(stale))
                self.db.execute(f"DELETE FROM {table.name} WHERE id IN ({marks})", stale)
        if stale:
            self._checkpoint()  # as any delete: the old row must not stay in the WAL
        return True

    async def put_many(
        self, table: TableSpec, rows: Sequence[Callable[[], Row]], *, now: float
    ) -> None:
        assert self._thread is not None, "backend is closed"
        if rows:
            await self._thread.batched(partial(self._put_many, table, rows, now))

    def _put_many(self, table: TableSpec, rows: Sequence[Callable[[], Row]], now: float) -> None:
        built = [{**row(), "subject": None, "created_at": now, "last_used_at": now} for row in rows]
        # One statement per set of columns (a batch usually has one), so rows whose callers
        # gave different fields keep each value in its own column; without RETURNING,
        # which executemany refuses.
        groups: dict[tuple[str, ...], list[list[SqlValue]]] = {}
        for values in built:
            groups.setdefault(tuple(values), []).append(list(values.values()))
        for names, params in groups.items():
            self.db.executemany(_upsert_sql(table, names).removesuffix(" RETURNING id"), params)

    def _touch_subject(self, subject: bytes, now: float) -> None:
        self.db.execute(
            "INSERT INTO subjects VALUES (?, ?) ON CONFLICT(subject) DO UPDATE "
            "SET last_used_at = max(last_used_at, excluded.last_used_at)",
            (subject, now),
        )

    async def select(
        self,
        table: TableSpec,
        where: Mapping[str, SqlValue],
        *,
        cutoff: float,
        subject_cutoff: float,
    ) -> list[Row]:
        return await self._run(self._select, table, dict(where), cutoff, subject_cutoff)

    def _select(
        self, table: TableSpec, where: Row, cutoff: float, subject_cutoff: float
    ) -> list[Row]:
        clauses, params = _where(where)
        sql = (
            f"SELECT * FROM {table.name} AS t WHERE {table.basis} > ? AND (t.subject IS NULL OR "
            "EXISTS (SELECT 1 FROM subjects s WHERE s.subject = t.subject AND s.last_used_at > ?))"
        )
        if clauses:
            sql += " AND " + clauses
        rows = self.db.execute(sql + " ORDER BY id", [cutoff, subject_cutoff, *params])
        return [dict(row) for row in rows]

    async def touch(self, table: TableSpec, record_id: int, *, now: float) -> bool:
        return await self._run(self._update, table, record_id, None, now)

    async def update(
        self,
        table: TableSpec,
        record_id: int,
        values: Callable[[Row], Row],
        *,
        now: float | None,
    ) -> bool:
        return await self._run(self._update, table, record_id, values, now)

    def _update(
        self,
        table: TableSpec,
        record_id: int,
        build: Callable[[Row], Row] | None,
        now: float | None,
    ) -> bool:
        with self._transaction():
            values: Row = {}
            if build is not None:
                current = self.db.execute(
                    f"SELECT * FROM {table.name} WHERE id = ?", (record_id,)
                ).fetchone()
                if current is None:
                    return False
                values = build(dict(current))
            if now is not None:
                values["last_used_at"] = now
            if not values:
                return True
            assignments = ", ".join(f"{name} = ?" for name in values)
            found = self.db.execute(
                f"UPDATE {table.name} SET {assignments} WHERE id = ? RETURNING subject",
                [*values.values(), record_id],
            ).fetchall()
            if found and found[0][0] is not None and now is not None:
                self._touch_subject(found[0][0], now)
        return bool(found)

    async def scan(self, table: TableSpec, *, after: int, limit: int) -> list[Row]:
        return await self._run(self._scan, table, after, limit)

    def _scan(self, table: TableSpec, after: int, limit: int) -> list[Row]:
        rows = self.db.execute(
            f"SELECT * FROM {table.name} WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        )
        return [dict(row) for row in rows]

    async def delete(self, table: TableSpec, where: Mapping[str, SqlValue]) -> int:
        return await self._run(self._delete, table, dict(where))

    def _delete(self, table: TableSpec, where: Row) -> int:
        clauses, params = _where(where)
        with self._transaction():
            sql = f"DELETE FROM {table.name} WHERE {clauses or '1'}"
            deleted = self.db.execute(sql, params).rowcount
        self._checkpoint()  # an erased value must not stay readable in the WAL
        return deleted

    async def delete_subject(self, tables: Sequence[TableSpec], subject: bytes) -> dict[str, int]:
        return await self._run(self._erase, tables, subject)

    def _erase(self, tables: Sequence[TableSpec], subject: bytes) -> dict[str, int]:
        with self._transaction():
            counts = self._delete_subjects(tables, [subject])
        self._checkpoint()  # an erased value must not stay readable in the WAL
        return counts

    def _delete_subjects(
        self, tables: Sequence[TableSpec], subjects: list[bytes]
    ) -> dict[str, int]:
        """Inside the caller's transaction."""
        counts = dict.fromkeys((t.name for t in tables), 0)
        for subject in subjects:
            for table in tables:
                sql = f"DELETE FROM {table.name} WHERE subject = ?"
                counts[table.name] += self.db.execute(sql, (subject,)).rowcount
            self.db.execute("DELETE FROM subjects WHERE subject = ?", (subject,))
            self.db.execute("DELETE FROM restrictions WHERE subject = ?", (subject,))
        return counts

    async def delete_before(self, table: TableSpec, cutoff: float) -> int:
        return await self._run(self._delete_before, table, cutoff)

    def _delete_before(self, table: TableSpec, cutoff: float) -> int:
        with self._transaction():
            return self.db.execute(
                f"DELETE FROM {table.name} WHERE {table.basis} <= ?", (cutoff,)
            ).rowcount

    async def delete_inactive_subjects(self, tables: Sequence[TableSpec], cutoff: float) -> int:
        return await self._run(self._delete_inactive, tables, cutoff)

    def _delete_inactive(self, tables: Sequence[TableSpec], cutoff: float) -> int:
        # One transaction: a subject active again since the SELECT is not deleted by
        # another instance sharing the file.
        with self._transaction():
            rows = self.db.execute(
                "SELECT subject FROM subjects WHERE last_used_at <= ?", (cutoff,)
            )
            subjects = [row[0] for row in rows.fetchall()]
            self._delete_subjects(tables, subjects)
        return len(subjects)

    # --- restriction (GDPR Art. 18) -------------------------------------------------

    async def restricted_subjects(self) -> frozenset[bytes]:
        return await self._run(self._restricted_subjects)

    def _restricted_subjects(self) -> frozenset[bytes]:
        return frozenset(row[0] for row in self.db.execute("SELECT subject FROM restrictions"))

    async def restrict(self, subject: bytes, on: bool, *, now: float) -> bool:
        return await self._run(self._restrict, subject, on, now)

    def _restrict(self, subject: bytes, on: bool, now: float) -> bool:
        with self._transaction():
            if on:
                sql = "INSERT INTO restrictions VALUES (?, ?) ON CONFLICT(subject) DO NOTHING"
                return self.db.execute(sql, (subject, now)).rowcount > 0
            sql = "DELETE FROM restrictions WHERE subject = ?"
            return self.db.execute(sql, (subject,)).rowcount > 0

    def restriction_changes(self) -> ChangeFeed | None:
        # No feed: a SQLite file has no way to tell another process of a change. The
        # store re-reads the marks instead, at most RESTRICTIONS_FRESH seconds apart.
        return None

    # --- jobs of one process at a time ----------------------------------------------

    @asynccontextmanager
    async def exclusive(self, job: str) -> AsyncIterator[bool]:
        """A lock file beside the database, `flock`ed without waiting. One `serve` owns a
        SQLite file, but the CLI (`sweep`, `billing close`, `keys reseal`) opens it from
        other processes: the lock keeps their jobs apart from serve's. A process that
        dies releases it with its descriptors."""
        if job not in JOBS:
            raise ValueError(f"unknown job {job!r}")
        path = self.path.with_name(f"{self.path.name}.{job}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                got = True
            except BlockingIOError:
                got = False
            yield got
        finally:
            os.close(fd)  # releases the lock

    # --- the data-subject request trail --------------------------------------------

    async def record_request(self, entry: RequestEntry) -> None:
        await self._run(self._record_request, entry)

    def _record_request(self, entry: RequestEntry) -> None:
        with self._transaction():
            self.db.execute(
                "INSERT INTO dsr_requests VALUES (?, ?, ?, ?, ?, ?)",
                (
                    entry.id,
                    entry.type,
                    entry.received_at,
                    entry.actor,
                    entry.outcome,
                    json.dumps(entry.counts, sort_keys=True),
                ),
            )

    async def requests(self, limit: int) -> list[RequestEntry]:
        return await self._run(self._requests, limit)

    def _requests(self, limit: int) -> list[RequestEntry]:
        rows = self.db.execute(
            "SELECT * FROM dsr_requests ORDER BY received_at DESC, rowid DESC LIMIT ?", (limit,)
        )
        return [RequestEntry.from_row(r) for r in rows]

    async def subject_last_used(self, subject: bytes) -> float | None:
        return await self._run(self._subject_last_used, subject)

    def _subject_last_used(self, subject: bytes) -> float | None:
        row = self.db.execute("SELECT last_used_at FROM subjects WHERE subject = ?", (subject,))
        found = row.fetchone()
        return None if found is None else float(found[0])

    # --- audit and bookkeeping ------------------------------------------------------

    async def stats(self, table: TableSpec) -> TableStats:
        return await self._run(self._stats, table.name, table.basis)

    async def tables(self) -> list[str]:
        return await self._run(self._tables)

    def _tables(self) -> list[str]:
        rows = self.db.execute(
            r"SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'c\_%' ESCAPE '\'"
        )
        return sorted(row[0] for row in rows)

    async def subject_stats(self) -> TableStats:
        return await self._run(self._stats, "subjects", "last_used_at")

    def _stats(self, name: str, basis: str) -> TableStats:
        rows, oldest = self.db.execute(f"SELECT count(*), min({basis}) FROM {name}").fetchone()
        return TableStats(rows, oldest)

    async def undeclared_columns(self, table: TableSpec) -> dict[str, int]:
        return await self._run(self._undeclared_columns, table)

    def _undeclared_columns(self, table: TableSpec) -> dict[str, int]:
        declared = set(META_COLUMNS) | {c.name for c in table.columns}
        extra = [name for name in self._columns(table.name) if name not in declared]
        return {
            name: self.db.execute(f"SELECT count({name}) FROM {table.name}").fetchone()[0]
            for name in extra
        }

    async def record_runs(self, runs: Sequence[RetentionRun]) -> None:
        await self._run(self._record_runs, runs)

    def _record_runs(self, runs: Sequence[RetentionRun]) -> None:
        with self._transaction():
            self.db.executemany(
                "INSERT INTO retention_runs (category, cutoff, deleted, ran_at) "
                "VALUES (?, ?, ?, ?)",
                [(r.category, r.cutoff, r.deleted, r.ran_at) for r in runs],
            )

    async def last_runs(self) -> list[RetentionRun]:
        return await self._run(self._last_runs)

    def _last_runs(self) -> list[RetentionRun]:
        rows = self.db.execute(
            "SELECT category, cutoff, deleted, max(ran_at) FROM retention_runs GROUP BY category"
        )
        return [RetentionRun(*row) for row in rows]

    async def purge_deleted(self, tables: Sequence[TableSpec] | None = None) -> list[str]:
        # secure_delete overwrote every deleted row in its page as it went; the pages
        # with the rows still whole sit in the WAL until this folds and truncates it.
        await self._run(self._checkpoint)
        return [self.path.name]

    async def purge_states(self) -> list[PurgeState]:
        return [
            PurgeState(
                self.path.name,
                "overwritten as deleted (secure_delete), the WAL truncated after each"
                " deletion and sweep",
                within=None,
                pending_age=None,
            )
        ]

    def _checkpoint(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    @property
    def outage(self) -> StorageUnavailable | None:
        # A file of this process: nothing to lose the way to (a disk error is an error).
        return None

    async def ping(self) -> None:
        """Nothing to reach: the file is this process's own."""

    async def close(self) -> None:
        if self._thread is None:
            return
        if self._db is not None:
            await self._run(self._close)
        await self._thread.stop()
        self._thread = None

    def _close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.stop()
            self._checkpoints = None
        self._checkpoint()
        self.db.close()
        self._db = None


def schema_version(path: Path) -> int:
    """The version of the file at `path` (0: none yet), read without changing it."""
    if not path.exists():
        return 0
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        found = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        ).fetchone()
        if found is None:
            return 0
        version: int = db.execute(
            "SELECT coalesce(max(version), 0) FROM schema_migrations"
        ).fetchone()[0]
        return version
    finally:
        db.close()


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, ROLLBACK on any error: a failed write leaves nothing."""

    def __init__(self, db: sqlite3.Connection, checkpoints: Checkpointer | None) -> None:
        self._db = db
        self._checkpoints = checkpoints

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._db.execute("ROLLBACK")
            return
        self._db.execute("COMMIT")
        if self._checkpoints is not None:
            self._checkpoints.committed(self._db)


@lru_cache(maxsize=256)
def _upsert_sql(table: TableSpec, names: tuple[str, ...]) -> str:
    sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
    if table.unique:
        # Same key: replace the fields, keep the creation time (the record lives on).
        updates = [
            f"{n} = excluded.{n}" for n in names if n not in table.unique and n != "created_at"
        ]
        sql += f" ON CONFLICT({', '.join(table.unique)}) DO UPDATE SET {', '.join(updates)}"
    return sql + " RETURNING id"


def _where(where: Mapping[str, SqlValue]) -> tuple[str, list[SqlValue]]:
    clauses = [
        f"{name} IS NULL" if value is None else f"{name} = ?" for name, value in where.items()
    ]
    return " AND ".join(clauses), [v for v in where.values() if v is not None]

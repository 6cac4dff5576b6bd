"""The storage seam: what a database must do for the store, in the store's own terms.

`privacy.store.Store` turns a category's fields into a row (encrypted, anonymised, blind
indexed) and hands it here; a backend only moves rows. SQLite (`privacy.sqlite`) is the
embedded default; a PostgreSQL backend implements the same protocol without touching a
caller. Table and column names come from the compiled policy (checked to be plain
identifiers), values always travel as bound parameters.

Errors a backend raises for the store's callers, by what the caller does next:

    StorageError
    ├── StorageUnavailable  the database cannot be reached now (connection lost, server
    │                       stopped, pool exhausted past its timeout): temporary; the
    │                       write did not happen, answer "try later" (SIP 503, HTTP 503)
    ├── SchemaMismatch      the database's schema is not the one this softrelay needs:
    │                       permanent until the operator acts; the message says what to
    │                       run (`softrelay db migrate`, or upgrade softrelay)
    └── JobHeld             another process runs the same one-at-a-time job (a reseal):
                            nothing was done here; run it again once that one ended

A backend translates its driver's exceptions into these in one place; nothing above it
sees a driver's exception type.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

SqlValue = str | int | float | bytes | None
Row = dict[str, SqlValue]

# Columns every category table has besides its declared fields. `rid`: the random row id
# that binds the ciphertexts of a record without a record key to that record.
ROW_ID = "rid"
META_COLUMNS = ("id", "subject", "created_at", "last_used_at", ROW_ID)


class StorageError(Exception):
    """The store could not do what was asked; the message names no personal data."""


# Seconds a caller is told to wait (SIP and HTTP Retry-After) when the store is
# unavailable: long enough not to hammer a database that is restarting, short enough
# that a phone re-registers soon after it is back.
RETRY_AFTER = 5.0


class StorageUnavailable(StorageError):
    """The database cannot be reached now; nothing was written. Retrying later may work:
    `retry_after` seconds is the hint the callers pass on (Retry-After)."""

    def __init__(self, message: str, *, retry_after: float = RETRY_AFTER) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SchemaMismatch(StorageError):
    """The schema is older or newer than this softrelay's; the message says what to run."""


class JobHeld(StorageError):
    """Another process holds the job's lock (`Backend.exclusive`); nothing was done."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    sqltype: str  # TEXT, INTEGER, REAL, BLOB: SQLite's names; other backends map them
    indexed: bool = False


@dataclass(frozen=True, slots=True)
class TableSpec:
    name: str
    columns: tuple[Column, ...]
    unique: tuple[str, ...]  # columns of the record key; empty: every put inserts
    basis: str  # created_at or last_used_at: the time its retention counts from


@dataclass(frozen=True, slots=True)
class TableStats:
    rows: int
    oldest: float | None  # the oldest basis time, expired rows included


@dataclass(frozen=True, slots=True)
class RetentionRun:
    category: str
    cutoff: float
    deleted: int
    ran_at: float


@dataclass(frozen=True, slots=True)
class RequestEntry:
    """One data-subject request in the trail: no personal data, only what happened."""

    id: str
    type: str  # export, rectify, erase, restrict, unrestrict, object
    received_at: float
    actor: str  # subject (proved through their PBX) or operator (admin token)
    outcome: str  # done, refused, not_applicable
    counts: dict[str, int]  # records per category the request returned or changed

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RequestEntry:
        """An entry as both backends store it (`counts` as JSON text)."""
        counts: dict[str, int] = json.loads(row["counts"])
        return cls(row["id"], row["type"], row["received_at"], row["actor"], row["outcome"], counts)


# The jobs that run on one process of a fleet at a time (`Backend.exclusive`): the
# retention sweep, the usage month close, and the reseal after a key rotation.
JOBS = ("sweep", "usage-close", "reseal")


class ChangeFeed(Protocol):
    """Changes of the restriction marks made by any process, as they are committed.

    `generation` moves on every change notified, and whenever the feed is lost or
    regained (a change may have gone unnoticed meanwhile): a read of the marks taken
    at one generation holds until it moves, while `live`. Not live (never connected,
    the connection lost or not answering): a reader falls back to re-reading."""

    @property
    def generation(self) -> int: ...

    @property
    def live(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class PurgeState:
    """Deleted rows of one table (or of the whole store) on their way out of the live
    files. Ages are by the database's clock, as the deletions were stamped."""

    table: str
    method: str  # how deleted rows leave the files, for the audit's report
    within: float | None  # seconds a deleted row may stay in the files ([store] vacuum_within)
    pending_age: float | None  # since the oldest deletion not purged yet; None: none pending
    purged_age: float | None = None  # since the last purge; None: never, or no such step
    dead_rows: int | None = None  # the server's estimate of dead row versions (PostgreSQL)
    vacuum_age: float | None = None  # since the last plain (auto)vacuum (PostgreSQL)


class Backend(Protocol):
    async def put(
        self, table: TableSpec, row: Callable[[], Row], *, subject: bytes | None, now: float
    ) -> int:
        """Insert, or replace the row with the same key; record the subject's activity.

        `row` builds the row (it encrypts). SQLite calls it on its writer thread, beside
        the write and off the event loop that carries SIP; PostgreSQL calls it on the
        loop, as it gathers one turn's puts into one transaction (group commit)."""
        ...

    async def put_new(self, table: TableSpec, row: Callable[[], Row], *, now: float) -> bool:
        """Insert a row of a category without subjects unless one with the same key is
        stored (then it is kept as it is); whether it inserted. Two processes putting
        the same key at once: exactly one inserts, both then read the same row."""
        ...

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
        """Compare-and-set within one subject, in one transaction: the live rows matching
        `where` (as `select` finds them) must be none (`expect` None) or exactly one that
        holds `expect`'s values; else nothing changes (False). Then `row` is put (as
        `put`) and the rows matched are deleted, but for the one the put rewrote (True).
        Serialised with every other `replace` of the table and subject: of several
        processes replacing the same row at once, exactly one succeeds."""
        ...

    async def put_many(
        self, table: TableSpec, rows: Sequence[Callable[[], Row]], *, now: float
    ) -> None:
        """`put` of many rows of a category without subjects, in one statement: for
        writers that collect their callers' rows and commit them together."""
        ...

    async def select(
        self,
        table: TableSpec,
        where: Mapping[str, SqlValue],
        *,
        cutoff: float,
        subject_cutoff: float,
    ) -> list[Row]:
        """Rows matching `where` whose basis is after `cutoff` and whose subject (if any)
        was active after `subject_cutoff`."""
        ...

    async def touch(self, table: TableSpec, record_id: int, *, now: float) -> bool: ...

    async def update(
        self,
        table: TableSpec,
        record_id: int,
        values: Callable[[Row], Row],
        *,
        now: float | None,
    ) -> bool:
        """Set what `values` makes of the row as stored (it seals against the row, so it is
        called on the writer, in the update's transaction); with `now`, also record a use.
        Whether the record exists."""
        ...

    async def scan(self, table: TableSpec, *, after: int, limit: int) -> list[Row]:
        """Up to `limit` rows with an id above `after`, by id, expired ones included:
        for the audit and a reseal, which walk a whole table."""
        ...

    async def delete(self, table: TableSpec, where: Mapping[str, SqlValue]) -> int: ...

    async def delete_subject(
        self, tables: Sequence[TableSpec], subject: bytes
    ) -> dict[str, int]: ...

    async def delete_before(self, table: TableSpec, cutoff: float) -> int: ...

    async def delete_inactive_subjects(self, tables: Sequence[TableSpec], cutoff: float) -> int:
        """Delete every row of every subject last active at or before `cutoff`; the number
        of subjects removed."""
        ...

    async def restricted_subjects(self) -> frozenset[bytes]:
        """Every subject with a restriction mark (few: they are asked for one by one)."""
        ...

    async def restrict(self, subject: bytes, on: bool, *, now: float) -> bool:
        """Set (`on`) or lift the subject's restriction mark; whether it changed.
        Erasing the subject (or the account rule) removes the mark with its data."""
        ...

    def restriction_changes(self) -> ChangeFeed | None:
        """The feed of changes to the restriction marks, started on the first call; None
        where the backend has none (SQLite: the store re-reads the marks instead)."""
        ...

    def exclusive(self, job: str) -> AbstractAsyncContextManager[bool]:
        """`async with backend.exclusive("sweep") as got:` whether this process holds the
        job's lock for the block; False: another process (or store) holds it, skip the
        job. Never waits for the lock. `job` is one of JOBS."""
        ...

    async def record_request(self, entry: RequestEntry) -> None: ...

    async def requests(self, limit: int) -> list[RequestEntry]:
        """The latest entries of the request trail, newest first."""
        ...

    async def subject_last_used(self, subject: bytes) -> float | None: ...

    async def stats(self, table: TableSpec) -> TableStats: ...

    async def tables(self) -> list[str]:
        """Names of every category table in the database, declared or not."""
        ...

    async def subject_stats(self) -> TableStats: ...

    async def undeclared_columns(self, table: TableSpec) -> dict[str, int]:
        """Columns present in the database but not in `table`, with their non-null count."""
        ...

    async def record_runs(self, runs: Sequence[RetentionRun]) -> None: ...

    async def last_runs(self) -> list[RetentionRun]: ...

    async def purge_deleted(self, tables: Sequence[TableSpec] | None = None) -> list[str]:
        """Make rows deleted from `tables` (None: from any table), and the subjects' marks
        an erasure removed with them, leave the database's live files and its own
        write-ahead log; the tables purged. Called after a sweep and an erasure.

        SQLite overwrote them as it deleted them (secure_delete): this truncates the WAL.
        PostgreSQL rewrites each table a DELETE marked since its last purge (VACUUM FULL:
        a plain vacuum frees the space but leaves the bytes). A table that cannot be
        rewritten now (locked, too slow, not owned) stays marked for the next call and
        the audit reports how long (`purge_states`); that is logged, not raised."""
        ...

    async def purge_states(self) -> list[PurgeState]:
        """How far deleted rows have left the live files, per table (the audit)."""
        ...

    @property
    def outage(self) -> StorageUnavailable | None:
        """Why the database could not be reached, from the last operation that failed
        so, until one succeeds; None while it answers. Callers that may act on cached
        data (the restriction marks) re-read instead while this is set."""
        ...

    async def ping(self) -> None:
        """Return once the database answers a trivial query, within a few seconds, or
        raise StorageUnavailable (`/healthz`)."""
        ...

    async def close(self) -> None: ...


def as_expected(rows: Sequence[Mapping[str, Any]], expect: Mapping[str, SqlValue] | None) -> bool:
    """The condition of `Backend.replace`: no row (`expect` None), or exactly one holding
    every value of `expect`."""
    if expect is None:
        return not rows
    return len(rows) == 1 and all(rows[0].get(name) == value for name, value in expect.items())

"""SQLite's WAL checkpoints run on a thread of their own, not inside the commits callers
wait for (privacy/walcheckpoint.py); the log stays bounded when that thread falls
behind, and every committed row is in the database after the store is closed.

The writer here is a connection set up as the backend sets up its own (auto-checkpoint
off, the journal size limit), committing one row of a page's size per transaction, so
the log grows by a known amount per commit. A checkpointer whose thread is held is this
module's subclass: it waits on an event before its checkpoint (our own seam)."""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from privacy.clock import ManualClock
from privacy.database import DATABASE_FILE
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store
from privacy.walcheckpoint import Checkpointer
from tests.limits import LONGEST_WAIT

SOFT, HARD = 8, 40  # pages


class HeldCheckpointer(Checkpointer):
    """Its thread enters a checkpoint, then waits for `release` before making it."""

    def __init__(self, path: Path, page_size: int, **marks: int) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        super().__init__(path, page_size, check_rows=1, **marks)

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        self.entered.set()
        assert self.release.wait(LONGEST_WAIT)
        super()._checkpoint(db)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (v BLOB)")
    yield db
    db.close()


def _commit(db: sqlite3.Connection, checkpoints: Checkpointer) -> int:
    """One transaction of one page-sized row; the log file's size after it."""
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t VALUES (?)", (os.urandom(3000),))
    db.execute("COMMIT")
    checkpoints.committed(db)
    return os.stat(f"{db.execute('PRAGMA database_list').fetchone()[2]}-wal").st_size


def test_a_commit_past_the_soft_mark_leaves_the_checkpoint_to_the_thread(
    writer: sqlite3.Connection, tmp_path: Path
) -> None:
    page = writer.execute("PRAGMA page_size").fetchone()[0]
    checkpoints = HeldCheckpointer(tmp_path / "x.db", page, soft_pages=SOFT, hard_pages=HARD)
    writer.execute(f"PRAGMA journal_size_limit={checkpoints.size_limit}")
    try:
        size = 0
        while size < checkpoints.soft:
            size = _commit(writer, checkpoints)
        assert checkpoints.entered.wait(LONGEST_WAIT)  # the thread was woken
        # Commits go on past the soft mark while the thread's checkpoint is held: none of
        # them checkpoints (the log only grows), until the hard mark.
        sizes = [size]
        while sizes[-1] < checkpoints.hard:
            sizes.append(_commit(writer, checkpoints))
        assert sizes == sorted(sizes)
        assert checkpoints.inline == 1
        assert checkpoints.runs == 0
        # Past the hard mark the writer checkpointed itself: the log started again and
        # stays bounded over many more commits while the thread is still held.
        growth = max(b - a for a, b in itertools.pairwise(sizes))  # one commit's
        after = [_commit(writer, checkpoints) for _ in range(4 * HARD)]
        assert max(after) <= checkpoints.hard + growth
        assert min(after) <= checkpoints.size_limit + growth
        assert checkpoints.inline >= 2
    finally:
        checkpoints.release.set()
        checkpoints.stop()
    assert checkpoints.runs == 1
    committed = writer.execute("SELECT count(*) FROM t").fetchone()[0]
    assert committed == writer.total_changes  # every row committed is in the table


def test_the_thread_checkpoints_and_the_log_starts_again(
    writer: sqlite3.Connection, tmp_path: Path
) -> None:
    page = writer.execute("PRAGMA page_size").fetchone()[0]
    checkpoints = HeldCheckpointer(tmp_path / "x.db", page, soft_pages=SOFT, hard_pages=HARD)
    writer.execute(f"PRAGMA journal_size_limit={checkpoints.size_limit}")
    checkpoints.release.set()
    try:
        size = 0
        while size < checkpoints.soft:
            size = _commit(writer, checkpoints)
        assert checkpoints.entered.wait(LONGEST_WAIT)
    finally:
        checkpoints.stop()  # lets the checkpoint under way finish
    assert (checkpoints.runs, checkpoints.inline) == (1, 0)
    # All of the log was copied: the next transaction starts it again, and the file is
    # cut back to the size limit.
    assert _commit(writer, checkpoints) <= checkpoints.size_limit


async def test_the_store_commits_without_checkpointing_and_keeps_every_row(
    tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend's writer hands checkpoints to its thread (held here): a store's
    commits go on past the soft mark; closed, the store has every row in the file."""
    made: list[HeldCheckpointer] = []

    def held(path: Path, page_size: int) -> HeldCheckpointer:
        made.append(HeldCheckpointer(path, page_size, soft_pages=SOFT, hard_pages=100 * HARD))
        return made[-1]

    monkeypatch.setattr("privacy.sqlite.Checkpointer", held)
    store = await Store.create(load_policy("auerproxy"), Keyring.generate(), tmp_path, clock)
    wal = tmp_path / f"{DATABASE_FILE}-wal"
    rows, sizes = 0, []
    try:
        for _ in range(100):  # the first commit is past the soft mark (the schema is)
            batch = [
                {"tenant": "acme", "period": "2026-03", "pid": f"{rows + i:032x}"}
                for i in range(50)
            ]
            await store.put_many("usage", batch)
            rows += len(batch)
            sizes.append(os.stat(wal).st_size)
        assert await asyncio.to_thread(made[0].entered.wait, LONGEST_WAIT)
        # Nobody checkpointed: every commit only added to the log.
        assert (made[0].runs, made[0].inline) == (0, 0)
        assert sizes == sorted(sizes)
        assert sizes[0] < sizes[-1] < made[0].hard
    finally:
        made[0].release.set()
        await store.close()
    with closing(sqlite3.connect(tmp_path / DATABASE_FILE)) as db:
        assert db.execute("SELECT count(*) FROM c_usage").fetchone()[0] == rows

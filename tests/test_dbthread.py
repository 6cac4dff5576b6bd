"""The database thread commits concurrent writes together, and a failing write fails
alone: the others of its batch are committed, its own effect is rolled back."""

from __future__ import annotations

import asyncio
import threading
from functools import partial

import pytest

from privacy.dbthread import DatabaseThread


class FakeDatabase:
    """A list with transactions: enough to see what a batch committed."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self._snapshot: list[int] | None = None
        self.commits = 0

    def begin(self) -> None:
        assert self._snapshot is None, "nested transaction"
        self._snapshot = list(self.rows)

    def commit(self) -> None:
        self._snapshot = None
        self.commits += 1

    def rollback(self) -> None:
        assert self._snapshot is not None
        self.rows = self._snapshot
        self._snapshot = None


async def _queued_behind_a_gate(
    thread: DatabaseThread, calls: list[asyncio.Future[int] | asyncio.Task[int]]
) -> threading.Event:
    """Hold the thread on a call until `calls` are all queued, so they form one batch."""
    gate = threading.Event()
    calls.insert(0, asyncio.ensure_future(thread.call(lambda: int(gate.wait(10)))))
    await asyncio.sleep(0)  # one turn of the loop: every task queues its call
    return gate


async def test_concurrent_writes_share_one_commit() -> None:
    db = FakeDatabase()
    thread = DatabaseThread("test-db", db.begin, db.commit, db.rollback)
    try:

        def write(i: int) -> int:
            db.rows.append(i)
            return i

        calls: list[asyncio.Future[int] | asyncio.Task[int]] = [
            asyncio.ensure_future(thread.batched(partial(write, i))) for i in range(10)
        ]
        gate = await _queued_behind_a_gate(thread, calls)
        gate.set()
        results = await asyncio.gather(*calls)
    finally:
        await thread.stop()
    assert results[1:] == list(range(10))
    assert sorted(db.rows) == list(range(10))
    assert db.commits == 1


async def test_a_failing_write_fails_alone() -> None:
    db = FakeDatabase()
    thread = DatabaseThread("test-db", db.begin, db.commit, db.rollback)
    try:

        def write(i: int) -> int:
            db.rows.append(i)
            if i == 5:
                raise ValueError("constraint failed")
            return i

        calls: list[asyncio.Future[int] | asyncio.Task[int]] = [
            asyncio.ensure_future(thread.batched(partial(write, i))) for i in range(10)
        ]
        gate = await _queued_behind_a_gate(thread, calls)
        gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await thread.stop()
    assert isinstance(results[6], ValueError)
    assert [r for i, r in enumerate(results[1:]) if i != 5] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert sorted(db.rows) == [0, 1, 2, 3, 4, 6, 7, 8, 9]


async def test_errors_of_unbatched_calls_reach_the_caller() -> None:
    db = FakeDatabase()
    thread = DatabaseThread("test-db", db.begin, db.commit, db.rollback)
    try:
        with pytest.raises(ZeroDivisionError):
            await thread.call(lambda: 1 // 0)
        assert await thread.call(lambda: 42) == 42
    finally:
        await thread.stop()

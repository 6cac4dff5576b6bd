"""A usage ping is answered 202 only once its id is committed: while the commit holding
it is under way the ping waits, and a ping whose commit fails is refused, not counted,
and stored when the app retries it.

The seam is the SQLite writer's COMMIT step (`DatabaseThread`'s commit, our own): the
test holds it, or makes it fail as SQLite does on an I/O error at commit (the
transaction rolled back, an OperationalError raised)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from privacy.clock import ManualClock
from privacy.dbthread import DatabaseThread
from privacy.sqlite import SQLiteBackend
from privacy.store import Store, table_name
from tests.limits import LONGEST_WAIT
from tests.usage_fixtures import TENANTS, UsageHarness, install_pid, start_usage
from usage.ledger import USAGE
from usage.period import period_of
from usage.settings import UsageSettings


class CommitGate:
    """Stands in for the writer's COMMIT: holds it until `release`, then commits, or
    rolls back and raises while `fail` is set."""

    def __init__(self, thread: DatabaseThread) -> None:
        self._thread = thread
        self._real: Callable[[], None] = thread._commit
        self.reached = threading.Event()
        self.release = threading.Event()
        self.fail = False
        self.commits = 0

    def __enter__(self) -> CommitGate:
        self._thread._commit = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._thread._commit = self._real

    def __call__(self) -> None:  # on the writer's thread
        self.reached.set()
        if not self.release.wait(LONGEST_WAIT):
            raise TimeoutError("the test never released the commit")
        if self.fail:
            self._thread._rollback()
            raise sqlite3.OperationalError("disk I/O error")
        self._real()
        self.commits += 1


@pytest.fixture
async def usage(store: Store, clock: ManualClock) -> AsyncIterator[UsageHarness]:
    async for harness in start_usage(store, clock, UsageSettings(TENANTS, ip_burst=0)):
        # The month's first ping opens it (its secret, in a transaction of its own).
        first = install_pid(0, "acme", period_of(clock.now()))
        assert (await harness.ping(pid=first)).status == 202
        yield harness


def _writer(store: Store) -> DatabaseThread:
    backend = store.backend
    assert isinstance(backend, SQLiteBackend)
    assert backend._thread is not None
    return backend._thread


def _committed_ids(store: Store) -> int:
    """Rows another connection sees: what is committed."""
    backend = store.backend
    assert isinstance(backend, SQLiteBackend)
    db = sqlite3.connect(f"{backend.path.as_uri()}?mode=ro", uri=True)
    try:
        return int(db.execute(f"SELECT count(*) FROM {table_name(USAGE)}").fetchone()[0])
    finally:
        db.close()


async def test_a_ping_is_answered_only_once_the_commit_holding_its_id_is_done(
    usage: UsageHarness,
) -> None:
    period = period_of(usage.clock.now())
    with CommitGate(_writer(usage.store)) as gate:
        ping = asyncio.create_task(usage.ping(pid=install_pid(1, "acme", period)))
        assert await asyncio.to_thread(gate.reached.wait, LONGEST_WAIT)
        # The id is written in the open transaction, not committed: no answer yet.
        assert not ping.done()
        assert await asyncio.to_thread(_committed_ids, usage.store) == 1
        gate.release.set()
        response = await ping
    assert response.status == 202
    assert gate.commits == 1
    assert await asyncio.to_thread(_committed_ids, usage.store) == 2


async def test_a_ping_whose_commit_fails_gets_no_202_is_not_counted_and_is_stored_on_retry(
    usage: UsageHarness, caplog: pytest.LogCaptureFixture
) -> None:
    period = period_of(usage.clock.now())
    pid = install_pid(1, "acme", period)
    with CommitGate(_writer(usage.store)) as gate:
        gate.fail = True
        gate.release.set()
        response = await usage.ping(pid=pid)
        assert response.status == 500
        assert (await response.json())["error"] == "internal"
        assert gate.commits == 0
        assert await asyncio.to_thread(_committed_ids, usage.store) == 1, "only the first"
        assert usage.service.ledger.distinct("acme", period) == 1, "the id is not counted"
        gate.fail = False
        retried = await usage.ping(pid=pid)
    assert retried.status == 202
    assert await asyncio.to_thread(_committed_ids, usage.store) == 2
    assert usage.service.ledger.distinct("acme", period) == 2
    assert [r.getMessage() for r in caplog.records if r.name == "softrelay.usage"] == [
        "usage ping failed"
    ]

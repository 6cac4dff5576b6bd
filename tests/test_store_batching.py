"""The PostgreSQL backend's group commit (`PostgresBackend.put` on privacy/batches.py):
the puts of one loop turn in one transaction, each caller answered with its own record
id or its own error, an outage failing every caller, and batches of two processes that
share records and subjects queuing instead of deadlocking.

The database is observed directly: rows written by one transaction carry its id in
`xmin`. The clock is injected and never moved; nothing waits for time to pass."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from privacy.backend import StorageUnavailable
from privacy.clock import ManualClock
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.postgres import PUT_BATCH, PostgresBackend, _Put
from privacy.store import Store, Subject, Value, table_name
from tests.limits import LONGEST_WAIT
from tests.pgserver import PostgresServer

POLICY = load_policy("auerproxy")
TABLE = table_name("registration")
SERIAL = "0042137"


def _registration(user: str, instance: int, port: int = 40001) -> dict[str, Value]:
    return {
        "pbx_serial": SERIAL,
        "sip_username": user,
        "instance": f"urn:uuid:00000000-0000-4000-8000-{instance:012d}",
        "phone_ip": "198.51.100.23",
        "phone_port": port,
        "expires_at": 1_900_000_000,
    }


@pytest.fixture
def settings(postgres_store_dsn: str) -> StoreSettings:
    return StoreSettings(backend="postgresql", dsn=postgres_store_dsn)


@pytest.fixture
async def stores(
    settings: StoreSettings, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database with one keyring: two processes of a fleet."""
    keyring = Keyring.generate()
    first = await Store.create(POLICY, keyring, tmp_path, clock, settings)
    second = await Store.create(POLICY, keyring, tmp_path, clock, settings)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def _backend(store: Store) -> PostgresBackend:
    assert isinstance(store.backend, PostgresBackend)
    return store.backend


async def _query(store: Store, sql: str) -> list[Any]:
    async with _backend(store)._connection(transaction=False) as conn:
        return [tuple(row) for row in await conn.fetch(sql)]


class _Batches:
    """Records the size of every write of the backend's group commit, and what each
    raised (our own seam: the writer the backend gave its `GroupCommit`)."""

    def __init__(self, backend: PostgresBackend) -> None:
        self.sizes: list[int] = []
        self.failures: list[BaseException] = []
        self._write = backend._puts._write
        backend._puts._write = self

    async def __call__(self, batch: Sequence[_Put]) -> Sequence[int]:
        self.sizes.append(len(batch))
        try:
            return await self._write(batch)
        except Exception as exc:
            self.failures.append(exc)
            raise


async def test_puts_of_one_turn_commit_in_one_transaction_each_answered_with_its_id(
    stores: tuple[Store, Store], clock: ManualClock
) -> None:
    store = stores[0]
    seen = _Batches(_backend(store))
    rows = [_registration(f"user{i % 5}", i) for i in range(20)]
    ids = await asyncio.gather(*(store.put("registration", row) for row in rows))
    assert seen.sizes == [20]
    assert [
        tuple(r) for r in await _query(store, f"SELECT count(DISTINCT xmin::text) FROM {TABLE}")
    ] == [(1,)]
    for row, record_id in zip(rows, ids, strict=True):
        found = await store.find("registration", instance=row["instance"])
        assert [r.id for r in found] == [record_id], "each caller got its own row's id"
        assert found[0].fields["sip_username"] == row["sip_username"]
    for user in {str(row["sip_username"]) for row in rows}:
        assert await store.subject_last_used(Subject(user, SERIAL)) == clock.now()


async def test_a_batch_holds_at_most_put_batch_puts(stores: tuple[Store, Store]) -> None:
    store = stores[0]
    seen = _Batches(_backend(store))
    count = PUT_BATCH + 3
    await asyncio.gather(*(store.put("registration", _registration("u", i)) for i in range(count)))
    assert seen.sizes == [PUT_BATCH, 3]
    assert (await _query(store, f"SELECT count(*) FROM {TABLE}")) == [(count,)]


async def test_two_puts_of_one_key_in_a_turn_leave_the_later_fields(
    stores: tuple[Store, Store],
) -> None:
    store = stores[0]
    seen = _Batches(_backend(store))
    ids = await asyncio.gather(
        store.put("registration", _registration("alice", 1, port=1111)),
        store.put("registration", _registration("bob", 2)),
        store.put("registration", _registration("alice", 1, port=2222)),
    )
    assert seen.sizes == [3]
    assert ids[0] == ids[2] != ids[1], "one record, updated in place"
    [found] = await store.find("registration", sip_username="alice")
    assert found.fields["phone_port"] == 2222


async def test_a_refused_row_fails_only_its_caller(stores: tuple[Store, Store]) -> None:
    """A row the database refuses (a constraint) fails the batch's transaction; the
    puts are made again one by one, and only its caller sees the refusal."""
    store = stores[0]
    seen = _Batches(_backend(store))
    async with _backend(store)._connection(transaction=False) as conn:
        await conn.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT no_13 CHECK (phone_port <> 13)")
    results = await asyncio.gather(
        store.put("registration", _registration("alice", 1)),
        store.put("registration", _registration("bob", 2, port=13)),
        store.put("registration", _registration("carol", 3)),
        return_exceptions=True,
    )
    assert seen.sizes == [3, 1, 1, 1], "the batch, then each put alone"
    assert isinstance(results[0], int)
    assert isinstance(results[2], int)
    assert isinstance(results[1], Exception)
    assert not isinstance(results[1], StorageUnavailable)
    assert "no_13" in str(results[1])
    users = {r.fields["sip_username"] for r in await store.find("registration")}
    assert users == {"alice", "carol"}
    assert await store.subject_last_used(Subject("bob", SERIAL)) is None, "nothing of bob's"


async def test_an_outage_fails_every_caller_and_stores_nothing(
    stores: tuple[Store, Store], postgres_server: PostgresServer
) -> None:
    store = stores[0]
    seen = _Batches(_backend(store))
    postgres_server.stop()
    try:
        results = await asyncio.gather(
            *(store.put("registration", _registration(f"u{i}", i)) for i in range(5)),
            return_exceptions=True,
        )
    finally:
        postgres_server.start()
    assert [type(r) for r in results] == [StorageUnavailable] * 5
    assert len({id(r) for r in results}) == 5, "each caller its own exception"
    assert seen.sizes == [5], "not asked again row by row"
    assert await store.find("registration") == []
    await store.put("registration", _registration("u0", 0))  # back without a restart
    assert len(await store.find("registration")) == 1


async def test_close_commits_the_puts_under_way(
    settings: StoreSettings, tmp_path: Path, clock: ManualClock, stores: tuple[Store, Store]
) -> None:
    keyring = Keyring.generate()
    closing = await Store.create(POLICY, keyring, tmp_path, clock, settings)
    puts = [
        asyncio.ensure_future(closing.put("registration", _registration("u", i))) for i in range(10)
    ]
    await asyncio.sleep(0)  # each put is now waiting for its batch's commit
    await closing.close()
    assert all(isinstance(record_id, int) for record_id in await asyncio.gather(*puts))
    assert (await _query(stores[0], f"SELECT count(*) FROM {TABLE}")) == [(10,)]


async def test_two_processes_putting_the_same_records_and_subjects_never_deadlock(
    stores: tuple[Store, Store],
) -> None:
    """Both stores put the same records (and so subjects) in one turn each, one in the
    opposite order of the other, round after round: their batches' transactions take
    the same locks at once. Without one lock order they would deadlock, which the
    server breaks by failing a batch; here no batch fails. (Also the REGISTER bench's
    question: the same binding put by two processes at once is no error.)"""
    first, second = stores
    seen = [_Batches(_backend(first)), _Batches(_backend(second))]
    rows = [_registration(f"user{i % 4}", i % 60, port=i) for i in range(120)]

    async def one_by_one(store: Store) -> int:
        """Puts awaited in turn: after the first (in its store's batch), batches of one,
        the single statement, among the others' batches."""
        for row in rows[:6]:
            await store.put("registration", row)
        return 0

    async with asyncio.timeout(LONGEST_WAIT):
        for _ in range(10):
            results = await asyncio.gather(
                *(first.put("registration", row) for row in rows),
                *(second.put("registration", row) for row in reversed(rows)),
                one_by_one(second),
                return_exceptions=True,
            )
            assert [r for r in results if not isinstance(r, int)] == []
    assert [s.failures for s in seen] == [[], []], "no batch failed (no deadlock broken)"
    assert 1 in seen[1].sizes, "the single statement was among them"
    assert (await _query(first, f"SELECT count(*) FROM {TABLE}")) == [(60,)]
    assert (await _query(first, "SELECT count(*) FROM subjects")) == [(4,)]

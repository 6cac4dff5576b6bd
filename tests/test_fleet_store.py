"""Several processes, one database: each test opens two stores on the same database, as
two `softrelay` processes do (on PostgreSQL two pools, two sessions; on SQLite two
connections to one file), with the same keyring, as a fleet shares it. The clock is
injected and never moved unless a test says so: nothing here waits for time to pass."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import pytest

from privacy.backend import JobHeld
from privacy.clock import ManualClock
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.postgres import FEED_APPLICATION, RestrictionFeed
from privacy.retention import Sweeper
from privacy.store import RESTRICTIONS_FRESH, Store, Subject, stored_categories, table_spec
from tests.conftest import sample_fields
from tests.limits import LONGEST_WAIT
from tests.rawdb import RawDatabase
from tests.test_store import REGISTRATION
from usage.closing import SKIPPED, MonthCloser
from usage.ledger import USAGE, USAGE_CLOSE, USAGE_KEY, Ledger
from usage.period import end_of
from usage.settings import Tenant, UsageSettings

pytestmark = pytest.mark.both_backends

ALICE = Subject("alice", "0042137")
CAROL = Subject("carol", "0042137")
PERIOD = "2026-03"
INSTALLS = 40
HOUR = 3600.0


@pytest.fixture
async def fleet(
    tmp_path: Path, clock: ManualClock, store_settings: StoreSettings
) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores of the cloudsoftphone profile (usage) on the test's one database."""
    keyring, policy = Keyring.generate(), load_policy("cloudsoftphone")
    first = await Store.create(policy, keyring, tmp_path, clock, store_settings)
    second = await Store.create(policy, keyring, tmp_path, clock, store_settings)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def _usage() -> UsageSettings:
    return UsageSettings(tenants=(Tenant("acme", "acme-key-0123456789abcdef"),))


# --- usage ids --------------------------------------------------------------------------


async def test_one_month_secret_when_two_processes_create_it_at_once(
    fleet: tuple[Store, Store],
) -> None:
    a, b = fleet
    won = await asyncio.gather(
        a.put_new(USAGE_KEY, {"period": PERIOD, "secret": "from-a"}),
        b.put_new(USAGE_KEY, {"period": PERIOD, "secret": "from-b"}),
    )
    assert sorted(won) == [False, True]
    [kept] = await a.find(USAGE_KEY, period=PERIOD)
    assert kept.fields["secret"] == ("from-a" if won[0] else "from-b")
    assert [r.fields for r in await b.find(USAGE_KEY, period=PERIOD)] == [kept.fields]
    # Kept as it is: a later put_new changes nothing.
    assert not await b.put_new(USAGE_KEY, {"period": PERIOD, "secret": "late"})
    assert (await a.find(USAGE_KEY, period=PERIOD))[0].fields == kept.fields


async def test_every_install_pinging_both_processes_is_counted_once(
    fleet: tuple[Store, Store], clock: ManualClock
) -> None:
    """Both ledgers open the month at the same moment (its secret made once) and take
    every install's ping concurrently: the database holds one id per install, and the
    close counts exactly the installs."""
    a, b = fleet
    ledgers = Ledger(a), Ledger(b)
    pids = [i.to_bytes(16, "big") for i in range(1, INSTALLS + 1)]
    await asyncio.gather(
        *(ledger.record("acme", PERIOD, pid) for pid in pids for ledger in ledgers)
    )
    # A repeat to either process writes nothing new.
    await asyncio.gather(*(ledgers[1].record("acme", PERIOD, pid) for pid in pids[:5]))
    assert len(await a.find(USAGE, period=PERIOD)) == INSTALLS
    assert len(await a.find(USAGE_KEY, period=PERIOD)) == 1
    closer = MonthCloser(a, _usage())
    assert (await closer.tally(PERIOD)).counts == {"acme": INSTALLS}
    # Each process's own set sees only its share until it reads the others' ids.
    for ledger in ledgers:
        await ledger.refresh()
        assert ledger.distinct("acme", PERIOD) == INSTALLS
    for ledger in ledgers:
        await ledger.drain()


async def test_a_batch_of_records_with_different_fields_stores_each_as_given(
    fleet: tuple[Store, Store],
) -> None:
    """Batches (crash ingest, the usage ledger) join their callers' rows in one commit;
    a row that leaves a field out must not shift another row's values."""
    a, b = fleet
    await a.put_many(
        "usage_close",
        [
            {"period": "2026-01", "closed_at": 1, "closed_by": "job", "digest": "d1"},
            {"period": "2026-02", "closed_by": "cli", "total": 5, "tenants": 1},
        ],
    )
    [january] = await b.find("usage_close", period="2026-01")
    [february] = await b.find("usage_close", period="2026-02")
    assert (january.fields["closed_at"], january.fields["digest"]) == (1, "d1")
    assert january.fields["total"] is None
    assert (february.fields["closed_by"], february.fields["total"]) == ("cli", 5)
    assert february.fields["digest"] is None


# --- one process at a time --------------------------------------------------------------


async def test_a_job_lock_is_held_by_one_store_and_free_again_after(
    fleet: tuple[Store, Store],
) -> None:
    a, b = fleet
    async with a.backend.exclusive("sweep") as first:
        async with b.backend.exclusive("sweep") as second:
            assert (first, second) == (True, False)
        async with b.backend.exclusive("usage-close") as other_job:
            assert other_job, "each job has its own lock"
    async with b.backend.exclusive("sweep") as after:
        assert after
    with pytest.raises(ValueError, match="unknown job"):
        async with a.backend.exclusive("vacuum"):
            pass


async def test_the_sweep_runs_once_per_interval_between_two_processes(
    fleet: tuple[Store, Store],
    clock: ManualClock,
    tmp_path: Path,
    raw_db: RawDatabase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = fleet
    first, second = Sweeper(a, tmp_path / "a"), Sweeper(b, tmp_path / "b")
    categories = len(await first.run_once())  # a run, to count the rows of one
    clock.advance(HOUR)
    caplog.set_level(logging.INFO, logger="softrelay.privacy")
    # The other process is sweeping: this turn is skipped and said so.
    async with a.backend.exclusive("sweep"):
        assert await second.run_if_due(HOUR) is None
    assert "retention sweep skipped: another process holds the sweep" in caplog.messages
    # Turns at the same moment: one sweeps; the other finds it sweeping or swept.
    done = await asyncio.gather(first.run_if_due(HOUR), second.run_if_due(HOUR))
    assert sorted(runs is None for runs in done) == [False, True]
    # A turn after it, by either, within the interval: skipped.
    assert await second.run_if_due(HOUR) is None
    assert await first.run_if_due(HOUR) is None
    assert "retention sweep skipped: swept within the interval" in caplog.messages
    assert first.counters.skipped + second.counters.skipped == 4
    clock.advance(HOUR - 1)
    assert await first.run_if_due(HOUR) is None, "still within the interval"
    clock.advance(1)
    assert await first.run_if_due(HOUR) is not None
    assert raw_db.count("retention_runs") == 3 * categories


async def test_the_month_closes_once_when_two_processes_run_the_close_at_once(
    fleet: tuple[Store, Store], clock: ManualClock, raw_db: RawDatabase
) -> None:
    a, b = fleet
    ledger = Ledger(a)
    for i in range(1, 6):
        await ledger.record("acme", PERIOD, i.to_bytes(16, "big"))
    await ledger.drain()
    settings = _usage()
    clock.set(end_of(PERIOD) + settings.grace + 1)
    closers = MonthCloser(a, settings), MonthCloser(b, settings)
    # While one holds the job, the other's run does nothing and says so.
    async with a.backend.exclusive("usage-close"):
        assert await closers[1].run_once() == [SKIPPED]
    done = await asyncio.gather(*(closer.run_once() for closer in closers))
    closed = [f"closed {PERIOD}"]
    # One closed it; the other skipped (the runs overlapped) or found it closed.
    assert [d for d in done if d == closed] == [closed]
    assert all(d in (closed, [SKIPPED], []) for d in done), done
    assert raw_db.count("c_usage_close") == 1
    [audit] = await b.find(USAGE_CLOSE, period=PERIOD)
    assert audit.fields["total"] == 5
    assert await a.find(USAGE_KEY, period=PERIOD) == []
    # By hand, while the job runs elsewhere: refused, with what to do.
    async with b.backend.exclusive("usage-close"):
        with pytest.raises(Exception, match="another process is closing months now"):
            await closers[0].close(PERIOD, by="cli")


async def test_a_reseal_while_another_runs_is_refused(fleet: tuple[Store, Store]) -> None:
    a, b = fleet
    async with a.backend.exclusive("reseal"):
        with pytest.raises(JobHeld, match="another process is resealing"):
            await b.reseal()
    assert await b.reseal() == 0


# --- erasure: whole or not at all -------------------------------------------------------


async def test_an_erasure_that_fails_midway_erases_nothing(
    fleet: tuple[Store, Store], raw_db: RawDatabase, store_settings: StoreSettings
) -> None:
    """Every category of the subject in one transaction: a delete refused in the last
    table (a trigger of the database) rolls back the deletes before it."""
    a, b = fleet
    subject_categories = [table_spec(c) for c in stored_categories(a.policy) if c.subject]
    assert len(subject_categories) >= 2
    for spec in subject_categories:
        category = spec.name.removeprefix("c_")
        fields = sample_fields(a.policy.category(category))
        fields.update(sip_username=ALICE.sip_username, pbx_serial=ALICE.pbx_serial)
        await a.put(category, fields)
    await a.restrict(ALICE, True)
    last = subject_categories[-1].name
    before = {spec.name: raw_db.count(spec.name) for spec in subject_categories}
    if store_settings.backend == "postgresql":
        raw_db.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql"
            " AS $$BEGIN RAISE EXCEPTION 'refused by the test'; END$$",
            f"CREATE TRIGGER refuse BEFORE DELETE ON {last} FOR EACH ROW EXECUTE FUNCTION refuse()",
        )
    else:
        raw_db.execute(
            f"CREATE TRIGGER refuse BEFORE DELETE ON {last}"
            " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
    with pytest.raises(Exception, match="refused by the test"):
        await b.delete_subject(ALICE)
    assert {spec.name: raw_db.count(spec.name) for spec in subject_categories} == before
    assert raw_db.count("restrictions") == 1
    raw_db.execute(
        "DROP TRIGGER refuse" + (f" ON {last}" if store_settings.backend == "postgresql" else "")
    )
    counts = await b.delete_subject(ALICE)
    assert all(
        counts[spec.name.removeprefix("c_")] == before[spec.name] for spec in subject_categories
    )
    assert raw_db.count("restrictions") == 0


# --- restriction marks ------------------------------------------------------------------


@pytest.mark.postgresql_only("SQLite has no change feed; its re-read bound: test_restriction")
async def test_a_mark_set_by_one_process_holds_at_the_other_without_time_passing(
    fleet: tuple[Store, Store], store_settings: StoreSettings, raw_db: RawDatabase
) -> None:
    """PostgreSQL: the other store drops its copy of the marks as the notification
    arrives; the clock never moves. SQLite has no feed: its copy holds for
    RESTRICTIONS_FRESH seconds of the clock (test_restriction.py)."""
    a, b = fleet
    feed = b.backend.restriction_changes()
    assert isinstance(feed, RestrictionFeed)
    async with asyncio.timeout(LONGEST_WAIT):
        await feed.listening.wait()
    assert not await b.is_restricted(ALICE)  # read, and trusted from now on

    async def changed_by_a(change: Awaitable[object]) -> None:
        feed.moved.clear()
        await change
        async with asyncio.timeout(LONGEST_WAIT):
            await feed.moved.wait()

    await changed_by_a(a.restrict(ALICE, True))
    assert await b.is_restricted(ALICE)
    assert not await b.is_restricted(CAROL)
    await a.put("registration", {**REGISTRATION, "sip_username": "alice"})
    await changed_by_a(a.delete_subject(ALICE))  # the erasure takes the mark with it
    assert not await b.is_restricted(ALICE)
    # An operator's own SQL notifies too (the trigger is the database's).
    await changed_by_a(a.restrict(CAROL, True))
    assert await b.is_restricted(CAROL)
    feed.moved.clear()
    raw_db.execute("DELETE FROM restrictions")
    async with asyncio.timeout(LONGEST_WAIT):
        await feed.moved.wait()
    assert not await b.is_restricted(CAROL)


@pytest.mark.postgresql_only("SQLite has no change feed")
async def test_a_lost_listen_connection_is_not_trusted_and_comes_back(
    fleet: tuple[Store, Store], store_settings: StoreSettings, raw_db: RawDatabase
) -> None:
    """The LISTEN connection killed by the server: the generation moves at once (a
    read before the loss is not trusted again), and the feed listens again by itself;
    a mark set after that holds at the other store at once."""
    a, b = fleet
    feed = b.backend.restriction_changes()
    assert isinstance(feed, RestrictionFeed)
    async with asyncio.timeout(LONGEST_WAIT):
        await feed.listening.wait()
    before = feed.generation
    feed.moved.clear()
    raw_db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        f" WHERE application_name = '{FEED_APPLICATION}' AND datname = current_database()"
    )
    async with asyncio.timeout(LONGEST_WAIT):
        await feed.moved.wait()
        assert feed.generation > before
        while not feed.listening.is_set() or feed.generation < before + 2:
            feed.moved.clear()
            await feed.moved.wait()  # the loss, then the new LISTEN
    assert feed.live
    assert not await b.is_restricted(ALICE)
    feed.moved.clear()
    await a.restrict(ALICE, True)
    async with asyncio.timeout(LONGEST_WAIT):
        await feed.moved.wait()
    assert await b.is_restricted(ALICE)


@dataclass
class FakeFeed:
    """The store's side of a change feed, set by the test (ChangeFeed)."""

    generation: int = 0
    live: bool = True


async def test_the_store_trusts_its_marks_by_the_feed_and_by_the_clock_without_one(
    fleet: tuple[Store, Store], clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the feed is live and its generation unmoved, a read holds however long;
    a moved generation makes the next call read; a feed that is down falls back to the
    RESTRICTIONS_FRESH bound of the injected clock."""
    a, b = fleet
    feed = FakeFeed()
    monkeypatch.setattr(b.backend, "restriction_changes", lambda: feed)
    assert not await b.is_restricted(ALICE)
    await a.restrict(ALICE, True)
    clock.advance(10 * RESTRICTIONS_FRESH)
    assert not await b.is_restricted(ALICE), "live and unmoved: the read holds"
    feed.generation += 1
    assert await b.is_restricted(ALICE), "moved: read again at once"
    await a.restrict(ALICE, False)
    feed.live = False
    clock.advance(RESTRICTIONS_FRESH - 0.1)
    assert await b.is_restricted(ALICE), "down: the read holds for the bound"
    clock.advance(0.1)
    assert not await b.is_restricted(ALICE), "down: read again past the bound"

"""Each retention rule holds at its boundary, on an injected clock, for both profiles
and on both store backends: a record is kept one second before its limit and gone one
second after, from reads at once and from the database after the sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from privacy.clock import ManualClock, iso
from privacy.logs import category_logger, setup_logging
from privacy.policy import Rule, Storage
from privacy.retention import Sweeper
from privacy.store import Record, Store, Subject, stored_categories
from tests.conftest import PROFILES, StoreFactory, sample_fields

pytestmark = pytest.mark.both_backends


def _database_cases() -> list[tuple[str, str]]:
    from privacy.policy import load_policy

    return [(p, c.name) for p in PROFILES for c in stored_categories(load_policy(p))]


def _timed_cases() -> list[tuple[str, str]]:
    """(profile, category) of every stored category whose retention is a time limit."""
    from privacy.policy import load_policy

    timed = (Rule.AFTER_CREATED, Rule.AFTER_LAST_USE)
    return [
        (p, c.name)
        for p in PROFILES
        for c in stored_categories(load_policy(p))
        if c.retention.rule in timed
    ]


@pytest.mark.parametrize(("profile", "category"), _database_cases())
async def test_database_category_kept_before_and_gone_after_its_limit(
    open_store: StoreFactory, clock: ManualClock, tmp_path: Path, profile: str, category: str
) -> None:
    store = await open_store(profile)
    cat = store.policy.categories[category]
    account = store.policy.categories["account"].retention.seconds
    limit = cat.retention.seconds
    if cat.subject:
        # A subject's records also end with the account rule; test the shorter limit.
        limit = min(limit, account)
    await store.put(category, sample_fields(cat))
    sweeper = Sweeper(store, tmp_path)

    clock.advance(limit - 1)
    await sweeper.run_once()
    assert len(await store.find(category)) == 1, f"{category} gone before {limit}s"

    clock.advance(2)
    assert await store.find(category) == [], f"{category} still readable after {limit}s"
    await sweeper.run_once()
    assert (await store.stats())[category].rows == 0


@pytest.mark.parametrize(("profile", "category"), _timed_cases())
async def test_records_two_seconds_apart_straddle_the_cutoff_one_second_each_side(
    open_store: StoreFactory, clock: ManualClock, tmp_path: Path, profile: str, category: str
) -> None:
    """The cutoff is taken per record, to the second, from the injected clock (never the
    database's own time): at its limit + 1 s the older of two records is gone from reads
    and from the table after a sweep, while the younger one, at its limit - 1 s, stays."""
    store = await open_store(profile)
    cat = store.policy.categories[category]
    limit = cat.retention.seconds
    if cat.subject:
        # A subject's records also end with the account rule; the shorter limit holds.
        limit = min(limit, store.policy.categories["account"].retention.seconds)
    # Different markers: different record keys and, where there are any, subjects.
    older, younger = sample_fields(cat, "older"), sample_fields(cat, "younger")
    marker = next(name for name, value in older.items() if value != younger[name])
    start = clock.now()
    await store.put(category, older)
    clock.advance(2)
    await store.put(category, younger)
    sweeper = Sweeper(store, tmp_path)

    def markers(records: list[Record]) -> list[str]:
        return sorted(str(r.fields[marker]) for r in records)

    clock.set(start + limit - 1)
    await sweeper.run_once()
    assert markers(await store.find(category)) == sorted([str(older[marker]), str(younger[marker])])
    assert (await store.stats())[category].rows == 2

    clock.set(start + limit + 1)
    assert markers(await store.find(category)) == [str(younger[marker])], "older one still read"
    await sweeper.run_once()
    assert (await store.stats())[category].rows == 1, "the sweep kept the older or took both"
    assert markers(await store.find(category)) == [str(younger[marker])]

    clock.set(start + 2 + limit - 1)
    await sweeper.run_once()
    assert (await store.stats())[category].rows == 1
    clock.set(start + 2 + limit + 1)
    assert await store.find(category) == []
    await sweeper.run_once()
    assert (await store.stats())[category].rows == 0


@pytest.mark.parametrize("profile", PROFILES)
async def test_after_last_use_restarts_with_each_use(
    open_store: StoreFactory, clock: ManualClock, tmp_path: Path, profile: str
) -> None:
    store = await open_store(profile)
    cat = store.policy.categories["registration"]
    assert cat.retention.rule is Rule.AFTER_LAST_USE
    limit = min(cat.retention.seconds, store.policy.categories["account"].retention.seconds)
    record_id = await store.put("registration", sample_fields(cat))
    for _ in range(3):
        clock.advance(limit - 1)
        assert await store.touch("registration", record_id)
    await Sweeper(store, tmp_path).run_once()
    assert len(await store.find("registration")) == 1
    clock.advance(limit + 1)
    assert await store.find("registration") == []


async def test_account_rule_removes_a_whole_subject_in_cloudsoftphone(
    open_store: StoreFactory, clock: ManualClock, tmp_path: Path
) -> None:
    store = await open_store("cloudsoftphone")
    seven_days = 7 * 86400
    assert store.policy.categories["account"].retention.seconds == seven_days
    subject = {"sip_username": "alice", "pbx_serial": "0042137"}
    await store.put(
        "registration", {**sample_fields(store.policy.categories["registration"]), **subject}
    )
    await store.put("debug", {**subject, "destination_name": "Bob"})
    clock.advance(seven_days - 1)
    assert (await store.find_subject(Subject("alice", "0042137")))["registration"]
    clock.advance(2)
    found = await store.find_subject(Subject("alice", "0042137"))
    assert {"registration", "debug"} <= set(found)  # every category naming a subject
    assert not any(found.values()), found
    runs = {run.category: run for run in await Sweeper(store, tmp_path).run_once()}
    assert runs["account"].deleted == 1
    stats = await store.stats()
    assert stats["registration"].rows == stats["debug"].rows == stats["account"].rows == 0


@pytest.mark.sqlite_only("log files under the data directory: the store's backend plays no part")
@pytest.mark.parametrize("profile", PROFILES)
async def test_log_files_deleted_at_their_limit(
    open_store: StoreFactory, clock: ManualClock, tmp_path: Path, profile: str
) -> None:
    store = await open_store(profile)
    clock.set(clock.now() - clock.now() % 86400)  # midnight: the file's day starts now
    logs = setup_logging(store.policy, tmp_path, clock)
    try:
        for cat in store.policy.stored(Storage.LOG):
            category_logger(cat.name).info("probe", extra={"fields": {}})
    finally:
        logs.close()
    log_categories = store.policy.stored(Storage.LOG)
    assert log_categories
    for cat in log_categories:
        assert list((tmp_path / "log" / cat.name).glob("*.jsonl")), cat.name
    start = clock.now()

    def has_files(name: str) -> bool:
        return bool(list((tmp_path / "log" / name).glob("*.jsonl")))

    for limit in sorted({c.retention.seconds for c in log_categories}):
        clock.set(start + limit - 1)
        await Sweeper(store, tmp_path).run_once()
        for other in log_categories:
            if other.retention.seconds >= limit:
                assert has_files(other.name), f"{other.name} gone at {iso(clock.now())}"
        clock.set(start + limit + 1)
        await Sweeper(store, tmp_path).run_once()
        for other in log_categories:
            if other.retention.seconds <= limit:
                assert not has_files(other.name), f"{other.name} kept at {iso(clock.now())}"


async def test_each_sweep_appends_one_run_per_category_without_personal_data(
    store: Store, tmp_path: Path
) -> None:
    await store.put("registration", sample_fields(store.policy.categories["registration"], "alice"))
    runs = await Sweeper(store, tmp_path).run_once()
    categories = {run.category for run in runs}
    expected = {c.name for c in store.policy.categories.values() if c.storage is not Storage.MEMORY}
    assert categories == expected
    recorded = await store.backend.last_runs()
    assert {r.category for r in recorded} == expected
    assert all(isinstance(r.deleted, int) and r.cutoff < r.ran_at for r in recorded)

"""The book's versions in the store (contacts/book.py) on both backends: the switch to a
new version is a compare-and-set that exactly one of many writers wins, even writers
of separate processes (two stores on one database); a write that stops half-way leaves
the old book whole; uploads not committed expire after upload_ttl."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contacts.book import (
    CATEGORY,
    HEAD,
    Book,
    NoSuchUpload,
    TooManyUploads,
    VersionConflict,
)
from contacts.settings import ContactsSettings
from privacy.clock import ManualClock
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store, Subject, Value

pytestmark = pytest.mark.both_backends

ALICE = Subject("+4930901820", "0042137")
SETTINGS = ContactsSettings(max_book_bytes=64 * 1024, max_chunk_bytes=1024, upload_ttl=3600)
WRITERS = 6


@pytest.fixture
async def two_stores(
    tmp_path: Path, clock: ManualClock, store_settings: StoreSettings
) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database, as two processes of one deployment have."""
    policy, keyring = load_policy("cloudsoftphone"), Keyring.generate()
    first = await Store.create(policy, keyring, tmp_path, clock, store_settings)
    second = await Store.create(policy, keyring, tmp_path, clock, store_settings)
    yield first, second
    await first.close()
    await second.close()


async def _outcomes(books: list[Book], expect: str | None) -> list[str | None]:
    """Each writer's new version, or None for a 412."""

    async def one(book: Book, n: int) -> str | None:
        try:
            version, _ = await book.write(ALICE, f"writer {n}".encode() * 300, expect)
        except VersionConflict:
            return None
        return version.version

    return await asyncio.gather(*(one(books[n % 2], n) for n in range(WRITERS)))


async def test_of_many_writers_in_two_processes_exactly_one_wins_each_switch(
    two_stores: tuple[Store, Store],
) -> None:
    books = [Book(store, SETTINGS) for store in two_stores]
    created = await _outcomes(books, None)
    winners = [v for v in created if v is not None]
    assert len(winners) == 1
    replaced = await _outcomes(books, winners[0])
    (current,) = [v for v in replaced if v is not None]
    found = await books[1].read(ALICE)
    assert found is not None
    assert found[0].version == current
    assert found[1].startswith(b"writer ")
    # One head, and only the winner's records.
    records = await two_stores[0].find(CATEGORY)
    assert {r.fields["version"] for r in records} == {current}
    assert [r.fields["part"] for r in records].count(HEAD) == 1


async def test_store_replace_is_a_compare_and_set_on_the_subjects_records(
    two_stores: tuple[Store, Store],
) -> None:
    first, second = two_stores
    where: dict[str, Value] = {
        "sip_username": ALICE.sip_username,
        "pbx_serial": ALICE.pbx_serial,
        "part": HEAD,
    }

    def head(version: str) -> dict[str, Value]:
        return {**where, "version": version, "parts": 1, "size": 1, "committed": 1}

    assert await first.replace(CATEGORY, head("a"), where=where, expect=None)
    assert not await second.replace(CATEGORY, head("b"), where=where, expect=None)
    assert not await second.replace(CATEGORY, head("b"), where=where, expect={"version": "x"})
    results = await asyncio.gather(
        *(
            store.replace(CATEGORY, head(f"c{n}"), where=where, expect={"version": "a"})
            for n, store in enumerate([first, second] * 3)
        )
    )
    assert sorted(results) == [False] * 5 + [True]
    (kept,) = await first.find(CATEGORY)
    assert kept.fields["version"] == f"c{results.index(True)}"


async def test_a_write_that_stops_before_the_switch_leaves_the_old_book_whole(
    two_stores: tuple[Store, Store], clock: ManualClock
) -> None:
    store = two_stores[0]
    book = Book(store, SETTINGS)
    old = b"old book " * 400  # four chunks
    v1, _ = await book.write(ALICE, old, None)
    # A second writer's head and chunks are stored, then it stops (a crash).
    upload = await book.start_upload(ALICE)
    for index in range(3):
        await book.put_chunk(ALICE, upload, index, b"new" * 300)
    found = await book.read(ALICE)
    assert found == (v1, old)
    # Past upload_ttl the upload takes nothing more; past twice that its leftovers go,
    # and the book stays.
    clock.advance(SETTINGS.upload_ttl + 1)
    with pytest.raises(NoSuchUpload):
        await book.put_chunk(ALICE, upload, 3, b"late")
    assert await book.expire_uploads() == 0
    clock.advance(SETTINGS.upload_ttl)
    assert await book.expire_uploads() == 1
    assert {r.fields["version"] for r in await store.find(CATEGORY)} == {v1.version}
    assert await book.read(ALICE) == (v1, old)


async def test_an_upload_expires_and_cannot_be_committed_after_upload_ttl(
    two_stores: tuple[Store, Store], clock: ManualClock
) -> None:
    book = Book(two_stores[0], SETTINGS)
    upload = await book.start_upload(ALICE)
    await book.put_chunk(ALICE, upload, 0, b"part")
    clock.advance(SETTINGS.upload_ttl - 1)
    await book.put_chunk(ALICE, upload, 1, b"more")  # still open: the ttl counts from the start
    clock.advance(2)
    with pytest.raises(NoSuchUpload):
        await book.commit_upload(ALICE, upload, 2, hashlib.sha256(b"partmore").hexdigest(), None)
    assert await book.read(ALICE) is None
    # Another process's sweep removes it (the periodic expiry covers every owner).
    clock.advance(SETTINGS.upload_ttl)
    assert await Book(two_stores[1], SETTINGS).expire_uploads() == 1
    assert await two_stores[0].find(CATEGORY) == []


async def test_a_new_upload_sweeps_the_owners_expired_ones_first(
    two_stores: tuple[Store, Store], clock: ManualClock
) -> None:
    """At most MAX_UPLOADS at once; expired ones do not count and go at the next start."""
    book = Book(two_stores[0], SETTINGS)
    first = await book.start_upload(ALICE)
    await book.start_upload(ALICE)
    with pytest.raises(TooManyUploads):
        await book.start_upload(ALICE)
    clock.advance(2 * SETTINGS.upload_ttl + 1)
    third = await book.start_upload(ALICE)
    pending = {r.fields["version"] for r in await two_stores[0].find(CATEGORY)}
    assert pending == {third}
    with pytest.raises(NoSuchUpload):
        await book.put_chunk(ALICE, first, 0, b"x")

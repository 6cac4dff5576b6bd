"""The outside audit of the book (contacts/book.py, bookapi.py): what held is in the
report; these are what did not, each fixed: two commits of one upload at once (a
client's retry) must not delete the book the first one committed."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from contacts.book import Book, VersionConflict
from contacts.settings import ContactsSettings
from privacy.clock import ManualClock
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store, Subject

pytestmark = pytest.mark.both_backends

ALICE = Subject("+4930901820", "0042137")
SETTINGS = ContactsSettings(max_book_bytes=64 * 1024, max_chunk_bytes=1024, upload_ttl=3600)


def _gate_replace(store: Store, monkeypatch: pytest.MonkeyPatch, callers: int) -> None:
    """store.replace waits until `callers` calls have reached it: commits that passed
    their checks together, as two requests of one client (a retry) do."""
    original: Callable[..., Awaitable[bool]] = store.replace
    arrived = 0
    all_in = asyncio.Event()

    async def gated(category: str, fields: Mapping[str, Any], **kw: Any) -> bool:
        nonlocal arrived
        arrived += 1
        if arrived >= callers:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 10)
        return await original(category, fields, **kw)

    monkeypatch.setattr(store, "replace", gated)


@pytest.fixture
async def store(
    tmp_path: Path, clock: ManualClock, store_settings: StoreSettings
) -> AsyncIterator[Store]:
    opened = await Store.create(
        load_policy("cloudsoftphone"), Keyring.generate(), tmp_path, clock, store_settings
    )
    yield opened
    await opened.close()


@pytest.mark.parametrize("replaces", [False, True])
async def test_two_commits_of_one_upload_at_once_keep_the_committed_book(
    store: Store, monkeypatch: pytest.MonkeyPatch, replaces: bool
) -> None:
    book = Book(store, SETTINGS)
    old = None
    if replaces:
        old, _ = await book.write(ALICE, b"the old book", None)
    upload = await book.start_upload(ALICE)
    data = b"new book " * 200
    for index, start in enumerate(range(0, len(data), 1024)):
        await book.put_chunk(ALICE, upload, index, data[start : start + 1024])
    parts = -(-len(data) // 1024)
    digest = hashlib.sha256(data).hexdigest()
    _gate_replace(store, monkeypatch, 2)
    expect = old.version if old is not None else None
    outcomes = await asyncio.gather(
        *(book.commit_upload(ALICE, upload, parts, digest, expect) for _ in range(2)),
        return_exceptions=True,
    )
    won = [o for o in outcomes if isinstance(o, tuple)]
    lost = [o for o in outcomes if isinstance(o, VersionConflict)]
    assert len(won) == 1, outcomes
    assert len(lost) == 1, outcomes
    assert won[0][0].version == upload
    assert lost[0].current == upload  # the 412 names the upload itself: it is the book
    found = await book.read(ALICE)
    assert found is not None
    assert found[0].version == upload
    assert found[1] == data

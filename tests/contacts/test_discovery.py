"""The discoverable set on the server (contacts/discovery.py), without HTTP: a client
finds exactly the opted-in numbers; opting out removes a tag from the next version and
a delta says so; an epoch change re-keys the stored points without any number; the
daily quota is exact, durable and resets at the next UTC day; the global bucket stops
every owner; a bad element names its index and charges nothing; another node's changes
reach this node's set at its next check; restricted and expired records are left out."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Iterable, Sequence

import pytest

from contacts import discovery as discovery_module
from contacts import oprf
from contacts.discovery import (
    CATEGORY,
    CHECK_INTERVAL,
    DAY,
    QUOTA,
    BadElement,
    Busy,
    Directory,
    QuotaExhausted,
    StaleEpoch,
    oprf_secret,
)
from contacts.settings import ContactsSettings
from contacts.tagset import DELTA, FULL, JOURNAL_STEPS, TagSet, parse_set
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.store import Store, Subject
from tests.conftest import StoreFactory
from tests.limits import LONGEST_WAIT
from webapi.ratelimit import LocalLimiter, RateLimit

SETTINGS = ContactsSettings(quota_per_day=50, max_elements_per_request=20)
UNLIMITED = RateLimit(per_minute=0)


def number(i: int) -> str:
    """A valid German mobile number, distinct per i."""
    return f"+4915{1 + i % 7}{i:08d}"


def subject(i: int) -> Subject:
    return Subject(f"user{i}", "pbx-1")


def directory(
    store: Store,
    clock: ManualClock,
    keyring: Keyring,
    settings: ContactsSettings = SETTINGS,
    limit: RateLimit = UNLIMITED,
) -> Directory:
    return Directory(store, oprf_secret(keyring), settings, clock, LocalLimiter(limit, clock))


class Client:
    """An app's side: the downloaded set, then blind -> evaluate -> unblind -> tag."""

    def __init__(self, owner: Subject) -> None:
        self.owner = owner
        self.epoch = -1
        self.version = ""
        self.tags: set[bytes] = set()

    async def fetch(self, server: Directory) -> None:
        answer = await server.set_body(self.version or None)
        epoch, kind, added, removed = parse_set(answer.body)
        if kind == FULL:
            self.tags = set(added)
        else:
            assert epoch == self.epoch
            self.tags = (self.tags - set(removed)) | set(added)
        self.epoch, self.version = epoch, answer.version

    async def discover(self, server: Directory, numbers: Sequence[str]) -> set[str]:
        await self.fetch(server)
        found: set[str] = set()
        for start in range(0, len(numbers), SETTINGS.max_elements_per_request):
            batch = numbers[start : start + SETTINGS.max_elements_per_request]
            blinds = [oprf.blind(n.encode()) for n in batch]
            answer = await server.evaluate(self.owner, self.epoch, [b for _, b in blinds])
            for n, (r, _), evaluated in zip(batch, blinds, answer.elements, strict=True):
                if oprf.tag(oprf.unblind(r, evaluated)) in self.tags:
                    found.add(n)
        return found


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


async def _opened(open_store: StoreFactory) -> Store:
    return await open_store("cloudsoftphone")


async def _opt_in(server: Directory, indexes: Iterable[int]) -> None:
    for i in indexes:
        await server.opt_in(subject(i), number(i))


async def test_a_client_finds_exactly_the_opted_in_numbers(
    open_store: StoreFactory, clock: ManualClock, keyring: Keyring
) -> None:
    server = directory(await _opened(open_store), clock, keyring)
    await _opt_in(server, range(0, 40))
    asked = [number(i) for i in range(20, 60)]  # 20 opted in, 20 not
    settings = ContactsSettings(quota_per_day=1000, max_elements_per_request=20)
    server = directory(server._store, clock, keyring, settings)  # a fresh node: loads
    await server.load()
    assert await Client(subject(999)).discover(server, asked) == {number(i) for i in range(20, 40)}


async def test_opt_out_takes_the_tag_out_of_the_next_version_and_a_delta_says_removed(
    open_store: StoreFactory, clock: ManualClock, keyring: Keyring
) -> None:
    store = await _opened(open_store)
    server = directory(store, clock, keyring)
    await _opt_in(server, range(5))
    client = Client(subject(99))
    assert await client.discover(server, [number(3)]) == {number(3)}
    held = client.version

    assert await server.opt_out(subject(3)) is True
    assert await store.find(CATEGORY, sip_username="user3", pbx_serial="pbx-1") == []
    answer = await server.set_body(held)
    epoch, kind, added, removed = parse_set(answer.body)
    assert answer.version != held
    assert kind == DELTA
    assert added == []
    point = oprf.element(server.key(epoch), number(3).encode())
    assert removed == [oprf.tag(point)]
    assert await client.discover(server, [number(3), number(4)]) == {number(4)}
    assert await server.opt_out(subject(3)) is False  # nothing left to remove


async def test_an_epoch_change_rekeys_stored_points_without_numbers(
    open_store: StoreFactory,
    clock: ManualClock,
    keyring: Keyring,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = await _opened(open_store)
    server = directory(store, clock, keyring)
    await _opt_in(server, range(10))
    client = Client(subject(99))
    asked = [number(i) for i in range(5, 15)]
    assert await client.discover(server, asked) == {number(i) for i in range(5, 10)}
    old_epoch = client.epoch
    before = {r.fields["sip_username"]: r.fields["element"] for r in await store.find(CATEGORY)}

    clock.set((old_epoch + 1) * SETTINGS.key_epoch + 10)
    blinded = oprf.blind(b"+4915100000001")[1]

    # Re-keying needs no number: hashing any number to the group would fail now.
    def no_numbers(data: bytes) -> bytes:
        raise AssertionError("the re-key hashed an input")

    monkeypatch.setattr(oprf, "hash_to_group", no_numbers)
    with pytest.raises(StaleEpoch) as stale:
        await server.evaluate(subject(99), old_epoch, [blinded])
    assert stale.value.epoch == old_epoch + 1
    assert await server.refresh() is True
    monkeypatch.undo()

    after = {r.fields["sip_username"]: r for r in await store.find(CATEGORY)}
    new_key = server.key(old_epoch + 1)
    for i in range(10):
        record = after[f"user{i}"]
        assert record.fields["epoch"] == old_epoch + 1
        assert record.fields["element"] != before[f"user{i}"]
        expected = oprf.element(new_key, number(i).encode())
        assert base64.b64decode(str(record.fields["element"])) == expected
    fresh = Client(subject(98))
    assert await fresh.discover(server, asked) == {number(i) for i in range(5, 10)}
    assert fresh.epoch == old_epoch + 1
    # The old client's delta request gets the whole set of the new epoch.
    await client.fetch(server)
    assert client.epoch == old_epoch + 1
    assert client.tags == fresh.tags


async def test_the_quota_is_exact_durable_and_resets_at_the_next_utc_day(
    open_store: StoreFactory, clock: ManualClock, keyring: Keyring
) -> None:
    store = await _opened(open_store)
    server = directory(store, clock, keyring)
    owner = subject(7)
    epoch = server.epoch()
    element = oprf.blind(b"+4915100000001")[1]
    evaluated = 0
    remaining = SETTINGS.quota_per_day
    with pytest.raises(QuotaExhausted) as refused:  # noqa: PT012 - the loop runs into it
        while True:
            batch = min(7, remaining) or 7
            answer = await server.evaluate(owner, epoch, [element] * batch)
            evaluated += len(answer.elements)
            remaining = answer.remaining
    assert evaluated == SETTINGS.quota_per_day
    assert refused.value.remaining == 0
    day_end = (int(clock.now() // DAY) + 1) * DAY
    assert refused.value.retry_after == day_end - clock.now()

    # A restart: a new directory on the same store knows what was used today.
    restarted = directory(store, clock, keyring)
    await restarted.load()
    with pytest.raises(QuotaExhausted):
        await restarted.evaluate(owner, epoch, [element])
    clock.set(day_end)
    answer = await restarted.evaluate(owner, restarted.epoch(), [element] * 3)
    assert answer.remaining == SETTINGS.quota_per_day - 3


async def test_a_request_over_the_remaining_quota_is_refused_whole(
    open_store: StoreFactory, clock: ManualClock, keyring: Keyring
) -> None:
    server = directory(await _opened(open_store), clock, keyring)
    element = oprf.blind(b"+4915100000001")[1]
    await server.evaluate(subject(1), server.epoch(), [element] * 45)
    with pytest.raises(QuotaExhausted) as refused:
        await server.evaluate(subject(1), server.epoch(), [element] * 6)
    assert refused.value.remaining == 5
    assert (await server.evaluate(subject(1), server.epoch(), [element] * 5)).remaining == 0


async def test_the_global_bucket_stops_every_owner_and_charges_no_quota(
    open_store: StoreFactory, clock: ManualClock, keyring: Keyring
) -> None:
    store = await _opened(open_store)
    server = directory(store, clock, keyring, limit=RateLimit(per_minute=2, burst=1))
    element = oprf.blind(b"+4915100000001")[1]
    await server.evaluate(subject(1), server.epoch(), [element])
    with pytest.raises(Busy) as busy:
        await server.evaluate(subject(2), server.epoch(), [element])
    assert busy.value.retry_after == pytest.approx(30.0)
    assert await store.find(QUOTA, sip_username="user2", pbx_serial="pbx-1") == []
    clock.advance(30)
    await server.evaluate(subject(2), server.epoch(), [element])


@pytest.mark.parametrize("bad", [bytes(32), b"\xff" * 32, b"\x01" * 31])
async def test_a_bad_element_names_its_index_and_charges_nothing(
    open_store: StoreFactory, clock: ManualClock, keyring: Keyring, bad: bytes
) -> None:
    store = await _opened(open_store)
    server = directory(store, clock, keyring)
    good = oprf.blind(b"+4915100000001")[1]
    with pytest.raises(BadElement) as refused:
        await server.evaluate(subject(1), server.epoch(), [good, good, bad, good])
    assert refused.value.index == 2
    assert await store.find(QUOTA, sip_username="user1", pbx_serial="pbx-1") == []


async def test_another_nodes_changes_reach_the_set_at_the_next_check(
    open_store: StoreFactory, clock: ManualClock, keyring: Keyring
) -> None:
    store = await _opened(open_store)
    node_a, node_b = directory(store, clock, keyring), directory(store, clock, keyring)
    await node_a.load()
    await node_b.load()
    assert await node_b.refresh() is False  # nothing changed
    await _opt_in(node_a, [1, 2])
    assert await node_b.refresh() is True
    assert (await node_a.set_body()).version == (await node_b.set_body()).version
    assert await node_b.refresh() is False
    await node_a.opt_out(subject(1))
    await node_a.opt_in(subject(3), number(3))  # same row count as before
    assert await node_b.refresh() is True
    client = Client(subject(99))
    assert await client.discover(node_b, [number(i) for i in (1, 2, 3)]) == {number(2), number(3)}
    # Without any change, a full rebuild still comes every FULL_RELOAD.
    clock.advance(discovery_module.FULL_RELOAD)
    assert await node_b.refresh() is True


async def test_restricted_and_expired_records_are_not_discoverable(
    open_store: StoreFactory, clock: ManualClock, keyring: Keyring
) -> None:
    store = await _opened(open_store)
    server = directory(store, clock, keyring)
    # Away from an epoch boundary, so the week below stays in one epoch.
    clock.set((server.epoch() + 1) * SETTINGS.key_epoch + 60)
    await _opt_in(server, [1, 2, 3])
    await store.restrict(subject(1), True)
    await server.refresh()
    client = Client(subject(99))
    assert await client.discover(server, [number(1), number(2)]) == {number(2)}
    await store.restrict(subject(1), False)
    assert await server.refresh() is True
    assert await client.discover(server, [number(1), number(2)]) == {number(1), number(2)}
    # Eight days: subject 3 unused (expired, 7d), subjects 1 and 2 used (touched).
    clock.advance(4 * DAY)
    assert await server.discoverable(subject(1))
    assert await server.discoverable(subject(2))
    clock.advance(4 * DAY)
    await server.refresh()
    asked = [number(i) for i in (1, 2, 3)]
    assert await Client(subject(98)).discover(server, asked) == {number(1), number(2)}


def test_deltas_compose_over_the_journal_and_an_unknown_version_gets_none() -> None:
    tags = [bytes([i]) * 8 for i in range(6)]
    published = TagSet(3, dict.fromkeys(tags[:2], 1))
    v0 = published.version
    published.add(tags[2])
    v1 = published.version
    published.remove(tags[0])
    published.add(tags[3])
    published.remove(tags[3])  # in and out between two versions: not in any delta
    v2 = published.version
    published.add(tags[0])
    published.remove(tags[2])
    assert published.version != v2
    assert parse_set(published.delta(v0) or b"") == (3, DELTA, [], [])  # back to v0's set
    assert published.version == v0
    assert parse_set(published.delta(v1) or b"") == (3, DELTA, [], [tags[2]])
    assert parse_set(published.delta(v2) or b"") == (3, DELTA, [tags[0]], [tags[2]])
    assert published.delta("0" * 32) is None
    assert parse_set(published.full()) == (3, FULL, sorted(tags[:2]), [])
    # A tag two owners share stays until both are gone.
    published.add(tags[1])
    published.remove(tags[1])
    assert tags[1] in published
    assert published.version == v0


def test_the_journal_is_bounded() -> None:
    published = TagSet(1)
    first = published.version
    for i in range(JOURNAL_STEPS + 1):
        published.add(i.to_bytes(8, "big"))
        assert published.version
    assert published.delta(first) is None  # fell out: the app gets the whole set
    assert published.delta(published.version) is not None


async def test_the_periodic_check_brings_another_nodes_opt_in_and_an_erasure(
    open_store: StoreFactory, clock: ManualClock, keyring: Keyring
) -> None:
    """run_forever with an injected sleep: each tick is one `refresh`; its next sleep
    call says the tick is over, so the test waits on that, never on time."""
    store = await _opened(open_store)
    node_a, node_b = directory(store, clock, keyring), directory(store, clock, keyring)
    await node_b.load()
    slept: asyncio.Queue[float] = asyncio.Queue()
    go: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(seconds: float) -> None:
        await slept.put(seconds)
        await go.get()

    async def tick() -> None:
        await go.put(None)
        assert await asyncio.wait_for(slept.get(), LONGEST_WAIT) == CHECK_INTERVAL

    task = asyncio.create_task(node_b.run_forever(sleep))
    try:
        assert await asyncio.wait_for(slept.get(), LONGEST_WAIT) == CHECK_INTERVAL
        await _opt_in(node_a, [1, 2])
        client = Client(subject(99))
        await client.fetch(node_b)
        assert client.tags == set()  # not before the check
        await tick()
        assert await client.discover(node_b, [number(1), number(2)]) == {number(1), number(2)}
        await store.delete_subject(subject(1))  # an erasure (DSR), on any node
        await tick()
        assert await client.discover(node_b, [number(1), number(2)]) == {number(2)}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_damaged_stored_point_is_left_out_and_the_rest_are_rekeyed(
    open_store: StoreFactory, clock: ManualClock, keyring: Keyring
) -> None:
    store = await _opened(open_store)
    server = directory(store, clock, keyring)
    await _opt_in(server, [1, 2])
    epoch = server.epoch()
    damaged = base64.b64encode(b"\xff" * 32).decode()
    await store.put(
        CATEGORY,
        {"sip_username": "user3", "pbx_serial": "pbx-1", "element": damaged, "epoch": epoch},
    )
    clock.set((epoch + 1) * SETTINGS.key_epoch)
    asked = [number(i) for i in (1, 2, 3)]
    assert await Client(subject(99)).discover(server, asked) == {number(1), number(2)}
    assert await server.opt_out(subject(3)) is True  # it can still be removed

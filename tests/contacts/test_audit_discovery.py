"""The outside audit of Smart Contacts on the server (contacts/discovery.py): what did
not hold, each fixed. A batch with a bad element takes nothing from the global bucket
(else one owner empties it for everybody at no cost to its quota); two nodes charging
one owner at once cannot both pass the quota on the same count (a lost update would
multiply an owner's allowance by the nodes it reaches)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from contacts import oprf
from contacts.discovery import QUOTA, BadElement, Directory, QuotaExhausted, oprf_secret
from contacts.settings import ContactsSettings
from privacy.clock import ManualClock
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store, Subject
from webapi.ratelimit import LocalLimiter, RateLimit

pytestmark = pytest.mark.both_backends

OWNER = Subject("+4930901820", "0042137")
SETTINGS = ContactsSettings(quota_per_day=50, max_elements_per_request=30)
UNLIMITED = RateLimit(per_minute=0)
KEYRING = Keyring.generate()
GOOD = oprf.blind(b"+4915100000001")[1]
# What libsodium refuses: the identity, a non-canonical encoding, the top bit set, no point.
BAD = [bytes(32), b"\xff" * 32, GOOD[:31] + bytes([GOOD[31] | 0x80]), b"\x01" * 32, b"\x01" * 31]


@pytest.fixture
async def two_stores(
    tmp_path: Path, clock: ManualClock, store_settings: StoreSettings
) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database with one keyring: two nodes of one deployment."""
    policy = load_policy("cloudsoftphone")
    first = await Store.create(policy, KEYRING, tmp_path, clock, store_settings)
    second = await Store.create(policy, KEYRING, tmp_path, clock, store_settings)
    yield first, second
    await first.close()
    await second.close()


def _directory(store: Store, clock: ManualClock, limit: RateLimit = UNLIMITED) -> Directory:
    return Directory(store, oprf_secret(KEYRING), SETTINGS, clock, LocalLimiter(limit, clock))


@pytest.mark.sqlite_only("the check runs before the store plays a part")
def test_the_early_check_refuses_exactly_what_evaluation_refuses() -> None:
    key = oprf.new_key()
    samples = [*BAD, GOOD, *(os.urandom(32) for _ in range(200))]
    for element in samples:
        try:
            oprf.blind_evaluate(key, element)
            evaluates = True
        except oprf.InvalidElement:
            evaluates = False
        assert (oprf.first_invalid([element]) is None) == evaluates, element.hex()
    assert oprf.first_invalid([GOOD, GOOD, BAD[1], BAD[0]]) == 2


@pytest.mark.parametrize(
    "bad", BAD, ids=["identity", "non-canonical", "top-bit", "no-point", "short"]
)
async def test_a_bad_element_last_in_a_batch_takes_nothing_from_the_global_bucket(
    two_stores: tuple[Store, Store], clock: ManualClock, bad: bytes
) -> None:
    store = two_stores[0]
    # Exactly one full request's worth in the bucket, refilled over a whole hour.
    server = _directory(store, clock, RateLimit(per_minute=0.5, burst=30))
    for _ in range(3):
        with pytest.raises(BadElement) as refused:
            await server.evaluate(OWNER, server.epoch(), [GOOD] * 29 + [bad])
        assert refused.value.index == 29
    answer = await server.evaluate(OWNER, server.epoch(), [GOOD] * 30)
    assert len(answer.elements) == 30
    assert answer.remaining == 20


def _gate_quota_reads(stores: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each store's first read of the quota waits for the other's: the two nodes read
    the owner's count at the same moment."""
    arrived = 0
    both_in = asyncio.Event()

    def gate(store: Store) -> None:
        original: Callable[..., Awaitable[Any]] = store.find

        async def gated(category: str, **where: Any) -> Any:
            nonlocal arrived
            if category == QUOTA and not both_in.is_set():
                arrived += 1
                if arrived >= len(stores):
                    both_in.set()
                await asyncio.wait_for(both_in.wait(), 10)
            return await original(category, **where)

        monkeypatch.setattr(store, "find", gated)

    for store in stores:
        gate(store)


async def test_two_nodes_charging_one_owner_at_once_cannot_pass_the_quota_together(
    two_stores: tuple[Store, Store], clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = [_directory(store, clock) for store in two_stores]
    _gate_quota_reads(two_stores, monkeypatch)
    outcomes = await asyncio.gather(
        *(node.evaluate(OWNER, node.epoch(), [GOOD] * 30) for node in nodes),
        return_exceptions=True,
    )
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, QuotaExhausted)]
    assert len(answered) == 1, outcomes
    assert len(refused) == 1, outcomes
    assert answered[0].remaining == 20
    assert refused[0].remaining == 20
    (count,) = await two_stores[1].find(QUOTA)
    assert count.fields["used"] == 30

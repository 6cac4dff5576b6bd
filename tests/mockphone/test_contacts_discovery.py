"""The app's discovery client (mockphone/contacts.py) against a fake discovery server on
port 0 that speaks the wire format of issue 19's plan with contacts/oprf.py: it finds
exactly the discoverable numbers of a book; a number checked once is never sent again
in the epoch (and a user who joins later is found from the point held, without asking);
the set follows deltas; the quota defers the rest with Retry-After; a new epoch sends
the numbers again under the new key. The server side's own tests are in tests/contacts."""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from contacts import oprf
from mockphone.contacts import (
    SET_MAGIC,
    ContactsRefused,
    DamagedSet,
    DiscoveryClient,
    parse_set,
)

TOKEN = "cd.device1.secret"


@dataclass
class FakeDiscovery:
    """The server side, in the plan's wire format: the set of tags of k * H(number),
    versions with a journal for deltas, evaluation under a per-epoch quota."""

    epoch: int = 7
    key: bytes = field(default_factory=oprf.new_key)
    numbers: set[str] = field(default_factory=set)
    quota: int = 1000
    used: int = 0
    received: list[bytes] = field(default_factory=list)  # every blinded element
    journal: dict[str, frozenset[bytes]] = field(default_factory=dict)  # version -> tags
    rotate_before_next_evaluate: bool = False

    def tags(self) -> frozenset[bytes]:
        return frozenset(oprf.tag(oprf.element(self.key, n.encode())) for n in self.numbers)

    def version(self, tags: frozenset[bytes]) -> str:
        digest = hashlib.sha256(struct.pack(">I", self.epoch) + b"".join(sorted(tags)))
        return digest.hexdigest()[:32]

    def rotate(self) -> None:
        self.epoch += 1
        self.key = oprf.new_key()
        self.journal.clear()

    async def get_set(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "unauthorized"}, status=401)
        tags = self.tags()
        version = self.version(tags)
        self.journal[version] = tags
        etag = f'"{version}"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        since = self.journal.get(request.query.get("since", ""))
        if since is None:
            added, removed, kind = sorted(tags), [], 0
        else:
            added, removed, kind = sorted(tags - since), sorted(since - tags), 1
        body = struct.pack(">4sIBII", SET_MAGIC, self.epoch, kind, len(added), len(removed))
        body += b"".join(added) + b"".join(removed)
        return web.Response(body=body, headers={"ETag": etag})

    async def evaluate(self, request: web.Request) -> web.Response:
        if self.rotate_before_next_evaluate:
            self.rotate_before_next_evaluate = False
            self.rotate()
        body = await request.json()
        if body["epoch"] != self.epoch:
            return web.json_response({"error": "stale_epoch"}, status=409)
        blinded = [base64.b64decode(b) for b in body["blinded"]]
        if self.used + len(blinded) > self.quota:
            return web.json_response(
                {"error": "quota_exhausted"}, status=429, headers={"Retry-After": "3600"}
            )
        self.used += len(blinded)
        self.received += blinded
        evaluated = oprf.blind_evaluate_many(self.key, blinded)
        return web.json_response(
            {
                "epoch": self.epoch,
                "evaluated": [base64.b64encode(e).decode() for e in evaluated],
                "remaining": self.quota - self.used,
            }
        )


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeDiscovery, DiscoveryClient]]:
    server = FakeDiscovery()
    app = web.Application()
    app.router.add_get("/contacts/v1/discovery/set", server.get_set)
    app.router.add_post("/contacts/v1/discovery/evaluate", server.evaluate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            client = DiscoveryClient(
                session, f"http://127.0.0.1:{port}", TOKEN, region="DE", max_elements=4
            )
            yield server, client
    finally:
        await runner.cleanup()


BOOK = [
    "+49 30 901820",  # discoverable
    "030 9018 21",  # national, DE: discoverable
    "0049 (40) 4321-0",  # not discoverable
    "+1 415 555 2671",  # discoverable
    "not a number",
    "+4930901820",  # the first again, other form: looked up once
    "+49 89 1234567",
]


async def test_discovery_finds_exactly_the_discoverable_numbers_and_never_resends_one(
    fake: tuple[FakeDiscovery, DiscoveryClient],
) -> None:
    server, client = fake
    server.numbers = {"+4930901820", "+4930901821", "+14155552671", "+4922112345"}
    found = await client.discover(BOOK)
    assert found.matched == {"+4930901820", "+4930901821", "+14155552671"}
    assert (found.checked, found.sent, found.not_numbers) == (5, 5, 1)
    assert client.counters.requests == 2  # 4 a request
    # No element the server got is a number's hash or its keyed form: only blinded ones.
    plain = {oprf.hash_to_group(n.encode()) for n in server.numbers | found.matched}
    keyed = {oprf.element(server.key, n.encode()) for n in server.numbers}
    assert not (set(server.received) & (plain | keyed))

    again = await client.discover([*BOOK, "+49 40 999888"])
    assert (again.sent, again.matched) == (1, found.matched)
    assert len(server.received) == 6
    assert client.counters.not_modified == 1  # the set did not change: 304


async def test_a_user_who_joins_later_is_found_from_the_point_held(
    fake: tuple[FakeDiscovery, DiscoveryClient],
) -> None:
    server, client = fake
    server.numbers = {"+4930901820"}
    await client.discover(BOOK)
    sent = len(server.received)
    server.numbers |= {"+49891234567"}  # +49891234567 opts in
    server.numbers -= {"+4930901820"}  # and this one opts out
    found = await client.discover(BOOK)
    assert found.matched == {"+49891234567"}
    assert (found.sent, len(server.received)) == (0, sent)
    assert (client.counters.full_sets, client.counters.deltas) == (1, 1)
    assert client.tags == set(server.tags())


async def test_the_quota_defers_the_rest_with_retry_after(
    fake: tuple[FakeDiscovery, DiscoveryClient],
) -> None:
    server, client = fake
    server.quota = 4
    server.numbers = {"+4930901820", "+49891234567"}
    found = await client.discover(BOOK)
    # The first request of 4 went through; the next would pass the quota: nothing of
    # it was evaluated, and it is left for later.
    assert (found.sent, found.deferred, found.retry_after) == (4, ["+49891234567"], 3600.0)
    assert found.matched == {"+4930901820"}
    server.quota = 5
    later = await client.discover(BOOK)
    assert (later.sent, later.deferred, later.matched) == (1, [], server.numbers)


async def test_a_new_epoch_sends_the_numbers_again_under_the_new_key(
    fake: tuple[FakeDiscovery, DiscoveryClient],
) -> None:
    server, client = fake
    server.numbers = {"+4930901820"}
    await client.discover(BOOK)
    server.rotate()
    found = await client.discover(BOOK)
    assert (found.sent, found.matched, client.epoch) == (5, {"+4930901820"}, 8)
    # The key changes between the set and the evaluation: 409, the set again, retried.
    server.rotate_before_next_evaluate = True
    found = await client.discover(["+49 30 555 666"])
    assert (found.sent, found.matched, client.epoch) == (1, set(), 9)
    assert client.counters.stale_epochs == 1


async def test_other_refusals_reach_the_caller(
    fake: tuple[FakeDiscovery, DiscoveryClient],
) -> None:
    _, client = fake
    client._token = "revoked"
    with pytest.raises(ContactsRefused) as refused:
        await client.discover(BOOK)
    assert (refused.value.status, refused.value.error) == (401, "unauthorized")


def _set(epoch: int, kind: int, added: list[bytes], removed: list[bytes]) -> bytes:
    head = struct.pack(">4sIBII", SET_MAGIC, epoch, kind, len(added), len(removed))
    return head + b"".join(added) + b"".join(removed)


def test_parse_set_reads_full_sets_and_deltas() -> None:
    a, b = b"A" * 8, b"B" * 8
    full = parse_set(_set(3, 0, [a, b], []))
    assert (full.epoch, full.delta) == (3, False)
    assert (full.added, full.removed) == (frozenset({a, b}), frozenset())
    delta = parse_set(_set(3, 1, [a], [b]))
    assert (delta.delta, delta.added, delta.removed) == (True, frozenset({a}), frozenset({b}))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"SRD1", "shorter"),
        (b"XXXX" + _set(1, 0, [], [])[4:], "not a discovery set"),
        (_set(1, 2, [], []), "not a discovery set"),
        (_set(1, 0, [b"A" * 8], [])[:-1], "length"),
        (_set(1, 0, [b"A" * 8], []) + b"x", "length"),
        (_set(1, 0, [], [b"A" * 8]), "removes nothing"),
    ],
)
def test_parse_set_refuses_what_softrelay_never_sends(body: bytes, reason: str) -> None:
    with pytest.raises(DamagedSet, match=reason):
        parse_set(body)

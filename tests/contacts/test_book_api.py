"""`/contacts/v1/book` over HTTP against the whole app: an opaque book round-trips
through two devices of one account (a SIPIS app and a PBX-proved device of the same
subject), a stale version gets 412 with the current ETag, two devices racing get
exactly one success, another account gets 403 and its own 404, a book larger than one
request goes up in chunks, the size cap holds, and erasure and the retention remove
the book with everything else of the subject."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os

import pytest

from contacts.book import CATEGORY
from contacts.owners import DEVICES
from mockphone import digest
from tests.contacts.conftest import (
    OTHER_USER,
    USER,
    ContactsWorld,
    OwnerToken,
    create_sipis_account,
    prove_device,
)
from tests.rawdb import RawDatabase
from tests.sip.test_relay import SERIAL
from tests.test_dsr_api import PASSWORD

pytestmark = pytest.mark.both_backends

BOOK = "/contacts/v1/book"
UPLOADS = "/contacts/v1/book/uploads"
OCTETS = {"Content-Type": "application/octet-stream"}
DAY = 86400.0
ALICE = {"owner": f"sip:{USER}@{SERIAL}"}  # the query naming the first subject's book


def envelope(size: int = 1000) -> bytes:
    """What an app sends: bytes the server cannot read (random, like a ciphertext)."""
    return os.urandom(size)


async def put(
    world: ContactsWorld, owner: OwnerToken, data: bytes, *, match: str | None = None
) -> tuple[int, str]:
    """PUT the book: If-Match `match` (a version), else If-None-Match: *; (status, ETag)."""
    precondition = {"If-Match": f'"{match}"'} if match else {"If-None-Match": "*"}
    answer = await world.call("PUT", BOOK, owner.token, data=data, headers=OCTETS | precondition)
    return answer.status, answer.headers.get("ETag", "").strip('"')


async def get(world: ContactsWorld, owner: OwnerToken) -> tuple[int, str, bytes]:
    answer = await world.call("GET", BOOK, owner.token)
    return answer.status, answer.headers.get("ETag", "").strip('"'), answer.body


async def test_a_book_round_trips_through_two_devices_of_one_account(
    contacts_world: ContactsWorld, sipis_owner: OwnerToken, device_owner: OwnerToken
) -> None:
    world = contacts_world
    assert sipis_owner.subject == device_owner.subject
    first = envelope()
    status, v1 = await put(world, sipis_owner, first)
    assert status == 201
    # The PBX-proved device reads what the SIPIS app wrote, byte for byte.
    assert await get(world, device_owner) == (200, v1, first)
    answer = await world.call("GET", BOOK, device_owner.token, headers={"If-None-Match": f'"{v1}"'})
    assert (answer.status, answer.body, answer.headers["ETag"]) == (304, b"", f'"{v1}"')
    second = envelope(2000)
    status, v2 = await put(world, device_owner, second, match=v1)
    assert status == 200
    assert v2 != v1
    assert await get(world, sipis_owner) == (200, v2, second)
    # Only the current version is kept: one head, one chunk.
    records = await world.store.find(CATEGORY)
    assert {r.fields["version"] for r in records} == {v2}
    assert sorted(int(str(r.fields["part"])) for r in records) == [-1, 0]
    assert (await world.call("DELETE", BOOK, device_owner.token)).status == 204
    assert (await get(world, sipis_owner))[0] == 404
    assert await world.store.find(CATEGORY) == []


async def test_a_stale_version_gets_412_with_the_current_etag(
    contacts_world: ContactsWorld, sipis_owner: OwnerToken, device_owner: OwnerToken
) -> None:
    world = contacts_world
    _, v1 = await put(world, sipis_owner, b"one")
    _, v2 = await put(world, device_owner, b"two", match=v1)
    answer = await world.call(
        "PUT", BOOK, sipis_owner.token, data=b"three", headers=OCTETS | {"If-Match": f'"{v1}"'}
    )
    assert answer.status == 412
    assert answer.error == "version_conflict"
    assert answer.headers["ETag"] == f'"{v2}"'
    # Creating again where a book is: 412 too, with the current one.
    status, etag = await put(world, sipis_owner, b"four")
    assert (status, etag) == (412, v2)
    assert await get(world, sipis_owner) == (200, v2, b"two")
    assert {r.fields["version"] for r in await world.store.find(CATEGORY)} == {v2}


async def test_two_devices_racing_get_exactly_one_success_and_one_412(
    contacts_world: ContactsWorld, sipis_owner: OwnerToken, device_owner: OwnerToken
) -> None:
    world = contacts_world
    # Both create at once: one 201, one 412 naming the winner's version.
    created = await asyncio.gather(
        put(world, sipis_owner, b"sipis-first"), put(world, device_owner, b"device-first")
    )
    assert sorted(status for status, _ in created) == [201, 412]
    (winner,) = {etag for _, etag in created}  # the loser's ETag is the winner's version
    # Both replace that version at once: one 200, one 412.
    replaced = await asyncio.gather(
        put(world, sipis_owner, b"sipis-second", match=winner),
        put(world, device_owner, b"device-second", match=winner),
    )
    assert sorted(status for status, _ in replaced) == [200, 412]
    (current,) = {etag for _, etag in replaced}
    status, etag, body = await get(world, sipis_owner)
    assert (status, etag) == (200, current)
    assert body in (b"sipis-second", b"device-second")
    # Nothing of the losers is left behind.
    assert {r.fields["version"] for r in await world.store.find(CATEGORY)} == {current}


async def test_another_account_gets_403_for_this_book_and_404_for_its_own(
    contacts_world: ContactsWorld, device_owner: OwnerToken
) -> None:
    world = contacts_world
    _, version = await put(world, device_owner, b"alice's book")
    bob = await prove_device(world, OTHER_USER)
    answer = await world.call("GET", BOOK, bob.token, params=ALICE)
    assert (answer.status, answer.error) == (403, "not_your_book")
    answer = await world.call("GET", BOOK, bob.token)
    assert (answer.status, answer.error) == (404, "no_book")
    # Bob's write with Alice's version touches only his own (absent) book.
    status, _ = await put(world, bob, b"bob's", match=version)
    assert status == 412
    # The owner naming itself is answered.
    answer = await world.call("GET", BOOK, device_owner.token, params=ALICE)
    assert (answer.status, answer.body) == (200, b"alice's book")
    assert {r.fields["sip_username"] for r in await world.store.find(CATEGORY)} == {USER}


async def _upload(
    world: ContactsWorld, owner: OwnerToken, data: bytes, step: int
) -> tuple[str, int]:
    started = await world.call("POST", UPLOADS, owner.token)
    assert started.status == 201, started.body
    upload = started.json()["upload_id"]
    assert started.json()["max_chunk_bytes"] == world.settings.max_chunk_bytes
    parts = 0
    for index, offset in enumerate(range(0, len(data), step)):
        chunk = data[offset : offset + step]
        answer = await world.call(
            "PUT", f"{UPLOADS}/{upload}/{index}", owner.token, data=chunk, headers=OCTETS
        )
        assert answer.status == 204, answer.body
        parts += 1
    return upload, parts


async def test_a_book_larger_than_one_request_goes_up_in_chunks(
    contacts_world: ContactsWorld, device_owner: OwnerToken, sipis_owner: OwnerToken
) -> None:
    world = contacts_world
    big = envelope(3 * world.settings.max_chunk_bytes + 100)
    status, _ = await put(world, device_owner, big)
    assert status == 413  # one request carries at most max_chunk_bytes
    upload, parts = await _upload(world, device_owner, big, world.settings.max_chunk_bytes)
    assert parts == 4
    # Not the book before the commit.
    assert (await get(world, sipis_owner))[0] == 404
    commit = {"parts": parts, "sha256": hashlib.sha256(big).hexdigest()}
    answer = await world.call(
        "POST",
        f"{UPLOADS}/{upload}/commit",
        device_owner.token,
        json=commit,
        headers={"If-None-Match": "*"},
    )
    assert answer.status == 201, answer.body
    version = answer.headers["ETag"].strip('"')
    assert answer.json() == {"version": version, "size": len(big)}
    assert await get(world, sipis_owner) == (200, version, big)
    # A committed upload takes no more chunks.
    again = await world.call(
        "PUT", f"{UPLOADS}/{upload}/0", device_owner.token, data=b"x", headers=OCTETS
    )
    assert (again.status, again.error) == (404, "no_such_upload")


async def test_a_commit_that_does_not_match_its_chunks_is_refused_and_the_book_kept(
    contacts_world: ContactsWorld, device_owner: OwnerToken
) -> None:
    world = contacts_world
    _, v1 = await put(world, device_owner, b"kept")
    data = envelope(10_000)
    upload, parts = await _upload(world, device_owner, data, 4096)
    url = f"{UPLOADS}/{upload}/commit"
    match = {"If-Match": f'"{v1}"'}
    for body, detail in (
        ({"parts": parts + 1, "sha256": hashlib.sha256(data).hexdigest()}, "missing part 3"),
        ({"parts": parts - 1, "sha256": hashlib.sha256(data).hexdigest()}, "part 2 beyond"),
        ({"parts": parts, "sha256": hashlib.sha256(b"other").hexdigest()}, "sha256"),
    ):
        answer = await world.call("POST", url, device_owner.token, json=body, headers=match)
        assert (answer.status, answer.error) == (400, "incomplete_upload")
        assert detail in answer.json()["detail"]
    assert await get(world, device_owner) == (200, v1, b"kept")
    good = {"parts": parts, "sha256": hashlib.sha256(data).hexdigest()}
    answer = await world.call("POST", url, device_owner.token, json=good, headers=match)
    assert answer.status == 200
    assert (await get(world, device_owner))[2] == data


async def test_the_size_cap_refuses_a_larger_book_with_413_and_changes_nothing(
    contacts_world: ContactsWorld, device_owner: OwnerToken
) -> None:
    world = contacts_world
    cap = world.settings.max_book_bytes
    _, v1 = await put(world, device_owner, b"small")
    before = await world.store.find(CATEGORY)
    # Announced larger than the cap: refused before a byte is read.
    answer = await world.call(
        "PUT",
        BOOK,
        device_owner.token,
        data=b"x" * (cap + 1),
        headers=OCTETS | {"If-Match": f'"{v1}"'},
    )
    assert (answer.status, answer.error) == (413, "book_too_large")
    # In chunks: the chunk that passes the cap is refused.
    started = await world.call("POST", UPLOADS, device_owner.token)
    upload = started.json()["upload_id"]
    step = world.settings.max_chunk_bytes
    for index in range(cap // step):
        answer = await world.call(
            "PUT",
            f"{UPLOADS}/{upload}/{index}",
            device_owner.token,
            data=b"y" * step,
            headers=OCTETS,
        )
        assert answer.status == 204
    answer = await world.call(
        "PUT", f"{UPLOADS}/{upload}/{cap // step}", device_owner.token, data=b"z", headers=OCTETS
    )
    assert (answer.status, answer.error) == (413, "book_too_large")
    assert await get(world, device_owner) == (200, v1, b"small")
    # The book's records are as they were; the upload is its own until it expires.
    after = [r for r in await world.store.find(CATEGORY) if r.fields["version"] == v1]
    assert [(r.id, r.fields) for r in after] == [(r.id, r.fields) for r in before]


async def test_erasure_removes_the_book_the_devices_and_everything_of_the_subject(
    contacts_world: ContactsWorld, sipis_owner: OwnerToken, device_owner: OwnerToken
) -> None:
    world = contacts_world
    await put(world, device_owner, envelope())
    bob = await prove_device(world, OTHER_USER)
    await put(world, bob, b"bob's book")
    # The subject erases through DSR, proving identity with the PBX's digest (a nonce
    # of a later second: the mock PBX refuses one answered before, as a PBX does).
    world.clock.advance(1)
    subject = {"sip_username": USER, "pbx_serial": SERIAL}
    challenge = await world.call("POST", "/dsr/v1/challenge", json=subject)
    assert challenge.status == 200
    offered = challenge.json()
    (www,) = [c for c in offered["www_authenticate"] if "MD5" in c]
    authorization = digest.answer(
        www, username=USER, password=PASSWORD, method="REGISTER", uri=offered["uri"]
    ).header
    body = subject | {"challenge_id": offered["challenge_id"], "authorization": authorization}
    answer = await world.call("POST", "/dsr/v1/erase", json=body)
    assert answer.status == 200, answer.body
    counts = answer.json()["counts"]
    assert counts[CATEGORY] == 2
    assert counts[DEVICES] == 1
    assert all(
        not records for records in (await world.store.find_subject(device_owner.subject)).values()
    )
    # Neither token opens anything now; the other subject keeps its book.
    for owner in (device_owner, sipis_owner):
        assert (await world.call("GET", BOOK, owner.token)).status == 401
    assert (await get(world, bob))[2] == b"bob's book"


async def test_retention_removes_an_unused_book_and_a_use_restarts_its_clock(
    contacts_world: ContactsWorld, device_owner: OwnerToken
) -> None:
    """cloudsoftphone: 7 days after the last use (address_book, contacts_device, and
    the account rule over the whole subject)."""
    world = contacts_world
    data = envelope(10_000)  # three chunks and a head: every record must live on
    upload, parts = await _upload(world, device_owner, data, 4096)
    answer = await world.call(
        "POST",
        f"{UPLOADS}/{upload}/commit",
        device_owner.token,
        json={"parts": parts, "sha256": hashlib.sha256(data).hexdigest()},
        headers={"If-None-Match": "*"},
    )
    assert answer.status == 201
    world.clock.advance(7 * DAY - 60)
    await world.sweeper.run_once()
    assert (await get(world, device_owner))[2] == data  # a use: the clock starts again
    world.clock.advance(7 * DAY - 60)
    await world.sweeper.run_once()
    assert len(await world.store.find(CATEGORY)) == parts + 1
    assert (await get(world, device_owner))[2] == data
    world.clock.advance(7 * DAY + 1)
    await world.sweeper.run_once()
    assert await world.store.find(CATEGORY) == []
    assert await world.store.find(DEVICES) == []
    assert (await world.call("GET", BOOK, device_owner.token)).status == 401


async def test_a_sipis_account_of_another_subject_reads_only_its_own(
    contacts_world: ContactsWorld, device_owner: OwnerToken
) -> None:
    world = contacts_world
    await put(world, device_owner, b"alice's")
    carol = await create_sipis_account(world, OTHER_USER)
    assert (await get(world, carol))[0] == 404
    answer = await world.call("GET", BOOK, carol.token, params=ALICE)
    assert (answer.status, answer.error) == (403, "not_your_book")


async def test_the_stored_data_is_encrypted_at_rest(
    contacts_world: ContactsWorld, device_owner: OwnerToken, raw_db: RawDatabase
) -> None:
    """What the app sent appears nowhere in the database: neither its bytes nor their
    base64 (the form the record holds before the store encrypts it), in the row or in
    a dump of every table."""
    world = contacts_world
    canary = b"CONTACTS-CIPHERTEXT-CANARY-" + os.urandom(16).hex().encode()
    data = canary * 40
    status, _ = await put(world, device_owner, data)
    assert status == 201
    (stored,) = raw_db.blobs(f"SELECT data FROM c_{CATEGORY} WHERE part = 0")
    assert len(stored) > len(data)  # base64 of it, sealed
    encoded = base64.b64encode(data)
    for needle in (canary, encoded[:64], encoded[-64:]):
        assert needle not in stored
    dump = raw_db.dump()
    assert canary.decode() not in dump
    assert encoded[:64].decode() not in dump
    # The app reads it back as it sent it.
    assert (await get(world, device_owner))[2] == data

"""The app's contacts clients (mockphone/contacts.py) against the real routes (the whole
app in-process, tests/contacts/conftest.py's world): a SIPIS app and a PBX-proved device
of one account share a book, in one PUT or in chunks, and a 412 between them ends in a
merge that keeps both edits; the store holds exactly the envelope's bytes; another
account is refused; a rewrapped book needs the new passphrase; discovery finds the
discoverable number, never sends a number twice, and sees an opt-out as a delta."""

from __future__ import annotations

import base64

import pytest

from contacts.settings import ContactsSettings
from mockphone.book import Contact, KdfParams, WrongPassphrase
from mockphone.contacts import BookClient, ContactsRefused, DiscoveryClient, prove_device
from tests.contacts.conftest import (
    OTHER_USER,
    UNLIMITED,
    USER,
    ContactsWorld,
    OwnerToken,
    create_sipis_account,
)
from tests.sip.test_relay import SERIAL
from tests.test_dsr_api import PASSWORD

FAST = KdfParams(log_n=10)
PASSPHRASE = "our family sync passphrase"
CHUNK = 8192
BOOK = [
    Contact("Anna Beispiel", ("+49 30 901820",), "a"),
    Contact("Bernd Muster", ("0171 2345678",), "b"),
]


@pytest.fixture
def contacts_settings() -> ContactsSettings:
    """One PUT up to 8 KiB (a small book's envelope), chunks above."""
    return ContactsSettings(max_book_bytes=256 * 1024, max_chunk_bytes=CHUNK, rate=UNLIMITED)


def _client(world: ContactsWorld, owner: OwnerToken, passphrase: str = PASSPHRASE) -> BookClient:
    return BookClient(
        world.session, world.base, owner.token, passphrase, params=FAST, max_chunk_bytes=CHUNK
    )


async def test_two_devices_of_one_account_share_the_book_and_merge_after_a_412(
    contacts_world: ContactsWorld, sipis_owner: OwnerToken, device_owner: OwnerToken
) -> None:
    app, phone = _client(contacts_world, sipis_owner), _client(contacts_world, device_owner)
    assert await app.read() is None
    first = await app.save(BOOK)
    assert await phone.read() == BOOK
    assert (phone.version, app.counters.chunked) == (first, 0)
    # Both edit the version they hold; the phone writes first, the app's write gets 412.
    on_phone = Contact("Carla Neu", ("+4940123456",), "c")
    on_app = Contact("Dieter Auch", ("+4989123456",), "d")
    await phone.save([*BOOK, on_phone])
    merged = await app.save([BOOK[0], on_app])  # and the app deleted Bernd
    assert app.counters.conflicts == 1
    assert app.base == [BOOK[0], on_phone, on_app]
    assert await phone.read() == app.base
    assert phone.version == merged
    # Unchanged since: 304, the copy held.
    assert await phone.read() == app.base
    assert phone.counters.not_modified == 1


async def test_a_large_book_goes_up_in_chunks_and_the_store_holds_only_its_envelope(
    contacts_world: ContactsWorld, device_owner: OwnerToken
) -> None:
    device = _client(contacts_world, device_owner)
    large = [Contact(f"Kontakt {i}", (f"+4930{5000000 + i}",)) for i in range(800)]
    version = await device.save(large)
    assert device.counters.chunked == 1
    other = _client(contacts_world, device_owner)
    assert await other.read() == large
    assert device.key is not None
    # What softrelay stored: the chunks of exactly the bytes the device sent, whose
    # header names the book key's wrap (decrypted at rest here: the app's layer stays).
    rows = await contacts_world.store.find(
        "address_book", sip_username=USER, pbx_serial=SERIAL, version=version
    )
    chunks = sorted((int(str(r.fields["part"])), str(r.fields["data"])) for r in rows)
    stored = b"".join(base64.b64decode(data) for part, data in chunks if part >= 0)
    assert stored.startswith(b"SRB1")
    assert device.key.opens(stored)
    assert device.key.unseal(stored) == large
    for contact in large[:50]:
        assert contact.name.encode() not in stored
        assert contact.numbers[0].encode() not in stored


async def test_another_accounts_book_and_a_revoked_device_are_refused(
    contacts_world: ContactsWorld, device_owner: OwnerToken
) -> None:
    await _client(contacts_world, device_owner).save(BOOK)
    stranger_token = await prove_device(
        contacts_world.session,
        contacts_world.base,
        sip_username=OTHER_USER,
        pbx_serial=SERIAL,
        password=PASSWORD,
    )
    stranger = BookClient(contacts_world.session, contacts_world.base, stranger_token, "x")
    with pytest.raises(ContactsRefused) as refused:
        await stranger.read(owner=f"sip:{USER}@{SERIAL}")
    assert (refused.value.status, refused.value.error) == (403, "not_your_book")
    assert await stranger.read() is None  # its own: none yet
    # A token softrelay never issued.
    with pytest.raises(ContactsRefused) as refused:
        await BookClient(
            contacts_world.session, contacts_world.base, "cd.nobody.nothing", PASSPHRASE
        ).read()
    assert (refused.value.status, refused.value.error) == (401, "unauthorized")


async def test_a_rewrapped_book_opens_only_with_the_new_passphrase(
    contacts_world: ContactsWorld, sipis_owner: OwnerToken, device_owner: OwnerToken
) -> None:
    app = _client(contacts_world, sipis_owner)
    await app.save(BOOK)
    old = _client(contacts_world, device_owner)
    assert await old.read() == BOOK
    assert app.key is not None
    app.key = app.key.rewrap("the new passphrase", FAST)  # the user changed it on the app
    await app.save([*BOOK, Contact("Eva", (), "e")])
    # The device holding the old key and passphrase cannot open the new envelope.
    with pytest.raises(WrongPassphrase):
        await old.read()
    fresh = _client(contacts_world, device_owner, "the new passphrase")
    assert await fresh.read() == [*BOOK, Contact("Eva", (), "e")]


async def test_discovery_over_the_routes_is_incremental_and_follows_an_opt_out(
    contacts_world: ContactsWorld, sipis_owner: OwnerToken
) -> None:
    owner = DiscoveryClient(contacts_world.session, contacts_world.base, sipis_owner.token)
    assert await owner.opt_in() == USER
    asker_owner = await create_sipis_account(contacts_world, OTHER_USER)
    asker = DiscoveryClient(
        contacts_world.session, contacts_world.base, asker_owner.token, region="DE"
    )
    book = ["030 901820", "+49 40 5550 1234", "kein Anschluss"]
    found = await asker.discover(book)
    assert (found.matched, found.checked, found.sent, found.not_numbers) == ({USER}, 2, 2, 1)
    again = await asker.discover(book)
    assert (again.matched, again.sent) == ({USER}, 0)
    assert asker.counters.not_modified == 1
    await owner.opt_out()
    assert not await owner.discoverable()
    after = await asker.discover(book)
    assert (after.matched, after.sent) == (set(), 0)
    assert (asker.counters.full_sets, asker.counters.deltas) == (1, 1)

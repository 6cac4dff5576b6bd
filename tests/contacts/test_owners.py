"""Who may act as a book's owner (contacts/owners.py): a SIPIS account's device secret,
or a device the PBX digest proof registered; the owner's number counts as proved only
where the provider or the PBX checked the password; the device secret is stored only
as a keyed hash; a wrong proof is refused and repeated failures are limited."""

from __future__ import annotations

import pytest

from contacts.owners import DEVICES, OWNERS, Owner
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

pytestmark = pytest.mark.both_backends


async def _owner(world: ContactsWorld, token: str) -> Owner | None:
    return await world.app[OWNERS].authenticate(f"Bearer {token}")


async def test_both_proofs_name_the_same_subject_and_its_proved_number(
    contacts_world: ContactsWorld, sipis_owner: OwnerToken, device_owner: OwnerToken
) -> None:
    by_account = await _owner(contacts_world, sipis_owner.token)
    by_device = await _owner(contacts_world, device_owner.token)
    assert by_account is not None
    assert by_device is not None
    assert by_account.subject == by_device.subject == device_owner.subject
    assert (by_account.via, by_account.number, by_account.device_id) == ("sipis", USER, None)
    assert (by_device.via, by_device.number) == ("device", USER)
    assert by_device.device_id == device_owner.token.split(".")[1]


async def test_a_sipis_account_its_provider_does_not_accept_has_no_proved_number(
    contacts_world: ContactsWorld,
) -> None:
    account = await create_sipis_account(contacts_world, OTHER_USER, accepted=False)
    owner = await _owner(contacts_world, account.token)
    assert owner is not None
    assert owner.number is None
    assert account.account_id is not None
    contacts_world.registrar.accepted.add(account.account_id)
    owner = await _owner(contacts_world, account.token)
    assert owner is not None
    assert owner.number == OTHER_USER


async def test_a_user_name_that_is_no_phone_number_has_no_number(
    contacts_world: ContactsWorld,
) -> None:
    device = await prove_device(contacts_world, "alice")
    owner = await _owner(contacts_world, device.token)
    assert owner is not None
    assert owner.subject.sip_username == "alice"
    assert owner.number is None


async def test_a_wrong_password_is_refused_by_the_pbx_and_failures_are_limited(
    contacts_world: ContactsWorld,
) -> None:
    """[dsr] max_failures = 3 in the fixture: three refusals, then 429 with Retry-After,
    even for the right password; nothing is stored."""
    world = contacts_world
    for _ in range(3):
        with pytest.raises(AssertionError, match="not_proved"):
            await prove_device(world, password="wrong-password")
    subject = {"sip_username": USER, "pbx_serial": SERIAL}
    answer = await world.call(
        "POST",
        "/contacts/v1/devices",
        json=subject | {"challenge_id": "x", "authorization": "Digest x"},
    )
    assert (answer.status, answer.error) == (429, "rate_limited")
    assert int(answer.headers["Retry-After"]) >= 1
    assert await world.store.find(DEVICES) == []


async def test_a_challenge_is_used_once_and_only_for_its_subject(
    contacts_world: ContactsWorld,
) -> None:
    world = contacts_world
    subject = {"sip_username": USER, "pbx_serial": SERIAL}
    issued = (await world.call("POST", "/contacts/v1/challenge", json=subject)).json()
    other = {"sip_username": OTHER_USER, "pbx_serial": SERIAL}
    answer = await world.call(
        "POST",
        "/contacts/v1/devices",
        json=other | {"challenge_id": issued["challenge_id"], "authorization": "Digest x"},
    )
    assert (answer.status, answer.error) == (403, "not_proved")
    # Used up by that attempt.
    answer = await world.call(
        "POST",
        "/contacts/v1/devices",
        json=subject | {"challenge_id": issued["challenge_id"], "authorization": "Digest x"},
    )
    assert (answer.status, answer.error) == (403, "not_proved")
    assert await world.store.find(DEVICES) == []


async def test_the_device_secret_is_stored_only_as_a_keyed_hash(
    contacts_world: ContactsWorld, device_owner: OwnerToken, raw_db: RawDatabase
) -> None:
    _, device_id, secret = device_owner.token.split(".")
    dump = raw_db.dump()
    assert device_id in dump  # the record is there
    assert secret not in dump
    assert device_owner.token not in dump


async def test_revoking_a_device_ends_its_token_and_only_its_own(
    contacts_world: ContactsWorld, sipis_owner: OwnerToken, device_owner: OwnerToken
) -> None:
    world = contacts_world
    second = await prove_device(world)
    answer = await world.call("DELETE", "/contacts/v1/devices/self", device_owner.token)
    assert answer.status == 204
    assert await _owner(world, device_owner.token) is None
    assert await _owner(world, second.token) is not None
    # A SIPIS account's token names no contacts device.
    answer = await world.call("DELETE", "/contacts/v1/devices/self", sipis_owner.token)
    assert (answer.status, answer.error) == (400, "not_a_device")
    assert await _owner(world, sipis_owner.token) is not None

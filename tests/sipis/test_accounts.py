"""SIPIS accounts in the store: the device secret is kept only as a keyed hash and
checked the same way for every failure; HA1s, user names and the push token are
encrypted at rest; an account the app has not contacted for the profile's time is
removed by the retention sweeper (injected clock), a touched one stays, and the
registrar engine is told to forget a removed one."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection
from dataclasses import replace
from pathlib import Path

import pytest

from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.retention import Sweeper
from privacy.store import Store, Subject
from sipis.account import Account, Credential, Push, SipTransport, State, Status
from sipis.accounts import CATEGORY, MESSAGES, Accounts, forget_removed
from tests.conftest import StoreFactory
from tests.rawdb import RawDatabase

pytestmark = pytest.mark.both_backends

USER = "alice-canary-user-5e1f"
HA1_MD5 = "0123456789abcdef0123456789abcdef"
HA1_SHA256 = "ab" * 32
TOKEN = "apns-token-canary-77c2"
DAY = 86400


def draft(user: str = USER, token: str = TOKEN) -> Account:
    return Account(
        account_id="",
        registrar_host="sip.example.com",
        registrar_port=5061,
        transport=SipTransport.TLS,
        domain="example.com",
        user=user,
        credential=Credential(user, "example.com", HA1_MD5, HA1_SHA256),
        push=Push("apns", token, "com.example.phone"),
        display_name="Alice Canary",
    )


class Registered:
    """The registrar engine as the accounts side sees it (sipis.accounts.Registrar): what
    it holds and every call it was given, in order; `opened` as the app's factory."""

    def __init__(self) -> None:
        self.held: dict[str, Account] = {}
        self.paused: set[str] = set()
        self.removed: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (method, account id)
        self.open = False

    def add(self, account: Account, *, spread: bool = True) -> None:
        self.calls.append(("add" if spread else "add_now", account.account_id))
        self.held[account.account_id] = account
        if account.paused:
            self.paused.add(account.account_id)

    def update(self, account: Account) -> None:
        self.calls.append(("update", account.account_id))
        self.held[account.account_id] = account
        if account.paused:
            self.paused.add(account.account_id)
        else:
            self.paused.discard(account.account_id)

    async def remove(self, account_id: str) -> None:
        self.calls.append(("remove", account_id))
        self.removed.append(account_id)
        self.held.pop(account_id, None)

    async def pause(self, account_id: str) -> None:
        self.calls.append(("pause", account_id))
        self.paused.add(account_id)

    def resume(self, account_id: str) -> None:
        self.calls.append(("resume", account_id))
        self.paused.discard(account_id)

    def status(self, account_id: str) -> Status | None:
        if account_id not in self.held:
            return None
        return Status(State.PAUSED if account_id in self.paused else State.PENDING)

    def account_ids(self) -> Collection[str]:
        return list(self.held)

    @contextlib.asynccontextmanager
    async def opened(self, accounts: Accounts) -> AsyncIterator[Registered]:
        """The app's `sipis_registrar` factory: this double, open while the app runs."""
        self.open = True
        try:
            yield self
        finally:
            self.open = False


async def _accounts(open_store: StoreFactory, profile: str = "cloudsoftphone") -> Accounts:
    store = await open_store(profile)
    return Accounts(store, Keyring.generate())


async def test_create_then_authenticate_with_the_secret_only(open_store: StoreFactory) -> None:
    accounts = await _accounts(open_store)
    account, secret = await accounts.create(draft())
    assert len(secret) >= 43  # 256 random bits, URL-safe base64
    assert account.account_id
    assert account.user == USER
    assert await accounts.authenticate(account.account_id, secret) == account
    assert await accounts.authenticate(account.account_id, secret + "x") is None
    assert await accounts.authenticate(account.account_id, secret[:-1]) is None
    other, other_secret = await accounts.create(draft("bob"))
    # One account's secret opens no other account; an unknown id is refused alike.
    assert await accounts.authenticate(other.account_id, secret) is None
    assert await accounts.authenticate("A" * 22, secret) is None
    assert await accounts.authenticate("not an id", secret) is None
    assert await accounts.authenticate(other.account_id, other_secret) == other


async def test_stored_row_holds_no_secret_ha1_user_or_token_in_the_clear(
    open_store: StoreFactory, raw_db: RawDatabase
) -> None:
    accounts = await _accounts(open_store)
    account, secret = await accounts.create(draft())
    dump = raw_db.dump()
    for canary in (secret, HA1_MD5, HA1_SHA256, USER, TOKEN, "Alice Canary"):
        assert canary not in dump, canary
    # Only the keyed hash of the secret is kept, under the account's id.
    text = raw_db.text(f"SELECT account_id, secret_hash FROM c_{CATEGORY}")
    assert account.account_id in text
    assert accounts.secret_hash(secret) in text


async def test_a_new_secret_replaces_the_old_and_a_deleted_account_opens_for_none(
    open_store: StoreFactory,
) -> None:
    accounts = await _accounts(open_store)
    account, old = await accounts.create(draft())
    new = await accounts.new_secret(account.account_id)
    assert new is not None
    assert new != old
    assert await accounts.authenticate(account.account_id, old) is None
    assert await accounts.authenticate(account.account_id, new) == account
    assert await accounts.delete(account.account_id)
    assert await accounts.authenticate(account.account_id, new) is None
    assert await accounts.get(account.account_id) is None
    assert not await accounts.delete(account.account_id)


async def test_update_pause_and_list_active(open_store: StoreFactory) -> None:
    accounts = await _accounts(open_store)
    alice, _ = await accounts.create(draft())
    bob, _ = await accounts.create(draft("bob"))
    changed = replace(
        alice,
        registrar_host="sip2.example.com",
        credential=Credential(USER, "example.com", None, HA1_SHA256),
    )
    assert await accounts.update(changed)
    assert await accounts.get(alice.account_id) == changed
    paused = await accounts.set_paused(bob.account_id, True)
    assert paused is not None
    assert paused.paused
    assert [a.account_id for a in await accounts.list_active()] == [alice.account_id]
    assert await accounts.account_ids() == {alice.account_id, bob.account_id}
    renamed = replace(alice, user="eve")
    with pytest.raises(ValueError, match="cannot change"):
        await accounts.update(renamed)


async def test_delete_takes_the_messages_waiting_for_the_account(open_store: StoreFactory) -> None:
    accounts = await _accounts(open_store)
    account, _ = await accounts.create(draft())
    store = accounts.store
    message = {
        "account_id": account.account_id,
        "sip_username": USER,
        "pbx_serial": account.domain,
        "sender": "sip:bob@example.com",
        "content_type": "text/plain",
        "body": "hello",
    }
    await store.put(MESSAGES, message)
    assert len(await store.find(MESSAGES, account_id=account.account_id)) == 1
    await accounts.delete(account.account_id)
    assert await store.find(MESSAGES, account_id=account.account_id) == []


async def test_the_data_subject_is_the_user_at_the_domain(open_store: StoreFactory) -> None:
    """DSR's Subject(user, domain) finds the account, and an erasure removes it."""
    accounts = await _accounts(open_store)
    account, secret = await accounts.create(draft())
    subject = Subject(USER, "example.com")
    found = await accounts.store.find_subject(subject)
    assert [r.fields["account_id"] for r in found[CATEGORY]] == [account.account_id]
    await accounts.store.delete_subject(subject)
    assert await accounts.authenticate(account.account_id, secret) is None


@pytest.mark.parametrize(("profile", "days"), [("cloudsoftphone", 7), ("auerproxy", 30)])
async def test_a_silent_account_is_swept_after_its_days_and_a_touched_one_stays(
    open_store: StoreFactory, clock: ManualClock, tmp_path: Path, profile: str, days: int
) -> None:
    accounts = await _accounts(open_store, profile)
    store: Store = accounts.store
    silent, _ = await accounts.create(draft())
    used, used_secret = await accounts.create(draft("bob"))
    registrar = Registered()
    registrar.add(silent)
    registrar.add(used)
    sweeper = Sweeper(store, tmp_path)

    clock.advance(days * DAY - 60)
    assert await accounts.authenticate(used.account_id, used_secret) == used  # the contact
    await sweeper.run_once()
    assert await accounts.account_ids() == {silent.account_id, used.account_id}
    assert await forget_removed(accounts, registrar) == 0

    clock.advance(61)  # the silent one is past its limit, the used one is not
    assert await accounts.get(silent.account_id) is None  # gone from reads at once
    await sweeper.run_once()
    assert (await store.stats())[CATEGORY].rows == 1
    assert await accounts.account_ids() == {used.account_id}
    # The registrar engine un-registers what the sweeper removed, and only that.
    assert await forget_removed(accounts, registrar) == 1
    assert registrar.removed == [silent.account_id]

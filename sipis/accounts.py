"""SIPIS accounts as the store keeps them (policy category `sip_account`), and the
device secret that alone may read, change or delete one.

    accounts = Accounts(store, keyring)
    account, secret = await accounts.create(draft)     # the secret is shown once
    account = await accounts.authenticate(account_id, secret)   # None: refused

The device secret is 256 random bits, URL-safe. Only a keyed hash of it is stored
(`secret_hash`: HMAC-SHA256 under a key derived from the keyring's index key, which is
never rotated away), so a copy of the database does not let anyone act for a device,
and the secret itself is declared never stored. `authenticate` does the same work for
an unknown account as for a wrong secret and compares in constant time.

Every authenticated contact is a use (`touch`): the retention (`after_last_use`, 7 days
in the cloudsoftphone profile) runs from the app's last contact, never from what the
provider or the registrar engine does. The subject of an account is its SIP user at its
domain (`Subject(user, domain)`: the domain stands where a relay registration has its
PBX serial), so the data-subject requests and the profile's `account` rule reach it.

The HA1s, the user names, the display name and the push token are encrypted at rest
(the policy says so; the store does it).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Collection
from dataclasses import replace
from typing import Protocol

from privacy.keys import Keyring
from privacy.store import Record, Store, Subject, Value
from sipis.account import Account, Credential, Push, SipTransport, State, Status

CATEGORY = "sip_account"
MESSAGES = "pending_message"  # waiting text messages, deleted with their account
SECRET_BYTES = 32
_ID_BYTES = 16
ACCOUNT_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")  # 16 random bytes, URL-safe base64
_MAX_SECRET = 128  # chars of a presented secret worth hashing (ours are 43)
_KEY_LABEL = b"softrelay/sipis/device-secret/v1"
# Compared with when the account does not exist, so that path does the same work.
_NO_HASH = "0" * 64
log = logging.getLogger("softrelay.sipis")


def new_account_id() -> str:
    return secrets.token_urlsafe(_ID_BYTES)


class Accounts:
    """The `sip_account` records (see the module doc)."""

    def __init__(self, store: Store, keyring: Keyring) -> None:
        self.store = store
        # A key of its own, derived once: the index key keys the blind indexes, and a
        # secret hash must not be comparable with any of them.
        self._key = hmac.digest(keyring.index, _KEY_LABEL, "sha256")

    def secret_hash(self, secret: str) -> str:
        return hmac.digest(self._key, secret.encode(), hashlib.sha256).hex()

    async def create(self, draft: Account) -> tuple[Account, str]:
        """Store `draft` under a new random id (its own `account_id` is not used); the
        account and its device secret, which is not kept and cannot be shown again."""
        account = replace(draft, account_id=new_account_id())
        secret = secrets.token_urlsafe(SECRET_BYTES)
        await self.store.put(CATEGORY, _fields(account) | {"secret_hash": self.secret_hash(secret)})
        return account, secret

    async def authenticate(self, account_id: str, secret: str) -> Account | None:
        """The account if `secret` is its device secret, else None, the same way for an
        unknown id, a deleted or expired account and a wrong secret. A success is the
        app's contact: it restarts the account's retention."""
        record = await self._record(account_id) if ACCOUNT_ID.match(account_id) else None
        given = self.secret_hash(secret[:_MAX_SECRET])
        stored = record.fields.get("secret_hash") if record is not None else None
        expected = stored if isinstance(stored, str) else _NO_HASH
        matches = hmac.compare_digest(given.encode(), expected.encode())
        if record is None or not matches or len(secret) > _MAX_SECRET:
            return None
        if not await self.store.touch(CATEGORY, record.id):
            return None  # deleted between the read and now
        return _account(record)

    async def get(self, account_id: str) -> Account | None:
        """The account, if stored and live; not a use (the registrar engine reads it)."""
        record = await self._record(account_id)
        return _account(record) if record is not None else None

    async def update(self, account: Account) -> bool:
        """Store the account's changed settings (all but its user and domain, which name
        it: a new address is a new account); a use. False: it is gone."""
        record = await self._record(account.account_id)
        if record is None:
            return False
        if (record.fields["sip_username"], record.fields["pbx_serial"]) != (
            account.user,
            account.domain,
        ):
            raise ValueError("an account's user and domain cannot change")
        changes = {
            k: v for k, v in _fields(account).items() if k not in _NAMING and k != "account_id"
        }
        return await self.store.update(CATEGORY, record.id, changes)

    async def new_secret(self, account_id: str) -> str | None:
        """Replace the device secret (the old one stops working at once); the new one,
        or None when the account is gone."""
        record = await self._record(account_id)
        if record is None:
            return None
        secret = secrets.token_urlsafe(SECRET_BYTES)
        changed = await self.store.update(
            CATEGORY, record.id, {"secret_hash": self.secret_hash(secret)}
        )
        return secret if changed else None

    async def set_paused(self, account_id: str, paused: bool) -> Account | None:
        """Pause or resume registering; the account as it is now, or None when gone."""
        record = await self._record(account_id)
        if record is None:
            return None
        if not await self.store.update(CATEGORY, record.id, {"paused": int(paused)}):
            return None
        return replace(_account(record), paused=paused)

    async def forget_token(self, account_id: str, token: str) -> Account | None:
        """The push service declared `token` dead: clear it from the account, as the
        relay clears a binding's (push/service.py), whether it is the call token or the
        alert token; not a use. The account as it is now, or None when it is gone or
        no longer holds that token (the app sent a new one meanwhile)."""
        record = await self._record(account_id)
        if record is None or not token:
            return None
        names = [n for n in ("push_token", "push_alert_token") if record.fields.get(n) == token]
        if not names:
            return None
        changes: dict[str, Value] = dict.fromkeys(names)
        if not await self.store.update(CATEGORY, record.id, changes, use=False):
            return None
        return _account(replace(record, fields=record.fields | changes))

    async def touch(self, account_id: str) -> bool:
        """Record the app's contact (after an authentication elsewhere: the SIP leg)."""
        record = await self._record(account_id)
        return record is not None and await self.store.touch(CATEGORY, record.id)

    async def delete(self, account_id: str) -> bool:
        """Delete the account and the messages waiting for it; whether it existed."""
        deleted = await self.store.delete(CATEGORY, account_id=account_id)
        await self.store.delete(MESSAGES, account_id=account_id)
        return deleted > 0

    async def list_active(self) -> list[Account]:
        """Every live account that is not paused: what the registrar engine takes at
        its start. One whose subject is restricted (GDPR Art. 18) comes paused: held,
        not registered, until the mark is lifted (`hold`). Not a use."""
        found = [_account(r) for r in await self.store.find(CATEGORY, paused=0)]
        return [replace(a, paused=True) if await self.restricted(a) else a for a in found]

    async def list_all(self) -> list[Account]:
        """Every live account, paused or not. Not a use."""
        return [_account(r) for r in await self.store.find(CATEGORY)]

    async def restricted(self, account: Account) -> bool:
        """Whether the account's subject is restricted: then nothing registers it."""
        return await self.store.is_restricted(subject_of(account))

    async def hold(self, registrar: Registrar, account: Account) -> None:
        """Bring the registrar engine in line with the stored account and its subject's
        restriction mark: registered (a new account at once), or un-REGISTERed and held
        while the app paused it or its subject is restricted. Returns once a needed
        un-REGISTER was answered."""
        stop = account.paused or await self.restricted(account)
        status = registrar.status(account.account_id)
        if status is None:
            registrar.add(replace(account, paused=stop), spread=False)
            return
        if not stop:
            registrar.update(account)  # new wire settings register afresh
            registrar.resume(account.account_id)  # paused by a lifted mark: again
            return
        if status.state is not State.PAUSED:
            await registrar.pause(account.account_id)
        registrar.update(replace(account, paused=True))  # its new fields, still held

    async def account_ids(self) -> set[str]:
        """The ids of every live account, paused or not (to see which ones the
        retention sweeper or an erasure removed)."""
        return {str(r.fields["account_id"]) for r in await self.store.find(CATEGORY)}

    async def _record(self, account_id: str) -> Record | None:
        found = await self.store.find(CATEGORY, account_id=account_id)
        return found[0] if found else None


def subject_of(account: Account) -> Subject:
    """The data subject an account belongs to: its SIP user at its domain."""
    return Subject(account.user, account.domain)


# The fields that name the record and its subject: never changed by `update`.
_NAMING = frozenset({"account_id", "sip_username", "pbx_serial"})


def _fields(account: Account) -> dict[str, Value]:
    cred, push = account.credential, account.push
    return {
        "account_id": account.account_id,
        "registrar_host": account.registrar_host,
        "registrar_port": account.registrar_port,
        "transport": account.transport.value,
        "sip_username": account.user,
        "pbx_serial": account.domain,
        "auth_user": cred.auth_user,
        "realm": cred.realm,
        "display_name": account.display_name,
        "ha1_md5": cred.ha1_md5,
        "ha1_sha256": cred.ha1_sha256,
        "push_provider": push.provider,
        "push_token": push.token or None,  # "": declared dead, cleared
        "push_app_id": push.app_id,
        "push_alert_token": push.alert_token,
        "paused": int(account.paused),
    }


def _account(record: Record) -> Account:
    f = record.fields

    def text(name: str) -> str:
        value = f[name]
        assert isinstance(value, str), name
        return value

    def optional(name: str) -> str | None:
        value = f.get(name)
        return value if isinstance(value, str) else None

    port = f["registrar_port"]
    assert isinstance(port, int)
    return Account(
        account_id=text("account_id"),
        registrar_host=text("registrar_host"),
        registrar_port=port,
        transport=SipTransport(text("transport")),
        domain=text("pbx_serial"),
        user=text("sip_username"),
        credential=Credential(
            auth_user=text("auth_user"),
            realm=text("realm"),
            ha1_md5=optional("ha1_md5"),
            ha1_sha256=optional("ha1_sha256"),
        ),
        push=Push(
            text("push_provider"),
            optional("push_token") or "",
            text("push_app_id"),
            optional("push_alert_token"),
        ),
        display_name=optional("display_name"),
        paused=bool(f["paused"]),
    )


class Registrar(Protocol):
    """What the accounts side needs of the registrar engine: registrar.py's
    `Registrations` has these. Each returns once the work is scheduled (`pause` and
    `remove` once the un-REGISTER was answered or failed); the engine's own tasks do the
    SIP (REGISTER, refresh, un-REGISTER)."""

    def add(self, account: Account, *, spread: bool = True) -> None:
        """Keep the account registered: after a random delay within the start spread
        (`spread`: the accounts loaded at a start), else at once (a new account); the
        registrar's rate applies either way. A paused account is held, not registered."""

    def update(self, account: Account) -> None:
        """New settings: a new registrar or credential is registered afresh; a change
        of `paused` pauses or resumes; an account it does not hold is added at once."""

    async def remove(self, account_id: str) -> None:
        """Deleted: un-REGISTER (Expires: 0) and forget it."""

    async def pause(self, account_id: str) -> None:
        """Un-REGISTER and keep it, PAUSED, until `resume`."""

    def resume(self, account_id: str) -> None:
        """Register a paused account again."""

    def status(self, account_id: str) -> Status | None:
        """Where its registration stands now; None for an account it does not hold."""

    def account_ids(self) -> Collection[str]:
        """The accounts it holds, paused ones included."""


async def forget_removed(accounts: Accounts, registrar: Registrar) -> int:
    """Un-register the accounts the registrar holds that the store no longer has (the
    retention sweeper removed a silent one, an erasure, another process's DELETE); how
    many. Also applies restriction marks set or lifted elsewhere (the `dsr` command in
    another process): a restricted subject's account is un-REGISTERed and held, a
    lifted one registered again. Run at the sweeper's cadence."""
    live = {account.account_id: account for account in await accounts.list_all()}
    gone = [account_id for account_id in registrar.account_ids() if account_id not in live]
    for account_id in gone:
        await registrar.remove(account_id)
    for account_id in list(registrar.account_ids()):
        account = live.get(account_id)
        status = registrar.status(account_id)
        if account is None or status is None or account.paused:
            continue
        restricted = await accounts.restricted(account)
        if restricted != (status.state is State.PAUSED):
            await accounts.hold(registrar, account)
    return len(gone)


async def forget_dead_token(
    accounts: Accounts, registrar: Registrar, account: Account, token: str
) -> None:
    """A push to `account` found `token` dead (calls.py, messages.py): it is cleared in
    the store, and the registrar engine's copy of the account, which the calls and texts
    of the provider come with, takes the change, so nothing is pushed to it again."""
    changed = await accounts.forget_token(account.account_id, token)
    if changed is not None:
        await accounts.hold(registrar, changed)


async def forget_removed_forever(accounts: Accounts, registrar: Registrar, interval: float) -> None:
    """`forget_removed` every `interval` seconds until cancelled; a failed turn is
    logged and retried at the next one."""
    while True:
        await asyncio.sleep(interval)
        try:
            await forget_removed(accounts, registrar)
        except Exception:
            log.exception("sipis.forget_removed_failed")  # the class only (the log policy)

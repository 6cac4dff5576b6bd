"""Who asks for a book or for Smart Contacts: an owner, the data subject whose book it is.

Two proofs, each a Bearer token (`Authorization: Bearer <token>`):

    sipis.<account_id>.<device secret>   a SIPIS account's app (sipis/accounts.py); its
                                         subject is the account's user at its domain
    cd.<device_id>.<secret>              a device the PBX digest proof registered
                                         (POST /contacts/v1/devices, contacts/api.py);
                                         its subject is the user at the PBX serial

The owner's number (E.164, contacts/numbers.py) counts as proved only where somebody
who holds the SIP password checked it: the PBX, which accepted the digest for that user
when the device registered; or the SIPIS account's provider, while it accepts the
account's registration (the registrar engine's state is REGISTERED: the provider's
digest check with the stored HA1). A user name that is not a phone number has no number.
`proved` says the same of the owner as a whole, number or not: Smart Contacts' quota is
per proved owner, so an attacker's allowance grows only with the SIP identities it
holds the passwords of, not with the SIPIS accounts anyone can create with one POST.

A device's secret is 256 random bits; only its keyed hash is stored (`contacts_device`,
`secret_hash`), under a key of its own derived from the keyring's index key, so a copy
of the database lets nobody act for a device. `authenticate` does the same work for an
unknown device as for a wrong secret and compares in constant time; a success is a use
of the device record (its retention runs from the device's last request).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from aiohttp import web

from contacts.numbers import e164
from contacts.settings import ContactsSettings
from privacy.keys import Keyring
from privacy.store import Record, Store, Subject
from sipis.account import State
from sipis.accounts import ACCOUNT_ID, Accounts, Registrar, subject_of
from webapi.errors import Refusal
from webapi.ratelimit import Limiter

DEVICES = "contacts_device"
SECRET_BYTES = 32
_ID_BYTES = 16
DEVICE_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")  # 16 random bytes, URL-safe base64
# What a token may look like at all; anything else is refused before any look-up.
_TOKEN = re.compile(r"^(sipis|cd)\.([A-Za-z0-9_-]{1,64})\.([A-Za-z0-9_-]{1,128})$")
_KEY_LABEL = b"softrelay/contacts/device-secret/v1"
_NO_HASH = "0" * 64  # compared with for an unknown device, so that path does the same work
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="contacts"'}


@dataclass(frozen=True, slots=True)
class Owner:
    """The subject a request acts for, and its number when proved (see the module doc)."""

    subject: Subject
    number: str | None  # E.164, only when proved, else None
    via: str  # "sipis" | "device"
    device_id: str | None = None  # the device's id (via "device"): what revoking names
    proved: bool = False  # the PBX or the provider checked the SIP password's digest


class Devices:
    """The `contacts_device` records: devices registered by the PBX digest proof."""

    def __init__(self, store: Store, keyring: Keyring) -> None:
        self.store = store
        self._key = hmac.digest(keyring.index, _KEY_LABEL, "sha256")

    def secret_hash(self, secret: str) -> str:
        return hmac.digest(self._key, secret.encode(), hashlib.sha256).hex()

    async def register(self, subject: Subject) -> str:
        """A new device of `subject` (its PBX accepted the proof); its token, which is
        not kept and cannot be shown again."""
        device_id = secrets.token_urlsafe(_ID_BYTES)
        secret = secrets.token_urlsafe(SECRET_BYTES)
        await self.store.put(
            DEVICES,
            {
                "device_id": device_id,
                "secret_hash": self.secret_hash(secret),
                "sip_username": subject.sip_username,
                "pbx_serial": subject.pbx_serial,
            },
        )
        return f"cd.{device_id}.{secret}"

    async def authenticate(self, device_id: str, secret: str) -> Subject | None:
        """The device's subject if `secret` is its secret, else None, alike for an
        unknown, revoked or expired device and a wrong secret. A success is a use."""
        found = (
            await self.store.find(DEVICES, device_id=device_id)
            if DEVICE_ID.match(device_id)
            else []
        )
        record = found[0] if found else None
        stored = record.fields.get("secret_hash") if record is not None else None
        expected = stored if isinstance(stored, str) else _NO_HASH
        if not hmac.compare_digest(self.secret_hash(secret).encode(), expected.encode()):
            return None
        if record is None or not await self.store.touch(DEVICES, record.id):
            return None  # revoked between the read and now
        return _subject(record)

    async def revoke(self, device_id: str) -> bool:
        """The device's token stops working at once; whether it existed."""
        return await self.store.delete(DEVICES, device_id=device_id) > 0


def _subject(record: Record) -> Subject:
    user, serial = record.fields["sip_username"], record.fields["pbx_serial"]
    assert isinstance(user, str)
    assert isinstance(serial, str)
    return Subject(user, serial)


class Owners:
    """Both proofs behind one `authenticate`. `accounts` and `registrar`: SIPIS mode's,
    None when it is off (then a `sipis.` token is refused like any unknown one)."""

    def __init__(
        self,
        devices: Devices,
        settings: ContactsSettings,
        limiter: Limiter,
        accounts: Accounts | None = None,
        registrar: Registrar | None = None,
        *,
        keyring: Keyring,
    ) -> None:
        self.devices = devices
        # What the discovery routes share (contacts/discoveryapi.py): the store, and the
        # keyring its OPRF key is derived from.
        self.store = devices.store
        self.keyring = keyring
        self.settings = settings
        self.limiter = limiter
        self.accounts = accounts
        self.registrar = registrar

    async def authenticate(self, authorization: str) -> Owner | None:
        """The owner an `Authorization` header proves, or None."""
        scheme, _, token = authorization.partition(" ")
        match = _TOKEN.match(token.strip()) if scheme.lower() == "bearer" else None
        if match is None:
            return None
        kind, ident, secret = match.groups()
        if kind == "cd":
            subject = await self.devices.authenticate(ident, secret)
            if subject is None:
                return None
            return Owner(subject, self._number(subject), "device", ident, proved=True)
        if self.accounts is None or not ACCOUNT_ID.match(ident):
            return None
        account = await self.accounts.authenticate(ident, secret)
        if account is None:
            return None
        subject = subject_of(account)
        status = self.registrar.status(ident) if self.registrar is not None else None
        proved = status is not None and status.state is State.REGISTERED
        return Owner(subject, self._number(subject) if proved else None, "sipis", proved=proved)

    def _number(self, subject: Subject) -> str | None:
        return e164(subject.sip_username, self.settings.default_region)


OWNERS = web.AppKey("contacts_owners", Owners)


async def limited(request: web.Request) -> None:
    """The per-client rate of the contacts routes (`[contacts] rate_per_minute`), before
    any proof is looked at: 429 rate_limited with Retry-After past it."""
    wait = await request.app[OWNERS].limiter.check(request.remote)
    if wait:
        raise Refusal(429, "rate_limited", "too many requests from this address", retry_after=wait)


async def owner_of(request: web.Request) -> Owner:
    """The owner the request's Bearer token proves (after the per-client rate); else
    401 unauthorized with WWW-Authenticate: Bearer, the same for every kind of wrong."""
    await limited(request)
    owner = await request.app[OWNERS].authenticate(request.headers.get("Authorization", ""))
    if owner is None:
        raise Refusal(
            401,
            "unauthorized",
            "send Authorization: Bearer sipis.<account id>.<device secret> or"
            " cd.<device id>.<secret> (POST /contacts/v1/devices)",
            UNAUTHORIZED_HEADERS,
        )
    return owner


async def active_owner(request: web.Request) -> Owner:
    """`owner_of`, refused with 403 restricted while the subject's processing is
    restricted (GDPR Art. 18): as the relay refuses its REGISTER, nothing reads, writes
    or evaluates for it then, neither its book nor Smart Contacts. What only removes
    (DELETE of the book, opt-out, revoking a device) stays open: `owner_of`."""
    owner = await owner_of(request)
    if await request.app[OWNERS].store.is_restricted(owner.subject):
        raise Refusal(
            403, "restricted", "processing of this account's data is restricted (Art. 18)"
        )
    return owner

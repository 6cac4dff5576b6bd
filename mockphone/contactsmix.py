"""The contacts part of `softrelay simulate` (`--contacts SHARE`): users whose phones sync
an end-to-end encrypted book between two devices and find each other by Smart Contacts.

A contacts user's SIP user name is a phone number (+49 30 9xxxxxxx), so softrelay can
make it discoverable once proved. Each proves two devices with the PBX's digest proof
(their mock PBX checks the SIP password; softrelay never sees it: a SIPIS account would
need its provider, which only the embedded world starts) and opts in. At set-up each
writes a book (a few other users' numbers, in national and international forms, and
numbers nobody uses) on its first device; the second device reads it back; then both
devices edit the version they hold, so the second write gets 412 and merges. The first
device then runs discovery over the book: exactly the other users' numbers must match,
and a second run must send nothing (the points are cached). Each `contacts` event
(`--contacts-rate`) has a user add a contact on one device, read it back on the other,
and discover again, sending only the number not checked before.

The figures (`ContactsStats.summary`) count what went right and every way it did not;
`ok` says the run found no fault. Nothing here logs a number, a name or a passphrase.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from contacts.numbers import e164
from mockphone.book import BookError, Contact, KdfParams
from mockphone.contacts import (
    BookClient,
    ContactsRefused,
    DamagedSet,
    DiscoveryClient,
    prove_device,
)

REGION = "DE"  # how the books' national numbers read
# A simulated device's scrypt cost: cheaper than an app's (N = 2^17), the envelope
# carries it, so the other device opens the book at whatever cost was chosen.
SIM_KDF = KdfParams(log_n=14)
BOOK_PEERS = 4  # other users in each book
BOOK_STRANGERS = 3  # numbers no user has
MAX_CONCURRENT = 20  # users setting up at once


def user_number(i: int) -> str:
    """The SIP user name, a Berlin number, of the simulation's phone `i`."""
    return f"+4930{90000000 + i:08d}"


def _national(number: str) -> str:
    """+4930 9xxxxxxx as an address book often has it: 030 9xxx xxxx."""
    rest = number.removeprefix("+4930")
    return f"030 {rest[:4]} {rest[4:]}"


@dataclass
class ContactsStats:
    users: int = 0
    devices: int = 0  # proved with the PBX's digest proof
    discoverable: int = 0
    books_written: int = 0
    conflicts_merged: int = 0  # 412s answered with a merge and a new write
    books_read_back: int = 0  # read on the other device exactly as written
    book_mismatches: int = 0
    discoveries: int = 0
    numbers_checked: int = 0
    numbers_sent: int = 0  # blinded to softrelay; a number checked before is not
    matched: int = 0
    wrong_matches: int = 0  # runs that found other than exactly the discoverable ones
    unexpected_sends: int = 0  # runs that sent other than exactly the unchecked numbers
    deferred: int = 0  # numbers the quota left for later
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        faults = self.book_mismatches + self.wrong_matches + self.unexpected_sends
        return (
            self.users > 0
            and self.devices == 2 * self.users
            and self.discoverable == self.users
            and faults == 0
            and not self.errors
        )

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "users": self.users,
            "devices": self.devices,
            "discoverable": self.discoverable,
            "books": {
                "written": self.books_written,
                "conflicts_merged": self.conflicts_merged,
                "read_back": self.books_read_back,
                "mismatches": self.book_mismatches,
            },
            "discovery": {
                "runs": self.discoveries,
                "checked": self.numbers_checked,
                "sent": self.numbers_sent,
                "matched": self.matched,
                "wrong_matches": self.wrong_matches,
                "unexpected_sends": self.unexpected_sends,
                "deferred": self.deferred,
            },
            "errors": dict(sorted(self.errors.items())),
        }


@dataclass
class ContactsUser:
    number: str  # the SIP user name
    password: str = field(repr=False)
    serial: str
    http_url: str  # the node its phone is on
    passphrase: str = field(default_factory=lambda: secrets.token_urlsafe(16), repr=False)
    devices: list[BookClient] = field(default_factory=list)
    discovery: DiscoveryClient | None = None
    checked: set[str] = field(default_factory=set)  # numbers sent for evaluation


class ContactsMix:
    def __init__(
        self, session: aiohttp.ClientSession, rng: random.Random, stats: ContactsStats
    ) -> None:
        self.session = session
        self.rng = rng
        self.users: list[ContactsUser] = []
        self.stats = stats
        self._discoverable: set[str] = set()
        self._strangers = 0
        self._busy: set[str] = set()

    def add(self, number: str, password: str, serial: str, http_url: str) -> None:
        self.users.append(ContactsUser(number, password, serial, http_url))

    def _stranger(self) -> str:
        """A number no user of the run has (Hamburg)."""
        self._strangers += 1
        return f"+4940{70000000 + self._strangers:08d}"

    async def set_up(self, registered: Callable[[str], bool]) -> None:
        """Devices, opt-in, books and a first discovery for every user whose phone
        registered (`registered(number)`)."""
        self.users = [u for u in self.users if registered(u.number)]
        self.stats.users = len(self.users)
        gate = asyncio.Semaphore(MAX_CONCURRENT)

        async def each(step: Callable[[ContactsUser], Coroutine[Any, Any, None]]) -> None:
            async def one(user: ContactsUser) -> None:
                async with gate:
                    await self._guarded(step(user))

            await asyncio.gather(*(one(u) for u in self.users))

        await each(self._enrol)
        await each(self._first_book)  # after all opted in: the books' peers are known

    async def event(self) -> None:
        """One user adds a contact on one device, the other reads it, discovery runs."""
        ready = [u for u in self.users if u.discovery is not None and u.number not in self._busy]
        if not ready:
            return
        user = self.rng.choice(ready)
        self._busy.add(user.number)
        try:
            await self._guarded(self._edit(user))
        finally:
            self._busy.discard(user.number)

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        """Run one user's step; a refusal or a failure is counted, the run goes on."""
        try:
            await work
        except ContactsRefused as exc:
            self.stats.errors[f"{exc.status} {exc.error}"] += 1
        except (BookError, DamagedSet, aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.stats.errors[type(exc).__name__] += 1

    async def _enrol(self, user: ContactsUser) -> None:
        for _ in range(2):  # the phone and a second device of the same user
            token = await prove_device(
                self.session,
                user.http_url,
                sip_username=user.number,
                pbx_serial=user.serial,
                password=user.password,
            )
            self.stats.devices += 1
            user.devices.append(
                BookClient(self.session, user.http_url, token, user.passphrase, params=SIM_KDF)
            )
        discovery = DiscoveryClient(self.session, user.http_url, token, region=REGION)
        if await discovery.opt_in() != user.number:
            self.stats.errors["opted in under another number"] += 1
            return
        user.discovery = discovery
        self._discoverable.add(user.number)
        self.stats.discoverable += 1

    async def _first_book(self, user: ContactsUser) -> None:
        if len(user.devices) < 2 or user.discovery is None:
            return
        first, second = user.devices
        peers = [u.number for u in self.users if u is not user][:BOOK_PEERS]
        if len(self.users) > BOOK_PEERS + 1:
            peers = self.rng.sample([u.number for u in self.users if u is not user], BOOK_PEERS)
        book = [Contact(f"Peer {i}", (_national(n) if i % 2 else n,)) for i, n in enumerate(peers)]
        book += [Contact(f"Stranger {i}", (self._stranger(),)) for i in range(BOOK_STRANGERS)]
        await self._write(first, book)
        await self._read_back(second, first.base)
        # Both devices edit the version they hold: the later write gets 412 and merges.
        await self._write(second, [*second.base, Contact("Added there", (self._stranger(),))])
        conflicts = first.counters.conflicts
        await self._write(first, [*first.base, Contact("Added here", (self._stranger(),))])
        self.stats.conflicts_merged += first.counters.conflicts - conflicts
        await self._read_back(second, first.base)
        await self._discover(user, first.base)
        await self._discover(user, first.base)  # again: nothing new to send

    async def _edit(self, user: ContactsUser) -> None:
        device, other = self.rng.sample(user.devices, 2)
        held = await device.read() or []
        if self.rng.random() < 0.5 and len(self.users) > 1:
            number = self.rng.choice([u.number for u in self.users if u is not user])
        else:
            number = self._stranger()
        await self._write(device, [*held, Contact("New contact", (number,))])
        await self._read_back(other, device.base)
        await self._discover(user, device.base)

    async def _write(self, device: BookClient, book: list[Contact]) -> None:
        await device.save(book)
        self.stats.books_written += 1

    async def _read_back(self, device: BookClient, written: list[Contact]) -> None:
        if await device.read() == written:
            self.stats.books_read_back += 1
        else:
            self.stats.book_mismatches += 1

    async def _discover(self, user: ContactsUser, book: list[Contact]) -> None:
        assert user.discovery is not None
        numbers = [n for contact in book for n in contact.numbers]
        normalised = {e for n in numbers if (e := e164(n, REGION)) is not None}
        unchecked = normalised - user.checked
        found = await user.discovery.discover(numbers)
        stats = self.stats
        stats.discoveries += 1
        stats.numbers_checked += found.checked
        stats.numbers_sent += found.sent
        stats.matched += len(found.matched)
        stats.deferred += len(found.deferred)
        if found.deferred:
            return  # the quota: this run cannot be judged whole
        if found.sent != len(unchecked):
            stats.unexpected_sends += 1
        user.checked |= unchecked
        if found.matched != normalised & self._discoverable:
            stats.wrong_matches += 1

"""Smart Contacts on the server: the discoverable set, its key epochs, and the quota.

    directory = Directory(store, oprf_secret(keyring), settings, clock, global_limit)
    await directory.load()                                # on start: the set from the store
    await directory.opt_in(subject, "+4930123456")        # a proved number, never stored
    answer = await directory.evaluate(subject, epoch, blinded)   # or a DiscoveryError
    version, body = await directory.set_body(since)

What is stored (config/policy, `discoverable`): per opted-in owner the point
N = k_epoch * HashToGroup(number) (contacts/oprf.py) and its epoch, never the number.
What is published (`set_body`): tag(N) of every stored point, 8 bytes each, so an app
that evaluated its contacts' numbers through `evaluate` finds which are discoverable on
its own device: the server sees only blinded elements, never which tags matched.

The key of an epoch is derived from the keyring's index key (`oprf_secret`), so every
node has it and nothing new is stored; at an epoch change every stored point is moved
to the new key with `oprf.rekey` (no number needed; idempotent, any node may do it) and
an app's evaluation for the old epoch is refused (`StaleEpoch`): it fetches the set again.

The set in memory is rebuilt from the store at the start, at an epoch change, and when
the periodic check (`refresh`, every CHECK_INTERVAL) sees the table changed (another
node's opt-in, an erasure, the sweeper), at least every FULL_RELOAD; this node's own
opt-ins and opt-outs change it at once. Rows whose subject is restricted (GDPR Art. 18)
are left out: nothing processes them. Each version of the set is named by a digest of
its epoch and tags (the same on every node holding the same set), and a bounded journal
of the changes between versions gives an app that names the version it holds a delta
(contacts/tagset.py).

The quota (`discovery_quota`, durable: a restart does not reset it) bounds the elements
one owner has evaluated per UTC day; a request that would pass it is refused whole,
nothing evaluated. The global bucket bounds the evaluation requests of all owners.

Errors say what the caller must do next (contacts/discoveryapi.py maps them to HTTP):

    DiscoveryError
    ├── StaleEpoch(epoch)                    the key changed: fetch the set, blind again
    ├── BadElement(index)                    fix the request; nothing was charged
    ├── QuotaExhausted(retry_after, remaining)   wait until the next UTC day
    └── Busy(retry_after)                    the global bucket is empty: retry after
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from contacts import oprf
from contacts.settings import ContactsSettings
from contacts.tagset import SetBody, TagSet
from privacy.backend import Row, StorageUnavailable
from privacy.clock import Clock
from privacy.keys import Keyring
from privacy.store import Record, Store, Subject, Value, table_spec
from webapi.ratelimit import Limiter

CATEGORY = "discoverable"
QUOTA = "discovery_quota"
DAY = 86400
CHECK_INTERVAL = 60.0  # seconds between checks of the table for other nodes' changes
# The check compares the table's row count and highest id; a full rebuild at least this
# often catches what those cannot show (SQLite may reuse the id of a deleted last row).
FULL_RELOAD = 600.0
_PAGE = 500  # rows per read while the set is rebuilt
_GLOBAL_KEY = "evaluate"
# Lost compare-and-sets of one owner's count (other nodes charging it at that moment)
# before the request is answered 429 rate_limited: each loss is another's progress.
_CHARGE_ATTEMPTS = 8
log = logging.getLogger("softrelay.contacts")
Sleep = Callable[[float], Awaitable[None]]


def oprf_secret(keyring: Keyring) -> bytes:
    """The secret the epoch keys derive from: the same on every node with the keyring."""
    return hmac.new(keyring.index, b"softrelay/contacts/oprf", hashlib.sha256).digest()


def utc_day(now: float) -> int:
    """Days since 1970-01-01 UTC."""
    return int(now // DAY)


# --- errors ---------------------------------------------------------------------------


class DiscoveryError(Exception):
    """What `Directory.evaluate` refuses; see the module doc for the tree."""


class StaleEpoch(DiscoveryError):
    def __init__(self, epoch: int) -> None:
        super().__init__(f"the key changed: the current epoch is {epoch}; fetch the set again")
        self.epoch = epoch


class BadElement(DiscoveryError):
    def __init__(self, index: int) -> None:
        super().__init__(f"blinded[{index}] is not a valid ristretto255 element")
        self.index = index


class QuotaExhausted(DiscoveryError):
    def __init__(self, retry_after: float, remaining: int) -> None:
        super().__init__(
            f"daily quota of evaluated elements reached; {remaining} remain today (UTC)"
        )
        self.retry_after = retry_after
        self.remaining = remaining


class Busy(DiscoveryError):
    def __init__(self, retry_after: float) -> None:
        super().__init__("too many discovery requests on this service; retry later")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Evaluated:
    epoch: int
    elements: list[bytes]
    remaining: int  # elements this owner may still have evaluated today


# --- the directory --------------------------------------------------------------------


class Directory:
    """The discoverable set and the evaluations: see the module doc."""

    def __init__(
        self,
        store: Store,
        secret: bytes,
        settings: ContactsSettings,
        clock: Clock,
        global_limit: Limiter,
    ) -> None:
        self._store = store
        self._secret = secret
        self._settings = settings
        self._clock = clock
        self._global = global_limit
        self._category = store.policy.category(CATEGORY)
        self._table = table_spec(self._category)
        self._keys: dict[int, bytes] = {}
        self._set = TagSet(self.epoch())
        # Rebuilds and this node's changes to the set, one at a time: a change made
        # while a rebuild reads the table would otherwise be lost with its result.
        self._lock = asyncio.Lock()
        self._owner_locks: dict[Subject, tuple[asyncio.Lock, int]] = {}
        self._seen: tuple[int, int, int] | None = None  # rows, highest id, restrictions
        self._built_at = float("-inf")

    # --- keys and epochs ---

    def epoch(self) -> int:
        return int(self._clock.now() // self._settings.key_epoch)

    def key(self, epoch: int) -> bytes:
        key = self._keys.get(epoch)
        if key is None:
            if len(self._keys) >= 4:
                self._keys.clear()
            key = self._keys[epoch] = oprf.epoch_key(self._secret, epoch)
        return key

    # --- the owner's choice ---

    async def opt_in(self, subject: Subject, number: str) -> None:
        """Make `number` (E.164, proved to be the subject's) discoverable; again: a use."""
        async with self._lock:
            await self._current()
            epoch = self._set.epoch
            point = oprf.element(self.key(epoch), number.encode())
            old = await self._record(subject)
            await self._store.put(
                CATEGORY,
                {
                    "sip_username": subject.sip_username,
                    "pbx_serial": subject.pbx_serial,
                    "element": _b64(point),
                    "epoch": epoch,
                },
            )
            if old is not None and (old_tag := self._tag_of(old)) is not None:
                self._set.remove(old_tag)
            if not await self._store.is_restricted(subject):
                self._set.add(oprf.tag(point))

    async def opt_out(self, subject: Subject) -> bool:
        """The subject's point goes at once, out of the live files too; whether there was one."""
        async with self._lock:
            await self._current()
            old = await self._record(subject)
            if old is None:
                return False
            await self._store.delete(
                CATEGORY, sip_username=subject.sip_username, pbx_serial=subject.pbx_serial
            )
            await self._store.purge_deleted(CATEGORY)
            if (old_tag := self._tag_of(old)) is not None:
                self._set.remove(old_tag)
            return True

    async def discoverable(self, subject: Subject) -> bool:
        """Whether the subject opted in; asking is a use of the record."""
        record = await self._record(subject)
        if record is None:
            return False
        await self._store.touch(CATEGORY, record.id)
        return True

    # --- discovery ---

    async def set_body(self, since: str | None = None) -> SetBody:
        """The current set: the delta from `since` when the journal knows it, else whole."""
        async with self._lock:
            await self._current()
        version = self._set.version
        if since is not None:
            delta = self._set.delta(since)
            if delta is not None:
                return SetBody(version, delta, True)
        return SetBody(version, self._set.full(), False)

    async def evaluate(self, subject: Subject, epoch: int, blinded: Sequence[bytes]) -> Evaluated:
        """k_epoch * each blinded element, in order, charged to the subject's quota of
        the day; refused whole (nothing evaluated, nothing charged) by a DiscoveryError."""
        current = self.epoch()
        if epoch != current:
            raise StaleEpoch(current)
        # Every element checked before anything is charged: a bad one at the end of a
        # batch must not take the batch's count from the global bucket for free.
        bad = await asyncio.to_thread(oprf.first_invalid, blinded)
        if bad is not None:
            raise BadElement(bad)
        if not blinded:
            return Evaluated(epoch, [], self._settings.quota_per_day)  # nothing to charge
        async with self._owner(subject):
            now = self._clock.now()
            day = utc_day(now)
            used = await self._count(subject, day)
            self._check_quota(used, len(blinded), day, now)
            wait = await self._global.take(_GLOBAL_KEY, cost=len(blinded))
            if wait:
                raise Busy(wait)
            # Charged to the day it was checked against, even if midnight passed meanwhile.
            used = await self._charge(subject, day, used, len(blinded), now)
            try:
                # Off the loop (libsodium releases the GIL): 1,000 elements take ~60 ms.
                out = await asyncio.to_thread(oprf.blind_evaluate_many, self.key(epoch), blinded)
            except oprf.InvalidElement as exc:  # checked above: never, but never a 500
                raise BadElement(exc.index or 0) from None
        await self.discoverable(subject)  # a use of the owner's own record, if any
        return Evaluated(epoch, out, self._settings.quota_per_day - used)

    def _check_quota(self, used: int, count: int, day: int, now: float) -> None:
        quota = self._settings.quota_per_day
        if used + count > quota:
            raise QuotaExhausted((day + 1) * DAY - now, max(0, quota - used))

    async def _count(self, subject: Subject, day: int) -> int:
        found = await self._store.find(QUOTA, **_owned(subject), day=day)
        return _used(found[0]) if found else 0

    async def _charge(self, subject: Subject, day: int, used: int, count: int, now: float) -> int:
        """Add `count` to the day's count, a compare-and-set on the count read (the owner
        lock holds on this node only: another node may charge the same owner at once),
        checked again against the quota after each lost race; the new count."""
        where = _owned(subject) | {"day": day}
        for _ in range(_CHARGE_ATTEMPTS):
            fields: dict[str, Value] = {**where, "used": used + count}
            # No record and a count of 0 are one (a count is written only when it grows).
            expect: dict[str, Value] | None = {"used": used} if used else None
            if await self._store.replace(QUOTA, fields, where=where, expect=expect):
                return used + count
            used = await self._count(subject, day)
            self._check_quota(used, count, day, now)
        raise Busy(1.0)

    @asynccontextmanager
    async def _owner(self, subject: Subject) -> AsyncIterator[None]:
        """One evaluation per owner at a time on this node, so two requests cannot both
        pass the quota check on the same count."""
        lock, users = self._owner_locks.get(subject, (asyncio.Lock(), 0))
        self._owner_locks[subject] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._owner_locks[subject]
            if users == 1:
                del self._owner_locks[subject]
            else:
                self._owner_locks[subject] = (lock, users - 1)

    # --- the set from the store ---

    async def load(self) -> None:
        """Build the set from the store (at the start)."""
        async with self._lock:
            await self._rebuild()

    async def refresh(self) -> bool:
        """The periodic check: rebuild when the epoch moved or the table changed (another
        node, an erasure, the sweeper), and at least every FULL_RELOAD; whether it did."""
        async with self._lock:
            due = self._clock.now() - self._built_at >= FULL_RELOAD
            if due or self._set.epoch != self.epoch() or await self._fingerprint() != self._seen:
                await self._rebuild()
                return True
            return False

    async def run_forever(self, sleep: Sleep = asyncio.sleep) -> None:
        """`refresh` every CHECK_INTERVAL (the app's task; a test gives its own sleep)."""
        while True:
            await sleep(CHECK_INTERVAL)
            try:
                await self.refresh()
            except StorageUnavailable:
                log.warning("contacts.discovery_refresh_deferred")

    async def _current(self) -> None:
        if self._set.epoch != self.epoch():
            await self._rebuild()

    async def _fingerprint(self) -> tuple[int, int, int]:
        backend = self._store.backend
        stats = await backend.stats(self._table)
        highest = self._seen[1] if self._seen is not None else 0
        while newer := await backend.scan(self._table, after=highest, limit=_PAGE):
            highest = _row_id(newer[-1])
        return stats.rows, highest, hash(await backend.restricted_subjects())

    async def _rebuild(self) -> None:
        """The set from the table: live rows of subjects not restricted; rows of another
        epoch moved to the current key (and stored so, when theirs is older)."""
        backend = self._store.backend
        seen = await self._fingerprint()
        epoch = self.epoch()
        cutoff = self._store.cutoff(self._category)
        restricted = await backend.restricted_subjects()
        counts: dict[bytes, int] = {}
        other: list[tuple[int, bytes, int]] = []  # id, point, its epoch
        after = 0
        while rows := await backend.scan(self._table, after=after, limit=_PAGE):
            after = _row_id(rows[-1])
            for row in rows:
                last_used = row["last_used_at"]
                assert isinstance(last_used, float)
                if last_used <= cutoff or row.get("subject") in restricted:
                    continue
                point = _point(row.get("element"))
                row_epoch = row.get("epoch")
                if point is None or not isinstance(row_epoch, int):
                    log.warning(
                        "contacts.discoverable_unreadable", extra={"fields": {"id": row["id"]}}
                    )
                    continue
                if row_epoch == epoch:
                    tag = oprf.tag(point)
                    counts[tag] = counts.get(tag, 0) + 1
                else:
                    other.append((_row_id(row), point, row_epoch))
        moved = await asyncio.to_thread(self._rekey, other, epoch)
        rewritten = 0
        for (record_id, _, row_epoch), point in zip(other, moved, strict=True):
            if point is None:
                log.warning("contacts.discoverable_unreadable", extra={"fields": {"id": record_id}})
                continue
            tag = oprf.tag(point)
            counts[tag] = counts.get(tag, 0) + 1
            if row_epoch < epoch:
                # Not a use; the same value whichever node writes it first.
                fields: dict[str, Value] = {"element": _b64(point), "epoch": epoch}
                rewritten += await self._store.update(CATEGORY, record_id, fields, use=False)
        if self._set.epoch == epoch:
            self._set.replace(counts)
        else:
            self._set = TagSet(epoch, counts)
        self._seen = seen
        self._built_at = self._clock.now()
        log.info(
            "contacts.discovery_set_built",
            extra={"fields": {"epoch": epoch, "tags": len(self._set), "rekeyed": rewritten}},
        )

    def _rekey(self, points: Sequence[tuple[int, bytes, int]], epoch: int) -> list[bytes | None]:
        """The points moved to `epoch`'s key, in order (one factor per old epoch); None
        for a stored value that is no valid point (left out of the set, and logged)."""
        moved: list[bytes | None] = [None] * len(points)
        by_epoch: dict[int, list[int]] = {}
        for index, (_, _, old) in enumerate(points):
            by_epoch.setdefault(old, []).append(index)
        new = self.key(epoch)
        for old, indexes in by_epoch.items():
            try:
                rekeyed: list[bytes | None] = list(
                    oprf.rekey_many([points[i][1] for i in indexes], self.key(old), new)
                )
            except oprf.InvalidElement:
                rekeyed = [_rekeyed(points[i][1], self.key(old), new) for i in indexes]
            for index, point in zip(indexes, rekeyed, strict=True):
                moved[index] = point
        return moved

    async def _record(self, subject: Subject) -> Record | None:
        found = await self._store.find(
            CATEGORY, sip_username=subject.sip_username, pbx_serial=subject.pbx_serial
        )
        return found[0] if found else None

    def _tag_of(self, record: Record) -> bytes | None:
        """The tag a stored record has in the current set (its point moved to the
        current epoch's key if it is of another)."""
        point = _point(record.fields.get("element"))
        epoch = record.fields.get("epoch")
        if point is None or not isinstance(epoch, int):
            return None
        if epoch != self._set.epoch:
            moved = _rekeyed(point, self.key(epoch), self.key(self._set.epoch))
            if moved is None:
                return None
            point = moved
        return oprf.tag(point)


def _rekeyed(point: bytes, old: bytes, new: bytes) -> bytes | None:
    try:
        return oprf.rekey(point, old, new)
    except oprf.InvalidElement:
        return None


def _b64(point: bytes) -> str:
    return base64.b64encode(point).decode()


def _point(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        point = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return point if len(point) == oprf.ELEMENT_BYTES else None


def _row_id(row: Row) -> int:
    record_id = row["id"]
    assert isinstance(record_id, int)
    return record_id


def _owned(subject: Subject) -> dict[str, Value]:
    return {"sip_username": subject.sip_username, "pbx_serial": subject.pbx_serial}


def _used(record: Record) -> int:
    used = record.fields.get("used")
    return used if isinstance(used, int) else 0

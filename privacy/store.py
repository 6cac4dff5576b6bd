"""The policy-enforcing store: the only way any package keeps data.

Every write is checked against the policy before a byte moves: a field that the
category does not declare, or that it must never store, raises `PolicyViolation` and
nothing is written. Declared fields are then protected as the policy says: encrypted
with AES-GCM (with a blind index where look-ups need one), anonymised at write, or kept
plain. Reads apply the retention themselves, so an expired record is never returned,
even before the sweeper has removed it.

Each ciphertext is bound to its record as well as to its field (privacy/crypto.py): to
the record key as stored (plain values, blind indexes), or, in a category without a
key, to a random row id drawn at insert (`rid`) and the record's subject. A value moved
into another row does not open there; a read skips such a record and says so in the
service log (category and field, never a value) rather than failing, and
`opened_values` (the audit) counts it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import struct
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from privacy.anonymise import anonymise_ip
from privacy.backend import (
    ROW_ID,
    Backend,
    ChangeFeed,
    Column,
    JobHeld,
    Row,
    SqlValue,
    StorageUnavailable,
    TableSpec,
    TableStats,
)
from privacy.backends import migrate, open_backend, schema_status
from privacy.clock import Clock
from privacy.crypto import DecryptionError, FieldCipher
from privacy.database import DATABASE_FILE, StoreSettings
from privacy.keys import Keyring
from privacy.policy import (
    Category,
    FieldSpec,
    FieldType,
    Policy,
    PolicyViolation,
    Protection,
    Rule,
    Storage,
)

Value = str | int | float | list[Any] | dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class JsonText:
    """A value for a field declared `json`, already serialised by its writer (with
    `orjson.dumps`, from a value such a field holds): kept as these bytes, without a
    decode and re-encode on the loop (a crash report of 8-16 KiB comes from its scrubbing
    worker as JSON). Its category and field are checked as for any value; any other
    type of field refuses it. It reads back as the decoded value."""

    data: bytes


# What a write takes: a value, or JSON text for a `json` field.
Writable = Value | JsonText
RESTRICTIONS_FRESH = 2.0  # seconds a read of the restriction marks is trusted
ACCOUNT = "account"  # the policy category whose retention applies to a whole subject
RESEAL_JOB = "reseal"  # the lock of `reseal` (privacy.backend.JOBS)
_SQLTYPE = {
    FieldType.TEXT: "TEXT",
    FieldType.INT: "INTEGER",
    FieldType.REAL: "REAL",
    FieldType.JSON: "TEXT",
}
_BIDX = "__bidx"
_ROW_ID_BYTES = 16
_SCAN_PAGE = 500  # rows per read when the audit or a reseal walks a whole table
log = logging.getLogger("softrelay.privacy")


@dataclass(frozen=True, slots=True)
class Record:
    id: int
    category: str
    fields: dict[str, Value]
    created_at: float
    last_used_at: float


@dataclass(frozen=True, slots=True)
class Opened:
    """One encrypted value of the store, as the audit sees it."""

    category: str
    field: str
    record_id: int
    plaintext: bytes | None  # None: it does not open (tampered, moved, or its key is gone)


@dataclass(frozen=True, slots=True)
class Subject:
    """A data subject: a SIP username at a PBX serial."""

    sip_username: str
    pbx_serial: str


def table_name(category: str) -> str:
    return f"c_{category}"


def table_spec(category: Category) -> TableSpec:
    unique = tuple(_lookup_column(category.fields[name]) for name in category.key)
    # A lookup on the record key's first column is served by the key's unique index (its
    # leading column): an index of that column alone would only cost every write.
    served = unique[:1]
    columns: list[Column] = []
    for spec in category.fields.values():
        column = _lookup_column(spec)
        indexed = spec.lookup and column not in served
        if spec.protection is Protection.ENCRYPTED:
            columns.append(Column(spec.name, "BLOB"))
            if spec.lookup:
                columns.append(Column(column, "BLOB", indexed=indexed))
        else:
            columns.append(Column(spec.name, _SQLTYPE[spec.type], indexed=indexed))
    basis = "last_used_at" if category.retention.rule is Rule.AFTER_LAST_USE else "created_at"
    return TableSpec(table_name(category.name), tuple(columns), unique, basis)


def _lookup_column(spec: FieldSpec) -> str:
    return spec.name + _BIDX if spec.protection is Protection.ENCRYPTED else spec.name


class _RowBinding:
    """What names a record for its ciphertexts, read from the row as stored.

    A category with a record key: the key's columns (a plain value, or the blind index of
    an encrypted one), stable across every put of the same key, as the upsert keeps the
    row. Without a key: the random row id drawn at the insert, and the subject."""

    __slots__ = ("_columns", "random")

    def __init__(self, cat: Category) -> None:
        self.random = not cat.key
        if self.random:
            self._columns: tuple[tuple[str, FieldType | None], ...] = (
                (ROW_ID, None),
                ("subject", None),
            )
        else:
            self._columns = tuple(
                (
                    _lookup_column(spec),
                    None if spec.protection is Protection.ENCRYPTED else spec.type,
                )
                for spec in (cat.fields[name] for name in cat.key)
            )

    def of(self, row: Mapping[str, SqlValue]) -> bytes:
        return b"".join(_binding_part(row.get(column), kind) for column, kind in self._columns)


def _binding_part(value: SqlValue, kind: FieldType | None) -> bytes:
    """One value, length-prefixed, in a form that survives the database's round trip
    (a REAL column gives back 5.0 for 5)."""
    if value is None:
        raw = b"n"
    elif isinstance(value, bytes):
        raw = b"b" + value
    elif kind is FieldType.REAL or isinstance(value, float):
        raw = b"f" + repr(float(value)).encode()
    elif isinstance(value, int):
        raw = b"i" + str(value).encode()
    else:
        raw = b"s" + value.encode()
    return struct.pack(">I", len(raw)) + raw


class Store:
    def __init__(self, policy: Policy, keyring: Keyring, backend: Backend, clock: Clock) -> None:
        self.policy = policy
        self.backend = backend
        self.clock = clock
        self._cipher = FieldCipher(keyring)
        self._tables = {c.name: table_spec(c) for c in stored_categories(policy)}
        self._bindings = {c.name: _RowBinding(c) for c in stored_categories(policy)}
        # Tables whose rows name a subject: the ones an erasure or the account rule reaches.
        self._subject_tables = [
            self._tables[c.name] for c in stored_categories(policy) if c.subject
        ]
        # The restriction marks, asked for on every phone REGISTER and wake: read as a
        # whole, again at once after a change made here, and after one made by another
        # process (serve, the `dsr` CLI): as its notification arrives where the backend
        # has a feed of changes (PostgreSQL), else at most every RESTRICTIONS_FRESH
        # seconds (SQLite, or PostgreSQL while the feed is down).
        self._restricted: frozenset[bytes] | None = None
        self._restricted_read = 0.0
        self._restricted_generation = 0  # of the feed, when the marks were read

    @classmethod
    async def create(
        cls,
        policy: Policy,
        keyring: Keyring,
        data_dir: Path,
        clock: Clock,
        settings: StoreSettings | None = None,
    ) -> Store:
        """The store on the backend `settings` names (default: SQLite under data_dir)."""
        tables = [table_spec(c) for c in stored_categories(policy)]
        backend = await open_backend(settings or StoreSettings(), data_dir, tables)
        return cls(policy, keyring, backend, clock)

    @staticmethod
    async def migrate(
        policy: Policy, data_dir: Path, settings: StoreSettings | None = None
    ) -> list[str]:
        """Bring the database to this softrelay's schema and the policy's tables (`softrelay
        db migrate`): what was done, in order; nothing when it was up to date."""
        tables = [table_spec(c) for c in stored_categories(policy)]
        return await migrate(settings or StoreSettings(), data_dir, tables)

    @staticmethod
    async def schema_status(
        policy: Policy, data_dir: Path, settings: StoreSettings | None = None
    ) -> tuple[int, list[str]]:
        """The database's schema version and what the policy's tables lack there, read
        without changing anything (`softrelay db status`)."""
        tables = [table_spec(c) for c in stored_categories(policy)]
        return await schema_status(settings or StoreSettings(), data_dir, tables)

    async def close(self) -> None:
        await self.backend.close()

    @property
    def outage(self) -> StorageUnavailable | None:
        """Why the database cannot be reached, while that is so (None: it answers)."""
        return self.backend.outage

    async def ping(self) -> None:
        """Return once the database answers, or raise StorageUnavailable (`/healthz`)."""
        await self.backend.ping()

    # --- writes ---------------------------------------------------------------------

    async def put(self, category: str, fields: Mapping[str, Writable]) -> int:
        """Store a record (or replace the one with the same key); its id."""
        cat = self._stored(category)
        self._check_fields(cat, fields)
        missing = [name for name in (*cat.key, *cat.subject) if fields.get(name) is None]
        if missing:
            raise PolicyViolation(
                f"{category}: field {missing[0]!r} is required (record key or subject)"
            )
        subject = self._subject_of(cat, fields)
        row = self._encode(cat, fields, subject)
        return await self.backend.put(
            self._tables[category], row, subject=subject, now=self.clock.now()
        )

    async def put_new(self, category: str, fields: Mapping[str, Writable]) -> bool:
        """Store a record of a category without subjects unless one with its key is
        stored already (that one is kept, unchanged); whether it was stored. Of several
        processes putting the same key at once exactly one stores it."""
        cat = self._stored(category)
        if cat.subject or not cat.key:
            raise PolicyViolation(f"{category}: put_new is for keyed categories without subjects")
        self._check_fields(cat, fields)
        missing = [name for name in cat.key if fields.get(name) is None]
        if missing:
            raise PolicyViolation(f"{category}: field {missing[0]!r} is required (record key)")
        row = self._encode(cat, fields, None)
        return await self.backend.put_new(self._tables[category], row, now=self.clock.now())

    async def replace(
        self,
        category: str,
        fields: Mapping[str, Writable],
        *,
        where: Mapping[str, Value],
        expect: Mapping[str, Value] | None,
    ) -> bool:
        """Compare-and-set on a subject's records: store `fields` (as `put`) only if the
        live records matching `where` are none (`expect` None) or exactly one whose
        fields hold `expect`'s values, and delete those records with it (but the one
        `fields` rewrites, of the same key); whether it stored. `where` names the
        subject of `fields`. Of several processes replacing at once exactly one whose
        condition held succeeds (Backend.replace), so a version can replace another
        without a lost update, and a crash leaves the one or the other."""
        cat = self._stored(category)
        self._check_fields(cat, fields)
        missing = [name for name in (*cat.key, *cat.subject) if fields.get(name) is None]
        if not cat.subject or missing:
            raise PolicyViolation(
                f"{category}: replace needs a category with subjects and the record's key"
            )
        if any(where.get(name) != fields[name] for name in cat.subject):
            raise PolicyViolation(f"{category}: replace's `where` must name the record's subject")
        subject = self._subject_of(cat, fields)
        assert subject is not None
        return await self.backend.replace(
            self._tables[category],
            self._encode(cat, fields, subject),
            subject=subject,
            where=self._match(cat, where),
            expect=None if expect is None else self._match(cat, expect),
            cutoff=self.cutoff(cat),
            subject_cutoff=self._account_cutoff(),
            now=self.clock.now(),
        )

    async def put_many(self, category: str, records: Sequence[Mapping[str, Writable]]) -> None:
        """`put` of many records of a category without subjects, committed together.
        Each is checked first; one refused record refuses them all, nothing written."""
        cat = self._stored(category)
        if cat.subject:
            raise PolicyViolation(f"{category}: put_many is for categories without subjects")
        rows = []
        checked: set[frozenset[str]] = set()  # the check depends on the names alone
        for fields in records:
            names = frozenset(fields)
            if names not in checked:
                self._check_fields(cat, fields)
                checked.add(names)
            missing = [name for name in cat.key if fields.get(name) is None]
            if missing:
                raise PolicyViolation(f"{category}: field {missing[0]!r} is required (record key)")
            rows.append(self._encode(cat, fields, None))
        await self.backend.put_many(self._tables[category], rows, now=self.clock.now())

    async def update(
        self, category: str, record_id: int, fields: Mapping[str, Writable], *, use: bool = True
    ) -> bool:
        """Change fields of a record (rectification). Counts as a use unless `use` is
        false: forgetting a dead push token must not extend the record's life."""
        cat = self._stored(category)
        self._check_fields(cat, fields)
        frozen = sorted(set(fields) & {*cat.key, *cat.subject})
        if frozen:
            raise PolicyViolation(
                f"{category}: field {frozen[0]!r} identifies the record; store anew"
            )
        # Sealed on the writer against the row as it is stored, which names the record.
        return await self.backend.update(
            self._tables[category],
            record_id,
            self._encode(cat, fields, None).against,
            now=self.clock.now() if use else None,
        )

    async def touch(self, category: str, record_id: int) -> bool:
        """Record a use: restarts an after-last-use retention and the subject's activity."""
        return await self.backend.touch(self._table(category), record_id, now=self.clock.now())

    async def delete(self, category: str, **where: Value) -> int:
        cat = self._stored(category)
        return await self.backend.delete(self._tables[category], self._match(cat, where))

    async def delete_subject(
        self, subject: Subject, *, keep: Collection[str] = ()
    ) -> dict[str, int]:
        """Erase everything stored about a subject, but for the categories in `keep`
        (exceptions of GDPR Art. 17(3)); rows deleted per category."""
        tables = [t for t in self._subject_tables if t.name.removeprefix("c_") not in keep]
        counts = await self.backend.delete_subject(tables, self.subject_index(subject))
        self._restricted = None  # an erasure lifts the mark too
        await self._purge(tables)  # only what the erasure marked is rewritten
        return {name.removeprefix("c_"): count for name, count in counts.items()}

    async def subject_last_used(self, subject: Subject) -> float | None:
        """When the subject was last active (the account rule's basis), if known."""
        return await self.backend.subject_last_used(self.subject_index(subject))

    # --- restriction (GDPR Art. 18) -------------------------------------------------

    async def restrict(self, subject: Subject, on: bool) -> bool:
        """Mark the subject restricted (`on`) or lift the mark; whether it changed.

        A restricted subject's data stays stored, but nothing processes it: no wake
        push, no REGISTER accepted, until the mark is lifted. The mark is not a use."""
        self._restricted = None
        return await self.backend.restrict(self.subject_index(subject), on, now=self.clock.now())

    async def is_restricted(self, subject: Subject) -> bool:
        marks = self._restricted
        # Not trusted while the database is unreachable (fail closed): another process may have
        # set a mark we cannot see, so the read is tried and StorageUnavailable raised.
        now = self.clock.now()
        feed = self.backend.restriction_changes()
        if marks is None or self.backend.outage is not None or not self._marks_hold(feed, now):
            # The generation before the read: a change notified during it makes the
            # next call read again.
            generation = feed.generation if feed is not None else 0
            self._restricted_read = now
            marks = self._restricted = await self.backend.restricted_subjects()
            self._restricted_generation = generation
        return self.subject_index(subject) in marks

    def _marks_hold(self, feed: ChangeFeed | None, now: float) -> bool:
        """Whether the marks read last are still the database's."""
        if feed is not None:
            if feed.generation != self._restricted_generation:
                return False  # a change notified since, or the feed lost or regained
            if feed.live:
                return True  # any change since would have moved the generation
        # No feed, or it is down: trusted for RESTRICTIONS_FRESH seconds of the injected
        # clock (a test moves it); a clock set back makes the read count as stale.
        return 0 <= now - self._restricted_read < RESTRICTIONS_FRESH

    # --- reads ----------------------------------------------------------------------

    async def find(self, category: str, **where: Value) -> list[Record]:
        """Records matching every given field; expired records are never returned."""
        cat = self._stored(category)
        rows = await self.backend.select(
            self._tables[category],
            self._match(cat, where),
            cutoff=self.cutoff(cat),
            subject_cutoff=self._account_cutoff(),
        )
        records: list[Record] = []
        for row in rows:
            try:
                records.append(self._decode(cat, row))
            except _Unreadable as exc:
                # Tampered or moved between rows: not this record's data, so not returned.
                fields = {"category": cat.name, "error": f"field {exc.field} does not open"}
                log.warning("store.record_unreadable", extra={"fields": fields})
        return records

    async def find_subject(self, subject: Subject) -> dict[str, list[Record]]:
        """Every live record naming the subject, per category (for access requests)."""
        found: dict[str, list[Record]] = {}
        for cat in stored_categories(self.policy):
            if cat.subject:
                where = {"sip_username": subject.sip_username, "pbx_serial": subject.pbx_serial}
                found[cat.name] = await self.find(cat.name, **{k: where[k] for k in cat.subject})
        return found

    # --- retention ------------------------------------------------------------------

    def cutoff(self, category: Category) -> float:
        """Records whose basis time is at or before this are expired."""
        return self.clock.now() - category.retention.seconds

    def _account_cutoff(self) -> float:
        account = self.policy.categories.get(ACCOUNT)
        return self.cutoff(account) if account is not None else float("-inf")

    async def delete_expired(self) -> dict[str, tuple[float, int]]:
        """Delete what every database category's retention has ended: (cutoff, rows)."""
        result: dict[str, tuple[float, int]] = {}
        for cat in stored_categories(self.policy):
            cutoff = self.cutoff(cat)
            result[cat.name] = (
                cutoff,
                await self.backend.delete_before(self._tables[cat.name], cutoff),
            )
        account = self.policy.categories.get(ACCOUNT)
        if account is not None:
            cutoff = self.cutoff(account)
            removed = await self.backend.delete_inactive_subjects(self._subject_tables, cutoff)
            self._restricted = None  # their marks went with them
            result[ACCOUNT] = (cutoff, removed)
        # Every table a deletion marked, this sweep's and any since the last purge.
        await self._purge(None)
        return result

    async def purge_deleted(self, *categories: str) -> None:
        """Rows deleted from these categories out of the live files now, rather than at
        the next sweep: for a deletion that must not wait (a destroyed month secret)."""
        await self._purge([self._table(name) for name in categories])

    async def _purge(self, tables: Sequence[TableSpec] | None) -> None:
        """Deleted rows out of the live files now (Backend.purge_deleted). The deletion
        stands when the database goes away before this: the tables stay marked, the
        next sweep purges them, and the audit shows the wait."""
        try:
            await self.backend.purge_deleted(tables)
        except StorageUnavailable as exc:
            log.warning("store.purge_deferred", extra={"fields": {"error": str(exc)}})

    async def stats(self) -> dict[str, TableStats]:
        """Rows and oldest basis time per category, expired rows included (for the audit)."""
        result = {name: await self.backend.stats(spec) for name, spec in self._tables.items()}
        if ACCOUNT in self.policy.categories:
            result[ACCOUNT] = await self.backend.subject_stats()
        return result

    async def opened_values(self) -> AsyncIterator[Opened]:
        """Every encrypted value in the store, decrypted, expired records included: what
        the audit searches for canaries, since no file shows it in the clear."""
        for cat in stored_categories(self.policy):
            sealed = _encrypted(cat)
            if not sealed:
                continue
            async for rows in self._pages(cat.name):
                for opened in await asyncio.to_thread(self._open_rows, cat, sealed, rows):
                    yield opened

    def _open_rows(
        self, cat: Category, sealed: Sequence[FieldSpec], rows: Sequence[Row]
    ) -> list[Opened]:
        found: list[Opened] = []
        binding = self._bindings[cat.name]
        for row in rows:
            record_id = row["id"]
            assert isinstance(record_id, int)
            bound = binding.of(row)
            for spec in sealed:
                blob = row.get(spec.name)
                if blob is None:
                    continue
                assert isinstance(blob, bytes)
                try:
                    plain: bytes | None = self._cipher.decrypt(blob, _context(cat, spec), row=bound)
                except DecryptionError:
                    plain = None
                found.append(Opened(cat.name, spec.name, record_id, plain))
        return found

    async def reseal(self) -> int:
        """Rewrite every ciphertext that is not row-bound or not under the active key
        (after a key rotation, or once for a database written before the row binding);
        the number of records rewritten. Not a use. A value that does not open is left
        as it is (the audit reports it). On one process at a time: JobHeld while
        another reseals."""
        async with self.backend.exclusive(RESEAL_JOB) as got:
            if not got:
                raise JobHeld("another process is resealing now; run it again once it ends")
            return await self._reseal()

    async def _reseal(self) -> int:
        rewritten = 0
        for cat in stored_categories(self.policy):
            sealed = _encrypted(cat)
            if not sealed:
                continue
            table = self._tables[cat.name]
            async for rows in self._pages(cat.name):
                for row in rows:
                    if not self._stale(cat, sealed, row):
                        continue
                    record_id = row["id"]
                    assert isinstance(record_id, int)
                    resealing = functools.partial(self._resealed, cat, sealed)
                    rewritten += await self.backend.update(table, record_id, resealing, now=None)
        return rewritten

    def _stale(self, cat: Category, sealed: Sequence[FieldSpec], row: Row) -> bool:
        if self._bindings[cat.name].random and row.get(ROW_ID) is None:
            return True
        blobs = [b for b in (row.get(s.name) for s in sealed) if isinstance(b, bytes)]
        active = self._cipher.active_key
        return any(FieldCipher.version(b) < 2 or FieldCipher.key_id(b) != active for b in blobs)

    def _resealed(self, cat: Category, sealed: Sequence[FieldSpec], current: Row) -> Row:
        """New ciphertexts for a row as it is stored now (run on the writer); nothing
        for a row with a value that does not open, as a new row id would orphan it."""
        binding = self._bindings[cat.name]
        old = binding.of(current)
        values: Row = {}
        if binding.random and current.get(ROW_ID) is None:
            values[ROW_ID] = os.urandom(_ROW_ID_BYTES)
        new = binding.of({**current, **values})
        for spec in sealed:
            blob = current.get(spec.name)
            if not isinstance(blob, bytes):
                continue
            context = _context(cat, spec)
            try:
                plain = self._cipher.decrypt(blob, context, row=old)
            except DecryptionError:
                return {}
            values[spec.name] = self._cipher.encrypt(plain, context, row=new)
        return values

    async def _pages(self, category: str) -> AsyncIterator[list[Row]]:
        table = self._tables[category]
        after = 0
        while rows := await self.backend.scan(table, after=after, limit=_SCAN_PAGE):
            yield rows
            last = rows[-1]["id"]
            assert isinstance(last, int)
            after = last

    async def undeclared_columns(self) -> dict[str, dict[str, int]]:
        return {
            name: await self.backend.undeclared_columns(spec) for name, spec in self._tables.items()
        }

    # --- policy checks and field protection -----------------------------------------

    def _stored(self, category: str) -> Category:
        cat = self.policy.category(category)
        if cat.storage is not Storage.DATABASE or category == ACCOUNT:
            raise PolicyViolation(
                f"category {category!r} is kept in {cat.storage.value}, not in the store"
            )
        return cat

    def _table(self, category: str) -> TableSpec:
        self._stored(category)
        return self._tables[category]

    @staticmethod
    def _check_fields(cat: Category, fields: Mapping[str, Writable]) -> None:
        # Sorted so the error names the same field every time; never the value.
        for name in sorted(fields):
            if name in cat.never_stored:
                raise PolicyViolation(f"{cat.name}: field {name!r} must never be stored")
            if name not in cat.fields:
                raise PolicyViolation(f"{cat.name}: field {name!r} is not declared by the policy")

    def subject_index(self, subject: Subject) -> bytes:
        value = f"{subject.sip_username}\x1f{subject.pbx_serial}".encode()
        return self._cipher.blind_index(b"subject", value)

    def _subject_of(self, cat: Category, fields: Mapping[str, Writable]) -> bytes | None:
        if not cat.subject:
            return None
        return self.subject_index(Subject(str(fields["sip_username"]), str(fields["pbx_serial"])))

    def _encode(
        self, cat: Category, fields: Mapping[str, Writable], subject: bytes | None
    ) -> _Sealing:
        """Check and convert every value now; the returned sealing encrypts when called.

        Everything that can refuse a value happens here, on the caller's side, so the
        sealing that runs later on the database writer cannot fail."""
        plain: Row = {}
        to_seal: list[tuple[str, bytes, bytes, bool]] = []
        for name, value in fields.items():
            spec = cat.fields[name]
            if value is None:
                plain[name] = None
                if spec.protection is Protection.ENCRYPTED and spec.lookup:
                    plain[name + _BIDX] = None
            elif spec.protection is Protection.ENCRYPTED:
                to_seal.append(
                    (name, _to_bytes(cat, spec, value), _context(cat, spec), spec.lookup)
                )
            elif spec.protection is Protection.ANONYMISED:
                plain[name] = _anonymised(cat, spec, value)
            elif spec.type is FieldType.TEXT and type(value) is str:
                plain[name] = value  # what the two calls below make of it, without them
            else:
                _check_type(cat, spec, value)
                plain[name] = _plain(spec, value)
        return _Sealing(self._cipher, plain, to_seal, self._bindings[cat.name], subject)

    def _match(self, cat: Category, where: Mapping[str, Value]) -> dict[str, SqlValue]:
        self._check_fields(cat, where)
        match: dict[str, SqlValue] = {}
        for name, value in where.items():
            spec = cat.fields[name]
            if spec.protection is Protection.ENCRYPTED:
                if not spec.lookup:
                    raise PolicyViolation(f"{cat.name}: field {name!r} is encrypted without lookup")
                match[name + _BIDX] = (
                    None
                    if value is None
                    else self._cipher.blind_index(_context(cat, spec), _to_bytes(cat, spec, value))
                )
            elif spec.protection is Protection.ANONYMISED:
                match[name] = None if value is None else _anonymised(cat, spec, value)
            elif value is None:
                match[name] = None
            else:
                _check_type(cat, spec, value)
                match[name] = _plain(spec, value)
        return match

    def _decode(self, cat: Category, row: Row) -> Record:
        fields: dict[str, Value] = {}
        bound = self._bindings[cat.name].of(row)
        for name, spec in cat.fields.items():
            stored = row.get(name)
            if stored is None:
                fields[name] = None
            elif spec.protection is Protection.ENCRYPTED:
                assert isinstance(stored, bytes)
                try:
                    raw = self._cipher.decrypt(stored, _context(cat, spec), row=bound)
                except DecryptionError:
                    raise _Unreadable(name) from None
                fields[name] = _from_bytes(spec, raw)
            elif spec.type is FieldType.JSON:
                assert isinstance(stored, str)
                fields[name] = orjson.loads(stored)
            else:
                assert not isinstance(stored, bytes)
                fields[name] = stored
        record_id, created, used = row["id"], row["created_at"], row["last_used_at"]
        assert isinstance(record_id, int)
        assert isinstance(created, float)
        assert isinstance(used, float)
        return Record(record_id, cat.name, fields, created, used)


class _Unreadable(Exception):
    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


class _Sealing:
    """A row whose encrypted fields are sealed when it is called: a new row (a put) when
    called bare, a change to a stored row (an update) through `against`."""

    __slots__ = ("_binding", "_cipher", "_plain", "_subject", "_to_seal")

    def __init__(
        self,
        cipher: FieldCipher,
        plain: Row,
        to_seal: list[tuple[str, bytes, bytes, bool]],
        binding: _RowBinding,
        subject: bytes | None,
    ) -> None:
        self._cipher = cipher
        self._plain = plain
        self._to_seal = to_seal
        self._binding = binding
        self._subject = subject

    def __call__(self) -> Row:
        row = self._indexed()
        if self._binding.random:
            row[ROW_ID] = os.urandom(_ROW_ID_BYTES)
        if not self._to_seal:
            return row  # nothing to bind (a usage id: ~3 us saved per row on the writer)
        # The blind indexes are in `row` already: a record key may be made of them.
        return self._sealed(row, self._binding.of({**row, "subject": self._subject}))

    def against(self, current: Row) -> Row:
        # An update changes no field of the record key, so the stored row names it.
        return self._sealed(self._indexed(), self._binding.of(current))

    def _indexed(self) -> Row:
        row = dict(self._plain)
        for name, raw, context, lookup in self._to_seal:
            if lookup:
                row[name + _BIDX] = self._cipher.blind_index(context, raw)
        return row

    def _sealed(self, row: Row, bound: bytes) -> Row:
        for name, raw, context, _ in self._to_seal:
            row[name] = self._cipher.encrypt(raw, context, row=bound)
        return row


def stored_categories(policy: Policy) -> list[Category]:
    """Categories with a table of their own (the account rule works on subjects instead)."""
    return [c for c in policy.stored(Storage.DATABASE) if c.name != ACCOUNT]


def _encrypted(cat: Category) -> list[FieldSpec]:
    return [spec for spec in cat.fields.values() if spec.protection is Protection.ENCRYPTED]


@functools.cache
def _context_of(category: str, field: str) -> bytes:
    return f"{category}.{field}".encode()


def _context(cat: Category, spec: FieldSpec) -> bytes:
    """The associated data and blind-index scope of a field: its place in the policy."""
    return _context_of(cat.name, spec.name)


def _check_type(cat: Category, spec: FieldSpec, value: Writable) -> None:
    kind = spec.type
    if kind is FieldType.TEXT:
        ok = isinstance(value, str)
    elif kind is FieldType.INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is FieldType.REAL:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = True
    if not ok:
        raise PolicyViolation(f"{cat.name}: field {spec.name!r} is declared {spec.type.value}")


def _to_bytes(cat: Category, spec: FieldSpec, value: Writable) -> bytes:
    _check_type(cat, spec, value)
    if spec.type is FieldType.JSON:
        return value.data if isinstance(value, JsonText) else orjson.dumps(value)
    return str(value).encode()


def _from_bytes(spec: FieldSpec, raw: bytes) -> Value:
    if spec.type is FieldType.JSON:
        decoded: Value = orjson.loads(raw)
        return decoded
    text = raw.decode()
    if spec.type is FieldType.INT:
        return int(text)
    if spec.type is FieldType.REAL:
        return float(text)
    return text


def _plain(spec: FieldSpec, value: Writable) -> SqlValue:
    if spec.type is FieldType.JSON:
        return (value.data if isinstance(value, JsonText) else orjson.dumps(value)).decode()
    assert isinstance(value, str | int | float)
    return value


def _anonymised(cat: Category, spec: FieldSpec, value: Writable) -> str:
    _check_type(cat, spec, value)
    assert isinstance(value, str)
    try:
        return anonymise_ip(value)
    except ValueError:
        raise PolicyViolation(f"{cat.name}: field {spec.name!r} must be an IP address") from None


__all__ = [
    "DATABASE_FILE",
    "JsonText",
    "Opened",
    "Record",
    "Store",
    "StoreSettings",
    "Subject",
    "Value",
    "Writable",
    "stored_categories",
    "table_spec",
]

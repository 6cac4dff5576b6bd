"""The policy-enforcing store: the only way any package keeps data.

Every write is checked against the policy before a byte moves: a field that the
category does not declare, or that it must never store, raises `PolicyViolation` and
nothing is written. Declared fields are then protected as the policy says: encrypted
with AES-GCM (with a blind index where look-ups need one), anonymised at write, or kept
plain. Reads apply the retention themselves, so an expired record is never returned,
even before the sweeper has removed it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from privacy.anonymise import anonymise_ip
from privacy.backend import Backend, Column, Row, SqlValue, TableSpec, TableStats
from privacy.clock import Clock
from privacy.crypto import FieldCipher
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
from privacy.sqlite import SQLiteBackend

Value = str | int | float | list[Any] | dict[str, Any] | None
DATABASE_FILE = "softrelay.db"
RESTRICTIONS_FRESH = 2.0  # seconds a read of the restriction marks is trusted
ACCOUNT = "account"  # the policy category whose retention applies to a whole subject
_SQLTYPE = {
    FieldType.TEXT: "TEXT",
    FieldType.INT: "INTEGER",
    FieldType.REAL: "REAL",
    FieldType.JSON: "TEXT",
}
_BIDX = "__bidx"


@dataclass(frozen=True, slots=True)
class Record:
    id: int
    category: str
    fields: dict[str, Value]
    created_at: float
    last_used_at: float


@dataclass(frozen=True, slots=True)
class Subject:
    """A data subject: a SIP username at a PBX serial."""

    sip_username: str
    pbx_serial: str


def table_name(category: str) -> str:
    return f"c_{category}"


def table_spec(category: Category) -> TableSpec:
    columns: list[Column] = []
    for spec in category.fields.values():
        if spec.protection is Protection.ENCRYPTED:
            columns.append(Column(spec.name, "BLOB"))
            if spec.lookup:
                columns.append(Column(spec.name + _BIDX, "BLOB", indexed=True))
        else:
            columns.append(Column(spec.name, _SQLTYPE[spec.type], indexed=spec.lookup))
    unique = tuple(_lookup_column(category.fields[name]) for name in category.key)
    basis = "last_used_at" if category.retention.rule is Rule.AFTER_LAST_USE else "created_at"
    return TableSpec(table_name(category.name), tuple(columns), unique, basis)


def _lookup_column(spec: FieldSpec) -> str:
    return spec.name + _BIDX if spec.protection is Protection.ENCRYPTED else spec.name


class Store:
    def __init__(self, policy: Policy, keyring: Keyring, backend: Backend, clock: Clock) -> None:
        self.policy = policy
        self.backend = backend
        self.clock = clock
        self._cipher = FieldCipher(keyring)
        self._tables = {c.name: table_spec(c) for c in stored_categories(policy)}
        # Tables whose rows name a subject: the ones an erasure or the account rule reaches.
        self._subject_tables = [
            self._tables[c.name] for c in stored_categories(policy) if c.subject
        ]
        # The restriction marks, asked for on every phone REGISTER and wake: read as a
        # whole, at most every RESTRICTIONS_FRESH seconds (another process, the `dsr`
        # CLI, may change them) and at once after a change made here.
        self._restricted: frozenset[bytes] | None = None
        self._restricted_read = 0.0

    @classmethod
    async def create(cls, policy: Policy, keyring: Keyring, data_dir: Path, clock: Clock) -> Store:
        tables = [table_spec(c) for c in stored_categories(policy)]
        backend = await SQLiteBackend.create(data_dir / DATABASE_FILE, tables)
        return cls(policy, keyring, backend, clock)

    async def close(self) -> None:
        await self.backend.close()

    # --- writes ---------------------------------------------------------------------

    async def put(self, category: str, fields: Mapping[str, Value]) -> int:
        """Store a record (or replace the one with the same key); its id."""
        cat = self._stored(category)
        self._check_fields(cat, fields)
        missing = [name for name in (*cat.key, *cat.subject) if fields.get(name) is None]
        if missing:
            raise PolicyViolation(
                f"{category}: field {missing[0]!r} is required (record key or subject)"
            )
        row = self._encode(cat, fields)
        subject = self._subject_of(cat, fields)
        return await self.backend.put(
            self._tables[category], row, subject=subject, now=self.clock.now()
        )

    async def put_many(self, category: str, records: Sequence[Mapping[str, Value]]) -> None:
        """`put` of many records of a category without subjects, committed together.
        Each is checked first; one refused record refuses them all, nothing written."""
        cat = self._stored(category)
        if cat.subject:
            raise PolicyViolation(f"{category}: put_many is for categories without subjects")
        rows = []
        for fields in records:
            self._check_fields(cat, fields)
            missing = [name for name in cat.key if fields.get(name) is None]
            if missing:
                raise PolicyViolation(f"{category}: field {missing[0]!r} is required (record key)")
            rows.append(self._encode(cat, fields))
        await self.backend.put_many(self._tables[category], rows, now=self.clock.now())

    async def update(
        self, category: str, record_id: int, fields: Mapping[str, Value], *, use: bool = True
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
        row = self._encode(cat, fields)()  # rare (rectification): sealed right here
        return await self.backend.update(
            self._tables[category], record_id, row, now=self.clock.now() if use else None
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
        # Monotonic, not the policy clock: this is how fresh a cache is, not a retention.
        if marks is None or time.monotonic() - self._restricted_read >= RESTRICTIONS_FRESH:
            self._restricted_read = time.monotonic()
            marks = self._restricted = await self.backend.restricted_subjects()
        return self.subject_index(subject) in marks

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
        return [self._decode(cat, row) for row in rows]

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
        await self.backend.checkpoint()
        return result

    async def stats(self) -> dict[str, TableStats]:
        """Rows and oldest basis time per category, expired rows included (for the audit)."""
        result = {name: await self.backend.stats(spec) for name, spec in self._tables.items()}
        if ACCOUNT in self.policy.categories:
            result[ACCOUNT] = await self.backend.subject_stats()
        return result

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
    def _check_fields(cat: Category, fields: Mapping[str, Value]) -> None:
        # Sorted so the error names the same field every time; never the value.
        for name in sorted(fields):
            if name in cat.never_stored:
                raise PolicyViolation(f"{cat.name}: field {name!r} must never be stored")
            if name not in cat.fields:
                raise PolicyViolation(f"{cat.name}: field {name!r} is not declared by the policy")

    def subject_index(self, subject: Subject) -> bytes:
        value = f"{subject.sip_username}\x1f{subject.pbx_serial}".encode()
        return self._cipher.blind_index(b"subject", value)

    def _subject_of(self, cat: Category, fields: Mapping[str, Value]) -> bytes | None:
        if not cat.subject:
            return None
        return self.subject_index(Subject(str(fields["sip_username"]), str(fields["pbx_serial"])))

    def _encode(self, cat: Category, fields: Mapping[str, Value]) -> _Sealing:
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
            else:
                _check_type(cat, spec, value)
                plain[name] = _plain(spec, value)
        return _Sealing(self._cipher, plain, to_seal)

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
        for name, spec in cat.fields.items():
            stored = row.get(name)
            if stored is None:
                fields[name] = None
            elif spec.protection is Protection.ENCRYPTED:
                assert isinstance(stored, bytes)
                fields[name] = _from_bytes(spec, self._cipher.decrypt(stored, _context(cat, spec)))
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


class _Sealing:
    """A row whose encrypted fields are sealed when it is called."""

    __slots__ = ("_cipher", "_plain", "_to_seal")

    def __init__(
        self, cipher: FieldCipher, plain: Row, to_seal: list[tuple[str, bytes, bytes, bool]]
    ) -> None:
        self._cipher = cipher
        self._plain = plain
        self._to_seal = to_seal

    def __call__(self) -> Row:
        row = dict(self._plain)
        for name, raw, context, lookup in self._to_seal:
            row[name] = self._cipher.encrypt(raw, context)
            if lookup:
                row[name + _BIDX] = self._cipher.blind_index(context, raw)
        return row


def stored_categories(policy: Policy) -> list[Category]:
    """Categories with a table of their own (the account rule works on subjects instead)."""
    return [c for c in policy.stored(Storage.DATABASE) if c.name != ACCOUNT]


@functools.cache
def _context_of(category: str, field: str) -> bytes:
    return f"{category}.{field}".encode()


def _context(cat: Category, spec: FieldSpec) -> bytes:
    """The associated data and blind-index scope of a field: its place in the policy."""
    return _context_of(cat.name, spec.name)


def _check_type(cat: Category, spec: FieldSpec, value: Value) -> None:
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


def _to_bytes(cat: Category, spec: FieldSpec, value: Value) -> bytes:
    _check_type(cat, spec, value)
    if spec.type is FieldType.JSON:
        return orjson.dumps(value)
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


def _plain(spec: FieldSpec, value: Value) -> SqlValue:
    if spec.type is FieldType.JSON:
        return orjson.dumps(value).decode()
    assert isinstance(value, str | int | float)
    return value


def _anonymised(cat: Category, spec: FieldSpec, value: Value) -> str:
    _check_type(cat, spec, value)
    assert isinstance(value, str)
    try:
        return anonymise_ip(value)
    except ValueError:
        raise PolicyViolation(f"{cat.name}: field {spec.name!r} must be an IP address") from None


__all__ = ["Record", "Store", "Subject", "Value", "stored_categories", "table_spec"]

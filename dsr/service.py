"""Data-subject requests (GDPR Art. 15-18, 20, 21) across every category of the policy.

`DataSubjectRights` answers one request at a time for a subject (a SIP user name at a
PBX serial) that the caller has already authenticated (dsr/api.py, softrelay/cli.py):

- `export` (Art. 15, 20): every category of the policy, in the policy's order, with its
  purpose, legal basis, recipients, retention and source; the subject's records where
  the category names a subject, otherwise the reason none can be included (memory only,
  or the policy's `unlinkable_reason`). Format `softrelay-dsr-export/1`, see README.
- `rectify` (Art. 16): the mutable fields of the subject's registrations.
- `erase` (Art. 17): every subject-bearing category at once, idempotent, with a receipt
  of rows per category; categories the configuration keeps under Art. 17(3) are named
  in the receipt with their ground.
- `restrict` / `unrestrict` (Art. 18): the store's restriction mark.
- `object` (Art. 21): per category, whether objection applies at all.

Each request appends one row to the trail (`dsr_requests`): id, type, time, actor,
outcome and counts per category. The trail holds no personal data, so it lives beside
the policy's categories rather than in one.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from privacy.backend import RequestEntry
from privacy.clock import iso
from privacy.policy import Category, Policy, PolicyViolation, Storage
from privacy.store import ACCOUNT, Record, Store, Subject, Value
from tomlsections.reader import ConfigError, Section

EXPORT_FORMAT = "softrelay-dsr-export/1"
# What a subject may correct (Art. 16), per category: the rest identifies the record or
# is written by the relay from what the network shows (addresses, expiry).
MUTABLE_FIELDS: Mapping[str, frozenset[str]] = {
    "registration": frozenset({"push_token", "push_app_id"}),
}
# The requests a subject may make, in the order the CLI and the API list them.
ACTIONS = ("export", "rectify", "erase", "restrict", "unrestrict", "object")
SOURCES = {
    Storage.DATABASE: "Recorded by the service while your device or PBX used it",
    Storage.LOG: "Written by the service while it handled your device's requests",
    Storage.MEMORY: "Passed through the service in transit",
}
WITHHELD = (
    "Kept to act for you but not shown in an export: a secret or a password equivalent "
    "(such as the hash of your SIP credential), which a copy of the export must not carry."
)
# A SIP user (RFC 3261 `user`, without escapes that could hide a header) and a serial,
# or (SIPIS mode, whose subject is a SIP address) the domain of the address.
_USERNAME = re.compile(r"[A-Za-z0-9._~!$&'()*+,=-]{1,64}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SERIAL = re.compile(rf"[a-z0-9-]{{1,32}}|(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+")


class Processing(Protocol):
    """What processes a subject's data outside the store, which a request must reach
    at once and an export reports on (SIPIS mode's registrations at the provider:
    dsr/sipis.py). Given the subject's records as they were found."""

    def describe(self, category: str, record: Record) -> dict[str, Value]:
        """What the export adds to the record (e.g. the registration's state now)."""

    async def erased(self, found: Mapping[str, list[Record]]) -> None:
        """The records were deleted: stop what they were processed for (un-REGISTER)."""

    async def restricted(self, found: Mapping[str, list[Record]], on: bool) -> None:
        """Art. 18: stop processing while restricted (`on`), resume when lifted."""


class InvalidRequest(ValueError):
    """A request the caller must correct (HTTP 400, CLI exit 2); the message says how."""


@dataclass(frozen=True, slots=True)
class DsrSettings:
    """`[dsr]` of softrelay.toml."""

    # env:NAME or file:PATH of the operator's admin token; empty: no operator access.
    admin_token: str = ""
    # Failed identity proofs per subject and per client before 429; the bucket refills
    # at `max_failures` per `failure_window` (webapi.ratelimit).
    max_failures: int = 5
    failure_window: int = 900
    # Seconds the PBX has to answer softrelay's challenge request.
    pbx_timeout: int = 5
    # Art. 17(3): category -> the ground on which erasure keeps it.
    erasure_exceptions: Mapping[str, str] = field(default_factory=dict)


def parse_dsr(sec: Section) -> DsrSettings:
    token = sec.text("admin_token", "")
    if token and not token.startswith(("env:", "file:")):
        raise sec.error("admin_token", "must be 'env:NAME', 'file:PATH' or empty (no operator)")
    max_failures = sec.integer("max_failures", 5, minimum=1)
    window = sec.duration("failure_window", "15m")
    if window < 1:
        raise sec.error("failure_window", "must be at least 1s")
    timeout = sec.duration("pbx_timeout", "5s")
    if timeout < 1:
        raise sec.error("pbx_timeout", "must be at least 1s")
    exceptions_sec = sec.section("erasure_exceptions", {})
    exceptions = {name: exceptions_sec.text(name) for name in exceptions_sec.names()}
    for name, ground in exceptions.items():
        if not ground.strip():
            raise exceptions_sec.error(name, "needs the ground of Art. 17(3) it is kept on")
    exceptions_sec.finish()
    sec.finish()
    return DsrSettings(token, max_failures, window, timeout, exceptions)


def check_dsr(settings: DsrSettings, policy: Policy, source: str) -> None:
    """Stop the start if an erasure exception names no subject-bearing category."""
    for name in settings.erasure_exceptions:
        cat = policy.categories.get(name)
        if cat is None or not cat.subject:
            raise ConfigError(
                source,
                f"dsr.erasure_exceptions.{name}",
                "not a category of the policy that names a subject",
            )


def parse_subject(sip_username: object, pbx_serial: object) -> Subject:
    if not isinstance(sip_username, str) or not _USERNAME.fullmatch(sip_username):
        raise InvalidRequest("sip_username: expected a SIP user name (1-64 characters)")
    if not isinstance(pbx_serial, str) or not _SERIAL.fullmatch(pbx_serial.lower()):
        raise InvalidRequest(
            "pbx_serial: expected a PBX serial (letters, digits, '-') or, for a SIPIS "
            "account, the domain of its SIP address"
        )
    return Subject(sip_username, pbx_serial.lower())


@dataclass(frozen=True, slots=True)
class Receipt:
    request_id: str
    type: str
    outcome: str
    counts: dict[str, int]
    kept: dict[str, str] = field(default_factory=dict)  # category -> Art. 17(3) ground
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "request_id": self.request_id,
            "type": self.type,
            "outcome": self.outcome,
            "counts": self.counts,
        }
        if self.kept:
            body["kept"] = [{"category": c, "ground": g} for c, g in self.kept.items()]
        return body | self.detail


class DataSubjectRights:
    def __init__(
        self,
        store: Store,
        settings: DsrSettings | None = None,
        processing: Sequence[Processing] = (),
    ) -> None:
        self.store = store
        self.policy = store.policy
        self.settings = settings or DsrSettings()
        self.clock = store.clock
        self.processing = tuple(processing)

    # --- Art. 15, 20 ----------------------------------------------------------------

    async def export(self, subject: Subject, actor: str) -> dict[str, Any]:
        found = await self.store.find_subject(subject)
        categories = [await self._export_category(cat, subject, found) for cat in self._all()]
        counts = {
            c["category"]: c["count"] if "count" in c else len(c["records"])
            for c in categories
            if c["included"]
        }
        receipt = await self._record("export", actor, "done", counts)
        return {
            "format": EXPORT_FORMAT,
            "request_id": receipt.request_id,
            "generated_at": iso(self.clock.now()),
            "profile": self.policy.profile,
            "subject": {"sip_username": subject.sip_username, "pbx_serial": subject.pbx_serial},
            "restricted": await self.store.is_restricted(subject),
            "categories": categories,
        }

    def _all(self) -> list[Category]:
        return list(self.policy.categories.values())

    async def _export_category(
        self, cat: Category, subject: Subject, found: Mapping[str, list[Record]]
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "category": cat.name,
            "title": cat.title["en"],
            "purpose": cat.purpose["en"],
            "legal_basis": cat.legal_basis,
            "recipients": cat.recipients["en"],
            "retention": cat.retention.describe(),
            "location": cat.location["en"],
            "source": SOURCES[cat.storage],
            "rights": list(cat.rights),
        }
        if cat.name == ACCOUNT:
            last = await self.store.subject_last_used(subject)
            records = [] if last is None else [{"last_used_at": iso(last)}]
            return entry | {"included": True, "records": records}
        if cat.name not in found:
            return entry | {"included": False, "reason": _unlinkable(cat)}
        found_records = found[cat.name]
        if cat.export == "count":
            # How many, nothing of their content (the policy's `export = "count"`).
            return entry | {"included": True, "count": len(found_records)}
        withheld = sorted(name for name, spec in cat.fields.items() if not spec.export)
        shown = [self._exported(cat, r) for r in found_records]
        if withheld:
            entry["withheld"] = {"fields": withheld, "reason": WITHHELD}
        return entry | {"included": True, "records": shown}

    def _exported(self, cat: Category, record: Record) -> dict[str, Any]:
        specs = cat.fields
        fields = {k: v for k, v in record.fields.items() if k not in specs or specs[k].export}
        for processing in self.processing:
            fields |= processing.describe(cat.name, record)
        return {
            "fields": fields,
            "created_at": iso(record.created_at),
            "last_used_at": iso(record.last_used_at),
        }

    # --- Art. 16 --------------------------------------------------------------------

    async def rectify(
        self, subject: Subject, changes: Mapping[str, Value], actor: str, *, instance: str = ""
    ) -> Receipt:
        """Set `changes` on the subject's registrations (only the one of `instance`, if
        given). Not a use: a correction must not lengthen the data's life."""
        mutable = MUTABLE_FIELDS["registration"]
        unknown = sorted(set(changes) - mutable)
        if unknown or not changes:
            raise InvalidRequest(
                f"changes: may set {', '.join(sorted(mutable))}"
                + (f"; not {unknown[0]!r}" if unknown else "")
            )
        for name, value in changes.items():
            if not isinstance(value, str) or not 0 < len(value) <= 4096:
                raise InvalidRequest(f"changes.{name}: expected a non-empty string")
        records = (await self.store.find_subject(subject)).get("registration", [])
        if instance:
            records = [r for r in records if r.fields.get("instance") == instance]
        changed = 0
        for record in records:
            changed += await self.store.update("registration", record.id, changes, use=False)
        detail = {"fields": sorted(changes)}
        return await self._record("rectify", actor, "done", {"registration": changed}, detail)

    # --- Art. 17 --------------------------------------------------------------------

    async def erase(self, subject: Subject, actor: str) -> Receipt:
        """Delete the subject in every category but the configured exceptions; erasing
        again finds nothing and says so with zero counts."""
        kept = dict(self.settings.erasure_exceptions)
        found = await self._found(subject, kept)
        counts = await self.store.delete_subject(subject, keep=kept)
        # Deleted first, so nothing registers them again; then stopped at once (the
        # provider's binding removed), not only at the next sweep.
        for processing in self.processing:
            await processing.erased(found)
        return await self._record("erase", actor, "done", counts, kept=kept)

    async def _found(self, subject: Subject, kept: Mapping[str, str]) -> dict[str, list[Record]]:
        if not self.processing:
            return {}
        found = await self.store.find_subject(subject)
        return {name: records for name, records in found.items() if name not in kept}

    # --- Art. 18 --------------------------------------------------------------------

    async def restrict(self, subject: Subject, on: bool, actor: str) -> Receipt:
        changed = await self.store.restrict(subject, on)
        found = await self._found(subject, {})
        for processing in self.processing:
            await processing.restricted(found, on)
        kind = "restrict" if on else "unrestrict"
        return await self._record(kind, actor, "done", {}, {"changed": changed, "restricted": on})

    # --- Art. 21 --------------------------------------------------------------------

    async def object(self, subject: Subject, actor: str) -> Receipt:
        """Objection applies only to processing under Art. 6(1)(e) or (f); the answer
        names, per category, why it does or does not."""
        answers = []
        for cat in self._all():
            applies = "objection" in cat.rights
            if applies:
                reason = (
                    f"Processed under {cat.legal_basis}: the controller decides on your "
                    "objection and stops unless compelling legitimate grounds override it."
                )
            elif "6(1)(b)" in cat.legal_basis:
                reason = (
                    "Processed under Art. 6(1)(b) GDPR to provide the service: the right "
                    "to object (Art. 21) does not apply. Stop using the service and the "
                    "data is deleted as the privacy notice states."
                )
            else:
                reason = f"Processed under {cat.legal_basis}: Art. 21 does not apply."
            answers.append({"category": cat.name, "applies": applies, "reason": reason})
        outcome = "referred" if any(a["applies"] for a in answers) else "not_applicable"
        return await self._record("object", actor, outcome, {}, {"categories": answers})

    # --- the trail ------------------------------------------------------------------

    async def refused(self, kind: str, actor: str, outcome: str) -> Receipt:
        """Record a request that was not carried out (identity not proved, rate limited)."""
        return await self._record(kind, actor, outcome, {})

    async def trail(self, limit: int = 100) -> list[RequestEntry]:
        return await self.store.backend.requests(limit)

    async def _record(
        self,
        kind: str,
        actor: str,
        outcome: str,
        counts: dict[str, int],
        detail: dict[str, Any] | None = None,
        *,
        kept: dict[str, str] | None = None,
    ) -> Receipt:
        entry = RequestEntry(uuid.uuid4().hex, kind, self.clock.now(), actor, outcome, counts)
        await self.store.backend.record_request(entry)
        return Receipt(entry.id, kind, outcome, counts, kept or {}, detail or {})


def _unlinkable(cat: Category) -> str:
    if cat.unlinkable_reason:
        return cat.unlinkable_reason["en"]
    if cat.storage is Storage.MEMORY:
        return "Held in memory only while in transit; nothing of it is stored."
    raise PolicyViolation(
        f"{cat.name}: names no subject and gives no unlinkable_reason, so an access "
        "request cannot answer for it"
    )

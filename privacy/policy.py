"""The data policy: one declaration of every category of data softrelay may keep.

A profile (`config/policy/<name>.toml`) declares each category: its fields and how each
is protected, the fields that must never be stored, purpose, legal basis, location,
recipients, retention and the rights that apply. The store, the logs, the sweeper, the
audit and the privacy notice all read this one model, so they cannot drift apart.

Where the data goes is declared once per profile: the servers that store it
(`[locations.<id>]`) and the other parties that receive it (`[recipients.<id>]`), each
with its country, and for a country outside the EU/EEA the basis of the transfer
(Art. 44-49 GDPR); a category names them in `stored_at` and `sent_to`.

A retention is written in the unit a person would say it in ("12mo", "4w", "90d",
"10y") and the notice says it in that unit; see `Period`.

The policy is compiled when it loads: names are checked to be safe SQL identifiers,
never-stored names may not also be declared fields, every rule has what it needs. A
deployment may add its own file on top of a profile that shortens retentions and adds
never-stored names; it cannot lengthen a retention nor drop a never-stored name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from privacy.countries import ADEQUATE, EEA, NAMES, PARTIAL_ADEQUACY
from tomlsections.reader import ConfigError, Section, load_toml, shipped

LANGUAGES = ("en", "de")
# config/policy/ of the checkout, or its copy in an install (package data).
PROFILES_DIR = shipped("policy")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
# Keys of every log line (privacy.logs); a log field may not reuse them.
LOG_ENVELOPE = frozenset({"time", "level", "logger", "event", "error_type", "dropped"})
# Rights a category may grant; Art. 77 (complaint to a supervisory authority) always applies.
RIGHTS = ("access", "rectification", "erasure", "restriction", "portability", "objection")
_PERIOD = re.compile(r"^\s*(\d+)\s*(mo|y|w|d|h|m|s)\s*$")


class Storage(StrEnum):
    DATABASE = "database"
    LOG = "log"
    MEMORY = "memory"


class Rule(StrEnum):
    AFTER_CREATED = "after_created"
    AFTER_LAST_USE = "after_last_use"
    MEMORY_ONLY = "memory_only"
    LOG_ROTATION = "log_rotation"


class Protection(StrEnum):
    PLAIN = "plain"
    ENCRYPTED = "encrypted"
    # Anonymised at write: the full value never reaches storage (IPs: IPv4 /24, IPv6 /48).
    ANONYMISED = "anonymised"


class FieldType(StrEnum):
    TEXT = "text"
    INT = "int"
    REAL = "real"
    JSON = "json"


class Unit(StrEnum):
    """The unit a retention is written in; the notice says it in the same unit."""

    SECOND = "s"
    MINUTE = "m"
    HOUR = "h"
    DAY = "d"
    WEEK = "w"
    MONTH = "mo"
    YEAR = "y"


_YEAR = 365 * 86400
# A year is 365 days and a month a twelfth of it (30 days 10 hours), so "12mo" and "1y"
# are exactly the 365 days the sweeper has always kept for "365d", and 12 months in the
# notice are never longer than 12 calendar months.
_UNIT_SECONDS = {
    Unit.SECOND: 1,
    Unit.MINUTE: 60,
    Unit.HOUR: 3600,
    Unit.DAY: 86400,
    Unit.WEEK: 7 * 86400,
    Unit.MONTH: _YEAR // 12,
    Unit.YEAR: _YEAR,
}


@dataclass(frozen=True, slots=True)
class Period:
    """A retention as the policy writes it: "12mo" stays 12 months, "365d" 365 days.

    The rule is the author's: the notice says a period in the unit it was written in, not
    in a unit the code guesses from the seconds (365 days can be "1 year" or "12 months";
    only the author knows which the statement says).
    """

    count: int
    unit: Unit

    @property
    def seconds(self) -> int:
        return self.count * _UNIT_SECONDS[self.unit]

    def __str__(self) -> str:
        return f"{self.count}{self.unit.value}"


@dataclass(frozen=True, slots=True)
class Retention:
    rule: Rule
    period: Period | None  # None for memory-only
    # Memory-only data that outlives one forwarding says until when, per language
    # ("with the connection it describes"); {}: deleted right after forwarding.
    until: dict[str, str] = field(default_factory=dict)

    @property
    def seconds(self) -> int:
        return self.period.seconds if self.period is not None else 0

    def describe(self) -> str:
        if self.period is None:
            return "memory only, deleted immediately after use"
        return f"{self.rule.value.replace('_', ' ')} {self.period}"


class TransferBasis(StrEnum):
    """What makes a transfer to a country outside the EU/EEA lawful (Art. 44-49 GDPR)."""

    ADEQUACY_DECISION = "adequacy_decision"  # Art. 45
    STANDARD_CONTRACTUAL_CLAUSES = "standard_contractual_clauses"  # Art. 46(2)(c)
    BINDING_CORPORATE_RULES = "binding_corporate_rules"  # Art. 46(2)(b), 47
    EXPLICIT_CONSENT = "explicit_consent"  # Art. 49(1)(a)


@dataclass(frozen=True, slots=True)
class Transfer:
    basis: TransferBasis
    # What the basis is in this case, e.g. the EU-US Data Privacy Framework; {} for none.
    detail: dict[str, str]


@dataclass(frozen=True, slots=True)
class Site:
    """A server that stores data (a location) or another party that receives it."""

    name: str
    title: dict[str, str]
    country: str  # ISO 3166-1 alpha-2
    transfer: Transfer | None  # None inside the EU/EEA, where the GDPR applies


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    type: FieldType
    protection: Protection
    lookup: bool
    label: dict[str, str]
    # Shown in a data-subject access export (dsr/service.py); false for a secret or a
    # password equivalent (an HA1): the export names the field as withheld instead.
    export: bool = True


@dataclass(frozen=True, slots=True)
class Category:
    name: str
    title: dict[str, str]
    purpose: dict[str, str]
    legal_basis: str
    storage: Storage
    location: dict[str, str]
    recipients: dict[str, str]
    retention: Retention
    rights: tuple[str, ...]
    fields: dict[str, FieldSpec]
    never_stored: frozenset[str]
    # Fields that together name the data subject (a SIP username at a PBX serial).
    subject: tuple[str, ...] = ()
    # Fields that identify one record: storing again under the same key replaces it.
    key: tuple[str, ...] = ()
    unlinkable_reason: dict[str, str] = field(default_factory=dict)
    # Ids of the policy's locations that hold the data and of recipients it is sent to.
    stored_at: tuple[str, ...] = ()
    sent_to: tuple[str, ...] = ()
    # What an access export shows of the subject's records: "records" (each, its fields
    # as `export` allows) or "count" (how many, nothing of their content: messages
    # waiting for the app, whose sender and text are third parties' data too).
    export: str = "records"


EXPORT_FORMS = ("records", "count")


@dataclass(frozen=True, slots=True)
class Policy:
    profile: str
    title: dict[str, str]
    source: Path
    never_stored: frozenset[str]
    categories: dict[str, Category]
    locations: dict[str, Site] = field(default_factory=dict)
    recipients: dict[str, Site] = field(default_factory=dict)

    def category(self, name: str) -> Category:
        try:
            return self.categories[name]
        except KeyError:
            raise PolicyViolation(f"category {name!r} is not declared by the policy") from None

    def stored(self, storage: Storage) -> list[Category]:
        return [c for c in self.categories.values() if c.storage is storage]


class PolicyViolation(Exception):
    """A write that the policy does not allow. Nothing of it was stored."""


def load_policy(profile: str, override: Path | None = None) -> Policy:
    """Load a profile by name (or path) and apply a deployment's tightening file."""
    path = Path(profile) if profile.endswith(".toml") else PROFILES_DIR / f"{profile}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.toml")))
        raise ConfigError(path, "", f"no such policy profile (known profiles: {known})")
    policy = _parse_policy(load_toml(path))
    if override is not None:
        policy = _tighten(policy, load_toml(override))
    return policy


def _parse_policy(root: Section) -> Policy:
    meta = root.section("policy")
    profile = meta.text("profile")
    title = meta.localised("title", LANGUAGES)
    global_never = frozenset(meta.text_list("never_stored"))
    meta.finish()
    if "password" not in global_never:
        raise meta.error("never_stored", "must contain 'password': no password, ever")
    locations = _parse_sites(root.section("locations"))
    if not locations:
        raise root.error("locations", "the policy declares no server location")
    recipients = _parse_sites(root.section("recipients", {}))
    table = root.section("categories")
    categories = {
        name: _parse_category(table.section(name), name, global_never, locations, recipients)
        for name in table.names()
    }
    table.finish()
    root.finish()
    if not categories:
        raise root.error("categories", "the policy declares no category")
    # A declared place no data goes to would put a country in the notice for nothing.
    for label, sites, names_key in (
        ("locations", locations, "stored_at"),
        ("recipients", recipients, "sent_to"),
    ):
        used = {n for c in categories.values() for n in getattr(c, names_key)}
        for name in sites:
            if name not in used:
                raise root.error(f"{label}.{name}", f"no category names it in {names_key}")
    return Policy(profile, title, root.file, global_never, categories, locations, recipients)


def _parse_sites(table: Section) -> dict[str, Site]:
    sites = {name: _parse_site(table.section(name), name) for name in table.names()}
    table.finish()
    return sites


def _parse_site(sec: Section, name: str) -> Site:
    if not _NAME.match(name):
        raise sec.error("", f"name {name!r} must match {_NAME.pattern}")
    title = sec.localised("name", LANGUAGES)
    country = sec.text("country")
    if country not in NAMES:
        raise sec.error(
            "country", f"{country!r} is not an ISO 3166-1 alpha-2 country code, such as 'DE'"
        )
    transfer = None
    if country in EEA:
        # The GDPR applies there; a basis named anyway would tell readers data leaves the EU.
        if sec.has("transfer"):
            raise sec.error("transfer", f"{country} is in the EU/EEA: there is no transfer")
    elif not sec.has("transfer"):
        raise sec.error(
            "transfer",
            f"is missing: {country} is outside the EU/EEA, so sending data there needs a "
            f"basis (one of {', '.join(TransferBasis)})",
        )
    else:
        transfer = _parse_transfer(sec.section("transfer"), country)
    sec.finish()
    return Site(name, title, country, transfer)


def _parse_transfer(sec: Section, country: str) -> Transfer:
    basis = TransferBasis(sec.choice("basis", tuple(TransferBasis)))
    detail = sec.localised("detail", LANGUAGES) if sec.has("detail") else {}
    if basis is TransferBasis.ADEQUACY_DECISION:
        if country not in ADEQUATE:
            raise sec.error(
                "basis", f"the European Commission has made no adequacy decision for {country}"
            )
        if country in PARTIAL_ADEQUACY and not detail:
            raise sec.error(
                "detail",
                f"is missing: the adequacy decision for {country} covers only some "
                "organisations; name the framework the recipient is certified under",
            )
    sec.finish()
    return Transfer(basis, detail)


def _parse_category(
    sec: Section,
    name: str,
    global_never: frozenset[str],
    locations: dict[str, Site],
    recipients: dict[str, Site],
) -> Category:
    if not _NAME.match(name):
        raise sec.error("", f"category name {name!r} must match {_NAME.pattern}")
    stored_at = _site_names(sec, "stored_at", locations, "locations", [])
    if not stored_at:
        raise sec.error("stored_at", "names no location: say which servers hold the data")
    sent_to = _site_names(sec, "sent_to", recipients, "recipients", [])
    storage = Storage(sec.choice("storage", tuple(Storage)))
    retention = _parse_retention(sec.section("retention"), storage)
    never = frozenset(sec.text_list("never_stored")) | global_never
    fields_sec = sec.section("fields", {})
    fields = {f: _parse_field(fields_sec.section(f), f, never) for f in fields_sec.names()}
    fields_sec.finish()
    if storage is Storage.MEMORY:
        # Memory that several processes share (the cluster's Redis) holds declared
        # fields; none is encrypted or looked up there: the store never sees them.
        for spec in fields.values():
            if spec.protection is not Protection.PLAIN or spec.lookup:
                raise fields_sec.error(
                    spec.name, "a memory-only field is plain and never looked up"
                )
    if storage is Storage.LOG:
        for spec in fields.values():
            if spec.name in LOG_ENVELOPE:
                raise fields_sec.error(spec.name, "is a key every log line already has")
            if spec.protection is Protection.ENCRYPTED or spec.lookup:
                raise fields_sec.error(
                    spec.name, "a log field is plain or anonymised, never looked up"
                )
    rights = tuple(sec.text_list("rights"))
    for right in rights:
        if right not in RIGHTS:
            raise sec.error("rights", f"unknown right {right!r} (known: {', '.join(RIGHTS)})")
    legal_basis = sec.text("legal_basis")
    # Art. 21 reaches only processing under Art. 6(1)(e) or (f); promising it elsewhere misleads.
    if "objection" in rights and not any(b in legal_basis for b in ("6(1)(e)", "6(1)(f)")):
        raise sec.error("rights", f"objection (Art. 21) does not apply under {legal_basis}")
    subject = tuple(sec.text_list("subject", []))
    key = tuple(sec.text_list("key", []))
    for label, names in (("subject", subject), ("key", key)):
        for fname in names:
            if fname not in fields:
                raise sec.error(label, f"names {fname!r}, which is not a declared field")
            spec = fields[fname]
            if label == "key" and spec.protection is Protection.ENCRYPTED and not spec.lookup:
                raise sec.error(label, f"encrypted key field {fname!r} needs lookup = true")
    unlinkable = (
        sec.localised("unlinkable_reason", LANGUAGES) if sec.has("unlinkable_reason") else {}
    )
    export = sec.choice("export", EXPORT_FORMS, "records")
    if export != "records" and (storage is not Storage.DATABASE or not subject):
        raise sec.error("export", "only a stored category that names a subject is exported")
    if storage is not Storage.DATABASE or not subject:
        for spec in fields.values():
            if not spec.export:
                raise fields_sec.error(
                    spec.name, "export = false: only fields of a subject's records are exported"
                )
    category = Category(
        name=name,
        title=sec.localised("title", LANGUAGES),
        purpose=sec.localised("purpose", LANGUAGES),
        legal_basis=legal_basis,
        storage=storage,
        location=sec.localised("location", LANGUAGES),
        recipients=sec.localised("recipients", LANGUAGES),
        retention=retention,
        rights=rights,
        fields=fields,
        never_stored=never,
        subject=subject,
        key=key,
        unlinkable_reason=unlinkable,
        stored_at=stored_at,
        sent_to=sent_to,
        export=export,
    )
    sec.finish()
    return category


def _site_names(
    sec: Section, key: str, sites: dict[str, Site], label: str, default: list[str]
) -> tuple[str, ...]:
    names = tuple(sec.text_list(key, default))
    for name in names:
        if name not in sites:
            known = ", ".join(sites) or "none"
            raise sec.error(key, f"names {name!r}, which is not in [{label}] (declared: {known})")
    if len(set(names)) != len(names):
        raise sec.error(key, "names a place twice")
    return names


def _parse_retention(sec: Section, storage: Storage) -> Retention:
    rule = Rule(sec.choice("rule", tuple(Rule)))
    allowed = {
        Storage.MEMORY: {Rule.MEMORY_ONLY},
        Storage.LOG: {Rule.LOG_ROTATION},
        Storage.DATABASE: {Rule.AFTER_CREATED, Rule.AFTER_LAST_USE},
    }[storage]
    if rule not in allowed:
        raise sec.error("rule", f"{rule.value!r} does not fit storage {storage.value!r}")
    period = None if rule is Rule.MEMORY_ONLY else _parse_period(sec, "duration")
    until: dict[str, str] = {}
    if sec.has("until"):
        if rule is not Rule.MEMORY_ONLY:
            raise sec.error("until", "only for rule 'memory_only' (the others have a duration)")
        until = sec.localised("until", LANGUAGES)
    sec.finish()
    return Retention(rule, period, until)


def _parse_period(sec: Section, key: str) -> Period:
    text = sec.text(key)
    match = _PERIOD.match(text)
    if match is None:
        raise sec.error(key, f"expected a duration like '90d', '4w', '12mo' or '10y', got {text!r}")
    period = Period(int(match.group(1)), Unit(match.group(2)))
    if period.count <= 0:
        raise sec.error(key, "must be longer than zero")
    return period


def _parse_field(sec: Section, name: str, never: frozenset[str]) -> FieldSpec:
    if not _NAME.match(name):
        raise sec.error("", f"field name {name!r} must match {_NAME.pattern}")
    if name in never:
        raise sec.error("", f"field {name!r} is also declared never stored")
    spec = FieldSpec(
        name=name,
        type=FieldType(sec.choice("type", tuple(FieldType))),
        protection=Protection(sec.choice("protection", tuple(Protection))),
        lookup=sec.flag("lookup", False),
        label=sec.localised("label", LANGUAGES),
        export=sec.flag("export", True),
    )
    if spec.protection is Protection.ANONYMISED and spec.type is not FieldType.TEXT:
        raise sec.error("type", "an anonymised field is text (an IP address)")
    sec.finish()
    return spec


def _tighten(policy: Policy, root: Section) -> Policy:
    """Apply a deployment's file: shorter retentions and more never-stored names only."""
    table = root.section("categories")
    categories = dict(policy.categories)
    for name in table.names():
        sec = table.section(name)
        if name not in categories:
            raise sec.error("", f"category {name!r} is not in profile {policy.profile!r}")
        base = categories[name]
        retention = base.retention
        if sec.has("retention"):
            rsec = sec.section("retention")
            if base.retention.period is None:
                raise rsec.error("duration", "a memory-only category has no duration to change")
            period = _parse_period(rsec, "duration")
            rsec.finish()
            if period.seconds > base.retention.seconds:
                raise rsec.error(
                    "duration",
                    f"may shorten the profile's retention of {base.retention.period} but not "
                    f"lengthen it to {period}",
                )
            retention = Retention(base.retention.rule, period)
        extra_never = frozenset(sec.text_list("never_stored", []))
        clash = sorted(extra_never & set(base.fields))
        if clash:
            raise sec.error("never_stored", f"{clash[0]!r} is a declared field of this category")
        sec.finish()
        categories[name] = replace(
            base, retention=retention, never_stored=base.never_stored | extra_never
        )
    table.finish()
    root.finish()
    return replace(policy, categories=categories)

"""The data policy: one declaration of every category of data softrelay may keep.

A profile (`config/policy/<name>.toml`) declares each category: its fields and how each
is protected, the fields that must never be stored, purpose, legal basis, location,
recipients, retention and the rights that apply. The store, the logs, the sweeper, the
audit and the privacy notice all read this one model, so they cannot drift apart.

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

from tomlsections.reader import ConfigError, Section, format_duration, load_toml

LANGUAGES = ("en", "de")
PROFILES_DIR = Path(__file__).resolve().parent.parent / "config" / "policy"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
# Rights a category may grant; Art. 77 (complaint to a supervisory authority) always applies.
# Keys of every log line (privacy.logs); a log field may not reuse them.
LOG_ENVELOPE = frozenset({"time", "level", "logger", "event", "error_type", "dropped"})
RIGHTS = ("access", "rectification", "erasure", "restriction", "portability", "objection")


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


@dataclass(frozen=True, slots=True)
class Retention:
    rule: Rule
    seconds: int  # 0 for memory-only

    def describe(self) -> str:
        if self.rule is Rule.MEMORY_ONLY:
            return "memory only, deleted immediately after use"
        return f"{self.rule.value.replace('_', ' ')} {format_duration(self.seconds)}"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    type: FieldType
    protection: Protection
    lookup: bool
    label: dict[str, str]


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


@dataclass(frozen=True, slots=True)
class Policy:
    profile: str
    title: dict[str, str]
    source: Path
    never_stored: frozenset[str]
    categories: dict[str, Category]

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
    table = root.section("categories")
    categories = {
        name: _parse_category(table.section(name), name, global_never) for name in table.names()
    }
    table.finish()
    root.finish()
    if not categories:
        raise root.error("categories", "the policy declares no category")
    return Policy(profile, title, root.file, global_never, categories)


def _parse_category(sec: Section, name: str, global_never: frozenset[str]) -> Category:
    if not _NAME.match(name):
        raise sec.error("", f"category name {name!r} must match {_NAME.pattern}")
    storage = Storage(sec.choice("storage", tuple(Storage)))
    retention = _parse_retention(sec.section("retention"), storage)
    never = frozenset(sec.text_list("never_stored")) | global_never
    fields_sec = sec.section("fields", {})
    fields = {f: _parse_field(fields_sec.section(f), f, never) for f in fields_sec.names()}
    fields_sec.finish()
    if storage is Storage.MEMORY and fields:
        raise sec.error("fields", "a memory-only category declares no stored field")
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
    )
    sec.finish()
    return category


def _parse_retention(sec: Section, storage: Storage) -> Retention:
    rule = Rule(sec.choice("rule", tuple(Rule)))
    allowed = {
        Storage.MEMORY: {Rule.MEMORY_ONLY},
        Storage.LOG: {Rule.LOG_ROTATION},
        Storage.DATABASE: {Rule.AFTER_CREATED, Rule.AFTER_LAST_USE},
    }[storage]
    if rule not in allowed:
        raise sec.error("rule", f"{rule.value!r} does not fit storage {storage.value!r}")
    seconds = 0 if rule is Rule.MEMORY_ONLY else sec.duration("duration")
    if rule is not Rule.MEMORY_ONLY and seconds <= 0:
        raise sec.error("duration", "must be longer than zero")
    sec.finish()
    return Retention(rule, seconds)


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
            seconds = rsec.duration("duration")
            rsec.finish()
            if base.retention.rule is Rule.MEMORY_ONLY:
                raise rsec.error("duration", "a memory-only category has no duration to change")
            if seconds > base.retention.seconds:
                raise rsec.error(
                    "duration",
                    f"may shorten the profile's retention of "
                    f"{format_duration(base.retention.seconds)} but not lengthen it to "
                    f"{format_duration(seconds)}",
                )
            if seconds <= 0:
                raise rsec.error("duration", "must be longer than zero")
            retention = Retention(base.retention.rule, seconds)
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

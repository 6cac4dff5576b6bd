"""The privacy notice and the policy table, both rendered from the loaded `Policy`.

Everything a category says (title, purpose, fields, retention, rights, the countries of
the servers that hold it and of the parties it is sent to) comes from the policy, so a
deployment that tightens a retention gets a notice that says so. Who answers for the
processing and which supervisory authority is responsible come from the server
configuration's `[controller]` table (`parse_controller`). The fixed wording lives in
`privacy.notice_texts`.

The notice is built once as blocks (`privacy.markup`) and written as Markdown or as one
self-contained HTML page, the form an app shows as its EULA at first launch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from privacy.countries import country_name
from privacy.markup import (
    Block,
    Bullets,
    Code,
    Heading,
    Item,
    Mail,
    Paragraph,
    Text,
    fill,
    joined,
    to_html,
    to_markdown,
)
from privacy.notice_texts import TEXTS
from privacy.policy import LANGUAGES, RIGHTS, Category, Period, Policy, Site, Storage, Unit
from tomlsections.reader import Section

FORMATS = ("markdown", "html")
_TABLE_WIDTH = 100
_INDENT = "    "
_LABEL_WIDTH = len("never stored: ")

# The words of each unit a policy may write a retention in (privacy.policy.Unit).
_UNIT_WORDS = {
    Unit.YEAR: "year",
    Unit.MONTH: "month",
    Unit.WEEK: "week",
    Unit.DAY: "day",
    Unit.HOUR: "hour",
    Unit.MINUTE: "minute",
    Unit.SECOND: "second",
}
_ARTICLES = {
    "access": 15,
    "rectification": 16,
    "erasure": 17,
    "restriction": 18,
    "portability": 20,
    "objection": 21,
    "complaint": 77,
}
_LEGAL_BASIS = re.compile(r"Art\.\s*6\s*\(1\)\s*\(([a-f])\)")
_EMAIL = re.compile(r"^[^@\s<>\"'`]+@[^@\s<>\"'`]+\.[^@\s<>\"'`.]+$")
_PHONE = re.compile(r"^\+?[0-9][0-9 ()/-]{3,30}$")
_WEBSITE = re.compile(r"^https://[^\s<>\"'`]+$")


@dataclass(frozen=True, slots=True)
class SupervisoryAuthority:
    """The authority responsible for the controller (Art. 77 GDPR), named in the notice."""

    name: str
    address: str
    email: str = ""
    phone: str = ""
    website: str = ""


@dataclass(frozen=True, slots=True)
class Controller:
    """Who answers for the processing; named in the notice, set by the server config."""

    name: str
    address: str
    email: str
    dpo_name: str
    dpo_email: str
    # None: the notice states the right to complain without naming an authority.
    supervisory_authority: SupervisoryAuthority | None = None
    # Days deleted data may live on in backups and the archived database log (WAL);
    # None: the notice says nothing of backups (the operator keeps none).
    backup_retention_days: int | None = None


def parse_controller(sec: Section) -> Controller:
    """The `[controller]` table of the server configuration, every default a placeholder."""
    controller = Controller(
        name=sec.text("name", "The operator of this softrelay service"),
        address=sec.text("address", "(address not configured)"),
        email=_checked(sec, "email", _EMAIL, "an e-mail address", "privacy@example.invalid"),
        dpo_name=sec.text("dpo_name", "Data protection officer"),
        dpo_email=_checked(sec, "dpo_email", _EMAIL, "an e-mail address", "dpo@example.invalid"),
        supervisory_authority=(
            _parse_authority(sec.section("supervisory_authority"))
            if sec.has("supervisory_authority")
            else None
        ),
        backup_retention_days=_backup_days(sec) if sec.has("backup_retention") else None,
    )
    sec.finish()
    return controller


def _backup_days(sec: Section) -> int:
    """`backup_retention`, a duration, in whole days (rounded up: the notice may say
    more than is kept, never less)."""
    seconds = sec.duration("backup_retention")
    if seconds < 86400:
        raise sec.error("backup_retention", "must be at least 1d")
    return -(-seconds // 86400)


def _parse_authority(sec: Section) -> SupervisoryAuthority:
    authority = SupervisoryAuthority(
        name=sec.text("name"),
        address=sec.text("address"),
        email=_checked(sec, "email", _EMAIL, "an e-mail address", ""),
        phone=_checked(sec, "phone", _PHONE, "a phone number like '+49 511 120-4500'", ""),
        website=_checked(sec, "website", _WEBSITE, "an https:// address", ""),
    )
    if not authority.name.strip():
        raise sec.error("name", "must not be empty")
    if not (authority.email or authority.phone or authority.website):
        raise sec.error("", "names no way to reach the authority: give email, phone or website")
    sec.finish()
    return authority


def _checked(sec: Section, key: str, pattern: re.Pattern[str], what: str, default: str) -> str:
    value = sec.text(key, default)
    if value and not pattern.match(value):
        raise sec.error(key, f"expected {what}, got {value!r}")
    return value


def policy_table(policy: Policy) -> str:
    """Plain-text overview of every category, for `softrelay policy show`."""
    lines = [f'Data policy profile "{policy.profile}"', f"Source: {policy.source}"]
    lines += _wrap_items(sorted(policy.never_stored), "Never stored in any category: ", _INDENT)
    for label, sites in (("Locations: ", policy.locations), ("Recipients: ", policy.recipients)):
        if sites:
            lines += _wrap_items([_site_summary(s) for s in sites.values()], label, _INDENT)
    lines.append("")
    name_width = max(len("CATEGORY"), *(len(name) for name in policy.categories))
    storage_width = max(len(s.value) for s in Storage)
    header = f"{'CATEGORY':<{name_width}}  {'STORAGE':<{storage_width}}  RETENTION"
    lines += [header, "-" * len(header)]
    for category in policy.categories.values():
        lines.append(
            f"{category.name:<{name_width}}  {category.storage.value:<{storage_width}}"
            f"  {category.retention.describe()}"
        )
        fields = [_field_summary(category, name) for name in category.fields]
        never = sorted(category.never_stored - policy.never_stored)
        for label, items in (
            ("legal basis:", [category.legal_basis]),
            ("fields:", fields or ["-"]),
            ("never stored:", never or ["-"]),
        ):
            lines += _wrap_items(
                items, f"{_INDENT}{label:<{_LABEL_WIDTH}}", _INDENT + " " * _LABEL_WIDTH
            )
    return "\n".join(lines) + "\n"


def render_notice(policy: Policy, controller: Controller, lang: str, fmt: str = "markdown") -> str:
    """The privacy notice in `lang` ("en" or "de"), as Markdown or as an HTML page."""
    if lang not in TEXTS:
        raise ValueError(
            f"no privacy notice in language {lang!r}; available: {', '.join(LANGUAGES)}"
        )
    if fmt not in FORMATS:
        raise ValueError(f"no privacy notice format {fmt!r}; available: {', '.join(FORMATS)}")
    blocks = notice_blocks(policy, controller, lang)
    return to_html(blocks, lang) if fmt == "html" else to_markdown(blocks)


def notice_blocks(policy: Policy, controller: Controller, lang: str) -> list[Block]:
    t = TEXTS[lang]
    blocks: list[Block] = [
        Heading(1, policy.title[lang]),
        Paragraph(fill(t["intro"], profile=policy.profile)),
        Heading(2, t["controller.heading"]),
        Bullets(
            (
                Item(t["controller"], (f"{controller.name}, {_one_line(controller.address)}",)),
                Item(t["email"], (Mail(controller.email),)),
                Item(t["dpo"], (f"{controller.dpo_name}, ", Mail(controller.dpo_email))),
            )
        ),
        Heading(2, t["never.heading"]),
        Paragraph(fill(t["never.text"], names=_code_list(sorted(policy.never_stored)))),
        Heading(2, t["categories.heading"]),
    ]
    for category in policy.categories.values():
        blocks += _category_section(policy, category, lang)
    if controller.backup_retention_days is not None:
        days = controller.backup_retention_days
        duration = t["unit.day.one" if days == 1 else "unit.day.many"].format(n=days)
        blocks += [
            Heading(2, t["backups.heading"]),
            Paragraph(fill(t["backups.text"], duration=duration)),
        ]
    blocks += _places_section(policy, lang)
    blocks += _rights_section(policy, controller, lang)
    return blocks


def _category_section(policy: Policy, category: Category, lang: str) -> list[Block]:
    t = TEXTS[lang]
    items = [Item(t["purpose"], (category.purpose[lang],))]
    if category.fields:
        children = tuple(
            (f"{spec.label[lang]}: {t['protection.' + spec.protection.value]}",)
            for spec in category.fields.values()
        )
        items.append(Item(t["data"], (), children))
    else:
        empty = t["data.memory"] if category.storage is Storage.MEMORY else t["data.none"]
        items.append(Item(t["data"], (empty,)))
    never = sorted(category.never_stored - policy.never_stored)
    servers = [_site_phrase(policy.locations[name], lang) for name in category.stored_at]
    items += [
        Item(t["never_stored"], _code_list(never) if never else (t["never_stored.none"],)),
        Item(t["legal_basis"], (_legal_basis(category.legal_basis, lang),)),
        Item(t["location"], (category.location[lang],)),
        Item(t["stored_at"], joined(servers, "; ")),
        Item(t["recipients"], (category.recipients[lang],)),
    ]
    if category.sent_to:
        sent = [_site_phrase(policy.recipients[name], lang) for name in category.sent_to]
        items.append(Item(t["sent_to"], joined(sent, "; ")))
    items += [
        Item(t["retention"], (_retention_phrase(category, lang),)),
        Item(t["rights"], (_rights_list(category, lang),)),
    ]
    if category.unlinkable_reason:
        items.append(Item(t["unlinkable"], (category.unlinkable_reason[lang],)))
    return [Heading(3, category.title[lang]), Bullets(tuple(items))]


def _places_section(policy: Policy, lang: str) -> list[Block]:
    """Where the servers stand and who else receives data: country and, outside the
    EU/EEA, the basis of the transfer (Art. 13(1)(f) GDPR)."""
    t = TEXTS[lang]
    sites = [*policy.locations.values(), *policy.recipients.values()]
    leaves = any(site.transfer is not None for site in sites)
    blocks: list[Block] = [
        Heading(2, t["places.heading"]),
        Paragraph((t["places.intro.transfers" if leaves else "places.intro.none"],)),
    ]
    for heading, group, names_key in (
        ("places.locations", policy.locations, "stored_at"),
        ("places.recipients", policy.recipients, "sent_to"),
    ):
        if not group:
            continue
        items = []
        for site in group.values():
            titles = [
                c.title[lang]
                for c in policy.categories.values()
                if site.name in getattr(c, names_key)
            ]
            # A server that holds every category is said so, not with a list of all.
            children: list[Text] = [
                (t["place.data.all"],)
                if len(titles) == len(policy.categories)
                else fill(t["place.data"], categories="; ".join(titles))
            ]
            if site.transfer is not None:
                basis = t[f"transfer.{site.transfer.basis.value}"]
                if site.transfer.detail:
                    detail = site.transfer.detail[lang]
                    children.append(fill(t["place.basis.detail"], basis=basis, detail=detail))
                else:
                    children.append(fill(t["place.basis"], basis=basis))
            items.append(Item(site.title[lang], (_country_phrase(site, lang),), tuple(children)))
        blocks += [Heading(3, t[heading]), Bullets(tuple(items))]
    return blocks


def _rights_section(policy: Policy, controller: Controller, lang: str) -> list[Block]:
    t = TEXTS[lang]
    blocks: list[Block] = [
        Heading(2, t["rights.heading"]),
        Paragraph(fill(t["rights.intro"], email=Mail(controller.email))),
    ]
    for right in RIGHTS:
        heading = t["right.heading"].format(
            title=t[f"right.{right}.title"], article=_ARTICLES[right]
        )
        blocks += [Heading(3, heading), Paragraph((t[f"right.{right}.text"],))]
    # Consent can only be withdrawn where something rests on it.
    if any(_basis_letter(c.legal_basis) == "a" for c in policy.categories.values()):
        blocks += [Heading(3, t["consent.heading"]), Paragraph((t["consent.text"],))]
    heading = t["right.heading"].format(
        title=t["right.complaint.title"], article=_ARTICLES["complaint"]
    )
    blocks += [Heading(3, heading), Paragraph((t["right.complaint.text"],))]
    authority = controller.supervisory_authority
    if authority is not None:
        items = [
            Item(t["authority.name"], (authority.name,)),
            Item(t["authority.address"], (_one_line(authority.address),)),
        ]
        if authority.email:
            items.append(Item(t["authority.email"], (Mail(authority.email),)))
        if authority.phone:
            items.append(Item(t["authority.phone"], (authority.phone,)))
        if authority.website:
            # Plain text, not a link: the page loads and links to nothing outside.
            items.append(Item(t["authority.website"], (authority.website,)))
        blocks += [Paragraph((t["authority.intro"],)), Bullets(tuple(items))]
    return blocks


def _site_phrase(site: Site, lang: str) -> Text:
    return fill(
        TEXTS[lang]["place.site"], name=site.title[lang], country=_country_phrase(site, lang)
    )


def _country_phrase(site: Site, lang: str) -> str:
    key = "place.country" if site.transfer is None else "place.outside"
    return TEXTS[lang][key].format(country=country_name(site.country, lang))


def _retention_phrase(category: Category, lang: str) -> str:
    """The category's retention in words, e.g. "deleted 12 months after last use"."""
    t = TEXTS[lang]
    period = category.retention.period
    template = t[f"retention.{category.retention.rule.value}"]
    if category.retention.until:
        return category.retention.until[lang]
    if period is None:
        return template
    return template.format(
        duration=_duration(period, t, after=False), duration_after=_duration(period, t, after=True)
    )


def _duration(period: Period, t: dict[str, str], *, after: bool) -> str:
    """The period in the unit the policy wrote it in: "12mo" is "12 months", never
    "365 days"; "after" picks the form a preposition takes (German: "nach 4 Wochen")."""
    number = "one" if period.count == 1 else "many"
    key = f"unit.{_UNIT_WORDS[period.unit]}.{number}{'.after' if after else ''}"
    return t[key].format(n=period.count)


def _rights_list(category: Category, lang: str) -> str:
    t = TEXTS[lang]
    if not category.rights:
        return t["rights.none"]
    return ", ".join(
        t["right.item"].format(name=t[f"right.{right}"], article=_ARTICLES[right])
        for right in category.rights
    )


def _legal_basis(text: str, lang: str) -> str:
    letter = _basis_letter(text)
    return f"{text} — {TEXTS[lang]['basis.' + letter]}" if letter else text


def _basis_letter(text: str) -> str:
    match = _LEGAL_BASIS.search(text)
    return match.group(1) if match else ""


def _code_list(names: list[str]) -> Text:
    return joined([(Code(name),) for name in names])


def _one_line(address: str) -> str:
    return ", ".join(line.strip() for line in address.splitlines() if line.strip())


def _field_summary(category: Category, name: str) -> str:
    spec = category.fields[name]
    flags = [spec.protection.value] + (["lookup"] if spec.lookup else [])
    return f"{name} ({', '.join(flags)})"


def _site_summary(site: Site) -> str:
    where = [site.country] + ([site.transfer.basis.value] if site.transfer else [])
    return f"{site.name} ({', '.join(where)})"


def _wrap_items(items: list[str], first: str, rest: str) -> list[str]:
    """Comma-separated items, wrapped between items so no "(encrypted, lookup)" splits."""
    lines: list[str] = []
    current = first
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        fresh = current in (first, rest)
        candidate = current + piece if fresh else f"{current} {piece}"
        if not fresh and len(candidate) > _TABLE_WIDTH:
            lines.append(current)
            current = rest + piece
        else:
            current = candidate
    lines.append(current)
    return lines

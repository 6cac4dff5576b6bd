"""The privacy notice and the policy table, both rendered from the loaded `Policy`.

Everything a category says (title, purpose, fields, retention, rights) comes from the
policy, so a deployment that tightens a retention gets a notice that says so. The
fixed wording around it lives in `_TEXTS`, one dict per language, so a translation is
reviewed in one place (a test keeps the languages' keys equal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from privacy.policy import LANGUAGES, RIGHTS, Category, Policy, Rule, Storage

_TABLE_WIDTH = 100
_INDENT = "    "
_LABEL_WIDTH = len("never stored: ")

# Largest unit first; a duration is shown in the largest unit that divides it exactly,
# because rounding down would promise a shorter retention than the sweeper keeps.
_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))
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

_EN: dict[str, str] = {
    "intro": (
        "This notice is generated from the data policy that the service enforces "
        '(profile "{profile}"): the service stores no field that is not listed here, '
        "and deletes each one as stated."
    ),
    "controller.heading": "Who is responsible",
    "controller": "Controller",
    "email": "Email",
    "dpo": "Data protection officer",
    "never.heading": "Passwords are never stored",
    "never.text": (
        "Passwords are never stored, and neither are other credentials: no category of "
        "data below may hold a field named {names}. Where the service has to pass a "
        "credential on, it forwards it and forgets it."
    ),
    "categories.heading": "The data we process",
    "purpose": "Purpose",
    "data": "Data",
    "data.memory": (
        "nothing is stored; the data exists only in working memory while it is forwarded"
    ),
    "data.none": "no data fields of its own",
    "never_stored": "Never stored",
    "never_stored.none": "nothing beyond the credentials named above",
    "legal_basis": "Legal basis",
    "location": "Where",
    "recipients": "Recipients",
    "retention": "Retention",
    "rights": "Your rights",
    "rights.none": (
        "none of Art. 15 to 21; the right to complain to a supervisory authority (Art. 77) "
        "always applies"
    ),
    "unlinkable": "Note",
    "protection.encrypted": "encrypted at rest",
    "protection.anonymised": "shortened at write",
    "protection.plain": "not encrypted",
    # {duration} follows a number directly ("365 days after"); {duration_after} follows
    # a preposition, which in German takes another case ("nach 7 Tagen").
    "retention.after_last_use": "deleted {duration} after last use",
    "retention.after_created": "deleted {duration} after it was stored",
    "retention.log_rotation": "log files deleted after {duration_after}",
    "retention.memory_only": "memory only, deleted right after forwarding",
    "unit.day.one": "{n} day",
    "unit.day.many": "{n} days",
    "unit.day.one.after": "{n} day",
    "unit.day.many.after": "{n} days",
    "unit.hour.one": "{n} hour",
    "unit.hour.many": "{n} hours",
    "unit.hour.one.after": "{n} hour",
    "unit.hour.many.after": "{n} hours",
    "unit.minute.one": "{n} minute",
    "unit.minute.many": "{n} minutes",
    "unit.minute.one.after": "{n} minute",
    "unit.minute.many.after": "{n} minutes",
    "unit.second.one": "{n} second",
    "unit.second.many": "{n} seconds",
    "unit.second.one.after": "{n} second",
    "unit.second.many.after": "{n} seconds",
    "basis.a": "consent",
    "basis.b": "performance of a contract",
    "basis.c": "legal obligation",
    "basis.d": "vital interests",
    "basis.e": "public interest",
    "basis.f": "legitimate interests",
    "right.item": "{name} (Art. {article})",
    "right.heading": "{title} (Art. {article} GDPR)",
    "right.access": "access",
    "right.rectification": "rectification",
    "right.erasure": "erasure",
    "right.restriction": "restriction",
    "right.portability": "portability",
    "right.objection": "objection",
    "rights.heading": "Your rights",
    "rights.intro": (
        "You have the following rights towards the controller, for each category as far "
        "as it lists them above. To use them, write to {email}."
    ),
    "right.access.title": "Right of access",
    "right.access.text": "You may ask whether we process data about you, and get a copy of it.",
    "right.rectification.title": "Right to rectification",
    "right.rectification.text": "You may have inaccurate data about you corrected.",
    "right.erasure.title": "Right to erasure",
    "right.erasure.text": (
        "You may have your data deleted where we no longer need it or may no longer process it."
    ),
    "right.restriction.title": "Right to restriction of processing",
    "right.restriction.text": (
        "You may ask us to restrict processing of your data, for example while its "
        "accuracy is being checked."
    ),
    "right.portability.title": "Right to data portability",
    "right.portability.text": (
        "You may receive the data you provided to us in a structured, commonly used and "
        "machine-readable format, or have it sent to another controller."
    ),
    "right.objection.title": "Right to object",
    "right.objection.text": (
        "You may object to processing based on our legitimate interests (Art. 6(1)(f) GDPR) "
        "on grounds relating to your particular situation. The right to object does not "
        "apply to processing under Art. 6(1)(b) GDPR, which is needed to provide the "
        "service; to end that processing, stop using the service, and the data is deleted "
        "as stated above."
    ),
    "consent.heading": "Withdrawing consent (Art. 7(3) GDPR)",
    "consent.text": (
        "Where we process data based on your consent (Art. 6(1)(a) GDPR), you may withdraw "
        "it at any time; this does not affect the processing before the withdrawal."
    ),
    "right.complaint.title": "Right to lodge a complaint with a supervisory authority",
    "right.complaint.text": (
        "You may complain to a supervisory authority, in particular to the one responsible "
        "for us: {authority}."
    ),
}

_DE: dict[str, str] = {
    "intro": (
        "Diese Hinweise werden aus der Datenrichtlinie erzeugt, die der Dienst durchsetzt "
        "(Profil „{profile}“): Der Dienst speichert kein Feld, das hier nicht genannt ist, "
        "und löscht jedes wie angegeben."
    ),
    "controller.heading": "Verantwortlicher",
    "controller": "Verantwortlicher",
    "email": "E-Mail",
    "dpo": "Datenschutzbeauftragte(r)",
    "never.heading": "Passwörter werden nie gespeichert",
    "never.text": (
        "Passwörter werden nie gespeichert, ebenso wenig andere Zugangsdaten: Keine der "
        "folgenden Datenkategorien darf ein Feld mit einem dieser Namen enthalten: {names}. "
        "Wo der Dienst Zugangsdaten weitergeben muss, leitet er sie weiter und vergisst sie."
    ),
    "categories.heading": "Welche Daten wir verarbeiten",
    "purpose": "Zweck",
    "data": "Daten",
    "data.memory": (
        "es wird nichts gespeichert; die Daten liegen nur während der Weiterleitung im "
        "Arbeitsspeicher"
    ),
    "data.none": "keine eigenen Datenfelder",
    "never_stored": "Nie gespeichert",
    "never_stored.none": "nichts über die oben genannten Zugangsdaten hinaus",
    "legal_basis": "Rechtsgrundlage",
    "location": "Speicherort",
    "recipients": "Empfänger",
    "retention": "Speicherdauer",
    "rights": "Ihre Rechte",
    "rights.none": (
        "keines der Rechte aus Art. 15 bis 21; das Recht auf Beschwerde bei einer "
        "Aufsichtsbehörde (Art. 77) gilt immer"
    ),
    "unlinkable": "Hinweis",
    "protection.encrypted": "verschlüsselt gespeichert",
    "protection.anonymised": "beim Schreiben gekürzt",
    "protection.plain": "unverschlüsselt",
    "retention.after_last_use": "gelöscht {duration} nach der letzten Nutzung",
    "retention.after_created": "gelöscht {duration} nach der Speicherung",
    "retention.log_rotation": "Protokolldateien gelöscht nach {duration_after}",
    "retention.memory_only": "nur im Arbeitsspeicher, gelöscht direkt nach der Weiterleitung",
    "unit.day.one": "{n} Tag",
    "unit.day.many": "{n} Tage",
    "unit.day.one.after": "{n} Tag",
    "unit.day.many.after": "{n} Tagen",
    "unit.hour.one": "{n} Stunde",
    "unit.hour.many": "{n} Stunden",
    "unit.hour.one.after": "{n} Stunde",
    "unit.hour.many.after": "{n} Stunden",
    "unit.minute.one": "{n} Minute",
    "unit.minute.many": "{n} Minuten",
    "unit.minute.one.after": "{n} Minute",
    "unit.minute.many.after": "{n} Minuten",
    "unit.second.one": "{n} Sekunde",
    "unit.second.many": "{n} Sekunden",
    "unit.second.one.after": "{n} Sekunde",
    "unit.second.many.after": "{n} Sekunden",
    "basis.a": "Einwilligung",
    "basis.b": "Vertragserfüllung",
    "basis.c": "rechtliche Verpflichtung",
    "basis.d": "lebenswichtige Interessen",
    "basis.e": "öffentliches Interesse",
    "basis.f": "berechtigte Interessen",
    "right.item": "{name} (Art. {article})",
    "right.heading": "{title} (Art. {article} DSGVO)",
    "right.access": "Auskunft",
    "right.rectification": "Berichtigung",
    "right.erasure": "Löschung",
    "right.restriction": "Einschränkung der Verarbeitung",
    "right.portability": "Datenübertragbarkeit",
    "right.objection": "Widerspruch",
    "rights.heading": "Ihre Rechte",
    "rights.intro": (
        "Ihnen stehen gegenüber dem Verantwortlichen die folgenden Rechte zu, für jede "
        "Datenkategorie soweit sie oben genannt sind. Schreiben Sie dazu an {email}."
    ),
    "right.access.title": "Recht auf Auskunft",
    "right.access.text": (
        "Sie können Auskunft verlangen, ob wir Daten über Sie verarbeiten, und eine Kopie "
        "dieser Daten erhalten."
    ),
    "right.rectification.title": "Recht auf Berichtigung",
    "right.rectification.text": "Sie können unrichtige Daten über Sie berichtigen lassen.",
    "right.erasure.title": "Recht auf Löschung",
    "right.erasure.text": (
        "Sie können Ihre Daten löschen lassen, soweit wir sie nicht mehr benötigen oder "
        "nicht mehr verarbeiten dürfen."
    ),
    "right.restriction.title": "Recht auf Einschränkung der Verarbeitung",
    "right.restriction.text": (
        "Sie können verlangen, dass wir Ihre Daten nur eingeschränkt verarbeiten, etwa "
        "solange ihre Richtigkeit geprüft wird."
    ),
    "right.portability.title": "Recht auf Datenübertragbarkeit",
    "right.portability.text": (
        "Sie können die Daten, die Sie uns bereitgestellt haben, in einem strukturierten, "
        "gängigen und maschinenlesbaren Format erhalten oder an einen anderen "
        "Verantwortlichen übermitteln lassen."
    ),
    "right.objection.title": "Widerspruchsrecht",
    "right.objection.text": (
        "Sie können einer Verarbeitung, die auf unseren berechtigten Interessen beruht "
        "(Art. 6 Abs. 1 lit. f DSGVO), aus Gründen Ihrer besonderen Situation widersprechen. "
        "Für die Verarbeitung nach Art. 6 Abs. 1 lit. b DSGVO, die zur Erbringung des "
        "Dienstes erforderlich ist, gilt das Widerspruchsrecht nicht; um sie zu beenden, "
        "nutzen Sie den Dienst nicht mehr, dann werden die Daten wie oben angegeben gelöscht."
    ),
    "consent.heading": "Widerruf der Einwilligung (Art. 7 Abs. 3 DSGVO)",
    "consent.text": (
        "Soweit wir Daten auf Grund Ihrer Einwilligung verarbeiten (Art. 6 Abs. 1 lit. a "
        "DSGVO), können Sie diese jederzeit widerrufen; die Verarbeitung bis zum Widerruf "
        "bleibt davon unberührt."
    ),
    "right.complaint.title": "Recht auf Beschwerde bei einer Aufsichtsbehörde",
    "right.complaint.text": (
        "Sie können sich bei einer Aufsichtsbehörde beschweren, insbesondere bei der für "
        "uns zuständigen: {authority}."
    ),
}

_TEXTS: dict[str, dict[str, str]] = {"en": _EN, "de": _DE}


@dataclass(frozen=True, slots=True)
class Controller:
    """Who answers for the processing; named in the notice, set by the server config."""

    name: str
    address: str
    email: str
    dpo_name: str
    dpo_email: str
    supervisory_authority: str


def policy_table(policy: Policy) -> str:
    """Plain-text overview of every category, for `softrelay policy show`."""
    lines = [f'Data policy profile "{policy.profile}"', f"Source: {policy.source}"]
    lines += _wrap_items(sorted(policy.never_stored), "Never stored in any category: ", _INDENT)
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


def render_notice(policy: Policy, controller: Controller, lang: str) -> str:
    """The privacy notice in Markdown, in `lang` ("en" or "de")."""
    if lang not in _TEXTS:
        raise ValueError(
            f"no privacy notice in language {lang!r}; available: {', '.join(LANGUAGES)}"
        )
    t = _TEXTS[lang]
    out = [f"# {policy.title[lang]}", "", t["intro"].format(profile=policy.profile), ""]
    address = ", ".join(line.strip() for line in controller.address.splitlines() if line.strip())
    out += [
        f"## {t['controller.heading']}",
        "",
        f"- **{t['controller']}:** {controller.name}, {address}",
        f"- **{t['email']}:** {controller.email}",
        f"- **{t['dpo']}:** {controller.dpo_name}, {controller.dpo_email}",
        "",
        f"## {t['never.heading']}",
        "",
        t["never.text"].format(names=_code_list(sorted(policy.never_stored))),
        "",
        f"## {t['categories.heading']}",
        "",
    ]
    for category in policy.categories.values():
        out += _category_section(policy, category, lang)
    out += _rights_section(policy, controller, lang)
    return "\n".join(out)


def _category_section(policy: Policy, category: Category, lang: str) -> list[str]:
    t = _TEXTS[lang]
    out = [f"### {category.title[lang]}", "", f"- **{t['purpose']}:** {category.purpose[lang]}"]
    if category.fields:
        out.append(f"- **{t['data']}:**")
        out += [
            f"  - {spec.label[lang]}: {t['protection.' + spec.protection.value]}"
            for spec in category.fields.values()
        ]
    else:
        empty = t["data.memory"] if category.storage is Storage.MEMORY else t["data.none"]
        out.append(f"- **{t['data']}:** {empty}")
    never = sorted(category.never_stored - policy.never_stored)
    out += [
        f"- **{t['never_stored']}:** {_code_list(never) if never else t['never_stored.none']}",
        f"- **{t['legal_basis']}:** {_legal_basis(category.legal_basis, lang)}",
        f"- **{t['location']}:** {category.location[lang]}",
        f"- **{t['recipients']}:** {category.recipients[lang]}",
        f"- **{t['retention']}:** {_retention_phrase(category, lang)}",
        f"- **{t['rights']}:** {_rights_list(category, lang)}",
    ]
    if category.unlinkable_reason:
        out.append(f"- **{t['unlinkable']}:** {category.unlinkable_reason[lang]}")
    out.append("")
    return out


def _rights_section(policy: Policy, controller: Controller, lang: str) -> list[str]:
    t = _TEXTS[lang]
    out = [f"## {t['rights.heading']}", "", t["rights.intro"].format(email=controller.email), ""]
    for right in RIGHTS:
        heading = t["right.heading"].format(
            title=t[f"right.{right}.title"], article=_ARTICLES[right]
        )
        out += [f"### {heading}", "", t[f"right.{right}.text"], ""]
    # Consent can only be withdrawn where something rests on it.
    if any(_basis_letter(c.legal_basis) == "a" for c in policy.categories.values()):
        out += [f"### {t['consent.heading']}", "", t["consent.text"], ""]
    heading = t["right.heading"].format(
        title=t["right.complaint.title"], article=_ARTICLES["complaint"]
    )
    out += [
        f"### {heading}",
        "",
        t["right.complaint.text"].format(authority=controller.supervisory_authority),
        "",
    ]
    return out


def _retention_phrase(category: Category, lang: str) -> str:
    """The category's retention in words, e.g. "deleted 365 days after last use"."""
    t = _TEXTS[lang]
    template = t[f"retention.{category.retention.rule.value}"]
    if category.retention.rule is Rule.MEMORY_ONLY:
        return template
    return template.format(
        duration=_duration(category.retention.seconds, t, after=False),
        duration_after=_duration(category.retention.seconds, t, after=True),
    )


def _duration(seconds: int, t: dict[str, str], *, after: bool) -> str:
    # A second divides everything, so there is always a unit.
    unit, size = next((unit, size) for unit, size in _UNITS if seconds % size == 0)
    n = seconds // size
    key = f"unit.{unit}.{'one' if n == 1 else 'many'}{'.after' if after else ''}"
    return t[key].format(n=n)


def _rights_list(category: Category, lang: str) -> str:
    t = _TEXTS[lang]
    if not category.rights:
        return t["rights.none"]
    return ", ".join(
        t["right.item"].format(name=t[f"right.{right}"], article=_ARTICLES[right])
        for right in category.rights
    )


def _legal_basis(text: str, lang: str) -> str:
    letter = _basis_letter(text)
    return f"{text} — {_TEXTS[lang]['basis.' + letter]}" if letter else text


def _basis_letter(text: str) -> str:
    match = _LEGAL_BASIS.search(text)
    return match.group(1) if match else ""


def _code_list(names: list[str]) -> str:
    # Backticks keep names like `sip_body` from turning into Markdown emphasis.
    return ", ".join(f"`{name}`" for name in names)


def _field_summary(category: Category, name: str) -> str:
    spec = category.fields[name]
    flags = [spec.protection.value] + (["lookup"] if spec.lookup else [])
    return f"{name} ({', '.join(flags)})"


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

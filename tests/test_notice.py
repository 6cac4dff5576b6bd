"""The privacy notice and the policy table say what the loaded policy declares."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from privacy.notice import (
    Controller,
    SupervisoryAuthority,
    parse_controller,
    policy_table,
    render_notice,
)
from privacy.notice_texts import TEXTS
from privacy.policy import LANGUAGES, PROFILES_DIR, Category, Policy, Rule, Unit, load_policy
from softrelay.config import DEFAULT_CONFIG, load_config
from tomlsections.reader import ConfigError, Section, load_toml

PROFILES = ("auerproxy", "cloudsoftphone")
CONTROLLER = Controller(
    name="Example Telecom GmbH",
    address="Musterstraße 1\n10115 Berlin",
    email="privacy@example.com",
    dpo_name="Erika Mustermann",
    dpo_email="dpo@example.com",
    supervisory_authority=SupervisoryAuthority(
        name="Die Landesbeauftragte für den Datenschutz Niedersachsen",
        address="Prinzenstraße 5\n30159 Hannover",
        email="poststelle@lfd.niedersachsen.de",
        phone="+49 511 120-4500",
        website="https://www.lfd.niedersachsen.de",
    ),
)
# Written out here rather than taken from notice.py, so a wrong word there fails a test.
PROTECTION = {
    "en": {
        "encrypted": "encrypted at rest",
        "anonymised": "shortened at write",
        "plain": "not encrypted",
    },
    "de": {
        "encrypted": "verschlüsselt gespeichert",
        "anonymised": "beim Schreiben gekürzt",
        "plain": "unverschlüsselt",
    },
}
RIGHT_ARTICLES = (15, 16, 17, 18, 20, 21, 77)
# How each unit is written, (singular, plural), and in German after "nach" (dative).
UNIT_WORDS = {
    "en": {
        Unit.YEAR: ("year", "years"),
        Unit.MONTH: ("month", "months"),
        Unit.WEEK: ("week", "weeks"),
        Unit.DAY: ("day", "days"),
        Unit.HOUR: ("hour", "hours"),
        Unit.MINUTE: ("minute", "minutes"),
        Unit.SECOND: ("second", "seconds"),
    },
    "de": {
        Unit.YEAR: ("Jahr", "Jahre"),
        Unit.MONTH: ("Monat", "Monate"),
        Unit.WEEK: ("Woche", "Wochen"),
        Unit.DAY: ("Tag", "Tage"),
        Unit.HOUR: ("Stunde", "Stunden"),
        Unit.MINUTE: ("Minute", "Minuten"),
        Unit.SECOND: ("Sekunde", "Sekunden"),
    },
}
DATIVE_PLURAL = {"Jahre": "Jahren", "Monate": "Monaten", "Tage": "Tagen"}


def expected_retention(category: Category, lang: str) -> str:
    retention = category.retention
    if retention.until:  # memory-only data that says until when (the cluster's Redis)
        return retention.until[lang]
    if retention.rule is Rule.MEMORY_ONLY:
        return {
            "en": "memory only, deleted right after forwarding",
            "de": "nur im Arbeitsspeicher, gelöscht direkt nach der Weiterleitung",
        }[lang]
    assert retention.period is not None
    n = retention.period.count
    one, many = UNIT_WORDS[lang][retention.period.unit]
    amount = f"{n} {one if n == 1 else many}"
    after = f"{n} {one if n == 1 else DATIVE_PLURAL.get(many, many)}"
    phrases = {
        ("en", Rule.AFTER_LAST_USE): f"deleted {amount} after last use",
        ("en", Rule.AFTER_CREATED): f"deleted {amount} after it was stored",
        ("en", Rule.LOG_ROTATION): f"log files deleted after {amount}",
        ("de", Rule.AFTER_LAST_USE): f"gelöscht {amount} nach der letzten Nutzung",
        ("de", Rule.AFTER_CREATED): f"gelöscht {amount} nach der Speicherung",
        ("de", Rule.LOG_ROTATION): f"Protokolldateien gelöscht nach {after}",
    }
    return phrases[(lang, retention.rule)]


def sections(markdown: str) -> dict[str, str]:
    """Each `##`/`###` heading mapped to the text up to the next heading."""
    parts = re.split(r"^#{2,3} (.+)$", markdown, flags=re.MULTILINE)
    headings = parts[1::2]
    assert len(headings) == len(set(headings)), "a heading is repeated"
    return dict(zip(headings, parts[2::2], strict=True))


def category_section(policy: Policy, markdown: str, name: str, lang: str) -> str:
    return sections(markdown)[policy.categories[name].title[lang]]


def write_override(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "override.toml"
    path.write_text(body, encoding="utf-8")
    return path


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_category_has_its_section_with_retention_and_fields(profile: str, lang: str) -> None:
    policy = load_policy(profile)
    notice = render_notice(policy, CONTROLLER, lang)
    found = sections(notice)
    for category in policy.categories.values():
        section = found[category.title[lang]]
        assert category.purpose[lang] in section
        assert category.location[lang] in section
        assert category.recipients[lang] in section
        assert category.legal_basis in section
        assert f"{expected_retention(category, lang)}\n" in section, category.name
        for spec in category.fields.values():
            assert f"{spec.label[lang]}: {PROTECTION[lang][spec.protection.value]}" in section
        for name in category.never_stored - policy.never_stored:
            assert f"`{name}`" in section
        if category.unlinkable_reason:
            assert category.unlinkable_reason[lang] in section


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("profile", PROFILES)
def test_rights_sections_name_their_articles(profile: str, lang: str) -> None:
    notice = render_notice(load_policy(profile), CONTROLLER, lang)
    law = {"en": "GDPR", "de": "DSGVO"}[lang]
    headings = list(sections(notice))
    for article in RIGHT_ARTICLES:
        matching = [h for h in headings if h.endswith(f"(Art. {article} {law})")]
        assert len(matching) == 1, f"Art. {article}"
    objection = next(body for h, body in sections(notice).items() if h.endswith(f"(Art. 21 {law})"))
    assert {"en": "Art. 6(1)(b)", "de": "Art. 6 Abs. 1 lit. b"}[lang] in objection
    complaint = next(body for h, body in sections(notice).items() if h.endswith(f"(Art. 77 {law})"))
    authority = CONTROLLER.supervisory_authority
    assert authority is not None
    labels = {
        "en": ("Authority", "Address", "Email", "Phone", "Website"),
        "de": ("Behörde", "Anschrift", "E-Mail", "Telefon", "Website"),
    }[lang]
    values = (
        authority.name,
        "Prinzenstraße 5, 30159 Hannover",
        authority.email,
        authority.phone,
        authority.website,
    )
    for label, value in zip(labels, values, strict=True):
        assert f"- **{label}:** {value}\n" in complaint


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("profile", PROFILES)
def test_controller_and_dpo_are_named(profile: str, lang: str) -> None:
    notice = render_notice(load_policy(profile), CONTROLLER, lang)
    assert notice.startswith(f"# {load_policy(profile).title[lang]}\n")
    for text in (CONTROLLER.name, "Musterstraße 1, 10115 Berlin", CONTROLLER.email):
        assert text in notice
    assert f"{CONTROLLER.dpo_name}, {CONTROLLER.dpo_email}" in notice


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("profile", PROFILES)
def test_passwords_are_named_as_never_stored(profile: str, lang: str) -> None:
    policy = load_policy(profile)
    heading = {"en": "Passwords are never stored", "de": "Passwörter werden nie gespeichert"}[lang]
    section = sections(render_notice(policy, CONTROLLER, lang))[heading]
    assert heading in section  # the sentence itself, not only the heading
    for name in policy.never_stored:
        assert f"`{name}`" in section


def test_unknown_language_is_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"'fr'.*en, de"):
        render_notice(load_policy("auerproxy"), CONTROLLER, "fr")


@pytest.mark.parametrize(
    ("lang", "phrase"),
    [("en", "deleted 30 days after last use"), ("de", "gelöscht 30 Tage nach der letzten Nutzung")],
)
def test_tightened_policy_renders_the_shorter_retention(
    tmp_path: Path, lang: str, phrase: str
) -> None:
    override = write_override(
        tmp_path,
        '[categories.registration]\nretention = { duration = "30d" }\nnever_stored = ["call_id"]\n',
    )
    policy = load_policy("auerproxy", override=override)
    section = category_section(
        policy, render_notice(policy, CONTROLLER, lang), "registration", lang
    )
    assert phrase in section
    assert "365" not in section
    assert "`call_id`" in section


@pytest.mark.parametrize(
    ("category", "duration", "lang", "phrase"),
    [
        # Said in the unit it is written in: never rounded to "1 day", never "365 days".
        ("registration", "36h", "en", "deleted 36 hours after last use"),
        ("registration", "36h", "de", "gelöscht 36 Stunden nach der letzten Nutzung"),
        ("registration", "1h", "en", "deleted 1 hour after last use"),
        ("registration", "1y", "en", "deleted 1 year after last use"),
        ("registration", "1y", "de", "gelöscht 1 Jahr nach der letzten Nutzung"),
        ("registration", "6mo", "en", "deleted 6 months after last use"),
        ("registration", "6mo", "de", "gelöscht 6 Monate nach der letzten Nutzung"),
        ("registration", "1mo", "en", "deleted 1 month after last use"),
        ("registration", "1mo", "de", "gelöscht 1 Monat nach der letzten Nutzung"),
        ("registration", "1w", "en", "deleted 1 week after last use"),
        ("registration", "1w", "de", "gelöscht 1 Woche nach der letzten Nutzung"),
        ("registration", "365d", "en", "deleted 365 days after last use"),
        ("debug", "2w", "de", "gelöscht 2 Wochen nach der Speicherung"),
        ("push_log", "1d", "en", "log files deleted after 1 day"),
        ("push_log", "1d", "de", "Protokolldateien gelöscht nach 1 Tag"),
        ("push_log", "2d", "de", "Protokolldateien gelöscht nach 2 Tagen"),
        ("push_log", "1w", "en", "log files deleted after 1 week"),
        ("push_log", "1w", "de", "Protokolldateien gelöscht nach 1 Woche"),
    ],
)
def test_retention_words_follow_unit_and_number(
    tmp_path: Path, category: str, duration: str, lang: str, phrase: str
) -> None:
    override = write_override(
        tmp_path, f'[categories.{category}]\nretention = {{ duration = "{duration}" }}\n'
    )
    policy = load_policy("auerproxy", override=override)
    notice = render_notice(policy, CONTROLLER, lang)
    # The whole bullet's end: "1 Woche" must not pass as the start of "1 Wochen".
    assert f"{phrase}\n" in category_section(policy, notice, category, lang)


def test_every_language_has_the_same_texts() -> None:
    assert set(TEXTS) == set(LANGUAGES)
    for lang, texts in TEXTS.items():
        assert set(texts) == set(TEXTS["en"]), lang


@pytest.mark.parametrize("profile", PROFILES)
def test_policy_table_lists_every_category_and_field(profile: str) -> None:
    policy = load_policy(profile)
    table = policy_table(policy)
    lines = table.splitlines()
    for category in policy.categories.values():
        row = next(line for line in lines if line.startswith(f"{category.name} "))
        assert category.storage.value in row
        assert category.retention.describe() in row
        for name, spec in category.fields.items():
            flags = spec.protection.value + (", lookup" if spec.lookup else "")
            assert f"{name} ({flags})" in table
        for name in category.never_stored - policy.never_stored:
            assert re.search(rf"\b{name}\b", table)
    assert "sip_username (encrypted, lookup)" in table
    # The global never-stored list is given once, not repeated in every row.
    assert len(re.findall(r"\bpassword\b", table)) == 1
    assert max(len(line) for line in lines) <= 100


@pytest.mark.parametrize(
    ("lang", "phrases"),
    [
        (
            "en",
            {
                "registration": "deleted 12 months after last use",
                "debug": "deleted 4 weeks after it was stored",
                "crash_report": "deleted 90 days after it was stored",
                "usage_count": "deleted 10 years after it was stored",
                "push_log": "log files deleted after 7 days",
            },
        ),
        (
            "de",
            {
                "registration": "gelöscht 12 Monate nach der letzten Nutzung",
                "debug": "gelöscht 4 Wochen nach der Speicherung",
                "crash_report": "gelöscht 90 Tage nach der Speicherung",
                "usage_count": "gelöscht 10 Jahre nach der Speicherung",
                "push_log": "Protokolldateien gelöscht nach 7 Tagen",
            },
        ),
    ],
)
@pytest.mark.parametrize("profile", PROFILES)
def test_shipped_retentions_read_as_the_statements_write_them(
    profile: str, lang: str, phrases: dict[str, str]
) -> None:
    policy = load_policy(profile)
    notice = render_notice(policy, CONTROLLER, lang)
    for name, phrase in phrases.items():
        assert f"{phrase}\n" in category_section(policy, notice, name, lang), name
    for unread in ("365", "3650", "28 days", "28 Tage"):
        assert unread not in notice


@pytest.mark.parametrize(
    ("duration", "lang", "phrase"),
    [
        # After a preposition German takes the dative plural: "nach 10 Jahren".
        ("10y", "en", "log files deleted after 10 years"),
        ("10y", "de", "Protokolldateien gelöscht nach 10 Jahren"),
        ("1y", "de", "Protokolldateien gelöscht nach 1 Jahr"),
        ("12mo", "de", "Protokolldateien gelöscht nach 12 Monaten"),
        ("1mo", "de", "Protokolldateien gelöscht nach 1 Monat"),
        ("4w", "de", "Protokolldateien gelöscht nach 4 Wochen"),
    ],
)
def test_log_rotation_periods_in_years_months_and_weeks(
    tmp_path: Path, duration: str, lang: str, phrase: str
) -> None:
    # A profile (not an override, which may only shorten) with a long log rotation.
    text = (PROFILES_DIR / "auerproxy.toml").read_text(encoding="utf-8")
    old = "[categories.push_log]\n"
    assert old in text
    start = text.index(old)
    end = text.index('retention = { rule = "log_rotation", duration = "7d" }', start)
    path = tmp_path / "long-logs.toml"
    path.write_text(
        text[:end]
        + f'retention = {{ rule = "log_rotation", duration = "{duration}" }}'
        + text[end + len('retention = { rule = "log_rotation", duration = "7d" }') :],
        encoding="utf-8",
    )
    policy = load_policy(str(path))
    notice = render_notice(policy, CONTROLLER, lang)
    assert f"{phrase}\n" in category_section(policy, notice, "push_log", lang)


PLACES = {"en": "Where the data is processed", "de": "Wo die Daten verarbeitet werden"}


@pytest.mark.parametrize(
    ("lang", "expected"),
    [
        (
            "en",
            [
                "### Our servers\n\n- **Relay server:** Germany\n  - Data: Registrations of phones",
                # What a cluster's nodes share: in Redis's memory alone.
                "- **Shared memory of the relay servers (Redis), when the relay runs as a "
                "cluster:** Germany\n  - Data: Location of connections in a cluster; Shared "
                "limits in a cluster\n",
                "- **Sentry server of the app vendor, for crash reports (only when the operator "
                "forwards them):** Germany\n  - Data: Crash reports (only if you opted in)\n",
                "- **Apple Push Notification service (Apple Inc.):** United States, outside the "
                "EU/EEA\n  - Data: Registrations of phones and PBXs; Your SIP account held for "
                "registering on your behalf (SIPIS mode)\n  - Basis of the transfer: "
                "adequacy decision of the European Commission (Art. 45 GDPR); EU-US Data "
                "Privacy Framework, under which Apple Inc. is certified\n",
                "- **Firebase Cloud Messaging (Google LLC):** United States, outside the EU/EEA\n",
            ],
        ),
        (
            "de",
            [
                "### Unsere Server\n\n- **Relay-Server:** Deutschland\n"
                "  - Daten: Registrierungen von Telefonen",
                "- **Gemeinsamer Arbeitsspeicher der Relay-Server (Redis), wenn das Relay als "
                "Verbund läuft:** Deutschland\n  - Daten: Aufenthaltsort von Verbindungen im "
                "Verbund; Gemeinsame Grenzen im Verbund\n",
                "- **Apple Push Notification Service (Apple Inc.):** Vereinigte Staaten, außerhalb "
                "der EU/des EWR\n  - Daten: Registrierungen von Telefonen und TK-Anlagen; Ihr "
                "SIP-Konto zur Registrierung in Ihrem Auftrag (SIPIS-Modus)\n"
                "  - Grundlage der Übermittlung: Angemessenheitsbeschluss der Europäischen "
                "Kommission (Art. 45 DSGVO); EU-US Data Privacy Framework, nach dem Apple Inc. "
                "zertifiziert ist\n",
            ],
        ),
    ],
)
def test_auerproxy_notice_says_where_servers_stand_and_what_leaves_the_eu(
    lang: str, expected: list[str]
) -> None:
    notice = render_notice(load_policy("auerproxy"), CONTROLLER, lang)
    start = notice.index(f"## {PLACES[lang]}\n")
    section = notice[start : notice.index("\n## ", start + 1)]
    for text in expected:
        assert text in section
    # The Sentry server is in Germany: no basis, because nothing is transferred.
    sentry = section[section.index("Sentry") :].split("\n- ")[0]
    assert "Basis" not in sentry
    assert "Grundlage" not in sentry


@pytest.mark.parametrize(
    ("lang", "servers", "basis"),
    [
        (
            "en",
            "- **Servers:** Servers of the push service in the EU — Germany; Servers of the "
            "push service in the USA — United States, outside the EU/EEA\n",
            "  - Basis of the transfer: standard contractual clauses (Art. 46(2)(c) GDPR); the "
            "clauses of Commission Implementing Decision (EU) 2021/914, agreed with the hosting "
            "provider\n",
        ),
        (
            "de",
            "- **Server:** Server des Push-Dienstes in der EU — Deutschland; Server des "
            "Push-Dienstes in den USA — Vereinigte Staaten, außerhalb der EU/des EWR\n",
            "  - Grundlage der Übermittlung: Standardvertragsklauseln (Art. 46 Abs. 2 lit. c "
            "DSGVO); die Klauseln des Durchführungsbeschlusses (EU) 2021/914 der Kommission, "
            "vereinbart mit dem Hosting-Anbieter\n",
        ),
    ],
)
def test_cloudsoftphone_notice_names_eu_and_us_servers_and_the_framework(
    lang: str, servers: str, basis: str
) -> None:
    policy = load_policy("cloudsoftphone")
    notice = render_notice(policy, CONTROLLER, lang)
    for name, category in policy.categories.items():
        if category.stored_at == ("redis",):  # a cluster's shared memory (test_policy)
            continue
        assert servers in category_section(policy, notice, name, lang), name
    assert basis in sections(notice)[{"en": "Our servers", "de": "Unsere Server"}[lang]]
    recipients = sections(notice)[{"en": "Other recipients", "de": "Weitere Empfänger"}[lang]]
    assert recipients.count("EU-US Data Privacy Framework") == 2


@pytest.mark.parametrize("lang", LANGUAGES)
def test_a_policy_that_keeps_everything_in_the_eea_says_no_data_leaves(lang: str) -> None:
    policy = load_policy("auerproxy")
    in_france = {
        name: replace(site, country="FR", transfer=None) for name, site in policy.recipients.items()
    }
    notice = render_notice(replace(policy, recipients=in_france), CONTROLLER, lang)
    intro = sections(notice)[PLACES[lang]]
    assert {
        "en": "No data leaves the EU and the European Economic Area (EU/EEA).",
        "de": "Keine Daten verlassen die EU und den Europäischen Wirtschaftsraum (EU/EWR).",
    }[lang] in intro
    assert {"en": "outside the EU/EEA", "de": "außerhalb der EU/des EWR"}[lang] not in notice


def _controller_section(tmp_path: Path, body: str) -> Section:
    path = tmp_path / "softrelay.toml"
    path.write_text(body, encoding="utf-8")
    return load_toml(path).section("controller")


AUTHORITY = """[controller]
name = "Example Telecom GmbH"

[controller.supervisory_authority]
name = "Die Landesbeauftragte für den Datenschutz Niedersachsen"
address = "Prinzenstraße 5\\n30159 Hannover"
email = "poststelle@lfd.niedersachsen.de"
"""


def test_the_authority_is_read_from_the_controller_table(tmp_path: Path) -> None:
    controller = parse_controller(_controller_section(tmp_path, AUTHORITY))
    assert controller.supervisory_authority == SupervisoryAuthority(
        name="Die Landesbeauftragte für den Datenschutz Niedersachsen",
        address="Prinzenstraße 5\n30159 Hannover",
        email="poststelle@lfd.niedersachsen.de",
    )


@pytest.mark.parametrize("lang", LANGUAGES)
def test_without_an_authority_the_notice_still_states_the_right_to_complain(
    tmp_path: Path, lang: str
) -> None:
    controller = parse_controller(_controller_section(tmp_path, "[controller]\n"))
    assert controller.supervisory_authority is None
    notice = render_notice(load_policy("auerproxy"), controller, lang)
    law = {"en": "GDPR", "de": "DSGVO"}[lang]
    complaint = next(body for h, body in sections(notice).items() if h.endswith(f"(Art. 77 {law})"))
    assert {"en": "in particular in the EU member state", "de": "insbesondere in dem"}[
        lang
    ] in complaint
    assert {"en": "responsible for us", "de": "für uns zuständige"}[lang] not in complaint


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        ('email = "poststelle', 'fax = "0511"\nemail = "poststelle', "fax", "unknown key"),
        ("poststelle@lfd.niedersachsen.de", "poststelle at lfd", "email", "an e-mail address"),
        (
            'email = "poststelle@lfd.niedersachsen.de"\n',
            'website = "http://www.lfd.niedersachsen.de"\n',
            "website",
            "an https:// address",
        ),
        (
            'email = "poststelle@lfd.niedersachsen.de"\n',
            'phone = "call us"\n',
            "phone",
            "a phone number",
        ),
        ('email = "poststelle@lfd.niedersachsen.de"\n', "", "", "no way to reach the authority"),
        ('name = "Die Landesbeauftragte', 'title = "Die Landesbeauftragte', "name", "missing"),
        ('address = "Prinzenstraße 5\\n30159 Hannover"\n', "", "address", "missing"),
    ],
)
def test_a_bad_authority_names_file_and_key(
    tmp_path: Path, old: str, new: str, key: str, message: str
) -> None:
    assert old in AUTHORITY
    sec = _controller_section(tmp_path, AUTHORITY.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        parse_controller(sec)
    assert caught.value.file == str(tmp_path / "softrelay.toml")
    prefix = "controller.supervisory_authority"
    assert caught.value.key == (f"{prefix}.{key}" if key else prefix)
    assert message in str(caught.value)


def test_the_authority_as_one_string_is_refused_with_the_key(tmp_path: Path) -> None:
    sec = _controller_section(
        tmp_path, '[controller]\nsupervisory_authority = "the authority of your country"\n'
    )
    with pytest.raises(ConfigError, match="expected a table") as caught:
        parse_controller(sec)
    assert caught.value.key == "controller.supervisory_authority"


def test_the_sample_configuration_names_an_authority() -> None:
    config = load_config(DEFAULT_CONFIG)
    authority = config.controller.supervisory_authority
    assert authority is not None
    assert authority.name == "Die Landesbeauftragte für den Datenschutz Niedersachsen"
    assert authority.address == "Prinzenstraße 5\n30159 Hannover"


@pytest.mark.parametrize(
    ("profile", "lines"),
    [
        (
            "auerproxy",
            [
                "Locations: relay (DE), redis (DE)",
                "Recipients: sentry (DE), apns (US, adequacy_decision), "
                "fcm (US, adequacy_decision)",
            ],
        ),
        (
            "cloudsoftphone",
            [
                "Locations: eu (DE), us (US, standard_contractual_clauses), redis (DE)",
                "Recipients: apns (US, adequacy_decision), fcm (US, adequacy_decision)",
            ],
        ),
    ],
)
def test_policy_table_names_the_countries_and_transfer_bases(
    profile: str, lines: list[str]
) -> None:
    table = policy_table(load_policy(profile)).splitlines()
    for line in lines:
        assert line in table
    assert "registration         database  after last use 12mo" in table

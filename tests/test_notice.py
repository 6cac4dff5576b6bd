"""The privacy notice and the policy table say what the loaded policy declares."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from privacy.notice import _TEXTS, Controller, policy_table, render_notice
from privacy.policy import LANGUAGES, Category, Policy, Rule, load_policy

PROFILES = ("auerproxy", "cloudsoftphone")
CONTROLLER = Controller(
    name="Example Telecom GmbH",
    address="Musterstraße 1\n10115 Berlin",
    email="privacy@example.com",
    dpo_name="Erika Mustermann",
    dpo_email="dpo@example.com",
    supervisory_authority="Berliner Beauftragte für Datenschutz und Informationsfreiheit",
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


def expected_retention(category: Category, lang: str) -> str:
    retention = category.retention
    if retention.rule is Rule.MEMORY_ONLY:
        return {
            "en": "memory only, deleted right after forwarding",
            "de": "nur im Arbeitsspeicher, gelöscht direkt nach der Weiterleitung",
        }[lang]
    assert retention.seconds % 86400 == 0, "the shipped profiles declare whole days"
    days = retention.seconds // 86400
    one = days == 1
    phrases = {
        ("en", Rule.AFTER_LAST_USE): f"deleted {days} {'day' if one else 'days'} after last use",
        (
            "en",
            Rule.AFTER_CREATED,
        ): f"deleted {days} {'day' if one else 'days'} after it was stored",
        ("en", Rule.LOG_ROTATION): f"log files deleted after {days} {'day' if one else 'days'}",
        (
            "de",
            Rule.AFTER_LAST_USE,
        ): f"gelöscht {days} {'Tag' if one else 'Tage'} nach der letzten Nutzung",
        (
            "de",
            Rule.AFTER_CREATED,
        ): f"gelöscht {days} {'Tag' if one else 'Tage'} nach der Speicherung",
        (
            "de",
            Rule.LOG_ROTATION,
        ): f"Protokolldateien gelöscht nach {days} {'Tag' if one else 'Tagen'}",
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
        assert expected_retention(category, lang) in section, category.name
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
    assert CONTROLLER.supervisory_authority in complaint


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
        # Not rounded down to "1 day": the notice must not promise a shorter retention.
        ("registration", "36h", "en", "deleted 36 hours after last use"),
        ("registration", "36h", "de", "gelöscht 36 Stunden nach der letzten Nutzung"),
        ("registration", "1h", "en", "deleted 1 hour after last use"),
        ("push_log", "1d", "en", "log files deleted after 1 day"),
        ("push_log", "1d", "de", "Protokolldateien gelöscht nach 1 Tag"),
        ("push_log", "2d", "de", "Protokolldateien gelöscht nach 2 Tagen"),
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
    assert phrase in category_section(policy, notice, category, lang)


def test_every_language_has_the_same_texts() -> None:
    assert set(_TEXTS) == set(LANGUAGES)
    for lang, texts in _TEXTS.items():
        assert set(texts) == set(_TEXTS["en"]), lang


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

"""The policy compiles at load: a declaration that cannot work stops the start with an
error naming the file and the key; a deployment may tighten a profile, never loosen it."""

from __future__ import annotations

from pathlib import Path

import pytest

from privacy.policy import PROFILES_DIR, Rule, Storage, TransferBasis, Unit, load_policy
from tests.conftest import PROFILES
from tomlsections.reader import ConfigError

# The rows of DESIGN.md's data-path table, which both profiles must implement.
DESIGN_TABLE = {
    "registration": (Storage.DATABASE, Rule.AFTER_LAST_USE, 365),
    "relay": (Storage.MEMORY, Rule.MEMORY_ONLY, 0),
    "debug": (Storage.DATABASE, Rule.AFTER_CREATED, 28),
    "provisioning_log": (Storage.DATABASE, Rule.AFTER_CREATED, 365),
    "troubleshooting_log": (Storage.LOG, Rule.LOG_ROTATION, 7),
    "crash_report": (Storage.DATABASE, Rule.AFTER_CREATED, 90),
    "push_log": (Storage.LOG, Rule.LOG_ROTATION, 7),
    "usage": (Storage.DATABASE, Rule.AFTER_CREATED, None),
}
ACCOUNT_DAYS = {"auerproxy": 365, "cloudsoftphone": 7}


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_implements_every_row_of_the_design_table(profile: str) -> None:
    policy = load_policy(profile)
    for name, (storage, rule, days) in DESIGN_TABLE.items():
        cat = policy.categories[name]
        assert (cat.storage, cat.retention.rule) == (storage, rule), name
        if days is not None:
            assert cat.retention.seconds == days * 86400, name
    assert policy.categories["account"].retention.seconds == ACCOUNT_DAYS[profile] * 86400
    registration = policy.categories["registration"]
    assert {"password", "authorization", "digest_response"} <= registration.never_stored
    for encrypted in ("sip_username", "push_token", "phone_ip", "pbx_ip"):
        assert registration.fields[encrypted].protection == "encrypted"
    assert policy.categories["provisioning_log"].fields["ip_prefix"].protection == "anonymised"
    assert {"push_token", "payload"} <= policy.categories["push_log"].never_stored


# SIPIS mode's account: deleted this many days after the app's last contact.
SIP_ACCOUNT_DAYS = {"auerproxy": 30, "cloudsoftphone": 7}


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_declares_the_sipis_account_and_its_waiting_messages(profile: str) -> None:
    """The credential (HA1s), user names and push token are encrypted; the password, the
    Authorization header and the device secret itself are never stored; the account goes
    after the app's silence, a waiting message after 7 days at most."""
    policy = load_policy(profile)
    account = policy.categories["sip_account"]
    assert (account.storage, account.retention.rule) == (Storage.DATABASE, Rule.AFTER_LAST_USE)
    assert account.retention.seconds == SIP_ACCOUNT_DAYS[profile] * 86400
    assert account.key == ("account_id",)
    assert account.subject == ("sip_username", "pbx_serial")
    for name in ("ha1_md5", "ha1_sha256", "sip_username", "auth_user", "push_token"):
        assert account.fields[name].protection == "encrypted", name
    assert account.fields["secret_hash"].protection == "plain"
    assert {"password", "sip_password", "authorization", "device_secret"} <= account.never_stored
    message = policy.categories["pending_message"]
    assert (message.storage, message.retention.rule) == (Storage.DATABASE, Rule.AFTER_CREATED)
    assert message.retention.seconds == 7 * 86400
    assert message.subject == ("sip_username", "pbx_serial")
    for name in ("body", "sender", "sip_username"):
        assert message.fields[name].protection == "encrypted", name
    assert {"sender_name", "sip_message"} <= message.never_stored


def _override(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tighten.toml"
    path.write_text(text)
    return path


def test_deployment_may_shorten_a_retention(tmp_path: Path) -> None:
    path = _override(tmp_path, '[categories.registration]\nretention = { duration = "90d" }\n')
    policy = load_policy("auerproxy", path)
    assert policy.categories["registration"].retention.seconds == 90 * 86400
    assert policy.categories["registration"].retention.rule is Rule.AFTER_LAST_USE


def test_deployment_may_not_lengthen_a_retention(tmp_path: Path) -> None:
    path = _override(tmp_path, '[categories.crash_report]\nretention = { duration = "91d" }\n')
    with pytest.raises(ConfigError) as caught:
        load_policy("auerproxy", path)
    assert caught.value.file == str(path)
    assert caught.value.key == "categories.crash_report.retention.duration"
    assert "not lengthen" in str(caught.value)


def test_deployment_may_add_but_not_remove_never_stored_names(tmp_path: Path) -> None:
    path = _override(tmp_path, '[categories.debug]\nnever_stored = ["destination_number"]\n')
    policy = load_policy("auerproxy", path)
    assert {"destination_number", "password"} <= policy.categories["debug"].never_stored
    # There is no key to remove one: any other key is refused.
    path = _override(tmp_path, '[categories.debug]\nallow_stored = ["password"]\n')
    with pytest.raises(ConfigError, match=r"categories\.debug\.allow_stored: unknown key"):
        load_policy("auerproxy", path)


def test_deployment_may_not_forbid_a_field_the_code_needs_nor_invent_a_category(
    tmp_path: Path,
) -> None:
    path = _override(tmp_path, '[categories.debug]\nnever_stored = ["destination_name"]\n')
    with pytest.raises(ConfigError, match="declared field"):
        load_policy("auerproxy", path)
    path = _override(tmp_path, '[categories.shopping]\nnever_stored = ["x"]\n')
    with pytest.raises(ConfigError, match="not in profile"):
        load_policy("auerproxy", path)


def _broken_profile(tmp_path: Path, old: str, new: str) -> Path:
    """The auerproxy profile with every occurrence of `old` replaced (a recipient left
    unnamed must be left so by every category that names it)."""
    text = (PROFILES_DIR / "auerproxy.toml").read_text()
    assert old in text
    path = tmp_path / "broken.toml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        ('storage = "memory"', 'storage = "cloud"', "categories.relay.storage", "must be one of"),
        (
            'duration = "4w"',
            'duration = "four weeks"',
            "categories.debug.retention.duration",
            "duration",
        ),
        (
            'legal_basis = "Art. 6(1)(a) GDPR"\n',
            "",
            "categories.crash_report.legal_basis",
            "missing",
        ),
        (
            'never_stored = ["digest_nonce", "sip_body"]',
            'never_stored = ["phone_ip"]',
            "categories.registration.fields.phone_ip",
            "also declared never stored",
        ),
        ('"password", "passwd", ', '"passwd", ', "policy.never_stored", "no password, ever"),
        (
            'rights = ["access", "erasure", "restriction", "objection"]',
            'rights = ["fun"]',
            "categories.debug.rights",
            "unknown right",
        ),
        (
            'storage = "log"',
            'storage = "log"\ncolour = "red"',
            "categories.troubleshooting_log.colour",
            "unknown key",
        ),
        (
            'retention = { rule = "after_created", duration = "90d" }',
            'retention = { rule = "log_rotation", duration = "90d" }',
            "categories.crash_report.retention.rule",
            "does not fit",
        ),
    ],
)
def test_malformed_profile_names_file_and_key(
    tmp_path: Path, old: str, new: str, key: str, message: str
) -> None:
    path = _broken_profile(tmp_path, old, new)
    with pytest.raises(ConfigError) as caught:
        load_policy(str(path))
    assert caught.value.file == str(path)
    assert caught.value.key == key
    assert message in str(caught.value)


_NOT_EXPORTED = "export = false: only fields of a subject's records are exported"
_NOT_A_SUBJECT = "only a stored category that names a subject is exported"


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        # A field withheld from an access export where no export ever shows it: a log
        # category, and a stored category that names no subject.
        (
            'route = { type = "text", protection = "plain", label',
            'route = { type = "text", protection = "plain", export = false, label',
            "categories.troubleshooting_log.fields.route",
            _NOT_EXPORTED,
        ),
        (
            'event_id = { type = "text", protection = "plain", lookup = true, label',
            'event_id = { type = "text", protection = "plain", lookup = true, export = false,'
            " label",
            "categories.crash_report.fields.event_id",
            _NOT_EXPORTED,
        ),
        # A category's export form: one of the two, and only where a subject's records are.
        (
            'export = "count"',
            'export = "everything"',
            "categories.pending_message.export",
            "must be one of records, count, got 'everything'",
        ),
        (
            "[categories.crash_report]\n",
            '[categories.crash_report]\nexport = "count"\n',
            "categories.crash_report.export",
            _NOT_A_SUBJECT,
        ),
        (
            "[categories.relay]\n",
            '[categories.relay]\nexport = "count"\n',
            "categories.relay.export",
            _NOT_A_SUBJECT,
        ),
    ],
)
def test_an_export_attribute_that_cannot_work_names_file_and_key(
    tmp_path: Path, old: str, new: str, key: str, message: str
) -> None:
    """`export = false` on a field, and a category's `export` form, are refused at load
    where an access export would never apply them, with the exact file, key and reason."""
    path = _broken_profile(tmp_path, old, new)
    with pytest.raises(ConfigError) as caught:
        load_policy(str(path))
    assert (caught.value.file, caught.value.key) == (str(path), key)
    assert str(caught.value) == f"{path}: {key}: {message}"


def test_not_toml_at_all_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[policy\nprofile = ")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_policy(str(path))
    assert caught.value.file == str(path)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="auerproxy, cloudsoftphone"):
        load_policy("nosuchprofile")


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        # A typo for the United Kingdom, whose ISO code is GB.
        ('country = "DE"', 'country = "UK"', "locations.relay.country", "not an ISO 3166-1"),
        ('country = "DE"', 'country = "de"', "locations.relay.country", "not an ISO 3166-1"),
        # A server outside the EU/EEA with no basis for sending data there.
        (
            'country = "DE"',
            'country = "SG"',
            "locations.relay.transfer",
            "SG is outside the EU/EEA",
        ),
        # A basis named for a country where the GDPR applies would mislead the reader.
        (
            'country = "DE"',
            'country = "DE"\ntransfer = { basis = "standard_contractual_clauses" }',
            "locations.relay.transfer",
            "DE is in the EU/EEA",
        ),
        (
            'transfer = { basis = "adequacy_decision", detail = { en = "EU-US Data Privacy '
            'Framework, under which Apple Inc. is certified", de = "EU-US Data Privacy '
            'Framework, nach dem Apple Inc. zertifiziert ist" } }',
            'transfer = { basis = "adequacy_decision" }',
            "recipients.apns.transfer.detail",
            "covers only some organisations",
        ),
        (
            'country = "US"\ntransfer = { basis = "adequacy_decision"',
            'country = "CN"\ntransfer = { basis = "adequacy_decision"',
            "recipients.apns.transfer.basis",
            "no adequacy decision for CN",
        ),
        (
            'transfer = { basis = "adequacy_decision"',
            'transfer = { basis = "trust_us"',
            "recipients.apns.transfer.basis",
            "must be one of adequacy_decision, standard_contractual_clauses",
        ),
        (
            'country = "US"\ntransfer = { basis = "adequacy_decision"',
            'country = "US"\nowner = "Apple"\ntransfer = { basis = "adequacy_decision"',
            "recipients.apns.owner",
            "unknown key",
        ),
        (
            'sent_to = ["apns", "fcm"]',
            'sent_to = ["apns", "fcm", "hms"]',
            "categories.registration.sent_to",
            "names 'hms', which is not in [recipients]",
        ),
        (
            'sent_to = ["apns", "fcm"]',
            'sent_to = ["apns"]',
            "recipients.fcm",
            "no category names it in sent_to",
        ),
        (
            'storage = "memory"\nstored_at = ["relay"]',
            'storage = "memory"\nstored_at = []',
            "categories.relay.stored_at",
            "names no location",
        ),
        (
            'storage = "memory"\nstored_at = ["relay"]',
            'storage = "memory"\nstored_at = ["relay", "relay"]',
            "categories.relay.stored_at",
            "names a place twice",
        ),
        (
            'duration = "4w"',
            'duration = "4 fortnights"',
            "categories.debug.retention.duration",
            "'12mo'",
        ),
        (
            'duration = "4w"',
            'duration = "0mo"',
            "categories.debug.retention.duration",
            "longer than zero",
        ),
    ],
)
def test_malformed_locations_transfers_and_periods_name_file_and_key(
    tmp_path: Path, old: str, new: str, key: str, message: str
) -> None:
    path = _broken_profile(tmp_path, old, new)
    with pytest.raises(ConfigError) as caught:
        load_policy(str(path))
    assert caught.value.file == str(path)
    assert caught.value.key == key
    assert message in str(caught.value)


def test_a_profile_without_locations_does_not_load(tmp_path: Path) -> None:
    text = (PROFILES_DIR / "auerproxy.toml").read_text()
    path = tmp_path / "no-locations.toml"
    for name in ("relay", "redis"):
        text = text.replace(f"[locations.{name}]", f"[elsewhere.{name}]", 1)
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_policy(str(path))
    assert (caught.value.file, caught.value.key) == (str(path), "locations")


@pytest.mark.parametrize(
    ("profile", "locations", "recipients"),
    [
        # Auerswald: relay (and its Sentry) in Germany, Apple's and Google's push in the USA;
        # a cluster's shared memory (Redis) beside the relay.
        ("auerproxy", {"relay": "DE", "redis": "DE"}, {"sentry": "DE", "apns": "US", "fcm": "US"}),
        # Acrobits: servers in the EU and in the USA; a cluster's Redis in the EU.
        ("cloudsoftphone", {"eu": "DE", "us": "US", "redis": "DE"}, {"apns": "US", "fcm": "US"}),
    ],
)
def test_profiles_name_their_countries_and_every_transfer_has_a_basis(
    profile: str, locations: dict[str, str], recipients: dict[str, str]
) -> None:
    policy = load_policy(profile)
    assert {n: s.country for n, s in policy.locations.items()} == locations
    assert {n: s.country for n, s in policy.recipients.items()} == recipients
    for site in (*policy.locations.values(), *policy.recipients.values()):
        assert (site.transfer is None) == (site.country == "DE"), site.name
    for push in ("apns", "fcm"):
        transfer = policy.recipients[push].transfer
        assert transfer is not None
        assert transfer.basis is TransferBasis.ADEQUACY_DECISION
        assert "EU-US Data Privacy Framework" in transfer.detail["en"]
        assert "EU-US Data Privacy Framework" in transfer.detail["de"]
    registration = policy.categories["registration"]
    assert registration.sent_to == ("apns", "fcm")
    assert registration.stored_at == tuple(name for name in locations if name != "redis")
    # What the cluster's nodes share lives in Redis's memory alone.
    for shared in ("location", "cluster_limits"):
        assert policy.categories[shared].stored_at == ("redis",)
        assert policy.categories[shared].retention.period is None
    if profile == "cloudsoftphone":
        us = policy.locations["us"].transfer
        assert us is not None
        assert us.basis is TransferBasis.STANDARD_CONTRACTUAL_CLAUSES


@pytest.mark.parametrize(
    ("written", "unit", "seconds"),
    [
        ("12mo", Unit.MONTH, 365 * 86400),
        ("1y", Unit.YEAR, 365 * 86400),
        ("4w", Unit.WEEK, 28 * 86400),
        ("90d", Unit.DAY, 90 * 86400),
        ("36h", Unit.HOUR, 36 * 3600),
        ("90m", Unit.MINUTE, 90 * 60),
    ],
)
def test_a_period_keeps_the_unit_it_was_written_in(
    tmp_path: Path, written: str, unit: Unit, seconds: int
) -> None:
    # The profile's registration is "12mo" (365 days): every period here is at most that.
    path = _override(
        tmp_path, f'[categories.registration]\nretention = {{ duration = "{written}" }}\n'
    )
    retention = load_policy("auerproxy", path).categories["registration"].retention
    assert retention.period is not None
    assert (retention.period.unit, retention.seconds, str(retention.period)) == (
        unit,
        seconds,
        written,
    )


def test_twelve_months_are_the_365_days_the_sweeper_always_kept() -> None:
    policy = load_policy("auerproxy")
    assert str(policy.categories["registration"].retention.period) == "12mo"
    assert policy.categories["registration"].retention.seconds == 365 * 86400
    assert str(policy.categories["usage_count"].retention.period) == "10y"
    assert policy.categories["usage_count"].retention.seconds == 3650 * 86400


def test_a_longer_period_in_another_unit_is_still_refused(tmp_path: Path) -> None:
    # 53 weeks is 371 days: longer than the profile's 12 months (365 days).
    path = _override(tmp_path, '[categories.registration]\nretention = { duration = "53w" }\n')
    with pytest.raises(ConfigError, match="retention of 12mo but not lengthen it to 53w"):
        load_policy("auerproxy", path)
    path = _override(tmp_path, '[categories.registration]\nretention = { duration = "52w" }\n')
    assert load_policy("auerproxy", path).categories["registration"].retention.seconds == (
        364 * 86400
    )

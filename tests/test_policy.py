"""The policy compiles at load: a declaration that cannot work stops the start with an
error naming the file and the key; a deployment may tighten a profile, never loosen it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tomlsections.reader import ConfigError
from privacy.policy import PROFILES_DIR, Rule, Storage, load_policy
from tests.conftest import PROFILES

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
    text = (PROFILES_DIR / "auerproxy.toml").read_text()
    assert old in text
    path = tmp_path / "broken.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        ('storage = "memory"', 'storage = "cloud"', "categories.relay.storage", "must be one of"),
        (
            'duration = "28d"',
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


def test_not_toml_at_all_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[policy\nprofile = ")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_policy(str(path))
    assert caught.value.file == str(path)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="auerproxy, cloudsoftphone"):
        load_policy("nosuchprofile")

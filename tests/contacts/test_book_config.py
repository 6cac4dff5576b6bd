"""`[contacts]` in softrelay.toml reaches the app: its limits are the book's, a bad key
is named with its file, `enabled = false` leaves no contacts route, and the shipped
sample's commented keys are the parser's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from push.apps import PushSettings
from softrelay.app import Services, build_app
from softrelay.config import load_config
from tomlsections.reader import ConfigError

SAMPLE = Path(__file__).parents[2] / "config" / "softrelay.toml"


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "softrelay.toml"
    path.write_text(body, encoding="utf-8")
    return path


def test_the_contacts_section_is_parsed_into_the_config(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[contacts]\nmax_book_bytes = 8192\nmax_chunk_bytes = 2048\nupload_ttl = "10m"\n',
    )
    contacts = load_config(path, read_secrets=False).contacts
    assert (contacts.max_book_bytes, contacts.max_chunk_bytes, contacts.upload_ttl) == (
        8192,
        2048,
        600,
    )
    assert contacts.enabled


def test_a_bad_contacts_key_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = _config(tmp_path, "[contacts]\nmax_book_byte = 8192\n")
    with pytest.raises(ConfigError, match=r"softrelay\.toml.*contacts\.max_book_byte"):
        load_config(path, read_secrets=False)
    path = _config(tmp_path, "[contacts]\nmax_book_bytes = 2048\nmax_chunk_bytes = 4096\n")
    with pytest.raises(ConfigError, match=r"contacts\.max_chunk_bytes"):
        load_config(path, read_secrets=False)


def test_the_sample_names_every_key_and_each_parses(tmp_path: Path) -> None:
    """The commented block of config/softrelay.toml, uncommented, loads as written."""
    text = SAMPLE.read_text(encoding="utf-8")
    block = text[text.index("# [contacts]") : text.index("# [cluster]")]
    keys = re.findall(r"^# ([a-z_]+ = .+)$", block, re.MULTILINE)
    assert len(keys) == 11
    body = "[contacts]\n" + "\n".join(line.split("  #")[0] for line in keys) + "\n"
    assert load_config(_config(tmp_path, body), read_secrets=False).contacts == (
        load_config(_config(tmp_path, ""), read_secrets=False).contacts
    )


@pytest.mark.parametrize("enabled", [True, False])
def test_the_routes_are_there_only_when_enabled(tmp_path: Path, enabled: bool) -> None:
    path = _config(tmp_path, f"[contacts]\nenabled = {str(enabled).lower()}\n")
    config = load_config(path, read_secrets=False)
    services = Services(
        load_policy("cloudsoftphone"),
        Keyring.generate(),
        tmp_path,
        ManualClock(0.0),
        sweep_interval=3600,
        push=PushSettings(apps=(), max_in_flight=1, max_attempts=1, embedded_app_id="com.t"),
        contacts=config.contacts,
    )
    paths = {r.resource.canonical for r in build_app(services).router.routes() if r.resource}
    contacts = {p for p in paths if p.startswith("/contacts/")}
    assert bool(contacts) is enabled
    if enabled:
        assert {
            "/contacts/v1/book",
            "/contacts/v1/devices",
            "/contacts/v1/book/uploads",
        } <= contacts

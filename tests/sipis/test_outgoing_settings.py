"""`[sipis] wake_timeout`: parsed with its bounds, and the time the app's calls wait for
a sleeping app (sipis/calls.py CallSettings) in the whole app."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from push.apps import PushSettings
from push.fakes.certs import ThrowawayCa
from sipis.settings import SipisSettings, parse_sipis
from softrelay.app import SIPIS_CALLS, Services, build_app
from tests.sipis.test_accounts import Registered
from tomlsections.reader import ConfigError, Section

FILE = Path("softrelay.toml")


def sipis(**keys: object) -> SipisSettings:
    return parse_sipis(Section(dict(keys), FILE, "sipis"))


def test_wake_timeout_defaults_to_two_minutes_and_takes_durations() -> None:
    assert sipis().wake_timeout == 120.0
    assert sipis(wake_timeout="45s").wake_timeout == 45.0
    assert sipis(wake_timeout="5s").wake_timeout == 5.0
    assert sipis(wake_timeout="10m").wake_timeout == 600.0


@pytest.mark.parametrize("value", ["4s", "11m", "0s"])
def test_wake_timeout_out_of_bounds_names_the_file_and_key(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        sipis(wake_timeout=value)
    text = str(raised.value)
    assert "softrelay.toml" in text
    assert "sipis.wake_timeout" in text
    assert "between 5s and 10m" in text


async def test_the_app_waits_the_configured_wake_timeout(tmp_path: Path) -> None:
    registrar = Registered()
    services = Services(
        load_policy("cloudsoftphone"),
        Keyring.generate(),
        tmp_path,
        ManualClock(1_772_366_400.0),
        sweep_interval=3600,
        push=PushSettings(
            apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.example.phone"
        ),
        sipis=SipisSettings(enabled=True, wake_timeout=45.0),
        sipis_registrar=registrar.opened,
    )
    app = build_app(services)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        assert app[SIPIS_CALLS].settings.wake_timeout == 45.0
    finally:
        await server.close()


def test_registrar_ca_is_loaded_at_start_and_a_bad_one_names_the_key(tmp_path: Path) -> None:
    """`[sipis] registrar_ca`: a provider's private CA for TLS; a file that holds no PEM
    CA stops the start with the file and key named, not at the first REGISTER."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"sipis\.registrar_ca.*holds no usable PEM CA"):
        sipis(registrar_ca=str(bad))
    assert sipis().registrar_ca is None
    good = tmp_path / "good.pem"
    good.write_bytes(ThrowawayCa.create(tmp_path / "ca").cert_pem)
    assert sipis(registrar_ca=str(good)).registrar_ca == good

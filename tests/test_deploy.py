"""deploy/: the production configuration loads through the real loader with every
secret it names; each credential it names is one the systemd unit loads, and the unit
is hardened, sized and timed as its comments say; `systemd-analyze` accepts it."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from dsr.api import load_admin_token
from dsr.service import check_dsr
from privacy.keys import Keyring, load_keyring, write_keyring
from privacy.policy import load_policy
from softrelay.config import Config, load_config
from tests.limits import in_ci
from tomlsections.reader import ConfigError

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CREDENTIALS = "/run/credentials/softrelay.service/"
UNIT_CONFIG = "/etc/softrelay/softrelay.toml"
STATE = "/var/lib/softrelay"


def _unit() -> dict[str, list[str]]:
    """The [Service] section of the unit: each key with its values, in order."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in (DEPLOY / "softrelay.service").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def _one(unit: dict[str, list[str]], key: str) -> str:
    (value,) = unit[key]
    return value


def _credentials_of_unit() -> dict[str, str]:
    """LoadCredential=ID:PATH lines: ID -> PATH."""
    return dict(line.split(":", 1) for line in _unit()["LoadCredential"])


def _credentials_of_config() -> set[str]:
    text = (DEPLOY / "softrelay.toml").read_text(encoding="utf-8")
    return set(re.findall(re.escape(CREDENTIALS) + r'([^"/]+)"', text))


def _secret_values() -> dict[str, str]:
    """A value for each credential, of the form its key asks for."""
    service_account = {"type": "service_account", "project_id": "example-phone"}
    return {
        "pbx-0042137.secret": "pbx-secret-0042137-from-credential",
        "sip-tls.key": "-----BEGIN PRIVATE KEY-----\n(test)\n-----END PRIVATE KEY-----\n",
        "apns-KEY1234567.p8": "-----BEGIN PRIVATE KEY-----\n(apns)\n-----END PRIVATE KEY-----\n",
        "fcm-service-account.json": json.dumps(service_account),
        "oauth-google.secret": "google-client-secret-from-credential",
        "usage-acme.key": "usage-key-for-acme-from-credential",
        "metrics.token": "metrics-token-from-credential",
        "dsr-admin.token": "dsr-admin-token-from-credential",
    }


def _deployed(tmp_path: Path) -> tuple[Path, Path]:
    """deploy/softrelay.toml with its absolute paths moved under tmp_path, and every
    file it names there: the credentials, the certificate chain, the keyring. Returns
    the config and the state directory."""
    credentials, etc, state = tmp_path / "credentials", tmp_path / "etc", tmp_path / "state"
    text = (DEPLOY / "softrelay.toml").read_text(encoding="utf-8")
    text = text.replace(CREDENTIALS, f"{credentials}/").replace("/etc/softrelay/", f"{etc}/")
    text = text.replace(f'"{STATE}"', f'"{state}"')
    # Every path the configuration names now lies under tmp_path.
    paths = re.findall(r'^[^#\n]*?"(?:file:)?(/[^"]*)"', text, re.MULTILINE)
    assert len(paths) >= len(_secret_values()) + 3  # the credentials, keyring, chain, state
    for value in paths:
        assert Path(value).is_relative_to(tmp_path), value
    credentials.mkdir(mode=0o700)
    for name, value in _secret_values().items():
        (credentials / name).write_text(value, encoding="utf-8")
        (credentials / name).chmod(0o600)
    (etc / "tls").mkdir(parents=True)
    (etc / "tls" / "sip-chain.pem").write_text("(certificate chain)\n", encoding="utf-8")
    (etc / "keys").mkdir(mode=0o700)
    write_keyring(Keyring.generate(), etc / "keys" / "keyring.json")
    config = tmp_path / "softrelay.toml"
    config.write_text(text, encoding="utf-8")
    return config, state


def test_every_credential_the_config_names_is_loaded_by_the_unit() -> None:
    unit = _credentials_of_unit()
    assert _credentials_of_config() == set(unit) == set(_secret_values())
    for name, source in unit.items():
        assert source == f"/etc/softrelay/credentials/{name}"


def test_production_config_loads_with_every_secret_it_names(tmp_path: Path) -> None:
    """The real loader, every secret read (as `serve` reads them at start), then what
    `serve` reads apart: the policy, the DSR checks and admin token, the keyring."""
    path, state = _deployed(tmp_path)
    config: Config = load_config(path)
    secrets = _secret_values()
    assert config.data_dir == state
    assert config.sip.pbxs[0].secret == secrets["pbx-0042137.secret"]
    assert config.sip.tls_key == tmp_path / "credentials" / "sip-tls.key"
    assert config.oauth.providers[0].client_secret == secrets["oauth-google.secret"]
    assert config.usage.tenants[0].key == secrets["usage-acme.key"]
    assert config.metrics_token == secrets["metrics.token"]
    (app,) = config.push.apps
    assert app.apns is not None
    assert app.apns.key_pem == secrets["apns-KEY1234567.p8"]
    assert app.fcm is not None
    assert app.fcm.project_id == "example-phone"
    assert not config.log_console, "the journal would keep log lines past their rotation"
    policy = load_policy(config.profile, config.policy_override)
    check_dsr(config.dsr, policy, str(path))
    assert load_admin_token(config.dsr.admin_token) == secrets["dsr-admin.token"]
    load_keyring(config.keyring, config.data_dir)


def test_a_missing_credential_stops_the_load_naming_file_and_key(tmp_path: Path) -> None:
    path, _ = _deployed(tmp_path)
    (tmp_path / "credentials" / "usage-acme.key").unlink()
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: usage\.tenant\[0\]\.key: "):
        load_config(path)


def test_unit_runs_serve_as_its_own_user_on_the_config_and_state_directory() -> None:
    unit = _unit()
    assert _one(unit, "User") == _one(unit, "Group") == "softrelay"
    assert _one(unit, "ExecStart").split()[1:] == ["--config", UNIT_CONFIG, "serve"]
    assert f"/var/lib/{_one(unit, 'StateDirectory')}" == STATE
    assert _one(unit, "StateDirectoryMode") == "0700"
    assert f'data_dir = "{STATE}"' in (DEPLOY / "softrelay.toml").read_text(encoding="utf-8")


def test_unit_is_hardened() -> None:
    unit = _unit()
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",  # every port is above 1023
        "AmbientCapabilities": "",
        "UMask": "0077",
        "Restart": "on-failure",
    }
    assert {key: _one(unit, key) for key in expected} == expected


def test_unit_gives_the_shutdown_its_time_and_the_connections_their_descriptors(
    tmp_path: Path,
) -> None:
    """SIGTERM, then more than aiohttp's wait for HTTP handlers (`serve` keeps its
    default) before a kill; more descriptors than the configured connections."""
    unit = _unit()
    assert _one(unit, "KillSignal") == "SIGTERM"
    stop = _one(unit, "TimeoutStopSec")
    assert stop.endswith("s")
    handlers_wait = inspect.signature(web.BaseRunner).parameters["shutdown_timeout"].default
    assert int(stop.removesuffix("s")) >= handlers_wait + 30
    config = load_config(_deployed(tmp_path)[0])
    connections = config.sip.limits.max_connections + config.http.max_connections
    assert int(_one(unit, "LimitNOFILE")) >= connections + 4096


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if in_ci():
            pytest.fail("systemd-analyze is missing (Debian: systemd); .ci/run installs it")
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    return found


def _unit_here(tmp_path: Path) -> Path:
    """The unit, its ExecStart on this checkout's softrelay (verify checks that the
    binary exists and is executable)."""
    softrelay = Path(sys.executable).parent / "softrelay"
    assert softrelay.is_file()
    text = (DEPLOY / "softrelay.service").read_text(encoding="utf-8")
    unit = tmp_path / "softrelay.service"
    unit.write_text(text.replace("/opt/softrelay/bin/softrelay", str(softrelay)), "utf-8")
    return unit


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    """No unknown key, no value it cannot parse: systemd only warns of those, and
    ignores the line."""
    analyze = _systemd_analyze()
    done = subprocess.run(
        [analyze, "verify", str(_unit_here(tmp_path))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    done = subprocess.run(
        [analyze, "security", "--offline=yes", str(_unit_here(tmp_path))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    match = re.search(r"Overall exposure level for softrelay\.service: ([\d.]+) (\w+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout

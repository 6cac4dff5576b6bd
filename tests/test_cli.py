"""The `softrelay` command: configuration errors name file and key; sweep, audit and
policy commands work on a data directory; the keyring is generated safely."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from privacy.clock import ManualClock, iso, parse_instant
from privacy.keys import embedded_keyring_path, load_keyring
from privacy.policy import load_policy
from privacy.store import DATABASE_FILE, Store
from softrelay.cli import main
from tests.conftest import sample_fields


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "softrelay.toml"
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ("[server]\nhttp_prot = 8080\n", "server.http_prot", "unknown key"),
        ("[server]\nhttp_port = 'eighty'\n", "server.http_port", "expected an integer"),
        ("[server]\nhttp_port = 70000\n", "server.http_port", "port number"),
        ("[server]\nhttp_host = 'localhost.example'\n", "server.http_host", "IP address"),
        ("[policy]\nprofile = 'gdpr-lite'\n", "policy.profile", "must be one of"),
        ("[retention]\nsweep_interval = 'hourly'\n", "retention.sweep_interval", "duration"),
        ("[secrets]\nkeyring = '/etc/key'\n", "secrets.keyring", "env:NAME"),
        ("[logging]\nlevel = 'loud'\n", "logging.level", "must be one of"),
        ("colour = 'red'\n", "colour", "unknown key"),
    ],
)
def test_bad_config_stops_with_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, key: str, message: str
) -> None:
    path = _config(tmp_path, body)
    assert main(["sweep", "--config", str(path), "--data-dir", str(tmp_path / "var")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {key}: " in err
    assert message in err
    assert not (tmp_path / "var").exists(), "nothing may start on a bad configuration"


def test_invalid_toml_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, "[server\n")
    assert main(["audit", "--config", str(path)]) == 2
    assert f"{path}: not valid TOML" in capsys.readouterr().err


def test_bad_policy_override_stops_with_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    override = tmp_path / "tighten.toml"
    override.write_text('[categories.registration]\nretention = { duration = "400d" }\n')
    path = _config(tmp_path, f"[policy]\noverride = '{override}'\n")
    assert main(["serve", "--config", str(path), "--data-dir", str(tmp_path / "var")]) == 2
    err = capsys.readouterr().err
    assert f"{override}: categories.registration.retention.duration: " in err
    assert "not lengthen" in err


def test_config_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOFTRELAY_CONFIG", str(_config(tmp_path, "[server]\nbogus = 1\n")))
    assert main(["policy", "show"]) == 2
    assert "server.bogus: unknown key" in capsys.readouterr().err


def test_keyring_generated_once_with_mode_0600(tmp_path: Path) -> None:
    first = load_keyring("", tmp_path)
    path = embedded_keyring_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keyring("", tmp_path) == first


def test_keyring_from_environment_and_bad_keyring_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = load_keyring("", tmp_path)
    monkeypatch.setenv("RING", ring.to_json().decode())
    assert load_keyring("env:RING", tmp_path / "elsewhere") == ring
    monkeypatch.setenv("RING", '{"active": 1, "encryption": {"1": "c2hvcnQ="}}')
    from tomlsections.reader import ConfigError

    with pytest.raises(
        ConfigError, match=r"environment variable RING: encryption\.1: must be base64"
    ):
        load_keyring("env:RING", tmp_path)


def test_generated_keyring_warns_that_production_keeps_it_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "var"
    assert main(["sweep", "--data-dir", str(data)]) == 0
    assert embedded_keyring_path(data).exists()
    lines = [p.read_text() for p in (data / "log" / "service_log").glob("*.jsonl")]
    assert any("production keeps it elsewhere" in line for line in lines)


async def _store_registration(data: Path, when: str) -> None:
    keyring = load_keyring("", data)
    store = await Store.create(
        load_policy("auerproxy"), keyring, data, ManualClock(parse_instant(when))
    )
    try:
        fields = sample_fields(store.policy.categories["registration"], "canary-4711")
        fields["sip_username"] = "canary-user-4711"
        await store.put("registration", fields)
        await store.put("provisioning_log", {"ip_prefix": "198.51.100.9", "pbx_serial": "77"})
    finally:
        await store.close()


async def test_sweep_and_audit_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "var"
    await _store_registration(data, "2026-01-01T00:00:00Z")
    # Within every retention: the audit passes.
    assert await _main(["audit", "--data-dir", str(data), "--now", "2026-06-01T00:00:00Z"]) == 0
    assert "registration" in capsys.readouterr().out
    # 400 days later, before any sweep: a violation, and a non-zero exit.
    later = iso(parse_instant("2026-01-01T00:00:00Z") + 400 * 86400)
    assert await _main(["audit", "--data-dir", str(data), "--now", later]) == 1
    assert "violation" in capsys.readouterr().out
    assert await _main(["sweep", "--data-dir", str(data), "--now", later]) == 0
    assert "registration" in capsys.readouterr().out
    assert await _main(["audit", "--data-dir", str(data), "--now", later]) == 0
    with sqlite3.connect(data / DATABASE_FILE) as db:
        assert db.execute("SELECT count(*) FROM c_registration").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM retention_runs").fetchone()[0] > 0


async def test_audit_canary_scan_fails_on_a_planted_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "var"
    await _store_registration(data, "2026-01-01T00:00:00Z")
    now = "2026-01-02T00:00:00Z"
    audit = ["audit", "--data-dir", str(data), "--now", now]
    # Encrypted at rest: the username is nowhere on disk in the clear...
    assert await _main([*audit, "--clear-canary", "canary-user-4711"]) == 0
    # ...and decrypted, the audit finds where it is stored.
    assert await _main([*audit, "--canary", "canary-user-4711"]) == 1
    assert "registration.sip_username (encrypted, 1 record)" in capsys.readouterr().out
    (data / "stray.txt").write_text("debug dump: canary-user-4711\n")
    assert await _main([*audit, "--clear-canary", "canary-user-4711"]) == 1
    assert "stray.txt" in capsys.readouterr().out


def test_policy_show_and_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "show"]) == 0
    assert "registration" in capsys.readouterr().out
    out = tmp_path / "notice.de.md"
    assert main(["policy", "render", "--lang", "de", "--output", str(out)]) == 0
    assert "Art. 77" in out.read_text()


def test_keys_rotate_keeps_old_keys(tmp_path: Path) -> None:
    first = load_keyring("", tmp_path)
    assert main(["keys", "rotate", "--data-dir", str(tmp_path)]) == 0
    rotated = load_keyring("", tmp_path)
    assert rotated.active == 2
    assert rotated.encryption[1] == first.encryption[1]


async def _main(argv: list[str]) -> int:
    """main() runs its own event loop: call it from a worker thread of this test's loop."""
    import asyncio

    return await asyncio.to_thread(main, argv)


def test_data_dir_is_created_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "fresh" / "var"
    assert main(["sweep", "--data-dir", str(data)]) == 0
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        (
            "[[push.app]]\nid = 'a'\napns_key_file = '/nonexistent.p8'\napns_team_id = 'T'\n"
            "apns_key_id = 'K'\n",
            "push.app[0].apns_key_file",
            "cannot read",
        ),
        ("[[push.app]]\nid = 'a'\n", "push.app[0].id", "neither APNs nor FCM"),
        ("[[push.app]]\nid = 'a'\napns_key_file = 'x'\n", "push.app[0].apns_key_file", "team"),
        ("[push]\nmax_in_flight = 0\n", "push.max_in_flight", "at least 1"),
        (
            "[[push.app]]\nid = 'a'\nfcm_service_account_file = '{sa}'\n",
            "push.app[0].fcm_service_account_file",
            "not a JSON service account",
        ),
    ],
)
def test_bad_push_config_names_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, key: str, message: str
) -> None:
    bad_json = tmp_path / "sa.json"
    bad_json.write_text("{not json")
    path = _config(tmp_path, body.replace("{sa}", str(bad_json)))
    # serve: [push] holds key files, so only the commands that push parse it.
    assert main(["serve", "--config", str(path), "--data-dir", str(tmp_path / "var")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {key}: " in err
    assert message in err


def serve_on_a_busy_port(tmp_path: Path) -> int:
    """`softrelay serve` with its HTTP port taken: its exit status (it gets as far as
    its first listening socket)."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        return main(
            ["serve", "--data-dir", str(tmp_path), "--http-port", str(port), "--sip-port", "0"]
        )


def test_port_in_use_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_on_a_busy_port(tmp_path) == 2
    assert "cannot start" in capsys.readouterr().err


def test_static_pbx_address_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, "[[sip.pbx]]\nserial = '0077'\nstatic = 'tcp:127.0.0.1:5070'\n")
    # serve: [sip] holds the PBX secrets, so only the commands that relay parse it.
    assert main(["serve", "--config", str(path), "--data-dir", str(tmp_path / "var")]) == 2
    assert "sip.pbx[0].static: expected 'udp:HOST:PORT'" in capsys.readouterr().err

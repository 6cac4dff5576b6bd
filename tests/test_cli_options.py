"""The command line's global options and its reading of secrets: `--version`;
`--config` and `--data-dir` before or after the command's name; each command reads only
the secrets it uses, and `serve` reads every one at its start."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest

from softrelay.cli import main
from softrelay.config import SECRET_SECTIONS, load_config
from tomlsections.reader import ConfigError

# Every section that holds a secret, each pointing at a source that is not there: the
# name of the missing source, the key the error must name, and the config text.
MISSING = "/nonexistent/softrelay-test"
UNSET = "SOFTRELAY_TEST_UNSET_SECRET"
SECRETS: dict[str, tuple[str, str]] = {
    "sip": (
        "sip.pbx[0].secret",
        f'[[sip.pbx]]\nserial = "0042137"\nsecret = "file:{MISSING}/pbx.secret"\n',
    ),
    "usage": ("usage.tenant[0].key", f'[[usage.tenant]]\nid = "acme"\nkey = "env:{UNSET}"\n'),
    "crashreports": (
        "crashreports.project[0].key",
        f'[[crashreports.project]]\nid = "1"\nkey = "file:{MISSING}/crash.key"\n',
    ),
    "oauth": (
        "oauth.provider[0].client_secret",
        '[[oauth.provider]]\nname = "google"\n'
        'token_url = "https://oauth2.googleapis.com/token"\nclient_id = "app"\n'
        f'client_secret = "file:{MISSING}/client.secret"\n',
    ),
    "push": (
        "push.app[0].apns_key_file",
        '[[push.app]]\nid = "com.example.phone"\napns_team_id = "ABCDE12345"\n'
        f'apns_key_id = "KEY1234567"\napns_key_file = "{MISSING}/apns.p8"\n',
    ),
    "metrics_token": ("http.metrics_token", f'[http]\nmetrics_token = "env:{UNSET}"\n'),
    "dsr_admin_token": ("dsr.admin_token", f'[dsr]\nadmin_token = "file:{MISSING}/admin"\n'),
    "store": ("store.dsn", f'[store]\nbackend = "postgresql"\ndsn = "env:{UNSET}"\n'),
    "cluster": (
        "cluster.redis",
        f'[cluster]\nredis = "env:{UNSET}"\nsecret = "file:{MISSING}/cluster.secret"\n',
    ),
    "console": ("console.admin_token", f'[console]\nadmin_token = "file:{MISSING}/console"\n'),
}
# The store's DSN is read by every command that opens the store.
STORE_SECRET = "store"


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOFTRELAY_CONFIG", raising=False)
    monkeypatch.delenv(UNSET, raising=False)


def _config(tmp_path: Path, body: str, name: str = "softrelay.toml") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def _all_secrets_missing(tmp_path: Path) -> Path:
    """Every secret missing but the store's (SQLite, which has none)."""
    return _config(
        tmp_path, "".join(body for name, (_, body) in SECRETS.items() if name != STORE_SECRET)
    )


def test_the_table_covers_every_section_that_holds_secrets() -> None:
    assert set(SECRETS) == set(SECRET_SECTIONS)


def test_version_comes_from_the_installed_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out == f"softrelay {version('softrelay')}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{config}", "--data-dir", "{data}", "sweep", "--now", "2026-03-01T00:00Z"],
        ["sweep", "--config", "{config}", "--data-dir", "{data}", "--now", "2026-03-01T00:00Z"],
        ["--config", "{config}", "sweep", "--data-dir", "{data}", "--now", "2026-03-01T00:00Z"],
    ],
    ids=["before", "after", "one-each"],
)
def test_config_and_data_dir_work_before_and_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """The config's profile and the data directory are the ones given, wherever given."""
    config = _config(tmp_path, '[policy]\nprofile = "cloudsoftphone"\n')
    data = tmp_path / "data"
    args = [a.format(config=config, data=data) for a in argv]
    assert main(args) == 0, capsys.readouterr().err
    assert (data / "softrelay.db").is_file()
    assert "swept at 2026-03-01T00:00:00" in capsys.readouterr().out
    # The sweep ran under the configured profile: its categories, not the default's.
    assert main(["--config", str(config), "policy", "show"]) == 0
    assert 'profile "cloudsoftphone"' in capsys.readouterr().out


def test_an_option_after_the_command_wins_over_the_same_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _config(tmp_path, '[policy]\nprofile = "cloudsoftphone"\n', "first.toml")
    second = _config(tmp_path, '[policy]\nprofile = "auerproxy"\n', "second.toml")
    assert main(["--config", str(first), "policy", "show", "--config", str(second)]) == 0
    assert 'profile "auerproxy"' in capsys.readouterr().out
    # Given only before, a nested command's absent option does not reset it.
    assert main(["--config", str(first), "policy", "show"]) == 0
    assert 'profile "cloudsoftphone"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["policy", "show"],
        ["policy", "render", "--lang", "de"],
        ["sweep"],
        ["audit"],
        ["crashes", "list"],
        ["crashes", "stats"],
        ["dsr", "export", "--user", "alice", "--serial", "0042137"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_commands_that_use_no_secret_need_none_of_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Every secret of the config is missing; these commands never read one but the
    store's, which SQLite has none of (the keyring, which the store needs, is generated
    under the data directory)."""
    config = _all_secrets_missing(tmp_path)
    status = main(["--config", str(config), "--data-dir", str(tmp_path / "var"), *argv])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert MISSING not in captured.err
    assert UNSET not in captured.err


@pytest.mark.parametrize("section", sorted(SECRETS))
def test_serve_reads_every_secret_at_start_and_names_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str
) -> None:
    """One missing secret, whichever section holds it, stops `serve` before anything
    starts (no data directory), with one line naming the file and the key."""
    key, body = SECRETS[section]
    config = _config(tmp_path, body)
    data = tmp_path / "var"
    assert main(["serve", "--config", str(config), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"softrelay: {config}: {key}: ")
    assert err.count("\n") == 1
    assert not data.exists()


@pytest.mark.parametrize(
    ("argv", "section"),
    [
        (["billing", "--month", "2026-01"], "usage"),
        (["crashes", "stats", "--metrics-url", "http://127.0.0.1:9/metrics"], "metrics_token"),
        (["sweep"], "store"),
        (["dsr", "export", "--user", "alice", "--serial", "0042137"], "store"),
    ],
    ids=["billing", "crashes stats", "sweep", "dsr"],
)
def test_a_command_reads_the_secrets_it_uses_and_only_those(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], section: str
) -> None:
    """Missing, the secret it uses stops it at the start, naming file and key; every
    secret it does not use may be missing."""
    key, body = SECRETS[section]
    # The store's too: every one of these opens it (SQLite, without a secret, here).
    others = "".join(b for name, (_, b) in SECRETS.items() if name not in (section, STORE_SECRET))
    data = tmp_path / "var"
    config = _config(tmp_path, body + others)
    assert main(["--config", str(config), "--data-dir", str(data), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"softrelay: {config}: {key}: ")
    assert not data.exists()
    # The same command with its own secret there and every other one still missing.
    if section == "usage":
        body = '[[usage.tenant]]\nid = "acme"\nkey = "file:{}"\n'.format(tmp_path / "acme.key")
        (tmp_path / "acme.key").write_text("k" * 32, encoding="utf-8")
        config = _config(tmp_path, body + others)
        assert main(["--config", str(config), "--data-dir", str(data), *argv]) == 0
        assert "acme" in capsys.readouterr().out


def test_load_config_checks_the_form_of_a_deferred_secret_at_once(tmp_path: Path) -> None:
    """The metrics token's source is checked when the file loads, even when its value
    is read later: a token written into the file itself is refused at once."""
    config = _config(tmp_path, '[http]\nmetrics_token = "plaintext-token-here"\n')
    with pytest.raises(ConfigError, match=r"http\.metrics_token: must be 'env:NAME'"):
        load_config(config, read_secrets=False)


def test_a_deferred_section_is_still_a_table_checked_at_load(tmp_path: Path) -> None:
    config = _config(tmp_path, 'sip = "relay.example"\n')
    with pytest.raises(ConfigError, match=r": sip: expected a table"):
        load_config(config, read_secrets=False)


def test_load_config_reads_every_secret_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded relay and the tests load a config whole, secrets read."""
    config = _config(tmp_path, SECRETS["usage"][1])
    with pytest.raises(ConfigError, match=r"usage\.tenant\[0\]\.key: environment variable"):
        load_config(config)
    monkeypatch.setenv(UNSET, "a-tenant-key-of-32-characters-xx")
    loaded = load_config(config, read_secrets=False)
    assert loaded.usage.tenants[0].key == "a-tenant-key-of-32-characters-xx"

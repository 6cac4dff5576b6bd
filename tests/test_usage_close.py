"""Month close: exact counts and an audit row, the month's secret destroyed, raw ids
deleted after the dispute window; stored ids of two months cannot be linked; the
`softrelay billing` command."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from pathlib import Path

import pytest

from privacy.clock import ManualClock, iso, parse_instant
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store
from softrelay.cli import main
from tests.limits import LONGEST_WAIT
from tests.rawdb import RawDatabase, SQLiteRaw
from tests.usage_fixtures import GLOBEX_KEY, TENANTS, install_pid, start_usage
from usage.closing import MonthCloser, NotClosable
from usage.settings import UsageSettings

SETTINGS = UsageSettings(TENANTS, ip_burst=0)  # grace 3d, dispute window 30d
MARCH_CLOSES = "2026-04-04T00:00:00Z"  # end of March + 3d grace
MARCH_IDS_GO = "2026-05-04T00:00:00Z"  # + 30d dispute window
# Each test with a store runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


async def _ping_march(store: Store, clock: ManualClock) -> dict[str, int]:
    """7 acme installs (each pinging twice), 3 globex installs; the exact counts."""
    clock.set(parse_instant("2026-03-10T12:00:00Z"))
    async for usage in start_usage(store, clock, SETTINGS):
        for n in range(7):
            for _ in range(2):
                assert (await usage.ping(pid=install_pid(n, "acme", "2026-03"))).status == 202
            clock.advance(3600)
        for n in range(3):
            response = await usage.ping(
                pid=install_pid(n, "globex", "2026-03"), tenant="globex", key=GLOBEX_KEY
            )
            assert response.status == 202
    return {"acme": 7, "globex": 3}


async def test_month_close_keeps_exact_counts_and_deletes_raw_ids_later(
    store: Store, clock: ManualClock
) -> None:
    expected = await _ping_march(store, clock)
    closer = MonthCloser(store, SETTINGS)

    clock.set(parse_instant(MARCH_CLOSES) - 1)
    assert await closer.run_once() == [], "still in the grace window"
    assert await store.find("usage_key", period="2026-03")

    clock.set(parse_instant(MARCH_CLOSES))
    assert await closer.run_once() == ["closed 2026-03"]
    counts = {
        r.fields["tenant"]: r.fields["active"]
        for r in await store.find("usage_count", period="2026-03")
    }
    assert counts == expected
    (audit,) = await store.find("usage_close", period="2026-03")
    assert audit.fields["total"] == 10
    assert audit.fields["tenants"] == 2
    assert audit.fields["closed_by"] == "job"
    assert audit.fields["ids_deleted_at"] is None
    assert await store.find("usage_key", period="2026-03") == [], "the month's secret is gone"
    assert len(await store.find("usage", period="2026-03")) == 10, "ids kept for disputes"
    # The digest proves the counts against the ids held during the dispute window.
    assert (await closer.tally("2026-03")).digest == audit.fields["digest"]

    clock.set(parse_instant(MARCH_IDS_GO) - 1)
    assert await closer.run_once() == []
    clock.set(parse_instant(MARCH_IDS_GO))
    assert await closer.run_once() == ["deleted 10 ids of 2026-03"]
    assert await store.find("usage", period="2026-03") == []
    (audit,) = await store.find("usage_close", period="2026-03")
    assert audit.fields["ids_deleted"] == 10
    assert audit.fields["ids_deleted_at"] == int(parse_instant(MARCH_IDS_GO))
    counts_after = {
        r.fields["tenant"]: r.fields["active"]
        for r in await store.find("usage_count", period="2026-03")
    }
    assert counts_after == expected, "only the counts remain, unchanged"
    assert await closer.run_once() == [], "nothing left to do: idempotent"


async def test_the_close_job_runs_in_the_server_on_its_clock(
    store: Store, clock: ManualClock
) -> None:
    await _ping_march(store, clock)
    clock.set(parse_instant(MARCH_CLOSES) + 60)
    async for usage in start_usage(store, clock, SETTINGS):
        await asyncio.wait_for(usage.service.closer.ran.wait(), 10)
        assert len(await store.find("usage_count", period="2026-03")) == 2
        assert await store.find("usage_key") == []
        late = await usage.ping(pid=install_pid(99, "acme", "2026-03"), period="2026-03")
        assert late.status == 400, "after the grace window, March takes no more pings"


async def test_closing_a_month_still_in_its_grace_window_is_refused(
    store: Store, clock: ManualClock
) -> None:
    await _ping_march(store, clock)
    clock.set(parse_instant("2026-04-02T00:00:00Z"))
    with pytest.raises(NotClosable, match="2026-04-04T00:00:00Z"):
        await MonthCloser(store, SETTINGS).close("2026-03", by="cli")
    assert await store.find("usage_close") == []


async def test_stored_ids_of_two_months_of_one_install_cannot_be_linked(
    store: Store,
    clock: ManualClock,
    tmp_path: Path,
    raw_db: RawDatabase,
    other_store_settings: StoreSettings,
) -> None:
    """The same install pings in March and in April. What is stored is keyed with a
    random secret per month, which the close destroys: neither the client's pids nor
    anything computable from the install secret or the keyring appears in storage."""
    secret = (42).to_bytes(32, "big")
    pids = {p: install_pid(42, "acme", p) for p in ("2026-03", "2026-04")}
    clock.set(parse_instant("2026-03-20T00:00:00Z"))
    async for usage in start_usage(store, clock, SETTINGS):
        assert (await usage.ping(pid=pids["2026-03"])).status == 202
        (march_key,) = await store.find("usage_key", period="2026-03")
        # The app's own closer runs once at start: let it finish, or our run finds the
        # job held by it and skips (the close would then race the assertions below).
        await asyncio.wait_for(usage.service.closer.ran.wait(), LONGEST_WAIT)
        clock.set(parse_instant("2026-04-20T00:00:00Z"))  # March closed on 04-04
        assert await usage.service.closer.run_once() == ["closed 2026-03"]
        assert (await usage.ping(pid=pids["2026-04"])).status == 202
    stored = {p: str((await store.find("usage", period=p))[0].fields["pid"]) for p in pids}
    assert stored["2026-03"] != stored["2026-04"]
    assert stored["2026-03"] != pids["2026-03"], "the server keys the app's pid again"
    assert await store.find("usage_key", period="2026-03") == [], "March's secret is gone"
    # With March's secret (kept aside here, as an attacker cannot after the close) the
    # stored id is what HMAC makes of the pid; without it, nothing relates them.
    march_secret = march_key.fields["secret"]
    assert isinstance(march_secret, str)
    expect = hmac.digest(
        base64.b64decode(march_secret), b"acme\x1f" + bytes.fromhex(pids["2026-03"]), "sha256"
    )[:16].hex()
    assert stored["2026-03"] == expect
    # Every file under the data directory (SQLite's database, its WAL), and every row.
    raw = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    dump = raw_db.dump()
    assert stored["2026-04"] in dump, "the dump shows the stored ids"
    for needle in (*pids.values(), secret.hex(), march_secret):
        assert needle.encode() not in raw, "neither pid nor secret reaches the disk"
        assert needle not in dump, "nor any row"
    # A second server (same keyring, fresh month secret) keys the same pid differently:
    # the stored value depends on the destroyed secret, not on anything kept.
    other = await Store.create(
        load_policy("auerproxy"),
        Keyring.generate(),
        tmp_path / "other",
        clock,
        other_store_settings,
    )
    try:
        async for again in start_usage(other, clock, SETTINGS):
            assert (await again.ping(pid=pids["2026-04"])).status == 202
        assert (
            str((await other.find("usage", period="2026-04"))[0].fields["pid"]) != stored["2026-04"]
        )
    finally:
        await other.close()


# --- the command ----------------------------------------------------------------------


def _config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str = "", store_toml: str = ""
) -> Path:
    monkeypatch.setenv("ACME_USAGE_KEY", TENANTS[0].key)
    monkeypatch.setenv("GLOBEX_USAGE_KEY", GLOBEX_KEY)
    path = tmp_path / "softrelay.toml"
    path.write_text(
        store_toml
        + "[usage]\n"
        + extra
        + "[[usage.tenant]]\nid = 'acme'\nkey = 'env:ACME_USAGE_KEY'\n"
        "max_installs = 5\n[[usage.tenant]]\nid = 'globex'\nkey = 'env:GLOBEX_USAGE_KEY'\n"
    )
    return path


async def _ping_march_into(data: Path, settings: StoreSettings) -> None:
    from privacy.keys import load_keyring

    clock = ManualClock(0)
    keyring = load_keyring("", data)
    store = await Store.create(load_policy("auerproxy"), keyring, data, clock, settings)
    try:
        await _ping_march(store, clock)
    finally:
        await store.close()


def test_billing_close_and_report_from_the_command_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    store_settings: StoreSettings,
    store_toml: str,
    raw_db: RawDatabase,
) -> None:
    config, data = _config(tmp_path, monkeypatch, store_toml=store_toml), tmp_path / "var"
    data.mkdir()
    asyncio.run(_ping_march_into(data, store_settings))
    args = ["--config", str(config), "--data-dir", str(data)]
    now = ["--now", "2026-04-10T00:00:00Z"]
    assert main(["billing", "--month", "2026-03", *now, *args]) == 0
    assert "open (provisional)" in capsys.readouterr().out

    assert (
        main(["billing", "close", "--month", "2026-03", "--now", "2026-04-01T00:00:00Z", *args])
        == 1
    )
    assert "grace window" in capsys.readouterr().err

    assert main(["billing", "close", "--month", "2026-03", "--now", MARCH_CLOSES, *args]) == 0
    out = capsys.readouterr().out
    assert "closed 2026-03: 10 active installs" in out
    assert f"kept for disputes until {iso(parse_instant(MARCH_IDS_GO))}" in out

    assert main(["billing", "--month", "2026-03", "--format", "json", *now, *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "closed"
    assert report["digest_matches"] is True
    assert {t["tenant"]: t["active_installs"] for t in report["tenants"]} == {
        "acme": 7,
        "globex": 3,
    }
    assert report["tenants"][0]["over_contract"] is True  # acme: 7 > 5
    assert report["total"] == 10

    assert (
        main(
            [
                "billing",
                "--month",
                "2026-03",
                "--format",
                "csv",
                "--suppress-below",
                "5",
                *now,
                *args,
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("period,tenant,active_installs")
    assert "2026-03,globex,<5," in lines[2]
    assert lines[1] == "2026-03,acme,7,5,yes,closed"

    assert main(["billing", "close", "--month", "2026-03", "--now", MARCH_IDS_GO, *args]) == 0
    out = capsys.readouterr().out
    assert "already closed" in out
    assert "deleted its 10 ids" in out
    raw = SQLiteRaw(data) if store_settings.backend == "sqlite" else raw_db
    assert raw.count("c_usage") == 0
    assert raw.count("c_usage_count") == 2


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        ("grace = 'soon'\n", "usage.grace", "duration"),
        ("colour = 'red'\n", "usage.colour", "unknown key"),
        ("dispute_window = '90d'\n", "usage.dispute_window", "retention"),
    ],
)
def test_a_bad_usage_config_stops_with_file_and_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: str,
    key: str,
    message: str,
) -> None:
    config = _config(tmp_path, monkeypatch, extra)
    code = main(
        [
            "serve",
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path / "var"),
            "--http-port",
            "0",
            "--sip-port",
            "0",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"{config}: {key}: " in err
    assert message in err


def test_a_tenant_key_in_the_config_itself_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "softrelay.toml"
    config.write_text("[[usage.tenant]]\nid = 'acme'\nkey = 'plain-text-key-in-file'\n")
    assert main(["billing", "--month", "2026-03", "--config", str(config)]) == 2
    assert (
        f"{config}: usage.tenant[0].key: must be 'env:NAME' or 'file:PATH'"
        in capsys.readouterr().err
    )


def test_a_bad_month_names_the_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["billing", "close", "--month", "2026-3", "--data-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--month" in capsys.readouterr().err

"""The app's side: a random install secret kept in a small file, a pid that changes
every month, and the cadence "used and 14 days passed, or the month changed"."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from privacy.clock import ManualClock, parse_instant
from privacy.store import Store
from tests.usage_fixtures import ACME_KEY, TENANTS, UsageHarness, start_usage
from usage.client import UsageClient, UsageState, is_due, pseudonymous_id
from usage.settings import UsageSettings

# Each test with a store runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends

DAY = 86400.0


def at(text: str) -> float:
    return parse_instant(text)


def test_cadence_13_days_is_not_due_and_14_days_is() -> None:
    last = at("2026-03-02T10:00:00Z")
    assert not is_due(last, last + 13 * DAY)
    assert not is_due(last, last + 14 * DAY - 1)
    assert is_due(last, last + 14 * DAY)


def test_cadence_pings_again_when_the_month_changes() -> None:
    """A ping on 25 January and a single use on 5 February: February must count it."""
    last = at("2026-01-25T09:00:00Z")
    assert is_due(last, at("2026-02-05T09:00:00Z"))
    assert not is_due(last, at("2026-01-31T23:59:59Z"))
    assert is_due(last, at("2026-02-01T00:00:00Z"))
    assert is_due(None, last), "a new install pings at its first use"


def test_the_pid_changes_every_month_and_per_tenant() -> None:
    secret = bytes(range(32))
    march = pseudonymous_id(secret, "acme", "2026-03")
    assert len(march) == 32
    assert int(march, 16) >= 0
    assert march == pseudonymous_id(secret, "acme", "2026-03"), "stable within a month"
    assert march != pseudonymous_id(secret, "acme", "2026-04")
    assert march != pseudonymous_id(secret, "globex", "2026-03")
    assert march != pseudonymous_id(bytes(32), "acme", "2026-03")


def test_the_install_secret_is_random_kept_owner_only_and_reloaded(tmp_path: Path) -> None:
    one, two = tmp_path / "a" / "usage.json", tmp_path / "b" / "usage.json"
    first = UsageState.load(one)
    assert first.install_secret != UsageState.load(two).install_secret
    assert stat.S_IMODE(one.stat().st_mode) == 0o600
    first.last_ping = 1234.5
    first.save(one)
    again = UsageState.load(one)
    assert again.install_secret == first.install_secret
    assert again.last_ping == 1234.5


def test_a_damaged_state_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    path.write_text('{"install_secret": "short", "last_ping": null}')
    with pytest.raises(ValueError, match=str(path)):
        UsageState.load(path)


@pytest.fixture
async def usage(store: Store, clock: ManualClock) -> AsyncIterator[UsageHarness]:
    async for harness in start_usage(store, clock, UsageSettings(TENANTS, ip_burst=0)):
        yield harness


async def test_the_client_pings_the_server_by_the_cadence(
    usage: UsageHarness, tmp_path: Path
) -> None:
    client = UsageClient(
        tmp_path / "usage.json",
        tenant="acme",
        tenant_key=ACME_KEY,
        platform="android",
        app_version="5.2.1",
    )
    base = str(usage.client.make_url(""))
    async with aiohttp.ClientSession() as session:
        t0 = at("2026-03-02T10:00:00Z")
        usage.clock.set(t0)
        assert await client.used(session, base, t0) == 202
        assert await client.used(session, base, t0 + 13 * DAY) is None, "13 days: no ping"
        usage.clock.set(t0 + 14 * DAY)
        assert await client.used(session, base, t0 + 14 * DAY) == 202
        # 16 March, then a single use on 1 April: April counts it.
        april = at("2026-04-01T08:00:00Z")
        usage.clock.set(april)
        assert await client.used(session, base, april) == 202
    assert len(await usage.store.find("usage", period="2026-03")) == 1, "one id per month"
    assert len(await usage.store.find("usage", period="2026-04")) == 1

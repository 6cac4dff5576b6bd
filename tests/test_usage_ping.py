"""`POST /usage/v1/ping`: accepted once per id and month, every bad input refused with
a JSON reason, per-IP rate limit in memory, per-tenant cap flags without dropping."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from privacy.clock import ManualClock, parse_instant
from privacy.store import Store
from tests.usage_fixtures import (
    GLOBEX_KEY,
    REGISTRY_KEY,
    TENANTS,
    UsageHarness,
    install_pid,
    start_usage,
)
from usage.endpoint import PING_PATH
from usage.ledger import PeriodClosed
from usage.settings import Tenant, UsageSettings

# Each test with a store runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


@pytest.fixture
async def usage(store: Store, clock: ManualClock) -> AsyncIterator[UsageHarness]:
    async for harness in start_usage(store, clock, UsageSettings(TENANTS, ip_burst=0)):
        yield harness


async def _error(response: object) -> tuple[int, str, str]:
    import aiohttp

    assert isinstance(response, aiohttp.ClientResponse)
    body = await response.json()
    return response.status, body["error"], body["detail"]


async def test_a_ping_is_accepted_once_and_a_repeat_writes_nothing(usage: UsageHarness) -> None:
    pid = install_pid(1, "acme", "2026-03")
    first = await usage.ping(pid=pid)
    assert first.status == 202
    assert await first.json() == {"status": "accepted"}
    again = await usage.ping(pid=pid)
    assert again.status == 202, "a repeat is accepted: pings are idempotent"
    rows = await usage.store.find("usage", tenant="acme", period="2026-03")
    assert len(rows) == 1
    assert usage.service.ledger.distinct("acme", "2026-03") == 1
    await usage.ping(pid=install_pid(2, "acme", "2026-03"))
    assert len(await usage.store.find("usage", period="2026-03")) == 2


async def test_the_same_pid_of_two_tenants_counts_for_each(usage: UsageHarness) -> None:
    pid = install_pid(1, "acme", "2026-03")
    assert (await usage.ping(pid=pid)).status == 202
    assert (await usage.ping(pid=pid, tenant="globex", key=GLOBEX_KEY)).status == 202
    assert usage.service.ledger.distinct("acme", "2026-03") == 1
    assert usage.service.ledger.distinct("globex", "2026-03") == 1


async def test_dedupe_survives_a_restart(store: Store, clock: ManualClock) -> None:
    pid = install_pid(7, "acme", "2026-03")
    settings = UsageSettings(TENANTS, ip_burst=0)
    async for first in start_usage(store, clock, settings):
        assert (await first.ping(pid=pid)).status == 202
    async for second in start_usage(store, clock, settings):
        assert (await second.ping(pid=pid)).status == 202
        assert second.service.ledger.distinct("acme", "2026-03") == 1
    assert len(await store.find("usage", period="2026-03")) == 1


@pytest.mark.parametrize(
    ("tenant", "key", "header"),
    [
        ("acme", "wrong-key-0123456789abcdef", None),
        ("acme", GLOBEX_KEY, None),  # another tenant's key
        ("initech", "whatever-0123456789abcdef", None),  # unknown tenant
        ("acme", None, None),  # no Authorization
        ("acme", None, "Basic YWNtZTprZXk="),
    ],
)
async def test_a_bad_tenant_key_is_401_with_a_reason(
    usage: UsageHarness, tenant: str, key: str | None, header: str | None
) -> None:
    body = {
        "tenant": tenant,
        "period": "2026-03",
        "pid": "a" * 32,
        "platform": "ios",
        "app_version": "1.0",
    }
    headers = {"Authorization": header or f"Bearer {key}"} if (key or header) else {}
    response = await usage.client.post(PING_PATH, json=body, headers=headers)
    status, error, detail = await _error(response)
    assert (status, error) == (401, "unauthorized")
    assert "tenant key" in detail
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await usage.store.find("usage", period="2026-03") == []


@pytest.mark.parametrize(
    ("period", "now"),
    [
        ("2026-04", "2026-03-15T00:00:00Z"),  # next month
        ("2026-01", "2026-03-01T12:00:00Z"),  # two months ago
        ("2026-02", "2026-03-04T00:00:00Z"),  # previous month, grace (3d) over
        ("2026-3", "2026-03-15T00:00:00Z"),
        ("March", "2026-03-15T00:00:00Z"),
        ("2026-13", "2026-03-15T00:00:00Z"),
    ],
)
async def test_a_bad_period_is_400_with_a_reason(
    usage: UsageHarness, period: str, now: str
) -> None:
    usage.clock.set(parse_instant(now))
    status, error, detail = await _error(await usage.ping(period=period))
    assert (status, error) == (400, "bad_period")
    assert "period" in detail


async def test_the_previous_month_is_taken_during_the_grace_window(usage: UsageHarness) -> None:
    usage.clock.set(parse_instant("2026-03-03T23:59:59Z"))  # grace 3d: until 03-04 00:00
    assert (await usage.ping(period="2026-02", pid=install_pid(1, "acme", "2026-02"))).status == 202
    assert len(await usage.store.find("usage", period="2026-02")) == 1


async def test_the_months_a_ping_may_name_follow_the_clock_of_a_running_server(
    usage: UsageHarness,
) -> None:
    """The months allowed are worked out once per month, not per ping: they still move
    with the clock into the next month, out of the grace window, and back."""

    async def answer(period: str, n: int) -> tuple[int, str]:
        response = await usage.ping(period=period, pid=install_pid(n, "acme", period))
        if response.status == 202:
            return 202, ""
        status, error, detail = await _error(response)
        assert error == "bad_period"
        return status, detail

    usage.clock.set(parse_instant("2026-02-28T23:59:59Z"))
    assert await answer("2026-02", 1) == (202, "")
    assert await answer("2026-03", 2) == (
        400,
        "field 'period' must be the current month 2026-02 (or 2026-01 during the grace window)",
    )
    usage.clock.set(parse_instant("2026-03-01T00:00:00Z"))
    assert await answer("2026-03", 3) == (202, "")
    assert await answer("2026-02", 4) == (202, ""), "the previous month, in its grace"
    usage.clock.set(parse_instant("2026-02-10T00:00:00Z"))  # the clock stepped back
    assert await answer("2026-02", 5) == (202, "")
    assert (await answer("2026-03", 6))[0] == 400
    usage.clock.set(parse_instant("2026-03-03T23:59:59Z"))
    assert await answer("2026-02", 7) == (202, "")
    usage.clock.set(parse_instant("2026-03-04T00:00:00Z"))  # grace (3d) over
    assert await answer("2026-02", 8) == (
        400,
        "field 'period' must be the current month 2026-03 (or 2026-02 during the grace window)",
    )
    assert await answer("2026-3", 9) == (400, "field 'period' must be like '2026-03'")
    assert len(await usage.store.find("usage", period="2026-02")) == 4
    assert len(await usage.store.find("usage", period="2026-03")) == 1


@pytest.mark.parametrize(
    ("body", "error", "detail"),
    [
        (b"{not json", "malformed_body", "not valid JSON"),
        (b"[1, 2]", "malformed_body", "JSON object"),
        (b"", "malformed_body", "not valid JSON"),
        (b'{"tenant": "acme"}', "missing_field", "'period'"),
        (
            b'{"tenant":"acme","period":"2026-03","pid":"' + b"a" * 32 + b'","platform":"ios",'
            b'"app_version":"1","ip":"203.0.113.9"}',
            "unknown_field",
            "'ip'",
        ),
        (
            b'{"tenant":"acme","period":"2026-03","pid":42,"platform":"ios","app_version":"1"}',
            "bad_field",
            "'pid' must be a string",
        ),
        (
            b'{"tenant":"acme","period":"2026-03","pid":"' + b"A" * 32 + b'","platform":"ios",'
            b'"app_version":"1"}',
            "bad_field",
            "32 lower-case hex",
        ),
        (
            b'{"tenant":"acme","period":"2026-03","pid":"' + b"a" * 31 + b'","platform":"ios",'
            b'"app_version":"1"}',
            "bad_field",
            "32 lower-case hex",
        ),
        (
            b'{"tenant":"acme","period":"2026-03","pid":"' + b"a" * 32 + b'","platform":"symbian",'
            b'"app_version":"1"}',
            "bad_field",
            "'platform'",
        ),
        (
            b'{"tenant":"acme","period":"2026-03","pid":"' + b"a" * 32 + b'","platform":"ios",'
            b'"app_version":"1.0 (build <script>)"}',
            "bad_field",
            "'app_version'",
        ),
    ],
)
async def test_a_malformed_body_is_400_with_a_reason(
    usage: UsageHarness, body: bytes, error: str, detail: str
) -> None:
    response = await usage.client.post(
        PING_PATH,
        data=body,
        headers={"Authorization": f"Bearer {TENANTS[0].key}", "Content-Type": "application/json"},
    )
    status, got_error, got_detail = await _error(response)
    assert (status, got_error) == (400, error)
    assert detail in got_detail
    assert await usage.store.find("usage", period="2026-03") == []


async def test_a_body_over_the_cap_is_413_and_a_wrong_type_415(usage: UsageHarness) -> None:
    headers = {"Authorization": f"Bearer {TENANTS[0].key}", "Content-Type": "application/json"}
    big = b'{"tenant": "' + b"a" * 2000 + b'"}'
    status, error, _ = await _error(await usage.client.post(PING_PATH, data=big, headers=headers))
    assert (status, error) == (413, "body_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for _ in range(4):
            yield b" " * 400

    response = await usage.client.post(PING_PATH, data=chunks(), headers=headers)
    assert (await _error(response))[:2] == (413, "body_too_large")
    response = await usage.client.post(
        PING_PATH, data=b"tenant=acme", headers={**headers, "Content-Type": "text/plain"}
    )
    assert (await _error(response))[:2] == (415, "unsupported_media_type")


async def test_the_per_ip_rate_limit_is_429_then_refills(store: Store, clock: ManualClock) -> None:
    settings = UsageSettings(TENANTS, ip_burst=3, ip_window=3600)
    async for usage in start_usage(store, clock, settings):
        for n in range(3):
            assert (await usage.ping(pid=install_pid(n, "acme", "2026-03"))).status == 202
        refused = await usage.ping(pid=install_pid(9, "acme", "2026-03"))
        status, error, _ = await _error(refused)
        assert (status, error) == (429, "rate_limited")
        assert int(refused.headers["Retry-After"]) == 1200  # one token per 20 minutes
        clock.advance(1200)
        assert (await usage.ping(pid=install_pid(9, "acme", "2026-03"))).status == 202


async def test_a_tenant_over_its_contract_is_flagged_not_dropped(
    store: Store, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = UsageSettings((Tenant("acme", TENANTS[0].key, max_installs=2),), ip_burst=0)
    async for usage in start_usage(store, clock, settings):
        with caplog.at_level(logging.WARNING, logger="softrelay.usage"):
            for n in range(4):
                assert (await usage.ping(pid=install_pid(n, "acme", "2026-03"))).status == 202
        assert len(await store.find("usage", period="2026-03")) == 4, "nothing is dropped"
        flagged = [r for r in caplog.records if "contract" in r.getMessage()]
        assert len(flagged) == 1, "flagged once per month"
        assert flagged[0].__dict__["fields"] == {"tenant": "acme", "period": "2026-03", "count": 3}
        registry = usage.app[REGISTRY_KEY]
        labels = {"tenant": "acme", "period": "2026-03"}
        assert registry.get_sample_value("softrelay_usage_over_cap", labels) == 1


async def test_a_closed_month_takes_no_more_ids(usage: UsageHarness) -> None:
    await usage.ping(pid=install_pid(1, "acme", "2026-02"), period="2026-02")
    usage.clock.set(parse_instant("2026-03-05T00:00:00Z"))
    # The app's start-up run of the close job holds the job's lock until it ends.
    await usage.service.closer.ran.wait()
    await usage.service.closer.close("2026-02", by="job")
    with pytest.raises(PeriodClosed):
        await usage.service.ledger.record("acme", "2026-02", bytes(16))

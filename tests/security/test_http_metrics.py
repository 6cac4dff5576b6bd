"""/metrics does no store work per scrape, and can be closed to the public (issue 14,
point 9): it serves the audit snapshot the sweeper takes, may require a bearer token,
and may live on a listener of its own."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store
from push.apps import PushSettings
from softrelay.app import STORE, SWEEPER, Services, build_app
from softrelay.metrics import MetricsSettings
from tests.peers import STEP_TIMEOUT, http_base, spawn_serve

TOKEN = "metrics-token-0123456789abcdef"
PUSH = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.example.t")

Client = Callable[[MetricsSettings], Awaitable[tuple[TestClient[Any, Any], web.Application]]]


@pytest.fixture
async def client(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Client]:
    clients: list[TestClient[Any, Any]] = []

    async def start(metrics: MetricsSettings) -> tuple[TestClient[Any, Any], web.Application]:
        services = Services(
            load_policy("auerproxy"),
            Keyring.generate(),
            tmp_path,
            clock,
            sweep_interval=3600,
            push=PUSH,
            metrics=metrics,
        )
        app = build_app(services)
        test_client: TestClient[Any, Any] = TestClient(TestServer(app))
        await test_client.start_server()
        clients.append(test_client)
        return test_client, app

    yield start
    for test_client in clients:
        await test_client.close()


def spy_on_store(store: Store, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts what the audit asks of the store: a count per table, the columns, the
    tables of the database."""
    calls: Counter[str] = Counter()
    for owner, name in ((store, "stats"), (store, "undeclared_columns"), (store.backend, "tables")):
        real = getattr(owner, name)

        async def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            calls[_name] += 1
            return await _real(*args)

        monkeypatch.setattr(owner, name, counted)
    return calls


async def test_scrapes_do_no_store_work_and_the_sweeper_refreshes_the_snapshot(
    client: Client, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    test_client, app = await client(MetricsSettings())
    sweeper = app[SWEEPER]
    await asyncio.wait_for(sweeper.snapshot.taken.wait(), STEP_TIMEOUT)  # start-up sweep
    calls = spy_on_store(app[STORE], monkeypatch)
    for _ in range(50):
        answer = await test_client.get("/metrics")
        assert answer.status == 200
        text = await answer.text()
    assert 'softrelay_retention_limit_seconds{category="crash_report"}' in text
    assert calls == Counter()
    taken = sweeper.snapshot.taken_at
    clock.advance(60)
    await sweeper.run_if_due(None)  # what the sweeper's loop does every turn
    assert calls["stats"] == 1
    assert sweeper.snapshot.taken_at == clock.now() != taken


async def test_a_token_protected_metrics_answers_401_without_it(client: Client) -> None:
    test_client, _ = await client(MetricsSettings(token=TOKEN))
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": TOKEN}):
        answer = await test_client.get("/metrics", headers=headers)
        assert answer.status == 401
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await answer.json())["error"] == "unauthorized"
    answer = await test_client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 200
    assert "softrelay_sweeper_runs_total" in await answer.text()
    document = await (await test_client.get("/openapi.json")).json()
    assert "401" in document["paths"]["/metrics"]["get"]["responses"]


async def test_metrics_on_a_listener_of_its_own_is_gone_from_the_public_port(
    tmp_path: Path,
) -> None:
    config = tmp_path / "softrelay.toml"
    config.write_text('[server]\nmetrics_listen = "127.0.0.1:0"\n', encoding="utf-8")
    proc = await spawn_serve(tmp_path / "var", "--config", str(config))
    try:
        base = await http_base(proc)
        assert proc.stdout is not None
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), STEP_TIMEOUT)).decode()
            assert line, "serve ended before printing its metrics listener"
            if match := re.match(r"softrelay: (http://127\.0\.0\.1:\d+/metrics) ", line):
                break
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/metrics") as answer:
                assert answer.status == 404
            async with session.get(match.group(1)) as answer:
                assert answer.status == 200
                assert "softrelay_sweeper_runs_total" in await answer.text()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), STEP_TIMEOUT)

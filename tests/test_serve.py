"""`softrelay serve` as a user runs it: prints where it listens, answers /healthz and
/metrics, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from push.apps import PushSettings
from tests.conftest import sample_fields
from tests.peers import STARTUP_TIMEOUT, http_base, spawn_serve

EMBEDDED_PUSH = PushSettings(
    apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.example.test"
)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    proc = await spawn_serve(tmp_path / "var")
    base = await http_base(proc)
    try:
        yield proc, base
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_answers_health_and_metrics_then_stops_on_sigterm(
    server: tuple[asyncio.subprocess.Process, str], tmp_path: Path
) -> None:
    proc, base = server
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "status": "ok",
                "dependencies": {"store": {"status": "ok", "backend": "sqlite"}},
            }
        async with session.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    assert 'softrelay_retention_oldest_age_seconds{category="registration"}' in text
    assert 'softrelay_retention_limit_seconds{category="crash_report"} 7.776e+06' in text
    assert "softrelay_sweeper_runs_total" in text
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), STARTUP_TIMEOUT) == 0
    assert proc.stdout is not None
    assert b"stopping" in await proc.stdout.read()
    # The sweeper ran at start and the store closed cleanly (WAL checkpointed away).
    var = tmp_path / "var"
    assert (var / "softrelay.db").exists()
    assert not (var / "softrelay.db-wal").exists() or (var / "softrelay.db-wal").stat().st_size == 0


async def test_metrics_show_a_retention_violation_from_the_sweepers_snapshot(
    tmp_path: Path,
) -> None:
    """/metrics reports the oldest age per category from the audit the sweeper took
    after its last run, expired rows included; a scrape alone does not refresh it."""
    from aiohttp.test_utils import TestClient, TestServer

    from privacy.clock import ManualClock
    from privacy.keys import Keyring
    from privacy.policy import load_policy
    from softrelay.app import STORE, SWEEPER, Services, build_app
    from tests.conftest import START

    clock = ManualClock(START)
    policy = load_policy("auerproxy")
    services = Services(
        policy, Keyring.generate(), tmp_path, clock, sweep_interval=3600, push=EMBEDDED_PUSH
    )
    app = build_app(services)
    async with TestClient(TestServer(app)) as client:
        sweeper = app[SWEEPER]
        await sweeper.snapshot.taken.wait()  # the start-up sweep and its audit are done
        store = app[STORE]
        await store.put("crash_report", sample_fields(policy.categories["crash_report"]))
        clock.advance(91 * 86400)
        before = await (await client.get("/metrics")).text()
        await sweeper.snapshot.refresh()  # what the sweeper does after each run
        after = await (await client.get("/metrics")).text()
    assert 'softrelay_retention_violation{category="crash_report"} 0.0' in before
    assert 'softrelay_retention_violation{category="crash_report"} 1.0' in after
    assert 'softrelay_retention_oldest_age_seconds{category="crash_report"} 7.8624e+06' in after
    (taken,) = [
        float(line.split()[1])
        for line in after.splitlines()
        if line.startswith("softrelay_retention_snapshot_timestamp_seconds ")
    ]
    assert taken == clock.now()

"""`softrelay serve` as deployed: pings from a distinctive loopback address, accepted
and refused ones alike, leave that address nowhere under the data directory and
nowhere on stderr (no access log, no aiohttp error log)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from privacy.audit import scan_for_canaries
from privacy.database import DATABASE_FILE, StoreSettings
from tests.peers import STARTUP_TIMEOUT, http_base, spawn_serve
from tests.rawdb import RawDatabase
from usage.client import UsageClient
from usage.endpoint import PING_PATH

CANARY_IP = "127.83.41.29"  # loopback, and unlike any address the server has of its own
KEY = "canary-tenant-key-0123456789"
# Runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_backends


async def test_no_ip_of_a_ping_reaches_the_data_dir_or_stderr(
    tmp_path: Path, store_settings: StoreSettings, store_toml: str, raw_db: RawDatabase
) -> None:
    config = tmp_path / "softrelay.toml"
    config.write_text(
        store_toml
        + "[usage]\nip_burst = 6\n[[usage.tenant]]\nid = 'acme'\nkey = 'env:CANARY_USAGE_KEY'\n"
    )
    data = tmp_path / "var"
    env = {"SOFTRELAY_CONFIG": str(config), "CANARY_USAGE_KEY": KEY}
    proc = await spawn_serve(data, env=env)
    try:
        base = await http_base(proc)
        connector = aiohttp.TCPConnector(local_addr=(CANARY_IP, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            app = UsageClient(
                tmp_path / "usage.json",
                tenant="acme",
                tenant_key=KEY,
                platform="ios",
                app_version="1.0",
            )
            assert await app.used(session, base, time.time()) == 202
            body = app.ping_body(time.time())
            url = base + PING_PATH
            auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            statuses = [
                (await session.post(url, json=body, headers=auth)).status,  # repeat
                (await session.post(url, json=body, headers={"Authorization": "Bearer x"})).status,
                (await session.post(url, data=b"{oops", headers=auth)).status,
                (await session.post(url, json={**body, "ip": CANARY_IP}, headers=auth)).status,
                (await session.post(url, data=b"x" * 5000, headers=auth)).status,
                (await session.post(url, json=body, headers=auth)).status,  # 7th: over the burst
            ]
            assert statuses == [202, 401, 400, 400, 413, 429]
            async with session.get(base + "/metrics") as response:
                metrics = await response.text()
        assert 'softrelay_usage_pings_total{outcome="accepted"} 1.0' in metrics
        assert 'softrelay_usage_pings_total{outcome="rate_limited"} 1.0' in metrics
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), STARTUP_TIMEOUT)
    assert proc.returncode == 0
    assert CANARY_IP.encode() not in stderr
    if store_settings.backend == "postgresql":
        # The rows live in the database, not under data_dir: its dump is scanned with it.
        (data / "database.dump").write_text(raw_db.dump(), encoding="utf-8")
    assert scan_for_canaries(data, [CANARY_IP, "127.83.41.0"]) == []
    # The scan does see the database: the tenant's name is stored plain.
    seen = {hit.path.name for hit in scan_for_canaries(data, ["acme"])}
    assert seen & {DATABASE_FILE, f"{DATABASE_FILE}-wal", "database.dump"}, seen
    # Neither the app's pid nor its install secret reached the server's disk.
    pid = app.ping_body(time.time())["pid"]
    assert scan_for_canaries(data, [pid, app.state.install_secret.hex()]) == []

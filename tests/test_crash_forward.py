"""Forwarding to a stand-in upstream Sentry, softrelay's own errors, and the crashes CLI."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sentry_sdk
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from crashreports.envelope import parse_envelope
from crashreports.forward import Forwarder
from crashreports.selfreport import start_self_reporting, stop_self_reporting
from crashreports.settings import parse_dsn
from privacy.clock import ManualClock
from softrelay.cli import main as cli_main
from tests.test_crash_ingest import (
    EMAIL,
    IP4,
    OPT_IN,
    PHONE,
    Start,
    _auth,
    _envelope,
    _post,
    serving,
    settings,
)

UPSTREAM_KEY = "fedcba9876543210fedcba9876543210"
WAIT = 10.0


class Upstream:
    """A stand-in Sentry: records each envelope; answers the statuses it is given."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = statuses or []
        self.envelopes: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        await self.envelopes.put((dict(request.headers), body))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({}, status=status, headers={"Retry-After": "0"})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/api/{project}/envelope/", self.handle)
        self.server = TestServer(app, host="127.0.0.1", port=0)
        await self.server.start_server()
        return f"http://{UPSTREAM_KEY}@127.0.0.1:{self.server.port}/7"

    async def next_event(self) -> tuple[dict[str, str], dict[str, Any]]:
        headers, body = await asyncio.wait_for(self.envelopes.get(), WAIT)
        envelope = parse_envelope(body)
        events = [i for i in envelope.items if i.type == "event"]
        assert len(events) == 1
        event = orjson.loads(events[0].payload)
        assert isinstance(event, dict)
        return headers, event


@pytest.fixture
async def start(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Start]:
    async with serving(tmp_path, clock) as factory:
        yield factory


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    stand_in = Upstream()
    yield stand_in
    if stand_in.server is not None:
        await stand_in.server.close()


async def test_forwarding_carries_the_scrubbed_event_only(start: Start, upstream: Upstream) -> None:
    dsn = await upstream.start()
    server = await start(settings(forward={"dsn": dsn}))
    event = {"message": f"call {PHONE} for {EMAIL} from {IP4}", "tags": OPT_IN, "level": "error"}
    status, reply = await _post(f"{server.url}/api/1/envelope/", _envelope(event), _auth())
    assert status == 200
    headers, forwarded = await upstream.next_event()
    assert f"sentry_key={UPSTREAM_KEY}" in headers["X-Sentry-Auth"]
    assert forwarded["message"] == "call [phone] for [email] from [ip]"
    assert forwarded["event_id"] == reply["id"]
    assert forwarded["level"] == "error"
    text = json.dumps(forwarded)
    for canary in (PHONE, EMAIL, IP4):
        assert canary not in text
    assert server.count("softrelay_crash_forward_total", outcome="sent") == 1


async def test_the_forwarder_retries_a_5xx_and_drops_when_its_queue_is_full(
    upstream: Upstream, clock: ManualClock
) -> None:
    upstream.statuses = [503]
    target = parse_dsn(await upstream.start())
    registry = CollectorRegistry()
    forwarder = Forwarder(target, clock, registry, queue_size=1, attempts=3, backoff_base=0.001)
    # Not started: the queue fills and the next offer is dropped and counted.
    assert forwarder.offer({"event_id": "a" * 32, "message": "one"})
    assert not forwarder.offer({"event_id": "b" * 32, "message": "two"})
    assert (
        registry.get_sample_value("softrelay_crash_forward_total", {"outcome": "queue_full"}) == 1
    )
    await forwarder.start()
    try:
        _, first = await upstream.next_event()
        _, again = await upstream.next_event()  # after the 503
        assert first["message"] == again["message"] == "one"
    finally:
        await forwarder.close()
    assert registry.get_sample_value("softrelay_crash_forward_total", {"outcome": "sent"}) == 1


def _fail() -> None:
    raise RuntimeError(f"store failed for {EMAIL} at {IP4}")


async def test_own_errors_are_scrubbed_by_the_same_chain_before_the_sdk_sends(
    upstream: Upstream,
) -> None:
    dsn = await upstream.start()
    crash = settings(self_report={"dsn": dsn, "environment": "test"})
    assert start_self_reporting(crash, "softrelay@test")
    try:
        try:
            _fail()
        except RuntimeError:
            sentry_sdk.capture_exception()
        await asyncio.to_thread(sentry_sdk.flush, WAIT)
        _, event = await upstream.next_event()
    finally:
        await asyncio.to_thread(stop_self_reporting)
    value = event["exception"]["values"][-1]["value"]
    assert value == "store failed for [email] at [ip]"
    assert "server_name" not in event
    assert event["release"] == "softrelay@test"


async def test_crashes_cli_lists_shows_and_exports_the_stored_reports(
    start: Start,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    clock: ManualClock,
) -> None:
    clock.set(time.time())  # the CLI reads with the system clock
    server = await start()
    event = {"message": f"mail {EMAIL}", "tags": OPT_IN, "level": "fatal"}
    status, reply = await _post(f"{server.url}/api/1/envelope/", _envelope(event), _auth())
    assert status == 200
    await server.app.shutdown()
    await server.app.cleanup()
    config = tmp_path / "empty.toml"
    config.write_text("")
    monkeypatch.setenv("SOFTRELAY_CONFIG", str(config))
    common = ["--data-dir", str(server.data_dir)]

    assert await asyncio.to_thread(cli_main, ["crashes", "list", *common]) == 0
    listed = capsys.readouterr().out
    assert reply["id"] in listed
    assert "fatal" in listed
    assert "mail [email]" in listed
    assert "1 report(s)" in listed

    assert await asyncio.to_thread(cli_main, ["crashes", "show", reply["id"], *common]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["event"]["message"] == "mail [email]"
    assert shown["project"] == "1"

    out = tmp_path / "export.jsonl"
    args = ["crashes", "export", "--output", str(out), *common]
    assert await asyncio.to_thread(cli_main, args) == 0
    lines = out.read_text().splitlines()
    assert [json.loads(line)["event_id"] for line in lines] == [reply["id"]]

    assert await asyncio.to_thread(cli_main, ["crashes", "show", "0" * 32, *common]) == 1
    assert "no crash report" in capsys.readouterr().err

"""The console's JSON API and event stream against a real app: what the test does
through the relay, the usage ping and crash ingest shows in the figures, and nothing
personal ever does."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import aiohttp

from tests.console.conftest import SERIAL, TENANT, Admin, ConsoleWorld
from tests.limits import LONGEST_WAIT

SHAPES = {
    "/api/v1/overview": {
        "time",
        "node",
        "flows",
        "pbx_links",
        "pbx_links_online",
        "pbx_links_total",
        "registered_phones",
        "parked_calls",
        "wakes",
        "pushes",
        "dead_tokens_per_min",
        "shedding",
        "series",
    },
    "/api/v1/usage": {"tenants"},
    "/api/v1/crashes": {"projects", "reports"},
    "/api/v1/privacy": {"categories", "audit", "dsr"},
    "/api/v1/cluster": {"enabled", "nodes", "redis", "store"},
}


async def _usage_ping(console: ConsoleWorld, http: aiohttp.ClientSession) -> str:
    pid = secrets.token_hex(16)
    async with http.post(
        f"{console.http_base}/usage/v1/ping",
        json={
            "tenant": TENANT,
            "period": "2026-03",
            "pid": pid,
            "platform": "ios",
            "app_version": "5.2.1",
        },
        headers={"Authorization": f"Bearer {console.tenant_key}"},
    ) as answer:
        assert answer.status == 202, await answer.text()
    return pid


async def crash_report(console: ConsoleWorld, http: aiohttp.ClientSession, user: str) -> str:
    """An opted-in report carrying the SIP user and an address, which scrubbing removes."""
    event = {
        "message": f"call to sip:{user}@relay.test from 203.0.113.7 failed",
        "level": "error",
        "platform": "cocoa",
        "release": "5.2.1",
        "tags": {"softrelay.opt_in": "yes"},
    }
    async with http.post(
        f"{console.http_base}/api/1/store/",
        json=event,
        headers={"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={console.crash_key}"},
    ) as answer:
        assert answer.status == 200, await answer.text()
        event_id = (await answer.json())["id"]
    assert isinstance(event_id, str)
    return event_id


async def _everything(admin: Admin, crash_id: str) -> dict[str, Any]:
    answers = {path: await admin.json(path) for path in SHAPES}
    answers["detail"] = await admin.json(f"/api/v1/crashes/{crash_id}")
    return answers


async def test_the_figures_reflect_what_the_test_did_and_show_nothing_personal(
    console: ConsoleWorld,
) -> None:
    """A phone registered through the relay at the linked PBX, woken by push for a
    call; a usage ping; an opted-in crash report: the overview, usage, crashes,
    privacy and cluster figures count them, in the plan's shapes, and no response
    holds the phone's push token, its user or password, the PBX secret, the admin
    token, the crash's address or the loopback address the phone came from."""
    phone = await console.phone()
    await phone.sleep()
    call = await console.pbx.call(phone.spec.user)
    assert call.woken
    assert call.connected
    async with aiohttp.ClientSession() as http:
        await _usage_ping(console, http)
        crash_id = await crash_report(console, http, phone.spec.user)
    async with console.logged_in() as admin:
        assert (await admin.post("/api/v1/actions/audit")).status == 200
        answers = await _everything(admin, crash_id)
    for path, keys in SHAPES.items():
        assert set(answers[path]) == keys, path

    overview = answers["/api/v1/overview"]
    assert overview["node"] == "single"
    assert overview["flows"]["tcp"] >= 2  # the PBX's link and the woken phone's flow
    assert overview["pbx_links"] == [
        {"serial": SERIAL, "online": True, "transport": "tcp", "since": overview["time"]}
    ]
    assert overview["registered_phones"] == 1
    assert overview["parked_calls"] == 0
    wakes = overview["wakes"]
    assert wakes["window_s"] == 300
    assert wakes["attempted"] == 1
    assert wakes["delivered"] == 1
    assert wakes["success_rate"] == 1.0
    assert wakes["delivery_p50_ms"] is not None
    assert wakes["delivery_p95_ms"] >= wakes["delivery_p50_ms"]
    assert {"provider": "apns", "outcome": "delivered", "count": 1} in overview["pushes"]
    assert overview["dead_tokens_per_min"] == 0

    (usage,) = answers["/api/v1/usage"]["tenants"]
    assert usage == {
        "tenant": TENANT,
        "month": "2026-03",
        "active_installs": 1,
        "state": "provisional",
        "digest": None,
    }

    crashes = answers["/api/v1/crashes"]
    assert crashes["projects"] == [{"project": "1", "reports": 1, "last_at": console.clock.now()}]
    (report,) = crashes["reports"]
    assert report["id"] == crash_id
    assert report["level"] == "error"
    assert report["platform"] == "cocoa"
    assert report["release"] == "5.2.1"
    detail = answers["detail"]
    assert detail["id"] == crash_id
    assert detail["project"] == "1"
    assert "failed" in json.dumps(detail["event"])

    privacy = answers["/api/v1/privacy"]
    categories = {c["name"]: c for c in privacy["categories"]}
    assert categories["registration"]["records"] == 1
    assert categories["registration"]["limit_s"] == 365 * 86400 or (
        categories["registration"]["limit_s"] > 0
    )
    assert categories["crash_report"]["records"] == 1
    assert categories["crash_report"]["next_deletion_at"] >= console.clock.now() + 90 * 86400
    assert categories["relay"]["storage"] == "memory"
    assert privacy["audit"]["verdict"] == "ok"
    assert privacy["audit"]["taken_at"] == console.clock.now()

    cluster = answers["/api/v1/cluster"]
    assert cluster["enabled"] is False
    assert cluster["redis"] is None
    assert cluster["store"]["backend"] == "sqlite"
    assert cluster["store"]["ok"] is True
    assert cluster["nodes"][0]["node_id"] == "single"
    assert cluster["nodes"][0]["flows"] >= 2

    text = json.dumps(answers)
    leaks = [*console.secrets_used, phone.spec.user, "203.0.113.7", "127.0.0.1"]
    assert phone.token
    for secret in leaks:
        assert secret not in text, f"{secret!r} appears in a console answer"


async def test_the_crash_list_takes_a_project_and_a_limit_and_refuses_bad_ones(
    console: ConsoleWorld,
) -> None:
    async with aiohttp.ClientSession() as http:
        first = await crash_report(console, http, "alice")
        console.clock.advance(1)
        second = await crash_report(console, http, "bob")
    async with console.logged_in() as admin:
        newest = await admin.json("/api/v1/crashes?limit=1")
        assert [r["id"] for r in newest["reports"]] == [second]
        assert newest["projects"][0]["reports"] == 2
        both = await admin.json("/api/v1/crashes?project=1")
        assert [r["id"] for r in both["reports"]] == [second, first]
        assert (await admin.json("/api/v1/crashes?project=2"))["reports"] == []
        for query in ("limit=0", "limit=501", "limit=x", "project=" + "p" * 201):
            async with admin.http.get(f"{admin.base}/api/v1/crashes?{query}") as answer:
                assert answer.status == 400, query
                assert set(await answer.json()) == {"error", "detail"}
        for report_id in ("nope", "0" * 32):
            async with admin.http.get(f"{admin.base}/api/v1/crashes/{report_id}") as answer:
                assert answer.status == 404
                assert (await answer.json())["error"] == "not_found"


async def _next_event(stream: aiohttp.ClientResponse) -> dict[str, Any]:
    raw = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), LONGEST_WAIT)
    head, _, data = raw.decode().rstrip("\n").partition("\n")
    assert head == "event: overview"
    assert data.startswith("data: ")
    event = json.loads(data.removeprefix("data: "))
    assert isinstance(event, dict)
    return event


async def test_the_event_stream_sends_an_overview_at_each_tick_and_it_changes(
    console: ConsoleWorld,
) -> None:
    """One event on connecting and one per tick (the injected ticker); a phone that
    registers between two ticks shows in the second; the charts' series grow by one
    point per tick, at the clock's times."""
    await console.phone()
    async with (
        console.logged_in() as admin,
        admin.http.get(f"{admin.base}/api/v1/events") as stream,
    ):
        assert stream.status == 200
        assert stream.content_type == "text/event-stream"
        assert stream.headers["Cache-Control"] == "no-store"
        first = await _next_event(stream)
        console.clock.advance(2)
        console.ticker.tick()
        second = await _next_event(stream)
        assert second["time"] == first["time"] + 2
        assert second["registered_phones"] == 1
        await console.phone()
        console.clock.advance(2)
        console.ticker.tick()
        third = await _next_event(stream)
        assert third["registered_phones"] == 2
        assert third["time"] == second["time"] + 2
        flows = third["series"]["flows_total"]
        assert [t for t, _ in flows[-2:]] == [second["time"], third["time"]]
        assert flows[-1][1] > flows[-2][1]  # the new phone's flow
        assert set(third["series"]) == {
            "wake_success_rate",
            "delivery_p95_ms",
            "pushes_per_s",
            "flows_total",
            "shedding_per_s",
            "crash_ingest_per_s",
        }


async def test_the_event_stream_ends_when_the_session_does(console: ConsoleWorld) -> None:
    async with (
        console.logged_in() as admin,
        admin.http.get(f"{admin.base}/api/v1/events") as stream,
    ):
        await _next_event(stream)
        answer = await admin.post("/logout", data={"csrf": admin.csrf}, allow_redirects=False)
        assert answer.status == 303
        console.ticker.tick()
        rest = await asyncio.wait_for(stream.content.read(), LONGEST_WAIT)
        assert rest == b""  # the stream closed at the tick, sending nothing more


async def test_the_actions_run_the_audit_and_the_sweeper(console: ConsoleWorld) -> None:
    async with aiohttp.ClientSession() as http:
        await crash_report(console, http, "alice")
    async with console.logged_in() as admin:
        assert (await admin.post("/api/v1/actions/audit")).status == 200
        assert (await admin.json("/api/v1/privacy"))["audit"]["verdict"] == "ok"
    console.clock.advance(91 * 86400)  # past the crash reports' 90 days
    async with console.logged_in() as admin:
        answer = await admin.post("/api/v1/actions/audit")
        assert answer.status == 200
        audit = (await admin.json("/api/v1/privacy"))["audit"]
        assert audit["verdict"] == "violation"  # the sweeper has not run since
        assert "crash_report" in [p["category"] for p in audit["problems"]]
        async with admin.http.post(
            f"{admin.base}/api/v1/actions/sweep", headers={"X-CSRF-Token": admin.csrf}
        ) as swept:
            assert swept.status == 200
            body = await swept.json()
        assert body["swept"] is True
        assert body["deleted"]["crash_report"] == 1
        assert body["audit"]["verdict"] == "ok"
        assert body["audit"]["taken_at"] == console.clock.now()
        assert (await admin.json("/api/v1/crashes"))["reports"] == []


async def test_the_privacy_page_takes_an_audit_snapshot_older_than_ten_seconds_again(
    console: ConsoleWorld,
) -> None:
    """The sweeper refreshes the snapshot hourly; records stored since show on the
    privacy page once the snapshot is over AUDIT_MAX_AGE old, not an hour later."""
    async with console.logged_in() as admin:
        assert (await admin.post("/api/v1/actions/audit")).status == 200
        async with aiohttp.ClientSession() as http:
            await crash_report(console, http, "alice")
        counts = {
            c["name"]: c["records"] for c in (await admin.json("/api/v1/privacy"))["categories"]
        }
        assert counts["crash_report"] == 0, "a fresh snapshot serves the page"
        console.clock.advance(11)
        privacy = await admin.json("/api/v1/privacy")
        counts = {c["name"]: c["records"] for c in privacy["categories"]}
        assert counts["crash_report"] == 1
        assert privacy["audit"]["taken_at"] == console.clock.now()

"""The operator console in a real browser: Debian's chromium, driven by Playwright,
against a real `softrelay serve` that a short `softrelay simulate` run fills.

One serve with the console on a free loopback port and its admin token in a file; a
wrong token is refused (401, the login page says so, no session cookie); the right one
logs in. The overview is open while `simulate` plays: a live figure changes with no
reload. Then every page (overview, usage, crash reports and one report, privacy,
cluster) shows the run's figures, the same as the console's JSON API, which match the
run's own summary; a screenshot and the HTML of each go to the artifacts
(tests/console/browser.py: $SOFTRELAY_ARTIFACTS/console or var/artifacts/console). All
along, the browser's console shows no error and no request leaves the console's origin.
Last, with the server stopped, its store gives the run's push tokens and phone
addresses: none of them, no password of the run and no secret of the configuration is
in any page's HTML or in the event stream.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from console.markup import count
from privacy.clock import SystemClock
from privacy.keys import load_keyring
from privacy.policy import load_policy
from privacy.store import Store
from tests import peers
from tests.console.browser import Watch, artifacts, chromium, launch, read_events
from tests.limits import LONGEST_WAIT

CRASH_KEY = "0c0ffee0123456789abcdef012345678"
CONFIG = """
[usage]
ip_burst = 1000
[[usage.tenant]]
id = "demo"
key = "file:{usage_key}"

[[crashreports.project]]
id = "1"
key = "{crash_key}"

[console]
listen = "127.0.0.1:0"
admin_token = "file:{token_file}"
tick = "1s"
"""
# Phones answer or decline: at speed inf a call left ringing would ring out only at its
# real-time bound.
SCENARIO = "[answers]\nanswer = 3\ndecline = 1\n"
PHONES = 12
# What no page may show, by its shape: simulate's SIP user names and passwords, and the
# fake personal data its apps put into their crash reports (mockphone/simulate.py
# crash_details), which the relay scrubs before it stores a report.
NEVER_SHOWN = {
    "a SIP user name": re.compile(r"\b(?:ios|android|desktop)\d+\b"),
    "a SIP password": re.compile(r"pw-[0-9a-f]{16}"),
    "an IP address in a report": re.compile(r"203\.0\.113\.\d+"),
    "a phone number in a report": re.compile(r"\+49 30 555\d{5}"),
    "an e-mail address in a report": re.compile(r"[a-z0-9]+@example\.com"),
    "a name in a report": re.compile("Erika Mustermann"),
}
WAIT_MS = 15_000  # the longest a page may take to show a figure


@dataclass
class Run:
    """The served console and what the test saw of it."""

    server: peers.Server
    url: str  # the console's origin
    token: str
    secrets: list[str]  # of the configuration: token, keys, the PBX's secret
    texts: dict[str, str] = field(default_factory=dict)  # page HTML and the event stream


async def _start(tmp_path: Path) -> Run:
    token = secrets.token_urlsafe(32)
    usage_key = f"usage-key-{secrets.token_hex(16)}"
    for name, value in (("console.token", token), ("usage.key", usage_key)):
        (tmp_path / name).write_text(value + "\n", encoding="utf-8")
    config = CONFIG.format(
        usage_key=tmp_path / "usage.key", crash_key=CRASH_KEY, token_file=tmp_path / "console.token"
    )
    server = await peers.start_server(tmp_path, config)
    # `serve` prints where the console listens before its start-up report ends.
    printed = re.findall(r"softrelay: console (http://127\.0\.0\.1:\d+)/", server.log())
    (url,) = printed
    return Run(server, url, token, [token, usage_key, CRASH_KEY, server.secret])


async def _simulate(run: Run, tmp_path: Path) -> dict[str, Any]:
    """A short, seeded `softrelay simulate` against the serve: calls to sleeping phones
    (pushes, wakes), usage pings, opted-in crash reports."""
    (tmp_path / "answers.toml").write_text(SCENARIO, encoding="utf-8")
    summary = tmp_path / "summary.json"
    base = f"http://127.0.0.1:{run.server.http_port()}"
    status, output = await peers.run_cli(
        "simulate",
        "--config",
        str(run.server.config),
        "--target",
        f"{base}?sip={run.server.ports['tcp']}",
        "--scenario",
        str(tmp_path / "answers.toml"),
        "--phones",
        str(PHONES),
        "--duration",
        "20",
        "--speed",
        "inf",
        "--call-rate",
        "1",
        "--sleep-rate",
        "0.3",
        "--crash-rate",
        "0.5",
        "--opt-in",
        "1",
        "--seed",
        "20",
        "--no-live",
        "--json",
        str(summary),
        # Its apps keep their usage state under the temp dir: a fresh one, so that every
        # install pings this month whatever ran on this machine before.
        env={"TMPDIR": str(tmp_path)},
    )
    assert status == 0, output
    answer = orjson.loads(summary.read_bytes())
    assert isinstance(answer, dict)
    assert answer["registrations"] == {"ok": PHONES, "failed": {}}, answer
    assert answer["pings"] == {"sent": PHONES, "by_status": {"202": PHONES}}, answer
    return answer


async def _refused(context: BrowserContext, run: Run) -> None:
    """A wrong token: 401, the login page again saying so, no session cookie."""
    page = await context.new_page()
    await page.goto(run.url + "/")
    assert page.url == run.url + "/login", "a page without a session sends to the login"
    await page.locator("input[name=token]").fill("wrong-" + run.token)
    async with page.expect_response(
        lambda r: r.url == run.url + "/login" and r.request.method == "POST"
    ) as answer:
        await page.locator("input[name=token]").press("Enter")
    assert (await answer.value).status == 401
    await expect(page.get_by_role("alert")).to_contain_text("wrong admin token")
    cookies = {c.get("name") for c in await context.cookies()}
    assert "softrelay_console" not in cookies
    await page.close()


async def _login(page: Page, run: Run) -> None:
    await page.goto(run.url + "/login")
    await page.locator("input[name=token]").fill(run.token)
    async with page.expect_navigation(url=run.url + "/"):
        await page.locator("input[name=token]").press("Enter")
    (cookie,) = [c for c in await page.context.cookies() if c.get("name") == "softrelay_console"]
    assert cookie.get("httpOnly") is True
    assert cookie.get("sameSite") == "Strict"
    assert cookie.get("secure") is False  # no TLS on this listener
    assert cookie.get("path") == "/"


async def _save(page: Page, run: Run, name: str) -> None:
    """The page's screenshot and HTML among the artifacts; its HTML kept for the check."""
    folder = artifacts()
    await page.screenshot(path=folder / f"{name}.png", full_page=True)
    html = await page.content()
    (folder / f"{name}.html").write_text(html, encoding="utf-8")
    run.texts[name] = html


async def _run_secrets(server: peers.Server) -> tuple[set[str], set[str]]:
    """The push tokens and phone addresses of the run, from the stopped server's store."""
    store = await Store.create(
        load_policy("auerproxy"), load_keyring("", server.data_dir), server.data_dir, SystemClock()
    )
    try:
        bindings = await store.find("registration", pbx_serial=peers.SERIAL)
    finally:
        await store.close()
    tokens = {str(b.fields["push_token"]) for b in bindings if b.fields.get("push_token")}
    addresses = {str(b.fields["phone_ip"]) for b in bindings if b.fields.get("phone_ip")}
    return tokens, addresses


async def test_the_console_in_chromium_shows_a_simulate_run_and_no_secret(
    tmp_path: Path,
) -> None:
    chromium()  # a skip, or in CI a failure, before anything starts
    run = await _start(tmp_path)
    try:
        async with asyncio.timeout(LONGEST_WAIT), async_playwright() as playwright:
            browser = await launch(playwright)
            try:
                await _browse(browser, run, tmp_path)
            finally:
                await browser.close()
        assert await run.server.stop() == 0, run.server.log()
    except BaseException:
        await run.server.kill()
        raise
    tokens, addresses = await _run_secrets(run.server)
    # The checks below can fail: the run pushed to these tokens, from phones that each
    # connected from an address of its own (127.1.x.y), not the console's 127.0.0.1.
    assert 0 < len(tokens) <= PHONES, tokens
    assert len(addresses) == PHONES, addresses
    assert "127.0.0.1" not in addresses
    for name, text in run.texts.items():
        for secret in (*tokens, *addresses, *run.secrets):
            assert secret not in text, f"{name} shows a secret of the run"
        for what, shape in NEVER_SHOWN.items():
            assert not shape.search(text), f"{name} shows {what}: {shape.search(text)}"


async def _browse(browser: Browser, run: Run, tmp_path: Path) -> None:
    """Everything the browser does."""
    # The refused login in a context of its own: chromium reports the 401 in the console,
    # and that is the one error there may be.
    refused = await browser.new_context()
    refused_watch = Watch.on(refused)
    await _refused(refused, run)
    await refused.close()
    status_401 = f"the server responded with a status of 401 (Unauthorized) at {run.url}/login"
    assert all(e.endswith(status_401) for e in refused_watch.console_errors), refused_watch
    assert not refused_watch.page_errors, refused_watch
    assert not refused_watch.foreign(run.url), refused_watch

    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    watch = Watch.on(context)
    page = await context.new_page()
    await _login(page, run)
    summary = await _live_during_the_run(page, run, tmp_path)
    await _pages(page, run, summary)
    cookie = "; ".join(f"{c.get('name')}={c.get('value')}" for c in await context.cookies())
    async with asyncio.timeout(WAIT_MS / 1000):
        run.texts["events"] = events = await read_events(run.url + "/api/v1/events", cookie, 3)
    assert events.count("event: overview\n") == 3, events
    await context.close()

    assert not watch.console_errors, watch.console_errors
    assert not watch.page_errors, watch.page_errors
    assert not watch.foreign(run.url), watch.foreign(run.url)
    # What the watch saw: the pages, their script and the live stream, all of the origin.
    for path in ("/", "/static/console.js", "/api/v1/events", "/privacy"):
        assert run.url + path in watch.requests, watch.requests


async def _api(page: Page, run: Run, path: str) -> Any:
    """The console's JSON at `path`, with the page's session."""
    response = await page.request.get(run.url + path)
    assert response.status == 200, await response.text()
    return await response.json()


async def _live_during_the_run(page: Page, run: Run, tmp_path: Path) -> dict[str, Any]:
    """The overview, open before the run, shows its wakes as they come: no reload."""
    delivered = page.locator('[data-figure="wakes.delivered"]')
    await expect(delivered).to_have_text("0")
    # A mark in the page's window: a reload would take it away.
    await page.evaluate("window.softrelayTestMark = 'not reloaded'")
    summary = await _simulate(run, tmp_path)
    woken = summary["calls"]["woken"]
    assert woken > 0, summary
    await expect(delivered).to_have_text(str(woken), timeout=WAIT_MS)
    assert await page.evaluate("window.softrelayTestMark") == "not reloaded"
    await _save(page, run, "overview-live")
    return summary


async def _pages(page: Page, run: Run, summary: dict[str, Any]) -> None:
    """Every page, each with the run's figures (as the API gives them, as the run
    counted them), its screenshot and HTML saved."""
    await page.goto(run.url + "/")
    overview = await _api(page, run, "/api/v1/overview")
    woken = summary["calls"]["woken"]
    assert overview["wakes"]["delivered"] == woken, overview
    assert overview["registered_phones"] == PHONES, overview
    assert sum(p["count"] for p in overview["pushes"]) == summary["pushes"]["delivered"]
    await expect(page.locator('[data-figure="wakes.delivered"]')).to_have_text(str(woken))
    await expect(page.locator('[data-figure="registered_phones"]')).to_have_text(str(PHONES))
    for push in overview["pushes"]:
        row = page.locator('[data-figure="pushes"] tr').filter(has_text=push["outcome"])
        await expect(row.filter(has_text=push["provider"])).to_contain_text(str(push["count"]))
    await _save(page, run, "overview")

    await page.goto(run.url + "/usage")
    usage = await _api(page, run, "/api/v1/usage")
    (tenant,) = usage["tenants"]
    assert (tenant["tenant"], tenant["active_installs"]) == ("demo", PHONES), usage
    row = page.locator("#usage tr").filter(has_text="demo")
    await expect(row).to_contain_text(str(PHONES))
    await expect(row).to_contain_text(tenant["month"])
    await _save(page, run, "usage")

    await page.goto(run.url + "/crashes")
    crashes = await _api(page, run, "/api/v1/crashes")
    sent = summary["crash_reports"]["opted_in"]
    assert sent > 0, summary
    (project,) = crashes["projects"]
    assert (project["project"], project["reports"]) == ("1", sent), crashes
    row = page.locator("#projects tbody tr").filter(has=page.get_by_role("link", name="1"))
    await expect(row.locator("td.num")).to_have_text(str(sent))
    await _save(page, run, "crashes")
    newest = crashes["reports"][0]
    await page.locator(f'a[href="/crashes/{newest["id"]}"]').first.click()
    await expect(page).to_have_url(f"{run.url}/crashes/{newest['id']}")
    detail = await _api(page, run, f"/api/v1/crashes/{newest['id']}")
    report = page.locator("pre.report")
    await expect(report).to_contain_text(detail["event"]["event_id"])
    # The app put a phone number and an e-mail address in: the stored report has the
    # scrubber's marks where they were (NEVER_SHOWN checks nothing of them is left).
    await expect(report).to_contain_text("call to [phone] from [email]")
    await _save(page, run, "crash")

    # The records per category are the retention audit's snapshot, which may be a minute
    # old: the page's action (a CSRF-checked POST from console.js) takes it again now.
    await page.goto(run.url + "/privacy")
    await page.get_by_role("button", name="Run the audit now").click()
    await expect(page.locator("#action-result")).to_contain_text("Run the audit now: done.")
    privacy = await _api(page, run, "/api/v1/privacy")
    stored = {c["name"]: c["records"] for c in privacy["categories"]}
    assert stored["registration"] == PHONES, privacy
    assert stored["crash_report"] == sent, privacy
    for name, records in stored.items():
        row = page.locator("#categories tr").filter(has=page.locator(f'code:text-is("{name}")'))
        await expect(row.locator("td.num")).to_have_text(count(records))
    await _save(page, run, "privacy")

    await page.goto(run.url + "/cluster")
    cluster = await _api(page, run, "/api/v1/cluster")
    assert cluster["enabled"] is False, cluster
    assert cluster["store"]["ok"] is True, cluster
    await expect(page.locator("#services")).to_contain_text("sqlite")
    await _save(page, run, "cluster")

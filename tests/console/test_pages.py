"""The console's pages over HTTP (aiohttp's test client, loopback): each renders for a
logged-in session and sends anyone else to /login; each shows the plan's figures at
first render, in the formats console.js uses for its updates; what comes from the data
is escaped; nothing in a page needs more than the Content-Security-Policy's 'self'; the
static route serves exactly the console's files with their content types; and the
vendored files are the ones VENDORED.md names.

The figures are a fake with fixed documents in the plan's shapes (console/figures.py's
own tests check that the running services produce them)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import async_playwright, expect

from console.api import SAMPLER
from console.markup import count, decimal, duration, el, ms, percent, time
from console.overview import OVERVIEW_CHARTS, overview_page
from console.pages import STATIC, add_pages
from console.server import SECURITY_HEADERS
from console.sessions import COOKIE, GATE, LOGIN_COOKIE, Gate, login, logout, require_api
from privacy.clock import ManualClock
from softrelay.app import CONSOLE
from tests.console.browser import Watch, launch
from tests.console.conftest import SERIAL, START, TENANT, ConsoleWorld
from webapi.errors import refusals
from webapi.openapi import OpenApi

NOW = 1_796_000_000.0
TOKEN = "console-admin-token-0123456789"
TTL = 3600
HOSTILE = '<script>alert("x")</script>&'
HOSTILE_ATTRIBUTE = '"><img src=x onerror=alert(1)>'
CSP = SECURITY_HEADERS["Content-Security-Policy"]
PAGES = ("/", "/usage", "/crashes", "/crashes/" + "a" * 32, "/privacy", "/cluster")
CSP_SOURCES = ("/static/",)

OVERVIEW: dict[str, Any] = {
    "time": NOW,
    "node": "single",
    "flows": {"udp": 3, "tcp": 5, "tls": 7, "ws": 11},
    "pbx_links": [
        {"serial": "demo-0001", "online": True, "transport": "tls", "since": NOW - 90},
        {"serial": HOSTILE, "online": False, "transport": None, "since": NOW - 7200},
    ],
    "pbx_links_online": 1,
    "pbx_links_total": 2,
    "registered_phones": 42,
    "parked_calls": 2,
    "wakes": {
        "window_s": 300,
        "attempted": 20,
        "delivered": 19,
        "success_rate": 0.95,
        "delivery_p50_ms": 4.25,
        "delivery_p95_ms": 812.5,
    },
    "pushes": [
        {"provider": "apns", "outcome": "delivered", "count": 12},
        {"provider": "fcm", "outcome": "dead_token", "count": 1},
    ],
    "dead_tokens_per_min": 0.2,
    "shedding": {"sip_overload": 4, "crash_busy": 0},
    "series": {
        "wake_success_rate": [[NOW - 4, 1.0], [NOW - 2, None], [NOW, 0.95]],
        "delivery_p95_ms": [[NOW - 2, 700.0], [NOW, 812.5]],
        "pushes_per_s": [[NOW, 1.5]],
        "pushes_per_s.apns": [[NOW, 1.0]],
        "pushes_per_s.fcm": [[NOW, 0.5]],
        "flows_total": [[NOW, 26]],
        "shedding_per_s": [[NOW, 0.0]],
        "crash_ingest_per_s": [[NOW, 0.1]],
    },
}
REPORT_ID = "a" * 32
REPORT = {
    "id": REPORT_ID,
    "project": HOSTILE_ATTRIBUTE,
    "received_at": NOW - 60,
    "level": "error",
    "title": HOSTILE,
    "release": "app@1.2.3",
    "platform": "cocoa",
}
CRASH_EVENT = {"message": HOSTILE, "exception": {"values": [{"type": "</pre><script>"}]}}
USAGE = {
    "tenants": [
        {
            "tenant": "demo",
            "month": "2026-12",
            "active_installs": 17,
            "state": "provisional",
            "digest": None,
        },
        {
            "tenant": HOSTILE,
            "month": "2026-11",
            "active_installs": 1234,
            "state": "closed",
            "digest": "sha256:" + "b" * 64,
        },
    ]
}
PRIVACY = {
    "categories": [
        {
            "name": "registration",
            "title": "Registrations",
            "storage": "database",
            "records": 9,
            "oldest_age_s": 90061,
            "limit_s": 31536000,
            "next_deletion_at": NOW + 3600,
            "last_sweep_at": NOW - 65,
        },
        {
            "name": "relay",
            "title": HOSTILE,
            "storage": "memory",
            "records": 0,
            "oldest_age_s": None,
            "limit_s": 0,
            "next_deletion_at": None,
            "last_sweep_at": None,
        },
    ],
    "audit": {
        "verdict": "violation",
        "taken_at": NOW - 30,
        "problems": [{"category": "registration", "detail": HOSTILE}],
    },
    "dsr": [{"at": NOW - 600, "action": "erase", "outcome": "done", "via": "pbx"}],
}
CLUSTER = {
    "enabled": True,
    "nodes": [
        {"node_id": "node-a", "flows": 10, "load": 0.25, "last_beat": NOW - 1},
        {"node_id": HOSTILE, "flows": 4, "load": 0.5, "last_beat": NOW - 2},
    ],
    "redis": {"ok": True, "latency_ms": 0.8},
    "store": {"backend": "postgresql", "ok": False, "latency_ms": None},
}
ALONE = {
    "enabled": False,
    "nodes": [],
    "redis": None,
    "store": {"backend": "sqlite", "ok": True, "latency_ms": 1.5},
}


@dataclass
class FakeFigures:
    """The documents of the plan's shapes; the crash lists it was asked for."""

    cluster_doc: Mapping[str, Any] = field(default_factory=lambda: CLUSTER)
    asked: list[tuple[str | None, int]] = field(default_factory=list)

    async def overview(self) -> Mapping[str, Any]:
        return OVERVIEW

    async def usage(self) -> Mapping[str, Any]:
        return USAGE

    async def crashes(self, project: str | None, limit: int) -> Mapping[str, Any]:
        self.asked.append((project, limit))
        projects = [{"project": HOSTILE_ATTRIBUTE, "reports": 3, "last_at": NOW - 60}]
        return {"projects": projects, "reports": [REPORT]}

    async def crash(self, event_id: str) -> Mapping[str, Any] | None:
        if event_id != REPORT_ID:
            return None
        return {"id": REPORT_ID, "project": "demo", "received_at": NOW - 60, "event": CRASH_EVENT}

    async def privacy(self) -> Mapping[str, Any]:
        return PRIVACY

    async def cluster(self) -> Mapping[str, Any]:
        return self.cluster_doc


@dataclass
class Site:
    """The pages on an app of their own, with the fake figures."""

    client: TestClient[web.Request, web.Application]
    figures: FakeFigures
    clock: ManualClock
    openapi: OpenApi

    def log_in(self) -> str:
        """A session's cookie set on the client; its CSRF token."""
        session = self.client.app[GATE].sessions.create()
        self.client.session.cookie_jar.update_cookies({COOKIE: session.id})
        return session.csrf

    async def page(self, path: str) -> tuple[int, str]:
        async with self.client.get(path, allow_redirects=False) as answer:
            return answer.status, await answer.text()


EVENTS = web.AppKey("test_events", asyncio.Queue[Mapping[str, Any] | None])


async def _events(request: web.Request) -> web.StreamResponse:
    """The event stream as console/api.py sends it, one `overview` event per document
    the test queues; None ends it."""
    require_api(request)
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await stream.prepare(request)
    while (doc := await request.app[EVENTS].get()) is not None:
        await stream.write(b"event: overview\ndata: " + orjson.dumps(doc) + b"\n\n")
    return stream


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)  # the admin listener's, CSP included


def site_app(figures: FakeFigures, clock: ManualClock, openapi: OpenApi) -> web.Application:
    """The pages with the session routes, the listener's headers and a test's event
    stream (console/server.py builds the real one the same way)."""
    app = web.Application(middlewares=[refusals])
    app.on_response_prepare.append(_security_headers)
    app[GATE] = Gate(TOKEN, TTL, clock, tls=False)
    app[EVENTS] = asyncio.Queue()
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/api/v1/events", _events)
    add_pages(app, figures_of=lambda request: figures, openapi=openapi)
    return app


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    clock, figures, openapi = ManualClock(NOW), FakeFigures(), OpenApi("console", "test")
    async with TestClient(TestServer(site_app(figures, clock, openapi), host="127.0.0.1")) as c:
        yield Site(c, figures, clock, openapi)


# --- a small tree of a page --------------------------------------------------------


def _attribute(name: str) -> str:
    """`class_` -> class, `data_figure` -> data-figure (as console.markup writes them)."""
    return name.rstrip("_").replace("_", "-")


VOID = frozenset({"meta", "link", "input", "br", "hr", "img"})


@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def walk(self) -> list[Node]:
        found = [self]
        for child in self.children:
            if isinstance(child, Node):
                found += child.walk()
        return found

    def all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        return [
            node
            for node in self.walk()
            if (tag is None or node.tag == tag)
            and all(node.attrs.get(_attribute(name)) == v for name, v in attrs.items())
        ]

    def one(self, tag: str | None = None, **attrs: str) -> Node:
        (node,) = self.all(tag, **attrs)
        return node


class Tree(HTMLParser):
    """The page as nodes; a nesting error fails the parse."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.open = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        self.open[-1].children.append(node)
        if tag not in VOID:
            self.open.append(node)

    def handle_endtag(self, tag: str) -> None:
        assert self.open[-1].tag == tag, f"</{tag}> closes <{self.open[-1].tag}>"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.open[-1].children.append(data)


def parse(page: str) -> Node:
    tree = Tree()
    tree.feed(page)
    tree.close()
    assert tree.open == [tree.root], "an element is left open"
    return tree.root


def cells(table: Node) -> list[list[str]]:
    return [[td.text for td in tr.all("td")] for tr in table.all("tr") if tr.all("td")]


# --- sessions ----------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
async def test_a_page_without_a_session_sends_to_the_login(site: Site, path: str) -> None:
    async with site.client.get(path, allow_redirects=False) as answer:
        assert answer.status == 303
        assert answer.headers["Location"] == "/login"


@pytest.mark.parametrize("path", PAGES)
async def test_every_page_renders_for_a_session(site: Site, path: str) -> None:
    csrf = site.log_in()
    async with site.client.get(path, allow_redirects=False) as answer:
        assert answer.status == 200
        assert answer.content_type == "text/html"
        assert answer.charset == "utf-8"
        assert answer.headers["Cache-Control"] == "no-store"
        root = parse(await answer.text())
    assert root.one("meta", name="csrf-token").attrs["content"] == csrf
    logout_form = root.one("form", action="/logout")
    assert logout_form.attrs["method"] == "post"
    assert logout_form.one("input", name="csrf").attrs["value"] == csrf
    links = [a.attrs["href"] for a in root.one("nav").all("a")]
    assert links == ["/", "/usage", "/crashes", "/privacy", "/cluster"]


async def test_an_expired_session_sends_to_the_login(site: Site) -> None:
    site.log_in()
    assert (await site.page("/"))[0] == 200
    site.clock.advance(TTL)
    assert (await site.page("/"))[0] == 303


async def test_the_login_form_logs_in_with_the_admin_token(site: Site) -> None:
    async with site.client.get("/login") as answer:
        assert answer.status == 200
        root = parse(await answer.text())
    form = root.one("form", action="/login")
    assert form.attrs["method"] == "post"
    assert form.one("input", name="token").attrs["type"] == "password"
    csrf = form.one("input", name="csrf").attrs["value"]
    assert (
        csrf
        == site.client.session.cookie_jar.filter_cookies(site.client.make_url("/"))[
            LOGIN_COOKIE
        ].value
    )
    wrong = {"token": "not-the-token-at-all", "csrf": csrf}
    async with site.client.post("/login", data=wrong, allow_redirects=False) as answer:
        assert answer.status == 401
        refused = parse(await answer.text())
    assert refused.one("p", role="alert").text == "wrong admin token"
    right = {"token": TOKEN, "csrf": csrf}
    async with site.client.post("/login", data=right, allow_redirects=False) as answer:
        assert answer.status == 303
        assert answer.headers["Location"] == "/"
    assert (await site.page("/"))[0] == 200
    async with site.client.get("/login", allow_redirects=False) as answer:
        assert answer.status == 303  # logged in already
        assert answer.headers["Location"] == "/"


async def test_the_logout_form_ends_the_session(site: Site) -> None:
    csrf = site.log_in()
    form = {"csrf": csrf}
    async with site.client.post("/logout", data=form, allow_redirects=False) as answer:
        assert answer.status == 303
    assert (await site.page("/"))[0] == 303


# --- the figures -------------------------------------------------------------------


def figures(root: Node) -> dict[str, tuple[str, str]]:
    """Each live figure: path -> (format, text)."""
    return {
        str(node.attrs["data-figure"]): (str(node.attrs["data-format"]), node.text)
        for node in root.all()
        if "data-figure" in node.attrs
    }


async def test_the_overview_shows_every_figure_live(site: Site) -> None:
    site.log_in()
    root = parse((await site.page("/"))[1])
    shown = figures(root)
    assert {path: shown[path] for path in shown if path not in TABLES} == {
        "node": ("plain", "single"),
        "time": ("time", time(NOW)),
        "flows.udp": ("count", "3"),
        "flows.tcp": ("count", "5"),
        "flows.tls": ("count", "7"),
        "flows.ws": ("count", "11"),
        "pbx_links_online": ("count", "1"),
        "pbx_links_total": ("count", "2"),
        "registered_phones": ("count", "42"),
        "parked_calls": ("count", "2"),
        "wakes.success_rate": ("percent", "95.0 %"),
        "wakes.delivered": ("count", "19"),
        "wakes.attempted": ("count", "20"),
        "wakes.delivery_p50_ms": ("ms", "4.3 ms"),
        "wakes.delivery_p95_ms": ("ms", "813 ms"),
        "dead_tokens_per_min": ("decimal", "0.20"),
    }
    assert "Wakes, last 5 min" in root.text
    assert "1 of 2" in root.text  # PBX links online
    links = root.one("tbody", data_figure="pbx_links")
    assert cells(links) == [
        ["demo-0001", "online", "tls", time(NOW - 90)],
        [HOSTILE, "offline", "—", time(NOW - 7200)],
    ]
    pushes = root.one("tbody", data_figure="pushes")
    assert cells(pushes) == [["apns", "delivered", "12"], ["fcm", "dead_token", "1"]]
    shedding = root.one("tbody", data_figure="shedding")
    assert cells(shedding) == [["crash_busy", "0"], ["sip_overload", "4"]]


TABLES = ("pbx_links", "pushes", "shedding")


async def test_the_overview_charts_start_from_the_series(site: Site) -> None:
    site.log_in()
    root = parse((await site.page("/"))[1])
    charts = {str(n.attrs["data-chart"]): n for n in root.all("div") if "data-chart" in n.attrs}
    assert list(charts) == [
        "wake_success_rate",
        "delivery_p95_ms",
        "pushes_per_s",
        "flows_total",
        "shedding_per_s",
        "crash_ingest_per_s",
    ]
    series = OVERVIEW["series"]
    for name, chart in charts.items():
        own = {key: points for key, points in series.items() if key.split(".")[0] == name}
        assert json.loads(str(chart.attrs["data-series"])) == own
    assert set(json.loads(str(charts["pushes_per_s"].attrs["data-series"]))) == {
        "pushes_per_s",
        "pushes_per_s.apns",
        "pushes_per_s.fcm",
    }
    assert charts["wake_success_rate"].attrs["data-format"] == "percent"


async def test_an_empty_overview_table_says_so(site: Site) -> None:
    """Without rows the live table is there but hidden (console.js fills it), and a
    sentence says there is nothing."""
    site.log_in()
    empty = dict(OVERVIEW, pushes=[], shedding={}, pbx_links=[])

    async def overview() -> Mapping[str, Any]:
        return empty

    site.figures.overview = overview  # type: ignore[method-assign]
    root = parse((await site.page("/"))[1])
    for path in TABLES:
        body = root.one("tbody", data_figure=path)
        assert cells(body) == []
        table = next(t for t in root.all("table") if body in t.walk())
        assert "hidden" in table.attrs
        assert "hidden" not in root.one("p", data_empty=path).attrs


async def test_usage_shows_installs_state_and_digest(site: Site) -> None:
    site.log_in()
    root = parse((await site.page("/usage"))[1])
    assert cells(root.one("section", id="usage")) == [
        ["demo", "2026-12", "17", "provisional", "—"],
        [HOSTILE, "2026-11", "1234", "closed", "sha256:" + "b" * 64],
    ]


async def test_crash_reports_by_project_and_in_detail(site: Site) -> None:
    site.log_in()
    root = parse((await site.page("/crashes"))[1])
    assert cells(root.one("section", id="projects")) == [[HOSTILE_ATTRIBUTE, "3", time(NOW - 60)]]
    project_link = root.one("section", id="projects").one("a")
    assert (
        project_link.attrs["href"]
        == "/crashes?project=%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E"
    )
    assert cells(root.one("section", id="reports")) == [
        [time(NOW - 60), HOSTILE_ATTRIBUTE, "error", HOSTILE, "app@1.2.3", "cocoa"]
    ]
    assert root.one("a", href=f"/crashes/{REPORT_ID}").text == HOSTILE
    assert site.figures.asked == [(None, 100)]

    status, page = await site.page("/crashes?project=demo&limit=5")
    assert status == 200
    assert site.figures.asked[-1] == ("demo", 5)
    assert "Reports of project demo" in parse(page).text

    status, page = await site.page(f"/crashes/{REPORT_ID}")
    assert status == 200
    detail = parse(page)
    shown = json.loads(detail.one("pre").text)
    assert shown == CRASH_EVENT
    assert detail.one("dl", class_="facts").all("dd")[2].text == REPORT_ID


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=501", "limit=ten", "limit=-1", "project=" + "p" * 201]
)
async def test_a_bad_crash_filter_is_a_400_page(site: Site, query: str) -> None:
    site.log_in()
    status, page = await site.page(f"/crashes?{query}")
    assert status == 400
    assert parse(page).one("h1").text == "Not shown"
    assert site.figures.asked == []


@pytest.mark.parametrize("report_id", ["b" * 32, "x" * 129])
async def test_an_unknown_crash_report_is_a_404_page(site: Site, report_id: str) -> None:
    site.log_in()
    status, page = await site.page(f"/crashes/{report_id}")
    assert status == 404
    assert "There is no crash report of that id." in parse(page).text


async def test_privacy_shows_categories_audit_trail_and_actions(site: Site) -> None:
    csrf = site.log_in()
    root = parse((await site.page("/privacy"))[1])
    assert cells(root.one("section", id="categories")) == [
        [
            "Registrations registration",
            "database",
            "9",
            duration(90061),
            "365 d",
            time(NOW + 3600),
            time(NOW - 65),
        ],
        [f"{HOSTILE} relay", "memory", "0", "—", "at once", "—", "—"],
    ]
    assert duration(90061) == "1 d 1 h"
    audit = root.one("section", id="audit")
    assert audit.one("span").text == "violation"
    assert [li.text for li in audit.all("li")] == [f"registration: {HOSTILE}"]
    assert cells(root.one("section", id="dsr")) == [[time(NOW - 600), "erase", "done", "pbx"]]
    actions = root.all("form", method="post")
    posted = {str(form.attrs["action"]): form for form in actions if "data-action" in form.attrs}
    assert set(posted) == {"/api/v1/actions/audit", "/api/v1/actions/sweep"}
    for path, form in posted.items():
        assert form.attrs["data-action"] == path
        assert form.one("input", name="csrf").attrs["value"] == csrf
    assert root.all("output", id="action-result")


async def test_cluster_shows_nodes_health_and_a_chart(site: Site) -> None:
    site.log_in()
    root = parse((await site.page("/cluster"))[1])
    nodes = root.one("section", id="nodes")
    assert cells(nodes) == [
        ["node-a", "10", "0.3 ms", time(NOW - 1)],
        [HOSTILE, "4", "0.5 ms", time(NOW - 2)],
    ]
    assert [(tr.attrs["data-node"], tr.attrs["data-flows"]) for tr in nodes.all("tr")[1:]] == [
        ("node-a", "10"),
        (HOSTILE, "4"),
    ]
    assert cells(root.one("section", id="services")) == [
        ["Store (postgresql)", "down", "—"],
        ["Redis", "ok", ms(0.8)],
    ]
    assert root.one("div", data_chart="nodes").attrs["data-format"] == "count"


async def test_without_a_cluster_the_page_says_so(site: Site) -> None:
    site.log_in()
    site.figures.cluster_doc = ALONE
    root = parse((await site.page("/cluster"))[1])
    assert root.one("p", class_="notice").text == (
        "There is no cluster: this softrelay runs as a single node, without Redis."
    )
    assert not root.all("section", id="nodes")
    assert not [n for n in root.all() if "data-chart" in n.attrs]
    assert cells(root.one("section", id="services")) == [["Store (sqlite)", "ok", "1.5 ms"]]


# --- escaping and the Content-Security-Policy -----------------------------------------


async def test_data_is_escaped_on_every_page(site: Site) -> None:
    """The hostile strings (a crash title holding <script>, a project that closes an
    attribute) appear as text, never as markup: the only <script> elements are the
    console's two files, and no element has an event-handler attribute."""
    site.log_in()
    for path in PAGES:
        page = (await site.page(path))[1]
        assert "<script>" not in page
        assert "<img" not in page
        root = parse(page)
        scripts = [n.attrs.get("src") for n in root.all("script")]
        assert scripts == ["/static/vendor/uplot/uPlot.iife.min.js", "/static/console.js"]
        assert not root.all("img")
    detail = (await site.page(f"/crashes/{REPORT_ID}"))[1]
    assert "&lt;/pre&gt;&lt;script&gt;" in detail


async def test_no_page_needs_more_than_the_csp_allows(site: Site) -> None:
    """script-src and style-src 'self': no inline script or handler, no style element
    or attribute, no javascript: URL, and every file a page loads is the console's."""
    site.log_in()
    async with site.client.get("/login") as answer:
        pages = [await answer.text()]
    pages += [(await site.page(path))[1] for path in PAGES]
    for page in pages:
        for node in parse(page).walk():
            assert "style" not in node.attrs, node.tag
            assert node.tag != "style"
            assert not [a for a in node.attrs if a.startswith("on")], node.tag
            if node.tag == "script":
                assert node.text == ""
                assert str(node.attrs["src"]).startswith("/static/")
            for attribute in ("src", "href", "action"):
                value = node.attrs.get(attribute)
                if value is None:
                    continue
                assert value.startswith("/"), value
                assert not value.startswith("//"), value
            if node.tag == "link":
                assert str(node.attrs["href"]).startswith("/static/")


def test_markup_escapes_text_and_attributes() -> None:
    assert el("td", HOSTILE) == "<td>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;</td>"
    assert el("a", "x", href=HOSTILE_ATTRIBUTE) == (
        '<a href="&quot;&gt;&lt;img src=x onerror=alert(1)&gt;">x</a>'
    )
    assert el("td", el("b", "<"), "<") == "<td><b>&lt;</b>&lt;</td>"


@pytest.mark.parametrize(
    ("value", "form", "text"),
    [
        (None, percent, "—"),
        (True, percent, "—"),
        (0.987, percent, "98.7 %"),
        (3.14159, ms, "3.1 ms"),
        (250.4, ms, "250 ms"),
        # A tie rounds away from zero, as JavaScript's toFixed (console.js) does.
        (0.25, ms, "0.3 ms"),
        (12.5, ms, "13 ms"),
        (-0.125, decimal, "-0.13"),
        (0.0005, percent, "0.1 %"),
        (2.5, count, "3"),
        (0, time, "1970-01-01 00:00:00 UTC"),
        (0, duration, "0 s"),
        (65, duration, "1 min 5 s"),
        (3605, duration, "1 h"),
        (90061, duration, "1 d 1 h"),
        (86400 * 365, duration, "365 d"),
    ],
)
def test_formats(value: object, form: Any, text: str) -> None:
    assert form(value) == text


# --- the static files and the vendored ones --------------------------------------------

SERVED = {
    "console.js": "text/javascript",
    "console.css": "text/css",
    "favicon.svg": "image/svg+xml",
    "vendor/uplot/uPlot.iife.min.js": "text/javascript",
    "vendor/uplot/uPlot.min.css": "text/css",
    "vendor/uplot/LICENSE": "text/plain",
    "vendor/VENDORED.md": "text/markdown",
}


async def test_the_static_route_serves_the_files_with_their_types(site: Site) -> None:
    """Without a session (the login page needs the stylesheet); each file as it is on
    disk; an ETag that answers 304; every file under static/ is one of these."""
    on_disk = {p.relative_to(STATIC).as_posix() for p in STATIC.rglob("*") if p.is_file()}
    assert on_disk == set(SERVED)
    for name, content_type in SERVED.items():
        async with site.client.get(f"/static/{name}") as answer:
            assert answer.status == 200, name
            assert answer.content_type == content_type
            assert answer.charset == "utf-8"
            assert await answer.read() == (STATIC / name).read_bytes()
            etag = answer.headers["ETag"]
        assert etag == f'"{hashlib.sha256((STATIC / name).read_bytes()).hexdigest()}"'
        async with site.client.get(f"/static/{name}", headers={"If-None-Match": etag}) as again:
            assert again.status == 304
            assert await again.read() == b""


@pytest.mark.parametrize(
    "path",
    ["/static/nothing.js", "/static/%2e%2e/pages.py", "/static/vendor", "/static/..%2fviews.py"],
)
async def test_the_static_route_serves_nothing_else(site: Site, path: str) -> None:
    async with site.client.get(path) as answer:
        assert answer.status == 404
        assert (await answer.json())["error"] == "not_found"


def test_the_vendored_files_are_the_ones_vendored_md_names() -> None:
    vendor = STATIC / "vendor"
    listed = dict(
        re.findall(
            r"^\| `([^`]+)` \| `[^`]+` \| `([0-9a-f]{64})` \|$",
            (vendor / "VENDORED.md").read_text(),
            re.M,
        )
    )
    present = {
        p.relative_to(vendor).as_posix()
        for p in vendor.rglob("*")
        if p.is_file() and p.name != "VENDORED.md"
    }
    assert set(listed) == present
    for name, digest in listed.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    assert "uplot@1.6.32" in (vendor / "VENDORED.md").read_text()
    assert (
        (vendor / "uplot/uPlot.iife.min.js")
        .read_text()
        .startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
    )


def test_the_pages_are_in_the_openapi_document(site: Site) -> None:
    paths = site.openapi.document()["paths"]
    for path in ("/", "/usage", "/crashes", "/crashes/{id}", "/privacy", "/cluster", "/login"):
        assert set(paths[path]["get"]["responses"]) >= {"200", "303"}, path
    assert set(paths["/static/{path}"]["get"]["responses"]) == {"200", "304", "404"}


def test_the_console_files_are_package_data() -> None:
    """The wheel carries console/static (tests/test_install.py builds it): pyproject
    names the folders setuptools must take."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["console"]
    folders = {
        p.parent.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()
    }
    assert {f"{folder}/*" for folder in folders} <= set(globs)


# --- the pages of a running relay ------------------------------------------------------


async def _usage_ping(console: ConsoleWorld, http: aiohttp.ClientSession) -> None:
    ping = {"tenant": TENANT, "period": "2026-03", "pid": "f" * 32, "platform": "ios"}
    ping["app_version"] = "5.2.1"
    headers = {"Authorization": f"Bearer {console.tenant_key}"}
    async with http.post(f"{console.http_base}/usage/v1/ping", json=ping, headers=headers) as r:
        assert r.status == 202, await r.text()


async def _crash_report(console: ConsoleWorld, http: aiohttp.ClientSession, user: str) -> str:
    """An opted-in report naming the SIP user and an address, which scrubbing removes."""
    event = {
        "message": f"call to sip:{user}@relay.test from 203.0.113.7 failed",
        "level": "error",
        "tags": {"softrelay.opt_in": "yes"},
    }
    auth = {"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={console.crash_key}"}
    async with http.post(f"{console.http_base}/api/1/store/", json=event, headers=auth) as r:
        assert r.status == 200, await r.text()
        event_id = (await r.json())["id"]
    assert isinstance(event_id, str)
    return event_id


async def test_the_pages_of_a_running_relay_show_its_figures_and_nothing_personal(
    console: ConsoleWorld,
) -> None:
    """Through the real admin listener (console/server.py) with the real figures: a
    phone registered through the relay and woken by push, a usage ping and an opted-in
    crash report show on the pages at first render; every page and static file has the
    console's CSP; no page holds the phone's push token, user or password, the PBX
    secret, the admin token, the crash's address or the loopback address."""
    phone = await console.phone()
    await phone.sleep()
    call = await console.pbx.call(phone.spec.user)
    assert call.woken
    async with aiohttp.ClientSession() as http:
        await _usage_ping(console, http)
        crash_id = await _crash_report(console, http, phone.spec.user)
    # Two turns of the sampler (as two ticks make them): chart points, a rate per provider.
    sampler = console.app[CONSOLE].app[SAMPLER]
    for _ in range(2):
        console.clock.advance(2)
        await sampler.turn()
    pages: dict[str, str] = {}
    async with console.logged_in() as admin:
        # The categories' counts are the audit's: its snapshot taken now, as the button does.
        assert (await admin.post("/api/v1/actions/audit")).status == 200
        for path in ("/", "/usage", "/crashes", f"/crashes/{crash_id}", "/privacy", "/cluster"):
            async with admin.http.get(admin.base + path, allow_redirects=False) as answer:
                assert answer.status == 200, path
                assert answer.headers["Content-Security-Policy"] == CSP, path
                pages[path] = await answer.text()
        for name, content_type in SERVED.items():
            async with admin.http.get(f"{admin.base}/static/{name}") as answer:
                assert answer.status == 200, name
                assert answer.content_type == content_type
                assert answer.headers["Content-Security-Policy"] == CSP

    overview = parse(pages["/"])
    shown = figures(overview)
    assert shown["registered_phones"] == ("count", "1")
    assert shown["wakes.attempted"] == ("count", "1")
    assert shown["wakes.delivered"] == ("count", "1")
    assert shown["wakes.success_rate"] == ("percent", "100.0 %")
    assert int(shown["flows.tcp"][1]) >= 2  # the PBX's link and the phone's flow
    (link,) = cells(overview.one("tbody", data_figure="pbx_links"))
    assert link[:3] == [SERIAL, "online", "tcp"]
    assert ["apns", "delivered", "1"] in cells(overview.one("tbody", data_figure="pushes"))
    pushes_chart = overview.one("div", data_chart="pushes_per_s")
    by_provider = json.loads(str(pushes_chart.attrs["data-series"]))
    assert set(by_provider) == {"pushes_per_s", "pushes_per_s.apns"}
    assert [t for t, _ in by_provider["pushes_per_s.apns"]] == [START + 2, START + 4]

    usage = parse(pages["/usage"])
    assert cells(usage.one("section", id="usage")) == [[TENANT, "2026-03", "1", "provisional", "—"]]
    crashes = parse(pages["/crashes"])
    assert cells(crashes.one("section", id="projects")) == [["1", "1", time(START)]]
    assert crashes.one("section", id="reports").all("a", href=f"/crashes/{crash_id}")
    report = json.loads(parse(pages[f"/crashes/{crash_id}"]).one("pre").text)
    assert "failed" in report["message"]
    privacy = parse(pages["/privacy"])
    rows = {row[0].split()[-1]: row for row in cells(privacy.one("section", id="categories"))}
    assert rows["registration"][2] == "1"
    assert rows["crash_report"][2] == "1"
    assert rows["relay"][1] == "memory"
    assert "There is no cluster" in parse(pages["/cluster"]).text

    text = "\n".join(pages.values())
    assert phone.token
    for secret in [*console.secrets_used, phone.spec.user, "203.0.113.7", "127.0.0.1"]:
        assert secret not in text, f"{secret!r} appears on a console page"


# --- in a browser: the live updates read as the first render -------------------------

# Values whose formatting could drift between Python and JavaScript: halves (rounded
# away from zero by both), no value, times, rows that come and go.
FIRST = dict(
    OVERVIEW,
    wakes=dict(OVERVIEW["wakes"], delivery_p50_ms=0.25, delivery_p95_ms=12.5, success_rate=0.0005),
    dead_tokens_per_min=0.125,
)
SECOND = dict(
    FIRST,
    time=NOW + 2,
    node="node-b",
    flows={"udp": 4, "tcp": 0, "tls": 2.5, "ws": 1},
    registered_phones=43,
    parked_calls=0,
    wakes=dict(
        FIRST["wakes"],
        attempted=21,
        delivered=20,
        success_rate=20 / 21,
        delivery_p50_ms=None,
        delivery_p95_ms=9.95,
    ),
    pushes=[{"provider": "fcm", "outcome": "timeout", "count": 3}],
    pbx_links=[{"serial": "demo-0002", "online": True, "transport": "ws", "since": NOW + 1}],
    shedding={},
    dead_tokens_per_min=1 / 3,
    series={"flows_total": [[NOW + 2, 7]], "pushes_per_s.fcm": [[NOW + 2, 1.5]]},
)
# Each live figure as the browser shows it: its text, or a table body's cells.
_READ_FIGURES = """elements => elements.map(e => [
    e.dataset.figure,
    e.tagName === "TBODY"
        ? [...e.rows].map(row => [...row.cells].map(cell => cell.textContent))
        : e.textContent,
])"""


def rendered(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The live figures of the overview page that Python renders from `doc`."""
    root = parse(overview_page(doc, "csrf"))
    return {
        str(node.attrs["data-figure"]): cells(node) if node.tag == "tbody" else node.text
        for node in root.all()
        if "data-figure" in node.attrs
    }


async def test_a_live_update_reads_as_the_first_render_in_a_browser() -> None:
    """In chromium, under the listener's CSP: the overview as first rendered; an event
    with the same document leaves every figure and table as it was (console.js formats
    as console/markup.py does); an event with another document shows exactly what the
    page rendered from that document would; the six charts are drawn; no console error."""
    clock, figures, openapi = ManualClock(NOW), FakeFigures(), OpenApi("console", "test")

    async def overview() -> Mapping[str, Any]:
        return FIRST

    figures.overview = overview  # type: ignore[method-assign]
    app = site_app(figures, clock, openapi)
    assert rendered(FIRST) != rendered(SECOND)
    async with async_playwright() as playwright, TestServer(app, host="127.0.0.1") as server:
        base = str(server.make_url("")).rstrip("/")
        browser = await launch(playwright)
        try:
            context = await browser.new_context()
            watch = Watch.on(context)
            page = await context.new_page()
            await page.goto(f"{base}/login")
            await page.fill("#token", TOKEN)
            await page.click("form.login button")
            await page.wait_for_url(f"{base}/")
            shown = page.locator("[data-figure]")
            assert dict(await shown.evaluate_all(_READ_FIGURES)) == rendered(FIRST)

            await app[EVENTS].put(FIRST)
            await expect(page.locator("#live")).to_have_text("live")
            assert dict(await shown.evaluate_all(_READ_FIGURES)) == rendered(FIRST)
            assert await page.locator(".uplot").count() == len(OVERVIEW_CHARTS)

            await app[EVENTS].put(SECOND)
            await expect(page.locator('[data-figure="node"]')).to_have_text("node-b")
            assert dict(await shown.evaluate_all(_READ_FIGURES)) == rendered(SECOND)
            assert await page.locator('[data-empty="shedding"]').is_visible()
            assert watch.console_errors == []
            assert watch.page_errors == []
            assert watch.foreign(base) == []
        finally:
            await app[EVENTS].put(None)
            await browser.close()

"""The console's pages as HTML, from the JSON documents of its API (the plan's shapes).

Each page shows its figures at first render (it reads without JavaScript); console.js
then keeps them live: an element with `data-figure="<path>"` holds the value at that
path of the overview JSON (`wakes.success_rate`) in its `data-format`, updated from
the event stream; a chart (`data-chart`) starts from the series in `data-series`; a
section with `data-refresh` (and an id) is fetched again, as this page's HTML, while
the page is open. Pages hold no script and no style of their own: the Content-Security-
Policy allows only the console's files (`script-src 'self'; style-src 'self'`).

What a page shows is what the figures give (console/figures.py): aggregates, PBX
serials, scrubbed crash reports, category statistics, the DSR trail without subjects.
Every text of them is escaped by `console.markup.el`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from console.markup import (
    Child,
    Html,
    count,
    duration,
    el,
    figure,
    health,
    join,
    ms,
    plain,
    raw,
    time,
)

NAVIGATION = (
    ("/", "overview", "Overview"),
    ("/usage", "usage", "Usage"),
    ("/crashes", "crashes", "Crash reports"),
    ("/privacy", "privacy", "Privacy"),
    ("/cluster", "cluster", "Cluster"),
)


@dataclass(frozen=True, slots=True)
class Chart:
    series: str  # a series name of the overview; "name.label" series join it as lines
    title: str
    form: str  # the format of its values (console/markup.py FORMATS)
    label: str = "value"  # the legend's name of `series` itself beside "name.label" ones


TRANSPORTS = ("udp", "tcp", "tls", "ws")
OVERVIEW_CHARTS = (
    Chart("wake_success_rate", "Wake success rate", "percent"),
    Chart("delivery_p95_ms", "INVITE to push delivery, p95", "ms"),
    Chart("pushes_per_s", "Pushes per second, by provider", "decimal", label="all"),
    Chart("flows_total", "Flows", "count"),
    Chart("shedding_per_s", "Load shed per second", "decimal"),
    Chart("crash_ingest_per_s", "Crash reports received per second", "decimal"),
)


def _page(
    title: str, current: str, csrf: str, *content: Child, now: Mapping[str, Any] | None = None
) -> Html:
    """The layout: head with the console's files, navigation, the page, the live state;
    the node and the time of the overview `now` when the page has it (else the event
    stream fills them in)."""
    now = now or {}
    head = el(
        "head",
        el("meta", charset="utf-8"),
        el("meta", name="viewport", content="width=device-width, initial-scale=1"),
        el("meta", name="csrf-token", content=csrf),
        el("meta", name="referrer", content="same-origin"),
        el("title", f"{title} · softrelay console"),
        el("link", rel="stylesheet", href="/static/vendor/uplot/uPlot.min.css"),
        el("link", rel="stylesheet", href="/static/console.css"),
        el("link", rel="icon", href="/static/favicon.svg", type="image/svg+xml"),
        el("script", src="/static/vendor/uplot/uPlot.iife.min.js", defer=True),
        el("script", src="/static/console.js", defer=True),
    )
    links = [
        el("a", label, href=href, aria_current="page" if page == current else None)
        for href, page, label in NAVIGATION
    ]
    header = el(
        "header",
        el("a", "softrelay", el("span", " console"), class_="brand", href="/"),
        el("nav", links, aria_label="Pages"),
        el("span", "node ", figure(now.get("node"), "plain", "node", "b"), class_="node"),
        el(
            "form",
            el("input", type="hidden", name="csrf", value=csrf),
            el("button", "Log out", type="submit"),
            method="post",
            action="/logout",
            class_="logout",
        ),
    )
    footer = el(
        "footer",
        el("span", "not live: the page shows the figures it was rendered with", id="live"),
        " · ",
        el("span", "updated ", figure(now.get("time"), "time", "time")),
    )
    body = el("body", header, el("main", el("h1", title), content), footer, data_page=current)
    return join(raw("<!doctype html>"), el("html", head, body, lang="en"))


def login_html(*, csrf: str, message: str = "") -> str:
    """The login form: the admin token (field `token`) and the form's CSRF field
    (`csrf`), posted to /login; `message` says why the last attempt failed."""
    head = el(
        "head",
        el("meta", charset="utf-8"),
        el("meta", name="viewport", content="width=device-width, initial-scale=1"),
        el("meta", name="referrer", content="same-origin"),
        el("title", "Log in · softrelay console"),
        el("link", rel="stylesheet", href="/static/console.css"),
        el("link", rel="icon", href="/static/favicon.svg", type="image/svg+xml"),
    )
    form = el(
        "form",
        el("h1", "softrelay console"),
        el("p", message, class_="refused", role="alert") if message else None,
        el("label", "Admin token", for_="token"),
        el(
            "input",
            id="token",
            name="token",
            type="password",
            autocomplete="current-password",
            required=True,
            autofocus=True,
        ),
        el("input", type="hidden", name="csrf", value=csrf),
        el("button", "Log in", type="submit"),
        method="post",
        action="/login",
        class_="login",
    )
    return join(raw("<!doctype html>"), el("html", head, el("body", form), lang="en"))


def _table(headings: Iterable[str], rows: list[Html], empty: str) -> Html:
    """A table of `rows`, or the sentence `empty` when there are none."""
    if not rows:
        return el("p", empty, class_="empty")
    head = el("thead", el("tr", [el("th", heading, scope="col") for heading in headings]))
    return el("table", head, el("tbody", rows))


def _card(title: str, *content: Child, wide: bool = False) -> Html:
    return el("section", el("h2", title), content, class_="card wide" if wide else "card")


def _stat(label: str, value: Child) -> Html:
    return el("div", el("dt", label), el("dd", value))


def _series_of(overview: Mapping[str, Any], name: str) -> dict[str, Any]:
    series = overview.get("series") or {}
    return {key: points for key, points in series.items() if key.split(".")[0] == name}


def _chart(chart: Chart, overview: Mapping[str, Any]) -> Html:
    series = _series_of(overview, chart.series)
    return el(
        "figure",
        el("figcaption", chart.title),
        el(
            "div",
            el("p", "The chart needs JavaScript; the figures above are current.", class_="nojs"),
            class_="chart",
            data_chart=chart.series,
            data_format=chart.form,
            data_label=chart.label,
            data_series=orjson.dumps(series).decode(),
        ),
        class_="chart-card",
    )


def _link_rows(links: Iterable[Mapping[str, Any]]) -> list[Html]:
    return [
        el(
            "tr",
            el("td", link.get("serial")),
            el("td", "online" if link.get("online") else "offline"),
            el("td", plain(link.get("transport"))),
            _when(time(link.get("since"))),
            class_="up" if link.get("online") else "down",
        )
        for link in links
    ]


def _push_rows(pushes: Iterable[Mapping[str, Any]]) -> list[Html]:
    return [
        el(
            "tr",
            el("td", push.get("provider")),
            el("td", push.get("outcome")),
            el("td", count(push.get("count")), class_="num"),
        )
        for push in pushes
    ]


def _shedding_rows(shedding: Mapping[str, Any]) -> list[Html]:
    return [
        el("tr", el("td", where), el("td", count(n), class_="num"))
        for where, n in sorted(shedding.items())
    ]


def _live(data: Mapping[str, Any], path: str, form: str) -> Html:
    """The figure at `path` of the overview, kept live by console.js."""
    value: Any = data
    for key in path.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return figure(value, form, path)


def overview_page(data: Mapping[str, Any], csrf: str) -> str:
    links = data.get("pbx_links") or []
    online = sum(1 for link in links if link.get("online"))
    window = duration((data.get("wakes") or {}).get("window_s"))
    flows = [_stat(kind.upper(), _live(data, f"flows.{kind}", "count")) for kind in TRANSPORTS]
    phones = (
        _stat("Registered phones", _live(data, "registered_phones", "count")),
        _stat("Calls parked now", _live(data, "parked_calls", "count")),
        _stat("PBX links online", f"{online} of {len(links)}"),
    )
    wakes = (
        _stat("Success rate", _live(data, "wakes.success_rate", "percent")),
        _stat(
            "Delivered / attempted",
            join(
                _live(data, "wakes.delivered", "count"),
                " / ",
                _live(data, "wakes.attempted", "count"),
            ),
        ),
        _stat("INVITE to delivery p50", _live(data, "wakes.delivery_p50_ms", "ms")),
        _stat("INVITE to delivery p95", _live(data, "wakes.delivery_p95_ms", "ms")),
    )
    tokens = _stat("Dead tokens per minute", _live(data, "dead_tokens_per_min", "decimal"))
    stats = el(
        "div",
        _card("Flows", el("dl", flows)),
        _card("Phones and calls", el("dl", phones)),
        _card(f"Wakes, last {window}", el("dl", wakes)),
        _card("Push tokens", el("dl", tokens)),
        class_="cards",
    )
    charts = el("div", [_chart(chart, data) for chart in OVERVIEW_CHARTS], class_="charts")
    tables = el(
        "div",
        _card(
            "PBX links",
            _live_table(
                ("Serial", "State", "Transport", "Since"),
                _link_rows(links),
                "No PBX has linked.",
                "pbx_links",
            ),
            wide=True,
        ),
        _card(
            "Pushes by provider and outcome",
            _live_table(
                ("Provider", "Outcome", "Count"),
                _push_rows(data.get("pushes") or []),
                "No push sent yet.",
                "pushes",
            ),
        ),
        _card(
            "Load shedding",
            _live_table(
                ("Where", "Shed"),
                _shedding_rows(data.get("shedding") or {}),
                "Nothing shed.",
                "shedding",
            ),
        ),
        class_="cards",
    )
    return _page("Overview", "overview", csrf, stats, charts, tables, now=data)


def _live_table(headings: Iterable[str], rows: list[Html], empty: str, path: str) -> Html:
    """A table whose body console.js rebuilds from `path` of the overview (rows in the
    same cells as here); it is there, hidden, even while it has no rows."""
    headings = tuple(headings)
    head = el("thead", el("tr", [el("th", heading, scope="col") for heading in headings]))
    return join(
        el("p", empty, class_="empty", hidden=bool(rows), data_empty=path),
        el(
            "table",
            head,
            el("tbody", rows, data_figure=path, data_format=path),
            hidden=not rows,
        ),
    )


def usage_page(data: Mapping[str, Any], csrf: str) -> str:
    rows = [
        el(
            "tr",
            el("td", row.get("tenant")),
            el("td", row.get("month")),
            el("td", count(row.get("active_installs")), class_="num"),
            el("td", el("span", plain(row.get("state")), class_=f"badge {row.get('state')}")),
            el("td", el("code", row.get("digest")) if row.get("digest") else "—", class_="digest"),
        )
        for row in data.get("tenants") or []
    ]
    table = _table(
        ("Tenant", "Month", "Active installs", "State", "Audit digest of the close"),
        rows,
        "No usage counted yet.",
    )
    note = el(
        "p",
        "A month is provisional until it is closed; the close keeps only the count and "
        "writes the audit digest shown here.",
        class_="hint",
    )
    return _page("Usage", "usage", csrf, note, el("section", table, id="usage", data_refresh=True))


def crashes_page(data: Mapping[str, Any], project: str | None, csrf: str) -> str:
    projects = [
        el(
            "tr",
            el("td", _project_link(row.get("project"))),
            el("td", count(row.get("reports")), class_="num"),
            _when(time(row.get("last_at"))),
        )
        for row in data.get("projects") or []
    ]
    reports = [
        el(
            "tr",
            _when(time(row.get("received_at"))),
            el("td", row.get("project")),
            el("td", el("span", plain(row.get("level")), class_=f"badge {row.get('level')}")),
            el("td", el("a", row.get("title") or "(no title)", href=_report_href(row.get("id")))),
            el("td", plain(row.get("release"))),
            el("td", plain(row.get("platform"))),
        )
        for row in data.get("reports") or []
    ]
    shown = (
        el("p", "Reports of project ", el("b", project), ". ", el("a", "All", href="/crashes"))
        if project
        else el("p", "The newest reports of every project, after scrubbing.", class_="hint")
    )
    return _page(
        "Crash reports",
        "crashes",
        csrf,
        el(
            "section",
            el("h2", "Projects"),
            _table(("Project", "Reports", "Last report"), projects, "No crash report stored."),
            id="projects",
            data_refresh=True,
        ),
        el(
            "section",
            el("h2", "Reports"),
            shown,
            _table(
                ("Received", "Project", "Level", "Title", "Release", "Platform"),
                reports,
                "No report.",
            ),
            id="reports",
            data_refresh=True,
        ),
    )


def crash_page(data: Mapping[str, Any], csrf: str) -> str:
    event = data.get("event")
    facts = el(
        "dl",
        _stat("Project", _project_link(data.get("project"))),
        _stat("Received", time(data.get("received_at"))),
        _stat("Report id", el("code", data.get("id"))),
        class_="facts",
    )
    body = json.dumps(event, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return _page(
        "Crash report",
        "crashes",
        csrf,
        facts,
        el("p", "The report as stored, after scrubbing.", class_="hint"),
        el("pre", el("code", body), class_="report"),
    )


CATEGORY_HEADINGS = (
    "Category",
    "Storage",
    "Records",
    "Oldest",
    "Limit",
    "Next deletion",
    "Last sweep",
)


def privacy_page(data: Mapping[str, Any], csrf: str) -> str:
    categories = [
        el(
            "tr",
            el(
                "td", el("b", row.get("title") or row.get("name")), " ", el("code", row.get("name"))
            ),
            el("td", plain(row.get("storage"))),
            el("td", count(row.get("records")), class_="num"),
            _when(duration(row.get("oldest_age_s"))),
            _when(_limit(row.get("limit_s"))),
            _when(time(row.get("next_deletion_at"))),
            _when(time(row.get("last_sweep_at"))),
            class_=_over_limit(row),
        )
        for row in data.get("categories") or []
    ]
    audit = data.get("audit") or {}
    verdict = str(audit.get("verdict") or "none")
    problems = [el("li", _problem(problem)) for problem in audit.get("problems") or []]
    trail = [
        el(
            "tr",
            _when(time(row.get("at"))),
            el("td", plain(row.get("action"))),
            el("td", plain(row.get("outcome"))),
            el("td", plain(row.get("via"))),
        )
        for row in data.get("dsr") or []
    ]
    return _page(
        "Privacy",
        "privacy",
        csrf,
        el(
            "section",
            el("h2", "Categories of the policy"),
            _table(
                CATEGORY_HEADINGS,
                categories,
                "The policy declares no category.",
            ),
            id="categories",
            data_refresh=True,
        ),
        el(
            "section",
            el("h2", "Retention audit"),
            el(
                "p",
                "Verdict: ",
                el("span", verdict, class_=f"badge {verdict}"),
                " · taken ",
                time(audit.get("taken_at")),
            ),
            el("ul", problems, class_="problems") if problems else None,
            id="audit",
            data_refresh=True,
        ),
        el(
            "section",
            el("h2", "Actions"),
            _action("/api/v1/actions/audit", "Run the audit now", csrf),
            _action("/api/v1/actions/sweep", "Run the sweeper now", csrf),
            el("output", "", id="action-result", role="status"),
            class_="actions",
        ),
        el(
            "section",
            el("h2", "Data-subject requests"),
            el("p", "The trail of requests, without their subjects.", class_="hint"),
            _table(("At", "Action", "Outcome", "Via"), trail, "No data-subject request yet."),
            id="dsr",
            data_refresh=True,
        ),
    )


def _when(value: str) -> Html:
    """A cell of a time or a duration, kept on one line."""
    return el("td", value, class_="when")


def _limit(seconds: object) -> str:
    """A category's retention: none declared, at once (memory only), or how long."""
    if seconds is None:
        return "none"
    return "at once" if seconds == 0 else duration(seconds)


def _over_limit(row: Mapping[str, Any]) -> str | None:
    oldest, limit = row.get("oldest_age_s"), row.get("limit_s")
    if isinstance(oldest, int | float) and isinstance(limit, int | float) and oldest > limit:
        return "down"
    return None


def _problem(problem: object) -> str:
    """A problem of the audit: {"category", "detail"} as "category: detail"."""
    if isinstance(problem, Mapping) and "category" in problem:
        return f"{problem['category']}: {problem.get('detail', '')}"
    if isinstance(problem, str):
        return problem
    return json.dumps(problem, sort_keys=True, ensure_ascii=False, default=str)


def _action(path: str, label: str, csrf: str) -> Html:
    """A button posting to an action; console.js sends it with the X-CSRF-Token header
    and shows the answer in #action-result."""
    return el(
        "form",
        el("input", type="hidden", name="csrf", value=csrf),
        el("button", label, type="submit"),
        method="post",
        action=path,
        data_action=path,
    )


def cluster_page(data: Mapping[str, Any], csrf: str) -> str:
    store = data.get("store") or {}
    redis = data.get("redis")
    health_rows = [
        el(
            "tr",
            el("td", "Store (", plain(store.get("backend")), ")"),
            el("td", health(store.get("ok"))),
            el("td", ms(store.get("latency_ms"))),
            class_="up" if store.get("ok") else "down",
        )
    ]
    if redis is not None:
        health_rows.append(
            el(
                "tr",
                el("td", "Redis"),
                el("td", health(redis.get("ok"))),
                el("td", ms(redis.get("latency_ms"))),
                class_="up" if redis.get("ok") else "down",
            )
        )
    services = el(
        "section",
        el("h2", "Shared services"),
        _table(("Service", "Health", "Latency"), health_rows, ""),
        id="services",
        data_refresh=True,
    )
    if not data.get("enabled"):
        alone = el(
            "p",
            "There is no cluster: this softrelay runs as a single node, without Redis.",
            class_="notice",
        )
        return _page("Cluster", "cluster", csrf, alone, services)
    nodes = [
        el(
            "tr",
            el("td", node.get("node_id")),
            el("td", count(node.get("flows")), class_="num"),
            el("td", ms(node.get("load")), class_="num"),
            _when(time(node.get("last_beat"))),
            data_node=str(node.get("node_id")),
            data_flows=count(node.get("flows")),
        )
        for node in data.get("nodes") or []
    ]
    chart = el(
        "figure",
        el("figcaption", "Flows per node (sampled while this page is open)"),
        el("div", class_="chart", data_chart="nodes", data_format="count"),
        class_="chart-card",
    )
    return _page(
        "Cluster",
        "cluster",
        csrf,
        el(
            "section",
            el("h2", "Nodes"),
            _table(("Node", "Flows", "Loop lag", "Last heartbeat"), nodes, "No node beats."),
            id="nodes",
            data_refresh=True,
        ),
        chart,
        services,
    )


def problem_page(what: str, csrf: str) -> str:
    """A page that could not be shown (no such report, a bad filter), and why."""
    return _page("Not shown", "", csrf, el("p", what), el("p", el("a", "Overview", href="/")))


def _project_link(project: object) -> Html:
    return el("a", plain(project), href=f"/crashes?project={quote(str(project), safe='')}")


def _report_href(report_id: object) -> str:
    return f"/crashes/{quote(str(report_id), safe='')}"

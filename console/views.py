"""The console's pages but the overview (console/overview.py) as HTML, from the JSON
documents of its API (the plan's shapes): usage, crash reports and one report, privacy,
cluster, and the page that says why a page could not be shown.

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
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from console.layout import page, stat, table, when
from console.markup import Html, count, duration, el, health, ms, plain, time


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
    months = table(
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
    return page("Usage", "usage", csrf, note, el("section", months, id="usage", data_refresh=True))


def crashes_page(data: Mapping[str, Any], project: str | None, csrf: str) -> str:
    projects = [
        el(
            "tr",
            el("td", _project_link(row.get("project"))),
            el("td", count(row.get("reports")), class_="num"),
            when(time(row.get("last_at"))),
        )
        for row in data.get("projects") or []
    ]
    reports = [
        el(
            "tr",
            when(time(row.get("received_at"))),
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
    return page(
        "Crash reports",
        "crashes",
        csrf,
        el(
            "section",
            el("h2", "Projects"),
            table(("Project", "Reports", "Last report"), projects, "No crash report stored."),
            id="projects",
            data_refresh=True,
        ),
        el(
            "section",
            el("h2", "Reports"),
            shown,
            table(
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
        stat("Project", _project_link(data.get("project"))),
        stat("Received", time(data.get("received_at"))),
        stat("Report id", el("code", data.get("id"))),
        class_="facts",
    )
    body = json.dumps(event, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return page(
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
            when(duration(row.get("oldest_age_s"))),
            when(_limit(row.get("limit_s"))),
            when(time(row.get("next_deletion_at"))),
            when(time(row.get("last_sweep_at"))),
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
            when(time(row.get("at"))),
            el("td", plain(row.get("action"))),
            el("td", plain(row.get("outcome"))),
            el("td", plain(row.get("via"))),
        )
        for row in data.get("dsr") or []
    ]
    return page(
        "Privacy",
        "privacy",
        csrf,
        el(
            "section",
            el("h2", "Categories of the policy"),
            table(
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
            table(("At", "Action", "Outcome", "Via"), trail, "No data-subject request yet."),
            id="dsr",
            data_refresh=True,
        ),
    )


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
        table(("Service", "Health", "Latency"), health_rows, ""),
        id="services",
        data_refresh=True,
    )
    if not data.get("enabled"):
        alone = el(
            "p",
            "There is no cluster: this softrelay runs as a single node, without Redis.",
            class_="notice",
        )
        return page("Cluster", "cluster", csrf, alone, services)
    nodes = [
        el(
            "tr",
            el("td", node.get("node_id")),
            el("td", count(node.get("flows")), class_="num"),
            el("td", ms(node.get("load")), class_="num"),
            when(time(node.get("last_beat"))),
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
    return page(
        "Cluster",
        "cluster",
        csrf,
        el(
            "section",
            el("h2", "Nodes"),
            table(("Node", "Flows", "Loop lag", "Last heartbeat"), nodes, "No node beats."),
            id="nodes",
            data_refresh=True,
        ),
        chart,
        services,
    )


def problem_page(what: str, csrf: str) -> str:
    """A page that could not be shown (no such report, a bad filter), and why."""
    return page("Not shown", "", csrf, el("p", what), el("p", el("a", "Overview", href="/")))


def _project_link(project: object) -> Html:
    return el("a", plain(project), href=f"/crashes?project={quote(str(project), safe='')}")


def _report_href(report_id: object) -> str:
    return f"/crashes/{quote(str(report_id), safe='')}"

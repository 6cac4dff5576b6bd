"""The frame of every console page: head, navigation, the live state; the login form;
the small blocks pages are made of (tables, cards, figures in a list).

Every page loads the same files from /static (the Content-Security-Policy allows only
'self': no inline script, no style attribute) and carries the session's CSRF token in
<meta name="csrf-token">, which console.js sends with each action, and in the logout
form's hidden field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from console.markup import Child, Html, el, figure, join, raw

NAVIGATION = (
    ("/", "overview", "Overview"),
    ("/usage", "usage", "Usage"),
    ("/crashes", "crashes", "Crash reports"),
    ("/privacy", "privacy", "Privacy"),
    ("/cluster", "cluster", "Cluster"),
)


def page(
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


def table(headings: Iterable[str], rows: list[Html], empty: str) -> Html:
    """A table of `rows`, or the sentence `empty` when there are none."""
    if not rows:
        return el("p", empty, class_="empty")
    head = el("thead", el("tr", [el("th", heading, scope="col") for heading in headings]))
    return el("table", head, el("tbody", rows))


def card(title: str, *content: Child, wide: bool = False) -> Html:
    return el("section", el("h2", title), content, class_="card wide" if wide else "card")


def stat(label: str, value: Child) -> Html:
    return el("div", el("dt", label), el("dd", value))


def when(value: str) -> Html:
    """A cell of a time or a duration, kept on one line."""
    return el("td", value, class_="when")

"""The overview page: flows, PBX links, phones and parked calls, wakes, pushes, dead
tokens and shedding at first render, kept live by console.js from the event stream
(`data-figure` paths of the overview JSON), and the charts of its series (uPlot).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from console.layout import card, page, stat, when
from console.markup import Html, count, duration, el, figure, join, plain, time


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
            when(time(link.get("since"))),
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
    window = duration((data.get("wakes") or {}).get("window_s"))
    flows = [stat(kind.upper(), _live(data, f"flows.{kind}", "count")) for kind in TRANSPORTS]
    phones = (
        stat("Registered phones", _live(data, "registered_phones", "count")),
        stat("Calls parked now", _live(data, "parked_calls", "count")),
        stat(
            "PBX links online",
            join(
                _live(data, "pbx_links_online", "count"),
                " of ",
                _live(data, "pbx_links_total", "count"),
            ),
        ),
    )
    wakes = (
        stat("Success rate", _live(data, "wakes.success_rate", "percent")),
        stat(
            "Delivered / attempted",
            join(
                _live(data, "wakes.delivered", "count"),
                " / ",
                _live(data, "wakes.attempted", "count"),
            ),
        ),
        stat("INVITE to delivery p50", _live(data, "wakes.delivery_p50_ms", "ms")),
        stat("INVITE to delivery p95", _live(data, "wakes.delivery_p95_ms", "ms")),
    )
    tokens = stat("Dead tokens per minute", _live(data, "dead_tokens_per_min", "decimal"))
    stats = el(
        "div",
        card("Flows", el("dl", flows)),
        card("Phones and calls", el("dl", phones)),
        card(f"Wakes, last {window}", el("dl", wakes)),
        card("Push tokens", el("dl", tokens)),
        class_="cards",
    )
    charts = el("div", [_chart(chart, data) for chart in OVERVIEW_CHARTS], class_="charts")
    tables = el(
        "div",
        card(
            "PBX links",
            _live_table(
                ("Serial", "State", "Transport", "Since"),
                _link_rows(links),
                "No PBX has linked.",
                "pbx_links",
            ),
            wide=True,
        ),
        card(
            "Pushes by provider and outcome",
            _live_table(
                ("Provider", "Outcome", "Count"),
                _push_rows(data.get("pushes") or []),
                "No push sent yet.",
                "pushes",
            ),
        ),
        card(
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
    return page("Overview", "overview", csrf, stats, charts, tables, now=data)


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

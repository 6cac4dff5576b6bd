"""deploy/grafana/softrelay.json and deploy/prometheus/alerts.yml hold: the dashboard
imports anywhere (its datasource an input), the rules carry what Prometheus and an
on-call person need, promtool accepts both and the rules' cases pass, and every metric
either names is one a running `softrelay serve` shows in /metrics after some traffic,
with the labels they select on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types; only safe_load is used
from prometheus_client.parser import text_string_to_metric_families

from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from push.apps import PushSettings
from tests.conftest import START
from tests.demo import run_demo
from tests.limits import in_ci

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "softrelay.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_CASES = DEPLOY / "prometheus" / "alerts_test.yml"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# The rows the issue asks for, in order.
ROWS = [
    "Overview",
    "SIP flows and PBX links",
    "Registrations",
    "Wakes",
    "Pushes",
    "Dead tokens",
    "Load shedding",
    "Usage pings",
    "Crash ingest",
    "Retention audit",
]
ALERTS_NEEDED = {
    "SoftrelayWakeSuccessRateLow",
    "SoftrelayDeadTokenSpike",
    "SoftrelayRetentionViolation",
    "SoftrelaySweeperNotRun",
    "SoftrelayPbxOffline",
    "SoftrelayCrashIngestShedding",
}
SEVERITIES = {"critical", "warning", "info"}
# Labels Prometheus adds when it scrapes; no /metrics line carries them.
TARGET_LABELS = {"job", "instance"}
# Metrics the demo's traffic cannot make count (a provider declaring tokens dead, an
# overload, a tenant past its contract, a failing forward): /metrics declares them, with
# no sample until the first one happens.
QUIET_AFTER_THE_DEMO = {
    "softrelay_push_dead_tokens",
    "softrelay_push_retries",
    "softrelay_push_rejected",
    "softrelay_sip_messages_dropped",
    "softrelay_sip_refused",
    "softrelay_http_refused",
    "softrelay_usage_over_cap",
    "softrelay_crash_items_dropped",
}
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}
_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def _dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(dashboard, dict)
    return dashboard


def _rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    rules: list[dict[str, Any]] = [r for group in loaded["groups"] for r in group["rules"]]
    return rules


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels(_dashboard()) for t in p["targets"]]


def _as_promql(expr: str) -> str:
    """A dashboard expression as Prometheus gets it once Grafana filled in its
    variables (all jobs, a rate window)."""
    return expr.replace("$__rate_interval", "5m").replace('"$job"', '".*"')


def _selectors(expr: str) -> list[tuple[str, set[str]]]:
    """The metric selectors of a PromQL expression: each metric name, with the names
    of the labels it matches on. Strings, grouping clauses, ranges and function names
    are not metrics; every other bare identifier is."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values cannot confuse it
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    found: list[tuple[str, set[str]]] = []
    for match in re.finditer(r"\b([a-zA-Z_:][\w:]*)\b\s*(\{[^}]*\})?\s*(\()?", text):
        name, matchers, call = match.groups()
        if call or name.lower() in _KEYWORDS or re.fullmatch(r"\d+[smhdwy]", name):
            continue
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers or ""))
        found.append((name, labels))
    return found


def _datasources(node: Any) -> list[dict[str, str]]:
    """Every distinct `datasource` object of a dashboard, at any depth."""
    found: list[dict[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and value not in found:
                found.append(value)
            for inner in _datasources(value):
                if inner not in found:
                    found.append(inner)
    elif isinstance(node, list):
        for item in node:
            for inner in _datasources(item):
                if inner not in found:
                    found.append(inner)
    return sorted(found, key=lambda d: d.get("type", ""), reverse=True)


def _family(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_the_selector_reader_finds_metrics_and_their_labels() -> None:
    """What the checks below read: names and matched labels, not functions, keywords,
    grouping labels, durations or label values."""
    expr = (
        'histogram_quantile(0.95, sum by (le, provider) (rate(a_bucket{job=~"$job",'
        'end="by"}[5m]))) / on (job) b_total offset 1h and ignoring (x) c{d!="e"} > 0'
    )
    assert _selectors(expr) == [("a_bucket", {"job", "end"}), ("b_total", set()), ("c", {"d"})]


def test_the_dashboard_imports_anywhere() -> None:
    """Grafana asks for the Prometheus datasource at import (__inputs); every panel and
    query uses that input, never the uid of someone's datasource."""
    dashboard = _dashboard()
    (given,) = dashboard["__inputs"]
    assert given["name"] == "DS_PROMETHEUS"
    assert (given["type"], given["pluginId"]) == ("datasource", "prometheus")
    assert dashboard["id"] is None
    assert dashboard["uid"] == "softrelay-overview"
    # Anywhere in the file: Prometheus only as the input; Grafana's own annotations.
    assert _datasources(dashboard) == [
        DATASOURCE,
        {"type": "grafana", "uid": "-- Grafana --"},
    ], "a datasource is hard-coded"
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == DATASOURCE
    panels = _panels(dashboard)
    assert panels
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_the_dashboard_has_the_rows_and_a_sound_layout() -> None:
    dashboard = _dashboard()
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ROWS
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    # The wakes row shows INVITE-to-delivery p50 and p95 from the histogram.
    exprs = _dashboard_exprs()
    for quantile in ("0.5", "0.95"):
        assert any(
            e.startswith(f"histogram_quantile({quantile},")
            and "softrelay_wake_delivery_seconds_bucket" in e
            for e in exprs
        ), quantile


def test_the_alert_rules_carry_what_prometheus_and_a_person_need() -> None:
    """Each rule: an expression, a `for:`, a severity, a summary and a description; and
    a comment above it that explains its threshold."""
    rules = _rules()
    assert {rule["alert"] for rule in rules} >= ALERTS_NEEDED
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["expr"].strip()
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
    lines = ALERTS.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("- alert:"):
            assert lines[i - 1].strip().startswith("#"), f"no comment explains {line.strip()}"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        if in_ci():
            pytest.fail("CI needs promtool (Debian package prometheus)")
        pytest.skip("promtool not installed (Debian package prometheus)")
    return promtool


def _run(*args: str, cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_the_rules_and_their_cases_pass() -> None:
    """`promtool check rules` and `promtool test rules`: each alert fires on its case
    after its `for:` and stays quiet on the healthy series beside it."""
    promtool = _promtool()
    _run(promtool, "check", "rules", ALERTS.name, cwd=ALERTS.parent)
    _run(promtool, "test", "rules", ALERT_CASES.name, cwd=ALERT_CASES.parent)


def test_promtool_parses_every_query_of_the_dashboard(tmp_path: Path) -> None:
    """Each panel's query, its Grafana variables filled in, as a recording rule that
    `promtool check rules` must parse."""
    promtool = _promtool()
    rules = [
        {"record": f"softrelay:dashboard_query:{i}", "expr": _as_promql(expr)}
        for i, expr in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run(promtool, "check", "rules", path.name, cwd=tmp_path)


async def test_every_metric_they_name_is_served_after_some_traffic(tmp_path: Path) -> None:
    """A real serve of the demo configuration and a short `simulate` (calls, wakes,
    pushes, pings, crash reports): every metric the dashboard and the rules name is in
    its /metrics, with samples unless only a failure makes it count, and every label
    they match on is one its samples carry."""
    run = await run_demo(
        tmp_path,
        *("--phones", "8", "--duration", "15", "--seed", "3"),
        *("--call-rate", "1", "--crash-rate", "0.5"),
    )
    assert run.summary["calls"]["woken"] > 0, "the traffic woke phones"
    families = {f.name: f for f in text_string_to_metric_families(run.metrics)}
    named: list[tuple[str, str, set[str]]] = [
        (where, name, labels)
        for where, exprs in (
            ("dashboard", _dashboard_exprs()),
            ("alerts.yml", [rule["expr"] for rule in _rules()]),
        )
        for expr in exprs
        for name, labels in _selectors(expr)
    ]
    job = _dashboard()["templating"]["list"][0]["query"]["query"]
    named += [("dashboard variable", name, set()) for name in re.findall(r"softrelay_\w+", job)]
    assert len({name for _, name, _ in named}) > 30
    silent: set[str] = set()
    for where, name, labels in named:
        family = families.get(_family(name))
        assert family is not None, f"{where}: {name} is not in /metrics"
        samples = [s for s in family.samples if s.name == name]
        if family.type in ("counter", "histogram") and name == family.name:
            # A counter is named with its _total, a histogram by its _bucket/_sum/_count.
            pytest.fail(f"{where}: {name} is no series: name it with its suffix")
        if not samples:
            silent.add(family.name)
            continue
        carried = {label for s in samples for label in s.labels} | TARGET_LABELS
        assert labels <= carried, f"{where}: {name} has no label {labels - carried}"
    assert silent <= QUIET_AFTER_THE_DEMO, f"no samples after the traffic: {silent}"


async def test_the_sweeper_figures_hold_across_a_restart_that_skipped_its_sweep(
    tmp_path: Path,
) -> None:
    """What SoftrelaySweeperNotRun reads: the newest sweep the store records, and the
    interval. A process restarted within the interval skips its start-up sweep (its
    own last run is 0) and still shows the sweep its predecessor made."""
    from aiohttp.test_utils import TestClient, TestServer

    from softrelay.app import SWEEPER, Services, build_app

    clock = ManualClock(START)
    keyring = Keyring.generate()
    push = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.x.y")

    async def scrape() -> dict[str, float]:
        services = Services(
            load_policy("auerproxy"), keyring, tmp_path, clock, sweep_interval=3600, push=push
        )
        app = build_app(services)
        async with TestClient(TestServer(app)) as client:
            await app[SWEEPER].snapshot.taken.wait()  # the start-up turn and its audit
            text = await (await client.get("/metrics")).text()
        return {
            s.name: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.startswith(("softrelay_sweeper_", "softrelay_retention_last"))
        }

    first = await scrape()
    assert first["softrelay_sweeper_last_run_timestamp_seconds"] == START
    assert first["softrelay_retention_last_sweep_timestamp_seconds"] == START
    assert first["softrelay_sweeper_interval_seconds"] == 3600
    clock.advance(600)  # restarted ten minutes later: the start-up turn is skipped
    second = await scrape()
    assert second["softrelay_sweeper_skipped_total"] == 1
    assert second["softrelay_sweeper_last_run_timestamp_seconds"] == 0
    assert second["softrelay_retention_last_sweep_timestamp_seconds"] == START

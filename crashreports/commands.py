"""`softrelay crashes list|show|export|stats`: the stored (scrubbed) reports.

Reads through the store, so an expired report is never shown, even before the sweep.
`stats` counts the reports kept per project and, from a running server's `/metrics`,
the events it dropped unstored since it started, by reason (`no_opt_in`, and
`over_budget`: scrubbing would have cost more CPU time than `scrub_budget_ms`). Drops
are not stored anywhere: nothing of a dropped report is kept, not even that it came.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from crashreports.ingest import CATEGORY
from privacy.clock import iso
from privacy.store import Record, Store


async def reports(store: Store, project: str | None) -> list[Record]:
    where: dict[str, Any] = {"project": project} if project else {}
    records = await store.find(CATEGORY, **where)
    return sorted(records, key=lambda r: (r.created_at, r.id))


def summary(event: Any) -> str:
    """The first exception `Type: value`, else the message, in one short line."""
    if not isinstance(event, dict):
        return ""
    values = (
        (event.get("exception") or {}).get("values")
        if isinstance(event.get("exception"), dict)
        else None
    )
    if isinstance(values, list) and values and isinstance(values[-1], dict):
        text = f"{values[-1].get('type', '')}: {values[-1].get('value', '')}"
    else:
        logentry = event.get("logentry")
        message = logentry.get("message") if isinstance(logentry, dict) else event.get("message")
        text = str(message or "")
    text = " ".join(text.split())
    return text if len(text) <= 70 else text[:69] + "…"


def format_list(records: list[Record]) -> str:
    lines = [f"{'received':<21}{'project':<9}{'event id':<34}{'level':<9}summary"]
    for record in records:
        event = record.fields["event"]
        level = event.get("level", "") if isinstance(event, dict) else ""
        lines.append(
            f"{iso(record.created_at):<21}{record.fields['project']!s:<9}"
            f"{record.fields['event_id']!s:<34}{level!s:<9}{summary(event)}"
        )
    lines.append(f"{len(records)} report(s)")
    return "\n".join(lines)


def as_json(record: Record) -> dict[str, Any]:
    return {
        "event_id": record.fields["event_id"],
        "project": record.fields["project"],
        "received_at": iso(record.created_at),
        "event": record.fields["event"],
    }


def show(record: Record) -> str:
    return orjson.dumps(as_json(record), option=orjson.OPT_INDENT_2).decode()


def export(records: list[Record], out: IO[bytes]) -> None:
    """JSON lines, one report per line."""
    for record in records:
        out.write(orjson.dumps(as_json(record)) + b"\n")


def export_to(records: list[Record], output: str | None, stdout: IO[bytes]) -> None:
    if output:
        with Path(output).open("wb") as fh:
            export(records, fh)
    else:
        export(records, stdout)


EVENTS_METRIC = "softrelay_crash_events"
METRICS_TIMEOUT = 10.0  # seconds to wait for a server's /metrics


class MetricsUnavailable(Exception):
    """The server's /metrics could not be read; the reason says why."""


async def dropped(metrics_url: str, token: str = "") -> dict[str, dict[str, int]]:
    """Events by project and outcome (stored, no_opt_in, over_budget) from `/metrics`;
    `token` is the config's `[http] metrics_token`, sent when the scrape needs one."""
    timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(metrics_url, headers=headers) as resp,
        ):
            if resp.status != 200:
                raise MetricsUnavailable(f"{metrics_url} answered {resp.status}")
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise MetricsUnavailable(f"{metrics_url}: {type(exc).__name__}") from exc
    counts: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != EVENTS_METRIC:
            continue
        for sample in family.samples:
            if sample.name == f"{EVENTS_METRIC}_total":
                project = sample.labels.get("project", "")
                outcome = sample.labels.get("outcome", "")
                counts.setdefault(project, {})[outcome] = int(sample.value)
    return counts


def format_stats(
    records: list[Record], events: dict[str, dict[str, int]] | None, project: str | None
) -> str:
    kept: dict[str, int] = {}
    for record in records:
        kept[str(record.fields["project"])] = kept.get(str(record.fields["project"]), 0) + 1
    projects = sorted(set(kept) | set(events or {}))
    if project:
        projects = [p for p in projects if p == project]
    head = f"{'project':<9}{'stored':>8}"
    if events is not None:
        head += f"{'dropped: no_opt_in':>20}{'over_budget':>13}"
    lines = [head]
    for name in projects:
        line = f"{name:<9}{kept.get(name, 0):>8}"
        if events is not None:
            by = events.get(name, {})
            line += f"{by.get('no_opt_in', 0):>20}{by.get('over_budget', 0):>13}"
        lines.append(line)
    if events is None:
        lines.append("(events dropped unstored: add --metrics-url of the running server)")
    else:
        lines.append("(dropped: since the server started; nothing of them is stored)")
    return "\n".join(lines)


def add_crashes_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    crashes = sub.add_parser("crashes", help="the stored, scrubbed crash reports")
    actions = crashes.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[common], help="one line per report")
    listing.add_argument("--project", help="only this project id")
    one = actions.add_parser("show", parents=[common], help="one report as JSON")
    one.add_argument("event_id", help="the report id (32 hex digits)")
    out = actions.add_parser("export", parents=[common], help="reports as JSON lines")
    out.add_argument("--project", help="only this project id")
    out.add_argument("--output", help="file to write (default: standard output)")
    stats = actions.add_parser(
        "stats", parents=[common], help="reports kept, and events dropped, per project"
    )
    stats.add_argument("--project", help="only this project id")
    stats.add_argument(
        "--metrics-url",
        help="a running server's /metrics (http://HOST:PORT/metrics): adds the events it "
        "dropped unstored (no opt-in, over the CPU budget) since it started",
    )


async def crashes_command(store: Store, args: argparse.Namespace, metrics_token: str = "") -> int:
    if args.action == "show":
        event_id = args.event_id.replace("-", "").lower()
        found = await store.find(CATEGORY, event_id=event_id)
        if not found:
            print(f"softrelay: no crash report {args.event_id!r}", file=sys.stderr)
            return 1
        print(show(found[0]))
        return 0
    records = await reports(store, args.project)
    if args.action == "stats":
        events = None
        if args.metrics_url:
            try:
                events = await dropped(args.metrics_url, metrics_token)
            except MetricsUnavailable as exc:
                print(f"softrelay: cannot read the server's metrics: {exc}", file=sys.stderr)
                return 1
        print(format_stats(records, events, args.project))
        return 0
    if args.action == "list":
        print(format_list(records))
        return 0
    export_to(records, args.output, sys.stdout.buffer)
    sys.stdout.flush()
    return 0

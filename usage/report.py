"""The billing report: active installs per tenant for one month.

A closed month reports its `usage_count` rows and its audit row; while the month's ids
are still held (the dispute window) the ids are recounted and the digest checked, so
the report says whether the invoice still matches what was stored. An open month is
counted from its ids and marked provisional.

`suppress_below` hides counts under a threshold (shown as "<N"; null in JSON) for shared
dashboards; the total is then left out too, since it would give a single hidden count
away by subtraction.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import orjson

from privacy.clock import iso
from privacy.store import Store
from usage.closing import MonthCloser
from usage.ledger import USAGE_CLOSE, USAGE_COUNT
from usage.settings import UsageSettings

FORMATS = ("table", "csv", "json")


@dataclass(frozen=True, slots=True)
class Line:
    tenant: str
    active: int | None  # None: suppressed
    cap: int  # the contract's installs per month from the configuration; 0: none
    over_cap: bool


@dataclass(frozen=True, slots=True)
class Report:
    period: str
    status: str  # closed | open (provisional)
    lines: tuple[Line, ...]
    total: int | None  # None when a count is suppressed
    closed_at: float | None = None
    closed_by: str | None = None
    ids_deleted_at: float | None = None
    ids_held: int = 0
    digest_matches: bool | None = None  # None: no ids held to check against
    suppress_below: int = 0


async def build_report(
    store: Store, settings: UsageSettings, period: str, *, suppress_below: int = 0
) -> Report:
    closer = MonthCloser(store, settings)
    tally = await closer.tally(period)
    audits = await store.find(USAGE_CLOSE, period=period)
    caps = {t.id: t.max_installs for t in settings.tenants}
    if not audits:
        lines = _lines(tally.counts, caps, suppress_below)
        return Report(
            period,
            "open (provisional)",
            lines,
            _total(tally.counts, lines),
            ids_held=tally.ids,
            suppress_below=suppress_below,
        )
    audit = audits[0].fields
    counts = {
        str(r.fields["tenant"]): int(str(r.fields["active"]))
        for r in await store.find(USAGE_COUNT, period=period)
    }
    lines = _lines(counts, caps, suppress_below)
    deleted = audit["ids_deleted_at"]
    return Report(
        period,
        "closed",
        lines,
        _total(counts, lines),
        closed_at=float(str(audit["closed_at"])),
        closed_by=str(audit["closed_by"]),
        ids_deleted_at=None if deleted is None else float(str(deleted)),
        ids_held=tally.ids,
        digest_matches=(tally.digest == audit["digest"]) if tally.ids else None,
        suppress_below=suppress_below,
    )


def _lines(counts: dict[str, int], caps: dict[str, int], suppress_below: int) -> tuple[Line, ...]:
    lines = []
    for tenant, active in sorted(counts.items()):
        cap = caps.get(tenant, 0)
        hidden = active < suppress_below
        lines.append(Line(tenant, None if hidden else active, cap, bool(cap) and active > cap))
    return tuple(lines)


def _total(counts: dict[str, int], lines: tuple[Line, ...]) -> int | None:
    return None if any(line.active is None for line in lines) else sum(counts.values())


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return _json(report)
    if fmt == "csv":
        return _csv(report)
    return _table(report)


def _count(report: Report, line: Line) -> str:
    return f"<{report.suppress_below}" if line.active is None else str(line.active)


def _table(report: Report) -> str:
    out = [f"billing month {report.period}: {report.status}"]
    if report.closed_at is not None:
        out.append(f"  closed {iso(report.closed_at)} by {report.closed_by}")
    if report.ids_deleted_at is not None:
        out.append(f"  ids deleted {iso(report.ids_deleted_at)}; only the counts remain")
    elif report.digest_matches is not None:
        verdict = "match" if report.digest_matches else "DO NOT MATCH"
        out.append(f"  {report.ids_held} ids held for disputes; they {verdict} the closed counts")
    out.append(f"{'tenant':<32} {'active installs':>16} {'contract':>10}")
    for line in report.lines:
        flag = "  OVER CONTRACT" if line.over_cap else ""
        cap = str(line.cap) if line.cap else "-"
        out.append(f"{line.tenant:<32} {_count(report, line):>16} {cap:>10}{flag}")
    if report.total is not None:
        out.append(f"{'total':<32} {report.total:>16}")
    return "\n".join(out)


def _csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["period", "tenant", "active_installs", "contract", "over_contract", "status"])
    for line in report.lines:
        writer.writerow(
            [
                report.period,
                line.tenant,
                _count(report, line),
                line.cap or "",
                "yes" if line.over_cap else "no",
                report.status,
            ]
        )
    return buffer.getvalue().rstrip("\n")


def _json(report: Report) -> str:
    return orjson.dumps(
        {
            "period": report.period,
            "status": report.status,
            "closed_at": None if report.closed_at is None else iso(report.closed_at),
            "closed_by": report.closed_by,
            "ids_deleted_at": None if report.ids_deleted_at is None else iso(report.ids_deleted_at),
            "ids_held": report.ids_held,
            "digest_matches": report.digest_matches,
            "suppress_below": report.suppress_below,
            "tenants": [
                {
                    "tenant": line.tenant,
                    "active_installs": line.active,
                    "suppressed": line.active is None,
                    "contract": line.cap or None,
                    "over_contract": line.over_cap,
                }
                for line in report.lines
            ],
            "total": report.total,
        },
        option=orjson.OPT_INDENT_2,
    ).decode()

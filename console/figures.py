"""The console's figures, from the live services of this process: the Prometheus
registry's samples, the relay's tables, the store's statistics and the audit snapshot,
the usage months, the crash reports, the DSR trail, the cluster's heartbeats.

Numbers, never names of people: no push token, no address, no SIP user name is read
for them (the relay's counts come from its tables' sizes, the store's from row counts;
a crash report is stored scrubbed, and the DSR trail has no subject). The one key that
names something is a PBX's serial, which the policy declares unlinkable (`pbx_link`).

The shapes are the plan's (README "The console", console/api.py describes them in the
console's /openapi.json).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from cluster.redis import ClusterUnavailable, SharedRedis, node_key
from console.history import History, Sample
from crashreports.commands import summary
from crashreports.ingest import CATEGORY as CRASH_REPORTS
from privacy.audit import CategoryVerdict
from privacy.backend import StorageUnavailable
from privacy.clock import Clock
from privacy.policy import Policy, Storage
from privacy.retention import Sweeper
from privacy.store import Record, Store
from proxy.sip.relay import Relay
from usage.closing import MonthCloser
from usage.ledger import USAGE_CLOSE, USAGE_COUNT, USAGE_KEY
from usage.settings import UsageSettings

WINDOW = 300.0  # seconds of the overview's wake, push and shedding figures
CHART_WINDOW = 60.0  # seconds each chart point of a rate or latency looks back
TRANSPORTS = ("udp", "tcp", "tls", "ws")
SERIES = (
    "wake_success_rate",
    "delivery_p95_ms",
    "pushes_per_s",
    "flows_total",
    "shedding_per_s",
    "crash_ingest_per_s",
)
# The wake ends a push was sent for (the rest: cancelled by the caller, refused by our
# own limits, not woken while restricted, the store out, a shutdown).
WAKE_TRIED = ("delivered", "push_failed", "timeout")
# Where load is shed, by the counter that counts it: (family, label, value) or all.
SHEDDING: Mapping[str, tuple[str, str | None, str | None]] = {
    "sip_overload": ("softrelay_sip_errors", "reason", "overload"),
    "wake_refused": ("softrelay_wake_calls", "end", "refused"),
    "push_rejected": ("softrelay_push_rejected", None, None),
    "crash_busy": ("softrelay_crash_requests", "outcome", "busy"),
    "crash_rate_limited": ("softrelay_crash_requests", "outcome", "rate_limited"),
    "crash_over_budget": ("softrelay_crash_events", "outcome", "over_budget"),
    "http_refused": ("softrelay_http_refused", None, None),
}
MAX_CRASHES = 500  # reports one answer lists at most
_EVENT_ID = re.compile(r"[0-9a-f]{32}")


AUDIT_MAX_AGE = 10.0  # seconds an audit snapshot serves the privacy page


class AuditView(Protocol):
    """The retention audit the sweeper keeps (softrelay/metrics.py `AuditSnapshot`)."""

    verdicts: list[CategoryVerdict]
    taken_at: float | None

    async def refresh(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Sources:
    """The running services the figures come from (handed over by softrelay/app.py)."""

    policy: Policy
    store: Store
    registry: CollectorRegistry
    sweeper: Sweeper
    audit: AuditView
    sweep_interval: float
    usage: UsageSettings
    clock: Clock
    relay: Relay | None = None
    cluster: SharedRedis | None = None
    node_id: str = "single"
    store_backend: str = "sqlite"


class Figures:
    def __init__(self, sources: Sources, history: History) -> None:
        self.sources = sources
        self.history = history
        # serial -> (online, the flow's id when online, since when in that state)
        self._links: dict[str, tuple[bool, int, float]] = {}

    # --- the counters sampled at each tick -----------------------------------------

    def counters(self) -> dict[str, float]:
        """The registry's figures the console charts, by the console's names."""
        out: dict[str, float] = {}
        for family in self.sources.registry.collect():
            name = family.name
            for sample in family.samples:
                labels = sample.labels
                value = float(sample.value)
                if name == "softrelay_sip_flows":
                    transport = "ws" if labels.get("transport") == "wss" else labels["transport"]
                    _add(out, f"flows.{transport}", value)
                elif name in ("softrelay_wake_parked", "softrelay_sipis_parked"):
                    _add(out, "parked", value)
                elif name == "softrelay_wake_calls" and sample.name.endswith("_total"):
                    _add(out, f"wake.{labels['end']}", value)
                elif name == "softrelay_wake_delivery_seconds":
                    if sample.name.endswith("_bucket"):
                        _add(out, f"delivery.le.{labels['le']}", value)
                elif name == "softrelay_push" and sample.name.endswith("_total"):
                    _add(out, f"push.{labels['provider']}.{labels['outcome']}", value)
                    _add(out, "push_total", value)
                    _add(out, f"push_total.{labels['provider']}", value)
                elif name == "softrelay_push_dead_tokens" and sample.name.endswith("_total"):
                    _add(out, "dead_tokens", value)
                elif name == "softrelay_crash_requests" and sample.name.endswith("_total"):
                    _add(out, "crash_requests", value)
                if sample.name.endswith("_total"):
                    for where, (family_name, label, wanted) in SHEDDING.items():
                        if family_name == name and (label is None or labels.get(label) == wanted):
                            _add(out, f"shed.{where}", value)
        return out

    # --- overview ------------------------------------------------------------------

    def sample(self) -> dict[str, Any]:
        """This tick's sample and chart points, and the overview of it."""
        now = self.sources.clock.now()
        history = self.history
        previous_at = self._previous_at
        history.add(now, self.counters())
        self._previous_at = now
        wakes = self._wakes(now, CHART_WINDOW, history.latest())
        history.record("wake_success_rate", now, wakes["success_rate"])
        history.record("delivery_p95_ms", now, wakes["delivery_p95_ms"])
        span = now - previous_at if previous_at is not None and now > previous_at else None
        for series, counter in (
            ("pushes_per_s", "push_total"),
            ("crash_ingest_per_s", "crash_requests"),
        ):
            history.record(series, now, _rate(history.delta(counter, now, span or 0.0), span))
        # One line per provider in the overview's pushes chart (console/overview.py draws
        # every "pushes_per_s.<provider>" beside "pushes_per_s").
        for provider, pushed in history.deltas("push_total.", now, span or 0.0).items():
            history.record(f"pushes_per_s.{provider}", now, _rate(pushed, span))
        shed = sum(history.deltas("shed.", now, span or 0.0).values())
        history.record("shedding_per_s", now, _rate(shed, span))
        history.record("flows_total", now, sum(_flows(history.latest()).values()))
        return self._overview(now, history.latest())

    _previous_at: float | None = None

    async def overview(self) -> dict[str, Any]:
        """The overview now: the counters read afresh (not kept as a chart point)."""
        return self._overview(self.sources.clock.now(), self.counters())

    def _overview(self, now: float, current: Sample) -> dict[str, Any]:
        history = self.history
        pushes = [
            {"provider": key.split(".", 1)[0], "outcome": key.split(".", 1)[1], "count": int(n)}
            for key, n in sorted(history.deltas("push.", now, WINDOW, current).items())
            if n > 0
        ]
        dead = history.delta("dead_tokens", now, WINDOW, current)
        shedding = history.deltas("shed.", now, WINDOW, current)
        return {
            "time": now,
            "node": self.sources.node_id,
            "flows": _flows(current),
            "pbx_links": (links := self._pbx_links(now)),
            # Scalars beside the list, so the page's live figures need no counting.
            "pbx_links_online": sum(1 for link in links if link["online"]),
            "pbx_links_total": len(links),
            "registered_phones": self._registered_phones(),
            "parked_calls": int(current.get("parked", 0.0)),
            "wakes": {"window_s": int(WINDOW), **self._wakes(now, WINDOW, current)},
            "pushes": pushes,
            "dead_tokens_per_min": dead / (WINDOW / 60),
            "shedding": {where: int(n) for where, n in sorted(shedding.items())},
            "series": history.series(),
        }

    def _wakes(self, now: float, window: float, current: Sample) -> dict[str, Any]:
        history = self.history
        ends = history.deltas("wake.", now, window, current)
        tried = sum(ends.get(end, 0.0) for end in WAKE_TRIED)
        delivered = ends.get("delivered", 0.0)
        buckets = sorted(
            (float(le), n) for le, n in history.deltas("delivery.le.", now, window, current).items()
        )
        p50, p95 = _quantile(buckets, 0.5), _quantile(buckets, 0.95)
        return {
            "attempted": int(tried),
            "delivered": int(delivered),
            "success_rate": delivered / tried if tried else None,
            "delivery_p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "delivery_p95_ms": None if p95 is None else round(p95 * 1000, 3),
        }

    def _registered_phones(self) -> int:
        relay = self.sources.relay
        return relay.registered_phones() if relay is not None else 0

    def _pbx_links(self, now: float) -> list[dict[str, Any]]:
        relay = self.sources.relay
        if relay is None:
            return []
        linked = relay.pbx_links()
        serials = sorted({p.serial for p in relay.settings.pbxs} | set(linked))
        out = []
        for serial in serials:
            flow = linked.get(serial)
            online, flow_id = flow is not None, flow.id if flow is not None else 0
            known = self._links.get(serial)
            if known is None or known[0] != online or known[1] != flow_id:
                # A change seen now; a link that was up when the console started counts
                # from then (the relay keeps no link time).
                known = (online, flow_id, now)
                self._links[serial] = known
            out.append(
                {
                    "serial": serial,
                    "online": online,
                    "transport": flow.transport.value if flow is not None else None,
                    "since": known[2],
                }
            )
        return out

    # --- usage ---------------------------------------------------------------------

    async def usage(self) -> dict[str, Any]:
        """Active installs per tenant and month: closed months from their counts and
        audit row (with its digest), open ones counted now (provisional)."""
        store = self.sources.store
        closes = {str(r.fields["period"]): r for r in await store.find(USAGE_CLOSE)}
        rows: list[dict[str, Any]] = []
        for record in await store.find(USAGE_COUNT):
            period = str(record.fields["period"])
            close = closes.get(period)
            rows.append(
                {
                    "tenant": str(record.fields["tenant"]),
                    "month": period,
                    "active_installs": int(str(record.fields["active"])),
                    "state": "closed",
                    "digest": str(close.fields["digest"]) if close is not None else None,
                }
            )
        open_months = sorted(
            {str(r.fields["period"]) for r in await store.find(USAGE_KEY)} - set(closes)
        )
        closer = MonthCloser(store, self.sources.usage)
        for period in open_months:
            tally = await closer.tally(period)
            for tenant, active in tally.counts.items():
                rows.append(
                    {
                        "tenant": tenant,
                        "month": period,
                        "active_installs": active,
                        "state": "provisional",
                        "digest": None,
                    }
                )
        rows.sort(key=lambda row: (row["month"], row["tenant"]), reverse=True)
        return {"tenants": rows}

    # --- crash reports -------------------------------------------------------------

    async def crashes(self, project: str | None, limit: int) -> dict[str, Any]:
        records = await self.sources.store.find(CRASH_REPORTS)
        projects: dict[str, dict[str, Any]] = {}
        for record in records:
            name = str(record.fields["project"])
            entry = projects.setdefault(name, {"project": name, "reports": 0, "last_at": 0.0})
            entry["reports"] += 1
            entry["last_at"] = max(entry["last_at"], record.created_at)
        chosen = [r for r in records if project is None or r.fields["project"] == project]
        chosen.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return {
            "projects": [projects[name] for name in sorted(projects)],
            "reports": [_crash_line(r) for r in chosen[: min(limit, MAX_CRASHES)]],
        }

    async def crash(self, report_id: str) -> dict[str, Any] | None:
        wanted = report_id.replace("-", "").lower()
        if not _EVENT_ID.fullmatch(wanted):
            return None
        found = await self.sources.store.find(CRASH_REPORTS, event_id=wanted)
        if not found:
            return None
        record = found[0]
        event = record.fields["event"]
        return {
            "id": wanted,
            "project": str(record.fields["project"]),
            "received_at": record.created_at,
            "event": event if isinstance(event, dict) else {},
        }

    # --- privacy -------------------------------------------------------------------

    async def privacy(self) -> dict[str, Any]:
        sources = self.sources
        now = sources.clock.now()
        audit = sources.audit
        # The sweeper refreshes the snapshot after each turn (hourly by default); the
        # operator looking at the page wants today's counts, so an older one is taken
        # again first, at most every AUDIT_MAX_AGE (behind the login, unlike /metrics).
        if audit.taken_at is None or now - audit.taken_at > AUDIT_MAX_AGE:
            await audit.refresh()
        verdicts = {v.category: v for v in audit.verdicts}
        last_runs = {run.category: run.ran_at for run in await sources.store.backend.last_runs()}
        last_sweep = max(last_runs.values(), default=None)
        categories = []
        for cat in sources.policy.categories.values():
            verdict = verdicts.get(cat.name)
            oldest = verdict.oldest_age_seconds if verdict is not None else None
            limit = cat.retention.seconds
            next_deletion = None
            if oldest is not None and audit.taken_at is not None and limit:
                expires = audit.taken_at - oldest + limit
                next_deletion = self._next_sweep(expires, last_sweep, now)
            categories.append(
                {
                    "name": cat.name,
                    "title": cat.title.get("en", cat.name),
                    "storage": cat.storage.value,
                    "records": verdict.records if verdict is not None else None,
                    "oldest_age_s": oldest,
                    "limit_s": limit,
                    "next_deletion_at": next_deletion,
                    "last_sweep_at": last_runs.get(cat.name)
                    if cat.storage is not Storage.MEMORY
                    else None,
                }
            )
        trail = await sources.store.backend.requests(50)
        return {
            "categories": categories,
            "audit": self.audit(),
            "dsr": [
                {"at": e.received_at, "action": e.type, "outcome": e.outcome, "via": e.actor}
                for e in trail
            ],
        }

    def audit(self) -> dict[str, Any]:
        audit = self.sources.audit
        problems = [
            {"category": v.category, "detail": v.detail}
            for v in audit.verdicts
            if v.verdict == "violation"
        ]
        return {
            "verdict": "violation" if problems else "ok",
            "taken_at": audit.taken_at,
            "problems": problems,
        }

    def _next_sweep(self, expires: float, last_sweep: float | None, now: float) -> float:
        """The first sweep at or after `expires`: the sweeper runs every interval."""
        interval = self.sources.sweep_interval
        base = last_sweep if last_sweep is not None else now
        if expires <= base:
            return max(base + interval, now)
        return base + math.ceil((expires - base) / interval) * interval

    # --- cluster -------------------------------------------------------------------

    async def cluster(self) -> dict[str, Any]:
        sources = self.sources
        store = await _timed(sources.store.ping(), StorageUnavailable)
        answer: dict[str, Any] = {
            "enabled": sources.cluster is not None,
            "nodes": [],
            "redis": None,
            "store": {"backend": sources.store_backend, **store},
        }
        shared = sources.cluster
        own_flows = sum(_flows(self.counters()).values())
        lag = sources.relay.overload.lag * 1000 if sources.relay is not None else 0.0
        if shared is None:
            answer["nodes"] = [
                {"node_id": sources.node_id, "flows": own_flows, "load": lag, "last_beat": None}
            ]
            return answer
        answer["redis"] = await _timed(_redis_ping(shared), ClusterUnavailable)
        try:
            nodes = await _beats(shared)
        except ClusterUnavailable:
            nodes = {}
        now = sources.clock.now()
        for node_id, (fields, age) in sorted(nodes.items()):
            own = node_id == sources.node_id
            answer["nodes"].append(
                {
                    "node_id": node_id,
                    "flows": own_flows if own else _number(fields.get("flows")),
                    "load": lag if own else _number(fields.get("load")),
                    "last_beat": None if age is None else now - age,
                }
            )
        return answer


def _flows(sample: Sample) -> dict[str, int]:
    return {t: int(sample.get(f"flows.{t}", 0.0)) for t in TRANSPORTS}


def _add(out: dict[str, float], key: str, value: float) -> None:
    out[key] = out.get(key, 0.0) + value


def _rate(count: float, span: float | None) -> float | None:
    return None if not span else count / span


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus's histogram_quantile over cumulative (le, count) buckets."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower  # in the open bucket: its lower bound is what is known
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def _crash_line(record: Record) -> dict[str, Any]:
    event = record.fields["event"]
    data: dict[str, Any] = event if isinstance(event, dict) else {}
    return {
        "id": str(record.fields["event_id"]),
        "project": str(record.fields["project"]),
        "received_at": record.created_at,
        "level": _text(data.get("level")),
        "title": summary(data),
        "release": _text(data.get("release")),
        "platform": _text(data.get("platform")),
    }


def _text(value: object) -> str | None:
    return value[:200] if isinstance(value, str) else None


def _number(value: object) -> float | None:
    try:
        return float(str(value)) if value is not None else None
    except ValueError:
        return None


async def _timed(call: Any, failure: type[Exception]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        await call
    except failure:
        return {"ok": False, "latency_ms": None}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 3)}


async def _redis_ping(shared: SharedRedis) -> None:
    async with shared.guard("console ping"):
        await shared.client.ping()


async def _beats(shared: SharedRedis) -> dict[str, tuple[Mapping[str, str], float | None]]:
    """The live nodes' heartbeat fields, and how long ago each beat (from its key's
    remaining time: a beat sets it to the full expiry)."""
    nodes = await shared.live_nodes()
    expiry = shared.settings.heartbeat_expiry
    out: dict[str, tuple[Mapping[str, str], float | None]] = {}
    for node_id, fields in nodes.items():
        async with shared.guard("console heartbeat age"):
            left = await shared.client.pttl(node_key(node_id))
        age = max(0.0, expiry - left / 1000) if isinstance(left, int) and left >= 0 else None
        out[node_id] = (fields, age)
    return out


__all__ = ["SERIES", "WINDOW", "AuditView", "Figures", "Sources"]

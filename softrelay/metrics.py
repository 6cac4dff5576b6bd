"""`/metrics` for Prometheus: the live counters, and a snapshot of the retention audit.

The audit counts every table and walks the log directory; run per scrape, anyone who
can reach the port could make the store work as often as they like. So the sweeper
takes the snapshot after each of its runs (`AuditedSweeper`), and a scrape only
renders what is in memory. `softrelay_retention_snapshot_timestamp_seconds` says how
old it is.

A scrape may need `Authorization: Bearer <token>` (`[http] metrics_token`, an
`env:`/`file:` secret), and /metrics may be served on a listener of its own
(`[server] metrics_listen`) instead of the public HTTP port.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from privacy.audit import CategoryVerdict, audit
from privacy.backend import RetentionRun
from privacy.retention import Sweeper
from privacy.store import Store
from webapi.errors import Refusal, refusals

METRICS_PATH = "/metrics"
log = logging.getLogger("softrelay.metrics")


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    token: str = ""  # the bearer token a scrape must present; "": none asked
    listen: tuple[str, int] | None = None  # a listener of its own; None: the HTTP port


class AuditSnapshot:
    """The last retention audit, taken off the request path."""

    def __init__(self, store: Store, data_dir: Path) -> None:
        self._store = store
        self._data_dir = data_dir
        self.verdicts: list[CategoryVerdict] = []
        self.taken_at: float | None = None
        # The newest sweep the store recorded, by any process of the fleet: the figure
        # a "sweeper has not run" alert needs. A process's own last run says nothing
        # when another process of the fleet sweeps, or after a restart that skipped.
        self.last_sweep_at: float | None = None
        self.taken = asyncio.Event()  # set after every refresh, failed or not

    async def refresh(self) -> None:
        """Audit now; on failure the previous snapshot stays (and ages visibly)."""
        try:
            self.verdicts = await audit(self._store, self._data_dir)
            ran = [run.ran_at for run in await self._store.backend.last_runs()]
            self.last_sweep_at = max(ran) if ran else None
            self.taken_at = self._store.clock.now()
        except Exception:
            log.exception("metrics.audit_failed")  # the handler keeps the class only
        finally:
            self.taken.set()


class AuditedSweeper(Sweeper):
    """The retention sweeper that refreshes the audit snapshot after each turn, its
    own sweep or one another process of the fleet took."""

    def __init__(self, store: Store, data_dir: Path, snapshot: AuditSnapshot) -> None:
        super().__init__(store, data_dir)
        self.snapshot = snapshot
        self.interval: float | None = None  # the cadence it runs at, once it has

    async def run_if_due(self, interval: float | None) -> list[RetentionRun] | None:
        if interval is not None:
            self.interval = interval
        try:
            return await super().run_if_due(interval)
        finally:
            # After a failed sweep too: that is when the audit shows data past retention.
            await self.snapshot.refresh()


class MetricsEndpoint:
    """The handler: the app's registry, then the snapshot and the sweeper counters."""

    def __init__(self, registry: CollectorRegistry, settings: MetricsSettings) -> None:
        self._registry = registry
        self._token = settings.token.encode()
        self.sweeper: AuditedSweeper | None = None  # set once the store is open

    async def handle(self, request: web.Request) -> web.Response:
        if self._token:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self._token
            ):
                raise Refusal(
                    401,
                    "unauthorized",
                    "a scrape needs Authorization: Bearer <metrics token>",
                    {"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
        body = generate_latest(self._registry)
        if self.sweeper is not None:
            retention = CollectorRegistry(auto_describe=False)
            retention.register(_RetentionCollector(self.sweeper))
            body += generate_latest(retention)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")


class _RetentionCollector(Collector):
    """The audit snapshot and the sweeper's counters, as they are in memory."""

    def __init__(self, sweeper: AuditedSweeper) -> None:
        self._sweeper = sweeper

    def collect(self) -> Iterable[Metric]:
        snapshot = self._sweeper.snapshot
        oldest = GaugeMetricFamily(
            "softrelay_retention_oldest_age_seconds",
            "Age of the oldest record or log file of a category (at the last audit)",
            labels=["category"],
        )
        limit = GaugeMetricFamily(
            "softrelay_retention_limit_seconds",
            "Retention limit of a category",
            labels=["category"],
        )
        violation = GaugeMetricFamily(
            "softrelay_retention_violation",
            "1 while a category holds data past its retention (at the last audit)",
            labels=["category"],
        )
        for verdict in snapshot.verdicts:
            oldest.add_metric([verdict.category], verdict.oldest_age_seconds or 0.0)
            limit.add_metric([verdict.category], verdict.limit_seconds)
            violation.add_metric([verdict.category], 1.0 if verdict.verdict == "violation" else 0.0)
        taken = GaugeMetricFamily(
            "softrelay_retention_snapshot_timestamp_seconds",
            "When the retention audit shown here was taken (after each sweep)",
            value=snapshot.taken_at or 0.0,
        )
        counters = self._sweeper.counters
        runs = CounterMetricFamily(
            "softrelay_sweeper_runs", "Retention sweeps run", value=counters.runs
        )
        failures = CounterMetricFamily(
            "softrelay_sweeper_failures", "Retention sweeps that failed", value=counters.failures
        )
        skipped = CounterMetricFamily(
            "softrelay_sweeper_skipped",
            "Retention sweeps skipped: another process held the job or swept within the interval",
            value=counters.skipped,
        )
        deleted = CounterMetricFamily(
            "softrelay_sweeper_deleted",
            "Records, subjects or log files deleted by the sweeper",
            labels=["category"],
        )
        for category, count in sorted(counters.deleted.items()):
            deleted.add_metric([category], count)
        last = GaugeMetricFamily(
            "softrelay_sweeper_last_run_timestamp_seconds",
            "When the last sweep ran",
            value=counters.last_run_at or 0.0,
        )
        fleet = GaugeMetricFamily(
            "softrelay_retention_last_sweep_timestamp_seconds",
            "When the newest sweep the store records ran, by any process (at the last audit)",
            value=snapshot.last_sweep_at or 0.0,
        )
        interval = GaugeMetricFamily(
            "softrelay_sweeper_interval_seconds",
            "How often the sweeper runs ([retention] sweep_interval)",
            value=self._sweeper.interval or 0.0,
        )
        return [
            *(oldest, limit, violation, taken, runs, failures, skipped, deleted, last),
            *(fleet, interval),
        ]


METRICS = web.AppKey("metrics", MetricsEndpoint)


def metrics_app(endpoint: MetricsEndpoint) -> web.Application:
    """The application of a separate metrics listener: /metrics and nothing else."""
    app = web.Application(middlewares=[refusals])
    app.router.add_get(METRICS_PATH, endpoint.handle)
    return app

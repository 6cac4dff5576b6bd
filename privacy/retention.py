"""The retention sweeper: deletes what the policy says has lived long enough.

One run deletes expired rows of every database category, every subject inactive past
the account rule, and rotated log files past their category's retention, then appends
one `retention_runs` row per category (category, cutoff, rows deleted, time: no
personal data). The server owns one `Sweeper` task; `softrelay sweep` runs it once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from privacy.backend import RetentionRun
from privacy.logs import delete_expired_logs
from privacy.policy import Storage
from privacy.store import Store

log = logging.getLogger("softrelay.privacy")


@dataclass
class SweepCounters:
    """What /metrics exposes about the sweeper."""

    runs: int = 0
    failures: int = 0
    last_run_at: float | None = None
    deleted: dict[str, int] = field(default_factory=dict)


class Sweeper:
    def __init__(self, store: Store, data_dir: Path) -> None:
        self.store = store
        self.data_dir = data_dir
        self.counters = SweepCounters()
        # Set after every run, so a caller can wait for the start-up sweep to finish.
        self.swept = asyncio.Event()

    async def run_once(self) -> list[RetentionRun]:
        now = self.store.clock.now()
        runs = [
            RetentionRun(category, cutoff, deleted, now)
            for category, (cutoff, deleted) in (await self.store.delete_expired()).items()
        ]
        logs = delete_expired_logs(self.store.policy, self.data_dir, now)
        for cat in self.store.policy.stored(Storage.LOG):
            runs.append(
                RetentionRun(cat.name, now - cat.retention.seconds, logs.get(cat.name, 0), now)
            )
        await self.store.backend.record_runs(runs)
        self.counters.runs += 1
        self.counters.last_run_at = now
        self.swept.set()
        for run in runs:
            self.counters.deleted[run.category] = (
                self.counters.deleted.get(run.category, 0) + run.deleted
            )
            if run.deleted:
                log.info(
                    "retention sweep deleted",
                    extra={"fields": {"category": run.category, "count": run.deleted}},
                )
        return runs

    async def run_forever(self, interval: float) -> None:
        """Sweep now and then every `interval` seconds until cancelled."""
        while True:
            try:
                await self.run_once()
            except Exception:
                # A failed sweep is retried at the next interval; the audit shows the lag.
                self.counters.failures += 1
                # The log handler keeps only the exception's class, never its message.
                log.exception("retention sweep failed")
            await asyncio.sleep(interval)

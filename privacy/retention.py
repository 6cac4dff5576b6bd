"""The retention sweeper: deletes what the policy says has lived long enough.

One run deletes expired rows of every database category, every subject inactive past
the account rule, and rotated log files past their category's retention, then appends
one `retention_runs` row per category (category, cutoff, rows deleted, time: no
personal data). The server owns one `Sweeper` task; `softrelay sweep` runs it once.

Processes sharing a database sweep once per interval between them, not once each: a run
holds the store's `sweep` lock (`Backend.exclusive`: an advisory lock on PostgreSQL, a
lock file beside a SQLite file), and the server's task skips its turn when another
process holds the lock or the last recorded run is less than an interval old. A skip is
logged and counted (`softrelay_sweeper_skipped`); retention still holds, as some process
swept within the interval.
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
SWEEP_JOB = "sweep"  # the lock of the job (privacy.backend.JOBS)
HELD = "another process holds the sweep"


@dataclass
class SweepCounters:
    """What /metrics exposes about the sweeper."""

    runs: int = 0
    failures: int = 0
    skipped: int = 0  # turns another process took (it held the lock, or swept lately)
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
        log.info("retention sweep ran", extra={"fields": {"count": len(runs)}})
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

    async def run_if_due(self, interval: float | None) -> list[RetentionRun] | None:
        """Sweep unless another process holds the job or, with `interval`, recorded a
        run less than `interval` seconds ago (by the store's clock, either way: a clock
        of another host a little ahead still counts); the runs, or None when skipped."""
        async with self.store.backend.exclusive(SWEEP_JOB) as got:
            if not got:
                self._skipped(HELD)
                return None
            if interval is not None:
                ran = [run.ran_at for run in await self.store.backend.last_runs()]
                if ran and abs(self.store.clock.now() - max(ran)) < interval:
                    self._skipped("swept within the interval")
                    return None
            return await self.run_once()

    def _skipped(self, why: str) -> None:
        self.counters.skipped += 1
        self.swept.set()  # the turn is over: a caller waiting for it goes on
        log.info(f"retention sweep skipped: {why}")

    async def run_forever(self, interval: float) -> None:
        """Sweep now and then every `interval` seconds until cancelled (a turn that
        another process took is skipped)."""
        while True:
            try:
                await self.run_if_due(interval)
            except Exception:
                # A failed sweep is retried at the next interval; the audit shows the lag.
                self.counters.failures += 1
                # The log handler keeps only the exception's class, never its message.
                log.exception("retention sweep failed")
            await asyncio.sleep(interval)

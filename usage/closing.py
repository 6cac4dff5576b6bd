"""Closing a billing month, and deleting its raw ids after the dispute window.

A month P is closed once P's end plus the grace window has passed (the job in `serve`
checks every sweep interval; `softrelay billing close --month P` does it by hand):

1. the distinct ids per tenant are counted from the store and written to `usage_count`
   (every configured tenant gets a row, 0 included);
2. one `usage_close` audit row records when and by whom, the number of tenants, the
   total and a SHA-256 over the month's sorted keyed ids, so a recount during the
   dispute window can prove the invoice;
3. the month's secret (`usage_key`) is deleted.

Once P's end plus grace plus the dispute window has passed, the month's ids are deleted
and the audit row records when and how many. Every step is idempotent: a run that died
half-way is finished by the next one, and a closed month's counts are never rewritten.

Processes sharing a database close on one of them at a time: the job holds the store's
`usage-close` lock (`Backend.exclusive`: an advisory lock on PostgreSQL), and a process
that finds it held skips the run and says so in its log. Every process still drops the
months another one closed from its memory (their secrets with them) and reads the ids
the others stored (`Ledger.refresh`), at every run.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from privacy.clock import iso
from privacy.store import Record, Store
from usage.ledger import USAGE, USAGE_CLOSE, USAGE_COUNT, USAGE_KEY
from usage.period import end_of
from usage.settings import UsageSettings

log = logging.getLogger("softrelay.usage")
CLOSE_JOB = "usage-close"  # the lock of the job (privacy.backend.JOBS)
SKIPPED = "skipped: another process holds the month close"


@dataclass(frozen=True, slots=True)
class Closed:
    period: str
    counts: dict[str, int]
    digest: str
    already: bool  # closed before; its counts were left as they were


@dataclass(frozen=True, slots=True)
class Tally:
    """The distinct ids of a month per tenant, and the digest over them."""

    counts: dict[str, int]
    digest: str
    ids: int


class NotClosable(Exception):
    """The month is still taking pings (or has not begun), or another process is
    closing months at this moment."""


class MonthCloser:
    def __init__(
        self,
        store: Store,
        settings: UsageSettings,
        forget: Sequence[Callable[[str], None]] = (),
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._forget = forget  # what holds a month in memory (the ledger, the cap flags)
        self._refresh = refresh  # reads the ids other processes stored (the ledger's)
        self.skipped = 0  # runs skipped: another process held the job
        # Set after every run of the job, so a caller can wait for the start-up run.
        self.ran = asyncio.Event()

    def closes_at(self, period: str) -> float:
        return end_of(period) + self._settings.grace

    def ids_deleted_at(self, period: str) -> float:
        return self.closes_at(period) + self._settings.dispute_window

    async def run_once(self) -> list[str]:
        """Close what is due and delete the ids whose dispute window ended; what was done
        (or [SKIPPED], when another process holds the job)."""
        closed = [str(r.fields["period"]) for r in await self._store.find(USAGE_CLOSE)]
        for period in closed:  # closed here or by another process: out of memory
            for forget in self._forget:
                forget(period)
        if self._refresh is not None:
            await self._refresh()
        async with self._store.backend.exclusive(CLOSE_JOB) as got:
            if not got:
                self.skipped += 1
                log.info(f"usage month close {SKIPPED}")
                return [SKIPPED]
            return await self._run_once()

    async def _run_once(self) -> list[str]:
        now = self._store.clock.now()
        done: list[str] = []
        # A month with pings has a secret until it is closed: the secrets list the months.
        open_periods = sorted(str(r.fields["period"]) for r in await self._store.find(USAGE_KEY))
        for period in open_periods:
            if self.closes_at(period) <= now:
                closed = await self._close(period, by="job")
                if not closed.already:
                    done.append(f"closed {period}")
        for audit in await self._store.find(USAGE_CLOSE):
            deleted = await self._delete_ids_if_due(audit)
            if deleted is not None:
                done.append(f"deleted {deleted} ids of {audit.fields['period']}")
        return done

    async def delete_ids_if_due(self, period: str) -> int | None:
        """Delete a closed month's ids once its dispute window has ended; how many, or
        None if it is not time (or they are gone already)."""
        async with self._store.backend.exclusive(CLOSE_JOB) as got:
            if not got:
                raise NotClosable("another process is closing months now; try again")
            audit = await self._audit(period)
            return None if audit is None else await self._delete_ids_if_due(audit)

    async def close(self, period: str, *, by: str) -> Closed:
        """Close `period` now (`softrelay billing close`); NotClosable while it takes
        pings, or while another process runs the close job."""
        self._check_closable(period)
        async with self._store.backend.exclusive(CLOSE_JOB) as got:
            if not got:
                raise NotClosable("another process is closing months now; try again")
            return await self._close(period, by=by)

    def _check_closable(self, period: str) -> None:
        if self.closes_at(period) > self._store.clock.now():
            raise NotClosable(
                f"{period} takes pings until {iso(self.closes_at(period))} (grace window)"
            )

    async def _close(self, period: str, *, by: str) -> Closed:
        """Inside the job's lock."""
        self._check_closable(period)
        now = self._store.clock.now()
        audit = await self._audit(period)
        if audit is not None:
            counts = {
                str(r.fields["tenant"]): int(str(r.fields["active"]))
                for r in await self._store.find(USAGE_COUNT, period=period)
            }
            await self._destroy_secret(period)
            return Closed(period, counts, str(audit.fields["digest"]), already=True)
        tally = await self.tally(period)
        for tenant, active in tally.counts.items():
            await self._store.put(
                USAGE_COUNT, {"tenant": tenant, "period": period, "active": active}
            )
        await self._store.put(
            USAGE_CLOSE,
            {
                "period": period,
                "closed_at": int(now),
                "closed_by": by,
                "tenants": len(tally.counts),
                "total": sum(tally.counts.values()),
                "digest": tally.digest,
            },
        )
        await self._destroy_secret(period)
        log.info(
            "usage month closed",
            extra={"fields": {"period": period, "count": sum(tally.counts.values())}},
        )
        return Closed(period, tally.counts, tally.digest, already=False)

    async def tally(self, period: str) -> Tally:
        """Count the month's stored ids (every configured tenant, 0 included)."""
        records = await self._store.find(USAGE, period=period)
        counts: Counter[str] = Counter({t.id: 0 for t in self._settings.tenants})
        lines = []
        for record in records:
            tenant = str(record.fields["tenant"])
            counts[tenant] += 1
            lines.append(f"{tenant}\x1f{record.fields['pid']}\n")
        digest = hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
        return Tally(dict(sorted(counts.items())), digest, len(records))

    async def run_forever(self, interval: float) -> None:
        """Run now and then every `interval` seconds until cancelled."""
        while True:
            try:
                done = await self.run_once()
                if done != [SKIPPED]:  # a skip has its own line
                    log.info("usage month close ran", extra={"fields": {"count": len(done)}})
            except Exception:
                # Retried at the next interval; the log keeps the exception's class only.
                log.exception("usage month close failed")
            self.ran.set()
            await asyncio.sleep(interval)

    async def _audit(self, period: str) -> Record | None:
        found = await self._store.find(USAGE_CLOSE, period=period)
        return found[0] if found else None

    async def _destroy_secret(self, period: str) -> None:
        for forget in self._forget:
            forget(period)
        if await self._store.delete(USAGE_KEY, period=period):
            # Out of the database's files and log now, not at the next sweep.
            await self._store.purge_deleted(USAGE_KEY)

    async def _delete_ids_if_due(self, audit: Record) -> int | None:
        period = str(audit.fields["period"])
        if audit.fields["ids_deleted_at"] is not None:
            return None
        if self.ids_deleted_at(period) > self._store.clock.now():
            return None
        deleted = await self._store.delete(USAGE, period=period)
        now = int(self._store.clock.now())
        await self._store.update(
            USAGE_CLOSE, audit.id, {"ids_deleted_at": now, "ids_deleted": deleted}, use=False
        )
        await self._store.purge_deleted(USAGE)
        log.info("usage ids deleted", extra={"fields": {"period": period, "count": deleted}})
        return deleted


__all__ = ["Closed", "MonthCloser", "NotClosable", "Tally"]

"""Rows of concurrent callers committed together, each caller answered once its row is.

    batches = Batches(store, "usage")
    await batches.write({"tenant": ..., "period": ..., "pid": ...})  # on disk on return
    ...
    await batches.drain()  # at shutdown, before the store closes

Rows written in the same turn of the event loop go together: one `Store.put_many` (one
statement, one wake-up of the loop) per batch instead of a `Store.put` per row. A batch
does not wait for the commit before it: the database thread joins the batches queued
behind a running transaction into its next one (group commit), so the thread never
idles while rows wait on the loop. (Waiting for the previous commit, as the usage
ledger's first version did, cost ~15% of the crash ingest's non-scrubbing throughput.)
A caller returns only after the commit that holds its row, so "on disk before the
answer" holds.

If a batch is refused (`put_many` refuses every row when one is refused), its rows are
written again one at a time, so only the caller of the refused row sees the error. If
the database is unavailable, the batch's one transaction wrote nothing, and every caller
in it gets the `StorageUnavailable`. A
caller that goes away (its task cancelled) leaves the others' commit alone; its row may
still be written. The writer tasks belong to the `Batches`: `drain` awaits them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from privacy.backend import StorageUnavailable
from privacy.store import Store, Writable
from privacy.tasks import Tasks

log = logging.getLogger("softrelay.privacy")

_Pending = tuple[Mapping[str, Writable], "asyncio.Future[None]"]


class Batches:
    """Writes of one category without subjects (what `Store.put_many` takes)."""

    def __init__(self, store: Store, category: str) -> None:
        self._store = store
        self._category = category
        self._pending: list[_Pending] = []
        # A writer settles its callers' futures itself; one that fails past that is a bug,
        # logged here (its callers' futures stay with them, cancelled at their shutdown).
        self._writers = Tasks(log, "batch.writer_failed")

    async def write(self, row: Mapping[str, Writable]) -> None:
        """Store `row`; returns once it is committed, raises what its write raised."""
        # One future per caller: a caller cancelled cancels its own wait only.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._pending:
            # Rows written in this turn of the loop go together; the batch does not wait
            # for the commit before it (the database thread joins them in one transaction).
            self._writers.spawn(self._write_next())
        self._pending.append((row, done))
        await done

    async def drain(self) -> None:
        """Let the commits under way finish (at shutdown, before the store closes)."""
        await self._writers.wait()

    async def _write_next(self) -> None:
        batch, self._pending = self._pending, []
        try:
            await self._store.put_many(self._category, [row for row, _ in batch])
        except StorageUnavailable as exc:
            # No row was refused: the database is not there. Every caller is told so (their
            # 503), none is answered as stored, and the dead database is not asked again
            # row by row.
            for _, done in batch:
                # One exception each: they are raised in as many tasks, with tracebacks.
                _settle(done, StorageUnavailable(str(exc), retry_after=exc.retry_after))
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc)
                return
            for row, done in batch:  # find the refused row: only its caller is told
                try:
                    await self._store.put_many(self._category, [row])
                except Exception as exc:
                    _settle(done, exc)
                else:
                    _settle(done, None)
        else:
            for _, done in batch:
                _settle(done, None)


def _settle(done: asyncio.Future[None], exc: BaseException | None) -> None:
    if done.done():  # its caller went away
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)

"""Writes of concurrent callers committed together, each caller answered once its own is.

    batches = Batches(store, "usage")
    await batches.write({"tenant": ..., "period": ..., "pid": ...})  # on disk on return
    ...
    await batches.drain()  # at shutdown, before the store closes

`GroupCommit` is the mechanism, `Batches` its use for a category without subjects
(`Store.put_many`, on either backend: usage pings, crash reports). The PostgreSQL
backend's `put` runs on the same mechanism (privacy/postgres.py), one level down.

Writes made in the same turn of the event loop go together, up to `limit` a batch: one
`write` of the batch (one statement or one transaction, one wake-up of the loop) instead
of one per caller. A batch does not wait for the commit before it: on SQLite the database
thread joins the batches queued behind a running transaction into its next one (group
commit), on PostgreSQL each batch takes a connection of the pool. (Waiting for the
previous commit, as the usage ledger's first version did, cost ~15% of the crash
ingest's non-scrubbing throughput.) A caller returns only after the commit that holds
its write, so "on disk before the answer" holds.

If a batch fails for a reason other than an outage (one row refused, a constraint, a
deadlock the server broke), its writes are made again one at a time, so only the caller
of the failing one sees the error. If the database is unavailable, the batch's one
transaction wrote nothing, and every caller in it gets the `StorageUnavailable` (none is
answered as stored, and the dead database is not asked again write by write). A caller
that goes away (its task cancelled) leaves the others' commit alone; its write may still
be made. The writer tasks belong to the `GroupCommit`: `drain` awaits them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from privacy.backend import StorageUnavailable
from privacy.tasks import Tasks

log = logging.getLogger("softrelay.privacy")

I = TypeVar("I")  # noqa: E741 - the item, as R is the result
R = TypeVar("R")
MAX_BATCH = 256  # writes a batch holds at most: the next ones start the next batch


class GroupCommit(Generic[I, R]):
    """Items of concurrent callers written together by `write(batch)`, which returns one
    result per item, in order, all committed (one transaction), or raises."""

    def __init__(
        self,
        write: Callable[[Sequence[I]], Awaitable[Sequence[R]]],
        *,
        limit: int = MAX_BATCH,
        failed: str = "batch.writer_failed",
    ) -> None:
        self._write = write
        self._limit = limit
        self._open: list[tuple[I, asyncio.Future[R]]] | None = None  # this turn's batch
        # A writer settles its callers' futures itself; one that fails past that is a bug,
        # raised to its callers and logged here.
        self._writers = Tasks(log, failed)

    async def submit(self, item: I) -> R:
        """Write `item` with the others of this turn; its result once committed, or what
        its write raised."""
        # One future per caller: a caller cancelled cancels its own wait only.
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        if self._open is None or len(self._open) >= self._limit:
            batch: list[tuple[I, asyncio.Future[R]]] = []
            # Starts at the loop's next turn, with what was submitted until then. Spawned
            # before it is opened: after `close` this raises, and no batch is left open.
            self._writers.spawn(self._run(batch))
            self._open = batch
        self._open.append((item, done))
        return await done

    async def drain(self) -> None:
        """Let the commits under way finish (at shutdown, before the store closes)."""
        await self._writers.wait()

    async def close(self) -> None:
        """Drain, then refuse further writes (TasksClosed)."""
        await self.drain()
        await self._writers.close()

    async def _run(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        if self._open is batch:
            self._open = None  # closed: what comes now goes in the next batch
        try:
            await self._commit(batch)
        except BaseException as exc:
            # Cancelled (its owner's close was), or a bug past the settling: no caller is
            # left waiting for ever.
            for _, done in batch:
                if done.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    done.cancel()
                else:
                    done.set_exception(exc)
            raise

    async def _commit(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            results = await self._write([item for item, _ in batch])
        except StorageUnavailable as exc:
            # No row was refused: the database is not there. Every caller is told so (their
            # 503), none is answered as stored, and the dead database is not asked again
            # write by write.
            for _, done in batch:
                # One exception each: they are raised in as many tasks, with tracebacks.
                _settle(done, exc=StorageUnavailable(str(exc), retry_after=exc.retry_after))
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
                return
            for item, done in batch:  # find the failing write: only its caller is told
                try:
                    alone = await self._write([item])
                except Exception as exc:
                    _settle(done, exc=exc)
                else:
                    _settle(done, alone[0])
        else:
            for (_, done), result in zip(batch, results, strict=True):
                _settle(done, result)


def _settle(
    done: asyncio.Future[R], result: Any = None, *, exc: BaseException | None = None
) -> None:
    if done.done():  # its caller went away
        return
    if exc is None:
        done.set_result(result)
    else:
        done.set_exception(exc)


class Writer(Protocol):
    """What `Batches` writes with: `Store.put_many` (a protocol, so this module does not
    import the store, which the PostgreSQL backend below it imports this from)."""

    async def put_many(self, category: str, records: Sequence[Mapping[str, Any]]) -> None: ...


class Batches:
    """Writes of one category without subjects (what `Store.put_many` takes)."""

    def __init__(self, store: Writer, category: str) -> None:
        self._store = store
        self._category = category
        self._commits: GroupCommit[Mapping[str, Any], None] = GroupCommit(self._put_many)

    async def write(self, row: Mapping[str, Any]) -> None:
        """Store `row`; returns once it is committed, raises what its write raised."""
        await self._commits.submit(row)

    async def drain(self) -> None:
        """Let the commits under way finish (at shutdown, before the store closes)."""
        await self._commits.drain()

    async def _put_many(self, rows: Sequence[Mapping[str, Any]]) -> list[None]:
        await self._store.put_many(self._category, rows)
        return [None] * len(rows)

"""Rows of concurrent callers committed together, each caller answered once its row is.

    batches = Batches(store, "usage")
    await batches.write({"tenant": ..., "period": ..., "pid": ...})  # on disk on return
    ...
    await batches.drain()  # at shutdown, before the store closes

Rows that arrive while a commit is under way join the next one: one `Store.put_many`
(one statement, one wake-up of the loop) per batch instead of a `Store.put` per row
(bench/usage.py, bench/crashreports.py). A caller still returns only after the commit
that holds its row, so "on disk before the answer" holds.

If a batch is refused (`put_many` refuses every row when one is refused), its rows are
written again one at a time, so only the caller of the refused row sees the error. A
caller that goes away (its task cancelled) leaves the others' commit alone; its row may
still be written. The writer task belongs to the `Batches`: `drain` awaits it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from privacy.store import Store, Value

_Pending = tuple[Mapping[str, Value], "asyncio.Future[None]"]


class Batches:
    """Writes of one category without subjects (what `Store.put_many` takes)."""

    def __init__(self, store: Store, category: str) -> None:
        self._store = store
        self._category = category
        self._pending: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None

    async def write(self, row: Mapping[str, Value]) -> None:
        """Store `row`; returns once it is committed, raises what its write raised."""
        # One future per caller: a caller cancelled cancels its own wait only.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        await done

    async def drain(self) -> None:
        """Let the commits under way finish (at shutdown, before the store closes)."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)

    async def _write_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._store.put_many(self._category, [row for row, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                    continue
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

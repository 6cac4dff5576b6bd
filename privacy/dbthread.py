"""The database thread: one thread owns a connection; callers await its results.

Why not `run_in_executor` per statement: measured on 2 cores (bench/store.py), the hop
per write cost more than the SQL itself, and one commit per row capped throughput. Here
calls queue up, and consecutive *batched* calls (writes that each are one small
transaction) run together inside one transaction: group commit. A caller still returns
only after the commit that holds its write, so "durable on return" holds. If a batch
fails, it is rolled back and replayed one call per transaction, so only the failing
caller sees the error.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
MAX_BATCH = 256
# Calls waiting at once; past it callers wait their turn on the event loop, not in memory.
MAX_PENDING = 4096


@dataclass(slots=True)
class _Call:
    fn: Callable[[], Any]
    batched: bool
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


_STOP = object()
_Outcome = tuple[_Call, Any, BaseException | None]


class DatabaseThread:
    def __init__(
        self,
        name: str,
        begin: Callable[[], None],
        commit: Callable[[], None],
        rollback: Callable[[], None],
    ) -> None:
        self._begin, self._commit, self._rollback = begin, commit, rollback
        self._queue: queue.SimpleQueue[_Call | object] = queue.SimpleQueue()
        self._slots = asyncio.Semaphore(MAX_PENDING)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` alone on the thread; it manages its own transaction, if any."""
        return await self._submit(fn, batched=False)

    async def batched(self, fn: Callable[[], T]) -> T:
        """Run `fn` inside a transaction it may share with other batched calls."""
        return await self._submit(fn, batched=True)

    async def _submit(self, fn: Callable[[], T], *, batched: bool) -> T:
        async with self._slots:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()
            self._queue.put(_Call(fn, batched, future, loop))
            return await future

    async def stop(self) -> None:
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # --- on the thread --------------------------------------------------------------

    def _serve(self) -> None:
        carry: _Call | object | None = None
        while True:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is _STOP:
                return
            assert isinstance(item, _Call)
            if not item.batched:
                self._settle([self._alone(item)])
                continue
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    follower = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not (isinstance(follower, _Call) and follower.batched):
                    carry = follower
                    break
                batch.append(follower)
            self._settle(self._together(batch))

    @staticmethod
    def _alone(call: _Call) -> _Outcome:
        try:
            return call, call.fn(), None
        except BaseException as exc:  # handed to the awaiting caller, not lost
            return call, None, exc

    def _together(self, batch: list[_Call]) -> list[_Outcome]:
        try:
            self._begin()
            try:
                results = [call.fn() for call in batch]
            except BaseException:
                self._rollback()
                raise
            self._commit()
        except BaseException:
            return [self._in_own_transaction(call) for call in batch]
        return [(call, result, None) for call, result in zip(batch, results, strict=True)]

    def _in_own_transaction(self, call: _Call) -> _Outcome:
        def transaction() -> Any:
            self._begin()
            try:
                result = call.fn()
            except BaseException:
                self._rollback()
                raise
            self._commit()
            return result

        return self._alone(_Call(transaction, False, call.future, call.loop))

    @staticmethod
    def _settle(outcomes: list[_Outcome]) -> None:
        # One wake-up of each waiting event loop per batch, not per call.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, mine in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, mine)
            except RuntimeError:  # that loop is closed: nobody waits any more
                continue


def _resolve(outcomes: list[_Outcome]) -> None:
    for call, result, exc in outcomes:
        if call.future.cancelled():
            continue
        if exc is not None:
            call.future.set_exception(exc)
        else:
            call.future.set_result(result)

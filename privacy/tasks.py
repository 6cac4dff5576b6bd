"""Background tasks with an owner: every one awaited or cancelled at shutdown, its
failure logged (STYLE 7).

    tasks = Tasks(log, "sip.task_failed")
    tasks.spawn(coro)              # held until it ends; an exception is logged, by class
    await tasks.wait(grace)        # let the tasks under way finish, for at most `grace`
    await tasks.close()            # cancel what is left, await it; no spawn after that

    async with Tasks(log, "push.task_failed") as tasks:   # close() on the way out
        tasks.spawn(...)

Why not `asyncio.TaskGroup`: it waits at its exit for every task however long it runs,
and one task's failure cancels all the others. The tasks owned here are independent
(a flow's messages, a binding write, a push, a timer loop), so one that fails is logged
and the others go on, and the exit is bounded: `close` cancels, then awaits.

An owner's `close` does not swallow its own cancellation: `asyncio.wait` collects the
tasks without raising their exceptions, and a `CancelledError` meant for the caller
propagates after the owned tasks were cancelled too.

It lives in `privacy/` because that is the lowest layer that needs it
(`privacy/batches.py`); every package above imports `privacy` already (its clock).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

# A cancelled task that has not ended after this many seconds is cancelled again (a
# cancellation can be lost: on Python 3.11 `asyncio.wait_for` drops one that arrives as
# its inner call completes, gh-86296); after STUCK_AFTER seconds `close` gives up on it,
# logs its name and returns, so a shutdown never hangs on one task.
RECANCEL_AFTER = 0.5
STUCK_AFTER = 10.0


class TasksClosed(RuntimeError):
    """`spawn` after `close`: the work would have no owner left to end it."""


class Tasks:
    """A set of background tasks with one owner; see the module docstring."""

    def __init__(
        self,
        log: logging.Logger,
        failed: str = "task.failed",
        *,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._log = log
        self._failed = failed  # the event name of the log line of a failed task
        self._on_error = on_error  # e.g. a counter; called before the line is logged
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def __bool__(self) -> bool:
        return bool(self._tasks)

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Run `coro` as a task of this owner; TasksClosed once it is closed."""
        if self._closed:
            coro.close()  # never awaited: close it, or Python warns about it later
            raise TasksClosed("spawn after close")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, so asyncio does not report it again
        if exc is None:
            return
        if self._on_error is not None:
            self._on_error(exc)
        # The class only: an exception's message may quote what the task worked on.
        self._log.error(self._failed, extra={"fields": {"error": type(exc).__name__}})

    async def wait(self, within: float | None = None) -> bool:
        """Wait until no task is left (those spawned meanwhile included), for at most
        `within` seconds (None: no bound); whether none is left."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        while self._tasks:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    async def close(
        self,
        grace: float = 0.0,
        *,
        recancel_after: float = RECANCEL_AFTER,
        stuck_after: float = STUCK_AFTER,
    ) -> None:
        """Let the tasks finish for `grace` seconds, then cancel the rest and await them.
        After this `spawn` raises, and no task is left but one that ignored its
        cancellations for `stuck_after` seconds (logged by name). Idempotent."""
        loop = asyncio.get_running_loop()
        try:
            if grace > 0:
                await self.wait(grace)
            # A task being cancelled may spawn another on its way out (a close handshake),
            # and a cancellation may be lost: cancel again until none is left.
            deadline = loop.time() + stuck_after
            while self._tasks:
                for task in self._tasks:
                    task.cancel()
                left = deadline - loop.time()
                if left <= 0:
                    names = sorted(task.get_name() for task in self._tasks)
                    self._log.error(
                        "tasks.cancel_ignored", extra={"fields": {"tasks": ",".join(names)}}
                    )
                    return
                await asyncio.wait(set(self._tasks), timeout=min(recancel_after, left))
        except asyncio.CancelledError:
            # Our caller is cancelled: the tasks go too, and the cancellation goes on.
            for task in self._tasks:
                task.cancel()
            raise
        finally:
            self._closed = True

    async def __aenter__(self) -> Tasks:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

"""privacy/tasks.py: background tasks with an owner. Each test waits on events the
tasks set, never on time passing; the one bound is TIMEOUT, against a hang."""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest

from privacy.tasks import Tasks, TasksClosed

TIMEOUT = 5.0  # a bound against a hang, never a wait for time to pass
log = logging.getLogger("tests.tasks")


def failures(caplog: pytest.LogCaptureFixture) -> list[tuple[str, object]]:
    return [(r.getMessage(), r.__dict__.get("fields")) for r in caplog.records]


async def test_a_task_is_held_while_it_runs_and_let_go_when_it_ends() -> None:
    tasks = Tasks(log)
    release = asyncio.Event()
    task = tasks.spawn(release.wait())
    assert len(tasks) == 1
    assert tasks
    release.set()
    assert await asyncio.wait_for(tasks.wait(), TIMEOUT) is True
    assert task.done()
    assert task.result() is True
    assert len(tasks) == 0
    assert not tasks


async def test_a_failure_is_logged_by_class_only_counted_and_leaves_the_others_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Unlike asyncio.TaskGroup, one task's failure cancels nobody; its exception is
    retrieved (asyncio does not report it again) and logged without its message."""
    errors: list[BaseException] = []
    tasks = Tasks(log, "thing.failed", on_error=errors.append)
    sibling_release = asyncio.Event()
    sibling = tasks.spawn(sibling_release.wait())

    async def fail() -> None:
        raise ValueError("secret-canary in the message")

    failing = tasks.spawn(fail())
    await asyncio.wait_for(asyncio.wait([failing]), TIMEOUT)
    assert [type(e) for e in errors] == [ValueError]
    assert failures(caplog) == [("thing.failed", {"error": "ValueError"})]
    assert "secret-canary" not in caplog.text
    assert not sibling.done(), "the sibling goes on"
    sibling_release.set()
    assert await asyncio.wait_for(tasks.wait(), TIMEOUT) is True
    assert sibling.result() is True


async def test_a_task_cancelled_by_someone_else_is_not_logged_as_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = Tasks(log)
    task = tasks.spawn(asyncio.Event().wait())
    task.cancel()
    await asyncio.wait_for(tasks.wait(), TIMEOUT)
    assert task.cancelled()
    assert failures(caplog) == []


async def test_wait_includes_tasks_spawned_while_it_waits() -> None:
    tasks = Tasks(log)
    first_release, second_release, first_ended = asyncio.Event(), asyncio.Event(), asyncio.Event()
    spawned: list[asyncio.Task[bool]] = []

    async def first() -> None:
        await first_release.wait()
        spawned.append(tasks.spawn(second_release.wait()))
        first_ended.set()

    tasks.spawn(first())
    waiting = asyncio.create_task(tasks.wait())
    first_release.set()
    await asyncio.wait_for(first_ended.wait(), TIMEOUT)
    assert not waiting.done(), "the second task is still running"
    second_release.set()
    assert await asyncio.wait_for(waiting, TIMEOUT) is True
    assert spawned[0].result() is True


async def test_wait_with_a_bound_says_whether_tasks_are_left_and_leaves_them_running() -> None:
    tasks = Tasks(log)
    task = tasks.spawn(asyncio.Event().wait())
    assert await tasks.wait(0) is False
    assert not task.done()
    await tasks.close()
    assert task.cancelled()


async def test_close_cancels_what_runs_awaits_its_cleanup_and_refuses_new_work() -> None:
    tasks = Tasks(log)
    started, cleaned = asyncio.Event(), asyncio.Event()

    async def forever() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    task = tasks.spawn(forever())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await asyncio.wait_for(tasks.close(), TIMEOUT)
    assert task.cancelled()
    assert cleaned.is_set(), "close returned only after the task's cleanup ran"
    assert tasks.closed
    assert not tasks

    async def late_work() -> None:
        pass

    late = late_work()
    with pytest.raises(TasksClosed):
        tasks.spawn(late)
    assert inspect.getcoroutinestate(late) == inspect.CORO_CLOSED  # no "never awaited"


async def test_close_with_grace_lets_a_task_finish_that_ends_within_it() -> None:
    tasks = Tasks(log)
    release, waiting = asyncio.Event(), asyncio.Event()

    async def until_released() -> bool:
        waiting.set()
        return await release.wait()

    task = tasks.spawn(until_released())
    await asyncio.wait_for(waiting.wait(), TIMEOUT)
    closing = asyncio.create_task(tasks.close(grace=TIMEOUT * 10))
    release.set()
    await asyncio.wait_for(closing, TIMEOUT)
    assert not task.cancelled()
    assert task.result() is True


async def test_close_cancels_too_what_a_cancelled_task_spawns_on_its_way_out() -> None:
    tasks = Tasks(log)
    started = asyncio.Event()
    spawned: list[asyncio.Task[bool]] = []

    async def spawns_on_cancel() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            spawned.append(tasks.spawn(asyncio.Event().wait()))  # a close handshake, say

    tasks.spawn(spawns_on_cancel())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await asyncio.wait_for(tasks.close(), TIMEOUT)
    assert len(spawned) == 1
    assert spawned[0].cancelled()
    assert not tasks


async def test_close_does_not_swallow_its_own_cancellation_and_cancels_the_tasks() -> None:
    """The closer cancelled while it awaits a task's slow cleanup: CancelledError
    reaches the closer's caller, and the task is cancelled once more, not left behind."""
    tasks = Tasks(log)
    started, in_cleanup = asyncio.Event(), asyncio.Event()

    async def slow_cleanup() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            in_cleanup.set()
            await asyncio.Event().wait()  # a cleanup that would never end by itself
            raise

    task = tasks.spawn(slow_cleanup())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    closer = asyncio.create_task(tasks.close())
    await asyncio.wait_for(in_cleanup.wait(), TIMEOUT)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(closer, TIMEOUT)
    assert closer.cancelled()
    await asyncio.wait_for(asyncio.wait([task]), TIMEOUT)
    assert task.cancelled(), "the second cancel ended the slow cleanup"


async def test_async_with_closes_on_the_way_out() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    async with Tasks(log) as tasks:
        task = tasks.spawn(forever())
        await asyncio.wait_for(started.wait(), TIMEOUT)
    assert task.cancelled()
    assert tasks.closed


async def test_close_cancels_again_a_task_that_lost_its_first_cancellation() -> None:
    """A lost cancellation (Python 3.11's wait_for drops one that arrives as its inner
    call completes) is not the end: `close` cancels again and the task ends."""
    tasks = Tasks(log)
    started = asyncio.Event()
    cancels: list[int] = []

    async def loses_one() -> None:
        started.set()
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancels.append(1)
                if len(cancels) >= 2:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]  # as wait_for did

    task = tasks.spawn(loses_one())
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await asyncio.wait_for(tasks.close(recancel_after=0.01), TIMEOUT)
    assert task.cancelled()
    assert len(cancels) == 2
    assert not tasks


async def test_close_gives_up_on_a_task_that_ignores_every_cancellation_and_names_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = Tasks(log)
    started, release = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        started.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = tasks.spawn(stubborn(), name="stubborn")
    await asyncio.wait_for(started.wait(), TIMEOUT)
    with caplog.at_level(logging.ERROR, logger=log.name):
        await asyncio.wait_for(tasks.close(recancel_after=0.01, stuck_after=0.05), TIMEOUT)
    assert tasks.closed
    assert ("tasks.cancel_ignored", {"tasks": "stubborn"}) in failures(caplog)
    release.set()
    await asyncio.wait_for(task, TIMEOUT)

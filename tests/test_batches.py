"""privacy.batches: concurrent rows committed together, each caller answered on its own."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest

from privacy.batches import Batches, GroupCommit
from privacy.policy import PolicyViolation
from privacy.store import Store, Value
from privacy.tasks import TasksClosed


class _RecordingStore:
    """The real store, recording the rows (their event ids) of each `put_many` call;
    each call is held until `gate` opens, and announced on `entered`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls: list[list[Value]] = []
        self.entered: asyncio.Queue[None] = asyncio.Queue()
        self.gate = asyncio.Event()

    async def put_many(self, category: str, records: Sequence[Mapping[str, Value]]) -> None:
        self.calls.append([record["event_id"] for record in records])
        self.entered.put_nowait(None)
        await self.gate.wait()
        await self.store.put_many(category, records)


def _row(i: int) -> dict[str, Value]:
    return {"project": "1", "event_id": f"{i:032x}", "event": {"n": i}}


async def test_concurrent_rows_are_committed_together_and_on_disk_when_each_returns(
    store: Store,
) -> None:
    recording = _RecordingStore(store)
    batches = Batches(recording, "crash_report")  # a recording seam (batches.Writer)

    async def write(i: int) -> int:
        await batches.write(_row(i))
        return len(await store.find("crash_report", event_id=f"{i:032x}"))

    # 40 writers start in one turn of the loop; 10 more while that batch is committing.
    first = [asyncio.ensure_future(write(i)) for i in range(40)]
    await asyncio.wait_for(recording.entered.get(), 5)
    assert recording.calls == [[f"{i:032x}" for i in range(40)]], "one turn, one batch"
    second = [asyncio.ensure_future(write(i)) for i in range(40, 50)]
    await asyncio.wait_for(recording.entered.get(), 5)
    recording.gate.set()
    found = await asyncio.gather(*first, *second)
    assert found == [1] * 50, "every row is on disk when its caller returns"
    assert recording.calls == [
        [f"{i:032x}" for i in range(40)],
        [f"{i:032x}" for i in range(40, 50)],
    ], "rows of the next turn go in the next batch, whole and in order"


async def test_a_refused_row_fails_only_its_caller(store: Store) -> None:
    batches = Batches(store, "crash_report")
    bad: dict[str, Value] = {**_row(1), "email": "a@example.org"}  # never stored
    results = await asyncio.gather(
        batches.write(_row(0)), batches.write(bad), batches.write(_row(2)), return_exceptions=True
    )
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], PolicyViolation)
    assert len(await store.find("crash_report")) == 2


async def test_a_caller_that_goes_away_leaves_the_others_commit_alone(store: Store) -> None:
    batches = Batches(store, "crash_report")
    first = asyncio.ensure_future(batches.write(_row(0)))
    await asyncio.sleep(0)  # the first commit is under way; the next two wait for it
    leaving = asyncio.ensure_future(batches.write(_row(1)))
    staying = asyncio.ensure_future(batches.write(_row(2)))
    await asyncio.sleep(0)
    leaving.cancel()
    await first
    await staying
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await batches.drain()
    assert {r.fields["event_id"] for r in await store.find("crash_report")} >= {
        f"{0:032x}",
        f"{2:032x}",
    }


async def test_a_writer_cancelled_at_close_leaves_no_caller_waiting() -> None:
    entered = asyncio.Event()

    async def write(items: Sequence[int]) -> list[int]:
        entered.set()
        await asyncio.Event().wait()  # a commit that never ends
        return list(items)

    commits: GroupCommit[int, int] = GroupCommit(write)
    caller = asyncio.ensure_future(commits.submit(1))
    await asyncio.wait_for(entered.wait(), 5)
    await commits._writers.close()  # what an owner's close does to a writer still running
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 5)
    with pytest.raises(TasksClosed):
        await commits.submit(2)
    assert commits._open is None, "no batch left open that nothing would write"

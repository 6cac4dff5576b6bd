"""Time for the SIPIS tests: a manual clock and a sleep that ends only when the test
moves that clock past it, so timers (refresh, backoff, T1 retransmission, timer F)
fire when the test says and no test waits for real time."""

from __future__ import annotations

import asyncio
import heapq
import itertools

from privacy.clock import ManualClock

START = 1_800_000_000.0


class ManualTime:
    def __init__(self, start: float = START) -> None:
        self.clock = ManualClock(start)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.changed = asyncio.Event()

    def now(self) -> float:
        return self.clock.now()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.clock.now() + seconds, next(self._seq), future))
        self.changed.set()
        await future

    def next_wake(self) -> float | None:
        """When the earliest sleeper still waiting ends."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    def advance_to(self, when: float) -> None:
        """Move the clock to `when` (never back) and end every sleep due by then."""
        self.clock.set(max(self.clock.now(), when))
        now = self.clock.now()
        while self._sleepers and self._sleepers[0][0] <= now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    def advance(self, seconds: float) -> None:
        self.advance_to(self.clock.now() + seconds)

"""The console's memory of the last minutes: counter samples, chart series, the tick.

At every tick the sampler reads the counters of the process's Prometheus registry
(console/figures.py `Figures.counters`), keeps them here with the clock's time, and
hands the overview built from them to every listener (the SSE streams, console/api.py).

A figure "over the last 5 minutes" is the difference between the newest sample and the
newest one at least that old. A process younger than the window has none that old: its
counters began at zero when it started, so the baseline is zero, and the figure is
exact all the same.

Time comes from the injected clock and the ticks from an injected `Ticker`: `Interval`
in `serve`, `ManualTicker` in a test, whose every `tick()` lets one turn run, so a test
waits for the turn's event, never for time to pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

Sample = Mapping[str, float]
Point = tuple[float, float | None]
log = logging.getLogger("softrelay.console")


class Ticker(Protocol):
    async def wait(self) -> None:
        """Return at the next tick."""


class Interval:
    """A tick every `seconds` (`serve`)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def wait(self) -> None:
        await asyncio.sleep(self.seconds)


class ManualTicker:
    """Ticks a test gives: each `tick()` lets one `wait()` return."""

    def __init__(self) -> None:
        self._ticks: asyncio.Queue[None] = asyncio.Queue()

    def tick(self) -> None:
        self._ticks.put_nowait(None)

    async def wait(self) -> None:
        await self._ticks.get()


class History:
    """Samples for `keep` seconds (at most `limit` of them) and the charts' series."""

    def __init__(self, keep: float, limit: int) -> None:
        self._keep = keep
        self._samples: deque[tuple[float, Sample]] = deque(maxlen=limit)
        self._series: dict[str, deque[Point]] = {}
        self._limit = limit

    def add(self, when: float, sample: Sample) -> None:
        self._samples.append((when, sample))
        while len(self._samples) > 1 and self._samples[0][0] < when - self._keep:
            self._samples.popleft()

    def latest(self) -> Sample:
        return self._samples[-1][1] if self._samples else {}

    def baseline(self, when: float, window: float) -> Sample:
        """The newest sample at least `window` seconds older than `when`; none: zeros."""
        found: Sample = {}
        for taken, sample in self._samples:
            if taken > when - window:
                break
            found = sample
        return found

    def delta(self, name: str, when: float, window: float, current: Sample | None = None) -> float:
        """How much counter `name` grew over the `window` before `when`, up to `current`
        (default: the newest sample)."""
        now = self.latest() if current is None else current
        return max(0.0, now.get(name, 0.0) - self.baseline(when, window).get(name, 0.0))

    def deltas(
        self, prefix: str, when: float, window: float, current: Sample | None = None
    ) -> dict[str, float]:
        """`delta` of every counter whose name starts with `prefix`, by the rest of it."""
        base = self.baseline(when, window)
        now = self.latest() if current is None else current
        return {
            name[len(prefix) :]: max(0.0, value - base.get(name, 0.0))
            for name, value in now.items()
            if name.startswith(prefix)
        }

    def record(self, name: str, when: float, value: float | None) -> None:
        points = self._series.get(name)
        if points is None:
            points = self._series[name] = deque(maxlen=self._limit)
        points.append((when, value))
        while points and points[0][0] < when - self._keep:
            points.popleft()

    def series(self, newest: int | None = None) -> dict[str, list[list[float | None]]]:
        """Every series as [[t, value], ...], oldest first; `newest`: only the last n."""
        out: dict[str, list[list[float | None]]] = {}
        for name, points in self._series.items():
            chosen = list(points)[-newest:] if newest else list(points)
            out[name] = [[t, v] for t, v in chosen]
        return out


Listener = Callable[[dict[str, Any]], None]


class Sampler:
    """The turn at each tick: sample, record, build the overview, tell the listeners."""

    def __init__(
        self,
        turn: Callable[[], Awaitable[dict[str, Any]]],
        ticker: Ticker,
    ) -> None:
        self._turn = turn
        self._ticker = ticker
        self._listeners: set[Listener] = set()
        self.last: dict[str, Any] | None = None  # the newest overview
        self.turns = 0

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with each new overview; the returned function stops it."""
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    async def turn(self) -> dict[str, Any]:
        overview = await self._turn()
        self.last = overview
        self.turns += 1
        for listener in list(self._listeners):
            listener(overview)
        return overview

    async def run_forever(self) -> None:
        """A turn now, then one per tick, until cancelled; a failed turn is logged and
        the next tick tries again."""
        while True:
            try:
                await self.turn()
            except Exception:
                log.exception("console.sample_failed")  # the class only (the log policy)
            await self._ticker.wait()


__all__ = ["History", "Interval", "ManualTicker", "Sample", "Sampler", "Ticker"]

"""Delays drawn from a distribution, and the pacing that turns them into waits.

A delay is written `fixed:2`, `uniform:1,3`, `exp:2` (mean 2) or `lognormal:2,0.5`
(median 2 s, sigma 0.5), in seconds of simulated time. A pace keeps the simulated clock
and turns simulated seconds into waits: `Pace` on real time (`speed` 10 runs ten
simulated seconds per second; speed `inf` waits not at all), or `SteppedPace`, the pace
a test injects: its clock moves only as the simulation waits, at no real cost, and the
simulation then runs its events one after another, so what a test checks depends
neither on time passing nor on how the machine schedules concurrent work.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

KINDS = ("fixed", "uniform", "exp", "lognormal")


@dataclass(frozen=True, slots=True)
class Delay:
    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Delay:
        """`kind:a[,b]`; a plain number is `fixed`. ValueError names what is wrong."""
        kind, sep, args = text.strip().partition(":")
        if not sep:
            kind, args = "fixed", text
        if kind not in KINDS:
            raise ValueError(f"{text!r}: unknown distribution (one of {', '.join(KINDS)})")
        try:
            values = [float(v) for v in args.split(",")]
        except ValueError:
            raise ValueError(f"{text!r}: not numbers after {kind}:") from None
        wanted = 2 if kind in ("uniform", "lognormal") else 1
        if len(values) != wanted or any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"{text!r}: {kind} takes {wanted} non-negative number(s)")
        if kind == "uniform" and values[1] < values[0]:
            raise ValueError(f"{text!r}: uniform needs low <= high")
        return cls(kind, *values)

    @classmethod
    def fixed(cls, seconds: float) -> Delay:
        return cls("fixed", seconds)

    def draw(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exp":
            return rng.expovariate(1 / self.a) if self.a > 0 else 0.0
        if self.a == 0:
            return 0.0
        return rng.lognormvariate(math.log(self.a), self.b)

    def __str__(self) -> str:
        if self.kind in ("uniform", "lognormal"):
            return f"{self.kind}:{self.a:g},{self.b:g}"
        return f"{self.kind}:{self.a:g}"


Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class Pace:
    """The simulated clock on real time, simulated seconds to waits, and a seeded random
    source for every draw."""

    # Events run one after another (the simulation waits for each before the next):
    # only a pace whose clock nothing but the simulation moves can promise that.
    sequential: ClassVar[bool] = False

    speed: float = 1.0
    rng: random.Random = field(default_factory=random.Random)
    sleep: Sleep = asyncio.sleep

    def now(self) -> float:
        """Simulated seconds on this pace's clock (an arbitrary origin)."""
        return 0.0 if math.isinf(self.speed) else time.monotonic() * self.speed

    async def wait(self, simulated: float) -> None:
        if simulated <= 0 or math.isinf(self.speed):
            await asyncio.sleep(0)  # still a point where others run
            return
        await self.sleep(simulated / self.speed)

    async def wait_until(self, when: float, stop: asyncio.Event) -> None:
        """Wait until the clock reads `when`, or `stop` is set."""
        wait = self.real(when - self.now())
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
        else:
            await asyncio.sleep(0)

    async def wait_for(self, delay: Delay) -> float:
        """Wait a delay drawn from `delay`; the simulated seconds drawn."""
        seconds = delay.draw(self.rng)
        await self.wait(seconds)
        return seconds

    def real(self, simulated: float) -> float:
        """The real seconds of a simulated span (a timeout, a deadline)."""
        return 0.0 if math.isinf(self.speed) else simulated / self.speed


@dataclass(slots=True)
class SteppedPace(Pace):
    """An injected pace: the clock moves only when the simulation waits on it, at once
    and by exactly the simulated seconds waited. No real time passes for any wait, and
    the simulation runs its events in order, one after another (`sequential`)."""

    sequential: ClassVar[bool] = True

    speed: float = math.inf
    clock: float = 0.0  # simulated seconds

    def now(self) -> float:
        return self.clock

    async def wait(self, simulated: float) -> None:
        self.clock += max(simulated, 0.0)
        await asyncio.sleep(0)

    async def wait_until(self, when: float, stop: asyncio.Event) -> None:
        self.clock = max(self.clock, when)
        await asyncio.sleep(0)

    def real(self, simulated: float) -> float:
        return 0.0

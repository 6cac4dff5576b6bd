"""The CPU time one crash report may cost to scrub.

A `Deadline` is started per event from a clock of the scrubbing thread's CPU time
(`time.thread_time`, injectable) and ticked by the loops of the chain (per match, per
candidate span, per container of the walk); it reads the clock once every `every`
ticks, and raises `OverBudget` when the event has used up its budget. The chain turns
that into `DropEvent("over_budget")`: the event is counted and nothing of it is kept.
Every tick is a bounded amount of work (one linear-time RE2 search, one replacement),
so an event stops within a tick or so of its budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]
EVERY = 16  # ticks per clock reading: a tick costs ~1 µs, thread_time about as much


class OverBudget(Exception):
    """The event used more CPU time than its budget."""


@dataclass(slots=True)
class Deadline:
    clock: Clock
    limit: float  # the clock's reading past which the event is over budget
    every: int = EVERY
    _left: int = field(default=EVERY, init=False)

    @classmethod
    def start(cls, seconds: float, clock: Clock = time.thread_time, every: int = EVERY) -> Deadline:
        deadline = cls(clock, clock() + seconds, every)
        deadline._left = every
        return deadline

    def tick(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._left = self.every
            if self.clock() > self.limit:
                raise OverBudget

    def check(self) -> None:
        """Read the clock now (between steps)."""
        self._left = self.every
        if self.clock() > self.limit:
            raise OverBudget


class _Unlimited(Deadline):
    __slots__ = ()

    def tick(self) -> None:
        return

    def check(self) -> None:
        return


UNLIMITED: Deadline = _Unlimited(lambda: 0.0, float("inf"))

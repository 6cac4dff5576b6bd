"""The CPU time one crash report may cost to scrub.

A `Deadline` is started per event from a clock of the scrubbing thread's CPU time
(`time.thread_time`, injectable) and ticked by the loops of the chain (per match, per
candidate span, per container of the walk); it reads the clock once every `every`
ticks, and raises `OverBudget` when the event has used up its budget. The chain turns
that into `DropEvent("over_budget")`: the event is counted and nothing of it is kept.
Every tick is a bounded amount of work (one linear-time RE2 search, one replacement),
so an event stops within a tick or so of its budget.

Reading a thread's CPU time is a system call (~0.5 µs here; ~30 readings per SDK event
cost ~20-50 µs of its ~800): with the default clock, a `perf_counter` reading (~45 ns,
no system call) comes first, and the CPU clock is read only once as much wall time as
the budget has passed. A thread cannot have used more CPU time than wall time went by,
so the event is judged on its CPU time exactly as before, only with fewer readings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]
EVERY = 16  # ticks per clock reading: a tick costs ~1 µs


class OverBudget(Exception):
    """The event used more CPU time than its budget."""


def _never() -> float:
    return float("-inf")


@dataclass(slots=True)
class Deadline:
    clock: Clock
    limit: float  # the clock's reading past which the event is over budget
    every: int = EVERY
    # A wall clock and its reading before which `clock` cannot be past `limit` (with an
    # injected clock: never, so every reading goes to that clock).
    wall: Clock = _never
    wall_limit: float = float("-inf")
    _left: int = field(default=EVERY, init=False)

    @classmethod
    def start(cls, seconds: float, clock: Clock = time.thread_time, every: int = EVERY) -> Deadline:
        if clock is time.thread_time:
            # The wall clock first: the CPU time read after it cannot have run ahead of it.
            wall = time.perf_counter
            wall_limit = wall() + seconds
            deadline = cls(clock, clock() + seconds, every, wall, wall_limit)
        else:
            deadline = cls(clock, clock() + seconds, every)
        deadline._left = every
        return deadline

    def tick(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self._left = self.every
            if self.wall() >= self.wall_limit and self.clock() > self.limit:
                raise OverBudget

    def check(self) -> None:
        """Read the clock now (between steps)."""
        self._left = self.every
        if self.wall() >= self.wall_limit and self.clock() > self.limit:
            raise OverBudget


class _Unlimited(Deadline):
    __slots__ = ()

    def tick(self) -> None:
        return

    def check(self) -> None:
        return


UNLIMITED: Deadline = _Unlimited(lambda: 0.0, float("inf"))

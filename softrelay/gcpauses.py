"""How long the garbage collector stops the process, as a metric.

A node holding tens of thousands of flows has a large heap, and a full (generation 2)
collection walks all of it while nothing else runs: every flow's keep-alive, every
call's set-up waits. The event loop's lag probe sees such a pause as one late probe
(proxy/sip/overload.py rightly does not shed on it); this histogram says which pauses
were the collector's, so an operator can tell them from a busy CPU.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram

BUCKETS = (0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class GcPauses:
    """Times each collection between gc's "start" and "stop" callbacks."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.seconds = Histogram(
            "softrelay_gc_pause_seconds",
            "Garbage collections by generation, and how long each stopped the process",
            ["generation"],
            buckets=BUCKETS,
            registry=registry,
        )
        self._by_generation = [self.seconds.labels(str(g)) for g in range(3)]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._started)

    async def context(self, _app: web.Application) -> AsyncIterator[None]:
        """Timed while the app runs; gc.callbacks is the process's, so it is undone."""
        gc.callbacks.append(self)
        try:
            yield
        finally:
            gc.callbacks.remove(self)

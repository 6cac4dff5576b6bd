"""The garbage collector's pauses as a metric, timed only while the app runs."""

from __future__ import annotations

import gc

from aiohttp import web
from prometheus_client import CollectorRegistry

from softrelay.gcpauses import GcPauses


def _count(registry: CollectorRegistry, generation: str) -> float:
    value = registry.get_sample_value(
        "softrelay_gc_pause_seconds_count", {"generation": generation}
    )
    return value or 0.0


async def test_full_collections_are_timed_while_the_app_runs_and_not_after() -> None:
    registry = CollectorRegistry()
    pauses = GcPauses(registry)
    context = pauses.context(web.Application())
    await anext(context)
    try:
        before = _count(registry, "2")
        gc.collect(2)
        gc.collect(2)
        assert _count(registry, "2") == before + 2
        total = registry.get_sample_value("softrelay_gc_pause_seconds_sum", {"generation": "2"})
        assert total is not None
        assert total > 0
        assert pauses in gc.callbacks
    finally:
        await anext(context, None)
    assert pauses not in gc.callbacks
    gc.collect(2)
    assert _count(registry, "2") == before + 2

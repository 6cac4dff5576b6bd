"""Crash reports in the app: the ingest routes, the forwarder and own-error reporting,
owned by one cleanup context (started after the store, stopped before it closes)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

from aiohttp import web
from prometheus_client import CollectorRegistry

from crashreports.forward import Forwarder
from crashreports.ingest import Ingest, describe
from crashreports.selfreport import start_self_reporting, stop_self_reporting
from crashreports.settings import CrashSettings
from crashreports.workers import Scrubbers
from privacy.clock import Clock
from privacy.store import Store
from webapi.errors import SentryRefusal, speaks
from webapi.openapi import OPENAPI
from webapi.ratelimit import Limiters

INGEST = web.AppKey("crash_ingest", Ingest)


def add_crashreports(
    app: web.Application,
    settings: CrashSettings,
    clock: Clock,
    *,
    store: web.AppKey[Store],
    registry: web.AppKey[CollectorRegistry],
    limiters: Limiters,
) -> None:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        forwarder: Forwarder | None = None
        if settings.forward is not None:
            forwarder = Forwarder(
                settings.forward,
                clock,
                app[registry],
                queue_size=settings.forward_queue,
                attempts=settings.forward_attempts,
            )
            await forwarder.start()
        scrubbers = await Scrubbers.create(
            {p.id: p.chain for p in settings.projects},
            settings.scrub_mode,
            settings.scrub_workers,
        )
        ingest = app[INGEST] = Ingest(
            settings, app[store], clock, app[registry], scrubbers, limiters, forwarder
        )
        own = start_self_reporting(settings, _release())
        try:
            yield
        finally:
            if own:
                stop_self_reporting()
            # Requests in flight have been answered (the runner stops them first):
            # nothing waits on a worker any more.
            await scrubbers.close()
            await ingest.batches.drain()
            if forwarder is not None:
                await forwarder.close()

    app.cleanup_ctx.append(ctx)
    # The SDK reads Relay's answers: every refusal under /api/ in its shape, the
    # middleware's own (a header that is not UTF-8, a wrong method) included.
    speaks(app, "/api/", SentryRefusal)
    app.router.add_post("/api/{project}/envelope/", _route(lambda i: i.envelope_handler))
    app.router.add_post("/api/{project}/store/", _route(lambda i: i.store_handler))
    if OPENAPI in app:  # build_app's registry; a test's bare app has none
        describe(app[OPENAPI])


def _route(
    pick: Callable[[Ingest], Callable[[web.Request], Awaitable[web.StreamResponse]]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await pick(request.app[INGEST])(request)

    return handle


def _release() -> str:
    try:
        return f"softrelay@{version('softrelay')}"
    except PackageNotFoundError:
        return "softrelay@dev"

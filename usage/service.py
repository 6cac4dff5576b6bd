"""Usage pings in the server: the route, and the owner of the month-close task.

`add_usage` is called by `softrelay.app.build_app`. Its cleanup context starts after the
store and stops before it: the close task is cancelled and awaited at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry

from privacy.clock import Clock
from privacy.policy import Policy
from privacy.store import Store
from tomlsections.reader import ConfigError
from usage.closing import MonthCloser
from usage.endpoint import PING_PATH, PingEndpoint, describe
from usage.ledger import USAGE, Ledger
from usage.settings import UsageSettings, check_retention
from webapi.openapi import OPENAPI
from webapi.ratelimit import Limiters


@dataclass(frozen=True, slots=True)
class UsageService:
    ledger: Ledger
    closer: MonthCloser
    endpoint: PingEndpoint


USAGE_SERVICE = web.AppKey("usage", UsageService)


def add_usage(
    app: web.Application,
    settings: UsageSettings,
    *,
    policy: Policy,
    clock: Clock,
    close_interval: float,
    store: web.AppKey[Store],
    registry: web.AppKey[CollectorRegistry],
    limiters: Limiters,
) -> None:
    """Register the ping route and the month-close task; ConfigError if the windows do
    not fit the policy's retention of raw ids."""
    problem = check_retention(settings, policy.category(USAGE).retention.seconds, policy.source)
    if problem:
        raise ConfigError(settings.source, "usage.dispute_window", problem)

    async def usage_ctx(app: web.Application) -> AsyncIterator[None]:
        ledger = Ledger(app[store])
        endpoint = PingEndpoint(settings, ledger, clock, app[registry], limiters)
        closer = MonthCloser(
            app[store], settings, (ledger.forget, endpoint.caps.forget), ledger.refresh
        )
        app[USAGE_SERVICE] = UsageService(ledger, closer, endpoint)
        task = asyncio.create_task(closer.run_forever(close_interval), name="usage-month-close")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ledger.drain()

    app.cleanup_ctx.append(usage_ctx)
    app.router.add_post(PING_PATH, _ping)
    if OPENAPI in app:  # build_app's registry; a test's bare app has none
        describe(app[OPENAPI])


async def _ping(request: web.Request) -> web.Response:
    return await request.app[USAGE_SERVICE].endpoint.handle(request)

"""A usage app on the store fixture: the ping route and its close job, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from privacy.clock import ManualClock
from privacy.store import Store
from usage.client import pseudonymous_id
from usage.endpoint import PING_PATH
from usage.service import USAGE_SERVICE, UsageService, add_usage
from usage.settings import Tenant, UsageSettings
from webapi.errors import refusals
from webapi.ratelimit import LocalLimiters

ACME_KEY = "acme-key-0123456789abcdef"
GLOBEX_KEY = "globex-key-0123456789abcdef"
TENANTS = (Tenant("acme", ACME_KEY, max_installs=0), Tenant("globex", GLOBEX_KEY))
STORE_KEY = web.AppKey("test_store", Store)
REGISTRY_KEY = web.AppKey("test_registry", CollectorRegistry)


@dataclass
class UsageHarness:
    client: TestClient[web.Request, web.Application]
    app: web.Application
    store: Store
    clock: ManualClock

    @property
    def service(self) -> UsageService:
        return self.app[USAGE_SERVICE]

    async def ping(
        self,
        *,
        pid: str = "0" * 32,
        tenant: str = "acme",
        key: str | None = ACME_KEY,
        period: str | None = None,
        **extra: object,
    ) -> aiohttp.ClientResponse:
        from usage.period import period_of

        body = {
            "tenant": tenant,
            "period": period or period_of(self.clock.now()),
            "pid": pid,
            "platform": "ios",
            "app_version": "5.2.1",
            **extra,
        }
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return await self.client.post(PING_PATH, json=body, headers=headers)


def install_pid(n: int, tenant: str, period: str) -> str:
    """The pid install number n sends (its secret is n's bytes, for tests only)."""
    return pseudonymous_id(n.to_bytes(32, "big"), tenant, period)


async def start_usage(
    store: Store, clock: ManualClock, settings: UsageSettings
) -> AsyncIterator[UsageHarness]:
    app = web.Application(middlewares=[refusals])  # renders the refusals, as in build_app
    app[STORE_KEY] = store
    app[REGISTRY_KEY] = CollectorRegistry(auto_describe=True)
    add_usage(
        app,
        settings,
        policy=store.policy,
        clock=clock,
        close_interval=3600,
        store=STORE_KEY,
        registry=REGISTRY_KEY,
        limiters=LocalLimiters(clock),
    )
    async with TestClient(TestServer(app)) as client:
        yield UsageHarness(client, app, store, clock)

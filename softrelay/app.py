"""The aiohttp application: the one HTTP front of `softrelay serve`.

The app owns the store and the retention sweeper through its cleanup context, so they
start before the first request and stop, in reverse order, after the last. Later parts
(SIP over WebSocket, provisioning, usage, crash ingest, data-subject API) add their
routes and contexts here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from crashreports.service import add_crashreports
from crashreports.settings import CrashSettings
from dsr.api import add_dsr_routes
from dsr.service import DsrSettings
from privacy.clock import Clock
from privacy.keys import Keyring
from privacy.policy import Policy
from privacy.store import Store
from proxy.oauth import add_oauth
from proxy.oauth.settings import OAuthSettings
from proxy.provisioning import add_provisioning
from proxy.provisioning.settings import ProvisioningSettings
from proxy.sip.relay import Relay
from proxy.sip.settings import SipSettings, transport_settings
from proxy.sip.transports import SipTransports
from proxy.sip.websocket import add_sip_websocket
from push.apns import ApnsProvider
from push.apps import AppCredentials, PushSettings
from push.embedded import StandIns
from push.fcm import FcmProvider
from push.feed import add_delivery_feed
from push.service import PushLimits, PushService
from softrelay.metrics import (
    METRICS,
    METRICS_PATH,
    AuditedSweeper,
    AuditSnapshot,
    MetricsEndpoint,
    MetricsSettings,
)
from usage.service import add_usage
from usage.settings import UsageSettings
from webapi.connections import HTTP_GUARD, HttpGuard, HttpLimits, fit_process_descriptors
from webapi.errors import refusals
from webapi.openapi import OPENAPI, OpenApi, add_openapi_route

MAX_BODY = 1024 * 1024
log = logging.getLogger("softrelay.proxy")


@dataclass(frozen=True, slots=True)
class Services:
    """What the app is built from; each part is created by the caller (or a test)."""

    policy: Policy
    keyring: Keyring
    data_dir: Path
    clock: Clock
    sweep_interval: float
    push: PushSettings
    sip: SipSettings = field(default_factory=SipSettings)
    # Where SIP listens (UDP and TCP share the port); None: no SIP transports (tests).
    sip_listen: tuple[str, int] | None = None
    crash: CrashSettings = field(default_factory=CrashSettings)
    provisioning: ProvisioningSettings = field(default_factory=ProvisioningSettings)
    oauth: OAuthSettings = field(default_factory=OAuthSettings)
    dsr: DsrSettings = field(default_factory=DsrSettings)
    usage: UsageSettings = field(default_factory=UsageSettings)
    http: HttpLimits = field(default_factory=HttpLimits)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


SERVICES = web.AppKey("services", Services)
STORE = web.AppKey("store", Store)
SWEEPER = web.AppKey("sweeper", AuditedSweeper)
REGISTRY = web.AppKey("registry", CollectorRegistry)
PUSH = web.AppKey("push", PushService)
STAND_INS = web.AppKey("stand_ins", StandIns)
RELAY = web.AppKey("relay", Relay)
SIP_TRANSPORTS = web.AppKey("sip_transports", SipTransports)


def build_app(services: Services) -> web.Application:
    registry = CollectorRegistry(auto_describe=True)
    # Connection limits of the listeners `serve` starts (GuardedSite); the guard's
    # middleware marks when a request head has arrived, so it comes first.
    http = services.http
    if services.sip_listen is not None:
        # SIP shares the process's descriptors: both caps must fit under its limit.
        fit = fit_process_descriptors(http, services.sip.limits.max_connections)
        http = fit.limits
        sip_limits = replace(services.sip.limits, max_connections=fit.sip_connections)
        services = replace(services, sip=replace(services.sip, limits=sip_limits))
    guard = HttpGuard(http, services.clock, registry)
    # Every refusal and every handler error rendered as JSON in one place (webapi/errors.py).
    app = web.Application(client_max_size=MAX_BODY, middlewares=[guard.middleware, refusals])
    app[SERVICES] = services
    app[REGISTRY] = registry
    app[HTTP_GUARD] = guard
    app.cleanup_ctx.append(guard.context)
    # Each API module describes its operations here; served at /openapi.json.
    app[OPENAPI] = OpenApi("softrelay", "1")
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_sweeper_ctx)
    # Crash ingest (Sentry protocol); its forwarder stops before the store closes.
    add_crashreports(app, services.crash, services.clock, store=STORE, registry=REGISTRY)
    # Usage pings; the month close runs at the sweeper's cadence.
    add_usage(
        app,
        services.usage,
        policy=services.policy,
        clock=services.clock,
        close_interval=services.sweep_interval,
        store=STORE,
        registry=REGISTRY,
    )
    app.cleanup_ctx.append(_push_ctx)
    add_provisioning(app, services.provisioning, services.sip.pbxs, services.clock, STORE)
    add_oauth(app, services.oauth, services.clock)
    # Last in, first out: SIP stops taking messages before push and the store close.
    app.cleanup_ctx.append(_sip_ctx)
    # After the store and the relay: a subject proves identity through its PBX's flow.
    add_dsr_routes(app, services.dsr, STORE, RELAY)
    metrics = services.metrics
    add_openapi_route(app, metrics=metrics.listen is None, token=bool(metrics.token))
    add_sip_websocket(app, SIP_TRANSPORTS)
    if services.push.embedded:
        # Mock phones in another process (`simulate --target`) follow the stand-ins here.
        add_delivery_feed(app, STAND_INS)
    app.router.add_get("/healthz", healthz)
    app[METRICS] = endpoint = MetricsEndpoint(registry, services.metrics)
    if services.metrics.listen is None:  # else on a listener of its own (`serve`)
        app.router.add_get(METRICS_PATH, endpoint.handle)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    store = await Store.create(services.policy, services.keyring, services.data_dir, services.clock)
    app[STORE] = store
    yield
    await store.close()


async def _sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    store = app[STORE]
    # The sweeper takes the audit snapshot /metrics serves: a scrape does no store work.
    sweeper = AuditedSweeper(store, services.data_dir, AuditSnapshot(store, services.data_dir))
    app[SWEEPER] = sweeper
    app[METRICS].sweeper = sweeper
    task = asyncio.create_task(
        sweeper.run_forever(services.sweep_interval), name="retention-sweeper"
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _push_ctx(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    settings = services.push
    apps: tuple[AppCredentials, ...] = settings.apps
    stand_ins: StandIns | None = None
    if settings.embedded:
        stand_ins = await StandIns.start((settings.embedded_app_id,), services.clock)
        app[STAND_INS] = stand_ins
        apps = stand_ins.apps
    try:
        apns = await ApnsProvider.create(
            [a for a in apps if a.apns],
            stand_ins.apns.endpoint() if stand_ins else None,
            clock=services.clock.now,
        )
        fcm = await FcmProvider.create(
            [a for a in apps if a.fcm],
            stand_ins.fcm.endpoint if stand_ins else None,
            clock=services.clock,
        )
        push = PushService(
            [apns, fcm],
            app[STORE],
            services.keyring.pseudonym,
            services.clock,
            app[REGISTRY],
            limits=PushLimits(
                max_in_flight=settings.max_in_flight, max_attempts=settings.max_attempts
            ),
        )
        app[PUSH] = push
        yield
        await push.close()
    finally:
        if stand_ins is not None:
            await stand_ins.stop()


async def _sip_ctx(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    relay = Relay(services.sip, app[STORE], services.clock, app[REGISTRY], app.get(PUSH))
    app[RELAY] = relay
    if services.sip_listen is None:
        yield
        await relay.parking.close()
        return
    host, port = services.sip_listen
    transports = await SipTransports.start(
        transport_settings(services.sip, host, port), relay.handle, services.clock, app[REGISTRY]
    )
    app[SIP_TRANSPORTS] = transports
    relay.udp_flow = transports.udp_flow
    relay.listening(transports.addresses)  # a Route naming one of these names us
    timers = asyncio.create_task(relay.parking.run_forever())
    async with relay.overload.probing():
        yield
    timers.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await timers
    # Parked calls get their final answer while the flows to their callers still exist.
    await relay.parking.close()
    await transports.stop()
    await relay.drain()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})

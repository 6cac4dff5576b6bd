"""The aiohttp application: the one HTTP front of `softrelay serve`.

The app owns every part through its cleanup contexts (store, retention sweeper, crash
ingest, usage, push, SIP, provisioning, OAuth, data-subject API), so each starts before
the first request or SIP message and stops, in reverse order, after the last; every
background task has an owner there (privacy/tasks.py).

Shutdown, in this order (SIGTERM or Ctrl-C in `serve`, which first closes its own
/metrics listener when it has one; `AppRunner.cleanup()` anywhere):

1. HTTP stops accepting: aiohttp closes its listening sockets and idle connections.
2. The `on_shutdown` hooks, in the order they were added:
   a. SIP stops accepting (proxy/sip/service.py): a new request outside a dialog gets
      503 with Retry-After, the TCP and TLS listeners close (a new connection is
      refused), calls under way go on; the wake timers stop, then every parked INVITE
      gets its final 503 with Retry-After while the flow to its caller still exists.
   b. SIP over WebSocket: the messages in flight are handled, then each closes (1001).
   c. The provisioning tunnels of the PBXs close (1001).
   d. The push stand-ins' delivery feeds close (1001).
3. aiohttp waits for the HTTP handlers still running (at most its shutdown timeout).
4. The cleanup contexts, last in, first out:
   a. data-subject API, OAuth relay, provisioning relay: their client sessions close;
   b. SIP: the handlers in flight answer, every flow closes, the binding writes land;
   c. push: the providers close, then the stand-ins;
   d. usage: the month close stops, the batched ledger writes land;
   e. crash ingest: the scrubbing workers stop, batched writes land, the forwarder ends;
   f. the retention sweeper stops;
   g. the store closes (its WAL checkpointed), then the HTTP connection guard.

Nothing is written after the store closes, and every caller SIP or HTTP has taken on
gets a final answer before its connection goes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from cluster.redis import SharedRedis
from cluster.settings import ClusterSettings
from console.figures import Sources
from console.history import Interval, Ticker
from console.server import ConsoleServer
from console.settings import ConsoleSettings
from contacts.api import add_contacts_api
from contacts.settings import ContactsSettings
from crashreports.service import add_crashreports
from crashreports.settings import CrashSettings
from dsr.api import add_dsr_routes
from dsr.service import DsrSettings
from privacy.backend import StorageUnavailable
from privacy.clock import Clock
from privacy.database import StoreSettings
from privacy.keys import Keyring
from privacy.policy import Policy
from privacy.store import Store
from privacy.tasks import Tasks
from proxy.oauth import add_oauth
from proxy.oauth.settings import OAuthSettings
from proxy.provisioning import add_provisioning
from proxy.provisioning.settings import ProvisioningSettings
from proxy.sip.relay import Relay
from proxy.sip.service import SIP_SERVICE, add_sip
from proxy.sip.settings import SipSettings
from proxy.sip.transports import SipTransports
from push.apns import ApnsProvider
from push.apps import AppCredentials, PushSettings
from push.embedded import StandIns
from push.fcm import FcmProvider
from push.feed import add_delivery_feed
from push.service import PushLimits, PushService
from sipis.accounts import Accounts, Registrar, forget_dead_token, forget_removed_forever
from sipis.api import ACCOUNTS, REGISTRAR, add_sipis_api
from sipis.appleg import AppLeg
from sipis.calls import Calls, CallSettings
from sipis.lease import LeaseKeeper, Leases
from sipis.messages import Messages, MessageSettings
from sipis.registrar import Registrations, instance_key_of, open_registrations
from sipis.settings import SipisSettings
from softrelay.gcpauses import GcPauses
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
from webapi.ratelimit import Limiters, LocalLimiters, SharedLimiters

MAX_BODY = 1024 * 1024
# Builds SIPIS mode's registrar engine over the accounts; open while the app runs.
RegistrarFactory = Callable[[Accounts], AbstractAsyncContextManager[Registrar]]
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
    store: StoreSettings = field(default_factory=StoreSettings)  # default: SQLite in data_dir
    cluster: ClusterSettings | None = None  # a node of a cluster (Redis), or alone
    sipis: SipisSettings = field(default_factory=SipisSettings)  # off unless enabled
    contacts: ContactsSettings = field(default_factory=ContactsSettings)  # on unless disabled
    # SIPIS mode's registrar engine; None: the real one (sipis/registrar.py).
    sipis_registrar: RegistrarFactory | None = None
    # The operator console's admin listener: off without an admin token.
    console: ConsoleSettings = field(default_factory=lambda: ConsoleSettings(enabled=False))
    console_ticker: Ticker | None = None  # when the console samples; None: every `tick`


SERVICES = web.AppKey("services", Services)
STORE = web.AppKey("store", Store)
SWEEPER = web.AppKey("sweeper", AuditedSweeper)
REGISTRY = web.AppKey("registry", CollectorRegistry)
PUSH = web.AppKey("push", PushService)
STAND_INS = web.AppKey("stand_ins", StandIns)
RELAY = web.AppKey("relay", Relay)
SIP_TRANSPORTS = web.AppKey("sip_transports", SipTransports)
CLUSTER = web.AppKey("cluster", SharedRedis)
SHARED_LIMITERS = web.AppKey("shared_limiters", SharedLimiters)
SIPIS_CALLS = web.AppKey("sipis_calls", Calls)
SIPIS_MESSAGES = web.AppKey("sipis_messages", Messages)
SIPIS_LEASES = web.AppKey("sipis_leases", LeaseKeeper)  # in a cluster only
CONSOLE = web.AppKey("console", ConsoleServer)  # when the console serves


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
    app.cleanup_ctx.append(GcPauses(registry).context)
    # Each API module describes its operations here; served at /openapi.json.
    app[OPENAPI] = OpenApi("softrelay", "1")
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_sweeper_ctx)
    # The one choice of where the rate limits count: in memory alone; in a cluster, in
    # Redis, so a client cannot multiply its allowance by the number of nodes (the
    # limiters connect when the cluster context opens, below).
    limiters: Limiters = LocalLimiters(services.clock)
    if services.cluster is not None:
        app[SHARED_LIMITERS] = shared_limiters = SharedLimiters(services.clock)
        limiters = shared_limiters
    # Crash ingest (Sentry protocol); its forwarder stops before the store closes.
    add_crashreports(
        app, services.crash, services.clock, store=STORE, registry=REGISTRY, limiters=limiters
    )
    # Usage pings; the month close runs at the sweeper's cadence.
    add_usage(
        app,
        services.usage,
        policy=services.policy,
        clock=services.clock,
        close_interval=services.sweep_interval,
        store=STORE,
        registry=REGISTRY,
        limiters=limiters,
    )
    app.cleanup_ctx.append(_push_ctx)
    if services.cluster is not None:
        app.cleanup_ctx.append(_cluster_ctx)  # opened before SIP, closed after it
    # After the store and push, so SIP ends before they do; and the first on_shutdown
    # hook: SIP stops accepting before anything else waits (see the docstring).
    add_sip(
        app,
        services.sip,
        services.sip_listen,
        services.clock,
        store=STORE,
        registry=REGISTRY,
        push=PUSH,
        relay=RELAY,
        transports=SIP_TRANSPORTS,
        cluster=(services.cluster, CLUSTER) if services.cluster is not None else None,
    )
    add_provisioning(app, services.provisioning, services.sip.pbxs, services.clock, STORE, limiters)
    add_oauth(app, services.oauth, services.clock, limiters)
    if services.sipis.enabled:
        # After the store (and SIP, which the engine's calls will need); before the DSR
        # API, whose erasure un-registers.
        app.cleanup_ctx.append(_sipis_ctx)
        add_sipis_api(app, services.sipis, limiters, push=PUSH)
    # After the store, the relay and the cluster: a subject proves identity through its
    # PBX's flow, wherever it is linked; its challenge is answered on any node.
    add_dsr_routes(
        app,
        services.dsr,
        STORE,
        RELAY,
        limiters=limiters,
        cluster=CLUSTER if services.cluster is not None else None,
    )
    if services.contacts.enabled:
        # After the store, the relay, the cluster and SIPIS mode: an owner proves itself
        # with a SIPIS account's device secret or through its PBX (as DSR does).
        add_contacts_api(
            app,
            services.contacts,
            limiters,
            store=STORE,
            relay=RELAY,
            keyring=services.keyring,
            clock=services.clock,
            proof=services.dsr,
            cluster=CLUSTER if services.cluster is not None else None,
        )
    metrics = services.metrics
    add_openapi_route(app, metrics=metrics.listen is None, token=bool(metrics.token))
    if services.push.embedded:
        # Mock phones in another process (`simulate --target`) follow the stand-ins here.
        add_delivery_feed(app, STAND_INS)
    app.router.add_get("/healthz", healthz)
    app[METRICS] = endpoint = MetricsEndpoint(registry, services.metrics)
    if services.metrics.listen is None:  # else on a listener of its own (`serve`)
        app.router.add_get(METRICS_PATH, endpoint.handle)
    if services.console.serving:
        # Last: it opens after every service it shows, and closes before any of them.
        app.cleanup_ctx.append(_console_ctx)
    elif services.console.enabled:
        log.info("console.off: no [console] admin_token is set")
    return app


async def _console_ctx(app: web.Application) -> AsyncIterator[None]:
    """The operator console on its own listener (console/server.py), over the running
    services of this app."""
    services = app[SERVICES]
    settings = services.console
    sources = Sources(
        policy=services.policy,
        store=app[STORE],
        registry=app[REGISTRY],
        sweeper=app[SWEEPER],
        audit=app[SWEEPER].snapshot,
        sweep_interval=services.sweep_interval,
        usage=services.usage,
        clock=services.clock,
        relay=app.get(RELAY),
        cluster=app.get(CLUSTER),
        node_id=services.cluster.node_id if services.cluster is not None else "single",
        store_backend=services.store.backend,
    )
    ticker = services.console_ticker or Interval(settings.tick)
    app[CONSOLE] = console = await ConsoleServer.start(settings, sources, ticker=ticker)
    yield
    await console.close()


async def _cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """The node's Redis connections (cluster/redis.py); SIP starts its heartbeat once the
    internal link listens (proxy/sip/service.py)."""
    settings = app[SERVICES].cluster
    assert settings is not None
    app[CLUSTER] = shared = await SharedRedis.create(settings)
    app[SHARED_LIMITERS].connect(shared)
    yield
    app[SHARED_LIMITERS].disconnect()
    await shared.close()


async def _sipis_ctx(app: web.Application) -> AsyncIterator[None]:
    """SIPIS mode: the accounts and the registrar engine, which registers every active
    account at the start (spread) and un-registers those the retention sweeper or an
    erasure removed, at the sweeper's cadence."""
    services = app[SERVICES]
    accounts = Accounts(app[STORE], services.keyring)
    # The apps' own connections (REGISTER with the device secret) and the calls the
    # providers send the accounts, relayed to them (sipis/appleg.py, sipis/calls.py).
    sip = services.sip
    leg = AppLeg(f"sipis.{sip.domain}", accounts, services.clock, public_host=sip.public_host)
    push = app.get(PUSH)
    app[SIPIS_MESSAGES] = messages = Messages(
        MessageSettings(), app[STORE], leg, push, services.clock, app[REGISTRY]
    )
    app[SIPIS_CALLS] = calls = Calls(
        CallSettings(wake_timeout=services.sipis.wake_timeout),
        leg,
        push,
        services.clock,
        app[REGISTRY],
        texts=messages.from_provider,
    )
    factory = services.sipis_registrar
    if factory is None:  # the real engine (a test may give a double)

        @contextlib.asynccontextmanager
        async def factory(_: Accounts) -> AsyncIterator[Registrar]:
            handler = calls.from_provider
            async with open_registrations(
                services.sipis,
                services.clock,
                app[REGISTRY],
                handler=handler,
                instance_key=instance_key_of(services.keyring.index),
            ) as registrations:
                calls.provider = registrations
                yield registrations

    async with factory(accounts) as registrar:
        app[ACCOUNTS] = accounts
        app[REGISTRAR] = registrar
        # A push that finds a token dead clears it, in the store and the engine's copy.
        calls.dead_token = messages.dead_token = functools.partial(
            forget_dead_token, accounts, registrar
        )
        app[RELAY].attach_app_leg(leg)
        keeper = None
        if services.cluster is not None and isinstance(registrar, Registrations):
            # Each account is registered by one node of the cluster: the lease holder.
            leases = Leases(
                app[CLUSTER], services.cluster.secret, services.sipis.lease_ttl, services.clock
            )
            app[SIPIS_LEASES] = keeper = LeaseKeeper(leases, accounts, registrar)
            nodes = app[SIP_SERVICE].nodes
            if nodes is not None:
                # An app that connects to this node for an account another node holds
                # goes there over the internal link (sipis/appleg.py), and theirs here.
                leg.join(leases, nodes)
                nodes.app_handler = leg.from_node
        else:
            for account in await accounts.list_active():
                registrar.add(account)
        async with Tasks(log, "sipis.forget_failed") as tasks:
            if keeper is not None:
                tasks.spawn(keeper.run_forever(), name="sipis-leases")
            tasks.spawn(
                forget_removed_forever(accounts, registrar, services.sweep_interval),
                name="sipis-forget-removed",
            )
            tasks.spawn(calls.run_forever(), name="sipis-wake-timers")
            yield
            await calls.close()  # parked calls get their 503 while the provider is reachable
            await messages.close()
        if keeper is not None:
            if (nodes := app[SIP_SERVICE].nodes) is not None:
                nodes.app_handler = None  # the apps of our leases: 503, they try again
            await keeper.close()  # another node takes the accounts over at its next turn


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    store = await Store.create(
        services.policy, services.keyring, services.data_dir, services.clock, services.store
    )
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
    async with Tasks(log, "sweeper.failed") as tasks:
        tasks.spawn(sweeper.run_forever(services.sweep_interval), name="retention-sweeper")
        yield


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
            stand_ins.apns.endpoint() if stand_ins else settings.apns_endpoint,
            clock=services.clock.now,
        )
        fcm = await FcmProvider.create(
            [a for a in apps if a.fcm],
            stand_ins.fcm.endpoint if stand_ins else settings.fcm_endpoint,
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


async def healthz(request: web.Request) -> web.Response:
    """Whether this process can do its work, and which dependency it cannot reach:

        200 {"status": "ok", "dependencies": {"store": {"status": "ok", "backend": ...}}}
        503 {"status": "degraded", "dependencies": {"store": {"status": "unavailable", ...}}}

    The store is asked each time (a `SELECT 1`, bounded: privacy/postgres.py), so the
    answer is now's, not the last failed call's. Degraded is a readiness answer (send
    new work elsewhere), not a liveness one: relaying over linked flows goes on, and the
    process resumes by itself once the database is back. The backend is named, never
    its host, database or DSN."""
    services = request.app[SERVICES]
    try:
        await request.app[STORE].ping()
        store = "ok"
    except StorageUnavailable:
        store = "unavailable"
    healthy = store == "ok"
    body = {
        "status": "ok" if healthy else "degraded",
        "dependencies": {"store": {"status": store, "backend": services.store.backend}},
    }
    return web.json_response(body, status=200 if healthy else 503)

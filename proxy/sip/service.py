"""SIP's lifecycle: one owner starts the relay and its transports, and ends them in order.

    add_sip(app, settings, listen, clock, store=STORE, registry=REGISTRY, push=PUSH,
            relay=RELAY, transports=SIP_TRANSPORTS)

adds SIP to the aiohttp application as one cleanup context (`SipService.start` ...
`close`), a hook on the app's `on_shutdown` (`stop_accepting`), and the route of SIP
over WebSocket. aiohttp calls `on_shutdown` once its HTTP listeners are closed and
before it waits for the handlers in flight, and the cleanup contexts after those
handlers have returned, so a SIGTERM runs:

1. `stop_accepting` (on_shutdown):
   a. the relay answers every new request outside a dialog `503` with Retry-After, and
      the TCP and TLS listeners close (a new connection is refused; a WebSocket upgrade
      gets HTTP 503). Flows already open carry on: calls under way can end, a CANCEL
      finds its call, responses find their way back;
   b. the wake timers stop, so no INVITE is parked or expired behind our back;
   c. every parked INVITE gets its final `503` with Retry-After while the flow to its
      caller still exists, and one parked from now on gets it at once.
2. The SIP WebSocket endpoint closes its flows (its own on_shutdown hook, added after
   this one), once their messages in flight were handled.
3. `close` (cleanup context): the transports let the handlers in flight answer, close
   every flow and wait for the connections to go (each step bounded); then the binding
   writes under way land, before the store closes (its context is older, so it ends
   later); then the overload probe stops.

In a cluster (`[cluster]`), the node's internal SIP link (proxy/sip/nodes.py) starts
after the transports, when the relay joins the cluster, and then the node's heartbeat
(cluster/redis.py), which tells the others where that link listens; at `close` it ends
after the transports (the flows it forwarded for are closed by then).

Every task of this part is owned (privacy/tasks.py): the wake timers and the probe
here, the flows' workers in the transports, binding writes in the relay, pushes in the
parking.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from cluster.location import Location, format_address
from cluster.redis import SharedRedis
from cluster.settings import ClusterSettings
from privacy.clock import Clock
from privacy.store import Store
from privacy.tasks import Tasks
from proxy.sip.flow import Transport
from proxy.sip.nodes import Nodes
from proxy.sip.relay import Relay
from proxy.sip.settings import SipSettings, transport_settings
from proxy.sip.transports import SipTransports
from proxy.sip.websocket import add_sip_websocket
from push.service import PushService

log = logging.getLogger("softrelay.sip")


class SipService:
    """The relay and its transports, from `start` to `close`."""

    def __init__(self, relay: Relay, transports: SipTransports | None) -> None:
        self.relay = relay
        self.transports = transports  # None: no listeners (an app built for a test)
        self._timers = Tasks(log, "sip.timer_failed")
        self._accepting = True
        self._closed = False
        self.nodes: Nodes | None = None  # the internal link, in a cluster

    @classmethod
    async def start(
        cls,
        settings: SipSettings,
        listen: tuple[str, int] | None,
        store: Store,
        clock: Clock,
        registry: CollectorRegistry,
        push: PushService | None,
        cluster: tuple[ClusterSettings, SharedRedis] | None = None,
    ) -> SipService:
        """The relay, and with `listen` (host, port) its transports and timers; with
        `cluster`, the node's internal link and heartbeat."""
        relay = Relay(settings, store, clock, registry, push)
        if listen is None:
            return cls(relay, None)
        host, port = listen
        transports = await SipTransports.start(
            transport_settings(settings, host, port), relay.handle, clock, registry
        )
        relay.udp_flow = transports.udp_flow
        if (own := transports.own_udp_address) is not None:  # serve --workers N
            relay.send_own_udp(transports.udp_out, own, transports.address(Transport.UDP))
        relay.listening(transports.addresses)  # a Route naming one of these names us
        self = cls(relay, transports)
        if cluster is not None:
            settings_, shared = cluster
            try:
                self.nodes = await Nodes.start(
                    relay,
                    Location(shared, settings_.secret),
                    settings_.secret,
                    settings_.internal_listen,
                    clock,
                    registry,
                )
            except BaseException:
                await transports.stop()
                raise
            shared.start(
                heartbeat={"internal": format_address(self.nodes.address)},
                live=lambda: _load_fields(transports, relay),
            )
        self._timers.spawn(relay.parking.run_forever(), name="sip-wake-timers")
        if relay.overload.settings.lag > 0:
            self._timers.spawn(relay.overload.probe_forever(), name="sip-overload-probe")
        return self

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def stop_accepting(self) -> None:
        """Steps 1a-1c of the module docstring. Idempotent."""
        if not self._accepting:
            return
        self._accepting = False
        # Both before the first await: no message is taken on between the two.
        self.relay.stop_accepting()
        if self.transports is not None:
            self.transports.stop_accepting()
        log.info("sip.stopped_accepting")
        # Stopped before the parked calls are answered: a wake timeout or an unanswered
        # INVITE parked by the timer would otherwise race with their 503.
        await self._timers.close()
        answered = await self.relay.parking.close()
        log.info("sip.parked_answered", extra={"fields": {"count": answered}})

    async def close(self) -> None:
        """Step 3 of the module docstring (after step 1, should on_shutdown not have
        run). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.stop_accepting()
        if self.transports is not None:
            await self.transports.stop()
        if self.nodes is not None:
            await self.nodes.close()
        await self.relay.close()
        log.info("sip.stopped")


SIP_SERVICE = web.AppKey("sip_service", SipService)


def add_sip(
    app: web.Application,
    settings: SipSettings,
    listen: tuple[str, int] | None,
    clock: Clock,
    *,
    store: web.AppKey[Store],
    registry: web.AppKey[CollectorRegistry],
    push: web.AppKey[PushService],
    relay: web.AppKey[Relay],
    transports: web.AppKey[SipTransports],
    cluster: tuple[ClusterSettings, web.AppKey[SharedRedis]] | None = None,
) -> None:
    """SIP on `app`: the context (after the store's and push's), the shutdown hook and
    the WebSocket route; sets `app[relay]`, and `app[transports]` when `listen` is set."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        node = None if cluster is None else (cluster[0], app[cluster[1]])
        sip = await SipService.start(
            settings, listen, app[store], clock, app[registry], app.get(push), node
        )
        app[SIP_SERVICE] = sip
        app[relay] = sip.relay
        if sip.transports is not None:
            app[transports] = sip.transports
        yield
        await sip.close()

    async def stop_accepting(app: web.Application) -> None:
        sip = app.get(SIP_SERVICE)
        if sip is not None:
            await sip.stop_accepting()

    app.cleanup_ctx.append(context)
    app.on_shutdown.append(stop_accepting)
    # Its on_shutdown hook comes after ours: parked calls are answered first.
    add_sip_websocket(app, transports)


def _load_fields(transports: SipTransports, relay: Relay) -> dict[str, str]:
    """What each heartbeat tells the other nodes of this one's load (the console's
    cluster page): its open connection flows and its event loop's lag in ms."""
    return {"flows": str(transports.flow_count), "load": f"{relay.overload.lag * 1000:.1f}"}

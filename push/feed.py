"""The stand-ins' delivery feed: what they delivered, for mock phones in another process.

`GET /stand-ins/v1/deliveries[?token=T]` upgrades to a WebSocket that sends one JSON
text message per push the embedded APNs and FCM stand-ins accept from then on:
`{"service", "token", "app", "headers", "payload", "received_at"}`. It exists only
where the stand-ins do (no push credentials configured), answers loopback peers only
(403 otherwise), and keeps nothing: what it sends is fake pushes to fake devices.

At shutdown (the app's `on_shutdown`, before aiohttp waits for its handlers) every open
feed is closed with 1001 (going away), so a reader learns that the server went, and
aiohttp need not wait out its shutdown timeout for handlers that would never return.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

import orjson
from aiohttp import WSCloseCode, web

from privacy.tasks import Tasks
from push.embedded import StandIns
from push.fakes.script import Delivery
from webapi import openapi
from webapi.errors import Refusal

FEED_PATH = "/stand-ins/v1/deliveries"
MAX_QUEUED = 10_000  # deliveries waiting for a slow reader; past it the feed closes
CLOSE_TIMEOUT = 5.0  # how long a close at shutdown waits for the reader's close frame
log = logging.getLogger("softrelay.push")


def add_delivery_feed(app: web.Application, stand_ins: web.AppKey[StandIns]) -> None:
    feeds: set[web.WebSocketResponse] = set()  # open ones, for the shutdown hook

    async def feed(request: web.Request) -> web.StreamResponse:
        if not _loopback(request.remote):
            raise Refusal(403, "loopback_only", "the delivery feed answers loopback only")
        running = request.app.get(stand_ins)
        if running is None:
            raise Refusal(404, "no_stand_ins", "no push stand-ins run here")
        token = request.query.get("token")
        ws = web.WebSocketResponse(heartbeat=30, timeout=CLOSE_TIMEOUT)
        if not ws.can_prepare(request).ok:
            raise Refusal(426, "websocket_required", "the delivery feed is a WebSocket")
        await ws.prepare(request)
        # None: the reader fell MAX_QUEUED behind; the sender closes the feed.
        queue: asyncio.Queue[Delivery | None] = asyncio.Queue()

        def listener(delivery: Delivery) -> None:
            if queue.qsize() < MAX_QUEUED and (token is None or delivery.token == token):
                queue.put_nowait(delivery if queue.qsize() < MAX_QUEUED - 1 else None)

        unsubscribe = running.deliveries.subscribe(listener)
        feeds.add(ws)
        try:
            # The sender is this request's own task: cancelled and awaited as it ends.
            async with Tasks(log, "push.feed_failed") as tasks:
                tasks.spawn(_send(ws, queue), name="delivery-feed")
                async for _ in ws:  # the client sends nothing; this ends when it closes
                    pass
        finally:
            feeds.discard(ws)
            unsubscribe()
        return ws

    async def shutdown(app: web.Application) -> None:
        """Close every open feed (1001, going away); its handler then returns."""
        closing = [ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutdown") for ws in feeds]
        await asyncio.gather(*closing)

    app.router.add_get(FEED_PATH, feed)
    app.on_shutdown.append(shutdown)
    if openapi.OPENAPI in app:  # build_app's registry; a test's bare app has none
        spec = openapi.websocket_upgrade(
            "The embedded push stand-ins' deliveries, one JSON text message each (loopback)",
            None,
            {
                "403": openapi.refusal("loopback_only"),
                "404": openapi.refusal("no_stand_ins"),
                "426": openapi.refusal("websocket_required: no WebSocket upgrade"),
            },
        )
        spec["parameters"] = [  # the device token to follow; all when absent
            {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}}
        ]
        app[openapi.OPENAPI].operation(FEED_PATH, "get", spec)


async def _send(ws: web.WebSocketResponse, queue: asyncio.Queue[Delivery | None]) -> None:
    while not ws.closed:
        delivery = await queue.get()
        if delivery is None:
            await ws.close(message=b"reader too slow")
            return
        item: dict[str, Any] = {
            "service": delivery.service,
            "token": delivery.token,
            "app": delivery.app,
            "headers": delivery.headers,
            "payload": delivery.payload,
            "received_at": delivery.received_at,
        }
        await ws.send_str(orjson.dumps(item).decode())


def _loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False

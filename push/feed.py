"""The stand-ins' delivery feed: what they delivered, for mock phones in another process.

`GET /stand-ins/v1/deliveries[?token=T]` upgrades to a WebSocket that sends one JSON
text message per push the embedded APNs and FCM stand-ins accept from then on:
`{"service", "token", "app", "headers", "payload", "received_at"}`. It exists only
where the stand-ins do (no push credentials configured), answers loopback peers only
(403 otherwise), and keeps nothing: what it sends is fake pushes to fake devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from typing import Any

import orjson
from aiohttp import web

from webapi import openapi
from push.embedded import StandIns
from push.fakes.script import Delivery

FEED_PATH = "/stand-ins/v1/deliveries"
MAX_QUEUED = 10_000  # deliveries waiting for a slow reader; past it the feed closes


def add_delivery_feed(app: web.Application, stand_ins: web.AppKey[StandIns]) -> None:
    async def feed(request: web.Request) -> web.StreamResponse:
        if not _loopback(request.remote):
            return _refusal(403, "loopback_only", "the delivery feed answers loopback only")
        running = request.app.get(stand_ins)
        if running is None:
            return _refusal(404, "no_stand_ins", "no push stand-ins run here")
        token = request.query.get("token")
        ws = web.WebSocketResponse(heartbeat=30)
        if not ws.can_prepare(request).ok:
            return _refusal(426, "websocket_required", "the delivery feed is a WebSocket")
        await ws.prepare(request)
        # None: the reader fell MAX_QUEUED behind; the sender closes the feed.
        queue: asyncio.Queue[Delivery | None] = asyncio.Queue()

        def listener(delivery: Delivery) -> None:
            if queue.qsize() < MAX_QUEUED and (token is None or delivery.token == token):
                queue.put_nowait(delivery if queue.qsize() < MAX_QUEUED - 1 else None)

        unsubscribe = running.deliveries.subscribe(listener)
        sender = asyncio.create_task(_send(ws, queue))
        try:
            async for _ in ws:  # the client sends nothing; this ends when it closes
                pass
        finally:
            unsubscribe()
            sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        return ws

    app.router.add_get(FEED_PATH, feed)
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


def _refusal(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


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

"""Where a mock phone receives its pushes: the push stand-ins' deliveries.

A real phone gets its push from Apple or Google; a mock phone gets it from the
stand-ins that softrelay pushed to. In the same process (`--embedded`, the pytest
plugin) the inbox listens to the stand-ins' `Deliveries`; against another process it
reads their delivery feed, the WebSocket `/stand-ins/v1/deliveries` that `serve` offers
on loopback while the stand-ins run (`push/feed.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
import orjson

from push.fakes.script import Deliveries, Delivery

FEED_PATH = "/stand-ins/v1/deliveries"


class PushKind(StrEnum):
    CALL = "incoming_call"
    CANCELLED = "call_cancelled"
    REREGISTER = "reregister"
    MESSAGE = "new_message"  # SIPIS: a text waits at softrelay (nothing of it in the push)


@dataclass(frozen=True, slots=True)
class Push:
    service: str  # apns or fcm
    kind: PushKind
    voip: bool  # APNs push type voip (a CallKit report is due)


def push_of(service: str, headers: dict[str, str], payload: dict[str, Any]) -> Push | None:
    """What a delivered push asks of the app: APNs carries `event`, FCM `data.reason`."""
    data = payload.get("data")
    if not isinstance(data, dict):
        message = payload.get("message")
        data = message.get("data") if isinstance(message, dict) else None
    event = payload.get("event") or (data.get("reason") if isinstance(data, dict) else None)
    try:
        kind = PushKind(str(event))
    except ValueError:
        return None
    return Push(service, kind, headers.get("apns-push-type") == "voip")


class PushInbox:
    """Pushes per token, for the phones waiting on them; unclaimed ones are dropped."""

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[Push]] = {}
        self.received = 0
        self._stop: Callable[[], None] | None = None
        self._feeds: list[asyncio.Task[None]] = []
        # Told of each push a phone waits for, as it arrives (a bench takes its time).
        self.on_push: list[Callable[[str, Push], None]] = []

    def watch(self, token: str) -> asyncio.Queue[Push]:
        return self._queues.setdefault(token, asyncio.Queue())

    def forget(self, token: str) -> None:
        self._queues.pop(token, None)

    def put(self, token: str, push: Push | None) -> None:
        queue = self._queues.get(token)
        if push is not None and queue is not None:
            self.received += 1
            for listener in self.on_push:
                listener(token, push)
            queue.put_nowait(push)

    @classmethod
    def embedded(cls, deliveries: Deliveries) -> PushInbox:
        inbox = cls()

        def listener(delivery: Delivery) -> None:
            inbox.put(delivery.token, push_of(delivery.service, delivery.headers, delivery.payload))

        inbox._stop = deliveries.subscribe(listener)
        return inbox

    @classmethod
    async def from_feed(cls, http_url: str, session: aiohttp.ClientSession) -> PushInbox:
        """Follow the delivery feed of a softrelay in another process (loopback only)."""
        inbox = cls()
        await inbox.follow(http_url, session)
        return inbox

    async def follow(self, http_url: str, session: aiohttp.ClientSession) -> None:
        """Follow one more relay's feed too: the nodes of a cluster push each on its own."""
        url = http_url.replace("http", "ws", 1).rstrip("/") + FEED_PATH
        ws = await asyncio.wait_for(session.ws_connect(url, autoping=True), 10)
        inbox = self

        async def follow() -> None:
            try:
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        item = orjson.loads(msg.data)
                        inbox.put(
                            item["token"],
                            push_of(item["service"], item["headers"], item["payload"]),
                        )
            finally:
                await ws.close()

        self._feeds.append(asyncio.create_task(follow(), name="push-feed"))

    async def close(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None
        for feed in self._feeds:
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed
        self._feeds.clear()

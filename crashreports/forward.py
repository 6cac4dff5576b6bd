"""Forwarding scrubbed events to an upstream Sentry, through a bounded queue.

The ingest offers each stored, scrubbed event; a full queue drops it and counts
(`softrelay_crash_forward_total{outcome="queue_full"}`): the upstream being slow must
never hold up the apps. One worker sends, retrying a connection error, 429 or 5xx with
capped exponential backoff and jitter, never sooner than the upstream's Retry-After;
another 4xx is final. `close()` lets the worker finish the queue for a bounded time,
then cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from crashreports.envelope import build_event_envelope
from crashreports.settings import Upstream
from privacy.clock import Clock, iso

log = logging.getLogger("softrelay.crashreports")
USER_AGENT = "softrelay-forwarder/1"
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
DRAIN_SECONDS = 5.0
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class _Verdict:
    done: bool
    retry_after: float | None = None


class Forwarder:
    def __init__(
        self,
        upstream: Upstream,
        clock: Clock,
        registry: CollectorRegistry,
        *,
        queue_size: int,
        attempts: int,
        backoff_base: float = BACKOFF_BASE,
    ) -> None:
        self.upstream = upstream
        self._clock = clock
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(queue_size)
        self._attempts = attempts
        self._backoff_base = backoff_base
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.total = Counter(
            "softrelay_crash_forward",
            "Scrubbed crash reports offered to the upstream Sentry, by outcome",
            ["outcome"],
            registry=registry,
        )

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._task = asyncio.create_task(self._run(), name="crash-forwarder")

    def offer(self, event: dict[str, Any]) -> bool:
        """Queue a scrubbed event; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.total.labels("queue_full").inc()
            return False
        return True

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)  # the end marker: the worker drains, then stops
            done, _ = await asyncio.wait({self._task}, timeout=DRAIN_SECONDS)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            await self._send(event)

    async def _send(self, event: dict[str, Any]) -> None:
        body = build_event_envelope(event, iso(self._clock.now()))
        for attempt in range(self._attempts):
            verdict = await self._attempt(body)
            if verdict.done:
                return
            if attempt + 1 == self._attempts:
                break
            delay = min(BACKOFF_CAP, self._backoff_base * 2**attempt)
            delay = random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not a secret
            await asyncio.sleep(max(delay, verdict.retry_after or 0.0))
        self.total.labels("failed").inc()
        log.warning("crash.forward_failed", extra={"fields": {"count": self._attempts}})

    async def _attempt(self, body: bytes) -> _Verdict:
        assert self._session is not None
        auth = (
            f"Sentry sentry_version=7, sentry_client={USER_AGENT}, "
            f"sentry_key={self.upstream.public_key}"
        )
        headers = {"Content-Type": "application/x-sentry-envelope", "X-Sentry-Auth": auth}
        try:
            async with self._session.post(
                self.upstream.envelope_url, data=body, headers=headers
            ) as resp:
                status = resp.status
                retry_after = _seconds(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("crash.forward_error", extra={"fields": {"error": type(exc).__name__}})
            return _Verdict(done=False)
        if 200 <= status < 300:
            self.total.labels("sent").inc()
            return _Verdict(done=True)
        if status == 429 or status >= 500:
            return _Verdict(done=False, retry_after=retry_after)
        self.total.labels("refused").inc()
        log.warning("crash.forward_refused", extra={"fields": {"count": status}})
        return _Verdict(done=True)


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return min(BACKOFF_CAP, max(0.0, float(value)))
    except ValueError:
        return None

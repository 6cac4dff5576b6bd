"""The push service: the relay's one door to APNs and FCM.

It picks the provider for a binding, bounds the pushes in flight per provider and app
(rejecting and counting past the limit, never queueing without bound), retries what is
temporary with capped exponential backoff and jitter that honours Retry-After but never
runs past the wake deadline, forgets a token the provider declared dead, and writes one
`push_log` line and the metrics per wake. Time and waiting are injected, so retries are
tested by moving a clock.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from privacy.clock import Clock
from privacy.logs import category_logger
from privacy.store import Store
from push.provider import PushProvider
from push.wake import (
    Delivered,
    Outcome,
    PermanentFailure,
    Service,
    TemporaryFailure,
    TokenDead,
    WakeRequest,
    outcome_label,
)

Sleep = Callable[[float], Awaitable[None]]
# Refused here, before any provider saw it: `max_in_flight` pushes of the app are out.
OVERLOADED = TemporaryFailure("overloaded")
push_log = category_logger("push_log")
log = logging.getLogger("softrelay.push")


@dataclass(frozen=True, slots=True)
class PushLimits:
    max_in_flight: int = 200  # per provider family and app
    max_attempts: int = 4
    backoff_base: float = 0.25  # seconds; doubled per attempt
    backoff_cap: float = 4.0


@dataclass(frozen=True, slots=True)
class WakeResult:
    outcome: Outcome
    attempts: int
    latency: float  # seconds on the service's clock


class PushMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pushes = Counter(
            "softrelay_push",
            "Wake pushes by provider, app and final outcome",
            ["provider", "app", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "softrelay_push_latency_seconds",
            "Time from wake request to the provider's final answer",
            ["provider"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.rejected = Counter(
            "softrelay_push_rejected",
            "Pushes refused because the provider and app had too many in flight",
            ["provider", "app"],
            registry=registry,
        )
        self.retries = Counter(
            "softrelay_push_retries",
            "Push attempts after the first",
            ["provider"],
            registry=registry,
        )
        self.dead_tokens = Counter(
            "softrelay_push_dead_tokens",
            "Tokens deleted because the provider declared them dead",
            ["provider"],
            registry=registry,
        )


class PushService:
    def __init__(
        self,
        providers: Sequence[PushProvider],
        store: Store | None,
        fingerprint_key: bytes,
        clock: Clock,
        registry: CollectorRegistry,
        *,
        limits: PushLimits | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._providers = list(providers)
        self._store = store
        self._fingerprint_key = fingerprint_key
        self._clock = clock
        self._limits = limits or PushLimits()
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._in_flight: dict[tuple[str, str], int] = {}
        self.metrics = PushMetrics(registry)

    async def close(self) -> None:
        for provider in self._providers:
            await provider.close()

    def fingerprint(self, token: str) -> str:
        """A keyed hash of a token: lets logs correlate pushes, reveals nothing."""
        return hmac.digest(self._fingerprint_key, b"push-token\x1f" + token.encode(), "sha256")[
            :8
        ].hex()

    async def wake(self, request: WakeRequest) -> WakeResult:
        started = self._clock.now()
        family = request.service.family
        slot = (family, request.app_id)
        provider = self._provider(request)
        if provider is None:
            result = WakeResult(PermanentFailure("no credentials for this app"), 0, 0.0)
        elif self._in_flight.get(slot, 0) >= self._limits.max_in_flight:
            self.metrics.rejected.labels(family, request.app_id).inc()
            result = WakeResult(OVERLOADED, 0, 0.0)
        else:
            self._in_flight[slot] = self._in_flight.get(slot, 0) + 1
            try:
                outcome, attempts = await self._attempts(provider, request)
            finally:
                self._in_flight[slot] -= 1
            result = WakeResult(outcome, attempts, self._clock.now() - started)
        if isinstance(result.outcome, TokenDead):
            await self._forget(request)
        self._record(request, result)
        return result

    def app_for(self, service: Service, pn_param: str) -> str | None:
        """The configured app a binding's RFC 8599 `pn-param` names, if any. For APNs
        the phone sends `<team id>.<bundle id>[.voip]`; the app is the bundle id. For
        FCM, the app id itself."""
        candidates = [pn_param]
        if service.family == "apns":
            team, _, rest = pn_param.partition(".")
            bare = rest if team.isalnum() and team.isupper() and rest else pn_param
            candidates += [bare, bare.removesuffix(".voip"), pn_param.removesuffix(".voip")]
        for app_id in candidates:
            if any(p.family == service.family and p.serves(app_id) for p in self._providers):
                return app_id
        return None

    def _provider(self, request: WakeRequest) -> PushProvider | None:
        for provider in self._providers:
            if provider.family == request.service.family and provider.serves(request.app_id):
                return provider
        return None

    async def _attempts(self, provider: PushProvider, request: WakeRequest) -> tuple[Outcome, int]:
        attempt = 0
        while True:
            remaining = request.deadline - self._clock.now()
            if remaining <= 0:
                return TemporaryFailure("deadline passed"), attempt
            attempt += 1
            if attempt > 1:
                self.metrics.retries.labels(provider.family).inc()
            outcome = await provider.send(request, remaining)
            if not isinstance(outcome, TemporaryFailure) or attempt >= self._limits.max_attempts:
                return outcome, attempt
            delay = self._backoff(attempt, outcome.retry_after)
            if self._clock.now() + delay >= request.deadline:
                return outcome, attempt  # waiting would end after the phone stopped ringing
            await self._sleep(delay)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter below a capped exponential; never sooner than Retry-After."""
        ceiling = min(self._limits.backoff_cap, self._limits.backoff_base * 2 ** (attempt - 1))
        jittered = self._rng.uniform(0, ceiling)
        return max(jittered, retry_after or 0.0)

    async def _forget(self, request: WakeRequest) -> None:
        self.metrics.dead_tokens.labels(request.service.family).inc()
        if self._store is None:
            return
        for record in await self._store.find("registration", push_token=request.token):
            # Not a use of the binding: its retention keeps counting from the last real one.
            await self._store.update(
                "registration",
                record.id,
                {"push_token": None, "push_provider": None},
                use=False,
            )

    def _record(self, request: WakeRequest, result: WakeResult) -> None:
        family, label = request.service.family, outcome_label(result.outcome)
        self.metrics.pushes.labels(family, request.app_id, label).inc()
        self.metrics.latency.labels(family).observe(result.latency)
        detail = "" if isinstance(result.outcome, Delivered) else result.outcome.reason
        push_log.info(
            "push",
            extra={
                "fields": {
                    "provider": request.service.value,
                    "app_id": request.app_id,
                    "reason": request.reason.value,
                    "outcome": label,
                    "detail": detail,
                    "attempts": result.attempts,
                    "latency_ms": round(result.latency * 1000, 3),
                    "token_fp": self.fingerprint(request.token),
                }
            },
        )

"""The push service: retries follow Retry-After and stop at the deadline, the concurrency
limit rejects and counts, a dead token leaves the registration store, and the push log
holds a fingerprint of the token, never the token. Time moves only on an injected clock.

The provider here is a scripted stand-in at our own seam; the real aioapns and
firebase-admin clients are tested against the APNs and FCM stand-ins elsewhere.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from privacy.audit import scan_for_canaries
from privacy.clock import ManualClock
from privacy.logs import setup_logging
from privacy.store import Store
from push.service import PushLimits, PushService
from push.wake import (
    Delivered,
    Outcome,
    PermanentFailure,
    Reason,
    Service,
    TemporaryFailure,
    TokenDead,
    WakeRequest,
)
from tests.conftest import sample_fields

TOKEN = "a1b2c3d4" * 8


class ScriptedProvider:
    family = "apns"

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.timeouts: list[float] = []
        self.gate: asyncio.Event | None = None

    def serves(self, app_id: str) -> bool:
        return app_id == "com.example.phone"

    async def send(self, request: WakeRequest, timeout: float) -> Outcome:  # noqa: ASYNC109
        self.timeouts.append(timeout)
        if self.gate is not None:
            await self.gate.wait()
        return self.outcomes.pop(0) if self.outcomes else Delivered()

    async def close(self) -> None:
        pass


class Harness:
    def __init__(
        self, clock: ManualClock, store: Store | None, *providers: ScriptedProvider
    ) -> None:
        self.clock = clock
        self.sleeps: list[float] = []
        self.registry = CollectorRegistry()
        self.service = PushService(
            providers,
            store,
            b"k" * 32,
            clock,
            self.registry,
            limits=PushLimits(max_in_flight=2, max_attempts=4),
            sleep=self.sleep,
            rng=random.Random(7),
        )

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.advance(seconds)

    def request(self, seconds_left: float, app_id: str = "com.example.phone") -> WakeRequest:
        return WakeRequest(
            Service.APNS, TOKEN, app_id, Reason.INCOMING_CALL, self.clock.now() + seconds_left, "c1"
        )

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return value or 0.0


@pytest.fixture
def logs(tmp_path: Path, clock: ManualClock) -> Iterator[Path]:
    from privacy.policy import load_policy

    logset = setup_logging(load_policy("auerproxy"), tmp_path, clock)
    try:
        yield tmp_path
    finally:
        logset.close()


async def test_retry_waits_for_retry_after_then_delivers(clock: ManualClock) -> None:
    provider = ScriptedProvider(TemporaryFailure("TooManyRequests", retry_after=3.0))
    h = Harness(clock, None, provider)
    result = await h.service.wake(h.request(30))
    assert isinstance(result.outcome, Delivered)
    assert result.attempts == 2
    assert h.sleeps[0] >= 3.0
    # The second attempt may only use what is left of the deadline.
    assert provider.timeouts[1] == pytest.approx(30 - h.sleeps[0])
    assert h.metric("softrelay_push_retries_total", provider="apns") == 1


async def test_no_retry_when_retry_after_passes_the_deadline(clock: ManualClock) -> None:
    provider = ScriptedProvider(TemporaryFailure("ServiceUnavailable", retry_after=10.0))
    h = Harness(clock, None, provider)
    result = await h.service.wake(h.request(5))
    assert result.outcome == TemporaryFailure("ServiceUnavailable", retry_after=10.0)
    assert result.attempts == 1
    assert h.sleeps == []


async def test_backoff_is_capped_jittered_and_bounded_in_attempts(clock: ManualClock) -> None:
    provider = ScriptedProvider(*[TemporaryFailure("InternalServerError")] * 10)
    h = Harness(clock, None, provider)
    result = await h.service.wake(h.request(600))
    assert isinstance(result.outcome, TemporaryFailure)
    assert result.attempts == 4
    assert len(h.sleeps) == 3
    for attempt, slept in enumerate(h.sleeps, start=1):
        assert 0 <= slept <= min(4.0, 0.25 * 2 ** (attempt - 1))
    assert len(set(h.sleeps)) == 3, "jitter: the waits differ"


async def test_past_deadline_is_not_sent(clock: ManualClock) -> None:
    provider = ScriptedProvider()
    h = Harness(clock, None, provider)
    result = await h.service.wake(h.request(0))
    assert result.outcome == TemporaryFailure("deadline passed")
    assert provider.timeouts == []


async def test_concurrency_limit_rejects_and_counts(clock: ManualClock) -> None:
    provider = ScriptedProvider()
    provider.gate = asyncio.Event()
    h = Harness(clock, None, provider)
    held = [asyncio.create_task(h.service.wake(h.request(30))) for _ in range(2)]
    await asyncio.sleep(0)  # let both reach the provider
    third = await h.service.wake(h.request(30))
    assert third.outcome == TemporaryFailure("overloaded")
    assert h.metric("softrelay_push_rejected_total", provider="apns", app="com.example.phone") == 1
    provider.gate.set()
    assert all(isinstance(r.outcome, Delivered) for r in await asyncio.gather(*held))
    # Slots are given back: the next wake goes through.
    assert isinstance((await h.service.wake(h.request(30))).outcome, Delivered)


async def test_unknown_app_is_a_permanent_failure(clock: ManualClock) -> None:
    h = Harness(clock, None, ScriptedProvider())
    result = await h.service.wake(h.request(30, app_id="com.other.app"))
    assert isinstance(result.outcome, PermanentFailure)


async def test_dead_token_leaves_the_registration_store_but_not_its_retention(
    store: Store, clock: ManualClock
) -> None:
    fields = sample_fields(store.policy.categories["registration"])
    fields["push_token"] = TOKEN
    record_id = await store.put("registration", fields)
    (before,) = await store.find("registration", push_token=TOKEN)
    clock.advance(60)
    h = Harness(clock, store, ScriptedProvider(TokenDead("Unregistered")))
    result = await h.service.wake(h.request(30))
    assert result.outcome == TokenDead("Unregistered")
    assert await store.find("registration", push_token=TOKEN) == []
    (after,) = await store.find("registration", pbx_serial=str(fields["pbx_serial"]))
    assert after.id == record_id
    assert after.fields["push_token"] is None
    assert after.last_used_at == before.last_used_at
    assert h.metric("softrelay_push_dead_tokens_total", provider="apns") == 1


async def test_push_log_holds_a_fingerprint_never_the_token(clock: ManualClock, logs: Path) -> None:
    h = Harness(clock, None, ScriptedProvider(TokenDead("BadDeviceToken")))
    await h.service.wake(h.request(30))
    await h.service.wake(h.request(30))
    text = "".join(p.read_text() for p in (logs / "log" / "push_log").glob("*.jsonl"))
    assert text.count('"token_fp":"' + h.service.fingerprint(TOKEN)) == 2
    assert '"outcome":"token_dead"' in text
    assert '"detail":"BadDeviceToken"' in text
    assert scan_for_canaries(logs, [TOKEN]) == []
    assert (
        h.metric(
            "softrelay_push_total", provider="apns", app="com.example.phone", outcome="delivered"
        )
        == 1
    )

"""What a stand-in answers for a token, and what it delivered.

Tests and the simulator script a token's next answers (`Respond`); with no script a
well-formed push is delivered. Every delivered push is recorded, and a mock phone waits
for its own with `Deliveries.wait_for`.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Respond:
    status: int = 200
    reason: str = ""  # APNs reason or FCM errorCode
    retry_after: int | None = None
    hang: bool = False  # never answer (tests the client's deadline)

    @classmethod
    def ok(cls) -> Respond:
        return cls()

    @classmethod
    def error(cls, status: int, reason: str, retry_after: int | None = None) -> Respond:
        return cls(status, reason, retry_after)

    @classmethod
    def hanging(cls) -> Respond:
        return cls(hang=True)


@dataclass(frozen=True, slots=True)
class Delivery:
    service: str  # "apns" or "fcm"
    token: str
    app: str  # APNs topic or FCM project
    headers: dict[str, str]
    payload: dict[str, Any]
    received_at: float


@dataclass
class Script:
    """Per-token queues of answers, consumed one per request."""

    _answers: dict[str, deque[Respond]] = field(default_factory=lambda: defaultdict(deque))

    def push(self, token: str, *answers: Respond) -> None:
        self._answers[token].extend(answers)

    def next(self, token: str) -> Respond | None:
        queue = self._answers.get(token)
        if not queue:
            return None
        answer = queue.popleft()
        if not queue:
            del self._answers[token]
        return answer


class Deliveries:
    """Every push a stand-in accepted, in order; bounded so a long run stays small."""

    def __init__(self, limit: int = 100_000) -> None:
        self.items: deque[Delivery] = deque(maxlen=limit)
        self._changed = asyncio.Event()  # set and cleared at once: wakes every waiter
        self._listeners: list[Callable[[Delivery], None]] = []

    def subscribe(self, listener: Callable[[Delivery], None]) -> Callable[[], None]:
        """Call `listener` with each delivery from now on (mock phones, the feed);
        the function returned unsubscribes. A listener must not block."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def add(self, delivery: Delivery) -> None:
        """Record a delivery. Not a coroutine, so a stand-in answers a request in the
        loop turn that completed it, without a task per request."""
        self.items.append(delivery)
        self._changed.set()
        self._changed.clear()
        for listener in list(self._listeners):
            listener(delivery)

    def for_token(self, token: str) -> list[Delivery]:
        return [d for d in self.items if d.token == token]

    async def wait_for(self, token: str, count: int = 1) -> list[Delivery]:
        """Wait until `count` pushes to `token` were delivered (bound it with a timeout)."""
        while len(found := self.for_token(token)) < count:
            await self._changed.wait()
        return found

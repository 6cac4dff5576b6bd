"""The provider seam: one implementation per push service family (APNs, FCM)."""

from __future__ import annotations

from typing import Protocol

from push.wake import Outcome, WakeRequest


class PushProvider(Protocol):
    family: str  # "apns" or "fcm": the `Service.family` it serves

    def serves(self, app_id: str) -> bool:
        """Whether credentials for this app are configured."""
        ...

    # The remaining time is a number, not only a bound: it also sets the push's expiry
    # (APNs apns-expiration, FCM ttl), measured on the service's injected clock.
    async def send(self, request: WakeRequest, timeout: float) -> Outcome:  # noqa: ASYNC109
        """One attempt, bounded by `timeout` seconds; never raises for a failed push."""
        ...

    async def close(self) -> None: ...
